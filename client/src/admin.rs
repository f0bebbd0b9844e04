//! What the `mortar` admin CLI asks of a volume: status, heal info and verify.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt;
use mortar_proto as pb;
use serde::Serialize;

use mortar_common::error::{Error, Result};
use mortar_common::volfile::{Volfile, with_default_port};
use mortar_replication::conn::connect_once;
use mortar_replication::volume::fetch_volfile;

#[derive(Debug, Serialize)]
pub struct BrickStatus {
    pub id: String,
    pub address: String,
    pub up: bool,
    pub error: Option<String>,
    pub generation: u64,
    pub heal_pending: u64,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    pub sessions: u32,
}

#[derive(Debug, Serialize)]
pub struct VolumeStatus {
    pub volume: String,
    pub generation: u64,
    pub bricks: Vec<BrickStatus>,
    pub bricks_up: usize,
    pub quorum: usize,
    pub heal_pending: u64,
    /// The ping timeout of mounts without `-o ping-timeout`: the volfile's, else the default.
    pub ping_timeout_secs: u64,
    /// `volfile` or `default`.
    pub ping_timeout_from: &'static str,
}

/// `HOST[:PORT]:/VOL` → volfile servers and volume.
pub fn parse_target(t: &str) -> Result<(Vec<String>, String)> {
    let (host, vol) = crate::mount::parse_spec(t).map_err(Error::Volfile)?;
    Ok((host.split(',').map(with_default_port).collect(), vol))
}

pub async fn volfile(target: &str, timeout: Duration) -> Result<Volfile> {
    let (servers, vol) = parse_target(target)?;
    fetch_volfile(&servers, &vol, timeout).await
}

pub async fn health(addr: &str, timeout: Duration) -> std::result::Result<pb::HealthReply, String> {
    let mut c = connect_once(addr, timeout)
        .await
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, c.health(pb::Empty {})).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(e)) => Err(e.message().to_string()),
        Err(_) => Err("timed out".into()),
    }
}

pub async fn status(target: &str, timeout: Duration) -> Result<VolumeStatus> {
    let vf = volfile(target, timeout).await?;
    let hs = futures::future::join_all(vf.bricks.iter().map(|b| health(&b.address, timeout))).await;
    let bricks: Vec<BrickStatus> = vf
        .bricks
        .iter()
        .zip(hs)
        .map(|(b, h)| match h {
            Ok(h) => BrickStatus {
                id: b.id.clone(),
                address: b.address.clone(),
                up: h.up,
                error: (h.brick_id != b.id).then(|| format!("answers as brick {:?}", h.brick_id)),
                generation: h.generation,
                heal_pending: h.heal_pending,
                capacity_bytes: h.capacity_bytes,
                free_bytes: h.free_bytes,
                sessions: h.sessions,
            },
            Err(e) => BrickStatus {
                id: b.id.clone(),
                address: b.address.clone(),
                up: false,
                error: Some(e),
                generation: 0,
                heal_pending: 0,
                capacity_bytes: 0,
                free_bytes: 0,
                sessions: 0,
            },
        })
        .collect();
    Ok(VolumeStatus {
        volume: vf.volume.clone(),
        generation: vf.generation,
        bricks_up: bricks.iter().filter(|b| b.up).count(),
        quorum: vf.quorum(),
        heal_pending: bricks.iter().map(|b| b.heal_pending).sum(),
        ping_timeout_secs: mortar_replication::volume::Options::default()
            .effective_ping_timeout(Some(&vf))
            .as_secs(),
        ping_timeout_from: if vf.ping_timeout.is_some() {
            "volfile"
        } else {
            "default"
        },
        bricks,
    })
}

/// One brick's view of the volume, path → entry.
async fn manifest(
    addr: &str,
    timeout: Duration,
) -> std::result::Result<BTreeMap<String, pb::ManifestEntry>, String> {
    let mut c = connect_once(addr, timeout)
        .await
        .map_err(|e| e.to_string())?;
    let mut s = c
        .manifest(pb::Empty {})
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    let mut out = BTreeMap::new();
    while let Some(e) = s.next().await {
        let e = e.map_err(|e| e.message().to_string())?;
        out.insert(e.path.clone(), e);
    }
    Ok(out)
}

