//! A brick served in-process, and a client made of fuzz input: every RPC of the brick's gRPC
//! service called directly (no network), on a fresh brick directory per input.
//!
//! The input is a program: a byte picks a request, then its fields come from the input, with
//! most identifiers taken from what the brick handed out so far (gfids of created and listed
//! inodes, the live sessions), so that requests reach the store instead of stopping at a
//! "no such inode". "Assisted" mutations and heal steps lock their inodes first and carry the
//! versions the lock reported, so they are applied rather than refused as stale; raw ones
//! take whatever the input says. Any request may also be raw protobuf bytes.
//!
//! What is checked, per input: no panic (libFuzzer's hook aborts on any, also in the brick's
//! blocking tasks); no request errs with a gRPC status other than those the service means to
//! give; no request hangs (a paused tokio clock: waits cost no real time, and only lock
//! requests that wait may take long); nothing appears next to the brick directory; and the
//! brick directory opens again as a brick afterwards (a restart after any requests works).

use std::collections::HashSet;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::{Result as AResult, Unstructured};
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use http_body::Frame;
use mortar_brick::service::{BrickService, InProcess, VolfileState};
use mortar_brick::store::Store;
use mortar_common::gfid::Gfid;
use mortar_common::volfile::Volfile;
use mortar_proto as pb;
use pb::brick_server::Brick;
use prost::Message;
use tokio::sync::{mpsc, watch};
use tonic::{Code, Request, Status};

/// The largest number of requests one input makes.
const MAX_OPS: usize = 64;
/// At most this many gfids are remembered for later requests.
const POOL: usize = 64;
/// How long (on the paused clock) a request may take before it counts as hung. Lock waits
/// end after 30 s; a POSIX lock request that waits may wait for ever (as F_SETLKW does).
const HANG: Duration = Duration::from_secs(120);

const VOLFILE: &str =
    "volume: data\ngeneration: 2\nbricks:\n  - id: b0\n    address: 127.0.0.1:24100\n";

/// Where bricks are made: a tmpfs of this process's own mount namespace (see [`init`]).
static AREA: OnceLock<PathBuf> = OnceLock::new();

/// Once per process, before libFuzzer starts threads: a private mount namespace with a small
/// tmpfs mounted `nodev,nosuid,noexec` for the bricks. Fuzzed requests create device nodes
/// with any number and files of any size; on `nodev` no device node can ever be opened (a
/// bug that opened one would reach the host's disks otherwise), the size bounds the disk a
/// fuzzed request can take, and nothing of it outlives the process.
pub fn init() {
    let area = std::env::temp_dir().join("mortar-fuzz-bricks");
    std::fs::create_dir_all(&area).expect("creating the bricks' mount point");
    // SAFETY: plain system calls on C strings that live across them; the process is still
    // single-threaded (libFuzzer calls its initialiser first), as unshare(CLONE_NEWNS) needs.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            panic!(
                "unshare(CLONE_NEWNS): {} (the brick target needs root: bricks use trusted xattrs)",
                std::io::Error::last_os_error()
            );
        }
        let none = c"none";
        if libc::mount(
            none.as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            panic!("making mounts private: {}", std::io::Error::last_os_error());
        }
        let target = std::ffi::CString::new(area.as_os_str().as_encoded_bytes()).unwrap();
        if libc::mount(
            c"mortar-fuzz".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
            c"size=64m,nr_inodes=20000,mode=0700".as_ptr().cast(),
        ) != 0
        {
            panic!(
                "mounting a tmpfs on {}: {}",
                area.display(),
                std::io::Error::last_os_error()
            );
        }
    }
    // As mortar-brick does: modes come from clients exactly.
    // SAFETY: umask has no preconditions.
    unsafe { libc::umask(0) };
    AREA.set(area).expect("init runs once");
}

/// The tmpfs `init` mounted, where bricks are made.
pub fn area() -> &'static Path {
    AREA.get().expect("init() first")
}

/// Runs one input against a fresh brick and checks what the brick left behind.
pub fn run(data: &[u8]) {
    let area = AREA.get().expect("init() first");
    let dir = area.join("brick");
    let mut u = Unstructured::new(data);
    let authenticated = u.arbitrary::<bool>().unwrap_or(false);
    let store = Arc::new(Store::open(&dir).expect("opening a new brick"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = Harness::new(store, authenticated);
        // Running out of input ends the program; that is no finding.
        let _ = h.program(&mut u).await;
        h.end().await;
    });
    drop(rt);
    check_confined(area);
    // The brick must start again on what the requests left (a crash at any point is a
    // restart too): its records, heal and dirty lists, orphans and quotas all reloaded.
    if let Err(e) = Store::open(&dir) {
        panic!("the brick does not open again after these requests: {e:#}");
    }
    check_confined(area);
    std::fs::remove_dir_all(&dir).expect("wiping the brick");
}

