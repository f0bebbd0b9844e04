//! Self-heal of inodes: make every reachable copy like the newest one.
//!
//! Healing an inode takes its lock on every reachable brick (a majority at least, so no
//! writer runs meanwhile), compares versions, and brings each stale copy ("sink") level with
//! a newest one ("source"): directory entries (creates, deletes, renames, hard links,
//! symlinks), data (only the blocks whose checksums differ), metadata (mode, owner, times,
//! user xattrs), and last the version, so that a heal cut short is simply done again.
//! Directories lead to their children, which makes the heal of a new brick's root a full heal.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::future::join_all;
use mortar_proto as pb;

use mortar_common::error::{Error, Result};
use mortar_common::gfid::{Gfid, rand_u64};

pub use crate::arbitrate::Source;
use crate::arbitrate::{self, Copy, Ver, pver, ver_of};
use crate::conn::Brick;
use crate::txn::{InodeTx, Member};
use crate::volume::Volume;

/// Size of the blocks compared during data heal (the brick's checksum unit).
pub const BLOCK: u32 = 128 * 1024;

/// Inodes healed at once below the one asked for.
const PARALLEL: usize = 16;
/// A new copy is filled this much per request ...
const CHUNK: u32 = 1 << 20;
/// ... and so many requests of one file's copy are in flight at once.
const IN_FLIGHT: usize = 8;
/// A directory heal makes a missing small file complete along with its name (`fill_new`)
/// up to this size ...
const FILL_MAX: u64 = 1 << 20;
/// ... this many at a time under one lock request (the brick's most inodes per lock).
const FILL_BATCH: usize = 16;

/// A name to make in a sink's directory: the name, the source's inode, its gfid.
type NewEntry = (Vec<u8>, pb::Attr, Gfid);

/// How long a heal copies a file's data before it lets a waiting client write: long enough
/// that every pass gets on, short enough that the client hardly notices.
const YIELD_AFTER: Duration = Duration::from_secs(1);

/// A heal's hold on one inode's lock.
struct HealLock<'a> {
    tx: &'a InodeTx,
    since: Instant,
}

impl HealLock<'_> {
    /// A client waits to change the inode and the heal has had its turn.
    fn should_yield(&self) -> bool {
        self.tx.contended.load(Relaxed) && self.since.elapsed() >= YIELD_AFTER
    }
}

#[derive(Debug, Default, Clone)]
pub struct HealStats {
    /// Inodes found needing heal and healed.
    pub healed: u64,
    /// Inodes looked at.
    pub checked: u64,
    pub bytes: u64,
    /// Every brick of the volume took part and agrees now.
    pub complete: bool,
    /// Inodes below the one asked for that could not be healed now (busy, say): the
    /// caller keeps them for a later pass.
    pub failed: Vec<Gfid>,
}

/// A brick's whole heal index, page by page (no reply grows with the index); `fetch` sends
/// one HealIndex request.
pub async fn list_index<E, F, Fut>(mut fetch: F) -> std::result::Result<Vec<pb::HealIndexEntry>, E>
where
    F: FnMut(pb::HealIndexReq) -> Fut,
    Fut: Future<Output = std::result::Result<pb::HealIndexReply, E>>,
{
    let mut all: Vec<pb::HealIndexEntry> = Vec::new();
    loop {
        let req = pb::HealIndexReq {
            list: true,
            after: all.last().map(|e| e.gfid.clone()).unwrap_or_default(),
            ..Default::default()
        };
        let r = fetch(req).await?;
        let done = r.entries.is_empty() || all.len() + r.entries.len() >= r.total as usize;
        all.extend(r.entries);
        if done {
            return Ok(all);
        }
    }
}

fn errno_result(errno: i32) -> Result<()> {
    Error::from_errno(errno)
}

/// Requests to one brick inside a heal, on the session that holds the lock.
impl Member {
    async fn attr(&self, g: Gfid) -> Result<Option<pb::Attr>> {
        let (r, _) = self
            .brick
            .call(move |mut c, _| async move {
                c.getattr(pb::GfidReq {
                    gfid: g.to_vec(),
                    ..Default::default()
                })
                .await
            })
            .await?;
        match r.errno {
            0 => Ok(r.attr),
            libc::ENOENT => Ok(None),
            e => Err(Error::Os(e)),
        }
    }

