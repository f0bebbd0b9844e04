//! Bulk reads (`mortar_common::bulk`): on a plain-TCP cluster a healing brick copies file
//! data from the others with sendfile and splice, on the brick's own port. Real bricks, a
//! real mount; the attacks a hostile peer on that port can try.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use mortar_common::bulk::{self, Request};
use mortar_e2e::{Cluster, pattern};

const MIB: usize = 1 << 20;

/// The value of counter `name` at the metrics endpoint of brick `i` (port + 1000).
fn brick_metric(c: &Cluster, i: usize, name: &str) -> u64 {
    let mut text = String::new();
    if let Ok(mut s) = TcpStream::connect(format!("{}:25100", c.host(i))) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
        let _ = s.read_to_string(&mut text);
    }
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// The gfid of `rel` on brick `i`, from its record xattr.
fn gfid_of(c: &Cluster, i: usize, rel: &str) -> [u8; 16] {
    let mut rec = vec![0u8; 128];
    rustix::fs::lgetxattr(c.brick_dir(i).join(rel), "trusted.mortar.rec", &mut rec).unwrap();
    rec[1..17].try_into().unwrap()
}

#[test]
fn a_wiped_brick_of_a_plain_tcp_cluster_is_refilled_over_bulk_reads() {
    let mut c = Cluster::start_plain(115, 3);
    let m = c.mount("m", "");
    let big = pattern(11, 40 * MIB + 12_345);
    std::fs::write(m.p("big"), &big).unwrap();
    // A file with a hole in the middle: the copy must read back as zeros there.
    let holey = std::fs::File::create(m.p("holey")).unwrap();
    use std::os::unix::fs::FileExt;
    holey.write_all_at(&pattern(12, MIB), 0).unwrap();
    holey
        .write_all_at(&pattern(13, MIB), 9 * MIB as u64)
        .unwrap();
    drop(holey);
    for f in 0..20 {
        std::fs::write(m.p(&format!("small{f}")), pattern(f, 3000)).unwrap();
    }
    let before: u64 = (0..2)
        .map(|i| brick_metric(&c, i, "mortar_brick_bulk_read_bytes_total"))
        .sum();

    c.kill(2);
    std::fs::remove_dir_all(c.brick_dir(2)).unwrap();
    c.restart(2);
    let took = c.wait_healed(Duration::from_secs(120));
    println!(
        "HEAL plain TCP, wiped brick with 50 MiB: {:.2} s",
        took.as_secs_f64()
    );

    assert!(std::fs::read(c.brick_dir(2).join("big")).unwrap() == big);
    let h = std::fs::read(c.brick_dir(2).join("holey")).unwrap();
    assert_eq!(h.len(), 10 * MIB);
    assert!(h[..MIB] == pattern(12, MIB)[..] && h[9 * MIB..] == pattern(13, MIB)[..]);
    assert!(h[MIB..9 * MIB].iter().all(|b| *b == 0));
    // The large files' data came over bulk connections, not through the Read RPC.
    let sent: u64 = (0..2)
        .map(|i| brick_metric(&c, i, "mortar_brick_bulk_read_bytes_total"))
        .sum();
    assert!(
        sent - before >= big.len() as u64,
        "{} bytes over bulk connections",
        sent - before
    );
    assert!(!c.log(2).contains("bulk reads unavailable"), "{}", c.log(2));
    // Only the healed copy left: the mount reads it.
    c.kill(0);
    c.kill(1);
    assert!(std::fs::read(m.p("big")).unwrap() == big);
}

/// A connection to brick `i` that has sent the magic.
fn bulk_conn(c: &Cluster, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(c.addr(i)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(bulk::MAGIC).unwrap();
    s
}

/// One request; the reply's (errno, n) and body, or None if the brick closed instead.
fn ask(s: &mut TcpStream, gfid: [u8; 16], offset: u64, len: u32) -> Option<(i32, Vec<u8>)> {
    s.write_all(&Request { gfid, offset, len }.encode()).ok()?;
    let mut head = [0u8; bulk::REPLY];
    s.read_exact(&mut head).ok()?;
    let (errno, n) = bulk::decode_reply(&head, len.max(1)).expect("a well-formed reply");
    let mut body = vec![0u8; n as usize];
    s.read_exact(&mut body).ok()?;
    Some((errno, body))
}

#[test]
fn hostile_peers_on_the_bulk_path_get_errors_and_a_bounded_cost() {
    let c = Cluster::start_plain(116, 3);
    let m = c.mount("m", "");
    std::fs::write(m.p("f"), pattern(5, 100_000)).unwrap();
    std::fs::create_dir(m.p("d")).unwrap();
    let f = gfid_of(&c, 0, "f");
    let d = gfid_of(&c, 0, "d");

    // Reads within the file, past its end, of what is not a file, of no inode: answered,
    // and the connection goes on.
    let mut s = bulk_conn(&c, 0);
    assert_eq!(
        ask(&mut s, f, 99_000, 4096),
        Some((0, pattern(5, 100_000)[99_000..].to_vec()))
    );
    assert_eq!(ask(&mut s, f, 1 << 40, 4096), Some((0, vec![])));
    assert_eq!(ask(&mut s, d, 0, 10), Some((libc::EISDIR, vec![])));
    assert_eq!(ask(&mut s, [0xab; 16], 0, 10), Some((libc::ENOENT, vec![])));
    let root = mortar_common::gfid::Gfid::ROOT.0;
    assert_eq!(ask(&mut s, root, 0, 10), Some((libc::EISDIR, vec![])));
    // A length the protocol forbids: EINVAL, then the connection ends.
    for (offset, len) in [(0, 0), (0, bulk::MAX_LEN + 1), (u64::MAX - 3, 10)] {
        let mut s = bulk_conn(&c, 0);
        assert_eq!(ask(&mut s, f, offset, len), Some((libc::EINVAL, vec![])));
        let mut rest = [0u8; 1];
        assert_eq!(s.read(&mut rest).unwrap(), 0, "closed after EINVAL");
    }
    // Half a request, then silence, from many peers: each costs a thread up to the cap;
    // past it the brick closes the connection at once, and the mount is not slowed down.
    let idle: Vec<TcpStream> = (0..mortar_brick::bulk::MAX_CONNECTIONS)
        .map(|_| {
            let mut s = bulk_conn(&c, 0);
            s.write_all(&[1, 2, 3]).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let mut extra = bulk_conn(&c, 0);
    let t = std::time::Instant::now();
    let mut buf = [0u8; 1];
    assert!(
        matches!(extra.read(&mut buf), Ok(0) | Err(_)),
        "refused past the cap"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
    std::fs::write(m.p("still"), b"writable").unwrap();
    assert_eq!(std::fs::read(m.p("still")).unwrap(), b"writable");
    drop(idle);

    // A TLS brick has no bulk service: the magic gets no bulk answer.
    let tls = Cluster::start(117, 1);
    let mut s = bulk_conn(&tls, 0);
    let _ = s.write_all(
        &Request {
            gfid: f,
            offset: 0,
            len: 10,
        }
        .encode(),
    );
    let mut head = [0u8; bulk::REPLY];
    match s.read_exact(&mut head) {
        Err(_) => {}
        Ok(()) => assert!(bulk::decode_reply(&head, 10).is_err(), "{head:?}"),
    }
}