/// MORTAR_FUZZ_TRACE=1: print every request's answer (to see what a corpus input does).
pub(crate) fn trace() -> bool {
    static TRACE: OnceLock<bool> = OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("MORTAR_FUZZ_TRACE").is_some())
}

/// The brick's parent holds the brick and nothing else.
fn check_confined(area: &Path) {
    let names: Vec<_> = std::fs::read_dir(area)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        names,
        ["brick"],
        "something was made outside the brick directory"
    );
}

/// A client session as a test would hold it: the request side of the stream (a body fed
/// frame by frame) and what the brick sends back.
struct Session {
    id: [u8; 16],
    tx: Option<mpsc::Sender<Result<Frame<Bytes>, Infallible>>>,
    out: Option<futures::stream::BoxStream<'static, Result<pb::SessionOut, Status>>>,
}

struct Harness {
    svc: Arc<BrickService>,
    _volfile: watch::Sender<VolfileState>,
    authenticated: bool,
    sessions: Vec<Session>,
    ended: Vec<[u8; 16]>,
    gfids: Vec<Gfid>,
    term: u64,
}

/// A reply stream, for [`Harness::call`]'s trace.
struct Opaque<T>(T);

impl<T> std::fmt::Debug for Opaque<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(stream)")
    }
}

/// A gRPC message frame: uncompressed, length, message.
fn frame(msg: &impl Message) -> Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

fn ver(v: &pb::Version) -> pb::Version {
    pb::Version {
        term: v.term,
        seq: v.seq,
        id: v.id,
    }
}

/// Statuses the service gives on purpose: a malformed session id, a missing hello, a reused
/// session id, a request that needs an admin certificate, an oversized index list.
fn expected(s: &Status) {
    assert!(
        matches!(
            s.code(),
            Code::InvalidArgument | Code::PermissionDenied | Code::AlreadyExists
        ),
        "unexpected status: {s:?}"
    );
}

impl Harness {
    fn new(store: Arc<Store>, authenticated: bool) -> Harness {
        let vol = Volfile::parse(VOLFILE).unwrap();
        let (tx, rx) = watch::channel(VolfileState {
            yaml: VOLFILE.into(),
            vol,
        });
        let svc = BrickService::new(
            "b0".into(),
            store,
            rx,
            Duration::from_secs(86_400),
            authenticated,
        );
        Harness {
            svc: Arc::new(svc),
            _volfile: tx,
            authenticated,
            sessions: Vec::new(),
            ended: Vec::new(),
            gfids: vec![Gfid::ROOT],
            term: mortar_brick::service::now_ns() as u64,
        }
    }

    /// A request as some peer makes it: with TLS on, either the brick itself (its heal
    /// worker, in-process) or a peer without a brick or admin certificate.
    fn req<T>(&self, u: &mut Unstructured, msg: T) -> AResult<Request<T>> {
        let mut r = Request::new(msg);
        if self.authenticated && u.arbitrary::<bool>()? {
            r.extensions_mut().insert(InProcess);
        }
        Ok(r)
    }

    /// Runs a request on the paused clock; only waiting lock requests may take long.
    async fn call<T: std::fmt::Debug>(
        &self,
        may_wait: bool,
        what: &str,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    ) -> Option<T> {
        let r = tokio::time::timeout(HANG, f).await;
        if trace() {
            eprintln!("{what}: {r:?}");
        }
        match r {
            Ok(Ok(r)) => Some(r.into_inner()),
            Ok(Err(s)) => {
                expected(&s);
                None
            }
            Err(_) if may_wait => None,
            Err(_) => panic!("{what}: no answer within {HANG:?}"),
        }
    }

    fn learn(&mut self, a: Option<&pb::Attr>) {
        if let Some(g) = a.and_then(|a| Gfid::from_bytes(&a.gfid)) {
            self.learn_gfid(g);
        }
    }

    fn learn_gfid(&mut self, g: Gfid) {
        if self.gfids.len() < POOL && !self.gfids.contains(&g) {
            self.gfids.push(g);
        }
    }

    fn next_term(&mut self) -> u64 {
        self.term += 1_000;
        self.term
    }

    fn known(&self, u: &mut Unstructured) -> AResult<Gfid> {
        Ok(self.gfids[u.choose_index(self.gfids.len())?])
    }

