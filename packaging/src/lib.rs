//! Helpers for the packaging tests: where the repository, the built binaries and the external
//! tools are, and how to render the chart and validate manifests.
//!
//! The tools come from `.ci/run`: a Python virtualenv (default `/opt/mortar-tools`, override
//! with `MORTAR_TOOLS_VENV`) with PyPI's `helm-python-sdk` (real Helm as a library) and
//! `kubernetes-validate`; Debian's `podman` and `shellcheck`. A test whose tool is missing
//! fails when `CI` is set and is skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The Kubernetes versions manifests are validated against: the chart's minimum
/// (`kubeVersion` in Chart.yaml; the pod-index label) and the API the operator is built for.
pub const KUBE_VERSIONS: &[&str] = &["1.28.0", "1.33.0"];

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A binary of the workspace, built by `cargo build --workspace` next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// The directory holding the workspace's binaries (target/debug or target/release).
pub fn bin_dir() -> PathBuf {
    bin("mortar").parent().unwrap().to_path_buf()
}

pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false")
}

/// `Some(x)` when the tool is there; otherwise panics in CI and returns `None` (after saying
/// why the test is skipped) elsewhere.
pub fn need<T>(what: &str, found: Option<T>) -> Option<T> {
    match found {
        Some(t) => Some(t),
        None if in_ci() => panic!("{what} is missing: .ci/run installs it"),
        None => {
            eprintln!("SKIP: {what} is missing (.ci/run installs it); set CI=1 to make this fatal");
            None
        }
    }
}

fn venv() -> PathBuf {
    std::env::var_os("MORTAR_TOOLS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mortar-tools"))
}

fn runs(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// A Python that imports `helm_python` and `yaml`.
pub fn python_with_helm() -> Option<PathBuf> {
    let candidates = [venv().join("bin/python3"), PathBuf::from("python3")];
    candidates
        .into_iter()
        .find(|py| runs(Command::new(py).args(["-c", "import helm_python, yaml, jsonschema"])))
}

pub fn kubernetes_validate() -> Option<PathBuf> {
    let p = venv().join("bin/kubernetes-validate");
    if p.is_file() {
        return Some(p);
    }
    on_path("kubernetes-validate")
}

pub fn podman() -> Option<PathBuf> {
    on_path("podman").filter(|p| runs(Command::new(p).arg("--version")))
}

pub fn shellcheck() -> Option<PathBuf> {
    on_path("shellcheck")
}

/// Runs a command and returns its output; panics with stdout and stderr when it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `helm template` of charts/mortar (with its CRDs) through e2e/tools/helm.py.
pub fn render(
    py: &Path,
    namespace: &str,
    values: &[&Path],
    sets: &[&str],
) -> Result<String, String> {
    let mut cmd = Command::new(py);
    cmd.arg(repo().join("e2e/tools/helm.py"))
        .arg("template")
        .arg(repo().join("charts/mortar"))
        .args([
            "--name",
            "mortar",
            "--namespace",
            namespace,
            "--include-crds",
        ]);
    for v in values {
        cmd.arg("-f").arg(v);
    }
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Every non-empty document of a YAML stream.
pub fn docs(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_norway::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).expect("rendered YAML parses"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The one document of this kind and name.
pub fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {kind} {name}, found {}",
        found.len()
    );
    found[0]
}

/// Validates a file of manifests against the Kubernetes schemas (strict: unknown fields are
/// errors) for every version in [`KUBE_VERSIONS`]. Custom resources are skipped by
/// kubernetes-validate; `validate_custom` checks them.
pub fn validate(kv: &Path, file: &Path) {
    for v in KUBE_VERSIONS {
        let out = run_ok(
            Command::new(kv)
                .args(["--strict", "--quiet", "-k", v])
                .arg(file)
                .current_dir(std::env::temp_dir()),
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        for line in text.lines() {
            // Only custom resources may lack a schema.
            assert!(
                !line.contains("ERROR") && !line.contains("failed"),
                "{}: {line}",
                file.display()
            );
            if line.contains("Couldn't find schema") {
                assert!(
                    line.contains("mortar.dev/"),
                    "{}: no schema for a built-in kind: {line}",
                    file.display()
                );
            }
        }
    }
}

/// Validates the custom resources in `file` against the CRDs in crds/.
pub fn validate_custom(py: &Path, file: &Path) -> String {
    let out = run_ok(
        Command::new(py)
            .arg(repo().join("e2e/tools/validate_cr.py"))
            .arg("--crd")
            .arg(repo().join("crds"))
            .arg(file),
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The tag the packaging tests build and run.
pub const IMAGE_TAG: &str = "mortar:0.1.0";
/// The image's base, imported by `.ci/run` from a debootstrap of bookworm.
pub const BASE_IMAGE: &str = "docker.io/library/debian:bookworm-slim";

/// Builds [`IMAGE_TAG`] from the workspace's binaries (e2e/local/build-image.sh --prebuilt),
/// once for a given set of binaries: tests in other processes wait on a lock file and reuse
/// the image while a stamp of the binaries (size and mtime) still matches.
pub fn ensure_image(podman: &Path) {
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(std::env::temp_dir().join("mortar-packaging-image.lock"))
        .expect("image lock file");
    let _held = Flock::exclusive(&lock);
    let mut stamp = String::new();
    for b in [
        "mortar-brick",
        "mortar-mount",
        "mortar",
        "mortar-operator",
        "mortar-csi",
    ] {
        let m = bin(b).metadata().unwrap();
        stamp += &format!("{b} {} {}.{}\n", m.size(), m.mtime(), m.mtime_nsec());
    }
    stamp += &std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stamp_file = std::env::temp_dir().join("mortar-packaging-image.stamp");
    let exists = Command::new(podman)
        .args(["image", "exists", IMAGE_TAG])
        .status()
        .is_ok_and(|s| s.success());
    if exists && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(stamp.as_str()) {
        return;
    }
    let t = std::time::Instant::now();
    run_ok(
        Command::new(repo().join("e2e/local/build-image.sh"))
            .arg("--prebuilt")
            .arg(bin_dir())
            .args(["--tag", IMAGE_TAG])
            .env("CONTAINER_TOOL", podman),
    );
    eprintln!("image built in {:.1}s", t.elapsed().as_secs_f64());
    std::fs::File::create(&stamp_file)
        .and_then(|mut f| f.write_all(stamp.as_bytes()))
        .expect("image stamp");
}

/// An exclusive `flock` held until dropped (closing the file releases it too).
struct Flock<'a>(&'a std::fs::File);

impl<'a> Flock<'a> {
    fn exclusive(f: &'a std::fs::File) -> Self {
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor this borrow keeps open.
        let rc = unsafe { flock(f.as_raw_fd(), LOCK_EX) };
        assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
        Flock(f)
    }
}

impl Drop for Flock<'_> {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above.
        unsafe { flock(self.0.as_raw_fd(), LOCK_UN) };
    }
}

const LOCK_EX: i32 = 2;
const LOCK_UN: i32 = 8;
unsafe extern "C" {
    fn flock(fd: i32, operation: i32) -> i32;
}

/// Whether this process runs as root (rootful podman, FUSE in containers).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { geteuid() == 0 }
}

