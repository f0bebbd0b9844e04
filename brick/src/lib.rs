//! mortar-brick: a storage server holding one full copy of a Mortar volume.

pub mod at;
pub mod budget;
pub mod bulk;
pub mod heal;
pub mod leases;
pub mod locks;
pub mod quota;
pub mod record;
pub mod repair;
pub mod rpcstats;
pub mod service;
pub mod store;
