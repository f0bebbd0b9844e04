//! The mounter: runs `mortar-mount` on behalf of the node plugin, in a container of its
//! own, so that the FUSE daemons outlive restarts and upgrades of the node plugin
//! container (a container restart kills every process in it, daemonised or not).
//!
//! `mortar-csi --mode mounter --endpoint unix:///run/mortar/mounter.sock` listens on a
//! unix socket shared with the node plugin container. The protocol is one request and
//! one reply per connection, each a protobuf message ([`MountRequest`], [`MountReply`])
//! preceded by its length as a big-endian u32.
//!
//! A mount is reported as done only when its mount point shows up in the mounter's
//! `/proc/self/mountinfo` and answers statfs. Mount points must lie under the mounter's
//! `--state-dir` (`volumes/`), so the socket cannot be used to mount over arbitrary paths.
//! The mounter is PID 1 of its container (or a child subreaper elsewhere) and the
//! daemonised FUSE processes are reparented to it: it reaps them when they exit. A
//! mounter replaced in a rolling update hands its mounts to its successor (`Mounter::run`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::mounts::{self, Health};

/// Largest message accepted on the socket.
const MAX_MESSAGE: u32 = 64 << 10;

#[derive(Clone, PartialEq, prost::Message)]
pub struct MountRequest {
    /// `HOST[:PORT]:/VOLUME`, the mount helper's first argument.
    #[prost(string, tag = "1")]
    pub source: String,
    /// Absolute mount point (under the mounter's state dir).
    #[prost(string, tag = "2")]
    pub target: String,
    /// `-o` options, e.g. `backup-volfile-servers=h2:h3`.
    #[prost(string, repeated, tag = "3")]
    pub options: Vec<String>,
    /// File-name-safe name for the helper's log, `STATE_DIR/logs/mount-<name>.log`.
    #[prost(string, tag = "4")]
    pub log_name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MountReply {
    /// Empty on success.
    #[prost(string, tag = "1")]
    pub error: String,
}

async fn write_msg(s: &mut UnixStream, m: &impl prost::Message) -> std::io::Result<()> {
    let body = m.encode_to_vec();
    s.write_all(&(body.len() as u32).to_be_bytes()).await?;
    s.write_all(&body).await?;
    s.flush().await
}

async fn read_msg<M: prost::Message + Default>(s: &mut UnixStream) -> std::io::Result<M> {
    let len = s.read_u32().await?;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("message of {len} bytes"),
        ));
    }
    let mut body = vec![0u8; len as usize];
    s.read_exact(&mut body).await?;
    M::decode(body.as_slice()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Client side (the node plugin): asks the mounter at `socket` to mount and waits for
/// its answer, at most `timeout`.
pub async fn request_mount(
    socket: &Path,
    req: &MountRequest,
    timeout: Duration,
) -> Result<(), String> {
    let call = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|e| format!("mounter at {}: {e}", socket.display()))?;
        write_msg(&mut s, req)
            .await
            .map_err(|e| format!("sending to mounter: {e}"))?;
        let reply: MountReply = read_msg(&mut s)
            .await
            .map_err(|e| format!("mounter reply: {e}"))?;
        if reply.error.is_empty() {
            Ok(())
        } else {
            Err(reply.error)
        }
    };
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| Err(format!("mounter did not answer within {timeout:?}")))
}

