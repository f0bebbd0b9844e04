//! `mortar-csi --mode controller|node --endpoint unix:///csi/csi.sock --node-id NAME`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use mortar_csi::mortar_ops::MortarResolver;
use mortar_csi::node::NodeConfig;
use mortar_csi::ops::{LocalResolver, Unconfigured, VolumeResolver};
use mortar_csi::server::{self, Mode, Services};
use mortar_csi::volume_id::VolumeId;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Backend {
    Mortar,
    Local,
}

/// Mortar CSI driver (mortar.csi.mortar.dev): identity + controller or identity + node
/// services on a unix socket, or the node's mounter.
#[derive(Parser, Debug)]
#[command(name = "mortar-csi", version)]
struct Cli {
    /// Which services to run.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The CSI socket, as kubelet and the sidecars name it.
    #[arg(long, default_value = "unix:///csi/csi.sock", env = "CSI_ENDPOINT")]
    endpoint: String,
    /// This node's name (node mode), usually the Kubernetes node name.
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Log filter, e.g. `info` or `mortar_csi=debug`.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Serve Prometheus metrics on this address (`/metrics`); off when not given.
    #[arg(long)]
    metrics_address: Option<std::net::SocketAddr>,

    /// Controller: how volumes are reached. `mortar`: through the Mortar client library,
    /// straight to the bricks (no mount); `local`: as directories under --local-root.
    #[arg(long, value_enum, default_value_t = Backend::Mortar)]
    backend: Backend,
    /// Controller, `--backend local`: volumes are the directories
    /// `DIR/NAMESPACE/CLUSTER/VOLUME` (a mounted Mortar volume, or plain directories for
    /// trials and tests).
    #[arg(long)]
    local_root: Option<PathBuf>,
    /// Controller, `--backend mortar`: a volume ListVolumes enumerates from the start
    /// (`NAMESPACE/CLUSTER/VOLUME` or `@HOST,HOST/VOLUME`; repeatable). Volumes named by a
    /// request since the start are listed as well.
    #[arg(long = "known-volume")]
    known_volumes: Vec<String>,
    /// Controller: capacity of a volume request that names none, in bytes.
    #[arg(long, default_value_t = 1 << 30)]
    default_capacity: u64,

