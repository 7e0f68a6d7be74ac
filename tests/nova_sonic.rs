//! The Nova Sonic provider end to end through the real AWS SDK path: a real webrtc-rs client
//! talks to the in-process server, whose `nova_sonic` provider drives
//! `aws-sdk-bedrockruntime`'s `InvokeModelWithBidirectionalStream` (SigV4 signing, event-stream
//! framing, event parsing) against a fake Nova Sonic plugged in as the SDK's HTTP client
//! (tests/common/fake_nova.rs; why in-process is written there).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use common::fake_nova::{FakeNova, NReply};
use common::fake_openai::{reply_speech, short_speech};
use common::listen::*;
use common::*;
use kotodama::config::Config;
use kotodama::providers::RealtimeProvider;
use kotodama::providers::nova_sonic::NovaSonicProvider;
use serde_json::{Value, json};

/// Credentials that expire `ttl` after each call, with a new key id each time (so a test sees
/// which credentials signed which stream).
#[derive(Debug)]
struct RotatingCredentials {
    calls: AtomicU32,
    ttl: Option<Duration>,
}

impl ProvideCredentials for RotatingCredentials {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let expiry = self.ttl.map(|t| SystemTime::now() + t);
        future::ProvideCredentials::ready(Ok(Credentials::new(
            format!("AKIDTEST{n}"),
            "secret",
            Some("token".into()),
            expiry,
            "test",
        )))
    }
}

/// The SDK configuration a deployment would have, with the fake as its HTTP client.
fn sdk_config(fake: &FakeNova, ttl: Option<Duration>) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .http_client(fake.clone())
        .credentials_provider(SharedCredentialsProvider::new(RotatingCredentials { calls: AtomicU32::new(0), ttl }))
        .build()
}

async fn start_nova(fake: &FakeNova, ttl: Option<Duration>, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let sdk = sdk_config(fake, ttl);
    TestServer::start_with_providers(
        move |c| {
            c.provider = Some("nova_sonic".into());
            tweak(c);
        },
        move |c| {
            vec![Arc::new(NovaSonicProvider::with_sdk_config(c.nova_sonic.clone(), sdk)) as Arc<dyn RealtimeProvider>]
        },
    )
    .await
}

