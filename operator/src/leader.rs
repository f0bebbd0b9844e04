//! Leader election on a coordination.k8s.io Lease, so several operator replicas can run and
//! only one of them reconciles.

use kube::Client;
use kube_lease_manager::{LeaseManager, LeaseManagerBuilder, LeaseManagerError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long a leader's claim lasts without renewal, in seconds. Short enough that a crashed
/// leader is replaced quickly, long enough to ride out a slow API server.
pub const LEASE_SECONDS: u64 = 15;
/// The leader renews this long before its claim runs out.
pub const GRACE_SECONDS: u64 = 5;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
}

/// This replica's standing in the election, kept up to date by a background task.
pub struct Leadership {
    state: watch::Receiver<bool>,
    task: JoinHandle<Result<LeaseManager, LeaseManagerError>>,
}

impl Leadership {
    /// Start taking part in the election (creating the Lease if needed).
    pub async fn join(client: Client, config: &LeaseConfig) -> Result<Self, LeaseManagerError> {
        let manager = LeaseManagerBuilder::new(client, &config.name)
            .with_namespace(&config.namespace)
            .with_identity(&config.identity)
            .with_duration(LEASE_SECONDS)
            .with_grace(GRACE_SECONDS)
            .build()
            .await?;
        let (state, task) = manager.watch().await;
        Ok(Self { state, task })
    }

    pub fn is_leader(&self) -> bool {
        *self.state.borrow()
    }

    /// Wait until this replica holds the Lease. Errs when the election task ended.
    pub async fn acquired(&mut self) -> Result<(), watch::error::RecvError> {
        while !*self.state.borrow_and_update() {
            self.state.changed().await?;
        }
        Ok(())
    }

    /// Wait until this replica no longer holds the Lease (or the election task ended).
    pub async fn lost(&mut self) {
        loop {
            if self.state.changed().await.is_err() || !*self.state.borrow_and_update() {
                return;
            }
        }
    }

    /// Give the Lease up so another replica can take over at once instead of after it expires.
    pub async fn release(self) {
        drop(self.state);
        match self.task.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader lease"),
            Err(e) => tracing::warn!(error = %e, "leader election task failed"),
        }
    }
}
