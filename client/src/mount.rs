//! `mortar-mount`: parse the command line, daemonise, connect, mount, serve until unmounted.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::fuse::{MortarFs, Timeouts};
use mortar_common::telemetry;
use mortar_replication::volume::{Options, Volume};

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MountArgs {
    pub servers: Vec<String>,
    pub volume: String,
    pub mountpoint: PathBuf,
    pub foreground: bool,
    /// `-o ping-timeout`; without it the volfile's `ping-timeout`, else 5 s.
    pub ping_timeout: Option<Duration>,
    pub timeouts: Timeouts,
    pub log_level: String,
    pub log_file: Option<PathBuf>,
    pub metrics: Option<std::net::SocketAddr>,
    pub read_only: bool,
    /// `-o no-leases`: cache nothing beyond the attribute and entry timeouts.
    pub no_leases: bool,
    /// `-o tls-dir` (or `--tls-dir`): the client certificate for mutual TLS with the bricks.
    pub tls_dir: Option<PathBuf>,
}

/// Options that mount(8) and fstab pass along and that mean nothing more to us.
const IGNORED: &[&str] = &[
    "rw", "defaults", "auto", "noauto", "_netdev", "nofail", "user", "nouser", "exec", "noexec",
    "suid", "nosuid", "dev", "nodev", "async", "relatime", "noatime",
];

/// `HOST[:PORT]:/VOLUME` → (server, volume).
pub fn parse_spec(spec: &str) -> Result<(String, String), String> {
    let (host, vol) = spec
        .rsplit_once(":/")
        .ok_or_else(|| format!("{spec:?} is not HOST[:PORT]:/VOLUME"))?;
    if host.is_empty() || vol.is_empty() || vol.contains('/') {
        return Err(format!("{spec:?} is not HOST[:PORT]:/VOLUME"));
    }
    Ok((host.to_string(), vol.to_string()))
}

impl MountArgs {
    pub fn parse(
        spec: &str,
        mountpoint: &Path,
        opts: &[String],
        foreground: bool,
    ) -> Result<MountArgs, String> {
        let (server, volume) = parse_spec(spec)?;
        let mut a = MountArgs {
            servers: vec![server],
            volume,
            mountpoint: mountpoint.to_path_buf(),
            foreground,
            ping_timeout: None,
            timeouts: Timeouts {
                attr: Duration::from_secs(1),
                entry: Duration::from_secs(1),
            },
            log_level: "info".into(),
            log_file: None,
            metrics: None,
            read_only: false,
            no_leases: false,
            tls_dir: None,
        };
        let secs = |k: &str, v: &str| -> Result<Duration, String> {
            let f: f64 = v
                .parse()
                .map_err(|_| format!("-o {k}={v}: not a number of seconds"))?;
            if !(0.0..=3600.0).contains(&f) {
                return Err(format!("-o {k}={v}: out of range"));
            }
            Ok(Duration::from_secs_f64(f))
        };
        for o in opts
            .iter()
            .flat_map(|o| o.split(','))
            .filter(|o| !o.is_empty())
        {
            let (k, v) = o.split_once('=').unwrap_or((o, ""));
            match k {
                "backup-volfile-servers" => a
                    .servers
                    .extend(v.split(':').filter(|s| !s.is_empty()).map(String::from)),
                "ping-timeout" => {
                    let t = secs(k, v)?;
                    if t.is_zero() {
                        return Err("-o ping-timeout must be above 0".into());
                    }
                    a.ping_timeout = Some(t);
                }
                "attribute-timeout" | "attr-timeout" => a.timeouts.attr = secs(k, v)?,
                "entry-timeout" => a.timeouts.entry = secs(k, v)?,
                "log-level" => a.log_level = v.to_string(),
                "log-file" => a.log_file = Some(PathBuf::from(v)),
                "metrics" => {
                    a.metrics = Some(
                        v.parse()
                            .map_err(|_| format!("-o metrics={v}: not HOST:PORT"))?,
                    )
                }
                "ro" => a.read_only = true,
                "no-leases" => a.no_leases = true,
                "tls-dir" if !v.is_empty() => a.tls_dir = Some(PathBuf::from(v)),
                _ if IGNORED.contains(&k) => {}
                _ => return Err(format!("unknown mount option {o:?}")),
            }
        }
        Ok(a)
    }
}

