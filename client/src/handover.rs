//! Mounts that outlive the process serving them.
//!
//! A mount is two processes. The *holder* mounts, keeps the `/dev/fuse` descriptor and the
//! kernel's INIT request, and does nothing else, so no request can crash it. The *server*
//! (this binary again, or another one for an upgrade) gets both over a socket (SCM_RIGHTS)
//! and serves the kernel's requests. When a server dies, the holder starts the next one at
//! once. The kernel keeps the requests the dead server had read but not answered: the
//! connection lives as long as any descriptor of it, and the holder's is one. The successor
//! asks for them again with FUSE_NOTIFY_RESEND (Linux 6.9 and later).
//!
//! A successor must not do the INIT handshake again (the kernel sends INIT once). It replays
//! the kernel's INIT into fuser's handshake over a socket pair, forwards the answer to the
//! kernel only if no server did before, and then serves the real device on the same
//! descriptor number.
//!
//! What a successor needs from its predecessor lives in a memfd the holder keeps, appended to
//! as the predecessor goes ([`StateLog`]): which gfid each inode number the kernel holds
//! stands for, and which lock owners took POSIX locks. File handles need nothing: a
//! successor serves a handle it did not open as a fresh one of the same file.

use std::collections::{HashMap, HashSet};
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::Context;
use mortar_common::gfid::Gfid;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

use crate::mount::MountArgs;

/// The descriptor a server finds its holder's socket on.
pub const HOLDER_FD: RawFd = 3;
/// The first argument that makes `mortar-mount` a server for a holder.
pub const SERVE_ARG: &str = "--handover";
/// The first argument that asks a mount's holder to replace its server.
pub const REPLACE_ARG: &str = "--replace-server";
/// The first argument that makes this process the holder of a mount another holds.
pub const TAKE_OVER_ARG: &str = "--take-over";

/// What the holder hands each server, with the device and the state log as descriptors.
#[derive(Serialize, Deserialize)]
pub struct Handover {
    pub args: MountArgs,
    /// 0 for the first server of the mount, then one more for each successor.
    pub generation: u64,
    /// The kernel's INIT request, as read from the device.
    pub init: Vec<u8>,
    /// Whether a server answered INIT already (a successor's answer goes nowhere).
    pub answered: bool,
    /// What every session of this mount names itself by, for the bricks (see
    /// `Hello.family`): a successor's sessions take over the POSIX locks of the last one's.
    pub family: [u8; 16],
}

/// What a server tells its holder.
#[derive(Serialize, Deserialize, Debug)]
pub enum Report {
    /// Serving the device (INIT answered).
    Ready,
    /// Could not start; the text says why.
    Failed(String),
}

/// A request on a holder's control socket, one JSON line.
#[derive(Serialize, Deserialize, Debug)]
pub enum Control {
    /// Serve the mount with this binary from now on (a planned upgrade): the running server
    /// is stopped and this one resumes its work.
    Replace(PathBuf),
    /// Hand the mount to the asking process, which holds it from now on (the holder's own
    /// upgrade: a new mounter pod takes over the mounts of the old one). The holder stops
    /// its server, sends the device, the state log and the handover on this connection,
    /// and exits once the new holder says it holds the mount.
    TakeOver,
}

// ---------------------------------------------------------------------------------------
// The state log.

const REC: usize = 25;
const INO: u8 = 1;
const FORGET: u8 = 2;
const LOCK: u8 = 3;
const UNLOCK: u8 = 4;

/// An append-only record, in a memfd the holder keeps, of what a successor must know:
/// inode numbers handed to the kernel (and forgotten), lock owners that took POSIX locks
/// (and released them). One `write` per record, so a server killed mid-way leaves whole
/// records only.
pub struct StateLog {
    fd: OwnedFd,
    appended: AtomicU64,
}

/// What a state log says the kernel holds.
#[derive(Default, Debug, PartialEq)]
pub struct State {
    pub inos: HashMap<u64, Gfid>,
    pub lock_owners: HashSet<(Gfid, u64)>,
}

