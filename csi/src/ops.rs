//! The volume operations the controller needs, behind a trait.
//!
//! The controller never mounts anything: it works on the Mortar volume's root directory
//! through [`VolumeOps`]. [`LocalDirOps`] implements it over a plain directory (a mounted
//! volume, or a scratch directory in tests); an implementation over the Mortar client
//! library (talking to the bricks directly) plugs in through [`VolumeResolver`].
//!
//! Every name passed in is a single path component at the volume root, already checked by
//! the caller ([`crate::volume_id::is_pvc_dir`] or an archive/scratch name it made).

use std::collections::HashSet;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use crate::volume_id::{ClusterRef, VolumeLocation, is_volume_name};

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{0} does not exist")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The volume cannot be reached (bricks down, no quorum); worth retrying.
    #[error("{0}")]
    Unavailable(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl OpsError {
    fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::ENOTCONN) | Some(libc::EHOSTUNREACH) | Some(libc::ECONNREFUSED) => {
                OpsError::Unavailable(format!("{}: {source}", context.into()))
            }
            _ => OpsError::Io {
                context: context.into(),
                source,
            },
        }
    }
}

pub type OpsResult<T> = Result<T, OpsError>;

/// What happens to a PVC directory on DeleteVolume. Recorded with the directory at
/// creation, because DeleteVolume does not receive the StorageClass parameters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Reclaim {
    #[default]
    Delete,
    /// Rename to `archived-<dir>-<unix seconds>` and keep the data.
    Archive,
}

/// The controller's record kept with each PVC directory.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirMeta {
    /// The size limit (quota) in bytes; the PVC's capacity.
    pub limit_bytes: u64,
    pub reclaim: Reclaim,
    /// Volume id this one was cloned from, so a repeated CreateVolume can tell whether it
    /// asks for the same content.
    pub source: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirUsage {
    pub bytes: u64,
    pub inodes: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
}

/// Operations on one Mortar volume, rooted at the volume's top directory.
#[async_trait]
pub trait VolumeOps: Send + Sync {
    /// Makes an empty directory with exactly `mode` (no umask); `AlreadyExists` if the
    /// name is taken.
    async fn mkdir(&self, name: &str, mode: u32) -> OpsResult<()>;
    /// Whether a top-level directory exists.
    async fn exists(&self, name: &str) -> OpsResult<bool>;
    /// The record kept with a directory: `NotFound` without the directory, `None` for a
    /// directory without a record (made by hand, or a create interrupted half way).
    async fn get_meta(&self, name: &str) -> OpsResult<Option<DirMeta>>;
    /// Stores the record; setting `limit_bytes` is what enforces the PVC's size.
    async fn set_meta(&self, name: &str, meta: &DirMeta) -> OpsResult<()>;
    /// Renames a top-level directory; `AlreadyExists` if `to` is taken.
    async fn rename(&self, from: &str, to: &str) -> OpsResult<()>;
    /// Removes a directory tree; succeeds if it is already gone.
    async fn remove_all(&self, name: &str) -> OpsResult<()>;
    /// Names of all top-level entries that are directories.
    async fn list(&self) -> OpsResult<Vec<String>>;
    /// Bytes and inodes used under a directory.
    async fn usage(&self, name: &str) -> OpsResult<DirUsage>;
    /// Size and free space of the whole volume.
    async fn statfs(&self) -> OpsResult<FsStats>;
    /// Copies the tree under `from` into the existing empty directory `to`, keeping
    /// modes, owners and symlinks.
    async fn copy_tree(&self, from: &str, to: &str) -> OpsResult<()>;
}

