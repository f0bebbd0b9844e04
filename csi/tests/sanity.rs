//! CSI conformance, case by case: what the CSI spec (v1, `spec.md`) demands of each RPC and
//! what the csi-sanity suite (kubernetes-csi/csi-test, `pkg/sanity`) checks, written from
//! those rules (csi-sanity is Go and does not run here). One test per RPC; each case says
//! which rule it checks: "spec, X errors" is a row of the RPC's error table, "spec, X" a
//! field or behaviour rule, "sanity:" a csi-sanity case. Cases for capabilities Mortar does
//! not advertise are replaced by the capability-consistency checks (UNIMPLEMENTED).
//!
//! Everything runs in process on one socket with identity, controller and node services,
//! as csi-sanity drives a driver: the local-directory backend, the bind-mount stand-in for
//! `mortar-mount`, and csi-sanity's staging directory and target parent made beforehand.

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;
use mortar_csi::csi::controller_service_capability::rpc::Type as CtrlCap;
use mortar_csi::csi::node_service_capability::rpc::Type as NodeCap;
use mortar_csi::csi::plugin_capability::service::Type as ServiceType;
use mortar_csi::csi::plugin_capability::volume_expansion::Type as ExpansionType;
use mortar_csi::csi::volume_capability::access_mode::Mode as AccessMode;
use mortar_csi::csi::*;
use mortar_csi::server::Mode;
use tonic::Code;

/// csi-sanity's `TestVolumeSize` (small: the scratch file system holds it).
const SIZE: i64 = 8 * MIB;
/// csi-sanity's `TestVolumeExpandSize`: the size plus an increment.
const EXPANDED: i64 = SIZE + MIB;
/// csi-sanity's `MaxNameLength`, the spec's general size limit for strings.
const MAX_NAME: usize = 128;

/// A well-formed id of a volume that was never created (csi-sanity's
/// `GenerateUniqueValidVolumeID`).
fn unknown_id() -> String {
    format!("{NAMESPACE}/{CLUSTER}/data/pvc-sanity-never-created")
}

/// An id this driver never issued (csi-sanity's `GenerateInvalidVolumeID`).
const GARBAGE_ID: &str = "sanity-fake-volume-id";

fn snw() -> VolumeCapability {
    mount_cap(AccessMode::SingleNodeWriter)
}

fn cap_with_flags(mode: AccessMode, flags: &[&str]) -> VolumeCapability {
    let mut cap = mount_cap(mode);
    cap.access_type = Some(volume_capability::AccessType::Mount(
        volume_capability::MountVolume {
            mount_flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        },
    ));
    cap
}

fn fs_cap(fs_type: &str) -> VolumeCapability {
    let mut cap = snw();
    cap.access_type = Some(volume_capability::AccessType::Mount(
        volume_capability::MountVolume {
            fs_type: fs_type.into(),
            ..Default::default()
        },
    ));
    cap
}

/// csi-sanity's `MakeCreateVolumeReq`: an exact size, SINGLE_NODE_WRITER mount.
fn sanity_create(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: SIZE,
            limit_bytes: SIZE,
        }),
        volume_capabilities: vec![snw()],
        parameters: cluster_params(),
        ..Default::default()
    }
}

fn range(required_bytes: i64, limit_bytes: i64) -> Option<CapacityRange> {
    Some(CapacityRange {
        required_bytes,
        limit_bytes,
    })
}

fn stage(id: &str, staging: &Path, cap: VolumeCapability) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn publish(
    id: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

fn stats(id: &str, path: &str) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    }
}

/// One plugin serving identity, controller and node, with csi-sanity's directories: the
/// staging path and the target's parent exist; the plugin makes `TargetPath/target`.
struct Sanity {
    layout: Layout,
    server: InProcess,
    c: Clients,
    staging: PathBuf,
    target_dir: PathBuf,
}

impl Sanity {
    async fn start(tag: &str) -> Sanity {
        let layout = Layout::new(&format!("sanity-{tag}"));
        let cfg = layout.node_config(layout.write_mount_command(false));
        let (server, c) = InProcess::start(&layout, Mode::All, Some(cfg)).await;
        let staging = layout.scratch.join("csi-staging");
        let target_dir = layout.scratch.join("csi-mount");
        std::fs::create_dir_all(&staging).unwrap();
        std::fs::create_dir_all(&target_dir).unwrap();
        Sanity {
            layout,
            server,
            c,
            staging,
            target_dir,
        }
    }

    fn target(&self) -> PathBuf {
        self.target_dir.join("target")
    }

    async fn create(&mut self, req: CreateVolumeRequest) -> Volume {
        self.c
            .controller
            .create_volume(req)
            .await
            .unwrap()
            .into_inner()
            .volume
            .expect("CreateVolumeResponse.volume is REQUIRED")
    }

    async fn volume_ids(&mut self) -> Vec<String> {
        self.c
            .controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .entries
            .into_iter()
            .map(|e| e.volume.unwrap().volume_id)
            .collect()
    }

    async fn stop(self) {
        self.server.stop().await;
        assert!(
            self.layout.scratch.mounts_below().is_empty(),
            "mounts left behind: {:?}",
            self.layout.scratch.mounts_below()
        );
    }
}

async fn controller_caps(c: &mut Clients) -> HashSet<i32> {
    c.controller
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|cap| match cap.r#type {
            Some(controller_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("sanity: every controller capability is an RPC capability"),
        })
        .collect()
}

async fn node_caps(c: &mut Clients) -> HashSet<i32> {
    c.node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .map(|cap| match cap.r#type {
            Some(node_service_capability::Type::Rpc(r)) => r.r#type,
            None => panic!("sanity: every node capability is an RPC capability"),
        })
        .collect()
}

async fn plugin_caps(c: &mut Clients) -> Vec<PluginCapability> {
    c.identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
}

fn has_service(caps: &[PluginCapability], t: ServiceType) -> bool {
    caps.iter().any(
        |c| matches!(&c.r#type, Some(plugin_capability::Type::Service(s)) if s.r#type == t as i32),
    )
}

// ---------------------------------------------------------------------------------------
// Identity service
// ---------------------------------------------------------------------------------------

/// Spec, GetPluginInfo: the name "MUST follow domain name notation format", "MUST be 63
/// characters or less, beginning and ending with an alphanumeric character with dashes,
/// dots, and alphanumerics between".
fn is_plugin_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'-' || *c == b'.')
}

#[tokio::test]
async fn get_plugin_info() {
    let mut s = Sanity::start("info").await;
    let info =
        s.c.identity
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    // sanity: GetPluginInfo "should return appropriate information" (name non-empty,
    // <= 63 characters, the name pattern); spec: name format rules above.
    assert!(is_plugin_name(&info.name), "{:?}", info.name);
    // Spec, GetPluginInfo: domain name notation, so at least two labels.
    assert!(info.name.contains('.'), "{:?}", info.name);
    // Spec, GetPluginInfo: vendor_version "is REQUIRED".
    assert!(!info.vendor_version.is_empty());
    // The checker itself refuses what the spec forbids.
    for bad in ["", "-x.dev", "x.dev-", "x_y.dev", &"a".repeat(64)] {
        assert!(!is_plugin_name(bad), "{bad:?}");
    }
    s.stop().await;
}

