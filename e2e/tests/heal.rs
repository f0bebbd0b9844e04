//! Self-heal and failure handling, proven by fault injection on real bricks and mounts.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::time::{Duration, Instant};

use mortar_e2e::{Cluster, pattern};

const MIB: usize = 1 << 20;

fn heal_report(what: &str, took: Duration) {
    // Shown with `cargo nextest run --no-capture`; the closing note quotes these.
    eprintln!("HEAL {what}: {:.2} s", took.as_secs_f64());
}

#[test]
fn a_brick_away_during_many_changes_is_healed_by_itself() {
    let mut c = Cluster::start(31, 3);
    let m = c.mount("m", "");
    fs::create_dir_all(m.p("tree/a/b/c")).unwrap();
    for i in 0..20 {
        fs::write(m.p(&format!("tree/a/b/c/f{i}")), b"doomed").unwrap();
    }
    fs::create_dir(m.p("keep")).unwrap();
    for i in 0..200 {
        fs::write(m.p(&format!("keep/k{i}")), pattern(i, 100)).unwrap();
    }
    let big: Vec<u8> = pattern(7, 32 * MIB);
    fs::write(m.p("big"), &big).unwrap();

    c.kill(2);
    for d in 0..10 {
        fs::create_dir(m.p(&format!("new{d}"))).unwrap();
        for f in 0..100 {
            fs::write(
                m.p(&format!("new{d}/f{f}")),
                pattern(d * 1000 + f, 64 + f as usize),
            )
            .unwrap();
        }
    }
    for i in 0..100 {
        fs::remove_file(m.p(&format!("keep/k{i}"))).unwrap();
    }
    for i in 100..150 {
        fs::rename(m.p(&format!("keep/k{i}")), m.p(&format!("new0/renamed{i}"))).unwrap();
    }
    fs::rename(m.p("new9"), m.p("keep/moved-dir")).unwrap();
    fs::remove_dir_all(m.p("tree")).unwrap();
    let f = fs::OpenOptions::new().write(true).open(m.p("big")).unwrap();
    f.write_all_at(&pattern(8, MIB), 16 * MIB as u64).unwrap();
    drop(f);
    fs::set_permissions(m.p("keep/k150"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(m.p("keep/k151"), Some(4242), Some(4343)).unwrap();
    rustix::fs::setxattr(
        m.p("keep/k152"),
        "user.color",
        b"blue",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::hard_link(m.p("keep/k153"), m.p("new1/hardlink")).unwrap();
    std::os::unix::fs::symlink("../keep/k154", m.p("new1/symlink")).unwrap();
    assert!(
        c.heal_pending() > 0,
        "the survivors must know what b2 missed"
    );

    c.restart(2);
    let took = c.wait_healed(Duration::from_secs(120));
    heal_report(
        "brick back after 1000 creates, 100 deletes, 50 renames, tree removed, 1 MiB overwrite",
        took,
    );
    // The healed brick serves good data: stop another so it must answer.
    c.kill(0);
    let mut want = big.clone();
    want[16 * MIB..17 * MIB].copy_from_slice(&pattern(8, MIB));
    assert!(fs::read(m.p("big")).unwrap() == want);
    assert_eq!(fs::read(m.p("new3/f7")).unwrap(), pattern(3007, 71));
    assert_eq!(
        fs::read(m.p("keep/moved-dir/f1")).unwrap(),
        pattern(9001, 65)
    );
}

#[test]
fn a_hung_brick_is_dropped_within_the_ping_timeout_and_healed_after() {
    let c = Cluster::start(32, 3);
    let m = c.mount("m", "");
    fs::create_dir(m.p("d")).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (m.p("d"), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            let mut slowest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                fs::write(path.join(format!("w{n}")), pattern(n, 4096)).expect("write during hang");
                slowest = slowest.max(t.elapsed());
                n += 1;
            }
            (n, slowest)
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    c.signal(1, libc::SIGSTOP);
    std::thread::sleep(Duration::from_secs(4));
    c.signal(1, libc::SIGCONT);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, slowest) = writer.join().unwrap();
    // The ping timeout is 2 s: no write waits much beyond it.
    assert!(slowest < Duration::from_secs(5), "a write took {slowest:?}");
    assert!(n > 10);
    let took = c.wait_healed(Duration::from_secs(60));
    heal_report("after SIGSTOP/SIGCONT", took);
    for i in 0..n {
        assert_eq!(fs::read(m.p(&format!("d/w{i}"))).unwrap(), pattern(i, 4096));
    }
}

#[test]
fn a_wiped_brick_gets_a_full_heal_before_serving() {
    let mut c = Cluster::start(33, 3);
    let m = c.mount("m", "");
    for d in 0..5 {
        fs::create_dir_all(m.p(&format!("d{d}/sub"))).unwrap();
        for f in 0..40 {
            fs::write(
                m.p(&format!("d{d}/sub/f{f}")),
                pattern(d * 100 + f, 1000 * f as usize),
            )
            .unwrap();
        }
    }
    fs::write(m.p("big"), pattern(1, 16 * MIB)).unwrap();
    // Small inodes of every kind, which a directory heal makes complete along with their
    // names (content, metadata and version in one step), and files either side of the
    // largest size it does so for.
    let odd = [
        "d0/mode600",
        "d0/owned",
        "d0/xattr",
        "d0/empty",
        "d0/edge",
        "d0/over",
        "d0/link",
        "d0/fifo",
    ];
    fs::write(m.p("d0/mode600"), b"secret").unwrap();
    fs::set_permissions(m.p("d0/mode600"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(m.p("d0/owned"), b"theirs").unwrap();
    std::os::unix::fs::chown(m.p("d0/owned"), Some(4242), Some(4343)).unwrap();
    fs::write(m.p("d0/xattr"), b"tagged").unwrap();
    rustix::fs::setxattr(
        m.p("d0/xattr"),
        "user.color",
        b"blue",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    fs::write(m.p("d0/empty"), b"").unwrap();
    fs::write(m.p("d0/edge"), pattern(2, MIB)).unwrap();
    fs::write(m.p("d0/over"), pattern(3, MIB + 1)).unwrap();
    std::os::unix::fs::symlink("sub/f1", m.p("d0/link")).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        m.p("d0/fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .unwrap();
    c.kill(1);
    fs::remove_dir_all(c.brick_dir(1)).unwrap();
    c.restart(1);
    let took = c.wait_healed(Duration::from_secs(120));
    heal_report("full heal of a wiped brick (200 files, 16 MiB)", took);
    // Same version, change time and nothing pending on every copy (`mortar verify`, in
    // `wait_healed`, compared the rest): a copy made complete in one step is not stale.
    let state = |brick: usize, rel: &str| {
        let mut rec = vec![0u8; 128];
        let n = rustix::fs::lgetxattr(c.brick_dir(brick).join(rel), "trusted.mortar.rec", &mut rec)
            .unwrap_or_else(|e| panic!("{rel} on b{brick}: {e}"));
        rec[25..n].to_vec()
    };
    for rel in odd.iter().chain(&["d3/sub/f20", "big"]) {
        assert_eq!(state(1, rel), state(0, rel), "{rel}: b1 against b0");
        assert_eq!(state(2, rel), state(0, rel), "{rel}: b2 against b0");
    }
    c.kill(0);
    c.kill(2);
    // Only the healed brick is left: reads must come from it and be right.
    assert_eq!(fs::read(m.p("d4/sub/f39")).unwrap(), pattern(439, 39_000));
    assert!(fs::read(m.p("big")).unwrap() == pattern(1, 16 * MIB));
    assert_eq!(fs::read(m.p("d0/edge")).unwrap(), pattern(2, MIB));
    assert_eq!(fs::read(m.p("d0/over")).unwrap(), pattern(3, MIB + 1));
    assert_eq!(fs::read(m.p("d0/empty")).unwrap(), b"");
    let md = |rel: &str| fs::symlink_metadata(m.p(rel)).unwrap();
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    assert_eq!(md("d0/mode600").mode() & 0o7777, 0o600);
    assert_eq!((md("d0/owned").uid(), md("d0/owned").gid()), (4242, 4343));
    assert!(md("d0/fifo").file_type().is_fifo());
    assert_eq!(md("d0/fifo").mode() & 0o7777, 0o640);
    assert_eq!(
        fs::read_link(m.p("d0/link")).unwrap().to_str(),
        Some("sub/f1")
    );
    let mut v = [0u8; 16];
    let n = rustix::fs::getxattr(m.p("d0/xattr"), "user.color", &mut v).unwrap();
    assert_eq!(&v[..n], b"blue");
}

#[test]
fn a_client_killed_midway_leaves_marks_that_heal_resolves() {
    let c = Cluster::start(34, 3);
    let m = c.mount("m", "");
    let victim = c.mount("victim", "");
    let pid = victim.holder_pid().expect("mount daemon");
    let path = victim.p("file");
    let writer = std::thread::spawn(move || {
        let f = fs::File::create(path).unwrap();
        for i in 0..10_000u64 {
            if f.write_all_at(&pattern(i, 64 * 1024), i * 64 * 1024)
                .is_err()
            {
                return i;
            }
        }
        10_000
    });
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: kill(2) of the mount daemon under test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let written = writer.join().unwrap();
    assert!(written < 10_000, "the writer should have been cut off");
    // The bricks ended the dead session and indexed what it was changing; heal settles it.
    let took = c.wait_healed(Duration::from_secs(60));
    heal_report("after a client was SIGKILLed mid-write", took);
    let data = fs::read(m.p("file")).unwrap();
    assert!(data.len() as u64 >= written.saturating_sub(1) * 64 * 1024);
}

#[test]
fn split_brain_is_reported_gives_eio_and_is_resolved() {
    let c = Cluster::start(35, 3);
    let m = c.mount("m", "attribute-timeout=0,entry-timeout=0");
    fs::write(m.p("sb"), b"original").unwrap();
    fs::write(m.p("sb2"), b"original").unwrap();
    drop(m);
    std::thread::sleep(Duration::from_millis(300));
    // Edit b0's copies by hand: other content, same version, another change id.
    let edit = |name: &str, content: &[u8]| {
        let p0 = c.brick_dir(0).join(name);
        fs::write(&p0, content).unwrap();
        let mut buf = [0u8; 128];
        let n = rustix::fs::getxattr(&p0, mortar_brick::record::XATTR, &mut buf[..]).unwrap();
        let mut rec = mortar_brick::record::Record::decode(&buf[..n]).unwrap();
        rec.ver.2 ^= 0xdead_beef;
        let flags = rustix::fs::XattrFlags::empty();
        rustix::fs::setxattr(&p0, mortar_brick::record::XATTR, &rec.encode(), flags).unwrap();
    };
    edit("sb", b"edited on b0");
    edit("sb2", b"edited on b0, and longer");

    let m = c.mount("m2", "attribute-timeout=0,entry-timeout=0");
    for name in ["sb", "sb2"] {
        let err = fs::read(m.p(name)).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO), "{name}: {err}");
    }
    let t = Instant::now();
    while c.heal_info().matches("Is in split-brain").count() < 2 {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "not reported:\n{}",
            c.heal_info()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let resolve = |args: &[&str]| {
        let out = std::process::Command::new(mortar_e2e::bin("mortar"))
            .args(["heal", "resolve", &c.target()])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    resolve(&["/sb", "--source", "b1"]);
    resolve(&["/sb2", "--policy", "size"]);
    assert_eq!(fs::read(m.p("sb")).unwrap(), b"original");
    assert_eq!(fs::read(m.p("sb2")).unwrap(), b"edited on b0, and longer");
    c.wait_healed(Duration::from_secs(30));
}

#[test]
fn bricks_join_and_leave_while_mounted() {
    let mut c = Cluster::start(36, 3);
    let m = c.mount("m", "");
    for i in 0..50 {
        fs::write(m.p(&format!("f{i}")), pattern(i, 5000)).unwrap();
    }
    // A fourth brick: its empty directory is filled by a full heal; nobody remounts.
    c.set_bricks(&[0, 1, 2, 3]);
    c.restart(3);
    let took = c.wait_healed(Duration::from_secs(60));
    heal_report("new 4th brick filled", took);
    // The mount may not follow the new volfile yet: the bricks index what it changes
    // meanwhile (its generation is behind theirs), and heal brings it to b3. That needs b0
    // (in every change) to have the new volfile itself: wait until it serves it.
    let t = Instant::now();
    while !c.heal_info().contains("Brick b3") {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "b0 never served the new volfile"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    fs::write(m.p("after-join"), b"4 bricks").unwrap();
    c.wait_healed(Duration::from_secs(30));
    assert_eq!(
        fs::read(c.brick_dir(3).join("after-join")).unwrap(),
        b"4 bricks"
    );
    // Take b0 out: the others keep every copy, writes go on with the new majority.
    c.set_bricks(&[1, 2, 3]);
    std::thread::sleep(Duration::from_millis(2500));
    c.kill(0);
    fs::write(m.p("after-leave"), b"3 bricks").unwrap();
    for i in 0..50 {
        assert_eq!(fs::read(m.p(&format!("f{i}"))).unwrap(), pattern(i, 5000));
    }
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

/// A brick added while the other bricks and the mount still follow the old volfile (a
/// ConfigMap reaches pods at different times): what the mount changes meanwhile goes to the
/// old bricks only and is indexed nowhere, since none of them knows the new brick. Once they
/// all serve the new volfile, the new brick's after-join crawl finds it and heals it.
#[test]
fn changes_made_before_the_bricks_learn_of_a_new_brick_reach_it() {
    let mut c = Cluster::start(99, 3);
    let m = c.mount("m", "");
    fs::create_dir(m.p("d")).unwrap();
    for i in 0..10 {
        fs::write(m.p(&format!("f{i}")), pattern(i, 5000)).unwrap();
    }
    let mut four = c.vol.clone();
    four.generation += 1;
    four.bricks.push(mortar_common::volfile::BrickSpec {
        id: "b3".into(),
        address: c.addr(3),
    });
    let own = c.dir.join("volfile-b3.yaml");
    fs::write(&own, four.to_yaml()).unwrap();
    c.restart_on(3, &own);
    // b3 fills itself from the others; nothing is left pending anywhere (else a later pass
    // would pick up what follows by chance).
    let b3 = c.brick_dir(3);
    let b3_target = format!("{}:/data", c.addr(3));
    let t = Instant::now();
    while (0..10).any(|i| fs::read(b3.join(format!("f{i}"))).ok() != Some(pattern(i, 5000)))
        || !b3.join("d").is_dir()
        || c.heal_pending_at(&b3_target) != 0
    {
        assert!(t.elapsed() < Duration::from_secs(30), "b3 was never filled");
        std::thread::sleep(Duration::from_millis(200));
    }
    fs::write(m.p("f0"), b"rewritten").unwrap();
    fs::remove_file(m.p("f1")).unwrap();
    fs::rename(m.p("f2"), m.p("d/f2")).unwrap();
    fs::write(m.p("d/new"), b"new").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        fs::read(b3.join("f0")).unwrap(),
        pattern(0, 5000),
        "nothing should have reached b3 yet: the other bricks do not know it"
    );
    // The others get the new volfile too.
    c.set_bricks(&[0, 1, 2, 3]);
    let t = Instant::now();
    while fs::read(b3.join("f0")).ok().as_deref() != Some(b"rewritten".as_slice())
        || b3.join("f1").exists()
        || !b3.join("d/f2").exists()
        || fs::read(b3.join("d/new")).ok().as_deref() != Some(b"new".as_slice())
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "b3 never got the changes made before the others knew it"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    heal_report(
        "changes made before the bricks knew the new brick",
        t.elapsed(),
    );
    c.wait_healed(Duration::from_secs(30));
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
}

#[test]
fn a_heal_cut_short_by_a_restart_finishes_after_it() {
    let mut c = Cluster::start(37, 3);
    let m = c.mount("m", "");
    for d in 0..4 {
        fs::create_dir(m.p(&format!("d{d}"))).unwrap();
        for f in 0..50 {
            fs::write(m.p(&format!("d{d}/f{f}")), pattern(d * 100 + f, 20_000)).unwrap();
        }
    }
    fs::write(m.p("big"), pattern(5, 48 * MIB)).unwrap();
    c.kill(2);
    fs::remove_dir_all(c.brick_dir(2)).unwrap();
    // A slow heal (4 MiB/s), stopped halfway by SIGKILL of the brick being filled.
    c.restart_with(2, &["--heal-rate-mib", "4"]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.heal_pending() > 0, "the heal should still be running");
    c.kill(2);
    c.restart(2);
    let took = c.wait_healed(Duration::from_secs(120));
    heal_report("full heal resumed after the brick was killed midway", took);
    c.kill(0);
    c.kill(1);
    c.restart(1);
    // b2 and b1 are the majority now; reads are right.
    assert!(fs::read(m.p("big")).unwrap() == pattern(5, 48 * MIB));
    assert_eq!(fs::read(m.p("d3/f49")).unwrap(), pattern(349, 20_000));
}

/// A client writing a file that a slow heal is copying waits about a second, not for the
/// whole heal: the heal lets go of the lock and resumes later with the blocks still to do.
#[test]
fn a_file_under_a_slow_heal_stays_writable() {
    let mut c = Cluster::start(43, 3);
    let slow = ["--heal-rate-mib", "2"];
    for i in 0..3 {
        c.kill(i);
        c.restart_with(i, &slow);
    }
    let m = c.mount("m", "");
    fs::write(m.p("big"), pattern(1, 48 * MIB)).unwrap();
    c.kill(2);
    // Every block differs on b2 now: its heal takes 24 s at 2 MiB/s.
    fs::write(m.p("big"), pattern(2, 48 * MIB)).unwrap();
    c.restart_with(2, &slow);
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.heal_pending() > 0, "the heal should still be running");
    let t = Instant::now();
    let f = fs::OpenOptions::new().write(true).open(m.p("big")).unwrap();
    f.write_all_at(b"written during the heal", 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let waited = t.elapsed();
    heal_report("a write into a file under heal waited", waited);
    assert!(
        waited < Duration::from_secs(12),
        "the write waited {waited:?} for the heal"
    );
    // Full speed again, one brick at a time: the heal finishes and the copies agree.
    for i in 0..3 {
        c.kill(i);
        c.restart(i);
    }
    let took = c.wait_healed(Duration::from_secs(120));
    heal_report("heal after the write that interrupted it", took);
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
    let mut want = pattern(2, 48 * MIB);
    want[..23].copy_from_slice(b"written during the heal");
    assert!(fs::read(m.p("big")).unwrap() == want);
}

/// A name replaced by a new inode (a new gfid) while a brick was down: file by file, directory
/// by file, symlink by symlink, symlink by directory, file by hard link. The brick that was away
/// gets every new entry in seconds and nothing stays pending.
#[test]
fn names_replaced_by_new_inodes_while_a_brick_was_down_heal() {
    let mut c = Cluster::start(82, 3);
    let m = c.mount("m", "");
    fs::write(m.p("f"), b"a").unwrap();
    fs::create_dir(m.p("d")).unwrap();
    fs::write(m.p("d/inner"), b"in").unwrap();
    std::os::unix::fs::symlink("a", m.p("sl")).unwrap();
    std::os::unix::fs::symlink("b", m.p("sl2")).unwrap();
    fs::write(m.p("h"), b"old h").unwrap();
    fs::write(m.p("other"), b"other").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.kill(2);
    fs::remove_file(m.p("f")).unwrap();
    fs::write(m.p("f"), b"new").unwrap();
    fs::remove_dir_all(m.p("d")).unwrap();
    fs::write(m.p("d"), b"d is a file now").unwrap();
    fs::remove_file(m.p("sl")).unwrap();
    std::os::unix::fs::symlink("f", m.p("sl")).unwrap();
    fs::remove_file(m.p("sl2")).unwrap();
    fs::create_dir(m.p("sl2")).unwrap();
    fs::write(m.p("sl2/x"), b"x").unwrap();
    fs::remove_file(m.p("h")).unwrap();
    fs::hard_link(m.p("other"), m.p("h")).unwrap();
    c.restart(2);
    let took = c.wait_healed(Duration::from_secs(30));
    heal_report("names replaced by new inodes", took);
    assert_eq!(fs::read(c.brick_dir(2).join("f")).unwrap(), b"new");
    assert_eq!(
        fs::read(c.brick_dir(2).join("d")).unwrap(),
        b"d is a file now"
    );
    assert_eq!(
        fs::read_link(c.brick_dir(2).join("sl")).unwrap(),
        std::path::Path::new("f")
    );
    assert!(c.brick_dir(2).join("sl2/x").is_file());
    assert_eq!(fs::read(c.brick_dir(2).join("h")).unwrap(), b"other");
}

/// Item 4 of the replication issue: every brick dies in the middle of one write, two after
/// applying it and one before. Without a pre-op mark all three copies keep the same version
/// with different data, and nothing ever notices. With it, the two that applied it are
/// marked pending, the clean copy wins, and heal makes all three identical again.
#[test]
fn bricks_that_die_in_the_middle_of_a_write_are_healed_to_one_content() {
    let mut c = Cluster::start(92, 3);
    let m = c.mount("m", "");
    let old = pattern(1, 64 * 1024);
    fs::write(m.p("f"), &old).unwrap();
    // Each brick dies at the marked write: b0 and b1 after applying it, b2 before.
    for (i, when) in [(0, "after"), (1, "after"), (2, "before")] {
        c.kill(i);
        c.restart_env(i, &[("MORTAR_TEST_DIE_MID_WRITE", when)]);
    }
    // The mount's connections came back (its reads work again) before the fatal write.
    let t = Instant::now();
    while fs::read(m.p("f")).map(|d| d != old).unwrap_or(true) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "mount did not reconnect"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut new = b"MORTAR-TEST-DIE".to_vec();
    new.extend(pattern(2, 4096));
    let f = fs::OpenOptions::new().write(true).open(m.p("f")).unwrap();
    let r = f.write_all_at(&new, 0).and_then(|_| f.sync_all());
    assert!(r.is_err(), "the write cannot succeed: every brick died");
    drop(f);
    for i in 0..3 {
        c.kill(i);
        c.restart(i);
    }
    let took = c.wait_healed(Duration::from_secs(60));
    heal_report("after every brick died mid-write", took);
    // The clean copy (b2, which never applied the write) was the source.
    for i in 0..3 {
        assert_eq!(
            fs::read(c.brick_dir(i).join("f")).unwrap(),
            old,
            "brick b{i}"
        );
    }
    assert_eq!(fs::read(m.p("f")).unwrap(), old);
}

/// A network partition (every packet to and from one brick dropped, the brick itself running
/// on): writes go on with the other two within the ping timeout, and once the partition ends
/// the brick is healed to the same content.
#[test]
fn a_partitioned_brick_is_dropped_and_healed_after() {
    let c = Cluster::start(93, 3);
    let m = c.mount("m", "");
    fs::write(m.p("f"), b"before").unwrap();
    let cut = c.partition(2);
    let t = Instant::now();
    for i in 0..20u64 {
        fs::write(m.p(&format!("g{i}")), pattern(i, 8192)).unwrap();
    }
    fs::write(m.p("f"), b"during the partition").unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_secs(20), "writes stalled {took:?}");
    std::thread::sleep(Duration::from_secs(1));
    // The partition was real: the cut-off brick got none of it.
    assert_eq!(fs::read(c.brick_dir(2).join("f")).unwrap(), b"before");
    assert!(!c.brick_dir(2).join("g0").exists());
    drop(cut);
    let took = c.wait_healed(Duration::from_secs(60));
    heal_report("after a partition", took);
    assert_eq!(
        fs::read(c.brick_dir(2).join("f")).unwrap(),
        b"during the partition"
    );
    for i in 0..20u64 {
        assert_eq!(
            fs::read(c.brick_dir(2).join(format!("g{i}"))).unwrap(),
            pattern(i, 8192)
        );
    }
}

#[test]
fn two_wiped_bricks_are_refilled_from_the_last_copy() {
    // With two sinks, no new small file can be made complete in one step (another brick
    // lacks it too): the heal goes the usual way, inode by inode, and must still finish.
    let mut c = Cluster::start(98, 3);
    let m = c.mount("m", "");
    fs::create_dir(m.p("d")).unwrap();
    for f in 0..50 {
        fs::write(m.p(&format!("d/f{f}")), pattern(f, 100 + f as usize)).unwrap();
    }
    std::os::unix::fs::symlink("f1", m.p("d/link")).unwrap();
    for i in [1, 2] {
        c.kill(i);
        fs::remove_dir_all(c.brick_dir(i)).unwrap();
    }
    for i in [1, 2] {
        c.restart(i);
    }
    let took = c.wait_healed(Duration::from_secs(120));
    heal_report("two wiped bricks refilled from one (50 files)", took);
    c.kill(0);
    c.kill(2);
    assert_eq!(fs::read(m.p("d/f49")).unwrap(), pattern(49, 149));
    assert_eq!(fs::read_link(m.p("d/link")).unwrap().to_str(), Some("f1"));
}

/// A brick granted a lock whose answer its client never saw (a request cut short, a create
/// that failed after some bricks applied it). The client must give such a lock back when
/// another session asks for it: else heal and every other client wait on the inode for as
/// long as that client lives (the checker's `/c0/d2/n26`, stuck pending for 180 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lock_granted_to_a_client_that_never_saw_the_grant_is_given_back() {
    use mortar_common::gfid::Gfid;
    use mortar_proto as pb;
    let c = Cluster::start(101, 3);
    let (v1, v2) = (c.volume().await, c.volume().await);
    let f = v2
        .create(Gfid::ROOT, b"f", pb::Kind::File, 0o644, 0, 0, 0, b"")
        .await
        .unwrap();
    let g = Gfid::from_bytes(&f.gfid).unwrap();
    v2.write(g, 0, b"before".to_vec(), false).await.unwrap();
    // v1's sessions on b0 and b1 take g's lock behind v1's back: the grants v1 never saw.
    for b in &v1.bricks()[..2] {
        let up = b.up().unwrap();
        // v2's eager lock is given back when asked.
        let r = lock_now(&mut up.client.clone(), &up.session, g.to_vec(), true).await;
        assert!(
            r.errno == 0 || r.errno == libc::ESTALE,
            "{}: errno {}",
            b.id,
            r.errno
        );
    }
    // Two of three bricks hold the lock for v1: v2 gets a majority only if v1 lets go (a
    // brick gives a waiting lock up after 30 s, and then the write fails).
    v2.write(g, 0, b"after!".to_vec(), false).await.unwrap();
    assert_eq!(&v1.read(g, 0, 100).await.unwrap()[..], b"after!");
    let took = tokio::task::spawn_blocking(move || {
        let took = c.wait_healed(Duration::from_secs(30));
        drop(c);
        took
    })
    .await
    .unwrap();
    heal_report("orphaned locks given back", took);
}

/// A change that finds too few up-to-date copies (one brick back from an absence, another
/// away) needs a heal first. A mount's certificate allows no heal steps, so the mount
/// waits for the bricks' heal rather than fail the change with EIO (a regression of
/// session 5, seen in the checker's logs of session 6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_that_needs_a_heal_first_waits_for_the_bricks_heal() {
    use mortar_common::gfid::Gfid;
    let mut c = Cluster::start(102, 3);
    let m = c.mount("m", "");
    fs::write(m.p("f"), b"one").unwrap();
    c.kill(2);
    fs::write(m.p("f"), b"two").unwrap();
    c.kill(1);
    // b0 holds the only new copy. A session of the test's own holds the file's lock there,
    // so that no heal runs before the mount's change asks for one.
    let g = {
        let v = c.volume().await;
        let e = v.lookup(Gfid::ROOT, b"f").await.unwrap();
        Gfid::from_bytes(&e.gfid).unwrap()
    };
    let mut b0 = mortar_e2e::brick_client(&c.addr(0)).await;
    let holder = mortar_e2e::raw_session(&mut b0, "test-holder").await;
    let r = lock_now(&mut b0, &holder.id, g.to_vec(), true).await;
    assert!(r.errno == 0 || r.errno == libc::ESTALE, "errno {}", r.errno);
    let log = c.dir.join("m.log");
    let b2_ups = || {
        fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("brick up brick=b2")
            .count()
    };
    let seen = b2_ups();
    c.restart(2);
    until("the mount never saw b2 back", || b2_ups() != seen).await;
    // Lock requests that waited at b0 (its metrics endpoint).
    let metrics = format!("{}:25100", c.host(0));
    let waits = || {
        use std::io::{Read, Write};
        let mut text = String::new();
        if let Ok(mut s) = std::net::TcpStream::connect(&metrics) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: b0\r\nConnection: close\r\n\r\n");
            let _ = s.read_to_string(&mut text);
        }
        text.lines()
            .find(|l| l.starts_with("mortar_brick_lock_waits_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let before = waits();
    // The mount's change, waiting for the lock.
    let path = m.p("f");
    let writer = std::thread::spawn(move || fs::write(&path, b"three"));
    until("the mount never waited for the lock", || waits() != before).await;
    // Let go: the mount takes the lock, finds b0's copy alone up to date, and must wait for
    // the bricks to heal b2's.
    drop(holder);
    drop(b0);
    let r = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    r.expect("a change after a fault waits for the heal it needs");
    assert_eq!(fs::read(m.p("f")).unwrap(), b"three");
    c.restart(1);
    let took = tokio::task::spawn_blocking(move || {
        let took = c.wait_healed(Duration::from_secs(30));
        drop(m);
        drop(c);
        took
    })
    .await
    .unwrap();
    heal_report("after a change that waited for heal", took);
}

/// Waits until `done`, at most 20 s; fails with `what` after that.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < Duration::from_secs(20), "{what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A create that one brick applied and the others never answered fails (no majority). The
/// brick that applied it granted the creator the new inode's lock; the client must give it
/// back at once, not hold it while it lives (then only the contention notice of another
/// client's try would free it, and that try would fail first).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_that_fails_after_one_brick_applied_it_gives_the_new_inodes_lock_back() {
    use mortar_common::gfid::Gfid;
    use mortar_proto as pb;
    let c = Cluster::start(104, 3);
    // The bricks' first heal pass (of the root) is over: it would take the root's lock
    // from the client below, which then would have to lock it again for the second create.
    c.wait_healed(Duration::from_secs(30));
    // Keeps the root's lock between changes (eager), so that the second create is sent
    // without a lock round trip, to bricks that are stopped by then.
    let opts = mortar_replication::volume::Options {
        ping_timeout: Some(Duration::from_secs(2)),
        lock_idle: Duration::from_secs(60),
        ..Default::default()
    };
    let v = mortar_replication::volume::Volume::connect(&[c.addr(0)], "data", opts)
        .await
        .unwrap();
    v.create(Gfid::ROOT, b"a", pb::Kind::File, 0o644, 0, 0, 0, b"")
        .await
        .unwrap();
    c.signal(1, libc::SIGSTOP);
    c.signal(2, libc::SIGSTOP);
    let r = v
        .create(Gfid::ROOT, b"b", pb::Kind::File, 0o644, 0, 0, 0, b"")
        .await;
    assert!(
        r.is_err(),
        "a create applied on one brick of three succeeded: {r:?}"
    );
    // b0 made the name (and will lose it to heal); its lock must be free now. A busy answer
    // would also tell v of the contention and so free it: only the first try counts.
    let mut b0 = mortar_e2e::brick_client(&c.addr(0)).await;
    let e = b0
        .lookup(pb::LookupReq {
            parent: Gfid::ROOT.to_vec(),
            name: b"b".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.errno, 0, "b0 did not apply the create");
    let g = e.entry.unwrap().gfid;
    let holder = mortar_e2e::raw_session(&mut b0, "test-holder").await;
    let r = lock_now(&mut b0, &holder.id, g.clone(), false).await;
    assert_eq!(r.errno, 0, "the failed create's lock is still held at b0");
    b0.unlock(pb::UnlockReq {
        session: holder.id.clone(),
        gfids: vec![g],
        ..Default::default()
    })
    .await
    .unwrap();
    drop(holder);
    c.signal(1, libc::SIGCONT);
    c.signal(2, libc::SIGCONT);
    let took = tokio::task::spawn_blocking(move || {
        // (Healed means `mortar verify` agrees too.)
        let took = c.wait_healed(Duration::from_secs(30));
        drop(c);
        took
    })
    .await
    .unwrap();
    heal_report("a failed create's copy", took);
}

/// A file written without pause is healed while the writer goes on. The heal used to ask
/// for the file's lock without waiting, told the writer to let go, and asked again later:
/// by then the writer had taken it back, and so on (the bench's steady writer was in sync
/// only after 22 s, once after 42 s). After two such tries the heal now waits in the
/// bricks' queue.
#[test]
fn a_file_under_steady_writes_is_healed_while_the_writer_goes_on() {
    use std::io::Write;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut c = Cluster::start(105, 3);
    let m = c.mount("m", "");
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, stop) = (m.p("log"), stop.clone());
        std::thread::spawn(move || {
            let mut f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                f.write_all(&[b'x'; 512]).unwrap();
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    c.kill(2);
    std::thread::sleep(Duration::from_secs(2));
    c.restart(2);
    let t = Instant::now();
    // b2 lists the file as pending from its restart on (it missed writes): wait for that
    // first, then for the heal, the writer still going.
    while c.heal_pending() == 0 && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    while c.heal_pending() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the file is not healed 30 s after its brick's return, the writer going on:\n{}",
            c.heal_info()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = t.elapsed();
    assert!(!writer.is_finished(), "the writer stopped");
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes > 100, "only {writes} writes");
    c.wait_healed(Duration::from_secs(30));
    heal_report("a file under steady writes", took);
}

/// Asks a brick for inode `g`'s lock for `session`, at a term of the current time (above
/// any the test's clients used).
async fn lock_now(
    brick: &mut mortar_proto::brick_client::BrickClient<tonic::transport::Channel>,
    session: &[u8],
    g: Vec<u8>,
    wait: bool,
) -> mortar_proto::LockReply {
    let term = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    brick
        .lock(mortar_proto::LockReq {
            session: session.to_vec(),
            gfids: vec![g],
            term,
            wait,
        })
        .await
        .unwrap()
        .into_inner()
}
