//! examples/ and the kind run's manifests: valid Kubernetes objects, custom resources valid
//! against the CRD, and consistent with what the operator and the CSI driver expect.

use std::collections::BTreeSet;
use std::path::PathBuf;

use mortar_operator::certs::Leaf;
use mortar_operator::crd::SharedStorageCluster;
use mortar_operator::resources::{self, Plan};
use mortar_packaging::*;
use serde_json::Value;

fn manifests() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in ["examples", "e2e/kind/manifests"] {
        for e in std::fs::read_dir(repo().join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yaml") {
                v.push(p);
            }
        }
    }
    v.sort();
    assert!(v.len() >= 5, "{v:?}");
    v
}

fn load(rel: &str) -> Vec<Value> {
    docs(&std::fs::read_to_string(repo().join(rel)).unwrap())
}

fn example_cluster() -> (Value, SharedStorageCluster) {
    let doc = load("examples/cluster.yaml")
        .into_iter()
        .find(|d| d["kind"] == "SharedStorageCluster")
        .expect("examples/cluster.yaml has a SharedStorageCluster");
    let ssc: SharedStorageCluster = serde_json::from_value(doc.clone()).unwrap();
    (doc, ssc)
}

#[test]
fn manifests_are_valid_kubernetes() {
    let Some(kv) = need("kubernetes-validate", kubernetes_validate()) else {
        return;
    };
    for m in manifests() {
        validate(&kv, &m);
    }
}

#[test]
fn example_cluster_is_valid_against_the_crd() {
    let Some(py) = need("python with jsonschema", python_with_helm()) else {
        return;
    };
    let out = validate_custom(&py, &repo().join("examples/cluster.yaml"));
    assert!(out.contains("1 custom resource(s) valid"), "{out}");

    // The CRD's schema allows unknown fields to be pruned silently: check every field of the
    // example is one the operator knows.
    let (doc, ssc) = example_cluster();
    let known = serde_json::to_value(&ssc.spec).unwrap();
    let given: BTreeSet<&String> = doc["spec"].as_object().unwrap().keys().collect();
    for k in given {
        assert!(
            known.get(k).is_some(),
            "examples/cluster.yaml: spec.{k} is not a field of the operator's spec"
        );
    }
    assert_eq!(known["volumeName"], "data");
}

/// What the operator makes of examples/cluster.yaml validates against the Kubernetes schemas
/// (it is what the kind run applies through the operator).
#[test]
fn operator_objects_for_the_example_are_valid_kubernetes() {
    let Some(kv) = need("kubernetes-validate", kubernetes_validate()) else {
        return;
    };
    let (_, ssc) = example_cluster();
    let plan = Plan {
        bricks: 3,
        volfile_generation: 1,
        image: "mortar:0.1.0".into(),
        tls_hash: "0123abcd".into(),
    };
    let volfile = resources::volfile(&ssc, 3, 1);
    let ca = mortar_common::tls::Ca::generate("shared").unwrap();
    let (cert, key) = ca
        .issue(mortar_common::tls::Role::Brick, "shared", &[])
        .unwrap();
    let objects = [
        serde_json::to_value(resources::volfile_config_map(&ssc, &volfile)).unwrap(),
        serde_json::to_value(resources::headless_service(&ssc)).unwrap(),
        serde_json::to_value(resources::client_service(&ssc)).unwrap(),
        serde_json::to_value(resources::pod_disruption_budget(&ssc)).unwrap(),
        serde_json::to_value(resources::brick_stateful_set(&ssc, &plan)).unwrap(),
        serde_json::to_value(resources::ca_secret(
            &ssc,
            &mortar_operator::certs::ca_data(&ca.cert_pem, &ca.key_pem),
        ))
        .unwrap(),
        serde_json::to_value(resources::tls_secret(
            &ssc,
            Leaf::Brick,
            &ca.cert_pem,
            &cert,
            &key,
        ))
        .unwrap(),
    ];
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("operator-objects.yaml");
    let yaml: String = objects
        .iter()
        .map(|o| format!("---\n{}", serde_norway::to_string(o).unwrap()))
        .collect();
    std::fs::write(&file, yaml).unwrap();
    validate(&kv, &file);
}

/// The names the kind script uses are the ones the operator gives.
#[test]
fn kind_script_uses_the_operators_names() {
    let (_, ssc) = example_cluster();
    let script = std::fs::read_to_string(repo().join("e2e/kind/run.sh")).unwrap();
    for name in [
        resources::pod_name(&ssc, 0),
        resources::pod_name(&ssc, 1),
        resources::pod_name(&ssc, 3),
        resources::claim_name(&ssc, 3),
        format!("-c {}", resources::CONTAINER_NAME),
    ] {
        assert!(
            script.contains(&name),
            "e2e/kind/run.sh does not use {name}"
        );
    }
    assert_eq!(ssc.metadata.namespace.as_deref(), Some("storage"));
    assert!(script.contains("ssc shared -n storage"));
}

