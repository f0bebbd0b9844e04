//! Node service: makes Mortar volumes visible to pods on this node.
//!
//! Layers, all ordinary kernel mounts so that they outlive this process:
//!
//! 1. **Shared mount** — one FUSE mount per Mortar volume (cluster + volume) per node, at
//!    `STATE_DIR/volumes/<key>`, made by `mortar-mount`, which daemonises: the FUSE daemon
//!    is not a child that dies with the plugin. Every PVC of that cluster on this node
//!    shares it (one set of brick connections, not one per PVC).
//! 2. **Stage** — NodeStageVolume bind-mounts the PVC's directory (`pvc-<id>`, or the
//!    volume root for a whole-volume PV) of the shared mount on kubelet's per-PV staging
//!    path.
//! 3. **Publish** — NodePublishVolume bind-mounts the staging path on the pod's target
//!    path, read-only when asked.
//!
//! Nothing is remembered in memory: each call reads the mount table, so a restarted
//! plugin picks up exactly where the previous one stopped. A mount whose FUSE daemon died
//! ("transport endpoint is not connected") is detached and made again when stage or
//! publish finds it, never reported as success; the shared mount is unmounted when the
//! last staged PVC using it is unstaged.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::caps::{self, CapError};
use crate::csi::node_server::Node;
use crate::csi::node_service_capability::{self, rpc};
use crate::csi::volume_capability::AccessType;
use crate::csi::volume_capability::access_mode::Mode;
use crate::csi::*;
use crate::error::{CsiError, Result};
use crate::identity::NotReady;
use crate::inflight::InFlight;
use crate::metrics::observe;
use crate::mounts::{self, BindFlags, Health, MountEntry};
use crate::ops::{self, LIMIT_XATTR};
use crate::tls_secret::TlsSecret;
use crate::volume_id::{VolumeId, VolumeLocation};

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: String,
    /// Holds the shared mounts (`volumes/`) and mount helper logs (`logs/`). In
    /// Kubernetes this must be a host directory mounted with Bidirectional propagation.
    pub state_dir: PathBuf,
    /// The FUSE mount helper: `CMD HOST[:PORT]:/VOLUME MOUNTPOINT [-o opts]`, expected to
    /// daemonise and return once the mount is up.
    pub mount_command: PathBuf,
    /// Volfile server for a named cluster; `{cluster}` and `{namespace}` are replaced.
    pub server_template: String,
    pub mount_timeout: Duration,
    /// How long a stat may take before a mount counts as hung.
    pub probe_timeout: Duration,
    /// The mounter's socket: shared mounts are made by `mortar-csi --mode mounter` (its
    /// own container, so FUSE daemons survive restarts of this one) instead of running
    /// `mount_command` here.
    pub mounter: Option<PathBuf>,
}

impl NodeConfig {
    pub fn new(node_id: impl Into<String>) -> Self {
        NodeConfig {
            node_id: node_id.into(),
            state_dir: PathBuf::from("/var/lib/kubelet/plugins/mortar.csi.mortar.dev"),
            mount_command: PathBuf::from("mortar-mount"),
            server_template: crate::volume_id::DEFAULT_SERVER_TEMPLATE.into(),
            mount_timeout: Duration::from_secs(60),
            probe_timeout: Duration::from_secs(10),
            mounter: None,
        }
    }

    /// The mount helper as an executable path, looked up in PATH when it is a bare name.
    pub fn resolve_mount_command(&self) -> Option<PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let executable = |p: &Path| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        };
        if self.mount_command.components().count() > 1 {
            return executable(&self.mount_command).then(|| self.mount_command.clone());
        }
        // PATH first, then the directory of this binary: a build directory or an unpacked
        // release holds both binaries side by side without being on PATH.
        let path = std::env::var_os("PATH").unwrap_or_default();
        let beside_us = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf));
        std::env::split_paths(&path)
            .chain(beside_us)
            .map(|d| d.join(&self.mount_command))
            .find(|p| executable(p))
    }

    /// Probe: ready when the mount helper exists (or the mounter answers) and the state
    /// directory is usable. A mounter that is not listening yet is still starting (its
    /// DaemonSet may come up after ours); the rest are missing dependencies.
    pub fn ready(&self) -> std::result::Result<(), NotReady> {
        if let Some(socket) = &self.mounter {
            std::os::unix::net::UnixStream::connect(socket)
                .map_err(|e| NotReady::Starting(format!("mounter at {}: {e}", socket.display())))?;
        } else if self.resolve_mount_command().is_none() {
            return Err(NotReady::Missing(format!(
                "mount helper {} not found",
                self.mount_command.display()
            )));
        }
        std::fs::create_dir_all(self.state_dir.join("volumes")).map_err(|e| {
            NotReady::Missing(format!("state directory {}: {e}", self.state_dir.display()))
        })
    }
}

