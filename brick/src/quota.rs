//! Directory quotas (one per PVC): a limit on the apparent size (sum of file sizes) of a
//! directory tree. Every brick applies the same changes in the same order, so every brick
//! reaches the same verdict and a write over the limit fails with EDQUOT on all of them.
//!
//! The limit lives in the directory's `trusted.mortar.quota` xattr; the usage is counted in
//! memory (walked once when the brick starts or the limit is set, then kept up to date), and
//! so is which quota tree each file belongs to, since files are addressed by gfid alone.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::Mutex;

use mortar_common::gfid::Gfid;
use rustix::fs::{self as rfs, FileType};
use rustix::io::Errno;

use crate::at::Loc;
use crate::store::{R, Store, read_rec};

pub const XATTR: &str = "trusted.mortar.quota";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub limit: u64,
    pub used: u64,
}

#[derive(Default)]
pub struct Quotas {
    roots: HashMap<Gfid, Usage>,
    /// Regular file → the quota tree it is counted in.
    files: HashMap<Gfid, Gfid>,
}

pub type QuotaTable = Mutex<Quotas>;

fn read_limit(path: &Loc) -> Option<u64> {
    let mut buf = [0u8; 8];
    match path.getxattr(OsStr::new(XATTR), &mut buf[..]) {
        Ok(8) => Some(u64::from_le_bytes(buf)),
        _ => None,
    }
}

impl Store {
    /// The quota table. A panic elsewhere while it was held leaves it as it was (every
    /// change to it is one statement), so it stays usable: a poisoned lock must never
    /// disable the brick's write path.
    fn quota_table(&self) -> std::sync::MutexGuard<'_, Quotas> {
        self.quotas
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Finds the quota trees at start (called with the directory map built).
    pub(crate) fn load_quotas(&self) -> anyhow::Result<()> {
        let dirs: Vec<Gfid> = self.dirs.read().unwrap().keys().copied().collect();
        for g in dirs {
            let path = self.dir_path(g).map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(limit) = read_limit(&path.this()) {
                self.count_tree(g, limit)
                    .map_err(|e| anyhow::anyhow!("counting quota usage of {}: {e}", path.this()))?;
            }
        }
        Ok(())
    }

