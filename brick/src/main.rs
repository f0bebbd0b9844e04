use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use clap::Parser;
use mortar_brick::service::{BrickService, VolfileState};
use mortar_brick::store::Store;
use mortar_common::telemetry;
use mortar_common::volfile::Volfile;

/// The largest request message a brick decodes (see `budget` for how many at once): the
/// client library's own limit (a library user may write 10 MiB in one call; a mount writes
/// at most 1 MiB).
const MAX_REQUEST: usize = mortar_replication::conn::MAX_MESSAGE;
use tokio::sync::watch;

/// Serves one brick of a Mortar volume: a full copy of the volume under --dir.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// This brick's id in the volfile (stable, never reused).
    #[arg(long)]
    id: String,
    /// Directory holding the brick's copy of the volume.
    #[arg(long)]
    dir: PathBuf,
    /// Address to serve on.
    #[arg(long, default_value = "0.0.0.0:24100")]
    listen: SocketAddr,
    /// The volume description; changes to it are followed.
    #[arg(long)]
    volfile: PathBuf,
    /// Prometheus /metrics address [default: the listen host, port + 1000].
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// A client session without a ping for this long is ended and its locks freed.
    #[arg(long, default_value_t = 10.0)]
    session_timeout: f64,
    /// Seconds between self-heal passes over the heal index (it also runs when a brick
    /// comes back and when a client queues a heal).
    #[arg(long, default_value_t = 10.0)]
    heal_interval: f64,
    /// Self-heal copies at most this many MiB per second (0: no limit).
    #[arg(long, default_value_t = 256)]
    heal_rate_mib: u64,
    /// On SIGTERM, seconds to finish the requests in flight before stopping regardless
    /// (keep it below the pod's terminationGracePeriodSeconds, 60 by default).
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Also log to this file (e.g. under /var/log/mortar).
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Directory with this brick's certificate (`tls.crt`, `tls.key`) and the cluster's CA
    /// (`ca.crt`): only peers with a certificate of that CA are served (mutual TLS).
    #[arg(long, env = "MORTAR_TLS_DIR", conflicts_with = "insecure_plaintext")]
    tls_dir: Option<PathBuf>,
    /// Serve plain TCP, without authentication: anyone who reaches the port owns the volume.
    #[arg(long)]
    insecure_plaintext: bool,
}

fn load_volfile(path: &PathBuf) -> anyhow::Result<VolfileState> {
    let yaml = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("volfile {}: {e}", path.display()))?;
    let vol = Volfile::parse(&yaml).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(VolfileState { yaml, vol })
}

/// How long an inode stays in `.mortar/dirty` after its last change.
const DIRTY_IDLE: Duration = Duration::from_secs(5);

fn main() {
    let args = Args::parse();
    if args.tls_dir.is_none() && !args.insecure_plaintext {
        eprintln!(
            "mortar-brick: no --tls-dir (or MORTAR_TLS_DIR): give the brick its certificate, \
             or pass --insecure-plaintext to serve without authentication"
        );
        std::process::exit(2);
    }
    // MORTAR_CHECK_ARGS: the packaging tests run the operator's brick command line through
    // this parser; stop before touching anything.
    if std::env::var_os("MORTAR_CHECK_ARGS").is_some() {
        println!("mortar-brick: arguments accepted");
        return;
    }
    if let Err(e) = run(args) {
        eprintln!("mortar-brick: {e:#}");
        std::process::exit(1);
    }
}

/// Raises the soft limit on open files to the hard one (containers often start bricks at
/// 1024, which a brick serving many files and connections outgrows) and returns it.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut lim = getrlimit(Resource::Nofile);
    let before = lim.current;
    if lim.current != lim.maximum {
        lim.current = lim.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, lim) {
            tracing::warn!("cannot raise the open-file limit from {before:?}: {e}");
            lim.current = before;
        }
    }
    // `None` is "unlimited"; the kernel's nr_open bounds it anyway.
    let n = lim.current.unwrap_or(1 << 20);
    tracing::info!(from = ?before, "open-file limit {n}");
    n
}

