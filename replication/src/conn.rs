//! One connection per brick, with a session stream that carries pings (so a dead or hung
//! brick is noticed within the ping timeout), lock-contention notices and volfile changes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use mortar_proto as pb;
use mortar_proto::brick_client::BrickClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use mortar_common::error::{Error, Result};
use mortar_common::gfid::Gfid;

pub const MAX_MESSAGE: usize = 64 << 20;

#[derive(Clone)]
pub enum ConnState {
    Down(String),
    Up(Up),
}

/// A live connection. `epoch` changes with every reconnect: locks taken under an older
/// epoch died with that session.
#[derive(Clone)]
pub struct Up {
    pub client: BrickClient<Channel>,
    pub session: [u8; 16],
    pub epoch: u64,
}

#[derive(Debug)]
pub enum Event {
    Contended {
        brick: String,
        gfid: Gfid,
    },
    Volfile {
        brick: String,
        generation: u64,
    },
    Up {
        brick: String,
    },
    Down {
        brick: String,
    },
    /// A brick recalled these leases (the cache has dropped them already).
    Recalled {
        gfids: Vec<Gfid>,
    },
}

pub struct Brick {
    pub id: String,
    pub addr: String,
    state: watch::Sender<ConnState>,
    /// Milliseconds; changes when a new volfile generation changes the ping timeout.
    ping_timeout_ms: AtomicU64,
    epochs: AtomicU64,
    stopped: AtomicBool,
    /// This client runs in this brick: heal steps go to it in-process (`Options::local`).
    pub(crate) local: Option<crate::volume::LocalSteps>,
    /// The volume's own client TLS (`Options::tls`); `None`: this process's.
    tls: Option<Arc<ClientTlsConfig>>,
    /// Bytes of data this client has in flight to the brick (see [`Brick::call_sized`]).
    payload: Arc<tokio::sync::Semaphore>,
    /// What this client caches under leases (`None`: it asks for none).
    cache: Option<Arc<crate::lease::Cache>>,
    /// Until when (milliseconds of [`clock_ms`]) the leases of the current connection count.
    lease_until_ms: AtomicU64,
    family: Option<[u8; 16]>,
    /// Bulk-read connections to this brick, for a heal whose sink takes them (`bulk`).
    pub(crate) bulk: crate::bulk::Pool,
}

/// Milliseconds since this process first asked: a monotonic clock for lease deadlines.
fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Bytes of file data one client keeps in flight to one brick: half of what a brick allows
/// a connection (`mortar_brick::budget`), so that a busy client waits here rather than be
/// refused there.
pub const PAYLOAD_IN_FLIGHT: usize = 128 << 20;

/// How long a brick keeps the POSIX locks of a session of a mount that ended without closing,
/// for the mount's next server to take over (see `Hello.lock_hold_ms`): a restarted server
/// is back well within it.
pub const LOCK_HOLD_MS: u64 = 5000;

/// How long one request may take on a brick that answers pings (see [`Brick::call`]).
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(120);

