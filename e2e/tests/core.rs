//! The replicated volume core, end to end: real bricks, real FUSE mounts (root, /dev/fuse).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use mortar_common::gfid::Gfid;
use mortar_e2e::{Cluster, pattern};
use mortar_proto as pb;
use sha2::{Digest, Sha256};

/// What a path looks like through a mount, for comparing two views of one tree.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    ino: u64,
    sha: Vec<u8>,
    target: String,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn walk(root: &Path) -> BTreeMap<String, Seen> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let md = fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else {
                "special"
            };
            let mut xattrs = Vec::new();
            if !ft.is_symlink() {
                let mut buf = vec![0u8; 4096];
                let n = rustix::fs::listxattr(&p, &mut buf[..]).unwrap();
                for name in buf[..n].split(|b| *b == 0).filter(|s| !s.is_empty()) {
                    let name = String::from_utf8(name.to_vec()).unwrap();
                    let mut v = vec![0u8; 4096];
                    let k = rustix::fs::getxattr(&p, name.as_str(), &mut v[..]).unwrap();
                    v.truncate(k);
                    xattrs.push((name, v));
                }
                xattrs.sort();
            }
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            out.insert(
                rel,
                Seen {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if ft.is_dir() { 0 } else { md.len() },
                    nlink: if ft.is_dir() { 0 } else { md.nlink() },
                    ino: md.ino(),
                    sha: if ft.is_file() {
                        Sha256::digest(fs::read(&p).unwrap()).to_vec()
                    } else {
                        vec![]
                    },
                    target: if ft.is_symlink() {
                        fs::read_link(&p).unwrap().to_string_lossy().into_owned()
                    } else {
                        String::new()
                    },
                    xattrs,
                },
            );
        }
    }
    out
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn tree_reads_back_through_a_second_mount_and_copies_agree() {
    let c = Cluster::start(21, 3);
    let a = c.mount("a", "");
    let b = c.mount("b", "");
    // Hundreds of files and directories, with every kind of change.
    for d in 0..20 {
        let dir = a.p(&format!("d{d}/sub"));
        fs::create_dir_all(&dir).unwrap();
        for f in 0..15 {
            fs::write(
                dir.join(format!("f{f}")),
                pattern(d * 100 + f, (f as usize) * 700),
            )
            .unwrap();
        }
    }
    for d in 0..20 {
        let p = |s: &str| a.p(&format!("d{d}/{s}"));
        std::os::unix::fs::symlink(format!("sub/f{}", d % 15), p("link")).unwrap();
        fs::hard_link(p("sub/f1"), p("hard")).unwrap();
        fs::rename(p("sub/f2"), p("renamed")).unwrap();
        fs::rename(p("sub/f3"), a.p(&format!("d{}/moved-in", (d + 1) % 20))).unwrap();
        fs::remove_file(p("sub/f4")).unwrap();
        fs::set_permissions(p("sub/f5"), fs::Permissions::from_mode(0o640)).unwrap();
        std::os::unix::fs::chown(p("sub/f6"), Some(1000 + d as u32), Some(2000)).unwrap();
        rustix::fs::setxattr(
            p("sub/f7"),
            "user.tag",
            format!("v{d}").as_bytes(),
            rustix::fs::XattrFlags::empty(),
        )
        .unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(p("sub/f8"))
            .unwrap()
            .set_len(123)
            .unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(p("sub/f9"))
            .unwrap()
            .set_len(20_000)
            .unwrap();
        // Replace an existing target.
        fs::rename(p("sub/f10"), p("sub/f11")).unwrap();
    }
    fs::remove_dir_all(a.p("d19")).unwrap();
    fs::create_dir(a.p("empty")).unwrap();
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        a.p("fifo"),
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();

    let via_a = walk(&a.path);
    let via_b = walk(&b.path);
    assert!(via_a.len() > 300, "only {} paths", via_a.len());
    assert_eq!(via_a, via_b, "the second mount sees a different tree");
    // Spot checks against what was written, not only between mounts.
    assert_eq!(fs::read(b.p("d3/renamed")).unwrap(), pattern(302, 1400));
    assert_eq!(fs::read(b.p("d4/moved-in")).unwrap(), pattern(303, 2100));
    assert_eq!(fs::read(b.p("d3/sub/f11")).unwrap(), pattern(310, 7000));
    assert!(!b.p("d3/sub/f10").exists() && !b.p("d3/sub/f4").exists() && !b.p("d19").exists());
    assert_eq!(
        fs::read_link(b.p("d5/link")).unwrap().to_str().unwrap(),
        "sub/f5"
    );
    assert_eq!(fs::metadata(b.p("d5/hard")).unwrap().nlink(), 2);
    assert_eq!(
        fs::metadata(b.p("d5/hard")).unwrap().ino(),
        fs::metadata(b.p("d5/sub/f1")).unwrap().ino()
    );
    assert_eq!(
        fs::metadata(b.p("d5/sub/f5")).unwrap().mode() & 0o777,
        0o640
    );
    assert_eq!(fs::metadata(b.p("d5/sub/f6")).unwrap().uid(), 1005);
    assert_eq!(fs::metadata(b.p("d5/sub/f8")).unwrap().len(), 123);
    assert_eq!(
        fs::read(b.p("d5/sub/f9")).unwrap()[9 * 700..],
        vec![0u8; 20_000 - 9 * 700][..]
    );
    let (ok, out) = c.verify(false);
    assert!(ok, "verify found differences:\n{out}");
}

