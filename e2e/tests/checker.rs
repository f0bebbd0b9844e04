//! A randomized fault-injection checker, in the Jepsen spirit: clients on separate mounts run
//! random operations (create, write at random offsets, truncate, rename within and across
//! directories, link, unlink, mkdir, rmdir, chmod, setxattr, fsync) while a nemesis SIGKILLs,
//! SIGSTOPs (past the ping timeout), partitions (iptables drops every packet to and from a
//! brick) and restarts bricks and kills clients' FUSE daemons.
//! Every acknowledged operation goes into a model; an operation that failed leaves what it
//! touched unknown (either outcome is allowed). Once the faults stop and heal settles:
//! `mortar verify` finds every copy identical, no heal entry is pending, and every path the
//! model knows reads back through a fresh mount exactly as acknowledged (content, mode,
//! xattr, hard links), with nothing extra in the directories it knows.
//!
//! Seeds are printed; `CHECKER_SEEDS=7,8 CHECKER_SECS=600 cargo nextest run -p mortar-e2e
//! --test checker --no-capture` replays seeds or runs for as long as wanted. CI runs two seeds
//! of 30 s each.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use mortar_e2e::{Cluster, Mount};

/// xorshift64*: small, seedable, replayable.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Inode {
    data: Vec<u8>,
    mode: u32,
    xattr: Option<Vec<u8>>,
}

/// What one client's acknowledged operations say its directory holds.
#[derive(Default)]
struct Model {
    names: BTreeMap<String, u64>,
    inodes: HashMap<u64, Inode>,
    dirs: BTreeSet<String>,
    /// Names (files or directories) whose state a failed operation left unknown.
    unknown: BTreeSet<String>,
    next_inode: u64,
}

impl Model {
    fn known_file(&self, name: &str) -> Option<u64> {
        if self.is_unknown(name) {
            return None;
        }
        let ino = *self.names.get(name)?;
        // Every name of the inode must be known, or a write through another could be lost.
        self.names
            .iter()
            .filter(|(_, i)| **i == ino)
            .all(|(n, _)| !self.is_unknown(n))
            .then_some(ino)
    }

    /// A name is unknown if it, or a directory above it, is.
    fn is_unknown(&self, name: &str) -> bool {
        let mut p = name;
        loop {
            if self.unknown.contains(p) {
                return true;
            }
            match p.rsplit_once('/') {
                Some((parent, _)) => p = parent,
                None => return false,
            }
        }
    }

    /// A failed operation on `name`: every name of its inode becomes unknown too.
    fn forget(&mut self, name: &str) {
        if let Some(ino) = self.names.get(name).copied() {
            let all: Vec<String> = self
                .names
                .iter()
                .filter(|(_, i)| **i == ino)
                .map(|(n, _)| n.clone())
                .collect();
            self.unknown.extend(all);
        }
        self.unknown.insert(name.to_string());
    }

    fn unlink(&mut self, name: &str) {
        if let Some(ino) = self.names.remove(name) {
            if !self.names.values().any(|i| *i == ino) {
                self.inodes.remove(&ino);
            }
        }
    }
}

#[derive(Default)]
struct Counts {
    ok: BTreeMap<&'static str, u64>,
    failed: BTreeMap<&'static str, u64>,
}

