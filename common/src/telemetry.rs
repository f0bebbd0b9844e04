//! Logs and metrics shared by every Mortar daemon.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

pub const LOG_DIR: &str = "/var/log/mortar";

/// One line per event, each carrying the daemon's identity (brick id or mount point), so
/// that logs of many daemons can be merged and still be read.
struct Tagged {
    tag: String,
}

impl<S, N> FormatEvent<S, N> for Tagged
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut w: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        SystemTime.format_time(&mut w)?;
        let meta = event.metadata();
        write!(w, " {:5} [{}] {}: ", meta.level(), self.tag, meta.target())?;
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// The file a daemon logs to under /var/log/mortar, named after what it serves.
pub fn default_log_file(kind: &str, name: &str) -> PathBuf {
    let clean: String = name
        .trim_matches('/')
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    Path::new(LOG_DIR).join(format!("{kind}-{clean}.log"))
}

/// Logs to stderr and, if given, appended to `file` (only there when `quiet`: a daemon's
/// stderr is gone once it detaches).
pub fn init_logging(
    tag: &str,
    level: &str,
    file: Option<&Path>,
    quiet: bool,
) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .event_format(Tagged {
            tag: tag.to_string(),
        });
    match file {
        Some(path) => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("log file {}: {e}", path.display()))?;
            let f = std::sync::Mutex::new(f);
            if quiet {
                builder.with_writer(f).init();
            } else {
                builder.with_writer(std::io::stderr.and(f)).init();
            }
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
    Ok(())
}

/// Logs to stderr as one JSON object per line (for the operator, whose logs go to a
/// cluster's log pipeline).
pub fn init_json_logging(level: &str) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .map_err(|e| anyhow::anyhow!("--log-level {level:?}: {e}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .json()
        .init();
    Ok(())
}

/// Serves `/metrics` (Prometheus text format) and `/healthz` over plain HTTP/1.
pub async fn serve_metrics(
    addr: std::net::SocketAddr,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let render = render.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut n = 0;
                while n < buf.len() {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                    if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, body) = match path {
                    "/metrics" => ("200 OK", render()),
                    "/healthz" => ("200 OK", "ok\n".to_string()),
                    _ => ("404 Not Found", "not found\n".to_string()),
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Formats one Prometheus sample line with its HELP/TYPE header.
pub fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: impl fmt::Display) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Lets a repeated warning through at most once per period, counting what it held back, so a
/// pod hammering its quota cannot fill the disk with the same line.
pub struct RateLimit {
    period_ms: u64,
    /// Milliseconds since the process started at the last line let through (0: never).
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl RateLimit {
    pub const fn new(period: std::time::Duration) -> Self {
        RateLimit {
            period_ms: period.as_millis() as u64,
            last: std::sync::atomic::AtomicU64::new(0),
            suppressed: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// `Some(n)` when this occurrence may be logged, `n` being how many were held back since
    /// the last one; `None` when it is to be dropped.
    pub fn allow(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let now = START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_millis() as u64
            + 1;
        let last = self.last.load(Relaxed);
        if last != 0 && now < last + self.period_ms
            || self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_err()
        {
            self.suppressed.fetch_add(1, Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Relaxed))
    }
}

#[cfg(test)]
mod rate_limit_tests {
    use super::RateLimit;
    use std::time::Duration;

    #[test]
    fn lets_one_through_per_period_and_counts_the_rest() {
        let r = RateLimit::new(Duration::from_millis(200));
        assert_eq!(r.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(r.allow(), None);
        }
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(r.allow(), Some(1000));
        assert_eq!(r.allow(), None);
    }
}

/// Requests served, by method, and how long each took: the figures that say how many round
/// trips an operation costs and where its time goes (`bench/rpcs.sh` reads them).
pub struct RpcStats {
    registry: prometheus_client::registry::Registry,
    /// Its `_count` is the number of requests; no counter of its own is needed.
    seconds: prometheus_client::metrics::family::Family<
        RpcLabels,
        prometheus_client::metrics::histogram::Histogram,
        fn() -> prometheus_client::metrics::histogram::Histogram,
    >,
    known: std::sync::Mutex<std::collections::HashSet<String>>,
}

const MAX_METHODS: usize = 64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
}

fn rpc_histogram() -> prometheus_client::metrics::histogram::Histogram {
    // 10 µs .. ~1.3 s: a lookup on tmpfs takes tens of microseconds, a large fsync seconds.
    prometheus_client::metrics::histogram::Histogram::new(
        prometheus_client::metrics::histogram::exponential_buckets(1e-5, 2.0, 18),
    )
}

impl RpcStats {
    /// `prefix` names the server (`mortar_brick`); `labels` are added to every sample (the
    /// brick's id).
    pub fn new(prefix: &str, labels: &[(&str, &str)]) -> RpcStats {
        let mut registry = prometheus_client::registry::Registry::with_prefix_and_labels(
            prefix,
            labels.iter().map(|(k, v)| {
                (
                    std::borrow::Cow::Owned(k.to_string()),
                    std::borrow::Cow::Owned(v.to_string()),
                )
            }),
        );
        let seconds = prometheus_client::metrics::family::Family::new_with_constructor(
            rpc_histogram as fn() -> _,
        );
        registry.register(
            "rpc_seconds",
            "Requests served, by method (_count), and the time from each one's arrival to its answer",
            seconds.clone(),
        );
        RpcStats {
            registry,
            seconds,
            known: Default::default(),
        }
    }

    /// Counts one request of `method` (the last part of its gRPC path) that took `secs`.
    /// The path comes from the peer: past a few dozen names, the rest count as "other", so
    /// that a peer making up paths cannot grow the figures without bound.
    pub fn observe(&self, method: &str, secs: f64) {
        let mut method = method.to_string();
        {
            let mut known = self.known.lock().unwrap();
            if !known.contains(&method) {
                if known.len() < MAX_METHODS {
                    known.insert(method.clone());
                } else {
                    method = "other".to_string();
                }
            }
        }
        self.seconds
            .get_or_create(&RpcLabels { method })
            .observe(secs);
    }

    /// The Prometheus text of these figures (without the closing `# EOF`, so that it can be
    /// appended to other samples).
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode_registry(&mut out, &self.registry);
        out
    }
}