    async fn readdir(&self, g: Gfid) -> Result<Vec<pb::DirEntry>> {
        crate::read::list_dir(&self.brick, g).await
    }

    async fn read(&self, g: Gfid, offset: u64, size: u32) -> Result<pb::Bytes> {
        Ok(self.read_with(g, offset, size, false).await?.data)
    }

    /// A read that may also bring the inode's user xattrs (one round trip for a new copy).
    async fn read_with(
        &self,
        g: Gfid,
        offset: u64,
        size: u32,
        xattrs: bool,
    ) -> Result<pb::ReadReply> {
        let (r, _) = self
            .brick
            .call(move |mut c, _| async move {
                c.read(pb::ReadReq {
                    gfid: g.to_vec(),
                    offset,
                    size,
                    xattrs,
                })
                .await
            })
            .await?;
        errno_result(r.errno)?;
        Ok(r)
    }

    async fn readlink(&self, g: Gfid) -> Result<Vec<u8>> {
        let (r, _) = self
            .brick
            .call(move |mut c, _| async move {
                c.readlink(pb::GfidReq {
                    gfid: g.to_vec(),
                    ..Default::default()
                })
                .await
            })
            .await?;
        errno_result(r.errno)?;
        Ok(r.target)
    }

    async fn xattrs(&self, g: Gfid) -> Result<Vec<pb::XattrPair>> {
        let (r, _) = self
            .brick
            .call(move |mut c, _| async move {
                c.listxattr(pb::GfidReq {
                    gfid: g.to_vec(),
                    ..Default::default()
                })
                .await
            })
            .await?;
        errno_result(r.errno)?;
        let mut out = Vec::new();
        for name in r.names {
            let n = name.clone();
            let (v, _) = self
                .brick
                .call(move |mut c, _| async move {
                    c.getxattr(pb::XattrReq {
                        gfid: g.to_vec(),
                        name: n,
                    })
                    .await
                })
                .await?;
            if v.errno == 0 {
                out.push(pb::XattrPair {
                    name,
                    value: v.value,
                });
            }
        }
        Ok(out)
    }

    /// The file's size and the checksums of one page of blocks from block `first` (the
    /// brick bounds a page; an empty page means the end of the file).
    async fn checksums(&self, g: Gfid, first: u64) -> Result<(u64, Vec<u64>)> {
        let (r, _) = self
            .brick
            .call(move |mut c, _| async move {
                c.checksums(pb::ChecksumReq {
                    gfid: g.to_vec(),
                    block: BLOCK,
                    first,
                    max: 0,
                })
                .await
            })
            .await?;
        errno_result(r.errno)?;
        Ok((r.size, r.sums))
    }

    async fn step(&self, g: Gfid, ctime_ns: i64, op: pb::heal_req::Op) -> Result<pb::Attr> {
        let req = pb::HealReq {
            session: self.session.to_vec(),
            gfid: g.to_vec(),
            ctime_ns,
            op: Some(op),
        };
        // The brick this client runs in takes it in-process (same session, same checks).
        if let Some(local) = self.brick.local.as_ref().filter(|_| self.current()) {
            let r = (local.step)(req).await.map_err(|s| Error::Transport {
                brick: self.brick.id.clone(),
                msg: s.message().to_string(),
            })?;
            errno_result(r.errno)?;
            return r.attr.ok_or(Error::Os(libc::EIO));
        }
        let epoch = self.epoch;
        let bytes = match &req.op {
            Some(pb::heal_req::Op::Write(w)) => w.data.len(),
            Some(pb::heal_req::Op::Entry(e)) => e.data.len(),
            _ => 0,
        };
        let (r, _) = self
            .brick
            .call_sized(bytes, move |mut c, up| async move {
                if up.epoch != epoch {
                    return Err(tonic::Status::unavailable("reconnected: lock lost"));
                }
                c.heal(req).await
            })
            .await?;
        errno_result(r.errno)?;
        r.attr.ok_or(Error::Os(libc::EIO))
    }

