//! The `SharedStorageCluster` custom resource (`mortar.dev/v1alpha1`).
//!
//! The schema is generated from these types; `crds/` holds the generated YAML and a test keeps
//! the two equal. Defaults live in the schema (via `#[serde(default)]`) so the API server fills
//! them in and `kubectl get -o yaml` shows the values the operator actually uses.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "mortar.dev";
pub const VERSION: &str = "v1alpha1";
pub const KIND: &str = "SharedStorageCluster";
pub const DEFAULT_VOLUME: &str = "data";
pub const DEFAULT_BRICKS: i32 = 3;
pub const DEFAULT_SIZE: &str = "10Gi";
pub const DEFAULT_PING_TIMEOUT_SECONDS: i32 = 5;

/// A replicated Mortar volume served by `bricks` brick pods, each holding a full copy.
// The printer columns repeat `type_`, which clippy mistakes for a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "mortar.dev",
    version = "v1alpha1",
    kind = "SharedStorageCluster",
    namespaced,
    shortname = "ssc",
    status = "SharedStorageClusterStatus",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Bricks", type_ = "integer", json_path = ".spec.bricks"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyBricks"),
    printcolumn(name = "Heal", type_ = "integer", json_path = ".status.healPending"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SharedStorageClusterSpec {
    /// Number of bricks. Every brick holds a full copy, so this is also the replica count;
    /// writes need a majority of them.
    #[serde(default = "default_bricks")]
    #[schemars(range(min = 1))]
    pub bricks: i32,

    /// Name of the volume the bricks serve. Clients mount `HOST:/<volumeName>`. The bricks'
    /// data belongs to this name, so it cannot change once set.
    #[serde(default = "default_volume_name")]
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("volumeName is immutable"))]
    pub volume_name: String,

    /// Storage of each brick (one PersistentVolumeClaim per brick). Fixed at creation:
    /// StatefulSet claim templates are immutable; resize the claims themselves instead.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("storage is immutable; resize the brick PVCs directly"))]
    pub storage: StorageSpec,

    /// Brick container image. Defaults to the image the operator was configured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// Compute resources of the brick container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels that brick pods must match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the brick pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Whether two bricks may share a node. `required` refuses to schedule a brick next to
    /// another; `preferred` spreads them when the cluster has room.
    #[serde(default)]
    pub anti_affinity: AntiAffinity,

    /// How long a brick may stay silent before it counts as down.
    #[serde(default = "default_ping_timeout")]
    #[schemars(range(min = 1, max = 300))]
    pub ping_timeout_seconds: i32,

    /// What happens to the bricks' PersistentVolumeClaims when the cluster is deleted.
    #[serde(default)]
    pub reclaim_policy: ReclaimPolicy,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each brick's volume.
    #[serde(default = "default_size")]
    #[schemars(schema_with = "quantity_schema")]
    pub size: Quantity,

    /// StorageClass of the bricks' claims; the cluster default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

impl Default for StorageSpec {
    fn default() -> Self {
        Self {
            size: default_size(),
            storage_class_name: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AntiAffinity {
    Required,
    #[default]
    Preferred,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum ReclaimPolicy {
    #[default]
    Retain,
    Delete,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    Pending,
    Ready,
    Degraded,
    Healing,
    Failed,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharedStorageClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// The bricks of the current volfile, as they report themselves.
    #[serde(default)]
    pub bricks: Vec<BrickStatus>,
    /// Bricks that are up and have nothing left to heal.
    #[serde(default)]
    pub ready_bricks: i32,
    /// Sum of the bricks' pending heal entries.
    #[serde(default)]
    pub heal_pending: i64,
    /// Generation of the volfile in the cluster's ConfigMap.
    #[serde(default)]
    pub volfile_generation: i64,
    /// Usable size of the volume: the smallest brick's capacity, since every brick holds it all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The certificates the operator keeps for the cluster (mutual TLS between bricks and
    /// clients) and when they end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificates: Option<CertificatesStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificatesStatus {
    /// The Secret holding the cluster's CA (`ca.crt`, `ca.key`).
    pub ca_secret: String,
    /// When the CA ends. The operator does not replace it (SECURITY.md, manual rotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_not_after: Option<Time>,
    /// The earliest end of the leaf certificates below; each is renewed 30 days before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
    #[serde(default)]
    pub leaves: Vec<CertificateStatus>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateStatus {
    /// brick, client or admin.
    pub role: String,
    /// The Secret holding it (`ca.crt`, `tls.crt`, `tls.key`).
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BrickStatus {
    pub id: String,
    pub pod: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    pub address: String,
    pub up: bool,
    pub heal_pending: i64,
}

fn default_bricks() -> i32 {
    DEFAULT_BRICKS
}

fn default_volume_name() -> String {
    DEFAULT_VOLUME.to_string()
}

fn default_size() -> Quantity {
    Quantity(DEFAULT_SIZE.to_string())
}

fn default_ping_timeout() -> i32 {
    DEFAULT_PING_TIMEOUT_SECONDS
}

/// Kubernetes' own quantity grammar, as the API server's built-in types validate it.
pub const QUANTITY_PATTERN: &str = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$";

// Int-or-string like the built-in Quantity, plus the grammar so the API server rejects a
// malformed size at admission (the pattern applies to the string form).
fn quantity_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "A Kubernetes quantity, e.g. 10Gi.",
        "default": DEFAULT_SIZE,
        "pattern": QUANTITY_PATTERN,
        "x-kubernetes-int-or-string": true,
        // kube marks optional int-or-string fields nullable; an explicit null would then skip
        // the default and leave a size nobody can read.
        "nullable": false,
    })
}

/// The CRD as YAML, exactly as `mortar-operator crd` prints it and `crds/` holds it.
pub fn crd_yaml() -> String {
    let crd = SharedStorageCluster::crd();
    serde_norway::to_string(&crd).expect("a CRD always serialises")
}

impl Default for SharedStorageClusterSpec {
    fn default() -> Self {
        Self {
            bricks: default_bricks(),
            volume_name: default_volume_name(),
            storage: StorageSpec::default(),
            image: None,
            resources: None,
            node_selector: None,
            tolerations: None,
            anti_affinity: AntiAffinity::default(),
            ping_timeout_seconds: default_ping_timeout(),
            reclaim_policy: ReclaimPolicy::default(),
        }
    }
}
