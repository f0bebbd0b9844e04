//! Leases (README, "Leases and caching"): a mount serves attributes, entries and small files
//! from its cache while the bricks lease them to it, and a change by another mount recalls
//! them first. Nothing a change acknowledged to one mount may be missed by another's later
//! open, stat (past the attribute timeout) or read, whatever the cache held; a mount that
//! stops answering delays writers by its lease window and then loses its leases.

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use mortar_e2e::*;

/// The sum over the bricks of requests of `method` served so far.
fn rpcs(c: &Cluster, method: &str) -> u64 {
    (0..3)
        .map(|i| {
            let addr = c.addr(i);
            let (host, port) = addr.rsplit_once(':').unwrap();
            let metrics = format!("{host}:{}", port.parse::<u16>().unwrap() + 1000);
            let mut s = std::net::TcpStream::connect(metrics).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: mortar\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            let key =
                format!("mortar_brick_rpc_seconds_count{{brick=\"b{i}\",method=\"{method}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&key))
                .map_or(0, |v| v.trim().parse::<f64>().unwrap() as u64)
        })
        .sum()
}

/// Reads `name` through `m` until `m` holds its lease (an open then asks no brick). The
/// lease waits until the writer's mount gives up the file's lock (idle for half a second).
fn lease(c: &Cluster, m: &Mount, name: &str) -> Vec<u8> {
    let t = Instant::now();
    loop {
        let data = read(&m.p(name));
        let opens = rpcs(c, "Open");
        let again = read(&m.p(name));
        if rpcs(c, "Open") == opens && again == data {
            return data;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "no lease on {name} after 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read(p: &std::path::Path) -> Vec<u8> {
    let mut f = fs::File::open(p).unwrap();
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// The cache is used (repeated opens and reads of a small file ask no brick), and a change
/// through another mount is seen at once by the next open, and by stat within the attribute
/// timeout, for many rounds.
#[test]
fn a_cached_file_changed_elsewhere_is_seen_by_the_next_open_and_stat() {
    let c = Cluster::start(106, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    fs::write(m1.p("f"), b"first").unwrap();
    assert_eq!(lease(&c, &m2, "f"), b"first");
    let (opens, reads) = (rpcs(&c, "Open"), rpcs(&c, "Read"));
    for _ in 0..50 {
        assert_eq!(read(&m2.p("f")), b"first");
    }
    assert_eq!(
        (rpcs(&c, "Open") - opens, rpcs(&c, "Read") - reads),
        (0, 0),
        "50 opens and reads of a leased file went to the bricks"
    );
    let mut before = 5;
    for round in 0..20u32 {
        let data = format!("round {round}: {}", "x".repeat(round as usize * 100));
        // m2 has it cached (attributes and data) ...
        assert_eq!(lease(&c, &m2, "f").len(), before);
        assert_eq!(fs::metadata(m2.p("f")).unwrap().len() as usize, before);
        before = data.len();
        // ... m1 rewrites it and closes ...
        fs::write(m1.p("f"), &data).unwrap();
        // ... and m2's next open reads all of it.
        assert_eq!(
            read(&m2.p("f")),
            data.as_bytes(),
            "round {round}: stale content"
        );
        // The size through stat too, within the attribute timeout (1 s).
        let t = Instant::now();
        while fs::metadata(m2.p("f")).unwrap().len() as usize != data.len() {
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "round {round}: stale size"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // A name the bricks refuse is theirs to answer, even in a directory the cache knows
    // whole (pjdfstest found ENOENT from the cache where ENAMETOOLONG is due).
    fs::create_dir(m2.p("d")).unwrap();
    let long = m2.p(&format!("d/{}", "n".repeat(256)));
    assert_eq!(
        fs::metadata(&long).unwrap_err().raw_os_error(),
        Some(libc::ENAMETOOLONG)
    );
    // Names too: one made and one removed elsewhere are seen at once.
    assert!(!m2.p("g").exists());
    fs::write(m1.p("g"), b"g").unwrap();
    assert_eq!(read(&m2.p("g")), b"g");
    fs::remove_file(m1.p("g")).unwrap();
    assert!(
        fs::File::open(m2.p("g")).is_err(),
        "a removed name still opens"
    );
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

/// A file open in one mount through its lease keeps its data when another mount unlinks it:
/// the recall tells the bricks it is open.
#[test]
fn a_file_open_through_a_lease_survives_an_unlink_elsewhere() {
    let c = Cluster::start(107, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    fs::write(m1.p("f"), b"still here").unwrap();
    assert_eq!(lease(&c, &m2, "f"), b"still here");
    let opens = rpcs(&c, "Open");
    let f = fs::File::open(m2.p("f")).unwrap();
    assert_eq!(
        rpcs(&c, "Open"),
        opens,
        "the open was not made through the lease"
    );
    fs::remove_file(m1.p("f")).unwrap();
    // The name goes from m2 within the entry timeout (1 s) at most.
    let t = Instant::now();
    while m2.p("f").exists() {
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "the name stays in m2"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut buf = [0u8; 10];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"still here");
    drop(f);
    // The bricks let the orphan go once it is closed.
    let t = Instant::now();
    while (0..3)
        .any(|i| fs::read_dir(c.brick_dir(i).join(".mortar/orphans")).map_or(0, |d| d.count()) > 0)
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the orphan stays after the last close"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A mount that stops answering (its daemon stopped) holds a writer elsewhere back for its
/// lease window at most, and once it runs again it never serves what it had cached.
#[test]
fn a_hung_mount_delays_a_writer_by_its_lease_window_and_then_serves_nothing_stale() {
    let c = Cluster::start(108, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    fs::write(m1.p("f"), b"old").unwrap();
    assert_eq!(lease(&c, &m2, "f"), b"old");
    let pid = m2.daemon_pid().expect("m2's daemon");
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let t = Instant::now();
    fs::write(m1.p("f"), b"new").unwrap();
    let took = t.elapsed();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    // The mounts' ping timeout (2 s) is the lease window.
    assert!(
        took >= Duration::from_millis(1500),
        "the writer did not wait for the lease: {took:?}"
    );
    assert!(took < Duration::from_secs(10), "the writer waited {took:?}");
    // Woken up, m2 finds its bricks silent for longer than its ping timeout and reconnects;
    // reads may fail meanwhile, but none returns the old content.
    let t = Instant::now();
    loop {
        let r = fs::File::open(m2.p("f")).and_then(|mut f| {
            let mut v = Vec::new();
            f.read_to_end(&mut v).map(|_| v)
        });
        match r {
            Ok(v) => {
                assert_eq!(v, b"new", "a stale cached copy was served");
                break;
            }
            Err(e) => assert!(
                t.elapsed() < Duration::from_secs(10),
                "m2 does not read: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}
