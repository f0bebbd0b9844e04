//! Mounts made through the mounter survive the node plugin: real `mortar-csi` processes
//! (a mounter and a node+controller plugin), real `mortar-mount` FUSE mounts of a real
//! 3-brick cluster on 127.62.0.x, the plugin SIGKILLed in the middle.
//!
//! Needs the brick and mount binaries next to the test's target dir:
//! `CARGO_TARGET_DIR=/work/target-csi cargo build --bins -p mortar-brick -p mortar-client`.

mod common;

use std::time::Duration;

use common::real::*;
use common::*;
use mortar_csi::csi::*;
use mortar_e2e::Cluster;

const NET: u8 = 62;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounts_made_by_the_mounter_survive_a_plugin_kill() {
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(NET, 3))
        .await
        .unwrap();
    let layout = Layout::new("mounter");
    let mut node = RealNode::spawn(&layout, &cluster);
    let mut c = Clients::connect(&layout.socket).await;
    // Ready only once the mounter answers.
    node.wait_ready(&mut c).await;

    let id = c
        .controller
        .create_volume(create_req("pvc-survive", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = layout.scratch.join("kubelet/plugins/pv/globalmount");
    let target = layout.scratch.join("kubelet/pods/p1/volumes/mount");
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap_or_else(|e| panic!("stage: {e}\n{}", node.logs()));
    c.node
        .node_publish_volume(publish_req(&id, &staging, &target, false))
        .await
        .unwrap();
    assert!(is_mount_point(&layout.shared_mount()));
    assert!(is_mount_point(&target));

    // The FUSE daemon is not the plugin's: it serves the shared mount, and it is neither
    // the plugin nor one of its children.
    let daemons = mount_daemons(&layout.shared_mount());
    assert_eq!(daemons.len(), 1, "one mortar-mount daemon: {daemons:?}");
    let ppid = std::fs::read_to_string(format!("/proc/{}/stat", daemons[0]))
        .unwrap()
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u32>()
        .unwrap();
    assert_ne!(
        ppid,
        node.plugin.child.id(),
        "the daemon is not the plugin's child"
    );
    // The mounter made it, not the plugin.
    assert!(
        node.plugin.stderr().contains("asking the mounter"),
        "{}",
        node.plugin.stderr()
    );
    assert!(
        node.mounter.stderr().contains("mounted"),
        "{}",
        node.mounter.stderr()
    );

    // Real data through the pod's mount, landing on the bricks; df shows the PVC's size.
    std::fs::write(target.join("before"), b"written before the kill").unwrap();
    for i in 0..3 {
        assert_eq!(
            std::fs::read(cluster.brick_dir(i).join("pvc-survive/before")).unwrap(),
            b"written before the kill"
        );
    }
    assert_eq!(statvfs_total(&target), 10 << 20);

    // SIGKILL the plugin: the pod's mount keeps reading and writing.
    node.plugin.kill();
    assert_eq!(
        std::fs::read(target.join("before")).unwrap(),
        b"written before the kill"
    );
    let data = mortar_e2e::pattern(3, 300_000);
    std::fs::write(target.join("after"), &data).unwrap();
    assert_eq!(std::fs::read(target.join("after")).unwrap(), data);
    assert_eq!(
        std::fs::read(cluster.brick_dir(1).join("pvc-survive/after")).unwrap(),
        data
    );
    // The quota still holds. (Written from touched memory: from never-touched zero pages
    // the kernel sends FUSE one 4 KiB write at a time, seconds for 11 MiB.)
    let too_big = mortar_e2e::pattern(4, 11 << 20);
    let err = std::fs::write(target.join("too-big"), &too_big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    let _ = std::fs::remove_file(target.join("too-big"));

    // A new plugin process takes over: repeated stage/publish are no-ops, then a clean
    // unpublish and unstage release the shared mount.
    node.respawn_plugin(&layout, &cluster, 2);
    let mut c = Clients::connect(&layout.socket).await;
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &target, false))
        .await
        .unwrap();
    assert_eq!(
        mount_daemons(&layout.shared_mount()),
        daemons,
        "the same daemon still serves the mount"
    );
    c.node
        .node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(!is_mount_point(&target));
    assert!(!is_mount_point(&staging));
    assert!(!is_mount_point(&layout.shared_mount()));
    // Idempotent.
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    // The data stays on the volume.
    assert_eq!(
        std::fs::read(cluster.brick_dir(2).join("pvc-survive/after")).unwrap(),
        data
    );
    c.controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!cluster.brick_dir(0).join("pvc-survive").exists());
    node.mounter.kill();
}

#[tokio::test]
async fn mounter_refuses_mount_points_outside_its_state_dir() {
    let layout = Layout::new("mounter-refuse");
    let sock = layout.scratch.join("mounter.sock");
    let _mounter = Plugin::spawn_args(
        &layout,
        "mounter",
        &[
            "--mode".into(),
            "mounter".into(),
            "--endpoint".into(),
            format!("unix://{}", sock.display()),
            "--state-dir".into(),
            layout.state.display().to_string(),
            // Any executable: it must never run.
            "--mount-command".into(),
            "/bin/false".into(),
        ],
    );
    for _ in 0..100 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let req = |target: String| mortar_csi::mounter::MountRequest {
        source: "h:/data".into(),
        target,
        options: vec![],
        log_name: "x".into(),
    };
    for bad in [
        "/etc".to_string(),
        layout.state.join("volumes/../x").display().to_string(),
    ] {
        let err =
            mortar_csi::mounter::request_mount(&sock, &req(bad.clone()), Duration::from_secs(5))
                .await
                .expect_err("refused");
        assert!(err.contains("not a directory of"), "{bad}: {err}");
    }
    // Inside the state dir it runs the helper, whose failure is reported.
    let ok_path = layout.state.join("volumes/k").display().to_string();
    let err = mortar_csi::mounter::request_mount(&sock, &req(ok_path), Duration::from_secs(5))
        .await
        .expect_err("helper fails");
    assert!(err.contains("mount helper failed"), "{err}");
}