    /// Node, mounter: directory for the shared per-cluster mounts (`volumes/`) and mount
    /// helper logs (`logs/`); the node plugin and its mounter must see the same one.
    #[arg(long, default_value = "/var/lib/kubelet/plugins/mortar.csi.mortar.dev")]
    state_dir: PathBuf,
    /// Node, mounter: the FUSE mount helper (looked up in PATH when a bare name).
    #[arg(long, default_value = "mortar-mount")]
    mount_command: PathBuf,
    /// Volfile server of a named cluster (controller and node); `{cluster}` and
    /// `{namespace}` are replaced. The default is the operator's client Service.
    #[arg(long, default_value = mortar_csi::volume_id::DEFAULT_SERVER_TEMPLATE)]
    volfile_server_template: String,
    /// Node: have the mounter at this socket (`unix:///run/mortar/mounter.sock`) run the
    /// mount helper, so FUSE daemons live in its container, not this one. Without it the
    /// node plugin runs --mount-command itself (tests, single-host trials).
    #[arg(long)]
    mounter: Option<String>,
    /// Node, mounter: seconds to wait for the mount helper.
    #[arg(long, default_value_t = 60)]
    mount_timeout: u64,
    /// Mounter: a file to create once the mounter holds the mounts it found and serves its
    /// socket (for a readiness probe); removed when it stops.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Mounter: when told to stop after a successor has bound the socket (a rolling
    /// update), seconds to wait for the successor to take every mount over.
    #[arg(long, default_value_t = 45)]
    handover_wait: u64,
    /// Directory with the certificate (`tls.crt`, `tls.key`) and the cluster's CA (`ca.crt`)
    /// for mutual TLS with the bricks, for this process and the mounts it starts
    /// [default: plain TCP].
    #[arg(long, env = "MORTAR_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            let msg = e.to_string();
            let first = msg
                .lines()
                .next()
                .unwrap_or("bad arguments")
                .trim_start_matches("error: ");
            eprintln!("mortar-csi: {first}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("mortar-csi: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(dir) = &cli.tls_dir {
        // The mounts this process starts inherit it; so does its own client side
        // (`mortar_common::tls`). SAFETY: no other thread runs yet.
        unsafe { std::env::set_var(mortar_common::tls::TLS_DIR_ENV, dir) };
    }
    mortar_common::telemetry::init_logging("csi", &cli.log_level, None, false)?;

    if cli.mode == Mode::Mounter {
        return run_mounter(cli);
    }
    let node = match cli.mode {
        Mode::Controller | Mode::Mounter => None,
        Mode::Node | Mode::All => {
            let node_id = cli
                .node_id
                .clone()
                .filter(|n| !n.is_empty())
                .ok_or_else(|| anyhow::anyhow!("--node-id is required in node mode"))?;
            let mut cfg = NodeConfig::new(node_id);
            cfg.state_dir = cli.state_dir.clone();
            cfg.mount_command = cli.mount_command.clone();
            cfg.server_template = cli.volfile_server_template.clone();
            cfg.mount_timeout = Duration::from_secs(cli.mount_timeout);
            cfg.mounter = cli
                .mounter
                .as_deref()
                .map(server::socket_path)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--mounter: {e}"))?;
            Some(cfg)
        }
    };
    let resolver: Arc<dyn VolumeResolver> = match (cli.mode, cli.backend, &cli.local_root) {
        (Mode::Node | Mode::Mounter, _, _) => Arc::new(Unconfigured),
        (_, Backend::Local, Some(root)) => Arc::new(LocalResolver::new(root)),
        (_, Backend::Local, None) => anyhow::bail!("--backend local needs --local-root DIR"),
        (_, Backend::Mortar, Some(_)) => {
            anyhow::bail!("--local-root is only for --backend local")
        }
        (_, Backend::Mortar, None) => {
            let mut known = Vec::new();
            for v in &cli.known_volumes {
                let id: VolumeId = v
                    .parse()
                    .map_err(|e| anyhow::anyhow!("--known-volume {v:?}: {e}"))?;
                if id.dir.is_some() {
                    anyhow::bail!("--known-volume {v:?} names a PVC, not a volume");
                }
                known.push(id.location);
            }
            Arc::new(MortarResolver::new(
                cli.volfile_server_template.clone(),
                known,
            ))
        }
    };
    let socket = server::socket_path(&cli.endpoint)?;
    if checking_args() {
        return Ok(());
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = server::bind(&socket)?;
        if let Some(addr) = cli.metrics_address {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| anyhow::anyhow!("--metrics-address {addr}: {e}"))?;
            tokio::spawn(mortar_csi::metrics::serve(l));
        }
        tracing::info!(
            driver = mortar_csi::DRIVER_NAME,
            version = mortar_csi::VERSION,
            mode = ?cli.mode,
            socket = %socket.display(),
            node_id = cli.node_id.as_deref().unwrap_or(""),
            "serving"
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            // Mounts are deliberately left alone: pods keep using them, and the next
            // plugin process finds them in the mount table.
            tracing::info!("shutting down; mounts stay in place");
        };
        let services = Services {
            mode: cli.mode,
            resolver,
            default_bytes: cli.default_capacity,
            node,
        };
        server::serve(services, listener, shutdown).await?;
        let _ = std::fs::remove_file(&socket);
        Ok(())
    })
}

async fn shutdown_signal(what: &'static str) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("{what}");
}

/// MORTAR_CHECK_ARGS: the packaging tests run the chart's command lines through this parser
/// and its checks; the process stops before it binds, mounts or creates anything.
fn checking_args() -> bool {
    let check = std::env::var_os("MORTAR_CHECK_ARGS").is_some();
    if check {
        println!("mortar-csi: arguments accepted");
    }
    check
}

/// `--mode mounter`: runs mortar-mount for the node plugin (see `mortar_csi::mounter`).
fn run_mounter(cli: Cli) -> anyhow::Result<()> {
    let socket = server::socket_path(&cli.endpoint)?;
    if checking_args() {
        return Ok(());
    }
    let mount_command = {
        let mut probe = NodeConfig::new("mounter");
        probe.mount_command = cli.mount_command.clone();
        probe.resolve_mount_command().ok_or_else(|| {
            anyhow::anyhow!("mount helper {} not found", cli.mount_command.display())
        })?
    };
    std::fs::create_dir_all(cli.state_dir.join("volumes"))
        .map_err(|e| anyhow::anyhow!("--state-dir {}: {e}", cli.state_dir.display()))?;
    let cfg = mortar_csi::mounter::MounterConfig {
        state_dir: cli.state_dir.clone(),
        mount_command,
        mount_timeout: Duration::from_secs(cli.mount_timeout),
        probe_timeout: Duration::from_secs(10),
        ready_file: cli.ready_file.clone(),
        handover_wait: Duration::from_secs(cli.handover_wait),
    };
    // The FUSE daemons the mount helper leaves are reparented to this process, not to the
    // host's init, when it is not PID 1 (tests, a mounter outside a container): it reaps
    // them and sees which mounts it still holds. SAFETY: a plain prctl.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        mortar_csi::mounter::Mounter::new(cfg)
            .run(
                &socket,
                shutdown_signal("mounter shutting down; mounts stay in place"),
            )
            .await
    })
}
