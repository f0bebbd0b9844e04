//! [`VolumeOps`] over the Mortar client library: the controller talks to the bricks
//! directly (replicated, with quorum and failover), no FUSE mount.
//!
//! A cluster is reached through its volfile servers: the explicit `volfileServers` list,
//! or the operator's client Service `{cluster}.{namespace}.svc:24100` (the
//! `--volfile-server-template`). One connected [`Volume`] per Mortar volume is kept and
//! shared by all calls.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use mortar_common::error::Error;
use mortar_common::gfid::Gfid;
use mortar_replication::volume::{Options, Volume};

use crate::ops::{
    DirMeta, DirUsage, FsStats, OpsError, OpsResult, RECLAIM_XATTR, Reclaim, SOURCE_XATTR,
    VolumeOps, VolumeResolver,
};
use crate::quota;
use crate::tls_secret::TlsSecret;
use crate::volume_id::VolumeLocation;

// `mortar.proto` Kind values (Attr.kind).
const KIND_FILE: i32 = 1;
const KIND_DIR: i32 = 2;
const KIND_SYMLINK: i32 = 3;

/// Bytes per read/write when copying a file for a clone.
const COPY_CHUNK: u32 = 1 << 20;

fn unavailable(e: &Error) -> bool {
    matches!(
        e,
        Error::NoQuorum { .. }
            | Error::NoGoodCopy
            | Error::Busy
            | Error::Transport { .. }
            | Error::Volfile(_)
    )
}

/// Maps a client error: ENOENT → NotFound(`name`), EEXIST/ENOTEMPTY → AlreadyExists(`name`),
/// no quorum / unreachable → Unavailable, anything else → Io.
fn map_err(context: &str, name: &str, e: Error) -> OpsError {
    if unavailable(&e) {
        return OpsError::Unavailable(format!("{context} {name}: {e}"));
    }
    match e.errno() {
        libc::ENOENT => OpsError::NotFound(name.to_string()),
        libc::EEXIST | libc::ENOTEMPTY => OpsError::AlreadyExists(name.to_string()),
        n => OpsError::Io {
            context: format!("{context} {name}"),
            source: std::io::Error::from_raw_os_error(n),
        },
    }
}

fn gfid_of(bytes: &[u8]) -> OpsResult<Gfid> {
    Gfid::from_bytes(bytes).ok_or_else(|| OpsError::Io {
        context: "malformed gfid from brick".into(),
        source: std::io::ErrorKind::InvalidData.into(),
    })
}

/// One Mortar volume, rooted at its top directory.
pub struct MortarOps {
    vol: Arc<Volume>,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

impl MortarOps {
    pub fn new(vol: Arc<Volume>) -> Self {
        MortarOps { vol }
    }

    /// Gfid and kind of a top-level entry.
    async fn lookup_root(&self, name: &str) -> OpsResult<(Gfid, i32)> {
        let attr = self
            .vol
            .lookup(Gfid::ROOT, name.as_bytes())
            .await
            .map_err(|e| map_err("lookup", name, e))?;
        Ok((gfid_of(&attr.gfid)?, attr.kind))
    }

    async fn dir_gfid(&self, name: &str) -> OpsResult<Gfid> {
        let (g, kind) = self.lookup_root(name).await?;
        if kind != KIND_DIR {
            return Err(OpsError::Io {
                context: format!("{name} is not a directory"),
                source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
            });
        }
        Ok(g)
    }