pub struct NodeService {
    cfg: NodeConfig,
    inflight: InFlight,
    /// Serialises mount/unmount of each shared mount between PVCs of one cluster.
    shared_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

fn required<'a>(value: &'a str, field: &str) -> Result<&'a str> {
    if value.is_empty() {
        Err(CsiError::missing(field))
    } else {
        Ok(value)
    }
}

fn parse_id(id: &str) -> Result<VolumeId> {
    id.parse().map_err(|e: crate::volume_id::ParseError| {
        CsiError::NotFound(format!("volume {id:?} not found ({})", e.why))
    })
}

fn io_err(context: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> CsiError {
    move |e| CsiError::io(context.to_string(), e)
}

/// The capability of a NodeStage/NodePublish: missing or malformed is a bad request; one
/// the volume cannot serve (block, another fs type) is the spec's "Exceeds capabilities",
/// FAILED_PRECONDITION for these two calls.
fn check_mount_capability(cap: Option<&VolumeCapability>) -> Result<&VolumeCapability> {
    let cap = cap.ok_or_else(|| CsiError::missing("volume_capability"))?;
    caps::check(cap).map_err(|e| match e {
        CapError::Unsupported(why) => CsiError::FailedPrecondition(why),
        malformed => CsiError::from(malformed),
    })?;
    Ok(cap)
}

fn mount_flags(cap: &VolumeCapability) -> &[String] {
    match &cap.access_type {
        Some(AccessType::Mount(m)) => &m.mount_flags,
        _ => &[],
    }
}

/// The CO should have made the parent directory; making it here costs nothing and
/// spares a failed mount when it has not.
fn absolute_creating_parent(path: &str) -> Result<PathBuf> {
    let path = Path::new(path);
    if !path.is_absolute() {
        return Err(CsiError::InvalidArgument(format!(
            "{} is not an absolute path",
            path.display()
        )));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(io_err(format!("creating {}", parent.display())))?;
    }
    mounts::absolute(path).map_err(io_err(path.display()))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CsiError::Internal(format!("worker failed: {e}")))?
}

impl NodeService {
    pub fn new(cfg: NodeConfig) -> Self {
        NodeService {
            cfg,
            inflight: InFlight::default(),
            shared_locks: Mutex::new(HashMap::new()),
        }
    }

    fn shared_path(&self, location: &VolumeLocation) -> PathBuf {
        self.cfg.state_dir.join("volumes").join(location.key())
    }

    /// Where the TLS identity that came with a volume's requests is kept for its mounts:
    /// `STATE_DIR/tls/<key>`, one per cluster and volume like the shared mount.
    fn tls_dir(&self, location: &VolumeLocation) -> PathBuf {
        self.cfg.state_dir.join("tls").join(location.key())
    }

    /// Keeps the identity a request brought (a renewed certificate replaces the old files;
    /// mounts made from now on use it) and says which TLS directory mounts of `location`
    /// use: this one if any request ever brought one, else none (the process's own).
    async fn tls_for_mount(
        &self,
        location: &VolumeLocation,
        tls: Option<&TlsSecret>,
    ) -> Result<Option<PathBuf>> {
        let dir = self.tls_dir(location);
        if let Some(tls) = tls {
            let (t, d) = (tls.clone(), dir.clone());
            blocking(move || {
                t.write_dir(&d)
                    .map_err(io_err(format!("writing {}", d.display())))
            })
            .await?;
        }
        Ok(dir
            .join(mortar_common::tls::KEY_FILE)
            .exists()
            .then_some(dir))
    }

