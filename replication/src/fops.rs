//! Inode writes (write, truncate, setattr, xattrs, fallocate) and directory writes
//! (create, remove, rename, link): each builds its change and runs it as one transaction.

use mortar_common::error::{Error, Result};
use mortar_common::gfid::Gfid;
use mortar_proto as pb;

use crate::volume::Volume;

impl Volume {
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

    /// Creates a regular file and opens it through the lease its creator gets (see
    /// [`Volume::open_leased`]): the bricks count the open only if a recall comes while it
    /// lasts, and the close costs nothing. Without a lease, as [`Volume::create_open`].
    /// True when leased: end it with [`Volume::release_leased`].
    pub async fn create_open_leased(
        &self,
        parent: Gfid,
        name: &[u8],
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(pb::Attr, bool)> {
        let Some(c) = &self.cache else {
            return self
                .create_open(parent, name, mode, uid, gid)
                .await
                .map(|a| (a, false));
        };
        let a = self
            .create(parent, name, pb::Kind::File, mode, uid, gid, 0, b"")
            .await?;
        let g = Gfid::from_bytes(&a.gfid).ok_or(Error::Os(libc::EIO))?;
        if c.open(g, self.trust()).is_some() {
            return Ok((a, true));
        }
        // Not leased (another client reached it already): counted the usual way.
        self.open(g).await.map(|a| (a, false))
    }

    /// Before this client unlinks or replaces `name` in `dir`: if it has that file open
    /// through leases, the bricks count those opens first (an unlink keeps the data of a
    /// file only while the bricks know it is open; another client's unlink would recall the
    /// lease and learn of them then, but this client's own is not recalled).
    async fn count_leased_opens(&self, dir: Gfid, name: &[u8]) {
        let Some(c) = &self.cache else { return };
        if !c.any_open() {
            return;
        }
        let victim = match c.dir_get(dir, name) {
            Some(g) => g,
            None => match self
                .lookup(dir, name)
                .await
                .ok()
                .and_then(|a| Gfid::from_bytes(&a.gfid))
            {
                Some(g) => g,
                None => return,
            },
        };
        for b in self.bricks() {
            let Some(up) = b.up() else { continue };
            for _ in 0..c.to_count(victim, &(b.id.clone(), up.epoch)) {
                let req = pb::OpenReq {
                    session: up.session.to_vec(),
                    gfid: victim.to_vec(),
                };
                if let Err(e) = b
                    .call(move |mut cl, _| async move { cl.open(req).await })
                    .await
                {
                    tracing::debug!(brick = %b.id, "counting an open before an unlink: {e}");
                }
            }
        }
    }

    pub async fn remove(&self, parent: Gfid, name: &[u8], dir: bool) -> Result<()> {
        if !dir {
            self.count_leased_opens(parent, name).await;
        }
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
        self.count_leased_opens(newparent, newname).await;
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

    pub async fn write(
        &self,
        g: Gfid,
        offset: u64,
        data: impl Into<pb::Bytes>,
        append: bool,
    ) -> Result<u64> {
        let op = pb::mutate_req::Op::Write(pb::Write {
            gfid: g.to_vec(),
            offset,
            data: data.into(),
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

    /// Limits the apparent size of the tree under directory `dir` (0: no limit).
    pub async fn set_quota(&self, dir: Gfid, limit_bytes: u64) -> Result<()> {
        let op = pb::mutate_req::Op::SetQuota(pb::SetQuota {
            gfid: dir.to_vec(),
            limit: limit_bytes,
        });
        self.mutate(&[dir], op).await.map(|_| ())
    }
}
