//! Reads: which copy answers (the newest, remembered per inode while it is known), failover
//! to the next good copy, and lookups decided by the newest copies of the parent.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use futures::future::join_all;
use mortar_common::error::{Error, Result};
use mortar_common::gfid::Gfid;
use mortar_proto as pb;

use crate::arbitrate::{self, Copy};
use crate::conn::Brick;
use crate::volume::Volume;

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

/// `size` bytes of a whole file's content `d` from `offset` (fewer at its end).
fn slice(d: &pb::Bytes, offset: u64, size: u32) -> pb::Bytes {
    let from = (offset as usize).min(d.len());
    d.slice(from..(from + size as usize).min(d.len()))
}

impl Volume {
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

    /// The inode's attributes if the cache has them under leases (these `cached_*` calls
    /// never wait: the FUSE layer answers with them on its own thread).
    pub fn cached_attr(&self, g: Gfid) -> Option<pb::Attr> {
        let (a, readable) = self.cache.as_ref()?.attr(g, self.trust())?;
        self.remember_readable(g, readable);
        Some(a)
    }

    /// What the cache knows of `name` in `parent`: its attributes, or ENOENT. A name the
    /// bricks would refuse (EINVAL, ENAMETOOLONG, EPERM) is theirs to answer.
    pub fn cached_lookup(&self, parent: Gfid, name: &[u8]) -> Option<Result<pb::Attr>> {
        if mortar_common::gfid::name_errno(parent, name).is_some() {
            return None;
        }
        let c = self.cache.as_ref()?;
        let ok = self.trust();
        match c.entry(parent, name, &ok)? {
            None => Some(Err(Error::Os(libc::ENOENT))),
            Some(g) => {
                let (a, readable) = c.attr(g, &ok)?;
                self.remember_readable(g, readable);
                Some(Ok(a))
            }
        }
    }

    /// Opens `g` through its lease (see [`Volume::open_leased`]), if leased.
    pub fn cached_open(&self, g: Gfid) -> Option<pb::Attr> {
        let (a, readable) = self.cache.as_ref()?.open(g, self.trust())?;
        self.remember_readable(g, readable);
        Some(a)
    }

    /// Bytes of a small file the cache holds under leases.
    pub fn cached_read(&self, g: Gfid, offset: u64, size: u32) -> Option<pb::Bytes> {
        let d = self.cache.as_ref()?.data(g, self.trust())?;
        Some(slice(&d, offset, size))
    }

    /// The inode's attributes: from the cache while leased, else from every brick (the
    /// newest copy's).
    pub async fn getattr(&self, g: Gfid) -> Result<pb::Attr> {
        if let Some(a) = self.cached_attr(g) {
            return Ok(a);
        }
        tracing::trace!(gfid = %g, "getattr: not cached");
        self.attr_everywhere(g, false).await
    }

    /// Opens a file: its attributes from every brick, fresh (close-to-open), and each brick
    /// counts the open, so that an unlink keeps the data until [`Volume::release_open`].
    pub async fn open(&self, g: Gfid) -> Result<pb::Attr> {
        self.readable.lock().unwrap().remove(&g);
        self.attr_everywhere(g, true).await
    }

    /// Opens a file through its lease when it has one: nothing to ask, as no other client
    /// changed it since (a change would have recalled the lease), and the bricks count the
    /// open only if a recall comes while it lasts. Otherwise as [`Volume::open`]. True when
    /// leased: end it with [`Volume::release_leased`].
    pub async fn open_leased(&self, g: Gfid) -> Result<(pb::Attr, bool)> {
        if let Some(a) = self.cached_open(g) {
            return Ok((a, true));
        }
        self.open(g).await.map(|a| (a, false))
    }

    /// Ends an open of [`Volume::open_leased`].
    pub fn release_leased(&self, g: Gfid, leased: bool) {
        if !leased {
            return self.release_open(g);
        }
        let Some(c) = &self.cache else { return };
        let on = c.close(g);
        let bricks = self
            .bricks()
            .into_iter()
            .filter(|b| {
                on.iter()
                    .any(|(id, epoch)| *id == b.id && b.up().is_some_and(|u| u.epoch == *epoch))
            })
            .collect();
        Self::release_on(bricks, g);
    }

    /// Ends one open of `g` on every brick; in the background, as close(2) must not wait.
    pub fn release_open(&self, g: Gfid) {
        let Ok(bricks) = self.up_bricks() else {
            return;
        };
        Self::release_on(bricks, g);
    }