    async fn get_text(&self, g: Gfid, attr: &str, name: &str) -> OpsResult<Option<String>> {
        match self.vol.getxattr(g, attr.as_bytes()).await {
            Ok(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
            Err(Error::Os(libc::ENODATA)) => Ok(None),
            Err(e) => Err(map_err("getxattr", name, e)),
        }
    }

    async fn set_text(
        &self,
        g: Gfid,
        attr: &str,
        value: Option<&str>,
        name: &str,
    ) -> OpsResult<()> {
        let r = match value {
            Some(v) => self.vol.setxattr(g, attr.as_bytes(), v.as_bytes(), 0).await,
            None => match self.vol.removexattr(g, attr.as_bytes()).await {
                Err(Error::Os(libc::ENODATA)) => Ok(()),
                other => other,
            },
        };
        r.map_err(|e| map_err("setxattr", name, e))
    }

    /// Removes everything below directory `dir` (depth first); entries that vanish
    /// meanwhile are fine.
    fn empty_dir<'a>(&'a self, dir: Gfid, path: &'a str) -> BoxFut<'a, OpsResult<()>> {
        Box::pin(async move {
            let entries = match self.vol.readdir(dir).await {
                Ok(e) => e,
                Err(Error::Os(libc::ENOENT)) => return Ok(()),
                Err(e) => return Err(map_err("readdir", path, e)),
            };
            for entry in entries {
                let Some(attr) = entry.attr else { continue };
                let name = String::from_utf8_lossy(&entry.name).into_owned();
                let child = format!("{path}/{name}");
                let is_dir = attr.kind == KIND_DIR;
                if is_dir {
                    self.empty_dir(gfid_of(&attr.gfid)?, &child).await?;
                }
                match self.vol.remove(dir, &entry.name, is_dir).await {
                    Ok(()) | Err(Error::Os(libc::ENOENT)) => {}
                    Err(e) => return Err(map_err("remove", &child, e)),
                }
            }
            Ok(())
        })
    }

    fn walk_usage<'a>(
        &'a self,
        dir: Gfid,
        path: &'a str,
        usage: &'a mut DirUsage,
        seen: &'a mut HashSet<Gfid>,
    ) -> BoxFut<'a, OpsResult<()>> {
        Box::pin(async move {
            let entries = match self.vol.readdir(dir).await {
                Ok(e) => e,
                // Raced with a delete: nothing left to count.
                Err(Error::Os(libc::ENOENT)) => return Ok(()),
                Err(e) => return Err(map_err("readdir", path, e)),
            };
            for entry in entries {
                let Some(attr) = entry.attr else { continue };
                let g = gfid_of(&attr.gfid)?;
                if attr.kind != KIND_DIR && attr.nlink > 1 && !seen.insert(g) {
                    continue;
                }
                usage.inodes += 1;
                if attr.kind == KIND_DIR {
                    let child = format!("{path}/{}", String::from_utf8_lossy(&entry.name));
                    self.walk_usage(g, &child, usage, seen).await?;
                } else if attr.kind == KIND_FILE {
                    usage.bytes += attr.size;
                }
            }
            Ok(())
        })
    }

    async fn copy_file(&self, src: Gfid, dst: Gfid, size: u64, path: &str) -> OpsResult<()> {
        let mut offset = 0u64;
        while offset < size {
            let data = self
                .vol
                .read(src, offset, COPY_CHUNK)
                .await
                .map_err(|e| map_err("read", path, e))?;
            if data.is_empty() {
                break;
            }
            let n = data.len() as u64;
            self.vol
                .write(dst, offset, data, false)
                .await
                .map_err(|e| map_err("write", path, e))?;
            offset += n;
        }
        Ok(())
    }

    fn copy_dir<'a>(&'a self, src: Gfid, dst: Gfid, path: &'a str) -> BoxFut<'a, OpsResult<()>> {
        Box::pin(async move {
            let entries = self
                .vol
                .readdir(src)
                .await
                .map_err(|e| map_err("readdir", path, e))?;
            for entry in entries {
                let Some(attr) = entry.attr else { continue };
                let g = gfid_of(&attr.gfid)?;
                let child = format!("{path}/{}", String::from_utf8_lossy(&entry.name));
                let target = match attr.kind {
                    KIND_DIR | KIND_FILE => Vec::new(),
                    KIND_SYMLINK => self
                        .vol
                        .readlink(g)
                        .await
                        .map_err(|e| map_err("readlink", &child, e))?,
                    // Sockets, fifos and devices have no content to clone.
                    _ => continue,
                };
                let kind = attr
                    .kind
                    .try_into()
                    .map_err(|_| map_err("kind of", &child, Error::Os(libc::EINVAL)))?;
                let made = self
                    .vol
                    .create(
                        dst,
                        &entry.name,
                        kind,
                        attr.mode & 0o7777,
                        attr.uid,
                        attr.gid,
                        0,
                        &target,
                    )
                    .await
                    .map_err(|e| map_err("create", &child, e))?;
                let made = gfid_of(&made.gfid)?;
                match attr.kind {
                    KIND_DIR => self.copy_dir(g, made, &child).await?,
                    KIND_FILE => self.copy_file(g, made, attr.size, &child).await?,
                    _ => {}
                }
            }
            Ok(())
        })
    }
}

