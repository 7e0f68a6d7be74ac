//! Media time on a real session is RTP time (issue 12, kind 3): a client whose Opus encoder uses
//! DTX (one packet per 400 ms of silence, timestamps jumping) gets its turn ended about
//! `min_silence` after it stopped speaking, as a client sending every 20 ms does (it took 6 s
//! when the server counted 20 ms per packet).

mod common;

use std::time::{Duration, Instant};

use common::*;

/// A client connected to a new session of `ts`, past `session.ready`.
async fn ready_client(ts: &TestServer) -> TestClient {
    let (_, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dtx_client_gets_its_turn_ended_on_time() {
    let ts = TestServer::start().await;
    let mut client = ready_client(&ts).await;
    let (rate, question) = wav("user_question.wav");
    assert_eq!(rate, SAMPLE_RATE);
    client.speak(&question).await;
    let spoke_until = Instant::now();
    let stopped = |evs: &[serde_json::Value]| evs.iter().any(|e| e["type"] == "user.speech_stopped");
    client.dtx_silence_until("user.speech_stopped", Duration::from_secs(10), stopped).await;
    let took = spoke_until.elapsed();
    // min_silence 500 ms + at most one 400 ms DTX interval + delivery.
    assert!(took < Duration::from_millis(1_500), "end of turn {took:?} after the user stopped (DTX)");
    let started = client.events().iter().filter(|e| e["type"] == "user.speech_started").count();
    assert_eq!(started, 1, "one utterance heard");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_client_that_sends_no_audio_is_told_and_recovers() {
    let ts = TestServer::start().await;
    let mut client = ready_client(&ts).await;
    let alarm = client.wait_event("no_audio error", Duration::from_secs(10), |e| e["code"] == "no_audio").await;
    assert_eq!(alarm["type"], "error");
    assert!(ts.metric("kotodama_no_audio_total").await >= 1.0, "the silent client is counted");
    assert!(alarm["message"].as_str().unwrap().contains("microphone"), "{alarm}");
    // Audio comes: the session hears it (one utterance), and no second alarm while it flows.
    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client.silence(Duration::from_millis(800)).await;
    let alarms = client.events().iter().filter(|e| e["code"] == "no_audio").count();
    assert_eq!(alarms, 1);
    assert!(client.events().iter().any(|e| e["type"] == "user.speech_started"));
    client.close().await;
}

/// `kotodama_queue_drops_total{queue="<queue>"}` in /metrics (0 when absent).
async fn queue_drops(ts: &TestServer, queue: &str) -> f64 {
    let text = ts.http.get(format!("{}/metrics", ts.base)).send().await.unwrap().text().await.unwrap();
    let key = format!("kotodama_queue_drops_total{{queue=\"{queue}\"}}");
    text.lines().find_map(|l| l.strip_prefix(&key)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_after_a_stall_is_heard_whole() {
    let ts = TestServer::start().await;
    let mut client = ready_client(&ts).await;
    client.silence(Duration::from_millis(400)).await;
    // The sender stalled while the user spoke; its queue arrives at once.
    let (_, question) = wav("user_question.wav");
    for chunk in question.chunks(FRAME) {
        let mut frame = [0i16; FRAME];
        frame[..chunk.len()].copy_from_slice(chunk);
        client.send_frame(&frame).await;
    }
    let stopped = |evs: &[serde_json::Value]| evs.iter().any(|e| e["type"] == "user.speech_stopped");
    client.silence_until("user.speech_stopped", Duration::from_secs(10), stopped).await;
    let evs = client.events();
    let at = |t: &str| evs.iter().find(|e| e["type"] == t).and_then(|e| e["at_ms"].as_u64()).unwrap();
    let heard = Duration::from_millis(at("user.speech_stopped") - at("user.speech_started"));
    let (first, last) = speech_span(&question, SAMPLE_RATE, 300.0).expect("speech in the fixture");
    let spoken = last - first;
    assert!(heard + Duration::from_millis(300) >= spoken, "heard {heard:?} of {spoken:?} of speech sent in a burst");
    assert_eq!(queue_drops(&ts, "rtp_to_session").await, 0.0, "no RTP dropped on the way to the session");
    client.close().await;
}
