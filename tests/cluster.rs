//! Two kotodama nodes behind one Redis and one Postgres (both real servers): any node answers
//! for any session. A request for a live session that lands on the other node gets 307 to the
//! owner (the WHIP rule: method and body preserved); history is read from the shared store; a
//! privacy delete reaches a live session on the other node through Redis pub/sub; and a node
//! that drains leaves its sessions ended and their transcripts flushed for the other to serve.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kotodama::config::Config;
use serde_json::Value;

const SECRET: &str = "cluster-test-secret-0123456789abcdef012345";
const USER_KEY: &str = "cluster-user-key-0123456789";
const ADMIN_KEY: &str = "cluster-admin-key-0123456789";

fn cluster(db_url: String, prefix: String) -> impl FnOnce(&mut Config) {
    move |c: &mut Config| {
        c.database_url = db_url;
        c.redis_url =
            Some(std::env::var("KOTODAMA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into()));
        c.redis_prefix = prefix;
        c.token_secret = Some(SECRET.into());
        c.api_keys = vec![USER_KEY.into()];
        c.admin_api_keys = vec![ADMIN_KEY.into()];
    }
}

/// Send `request` for `path` to the node that does not own the session and check the answer: a
/// 307 to the same `path` at the owner `owner_base` (method and body are the client's to repeat).
async fn assert_redirected(request: reqwest::RequestBuilder, owner_base: &str, path: &str) {
    let r = request.send().await.unwrap();
    assert_eq!(r.status(), 307, "{path}");
    assert_eq!(r.headers()["location"], format!("{owner_base}{path}"));
}

async fn wait_state(http: &reqwest::Client, url: &str, token: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http.get(url).bearer_auth(token).send().await.unwrap();
        let v: Value = if r.status() == 200 { r.json().await.unwrap() } else { Value::Null };
        if v["state"] == state {
            return v;
        }
        assert!(Instant::now() < deadline, "{url} never reached {state}: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_redirect_share_history_and_obey_cross_node_control() {
    let db = PgTestDb::create().await;
    let prefix = redis_prefix();
    let a = TestServer::start_with(cluster(db.url.clone(), prefix.clone())).await;
    let b = TestServer::start_with(cluster(db.url.clone(), prefix.clone())).await;
    // Redirects are followed by hand: a client must re-send its credentials to the owner.
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();

    let created: Value = http
        .post(format!("{}/v1/sessions", a.base))
        .bearer_auth(USER_KEY)
        .json(&serde_json::json!({"user_id": "user-7"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["session_id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap().to_owned();
    let offer_url = created["offer_url"].as_str().unwrap().to_owned();

    // The WebSocket transport's upgrade on the other node: 307 to the owner, same path and query
    // (the session token travels in `?token=`, browsers cannot set headers on a WebSocket).
    let ws = format!("/v1/sessions/{id}/ws?token={token}");
    let upgrade = http
        .get(format!("{}{ws}", b.base))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    assert_redirected(upgrade, &a.base, &ws).await;

    // GET on the other node: 307 to the owner, same path.
    let session = format!("/v1/sessions/{id}");
    assert_redirected(http.get(format!("{}{session}", b.base)).bearer_auth(&token), &a.base, &session).await;
    // The offer too: 307 keeps POST and its body.
    let (_pc, _dc, _t, _s, _i, sdp) = client_offer(true, true).await;
    let offer = http
        .post(format!("{}{offer_url}", b.base))
        .bearer_auth(&token)
        .header("Content-Type", "application/sdp")
        .body(sdp);
    assert_redirected(offer, &a.base, &offer_url).await;

    // Connect at the owner and talk.
    let client = TestClient::connect_to(&a.base, &http, &offer_url, &token).await;
    client
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    client.send_text(r#"{"type":"text","text":"Hello across nodes."}"#).await;
    client.wait_event("the reply", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "speaking").await;

    // Redis holds the live session's recent turns (newest first), and who hosts it.
    let mut redis =
        redis::Client::open("redis://127.0.0.1:6379").unwrap().get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let recent: Vec<String> = redis::cmd("LRANGE")
            .arg(format!("{prefix}recent:{id}"))
            .arg(0)
            .arg(-1)
            .query_async(&mut redis)
            .await
            .unwrap();
        if recent.iter().any(|t| t.contains("Hello across nodes.")) {
            break;
        }
        assert!(Instant::now() < deadline, "recent turns in Redis: {recent:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let owner: Option<String> =
        redis::cmd("GET").arg(format!("{prefix}session:{id}")).query_async(&mut redis).await.unwrap();
    assert_eq!(owner.as_deref(), Some(a.base.as_str()), "the registry names the owner");

    // A message injected on the other node reaches the session over pub/sub.
    let r = http
        .post(format!("{}/v1/sessions/{id}/messages", b.base))
        .bearer_auth(USER_KEY)
        .json(&serde_json::json!({"text": "A result from a tool on node B."}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    client
        .wait_event("the injected turn", Duration::from_secs(10), |e| {
            e["type"] == "transcript" && e["role"] == "user" && e["text"] == "A result from a tool on node B."
        })
        .await;

    // PATCH and DELETE of the peer on the other node: 307 to the peer URL at the owner.
    let peer_url = client.location.clone();
    let trickle = http
        .patch(format!("{}{peer_url}", b.base))
        .bearer_auth(&token)
        .header("Content-Type", "application/trickle-ice-sdpfrag")
        .header("If-Match", &client.etag)
        .body("a=end-of-candidates\r\n");
    assert_redirected(trickle, &a.base, &peer_url).await;
    assert_redirected(http.delete(format!("{}{peer_url}", b.base)).bearer_auth(&token), &a.base, &peer_url).await;
    assert_eq!(a.server.manager().live_count(), 1, "a redirect ends nothing");

    // A privacy delete on B for a user live on A: A is told over pub/sub to end the session,
    // the delete asks to be retried, and the retry removes everything on both nodes.
    let r = http.delete(format!("{}/v1/users/user-7/data", b.base)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(r.status(), 409, "{}", r.text().await.unwrap());
    client
        .wait_event("session.ended from the other node's request", Duration::from_secs(10), |e| {
            e["type"] == "session.ended"
        })
        .await;
    let ended = wait_state(&http, &format!("{}/v1/sessions/{id}", b.base), &token, "ended").await;
    assert_eq!(ended["end_reason"], "client_request", "{ended}");
    // History from the shared store, on the node that never hosted the session.
    let tr = get_json(&http, &format!("{}/v1/sessions/{id}/transcript", b.base), &token).await;
    assert!(
        tr.as_array().unwrap().iter().any(|t| t["role"] == "user" && t["text"] == "Hello across nodes."),
        "the typed turn is in the shared store: {tr}"
    );
    assert!(
        tr.as_array().unwrap().iter().any(|t| t["role"] == "user" && t["text"] == "A result from a tool on node B."),
        "the injected turn is stored: {tr}"
    );
    // The user key sees only what it created; the admin sees it too. Export first.
    let export = get_json(&http, &format!("{}/v1/users/user-7/data", b.base), USER_KEY).await;
    assert_eq!(export["sessions"][0]["id"], id, "{export}");
    assert!(export["sessions"][0]["turns"].as_array().is_some_and(|t| !t.is_empty()), "{export}");
    let r = http.delete(format!("{}/v1/users/user-7/data", b.base)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["deleted_sessions"], serde_json::json!([id]));
    for node in [&a, &b] {
        let r = http.get(format!("{}/v1/sessions/{id}", node.base)).bearer_auth(&token).send().await.unwrap();
        assert_eq!(r.status(), 404, "deleted everywhere ({})", node.base);
    }
    let left: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*{id}*")).query_async(&mut redis).await.unwrap();
    assert!(left.is_empty(), "no Redis key of the deleted session remains: {left:?}");
    let r = http.get(format!("{}/v1/users/user-7/data", a.base)).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(r.status(), 404, "nothing left to export");
    client.close().await;

    // Drain of A with a live session: ended (server_shutdown), transcript flushed, and B serves it.
    let created = create_session_at(&http, &a.base, Some(USER_KEY)).await;
    let (id2, token2) = id_and_token(&created);
    let client2 = TestClient::connect_to(&a.base, &http, created["offer_url"].as_str().unwrap(), &token2).await;
    client2
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    client2.send_text(r#"{"type":"text","text":"Still there?"}"#).await;
    client2
        .wait_event("the typed turn", Duration::from_secs(10), |e| e["type"] == "transcript" && e["role"] == "user")
        .await;
    a.server.shutdown().await.unwrap();
    let info = get_json(&http, &format!("{}/v1/sessions/{id2}", b.base), &token2).await;
    assert_eq!(
        (info["state"].as_str(), info["end_reason"].as_str()),
        (Some("ended"), Some("server_shutdown")),
        "{info}"
    );
    let tr = get_json(&http, &format!("{}/v1/sessions/{id2}/transcript", b.base), &token2).await;
    assert_eq!(tr[0]["text"], "Still there?", "{tr}");
    client2.close().await;
    b.server.shutdown().await.unwrap();
}
