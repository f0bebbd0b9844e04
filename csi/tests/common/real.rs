//! The deployed shape for real: a `mortar-csi --mode mounter` process that runs the real
//! `mortar-mount`, and a controller+node plugin process (`--mode all`, Mortar backend)
//! that asks it for the shared mounts, both against a real `mortar_e2e::Cluster`.
//!
//! Needs the brick and mount binaries next to the test's target dir:
//! `CARGO_TARGET_DIR=/work/target-csi cargo build --bins -p mortar-brick -p mortar-client`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mortar_csi::csi::ProbeRequest;
use mortar_e2e::Cluster;

use super::{Clients, Layout, Plugin, pids_mentioning};

/// How long a test waits for something that happens asynchronously (a lagging brick, a
/// FUSE daemon exiting) before failing; generous, since CI runs several clusters on two
/// cores.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A node as deployed: the mounter and the plugin, each a real `mortar-csi` process.
pub struct RealNode {
    pub mounter: Plugin,
    pub mounter_socket: PathBuf,
    pub plugin: Plugin,
    /// The mount helper's log (`STATE_DIR/logs/`), for failure messages.
    logs_dir: PathBuf,
}

impl RealNode {
    /// Starts the mounter and plugin generation 1; does not wait for them.
    pub fn spawn(layout: &Layout, cluster: &Cluster) -> RealNode {
        let mounter_socket = layout.scratch.join("run/mounter.sock");
        let mounter = spawn_mounter(layout, &mounter_socket, 1);
        let plugin = spawn_plugin(layout, cluster, &mounter_socket, 1);
        RealNode {
            mounter,
            mounter_socket,
            plugin,
            logs_dir: layout.state.join("logs"),
        }
    }

    /// Replaces the plugin process (the old one, if still running, is killed).
    pub fn respawn_plugin(&mut self, layout: &Layout, cluster: &Cluster, generation: u32) {
        self.plugin.kill();
        self.plugin = spawn_plugin(layout, cluster, &self.mounter_socket, generation);
    }

    /// Waits until the plugin's Probe says ready (it is only once the mounter answers).
    pub async fn wait_ready(&self, c: &mut Clients) {
        let t = Instant::now();
        loop {
            let answer = c.identity.probe(ProbeRequest {}).await;
            if matches!(&answer, Ok(r) if r.get_ref().ready == Some(true)) {
                return;
            }
            assert!(
                t.elapsed() < PATIENCE,
                "plugin not ready after {PATIENCE:?}: {answer:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last lines of the plugin's, the mounter's and the mount helpers' logs.
    pub fn logs(&self) -> String {
        let mut out = format!(
            "--- plugin log (tail):\n{}\n--- mounter log (tail):\n{}",
            tail(&self.plugin.stderr(), 40),
            tail(&self.mounter.stderr(), 40)
        );
        if let Ok(dir) = std::fs::read_dir(&self.logs_dir) {
            for e in dir.flatten() {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                out += &format!("\n--- {} (tail):\n{}", e.path().display(), tail(&text, 20));
            }
        }
        out
    }

    /// The reply of a successful call; otherwise panics with the status and the logs.
    #[track_caller]
    pub fn ok<T>(&self, r: Result<tonic::Response<T>, tonic::Status>, what: &str) -> T {
        match r {
            Ok(r) => r.into_inner(),
            Err(s) => panic!(
                "{what} failed: {:?}: {}\n{}",
                s.code(),
                s.message(),
                self.logs()
            ),
        }
    }
}

/// Mounter generation `generation` on `socket`, with the real `mortar-mount`; it creates
/// `mounter_ready(layout, generation)` once it serves.
pub fn spawn_mounter(layout: &Layout, socket: &Path, generation: u32) -> Plugin {
    Plugin::spawn_args(
        layout,
        &format!("mounter-{generation}"),
        &[
            "--mode".into(),
            "mounter".into(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--state-dir".into(),
            layout.state.display().to_string(),
            "--mount-command".into(),
            mortar_e2e::bin("mortar-mount").display().to_string(),
            "--ready-file".into(),
            mounter_ready(layout, generation).display().to_string(),
        ],
    )
}

/// The readiness file of mounter generation `generation`.
pub fn mounter_ready(layout: &Layout, generation: u32) -> PathBuf {
    layout.scratch.join(format!("mounter-{generation}.ready"))
}

/// The controller+node plugin on the Mortar backend, shared mounts made by the mounter.
pub fn spawn_plugin(
    layout: &Layout,
    cluster: &Cluster,
    mounter_socket: &Path,
    generation: u32,
) -> Plugin {
    let args = vec![
        "--mode".into(),
        "all".into(),
        "--node-id".into(),
        "node-a".into(),
        "--endpoint".into(),
        format!("unix://{}", layout.socket.display()),
        "--backend".into(),
        "mortar".into(),
        // The StorageClass's cluster resolves to the first brick, as the client Service
        // would in Kubernetes.
        "--volfile-server-template".into(),
        cluster.addr(0),
        "--state-dir".into(),
        layout.state.display().to_string(),
        "--mounter".into(),
        format!("unix://{}", mounter_socket.display()),
        "--mount-timeout".into(),
        "30".into(),
    ];
    Plugin::spawn_args(layout, &format!("plugin-{generation}"), &args)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Total bytes `statvfs` (what `df` uses) reports at `path`.
#[track_caller]
pub fn statvfs_total(path: &Path) -> u64 {
    mortar_csi::ops::statvfs(path)
        .unwrap_or_else(|e| panic!("statvfs {}: {e}", path.display()))
        .total_bytes
}

/// The `mortar-mount` daemons serving the mount at `mount_point` (processes whose command
/// line names it; not this test process).
pub fn mount_daemons(mount_point: &Path) -> Vec<i32> {
    // A mount's holder, not its server (`mortar-mount --handover DIR`, the holder's child,
    // replaced whenever it dies).
    let server = |p: &i32| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == b"--handover"))
    };
    pids_mentioning(&mount_point.display().to_string())
        .into_iter()
        .filter(|p| *p != std::process::id() as i32 && !server(p))
        .collect()
}

/// Polls `check` until it returns `Ok`, for up to `PATIENCE`; panics with its last
/// complaint after that.
pub async fn eventually(what: &str, mut check: impl FnMut() -> Result<(), String>) {
    let t = Instant::now();
    loop {
        match check() {
            Ok(()) => return,
            Err(why) if t.elapsed() > PATIENCE => {
                panic!("{what}: still not so after {PATIENCE:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