#[tokio::test]
async fn get_plugin_capabilities() {
    let mut s = Sanity::start("plugin-caps").await;
    let caps = plugin_caps(&mut s.c).await;
    // sanity: GetPluginCapabilities "should return appropriate capabilities": each one is
    // a known service or a known volume expansion type.
    for cap in &caps {
        match &cap.r#type {
            Some(plugin_capability::Type::Service(svc)) => assert!(
                matches!(
                    ServiceType::try_from(svc.r#type),
                    Ok(ServiceType::ControllerService
                        | ServiceType::VolumeAccessibilityConstraints)
                ),
                "unknown service {svc:?}"
            ),
            Some(plugin_capability::Type::VolumeExpansion(e)) => assert!(
                matches!(
                    ExpansionType::try_from(e.r#type),
                    Ok(ExpansionType::Online | ExpansionType::Offline)
                ),
                "unknown expansion {e:?}"
            ),
            None => panic!("capability without a type"),
        }
    }
    // Spec, PluginCapability.Service: CONTROLLER_SERVICE means the controller RPCs are
    // served; Mortar provisions, so it has one.
    assert!(has_service(&caps, ServiceType::ControllerService));
    let ctrl = controller_caps(&mut s.c).await;
    // Spec, VolumeExpansion: an ONLINE or OFFLINE plugin "MUST implement either the
    // EXPAND_VOLUME controller capability or the EXPAND_VOLUME node capability or both".
    let expansion = caps
        .iter()
        .any(|c| matches!(&c.r#type, Some(plugin_capability::Type::VolumeExpansion(_))));
    let node = node_caps(&mut s.c).await;
    if expansion {
        assert!(
            ctrl.contains(&(CtrlCap::ExpandVolume as i32))
                || node.contains(&(NodeCap::ExpandVolume as i32))
        );
    }
    // Spec, NodeGetInfo.accessible_topology: "A plugin that returns this field MUST also
    // set the VOLUME_ACCESSIBILITY_CONSTRAINTS plugin capability". Nodes report their key;
    // volumes report none, which the spec reads as "equally accessible from all nodes".
    assert!(has_service(
        &caps,
        ServiceType::VolumeAccessibilityConstraints
    ));
    let vol = s.create(sanity_create("sanity-topology")).await;
    assert!(vol.accessible_topology.is_empty());
    let info =
        s.c.node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    let segments = info.accessible_topology.unwrap().segments;
    assert_eq!(
        segments.get(mortar_csi::TOPOLOGY_NODE_KEY),
        Some(&info.node_id)
    );
    s.stop().await;

    // Spec, GetPluginCapabilities: "All instances of the same version ... SHALL return the
    // same set of capabilities, regardless of ... which RPCs an instance is serving": the
    // controller-only and node-only deployments answer like the all-in-one one.
    let layout = Layout::new("sanity-caps-controller");
    let (server, mut c) = InProcess::start(&layout, Mode::Controller, None).await;
    assert_eq!(plugin_caps(&mut c).await, caps);
    server.stop().await;
    let layout = Layout::new("sanity-caps-node");
    let cfg = layout.node_config(layout.write_mount_command(false));
    let (server, mut c) = InProcess::start(&layout, Mode::Node, Some(cfg)).await;
    assert_eq!(plugin_caps(&mut c).await, caps);
    server.stop().await;
}

#[tokio::test]
async fn probe() {
    // sanity: Probe "should return appropriate information": OK (ready true, false or
    // unset) or FAILED_PRECONDITION. A configured plugin is ready.
    let mut s = Sanity::start("probe").await;
    let r =
        s.c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.ready, Some(true));
    s.stop().await;

    // Spec, ProbeResponse.ready: a plugin "still initializing, but otherwise perfectly
    // healthy" answers OK with ready false: the node plugin whose mounter (its own
    // DaemonSet) is not listening yet.
    let layout = Layout::new("sanity-probe-mounter");
    let mut cfg = layout.node_config(layout.write_mount_command(false));
    cfg.mounter = Some(layout.scratch.join("mounter-not-up-yet.sock"));
    let (server, mut c) = InProcess::start(&layout, Mode::Node, Some(cfg)).await;
    let r = c
        .identity
        .probe(ProbeRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.ready, Some(false));
    server.stop().await;

    // Spec, Probe errors: "Missing required dependency" is FAILED_PRECONDITION: no mount
    // helper...
    let layout = Layout::new("sanity-probe-helper");
    let cfg = layout.node_config(PathBuf::from("/nonexistent/mortar-mount"));
    let (server, mut c) = InProcess::start(&layout, Mode::Node, Some(cfg)).await;
    assert_code(
        c.identity.probe(ProbeRequest {}).await,
        Code::FailedPrecondition,
        "no mount helper",
    );
    server.stop().await;
    // ...or a state directory that cannot be made.
    let layout = Layout::new("sanity-probe-state");
    let mut cfg = layout.node_config(layout.write_mount_command(false));
    let blocker = layout.scratch.join("a-file");
    std::fs::write(&blocker, b"not a directory").unwrap();
    cfg.state_dir = blocker.join("state");
    let (server, mut c) = InProcess::start(&layout, Mode::Node, Some(cfg)).await;
    assert_code(
        c.identity.probe(ProbeRequest {}).await,
        Code::FailedPrecondition,
        "unusable state directory",
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------
// Controller service
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn controller_get_capabilities() {
    let mut s = Sanity::start("ctrl-caps").await;
    let caps = controller_caps(&mut s.c).await;
    // sanity: ControllerGetCapabilities "should return appropriate capabilities": every
    // one a known RPC type (UNKNOWN is no capability).
    for t in &caps {
        assert!(
            matches!(CtrlCap::try_from(*t), Ok(t) if t != CtrlCap::Unknown),
            "unknown capability {t}"
        );
    }
    let has = |t: CtrlCap| caps.contains(&(t as i32));

    // Capability consistency, advertised: the RPC is served (spec: a Controller Plugin
    // "MUST implement this RPC call if it has" the capability).
    assert!(has(CtrlCap::CreateDeleteVolume));
    let vol = s.create(sanity_create("sanity-caps")).await;
    assert!(has(CtrlCap::ListVolumes));
    assert!(s.volume_ids().await.contains(&vol.volume_id));
    assert!(has(CtrlCap::GetCapacity));
    s.c.controller
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap();
    assert!(has(CtrlCap::ExpandVolume));
    s.c.controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: vol.volume_id.clone(),
            capacity_range: range(EXPANDED, 0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(has(CtrlCap::CloneVolume)); // exercised in `create_volume`
    // Spec, SINGLE_NODE_MULTI_WRITER: the SP "supports the SINGLE_NODE_SINGLE_WRITER
    // and/or SINGLE_NODE_MULTI_WRITER access modes".
    assert!(has(CtrlCap::SingleNodeMultiWriter));
    for mode in [
        AccessMode::SingleNodeSingleWriter,
        AccessMode::SingleNodeMultiWriter,
    ] {
        let mut req = sanity_create(&format!("sanity-mode-{mode:?}"));
        req.volume_capabilities = vec![mount_cap(mode)];
        s.create(req).await;
    }
    s.c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id,
            ..Default::default()
        })
        .await
        .unwrap();

    // Capability consistency, not advertised: spec, error scheme, "Call not implemented",
    // UNIMPLEMENTED, "Caller MAY call ... ControllerGetCapabilities to discover".
    assert!(!has(CtrlCap::PublishUnpublishVolume));
    assert!(!has(CtrlCap::PublishReadonly));
    // Spec: LIST_VOLUMES_PUBLISHED_NODES "MUST also support PUBLISH_UNPUBLISH_VOLUME".
    assert!(!has(CtrlCap::ListVolumesPublishedNodes));
    let ctl = &mut s.c.controller;
    assert_code(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: unknown_id(),
            node_id: "node-a".into(),
            volume_capability: Some(snw()),
            ..Default::default()
        })
        .await,
        Code::Unimplemented,
        "ControllerPublishVolume",
    );
    assert_code(
        ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: unknown_id(),
            ..Default::default()
        })
        .await,
        Code::Unimplemented,
        "ControllerUnpublishVolume",
    );
    assert!(!has(CtrlCap::CreateDeleteSnapshot));
    assert_code(
        ctl.create_snapshot(CreateSnapshotRequest {
            source_volume_id: unknown_id(),
            name: "snap".into(),
            ..Default::default()
        })
        .await,
        Code::Unimplemented,
        "CreateSnapshot",
    );
    assert_code(
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "snap".into(),
            ..Default::default()
        })
        .await,
        Code::Unimplemented,
        "DeleteSnapshot",
    );
    assert!(!has(CtrlCap::ListSnapshots));
    assert_code(
        ctl.list_snapshots(ListSnapshotsRequest::default()).await,
        Code::Unimplemented,
        "ListSnapshots",
    );
    assert!(!has(CtrlCap::GetVolume));
    assert!(!has(CtrlCap::VolumeCondition));
    assert_code(
        ctl.controller_get_volume(ControllerGetVolumeRequest {
            volume_id: unknown_id(),
        })
        .await,
        Code::Unimplemented,
        "ControllerGetVolume",
    );
    s.stop().await;
}

