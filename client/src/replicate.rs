//! Replication over the bricks: per-inode transactions with majority quorum.
//!
//! A mutation of an inode runs under that inode's lock on a majority of bricks. Locks are
//! taken with a term that each brick promises (persistently) never to go below, then kept
//! while this client goes on changing the inode (eager locking) and given up when idle or
//! when a brick tells us another client waits. Each change carries the version it expects
//! and the one it creates, so every brick applies changes to an inode in one order and a
//! brick that missed one refuses the next (it is stale) instead of diverging silently.
//!
//! A change counts when a majority applied it; bricks that did not are dropped from the
//! hold and left to heal, and the survivors are told to index the inode for healing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use futures::future::join_all;
use mortar_proto as pb;
use tokio::sync::{Notify, mpsc};

use crate::conn::{self, Brick, Event};
use crate::error::{Error, Result};
use crate::gfid::Gfid;
use crate::telemetry::RateLimit;
use crate::volfile::{Volfile, with_default_port};

/// Every entry of directory `g` on one brick, page by page in name order (each page starts
/// after the last name of the one before, so concurrent changes never skip or repeat an
/// entry that stays).
pub(crate) async fn list_dir(b: &Brick, g: Gfid) -> Result<Vec<pb::DirEntry>> {
    let mut out = Vec::new();
    let mut after = Vec::new();
    loop {
        let req = pb::ReaddirReq {
            gfid: g.to_vec(),
            max: 1024,
            after: std::mem::take(&mut after),
        };
        let (r, _) = b
            .call(move |mut c, _| async move { c.readdir(req).await })
            .await?;
        Error::from_errno(r.errno)?;
        out.extend(r.entries);
        if r.eof || r.next.is_empty() {
            return Ok(out);
        }
        after = r.next;
    }
}

/// "bricks disagree on a change": at most one line per 10 s.
static DISAGREE_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(10));

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
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ping_timeout: None,
            lock_idle: Duration::from_millis(500),
            client_name: format!("mortar-client@{}", std::process::id()),
        }
    }
}

impl Options {
    /// The ping timeout in force: ours if set, else the volfile's `ping-timeout`, else
    /// `DEFAULT_PING_TIMEOUT`. Before the volfile is known (while fetching it), pass `None`.
    pub fn effective_ping_timeout(&self, volfile: Option<&Volfile>) -> Duration {
        self.ping_timeout
            .or_else(|| volfile.and_then(Volfile::ping_timeout))
            .unwrap_or(DEFAULT_PING_TIMEOUT)
    }
}

#[derive(Clone)]
pub(crate) struct Member {
    pub(crate) brick: Arc<Brick>,
    pub(crate) epoch: u64,
    pub(crate) session: [u8; 16],
}

impl Member {
    fn current(&self) -> bool {
        self.brick.up().is_some_and(|u| u.epoch == self.epoch)
    }
}

/// Locks held on one inode and what we know of its copies while we hold them.
pub(crate) struct Hold {
    term: u64,
    ver: Ver,
    /// Bricks that granted the lock (to unlock later).
    pub(crate) locked: Vec<Member>,
    /// Bricks with an up-to-date copy that take the changes.
    members: Vec<Member>,
    /// Some brick of the volume is not among the members.
    pub(crate) missing: bool,
}

#[derive(Default)]
pub(crate) struct InodeTx {
    pub(crate) hold: Arc<tokio::sync::Mutex<Option<Hold>>>,
    /// Another session waits for this inode's lock (a brick said so).
    pub(crate) contended: AtomicBool,
    last_used: Mutex<Option<Instant>>,
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
    vol: RwLock<Volfile>,
    bricks: RwLock<Vec<Arc<Brick>>>,
    inodes: Mutex<HashMap<Gfid, Arc<InodeTx>>>,
    /// Bricks last seen holding the newest copy of an inode.
    readable: Mutex<HashMap<Gfid, Vec<String>>>,
    heal_queued: Mutex<HashMap<Gfid, Instant>>,
    pub(crate) heal_bucket: Mutex<crate::heal::Bucket>,
    term_clock: AtomicU64,
    opts: Options,
    /// The effective ping timeout (`Options::effective_ping_timeout` of the current volfile).
    ping_timeout: RwLock<Duration>,
    wake_releaser: Notify,
    events: mpsc::UnboundedSender<Event>,
    pub stats: Stats,
    /// Fires whenever a brick (re)connects: a brick back from away may need healing.
    pub brick_up: Notify,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// An inode version as the bricks store it. Versions are ordered by (term, seq) alone;
/// two copies with the same (term, seq) but different change ids contradict each other.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ver {
    pub term: u64,
    pub seq: u64,
    pub id: u64,
}

impl Ver {
    pub fn key(&self) -> (u64, u64) {
        (self.term, self.seq)
    }

    /// The newest of `vs`, or `Err` if copies at that version contradict each other.
    pub fn newest<'a>(vs: impl IntoIterator<Item = &'a Ver> + Clone) -> Result<Ver> {
        let Some(max) = vs.clone().into_iter().max_by_key(|v| v.key()).copied() else {
            return Ok(Ver::default());
        };
        if vs
            .into_iter()
            .any(|v| v.key() == max.key() && v.id != max.id)
        {
            return Err(Error::SplitBrain);
        }
        Ok(max)
    }
}

pub fn ver_of(v: Option<pb::Version>) -> Ver {
    v.map(|v| Ver {
        term: v.term,
        seq: v.seq,
        id: v.id,
    })
    .unwrap_or_default()
}