    fn release_on(bricks: Vec<Arc<Brick>>, g: Gfid) {
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
        let lease = self.cache.is_some();
        let ticket = self.cache.as_ref().map_or(0, |c| c.ticket());
        let calls = bricks.iter().map(|b| {
            b.call(move |mut c, up| async move {
                if open {
                    let req = pb::OpenReq {
                        session: up.session.to_vec(),
                        gfid: g.to_vec(),
                    };
                    c.open(req).await
                } else {
                    let session = if lease {
                        up.session.to_vec()
                    } else {
                        Vec::new()
                    };
                    c.getattr(pb::GfidReq {
                        gfid: g.to_vec(),
                        session,
                    })
                    .await
                }
            })
        });
        let rs = join_all(calls).await;
        let mut found: Vec<(&Arc<Brick>, pb::Attr)> = Vec::new();
        let mut grants = Vec::new();
        let mut all_leased = true;
        let mut errno = None;
        let mut transport = None;
        for (b, r) in bricks.iter().zip(rs) {
            match r {
                Ok((rep, up)) if rep.errno == 0 && rep.attr.is_some() => {
                    all_leased &= rep.leased;
                    grants.push((b.id.clone(), up.epoch));
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
        let copies: Vec<Copy> = found.iter().map(|(_, a)| Copy::of(a)).collect();
        let (_, use_, heal) = match arbitrate::readable(&copies) {
            Ok(r) => r,
            Err(e) => {
                self.queue_heal(g).await;
                return Err(e);
            }
        };
        if heal {
            // Heal on access: the good copy answers now, the stale ones get healed.
            self.queue_heal(g).await;
        }
        let ids: Vec<String> = use_.iter().map(|i| found[*i].0.id.clone()).collect();
        self.remember_readable(g, ids.clone());
        let first = use_[0];
        let attr = found.swap_remove(first).1;
        // Cached only when every brick answered alike and leased it.
        if let Some(c) = &self.cache
            && all_leased
            && !heal
            && grants.len() == bricks.len()
            && use_.len() == grants.len()
        {
            c.put_attr(ticket, g, attr.clone(), ids, grants);
        }
        Ok(attr)
    }

    /// Looks a name up on every brick; the answer comes from the bricks with the newest copy
    /// of the parent directory, so a brick that missed a create or delete is outvoted.
    pub async fn lookup(&self, parent: Gfid, name: &[u8]) -> Result<pb::Attr> {
        if let Some(r) = self.cached_lookup(parent, name) {
            return r;
        }
        tracing::trace!(%parent, name = %String::from_utf8_lossy(name), "lookup: not cached");
        let bricks = self.up_bricks()?;
        let lease = self.cache.is_some();
        let ticket = self.cache.as_ref().map_or(0, |c| c.ticket());
        let rs = join_all(bricks.iter().map(|b| {
            let name = name.to_vec();
            b.call(move |mut c, up| async move {
                let req = pb::LookupReq {
                    parent: parent.to_vec(),
                    name,
                    session: if lease {
                        up.session.to_vec()
                    } else {
                        Vec::new()
                    },
                };
                c.lookup(req).await
            })
        }))
        .await;
        let mut replies: Vec<(&Arc<Brick>, pb::LookupReply)> = Vec::new();
        let mut grants = Vec::new();
        let mut last_err = None;
        for (b, r) in bricks.iter().zip(rs) {
            match r {
                Ok((rep, up)) => {
                    if rep.leased {
                        grants.push((b.id.clone(), up.epoch));
                    }
                    replies.push((b, rep))
                }
                Err(e) => last_err = Some(e),
            }
        }
        let views: Vec<arbitrate::LookupView> = replies
            .iter()
            .map(|(_, r)| arbitrate::LookupView {
                parent: r.parent.as_ref().map(Copy::of),
                entry: r.entry.as_ref().map(|e| (e.gfid.clone(), Copy::of(e))),
                errno: r.errno,
            })
            .collect();
        let Some(vote) = arbitrate::lookup_vote(&views) else {
            if let Some((_, r)) = replies.first() {
                return Err(Error::Os(if r.errno == 0 { libc::EIO } else { r.errno }));
            }
            return Err(last_err.unwrap_or(Error::Os(libc::EIO)));
        };
        if vote.heal_parent || replies.len() < bricks.len() {
            self.queue_heal(parent).await;
        }
        // Cached only when every brick answered alike and leased what it answered.
        let agreed = !vote.heal_parent
            && grants.len() == bricks.len()
            && replies.iter().all(|(_, r)| r.errno == replies[0].1.errno);
        if let (Some(c), true) = (&self.cache, agreed) {
            c.put_lease(ticket, parent, grants.clone());
        }
        let best = vote.answer.map_err(Error::Os)?;
        let e = replies[best]
            .1
            .entry
            .clone()
            .expect("the vote chose an entry");
        if let Some(g) = Gfid::from_bytes(&e.gfid) {
            let ids: Vec<String> = vote
                .holders
                .iter()
                .map(|i| replies[*i].0.id.clone())
                .collect();
            self.remember_readable(g, ids.clone());
            if let (Some(c), true) = (&self.cache, agreed && ids.len() == replies.len()) {
                c.put_entry(ticket, parent, name, g);
                c.put_attr(ticket, g, e.clone(), ids, grants);
            }
        }
        Ok(e)
    }

    /// Bricks that hold the newest copy of `g`, best first.
    async fn readable_bricks(&self, g: Gfid) -> Result<Vec<Arc<Brick>>> {
        if let Some(tx) = self.inodes.lock().unwrap().get(&g).cloned()
            && let Ok(h) = tx.hold.try_lock()
            && let Some(h) = h.as_ref()
        {
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

    /// Reads from the cache while leased; a small file leased is read whole, and kept.
    pub async fn read(&self, g: Gfid, offset: u64, size: u32) -> Result<pb::Bytes> {
        let Some(c) = &self.cache else {
            return self.read_copy(g, offset, size).await;
        };
        if let Some(d) = self.cached_read(g, offset, size) {
            return Ok(d);
        }
        match c.attr(g, self.trust()) {
            Some((a, _)) if a.size <= crate::lease::SMALL_FILE && a.kind() == pb::Kind::File => {
                let ticket = c.ticket();
                // One byte more than the file: a whole file comes short of it.
                let d = self.read_copy(g, 0, a.size as u32 + 1).await?;
                if d.len() as u64 == a.size {
                    c.put_data(ticket, g, d.clone());
                }
                Ok(slice(&d, offset, size))
            }
            _ => self.read_copy(g, offset, size).await,
        }
    }

    async fn read_copy(&self, g: Gfid, offset: u64, size: u32) -> Result<pb::Bytes> {
        let r = self
            .read_one(g, move |mut c| async move {
                c.read(pb::ReadReq {
                    gfid: g.to_vec(),
                    offset,
                    size,
                    xattrs: false,
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
                c.readlink(pb::GfidReq {
                    gfid: g.to_vec(),
                    ..Default::default()
                })
                .await
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
                c.listxattr(pb::GfidReq {
                    gfid: g.to_vec(),
                    ..Default::default()
                })
                .await
            })
            .await?;
        Error::from_errno(r.errno)?;
        Ok(r.names)
    }

    /// The whole listing of a directory, from one good copy. Kept when the directory is
    /// leased (its lease came before the listing was read).
    pub async fn readdir(&self, g: Gfid) -> Result<Vec<pb::DirEntry>> {
        let ticket = self
            .cache
            .as_ref()
            .map(|c| (c.ticket(), c.is_leased(g, self.trust())));
        let mut last = Error::NoGoodCopy;
        for b in self.readable_bricks(g).await? {
            match list_dir(&b, g).await {
                Err(e @ Error::Transport { .. }) => last = e,
                Ok(entries) => {
                    if let (Some(c), Some((t, true))) = (&self.cache, ticket) {
                        let names = entries.iter().filter_map(|e| {
                            Some((e.name.clone(), Gfid::from_bytes(&e.attr.as_ref()?.gfid)?))
                        });
                        c.put_dir(t, g, names);
                    }
                    return Ok(entries);
                }
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
                c.statfs(pb::GfidReq {
                    gfid: g.to_vec(),
                    ..Default::default()
                })
                .await
            })
            .await?;
        Error::from_errno(r.errno)?;
        Ok(r)
    }

    /// The quota on directory `dir`, if it has one: (limit, used) in bytes.
    pub async fn quota(&self, dir: Gfid) -> Result<Option<(u64, u64)>> {
        let r = self
            .read_one(dir, move |mut c| async move {
                c.quota(pb::GfidReq {
                    gfid: dir.to_vec(),
                    ..Default::default()
                })
                .await
            })
            .await?;
        match r.errno {
            0 => Ok(Some((r.limit, r.used))),
            libc::ENODATA => Ok(None),
            e => Err(Error::Os(e)),
        }
    }
}