    /// (Re)counts a quota tree's usage and which files it holds.
    fn count_tree(&self, root: Gfid, limit: u64) -> R<()> {
        let mut files = Vec::new();
        let mut used = 0u64;
        let mut stack = vec![self.dir_path(root)?];
        while let Some(d) = stack.pop() {
            for name in d.names()? {
                let e = d.join(&name);
                let Ok(st) = e.lstat() else { continue };
                match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => stack.push(e.as_dir()?),
                    FileType::RegularFile => {
                        if let Ok(rec) = read_rec(&e) {
                            // A file with several names is counted once.
                            if !files.contains(&rec.gfid) {
                                used += st.st_size as u64;
                                files.push(rec.gfid);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let mut q = self.quota_table();
        q.files.retain(|_, r| *r != root);
        for f in files {
            q.files.insert(f, root);
        }
        q.roots.insert(root, Usage { limit, used });
        Ok(())
    }

    pub fn set_quota(&self, dir: Gfid, limit: u64) -> R<()> {
        if !self.is_dir(dir) {
            return Err(Errno::NOTDIR);
        }
        let path = self.dir_path(dir)?.this();
        if limit == 0 {
            match path.removexattr(OsStr::new(XATTR)) {
                Ok(()) | Err(Errno::NODATA) => {}
                Err(e) => return Err(e),
            }
            let mut q = self.quota_table();
            q.roots.remove(&dir);
            q.files.retain(|_, r| *r != dir);
            return Ok(());
        }
        path.setxattr(
            OsStr::new(XATTR),
            &limit.to_le_bytes(),
            rfs::XattrFlags::empty(),
        )?;
        self.count_tree(dir, limit)
    }

    /// The quota tree a directory is in: itself or its nearest ancestor with a limit.
    fn root_of_dir(&self, mut g: Gfid) -> Option<Gfid> {
        let q = self.quota_table();
        if q.roots.is_empty() {
            return None;
        }
        let dirs = self.dirs.read().unwrap();
        loop {
            if q.roots.contains_key(&g) {
                return Some(g);
            }
            g = dirs.get(&g)?.parent;
        }
    }

    /// The quota tree of any inode, with its usage.
    pub fn quota_of(&self, g: Gfid) -> Option<(Gfid, Usage)> {
        let root = if self.is_dir(g) {
            self.root_of_dir(g)?
        } else {
            *self.quota_table().files.get(&g)?
        };
        let u = *self.quota_table().roots.get(&root)?;
        Some((root, u))
    }

    /// A new file in `parent` is counted in the parent's quota tree.
    pub(crate) fn quota_new_file(&self, parent: Gfid, g: Gfid) {
        if let Some(root) = self.root_of_dir(parent) {
            self.quota_table().files.insert(g, root);
        }
    }

    /// Checks that file `g` may grow from `old` to `new` bytes; counts it if so.
    pub(crate) fn quota_grow(&self, g: Gfid, old: u64, new: u64) -> R<()> {
        let mut q = self.quota_table();
        let Some(root) = q.files.get(&g).copied() else {
            return Ok(());
        };
        let Some(u) = q.roots.get_mut(&root) else {
            return Ok(());
        };
        if new > old {
            if u.used + (new - old) > u.limit {
                return Err(Errno::DQUOT);
            }
            u.used += new - old;
        } else {
            u.used = u.used.saturating_sub(old - new);
        }
        Ok(())
    }

    /// A file's last name is gone: its bytes no longer count.
    pub(crate) fn quota_forget(&self, g: Gfid, size: u64) {
        let mut q = self.quota_table();
        if let Some(root) = q.files.remove(&g)
            && let Some(u) = q.roots.get_mut(&root)
        {
            u.used = u.used.saturating_sub(size);
        }
    }

    /// After moves across trees or heals, count the affected trees again.
    pub(crate) fn quota_recount(&self, dirs: &[Gfid]) {
        let roots: Vec<(Gfid, u64)> = {
            let q = self.quota_table();
            if q.roots.is_empty() {
                return;
            }
            let mut v: Vec<(Gfid, u64)> = Vec::new();
            drop(q);
            for d in dirs {
                // The limit may have been removed since root_of_dir looked: then skip it.
                let found = self.root_of_dir(*d).and_then(|r| {
                    let limit = self.quota_table().roots.get(&r)?.limit;
                    Some((r, limit))
                });
                if let Some((r, limit)) = found
                    && !v.iter().any(|(x, _)| *x == r)
                {
                    v.push((r, limit));
                }
            }
            v
        };
        for (r, limit) in roots {
            if let Err(e) = self.count_tree(r, limit) {
                tracing::warn!(root = %r, "recounting quota usage: {e}");
            }
        }
    }

    pub fn has_quotas(&self) -> bool {
        !self.quota_table().roots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A panic while the quota table is held (as a racing quota removal once caused) leaves
    /// the write path working: the next write is counted as usual.
    #[test]
    fn a_poisoned_quota_table_does_not_disable_writes() {
        let tmp = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::open(&tmp.path().join("b")).unwrap());
        let s2 = s.clone();
        let r = std::thread::spawn(move || {
            let _held = s2.quotas.lock().unwrap();
            panic!("while holding the quota table");
        })
        .join();
        assert!(r.is_err());
        assert!(s.quotas.is_poisoned());
        assert_eq!(s.quota_grow(Gfid::random(), 0, 10), Ok(()));
        assert!(!s.has_quotas());
        s.quota_recount(&[Gfid::ROOT]);
    }
}

/// A write that fails for lack of space (a full disk under the brick, here a 1 MiB tmpfs)
/// gives back the quota it reserved: the PVC is charged what its files hold, so it does not
/// answer EDQUOT with free space left.
#[cfg(test)]
mod enospc {
    use super::*;
    use mortar_proto as pb;

    #[test]
    fn a_failed_write_gives_its_quota_back() {
        if rustix::process::geteuid().as_raw() != 0 {
            eprintln!("SKIP: needs root to mount a tmpfs");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(tmp.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        struct Umount<'a>(&'a std::path::Path);
        impl Drop for Umount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _u = Umount(tmp.path());
        let s = Store::open(&tmp.path().join("b")).unwrap();
        let now = crate::store::now_ns();
        let (dir, file) = (Gfid::random(), Gfid::random());
        let create = |gfid: Gfid, kind: pb::Kind, parent: Gfid, name: &[u8]| {
            pb::mutate_req::Op::Create(pb::Create {
                parent: parent.to_vec(),
                name: name.to_vec(),
                gfid: gfid.to_vec(),
                kind: kind as i32,
                mode: 0o755,
                ..Default::default()
            })
        };
        s.apply(&create(dir, pb::Kind::Dir, Gfid::ROOT, b"pvc"), now)
            .unwrap();
        s.set_quota(dir, 100 << 20).unwrap();
        s.apply(&create(file, pb::Kind::File, dir, b"f"), now)
            .unwrap();
        let write = pb::mutate_req::Op::Write(pb::Write {
            gfid: file.to_vec(),
            offset: 0,
            data: vec![7u8; 4 << 20].into(),
            append: false,
        });
        assert_eq!(s.apply(&write, now).err(), Some(Errno::NOSPC));
        let (_, usage) = s.quota_of(file).unwrap();
        let real = rfs::stat(tmp.path().join("b/pvc/f")).unwrap().st_size as u64;
        assert_eq!(usage.used, real, "the quota charges what the file holds");
        assert!(usage.used <= 1 << 20, "no more than the disk took");
    }
}
