//! Shared code of the fuzz targets: the in-process brick that `brick_rpc` drives, and the
//! mount's FUSE session that `fuse_requests` drives.

pub mod brick;
pub mod fuse;
