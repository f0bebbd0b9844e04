//! The CSI acceptance story for real: the sidecars' and kubelet's calls, in their order,
//! over the unix socket of real `mortar-csi` processes in the deployed shape (a mounter
//! running the real `mortar-mount`, a controller+node plugin on the Mortar backend), real
//! FUSE mounts of a real 3-brick cluster on 127.63.0.x.
//!
//! `node.rs` tells the same story with a stand-in mount helper; this one checks what only
//! real bricks show: data on every brick, the quota enforced, `df` per PVC, expansion
//! seen by mounted pods, the shared FUSE daemon gone after the last unstage.
//!
//! Needs the brick and mount binaries next to the test's target dir:
//! `CARGO_TARGET_DIR=/work/target-csi cargo build --bins -p mortar-brick -p mortar-client`.

mod common;

use std::path::Path;

use common::real::*;
use common::*;
use mortar_csi::csi::*;
use mortar_e2e::{Cluster, pattern};

const NET: u8 = 63;

/// The PVC directory's apparent size on brick `i` (sum of file sizes, as quotas count).
fn brick_usage(cluster: &Cluster, i: usize, dir: &str) -> u64 {
    mortar_csi::ops::tree_usage(&cluster.brick_dir(i).join(dir))
        .unwrap_or_else(|e| panic!("usage of {dir} on brick b{i}: {e}"))
        .bytes
}