impl StateLog {
    pub fn create() -> std::io::Result<StateLog> {
        let fd = rustix::fs::memfd_create("mortar-mount-state", rustix::fs::MemfdFlags::CLOEXEC)?;
        Ok(StateLog::from_fd(fd))
    }

    pub fn from_fd(fd: OwnedFd) -> StateLog {
        StateLog {
            fd,
            appended: AtomicU64::new(0),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn put(&self, kind: u8, a: u64, g: Gfid) {
        let mut rec = [0u8; REC];
        rec[0] = kind;
        rec[1..9].copy_from_slice(&a.to_le_bytes());
        rec[9..].copy_from_slice(&g.0);
        // A memfd write fails only without memory; the successor then resolves fewer
        // inodes (ESTALE for those), which the log says.
        if let Err(e) = rustix::io::write(&self.fd, &rec) {
            tracing::error!("state log: {e}: a successor of this server will not know every inode");
        }
        self.appended.fetch_add(1, Relaxed);
    }

    pub fn ino(&self, ino: u64, g: Gfid) {
        self.put(INO, ino, g)
    }
    pub fn forget(&self, ino: u64) {
        self.put(FORGET, ino, Gfid::ROOT)
    }
    pub fn lock(&self, g: Gfid, owner: u64) {
        self.put(LOCK, owner, g)
    }
    pub fn unlock(&self, g: Gfid, owner: u64) {
        self.put(UNLOCK, owner, g)
    }

    /// Records written since the log was last rewritten.
    pub fn appended(&self) -> u64 {
        self.appended.load(Relaxed)
    }

    /// Reads the whole log.
    pub fn load(&self) -> std::io::Result<State> {
        let size = rustix::fs::fstat(&self.fd)?.st_size as usize;
        let mut buf = vec![0u8; size];
        let mut at = 0;
        while at < size {
            match rustix::io::pread(&self.fd, &mut buf[at..], at as u64) {
                Ok(0) => break,
                Ok(n) => at += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(parse(&buf[..at]))
    }

    /// Replaces the log with just `state` (it only grows otherwise).
    pub fn rewrite(&self, state: &State) -> std::io::Result<()> {
        let mut out = Vec::with_capacity((state.inos.len() + state.lock_owners.len()) * REC);
        let mut rec = |kind: u8, a: u64, g: &Gfid| {
            out.push(kind);
            out.extend_from_slice(&a.to_le_bytes());
            out.extend_from_slice(&g.0);
        };
        for (ino, g) in &state.inos {
            rec(INO, *ino, g);
        }
        for (g, owner) in &state.lock_owners {
            rec(LOCK, *owner, g);
        }
        rustix::fs::ftruncate(&self.fd, 0)?;
        rustix::fs::seek(&self.fd, rustix::fs::SeekFrom::Start(0))?;
        let mut at = 0;
        while at < out.len() {
            at += rustix::io::write(&self.fd, &out[at..])?;
        }
        self.appended.store(0, Relaxed);
        Ok(())
    }
}

fn parse(buf: &[u8]) -> State {
    let mut s = State::default();
    for rec in buf.chunks_exact(REC) {
        let a = u64::from_le_bytes(rec[1..9].try_into().unwrap());
        let g = Gfid::from_bytes(&rec[9..]).unwrap();
        match rec[0] {
            INO => {
                s.inos.insert(a, g);
            }
            FORGET => {
                s.inos.remove(&a);
            }
            LOCK => {
                s.lock_owners.insert((g, a));
            }
            UNLOCK => {
                s.lock_owners.remove(&(g, a));
            }
            _ => {}
        }
    }
    s
}

// ---------------------------------------------------------------------------------------
// Messages with descriptors.

fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

fn send(sock: BorrowedFd<'_>, msg: &[u8], fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::Error::other("too many descriptors"));
    }
    rustix::net::sendmsg(
        sock,
        &[IoSlice::new(msg)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?;
    Ok(())
}

/// One message (at most 1 MiB) and the descriptors that came with it; `None` at the end.
fn recv(sock: BorrowedFd<'_>) -> std::io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; 1 << 20];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let r = loop {
        match rustix::net::recvmsg(
            sock,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r?,
        }
    };
    let mut fds = Vec::new();
    for m in control.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if r.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(r.bytes);
    Ok(Some((buf, fds)))
}

// ---------------------------------------------------------------------------------------
// The server's side.

/// A server's link to its holder.
pub struct Link {
    sock: OwnedFd,
    pub handover: Handover,
    fuse: OwnedFd,
    state: OwnedFd,
}

impl Link {
    /// Takes what the holder sent on [`HOLDER_FD`].
    pub fn receive() -> anyhow::Result<Link> {
        // SAFETY: the holder started us with its socket on HOLDER_FD, ours alone.
        let sock = unsafe { OwnedFd::from_raw_fd(HOLDER_FD) };
        let _ = rustix::io::fcntl_setfd(&sock, rustix::io::FdFlags::CLOEXEC);
        let (msg, fds) = recv(sock.as_fd())?.context("the holder sent nothing")?;
        let handover: Handover = serde_json::from_slice(&msg).context("the holder's handover")?;
        let [fuse, state]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|_| anyhow::anyhow!("the holder sent the wrong descriptors"))?;
        Ok(Link {
            sock,
            handover,
            fuse,
            state,
        })
    }

    /// The state log the holder keeps for this mount (another descriptor of it).
    pub fn state_log(&self) -> std::io::Result<StateLog> {
        Ok(StateLog::from_fd(self.state.try_clone()?))
    }

    pub fn report(&self, r: &Report) {
        let msg = serde_json::to_vec(r).unwrap();
        if let Err(e) = send(self.sock.as_fd(), &msg, &[]) {
            tracing::warn!("telling the holder {r:?}: {e}");
        }
    }

    /// A fuser session on the mount's device without a second INIT (see the module's
    /// comment); a successor then asks the kernel to send again what its predecessor never
    /// answered.
    pub fn session<FS: fuser::Filesystem>(
        &self,
        fs: FS,
        config: &fuser::Config,
    ) -> std::io::Result<fuser::Session<FS>> {
        let (ours, kernel) = seqpacket_pair()?;
        rustix::io::write(&kernel, &self.handover.init)?;
        let session = fuser::Session::from_fd(fs, ours, config.acl, config.clone())?;
        let mut answer = vec![0u8; 4096];
        let n = rustix::io::read(&kernel, &mut answer)?;
        if !self.handover.answered {
            write_device(&self.fuse, &answer[..n])?;
        }
        // From here the session's descriptor number is the device.
        let at = session.as_fd().as_raw_fd();
        // SAFETY: `at` is the session's own descriptor; dup3 atomically makes it the device.
        if unsafe { libc::dup3(self.fuse.as_raw_fd(), at, libc::O_CLOEXEC) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if self.handover.generation > 0 {
            // struct fuse_out_header { len: 16, error: FUSE_NOTIFY_RESEND (7), unique: 0 }
            let mut notify = [0u8; 16];
            notify[..4].copy_from_slice(&16u32.to_le_bytes());
            notify[4..8].copy_from_slice(&7i32.to_le_bytes());
            match write_device(&self.fuse, &notify) {
                Ok(()) => tracing::info!(
                    "asked the kernel to resend what the last server left unanswered"
                ),
                // Older kernels: those requests stay unanswered (see README).
                Err(e) => tracing::warn!("FUSE_NOTIFY_RESEND: {e} (kernel older than 6.9?)"),
            }
        }
        Ok(session)
    }
}

fn write_device(fd: &OwnedFd, b: &[u8]) -> std::io::Result<()> {
    match rustix::io::write(fd, b) {
        Ok(_) => Ok(()),
        // The answer to a request the kernel no longer waits for (an INIT answered
        // already): nothing to do.
        Err(rustix::io::Errno::NOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

// ---------------------------------------------------------------------------------------
// The holder.

/// Where a mount's holder takes control requests.
pub fn control_path(mountpoint: &Path) -> PathBuf {
    use sha2::Digest;
    let h = sha2::Sha256::digest(mountpoint.as_os_str().as_encoded_bytes());
    let hex: String = h[..8].iter().map(|b| format!("{b:02x}")).collect();
    PathBuf::from(format!("/run/mortar/mounts/{hex}.sock"))
}

/// Opens the device and mounts it on `mountpoint` as fuser would (nodev, nosuid; others
/// may use it; the kernel checks permissions).
fn mount_device(args: &MountArgs, mountpoint: &Path) -> anyhow::Result<OwnedFd> {
    use std::ffi::CString;
    let fuse = rustix::fs::open(
        "/dev/fuse",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .context("/dev/fuse")?;
    let opts = format!(
        "fd={},rootmode=40000,user_id={},group_id={},default_permissions,allow_other",
        fuse.as_raw_fd(),
        rustix::process::getuid().as_raw(),
        rustix::process::getgid().as_raw(),
    );
    let mut flags = libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOATIME;
    if args.read_only {
        flags |= libc::MS_RDONLY;
    }
    let source = CString::new(format!("{}:/{}", args.servers[0], args.volume))?;
    let target = CString::new(mountpoint.as_os_str().as_encoded_bytes())?;
    let opts = CString::new(opts)?;
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            c"fuse".as_ptr(),
            flags,
            opts.as_ptr().cast(),
        )
    };
    anyhow::ensure!(
        r == 0,
        "mounting on {}: {}",
        mountpoint.display(),
        std::io::Error::last_os_error()
    );
    Ok(fuse)
}

/// The kernel's first request on a new mount: INIT.
fn read_init(fuse: &OwnedFd) -> anyhow::Result<Vec<u8>> {
    // The kernel refuses reads into buffers smaller than a page and a bit.
    let mut buf = vec![0u8; 64 << 10];
    let n = loop {
        match rustix::io::read(fuse, &mut buf) {
            Err(rustix::io::Errno::INTR) => continue,
            r => break r.context("reading INIT from /dev/fuse")?,
        }
    };
    anyhow::ensure!(n >= 40, "a short INIT from the kernel ({n} bytes)");
    // fuse_in_header: len u32, opcode u32 (26: INIT)
    let opcode = u32::from_le_bytes(buf[4..8].try_into().unwrap());
    anyhow::ensure!(
        opcode == 26,
        "the kernel's first request is {opcode}, not INIT"
    );
    buf.truncate(n);
    Ok(buf)
}

/// Whether the kernel has let go of the mount (unmounted or aborted).
fn connection_gone(fuse: &OwnedFd) -> bool {
    let mut p = [rustix::event::PollFd::new(
        fuse,
        rustix::event::PollFlags::IN,
    )];
    rustix::event::poll(&mut p, Some(&rustix::event::Timespec::default())).is_ok()
        && p[0].revents().contains(rustix::event::PollFlags::ERR)
}

pub(crate) fn unmount(mountpoint: &Path) {
    if let Ok(t) = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2(2) with a NUL-terminated path.
        if unsafe { libc::umount2(t.as_ptr(), 0) } != 0 {
            // Busy: detach it, as `umount -l` would; the server ends with the connection.
            unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Starts a server for the mount and hands it the device and the state.
fn start_server(
    binary: &Path,
    mountpoint: &Path,
    handover: &Handover,
    fuse: &OwnedFd,
    state: &StateLog,
) -> anyhow::Result<(tokio::process::Child, OwnedFd)> {
    use std::os::unix::process::CommandExt;
    let (ours, theirs) = seqpacket_pair()?;
    let mut cmd = std::process::Command::new(binary);
    cmd.arg(SERVE_ARG).arg(mountpoint);
    cmd.stdin(std::process::Stdio::null());
    let theirs_fd = theirs.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, prctl).
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears close-on-exec on the copy: the server finds it on HOLDER_FD.
            if libc::dup2(theirs_fd, HOLDER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // A holder that dies takes its server with it: the mount then ends, as any
            // mount does when its daemon goes.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = tokio::process::Command::from(cmd)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    drop(theirs);
    // A server that died at once cannot take it; waiting for it tells.
    if let Err(e) = send(
        ours.as_fd(),
        &serde_json::to_vec(handover)?,
        &[fuse.as_fd(), state.fd()],
    ) {
        tracing::warn!("handing the mount to {}: {e}", binary.display());
    }
    Ok((child, ours))
}

/// The holder: mounts, then keeps a server running until the mount goes. `ready` hears
/// "ok" once the first server serves (or why it could not).
pub fn hold(
    args: MountArgs,
    mountpoint: &Path,
    mut ready: Option<OwnedFd>,
    daemonised: bool,
) -> anyhow::Result<()> {
    let setup = (|| {
        let fuse = mount_device(&args, mountpoint)?;
        let init = read_init(&fuse).inspect_err(|_| unmount(mountpoint))?;
        let state = StateLog::create()?;
        Ok::<_, anyhow::Error>((fuse, init, state))
    })();
    let (fuse, init, state) = match setup {
        Ok(x) => x,
        Err(e) => {
            crate::mount::tell(&mut ready, &format!("{e:#}\n"));
            return Err(e);
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handover = Handover {
        args,
        generation: 0,
        init,
        answered: false,
        family: *uuid::Uuid::new_v4().as_bytes(),
    };
    rt.block_on(async {
        let control = control_listener(mountpoint);
        supervise(
            handover, mountpoint, ready, daemonised, fuse, state, control,
        )
        .await
    })
}

/// `mortar-mount --take-over DIR`: becomes the holder of the mount on DIR, which another
/// holder hands over (see [`Control::TakeOver`]); `ready` hears "ok" once this holder's
/// server serves.
pub fn take_over(
    mountpoint: &Path,
    mut ready: Option<OwnedFd>,
    daemonised: bool,
) -> anyhow::Result<()> {
    let r = (|| {
        use std::io::{Read, Write};
        let path = control_path(mountpoint);
        let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
            format!(
                "{}: no holder to take over from ({})",
                mountpoint.display(),
                path.display()
            )
        })?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        s.write_all(serde_json::to_string(&Control::TakeOver)?.as_bytes())?;
        s.write_all(b"\n")?;
        let (mut msg, fds) = recv(s.as_fd())?.context("the holder sent nothing")?;
        while !msg.ends_with(b"\n") {
            let mut more = [0u8; 4096];
            match s.read(&mut more)? {
                0 => anyhow::bail!("the holder's handover was cut short"),
                n => msg.extend_from_slice(&more[..n]),
            }
        }
        if let Some(e) = msg.strip_prefix(b"error: ") {
            anyhow::bail!("{}", String::from_utf8_lossy(e).trim());
        }
        let mut handover: Handover =
            serde_json::from_slice(&msg).context("the holder's handover")?;
        let [fuse, state]: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|_| anyhow::anyhow!("the holder sent the wrong descriptors"))?;
        let _ = rustix::io::fcntl_setfd(&fuse, rustix::io::FdFlags::CLOEXEC);
        let _ = rustix::io::fcntl_setfd(&state, rustix::io::FdFlags::CLOEXEC);
        // The control socket is this holder's before the old one goes.
        let control = control_listener_std(mountpoint);
        s.write_all(b"holding\n")?;
        handover.generation += 1;
        Ok::<_, anyhow::Error>((handover, fuse, StateLog::from_fd(state), control))
    })();
    let (handover, fuse, state, control) = match r {
        Ok(x) => x,
        Err(e) => {
            crate::mount::tell(&mut ready, &format!("{e:#}\n"));
            return Err(e);
        }
    };
    // Where the mount logged so far.
    let _ = mortar_common::telemetry::init_logging(
        &format!("holder={}", mountpoint.display()),
        &handover.args.log_level,
        handover.args.log_file.as_deref(),
        daemonised,
    );
    tracing::info!(
        generation = handover.generation,
        "holding the mount from now on"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let control = control.and_then(into_tokio);
        supervise(
            handover, mountpoint, ready, daemonised, fuse, state, control,
        )
        .await
    })
}

/// Hands the mount to the holder on `conn` (see [`Control::TakeOver`]); whether it holds
/// it now.
async fn give(
    conn: tokio::net::UnixStream,
    handover: &Handover,
    fuse: &OwnedFd,
    state: &StateLog,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let conn = conn.into_std()?;
    conn.set_nonblocking(false)?;
    let mut msg = serde_json::to_vec(handover)?;
    msg.push(b'\n');
    send(conn.as_fd(), &msg, &[fuse.as_fd(), state.fd()])?;
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    let answer = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(conn)
            .read_line(&mut line)
            .map(|_| line)
    })
    .await??;
    anyhow::ensure!(
        answer.trim() == "holding",
        "the new holder did not take the mount"
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    mut handover: Handover,
    mountpoint: &Path,
    mut ready: Option<OwnedFd>,
    daemonised: bool,
    fuse: OwnedFd,
    state: StateLog,
    control: Option<(tokio::net::UnixListener, PathBuf)>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut binary = std::env::current_exe().context("this binary's path")?;
    // The last binary that served: a replacement that cannot serve gives way to it.
    let mut trusted = binary.clone();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // Who waits for a replacement to serve; who asked to take the mount over.
    let mut waiting: Option<tokio::net::UnixStream> = None;
    let mut taker: Option<tokio::net::UnixStream> = None;
    let mut pause = Duration::ZERO;
    loop {
        let (mut child, sock) = match start_server(&binary, mountpoint, &handover, &fuse, &state) {
            Ok(x) => x,
            Err(e) if handover.answered => {
                // Requests wait in the kernel meanwhile; the mount stays.
                tracing::error!("{e:#}");
                if binary != trusted {
                    binary = trusted.clone();
                    refuse(&mut waiting, &format!("{e:#}")).await;
                }
                pause = (pause * 2).clamp(Duration::from_millis(20), Duration::from_secs(1));
                tokio::time::sleep(pause).await;
                continue;
            }
            Err(e) => {
                crate::mount::tell(&mut ready, &format!("{e:#}\n"));
                unmount(mountpoint);
                return Err(e);
            }
        };
        let pid = child.id().unwrap_or(0);
        let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            while let Ok(Some((msg, _))) = recv(sock.as_fd()) {
                if let Ok(r) = serde_json::from_slice::<Report>(&msg) {
                    let _ = tx.send(r);
                }
            }
        });
        let mut stopping = false;
        let mut served = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status?,
                Some(r) = reports.recv() => match r {
                    Report::Ready => {
                        tracing::info!(pid, generation = handover.generation, binary = %binary.display(), "server serving");
                        if ready.is_some() {
                            crate::mount::tell(&mut ready, "ok\n");
                            if daemonised {
                                crate::mount::redirect_stdio();
                            }
                        }
                        handover.answered = true;
                        served = true;
                        trusted = binary.clone();
                        if let Some(mut w) = waiting.take() {
                            use tokio::io::AsyncWriteExt;
                            let _ = w.write_all(format!("ok: pid {pid} serves\n").as_bytes()).await;
                        }
                    }
                    Report::Failed(why) => {
                        tracing::error!(pid, "server failed: {why}");
                        if !handover.answered {
                            crate::mount::tell(&mut ready, &format!("{why}\n"));
                            let _ = child.kill().await;
                            unmount(mountpoint);
                            anyhow::bail!("{why}");
                        }
                    }
                },
                Some(conn) = accept(control.as_ref()) => {
                    match control_request(conn).await {
                        Some((Control::Replace(path), conn)) => {
                            tracing::info!(binary = %path.display(), "replacing the server");
                            binary = path;
                            waiting = Some(conn);
                            let _ = child.start_kill();
                        }
                        Some((Control::TakeOver, conn)) if taker.is_none() => {
                            tracing::info!("another holder takes the mount over: stopping the server");
                            taker = Some(conn);
                            let _ = child.start_kill();
                        }
                        Some((Control::TakeOver, conn)) => {
                            refuse(&mut Some(conn), "another holder is taking the mount over").await;
                        }
                        None => {}
                    }
                }
                _ = term.recv(), if !stopping => { stopping = true; tracing::info!("signal: unmounting"); unmount(mountpoint); }
                _ = int.recv(), if !stopping => { stopping = true; tracing::info!("signal: unmounting"); unmount(mountpoint); }
            }
        };
        if let Some(conn) = taker.take()
            && !stopping
            && !connection_gone(&fuse)
        {
            match give(conn, &handover, &fuse, &state).await {
                Ok(()) => {
                    tracing::info!("the mount is held by another holder now");
                    return Ok(());
                }
                // The mount stays ours: a server starts again below.
                Err(e) => tracing::error!("handing the mount over: {e:#}"),
            }
        }
        if stopping || status.success() || connection_gone(&fuse) {
            tracing::info!(pid, %status, "mount ended");
            if let Some(p) = &control {
                let _ = std::fs::remove_file(&p.1);
            }
            return Ok(());
        }
        if !handover.answered {
            let why = format!("the mount's server died before serving ({status})");
            crate::mount::tell(&mut ready, &format!("{why}\n"));
            unmount(mountpoint);
            anyhow::bail!("{why}");
        }
        if !served && binary != trusted && handover.answered {
            tracing::error!(binary = %binary.display(), %status, "the replacement died before serving: back to {}", trusted.display());
            refuse(
                &mut waiting,
                &format!("{} died before serving ({status})", binary.display()),
            )
            .await;
            binary = trusted.clone();
        }
        // A server that served is replaced at once; one that keeps failing to start, with a
        // growing pause (at most a second: requests wait in the kernel meanwhile).
        pause = if served {
            Duration::ZERO
        } else {
            (pause * 2).clamp(Duration::from_millis(20), Duration::from_secs(1))
        };
        tracing::warn!(pid, %status, next_in = ?pause, "server ended; starting the next one");
        tokio::time::sleep(pause).await;
        handover.generation += 1;
    }
}

async fn refuse(waiting: &mut Option<tokio::net::UnixStream>, why: &str) {
    use tokio::io::AsyncWriteExt;
    if let Some(mut w) = waiting.take() {
        let _ = w.write_all(format!("error: {why}\n").as_bytes()).await;
    }
}

fn control_listener(mountpoint: &Path) -> Option<(tokio::net::UnixListener, PathBuf)> {
    control_listener_std(mountpoint).and_then(into_tokio)
}

fn into_tokio(
    (l, path): (std::os::unix::net::UnixListener, PathBuf),
) -> Option<(tokio::net::UnixListener, PathBuf)> {
    l.set_nonblocking(true).ok()?;
    Some((tokio::net::UnixListener::from_std(l).ok()?, path))
}

fn control_listener_std(mountpoint: &Path) -> Option<(std::os::unix::net::UnixListener, PathBuf)> {
    let path = control_path(mountpoint);
    let _ = std::fs::create_dir_all(path.parent()?);
    let _ = std::fs::remove_file(&path);
    match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => {
            // Only root may replace what serves a mount.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600));
            Some((l, path))
        }
        Err(e) => {
            tracing::warn!(
                "control socket {}: {e}: no planned upgrades of this mount",
                path.display()
            );
            None
        }
    }
}

