//! Budgets end to end (`[budget]`, `src/session/budget.rs`): a session that reaches its token
//! limit (the provider's reported usage: the fake OpenAI server's `response.done.usage`) or its
//! minute limit gets `budget.exceeded`, then `session.ended {reason: "budget_exceeded"}`; what
//! was heard is the stored transcript and the usage is stored; a user's daily limit carries
//! over to their next session.

mod common;

use std::time::Duration;

use common::fake_openai::{FakeOpenAi, FakeOptions, INPUT_TOKENS, Reply, reply_speech};
use common::*;
use kotodama::store::Store as _;
use serde_json::{Value, json};

fn agent_audio_ms(log: &[Received]) -> f64 {
    log.iter().map(|r| if let Received::Audio { samples, .. } = r { *samples as f64 / 48.0 } else { 0.0 }).sum()
}

fn ended(evs: &[Value]) -> bool {
    evs.iter().any(|e| e["type"] == "session.ended")
}

async fn create(ts: &TestServer, body: Value) -> (String, String, String) {
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let v: Value = r.json().await.unwrap();
    let s = |k: &str| v[k].as_str().unwrap().to_owned();
    (s("session_id"), s("token"), s("offer_url"))
}

/// The stored usage of `id`, once the writer has written it.
async fn stored_usage(ts: &TestServer, id: &str) -> kotodama::store::StoredUsage {
    for _ in 0..500 {
        if let Some(u) = ts.server.store().usage(id).await.unwrap() {
            return u;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no usage stored for {id}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reaching_its_token_limit_is_told_cut_where_heard_and_ended_with_its_transcript() {
    let (text, audio) = reply_speech();
    let reply_ms = audio.len() as f64 / 24.0;
    let fake = FakeOpenAi::start(FakeOptions::default(), vec![Reply::Speech { text: text.clone(), audio }]).await;
    // The first response's reported usage (>= INPUT_TOKENS) reaches a 100-token budget.
    let ts = TestServer::start_openai(&fake.url(), |c| c.budget.tokens = Some(100)).await;
    let (id, token, offer_url) = create(&ts, json!({})).await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.send_text(r#"{"type":"text","text":"Tell me about yourself."}"#).await;
    client.silence_until("the session to end", Duration::from_secs(30), ended).await;

    let events = client.events();
    let budget: Vec<&Value> = events.iter().filter(|e| e["type"] == "budget.exceeded").collect();
    assert_eq!(budget.len(), 1, "{events:#?}");
    let b = budget[0];
    assert_eq!(
        (b["kind"].as_str(), b["scope"].as_str(), b["unit"].as_str()),
        (Some("tokens"), Some("session"), Some("tokens"))
    );
    assert_eq!((b["limit"].as_u64(), b["action"].as_str()), (Some(100), Some("end")));
    let used = b["used"].as_u64().unwrap();
    assert!(used > INPUT_TOKENS, "the provider's report counts: {b}");
    let end = events.iter().find(|e| e["type"] == "session.ended").unwrap();
    assert_eq!(end["reason"], "budget_exceeded");

    // Heard: the start of the reply, cut when the usage arrived (the fake streams 4x real time).
    let log = client.log();
    let at = log.iter().position(|r| matches!(r, Received::Event { event, .. } if event["type"] == "budget.exceeded"));
    let heard_ms = agent_audio_ms(&log[..at.unwrap()]);
    assert!(heard_ms > 0.0 && heard_ms < reply_ms, "part of the {reply_ms} ms reply was heard: {heard_ms} ms");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // RTP and the data channel are not ordered with each other: frames sent before the cut may
    // arrive just after the event, never more than the path holds.
    let after_ms = agent_audio_ms(&client.log()[at.unwrap()..]);
    assert!(after_ms <= 200.0, "the audio stops at the limit: {after_ms} ms after it");

    let info = ts.session_json(&id, &token).await;
    assert_eq!((info["state"].as_str(), info["end_reason"].as_str()), (Some("ended"), Some("budget_exceeded")));
    let stored = transcript_turns(&ts.transcript_json(&id, &token).await);
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[0], ("user".into(), "Tell me about yourself.".into(), false));
    let (role, heard, interrupted) = &stored[1];
    assert!(role == "agent" && *interrupted && !heard.is_empty() && text.starts_with(heard.as_str()), "{stored:?}");

    let usage = stored_usage(&ts, &id).await;
    assert_eq!((usage.usage.totals.tokens, usage.usage.tokens_reported), (used, true));
    assert_eq!(usage.usage.exceeded, Some(kotodama::session::budget::Kind::Tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_reaching_its_minute_limit_is_told_and_ended_with_its_transcript() {
    // 0.05 minutes: 3 s of session time.
    let ts = TestServer::start_with(|c| c.budget.minutes = Some(0.05)).await;
    let (id, token, offer_url) = create(&ts, json!({})).await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.send_text(r#"{"type":"text","text":"Hello there"}"#).await;
    client.silence_until("the session to end", Duration::from_secs(20), ended).await;

    let events = client.events();
    let b = events.iter().find(|e| e["type"] == "budget.exceeded").expect("budget.exceeded");
    assert_eq!(
        (b["kind"].as_str(), b["limit"].as_u64(), b["used"].as_u64(), b["unit"].as_str()),
        (Some("minutes"), Some(3), Some(3), Some("seconds")),
        "{b}"
    );
    assert_eq!(events.iter().find(|e| e["type"] == "session.ended").unwrap()["reason"], "budget_exceeded");
    let stored = transcript_turns(&ts.transcript_json(&id, &token).await);
    assert_eq!(stored.first(), Some(&("user".into(), "Hello there".into(), false)), "{stored:?}");
    let usage = stored_usage(&ts, &id).await;
    assert!((3_000..4_000).contains(&usage.usage.totals.duration_ms), "{usage:?}");
    assert_eq!(usage.usage.exceeded, Some(kotodama::session::budget::Kind::Minutes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_daily_token_limit_carries_over_to_their_next_session() {
    // Without usage reports (the scripted provider) tokens are estimated from the transcript.
    let ts = TestServer::start_with(|c| c.budget.user_tokens_per_day = Some(5)).await;
    let (first, token, offer_url) = create(&ts, json!({"user_id": "user-42"})).await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.send_text(r#"{"type":"text","text":"Hello there, how are you today?"}"#).await;
    client.silence_until("the first session to end", Duration::from_secs(20), ended).await;
    let b = client.events().into_iter().find(|e| e["type"] == "budget.exceeded").unwrap();
    assert_eq!((b["scope"].as_str(), b["limit"].as_u64()), (Some("user_day"), Some(5)), "{b}");
    let used = stored_usage(&ts, &first).await.usage.totals.tokens;
    assert!(used >= 5, "31 bytes are 8 estimated tokens: {used}");

    // The next session of the same user starts with nothing left: told at once, ended.
    let (_, token, offer_url) = create(&ts, json!({"user_id": "user-42"})).await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.silence_until("the second session to end", Duration::from_secs(20), ended).await;
    let b = client.events().into_iter().find(|e| e["type"] == "budget.exceeded").unwrap();
    assert_eq!((b["scope"].as_str(), b["used"].as_u64()), (Some("user_day"), Some(used)), "{b}");

    // Another user is not affected.
    let (_, token, offer_url) = create(&ts, json!({"user_id": "user-7"})).await;
    let client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!client.events().iter().any(|e| e["type"] == "budget.exceeded"), "{:#?}", client.events());
}