    /// A gfid field: mostly one the brick knows, sometimes anything at all.
    fn gfid(&self, u: &mut Unstructured) -> AResult<Vec<u8>> {
        Ok(match u.int_in_range(0u8..=15)? {
            0..=10 => self.known(u)?.to_vec(),
            11 => u.arbitrary::<[u8; 16]>()?.to_vec(),
            12 => Vec::new(),
            13 => u.arbitrary::<Vec<u8>>()?,
            14 => [0u8; 16].to_vec(),
            _ => {
                // Inode numbers 0 and 1 with other bytes: not the root, yet looking like it.
                let mut g = [0u8; 16];
                g[7] = u.int_in_range(0..=1)?;
                g[15] = u.arbitrary()?;
                g.to_vec()
            }
        })
    }

    fn new_gfid(&self, u: &mut Unstructured) -> AResult<Vec<u8>> {
        if u.ratio(1, 8)? {
            return self.gfid(u);
        }
        Ok(u.arbitrary::<[u8; 16]>()?.to_vec())
    }

    /// A name: a few short ones (so that requests meet each other's entries), the hostile
    /// ones, or any bytes.
    fn name(u: &mut Unstructured) -> AResult<Vec<u8>> {
        const NAMES: &[&[u8]] = &[
            b"a", b"b", b"c", b"d", b"sub", b".mortar", b".", b"..", b"", b"x/y", b"/", b"n\0ul",
            b"gfid", b"heal", b"dirty",
        ];
        Ok(match u.int_in_range(0u8..=9)? {
            0..=6 => NAMES[u.choose_index(NAMES.len())?].to_vec(),
            7 => vec![b'n'; u.int_in_range(250..=260)?],
            _ => u.arbitrary()?,
        })
    }

    fn session_id(&self, u: &mut Unstructured) -> AResult<Vec<u8>> {
        Ok(match u.int_in_range(0u8..=9)? {
            0..=6 if !self.sessions.is_empty() => self.sessions
                [u.choose_index(self.sessions.len())?]
            .id
            .to_vec(),
            7 if !self.ended.is_empty() => self.ended[u.choose_index(self.ended.len())?].to_vec(),
            8 => u.arbitrary::<Vec<u8>>()?,
            _ => u.arbitrary::<[u8; 16]>()?.to_vec(),
        })
    }

    fn offset(u: &mut Unstructured) -> AResult<u64> {
        Ok(match u.int_in_range(0u8..=9)? {
            0 => 0,
            1..=4 => u.int_in_range(0..=1 << 20)?,
            5 => u.int_in_range(0..=8)? << 30,
            6 => i64::MAX as u64 - u.int_in_range(0..=4096)?,
            7 => u64::MAX - u.int_in_range(0..=4096)?,
            _ => u.arbitrary()?,
        })
    }

    fn data(u: &mut Unstructured) -> AResult<Vec<u8>> {
        if u.ratio(1, 16)? {
            // Large writes from small inputs.
            let n = u.int_in_range(0usize..=4 << 20)?;
            return Ok(vec![u.arbitrary()?; n]);
        }
        u.arbitrary()
    }

    fn version(u: &mut Unstructured) -> AResult<pb::Version> {
        Ok(pb::Version {
            term: u.arbitrary()?,
            seq: u.arbitrary()?,
            id: u.arbitrary()?,
        })
    }

    fn kind(u: &mut Unstructured) -> AResult<i32> {
        Ok(if u.ratio(1, 16)? {
            u.arbitrary()?
        } else {
            u.int_in_range(0..=7)?
        })
    }

    fn attr(&self, u: &mut Unstructured) -> AResult<pb::Attr> {
        Ok(pb::Attr {
            gfid: self.new_gfid(u)?,
            kind: Self::kind(u)?,
            mode: u.arbitrary()?,
            uid: u.arbitrary()?,
            gid: u.arbitrary()?,
            size: Self::offset(u)?,
            nlink: u.arbitrary()?,
            rdev: u.arbitrary()?,
            atime_ns: u.arbitrary()?,
            mtime_ns: u.arbitrary()?,
            ctime_ns: u.arbitrary()?,
            blocks: u.arbitrary()?,
            ver: if u.arbitrary()? {
                Some(Self::version(u)?)
            } else {
                None
            },
            pending: u.arbitrary()?,
        })
    }

    fn xattr_name(u: &mut Unstructured) -> AResult<Vec<u8>> {
        const NAMES: &[&[u8]] = &[
            b"user.a",
            b"user.b",
            b"trusted.mortar.rec",
            b"trusted.x",
            b"security.selinux",
            b"system.posix_acl_access",
            b"user.",
            b"",
        ];
        Ok(if u.ratio(3, 4)? {
            NAMES[u.choose_index(NAMES.len())?].to_vec()
        } else {
            u.arbitrary()?
        })
    }

