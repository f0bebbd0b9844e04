//! `mortar-operator`: runs the SharedStorageCluster controller, or prints the CRD.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use kube::Client;
use kube_lease_manager::LeaseManagerBuilder;
use mortar_operator::controller::{self, Context};
use mortar_operator::crd;
use mortar_operator::health::GrpcHealthProbe;
use mortar_operator::metrics::{self, Metrics};
use tracing::{error, info, warn};

#[derive(Parser, Debug)]
#[command(
    name = "mortar-operator",
    version,
    about = "Mortar operator: SharedStorageCluster controller"
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
    Run,
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

    /// Namespace of the leader Lease; defaults to the pod's namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,

    #[arg(long, default_value = "mortar-operator-leader")]
    lease_name: String,

    /// This replica's identity in the Lease; defaults to the pod name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
}

fn init_logging(level: &str) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| format!("invalid --log-level {level:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .json()
        .init();
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        print!("{}", crd::crd_yaml());
        return ExitCode::SUCCESS;
    }
    if let Err(e) = init_logging(&cli.log_level) {
        eprintln!("mortar-operator: {e}");
        return ExitCode::from(2);
    }
    match run(cli.run).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!(error = format!("{e:#}"), "exiting");
            eprintln!("mortar-operator: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await?;
    let metrics = Arc::new(Metrics::new());
    let identity = args.identity.clone().unwrap_or_else(|| {
        std::env::var("HOSTNAME")
            .unwrap_or_else(|_| format!("mortar-operator-{}", std::process::id()))
    });

    let server = tokio::spawn(metrics::serve(args.metrics_addr, metrics.clone()));
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

    let manager = LeaseManagerBuilder::new(client, &args.lease_name)
        .with_namespace(&args.lease_namespace)
        .with_identity(&identity)
        .with_duration(15)
        .with_grace(5)
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    info!(lease = %args.lease_name, namespace = %args.lease_namespace, %identity, "waiting for leadership");
    while !*leader.borrow_and_update() {
        leader.changed().await?;
    }
    metrics.set_leader(true);
    info!("became leader; running the controller");

    // Losing the lease ends the process: a replica that is no longer leader must stop writing
    // at once, and a restart is the simplest way to guarantee that nothing is left running.
    let lost = async {
        loop {
            if leader.changed().await.is_err() || !*leader.borrow_and_update() {
                return;
            }
        }
    };
    let outcome = tokio::select! {
        () = controller::run(ctx, args.watch_namespace) => Ok(()),
        () = lost => {
            metrics.set_leader(false);
            warn!("lost the leader lease");
            Err(anyhow::anyhow!("lost the leader lease"))
        }
    };
    if outcome.is_ok() {
        info!("controller stopped; releasing the lease");
        // Closing the channel makes the lease task release the lease for the next replica.
        drop(leader);
        let _ = lease_task.await;
    }
    server.abort();
    outcome
}
