//! Volume handles: what a CSI `volume_id` says about where a volume lives.
//!
//! DeleteVolume, ControllerExpandVolume and the node calls receive nothing but the
//! volume id (StorageClass parameters are gone by then), so the id itself must name the
//! Mortar cluster, the Mortar volume and the PVC directory:
//!
//! * `NAMESPACE/CLUSTER/VOLUME/pvc-…` — a PVC directory on the volume of a
//!   `SharedStorageCluster` (dynamic provisioning);
//! * `NAMESPACE/CLUSTER/VOLUME` — the whole volume (static provisioning: many workloads
//!   share `data`, as the platform's shared storage does);
//! * `@HOST[:PORT],HOST…/VOLUME[/pvc-…]` — the same with explicit volfile servers instead
//!   of a cluster name (StorageClass parameter `volfileServers`).
//!
//! Kubernetes names cannot contain `/` or `@`, so the forms cannot be confused.

use std::fmt;

/// CSI caps ids at 128 bytes (the sidecars store them in PV objects and logs).
pub const MAX_ID_LEN: usize = 128;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClusterRef {
    /// A `SharedStorageCluster` resolved to its brick service.
    Named { namespace: String, name: String },
    /// Explicit volfile servers, first one preferred.
    Servers(Vec<String>),
}

/// One Mortar volume (`data` by default) of one cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeLocation {
    pub cluster: ClusterRef,
    pub volume: String,
}

/// A CSI volume: a PVC directory on a Mortar volume, or the whole Mortar volume.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId {
    pub location: VolumeLocation,
    pub dir: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed volume id {id:?}: {why}")]
pub struct ParseError {
    pub id: String,
    pub why: &'static str,
}

fn is_k8s_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !s.starts_with(['-', '.'])
}

/// Host, host:port, or [v6]:port. Excludes the separators of the id format.
fn is_server(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':' | b'[' | b']' | b'_')
        })
}

