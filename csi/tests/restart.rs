//! The node plugin as a real process: its mounts outlive it, a new process takes them
//! over from the mount table, and mounts whose FUSE daemon died are repaired.
//!
//! The FUSE daemon stand-in is bindfs (Debian `bindfs`): like `mortar-mount` it
//! daemonises and serves a FUSE mount from a process of its own, and killing it leaves
//! "transport endpoint is not connected" behind. Without bindfs the restart test runs
//! with plain bind mounts and the repair test is skipped (it needs a FUSE daemon to kill).

mod common;

use std::time::Duration;

use common::*;
use mortar_csi::csi::*;
use mortar_csi::mounts;

fn stats_req(id: &str, path: &std::path::Path) -> NodeGetVolumeStatsRequest {
    NodeGetVolumeStatsRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        ..Default::default()
    }
}

fn kill_fuse_daemon(layout: &Layout) {
    let shared = layout.shared_mount().display().to_string();
    let pids = pids_mentioning(&shared);
    let pids: Vec<i32> = pids
        .into_iter()
        .filter(|p| *p != std::process::id() as i32)
        .collect();
    assert_eq!(
        pids.len(),
        1,
        "exactly one FUSE daemon serves {shared}: {pids:?}"
    );
    // SAFETY: plain kill(2) of the daemon this test's mount helper started.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    for _ in 0..100 {
        if pids_mentioning(&shared)
            .iter()
            .all(|p| *p == std::process::id() as i32)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("FUSE daemon did not die");
}

#[tokio::test]
async fn published_mounts_survive_a_plugin_restart() {
    let fuse = have("bindfs");
    if !fuse {
        eprintln!("bindfs not installed: restart test uses plain bind mounts for the shared mount");
    }
    let layout = Layout::new("restart");
    let cmd = layout.write_mount_command(fuse);
    let secret = "s3cr3t-value-never-logged";

    let mut p1 = Plugin::spawn(&layout, &cmd, 1);
    let mut c = Clients::connect(&layout.socket).await;
    let mut req = create_req("pvc-survivor", 10 * MIB);
    req.secrets.insert("password".into(), secret.into());
    let id = c
        .controller
        .create_volume(req)
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = layout.scratch.join("staging/globalmount");
    let target = layout.scratch.join("pods/p1/mount");
    let mut stage = stage_req(&id, &staging);
    stage.secrets.insert("password".into(), secret.into());
    c.node.node_stage_volume(stage).await.unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &target, false))
        .await
        .unwrap();
    std::fs::write(target.join("before"), b"written while plugin 1 ran").unwrap();
    if fuse {
        let shared = mounts::find_now(&layout.shared_mount()).unwrap().unwrap();
        assert!(shared.fstype.starts_with("fuse"), "{shared:?}");
    }

    // SIGKILL the plugin: the pod's mount keeps working without it.
    p1.kill();
    drop(c);
    assert!(
        !p1.stderr().contains(secret),
        "secrets never reach the logs"
    );
    assert_eq!(
        std::fs::read(target.join("before")).unwrap(),
        b"written while plugin 1 ran"
    );
    std::fs::write(target.join("during"), b"written with no plugin running").unwrap();
    assert!(layout.data().join("pvc-survivor").join("during").exists());

    // A new process on the same socket takes over from the mount table.
    let p2 = Plugin::spawn(&layout, &cmd, 2);
    let mut c = Clients::connect(&layout.socket).await;
    assert_eq!(
        c.identity
            .probe(ProbeRequest {})
            .await
            .unwrap()
            .into_inner()
            .ready,
        Some(true)
    );
    let stats = c
        .node
        .node_get_volume_stats(stats_req(&id, &target))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    // kubelet re-sends stage and publish after a plugin restart: both are no-ops now.
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &target, false))
        .await
        .unwrap();
    assert_eq!(
        layout.mount_calls().len(),
        1,
        "the running mount was reused, not remounted"
    );
    assert_eq!(
        mounts::read_mountinfo()
            .unwrap()
            .iter()
            .filter(|m| m.mount_point == target)
            .count(),
        1
    );
    assert_eq!(
        std::fs::read(target.join("during")).unwrap(),
        b"written with no plugin running"
    );

    // And it can tear down what the first process built, releasing the shared mount.
    c.node
        .node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(
        layout.scratch.mounts_below().is_empty(),
        "{:?}",
        layout.scratch.mounts_below()
    );
    if fuse {
        // Unmounting ends the FUSE daemon: nothing leaks across restarts.
        for _ in 0..100 {
            if pids_mentioning(&layout.shared_mount().display().to_string()).is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(pids_mentioning(&layout.shared_mount().display().to_string()).is_empty());
    }
    assert!(!p2.stderr().contains(secret));
    assert!(
        p2.stderr().contains("NodeStageVolume"),
        "structured call logs on stderr"
    );
    drop(p2);
}

#[tokio::test]
async fn a_dead_fuse_daemon_is_repaired_not_reported_as_success() {
    if !have("bindfs") {
        eprintln!("SKIPPED: bindfs not installed (apt-get install bindfs), no FUSE daemon to kill");
        return;
    }
    let layout = Layout::new("repair");
    let cmd = layout.write_mount_command(true);
    let _plugin = Plugin::spawn(&layout, &cmd, 1);
    let mut c = Clients::connect(&layout.socket).await;
    let id = c
        .controller
        .create_volume(create_req("pvc-repair", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = layout.scratch.join("staging/globalmount");
    let pod1 = layout.scratch.join("pods/p1/mount");
    let pod2 = layout.scratch.join("pods/p2/mount");
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    c.node
        .node_publish_volume(publish_req(&id, &staging, &pod1, false))
        .await
        .unwrap();
    std::fs::write(pod1.join("kept"), b"on the volume").unwrap();

    kill_fuse_daemon(&layout);
    let err = std::fs::metadata(&pod1).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");

    // Stats report the broken mount as an abnormal volume condition.
    let stats = c
        .node
        .node_get_volume_stats(stats_req(&id, &pod1))
        .await
        .unwrap()
        .into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("not connected"), "{}", cond.message);

    // Publishing a new pod repairs the staging mount (and the shared mount under it).
    c.node
        .node_publish_volume(publish_req(&id, &staging, &pod2, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(pod2.join("kept")).unwrap(), b"on the volume");
    assert_eq!(
        layout.mount_calls().len(),
        2,
        "the shared mount was made again"
    );
    std::fs::metadata(&staging).expect("staging mount repaired");

    // The old pod's mount is repaired by a repeated publish, not declared fine as is.
    c.node
        .node_publish_volume(publish_req(&id, &staging, &pod1, false))
        .await
        .unwrap();
    assert_eq!(std::fs::read(pod1.join("kept")).unwrap(), b"on the volume");
    let stats = c
        .node
        .node_get_volume_stats(stats_req(&id, &pod1))
        .await
        .unwrap()
        .into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Kill again: a repeated NodeStageVolume repairs too.
    kill_fuse_daemon(&layout);
    assert_eq!(
        std::fs::metadata(&staging).unwrap_err().raw_os_error(),
        Some(libc::ENOTCONN)
    );
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(staging.join("kept")).unwrap(),
        b"on the volume"
    );
    assert_eq!(layout.mount_calls().len(), 3);

    for pod in [&pod1, &pod2] {
        c.node
            .node_unpublish_volume(unpublish_req(&id, &pod))
            .await
            .unwrap();
    }
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(
        layout.scratch.mounts_below().is_empty(),
        "{:?}",
        layout.scratch.mounts_below()
    );
}
