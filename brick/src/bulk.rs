//! Both ends of the bulk-read protocol (`mortar_common::bulk`) inside a brick: serving a
//! connection with `sendfile(2)`, and writing what a source sends into a healed copy with
//! `splice(2)`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use mortar_common::bulk::{self, Request};
use mortar_common::gfid::Gfid;
use rustix::io::Errno;

use crate::store::{R, Store};

/// Bulk connections a brick serves at once; more are closed at once (their healer falls
/// back to the `Read` RPC). Each holds a thread while it waits for its next request.
pub const MAX_CONNECTIONS: usize = 32;

/// A bulk connection with no request for this long is closed.
pub const IDLE: Duration = Duration::from_secs(30);

/// Longest a reply's bytes may take to leave (a peer that stops reading is dropped).
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one bulk connection whose magic has been read, until the peer closes it, stays
/// idle for [`IDLE`], or breaks the protocol. Blocking: run it on a thread of its own.
pub fn serve(store: &Store, mut s: TcpStream, metrics: &crate::service::Metrics) {
    let _ = s.set_read_timeout(Some(IDLE));
    let _ = s.set_write_timeout(Some(SEND_TIMEOUT));
    let _ = s.set_nodelay(true);
    let mut req = [0u8; bulk::REQUEST];
    while s.read_exact(&mut req).is_ok() {
        let r = match Request::decode(&req) {
            Ok(r) => r,
            Err(errno) => {
                // A peer that sends a length the protocol forbids gets its errno, then
                // the end of the connection (it may not be speaking this protocol at all).
                let _ = s.write_all(&bulk::encode_reply(errno, 0));
                return;
            }
        };
        match send(store, &s, &r) {
            Ok(n) => {
                metrics.reads.fetch_add(1, Relaxed);
                metrics.read_bytes.fetch_add(n, Relaxed);
                metrics.bulk_bytes.fetch_add(n, Relaxed)
            }
            Err(Sent::Refused(e)) => {
                if s.write_all(&bulk::encode_reply(e.raw_os_error(), 0))
                    .is_err()
                {
                    return;
                }
                0
            }
            Err(Sent::Broken) => return,
        };
    }
}

enum Sent {
    /// Nothing was sent: the errno goes in the reply.
    Refused(Errno),
    /// The connection cannot go on (the header went, the bytes did not).
    Broken,
}

/// Sends the reply to `r`: its header, then the file's bytes straight from the page cache.
fn send(store: &Store, s: &TcpStream, r: &Request) -> Result<u64, Sent> {
    let g = Gfid::from_bytes(&r.gfid).ok_or(Sent::Refused(Errno::INVAL))?;
    let fd = store.file(g).map_err(Sent::Refused)?;
    let size = rustix::fs::fstat(&*fd).map_err(Sent::Refused)?.st_size as u64;
    let n = size.saturating_sub(r.offset).min(r.len as u64);
    (&*s)
        .write_all(&bulk::encode_reply(0, n as u32))
        .map_err(|_| Sent::Broken)?;
    let mut off = r.offset as libc::off_t;
    let end = r.offset + n;
    while (off as u64) < end {
        let left = (end - off as u64) as usize;
        // SAFETY: sendfile(2) between two open descriptors; `off` is ours.
        let k = unsafe { libc::sendfile(s.as_raw_fd(), fd.as_raw_fd(), &mut off, left) };
        match k {
            k if k > 0 => {}
            // The file shrank under the read: the promised count cannot be kept.
            0 => return Err(Sent::Broken),
            _ if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted => {}
            _ => return Err(Sent::Broken),
        }
    }
    Ok(n)
}

/// Counts the bulk connections being served; a slot is released when dropped.
#[derive(Default)]
pub struct Slots(std::sync::atomic::AtomicUsize);

pub struct Slot(Arc<Slots>);

impl Slots {
    pub fn take(self: &Arc<Self>) -> Option<Slot> {
        let n = self.0.fetch_add(1, Relaxed);
        if n >= MAX_CONNECTIONS {
            self.0.fetch_sub(1, Relaxed);
            return None;
        }
        Some(Slot(self.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Relaxed);
    }
}

fn pipe() -> R<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2(2) fills `fds` with two new descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO));
    }
    // SAFETY: just created, owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A pipe as large as a heal's block, so that one splice moves a block (a hint: the
    // default 64 KiB works, in more calls).
    // SAFETY: fcntl on our own pipe.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
    Ok((r, w))
}

