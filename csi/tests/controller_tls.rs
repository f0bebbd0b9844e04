//! The controller on the Mortar backend against three real bricks that speak only mutual
//! TLS with a CA of their own, while this process has no TLS identity of its own: only the
//! secrets a request brings (a StorageClass's provisioner / controller-expand secret) get
//! it to the bricks.
//!
//! Needs the brick binary (`cargo build --workspace`). Bricks on 127.158.0.11-13.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use mortar_common::tls::{CA_FILE, CERT_FILE, Ca, KEY_FILE, Role};
use mortar_csi::csi::*;
use mortar_csi::mortar_ops::MortarResolver;
use mortar_csi::server::Mode;
use tonic::Code;

const HOSTS: [&str; 3] = ["127.158.0.11", "127.158.0.12", "127.158.0.13"];

struct Bricks {
    children: Vec<Child>,
    dir: PathBuf,
}

impl Drop for Bricks {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Bricks {
    fn data(&self, i: usize) -> PathBuf {
        self.dir.join(format!("b{i}"))
    }

    fn start(ca: &Ca) -> Bricks {
        let dir = std::env::temp_dir().join(format!("mortar-csi-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let volfile = dir.join("volfile.yaml");
        let mut text = "volume: data\ngeneration: 1\nping-timeout: 2\nbricks:\n".to_string();
        for (i, h) in HOSTS.iter().enumerate() {
            text += &format!("- id: b{i}\n  address: {h}:24100\n");
        }
        std::fs::write(&volfile, text).unwrap();
        let mut children = Vec::new();
        for (i, h) in HOSTS.iter().enumerate() {
            let data = dir.join(format!("b{i}"));
            std::fs::create_dir_all(&data).unwrap();
            let tls = ca
                .write_tls_dir(
                    &dir.join(format!("tls-b{i}")),
                    Role::Brick,
                    &format!("b{i}"),
                    &[],
                )
                .unwrap();
            children.push(
                Command::new(mortar_e2e::bin("mortar-brick"))
                    .args(["--id", &format!("b{i}"), "--listen", &format!("{h}:24100")])
                    .arg("--dir")
                    .arg(&data)
                    .arg("--volfile")
                    .arg(&volfile)
                    .arg("--tls-dir")
                    .arg(&tls)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.join(format!("b{i}.log"))).unwrap())
                    .spawn()
                    .unwrap(),
            );
        }
        Bricks { children, dir }
    }
}

fn secrets(ca: &Ca, role: Role) -> HashMap<String, String> {
    let (cert, key) = ca.issue(role, CLUSTER, &[]).unwrap();
    HashMap::from([
        (CA_FILE.to_string(), ca.cert_pem.clone()),
        (CERT_FILE.to_string(), cert),
        (KEY_FILE.to_string(), key),
    ])
}

fn quota_on(brick: &Path) -> bool {
    // The controller's size record is a user xattr of the PVC's directory.
    let out = Command::new("getfattr")
        .args(["--absolute-names", "-d", "-m", "user.mortar"])
        .arg(brick)
        .output();
    match out {
        Ok(o) => String::from_utf8_lossy(&o.stdout).contains("user.mortar.csi.limit"),
        // Without getfattr, the directory's presence is what can be checked.
        Err(_) => brick.is_dir(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provisioning_uses_the_secrets_identity_per_request() {
    // This test process never sets MORTAR_TLS_DIR: its own connections are plain TCP.
    assert!(std::env::var_os(mortar_common::tls::TLS_DIR_ENV).is_none());
    let ca = Ca::generate("shared").unwrap();
    let bricks = tokio::task::spawn_blocking({
        let ca = Ca {
            cert_pem: ca.cert_pem.clone(),
            key_pem: ca.key_pem.clone(),
        };
        move || Bricks::start(&ca)
    })
    .await
    .unwrap();

    let layout = Layout::new("controller-tls");
    let resolver = MortarResolver::new(format!("{}:24100", HOSTS[0]), vec![])
        .with_ping_timeout(Duration::from_secs(2));
    let (server, mut c) =
        InProcess::start_with(&layout, Mode::Controller, None, Arc::new(resolver)).await;
    let admin = secrets(&ca, Role::Admin);

    // Secrets that lack a key: a bad request, whatever the bricks would say.
    let mut req = create_req("pvc-tls-1", 10 * MIB);
    req.secrets = HashMap::from([(CA_FILE.to_string(), ca.cert_pem.clone())]);
    assert_code(
        c.controller.create_volume(req).await,
        Code::InvalidArgument,
        "provisioner secrets without a certificate",
    );
    // No secrets: the process's own plain TCP, which these bricks do not answer.
    assert_code(
        c.controller
            .create_volume(create_req("pvc-tls-1", 10 * MIB))
            .await,
        Code::Unavailable,
        "no identity",
    );
    // Another cluster's certificate: refused by the bricks too.
    let mut req = create_req("pvc-tls-1", 10 * MIB);
    req.secrets = secrets(&Ca::generate("other").unwrap(), Role::Admin);
    assert_code(
        c.controller.create_volume(req).await,
        Code::Unavailable,
        "a certificate of another CA",
    );

    // The cluster's admin Secret: created, with its size limit, on every brick. The bricks
    // may still be starting: the CO retries Unavailable, so does this test.
    let deadline = Instant::now() + Duration::from_secs(30);
    let vol = loop {
        let mut req = create_req("pvc-tls-1", 10 * MIB);
        req.secrets = admin.clone();
        match c.controller.create_volume(req).await {
            Ok(r) => break r.into_inner().volume.unwrap(),
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s}"),
        }
    };
    let dir = vol.volume_id.rsplit('/').next().unwrap().to_string();
    for i in 0..3 {
        assert!(quota_on(&bricks.data(i).join(&dir)), "brick {i}");
    }

    // Expand with the controller-expand secret (the same admin Secret).
    let mut expand = ControllerExpandVolumeRequest {
        volume_id: vol.volume_id.clone(),
        capacity_range: Some(CapacityRange {
            required_bytes: 20 * MIB,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    expand.secrets = admin.clone();
    let r = c
        .controller
        .controller_expand_volume(expand)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.capacity_bytes, 20 * MIB);

    // A mount's certificate may not set quotas (the bricks check the role): no volume.
    // A busy machine may keep the new connections from coming up within the ping timeout
    // (2 s here): that is Unavailable, which the CO retries, and so does this test.
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        let mut req = create_req("pvc-tls-2", 10 * MIB);
        req.secrets = secrets(&ca, Role::Client);
        match c.controller.create_volume(req).await {
            Err(s) if s.code() == Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => break r.unwrap_err(),
        }
    };
    // Every brick refused it for the role: PERMISSION_DENIED (not UNAVAILABLE, which the
    // CO would retry for ever).
    assert_eq!(err.code(), Code::PermissionDenied, "{err}");
    assert!(
        !bricks
            .data(0)
            .join(mortar_csi::volume_id::dir_for_name("pvc-tls-2"))
            .exists()
    );

    // Delete with the provisioner secret.
    let mut del = DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    };
    del.secrets = admin.clone();
    c.controller.delete_volume(del).await.unwrap();
    for i in 0..3 {
        assert!(!bricks.data(i).join(&dir).exists(), "brick {i}");
    }
    server.stop().await;
}
