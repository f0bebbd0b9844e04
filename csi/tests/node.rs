//! Node service driven over its unix socket in kubelet's order, with real mounts: a
//! `mortar-mount` stand-in makes the shared per-cluster mount (a bind mount of the
//! volume's local directory), and the plugin makes the staging and pod bind mounts.

mod common;

use std::collections::HashSet;
use std::io::ErrorKind;

use common::*;
use mortar_csi::csi::node_service_capability::rpc::Type as NodeCap;
use mortar_csi::csi::volume_capability::access_mode::Mode as AccessMode;
use mortar_csi::csi::*;
use mortar_csi::server::Mode;
use tonic::Code;

async fn start(tag: &str) -> (Layout, InProcess, Clients) {
    let layout = Layout::new(tag);
    let cmd = layout.write_mount_command(false);
    let cfg = layout.node_config(cmd);
    let (server, clients) = InProcess::start(&layout, Mode::All, Some(cfg)).await;
    (layout, server, clients)
}

#[tokio::test]
async fn node_reports_itself() {
    let (_layout, server, mut c) = start("node-info").await;
    let info = c
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.node_id, "node-a");
    let topo = info.accessible_topology.unwrap();
    assert_eq!(
        topo.segments
            .get(mortar_csi::TOPOLOGY_NODE_KEY)
            .map(String::as_str),
        Some("node-a")
    );
    let caps: HashSet<i32> = c
        .node
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for want in [
        NodeCap::StageUnstageVolume,
        NodeCap::GetVolumeStats,
        NodeCap::ExpandVolume,
        NodeCap::VolumeCondition,
    ] {
        assert!(caps.contains(&(want as i32)), "missing {want:?}");
    }
    assert_eq!(
        c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    server.stop().await;
}