/// Finds the volume a [`VolumeLocation`] names.
#[async_trait]
pub trait VolumeResolver: Send + Sync {
    /// `NotFound` if the cluster or volume does not exist, `Unavailable` if it cannot be
    /// reached now.
    async fn open(&self, location: &VolumeLocation) -> OpsResult<Arc<dyn VolumeOps>>;
    /// As `open`, with the TLS identity a request brought (the StorageClass's provisioner
    /// or controller-expand secret): one controller serves clusters of different CAs.
    /// Resolvers that reach no brick have no use for it.
    async fn open_with(
        &self,
        location: &VolumeLocation,
        tls: Option<&crate::tls_secret::TlsSecret>,
    ) -> OpsResult<Arc<dyn VolumeOps>> {
        let _ = tls;
        self.open(location).await
    }
    /// Every volume this controller can enumerate, for ListVolumes.
    async fn known(&self) -> OpsResult<Vec<VolumeLocation>>;
    /// False while the resolver cannot do its job at all (Probe: a missing dependency).
    fn ready(&self) -> bool {
        true
    }
}

/// Stands in until a real backend is configured: the controller answers Probe with
/// FailedPrecondition (a missing dependency) and volume calls with Unavailable instead of
/// pretending.
pub struct Unconfigured;

#[async_trait]
impl VolumeResolver for Unconfigured {
    async fn open(&self, _: &VolumeLocation) -> OpsResult<Arc<dyn VolumeOps>> {
        Err(OpsError::Unavailable("no volume backend configured".into()))
    }
    async fn known(&self) -> OpsResult<Vec<VolumeLocation>> {
        Ok(Vec::new())
    }
    fn ready(&self) -> bool {
        false
    }
}

/// Volumes as local directories: `ROOT/NAMESPACE/CLUSTER/VOLUME` for named clusters and
/// `ROOT/@servers/HOST,HOST/VOLUME` for explicit volfile servers. Used by tests and for
/// single-host trials where a Mortar volume is mounted at such a path.
pub struct LocalResolver {
    root: PathBuf,
}

impl LocalResolver {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalResolver { root: root.into() }
    }

    pub fn path_of(&self, location: &VolumeLocation) -> PathBuf {
        match &location.cluster {
            ClusterRef::Named { namespace, name } => self.root.join(namespace).join(name),
            ClusterRef::Servers(servers) => self.root.join("@servers").join(servers.join(",")),
        }
        .join(&location.volume)
    }
}

fn subdirs(path: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

#[async_trait]
impl VolumeResolver for LocalResolver {
    async fn open(&self, location: &VolumeLocation) -> OpsResult<Arc<dyn VolumeOps>> {
        let path = self.path_of(location);
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_dir() => Ok(Arc::new(LocalDirOps::new(path))),
            Ok(_) => Err(OpsError::NotFound(format!("volume {location}"))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(OpsError::NotFound(format!("volume {location}")))
            }
            Err(e) => Err(OpsError::io(format!("volume {location}"), e)),
        }
    }

    async fn known(&self) -> OpsResult<Vec<VolumeLocation>> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for ns in subdirs(&root) {
                if ns == "@servers" {
                    for servers in subdirs(&root.join(&ns)) {
                        for volume in subdirs(&root.join(&ns).join(&servers)) {
                            let list = servers.split(',').map(str::to_string).collect();
                            out.push(VolumeLocation {
                                cluster: ClusterRef::Servers(list),
                                volume,
                            });
                        }
                    }
                    continue;
                }
                for name in subdirs(&root.join(&ns)) {
                    for volume in subdirs(&root.join(&ns).join(&name)) {
                        if is_volume_name(&volume) {
                            let cluster = ClusterRef::Named {
                                namespace: ns.clone(),
                                name: name.clone(),
                            };
                            out.push(VolumeLocation { cluster, volume });
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| OpsError::Unavailable(format!("listing volumes: {e}")))?
    }
}

/// Names of the extended attributes that hold [`DirMeta`] on a directory. The node
/// service reads [`LIMIT_XATTR`] through the mount to report a PVC's size when the
/// file system's statfs reports the whole volume.
pub const LIMIT_XATTR: &str = "user.mortar.csi.limit";
pub(crate) const RECLAIM_XATTR: &str = "user.mortar.csi.reclaim";
pub(crate) const SOURCE_XATTR: &str = "user.mortar.csi.source";

/// [`VolumeOps`] over a directory of the local file system. Size limits are recorded but
/// not enforced: enforcement belongs to the Mortar client (EDQUOT on writes past the
/// limit), which a plain directory does not have.
pub struct LocalDirOps {
    root: PathBuf,
}

impl LocalDirOps {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDirOps { root: root.into() }
    }

    fn path(&self, name: &str) -> PathBuf {
        debug_assert!(!name.contains('/') && name != ".." && name != ".");
        self.root.join(name)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> OpsResult<T> + Send + 'static,
) -> OpsResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpsError::Unavailable(format!("worker failed: {e}")))?
}

