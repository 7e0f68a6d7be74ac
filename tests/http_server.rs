//! The HTTP server closes what it should and stays reachable (issue 12, kind 8): idle and
//! slowloris connections are closed by their timeouts, connections over the cap get a 503 at once
//! (and `/healthz` answers again once the idle ones are gone), and a client that sends an
//! oversized body reads its 413 instead of a connection reset.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn limited() -> TestServer {
    TestServer::start_with(|c| {
        c.http.max_connections = 20;
        c.http.header_read_timeout_secs = 1;
        c.http.idle_timeout_secs = 1;
    })
    .await
}

/// `n` connections to `ts` that send nothing.
async fn connections(ts: &TestServer, n: usize) -> Vec<TcpStream> {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        open.push(TcpStream::connect(ts.addr()).await.unwrap());
    }
    open
}

/// Reads until EOF or error; returns what was read and whether the peer closed within `within`.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (got, closed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_connections_are_closed() {
    let ts = limited().await;
    let mut idle = connections(&ts, 10).await;
    // Slowloris: a request head one header line at a time, never finished.
    let mut slow = TcpStream::connect(ts.addr()).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let started = Instant::now();
    let dribble = async {
        for i in 0..40 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if slow.write_all(format!("X-Slow-{i}: y\r\n").as_bytes()).await.is_err() {
                return started.elapsed();
            }
        }
        started.elapsed()
    };
    let slow_closed_after = dribble.await;
    assert!(slow_closed_after < Duration::from_secs(5), "slowloris kept for {slow_closed_after:?}");
    for (i, s) in idle.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(s, Duration::from_secs(3)).await;
        assert!(closed, "idle connection {i} still open");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_get_503_and_healthz_recovers() {
    let ts = limited().await;
    let held = connections(&ts, 20).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(ts.addr()).await.unwrap();
    let (answer, closed) = read_until_closed(&mut extra, Duration::from_secs(2)).await;
    let text = String::from_utf8_lossy(&answer);
    assert!(closed && text.starts_with("HTTP/1.1 503"), "over the cap: {text:?}");
    assert!(text.contains("Retry-After:"), "{text}");
    // The idle ones time out; the server answers again without anyone closing them.
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let res = ts.http.get(format!("{}/healthz", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 200);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_offer_body_gets_a_413_the_client_can_read() {
    let ts = TestServer::start().await;
    let (_, token, offer_url) = ts.create_session().await;
    let body = vec![b'a'; 512 * 1024];
    for declared in [true, false] {
        let mut s = TcpStream::connect(ts.addr()).await.unwrap();
        let length = if declared {
            format!("Content-Length: {}\r\n", body.len())
        } else {
            "Transfer-Encoding: chunked\r\n".into()
        };
        let head = format!(
            "POST {offer_url} HTTP/1.1\r\nHost: x\r\nContent-Type: application/sdp\r\nAuthorization: Bearer {token}\r\n{length}\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // Send the whole body whatever the server does meanwhile (a real client does).
        let sent = if declared {
            s.write_all(&body).await
        } else {
            let mut r = Ok(());
            for chunk in body.chunks(16 * 1024) {
                r = s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes()).await;
                r = r.and(s.write_all(chunk).await);
                r = r.and(s.write_all(b"\r\n").await);
                if r.is_err() {
                    break;
                }
            }
            r.and(s.write_all(b"0\r\n\r\n").await)
        };
        let (answer, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 413"), "declared={declared} (send: {sent:?}): {text:?}");
        assert!(text.contains("body_too_large"), "a problem+json body: {text}");
    }
}