#[tokio::test]
async fn kubelet_order_two_pods_share_a_pvc() {
    let (layout, server, mut c) = start("node-flow").await;
    let vol = c
        .controller
        .create_volume(create_req("pvc-flow", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = vol.volume_id.clone();
    let staging = layout
        .scratch
        .join("kubelet/plugins/pv/pvc-flow/globalmount");
    std::fs::create_dir_all(&staging).unwrap();
    let pod1 = layout
        .scratch
        .join("kubelet/pods/pod1/volumes/pvc-flow/mount");
    let pod2 = layout
        .scratch
        .join("kubelet/pods/pod2/volumes/pvc-flow/mount");
    let pod3 = layout
        .scratch
        .join("kubelet/pods/pod3/volumes/pvc-flow/mount");

    // Stage: one shared mount for the cluster, the PVC directory bound on the staging path.
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    assert!(is_mount_point(&layout.shared_mount()));
    assert!(is_mount_point(&staging));
    assert_eq!(
        layout.mount_calls(),
        vec![format!(
            "shared.storage.svc:24100:/data {}",
            layout.shared_mount().display()
        )]
    );
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    assert_eq!(
        layout.mount_calls().len(),
        1,
        "restage reuses the shared mount"
    );
    assert_eq!(
        mortar_csi::mounts::read_mountinfo()
            .unwrap()
            .iter()
            .filter(|m| m.mount_point == staging)
            .count(),
        1,
        "no stacked mounts"
    );

    // Publish to two pods; what one writes the other reads, and it lands in the PVC dir.
    c.node
        .node_publish_volume(publish_req(&id, &staging, &pod1, false))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &pod2, false))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &pod1, false))
        .await
        .unwrap();
    assert!(is_mount_point(&pod1) && is_mount_point(&pod2));
    std::fs::write(pod1.join("hello"), vec![b'x'; 300_000]).unwrap();
    assert_eq!(std::fs::read(pod2.join("hello")).unwrap().len(), 300_000);
    assert!(layout.data().join("pvc-flow").join("hello").exists());
    assert!(
        !pod1.join("pvc-flow").exists(),
        "pods see their PVC's directory, not the volume root"
    );

    // Read-only publish refuses writes but reads.
    c.node
        .node_publish_volume(publish_req(&id, &staging, &pod3, true))
        .await
        .unwrap();
    assert_eq!(std::fs::read(pod3.join("hello")).unwrap().len(), 300_000);
    let err = std::fs::write(pod3.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    // A read-only access mode alone also makes it read-only.
    let pod4 = layout
        .scratch
        .join("kubelet/pods/pod4/volumes/pvc-flow/mount");
    let mut ro_mode = publish_req(&id, &staging, &pod4, false);
    ro_mode.volume_capability = Some(mount_cap(AccessMode::MultiNodeReaderOnly));
    c.node.node_publish_volume(ro_mode).await.unwrap();
    assert_eq!(
        std::fs::write(pod4.join("nope"), b"x")
            .unwrap_err()
            .raw_os_error(),
        Some(libc::EROFS)
    );
    // Same target, incompatible flags.
    assert_code(
        c.node
            .node_publish_volume(publish_req(&id, &staging, &pod1, true))
            .await,
        Code::AlreadyExists,
        "rw target republished ro",
    );

    // Stats: the PVC's size and usage, not the whole volume's.
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: pod1.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let bytes = usage(&stats, volume_usage::Unit::Bytes);
    assert_eq!(bytes.total, 10 * MIB);
    assert_eq!(bytes.used, 300_000);
    assert_eq!(bytes.available, 10 * MIB - 300_000);
    let inodes = usage(&stats, volume_usage::Unit::Inodes);
    assert_eq!(inodes.used, 1);
    assert!(inodes.total > 0);
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Expand: controller raises the limit, node has nothing to grow, stats follow.
    let r = c
        .controller
        .controller_expand_volume(ControllerExpandVolumeRequest {
            volume_id: id.clone(),
            capacity_range: Some(CapacityRange {
                required_bytes: 20 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.node_expansion_required);
    let n = c
        .node
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: id.clone(),
            volume_path: pod1.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: 20 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.capacity_bytes, 20 * MIB);
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: pod2.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(usage(&stats, volume_usage::Unit::Bytes).total, 20 * MIB);

    // A second PVC of the same cluster shares the node's mount.
    let vol2 = c
        .controller
        .create_volume(create_req("pvc-flow-2", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_code(
        c.node
            .node_get_volume_stats(NodeGetVolumeStatsRequest {
                volume_id: vol2.volume_id.clone(),
                volume_path: pod1.display().to_string(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "stats of another volume's path",
    );
    let staging2 = layout
        .scratch
        .join("kubelet/plugins/pv/pvc-flow-2/globalmount");
    c.node
        .node_stage_volume(stage_req(&vol2.volume_id, &staging2))
        .await
        .unwrap();
    assert_eq!(
        layout.mount_calls().len(),
        1,
        "one FUSE mount per cluster per node"
    );

    // Tear down in kubelet's order; every step is idempotent.
    for pod in [&pod1, &pod2, &pod3, &pod4] {
        let req = unpublish_req(&id, &pod);
        c.node.node_unpublish_volume(req.clone()).await.unwrap();
        assert!(!pod.exists(), "target path removed");
        c.node.node_unpublish_volume(req).await.unwrap();
    }
    assert!(
        layout.data().join("pvc-flow").join("hello").exists(),
        "unpublish never touches data"
    );
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(!is_mount_point(&staging));
    assert!(
        is_mount_point(&layout.shared_mount()),
        "still used by the second PVC"
    );
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&vol2.volume_id, &staging2))
        .await
        .unwrap();
    assert!(
        !is_mount_point(&layout.shared_mount()),
        "last user gone, shared mount released"
    );
    c.node
        .node_unstage_volume(unstage_req(&vol2.volume_id, &staging2))
        .await
        .unwrap();
    assert!(
        layout.scratch.mounts_below().is_empty(),
        "{:?}",
        layout.scratch.mounts_below()
    );

    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!layout.data().join("pvc-flow").exists());
    server.stop().await;
}

#[tokio::test]
async fn static_whole_volume_is_shared_by_many_workloads() {
    let (layout, server, mut c) = start("node-static").await;
    std::fs::write(layout.data().join("platform.cfg"), b"shared").unwrap();
    let id = format!("{NAMESPACE}/{CLUSTER}/data");
    let staging = layout.scratch.join("staging-static");
    let a = layout.scratch.join("pod-a");
    let b = layout.scratch.join("pod-b");
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &a, false))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &b, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(a.join("platform.cfg")).unwrap(), b"shared");
    std::fs::write(b.join("from-b"), b"1").unwrap();
    assert!(a.join("from-b").exists() && layout.data().join("from-b").exists());
    let stats = c
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: a.display().to_string(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let fs = mortar_csi::ops::statvfs(&layout.data()).unwrap();
    assert_eq!(
        usage(&stats, volume_usage::Unit::Bytes).total as u64,
        fs.total_bytes,
        "whole volume: the file system's size"
    );
    for t in [&a, &b] {
        c.node
            .node_unpublish_volume(unpublish_req(&id, &t))
            .await
            .unwrap();
    }
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(layout.scratch.mounts_below().is_empty());
    server.stop().await;
}

#[tokio::test]
async fn every_node_call_validates_its_request() {
    let (layout, server, mut c) = start("node-negative").await;
    let vol = c
        .controller
        .create_volume(create_req("pvc-neg", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let id = vol.volume_id.clone();
    let staging = layout.scratch.join("staging");
    let target = layout.scratch.join("target");
    let n = &mut c.node;

    // NodeStageVolume
    assert_code(
        n.node_stage_volume(stage_req("", &staging)).await,
        Code::InvalidArgument,
        "stage without id",
    );
    let mut r = stage_req(&id, &staging);
    r.staging_target_path.clear();
    assert_code(
        n.node_stage_volume(r).await,
        Code::InvalidArgument,
        "stage without path",
    );
    let mut r = stage_req(&id, &staging);
    r.volume_capability = None;
    assert_code(
        n.node_stage_volume(r).await,
        Code::InvalidArgument,
        "stage without capability",
    );
    let mut r = stage_req(&id, &staging);
    r.volume_capability = Some(block_cap());
    assert_code(
        n.node_stage_volume(r).await,
        Code::FailedPrecondition,
        "stage block (exceeds capabilities)",
    );
    assert_code(
        n.node_stage_volume(stage_req("garbage", &staging)).await,
        Code::NotFound,
        "stage garbage id",
    );
    assert_code(
        n.node_stage_volume(stage_req(
            &format!("{NAMESPACE}/{CLUSTER}/data/pvc-gone"),
            &staging,
        ))
        .await,
        Code::NotFound,
        "stage deleted volume",
    );
    assert!(!is_mount_point(&staging));

    // NodePublishVolume
    assert_code(
        n.node_publish_volume(publish_req("", &staging, &target, false))
            .await,
        Code::InvalidArgument,
        "publish without id",
    );
    let mut r = publish_req(&id, &staging, &target, false);
    r.target_path.clear();
    assert_code(
        n.node_publish_volume(r).await,
        Code::InvalidArgument,
        "publish without target",
    );
    let mut r = publish_req(&id, &staging, &target, false);
    r.staging_target_path.clear();
    assert_code(
        n.node_publish_volume(r).await,
        Code::FailedPrecondition,
        "publish without staging path (staging target path not set)",
    );
    let mut r = publish_req(&id, &staging, &target, false);
    r.volume_capability = None;
    assert_code(
        n.node_publish_volume(r).await,
        Code::InvalidArgument,
        "publish without capability",
    );
    assert_code(
        n.node_publish_volume(publish_req("garbage", &staging, &target, false))
            .await,
        Code::NotFound,
        "publish garbage id",
    );
    std::fs::create_dir_all(&staging).unwrap();
    assert_code(
        n.node_publish_volume(publish_req(&id, &staging, &target, false))
            .await,
        Code::FailedPrecondition,
        "publish unstaged",
    );
    assert!(!is_mount_point(&target));

    // NodeUnpublishVolume / NodeUnstageVolume
    assert_code(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: String::new(),
            target_path: target.display().to_string(),
        })
        .await,
        Code::InvalidArgument,
        "unpublish without id",
    );
    assert_code(
        n.node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "unpublish without target",
    );
    n.node_unpublish_volume(NodeUnpublishVolumeRequest {
        volume_id: id.clone(),
        target_path: layout.scratch.join("never/was").display().to_string(),
    })
    .await
    .expect("unpublishing a missing target succeeds");
    assert_code(
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: String::new(),
            staging_target_path: "/x".into(),
        })
        .await,
        Code::InvalidArgument,
        "unstage without id",
    );
    assert_code(
        n.node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: String::new(),
        })
        .await,
        Code::InvalidArgument,
        "unstage without path",
    );

    // NodeGetVolumeStats / NodeExpandVolume
    let stats = |id: &str, p: &str| NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: p.into(),
        ..Default::default()
    };
    assert_code(
        n.node_get_volume_stats(stats("", "/tmp")).await,
        Code::InvalidArgument,
        "stats without id",
    );
    assert_code(
        n.node_get_volume_stats(stats(&id, "")).await,
        Code::InvalidArgument,
        "stats without path",
    );
    let missing = layout.scratch.join("no/such/path").display().to_string();
    assert_code(
        n.node_get_volume_stats(stats(&id, &missing)).await,
        Code::NotFound,
        "stats of missing path",
    );
    assert_code(
        n.node_get_volume_stats(stats(&id, &staging.display().to_string()))
            .await,
        Code::NotFound,
        "stats of unmounted path",
    );
    let expand = |id: &str, p: &str| NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: p.into(),
        ..Default::default()
    };
    assert_code(
        n.node_expand_volume(expand("", "/tmp")).await,
        Code::InvalidArgument,
        "expand without id",
    );
    assert_code(
        n.node_expand_volume(expand(&id, "")).await,
        Code::InvalidArgument,
        "expand without path",
    );
    assert_code(
        n.node_expand_volume(expand(&id, &missing)).await,
        Code::NotFound,
        "expand missing path",
    );
    server.stop().await;
    drop(layout);
}

