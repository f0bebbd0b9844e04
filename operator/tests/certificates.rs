//! The cluster's certificates against the fake API server: what the operator creates, what
//! the brick pods mount, what its probes show, and what it renews.

mod support;

use http::Method;
use mortar_common::tls::{CA_FILE, CA_KEY_FILE, CERT_FILE, KEY_FILE};
use mortar_operator::certs::{self, Leaf, LeafStep};
use mortar_operator::crd::SharedStorageClusterSpec;
use mortar_operator::resources;
use serde_json::{Value, json};
use support::*;

const DAY: i64 = 24 * 3600;

fn spec(bricks: i32) -> SharedStorageClusterSpec {
    SharedStorageClusterSpec {
        bricks,
        ..SharedStorageClusterSpec::default()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn ca_info(h: &Harness) -> certs::CaInfo {
    match certs::check_ca(secret_data(&h.api, CA_SECRET_PATH).as_ref(), now()) {
        certs::CaCheck::Usable(info) => info,
        other => panic!("{other:?}"),
    }
}

fn pod_template(h: &Harness) -> Value {
    h.sts()["spec"]["template"].clone()
}

fn tls_hash(h: &Harness) -> String {
    pod_template(h)["metadata"]["annotations"][resources::TLS_HASH_ANNOTATION]
        .as_str()
        .unwrap()
        .to_string()
}

fn deleted_pods(h: &Harness) -> Vec<String> {
    h.calls_matching(Method::DELETE, PODS_PATH)
        .into_iter()
        .map(|c| c.path.rsplit('/').next().unwrap().to_string())
        .collect()
}

/// Replace a Secret's data (as someone with `kubectl edit` would).
fn put_data(h: &Harness, path: &str, data: &[(&str, &str)]) {
    let secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(h.api.get(path).unwrap()).unwrap();
    let mut secret = secret;
    secret.data = Some(
        data.iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    k8s_openapi::ByteString(v.as_bytes().to_vec()),
                )
            })
            .collect(),
    );
    h.api.put(path, serde_json::to_value(&secret).unwrap());
}

