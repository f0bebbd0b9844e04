//! The brick's backend: the volume as a plain directory tree under the brick directory, plus
//! Mortar's metadata in `trusted.mortar.*` xattrs and the hidden `.mortar/` directory.
//!
//! Inodes are addressed by gfid. Every non-directory has a hard link named after its gfid in
//! `.mortar/gfid/` (as GlusterFS's `.glusterfs/`), so it can be reached without a path even
//! after renames. Directories cannot be hard-linked; the brick keeps a map gfid → (parent,
//! name) in memory, rebuilt from the xattrs at start.
//!
//! Nothing is reached by a path string: directories are descriptors resolved beneath the
//! brick's root without following symlinks, entries are names in them (see `at`), and every
//! name is validated, so no request reaches outside the brick directory, and the brick's own
//! path never counts against a user's PATH_MAX.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use mortar_common::gfid::Gfid;
use mortar_proto as pb;
use rustix::fs::{self as rfs, FileType, Mode, OFlags, Timespec, Timestamps};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use crate::at::{Dir, Loc};
use crate::record::{self, Record};

pub type R<T> = Result<T, Errno>;

use mortar_common::gfid::META;
/// The file in `.mortar` holding the term ceiling (see `Store::raise_ceiling`).
const CEILING: &str = "term-ceiling";
/// How far above a promised term the recorded ceiling goes: one minute of a client's clock.
const CEILING_AHEAD_NS: u64 = 60_000_000_000;
/// The file in `.mortar` that says this brick still needs its after-join crawl (see
/// `Store::joining`).
const JOINING: &str = "joining";
/// At most this many file descriptors are cached, whatever the limit (see `set_fd_budget`).
const MAX_FDS: usize = 4096;
const MAX_XATTR: usize = 64 * 1024;

pub(crate) struct DirNode {
    pub(crate) parent: Gfid,
    pub(crate) name: OsString,
}

pub struct Store {
    /// The brick directory, for people (logs); requests never resolve it.
    root: PathBuf,
    root_dir: Dir,
    /// The 256 subdirectories of the gfid index (`.mortar/gfid/00` … `ff`).
    index_dirs: Vec<Dir>,
    heal_dir: PathBuf,
    /// Inodes changed lately, each with a file in `.mortar/dirty` made before its first
    /// pending mark: after a crash, the only place to look for marks left behind.
    dirty: Mutex<HashMap<Gfid, Instant>>,
    /// Terms at or below this are refused on every inode: the ceiling recorded before the
    /// last stop, above every term promised then (see `raise_ceiling`).
    term_floor: u64,
    /// Terms above this must be recorded (durably) before they are promised.
    term_ceiling: Mutex<u64>,
    pub(crate) dirs: RwLock<HashMap<Gfid, DirNode>>,
    fds: Mutex<HashMap<Gfid, Arc<OwnedFd>>>,
    /// How many file descriptors `fds` may hold (a share of the process's limit).
    fd_cache: std::sync::atomic::AtomicUsize,
    heal: Mutex<HashSet<Gfid>>,
    /// The heal index has entries not yet synced to disk.
    heal_unsynced: std::sync::atomic::AtomicBool,
    split: Mutex<HashSet<Gfid>>,
    pub(crate) quotas: crate::quota::QuotaTable,
    /// Files some client session has open, with how many opens: their last name may go,
    /// their data stays (as an orphan) until the count drops to zero.
    opens: Mutex<HashMap<Gfid, u32>>,
    /// Files whose last name went while open: kept in the gfid index, each with a marker in
    /// `.mortar/orphans` so that a restart (which ends every session) reclaims them.
    orphans: Mutex<HashSet<Gfid>>,
}

pub fn io_errno(e: &std::io::Error) -> Errno {
    Errno::from_io_error(e).unwrap_or(Errno::IO)
}

/// A name as one path component: not empty, no `/` or NUL, not `.`/`..`, at most 255 bytes,
/// and never Mortar's own directory at the root.
pub fn check_name(name: &[u8], parent: Gfid) -> R<&OsStr> {
    match mortar_common::gfid::name_errno(parent, name) {
        Some(e) => Err(Errno::from_raw_os_error(e)),
        None => Ok(OsStr::from_bytes(name)),
    }
}

pub fn gfid(b: &[u8]) -> R<Gfid> {
    Gfid::from_bytes(b).ok_or(Errno::INVAL)
}

pub(crate) fn ts(ns: i64) -> Timespec {
    Timespec {
        tv_sec: ns.div_euclid(1_000_000_000),
        tv_nsec: ns.rem_euclid(1_000_000_000) as _,
    }
}

pub(crate) const OMIT: Timespec = Timespec {
    tv_sec: 0,
    tv_nsec: rustix::fs::UTIME_OMIT as _,
};

fn kind_of(mode: u32) -> pb::Kind {
    match FileType::from_raw_mode(mode) {
        FileType::RegularFile => pb::Kind::File,
        FileType::Directory => pb::Kind::Dir,
        FileType::Symlink => pb::Kind::Symlink,
        FileType::Fifo => pb::Kind::Fifo,
        FileType::Socket => pb::Kind::Socket,
        FileType::CharacterDevice => pb::Kind::Char,
        FileType::BlockDevice => pb::Kind::Block,
        FileType::Unknown => pb::Kind::Unknown,
    }
}

pub fn read_rec(loc: &Loc) -> R<Record> {
    let mut buf = [0u8; 96];
    let n = loc
        .getxattr(OsStr::new(record::XATTR), &mut buf[..])
        .map_err(|e| if e == Errno::NODATA { Errno::IO } else { e })?;
    Record::decode(&buf[..n]).ok_or(Errno::IO)
}

/// The record of `loc`, or `None` if it has none: a name a create made and never finished
/// (the brick stopped before the record was written). Such a name is not part of the
/// volume: listings skip it, and a create, heal or rmdir removes it.
fn read_rec_opt(loc: &Loc) -> R<Option<Record>> {
    match read_rec(loc) {
        Ok(r) => Ok(Some(r)),
        Err(Errno::IO) => {
            let mut buf = [0u8; 1];
            match loc.getxattr(OsStr::new(record::XATTR), &mut buf[..]) {
                Err(Errno::NODATA) => Ok(None),
                _ => Err(Errno::IO),
            }
        }
        Err(e) => Err(e),
    }
}

/// "out of file descriptors": at most one line per 10 s.
static FD_WARNINGS: mortar_common::telemetry::RateLimit =
    mortar_common::telemetry::RateLimit::new(std::time::Duration::from_secs(10));

/// The file every entry of a gfid set kept in a directory links to (see `mark_in`).
const BASE: &str = ".base";

/// Adds `g` to a gfid set kept as names in a directory (the heal index, the dirty list): as
/// a hard link to the directory's `BASE` file, which costs a directory entry and no new
/// inode. A file per entry was half the CPU of a full heal (the filesystem's inode
/// allocation). Names that are not gfids (`BASE`) are skipped by the readers.
fn mark_in(dir: &Path, g: Gfid) -> std::io::Result<()> {
    let name = dir.join(g.hex());
    match std::fs::hard_link(dir.join(BASE), &name) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        // No base, or it has too many links (ext4 allows 65,000): a file of its own.
        Err(_) => std::fs::File::create(&name).map(|_| ()),
    }
}

/// Whether a copy is where change `u` expects it: at the expected version, with no change
/// left unfinished (a pending copy is at no version: heal levels it), and not promised to a
/// term above the change's (its writer lost the lock).
fn at_expected(rec: &Record, u: &pb::VerUpdate) -> bool {
    let exp = u.expect.unwrap_or_default();
    let new = u.new.unwrap_or_default();
    rec.ver == (exp.term, exp.seq, exp.id) && rec.pending == 0 && new.term >= rec.promised
}

pub(crate) fn write_rec(loc: &Loc, rec: &Record) -> R<()> {
    loc.setxattr(
        OsStr::new(record::XATTR),
        &rec.encode(),
        rfs::XattrFlags::empty(),
    )
}