/// One client: random operations in `root/c{id}`, recorded in the model.
fn client(
    id: usize,
    root: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
    gate: Arc<RwLock<()>>,
) -> (Model, Counts) {
    let mut rng = Rng::new(seed ^ (id as u64 + 1) * 0x1000_0001);
    let mut m = Model::default();
    let mut counts = Counts::default();
    let base = format!("c{id}");
    let p = |rel: &str| root.join(rel);
    let record = |counts: &mut Counts, op: &'static str, ok: bool| {
        *if ok {
            &mut counts.ok
        } else {
            &mut counts.failed
        }
        .entry(op)
        .or_default() += 1;
    };
    while !stop.load(Relaxed) {
        // Never while the nemesis remounts this client (the bare mount point would take
        // the write); a daemon that dies mid-operation fails that operation.
        let _gate = gate.read().unwrap();
        let dirs: Vec<String> = std::iter::once(base.clone())
            .chain(m.dirs.iter().cloned())
            .filter(|d| !m.is_unknown(d))
            .collect();
        let dir = dirs[rng.below(dirs.len() as u64) as usize].clone();
        let files: Vec<String> = m
            .names
            .keys()
            .filter(|n| m.known_file(n).is_some())
            .cloned()
            .collect();
        let pick = |rng: &mut Rng| -> Option<String> {
            (!files.is_empty()).then(|| files[rng.below(files.len() as u64) as usize].clone())
        };
        let fresh = format!("{dir}/n{}", rng.below(40));
        match rng.below(12) {
            0 | 1 => {
                // create (or replace) with content
                if m.is_unknown(&fresh) || m.dirs.contains(&fresh) {
                    continue;
                }
                let n = rng.below(8192) as usize;
                let data = rng.bytes(n);
                let ok = fs::write(p(&fresh), &data).is_ok();
                record(&mut counts, "create", ok);
                if ok {
                    match m.names.get(&fresh).copied() {
                        // An existing file is truncated and rewritten (all its names see it).
                        Some(ino) => m.inodes.get_mut(&ino).unwrap().data = data,
                        None => {
                            m.next_inode += 1;
                            m.names.insert(fresh.clone(), m.next_inode);
                            m.inodes.insert(
                                m.next_inode,
                                Inode {
                                    data,
                                    mode: 0o644,
                                    xattr: None,
                                },
                            );
                        }
                    }
                } else {
                    m.forget(&fresh);
                }
            }
            2 | 3 => {
                // write at a random offset
                let Some(name) = pick(&mut rng) else { continue };
                let off = rng.below(16384);
                let n = 1 + rng.below(4096) as usize;
                let data = rng.bytes(n);
                let ok = fs::OpenOptions::new()
                    .write(true)
                    .open(p(&name))
                    .and_then(|f| f.write_all_at(&data, off))
                    .is_ok();
                record(&mut counts, "write", ok);
                if ok {
                    let ino = m.names[&name];
                    let d = &mut m.inodes.get_mut(&ino).unwrap().data;
                    let end = off as usize + data.len();
                    if d.len() < end {
                        d.resize(end, 0);
                    }
                    d[off as usize..end].copy_from_slice(&data);
                } else {
                    m.forget(&name);
                }
            }
            4 => {
                let Some(name) = pick(&mut rng) else { continue };
                let len = rng.below(16384);
                let ok = fs::OpenOptions::new()
                    .write(true)
                    .open(p(&name))
                    .and_then(|f| f.set_len(len))
                    .is_ok();
                record(&mut counts, "truncate", ok);
                if ok {
                    let ino = m.names[&name];
                    m.inodes.get_mut(&ino).unwrap().data.resize(len as usize, 0);
                } else {
                    m.forget(&name);
                }
            }
            5 | 6 => {
                // rename, within or across directories, possibly replacing a file
                let Some(src) = pick(&mut rng) else { continue };
                if m.is_unknown(&fresh) || m.dirs.contains(&fresh) || src == fresh {
                    continue;
                }
                let ok = fs::rename(p(&src), p(&fresh)).is_ok();
                record(&mut counts, "rename", ok);
                if ok {
                    let ino = m.names.remove(&src).unwrap();
                    if m.names.get(&fresh) != Some(&ino) {
                        m.unlink(&fresh);
                        m.names.insert(fresh, ino);
                    } else {
                        // Two names of one inode: rename does nothing (POSIX).
                        m.names.insert(src, ino);
                    }
                } else {
                    m.forget(&src);
                    m.forget(&fresh);
                }
            }
            7 => {
                let Some(src) = pick(&mut rng) else { continue };
                if m.names.contains_key(&fresh) || m.is_unknown(&fresh) || m.dirs.contains(&fresh) {
                    continue;
                }
                let ok = fs::hard_link(p(&src), p(&fresh)).is_ok();
                record(&mut counts, "link", ok);
                if ok {
                    let ino = m.names[&src];
                    m.names.insert(fresh, ino);
                } else {
                    m.forget(&src);
                    m.forget(&fresh);
                }
            }
            8 => {
                let Some(name) = pick(&mut rng) else { continue };
                let ok = fs::remove_file(p(&name)).is_ok();
                record(&mut counts, "unlink", ok);
                if ok {
                    m.unlink(&name);
                } else {
                    m.forget(&name);
                }
            }
            9 => {
                // mkdir, or rmdir of an empty directory
                let d = format!("{base}/d{}", rng.below(4));
                if m.is_unknown(&d) {
                    continue;
                }
                if m.dirs.contains(&d) {
                    let empty = !m.names.keys().any(|n| n.starts_with(&format!("{d}/")))
                        && !m.unknown.iter().any(|n| n.starts_with(&format!("{d}/")));
                    if !empty {
                        continue;
                    }
                    let ok = fs::remove_dir(p(&d)).is_ok();
                    record(&mut counts, "rmdir", ok);
                    if ok {
                        m.dirs.remove(&d);
                    } else {
                        m.unknown.insert(d);
                    }
                } else {
                    let ok = fs::create_dir(p(&d)).is_ok();
                    record(&mut counts, "mkdir", ok);
                    if ok {
                        m.dirs.insert(d);
                    } else {
                        m.unknown.insert(d);
                    }
                }
            }
            10 => {
                let Some(name) = pick(&mut rng) else { continue };
                if rng.below(2) == 0 {
                    let mode = [0o600, 0o640, 0o644, 0o755][rng.below(4) as usize];
                    let ok =
                        fs::set_permissions(p(&name), fs::Permissions::from_mode(mode)).is_ok();
                    record(&mut counts, "chmod", ok);
                    if ok {
                        let ino = m.names[&name];
                        m.inodes.get_mut(&ino).unwrap().mode = mode;
                    } else {
                        m.forget(&name);
                    }
                } else {
                    let n = 1 + rng.below(64) as usize;
                    let v = rng.bytes(n);
                    let ok = rustix::fs::setxattr(
                        p(&name),
                        "user.checker",
                        &v,
                        rustix::fs::XattrFlags::empty(),
                    )
                    .is_ok();
                    record(&mut counts, "setxattr", ok);
                    if ok {
                        let ino = m.names[&name];
                        m.inodes.get_mut(&ino).unwrap().xattr = Some(v);
                    } else {
                        m.forget(&name);
                    }
                }
            }
            _ => {
                // append and fsync: acknowledged means on disk on a majority
                let Some(name) = pick(&mut rng) else { continue };
                let n = 1 + rng.below(2048) as usize;
                let data = rng.bytes(n);
                let ok = fs::OpenOptions::new()
                    .append(true)
                    .open(p(&name))
                    .and_then(|mut f| {
                        f.write_all(&data)?;
                        f.sync_all()
                    })
                    .is_ok();
                record(&mut counts, "append+fsync", ok);
                if ok {
                    let ino = m.names[&name];
                    m.inodes
                        .get_mut(&ino)
                        .unwrap()
                        .data
                        .extend_from_slice(&data);
                } else {
                    m.forget(&name);
                }
            }
        }
    }
    (m, counts)
}