#[tokio::test]
async fn get_capacity() {
    let mut s = Sanity::start("capacity").await;
    let ctl = &mut s.c.controller;
    // sanity: GetCapacity "should return capacity (no optional values added)"; spec:
    // available_capacity "MUST NOT be negative".
    let r = ctl
        .get_capacity(GetCapacityRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(r.available_capacity >= 0);
    // Spec, GetCapacityRequest.parameters: the capacity of the storage those parameters
    // provision from.
    let r = ctl
        .get_capacity(GetCapacityRequest {
            parameters: cluster_params(),
            volume_capabilities: vec![snw()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.available_capacity > 0);
    // Spec, GetCapacityRequest.volume_capabilities: storage for volumes "that satisfy
    // ALL of the specified volume_capabilities": none is block.
    let r = ctl
        .get_capacity(GetCapacityRequest {
            parameters: cluster_params(),
            volume_capabilities: vec![snw(), block_cap()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.available_capacity, 0);
    s.stop().await;
}

#[tokio::test]
async fn list_volumes() {
    let mut s = Sanity::start("list").await;
    // sanity: ListVolumes "should return appropriate values (no optional values added)":
    // every entry has a volume with a volume_id (spec: Entry.volume is REQUIRED).
    let before =
        s.c.controller
            .list_volumes(ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner();
    assert!(before.next_token.is_empty());
    for e in &before.entries {
        let v = e.volume.as_ref().expect("entry without volume");
        assert!(!v.volume_id.is_empty() && v.capacity_bytes >= 0);
    }
    let total = before.entries.len();

    // sanity: "should fail when an invalid starting_token is passed"; spec, ListVolumes
    // errors: "Invalid starting_token", ABORTED.
    assert_code(
        s.c.controller
            .list_volumes(ListVolumesRequest {
                starting_token: "invalid-token".into(),
                max_entries: 0,
            })
            .await,
        Code::Aborted,
        "invalid starting_token",
    );
    // Spec, ListVolumesRequest.max_entries: "The value of this field MUST NOT be negative"
    // (general error scheme: invalid field, INVALID_ARGUMENT).
    assert_code(
        s.c.controller
            .list_volumes(ListVolumesRequest {
                starting_token: String::new(),
                max_entries: -1,
            })
            .await,
        Code::InvalidArgument,
        "negative max_entries",
    );

    // sanity: "check the presence of new volumes and absence of deleted ones".
    let vol = s.create(sanity_create("sanity")).await;
    let ids = s.volume_ids().await;
    assert_eq!(ids.len(), total + 1);
    assert!(ids.contains(&vol.volume_id));
    s.c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: vol.volume_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    let ids = s.volume_ids().await;
    assert_eq!(ids.len(), total);
    assert!(!ids.contains(&vol.volume_id));

    // Spec, ListVolumesRequest.max_entries: no more entries than asked, and next_token set
    // when there are more; spec, starting_token: the next page from there. The pages
    // together are the whole list, without duplicates.
    let mut made = HashSet::new();
    for i in 0..5 {
        made.insert(
            s.create(sanity_create(&format!("sanity{i}")))
                .await
                .volume_id,
        );
    }
    let first =
        s.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(first.entries.len(), 2);
    assert!(!first.next_token.is_empty());
    let rest =
        s.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: first.next_token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(rest.entries.len(), 5 - 2, "the rest at once");
    assert!(rest.next_token.is_empty());
    let seen: Vec<String> = first
        .entries
        .iter()
        .chain(&rest.entries)
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), made);
    assert_eq!(seen.len(), made.len(), "no duplicates");

    // sanity (pagination, "accept tokens when the last volume from a page is deleted");
    // spec, ListVolumes: volumes deleted while paging may make the CO miss or see again
    // entries, but the token stays valid: delete the listed page and the very volume the
    // token points at, add one, and page on.
    let page =
        s.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 2,
                starting_token: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
    let mut gone: Vec<String> = page
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    gone.push(page.next_token.clone());
    for id in &gone {
        s.c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let added = s.create(sanity_create("new-addition")).await.volume_id;
    let next =
        s.c.controller
            .list_volumes(ListVolumesRequest {
                max_entries: 0,
                starting_token: page.next_token,
            })
            .await
            .unwrap()
            .into_inner();
    let existing: HashSet<String> = made
        .iter()
        .filter(|id| !gone.contains(id))
        .cloned()
        .chain([added])
        .collect();
    let listed: Vec<String> = next
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    assert!(listed.len() <= existing.len());
    assert!(listed.iter().all(|id| existing.contains(id)), "{listed:?}");
    assert_eq!(
        listed.iter().collect::<HashSet<_>>().len(),
        listed.len(),
        "no duplicates"
    );
    s.stop().await;
}

#[tokio::test]
async fn create_volume() {
    let mut s = Sanity::start("create").await;
    // sanity: "should fail when no name is provided"; spec: name "is REQUIRED".
    let mut r = sanity_create("");
    r.volume_capabilities.clear();
    r.capacity_range = None;
    assert_code(
        s.c.controller.create_volume(r).await,
        Code::InvalidArgument,
        "no name",
    );
    // sanity: "should fail when no volume capabilities are provided"; spec:
    // volume_capabilities "is REQUIRED".
    let mut r = sanity_create("sanity-no-caps");
    r.volume_capabilities.clear();
    assert_code(
        s.c.controller.create_volume(r).await,
        Code::InvalidArgument,
        "no capabilities",
    );
    // Spec, volume_capabilities: "If ANY of the specified volume capabilities are not
    // supported by the SP, the call MUST return the appropriate gRPC error code"
    // (general: unsupported field, INVALID_ARGUMENT): block, or another file system.
    for (what, cap) in [("block", block_cap()), ("ext4", fs_cap("ext4"))] {
        let mut r = sanity_create("sanity-bad-cap");
        r.volume_capabilities.push(cap);
        assert_code(
            s.c.controller.create_volume(r).await,
            Code::InvalidArgument,
            what,
        );
    }
    // Spec, CapacityRange: values "MUST NOT be negative"; and a range whose lower bound
    // is above its upper bound asks for nothing (invalid field, INVALID_ARGUMENT).
    let mut r = sanity_create("sanity-bad-range");
    r.capacity_range = range(-1, 0);
    assert_code(
        s.c.controller.create_volume(r).await,
        Code::InvalidArgument,
        "negative",
    );
    let mut r = sanity_create("sanity-bad-range");
    r.capacity_range = range(2 * MIB, MIB);
    assert_code(
        s.c.controller.create_volume(r).await,
        Code::InvalidArgument,
        "required_bytes > limit_bytes",
    );
    // Spec, CreateVolume errors: "Unsupported capacity_range", OUT_OF_RANGE: more than
    // the Mortar volume holds.
    let mut r = sanity_create("sanity-huge");
    r.capacity_range = range(i64::MAX / 2, 0);
    assert_code(
        s.c.controller.create_volume(r).await,
        Code::OutOfRange,
        "bigger than the volume",
    );

    // sanity: "should return appropriate values SingleNodeWriter NoCapacity"; spec:
    // capacity_range "is OPTIONAL ... the Plugin MAY choose".
    let mut r = sanity_create("sanity-no-capacity");
    r.capacity_range = None;
    let v = s.create(r).await;
    assert!(!v.volume_id.is_empty() && v.capacity_bytes >= 0);
    // Spec, Volume.volume_id: the general size limit, 128 bytes.
    assert!(v.volume_id.len() <= 128);
    // sanity: "SingleNodeWriter WithCapacity": capacity_bytes >= required_bytes.
    let mut r = sanity_create("sanity-with-capacity");
    r.capacity_range = range(SIZE, 0);
    assert!(s.create(r).await.capacity_bytes >= SIZE);
    // Spec, CapacityRange: "To specify an exact size, required_bytes and limit_bytes SHALL
    // be set to the same value"; a limit alone caps it.
    assert_eq!(
        s.create(sanity_create("sanity-exact")).await.capacity_bytes,
        SIZE
    );
    let mut r = sanity_create("sanity-limit-only");
    r.capacity_range = range(0, 4 * MIB);
    let c = s.create(r).await.capacity_bytes;
    assert!(c > 0 && c <= 4 * MIB, "{c}");

    // sanity: "should not fail when requesting to create a volume with already existing
    // name and same capacity"; spec: idempotent, "MUST reply 0 OK" with the same volume.
    let a = s.create(sanity_create("sanity-twice")).await;
    let b = s.create(sanity_create("sanity-twice")).await;
    assert_eq!(a.volume_id, b.volume_id);
    assert!(b.capacity_bytes >= SIZE);
    // sanity: "should fail when requesting to create a volume with already existing name
    // and different capacity"; spec, CreateVolume errors: "Volume already exists but is
    // incompatible", ALREADY_EXISTS.
    let mut r = sanity_create("sanity-twice");
    r.capacity_range = range(2 * SIZE, 2 * SIZE);
    assert_code(
        s.c.controller.create_volume(r).await,
        Code::AlreadyExists,
        "same name, other size",
    );

    // sanity: "should not fail when creating volume with maximum-length name"; spec, name:
    // any Unicode string within the 128-byte limit, so also one that looks like the
    // external-provisioner's `pvc-<uid>` but is longer, and a non-ASCII one.
    let long = format!("sanity-controller-create-maxlen-{}", "x".repeat(MAX_NAME));
    let long_pvc = format!("pvc-{}", "0".repeat(MAX_NAME));
    for name in [
        &long[..MAX_NAME],
        &long_pvc[..MAX_NAME],
        "sanity ünïcødé ボリューム",
    ] {
        let v = s.create(sanity_create(name)).await;
        assert!(v.volume_id.len() <= 128, "{}", v.volume_id);
        let again = s.create(sanity_create(name)).await;
        assert_eq!(v.volume_id, again.volume_id, "{name:?} maps to one volume");
    }

    // sanity: "should create volume from an existing source volume" (CLONE_VOLUME); spec,
    // Volume.content_source: set when the volume is pre-populated from a source.
    let src = s
        .create(sanity_create("sanity-controller-source-vol"))
        .await;
    let clone = |name: &str, source: &str| {
        let mut r = sanity_create(name);
        r.volume_content_source = Some(VolumeContentSource {
            r#type: Some(volume_content_source::Type::Volume(
                volume_content_source::VolumeSource {
                    volume_id: source.into(),
                },
            )),
        });
        r
    };
    let v = s
        .create(clone("sanity-controller-vol-from-vol", &src.volume_id))
        .await;
    assert!(v.content_source.is_some());
    // sanity: "should fail when the volume source volume is not found"; spec, CreateVolume
    // errors: "Source does not exist", NOT_FOUND.
    for missing in [unknown_id(), GARBAGE_ID.to_string()] {
        assert_code(
            s.c.controller
                .create_volume(clone("sanity-vol-from-missing", &missing))
                .await,
            Code::NotFound,
            &format!("clone of {missing}"),
        );
    }
    // Spec, CreateVolume errors: "Source incompatible or not supported", INVALID_ARGUMENT:
    // a snapshot source without CREATE_DELETE_SNAPSHOT.
    let mut r = sanity_create("sanity-vol-from-snap");
    r.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: "non-existing-snapshot-id".into(),
            },
        )),
    });
    assert_code(
        s.c.controller.create_volume(r).await,
        Code::InvalidArgument,
        "snapshot source",
    );
    // Spec, CreateVolumeRequest.secrets: OPTIONAL; a plugin needing none still accepts them.
    let mut r = sanity_create("sanity-with-secrets");
    r.secrets.insert("password".into(), "x".into());
    s.create(r).await;
    s.stop().await;
}