#[test]
fn errors_are_the_right_errno() {
    let c = Cluster::start(22, 3);
    let m = c.mount("m", "");
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/f"), b"x").unwrap();
    fs::write(m.p("g"), b"y").unwrap();
    let e = |r: std::io::Result<()>| errno_of(&r.unwrap_err());
    assert_eq!(e(fs::create_dir(m.p("d"))), libc::EEXIST);
    assert_eq!(e(fs::remove_dir(m.p("d"))), libc::ENOTEMPTY);
    assert_eq!(e(fs::remove_file(m.p("nope"))), libc::ENOENT);
    assert_eq!(e(fs::remove_file(m.p("d"))), libc::EISDIR);
    assert_eq!(e(fs::remove_dir(m.p("g"))), libc::ENOTDIR);
    assert_eq!(e(fs::write(m.p("g/x"), b"")), libc::ENOTDIR);
    assert_eq!(e(fs::write(m.p(&"n".repeat(256)), b"")), libc::ENAMETOOLONG);
    assert_eq!(e(fs::rename(m.p("d"), m.p("d/f/inside"))), libc::ENOTDIR);
    assert_eq!(e(fs::rename(m.p("d"), m.p("d/inside"))), libc::EINVAL);
    assert_eq!(e(fs::hard_link(m.p("d"), m.p("dl"))), libc::EPERM);
    assert_eq!(
        e(fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.p("g"))
            .map(|_| ())),
        libc::EEXIST
    );
    let r = rustix::fs::renameat_with(
        rustix::fs::CWD,
        m.p("g"),
        rustix::fs::CWD,
        m.p("d/f"),
        rustix::fs::RenameFlags::NOREPLACE,
    );
    assert_eq!(r.unwrap_err().raw_os_error(), libc::EEXIST);
    // A non-root user is refused by permissions.
    fs::set_permissions(m.p("d"), fs::Permissions::from_mode(0o700)).unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "ls"])
        .arg(m.p("d"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    // Cross-device rename out of the mount.
    let outside = c.dir.join("outside");
    assert_eq!(e(fs::rename(m.p("g"), &outside)), libc::EXDEV);
    // statfs works and reports the bricks' file system.
    let st = rustix::fs::statvfs(&m.path).unwrap();
    assert!(st.f_blocks > 0 && st.f_namemax == 255);
    // fallocate and fsync reach the bricks.
    let f = fs::OpenOptions::new().write(true).open(m.p("g")).unwrap();
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 1 << 20).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::metadata(m.p("g")).unwrap().len(), 1 << 20);
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

