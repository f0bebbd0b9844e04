//! Shared code of the fuzz targets: the in-process brick that `brick_rpc` drives.

pub mod brick;