    /// Copies `len` bytes of `g` at `off` from `src` into this (the sink's, in-process)
    /// copy over a bulk connection (`crate::bulk`), when both ends have one: `None` when
    /// the block must go the usual way (a TLS cluster, a sink in another process, a source
    /// without the service or with a broken connection). `throttle` runs before the copy.
    async fn splice_from<F: std::future::Future<Output = ()>>(
        &self,
        src: &Member,
        g: Gfid,
        off: u64,
        len: u32,
        throttle: impl FnOnce() -> F,
    ) -> Option<Result<u64>> {
        let splice = self.brick.local.as_ref()?.splice.clone()?;
        if !self.current() || !src.brick.bulk.available() {
            return None;
        }
        throttle().await;
        let (src_brick, session) = (src.brick.clone(), self.session);
        let copied = tokio::task::spawn_blocking(move || {
            src_brick
                .bulk
                .copy(&src_brick.addr, g, off, len, |from, n| {
                    splice(&session, g, off, n, from)
                })
        })
        .await
        .ok()?;
        match copied {
            crate::bulk::Copied::Done(n) => Some(Ok(n)),
            crate::bulk::Copied::Errno(e) => Some(Err(Error::Os(e))),
            crate::bulk::Copied::Unavailable => None,
        }
    }

    async fn index(&self, req: pb::HealIndexReq) -> Result<()> {
        self.brick
            .call(move |mut c, _| async move { c.heal_index(req).await })
            .await
            .map(|_| ())
    }
}

impl Volume {
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