async fn accept(l: Option<&(tokio::net::UnixListener, PathBuf)>) -> Option<tokio::net::UnixStream> {
    match l {
        Some((l, _)) => l.accept().await.ok().map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Reads one request; answers a bad one at once.
async fn control_request(
    mut conn: tokio::net::UnixStream,
) -> Option<(Control, tokio::net::UnixStream)> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut line = String::new();
    let read = tokio::time::timeout(
        Duration::from_secs(5),
        BufReader::new(&mut conn).read_line(&mut line),
    )
    .await;
    let why = match read {
        Ok(Ok(_)) => match serde_json::from_str::<Control>(&line) {
            Ok(Control::Replace(p)) => match executable(&p).await {
                Ok(()) => return Some((Control::Replace(p), conn)),
                Err(e) => e,
            },
            Ok(Control::TakeOver) => return Some((Control::TakeOver, conn)),
            Err(e) => format!("not a request: {e}"),
        },
        _ => "no request".into(),
    };
    let _ = conn.write_all(format!("error: {why}\n").as_bytes()).await;
    None
}

/// Whether `p` is a `mortar-mount` (it says so when asked its version): anything else
/// would leave the mount without a server.
async fn executable(p: &Path) -> Result<(), String> {
    let out = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::process::Command::new(p)
            .arg("--version")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(o)) if o.status.success() && o.stdout.starts_with(b"mortar-mount ") => Ok(()),
        Ok(Ok(_)) => Err(format!("{} is not a mortar-mount", p.display())),
        Ok(Err(e)) => Err(format!("{}: {e}", p.display())),
        Err(_) => Err(format!("{} --version did not answer", p.display())),
    }
}

