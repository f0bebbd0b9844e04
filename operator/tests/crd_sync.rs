//! The CRD YAML checked in under `crds/` must be exactly what the code generates, or the Helm
//! chart and `kubectl apply -f crds/` would install a schema the operator does not speak.

use std::path::PathBuf;

#[test]
fn checked_in_crd_matches_generated() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../crds/sharedstorageclusters.mortar.dev.yaml");
    let checked_in = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let generated = mortar_operator::crd::crd_yaml();
    assert!(
        checked_in == generated,
        "{} is out of date; regenerate it with\n  cargo run -p mortar-operator -- crd > crds/sharedstorageclusters.mortar.dev.yaml",
        path.display()
    );
}

#[test]
fn crd_has_the_contracted_names() {
    let crd: serde_json::Value = serde_norway::from_str(&mortar_operator::crd::crd_yaml()).unwrap();
    assert_eq!(crd["metadata"]["name"], "sharedstorageclusters.mortar.dev");
    assert_eq!(crd["spec"]["group"], "mortar.dev");
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    assert_eq!(crd["spec"]["names"]["kind"], "SharedStorageCluster");
    assert_eq!(crd["spec"]["names"]["shortNames"][0], "ssc");
    let version = &crd["spec"]["versions"][0];
    assert_eq!(version["name"], "v1alpha1");
    assert!(version["subresources"]["status"].is_object());
    let columns: Vec<_> = version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_lowercase())
        .collect();
    assert_eq!(columns, ["phase", "bricks", "ready", "heal", "age"]);
    let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    assert_eq!(spec["bricks"]["default"], 3);
    assert_eq!(spec["bricks"]["minimum"], 1.0);
    assert_eq!(spec["volumeName"]["default"], "data");
    assert!(spec["volumeName"]["pattern"].is_string());
    assert_eq!(spec["storage"]["properties"]["size"]["default"], "10Gi");
    assert!(spec["storage"]["properties"]["size"]["pattern"].is_string());
    assert_eq!(spec["antiAffinity"]["default"], "preferred");
    assert_eq!(spec["pingTimeoutSeconds"]["default"], 5);
    assert_eq!(spec["reclaimPolicy"]["default"], "Retain");
}
