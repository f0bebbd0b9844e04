//! The container image: built with podman from the workspace's binaries (no second Rust
//! build), checked for its contents, then the podman story (e2e/local/podman-story.sh): three
//! brick containers on a podman network and client containers that mount, write, read back,
//! survive a killed brick.

use std::process::Command;

use mortar_packaging::*;

#[test]
fn image_builds_and_the_podman_story_passes() {
    let Some(podman) = podman_ready() else {
        return;
    };
    ensure_image(&podman);

    let sh = |script: &str| -> String {
        let out =
            run_ok(Command::new(&podman).args(["run", "--rm", IMAGE_TAG, "bash", "-c", script]));
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
    run_ok(Command::new(repo().join("e2e/local/podman-story.sh")).args(["--image", IMAGE_TAG]));
    eprintln!("podman story passed in {:.1}s", t.elapsed().as_secs_f64());
}
