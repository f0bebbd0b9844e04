//! The volume and its members: the volfile (and following its changes), the bricks'
//! connections, and the quorum they make.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::future::join_all;
use mortar_common::error::{Error, Result};
use mortar_common::gfid::Gfid;
use mortar_common::volfile::{Volfile, with_default_port};
use mortar_proto as pb;
use tokio::sync::{Notify, mpsc};

use crate::conn::{self, Brick, Event};
use crate::txn::InodeTx;
use std::sync::atomic::Ordering::Relaxed;
/// The ping timeout when neither the caller nor the volfile sets one.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct Options {
    /// How long a brick may stay silent before it is dropped. `None`: the volfile's
    /// `ping-timeout`, else `DEFAULT_PING_TIMEOUT` (see `effective_ping_timeout`).
    pub ping_timeout: Option<Duration>,
    /// Give up an inode lock this long after its last use.
    pub lock_idle: Duration,
    pub client_name: String,
    /// The brick this client runs in (its self-heal worker), with a way to hand it heal
    /// steps in-process: a heal's data then crosses no port of its own brick.
    pub local: Option<(String, LocalSteps)>,
    /// Client TLS for this volume's bricks (a cluster's own CA and certificate, when one
    /// process serves several clusters); `None`: the process's (`mortar_common::tls`).
    pub tls: Option<Arc<tonic::transport::ClientTlsConfig>>,
    /// Cache attributes, entries and small files under the bricks' leases (a mount does;
    /// tools that must see the bricks as they are do not).
    pub leases: bool,
    /// The mount this client serves, named the same by each process that serves it in turn
    /// (see `Hello.family`): a successor takes over the POSIX locks of the one before.
    pub family: Option<[u8; 16]>,
}

/// Takes a heal request as the brick's `Heal` RPC would, without the network; and, on a
/// plain-TCP cluster, a block's data straight from a bulk connection (`splice`).
#[derive(Clone)]
pub struct LocalSteps {
    pub step: Arc<LocalStepFn>,
    pub splice: Option<Arc<LocalSpliceFn>>,
}

type LocalStepFn = dyn Fn(
        mortar_proto::HealReq,
    ) -> futures::future::BoxFuture<
        'static,
        std::result::Result<mortar_proto::MutateReply, tonic::Status>,
    > + Send
    + Sync;

/// `(session, gfid, offset, n, socket)`: writes the next `n` bytes the socket brings at
/// `offset` of the local copy, as a heal `Write` step of that session (which must hold the
/// inode's lock); an errno otherwise. Blocking.
pub type LocalSpliceFn = dyn Fn(
        &[u8],
        mortar_common::gfid::Gfid,
        u64,
        u32,
        std::os::fd::BorrowedFd<'_>,
    ) -> std::result::Result<(), i32>
    + Send
    + Sync;

impl std::fmt::Debug for LocalSteps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LocalSteps")
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ping_timeout: None,
            lock_idle: Duration::from_millis(500),
            client_name: format!("mortar-client@{}", std::process::id()),
            local: None,
            tls: None,
            leases: false,
            family: None,
        }
    }
}

impl Options {
    fn local_steps(&self, brick: &str) -> Option<LocalSteps> {
        self.local
            .as_ref()
            .filter(|(id, _)| id == brick)
            .map(|(_, s)| s.clone())
    }

    /// The ping timeout in force: ours if set, else the volfile's `ping-timeout`, else
    /// `DEFAULT_PING_TIMEOUT`. Before the volfile is known (while fetching it), pass `None`.
    pub fn effective_ping_timeout(&self, volfile: Option<&Volfile>) -> Duration {
        self.ping_timeout
            .or_else(|| volfile.and_then(Volfile::ping_timeout))
            .unwrap_or(DEFAULT_PING_TIMEOUT)
    }
}

#[derive(Default)]
pub struct Stats {
    /// Inodes a mount's kernel holds references to (set by the FUSE layer).
    pub inodes: AtomicU64,
    pub mutations: AtomicU64,
    pub lock_acquisitions: AtomicU64,
    pub lock_releases: AtomicU64,
    pub reads: AtomicU64,
    pub failovers: AtomicU64,
}

