//! The admin API against the real server: every endpoint refuses anonymous calls (401) and
//! user keys (403); a character edited through the API is what the next session's model is
//! instructed with (fake OpenAI Realtime server) and survives a restart, on SQLite and Postgres;
//! live sessions are listed with node, provider and state and can be ended; exports round-trip
//! the stored transcript as JSON and plain text; the audit log records each action.

mod common;

use std::time::Duration;

use common::fake_openai::{FakeOpenAi, FakeOptions, Reply, reply_speech};
use common::*;
use serde_json::{Value, json};

const USER_KEY: &str = "admin-test-user-key-0123456789";
const ADMIN_KEY: &str = "admin-test-admin-key-0123456789";

fn keys(c: &mut kotodama::config::Config) {
    c.api_keys = vec![USER_KEY.into()];
    c.admin_api_keys = vec![ADMIN_KEY.into()];
}

async fn call(ts: &TestServer, method: &str, path: &str, key: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}{path}", ts.base);
    let mut req = ts.http.request(method.parse().unwrap(), url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn create(ts: &TestServer, body: Value) -> (String, String, String) {
    let (status, v) = call(ts, "POST", "/v1/sessions", Some(USER_KEY), Some(body)).await;
    assert_eq!(status, 201, "{v}");
    let s = |k: &str| v[k].as_str().unwrap().to_owned();
    (s("session_id"), s("token"), s("offer_url"))
}

/// The audit log's (actor, action, target) triples, oldest first.
async fn audit(ts: &TestServer) -> Vec<(String, String, String)> {
    let (status, v) = call(ts, "GET", "/v1/admin/audit?limit=1000", Some(ADMIN_KEY), None).await;
    assert_eq!(status, 200, "{v}");
    let mut out: Vec<_> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["at"].as_str().is_some_and(|t| t.contains('T')), "audit entries have a time: {e}");
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
            (s("actor"), s("action"), s("target"))
        })
        .collect();
    out.reverse();
    out
}

