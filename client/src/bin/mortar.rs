use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use mortar_client::{admin, local};

/// Mortar admin tool: volume status, heal info, verification, and a local cluster.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Seconds to wait for each brick.
    #[arg(long, global = true, default_value_t = 5.0)]
    timeout: f64,
    /// Directory with an admin certificate (`tls.crt`, `tls.key`) and the cluster's CA
    /// (`ca.crt`) for mutual TLS with the bricks [default: plain TCP].
    #[arg(long, global = true, env = "MORTAR_TLS_DIR")]
    tls_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Bricks up or down, volfile generation, pending heals, capacity.
    Status {
        /// HOST[:PORT]:/VOLUME
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Pending heals per brick.
    Heal {
        #[command(subcommand)]
        cmd: HealCmd,
    },
    /// Compares every brick's copy of the volume; exits 1 on any difference.
    Verify {
        /// HOST[:PORT]:/VOLUME
        target: String,
        /// Compare only the bricks that answer (a down brick is not a difference).
        #[arg(long)]
        up_only: bool,
    },
    /// A local three-brick cluster with a mount, without Kubernetes.
    Local {
        #[command(subcommand)]
        cmd: LocalCmd,
    },
    /// The cluster's CA and the certificates of bricks and clients (mutual TLS).
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// A new CA: writes ca.crt and ca.key (keep ca.key secret) into --out.
    Ca {
        #[arg(long)]
        out: PathBuf,
        /// A name for the cluster, in the CA's subject.
        #[arg(long, default_value = "mortar")]
        cluster: String,
    },
    /// A certificate of the CA in --ca: writes ca.crt, tls.crt and tls.key into --out.
    Issue {
        /// Directory with ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// brick (a brick and its self-heal), admin (CLI, CSI controller, operator) or
        /// client (a mount: file operations only).
        #[arg(long, value_parser = ["brick", "admin", "client"])]
        role: String,
        /// The holder's name (a brick: its id).
        #[arg(long)]
        name: String,
        /// Host names and addresses a brick is reached at (besides `mortar-brick`).
        #[arg(long)]
        host: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum HealCmd {
    /// Entries each brick's self-heal still has to do (split brain marked).
    Info {
        /// HOST[:PORT]:/VOLUME
        target: String,
        #[arg(long)]
        json: bool,
    },
    /// Settles a split-brain file: one copy wins and is copied over the others.
    Resolve {
        /// HOST[:PORT]:/VOLUME
        target: String,
        /// Path inside the volume, e.g. /dir/file
        path: String,
        /// The brick whose copy wins.
        #[arg(long, conflicts_with = "policy", required_unless_present = "policy")]
        source: Option<String>,
        /// Or: the copy with the latest mtime, or the largest.
        #[arg(long, value_parser = ["mtime", "size"])]
        policy: Option<String>,
    },
}

#[derive(Subcommand)]
enum LocalCmd {
    /// Starts bricks on 127.0.0.11-13:24100 and mounts the `data` volume.
    Up {
        #[arg(long, default_value = ".mortar-local")]
        dir: PathBuf,
        #[arg(long, default_value = "mnt")]
        mount: PathBuf,
        /// Do not link /sbin/mount.mortar to this build's mortar-mount (it is linked by
        /// default, so that `mount -t mortar HOST:/data DIR` works).
        #[arg(long)]
        no_mount_helper: bool,
    },
    /// Installs the mount(8) helper: links /sbin/mount.mortar to this build's mortar-mount.
    InstallHelper,
    /// Unmounts and stops the bricks; the data stays in --dir.
    Down {
        #[arg(long, default_value = ".mortar-local")]
        dir: PathBuf,
    },
    Status {
        #[arg(long, default_value = ".mortar-local")]
        dir: PathBuf,
    },
}

fn human(b: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut i = 0;
    while v >= 1024.0 && i < units.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    format!("{v:.1} {}", units[i])
}

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mortar: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    anyhow::ensure!(cli.timeout > 0.0, "--timeout must be positive");
    // `mortar local` finds its own admin certificate.
    let tls_dir = match (&cli.tls_dir, &cli.cmd) {
        (
            None,
            Cmd::Local {
                cmd: LocalCmd::Status { dir } | LocalCmd::Down { dir },
            },
        ) => Some(local::Local::new(dir)?.tls_dir("admin")).filter(|d| d.exists()),
        (
            None,
            Cmd::Local {
                cmd: LocalCmd::Up { dir, .. },
            },
        ) => {
            let l = local::Local::new(dir)?;
            l.make_certs()?;
            Some(l.tls_dir("admin"))
        }
        (d, _) => d.clone(),
    };
    mortar_common::tls::init_client(tls_dir.as_deref())?;
    let timeout = Duration::from_secs_f64(cli.timeout);
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    match cli.cmd {
        Cmd::Status { target, json } => {
            let s = rt()?.block_on(admin::status(&target, timeout))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "Volume {}  generation {}  bricks up {}/{} (quorum {})  heal pending {}",
                    s.volume,
                    s.generation,
                    s.bricks_up,
                    s.bricks.len(),
                    s.quorum,
                    s.heal_pending
                );
                println!(
                    "Ping timeout {}s ({}; a mount's -o ping-timeout overrides it)",
                    s.ping_timeout_secs, s.ping_timeout_from
                );
                println!(
                    "{:<6} {:<24} {:<5} {:>8} {:>12} {:>12}",
                    "BRICK", "ADDRESS", "UP", "HEAL", "CAPACITY", "FREE"
                );
                for b in &s.bricks {
                    println!(
                        "{:<6} {:<24} {:<5} {:>8} {:>12} {:>12}{}",
                        b.id,
                        b.address,
                        if b.up { "yes" } else { "no" },
                        b.heal_pending,
                        human(b.capacity_bytes),
                        human(b.free_bytes),
                        b.error
                            .as_ref()
                            .map(|e| format!("  ({e})"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(if s.bricks_up >= s.quorum { 0 } else { 2 })
        }
        Cmd::Heal {
            cmd: HealCmd::Info { target, json },
        } => {
            let info = rt()?.block_on(admin::heal_info(&target, timeout))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                for b in &info {
                    println!("Brick {} ({})", b.brick, b.address);
                    println!(
                        "Status: {}",
                        if b.connected {
                            "Connected"
                        } else {
                            "Not connected"
                        }
                    );
                    for e in &b.entries {
                        println!(
                            "{}{}",
                            e.path,
                            if e.split_brain {
                                " - Is in split-brain"
                            } else {
                                ""
                            }
                        );
                    }
                    let n = if b.connected {
                        b.entries.len().to_string()
                    } else {
                        "-".into()
                    };
                    println!("Number of entries: {n}\n");
                }
            }
            Ok(0)
        }
        Cmd::Heal {
            cmd:
                HealCmd::Resolve {
                    target,
                    path,
                    source,
                    policy,
                },
        } => {
            let src = match (source, policy.as_deref()) {
                (Some(b), _) => mortar_replication::heal::Source::Brick(b),
                (None, Some("mtime")) => mortar_replication::heal::Source::Mtime,
                (None, _) => mortar_replication::heal::Source::Size,
            };
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let s = rt.block_on(admin::heal_resolve(&target, &path, src, timeout))?;
            println!(
                "{path}: healed {} inode(s), {} bytes copied{}",
                s.healed,
                s.bytes,
                if s.complete {
                    ""
                } else {
                    " (some bricks still to heal)"
                }
            );
            Ok(0)
        }
        Cmd::Verify { target, up_only } => {
            let (n, diffs) = rt()?.block_on(admin::verify(&target, timeout, up_only))?;
            for d in &diffs {
                println!("{d}");
            }
            if diffs.is_empty() {
                println!("{n} paths identical on every brick compared");
                Ok(0)
            } else {
                println!("{} differences", diffs.len());
                Ok(1)
            }
        }
        Cmd::Local { cmd } => match cmd {
            LocalCmd::Up {
                dir,
                mount,
                no_mount_helper,
            } => {
                let l = local::Local::new(&dir)?;
                let m = l.up(&mount)?;
                println!(
                    "Mortar is running: volume {} mounted on {}",
                    l.target(),
                    m.display()
                );
                if !no_mount_helper {
                    // Not fatal: the volume is up either way.
                    match local::install_mount_helper() {
                        Ok(done) => println!("{done}"),
                        Err(e) => println!("mount helper not installed: {e:#}"),
                    }
                }
                // Name this very binary: a fresh build is not on PATH yet.
                let me = std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_else(|_| "mortar".into());
                println!(
                    "  {me} status {}\n  {me} local down --dir {}",
                    l.target(),
                    l.dir.display()
                );
                Ok(0)
            }
            LocalCmd::Down { dir } => {
                local::Local::new(&dir)?.down()?;
                println!("stopped (data kept in {})", dir.display());
                Ok(0)
            }
            LocalCmd::InstallHelper => {
                println!("{}", local::install_mount_helper()?);
                Ok(0)
            }
            LocalCmd::Status { dir } => {
                print!("{}", local::Local::new(&dir)?.status());
                Ok(0)
            }
        },
        Cmd::Certs { cmd } => {
            use mortar_common::tls::{Ca, Role};
            match cmd {
                CertsCmd::Ca { out, cluster } => {
                    anyhow::ensure!(
                        !out.join(mortar_common::tls::CA_KEY_FILE).exists(),
                        "{} already holds a CA",
                        out.display()
                    );
                    Ca::generate(&cluster)?.save(&out)?;
                    println!("CA written to {}", out.display());
                }
                CertsCmd::Issue {
                    ca,
                    role,
                    name,
                    host,
                    out,
                } => {
                    let role = Role::parse(&role).expect("clap checked the role");
                    Ca::load(&ca)?.write_tls_dir(&out, role, &name, &host)?;
                    println!("{}/{name} written to {}", role.prefix(), out.display());
                }
            }
            Ok(0)
        }
    }
}