fn not_found_or(name: &str, context: &str, e: std::io::Error) -> OpsError {
    if e.kind() == std::io::ErrorKind::NotFound {
        OpsError::NotFound(name.to_string())
    } else {
        OpsError::io(format!("{context} {name}"), e)
    }
}

pub fn get_xattr(path: &Path, attr: &str) -> std::io::Result<Option<String>> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let a = CString::new(attr)?;
    let mut buf = vec![0u8; 1024];
    // SAFETY: valid NUL-terminated strings and a buffer of the stated length.
    let n = unsafe { libc::getxattr(p.as_ptr(), a.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODATA) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

fn set_xattr(path: &Path, attr: &str, value: Option<&str>) -> std::io::Result<()> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let a = CString::new(attr)?;
    // SAFETY: valid NUL-terminated strings and a buffer of the stated length.
    let rc = unsafe {
        match value {
            Some(v) => libc::setxattr(p.as_ptr(), a.as_ptr(), v.as_ptr().cast(), v.len(), 0),
            None => libc::removexattr(p.as_ptr(), a.as_ptr()),
        }
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if value.is_none() && e.raw_os_error() == Some(libc::ENODATA) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

pub fn statvfs(path: &Path) -> std::io::Result<FsStats> {
    let p = CString::new(path.as_os_str().as_bytes())?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and a properly sized out-struct.
    if unsafe { libc::statvfs(p.as_ptr(), &mut s) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = if s.f_frsize > 0 {
        s.f_frsize
    } else {
        s.f_bsize
    } as u64;
    Ok(FsStats {
        total_bytes: s.f_blocks as u64 * frsize,
        free_bytes: s.f_bavail as u64 * frsize,
        total_inodes: s.f_files as u64,
        free_inodes: s.f_favail as u64,
    })
}

/// Walks a tree without following symlinks, counting apparent file sizes (what a quota on
/// the Mortar volume counts) and inodes, hard links once.
pub fn tree_usage(root: &Path) -> std::io::Result<DirUsage> {
    let mut usage = DirUsage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                // Raced with a delete: the entry no longer counts.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.nlink() > 1 && !meta.is_dir() && !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            usage.inodes += 1;
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                usage.bytes += meta.len();
            }
        }
    }
    Ok(usage)
}

fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src)?;
        let ft = meta.file_type();
        if ft.is_dir() {
            std::fs::create_dir(&dst)?;
            copy_tree(&src, &dst)?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst)?;
        } else {
            // Sockets, fifos and devices have no content to clone.
            continue;
        }
        std::os::unix::fs::lchown(&dst, Some(meta.uid()), Some(meta.gid()))?;
        if !ft.is_symlink() {
            // After chown, which may clear set-id bits.
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        }
    }
    Ok(())
}

#[async_trait]
impl VolumeOps for LocalDirOps {
    async fn mkdir(&self, name: &str, mode: u32) -> OpsResult<()> {
        let (path, name) = (self.path(name), name.to_string());
        blocking(move || match std::fs::create_dir(&path) {
            Ok(()) => std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                .map_err(|e| OpsError::io(format!("chmod {name}"), e)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(OpsError::AlreadyExists(name))
            }
            Err(e) => Err(OpsError::io(format!("mkdir {name}"), e)),
        })
        .await
    }

