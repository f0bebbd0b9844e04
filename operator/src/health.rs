//! Asking bricks how they are. Behind a trait so reconciler tests can fake the bricks.

use std::time::Duration;

use futures::future::BoxFuture;
use mortar_common::tls::TlsFiles;
use mortar_proto::Empty;
use mortar_proto::brick_client::BrickClient;

/// What one brick says about itself.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BrickHealth {
    pub brick_id: String,
    pub volume: String,
    pub generation: u64,
    pub up: bool,
    pub heal_pending: u64,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub used_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("brick {address} unreachable: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("brick {address} did not answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
}

pub trait HealthProbe: Send + Sync + 'static {
    /// Ask the brick at `address` (host:port) for its health, giving up after `timeout`.
    /// `tls` is the cluster's own CA and the operator's certificate for it (one operator
    /// serves many clusters, each with its CA); `None` asks in plain TCP.
    fn probe<'a>(
        &'a self,
        address: &'a str,
        tls: Option<&'a TlsFiles>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<BrickHealth, HealthError>>;
}

/// Calls the brick's `Health` RPC over a fresh connection. A fresh connection per probe is
/// deliberate: a cached channel would hide a brick that stopped accepting connections.
#[derive(Clone, Debug, Default)]
pub struct GrpcHealthProbe;

impl HealthProbe for GrpcHealthProbe {
    fn probe<'a>(
        &'a self,
        address: &'a str,
        tls: Option<&'a TlsFiles>,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<BrickHealth, HealthError>> {
        Box::pin(async move {
            let unreachable = |reason: String| HealthError::Unreachable {
                address: address.to_string(),
                reason,
            };
            let call = async {
                // Never the process-wide client identity: it would be one CA for all.
                let endpoint = match tls {
                    Some(t) => mortar_common::tls::brick_endpoint_with(address, Some(&t.client())),
                    None => tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                        .map_err(anyhow::Error::from),
                }
                .map_err(|e| unreachable(e.to_string()))?
                .connect_timeout(timeout)
                .timeout(timeout);
                let channel = endpoint
                    .connect()
                    .await
                    .map_err(|e| unreachable(e.to_string()))?;
                let reply = BrickClient::new(channel)
                    .health(Empty {})
                    .await
                    .map_err(|e| unreachable(e.to_string()))?
                    .into_inner();
                Ok(BrickHealth {
                    brick_id: reply.brick_id,
                    volume: reply.volume,
                    generation: reply.generation,
                    up: reply.up,
                    heal_pending: reply.heal_pending,
                    capacity_bytes: reply.capacity_bytes,
                    free_bytes: reply.free_bytes,
                    used_bytes: reply.used_bytes,
                })
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result,
                Err(_) => Err(HealthError::Timeout {
                    address: address.to_string(),
                    timeout,
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn unreachable_brick_is_an_error_not_a_hang() {
        // Port 1 on loopback: nothing listens there, so the connection is refused at once.
        let err = GrpcHealthProbe
            .probe("127.0.0.1:1", None, Duration::from_secs(2))
            .await
            .unwrap_err();
        assert!(matches!(err, HealthError::Unreachable { .. }), "{err}");
    }
}
