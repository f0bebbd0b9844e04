//! The Mortar client: the FUSE mount, the `mortar` command (admin and local clusters), all
//! built on the replication library (`mortar-replication`).

pub mod admin;
pub mod fuse;
pub mod handover;
pub mod local;
pub mod mount;
