//! A cap on the bytes of requests one connection has in flight.
//!
//! A request's message is decoded whole before its handler runs, and stays in memory until
//! the handler answers. Without a cap, one peer could send thousands of large writes at once
//! (HTTP/2 allows hundreds of streams per connection, each message up to the decoding limit)
//! and make the brick hold gigabytes. Each connection (one client session) gets a budget of
//! bytes; a request takes its message's declared length from it when its first bytes arrive,
//! and gives it back when its answer is ready.
//!
//! A request over budget is refused at once with RESOURCE_EXHAUSTED, not held: a held
//! request keeps its unread data in the connection's flow-control window, and enough of them
//! would starve the very requests holding the budget. The client library keeps half as much
//! file data in flight per brick and waits on its side beyond that
//! (`mortar_replication::conn::Brick::call_sized`), so only a hostile or broken peer is refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

use http_body::{Body as _, Frame};
use mortar_proto::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The start of a refusal's message.
pub const OVER_BUDGET: &str = "over the connection's in-flight budget";

/// Bytes of requests one connection may have in flight.
pub const PER_CONNECTION: usize = 256 << 20;

/// The budgets of the connections with requests in flight, by peer address.
#[derive(Clone)]
pub struct Budgets {
    limit: usize,
    conns: Arc<Mutex<HashMap<SocketAddr, Weak<Semaphore>>>>,
}

impl Budgets {
    pub fn new(limit: usize) -> Budgets {
        Budgets {
            limit,
            conns: Default::default(),
        }
    }

    /// The budget of the connection from `peer`. It lives as long as a request holds part of
    /// it: a connection with nothing in flight has nothing to remember.
    fn of(&self, peer: SocketAddr) -> Arc<Semaphore> {
        let mut conns = self.conns.lock().unwrap();
        if let Some(s) = conns.get(&peer).and_then(Weak::upgrade) {
            return s;
        }
        if conns.len() >= 1024 {
            conns.retain(|_, w| w.strong_count() > 0);
        }
        let s = Arc::new(Semaphore::new(self.limit));
        conns.insert(peer, Arc::downgrade(&s));
        s
    }

    /// Takes `bytes` from `peer`'s budget, or says no.
    fn take(&self, peer: SocketAddr, bytes: usize) -> Option<OwnedSemaphorePermit> {
        let n = u32::try_from(bytes.max(1)).ok()?;
        self.of(peer).try_acquire_many_owned(n).ok()
    }
}

impl<S> tower::Layer<S> for Budgets {
    type Service = Budgeted<S>;
    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted {
            inner,
            budgets: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Budgeted<S> {
    inner: S,
    budgets: Budgets,
}

fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|t| t.get_ref().remote_addr())
        .or_else(|| ext.get::<TcpConnectInfo>().and_then(|t| t.remote_addr()))
}

impl<S> tower::Service<http::Request<Body>> for Budgeted<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The clone is not ready; the one that was polled ready serves this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(peer) = peer_of(&req) else {
            // In-process requests (a brick's own heal steps) have no connection.
            return Box::pin(inner.call(req));
        };
        let budgets = self.budgets.clone();
        Box::pin(async move {
            let (parts, mut body) = req.into_parts();
            // A gRPC message starts with a flag byte and its length (4 bytes, big-endian).
            let mut head: Vec<Frame<Bytes>> = Vec::new();
            let mut have = 0usize;
            let mut ended = false;
            while have < 5 && !ended {
                match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    Some(Ok(f)) => {
                        have += f.data_ref().map_or(0, |d| d.len());
                        head.push(f);
                    }
                    // Handed on: the handler sees the broken stream as it would have.
                    Some(Err(e)) => {
                        let rest = Prefixed::new(head, Body::new(Failed(Some(e))));
                        return inner
                            .call(http::Request::from_parts(parts, Body::new(rest)))
                            .await;
                    }
                    None => ended = true,
                }
            }
            let mut prefix = [0u8; 5];
            let mut at = 0;
            for d in head.iter().filter_map(|f| f.data_ref()) {
                let n = d.len().min(5 - at);
                prefix[at..at + n].copy_from_slice(&d[..n]);
                at += n;
            }
            let declared = if at == 5 {
                u32::from_be_bytes(prefix[1..5].try_into().unwrap()) as usize
            } else {
                0
            };
            let Some(permit) = budgets.take(peer, declared) else {
                tracing::debug!(%peer, bytes = declared, "request over its connection's budget");
                return Ok(tonic::Status::resource_exhausted(format!(
                    "{OVER_BUDGET}: {declared} bytes on top of what this connection has in flight"
                ))
                .into_http());
            };
            let body = Body::new(Prefixed::new(head, body));
            let resp = inner.call(http::Request::from_parts(parts, body)).await;
            drop(permit);
            resp
        })
    }
}

/// A body whose first frames were read already.
struct Prefixed {
    head: std::collections::VecDeque<Frame<Bytes>>,
    rest: Body,
}

impl Prefixed {
    fn new(head: Vec<Frame<Bytes>>, rest: Body) -> Prefixed {
        Prefixed {
            head: head.into(),
            rest,
        }
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(f) = self.head.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_empty() && self.rest.is_end_stream()
    }
}

/// A body that fails with the error its stream had.
struct Failed(Option<tonic::Status>);

impl http_body::Body for Failed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        Poll::Ready(self.0.take().map(Err))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_cannot_take_more_than_its_budget_and_gets_it_back() {
        let b = Budgets::new(100);
        let (p1, p2): (SocketAddr, SocketAddr) = (
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
        );
        let a = b.take(p1, 60).expect("within budget");
        assert!(b.take(p1, 60).is_none(), "60 + 60 > 100");
        assert!(
            b.take(p2, 60).is_some(),
            "another connection has its own budget"
        );
        let c = b.take(p1, 40).expect("exactly the rest");
        drop(a);
        assert!(b.take(p1, 60).is_some(), "given back when answered");
        drop(c);
        assert!(
            b.take(p1, 101).is_none(),
            "one request over the whole budget"
        );
        assert!(b.take(p1, usize::MAX).is_none());
    }
}
