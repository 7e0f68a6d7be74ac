//! How sessions end other than by DELETE: maximum duration, the peer going away, never connecting,
//! and the server draining. Each ends exactly once, with its reason, and frees the session.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

async fn wait_ended(ts: &TestServer, id: &str, token: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let v: Value = ts.session_json(id, token).await;
        if v["state"] == "ended" {
            return v;
        }
        assert!(Instant::now() < deadline, "session did not end within {within:?}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A session on `ts` with a connected client that got `session.ready`: (id, token, client).
async fn ready_session(ts: &TestServer) -> (String, String, TestClient) {
    let (id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(5), |e| e["type"] == "session.ready").await;
    (id, token, client)
}

/// The session ends with `reason` (as stored, within `within`) and the client hears
/// `session.ended` with that reason.
async fn ended_with(ts: &TestServer, client: &TestClient, id: &str, token: &str, within: Duration, reason: &str) {
    let v = wait_ended(ts, id, token, within).await;
    assert_eq!(v["end_reason"], reason, "{v}");
    client
        .wait_event("session.ended", Duration::from_secs(2), |e| e["type"] == "session.ended" && e["reason"] == reason)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_at_its_maximum_duration() {
    let ts = TestServer::start_with(|c| c.session.max_duration_secs = 2).await;
    let (id, token, client) = ready_session(&ts).await;
    ended_with(&ts, &client, &id, &token, Duration::from_secs(10), "max_duration").await;
    assert_eq!(ts.server.manager().live_count(), 0);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_the_client_closes_its_peer() {
    let ts = TestServer::start_with(|c| c.session.peer_timeout_secs = 6).await;
    let (id, token, client) = ready_session(&ts).await;
    let connected: Value = ts.session_json(&id, &token).await;
    assert_eq!(connected["state"], "connected", "{connected}");
    client.close().await;
    let v = wait_ended(&ts, &id, &token, Duration::from_secs(15)).await;
    assert_eq!(v["end_reason"], "peer_disconnected", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_never_connects_expires() {
    let ts = TestServer::start_with(|c| c.session.connect_timeout_secs = 1).await;
    let (id, token, _) = ts.create_session().await;
    let v = wait_ended(&ts, &id, &token, Duration::from_secs(10)).await;
    assert_eq!(v["end_reason"], "never_connected", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_ends_live_sessions_and_refuses_new_ones() {
    let ts = TestServer::start().await;
    let (id, token, client) = ready_session(&ts).await;
    let manager = ts.server.manager().clone();
    manager.drain(Duration::from_secs(5)).await;
    assert_eq!(manager.live_count(), 0, "drain ended the live session");
    ended_with(&ts, &client, &id, &token, Duration::from_secs(1), "server_shutdown").await;
    let res = ts.http.post(format!("{}/v1/sessions", ts.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(res.status(), 503);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_uses_the_configured_udp_port_range() {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let base = probe.local_addr().unwrap().port().min(65_000);
    drop(probe);
    let range = format!("{base}-{}", base + 9);
    let ts = TestServer::start_with(|c| {
        c.media.udp_ports = Some(range.clone());
        c.session.max_sessions = 10;
    })
    .await;
    let (_id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(&ts, &offer_url, &token).await;
    let ports: Vec<u16> = client
        .answer
        .lines()
        .filter(|l| l.starts_with("a=candidate:"))
        .filter_map(|l| l.split_whitespace().nth(5)?.parse().ok())
        .collect();
    assert!(!ports.is_empty(), "the answer has candidates");
    assert!(ports.iter().all(|p| (base..=base + 9).contains(p)), "candidate ports {ports:?} within {range}");
    client.wait_event("session.ready", Duration::from_secs(5), |e| e["type"] == "session.ready").await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_session_ends_at_its_idle_timeout() {
    let ts = TestServer::start_with(|c| c.session.idle_timeout_secs = 1).await;
    let (id, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(5), |e| e["type"] == "session.ready").await;
    // Silence keeps flowing as RTP, but nobody speaks or writes.
    client
        .silence_until("session.ended", Duration::from_secs(10), |evs| evs.iter().any(|e| e["type"] == "session.ended"))
        .await;
    let v = wait_ended(&ts, &id, &token, Duration::from_secs(5)).await;
    assert_eq!(v["end_reason"], "idle_timeout", "{v}");
    let ended = client.events().into_iter().find(|e| e["type"] == "session.ended").unwrap();
    assert_eq!(ended["reason"], "idle_timeout");
    client.close().await;
}