/// Compares one client's model with what a mount shows; returns the differences.
fn check(model: &Model, root: &Path, base: &str) -> Vec<String> {
    let mut bad = Vec::new();
    let mut ino_of: HashMap<u64, u64> = HashMap::new();
    for (name, ino) in &model.names {
        if model.known_file(name).is_none() {
            continue;
        }
        let want = &model.inodes[ino];
        let path = root.join(name);
        let Ok(md) = fs::symlink_metadata(&path) else {
            bad.push(format!("{name}: acknowledged, but missing"));
            continue;
        };
        let data = fs::read(&path).unwrap_or_default();
        if data != want.data {
            bad.push(format!(
                "{name}: content differs ({} bytes, {} acknowledged)",
                data.len(),
                want.data.len()
            ));
        }
        if md.mode() & 0o7777 != want.mode {
            bad.push(format!(
                "{name}: mode {:o}, acknowledged {:o}",
                md.mode() & 0o7777,
                want.mode
            ));
        }
        let mut buf = vec![0u8; 256];
        let x = rustix::fs::getxattr(&path, "user.checker", &mut buf[..])
            .ok()
            .map(|n| buf[..n].to_vec());
        if x != want.xattr {
            bad.push(format!("{name}: xattr differs"));
        }
        // Names of one inode are hard links of one file.
        if let Some(seen) = ino_of.insert(*ino, md.ino()) {
            if seen != md.ino() {
                bad.push(format!("{name}: no longer a hard link of its other names"));
            }
        }
    }
    // Nothing extra where the model knows everything: an acknowledged unlink or rename
    // must not be undone.
    for d in std::iter::once(base.to_string()).chain(model.dirs.iter().cloned()) {
        if model.is_unknown(&d) {
            continue;
        }
        let Ok(entries) = fs::read_dir(root.join(&d)) else {
            bad.push(format!("{d}/: acknowledged directory missing"));
            continue;
        };
        for e in entries.flatten() {
            let rel = format!("{d}/{}", e.file_name().to_string_lossy());
            if !model.names.contains_key(&rel)
                && !model.dirs.contains(&rel)
                && !model.is_unknown(&rel)
            {
                bad.push(format!(
                    "{rel}: present, but never acknowledged (or unlinked)"
                ));
            }
        }
    }
    bad
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

fn run_seed(seed: u64, secs: u64, net: u8) {
    println!("CHECKER seed {seed}: {secs} s of faults");
    let c = Arc::new(Mutex::new(Cluster::start(net, 3)));
    let mounts: Vec<Mount> = {
        let c = c.lock().unwrap();
        (0..2)
            .map(|i| c.mount(&format!("m{i}"), "ping-timeout=2"))
            .collect()
    };
    let roots: Vec<PathBuf> = mounts.iter().map(|m| m.path.clone()).collect();
    for (i, r) in roots.iter().enumerate() {
        fs::create_dir(r.join(format!("c{i}"))).unwrap();
    }
    let mounts = Arc::new(Mutex::new(mounts));
    let stop = Arc::new(AtomicBool::new(false));
    let gates: Vec<Arc<RwLock<()>>> = (0..2).map(|_| Arc::default()).collect();
    let workers: Vec<_> = roots
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (r, stop, gate) = (r.clone(), stop.clone(), gates[i].clone());
            std::thread::spawn(move || client(i, r, seed, stop, gate))
        })
        .collect();

    // The nemesis: one fault at a time, so a majority always lives.
    let mut rng = Rng::new(seed.wrapping_add(0xFA17));
    let mut log = Vec::new();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(300 + rng.below(1200)));
        let b = rng.below(3) as usize;
        match rng.below(6) {
            0 | 1 => {
                c.lock().unwrap().kill(b);
                std::thread::sleep(Duration::from_millis(500 + rng.below(2500)));
                c.lock().unwrap().restart(b);
                log.push(format!(
                    "{:.1}s kill+restart b{b}",
                    t.elapsed().as_secs_f64()
                ));
            }
            2 | 3 => {
                let pause = 500 + rng.below(4000);
                let pid = c.lock().unwrap().pid(b);
                // SAFETY: signals to our own child.
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_millis(pause));
                unsafe { libc::kill(pid, libc::SIGCONT) };
                log.push(format!(
                    "{:.1}s stop b{b} {pause} ms",
                    t.elapsed().as_secs_f64()
                ));
            }
            4 => {
                // A partition: the brick runs on, but nobody reaches it and it reaches nobody.
                let cut = 1000 + rng.below(5000);
                let p = c.lock().unwrap().partition(b);
                std::thread::sleep(Duration::from_millis(cut));
                drop(p);
                log.push(format!(
                    "{:.1}s partition b{b} {cut} ms",
                    t.elapsed().as_secs_f64()
                ));
            }
            _ => {
                // A client's FUSE daemon dies; it is mounted again at the same place.
                let i = rng.below(2) as usize;
                let _closed = gates[i].write().unwrap();
                let mut ms = mounts.lock().unwrap();
                if let Some(pid) = ms[i].holder_pid() {
                    // SAFETY: kill(2) of the test's own FUSE daemon.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    while pid_alive(pid) {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                let _ = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(&ms[i].path)
                    .status();
                std::thread::sleep(Duration::from_millis(rng.below(1000)));
                let fresh = c.lock().unwrap().mount(&format!("m{i}"), "ping-timeout=2");
                // The old handle's drop would unmount the new mount.
                std::mem::forget(std::mem::replace(&mut ms[i], fresh));
                log.push(format!("{:.1}s kill client {i}", t.elapsed().as_secs_f64()));
            }
        }
    }
    stop.store(true, Relaxed);
    let results: Vec<(Model, Counts)> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    println!("CHECKER seed {seed} faults: {}", log.join(", "));
    for (i, (_, counts)) in results.iter().enumerate() {
        println!(
            "CHECKER seed {seed} client {i}: acknowledged {:?}; failed {:?}",
            counts.ok, counts.failed
        );
    }

    let c = c.lock().unwrap();
    let healed = c.wait_healed(Duration::from_secs(180));
    println!("CHECKER seed {seed}: healed and identical {healed:?} after the faults");
    let check_mount = c.mount("check", "");
    let mut bad = Vec::new();
    for (i, (model, _)) in results.iter().enumerate() {
        bad.extend(check(model, &check_mount.path, &format!("c{i}")));
    }
    assert!(
        bad.is_empty(),
        "seed {seed} (replay: CHECKER_SEEDS={seed}): {} differences from acknowledged operations:\n{}",
        bad.len(),
        bad.join("\n")
    );
    assert_eq!(c.heal_pending(), 0);
    let known: usize = results.iter().map(|(m, _)| m.names.len()).sum();
    println!("CHECKER seed {seed}: passed ({known} names checked)");
}

#[test]
fn acknowledged_operations_survive_random_faults() {
    let seeds: Vec<u64> = std::env::var("CHECKER_SEEDS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2]);
    let secs: u64 = std::env::var("CHECKER_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    for (i, seed) in seeds.into_iter().enumerate() {
        run_seed(seed, secs, 90 + i as u8);
    }
}
