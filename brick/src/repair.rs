//! The brick's side of self-heal: steps that make this copy of an inode like another
//! brick's, applied under the healer's inode lock and without version checks (the healer
//! sets the version last, once the copy really is like the source).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use mortar_client::gfid::Gfid;
use mortar_proto as pb;
use rustix::fs::{self as rfs, AtFlags, CWD, FileType, Mode, OFlags, Timestamps};
use rustix::io::Errno;

use crate::record::Record;
use crate::store::{self, DirNode, R, Store, check_name, gfid, read_rec, stat_path, ts, write_rec};

/// Size of the blocks compared by checksum during data heal.
pub const BLOCK: u32 = 128 * 1024;

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
                let mut off = w.offset;
                let mut data = &w.data[..];
                while !data.is_empty() {
                    let k = rustix::io::pwrite(&*fd, data, off)?;
                    data = &data[k..];
                    off += k as u64;
                }
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
                let path = self.path_of(g)?;
                let mut rec = read_rec(&path)?;
                rec.ver = (v.term, v.seq, v.id);
                rec.ctime_ns = ctime;
                write_rec(&path, &rec)?;
                stat_path(&path)
            }
        }
    }

    fn heal_meta(&self, g: Gfid, m: &pb::HealMeta) -> R<pb::Attr> {
        let path = self.path_of(g)?;
        let st = rfs::lstat(&path)?;
        let is_link = FileType::from_raw_mode(st.st_mode) == FileType::Symlink;
        rfs::chownat(
            CWD,
            &path,
            Some(rfs::Uid::from_raw(m.uid)),
            Some(rfs::Gid::from_raw(m.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        if !is_link {
            rfs::chmod(&path, Mode::from_raw_mode(m.mode & 0o7777))?;
            let have = store::list_user_xattrs(&path)?;
            for name in have
                .iter()
                .filter(|n| !m.xattrs.iter().any(|x| &x.name == *n))
            {
                rfs::lremovexattr(&path, OsStr::from_bytes(name))?;
            }
            for x in &m.xattrs {
                rfs::lsetxattr(
                    &path,
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
        rfs::utimensat(CWD, &path, &t, AtFlags::SYMLINK_NOFOLLOW)?;
        stat_path(&path)
    }

    /// Makes `name` in directory `parent` the inode described by `e`: links or moves the
    /// inode if this brick has it elsewhere (a rename or hard link it missed), else creates
    /// it empty with the source's identity; its content and version are healed next.
    fn heal_entry(&self, parent: Gfid, e: &pb::HealEntry) -> R<pb::Attr> {
        let name = check_name(&e.name, parent)?;
        let attr = e.attr.as_ref().ok_or(Errno::INVAL)?;
        let g = gfid(&attr.gfid)?;
        let pdir = self.dir_path(parent)?;
        let path = pdir.join(name);
        match read_rec(&path) {
            Ok(r) if r.gfid == g => return stat_path(&path),
            Ok(_) => self.remove_tree(&path)?,
            Err(Errno::NOENT) => {}
            Err(_) => self.remove_tree(&path)?,
        }
        let kind = attr.kind();
        if kind == pb::Kind::Dir {
            if self.is_dir(g) {
                let old = self.dir_path(g)?;
                rfs::rename(&old, &path)?;
                self.dirs.write().unwrap().insert(
                    g,
                    DirNode {
                        parent,
                        name: name.to_owned(),
                    },
                );
                return stat_path(&path);
            }
        } else if rfs::lstat(self.index_path(g)).is_ok() {
            rfs::linkat(CWD, self.index_path(g), CWD, &path, AtFlags::empty())?;
            return stat_path(&path);
        }
        // Until healed, the new copy is empty: if this heal stops midway, the index brings
        // it back to a later one.
        self.mark_heal(g);
        let rec = Record::new(g, 0, attr.ctime_ns);
        let owner = (
            Some(rfs::Uid::from_raw(attr.uid)),
            Some(rfs::Gid::from_raw(attr.gid)),
        );
        let mode = Mode::from_raw_mode(attr.mode & 0o7777);
        match kind {
            pb::Kind::Dir => rfs::mkdir(&path, mode)?,
            pb::Kind::File => drop(rfs::open(
                &path,
                OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode,
            )?),
            pb::Kind::Symlink => {
                if e.target.is_empty() || e.target.contains(&0) {
                    return Err(Errno::INVAL);
                }
                rfs::symlink(OsStr::from_bytes(&e.target), &path)?
            }
            pb::Kind::Fifo => rfs::mknodat(CWD, &path, FileType::Fifo, mode, 0)?,
            pb::Kind::Socket => rfs::mknodat(CWD, &path, FileType::Socket, mode, 0)?,
            pb::Kind::Char => rfs::mknodat(CWD, &path, FileType::CharacterDevice, mode, attr.rdev)?,
            pb::Kind::Block => rfs::mknodat(CWD, &path, FileType::BlockDevice, mode, attr.rdev)?,
            pb::Kind::Unknown => return Err(Errno::INVAL),
        }
        let done = (|| {
            rfs::chownat(CWD, &path, owner.0, owner.1, AtFlags::SYMLINK_NOFOLLOW)?;
            if kind != pb::Kind::Symlink {
                rfs::chmod(&path, mode)?;
            }
            write_rec(&path, &rec)?;
            if kind != pb::Kind::Dir {
                rfs::linkat(CWD, &path, CWD, self.index_path(g), AtFlags::empty())?;
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
        stat_path(&path)
    }

    /// Removes a name; a directory goes with everything under it, keeping the gfid index
    /// and the directory map right.
    fn remove_tree(&self, path: &Path) -> R<()> {
        let st = rfs::lstat(path)?;
        let rec = read_rec(path).ok();
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            for e in std::fs::read_dir(path).map_err(|e| store::io_errno(&e))? {
                let e = e.map_err(|e| store::io_errno(&e))?;
                self.remove_tree(&e.path())?;
            }
            rfs::rmdir(path)?;
            if let Some(r) = rec {
                self.dirs.write().unwrap().remove(&r.gfid);
            }
        } else {
            rfs::unlink(path)?;
            if let Some(r) = rec {
                self.drop_if_unlinked(r.gfid);
            }
        }
        Ok(())
    }

    /// One checksum per block of a regular file, so a healer copies only what differs.
    pub fn checksums(&self, g: Gfid, block: u32) -> R<(u64, Vec<u64>)> {
        let block = block.clamp(4096, 16 << 20) as usize;
        let fd = self.file(g)?;
        let size = rfs::fstat(&*fd)?.st_size as u64;
        let mut sums = Vec::with_capacity((size as usize).div_ceil(block));
        let mut buf = vec![0u8; block];
        let mut off = 0u64;
        while off < size {
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
