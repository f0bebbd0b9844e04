//! The healer's side of bulk reads (`mortar_common::bulk`): a small pool of plain TCP
//! connections per source brick, each request's bytes handed to the sink brick's
//! `splice` hook (`LocalSteps::splice`) without passing through this process's memory.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use mortar_common::bulk::{self, Request};
use mortar_common::gfid::Gfid;

/// Connections kept per source brick (as many as a heal has requests in flight).
const POOL: usize = 8;
/// How long a read or a write on a bulk connection may block: a source that stops sending
/// fails the block, which the healer then copies through gRPC.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// After a failure of the path itself, how long the brick's blocks go through gRPC.
const BACK_OFF: Duration = Duration::from_secs(30);

/// One source brick's bulk connections.
#[derive(Default)]
pub(crate) struct Pool {
    idle: Mutex<Vec<TcpStream>>,
    /// Until when (ms since `epoch()`) this brick is not asked for bulk reads.
    off_until_ms: AtomicU64,
}

fn epoch() -> Instant {
    static E: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *E.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

/// What became of a bulk copy of one block.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Copied {
    /// `n` bytes are in the sink's copy.
    Done(u64),
    /// The source or the sink answered this errno (as its RPC would have).
    Errno(i32),
    /// The path itself failed (no bulk service there, a connection broken midway): copy the
    /// block another way.
    Unavailable,
}

impl Pool {
    pub(crate) fn available(&self) -> bool {
        now_ms() >= self.off_until_ms.load(Relaxed)
    }

    fn connect(addr: &str) -> std::io::Result<TcpStream> {
        let mut last = std::io::Error::other(format!("{addr}: no address"));
        for a in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                Ok(mut s) => {
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(IO_TIMEOUT))?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    s.write_all(bulk::MAGIC)?;
                    return Ok(s);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Copies `len` bytes of `g` from `offset` on the brick at `addr` into the sink with
    /// `into(socket, n)` (which must consume exactly `n` bytes of the socket or fail).
    /// Blocking.
    pub(crate) fn copy(
        &self,
        addr: &str,
        g: Gfid,
        offset: u64,
        len: u32,
        into: impl FnOnce(BorrowedFd<'_>, u32) -> Result<(), i32>,
    ) -> Copied {
        let req = Request {
            gfid: g.0,
            offset,
            len,
        }
        .encode();
        let mut head = [0u8; bulk::REPLY];
        let ask = |s: &mut TcpStream, head: &mut [u8; bulk::REPLY]| {
            s.write_all(&req).and_then(|_| s.read_exact(head))
        };
        // A pooled connection the source has closed meanwhile (idle for `IDLE`, or the
        // source restarted) fails before any byte of the reply: ask again on a new one.
        let pooled = self.idle.lock().unwrap().pop();
        let reused = pooled.and_then(|mut s| ask(&mut s, &mut head).is_ok().then_some(s));
        let s = match reused {
            Some(s) => s,
            None => match Self::connect(addr).and_then(|mut s| ask(&mut s, &mut head).map(|_| s)) {
                Ok(s) => s,
                Err(e) => return self.fail(addr, &e.to_string()),
            },
        };
        let (errno, n) = match bulk::decode_reply(&head, len) {
            Ok(r) => r,
            Err(why) => return self.fail(addr, why),
        };
        if errno != 0 {
            self.put_back(s);
            return Copied::Errno(errno);
        }
        if n > 0
            && let Err(e) = into(s.as_fd(), n)
        {
            // The socket is somewhere inside the body: it cannot be used again.
            return match e {
                // The source stopped sending or closed: the path, not the data, failed.
                libc::EPIPE | libc::EAGAIN | libc::ETIMEDOUT | libc::ECONNRESET => {
                    self.fail(addr, &std::io::Error::from_raw_os_error(e).to_string())
                }
                e => Copied::Errno(e),
            };
        }
        self.put_back(s);
        Copied::Done(n as u64)
    }

    fn put_back(&self, s: TcpStream) {
        let mut idle = self.idle.lock().unwrap();
        if idle.len() < POOL {
            idle.push(s);
        }
    }

    fn fail(&self, addr: &str, why: &str) -> Copied {
        self.off_until_ms
            .store(now_ms() + BACK_OFF.as_millis() as u64, Relaxed);
        self.idle.lock().unwrap().clear();
        tracing::info!(
            brick = addr,
            why,
            "bulk reads unavailable for a while; copying through gRPC"
        );
        Copied::Unavailable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A source that answers one request per connection with `data` and then closes it,
    /// as a brick does with a connection left idle too long.
    fn one_shot_source(data: &'static [u8], conns: usize) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for _ in 0..conns {
                let (mut s, _) = l.accept().unwrap();
                let mut first = [0u8; 8 + bulk::REQUEST];
                s.read_exact(&mut first).unwrap();
                assert_eq!(&first[..8], bulk::MAGIC);
                s.write_all(&bulk::encode_reply(0, data.len() as u32))
                    .unwrap();
                s.write_all(data).unwrap();
            }
        });
        addr
    }

    fn read_into(from: BorrowedFd<'_>, n: u32) -> Result<(), i32> {
        let mut buf = vec![0u8; n as usize];
        let mut s = TcpStream::from(from.try_clone_to_owned().unwrap());
        s.read_exact(&mut buf)
            .map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
        assert_eq!(buf, b"block");
        Ok(())
    }

    #[test]
    fn a_pooled_connection_the_source_closed_is_replaced_not_counted_as_a_failure() {
        let addr = one_shot_source(b"block", 2);
        let pool = Pool::default();
        let g = Gfid([3; 16]);
        assert_eq!(pool.copy(&addr, g, 0, 10, read_into), Copied::Done(5));
        // The source closed that connection after its answer; the pool still holds it.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(pool.copy(&addr, g, 0, 10, read_into), Copied::Done(5));
        assert!(
            pool.available(),
            "no back-off for a stale pooled connection"
        );
    }

    #[test]
    fn a_source_without_the_service_backs_off_to_grpc() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        // Accepts and closes at once, as a TLS brick does with bytes that are not TLS.
        std::thread::spawn(move || drop(l.accept()));
        let pool = Pool::default();
        assert_eq!(
            pool.copy(&addr, Gfid([3; 16]), 0, 10, read_into),
            Copied::Unavailable
        );
        assert!(!pool.available());
    }
}
