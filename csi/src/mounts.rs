//! The kernel mount table and the few mount operations the node service needs.
//!
//! The node service keeps no state of its own: which volumes are mounted where is read
//! back from `/proc/self/mountinfo` on every call. That is what lets a restarted (or
//! upgraded) plugin carry on with the mounts an earlier process made: the FUSE daemons
//! run detached from the plugin, and the mount table still lists their mounts and the
//! bind mounts made from them.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u32,
    pub parent: u32,
    /// `major:minor` of the file system: equal for a mount and every bind mount of it.
    pub dev: String,
    /// The directory of the file system that this mount shows (`/` for a whole mount,
    /// `/pvc-x` for a bind mount of a subdirectory).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`/`rw`, `nosuid`, ...).
    pub options: String,
    pub fstype: String,
    pub source: String,
}

impl MountEntry {
    pub fn read_only(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }

    /// Whether this mount shows `sub` (relative, may be empty) of the file system that
    /// `base` shows, i.e. is a bind mount of `base`'s directory `sub`.
    pub fn shows(&self, base: &MountEntry, sub: &str) -> bool {
        self.dev == base.dev && self.root == join_root(&base.root, sub)
    }

    /// Whether this mount shows `base`'s directory or anything below it.
    pub fn is_within(&self, base: &MountEntry) -> bool {
        self.dev == base.dev
            && (self.root == base.root
                || self
                    .root
                    .starts_with(&format!("{}/", base.root.trim_end_matches('/'))))
    }
}

fn join_root(root: &str, sub: &str) -> String {
    match (root.trim_end_matches('/'), sub.trim_matches('/')) {
        ("", "") => "/".to_string(),
        (r, "") => r.to_string(),
        (r, s) => format!("{r}/{s}"),
    }
}

/// Undoes mountinfo's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            // id parent major:minor root mount_point options [optional...] - fstype source super_options
            let (left, right) = line.split_once(" - ")?;
            let l: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if l.len() < 6 || r.len() < 2 {
                return None;
            }
            Some(MountEntry {
                id: l[0].parse().ok()?,
                parent: l[1].parse().ok()?,
                dev: l[2].to_string(),
                root: unescape(l[3]),
                mount_point: PathBuf::from(unescape(l[4])),
                options: l[5].to_string(),
                fstype: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

pub fn read_mountinfo() -> io::Result<Vec<MountEntry>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// The topmost mount at `path` (the last one listed, when mounts are stacked).
pub fn find<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

pub fn find_now(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(find(&read_mountinfo()?, path).cloned())
}

/// Absolute, symlink-free form of a path whose last component may be a dead mount
/// (`canonicalize` would fail on it): resolve the parent, keep the name.
pub fn absolute(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    Ok(std::fs::canonicalize(parent)?.join(name))
}

#[derive(Debug)]
pub enum Health {
    Healthy,
    Missing,
    /// "Transport endpoint is not connected": the FUSE daemon behind it is gone.
    Disconnected,
    /// stat did not return in time: the FUSE daemon is alive but not answering.
    Hung,
    Failed(io::Error),
}

impl Health {
    pub fn is_broken(&self) -> bool {
        matches!(self, Health::Disconnected | Health::Hung)
    }
}

pub fn is_disconnected(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
    )
}

/// Checks that whatever serves `path` answers, on a worker thread with a deadline (a call
/// into a hung FUSE daemon blocks until it answers). statfs rather than stat: the kernel
/// may answer stat from cached attributes long after the daemon died, while every statfs
/// goes to the daemon.
pub async fn probe(path: &Path, timeout: Duration) -> Health {
    let p = path.to_path_buf();
    let check = tokio::task::spawn_blocking(move || crate::ops::statvfs(&p));
    match tokio::time::timeout(timeout, check).await {
        Err(_) => Health::Hung,
        Ok(Err(e)) => Health::Failed(io::Error::other(e)),
        Ok(Ok(Ok(_))) => Health::Healthy,
        Ok(Ok(Err(e))) if e.kind() == io::ErrorKind::NotFound => Health::Missing,
        Ok(Ok(Err(e))) if is_disconnected(&e) => Health::Disconnected,
        Ok(Ok(Err(e))) => Health::Failed(e),
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Per-mount flags applicable to a bind mount.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindFlags {
    pub read_only: bool,
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
    pub noatime: bool,
}

impl BindFlags {
    /// Picks the flags a bind mount can carry out of a CO's mount flags; returns the
    /// ones it cannot (those describe the file system, not the bind).
    pub fn from_options<'a>(opts: impl IntoIterator<Item = &'a str>) -> (BindFlags, Vec<String>) {
        let mut f = BindFlags::default();
        let mut other = Vec::new();
        for o in opts
            .into_iter()
            .flat_map(|o| o.split(','))
            .map(str::trim)
            .filter(|o| !o.is_empty())
        {
            match o {
                "ro" => f.read_only = true,
                "rw" | "defaults" | "suid" | "dev" | "exec" | "relatime" | "atime" => {}
                "nosuid" => f.nosuid = true,
                "nodev" => f.nodev = true,
                "noexec" => f.noexec = true,
                "noatime" => f.noatime = true,
                other_opt => other.push(other_opt.to_string()),
            }
        }
        (f, other)
    }

    fn bits(&self) -> libc::c_ulong {
        let mut b = 0;
        if self.read_only {
            b |= libc::MS_RDONLY;
        }
        if self.nosuid {
            b |= libc::MS_NOSUID;
        }
        if self.nodev {
            b |= libc::MS_NODEV;
        }
        if self.noexec {
            b |= libc::MS_NOEXEC;
        }
        if self.noatime {
            b |= libc::MS_NOATIME;
        }
        b
    }
}

/// Bind-mounts `src` on `dst`, then applies `flags` (the kernel ignores them on the
/// bind itself, so they take a second, remount step). On failure nothing stays mounted.
pub fn bind(src: &Path, dst: &Path, flags: BindFlags) -> io::Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: valid NUL-terminated paths; null fstype/data are allowed for MS_BIND.
    check(unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    })?;
    let bits = flags.bits();
    if bits != 0 {
        // SAFETY: as above; MS_REMOUNT|MS_BIND changes only this mount's flags.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                d.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | bits,
                std::ptr::null(),
            )
        };
        if let Err(e) = check(rc) {
            let _ = unmount(dst, true);
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `path`; `lazy` detaches it even while busy or when its FUSE daemon is dead.
pub fn unmount(path: &Path, lazy: bool) -> io::Result<()> {
    let p = cstr(path)?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::umount2(p.as_ptr(), flags) })
}

