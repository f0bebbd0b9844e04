//! Every container of the chart that runs the Mortar image, started from the built image under
//! podman the way the kubelet would start it: the chart's command and arguments, its user and
//! group, privileged or not, its capabilities, a read-only root filesystem where it asks for
//! one, and its host paths laid out as the kubelet lays them (root-owned, mode 0750). Each must
//! come up, do its first job and stay up:
//! - the mounter makes its state dir under the kubelet's plugins dir and serves its socket;
//! - the node plugin answers `Probe` on its socket with ready (it reaches the mounter);
//! - the CSI controller answers `Probe` on the socket in its emptyDir;
//! - the operator serves `/healthz` (its API server is unreachable here: it must wait, not
//!   crash-loop);
//! - the brick of the StatefulSet the operator makes, with the operator's own arguments and
//!   its certificate Secret as a TLS directory, serves mutual TLS: `mortar status` with an
//!   admin certificate of the cluster's CA gets an answer, plain TCP does not.
//!
//! The mounter's rolling update runs the same way: two mounter containers of the chart, the
//! new one takes a live FUSE mount over from the old one, which is then stopped.
//!
//! Not reproduced: the CSI sidecars (other images, not available offline). The operator gets a kubeconfig naming a
//! closed port, standing in for the in-cluster config a pod has.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use mortar_packaging::*;
use serde_json::Value;

const NAMESPACE: &str = "mortar-system";

/// One container of a rendered workload, and how podman runs it.
struct Started {
    name: String,
    podman: PathBuf,
}

