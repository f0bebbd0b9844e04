//! The brick's gRPC service: maps requests onto the store and the lock tables, and file
//! system errors onto `errno` fields.

use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mortar_common::gfid::Gfid;
use mortar_common::telemetry::RateLimit;
use mortar_common::tls::{self, Role};
use mortar_common::volfile::Volfile;
use mortar_proto as pb;
use rustix::io::Errno;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::locks::{
    F_UNLCK, Family, InodeLocks, RangeLock, RangeLocks, Refused, Retained, SessionId,
};
use crate::store::{self, Store, gfid};

/// How long a lock request waits for another session to give the lock up.
const LOCK_WAIT: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct VolfileState {
    pub yaml: String,
    pub vol: Volfile,
}

struct SessionEntry {
    tx: mpsc::Sender<Result<pb::SessionOut, Status>>,
    /// Inodes changed under locks the session still holds: if it dies now, their copies
    /// may disagree, so they go to the heal index.
    mutated: HashSet<Gfid>,
    /// Files the session has open, with how many opens: released when it ends.
    opened: HashMap<Gfid, u32>,
    /// Who the client said it is (for the logs: who holds a lock others wait for).
    client: String,
    /// Ends the session (it did not answer a lease recall).
    kill: Arc<tokio::sync::Notify>,
    /// The mount it belongs to (see `Hello.family`), and whose certificate it showed:
    /// only the same peer's next session of the family supersedes it.
    family: Option<(Family, String)>,
}

/// Longest a session's POSIX locks wait for its successor (`Hello.lock_hold_ms`).
const MAX_LOCK_HOLD: Duration = Duration::from_secs(30);

/// Inodes fenced against new leases while a change that reaches them by name runs.
struct Fence {
    leases: Arc<crate::leases::Leases>,
    gfids: Vec<Gfid>,
}

impl Drop for Fence {
    fn drop(&mut self) {
        self.leases.unfence(&self.gfids);
    }
}

#[derive(Default)]
pub struct Metrics {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    /// Of those, bytes sent on bulk connections (`crate::bulk`).
    pub bulk_bytes: AtomicU64,
    pub mutations: AtomicU64,
    pub written_bytes: AtomicU64,
    pub stale: AtomicU64,
    pub lock_waits: AtomicU64,
    pub sessions_ended: AtomicU64,
}

pub struct BrickService {
    pub id: String,
    pub store: Arc<Store>,
    pub volfile: watch::Receiver<VolfileState>,
    pub session_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// Wakes the self-heal worker (something was queued for heal).
    pub heal_wake: Arc<tokio::sync::Notify>,
    inode_locks: Arc<InodeLocks>,
    range_locks: Arc<RangeLocks>,
    sessions: Arc<Mutex<HashMap<SessionId, SessionEntry>>>,
    retained: Arc<Retained>,
    pub leases: Arc<crate::leases::Leases>,
    /// Set when the brick stops: every session stream ends, so that the server's graceful
    /// shutdown can finish once the requests in flight are answered.
    stopping: watch::Sender<bool>,
    /// Peers are authenticated by TLS certificates: their roles can be told apart.
    authenticated: bool,
}

/// Marks a request the brick makes of itself, in-process (its self-heal worker).
#[derive(Clone, Copy)]
pub struct InProcess;

/// "refused: needs an admin certificate": at most one line per 10 s.
static REFUSALS: RateLimit = RateLimit::new(Duration::from_secs(10));

/// How far ahead of this brick's clock a lock term may be (terms are the clients' clocks
/// in nanoseconds; this leaves room for skew). A term far beyond it would fence off every
/// later writer for good.
const TERM_AHEAD_NS: u64 = 3600 * 1_000_000_000;

/// Most files one session may have open at once (see `locks::SESSION_LOCKS`): EMFILE past it.
const SESSION_OPENS: usize = 65_536;
/// Most inodes one Lock request takes.
const MAX_LOCK_LIST: usize = 16;
/// Most gfids in one list of a HealIndex request.
const MAX_INDEX_LIST: usize = 1024;
/// Most heal index entries in one reply.
const INDEX_PAGE: u32 = 1000;