/// Mounts and serves until unmounted. Unless in the foreground, returns in the parent
/// once the mount is ready (or has failed), as mount(8) expects.
pub fn run(args: MountArgs) -> anyhow::Result<()> {
    let md = std::fs::metadata(&args.mountpoint)
        .map_err(|e| anyhow::anyhow!("mount point {}: {e}", args.mountpoint.display()))?;
    anyhow::ensure!(
        md.is_dir(),
        "mount point {} is not a directory",
        args.mountpoint.display()
    );
    let mountpoint = args.mountpoint.canonicalize()?;
    // Without it, `MORTAR_TLS_DIR` if set, else plain TCP.
    if let Some(dir) = &args.tls_dir {
        mortar_common::tls::init_client(Some(dir))?;
    }
    let ready = if args.foreground {
        None
    } else {
        Some(daemonise()?)
    };
    let daemonised = ready.is_some();
    let mut args = args;
    args.mountpoint = mountpoint.clone();
    if args.log_file.is_none() && daemonised {
        args.log_file = Some(telemetry::default_log_file(
            "mount",
            &mountpoint.to_string_lossy(),
        ));
    }
    let r = telemetry::init_logging(
        &format!("holder={}", mountpoint.display()),
        &args.log_level,
        args.log_file.as_deref(),
        daemonised,
    );
    if let Err(e) = r {
        let mut ready = ready;
        tell(&mut ready, &format!("{e:#}\n"));
        return Err(e);
    }
    // This process holds the mount; servers come and go (see `handover`).
    let result = crate::handover::hold(args, &mountpoint, ready, daemonised);
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

/// `mortar-mount --take-over MOUNTPOINT [-f]`: holds the mount another holder holds now
/// (see `handover`); returns, unless in the foreground, once this holder's server serves.
pub fn take_over(mountpoint: &Path, foreground: bool) -> anyhow::Result<()> {
    let mountpoint = mountpoint
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("mount point {}: {e}", mountpoint.display()))?;
    let ready = if foreground { None } else { Some(daemonise()?) };
    let daemonised = ready.is_some();
    crate::handover::take_over(&mountpoint, ready, daemonised)
}

/// `mortar-mount --handover MOUNTPOINT`: serves a mount its holder hands over (see
/// `handover`); started by the holder only.
pub fn serve_handover() -> anyhow::Result<()> {
    let link = crate::handover::Link::receive()?;
    let args = link.handover.args.clone();
    if let Some(dir) = &args.tls_dir {
        mortar_common::tls::init_client(Some(dir))?;
    }
    let result = serve(&args, &args.mountpoint, args.log_file.as_deref(), link);
    if let Err(e) = &result {
        tracing::error!("{e:#}");
    }
    result
}

/// Forks; the parent waits for the child's word on a pipe and exits with it.
fn daemonise() -> anyhow::Result<OwnedFd> {
    let mut fds = [0i32; 2];
    // SAFETY: plain pipe(2)/fork(2) before any thread exists.
    anyhow::ensure!(
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == 0,
        "pipe failed"
    );
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    match unsafe { libc::fork() } {
        -1 => anyhow::bail!("fork failed: {}", std::io::Error::last_os_error()),
        0 => {
            drop(r);
            unsafe { libc::setsid() };
            Ok(w)
        }
        _ => {
            drop(w);
            let mut msg = String::new();
            let _ = std::fs::File::from(r).read_to_string(&mut msg);
            match msg.strip_prefix("ok") {
                Some(_) => std::process::exit(0),
                None => {
                    let why = msg.trim();
                    eprintln!(
                        "mortar-mount: {}",
                        if why.is_empty() {
                            "the mount process died"
                        } else {
                            why
                        }
                    );
                    std::process::exit(1);
                }
            }
        }
    }
}