    fn meta(u: &mut Unstructured) -> AResult<pb::HealMeta> {
        let n = u.int_in_range(0..=3)?;
        let mut xattrs = Vec::new();
        for _ in 0..n {
            xattrs.push(pb::XattrPair {
                name: Self::xattr_name(u)?,
                value: u.arbitrary()?,
            });
        }
        Ok(pb::HealMeta {
            mode: u.arbitrary()?,
            uid: u.arbitrary()?,
            gid: u.arbitrary()?,
            atime_ns: u.arbitrary()?,
            mtime_ns: u.arbitrary()?,
            xattrs,
        })
    }

    fn gfid_list(&self, u: &mut Unstructured) -> AResult<Vec<Vec<u8>>> {
        if u.ratio(1, 32)? {
            // Past the brick's list caps.
            let g = self.gfid(u)?;
            return Ok(vec![g; u.int_in_range(1000..=1100)?]);
        }
        let n = u.int_in_range(0..=4)?;
        (0..n).map(|_| self.gfid(u)).collect()
    }

    async fn program(&mut self, u: &mut Unstructured<'_>) -> AResult<()> {
        // Most programs need a session first.
        if u.ratio(7, 8)? {
            self.open_session(u).await?;
        }
        for _ in 0..MAX_OPS {
            if u.is_empty() {
                break;
            }
            self.step(u).await?;
            // Let the session tasks run (pongs, ends of sessions).
            tokio::task::yield_now().await;
        }
        Ok(())
    }

    /// Ends the sessions (their cleanup runs) and stops the brick, as a shutdown does.
    async fn end(&mut self) {
        for s in &mut self.sessions {
            s.tx = None;
        }
        let _ = self.svc.stopper().send(true);
        // The session tasks see the end of their streams and clean up on blocking threads.
        for _ in 0..100 {
            if self.svc.session_count() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            self.svc.session_count(),
            0,
            "sessions outlived their streams"
        );
    }

    async fn open_session(&mut self, u: &mut Unstructured<'_>) -> AResult<()> {
        if self.sessions.len() >= 3 {
            return Ok(());
        }
        let id: [u8; 16] = if u.ratio(1, 8)? && !self.sessions.is_empty() {
            self.sessions[0].id // already in use
        } else {
            u.arbitrary()?
        };
        let (tx, rx) = mpsc::channel(1024);
        let first = if u.ratio(15, 16)? {
            frame(&pb::SessionIn {
                msg: Some(pb::session_in::Msg::Hello(pb::Hello {
                    session: id.to_vec(),
                    client: "fuzz".into(),
                    lease_ms: u.int_in_range(0..=60_000)?,
                    // Mostly a well-formed family (16 bytes), sometimes any bytes.
                    family: if u.ratio(3, 4)? {
                        u.bytes(16)?.to_vec()
                    } else {
                        u.arbitrary()?
                    },
                    lock_hold_ms: u.int_in_range(0..=60_000)?,
                })),
            })
        } else {
            Bytes::from(u.arbitrary::<Vec<u8>>()?)
        };
        let _ = tx.try_send(Ok(Frame::data(first)));
        let body = http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        use tonic::codec::Codec;
        let decoder = tonic_prost::ProstCodec::<pb::SessionOut, pb::SessionIn>::default().decoder();
        let inbound = tonic::Streaming::new_request(decoder, body, None, Some(64 << 20));
        let svc = self.svc.clone();
        let r = self.req(u, inbound)?;
        // A bad hello makes the brick wait 10 s for a good one: the paused clock skips it.
        let opened = async { svc.session(r).await.map(|r| r.map(Opaque)) };
        if let Some(Opaque(out)) = self.call(false, "session", opened).await {
            self.sessions.push(Session {
                id,
                tx: Some(tx),
                out: Some(out.boxed()),
            });
        }
        Ok(())
    }

