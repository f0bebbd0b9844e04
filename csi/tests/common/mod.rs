//! Test support: scratch directories that clean up their mounts, gRPC clients over the
//! plugin's unix socket, in-process servers and real plugin processes, and stand-ins for
//! `mortar-mount` until the Mortar FUSE client is wired in.
#![allow(dead_code)]

pub mod real;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mortar_csi::csi::controller_client::ControllerClient;
use mortar_csi::csi::identity_client::IdentityClient;
use mortar_csi::csi::node_client::NodeClient;
use mortar_csi::csi::volume_capability::access_mode::Mode as AccessMode;
use mortar_csi::csi::volume_capability::{AccessMode as AccessModeMsg, AccessType, MountVolume};
use mortar_csi::csi::*;
use mortar_csi::mounts;
use mortar_csi::node::NodeConfig;
use mortar_csi::ops::LocalResolver;
use mortar_csi::server::{self, Mode, Services};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

pub const MIB: i64 = 1 << 20;
pub const NAMESPACE: &str = "storage";
pub const CLUSTER: &str = "shared";

/// A scratch directory under /tmp. Dropping it detaches every mount below it (deepest
/// first) before deleting it, so a failing test leaves no mounts behind.
pub struct Scratch {
    pub path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "mortar-csi-{tag}-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).unwrap();
        Scratch {
            path: path.canonicalize().unwrap(),
        }
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }

    pub fn mounts_below(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = mounts::read_mountinfo()
            .unwrap()
            .into_iter()
            .map(|e| e.mount_point)
            .filter(|m| m.starts_with(&self.path))
            .collect();
        v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        v
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for _ in 0..4 {
            for m in self.mounts_below() {
                let _ = mounts::unmount(&m, true);
            }
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

pub async fn channel(socket: &Path) -> Channel {
    let socket = socket.to_path_buf();
    for _ in 0..100 {
        let s = socket.clone();
        // The URI is a placeholder: the connector dials the unix socket.
        let connected = Endpoint::from_static("http://csi.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let s = s.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
                }
            }))
            .await;
        if let Ok(ch) = connected {
            return ch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {}", socket.display());
}

pub struct Clients {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

impl Clients {
    pub async fn connect(socket: &Path) -> Clients {
        let ch = channel(socket).await;
        Clients {
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        }
    }
}

/// The Mortar volumes the local controller backend sees, and the node's state dir.
pub struct Layout {
    pub scratch: Scratch,
    pub volumes: PathBuf,
    pub state: PathBuf,
    pub socket: PathBuf,
}

impl Layout {
    pub fn new(tag: &str) -> Layout {
        let scratch = Scratch::new(tag);
        let volumes = scratch.join("volumes");
        std::fs::create_dir_all(volumes.join(NAMESPACE).join(CLUSTER).join("data")).unwrap();
        let state = scratch.join("state");
        let socket = scratch.join("csi.sock");
        Layout {
            scratch,
            volumes,
            state,
            socket,
        }
    }

    /// The directory holding the `data` volume of the test cluster.
    pub fn data(&self) -> PathBuf {
        self.volumes.join(NAMESPACE).join(CLUSTER).join("data")
    }

    pub fn shared_mount(&self) -> PathBuf {
        self.state
            .join("volumes")
            .join(format!("{NAMESPACE}_{CLUSTER}_data"))
    }

    pub fn mount_log(&self) -> PathBuf {
        self.scratch.join("mount-calls.log")
    }

    pub fn mount_calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.mount_log())
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// A `mortar-mount` stand-in: logs its arguments, then mounts the volume's local
    /// directory at MOUNTPOINT. With `fuse`, through bindfs (a real, daemonised FUSE
    /// process, so a dead daemon gives ENOTCONN as a dead mortar-mount would); otherwise
    /// with a plain bind mount.
    pub fn write_mount_command(&self, fuse: bool) -> PathBuf {
        let script = self.scratch.join("fake-mortar-mount");
        let mounter = if fuse { "bindfs" } else { "mount --bind" };
        let body = format!(
            "#!/bin/sh\n# usage: fake-mortar-mount HOST:/VOLUME MOUNTPOINT [-o OPTS]\necho \"$@\" >> '{log}'\n\
             vol=\"${{1##*:/}}\"\nexec {mounter} '{root}'/\"$vol\" \"$2\"\n",
            log = self.mount_log().display(),
            root = self.volumes.join(NAMESPACE).join(CLUSTER).display(),
        );
        std::fs::write(&script, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        script
    }

    pub fn node_config(&self, mount_command: PathBuf) -> NodeConfig {
        let mut cfg = NodeConfig::new("node-a");
        cfg.state_dir = self.state.clone();
        cfg.mount_command = mount_command;
        cfg.mount_timeout = Duration::from_secs(20);
        cfg.probe_timeout = Duration::from_secs(3);
        cfg
    }
}

/// A plugin served inside the test process.
pub struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    pub async fn start(
        layout: &Layout,
        mode: Mode,
        node: Option<NodeConfig>,
    ) -> (InProcess, Clients) {
        let resolver = Arc::new(LocalResolver::new(&layout.volumes));
        Self::start_with(layout, mode, node, resolver).await
    }

    pub async fn start_with(
        layout: &Layout,
        mode: Mode,
        node: Option<NodeConfig>,
        resolver: Arc<dyn mortar_csi::ops::VolumeResolver>,
    ) -> (InProcess, Clients) {
        let listener = server::bind(&layout.socket).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let services = Services {
            mode,
            resolver,
            default_bytes: 64 * MIB as u64,
            node,
        };
        let task = tokio::spawn(server::serve(services, listener, async {
            let _ = rx.await;
        }));
        let clients = Clients::connect(&layout.socket).await;
        (
            InProcess {
                stop: Some(tx),
                task: Some(task),
            },
            clients,
        )
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

/// The real `mortar-csi` binary as a child process.
pub struct Plugin {
    pub child: Child,
    pub stderr_path: PathBuf,
}

impl Plugin {
    /// The local-backend plugin (`--mode all`) with `mount_command` as its mount helper.
    pub fn spawn(layout: &Layout, mount_command: &Path, generation: u32) -> Plugin {
        let mut args: Vec<String> = ["--mode", "all", "--node-id", "node-a"]
            .map(String::from)
            .into();
        args.extend([
            "--endpoint".into(),
            format!("unix://{}", layout.socket.display()),
            "--backend".into(),
            "local".into(),
            "--local-root".into(),
            layout.volumes.display().to_string(),
            "--state-dir".into(),
            layout.state.display().to_string(),
            "--mount-command".into(),
            mount_command.display().to_string(),
        ]);
        Plugin::spawn_args(layout, &format!("plugin-{generation}"), &args)
    }

    /// `mortar-csi ARGS --log-level debug`, its stderr in `SCRATCH/TAG.log`.
    pub fn spawn_args(layout: &Layout, tag: &str, args: &[String]) -> Plugin {
        let stderr_path = layout.scratch.join(format!("{tag}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mortar-csi"))
            .args(args)
            .args(["--log-level", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start mortar-csi");
        Plugin { child, stderr_path }
    }

    /// SIGKILL: the harshest restart, no chance to clean anything up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn mount_cap(mode: AccessMode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessModeMsg { mode: mode as i32 }),
    }
}

pub fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(Default::default())),
        access_mode: Some(AccessModeMsg {
            mode: AccessMode::SingleNodeWriter as i32,
        }),
    }
}

pub fn cluster_params() -> std::collections::HashMap<String, String> {
    [("cluster", CLUSTER), ("clusterNamespace", NAMESPACE)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

pub fn create_req(name: &str, bytes: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(AccessMode::MultiNodeMultiWriter)],
        parameters: cluster_params(),
        ..Default::default()
    }
}

pub fn stage_req(volume_id: &str, staging: &Path) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap(AccessMode::MultiNodeMultiWriter)),
        ..Default::default()
    }
}

