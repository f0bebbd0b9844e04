//! The Helm chart: lint, render with several value sets, validate every manifest against the
//! Kubernetes schemas, and check that what it deploys fits the binaries and the operator.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use mortar_packaging::*;
use serde_json::{Value, json};

fn python() -> Option<std::path::PathBuf> {
    need(
        "python with helm-python-sdk (helm_python), PyYAML, jsonschema",
        python_with_helm(),
    )
}

/// The value sets CI renders: defaults, the kind run's, and everything switched on.
fn scenarios() -> Vec<(&'static str, Vec<&'static Path>, Vec<&'static str>)> {
    let kind: &'static Path = Box::leak(repo().join("e2e/kind/values.yaml").into_boxed_path());
    vec![
        ("defaults", vec![], vec![]),
        ("kind", vec![kind], vec![]),
        (
            "everything",
            vec![],
            vec![
                "operator.replicas=2",
                "operator.watchNamespace=storage",
                "operator.brickImage=registry.example/mortar:9",
                "imagePullSecrets[0].name=pull",
                "storageClass.create=true",
                "storageClass.isDefault=true",
                "storageClass.reclaim=archive",
                "csi.controller.replicas=2",
                "csi.controller.clusters[0].name=shared",
                "csi.controller.clusters[0].namespace=storage",
                "csi.controller.clusters[1].name=other",
                "csi.controller.clusters[1].namespace=team-a",
                "csi.controller.clusters[1].volume=data",
                "operator.nodeSelector.kubernetes\\.io/os=linux",
                "csi.node.nodeSelector.kubernetes\\.io/os=linux",
                "csi.mounter.socketDir=/run/mortar-csi-mounter/",
                "csi.mounter.priorityClassName=",
            ],
        ),
        (
            "no-leader-election",
            vec![],
            vec!["operator.leaderElection=false"],
        ),
    ]
}

#[test]
fn chart_lints_strictly() {
    let Some(py) = python() else { return };
    for (name, values, sets) in scenarios() {
        let mut cmd = Command::new(&py);
        cmd.arg(repo().join("e2e/tools/helm.py"))
            .arg("lint")
            .arg(repo().join("charts/mortar"))
            .args(["--strict", "--namespace", "mortar-system"]);
        for v in values {
            cmd.arg("-f").arg(v);
        }
        for s in sets {
            cmd.args(["--set", s]);
        }
        let out = run_ok(&mut cmd);
        println!("{name}: {}", String::from_utf8_lossy(&out.stdout).trim());
    }
}

#[test]
fn rendered_manifests_are_valid_kubernetes() {
    let Some(py) = python() else { return };
    let Some(kv) = need("kubernetes-validate", kubernetes_validate()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for (name, values, sets) in scenarios() {
        let yaml = render(&py, "mortar-system", &values, &sets)
            .unwrap_or_else(|e| panic!("{name}: render failed: {e}"));
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, &yaml).unwrap();
        validate(&kv, &file);
        let docs = mortar_packaging::docs(&yaml);
        let kinds: BTreeSet<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        for k in [
            "CustomResourceDefinition",
            "Deployment",
            "DaemonSet",
            "CSIDriver",
        ] {
            assert!(kinds.contains(k), "{name}: no {k} rendered");
        }
    }
}

#[test]
fn chart_crds_are_the_repositorys_crds() {
    let list = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    let ours = repo().join("charts/mortar/crds");
    let theirs = repo().join("crds");
    assert_eq!(
        list(&ours),
        list(&theirs),
        "charts/mortar/crds/ and crds/ hold different files"
    );
    for f in list(&theirs) {
        assert_eq!(
            std::fs::read(ours.join(&f)).unwrap(),
            std::fs::read(theirs.join(&f)).unwrap(),
            "charts/mortar/crds/{f} differs from crds/{f}: cp crds/*.yaml charts/mortar/crds/"
        );
    }
}