    async fn session_op(&mut self, u: &mut Unstructured<'_>) -> AResult<()> {
        if self.sessions.is_empty() {
            return self.open_session(u).await;
        }
        let i = u.choose_index(self.sessions.len())?;
        match u.int_in_range(0u8..=4)? {
            0 | 1 => {
                let msg = if u.ratio(1, 3)? {
                    // Leases given back, asked for or not, opens included.
                    pb::session_in::Msg::Returned(pb::Returned {
                        gfids: vec![self.gfid(u)?, self.gfid(u)?],
                        open: vec![self.gfid(u)?],
                    })
                } else {
                    pb::session_in::Msg::Ping(u.arbitrary()?)
                };
                let ping = frame(&pb::SessionIn { msg: Some(msg) });
                if let Some(tx) = &self.sessions[i].tx {
                    let _ = tx.try_send(Ok(Frame::data(ping)));
                }
            }
            2 => {
                // Whatever bytes: torn frames, huge lengths, unknown messages.
                let raw = Bytes::from(u.arbitrary::<Vec<u8>>()?);
                if let Some(tx) = &self.sessions[i].tx {
                    let _ = tx.try_send(Ok(Frame::data(raw)));
                }
            }
            3 => {
                // Read what the brick sent so far.
                if let Some(out) = &mut self.sessions[i].out {
                    while let Some(Some(m)) = out.next().now_or_never() {
                        if m.is_err() {
                            break;
                        }
                    }
                }
            }
            _ => {
                // The client goes away: the brick frees its locks and opens.
                let s = self.sessions.remove(i);
                self.ended.push(s.id);
                drop(s);
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
            }
        }
        Ok(())
    }

    /// Locks `gfids` for the session (as a client's transaction does) and returns the
    /// updates that a change of them carries: from each version the lock reported.
    async fn assist(
        &mut self,
        u: &mut Unstructured<'_>,
        session: &[u8],
        gfids: Vec<Vec<u8>>,
    ) -> AResult<Vec<pb::VerUpdate>> {
        let term = self.next_term();
        let req = pb::LockReq {
            session: session.to_vec(),
            gfids,
            term,
            wait: false,
        };
        let svc = self.svc.clone();
        let r = self.req(u, req)?;
        let Some(reply) = self.call(false, "lock", svc.lock(r)).await else {
            return Ok(Vec::new());
        };
        Ok(reply
            .inodes
            .iter()
            .map(|i| {
                let old = i.ver.as_ref().map(ver).unwrap_or_default();
                pb::VerUpdate {
                    gfid: i.gfid.clone(),
                    new: Some(pb::Version {
                        term,
                        seq: old.seq + 1,
                        id: term ^ 0x5a5a,
                    }),
                    expect: i.ver.as_ref().map(ver),
                }
            })
            .collect())
    }

