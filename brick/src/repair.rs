//! The brick's side of self-heal: steps that make this copy of an inode like another
//! brick's, applied under the healer's inode lock and without version checks (the healer
//! sets the version last, once the copy really is like the source).

use mortar_common::gfid::Gfid;
use mortar_proto as pb;
use rustix::fs::{self as rfs, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;
use std::ffi::OsStr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;

use crate::at::Loc;
use crate::record::Record;
use crate::store::{self, DirNode, R, Store, check_name, gfid, read_rec, stat_loc, ts, write_rec};

/// Size of the blocks compared by checksum during data heal.
pub const BLOCK: u32 = 128 * 1024;
/// Most blocks one Checksums request covers: it reads at most this many blocks (32 MiB at
/// the default block size), so no request's time or memory grows with the file.
pub const CHECKSUM_PAGE: u32 = 256;

impl Store {
    pub fn heal_step(&self, g: Gfid, op: &pb::heal_req::Op, ctime: i64) -> R<pb::Attr> {
        let out = self.heal_step_inner(g, op, ctime);
        // A heal brings usage level with the source's; count the tree again once an inode
        // is done (or its entries changed) rather than at every block.
        let settles = matches!(
            op,
            pb::heal_req::Op::SetVersion(_)
                | pb::heal_req::Op::Entry(_)
                | pb::heal_req::Op::Remove(_)
        );
        if settles && self.has_quotas() {
            match self.quota_of(g) {
                Some((root, _)) => self.quota_recount(&[root]),
                None if self.is_dir(g) => self.quota_recount(&[g]),
                None => {}
            }
        }
        out
    }

    fn heal_step_inner(&self, g: Gfid, op: &pb::heal_req::Op, ctime: i64) -> R<pb::Attr> {
        use pb::heal_req::Op;
        match op {
            Op::Write(w) => {
                let fd = self.file(g)?;
                store::write_all_at(&*fd, &w.data, w.offset)?;
                // Start the write-back of what was just copied now, not after the whole
                // file: the copy and the disk then work at once, and the sync before the
                // version (below) has little left to wait for. A hint: its failure only
                // leaves the work to that sync.
                // SAFETY: sync_file_range(2) on an open fd; it touches no memory of ours.
                unsafe {
                    libc::sync_file_range(
                        fd.as_raw_fd(),
                        w.offset as i64,
                        w.data.len() as i64,
                        libc::SYNC_FILE_RANGE_WRITE,
                    )
                };
                self.getattr(g)
            }
            Op::Truncate(size) => {
                rfs::ftruncate(&*self.file(g)?, *size)?;
                self.getattr(g)
            }
            Op::Meta(m) => self.heal_meta(g, m),
            Op::Entry(e) => self.heal_entry(g, e),
            Op::Remove(name) => {
                let name = check_name(name, g)?;
                let path = self.dir_path(g)?.join(name);
                self.remove_tree(&path)?;
                self.getattr(g)
            }
            Op::SetVersion(v) => {
                // The entries this heal made below directory `g` are indexed for good
                // before `g` stops looking stale (a file has no entries below it).
                if self.is_dir(g) {
                    self.sync_heal_index();
                } else if let Ok(fd) = self.file(g) {
                    // A copy claims its version only once its data is on the disk: the
                    // heal takes the inode off every brick's index next, and a crash of
                    // this brick must not leave a copy that looks current with data that
                    // never reached the disk (the version record, written after, is lost
                    // with it and the copy just looks stale again).
                    rfs::fdatasync(&*fd)?;
                }
                let path = self.path_of(g)?;
                let mut rec = read_rec(&path)?;
                rec.ver = (v.term, v.seq, v.id);
                rec.ctime_ns = ctime;
                rec.pending = 0;
                write_rec(&path, &rec)?;
                stat_loc(&path)
            }
        }
    }

    fn heal_meta(&self, g: Gfid, m: &pb::HealMeta) -> R<pb::Attr> {
        let path = self.path_of(g)?;
        self.apply_meta(&path, m)?;
        stat_loc(&path)
    }

    fn apply_meta(&self, path: &Loc, m: &pb::HealMeta) -> R<()> {
        let st = path.lstat()?;
        let is_link = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
        path.chown(Some(m.uid), Some(m.gid))?;
        if !is_link {
            path.chmod(m.mode)?;
            let have = store::list_user_xattrs(path)?;
            for name in have
                .iter()
                .filter(|n| !m.xattrs.iter().any(|x| &x.name == *n))
            {
                path.removexattr(OsStr::from_bytes(name))?;
            }
            for x in &m.xattrs {
                path.setxattr(
                    OsStr::from_bytes(&x.name),
                    &x.value,
                    rfs::XattrFlags::empty(),
                )?;
            }
        }
        let t = Timestamps {
            last_access: ts(m.atime_ns),
            last_modification: ts(m.mtime_ns),
        };
        path.utimens(&t)?;
        Ok(())
    }

    /// Makes `name` in directory `parent` the inode described by `e`: links or moves the
    /// inode if this brick has it elsewhere (a rename or hard link it missed), else creates
    /// it with the source's identity: complete if `e.ver` is set (see `HealEntry`), else
    /// empty, its content and version healed next.
    fn heal_entry(&self, parent: Gfid, e: &pb::HealEntry) -> R<pb::Attr> {
        let name = check_name(&e.name, parent)?;
        let attr = e.attr.as_ref().ok_or(Errno::INVAL)?;
        let g = gfid(&attr.gfid)?;
        let complete = match (&e.ver, &e.meta) {
            (Some(v), Some(m)) if attr.kind() != pb::Kind::Dir => Some((v, m)),
            (None, _) => None,
            // A directory is never made complete in one step (its entries are healed), and
            // a version without the metadata it stands for would be a lie.
            _ => return Err(Errno::INVAL),
        };
        if !e.data.is_empty() && (complete.is_none() || attr.kind() != pb::Kind::File) {
            return Err(Errno::INVAL);
        }
        let pdir = self.dir_path(parent)?;
        let path = pdir.join(name);
        match read_rec(&path) {
            // A complete copy is asked for an inode the healer saw missing here: whatever
            // is here now, it is not that (the healer takes the usual way).
            Ok(r) if r.gfid == g && complete.is_some() => return Err(Errno::EXIST),
            Ok(r) if r.gfid == g => return stat_loc(&path),
            Ok(_) => self.remove_tree(&path)?,
            Err(Errno::NOENT) => {}
            Err(_) => self.remove_tree(&path)?,
        }
        let kind = attr.kind();
        if kind == pb::Kind::Dir {
            if self.is_dir(g) {
                let old = self.dir_loc(g)?;
                old.rename_to(&path, rfs::RenameFlags::empty())?;
                self.dirs.write().unwrap().insert(
                    g,
                    DirNode {
                        parent,
                        name: name.to_owned(),
                    },
                );
                return stat_loc(&path);
            }
        } else if self.index_path(g).exists() {
            if complete.is_some() {
                return Err(Errno::EXIST);
            }
            self.index_path(g).link_to(&path)?;
            return stat_loc(&path);
        }
        // Until healed, an empty new copy is stale: if this heal stops midway, the index
        // brings it back to a later one. Synced with the parent's new version (`SetVersion`).
        // A complete one takes its version last, after its content: cut short, it has no
        // record and is cleared by whatever meets the name next.
        if complete.is_none() {
            self.mark_heal_unsynced(g);
        }
        let mut rec = Record::new(g, 0, attr.ctime_ns);
        if let Some((v, _)) = complete {
            rec.ver = (v.term, v.seq, v.id);
        }
        let mode = attr.mode & 0o7777;
        let mut file = None;
        match kind {
            pb::Kind::Dir => path.mkdir(mode)?,
            pb::Kind::File => {
                file = Some(path.open(
                    OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY,
                    Mode::from_raw_mode(mode),
                )?)
            }
            pb::Kind::Symlink => {
                if e.target.is_empty() || e.target.contains(&0) {
                    return Err(Errno::INVAL);
                }
                path.symlink(OsStr::from_bytes(&e.target))?
            }
            pb::Kind::Fifo => path.mknod(FileType::Fifo, mode, 0)?,
            pb::Kind::Socket => path.mknod(FileType::Socket, mode, 0)?,
            pb::Kind::Char => path.mknod(FileType::CharacterDevice, mode, attr.rdev)?,
            pb::Kind::Block => path.mknod(FileType::BlockDevice, mode, attr.rdev)?,
            pb::Kind::Unknown => return Err(Errno::INVAL),
        }
        let done = (|| {
            match complete {
                Some((_, m)) => {
                    if let Some(fd) = &file {
                        store::write_all_at(fd, &e.data, 0)?;
                    }
                    // Owner, mode, xattrs, and the times last (the write changed them).
                    self.apply_meta(&path, m)?;
                }
                None => {
                    path.chown(Some(attr.uid), Some(attr.gid))?;
                    if kind != pb::Kind::Symlink {
                        path.chmod(mode)?;
                    }
                }
            }
            write_rec(&path, &rec)?;
            if kind != pb::Kind::Dir {
                path.link_to(&self.index_path(g))?;
            }
            Ok(())
        })();
        if let Err(err) = done {
            let _ = self.remove_tree(&path);
            return Err(err);
        }
        if kind == pb::Kind::Dir {
            self.dirs.write().unwrap().insert(
                g,
                DirNode {
                    parent,
                    name: name.to_owned(),
                },
            );
        }
        stat_loc(&path)
    }

    /// Removes a name; a directory goes with everything under it, keeping the gfid index
    /// and the directory map right.
    pub(crate) fn remove_tree(&self, path: &Loc) -> R<()> {
        let st = path.lstat()?;
        let rec = read_rec(path).ok();
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            // Never through a symlink: as_dir refuses one.
            let dir = path.as_dir()?;
            for name in dir.names()? {
                self.remove_tree(&dir.join(&name))?;
            }
            path.rmdir()?;
            if let Some(r) = rec {
                self.dirs.write().unwrap().remove(&r.gfid);
            }
        } else {
            path.unlink()?;
            if let Some(r) = rec {
                self.drop_if_unlinked(r.gfid);
            }
        }
        Ok(())
    }

    /// One checksum per block of a regular file, for at most [`CHECKSUM_PAGE`] blocks from
    /// block `first` (and at most 64 MiB read), so a healer copies only what differs.
    pub fn checksums(&self, g: Gfid, block: u32, first: u64, max: u32) -> R<(u64, Vec<u64>)> {
        let block = block.clamp(4096, 16 << 20) as usize;
        let max = if max == 0 {
            CHECKSUM_PAGE
        } else {
            max.min(CHECKSUM_PAGE)
        };
        let max = max.min(((64 << 20) / block) as u32).max(1) as u64;
        let fd = self.file(g)?;
        let size = rfs::fstat(&*fd)?.st_size as u64;
        let mut sums = Vec::with_capacity(max as usize);
        let mut buf = vec![0u8; block];
        let Some(mut off) = first.checked_mul(block as u64) else {
            return Ok((size, sums));
        };
        let end = size.min(off.saturating_add(max * block as u64));
        while off < end {
            let mut n = 0;
            while n < block {
                match rustix::io::pread(&*fd, &mut buf[n..], off + n as u64) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(Errno::INTR) => {}
                    Err(e) => return Err(e),
                }
            }
            if n == 0 {
                break;
            }
            sums.push(xxhash_rust::xxh3::xxh3_64(&buf[..n]));
            off += n as u64;
        }
        Ok((size, sums))
    }
}
