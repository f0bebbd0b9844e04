//! mortar-brick: a storage server holding one full copy of a Mortar volume.

pub mod locks;
pub mod record;
pub mod service;
pub mod store;
