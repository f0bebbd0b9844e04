//! The FUSE file system: kernel requests become volume operations. Every request is handed
//! to the async runtime at once, so a slow brick never stalls the kernel's request loop.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr,
    ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyLock,
    ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use mortar_proto as pb;

use mortar_common::error::Error;
use mortar_common::gfid::Gfid;
use mortar_replication::volume::Volume;

pub const MAX_WRITE: u32 = 1 << 20;
const BLKSIZE: u32 = 128 * 1024;

#[derive(Clone, Copy, Debug, serde::Serialize, serde::Deserialize)]
pub struct Timeouts {
    pub attr: Duration,
    pub entry: Duration,
}

enum Handle {
    /// `leased`: opened through a lease (see `Volume::open_leased`).
    File {
        append: bool,
        leased: bool,
    },
    Dir {
        entries: Arc<Vec<pb::DirEntry>>,
    },
}

struct Inner {
    vol: Arc<Volume>,
    /// The inodes the kernel knows, with its lookup count: kept until it forgets them.
    inos: RwLock<HashMap<u64, (Gfid, u64)>>,
    /// The version each file had when it was last opened here: if it has not changed by
    /// the next open, the kernel's cached pages are still right and are kept.
    opened_at: Mutex<HashMap<Gfid, pb::Version>>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// (inode, lock owner) pairs that took application locks: only those need an unlock
    /// round trip when a file is closed.
    lock_owners: Mutex<HashSet<(Gfid, u64)>>,
    /// The last attributes handed out for each directory the kernel knows: one removed
    /// while something still refers to it (an open descriptor, a bind mount, a cwd) answers
    /// stat with these and nlink 0, as a local filesystem does, not with ENOENT (the kubelet
    /// reads ENOENT as "nothing mounted here" and leaves the mount behind).
    dir_attrs: Mutex<HashMap<Gfid, FileAttr>>,
    /// Tells the kernel to drop cached attributes (set once the session exists).
    notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
    t: Timeouts,
    /// Where a successor of this process learns which inodes and lock owners the kernel
    /// holds (see `handover`); `None` outside a mount (the fuzz harness).
    state: Option<crate::handover::StateLog>,
    /// Handles below this one were opened by a predecessor (see `handover`).
    fh_base: u64,
}

pub struct MortarFs {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
}

fn errno(e: Error) -> Errno {
    if matches!(
        e,
        Error::NoQuorum { .. } | Error::Transport { .. } | Error::Denied { .. } | Error::NoGoodCopy
    ) {
        tracing::warn!("{e}");
    }
    Errno::from_i32(e.errno())
}

/// A request the kernel sent again because the server that had taken it died (see
/// `handover`): it may have been carried out already.
fn resent(req: &Request) -> bool {
    req.unique().0 & (1 << 63) != 0
}

/// What a request that may have been carried out already (`resent`) answers when its own
/// effect is what it finds: a name to create that exists, or one to remove that does not.
/// The effect was most likely its own, done before the server died; it is answered as done.
fn done_before(resent: bool, r: &Result<(), Error>, found: i32) -> bool {
    resent && matches!(r, Err(Error::Os(e)) if *e == found)
}

fn time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn ns_of(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_nanos() as i64,
        Err(e) => -(e.duration().as_nanos() as i64),
    }
}

fn kind(k: pb::Kind) -> FileType {
    match k {
        pb::Kind::Dir => FileType::Directory,
        pb::Kind::Symlink => FileType::Symlink,
        pb::Kind::Fifo => FileType::NamedPipe,
        pb::Kind::Socket => FileType::Socket,
        pb::Kind::Char => FileType::CharDevice,
        pb::Kind::Block => FileType::BlockDevice,
        pb::Kind::File | pb::Kind::Unknown => FileType::RegularFile,
    }
}

impl Inner {
    fn gfid(&self, ino: INodeNo) -> Result<Gfid, Errno> {
        if ino.0 == 1 {
            return Ok(Gfid::ROOT);
        }
        self.inos
            .read()
            .unwrap()
            .get(&ino.0)
            .map(|(g, _)| *g)
            .ok_or(Errno::ESTALE)
    }