fn admin_actor() -> String {
    let digest = signaling::auth::key_digest(ADMIN_KEY);
    format!("key:{}", digest[..6].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_admin_endpoint_refuses_anonymous_calls_and_user_keys() {
    let ts = TestServer::start_with(keys).await;
    let (id, ..) = create(&ts, json!({"user_id": "u-1"})).await;
    let character = json!({"name": "Mika", "persona": "p"});
    let routes: Vec<(&str, String, Option<Value>)> = vec![
        ("GET", "/v1/admin/characters".into(), None),
        ("GET", "/v1/admin/characters/aiko".into(), None),
        ("PUT", "/v1/admin/characters/mika".into(), Some(character)),
        ("DELETE", "/v1/admin/characters/mika".into(), None),
        ("GET", "/v1/admin/sessions".into(), None),
        ("GET", format!("/v1/admin/sessions/{id}/export"), None),
        ("GET", format!("/v1/admin/sessions/{id}/export?format=text"), None),
        ("GET", "/v1/admin/users/u-1/export".into(), None),
        ("GET", "/v1/admin/audit".into(), None),
        ("GET", "/v1/admin/flags".into(), None),
        ("PUT", "/v1/admin/policies/kids".into(), Some(json!({"deny": ["scary"], "check_user_input": true}))),
        ("GET", "/v1/admin/policies".into(), None),
        ("GET", "/v1/admin/policies/kids".into(), None),
        ("PUT", "/v1/admin/policies/kids/lists/allow".into(), Some(json!({"phrases": ["scary movie"]}))),
        ("GET", "/v1/admin/policies/kids/lists/allow".into(), None),
        ("GET", "/v1/admin/policies/kids/versions".into(), None),
        ("DELETE", "/v1/admin/policies/kids".into(), None),
        ("DELETE", format!("/v1/admin/sessions/{id}"), None),
    ];
    for (method, path, body) in &routes {
        let (status, v) = call(&ts, method, path, None, body.clone()).await;
        assert_eq!(status, 401, "{method} {path} without a key: {v}");
        let (status, v) = call(&ts, method, path, Some(USER_KEY), body.clone()).await;
        assert_eq!((status, v["code"].as_str()), (403, Some("admin_role_required")), "{method} {path} user key");
    }
    assert!(audit(&ts).await.iter().all(|(_, action, _)| action == "audit.read"), "refused calls are not actions");
    for (method, path, body) in &routes {
        let (status, v) = call(&ts, method, path, Some(ADMIN_KEY), body.clone()).await;
        assert_eq!(status, 200, "{method} {path} with the admin key: {v}");
    }
    let logged: Vec<String> = audit(&ts).await.into_iter().map(|(_, action, _)| action).collect();
    let expected = [
        "character.list",
        "character.get",
        "character.put",
        "character.delete",
        "session.list",
        "session.export",
        "session.export",
        "user.export",
        "audit.read",
        "flag.list",
        "policy.put",
        "policy.list",
        "policy.get",
        "policy.allow.put",
        "policy.allow.get",
        "policy.versions",
        "policy.delete",
        "session.end",
    ];
    assert_eq!(
        logged.iter().filter(|a| *a != "audit.read").collect::<Vec<_>>(),
        expected.iter().filter(|a| **a != "audit.read").collect::<Vec<_>>()
    );
    let (status, v) =
        call(&ts, "PUT", "/v1/admin/characters/bad", Some(ADMIN_KEY), Some(json!({"name": "B", "tools": ["nuke"]})))
            .await;
    assert_eq!((status, v["code"].as_str()), (422, Some("bad_character")), "{v}");
    let (status, _) = call(&ts, "GET", "/v1/admin/audit?limit=0", Some(ADMIN_KEY), None).await;
    assert_eq!(status, 400);
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_character_edited_through_the_api_instructs_the_next_session() {
    let (text, audio) = reply_speech();
    let fake = FakeOpenAi::start(FakeOptions::default(), vec![Reply::Speech { text, audio }]).await;
    let ts = TestServer::start_openai(&fake.url(), keys).await;
    let persona = "You are Aiko, version two: answer every question with a haiku.";
    let (status, v) = call(
        &ts,
        "PUT",
        "/v1/admin/characters/aiko",
        Some(ADMIN_KEY),
        Some(json!({"name": "Aiko", "persona": persona, "voice": "marin", "language": "en-US"})),
    )
    .await;
    assert_eq!((status, v["version"].as_i64(), v["source"].as_str()), (200, Some(1), Some("admin")), "{v}");

    let (_, token, offer_url) = create(&ts, json!({"character": "aiko"})).await;
    let client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    let updates = fake.conn(0).of_type("session.update");
    let instructions = updates[0]["session"]["instructions"].as_str().unwrap_or_default().to_owned();
    assert!(instructions.contains("haiku"), "the model got the edited persona: {instructions:?}");
    client.close().await;
    ts.server.shutdown().await.unwrap();
}

/// Edits and the audit log on `database_url`, across a restart.
async fn edits_survive_a_restart(database_url: String) {
    let url = database_url.clone();
    let ts = TestServer::start_with(move |c| {
        keys(c);
        c.database_url = url;
    })
    .await;
    let mika = json!({"name": "Mika", "persona": "You are Mika.", "voice": "mika", "expressions": {"happy": "grin"}});
    assert_eq!(call(&ts, "PUT", "/v1/admin/characters/mika", Some(ADMIN_KEY), Some(mika.clone())).await.0, 200);
    let (status, v) = call(&ts, "PUT", "/v1/admin/characters/mika", Some(ADMIN_KEY), Some(mika)).await;
    assert_eq!((status, v["version"].as_i64()), (200, Some(2)), "a second edit is version 2: {v}");
    let (status, public) = call(&ts, "GET", "/v1/characters", None, None).await;
    assert_eq!(status, 200);
    assert!(
        public.as_array().unwrap().iter().any(|c| c["id"] == "mika" && c["expressions"]["happy"] == "grin"),
        "{public}"
    );
    let (id, ..) = create(&ts, json!({"character": "mika"})).await;
    let (_, s) = call(&ts, "GET", &format!("/v1/sessions/{id}"), Some(USER_KEY), None).await;
    assert_eq!(s["character"], "mika", "the next session uses the new character: {s}");
    assert_eq!(call(&ts, "DELETE", "/v1/admin/characters/aiko", Some(ADMIN_KEY), None).await.0, 200);
    let deny = Some(json!({"phrases": ["green parrot"]}));
    for n in 1..=2 {
        let (status, v) =
            call(&ts, "PUT", "/v1/admin/policies/default/lists/deny", Some(ADMIN_KEY), deny.clone()).await;
        assert_eq!((status, v["version"].as_i64()), (200, Some(n)), "each change is a new version: {v}");
    }
    ts.server.shutdown().await.unwrap();

    let url = database_url.clone();
    let ts = TestServer::start_with(move |c| {
        keys(c);
        c.database_url = url;
    })
    .await;
    let (_, list) = call(&ts, "GET", "/v1/admin/characters", Some(ADMIN_KEY), None).await;
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["mika"], "after a restart: the configured aiko stays deleted, mika stays: {list}");
    let (status, v) = call(&ts, "POST", "/v1/sessions", Some(USER_KEY), Some(json!({"character": "aiko"}))).await;
    assert_eq!((status, v["code"].as_str()), (404, Some("unknown_character")));
    let (status, v) = call(&ts, "DELETE", "/v1/admin/characters/mika", Some(ADMIN_KEY), None).await;
    assert_eq!((status, v["code"].as_str()), (409, Some("last_character")));
    let (status, v) = call(&ts, "GET", "/v1/admin/policies/default", Some(ADMIN_KEY), None).await;
    assert_eq!(
        (status, v["version"].as_i64(), v["policy"]["deny"].clone()),
        (200, Some(2), json!(["green parrot"])),
        "{v}"
    );
    let (_, versions) = call(&ts, "GET", "/v1/admin/policies/default/versions", Some(ADMIN_KEY), None).await;
    let numbers: Vec<i64> = versions.as_array().unwrap().iter().map(|v| v["version"].as_i64().unwrap()).collect();
    assert_eq!(numbers, [2, 1], "every version is kept, newest first");
    let (status, v) = call(&ts, "DELETE", "/v1/admin/policies/default", Some(ADMIN_KEY), None).await;
    assert_eq!((status, v["version"].as_i64()), (200, Some(3)), "{v}");
    let (_, v) = call(&ts, "GET", "/v1/admin/policies/default", Some(ADMIN_KEY), None).await;
    assert_eq!((v["version"].as_i64(), v["source"].as_str()), (Some(0), Some("config")), "default reverts: {v}");
    let actor = admin_actor();
    let log = audit(&ts).await;
    for (action, target) in [("character.put", "mika"), ("character.put", "mika"), ("character.delete", "aiko")] {
        assert!(
            log.iter().any(|e| *e == (actor.clone(), action.to_owned(), target.to_owned())),
            "{action} {target} by {actor} in {log:?}"
        );
    }
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn character_edits_and_the_audit_log_survive_a_restart_on_sqlite() {
    edits_survive_a_restart(format!("sqlite://{}/kotodama.db", temp_dir("admin").display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn character_edits_and_the_audit_log_survive_a_restart_on_postgres() {
    let db = PgTestDb::create().await;
    edits_survive_a_restart(db.url.clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_are_listed_ended_and_exported_with_their_transcript() {
    let ts = TestServer::start_with(keys).await;
    let (id, token, offer_url) = create(&ts, json!({"user_id": "u-42"})).await;
    let (status, v) = call(&ts, "POST", "/v1/sessions", Some(USER_KEY), None).await;
    assert_eq!(status, 201, "{v}");
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.send_text(r#"{"type":"text","text":"Hello admin."}"#).await;
    client
        .silence_until("the agent's reply", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        })
        .await;

    let (_, list) = call(&ts, "GET", "/v1/admin/sessions", Some(ADMIN_KEY), None).await;
    let ours = list.as_array().unwrap().iter().find(|s| s["session_id"] == id.as_str()).cloned().expect("listed");
    assert_eq!(
        (ours["node"].as_str(), ours["provider"].as_str(), ours["state"].as_str()),
        (Some(ts.server.advertise_url()), Some("scripted"), Some("connected")),
        "{ours}"
    );
    assert!(ours["agent_state"].is_string(), "a session on this node has its agent state: {ours}");
    assert_eq!(list.as_array().unwrap().len(), 2, "the session never connected is listed too: {list}");

    assert_eq!(call(&ts, "DELETE", &format!("/v1/admin/sessions/{id}"), Some(ADMIN_KEY), None).await.0, 200);
    client.wait_event("session.ended", Duration::from_secs(5), |e| e["type"] == "session.ended").await;
    let (status, v) = call(&ts, "DELETE", &format!("/v1/admin/sessions/{id}"), Some(ADMIN_KEY), None).await;
    assert_eq!(status, 404, "ending an ended session: {v}");

    let (_, transcript) = call(&ts, "GET", &format!("/v1/sessions/{id}/transcript"), Some(USER_KEY), None).await;
    let (_, export) = call(&ts, "GET", &format!("/v1/admin/sessions/{id}/export"), Some(ADMIN_KEY), None).await;
    let turns = export["turns"].as_array().unwrap();
    assert!(turns.len() >= 2, "user and agent turns: {export}");
    assert_eq!(turns.len(), transcript.as_array().unwrap().len());
    for (t, e) in turns.iter().zip(transcript.as_array().unwrap()) {
        assert_eq!(
            (&t["seq"], &t["role"], &t["text"], &t["interrupted"]),
            (&e["seq"], &e["role"], &e["text"], &e["interrupted"])
        );
    }
    assert_eq!((export["id"].as_str(), export["user_id"].as_str()), (Some(id.as_str()), Some("u-42")));
    let (status, text) =
        call(&ts, "GET", &format!("/v1/admin/sessions/{id}/export?format=text"), Some(ADMIN_KEY), None).await;
    let text = text.as_str().unwrap_or_default().to_owned();
    assert_eq!(status, 200);
    assert!(text.contains("user: Hello admin."), "{text}");
    let agent_text = turns.iter().find(|t| t["role"] == "agent").unwrap()["text"].as_str().unwrap();
    assert!(text.contains(&format!("agent: {agent_text}")), "{text}");
    let (_, user) = call(&ts, "GET", "/v1/admin/users/u-42/export", Some(ADMIN_KEY), None).await;
    assert_eq!(user["sessions"][0]["turns"], export["turns"], "{user}");
    let (status, _) = call(&ts, "GET", "/v1/admin/users/nobody/export", Some(ADMIN_KEY), None).await;
    assert_eq!(status, 404);
    let log = audit(&ts).await;
    for action in ["session.list", "session.end", "session.export", "user.export"] {
        assert!(log.iter().any(|(a, act, _)| *a == admin_actor() && act == action), "{action} in {log:?}");
    }
    client.close().await;
    ts.server.shutdown().await.unwrap();
}
