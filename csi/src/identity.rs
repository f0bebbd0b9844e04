//! Identity service: who the plugin is, what it can do, and whether it is ready.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability::{self, service, volume_expansion};
use crate::csi::*;
use crate::error::CsiError;
use crate::metrics::observe;

/// Why Probe cannot say "ready". The spec's Probe tells two cases apart: a plugin still
/// initialising answers `ready: false`, one missing a required dependency answers
/// FAILED_PRECONDITION.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Still coming up, e.g. the mounter is not listening yet: the CO asks again later.
    Starting(String),
    /// A required dependency is missing or unusable (no volume backend, no mount helper,
    /// an unusable state directory): it will not fix itself.
    Missing(String),
}

/// Readiness check: Probe must not say "ready" before the service can do its job
/// (controller: a volume backend; node: the mount helper or mounter, and the state
/// directory).
pub type ReadyCheck = Arc<dyn Fn() -> Result<(), NotReady> + Send + Sync>;

pub struct IdentityService {
    ready: ReadyCheck,
}

impl IdentityService {
    pub fn new(ready: ReadyCheck) -> Self {
        IdentityService { ready }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        observe("GetPluginInfo", "", async {
            Ok(GetPluginInfoResponse {
                name: crate::DRIVER_NAME.to_string(),
                vendor_version: crate::VERSION.to_string(),
                manifest: Default::default(),
            })
        })
        .await
    }

    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        observe("GetPluginCapabilities", "", async {
            // Reported by both modes: the sidecars ask whichever plugin they sit next to.
            // VOLUME_ACCESSIBILITY_CONSTRAINTS only so that nodes may report their topology
            // key (NodeGetInfo); volumes carry no topology: one is reachable from every node.
            let service = |t: service::Type| PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service { r#type: t as i32 },
                )),
            };
            let expansion = PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(
                    plugin_capability::VolumeExpansion {
                        // A quota change applies to a mounted PVC at once.
                        r#type: volume_expansion::Type::Online as i32,
                    },
                )),
            };
            Ok(GetPluginCapabilitiesResponse {
                capabilities: vec![
                    service(service::Type::ControllerService),
                    service(service::Type::VolumeAccessibilityConstraints),
                    expansion,
                ],
            })
        })
        .await
    }

    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = self.ready.clone();
        observe("Probe", "", async move {
            match ready() {
                Ok(()) => Ok(ProbeResponse { ready: Some(true) }),
                Err(NotReady::Starting(why)) => {
                    tracing::warn!(why, "not ready yet");
                    Ok(ProbeResponse { ready: Some(false) })
                }
                // Spec, Probe errors: "Missing required dependency" is FAILED_PRECONDITION.
                Err(NotReady::Missing(why)) => Err(CsiError::FailedPrecondition(why)),
            }
        })
        .await
    }
}
