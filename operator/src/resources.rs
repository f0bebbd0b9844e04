//! Builders of the objects a `SharedStorageCluster` owns. Pure functions of the cluster and
//! the reconciler's plan, so tests can assert on them and server-side apply gets the same
//! document for the same input (no spurious writes).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar,
    EnvVarSource, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodAffinityTerm, PodAntiAffinity, PodSpec, PodTemplateSpec, Probe, Secret, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount,
    VolumeResourceRequirements, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};

use crate::certs::{self, Leaf};
use crate::crd::{AntiAffinity, SharedStorageCluster};

pub const BRICK_PORT: i32 = 24100;
pub const METRICS_PORT: i32 = 25100;
pub const VOLFILE_KEY: &str = "volfile.yaml";
pub const VOLFILE_DIR: &str = "/etc/mortar";
pub const BRICK_MOUNT: &str = "/bricks";
pub const BRICK_DIR: &str = "/bricks/data";
pub const CLAIM_NAME: &str = "data";
pub const CONTAINER_NAME: &str = "brick";
/// Where brick pods see their certificate Secret (`ca.crt`, `tls.crt`, `tls.key`). Not under
/// `VOLFILE_DIR`: that is a read-only ConfigMap volume, no place for another mount point.
pub const TLS_DIR: &str = "/etc/mortar-tls";
/// Pod-template annotation: a hash of the brick certificate Secret's data. A renewed
/// certificate changes the template, so the bricks are replaced one at a time (each loads
/// its certificate at start).
pub const TLS_HASH_ANNOTATION: &str = "mortar.dev/tls-hash";
/// Long enough for a brick to finish in-flight requests and fsync before the kubelet kills it.
pub const TERMINATION_GRACE_SECONDS: i64 = 60;
pub const MANAGED_BY: &str = "mortar-operator";

/// The volume description the bricks and clients read (see DESIGN.md, "Volume description").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Volfile {
    pub volume: String,
    pub generation: u64,
    pub bricks: Vec<VolfileBrick>,
    /// Clients' ping timeout in seconds (`spec.pingTimeoutSeconds`): mounts without
    /// `-o ping-timeout` use it. Optional in the format; the operator always writes it.
    #[serde(
        rename = "ping-timeout",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ping_timeout: Option<u64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct VolfileBrick {
    pub id: String,
    pub address: String,
}

impl Volfile {
    pub fn to_yaml(&self) -> String {
        serde_norway::to_string(self).expect("a volfile always serialises")
    }

    pub fn from_yaml(s: &str) -> Result<Self, serde_norway::Error> {
        serde_norway::from_str(s)
    }

    /// Whether two volfiles say the same, ignoring the generation: bricks and settings.
    pub fn same_content(&self, other: &Volfile) -> bool {
        self.volume == other.volume
            && self.bricks == other.bricks
            && self.ping_timeout == other.ping_timeout
    }
}

/// What the reconciler decided; the builders turn it into objects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Number of bricks in the volfile and the StatefulSet.
    pub bricks: i32,
    pub volfile_generation: u64,
    pub image: String,
    /// `brick_tls_hash` of the brick certificate Secret the pods mount.
    pub tls_hash: String,
}

pub fn brick_set_name(ssc: &SharedStorageCluster) -> String {
    format!("{}-brick", ssc.name_any())
}

pub fn headless_service_name(ssc: &SharedStorageCluster) -> String {
    brick_set_name(ssc)
}

pub fn client_service_name(ssc: &SharedStorageCluster) -> String {
    ssc.name_any()
}

pub fn volfile_config_map_name(ssc: &SharedStorageCluster) -> String {
    format!("{}-volfile", ssc.name_any())
}

pub fn pdb_name(ssc: &SharedStorageCluster) -> String {
    brick_set_name(ssc)
}

pub fn brick_id(ordinal: i32) -> String {
    format!("b{ordinal}")
}

pub fn pod_name(ssc: &SharedStorageCluster, ordinal: i32) -> String {
    format!("{}-{ordinal}", brick_set_name(ssc))
}

/// The claim the StatefulSet controller creates for a brick from the `data` template.
pub fn claim_name(ssc: &SharedStorageCluster, ordinal: i32) -> String {
    format!("{CLAIM_NAME}-{}", pod_name(ssc, ordinal))
}

/// A brick's address through the headless Service, stable across pod restarts.
pub fn brick_address(ssc: &SharedStorageCluster, ordinal: i32) -> String {
    format!(
        "{}.{}.{}.svc:{BRICK_PORT}",
        pod_name(ssc, ordinal),
        headless_service_name(ssc),
        ssc.namespace().unwrap_or_default()
    )
}

