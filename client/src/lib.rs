//! The Mortar volume client: replication over the bricks, and the tools built on it.

pub mod admin;
pub mod conn;
pub mod error;
pub mod fuse;
pub mod gfid;
pub mod heal;
pub mod local;
pub mod mount;
pub mod replicate;
pub mod telemetry;
pub mod volfile;