#[tokio::test]
async fn delete_volume() {
    let mut s = Sanity::start("delete").await;
    // sanity: "should fail when no volume id is provided"; spec: volume_id "is REQUIRED".
    assert_code(
        s.c.controller
            .delete_volume(DeleteVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "no id",
    );
    // sanity: "should succeed when an invalid volume id is used"; spec, DeleteVolume: "If a
    // volume corresponding to the specified volume_id does not exist ... the Plugin MUST
    // reply 0 OK" (also a well-formed id of a volume or cluster that is not there).
    for id in [
        GARBAGE_ID.to_string(),
        unknown_id(),
        format!("{NAMESPACE}/no-such-cluster/data/pvc-x"),
        "@10.255.0.1:24100/data/pvc-x".to_string(),
    ] {
        s.c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("delete {id}: {e}"));
    }
    // sanity: "should return appropriate values (no optional values added)", and the spec's
    // idempotency: deleting again is OK.
    let v = s
        .create(sanity_create("sanity-controller-create-appropriate"))
        .await;
    for _ in 0..2 {
        s.c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: v.volume_id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!s.volume_ids().await.contains(&v.volume_id));
    s.stop().await;
}

#[tokio::test]
async fn validate_volume_capabilities() {
    let mut s = Sanity::start("validate").await;
    let req = |id: &str, caps: Vec<VolumeCapability>| ValidateVolumeCapabilitiesRequest {
        volume_id: id.into(),
        volume_capabilities: caps,
        ..Default::default()
    };
    // sanity: "should fail when no volume id is provided"; spec: volume_id "is REQUIRED".
    assert_code(
        s.c.controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest::default())
            .await,
        Code::InvalidArgument,
        "no id",
    );
    let v = s.create(sanity_create("sanity-controller-validate")).await;
    // sanity: "should fail when no volume capabilities are provided"; spec:
    // volume_capabilities "is REQUIRED".
    assert_code(
        s.c.controller
            .validate_volume_capabilities(req(&v.volume_id, vec![]))
            .await,
        Code::InvalidArgument,
        "no capabilities",
    );
    // sanity: "should return appropriate values (no optional values added)"; spec,
    // Confirmed.volume_capabilities "is REQUIRED" when confirmed is set.
    let mut r = req(&v.volume_id, vec![snw()]);
    r.volume_context = v.volume_context.clone();
    let ok =
        s.c.controller
            .validate_volume_capabilities(r)
            .await
            .unwrap()
            .into_inner();
    let confirmed = ok.confirmed.expect("a supported capability is confirmed");
    assert_eq!(confirmed.volume_capabilities, vec![snw()]);
    assert_eq!(confirmed.volume_context, v.volume_context);
    // Spec, ValidateVolumeCapabilities: "confirmed only if all the volume capabilities
    // specified in the request are supported"; otherwise OK without it, and the message
    // says why.
    let no =
        s.c.controller
            .validate_volume_capabilities(req(&v.volume_id, vec![snw(), block_cap()]))
            .await
            .unwrap()
            .into_inner();
    assert!(no.confirmed.is_none());
    assert!(!no.message.is_empty());
    // sanity: "should fail when the requested volume does not exist"; spec,
    // ValidateVolumeCapabilities errors: "Volume does not exist", NOT_FOUND.
    for id in [unknown_id(), GARBAGE_ID.to_string()] {
        assert_code(
            s.c.controller
                .validate_volume_capabilities(req(&id, vec![snw()]))
                .await,
            Code::NotFound,
            &id,
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn controller_expand_volume() {
    let mut s = Sanity::start("ctrl-expand").await;
    let expand = |id: &str, range: Option<CapacityRange>| ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: range,
        volume_capability: Some(snw()),
        ..Default::default()
    };
    // sanity: "should fail if no volume id is given"; spec: volume_id "is REQUIRED".
    assert_code(
        s.c.controller
            .controller_expand_volume(expand("", range(EXPANDED, 0)))
            .await,
        Code::InvalidArgument,
        "no id",
    );
    // sanity: "should fail if no capacity range is given"; spec: capacity_range "is
    // REQUIRED" (also with a real volume).
    assert_code(
        s.c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "empty request",
    );
    let mut r = sanity_create("sanity-expand-volume");
    r.capacity_range = range(SIZE, 0);
    let v = s.create(r).await;
    assert_code(
        s.c.controller
            .controller_expand_volume(expand(&v.volume_id, None))
            .await,
        Code::InvalidArgument,
        "no capacity range",
    );
    // Spec, ControllerExpandVolume errors: "Exceeds capabilities", INVALID_ARGUMENT.
    let mut r = expand(&v.volume_id, range(EXPANDED, 0));
    r.volume_capability = Some(block_cap());
    assert_code(
        s.c.controller.controller_expand_volume(r).await,
        Code::InvalidArgument,
        "block capability",
    );
    // Spec, ControllerExpandVolume errors: "Volume does not exist", NOT_FOUND.
    for id in [unknown_id(), GARBAGE_ID.to_string()] {
        assert_code(
            s.c.controller
                .controller_expand_volume(expand(&id, range(EXPANDED, 0)))
                .await,
            Code::NotFound,
            &id,
        );
    }
    // sanity: expand "should work": capacity_bytes is the new size; ONLINE and nothing to
    // grow on the node, so no node expansion.
    let r =
        s.c.controller
            .controller_expand_volume(expand(&v.volume_id, range(EXPANDED, 0)))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, EXPANDED);
    assert!(!r.node_expansion_required);
    // Spec, ControllerExpandVolume: idempotent; "already larger than or equal to the target
    // capacity ... SHOULD reply 0 OK".
    for size in [EXPANDED, SIZE] {
        let r =
            s.c.controller
                .controller_expand_volume(expand(&v.volume_id, range(size, 0)))
                .await
                .unwrap()
                .into_inner();
        assert_eq!(r.capacity_bytes, EXPANDED);
    }
    // Spec, ControllerExpandVolume errors: "Unsupported capacity_range", OUT_OF_RANGE:
    // a limit below the current size (no shrinking), or more than the volume holds.
    for (what, rg) in [
        ("limit below size", range(0, SIZE)),
        ("too big", range(i64::MAX / 2, 0)),
    ] {
        assert_code(
            s.c.controller
                .controller_expand_volume(expand(&v.volume_id, rg))
                .await,
            Code::OutOfRange,
            what,
        );
    }
    s.stop().await;
}

