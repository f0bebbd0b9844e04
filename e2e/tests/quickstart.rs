//! The README's quick start, as a new user runs it: `mortar local up` (bricks on
//! 127.0.0.11-13, the volume on a mount), then `mount -t mortar` through the helper it
//! installs, then `mortar local down`.

use std::path::Path;
use std::process::Command;

use mortar_e2e::{bin, is_mounted};

fn mortar(args: &[&str]) -> String {
    let out = Command::new(bin("mortar")).args(args).output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "mortar {args:?}: {text}");
    text
}

struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = Command::new(bin("mortar"))
            .args(["local", "down", "--dir"])
            .arg(self.0)
            .output();
    }
}

#[test]
fn local_up_mounts_and_mount_t_mortar_works() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let mnt = tmp.path().join("mnt");
    let _down = Down(&state);
    let up = mortar(&[
        "local",
        "up",
        "--dir",
        state.to_str().unwrap(),
        "--mount",
        mnt.to_str().unwrap(),
    ]);
    assert!(is_mounted(&mnt), "{up}");
    let helper = std::fs::read_link("/sbin/mount.mortar").expect("/sbin/mount.mortar");
    assert_eq!(helper, bin("mortar-mount"), "{up}");

    std::fs::write(mnt.join("hello"), b"from local up\n").unwrap();

    // The bricks serve only peers with a certificate of the cluster's CA.
    let admin = state.join("tls/admin");
    let plain = Command::new(bin("mortar"))
        .args(["status", "127.0.0.11:/data"])
        .env_remove("MORTAR_TLS_DIR")
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plain-TCP client was served");
    mortar(&[
        "--tls-dir",
        admin.to_str().unwrap(),
        "status",
        "127.0.0.11:/data",
    ]);

    // mount(8) finds /sbin/mount.mortar for -t mortar.
    let second = tmp.path().join("second");
    std::fs::create_dir_all(&second).unwrap();
    let out = Command::new("mount")
        .args(["-t", "mortar", "-o"])
        .arg(format!("tls-dir={}", state.join("tls/mount").display()))
        .arg("127.0.0.11:/data")
        .arg(&second)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mount -t mortar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_mounted(&second));
    assert_eq!(
        std::fs::read(second.join("hello")).unwrap(),
        b"from local up\n"
    );
    assert!(
        Command::new("umount")
            .arg(&second)
            .status()
            .unwrap()
            .success()
    );

    let status = mortar(&["local", "status", "--dir", state.to_str().unwrap()]);
    assert_eq!(status.matches("running").count(), 3, "{status}");
    mortar(&["local", "down", "--dir", state.to_str().unwrap()]);
    assert!(!is_mounted(&mnt));
    let status = mortar(&["local", "status", "--dir", state.to_str().unwrap()]);
    assert_eq!(status.matches("stopped").count(), 3, "{status}");
}
