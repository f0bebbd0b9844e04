//! The mount as the kernel drives it: FUSE requests, as bytes, through fuser's own session
//! loop (its request decoding, through its public `Session::from_fd`) into the mount's
//! filesystem (`mortar_client::fuse::MortarFs`), which serves them from a real brick.
//!
//! The kernel's end of `/dev/fuse` is played by a `SOCK_SEQPACKET` socket pair: one write
//! is one request and one read one reply, as on the device. The harness makes the INIT
//! handshake, then sends one request at a time and waits for its answer, so that later
//! requests can name what earlier ones made: inode numbers from entry replies, file handles
//! from open replies. Headers are always well formed (a malformed header ends a session by
//! design, as the kernel never sends one); opcodes, ids and bodies come from the input.
//!
//! What is checked, per input: no panic, in fuser or in the mount; every reply is well
//! formed (its length, an errno between 0 and -4095, the unique of a request that waits
//! for an answer, only once); every request that waits for an answer gets one within
//! `REPLY_WAIT`; and the session ends when its device is closed.
//!
//! One brick serves every input (in the tmpfs of `brick::init`), over TCP on 127.0.0.1;
//! each input's session has a client volume of its own connected to it, as a mount has.
//! What one input creates stays for the next; the brick's small tmpfs bounds it.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Result as AResult, Unstructured};
use mortar_brick::service::{BrickService, VolfileState};
use mortar_brick::store::Store;
use mortar_client::fuse::{MortarFs, Timeouts};
use mortar_common::volfile::Volfile;
use mortar_replication::volume::{Options, Volume};
use tokio::sync::watch;

/// The longest one request may take to be answered (a brick round trip or a few).
const REPLY_WAIT: Duration = Duration::from_secs(20);
/// The most requests one input sends.
const MAX_OPS: usize = 48;

const IN_HEADER: usize = 40;
const OUT_HEADER: usize = 16;

// FUSE opcodes (include/uapi/linux/fuse.h).
const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const MKNOD: u32 = 8;
const MKDIR: u32 = 9;
const SYMLINK: u32 = 6;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const READ: u32 = 15;
const WRITE: u32 = 16;
const RELEASE: u32 = 18;
const FSYNC: u32 = 20;
const FLUSH: u32 = 25;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const FSYNCDIR: u32 = 30;
const GETLK: u32 = 31;
const SETLK: u32 = 32;
const SETLKW: u32 = 33;
const CREATE: u32 = 35;
const INTERRUPT: u32 = 36;
const NOTIFY_REPLY: u32 = 41;
const BATCH_FORGET: u32 = 42;
const FALLOCATE: u32 = 43;
const READDIRPLUS: u32 = 44;
const RENAME2: u32 = 45;
const LSEEK: u32 = 46;
const SETXATTR: u32 = 21;
const IOCTL: u32 = 39;

/// Every opcode the kernel sends after INIT (FUSE 7.x up to STATX).
const OPCODES: &[u32] = &[
    1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 20, 21, 22, 23, 24, 25, 26, 27, 28,
    29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52,
];

/// Requests the kernel sends without waiting for an answer.
fn answered(opcode: u32) -> bool {
    !matches!(opcode, FORGET | BATCH_FORGET | INTERRUPT | NOTIFY_REPLY)
}

struct World {
    rt: tokio::runtime::Runtime,
    addr: String,
    _volfile: watch::Sender<VolfileState>,
}

static WORLD: OnceLock<World> = OnceLock::new();

/// Once per process: `brick::init`'s tmpfs, a brick served on 127.0.0.1, a volume of it.
pub fn init() {
    crate::brick::init();
    if crate::brick::trace() {
        let _ = mortar_common::telemetry::init_logging(
            "fuzz",
            &std::env::var("MORTAR_FUZZ_LOG").unwrap_or("info".into()),
            None,
            false,
        );
    }
    let dir = crate::brick::area().join("fuse-brick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let text = format!("volume: data\ngeneration: 1\nbricks:\n  - id: b0\n    address: {addr}\n");
    let (tx, rx) = watch::channel(VolfileState {
        yaml: text.clone(),
        vol: Volfile::parse(&text).unwrap(),
    });
    let store = Arc::new(Store::open(&dir).expect("opening the brick"));
    let svc = Arc::new(BrickService::new(
        "b0".into(),
        store,
        rx,
        Duration::from_secs(86_400),
        false,
    ));
    rt.block_on(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(
            tokio::net::TcpListener::from_std(listener).unwrap(),
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(mortar_proto::brick_server::BrickServer::from_arc(svc))
                .serve_with_incoming(incoming),
        );
    });
    let _ = WORLD.set(World {
        rt,
        addr: addr.to_string(),
        _volfile: tx,
    });
}

