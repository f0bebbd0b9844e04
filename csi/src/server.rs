//! Serving the CSI services on a unix socket.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::controller::ControllerService;
use crate::csi::controller_server::ControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::identity::{IdentityService, NotReady, ReadyCheck};
use crate::node::{NodeConfig, NodeService};
use crate::ops::VolumeResolver;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity + controller (one replica per cluster, next to the provisioner/resizer sidecars).
    Controller,
    /// Identity + node (a DaemonSet, one per node).
    Node,
    /// All three services in one process, for single-host trials and tests.
    All,
    /// No CSI service: runs `mortar-mount` for the node plugin, in a container of its own
    /// (see `mounter`), so FUSE daemons outlive node plugin restarts.
    Mounter,
}

/// The socket path of a `unix://` endpoint (`unix:///csi/csi.sock`, `unix:/x`, or a
/// bare path).
pub fn socket_path(endpoint: &str) -> anyhow::Result<PathBuf> {
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        rest
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if endpoint.contains("://") {
        anyhow::bail!("endpoint {endpoint:?} is not a unix socket (want unix:///path)");
    } else {
        endpoint
    };
    if path.is_empty() {
        anyhow::bail!("endpoint {endpoint:?} has no socket path");
    }
    Ok(PathBuf::from(path))
}

/// Binds the socket, replacing a stale one left by an earlier process (the usual case
/// after a restart: kubelet and the sidecars reconnect to the same path).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => anyhow::bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    UnixListener::bind(path).map_err(|e| anyhow::anyhow!("binding {}: {e}", path.display()))
}

pub struct Services {
    pub mode: Mode,
    pub resolver: Arc<dyn VolumeResolver>,
    pub default_bytes: u64,
    pub node: Option<NodeConfig>,
}

/// Serves until `shutdown` resolves.
pub async fn serve(
    services: Services,
    listener: UnixListener,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let controller = matches!(services.mode, Mode::Controller | Mode::All);
    let node = matches!(services.mode, Mode::Node | Mode::All);
    let node_cfg = if node {
        Some(
            services
                .node
                .clone()
                .ok_or_else(|| anyhow::anyhow!("node mode needs a node configuration"))?,
        )
    } else {
        None
    };
    let resolver = services.resolver.clone();
    let ready_node = node_cfg.clone();
    let ready: ReadyCheck = Arc::new(move || {
        if controller && !resolver.ready() {
            return Err(NotReady::Missing("no volume backend configured".into()));
        }
        if let Some(cfg) = &ready_node {
            cfg.ready()?;
        }
        Ok(())
    });
    let mut router =
        Server::builder().add_service(IdentityServer::new(IdentityService::new(ready)));
    if controller {
        router = router.add_service(ControllerServer::new(ControllerService::new(
            services.resolver.clone(),
            services.default_bytes,
        )));
    }
    if let Some(cfg) = node_cfg {
        router = router.add_service(NodeServer::new(NodeService::new(cfg)));
    }
    router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    Ok(())
}