    /// Counts one more kernel reference to the inode of `a` (a lookup, a create, a
    /// readdirplus entry); must happen before the reply that hands it out is sent.
    /// Checks `a` (see [`Inner::attr`]) and counts one more kernel reference to its inode.
    /// An inode number already handed out for another gfid (two gfids agreeing in their
    /// first 64 bits) is refused with EIO rather than aliased.
    fn referenced(&self, a: &pb::Attr) -> Result<FileAttr, Errno> {
        let fa = self.attr(a)?;
        let g = Gfid::from_bytes(&a.gfid).ok_or(Errno::EIO)?;
        if g != Gfid::ROOT {
            let mut inos = self.inos.write().unwrap();
            let n = inos.len();
            let slot = inos.entry(g.ino()).or_insert((g, 0));
            if slot.0 != g {
                if let Some(suppressed) = BAD_ATTR_WARNINGS.allow() {
                    tracing::error!(ino = g.ino(), gfid = %g, other = %slot.0, suppressed, "inode number collision: refused");
                }
                return Err(Errno::EIO);
            }
            slot.1 += 1;
            if inos.len() != n {
                self.vol.stats.inodes.fetch_add(1, Relaxed);
                if let Some(st) = &self.state {
                    st.ino(g.ino(), g);
                    self.compact_state(&inos);
                }
            }
        }
        Ok(fa)
    }

    /// Rewrites the state log once it holds many times more records than the inodes and
    /// lock owners it describes (it only grows otherwise). Called under the inode table's
    /// write lock, so no inode record is appended meanwhile.
    fn compact_state(&self, inos: &HashMap<u64, (Gfid, u64)>) {
        let Some(st) = &self.state else { return };
        let owners = self.lock_owners.lock().unwrap();
        if st.appended() < 4 * (inos.len() + owners.len()) as u64 + 65536 {
            return;
        }
        let live = crate::handover::State {
            inos: inos.iter().map(|(i, (g, _))| (*i, *g)).collect(),
            lock_owners: owners.clone(),
        };
        if let Err(e) = st.rewrite(&live) {
            tracing::error!("rewriting the state log: {e}");
        }
    }

    /// A lock owner took a POSIX lock on `g`: its close must release it (see `flush`).
    fn lock_taken(&self, g: Gfid, owner: u64) {
        if self.lock_owners.lock().unwrap().insert((g, owner))
            && let Some(st) = &self.state
        {
            st.lock(g, owner);
        }
    }

    /// The entries of directory `g` for handle `fh`, which a predecessor opened.
    async fn reopen_dir(&self, g: Gfid, fh: FileHandle) -> Result<Arc<Vec<pb::DirEntry>>, Error> {
        let entries = Arc::new(self.vol.readdir(g).await?);
        self.handles.lock().unwrap().insert(
            fh.0,
            Handle::Dir {
                entries: entries.clone(),
            },
        );
        Ok(entries)
    }

    /// Whether a predecessor of this process opened handle `fh` (see `handover`).
    fn inherited(&self, fh: FileHandle) -> bool {
        fh.0 < self.fh_base
    }

    /// [`file_attr`], logging what was wrong (at most once per 10 s); the directory's
    /// attributes are remembered for [`Inner::removed_dir`].
    fn attr(&self, a: &pb::Attr) -> Result<FileAttr, Errno> {
        let (g, fa) = file_attr(a).map_err(|what| {
            if let Some(suppressed) = BAD_ATTR_WARNINGS.allow() {
                tracing::error!(suppressed, "malformed attributes from a brick: {what}");
            }
            Errno::EIO
        })?;
        if fa.kind == FileType::Directory {
            self.dir_attrs.lock().unwrap().insert(g, fa);
        }
        Ok(fa)
    }

    /// A directory gone from the volume that the kernel still refers to: its last attributes,
    /// with no links.
    fn removed_dir(&self, g: Gfid) -> Option<FileAttr> {
        let mut fa = *self.dir_attrs.lock().unwrap().get(&g)?;
        fa.nlink = 0;
        Some(fa)
    }