fn run(args: Args) -> anyhow::Result<()> {
    telemetry::init_logging(
        &format!("brick={}", args.id),
        &args.log_level,
        args.log_file.as_deref(),
        false,
    )?;
    anyhow::ensure!(
        args.session_timeout > 0.0,
        "--session-timeout must be positive"
    );
    anyhow::ensure!(args.heal_interval > 0.0, "--heal-interval must be positive");
    let tls = match (&args.tls_dir, args.insecure_plaintext) {
        (Some(dir), _) => Some(mortar_common::tls::TlsFiles::load(dir)?),
        (None, true) => {
            tracing::warn!(
                "INSECURE: serving plain TCP without authentication (--insecure-plaintext): \
                 anyone who reaches {} can read, change and delete the volume",
                args.listen
            );
            None
        }
        (None, false) => unreachable!("checked in main"),
    };
    // The self-heal worker connects to the other bricks as this brick.
    mortar_common::tls::init_client(args.tls_dir.as_deref())?;
    let vf = load_volfile(&args.volfile)?;
    if vf.vol.brick_index(&args.id).is_none() {
        tracing::warn!(volfile = %args.volfile.display(), "brick id {} is not in the volfile (yet)", args.id);
    }
    // Modes come from clients exactly; the brick's own umask must not change them.
    rustix::process::umask(rustix::fs::Mode::empty());
    let store = Arc::new(Store::open(&args.dir)?);
    store.set_fd_budget(raise_fd_limit());
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let (vtx, vrx) = watch::channel(vf);
        tokio::spawn(follow_volfile(args.volfile.clone(), vtx));
        let svc = Arc::new(BrickService::new(args.id.clone(), store.clone(), vrx, Duration::from_secs_f64(args.session_timeout), tls.is_some()));
        let stopper = svc.stopper();
        let grace = Duration::from_secs_f64(args.shutdown_grace);
        let metrics_addr = args.metrics.unwrap_or_else(|| {
            let mut a = args.listen;
            a.set_port(a.port().saturating_add(1000));
            a
        });
        let heal_metrics = Arc::new(mortar_brick::heal::HealMetrics::default());
        tokio::spawn(
            mortar_brick::heal::Worker {
                store: store.clone(),
                brick_id: args.id.clone(),
                volfile: svc.volfile.clone(),
                wake: svc.heal_wake.clone(),
                interval: Duration::from_secs_f64(args.heal_interval),
                rate: args.heal_rate_mib << 20,
                metrics: heal_metrics.clone(),
                local: {
                    let step_svc = svc.clone();
                    let splice_svc = svc.clone();
                    mortar_replication::volume::LocalSteps {
                        step: Arc::new(move |req| {
                            let svc = step_svc.clone();
                            Box::pin(async move {
                                use mortar_proto::brick_server::Brick;
                                let mut req = tonic::Request::new(req);
                                req.extensions_mut().insert(mortar_brick::service::InProcess);
                                svc.heal(req).await.map(|r| r.into_inner())
                            })
                        }),
                        // Bulk reads exist only between plain-TCP bricks (`mortar_common::bulk`).
                        splice: tls.is_none().then(|| -> Arc<mortar_replication::volume::LocalSpliceFn> {
                            Arc::new(move |session, g, offset, n, from| {
                                splice_svc.heal_splice(session, g, offset, n, from)
                            })
                        }),
                    }
                },
            }
            .run(),
        );
        // Entries of `.mortar/dirty` whose changes finished go after a few idle seconds, so
        // that a restart has few to look at (see `Store::recover_dirty`).
        let sweep = store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(DIRTY_IDLE).await;
                let s = sweep.clone();
                let _ = tokio::task::spawn_blocking(move || s.sweep_dirty(DIRTY_IDLE)).await;
            }
        });
        let rpcs = Arc::new(telemetry::RpcStats::new("mortar_brick", &[("brick", &args.id)]));
        let rpc_text = rpcs.clone();
        let leases = svc.leases.clone();
        let hm = heal_metrics.clone();
        let m = svc.metrics.clone();
        let st = store.clone();
        let id = args.id.clone();
        telemetry::serve_metrics(
            metrics_addr,
            Arc::new(move || {
                let mut out = String::new();
                let l = |n: &str| format!("{n}{{brick=\"{id}\"}}");
                telemetry::metric(&mut out, &l("mortar_brick_reads_total"), "counter", "Read requests served", m.reads.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_read_bytes_total"), "counter", "Bytes read", m.read_bytes.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_bulk_read_bytes_total"), "counter", "Bytes read on bulk connections (heals of a plain-TCP cluster)", m.bulk_bytes.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_mutations_total"), "counter", "Mutations applied or refused", m.mutations.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_written_bytes_total"), "counter", "Bytes written", m.written_bytes.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_stale_total"), "counter", "Mutations refused because this copy was behind", m.stale.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_lock_waits_total"), "counter", "Lock requests that had to wait", m.lock_waits.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_sessions_ended_total"), "counter", "Client sessions ended", m.sessions_ended.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_heal_pending"), "gauge", "Inodes in the heal index", st.heal_count());
                telemetry::metric(&mut out, &l("mortar_brick_dirty_inodes"), "gauge", "Inodes changed lately, tracked in case the brick stops mid-change", st.dirty_count());
                telemetry::metric(&mut out, &l("mortar_brick_healed_total"), "counter", "Inodes healed by this brick's worker", hm.healed.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_healed_bytes_total"), "counter", "Bytes copied by self-heal", hm.bytes.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_heal_failures_total"), "counter", "Heals deferred after an error", hm.failures.load(Relaxed));
                telemetry::metric(&mut out, &l("mortar_brick_leases"), "gauge", "Leases clients hold on this brick's inodes", leases.count());
                out.push_str(&rpc_text.render());
                out
            }),
        )
        .await
        .map_err(|e| anyhow::anyhow!("metrics on {metrics_addr}: {e}"))?;
        tracing::info!(dir = %store.root().display(), listen = %args.listen, metrics = %metrics_addr, "brick serving");
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = &tls {
            server = server.tls_config(tls.server())?;
        }
        let router = server
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(2)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            // As wide as the clients' windows: a 1 MiB write (a heal's block) should not
            // wait for window updates.
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20))
            .layer(mortar_brick::rpcstats::RpcLayer(rpcs))
            .layer(mortar_brick::budget::Budgets::new(mortar_brick::budget::PER_CONNECTION))
            .add_service(mortar_proto::brick_server::BrickServer::from_arc(svc.clone()).max_decoding_message_size(MAX_REQUEST).max_encoding_message_size(64 << 20));
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
            tracing::info!(grace = ?grace, "stopping: ending sessions, finishing requests in flight");
            // Session streams end now; the server stops once every request in flight
            // has its answer. A request stuck past the grace period does not hold the
            // brick: it syncs what it has and goes.
            let _ = stopper.send(true);
            let root = store.root().to_path_buf();
            tokio::spawn(async move {
                tokio::time::sleep(grace).await;
                tracing::warn!("requests still in flight after {grace:?}; stopping anyway");
                sync_brick(&root);
                std::process::exit(0);
            });
        };
        if tls.is_some() {
            router.serve_with_shutdown(args.listen, shutdown).await
        } else {
            // Plain TCP: heals copy file data on bulk connections of the same port
            // (`mortar_common::bulk`).
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen))?;
            let incoming = mortar_brick::bulk::split(listener, store.clone(), svc.metrics.clone());
            router.serve_with_incoming_shutdown(incoming, shutdown).await
        }
            .map_err(|e| anyhow::anyhow!("serving on {}: {e}", args.listen))?;
        sync_brick(store.root());
        tracing::info!("stopped");
        Ok(())
    })
}

/// Flushes the brick's filesystem (data, records, the gfid index, the heal index) to disk.
fn sync_brick(root: &std::path::Path) {
    match std::fs::File::open(root) {
        Ok(f) => {
            if let Err(e) = rustix::fs::syncfs(&f) {
                tracing::error!("syncfs: {e}");
            }
        }
        Err(e) => tracing::error!("syncfs: {e}"),
    }
}

/// Re-reads the volfile when it changes; a newer generation replaces the current one.
async fn follow_volfile(path: PathBuf, tx: watch::Sender<VolfileState>) {
    let mut last = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let m = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if m == last {
            continue;
        }
        last = m;
        match load_volfile(&path) {
            Ok(v) if v.vol.generation > tx.borrow().vol.generation => {
                tracing::info!(
                    generation = v.vol.generation,
                    bricks = v.vol.bricks.len(),
                    "following new volfile"
                );
                let _ = tx.send(v);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("ignoring changed volfile: {e:#}"),
        }
    }
}