/// The rules of the YAML block under "RBAC summary" in operator/API-CALLS.md, split into the
/// cluster-wide ones and the leader-election ones.
fn documented_rbac() -> (Vec<Value>, Vec<Value>) {
    let md = std::fs::read_to_string(repo().join("operator/API-CALLS.md")).unwrap();
    let section = md
        .split("## RBAC summary")
        .nth(1)
        .expect("RBAC summary section");
    let block = section
        .split("```yaml")
        .nth(1)
        .and_then(|s| s.split("```").next())
        .expect("yaml block in the RBAC summary");
    let rules: Vec<Value> = serde_norway::from_str(block).unwrap();
    rules
        .into_iter()
        .partition(|r| r["apiGroups"] != json!(["coordination.k8s.io"]))
}

#[test]
fn operator_rbac_is_exactly_api_calls_md() {
    let Some(py) = python() else { return };
    let (cluster, leader) = documented_rbac();
    assert!(!cluster.is_empty() && !leader.is_empty());

    let docs = mortar_packaging::docs(&render(&py, "mortar-system", &[], &[]).unwrap());
    assert_eq!(
        find(&docs, "ClusterRole", "mortar-operator")["rules"],
        json!(cluster)
    );
    let role = find(&docs, "Role", "mortar-operator-leader-election");
    assert_eq!(role["metadata"]["namespace"], "mortar-system");
    assert_eq!(role["rules"], json!(leader));
    let binding = find(&docs, "ClusterRoleBinding", "mortar-operator");
    assert_eq!(binding["subjects"][0]["name"], "mortar-operator");
    assert_eq!(binding["subjects"][0]["namespace"], "mortar-system");

    // Restricted to one namespace: a Role there instead of the ClusterRole.
    let docs = mortar_packaging::docs(
        &render(
            &py,
            "mortar-system",
            &[],
            &["operator.watchNamespace=storage"],
        )
        .unwrap(),
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["kind"] == "ClusterRole" && d["metadata"]["name"] == "mortar-operator")
    );
    let role = find(&docs, "Role", "mortar-operator");
    assert_eq!(role["metadata"]["namespace"], "storage");
    assert_eq!(role["rules"], json!(cluster));
    let dep = find(&docs, "Deployment", "mortar-operator");
    let args = args_of(&dep["spec"]["template"]["spec"]["containers"][0]);
    assert!(
        args.contains(&"--watch-namespace=storage".to_string()),
        "{args:?}"
    );

    // Without leader election: no lease rights, the flag, one replica only.
    let docs = mortar_packaging::docs(
        &render(
            &py,
            "mortar-system",
            &[],
            &["operator.leaderElection=false"],
        )
        .unwrap(),
    );
    assert!(
        !docs
            .iter()
            .any(|d| d["metadata"]["name"] == "mortar-operator-leader-election")
    );
    let dep = find(&docs, "Deployment", "mortar-operator");
    assert!(
        args_of(&dep["spec"]["template"]["spec"]["containers"][0])
            .contains(&"--disable-leader-election".to_string())
    );
    let err = render(
        &py,
        "mortar-system",
        &[],
        &["operator.leaderElection=false", "operator.replicas=2"],
    )
    .expect_err("two replicas without leader election must be refused");
    assert!(err.contains("leaderElection"), "{err}");
}

