//! `mortar local`: a three-brick cluster of local processes plus a mount, for trying Mortar
//! without Kubernetes. Bricks listen on 127.0.0.11-13, as pods would on their own IPs.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::admin;
use mortar_common::volfile::{BrickSpec, DEFAULT_PORT, Volfile};

pub const BRICKS: usize = 3;

fn brick_addr(i: usize) -> String {
    format!("127.0.0.{}:{DEFAULT_PORT}", 11 + i)
}

/// Finds a sibling binary of the running one (they ship together).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let p = me.parent().context("no exe dir")?.join(name);
    if p.exists() {
        return Ok(p);
    }
    bail!("{name} not found next to {}", me.display())
}

fn pid_alive(pid: i32) -> bool {
    // A killed brick whose parent is gone may linger as a zombie: that is not running.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false);
    // SAFETY: signal 0 only checks for existence.
    pid > 0 && !zombie && unsafe { libc::kill(pid, 0) } == 0
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

pub fn is_mounted(mnt: &Path) -> bool {
    let Ok(canon) = mnt.canonicalize() else {
        return false;
    };
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split(' ');
        let (_, target, fstype) = (f.next(), f.next(), f.next());
        target.map(|t| t.replace("\\040", " ")) == Some(canon.to_string_lossy().into_owned())
            && fstype.is_some_and(|t| t.starts_with("fuse"))
    })
}

/// Where mount(8) looks for `mount.TYPE` helpers (util-linux searches /sbin, /sbin/fs.d and
/// /sbin/fs; on merged-/usr systems /sbin is /usr/sbin).
pub const MOUNT_HELPER: &str = "/sbin/mount.mortar";

/// Makes `mount -t mortar HOST:/VOLUME DIR` work with this build: links [`MOUNT_HELPER`] to the
/// `mortar-mount` next to this binary. A helper that is a link to some `mortar-mount` (an
/// earlier build) is repointed; anything else there (a packaged install) is left alone.
/// Returns what it did, for the user.
pub fn install_mount_helper() -> anyhow::Result<String> {
    let target = sibling("mortar-mount")?;
    let helper = Path::new(MOUNT_HELPER);
    match std::fs::read_link(helper) {
        Ok(current) if current == target => {
            return Ok(format!("{MOUNT_HELPER} -> {}", target.display()));
        }
        Ok(current) if current.file_name() == Some("mortar-mount".as_ref()) => {
            std::fs::remove_file(helper).with_context(|| format!("replacing {MOUNT_HELPER}"))?;
        }
        Ok(_) => {
            return Ok(format!(
                "{MOUNT_HELPER} links elsewhere; left alone (mount -t mortar uses it)"
            ));
        }
        Err(_) if helper.symlink_metadata().is_ok() => {
            return Ok(format!(
                "{MOUNT_HELPER} is installed already; left alone (mount -t mortar uses it)"
            ));
        }
        Err(_) => {}
    }
    std::os::unix::fs::symlink(&target, helper).with_context(|| {
        format!(
            "cannot link {MOUNT_HELPER} (as root: ln -s {} {MOUNT_HELPER})",
            target.display()
        )
    })?;
    Ok(format!(
        "installed {MOUNT_HELPER} -> {}: `mount -t mortar HOST:/data DIR` works",
        target.display()
    ))
}

pub struct Local {
    pub dir: PathBuf,
}