fn speech(secs: f64) -> (String, Vec<i16>) {
    if secs <= 0.0 { reply_speech() } else { short_speech(secs) }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_turn_with_speculative_then_final_text_through_the_sdk() {
    let (spoken, audio) = speech(2.5);
    let plan = "I plan to say something else entirely.".to_owned();
    let fake = FakeNova::new(vec![NReply::Speech { plan: plan.clone(), spoken: spoken.clone(), audio: audio.clone() }]);
    let ts = start_nova(&fake, None, |c| {
        c.nova_sonic.endpointing_sensitivity = kotodama::providers::nova_sonic::protocol::Sensitivity::High
    })
    .await;
    let (session_id, token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(300)).await;
    ask_and_wait_reply(&mut client, 1).await;

    // The SDK signed the request and every event, and the events came in the documented order.
    let c0 = fake.conn(0);
    assert!(c0.uri.contains("/model/amazon.nova-2-sonic-v1%3A0/invoke-with-bidirectional-stream"), "{}", c0.uri);
    assert!(c0.authorization.starts_with("AWS4-HMAC-SHA256 Credential=AKIDTEST"), "{}", c0.authorization);
    assert!(c0.authorization.contains("/us-east-1/bedrock/aws4_request"), "{}", c0.authorization);
    assert!(c0.signed_frames > 10, "every event is a signed frame: {}", c0.signed_frames);
    let names = c0.names();
    assert_eq!(names[..5], ["sessionStart", "promptStart", "contentStart", "textInput", "contentEnd"], "{names:?}");
    assert_eq!(c0.named("sessionStart")[0]["turnDetectionConfiguration"]["endpointingSensitivity"], "HIGH");
    let prompt = &c0.named("promptStart")[0];
    assert_eq!(prompt["audioOutputConfiguration"]["voiceId"], "tiffany");
    let tools: Vec<&str> = prompt["toolConfiguration"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["toolSpec"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(tools, ["get_time", "set_emotion"]);
    let blocks = c0.text_blocks();
    assert_eq!(blocks[0].0, "SYSTEM");
    assert!(blocks[0].2.starts_with("You are Aiko"), "{blocks:?}");
    let audio_start = c0.named("contentStart").into_iter().filter(|c| c["type"] == "AUDIO").collect::<Vec<_>>();
    assert_eq!(audio_start.len(), 1, "one audio block for the whole stream");
    assert_eq!(audio_start[0]["audioInputConfiguration"]["sampleRateHertz"], 16000);

    // The model heard the user at 16 kHz; the client heard the reply and only the spoken text.
    assert_model_heard_question(&c0.audio, 16_000, client.sent_samples);
    let heard = client.inbox.lock().unwrap().agent_pcm.clone();
    let (heard_secs, reply_secs) = (heard.len() as f64 / 48_000.0, audio.len() as f64 / 24_000.0);
    eprintln!("measured: client heard {heard_secs:.2} s of a {reply_secs:.2} s reply");
    assert!((heard_secs - reply_secs).abs() <= reply_secs * 0.1, "heard {heard_secs:.2} s of {reply_secs:.2} s");
    let evs = client.events();
    assert_eq!(agent_finals(&evs), std::slice::from_ref(&spoken));
    assert!(
        !evs.iter().any(|e| e["text"].as_str().is_some_and(|t| t.contains("something else"))),
        "no SPECULATIVE text shown"
    );
    let user = evs.iter().find(|e| e["type"] == "transcript" && e["role"] == "user" && e["final"] == true).unwrap();
    assert_eq!(user["text"], "What is the weather like?");
    assert_eq!(count(&evs, |e| e["type"] == "error"), 0, "{evs:#?}");
    let tr = transcript(&ts, &session_id, &token).await;
    let agent: Vec<&Value> = tr.iter().filter(|r| r["role"] == "agent").collect();
    assert_eq!(agent[0]["text"], spoken.as_str(), "the stored turn is what was spoken");

    // Ending the session closes the stream in order.
    let res = ts.http.delete(format!("{}/v1/sessions/{session_id}", ts.base)).bearer_auth(&token).send().await.unwrap();
    assert!(res.status().is_success(), "DELETE: {}", res.status());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !fake.conn(0).ended && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        fake.conn(0).closed_in_order,
        "contentEnd, promptEnd, sessionEnd: {:?}",
        fake.conn(0).names().iter().rev().take(3).collect::<Vec<_>>()
    );
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_barge_in_stops_playout_and_keeps_what_was_heard() {
    let (spoken, audio) = speech(0.0);
    let (t2, a2) = speech(1.0);
    let fake = FakeNova::new(vec![
        NReply::Speech { plan: spoken.clone(), spoken: spoken.clone(), audio: audio.clone() },
        NReply::Speech { plan: t2.clone(), spoken: t2.clone(), audio: a2 },
    ]);
    let ts = start_nova(&fake, None, |_| {}).await;
    let (session_id, token, mut client) = connect(&ts).await;
    let (_, question) = wav("user_question.wav");
    client.silence(Duration::from_millis(200)).await;
    client
        .ask_until("the reply to play", Duration::from_secs(20), |evs| evs.iter().any(|e| is_state(e, "speaking")))
        .await;
    client.silence(Duration::from_millis(1500)).await;
    client.speak(&question).await;
    let interrupted =
        client.wait_event("agent.interrupted", Duration::from_secs(5), |e| e["type"] == "agent.interrupted").await;
    client.silence_until("the second reply", Duration::from_secs(20), |evs| agent_finals(evs).contains(&t2)).await;

    let played = interrupted["played_ms"].as_u64().unwrap();
    let heard = agent_ms_after(&client.log(), 0);
    eprintln!("measured: cut after {played} ms; heard {heard:.0} ms in all");
    assert!((1000..4500).contains(&played), "{played} ms");
    assert!(heard < audio.len() as f64 / 24.0 - 2000.0, "the rest of the reply was not played: {heard:.0} ms");
    let tr = transcript(&ts, &session_id, &token).await;
    let cut = tr.iter().find(|r| r["role"] == "agent" && r["interrupted"] == true).expect("the cut turn");
    let cut = cut["text"].as_str().unwrap();
    assert!(spoken.starts_with(cut) && cut.len() < spoken.len() / 2, "heard `{cut}`");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_round_trip_then_a_reply_that_never_comes_times_out() {
    let (t1, a1) = speech(1.0);
    let fake = FakeNova::new(vec![
        NReply::ToolUse { name: "set_emotion".into(), input: json!({"emotion": "happy"}) },
        NReply::Speech { plan: t1.clone(), spoken: t1.clone(), audio: a1 },
        NReply::Silence,
    ]);
    let ts = start_nova(&fake, None, |c| {
        c.nova_sonic.reply_timeout_ms = 1500;
        c.characters = vec![character_with_voices()];
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    let voice = &fake.conn(0).named("promptStart")[0]["audioOutputConfiguration"]["voiceId"];
    assert_eq!(voice, "matthew", "the character's voice for nova_sonic");
    client.send_text(r#"{"type":"text","text":"How are you?"}"#).await;
    client.silence_until("the reply", Duration::from_secs(20), |evs| agent_finals(evs).contains(&t1)).await;
    let c0 = fake.conn(0);
    let blocks = c0.text_blocks();
    assert!(blocks.contains(&("USER".into(), true, "How are you?".into())), "interactive USER text: {blocks:?}");
    let tool_start = c0.named("contentStart").into_iter().find(|c| c["type"] == "TOOL").expect("a TOOL block");
    assert_eq!(tool_start["role"], "TOOL");
    assert_eq!(tool_start["toolResultInputConfiguration"]["toolUseId"], "tooluse-0-2");
    assert_eq!(c0.named("toolResult")[0]["content"], r#"{"ok":true}"#);
    assert!(client.events().iter().any(|e| e["type"] == "emotion" && e["emotion"] == "happy"));

    // The next typed turn gets no answer at all.
    client.send_text(r#"{"type":"text","text":"Still there?"}"#).await;
    let e = client
        .wait_event("reply_timeout", Duration::from_secs(10), |e| e["type"] == "error" && e["code"] == "reply_timeout")
        .await;
    assert!(e["message"].as_str().unwrap().contains("within 1.5 s"), "{e}");
    client
        .silence_until("listening again", Duration::from_secs(5), |evs| {
            evs.iter().rev().find(|e| e["type"] == "state").is_some_and(|e| e["state"] == "listening")
        })
        .await;
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_about_to_expire_renew_the_stream_with_the_heard_history() {
    // Credentials expire in 190 s: the stream may live 190 - 180 = 10 s (the floor).
    renewal_replays_the_heard_history(Some(Duration::from_secs(190)), 420).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shortened_stream_limit_renews_the_stream_with_the_heard_history() {
    renewal_replays_the_heard_history(None, 10).await;
}

/// A conversation across a stream renewal, whose lifetime is 10 s by the credentials (`ttl`) or
/// by `nova_sonic.max_session_secs`.
async fn renewal_replays_the_heard_history(ttl: Option<Duration>, max_session_secs: u64) {
    let (t1, a1) = speech(1.0);
    let (t2, a2) = speech(1.5);
    let fake = FakeNova::new(vec![
        NReply::Speech { plan: t1.clone(), spoken: t1.clone(), audio: a1 },
        NReply::Speech { plan: t2.clone(), spoken: t2.clone(), audio: a2 },
    ]);
    let ts = start_nova(&fake, ttl, |c| {
        c.resilience.quiet_ms = 300;
        c.nova_sonic.max_session_secs = max_session_secs;
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(200)).await;
    ask_and_wait_reply(&mut client, 1).await;
    client
        .silence_until("the renewal", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| e["code"] == "provider_recycled")
        })
        .await;
    // The stream that took over is the newest; one opened before the turn ended was stale
    // (Nova takes history only when a stream opens) and was replaced before the swap.
    let conns = fake.conns();
    let (c0, cn) = (&conns[0], conns.last().unwrap());
    let lived = cn.opened_at.unwrap() - c0.opened_at.unwrap();
    eprintln!("measured: {} streams; the first was replaced after {} ms", conns.len(), lived.as_millis());
    assert!(
        lived >= Duration::from_secs(4) && lived < Duration::from_secs(12),
        "renewed before the 10 s lifetime: {lived:?}"
    );
    let key_id = |a: &str| a.split(',').next().unwrap_or_default().to_owned();
    // The fake chain hands out a new key id per call: the new stream was signed with credentials
    // resolved for it, not with the first ones.
    assert_ne!(key_id(&cn.authorization), key_id(&c0.authorization), "fresh credentials signed the new stream");
    let history: Vec<(String, bool, String)> = cn.text_blocks().into_iter().skip(1).collect();
    assert_eq!(
        history,
        [("USER".into(), false, "What is the weather like?".into()), ("ASSISTANT".into(), false, t1.clone())],
        "the heard history, once, before the audio block"
    );
    let audio_start = cn.names().iter().rposition(|n| n == "contentStart").unwrap();
    assert!(
        cn.events[audio_start]["event"]["contentStart"]["type"] == "AUDIO",
        "the audio block comes after the history"
    );
    client
        .silence_until("the old streams to close", Duration::from_secs(5), |_| {
            fake.conns()[..conns.len() - 1].iter().all(|c| c.ended)
        })
        .await;
    assert!(fake.conns()[..conns.len() - 1].iter().all(|c| c.closed_in_order), "the old streams were closed in order");
    let cn_opened = cn.opened_at.unwrap();

    // The next turn is answered by the new stream.
    ask_and_wait_reply(&mut client, 2).await;
    let last = fake
        .conns()
        .into_iter()
        .rev()
        .find(|c| !c.audio.is_empty() && speech_span(&c.audio, 16_000, 300.0).is_some())
        .unwrap();
    assert!(last.opened_at.unwrap() >= cn_opened, "a renewed stream heard turn 2");
    assert_eq!(agent_finals(&client.events()), [t1, t2]);
    assert_eq!(
        count(&client.events(), |e| e["type"] == "error" && e["code"] != "provider_recycled"),
        0,
        "{:#?}",
        client.events()
    );
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_that_keeps_failing_is_restarted_three_times_then_given_up() {
    let (t, a) = speech(1.0);
    let fail = || NReply::FailAfter { spoken: t.clone(), audio: a.clone(), after: Duration::ZERO };
    let fake = FakeNova::new(vec![fail(), fail(), fail(), fail(), fail()]);
    let ts = start_nova(&fake, None, |c| c.resilience.backoff_base_ms = 20).await;
    let (_sid, _token, client) = connect(&ts).await;
    client.send_text(r#"{"type":"text","text":"Hello?"}"#).await;
    let e = client
        .wait_event("giving up", Duration::from_secs(20), |e| {
            e["type"] == "error" && e["code"] == "provider_unavailable"
        })
        .await;
    assert!(e["message"].as_str().unwrap().contains("4 times in one turn"), "{e}");
    assert_eq!(fake.conns().len(), 4, "the first stream and three restarts");
    let c1 = fake.conn(1);
    assert!(
        c1.text_blocks().contains(&("USER".into(), false, "Hello?".into())),
        "a restart carries the turn as history"
    );
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_events_are_the_token_budgets_count() {
    let (spoken, audio) = speech(2.0);
    let plan = spoken.clone();
    let fake = FakeNova::new(vec![NReply::Speech { plan, spoken, audio }]);
    // Each finished reply raises the fake's usageEvent.totalTokens by 300: over a 250-token cap.
    let ts = start_nova(&fake, None, |c| c.budget.tokens = Some(250)).await;
    let (session_id, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(300)).await;
    let (exceeded, usage) = ask_until_budget_ends(&ts, &mut client, &session_id).await;
    let per_reply = common::fake_nova::USAGE_PER_REPLY;
    assert_eq!((exceeded["kind"].as_str(), exceeded["used"].as_u64()), (Some("tokens"), Some(per_reply)), "{exceeded}");
    assert_eq!(
        (usage.usage.totals.tokens, usage.usage.tokens_reported),
        (per_reply, true),
        "the report, not an estimate"
    );
    ts.server.shutdown().await.unwrap();
}