/// A Mortar volume name: a plain file-name-safe word.
pub fn is_volume_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// A PVC directory name: `pvc-` and file-name-safe characters, so it can never escape the
/// volume root or collide with the archive names the controller makes.
pub fn is_pvc_dir(s: &str) -> bool {
    s.len() > 4
        && s.len() <= 100
        && s.starts_with("pvc-")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl VolumeLocation {
    /// A stable, file-name-safe key: names the node's shared mount directory.
    pub fn key(&self) -> String {
        match &self.cluster {
            // `_` cannot occur in Kubernetes names, so the key is unambiguous.
            ClusterRef::Named { namespace, name } => format!("{namespace}_{name}_{}", self.volume),
            ClusterRef::Servers(servers) => {
                use sha2::Digest;
                let digest = sha2::Sha256::digest(servers.join(",").as_bytes());
                let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
                format!("servers-{hex}_{}", self.volume)
            }
        }
    }
}

/// The default `--volfile-server-template`: the operator's client Service of a
/// `SharedStorageCluster` (named like the cluster), brick port 24100.
pub const DEFAULT_SERVER_TEMPLATE: &str = "{cluster}.{namespace}.svc:24100";

impl VolumeLocation {
    /// The volfile servers to try, first one preferred: the explicit list, or `template`
    /// with `{cluster}` and `{namespace}` replaced for a named cluster.
    pub fn volfile_servers(&self, template: &str) -> Vec<String> {
        match &self.cluster {
            ClusterRef::Named { namespace, name } => vec![
                template
                    .replace("{cluster}", name)
                    .replace("{namespace}", namespace),
            ],
            ClusterRef::Servers(list) => list.clone(),
        }
    }
}

impl fmt::Display for VolumeLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.cluster {
            ClusterRef::Named { namespace, name } => {
                write!(f, "{namespace}/{name}/{}", self.volume)
            }
            ClusterRef::Servers(s) => write!(f, "@{}/{}", s.join(","), self.volume),
        }
    }
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.location)?;
        if let Some(dir) = &self.dir {
            write!(f, "/{dir}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for VolumeId {
    type Err = ParseError;

    fn from_str(id: &str) -> Result<Self, ParseError> {
        let err = |why| ParseError {
            id: id.to_string(),
            why,
        };
        if id.len() > MAX_ID_LEN {
            return Err(err("longer than 128 bytes"));
        }
        let parts: Vec<&str> = id.split('/').collect();
        let (cluster, rest) = if let Some(servers) = parts[0].strip_prefix('@') {
            let list: Vec<String> = servers.split(',').map(str::to_string).collect();
            if !list.iter().all(|s| is_server(s)) {
                return Err(err("bad volfile server list"));
            }
            (ClusterRef::Servers(list), &parts[1..])
        } else {
            if parts.len() < 2 || !is_k8s_name(parts[0]) || !is_k8s_name(parts[1]) {
                return Err(err("expected NAMESPACE/CLUSTER/VOLUME[/DIR]"));
            }
            let named = ClusterRef::Named {
                namespace: parts[0].to_string(),
                name: parts[1].to_string(),
            };
            (named, &parts[2..])
        };
        let (volume, dir) = match rest {
            [volume] => (*volume, None),
            [volume, dir] => (*volume, Some(*dir)),
            _ => return Err(err("wrong number of components")),
        };
        if !is_volume_name(volume) {
            return Err(err("bad volume name"));
        }
        if let Some(dir) = dir
            && !is_pvc_dir(dir)
        {
            return Err(err("bad PVC directory name"));
        }
        Ok(VolumeId {
            location: VolumeLocation {
                cluster,
                volume: volume.to_string(),
            },
            dir: dir.map(str::to_string),
        })
    }
}

/// The PVC directory for a CreateVolume name. The external-provisioner names volumes
/// `pvc-<uid>`, which is used as is; any other name (other COs, csi-sanity) is hashed into
/// the same shape, so one name always maps to one directory and CreateVolume stays
/// idempotent without any extra bookkeeping.
pub fn dir_for_name(name: &str) -> String {
    if is_pvc_dir(name) && name.len() <= 64 {
        return name.to_string();
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(name.as_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("pvc-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for id in [
            "storage/shared/data/pvc-0b0e1f8a-0000-4000-8000-000000000001",
            "storage/shared/data",
            "@10.0.0.1:24100,brick-1.svc/data/pvc-x",
            "@[::1]:24100/data",
        ] {
            let parsed: VolumeId = id.parse().unwrap();
            assert_eq!(parsed.to_string(), id);
        }
    }

    #[test]
    fn rejects_escapes_and_garbage() {
        for id in [
            "",
            "ns",
            "ns/c/data/..",
            "ns/c/data/pvc-a/b",
            "ns/c/../pvc-a",
            "ns/c/data/archived-pvc-a",
            "NS/c/data",
            "@/data",
            "@a,,b/data",
            "ns/c/.hidden",
        ] {
            assert!(id.parse::<VolumeId>().is_err(), "{id:?} should not parse");
        }
        let long = format!("ns/c/data/pvc-{}", "a".repeat(120));
        assert!(long.parse::<VolumeId>().is_err());
    }

    #[test]
    fn names_map_to_stable_dirs() {
        assert_eq!(dir_for_name("pvc-1234"), "pvc-1234");
        let a = dir_for_name("sanity-test/with slash");
        assert!(is_pvc_dir(&a));
        assert_eq!(a, dir_for_name("sanity-test/with slash"));
        assert_ne!(a, dir_for_name("sanity-test/other"));
    }

    #[test]
    fn location_keys_are_distinct() {
        let keys: Vec<String> = [
            "ns/a/data",
            "ns/a/other",
            "ns2/a/data",
            "@h1/data",
            "@h2/data",
        ]
        .iter()
        .map(|id| id.parse::<VolumeId>().unwrap().location.key())
        .collect();
        let unique: std::collections::HashSet<_> = keys.iter().collect();
        assert_eq!(unique.len(), keys.len(), "{keys:?}");
        assert!(keys.iter().all(|k| !k.contains('/')));
    }
}
