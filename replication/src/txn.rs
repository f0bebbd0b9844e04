//! The transaction of a change: lock (with a term each brick promises), mark (the brick
//! records the change as pending before it applies it), apply (on every up-to-date copy,
//! counted by `arbitrate::mutation_outcome`), clear (the new version, and an unlock that
//! tells the bricks whether a copy was left behind). Locks are kept while this client goes
//! on changing the inode (eager locking) and given up when idle or contended.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::future::join_all;
use mortar_common::error::{Error, Result};
use mortar_common::gfid::{Gfid, rand_u64};
use mortar_common::telemetry::RateLimit;
use mortar_proto as pb;

use crate::arbitrate::{self, Copy, Reply, Ver, pver, ver_of};
use crate::conn::{self, Brick};
use crate::volume::Volume;

/// How long a change waits for the bricks to heal the copies it needs (see `healing`).
const HEAL_WAIT: Duration = Duration::from_secs(5);

/// "bricks disagree on a change": at most one line per 10 s.
static DISAGREE_WARNINGS: RateLimit = RateLimit::new(Duration::from_secs(10));
#[derive(Clone)]
pub(crate) struct Member {
    pub(crate) brick: Arc<Brick>,
    pub(crate) epoch: u64,
    pub(crate) session: [u8; 16],
}

impl Member {
    pub(crate) fn current(&self) -> bool {
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
    pub(crate) members: Vec<Member>,
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

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}
/// Brings the cache in line with this client's own change `op` of `gfids` (their locks are
/// held): `reply` when every brick applied it and leased what it changed, `None` when that
/// is not known (what was cached of the inodes involved then goes).
fn cache_change(
    c: &crate::lease::Cache,
    op: &pb::mutate_req::Op,
    gfids: &[Gfid],
    reply: Option<&pb::MutateReply>,
    grants: Vec<crate::lease::Grant>,
) {
    use pb::mutate_req::Op;
    let g = |b: &[u8]| Gfid::from_bytes(b);
    // The inodes reached by name: known only from cached entries. One not known may be any
    // inode with several links whose attributes are cached; those go.
    let by_name = |dir: &[u8], name: &[u8]| -> Vec<Gfid> {
        match g(dir).map(|d| c.dir_get(d, name)) {
            Some(Some(v)) => vec![v],
            _ => c.linked(),
        }
    };
    let Some(r) = reply else {
        c.forget(gfids);
        match op {
            Op::Remove(rm) => c.forget(&by_name(&rm.parent, &rm.name)),
            Op::Rename(rn) => {
                c.forget(&by_name(&rn.parent, &rn.name));
                c.forget(&by_name(&rn.newparent, &rn.newname));
            }
            Op::Link(l) => c.forget(&g(&l.gfid).into_iter().collect::<Vec<_>>()),
            _ => {}
        }
        return;
    };
    // Reads of these inodes begun before the change bring nothing to keep.
    c.changed(gfids);
    if let Some(i) = r.attr.as_ref().and_then(|a| g(&a.gfid)) {
        c.changed(&[i]);
    }
    // Tickets taken as it goes (`c.ticket()` at each put): forgetting an inode here
    // refuses older ones for it.
    let ids: Vec<String> = grants.iter().map(|(id, _)| id.clone()).collect();
    let changed = r.attr.as_ref().and_then(|a| Some((g(&a.gfid)?, a.clone())));
    for d in gfids {
        c.touch(*d);
        c.put_lease(c.ticket(), *d, grants.clone());
    }
    for a in &r.dirs {
        if let Some(d) = g(&a.gfid).filter(|d| gfids.contains(d)) {
            c.put_attr(c.ticket(), d, a.clone(), ids.clone(), grants.clone());
        }
    }
    match op {
        Op::Create(cr) => {
            if let (Some(p), Some((new, a))) = (g(&cr.parent), &changed) {
                c.dir_changed(p, &cr.name, Some(*new));
                c.put_attr(c.ticket(), *new, a.clone(), ids.clone(), grants.clone());
                // Made just now: empty.
                match a.kind() {
                    pb::Kind::Dir => c.put_dir(c.ticket(), *new, []),
                    pb::Kind::File => c.put_data(c.ticket(), *new, pb::Bytes::new()),
                    _ => {}
                }
            }
        }
        Op::Remove(rm) => {
            c.forget(&by_name(&rm.parent, &rm.name));
            if let Some(p) = g(&rm.parent) {
                c.dir_changed(p, &rm.name, None);
            }
        }
        Op::Rename(rn) => {
            let moved = by_name(&rn.parent, &rn.name);
            let replaced = by_name(&rn.newparent, &rn.newname);
            c.forget(&moved);
            c.forget(&replaced);
            match (g(&rn.parent), g(&rn.newparent), &changed) {
                (Some(p), Some(np), Some((m, _))) if rn.flags & libc::RENAME_EXCHANGE == 0 => {
                    c.dir_changed(p, &rn.name, None);
                    c.dir_changed(np, &rn.newname, Some(*m));
                }
                _ => c.forget(gfids),
            }
        }
        Op::Link(l) => {
            if let (Some(np), Some(t)) = (g(&l.newparent), g(&l.gfid)) {
                c.dir_changed(np, &l.newname, Some(t));
            }
        }
        // Its own bytes: what it cached of the file follows (a write's offset is where
        // the bytes went: the end for an append).
        Op::Write(w) => match &changed {
            Some((i, a)) if r.written == w.data.len() as u64 => {
                let at = if w.append {
                    a.size.saturating_sub(r.written)
                } else {
                    w.offset
                };
                c.wrote(*i, at, &w.data, a.size)
            }
            _ => gfids.iter().for_each(|d| c.drop_data(*d)),
        },
        Op::Setattr(s) if s.size.is_some() => match &changed {
            Some((i, a)) => c.wrote(*i, 0, b"", a.size),
            None => gfids.iter().for_each(|d| c.drop_data(*d)),
        },
        Op::Fallocate(_) => gfids.iter().for_each(|d| c.drop_data(*d)),
        _ => {}
    }
    // The reply's inode as it is now (the leases of a rename's moved inode or a link's
    // target came with the reply too).
    if let Some((i, a)) = changed {
        c.put_lease(c.ticket(), i, grants.clone());
        c.put_attr(c.ticket(), i, a, ids, grants);
    }
}

impl Volume {
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
        Self::unlock_with(members, gfids, needs_heal, false).await
    }

