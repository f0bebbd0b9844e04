//! The container image: built with podman from the workspace's binaries (no second Rust
//! build), checked for its contents, then the podman story (e2e/local/podman-story.sh): three
//! brick containers on a podman network and client containers that mount, write, read back,
//! survive a killed brick.

use std::process::Command;

use mortar_packaging::*;

const BASE: &str = "docker.io/library/debian:bookworm-slim";
const TAG: &str = "mortar:0.1.0";

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

#[test]
fn image_builds_and_the_podman_story_passes() {
    let Some(podman) = need("podman", podman()) else {
        return;
    };
    if need(
        "root (rootful podman, FUSE in containers)",
        is_root().then_some(()),
    )
    .is_none()
    {
        return;
    }
    if need(
        "/dev/fuse",
        std::path::Path::new("/dev/fuse").exists().then_some(()),
    )
    .is_none()
    {
        return;
    }
    let base = Command::new(&podman)
        .args(["image", "exists", BASE])
        .status()
        .is_ok_and(|s| s.success());
    if need(
        &format!(
            "the base image {BASE} (.ci/run imports a debootstrap of bookworm under that name)"
        ),
        base.then_some(()),
    )
    .is_none()
    {
        return;
    }

    let t = std::time::Instant::now();
    run_ok(
        Command::new(repo().join("e2e/local/build-image.sh"))
            .arg("--prebuilt")
            .arg(bin_dir())
            .args(["--tag", TAG])
            .env("CONTAINER_TOOL", &podman),
    );
    eprintln!("image built in {:.1}s", t.elapsed().as_secs_f64());

    let sh = |script: &str| -> String {
        let out = run_ok(Command::new(&podman).args(["run", "--rm", TAG, "bash", "-c", script]));
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    // Non-root by default; every binary there and runnable; mount.mortar is mortar-mount.
    assert_eq!(sh("id -u"), "65532");
    let versions = sh(
        "for b in mortar-brick mortar-mount mortar mortar-operator mortar-csi; do $b --version; done",
    );
    assert_eq!(versions.lines().count(), 5, "{versions}");
    assert_eq!(
        sh("readlink -f /usr/sbin/mount.mortar"),
        "/usr/local/bin/mortar-mount"
    );
    assert_eq!(
        sh("dpkg-query -W -f '${Status}' fuse3"),
        "install ok installed"
    );
    assert_eq!(sh("command -v fusermount3"), "/usr/bin/fusermount3");

    let t = std::time::Instant::now();
    run_ok(Command::new(repo().join("e2e/local/podman-story.sh")).args(["--image", TAG]));
    eprintln!("podman story passed in {:.1}s", t.elapsed().as_secs_f64());
}