pub struct Volume {
    pub name: String,
    pub(crate) vol: RwLock<Volfile>,
    pub(crate) bricks: RwLock<Vec<Arc<Brick>>>,
    pub(crate) inodes: Mutex<HashMap<Gfid, Arc<InodeTx>>>,
    /// Bricks last seen holding the newest copy of an inode.
    pub(crate) readable: Mutex<HashMap<Gfid, Vec<String>>>,
    pub(crate) heal_queued: Mutex<HashMap<Gfid, Instant>>,
    /// The bricks refused this client a heal step (a mount's certificate): it leaves
    /// healing to them.
    pub(crate) heal_denied: std::sync::atomic::AtomicBool,
    pub(crate) heal_bucket: Mutex<crate::heal::Bucket>,
    pub(crate) term_clock: AtomicU64,
    pub(crate) opts: Options,
    /// The effective ping timeout (`Options::effective_ping_timeout` of the current volfile).
    pub(crate) ping_timeout: RwLock<Duration>,
    pub(crate) wake_releaser: Notify,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub stats: Stats,
    /// Fires whenever a brick (re)connects: a brick back from away may need healing.
    pub brick_up: Notify,
    /// What is cached under leases (`Options::leases`).
    pub(crate) cache: Option<Arc<crate::lease::Cache>>,
    /// Told of every inode whose lease a brick recalled (the FUSE layer drops the kernel's
    /// caches of it).
    pub on_recall: std::sync::OnceLock<Box<dyn Fn(Gfid) + Send + Sync>>,
}
/// Where the effective ping timeout comes from, for the logs.
fn ping_timeout_source(opts: &Options, vf: &Volfile) -> &'static str {
    match (opts.ping_timeout, vf.ping_timeout) {
        (Some(_), _) => "option",
        (None, Some(_)) => "volfile",
        (None, None) => "default",
    }
}

/// Fetches the volfile from the first server that answers.
pub async fn fetch_volfile(servers: &[String], volume: &str, timeout: Duration) -> Result<Volfile> {
    fetch_volfile_with(servers, volume, timeout, None).await
}