    fn shared_lock(&self, location: &VolumeLocation) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.shared_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(location.key()).or_default().clone()
    }

    /// `mortar-mount` arguments for a volume: the first volfile server, the others as
    /// backups.
    fn mount_args(
        &self,
        location: &VolumeLocation,
        mount_point: &Path,
        tls_dir: Option<&Path>,
    ) -> Vec<String> {
        let servers = location.volfile_servers(&self.cfg.server_template);
        let mut args = vec![
            format!("{}:/{}", servers[0], location.volume),
            mount_point.display().to_string(),
        ];
        let options = mount_options(&servers, tls_dir);
        if !options.is_empty() {
            args.push("-o".into());
            args.push(options.join(","));
        }
        args
    }

    /// Makes sure the shared mount of `location` is up and answering, mounting it or
    /// replacing a dead one. Returns its mount table entry.
    async fn ensure_shared(
        &self,
        location: &VolumeLocation,
        tls: Option<&TlsSecret>,
    ) -> Result<MountEntry> {
        let lock = self.shared_lock(location);
        let _held = lock.lock().await;
        let tls_dir = self.tls_for_mount(location, tls).await?;
        let path = self.shared_path(location);
        for _ in 0..8 {
            let Some(entry) = mounts::find_now(&path).map_err(io_err("reading mount table"))?
            else {
                break;
            };
            match mounts::probe(&path, self.cfg.probe_timeout).await {
                Health::Healthy => return Ok(entry),
                health => {
                    tracing::warn!(mount = %path.display(), ?health, "shared mount is broken, remounting");
                    mounts::unmount(&path, true)
                        .map_err(io_err(format!("detaching {}", path.display())))?;
                }
            }
        }
        tokio::fs::create_dir_all(&path)
            .await
            .map_err(io_err(format!("creating {}", path.display())))?;
        self.run_mount(location, &path, tls_dir.as_deref()).await?;
        let entry = mounts::find_now(&path)
            .map_err(io_err("reading mount table"))?
            .ok_or_else(|| {
                CsiError::Unavailable(format!(
                    "mount helper returned but nothing is mounted at {}",
                    path.display()
                ))
            })?;
        match mounts::probe(&path, self.cfg.probe_timeout).await {
            Health::Healthy => Ok(entry),
            health => {
                let _ = mounts::unmount(&path, true);
                Err(CsiError::Unavailable(format!(
                    "new mount of {location} is not usable: {health:?}"
                )))
            }
        }
    }

    async fn run_mount(
        &self,
        location: &VolumeLocation,
        path: &Path,
        tls_dir: Option<&Path>,
    ) -> Result<()> {
        if let Some(socket) = &self.cfg.mounter {
            // The mounter container runs mortar-mount, so the FUSE daemon is not in ours.
            // It sees the same state directory, so the TLS directory's path holds there too.
            let servers = location.volfile_servers(&self.cfg.server_template);
            let options = mount_options(&servers, tls_dir);
            let req = crate::mounter::MountRequest {
                source: format!("{}:/{}", servers[0], location.volume),
                target: path.display().to_string(),
                options,
                log_name: location.key(),
            };
            tracing::info!(mounter = %socket.display(), source = req.source, "asking the mounter");
            // A little more than the mounter's own helper timeout, so its answer wins.
            let timeout = self.cfg.mount_timeout + Duration::from_secs(15);
            return crate::mounter::request_mount(socket, &req, timeout)
                .await
                .map_err(|e| CsiError::Unavailable(format!("mounting {location}: {e}")));
        }
        let cmd = self.cfg.resolve_mount_command().ok_or_else(|| {
            CsiError::Unavailable(format!(
                "mount helper {} not found",
                self.cfg.mount_command.display()
            ))
        })?;
        let args = self.mount_args(location, path, tls_dir);
        let log_path = self
            .cfg
            .state_dir
            .join("logs")
            .join(format!("mount-{}.log", location.key()));
        crate::mounter::run_helper(&cmd, &args, &log_path, self.cfg.mount_timeout, |_| {})
            .await
            .map_err(|e| CsiError::Unavailable(format!("mounting {location}: {e}")))
    }

    /// Binds the volume's directory of the shared mount on `staging`; idempotent, and
    /// repairs a staging mount that lost its FUSE daemon.
    async fn stage(&self, id: &VolumeId, staging: &Path, tls: Option<&TlsSecret>) -> Result<()> {
        let shared = self.ensure_shared(&id.location, tls).await?;
        let sub = id.dir.clone().unwrap_or_default();
        let source = self.shared_path(&id.location).join(&sub);
        match mounts::probe(&source, self.cfg.probe_timeout).await {
            Health::Healthy => {}
            Health::Missing => {
                return Err(CsiError::NotFound(format!(
                    "volume {id} not found on the Mortar volume"
                )));
            }
            health => {
                return Err(CsiError::Unavailable(format!(
                    "{}: {health:?}",
                    source.display()
                )));
            }
        }
        if let Some(existing) = mounts::find_now(staging).map_err(io_err("reading mount table"))? {
            let health = mounts::probe(staging, self.cfg.probe_timeout).await;
            if !health.is_broken() && existing.shows(&shared, &sub) {
                return Ok(());
            }
            tracing::warn!(staging = %staging.display(), ?health, "replacing stale staging mount");
            mounts::unmount_all(staging)
                .map_err(io_err(format!("unmounting {}", staging.display())))?;
        }
        let staging2 = staging.to_path_buf();
        blocking(move || {
            std::fs::create_dir_all(&staging2)
                .map_err(io_err(format!("creating {}", staging2.display())))?;
            mounts::bind(&source, &staging2, BindFlags::default())
                .map_err(io_err(format!("bind-mounting {}", staging2.display())))
        })
        .await
    }

    /// Unmounts the shared mount of `location` once no staged or published mount shows
    /// any part of it (read from the mount table, so also right after a restart).
    async fn release_shared(&self, location: &VolumeLocation) -> Result<()> {
        let lock = self.shared_lock(location);
        let _held = lock.lock().await;
        let path = self.shared_path(location);
        let table = mounts::read_mountinfo().map_err(io_err("reading mount table"))?;
        let Some(shared) = mounts::find(&table, &path) else {
            return Ok(());
        };
        let users = table
            .iter()
            .filter(|e| e.id != shared.id && e.is_within(shared))
            .count();
        if users > 0 {
            tracing::debug!(mount = %path.display(), users, "shared mount still in use");
            return Ok(());
        }
        tracing::info!(mount = %path.display(), "last user gone, unmounting shared mount");
        mounts::unmount_all(&path).map_err(io_err(format!("unmounting {}", path.display())))?;
        let _ = std::fs::remove_dir(&path);
        Ok(())
    }

    /// SINGLE_NODE_SINGLE_WRITER: one workload at a time. The spec's second-publish table
    /// (with SINGLE_NODE_MULTI_WRITER advertised) makes another target path
    /// FAILED_PRECONDITION; the publishes of a volume are the bind mounts of its staging
    /// mount, read from the mount table like everything else here.
    fn refuse_second_publish(
        &self,
        id: &VolumeId,
        staged: &MountEntry,
        staging: &Path,
        target: &Path,
    ) -> Result<()> {
        let shared_mounts = self.cfg.state_dir.join("volumes");
        let table = mounts::read_mountinfo().map_err(io_err("reading mount table"))?;
        let elsewhere = table.iter().find(|m| {
            m.dev == staged.dev
                && m.root == staged.root
                && m.mount_point != staging
                && m.mount_point != target
                && !m.mount_point.starts_with(&shared_mounts)
        });
        match elsewhere {
            Some(m) => Err(CsiError::FailedPrecondition(format!(
                "volume {id} has access mode SINGLE_NODE_SINGLE_WRITER and is already published at {}",
                m.mount_point.display()
            ))),
            None => Ok(()),
        }
    }

    async fn node_stage(&self, req: NodeStageVolumeRequest) -> Result<NodeStageVolumeResponse> {
        required(&req.volume_id, "volume_id")?;
        required(&req.staging_target_path, "staging_target_path")?;
        check_mount_capability(req.volume_capability.as_ref())?;
        let id = parse_id(&req.volume_id)?;
        let tls = TlsSecret::from_request(&req.secrets, "node stage secrets")?;
        let _guard = self.inflight.try_lock(req.volume_id.clone())?;
        let staging = absolute_creating_parent(&req.staging_target_path)?;
        self.stage(&id, &staging, tls.as_ref()).await?;
        Ok(NodeStageVolumeResponse {})
    }

    async fn node_unstage(
        &self,
        req: NodeUnstageVolumeRequest,
    ) -> Result<NodeUnstageVolumeResponse> {
        required(&req.volume_id, "volume_id")?;
        required(&req.staging_target_path, "staging_target_path")?;
        let _guard = self.inflight.try_lock(req.volume_id.clone())?;
        let staging = match mounts::absolute(Path::new(&req.staging_target_path)) {
            Ok(p) => p,
            // Parent gone: nothing can be mounted there.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(NodeUnstageVolumeResponse {});
            }
            Err(e) => return Err(CsiError::io("staging_target_path", e)),
        };
        let s = staging.clone();
        blocking(move || {
            mounts::unmount_all(&s).map_err(io_err(format!("unmounting {}", s.display())))
        })
        .await?;
        if let Ok(id) = req.volume_id.parse::<VolumeId>() {
            self.release_shared(&id.location).await?;
        }
        Ok(NodeUnstageVolumeResponse {})
    }

    async fn node_publish(
        &self,
        req: NodePublishVolumeRequest,
    ) -> Result<NodePublishVolumeResponse> {
        required(&req.volume_id, "volume_id")?;
        required(&req.target_path, "target_path")?;
        let cap = check_mount_capability(req.volume_capability.as_ref())?;
        if req.staging_target_path.is_empty() {
            // Spec, NodePublishVolume errors: with STAGE_UNSTAGE_VOLUME advertised, this is
            // "Staging target path not set", FAILED_PRECONDITION (stage, then publish).
            return Err(CsiError::FailedPrecondition(
                "staging_target_path is not set: NodeStageVolume comes first".into(),
            ));
        }
        let id = parse_id(&req.volume_id)?;
        let tls = TlsSecret::from_request(&req.secrets, "node publish secrets")?;
        let (mut flags, ignored) =
            BindFlags::from_options(mount_flags(cap).iter().map(String::as_str));
        if !ignored.is_empty() {
            // Names only: the spec warns that mount flags may carry sensitive values.
            let ignored: Vec<&str> = ignored
                .iter()
                .map(|o| o.split('=').next().unwrap_or_default())
                .collect();
            tracing::info!(
                ?ignored,
                "mount flags that do not apply to a bind mount are ignored"
            );
        }
        flags.read_only |= req.readonly || caps::is_read_only(cap);
        let _guard = self
            .inflight
            .try_lock(format!("{}@{}", req.volume_id, req.target_path))?;
        // Kubelet publishes again now and then (the CSIDriver's `requiresRepublish`) with
        // the Secret as it is now: a renewed certificate reaches the cluster's TLS
        // directory, which the running mount reads again at its next connection.
        if tls.is_some() {
            let lock = self.shared_lock(&id.location);
            let _held = lock.lock().await;
            self.tls_for_mount(&id.location, tls.as_ref()).await?;
        }

        let staging = mounts::absolute(Path::new(&req.staging_target_path))
            .map_err(io_err("staging_target_path"))?;
        let Some(mut staged) = mounts::find_now(&staging).map_err(io_err("reading mount table"))?
        else {
            return Err(CsiError::FailedPrecondition(format!(
                "volume is not staged at {}",
                staging.display()
            )));
        };
        if mounts::probe(&staging, self.cfg.probe_timeout)
            .await
            .is_broken()
        {
            tracing::warn!(staging = %staging.display(), "staging mount is broken, repairing before publish");
            self.stage(&id, &staging, tls.as_ref()).await?;
            staged = mounts::find_now(&staging)
                .map_err(io_err("reading mount table"))?
                .ok_or_else(|| CsiError::Internal("staging mount vanished during repair".into()))?;
        }

        let target = absolute_creating_parent(&req.target_path)?;
        if caps::mode(cap) == Some(Mode::SingleNodeSingleWriter) {
            self.refuse_second_publish(&id, &staged, &staging, &target)?;
        }
        if let Some(existing) = mounts::find_now(&target).map_err(io_err("reading mount table"))? {
            let health = mounts::probe(&target, self.cfg.probe_timeout).await;
            if health.is_broken() {
                tracing::warn!(target = %target.display(), "published mount is broken, mounting again");
                mounts::unmount_all(&target)
                    .map_err(io_err(format!("unmounting {}", target.display())))?;
            } else if existing.dev == staged.dev && existing.root == staged.root {
                if existing.read_only() == flags.read_only {
                    return Ok(NodePublishVolumeResponse {});
                }
                return Err(CsiError::AlreadyExists(format!(
                    "{} is already published {}",
                    target.display(),
                    if existing.read_only() {
                        "read-only"
                    } else {
                        "read-write"
                    }
                )));
            } else {
                return Err(CsiError::AlreadyExists(format!(
                    "{} already has another mount",
                    target.display()
                )));
            }
        }
        blocking(move || {
            std::fs::create_dir_all(&target)
                .map_err(io_err(format!("creating {}", target.display())))?;
            mounts::bind(&staging, &target, flags)
                .map_err(io_err(format!("bind-mounting {}", target.display())))
        })
        .await?;
        Ok(NodePublishVolumeResponse {})
    }

    async fn node_unpublish(
        &self,
        req: NodeUnpublishVolumeRequest,
    ) -> Result<NodeUnpublishVolumeResponse> {
        required(&req.volume_id, "volume_id")?;
        required(&req.target_path, "target_path")?;
        let _guard = self
            .inflight
            .try_lock(format!("{}@{}", req.volume_id, req.target_path))?;
        let target = match mounts::absolute(Path::new(&req.target_path)) {
            Ok(p) => p,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(NodeUnpublishVolumeResponse {});
            }
            Err(e) => return Err(CsiError::io("target_path", e)),
        };
        blocking(move || {
            mounts::unmount_all(&target)
                .map_err(io_err(format!("unmounting {}", target.display())))?;
            // The spec has the plugin remove the target it created. remove_dir (not
            // remove_dir_all): a non-empty directory here is not ours to delete.
            match std::fs::remove_dir(&target) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(CsiError::io(format!("removing {}", target.display()), e)),
            }
        })
        .await?;
        Ok(NodeUnpublishVolumeResponse {})
    }

    async fn stats(&self, req: NodeGetVolumeStatsRequest) -> Result<NodeGetVolumeStatsResponse> {
        required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        let id = parse_id(&req.volume_id)?;
        let path = mounts::absolute(Path::new(&req.volume_path)).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                CsiError::NotFound(format!("{} does not exist", req.volume_path))
            }
            _ => CsiError::io("volume_path", e),
        })?;
        let abnormal = |message: String| NodeGetVolumeStatsResponse {
            usage: Vec::new(),
            volume_condition: Some(VolumeCondition {
                abnormal: true,
                message,
            }),
        };
        match mounts::probe(&path, self.cfg.probe_timeout).await {
            Health::Healthy => {}
            Health::Missing => {
                return Err(CsiError::NotFound(format!(
                    "{} does not exist",
                    path.display()
                )));
            }
            Health::Disconnected => {
                return Ok(abnormal(
                    "Mortar mount is broken: transport endpoint is not connected".into(),
                ));
            }
            Health::Hung => return Ok(abnormal("Mortar mount does not answer".into())),
            Health::Failed(e) => return Ok(abnormal(format!("Mortar mount fails: {e}"))),
        }
        // The path must hold a mount of this very volume: a bind mount of its PVC
        // directory (whole-volume handles have no directory to compare).
        let mounted = mounts::find_now(&path).map_err(io_err("reading mount table"))?;
        let shows_volume = match (&mounted, &id.dir) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(m), Some(dir)) => m.root.ends_with(&format!("/{dir}")),
        };
        if !shows_volume {
            return Err(CsiError::NotFound(format!(
                "volume {} is not mounted at {}",
                req.volume_id,
                path.display()
            )));
        }
        let probe_timeout = self.cfg.probe_timeout;
        let work = blocking(move || {
            let fs = ops::statvfs(&path).map_err(io_err("statfs"))?;
            let limit = ops::get_xattr(&path, LIMIT_XATTR)
                .ok()
                .flatten()
                .and_then(|v| v.parse::<u64>().ok());
            let usage =
                |unit: volume_usage::Unit, total: u64, used: u64, available: u64| VolumeUsage {
                    available: available.min(i64::MAX as u64) as i64,
                    total: total.min(i64::MAX as u64) as i64,
                    used: used.min(i64::MAX as u64) as i64,
                    unit: unit as i32,
                };
            let fs_used_inodes = fs.total_inodes.saturating_sub(fs.free_inodes);
            let list = match limit {
                // The file system reports the whole volume: measure the PVC itself
                // against its limit, as `df` on a quota'd directory would show it.
                Some(limit) if fs.total_bytes > limit => {
                    let u = ops::tree_usage(&path).map_err(io_err("measuring usage"))?;
                    vec![
                        usage(
                            volume_usage::Unit::Bytes,
                            limit,
                            u.bytes,
                            limit.saturating_sub(u.bytes).min(fs.free_bytes),
                        ),
                        usage(
                            volume_usage::Unit::Inodes,
                            fs.total_inodes,
                            u.inodes,
                            fs.free_inodes,
                        ),
                    ]
                }
                _ => vec![
                    usage(
                        volume_usage::Unit::Bytes,
                        fs.total_bytes,
                        fs.total_bytes.saturating_sub(fs.free_bytes),
                        fs.free_bytes,
                    ),
                    usage(
                        volume_usage::Unit::Inodes,
                        fs.total_inodes,
                        fs_used_inodes,
                        fs.free_inodes,
                    ),
                ],
            };
            Ok(list)
        });
        let usage = tokio::time::timeout(probe_timeout * 6, work)
            .await
            .map_err(|_| CsiError::Unavailable("measuring volume usage timed out".into()))??;
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(VolumeCondition {
                abnormal: false,
                message: "mounted and answering".into(),
            }),
        })
    }

    async fn expand(&self, req: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse> {
        required(&req.volume_id, "volume_id")?;
        required(&req.volume_path, "volume_path")?;
        if let Some(cap) = &req.volume_capability {
            // Spec, NodeExpandVolume errors: "Exceeds capabilities" is INVALID_ARGUMENT.
            caps::check(cap)?;
        }
        parse_id(&req.volume_id)?;
        let path = PathBuf::from(&req.volume_path);
        match mounts::probe(&path, self.cfg.probe_timeout).await {
            Health::Healthy => {}
            Health::Missing => {
                return Err(CsiError::NotFound(format!(
                    "{} does not exist",
                    path.display()
                )));
            }
            health => {
                return Err(CsiError::Unavailable(format!(
                    "{}: {health:?}",
                    path.display()
                )));
            }
        }
        // The size limit lives on the Mortar volume and was raised by the controller;
        // there is no file system on the node to grow.
        let capacity = req
            .capacity_range
            .map(|r| r.required_bytes.max(r.limit_bytes))
            .unwrap_or(0);
        if capacity < 0 {
            return Err(CsiError::InvalidArgument(
                "capacity must not be negative".into(),
            ));
        }
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: capacity,
        })
    }
}

