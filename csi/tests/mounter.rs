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

/// The parent pid of `pid`, from `/proc/PID/stat`.
fn ppid(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()?
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// What the pods' workload saw while the mounter was replaced.
#[derive(Default)]
struct Seen {
    ops: u64,
    errors: Vec<String>,
    longest: Duration,
}

/// A pod's work through two bind mounts of one PVC (`a` and `b`, as two pods have them),
/// until `stop`: a writer and a reader each on one descriptor kept open for the whole run,
/// writes checked by content, and a directory that grows by one file per round, listed
/// through both pods' mounts and checked against the names created.
fn pod_workload(
    a: std::path::PathBuf,
    b: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Seen {
    use std::collections::BTreeSet;
    use std::os::unix::fs::FileExt;
    let mut seen = Seen::default();
    let reference = mortar_e2e::pattern(7, 1 << 20);
    std::fs::write(a.join("read-me"), &reference).unwrap();
    std::fs::create_dir(a.join("dir")).unwrap();
    let writer = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(a.join("written"))
        .unwrap();
    let reader = std::fs::File::open(b.join("read-me")).unwrap();
    let mut names = BTreeSet::new();
    let mut i = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let t = std::time::Instant::now();
        let mut fail = |what: String| seen.errors.push(format!("round {i}: {what}"));
        let block = mortar_e2e::pattern(i, 4096);
        match writer.write_all_at(&block, i * 4096) {
            Ok(()) => {
                let mut back = vec![0u8; 4096];
                match writer.read_exact_at(&mut back, i * 4096) {
                    Ok(()) if back == block => {}
                    Ok(()) => fail("a written block reads back different".into()),
                    Err(e) => fail(format!("reading back: {e}")),
                }
            }
            Err(e) => fail(format!("write: {e}")),
        }
        let at = (i * 4096 * 7) % (1 << 20);
        let mut got = vec![0u8; 4096];
        match reader.read_exact_at(&mut got, at) {
            Ok(()) if got[..] == reference[at as usize..at as usize + 4096] => {}
            Ok(()) => fail(format!("read at {at}: wrong data")),
            Err(e) => fail(format!("read at {at}: {e}")),
        }
        let name = format!("f{i:05}");
        match std::fs::write(a.join("dir").join(&name), name.as_bytes()) {
            Ok(()) => {
                names.insert(name);
            }
            Err(e) => fail(format!("create {name}: {e}")),
        }
        for pod in [&a, &b] {
            match std::fs::read_dir(pod.join("dir")) {
                Ok(list) => {
                    let listed: BTreeSet<String> = list
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect();
                    if listed != names {
                        fail(format!(
                            "{} lists {} names, {} were created",
                            pod.display(),
                            listed.len(),
                            names.len()
                        ));
                    }
                }
                Err(e) => fail(format!("listing {}: {e}", pod.display())),
            }
        }
        seen.longest = seen.longest.max(t.elapsed());
        seen.ops += 1;
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    // Everything written is there, through the other pod's mount.
    let all = std::fs::read(b.join("written")).unwrap();
    for j in 0..i {
        let at = (j * 4096) as usize;
        if all.get(at..at + 4096) != Some(&mortar_e2e::pattern(j, 4096)[..]) {
            seen.errors
                .push(format!("block {j} is not what was written"));
        }
    }
    seen
}

/// The mounter's rolling update (the chart's DaemonSet: maxSurge 1, maxUnavailable 0):
/// the new mounter starts beside the old one, takes every mount over and binds the socket;
/// only then is it ready, and the old one is told to stop. Two pods' bind mounts of a PVC
/// are in use throughout; nothing they do fails, and afterwards the new mounter holds
/// every mount (the holders are its children) and serves the node plugin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_bind_mounts_keep_working_while_the_mounter_is_replaced() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let cluster = tokio::task::spawn_blocking(|| Cluster::start(114, 3))
        .await
        .unwrap();
    let layout = Layout::new("mounter-roll");
    let mut node = RealNode::spawn(&layout, &cluster);
    let mut c = Clients::connect(&layout.socket).await;
    node.wait_ready(&mut c).await;
    assert!(mounter_ready(&layout, 1).exists(), "{}", node.logs());

    let id = node.ok(
        c.controller
            .create_volume(create_req("pvc-roll", 64 * MIB))
            .await,
        "create",
    );
    let id = id.volume.unwrap().volume_id;
    let staging = layout.scratch.join("kubelet/plugins/pv/globalmount");
    let pods = [
        layout.scratch.join("kubelet/pods/p1/volumes/mount"),
        layout.scratch.join("kubelet/pods/p2/volumes/mount"),
    ];
    node.ok(
        c.node.node_stage_volume(stage_req(&id, &staging)).await,
        "stage",
    );
    for t in &pods {
        node.ok(
            c.node
                .node_publish_volume(publish_req(&id, &staging, t, false))
                .await,
            "publish",
        );
    }
    let shared = layout.shared_mount();
    let before = mount_daemons(&shared);
    assert_eq!(before.len(), 1, "one holder: {before:?}");
    assert_eq!(ppid(before[0]), Some(node.mounter.child.id()));

    let stop = Arc::new(AtomicBool::new(false));
    let work = {
        let (a, b, stop) = (pods[0].clone(), pods[1].clone(), stop.clone());
        std::thread::spawn(move || pod_workload(a, b, stop))
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The new pod: a second mounter on the same socket path, beside the first.
    let old = std::mem::replace(
        &mut node.mounter,
        spawn_mounter(&layout, &node.mounter_socket, 2),
    );
    eventually("the new mounter is ready", || {
        if mounter_ready(&layout, 2).exists() {
            Ok(())
        } else {
            Err(node.logs())
        }
    })
    .await;
    let b_pid = node.mounter.child.id();
    assert!(
        node.mounter.stderr().contains("took the mount over"),
        "{}",
        node.logs()
    );

    // A mount the old mounter was still making when the new one scanned (here: one made
    // behind both mounters' backs) is taken over at the new one's next scan.
    let late = layout.state.join("volumes/late");
    std::fs::create_dir_all(&late).unwrap();
    let out = std::process::Command::new(mortar_e2e::bin("mortar-mount"))
        .arg("--tls-dir")
        .arg(mortar_e2e::tls_home().join("client"))
        .arg(cluster.target())
        .arg(&late)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("the new mounter holds the late mount", || {
        let d = mount_daemons(&late);
        match d.as_slice() {
            [one] if ppid(*one) == Some(b_pid) => Ok(()),
            _ => Err(format!("holders {d:?}")),
        }
    })
    .await;

    // The old pod is deleted: SIGTERM, then it waits until its mounts have gone over.
    let mut old = old;
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(old.child.id() as i32, libc::SIGTERM) };
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = old.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < PATIENCE,
            "the old mounter did not stop\n{}",
            old.stderr()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}\n{}", old.stderr());
    assert!(
        old.stderr().contains("holds every mount"),
        "{}",
        old.stderr()
    );
    for mp in [&shared, &late] {
        let d = mount_daemons(mp);
        assert_eq!(d.len(), 1, "{}: {d:?}", mp.display());
        assert_eq!(
            ppid(d[0]),
            Some(b_pid),
            "{} is held by the new mounter",
            mp.display()
        );
    }
    assert!(
        node.mounter_socket.exists(),
        "the old mounter left the new one's socket"
    );

    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = tokio::task::spawn_blocking(move || work.join().unwrap())
        .await
        .unwrap();
    println!(
        "pods' workload: {} rounds, longest {:.3} s, errors {}",
        seen.ops,
        seen.longest.as_secs_f64(),
        seen.errors.len()
    );
    assert!(
        seen.errors.is_empty(),
        "{:?}",
        &seen.errors[..seen.errors.len().min(10)]
    );
    assert!(seen.ops > 50, "the workload ran: {} rounds", seen.ops);

    // The node plugin now reaches the new mounter: a fresh stage mounts through it.
    for t in &pods {
        node.ok(
            c.node.node_unpublish_volume(unpublish_req(&id, t)).await,
            "unpublish",
        );
    }
    node.ok(
        c.node.node_unstage_volume(unstage_req(&id, &staging)).await,
        "unstage",
    );
    assert!(!is_mount_point(&shared));
    node.ok(
        c.node.node_stage_volume(stage_req(&id, &staging)).await,
        "stage again",
    );
    let d = mount_daemons(&shared);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(ppid(d[0]), Some(b_pid), "mounted by the new mounter");
    node.ok(
        c.node.node_unstage_volume(unstage_req(&id, &staging)).await,
        "unstage",
    );
    let _ = mortar_csi::mounts::unmount(&late, true);
    node.mounter.kill();
}
