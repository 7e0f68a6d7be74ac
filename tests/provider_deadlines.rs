//! Provider deadlines end to end (issue 12, kind 7): a real webrtc-rs client, the in-process
//! server, and a fake OpenAI Realtime server (tests/common/fake_openai.rs) that hangs: it accepts
//! the socket and never answers, or stops answering mid-conversation. The client must get a clear
//! `error` and a recovery (a replacement session, or `session.ended`), never wait forever.

mod common;

use std::time::Duration;

use common::fake_openai::{FakeOpenAi, FakeOptions, Reply, short_speech};
use common::listen::*;
use common::*;
use serde_json::Value;

fn is_error(e: &Value, code: &str) -> bool {
    e["type"] == "error" && e["code"] == code
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_accepts_the_socket_and_never_answers_is_replaced_then_the_session_ends() {
    let fake = FakeOpenAi::start(FakeOptions::default(), vec![]).await;
    fake.mute(0, 0);
    fake.mute(1, 0);
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.resilience.start_timeout_ms = 3_000;
        c.resilience.backoff_base_ms = 50;
    })
    .await;
    let (session_id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(&ts, &offer_url, &token).await;
    let first =
        client.wait_event("provider_timeout", Duration::from_secs(10), |e| is_error(e, "provider_timeout")).await;
    assert!(first["message"].as_str().unwrap().contains("did not get ready within 3 s; reconnecting"), "{first}");
    let ended = client.wait_event("session.ended", Duration::from_secs(10), |e| e["type"] == "session.ended").await;
    assert_eq!(ended["reason"], "provider_error", "{ended}");

    let evs = client.events();
    let timeouts: Vec<&Value> = evs.iter().filter(|e| is_error(e, "provider_timeout")).collect();
    assert_eq!(timeouts.len(), 2, "one per attempt: {evs:#?}");
    assert!(timeouts[1]["message"].as_str().unwrap().contains("ending the session"), "{}", timeouts[1]);
    let states = states(&evs);
    assert_eq!(states, ["initializing"], "never claimed to listen");
    assert_eq!(fake.conns().len(), 2, "the silent session was replaced once");
    assert!(!fake.conn(1).of_type("session.update").is_empty(), "the replacement was configured");

    // The session is over for the API too, with the reason (recorded as the task finishes, just
    // after `session.ended` went out).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let s = loop {
        let s = ts.session_json(&session_id, &token).await;
        if s["state"] == "ended" || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((s["state"].as_str(), s["end_reason"].as_str()), (Some("ended"), Some("provider_error")), "{s}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_stops_answering_times_out_the_spoken_turn_and_a_new_session_answers_the_next() {
    let (ta, aa) = short_speech(1.0);
    let (tb, ab) = short_speech(1.2);
    let (tc, ac) = short_speech(1.4);
    let script = vec![
        Reply::Speech { text: ta.clone(), audio: aa },
        Reply::Speech { text: tb, audio: ab },
        Reply::Speech { text: tc.clone(), audio: ac },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    // The first session answers once, then hangs (it takes the second reply and never sends it).
    fake.mute(0, 1);
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
        c.resilience.backoff_base_ms = 50;
        c.resilience.reply_timeout_ms = 3_000;
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(200)).await;
    ask_and_wait_reply(&mut client, 1).await;
    assert_eq!(agent_finals(&client.events()), vec![ta.clone()]);

    // The second spoken turn meets a silent model: a clear error, and listening again.
    client
        .ask_until("the spoken turn to time out", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| is_error(e, "reply_timeout"))
                && evs.iter().rev().find(|e| e["type"] == "state").is_some_and(|e| e["state"] == "listening")
        })
        .await;
    let evs = client.events();
    let timeout = evs.iter().find(|e| is_error(e, "reply_timeout")).unwrap();
    assert!(timeout["message"].as_str().unwrap().contains("did not answer within 3 s; reconnecting"), "{timeout}");
    assert_eq!(fake.conn(0).of_type("input_audio_buffer.commit").len(), 2, "the hung session got the turn");
    assert_eq!(fake.conn(0).of_type("response.cancel").len(), 1, "the owed reply was cancelled");
    client
        .silence_until("the replacement session", Duration::from_secs(10), |evs| {
            evs.iter().any(|e| is_error(e, "provider_reconnected"))
        })
        .await;
    assert_eq!(fake.conns().len(), 2);
    assert!(fake.conn(0).closed, "the hung session was closed");

    // The next turn is answered by the new session and heard.
    let heard_before = client.inbox.lock().unwrap().agent_pcm.len();
    ask_and_wait_reply(&mut client, 2).await;
    assert_eq!(agent_finals(&client.events()), [ta, tc]);
    assert_eq!(fake.conn(1).of_type("response.create").len(), 1);
    let heard = client.inbox.lock().unwrap().agent_pcm[heard_before..].to_vec();
    assert!(heard.len() as f64 / 48_000.0 >= 1.2, "the reply was heard: {} samples", heard.len());
    assert!(peak_rms(&heard, 48_000) > 1000.0);
    let evs = client.events();
    assert!(!evs.iter().any(|e| e["type"] == "session.ended"), "the session goes on");
    assert_eq!(count(&evs, |e| is_error(e, "reply_timeout")), 1);
    ts.server.shutdown().await.unwrap();
}
