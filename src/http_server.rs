//! The HTTP/1.1 accept loop: bounded connections, header-read and idle timeouts, a lingering
//! close, and a raised descriptor limit.
//!
//! `axum::serve` keeps every connection it accepts for as long as the client likes: idle and
//! slowloris connections were never closed, and at a 1024-descriptor limit 1,100 idle connections
//! stopped `/healthz` and every new session (`accept error: Too many open files`). Here:
//!
//! * at most [`HttpSettings::max_connections`] connections are served; one more is answered
//!   `503` + `Retry-After` and closed at once (a cheap static response, no descriptor kept);
//! * hyper's header-read timeout closes a connection whose request head does not arrive in
//!   [`HttpSettings::header_read_timeout_secs`] (slowloris);
//! * a connection with no request in flight and no bytes either way for
//!   [`HttpSettings::idle_timeout_secs`] is closed (idle keep-alive, never-speaking clients);
//! * when hyper ends a connection, its write side is shut down and up to [`LINGER_BYTES`] of
//!   what the client is still sending are read and discarded for at most [`LINGER_TIME`] before
//!   the close, so a client that sent an oversized body reads its `413` instead of a reset
//!   (an early close with unread data makes the kernel send RST, which discards the response);
//! * [`raise_descriptor_limit`] lifts the soft `RLIMIT_NOFILE` to the hard limit at start, and
//!   accept errors (descriptor exhaustion) back off instead of spinning.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, oneshot, watch};
use tower::ServiceExt;

use crate::config::ConfigError;

/// Most bytes read and discarded after a connection ends (1 MiB).
pub const LINGER_BYTES: usize = 1024 * 1024;
/// Longest a closing connection is drained.
pub const LINGER_TIME: Duration = Duration::from_secs(2);
/// Counter of connections refused at the cap.
pub const CONNECTIONS_REFUSED: &str = "kotodama_http_connections_refused_total";
/// The answer to a connection over the cap.
const OVER_CAPACITY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/problem+json\r\n\
Content-Length: 95\r\nConnection: close\r\n\r\n{\"type\":\"about:blank\",\"title\":\"Service Unavailable\",\"status\":503,\"code\":\"too_many_connections\"}";

/// `[http]`: limits of the HTTP server.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    /// Concurrent connections served (`KOTODAMA_HTTP_MAX_CONNECTIONS`); more get 503. Default 2048.
    pub max_connections: usize,
    /// Seconds a client has to send a request head (`KOTODAMA_HTTP_HEADER_TIMEOUT_SECS`). Default 10.
    pub header_read_timeout_secs: u64,
    /// Seconds a connection may sit with no request and no traffic (`KOTODAMA_HTTP_IDLE_TIMEOUT_SECS`).
    /// Default 30.
    pub idle_timeout_secs: u64,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self { max_connections: 2048, header_read_timeout_secs: 10, idle_timeout_secs: 30 }
    }
}

impl HttpSettings {
    /// Apply `KOTODAMA_HTTP_*` overrides read through `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let number = |key: &str| -> Result<Option<u64>, ConfigError> {
            match get(key).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).map_err(|_| ConfigError {
                    key: key.to_owned(),
                    problem: format!("`{v}` is not a whole number"),
                    fix: "use e.g. 2048 (connections) or 10 (seconds)".to_owned(),
                }),
            }
        };
        if let Some(n) = number("KOTODAMA_HTTP_MAX_CONNECTIONS")? {
            self.max_connections = n as usize;
        }
        if let Some(n) = number("KOTODAMA_HTTP_HEADER_TIMEOUT_SECS")? {
            self.header_read_timeout_secs = n;
        }
        if let Some(n) = number("KOTODAMA_HTTP_IDLE_TIMEOUT_SECS")? {
            self.idle_timeout_secs = n;
        }
        Ok(())
    }

    /// Ranges: 1..=1,000,000 connections, 1..=600 s each timeout.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad =
            |key: &str, problem: String, fix: &str| ConfigError { key: key.to_owned(), problem, fix: fix.to_owned() };
        if !(1..=1_000_000).contains(&self.max_connections) {
            return Err(bad(
                "http.max_connections",
                format!("{} is out of range", self.max_connections),
                "use 1..=1000000 (each connection holds a file descriptor)",
            ));
        }
        for (key, v) in [
            ("http.header_read_timeout_secs", self.header_read_timeout_secs),
            ("http.idle_timeout_secs", self.idle_timeout_secs),
        ] {
            if !(1..=600).contains(&v) {
                return Err(bad(key, format!("{v} s is out of range"), "use 1..=600 seconds"));
            }
        }
        Ok(())
    }
}

