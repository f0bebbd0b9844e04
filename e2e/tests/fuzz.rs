//! CI's bounded fuzzing run (fuzz/README.md): every cargo-fuzz target is built and run for
//! a bounded time (`MORTAR_FUZZ_SECS` each, default 30) from the checked-in corpus, and any
//! crash, hang or OOM fails the test. `fuzz/ci.sh` does the work and prints what it ran.

use std::path::Path;
use std::process::Command;

#[test]
fn fuzz_targets_survive_a_bounded_run() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/ci.sh");
    let status = Command::new(&script)
        .status()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        status.success(),
        "fuzz/ci.sh: {status} (see its output above)"
    );
}

/// Regression: CI's bounded run once failed in `fuse_requests` with a panic the log cut off;
/// it was "reading a reply: Interrupted system call". libFuzzer's timeout alarm (SIGALRM,
/// no SA_RESTART) landed in the harness's read of a reply, which did not retry. Here the
/// target runs while SIGALRM arrives every 10 ms, so that some land in those reads (before
/// the fix this failed within seconds; now the run ends normally).
#[test]
fn fuse_requests_survives_signals_landing_in_its_reads() {
    let (fuzz, bin) = fuse_requests();
    let work = std::env::temp_dir().join(format!("mortar-fuzz-signals.{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    // To a file, not a pipe: nothing reads a pipe before the end, and a full one would stop
    // the target in a write.
    let log_path = work.join("log");
    // New inputs go to a directory of their own: libFuzzer reads every file of it as one.
    let corpus = work.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    let mut child = Command::new(&bin)
        .arg(&corpus)
        .arg(fuzz.join("corpus/fuse_requests"))
        .args(["-max_total_time=15", "-rss_limit_mb=2048", "-timeout=60"])
        .arg(format!("-artifact_prefix={}/", work.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let pid = child.id() as libc::pid_t;
    // Signals only once libFuzzer has its handler (before, SIGALRM would simply end it):
    // the process's caught-signals mask shows it.
    let caught = || -> bool {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
            .is_some_and(|m| m & (1 << (libc::SIGALRM - 1)) != 0)
    };
    let start = std::time::Instant::now();
    while !caught() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "fuse_requests ended at once"
        );
        assert!(
            start.elapsed().as_secs() < 60,
            "libFuzzer never caught SIGALRM"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut sent = 0u32;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        // SAFETY: kill(2) on our own child, which is alive (try_wait said so just above)
        // or a zombie we have not reaped yet; neither can be another process.
        unsafe { libc::kill(pid, libc::SIGALRM) };
        sent += 1;
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&work);
    println!(
        "{sent} SIGALRMs sent; {}",
        log.lines()
            .rev()
            .find(|l| l.starts_with("Done"))
            .unwrap_or("no summary")
    );
    assert!(
        status.success(),
        "fuse_requests under SIGALRM: {status}\n{}",
        log.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The fuzz directory and the `fuse_requests` target, built by test.sh (`fuzz/ci.sh
/// --build-only`) before the tests run.
fn fuse_requests() -> (std::path::PathBuf, std::path::PathBuf) {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let bin = fuzz.join("target/x86_64-unknown-linux-gnu/debug/fuse_requests");
    assert!(
        bin.exists(),
        "{} is missing: build it with fuzz/ci.sh --build-only",
        bin.display()
    );
    (fuzz, bin)
}

/// Regression: the harness's WRITE carried 4 bytes more than its size field said (and its
/// raw-bytes bodies could contradict the sizes of SETXATTR and IOCTL), which panics fuser's
/// decoder; CI's short inputs never got that far, so no WRITE ever reached the mount.
/// Large inputs (4 KiB each, from a fixed seed) run many requests of every kind: all must
/// run to the end.
#[test]
fn fuse_requests_runs_large_inputs_with_every_request_kind() {
    let (_, bin) = fuse_requests();
    let dir = std::env::temp_dir().join(format!("mortar-fuzz-large.{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // xorshift64 from a fixed seed: the same inputs every run.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let inputs: Vec<_> = (0..24)
        .map(|i| {
            let bytes: Vec<u8> = (0..4096)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let path = dir.join(format!("input{i}"));
            std::fs::write(&path, bytes).unwrap();
            path
        })
        .collect();
    let out = Command::new(&bin)
        .args(&inputs)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&out.stderr);
    let ran = log.lines().filter(|l| l.starts_with("Executed")).count();
    println!("{ran} of {} large inputs ran", inputs.len());
    assert!(
        out.status.success() && ran == inputs.len(),
        "fuse_requests on large inputs: {}, {ran} of {} ran\n{log}",
        out.status,
        inputs.len()
    );
}