    fn new_fh(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Relaxed);
        self.handles.lock().unwrap().insert(fh, h);
        fh
    }

    fn entry(&self, reply: ReplyEntry, r: Result<pb::Attr, Error>) {
        match r {
            Ok(a) => match self.referenced(&a) {
                Ok(fa) => reply.entry(&self.t.entry, &fa, Generation(0)),
                Err(e) => reply.error(e),
            },
            Err(e) => reply.error(errno(e)),
        }
    }

    /// Answers an open of `ino` (`g`) once it is made (`leased`: through a lease).
    fn opened(
        &self,
        ino: INodeNo,
        g: Gfid,
        flags: OpenFlags,
        opened: Result<pb::Attr, Error>,
        leased: bool,
        reply: ReplyOpen,
    ) {
        match opened {
            Ok(a) if a.kind() == pb::Kind::Dir => {
                self.vol.release_leased(g, leased);
                reply.error(Errno::EISDIR)
            }
            Ok(a) => {
                let fh = self.new_fh(Handle::File {
                    append: flags.0 & libc::O_APPEND != 0,
                    leased,
                });
                // Unchanged since the last open here (by anyone, this mount included):
                // whatever the kernel cached since then is still the file's content.
                let unchanged = match a.ver {
                    Some(v) => self.opened_at.lock().unwrap().insert(g, v) == Some(v),
                    None => false,
                };
                let keep = if unchanged {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    // Changed since this mount last opened it (or never opened here): the
                    // size and times the kernel cached from an earlier stat are stale too.
                    // Close-to-open means this open sees the last close of any client, so
                    // drop them (attributes only: the page cache goes with the missing
                    // KEEP_CACHE).
                    if let Some(n) = self.notifier.get() {
                        let _ = n.inval_inode(ino, -1, 0);
                    }
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), keep);
            }
            Err(e) => {
                // Bricks that counted the open before it failed elsewhere forget it.
                self.vol.release_leased(g, leased);
                reply.error(errno(e))
            }
        }
    }

    /// Answers the creation of `name` in `p` (`again`: see [`resent`]).
    async fn created(
        &self,
        again: bool,
        p: Gfid,
        name: &[u8],
        reply: ReplyEntry,
        r: Result<pb::Attr, Error>,
    ) {
        let r = match r {
            Err(Error::Os(libc::EEXIST)) if again => self.vol.lookup(p, name).await,
            r => r,
        };
        self.entry(reply, r)
    }

    async fn unlock_owner(&self, g: Gfid, owner: u64) {
        if !self.lock_owners.lock().unwrap().remove(&(g, owner)) {
            return;
        }
        if let Some(st) = &self.state {
            st.unlock(g, owner);
        }
        if let Err(e) = self
            .vol
            .lk(g, owner, 0, libc::F_UNLCK, 0, u64::MAX, false, false)
            .await
        {
            tracing::warn!(gfid = %g, "releasing locks on close: {e}");
        }
    }
}

impl MortarFs {
    /// Where the mount puts the session's notifier once the session exists.
    pub fn notifier_slot(&self) -> Arc<std::sync::OnceLock<fuser::Notifier>> {
        self.inner.notifier.clone()
    }

    /// When a brick recalls a lease, the kernel's caches of that inode (attributes, pages)
    /// go too: they were good while nobody else changed it.
    pub fn drop_kernel_caches_on_recall(&self) {
        // One thread, off the runtime: the kernel may wait for pages being read.
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let notifier = self.inner.notifier.clone();
        std::thread::spawn(move || {
            for ino in rx {
                if let Some(n) = notifier.get() {
                    let _ = n.inval_inode(INodeNo(ino), 0, 0);
                }
            }
        });
        let inner = Arc::downgrade(&self.inner);
        let tx = Mutex::new(tx);
        let _ = self.inner.vol.on_recall.set(Box::new(move |g: Gfid| {
            let Some(inner) = inner.upgrade() else { return };
            let ino = if g == Gfid::ROOT { 1 } else { g.ino() };
            if ino == 1 || inner.inos.read().unwrap().contains_key(&ino) {
                let _ = tx.lock().unwrap().send(ino);
            }
        }));
    }

    pub fn new(vol: Arc<Volume>, rt: tokio::runtime::Handle, t: Timeouts) -> MortarFs {
        MortarFs {
            inner: Arc::new(Inner {
                vol,
                inos: RwLock::default(),
                opened_at: Mutex::default(),
                handles: Mutex::default(),
                next_fh: AtomicU64::new(1),
                lock_owners: Mutex::default(),
                dir_attrs: Mutex::default(),
                notifier: Arc::default(),
                t,
                state: None,
                fh_base: 1,
            }),
            rt,
        }
    }

    /// Keeps what a successor needs in `log` (see `handover`), and takes over what the
    /// predecessors left there: server `generation` of its mount (0: the first).
    pub fn with_state(
        mut self,
        log: crate::handover::StateLog,
        generation: u64,
    ) -> std::io::Result<MortarFs> {
        let inner = Arc::get_mut(&mut self.inner).expect("not shared yet");
        let held = log.load()?;
        log.rewrite(&held)?;
        if !held.inos.is_empty() || !held.lock_owners.is_empty() {
            tracing::info!(
                inodes = held.inos.len(),
                lock_owners = held.lock_owners.len(),
                "taking over from the previous server"
            );
        }
        // How often the kernel looked each one up is not known: they stay until unmount.
        let inos = held.inos.into_iter().map(|(i, g)| (i, (g, u64::MAX / 2)));
        inner.inos.get_mut().unwrap().extend(inos);
        let n = inner.inos.get_mut().unwrap().len() as u64;
        inner.vol.stats.inodes.store(n, Relaxed);
        inner
            .lock_owners
            .get_mut()
            .unwrap()
            .extend(held.lock_owners);
        // Handles of earlier servers stay below this one's.
        inner.fh_base = (generation << 40) + 1;
        inner.next_fh = AtomicU64::new(inner.fh_base);
        inner.state = Some(log);
        Ok(self)
    }
}