/// Raise the soft descriptor limit to the hard one; returns (before, after) when it changed.
pub fn raise_descriptor_limit() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call; getrlimit only
    // writes into it.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 || lim.rlim_cur >= lim.rlim_max {
        return None;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: `lim` is a valid rlimit read from the kernel with only the soft limit raised to
    // the hard one, which an unprivileged process may always do.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return None;
    }
    Some((before, lim.rlim_cur))
}

/// Serve `app` on `listener` until `shutdown` fires, then let the open connections finish
/// (bounded by 5 s).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    settings: HttpSettings,
    shutdown: oneshot::Receiver<()>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE/ENFILE and friends: back off and say so, at most every 10 s.
                    if last_accept_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "accept failed (descriptor limit?); backing off");
                        last_accept_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            metrics::counter!(CONNECTIONS_REFUSED).increment(1);
            let _ = stream.try_write(OVER_CAPACITY);
            continue;
        };
        let (app, settings, stop) = (app.clone(), settings.clone(), stop_rx.clone());
        tokio::spawn(async move {
            serve_connection(stream, peer, app, &settings, stop).await;
            drop(permit);
        });
    }
    let _ = stop_tx.send(true);
    let all = u32::try_from(settings.max_connections).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(Duration::from_secs(5), slots.acquire_many(all)).await;
    Ok(())
}

/// Activity of one connection: the last byte either way, and requests in flight.
struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        self.last_ms.store(self.origin.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves once the connection has been idle (no request, no bytes) for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            if self.in_flight.load(Ordering::Relaxed) == 0 && last.elapsed() >= idle {
                return;
            }
            let wake = if self.in_flight.load(Ordering::Relaxed) > 0 { Instant::now() + idle } else { last + idle };
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

/// Decrements the in-flight count when a request's handler finishes.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    settings: &HttpSettings,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let activity =
        Arc::new(Activity { origin: Instant::now(), last_ms: AtomicU64::new(0), in_flight: AtomicUsize::new(0) });
    let io = TokioIo::new(Tracked { inner: Some(stream), activity: Arc::clone(&activity) });
    let counter = Arc::clone(&activity);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        counter.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(Arc::clone(&counter));
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        Box::pin(async move {
            let _guard = guard;
            app.oneshot(req.map(Body::new)).await
        }) as Pin<Box<dyn Future<Output = Result<axum::response::Response, Infallible>> + Send>>
    });
    // With upgrades: a WebSocket handshake (`/v1/sessions/{id}/ws`, `/ws/{character}`) hands the
    // connection to its handler; the connection future then completes and the socket lives on
    // in the upgraded stream (which keeps its own liveness checks).
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(settings.header_read_timeout_secs))
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let idle = Duration::from_secs(settings.idle_timeout_secs);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = activity.idle_for(idle) => return,
            changed = stop.changed(), if !shutting_down => {
                if changed.is_err() || *stop.borrow() {
                    shutting_down = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Shut the write side, then read and drop what the client still sends (bounded), so it reads
/// the response instead of a reset.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buf = [0u8; 8192];
        let mut left = LINGER_BYTES;
        while left > 0 {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// A stream that records when bytes last moved, and lingers when dropped (the connection is
/// done, or an upgraded WebSocket ended): the client reads our last response, not a reset.
struct Tracked {
    /// Always `Some` until dropped (taken by the lingering close).
    inner: Option<TcpStream>,
    activity: Arc<Activity>,
}

impl Tracked {
    fn stream(&mut self) -> &mut TcpStream {
        self.inner.as_mut().expect("taken only in drop")
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(stream) = self.inner.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(linger(stream));
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(self.stream()).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(self.stream()).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.stream()).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.stream()).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_from_env_and_validation_name_the_key() {
        let mut s = HttpSettings::default();
        s.apply_env(|k| (k == "KOTODAMA_HTTP_MAX_CONNECTIONS").then(|| "64".to_owned())).unwrap();
        assert_eq!(s.max_connections, 64);
        let e = s.apply_env(|k| (k == "KOTODAMA_HTTP_IDLE_TIMEOUT_SECS").then(|| "soon".to_owned())).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_HTTP_IDLE_TIMEOUT_SECS");
        s.header_read_timeout_secs = 0;
        assert_eq!(s.validate().unwrap_err().key, "http.header_read_timeout_secs");
    }

    #[test]
    fn the_over_capacity_answer_is_a_complete_response() {
        let text = std::str::from_utf8(OVER_CAPACITY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("Content-Length: {}", body.len())), "{head}");
        assert!(serde_json::from_str::<serde_json::Value>(body).is_ok());
    }
}