fn args_of(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn containers(doc: &Value) -> Vec<&Value> {
    doc["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .collect()
}

#[test]
fn values_schema_rejects_mistakes() {
    let Some(py) = python() else { return };
    for (set, why) in [
        ("bogus=1", "additional properties"),
        ("operator.replica=2", "additional properties"),
        ("storageClass.reclaim=shred", "reclaim"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("csi.kubeletDir=var/lib/kubelet", "kubeletDir"),
        ("csi.controller.clusters[0].name=Shared", "name"),
        ("csi.mounter.socketDir=run/mortar", "socketDir"),
        (
            "csi.node.mounterResources.limits.memory=1Gi",
            "additional properties",
        ),
    ] {
        let err = render(&py, "mortar-system", &[], &[set])
            .expect_err(&format!("--set {set} must be refused"));
        assert!(err.contains(why), "--set {set}: {err}");
    }
}

/// Every flag the chart passes to a Mortar binary is one that binary accepts, the CSI driver
/// name and socket paths agree, and the node plugin has what FUSE mounts need.
#[test]
fn chart_fits_the_binaries() {
    let Some(py) = python() else { return };
    let sets = [
        "csi.controller.clusters[0].name=shared",
        "csi.controller.clusters[0].namespace=storage",
        "storageClass.create=true",
    ];
    let docs = mortar_packaging::docs(&render(&py, "mortar-system", &[], &sets).unwrap());
    let image = "mortar:0.1.0";

    let mut checked = 0;
    for d in docs
        .iter()
        .filter(|d| d["spec"]["template"]["spec"]["containers"].is_array())
    {
        for c in containers(d) {
            if c["image"] != image {
                continue;
            }
            let cmd = c["command"][0].as_str().unwrap();
            let (binary, help_args): (&str, Vec<&str>) = match cmd {
                "mortar-operator" => ("mortar-operator", vec!["--help"]),
                "mortar-csi" => ("mortar-csi", vec!["--help"]),
                // The controller's mount containers: sh -c '... mortar-mount -f ...'.
                "/bin/sh" => ("mortar-mount", vec!["--help"]),
                other => panic!("unexpected command {other} in {}", c["name"]),
            };
            let help = String::from_utf8(run_ok(Command::new(bin(binary)).args(&help_args)).stdout)
                .unwrap();
            let words: Vec<String> = if cmd == "/bin/sh" {
                c["command"][2]
                    .as_str()
                    .unwrap()
                    .split_whitespace()
                    .map(str::to_string)
                    .collect()
            } else {
                args_of(c)
            };
            for w in words.iter().filter(|w| w.starts_with("--")) {
                let flag = w.split('=').next().unwrap();
                assert!(
                    help.contains(&format!("{flag} ")) || help.contains(&format!("{flag}\n")),
                    "{} passes {flag}, which `{binary} --help` does not list",
                    c["name"]
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 15, "only {checked} flags checked");

    // The driver name everywhere is the binary's.
    let csi_help =
        String::from_utf8(run_ok(Command::new(bin("mortar-csi")).arg("--help")).stdout).unwrap();
    let driver = find(&docs, "CSIDriver", "mortar.csi.mortar.dev");
    assert!(csi_help.contains("(mortar.csi.mortar.dev)"));
    assert_eq!(driver["spec"]["attachRequired"], false);
    assert_eq!(
        find(&docs, "StorageClass", "mortar")["provisioner"],
        "mortar.csi.mortar.dev"
    );

    // The operator's default brick image is the chart's image.
    let op_help =
        String::from_utf8(run_ok(Command::new(bin("mortar-operator")).arg("--help")).stdout)
            .unwrap();
    assert!(
        op_help.contains(&format!("[default: {image}]")),
        "operator default brick image is not {image}"
    );
    let op = find(&docs, "Deployment", "mortar-operator");
    assert!(args_of(containers(op)[0]).contains(&format!("--brick-image={image}")));

    // Node: the plugin and the mounter in two DaemonSets, so that replacing the plugin's pod
    // (a `helm upgrade` rolls it) leaves the FUSE daemons alone; the mounter's DaemonSet
    // rolls with a surge (the new pod takes the mounts over before the old one stops, and is
    // ready only then: `containers.rs` runs it). Both are privileged with the kubelet dir under Bidirectional
    // propagation; /dev/fuse only in the mounter, which runs mortar-mount; the two share the
    // mounter's socket through one host directory, and the state dir; the registrar points
    // the kubelet at the socket mortar-csi serves.
    let ds = find(&docs, "DaemonSet", "mortar-csi-node");
    let mds = find(&docs, "DaemonSet", "mortar-csi-mounter");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        mds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        "a mounter pod stops only once its successor is ready"
    );
    let cs = containers(ds);
    let names: Vec<&str> = cs.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["mortar-csi", "node-driver-registrar", "liveness-probe"],
        "the node plugin's pod holds no mounter"
    );
    let mcs = containers(mds);
    let names: Vec<&str> = mcs.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["mortar-mounter"]);
    let (plugin, mounter) = (cs[0], mcs[0]);
    let pod = |d: &Value| d["spec"]["template"]["spec"].clone();
    let (node_pod, mounter_pod) = (pod(ds), pod(mds));
    assert_eq!(
        mounter_pod["serviceAccountName"], "mortar-csi-mounter",
        "the mounter has its own service account"
    );
    let sa = find(&docs, "ServiceAccount", "mortar-csi-mounter");
    assert_eq!(sa["automountServiceAccountToken"], false);
    assert_eq!(
        mounter_pod["dnsPolicy"], "ClusterFirst",
        "FUSE clients resolve Services"
    );
    assert_eq!(mounter_pod["priorityClassName"], "system-node-critical");
    assert!(mounter_pod["hostPID"].is_null() || mounter_pod["hostPID"] == false);
    for key in ["nodeSelector", "tolerations", "affinity"] {
        assert_eq!(
            mounter_pod[key], node_pod[key],
            "the mounter runs wherever the plugin does ({key})"
        );
    }
    let mount_path = |c: &Value, volume: &str| -> Option<(String, String)> {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == volume)
            .map(|m| {
                (
                    m["mountPath"].as_str().unwrap().to_string(),
                    m["mountPropagation"].as_str().unwrap_or("").to_string(),
                )
            })
    };
    let volume = |pod: &Value, name: &str| -> Value {
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    for c in [plugin, mounter] {
        assert_eq!(c["securityContext"]["privileged"], true, "{}", c["name"]);
        assert_eq!(
            mount_path(c, "kubelet-dir"),
            Some(("/var/lib/kubelet".to_string(), "Bidirectional".to_string())),
            "{}",
            c["name"]
        );
        assert_eq!(
            mount_path(c, "mounter-socket").map(|m| m.0).as_deref(),
            Some("/run/mortar"),
            "{}",
            c["name"]
        );
    }
    // One host directory for the socket: either pod can be replaced without the other.
    let socket_dir = volume(&node_pod, "mounter-socket");
    assert_eq!(socket_dir, volume(&mounter_pod, "mounter-socket"));
    assert_eq!(
        socket_dir["hostPath"],
        json!({"path": "/var/lib/mortar-csi/mounter", "type": "DirectoryOrCreate"})
    );
    assert_eq!(
        mount_path(mounter, "dev-fuse").map(|m| m.0).as_deref(),
        Some("/dev/fuse")
    );
    assert_eq!(
        mount_path(mounter, "mount-logs").map(|m| m.0).as_deref(),
        Some("/var/log/mortar")
    );
    assert_eq!(
        volume(&mounter_pod, "mount-logs")["hostPath"]["path"],
        "/var/log/mortar"
    );
    assert_eq!(
        volume(&mounter_pod, "dev-fuse")["hostPath"],
        json!({"path": "/dev/fuse", "type": "CharDevice"})
    );
    assert!(
        node_pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["hostPath"]["path"] != "/dev/fuse" && v["emptyDir"].is_null()),
        "the node plugin's pod has no /dev/fuse and no emptyDir"
    );
    for c in &cs {
        assert_eq!(mount_path(c, "dev-fuse"), None, "{}", c["name"]);
    }
    assert_eq!(mounter["command"][0], "mortar-csi");
    let arg = |c: &Value, flag: &str| -> Option<String> {
        args_of(c)
            .into_iter()
            .find_map(|a| a.strip_prefix(&format!("{flag}=")).map(str::to_string))
    };
    assert_eq!(arg(mounter, "--mode").as_deref(), Some("mounter"));
    assert_eq!(arg(plugin, "--mode").as_deref(), Some("node"));
    assert_eq!(
        arg(mounter, "--endpoint"),
        arg(plugin, "--mounter"),
        "the plugin calls the mounter's socket"
    );
    assert_eq!(
        arg(mounter, "--endpoint").as_deref(),
        Some("unix:///run/mortar/mounter.sock")
    );
    assert_eq!(
        arg(mounter, "--state-dir"),
        arg(plugin, "--state-dir"),
        "one state dir for both"
    );
    assert_eq!(
        arg(mounter, "--mount-timeout"),
        arg(plugin, "--mount-timeout")
    );
    assert!(
        arg(mounter, "--state-dir")
            .unwrap()
            .starts_with("/var/lib/kubelet/"),
        "state dir under the propagated kubelet dir"
    );
    assert_eq!(
        arg(plugin, "--mount-command"),
        None,
        "the plugin does not mount FUSE itself"
    );
    // The rolling update: the mounter is ready once its --ready-file exists, a file in a
    // volume of its own pod (the socket directory is shared with the pod it replaces), and
    // the old pod's wait for its successor fits in its grace period.
    let ready = arg(mounter, "--ready-file").expect("--ready-file");
    assert_eq!(
        mounter["readinessProbe"]["exec"]["command"],
        json!(["cat", ready]),
        "the readiness probe reads the ready file"
    );
    let (ready_dir, ready_volume) = mounter["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| ready.starts_with(&format!("{}/", m["mountPath"].as_str().unwrap())))
        .map(|m| {
            (
                m["mountPath"].clone(),
                m["name"].as_str().unwrap().to_string(),
            )
        })
        .expect("the ready file is in a volume");
    assert!(
        volume(&mounter_pod, &ready_volume)["emptyDir"].is_object(),
        "{ready_dir} is the pod's own emptyDir"
    );
    let wait: u64 = arg(mounter, "--handover-wait").unwrap().parse().unwrap();
    assert!(
        mounter_pod["terminationGracePeriodSeconds"]
            .as_u64()
            .unwrap()
            > wait
    );
    let endpoint = arg(plugin, "--endpoint")
        .unwrap()
        .strip_prefix("unix://")
        .unwrap()
        .to_string();
    assert!(args_of(cs[1]).contains(&format!("--kubelet-registration-path={endpoint}")));
    assert_eq!(
        endpoint,
        "/var/lib/kubelet/plugins/mortar.csi.mortar.dev/csi.sock"
    );

    // Controller: the three standard sidecars next to mortar-csi, which reaches the bricks
    // through the client library (no mount containers) and lists the configured volumes.
    let ctl = find(&docs, "Deployment", "mortar-csi-controller");
    let names: Vec<&str> = containers(ctl)
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "csi-provisioner",
            "csi-resizer",
            "liveness-probe",
            "mortar-csi"
        ]
    );
    let ctl_csi = containers(ctl)[3];
    assert_eq!(arg(ctl_csi, "--backend").as_deref(), Some("mortar"));
    assert_eq!(
        arg(ctl_csi, "--known-volume").as_deref(),
        Some("storage/shared/data")
    );
    assert_eq!(
        arg(ctl_csi, "--volfile-server-template"),
        arg(plugin, "--volfile-server-template")
    );
}

/// The mounter's DaemonSet follows the node plugin's placement values and socket directory,
/// so that the plugin never lands on a node without a mounter to call.
#[test]
fn mounter_follows_the_node_plugin() {
    let Some(py) = python() else { return };
    let sets = [
        "csi.node.nodeSelector.kubernetes\\.io/os=linux",
        "csi.node.tolerations[0].key=dedicated",
        "csi.node.tolerations[0].operator=Equal",
        "csi.node.tolerations[0].value=storage",
        "csi.node.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].key=mortar",
        "csi.node.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms[0].matchExpressions[0].operator=Exists",
        "csi.mounter.socketDir=/run/mortar-csi/",
        "csi.mounter.priorityClassName=mortar-mounts",
        "csi.mounter.resources.limits.memory=2Gi",
        "csi.kubeletDir=/var/lib/k0s/kubelet",
    ];
    let docs = mortar_packaging::docs(&render(&py, "mortar-system", &[], &sets).unwrap());
    let pod = |name: &str| find(&docs, "DaemonSet", name)["spec"]["template"]["spec"].clone();
    let (node, mounter) = (pod("mortar-csi-node"), pod("mortar-csi-mounter"));
    for key in ["nodeSelector", "tolerations", "affinity"] {
        assert!(
            node[key].is_object() || node[key].is_array(),
            "{key}: {node}"
        );
        assert_eq!(mounter[key], node[key], "{key}");
    }
    assert_eq!(mounter["priorityClassName"], "mortar-mounts");
    assert_eq!(node["priorityClassName"], "system-node-critical");
    assert_eq!(
        mounter["containers"][0]["resources"]["limits"]["memory"],
        "2Gi"
    );
    for p in [&node, &mounter] {
        let vols = p["volumes"].as_array().unwrap();
        let socket = vols.iter().find(|v| v["name"] == "mounter-socket").unwrap();
        assert_eq!(socket["hostPath"]["path"], "/run/mortar-csi");
        let kubelet = vols.iter().find(|v| v["name"] == "kubelet-dir").unwrap();
        assert_eq!(kubelet["hostPath"]["path"], "/var/lib/k0s/kubelet");
        let state_dir = args_of(&p["containers"][0])
            .into_iter()
            .find_map(|a| a.strip_prefix("--state-dir=").map(str::to_string));
        assert_eq!(
            state_dir.as_deref(),
            Some("/var/lib/k0s/kubelet/plugins/mortar.csi.mortar.dev")
        );
    }
}

/// The controller and the node's mounts reach a named cluster through the Service the
/// operator creates for clients.
#[test]
fn volfile_server_is_the_operators_client_service() {
    use mortar_operator::crd::{SharedStorageCluster, SharedStorageClusterSpec};
    let Some(py) = python() else { return };
    let docs = mortar_packaging::docs(&render(&py, "mortar-system", &[], &[]).unwrap());
    let ds = find(&docs, "DaemonSet", "mortar-csi-node");
    let template = args_of(containers(ds)[0])
        .into_iter()
        .find_map(|a| {
            a.strip_prefix("--volfile-server-template=")
                .map(str::to_string)
        })
        .expect("the chart passes --volfile-server-template");

    let mut ssc = SharedStorageCluster::new("shared", SharedStorageClusterSpec::default());
    ssc.metadata.namespace = Some("storage".into());
    let svc = serde_json::to_value(mortar_operator::resources::client_service(&ssc)).unwrap();
    let server = template
        .replace("{cluster}", "shared")
        .replace("{namespace}", "storage");
    assert_eq!(
        server,
        format!(
            "{}.{}.svc:{}",
            svc["metadata"]["name"].as_str().unwrap(),
            svc["metadata"]["namespace"].as_str().unwrap(),
            svc["spec"]["ports"][0]["port"]
        )
    );
    // The chart's template is the binary's default.
    let help =
        String::from_utf8(run_ok(Command::new(bin("mortar-csi")).arg("--help")).stdout).unwrap();
    assert!(help.contains(&format!("[default: {template}]")), "{help}");
}

/// The StorageClass hands the driver the Secrets the operator keeps for the cluster it
/// names (admin for the controller's calls, client for the node's), in the cluster's
/// namespace; the sidecars that read them may; `storageClass.tls=false` names none.
#[test]
fn storage_class_names_the_operators_certificate_secrets() {
    use mortar_operator::certs::Leaf;
    let Some(py) = python() else { return };
    let sets = [
        "storageClass.create=true",
        "storageClass.cluster=vault",
        "storageClass.clusterNamespace=data",
    ];
    let docs = mortar_packaging::docs(&render(&py, "mortar-system", &[], &sets).unwrap());
    let params = &find(&docs, "StorageClass", "mortar")["parameters"];
    for (call, leaf) in [
        ("provisioner", Leaf::Admin),
        ("controller-expand", Leaf::Admin),
        ("node-stage", Leaf::Client),
        ("node-publish", Leaf::Client),
    ] {
        assert_eq!(
            params[format!("csi.storage.k8s.io/{call}-secret-name")],
            leaf.secret_name("vault"),
            "{call}: {params}"
        );
        assert_eq!(
            params[format!("csi.storage.k8s.io/{call}-secret-namespace")],
            "data",
            "{call}"
        );
    }
    // csi-provisioner and csi-resizer read the admin Secret.
    let role = find(&docs, "ClusterRole", "mortar-csi-controller");
    assert!(
        role["rules"].as_array().unwrap().iter().any(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x == "secrets")
                && r["verbs"].as_array().unwrap().iter().any(|v| v == "get")
        }),
        "{role}"
    );
    // The operator may write them (and its RBAC is API-CALLS.md, tested above).
    let op = find(&docs, "ClusterRole", "mortar-operator");
    assert!(op.to_string().contains("\"secrets\""), "{op}");

    let plain = [&sets[..], &["storageClass.tls=false"]].concat();
    let docs = mortar_packaging::docs(&render(&py, "mortar-system", &[], &plain).unwrap());
    let params = &find(&docs, "StorageClass", "mortar")["parameters"];
    assert!(
        !params.to_string().contains("secret"),
        "no Secrets without TLS: {params}"
    );
}