    async fn mutate(&mut self, u: &mut Unstructured<'_>) -> AResult<()> {
        use pb::mutate_req::Op;
        let session = self.session_id(u)?;
        let (op, locked) = match u.int_in_range(0u8..=9)? {
            0 => {
                let parent = self.gfid(u)?;
                let kind = Self::kind(u)?;
                let target = if u.ratio(1, 4)? {
                    b"/etc/passwd".to_vec()
                } else {
                    u.arbitrary()?
                };
                (
                    Op::Create(pb::Create {
                        parent: parent.clone(),
                        name: Self::name(u)?,
                        gfid: self.new_gfid(u)?,
                        kind,
                        mode: u.arbitrary()?,
                        uid: u.arbitrary()?,
                        gid: u.arbitrary()?,
                        rdev: u.arbitrary()?,
                        target,
                        term: self.term,
                        open: u.arbitrary()?,
                    }),
                    vec![parent],
                )
            }
            1 => {
                let parent = self.gfid(u)?;
                (
                    Op::Remove(pb::Remove {
                        parent: parent.clone(),
                        name: Self::name(u)?,
                        dir: u.arbitrary()?,
                    }),
                    vec![parent],
                )
            }
            2 => {
                let (parent, newparent) = (self.gfid(u)?, self.gfid(u)?);
                (
                    Op::Rename(pb::Rename {
                        parent: parent.clone(),
                        name: Self::name(u)?,
                        newparent: newparent.clone(),
                        newname: Self::name(u)?,
                        flags: u.int_in_range(0..=3)?,
                    }),
                    vec![parent, newparent],
                )
            }
            3 => {
                let (g, newparent) = (self.gfid(u)?, self.gfid(u)?);
                (
                    Op::Link(pb::Link {
                        gfid: g.clone(),
                        newparent: newparent.clone(),
                        newname: Self::name(u)?,
                    }),
                    vec![g, newparent],
                )
            }
            4 => {
                let g = self.gfid(u)?;
                let size = if u.arbitrary()? {
                    Some(Self::offset(u)?)
                } else {
                    None
                };
                (
                    Op::Setattr(pb::Setattr {
                        gfid: g.clone(),
                        mode: u.arbitrary()?,
                        uid: u.arbitrary()?,
                        gid: u.arbitrary()?,
                        size,
                        atime_ns: u.arbitrary()?,
                        mtime_ns: u.arbitrary()?,
                    }),
                    vec![g],
                )
            }
            5 | 6 => {
                let g = self.gfid(u)?;
                (
                    Op::Write(pb::Write {
                        gfid: g.clone(),
                        offset: Self::offset(u)?,
                        data: Self::data(u)?.into(),
                        append: u.arbitrary()?,
                    }),
                    vec![g],
                )
            }
            7 => {
                let g = self.gfid(u)?;
                let mode = if u.ratio(3, 4)? {
                    // keep size, punch hole, zero range, collapse, insert: the ones with effects.
                    [0, 1, 3, 0x10, 0x8, 0x20][u.choose_index(6)?]
                } else {
                    u.arbitrary()?
                };
                (
                    Op::Fallocate(pb::Fallocate {
                        gfid: g.clone(),
                        mode,
                        offset: Self::offset(u)?,
                        length: Self::offset(u)?,
                    }),
                    vec![g],
                )
            }
            8 => {
                let g = self.gfid(u)?;
                if u.arbitrary()? {
                    (
                        Op::Setxattr(pb::Setxattr {
                            gfid: g.clone(),
                            name: Self::xattr_name(u)?,
                            value: Self::data(u)?,
                            flags: u.int_in_range(0..=3)?,
                        }),
                        vec![g],
                    )
                } else {
                    (
                        Op::Removexattr(pb::Removexattr {
                            gfid: g.clone(),
                            name: Self::xattr_name(u)?,
                        }),
                        vec![g],
                    )
                }
            }
            _ => {
                let g = self.gfid(u)?;
                let limit = if u.arbitrary()? {
                    u.int_in_range(0..=1 << 20)?
                } else {
                    u.arbitrary()?
                };
                (
                    Op::SetQuota(pb::SetQuota {
                        gfid: g.clone(),
                        limit,
                    }),
                    vec![g],
                )
            }
        };
        let updates = if u.ratio(3, 4)? {
            self.assist(u, &session, locked).await?
        } else {
            let n = u.int_in_range(0..=2)?;
            let mut v = Vec::new();
            for _ in 0..n {
                v.push(pb::VerUpdate {
                    gfid: self.gfid(u)?,
                    expect: Some(Self::version(u)?),
                    new: Some(Self::version(u)?),
                });
            }
            v
        };
        let req = pb::MutateReq {
            session,
            now_ns: if u.ratio(7, 8)? {
                mortar_brick::service::now_ns()
            } else {
                u.arbitrary()?
            },
            updates,
            needs_heal: u.arbitrary()?,
            generation: u.int_in_range(0..=3)?,
            op: if u.ratio(31, 32)? { Some(op) } else { None },
        };
        let created = match &req.op {
            Some(Op::Create(c)) => Gfid::from_bytes(&c.gfid),
            _ => None,
        };
        let svc = self.svc.clone();
        let r = self.req(u, req)?;
        if let Some(reply) = self.call(false, "mutate", svc.mutate(r)).await {
            self.learn(reply.attr.as_ref());
            if let (0, Some(g)) = (reply.errno, created) {
                self.learn_gfid(g);
            }
        }
        Ok(())
    }

    async fn heal(&mut self, u: &mut Unstructured<'_>) -> AResult<()> {
        use pb::heal_req::Op;
        let session = self.session_id(u)?;
        let g = self.gfid(u)?;
        let op = match u.int_in_range(0u8..=6)? {
            0 => Op::Write(pb::HealWrite {
                offset: Self::offset(u)?,
                data: Self::data(u)?.into(),
            }),
            1 => Op::Truncate(Self::offset(u)?),
            2 => Op::Meta(Self::meta(u)?),
            3 | 4 => Op::Entry(pb::HealEntry {
                name: Self::name(u)?,
                attr: if u.ratio(15, 16)? {
                    Some(self.attr(u)?)
                } else {
                    None
                },
                target: u.arbitrary()?,
                ver: if u.arbitrary()? {
                    Some(Self::version(u)?)
                } else {
                    None
                },
                data: Self::data(u)?.into(),
                meta: if u.arbitrary()? {
                    Some(Self::meta(u)?)
                } else {
                    None
                },
            }),
            5 => Op::Remove(Self::name(u)?),
            _ => Op::SetVersion(Self::version(u)?),
        };
        if u.ratio(3, 4)? {
            self.assist(u, &session, vec![g.clone()]).await?;
        }
        let entry = match &op {
            Op::Entry(e) => e.attr.as_ref().and_then(|a| Gfid::from_bytes(&a.gfid)),
            _ => None,
        };
        let req = pb::HealReq {
            session,
            gfid: g,
            ctime_ns: u.arbitrary()?,
            op: Some(op),
        };
        let svc = self.svc.clone();
        let r = self.req(u, req)?;
        if let Some(reply) = self.call(false, "heal", svc.heal(r)).await {
            self.learn(reply.attr.as_ref());
            if let (0, Some(g)) = (reply.errno, entry) {
                self.learn_gfid(g);
            }
        }
        Ok(())
    }