/// Runs a mount helper that daemonises: output appended to `log_path`, its own process
/// group (signals aimed at the caller must not reach it or the daemon it leaves), killed
/// after `timeout`. `on_spawn` sees the helper's pid before it can exit.
pub async fn run_helper(
    cmd: &Path,
    args: &[String],
    log_path: &Path,
    timeout: Duration,
    on_spawn: impl FnOnce(u32),
) -> Result<(), String> {
    if let Some(dir) = log_path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(|e| format!("opening {}: {e}", log_path.display()))?;
    tracing::info!(command = %cmd.display(), ?args, "mounting");
    // Output goes to a file, not a pipe: the daemonised FUSE process inherits the
    // descriptors and would hold a pipe open long after the helper returned.
    let mut child = tokio::process::Command::new(cmd)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(|e| format!("log file: {e}"))?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", cmd.display()))?;
    if let Some(pid) = child.id() {
        on_spawn(pid);
    }
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.map_err(|e| format!("waiting for the mount helper: {e}"))?,
        Err(_) => {
            let _ = child.start_kill();
            return Err(format!("mount helper timed out after {timeout:?}"));
        }
    };
    if !status.success() {
        let tail = std::fs::read_to_string(log_path).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(3).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "mount helper failed ({status}): {}",
            tail.join(" | ")
        ));
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct MounterConfig {
    /// Mount points must be below `STATE_DIR/volumes`; helper logs go to `STATE_DIR/logs`.
    pub state_dir: PathBuf,
    pub mount_command: PathBuf,
    pub mount_timeout: Duration,
    pub probe_timeout: Duration,
    /// Created once this mounter holds the mounts it found and answers on its socket (the
    /// pod's readiness probe); removed when it stops.
    pub ready_file: Option<PathBuf>,
    /// How long a mounter whose socket a successor has taken waits, when told to stop, for
    /// the successor to take its mounts over.
    pub handover_wait: Duration,
}

pub struct Mounter {
    cfg: MounterConfig,
    /// Helpers being waited for: the zombie reaper must leave them to their waiter.
    helpers: Arc<Mutex<HashSet<u32>>>,
    /// One mount at a time per mount point.
    busy: tokio::sync::Mutex<()>,
    /// Mount points whose holder this mounter started (mounted or took over): `adopt`
    /// leaves them alone. Those that left the mount table are dropped at each scan.
    held: Mutex<HashSet<PathBuf>>,
    /// Mount points a takeover failed for, so that a mount without a live holder is
    /// reported once, not at every scan.
    refused: Mutex<HashSet<PathBuf>>,
    /// The socket this mounter bound (device, inode): while the path still names it, this
    /// mounter is the node's current one; once a successor binds the path, it is not.
    socket: Mutex<Option<(PathBuf, u64, u64)>>,
}

fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !s.starts_with('.')
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `(device, inode)` of the file at `path`.
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl Mounter {
    pub fn new(cfg: MounterConfig) -> Arc<Self> {
        Arc::new(Mounter {
            cfg,
            helpers: Arc::default(),
            busy: tokio::sync::Mutex::new(()),
            held: Mutex::default(),
            refused: Mutex::default(),
            socket: Mutex::default(),
        })
    }

    fn check(&self, req: &MountRequest) -> Result<PathBuf, String> {
        let target = Path::new(&req.target);
        let root = self.cfg.state_dir.join("volumes");
        let inside = target.is_absolute()
            && target.parent() == Some(root.as_path())
            && target
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(safe_name);
        if !inside {
            return Err(format!(
                "mount point {:?} is not a directory of {}",
                req.target,
                root.display()
            ));
        }
        if !safe_name(&req.log_name) {
            return Err(format!("bad log name {:?}", req.log_name));
        }
        let source_ok = req.source.contains(":/")
            && !req.source.starts_with('-')
            && !req.source.chars().any(|c| c.is_whitespace() || c == ',');
        if !source_ok {
            return Err(format!(
                "bad source {:?} (want HOST[:PORT]:/VOLUME)",
                req.source
            ));
        }
        if req
            .options
            .iter()
            .any(|o| o.is_empty() || o.contains(',') || o.starts_with('-'))
        {
            return Err(format!("bad options {:?}", req.options));
        }
        Ok(target.to_path_buf())
    }

    /// Runs the mount helper with `args`, kept from the zombie reaper while it runs.
    async fn helper(&self, args: &[String], log: &Path) -> Result<(), String> {
        let helpers = self.helpers.clone();
        let mut spawned = None;
        let result = run_helper(
            &self.cfg.mount_command,
            args,
            log,
            self.cfg.mount_timeout,
            |pid| {
                lock(&helpers).insert(pid);
                spawned = Some(pid);
            },
        )
        .await;
        if let Some(pid) = spawned {
            lock(&self.helpers).remove(&pid);
        }
        result
    }

    /// Takes over the mounts another mounter holds (the pod this one replaces in a rolling
    /// update; see `mortar_client::handover`): for every FUSE mount directly below
    /// `volumes/` that this mounter does not hold, a holder started here
    /// (`mortar-mount --take-over DIR`) gets the mount from the old one, which lets go; the
    /// pods using it notice nothing. Returns how many it took. A mount without a live holder
    /// is left alone (`mount` replaces it when it is asked for and broken).
    ///
    /// Run at start, before the socket is bound, and again every few seconds while this
    /// mounter owns the socket: a mount the old mounter was still making when this one
    /// started is taken at the next scan.
    pub async fn adopt(&self) -> usize {
        let root = self.cfg.state_dir.join("volumes");
        let Ok(table) = mounts::read_mountinfo() else {
            return 0;
        };
        let fuse: Vec<PathBuf> = table
            .into_iter()
            .filter(|e| {
                e.fstype.starts_with("fuse") && e.mount_point.parent() == Some(root.as_path())
            })
            .map(|e| e.mount_point)
            .collect();
        lock(&self.held).retain(|p| fuse.contains(p));
        lock(&self.refused).retain(|p| fuse.contains(p));
        let mut taken = 0;
        for target in fuse {
            let Some(name) = target.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if lock(&self.held).contains(&target) {
                continue;
            }
            let _one = self.busy.lock().await;
            // A mount of ours may have finished while this one waited.
            if lock(&self.held).contains(&target) {
                continue;
            }
            let log = self
                .cfg
                .state_dir
                .join("logs")
                .join(format!("mount-{name}.log"));
            let args = vec!["--take-over".to_string(), target.display().to_string()];
            match self.helper(&args, &log).await {
                Ok(()) => {
                    tracing::info!(target = %target.display(), "took the mount over from the mounter before");
                    lock(&self.held).insert(target.clone());
                    lock(&self.refused).remove(&target);
                    taken += 1;
                }
                Err(error) => {
                    if lock(&self.refused).insert(target.clone()) {
                        tracing::warn!(target = %target.display(), error, "not taken over");
                    }
                }
            }
        }
        taken
    }

    /// Mounts `req` unless a healthy mount is already there; Ok only once the mount is in
    /// the mount table and answers.
    pub async fn mount(&self, req: &MountRequest) -> Result<(), String> {
        let target = self.check(req)?;
        let _one = self.busy.lock().await;
        if mounts::find_now(&target)
            .map_err(|e| format!("mount table: {e}"))?
            .is_some()
        {
            match mounts::probe(&target, self.cfg.probe_timeout).await {
                Health::Healthy => return Ok(()),
                health => {
                    tracing::warn!(target = %target.display(), ?health, "replacing a broken mount");
                    let _ = mounts::unmount(&target, true);
                }
            }
        }
        tokio::fs::create_dir_all(&target)
            .await
            .map_err(|e| format!("creating {}: {e}", target.display()))?;
        let mut args = vec![req.source.clone(), req.target.clone()];
        if !req.options.is_empty() {
            args.push("-o".into());
            args.push(req.options.join(","));
        }
        let log = self
            .cfg
            .state_dir
            .join("logs")
            .join(format!("mount-{}.log", req.log_name));
        self.helper(&args, &log).await?;
        // The helper returned: the mount must be in the table now (a helper that forgot
        // to wait for the kernel would be caught here), and answer.
        let mut found = false;
        for _ in 0..50 {
            if mounts::find_now(&target)
                .map_err(|e| format!("mount table: {e}"))?
                .is_some()
            {
                found = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        if !found {
            return Err(format!(
                "mount helper succeeded but {} is not in /proc/self/mountinfo",
                target.display()
            ));
        }
        match mounts::probe(&target, self.cfg.probe_timeout).await {
            Health::Healthy => {
                tracing::info!(source = req.source, target = %target.display(), "mounted");
                lock(&self.held).insert(target);
                Ok(())
            }
            health => {
                let _ = mounts::unmount(&target, true);
                Err(format!(
                    "new mount of {} is not usable: {health:?}",
                    req.source
                ))
            }
        }
    }

    async fn handle(self: Arc<Self>, mut s: UnixStream) {
        let reply = match read_msg::<MountRequest>(&mut s).await {
            Ok(req) => match self.mount(&req).await {
                Ok(()) => MountReply::default(),
                Err(error) => {
                    tracing::warn!(
                        source = req.source,
                        target = req.target,
                        error,
                        "mount failed"
                    );
                    MountReply { error }
                }
            },
            Err(e) => MountReply {
                error: format!("bad request: {e}"),
            },
        };
        let _ = write_msg(&mut s, &reply).await;
    }

    /// The FUSE daemons (mount holders) that are children of this mounter: session leaders
    /// (the daemons call setsid) reparented to us, as PID 1 of the container or as the
    /// child subreaper `main` makes us. Helpers some task still waits for are left out.
    /// `(pid, exited)`.
    fn daemons(&self) -> Vec<(u32, bool)> {
        let helpers = lock(&self.helpers).clone();
        let me = std::process::id();
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in dir.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if helpers.contains(&pid) {
                continue;
            }
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...; comm may contain spaces and parentheses.
            let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
                continue;
            };
            let mut f = rest.split_whitespace();
            let state = f.next();
            let mut num = || f.next().and_then(|p| p.parse::<u32>().ok());
            let (ppid, _pgrp, session) = (num(), num(), num());
            if ppid == Some(me) && session == Some(pid) {
                found.push((pid, state == Some("Z")));
            }
        }
        found
    }

    /// Reaps the FUSE daemons that have exited.
    fn reap(&self) {
        for (pid, exited) in self.daemons() {
            if exited {
                let mut status = 0;
                // SAFETY: waitpid on our own exited child.
                unsafe { libc::waitpid(pid as i32, &mut status, libc::WNOHANG) };
                tracing::debug!(pid, "reaped");
            }
        }
    }

    /// Whether the socket path still names the socket this mounter bound.
    fn owns_socket(&self) -> bool {
        match &*lock(&self.socket) {
            Some((path, dev, ino)) => identity(path) == Some((*dev, *ino)),
            None => false,
        }
    }

    /// Takes over what the mounter before left (`adopt`), binds `socket`, tells the
    /// readiness probe, and serves until `shutdown` resolves. Mounts stay in place when it
    /// stops: with no successor they keep running until the container ends; when a
    /// successor has bound the socket (a rolling update), this mounter waits up to
    /// `handover_wait` for it to take every mount over before returning.
    pub async fn run(
        self: Arc<Self>,
        socket: &Path,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> anyhow::Result<()> {
        // The mounter this one replaces hands its mounts over before this one answers.
        let taken = self.adopt().await;
        if taken > 0 {
            tracing::info!(mounts = taken, "took over the mounts of the mounter before");
        }
        let listener = crate::server::bind(socket)?;
        let (dev, ino) = identity(socket)
            .ok_or_else(|| anyhow::anyhow!("{} vanished after bind", socket.display()))?;
        *lock(&self.socket) = Some((socket.to_path_buf(), dev, ino));
        if let Some(ready) = &self.cfg.ready_file {
            std::fs::write(ready, b"ready\n")
                .map_err(|e| anyhow::anyhow!("--ready-file {}: {e}", ready.display()))?;
        }
        tracing::info!(
            version = crate::VERSION,
            socket = %socket.display(),
            state_dir = %self.cfg.state_dir.display(),
            "mounter serving"
        );
        let ticker = self.clone();
        let tick = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let r = ticker.clone();
                let _ = tokio::task::spawn_blocking(move || r.reap()).await;
                // Only the node's current mounter adopts: two adopting each other's
                // mounts would pass them back and forth.
                if ticker.owns_socket() {
                    ticker.adopt().await;
                }
            }
        });
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                conn = listener.accept() => {
                    let (s, _) = conn?;
                    tokio::spawn(self.clone().handle(s));
                }
            }
        }
        drop(listener);
        if let Some(ready) = &self.cfg.ready_file {
            let _ = std::fs::remove_file(ready);
        }
        if self.owns_socket() {
            let _ = std::fs::remove_file(socket);
            tick.abort();
            return Ok(());
        }
        // A successor serves the socket and adopts, every few seconds, the mounts whose
        // holders are ours; they exit once it has them.
        let deadline = tokio::time::Instant::now() + self.cfg.handover_wait;
        loop {
            let left = self.daemons().iter().filter(|(_, exited)| !exited).count();
            if left == 0 {
                tracing::info!("the mounter after this one holds every mount");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    mounts = left,
                    "the mounter after this one did not take every mount over in time; \
                     those end with this container"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tick.abort();
        Ok(())
    }
}
