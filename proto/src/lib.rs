//! The brick wire protocol, generated from `proto/mortar.proto`.

pub mod v1 {
    tonic::include_proto!("mortar.v1");
}

pub use v1::*;
