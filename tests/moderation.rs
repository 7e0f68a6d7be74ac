//! Moderation before speech, end to end: the fake OpenAI Realtime server replies with a
//! sentence on the test deny list (`moderation.deny`, what `KOTODAMA_MODERATION_DENY` sets); the
//! client hears the reply up to that sentence, then the fallback line; it gets a `moderation`
//! event and no event carries the denied text; the stored transcript holds what was heard plus
//! the fallback; the review queue has the flag, which an admin lists, filters and resolves; the
//! counter is in `/metrics`.

mod common;

use std::time::Duration;

use common::fake_openai::{FakeOpenAi, FakeOptions, Reply, reply_speech, short_speech};
use common::*;
use serde_json::{Value, json};

const USER_KEY: &str = "moderation-test-user-key-0123456789";
const ADMIN_KEY: &str = "moderation-test-admin-key-0123456789";
const REPLY: &str =
    "Hi! I am Aiko. It is nice to meet you. The purple monkey ate my homework today. I am happy to chat.";

async fn admin(ts: &TestServer, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = ts.http.request(method.parse().unwrap(), format!("{}{path}", ts.base)).bearer_auth(ADMIN_KEY);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let r = req.send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// A cascade whose STT, LLM and TTS are the fake OpenAI-compatible server `fake`.
fn cascade_over(fake: &common::fake_openai_http::Fake) -> std::sync::Arc<dyn kotodama::providers::RealtimeProvider> {
    use kotodama::providers::cascade::openai::{Endpoint, OpenAiChat, OpenAiSpeech, OpenAiStt, client};
    use kotodama::providers::cascade::{CascadeConfig, CascadeProvider};
    use std::sync::Arc;
    let endpoint = || {
        let mut ep = Endpoint::new(&fake.url(), "test-model");
        ep.timeout = Duration::from_secs(3);
        ep
    };
    let c = client();
    Arc::new(
        CascadeProvider::new(CascadeConfig {
            name: "cascade".into(),
            stt: vec![Arc::new(OpenAiStt::new(endpoint(), c.clone(), None))],
            llm: vec![Arc::new(OpenAiChat::new(endpoint(), c.clone()))],
            tts: vec![Arc::new(OpenAiSpeech::new(endpoint(), c.clone()))],
            token_budget: 2000,
            max_reply_tokens: 200,
        })
        .unwrap(),
    )
}

fn agent_audio_ms(log: &[Received]) -> f64 {
    log.iter().map(|r| if let Received::Audio { samples, .. } = r { *samples as f64 / 48.0 } else { 0.0 }).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_sentence_is_cut_replaced_by_the_fallback_and_queued_for_review() {
    let (_, audio) = reply_speech();
    let (_, fallback_audio) = short_speech(1.5);
    let fallback = kotodama::config::ModerationSettings::default().fallback;
    let script = vec![
        Reply::Speech { text: REPLY.into(), audio },
        Reply::Speech { text: fallback.clone(), audio: fallback_audio },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.api_keys = vec![USER_KEY.into()];
        c.admin_api_keys = vec![ADMIN_KEY.into()];
        c.moderation.deny = vec!["purple monkey".into()];
    })
    .await;
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).bearer_auth(USER_KEY).json(&json!({})).send().await;
    let created: Value = r.unwrap().json().await.unwrap();
    let (id, token) = (created["session_id"].as_str().unwrap().to_owned(), created["token"].as_str().unwrap());
    let mut client = TestClient::connect(&ts, created["offer_url"].as_str().unwrap(), token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.send_text(r#"{"type":"text","text":"Tell me about your day."}"#).await;
    client.silence_until("the fallback line to be spoken", Duration::from_secs(30), |evs| said(evs, &fallback)).await;

    let events = client.events();
    let moderation: Vec<&Value> = events.iter().filter(|e| e["type"] == "moderation").collect();
    assert_eq!(moderation.len(), 1, "{events:#?}");
    assert_eq!(moderation[0]["category"], "deny");
    for e in &events {
        assert!(!e.to_string().to_lowercase().contains("purple"), "an event carries the denied text: {e}");
    }
    // Heard: the reply up to the flagged sentence (cut), then the fallback's audio.
    let log = client.log();
    let at_flag =
        log.iter().position(|r| matches!(r, Received::Event { event, .. } if event["type"] == "moderation")).unwrap();
    let (before, after) = (agent_audio_ms(&log[..at_flag]), agent_audio_ms(&log[at_flag..]));
    // The cut comes as soon as the flagged sentence's text is known; with a transcript running
    // ahead of the audio (as here and at OpenAI) that is before the sentence is spoken.
    assert!(before > 0.0, "the start of the reply was heard: {before} ms");
    assert!(after > 1000.0, "the fallback line was heard: {after} ms");
    let truncate = fake.conn(0).of_type("conversation.item.truncate");
    assert_eq!(truncate.len(), 1, "the model keeps only what was heard");

    // The stored transcript: the user's turn, what was heard (cut), the fallback.
    let r = ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(USER_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let turns = transcript_turns(&ts.transcript_json(&id, USER_KEY).await);
    assert_eq!(turns.len(), 3, "{turns:?}");
    assert_eq!(turns[0].0, "user");
    let heard = &turns[1];
    assert!(heard.0 == "agent" && heard.2 && !heard.1.is_empty() && REPLY.starts_with(&heard.1), "{heard:?}");
    assert!(!heard.1.contains("purple"), "{heard:?}");
    assert_eq!(turns[2], ("agent".into(), fallback.clone(), false));

    // The review queue.
    let (status, flags) = admin(&ts, "GET", &format!("/v1/admin/flags?session_id={id}"), None).await;
    assert_eq!(status, 200, "{flags}");
    let flags = flags.as_array().unwrap().clone();
    assert_eq!(flags.len(), 1, "{flags:?}");
    let flag = &flags[0];
    assert_eq!((flag["category"].as_str(), flag["status"].as_str()), (Some("deny"), Some("open")), "{flag}");
    assert!(flag["text"].as_str().unwrap().contains("purple monkey"), "the reviewer sees the text: {flag}");
    assert!(flag["policy_version"].as_str().is_some_and(|v| !v.is_empty()), "{flag}");
    let (_, other) = admin(&ts, "GET", "/v1/admin/flags?category=violence", None).await;
    assert_eq!(other, json!([]), "filtered by category");
    let flag_id = flag["id"].as_str().unwrap();
    let resolve = format!("/v1/admin/flags/{flag_id}/resolve");
    let (status, v) = admin(&ts, "POST", &resolve, Some(json!({"resolution": "fallback was right"}))).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("resolved")), "{v}");
    assert_eq!(admin(&ts, "POST", &resolve, None).await.0, 409, "resolved once");
    assert_eq!(admin(&ts, "GET", "/v1/admin/flags", None).await.1, json!([]), "no open flags left");
    let (_, resolved) = admin(&ts, "GET", "/v1/admin/flags?status=resolved", None).await;
    assert_eq!(resolved[0]["resolution"], "fallback was right", "{resolved}");
    let r = ts.http.get(format!("{}/v1/admin/flags", ts.base)).bearer_auth(USER_KEY).send().await.unwrap();
    assert_eq!(r.status(), 403);

    let metrics = ts.http.get(format!("{}/metrics", ts.base)).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("kotodama_moderation_flags_total{category=\"deny\"}")),
        "the flag is counted"
    );
    client.close().await;
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cascade_checks_each_sentence_before_tts_and_speaks_the_fallback_instead() {
    use common::fake_openai_http::{FakeBehavior, start_fake};

    let script = vec![
        (Duration::from_millis(20), r#"{"emotion": "happy", "text": "The sun is out today. "#.to_owned()),
        (Duration::from_millis(300), "The purple monkey stole my lunch. ".into()),
        (Duration::from_millis(20), r#"It will rain later."}"#.into()),
    ];
    let fake = start_fake(FakeBehavior { llm_script: script, ..Default::default() }).await;
    let provider = cascade_over(&fake);
    let ts = TestServer::start_with_providers(
        |c| {
            c.provider = Some("cascade".into());
            c.admin_api_keys = vec![ADMIN_KEY.into()];
            c.api_keys = vec![USER_KEY.into()];
            c.moderation.deny = vec!["purple monkey".into()];
        },
        move |_| vec![provider],
    )
    .await;
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).bearer_auth(USER_KEY).json(&json!({})).send().await;
    let created: Value = r.unwrap().json().await.unwrap();
    let id = created["session_id"].as_str().unwrap().to_owned();
    let token = created["token"].as_str().unwrap();
    let mut client = TestClient::connect(&ts, created["offer_url"].as_str().unwrap(), token).await;
    client
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    let fallback = kotodama::config::ModerationSettings::default().fallback;
    client.silence(Duration::from_millis(200)).await;
    client
        .ask_until("the reply with the fallback", Duration::from_secs(30), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        })
        .await;

    let tts: Vec<String> = fake.log().tts.into_iter().map(|(_, text)| text).collect();
    assert!(tts.iter().all(|t| !t.contains("purple")), "the denied sentence never reached TTS: {tts:?}");
    assert!(tts.iter().any(|t| t.contains(&fallback)), "the fallback was synthesized: {tts:?}");
    assert!(tts.iter().all(|t| !t.contains("rain")), "the rest of the flagged reply is dropped: {tts:?}");
    let events = client.events();
    assert!(events.iter().any(|e| e["type"] == "moderation" && e["category"] == "deny"), "{events:#?}");
    for e in &events {
        assert!(!e.to_string().to_lowercase().contains("purple"), "an event carries the denied text: {e}");
    }
    let (_, flags) = admin(&ts, "GET", &format!("/v1/admin/flags?session_id={id}"), None).await;
    assert_eq!(flags.as_array().map(Vec::len), Some(1), "{flags}");
    assert!(flags[0]["text"].as_str().unwrap().contains("purple monkey"), "{flags}");
    client.close().await;
    ts.server.shutdown().await.unwrap();
}