pub fn pver(v: Ver) -> Option<pb::Version> {
    Some(pb::Version {
        term: v.term,
        seq: v.seq,
        id: v.id,
    })
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
    let mut errors = Vec::new();
    for s in servers {
        let addr = with_default_port(s);
        match conn::connect_once(&addr, timeout).await {
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
        let vf = fetch_volfile(servers, volume, opts.effective_ping_timeout(None)).await?;
        let ping_timeout = opts.effective_ping_timeout(Some(&vf));
        tracing::debug!(
            ping_timeout = ?ping_timeout,
            from = ping_timeout_source(&opts, &vf),
            "volume {volume}: volfile generation {}, {} bricks",
            vf.generation,
            vf.bricks.len()
        );
        let (tx, rx) = mpsc::unbounded_channel();
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
                )
            })
            .collect();
        let v = Arc::new(Volume {
            name: volume.to_string(),
            vol: RwLock::new(vf),
            bricks: RwLock::new(bricks),
            inodes: Mutex::default(),
            readable: Mutex::default(),
            heal_queued: Mutex::default(),
            heal_bucket: Mutex::default(),
            term_clock: AtomicU64::new(0),
            opts,
            ping_timeout: RwLock::new(ping_timeout),
            wake_releaser: Notify::new(),
            events: tx,
            stats: Stats::default(),
            brick_up: Notify::new(),
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

    pub(crate) fn total(&self) -> usize {
        self.vol.read().unwrap().bricks.len()
    }

    pub fn up_count(&self) -> usize {
        self.bricks().iter().filter(|b| b.is_up()).count()
    }

    async fn handle_events(weak: Weak<Volume>, mut rx: mpsc::UnboundedReceiver<Event>) {
        while let Some(ev) = rx.recv().await {
            let Some(v) = weak.upgrade() else { return };
            match ev {
                Event::Contended { gfid, .. } => {
                    if let Some(tx) = v.inodes.lock().unwrap().get(&gfid) {
                        tx.contended.store(true, Relaxed);
                    }
                    v.wake_releaser.notify_one();
                }
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
        let vf = match fetch_volfile(&[addr], &self.name, self.ping_timeout()).await {
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

    pub(crate) fn tx(&self, g: Gfid) -> Arc<InodeTx> {
        self.inodes.lock().unwrap().entry(g).or_default().clone()
    }

    fn next_term(&self) -> u64 {
        let now = now_ns() as u64;
        let mut cur = self.term_clock.load(Relaxed);
        loop {
            let next = now.max(cur + 1);
            match self
                .term_clock
                .compare_exchange(cur, next, Relaxed, Relaxed)
            {
                Ok(_) => return next,
                Err(c) => cur = c,
            }
        }
    }

    // ---- locks ----

    async fn lock_on(
        b: &Arc<Brick>,
        gfids: &[Vec<u8>],
        term: u64,
        wait: bool,
    ) -> Result<(pb::LockReply, Member)> {
        let gfids = gfids.to_vec();
        let f = |mut c: mortar_proto::brick_client::BrickClient<_>, up: conn::Up| async move {
            c.lock(pb::LockReq {
                session: up.session.to_vec(),
                gfids,
                term,
                wait,
            })
            .await
        };
        let (r, up) = if wait {
            b.call_waiting(f).await?
        } else {
            b.call(f).await?
        };
        Ok((
            r,
            Member {
                brick: b.clone(),
                epoch: up.epoch,
                session: up.session,
            },
        ))
    }

    pub(crate) async fn unlock_on(members: &[Member], gfids: &[Gfid], needs_heal: bool) {
        let raw: Vec<Vec<u8>> = gfids.iter().map(|g| g.to_vec()).collect();
        join_all(members.iter().filter(|m| m.current()).map(|m| {
            let req = pb::UnlockReq {
                session: m.session.to_vec(),
                gfids: raw.clone(),
                needs_heal,
            };
            m.brick
                .call(move |mut c, _| async move { c.unlock(req).await })
        }))
        .await;
    }

    /// Takes the locks of `gfids` and picks, per inode, the bricks with the newest copy.
    async fn acquire(&self, gfids: &[Gfid]) -> Result<Vec<Hold>> {
        let (quorum, total) = (self.quorum(), self.total());
        let (term, held) = self.lock_raw(gfids, true).await?;
        let members: Vec<Member> = held.iter().map(|(_, m)| m.clone()).collect();
        let mut holds = Vec::with_capacity(gfids.len());
        for i in 0..gfids.len() {
            let vers: Vec<Ver> = held
                .iter()
                .map(|(r, _)| ver_of(r.inodes.get(i).and_then(|x| x.ver)))
                .collect();
            let vmax = match Ver::newest(&vers) {
                Ok(v) => v,
                Err(e) => {
                    Self::unlock_on(&members, gfids, false).await;
                    self.queue_heal(gfids[i]).await;
                    return Err(e);
                }
            };
            let fresh: Vec<Member> = held
                .iter()
                .zip(&vers)
                .filter(|(_, v)| **v == vmax)
                .map(|((_, m), _)| m.clone())
                .collect();
            if fresh.len() < quorum {
                // Too few good copies to take a change safely: heal must run first.
                Self::unlock_on(&members, gfids, false).await;
                tracing::warn!(gfid = %gfids[i], fresh = fresh.len(), "too few up-to-date copies to write");
                return Err(Error::NoGoodCopy);
            }
            holds.push(Hold {
                term,
                ver: vmax,
                locked: members.clone(),
                missing: fresh.len() < total,
                members: fresh,
            });
        }
        Ok(holds)
    }

    /// Takes the locks of `gfids` on every reachable brick that grants them, a majority at
    /// least: in parallel when nobody contends, else one brick after another in volfile
    /// order, so that two clients cannot deadlock.
    pub(crate) async fn lock_raw(
        &self,
        gfids: &[Gfid],
        wait: bool,
    ) -> Result<(u64, Vec<(pb::LockReply, Member)>)> {
        let bricks = self.bricks();
        let raw: Vec<Vec<u8>> = gfids.iter().map(|g| g.to_vec()).collect();
        self.stats.lock_acquisitions.fetch_add(1, Relaxed);
        let mut term = self.next_term();
        // Bricks that hold the lock for us, with their answer (ESTALE: our term is too low).
        let mut held: Vec<(pb::LockReply, Member)> = Vec::new();
        let mut busy = false;
        for r in join_all(
            bricks
                .iter()
                .filter(|b| b.is_up())
                .map(|b| Self::lock_on(b, &raw, term, false)),
        )
        .await
        {
            match r {
                Ok((r, m)) if r.errno == 0 || r.errno == libc::ESTALE => held.push((r, m)),
                Ok((r, _)) if r.errno == libc::EAGAIN => busy = true,
                Ok((r, m)) => {
                    tracing::debug!(brick = %m.brick.id, "lock refused: errno {}", r.errno)
                }
                Err(e) => tracing::debug!("lock: {e}"),
            }
        }
        if busy && !wait {
            let ms: Vec<Member> = held.drain(..).map(|(_, m)| m).collect();
            Self::unlock_on(&ms, gfids, false).await;
            return Err(Error::Busy);
        }
        if busy {
            let ms: Vec<Member> = held.drain(..).map(|(_, m)| m).collect();
            Self::unlock_on(&ms, gfids, false).await;
            for b in &bricks {
                if !b.is_up() {
                    continue;
                }
                match Self::lock_on(b, &raw, term, true).await {
                    Ok((r, m)) if r.errno == 0 || r.errno == libc::ESTALE => held.push((r, m)),
                    Ok((r, m)) => {
                        tracing::debug!(brick = %m.brick.id, "lock refused: errno {}", r.errno)
                    }
                    Err(e) => tracing::debug!("lock: {e}"),
                }
            }
        }
        // Another client used a higher term since ours was chosen (typically while we
        // waited): go above it on the bricks we hold, which nobody else can change now.
        for _ in 0..4 {
            let promised = held
                .iter()
                .filter(|(r, _)| r.errno == libc::ESTALE)
                .map(|(r, _)| r.promised)
                .max();
            let Some(promised) = promised else { break };
            self.term_clock.fetch_max(promised, Relaxed);
            term = self.next_term();
            let again = join_all(
                held.iter()
                    .map(|(_, m)| Self::lock_on(&m.brick, &raw, term, false)),
            )
            .await;
            held = Vec::new();
            for r in again {
                match r {
                    Ok((r, m)) if r.errno == 0 || r.errno == libc::ESTALE => held.push((r, m)),
                    Ok((r, m)) => {
                        tracing::warn!(brick = %m.brick.id, "lock lost on a raise: errno {}", r.errno)
                    }
                    Err(e) => tracing::warn!("lock: {e}"),
                }
            }
        }
        let granted = held.iter().filter(|(r, _)| r.errno == 0).count();
        if granted < self.quorum() {
            let answers: Vec<(&str, i32)> = held
                .iter()
                .map(|(r, m)| (m.brick.id.as_str(), r.errno))
                .collect();
            tracing::warn!(?answers, busy, "too few bricks granted the lock");
            let members: Vec<Member> = held.iter().map(|(_, m)| m.clone()).collect();
            Self::unlock_on(&members, gfids, false).await;
            return Err(Error::NoQuorum {
                have: granted,
                need: self.quorum(),
            });
        }
        // Bricks still below our term (raises ran out) hold the lock for us: give it back.
        let stale: Vec<Member> = held
            .iter()
            .filter(|(r, _)| r.errno != 0)
            .map(|(_, m)| m.clone())
            .collect();
        if !stale.is_empty() {
            Self::unlock_on(&stale, gfids, false).await;
        }
        held.retain(|(r, _)| r.errno == 0);
        Ok((term, held))
    }

    /// Gives up idle or contended locks (all of them with `all`), batched per brick.
    async fn release(&self, all: bool) {
        let idle = self.opts.lock_idle;
        let entries: Vec<(Gfid, Arc<InodeTx>)> = self
            .inodes
            .lock()
            .unwrap()
            .iter()
            .map(|(g, t)| (*g, t.clone()))
            .collect();
        let mut batches: HashMap<(String, u64, bool), (Member, Vec<Gfid>)> = HashMap::new();
        // The inodes stay locked here until the bricks have unlocked them: were the inode
        // taken again meanwhile, a late unlock would free the new lock of the same session.
        let mut guards = Vec::new();
        for (g, tx) in entries {
            let used = *tx.last_used.lock().unwrap();
            let due = all || tx.contended.load(Relaxed) || used.is_none_or(|t| t.elapsed() >= idle);
            if !due {
                continue;
            }
            let Ok(mut guard) = tx.hold.clone().try_lock_owned() else {
                continue;
            };
            tx.contended.store(false, Relaxed);
            if let Some(h) = guard.take() {
                self.stats.lock_releases.fetch_add(1, Relaxed);
                for m in h.locked {
                    let key = (m.brick.id.clone(), m.epoch, h.missing);
                    batches
                        .entry(key)
                        .or_insert_with(|| (m.clone(), Vec::new()))
                        .1
                        .push(g);
                }
                guards.push(guard);
            }
        }
        join_all(
            batches
                .into_iter()
                .map(|((_, _, heal), (m, gfids))| async move {
                    Self::unlock_on(&[m], &gfids, heal).await;
                }),
        )
        .await;
        drop(guards);
        // Forget inodes nobody uses and nothing is held on.
        self.inodes.lock().unwrap().retain(|_, tx| {
            Arc::strong_count(tx) > 1 || tx.hold.try_lock().map(|h| h.is_some()).unwrap_or(true)
        });
    }

    async fn releaser(weak: Weak<Volume>) {
        loop {
            let Some(v) = weak.upgrade() else { return };
            let tick = v.opts.lock_idle.min(Duration::from_millis(200));
            tokio::select! {
                _ = v.wake_releaser.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            v.release(false).await;
        }
    }

    /// Releases every lock (before unmounting), so other clients need not wait for timeouts.
    pub async fn shutdown(&self) {
        self.release(true).await;
        for b in self.bricks() {
            b.stop();
        }
    }

    // ---- mutations ----

    /// Runs `f`; when it finds too few up-to-date copies of `gfids` (a brick just back,
    /// say), heals them now and runs it again.
    async fn healing<T, F, Fut>(&self, gfids: &[Gfid], f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match f().await {
            Err(Error::NoGoodCopy) => {
                for g in gfids {
                    if let Err(e) = self.heal(*g, crate::heal::Source::Newest).await {
                        tracing::warn!(gfid = %g, "heal before a change or fsync: {e}");
                    }
                }
                f().await
            }
            r => r,
        }
    }

    /// Runs one change of `gfids` (the inodes whose version it changes) on the bricks.
    async fn mutate(&self, gfids: &[Gfid], op: pb::mutate_req::Op) -> Result<pb::MutateReply> {
        self.healing(gfids, || self.mutate_once(gfids, op.clone()))
            .await
    }

    /// Enters this client's transaction on `txs` (the inodes `gfids`, sorted) and makes
    /// sure it holds their locks on a majority of up-to-date copies.
    async fn hold<'a>(
        &self,
        gfids: &[Gfid],
        txs: &'a [Arc<InodeTx>],
    ) -> Result<Vec<tokio::sync::MutexGuard<'a, Option<Hold>>>> {
        let (quorum, total) = (self.quorum(), self.total());
        let mut guards = Vec::with_capacity(txs.len());
        for t in txs {
            guards.push(t.hold.lock().await);
        }
        // Drop members whose connection (and so whose lock) is gone.
        for (i, guard) in guards.iter_mut().enumerate() {
            if let Some(h) = guard.as_mut() {
                h.members.retain(|m| m.current());
                h.missing |= h.members.len() < total;
                if h.members.len() < quorum {
                    let h = guard.take().unwrap();
                    Self::unlock_on(&h.locked, &[gfids[i]], true).await;
                }
            }
        }
        let mut need: Vec<usize> = (0..gfids.len()).filter(|i| guards[*i].is_none()).collect();
        if !need.is_empty() && need.len() < gfids.len() {
            // Keeping some of the locks while waiting for the others is how two clients
            // renaming across two directories in opposite directions deadlock: each keeps
            // one directory's eager lock and waits for the other's. Give back what is held
            // and take them all together, in one request (the bricks grant them in order).
            for (i, guard) in guards.iter_mut().enumerate() {
                if let Some(h) = guard.take() {
                    Self::unlock_on(&h.locked, &[gfids[i]], h.missing).await;
                }
            }
            need = (0..gfids.len()).collect();
        }
        if !need.is_empty() {
            let want: Vec<Gfid> = need.iter().map(|i| gfids[*i]).collect();
            let holds = self.acquire(&want).await?;
            for (i, h) in need.into_iter().zip(holds) {
                *guards[i] = Some(h);
            }
        }
        Ok(guards)
    }

    async fn mutate_once(
        &self,
        gfids: &[Gfid],
        mut op: pb::mutate_req::Op,
    ) -> Result<pb::MutateReply> {
        let mut gfids = gfids.to_vec();
        gfids.sort();
        gfids.dedup();
        let (quorum, total) = (self.quorum(), self.total());
        self.stats.mutations.fetch_add(1, Relaxed);
        let txs: Vec<Arc<InodeTx>> = gfids.iter().map(|g| self.tx(*g)).collect();
        let mut guards = self.hold(&gfids, &txs).await?;
        // The bricks that are members for every inode of this change take it.
        let mut targets: Vec<Member> = guards[0].as_ref().unwrap().members.clone();
        for g in &guards[1..] {
            let ms = &g.as_ref().unwrap().members;
            targets.retain(|t| ms.iter().any(|m| m.brick.id == t.brick.id));
        }
        if targets.len() < quorum {
            return Err(Error::NoQuorum {
                have: targets.len(),
                need: quorum,
            });
        }
        let first = guards[0].as_ref().unwrap();
        let term = first.term;
        if let pb::mutate_req::Op::Create(c) = &mut op {
            c.term = term;
        }
        let mut updates = Vec::new();
        let mut new_vers = Vec::new();
        let mut needs_heal = targets.len() < total;
        for (g, guard) in gfids.iter().zip(&guards) {
            let h = guard.as_ref().unwrap();
            let seq = if h.ver.term == h.term {
                h.ver.seq + 1
            } else {
                1
            };
            let new = Ver {
                term: h.term,
                seq,
                id: crate::gfid::rand_u64(),
            };
            needs_heal |= h.missing;
            updates.push(pb::VerUpdate {
                gfid: g.to_vec(),
                expect: pver(h.ver),
                new: pver(new),
            });
            new_vers.push(new);
        }
        let now = now_ns();
        let results = join_all(targets.iter().map(|m| {
            let req = pb::MutateReq {
                session: m.session.to_vec(),
                now_ns: now,
                updates: updates.clone(),
                needs_heal,
                op: Some(op.clone()),
            };
            let epoch = m.epoch;
            m.brick.call(move |mut c, up| async move {
                if up.epoch != epoch {
                    return Err(tonic::Status::unavailable("reconnected: lock lost"));
                }
                c.mutate(req).await
            })
        }))
        .await;
        let mut ok: Vec<(Member, pb::MutateReply)> = Vec::new();
        let mut refused: HashMap<i32, Vec<Member>> = HashMap::new();
        for (m, r) in targets.into_iter().zip(results) {
            match r {
                Ok((rep, _)) if rep.stale || rep.errno == libc::ENOLCK => {
                    tracing::warn!(brick = %m.brick.id, "copy is stale or lock lost; leaving it to heal");
                }
                Ok((rep, _)) if rep.errno == 0 => ok.push((m, rep)),
                Ok((rep, _)) => refused.entry(rep.errno).or_default().push(m),
                Err(e) => tracing::warn!("{e}"),
            }
        }
        // Bricks that all refused the same way (ENOTEMPTY, EDQUOT, ...) agree: that is the
        // answer, not news. Only different outcomes are worth a warning, and at most a few.
        let outcomes = refused.len() + usize::from(!ok.is_empty());
        if ok.len() < quorum && outcomes > 1 {
            if let Some(suppressed) = DISAGREE_WARNINGS.allow() {
                let refused: Vec<(i32, Vec<&str>)> = refused
                    .iter()
                    .map(|(e, ms)| (*e, ms.iter().map(|m| m.brick.id.as_str()).collect()))
                    .collect();
                tracing::warn!(
                    ok = ok.len(),
                    ?refused,
                    suppressed,
                    "bricks disagree on a change"
                );
            }
        }
        let (result, members, advanced) = if ok.len() >= quorum {
            let rep = ok[0].1.clone();
            (
                Ok(rep),
                ok.into_iter().map(|(m, _)| m).collect::<Vec<_>>(),
                true,
            )
        } else if let Some((e, ms)) = refused.iter().find(|(_, ms)| ms.len() >= quorum) {
            (Err(Error::Os(*e)), ms.clone(), false)
        } else if !ok.is_empty() {
            // A minority applied it: they are ahead, the change failed; heal sorts it out.
            let have = ok.len();
            (
                Err(Error::NoQuorum { have, need: quorum }),
                ok.into_iter().map(|(m, _)| m).collect(),
                true,
            )
        } else {
            let have = refused.values().map(|v| v.len()).max().unwrap_or(0);
            (
                Err(Error::NoQuorum { have, need: quorum }),
                Vec::new(),
                false,
            )
        };
        for (guard, new) in guards.iter_mut().zip(&new_vers) {
            let h = guard.as_mut().unwrap();
            h.members = members.clone();
            h.missing |= members.len() < total;
            if advanced {
                h.ver = *new;
            }
        }
        if let (Ok(_), pb::mutate_req::Op::Create(c)) = (&result, &op) {
            // The creator holds the new inode's lock already: its first write is one round trip.
            if let Some(g) = Gfid::from_bytes(&c.gfid) {
                let tx = self.tx(g);
                if let Ok(mut h) = tx.hold.try_lock() {
                    *h = Some(Hold {
                        term,
                        ver: Ver::default(),
                        locked: members.clone(),
                        missing: members.len() < total,
                        members: members.clone(),
                    });
                    *tx.last_used.lock().unwrap() = Some(Instant::now());
                }
            }
        }
        let now = Instant::now();
        let mut contended = false;
        for t in &txs {
            *t.last_used.lock().unwrap() = Some(now);
            contended |= t.contended.load(Relaxed);
        }
        drop(guards);
        if contended {
            self.wake_releaser.notify_one();
        }
        result
    }

    pub async fn create(
        &self,
        parent: Gfid,
        name: &[u8],
        kind: pb::Kind,
        mode: u32,
        uid: u32,
        gid: u32,
        rdev: u64,
        target: &[u8],
    ) -> Result<pb::Attr> {
        let op = pb::mutate_req::Op::Create(pb::Create {
            parent: parent.to_vec(),
            name: name.to_vec(),
            gfid: Gfid::random().to_vec(),
            kind: kind as i32,
            mode,
            uid,
            gid,
            rdev,
            target: target.to_vec(),
            term: 0,
            open: false,
        });
        let r = self.mutate(&[parent], op).await?;
        r.attr.ok_or(Error::Os(libc::EIO))
    }

    /// Creates a regular file and opens it, as `open(O_CREAT)` does: the bricks count the
    /// open (see [`Volume::open`]); [`Volume::release_open`] ends it.
    pub async fn create_open(
        &self,
        parent: Gfid,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<pb::Attr> {
        let op = pb::mutate_req::Op::Create(pb::Create {
            parent: parent.to_vec(),
            name: name.to_vec(),
            gfid: Gfid::random().to_vec(),
            kind: pb::Kind::File as i32,
            mode,
            uid,
            gid,
            open: true,
            ..Default::default()
        });
        let r = self.mutate(&[parent], op).await?;
        r.attr.ok_or(Error::Os(libc::EIO))
    }

    pub async fn remove(&self, parent: Gfid, name: &[u8], dir: bool) -> Result<()> {
        let op = pb::mutate_req::Op::Remove(pb::Remove {
            parent: parent.to_vec(),
            name: name.to_vec(),
            dir,
        });
        self.mutate(&[parent], op).await.map(|_| ())
    }

    pub async fn rename(
        &self,
        parent: Gfid,
        name: &[u8],
        newparent: Gfid,
        newname: &[u8],
        flags: u32,
    ) -> Result<()> {
        let op = pb::mutate_req::Op::Rename(pb::Rename {
            parent: parent.to_vec(),
            name: name.to_vec(),
            newparent: newparent.to_vec(),
            newname: newname.to_vec(),
            flags,
        });
        self.mutate(&[parent, newparent], op).await.map(|_| ())
    }

    pub async fn link(&self, g: Gfid, newparent: Gfid, newname: &[u8]) -> Result<pb::Attr> {
        let op = pb::mutate_req::Op::Link(pb::Link {
            gfid: g.to_vec(),
            newparent: newparent.to_vec(),
            newname: newname.to_vec(),
        });
        let r = self.mutate(&[newparent], op).await?;
        r.attr.ok_or(Error::Os(libc::EIO))
    }

    pub async fn setattr(&self, s: pb::Setattr) -> Result<pb::Attr> {
        let g = Gfid::from_bytes(&s.gfid).ok_or(Error::Os(libc::EINVAL))?;
        let r = self.mutate(&[g], pb::mutate_req::Op::Setattr(s)).await?;
        r.attr.ok_or(Error::Os(libc::EIO))
    }

    pub async fn write(&self, g: Gfid, offset: u64, data: Vec<u8>, append: bool) -> Result<u64> {
        let op = pb::mutate_req::Op::Write(pb::Write {
            gfid: g.to_vec(),
            offset,
            data,
            append,
        });
        Ok(self.mutate(&[g], op).await?.written)
    }

    pub async fn fallocate(&self, g: Gfid, mode: i32, offset: u64, length: u64) -> Result<()> {
        let op = pb::mutate_req::Op::Fallocate(pb::Fallocate {
            gfid: g.to_vec(),
            mode,
            offset,
            length,
        });
        self.mutate(&[g], op).await.map(|_| ())
    }

    pub async fn setxattr(&self, g: Gfid, name: &[u8], value: &[u8], flags: i32) -> Result<()> {
        let op = pb::mutate_req::Op::Setxattr(pb::Setxattr {
            gfid: g.to_vec(),
            name: name.to_vec(),
            value: value.to_vec(),
            flags,
        });
        self.mutate(&[g], op).await.map(|_| ())
    }

    pub async fn removexattr(&self, g: Gfid, name: &[u8]) -> Result<()> {
        let op = pb::mutate_req::Op::Removexattr(pb::Removexattr {
            gfid: g.to_vec(),
            name: name.to_vec(),
        });
        self.mutate(&[g], op).await.map(|_| ())
    }

    /// Makes the inode's data durable on a majority of up-to-date copies. It runs under
    /// the inode's lock, like a change: another client's write in flight would leave the
    /// copies at different versions, and only the newest copies count.
    pub async fn fsync(&self, g: Gfid, datasync: bool) -> Result<()> {
        self.healing(&[g], || self.fsync_once(g, datasync)).await
    }

    async fn fsync_once(&self, g: Gfid, datasync: bool) -> Result<()> {
        let quorum = self.quorum();
        let txs = [self.tx(g)];
        let mut guards = self.hold(&[g], &txs).await?;
        let h = guards[0].as_mut().unwrap();
        let rs = join_all(h.members.iter().map(|m| {
            m.brick.call(move |mut c, _| async move {
                c.fsync(pb::FsyncReq {
                    gfid: g.to_vec(),
                    datasync,
                })
                .await
            })
        }))
        .await;
        let mut synced = Vec::new();
        let mut refused = Vec::new();
        for (m, r) in h.members.iter().zip(rs) {
            match r {
                Ok((e, _)) if e.errno == 0 => synced.push(m.clone()),
                Ok((e, _)) => refused.push(e.errno),
                Err(e) => tracing::warn!("fsync: {e}"),
            }
        }
        *txs[0].last_used.lock().unwrap() = Some(Instant::now());
        if synced.len() >= quorum {
            // A copy that could not sync is no longer known to hold everything.
            h.missing |= synced.len() < h.members.len();
            h.members = synced;
            return Ok(());
        }
        if let Some(e) = refused.first() {
            return Err(Error::Os(*e));
        }
        Err(Error::NoQuorum {
            have: synced.len(),
            need: quorum,
        })
    }

    // ---- reads ----

    fn remember_readable(&self, g: Gfid, ids: Vec<String>) {
        let mut r = self.readable.lock().unwrap();
        if r.len() > 100_000 {
            r.clear();
        }
        r.insert(g, ids);
    }

    /// The bricks connected now; an error if none is.
    fn up_bricks(&self) -> Result<Vec<Arc<Brick>>> {
        let bricks: Vec<Arc<Brick>> = self.bricks().into_iter().filter(|b| b.is_up()).collect();
        if bricks.is_empty() {
            return Err(Error::Transport {
                brick: "*".into(),
                msg: "no brick reachable".into(),
            });
        }
        Ok(bricks)
    }

    /// Asks every brick for the inode and keeps the newest copy's attributes.
    pub async fn getattr(&self, g: Gfid) -> Result<pb::Attr> {
        self.attr_everywhere(g, false).await
    }

    /// Opens a file: its attributes from every brick, fresh (close-to-open), and each brick
    /// counts the open, so that an unlink keeps the data until [`Volume::release_open`].
    pub async fn open(&self, g: Gfid) -> Result<pb::Attr> {
        self.readable.lock().unwrap().remove(&g);
        self.attr_everywhere(g, true).await
    }

    /// Ends one open of `g` on every brick; in the background, as close(2) must not wait.
    pub fn release_open(&self, g: Gfid) {
        let Ok(bricks) = self.up_bricks() else {
            return;
        };
        for b in bricks {
            tokio::spawn(async move {
                let r = b
                    .call(move |mut c, up| async move {
                        c.release(pb::ReleaseReq {
                            session: up.session.to_vec(),
                            gfids: vec![g.to_vec()],
                        })
                        .await
                    })
                    .await;
                if let Err(e) = r {
                    tracing::debug!(gfid = %g, "release: {e}");
                }
            });
        }
    }

    async fn attr_everywhere(&self, g: Gfid, open: bool) -> Result<pb::Attr> {
        let bricks = self.up_bricks()?;
        let calls = bricks.iter().map(|b| {
            b.call(move |mut c, up| async move {
                if open {
                    let req = pb::OpenReq {
                        session: up.session.to_vec(),
                        gfid: g.to_vec(),
                    };
                    c.open(req).await
                } else {
                    c.getattr(pb::GfidReq { gfid: g.to_vec() }).await
                }
            })
        });
        let rs = join_all(calls).await;
        let mut found: Vec<(&Arc<Brick>, pb::Attr)> = Vec::new();
        let mut errno = None;
        let mut transport = None;
        for (b, r) in bricks.iter().zip(rs) {
            match r {
                Ok((rep, _)) if rep.errno == 0 && rep.attr.is_some() => {
                    found.push((b, rep.attr.unwrap()))
                }
                Ok((rep, _)) => errno = Some(rep.errno),
                Err(e) => transport = Some(e),
            }
        }
        if found.is_empty() {
            return Err(match (errno, transport) {
                (Some(e), _) => Error::Os(e),
                (None, Some(t)) => t,
                (None, None) => Error::Os(libc::EIO),
            });
        }
        let vers: Vec<Ver> = found.iter().map(|(_, a)| ver_of(a.ver)).collect();
        let vmax = match Ver::newest(&vers) {
            Ok(v) => v,
            Err(e) => {
                self.queue_heal(g).await;
                return Err(e);
            }
        };
        if vers.iter().any(|v| *v != vmax) {
            // Heal on access: the good copy answers now, the stale ones get healed.
            self.queue_heal(g).await;
        }
        let ids: Vec<String> = found
            .iter()
            .filter(|(_, a)| ver_of(a.ver) == vmax)
            .map(|(b, _)| b.id.clone())
            .collect();
        self.remember_readable(g, ids);
        Ok(found
            .into_iter()
            .find(|(_, a)| ver_of(a.ver) == vmax)
            .unwrap()
            .1)
    }

    /// Looks a name up on every brick; the answer comes from the bricks with the newest copy
    /// of the parent directory, so a brick that missed a create or delete is outvoted.
    pub async fn lookup(&self, parent: Gfid, name: &[u8]) -> Result<pb::Attr> {
        let bricks = self.up_bricks()?;
        let rs = join_all(bricks.iter().map(|b| {
            let req = pb::LookupReq {
                parent: parent.to_vec(),
                name: name.to_vec(),
            };
            b.call(move |mut c, _| async move { c.lookup(req).await })
        }))
        .await;
        let mut replies: Vec<(&Arc<Brick>, pb::LookupReply)> = Vec::new();
        let mut last_err = None;
        for (b, r) in bricks.iter().zip(rs) {
            match r {
                Ok((rep, _)) => replies.push((b, rep)),
                Err(e) => last_err = Some(e),
            }
        }
        let with_parent: Vec<&(&Arc<Brick>, pb::LookupReply)> =
            replies.iter().filter(|(_, r)| r.parent.is_some()).collect();
        if with_parent.is_empty() {
            if let Some((_, r)) = replies.first() {
                return Err(Error::Os(if r.errno == 0 { libc::EIO } else { r.errno }));
            }
            return Err(last_err.unwrap_or(Error::Os(libc::EIO)));
        }
        let pvers: Vec<Ver> = with_parent
            .iter()
            .map(|(_, r)| ver_of(r.parent.as_ref().unwrap().ver))
            .collect();
        let pmax = pvers
            .iter()
            .max_by_key(|v| v.key())
            .copied()
            .unwrap_or_default();
        if pvers.iter().any(|v| *v != pmax) || with_parent.len() < bricks.len() {
            self.queue_heal(parent).await;
        }
        let auth: Vec<&&(&Arc<Brick>, pb::LookupReply)> = with_parent
            .iter()
            .filter(|(_, r)| ver_of(r.parent.as_ref().unwrap().ver).key() == pmax.key())
            .collect();
        let best = auth
            .iter()
            .filter_map(|(b, r)| r.entry.as_ref().map(|e| (b, e)))
            .max_by_key(|(_, e)| ver_of(e.ver).key());
        match best {
            Some((_, e)) => {
                let ids = auth
                    .iter()
                    .filter(|(_, r)| {
                        r.entry
                            .as_ref()
                            .is_some_and(|x| x.gfid == e.gfid && x.ver == e.ver)
                    })
                    .map(|(b, _)| b.id.clone())
                    .collect();
                if let Some(g) = Gfid::from_bytes(&e.gfid) {
                    self.remember_readable(g, ids);
                }
                Ok(e.clone())
            }
            None => Err(Error::Os(if auth[0].1.errno == 0 {
                libc::EIO
            } else {
                auth[0].1.errno
            })),
        }
    }

    /// Asks a brick's self-heal worker to look at `g` (at most every few seconds per inode).
    pub async fn queue_heal(&self, g: Gfid) {
        {
            let mut q = self.heal_queued.lock().unwrap();
            if q.get(&g)
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
            {
                return;
            }
            if q.len() > 10_000 {
                q.clear();
            }
            q.insert(g, Instant::now());
        }
        // To the brick whose worker owns this inode (see the brick's heal worker), else any.
        let mut bricks: Vec<Arc<Brick>> = self.bricks();
        let owner = (u64::from_le_bytes(g.0[8..].try_into().unwrap()) % bricks.len().max(1) as u64)
            as usize;
        bricks.rotate_left(owner);
        bricks.retain(|b| b.is_up());
        tokio::spawn(async move {
            for b in bricks {
                let req = pb::HealIndexReq {
                    add: vec![g.to_vec()],
                    ..Default::default()
                };
                if b.call(move |mut c, _| async move { c.heal_index(req).await })
                    .await
                    .is_ok()
                {
                    return;
                }
            }
        });
    }

    /// Bricks that hold the newest copy of `g`, best first.
    async fn readable_bricks(&self, g: Gfid) -> Result<Vec<Arc<Brick>>> {
        if let Some(tx) = self.inodes.lock().unwrap().get(&g).cloned() {
            if let Ok(h) = tx.hold.try_lock() {
                if let Some(h) = h.as_ref() {
                    let ms: Vec<Arc<Brick>> = h
                        .members
                        .iter()
                        .filter(|m| m.current())
                        .map(|m| m.brick.clone())
                        .collect();
                    if !ms.is_empty() {
                        return Ok(ms);
                    }
                }
            }
        }
        let cached = self.readable.lock().unwrap().get(&g).cloned();
        let ids = match cached {
            Some(ids) => ids,
            None => {
                self.getattr(g).await?;
                self.readable
                    .lock()
                    .unwrap()
                    .get(&g)
                    .cloned()
                    .unwrap_or_default()
            }
        };
        let all = self.bricks();
        let mut out: Vec<Arc<Brick>> = all
            .into_iter()
            .filter(|b| ids.contains(&b.id) && b.is_up())
            .collect();
        if out.is_empty() {
            return Err(Error::NoGoodCopy);
        }
        // Spread reads of different files over the good copies.
        let n = out.len();
        out.rotate_left((g.ino() as usize) % n);
        Ok(out)
    }

    /// Refreshes what we know of an inode's copies (on open: close-to-open consistency).
    pub async fn refresh(&self, g: Gfid) -> Result<pb::Attr> {
        self.readable.lock().unwrap().remove(&g);
        self.getattr(g).await
    }

    /// Runs a read on one good copy, failing over to the next on a transport error.
    async fn read_one<T, F, Fut>(&self, g: Gfid, f: F) -> Result<T>
    where
        F: Fn(mortar_proto::brick_client::BrickClient<tonic::transport::Channel>) -> Fut + Clone,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, tonic::Status>>,
    {
        self.stats.reads.fetch_add(1, Relaxed);
        let mut last = Error::NoGoodCopy;
        for b in self.readable_bricks(g).await? {
            let f = f.clone();
            match b.call(move |c, _| f(c)).await {
                Ok((r, _)) => return Ok(r),
                Err(e) => {
                    self.stats.failovers.fetch_add(1, Relaxed);
                    last = e;
                }
            }
        }
        Err(last)
    }

    pub async fn read(&self, g: Gfid, offset: u64, size: u32) -> Result<Vec<u8>> {
        let r = self
            .read_one(g, move |mut c| async move {
                c.read(pb::ReadReq {
                    gfid: g.to_vec(),
                    offset,
                    size,
                })
                .await
            })
            .await?;
        Error::from_errno(r.errno)?;
        Ok(r.data)
    }

    pub async fn readlink(&self, g: Gfid) -> Result<Vec<u8>> {
        let r = self
            .read_one(g, move |mut c| async move {
                c.readlink(pb::GfidReq { gfid: g.to_vec() }).await
            })
            .await?;
        Error::from_errno(r.errno)?;
        Ok(r.target)
    }

    pub async fn getxattr(&self, g: Gfid, name: &[u8]) -> Result<Vec<u8>> {
        let name = name.to_vec();
        let r = self
            .read_one(g, move |mut c| {
                let name = name.clone();
                async move {
                    c.getxattr(pb::XattrReq {
                        gfid: g.to_vec(),
                        name,
                    })
                    .await
                }
            })
            .await?;
        Error::from_errno(r.errno)?;
        Ok(r.value)
    }

    pub async fn listxattr(&self, g: Gfid) -> Result<Vec<Vec<u8>>> {
        let r = self
            .read_one(g, move |mut c| async move {
                c.listxattr(pb::GfidReq { gfid: g.to_vec() }).await
            })
            .await?;
        Error::from_errno(r.errno)?;
        Ok(r.names)
    }

    /// The whole listing of a directory, from one good copy.
    pub async fn readdir(&self, g: Gfid) -> Result<Vec<pb::DirEntry>> {
        let mut last = Error::NoGoodCopy;
        for b in self.readable_bricks(g).await? {
            match list_dir(&b, g).await {
                Err(e @ Error::Transport { .. }) => last = e,
                r => return r,
            }
        }
        Err(last)
    }

    /// File system statistics as seen from `g`: the whole volume, or inside a directory
    /// with a quota, that quota's size and usage.
    pub async fn statfs(&self, g: Gfid) -> Result<pb::StatfsReply> {
        let r = self
            .read_one(g, move |mut c| async move {
                c.statfs(pb::GfidReq { gfid: g.to_vec() }).await
            })
            .await?;
        Error::from_errno(r.errno)?;
        Ok(r)
    }

    /// Limits the apparent size of the tree under directory `dir` (0: no limit).
    pub async fn set_quota(&self, dir: Gfid, limit_bytes: u64) -> Result<()> {
        let op = pb::mutate_req::Op::SetQuota(pb::SetQuota {
            gfid: dir.to_vec(),
            limit: limit_bytes,
        });
        self.mutate(&[dir], op).await.map(|_| ())
    }

    /// The quota on directory `dir`, if it has one: (limit, used) in bytes.
    pub async fn quota(&self, dir: Gfid) -> Result<Option<(u64, u64)>> {
        let r = self
            .read_one(dir, move |mut c| async move {
                c.quota(pb::GfidReq { gfid: dir.to_vec() }).await
            })
            .await?;
        match r.errno {
            0 => Ok(Some((r.limit, r.used))),
            libc::ENODATA => Ok(None),
            e => Err(Error::Os(e)),
        }
    }

    // ---- application locks ----

    /// POSIX/BSD byte-range lock on a majority; blocking requests go brick by brick in
    /// volfile order so that two clients cannot deadlock.
    #[allow(clippy::too_many_arguments)]
    pub async fn lk(
        &self,
        g: Gfid,
        owner: u64,
        pid: u32,
        typ: i32,
        start: u64,
        end: u64,
        wait: bool,
        test: bool,
    ) -> Result<pb::LkReply> {
        let quorum = self.quorum();
        let bricks: Vec<Arc<Brick>> = self.bricks().into_iter().filter(|b| b.is_up()).collect();
        let req = |session: [u8; 16], typ: i32, wait: bool| pb::LkReq {
            session: session.to_vec(),
            gfid: g.to_vec(),
            owner,
            pid,
            typ,
            start,
            end,
            wait,
            test,
        };
        let send = |b: &Arc<Brick>, typ: i32, wait: bool| {
            let b = b.clone();
            async move {
                let f = move |mut c: mortar_proto::brick_client::BrickClient<_>, up: conn::Up| async move {
                    c.lk(req(up.session, typ, wait)).await
                };
                let r = if wait {
                    b.call_waiting(f).await
                } else {
                    b.call(f).await
                };
                (b, r.map(|(r, _)| r))
            }
        };
        if test || typ == libc::F_UNLCK as i32 {
            let rs = join_all(bricks.iter().map(|b| send(b, typ, false))).await;
            let mut ok = 0;
            for (_, r) in rs {
                if let Ok(r) = r {
                    Error::from_errno(r.errno)?;
                    if test && r.typ != libc::F_UNLCK as i32 {
                        return Ok(r);
                    }
                    ok += 1;
                }
            }
            if ok == 0 {
                return Err(Error::NoQuorum {
                    have: 0,
                    need: quorum,
                });
            }
            return Ok(pb::LkReply {
                typ: libc::F_UNLCK as i32,
                ..Default::default()
            });
        }
        let mut granted = Vec::new();
        let mut refused = None;
        if wait {
            for b in &bricks {
                match send(b, typ, true).await {
                    (b, Ok(r)) if r.errno == 0 => granted.push(b),
                    (_, Ok(r)) => {
                        refused = Some(r.errno);
                        break;
                    }
                    (_, Err(_)) => {}
                }
            }
        } else {
            for (b, r) in join_all(bricks.iter().map(|b| send(b, typ, false))).await {
                match r {
                    Ok(r) if r.errno == 0 => granted.push(b),
                    Ok(r) => refused = Some(r.errno),
                    Err(_) => {}
                }
            }
        }
        if refused.is_none() && granted.len() >= quorum {
            return Ok(pb::LkReply::default());
        }
        // Undo the partial grant: only the range this request took is ours to drop.
        join_all(granted.iter().map(|b| send(b, libc::F_UNLCK as i32, false))).await;
        match refused {
            Some(e) => Err(Error::Os(e)),
            None => Err(Error::NoQuorum {
                have: granted.len(),
                need: quorum,
            }),
        }
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
