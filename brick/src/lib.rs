//! mortar-brick: a storage server holding one full copy of a Mortar volume.

pub mod at;
pub mod budget;
pub mod heal;
pub mod locks;
pub mod quota;
pub mod record;
pub mod repair;
pub mod service;
pub mod store;