pub fn unpublish_req(volume_id: &str, target: &Path) -> NodeUnpublishVolumeRequest {
    NodeUnpublishVolumeRequest {
        volume_id: volume_id.into(),
        target_path: target.display().to_string(),
    }
}

pub fn unstage_req(volume_id: &str, staging: &Path) -> NodeUnstageVolumeRequest {
    NodeUnstageVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
    }
}

pub fn publish_req(
    volume_id: &str,
    staging: &Path,
    target: &Path,
    readonly: bool,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume_id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap(AccessMode::MultiNodeMultiWriter)),
        readonly,
        ..Default::default()
    }
}

/// Asserts that a call failed with `code`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    what: &str,
) {
    match result {
        Ok(r) => panic!(
            "{what}: expected {code:?}, got success {:?}",
            r.into_inner()
        ),
        Err(s) => assert_eq!(s.code(), code, "{what}: {}", s.message()),
    }
}

/// The usage a stats reply gives in `unit`.
#[track_caller]
pub fn usage(stats: &NodeGetVolumeStatsResponse, unit: volume_usage::Unit) -> VolumeUsage {
    stats
        .usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .cloned()
        .unwrap_or_else(|| panic!("no {unit:?} usage reported: {stats:?}"))
}

/// How many mounts are stacked on `path`.
pub fn mount_count(path: &Path) -> usize {
    mounts::read_mountinfo()
        .unwrap()
        .iter()
        .filter(|m| m.mount_point == path)
        .count()
}

pub fn is_mount_point(path: &Path) -> bool {
    mounts::find_now(path).unwrap().is_some()
}

pub fn have(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// PIDs of processes whose command line mentions `needle` (used to find the FUSE daemon
/// a test's own mount helper started).
pub fn pids_mentioning(needle: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        if String::from_utf8_lossy(&cmd)
            .replace('\0', " ")
            .contains(needle)
        {
            out.push(pid);
        }
    }
    out
}
