//! Mounts that outlive the process serving them (README, "Mounts that survive their
//! server"; `mortar_client::handover`). While a writer, a reader, a lister and a lock holder
//! work through open descriptors, the mount's server is SIGKILLed at random moments, or
//! replaced by another binary: no operation may fail, no descriptor may break, the lock
//! must stay held (another mount must still be refused it), and everything must be intact
//! and replicated afterwards. The longest stall of any operation is printed. Seeds are
//! printed; `MORTAR_HANDOVER_SEED=N` replays one.

use std::collections::BTreeSet;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use mortar_e2e::*;

const BLOCK: usize = 4096;
/// Blocks of the file the reader reads (written before the faults).
const READ_BLOCKS: u64 = 64;

/// xorshift64*: small, seedable, replayable.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

fn seed() -> u64 {
    std::env::var("MORTAR_HANDOVER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// An fcntl write lock on all of `f` (`set`), or who conflicts with one (`F_GETLK`).
fn flock(f: &fs::File, cmd: i32) -> std::io::Result<i16> {
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_WRLCK as i16;
    l.l_whence = libc::SEEK_SET as i16;
    // SAFETY: fcntl(2) on an open file with a flock the call may fill in.
    if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut l) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(l.l_type)
}

/// What the workload did: operations, failures (with what failed), the longest stall.
struct Outcome {
    ops: u64,
    failures: Vec<String>,
    longest: Duration,
    written: u64,
    names: BTreeSet<String>,
}

/// Works through `m` until `stop`: each round writes a block and reads it back through one
/// descriptor, reads a block of another file through a second, lists a directory (it must
/// hold exactly the names made so far), makes a file there and removes an older one.
fn workload(root: PathBuf, stop: Arc<AtomicBool>) -> Outcome {
    let mut o = Outcome {
        ops: 0,
        failures: vec![],
        longest: Duration::ZERO,
        written: 0,
        names: BTreeSet::new(),
    };
    let w = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(root.join("w"))
        .unwrap();
    let r = fs::File::open(root.join("r")).unwrap();
    let dir = root.join("dir");
    let mut i = 0u64;
    let mut timed = |o: &mut Outcome, what: String, f: &mut dyn FnMut() -> Result<(), String>| {
        let t = Instant::now();
        let res = f();
        o.longest = o.longest.max(t.elapsed());
        o.ops += 1;
        if let Err(e) = res {
            o.failures.push(format!("{what}: {e}"));
        }
    };
    while !stop.load(Relaxed) {
        let block = pattern(i, BLOCK);
        timed(&mut o, format!("write block {i}"), &mut || {
            w.write_all_at(&block, i * BLOCK as u64)
                .map_err(|e| e.to_string())
        });
        timed(&mut o, format!("read back block {i}"), &mut || {
            let mut got = vec![0u8; BLOCK];
            w.read_exact_at(&mut got, i * BLOCK as u64)
                .map_err(|e| e.to_string())?;
            (got == block).then_some(()).ok_or("wrong content".into())
        });
        let k = i % READ_BLOCKS;
        timed(&mut o, format!("read block {k} of r"), &mut || {
            let mut got = vec![0u8; BLOCK];
            r.read_exact_at(&mut got, k * BLOCK as u64)
                .map_err(|e| e.to_string())?;
            (got == pattern(1000 + k, BLOCK))
                .then_some(())
                .ok_or("wrong content".into())
        });
        let expected = o.names.clone();
        timed(&mut o, format!("list dir (round {i})"), &mut || {
            let got: BTreeSet<String> = fs::read_dir(&dir)
                .map_err(|e| e.to_string())?
                .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            (got == expected)
                .then_some(())
                .ok_or(format!("{got:?} where {expected:?} belong"))
        });
        let name = format!("f{i}");
        timed(&mut o, format!("create dir/{name}"), &mut || {
            fs::write(dir.join(&name), name.as_bytes()).map_err(|e| e.to_string())
        });
        o.names.insert(name);
        if i >= 2 && i % 3 == 0 {
            let old = format!("f{}", i - 2);
            timed(&mut o, format!("remove dir/{old}"), &mut || {
                fs::remove_file(dir.join(&old)).map_err(|e| e.to_string())
            });
            o.names.remove(&old);
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    o.written = i;
    o
}

/// Runs the workload on a mount of `c` while `fault` strikes `rounds` times (given the
/// mount and the round), then checks everything through a second mount.
fn under_faults(c: &Cluster, seed: u64, rounds: u32, fault: &dyn Fn(&Mount, u32)) {
    let mut rng = Rng::new(seed);
    let m = c.mount("m", "");
    let other = c.mount("other", "");
    fs::create_dir(m.p("dir")).unwrap();
    let mut r = Vec::new();
    for k in 0..READ_BLOCKS {
        r.extend(pattern(1000 + k, BLOCK));
    }
    fs::write(m.p("r"), &r).unwrap();
    // The lock holder: a write lock through `m`, which `other` must be refused throughout.
    let lockf = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(m.p("lock"))
        .unwrap();
    flock(&lockf, libc::F_SETLK).unwrap();
    let contender = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(other.p("lock"))
        .unwrap();
    let refused = || {
        let e = flock(&contender, libc::F_SETLK).expect_err("the lock was lost");
        assert_eq!(e.raw_os_error(), Some(libc::EAGAIN), "{e}");
    };
    refused();

    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (root, stop) = (m.path.clone(), stop.clone());
        std::thread::spawn(move || workload(root, stop))
    };
    let t = Instant::now();
    for round in 0..rounds {
        std::thread::sleep(Duration::from_millis(200 + rng.below(1000)));
        let before = m.daemon_pid().expect("a server");
        fault(&m, round);
        // A successor serves within a second.
        let t = Instant::now();
        let after = loop {
            match m.daemon_pid() {
                Some(p) if p != before => break p,
                _ if t.elapsed() > Duration::from_secs(5) => panic!("no successor after 5 s"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        println!(
            "HANDOVER seed {seed} round {round}: server {before} -> {after}, {:.3} s later",
            t.elapsed().as_secs_f64()
        );
        refused();
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    let o = worker.join().unwrap();
    println!(
        "HANDOVER seed {seed}: {} operations in {:.1} s, {} rounds of faults, longest stall {:.3} s (goal: under 2 s)",
        o.ops,
        t.elapsed().as_secs_f64(),
        rounds,
        o.longest.as_secs_f64()
    );
    assert!(o.failures.is_empty(), "seed {seed}: {:#?}", o.failures);
    assert!(
        o.written > 20,
        "seed {seed}: only {} rounds of work",
        o.written
    );

    // Intact, seen from the other mount, and on every brick alike.
    refused();
    flock_unlock(&lockf);
    flock(&contender, libc::F_SETLK).expect("the lock is free once its holder lets go");
    let w = fs::read(other.p("w")).unwrap();
    assert_eq!(w.len() as u64, o.written * BLOCK as u64, "seed {seed}");
    for (i, b) in w.chunks(BLOCK).enumerate() {
        assert!(b == pattern(i as u64, BLOCK), "seed {seed}: block {i} of w");
    }
    let names: BTreeSet<String> = fs::read_dir(other.p("dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, o.names, "seed {seed}");
    c.wait_healed(Duration::from_secs(60));
}

fn flock_unlock(f: &fs::File) {
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = libc::F_UNLCK as i16;
    // SAFETY: fcntl(2) on an open file.
    assert!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut l) } == 0);
}

#[test]
fn a_mount_keeps_working_while_its_server_is_killed_ten_times() {
    let c = Cluster::start(110, 3);
    let seed = seed();
    println!("HANDOVER seed {seed}: SIGKILL of the server, ten times");
    under_faults(&c, seed, 10, &|m, _| {
        let pid = m.daemon_pid().unwrap();
        // SAFETY: kill(2) of the test's own mount server.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
}

#[test]
fn a_planned_upgrade_to_another_binary_loses_nothing() {
    let c = Cluster::start(111, 3);
    let seed = seed();
    println!("HANDOVER seed {seed}: the server replaced by another binary, five times");
    // Two copies of the binary stand for two versions.
    let dir = tempfile::tempdir().unwrap();
    let copies: Vec<PathBuf> = ["v1", "v2"]
        .iter()
        .map(|v| {
            let p = dir.path().join(v).join("mortar-mount");
            fs::create_dir(dir.path().join(v)).unwrap();
            fs::copy(bin("mortar-mount"), &p).unwrap();
            p
        })
        .collect();
    under_faults(&c, seed, 5, &|m, round| {
        let to = &copies[round as usize % 2];
        let out = std::process::Command::new(bin("mortar-mount"))
            .arg("--replace-server")
            .arg(&m.path)
            .arg(to)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "--replace-server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pid = m.daemon_pid().unwrap();
        let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(&exe, to, "the new binary serves");
    });
}

/// A new holder takes the mount over from the one holding it (a mounter pod replaced by a
/// rolling update), five times, each old holder killed once it has let go.
#[test]
fn a_new_holder_takes_the_mount_over_from_the_old_one() {
    let c = Cluster::start(113, 3);
    let seed = seed();
    println!("HANDOVER seed {seed}: the holder taken over by a new one, five times");
    under_faults(&c, seed, 5, &|m, _| {
        let old = m.holder_pid().unwrap();
        let out = std::process::Command::new(bin("mortar-mount"))
            .arg("--take-over")
            .arg(&m.path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "--take-over: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let new = m.holder_pid().unwrap();
        assert_ne!(new, old, "a new holder holds the mount");
        // The old one has let go: it exits by itself; killing it changes nothing.
        // SAFETY: kill(2) of the test's own old holder.
        unsafe { libc::kill(old, libc::SIGKILL) };
    });
}

/// What a holder refuses: a replacement that is not an executable file, and a mount
/// whose whole mount process (the holder) dies ends, as any FUSE mount does.
#[test]
fn a_bad_replacement_is_refused_and_the_holders_death_ends_the_mount() {
    let c = Cluster::start(112, 3);
    let m = c.mount("m", "");
    fs::write(m.p("f"), b"x").unwrap();
    let server = m.daemon_pid().unwrap();
    for bad in [
        Path::new("/nonexistent/mortar-mount"),
        Path::new("/etc/hostname"),
    ] {
        let out = std::process::Command::new(bin("mortar-mount"))
            .arg("--replace-server")
            .arg(&m.path)
            .arg(bad)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{} was taken", bad.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&*bad.to_string_lossy()), "{err}");
    }
    assert_eq!(m.daemon_pid(), Some(server), "the server stayed");
    assert_eq!(fs::read(m.p("f")).unwrap(), b"x");
    let holder = m.holder_pid().unwrap();
    // SAFETY: kill(2) of the test's own mount holder.
    unsafe { libc::kill(holder, libc::SIGKILL) };
    let t = Instant::now();
    loop {
        match fs::read(m.p("f")) {
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => break,
            _ if t.elapsed() > Duration::from_secs(10) => panic!("the mount outlived its holder"),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
