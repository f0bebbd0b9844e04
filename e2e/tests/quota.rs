//! Directory quotas (PVC size limits): enforced on every brick alike, shown by df.

use std::fs;
use std::io::Write;

use mortar_common::gfid::Gfid;
use mortar_e2e::Cluster;

#[test]
fn a_quota_stops_writes_at_the_limit_and_df_shows_it() {
    let mut c = Cluster::start(41, 3);
    let m = c.mount("m", "");
    fs::create_dir_all(m.p("pvc-1/sub")).unwrap();
    fs::write(m.p("pvc-1/sub/old"), vec![7u8; 100_000]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let used = rt.block_on(async {
        let v = c.volume().await;
        let a = v.lookup(Gfid::ROOT, b"pvc-1").await.unwrap();
        let g = Gfid::from_bytes(&a.gfid).unwrap();
        v.set_quota(g, 1 << 20).await.unwrap();
        let q = v.quota(g).await.unwrap();
        v.shutdown().await;
        q
    });
    assert_eq!(used, Some((1 << 20, 100_000)), "existing files count");
    // df inside the directory shows the quota, not the volume.
    let st = rustix::fs::statvfs(m.p("pvc-1/sub")).unwrap();
    assert_eq!(st.f_blocks * st.f_frsize, 1 << 20);
    assert_eq!(
        (st.f_bavail * st.f_frsize) / 4096,
        ((1 << 20) - 100_000) / 4096
    );
    let whole = rustix::fs::statvfs(&m.path).unwrap();
    assert!(
        whole.f_blocks * whole.f_frsize > 1 << 30,
        "outside the quota df shows the volume"
    );

    // Writing past the limit fails with EDQUOT; what fits stays.
    let mut f = fs::File::create(m.p("pvc-1/big")).unwrap();
    let mut written = 0usize;
    let err = loop {
        match f.write_all(&[1u8; 64 * 1024]) {
            Ok(()) => written += 64 * 1024,
            Err(e) => break e,
        }
        assert!(written < 4 << 20, "the limit was not enforced");
    };
    assert_eq!(err.raw_os_error(), Some(libc::EDQUOT), "{err}");
    assert!(
        written <= (1 << 20) - 100_000 && written > 800_000,
        "wrote {written}"
    );
    drop(f);
    // Freeing space lets writes in again; other directories never had a limit.
    fs::remove_file(m.p("pvc-1/sub/old")).unwrap();
    fs::write(m.p("pvc-1/again"), vec![2u8; 90_000]).unwrap();
    fs::write(m.p("elsewhere"), vec![3u8; 3 << 20]).unwrap();
    // Every brick agrees on the tree, and a restarted brick counts the same usage.
    let (ok, out) = c.verify(false);
    assert!(ok, "{out}");
    c.kill(0);
    c.restart(0);
    c.kill(1);
    // (The mount reconnects to b0 within a couple of seconds; until then there is no quorum.)
    let t = std::time::Instant::now();
    let err = loop {
        let err = fs::write(m.p("pvc-1/over"), vec![0u8; 1 << 20]).unwrap_err();
        if err.raw_os_error() != Some(libc::EROFS)
            || t.elapsed() > std::time::Duration::from_secs(10)
        {
            break err;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EDQUOT),
        "after a restart: {err}"
    );
}