fn attr_of(st: &rfs::Stat, rec: &Record) -> pb::Attr {
    let mode = st.st_mode;
    let kind = kind_of(mode);
    // The gfid index holds one extra link to every non-directory: hide it.
    let nlink = if kind == pb::Kind::Dir {
        st.st_nlink as u32
    } else {
        // An orphan (unlinked while open) has only its index link: nlink 0, as POSIX says.
        (st.st_nlink as u32).saturating_sub(1)
    };
    pb::Attr {
        gfid: rec.gfid.to_vec(),
        kind: kind as i32,
        mode: mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: st.st_size as u64,
        nlink,
        rdev: st.st_rdev,
        atime_ns: st.st_atime * 1_000_000_000 + st.st_atime_nsec as i64,
        mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec as i64,
        ctime_ns: rec.ctime_ns,
        blocks: st.st_blocks as u64,
        ver: Some(pb::Version {
            term: rec.ver.0,
            seq: rec.ver.1,
            id: rec.ver.2,
        }),
        pending: rec.pending != 0,
    }
}

/// Reads an inode's attributes and record, without following a symlink.
/// Writes all of `data` at `off` (a short write is continued, EINTR retried).
pub fn write_all_at(fd: impl AsFd, mut data: &[u8], mut off: u64) -> R<()> {
    while !data.is_empty() {
        match rustix::io::pwrite(&fd, data, off) {
            Ok(k) => {
                data = &data[k..];
                off += k as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

pub fn stat_loc(loc: &Loc) -> R<pb::Attr> {
    let st = loc.lstat()?;
    let rec = read_rec(loc)?;
    Ok(attr_of(&st, &rec))
}

impl Store {
    /// Opens (and on first use lays out) a brick directory.
    pub fn open(root: &Path) -> anyhow::Result<Store> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        let fresh = !root.exists();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(root)?;
        let root = root.canonicalize()?;
        let meta = root.join(META);
        let index = meta.join("gfid");
        let heal_dir = meta.join("heal");
        for d in [
            &meta,
            &index,
            &heal_dir,
            &meta.join("split"),
            &meta.join("orphans"),
            &meta.join("dirty"),
        ] {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(d)?;
        }
        if fresh {
            // A new volume's root is open to its owner and readable by all, like mkfs makes it.
            rfs::chmod(&root, Mode::from_raw_mode(0o755))?;
        }
        for i in 0..=255u8 {
            std::fs::create_dir_all(index.join(format!("{i:02x}")))?;
        }
        for d in [&heal_dir, &meta.join("dirty")] {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(d.join(BASE))?;
        }
        let mut full_heal = false;
        let root_dir = Dir::open_root(&root)
            .map_err(|e| anyhow::anyhow!("opening {}: {e}", root.display()))?;
        match read_rec(&root_dir.this()) {
            Ok(r) if r.gfid == Gfid::ROOT => {}
            Ok(r) => anyhow::bail!(
                "{} is the root of another volume (gfid {})",
                root.display(),
                r.gfid
            ),
            Err(_) => {
                // A directory with files but no Mortar records is someone's data: a full
                // heal would replace it. Only an empty directory becomes a brick.
                let foreign = std::fs::read_dir(&root)?
                    .filter_map(|e| e.ok())
                    .any(|e| e.file_name() != META);
                anyhow::ensure!(
                    !foreign,
                    "{} holds files but is not a Mortar brick; give the brick an empty directory",
                    root.display()
                );
                let now = now_ns();
                full_heal = true;
                // Before the root's record: a crash between the two must not leave a brick
                // that looks settled but never had its after-join crawl.
                std::fs::write(meta.join(JOINING), b"")?;
                write_rec(&root_dir.this(), &Record::new(Gfid::ROOT, 0, now)).map_err(|e| {
                    anyhow::anyhow!(
                        "cannot set trusted xattrs on {} (need root and xattr support): {e}",
                        root.display()
                    )
                })?;
            }
        }
        let index_dirs = (0..=255u8)
            .map(|i| root_dir.walk([META.as_ref(), "gfid".as_ref(), format!("{i:02x}").as_ref()]))
            .collect::<R<Vec<Dir>>>()
            .map_err(|e| anyhow::anyhow!("opening the gfid index: {e}"))?;
        let term_floor = match std::fs::read_to_string(meta.join(CEILING)) {
            Ok(t) => t
                .trim()
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", meta.join(CEILING).display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => anyhow::bail!("{}: {e}", meta.join(CEILING).display()),
        };
        let store = Store {
            root,
            root_dir,
            index_dirs,
            heal_dir,
            dirty: Mutex::new(HashMap::new()),
            term_floor,
            term_ceiling: Mutex::new(term_floor),
            dirs: RwLock::new(HashMap::new()),
            fds: Mutex::new(HashMap::new()),
            fd_cache: std::sync::atomic::AtomicUsize::new(MAX_FDS),
            heal: Mutex::new(HashSet::new()),
            heal_unsynced: Default::default(),
            split: Mutex::new(HashSet::new()),
            quotas: Default::default(),
            opens: Mutex::new(HashMap::new()),
            orphans: Mutex::new(HashSet::new()),
        };
        store.scan_dirs()?;
        store.load_quotas()?;
        // No session outlives a restart, so no orphan is open any more: reclaim them all.
        for e in std::fs::read_dir(store.orphan_dir())? {
            if let Some(g) = e?.file_name().to_str().and_then(Gfid::parse_hex) {
                store.orphans.lock().unwrap().insert(g);
                store.reclaim_orphan(g);
            }
        }
        let mut heal = store.heal.lock().unwrap();
        for e in std::fs::read_dir(&store.heal_dir)? {
            if let Some(g) = e?.file_name().to_str().and_then(Gfid::parse_hex) {
                heal.insert(g);
            }
        }
        drop(heal);
        store.recover_dirty()?;
        for e in std::fs::read_dir(store.split_dir())? {
            if let Some(g) = e?.file_name().to_str().and_then(Gfid::parse_hex) {
                store.split.lock().unwrap().insert(g);
            }
        }
        if full_heal {
            // A new or wiped brick: healing the root from the others copies the whole tree,
            // and until then its versions keep it from serving reads.
            tracing::info!("new brick directory: a full heal will fill it");
            store.mark_heal(Gfid::ROOT);
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn scan_dirs(&self) -> anyhow::Result<()> {
        let mut dirs = self.dirs.write().unwrap();
        let mut stack = vec![(Gfid::ROOT, self.root_dir.clone())];
        while let Some((g, dir)) = stack.pop() {
            for name in dir.names()? {
                if g == Gfid::ROOT && name == META {
                    continue;
                }
                let loc = dir.join(&name);
                let is_dir = loc
                    .lstat()
                    .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
                if !is_dir {
                    continue;
                }
                match read_rec(&loc) {
                    Ok(rec) => {
                        dirs.insert(rec.gfid, DirNode { parent: g, name });
                        stack.push((rec.gfid, loc.as_dir()?));
                    }
                    Err(_) => {
                        tracing::warn!(path = %loc, "directory without a Mortar record; not served")
                    }
                }
            }
        }
        Ok(())
    }

    /// The names from the root down to directory `g`.
    fn dir_names(&self, g: Gfid) -> R<Vec<OsString>> {
        let dirs = self.dirs.read().unwrap();
        let mut names = Vec::new();
        let mut cur = g;
        while cur != Gfid::ROOT {
            let node = dirs.get(&cur).ok_or(Errno::NOENT)?;
            names.push(node.name.clone());
            cur = node.parent;
            if names.len() > 1 << 16 {
                return Err(Errno::LOOP);
            }
        }
        names.reverse();
        Ok(names)
    }

    /// Directory `g`, resolved beneath the root through no symlink.
    pub(crate) fn dir_path(&self, g: Gfid) -> R<Dir> {
        if g == Gfid::ROOT {
            return Ok(self.root_dir.clone());
        }
        let names = self.dir_names(g)?;
        self.root_dir.walk(names.iter().map(|n| n.as_os_str()))
    }

    /// Directory `g` as an entry of its parent (for renaming it).
    pub(crate) fn dir_loc(&self, g: Gfid) -> R<Loc> {
        let (parent, name) = {
            let dirs = self.dirs.read().unwrap();
            let node = dirs.get(&g).ok_or(Errno::NOENT)?;
            (node.parent, node.name.clone())
        };
        Ok(self.dir_path(parent)?.join(&name))
    }

    /// The gfid index entry of non-directory `g`.
    pub(crate) fn index_path(&self, g: Gfid) -> Loc {
        let hex = g.hex();
        self.index_dirs[usize::from(g.0[0])].join(OsStr::new(&hex))
    }

    pub(crate) fn is_dir(&self, g: Gfid) -> bool {
        g == Gfid::ROOT || self.dirs.read().unwrap().contains_key(&g)
    }

    /// The place that reaches inode `g` (the gfid link for non-directories).
    pub fn path_of(&self, g: Gfid) -> R<Loc> {
        if self.is_dir(g) {
            Ok(self.dir_path(g)?.this())
        } else {
            Ok(self.index_path(g))
        }
    }

    pub fn record(&self, g: Gfid) -> R<Record> {
        read_rec(&self.path_of(g)?)
    }

    pub(crate) fn file(&self, g: Gfid) -> R<Arc<OwnedFd>> {
        if let Some(fd) = self.fds.lock().unwrap().get(&g) {
            return Ok(fd.clone());
        }
        if self.is_dir(g) {
            return Err(Errno::ISDIR);
        }
        let path = self.index_path(g);
        let st = path.lstat()?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(Errno::INVAL);
        }
        let fd =
            Arc::new(self.fd_retry(|| path.open(OFlags::RDWR | OFlags::NOATIME, Mode::empty()))?);
        self.cache_fd(g, fd.clone());
        Ok(fd)
    }

    /// Runs `open`; when the process is out of file descriptors, gives back the cached ones
    /// and tries once more, rather than wedge.
    fn fd_retry<T>(&self, open: impl Fn() -> R<T>) -> R<T> {
        match open() {
            Err(e @ (Errno::MFILE | Errno::NFILE)) => {
                if let Some(suppressed) = FD_WARNINGS.allow() {
                    tracing::warn!(suppressed, "{e}: dropping the brick's cache of open files");
                }
                self.fds.lock().unwrap().clear();
                open()
            }
            r => r,
        }
    }

    /// Keeps `fd` for the next request on `g`, within the cache's budget.
    fn cache_fd(&self, g: Gfid, fd: Arc<OwnedFd>) {
        let max = self.fd_cache.load(std::sync::atomic::Ordering::Relaxed);
        let mut fds = self.fds.lock().unwrap();
        if fds.len() >= max {
            // Cheap eviction: open files are re-opened on demand.
            let victims: Vec<Gfid> = fds.keys().take(max / 2 + 1).copied().collect();
            for v in victims {
                fds.remove(&v);
            }
        }
        fds.insert(g, fd);
    }

    /// Sizes the cache of open files from the file descriptors this process may have:
    /// a quarter of them, leaving the rest to connections, directories and the gfid index.
    pub fn set_fd_budget(&self, limit: u64) {
        let n = ((limit / 4) as usize).clamp(16, MAX_FDS);
        self.fd_cache.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub(crate) fn forget_fd(&self, g: Gfid) {
        self.fds.lock().unwrap().remove(&g);
    }

    // ---- reads ----

    pub fn getattr(&self, g: Gfid) -> R<pb::Attr> {
        stat_loc(&self.path_of(g)?)
    }

    pub fn lookup(&self, parent: Gfid, name: &[u8]) -> R<(pb::Attr, Option<pb::Attr>)> {
        let name = check_name(name, parent)?;
        let ppath = self.dir_path(parent)?;
        let pattr = stat_loc(&ppath.this())?;
        match self.entry_attr(&ppath.join(name)) {
            Ok(a) => Ok((pattr, Some(a))),
            Err(Errno::NOENT) => Ok((pattr, None)),
            Err(e) => Err(e),
        }
    }

    /// The attributes of a directory entry, repairing what a create cut short by a crash
    /// left behind: a name without a record is not there (`NOENT`); a non-directory whose
    /// gfid link is missing (its only name counts no extra link) gets its link back, so
    /// that requests by gfid, heal among them, reach it again.
    fn entry_attr(&self, path: &Loc) -> R<pb::Attr> {
        let mut a = match stat_loc(path) {
            Err(Errno::IO) if read_rec_opt(path)?.is_none() => return Err(Errno::NOENT),
            r => r?,
        };
        if a.kind() != pb::Kind::Dir && a.nlink == 0 {
            let g = gfid(&a.gfid)?;
            match path.link_to(&self.index_path(g)) {
                Ok(()) => {
                    tracing::warn!(gfid = %g, "repaired a missing gfid link (a create cut short)");
                    a.nlink = 1;
                }
                Err(e) => tracing::warn!(gfid = %g, "cannot repair the missing gfid link: {e}"),
            }
        }
        Ok(a)
    }

    /// Removes what a create cut short left at `path` (a name without a record), so that
    /// the name can be made again.
    fn clear_leftover(&self, path: &Loc) -> R<()> {
        match path.lstat() {
            Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(e),
            Ok(_) if read_rec_opt(path)?.is_none() => {
                tracing::warn!(path = %path, "removing a name a create left unfinished");
                self.remove_tree(path)
            }
            Ok(_) => Ok(()),
        }
    }

    /// Up to `max` entries whose names come after `after`, in name order; whether the
    /// listing is done; and the last name covered (the cursor of the next page).
    pub fn readdir(
        &self,
        g: Gfid,
        after: &[u8],
        max: u32,
    ) -> R<(Vec<pb::DirEntry>, bool, Vec<u8>)> {
        let path = self.dir_path(g)?;
        let mut names = path.names()?;
        if g == Gfid::ROOT {
            names.retain(|n| n != META);
        }
        names.sort();
        let start = names.partition_point(|n| n.as_bytes() <= after);
        let end = (start + max.max(1) as usize).min(names.len());
        let mut out = Vec::with_capacity(end - start);
        for n in &names[start..end] {
            match self.entry_attr(&path.join(n)) {
                Ok(attr) => out.push(pb::DirEntry {
                    name: n.as_bytes().to_vec(),
                    attr: Some(attr),
                }),
                Err(Errno::NOENT) => {}
                Err(e) => {
                    tracing::warn!(path = %path.join(n), "unreadable entry skipped: {e}")
                }
            }
        }
        let next = if end > start {
            names[end - 1].as_bytes().to_vec()
        } else {
            after.to_vec()
        };
        Ok((out, end == names.len(), next))
    }

    pub fn read(&self, g: Gfid, offset: u64, size: u32) -> R<Vec<u8>> {
        let fd = self.file(g)?;
        // Read into spare capacity: no zeroing of a buffer that is mostly larger than the
        // file (a read past a small file's end, a heal's 1 MiB block).
        let want = size.min(16 << 20) as usize;
        let mut buf = Vec::with_capacity(want);
        while buf.len() < want {
            let at = offset + buf.len() as u64;
            let room = want - buf.len();
            let spare = &mut buf.spare_capacity_mut()[..room];
            match rustix::io::pread(&*fd, spare, at) {
                Ok((filled, _)) if filled.is_empty() => break,
                Ok((filled, _)) => {
                    let k = filled.len();
                    // SAFETY: pread initialized the first `k` bytes of the spare capacity.
                    unsafe { buf.set_len(buf.len() + k) };
                }
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(buf)
    }

    pub fn readlink(&self, g: Gfid) -> R<Vec<u8>> {
        self.path_of(g)?.readlink()
    }

    pub fn getxattr(&self, g: Gfid, name: &[u8]) -> R<Vec<u8>> {
        check_user_xattr(name)?;
        let mut buf = vec![0u8; MAX_XATTR];
        let n = self
            .path_of(g)?
            .getxattr(OsStr::from_bytes(name), &mut buf[..])?;
        buf.truncate(n);
        Ok(buf)
    }

    pub fn listxattr(&self, g: Gfid) -> R<Vec<Vec<u8>>> {
        list_user_xattrs(&self.path_of(g)?)
    }

    pub fn statfs(&self) -> R<rfs::StatVfs> {
        self.root_dir.statvfs()
    }

    pub fn fsync(&self, g: Gfid) -> R<()> {
        if self.is_dir(g) {
            return rfs::fsync(self.dir_path(g)?.open_read()?);
        }
        match self.file(g) {
            // Never fdatasync: the version record is an xattr, which it may leave behind, and
            // data newer than its version would be taken for the copy's old content. The
            // gfid link goes to disk too: without it, a crash would leave a file no request
            // can reach by its gfid.
            Ok(fd) => {
                rfs::fsync(&*fd)?;
                let index = &self.index_dirs[usize::from(g.0[0])];
                rfs::fsync(index.open_read()?)
            }
            // Symlinks and special files have no data; their metadata went with the parent.
            Err(Errno::INVAL) => Ok(()),
            Err(e) => Err(e),
        }
    }

    // ---- replication records ----

    /// Grants a lock term on `g`: refused unless it exceeds every term promised before.
    pub fn promise(&self, g: Gfid, term: u64) -> R<Result<Record, u64>> {
        let path = self.path_of(g)?;
        let mut rec = read_rec(&path)?;
        let promised = rec.promised.max(self.term_floor);
        if term <= promised {
            return Ok(Err(promised));
        }
        self.raise_ceiling(term)?;
        rec.promised = term;
        write_rec(&path, &rec)?;
        Ok(Ok(rec))
    }

    /// Makes sure a crash cannot forget a promise of `term`. The record's own copy of it is
    /// not synced (a sync per lock would cost a disk flush each time); instead the brick
    /// keeps, synced, a ceiling above every term it promised, and after a restart refuses
    /// every term up to it (`term_floor`). Terms are the clients' clocks in nanoseconds,
    /// and the ceiling goes a minute ahead: it is written about once a minute.
    fn raise_ceiling(&self, term: u64) -> R<()> {
        let mut ceiling = self.term_ceiling.lock().unwrap();
        if term <= *ceiling {
            return Ok(());
        }
        let next = term.saturating_add(CEILING_AHEAD_NS);
        let meta = self
            .heal_dir
            .parent()
            .expect("the heal index is in .mortar");
        let tmp = meta.join(format!("{CEILING}.tmp"));
        let durable = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            std::io::Write::write_all(&mut f, format!("{next}\n").as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, meta.join(CEILING))?;
            std::fs::File::open(meta)?.sync_all()
        })();
        durable.map_err(|e| {
            tracing::error!("cannot record the term ceiling: {e}");
            io_errno(&e)
        })?;
        *ceiling = next;
        Ok(())
    }

    /// After a restart: every inode that was changing when the brick stopped and still has
    /// a pending mark goes to the heal index (its copy is unknown); the rest are done.
    fn recover_dirty(&self) -> anyhow::Result<()> {
        let dir = self.dirty_dir();
        let mut found = 0;
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let Some(g) = e.file_name().to_str().and_then(Gfid::parse_hex) else {
                continue;
            };
            if self
                .path_of(g)
                .and_then(|p| read_rec(&p))
                .is_ok_and(|r| r.pending != 0)
            {
                tracing::warn!(gfid = %g, "a change was cut short here: the copy goes to heal");
                self.mark_heal(g);
                found += 1;
            }
            std::fs::remove_file(e.path())?;
        }
        if found > 0 {
            tracing::warn!("{found} inodes had changes cut short by the last stop");
        }
        Ok(())
    }

    fn dirty_dir(&self) -> PathBuf {
        self.heal_dir.with_file_name("dirty")
    }

    /// Forgets inodes not changed for `idle` whose last change finished: their entries in
    /// `.mortar/dirty` go (the brick's sweeper calls this every few seconds).
    pub fn sweep_dirty(&self, idle: std::time::Duration) {
        let old: Vec<Gfid> = self
            .dirty
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| t.elapsed() >= idle)
            .map(|(g, _)| *g)
            .collect();
        for g in old {
            let mut dirty = self.dirty.lock().unwrap();
            if dirty.get(&g).is_none_or(|t| t.elapsed() < idle) {
                continue;
            }
            // Read and removed under the lock: a change marking it now waits.
            let pending = self
                .path_of(g)
                .and_then(|p| read_rec(&p))
                .is_ok_and(|r| r.pending != 0);
            if !pending {
                dirty.remove(&g);
                let _ = std::fs::remove_file(self.dirty_dir().join(g.hex()));
            }
        }
    }

    /// Inodes with an entry in `.mortar/dirty` now (for tests and metrics).
    pub fn dirty_count(&self) -> usize {
        self.dirty.lock().unwrap().len()
    }

    /// Whether every inode is at the version the client expects (else this copy is stale).
    /// Whether every inode is at the version the client expects (else this copy is stale),
    /// and the change is made under the newest lock term this brick promised for it: a
    /// writer whose lock was taken over (a higher term promised to another client since)
    /// is fenced here, on disk, whatever the in-memory lock table said a moment earlier.
    #[cfg(test)]
    pub fn versions_match(&self, updates: &[pb::VerUpdate]) -> R<bool> {
        for u in updates {
            if !at_expected(&self.record(gfid(&u.gfid)?)?, u) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The pre-op of a change: `false` if some inode is not where the change expects it
    /// (`at_expected`: this copy is stale, or the writer fenced); else records in each
    /// inode's record that change `new.id` begins, before any of it is applied. Each record
    /// is read once. `set_versions` clears the mark with the new version; a brick that dies
    /// in between leaves it, and its copy is taken for what it is: unknown.
    pub fn begin_change(&self, updates: &[pb::VerUpdate]) -> R<bool> {
        let mut recs = Vec::with_capacity(updates.len());
        for u in updates {
            let g = gfid(&u.gfid)?;
            let path = self.path_of(g)?;
            let rec = read_rec(&path)?;
            if !at_expected(&rec, u) {
                return Ok(false);
            }
            recs.push((g, path, rec, u.new.unwrap_or_default().id.max(1)));
        }
        for (g, path, mut rec, id) in recs {
            {
                // The entry in `.mortar/dirty` comes first: it is how a restart finds the mark.
                let mut dirty = self.dirty.lock().unwrap();
                if !dirty.contains_key(&g) {
                    mark_in(&self.dirty_dir(), g).map_err(|e| io_errno(&e))?;
                }
                dirty.insert(g, Instant::now());
            }
            rec.pending = id;
            write_rec(&path, &rec)?;
        }
        Ok(true)
    }

    /// Takes back `begin_change`'s mark for a change that was refused before it changed anything.
    pub fn clear_pending(&self, updates: &[pb::VerUpdate]) -> R<()> {
        for u in updates {
            let path = self.path_of(gfid(&u.gfid)?)?;
            let mut rec = read_rec(&path)?;
            rec.pending = 0;
            write_rec(&path, &rec)?;
        }
        Ok(())
    }

    pub fn set_versions(&self, updates: &[pb::VerUpdate], now: i64) -> R<()> {
        for u in updates {
            let path = self.path_of(gfid(&u.gfid)?)?;
            let mut rec = read_rec(&path)?;
            let new = u.new.unwrap_or_default();
            rec.ver = (new.term, new.seq, new.id);
            rec.ctime_ns = now;
            rec.pending = 0;
            write_rec(&path, &rec)?;
        }
        Ok(())
    }

    pub fn mark_heal(&self, g: Gfid) {
        if self.mark_heal_unsynced(g) {
            // On disk before the change it announces: a crash must not forget that this
            // copy (or another) needs healing. Only degraded writes get here.
            self.sync_heal_index();
        }
    }

    /// Puts `g` in the heal index without waiting for the disk (see `sync_heal_index`);
    /// whether it was not there before.
    pub(crate) fn mark_heal_unsynced(&self, g: Gfid) -> bool {
        if !self.heal.lock().unwrap().insert(g) {
            return false;
        }
        match mark_in(&self.heal_dir, g) {
            Ok(_) => self
                .heal_unsynced
                .store(true, std::sync::atomic::Ordering::Release),
            Err(e) => tracing::error!(gfid = %g, "cannot record pending heal: {e}"),
        }
        true
    }

    /// Makes the heal index's recent entries durable. A heal creating many copies marks each
    /// unsynced and syncs once, before the step that makes their parent look healed.
    pub(crate) fn sync_heal_index(&self) {
        if self
            .heal_unsynced
            .swap(false, std::sync::atomic::Ordering::AcqRel)
            && let Err(e) = std::fs::File::open(&self.heal_dir).and_then(|d| d.sync_all())
        {
            tracing::error!("cannot sync the heal index: {e}");
        }
    }

    pub fn heal_pending(&self) -> Vec<Gfid> {
        self.heal.lock().unwrap().iter().copied().collect()
    }

    pub fn heal_count(&self) -> usize {
        self.heal.lock().unwrap().len()
    }

    /// A new (or wiped) brick still needs one crawl of the whole tree begun after every
    /// brick of the volume serves the volfile that added it: until a brick has that volfile,
    /// a client that does not know the new brick yet can change a file through it without
    /// indexing the change for the new brick (it does not know there is one to miss it).
    pub fn joining(&self) -> bool {
        self.heal_dir.with_file_name(JOINING).exists()
    }

    /// The after-join crawl is done: from now on every change the new brick misses is indexed.
    pub fn joined(&self) {
        let _ = std::fs::remove_file(self.heal_dir.with_file_name(JOINING));
    }

    fn split_dir(&self) -> PathBuf {
        self.heal_dir.with_file_name("split")
    }

    /// Takes an inode off the heal index (its copies agree again), and off the split-brain list.
    pub fn heal_done(&self, g: Gfid) {
        if self.heal.lock().unwrap().remove(&g) {
            let _ = std::fs::remove_file(self.heal_dir.join(g.hex()));
        }
        if self.split.lock().unwrap().remove(&g) {
            let _ = std::fs::remove_file(self.split_dir().join(g.hex()));
        }
    }

    pub fn mark_split(&self, g: Gfid) {
        self.mark_heal(g);
        if self.split.lock().unwrap().insert(g) {
            let _ = std::fs::File::create(self.split_dir().join(g.hex()));
        }
    }

    pub fn is_split(&self, g: Gfid) -> bool {
        self.split.lock().unwrap().contains(&g)
    }

    /// Where an inode is, for people: a path for directories, else `<gfid:HEX>`.
    pub fn describe(&self, g: Gfid) -> String {
        match self.dir_names(g) {
            Ok(names) if self.is_dir(g) => {
                let rel: Vec<String> = names
                    .iter()
                    .map(|n| n.to_string_lossy().into_owned())
                    .collect();
                format!("/{}", rel.join("/"))
            }
            _ => format!("<gfid:{}>", g.hex()),
        }
    }

    // ---- mutations ----

    pub fn apply(&self, op: &pb::mutate_req::Op, now: i64) -> R<(pb::Attr, u64)> {
        use pb::mutate_req::Op;
        match op {
            Op::Create(c) => self.create(c, now).map(|a| (a, 0)),
            Op::Remove(r) => self.remove(r, now).map(|a| (a, 0)),
            Op::Rename(r) => self.rename(r, now).map(|a| (a, 0)),
            Op::Link(l) => self.link(l, now).map(|a| (a, 0)),
            Op::Setattr(s) => self.setattr(s, now).map(|a| (a, 0)),
            Op::Write(w) => self.write(w, now),
            Op::Fallocate(f) => self.fallocate(f, now).map(|a| (a, 0)),
            Op::Setxattr(s) => self.setxattr(s).map(|a| (a, 0)),
            Op::Removexattr(r) => self.removexattr(r).map(|a| (a, 0)),
            Op::SetQuota(q) => {
                let g = gfid(&q.gfid)?;
                self.set_quota(g, q.limit)?;
                self.getattr(g).map(|a| (a, 0))
            }
        }
    }

    pub(crate) fn touch_dir(&self, dir: &Dir, now: i64) {
        let t = Timestamps {
            last_access: OMIT,
            last_modification: ts(now),
        };
        let _ = dir.this().utimens(&t);
    }

    /// Stamps an inode's change time, kept in its record (POSIX: a name added, removed or
    /// renamed changes the inode's ctime, as ext4 does).
    fn touch_ctime(&self, path: &Loc, now: i64) -> R<()> {
        let mut rec = read_rec(path)?;
        rec.ctime_ns = now;
        write_rec(path, &rec)
    }

    fn create(&self, c: &pb::Create, now: i64) -> R<pb::Attr> {
        let parent = gfid(&c.parent)?;
        let name = check_name(&c.name, parent)?;
        let g = gfid(&c.gfid)?;
        crate::at::check_owner(Some(c.uid), Some(c.gid))?;
        if g == Gfid::ROOT || self.is_dir(g) || self.index_path(g).exists() {
            return Err(Errno::EXIST);
        }
        let pdir = self.dir_path(parent)?;
        let path = pdir.join(name);
        self.clear_leftover(&path)?;
        let mode = Mode::from_raw_mode(c.mode & 0o7777);
        let kind = pb::Kind::try_from(c.kind).unwrap_or(pb::Kind::Unknown);
        let rec = Record::new(g, c.term, now);
        let owner = (Some(c.uid), Some(c.gid));
        let times = Timestamps {
            last_access: ts(now),
            last_modification: ts(now),
        };
        match kind {
            pb::Kind::File => {
                let fd = self
                    .fd_retry(|| path.open(OFlags::CREATE | OFlags::EXCL | OFlags::RDWR, mode))?;
                let done = (|| {
                    rfs::fchown(
                        &fd,
                        owner.0.map(rfs::Uid::from_raw),
                        owner.1.map(rfs::Gid::from_raw),
                    )?;
                    rfs::fchmod(&fd, mode)?;
                    rfs::fsetxattr(&fd, record::XATTR, &rec.encode(), rfs::XattrFlags::empty())?;
                    rfs::futimens(&fd, &times)?;
                    path.link_to(&self.index_path(g))
                })();
                if let Err(e) = done {
                    let _ = path.unlink();
                    return Err(e);
                }
                self.cache_fd(g, Arc::new(fd));
                self.quota_new_file(parent, g);
            }
            pb::Kind::Dir => {
                path.mkdir(mode.bits())?;
                let done = (|| {
                    path.chown(owner.0, owner.1)?;
                    path.chmod(mode.bits())?;
                    write_rec(&path, &rec)?;
                    path.utimens(&times)
                })();
                if let Err(e) = done {
                    let _ = path.rmdir();
                    return Err(e);
                }
                self.dirs.write().unwrap().insert(
                    g,
                    DirNode {
                        parent,
                        name: name.to_owned(),
                    },
                );
            }
            pb::Kind::Symlink
            | pb::Kind::Fifo
            | pb::Kind::Socket
            | pb::Kind::Char
            | pb::Kind::Block => {
                match kind {
                    pb::Kind::Symlink => {
                        if c.target.is_empty() || c.target.len() > 4095 || c.target.contains(&0) {
                            return Err(Errno::INVAL);
                        }
                        path.symlink(OsStr::from_bytes(&c.target))?
                    }
                    _ => {
                        let ft = match kind {
                            pb::Kind::Fifo => FileType::Fifo,
                            pb::Kind::Socket => FileType::Socket,
                            pb::Kind::Char => FileType::CharacterDevice,
                            _ => FileType::BlockDevice,
                        };
                        path.mknod(ft, mode.bits(), c.rdev)?
                    }
                }
                let done = (|| {
                    path.chown(owner.0, owner.1)?;
                    write_rec(&path, &rec)?;
                    path.utimens(&times)?;
                    path.link_to(&self.index_path(g))
                })();
                if let Err(e) = done {
                    let _ = path.unlink();
                    return Err(e);
                }
            }
            pb::Kind::Unknown => return Err(Errno::INVAL),
        }
        self.touch_dir(&pdir, now);
        stat_loc(&path)
    }

    /// Drops the gfid link of a non-directory once its last visible name is gone.
    /// Called when a name of non-directory `g` went: with no name left, its data goes too,
    /// unless a session has it open; then it stays, as an orphan, until the last release.
    pub(crate) fn drop_if_unlinked(&self, g: Gfid) {
        let idx = self.index_path(g);
        if let Ok(st) = idx.lstat()
            && st.st_nlink <= 1
        {
            let opens = self.opens.lock().unwrap();
            if opens.contains_key(&g) {
                if self.orphans.lock().unwrap().insert(g)
                    && let Err(e) = std::fs::File::create(self.orphan_dir().join(g.hex()))
                {
                    tracing::error!(gfid = %g, "cannot record an orphan: {e}");
                }
                return;
            }
            drop(opens);
            let _ = idx.unlink();
            self.forget_fd(g);
            self.quota_forget(g, st.st_size as u64);
        }
    }

    fn orphan_dir(&self) -> PathBuf {
        self.heal_dir.with_file_name("orphans")
    }

    /// A session opened `g` (a regular file).
    pub fn opened(&self, g: Gfid) {
        *self.opens.lock().unwrap().entry(g).or_insert(0) += 1;
    }

    /// A session released `n` opens of `g`: the last release of an orphan reclaims it.
    pub fn released(&self, g: Gfid, n: u32) {
        let mut opens = self.opens.lock().unwrap();
        let Some(count) = opens.get_mut(&g) else {
            return;
        };
        *count = count.saturating_sub(n);
        if *count > 0 {
            return;
        }
        opens.remove(&g);
        drop(opens);
        if self.orphans.lock().unwrap().contains(&g) {
            self.reclaim_orphan(g);
        }
    }

    /// Removes an orphan's data, unless a name was linked to it again meanwhile.
    fn reclaim_orphan(&self, g: Gfid) {
        if !self.orphans.lock().unwrap().remove(&g) {
            return;
        }
        let _ = std::fs::remove_file(self.orphan_dir().join(g.hex()));
        self.drop_if_unlinked(g);
    }

    /// How many orphans (open, unlinked files) this brick keeps.
    pub fn orphan_count(&self) -> usize {
        self.orphans.lock().unwrap().len()
    }

    fn remove(&self, r: &pb::Remove, now: i64) -> R<pb::Attr> {
        let parent = gfid(&r.parent)?;
        let name = check_name(&r.name, parent)?;
        let pdir = self.dir_path(parent)?;
        let path = pdir.join(name);
        let st = path.lstat()?;
        let is_dir = FileType::from_raw_mode(st.st_mode) == FileType::Directory;
        let rec = read_rec(&path).ok();
        if r.dir {
            if !is_dir {
                return Err(Errno::NOTDIR);
            }
            if path.rmdir() == Err(Errno::NOTEMPTY) {
                // Names a create left unfinished do not count: clear them and try again.
                let dir = path.as_dir()?;
                for n in dir.names()? {
                    self.clear_leftover(&dir.join(&n))?;
                }
                path.rmdir()?;
            }
            if let Some(rec) = rec {
                self.dirs.write().unwrap().remove(&rec.gfid);
            }
        } else {
            if is_dir {
                return Err(Errno::ISDIR);
            }
            path.unlink()?;
            if let Some(rec) = rec {
                // A name of it is gone: its ctime changes if other names keep it.
                let _ = self.touch_ctime(&self.index_path(rec.gfid), now);
                self.drop_if_unlinked(rec.gfid);
            }
        }
        self.touch_dir(&pdir, now);
        stat_loc(&pdir.this())
    }

    fn rename(&self, r: &pb::Rename, now: i64) -> R<pb::Attr> {
        let (p, np) = (gfid(&r.parent)?, gfid(&r.newparent)?);
        let (name, newname) = (check_name(&r.name, p)?, check_name(&r.newname, np)?);
        let (pdir, npdir) = (self.dir_path(p)?, self.dir_path(np)?);
        let (src, dst) = (pdir.join(name), npdir.join(newname));
        let src_rec = read_rec(&src)?;
        let src_dir = self.is_dir(src_rec.gfid);
        let dst_rec = match read_rec(&dst) {
            Ok(r) => Some(r),
            Err(Errno::NOENT) => None,
            Err(e) => return Err(e),
        };
        if dst_rec.is_some_and(|d| d.gfid == src_rec.gfid) {
            // Two names of one inode: POSIX says rename does nothing.
            return stat_loc(&src);
        }
        let flags = rfs::RenameFlags::from_bits(r.flags).ok_or(Errno::INVAL)?;
        if src_dir
            && !flags.contains(rfs::RenameFlags::EXCHANGE)
            && self.is_ancestor(src_rec.gfid, np)
        {
            return Err(Errno::INVAL);
        }
        src.rename_to(&dst, flags)?;
        {
            let mut dirs = self.dirs.write().unwrap();
            if flags.contains(rfs::RenameFlags::EXCHANGE) {
                if let Some(d) = dst_rec
                    && let Some(node) = dirs.get_mut(&d.gfid)
                {
                    *node = DirNode {
                        parent: p,
                        name: name.to_owned(),
                    };
                }
            } else if let Some(d) = dst_rec {
                dirs.remove(&d.gfid);
            }
            if let Some(node) = dirs.get_mut(&src_rec.gfid) {
                *node = DirNode {
                    parent: np,
                    name: newname.to_owned(),
                };
            }
        }
        // The renamed inode's ctime changes, and so does a replaced one's that other names
        // keep (or, exchanged, the other one's).
        self.touch_ctime(&dst, now)?;
        if let Some(d) = dst_rec {
            if flags.contains(rfs::RenameFlags::EXCHANGE) {
                self.touch_ctime(&src, now)?;
            } else if !self.is_dir(d.gfid) {
                let _ = self.touch_ctime(&self.index_path(d.gfid), now);
                self.drop_if_unlinked(d.gfid);
            }
        }
        if p != np && self.has_quotas() {
            self.quota_recount(&[p, np]);
        }
        self.touch_dir(&pdir, now);
        self.touch_dir(&npdir, now);
        stat_loc(&dst)
    }

    fn is_ancestor(&self, a: Gfid, mut g: Gfid) -> bool {
        let dirs = self.dirs.read().unwrap();
        loop {
            if g == a {
                return true;
            }
            match dirs.get(&g) {
                Some(n) => g = n.parent,
                None => return false,
            }
        }
    }

    fn link(&self, l: &pb::Link, now: i64) -> R<pb::Attr> {
        let g = gfid(&l.gfid)?;
        let np = gfid(&l.newparent)?;
        let name = check_name(&l.newname, np)?;
        if self.is_dir(g) {
            return Err(Errno::PERM);
        }
        // An unlinked file does not come back through link() (as on ext4).
        if self.orphans.lock().unwrap().contains(&g) {
            return Err(Errno::NOENT);
        }
        let npdir = self.dir_path(np)?;
        let dst = npdir.join(name);
        self.index_path(g).link_to(&dst)?;
        self.touch_ctime(&dst, now)?;
        self.touch_dir(&npdir, now);
        stat_loc(&dst)
    }

    fn setattr(&self, s: &pb::Setattr, now: i64) -> R<pb::Attr> {
        let g = gfid(&s.gfid)?;
        // Before anything changes: a refusal must leave the inode as it was.
        crate::at::check_owner(s.uid, s.gid)?;
        let path = self.path_of(g)?;
        let st = path.lstat()?;
        let ft = FileType::from_raw_mode(st.st_mode);
        if let Some(size) = s.size {
            match ft {
                FileType::Directory => return Err(Errno::ISDIR),
                FileType::RegularFile => {
                    self.quota_grow(g, st.st_size as u64, size)?;
                    let fd = self.file(g)?;
                    if let Err(e) = rfs::ftruncate(&*fd, size) {
                        self.quota_settle(g, &*fd, size);
                        return Err(e);
                    }
                }
                _ => return Err(Errno::INVAL),
            }
        }
        if s.uid.is_some() || s.gid.is_some() {
            path.chown(s.uid, s.gid)?;
        }
        // After chown, which clears set-id bits, so an explicit mode wins.
        if let Some(mode) = s.mode
            && ft != FileType::Symlink
        {
            path.chmod(mode)?;
        }
        let mtime = s.mtime_ns.or(s.size.map(|_| now));
        if s.atime_ns.is_some() || mtime.is_some() {
            let t = Timestamps {
                last_access: s.atime_ns.map(ts).unwrap_or(OMIT),
                last_modification: mtime.map(ts).unwrap_or(OMIT),
            };
            path.utimens(&t)?;
        }
        stat_loc(&path)
    }

    fn write(&self, w: &pb::Write, now: i64) -> R<(pb::Attr, u64)> {
        let g = gfid(&w.gfid)?;
        let fd = self.file(g)?;
        let size = rfs::fstat(&*fd)?.st_size as u64;
        let off = if w.append { size } else { w.offset };
        // Refused before anything is written, the same way on every brick.
        let reserved = size.max(off + w.data.len() as u64);
        self.quota_grow(g, size, reserved)?;
        if let Err(e) = write_all_at(&*fd, &w.data, off) {
            // ENOSPC, EIO...: the quota charges only what the file really grew by.
            self.quota_settle(g, &fd, reserved);
            return Err(e);
        }
        rfs::futimens(
            &*fd,
            &Timestamps {
                last_access: OMIT,
                last_modification: ts(now),
            },
        )?;
        Ok((self.fd_attr(&fd, g)?, w.data.len() as u64))
    }

    /// After a failed growth that reserved quota up to `reserved` bytes: charge the file's
    /// real size instead (a failed write must not leave a PVC full of nothing).
    fn quota_settle(&self, g: Gfid, fd: &impl AsFd, reserved: u64) {
        if let Ok(st) = rfs::fstat(fd) {
            self.quota_grow(g, reserved, st.st_size as u64).ok();
        }
    }

    fn fd_attr(&self, fd: &impl AsFd, g: Gfid) -> R<pb::Attr> {
        let st = rfs::fstat(fd)?;
        let mut buf = [0u8; 96];
        let n = rfs::fgetxattr(fd, record::XATTR, &mut buf[..])?;
        let rec = Record::decode(&buf[..n]).ok_or(Errno::IO)?;
        debug_assert_eq!(rec.gfid, g);
        Ok(attr_of(&st, &rec))
    }

    fn fallocate(&self, f: &pb::Fallocate, now: i64) -> R<pb::Attr> {
        let g = gfid(&f.gfid)?;
        let fd = self.file(g)?;
        const KEEP_SIZE: i32 = 1;
        let mut reserved = None;
        if f.mode & KEEP_SIZE == 0 {
            let size = rfs::fstat(&*fd)?.st_size as u64;
            let end = size.max(f.offset.saturating_add(f.length));
            self.quota_grow(g, size, end)?;
            reserved = Some(end);
        }
        let done = rfs::fallocate(
            &*fd,
            rfs::FallocateFlags::from_bits_retain(f.mode as u32),
            f.offset,
            f.length,
        );
        if let (Err(e), Some(end)) = (done, reserved) {
            self.quota_settle(g, &fd, end);
            return Err(e);
        }
        done?;
        rfs::futimens(
            &*fd,
            &Timestamps {
                last_access: OMIT,
                last_modification: ts(now),
            },
        )?;
        self.fd_attr(&fd, g)
    }

    fn setxattr(&self, s: &pb::Setxattr) -> R<pb::Attr> {
        check_user_xattr(&s.name)?;
        if s.value.len() > MAX_XATTR {
            return Err(Errno::TOOBIG);
        }
        let path = self.path_of(gfid(&s.gfid)?)?;
        let flags = rfs::XattrFlags::from_bits(s.flags as u32).ok_or(Errno::INVAL)?;
        path.setxattr(OsStr::from_bytes(&s.name), &s.value, flags)?;
        stat_loc(&path)
    }

    fn removexattr(&self, r: &pb::Removexattr) -> R<pb::Attr> {
        check_user_xattr(&r.name)?;
        let path = self.path_of(gfid(&r.gfid)?)?;
        path.removexattr(OsStr::from_bytes(&r.name))?;
        stat_loc(&path)
    }

    // ---- verification ----

    /// Every inode under the root with what `mortar verify` compares, in path order.
    pub fn manifest(&self, mut emit: impl FnMut(pb::ManifestEntry) -> bool) -> R<()> {
        let mut stack = vec![(String::new(), self.root_dir.clone())];
        while let Some((rel, dir)) = stack.pop() {
            let mut names = dir.names()?;
            if rel.is_empty() {
                names.retain(|n| n != META);
            }
            names.sort();
            let mut subdirs = Vec::new();
            for n in names {
                let path = dir.join(&n);
                let child = format!("{rel}/{}", n.to_string_lossy());
                let attr = match stat_loc(&path) {
                    Ok(a) => a,
                    Err(Errno::NOENT) => continue,
                    Err(_) => {
                        // A name without a record still counts as a difference to report.
                        let st = path.lstat()?;
                        attr_of(&st, &Record::new(Gfid([0; 16]), 0, 0))
                    }
                };
                let kind = attr.kind();
                let mut entry = pb::ManifestEntry {
                    path: child.clone(),
                    attr: Some(attr),
                    ..Default::default()
                };
                match kind {
                    pb::Kind::File => entry.sha256 = hash_file(&path)?,
                    pb::Kind::Symlink => entry.target = path.readlink()?,
                    pb::Kind::Dir => subdirs.push((child, path.as_dir()?)),
                    _ => {}
                }
                for name in list_user_xattrs(&path)? {
                    let mut buf = vec![0u8; MAX_XATTR];
                    let k = path.getxattr(OsStr::from_bytes(&name), &mut buf[..])?;
                    buf.truncate(k);
                    entry.xattrs.push(pb::XattrPair { name, value: buf });
                }
                if !emit(entry) {
                    return Ok(());
                }
            }
            // Reverse so that the stack pops directories in name order.
            stack.extend(subdirs.into_iter().rev());
        }
        Ok(())
    }
}

fn hash_file(path: &Loc) -> R<Vec<u8>> {
    let fd = path.open(OFlags::RDONLY | OFlags::NOATIME, Mode::empty())?;
    let mut f = std::fs::File::from(fd);
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| io_errno(&e))?;
    Ok(h.finalize().to_vec())
}

fn check_user_xattr(name: &[u8]) -> R<()> {
    if name.len() > 255 || name.contains(&0) {
        return Err(Errno::RANGE);
    }
    if !name.starts_with(b"user.") || name.len() == 5 {
        return Err(Errno::OPNOTSUPP);
    }
    Ok(())
}

pub(crate) fn list_user_xattrs(path: &Loc) -> R<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; MAX_XATTR];
    let n = path.listxattr(&mut buf[..])?;
    let mut names: Vec<Vec<u8>> = buf[..n]
        .split(|&b| b == 0)
        .filter(|s| s.starts_with(b"user."))
        .map(|s| s.to_vec())
        .collect();
    names.sort();
    Ok(names)
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_empty_directory_becomes_a_brick_and_gets_a_full_heal() {
        let d = std::env::temp_dir().join(format!("mortar-store-{}", Gfid::random()));
        std::fs::create_dir_all(d.join("somebody")).unwrap();
        std::fs::write(d.join("somebody/data"), b"x").unwrap();
        let err = Store::open(&d)
            .err()
            .expect("a foreign tree must be refused")
            .to_string();
        assert!(err.contains("not a Mortar brick"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
        let s = Store::open(&d).unwrap();
        assert_eq!(
            s.heal_pending(),
            vec![Gfid::ROOT],
            "a new brick heals its root in full"
        );
        drop(s);
        // Opening it again is not a new brick.
        let s = Store::open(&d).unwrap();
        assert_eq!(
            s.heal_pending(),
            vec![Gfid::ROOT],
            "still pending until healed"
        );
        s.heal_done(Gfid::ROOT);
        assert!(Store::open(&d).unwrap().heal_pending().is_empty());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Found by fuzz/ (brick_rpc): an owner of -1 (chown's "unchanged") in a Setattr or
    /// Create reached rustix, which asserts against it: the brick's request panicked, with
    /// the inode left marked pending. Now EINVAL, before anything changes.
    #[test]
    fn an_owner_of_minus_one_is_refused_before_anything_changes() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("b")).unwrap();
        let file = Gfid::random();
        let create = |uid, gid| pb::Create {
            parent: Gfid::ROOT.to_vec(),
            name: b"f".to_vec(),
            gfid: file.to_vec(),
            kind: pb::Kind::File as i32,
            mode: 0o644,
            uid,
            gid,
            ..Default::default()
        };
        let op = |c| pb::mutate_req::Op::Create(c);
        assert_eq!(
            s.apply(&op(create(u32::MAX, 0)), 1).err(),
            Some(Errno::INVAL)
        );
        assert_eq!(
            s.apply(&op(create(0, u32::MAX)), 1).err(),
            Some(Errno::INVAL)
        );
        assert_eq!(
            s.lookup(Gfid::ROOT, b"f").unwrap().1,
            None,
            "nothing was created"
        );
        s.apply(&op(create(7, 8)), 1).unwrap();
        let setattr = |uid, gid| {
            pb::mutate_req::Op::Setattr(pb::Setattr {
                gfid: file.to_vec(),
                uid,
                gid,
                size: Some(100),
                ..Default::default()
            })
        };
        assert_eq!(
            s.apply(&setattr(Some(u32::MAX), None), 2).err(),
            Some(Errno::INVAL)
        );
        assert_eq!(
            s.apply(&setattr(None, Some(u32::MAX)), 2).err(),
            Some(Errno::INVAL)
        );
        let a = s.getattr(file).unwrap();
        assert_eq!(
            (a.uid, a.gid, a.size),
            (7, 8, 0),
            "the refused setattr changed nothing"
        );
        // u32::MAX - 1 is an owner like any other.
        s.apply(&setattr(Some(u32::MAX - 1), Some(u32::MAX - 1)), 3)
            .unwrap();
        let a = s.getattr(file).unwrap();
        assert_eq!((a.uid, a.gid, a.size), (u32::MAX - 1, u32::MAX - 1, 100));
        // Heal steps reach the same check.
        let meta = pb::heal_req::Op::Meta(pb::HealMeta {
            mode: 0o600,
            uid: u32::MAX,
            ..Default::default()
        });
        assert_eq!(s.heal_step(file, &meta, 4).err(), Some(Errno::INVAL));
    }

    /// Lock terms fence writes on disk: a change made under a term below the one promised
    /// since (another client took the lock) is refused as stale, even though its expected
    /// version is right.
    #[test]
    fn a_change_under_an_older_term_than_promised_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("b")).unwrap();
        let v = |term, seq| Some(pb::Version { term, seq, id: 7 });
        let update = |term| pb::VerUpdate {
            gfid: Gfid::ROOT.to_vec(),
            expect: v(0, 0).map(|_| pb::Version::default()),
            new: v(term, 1),
        };
        assert_eq!(s.promise(Gfid::ROOT, 10).unwrap().map(|_| ()), Ok(()));
        assert_eq!(s.versions_match(&[update(10)]), Ok(true));
        // Another client is promised term 20: the holder of term 10 is fenced.
        assert_eq!(s.promise(Gfid::ROOT, 20).unwrap().map(|_| ()), Ok(()));
        assert_eq!(s.versions_match(&[update(10)]), Ok(false));
        assert_eq!(s.versions_match(&[update(20)]), Ok(true));
    }

    /// Item 5 of the replication issue: a promise must survive a crash that loses the
    /// record's unsynced copy of it, or a fenced writer could come back after a restart.
    #[test]
    fn a_promise_lost_in_a_crash_is_still_kept_after_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("b");
        let s = Store::open(&dir).unwrap();
        assert!(s.promise(Gfid::ROOT, 1_000).unwrap().is_ok());
        // The crash: the record's promise was never written back.
        let root = s.path_of(Gfid::ROOT).unwrap();
        let mut rec = read_rec(&root).unwrap();
        rec.promised = 0;
        write_rec(&root, &rec).unwrap();
        drop(s);
        let s = Store::open(&dir).unwrap();
        let floor = match s.promise(Gfid::ROOT, 999).unwrap() {
            Err(p) => p,
            Ok(_) => panic!("a term below one promised before the crash was granted"),
        };
        assert!(floor >= 1_000, "refused below {floor}");
        assert!(s.promise(Gfid::ROOT, 1_000).unwrap().is_err());
        assert!(s.promise(Gfid::ROOT, floor + 1).unwrap().is_ok());
    }

    /// Item 4 of the replication issue: a change cut short (the brick died between the
    /// pre-op mark and the new version) leaves its copy marked, visibly and durably, and a
    /// restart sends it to heal; a change that finished leaves nothing behind.
    #[test]
    fn a_change_cut_short_leaves_a_mark_that_a_restart_sends_to_heal() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("b");
        let s = Store::open(&dir).unwrap();
        s.heal_done(Gfid::ROOT);
        let update = |seq, id| pb::VerUpdate {
            gfid: Gfid::ROOT.to_vec(),
            expect: Some(pb::Version {
                term: 5,
                seq: seq - 1,
                id: id - 1,
            }),
            new: Some(pb::Version { term: 5, seq, id }),
        };
        assert!(s.promise(Gfid::ROOT, 5).unwrap().is_ok());
        let first = pb::VerUpdate {
            expect: Some(pb::Version::default()),
            ..update(1, 1)
        };
        // A change that finishes: marked, then cleared with its version.
        assert_eq!(s.begin_change(std::slice::from_ref(&first)), Ok(true));
        assert!(s.getattr(Gfid::ROOT).unwrap().pending);
        s.set_versions(std::slice::from_ref(&first), 1).unwrap();
        assert!(!s.getattr(Gfid::ROOT).unwrap().pending);
        assert_eq!(s.dirty_count(), 1);
        s.sweep_dirty(std::time::Duration::ZERO);
        assert_eq!(s.dirty_count(), 0, "a finished change is forgotten");
        drop(s);
        let s = Store::open(&dir).unwrap();
        assert!(s.heal_pending().is_empty());
        // A change cut short: the mark stays, the copy refuses further changes (stale) ...
        assert_eq!(s.begin_change(&[update(2, 2)]), Ok(true));
        s.sweep_dirty(std::time::Duration::ZERO);
        assert_eq!(s.dirty_count(), 1, "a pending change is not forgotten");
        let a = s.getattr(Gfid::ROOT).unwrap();
        assert!(a.pending);
        assert_eq!(a.ver.unwrap().seq, 1);
        assert_eq!(s.versions_match(&[update(2, 2)]), Ok(false));
        drop(s);
        // ... and a restart puts it in the heal index.
        let s = Store::open(&dir).unwrap();
        assert_eq!(s.heal_pending(), vec![Gfid::ROOT]);
        assert!(s.getattr(Gfid::ROOT).unwrap().pending);
    }

    fn create(s: &Store, parent: Gfid, name: &str, kind: pb::Kind) -> Gfid {
        let g = Gfid::random();
        let c = pb::Create {
            parent: parent.to_vec(),
            name: name.as_bytes().to_vec(),
            gfid: g.to_vec(),
            kind: kind as i32,
            mode: 0o644,
            ..Default::default()
        };
        s.apply(&pb::mutate_req::Op::Create(c), 1).unwrap();
        g
    }

    /// Item 10 of the replication issue: a create cut short between its steps. A file whose
    /// gfid link is missing gets it back at the first lookup or listing (so heal and reads by
    /// gfid reach it); a name without a record is not listed, and a create of the same name
    /// or an rmdir of its directory clears it.
    #[test]
    fn what_a_create_cut_short_left_is_repaired() {
        let tmp = tempfile::tempdir().unwrap();
        let s = Store::open(&tmp.path().join("b")).unwrap();
        let root = tmp.path().join("b");
        // The gfid link never made.
        let g = create(&s, Gfid::ROOT, "f", pb::Kind::File);
        std::fs::remove_file(
            root.join(".mortar/gfid")
                .join(format!("{:02x}", g.0[0]))
                .join(g.hex()),
        )
        .unwrap();
        s.forget_fd(g);
        assert_eq!(
            s.getattr(g).err(),
            Some(Errno::NOENT),
            "unreachable by gfid"
        );
        let (_, a) = s.lookup(Gfid::ROOT, b"f").unwrap();
        assert_eq!(a.unwrap().nlink, 1);
        assert_eq!(s.getattr(g).unwrap().nlink, 1, "reachable by gfid again");
        // The same through a listing.
        let g2 = create(&s, Gfid::ROOT, "f2", pb::Kind::File);
        std::fs::remove_file(
            root.join(".mortar/gfid")
                .join(format!("{:02x}", g2.0[0]))
                .join(g2.hex()),
        )
        .unwrap();
        s.forget_fd(g2);
        let (entries, _, _) = s.readdir(Gfid::ROOT, b"", 100).unwrap();
        assert!(entries.iter().any(|e| e.name == b"f2"));
        assert!(s.getattr(g2).is_ok());
        // Names without a record: a file and a directory (with a leftover inside).
        let d = create(&s, Gfid::ROOT, "d", pb::Kind::Dir);
        std::fs::write(root.join("junk"), b"half made").unwrap();
        std::fs::create_dir(root.join("junkdir")).unwrap();
        std::fs::write(root.join("d/junk"), b"half made").unwrap();
        // A restart copes with them too.
        drop(s);
        let s = Store::open(&root).unwrap();
        let (entries, _, _) = s.readdir(Gfid::ROOT, b"", 100).unwrap();
        let names: Vec<&[u8]> = entries.iter().map(|e| e.name.as_slice()).collect();
        assert_eq!(names, vec![&b"d"[..], b"f", b"f2"]);
        assert!(s.lookup(Gfid::ROOT, b"junk").unwrap().1.is_none());
        create(&s, Gfid::ROOT, "junk", pb::Kind::File);
        create(&s, Gfid::ROOT, "junkdir", pb::Kind::Dir);
        let rm = pb::Remove {
            parent: Gfid::ROOT.to_vec(),
            name: b"d".to_vec(),
            dir: true,
        };
        s.apply(&pb::mutate_req::Op::Remove(rm), 2).unwrap();
        assert!(!root.join("d").exists());
        assert!(!s.is_dir(d));
    }

    #[test]
    fn names_are_checked() {
        let r = Gfid::ROOT;
        assert_eq!(check_name(b"..", r), Err(Errno::INVAL));
        assert_eq!(check_name(b"a/b", r), Err(Errno::INVAL));
        assert_eq!(check_name(b"a\0b", r), Err(Errno::INVAL));
        assert_eq!(check_name(&[b'x'; 256], r), Err(Errno::NAMETOOLONG));
        assert_eq!(check_name(b".mortar", r), Err(Errno::PERM));
        assert!(check_name(b".mortar", Gfid::random()).is_ok());
        assert!(check_name(b"ok", r).is_ok());
    }
}
