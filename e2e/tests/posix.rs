//! POSIX behaviour a local filesystem has, each test named for it, on a real 3-brick mount
//! (the public suites, pjdfstest and fsx, run in tests/conformance.rs).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use mortar_e2e::Cluster;

fn ctime_ns(p: &Path) -> i64 {
    let m = fs::symlink_metadata(p).unwrap();
    m.ctime() * 1_000_000_000 + m.ctime_nsec()
}

fn mtime_ns(p: &Path) -> i64 {
    let m = fs::symlink_metadata(p).unwrap();
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

/// Lets the clock move on, so a changed time is visibly later.
fn tick() {
    std::thread::sleep(Duration::from_millis(20));
}

/// `printf x > f` on an existing file leaves exactly `x`, for this mount and another one;
/// the truncation stamps mtime and ctime.
#[test]
fn open_with_o_trunc_truncates_an_existing_file() {
    let c = Cluster::start(71, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    let f = m1.p("f");
    fs::write(&f, b"hello world\n").unwrap();
    // m2 reads it first, so a stale cached size there would show.
    assert_eq!(fs::read(m2.p("f")).unwrap(), b"hello world\n");
    let (m0, c0) = (mtime_ns(&f), ctime_ns(&f));
    tick();
    // File::create is open(O_WRONLY|O_CREAT|O_TRUNC), the shell's `>`.
    fs::File::create(&f).unwrap().write_all(b"x\n").unwrap();
    assert_eq!(fs::read(&f).unwrap(), b"x\n");
    assert_eq!(fs::read(m2.p("f")).unwrap(), b"x\n");
    assert!(mtime_ns(&f) > m0, "mtime not stamped by O_TRUNC");
    assert!(ctime_ns(&f) > c0, "ctime not stamped by O_TRUNC");

    // O_TRUNC alone (nothing written) empties the file too.
    tick();
    let before = ctime_ns(&f);
    drop(
        fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&f)
            .unwrap(),
    );
    assert_eq!(fs::metadata(&f).unwrap().len(), 0);
    assert_eq!(fs::metadata(m2.p("f")).unwrap().len(), 0);
    assert!(ctime_ns(&f) > before);
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

/// ctime follows the rules ext4 follows: link() and unlink() of one of a file's names change
/// its ctime, rename() changes the renamed inode's and a replaced one's that lives on, and the
/// attributes replied after chmod, chown and truncate carry the new ctime at once.
#[test]
fn ctime_changes_on_link_unlink_rename_and_setattr() {
    let c = Cluster::start(72, 3);
    let m = c.mount("m1", "");
    let f = m.p("f");
    fs::write(&f, b"data").unwrap();

    let t = ctime_ns(&f);
    tick();
    fs::hard_link(&f, m.p("g")).unwrap();
    assert!(ctime_ns(&f) > t, "link() must change the file's ctime");

    let t = ctime_ns(&f);
    tick();
    fs::remove_file(m.p("g")).unwrap();
    assert!(
        ctime_ns(&f) > t,
        "unlink() of a name must change the file's ctime"
    );

    let t = ctime_ns(&f);
    tick();
    fs::rename(&f, m.p("f2")).unwrap();
    assert!(
        ctime_ns(&m.p("f2")) > t,
        "rename() must change the inode's ctime"
    );

    // A replaced file that keeps another name: its ctime changes.
    fs::write(m.p("victim"), b"v").unwrap();
    fs::hard_link(m.p("victim"), m.p("victim-link")).unwrap();
    fs::write(m.p("src"), b"s").unwrap();
    let t = ctime_ns(&m.p("victim-link"));
    tick();
    fs::rename(m.p("src"), m.p("victim")).unwrap();
    assert!(
        ctime_ns(&m.p("victim-link")) > t,
        "a file replaced by rename() changes ctime"
    );

    // The reply of a setattr carries the new ctime: the kernel caches it, so a stat right
    // after the chmod (within the attribute timeout) must already show it.
    for change in ["chmod", "chown", "truncate"] {
        let p = m.p("f2");
        let t = ctime_ns(&p);
        tick();
        match change {
            "chmod" => fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap(),
            "chown" => std::os::unix::fs::chown(&p, Some(1000), Some(1000)).unwrap(),
            _ => fs::OpenOptions::new()
                .write(true)
                .open(&p)
                .unwrap()
                .set_len(1)
                .unwrap(),
        }
        assert!(ctime_ns(&p) > t, "{change}: stale ctime in the reply");
    }
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

/// When every brick refuses a change the same way (ENOTEMPTY here) the bricks agree: the
/// error is the answer and nothing is logged as a disagreement.
#[test]
fn identical_refusals_are_not_logged_as_disagreement() {
    let c = Cluster::start(73, 3);
    let m = c.mount("m1", "");
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/f"), b"x").unwrap();
    for _ in 0..200 {
        let e = fs::remove_dir(m.p("d")).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    }
    drop(m);
    let log = fs::read_to_string(c.dir.join("m1.log")).unwrap_or_default();
    assert_eq!(
        log.matches("bricks disagree").count(),
        0,
        "identical refusals logged as a disagreement:\n{log}"
    );
}

/// Regular files in the bricks' gfid index that no name refers to any more (orphans).
fn orphans_on(c: &Cluster, i: usize) -> usize {
    let index = c.brick_dir(i).join(".mortar/gfid");
    let mut n = 0;
    for sub in fs::read_dir(index).unwrap() {
        for e in fs::read_dir(sub.unwrap().path()).unwrap() {
            let m = fs::symlink_metadata(e.unwrap().path()).unwrap();
            if m.is_file() && m.nlink() == 1 {
                n += 1;
            }
        }
    }
    n
}

fn wait_no_orphans(c: &Cluster, limit: Duration) {
    let t = std::time::Instant::now();
    while (0..3).any(|i| orphans_on(c, i) > 0) {
        assert!(
            t.elapsed() < limit,
            "orphans left after {limit:?}: {:?}",
            (0..3).map(|i| orphans_on(c, i)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A file unlinked while open stays readable and writable through its descriptor (fstat says
/// nlink 0) until the last close, then its data is gone from every brick (pjdfstest
/// unlink/14). Its name is gone at once, for every mount.
#[test]
fn unlinked_open_file_stays_usable_until_last_close() {
    use std::os::unix::fs::FileExt;
    let c = Cluster::start(74, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m1.p("f"))
        .unwrap();
    f.write_all_at(b"hello, orphan", 0).unwrap();
    // A second descriptor, from open() rather than create().
    let g = fs::File::open(m1.p("f")).unwrap();
    fs::remove_file(m1.p("f")).unwrap();
    assert!(!m1.p("f").exists());
    assert!(!m2.p("f").exists());
    let md = f.metadata().unwrap();
    assert_eq!(md.nlink(), 0, "fstat of an unlinked file");
    assert_eq!(md.len(), 13);
    let mut buf = [0u8; 13];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"hello, orphan");
    f.write_all_at(b"!", 13).unwrap();
    let mut buf = [0u8; 14];
    g.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"hello, orphan!");
    assert!((0..3).all(|i| orphans_on(&c, i) == 1));
    drop(f);
    assert!(
        (0..3).all(|i| orphans_on(&c, i) == 1),
        "one descriptor is still open"
    );
    drop(g);
    wait_no_orphans(&c, Duration::from_secs(10));
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

/// An orphan whose client dies (its mount's daemon SIGKILLed) is reclaimed when the bricks
/// end that client's session; one left on a brick that restarts is reclaimed at its start.
#[test]
fn orphans_of_dead_clients_and_restarted_bricks_are_reclaimed() {
    let mut c = Cluster::start(75, 3);
    let m1 = c.mount("m1", "");
    let f = fs::File::create(m1.p("f")).unwrap();
    fs::write(m1.p("f"), b"data").unwrap();
    fs::remove_file(m1.p("f")).unwrap();
    assert!((0..3).all(|i| orphans_on(&c, i) == 1));
    // Brick 2 restarts while the file is open: its copy of the orphan goes at its start.
    c.kill(2);
    c.restart(2);
    assert_eq!(orphans_on(&c, 2), 0);
    // The client dies: the surviving bricks end its session and drop the orphan.
    let pid = m1.holder_pid().expect("mount daemon");
    // SAFETY: kill(2) of the test's own FUSE daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(f);
    wait_no_orphans(&c, Duration::from_secs(30));
}

/// A directory removed while something still refers to it (an open descriptor here; a bind
/// mount or a cwd alike) answers stat with its last attributes and nlink 0, not ENOENT,
/// whether this mount or another one removed it.
#[test]
fn removed_directory_answers_stat_with_nlink_zero() {
    let c = Cluster::start(76, 3);
    let m1 = c.mount("m1", "");
    let m2 = c.mount("m2", "");
    for (name, remover) in [("local", &m1), ("remote", &m2)] {
        fs::create_dir(m1.p(name)).unwrap();
        let d = fs::File::open(m1.p(name)).unwrap();
        assert!(d.metadata().unwrap().is_dir());
        fs::remove_dir(remover.p(name)).unwrap();
        // Past the attribute timeout, so the kernel asks the mount again.
        std::thread::sleep(Duration::from_millis(1500));
        let md = d
            .metadata()
            .unwrap_or_else(|e| panic!("{name}: stat of a removed directory: {e}"));
        assert!(md.is_dir(), "{name}");
        assert_eq!(md.nlink(), 0, "{name}");
    }
}

/// The brick resolves names relative to directory descriptors, so its own path does not count
/// against the user's PATH_MAX: a relative path of 4,000 bytes (legal for the user, too long
/// once prefixed with the brick's directory) works, and so does a tree deeper than PATH_MAX,
/// reached through directory descriptors. Heal copies it to a brick that was away.
#[test]
fn long_paths_and_trees_deeper_than_path_max_work() {
    use rustix::fs::{Mode, OFlags};
    let mut c = Cluster::start(80, 3);
    let m = c.mount("m1", "");
    let name = "n".repeat(250);
    // 15 levels of 251 bytes: a 3,765-byte relative path, then a file.
    let mut rel = std::path::PathBuf::new();
    for _ in 0..15 {
        rel.push(&name);
    }
    fs::create_dir_all(m.path.join(&rel)).unwrap();
    let file = m.path.join(&rel).join("f".repeat(200));
    assert!(file.strip_prefix(&m.path).unwrap().as_os_str().len() > 3900);
    fs::write(&file, b"long").unwrap();
    assert_eq!(fs::read(&file).unwrap(), b"long");
    fs::rename(&file, m.path.join(&rel).join("g")).unwrap();

    // Deeper than PATH_MAX: walk down with descriptors, 20 more levels.
    c.kill(2);
    let mut fd = rustix::fs::open(
        m.path.join(&rel),
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    for _ in 0..20 {
        rustix::fs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        fd = rustix::fs::openat(
            &fd,
            name.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
    }
    let f = rustix::fs::openat(
        &fd,
        "deep",
        OFlags::CREATE | OFlags::WRONLY,
        Mode::from_raw_mode(0o644),
    )
    .unwrap();
    rustix::io::write(&f, b"deeper than PATH_MAX").unwrap();
    drop(f);
    let st = rustix::fs::statat(&fd, "deep", rustix::fs::AtFlags::empty()).unwrap();
    assert_eq!(st.st_size, 20);
    c.restart(2);
    c.wait_healed(Duration::from_secs(60));
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

/// Close-to-open holds for a reader that looked at the file shortly before: mount m2 stats
/// `f` (size 0, cached for the attribute timeout), m1 rewrites it and closes, and m2's next
/// open sees all of it at once, size included.
#[test]
fn an_open_sees_the_last_close_despite_cached_attributes() {
    use std::io::Read;
    let c = Cluster::start(83, 3);
    let m1 = c.mount("m1", "attr-timeout=30,entry-timeout=30");
    let m2 = c.mount("m2", "attr-timeout=30,entry-timeout=30");
    for round in 0..5u8 {
        let name = format!("f{round}");
        fs::write(m1.p(&name), b"").unwrap();
        assert_eq!(fs::metadata(m2.p(&name)).unwrap().len(), 0);
        fs::write(m1.p(&name), vec![round; 4096]).unwrap();
        let mut f = fs::File::open(m2.p(&name)).unwrap();
        assert_eq!(
            f.metadata().unwrap().len(),
            4096,
            "round {round}: stale size"
        );
        let mut data = Vec::new();
        f.read_to_end(&mut data).unwrap();
        assert_eq!(data, vec![round; 4096], "round {round}: stale data");
    }
}
