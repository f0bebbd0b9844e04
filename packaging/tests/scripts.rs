//! The shell scripts users run (kind and podman stories, image build, benchmark, CI), and the kind run
//! itself, which needs docker and kind and so runs only where asked (MORTAR_E2E_KIND=1).

use std::process::Command;

use mortar_packaging::*;

const SCRIPTS: &[&str] = &[
    "e2e/kind/run.sh",
    "e2e/local/build-image.sh",
    "e2e/local/podman-story.sh",
    "bench/compare.sh",
    "bench/heal.sh",
    "test.sh",
    "fuzz/ci.sh",
    ".ci/run",
];

#[test]
fn scripts_parse_and_pass_shellcheck() {
    for s in SCRIPTS {
        run_ok(Command::new("bash").arg("-n").arg(repo().join(s)));
    }
    let Some(sc) = need("shellcheck", shellcheck()) else {
        return;
    };
    run_ok(Command::new(sc).args(SCRIPTS).current_dir(repo()));
}

#[test]
fn scripts_print_their_usage() {
    // All but .ci/run, which takes no options.
    for s in &SCRIPTS[..SCRIPTS.len() - 1] {
        let out = run_ok(Command::new(repo().join(s)).arg("--help"));
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(
            text.contains(s.rsplit('/').next().unwrap()),
            "{s} --help:\n{text}"
        );
    }
}

/// e2e/kind/run.sh on a real kind cluster: opt-in, since it creates a cluster and builds
/// the image (MORTAR_E2E_KIND=1; needs docker, kind, kubectl, helm).
#[test]
fn kind_story() {
    if std::env::var_os("MORTAR_E2E_KIND").is_none_or(|v| v != "1") {
        eprintln!(
            "SKIP: the kind story runs only with MORTAR_E2E_KIND=1 (needs docker, kind, kubectl, helm); \
             or run e2e/kind/run.sh"
        );
        return;
    }
    let status = Command::new(repo().join("e2e/kind/run.sh"))
        .status()
        .unwrap();
    match status.code() {
        Some(0) => {}
        Some(77) => eprintln!("SKIP: e2e/kind/run.sh could not run here (see its SKIP line)"),
        _ => panic!("e2e/kind/run.sh failed: {status}"),
    }
}
