//! The public POSIX suites, written by nobody here, on a real 3-brick mount:
//! - pjdfstest (crates.io `pjdfstest`): every case passes, except the skips listed with their
//!   reasons in e2e/conformance/pjdfstest-skipped.txt (compared both ways: no silent skips);
//! - fsx (crates.io `fsx`): 100,000 random operations (read, write, mapped read and write,
//!   truncate, fallocate, hole punching, sync, close and reopen, sendfile, copy_file_range)
//!   with no miscompare; and again while a brick is SIGKILLed and restarted mid-run.
//!
//! `./test.sh` installs both (`cargo install --locked`) and the `tests` user pjdfstest needs.
//! Without them the tests fail in CI and are skipped elsewhere. FSX_OPS and FSX_SEED override
//! the operation count and seed (a failing seed is printed and replays).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mortar_e2e::Cluster;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// The installed tool (PATH or ~/.cargo/bin), or None after saying why (fatal in CI).
fn tool(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    let found = dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        let msg =
            format!("{name} is not installed (./test.sh runs `cargo install --locked {name}`)");
        assert!(!in_ci(), "{msg}");
        eprintln!("SKIP: {msg}");
    }
    found
}

/// A scratch tmpfs: pjdfstest's second filesystem, for the EXDEV cases.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn new() -> Tmpfs {
        let d = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
            .arg(d.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount tmpfs");
        Tmpfs(d)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

#[test]
fn pjdfstest_passes_on_a_replicated_mount() {
    let Some(pjd) = tool("pjdfstest") else { return };
    let c = Cluster::start(77, 3);
    let m = c.mount("m1", "");
    let other = Tmpfs::new();
    let t = Instant::now();
    let out = Command::new(&pjd)
        .arg("-c")
        .arg(repo().join("e2e/conformance/pjdfstest.toml"))
        .arg("-p")
        .arg(&m.path)
        .arg("-s")
        .arg(other.0.path())
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let summary = text
        .lines()
        .find(|l| l.starts_with("Summary:"))
        .unwrap_or_else(|| {
            panic!(
                "no summary from pjdfstest:\n{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    println!(
        "pjdfstest on Mortar: {summary} ({:.1} s)",
        t.elapsed().as_secs_f64()
    );

    // Every FAILED line with the reason below it.
    let lines: Vec<&str> = text.lines().collect();
    let mut failed = Vec::new();
    let mut skipped = std::collections::BTreeSet::new();
    for (i, l) in lines.iter().enumerate() {
        let name = l.split_whitespace().next().unwrap_or("");
        if l.trim_end().ends_with("FAILED") || l.trim_end().ends_with("PASSED UNEXPECTEDLY") {
            let why = lines
                .get(i + 1)
                .filter(|n| n.starts_with('\t'))
                .unwrap_or(&"");
            failed.push(format!("{name}: {}", why.trim()));
        } else if l.trim_end().ends_with("skipped") {
            skipped.insert(name.to_string());
        }
    }
    let listed =
        std::fs::read_to_string(repo().join("e2e/conformance/pjdfstest-skipped.txt")).unwrap();
    let expected: std::collections::BTreeSet<String> = listed
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split('\t').next().unwrap().to_string())
        .collect();
    assert!(
        failed.is_empty(),
        "{} pjdfstest cases failed on Mortar:\n{}",
        failed.len(),
        failed.join("\n")
    );
    assert!(out.status.success(), "pjdfstest exited {}", out.status);
    assert_eq!(
        skipped, expected,
        "the skipped cases differ from e2e/conformance/pjdfstest-skipped.txt"
    );
    let (ok, v) = c.verify(false);
    assert!(ok, "bricks differ after pjdfstest: {v}");
}

/// Runs fsx on `file`; returns its operation counts, or panics with its log tail.
fn fsx(fsx: &Path, file: &Path, ops: u64, seed: u64) -> BTreeMap<String, u64> {
    let t = Instant::now();
    let out = Command::new(fsx)
        .args(["-N", &ops.to_string(), "-S", &seed.to_string(), "-v"])
        .arg("-f")
        .arg(repo().join("e2e/conformance/fsx.toml"))
        .arg(file)
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !stdout.contains("All operations completed A-OK!") {
        let tail: Vec<&str> = log.lines().filter(|l| !l.contains("[INFO")).collect();
        panic!(
            "fsx -S {seed} failed ({}) after {:.1} s; replay with FSX_SEED={seed}:\n{}\n{stdout}",
            out.status,
            t.elapsed().as_secs_f64(),
            tail[tail.len().saturating_sub(80)..].join("\n")
        );
    }
    // "[INFO  fsx] 12 mapread  0x11287 .. 0x1d0b4 ( 0xbe2e bytes)": count by operation.
    let mut counts = BTreeMap::new();
    for l in log.lines().filter(|l| l.starts_with("[INFO")) {
        let mut w = l.split_whitespace().skip(3);
        if let Some(op) = w.next() {
            *counts.entry(op.to_string()).or_insert(0) += 1;
        }
    }
    let total: u64 = counts.values().sum();
    println!(
        "fsx -N {ops} -S {seed}: A-OK in {:.1} s; {total} operations logged: {counts:?}",
        t.elapsed().as_secs_f64()
    );
    counts
}

fn fsx_ops() -> u64 {
    std::env::var("FSX_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000)
}

fn fsx_seed(default: u64) -> u64 {
    std::env::var("FSX_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn fsx_finds_no_miscompare() {
    let Some(bin) = tool("fsx") else { return };
    let c = Cluster::start(78, 3);
    let m = c.mount("m1", "");
    let counts = fsx(&bin, &m.p("fsx.file"), fsx_ops(), fsx_seed(1));
    assert!(counts.len() >= 8, "too few kinds of operation: {counts:?}");
    let (ok, v) = c.verify(false);
    assert!(ok, "bricks differ after fsx: {v}");
}

#[test]
fn fsx_finds_no_miscompare_while_a_brick_is_killed_and_restarted() {
    let Some(bin) = tool("fsx") else { return };
    let mut c = Cluster::start(79, 3);
    let m = c.mount("m1", "");
    let file = m.p("fsx.file");
    let (ops, seed) = (fsx_ops(), fsx_seed(2));
    let runner = {
        let (bin, file) = (bin.clone(), file.clone());
        std::thread::spawn(move || fsx(&bin, &file, ops, seed))
    };
    // Kill a brick once fsx is well under way, bring it back a little later.
    let t = Instant::now();
    while !file.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !runner.is_finished(),
        "fsx ended before the fault: raise FSX_OPS"
    );
    c.kill(1);
    println!("brick b1 SIGKILLed at {:.1} s", t.elapsed().as_secs_f64());
    std::thread::sleep(Duration::from_secs(3));
    c.restart(1);
    println!("brick b1 restarted at {:.1} s", t.elapsed().as_secs_f64());
    let counts = runner.join().expect("fsx");
    assert!(counts.len() >= 8, "{counts:?}");
    let healed = c.wait_healed(Duration::from_secs(120));
    println!("healed {healed:?} after fsx ended");
    let (ok, v) = c.verify(false);
    assert!(ok, "bricks differ after fsx and heal: {v}");
}