/// StorageClass parameters are ones the CSI controller accepts (it refuses unknown keys), and
/// the static PV's handle names the example cluster's volume.
#[test]
fn storage_examples_fit_the_csi_driver() {
    let (_, ssc) = example_cluster();
    let accepted = [
        "cluster",
        "clusterNamespace",
        "volfileServers",
        "volume",
        "reclaim",
    ];
    let sc = load("examples/storageclass.yaml")
        .into_iter()
        .find(|d| d["kind"] == "StorageClass")
        .unwrap();
    assert_eq!(sc["provisioner"], "mortar.csi.mortar.dev");
    for (k, _) in sc["parameters"].as_object().unwrap() {
        assert!(
            accepted.contains(&k.as_str()) || k.starts_with("csi.storage.k8s.io/"),
            "unknown parameter {k}"
        );
    }
    assert_eq!(
        sc["parameters"]["cluster"],
        ssc.metadata.name.clone().unwrap()
    );
    assert_eq!(
        sc["parameters"]["clusterNamespace"],
        ssc.metadata.namespace.clone().unwrap()
    );
    // The Secrets it hands the driver are the ones the operator keeps for that cluster.
    let name = ssc.metadata.name.clone().unwrap();
    for (param, leaf) in [
        ("provisioner", Leaf::Admin),
        ("controller-expand", Leaf::Admin),
        ("node-stage", Leaf::Client),
        ("node-publish", Leaf::Client),
    ] {
        let p = &sc["parameters"];
        assert_eq!(
            p[format!("csi.storage.k8s.io/{param}-secret-name")],
            leaf.secret_name(&name),
            "{param}"
        );
        assert_eq!(
            p[format!("csi.storage.k8s.io/{param}-secret-namespace")],
            ssc.metadata.namespace.clone().unwrap(),
            "{param}"
        );
    }

    let pv = load("examples/static-pv.yaml")
        .into_iter()
        .find(|d| d["kind"] == "PersistentVolume")
        .unwrap();
    assert_eq!(pv["spec"]["csi"]["driver"], "mortar.csi.mortar.dev");
    let handle = format!(
        "{}/{}/{}",
        ssc.metadata.namespace.clone().unwrap(),
        ssc.metadata.name.clone().unwrap(),
        ssc.spec.volume_name
    );
    assert_eq!(pv["spec"]["csi"]["volumeHandle"], handle);
    let kind_pvc = load("e2e/kind/manifests/shared-pvc.yaml")
        .into_iter()
        .find(|d| d["kind"] == "PersistentVolumeClaim")
        .unwrap();
    assert_eq!(kind_pvc["spec"]["storageClassName"], sc["metadata"]["name"]);
    assert_eq!(kind_pvc["spec"]["accessModes"][0], "ReadWriteMany");
}

/// Bricks keep Mortar's records in trusted.* xattrs (CAP_SYS_ADMIN) and every file's owner
/// (root), while the image runs as uid 65532 by default: the brick pod must ask for both.
/// The podman story runs bricks with `--user 0 --cap-add SYS_ADMIN`; a brick without them
/// exits with "cannot set trusted xattrs".
#[test]
fn brick_pods_get_the_privileges_bricks_need() {
    let (_, ssc) = example_cluster();
    let plan = Plan {
        bricks: 3,
        volfile_generation: 1,
        image: "mortar:0.1.0".into(),
        tls_hash: "0123abcd".into(),
    };
    let sts = serde_json::to_value(resources::brick_stateful_set(&ssc, &plan)).unwrap();
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["runAsUser"], 0, "{c}");
    let add = c["securityContext"]["capabilities"]["add"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(add.iter().any(|x| x == "SYS_ADMIN"), "{c}");
}

/// e2e/kind/storage-driver.yaml, the driver definition for Kubernetes' external-storage suite:
/// it names this driver and the example StorageClass, states only capabilities the suite
/// knows (a misspelt one would be ignored silently), and agrees with the CSIDriver object.
#[test]
fn external_storage_driver_definition_is_consistent() {
    let def = &load("e2e/kind/storage-driver.yaml")[0];
    assert_eq!(def["DriverInfo"]["Name"], "mortar.csi.mortar.dev");
    let class = load("examples/storageclass.yaml")
        .into_iter()
        .find(|d| d["kind"] == "StorageClass")
        .unwrap();
    assert_eq!(
        def["StorageClass"]["FromExistingClassName"],
        class["metadata"]["name"]
    );
    assert_eq!(class["allowVolumeExpansion"], true, "expansion is claimed");
    let known: BTreeSet<&str> = [
        "persistence",
        "block",
        "fsGroup",
        "volumeMountGroup",
        "exec",
        "snapshotDataSource",
        "pvcDataSource",
        "multipods",
        "RWX",
        "controllerExpansion",
        "nodeExpansion",
        "onlineExpansion",
        "offlineExpansion",
        "volumeLimits",
        "singleNodeVolume",
        "topology",
        "capacity",
        "readWriteOncePod",
        "multiplePVsSameID",
        "FSResizeFromSourceNotSupported",
        "snapshotNodeExpansion",
    ]
    .into();
    let caps = def["DriverInfo"]["Capabilities"].as_object().unwrap();
    for (k, v) in caps {
        assert!(known.contains(k.as_str()), "unknown capability {k}");
        assert!(v.is_boolean(), "{k}: {v}");
    }
    for k in [
        "persistence",
        "exec",
        "multipods",
        "RWX",
        "controllerExpansion",
        "nodeExpansion",
        "onlineExpansion",
        "offlineExpansion",
        "pvcDataSource",
        "readWriteOncePod",
    ] {
        assert_eq!(caps[k], true, "{k}");
    }
    // fsGroup is claimed only if the CSIDriver lets the kubelet apply it.
    let driver =
        std::fs::read_to_string(repo().join("charts/mortar/templates/csi-driver.yaml")).unwrap();
    assert_eq!(
        caps["fsGroup"] == true,
        !driver.contains("fsGroupPolicy: None")
    );
}