/// One splice(2) of up to `len` bytes from `from` to `to` (at `*at` of `to` if given),
/// retried when interrupted; how many moved (0: `from` is at its end).
fn splice(from: i32, to: i32, at: Option<&mut libc::loff_t>, len: usize) -> R<usize> {
    let at = at.map_or(std::ptr::null_mut(), |a| a as *mut libc::loff_t);
    loop {
        // SAFETY: splice(2) between descriptors the caller holds; `at`, when set, points to
        // the caller's offset, which the kernel advances.
        let k = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                at,
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_MORE,
            )
        };
        if k >= 0 {
            return Ok(k as usize);
        }
        match last_errno() {
            Errno::INTR => {}
            e => return Err(e),
        }
    }
}

fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::IO)
}

impl Store {
    /// A heal's write of `n` bytes at `offset` into this brick's copy of `g`, taken from the
    /// socket `from` (the body of a bulk reply): socket to pipe to file, no copy through
    /// user space. The same step as `HealReq` `Write`, write-back started at once.
    /// Blocking; `from` keeps its read timeout, so a source that stops sending fails it.
    pub fn heal_splice(&self, g: Gfid, offset: u64, n: u32, from: BorrowedFd<'_>) -> R<()> {
        let fd = self.file(g)?;
        let (rp, wp) = pipe()?;
        let (mut left, mut at) = (n as usize, offset as libc::loff_t);
        while left > 0 {
            let k = splice(from.as_raw_fd(), wp.as_raw_fd(), None, left)?;
            if k == 0 {
                // The source closed before sending what it announced.
                return Err(Errno::PIPE);
            }
            let mut in_pipe = k;
            while in_pipe > 0 {
                match splice(rp.as_raw_fd(), fd.as_raw_fd(), Some(&mut at), in_pipe)? {
                    0 => return Err(Errno::IO),
                    w => in_pipe -= w,
                }
            }
            left -= k;
        }
        // As the RPC's write does: the disk starts on it now (see `heal_step`).
        // SAFETY: sync_file_range(2) on an open fd.
        unsafe {
            libc::sync_file_range(
                fd.as_fd().as_raw_fd(),
                offset as i64,
                n as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        Ok(())
    }
}

/// Whether the connection starts with the bulk magic: peeks, without taking anything, until
/// the first bytes differ from it (gRPC's preface differs at the first byte) or all of it
/// is there. A peer that sends nothing for 10 s is handed to gRPC, which deals with it.
async fn starts_bulk(s: &tokio::net::TcpStream) -> bool {
    let mut b = [0u8; 8];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.peek(&mut b)).await {
            Ok(Ok(n)) if n > 0 && b[..n] == bulk::MAGIC[..n] => {
                if n == b.len() {
                    return true;
                }
                // Part of the magic so far: the rest is on its way.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            _ => return false,
        }
    }
}

/// The connections of a plain-TCP brick's port: bulk ones are served here, on threads of
/// their own (at most [`MAX_CONNECTIONS`]); every other one is passed on to gRPC.
pub fn split(
    listener: tokio::net::TcpListener,
    store: Arc<Store>,
    metrics: Arc<crate::service::Metrics>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio::net::TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let slots = Arc::new(Slots::default());
    tokio::spawn(async move {
        loop {
            let s = match listener.accept().await {
                Ok((s, _)) => s,
                // Out of descriptors and the like: tonic's own accept loop waits too.
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = s.set_nodelay(true);
            let (tx, store, metrics, slots) =
                (tx.clone(), store.clone(), metrics.clone(), slots.clone());
            tokio::spawn(async move {
                if !starts_bulk(&s).await {
                    let _ = tx.send(Ok(s)).await;
                    return;
                }
                let Some(slot) = slots.take() else {
                    tracing::info!("too many bulk connections: one refused");
                    return;
                };
                let Ok(s) = s.into_std() else { return };
                let _ = tokio::task::spawn_blocking(move || {
                    let _slot = slot;
                    let mut s = s;
                    if s.set_nonblocking(false).is_err() {
                        return;
                    }
                    let mut magic = [0u8; 8];
                    if s.read_exact(&mut magic).is_ok() {
                        serve(&store, s, &metrics);
                    }
                })
                .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
