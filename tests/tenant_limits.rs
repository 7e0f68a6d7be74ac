//! One tenant cannot take the node (issue 12, kind 9): per-API-key limits on sessions not yet
//! connected and not yet ended (429 + Retry-After + problem+json), and a short connect timeout
//! that frees the slots of sessions that never offer.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kotodama::config::SessionLimits;
use serde_json::Value;

const KEY_A: &str = "tenant-a-key-0123456789abcdef";
const KEY_B: &str = "tenant-b-key-0123456789abcdef";

/// POST /v1/sessions with `key`: (status, Retry-After seconds, content type, body).
async fn create_with(ts: &TestServer, key: &str) -> (u16, Option<u64>, String, Value) {
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).bearer_auth(key).json(&serde_json::json!({}));
    let res = r.send().await.unwrap();
    let retry = res.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
    let ct = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    (res.status().as_u16(), retry, ct, res.json().await.unwrap_or(Value::Null))
}

/// DELETE /v1/sessions/{id} with the session's token: whether it succeeded (else the status).
async fn delete(ts: &TestServer, id: &str, token: &str) -> Result<(), u16> {
    let res = ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(token).send().await.unwrap();
    if res.status().is_success() { Ok(()) } else { Err(res.status().as_u16()) }
}

/// A server for the API keys A and B with these per-key limits (`[session]`).
async fn server(limits: impl FnOnce(&mut SessionLimits)) -> TestServer {
    TestServer::start_with(|c| {
        c.api_keys = vec![KEY_A.into(), KEY_B.into()];
        limits(&mut c.session);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_flooding_unconnected_sessions_gets_429_while_other_keys_still_create() {
    let ts = server(|s| {
        s.max_pending_per_key = 3;
        s.max_live_per_key = 4;
    })
    .await;
    // A burst of concurrent creations: the limit holds under concurrency (reserved, not counted late).
    let burst = futures::future::join_all((0..12).map(|_| create_with(&ts, KEY_A))).await;
    let created: Vec<&Value> = burst.iter().filter(|r| r.0 == 201).map(|r| &r.3).collect();
    assert_eq!(created.len(), 3, "{:?}", burst.iter().map(|r| r.0).collect::<Vec<_>>());
    let refused: Vec<_> = burst.iter().filter(|r| r.0 != 201).collect();
    assert_eq!(refused.len(), 9);
    for (status, retry, ct, body) in &refused {
        assert_eq!(*status, 429, "{body}");
        assert!(ct.starts_with("application/problem+json"), "{ct}");
        assert_eq!(body["code"], "too_many_pending_sessions", "{body}");
        assert!(body["detail"].as_str().unwrap().contains("3 session(s) not yet connected"), "{body}");
        // Until the oldest pending session times out (30 s) and is swept (5 s).
        let retry = retry.expect("Retry-After on 429");
        assert!((30..=35).contains(&retry), "Retry-After {retry}");
    }

    // Another tenant is not affected.
    let (status, ..) = create_with(&ts, KEY_B).await;
    assert_eq!(status, 201, "key B creates while key A is at its limit");

    // Connecting one of A's sessions frees a pending slot.
    let offer_url = created[0]["offer_url"].as_str().unwrap();
    let token = created[0]["token"].as_str().unwrap();
    let client = TestClient::connect(&ts, offer_url, token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    assert_eq!(create_with(&ts, KEY_A).await.0, 201, "one connected, two pending: a third may wait");
    // Now 4 not ended (1 live + 3 pending): both limits are reached, the pending one answers first.
    assert_eq!(create_with(&ts, KEY_A).await.3["code"], "too_many_pending_sessions");

    // Ending a pending session frees its slot.
    let (pending_id, pending_token) = id_and_token(created[1]);
    delete(&ts, &pending_id, &pending_token).await.expect("DELETE of a pending session");
    assert_eq!(create_with(&ts, KEY_A).await.0, 201, "the deleted session's slot is free");
    let (status, retry, _, body) = create_with(&ts, KEY_A).await;
    assert_eq!((status, body["code"].as_str()), (429, Some("too_many_pending_sessions")), "{body}");
    assert!(retry.is_some());
    client.close().await;
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_limit_counts_connected_sessions_of_the_key() {
    let ts = server(|s| {
        s.max_pending_per_key = 5;
        s.max_live_per_key = 1;
    })
    .await;
    let (status, _, _, first) = create_with(&ts, KEY_A).await;
    assert_eq!(status, 201);
    let client = TestClient::connect(&ts, first["offer_url"].as_str().unwrap(), first["token"].as_str().unwrap()).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    let (status, retry, ct, body) = create_with(&ts, KEY_A).await;
    assert_eq!(status, 429, "{body}");
    assert!(ct.starts_with("application/problem+json"));
    assert_eq!(body["code"], "too_many_live_sessions", "{body}");
    assert!(retry.is_some_and(|r| r >= 1), "Retry-After");
    // The session ends: the key may create again.
    let (id, token) = id_and_token(&first);
    delete(&ts, &id, &token).await.expect("DELETE of the live session");
    assert_eq!(create_with(&ts, KEY_A).await.0, 201);
    client.close().await;
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_never_offered_ends_at_the_connect_timeout_and_frees_its_slot() {
    let ts = server(|s| {
        s.max_pending_per_key = 1;
        s.connect_timeout_secs = 1;
    })
    .await;
    let (status, _, _, first) = create_with(&ts, KEY_A).await;
    assert_eq!(status, 201);
    let (status, retry, _, _) = create_with(&ts, KEY_A).await;
    assert_eq!(status, 429);
    assert!(retry.is_some_and(|r| r <= 6), "the slot frees within the timeout and one sweep: {retry:?}");
    let id = first["session_id"].as_str().unwrap();
    let token = first["token"].as_str().unwrap();
    // The sweep (every 5 s) ends it `never_connected`; the slot is free again.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = ts.session_json(id, token).await;
        if s["state"] == "ended" {
            assert_eq!(s["end_reason"], "never_connected", "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "still {s} after the connect timeout");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(create_with(&ts, KEY_A).await.0, 201);
    ts.server.shutdown().await.unwrap();
}