    /// Unlocks; `needs_heal`: a copy was left behind (keep the inodes in the heal index);
    /// `healed`: a heal left every copy identical (take them off it).
    pub(crate) async fn unlock_with(
        members: &[Member],
        gfids: &[Gfid],
        needs_heal: bool,
        healed: bool,
    ) {
        let raw: Vec<Vec<u8>> = gfids.iter().map(|g| g.to_vec()).collect();
        join_all(members.iter().filter(|m| m.current()).map(|m| {
            let req = pb::UnlockReq {
                session: m.session.to_vec(),
                gfids: raw.clone(),
                needs_heal,
                healed,
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
            let copies: Vec<Copy> = held
                .iter()
                .map(|(r, _)| {
                    let x = r.inodes.get(i);
                    Copy {
                        ver: ver_of(x.and_then(|x| x.ver)),
                        pending: x.is_some_and(|x| x.pending),
                    }
                })
                .collect();
            let (vmax, fresh) = match arbitrate::writable(&copies, quorum) {
                Ok(w) => w,
                Err(e) => {
                    // Too few good copies to take a change safely (or they contradict each
                    // other): heal must run first.
                    Self::unlock_on(&members, gfids, false).await;
                    self.queue_heal(gfids[i]).await;
                    tracing::warn!(gfid = %gfids[i], "cannot write: {e}");
                    return Err(e);
                }
            };
            let fresh: Vec<Member> = fresh.into_iter().map(|k| held[k].1.clone()).collect();
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

    pub(crate) async fn releaser(weak: Weak<Volume>) {
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
    /// say), heals them now and runs it again. A client that may not heal (a mount's
    /// certificate allows no heal steps) waits a while for the bricks' own heal instead:
    /// `acquire` has queued the inodes with them.
    async fn healing<T, F, Fut>(&self, gfids: &[Gfid], f: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        match f().await {
            Err(Error::NoGoodCopy) => {}
            r => return r,
        }
        if !self.heal_denied.load(Relaxed) && self.heal_first(gfids).await {
            return f().await;
        }
        let deadline = Instant::now() + HEAL_WAIT;
        let mut pause = Duration::from_millis(50);
        loop {
            match f().await {
                Err(Error::NoGoodCopy) if Instant::now() + pause < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                r => return r,
            }
        }
    }

    /// Heals `gfids` before a change; false at the first that could not be healed. A
    /// refused heal step (a mount's certificate) is remembered: this client stops trying.
    async fn heal_first(&self, gfids: &[Gfid]) -> bool {
        for g in gfids {
            match self.heal(*g, crate::heal::Source::Newest).await {
                Ok(_) => {}
                Err(Error::Denied { msg, .. }) => {
                    tracing::info!("{msg}: changes after a fault wait for the bricks' heal");
                    self.heal_denied.store(true, Relaxed);
                    return false;
                }
                Err(e) => {
                    tracing::warn!(gfid = %g, "heal before a change or fsync: {e}");
                    return false;
                }
            }
        }
        true
    }

    /// Runs one change of `gfids` (the inodes whose version it changes) on the bricks.
    pub(crate) async fn mutate(
        &self,
        gfids: &[Gfid],
        op: pb::mutate_req::Op,
    ) -> Result<pb::MutateReply> {
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
        // Every brick that applies a create grants its creator the new inode's lock. Its
        // transaction is entered now, so that nothing else of this client (the orphan check
        // of a contention notice, see `Volume::on_contended`) acts on the inode before the
        // outcome says who holds that lock.
        let mut created = None;
        if let pb::mutate_req::Op::Create(c) = &mut op {
            c.term = term;
            if let Some(g) = Gfid::from_bytes(&c.gfid) {
                let tx = self.tx(g);
                let guard = tx.hold.clone().lock_owned().await;
                created = Some((g, tx, guard));
            }
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
                id: rand_u64(),
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
        let generation = self.vol.read().unwrap().generation;
        let bytes = match &op {
            pb::mutate_req::Op::Write(w) => w.data.len(),
            _ => 0,
        };
        let results = join_all(targets.iter().map(|m| {
            let req = pb::MutateReq {
                session: m.session.to_vec(),
                now_ns: now,
                updates: updates.clone(),
                needs_heal,
                generation,
                op: Some(op.clone()),
            };
            let epoch = m.epoch;
            m.brick.call_sized(bytes, move |mut c, up| async move {
                if up.epoch != epoch {
                    return Err(tonic::Status::unavailable("reconnected: lock lost"));
                }
                c.mutate(req).await
            })
        }))
        .await;
        let mut replies = Vec::with_capacity(targets.len());
        let mut answers = Vec::with_capacity(targets.len());
        for (m, r) in targets.iter().zip(results) {
            let (reply, answer) = match r {
                Ok((rep, _)) if rep.stale || rep.errno == libc::ENOLCK => {
                    tracing::warn!(brick = %m.brick.id, "copy is stale or lock lost; leaving it to heal");
                    (Reply::Stale, None)
                }
                Ok((rep, _)) if rep.errno == 0 => (Reply::Applied, Some(rep)),
                Ok((rep, _)) => (Reply::Refused(rep.errno), None),
                // Refused for this client's role (a mount's certificate setting a quota):
                // an answer, and the same at every brick; not a brick that is away.
                Err(Error::Denied { .. }) => (Reply::Refused(libc::EACCES), None),
                Err(e) => {
                    tracing::warn!("{e}");
                    (Reply::Lost, None)
                }
            };
            replies.push(reply);
            answers.push(answer);
        }
        let outcome = arbitrate::mutation_outcome(&replies, quorum);
        // Bricks that all refused the same way (ENOTEMPTY, EDQUOT, ...) agree: that is the
        // answer, not news. Only different outcomes are worth a warning, and at most a few.
        let mut kinds: Vec<Reply> = replies
            .iter()
            .copied()
            .filter(|r| matches!(r, Reply::Applied | Reply::Refused(_)))
            .collect();
        kinds.dedup();
        if outcome.result.is_err()
            && kinds.len() > 1
            && let Some(suppressed) = DISAGREE_WARNINGS.allow()
        {
            let answers: Vec<(&str, Reply)> = targets
                .iter()
                .zip(&replies)
                .map(|(m, r)| (m.brick.id.as_str(), *r))
                .collect();
            tracing::warn!(?answers, suppressed, "bricks disagree on a change");
        }
        let members: Vec<Member> = outcome
            .members
            .iter()
            .map(|i| targets[*i].clone())
            .collect();
        let advanced = outcome.advanced;
        if let Some(c) = &self.cache {
            // What this client caches follows its own change when every brick took it and
            // leased what it changed; otherwise what it had of those inodes goes.
            let leased = outcome.result.is_ok()
                && members.len() == targets.len()
                && answers.iter().all(|a| a.as_ref().is_some_and(|r| r.leased));
            let reply = match (&outcome.result, leased) {
                (Ok(i), true) => answers[*i].as_ref(),
                _ => None,
            };
            let grants: Vec<crate::lease::Grant> = members
                .iter()
                .map(|m| (m.brick.id.clone(), m.epoch))
                .collect();
            cache_change(c, &op, &gfids, reply, grants);
        }
        let result = outcome
            .result
            .map(|i| answers[i].take().expect("an applied change has its reply"));
        for (guard, new) in guards.iter_mut().zip(&new_vers) {
            let h = guard.as_mut().unwrap();
            h.members = members.clone();
            h.missing |= members.len() < total;
            if advanced {
                h.ver = *new;
            }
        }
        if let Some((g, tx, mut guard)) = created {
            let granted: Vec<Member> = targets
                .iter()
                .zip(&replies)
                .filter(|(_, r)| matches!(r, Reply::Applied))
                .map(|(m, _)| m.clone())
                .collect();
            if result.is_ok() {
                // The creator holds the new inode's lock already: its first write is one
                // round trip.
                *guard = Some(Hold {
                    term,
                    ver: Ver::default(),
                    locked: granted,
                    missing: members.len() < total,
                    members: members.clone(),
                });
                *tx.last_used.lock().unwrap() = Some(Instant::now());
            } else if !granted.is_empty() {
                // A create that failed still left its lock on the bricks that applied it:
                // give it back, or nobody (heal included) could take the inode again while
                // this client lives. The copies made go to heal.
                Self::unlock_on(&granted, &[g], true).await;
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
}
