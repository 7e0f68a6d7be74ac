//! Every error status of the API contract, sent to the real server over HTTP, with offers made by
//! a real webrtc-rs peer where an offer is needed.

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use serde_json::Value;

async fn assert_problem(res: reqwest::Response, status: u16, what: &str) -> Value {
    assert_eq!(res.status().as_u16(), status, "{what}: status");
    let ct = res.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
    assert!(ct.starts_with("application/problem+json"), "{what}: content type {ct}");
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], status, "{what}: body {body}");
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()), "{what}: detail in {body}");
    body
}

fn b64(v: &Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offer_errors_are_specific() {
    let ts = TestServer::start().await;
    let (id, token, offer_url) = ts.create_session().await;
    let url = format!("{}{}", ts.base, offer_url);
    let (_pc, _dc, _t, _ssrc, _inbox, good_offer) = client_offer(true, true).await;
    // One connection per request: after an early 413 the server closes the connection without
    // reading the body, and a pooled connection could be reused just as it closes.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let post_to = |url: &str, ct: &'static str, auth: Option<String>, body: String| {
        let mut r = http.post(url).header("Content-Type", ct).body(body);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    let post = |ct: &'static str, auth: Option<String>, body: String| post_to(&url, ct, auth, body);
    let bearer = format!("Bearer {token}");

    assert_problem(
        post("text/plain", Some(bearer.clone()), good_offer.clone()).await.unwrap(),
        415,
        "wrong content type",
    )
    .await;
    assert_problem(
        post("application/sdp", Some(bearer.clone()), "x".repeat(65 * 1024)).await.unwrap(),
        413,
        "65 KiB body",
    )
    .await;
    assert_problem(post("application/sdp", None, good_offer.clone()).await.unwrap(), 401, "no token").await;
    assert_problem(
        post("application/sdp", Some(bearer.clone()), "garbage, not SDP".into()).await.unwrap(),
        400,
        "garbage SDP",
    )
    .await;

    let (_pc2, _d2, _t2, _s2, _i2, no_audio) = client_offer(false, true).await;
    assert_problem(post("application/sdp", Some(bearer.clone()), no_audio).await.unwrap(), 422, "offer without audio")
        .await;
    let (_pc3, _d3, _t3, _s3, _i3, no_dc) = client_offer(true, false).await;
    assert_problem(
        post("application/sdp", Some(bearer.clone()), no_dc).await.unwrap(),
        422,
        "offer without a data channel",
    )
    .await;
    let no_fp: String =
        good_offer.lines().filter(|l| !l.starts_with("a=fingerprint")).map(|l| format!("{l}\r\n")).collect();
    assert_problem(
        post("application/sdp", Some(bearer.clone()), no_fp).await.unwrap(),
        422,
        "offer without DTLS fingerprint",
    )
    .await;

    // A token for another session.
    let (_other_id, other_token, _) = ts.create_session().await;
    assert_problem(
        post("application/sdp", Some(format!("Bearer {other_token}")), good_offer.clone()).await.unwrap(),
        401,
        "token for another session",
    )
    .await;

    // alg:none with the right subject.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims =
        serde_json::json!({"sub": id, "scope": "session", "exp": now + 600, "nbf": now - 1, "iat": now, "jti": "x"});
    let none = format!("{}.{}.", b64(&serde_json::json!({"alg": "none", "typ": "JWT"})), b64(&claims));
    assert_problem(
        post("application/sdp", Some(format!("Bearer {none}")), good_offer.clone()).await.unwrap(),
        401,
        "alg:none",
    )
    .await;

    // An expired token, signed with the server's real secret (a server configured with a known one).
    let secret = "k".repeat(40);
    let ts2 = TestServer::start_with(|c| c.token_secret = Some("k".repeat(40))).await;
    let (id2, _t, offer_url2) = ts2.create_session().await;
    let expired_claims = serde_json::json!({"sub": id2, "scope": "session", "exp": now - 120, "nbf": now - 700, "iat": now - 700, "jti": "y"});
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &expired_claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let url2 = format!("{}{offer_url2}", ts2.base);
    let res = post_to(&url2, "application/sdp", Some(format!("Bearer {expired}")), good_offer.clone()).await.unwrap();
    assert_problem(res, 401, "expired token").await;

    // Unknown session (token valid for it is impossible to get; a valid token for another id -> 401,
    // an unknown id in the URL with the right token -> 401 as well: the token names its session).
    let unknown = format!("{}/v1/sessions/sess_unknown/offer", ts.base);
    let res = post_to(&unknown, "application/sdp", Some(bearer.clone()), good_offer.clone()).await.unwrap();
    assert_problem(res, 401, "token does not name that session").await;

    // The good offer succeeds once, then 409.
    let res = post("application/sdp", Some(bearer.clone()), good_offer.clone()).await.unwrap();
    assert_eq!(res.status(), 201, "good offer: {}", res.text().await.unwrap());
    assert_problem(
        post("application/sdp", Some(bearer.clone()), good_offer.clone()).await.unwrap(),
        409,
        "second offer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickle_and_delete_errors_are_specific() {
    let ts = TestServer::start().await;
    let (id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(&ts, &offer_url, &token).await;
    let peer_url = format!("{}{}", ts.base, client.location);
    let frag = "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host\r\n";
    let patch = |ct: &'static str, if_match: Option<&str>| {
        let mut r = ts.http.patch(&peer_url).header("Content-Type", ct).bearer_auth(&token).body(frag);
        if let Some(m) = if_match {
            r = r.header("If-Match", m.to_owned());
        }
        r.send()
    };
    assert_problem(patch("application/trickle-ice-sdpfrag", None).await.unwrap(), 428, "PATCH without If-Match").await;
    assert_problem(patch("application/sdp", Some(&client.etag)).await.unwrap(), 415, "PATCH wrong content type").await;
    assert_problem(patch("application/trickle-ice-sdpfrag", Some("\"stale\"")).await.unwrap(), 412, "stale ETag").await;
    let res = patch("application/trickle-ice-sdpfrag", Some(&client.etag)).await.unwrap();
    assert_eq!(res.status(), 204, "candidates added: {}", res.text().await.unwrap());
    let restart = |body: &'static str| {
        ts.http
            .patch(&peer_url)
            .header("Content-Type", "application/trickle-ice-sdpfrag")
            .header("If-Match", "*")
            .bearer_auth(&token)
            .body(body)
            .send()
    };
    let res = restart("a=ice-ufrag:new1\r\na=ice-pwd:newpasswordnewpassword12\r\n").await.unwrap();
    assert_eq!(res.status(), 200, "ICE restart");
    assert_eq!(res.headers()["content-type"], "application/trickle-ice-sdpfrag");
    let res = restart("a=end-of-candidates\r\n").await.unwrap();
    assert_problem(res, 422, "If-Match * without new ICE credentials").await;
    let res = ts
        .http
        .patch(format!("{}/v1/sessions/{id}/peers/peer_nope", ts.base))
        .header("Content-Type", "application/trickle-ice-sdpfrag")
        .header("If-Match", client.etag.clone())
        .bearer_auth(&token)
        .body(frag)
        .send()
        .await
        .unwrap();
    assert_problem(res, 404, "unknown peer").await;

    // GET / DELETE need the token.
    assert_problem(
        ts.http.get(format!("{}/v1/sessions/{id}", ts.base)).send().await.unwrap(),
        401,
        "GET without token",
    )
    .await;
    assert_problem(ts.http.delete(&peer_url).send().await.unwrap(), 401, "DELETE without token").await;
    let res = ts.http.delete(&peer_url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_problem(ts.http.delete(&peer_url).bearer_auth(&token).send().await.unwrap(), 404, "DELETE twice").await;
    assert_problem(
        ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(&token).send().await.unwrap(),
        404,
        "DELETE session after end",
    )
    .await;
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_creation_errors_are_specific() {
    let ts = TestServer::start_with(|c| c.api_keys = vec!["test-key-0123456789abcdef".into()]).await;
    let url = format!("{}/v1/sessions", ts.base);
    assert_problem(ts.http.post(&url).json(&serde_json::json!({})).send().await.unwrap(), 401, "missing API key").await;
    assert_problem(
        ts.http.post(&url).bearer_auth("wrong-key-0123456789abcdef").json(&serde_json::json!({})).send().await.unwrap(),
        401,
        "wrong API key",
    )
    .await;
    let key = "test-key-0123456789abcdef";
    assert_problem(
        ts.http
            .post(&url)
            .bearer_auth(key)
            .header("Content-Type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap(),
        400,
        "bad JSON",
    )
    .await;
    assert_problem(
        ts.http.post(&url).bearer_auth(key).json(&serde_json::json!({"character": "nobody"})).send().await.unwrap(),
        404,
        "unknown character",
    )
    .await;
    let res = ts.http.post(&url).bearer_auth(key).json(&serde_json::json!({"character": "aiko"})).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    for field in ["session_id", "token", "expires_at", "ice_servers", "offer_url"] {
        assert!(v.get(field).is_some(), "201 body has `{field}`: {v}");
    }
    assert_eq!(v["offer_url"], format!("/v1/sessions/{}/offer", v["session_id"].as_str().unwrap()));

    let chars: Value = ts.http.get(format!("{}/v1/characters", ts.base)).send().await.unwrap().json().await.unwrap();
    assert_eq!(chars[0]["id"], "aiko", "{chars}");
    for f in ["id", "name", "language", "voice"] {
        assert!(chars[0].get(f).is_some(), "character has `{f}`");
    }
    assert_eq!(ts.http.get(format!("{}/healthz", ts.base)).send().await.unwrap().status(), 200);
    assert_eq!(ts.http.get(format!("{}/readyz", ts.base)).send().await.unwrap().status(), 200);
    assert_problem(ts.http.get(format!("{}/v1/nothing-here", ts.base)).send().await.unwrap(), 404, "unknown route")
        .await;

    // Draining: readyz 503 and new sessions 503 with Retry-After.
    let manager = ts.server.manager().clone();
    manager.drain(Duration::from_secs(1)).await;
    let res = ts.http.get(format!("{}/readyz", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 503);
    let res = ts.http.post(&url).bearer_auth(key).json(&serde_json::json!({})).send().await.unwrap();
    assert!(res.headers().get("retry-after").is_some(), "Retry-After on 503");
    assert_problem(res, 503, "draining").await;
}