// ---------------------------------------------------------------------------------------
// Node service
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn node_get_capabilities() {
    let mut s = Sanity::start("node-caps").await;
    let caps = node_caps(&mut s.c).await;
    // sanity: NodeGetCapabilities "should return appropriate capabilities": known types.
    for t in &caps {
        assert!(NodeCap::try_from(*t).is_ok(), "unknown capability {t}");
    }
    let has = |t: NodeCap| caps.contains(&(t as i32));
    // Capability consistency: each advertised RPC is served (spec: "MUST implement this
    // RPC call if it has" the capability) -- NodeStage/Unstage, NodeGetVolumeStats,
    // NodeExpandVolume; VOLUME_CONDITION: the stats carry volume_condition ("MUST be
    // specified if the VOLUME_CONDITION node capability is supported").
    assert!(has(NodeCap::StageUnstageVolume));
    assert!(has(NodeCap::GetVolumeStats));
    assert!(has(NodeCap::ExpandVolume));
    assert!(has(NodeCap::VolumeCondition));
    // No VOLUME_MOUNT_GROUP: a fuse mount has no group to apply.
    assert!(!has(NodeCap::VolumeMountGroup));
    let v = s.create(sanity_create("sanity-node-caps")).await;
    let (staging, target) = (s.staging.clone(), s.target());
    s.c.node
        .node_stage_volume(stage(&v.volume_id, &staging, snw()))
        .await
        .unwrap();
    s.c.node
        .node_publish_volume(publish(&v.volume_id, &staging, &target, snw()))
        .await
        .unwrap();
    let st =
        s.c.node
            .node_get_volume_stats(stats(&v.volume_id, &target.display().to_string()))
            .await
            .unwrap()
            .into_inner();
    assert!(st.volume_condition.is_some());
    s.c.node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: v.volume_id.clone(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap();
    // SINGLE_NODE_MULTI_WRITER: both new modes are accepted (spec: "the SP supports the
    // SINGLE_NODE_SINGLE_WRITER and/or SINGLE_NODE_MULTI_WRITER access modes"), and
    // SINGLE_NODE_WRITER still is ("Plugins MUST accept and allow use of the
    // SINGLE_NODE_WRITER access mode"), as the publish above shows.
    assert!(has(NodeCap::SingleNodeMultiWriter));
    s.c.node
        .node_unpublish_volume(unpublish_req(&v.volume_id, &target))
        .await
        .unwrap();
    s.c.node
        .node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn node_get_info() {
    let mut s = Sanity::start("node-info").await;
    let info =
        s.c.node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    // sanity: NodeGetInfo "should return appropriate values": node_id non-empty,
    // max_volumes_per_node not negative; spec: node_id at most 256 bytes.
    assert!(!info.node_id.is_empty() && info.node_id.len() <= 256);
    assert!(info.max_volumes_per_node >= 0);
    // Spec, NodeGetInfo.accessible_topology: allowed with VOLUME_ACCESSIBILITY_CONSTRAINTS,
    // which the plugin advertises; the segment names the node.
    let segments = info.accessible_topology.clone().unwrap().segments;
    assert_eq!(
        segments.get(mortar_csi::TOPOLOGY_NODE_KEY),
        Some(&info.node_id)
    );
    s.stop().await;
}

#[tokio::test]
async fn node_stage_and_unstage_volume() {
    let mut s = Sanity::start("stage").await;
    let staging = s.staging.clone();
    let n = &mut s.c.node;
    // sanity: NodeStageVolume "should fail when no volume id is provided".
    assert_code(
        n.node_stage_volume(stage("", &staging, snw())).await,
        Code::InvalidArgument,
        "no id",
    );
    // sanity: "should fail when no staging target path is provided".
    let mut r = stage(&unknown_id(), &staging, snw());
    r.staging_target_path.clear();
    assert_code(
        n.node_stage_volume(r).await,
        Code::InvalidArgument,
        "no staging path",
    );
    // Spec, staging_target_path: "It MUST be an absolute path".
    assert_code(
        n.node_stage_volume(stage(&unknown_id(), Path::new("relative/staging"), snw()))
            .await,
        Code::InvalidArgument,
        "relative staging path",
    );
    let v = s.create(sanity_create("sanity-node-stage-nocaps")).await;
    let n = &mut s.c.node;
    // sanity: "should fail when no volume capability is provided"; spec: volume_capability
    // "is REQUIRED", and its access_mode too.
    let mut r = stage(&v.volume_id, &staging, snw());
    r.volume_capability = None;
    assert_code(
        n.node_stage_volume(r).await,
        Code::InvalidArgument,
        "no capability",
    );
    let mut cap = snw();
    cap.access_mode = None;
    assert_code(
        n.node_stage_volume(stage(&v.volume_id, &staging, cap))
            .await,
        Code::InvalidArgument,
        "no access mode",
    );
    // Spec, NodeStageVolume errors: "Exceeds capabilities", FAILED_PRECONDITION: a block
    // or ext4 volume was never on offer.
    for (what, cap) in [("block", block_cap()), ("ext4", fs_cap("ext4"))] {
        assert_code(
            n.node_stage_volume(stage(&v.volume_id, &staging, cap))
                .await,
            Code::FailedPrecondition,
            what,
        );
    }
    // Spec, NodeStageVolume errors: "Volume does not exist", NOT_FOUND.
    for id in [unknown_id(), GARBAGE_ID.to_string()] {
        assert_code(
            n.node_stage_volume(stage(&id, &staging, snw())).await,
            Code::NotFound,
            &id,
        );
    }
    assert!(
        !is_mount_point(&staging),
        "no refused call mounted anything"
    );
    // Spec, NodeStageVolume: idempotent, "already staged ... MUST reply 0 OK".
    for _ in 0..2 {
        n.node_stage_volume(stage(&v.volume_id, &staging, snw()))
            .await
            .unwrap();
    }
    assert_eq!(mount_count(&staging), 1);

    // sanity: NodeUnstageVolume "should fail when no volume id is provided" and "... no
    // staging target path is provided".
    assert_code(
        n.node_unstage_volume(unstage_req("", &staging)).await,
        Code::InvalidArgument,
        "unstage without id",
    );
    assert_code(
        n.node_unstage_volume(unstage_req(&unknown_id(), Path::new("")))
            .await,
        Code::InvalidArgument,
        "unstage without path",
    );
    // Spec, NodeUnstageVolume: idempotent; "not staged to the staging_target_path ... MUST
    // reply 0 OK" (a path never used, a path whose parent is gone, a repeat).
    let never = s.layout.scratch.join("never-staged");
    std::fs::create_dir_all(&never).unwrap();
    let n = &mut s.c.node;
    for p in [never.as_path(), Path::new("/nonexistent/staging/path")] {
        n.node_unstage_volume(unstage_req(&v.volume_id, p))
            .await
            .unwrap_or_else(|e| panic!("unstage {}: {e}", p.display()));
    }
    for _ in 0..2 {
        n.node_unstage_volume(unstage_req(&v.volume_id, &staging))
            .await
            .unwrap();
        assert!(!is_mount_point(&staging));
    }
    s.stop().await;
}

#[tokio::test]
async fn node_publish_volume() {
    let mut s = Sanity::start("publish").await;
    let (staging, target) = (s.staging.clone(), s.target());
    let n = &mut s.c.node;
    // sanity: NodePublishVolume "should fail when no volume id is provided" (an empty
    // request), "... no target path is provided" (only an id), "... no volume capability
    // is provided" (id and target): each a missing REQUIRED field, INVALID_ARGUMENT.
    assert_code(
        n.node_publish_volume(NodePublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "empty request",
    );
    assert_code(
        n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: unknown_id(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "no target path",
    );
    assert_code(
        n.node_publish_volume(NodePublishVolumeRequest {
            volume_id: unknown_id(),
            target_path: target.display().to_string(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "no capability",
    );
    // Spec, NodePublishVolume errors: "Staging target path not set" (STAGE_UNSTAGE_VOLUME
    // advertised), FAILED_PRECONDITION.
    let mut r = publish(&unknown_id(), &staging, &target, snw());
    r.staging_target_path.clear();
    assert_code(
        n.node_publish_volume(r).await,
        Code::FailedPrecondition,
        "no staging path",
    );
    // Spec, NodePublishVolume errors: "Exceeds capabilities", FAILED_PRECONDITION.
    for (what, cap) in [("block", block_cap()), ("ext4", fs_cap("ext4"))] {
        assert_code(
            n.node_publish_volume(publish(&unknown_id(), &staging, &target, cap))
                .await,
            Code::FailedPrecondition,
            what,
        );
    }
    // Spec, NodePublishVolume errors: "Volume does not exist", NOT_FOUND.
    assert_code(
        n.node_publish_volume(publish(GARBAGE_ID, &staging, &target, snw()))
            .await,
        Code::NotFound,
        "garbage id",
    );
    assert!(!target.exists(), "refused calls made no target");

    let v = s.create(sanity_create("sanity-node-publish")).await;
    let id = v.volume_id.clone();
    let n = &mut s.c.node;
    // Spec, RPC interactions: NodeStageVolume "MUST be called and return success ... before
    // any NodePublishVolume": publishing what is not staged is FAILED_PRECONDITION.
    assert_code(
        n.node_publish_volume(publish(&id, &staging, &target, snw()))
            .await,
        Code::FailedPrecondition,
        "not staged",
    );
    n.node_stage_volume(stage(&id, &staging, snw()))
        .await
        .unwrap();
    // Spec, target_path: "Creation of target_path is the responsibility of the SP"; spec,
    // NodePublishVolume: T1=T2, P1=P2 is OK (idempotent).
    for _ in 0..2 {
        n.node_publish_volume(publish(&id, &staging, &target, snw()))
            .await
            .unwrap();
    }
    assert!(is_mount_point(&target));
    assert_eq!(mount_count(&target), 1);
    // Spec, second-publish table: T1=T2, P1!=P2 is ALREADY_EXISTS ("Volume published but is
    // incompatible").
    let mut ro = publish(&id, &staging, &target, snw());
    ro.readonly = true;
    assert_code(
        n.node_publish_volume(ro).await,
        Code::AlreadyExists,
        "same target, readonly now",
    );
    // Spec, second-publish table with SINGLE_NODE_MULTI_WRITER advertised: MULTI_NODE_...
    // and SINGLE_NODE_MULTI_WRITER at another target are OK.
    let other = |name: &str| s.target_dir.join(name);
    let (t2, t3) = (other("t2"), other("t3"));
    let n = &mut s.c.node;
    n.node_publish_volume(publish(
        &id,
        &staging,
        &t2,
        mount_cap(AccessMode::SingleNodeMultiWriter),
    ))
    .await
    .unwrap();
    n.node_publish_volume(publish(
        &id,
        &staging,
        &t3,
        mount_cap(AccessMode::MultiNodeMultiWriter),
    ))
    .await
    .unwrap();
    // Mount flags that a bind mount carries are applied.
    let t4 = s.target_dir.join("t4");
    let n = &mut s.c.node;
    n.node_publish_volume(publish(
        &id,
        &staging,
        &t4,
        cap_with_flags(AccessMode::SingleNodeMultiWriter, &["ro", "noexec"]),
    ))
    .await
    .unwrap();
    let m = mortar_csi::mounts::find_now(&t4).unwrap().unwrap();
    assert!(m.read_only() && m.options.contains("noexec"), "{m:?}");
    for t in [&target, &t2, &t3, &t4] {
        n.node_unpublish_volume(unpublish_req(&id, t))
            .await
            .unwrap();
    }
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();

    // sanity: "with single node multi writer capability: should fail when volume with
    // single node single writer access mode is already mounted at a different target
    // path"; spec, second-publish table: SINGLE_NODE_SINGLE_WRITER at T1!=T2 is
    // FAILED_PRECONDITION. The same target stays idempotent, and once the first workload
    // is gone the next one may publish.
    let sw = mount_cap(AccessMode::SingleNodeSingleWriter);
    let mut r = sanity_create("sanity-node-publish-single-node-single-writer");
    r.volume_capabilities = vec![sw.clone()];
    let single = s.create(r).await.volume_id;
    let other_target = s.target_dir.join("other_target");
    let n = &mut s.c.node;
    n.node_stage_volume(stage(&single, &staging, sw.clone()))
        .await
        .unwrap();
    n.node_publish_volume(publish(&single, &staging, &target, sw.clone()))
        .await
        .unwrap();
    assert_code(
        n.node_publish_volume(publish(&single, &staging, &other_target, sw.clone()))
            .await,
        Code::FailedPrecondition,
        "second single writer",
    );
    assert!(!is_mount_point(&other_target));
    n.node_publish_volume(publish(&single, &staging, &target, sw.clone()))
        .await
        .unwrap();
    n.node_unpublish_volume(unpublish_req(&single, &target))
        .await
        .unwrap();
    n.node_publish_volume(publish(&single, &staging, &other_target, sw.clone()))
        .await
        .unwrap();
    n.node_unpublish_volume(unpublish_req(&single, &other_target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&single, &staging))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn node_unpublish_volume() {
    let mut s = Sanity::start("unpublish").await;
    let (staging, target) = (s.staging.clone(), s.target());
    let n = &mut s.c.node;
    // sanity: NodeUnpublishVolume "should fail when no volume id is provided" and "... no
    // target path is provided".
    assert_code(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest::default())
            .await,
        Code::InvalidArgument,
        "no id",
    );
    assert_code(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: unknown_id(),
            target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "no target path",
    );
    // Spec, NodeUnpublishVolume: idempotent; a target never published (an empty
    // directory, a path that does not exist) is OK.
    let empty = s.target_dir.join("never-published");
    std::fs::create_dir_all(&empty).unwrap();
    for p in [empty.clone(), s.target_dir.join("does/not/exist")] {
        n.node_unpublish_volume(unpublish_req(&unknown_id(), &p))
            .await
            .unwrap_or_else(|e| panic!("unpublish {}: {e}", p.display()));
    }
    // sanity: "should remove target path"; spec, target_path: "The SP MUST delete the file
    // or directory it created at this path".
    let v = s
        .create(sanity_create("sanity-node-unpublish-volume"))
        .await;
    let n = &mut s.c.node;
    n.node_stage_volume(stage(&v.volume_id, &staging, snw()))
        .await
        .unwrap();
    n.node_publish_volume(publish(&v.volume_id, &staging, &target, snw()))
        .await
        .unwrap();
    assert!(target.is_dir());
    for _ in 0..2 {
        n.node_unpublish_volume(unpublish_req(&v.volume_id, &target))
            .await
            .unwrap();
        assert!(!target.exists(), "target path removed");
    }
    n.node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn node_get_volume_stats() {
    let mut s = Sanity::start("stats").await;
    let (staging, target) = (s.staging.clone(), s.target());
    let n = &mut s.c.node;
    // sanity: NodeGetVolumeStats "should fail when no volume id is provided" and "... no
    // volume path is provided".
    assert_code(
        n.node_get_volume_stats(stats("", "some/path")).await,
        Code::InvalidArgument,
        "no id",
    );
    assert_code(
        n.node_get_volume_stats(stats(&unknown_id(), "")).await,
        Code::InvalidArgument,
        "no path",
    );
    // sanity: "should fail when volume is not found"; spec, NodeGetVolumeStats errors:
    // "Volume does not exist", NOT_FOUND.
    for id in [unknown_id(), GARBAGE_ID.to_string()] {
        assert_code(
            n.node_get_volume_stats(stats(&id, "some/path")).await,
            Code::NotFound,
            &id,
        );
    }
    let v = s
        .create(sanity_create("sanity-node-get-volume-stats"))
        .await;
    let other = s.create(sanity_create("sanity-node-other-volume")).await;
    let n = &mut s.c.node;
    n.node_stage_volume(stage(&v.volume_id, &staging, snw()))
        .await
        .unwrap();
    n.node_publish_volume(publish(&v.volume_id, &staging, &target, snw()))
        .await
        .unwrap();
    // sanity: "should fail when volume does not exist on the specified path"; spec: "does
    // not exist on specified volume_path", NOT_FOUND -- a relative path, an absolute one
    // that is not there, a directory that holds no mount, another volume's mount.
    let nothing = s.layout.scratch.join("no/such/path").display().to_string();
    let plain = s.target_dir.display().to_string();
    let target_s = target.display().to_string();
    for (id, path) in [
        (&v.volume_id, "some/path"),
        (&v.volume_id, nothing.as_str()),
        (&v.volume_id, plain.as_str()),
        (&other.volume_id, target_s.as_str()),
    ] {
        assert_code(
            n.node_get_volume_stats(stats(id, path)).await,
            Code::NotFound,
            &format!("{id} at {path}"),
        );
    }
    // Spec, NodeGetVolumeStatsResponse: usage with known units, total REQUIRED, no value
    // negative; volume_condition set (VOLUME_CONDITION), normal for a working mount.
    // "any valid path where volume was previously staged or published": both work.
    for path in [&target, &staging] {
        let st = n
            .node_get_volume_stats(stats(&v.volume_id, &path.display().to_string()))
            .await
            .unwrap()
            .into_inner();
        assert!(!st.usage.is_empty());
        for u in &st.usage {
            assert!(matches!(
                volume_usage::Unit::try_from(u.unit),
                Ok(volume_usage::Unit::Bytes | volume_usage::Unit::Inodes)
            ));
            assert!(u.total >= 0 && u.used >= 0 && u.available >= 0, "{u:?}");
        }
        assert_eq!(usage(&st, volume_usage::Unit::Bytes).total, SIZE);
        let cond = st.volume_condition.expect("VOLUME_CONDITION advertised");
        assert!(!cond.abnormal && !cond.message.is_empty());
    }
    n.node_unpublish_volume(unpublish_req(&v.volume_id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn node_expand_volume() {
    let mut s = Sanity::start("node-expand").await;
    let (staging, target) = (s.staging.clone(), s.target());
    let expand = |id: &str, path: &str| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.into(),
        ..Default::default()
    };
    let v = s.create(sanity_create("sanity-node-expand-volume")).await;
    let n = &mut s.c.node;
    // sanity: NodeExpandVolume "should fail when no volume id is provided" and "... no
    // volume path is provided".
    let mut r = expand("", &s.target_dir.display().to_string());
    r.volume_capability = Some(snw());
    assert_code(
        n.node_expand_volume(r).await,
        Code::InvalidArgument,
        "no id",
    );
    let mut r = expand(&v.volume_id, "");
    r.volume_capability = Some(snw());
    assert_code(
        n.node_expand_volume(r).await,
        Code::InvalidArgument,
        "no path",
    );
    // sanity: "should fail when volume is not found"; spec, NodeExpandVolume errors:
    // "Volume does not exist", NOT_FOUND.
    for id in [unknown_id(), GARBAGE_ID.to_string()] {
        assert_code(
            n.node_expand_volume(expand(&id, "some/path")).await,
            Code::NotFound,
            &id,
        );
    }
    // sanity: "should work if node-expand is called after node-publish" (after the
    // controller expanded it to exactly the new size).
    let r =
        s.c.controller
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                capacity_range: range(EXPANDED, 0),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(r.capacity_bytes, EXPANDED);
    let n = &mut s.c.node;
    n.node_stage_volume(stage(&v.volume_id, &staging, snw()))
        .await
        .unwrap();
    n.node_publish_volume(publish(&v.volume_id, &staging, &target, snw()))
        .await
        .unwrap();
    let mut r = expand(&v.volume_id, &target.display().to_string());
    r.capacity_range = range(EXPANDED, 0);
    let got = n.node_expand_volume(r.clone()).await.unwrap().into_inner();
    assert!(got.capacity_bytes == 0 || got.capacity_bytes >= EXPANDED);
    // Spec, NodeExpandVolume errors: "Exceeds capabilities", INVALID_ARGUMENT.
    r.volume_capability = Some(block_cap());
    assert_code(
        n.node_expand_volume(r).await,
        Code::InvalidArgument,
        "block capability",
    );
    n.node_unpublish_volume(unpublish_req(&v.volume_id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&v.volume_id, &staging))
        .await
        .unwrap();
    s.stop().await;
}

/// sanity: Node Service "should work" and "should be idempotent": create, stage, publish,
/// stats, unpublish, unstage, delete, each call repeated (csi-sanity's IdempotentCount).
#[tokio::test]
async fn node_service_lifecycle_is_idempotent() {
    const COUNT: usize = 3;
    let mut s = Sanity::start("lifecycle").await;
    let (staging, target) = (s.staging.clone(), s.target());
    let mut ids = HashSet::new();
    for _ in 0..COUNT {
        ids.insert(
            s.create(sanity_create("sanity-node-full-3"))
                .await
                .volume_id,
        );
    }
    assert_eq!(ids.len(), 1);
    let id = ids.into_iter().next().unwrap();
    let info =
        s.c.node
            .node_get_info(NodeGetInfoRequest {})
            .await
            .unwrap()
            .into_inner();
    assert!(!info.node_id.is_empty());
    let n = &mut s.c.node;
    for _ in 0..COUNT {
        n.node_stage_volume(stage(&id, &staging, snw()))
            .await
            .unwrap();
    }
    for _ in 0..COUNT {
        n.node_publish_volume(publish(&id, &staging, &target, snw()))
            .await
            .unwrap();
    }
    std::fs::write(target.join("data"), b"sanity").unwrap();
    let st = n
        .node_get_volume_stats(stats(&id, &target.display().to_string()))
        .await
        .unwrap()
        .into_inner();
    assert!(!st.usage.is_empty());
    for _ in 0..COUNT {
        n.node_unpublish_volume(unpublish_req(&id, &target))
            .await
            .unwrap();
    }
    for _ in 0..COUNT {
        n.node_unstage_volume(unstage_req(&id, &staging))
            .await
            .unwrap();
    }
    assert!(s.layout.scratch.mounts_below().is_empty());
    for _ in 0..COUNT {
        s.c.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: id.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    assert!(!s.volume_ids().await.contains(&id));
    s.stop().await;
}

// ---------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------

static LOG: Mutex<Vec<u8>> = Mutex::new(Vec::new());

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        LOG.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Spec, Secrets Requirements: secrets are "sensitive and MUST be treated as such (not
/// logged, etc.)"; spec, MountVolume.mount_flags: they "MAY contain sensitive information
/// ... MUST NOT leak". Every request that carries secrets is sent with them, on success
/// and error paths, with everything logged at TRACE; neither the log nor any answer may
/// show them.
#[tokio::test]
async fn secrets_never_reach_logs_or_answers() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_writer(|| Capture)
        .with_ansi(false)
        .try_init()
        .expect("the only subscriber of this test process");
    const SECRET: &str = "s3cr3t-sanity-value";
    let secrets: std::collections::HashMap<String, String> =
        [("password".to_string(), SECRET.to_string())].into();
    let flag = format!("password={SECRET}");
    let mut s = Sanity::start("secrets").await;
    let (staging, target) = (s.staging.clone(), s.target());
    let mut answers = Vec::new();
    let mut note = |r: Result<String, tonic::Status>| {
        answers.push(match r {
            Ok(ok) => ok,
            Err(st) => format!("{:?} {}", st.code(), st.message()),
        })
    };

    let ctl = &mut s.c.controller;
    let mut r = sanity_create("sanity-secrets");
    r.secrets = secrets.clone();
    let id = ctl
        .create_volume(r.clone())
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    r.parameters.insert("clustre".into(), "typo".into());
    note(ctl.create_volume(r).await.map(|r| format!("{r:?}")));
    for vid in [id.clone(), unknown_id()] {
        note(
            ctl.validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: vid.clone(),
                volume_capabilities: vec![snw()],
                secrets: secrets.clone(),
                ..Default::default()
            })
            .await
            .map(|r| format!("{r:?}")),
        );
        note(
            ctl.controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: vid,
                capacity_range: range(EXPANDED, 0),
                secrets: secrets.clone(),
                volume_capability: Some(snw()),
            })
            .await
            .map(|r| format!("{r:?}")),
        );
    }
    note(
        ctl.controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .map(|r| format!("{r:?}")),
    );
    note(
        ctl.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .map(|r| format!("{r:?}")),
    );
    note(
        ctl.create_snapshot(CreateSnapshotRequest {
            source_volume_id: id.clone(),
            name: "snap".into(),
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .map(|r| format!("{r:?}")),
    );
    note(
        ctl.delete_snapshot(DeleteSnapshotRequest {
            snapshot_id: "snap".into(),
            secrets: secrets.clone(),
        })
        .await
        .map(|r| format!("{r:?}")),
    );
    note(
        ctl.list_snapshots(ListSnapshotsRequest {
            secrets: secrets.clone(),
            ..Default::default()
        })
        .await
        .map(|r| format!("{r:?}")),
    );

    let n = &mut s.c.node;
    for vid in [unknown_id(), id.clone()] {
        let mut r = stage(
            &vid,
            &staging,
            cap_with_flags(AccessMode::SingleNodeWriter, &[&flag]),
        );
        r.secrets = secrets.clone();
        note(n.node_stage_volume(r).await.map(|r| format!("{r:?}")));
    }
    for vid in [unknown_id(), id.clone()] {
        let mut r = publish(
            &vid,
            &staging,
            &target,
            cap_with_flags(AccessMode::SingleNodeWriter, &["ro", &flag]),
        );
        r.secrets = secrets.clone();
        note(n.node_publish_volume(r).await.map(|r| format!("{r:?}")));
    }
    assert!(
        is_mount_point(&target),
        "published with secrets and a secret mount flag"
    );
    for vid in [unknown_id(), id.clone()] {
        note(
            n.node_expand_volume(NodeExpandVolumeRequest {
                volume_id: vid,
                volume_path: target.display().to_string(),
                capacity_range: range(EXPANDED, 0),
                volume_capability: Some(cap_with_flags(AccessMode::SingleNodeWriter, &[&flag])),
                secrets: secrets.clone(),
                ..Default::default()
            })
            .await
            .map(|r| format!("{r:?}")),
        );
    }
    n.node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    n.node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    s.c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            secrets: secrets.clone(),
        })
        .await
        .unwrap();
    s.stop().await;

    let log = String::from_utf8_lossy(&LOG.lock().unwrap()).into_owned();
    for method in [
        "CreateVolume",
        "NodeStageVolume",
        "NodePublishVolume",
        "DeleteVolume",
    ] {
        assert!(
            log.contains(method),
            "the log was captured: no {method} in\n{log}"
        );
    }
    assert!(
        log.contains("ignored"),
        "the ignored mount flag was logged by name:\n{log}"
    );
    assert!(!log.contains(SECRET), "a secret reached the log:\n{log}");
    for a in &answers {
        assert!(!a.contains(SECRET), "a secret reached an answer: {a}");
    }
}