unsafe extern "C" {
    fn geteuid() -> u32;
}

/// The podman binary when everything a container test needs is there: podman, root,
/// /dev/fuse and the base image; otherwise as [`need`] says.
pub fn podman_ready() -> Option<PathBuf> {
    let podman = need("podman", podman())?;
    need(
        "root (rootful podman, FUSE in containers)",
        is_root().then_some(()),
    )?;
    need("/dev/fuse", Path::new("/dev/fuse").exists().then_some(()))?;
    let base = Command::new(&podman)
        .args(["image", "exists", BASE_IMAGE])
        .status()
        .is_ok_and(|s| s.success());
    need(
        &format!(
            "the base image {BASE_IMAGE} (.ci/run imports a debootstrap of bookworm under that name)"
        ),
        base.then_some(()),
    )?;
    Some(podman)
}

/// A container's environment as the kubelet gives it: plain values, and downward-API fields
/// (node name, pod name, namespace, StatefulSet pod index) with plausible values. Panics on a
/// source it does not know, so that a new one is added here on purpose.
pub fn container_env(c: &Value, namespace: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for e in c["env"].as_array().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = if let Some(v) = e["value"].as_str() {
            v.to_string()
        } else {
            match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("spec.nodeName") => "node-1".into(),
                Some("metadata.name") => "pod-0".into(),
                Some("metadata.namespace") => namespace.into(),
                Some("metadata.labels['apps.kubernetes.io/pod-index']") => "0".into(),
                other => panic!("{}: env {name} from {other:?}: add it here", c["name"]),
            }
        };
        env.push((name, value));
    }
    env
}

/// `$(VAR)` in a command or argument replaced from `env`, as the kubelet does.
pub fn expand(word: &str, env: &[(String, String)]) -> String {
    env.iter().fold(word.to_string(), |w, (k, v)| {
        w.replace(&format!("$({k})"), v)
    })
}