/// `mortar-mount --replace-server MOUNTPOINT [BINARY]`: asks the mount's holder to serve it
/// with BINARY (default: this one) from now on, and waits until the new server serves.
pub fn replace_server(mountpoint: &Path, binary: Option<PathBuf>) -> anyhow::Result<String> {
    use std::io::{BufRead, Write};
    let mountpoint = mountpoint
        .canonicalize()
        .with_context(|| mountpoint.display().to_string())?;
    let binary = match binary {
        Some(b) => b.canonicalize().with_context(|| b.display().to_string())?,
        None => std::env::current_exe()?,
    };
    let path = control_path(&mountpoint);
    let mut s = std::os::unix::net::UnixStream::connect(&path).with_context(|| {
        format!(
            "{}: no holder for this mount ({})",
            mountpoint.display(),
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(serde_json::to_string(&Control::Replace(binary))?.as_bytes())?;
    s.write_all(b"\n")?;
    let mut answer = String::new();
    std::io::BufReader::new(s).read_line(&mut answer)?;
    let answer = answer.trim().to_string();
    match answer.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("{e}"),
        None if answer.is_empty() => anyhow::bail!("the holder did not answer"),
        None => Ok(answer),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(b: u8) -> Gfid {
        Gfid::from_bytes(&[b; 16]).unwrap()
    }

    #[test]
    fn the_state_log_replays_to_what_is_held_and_rewrites_to_the_same() {
        let log = StateLog::create().unwrap();
        log.ino(5, g(5));
        log.ino(6, g(6));
        log.lock(g(5), 77);
        log.forget(6);
        log.lock(g(6), 78);
        log.unlock(g(6), 78);
        let s = log.load().unwrap();
        assert_eq!(s.inos, HashMap::from([(5, g(5))]));
        assert_eq!(s.lock_owners, HashSet::from([(g(5), 77)]));
        assert_eq!(log.appended(), 6);
        log.rewrite(&s).unwrap();
        assert_eq!(log.appended(), 0);
        assert_eq!(log.load().unwrap(), s);
        // Appends after a rewrite go after the rewritten records.
        log.ino(7, g(7));
        assert_eq!(log.load().unwrap().inos.len(), 2);
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let log = StateLog::create().unwrap();
        log.ino(5, g(5));
        rustix::io::write(&log.fd, &[INO, 1, 2]).unwrap();
        assert_eq!(log.load().unwrap().inos, HashMap::from([(5, g(5))]));
    }

    #[test]
    fn descriptors_and_messages_cross_a_socket_pair() {
        let (a, b) = seqpacket_pair().unwrap();
        let log = StateLog::create().unwrap();
        log.ino(9, g(9));
        send(a.as_fd(), b"hello", &[log.fd()]).unwrap();
        let (msg, fds) = recv(b.as_fd()).unwrap().unwrap();
        assert_eq!(msg, b"hello");
        assert_eq!(fds.len(), 1);
        let got = StateLog::from_fd(fds.into_iter().next().unwrap());
        assert_eq!(got.load().unwrap().inos, HashMap::from([(9, g(9))]));
        drop(a);
        assert!(recv(b.as_fd()).unwrap().is_none());
    }
}