/// Resolves `$ino` to a gfid and runs `$body` on the runtime, or answers the error at once.
macro_rules! on_inode {
    ($self:ident, $ino:expr, $reply:ident, |$inner:ident, $g:ident| $body:expr) => {
        match $self.inner.gfid($ino) {
            Ok($g) => {
                let $inner = $self.inner.clone();
                $self.rt.spawn(async move { $body });
            }
            Err(e) => $reply.error(e),
        }
    };
}

/// The one edge where a brick's description of an inode becomes the kernel's: a gfid that is
/// not 16 bytes, an unknown kind, inode number 0, or 1 (the root's) for another gfid is refused,
/// never silently turned into something else (a bad gfid once became the root inode).
fn file_attr(a: &pb::Attr) -> Result<(Gfid, FileAttr), &'static str> {
    let g = Gfid::from_bytes(&a.gfid).ok_or("gfid")?;
    let k = match pb::Kind::try_from(a.kind) {
        Ok(pb::Kind::Unknown) | Err(_) => return Err("kind"),
        Ok(k) => k,
    };
    let ino = g.ino();
    if (ino == 1) != (g == Gfid::ROOT) {
        return Err("inode number 1 for a gfid other than the root's");
    }
    // The kernel takes node id 0 in a lookup reply for "no such entry" (and caches it as
    // such): a file would silently vanish. `Gfid::random` never makes one.
    if ino == 0 {
        return Err("inode number 0");
    }
    let fa = FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
        crtime: time(a.ctime_ns),
        kind: kind(k),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        blksize: BLKSIZE,
        flags: 0,
    };
    Ok((g, fa))
}

/// The fuzz targets' way in (fuzz/): the checks that brick replies pass before the kernel
/// sees them, without a mount or a volume.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;

    pub fn file_attr(a: &pb::Attr) -> Result<(Gfid, FileAttr), &'static str> {
        super::file_attr(a)
    }
}

/// Malformed attributes from bricks: logged at most once per 10 s.
static BAD_ATTR_WARNINGS: mortar_common::telemetry::RateLimit =
    mortar_common::telemetry::RateLimit::new(Duration::from_secs(10));

/// The gfid of attributes already checked (or the root's when not).
fn g_of(a: &pb::Attr) -> Gfid {
    Gfid::from_bytes(&a.gfid).unwrap_or(Gfid::ROOT)
}

fn bytes(s: &OsStr) -> Vec<u8> {
    s.as_bytes().to_vec()
}

