//! A harness for end-to-end tests: brick processes on their own loopback addresses and
//! real FUSE mounts, torn down when dropped.
//!
//! Each test passes its own `net` byte, so tests run in parallel on 127.<net>.0.x without
//! colliding. The binaries must be built first (`cargo build --workspace`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mortar_common::volfile::{BrickSpec, Volfile};

pub fn bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// This test process's TLS: one CA for every cluster it starts, and an admin certificate
/// that the process itself (its `Volume`s) and the `mortar` commands it runs use, through
/// `MORTAR_TLS_DIR`. Returns the directory holding `ca/`, `admin/` and `client/`.
pub fn tls_home() -> &'static Path {
    static HOME: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HOME.get_or_init(|| {
        use mortar_common::tls::{Ca, Role};
        let home = std::env::temp_dir().join(format!("mortar-e2e-tls-{}", std::process::id()));
        let ca = Ca::generate("e2e").unwrap();
        ca.save(&home.join("ca")).unwrap();
        ca.write_tls_dir(&home.join("admin"), Role::Admin, "e2e", &[])
            .unwrap();
        ca.write_tls_dir(&home.join("client"), Role::Client, "e2e-mount", &[])
            .unwrap();
        // SAFETY: set once, before this process connects anywhere, by the first cluster.
        unsafe { std::env::set_var(mortar_common::tls::TLS_DIR_ENV, home.join("admin")) };
        home
    })
}

/// A TLS directory for brick `id` of this process's CA, under `dir`.
pub fn brick_tls(dir: &Path, id: &str) -> PathBuf {
    use mortar_common::tls::{Ca, Role};
    let out = dir.join(format!("tls-{id}"));
    if !out.exists() {
        Ca::load(&tls_home().join("ca"))
            .unwrap()
            .write_tls_dir(&out, Role::Brick, id, &[])
            .unwrap();
    }
    out
}

/// A raw gRPC client of the brick at `addr`, with this process's (admin) certificate.
pub async fn brick_client(
    addr: &str,
) -> mortar_proto::brick_client::BrickClient<tonic::transport::Channel> {
    tls_home();
    let ch = mortar_common::tls::brick_endpoint(addr)
        .unwrap()
        .connect()
        .await
        .unwrap();
    mortar_proto::brick_client::BrickClient::new(ch).max_decoding_message_size(64 << 20)
}

