use std::path::PathBuf;

use clap::Parser;
use mortar_client::handover;
use mortar_client::mount::{self, MountArgs};

/// Mounts a Mortar volume with FUSE.
#[derive(Parser)]
#[command(
    name = "mortar-mount",
    version,
    after_help = "Upgrading the process that serves a mount, in place: mortar-mount --replace-server MOUNTPOINT [BINARY]. Taking a mount over from the process that holds it (a new mounter): mortar-mount --take-over MOUNTPOINT [-f].\n\nMount options (-o): backup-volfile-servers=H2:H3, ping-timeout=SECS (default: the volfile's ping-timeout, else 5), attribute-timeout=SECS, entry-timeout=SECS, log-level=LEVEL, log-file=PATH, metrics=HOST:PORT, no-leases (cache nothing beyond the timeouts), ro, tls-dir=DIR"
)]
struct Args {
    /// HOST[:PORT]:/VOLUME — any brick of the volume serves its description.
    spec: String,
    mountpoint: PathBuf,
    /// Mount options, comma separated.
    #[arg(short = 'o')]
    options: Vec<String>,
    /// Stay in the foreground (otherwise return once mounted).
    #[arg(short = 'f', long)]
    foreground: bool,
    #[arg(long)]
    log_level: Option<String>,
    /// Log to this file [default when daemonised: /var/log/mortar/mount-<mountpoint>.log].
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Directory with this client's certificate (`tls.crt`, `tls.key`) and the cluster's CA
    /// (`ca.crt`) for mutual TLS with the bricks; before `-o tls-dir=`, which comes before
    /// `MORTAR_TLS_DIR` [default: plain TCP].
    #[arg(long)]
    tls_dir: Option<PathBuf>,
}

fn main() {
    // The holder of a mount starts its servers so (see `mortar_client::handover`).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|a| a == handover::SERVE_ARG) {
        if let Err(e) = mount::serve_handover() {
            eprintln!("mortar-mount: {e:#}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    if argv.get(1).is_some_and(|a| a == handover::TAKE_OVER_ARG) {
        let foreground = argv[2..].iter().any(|a| a == "-f" || a == "--foreground");
        let Some(mnt) = argv[2..]
            .iter()
            .find(|a| !a.to_string_lossy().starts_with('-'))
        else {
            eprintln!(
                "usage: mortar-mount {} MOUNTPOINT [-f]",
                handover::TAKE_OVER_ARG
            );
            std::process::exit(2);
        };
        if let Err(e) = mount::take_over(mnt.as_ref(), foreground) {
            eprintln!("mortar-mount: {e:#}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    if argv.get(1).is_some_and(|a| a == handover::REPLACE_ARG) {
        replace_server(&argv[2..]);
    }
    // Installed as /sbin/mount.mortar (a link to this binary), mount(8) calls us with its
    // own argument conventions.
    let argv0 = std::env::args().next().unwrap_or_default();
    if argv0.rsplit('/').next() == Some("mount.mortar") {
        mount_helper();
    }
    let a = Args::parse();
    let mut args = match MountArgs::parse(&a.spec, &a.mountpoint, &a.options, a.foreground) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("mortar-mount: {e}");
            std::process::exit(2);
        }
    };
    if a.tls_dir.is_some() {
        args.tls_dir = a.tls_dir;
    }
    if let Some(l) = a.log_level {
        args.log_level = l;
    }
    if a.log_file.is_some() {
        args.log_file = a.log_file;
    }
    if let Err(e) = mount::run(args) {
        eprintln!("mortar-mount: {e:#}");
        std::process::exit(1);
    }
}

/// `mount.mortar HOST:/VOLUME DIR [-sfnv] [-o opts]`, as mount(8) runs it.
fn mount_helper() -> ! {
    let mut args = std::env::args().skip(1);
    let (Some(spec), Some(dir)) = (args.next(), args.next()) else {
        eprintln!("usage: mount.mortar HOST[:PORT]:/VOLUME DIR [-o options]");
        std::process::exit(2);
    };
    let mut opts = Vec::new();
    let mut rest = args.peekable();
    while let Some(a) = rest.next() {
        match a.as_str() {
            "-o" => opts.extend(rest.next()),
            // sloppy, fake, no-mtab, verbose: nothing for us to do
            "-s" | "-f" | "-n" | "-v" => {}
            o if o.starts_with("-o") => opts.push(o[2..].to_string()),
            o => {
                eprintln!("mount.mortar: unexpected argument {o:?}");
                std::process::exit(2);
            }
        }
    }
    let args = match MountArgs::parse(&spec, &PathBuf::from(dir), &opts, false) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mount.mortar: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = mount::run(args) {
        eprintln!("mount.mortar: {e:#}");
        std::process::exit(1);
    }
    std::process::exit(0)
}

/// `mortar-mount --replace-server MOUNTPOINT [BINARY]`: a planned upgrade of the process
/// serving a mount (BINARY, default this one, serves it from now on); open files, locks and
/// requests in flight carry over.
fn replace_server(rest: &[std::ffi::OsString]) -> ! {
    let (Some(mnt), binary) = (rest.first(), rest.get(1)) else {
        eprintln!(
            "usage: mortar-mount {} MOUNTPOINT [BINARY]",
            handover::REPLACE_ARG
        );
        std::process::exit(2);
    };
    match handover::replace_server(mnt.as_ref(), binary.map(PathBuf::from)) {
        Ok(msg) => {
            println!("{msg}");
            std::process::exit(0)
        }
        Err(e) => {
            eprintln!("mortar-mount: {e:#}");
            std::process::exit(1)
        }
    }
}