    async fn exists(&self, name: &str) -> OpsResult<bool> {
        match tokio::fs::metadata(self.path(name)).await {
            Ok(m) => Ok(m.is_dir()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(OpsError::io(format!("stat {name}"), e)),
        }
    }

    async fn get_meta(&self, name: &str) -> OpsResult<Option<DirMeta>> {
        let (path, name) = (self.path(name), name.to_string());
        blocking(move || {
            std::fs::metadata(&path).map_err(|e| not_found_or(&name, "stat", e))?;
            let read = |attr| {
                get_xattr(&path, attr).map_err(|e| OpsError::io(format!("getxattr {name}"), e))
            };
            let Some(limit) = read(LIMIT_XATTR)? else {
                return Ok(None);
            };
            let limit_bytes = limit.parse().map_err(|_| {
                OpsError::io(
                    format!("{name}: bad size record {limit:?}"),
                    std::io::ErrorKind::InvalidData.into(),
                )
            })?;
            let reclaim = match read(RECLAIM_XATTR)?.as_deref() {
                Some("archive") => Reclaim::Archive,
                _ => Reclaim::Delete,
            };
            Ok(Some(DirMeta {
                limit_bytes,
                reclaim,
                source: read(SOURCE_XATTR)?,
            }))
        })
        .await
    }

    async fn set_meta(&self, name: &str, meta: &DirMeta) -> OpsResult<()> {
        let (path, name, meta) = (self.path(name), name.to_string(), meta.clone());
        blocking(move || {
            let write = |attr, value: Option<&str>| {
                set_xattr(&path, attr, value).map_err(|e| not_found_or(&name, "setxattr", e))
            };
            // The size goes last: its presence marks the record complete (see get_meta).
            let reclaim = match meta.reclaim {
                Reclaim::Delete => "delete",
                Reclaim::Archive => "archive",
            };
            write(RECLAIM_XATTR, Some(reclaim))?;
            write(SOURCE_XATTR, meta.source.as_deref())?;
            write(LIMIT_XATTR, Some(&meta.limit_bytes.to_string()))
        })
        .await
    }

    async fn rename(&self, from: &str, to: &str) -> OpsResult<()> {
        let (src, dst, from, to) = (
            self.path(from),
            self.path(to),
            from.to_string(),
            to.to_string(),
        );
        blocking(move || {
            let (s, d) = (
                CString::new(src.as_os_str().as_bytes()).unwrap(),
                CString::new(dst.as_os_str().as_bytes()).unwrap(),
            );
            // renameat2(RENAME_NOREPLACE): a plain rename would silently replace an empty
            // directory that happens to hold the target name.
            let rc = unsafe {
                libc::renameat2(
                    libc::AT_FDCWD,
                    s.as_ptr(),
                    libc::AT_FDCWD,
                    d.as_ptr(),
                    libc::RENAME_NOREPLACE,
                )
            };
            if rc == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Err(OpsError::AlreadyExists(to)),
                Some(libc::ENOENT) => Err(OpsError::NotFound(from)),
                _ => Err(OpsError::io(format!("rename {from} to {to}"), e)),
            }
        })
        .await
    }

    async fn remove_all(&self, name: &str) -> OpsResult<()> {
        let (path, name) = (self.path(name), name.to_string());
        blocking(move || match std::fs::remove_dir_all(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(OpsError::io(format!("remove {name}"), e)),
        })
        .await
    }

    async fn list(&self) -> OpsResult<Vec<String>> {
        let root = self.root.clone();
        blocking(move || {
            std::fs::read_dir(&root).map_err(|e| OpsError::io("list volume root", e))?;
            Ok(subdirs(&root))
        })
        .await
    }

    async fn usage(&self, name: &str) -> OpsResult<DirUsage> {
        let (path, name) = (self.path(name), name.to_string());
        blocking(move || tree_usage(&path).map_err(|e| not_found_or(&name, "usage of", e))).await
    }

    async fn statfs(&self) -> OpsResult<FsStats> {
        let root = self.root.clone();
        blocking(move || statvfs(&root).map_err(|e| OpsError::io("statfs", e))).await
    }

    async fn copy_tree(&self, from: &str, to: &str) -> OpsResult<()> {
        let (src, dst, from_name) = (self.path(from), self.path(to), from.to_string());
        blocking(move || {
            std::fs::metadata(&src).map_err(|e| not_found_or(&from_name, "stat", e))?;
            copy_tree(&src, &dst).map_err(|e| OpsError::io(format!("copy {from_name}"), e))
        })
        .await
    }
}