#[test]
fn large_write_survives_a_brick_killed_midway() {
    let mut c = Cluster::start(23, 3);
    let m = c.mount("m", "");
    const MIB: usize = 1 << 20;
    let mut f = fs::File::create(m.p("big")).unwrap();
    let mut h = Sha256::new();
    for i in 0..256 {
        if i == 64 {
            c.kill(1);
        }
        let chunk = pattern(i as u64, MIB);
        h.update(&chunk);
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    let want = h.finalize().to_vec();
    let mut got = Sha256::new();
    let mut r = fs::File::open(m.p("big")).unwrap();
    let mut buf = vec![0u8; MIB];
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        got.update(&buf[..n]);
    }
    assert_eq!(got.finalize().to_vec(), want, "content read back differs");
    let (ok, out) = c.verify(true);
    assert!(ok, "the survivors disagree:\n{out}");
    let (ok, _) = c.verify(false);
    assert!(!ok, "verify must report the dead brick");
    let status = std::process::Command::new(mortar_e2e::bin("mortar"))
        .args(["status", &c.target()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("bricks up 2/3"), "{text}");
}

#[test]
fn without_a_majority_writes_fail_fast_and_reads_go_on() {
    let mut c = Cluster::start(24, 3);
    let m = c.mount("m", "");
    fs::write(m.p("f"), b"before").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    // A hung brick (SIGSTOP) is dropped within the ping timeout (2 s here) and writes go on.
    c.signal(2, libc::SIGSTOP);
    let t = Instant::now();
    fs::write(m.p("during-hang"), b"ok").unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(8),
        "write took {:?} with one brick hung",
        t.elapsed()
    );
    c.signal(2, libc::SIGCONT);

    let open = fs::File::open(m.p("f")).unwrap();
    c.kill(1);
    c.kill(2);
    // fsync promises a majority on disk: with one brick of three it must fail.
    let err = open
        .sync_all()
        .expect_err("fsync without a majority must fail");
    assert!(
        [libc::EROFS, libc::ENOTCONN].contains(&errno_of(&err)),
        "got {err}"
    );
    drop(open);
    let t = Instant::now();
    let err = fs::OpenOptions::new()
        .write(true)
        .open(m.p("f"))
        .and_then(|mut f| f.write_all(b"after"));
    let err = err.expect_err("a write without a majority must fail");
    assert!(
        [libc::EROFS, libc::ENOTCONN].contains(&errno_of(&err)),
        "got {err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "failing took {:?}",
        t.elapsed()
    );
    let err = fs::write(m.p("new"), b"x").expect_err("create without a majority must fail");
    assert!(
        [libc::EROFS, libc::ENOTCONN].contains(&errno_of(&err)),
        "got {err}"
    );
    assert!(fs::create_dir(m.p("d2")).is_err());
    // Reads of existing files still work, from the one brick left.
    assert_eq!(fs::read(m.p("f")).unwrap(), b"before");
    assert_eq!(fs::read(m.p("during-hang")).unwrap(), b"ok");
    assert!(fs::read_dir(m.p("d")).is_ok());
    // With a majority back, writes work again.
    c.restart(1);
    let t = Instant::now();
    loop {
        match fs::write(m.p("again"), b"y") {
            Ok(()) => break,
            Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "no recovery: {e}"),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn two_mounts_write_disjoint_ranges_of_one_file() {
    let c = Cluster::start(25, 3);
    let a = c.mount("a", "");
    let b = c.mount("b", "");
    const CHUNK: usize = 64 * 1024;
    const N: usize = 96;
    fs::File::create(a.p("shared"))
        .unwrap()
        .set_len((CHUNK * N) as u64)
        .unwrap();
    let writer = |path: std::path::PathBuf, parity: usize| {
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(path).unwrap();
            for i in (parity..N).step_by(2) {
                f.write_all_at(&pattern(i as u64, CHUNK), (i * CHUNK) as u64)
                    .unwrap();
            }
            f.sync_all().unwrap();
        })
    };
    let (ta, tb) = (writer(a.p("shared"), 0), writer(b.p("shared"), 1));
    ta.join().unwrap();
    tb.join().unwrap();
    let want: Vec<u8> = (0..N).flat_map(|i| pattern(i as u64, CHUNK)).collect();
    for m in [&a, &b] {
        let mut got = Vec::new();
        let mut f = fs::File::open(m.p("shared")).unwrap();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut got).unwrap();
        assert!(got == want, "content differs through {}", m.path.display());
    }
    let (ok, out) = c.verify(false);
    assert!(ok, "replicas differ:\n{out}");
}

