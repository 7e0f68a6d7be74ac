//! The offline default end to end: a real WebRTC client speaks an eSpeak NG sentence to the
//! server running the `local` cascade (PocketSphinx -> persona responder -> eSpeak NG), and we
//! check what PocketSphinx heard, that the persona answered, that the client decoded the spoken
//! reply, and that the visemes cover the reply's audio in order.
#![cfg(feature = "local")]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use kotodama::providers::RealtimeProvider;
use kotodama::providers::cascade::CascadeProvider;
use kotodama::providers::cascade::local::{self, espeak::Espeak};
use serde_json::Value;

/// eSpeak speech resampled to the client's 48 kHz.
fn speech_48k(text: &str) -> Vec<i16> {
    espeak_48k(text)
}

pub async fn local_server() -> TestServer {
    let engines = tokio::task::spawn_blocking(|| local::stages(&local::LocalSettings::default()))
        .await
        .unwrap()
        .expect("offline engines load (apt-get install libpocketsphinx-dev pocketsphinx-en-us libespeak-ng-dev)");
    let provider: Arc<dyn RealtimeProvider> = Arc::new(CascadeProvider::new(engines.cascade("local")).unwrap());
    TestServer::start_with_providers(|c| c.provider = Some("local".into()), move |_| vec![provider]).await
}

fn agent_final(evs: &[Value]) -> Option<&Value> {
    evs.iter().find(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_cascade_hears_answers_speaks_and_moves_the_mouth() {
    let question = tokio::task::spawn_blocking(|| speech_48k("Hello. What is your name?")).await.unwrap();
    let ts = local_server().await;
    let (_session_id, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    let ready = client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    assert_eq!(ready["provider"], "local");
    client.wait_event("listening", Duration::from_secs(5), |e| e["type"] == "state" && e["state"] == "listening").await;

    client.silence(Duration::from_millis(300)).await;
    client.speak(&question).await;
    client
        .silence_until("the agent's final transcript", Duration::from_secs(30), |evs| agent_final(evs).is_some())
        .await;
    client.silence_until("back to listening after speaking", Duration::from_secs(20), back_to_listening(1)).await;
    let evs = client.events();

    // PocketSphinx heard at least one key word of the sentence. (The general English model hears
    // eSpeak's robotic voice poorly: "what is your" comes through, "hello" and "name" often not.)
    let user = evs
        .iter()
        .find(|e| e["type"] == "transcript" && e["role"] == "user" && e["final"] == true)
        .expect("a final user transcript");
    let heard = user["text"].as_str().unwrap().to_lowercase();
    // PocketSphinx's partial hypotheses arrived while the user spoke, for the same item.
    assert!(
        evs.iter().any(|e| e["type"] == "transcript"
            && e["role"] == "user"
            && e["final"] == false
            && e["item_id"] == user["item_id"]),
        "user transcript partials before the final"
    );
    assert!(
        ["hello", "what", "name"].iter().any(|w| heard.split_whitespace().any(|h| h == *w)),
        "PocketSphinx heard `{heard}`"
    );

    // The persona answered what it heard: its name or a greeting when it understood, else it
    // reflects the words.
    let reply = agent_final(&evs).unwrap();
    let reply_text = reply["text"].as_str().unwrap().to_owned();
    let item_id = reply["item_id"].as_str().unwrap().to_owned();
    assert!(
        reply_text.contains("Aiko") || reply_text.to_lowercase().contains(&format!("you said: {heard}")),
        "the persona answers `{heard}`: {reply_text}"
    );
    assert!(reply_text.contains("offline brain"), "the first reply says it is the offline brain: {reply_text}");
    assert!(evs.iter().any(|e| e["type"] == "emotion" && e["item_id"] == item_id.as_str()), "an emotion for the reply");

    // The client decoded the spoken reply: audible, as long as eSpeak takes to say it.
    let expected = {
        let text = reply_text.clone();
        tokio::task::spawn_blocking(move || {
            let (pcm, _) = Espeak::global().unwrap().synthesize_blocking(&text, local::espeak::DEFAULT_VOICE).unwrap();
            pcm.duration().as_secs_f64()
        })
        .await
        .unwrap()
    };
    let agent_pcm = client.inbox.lock().unwrap().agent_pcm.clone();
    let (first, last) = speech_span(&agent_pcm, 48_000, 300.0).expect("the client heard speech");
    let voiced = (last - first).as_secs_f64();
    assert!(peak_rms(&agent_pcm, 48_000) > 1000.0, "the reply is speech");
    assert!(
        voiced > expected * 0.75 && voiced < expected * 1.25 + 0.5,
        "the client heard {voiced:.2} s of speech; eSpeak says the reply in {expected:.2} s"
    );

    // Visemes: this item's, in order, back to back, covering the reply's audio.
    let vis: Vec<&Value> = evs.iter().filter(|e| e["type"] == "viseme").collect();
    assert!(vis.len() > 20, "{} visemes for a {expected:.1} s reply", vis.len());
    assert!(vis.iter().all(|v| v["item_id"] == item_id.as_str()), "visemes belong to the reply item");
    let starts: Vec<u64> = vis.iter().map(|v| v["start_ms"].as_u64().unwrap()).collect();
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "start_ms increases: {starts:?}");
    assert!(starts[0] < 200, "the first viseme starts with the audio: {}", starts[0]);
    for w in vis.windows(2) {
        let end = w[0]["start_ms"].as_u64().unwrap() + w[0]["duration_ms"].as_u64().unwrap();
        let next = w[1]["start_ms"].as_u64().unwrap();
        assert!(end.abs_diff(next) <= 1, "visemes are contiguous: one ends at {end} ms, the next starts at {next} ms");
    }
    let last_v = vis.last().unwrap();
    let covered = (last_v["start_ms"].as_u64().unwrap() + last_v["duration_ms"].as_u64().unwrap()) as f64 / 1000.0;
    assert!(
        (covered - expected).abs() < expected * 0.15 + 0.2,
        "visemes cover {covered:.2} s; the reply's audio is {expected:.2} s"
    );
    let shapes: std::collections::HashSet<&str> = vis.iter().map(|v| v["viseme"].as_str().unwrap()).collect();
    assert!(shapes.len() >= 8, "a spoken reply uses many mouth shapes: {shapes:?}");

    eprintln!(
        "measured: heard `{heard}`, reply `{reply_text}`, {voiced:.2} s voiced of {expected:.2} s, {} visemes covering {covered:.2} s",
        vis.len()
    );
    client.close().await;
    ts.server.shutdown().await.unwrap();
}
