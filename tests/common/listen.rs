//! What a test client heard and saw: counting events, measuring the agent's audio and the holes
//! in its media timeline, and the usual connect / ask-and-wait steps of a conversation test.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::Value;

use super::{Received, TestClient, TestServer, speech_span, wav};

/// Events matching `pred`.
pub fn count(evs: &[Value], pred: impl Fn(&Value) -> bool) -> usize {
    evs.iter().filter(|e| pred(e)).count()
}

/// Whether `e` is the `state` event `s`.
pub fn is_state(e: &Value, s: &str) -> bool {
    e["type"] == "state" && e["state"] == s
}

/// Decoded agent audio (ms at 48 kHz) received after log index `from`.
pub fn agent_ms_after(log: &[Received], from: usize) -> f64 {
    log[from..]
        .iter()
        .map(|r| match r {
            Received::Audio { samples, .. } => *samples as f64 / 48.0,
            _ => 0.0,
        })
        .sum()
}

/// The largest hole in the agent's media timeline after log index `from`: the RTP timestamp step
/// between consecutive packets beyond one 20 ms frame (what a listener hears as a gap, unlike
/// arrival jitter, which the client's jitter buffer absorbs), and the talkspurt starts (marker).
pub fn media_holes(log: &[Received], from: usize, window: Option<(Instant, Instant)>) -> (Duration, usize) {
    let pkts: Vec<(u32, bool)> = log[from..]
        .iter()
        .filter_map(|r| match r {
            Received::Audio { rtp_ts, marker, at, .. } if window.is_none_or(|(a, b)| *at >= a && *at <= b) => {
                Some((*rtp_ts, *marker))
            }
            _ => None,
        })
        .collect();
    let hole = pkts.windows(2).map(|w| w[1].0.wrapping_sub(w[0].0).saturating_sub(960)).max().unwrap_or(0);
    let spurts = pkts.iter().filter(|(_, m)| *m).count();
    (Duration::from_micros(u64::from(hole) * 1000 / 48), spurts)
}

/// The longest silence between consecutive agent packets after log index `from`.
pub fn max_packet_gap(log: &[Received], from: usize) -> Duration {
    let times: Vec<Instant> = log[from..]
        .iter()
        .filter_map(|r| match r {
            Received::Audio { at, .. } => Some(*at),
            _ => None,
        })
        .collect();
    times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
}

/// Create a session, connect a client, wait for `session.ready` and `listening`.
pub async fn connect(ts: &TestServer) -> (String, String, TestClient) {
    let (session_id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.wait_event("listening", Duration::from_secs(10), |e| is_state(e, "listening")).await;
    (session_id, token, client)
}

/// Speak the test question and keep the uplink going until the agent has finished `n` replies.
pub async fn ask_and_wait_reply(client: &mut TestClient, n: usize) {
    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client
        .silence_until(&format!("reply {n} to finish"), Duration::from_secs(40), |evs| {
            let finals = count(evs, |e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true);
            let last_state = evs.iter().rev().find(|e| e["type"] == "state");
            finals >= n && last_state.is_some_and(|e| e["state"] == "listening")
        })
        .await;
}

/// Assert that a model heard all of what [`ask_and_wait_reply`] said: its received audio
/// (`model_pcm`, mono at `model_rate_hz`) lasts as long as the `sent_samples` 48 kHz samples the
/// client sent (within 10 %), and its speech span (RMS > 300 in 20 ms windows) as long as
/// `user_question.wav`'s (within 10 %). Prints both as `measured:`.
pub fn assert_model_heard_question(model_pcm: &[i16], model_rate_hz: u32, sent_samples: usize) {
    let model_secs = model_pcm.len() as f64 / f64::from(model_rate_hz);
    let sent_secs = sent_samples as f64 / 48_000.0;
    let (_, question) = wav("user_question.wav");
    let (s0, s1) = speech_span(&question, 48_000, 300.0).unwrap();
    let (m0, m1) = speech_span(model_pcm, model_rate_hz, 300.0).expect("the model heard speech");
    eprintln!(
        "measured: model got {model_secs:.2} s of audio for {sent_secs:.2} s sent; speech {} ms (sent {} ms)",
        (m1 - m0).as_millis(),
        (s1 - s0).as_millis()
    );
    assert!((model_secs - sent_secs).abs() <= sent_secs * 0.1, "model {model_secs:.2} s vs sent {sent_secs:.2} s");
    let speech_diff = (m1 - m0).as_millis() as i64 - (s1 - s0).as_millis() as i64;
    assert!(speech_diff.abs() <= ((s1 - s0).as_millis() as i64) / 10, "speech length differs by {speech_diff} ms");
}

/// `GET /v1/sessions/{id}/transcript`: the stored turns.
pub async fn transcript(ts: &TestServer, session_id: &str, token: &str) -> Vec<serde_json::Value> {
    serde_json::from_value(ts.transcript_json(session_id, token).await).expect("a JSON array of turns")
}

/// A character with a voice per provider.
pub fn character_with_voices() -> kotodama::config::Character {
    kotodama::config::Character {
        id: "aiko".into(),
        name: "Aiko".into(),
        language: "en-US".into(),
        voice: "aiko".into(),
        voices: [("gemini".to_owned(), "Charon".to_owned()), ("nova_sonic".to_owned(), "matthew".to_owned())].into(),
        persona: "You are Aiko.".into(),
        ..Default::default()
    }
}

/// The `state` events' states (`"listening"`, `"speaking"`, ...), in order.
pub fn states(evs: &[Value]) -> Vec<&str> {
    evs.iter().filter(|e| e["type"] == "state").map(|e| e["state"].as_str().unwrap()).collect()
}

/// The agent's final transcripts, in order.
pub fn agent_finals(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .filter(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect()
}

/// Ask the test question and wait for the session to end on its budget: the `budget.exceeded`
/// event and the usage the store holds for `session_id` once the writer has written it.
pub async fn ask_until_budget_ends(
    ts: &TestServer,
    client: &mut TestClient,
    session_id: &str,
) -> (Value, kotodama::store::StoredUsage) {
    use kotodama::store::Store as _;
    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client
        .silence_until("the session to end", Duration::from_secs(40), |evs| {
            evs.iter().any(|e| e["type"] == "session.ended")
        })
        .await;
    let evs = client.events();
    let ended = evs.iter().find(|e| e["type"] == "session.ended").unwrap();
    assert_eq!(ended["reason"], "budget_exceeded", "{evs:#?}");
    let exceeded = evs.iter().find(|e| e["type"] == "budget.exceeded").expect("budget.exceeded").clone();
    for _ in 0..500 {
        if let Some(u) = ts.server.store().usage(session_id).await.unwrap() {
            return (exceeded, u);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no usage stored for {session_id}");
}
