//! Who gets in, against the real server over HTTP: session tokens that are expired, not yet
//! valid, `alg: none`, signed with a wrong key, for another session, or HS256 forged with the
//! server's RS256 public key are all 401 with their code; API keys configured only as digests
//! work; `Idempotency-Key` and the per-key rate limit hold across two nodes sharing Redis; a
//! node at its session limit answers 503 with Retry-After.

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use serde_json::Value;
use signaling::token::{Claims, TokenConfig, TokenSecret};
use signaling::{TokenIssuer, VerifyMode};
use time::OffsetDateTime;

const SECRET: &str = "auth-test-secret-0123456789abcdef0123456789";
const KEY: &str = "auth-test-key-0123456789abcdef";

fn keys_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("signaling/tests/fixtures/keys")
}

async fn create(ts: &TestServer, key: Option<&str>) -> (String, String) {
    let mut req = ts.http.post(format!("{}/v1/sessions", ts.base)).json(&serde_json::json!({}));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let r = req.send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    (v["session_id"].as_str().unwrap().to_owned(), v["token"].as_str().unwrap().to_owned())
}

/// (status, problem code) of GET /v1/sessions/{id} and POST .../offer with `token`.
async fn try_token(ts: &TestServer, id: &str, token: &str) -> Vec<(u16, String)> {
    let get = ts.http.get(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(token).send().await.unwrap();
    let offer = ts
        .http
        .post(format!("{}/v1/sessions/{id}/offer", ts.base))
        .bearer_auth(token)
        .header("Content-Type", "application/sdp")
        .body("v=0\r\n")
        .send()
        .await
        .unwrap();
    let mut out = Vec::new();
    for r in [get, offer] {
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        out.push((status, body["code"].as_str().unwrap_or_default().to_owned()));
    }
    out
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_or_stale_session_tokens_get_401_with_their_reason() {
    let ts = TestServer::start_with(|c| c.token_secret = Some(SECRET.into())).await;
    let (id, token) = create(&ts, None).await;
    let (other_id, other_token) = create(&ts, None).await;
    let ours = TokenIssuer::new(TokenConfig {
        secret: Some(TokenSecret::new(SECRET.as_bytes().to_vec()).unwrap()),
        ..TokenConfig::default()
    })
    .unwrap();
    let now = OffsetDateTime::now_utc();
    // Far enough in the past that even the manage grace (the max duration, 1 h) is over.
    let expired = ours.issue_at(&id, now - time::Duration::hours(2)).unwrap();
    let future = ours.issue_at(&id, now + time::Duration::minutes(5)).unwrap();
    let n = now.unix_timestamp();
    let claims = format!(r#"{{"sub":"{id}","scope":"session","iat":{n},"nbf":{n},"exp":{},"jti":"x"}}"#, n + 600);
    let alg_none = format!("{}.{}.", b64(r#"{"alg":"none","typ":"JWT"}"#), b64(&claims));
    let wrong_key = TokenIssuer::random().issue(&id).unwrap();

    assert_eq!(try_token(&ts, &id, &token).await[0].0, 200, "the real token works");
    for (what, bad, code) in [
        ("expired", expired.token.expose().to_owned(), "token_expired"),
        ("nbf in the future", future.token.expose().to_owned(), "token_not_yet_valid"),
        ("alg none", alg_none, "token_bad_algorithm"),
        ("wrong key", wrong_key.token.expose().to_owned(), "token_bad_signature"),
        ("another session's token", other_token.clone(), "token_wrong_session"),
    ] {
        for (status, got) in try_token(&ts, &id, &bad).await {
            assert_eq!((status, got.as_str()), (401, code), "{what}");
        }
    }
    assert_eq!(try_token(&ts, &other_id, &other_token).await[0].0, 200);
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rs256_node_refuses_hs256_forged_with_its_public_key() {
    let dir = keys_dir();
    let ts = TestServer::start_with(|c| {
        c.tokens.algorithm = Some("RS256".into());
        c.tokens.kid = Some("2026-11".into());
        c.tokens.private_key_file = Some(dir.join("rsa_a.pem"));
        c.tokens.public_key_file = Some(dir.join("rsa_a.pub.pem"));
    })
    .await;
    let (id, token) = create(&ts, None).await;
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
    assert_eq!((header["alg"].as_str(), header["kid"].as_str()), (Some("RS256"), Some("2026-11")));
    assert_eq!(try_token(&ts, &id, &token).await[0].0, 200);

    let public = std::fs::read(dir.join("rsa_a.pub.pem")).unwrap();
    let n = OffsetDateTime::now_utc().unix_timestamp();
    let claims = Claims { sub: id.clone(), scope: "session".into(), iat: n, nbf: n, exp: n + 600, jti: "f".into() };
    for (kid, code) in
        [(Some("2026-11"), "token_bad_algorithm"), (Some("nope"), "token_unknown_key"), (None, "token_unknown_key")]
    {
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        h.kid = kid.map(Into::into);
        let forged = jsonwebtoken::encode(&h, &claims, &jsonwebtoken::EncodingKey::from_secret(&public)).unwrap();
        for (status, got) in try_token(&ts, &id, &forged).await {
            assert_eq!((status, got.as_str()), (401, code), "HS256 with kid {kid:?}");
        }
    }
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_configured_as_digests_work_and_the_digest_is_not_a_key() {
    use sha2::Digest as _;
    let digest: String = sha2::Sha256::digest(KEY.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let entry = format!("sha256:{digest}");
    let ts = TestServer::start_with(|c| c.api_keys = vec![entry.clone()]).await;
    create(&ts, Some(KEY)).await;
    let r = ts
        .http
        .post(format!("{}/v1/sessions", ts.base))
        .bearer_auth(&entry)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_and_rate_limits_hold_across_nodes_sharing_redis() {
    let prefix = redis_prefix();
    let node = |prefix: String| {
        move |c: &mut kotodama::config::Config| {
            c.redis_url = Some("redis://127.0.0.1:6379".into());
            c.redis_prefix = prefix;
            c.token_secret = Some(SECRET.into());
            c.api_keys = vec![KEY.into()];
            c.session.create_per_minute_per_key = 3;
        }
    };
    let a = TestServer::start_with(node(prefix.clone())).await;
    let b = TestServer::start_with(node(prefix.clone())).await;
    let post = |base: &str, idem: Option<&str>, body: Value| {
        let mut r = a.http.post(format!("{base}/v1/sessions")).bearer_auth(KEY).json(&body);
        if let Some(k) = idem {
            r = r.header("Idempotency-Key", k);
        }
        r.send()
    };
    let first = post(&a.base, Some("idem-1"), serde_json::json!({"character": "aiko"})).await.unwrap();
    assert_eq!(first.status(), 201);
    let first: Value = first.json().await.unwrap();
    // The same key and body on the other node: the same 201 (same session, same token).
    let again = post(&b.base, Some("idem-1"), serde_json::json!({"character": "aiko"})).await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.json::<Value>().await.unwrap(), first);
    let other = post(&b.base, Some("idem-1"), serde_json::json!({"character": "aiko", "user_id": "u"})).await.unwrap();
    assert_eq!(other.status(), 409);
    assert_eq!(other.json::<Value>().await.unwrap()["code"], "idempotency_key_reused");

    // The rate limit counts per key across both nodes: 3 per minute (the replay did not count).
    assert_eq!(post(&b.base, None, serde_json::json!({})).await.unwrap().status(), 201);
    assert_eq!(post(&a.base, None, serde_json::json!({})).await.unwrap().status(), 201);
    let limited = post(&b.base, None, serde_json::json!({})).await.unwrap();
    assert_eq!(limited.status(), 429);
    let retry: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // A token's offer is single use across nodes as well: the jti lives in Redis.
    let id = first["session_id"].as_str().unwrap();
    let token = first["token"].as_str().unwrap();
    let verified = TokenIssuer::new(TokenConfig {
        secret: Some(TokenSecret::new(SECRET.as_bytes().to_vec()).unwrap()),
        ..TokenConfig::default()
    })
    .unwrap()
    .verify(token, id, VerifyMode::Connect)
    .unwrap();
    let mut redis =
        redis::Client::open("redis://127.0.0.1:6379").unwrap().get_multiplexed_async_connection().await.unwrap();
    let client = TestClient::connect_to(&a.base, &a.http, first["offer_url"].as_str().unwrap(), token).await;
    let used: Option<String> =
        redis::cmd("GET").arg(format!("{prefix}jti:{}", verified.jti)).query_async(&mut redis).await.unwrap();
    assert_eq!(used.as_deref(), Some("1"), "the connected token's jti is recorded in Redis");
    client.close().await;
    a.server.shutdown().await.unwrap();
    b.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_at_its_session_limit_answers_503_with_retry_after() {
    let ts = TestServer::start_with(|c| c.session.max_sessions = 1).await;
    create(&ts, None).await;
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    ts.server.shutdown().await.unwrap();
}
