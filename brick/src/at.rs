//! Places on the brick, reached without path strings: a directory is an `O_PATH` descriptor,
//! an entry is a directory descriptor plus one name. Every call is an `*at` call on them that
//! never follows a symlink, and a chain of directories is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` from the brick's root. So no name, symlink
//! or concurrent rename can lead a request outside the brick, and the brick's own path never
//! counts against a user's `PATH_MAX` (a chain longer than that is resolved in pieces).
//!
//! Operations the kernel offers only on paths (xattrs, chmod, times of the object itself) go
//! through `/proc/self/fd/N` of an `O_PATH` descriptor of the object: the magic link leads to
//! exactly that inode and, for a symlink, to the link itself, never to its target.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use rustix::fs::{
    self as rfs, AtFlags, CWD, FileType, Mode, OFlags, ResolveFlags, Stat, Timestamps, XattrFlags,
};
use rustix::io::Errno;

pub type R<T> = Result<T, Errno>;

/// Most bytes handed to one `openat2` (the kernel refuses a path of `PATH_MAX`, 4096, or more).
const CHUNK: usize = 3072;

fn beneath() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL")
}

/// A directory of the brick (an `O_PATH` descriptor), shared by the requests that use it.
#[derive(Clone)]
pub struct Dir(Arc<OwnedFd>);

impl Dir {
    /// Opens the brick's root (the only path string the brick ever resolves).
    pub fn open_root(path: &std::path::Path) -> R<Dir> {
        let fd = rfs::open(
            path,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Dir(Arc::new(fd)))
    }