impl Local {
    pub fn new(dir: &Path) -> anyhow::Result<Local> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Local {
            dir: dir.canonicalize()?,
        })
    }

    fn volfile_path(&self) -> PathBuf {
        self.dir.join("volfile.yaml")
    }

    fn pid_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("b{i}.pid"))
    }

    fn mount_record(&self) -> PathBuf {
        self.dir.join("mountpoint")
    }

    /// The cluster's certificates: a CA, one TLS directory per brick, one for the mount and
    /// one for the admin commands (`tls/admin`: `mortar --tls-dir .mortar-local/tls/admin`).
    pub fn tls_dir(&self, who: &str) -> PathBuf {
        self.dir.join("tls").join(who)
    }

    pub fn make_certs(&self) -> anyhow::Result<()> {
        use mortar_common::tls::{self, Ca, Role};
        if self.tls_dir("ca").join(tls::CA_KEY_FILE).exists() {
            return Ok(());
        }
        let ca = Ca::generate("local")?;
        for i in 0..BRICKS {
            let host = brick_addr(i)
                .split(':')
                .next()
                .unwrap_or_default()
                .to_string();
            ca.write_tls_dir(
                &self.tls_dir(&format!("b{i}")),
                Role::Brick,
                &format!("b{i}"),
                &[host],
            )?;
        }
        ca.write_tls_dir(&self.tls_dir("mount"), Role::Client, "local-mount", &[])?;
        ca.write_tls_dir(&self.tls_dir("admin"), Role::Admin, "local-admin", &[])?;
        // The CA's key last: its presence says the set is complete.
        ca.save(&self.tls_dir("ca"))
    }

    pub fn target(&self) -> String {
        format!("{}:/data", brick_addr(0))
    }

    pub fn up(&self, mnt: &Path) -> anyhow::Result<PathBuf> {
        let brick_bin = sibling("mortar-brick")?;
        let mount_bin = sibling("mortar-mount")?;
        if !self.volfile_path().exists() {
            let vf = Volfile {
                volume: "data".into(),
                generation: 1,
                bricks: (0..BRICKS)
                    .map(|i| BrickSpec {
                        id: format!("b{i}"),
                        address: brick_addr(i),
                    })
                    .collect(),
                ping_timeout: None,
            };
            std::fs::write(self.volfile_path(), vf.to_yaml())?;
        }
        std::fs::create_dir_all(self.dir.join("logs"))?;
        self.make_certs()?;
        for i in 0..BRICKS {
            if read_pid(&self.pid_path(i)).is_some_and(pid_alive) {
                continue;
            }
            let log = std::fs::File::create(self.dir.join("logs").join(format!("b{i}.log")))?;
            let child = Command::new(&brick_bin)
                .args(["--id", &format!("b{i}"), "--listen", &brick_addr(i)])
                .arg("--dir")
                .arg(self.dir.join(format!("b{i}")))
                .arg("--volfile")
                .arg(self.volfile_path())
                .arg("--tls-dir")
                .arg(self.tls_dir(&format!("b{i}")))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .process_group(0)
                .spawn()
                .with_context(|| format!("starting {}", brick_bin.display()))?;
            std::fs::write(self.pid_path(i), child.id().to_string())?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0..BRICKS {
            loop {
                if rt
                    .block_on(admin::health(&brick_addr(i), Duration::from_secs(1)))
                    .is_ok()
                {
                    break;
                }
                if !read_pid(&self.pid_path(i)).is_some_and(pid_alive) {
                    bail!(
                        "brick b{i} exited; see {}",
                        self.dir.join("logs").join(format!("b{i}.log")).display()
                    );
                }
                if Instant::now() > deadline {
                    bail!("brick b{i} did not come up within 15 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        std::fs::create_dir_all(mnt)?;
        let mnt = mnt.canonicalize()?;
        if !is_mounted(&mnt) {
            let st = Command::new(&mount_bin)
                .arg("--tls-dir")
                .arg(self.tls_dir("mount"))
                .arg(self.target())
                .arg(&mnt)
                .arg("-o")
                .arg("backup-volfile-servers=127.0.0.12:127.0.0.13")
                .status()?;
            if !st.success() {
                bail!("mortar-mount failed");
            }
        }
        std::fs::write(self.mount_record(), mnt.to_string_lossy().as_bytes())?;
        Ok(mnt)
    }

    pub fn down(&self) -> anyhow::Result<()> {
        if let Ok(m) = std::fs::read_to_string(self.mount_record()) {
            let m = PathBuf::from(m.trim());
            if is_mounted(&m) {
                let st = Command::new("umount").arg(&m).status()?;
                if !st.success() {
                    // Busy: detach now, the kernel finishes when the last user leaves.
                    Command::new("umount").arg("-l").arg(&m).status()?;
                }
            }
        }
        for i in 0..BRICKS {
            if let Some(pid) = read_pid(&self.pid_path(i)) {
                if pid_alive(pid) {
                    // SAFETY: plain kill(2) of our own brick.
                    unsafe { libc::kill(pid, libc::SIGTERM) };
                    let t = Instant::now();
                    while pid_alive(pid) && t.elapsed() < Duration::from_secs(5) {
                        std::thread::sleep(Duration::from_millis(50));
                        // Reap it if it is our child (it is not when started by another run).
                        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
                    }
                }
                let _ = std::fs::remove_file(self.pid_path(i));
            }
        }
        Ok(())
    }

    pub fn status(&self) -> String {
        let mut out = String::new();
        for i in 0..BRICKS {
            let alive = read_pid(&self.pid_path(i)).is_some_and(pid_alive);
            out += &format!(
                "brick b{i} {} {}\n",
                brick_addr(i),
                if alive { "running" } else { "stopped" }
            );
        }
        match std::fs::read_to_string(self.mount_record()) {
            Ok(m) if is_mounted(Path::new(m.trim())) => {
                out += &format!("mount {} mounted\n", m.trim())
            }
            Ok(m) => out += &format!("mount {} not mounted\n", m.trim()),
            Err(_) => out += "mount none\n",
        }
        out
    }
}
