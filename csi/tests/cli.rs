//! The binary's command line: help, one-line errors, metrics endpoint.

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mortar-csi"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn help_names_the_modes() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--mode",
        "--endpoint",
        "--node-id",
        "--log-level",
        "controller",
        "node",
    ] {
        assert!(text.contains(word), "--help lacks {word}:\n{text}");
    }
}

#[test]
fn bad_arguments_fail_with_one_line() {
    for args in [
        &["--mode", "sideways"][..],
        &[][..],
        &[
            "--mode",
            "node",
            "--endpoint",
            "unix:///tmp/mortar-csi-cli-test.sock",
        ][..],
        &["--mode", "controller", "--endpoint", "tcp://1.2.3.4:5"][..],
        &["--mode", "controller", "--log-level", "[[["][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_mortar-csi"))
            .args(args)
            .env_remove("NODE_ID")
            .env_remove("CSI_ENDPOINT")
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("mortar-csi: "), "{err}");
    }
}

#[test]
fn metrics_count_calls() {
    let dir = std::env::temp_dir().join(format!("mortar-csi-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Find a free port, then hand it to the plugin.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mortar-csi"))
        .args([
            "--mode",
            "controller",
            "--metrics-address",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--endpoint")
        .arg(format!("unix://{}/csi.sock", dir.display()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut body = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n")
                .unwrap();
            s.read_to_string(&mut body).unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    assert!(
        body.contains("# TYPE mortar_csi_rpc_total counter"),
        "{body}"
    );
}