#[async_trait]
impl VolumeOps for MortarOps {
    async fn mkdir(&self, name: &str, mode: u32) -> OpsResult<()> {
        let kind = KIND_DIR.try_into().expect("KIND_DIR is a Kind");
        self.vol
            .create(
                Gfid::ROOT,
                name.as_bytes(),
                kind,
                mode & 0o7777,
                0,
                0,
                0,
                b"",
            )
            .await
            .map(|_| ())
            .map_err(|e| map_err("mkdir", name, e))
    }

    async fn exists(&self, name: &str) -> OpsResult<bool> {
        match self.lookup_root(name).await {
            Ok((_, kind)) => Ok(kind == KIND_DIR),
            Err(OpsError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn get_meta(&self, name: &str) -> OpsResult<Option<DirMeta>> {
        let g = self.dir_gfid(name).await?;
        // The limit marks a complete record (it is set last, see set_meta).
        let Some(limit_bytes) = quota::limit(&self.vol, g)
            .await
            .map_err(|e| map_err("quota of", name, e))?
        else {
            return Ok(None);
        };
        let reclaim = match self.get_text(g, RECLAIM_XATTR, name).await?.as_deref() {
            Some("archive") => Reclaim::Archive,
            _ => Reclaim::Delete,
        };
        Ok(Some(DirMeta {
            limit_bytes,
            reclaim,
            source: self.get_text(g, SOURCE_XATTR, name).await?,
        }))
    }

    async fn set_meta(&self, name: &str, meta: &DirMeta) -> OpsResult<()> {
        let g = self.dir_gfid(name).await?;
        let reclaim = match meta.reclaim {
            Reclaim::Delete => "delete",
            Reclaim::Archive => "archive",
        };
        self.set_text(g, RECLAIM_XATTR, Some(reclaim), name).await?;
        self.set_text(g, SOURCE_XATTR, meta.source.as_deref(), name)
            .await?;
        quota::set_limit(&self.vol, g, meta.limit_bytes)
            .await
            .map_err(|e| map_err("set quota of", name, e))
    }

    async fn rename(&self, from: &str, to: &str) -> OpsResult<()> {
        // RENAME_NOREPLACE: never replace an (empty) directory that holds the target name.
        match self
            .vol
            .rename(
                Gfid::ROOT,
                from.as_bytes(),
                Gfid::ROOT,
                to.as_bytes(),
                libc::RENAME_NOREPLACE,
            )
            .await
        {
            Ok(()) => Ok(()),
            Err(Error::Os(libc::ENOENT)) => Err(OpsError::NotFound(from.to_string())),
            Err(e) => Err(map_err("rename to", to, e)),
        }
    }

    async fn remove_all(&self, name: &str) -> OpsResult<()> {
        let (g, kind) = match self.lookup_root(name).await {
            Ok(found) => found,
            Err(OpsError::NotFound(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let is_dir = kind == KIND_DIR;
        if is_dir {
            self.empty_dir(g, name).await?;
        }
        match self.vol.remove(Gfid::ROOT, name.as_bytes(), is_dir).await {
            Ok(()) | Err(Error::Os(libc::ENOENT)) => Ok(()),
            Err(e) => Err(map_err("remove", name, e)),
        }
    }

    async fn list(&self) -> OpsResult<Vec<String>> {
        let entries = self
            .vol
            .readdir(Gfid::ROOT)
            .await
            .map_err(|e| map_err("list", "volume root", e))?;
        let mut names: Vec<String> = entries
            .into_iter()
            .filter(|e| e.attr.as_ref().is_some_and(|a| a.kind == KIND_DIR))
            .filter_map(|e| String::from_utf8(e.name).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    async fn usage(&self, name: &str) -> OpsResult<DirUsage> {
        let g = self.dir_gfid(name).await?;
        let mut usage = DirUsage::default();
        let mut seen = HashSet::new();
        self.walk_usage(g, name, &mut usage, &mut seen).await?;
        Ok(usage)
    }

    async fn statfs(&self) -> OpsResult<FsStats> {
        let s = self
            .vol
            .statfs(Gfid::ROOT)
            .await
            .map_err(|e| map_err("statfs", "volume", e))?;
        let frsize = if s.frsize > 0 { s.frsize } else { s.bsize } as u64;
        Ok(FsStats {
            total_bytes: s.blocks * frsize,
            free_bytes: s.bavail * frsize,
            total_inodes: s.files,
            free_inodes: s.ffree,
        })
    }

    async fn copy_tree(&self, from: &str, to: &str) -> OpsResult<()> {
        let src = self.dir_gfid(from).await?;
        let dst = self.dir_gfid(to).await?;
        self.copy_dir(src, dst, from).await
    }
}

/// Opens Mortar volumes by connecting to their bricks with the client library.
pub struct MortarResolver {
    template: String,
    opts: Options,
    /// Volumes listed by ListVolumes even before a call has named them.
    configured: Vec<VolumeLocation>,
    volumes: tokio::sync::Mutex<HashMap<VolumeLocation, Connected>>,
}

/// A connected volume, and the fingerprint of the TLS identity it connected with (`None`:
/// the process's own).
struct Connected {
    vol: Arc<Volume>,
    tls: Option<String>,
}

impl MortarResolver {
    /// `template` names a cluster's volfile server (`{cluster}`, `{namespace}` replaced);
    /// `configured` volumes are enumerated by ListVolumes from the start.
    pub fn new(template: impl Into<String>, configured: Vec<VolumeLocation>) -> Self {
        MortarResolver {
            template: template.into(),
            opts: Options {
                client_name: format!("mortar-csi@{}", std::process::id()),
                ..Options::default()
            },
            configured,
            volumes: tokio::sync::Mutex::new(HashMap::new()),
        }
    }

    pub fn with_ping_timeout(mut self, timeout: Duration) -> Self {
        self.opts.ping_timeout = Some(timeout);
        self
    }
}

#[async_trait]
impl VolumeResolver for MortarResolver {
    async fn open(&self, location: &VolumeLocation) -> OpsResult<Arc<dyn VolumeOps>> {
        self.open_with(location, None).await
    }

    /// Without an identity, any connection of the volume serves (the one a request with
    /// secrets made, or one with the process's TLS). With one, the connection must have
    /// been made with it: a renewed certificate, or another Secret, connects again.
    async fn open_with(
        &self,
        location: &VolumeLocation,
        tls: Option<&TlsSecret>,
    ) -> OpsResult<Arc<dyn VolumeOps>> {
        // Held across the connect: concurrent calls for one volume share one connection.
        let mut volumes = self.volumes.lock().await;
        let fingerprint = tls.map(TlsSecret::fingerprint);
        if let Some(c) = volumes.get(location)
            && (fingerprint.is_none() || c.tls == fingerprint)
        {
            return Ok(Arc::new(MortarOps::new(c.vol.clone())));
        }
        let servers = location.volfile_servers(&self.template);
        let mut opts = self.opts.clone();
        opts.tls = tls.map(|t| Arc::new(t.client_config()));
        let vol = Volume::connect(&servers, &location.volume, opts)
            .await
            .map_err(|e| {
                OpsError::Unavailable(format!(
                    "connecting to Mortar volume {location} via {}: {e}",
                    servers.join(",")
                ))
            })?;
        tracing::info!(
            %location,
            servers = servers.join(","),
            tls = ?tls,
            "connected to Mortar volume"
        );
        // A connection it replaces stops with its last user.
        volumes.insert(
            location.clone(),
            Connected {
                vol: vol.clone(),
                tls: fingerprint,
            },
        );
        Ok(Arc::new(MortarOps::new(vol)))
    }

    async fn known(&self) -> OpsResult<Vec<VolumeLocation>> {
        let mut all: BTreeSet<VolumeLocation> = self.configured.iter().cloned().collect();
        all.extend(self.volumes.lock().await.keys().cloned());
        Ok(all.into_iter().collect())
    }
}