/// [`fetch_volfile`] with client TLS `tls`, or this process's when `None`.
pub async fn fetch_volfile_with(
    servers: &[String],
    volume: &str,
    timeout: Duration,
    tls: Option<&tonic::transport::ClientTlsConfig>,
) -> Result<Volfile> {
    let mut errors = Vec::new();
    for s in servers {
        let addr = with_default_port(s);
        match conn::connect_once_with(&addr, timeout, tls).await {
            Ok(mut c) => match tokio::time::timeout(timeout, c.get_volfile(pb::Empty {})).await {
                Ok(Ok(r)) => {
                    let v = Volfile::parse(&r.into_inner().yaml)
                        .map_err(|e| Error::Volfile(format!("from {addr}: {e}")))?;
                    if v.volume != volume {
                        return Err(Error::Volfile(format!(
                            "{addr} serves volume {:?}, not {volume:?}",
                            v.volume
                        )));
                    }
                    return Ok(v);
                }
                Ok(Err(e)) => errors.push(format!("{addr}: {}", e.message())),
                Err(_) => errors.push(format!("{addr}: timed out")),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(Error::Volfile(format!(
        "no volfile server answered ({})",
        errors.join("; ")
    )))
}

impl Volume {
    /// Connects to every brick of the volume described by the first reachable server.
    pub async fn connect(servers: &[String], volume: &str, opts: Options) -> Result<Arc<Volume>> {
        let vf = fetch_volfile_with(
            servers,
            volume,
            opts.effective_ping_timeout(None),
            opts.tls.as_deref(),
        )
        .await?;
        Self::with_volfile(vf, opts).await
    }

    /// Connects to every brick of the volume this volfile describes.
    pub async fn with_volfile(vf: Volfile, opts: Options) -> Result<Arc<Volume>> {
        let volume = vf.volume.clone();
        let ping_timeout = opts.effective_ping_timeout(Some(&vf));
        tracing::debug!(
            ping_timeout = ?ping_timeout,
            from = ping_timeout_source(&opts, &vf),
            "volume {volume}: volfile generation {}, {} bricks",
            vf.generation,
            vf.bricks.len()
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let cache = opts.leases.then(Arc::default);
        let bricks = vf
            .bricks
            .iter()
            .map(|b| {
                Brick::start(
                    b.id.clone(),
                    b.address.clone(),
                    ping_timeout,
                    opts.client_name.clone(),
                    tx.clone(),
                    opts.local_steps(&b.id),
                    opts.tls.clone(),
                    cache.clone(),
                    opts.family,
                )
            })
            .collect();
        let v = Arc::new(Volume {
            name: volume,
            vol: RwLock::new(vf),
            bricks: RwLock::new(bricks),
            inodes: Mutex::default(),
            readable: Mutex::default(),
            heal_queued: Mutex::default(),
            heal_denied: Default::default(),
            heal_bucket: Mutex::default(),
            term_clock: AtomicU64::new(0),
            opts,
            ping_timeout: RwLock::new(ping_timeout),
            wake_releaser: Notify::new(),
            events: tx,
            stats: Stats::default(),
            brick_up: Notify::new(),
            cache,
            on_recall: std::sync::OnceLock::new(),
        });
        tokio::spawn(Self::handle_events(Arc::downgrade(&v), rx));
        tokio::spawn(Self::releaser(Arc::downgrade(&v)));
        // Give every brick one ping timeout to come up; a mount works with any of them.
        let bricks = v.bricks();
        join_all(bricks.iter().map(|b| b.wait_up(ping_timeout))).await;
        if !bricks.iter().any(|b| b.is_up()) {
            return Err(Error::NoQuorum {
                have: 0,
                need: v.quorum(),
            });
        }
        Ok(v)
    }

    pub fn volfile(&self) -> Volfile {
        self.vol.read().unwrap().clone()
    }

    /// The ping timeout in force for this volume's bricks.
    pub fn ping_timeout(&self) -> Duration {
        *self.ping_timeout.read().unwrap()
    }

    /// Where `ping_timeout` comes from: "option" (the caller's, e.g. `-o ping-timeout`), "volfile" or "default".
    pub fn ping_timeout_source(&self) -> &'static str {
        ping_timeout_source(&self.opts, &self.vol.read().unwrap())
    }

    pub fn bricks(&self) -> Vec<Arc<Brick>> {
        self.bricks.read().unwrap().clone()
    }

    pub(crate) fn quorum(&self) -> usize {
        self.vol.read().unwrap().quorum()
    }

    /// Whether leases `from` still count: from a majority of the volume's bricks, each on
    /// the connection that granted it and within its window (see `lease`).
    pub(crate) fn trust(&self) -> impl Fn(&[crate::lease::Grant]) -> bool + use<> {
        let bricks = self.bricks();
        let quorum = self.quorum();
        move |from| {
            from.iter()
                .filter(|(id, e)| bricks.iter().any(|b| &b.id == id && b.lease_trusted(*e)))
                .count()
                >= quorum
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.vol.read().unwrap().bricks.len()
    }

    /// The volfile generation each brick serves now (`None`: it did not answer).
    pub async fn generations(&self) -> Vec<(String, Option<u64>)> {
        let bricks = self.bricks();
        join_all(bricks.iter().map(|b| async move {
            let r = b
                .call(|mut c, _| async move { c.health(pb::Empty {}).await })
                .await;
            (b.id.clone(), r.ok().map(|(h, _)| h.generation))
        }))
        .await
    }

    pub fn up_count(&self) -> usize {
        self.bricks().iter().filter(|b| b.is_up()).count()
    }

    /// A brick says this client holds `g`'s lock and another session waits for it. Our
    /// transaction gives it up soon; but if none of our transactions knows of that lock (a
    /// grant whose answer never came back, say), nothing ever would, and every other
    /// client and healer would wait on the inode for as long as this client lives: give it
    /// back now. Only who holds an inode's transaction takes its locks, so a lock unknown to
    /// a transaction we can enter is one nobody here relies on.
    fn on_contended(self: &Arc<Self>, brick: &str, g: Gfid) {
        let tx = self.tx(g);
        tx.contended.store(true, Relaxed);
        self.wake_releaser.notify_one();
        let Ok(guard) = tx.hold.clone().try_lock_owned() else {
            return;
        };
        let known = guard
            .as_ref()
            .is_some_and(|h| h.locked.iter().any(|m| m.brick.id == brick && m.current()));
        if known {
            return;
        }
        let Some(b) = self.bricks().into_iter().find(|b| b.id == brick) else {
            return;
        };
        let Some(up) = b.up() else { return };
        tracing::info!(brick, gfid = %g, "giving back a lock no transaction of this client knows of");
        let member = crate::txn::Member {
            brick: b,
            epoch: up.epoch,
            session: up.session,
        };
        tokio::spawn(async move {
            // The inode's transaction stays entered until the brick has answered: a lock
            // taken again meanwhile must not be the one this unlock frees.
            Self::unlock_on(&[member], &[g], true).await;
            drop(guard);
        });
    }

    async fn handle_events(weak: Weak<Volume>, mut rx: mpsc::UnboundedReceiver<Event>) {
        while let Some(ev) = rx.recv().await {
            let Some(v) = weak.upgrade() else { return };
            match ev {
                Event::Contended { brick, gfid } => v.on_contended(&brick, gfid),
                Event::Volfile { brick, generation } => {
                    if generation > v.vol.read().unwrap().generation {
                        let v2 = v.clone();
                        tokio::spawn(async move { v2.follow_volfile(&brick).await });
                    }
                }
                Event::Up { .. } => {
                    v.readable.lock().unwrap().clear();
                    v.brick_up.notify_waiters();
                }
                Event::Down { .. } => v.readable.lock().unwrap().clear(),
                Event::Recalled { gfids } => {
                    let mut r = v.readable.lock().unwrap();
                    for g in &gfids {
                        r.remove(g);
                    }
                    drop(r);
                    if let Some(f) = v.on_recall.get() {
                        gfids.into_iter().for_each(f);
                    }
                }
            }
        }
    }

    /// Adopts a newer volfile: connects to added bricks, drops removed ones.
    async fn follow_volfile(&self, from: &str) {
        let addr = self
            .bricks()
            .iter()
            .find(|b| b.id == from)
            .map(|b| b.addr.clone());
        let Some(addr) = addr else { return };
        let vf = match fetch_volfile_with(
            &[addr],
            &self.name,
            self.ping_timeout(),
            self.opts.tls.as_deref(),
        )
        .await
        {
            Ok(vf) => vf,
            Err(e) => return tracing::warn!("cannot fetch the new volfile: {e}"),
        };
        let mut cur = self.vol.write().unwrap();
        if vf.generation <= cur.generation {
            return;
        }
        let ping_timeout = self.opts.effective_ping_timeout(Some(&vf));
        let mut current_pt = self.ping_timeout.write().unwrap();
        if *current_pt != ping_timeout {
            tracing::info!(
                from = ping_timeout_source(&self.opts, &vf),
                "ping timeout {:?} -> {ping_timeout:?}",
                *current_pt
            );
            *current_pt = ping_timeout;
        }
        drop(current_pt);
        let mut bricks = self.bricks.write().unwrap();
        let mut next = Vec::new();
        for spec in &vf.bricks {
            match bricks
                .iter()
                .find(|b| b.id == spec.id && b.addr == spec.address)
            {
                Some(b) => {
                    b.set_ping_timeout(ping_timeout);
                    next.push(b.clone())
                }
                None => next.push(Brick::start(
                    spec.id.clone(),
                    spec.address.clone(),
                    ping_timeout,
                    self.opts.client_name.clone(),
                    self.events.clone(),
                    self.opts.local_steps(&spec.id),
                    self.opts.tls.clone(),
                    self.cache.clone(),
                    self.opts.family,
                )),
            }
        }
        for b in bricks.iter() {
            if !next.iter().any(|n| Arc::ptr_eq(n, b)) {
                b.stop();
            }
        }
        tracing::info!(
            generation = vf.generation,
            bricks = vf.bricks.len(),
            "following new volfile"
        );
        *bricks = next;
        *cur = vf;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn volfile(ping_timeout: Option<u64>) -> Volfile {
        let mut v = Volfile::parse(
            "volume: data\ngeneration: 1\nbricks:\n  - {id: b0, address: '127.0.0.11:24100'}\n",
        )
        .unwrap();
        v.ping_timeout = ping_timeout;
        v
    }

    #[test]
    fn ping_timeout_option_beats_volfile_beats_default() {
        let secs = Duration::from_secs;
        let given = Options {
            ping_timeout: Some(secs(2)),
            ..Options::default()
        };
        let unset = Options::default();
        assert_eq!(unset.ping_timeout, None);
        // The option wins over the volfile, and applies before the volfile is known.
        assert_eq!(
            given.effective_ping_timeout(Some(&volfile(Some(1)))),
            secs(2)
        );
        assert_eq!(given.effective_ping_timeout(Some(&volfile(None))), secs(2));
        assert_eq!(given.effective_ping_timeout(None), secs(2));
        // Without the option, the volfile's value, else 5 s.
        assert_eq!(
            unset.effective_ping_timeout(Some(&volfile(Some(1)))),
            secs(1)
        );
        assert_eq!(unset.effective_ping_timeout(Some(&volfile(None))), secs(5));
        assert_eq!(unset.effective_ping_timeout(None), DEFAULT_PING_TIMEOUT);
        assert_eq!(DEFAULT_PING_TIMEOUT, secs(5));
        assert_eq!(ping_timeout_source(&given, &volfile(Some(1))), "option");
        assert_eq!(ping_timeout_source(&unset, &volfile(Some(1))), "volfile");
        assert_eq!(ping_timeout_source(&unset, &volfile(None)), "default");
    }
}