/// Waits until every brick holds `rel` (relative to the brick root) with `content`.
async fn on_every_brick(cluster: &Cluster, rel: &str, content: &[u8]) {
    for i in 0..3 {
        let path = cluster.brick_dir(i).join(rel);
        eventually(&format!("{rel} on brick b{i}"), || {
            match std::fs::read(&path) {
                Ok(got) if got == content => Ok(()),
                Ok(got) => Err(format!(
                    "{} bytes, not the {} written",
                    got.len(),
                    content.len()
                )),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }
}

fn stats_req(id: &str, path: &Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        ..Default::default()
    }
}

fn expand_req(id: &str, bytes: i64) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

/// Byte usage from NodeGetVolumeStats, checked for consistency and a normal condition.
async fn byte_stats(c: &mut Clients, node: &RealNode, id: &str, path: &Path) -> VolumeUsage {
    let stats = node.ok(
        c.node.node_get_volume_stats(stats_req(id, path)).await,
        "NodeGetVolumeStats",
    );
    let condition = stats.volume_condition.clone().expect("volume condition");
    assert!(!condition.abnormal, "condition: {condition:?}");
    let bytes = usage(&stats, volume_usage::Unit::Bytes);
    assert_eq!(
        bytes.available,
        bytes.total - bytes.used,
        "available = total - used: {bytes:?}"
    );
    let inodes = usage(&stats, volume_usage::Unit::Inodes);
    assert!(inodes.total > 0, "inodes: {inodes:?}");
    bytes
}

/// Waits until NodeGetVolumeStats on `path` shows `total` bytes and `used` bytes rounded
/// up to the 4 KiB blocks that statfs counts in.
async fn stats_settle(
    c: &mut Clients,
    node: &RealNode,
    id: &str,
    path: &Path,
    total: i64,
    used: i64,
) {
    let t = std::time::Instant::now();
    loop {
        let b = byte_stats(c, node, id, path).await;
        if b.total == total && (used..used + 4096).contains(&b.used) {
            return;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "stats of {}: want total {total}, used {used} (to 4 KiB), got {b:?}",
            path.display()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubelet_order_on_a_real_cluster() {
    let started = std::time::Instant::now();
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(NET, 3))
        .await
        .unwrap();
    let layout = Layout::new("kubelet-real");
    let node = RealNode::spawn(&layout, &cluster);
    let mut c = Clients::connect(&layout.socket).await;
    node.wait_ready(&mut c).await;

    // CreateVolume (external-provisioner), twice: the same volume.
    let vol = node
        .ok(
            c.controller
                .create_volume(create_req("pvc-kubelet", 10 * MIB))
                .await,
            "CreateVolume",
        )
        .volume
        .expect("a volume");
    assert_eq!(vol.capacity_bytes, 10 * MIB);
    let again = node
        .ok(
            c.controller
                .create_volume(create_req("pvc-kubelet", 10 * MIB))
                .await,
            "CreateVolume again",
        )
        .volume
        .expect("a volume");
    assert_eq!(again.volume_id, vol.volume_id, "CreateVolume is idempotent");
    let id = vol.volume_id.clone();
    let dir = id.rsplit('/').next().unwrap().to_string();
    assert_eq!(
        id,
        format!("{NAMESPACE}/{CLUSTER}/data/{dir}"),
        "volume id names the PVC directory"
    );
    for i in 0..3 {
        let d = cluster.brick_dir(i).join(&dir);
        eventually(&format!("{dir} on brick b{i}"), || {
            d.is_dir().then_some(()).ok_or("missing".into())
        })
        .await;
    }

    // Paths as kubelet makes them.
    let kubelet = layout.scratch.join("kubelet");
    let staging = kubelet.join(format!(
        "plugins/kubernetes.io/csi/mortar.csi.mortar.dev/{dir}/globalmount"
    ));
    std::fs::create_dir_all(&staging).unwrap();
    let pod = |n: u32| {
        let p = kubelet.join(format!("pods/pod{n}/volumes/kubernetes.io~csi/{dir}/mount"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    };
    let (pod1, pod2, pod3) = (pod(1), pod(2), pod(3));
    let shared = layout.shared_mount();

    // NodeStage, twice: one shared FUSE mount, one staging bind mount, one daemon.
    node.ok(
        c.node.node_stage_volume(stage_req(&id, &staging)).await,
        "NodeStage",
    );
    assert!(is_mount_point(&shared), "shared mount {}", shared.display());
    assert!(is_mount_point(&staging), "staging {}", staging.display());
    let daemons = mount_daemons(&shared);
    assert_eq!(daemons.len(), 1, "one mortar-mount daemon: {daemons:?}");
    node.ok(
        c.node.node_stage_volume(stage_req(&id, &staging)).await,
        "NodeStage again",
    );
    assert_eq!(mount_count(&shared), 1, "no second shared mount");
    assert_eq!(mount_count(&staging), 1, "no stacked staging mounts");
    assert_eq!(mount_daemons(&shared), daemons, "the same daemon serves it");

    // NodePublish to two pods, each twice.
    for (p, what) in [(&pod1, "pod1"), (&pod2, "pod2")] {
        for attempt in ["", " again"] {
            node.ok(
                c.node
                    .node_publish_volume(publish_req(&id, &staging, p, false))
                    .await,
                &format!("NodePublish {what}{attempt}"),
            );
        }
        assert_eq!(mount_count(p), 1, "{what}: exactly one mount");
    }

    // What pod1 writes pod2 reads, and it lands in the PVC's directory on every brick.
    let hello = pattern(1, 300_000);
    std::fs::write(pod1.join("hello"), &hello).expect("write through pod1");
    assert_eq!(
        std::fs::read(pod2.join("hello")).expect("read through pod2"),
        hello,
        "pod2 reads what pod1 wrote"
    );
    assert!(
        !pod1.join(&dir).exists(),
        "pods see their PVC's directory, not the volume root"
    );
    on_every_brick(&cluster, &format!("{dir}/hello"), &hello).await;

    // df in the pod shows the PVC's size, not the volume's.
    assert_eq!(statvfs_total(&pod1), 10 << 20, "df in pod1");
    assert_eq!(statvfs_total(&pod2), 10 << 20, "df in pod2");
    assert_ne!(
        statvfs_total(&shared),
        10 << 20,
        "the volume root shows the whole volume"
    );

    // The quota: a write past the limit fails with EDQUOT, and nothing beyond the limit
    // is kept, through the mount or on any brick.
    // Written from touched memory (a pattern, not a fresh `vec![0; n]`): from never-touched
    // zero pages the kernel sends FUSE one 4 KiB write at a time, seconds for 15 MiB.
    let big = pattern(2, 15 << 20);
    let err = std::fs::write(pod1.join("big"), &big).expect_err("15 MiB into a 10 MiB PVC");
    assert!(
        matches!(err.raw_os_error(), Some(libc::EDQUOT | libc::ENOSPC)),
        "write past the limit: {err}"
    );
    let kept = std::fs::read(pod1.join("big")).expect("the partial file");
    assert!(
        kept.len() as u64 <= (10 << 20) - 300_000,
        "{} bytes kept past the limit",
        kept.len()
    );
    assert!(
        kept == big[..kept.len()],
        "what was kept is what was written"
    );
    for i in 0..3 {
        let used = brick_usage(&cluster, i, &dir);
        assert!(used <= 10 << 20, "brick b{i} holds {used} bytes of the PVC");
    }
    let b = byte_stats(&mut c, &node, &id, &pod1).await;
    assert!(
        b.used <= 10 * MIB && b.total == 10 * MIB,
        "stats when full: {b:?}"
    );
    std::fs::remove_file(pod1.join("big")).expect("remove the partial file");

    // NodeGetVolumeStats: the PVC's size and usage.
    stats_settle(&mut c, &node, &id, &pod1, 10 * MIB, 300_000).await;
    stats_settle(&mut c, &node, &id, &pod2, 10 * MIB, 300_000).await;

    // Expand to 20 MiB (external-resizer, then kubelet), each twice; mounted pods see it
    // at once and the write that failed now fits.
    for attempt in ["", " again"] {
        let r = node.ok(
            c.controller
                .controller_expand_volume(expand_req(&id, 20 * MIB))
                .await,
            &format!("ControllerExpandVolume{attempt}"),
        );
        assert_eq!(r.capacity_bytes, 20 * MIB);
    }
    for attempt in ["", " again"] {
        let r = node.ok(
            c.node
                .node_expand_volume(NodeExpandVolumeRequest {
                    volume_id: id.clone(),
                    volume_path: pod1.display().to_string(),
                    capacity_range: Some(CapacityRange {
                        required_bytes: 20 * MIB,
                        limit_bytes: 0,
                    }),
                    ..Default::default()
                })
                .await,
            &format!("NodeExpandVolume{attempt}"),
        );
        assert_eq!(r.capacity_bytes, 20 * MIB);
    }
    eventually("df in pod1 shows 20 MiB", || match statvfs_total(&pod1) {
        t if t == 20 << 20 => Ok(()),
        t => Err(format!("{t} bytes")),
    })
    .await;
    assert_eq!(statvfs_total(&pod2), 20 << 20, "df in pod2");
    std::fs::write(pod1.join("big"), &big).expect("15 MiB fit in the expanded PVC");
    assert!(
        std::fs::read(pod2.join("big")).expect("read big through pod2") == big,
        "pod2 reads the 15 MiB pod1 wrote"
    );
    stats_settle(&mut c, &node, &id, &pod1, 20 * MIB, 300_000 + (15 << 20)).await;
    on_every_brick(&cluster, &format!("{dir}/big"), &big).await;

    // A read-only publish (pod3), twice: reads work, writes fail with EROFS.
    for attempt in ["", " again"] {
        node.ok(
            c.node
                .node_publish_volume(publish_req(&id, &staging, &pod3, true))
                .await,
            &format!("NodePublish pod3 read-only{attempt}"),
        );
    }
    assert_eq!(mount_count(&pod3), 1, "pod3: exactly one mount");
    assert_eq!(
        std::fs::read(pod3.join("hello")).expect("read through pod3"),
        hello
    );
    let err = std::fs::write(pod3.join("nope"), b"x").expect_err("create in a ro pod");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "create: {err}");
    let err = std::fs::OpenOptions::new()
        .append(true)
        .open(pod3.join("hello"))
        .expect_err("open for writing in a ro pod");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "append: {err}");
    let err = std::fs::remove_file(pod3.join("hello")).expect_err("unlink in a ro pod");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "unlink: {err}");
    assert!(!pod1.join("nope").exists(), "nothing created through pod3");

    // NodeUnpublish every pod, twice each: target gone, no mount left.
    for (p, what) in [(&pod1, "pod1"), (&pod2, "pod2"), (&pod3, "pod3")] {
        let req = unpublish_req(&id, &p);
        for attempt in ["", " again"] {
            node.ok(
                c.node.node_unpublish_volume(req.clone()).await,
                &format!("NodeUnpublish {what}{attempt}"),
            );
            assert!(!is_mount_point(p), "{what} still a mount point");
            assert!(!p.exists(), "{what}: target path not removed");
        }
    }
    assert!(
        is_mount_point(&staging),
        "unpublish leaves the staging mount"
    );

    // NodeUnstage, twice: the staging mount and the shared FUSE mount gone, its daemon
    // exited.
    let unstage = unstage_req(&id, &staging);
    for attempt in ["", " again"] {
        node.ok(
            c.node.node_unstage_volume(unstage.clone()).await,
            &format!("NodeUnstage{attempt}"),
        );
        assert!(!is_mount_point(&staging), "staging still mounted");
        assert!(
            !is_mount_point(&shared),
            "shared mount still there after the last unstage"
        );
    }
    eventually("the shared mount's daemon exits", || {
        let left = mount_daemons(&shared);
        left.is_empty()
            .then_some(())
            .ok_or(format!("still running: {left:?}"))
    })
    .await;
    assert!(
        layout.scratch.mounts_below().is_empty(),
        "mounts left: {:?}",
        layout.scratch.mounts_below()
    );
    // The data stays on the volume.
    on_every_brick(&cluster, &format!("{dir}/hello"), &hello).await;

    // DeleteVolume, twice: the directory goes from every brick.
    for attempt in ["", " again"] {
        node.ok(
            c.controller
                .delete_volume(DeleteVolumeRequest {
                    volume_id: id.clone(),
                    ..Default::default()
                })
                .await,
            &format!("DeleteVolume{attempt}"),
        );
    }
    for i in 0..3 {
        let d = cluster.brick_dir(i).join(&dir);
        eventually(&format!("{dir} removed from brick b{i}"), || {
            (!d.exists()).then_some(()).ok_or("still there".into())
        })
        .await;
    }
    eprintln!("story done in {:?}", started.elapsed());
}