impl Filesystem for MortarFs {
    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut inos = self.inner.inos.write().unwrap();
        if let Some((_, n)) = inos.get_mut(&ino.0) {
            *n = n.saturating_sub(nlookup);
            if *n == 0 {
                if let Some(st) = &self.inner.state {
                    st.forget(ino.0);
                }
                if let Some((g, _)) = inos.remove(&ino.0) {
                    self.inner.opened_at.lock().unwrap().remove(&g);
                    self.inner.dir_attrs.lock().unwrap().remove(&g);
                }
                self.inner.vol.stats.inodes.fetch_sub(1, Relaxed);
            }
        }
    }

    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for cap in [
            InitFlags::FUSE_POSIX_LOCKS,
            InitFlags::FUSE_FLOCK_LOCKS,
            // Every listing is a readdirplus (not only the kernel's guess of when one pays):
            // the bricks read each entry's attributes for a listing anyway, and a `find` or
            // a plain listing followed by stats then costs no lookup per file.
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_ATOMIC_O_TRUNC,
        ] {
            if config.add_capabilities(cap).is_err() {
                tracing::debug!("kernel lacks {cap:?}");
            }
        }
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        let vol = self.inner.vol.clone();
        let _ = self.rt.block_on(async move {
            tokio::time::timeout(Duration::from_secs(5), vol.shutdown()).await
        });
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = bytes(name);
        // Answered here when the cache knows (no hop to the runtime and back).
        if let Ok(p) = self.inner.gfid(parent)
            && let Some(r) = self.inner.vol.cached_lookup(p, &name)
        {
            return self.inner.entry(reply, r);
        }
        on_inode!(self, parent, reply, |inner, p| {
            let r = inner.vol.lookup(p, &name).await;
            inner.entry(reply, r);
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Ok(g) = self.inner.gfid(ino)
            && let Some(a) = self.inner.vol.cached_attr(g)
        {
            return match self.inner.attr(&a) {
                Ok(fa) => reply.attr(&self.inner.t.attr, &fa),
                Err(e) => reply.error(e),
            };
        }
        on_inode!(
            self,
            ino,
            reply,
            |inner, g| match inner.vol.getattr(g).await {
                Ok(a) => match inner.attr(&a) {
                    Ok(fa) => reply.attr(&inner.t.attr, &fa),
                    Err(e) => reply.error(e),
                },
                Err(Error::Os(libc::ENOENT)) if inner.removed_dir(g).is_some() => {
                    reply.attr(&inner.t.attr, &inner.removed_dir(g).unwrap())
                }
                Err(e) => reply.error(errno(e)),
            }
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let t = |t: TimeOrNow| match t {
            TimeOrNow::Now => ns_of(SystemTime::now()),
            TimeOrNow::SpecificTime(s) => ns_of(s),
        };
        let (atime_ns, mtime_ns) = (atime.map(t), mtime.map(t));
        on_inode!(self, ino, reply, |inner, g| {
            let s = pb::Setattr {
                gfid: g.to_vec(),
                mode: mode.map(|m| m & 0o7777),
                uid,
                gid,
                size,
                atime_ns,
                mtime_ns,
            };
            match inner.vol.setattr(s).await {
                Ok(a) => match inner.attr(&a) {
                    Ok(fa) => reply.attr(&inner.t.attr, &fa),
                    Err(e) => reply.error(e),
                },
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.readlink(g).await {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let k = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => pb::Kind::File,
            libc::S_IFIFO => pb::Kind::Fifo,
            libc::S_IFSOCK => pb::Kind::Socket,
            libc::S_IFCHR => pb::Kind::Char,
            libc::S_IFBLK => pb::Kind::Block,
            _ => return reply.error(Errno::EINVAL),
        };
        let (uid, gid, name) = (req.uid(), req.gid(), bytes(name));
        let again = resent(req);
        on_inode!(self, parent, reply, |inner, p| {
            let r = inner
                .vol
                .create(p, &name, k, mode & 0o7777, uid, gid, rdev as u64, b"")
                .await;
            inner.created(again, p, &name, reply, r).await;
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let (uid, gid, name) = (req.uid(), req.gid(), bytes(name));
        let again = resent(req);
        on_inode!(self, parent, reply, |inner, p| {
            let r = inner
                .vol
                .create(p, &name, pb::Kind::Dir, mode & 0o7777, uid, gid, 0, b"")
                .await;
            inner.created(again, p, &name, reply, r).await;
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(resent(req), parent, name, false, reply);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.remove(resent(req), parent, name, true, reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let (uid, gid, name, target) = (
            req.uid(),
            req.gid(),
            bytes(link_name),
            bytes(target.as_os_str()),
        );
        let again = resent(req);
        on_inode!(self, parent, reply, |inner, p| {
            let r = inner
                .vol
                .create(p, &name, pb::Kind::Symlink, 0o777, uid, gid, 0, &target)
                .await;
            inner.created(again, p, &name, reply, r).await;
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (p, np) = match (self.inner.gfid(parent), self.inner.gfid(newparent)) {
            (Ok(p), Ok(np)) => (p, np),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let (name, newname) = (bytes(name), bytes(newname));
        let inner = self.inner.clone();
        let again = resent(req);
        self.rt.spawn(async move {
            let r = inner.vol.rename(p, &name, np, &newname, flags.bits()).await;
            match r {
                Ok(()) => reply.ok(),
                // Gone from its old name and there under the new one: done before.
                _ if done_before(again, &r, libc::ENOENT)
                    && inner.vol.lookup(np, &newname).await.is_ok() =>
                {
                    reply.ok()
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let (g, np) = match (self.inner.gfid(ino), self.inner.gfid(newparent)) {
            (Ok(g), Ok(np)) => (g, np),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let newname = bytes(newname);
        let inner = self.inner.clone();
        self.rt.spawn(async move {
            let r = inner.vol.link(g, np, &newname).await;
            inner.entry(reply, r);
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.0 & libc::O_TRUNC == 0
            && let Ok(g) = self.inner.gfid(ino)
            && let Some(a) = self.inner.vol.cached_open(g)
        {
            return self.inner.opened(ino, g, flags, Ok(a), true, reply);
        }
        on_inode!(self, ino, reply, |inner, g| {
            // Close-to-open: learn which copies are newest before reading (a lease says
            // nothing changed since it was granted).
            let (opened, leased) = match inner.vol.open_leased(g).await {
                Ok((a, leased)) => (Ok(a), leased),
                Err(e) => (Err(e), false),
            };
            let opened = match opened {
                // FUSE_ATOMIC_O_TRUNC: the kernel sends O_TRUNC here instead of a setattr, so
                // the truncation (size 0, mtime and ctime now, replicated like any
                // truncate) is ours to do; the kernel drops its cached pages itself.
                Ok(a) if flags.0 & libc::O_TRUNC != 0 && a.kind() == pb::Kind::File => {
                    let s = pb::Setattr {
                        gfid: g.to_vec(),
                        size: Some(0),
                        ..Default::default()
                    };
                    inner.vol.setattr(s).await
                }
                other => other,
            };
            inner.opened(ino, g, flags, opened, leased, reply);
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Ok(g) = self.inner.gfid(ino)
            && let Some(d) = self.inner.vol.cached_read(g, offset, size)
        {
            return reply.data(&d);
        }
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.read(g, offset, size).await {
                Ok(d) => reply.data(&d),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // A predecessor's handle: the file's flags come with each write.
        let append = matches!(
            self.inner.handles.lock().unwrap().get(&fh.0),
            Some(Handle::File { append: true, .. })
        ) || (self.inner.inherited(fh) && flags.0 & libc::O_APPEND != 0);
        let data = data.to_vec();
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.write(g, offset, data, append).await {
                Ok(n) => reply.written(n as u32),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close() drops the POSIX locks the closing process holds on the file; with none,
        // there is nothing to wait for.
        if let Ok(g) = self.inner.gfid(ino)
            && !self
                .inner
                .lock_owners
                .lock()
                .unwrap()
                .contains(&(g, lock_owner.0))
        {
            return reply.ok();
        }
        on_inode!(self, ino, reply, |inner, g| {
            inner.unlock_owner(g, lock_owner.0).await;
            reply.ok();
        });
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let leased = match self.inner.handles.lock().unwrap().remove(&fh.0) {
            Some(Handle::File { leased, .. }) => Some(leased),
            _ => None,
        };
        if let (Some(leased), Ok(g)) = (leased, self.inner.gfid(ino)) {
            // The bricks may now drop the data of a file unlinked while open.
            let _rt = self.rt.enter();
            self.inner.vol.release_leased(g, leased);
        }
        match (self.inner.gfid(ino), lock_owner) {
            (Ok(g), Some(owner)) => {
                let inner = self.inner.clone();
                self.rt.spawn(async move {
                    inner.unlock_owner(g, owner.0).await;
                    reply.ok();
                });
            }
            _ => reply.ok(),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, datasync, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        on_inode!(self, ino, reply, |inner, g| {
            let r = async {
                inner.vol.refresh(g).await?;
                inner.vol.readdir(g).await
            }
            .await;
            match r {
                Ok(entries) => {
                    let fh = inner.new_fh(Handle::Dir {
                        entries: Arc::new(entries),
                    });
                    reply.opened(FileHandle(fh), FopenFlags::empty());
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        match self.dir_entries(fh) {
            Some(entries) => fill_dir(&self.inner, ino, &entries, offset, reply),
            None if self.inner.inherited(fh) => on_inode!(self, ino, reply, |inner, g| {
                match inner.reopen_dir(g, fh).await {
                    Ok(entries) => fill_dir(&inner, ino, &entries, offset, reply),
                    Err(e) => reply.error(errno(e)),
                }
            }),
            None => reply.error(Errno::EBADF),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        match self.dir_entries(fh) {
            Some(entries) => fill_dir_plus(&self.inner, ino, &entries, offset, reply),
            None if self.inner.inherited(fh) => on_inode!(self, ino, reply, |inner, g| {
                match inner.reopen_dir(g, fh).await {
                    Ok(entries) => fill_dir_plus(&inner, ino, &entries, offset, reply),
                    Err(e) => reply.error(errno(e)),
                }
            }),
            None => reply.error(Errno::EBADF),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.inner.handles.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.sync(ino, datasync, reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        // Per inode: inside a PVC's directory, df shows the PVC's quota.
        on_inode!(
            self,
            ino,
            reply,
            |inner, g| match inner.vol.statfs(g).await {
                Ok(s) => reply.statfs(
                    s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize
                ),
                Err(e) => reply.error(errno(e)),
            }
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if !name.as_bytes().starts_with(b"user.") {
            return reply.error(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let (name, value) = (bytes(name), value.to_vec());
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.setxattr(g, &name, &value, flags).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        // Only user.* lives on the bricks. Answering the others here also spares the round
        // trip the kernel makes for security.capability before every write.
        if !name.as_bytes().starts_with(b"user.") {
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        let name = bytes(name);
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.getxattr(g, &name).await {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.listxattr(g).await {
                Ok(names) => {
                    let mut buf = Vec::new();
                    for n in names {
                        buf.extend_from_slice(&n);
                        buf.push(0);
                    }
                    xattr_reply(reply, size, &buf)
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if !name.as_bytes().starts_with(b"user.") {
            return reply.error(Errno::from_i32(libc::ENODATA));
        }
        let name = bytes(name);
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.removexattr(g, &name).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    /// No ioctls: ENOTTY, as a local file system answers one it does not know (every
    /// `open()` of Python asks whether the file is a terminal).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions); existence here.
        match self.inner.gfid(ino) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (uid, gid, name) = (req.uid(), req.gid(), bytes(name));
        // The name came into being since the kernel looked (another client, or this very
        // request before its server died): without O_EXCL, or resent, that file is opened.
        let open_existing = flags & libc::O_EXCL == 0 || resent(req);
        on_inode!(self, parent, reply, |inner, p| {
            let r = match inner
                .vol
                .create_open_leased(p, &name, mode & 0o7777, uid, gid)
                .await
            {
                Err(Error::Os(libc::EEXIST)) if open_existing => {
                    match inner.vol.lookup(p, &name).await {
                        Ok(a) if a.kind() == pb::Kind::File => {
                            let g = g_of(&a);
                            inner.vol.open_leased(g).await
                        }
                        Ok(a) if a.kind() == pb::Kind::Dir => Err(Error::Os(libc::EISDIR)),
                        Ok(_) => Err(Error::Os(libc::EEXIST)),
                        Err(e) => Err(e),
                    }
                }
                r => r,
            };
            match r {
                Ok((a, leased)) => {
                    let fh = inner.new_fh(Handle::File {
                        append: flags & libc::O_APPEND != 0,
                        leased,
                    });
                    let attr = match inner.referenced(&a) {
                        Ok(fa) => fa,
                        Err(e) => {
                            inner.vol.release_leased(g_of(&a), leased);
                            return reply.error(e);
                        }
                    };
                    reply.created(
                        &inner.t.entry,
                        &attr,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    );
                }
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn getlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        reply: ReplyLock,
    ) {
        on_inode!(self, ino, reply, |inner, g| {
            match inner
                .vol
                .lk(g, lock_owner.0, pid, typ, start, end, false, true)
                .await
            {
                Ok(r) => reply.locked(r.start, r.end, r.typ, r.pid),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn setlk(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        lock_owner: LockOwner,
        start: u64,
        end: u64,
        typ: i32,
        pid: u32,
        sleep: bool,
        reply: ReplyEmpty,
    ) {
        on_inode!(self, ino, reply, |inner, g| {
            if typ != libc::F_UNLCK as i32 {
                inner.lock_taken(g, lock_owner.0);
            }
            match inner
                .vol
                .lk(g, lock_owner.0, pid, typ, start, end, sleep, false)
                .await
            {
                Ok(_) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.fallocate(g, mode, offset, length).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }
}

impl MortarFs {
    fn remove(&self, again: bool, parent: INodeNo, name: &OsStr, dir: bool, reply: ReplyEmpty) {
        let name = bytes(name);
        on_inode!(self, parent, reply, |inner, p| {
            let r = inner.vol.remove(p, &name, dir).await;
            match r {
                Ok(()) => reply.ok(),
                _ if done_before(again, &r, libc::ENOENT) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn sync(&self, ino: INodeNo, datasync: bool, reply: ReplyEmpty) {
        on_inode!(self, ino, reply, |inner, g| {
            match inner.vol.fsync(g, datasync).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn dir_entries(&self, fh: FileHandle) -> Option<Arc<Vec<pb::DirEntry>>> {
        match self.inner.handles.lock().unwrap().get(&fh.0) {
            Some(Handle::Dir { entries }) => Some(entries.clone()),
            _ => None,
        }
    }
}

/// Answers a listing from a directory handle's entries, from `offset` on.
fn fill_dir(
    inner: &Inner,
    ino: INodeNo,
    entries: &[pb::DirEntry],
    offset: u64,
    mut reply: ReplyDirectory,
) {
    let mut i = offset as usize;
    while i < entries.len() + 2 {
        let full = match i {
            0 => reply.add(ino, 1, FileType::Directory, "."),
            1 => reply.add(ino, 2, FileType::Directory, ".."),
            _ => {
                let e = &entries[i - 2];
                // An entry without valid attributes cannot be shown: skipped, logged.
                let Some(Ok(attr)) = e.attr.as_ref().map(|a| inner.attr(a)) else {
                    i += 1;
                    continue;
                };
                reply.add(
                    attr.ino,
                    i as u64 + 1,
                    attr.kind,
                    OsStr::from_bytes(&e.name),
                )
            }
        };
        if full {
            break;
        }
        i += 1;
    }
    reply.ok();
}

/// [`fill_dir`] with each entry's attributes (each one a kernel reference).
fn fill_dir_plus(
    inner: &Inner,
    ino: INodeNo,
    entries: &[pb::DirEntry],
    offset: u64,
    mut reply: ReplyDirectoryPlus,
) {
    let ttl = inner.t.entry;
    let dot = FileAttr {
        ino,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLKSIZE,
        flags: 0,
    };
    let mut i = offset as usize;
    while i < entries.len() + 2 {
        let full = match i {
            0 => reply.add(ino, 1, ".", &Duration::ZERO, &dot, Generation(0)),
            1 => reply.add(ino, 2, "..", &Duration::ZERO, &dot, Generation(0)),
            _ => {
                let e = &entries[i - 2];
                let Some(Ok(attr)) = e.attr.as_ref().map(|a| inner.attr(a)) else {
                    i += 1;
                    continue;
                };
                let full = reply.add(
                    attr.ino,
                    i as u64 + 1,
                    OsStr::from_bytes(&e.name),
                    &ttl,
                    &attr,
                    Generation(0),
                );
                // Only an entry that made it into the reply is a reference (its
                // attributes were checked just above).
                if !full {
                    let _ = inner.referenced(e.attr.as_ref().unwrap());
                }
                full
            }
        };
        if full {
            break;
        }
        i += 1;
    }
    reply.ok();
}

fn xattr_reply(reply: ReplyXattr, size: u32, v: &[u8]) {
    if size == 0 {
        reply.size(v.len() as u32)
    } else if v.len() > size as usize {
        reply.error(Errno::from_i32(libc::ERANGE))
    } else {
        reply.data(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_attributes_are_refused_not_rewritten() {
        let file = Gfid::random();
        let ok = |gfid: Vec<u8>, kind: i32| pb::Attr {
            gfid,
            kind,
            mode: 0o644,
            ..Default::default()
        };
        let mut one = [0u8; 16];
        one[7] = 1; // first 64 bits == 1: the root's inode number
        let cases: Vec<(&str, pb::Attr, Result<(u64, FileType), &str>)> = vec![
            (
                "file",
                ok(file.to_vec(), pb::Kind::File as i32),
                Ok((file.ino(), FileType::RegularFile)),
            ),
            (
                "root",
                ok(Gfid::ROOT.to_vec(), pb::Kind::Dir as i32),
                Ok((1, FileType::Directory)),
            ),
            ("empty gfid", ok(vec![], pb::Kind::File as i32), Err("gfid")),
            (
                "short gfid",
                ok(vec![1; 15], pb::Kind::File as i32),
                Err("gfid"),
            ),
            (
                "unknown kind",
                ok(file.to_vec(), pb::Kind::Unknown as i32),
                Err("kind"),
            ),
            ("kind out of range", ok(file.to_vec(), 99), Err("kind")),
            (
                "ino 1 for another gfid",
                ok(one.to_vec(), pb::Kind::File as i32),
                Err("inode number 1 for a gfid other than the root's"),
            ),
            ("missing attributes", pb::Attr::default(), Err("gfid")),
        ];
        for (what, a, want) in cases {
            let got = file_attr(&a).map(|(_, fa)| (fa.ino.0, fa.kind));
            assert_eq!(got, want, "{what}");
        }
    }

    /// Found by fuzz/ (fuse_attr): a gfid whose first 64 bits are 0 became inode number 0,
    /// which the kernel reads as a negative lookup. fuzz/corpus/fuse_attr/ino-zero.
    #[test]
    fn a_gfid_with_inode_number_zero_is_refused() {
        let mut g = [0u8; 16];
        g[14] = 0xf7;
        g[15] = 0x01;
        let a = pb::Attr {
            gfid: g.to_vec(),
            kind: pb::Kind::Dir as i32,
            mode: 0o755,
            nlink: 2,
            ..Default::default()
        };
        assert_eq!(file_attr(&a).map(|(_, fa)| fa.ino.0), Err("inode number 0"));
        let zero = pb::Attr {
            gfid: vec![0; 16],
            ..a
        };
        assert_eq!(
            file_attr(&zero).map(|(_, fa)| fa.ino.0),
            Err("inode number 0")
        );
    }
}