pub(crate) fn tell(ready: &mut Option<OwnedFd>, msg: &str) {
    if let Some(fd) = ready.take() {
        let _ = std::fs::File::from(fd).write_all(msg.as_bytes());
    }
}

fn serve(
    args: &MountArgs,
    mountpoint: &Path,
    log_file: Option<&Path>,
    link: crate::handover::Link,
) -> anyhow::Result<()> {
    let generation = link.handover.generation;
    let r = (|| {
        telemetry::init_logging(
            &format!("mount={}", mountpoint.display()),
            &args.log_level,
            log_file,
            log_file.is_some(),
        )?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()?;
        let opts = Options {
            ping_timeout: args.ping_timeout,
            client_name: format!("{}:{}", hostname(), mountpoint.display()),
            leases: !args.no_leases,
            family: Some(link.handover.family),
            ..Options::default()
        };
        let vol = rt
            .block_on(Volume::connect(&args.servers, &args.volume, opts))
            .map_err(|e| anyhow::anyhow!("{}:/{}: {e}", args.servers[0], args.volume))?;
        if let Some(addr) = args.metrics {
            let v = vol.clone();
            rt.block_on(telemetry::serve_metrics(
                addr,
                Arc::new(move || metrics(&v)),
            ))?;
        }
        let fs = MortarFs::new(vol.clone(), rt.handle().clone(), args.timeouts)
            .with_state(link.state_log()?, generation)?;
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("{}:/{}", args.servers[0], args.volume)),
            fuser::MountOption::Subtype("mortar".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
            if args.read_only {
                fuser::MountOption::RO
            } else {
                fuser::MountOption::RW
            },
        ];
        config.acl = fuser::SessionACL::All;
        config.n_threads = Some(2);
        // Both threads read the holder's descriptor of the device, not clones of it: the
        // kernel fails what a clone's reader had taken when the clone closes, but keeps
        // what a dying server had taken from the shared one for the next to ask again.
        config.clone_fd = false;
        let notifier = fs.notifier_slot();
        fs.drop_kernel_caches_on_recall();
        let session = link
            .session(fs, &config)
            .map_err(|e| anyhow::anyhow!("serving {}: {e}", mountpoint.display()))?;
        let _ = notifier.set(session.notifier());
        if generation == 0 {
            raise_readahead(mountpoint, crate::fuse::MAX_WRITE / 1024);
        }
        Ok::<_, anyhow::Error>((rt, vol, session))
    })();
    let (rt, vol, session) = match r {
        Ok(x) => x,
        Err(e) => {
            link.report(&crate::handover::Report::Failed(format!("{e:#}")));
            return Err(e);
        }
    };
    tracing::info!(
        volume = %args.volume,
        servers = ?args.servers,
        ping_timeout = ?vol.ping_timeout(),
        ping_timeout_from = vol.ping_timeout_source(),
        generation,
        "mounted"
    );
    link.report(&crate::handover::Report::Ready);
    if log_file.is_some() {
        redirect_stdio();
    }
    // SIGTERM/SIGINT unmount cleanly; the session loop then ends by itself.
    let mp = mountpoint.to_path_buf();
    rt.spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        tracing::info!("signal: unmounting");
        crate::handover::unmount(&mp);
    });
    session
        .run()
        .map_err(|e| anyhow::anyhow!("FUSE session: {e}"))?;
    tracing::info!("unmounted");
    rt.shutdown_timeout(Duration::from_secs(2));
    Ok(())
}

pub(crate) fn redirect_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