/// `-o` options of a shared mount: backup volfile servers, and the TLS directory of the
/// cluster's identity when the StorageClass hands one over.
fn mount_options(servers: &[String], tls_dir: Option<&Path>) -> Vec<String> {
    let mut options = Vec::new();
    if servers.len() > 1 {
        options.push(format!("backup-volfile-servers={}", servers[1..].join(":")));
    }
    if let Some(dir) = tls_dir {
        options.push(format!("tls-dir={}", dir.display()));
    }
    options
}

fn rpc_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        r: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let req = r.into_inner();
        let subject = format!("{} at {}", req.volume_id, req.staging_target_path);
        observe("NodeStageVolume", &subject, self.node_stage(req)).await
    }

    async fn node_unstage_volume(
        &self,
        r: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let req = r.into_inner();
        let subject = format!("{} at {}", req.volume_id, req.staging_target_path);
        observe("NodeUnstageVolume", &subject, self.node_unstage(req)).await
    }

    async fn node_publish_volume(
        &self,
        r: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let req = r.into_inner();
        let subject = format!("{} at {}", req.volume_id, req.target_path);
        observe("NodePublishVolume", &subject, self.node_publish(req)).await
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let req = r.into_inner();
        let subject = format!("{} at {}", req.volume_id, req.target_path);
        observe("NodeUnpublishVolume", &subject, self.node_unpublish(req)).await
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let req = r.into_inner();
        let subject = format!("{} at {}", req.volume_id, req.volume_path);
        observe("NodeGetVolumeStats", &subject, self.stats(req)).await
    }

    async fn node_expand_volume(
        &self,
        r: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let req = r.into_inner();
        let subject = req.volume_id.clone();
        observe("NodeExpandVolume", &subject, self.expand(req)).await
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        observe("NodeGetCapabilities", "", async {
            Ok(NodeGetCapabilitiesResponse {
                capabilities: vec![
                    rpc_cap(rpc::Type::StageUnstageVolume),
                    rpc_cap(rpc::Type::GetVolumeStats),
                    rpc_cap(rpc::Type::ExpandVolume),
                    rpc_cap(rpc::Type::VolumeCondition),
                    rpc_cap(rpc::Type::SingleNodeMultiWriter),
                ],
            })
        })
        .await
    }

    async fn node_get_info(
        &self,
        _: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        let node_id = self.cfg.node_id.clone();
        observe("NodeGetInfo", "", async move {
            Ok(NodeGetInfoResponse {
                accessible_topology: Some(Topology {
                    segments: [(crate::TOPOLOGY_NODE_KEY.to_string(), node_id.clone())].into(),
                }),
                node_id,
                max_volumes_per_node: 0,
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bare helper name that is not on PATH is found next to this binary (a build
    /// directory, an unpacked release), and a name found nowhere stays unresolved.
    #[test]
    fn mount_helper_is_found_beside_the_binary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf();
        let name = format!("mortar-beside-test-{}", std::process::id());
        let helper = dir.join(&name);
        std::fs::write(&helper, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cfg = NodeConfig::new("n1");
        cfg.mount_command = PathBuf::from(&name);
        let found = cfg.resolve_mount_command();
        std::fs::remove_file(&helper).unwrap();
        assert_eq!(found, Some(helper));
        assert_eq!(cfg.resolve_mount_command(), None);
    }

    #[test]
    fn mount_arguments_follow_the_mortar_mount_contract() {
        // The default names the operator's client Service `NAME` in the cluster's namespace.
        let svc = NodeService::new(NodeConfig::new("n1"));
        let named: VolumeId = "storage/shared/data/pvc-1".parse().unwrap();
        assert_eq!(
            svc.mount_args(&named.location, Path::new("/m"), None),
            vec!["shared.storage.svc:24100:/data", "/m"]
        );
        let servers: VolumeId = "@h1:24100,h2,h3/data".parse().unwrap();
        assert_eq!(
            svc.mount_args(&servers.location, Path::new("/m"), None),
            vec!["h1:24100:/data", "/m", "-o", "backup-volfile-servers=h2:h3"]
        );
        assert_eq!(
            svc.mount_args(
                &servers.location,
                Path::new("/m"),
                Some(Path::new("/s/tls/k"))
            ),
            vec![
                "h1:24100:/data",
                "/m",
                "-o",
                "backup-volfile-servers=h2:h3,tls-dir=/s/tls/k"
            ]
        );
    }
}