#[tokio::test]
async fn a_failing_mount_helper_is_reported_not_hidden() {
    let layout = Layout::new("node-mountfail");
    let script = layout.scratch.join("failing-mount");
    std::fs::write(
        &script,
        "#!/bin/sh\necho 'cannot reach volfile server' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (server, mut c) =
        InProcess::start(&layout, Mode::All, Some(layout.node_config(script))).await;
    let vol = c
        .controller
        .create_volume(create_req("pvc-mf", MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let staging = layout.scratch.join("staging");
    let err = c
        .node
        .node_stage_volume(stage_req(&vol.volume_id, &staging))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("cannot reach volfile server"),
        "{}",
        err.message()
    );
    assert!(!is_mount_point(&staging));

    // A helper that is not there at all: a missing dependency, FAILED_PRECONDITION.
    let (server2_layout, missing) = (
        Layout::new("node-nohelper"),
        std::path::PathBuf::from("/nonexistent/mortar-mount"),
    );
    let (server2, mut c2) = InProcess::start(
        &server2_layout,
        Mode::Node,
        Some(server2_layout.node_config(missing)),
    )
    .await;
    assert_code(
        c2.identity.probe(ProbeRequest {}).await,
        Code::FailedPrecondition,
        "probe without a mount helper",
    );
    server2.stop().await;
    server.stop().await;
    let _ = ErrorKind::NotFound;
}