/// A volume of the brick for one input's session: a session's end (DESTROY, or the device
/// closing) shuts its volume down, as an unmount does.
fn volume(w: &World) -> Arc<Volume> {
    let opts = Options {
        ping_timeout: Some(Duration::from_secs(10)),
        ..Options::default()
    };
    w.rt.block_on(Volume::connect(std::slice::from_ref(&w.addr), "data", opts))
        .expect("connecting to the brick")
}

fn header(len: usize, opcode: u32, unique: u64, nodeid: u64, uid: u32, gid: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(len);
    h.extend_from_slice(&(len as u32).to_le_bytes());
    h.extend_from_slice(&opcode.to_le_bytes());
    h.extend_from_slice(&unique.to_le_bytes());
    h.extend_from_slice(&nodeid.to_le_bytes());
    h.extend_from_slice(&uid.to_le_bytes());
    h.extend_from_slice(&gid.to_le_bytes());
    h.extend_from_slice(&1u32.to_le_bytes()); // pid
    h.extend_from_slice(&[0u8; 4]); // total_extlen, padding
    h
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// One reply: checked, and returned as (unique, error, body).
fn read_reply(dev: &mut UnixStream, buf: &mut [u8]) -> Option<(u64, i32, Vec<u8>)> {
    let n = loop {
        match dev.read(buf) {
            Ok(0) => return None,
            Ok(n) => break n,
            // libFuzzer's timeout alarm (SIGALRM, installed without SA_RESTART) can land
            // in this read; `read` does not retry as `write_all` does.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // No answer in time, or the session's end closed the device with requests of
            // ours still unread.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return None;
            }
            Err(e) => panic!("reading a reply: {e}"),
        }
    };
    assert!(n >= OUT_HEADER, "a reply of {n} bytes");
    let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
    assert_eq!(
        len, n,
        "a reply's length field says {len}, the reply has {n}"
    );
    let error = i32::from_le_bytes(buf[4..8].try_into().unwrap());
    assert!((-4095..=0).contains(&error), "a reply with error {error}");
    let unique = u64_at(buf, 8).unwrap();
    Some((unique, error, buf[OUT_HEADER..n].to_vec()))
}

/// A short name from a small alphabet (so that names meet again), NUL-terminated.
fn name(u: &mut Unstructured) -> AResult<Vec<u8>> {
    let len = u.int_in_range(1..=3)?;
    let mut n: Vec<u8> = (0..len)
        .map(|_| u.choose(b"abc.").copied())
        .collect::<AResult<_>>()?;
    n.push(0);
    Ok(n)
}