/// One cascade turn with `script` as the model's reply and `endpoint` as the moderation
/// endpoint: (texts sent to TTS, events the client got).
async fn cascade_turn_with_endpoint(
    script: &str,
    endpoint: kotodama::config::moderation::EndpointSettings,
) -> (Vec<String>, Vec<Value>) {
    use common::fake_openai_http::{FakeBehavior, start_fake};

    let deltas = vec![(Duration::from_millis(20), json!({"emotion": "happy", "text": script}).to_string())];
    let fake = start_fake(FakeBehavior { llm_script: deltas, ..Default::default() }).await;
    let provider = cascade_over(&fake);
    let ts = TestServer::start_with_providers(
        |c| {
            c.provider = Some("cascade".into());
            c.moderation.endpoint = Some(endpoint);
        },
        move |_| vec![provider],
    )
    .await;
    let (_, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    client.silence(Duration::from_millis(200)).await;
    client
        .ask_until("the reply", Duration::from_secs(30), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        })
        .await;
    let tts = fake.log().tts.into_iter().map(|(_, text)| text).collect();
    let events = client.events();
    client.close().await;
    ts.server.shutdown().await.unwrap();
    (tts, events)
}

/// A fake OpenAI-compatible `/v1/moderations`: flags inputs mentioning "weather" as
/// harassment, answers "clean" for the rest after `delay`.
async fn fake_moderations(delay: Duration) -> String {
    use axum::routing::post;
    let app = axum::Router::new().route(
        "/v1/moderations",
        post(move |axum::Json(body): axum::Json<Value>| async move {
            let input = body["input"].as_str().unwrap_or_default().to_owned();
            if input.contains("weather") {
                return axum::Json(json!({"id": "modr-1", "model": body["model"], "results": [
                    {"flagged": true, "categories": {"hate": false, "harassment": true}}
                ]}));
            }
            tokio::time::sleep(delay).await;
            axum::Json(
                json!({"id": "modr-2", "model": body["model"], "results": [{"flagged": false, "categories": {}}]}),
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

/// The fake moderation endpoint at `url` with a 1 s deadline (loaded test machines answer a
/// first request slowly).
fn endpoint_at(url: &str, fail_closed: bool) -> kotodama::config::moderation::EndpointSettings {
    kotodama::config::moderation::EndpointSettings {
        url: url.to_owned(),
        api_key: None,
        model: "omni-moderation-latest".into(),
        timeout_ms: 1000,
        fail_closed,
    }
}

/// The category of the first `moderation` event.
fn moderation_category(events: &[Value]) -> Option<String> {
    events.iter().find(|e| e["type"] == "moderation").map(|e| e["category"].as_str().unwrap().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_moderation_endpoint_flags_and_a_timeout_follows_the_fail_open_or_closed_choice() {
    let fallback = kotodama::config::ModerationSettings::default().fallback;
    let url = fake_moderations(Duration::from_secs(4)).await;
    let endpoint = |fail_closed: bool| endpoint_at(&url, fail_closed);

    let (tts, events) = cascade_turn_with_endpoint("Let us talk about the weather.", endpoint(false)).await;
    assert_eq!(moderation_category(&events).as_deref(), Some("harassment"), "the endpoint's category: {events:#?}");
    assert_eq!(tts, std::slice::from_ref(&fallback), "only the fallback was synthesized");

    let (tts, events) = cascade_turn_with_endpoint("The sun is out today.", endpoint(true)).await;
    assert_eq!(moderation_category(&events).as_deref(), Some("moderation_unavailable"), "fail closed: {events:#?}");
    assert_eq!(tts, std::slice::from_ref(&fallback), "nothing unchecked was spoken");

    let (tts, events) = cascade_turn_with_endpoint("The sun is out today.", endpoint(false)).await;
    assert_eq!(moderation_category(&events), None, "fail open: {events:#?}");
    assert_eq!(tts, ["The sun is out today."], "spoken unchecked");
}

/// Whether an agent's final transcript says `text`.
fn said(evs: &[Value], text: &str) -> bool {
    evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true && e["text"] == text)
}

/// A connected client of a new session (`body` as the creation request), after `session.ready`.
async fn join(ts: &TestServer, body: Value) -> (String, TestClient) {
    let r = ts.http.post(format!("{}/v1/sessions", ts.base)).bearer_auth(USER_KEY).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let id = created["session_id"].as_str().unwrap().to_owned();
    let client =
        TestClient::connect(ts, created["offer_url"].as_str().unwrap(), created["token"].as_str().unwrap()).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    (id, client)
}

/// The flags of session `id` (all statuses).
async fn flags_of(ts: &TestServer, id: &str) -> Vec<Value> {
    let (status, v) = admin(ts, "GET", &format!("/v1/admin/flags?status=all&session_id={id}"), None).await;
    assert_eq!(status, 200, "{v}");
    v.as_array().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_edit_reaches_the_next_session_a_live_one_keeps_its_version_and_characters_override() {
    const PARROT: &str = "Hello there. The green parrot sings at dawn. Have a nice day.";
    const HOMEWORK: &str = "Hello there. Do your homework before dinner. Have fun.";
    const KAI_FALLBACK: &str = "Let's talk about games instead.";
    let fallback = kotodama::config::ModerationSettings::default().fallback;
    let speech = |text: &str| Reply::Speech { text: text.into(), audio: short_speech(2.0).1 };
    let script = vec![speech(PARROT), speech(PARROT), speech(&fallback), speech(HOMEWORK), speech(KAI_FALLBACK)];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.api_keys = vec![USER_KEY.into()];
        c.admin_api_keys = vec![ADMIN_KEY.into()];
    })
    .await;

    // Session 1 starts under the configured policy; then the deny list gets "green parrot".
    let (first, mut one) = join(&ts, json!({})).await;
    let deny = Some(json!({"phrases": ["green parrot"]}));
    let (status, v) = admin(&ts, "PUT", "/v1/admin/policies/default/lists/deny", deny).await;
    assert_eq!((status, v["version"].as_i64(), v["phrases"].clone()), (200, Some(1), json!(["green parrot"])), "{v}");
    one.send_text(r#"{"type":"text","text":"Tell me about birds."}"#).await;
    one.silence_until("the whole reply", Duration::from_secs(30), |evs| said(evs, PARROT)).await;
    assert!(!one.events().iter().any(|e| e["type"] == "moderation"), "a live session keeps its policy version");
    assert!(flags_of(&ts, &first).await.is_empty());
    one.close().await;

    // Session 2 uses version 1: the sentence is cut and replaced, the flag names the version.
    let (second, mut two) = join(&ts, json!({})).await;
    two.send_text(r#"{"type":"text","text":"Tell me about birds."}"#).await;
    two.silence_until("the fallback", Duration::from_secs(30), |evs| said(evs, &fallback)).await;
    assert!(two.events().iter().all(|e| !e.to_string().contains("parrot")), "{:#?}", two.events());
    let flags = flags_of(&ts, &second).await;
    assert_eq!(flags.len(), 1, "{flags:?}");
    assert_eq!((flags[0]["policy_version"].as_str(), flags[0]["source"].as_str()), (Some("default@1"), Some("agent")));
    two.close().await;

    // A character naming a policy that does not exist is refused; once it exists, the
    // character's next session uses it with the character's own fallback line.
    let kai =
        json!({"name": "Kai", "persona": "You are Kai.", "moderation": {"policy": "kids", "fallback": KAI_FALLBACK}});
    let (status, v) = admin(&ts, "PUT", "/v1/admin/characters/kai", Some(kai.clone())).await;
    assert_eq!((status, v["code"].as_str()), (422, Some("unknown_policy")), "{v}");
    let (status, v) = admin(&ts, "PUT", "/v1/admin/policies/kids", Some(json!({"deny": ["homework"]}))).await;
    assert_eq!((status, v["version"].as_i64(), v["source"].as_str()), (200, Some(1), Some("admin")), "{v}");
    assert_eq!(admin(&ts, "PUT", "/v1/admin/characters/kai", Some(kai)).await.0, 200);
    let (third, mut three) = join(&ts, json!({"character": "kai"})).await;
    three.send_text(r#"{"type":"text","text":"What should I do now?"}"#).await;
    three.silence_until("Kai's fallback", Duration::from_secs(30), |evs| said(evs, KAI_FALLBACK)).await;
    let flags = flags_of(&ts, &third).await;
    assert_eq!(flags.len(), 1, "{flags:?}");
    let version = flags[0]["policy_version"].as_str().unwrap();
    assert!(version.starts_with("kids@1+kai-"), "the kids policy with Kai's additions: {version}");
    let asked = fake.conn(2).of_type("response.create");
    let instructions = asked.last().map(|r| r["response"]["instructions"].to_string()).unwrap_or_default();
    assert!(instructions.contains(KAI_FALLBACK), "the model was asked for Kai's fallback line: {asked:?}");
    three.close().await;

    // Versions, deletion rules and the audit log.
    let (status, v) = admin(&ts, "GET", "/v1/admin/policies/default/versions", None).await;
    assert_eq!((status, v.as_array().map(Vec::len)), (200, Some(1)), "{v}");
    let (status, v) = admin(&ts, "DELETE", "/v1/admin/policies/kids", None).await;
    assert_eq!((status, v["code"].as_str()), (409, Some("policy_in_use")), "{v}");
    let (status, v) =
        admin(&ts, "PUT", "/v1/admin/policies/kids", Some(json!({"categories": {"x": {"patterns": ["("]}}}))).await;
    assert_eq!((status, v["code"].as_str()), (422, Some("bad_policy")), "{v}");
    let (status, list) = admin(&ts, "GET", "/v1/admin/policies", None).await;
    let ids: Vec<(&str, i64)> =
        list.as_array().unwrap().iter().map(|p| (p["id"].as_str().unwrap(), p["version"].as_i64().unwrap())).collect();
    assert_eq!((status, ids), (200, vec![("default", 1), ("kids", 1)]), "{list}");
    let (_, audit) = admin(&ts, "GET", "/v1/admin/audit?limit=1000", None).await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    for a in ["policy.deny.put", "policy.put", "policy.versions", "policy.list"] {
        assert!(actions.contains(&a), "{a} is audit-logged: {actions:?}");
    }
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_input_is_checked_before_the_model_typed_and_transcribed() {
    let fallback = kotodama::config::ModerationSettings::default().fallback;
    let speech = |text: &str| Reply::Speech { text: text.into(), audio: short_speech(1.5).1 };
    let script = vec![speech(&fallback), speech("Sure, I can tell you all about it."), speech(&fallback)];
    let opts =
        FakeOptions { user_transcript: "Please tell me all about the purple monkey.".into(), ..Default::default() };
    let fake = FakeOpenAi::start(opts, script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.api_keys = vec![USER_KEY.into()];
        c.admin_api_keys = vec![ADMIN_KEY.into()];
        c.moderation.deny = vec!["purple monkey".into()];
        c.moderation.check_user_input = true;
    })
    .await;
    let (id, mut client) = join(&ts, json!({})).await;

    // Typed: never sent to the model; the fallback is said instead.
    client.send_text(r#"{"type":"text","text":"What do you know about the purple monkey?"}"#).await;
    client.silence_until("the fallback", Duration::from_secs(30), |evs| said(evs, &fallback)).await;
    let moderation: Vec<Value> = client.events().into_iter().filter(|e| e["type"] == "moderation").collect();
    assert_eq!(moderation.len(), 1, "{moderation:?}");
    assert_eq!((moderation[0]["category"].as_str(), moderation[0]["source"].as_str()), (Some("deny"), Some("user")));

    // Spoken: the provider's transcript of the user is checked; its reply is cancelled and
    // replaced by the fallback.
    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client
        .silence_until("a second fallback", Duration::from_secs(30), |evs| {
            evs.iter().filter(|e| e["type"] == "moderation").count() == 2
                && evs.iter().filter(|e| said(std::slice::from_ref(e), &fallback)).count() == 2
        })
        .await;
    let events = client.events();
    for e in &events {
        assert!(!e.to_string().to_lowercase().contains("purple"), "an event carries the denied text: {e}");
    }
    let sent: Vec<Value> = fake.conn(0).of_type("conversation.item.create");
    assert!(sent.iter().all(|m| !m.to_string().contains("purple")), "the model never got the typed text: {sent:?}");
    let (status, flags) = admin(&ts, "GET", &format!("/v1/admin/flags?session_id={id}&source=user"), None).await;
    assert_eq!((status, flags.as_array().map(Vec::len)), (200, Some(2)), "{flags}");
    assert!(flags.as_array().unwrap().iter().all(|f| f["text"].as_str().unwrap().contains("purple monkey")));
    client.close().await;
    let r = ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(USER_KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let transcript = ts.transcript_json(&id, USER_KEY).await;
    assert!(
        !transcript.to_string().contains("purple"),
        "the stored transcript holds no denied user text: {transcript}"
    );
    ts.server.shutdown().await.unwrap();
}

/// One typed turn against the fake OpenAI Realtime server replying `reply`, with `endpoint` as
/// the moderation endpoint: the events the client got.
async fn realtime_turn_with_endpoint(
    reply: &str,
    endpoint: kotodama::config::moderation::EndpointSettings,
) -> Vec<Value> {
    let fallback = kotodama::config::ModerationSettings::default().fallback;
    let script = vec![
        Reply::Speech { text: reply.into(), audio: short_speech(2.0).1 },
        Reply::Speech { text: fallback.clone(), audio: short_speech(1.5).1 },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.api_keys = vec![USER_KEY.into()];
        c.moderation.endpoint = Some(endpoint);
    })
    .await;
    let (_, mut client) = join(&ts, json!({})).await;
    client.send_text(r#"{"type":"text","text":"How is it outside?"}"#).await;
    client
        .silence_until("the reply or the fallback", Duration::from_secs(30), |evs| {
            said(evs, reply) || said(evs, &fallback)
        })
        .await;
    let events = client.events();
    client.close().await;
    ts.server.shutdown().await.unwrap();
    events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_moderation_endpoint_checks_speech_to_speech_replies_and_a_timeout_follows_its_policy() {
    let fallback = kotodama::config::ModerationSettings::default().fallback;
    let url = fake_moderations(Duration::from_secs(4)).await;
    let endpoint = |fail_closed: bool| endpoint_at(&url, fail_closed);

    let events =
        realtime_turn_with_endpoint("Let us talk about the weather today. It is sunny.", endpoint(false)).await;
    assert_eq!(moderation_category(&events).as_deref(), Some("harassment"), "the endpoint's category: {events:#?}");
    assert!(said(&events, &fallback), "the fallback was said");
    assert!(events.iter().all(|e| !e.to_string().contains("weather")), "no event carries the flagged text");

    let events = realtime_turn_with_endpoint("The sun is out today.", endpoint(true)).await;
    assert_eq!(moderation_category(&events).as_deref(), Some("moderation_unavailable"), "fail closed: {events:#?}");
    assert!(said(&events, &fallback) && !said(&events, "The sun is out today."), "nothing unchecked was shown");

    let events = realtime_turn_with_endpoint("The sun is out today.", endpoint(false)).await;
    assert_eq!(moderation_category(&events), None, "fail open: {events:#?}");
    assert!(said(&events, "The sun is out today."), "spoken unchecked: {events:#?}");
}
