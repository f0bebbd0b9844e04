//! Who may talk to a brick, and what each may do: mutual TLS with the cluster's CA, and the
//! roles its certificates state (SECURITY.md).

use mortar_common::gfid::Gfid;
use mortar_common::tls::{Ca, Role, TlsFiles};
use mortar_e2e::{Cluster, tls_home};
use mortar_proto as pb;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

type Client = pb::brick_client::BrickClient<tonic::transport::Channel>;

/// A client of `addr` with the TLS of `tls` (None: plain TCP); the error if it cannot
/// even make a first request.
async fn client(addr: &str, tls: Option<ClientTlsConfig>) -> Result<Client, String> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut e = Endpoint::from_shared(format!("{scheme}://{addr}")).unwrap();
    if let Some(t) = tls {
        e = e.tls_config(t).unwrap();
    }
    let ch = e.connect().await.map_err(|e| format!("{e:?}"))?;
    let mut c = pb::brick_client::BrickClient::new(ch);
    c.health(pb::Empty {}).await.map_err(|e| format!("{e:?}"))?;
    Ok(c)
}

/// A request a mount's certificate must not get answered.
fn denied<T: std::fmt::Debug>(r: Result<T, tonic::Status>, what: &str) {
    match r {
        Err(s) if s.code() == tonic::Code::PermissionDenied => {}
        other => panic!("{what} from a mount's certificate: {other:?}"),
    }
}

fn config(dir: &std::path::Path) -> ClientTlsConfig {
    TlsFiles::load(dir).unwrap().client()
}

#[tokio::test(flavor = "multi_thread")]
async fn strangers_are_refused_and_a_mount_certificate_cannot_administer() {
    let c = tokio::task::spawn_blocking(|| Cluster::start(95, 3))
        .await
        .unwrap();
    let addr = c.addr(0);
    let home = tls_home();

    // Plain TCP, TLS without a certificate, and a certificate of another CA: no request
    // of theirs is answered.
    assert!(client(&addr, None).await.is_err(), "plain TCP was served");
    let ca_only = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(home.join("ca/ca.crt")).unwrap(),
        ))
        .domain_name(mortar_common::tls::BRICK_SERVER_NAME);
    assert!(
        client(&addr, Some(ca_only)).await.is_err(),
        "a client without a certificate was served"
    );
    let stranger_dir = c.dir.join("stranger");
    let other = Ca::generate("other").unwrap();
    other
        .write_tls_dir(&stranger_dir, Role::Admin, "intruder", &[])
        .unwrap();
    // It trusts our CA (it knows whom it calls) but shows a certificate of its own CA.
    let stranger = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(home.join("ca/ca.crt")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(stranger_dir.join("tls.crt")).unwrap(),
            std::fs::read(stranger_dir.join("tls.key")).unwrap(),
        ))
        .domain_name(mortar_common::tls::BRICK_SERVER_NAME);
    assert!(
        client(&addr, Some(stranger)).await.is_err(),
        "a certificate of another CA was served"
    );

    // A mount's certificate: file operations yes, administration no.
    let mut mount = client(&addr, Some(config(&home.join("client"))))
        .await
        .expect("a mount's certificate is served");
    let g = Gfid::random().to_vec();
    denied(
        mount
            .heal(pb::HealReq {
                session: vec![0; 16],
                gfid: g.clone(),
                ctime_ns: 0,
                op: Some(pb::heal_req::Op::Truncate(0)),
            })
            .await,
        "a heal step",
    );
    denied(
        mount
            .heal_index(pb::HealIndexReq {
                remove: vec![g.clone()],
                ..Default::default()
            })
            .await,
        "taking an entry off the heal index",
    );
    denied(
        mount
            .heal_index(pb::HealIndexReq {
                split_brain: vec![g.clone()],
                ..Default::default()
            })
            .await,
        "a split-brain mark",
    );
    denied(
        mount
            .unlock(pb::UnlockReq {
                session: vec![0; 16],
                gfids: vec![g.clone()],
                healed: true,
                ..Default::default()
            })
            .await,
        "an unlock as healed",
    );
    denied(
        mount
            .mutate(pb::MutateReq {
                session: vec![0; 16],
                op: Some(pb::mutate_req::Op::SetQuota(pb::SetQuota {
                    gfid: Gfid::ROOT.to_vec(),
                    ..Default::default()
                })),
                ..Default::default()
            })
            .await,
        "a quota change",
    );
    // Asking for a heal is every client's right.
    mount
        .heal_index(pb::HealIndexReq {
            add: vec![g.clone()],
            ..Default::default()
        })
        .await
        .expect("a mount queues a heal");

    // An admin's certificate may administer.
    let mut admin = client(&addr, Some(config(&home.join("admin"))))
        .await
        .unwrap();
    admin
        .heal_index(pb::HealIndexReq {
            remove: vec![g.clone()],
            ..Default::default()
        })
        .await
        .expect("an admin takes an entry off the heal index");

    // A lock term far in the future would fence off every later writer: refused.
    let raw = mortar_e2e::raw_session(&mut mount, "term test").await;
    let session = raw.id.clone();
    let r = mount
        .lock(pb::LockReq {
            session: session.clone(),
            gfids: vec![Gfid::ROOT.to_vec()],
            term: u64::MAX,
            wait: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.errno, libc::EINVAL, "a lock with term 2^64-1");

    // The cluster still works for its own mount.
    let m = c.mount("m", "");
    std::fs::write(m.p("after"), b"still serving").unwrap();
    assert_eq!(std::fs::read(m.p("after")).unwrap(), b"still serving");
}

