//! The brick wire protocol, generated from `proto/mortar.proto`.

pub mod v1 {
    tonic::include_proto!("mortar.v1");
}

/// The type of file data on the wire (see `build.rs`).
pub use prost::bytes::Bytes;
pub use v1::*;