/// Labels that select a cluster's brick pods (and its claims). Never change these: a
/// StatefulSet's selector is immutable.
pub fn selector_labels(ssc: &SharedStorageCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "mortar".to_string()),
        ("app.kubernetes.io/instance".to_string(), ssc.name_any()),
        (
            "app.kubernetes.io/component".to_string(),
            "brick".to_string(),
        ),
    ])
}

pub fn label_selector_string(ssc: &SharedStorageCluster) -> String {
    selector_labels(ssc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn object_labels(ssc: &SharedStorageCluster) -> BTreeMap<String, String> {
    let mut labels = selector_labels(ssc);
    labels.insert(
        "app.kubernetes.io/managed-by".to_string(),
        MANAGED_BY.to_string(),
    );
    labels
}

fn meta(ssc: &SharedStorageCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: ssc.namespace(),
        labels: Some(object_labels(ssc)),
        owner_references: ssc.controller_owner_ref(&()).map(|r| vec![r]),
        ..ObjectMeta::default()
    }
}

/// The cluster's CA: `ca.crt` (possibly several certificates: all are trusted, the first
/// signs), `ca.key`, and what a replacement under way keeps (see `certs`). Opaque, since it
/// is no TLS identity of anyone's.
pub fn ca_secret(ssc: &SharedStorageCluster, data: &certs::PemData) -> Secret {
    Secret {
        metadata: meta(ssc, certs::ca_secret_name(&ssc.name_any())),
        type_: Some("Opaque".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Secret::default()
    }
}

/// A leaf certificate in the layout of a TLS directory (`kubernetes.io/tls` plus `ca.crt`):
/// mounted as is by the bricks, written out as is by the CSI node plugin.
pub fn tls_secret(
    ssc: &SharedStorageCluster,
    leaf: Leaf,
    ca_bundle: &str,
    cert: &str,
    key: &str,
) -> Secret {
    use mortar_common::tls::{CA_FILE, CERT_FILE, KEY_FILE};
    let mut metadata = meta(ssc, leaf.secret_name(&ssc.name_any()));
    metadata
        .labels
        .get_or_insert_default()
        .insert("mortar.dev/role".into(), leaf.role().prefix().into());
    Secret {
        metadata,
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            (
                CA_FILE.to_string(),
                ByteString(ca_bundle.as_bytes().to_vec()),
            ),
            (CERT_FILE.to_string(), ByteString(cert.as_bytes().to_vec())),
            (KEY_FILE.to_string(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Secret::default()
    }
}

/// A hash of a Secret's data (keys and values, in key order), hex.
pub fn secret_hash(secret: &Secret) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (k, v) in secret.data.iter().flatten() {
        h.update((k.len() as u64).to_be_bytes());
        h.update(k.as_bytes());
        h.update((v.0.len() as u64).to_be_bytes());
        h.update(&v.0);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn volfile(ssc: &SharedStorageCluster, bricks: i32, generation: u64) -> Volfile {
    Volfile {
        volume: ssc.spec.volume_name.clone(),
        generation,
        bricks: (0..bricks)
            .map(|i| VolfileBrick {
                id: brick_id(i),
                address: brick_address(ssc, i),
            })
            .collect(),
        ping_timeout: Some(ssc.spec.ping_timeout_seconds.max(1) as u64),
    }
}

pub fn volfile_config_map(ssc: &SharedStorageCluster, volfile: &Volfile) -> ConfigMap {
    ConfigMap {
        metadata: meta(ssc, volfile_config_map_name(ssc)),
        data: Some(BTreeMap::from([(
            VOLFILE_KEY.to_string(),
            volfile.to_yaml(),
        )])),
        ..ConfigMap::default()
    }
}

fn brick_ports() -> Vec<ServicePort> {
    vec![
        ServicePort {
            name: Some("brick".into()),
            port: BRICK_PORT,
            target_port: Some(IntOrString::String("brick".into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        },
        ServicePort {
            name: Some("metrics".into()),
            port: METRICS_PORT,
            target_port: Some(IntOrString::String("metrics".into())),
            protocol: Some("TCP".into()),
            ..ServicePort::default()
        },
    ]
}

/// Gives every brick a stable DNS name. Not-ready bricks are published too: a brick that is
/// still healing must be reachable by its peers, or it could never become ready.
pub fn headless_service(ssc: &SharedStorageCluster) -> Service {
    Service {
        metadata: meta(ssc, headless_service_name(ssc)),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(ssc)),
            ports: Some(brick_ports()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Where clients fetch the volfile: any ready brick serves it.
pub fn client_service(ssc: &SharedStorageCluster) -> Service {
    Service {
        metadata: meta(ssc, client_service_name(ssc)),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(ssc)),
            ports: Some(brick_ports()[..1].to_vec()),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// One voluntary disruption at a time: with replica count N a single drained brick never
/// costs the volume its majority.
pub fn pod_disruption_budget(ssc: &SharedStorageCluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(ssc, pdb_name(ssc)),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(ssc)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

fn affinity(ssc: &SharedStorageCluster) -> Affinity {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(ssc)),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".into(),
        ..PodAffinityTerm::default()
    };
    let anti = match ssc.spec.anti_affinity {
        AntiAffinity::Required => PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![term]),
            ..PodAntiAffinity::default()
        },
        AntiAffinity::Preferred => PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: term,
                },
            ]),
            ..PodAntiAffinity::default()
        },
    };
    Affinity {
        pod_anti_affinity: Some(anti),
        ..Affinity::default()
    }
}

fn tcp_probe(timeout: i32, period: i32, failures: i32) -> Probe {
    Probe {
        tcp_socket: Some(TCPSocketAction {
            port: IntOrString::String("brick".into()),
            ..TCPSocketAction::default()
        }),
        timeout_seconds: Some(timeout),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Probe::default()
    }
}

fn brick_container(ssc: &SharedStorageCluster, plan: &Plan) -> Container {
    let ping = ssc.spec.ping_timeout_seconds.max(1);
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(plan.image.clone()),
        command: Some(vec!["mortar-brick".into()]),
        // $(BRICK_INDEX) is expanded by the kubelet: the brick id follows the pod's ordinal
        // without a shell in the image.
        args: Some(vec![
            "--id".into(),
            "b$(BRICK_INDEX)".into(),
            "--dir".into(),
            BRICK_DIR.into(),
            "--listen".into(),
            format!("0.0.0.0:{BRICK_PORT}"),
            "--volfile".into(),
            format!("{VOLFILE_DIR}/{VOLFILE_KEY}"),
            // Mutual TLS with the cluster's CA (the brick certificate Secret).
            "--tls-dir".into(),
            TLS_DIR.into(),
        ]),
        env: Some(vec![EnvVar {
            name: "BRICK_INDEX".into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "metadata.labels['apps.kubernetes.io/pod-index']".into(),
                    ..ObjectFieldSelector::default()
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("brick".into()),
                container_port: BRICK_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..ContainerPort::default()
            },
        ]),
        readiness_probe: Some(tcp_probe(ping, 5, 2)),
        liveness_probe: Some(tcp_probe(ping, 10, 6)),
        // A brick keeps files of every owner and its own records in trusted.* xattrs: it
        // needs root with CAP_CHOWN/CAP_FOWNER (default) and CAP_SYS_ADMIN (trusted.*).
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["SYS_ADMIN".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        resources: ssc.spec.resources.clone(),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CLAIM_NAME.into(),
                mount_path: BRICK_MOUNT.into(),
                ..VolumeMount::default()
            },
            // A whole-directory mount, not subPath: only then does the kubelet update the
            // file in place when the ConfigMap changes, which is how bricks follow the volfile.
            VolumeMount {
                name: "volfile".into(),
                mount_path: VOLFILE_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
            VolumeMount {
                name: "tls".into(),
                mount_path: TLS_DIR.into(),
                read_only: Some(true),
                ..VolumeMount::default()
            },
        ]),
        ..Container::default()
    }
}

pub fn claim_template(ssc: &SharedStorageCluster) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(CLAIM_NAME.into()),
            labels: Some(selector_labels(ssc)),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: ssc.spec.storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    ssc.spec.storage.size.clone(),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

/// The brick StatefulSet. Updates are `OnDelete`: the reconciler replaces one brick at a time
/// and only once the others have healed, which no built-in strategy can wait for.
pub fn brick_stateful_set(ssc: &SharedStorageCluster, plan: &Plan) -> StatefulSet {
    let pod_labels = object_labels(ssc);
    StatefulSet {
        metadata: meta(ssc, brick_set_name(ssc)),
        spec: Some(StatefulSetSpec {
            replicas: Some(plan.bricks),
            service_name: Some(headless_service_name(ssc)),
            // Bricks do not depend on each other to start; ordered start-up would only slow
            // down the first creation.
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..StatefulSetUpdateStrategy::default()
            }),
            selector: LabelSelector {
                match_labels: Some(selector_labels(ssc)),
                ..LabelSelector::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        TLS_HASH_ANNOTATION.to_string(),
                        plan.tls_hash.clone(),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![brick_container(ssc, plan)],
                    volumes: Some(vec![
                        Volume {
                            name: "volfile".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: volfile_config_map_name(ssc),
                                ..ConfigMapVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                        Volume {
                            name: "tls".into(),
                            secret: Some(SecretVolumeSource {
                                secret_name: Some(Leaf::Brick.secret_name(&ssc.name_any())),
                                // The key is the brick's alone (it runs as root).
                                default_mode: Some(0o400),
                                ..SecretVolumeSource::default()
                            }),
                            ..Volume::default()
                        },
                    ]),
                    affinity: Some(affinity(ssc)),
                    node_selector: ssc.spec.node_selector.clone(),
                    tolerations: ssc.spec.tolerations.clone(),
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    enable_service_links: Some(false),
                    ..PodSpec::default()
                }),
            },
            volume_claim_templates: Some(vec![claim_template(ssc)]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SharedStorageClusterSpec;

    fn ssc() -> SharedStorageCluster {
        let mut s = SharedStorageCluster::new("vol", SharedStorageClusterSpec::default());
        s.metadata.namespace = Some("ns".into());
        s.metadata.uid = Some("uid-1".into());
        s
    }

    #[test]
    fn volfile_lists_bricks_by_headless_dns() {
        let v = volfile(&ssc(), 3, 7);
        assert_eq!(v.volume, "data");
        assert_eq!(v.generation, 7);
        assert_eq!(v.bricks[2].id, "b2");
        assert_eq!(v.bricks[2].address, "vol-brick-2.vol-brick.ns.svc:24100");
        assert_eq!(v.ping_timeout, Some(5));
        let back = Volfile::from_yaml(&v.to_yaml()).unwrap();
        assert_eq!(back, v);
    }

    #[test]
    fn volfile_carries_the_ping_timeout() {
        let mut s = ssc();
        s.spec.ping_timeout_seconds = 2;
        let v = volfile(&s, 3, 1);
        assert_eq!(v.ping_timeout, Some(2));
        assert_eq!(
            v.to_yaml(),
            "volume: data\ngeneration: 1\nbricks:\n\
             - id: b0\n  address: vol-brick-0.vol-brick.ns.svc:24100\n\
             - id: b1\n  address: vol-brick-1.vol-brick.ns.svc:24100\n\
             - id: b2\n  address: vol-brick-2.vol-brick.ns.svc:24100\n\
             ping-timeout: 2\n"
        );
        // A volfile written before the key existed still reads, and differs in content.
        let old = Volfile::from_yaml(
            "volume: data\ngeneration: 1\nbricks:\n- id: b0\n  address: vol-brick-0.vol-brick.ns.svc:24100\n\
             - id: b1\n  address: vol-brick-1.vol-brick.ns.svc:24100\n\
             - id: b2\n  address: vol-brick-2.vol-brick.ns.svc:24100\n",
        )
        .unwrap();
        assert_eq!(old.ping_timeout, None);
        assert!(!old.same_content(&v));
        assert!(volfile(&s, 3, 9).same_content(&v));
    }

    #[test]
    fn stateful_set_runs_the_brick_command_line() {
        let plan = Plan {
            bricks: 3,
            volfile_generation: 1,
            image: "img:1".into(),
            tls_hash: "abc".into(),
        };
        let sts = brick_stateful_set(&ssc(), &plan);
        let spec = sts.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(
            spec.template
                .metadata
                .as_ref()
                .unwrap()
                .annotations
                .as_ref()
                .unwrap()[TLS_HASH_ANNOTATION],
            "abc"
        );
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "--id b$(BRICK_INDEX) --dir /bricks/data --listen 0.0.0.0:24100 --volfile /etc/mortar/volfile.yaml --tls-dir /etc/mortar-tls"
        );
        let tls = pod
            .volumes
            .as_ref()
            .unwrap()
            .iter()
            .find(|v| v.name == "tls")
            .unwrap();
        assert_eq!(
            tls.secret.as_ref().unwrap().secret_name.as_deref(),
            Some("vol-brick-tls")
        );
        assert!(
            c.volume_mounts
                .as_ref()
                .unwrap()
                .iter()
                .all(|m| m.sub_path.is_none())
        );
        assert_eq!(sts.metadata.owner_references.unwrap()[0].uid, "uid-1");
    }
}