/// A session of a raw client's own (locks and opens need one); it lasts while this lives:
/// a task pings for it (a brick ends a session that stops pinging) and reads what the
/// brick sends (and one that stops reading).
pub struct RawSession {
    pub id: Vec<u8>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for RawSession {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

/// Opens a session on `b` as client `name`.
pub async fn raw_session(
    b: &mut mortar_proto::brick_client::BrickClient<tonic::transport::Channel>,
    name: &str,
) -> RawSession {
    use mortar_proto::{SessionIn, session_in::Msg};
    let id = mortar_common::gfid::Gfid::random().to_vec();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(SessionIn {
        msg: Some(Msg::Hello(mortar_proto::Hello {
            session: id.clone(),
            client: name.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = b
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let keeper = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        for n in 0u64.. {
            tokio::select! {
                _ = tick.tick() => {
                    if tx.send(SessionIn { msg: Some(Msg::Ping(n)) }).await.is_err() {
                        return;
                    }
                }
                m = inbound.message() => if !matches!(m, Ok(Some(_))) {
                    return;
                },
            }
        }
    });
    RawSession { id, keeper }
}

pub struct Cluster {
    pub dir: PathBuf,
    tmp: Option<tempfile::TempDir>,
    pub net: u8,
    pub vol: Volfile,
    bricks: Vec<Option<Child>>,
    /// Plain TCP (`--insecure-plaintext`), as the benchmarks run, instead of mutual TLS.
    plain: bool,
}

impl Cluster {
    pub fn host(&self, i: usize) -> String {
        format!("127.{}.0.{}", self.net, 11 + i)
    }

    pub fn addr(&self, i: usize) -> String {
        format!("{}:24100", self.host(i))
    }

    /// `HOST:PORT:/data` of the first brick in the current volfile.
    pub fn target(&self) -> String {
        format!("{}:/data", self.vol.bricks[0].address)
    }

    pub fn brick_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("b{i}"))
    }

    pub fn volfile_path(&self) -> PathBuf {
        self.dir.join("volfile.yaml")
    }

    /// Starts `n` bricks and waits until each answers.
    pub fn start(net: u8, n: usize) -> Cluster {
        Cluster::start_as(net, n, false)
    }

    /// Like `start`, with bricks, mounts and tools on plain TCP (`--insecure-plaintext`).
    pub fn start_plain(net: u8, n: usize) -> Cluster {
        Cluster::start_as(net, n, true)
    }

    /// `bin(name)` as this cluster's tools run: without this process's TLS on a plain one.
    fn tool(&self, name: &str) -> Command {
        let mut cmd = Command::new(bin(name));
        if self.plain {
            cmd.env_remove(mortar_common::tls::TLS_DIR_ENV);
        }
        cmd
    }

    fn start_as(net: u8, n: usize, plain: bool) -> Cluster {
        tls_home();
        let tmp = tempfile::Builder::new()
            .prefix("mortar-e2e")
            .tempdir()
            .unwrap();
        let mut c = Cluster {
            dir: tmp.path().to_path_buf(),
            tmp: Some(tmp),
            net,
            vol: Volfile {
                volume: "data".into(),
                generation: 1,
                bricks: vec![],
                ping_timeout: None,
            },
            bricks: vec![],
            plain,
        };
        c.vol.bricks = (0..n)
            .map(|i| BrickSpec {
                id: format!("b{i}"),
                address: c.addr(i),
            })
            .collect();
        std::fs::write(c.volfile_path(), c.vol.to_yaml()).unwrap();
        for i in 0..n {
            c.bricks.push(None);
            c.restart(i);
        }
        c
    }

    /// (Re)starts brick `i` on its directory (killing it first if it runs) and waits until
    /// it answers.
    pub fn restart(&mut self, i: usize) {
        self.restart_with(i, &[]);
    }

    /// Like `restart`, with extra `mortar-brick` arguments.
    pub fn restart_with(&mut self, i: usize, extra: &[&str]) {
        self.start_brick(i, extra, &[], &self.volfile_path());
    }

    /// Like `restart`, following this volfile instead of the cluster's.
    pub fn restart_on(&mut self, i: usize, volfile: &Path) {
        while self.bricks.len() <= i {
            self.bricks.push(None);
        }
        self.start_brick(i, &[], &[], volfile);
    }

    /// Like `restart`, with extra environment variables for the brick.
    pub fn restart_env(&mut self, i: usize, env: &[(&str, &str)]) {
        self.start_brick(i, &[], env, &self.volfile_path());
    }

    fn start_brick(&mut self, i: usize, extra: &[&str], env: &[(&str, &str)], volfile: &Path) {
        // A restart of a brick still running stops it first: a second process would fail on
        // the port in use, and the first one would be left behind, untracked.
        self.kill(i);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("b{i}.log")))
            .unwrap();
        let mut cmd = self.tool("mortar-brick");
        if self.plain {
            cmd.arg("--insecure-plaintext");
        } else {
            cmd.arg("--tls-dir")
                .arg(brick_tls(&self.dir, &format!("b{i}")));
        }
        let child = cmd
            .args([
                "--id",
                &format!("b{i}"),
                "--listen",
                &self.addr(i),
                "--log-level",
                "info,mortar_brick=debug",
            ])
            .arg("--dir")
            .arg(self.brick_dir(i))
            .arg("--volfile")
            .arg(volfile)
            .args(["--session-timeout", "4", "--heal-interval", "1"])
            .args(extra)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.bricks[i] = Some(child);
        let t = Instant::now();
        let sa: std::net::SocketAddr = self.addr(i).parse().unwrap();
        while std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(500)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "brick b{i} did not start; log:\n{}",
                self.log(i)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cuts brick `i` off the network (iptables drops every packet to or from its address,
    /// silently, as a partition does) until the guard is dropped. The brick keeps running.
    pub fn partition(&self, i: usize) -> Partition {
        let host = self.host(i);
        let rules = vec![
            vec!["INPUT".to_string(), "-d".into(), host.clone()],
            vec!["INPUT".to_string(), "-s".into(), host],
        ];
        for r in &rules {
            iptables("-I", r);
        }
        Partition { rules }
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("b{i}.log"))).unwrap_or_default()
    }

    pub fn pid(&self, i: usize) -> i32 {
        self.bricks[i].as_ref().expect("brick running").id() as i32
    }

    pub fn signal(&self, i: usize, sig: i32) {
        // SAFETY: kill(2) on our own child.
        assert_eq!(unsafe { libc::kill(self.pid(i), sig) }, 0);
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.bricks[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Mounts the volume (daemonised, as a user would) with extra `-o` options and
    /// `ping-timeout=2`.
    pub fn mount(&self, name: &str, opts: &str) -> Mount {
        self.mount_with(name, opts, Some(2))
    }

    /// Like `mount`, with `-o ping-timeout=SECS`, or without that option (`None`): then the
    /// volfile's `ping-timeout` (or the default) applies.
    pub fn mount_with(&self, name: &str, opts: &str, ping_timeout: Option<u64>) -> Mount {
        let path = self.dir.join(name);
        std::fs::create_dir_all(&path).unwrap();
        let mut cmd = self.tool("mortar-mount");
        // The client certificate of this process's CA, unless the options name another.
        if !self.plain && !opts.split(',').any(|o| o.starts_with("tls-dir=")) {
            cmd.arg("--tls-dir").arg(tls_home().join("client"));
        }
        cmd.arg(self.target())
            .arg(&path)
            .arg("--log-file")
            .arg(self.dir.join(format!("{name}.log")));
        let mut o = format!("backup-volfile-servers={}:{}", self.host(1), self.host(2));
        if let Some(secs) = ping_timeout {
            o = format!("ping-timeout={secs},{o}");
        }
        if let Ok(level) = std::env::var("MORTAR_E2E_MOUNT_LOG") {
            o = format!("{o},log-level={level}");
        }
        if !opts.is_empty() {
            o = format!("{o},{opts}");
        }
        let out = cmd.arg("-o").arg(o).output().unwrap();
        assert!(
            out.status.success(),
            "mortar-mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { path }
    }

    /// Runs `mortar verify`; returns whether all copies agree, and what it printed.
    pub fn verify(&self, up_only: bool) -> (bool, String) {
        let mut cmd = self.tool("mortar");
        cmd.args(["verify", &self.target()]);
        if up_only {
            cmd.arg("--up-only");
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Waits until no brick has heal entries left and every copy agrees; returns how long
    /// that took. Panics with the differences after `limit`.
    pub fn wait_healed(&self, limit: Duration) -> Duration {
        let t = Instant::now();
        loop {
            let pending = self.heal_pending();
            if pending == 0 {
                let (ok, out) = self.verify(false);
                if ok {
                    return t.elapsed();
                }
                if t.elapsed() > limit {
                    panic!("heal done but copies differ:\n{out}");
                }
            }
            if t.elapsed() > limit {
                let (_, out) = self.verify(false);
                panic!(
                    "heal not done after {limit:?}: {pending} entries pending\n{out}\n{}",
                    self.heal_info()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `mortar heal info` output.
    pub fn heal_info(&self) -> String {
        let out = self
            .tool("mortar")
            .args(["heal", "info", &self.target()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Entries pending heal over all bricks (a brick that does not answer counts as one).
    pub fn heal_pending(&self) -> usize {
        self.heal_pending_at(&self.target())
    }

    /// Like `heal_pending`, for the volume as the brick at `target` (`HOST:PORT:/data`) sees it.
    pub fn heal_pending_at(&self, target: &str) -> usize {
        let out = self
            .tool("mortar")
            .args(["heal", "info", "--json", target])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return usize::MAX;
        }
        text.matches("\"gfid\"").count() + text.matches("\"connected\": false").count()
    }

    /// Writes a new volfile generation with these bricks (ids b0.., addresses on our net).
    pub fn set_bricks(&mut self, ids: &[usize]) {
        self.vol.generation += 1;
        self.vol.bricks = ids
            .iter()
            .map(|i| BrickSpec {
                id: format!("b{i}"),
                address: self.addr(*i),
            })
            .collect();
        self.write_volfile();
        while self.bricks.len() < ids.iter().max().unwrap() + 1 {
            self.bricks.push(None);
        }
    }

    /// Writes a new volfile generation with this `ping-timeout` (`None`: without the key).
    pub fn set_ping_timeout(&mut self, secs: Option<u64>) {
        self.vol.generation += 1;
        self.vol.ping_timeout = secs;
        self.write_volfile();
    }

    fn write_volfile(&self) {
        let tmp = self.dir.join("volfile.yaml.new");
        std::fs::write(&tmp, self.vol.to_yaml()).unwrap();
        std::fs::rename(tmp, self.volfile_path()).unwrap();
    }

    /// Connects a client library volume directly (for protocol-level tests).
    pub async fn volume(&self) -> std::sync::Arc<mortar_replication::volume::Volume> {
        let opts = mortar_replication::volume::Options {
            ping_timeout: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        mortar_replication::volume::Volume::connect(&[self.addr(0)], "data", opts)
            .await
            .unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("MORTAR_E2E_KEEP").is_some() {
            // Keep the bricks' data and every log for the post-mortem.
            if let Some(t) = self.tmp.take() {
                let dir = t.keep();
                eprintln!("test failed: cluster files kept in {}", dir.display());
                print_warnings(&dir);
            }
        }
        for i in 0..self.bricks.len() {
            if let Some(c) = &self.bricks[i] {
                // SAFETY: resume a stopped child so that it can be killed.
                unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            }
            self.kill(i);
        }
    }
}

pub struct Mount {
    pub path: PathBuf,
}

impl Mount {
    /// The pid of the process serving this mount's requests now (its holder starts another
    /// when it dies; see `mortar_client::handover`).
    pub fn daemon_pid(&self) -> Option<i32> {
        self.find_process(true)
    }

    /// The pid of the process holding this mount: when it dies, the mount dies with it.
    pub fn holder_pid(&self) -> Option<i32> {
        self.find_process(false)
    }

    fn find_process(&self, server: bool) -> Option<i32> {
        let me = self.path.to_string_lossy().into_owned();
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok())
            .find_map(|e| {
                let pid: i32 = e.file_name().to_str()?.parse().ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                let args: Vec<String> = cmd
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                (args.first()?.ends_with("mortar-mount")
                    && args.contains(&me)
                    && args.iter().any(|a| a == "--handover") == server)
                    .then_some(pid)
            })
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    pub fn unmount(&self) -> bool {
        Command::new("umount")
            .arg(&self.path)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if is_mounted(&self.path) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// CI keeps only the test's output: show what the daemons complained about.
fn print_warnings(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .collect();
        eprintln!("--- {}: {} warnings/errors", log.display(), bad.len());
        for l in &bad[bad.len().saturating_sub(30)..] {
            eprintln!("{l}");
        }
    }
}

/// iptables rules that cut a brick off; removed when dropped (also when a test panics).
pub struct Partition {
    rules: Vec<Vec<String>>,
}

impl Drop for Partition {
    fn drop(&mut self) {
        for r in &self.rules {
            iptables("-D", r);
        }
    }
}

fn iptables(op: &str, rule: &[String]) {
    let st = Command::new("iptables")
        .arg(op)
        .args(rule)
        .args(["-m", "comment", "--comment", "mortar-e2e", "-j", "DROP"])
        .status()
        .expect("iptables (the tests install it)");
    assert!(st.success(), "iptables {op} {rule:?} failed");
}

pub fn is_mounted(p: &Path) -> bool {
    mortar_client::local::is_mounted(p)
}

/// Deterministic bytes for content checks.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
