//! mortar-operator: turns `SharedStorageCluster` resources into brick pods, a volume and a
//! status that tells the truth about the bricks.

pub mod certs;
pub mod controller;
pub mod crd;
pub mod health;
pub mod leader;
pub mod metrics;
pub mod resources;
pub mod status;
pub mod validation;