/// A certificate of `role` for the cluster signed by its CA, valid from `from` to `until`.
fn issue_by_hand(
    ca: &certs::CaInfo,
    cn: &str,
    san: bool,
    from: i64,
    until: i64,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let names = if san {
        vec![mortar_common::tls::BRICK_SERVER_NAME.to_string()]
    } else {
        vec![]
    };
    let mut p = rcgen::CertificateParams::new(names).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, cn);
    p.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &ca.signer_pem,
        rcgen::KeyPair::from_pem(&ca.key_pem).unwrap(),
    )
    .unwrap();
    (
        p.signed_by(&key, &issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

#[tokio::test]
async fn the_operator_makes_a_ca_and_three_certificates_and_the_bricks_mount_theirs() {
    let h = Harness::new(spec(3));
    h.reconcile().await.unwrap(); // finalizer
    h.reconcile().await.unwrap();

    // The CA: Opaque, ca.crt + ca.key, owned by the cluster.
    let ca_obj = h.api.get(CA_SECRET_PATH).expect("CA Secret");
    assert_eq!(ca_obj["type"], "Opaque");
    assert_eq!(ca_obj["metadata"]["ownerReferences"][0]["uid"], "ssc-uid");
    assert_eq!(ca_obj["metadata"]["ownerReferences"][0]["controller"], true);
    let ca = ca_info(&h);
    assert!(ca.not_after > now() + 3000 * DAY, "ten years");

    // Three TLS Secrets of that CA, each with its role, each owned by the cluster.
    for (path, leaf, cn) in [
        (BRICK_SECRET_PATH, Leaf::Brick, "brick/vol"),
        (CLIENT_SECRET_PATH, Leaf::Client, "client/vol"),
        (ADMIN_SECRET_PATH, Leaf::Admin, "admin/vol"),
    ] {
        let obj = h.api.get(path).unwrap_or_else(|| panic!("{path} missing"));
        assert_eq!(obj["type"], "kubernetes.io/tls", "{path}");
        assert_eq!(obj["metadata"]["ownerReferences"][0]["uid"], "ssc-uid");
        let data = secret_data(&h.api, path).unwrap();
        let keys: Vec<&str> = data.keys().map(String::as_str).collect();
        assert_eq!(keys, [CA_FILE, CERT_FILE, KEY_FILE], "{path}");
        assert_eq!(data[CA_FILE], ca.bundle, "{path}: ca.crt is the CA's");
        assert_eq!(common_name(&data[CERT_FILE]), cn);
        // Signed by the CA, the right role, the brick one naming mortar-brick.
        assert!(
            matches!(
                certs::check_leaf(&ca, Some(&data), leaf, now()),
                LeafStep::Keep { .. }
            ),
            "{path}"
        );
    }
    // The CA's key is not in any leaf Secret.
    for path in [BRICK_SECRET_PATH, CLIENT_SECRET_PATH, ADMIN_SECRET_PATH] {
        assert!(!secret_data(&h.api, path).unwrap().contains_key(CA_KEY_FILE));
    }

    // The brick pods mount the brick Secret and run with --tls-dir, never plain TCP.
    let template = pod_template(&h);
    let pod = &template["spec"];
    let c = &pod["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(!args.contains(&"--insecure-plaintext"), "{args:?}");
    let at = args
        .iter()
        .position(|a| *a == "--tls-dir")
        .expect("--tls-dir");
    assert_eq!(args[at + 1], resources::TLS_DIR);
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == resources::TLS_DIR)
        .expect("the TLS directory is mounted");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    assert_eq!(volume["secret"]["secretName"], "vol-brick-tls");
    assert_eq!(volume["secret"]["defaultMode"], 0o400);
    // The template carries the hash of exactly the brick Secret.
    let brick_secret: k8s_openapi::api::core::v1::Secret =
        serde_json::from_value(h.api.get(BRICK_SECRET_PATH).unwrap()).unwrap();
    assert_eq!(tls_hash(&h), resources::secret_hash(&brick_secret));

    // The status tells when they end, and the condition says they are fine.
    let status = h.status();
    let certs_status = &status["certificates"];
    assert_eq!(certs_status["caSecret"], "vol-ca");
    assert!(certs_status["caNotAfter"].is_string(), "{status:#}");
    assert!(certs_status["notAfter"].is_string(), "{status:#}");
    let leaves = certs_status["leaves"].as_array().unwrap();
    assert_eq!(leaves.len(), 3);
    assert!(
        leaves
            .iter()
            .any(|l| l["role"] == "client" && l["secret"] == "vol-client-tls")
    );
    let ready = h.condition("CertificatesReady");
    assert_eq!(ready["status"], "True", "{ready}");
    let events = h.calls_matching(Method::POST, "/apis/events.k8s.io/v1/namespaces/ns/events");
    assert!(
        events
            .iter()
            .any(|e| e.body["reason"] == "CertificatesIssued"),
        "{events:?}"
    );

    // Nothing changes while they are valid: same data, same hash, no event.
    let before =
        [CA_SECRET_PATH, BRICK_SECRET_PATH, CLIENT_SECRET_PATH].map(|p| secret_data(&h.api, p));
    let hash = tls_hash(&h);
    h.api.clear_calls();
    h.reconcile().await.unwrap();
    let after =
        [CA_SECRET_PATH, BRICK_SECRET_PATH, CLIENT_SECRET_PATH].map(|p| secret_data(&h.api, p));
    assert_eq!(before, after);
    assert_eq!(tls_hash(&h), hash);
    assert!(
        h.calls_matching(Method::PATCH, CA_SECRET_PATH).is_empty(),
        "the CA Secret is written only when made"
    );
    assert!(
        !h.calls_matching(Method::POST, "/apis/events.k8s.io")
            .iter()
            .any(|e| e.body["reason"] == "CertificatesIssued")
    );
}

#[tokio::test]
async fn health_probes_use_the_clusters_ca_and_the_admin_certificate() {
    // FakeBricks refuses plain TCP, other CAs and mount certificates: a Ready cluster
    // means every probe showed this cluster's admin certificate.
    let h = Harness::ready_cluster(spec(3)).await;
    let probed = h.bricks.probed_as.lock().unwrap().clone();
    assert!(!probed.is_empty());
    assert!(probed.iter().all(|cn| cn == "admin/vol"), "{probed:?}");

    // A CA Secret replaced by one the bricks do not know: the probes' certificate is of
    // the old CA, so the bricks refuse it until the certificates follow.
    let other = mortar_common::tls::Ca::generate("other").unwrap();
    let (admin_cert, admin_key) = other
        .issue(mortar_common::tls::Role::Admin, "vol", &[])
        .unwrap();
    put_data(
        &h,
        ADMIN_SECRET_PATH,
        &[
            (CA_FILE, &other.cert_pem),
            (CERT_FILE, &admin_cert),
            (KEY_FILE, &admin_key),
        ],
    );
    // The operator sees an admin certificate of another CA, replaces it, and probes with
    // the new one in the same round.
    h.reconcile().await.unwrap();
    assert_eq!(h.status()["phase"], "Ready", "{:#}", h.status());
    let data = secret_data(&h.api, ADMIN_SECRET_PATH).unwrap();
    assert_ne!(data[CERT_FILE], admin_cert);
    assert_eq!(data[CA_FILE], ca_info(&h).bundle);
}

#[tokio::test]
async fn a_brick_certificate_near_its_end_is_renewed_and_the_bricks_roll() {
    let h = Harness::ready_cluster(spec(3)).await;
    let ca = ca_info(&h);
    let old_hash = tls_hash(&h);
    let old_revision = h.pod_revision(2);
    let client_before = secret_data(&h.api, CLIENT_SECRET_PATH).unwrap();

    // A year's certificate with 20 days left (issued 345 days ago).
    let t = now();
    let (cert, key) = issue_by_hand(&ca, "brick/vol", true, t - 345 * DAY, t + 20 * DAY);
    put_data(
        &h,
        BRICK_SECRET_PATH,
        &[(CA_FILE, &ca.bundle), (CERT_FILE, &cert), (KEY_FILE, &key)],
    );
    // The hash in the template still is the old Secret's: the pods run the old certificate.
    h.reconcile().await.unwrap();
    let renewed = secret_data(&h.api, BRICK_SECRET_PATH).unwrap();
    assert_ne!(renewed[CERT_FILE], cert, "renewed");
    match certs::check_leaf(&ca, Some(&renewed), Leaf::Brick, now()) {
        LeafStep::Keep { not_after } => assert!(not_after > t + 300 * DAY),
        other => panic!("{other:?}"),
    }
    let new_hash = tls_hash(&h);
    assert_ne!(
        new_hash, old_hash,
        "the pod template changes with the certificate"
    );
    // An event says so (kube's recorder makes a repeat of one reason a series: a patch).
    let events: Vec<_> = h
        .api
        .calls()
        .into_iter()
        .filter(|c| {
            c.path
                .starts_with("/apis/events.k8s.io/v1/namespaces/ns/events")
        })
        .collect();
    assert!(!events.is_empty(), "an event for the renewal");
    // Only the brick certificate was renewed.
    assert_eq!(
        secret_data(&h.api, CLIENT_SECRET_PATH).unwrap(),
        client_before
    );

    // The new template is a new revision: the bricks are replaced one at a time, the
    // highest first, as for any template change.
    h.run_statefulset_controller();
    h.reconcile().await.unwrap();
    assert_eq!(deleted_pods(&h), ["vol-brick-2"]);
    h.run_statefulset_controller();
    assert_ne!(h.pod_revision(2), old_revision);
    h.reconcile().await.unwrap();
    assert_eq!(deleted_pods(&h), ["vol-brick-2", "vol-brick-1"]);
    // The renewed certificate is kept from now on.
    assert_eq!(tls_hash(&h), new_hash);
}

#[tokio::test]
async fn certificates_of_another_ca_or_garbage_are_replaced_and_a_missing_one_comes_back() {
    let h = Harness::ready_cluster(spec(3)).await;
    let ca = ca_info(&h);
    let brick_hash = tls_hash(&h);

    let other = mortar_common::tls::Ca::generate("other").unwrap();
    let (cert, key) = other
        .issue(mortar_common::tls::Role::Client, "vol", &[])
        .unwrap();
    put_data(
        &h,
        CLIENT_SECRET_PATH,
        &[
            (CA_FILE, &other.cert_pem),
            (CERT_FILE, &cert),
            (KEY_FILE, &key),
        ],
    );
    h.reconcile().await.unwrap();
    let client = secret_data(&h.api, CLIENT_SECRET_PATH).unwrap();
    assert_ne!(client[CERT_FILE], cert);
    assert_eq!(client[CA_FILE], ca.bundle);
    assert!(matches!(
        certs::check_leaf(&ca, Some(&client), Leaf::Client, now()),
        LeafStep::Keep { .. }
    ));
    // The mounts' certificate is not the bricks': the bricks are not rolled for it.
    assert_eq!(tls_hash(&h), brick_hash);

    put_data(
        &h,
        CLIENT_SECRET_PATH,
        &[(CERT_FILE, "garbage"), (KEY_FILE, "x")],
    );
    h.reconcile().await.unwrap();
    let client = secret_data(&h.api, CLIENT_SECRET_PATH).unwrap();
    assert!(matches!(
        certs::check_leaf(&ca, Some(&client), Leaf::Client, now()),
        LeafStep::Keep { .. }
    ));

    h.api.remove(BRICK_SECRET_PATH);
    h.reconcile().await.unwrap();
    assert!(h.api.get(BRICK_SECRET_PATH).is_some());
    assert_ne!(
        tls_hash(&h),
        brick_hash,
        "a new brick certificate rolls the bricks"
    );
}

#[tokio::test]
async fn a_ca_that_cannot_sign_is_reported_and_nothing_is_issued() {
    let h = Harness::ready_cluster(spec(3)).await;
    let client_before = secret_data(&h.api, CLIENT_SECRET_PATH).unwrap();
    let hash = tls_hash(&h);
    let other = mortar_common::tls::Ca::generate("other").unwrap();
    let ca = ca_info(&h);
    // A key that is not the CA's.
    put_data(
        &h,
        CA_SECRET_PATH,
        &[(CA_FILE, &ca.bundle), (CA_KEY_FILE, &other.key_pem)],
    );
    h.api.remove(ADMIN_SECRET_PATH);
    h.api.clear_calls();
    h.reconcile().await.unwrap();
    let cond = h.condition("CertificatesReady");
    assert_eq!(cond["status"], "False", "{cond}");
    assert_eq!(cond["reason"], "CAUnusable");
    assert!(
        cond["message"]
            .as_str()
            .unwrap()
            .contains("does not belong"),
        "{cond}"
    );
    // Nothing written: no CA replaced, no certificate issued; the bricks keep theirs.
    assert!(h.calls_matching(Method::PATCH, SECRETS_PATH).is_empty());
    assert!(h.api.get(ADMIN_SECRET_PATH).is_none());
    assert_eq!(
        secret_data(&h.api, CLIENT_SECRET_PATH).unwrap(),
        client_before
    );
    assert_eq!(tls_hash(&h), hash);
    // Without the admin certificate the operator cannot ask the bricks.
    assert_eq!(h.status()["readyBricks"], 0);

    // Put right (the CA's own key back): certificates are issued again.
    put_data(
        &h,
        CA_SECRET_PATH,
        &[(CA_FILE, &ca.bundle), (CA_KEY_FILE, &ca.key_pem)],
    );
    h.reconcile().await.unwrap();
    assert_eq!(h.condition("CertificatesReady")["status"], "True");
    assert!(h.api.get(ADMIN_SECRET_PATH).is_some());
    assert_eq!(h.status()["phase"], "Ready");
}

/// The manual CA rotation of SECURITY.md, step by step: the bundle is trusted everywhere
/// first, then the new CA signs, then the old one goes.
#[tokio::test]
async fn a_ca_bundle_is_trusted_everywhere_and_the_first_ca_signs() {
    let h = Harness::ready_cluster(spec(3)).await;
    let old = ca_info(&h);
    let new = mortar_common::tls::Ca::generate("vol-2").unwrap();
    let brick_cert = secret_data(&h.api, BRICK_SECRET_PATH).unwrap()[CERT_FILE].clone();
    let hash0 = tls_hash(&h);

    // 1. Trust both, the old one still signing: certificates kept, ca.crt everywhere grows.
    let both = format!("{}{}", old.bundle, new.cert_pem);
    put_data(
        &h,
        CA_SECRET_PATH,
        &[(CA_FILE, &both), (CA_KEY_FILE, &old.key_pem)],
    );
    h.reconcile().await.unwrap();
    let brick = secret_data(&h.api, BRICK_SECRET_PATH).unwrap();
    assert_eq!(brick[CERT_FILE], brick_cert, "kept");
    assert_eq!(brick[CA_FILE], both);
    let hash1 = tls_hash(&h);
    assert_ne!(hash1, hash0, "bricks roll to trust both");

    // 2. The new CA signs (first), the old is still trusted: every certificate re-issued.
    let swapped = format!("{}{}", new.cert_pem, old.bundle);
    put_data(
        &h,
        CA_SECRET_PATH,
        &[(CA_FILE, &swapped), (CA_KEY_FILE, &new.key_pem)],
    );
    h.reconcile().await.unwrap();
    let info = ca_info(&h);
    for path in [BRICK_SECRET_PATH, CLIENT_SECRET_PATH, ADMIN_SECRET_PATH] {
        let data = secret_data(&h.api, path).unwrap();
        assert_eq!(data[CA_FILE], swapped, "{path}");
        let leaf = match path {
            BRICK_SECRET_PATH => Leaf::Brick,
            CLIENT_SECRET_PATH => Leaf::Client,
            _ => Leaf::Admin,
        };
        assert!(
            matches!(
                certs::check_leaf(&info, Some(&data), leaf, now()),
                LeafStep::Keep { .. }
            ),
            "{path} signed by the new CA"
        );
    }
    assert_ne!(tls_hash(&h), hash1);
    assert_eq!(
        h.api.get(CA_SECRET_PATH).unwrap()["data"][CA_FILE],
        json!(k8s_openapi::ByteString(swapped.into_bytes()))
    );
}

/// A CA near its end is replaced by the operator itself, in three steps a day apart (the
/// test moves the Secret's `rotation-since` back instead of waiting): at every step each
/// certificate in use is signed by a CA that every peer trusts.
#[tokio::test]
async fn a_ca_near_its_end_is_replaced_in_three_steps_and_every_certificate_follows() {
    use certs::{NEXT_KEY_FILE, RETIRING_FILE, SINCE_FILE};
    let h = Harness::ready_cluster(spec(3)).await;
    let t = now();
    // A CA of ten years with a month left, made by hand.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "mortar CA ns/vol (old)");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(t - 3620 * DAY).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(t + 30 * DAY).unwrap();
    let old_pem = p.self_signed(&key).unwrap().pem();
    put_data(
        &h,
        CA_SECRET_PATH,
        &[(CA_FILE, &old_pem), (CA_KEY_FILE, &key.serialize_pem())],
    );
    let leaves = [
        (BRICK_SECRET_PATH, Leaf::Brick),
        (CLIENT_SECRET_PATH, Leaf::Client),
        (ADMIN_SECRET_PATH, Leaf::Admin),
    ];
    let count = |bundle: &str| bundle.matches("BEGIN CERTIFICATE").count();
    // Every leaf is the signer's and carries the CA Secret's whole bundle.
    let check_leaves = |h: &Harness, info: &certs::CaInfo| {
        for (path, leaf) in leaves {
            let data = secret_data(&h.api, path).unwrap();
            assert_eq!(
                data[CA_FILE], info.bundle,
                "{path}: ca.crt is the CA Secret's"
            );
            assert!(
                matches!(
                    certs::check_leaf(info, Some(&data), leaf, now()),
                    LeafStep::Keep { .. }
                ),
                "{path} is signed by the current CA"
            );
        }
    };
    // Moves the last step a day and a minute into the past.
    let age = |h: &Harness| {
        let mut data = secret_data(&h.api, CA_SECRET_PATH).unwrap();
        let since: i64 = data[SINCE_FILE].parse().unwrap();
        data.insert(SINCE_FILE.into(), (since - DAY - 60).to_string());
        let pairs: Vec<(&str, &str)> = data.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        put_data(h, CA_SECRET_PATH, &pairs);
    };
    let rotation_events = |h: &Harness| {
        h.calls_matching(Method::POST, "/apis/events.k8s.io/v1/namespaces/ns/events")
            .iter()
            .filter(|e| e.body["reason"] == "CARotation")
            .count()
    };

    // 1. Introduce: the leaves are issued by the old CA (the one the bricks know), and
    //    everyone is given the new CA to trust beside it.
    h.reconcile().await.unwrap();
    let ca = secret_data(&h.api, CA_SECRET_PATH).unwrap();
    let i1 = ca_info(&h);
    assert_eq!(count(&i1.bundle), 2, "both trusted");
    assert!(i1.bundle.starts_with(&old_pem), "the old CA still signs");
    assert!(ca.contains_key(NEXT_KEY_FILE) && ca.contains_key(SINCE_FILE));
    check_leaves(&h, &i1);
    assert_eq!(rotation_events(&h), 1);
    let hash1 = tls_hash(&h);
    let leaf_certs: Vec<String> = leaves
        .iter()
        .map(|(p, _)| secret_data(&h.api, p).unwrap()[CERT_FILE].clone())
        .collect();

    // Nothing more until a day has passed.
    h.api.clear_calls();
    h.reconcile().await.unwrap();
    assert!(h.calls_matching(Method::PATCH, CA_SECRET_PATH).is_empty());
    assert_eq!(tls_hash(&h), hash1);

    // 2. Switch: the new CA signs, every certificate is issued again, the old CA stays
    //    trusted (pods not rolled yet still show certificates of it).
    age(&h);
    h.reconcile().await.unwrap();
    let ca = secret_data(&h.api, CA_SECRET_PATH).unwrap();
    let i2 = ca_info(&h);
    assert_eq!(count(&i2.bundle), 2);
    assert!(!i2.bundle.starts_with(&old_pem), "the new CA signs");
    assert!(i2.bundle.contains(&old_pem), "the old CA is still trusted");
    assert!(!ca.contains_key(NEXT_KEY_FILE));
    assert_eq!(ca[RETIRING_FILE], old_pem);
    check_leaves(&h, &i2);
    for ((path, _), before) in leaves.iter().zip(&leaf_certs) {
        assert_ne!(
            &secret_data(&h.api, path).unwrap()[CERT_FILE],
            before,
            "{path}"
        );
    }
    let hash2 = tls_hash(&h);
    assert_ne!(hash2, hash1, "the bricks roll to their new certificate");

    // 3. Retire: a day later, with every certificate the new CA's, the old one goes.
    age(&h);
    h.api.clear_calls();
    h.reconcile().await.unwrap();
    // An event again (kube's recorder makes a repeat of one reason a series: a patch).
    assert!(
        h.api.calls().iter().any(|c| c
            .path
            .starts_with("/apis/events.k8s.io/v1/namespaces/ns/events")),
        "an event for the retirement"
    );
    let ca = secret_data(&h.api, CA_SECRET_PATH).unwrap();
    let i3 = ca_info(&h);
    assert_eq!(count(&i3.bundle), 1);
    assert!(!i3.bundle.contains(&old_pem));
    assert!(!ca.contains_key(RETIRING_FILE) && !ca.contains_key(SINCE_FILE));
    check_leaves(&h, &i3);
    assert_ne!(
        tls_hash(&h),
        hash2,
        "the bricks roll to stop trusting the old CA"
    );

    // Done: ten years before the next.
    h.api.clear_calls();
    h.reconcile().await.unwrap();
    assert!(h.calls_matching(Method::PATCH, CA_SECRET_PATH).is_empty());
}