/// The value sets of every chart test, for checks that must hold whatever the values.
fn all_value_sets() -> Vec<(String, Vec<&'static Path>, Vec<&'static str>)> {
    let mut all: Vec<(String, Vec<&'static Path>, Vec<&'static str>)> = scenarios()
        .into_iter()
        .map(|(n, v, s)| (n.to_string(), v, s))
        .collect();
    all.push((
        "mounter placement".into(),
        vec![],
        vec![
            "csi.node.nodeSelector.kubernetes\\.io/os=linux",
            "csi.mounter.socketDir=/run/mortar-csi/",
            "csi.kubeletDir=/var/lib/k0s/kubelet",
        ],
    ));
    all
}

/// Every container that runs a Mortar binary, in every workload the chart renders (with every
/// value set its tests use) and in the brick StatefulSet the operator makes, has its real
/// command line parsed and checked by that binary (MORTAR_CHECK_ARGS: parse, validate, exit
/// before doing anything). A flag in the wrong place, or one the binary does not know, fails
/// here, as it would crash-loop the pod.
#[test]
fn chart_command_lines_pass_the_binaries_parsers() {
    use mortar_operator::crd::{SharedStorageCluster, SharedStorageClusterSpec};
    use mortar_operator::resources::{Plan, brick_stateful_set};
    let Some(py) = python() else { return };
    let image = "mortar:0.1.0";
    let mut workloads: Vec<(String, Value)> = Vec::new();
    for (name, values, sets) in all_value_sets() {
        let yaml = render(&py, "mortar-system", &values, &sets)
            .unwrap_or_else(|e| panic!("{name}: render failed: {e}"));
        for d in mortar_packaging::docs(&yaml) {
            if d["spec"]["template"]["spec"]["containers"].is_array() {
                workloads.push((name.clone(), d));
            }
        }
    }
    let mut ssc = SharedStorageCluster::new("shared", SharedStorageClusterSpec::default());
    ssc.metadata.namespace = Some("storage".into());
    ssc.metadata.uid = Some("uid-1".into());
    let plan = Plan {
        bricks: 3,
        volfile_generation: 1,
        image: image.into(),
        tls_hash: "0123abcd".into(),
    };
    workloads.push((
        "operator".into(),
        serde_json::to_value(brick_stateful_set(&ssc, &plan)).unwrap(),
    ));

    let mut checked = BTreeSet::new();
    for (scenario, d) in &workloads {
        let pod = &d["spec"]["template"]["spec"];
        let all = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .chain(pod["initContainers"].as_array().into_iter().flatten());
        for c in all {
            if !c["image"].as_str().unwrap().starts_with("mortar:") {
                continue; // the CSI sidecars: not ours
            }
            let env = container_env(c, "mortar-system");
            let command: Vec<String> = c["command"]
                .as_array()
                .unwrap_or_else(|| panic!("{}: no command", c["name"]))
                .iter()
                .chain(c["args"].as_array().into_iter().flatten())
                .map(|w| expand(w.as_str().unwrap(), &env))
                .collect();
            let what = format!(
                "{scenario}: {} {}, container {}: {}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap(),
                c["name"].as_str().unwrap(),
                command.join(" ")
            );
            assert!(
                !command.iter().any(|w| w.contains("$(")),
                "{what}: a $(VAR) the container's env does not define"
            );
            let out = Command::new(bin(&command[0]))
                .args(&command[1..])
                .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .env("MORTAR_CHECK_ARGS", "1")
                .output()
                .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
            assert!(
                out.status.success(),
                "{what}: rejected ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            assert!(
                String::from_utf8_lossy(&out.stdout).contains("arguments accepted"),
                "{what}: the binary ignored MORTAR_CHECK_ARGS"
            );
            checked.insert(format!(
                "{}/{}",
                d["metadata"]["name"].as_str().unwrap(),
                c["name"].as_str().unwrap()
            ));
        }
    }
    let expected: BTreeSet<String> = [
        "mortar-operator/operator",
        "mortar-csi-controller/mortar-csi",
        "mortar-csi-node/mortar-csi",
        "mortar-csi-mounter/mortar-mounter",
        "shared-brick/brick",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(checked, expected, "the containers checked");
}
