//! `mortar-csi`: the Container Storage Interface driver for Mortar volumes.
//!
//! One process serves the identity service plus either the controller service (creates,
//! expands and deletes per-PVC directories on a volume) or the node service (mounts a
//! volume once per node and cluster and bind-mounts PVC directories into pods).
//!
//! Layout follows the usual CSI driver split: [`identity`], [`controller`] and [`node`]
//! each implement one gRPC service; [`ops`] hides how the controller reaches a volume;
//! [`mounts`] wraps the kernel's mount table; [`error`] maps failures to gRPC codes once.

pub mod caps;
pub mod controller;
pub mod error;
pub mod identity;
pub mod inflight;
pub mod metrics;
pub mod mortar_ops;
pub mod mounter;
pub mod mounts;
pub mod node;
pub mod ops;
pub mod ops_conformance;
pub mod quota;
pub mod server;
pub mod tls_secret;
pub mod volume_id;

/// Generated CSI v1 messages and service traits (from `proto/csi/csi.proto`).
pub mod csi {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("csi.v1");
}

/// The driver name registered with Kubernetes (`CSIDriver` object, StorageClass provisioner).
pub const DRIVER_NAME: &str = "mortar.csi.mortar.dev";

/// Reported as `vendor_version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Node topology key reported by NodeGetInfo. Mortar volumes are reachable from every node
/// (CreateVolume sets no accessible_topology), so nothing is constrained by it; the node
/// label it gives lets per-node facts be attached later.
pub const TOPOLOGY_NODE_KEY: &str = "topology.mortar.csi.mortar.dev/node";