#[test]
fn posix_and_bsd_locks_hold_across_mounts() {
    let c = Cluster::start(26, 3);
    let a = c.mount("a", "");
    let b = c.mount("b", "");
    fs::write(a.p("lockfile"), b"l").unwrap();
    let fa = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(a.p("lockfile"))
        .unwrap();
    let fb = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(b.p("lockfile"))
        .unwrap();
    let lk = |f: &fs::File, typ: i32, cmd: i32| {
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = typ as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        use std::os::fd::AsRawFd;
        // SAFETY: fcntl with a valid flock struct.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
        if r == 0 {
            Ok(fl)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    lk(&fa, libc::F_WRLCK, libc::F_SETLK).unwrap();
    let e = lk(&fb, libc::F_WRLCK, libc::F_SETLK).unwrap_err();
    assert!([libc::EAGAIN, libc::EACCES].contains(&errno_of(&e)), "{e}");
    let seen = lk(&fb, libc::F_WRLCK, libc::F_GETLK).unwrap();
    assert_eq!(
        seen.l_type as i32,
        libc::F_WRLCK,
        "F_GETLK must report A's lock"
    );
    // A blocking lock through B waits until A lets go.
    let t = std::thread::spawn(move || {
        let start = Instant::now();
        lk(&fb, libc::F_WRLCK, libc::F_SETLKW).unwrap();
        (start.elapsed(), fb)
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!t.is_finished(), "B got the lock while A held it");
    drop(fa); // close() releases A's POSIX locks
    let (waited, fb) = t.join().unwrap();
    assert!(waited >= Duration::from_millis(1400));
    // As on NFS, flock() is carried as a whole-file lock in the same table as fcntl locks
    // (FUSE does not tell them apart), so B's fcntl lock goes first.
    drop(fb);
    // flock: exclusive through A blocks B's non-blocking attempt.
    let ga = fs::File::open(a.p("lockfile")).unwrap();
    let gb = fs::File::open(b.p("lockfile")).unwrap();
    rustix::fs::flock(&ga, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
    let e =
        rustix::fs::flock(&gb, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap_err();
    assert_eq!(e, rustix::io::Errno::WOULDBLOCK);
    rustix::fs::flock(&ga, rustix::fs::FlockOperation::Unlock).unwrap();
    rustix::fs::flock(&gb, rustix::fs::FlockOperation::NonBlockingLockExclusive).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_names_get_clear_errors_and_the_brick_keeps_serving() {
    let c = Cluster::start(27, 3);
    let v = c.volume().await;
    let root = Gfid::ROOT;
    let create = |name: Vec<u8>| {
        let v = v.clone();
        async move {
            v.create(root, &name, pb::Kind::File, 0o644, 0, 0, 0, b"")
                .await
                .map(|_| ())
        }
    };
    let errno = |r: Result<(), mortar_common::error::Error>| r.unwrap_err().errno();
    assert_eq!(errno(create(b"a/b".to_vec()).await), libc::EINVAL);
    assert_eq!(errno(create(b"..".to_vec()).await), libc::EINVAL);
    assert_eq!(errno(create(b"../escape".to_vec()).await), libc::EINVAL);
    assert_eq!(errno(create(b"/etc/passwd".to_vec()).await), libc::EINVAL);
    assert_eq!(errno(create(b"a\0b".to_vec()).await), libc::EINVAL);
    assert_eq!(errno(create(vec![b'x'; 256]).await), libc::ENAMETOOLONG);
    assert_eq!(errno(create(b".mortar".to_vec()).await), libc::EPERM);
    assert_eq!(
        v.lookup(root, b"..").await.unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        v.lookup(root, b"x/../..").await.unwrap_err().errno(),
        libc::EINVAL
    );
    assert_eq!(
        v.lookup(root, b".mortar").await.unwrap_err().errno(),
        libc::EPERM
    );
    // A symlink made through the volume is never followed on the brick side.
    let l = v
        .create(root, b"evil", pb::Kind::Symlink, 0o777, 0, 0, 0, b"/etc")
        .await
        .unwrap();
    let lg = Gfid::from_bytes(&l.gfid).unwrap();
    assert_eq!(
        v.lookup(lg, b"passwd").await.unwrap_err().errno(),
        libc::ENOENT
    );
    assert!(v.write(lg, 0, b"x".to_vec(), false).await.is_err());
    // Nothing escaped the brick directories, and the bricks still serve.
    assert!(!c.dir.join("escape").exists());
    let f = v
        .create(root, b"fine", pb::Kind::File, 0o644, 0, 0, 0, b"")
        .await
        .unwrap();
    let g = Gfid::from_bytes(&f.gfid).unwrap();
    assert_eq!(
        v.write(g, 0, b"still serving".to_vec(), false)
            .await
            .unwrap(),
        13
    );
    assert_eq!(&v.read(g, 0, 100).await.unwrap()[..], b"still serving");
    // Malformed requests straight to a brick: a bad gfid is an error, not a crash.
    let mut b = mortar_replication::conn::connect_once(&c.addr(0), Duration::from_secs(2))
        .await
        .unwrap();
    let r = b
        .getattr(pb::GfidReq {
            gfid: vec![1, 2, 3],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.errno, libc::EINVAL);
    let r = b
        .read(pb::ReadReq {
            gfid: Gfid::random().to_vec(),
            offset: 0,
            size: 10,
            xattrs: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.errno, libc::ENOENT);
    let r = b.mutate(pb::MutateReq::default()).await;
    assert!(r.is_err() || r.unwrap().into_inner().errno != 0);
    assert!(
        mortar_client::admin::health(&c.addr(0), Duration::from_secs(2))
            .await
            .is_ok()
    );
}

#[test]
fn mount_helper_backup_servers_and_umount() {
    let c = Cluster::start(28, 3);
    let helper = Path::new("/sbin/mount.mortar");
    if !helper.exists() {
        // Missing, or left dangling by an earlier `mortar local up` of a deleted build.
        let _ = fs::remove_file(helper);
        match std::os::unix::fs::symlink(mortar_e2e::bin("mortar-mount"), helper) {
            // Another test (the quick start) linked it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            r => r.unwrap(),
        }
    }
    let dir = c.dir.join("mnt");
    fs::create_dir(&dir).unwrap();
    // The first volfile server is not there: the backup ones serve the volfile.
    let out = std::process::Command::new("mount")
        .args([
            "-t",
            "mortar",
            &format!("127.28.0.99:/data"),
            dir.to_str().unwrap(),
        ])
        .args([
            "-o",
            &format!(
                "backup-volfile-servers={}:{},ping-timeout=1",
                c.host(1),
                c.host(2)
            ),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t mortar failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(mortar_e2e::is_mounted(&dir));
    fs::write(dir.join("hello"), b"world").unwrap();
    assert_eq!(fs::read(dir.join("hello")).unwrap(), b"world");
    // umount ends the mount's processes (its holder and its server).
    let daemons = || {
        fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| fs::read(e.unwrap().path().join("cmdline")).ok())
            .filter(|cmd| String::from_utf8_lossy(cmd).contains(dir.to_str().unwrap()))
            .count()
    };
    assert_eq!(daemons(), 2);
    assert!(
        std::process::Command::new("umount")
            .arg(&dir)
            .status()
            .unwrap()
            .success()
    );
    let t = Instant::now();
    while daemons() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "mount daemon still running after umount"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Bad arguments: a clear one-line reason and a non-zero exit.
    let out = std::process::Command::new(mortar_e2e::bin("mortar-mount"))
        .args(["nocolon", "/tmp"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("HOST[:PORT]:/VOLUME"));
    let out = std::process::Command::new(mortar_e2e::bin("mortar-mount"))
        .args([&format!("{}:/other", c.addr(0)), dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not \"other\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /metrics` from a mount's metrics endpoint; the value of `name`.
fn metric(addr: &str, name: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: mortar\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map(str::to_string)
}

/// The volfile's `ping-timeout` reaches a mount that sets no `-o ping-timeout`, the option
/// wins where given, and a running mount follows a new value. Read back from `mortar status`,
/// the mounts' metrics and logs: nothing here is timed.
#[test]
fn volfile_ping_timeout_applies_unless_the_mount_sets_one() {
    let mut c = Cluster::start(29, 3);
    let status = |c: &Cluster| {
        let out = std::process::Command::new(mortar_e2e::bin("mortar"))
            .args(["status", &c.target()])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let wait_for = |what: &str, ok: &dyn Fn() -> bool| {
        let t = Instant::now();
        while !ok() {
            assert!(t.elapsed() < Duration::from_secs(30), "waited for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert!(
        status(&c).contains("Ping timeout 5s (default"),
        "{}",
        status(&c)
    );

    c.set_ping_timeout(Some(1));
    wait_for("brick b0 to serve volfile generation 2", &|| {
        let s = status(&c);
        s.contains("generation 2 ") && s.contains("Ping timeout 1s (volfile")
    });
    let (plain_metrics, given_metrics) = ("127.29.0.1:26001", "127.29.0.1:26002");
    let plain = c.mount_with("plain", &format!("metrics={plain_metrics}"), None);
    let given = c.mount_with("given", &format!("metrics={given_metrics}"), Some(2));
    fs::write(plain.p("f"), b"hello").unwrap();
    assert_eq!(fs::read(given.p("f")).unwrap(), b"hello");
    let gauge = "mortar_client_ping_timeout_seconds";
    assert_eq!(metric(plain_metrics, gauge).as_deref(), Some("1"));
    assert_eq!(metric(given_metrics, gauge).as_deref(), Some("2"));
    let log = fs::read_to_string(c.dir.join("plain.log")).unwrap();
    let mounted = log
        .lines()
        .find(|l| l.contains("mounted"))
        .unwrap_or_default();
    assert!(
        mounted.contains("ping_timeout=1s") && mounted.contains("volfile"),
        "{log}"
    );

    // A new generation with another value: the mount without the option follows it.
    c.set_ping_timeout(Some(3));
    wait_for("the plain mount to take ping-timeout 3", &|| {
        metric(plain_metrics, gauge).as_deref() == Some("3")
    });
    assert_eq!(metric(given_metrics, gauge).as_deref(), Some("2"));
    fs::write(plain.p("g"), b"still").unwrap();
    assert_eq!(fs::read(given.p("g")).unwrap(), b"still");
}

/// The mount keeps an inode only while the kernel references it: after the kernel drops its
/// caches (and sends FORGET), the mount's table shrinks again instead of growing forever.
#[test]
fn the_mount_forgets_inodes_the_kernel_dropped() {
    let c = Cluster::start(42, 3);
    let addr = "127.42.0.1:26010";
    let m = c.mount("m", &format!("metrics={addr}"));
    let inodes = || -> u64 {
        metric(addr, "mortar_client_inodes")
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    fs::create_dir(m.p("many")).unwrap();
    for i in 0..300 {
        fs::write(m.p(&format!("many/f{i}")), b"x").unwrap();
    }
    // Looked up again (readdirplus and stat), all of them are known.
    let listed = fs::read_dir(m.p("many")).unwrap().count();
    assert_eq!(listed, 300);
    for i in 0..300 {
        fs::metadata(m.p(&format!("many/f{i}"))).unwrap();
    }
    let before = inodes();
    assert!((301..u64::MAX).contains(&before), "inodes known: {before}");
    let t = Instant::now();
    loop {
        // Drop unused dentries and inodes: the kernel forgets them.
        fs::write("/proc/sys/vm/drop_caches", "2").unwrap();
        let now = inodes();
        if now < 100 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the mount still knows {now} inodes (had {before})"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // What was forgotten is found again by name.
    assert_eq!(fs::read(m.p("many/f7")).unwrap(), b"x");
    assert_eq!(fs::read_dir(m.p("many")).unwrap().count(), 300);
}

/// A file re-opened unchanged is read from the kernel's page cache, not from the bricks; one
/// changed elsewhere in between is read afresh (close-to-open consistency across mounts).
#[test]
fn reopened_files_keep_their_cache_until_another_mount_changes_them() {
    let c = Cluster::start(44, 3);
    let addr = "127.44.0.1:26011";
    let a = c.mount("a", &format!("metrics={addr}"));
    let b = c.mount("b", "");
    let reads = || -> u64 {
        metric(addr, "mortar_client_reads_total")
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    fs::write(b.p("f"), pattern(1, 256 * 1024)).unwrap();
    assert_eq!(fs::read(a.p("f")).unwrap(), pattern(1, 256 * 1024));
    let after_first = reads();
    assert_eq!(fs::read(a.p("f")).unwrap(), pattern(1, 256 * 1024));
    assert_eq!(
        reads(),
        after_first,
        "an unchanged file was read from the bricks again"
    );
    // Same size, new content, from the other mount: the next open must see it.
    fs::write(b.p("f"), pattern(2, 256 * 1024)).unwrap();
    assert_eq!(fs::read(a.p("f")).unwrap(), pattern(2, 256 * 1024));
    assert!(reads() > after_first);
}

/// A Checksums request costs a bounded page whatever the file: on a 1 TiB sparse file with
/// 4 KiB blocks (once "memory allocation of 34359738360 bytes failed" on 16 TiB, and an
/// abort), the brick answers at most one page and keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksums_of_a_huge_sparse_file_are_paged_and_bounded() {
    let c = Cluster::start(84, 3);
    let m = c.mount("m", "");
    let f = fs::File::create(m.p("sparse")).unwrap();
    f.set_len(1 << 40).unwrap();
    drop(f);
    let g = {
        let v = c.volume().await;
        let a = v.lookup(Gfid::ROOT, b"sparse").await.unwrap();
        Gfid::from_bytes(&a.gfid).unwrap()
    };
    let mut brick = mortar_e2e::brick_client(&c.addr(0)).await;
    let t = Instant::now();
    let r = brick
        .checksums(pb::ChecksumReq {
            gfid: g.to_vec(),
            block: 4096,
            first: 0,
            max: u32::MAX,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.errno, 0);
    assert_eq!(r.size, 1 << 40);
    assert!(r.sums.len() <= 256, "{} sums in one reply", r.sums.len());
    // A page far into the file, and one past its end.
    for first in [(1u64 << 28) - 10, 1 << 40] {
        let r = brick
            .checksums(pb::ChecksumReq {
                gfid: g.to_vec(),
                block: 4096,
                first,
                max: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.errno, 0);
        assert!(r.sums.len() <= 256);
    }
    println!("three pages in {:?}", t.elapsed());
    assert!(
        brick.health(pb::Empty {}).await.unwrap().into_inner().up,
        "the brick keeps serving"
    );
}

/// Two clients renaming across two directories in opposite directions, over and over: each
/// change needs both directories' locks. Keeping one directory's eager lock while waiting for
/// the other's deadlocked them until the 30 s lock wait ran out (EROFS); now every rename
/// goes through.
#[test]
fn opposite_cross_directory_renames_from_two_clients_do_not_deadlock() {
    let c = Cluster::start(85, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    fs::create_dir(m1.p("a")).unwrap();
    fs::create_dir(m1.p("b")).unwrap();
    fs::write(m1.p("a/x"), b"x").unwrap();
    fs::write(m1.p("b/y"), b"y").unwrap();
    let t = Instant::now();
    let run =
        |root: std::path::PathBuf, from: &'static str, to: &'static str, name: &'static str| {
            std::thread::spawn(move || {
                for i in 0..100 {
                    let (src, dst) = if i % 2 == 0 { (from, to) } else { (to, from) };
                    // Touch the source directory first, so this client holds its eager lock.
                    fs::write(root.join(src).join(format!("t-{name}")), b"t").unwrap();
                    fs::rename(root.join(src).join(name), root.join(dst).join(name))
                        .unwrap_or_else(|e| panic!("rename {i} of {name}: {e}"));
                }
            })
        };
    let a = run(m1.path.clone(), "a", "b", "x");
    let b = run(m2.path.clone(), "b", "a", "y");
    a.join().unwrap();
    b.join().unwrap();
    println!("200 opposite renames in {:?}", t.elapsed());
    assert!(m1.p("a/x").exists() && m1.p("b/y").exists());
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

/// SIGTERM stops a brick cleanly and soon: sessions end (clients carry on with the others),
/// requests in flight are answered, the brick syncs its filesystem and exits.
#[test]
fn a_brick_stops_cleanly_on_sigterm() {
    let c = Cluster::start(86, 3);
    let m = c.mount("m", "");
    fs::write(m.p("before"), b"1").unwrap();
    let t = Instant::now();
    c.signal(0, libc::SIGTERM);
    while !c.log(0).contains("stopped") {
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "no clean stop after SIGTERM:\n{}",
            c.log(0)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("brick stopped {:?} after SIGTERM", t.elapsed());
    assert!(c.log(0).contains("session ended: brick stopping"));
    fs::write(m.p("after"), b"2").unwrap();
    assert_eq!(fs::read(m.p("before")).unwrap(), b"1");
}

/// Liveness and a request's deadline are separate: a brick whose disk is slow (every fsync
/// takes 7 s here, with a 2 s ping timeout) keeps answering pings, so its long request is
/// waited for instead of the brick being declared down, and the fsync succeeds with every
/// copy on disk.
#[test]
fn a_long_request_on_a_live_brick_is_not_a_dead_brick() {
    let mut c = Cluster::start(87, 3);
    c.kill(1);
    c.restart_env(1, &[("MORTAR_TEST_FSYNC_DELAY_MS", "7000")]);
    let m = c.mount("m", "ping-timeout=2");
    let mut f = fs::File::create(m.p("f")).unwrap();
    f.write_all(b"durable").unwrap();
    let t = Instant::now();
    f.sync_all().expect("fsync on a slow but live brick");
    println!("fsync took {:?}", t.elapsed());
    assert!(
        t.elapsed() >= Duration::from_secs(6),
        "the slow brick was not waited for"
    );
    let log = fs::read_to_string(c.dir.join("m.log")).unwrap_or_default();
    assert!(
        !log.contains("brick down"),
        "a slow request marked a live brick down:\n{log}"
    );
}

/// A directory listed while another client creates and removes entries: every entry that
/// stays all along is listed exactly once in every listing (pages follow names, not indexes
/// of a list that changes between pages).
#[test]
fn listing_a_changing_directory_never_skips_or_repeats_a_stable_entry() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    let c = Cluster::start(88, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    fs::create_dir(m1.p("d")).unwrap();
    for i in 0..2500 {
        fs::write(m1.p(&format!("d/f{i:05}")), b"").unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let churn = {
        let (stop, d) = (stop.clone(), m2.p("d"));
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Relaxed) {
                // Names before and among the stable ones shift every index after them.
                let name = d.join(format!("a{:05}", i % 3000));
                let _ = fs::write(&name, b"");
                let _ = fs::remove_file(d.join(format!("a{:05}", (i + 1500) % 3000)));
                i += 1;
            }
        })
    };
    for round in 0..10 {
        let mut seen = std::collections::HashMap::new();
        for e in fs::read_dir(m1.p("d")).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            if n.starts_with('f') {
                *seen.entry(n).or_insert(0) += 1;
            }
        }
        let missing = 2500 - seen.len();
        let repeated = seen.values().filter(|n| **n > 1).count();
        assert_eq!(
            (missing, repeated),
            (0, 0),
            "listing {round}: stable entries missing or listed twice"
        );
    }
    stop.store(true, Relaxed);
    churn.join().unwrap();
}

/// Requests shaped as attacks get a bounded answer and the brick keeps serving: a Lock of
/// thousands of inodes is refused, a HealIndex list over its bound is refused, a change of
/// the index answers nothing (no reply grows with the index), the index is listed a page at
/// a time, and a client that stops reading its session stream loses the session instead of
/// keeping it (and its locks) alive forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_get_bounded_answers() {
    let c = Cluster::start(89, 3);
    let mut b = mortar_e2e::brick_client(&c.addr(0)).await;
    let many: Vec<Vec<u8>> = (0..5000).map(|_| Gfid::random().to_vec()).collect();

    // A session of our own, for the Lock request.
    let raw = mortar_e2e::raw_session(&mut b, "hostile").await;
    let session = raw.id.clone();
    let r = b
        .lock(pb::LockReq {
            session: session.clone(),
            gfids: many.clone(),
            wait: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.errno, libc::E2BIG, "a lock of 5000 inodes");

    let err = b
        .heal_index(pb::HealIndexReq {
            add: many.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // 3000 entries in, a change answers none, a listing a page.
    for chunk in many[..3000].chunks(1000) {
        let r = b
            .heal_index(pb::HealIndexReq {
                add: chunk.to_vec(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.entries.is_empty());
    }
    let r = b
        .heal_index(pb::HealIndexReq {
            list: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The bricks' heal workers drain these entries (no such inodes) as we look.
    assert!(r.entries.len() <= 1000, "one page at most");
    assert_eq!(r.entries.len() as u64, r.total.min(1000));
    b.heal_index(pb::HealIndexReq {
        remove: many[..3000].to_vec(),
        ..Default::default()
    })
    .await
    .unwrap_err(); // over the list bound: refused whole
    for chunk in many[..3000].chunks(1000) {
        b.heal_index(pb::HealIndexReq {
            remove: chunk.to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    // A client that sends pings and never reads the pongs.
    let silent = Gfid::random().to_vec();
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tx.send(pb::SessionIn {
        msg: Some(pb::session_in::Msg::Hello(pb::Hello {
            session: silent,
            client: "never-reads".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let never_read = b
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap();
    let pinger = tokio::spawn(async move {
        for n in 0..200_000u64 {
            if tx
                .send(pb::SessionIn {
                    msg: Some(pb::session_in::Msg::Ping(n)),
                })
                .await
                .is_err()
            {
                break;
            }
        }
    });
    let t = Instant::now();
    while !c.log(0).contains("client not reading its session") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "a client that does not read kept its session"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pinger.abort();
    drop(never_read);
    let h = b.health(pb::Empty {}).await.unwrap().into_inner();
    assert!(h.up);
}

/// Issue 12 item 4: a brick started under `ulimit -n 1024` (a common container default)
/// serves 10,000 files: it raises its soft limit to the hard one, sizes its cache of open
/// files from it, and drops the cache rather than wedge when descriptors run out. Before,
/// its fd cache (up to 4096) ran it out of descriptors after about 1,000 files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_brick_under_ulimit_1024_serves_10000_files() {
    use rustix::process::{Resource, Rlimit, setrlimit};
    // The bricks inherit this process's limits (soft and hard 1024).
    let lim = Rlimit {
        current: Some(1024),
        maximum: Some(1024),
    };
    setrlimit(Resource::Nofile, lim).unwrap();
    let c = Cluster::start(94, 3);
    let v = c.volume().await;
    let dirs: Vec<Gfid> = make_dirs(&v, 20).await;
    let files: usize = 10_000;
    let mut writers = tokio::task::JoinSet::new();
    for d in 0..20 {
        let (v, dir) = (v.clone(), dirs[d]);
        writers.spawn(async move {
            let mut made = Vec::new();
            for i in (d..files).step_by(20) {
                let a = v
                    .create(
                        dir,
                        format!("f{i}").as_bytes(),
                        pb::Kind::File,
                        0o644,
                        0,
                        0,
                        0,
                        b"",
                    )
                    .await
                    .unwrap_or_else(|e| panic!("create f{i}: {e}"));
                let g = Gfid::from_bytes(&a.gfid).unwrap();
                v.write(g, 0, pattern(i as u64, 512), false)
                    .await
                    .unwrap_or_else(|e| panic!("write f{i}: {e}"));
                made.push((i, g));
            }
            made
        });
    }
    let results = writers.join_all().await;
    // Read every file back: many times round the brick's cache of open files.
    for (i, g) in results.iter().flatten() {
        let data = v
            .read(*g, 0, 4096)
            .await
            .unwrap_or_else(|e| panic!("read f{i}: {e}"));
        assert_eq!(data, pattern(*i as u64, 512), "f{i}");
    }
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
    for i in 0..3 {
        assert!(
            c.log(i).contains("open-file limit 1024"),
            "b{i} log:\n{}",
            c.log(i)
        );
    }
}

async fn make_dirs(v: &mortar_replication::volume::Volume, n: usize) -> Vec<Gfid> {
    let mut out = Vec::new();
    for d in 0..n {
        let a = v
            .create(
                Gfid::ROOT,
                format!("d{d}").as_bytes(),
                pb::Kind::Dir,
                0o755,
                0,
                0,
                0,
                b"",
            )
            .await
            .unwrap();
        out.push(Gfid::from_bytes(&a.gfid).unwrap());
    }
    out
}

/// The kernel caps a FUSE mount's readahead at 128 KiB; the mount raises it to its largest
/// request (1 MiB), so a sequential read takes an eighth of the round trips.
#[test]
fn a_mount_reads_ahead_in_requests_of_1_mib() {
    let c = Cluster::start(109, 3);
    let m = c.mount("m", "");
    let out = std::process::Command::new("mountpoint")
        .arg("-d")
        .arg(m.p(""))
        .output()
        .unwrap();
    let dev = String::from_utf8(out.stdout).unwrap();
    let kib = fs::read_to_string(format!("/sys/class/bdi/{}/read_ahead_kb", dev.trim())).unwrap();
    assert_eq!(kib.trim(), "1024");
}