    /// Heals `g` and, for directories, whatever below it differs. `source` decides the
    /// winner for `g` itself; everything below follows the newest copy.
    pub async fn heal(&self, g: Gfid, source: Source) -> Result<HealStats> {
        let one = |g: Gfid, source: Source, wait: bool| async move {
            let mut st = HealStats {
                complete: true,
                ..Default::default()
            };
            let r = self.heal_inode(g, &source, wait, &mut st).await;
            (g, r, st)
        };
        // The inode asked for first, alone: its failure is the caller's error. If busy, its
        // holder was told to let go: give it a moment. A client that keeps writing takes
        // the lock again before a later try comes (a file under steady writes was never
        // healed while the writer went on): after two tries the heal waits in the bricks'
        // queue, in brick order as clients do, so that it comes next.
        let mut tries = 0;
        let (_, r, mut stats) = loop {
            let out = one(g, source.clone(), tries >= 2).await;
            tries += 1;
            if !matches!(out.1, Err(Error::Busy)) || tries == 10 {
                break out;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100 * tries)).await;
        };
        let mut pending = r?;
        let mut seen: HashSet<Gfid> = HashSet::from([g]);
        // Then what it leads to, several inodes at a time: round trips, not bandwidth, bound
        // the heal of many small files.
        let mut running = futures::stream::FuturesUnordered::new();
        loop {
            while running.len() < PARALLEL {
                let Some(c) = pending.pop() else { break };
                if seen.insert(c) {
                    running.push(one(c, Source::Newest, false));
                }
            }
            let Some((c, r, st)) = futures::StreamExt::next(&mut running).await else {
                break;
            };
            stats.healed += st.healed;
            stats.checked += st.checked;
            stats.bytes += st.bytes;
            stats.complete &= st.complete;
            match r {
                Ok(children) => pending.extend(children),
                Err(e) => {
                    // Left for a later pass: make sure one will look at it.
                    if !matches!(e, Error::Busy) {
                        tracing::warn!(gfid = %c, "heal: {e}");
                    }
                    stats.complete = false;
                    stats.failed.push(c);
                }
            }
        }
        Ok(stats)
    }

    async fn heal_inode(
        &self,
        g: Gfid,
        source: &Source,
        wait: bool,
        stats: &mut HealStats,
    ) -> Result<Vec<Gfid>> {
        // One transaction per inode in this client, heals included: our own eager lock
        // goes first (the heal takes the inode's locks itself).
        let tx = self.tx(g);
        let mut guard = tx.hold.lock().await;
        if let Some(h) = guard.take() {
            Self::unlock_on(&h.locked, &[g], h.missing).await;
        }
        // Only who waits for this heal's lock counts (see `heal_copy`).
        tx.contended.store(false, Relaxed);
        // A heal does not queue behind other clients at first: the holder is told to let
        // go, and a later try (or the other healer already at it) does the work. `wait`
        // queues it (see `heal`).
        let (term, held) = self.lock_raw(&[g], wait).await?;
        let members: Vec<Member> = held.into_iter().map(|(_, m)| m).collect();
        let lock = HealLock {
            tx: &tx,
            since: Instant::now(),
        };
        let r = self
            .heal_locked(g, term, &members, &lock, source, stats)
            .await;
        // Healed: every brick has an identical copy, and the unlock takes `g` off the
        // bricks' heal indexes (in the same request).
        let healed = matches!(r, Ok((_, true)));
        Self::unlock_with(&members, &[g], false, healed).await;
        r.map(|(children, _)| children)
    }

    async fn heal_locked(
        &self,
        g: Gfid,
        term: u64,
        members: &[Member],
        lock: &HealLock<'_>,
        source: &Source,
        stats: &mut HealStats,
    ) -> Result<(Vec<Gfid>, bool)> {
        stats.checked += 1;
        let attrs = join_all(members.iter().map(|m| m.attr(g))).await;
        let mut present: Vec<(&Member, pb::Attr)> = Vec::new();
        let mut complete = members.len() == self.total();
        for (m, a) in members.iter().zip(attrs) {
            match a {
                Ok(Some(a)) => present.push((m, a)),
                // Missing here: the parent directory's heal creates it.
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(brick = %m.brick.id, gfid = %g, "heal: {e}");
                    complete = false;
                }
            }
        }
        if present.is_empty() {
            return Ok((vec![], complete));
        }
        let ids: Vec<&str> = present.iter().map(|(m, _)| m.brick.id.as_str()).collect();
        let attrs: Vec<&pb::Attr> = present.iter().map(|(_, a)| a).collect();
        let all_present = present.len() == self.total();
        let plan = match arbitrate::heal_plan(source, &ids, &attrs, all_present) {
            Ok(p) => p,
            Err(e @ Error::SplitBrain) => {
                tracing::error!(gfid = %g, "split brain: copies at the same version differ");
                join_all(members.iter().map(|m| {
                    m.index(pb::HealIndexReq {
                        split_brain: vec![g.to_vec()],
                        ..Default::default()
                    })
                }))
                .await;
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        let forced = plan.new_version;
        let (src_m, src_a) = (present[plan.source].0, present[plan.source].1.clone());
        let sinks: Vec<&Member> = plan.sinks.iter().map(|i| present[*i].0).collect();
        let mut children = Vec::new();
        if !sinks.is_empty() {
            tracing::info!(gfid = %g, source = %src_m.brick.id, sinks = ?sinks.iter().map(|m| &m.brick.id).collect::<Vec<_>>(), "healing");
            stats.healed += 1;
        }
        // Every copy left out of the sinks is as good as the source: a file's blocks are
        // read from all of them in turn, which spreads the copy over more connections.
        let sources: Vec<&Member> = std::iter::once(src_m)
            .chain(
                present
                    .iter()
                    .enumerate()
                    .filter(|(i, (_, a))| {
                        *i != plan.source
                            && !plan.sinks.contains(i)
                            && Copy::of(a) == Copy::of(&src_a)
                    })
                    .map(|(_, (m, _))| *m),
            )
            .collect();
        let mut finished = Vec::with_capacity(sinks.len());
        for (sink, i) in sinks.iter().zip(&plan.sinks) {
            let (kids, done) = self
                .heal_copy(&sources, sink, &present[*i].1, g, &src_a, lock, stats)
                .await?;
            children.extend(kids);
            complete &= done;
            finished.push(done);
        }
        // The version goes last: a heal cut short, or one that had to leave something for
        // later, leaves the sink visibly stale, so that it is taken up again.
        if forced {
            // A split brain settled by a choice, or copies that all stopped in the middle of
            // a change: one new version, above all of them, on every copy; only once every
            // sink is level, else the copies would agree on a version but not on content.
            if !finished.iter().all(|d| *d) {
                stats.complete = false;
                return Ok((children, false));
            }
            let v = Ver {
                term,
                seq: 1,
                id: rand_u64(),
            };
            for (m, _) in &present {
                m.step(
                    g,
                    src_a.ctime_ns,
                    pb::heal_req::Op::SetVersion(pver(v).unwrap()),
                )
                .await?;
            }
        } else {
            let ver = pver(ver_of(src_a.ver)).unwrap();
            for (sink, done) in sinks.iter().zip(finished) {
                if done {
                    sink.step(g, src_a.ctime_ns, pb::heal_req::Op::SetVersion(ver))
                        .await?;
                }
            }
        }
        complete &= present.len() == members.len();
        stats.complete &= complete;
        Ok((children, complete))
    }

    /// Makes `sink`'s missing inodes among the new entries of directory `g` complete in one
    /// step each (name, content, metadata and version), under one lock request for up to
    /// `FILL_BATCH` of them, instead of making each empty and healing it on its own (a dozen
    /// round trips for a small file). Only where the outcome is plain: every brick of the
    /// volume holds the lock, the sink lacks the inode, and every other copy is clean at the
    /// version the source listed. Returns the entries left for the usual way.
    async fn fill_new(
        &self,
        src: &Member,
        sink: &Member,
        g: Gfid,
        new: Vec<NewEntry>,
        stats: &mut HealStats,
    ) -> Vec<NewEntry> {
        let fillable = |ca: &pb::Attr| match ca.kind() {
            pb::Kind::Dir | pb::Kind::Unknown => false,
            pb::Kind::File => ca.size <= FILL_MAX,
            _ => true,
        };
        let (mut fill, mut rest): (Vec<_>, Vec<_>) =
            new.into_iter().partition(|(_, ca, _)| fillable(ca));
        while !fill.is_empty() {
            let batch: Vec<NewEntry> = fill.drain(..fill.len().min(FILL_BATCH)).collect();
            let gfids: Vec<Gfid> = batch.iter().map(|e| e.2).collect();
            // This client's own transactions on these inodes go first, as in `heal_inode`;
            // one busy here right now is left to the usual way.
            let mut holds = Vec::with_capacity(gfids.len());
            for c in &gfids {
                match self.tx(*c).hold.clone().try_lock_owned() {
                    Ok(h) if h.is_none() => holds.push(h),
                    _ => break,
                }
            }
            let all_up = self.bricks().iter().all(|b| b.is_up());
            if holds.len() < gfids.len() || !all_up {
                rest.extend(batch);
                continue;
            }
            let held = match self.lock_raw(&gfids, false).await {
                Ok((_, held)) => held,
                Err(_) => {
                    rest.extend(batch);
                    continue;
                }
            };
            let members: Vec<Member> = held.iter().map(|(_, m)| m.clone()).collect();
            if held.len() < self.total() {
                Self::unlock_on(&members, &gfids, false).await;
                rest.extend(batch);
                continue;
            }
            let plain = |i: usize| {
                held.iter().all(|(r, m)| {
                    let Some(x) = r.inodes.get(i).filter(|x| x.gfid == gfids[i].to_vec()) else {
                        return false;
                    };
                    if m.brick.id == sink.brick.id {
                        x.ver.is_none()
                    } else {
                        x.ver.is_some() && !x.pending && x.ver == batch[i].1.ver
                    }
                })
            };
            let entries = &batch;
            let copies: Vec<(usize, u64)> =
                futures::stream::iter((0..batch.len()).filter(|i| plain(*i)))
                    .map(|i| async move {
                        let (name, ca, cg) = &entries[i];
                        match self.fill_one(src, sink, g, name, ca, *cg).await {
                            Ok(n) => Some((i, n)),
                            Err(e) => {
                                tracing::debug!(gfid = %cg, "heal: complete copy: {e}");
                                None
                            }
                        }
                    })
                    .buffer_unordered(PARALLEL)
                    .filter_map(futures::future::ready)
                    .collect()
                    .await;
            stats.bytes += copies.iter().map(|(_, n)| n).sum::<u64>();
            let filled: HashSet<usize> = copies.into_iter().map(|(i, _)| i).collect();
            let (mut made, mut left) = (Vec::new(), Vec::new());
            for (i, e) in batch.into_iter().enumerate() {
                if filled.contains(&i) {
                    made.push(e.2);
                } else {
                    left.push(e.2);
                    rest.push(e);
                }
            }
            stats.healed += made.len() as u64;
            stats.checked += made.len() as u64;
            // Every copy of what was made is identical now: off the heal index with the
            // unlock. The rest keep whatever index entries they have.
            futures::join!(
                Self::unlock_with(&members, &made, false, true),
                Self::unlock_on(&members, &left, false)
            );
            drop(holds);
        }
        rest
    }

    /// One complete new copy for `fill_new`; returns the bytes copied.
    async fn fill_one(
        &self,
        src: &Member,
        sink: &Member,
        g: Gfid,
        name: &[u8],
        ca: &pb::Attr,
        cg: Gfid,
    ) -> Result<u64> {
        // One request to the source per new copy: a file's content comes with its xattrs.
        let (data, target, xattrs) = match ca.kind() {
            pb::Kind::File => {
                let r = src.read_with(cg, 0, ca.size as u32, true).await?;
                // Under the lock the size cannot change: anything else is a broken reply.
                if r.data.len() as u64 != ca.size {
                    return Err(Error::Os(libc::EIO));
                }
                (r.data, vec![], r.xattrs)
            }
            pb::Kind::Symlink => (pb::Bytes::new(), src.readlink(cg).await?, vec![]),
            _ => (pb::Bytes::new(), vec![], src.xattrs(cg).await?),
        };
        let n = data.len() as u64;
        self.heal_throttle(n).await;
        let entry = pb::HealEntry {
            name: name.to_vec(),
            attr: Some(ca.clone()),
            target,
            ver: ca.ver,
            data,
            meta: Some(pb::HealMeta {
                mode: ca.mode,
                uid: ca.uid,
                gid: ca.gid,
                atime_ns: ca.atime_ns,
                mtime_ns: ca.mtime_ns,
                xattrs,
            }),
        };
        sink.step(g, 0, pb::heal_req::Op::Entry(entry)).await?;
        Ok(n)
    }

    /// Makes `sink`'s copy of `g` like `src`'s. Returns the children to heal next, and
    /// whether nothing had to be left for later.
    #[allow(clippy::too_many_arguments)]
    async fn heal_copy(
        &self,
        sources: &[&Member],
        sink: &Member,
        sink_attr: &pb::Attr,
        g: Gfid,
        a: &pb::Attr,
        lock: &HealLock<'_>,
        stats: &mut HealStats,
    ) -> Result<(Vec<Gfid>, bool)> {
        let src = sources[0];
        let mut children = Vec::new();
        let mut done = true;
        match a.kind() {
            pb::Kind::Dir => {
                let (from, to) = futures::join!(src.readdir(g), sink.readdir(g));
                let (from, to) = (from?, to?);
                let src_names: HashMap<&[u8], &pb::Attr> = from
                    .iter()
                    .filter_map(|e| e.attr.as_ref().map(|a| (e.name.as_slice(), a)))
                    .collect();
                let sink_names: HashMap<&[u8], &pb::Attr> = to
                    .iter()
                    .filter_map(|e| e.attr.as_ref().map(|a| (e.name.as_slice(), a)))
                    .collect();
                // Creations first, so that a renamed or hard-linked inode is linked or moved
                // into its new name before its old name goes. Several at a time (round trips
                // bound the heal of many small files), except hard links: two names of one
                // new inode made at once would each make an inode.
                let mut make = Vec::new();
                for (name, ca) in &src_names {
                    let cg = Gfid::from_bytes(&ca.gfid).ok_or(Error::Os(libc::EIO))?;
                    match sink_names.get(name) {
                        Some(sa) if sa.gfid == ca.gfid => {
                            if Copy::of(sa) != Copy::of(ca) || sa.kind() == pb::Kind::Dir {
                                children.push(cg);
                            }
                        }
                        _ => make.push((name.to_vec(), (*ca).clone(), cg)),
                    }
                }
                let make_one = |(name, ca, cg): (Vec<u8>, pb::Attr, Gfid)| async move {
                    let target = if ca.kind() == pb::Kind::Symlink {
                        src.readlink(cg).await?
                    } else {
                        vec![]
                    };
                    let entry = pb::HealEntry {
                        name,
                        attr: Some(ca),
                        target,
                        ..Default::default()
                    };
                    sink.step(g, a.ctime_ns, pb::heal_req::Op::Entry(entry))
                        .await?;
                    Ok::<_, Error>(cg)
                };
                let (linked, single): (Vec<_>, Vec<_>) = make
                    .into_iter()
                    .partition(|(_, ca, _)| ca.kind() != pb::Kind::Dir && ca.nlink > 1);
                let single = self.fill_new(src, sink, g, single, stats).await;
                let made: Vec<Result<Gfid>> = futures::stream::iter(single)
                    .map(make_one)
                    .buffer_unordered(PARALLEL)
                    .collect()
                    .await;
                for r in made {
                    children.push(r?);
                }
                for l in linked {
                    children.push(make_one(l).await?);
                }
                for (name, sa) in &sink_names {
                    // A name the source has was made right by the loop above, which
                    // replaced whatever inode the sink had under it: removing it now would
                    // throw away the new inode (a name replaced while the sink was away).
                    if src_names.contains_key(name) {
                        continue;
                    }
                    // A name the source lacks. If its inode lives on at the source under a
                    // name this heal has not made yet (a move into a directory healed later),
                    // removing it would throw away what that heal can simply move: wait.
                    let sg = Gfid::from_bytes(&sa.gfid).ok_or(Error::Os(libc::EIO))?;
                    let only_name = sa.kind() == pb::Kind::Dir || sa.nlink <= 1;
                    if only_name
                        && src_names.values().all(|ca| ca.gfid != sa.gfid)
                        && src.attr(sg).await?.is_some()
                    {
                        done = false;
                        continue;
                    }
                    sink.step(g, a.ctime_ns, pb::heal_req::Op::Remove(name.to_vec()))
                        .await?;
                }
            }
            pb::Kind::File if sink_attr.size == 0 => {
                // A new or empty copy: nothing to compare, copy it all.
                let chunks = (0..a.size.div_ceil(CHUNK as u64))
                    .map(|i| (i * CHUNK as u64, CHUNK))
                    .collect();
                self.copy_blocks(sources, sink, g, a, lock, stats, chunks)
                    .await?;
            }
            pb::Kind::File => {
                // Page by page: each request's cost is bounded, whatever the file's size.
                let mut first = 0u64;
                let (mut size, mut ksize): (u64, u64);
                loop {
                    let (s, k) = futures::join!(src.checksums(g, first), sink.checksums(g, first));
                    let ((ssize, ssums), (sink_size, ksums)) = (s?, k?);
                    (size, ksize) = (ssize, sink_size);
                    if ssums.is_empty() {
                        break;
                    }
                    let differ = ssums
                        .iter()
                        .enumerate()
                        .filter(|(i, sum)| ksums.get(*i) != Some(sum))
                        .map(|(i, _)| ((first + i as u64) * BLOCK as u64, BLOCK))
                        .collect();
                    self.copy_blocks(sources, sink, g, a, lock, stats, differ)
                        .await?;
                    first += ssums.len() as u64;
                    if first.saturating_mul(BLOCK as u64) >= size {
                        break;
                    }
                }
                if ksize != size {
                    sink.step(g, a.ctime_ns, pb::heal_req::Op::Truncate(size))
                        .await?;
                }
            }
            _ => {}
        }
        let xattrs = if a.kind() == pb::Kind::Symlink {
            vec![]
        } else {
            src.xattrs(g).await?
        };
        let meta = pb::HealMeta {
            mode: a.mode,
            uid: a.uid,
            gid: a.gid,
            atime_ns: a.atime_ns,
            mtime_ns: a.mtime_ns,
            xattrs,
        };
        // Metadata after data and entries, which change the sink's times. The source's
        // attributes were read under the lock, so they still hold.
        sink.step(g, a.ctime_ns, pb::heal_req::Op::Meta(meta))
            .await?;
        Ok((children, done))
    }

    /// Copies byte ranges (offset, length) of `g` from `src` to `sink`, a few at a time
    /// (latency, not bandwidth, bounds a copy one block after another).
    #[allow(clippy::too_many_arguments)]
    async fn copy_blocks(
        &self,
        sources: &[&Member],
        sink: &Member,
        g: Gfid,
        a: &pb::Attr,
        lock: &HealLock<'_>,
        stats: &mut HealStats,
        ranges: Vec<(u64, u32)>,
    ) -> Result<()> {
        let copy = |(i, (off, len)): (usize, (u64, u32))| async move {
            let src = sources[i % sources.len()];
            // A client waits to write this file: after a while, let it. The blocks copied
            // so far stay; the next pass copies only what still differs.
            if lock.should_yield() {
                tracing::info!(gfid = %g, "heal yields to a client; resumes later");
                return Err(Error::Busy);
            }
            if let Some(n) = sink
                .splice_from(src, g, off, len, || self.heal_throttle(len as u64))
                .await
            {
                return n;
            }
            let data = src.read(g, off, len).await?;
            let n = data.len() as u64;
            self.heal_throttle(n).await;
            if n > 0 {
                let op = pb::heal_req::Op::Write(pb::HealWrite { offset: off, data });
                sink.step(g, a.ctime_ns, op).await?;
            }
            Ok(n)
        };
        let mut copied = futures::stream::iter(ranges.into_iter().enumerate())
            .map(copy)
            .buffer_unordered(IN_FLIGHT);
        while let Some(n) = copied.next().await {
            stats.bytes += n?;
        }
        Ok(())
    }

    /// Every brick's pending heals (for `mortar heal info`).
    pub async fn heal_info(
        &self,
    ) -> Vec<(Arc<crate::conn::Brick>, Result<Vec<pb::HealIndexEntry>>)> {
        let bricks = self.bricks();
        let rs = join_all(bricks.iter().map(|b| {
            list_index(move |req| async move {
                b.call(|mut c, _| async move { c.heal_index(req).await })
                    .await
                    .map(|(r, _)| r)
            })
        }))
        .await;
        bricks.into_iter().zip(rs).collect()
    }

    /// Bounds the bytes this client's heals copy per second (0: no bound), so that client
    /// I/O keeps flowing while a brick is filled.
    pub fn set_heal_rate(&self, bytes_per_sec: u64) {
        self.heal_bucket.lock().unwrap().rate = bytes_per_sec;
    }

    async fn heal_throttle(&self, n: u64) {
        let wait = {
            let mut b = self.heal_bucket.lock().unwrap();
            if b.rate == 0 {
                return;
            }
            // A token bucket holding at most one second's worth.
            let now = std::time::Instant::now();
            let refill = now.duration_since(b.at).as_secs_f64() * b.rate as f64;
            b.tokens = (b.tokens + refill).min(b.rate as f64) - n as f64;
            b.at = now;
            if b.tokens < 0.0 {
                -b.tokens / b.rate as f64
            } else {
                0.0
            }
        };
        if wait > 0.0 {
            tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
        }
    }
}

/// State of the heal rate limit.
pub(crate) struct Bucket {
    pub(crate) rate: u64,
    pub(crate) tokens: f64,
    pub(crate) at: std::time::Instant,
}

impl Default for Bucket {
    fn default() -> Self {
        Bucket {
            rate: 0,
            tokens: 0.0,
            at: std::time::Instant::now(),
        }
    }
}
