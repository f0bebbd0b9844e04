//! The operator's real health probe against a real `mortar-brick` that speaks mutual TLS:
//! one process, two clusters with different CAs, each probed with its own certificate.
//!
//! Needs the brick binary (`cargo build --workspace`, or `-p mortar-brick`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mortar_common::tls::{Ca, Role, TlsFiles};
use mortar_operator::health::{GrpcHealthProbe, HealthError, HealthProbe};

const ADDR: &str = "127.157.0.11:24100";

fn brick_binary() -> PathBuf {
    // target/<profile>/deps/<test> → target/<profile>/mortar-brick
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().unwrap().parent().unwrap().join("mortar-brick");
    assert!(
        p.exists(),
        "{} missing: cargo build -p mortar-brick",
        p.display()
    );
    p
}

struct Brick(Child, PathBuf);

impl Drop for Brick {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn files(ca: &Ca, role: Role) -> TlsFiles {
    let (cert, key) = ca.issue(role, "vol", &[]).unwrap();
    TlsFiles::from_pem(ca.cert_pem.clone(), cert, key)
}

#[tokio::test]
async fn probes_speak_tls_with_each_clusters_own_ca() {
    let dir = std::env::temp_dir().join(format!("mortar-op-health-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let ours = Ca::generate("ours").unwrap();
    let theirs = Ca::generate("theirs").unwrap();
    let tls = ours
        .write_tls_dir(&dir.join("tls"), Role::Brick, "b0", &[])
        .unwrap();
    std::fs::write(
        dir.join("volfile.yaml"),
        format!("volume: data\ngeneration: 1\nbricks:\n- id: b0\n  address: {ADDR}\n"),
    )
    .unwrap();
    let child = Command::new(brick_binary())
        .args([
            "--id",
            "b0",
            "--listen",
            ADDR,
            "--metrics",
            "127.157.0.11:25100",
        ])
        .arg("--dir")
        .arg(dir.join("data"))
        .arg("--volfile")
        .arg(dir.join("volfile.yaml"))
        .arg("--tls-dir")
        .arg(&tls)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("brick.log")).unwrap())
        .spawn()
        .unwrap();
    let _brick = Brick(child, dir.clone());
    let probe = GrpcHealthProbe;
    let timeout = Duration::from_secs(2);

    // Our cluster's admin certificate: an answer (waiting for the brick to listen).
    let admin = files(&ours, Role::Admin);
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        match probe.probe(ADDR, Some(&admin), timeout).await {
            Ok(h) => break h,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "{e}\n{}",
                    std::fs::read_to_string(dir.join("brick.log")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(health.brick_id, "b0");
    assert_eq!(health.volume, "data");

    // Another cluster's certificate, in the same process: refused by this brick.
    let other = files(&theirs, Role::Admin);
    let err = probe.probe(ADDR, Some(&other), timeout).await.unwrap_err();
    assert!(matches!(err, HealthError::Unreachable { .. }), "{err}");
    // Plain TCP: no answer either.
    assert!(probe.probe(ADDR, None, timeout).await.is_err());
    // And ours still works after those (nothing process-wide was set by them).
    probe.probe(ADDR, Some(&admin), timeout).await.unwrap();
}