/// Descriptors process `pid` has open.
fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn twenty_thousand_idle_connections_do_not_stop_a_mount() {
    let c = Cluster::start(96, 3);
    let m = c.mount("m", "");
    std::fs::write(m.p("before"), b"x").unwrap();
    let baseline = fds(c.pid(0));
    // Two holders of 10,000 connections each (one process could not hold 20,000 under a
    // limit of 20,000 descriptors), spread over the three bricks, that never say a word.
    let addrs: Vec<String> = (0..3).map(|i| c.addr(i)).collect();
    let holder = r#"
import socket, sys
addrs, n = sys.argv[1:-1], int(sys.argv[-1])
socks = []
for k in range(n):
    h, p = addrs[k % len(addrs)].rsplit(':', 1)
    s = socket.socket()
    s.connect((h, int(p)))
    socks.append(s)
print('ready', flush=True)
sys.stdin.read()
"#;
    let mut holders: Vec<std::process::Child> = (0..2)
        .map(|_| {
            std::process::Command::new("python3")
                .arg("-c")
                .arg(holder)
                .args(&addrs)
                .arg("10000")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for h in &mut holders {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(h.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "a holder could not open its connections"
        );
    }
    // They reached the brick (it accepts them as fast as it can).
    let t = std::time::Instant::now();
    let mut held = fds(c.pid(0));
    while held < baseline + 5000 && t.elapsed() < std::time::Duration::from_secs(5) {
        std::thread::sleep(std::time::Duration::from_millis(100));
        held = fds(c.pid(0));
    }
    assert!(
        held > baseline + 5000,
        "the connections did not reach brick b0 ({baseline} -> {held} descriptors)"
    );
    // The mount works, and a new mount too, while they are held.
    for i in 0..200 {
        std::fs::write(m.p(&format!("f{i}")), format!("file {i}")).unwrap();
    }
    let m2 = c.mount("m2", "");
    for i in 0..200 {
        assert_eq!(
            std::fs::read_to_string(m2.p(&format!("f{i}"))).unwrap(),
            format!("file {i}")
        );
    }
    // A connection without a handshake is closed after the handshake timeout (some slack
    // for a loaded machine).
    let t = std::time::Instant::now();
    let mut after = fds(c.pid(0));
    while after >= baseline + 500
        && t.elapsed() < mortar_common::tls::HANDSHAKE_TIMEOUT + std::time::Duration::from_secs(30)
    {
        std::thread::sleep(std::time::Duration::from_millis(500));
        after = fds(c.pid(0));
    }
    assert!(
        after < baseline + 500,
        "idle connections still held: {baseline} -> {held} -> {after} descriptors"
    );
    for mut h in holders {
        let _ = h.kill();
        let _ = h.wait();
    }
    std::fs::write(m.p("after"), b"y").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_cannot_hold_locks_or_opens_without_bound() {
    let c = tokio::task::spawn_blocking(|| {
        let mut c = Cluster::start(97, 3);
        // The caps are 65,536 of each; 100 here, so that the test is quick.
        c.kill(0);
        c.restart_env(0, &[("MORTAR_TEST_SESSION_CAP", "100")]);
        c
    })
    .await
    .unwrap();
    let (m, names) = tokio::task::spawn_blocking({
        let m = c.mount("m", "");
        move || {
            let names: Vec<String> = (0..101).map(|i| format!("f{i}")).collect();
            for n in &names {
                std::fs::write(m.p(n), b"x").unwrap();
            }
            (m, names)
        }
    })
    .await
    .unwrap();
    let mut b = mortar_e2e::brick_client(&c.addr(0)).await;
    let raw = mortar_e2e::raw_session(&mut b, "greedy").await;
    let session = raw.id.clone();

    // Locks: six batches of 16 fit under 100, the seventh does not.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let mut answers = Vec::new();
    for k in 0..7 {
        let r = b
            .lock(pb::LockReq {
                session: session.clone(),
                gfids: (0..16).map(|_| Gfid::random().to_vec()).collect(),
                term: now + k,
                wait: false,
            })
            .await
            .unwrap()
            .into_inner();
        answers.push(r.errno);
    }
    assert_eq!(answers, [0, 0, 0, 0, 0, 0, libc::ENOLCK], "lock answers");

    // Opens: 100 files, then EMFILE for the 101st; the first again is fine.
    let mut gfids = Vec::new();
    for n in &names {
        let r = b
            .lookup(pb::LookupReq {
                parent: Gfid::ROOT.to_vec(),
                name: n.clone().into_bytes(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        gfids.push(r.entry.expect("looked up").gfid);
    }
    let open = |g: Vec<u8>| {
        let mut b = b.clone();
        let session = session.clone();
        async move {
            b.open(pb::OpenReq { session, gfid: g })
                .await
                .unwrap()
                .into_inner()
                .errno
        }
    };
    for g in &gfids[..100] {
        assert_eq!(open(g.clone()).await, 0);
    }
    assert_eq!(
        open(gfids[100].clone()).await,
        libc::EMFILE,
        "the 101st open"
    );
    assert_eq!(open(gfids[0].clone()).await, 0, "a file already open");

    // Other sessions are not affected: the mount still works on every brick.
    tokio::task::spawn_blocking(move || {
        std::fs::write(m.p("after"), b"fine").unwrap();
        assert_eq!(std::fs::read(m.p("after")).unwrap(), b"fine");
    })
    .await
    .unwrap();
}

/// A request body that sends its first `sent` bytes and then never ends: the slowest of
/// clients, holding whatever the brick set aside for the message.
struct Stalled(Option<pb::Bytes>);

impl http_body::Body for Stalled {
    type Data = pb::Bytes;
    type Error = tonic::Status;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<pb::Bytes>, tonic::Status>>> {
        match self.0.take() {
            Some(d) => std::task::Poll::Ready(Some(Ok(http_body::Frame::data(d)))),
            None => std::task::Poll::Pending,
        }
    }
}

fn rss_mib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb / 1024
}

/// One connection opens 48 writes that each announce an 8 MiB message, send all of it but
/// its last byte, and stall. A brick without a cap would hold them all (HTTP/2 allows
/// hundreds of such streams per connection); this one sets aside 256 MiB per connection,
/// takes 32 of them and refuses the other 16 at once with RESOURCE_EXHAUSTED. Meanwhile a
/// mount goes on working through that brick.
#[tokio::test(flavor = "multi_thread")]
async fn a_connection_cannot_hold_more_than_its_budget_of_request_bytes() {
    use tower::{Service, ServiceExt};
    let c = tokio::task::spawn_blocking(|| Cluster::start(100, 3))
        .await
        .unwrap();
    let pid = c.pid(0);
    let before = rss_mib(pid);
    let ch = mortar_common::tls::brick_endpoint(&c.addr(0))
        .unwrap()
        .connect()
        .await
        .unwrap();
    const MESSAGE: usize = 8 << 20;
    let mut replies = Vec::new();
    for _ in 0..48 {
        let mut data = vec![0u8; MESSAGE + 5 - 1];
        data[1..5].copy_from_slice(&(MESSAGE as u32).to_be_bytes());
        let req = http::Request::post("https://mortar-brick/mortar.v1.Brick/Mutate")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(Stalled(Some(data.into()))))
            .unwrap();
        let mut ch = ch.clone();
        ch.ready().await.unwrap();
        replies.push(tokio::spawn(ch.call(req)));
    }
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    let mut refused = 0;
    for r in &replies {
        if r.is_finished() {
            refused += 1;
        }
    }
    let mut statuses = Vec::new();
    for r in replies.into_iter().filter(|r| r.is_finished()) {
        let resp = r.await.unwrap().unwrap();
        statuses.push(
            resp.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string()),
        );
    }
    assert_eq!(refused, 16, "answered at once: {statuses:?}");
    assert!(
        statuses.iter().all(|s| s.as_deref() == Some("8")),
        "refusals are RESOURCE_EXHAUSTED: {statuses:?}"
    );
    let during = rss_mib(pid);
    eprintln!("brick RSS {before} MiB before, {during} MiB with 32 stalled 8 MiB requests");
    assert!(
        during < before + 600,
        "the brick holds {during} MiB (was {before})"
    );
    tokio::task::spawn_blocking(move || {
        let m = c.mount("m", "");
        std::fs::write(m.p("f"), vec![7u8; 3 << 20]).unwrap();
        assert_eq!(std::fs::read(m.p("f")).unwrap(), vec![7u8; 3 << 20]);
    })
    .await
    .unwrap();
    drop(ch);
}

/// Certificates are renewed (the operator's Secrets, `mortar certs issue`) while mounts run
/// for months: a running mount presents its renewed certificate at its next connection,
/// instead of the one it started with until that expires and every reconnect fails.
#[test]
fn a_running_mount_presents_its_renewed_certificate_when_it_reconnects() {
    use mortar_common::tls::{CA_FILE, CERT_FILE, KEY_FILE};
    let mut c = Cluster::start(103, 3);
    let ca = Ca::load(&tls_home().join("ca")).unwrap();
    let dir = c.dir.join("mount-tls");
    ca.write_tls_dir(&dir, Role::Client, "first", &[]).unwrap();
    // `-o tls-dir=` wins over `MORTAR_TLS_DIR`, which this process sets (to its admin
    // certificate) as the CSI node does: the mounts it starts inherited that and presented
    // the node's own certificate instead of the cluster's.
    let m = c.mount("m", &format!("tls-dir={}", dir.display()));
    std::fs::write(m.p("f"), b"one").unwrap();
    assert!(
        c.log(0).contains("cert=client/first"),
        "the brick names the mount's certificate:\n{}",
        c.log(0)
    );
    // Renewed in place, each file replaced whole (as a Secret's new data arrives).
    let renewed = c.dir.join("renewed");
    ca.write_tls_dir(&renewed, Role::Client, "second", &[])
        .unwrap();
    for f in [CA_FILE, CERT_FILE, KEY_FILE] {
        std::fs::rename(renewed.join(f), dir.join(f)).unwrap();
    }
    // The mount's next connection to b0.
    c.kill(0);
    c.restart(0);
    let t = std::time::Instant::now();
    while !c.log(0).contains("cert=client/second") {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(20),
            "the mount came back with its old certificate:\n{}",
            c.log(0)
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::fs::write(m.p("f"), b"two").unwrap();
    assert_eq!(std::fs::read(m.p("f")).unwrap(), b"two");
}
