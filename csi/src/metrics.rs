//! RPC accounting: one log line and one counter per call, and a tiny Prometheus
//! text endpoint (`--metrics-address`). Requests are never logged whole, because several
//! CSI messages carry secrets; callers pass only the volume id and paths.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{Code, Response, Status};

use crate::error::CsiError;

#[derive(Default)]
struct Counts {
    /// (method, grpc code) -> (calls, total seconds)
    calls: BTreeMap<(&'static str, &'static str), (u64, f64)>,
}

fn counts() -> &'static Mutex<Counts> {
    static COUNTS: OnceLock<Mutex<Counts>> = OnceLock::new();
    COUNTS.get_or_init(Default::default)
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::InvalidArgument => "InvalidArgument",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::OutOfRange => "OutOfRange",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::Unavailable => "Unavailable",
        Code::Unimplemented => "Unimplemented",
        Code::ResourceExhausted => "ResourceExhausted",
        _ => "Internal",
    }
}

/// Runs one RPC body: times it, logs the outcome with the volume it concerned, counts
/// it, and converts the typed error into the gRPC status.
pub async fn observe<T>(
    method: &'static str,
    subject: &str,
    body: impl Future<Output = Result<T, CsiError>>,
) -> Result<Response<T>, Status> {
    let start = Instant::now();
    let result = body.await;
    let secs = start.elapsed().as_secs_f64();
    let code = result.as_ref().map_or_else(|e| e.code(), |_| Code::Ok);
    {
        let mut c = counts().lock().unwrap_or_else(|p| p.into_inner());
        let entry = c.calls.entry((method, code_name(code))).or_default();
        entry.0 += 1;
        entry.1 += secs;
    }
    match result {
        Ok(v) => {
            tracing::info!(method, subject, ms = (secs * 1000.0) as u64, "ok");
            Ok(Response::new(v))
        }
        Err(e) => {
            let code = code_name(e.code());
            match e.code() {
                Code::Internal | Code::Unavailable => {
                    tracing::error!(method, subject, code, error = %e, "failed")
                }
                _ => tracing::warn!(method, subject, code, error = %e, "refused"),
            }
            Err(e.into())
        }
    }
}

/// Prometheus text exposition of the counters.
pub fn render() -> String {
    let c = counts().lock().unwrap_or_else(|p| p.into_inner());
    let mut out = String::new();
    out.push_str("# HELP mortar_csi_rpc_total CSI calls by method and gRPC code.\n");
    out.push_str("# TYPE mortar_csi_rpc_total counter\n");
    for ((m, code), (n, _)) in &c.calls {
        out.push_str(&format!(
            "mortar_csi_rpc_total{{method=\"{m}\",code=\"{code}\"}} {n}\n"
        ));
    }
    out.push_str("# HELP mortar_csi_rpc_seconds_total Time spent in CSI calls.\n");
    out.push_str("# TYPE mortar_csi_rpc_seconds_total counter\n");
    for ((m, code), (_, s)) in &c.calls {
        out.push_str(&format!(
            "mortar_csi_rpc_seconds_total{{method=\"{m}\",code=\"{code}\"}} {s}\n"
        ));
    }
    out
}

/// Serves `GET /metrics` over HTTP/1.0-style one-shot connections; enough for a
/// Prometheus scrape without pulling an HTTP stack into the driver.
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", render())
            } else if req.starts_with("GET /healthz") {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "not found\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