impl Started {
    fn running(&self) -> bool {
        let out = Command::new(&self.podman)
            .args(["inspect", "-f", "{{.State.Running}}", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim() == "true"
    }

    fn logs(&self) -> String {
        let out = Command::new(&self.podman)
            .args(["logs", "--tail", "40", &self.name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Waits until `ready` holds, failing with the container's logs if it exits or the time
    /// runs out; then checks that it is still running a few seconds later.
    fn wait_ready(&self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            assert!(
                self.running(),
                "{}: exited before {what}:\n{}",
                self.name,
                self.logs()
            );
            assert!(
                Instant::now() < deadline,
                "{}: no {what} after 30 s:\n{}",
                self.name,
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(3));
        assert!(
            self.running(),
            "{}: exited after {what}:\n{}",
            self.name,
            self.logs()
        );
        assert!(ready(), "{}: {what} no longer holds", self.name);
        eprintln!("{}: {what}, still running", self.name);
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = Command::new(&self.podman)
            .args(["rm", "-f", "-t", "2", &self.name])
            .output();
    }
}

/// The security settings that apply to a container: the pod's, overridden by the container's.
fn effective(pod: &Value, c: &Value, key: &str) -> Value {
    let own = &c["securityContext"][key];
    if own.is_null() {
        pod["securityContext"][key].clone()
    } else {
        own.clone()
    }
}

/// The kubelet's directories as a node has them: root-owned, mode 0750, and the kubelet's
/// root a shared mount, as on a node (systemd makes every mount shared), so that
/// Bidirectional propagation works: a mount a container makes below it shows on the host
/// and in the other containers. Unmounted (with whatever is below) when dropped.
struct KubeletDir(PathBuf);

impl KubeletDir {
    fn lay_out(host: &Path) -> KubeletDir {
        for d in [
            "var/lib/kubelet",
            "var/lib/kubelet/plugins",
            "var/lib/kubelet/plugins_registry",
            "var/lib/kubelet/pods",
        ] {
            let p = host.join(d);
            std::fs::create_dir_all(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o750)).unwrap();
        }
        let root = host.join("var/lib/kubelet");
        run_ok(Command::new("mount").arg("--bind").arg(&root).arg(&root));
        run_ok(Command::new("mount").arg("--make-rshared").arg(&root));
        KubeletDir(root)
    }
}

impl Drop for KubeletDir {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-R")
            .arg("-l")
            .arg(&self.0)
            .output();
    }
}

/// Starts one container of a workload as the kubelet would (see the file's comment).
/// `given` supplies volumes the kubelet would make from objects (ConfigMaps, Secrets,
/// claims): the host directory that stands for each, by volume name.
fn start(
    podman: &Path,
    host: &Path,
    workload: &Value,
    container: &str,
    extra: &[&str],
    given: &[(&str, PathBuf)],
) -> Started {
    let pod = &workload["spec"]["template"]["spec"];
    let c = pod["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("no container {container}"));
    // Two pods of one DaemonSet may run at once (a rolling update with maxSurge).
    static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let name = format!(
        "mortar-chart-{}-{container}-{}-{}",
        workload["metadata"]["name"].as_str().unwrap(),
        std::process::id(),
        STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let mut args: Vec<String> = vec!["run".into(), "-d".into(), "--name".into(), name.clone()];
    // No network unless the caller gives one (`--network=host` to reach test bricks).
    if !extra.iter().any(|a| a.starts_with("--network")) {
        args.extend(["--network".into(), "none".into()]);
    }

    let user = effective(pod, c, "runAsUser");
    let group = effective(pod, c, "runAsGroup");
    if effective(pod, c, "runAsNonRoot") == true {
        assert!(
            user != 0,
            "{container}: runAsNonRoot with runAsUser 0 is refused by the kubelet"
        );
    }
    match (user.as_i64(), group.as_i64()) {
        (Some(u), Some(g)) => args.push(format!("--user={u}:{g}")),
        (Some(u), None) => args.push(format!("--user={u}")),
        (None, _) => {}
    }
    let sc = &c["securityContext"];
    if sc["privileged"] == true {
        args.push("--privileged".into());
    }
    let caps = &sc["capabilities"];
    for d in caps["drop"].as_array().into_iter().flatten() {
        args.push(format!("--cap-drop={}", d.as_str().unwrap().to_lowercase()));
    }
    for a in caps["add"].as_array().into_iter().flatten() {
        args.push(format!("--cap-add={}", a.as_str().unwrap().to_lowercase()));
    }
    if sc["readOnlyRootFilesystem"] == true {
        // The kubelet adds no tmpfs of its own (podman would, on /tmp, /run and /var/tmp).
        args.extend(["--read-only".into(), "--read-only-tmpfs=false".into()]);
    }
    if sc["allowPrivilegeEscalation"] == false {
        args.push("--security-opt=no-new-privileges".into());
    }

    let volumes = pod["volumes"].as_array().cloned().unwrap_or_default();
    // The kubelet makes every DirectoryOrCreate host path of the pod (root-owned, mode
    // 0755) before any of its containers starts.
    for v in &volumes {
        if v["hostPath"]["type"] == "DirectoryOrCreate" {
            let path = v["hostPath"]["path"].as_str().unwrap();
            std::fs::create_dir_all(host.join(path.trim_start_matches('/'))).unwrap();
        }
    }
    for m in c["volumeMounts"].as_array().into_iter().flatten() {
        if let Some((_, src)) = given.iter().find(|(n, _)| m["name"] == *n) {
            let ro = if m["readOnly"] == true { ":ro" } else { "" };
            args.push(format!(
                "--volume={}:{}{ro}",
                src.display(),
                m["mountPath"].as_str().unwrap()
            ));
            continue;
        }
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("{container}: no volume {}", m["name"]));
        let src = if let Some(path) = v["hostPath"]["path"].as_str() {
            match v["hostPath"]["type"].as_str().unwrap_or("") {
                "CharDevice" => PathBuf::from(path),
                "Directory" => {
                    let p = host.join(path.trim_start_matches('/'));
                    assert!(p.is_dir(), "{container}: host directory {path} is missing");
                    p
                }
                "DirectoryOrCreate" => host.join(path.trim_start_matches('/')),
                other => panic!("{container}: hostPath type {other:?}: add it here"),
            }
        } else if v["emptyDir"].is_object() {
            let p = host.join("emptydir").join(v["name"].as_str().unwrap());
            std::fs::create_dir_all(&p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
            p
        } else {
            panic!("{container}: volume kind of {v}: add it here");
        };
        let mut opts = Vec::new();
        if m["readOnly"] == true {
            opts.push("ro");
        }
        // As the kubelet maps mountPropagation (the host side must be a shared mount,
        // `KubeletDir`).
        match m["mountPropagation"].as_str() {
            Some("Bidirectional") => opts.push("rshared"),
            Some("HostToContainer") => opts.push("rslave"),
            _ => {}
        }
        let opts = if opts.is_empty() {
            String::new()
        } else {
            format!(":{}", opts.join(","))
        };
        args.push(format!(
            "--volume={}:{}{opts}",
            src.display(),
            m["mountPath"].as_str().unwrap()
        ));
    }

    let env = container_env(c, NAMESPACE);
    for (k, v) in &env {
        args.push(format!("--env={k}={v}"));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args.push(IMAGE_TAG.into());
    for w in c["command"]
        .as_array()
        .unwrap()
        .iter()
        .chain(c["args"].as_array().into_iter().flatten())
    {
        args.push(expand(w.as_str().unwrap(), &env));
    }
    let _ = Command::new(podman).args(["rm", "-f", &name]).output();
    run_ok(Command::new(podman).args(&args));
    Started {
        name,
        podman: podman.to_path_buf(),
    }
}

/// `Probe` on a CSI socket: `Some(ready)` when it answers.
fn probe(socket: &Path) -> Option<bool> {
    use hyper_util::rt::TokioIo;
    use mortar_csi::csi::ProbeRequest;
    use mortar_csi::csi::identity_client::IdentityClient;
    use tonic::transport::Endpoint;
    if !socket.exists() {
        return None;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = socket.to_path_buf();
    rt.block_on(async move {
        let ch = Endpoint::from_static("http://csi.invalid")
            .connect_with_connector(tower::service_fn(move |_| {
                let s = s.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
                }
            }))
            .await
            .ok()?;
        let r = IdentityClient::new(ch).probe(ProbeRequest {}).await.ok()?;
        Some(r.into_inner().ready.unwrap_or(true))
    })
}

fn healthz(c: &Started, port: u64) -> bool {
    // The image has bash and no HTTP client: bash's /dev/tcp inside the container's own
    // network namespace.
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} && printf 'GET /healthz HTTP/1.0\\r\\n\\r\\n' >&3 && head -1 <&3"
    );
    let out = Command::new(&c.podman)
        .args(["exec", &c.name, "bash", "-c", &script])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).contains(" 200")
}

#[test]
fn chart_containers_start_under_podman_as_the_kubelet_runs_them() {
    let Some(py) = need("python with helm-python-sdk", python_with_helm()) else {
        return;
    };
    let Some(podman) = podman_ready() else {
        return;
    };
    ensure_image(&podman);
    let docs = docs(&render(&py, NAMESPACE, &[], &[]).unwrap());
    let host = tempfile::tempdir_in("/var/tmp").unwrap();
    let _kubelet = KubeletDir::lay_out(host.path());
    let plugin_dir = host
        .path()
        .join("var/lib/kubelet/plugins/mortar.csi.mortar.dev");

    // The mounter first: the node plugin's Probe asks it.
    let mounter = start(
        &podman,
        host.path(),
        find(&docs, "DaemonSet", "mortar-csi-mounter"),
        "mortar-mounter",
        &[],
        &[],
    );
    let socket_dir = host.path().join("var/lib/mortar-csi/mounter");
    mounter.wait_ready("its state dir and socket", || {
        plugin_dir.join("volumes").is_dir() && socket_dir.join("mounter.sock").exists()
    });

    let node = start(
        &podman,
        host.path(),
        find(&docs, "DaemonSet", "mortar-csi-node"),
        "mortar-csi",
        &[],
        &[],
    );
    node.wait_ready("a ready Probe", || {
        probe(&plugin_dir.join("csi.sock")) == Some(true)
    });

    let controller = start(
        &podman,
        host.path(),
        find(&docs, "Deployment", "mortar-csi-controller"),
        "mortar-csi",
        &[],
        &[],
    );
    let socket = host.path().join("emptydir/socket-dir/csi.sock");
    controller.wait_ready("a ready Probe", || probe(&socket) == Some(true));

    let kube = host.path().join("kubeconfig");
    std::fs::create_dir_all(&kube).unwrap();
    std::fs::write(
        kube.join("config"),
        "apiVersion: v1\nkind: Config\n\
         clusters: [{name: none, cluster: {server: 'http://127.0.0.1:9'}}]\n\
         users: [{name: none, user: {token: none}}]\n\
         contexts: [{name: none, context: {cluster: none, user: none, namespace: mortar-system}}]\n\
         current-context: none\n",
    )
    .unwrap();
    std::fs::set_permissions(&kube, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(kube.join("config"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let op_doc = find(&docs, "Deployment", "mortar-operator");
    let port = op_doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        .as_u64()
        .unwrap();
    let operator = start(
        &podman,
        host.path(),
        op_doc,
        "operator",
        &[
            &format!("--volume={}:/kubeconfig:ro", kube.display()),
            "--env=KUBECONFIG=/kubeconfig/config",
        ],
        &[],
    );
    operator.wait_ready("/healthz", || healthz(&operator, port));

    // The kubelet's own directories stay as they were.
    for d in ["var/lib/kubelet", "var/lib/kubelet/plugins"] {
        let mode = std::fs::metadata(host.path().join(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o750, "{d}");
    }
}

/// `mortar ARGS` on the host (the workspace's build), which must succeed.
fn mortar(args: &[&str]) {
    run_ok(Command::new(bin("mortar")).args(args));
}

/// The operator's brick StatefulSet, its brick container under podman as the kubelet runs
/// it: the operator's command line (`--tls-dir`, no `--insecure-plaintext`), its
/// securityContext, and its volumes: the certificate Secret as the kubelet projects it
/// (made with `mortar certs`, files 0400 as the Secret volume's defaultMode), the volfile
/// ConfigMap, the claim. It must start and answer over mutual TLS, and only so.
#[test]
fn the_operators_brick_container_serves_mutual_tls_under_podman() {
    use mortar_operator::crd::{SharedStorageCluster, SharedStorageClusterSpec};
    use mortar_operator::resources::{self, Plan};
    let Some(podman) = podman_ready() else {
        return;
    };
    ensure_image(&podman);
    let host = tempfile::tempdir_in("/var/tmp").unwrap();
    let h = host.path();

    let mut ssc = SharedStorageCluster::new("shared", SharedStorageClusterSpec::default());
    ssc.metadata.namespace = Some("storage".into());
    ssc.metadata.uid = Some("uid-1".into());
    let plan = Plan {
        bricks: 1,
        volfile_generation: 1,
        image: IMAGE_TAG.into(),
        tls_hash: "0".into(),
    };
    let sts = serde_json::to_value(resources::brick_stateful_set(&ssc, &plan)).unwrap();
    let c = &sts["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert!(!args.contains(&"--insecure-plaintext"), "{args:?}");
    assert!(args.contains(&"--tls-dir"), "{args:?}");

    // What the operator's Secrets hold, made the way an administrator would by hand.
    let ca = h.join("ca");
    let tls = h.join("brick-tls");
    let admin = h.join("admin-tls");
    let stranger_ca = h.join("stranger-ca");
    let stranger = h.join("stranger-tls");
    let s = |p: &Path| p.display().to_string();
    mortar(&[
        "certs",
        "ca",
        "--cluster",
        "storage/shared",
        "--out",
        &s(&ca),
    ]);
    mortar(&[
        "certs",
        "issue",
        "--ca",
        &s(&ca),
        "--role",
        "brick",
        "--name",
        "shared",
        "--out",
        &s(&tls),
    ]);
    mortar(&[
        "certs",
        "issue",
        "--ca",
        &s(&ca),
        "--role",
        "admin",
        "--name",
        "test",
        "--out",
        &s(&admin),
    ]);
    mortar(&[
        "certs",
        "ca",
        "--cluster",
        "other",
        "--out",
        &s(&stranger_ca),
    ]);
    mortar(&[
        "certs",
        "issue",
        "--ca",
        &s(&stranger_ca),
        "--role",
        "admin",
        "--name",
        "test",
        "--out",
        &s(&stranger),
    ]);
    // The Secret volume: the three files only (no ca.key), mode 0400 (defaultMode).
    let mode = sts["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "tls")
        .unwrap()["secret"]["defaultMode"]
        .as_u64()
        .unwrap() as u32;
    for f in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::set_permissions(tls.join(f), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    assert!(!tls.join("ca.key").exists());
    // The volfile the operator would write, with this container's own address.
    let volfile = h.join("volfile");
    std::fs::create_dir_all(&volfile).unwrap();
    std::fs::write(
        volfile.join(resources::VOLFILE_KEY),
        "volume: data\ngeneration: 1\nping-timeout: 5\nbricks:\n- id: b0\n  address: 127.0.0.1:24100\n",
    )
    .unwrap();
    let claim = h.join("claim");
    std::fs::create_dir_all(&claim).unwrap();

    let brick = start(
        &podman,
        h,
        &sts,
        resources::CONTAINER_NAME,
        &[
            &format!("--volume={}:/admin-tls:ro", admin.display()),
            &format!("--volume={}:/stranger-tls:ro", stranger.display()),
        ],
        &[
            ("tls", tls.clone()),
            ("volfile", volfile.clone()),
            (resources::CLAIM_NAME, claim.clone()),
        ],
    );
    let status = |tls_dir: Option<&str>| {
        let mut cmd = Command::new(&podman);
        cmd.args(["exec", &brick.name, "mortar"]);
        if let Some(d) = tls_dir {
            cmd.args(["--tls-dir", d]);
        }
        cmd.args(["status", "127.0.0.1:/data"]);
        cmd.output().unwrap()
    };
    brick.wait_ready("an answer to mortar status over mutual TLS", || {
        let out = status(Some("/admin-tls"));
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("b0")
    });
    let logs = brick.logs();
    assert!(!logs.contains("INSECURE"), "{logs}");
    // Plain TCP and a certificate of another CA get nothing.
    assert!(!status(None).status.success(), "plain TCP answered");
    assert!(
        !status(Some("/stranger-tls")).status.success(),
        "a stranger's certificate answered"
    );
}

/// Runs a container's readinessProbe (an exec probe) inside it, as the kubelet would.
fn readiness(c: &Started, container: &Value) -> bool {
    let cmd: Vec<&str> = container["readinessProbe"]["exec"]["command"]
        .as_array()
        .expect("an exec readinessProbe")
        .iter()
        .map(|w| w.as_str().unwrap())
        .collect();
    Command::new(&c.podman)
        .arg("exec")
        .arg(&c.name)
        .args(&cmd)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The mounter DaemonSet's rolling update as the DaemonSet controller runs it (maxSurge 1,
/// maxUnavailable 0), with the chart's containers under podman: mounter A mounts a real
/// 3-brick volume; a writer on the host keeps a file open and writes through the mount
/// (propagated out of A's container); mounter B starts beside A, and only once B's
/// readiness probe passes is A stopped (`podman stop`: SIGTERM, then A's container and
/// every process in it end). The writer never fails, and B serves the next mount.
#[test]
fn the_mounters_rolling_update_under_podman_keeps_the_mounts() {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let Some(py) = need("python with helm-python-sdk", python_with_helm()) else {
        return;
    };
    let Some(podman) = podman_ready() else {
        return;
    };
    ensure_image(&podman);
    let cluster = mortar_e2e::Cluster::start(65, 3);
    let docs = docs(&render(&py, NAMESPACE, &[], &[]).unwrap());
    let ds = find(&docs, "DaemonSet", "mortar-csi-mounter");
    assert_eq!(ds["spec"]["updateStrategy"]["rollingUpdate"]["maxSurge"], 1);
    let spec = &ds["spec"]["template"]["spec"]["containers"][0];
    let host = tempfile::tempdir_in("/var/tmp").unwrap();
    let _kubelet = KubeletDir::lay_out(host.path());
    let state = "/var/lib/kubelet/plugins/mortar.csi.mortar.dev";
    let on_host = |p: &str| host.path().join(p.trim_start_matches('/'));
    let socket = on_host("/var/lib/mortar-csi/mounter/mounter.sock");
    let tls = mortar_e2e::tls_home().join("client");
    let extra = [
        "--network=host".to_string(),
        format!("--volume={}:/tls:ro", tls.display()),
    ];
    let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
    let start_mounter = || start(&podman, host.path(), ds, "mortar-mounter", &extra, &[]);
    let mount = |name: &str| {
        let req = mortar_csi::mounter::MountRequest {
            source: cluster.target(),
            target: format!("{state}/volumes/{name}"),
            options: vec![
                "tls-dir=/tls".into(),
                format!(
                    "backup-volfile-servers={}:{}",
                    cluster.host(1),
                    cluster.host(2)
                ),
            ],
            log_name: name.into(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(mortar_csi::mounter::request_mount(
            &socket,
            &req,
            Duration::from_secs(60),
        ))
    };

    let a = start_mounter();
    a.wait_ready("its readiness probe", || readiness(&a, spec));
    mount("m1").unwrap_or_else(|e| panic!("mount through A: {e}\n{}", a.logs()));
    let m1 = on_host(&format!("{state}/volumes/m1"));
    let mut f = std::fs::File::create(m1.join("log")).expect("the mount reaches the host");

    // The writer: a record every 10 ms on one descriptor, each read back.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let g = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(m1.join("log"))
            .unwrap();
        std::thread::spawn(move || {
            let (mut n, mut longest) = (0u64, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let rec = format!("{n:015}\n");
                g.write_all_at(rec.as_bytes(), n * 16)
                    .unwrap_or_else(|e| panic!("write {n}: {e}"));
                let mut back = [0u8; 16];
                g.read_exact_at(&mut back, n * 16)
                    .unwrap_or_else(|e| panic!("read {n}: {e}"));
                assert_eq!(&back, rec.as_bytes(), "record {n}");
                longest = longest.max(t.elapsed());
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            (n, longest)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    let b = start_mounter();
    b.wait_ready("its readiness probe", || readiness(&b, spec));
    assert!(b.logs().contains("took the mount over"), "{}", b.logs());
    // What the DaemonSet controller does next: stop the old pod, within its grace period.
    let grace = ds["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    run_ok(Command::new(&podman).args(["stop", "-t", &grace.to_string(), &a.name]));
    let a_logs = a.logs();
    assert!(a_logs.contains("holds every mount"), "{a_logs}");
    let code = Command::new(&podman)
        .args(["inspect", "-f", "{{.State.ExitCode}}", &a.name])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&code.stdout).trim(),
        "0",
        "{a_logs}"
    );

    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (records, longest) = writer.join().expect("the writer never failed");
    eprintln!(
        "writer: {records} records through the rolling update, longest {:.3} s",
        longest.as_secs_f64()
    );
    assert!(records > 50, "{records}");
    writeln!(f, "the first descriptor still works").unwrap();
    drop(f);
    for i in 0..3 {
        let on_brick = std::fs::read(cluster.brick_dir(i).join("log")).unwrap();
        assert!(on_brick.len() as u64 >= records * 16, "brick {i}");
    }

    // The node plugin's next mount is B's.
    mount("m2").unwrap_or_else(|e| panic!("mount through B: {e}\n{}", b.logs()));
    std::fs::write(on_host(&format!("{state}/volumes/m2/through-b")), b"b").unwrap();
    assert_eq!(std::fs::read(m1.join("through-b")).unwrap(), b"b");
    for m in ["m1", "m2"] {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(on_host(&format!("{state}/volumes/{m}")))
            .output();
    }
}