fn metrics(v: &Volume) -> String {
    let mut out = String::new();
    let s = &v.stats;
    telemetry::metric(
        &mut out,
        "mortar_client_mutations_total",
        "counter",
        "Replicated changes",
        s.mutations.load(Relaxed),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_reads_total",
        "counter",
        "Reads served from one copy",
        s.reads.load(Relaxed),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_read_failovers_total",
        "counter",
        "Reads retried on another brick",
        s.failovers.load(Relaxed),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_lock_acquisitions_total",
        "counter",
        "Inode lock acquisitions",
        s.lock_acquisitions.load(Relaxed),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_lock_releases_total",
        "counter",
        "Inode lock releases",
        s.lock_releases.load(Relaxed),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_bricks_up",
        "gauge",
        "Bricks connected",
        v.up_count(),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_inodes",
        "gauge",
        "Inodes the kernel holds references to (dropped when it forgets them)",
        s.inodes.load(Relaxed),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_ping_timeout_seconds",
        "gauge",
        "Ping timeout in force (-o ping-timeout, else the volfile's, else 5)",
        v.ping_timeout().as_secs_f64(),
    );
    telemetry::metric(
        &mut out,
        "mortar_client_bricks",
        "gauge",
        "Bricks in the volfile",
        v.volfile().bricks.len(),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_and_options() {
        assert_eq!(parse_spec("h:/data").unwrap(), ("h".into(), "data".into()));
        assert_eq!(
            parse_spec("127.0.0.11:24100:/data").unwrap(),
            ("127.0.0.11:24100".into(), "data".into())
        );
        assert!(parse_spec("h:data").is_err());
        assert!(parse_spec(":/data").is_err());
        let a = MountArgs::parse(
            "h:/data",
            Path::new("/mnt"),
            &["backup-volfile-servers=h2:h3,ping-timeout=2,_netdev".into()],
            true,
        )
        .unwrap();
        assert_eq!(a.servers, vec!["h", "h2", "h3"]);
        assert_eq!(a.ping_timeout, Some(Duration::from_secs(2)));
        // Without the option the volfile decides (see `Options::effective_ping_timeout`).
        let a = MountArgs::parse("h:/data", Path::new("/mnt"), &[], true).unwrap();
        assert_eq!(a.ping_timeout, None);
        assert!(
            MountArgs::parse(
                "h:/data",
                Path::new("/mnt"),
                &["ping-timeout=0".into()],
                true
            )
            .is_err()
        );
        assert!(MountArgs::parse("h:/data", Path::new("/mnt"), &["bogus".into()], true).is_err());
        assert!(
            MountArgs::parse(
                "h:/data",
                Path::new("/mnt"),
                &["ping-timeout=x".into()],
                true
            )
            .is_err()
        );
    }
}

/// The kernel caps a FUSE mount's readahead at its default (128 KiB) whatever the file system
/// asks for at INIT: sequential reads then come as 128 KiB requests, one round trip each.
/// Raised to `kib` (the largest request, 1 MiB) through the mount's backing device in sysfs,
/// they take an eighth of the round trips (a cold 64 MiB read went from about 300 to 600
/// MB/s here). Found through /proc/self/mountinfo: a stat of the mount point would be a
/// request to this very daemon, which is not serving yet. Best effort: sysfs may be
/// read-only (a container).
fn raise_readahead(mountpoint: &Path, kib: u32) {
    let unescape = |s: &str| {
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\")
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    // The last mount on the mount point is ours; fields: id parent major:minor root point ...
    let dev = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() > 4 && Path::new(&unescape(f[4])) == mountpoint).then(|| f[2].to_string())
        })
        .last();
    let Some(dev) = dev else {
        return tracing::debug!("readahead: {} not in mountinfo", mountpoint.display());
    };
    let knob = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    match std::fs::write(&knob, kib.to_string()) {
        Ok(()) => tracing::debug!("readahead {kib} KiB ({knob})"),
        Err(e) => tracing::info!("readahead stays at the kernel's default: {knob}: {e}"),
    }
}