fn describe(e: &pb::ManifestEntry) -> Vec<(&'static str, String)> {
    let a = e.attr.clone().unwrap_or_default();
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    let mut v = vec![
        ("type", format!("{:?}", a.kind())),
        ("gfid", hex(&a.gfid)),
        ("mode", format!("{:o}", a.mode)),
        ("owner", format!("{}:{}", a.uid, a.gid)),
        (
            "xattrs",
            e.xattrs
                .iter()
                .map(|x| format!("{}={}", String::from_utf8_lossy(&x.name), hex(&x.value)))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ];
    match a.kind() {
        pb::Kind::File => {
            v.push(("size", a.size.to_string()));
            v.push(("sha256", hex(&e.sha256)));
            v.push(("links", a.nlink.to_string()));
            v.push(("mtime", a.mtime_ns.to_string()));
        }
        pb::Kind::Symlink => v.push(("target", String::from_utf8_lossy(&e.target).into_owned())),
        pb::Kind::Char | pb::Kind::Block => v.push(("rdev", a.rdev.to_string())),
        _ => {}
    }
    v
}

/// Compares every brick's copy; returns the differences found (empty: all identical).
pub async fn verify(
    target: &str,
    timeout: Duration,
    up_only: bool,
) -> Result<(usize, Vec<String>)> {
    let vf = volfile(target, timeout).await?;
    let ms =
        futures::future::join_all(vf.bricks.iter().map(|b| manifest(&b.address, timeout))).await;
    let mut diffs = Vec::new();
    let mut copies = Vec::new();
    for (b, m) in vf.bricks.iter().zip(ms) {
        match m {
            Ok(m) => copies.push((b.id.clone(), m)),
            Err(e) if up_only => eprintln!("note: brick {} not compared: {e}", b.id),
            Err(e) => diffs.push(format!("brick {} ({}) unreachable: {e}", b.id, b.address)),
        }
    }
    let Some((ref_id, reference)) = copies.first() else {
        diffs.push("no brick reachable".into());
        return Ok((0, diffs));
    };
    let mut paths: std::collections::BTreeSet<&String> = std::collections::BTreeSet::new();
    for (_, m) in &copies {
        paths.extend(m.keys());
    }
    for p in &paths {
        let base = reference.get(*p).map(describe);
        for (id, m) in &copies[1..] {
            let other = m.get(*p).map(describe);
            match (&base, &other) {
                (Some(_), None) => diffs.push(format!("{p}: on {ref_id}, missing on {id}")),
                (None, Some(_)) => diffs.push(format!("{p}: on {id}, missing on {ref_id}")),
                (Some(a), Some(b)) => {
                    for ((k, va), (_, vb)) in a.iter().zip(b.iter()) {
                        if va != vb {
                            diffs.push(format!(
                                "{p}: {k} differs: {ref_id} has {va}, {id} has {vb}"
                            ));
                        }
                    }
                    if a.len() != b.len() && a[0] == b[0] {
                        diffs.push(format!("{p}: entries differ between {ref_id} and {id}"));
                    }
                }
                (None, None) => {}
            }
        }
    }
    Ok((paths.len(), diffs))
}

#[derive(Debug, Serialize)]
pub struct BrickHeal {
    pub brick: String,
    pub address: String,
    pub connected: bool,
    pub entries: Vec<HealEntry>,
}

#[derive(Debug, Serialize)]
pub struct HealEntry {
    pub gfid: String,
    pub path: String,
    pub split_brain: bool,
}

/// Pending heals per brick, as each brick's index lists them.
pub async fn heal_info(target: &str, timeout: Duration) -> Result<Vec<BrickHeal>> {
    let vf = volfile(target, timeout).await?;
    let rs = futures::future::join_all(vf.bricks.iter().map(|b| async move {
        let c = connect_once(&b.address, timeout)
            .await
            .map_err(|e| e.to_string())?;
        mortar_replication::heal::list_index(|req| {
            let mut c = c.clone();
            async move {
                match tokio::time::timeout(timeout, c.heal_index(req)).await {
                    Ok(Ok(r)) => Ok(r.into_inner()),
                    Ok(Err(e)) => Err(e.message().to_string()),
                    Err(_) => Err("timed out".to_string()),
                }
            }
        })
        .await
    }))
    .await;
    Ok(vf
        .bricks
        .iter()
        .zip(rs)
        .map(|(b, r)| BrickHeal {
            brick: b.id.clone(),
            address: b.address.clone(),
            connected: r.is_ok(),
            entries: r
                .unwrap_or_default()
                .into_iter()
                .map(|e| HealEntry {
                    gfid: mortar_common::gfid::Gfid::from_bytes(&e.gfid)
                        .map(|g| g.hex())
                        .unwrap_or_default(),
                    path: e.path,
                    split_brain: e.split_brain,
                })
                .collect(),
        })
        .collect())
}

/// Settles a split-brain file (or heals any path) with the given source.
pub async fn heal_resolve(
    target: &str,
    path: &str,
    source: mortar_replication::heal::Source,
    timeout: Duration,
) -> Result<mortar_replication::heal::HealStats> {
    let (servers, vol) = parse_target(target)?;
    let opts = mortar_replication::volume::Options {
        ping_timeout: Some(timeout),
        client_name: "mortar heal resolve".into(),
        ..Default::default()
    };
    let v = mortar_replication::volume::Volume::connect(&servers, &vol, opts).await?;
    let mut g = mortar_common::gfid::Gfid::ROOT;
    for part in path.split('/').filter(|p| !p.is_empty()) {
        let a = v.lookup(g, part.as_bytes()).await?;
        g = mortar_common::gfid::Gfid::from_bytes(&a.gfid).ok_or(Error::Os(libc::EIO))?;
    }
    let r = v.heal(g, source).await;
    v.shutdown().await;
    r
}