    /// Raw protobuf bytes for a request of any kind: what a client that does not follow
    /// the generator's habits sends.
    async fn raw(&mut self, u: &mut Unstructured<'_>) -> AResult<()> {
        let which = u.int_in_range(0u8..=17)?;
        let bytes: Vec<u8> = u.arbitrary()?;
        let svc = self.svc.clone();
        macro_rules! raw {
            ($ty:ty, $m:ident) => {{
                let Ok(m) = <$ty>::decode(&bytes[..]) else {
                    return Ok(());
                };
                let r = self.req(u, m)?;
                let _ = self.call(true, stringify!($m), svc.$m(r)).await;
            }};
        }
        match which {
            0 => raw!(pb::LookupReq, lookup),
            1 => raw!(pb::GfidReq, getattr),
            2 => raw!(pb::OpenReq, open),
            3 => raw!(pb::ReleaseReq, release),
            4 => raw!(pb::ReaddirReq, readdir),
            5 => raw!(pb::ReadReq, read),
            6 => raw!(pb::GfidReq, readlink),
            7 => raw!(pb::XattrReq, getxattr),
            8 => raw!(pb::GfidReq, listxattr),
            9 => raw!(pb::GfidReq, statfs),
            10 => raw!(pb::GfidReq, quota),
            11 => raw!(pb::FsyncReq, fsync),
            12 => raw!(pb::LockReq, lock),
            13 => raw!(pb::UnlockReq, unlock),
            14 => raw!(pb::MutateReq, mutate),
            15 => raw!(pb::LkReq, lk),
            16 => raw!(pb::HealReq, heal),
            _ => raw!(pb::HealIndexReq, heal_index),
        }
        Ok(())
    }

