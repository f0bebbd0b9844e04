//! The brick's self-heal worker: works through this brick's heal index, healing each inode
//! across all bricks with the client library (as any client would, under inode locks).
//! It runs when something is queued, when a brick (re)connects, and every `interval`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mortar_common::gfid::Gfid;
use mortar_replication::heal::Source;
use mortar_replication::volume::{Options, Volume};
use tokio::sync::{Notify, watch};

use crate::service::VolfileState;
use crate::store::Store;

#[derive(Default)]
pub struct HealMetrics {
    pub healed: AtomicU64,
    pub bytes: AtomicU64,
    pub failures: AtomicU64,
    pub passes: AtomicU64,
}

/// Heal index entries worked on at once.
const PARALLEL: usize = 8;

pub struct Worker {
    pub store: Arc<Store>,
    pub brick_id: String,
    pub volfile: watch::Receiver<VolfileState>,
    pub wake: Arc<Notify>,
    pub interval: Duration,
    /// Copy at most this many bytes per second, so client I/O keeps flowing.
    pub rate: u64,
    pub metrics: Arc<HealMetrics>,
    /// This brick's own `Heal` RPC, called in-process (see `Options::local`).
    pub local: mortar_replication::volume::LocalSteps,
}

impl Worker {
    pub async fn run(self) {
        let vol = loop {
            // The brick's own volfile, not one fetched from a peer: a peer may not serve the
            // generation that added this brick yet.
            let vf = self.volfile.borrow().vol.clone();
            let opts = Options {
                client_name: format!("self-heal@{}", self.brick_id),
                local: Some((self.brick_id.clone(), self.local.clone())),
                ..Options::default()
            };
            match Volume::with_volfile(vf, opts).await {
                Ok(v) => break v,
                Err(e) => {
                    tracing::debug!("self-heal waits for the volume: {e}");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
        };
        vol.set_heal_rate(self.rate);
        // Whatever is indexed already (a wiped brick's root, changes from before a restart)
        // is healed at once: the bricks' "up" events of the connect itself are past.
        self.pass(&vol).await;
        loop {
            let up = vol.brick_up.notified();
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = up => {}
                // Jittered, so that the bricks' workers do not keep meeting on the same inodes.
                _ = tokio::time::sleep(self.interval.mul_f64(0.75 + (mortar_common::gfid::rand_u64() % 500) as f64 / 1000.0)) => {}
            }
            self.pass(&vol).await;
        }
    }

    /// Whether every brick of this brick's volfile serves its generation or a newer one.
    async fn settled(&self, vol: &Volume) -> bool {
        let vf = self.volfile.borrow().vol.clone();
        let seen = vol.generations().await;
        let behind: Vec<&str> = vf
            .bricks
            .iter()
            .filter(|b| {
                !seen
                    .iter()
                    .any(|(id, g)| *id == b.id && g.is_some_and(|g| g >= vf.generation))
            })
            .map(|b| b.id.as_str())
            .collect();
        if !behind.is_empty() {
            tracing::debug!(
                ?behind,
                generation = vf.generation,
                "the after-join crawl waits for these bricks to serve the volfile"
            );
        }
        behind.is_empty()
    }

    /// One walk through the heal index.
    async fn pass(&self, vol: &Volume) {
        // A joining brick's after-join crawl (see `Store::joining`) is a heal of the root
        // begun in a pass that starts after every brick has the volfile that added it.
        let crawl = self.store.joining() && self.settled(vol).await;
        if crawl {
            self.store.mark_heal(Gfid::ROOT);
        }
        self.walk(vol).await;
        if crawl && !self.store.heal_pending().contains(&Gfid::ROOT) {
            tracing::info!("after-join crawl done: every change this brick missed is indexed");
            self.store.joined();
        }
    }

    async fn walk(&self, vol: &Volume) {
        let mut pending = self.store.heal_pending();
        if pending.is_empty() {
            return;
        }
        self.metrics.passes.fetch_add(1, Relaxed);
        let start = Instant::now();
        let (mut healed, mut bytes, mut left) = (0u64, 0u64, 0usize);
        pending.retain(|g| !self.store.is_split(*g));
        // Split brain waits for `mortar heal resolve`.
        left += self.store.heal_count() - pending.len();
        // Several bricks index the same inodes and heal with non-blocking locks: each brick
        // starts its walk at a different point of the index, so that they spread out rather
        // than keep meeting on the same inodes.
        let bricks = vol.volfile().bricks.len().max(1) as u64;
        let me = vol.volfile().brick_index(&self.brick_id).unwrap_or(0) as u64;
        let offset = me * (u64::MAX / bricks);
        pending
            .sort_by_key(|g| u64::from_le_bytes(g.0[8..].try_into().unwrap()).wrapping_sub(offset));
        let mut results = futures::stream::iter(pending)
            .map(|g| async move { (g, vol.heal(g, Source::Newest).await) })
            .buffer_unordered(PARALLEL);
        while let Some((g, r)) = results.next().await {
            match r {
                Ok(s) => {
                    healed += s.healed;
                    bytes += s.bytes;
                    if !s.complete {
                        left += 1;
                    }
                    for c in s.failed {
                        self.store.mark_heal(c);
                    }
                }
                Err(mortar_common::error::Error::Busy) => {
                    left += 1;
                    tracing::debug!(gfid = %g, "heal deferred: busy");
                }
                Err(e) => {
                    left += 1;
                    self.metrics.failures.fetch_add(1, Relaxed);
                    tracing::info!(gfid = %g, "heal deferred: {e}");
                }
            }
        }
        self.metrics.healed.fetch_add(healed, Relaxed);
        self.metrics.bytes.fetch_add(bytes, Relaxed);
        if healed > 0 {
            let secs = start.elapsed().as_secs_f64();
            tracing::info!(
                inodes = healed,
                bytes,
                left,
                seconds = format!("{secs:.2}"),
                mib_per_s = format!("{:.1}", bytes as f64 / 1048576.0 / secs.max(1e-6)),
                "self-heal pass"
            );
        }
    }
}
