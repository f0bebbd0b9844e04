//! Nothing a client does reaches outside a brick's directory: the attack that used to work
//! (swap a directory with a symlink to outside, with `renameat2(RENAME_EXCHANGE)`, while
//! another mount works inside it) runs for 30 s (CONFINEMENT_SECS) and nothing outside
//! changes.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use mortar_e2e::Cluster;

/// Everything under `dir`: name, mode, owner, size, content.
fn snapshot(dir: &Path) -> Vec<(String, u32, u32, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            if m.is_dir() {
                stack.push(p.clone());
            }
            let data = if m.is_file() {
                fs::read(&p).unwrap()
            } else {
                vec![]
            };
            out.push((p.display().to_string(), m.mode(), m.uid(), m.len(), data));
        }
    }
    out.sort();
    out
}

#[test]
fn rename_exchange_with_a_symlink_never_leads_a_brick_outside() {
    let secs: u64 = std::env::var("CONFINEMENT_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let c = Cluster::start(81, 3);
    // The bricks are DIR/bN; a symlink `../../X` at a brick's root names DIR/../X, outside.
    // The mounts sit two levels deeper, so for the clients the same link stays inside DIR.
    let outside = tempfile::Builder::new()
        .prefix("mortar-outside")
        .tempdir_in(c.dir.parent().unwrap())
        .unwrap();
    let target = format!(
        "../../{}",
        outside.path().file_name().unwrap().to_string_lossy()
    );
    fs::write(outside.path().join("victim"), b"untouched").unwrap();
    fs::set_permissions(
        outside.path().join("victim"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    fs::create_dir(outside.path().join("sub")).unwrap();
    let before = snapshot(outside.path());

    fs::create_dir_all(c.dir.join("x/y")).unwrap();
    let m1 = c.mount("x/y/m1", "");
    let m2 = c.mount("x/y/m2", "");
    fs::create_dir(m1.p("d")).unwrap();
    fs::create_dir(m1.p("d/sub")).unwrap();
    std::os::unix::fs::symlink(&target, m1.p("s")).unwrap();
    assert_eq!(
        fs::read_link(c.brick_dir(0).join("s"))
            .unwrap()
            .to_string_lossy(),
        target
    );

    let stop = Arc::new(AtomicBool::new(false));
    let swaps = Arc::new(AtomicU64::new(0));
    let ops = Arc::new(AtomicU64::new(0));
    let swapper = {
        let (stop, swaps) = (stop.clone(), swaps.clone());
        let (a, b) = (m1.p("d"), m1.p("s"));
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                if rustix::fs::renameat_with(
                    rustix::fs::CWD,
                    &a,
                    rustix::fs::CWD,
                    &b,
                    rustix::fs::RenameFlags::EXCHANGE,
                )
                .is_ok()
                {
                    swaps.fetch_add(1, Relaxed);
                }
            }
        })
    };
    let workers: Vec<_> = [m1.path.clone(), m2.path.clone()]
        .into_iter()
        .map(|root| {
            let (stop, ops) = (stop.clone(), ops.clone());
            std::thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Relaxed) {
                    i += 1;
                    // Whichever name is the directory right now, work inside it.
                    for dir in ["d", "s"] {
                        let f = root.join(dir).join("victim");
                        let sub = root.join(dir).join("sub");
                        let _ = fs::write(&f, format!("written {i}"));
                        let _ = fs::set_permissions(&f, fs::Permissions::from_mode(0o4777));
                        let _ = std::os::unix::fs::chown(&f, Some(0), Some(0));
                        let _ = fs::remove_file(&f);
                        let _ = fs::create_dir(sub.join("new"));
                        let _ = fs::remove_dir(sub.join("new"));
                        let _ = fs::set_permissions(&sub, fs::Permissions::from_mode(0o777));
                        let _ = fs::remove_dir(&sub);
                        let _ = fs::create_dir(&sub);
                        ops.fetch_add(1, Relaxed);
                    }
                }
            })
        })
        .collect();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            snapshot(outside.path()),
            before,
            "something outside the bricks changed"
        );
    }
    stop.store(true, Relaxed);
    swapper.join().unwrap();
    for w in workers {
        w.join().unwrap();
    }
    println!(
        "{} swaps, {} rounds of work in {secs} s",
        swaps.load(Relaxed),
        ops.load(Relaxed)
    );
    assert!(swaps.load(Relaxed) > 10, "the race did not run");
    assert_eq!(snapshot(outside.path()), before);
}
