//! A network partition between real hosts: each brick and each client in its own network
//! namespace, joined by veth pairs on a bridge. The majority side keeps writing, the
//! minority side's writes fail, and after the partition heals the copies converge with every
//! acknowledged write in place.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

use mortar_e2e::{bin, is_mounted, pattern};

const NET: &str = "10.213.0";
const BRIDGE: &str = "mrtbr0";
/// (host, last octet)
const HOSTS: [(&str, u8); 5] = [("b0", 11), ("b1", 12), ("b2", 13), ("c0", 20), ("c1", 21)];
const MAJORITY: [&str; 3] = ["b0", "b1", "c0"];
const MINORITY: [&str; 2] = ["b2", "c1"];

fn sh(args: &[&str]) {
    let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip_of(host: &str) -> String {
    let o = HOSTS.iter().find(|(h, _)| *h == host).unwrap().1;
    format!("{NET}.{o}")
}

fn ns(host: &str) -> String {
    format!("mrt-{host}")
}

fn in_ns(host: &str, program: &Path) -> Command {
    let mut c = Command::new("nsenter");
    c.arg(format!("--net=/run/netns/{}", ns(host)))
        .arg("--")
        .arg(program);
    c
}

struct Net {
    dir: PathBuf,
    bricks: Vec<Child>,
    mounts: Vec<PathBuf>,
}

impl Net {
    fn up(dir: &Path) -> Net {
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        for (h, _) in HOSTS {
            let _ = Command::new("ip").args(["netns", "del", &ns(h)]).output();
        }
        sh(&["ip", "link", "add", BRIDGE, "type", "bridge"]);
        sh(&["ip", "addr", "add", &format!("{NET}.1/24"), "dev", BRIDGE]);
        sh(&["ip", "link", "set", BRIDGE, "up"]);
        for (h, o) in HOSTS {
            let n = ns(h);
            let veth = format!("{n}-h");
            sh(&["ip", "netns", "add", &n]);
            sh(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &n,
            ]);
            sh(&["ip", "link", "set", &veth, "master", BRIDGE, "up"]);
            sh(&[
                "ip",
                "-n",
                &n,
                "addr",
                "add",
                &format!("{NET}.{o}/24"),
                "dev",
                "eth0",
            ]);
            sh(&["ip", "-n", &n, "link", "set", "eth0", "up"]);
            sh(&["ip", "-n", &n, "link", "set", "lo", "up"]);
        }
        Net {
            dir: dir.to_path_buf(),
            bricks: vec![],
            mounts: vec![],
        }
    }

    /// Cuts the minority off from the majority (both ways), or joins them again.
    fn partition(&self, cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for (side, other) in [
            (&MAJORITY[..], &MINORITY[..]),
            (&MINORITY[..], &MAJORITY[..]),
        ] {
            for h in side {
                for o in other {
                    sh(&[
                        "ip",
                        "-n",
                        &ns(h),
                        "route",
                        verb,
                        "blackhole",
                        &format!("{}/32", ip_of(o)),
                    ]);
                }
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for m in &self.mounts {
            if is_mounted(m) {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        for b in &mut self.bricks {
            let _ = b.kill();
            let _ = b.wait();
        }
        for (h, _) in HOSTS {
            let _ = Command::new("ip").args(["netns", "del", &ns(h)]).output();
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
        if std::thread::panicking() || std::env::var_os("MORTAR_E2E_KEEP").is_some() {
            eprintln!("files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Writes files `dir/<prefix>N` until stopped; returns the N whose write was acknowledged,
/// and how many failed.
fn writer(
    dir: PathBuf,
    prefix: &'static str,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<(Vec<u64>, u64)> {
    std::thread::spawn(move || {
        let (mut acked, mut failed) = (Vec::new(), 0);
        let mut n = 0u64;
        while !stop.load(Relaxed) {
            match fs::write(dir.join(format!("{prefix}{n}")), pattern(seed + n, 2048)) {
                Ok(()) => acked.push(n),
                Err(_) => {
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            n += 1;
        }
        (acked, failed)
    })
}

fn mortar(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("mortar")).args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn a_partition_never_lets_the_minority_write_and_heals_without_loss() {
    let dir = tempfile::Builder::new()
        .prefix("mortar-part")
        .tempdir()
        .unwrap()
        .keep();
    let tls = mortar_e2e::tls_home();
    let mut net = Net::up(&dir);
    let volfile = dir.join("volfile.yaml");
    let bricks: String = ["b0", "b1", "b2"]
        .iter()
        .map(|b| format!("  - id: {b}\n    address: {}:24100\n", ip_of(b)))
        .collect();
    fs::write(
        &volfile,
        format!("volume: data\ngeneration: 1\nbricks:\n{bricks}"),
    )
    .unwrap();
    for b in ["b0", "b1", "b2"] {
        let log = fs::File::create(dir.join(format!("{b}.log"))).unwrap();
        let child = in_ns(b, &bin("mortar-brick"))
            .args([
                "--id",
                b,
                "--listen",
                &format!("{}:24100", ip_of(b)),
                "--session-timeout",
                "4",
                "--heal-interval",
                "1",
            ])
            .arg("--dir")
            .arg(dir.join(b))
            .arg("--volfile")
            .arg(&volfile)
            .arg("--tls-dir")
            .arg(mortar_e2e::brick_tls(&dir, b))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        net.bricks.push(child);
    }
    let target = format!("{}:24100:/data", ip_of("b0"));
    let t = Instant::now();
    while !mortar(&["status", &target]).0 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "bricks did not come up: {}",
            mortar(&["status", &target]).1
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut mounts = Vec::new();
    for c in ["c0", "c1"] {
        let m = dir.join(format!("mnt-{c}"));
        fs::create_dir(&m).unwrap();
        let out = in_ns(c, &bin("mortar-mount"))
            .arg("--tls-dir")
            .arg(tls.join("client"))
            .arg(format!("{}:/data", ip_of("b0")))
            .arg(&m)
            .args([
                "-o",
                &format!(
                    "ping-timeout=2,backup-volfile-servers={}:{}",
                    ip_of("b1"),
                    ip_of("b2")
                ),
            ])
            .args(["--log-file", dir.join(format!("{c}.log")).to_str().unwrap()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount in {c}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        net.mounts.push(m.clone());
        mounts.push(m);
    }
    let (maj, min) = (&mounts[0], &mounts[1]);
    fs::create_dir(maj.join("maj")).unwrap();
    fs::create_dir(maj.join("min")).unwrap();
    fs::create_dir(maj.join("both")).unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let before = writer(min.join("both"), "min-before-", 0, stop.clone());
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Relaxed);
    let (min_before, _) = before.join().unwrap();
    assert!(!min_before.is_empty());

    net.partition(true);
    let stop = Arc::new(AtomicBool::new(false));
    let w_maj = writer(maj.join("maj"), "a", 1_000_000, stop.clone());
    let w_maj_both = writer(maj.join("both"), "a", 2_000_000, stop.clone());
    let w_min = writer(min.join("min"), "b", 3_000_000, stop.clone());
    let w_min_both = writer(min.join("both"), "b", 4_000_000, stop.clone());
    // Past the ping timeout (2 s) and the bricks' session timeout (4 s).
    std::thread::sleep(Duration::from_secs(8));
    // Late in the partition, the minority side must refuse every write.
    let late = fs::write(min.join("min/late"), b"x");
    assert!(
        late.is_err(),
        "the minority side accepted a write during the partition"
    );
    stop.store(true, Relaxed);
    let (maj_acked, _) = w_maj.join().unwrap();
    let (maj_both_acked, _) = w_maj_both.join().unwrap();
    let (min_acked, min_failed) = w_min.join().unwrap();
    let (min_both_acked, _) = w_min_both.join().unwrap();
    assert!(
        maj_acked.len() > 20 && maj_both_acked.len() > 5,
        "the majority side stopped writing"
    );
    assert!(min_failed > 0, "the minority side never failed");

    net.partition(false);
    let t = Instant::now();
    loop {
        let (_, info) = mortar(&["heal", "info", "--json", &target]);
        let (same, diffs) = mortar(&["verify", &target]);
        if same && !info.contains("\"gfid\"") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "no convergence:\n{info}\n{diffs}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("HEAL after partition: {:.2} s", t.elapsed().as_secs_f64());
    // Every acknowledged write is there, from either side, read through either mount.
    let check = |m: &Path, sub: &str, prefix: &str, seed: u64, acked: &[u64]| {
        for n in acked {
            let got = fs::read(m.join(sub).join(format!("{prefix}{n}")));
            assert_eq!(
                got.ok(),
                Some(pattern(seed + n, 2048)),
                "acknowledged write {sub}/{prefix}{n} lost"
            );
        }
    };
    for m in [maj, min] {
        check(m, "both", "min-before-", 0, &min_before);
        check(m, "maj", "a", 1_000_000, &maj_acked);
        check(m, "both", "a", 2_000_000, &maj_both_acked);
        check(m, "min", "b", 3_000_000, &min_acked);
        check(m, "both", "b", 4_000_000, &min_both_acked);
    }
    // And the minority side writes again.
    let t = Instant::now();
    while fs::write(min.join("min/after"), b"ok").is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the minority side did not recover"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}