/// The body of a request: what the input says, with the known parts (a file handle, an
/// inode, names) filled in more often than chance would.
fn body(u: &mut Unstructured, opcode: u32, fhs: &[u64], inos: &[u64]) -> AResult<Vec<u8>> {
    // Any bytes, except where a request says how much data it carries (WRITE, SETXATTR,
    // IOCTL): the kernel always sends that much, and fuser's decoder panics on a mismatch
    // before the mount sees the request. Their arms below keep the two equal.
    if !matches!(opcode, WRITE | SETXATTR | IOCTL) && u.ratio(1, 4)? {
        let len = u.int_in_range(0..=256)?;
        return u.bytes(len).map(<[u8]>::to_vec);
    }
    let mut b = Vec::new();
    let fixed = |u: &mut Unstructured, b: &mut Vec<u8>, n: usize| -> AResult<()> {
        b.extend_from_slice(u.bytes(n)?);
        Ok(())
    };
    match opcode {
        LOOKUP | UNLINK | RMDIR => b.extend(name(u)?),
        MKDIR => {
            fixed(u, &mut b, 8)?;
            b.extend(name(u)?);
        }
        MKNOD | CREATE => {
            fixed(u, &mut b, 16)?;
            b.extend(name(u)?);
        }
        SYMLINK => {
            b.extend(name(u)?);
            b.extend(name(u)?);
        }
        SETXATTR => {
            // fuse_setxattr_in without FUSE_SETXATTR_EXT (not negotiated): size, flags;
            // then the name and `size` bytes of value.
            let value = u.int_in_range(0..=512u32)?;
            b.extend_from_slice(&value.to_le_bytes());
            fixed(u, &mut b, 4)?;
            b.extend_from_slice(b"user.");
            b.extend(name(u)?);
            b.extend(std::iter::repeat_n(b'v', value as usize));
        }
        IOCTL => {
            // fuse_ioctl_in: fh, flags, cmd, arg, in_size, out_size; then in_size bytes.
            let data = u.int_in_range(0..=256u32)?;
            fixed(u, &mut b, 24)?;
            b.extend_from_slice(&data.to_le_bytes());
            fixed(u, &mut b, 4)?;
            b.extend(std::iter::repeat_n(0u8, data as usize));
        }
        RENAME | RENAME2 | LINK => {
            // newdir (or the old inode, for LINK); RENAME2 adds flags and padding.
            b.extend_from_slice(&u.choose(inos)?.to_le_bytes());
            if opcode == RENAME2 {
                fixed(u, &mut b, 8)?;
            }
            b.extend(name(u)?);
            if opcode != LINK {
                b.extend(name(u)?);
            }
        }
        READ | WRITE | RELEASE | FSYNC | FLUSH | READDIR | RELEASEDIR | FSYNCDIR | GETLK
        | SETLK | FALLOCATE | READDIRPLUS | LSEEK => {
            let fh = if fhs.is_empty() || u.ratio(1, 8)? {
                u.arbitrary()?
            } else {
                *u.choose(fhs)?
            };
            b.extend_from_slice(&fh.to_le_bytes());
            if opcode == WRITE {
                // offset (small), size, write_flags, lock_owner, flags, padding; then data.
                let data = u.int_in_range(0..=8192u32)?;
                b.extend_from_slice(&u.int_in_range(0..=65536u64)?.to_le_bytes());
                b.extend_from_slice(&data.to_le_bytes());
                // write_flags 4, lock_owner 8, flags 4, padding 4 (fuse_write_in is 40 bytes).
                fixed(u, &mut b, 20)?;
                b.extend(std::iter::repeat_n(b'x', data as usize));
            } else {
                let len = u.int_in_range(0..=64)?;
                fixed(u, &mut b, len)?;
            }
        }
        _ => {
            let len = u.int_in_range(0..=128)?;
            fixed(u, &mut b, len)?;
        }
    }
    Ok(b)
}