    /// The directory reached from this one through `names` (each one component), beneath
    /// this one and through no symlink.
    pub fn walk<'a>(&self, names: impl IntoIterator<Item = &'a OsStr>) -> R<Dir> {
        let mut cur = self.clone();
        let mut chunk: Vec<u8> = Vec::new();
        for n in names {
            if !chunk.is_empty() && chunk.len() + 1 + n.len() > CHUNK {
                cur = cur.sub(&chunk)?;
                chunk.clear();
            }
            if !chunk.is_empty() {
                chunk.push(b'/');
            }
            chunk.extend_from_slice(n.as_bytes());
        }
        if chunk.is_empty() {
            Ok(cur)
        } else {
            cur.sub(&chunk)
        }
    }

    fn sub(&self, rel: &[u8]) -> R<Dir> {
        let how = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat2(
            &*self.0,
            OsStr::from_bytes(rel),
            how,
            Mode::empty(),
            beneath(),
        )?;
        Ok(Dir(Arc::new(fd)))
    }

    /// The entry `name` of this directory.
    pub fn join(&self, name: &OsStr) -> Loc {
        Loc {
            dir: self.clone(),
            name: Some(name.to_owned()),
        }
    }

    /// This directory itself, as a place.
    pub fn this(&self) -> Loc {
        Loc {
            dir: self.clone(),
            name: None,
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// The names in this directory (without `.` and `..`).
    pub fn names(&self) -> R<Vec<OsString>> {
        let fd = rfs::open(
            proc_path(self.fd()).as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut out = Vec::new();
        let mut dir = rfs::Dir::read_from(&fd)?;
        while let Some(e) = dir.read() {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_owned());
            }
        }
        Ok(out)
    }

    pub fn statvfs(&self) -> R<rfs::StatVfs> {
        rfs::fstatvfs(&*self.0)
    }

    /// An open (readable) descriptor of this directory, for fsync.
    pub fn open_read(&self) -> R<OwnedFd> {
        rfs::open(
            proc_path(self.fd()).as_c_str(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }
}

/// A place on the brick: a directory, or one name in a directory.
#[derive(Clone)]
pub struct Loc {
    dir: Dir,
    name: Option<OsString>,
}

impl std::fmt::Display for Loc {
    /// Where it is, for logs: the directory as the kernel names it, and the name.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dir = rfs::readlink(proc_path(self.dir.fd()).as_c_str(), Vec::new())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "?".into());
        match &self.name {
            Some(n) => write!(f, "{dir}/{}", n.to_string_lossy()),
            None => write!(f, "{dir}"),
        }
    }
}

impl Loc {
    fn name(&self) -> R<&OsStr> {
        self.name.as_deref().ok_or(Errno::INVAL)
    }

    /// An `O_PATH` descriptor of the object itself (a symlink stays a symlink).
    fn obj(&self) -> R<OwnedFd> {
        match &self.name {
            Some(n) => rfs::openat(
                self.dir.fd(),
                n.as_os_str(),
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            ),
            None => rustix::io::fcntl_dupfd_cloexec(self.dir.fd(), 0),
        }
    }

    /// Runs `f` on the object's `/proc/self/fd/N` path.
    fn via_proc<T>(&self, f: impl FnOnce(&std::ffi::CStr) -> R<T>) -> R<T> {
        let fd = self.obj()?;
        f(proc_path(fd.as_fd()).as_c_str())
    }

    /// This place as a directory (it must be one; never through a symlink).
    pub fn as_dir(&self) -> R<Dir> {
        match &self.name {
            Some(n) => self.dir.sub(n.as_bytes()),
            None => Ok(self.dir.clone()),
        }
    }

    pub fn lstat(&self) -> R<Stat> {
        match &self.name {
            Some(n) => rfs::statat(self.dir.fd(), n.as_os_str(), AtFlags::SYMLINK_NOFOLLOW),
            None => rfs::fstat(self.dir.fd()),
        }
    }

    pub fn exists(&self) -> bool {
        self.lstat().is_ok()
    }

    pub fn getxattr(&self, name: &OsStr, buf: &mut [u8]) -> R<usize> {
        self.via_proc(|p| rfs::getxattr(p, name, buf))
    }

    pub fn setxattr(&self, name: &OsStr, value: &[u8], flags: XattrFlags) -> R<()> {
        self.via_proc(|p| rfs::setxattr(p, name, value, flags))
    }

    pub fn removexattr(&self, name: &OsStr) -> R<()> {
        self.via_proc(|p| rfs::removexattr(p, name))
    }

    pub fn listxattr(&self, buf: &mut [u8]) -> R<usize> {
        self.via_proc(|p| rfs::listxattr(p, buf))
    }

    pub fn chown(&self, uid: Option<u32>, gid: Option<u32>) -> R<()> {
        check_owner(uid, gid)?;
        let (u, g) = (uid.map(rfs::Uid::from_raw), gid.map(rfs::Gid::from_raw));
        match &self.name {
            Some(n) => rfs::chownat(
                self.dir.fd(),
                n.as_os_str(),
                u,
                g,
                AtFlags::SYMLINK_NOFOLLOW,
            ),
            None => rfs::chownat(self.dir.fd(), "", u, g, AtFlags::EMPTY_PATH),
        }
    }

    /// Sets the mode of the object itself (EOPNOTSUPP for a symlink, never its target).
    pub fn chmod(&self, mode: u32) -> R<()> {
        self.via_proc(|p| rfs::chmod(p, Mode::from_raw_mode(mode & 0o7777)))
    }

    pub fn utimens(&self, t: &Timestamps) -> R<()> {
        match &self.name {
            Some(n) => rfs::utimensat(self.dir.fd(), n.as_os_str(), t, AtFlags::SYMLINK_NOFOLLOW),
            None => self.via_proc(|p| rfs::utimensat(CWD, p, t, AtFlags::empty())),
        }
    }

    pub fn readlink(&self) -> R<Vec<u8>> {
        Ok(rfs::readlinkat(self.dir.fd(), self.name()?, Vec::new())?.into_bytes())
    }

    /// Opens the object (never through a symlink) with `flags`, creating it with `mode` when
    /// `flags` say so.
    pub fn open(&self, flags: OFlags, mode: Mode) -> R<OwnedFd> {
        match &self.name {
            Some(n) => rfs::openat(
                self.dir.fd(),
                n.as_os_str(),
                flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                mode,
            ),
            None => self.via_proc(|p| rfs::open(p, flags | OFlags::CLOEXEC, mode)),
        }
    }

    pub fn mkdir(&self, mode: u32) -> R<()> {
        rfs::mkdirat(self.dir.fd(), self.name()?, Mode::from_raw_mode(mode))
    }

    pub fn mknod(&self, kind: FileType, mode: u32, dev: u64) -> R<()> {
        rfs::mknodat(
            self.dir.fd(),
            self.name()?,
            kind,
            Mode::from_raw_mode(mode),
            dev,
        )
    }

    pub fn symlink(&self, target: &OsStr) -> R<()> {
        rfs::symlinkat(target, self.dir.fd(), self.name()?)
    }

    pub fn unlink(&self) -> R<()> {
        rfs::unlinkat(self.dir.fd(), self.name()?, AtFlags::empty())
    }

    pub fn rmdir(&self) -> R<()> {
        rfs::unlinkat(self.dir.fd(), self.name()?, AtFlags::REMOVEDIR)
    }

    /// Another name for this object (not a directory) at `to`.
    pub fn link_to(&self, to: &Loc) -> R<()> {
        rfs::linkat(
            self.dir.fd(),
            self.name()?,
            to.dir.fd(),
            to.name()?,
            AtFlags::empty(),
        )
    }

    pub fn rename_to(&self, to: &Loc, flags: rfs::RenameFlags) -> R<()> {
        rfs::renameat_with(self.dir.fd(), self.name()?, to.dir.fd(), to.name()?, flags)
    }
}

/// An owner a request may give: `-1` is chown(2)'s "leave it as it is", never an owner, and
/// rustix asserts it is never passed as one (a fuzzed request panicked the brick with it).
pub fn check_owner(uid: Option<u32>, gid: Option<u32>) -> R<()> {
    if uid == Some(u32::MAX) || gid == Some(u32::MAX) {
        return Err(Errno::INVAL);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of names longer than PATH_MAX resolves (in pieces), and a symlink anywhere in
    /// it stops the walk instead of leading outside.
    #[test]
    fn walks_deep_chains_and_never_through_symlinks() {
        let tmp = tempfile::tempdir().unwrap();
        let root = Dir::open_root(tmp.path()).unwrap();
        let name = OsString::from("d".repeat(200));
        let mut d = root.clone();
        for _ in 0..30 {
            d.join(&name).mkdir(0o755).unwrap();
            d = d.join(&name).as_dir().unwrap();
        }
        d.join(OsStr::new("leaf")).mkdir(0o755).unwrap();
        let mut names: Vec<&OsStr> = vec![name.as_os_str(); 30];
        names.push(OsStr::new("leaf"));
        assert!(names.iter().map(|n| n.len() + 1).sum::<usize>() > 4096);
        let leaf = root.walk(names.iter().copied()).unwrap();
        assert!(leaf.this().lstat().is_ok());

        // A symlink to outside the root: neither a walk nor an entry follows it.
        std::os::unix::fs::symlink("/etc", tmp.path().join("out")).unwrap();
        assert!(root.walk([OsStr::new("out")]).is_err());
        let out = root.join(OsStr::new("out"));
        assert_eq!(
            out.lstat().map(|s| FileType::from_raw_mode(s.st_mode)),
            Ok(FileType::Symlink)
        );
        assert_eq!(out.chmod(0o777), Err(Errno::OPNOTSUPP));
        assert!(out.open(OFlags::RDONLY, Mode::empty()).is_err());
        assert_eq!(root.walk([OsStr::new("..")]).err(), Some(Errno::XDEV));
    }
}