/// An endpoint for the brick at `addr` with client TLS `tls`, or this process's
/// (`mortar_common::tls`) when `None`.
pub fn endpoint(addr: &str, timeout: Duration, tls: Option<&ClientTlsConfig>) -> Result<Endpoint> {
    Ok(mortar_common::tls::brick_endpoint_with(addr, tls)
        .map_err(|e| Error::Volfile(format!("{e:#}")))?
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(timeout / 2)
        .keep_alive_timeout(timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(Some(8 << 20))
        .initial_connection_window_size(Some(32 << 20)))
}

pub fn client(ch: Channel) -> BrickClient<Channel> {
    BrickClient::new(ch)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A one-off connection (for tools): fails within `timeout` if the brick is not there.
pub async fn connect_once(addr: &str, timeout: Duration) -> Result<BrickClient<Channel>> {
    connect_once_with(addr, timeout, None).await
}

/// [`connect_once`] with client TLS `tls`, or this process's when `None`.
pub async fn connect_once_with(
    addr: &str,
    timeout: Duration,
    tls: Option<&ClientTlsConfig>,
) -> Result<BrickClient<Channel>> {
    let ch = endpoint(addr, timeout, tls)?
        .connect()
        .await
        .map_err(|e| Error::Transport {
            brick: addr.to_string(),
            msg: e.to_string(),
        })?;
    Ok(client(ch))
}

impl Brick {
    /// Starts keeping a connection to the brick; events go to `events`. `tls`: the volume's
    /// own client TLS (`None`: this process's).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: String,
        addr: String,
        ping_timeout: Duration,
        client_name: String,
        events: mpsc::UnboundedSender<Event>,
        local: Option<crate::volume::LocalSteps>,
        tls: Option<Arc<ClientTlsConfig>>,
        cache: Option<Arc<crate::lease::Cache>>,
        family: Option<[u8; 16]>,
    ) -> Arc<Brick> {
        let (state, _) = watch::channel(ConnState::Down("connecting".into()));
        let b = Arc::new(Brick {
            id,
            addr,
            state,
            ping_timeout_ms: AtomicU64::new(millis(ping_timeout)),
            epochs: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            local,
            tls,
            payload: Arc::new(tokio::sync::Semaphore::new(PAYLOAD_IN_FLIGHT)),
            cache,
            lease_until_ms: AtomicU64::new(0),
            family,
            bulk: Default::default(),
        });
        let weak = Arc::downgrade(&b);
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            loop {
                let Some(b) = weak.upgrade() else { return };
                if b.stopped.load(Relaxed) {
                    return;
                }
                let why = b.run_session(&client_name, &events).await;
                if b.state.send_replace(ConnState::Down(why.clone())).is_up() {
                    tracing::warn!(brick = %b.id, addr = %b.addr, "brick down: {why}");
                    let _ = events.send(Event::Down {
                        brick: b.id.clone(),
                    });
                    backoff = Duration::from_millis(100);
                }
                drop(b);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        });
        b
    }

    /// How long the brick may stay silent (pings, requests) before it counts as down.
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_millis(self.ping_timeout_ms.load(Relaxed))
    }

    /// Changes the ping timeout: requests use it at once, the ping loop from its next tick,
    /// the connection's HTTP/2 keep-alive from the next reconnect.
    pub fn set_ping_timeout(&self, d: Duration) {
        self.ping_timeout_ms.store(millis(d), Relaxed);
    }

    /// Closes the connection for good (the brick left the volume, or the mount ends).
    pub fn stop(&self) {
        self.stopped.store(true, Relaxed);
        self.state.send_replace(ConnState::Down("stopped".into()));
    }

    /// One connection's life: connect, say hello, ping until it fails.
    async fn run_session(
        &self,
        client_name: &str,
        events: &mpsc::UnboundedSender<Event>,
    ) -> String {
        let mut pt = self.ping_timeout();
        let ch = match endpoint(&self.addr, pt, self.tls.as_deref()) {
            Ok(e) => match e.connect().await {
                Ok(ch) => ch,
                Err(e) => return format!("connect: {e}"),
            },
            Err(e) => return e.to_string(),
        };
        let mut c = client(ch);
        let session = *uuid::Uuid::new_v4().as_bytes();
        let (tx, rx) = mpsc::channel(256);
        let hello = pb::Hello {
            session: session.to_vec(),
            client: client_name.to_string(),
            // The lease window is the ping timeout the connection starts with: the brick
            // keeps a silent client's leases this long after it last heard from it.
            lease_ms: if self.cache.is_some() { millis(pt) } else { 0 },
            family: self.family.map(|f| f.to_vec()).unwrap_or_default(),
            lock_hold_ms: if self.family.is_some() {
                LOCK_HOLD_MS
            } else {
                0
            },
        };
        // When each recent ping went: a lease counts until its window after the send of the
        // last ping answered.
        let mut sent: std::collections::VecDeque<(u64, u64)> = std::collections::VecDeque::new();
        sent.push_back((0, clock_ms()));
        let _ = tx
            .send(pb::SessionIn {
                msg: Some(pb::session_in::Msg::Hello(hello)),
            })
            .await;
        let _ = tx
            .send(pb::SessionIn {
                msg: Some(pb::session_in::Msg::Ping(0)),
            })
            .await;
        let mut inbound = match tokio::time::timeout(pt, c.session(ReceiverStream::new(rx))).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(e)) => return format!("session: {}", e.message()),
            Err(_) => return "session: no answer within the ping timeout".into(),
        };
        match tokio::time::timeout(pt, inbound.message()).await {
            Ok(Ok(Some(_))) => {}
            _ => return "session: no first pong".into(),
        }
        let epoch = self.epochs.fetch_add(1, Relaxed) + 1;
        if self.stopped.load(Relaxed) {
            return "stopped".into();
        }
        let window = pt;
        self.lease_until_ms
            .store(sent[0].1 + lease_ms(window), Relaxed);
        self.state.send_replace(ConnState::Up(Up {
            client: c,
            session,
            epoch,
        }));
        tracing::info!(brick = %self.id, addr = %self.addr, "brick up");
        let _ = events.send(Event::Up {
            brick: self.id.clone(),
        });
        let ping_interval =
            |pt: Duration| tokio::time::interval((pt / 4).max(Duration::from_millis(100)));
        let mut ping = ping_interval(pt);
        let mut last_pong = tokio::time::Instant::now();
        let mut n = 0u64;
        let mut state = self.state.subscribe();
        loop {
            tokio::select! {
                _ = ping.tick() => {
                    let now_pt = self.ping_timeout();
                    if now_pt != pt {
                        // A new volfile changed the ping timeout: ping at the new pace, and
                        // give the brick the new timeout from now before judging it.
                        pt = now_pt;
                        ping = ping_interval(pt);
                        last_pong = tokio::time::Instant::now();
                    }
                    if last_pong.elapsed() > pt {
                        return format!("no answer to pings for {pt:?}");
                    }
                    n += 1;
                    if sent.len() >= 64 {
                        sent.pop_front();
                    }
                    sent.push_back((n, clock_ms()));
                    if tx.try_send(pb::SessionIn { msg: Some(pb::session_in::Msg::Ping(n)) }).is_err() {
                        return "session stream full".into();
                    }
                }
                m = inbound.message() => match m {
                    Ok(Some(out)) => {
                        last_pong = tokio::time::Instant::now();
                        match out.msg {
                            Some(pb::session_out::Msg::Contended(g)) => {
                                if let Some(gfid) = Gfid::from_bytes(&g) {
                                    let _ = events.send(Event::Contended { brick: self.id.clone(), gfid });
                                }
                            }
                            Some(pb::session_out::Msg::VolfileGeneration(generation)) => {
                                let _ = events.send(Event::Volfile { brick: self.id.clone(), generation });
                            }
                            Some(pb::session_out::Msg::Pong(k)) => {
                                if let Some((_, at)) = sent.iter().find(|(i, _)| *i == k) {
                                    self.lease_until_ms.fetch_max(at + lease_ms(window), Relaxed);
                                }
                            }
                            Some(pb::session_out::Msg::Recall(r)) => {
                                // Dropped from the cache before the answer goes: the brick
                                // lets the change go on once it has it.
                                let gfids: Vec<Gfid> = r.gfids.iter().filter_map(|g| Gfid::from_bytes(g)).collect();
                                let open = match &self.cache {
                                    Some(c) => c.recall(&(self.id.clone(), epoch), &gfids),
                                    None => Vec::new(),
                                };
                                let back = pb::SessionIn { msg: Some(pb::session_in::Msg::Returned(pb::Returned {
                                    gfids: r.gfids,
                                    open: open.iter().map(|g| g.to_vec()).collect(),
                                })) };
                                if tx.try_send(back).is_err() {
                                    return "session stream full".into();
                                }
                                let _ = events.send(Event::Recalled { gfids });
                            }
                            None => {}
                        }
                    }
                    Ok(None) => return "session closed by the brick".into(),
                    Err(e) => return format!("session: {}", e.message()),
                },
                r = state.changed() => {
                    // Stopped, or replaced by a newer connection: start over.
                    if r.is_err() || !state.borrow().is_up() {
                        return "marked down".into();
                    }
                }
            }
        }
    }

    pub fn state(&self) -> ConnState {
        self.state.borrow().clone()
    }

    pub fn up(&self) -> Option<Up> {
        match &*self.state.borrow() {
            ConnState::Up(u) => Some(u.clone()),
            ConnState::Down(_) => None,
        }
    }

    pub fn is_up(&self) -> bool {
        self.state.borrow().is_up()
    }

    /// Whether leases granted on connection `epoch` still count (see `lease`).
    pub fn lease_trusted(&self, epoch: u64) -> bool {
        self.up().is_some_and(|u| u.epoch == epoch)
            && clock_ms() < self.lease_until_ms.load(Relaxed)
    }

    /// Waits until the brick is up, at most `d`.
    pub async fn wait_up(&self, d: Duration) -> bool {
        let mut rx = self.state.subscribe();
        tokio::time::timeout(d, rx.wait_for(|s| s.is_up()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    fn transport(&self, msg: impl Into<String>) -> Error {
        Error::Transport {
            brick: self.id.clone(),
            msg: msg.into(),
        }
    }

    /// Runs one request on the live connection. Liveness and a request's own deadline are
    /// separate (GlusterFS's ping-timeout and frame-timeout): the request fails at once when
    /// the brick is found down (a missed ping, a reset connection), but a live brick doing
    /// long work (a large fsync, a slow disk) is given [`FRAME_TIMEOUT`]; running out of it
    /// fails this request only and says nothing about the brick.
    pub async fn call<T, F, Fut>(&self, f: F) -> Result<(T, Up)>
    where
        F: FnOnce(BrickClient<Channel>, Up) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(f, Some(FRAME_TIMEOUT)).await
    }

    /// Like `call`, for a request carrying `bytes` of file data: it waits its turn while this
    /// client has [`PAYLOAD_IN_FLIGHT`] bytes in flight to the brick already.
    pub async fn call_sized<T, F, Fut>(&self, bytes: usize, f: F) -> Result<(T, Up)>
    where
        F: FnOnce(BrickClient<Channel>, Up) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let n = bytes.min(PAYLOAD_IN_FLIGHT) as u32;
        let _permit = self.payload.acquire_many(n).await;
        self.call(f).await
    }

    /// Like `call`, for requests that may rightly wait long (blocking locks): no time limit,
    /// but given up as soon as the brick is down.
    pub async fn call_waiting<T, F, Fut>(&self, f: F) -> Result<(T, Up)>
    where
        F: FnOnce(BrickClient<Channel>, Up) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_within(f, None).await
    }

    async fn call_within<T, F, Fut>(&self, f: F, deadline: Option<Duration>) -> Result<(T, Up)>
    where
        F: FnOnce(BrickClient<Channel>, Up) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let up = self.up().ok_or_else(|| self.transport("not connected"))?;
        let mut rx = self.state.subscribe();
        let epoch = up.epoch;
        let gone = rx.wait_for(|s| !matches!(s, ConnState::Up(u) if u.epoch == epoch));
        let request = f(up.client.clone(), up.clone());
        let timed = async {
            match deadline {
                Some(d) => tokio::time::timeout(d, request).await.ok(),
                None => Some(request.await),
            }
        };
        tokio::select! {
            r = timed => match r {
                Some(Ok(r)) => Ok((r.into_inner(), up)),
                Some(Err(s)) if s.code() == tonic::Code::PermissionDenied => Err(Error::Denied {
                    brick: self.id.clone(),
                    msg: s.message().to_string(),
                }),
                Some(Err(s)) => Err(self.transport(s.message().to_string())),
                None => Err(self.transport(format!("no answer within {:?}", deadline.unwrap_or_default()))),
            },
            _ = gone => Err(self.transport("connection lost")),
        }
    }
}

/// Nine tenths of a lease window: the margin covers the two processes' clocks running at
/// slightly different rates.
fn lease_ms(d: Duration) -> u64 {
    millis(d) * 9 / 10
}

fn millis(d: Duration) -> u64 {
    d.as_millis().try_into().unwrap_or(u64::MAX).max(1)
}

impl ConnState {
    pub fn is_up(&self) -> bool {
        matches!(self, ConnState::Up(_))
    }
}