/// Runs one input: a session of its own on the shared volume.
pub fn run(data: &[u8]) {
    let w = WORLD.get().expect("init() first");
    let started = std::time::Instant::now();
    let mut u = Unstructured::new(data);
    let (mut dev, theirs) = {
        let mut fds = [0; 2];
        // SAFETY: socketpair(2) writes two descriptors into the array we own.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned by nothing else.
        unsafe {
            (
                UnixStream::from_raw_fd(fds[0]),
                OwnedFd::from_raw_fd(fds[1]),
            )
        }
    };
    dev.set_read_timeout(Some(REPLY_WAIT)).unwrap();
    // INIT: FUSE 7.38, no flags; the rest of fuse_init_in zero.
    let mut init = header(IN_HEADER + 64, INIT, 1, 0, 0, 0);
    init.extend_from_slice(&7u32.to_le_bytes());
    init.extend_from_slice(&38u32.to_le_bytes());
    init.extend_from_slice(&(128u32 << 10).to_le_bytes());
    init.extend_from_slice(&[0u8; 52]);
    dev.write_all(&init).unwrap();
    let fs = MortarFs::new(
        volume(w),
        w.rt.handle().clone(),
        Timeouts {
            attr: Duration::from_secs(1),
            entry: Duration::from_secs(1),
        },
    );
    let session =
        fuser::Session::from_fd(fs, theirs, fuser::SessionACL::All, fuser::Config::default())
            .expect("the INIT handshake");
    let mut buf = vec![0u8; 1 << 21];
    let (unique, error, _) = read_reply(&mut dev, &mut buf).expect("an answer to INIT");
    assert_eq!((unique, error), (1, 0), "INIT refused");
    let serving = std::thread::spawn(move || session.run());
    if crate::brick::trace() {
        eprintln!("session up in {:?}", started.elapsed());
    }

    let mut inos: Vec<u64> = vec![1];
    let mut fhs: Vec<u64> = Vec::new();
    let mut ended = false;
    // Requests that may still be answered (a FORGET may be, or not): no reply may name
    // anything else, or one of them twice.
    let mut open: std::collections::HashSet<u64> = std::collections::HashSet::new();
    for unique in 2..2 + MAX_OPS as u64 {
        if u.is_empty() {
            break;
        }
        let Ok(program) = (|| -> AResult<(u32, u64, u32, u32, Vec<u8>)> {
            let opcode = if u.ratio(1, 32)? {
                u.arbitrary()?
            } else {
                match *u.choose(OPCODES)? {
                    // A wait for a lock held by another owner is answered only when it is
                    // free: not a hang, but nothing this harness can tell from one.
                    SETLKW => SETLK,
                    op => op,
                }
            };
            let nodeid = if u.ratio(1, 16)? {
                u.arbitrary()?
            } else {
                *u.choose(&inos)?
            };
            let uid = *u.choose(&[0u32, 0, 1000, 65534])?;
            let body = body(&mut u, opcode, &fhs, &inos)?;
            Ok((opcode, nodeid, uid, uid, body))
        })() else {
            break;
        };
        let (opcode, nodeid, uid, gid, body) = program;
        let mut msg = header(IN_HEADER + body.len(), opcode, unique, nodeid, uid, gid);
        msg.extend_from_slice(&body);
        if let Err(e) = dev.write_all(&msg) {
            // The session ended (DESTROY, or a request it could not take).
            assert!(
                matches!(
                    e.kind(),
                    std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
                ),
                "sending a request: {e}"
            );
            ended = true;
            break;
        }
        open.insert(unique);
        if !answered(opcode) {
            continue;
        }
        let (error, reply) = loop {
            let Some((got, error, reply)) = read_reply(&mut dev, &mut buf) else {
                // No answer: the session must have ended, not be stuck on this request.
                assert!(
                    serving.is_finished() || wait_finished(&serving),
                    "no answer to opcode {opcode} within {REPLY_WAIT:?}"
                );
                ended = true;
                break (0, None);
            };
            assert!(
                open.remove(&got),
                "an answer to request {got}, which waits for none"
            );
            if got == unique {
                break (error, Some(reply));
            }
        };
        let Some(reply) = reply else { break };
        if crate::brick::trace() {
            eprintln!(
                "opcode {opcode} node {nodeid} ({} bytes): errno {}",
                body.len(),
                -error
            );
        }
        if error != 0 {
            continue;
        }
        match opcode {
            LOOKUP | MKNOD | MKDIR | SYMLINK | LINK | CREATE => {
                if let Some(ino) = u64_at(&reply, 0).filter(|i| *i != 0) {
                    inos.push(ino);
                }
                // CREATE's open reply follows the entry (fuse_entry_out is 128 bytes).
                if let Some(fh) = u64_at(&reply, 128).filter(|_| opcode == CREATE) {
                    fhs.push(fh);
                }
            }
            OPEN | OPENDIR => fhs.extend(u64_at(&reply, 0)),
            _ => {}
        }
    }
    // The kernel's end closes (an unmount): the session must end, and every request it
    // was still serving is answered or dropped.
    let _ = dev.shutdown(std::net::Shutdown::Write);
    if !ended {
        assert!(
            wait_finished(&serving),
            "the session did not end when its device closed"
        );
    }
    let _ = serving.join();
    drop(dev);
    if crate::brick::trace() {
        eprintln!("input done in {:?}", started.elapsed());
    }
}

/// Whether the session's thread ends within `REPLY_WAIT`.
fn wait_finished<T>(t: &std::thread::JoinHandle<T>) -> bool {
    let deadline = std::time::Instant::now() + REPLY_WAIT;
    while !t.is_finished() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    true
}
