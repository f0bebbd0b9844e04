//! NodeStage/NodePublish with the secrets a StorageClass's
//! `csi.storage.k8s.io/node-stage-secret-*` (and `node-publish-secret-*`) make kubelet pass:
//! the cluster's client certificate, written as a private TLS directory and handed to the
//! mount helper. Driven over the unix socket like kubelet, with the logging mount stand-in.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;
use mortar_common::tls::{CA_FILE, CERT_FILE, Ca, KEY_FILE, Role};
use mortar_csi::server::Mode;
use tonic::Code;

fn client_secrets(ca: &Ca) -> HashMap<String, String> {
    let (cert, key) = ca.issue(Role::Client, CLUSTER, &[]).unwrap();
    HashMap::from([
        (CA_FILE.to_string(), ca.cert_pem.clone()),
        (CERT_FILE.to_string(), cert),
        (KEY_FILE.to_string(), key),
    ])
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[tokio::test]
async fn stage_with_secrets_writes_a_private_tls_dir_and_mounts_with_it() {
    let layout = Layout::new("node-tls");
    let cmd = layout.write_mount_command(false);
    let (server, mut c) = InProcess::start(&layout, Mode::All, Some(layout.node_config(cmd))).await;
    let id = c
        .controller
        .create_volume(create_req("pvc-tls", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = layout
        .scratch
        .join("kubelet/plugins/pv/pvc-tls/globalmount");
    let ca = Ca::generate("shared").unwrap();
    let secrets = client_secrets(&ca);

    // Keys missing: refused before anything is mounted or written, naming what is missing
    // and no secret value.
    for drop in [CA_FILE, CERT_FILE, KEY_FILE] {
        let mut partial = secrets.clone();
        partial.remove(drop);
        let mut req = stage_req(&id, &staging);
        req.secrets = partial;
        let err = c.node.node_stage_volume(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err}");
        assert!(err.message().contains(drop), "{}", err.message());
        assert!(!err.message().contains("BEGIN"), "{}", err.message());
    }
    let mut not_pem = secrets.clone();
    not_pem.insert(KEY_FILE.into(), "not a key".into());
    let mut req = stage_req(&id, &staging);
    req.secrets = not_pem;
    assert_code(
        c.node.node_stage_volume(req).await,
        Code::InvalidArgument,
        "a tls.key that is not PEM",
    );
    assert!(
        layout.mount_calls().is_empty(),
        "{:?}",
        layout.mount_calls()
    );
    let tls_root = layout.state.join("tls");
    assert!(!tls_root.exists(), "nothing written for a refused request");

    // With the client Secret: a 0700 directory of 0600 files, keyed by the cluster.
    let mut req = stage_req(&id, &staging);
    req.secrets = secrets.clone();
    c.node.node_stage_volume(req).await.unwrap();
    let dir = tls_root.join(format!("{NAMESPACE}_{CLUSTER}_data"));
    assert_eq!(mode(&tls_root), 0o700);
    assert_eq!(mode(&dir), 0o700);
    for k in [CA_FILE, CERT_FILE, KEY_FILE] {
        assert_eq!(mode(&dir.join(k)), 0o600, "{k}");
        assert_eq!(
            std::fs::read_to_string(dir.join(k)).unwrap(),
            secrets[k],
            "{k}"
        );
    }
    let entries: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(entries.len(), 3, "no temporary files left: {entries:?}");
    // The mount helper got it.
    assert_eq!(
        layout.mount_calls(),
        vec![format!(
            "shared.storage.svc:24100:/data {} -o tls-dir={}",
            layout.shared_mount().display(),
            dir.display()
        )]
    );
    assert!(is_mount_point(&staging));

    // Publish with node-publish secrets of a renewed certificate: it only binds (no new
    // mount), but the files follow, and the running mount reads them at its next
    // connection (e2e `security.rs`).
    let first = client_secrets(&ca);
    let target = layout.scratch.join("kubelet/pods/p1/volumes/pvc-tls/mount");
    let mut req = publish_req(&id, &staging, &target, false);
    req.secrets = first.clone();
    c.node.node_publish_volume(req).await.unwrap();
    assert!(is_mount_point(&target));
    assert_eq!(layout.mount_calls().len(), 1);
    assert_eq!(
        std::fs::read_to_string(dir.join(CERT_FILE)).unwrap(),
        first[CERT_FILE]
    );
    // Kubelet's republish of the same target (the chart sets `requiresRepublish`) with the
    // Secret renewed again: nothing to mount, the files follow once more.
    let renewed = client_secrets(&ca);
    let mut req = publish_req(&id, &staging, &target, false);
    req.secrets = renewed.clone();
    c.node.node_publish_volume(req).await.unwrap();
    assert_eq!(layout.mount_calls().len(), 1);
    assert_eq!(
        std::fs::read_to_string(dir.join(CERT_FILE)).unwrap(),
        renewed[CERT_FILE]
    );
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
    let mut bad = publish_req(&id, &staging, &target, false);
    bad.secrets = HashMap::from([(CA_FILE.to_string(), ca.cert_pem.clone())]);
    assert_code(
        c.node.node_publish_volume(bad).await,
        Code::InvalidArgument,
        "publish secrets without a certificate",
    );

    // A second stage of the same cluster (another PVC) with the renewed certificate: the
    // shared mount is there, the files are replaced.
    let mut req = stage_req(&id, &staging);
    req.secrets = renewed.clone();
    c.node.node_stage_volume(req).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join(CERT_FILE)).unwrap(),
        renewed[CERT_FILE]
    );
    assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);

    // Without secrets (a StorageClass that names none) after the last unstage, the next
    // mount still uses the cluster's directory the plugin keeps.
    c.node
        .node_unpublish_volume(unpublish_req(&id, &target))
        .await
        .unwrap();
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    assert!(!is_mount_point(&layout.shared_mount()));
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    assert!(
        layout.mount_calls()[1].ends_with(&format!("-o tls-dir={}", dir.display())),
        "{:?}",
        layout.mount_calls()
    );
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    server.stop().await;
}

#[tokio::test]
async fn stage_without_secrets_passes_no_tls_dir() {
    let layout = Layout::new("node-no-tls");
    let cmd = layout.write_mount_command(false);
    let (server, mut c) = InProcess::start(&layout, Mode::All, Some(layout.node_config(cmd))).await;
    let id = c
        .controller
        .create_volume(create_req("pvc-plain", 10 * MIB))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let staging = layout
        .scratch
        .join("kubelet/plugins/pv/pvc-plain/globalmount");
    c.node
        .node_stage_volume(stage_req(&id, &staging))
        .await
        .unwrap();
    assert_eq!(
        layout.mount_calls(),
        vec![format!(
            "shared.storage.svc:24100:/data {}",
            layout.shared_mount().display()
        )]
    );
    assert!(!layout.state.join("tls").exists());
    c.node
        .node_unstage_volume(unstage_req(&id, &staging))
        .await
        .unwrap();
    server.stop().await;
}