    async fn step(&mut self, u: &mut Unstructured<'_>) -> AResult<()> {
        let svc = self.svc.clone();
        match u.int_in_range(0u8..=24)? {
            0 => {
                let req = pb::LookupReq {
                    parent: self.gfid(u)?,
                    name: Self::name(u)?,
                    session: self.session_id(u)?,
                };
                let r = self.req(u, req)?;
                if let Some(reply) = self.call(false, "lookup", svc.lookup(r)).await {
                    self.learn(reply.entry.as_ref());
                }
            }
            1 => {
                let r = pb::GfidReq {
                    gfid: self.gfid(u)?,
                    session: self.session_id(u)?,
                };
                let r = self.req(u, r)?;
                self.call(false, "getattr", svc.getattr(r)).await;
            }
            2 => {
                let req = pb::OpenReq {
                    session: self.session_id(u)?,
                    gfid: self.gfid(u)?,
                };
                let r = self.req(u, req)?;
                self.call(false, "open", svc.open(r)).await;
            }
            3 => {
                let req = pb::ReleaseReq {
                    session: self.session_id(u)?,
                    gfids: self.gfid_list(u)?,
                };
                let r = self.req(u, req)?;
                self.call(false, "release", svc.release(r)).await;
            }
            4 => {
                let req = pb::ReaddirReq {
                    gfid: self.gfid(u)?,
                    max: u.arbitrary()?,
                    after: if u.arbitrary()? {
                        Self::name(u)?
                    } else {
                        Vec::new()
                    },
                };
                let r = self.req(u, req)?;
                if let Some(reply) = self.call(false, "readdir", svc.readdir(r)).await {
                    for e in &reply.entries {
                        self.learn(e.attr.as_ref());
                    }
                }
            }
            5 => {
                let req = pb::ReadReq {
                    gfid: self.gfid(u)?,
                    offset: Self::offset(u)?,
                    size: u.arbitrary()?,
                    xattrs: u.arbitrary()?,
                };
                let r = self.req(u, req)?;
                self.call(false, "read", svc.read(r)).await;
            }
            6 => {
                let r = pb::GfidReq {
                    gfid: self.gfid(u)?,
                    ..Default::default()
                };
                let r = self.req(u, r)?;
                self.call(false, "readlink", svc.readlink(r)).await;
            }
            7 => {
                let req = pb::XattrReq {
                    gfid: self.gfid(u)?,
                    name: Self::xattr_name(u)?,
                };
                let r = self.req(u, req)?;
                self.call(false, "getxattr", svc.getxattr(r)).await;
            }
            8 => {
                let r = pb::GfidReq {
                    gfid: self.gfid(u)?,
                    ..Default::default()
                };
                let r = self.req(u, r)?;
                self.call(false, "listxattr", svc.listxattr(r)).await;
            }
            9 => {
                let r = pb::GfidReq {
                    gfid: self.gfid(u)?,
                    ..Default::default()
                };
                let quota = u.arbitrary()?;
                let r = self.req(u, r)?;
                if quota {
                    self.call(false, "quota", svc.quota(r)).await;
                } else {
                    self.call(false, "statfs", svc.statfs(r)).await;
                }
            }
            10 => {
                let req = pb::FsyncReq {
                    gfid: self.gfid(u)?,
                    datasync: u.arbitrary()?,
                };
                let r = self.req(u, req)?;
                self.call(false, "fsync", svc.fsync(r)).await;
            }
            11 | 12 => {
                let term = match u.int_in_range(0u8..=5)? {
                    0 => u.arbitrary()?,
                    1 => self.term,
                    _ => self.next_term(),
                };
                let wait = u.ratio(1, 8)?;
                let req = pb::LockReq {
                    session: self.session_id(u)?,
                    gfids: self.gfid_list(u)?,
                    term,
                    wait,
                };
                let r = self.req(u, req)?;
                self.call(wait, "lock", svc.lock(r)).await;
            }
            13 => {
                let req = pb::UnlockReq {
                    session: self.session_id(u)?,
                    gfids: self.gfid_list(u)?,
                    needs_heal: u.arbitrary()?,
                    healed: u.arbitrary()?,
                };
                let r = self.req(u, req)?;
                self.call(false, "unlock", svc.unlock(r)).await;
            }
            14..=17 => self.mutate(u).await?,
            18 => {
                let wait = u.ratio(1, 8)?;
                let typ = if u.ratio(7, 8)? {
                    u.int_in_range(0..=2)?
                } else {
                    u.arbitrary()?
                };
                let (start, end) = (Self::offset(u)?, Self::offset(u)?);
                let req = pb::LkReq {
                    session: self.session_id(u)?,
                    gfid: self.gfid(u)?,
                    owner: u.int_in_range(0..=3)?,
                    pid: u.arbitrary()?,
                    typ,
                    start: start.min(end),
                    end: if u.ratio(1, 8)? {
                        start
                    } else {
                        start.max(end)
                    },
                    wait,
                    test: u.arbitrary()?,
                };
                let r = self.req(u, req)?;
                self.call(wait, "lk", svc.lk(r)).await;
            }
            19 => self.heal(u).await?,
            20 => {
                let sums = pb::ChecksumReq {
                    gfid: self.gfid(u)?,
                    block: u.arbitrary()?,
                    first: Self::offset(u)?,
                    max: u.arbitrary()?,
                };
                let r = self.req(u, sums)?;
                self.call(false, "checksums", svc.checksums(r)).await;
            }
            21 => {
                let req = pb::HealIndexReq {
                    add: self.gfid_list(u)?,
                    remove: self.gfid_list(u)?,
                    split_brain: self.gfid_list(u)?,
                    list: u.arbitrary()?,
                    after: if u.arbitrary()? {
                        self.gfid(u)?
                    } else {
                        Vec::new()
                    },
                    max: u.arbitrary()?,
                };
                let r = self.req(u, req)?;
                self.call(false, "heal_index", svc.heal_index(r)).await;
            }
            22 => {
                let which = u.int_in_range(0u8..=2)?;
                let r = self.req(u, pb::Empty {})?;
                match which {
                    0 => {
                        self.call(false, "get_volfile", svc.get_volfile(r)).await;
                    }
                    1 => {
                        self.call(false, "health", svc.health(r)).await;
                    }
                    _ => {
                        let listed = async { svc.manifest(r).await.map(|r| r.map(Opaque)) };
                        if let Some(Opaque(mut s)) = self.call(false, "manifest", listed).await {
                            let walk = async {
                                let mut seen = HashSet::new();
                                while let Some(e) = s.next().await {
                                    let e = e.expect("manifest entry");
                                    assert!(
                                        seen.insert(e.path.clone()),
                                        "listed twice: {}",
                                        e.path
                                    );
                                }
                            };
                            tokio::time::timeout(HANG, walk)
                                .await
                                .expect("manifest hung");
                        }
                    }
                }
            }
            23 => self.session_op(u).await?,
            _ => self.raw(u).await?,
        }
        Ok(())
    }
}
