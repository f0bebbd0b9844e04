//! `mortar-operator`: runs the SharedStorageCluster controller, or prints the CRD.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kube::Client;
use mortar_operator::controller::{self, Context};
use mortar_operator::crd;
use mortar_operator::health::GrpcHealthProbe;
use mortar_operator::leader::{Leadership, LeaseConfig};
use mortar_operator::metrics::{self, Metrics};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "mortar-operator",
    version,
    about = "Mortar operator: SharedStorageCluster controller",
    // `mortar-operator --metrics-addr X` and `mortar-operator run --metrics-addr X` are the
    // same: the run flags belong to `run`, and to the bare command as its default.
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Log filter (error, warn, info, debug, trace, or a tracing directive).
    #[arg(long, global = true, default_value = "info", env = "MORTAR_LOG_LEVEL")]
    log_level: String,

    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinition YAML.
    Crd,
    /// Run the controller (the default).
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address of the /metrics and /healthz endpoint.
    #[arg(long, default_value = "0.0.0.0:8080", env = "MORTAR_METRICS_ADDR")]
    metrics_addr: SocketAddr,

    /// Brick image for clusters whose spec names none.
    #[arg(long, default_value = concat!("mortar:", env!("CARGO_PKG_VERSION")), env = "MORTAR_BRICK_IMAGE")]
    brick_image: String,

    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "MORTAR_WATCH_NAMESPACE")]
    watch_namespace: Option<String>,

    /// Run without a leader lease (only with a single replica).
    #[arg(long)]
    disable_leader_election: bool,

    /// Namespace of the leader Lease; defaults to the operator's own namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(long, default_value = "mortar-operator-leader")]
    lease_name: String,

    /// This replica's identity in the Lease; defaults to the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Crd) => {
            print!("{}", crd::crd_yaml());
            return ExitCode::SUCCESS;
        }
        Some(Command::Run(args)) => args,
        None => cli.run,
    };
    // MORTAR_CHECK_ARGS: the packaging tests run the chart's command lines through this
    // parser; stop before touching anything.
    if std::env::var_os("MORTAR_CHECK_ARGS").is_some() {
        println!("mortar-operator: arguments accepted");
        return ExitCode::SUCCESS;
    }
    if let Err(e) = mortar_common::telemetry::init_json_logging(&cli.log_level) {
        eprintln!("mortar-operator: {e}");
        return ExitCode::from(2);
    }
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "exiting");
            eprintln!("mortar-operator: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The namespace of the service account the operator runs as, where its Lease belongs.
fn own_namespace() -> String {
    std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        .map(|ns| ns.trim().to_string())
        .unwrap_or_else(|_| "default".to_string())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Joins the leader election, retrying while the API server cannot be reached (it may still
/// be starting, or a network policy may be settling): the process stays up and says why.
async fn join_until_reachable(client: Client, lease: &LeaseConfig) -> Leadership {
    let mut delay = std::time::Duration::from_secs(1);
    loop {
        match Leadership::join(client.clone(), lease).await {
            Ok(l) => return l,
            Err(e) => {
                warn!(error = %e, retry_in = ?delay, "cannot join the leader election");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    // /healthz first: it says the process is alive, whether or not the API server answers
    // yet, so a slow control plane does not turn into a crash loop.
    let metrics = Arc::new(Metrics::new());
    let listener = tokio::net::TcpListener::bind(args.metrics_addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {}: {e}", args.metrics_addr))?;
    info!(addr = %args.metrics_addr, "serving /metrics and /healthz");
    let server = tokio::spawn(metrics::serve_on(listener, metrics.clone()));
    let client = Client::try_default().await?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("mortar-operator-{}", std::process::id()))
    });

    let ctx = Arc::new(Context::new(
        client.clone(),
        Arc::new(GrpcHealthProbe),
        metrics.clone(),
        args.brick_image.clone(),
        Some(identity.clone()),
    ));

    if args.disable_leader_election {
        metrics.set_leader(true);
        info!("leader election disabled; running the controller");
        controller::run(ctx, args.watch_namespace).await;
        server.abort();
        return Ok(());
    }

    let lease = LeaseConfig {
        namespace: args.lease_namespace.clone().unwrap_or_else(own_namespace),
        name: args.lease_name.clone(),
        identity: identity.clone(),
    };
    let mut leadership = tokio::select! {
        joined = join_until_reachable(client, &lease) => joined,
        () = shutdown_signal() => {
            server.abort();
            return Ok(());
        }
    };
    info!(lease = %lease.name, namespace = %lease.namespace, %identity, "waiting for leadership");
    tokio::select! {
        acquired = leadership.acquired() => acquired?,
        () = shutdown_signal() => {
            info!("stopping before becoming leader");
            leadership.release().await;
            server.abort();
            return Ok(());
        }
    }
    metrics.set_leader(true);
    info!("became leader; running the controller");

    // Losing the lease ends the process: a replica that is no longer leader must stop writing
    // at once, and a restart is the simplest way to guarantee nothing of it keeps running.
    let outcome = tokio::select! {
        () = controller::run(ctx, args.watch_namespace) => Ok(()),
        () = leadership.lost() => {
            metrics.set_leader(false);
            warn!("lost the leader lease");
            Err(anyhow::anyhow!("lost the leader lease"))
        }
    };
    if outcome.is_ok() {
        info!("controller stopped; releasing the lease");
        leadership.release().await;
    }
    server.abort();
    outcome
}
