//! The Mortar volume client: replication over the bricks, and the tools built on it.

pub mod error;
pub mod gfid;
pub mod telemetry;
pub mod volfile;
pub mod conn;
pub mod replicate;
pub mod fuse;
pub mod mount;
pub mod admin;
pub mod local;