/// Removes every mount stacked at `path`. A normal unmount is tried first so that a
/// busy mount is noticed in the logs; a lazy one finishes the job.
pub fn unmount_all(path: &Path) -> io::Result<usize> {
    let mut n = 0;
    while find_now(path)?.is_some() {
        if let Err(e) = unmount(path, false) {
            tracing::warn!(path = %path.display(), error = %e, "unmount failed, detaching lazily");
            unmount(path, true)?;
        }
        n += 1;
        if n > 64 {
            return Err(io::Error::other(format!(
                "{} keeps being mounted",
                path.display()
            )));
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:5 - proc proc rw
97 29 0:52 / /var/lib/mortar/volumes/ns_c_data rw,nosuid,nodev,relatime shared:60 - fuse.mortar host:/data rw,user_id=0,group_id=0
98 29 0:52 /pvc-a /var/lib/kubelet/plugins/x/globalmount rw,nosuid,nodev,relatime shared:60 - fuse.mortar host:/data rw
99 29 0:52 /pvc-a /var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-a/mount ro,nosuid,nodev,relatime shared:60 - fuse.mortar host:/data rw
100 29 0:53 /pvc-a /mnt/other rw - fuse.mortar other:/data rw
101 29 8:1 /srv/with\\040space /mnt/a\\040b rw,relatime - ext4 /dev/sda1 rw
";

    #[test]
    fn parses_and_relates_mounts() {
        let e = parse_mountinfo(SAMPLE);
        assert_eq!(e.len(), 6);
        let shared = find(&e, Path::new("/var/lib/mortar/volumes/ns_c_data")).unwrap();
        assert_eq!(shared.fstype, "fuse.mortar");
        let stage = find(&e, Path::new("/var/lib/kubelet/plugins/x/globalmount")).unwrap();
        let publish = find(
            &e,
            Path::new("/var/lib/kubelet/pods/p1/volumes/kubernetes.io~csi/pvc-a/mount"),
        )
        .unwrap();
        assert!(stage.shows(shared, "pvc-a"));
        assert!(!stage.shows(shared, "pvc-b"));
        assert!(publish.read_only() && !stage.read_only());
        assert!(stage.is_within(shared) && publish.is_within(shared));
        let other = find(&e, Path::new("/mnt/other")).unwrap();
        assert!(!other.is_within(shared));
        let spaced = find(&e, Path::new("/mnt/a b")).unwrap();
        assert_eq!(spaced.root, "/srv/with space");
        assert!(!find(&e, Path::new("/proc")).unwrap().is_within(shared));
    }

    #[test]
    fn roots_join_like_paths() {
        assert_eq!(join_root("/", ""), "/");
        assert_eq!(join_root("/", "pvc-a"), "/pvc-a");
        assert_eq!(join_root("/srv/vol", "pvc-a"), "/srv/vol/pvc-a");
        assert_eq!(join_root("/srv/vol/", ""), "/srv/vol");
    }

    #[test]
    fn bind_flags_split_from_fs_options() {
        let (f, rest) =
            BindFlags::from_options(["ro,noexec", "nosuid", "backup-volfile-servers=a:b", "rw"]);
        assert!(f.read_only && f.noexec && f.nosuid && !f.nodev);
        assert_eq!(rest, vec!["backup-volfile-servers=a:b".to_string()]);
    }
}
