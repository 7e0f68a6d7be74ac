//! Session-creation admission is one check for every route that creates a session
//! (`signaling::api::admit_creation`): a draining node answers 503 + `Retry-After` and a caller
//! past its sessions-per-minute answers 429 + `Retry-After` on `POST /v1/sessions`, Pipecat's
//! `POST /api/offer`, `POST /v1/realtime/client_secrets`, `POST /v1/realtime/calls` and
//! `POST /v1/characters/{id}/whip` and the N.E.K.O. socket `GET /ws/{character}` (before the
//! upgrade), all against the real server over HTTP.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// A creating request: (route, content type, body). The bodies are not offers a route would
/// answer: admission comes first, so what the route answers without it would be a 4xx of its own.
fn creating_routes() -> Vec<(&'static str, &'static str, String)> {
    vec![
        ("/v1/sessions", "application/json", "{}".into()),
        ("/api/offer", "application/json", json!({"sdp": "v=0", "type": "offer"}).to_string()),
        ("/v1/realtime/client_secrets", "application/json", "{}".into()),
        ("/v1/realtime/calls", "application/sdp", "v=0\r\n".into()),
        ("/v1/characters/aiko/whip", "application/sdp", "v=0\r\n".into()),
        ("/ws/aiko", "", String::new()),
    ]
}

async fn post(ts: &TestServer, route: &str, content_type: &str, body: &str, bearer: Option<&str>) -> reqwest::Response {
    let url = format!("{}{route}", ts.base);
    // `GET /ws/...` is the one creating route that is not a POST (a plain GET: no upgrade).
    let mut req = if route.starts_with("/ws/") {
        ts.http.get(url)
    } else {
        ts.http.post(url).header("Content-Type", content_type).body(body.to_owned())
    };
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap()
}

/// The answer is `status` problem+json with a `Retry-After` of whole seconds >= 1.
async fn assert_refused(res: reqwest::Response, status: u16, code: &str, what: &str) {
    assert_eq!(res.status().as_u16(), status, "{what}");
    let retry = res.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    assert!(retry.is_some_and(|s| s >= 1), "{what}: Retry-After {retry:?}");
    let ct = res.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    assert!(ct.starts_with("application/problem+json"), "{what}: content type {ct}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], code, "{what}: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_node_refuses_every_creating_route_with_503() {
    let ts = TestServer::start().await;
    // A client secret minted before the drain: placing its call is refused too.
    let minted = post(&ts, "/v1/realtime/client_secrets", "application/json", "{}", None).await;
    assert_eq!(minted.status(), 200);
    let ek = minted.json::<Value>().await.unwrap()["value"].as_str().unwrap().to_owned();
    ts.server.manager().clone().drain(Duration::from_secs(1)).await;
    for (route, ct, body) in creating_routes() {
        assert_refused(post(&ts, route, ct, &body, None).await, 503, "unavailable", route).await;
    }
    let call = post(&ts, "/v1/realtime/calls", "application/sdp", "v=0\r\n", Some(&ek)).await;
    assert_refused(call, 503, "unavailable", "a call with a client secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_creating_route_counts_against_the_creation_rate_limit() {
    for (route, ct, body) in creating_routes() {
        let ts = TestServer::start_with(|c| c.session.create_per_minute_per_ip = 1).await;
        let first = post(&ts, route, ct, &body, None).await;
        let first_status = first.status().as_u16();
        assert!(![429, 503].contains(&first_status), "{route}: the first request is admitted, got {first_status}");
        assert_refused(post(&ts, route, ct, &body, None).await, 429, "rate_limited", route).await;
    }
    // One bucket per client: a session made on one route uses up what another may make.
    let ts = TestServer::start_with(|c| c.session.create_per_minute_per_ip = 1).await;
    assert_eq!(post(&ts, "/v1/sessions", "application/json", "{}", None).await.status(), 201);
    for (route, ct, body) in creating_routes() {
        assert_refused(post(&ts, route, ct, &body, None).await, 429, "rate_limited", route).await;
    }
}