/// MORTAR_TEST_FSYNC_DELAY_MS: every fsync waits this long first (tests only: a slow disk).
fn test_fsync_delay() -> Option<u64> {
    static DELAY: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *DELAY.get_or_init(|| {
        std::env::var("MORTAR_TEST_FSYNC_DELAY_MS")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

/// MORTAR_TEST_DIE_MID_WRITE=before|after (tests only): a write whose data starts with
/// `DIE_MARKER` makes the brick exit at once, after its pre-op mark and before (or after)
/// applying the write: a brick that dies in the middle of a change.
const DIE_MARKER: &[u8] = b"MORTAR-TEST-DIE";

fn test_die_mid_write(op: &pb::mutate_req::Op) -> Option<bool> {
    static MODE: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let after =
        (*MODE.get_or_init(
            || match std::env::var("MORTAR_TEST_DIE_MID_WRITE").as_deref() {
                Ok("before") => Some(false),
                Ok("after") => Some(true),
                _ => None,
            },
        ))?;
    matches!(op, pb::mutate_req::Op::Write(w) if w.data.starts_with(DIE_MARKER)).then_some(after)
}

fn attr_reply(res: Result<pb::Attr, Errno>) -> pb::AttrReply {
    match res {
        Ok(a) => pb::AttrReply {
            errno: 0,
            attr: Some(a),
            leased: false,
        },
        Err(e) => pb::AttrReply {
            errno: errno(e),
            ..Default::default()
        },
    }
}

fn errno(e: Errno) -> i32 {
    e.raw_os_error()
}

fn session_id(b: &[u8]) -> Result<SessionId, Status> {
    b.try_into()
        .map_err(|_| Status::invalid_argument("session id must be 16 bytes"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))
}

type BoxStream<T> = Pin<Box<dyn futures::Stream<Item = Result<T, Status>> + Send>>;

impl BrickService {
    pub fn new(
        id: String,
        store: Arc<Store>,
        volfile: watch::Receiver<VolfileState>,
        session_timeout: Duration,
        authenticated: bool,
    ) -> Self {
        BrickService {
            authenticated,
            id,
            store,
            volfile,
            session_timeout,
            metrics: Arc::default(),
            heal_wake: Arc::default(),
            inode_locks: Arc::default(),
            range_locks: Arc::default(),
            sessions: Arc::default(),
            retained: Arc::default(),
            leases: Arc::default(),
            stopping: watch::Sender::new(false),
        }
    }

    /// The peer's role, from its certificate. Without TLS nothing tells peers apart, and
    /// every peer may do everything (see SECURITY.md).
    fn role<T>(&self, req: &Request<T>) -> Role {
        if !self.authenticated || req.extensions().get::<InProcess>().is_some() {
            return Role::Brick;
        }
        req.peer_certs()
            .and_then(|chain| tls::peer_role(&chain[..]))
            .unwrap_or(Role::Client)
    }

    /// Administrative requests (heal steps, heal index changes, quotas) come only from
    /// bricks and admins, never from a mount's certificate.
    fn require_admin<T>(&self, req: &Request<T>, what: &str) -> Result<(), Status> {
        let role = self.role(req);
        if role.is_admin() {
            return Ok(());
        }
        if REFUSALS.allow().is_some() {
            tracing::warn!(?role, peer = ?req.remote_addr(), "refused {what}: not a brick or admin certificate");
        }
        Err(Status::permission_denied(format!(
            "{what} needs a brick or admin certificate"
        )))
    }

    /// Ends every client session (the clients reconnect to the other bricks' at once and
    /// here after a restart); requests in flight still get their answers.
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stopping.clone()
    }

    pub fn session_count(&self) -> usize {
        self.sessions.lock().unwrap().len()
    }

    fn live(&self, s: &SessionId) -> bool {
        self.sessions.lock().unwrap().contains_key(s)
    }

    fn notify_contended(&self, holder: SessionId, g: Gfid) {
        if let Some(e) = self.sessions.lock().unwrap().get(&holder) {
            tracing::debug!(holder = %e.client, gfid = %g, "lock contended");
            let _ = e.tx.try_send(Ok(pb::SessionOut {
                msg: Some(pb::session_out::Msg::Contended(g.to_vec())),
            }));
        }
    }

    /// Ends a session: its locks go (its POSIX locks stay if `keep_ranges`: they wait for
    /// its successor), and what it changed without finishing goes to heal.
    fn end_session(
        sessions: &Mutex<HashMap<SessionId, SessionEntry>>,
        inode_locks: &InodeLocks,
        range_locks: &RangeLocks,
        store: &Store,
        s: SessionId,
        keep_ranges: bool,
    ) {
        let entry = sessions.lock().unwrap().remove(&s);
        let held = inode_locks.release_session(s);
        if !keep_ranges {
            range_locks.release_session(s);
        }
        if let Some(entry) = entry {
            for g in held {
                if entry.mutated.contains(&g) {
                    store.mark_heal(g);
                }
            }
            for (g, n) in entry.opened {
                store.released(g, n);
            }
        }
    }

    /// A heal `Write` of `n` bytes at `offset` of `g` that come from a bulk connection
    /// (`crate::bulk`), for the in-process healer: the same check as the `Heal` RPC (the
    /// session is live and holds the inode's lock). Blocking.
    pub fn heal_splice(
        &self,
        session: &[u8],
        g: Gfid,
        offset: u64,
        n: u32,
        from: std::os::fd::BorrowedFd<'_>,
    ) -> Result<(), i32> {
        let Ok(sid) = session_id(session) else {
            return Err(libc::EINVAL);
        };
        if !self.live(&sid) || !self.inode_locks.holds(sid, g) {
            return Err(libc::ENOLCK);
        }
        self.store.heal_splice(g, offset, n, from).map_err(errno)
    }

    /// A new session `sid` of mount `f` from a peer with certificate `cert`: the live sessions
    /// of the family end (the process that held them is gone or being replaced), and the
    /// POSIX locks of the last one pass to `sid`; the leases of those sessions go at once,
    /// since the caches they covered died with their process.
    async fn supersede(&self, f: Family, sid: SessionId, cert: &str) {
        let live = |sessions: &HashMap<SessionId, SessionEntry>| -> Vec<Arc<tokio::sync::Notify>> {
            sessions
                .values()
                .filter(|e| e.family.as_ref().is_some_and(|(g, c)| *g == f && c == cert))
                .map(|e| e.kill.clone())
                .collect()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let kills = live(&self.sessions.lock().unwrap());
            if kills.is_empty() || tokio::time::Instant::now() > deadline {
                break;
            }
            for k in kills {
                k.notify_one();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let Some(old) = self.retained.adopt(f, cert) else {
            return;
        };
        let n = self.range_locks.transfer(old, sid);
        self.leases.ended(old, true);
        tracing::info!(
            locks = n,
            "a mount's new session takes over from its last one"
        );
    }

    /// The session a read asks a lease for, if it gave one.
    fn lease_session(&self, s: &[u8]) -> Option<SessionId> {
        session_id(s).ok()
    }

    /// Grants `s` leases on `gfids` unless another session holds one of their locks.
    fn grant(&self, s: SessionId, gfids: &[Gfid]) -> bool {
        self.leases
            .grant(s, gfids, |g| self.inode_locks.held_by_other(s, g))
    }

    /// Recalls other sessions' leases on `gfids` and waits for them (see `leases`); a
    /// session that does not answer is ended.
    async fn recall(&self, except: Option<SessionId>, gfids: &[Gfid]) {
        let r = self.leases.recall(except, gfids).await;
        if !r.broken.is_empty() {
            let sessions = self.sessions.lock().unwrap();
            for s in r.broken {
                if let Some(e) = sessions.get(&s) {
                    tracing::warn!(client = %e.client, "session did not answer a lease recall: ended");
                    e.kill.notify_one();
                }
            }
        }
    }

    /// Fences and recalls the inodes `op` reaches by name (see `mutate`); they are unfenced
    /// when the returned guard goes. Nothing to do while no other session can hold leases.
    async fn fence_victims(
        &self,
        sid: SessionId,
        op: &pb::mutate_req::Op,
    ) -> Result<Option<Fence>, Status> {
        use pb::mutate_req::Op;
        let names: Vec<(Vec<u8>, Vec<u8>)> = match op {
            Op::Remove(r) => vec![(r.parent.clone(), r.name.clone())],
            Op::Rename(r) => vec![
                (r.parent.clone(), r.name.clone()),
                (r.newparent.clone(), r.newname.clone()),
            ],
            Op::Link(l) => match Gfid::from_bytes(&l.gfid) {
                Some(g) => return Ok(Some(self.fence(sid, vec![g]).await)),
                None => return Ok(None),
            },
            _ => return Ok(None),
        };
        if !self.leases.others_registered(sid) {
            return Ok(None);
        }
        let store = self.store.clone();
        let victims: Vec<Gfid> = blocking(move || {
            names
                .iter()
                .filter_map(|(p, n)| {
                    let (_, e) = store.lookup(Gfid::from_bytes(p)?, n).ok()?;
                    Gfid::from_bytes(&e?.gfid)
                })
                .collect()
        })
        .await?;
        Ok(Some(self.fence(sid, victims).await))
    }

    async fn fence(&self, sid: SessionId, gfids: Vec<Gfid>) -> Fence {
        self.leases.fence(&gfids);
        let f = Fence {
            leases: self.leases.clone(),
            gfids,
        };
        self.recall(Some(sid), &f.gfids).await;
        f
    }

    /// Counts an open of `g` by session `sid`, if the session is live (an open by a dead
    /// session would never be released).
    /// Counts an open of `g` by `sid` (`capped`: refused past the session's cap; a create's
    /// own open is not, the file exists by then). Ok(false): no such session.
    fn note_open(&self, sid: SessionId, g: Gfid, capped: bool) -> Result<bool, Errno> {
        Self::count_open(&self.sessions, &self.store, sid, g, capped)
    }

    /// [`BrickService::note_open`] for the session task, which holds no `self`.
    fn count_open(
        sessions: &Mutex<HashMap<SessionId, SessionEntry>>,
        store: &Store,
        sid: SessionId,
        g: Gfid,
        capped: bool,
    ) -> Result<bool, Errno> {
        let mut sessions = sessions.lock().unwrap();
        let Some(e) = sessions.get_mut(&sid) else {
            return Ok(false);
        };
        // Bounded per session, as its locks are: a client that opens and never releases
        // is refused rather than growing the table.
        if capped
            && !e.opened.contains_key(&g)
            && e.opened.len() >= crate::locks::session_cap(SESSION_OPENS)
        {
            return Err(Errno::MFILE);
        }
        *e.opened.entry(g).or_insert(0) += 1;
        // Under the sessions lock, so that end_session cannot run in between.
        store.opened(g);
        Ok(true)
    }

    /// Takes one open of `g` off session `sid`; false if it had none. The caller then
    /// releases it in the store (blocking work: it may delete an orphan).
    fn note_release(&self, sid: SessionId, g: Gfid) -> bool {
        let mut sessions = self.sessions.lock().unwrap();
        let Some(e) = sessions.get_mut(&sid) else {
            return false;
        };
        match e.opened.get_mut(&g) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                e.opened.remove(&g);
            }
            None => return false,
        }
        true
    }
}

#[tonic::async_trait]
impl pb::brick_server::Brick for BrickService {
    async fn get_volfile(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<pb::VolfileReply>, Status> {
        let v = self.volfile.borrow().clone();
        Ok(Response::new(pb::VolfileReply {
            yaml: v.yaml,
            generation: v.vol.generation,
        }))
    }

    async fn health(&self, _: Request<pb::Empty>) -> Result<Response<pb::HealthReply>, Status> {
        let store = self.store.clone();
        let (fs, pending) = blocking(move || (store.statfs(), store.heal_count())).await?;
        let v = self.volfile.borrow().clone();
        let mut r = pb::HealthReply {
            brick_id: self.id.clone(),
            volume: v.vol.volume,
            generation: v.vol.generation,
            up: true,
            heal_pending: pending as u64,
            sessions: self.session_count() as u32,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        if let Ok(fs) = fs {
            r.capacity_bytes = fs.f_blocks * fs.f_frsize;
            r.free_bytes = fs.f_bavail * fs.f_frsize;
            r.used_bytes = (fs.f_blocks - fs.f_bfree) * fs.f_frsize;
        }
        Ok(Response::new(r))
    }

    type SessionStream = BoxStream<pb::SessionOut>;

    async fn session(
        &self,
        req: Request<Streaming<pb::SessionIn>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        // Who the certificate says the peer is, for the log: the name a client gives itself
        // in its hello is only what it claims.
        let cert = req
            .peer_certs()
            .and_then(|chain| tls::peer_name(&chain[..]))
            .unwrap_or_else(|| "-".into());
        let mut inbound = req.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(pb::SessionIn {
                msg: Some(pb::session_in::Msg::Hello(h)),
            }))) => h,
            _ => return Err(Status::invalid_argument("a session starts with hello")),
        };
        let sid = session_id(&hello.session)?;
        let family: Option<Family> = match hello.family.len() {
            0 => None,
            16 => Some(hello.family[..].try_into().unwrap()),
            _ => return Err(Status::invalid_argument("a session family is 16 bytes")),
        };
        let hold = Duration::from_millis(hello.lock_hold_ms).min(MAX_LOCK_HOLD);
        if let Some(f) = family {
            self.supersede(f, sid, &cert).await;
        }
        let (tx, rx) = mpsc::channel(256);
        let kill = Arc::new(tokio::sync::Notify::new());
        {
            let mut sessions = self.sessions.lock().unwrap();
            if sessions.contains_key(&sid) {
                return Err(Status::already_exists("session id in use"));
            }
            sessions.insert(
                sid,
                SessionEntry {
                    tx: tx.clone(),
                    mutated: HashSet::new(),
                    opened: HashMap::new(),
                    client: hello.client.chars().take(128).collect(),
                    kill: kill.clone(),
                    family: family.map(|f| (f, cert.clone())),
                },
            );
        }
        self.leases
            .register(sid, Duration::from_millis(hello.lease_ms), tx.clone());
        tracing::info!(client = %hello.client, cert = %cert, "session started");
        let (sessions, inode_locks, range_locks, store) = (
            self.sessions.clone(),
            self.inode_locks.clone(),
            self.range_locks.clone(),
            self.store.clone(),
        );
        let timeout = self.session_timeout;
        let metrics = self.metrics.clone();
        let mut volfile = self.volfile.clone();
        let mut stopping = self.stopping.subscribe();
        let (leases, store2) = (self.leases.clone(), self.store.clone());
        let retained = self.retained.clone();
        tokio::spawn(async move {
            let why = loop {
                tokio::select! {
                    _ = stopping.changed() => break "brick stopping",
                    _ = kill.notified() => break "did not answer a lease recall",
                    m = tokio::time::timeout(timeout, inbound.message()) => match m {
                        Ok(Ok(Some(pb::SessionIn { msg: Some(pb::session_in::Msg::Returned(r)) }))) => {
                            leases.heard(sid);
                            // The files it has open through its cache count as opened here
                            // now, before the leases go: an unlink then keeps their data.
                            // Bounded like any open (past the cap, a hostile list is cut).
                            for g in r.open.iter().filter_map(|g| Gfid::from_bytes(g)) {
                                let _ = BrickService::count_open(&sessions, &store2, sid, g, true);
                            }
                            let back: Vec<Gfid> = r.gfids.iter().filter_map(|g| Gfid::from_bytes(g)).collect();
                            leases.returned(sid, &back);
                        }
                        Ok(Ok(Some(pb::SessionIn { msg: Some(pb::session_in::Msg::Ping(n)) }))) => {
                            leases.heard(sid);
                            let pong = pb::SessionOut { msg: Some(pb::session_out::Msg::Pong(n)) };
                            // Never wait on a client that stops reading: with its session
                            // held open by a blocked send, its locks would live forever.
                            match tx.try_send(Ok(pong)) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Full(_)) => break "client not reading its session",
                                Err(mpsc::error::TrySendError::Closed(_)) => break "stream closed",
                            }
                        }
                        Ok(Ok(Some(_))) => leases.heard(sid),
                        Ok(Ok(None)) => break "client closed the session",
                        Ok(Err(_)) => break "connection lost",
                        Err(_) => break "no ping within the session timeout",
                    },
                    r = volfile.changed() => {
                        if r.is_err() { break "brick stopping"; }
                        let generation = volfile.borrow().vol.generation;
                        let _ = tx.try_send(Ok(pb::SessionOut { msg: Some(pb::session_out::Msg::VolfileGeneration(generation)) }));
                    }
                }
            };
            tracing::info!(client = %hello.client, "session ended: {why}");
            metrics.sessions_ended.fetch_add(1, Relaxed);
            // A client that closed its session (or a brick going away) leaves nothing to
            // wait for; otherwise its leases last until it has stopped trusting them.
            let closed = matches!(why, "client closed the session" | "brick stopping");
            leases.ended(sid, closed);
            // A mount whose server died comes back as a new session of the same family:
            // its POSIX locks wait for it (before the session is gone: a successor that
            // waits for it to go finds them; see `supersede`).
            let keep = match family {
                Some(f) if !closed && !hold.is_zero() => {
                    if let Some(orphan) = retained.keep(f, sid, &cert) {
                        range_locks.release_session(orphan);
                    }
                    let (retained, range_locks) = (retained.clone(), range_locks.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(hold).await;
                        if retained.expire(f, sid) {
                            tracing::info!(client = %hello.client, "no successor came: its POSIX locks go");
                            range_locks.release_session(sid);
                        }
                    });
                    true
                }
                _ => false,
            };
            let _ = tokio::task::spawn_blocking(move || {
                BrickService::end_session(&sessions, &inode_locks, &range_locks, &store, sid, keep)
            })
            .await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lookup(
        &self,
        req: Request<pb::LookupReq>,
    ) -> Result<Response<pb::LookupReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        // A lease on the parent is granted before it is read (see `leases`); one on the
        // entry once its gfid is known, and the entry read again after it.
        let sid = self.lease_session(&r.session);
        let parent = Gfid::from_bytes(&r.parent);
        let mut leased = match (sid, parent) {
            (Some(s), Some(p)) => self.grant(s, &[p]),
            _ => false,
        };
        let res = blocking(move || store.lookup(gfid(&r.parent)?, &r.name)).await?;
        let res = match res {
            Ok((p, Some(e))) if leased => {
                let g = Gfid::from_bytes(&e.gfid);
                leased = g.is_some_and(|g| self.grant(sid.unwrap(), &[g]));
                match g {
                    Some(g) if leased => {
                        let store = self.store.clone();
                        blocking(move || store.getattr(g))
                            .await?
                            .map(|e| (p, Some(e)))
                    }
                    _ => Ok((p, Some(e))),
                }
            }
            r => r,
        };
        self.metrics.reads.fetch_add(1, Relaxed);
        Ok(Response::new(match res {
            Ok((p, Some(e))) => pb::LookupReply {
                errno: 0,
                parent: Some(p),
                entry: Some(e),
                leased,
            },
            Ok((p, None)) => pb::LookupReply {
                errno: libc::ENOENT,
                parent: Some(p),
                entry: None,
                leased,
            },
            Err(e) => pb::LookupReply {
                errno: errno(e),
                ..Default::default()
            },
        }))
    }

    async fn getattr(&self, req: Request<pb::GfidReq>) -> Result<Response<pb::AttrReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let leased = match (self.lease_session(&r.session), Gfid::from_bytes(&r.gfid)) {
            (Some(s), Some(g)) => self.grant(s, &[g]),
            _ => false,
        };
        let res = blocking(move || store.getattr(gfid(&r.gfid)?)).await?;
        self.metrics.reads.fetch_add(1, Relaxed);
        let mut reply = attr_reply(res);
        reply.leased = leased && reply.errno == 0;
        Ok(Response::new(reply))
    }

    async fn open(&self, req: Request<pb::OpenReq>) -> Result<Response<pb::AttrReply>, Status> {
        let r = req.into_inner();
        let sid = session_id(&r.session)?;
        let g = gfid(&r.gfid).map_err(|_| Status::invalid_argument("bad gfid"))?;
        // Counted before the stat: an unlink racing with this open either comes first (the
        // stat fails) or finds the open and keeps the data.
        let counted = match self.note_open(sid, g, true) {
            Ok(c) => c,
            Err(e) => return Ok(Response::new(attr_reply(Err(e)))),
        };
        let store = self.store.clone();
        let leased = self.grant(sid, &[g]);
        let res = blocking(move || store.getattr(g)).await?;
        self.metrics.reads.fetch_add(1, Relaxed);
        if res.is_err() && counted && self.note_release(sid, g) {
            let store = self.store.clone();
            blocking(move || store.released(g, 1)).await?;
        }
        let mut reply = attr_reply(res);
        reply.leased = leased && reply.errno == 0;
        Ok(Response::new(reply))
    }

    async fn release(
        &self,
        req: Request<pb::ReleaseReq>,
    ) -> Result<Response<pb::ErrnoReply>, Status> {
        let r = req.into_inner();
        let sid = session_id(&r.session)?;
        // Only what this session opened: a release never drops another session's open.
        let done: Vec<Gfid> = r
            .gfids
            .iter()
            .filter_map(|b| Gfid::from_bytes(b))
            .filter(|g| self.note_release(sid, *g))
            .collect();
        let store = self.store.clone();
        blocking(move || done.into_iter().for_each(|g| store.released(g, 1))).await?;
        Ok(Response::new(pb::ErrnoReply { errno: 0 }))
    }

    async fn readdir(
        &self,
        req: Request<pb::ReaddirReq>,
    ) -> Result<Response<pb::ReaddirReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res =
            blocking(move || store.readdir(gfid(&r.gfid)?, &r.after, r.max.min(4096))).await?;
        self.metrics.reads.fetch_add(1, Relaxed);
        Ok(Response::new(match res {
            Ok((entries, eof, next)) => pb::ReaddirReply {
                errno: 0,
                entries,
                eof,
                next,
            },
            Err(e) => pb::ReaddirReply {
                errno: errno(e),
                ..Default::default()
            },
        }))
    }

    async fn read(&self, req: Request<pb::ReadReq>) -> Result<Response<pb::ReadReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res = blocking(move || {
            let g = gfid(&r.gfid)?;
            let data = store.read(g, r.offset, r.size)?;
            let mut xattrs = Vec::new();
            if r.xattrs {
                for name in store.listxattr(g)? {
                    // One removed since the listing is simply not there.
                    if let Ok(value) = store.getxattr(g, &name) {
                        xattrs.push(pb::XattrPair { name, value });
                    }
                }
            }
            Ok::<_, Errno>((data, xattrs))
        })
        .await?;
        self.metrics.reads.fetch_add(1, Relaxed);
        Ok(Response::new(match res {
            Ok((data, xattrs)) => {
                self.metrics
                    .read_bytes
                    .fetch_add(data.len() as u64, Relaxed);
                pb::ReadReply {
                    errno: 0,
                    data: data.into(),
                    xattrs,
                }
            }
            Err(e) => pb::ReadReply {
                errno: errno(e),
                ..Default::default()
            },
        }))
    }

    async fn readlink(
        &self,
        req: Request<pb::GfidReq>,
    ) -> Result<Response<pb::ReadlinkReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res = blocking(move || store.readlink(gfid(&r.gfid)?)).await?;
        Ok(Response::new(match res {
            Ok(target) => pb::ReadlinkReply { errno: 0, target },
            Err(e) => pb::ReadlinkReply {
                errno: errno(e),
                target: Vec::new(),
            },
        }))
    }

    async fn getxattr(
        &self,
        req: Request<pb::XattrReq>,
    ) -> Result<Response<pb::XattrReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res = blocking(move || store.getxattr(gfid(&r.gfid)?, &r.name)).await?;
        Ok(Response::new(match res {
            Ok(value) => pb::XattrReply { errno: 0, value },
            Err(e) => pb::XattrReply {
                errno: errno(e),
                value: Vec::new(),
            },
        }))
    }

    async fn listxattr(
        &self,
        req: Request<pb::GfidReq>,
    ) -> Result<Response<pb::ListxattrReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res = blocking(move || store.listxattr(gfid(&r.gfid)?)).await?;
        Ok(Response::new(match res {
            Ok(names) => pb::ListxattrReply { errno: 0, names },
            Err(e) => pb::ListxattrReply {
                errno: errno(e),
                names: Vec::new(),
            },
        }))
    }

    async fn statfs(&self, req: Request<pb::GfidReq>) -> Result<Response<pb::StatfsReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res = blocking(move || {
            let fs = store.statfs()?;
            let quota = if r.gfid.is_empty() {
                None
            } else {
                store.quota_of(gfid(&r.gfid)?)
            };
            Ok::<_, Errno>((fs, quota))
        })
        .await?;
        Ok(Response::new(match res {
            Ok((s, quota)) => {
                let mut reply = pb::StatfsReply {
                    errno: 0,
                    blocks: s.f_blocks,
                    bfree: s.f_bfree,
                    bavail: s.f_bavail,
                    files: s.f_files,
                    ffree: s.f_ffree,
                    bsize: s.f_bsize as u32,
                    namelen: 255,
                    frsize: s.f_frsize as u32,
                };
                // Inside a quota tree (a PVC), df shows the quota, not the whole volume.
                if let Some((_, u)) = quota {
                    let unit = 4096u64;
                    let free = u.limit.saturating_sub(u.used) / unit;
                    reply.blocks = u.limit.div_ceil(unit);
                    reply.bfree = free.min(s.f_bavail * s.f_frsize / unit);
                    reply.bavail = reply.bfree;
                    reply.bsize = unit as u32;
                    reply.frsize = unit as u32;
                }
                reply
            }
            Err(e) => pb::StatfsReply {
                errno: errno(e),
                ..Default::default()
            },
        }))
    }

    async fn quota(&self, req: Request<pb::GfidReq>) -> Result<Response<pb::QuotaReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res = blocking(move || {
            let g = gfid(&r.gfid)?;
            store.getattr(g)?;
            Ok::<_, Errno>(store.quota_of(g).filter(|(root, _)| *root == g))
        })
        .await?;
        Ok(Response::new(match res {
            Ok(Some((_, u))) => pb::QuotaReply {
                errno: 0,
                limit: u.limit,
                used: u.used,
            },
            Ok(None) => pb::QuotaReply {
                errno: libc::ENODATA,
                ..Default::default()
            },
            Err(e) => pb::QuotaReply {
                errno: errno(e),
                ..Default::default()
            },
        }))
    }

    async fn fsync(&self, req: Request<pb::FsyncReq>) -> Result<Response<pb::ErrnoReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        // A slow disk, for the tests of long requests (MORTAR_TEST_FSYNC_DELAY_MS).
        if let Some(ms) = test_fsync_delay() {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let res = blocking(move || store.fsync(gfid(&r.gfid)?)).await?;
        Ok(Response::new(pb::ErrnoReply {
            errno: res.err().map(errno).unwrap_or(0),
        }))
    }

    async fn lock(&self, req: Request<pb::LockReq>) -> Result<Response<pb::LockReply>, Status> {
        let r = req.into_inner();
        let sid = session_id(&r.session)?;
        let fail = |e: i32| {
            Ok(Response::new(pb::LockReply {
                errno: e,
                ..Default::default()
            }))
        };
        if !self.live(&sid) {
            return fail(libc::ENOTCONN);
        }
        let Ok(gfids) = r
            .gfids
            .iter()
            .map(|g| gfid(g))
            .collect::<Result<Vec<_>, _>>()
        else {
            return fail(libc::EINVAL);
        };
        // A transaction locks a few inodes (a rename: two directories); a long list is an
        // attack on the lock table, not a transaction.
        if gfids.len() > MAX_LOCK_LIST {
            return fail(libc::E2BIG);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        if r.term > now.saturating_add(TERM_AHEAD_NS) {
            return fail(libc::EINVAL);
        }
        let deadline = tokio::time::Instant::now() + LOCK_WAIT;
        loop {
            let released = self.inode_locks.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.inode_locks.try_lock_all(sid, &gfids) {
                // The session may have ended while this request waited in a queue (a brick
                // resumed after a stall): its cleanup has run, so this grant would be orphaned.
                Ok(()) if !self.live(&sid) => {
                    self.inode_locks.unlock(sid, &gfids);
                    return fail(libc::ENOTCONN);
                }
                Ok(()) => break,
                Err(Refused::TooMany) => return fail(libc::ENOLCK),
                Err(Refused::Busy(holder, g)) => {
                    // Whether or not we wait, the holder should let go soon.
                    self.notify_contended(holder, g);
                    if !r.wait {
                        return fail(libc::EAGAIN);
                    }
                    self.metrics.lock_waits.fetch_add(1, Relaxed);
                    // Wake up now and then: a holder may have died without a notification.
                    let _ = tokio::time::timeout(Duration::from_millis(500), released).await;
                    if tokio::time::Instant::now() > deadline {
                        return fail(libc::EAGAIN);
                    }
                    if !self.live(&sid) {
                        return fail(libc::ENOTCONN);
                    }
                }
            }
        }
        // Nobody may go on trusting a cache of what this session is about to change.
        self.recall(Some(sid), &gfids).await;
        let store = self.store.clone();
        let term = r.term;
        let gf = gfids.clone();
        let res = blocking(move || {
            let mut out = Vec::new();
            let mut refused = 0u64;
            for g in gf {
                let promised = match store.promise(g, term) {
                    // No copy here (deleted, or missed its create): the lock still orders
                    // whoever heals or recreates it.
                    Err(Errno::NOENT) => {
                        out.push(pb::LockedInode {
                            gfid: g.to_vec(),
                            ver: None,
                            promised: 0,
                            pending: false,
                        });
                        continue;
                    }
                    r => r?,
                };
                match promised {
                    Ok(rec) => out.push(pb::LockedInode {
                        gfid: g.to_vec(),
                        ver: Some(pb::Version {
                            term: rec.ver.0,
                            seq: rec.ver.1,
                            id: rec.ver.2,
                        }),
                        promised: rec.promised,
                        pending: rec.pending != 0,
                    }),
                    Err(p) => refused = refused.max(p),
                }
            }
            Ok::<_, Errno>((out, refused))
        })
        .await?;
        match res {
            Ok((inodes, 0)) => Ok(Response::new(pb::LockReply {
                errno: 0,
                inodes,
                promised: 0,
            })),
            // The lock stays granted: the client asks again, at once, with a higher term.
            // Nobody else can raise the promise meanwhile, since that needs this lock.
            Ok((_, promised)) => Ok(Response::new(pb::LockReply {
                errno: libc::ESTALE,
                inodes: vec![],
                promised,
            })),
            Err(e) => {
                self.inode_locks.unlock(sid, &gfids);
                fail(errno(e))
            }
        }
    }

    async fn unlock(
        &self,
        req: Request<pb::UnlockReq>,
    ) -> Result<Response<pb::ErrnoReply>, Status> {
        if req.get_ref().healed {
            self.require_admin(&req, "an unlock as healed")?;
        }
        let r = req.into_inner();
        let sid = session_id(&r.session)?;
        let gfids: Vec<Gfid> = r.gfids.iter().filter_map(|g| Gfid::from_bytes(g)).collect();
        if r.needs_heal || r.healed {
            let store = self.store.clone();
            // Only what this session held (and so healed) leaves the index.
            let gf: Vec<Gfid> = gfids
                .iter()
                .copied()
                .filter(|g| !r.healed || self.inode_locks.holds(sid, *g))
                .collect();
            let healed = r.healed && !r.needs_heal;
            blocking(move || {
                for g in gf {
                    if healed {
                        store.heal_done(g);
                    } else {
                        store.mark_heal(g);
                    }
                }
            })
            .await?;
        }
        if let Some(e) = self.sessions.lock().unwrap().get_mut(&sid) {
            for g in &gfids {
                e.mutated.remove(g);
            }
        }
        self.inode_locks.unlock(sid, &gfids);
        Ok(Response::new(pb::ErrnoReply { errno: 0 }))
    }

    async fn mutate(
        &self,
        req: Request<pb::MutateReq>,
    ) -> Result<Response<pb::MutateReply>, Status> {
        if matches!(req.get_ref().op, Some(pb::mutate_req::Op::SetQuota(_))) {
            self.require_admin(&req, "a quota change")?;
        }
        let r = req.into_inner();
        let sid = session_id(&r.session)?;
        let fail = |e: i32| {
            Ok(Response::new(pb::MutateReply {
                errno: e,
                ..Default::default()
            }))
        };
        let Some(op) = r.op else {
            return fail(libc::EINVAL);
        };
        let Ok(gfids) = r
            .updates
            .iter()
            .map(|u| gfid(&u.gfid))
            .collect::<Result<Vec<_>, _>>()
        else {
            return fail(libc::EINVAL);
        };
        // Fencing: only the session holding every lock may change these inodes.
        if !self.live(&sid) || gfids.iter().any(|g| !self.inode_locks.holds(sid, *g)) {
            return fail(libc::ENOLCK);
        }
        self.metrics.mutations.fetch_add(1, Relaxed);
        if let pb::mutate_req::Op::Write(w) = &op {
            self.metrics
                .written_bytes
                .fetch_add(w.data.len() as u64, Relaxed);
        }
        let store = self.store.clone();
        let created = match &op {
            pb::mutate_req::Op::Create(c) => Gfid::from_bytes(&c.gfid),
            _ => None,
        };
        let opens_new = matches!(&op, pb::mutate_req::Op::Create(c) if c.open);
        let entry_change = matches!(
            &op,
            pb::mutate_req::Op::Create(_)
                | pb::mutate_req::Op::Remove(_)
                | pb::mutate_req::Op::Rename(_)
                | pb::mutate_req::Op::Link(_)
        );
        // A client still on an older volfile does not know every brick (one just added):
        // its change may miss a copy it has never heard of.
        let behind = r.generation < self.volfile.borrow().vol.generation;
        let (updates, needs_heal, now) = (r.updates, r.needs_heal || behind, r.now_ns);
        let changed = gfids.clone();
        // The inodes this change reaches by name are not locked: they are fenced (no new
        // leases) and their leases recalled before it is applied.
        let fence = self.fence_victims(sid, &op).await?;
        let res = blocking(move || {
            if needs_heal {
                gfids.iter().for_each(|g| store.mark_heal(*g));
            }
            if !store.begin_change(&updates)? {
                return Ok(None);
            }
            let die = test_die_mid_write(&op);
            if die == Some(false) {
                std::process::exit(86);
            }
            let mut out = store.apply(&op, now);
            if die == Some(true) {
                std::process::exit(86);
            }
            if out.is_err() {
                // Refused (ENOTEMPTY, EDQUOT, ...): nothing was changed, nothing is pending.
                store.clear_pending(&updates)?;
            }
            let mut dirs = Vec::new();
            if let Ok((attr, _)) = &mut out {
                store.set_versions(&updates, now)?;
                if entry_change {
                    // Every inode of `updates` is a parent whose entries changed.
                    dirs = updates
                        .iter()
                        .filter_map(|u| store.getattr(Gfid::from_bytes(&u.gfid)?).ok())
                        .collect();
                }
                // The reply describes the inode as it is now: at its new version and ctime
                // (else the kernel caches the old ctime after a chmod, chown or truncate).
                if let Some(u) = updates.iter().find(|u| u.gfid == attr.gfid) {
                    attr.ctime_ns = now;
                    attr.ver = u.new;
                }
            }
            Ok::<_, Errno>(Some(out.map(|(a, w)| (a, w, dirs))))
        })
        .await;
        // Applied: others may lease what it reached again (this session too, below).
        drop(fence);
        let res = res?;
        let reply = match res {
            Err(e) => pb::MutateReply {
                errno: errno(e),
                ..Default::default()
            },
            Ok(None) => {
                self.metrics.stale.fetch_add(1, Relaxed);
                pb::MutateReply {
                    stale: true,
                    ..Default::default()
                }
            }
            Ok(Some(Err(e))) => pb::MutateReply {
                errno: errno(e),
                ..Default::default()
            },
            Ok(Some(Ok((attr, written, dirs)))) => {
                let mut leased_gfids = changed.clone();
                leased_gfids.extend(created);
                leased_gfids.extend(Gfid::from_bytes(&attr.gfid));
                leased_gfids.sort();
                leased_gfids.dedup();
                if let (Some(g), true) = (created, opens_new) {
                    let _ = self.note_open(sid, g, false);
                }
                if let Some(g) = created {
                    self.inode_locks.grant_new(sid, g);
                    if !self.live(&sid) {
                        self.inode_locks.unlock(sid, &[g]);
                    }
                }
                if let Some(e) = self.sessions.lock().unwrap().get_mut(&sid) {
                    e.mutated.extend(changed);
                    e.mutated.extend(created);
                }
                pb::MutateReply {
                    errno: 0,
                    stale: false,
                    attr: Some(attr),
                    written,
                    leased: self.grant(sid, &leased_gfids),
                    dirs,
                }
            }
        };
        Ok(Response::new(reply))
    }

    async fn lk(&self, req: Request<pb::LkReq>) -> Result<Response<pb::LkReply>, Status> {
        let r = req.into_inner();
        let sid = session_id(&r.session)?;
        let fail = |e: i32| {
            Ok(Response::new(pb::LkReply {
                errno: e,
                ..Default::default()
            }))
        };
        let Ok(g) = gfid(&r.gfid) else {
            return fail(libc::EINVAL);
        };
        if ![crate::locks::F_RDLCK, crate::locks::F_WRLCK, F_UNLCK].contains(&r.typ)
            || r.end < r.start
        {
            return fail(libc::EINVAL);
        }
        if !self.live(&sid) {
            return fail(libc::ENOTCONN);
        }
        let want = RangeLock {
            session: sid,
            owner: r.owner,
            pid: r.pid,
            typ: r.typ,
            start: r.start,
            end: r.end,
        };
        if r.test {
            let c = self.range_locks.conflict(g, &want);
            return Ok(Response::new(match c {
                Some(c) => pb::LkReply {
                    errno: 0,
                    typ: c.typ,
                    start: c.start,
                    end: c.end,
                    pid: c.pid,
                },
                None => pb::LkReply {
                    errno: 0,
                    typ: F_UNLCK,
                    ..Default::default()
                },
            }));
        }
        loop {
            let changed = self.range_locks.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.range_locks.set(g, want) {
                Ok(()) if !self.live(&sid) => {
                    self.range_locks.release_session(sid);
                    return fail(libc::ENOTCONN);
                }
                Ok(()) => return Ok(Response::new(pb::LkReply::default())),
                Err(_) if !r.wait => return fail(libc::EAGAIN),
                Err(_) => {
                    let _ = tokio::time::timeout(Duration::from_secs(1), changed).await;
                    if !self.live(&sid) {
                        return fail(libc::ENOTCONN);
                    }
                }
            }
        }
    }

    async fn heal(&self, req: Request<pb::HealReq>) -> Result<Response<pb::MutateReply>, Status> {
        self.require_admin(&req, "a heal step")?;
        let r = req.into_inner();
        let sid = session_id(&r.session)?;
        let fail = |e: i32| {
            Ok(Response::new(pb::MutateReply {
                errno: e,
                ..Default::default()
            }))
        };
        let (Ok(g), Some(op)) = (gfid(&r.gfid), r.op) else {
            return fail(libc::EINVAL);
        };
        if !self.live(&sid) || !self.inode_locks.holds(sid, g) {
            return fail(libc::ENOLCK);
        }
        let store = self.store.clone();
        let res = blocking(move || store.heal_step(g, &op, r.ctime_ns)).await?;
        Ok(Response::new(match res {
            Ok(attr) => pb::MutateReply {
                attr: Some(attr),
                ..Default::default()
            },
            Err(e) => pb::MutateReply {
                errno: errno(e),
                ..Default::default()
            },
        }))
    }

    async fn checksums(
        &self,
        req: Request<pb::ChecksumReq>,
    ) -> Result<Response<pb::ChecksumReply>, Status> {
        let r = req.into_inner();
        let store = self.store.clone();
        let res =
            blocking(move || store.checksums(gfid(&r.gfid)?, r.block, r.first, r.max)).await?;
        Ok(Response::new(match res {
            Ok((size, sums)) => pb::ChecksumReply {
                errno: 0,
                size,
                sums,
            },
            Err(e) => pb::ChecksumReply {
                errno: errno(e),
                ..Default::default()
            },
        }))
    }

    async fn heal_index(
        &self,
        req: Request<pb::HealIndexReq>,
    ) -> Result<Response<pb::HealIndexReply>, Status> {
        // Anyone may ask for a heal; only who heals takes entries off or marks split brain.
        if !req.get_ref().remove.is_empty() || !req.get_ref().split_brain.is_empty() {
            self.require_admin(&req, "a heal index change")?;
        }
        let r = req.into_inner();
        if [&r.add, &r.remove, &r.split_brain]
            .iter()
            .any(|l| l.len() > MAX_INDEX_LIST)
        {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_INDEX_LIST} gfids per list"
            )));
        }
        let store = self.store.clone();
        let wake = self.heal_wake.clone();
        let (entries, total) = blocking(move || {
            let parse = |v: &Vec<Vec<u8>>| {
                v.iter()
                    .filter_map(|g| Gfid::from_bytes(g))
                    .collect::<Vec<_>>()
            };
            let added = parse(&r.add);
            for g in &added {
                store.mark_heal(*g);
            }
            for g in parse(&r.split_brain) {
                store.mark_split(g);
            }
            for g in parse(&r.remove) {
                store.heal_done(g);
            }
            if !added.is_empty() {
                wake.notify_one();
            }
            let mut pending = store.heal_pending();
            let total = pending.len() as u64;
            if !r.list {
                return (Vec::new(), total);
            }
            pending.sort();
            let max = if r.max == 0 {
                INDEX_PAGE
            } else {
                r.max.min(INDEX_PAGE)
            } as usize;
            let entries = pending
                .into_iter()
                .filter(|g| g.0.as_slice() > r.after.as_slice())
                .take(max)
                .map(|g| pb::HealIndexEntry {
                    gfid: g.to_vec(),
                    path: store.describe(g),
                    split_brain: store.is_split(g),
                })
                .collect::<Vec<_>>();
            (entries, total)
        })
        .await?;
        Ok(Response::new(pb::HealIndexReply { entries, total }))
    }

    type ManifestStream = BoxStream<pb::ManifestEntry>;

    async fn manifest(
        &self,
        _: Request<pb::Empty>,
    ) -> Result<Response<Self::ManifestStream>, Status> {
        let (tx, rx) = mpsc::channel(256);
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let res = store.manifest(|e| tx.blocking_send(Ok(e)).is_ok());
            if let Err(e) = res {
                let _ = tx.blocking_send(Err(Status::internal(format!("walking the brick: {e}"))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

pub use store::now_ns;
