//! The N.E.K.O. dialect (`/ws/{character}`) driven by a Python `websockets` client playing the
//! N.E.K.O. frontend (tests/neko/neko_client.py): eSpeak NG speech streamed as 10 ms int16 JSON
//! arrays at 48 kHz (desktop) and 16 kHz (mobile), the reply heard as `audio_chunk` + binary PCM,
//! `gemini_response` text, and a barge-in. The Python client asserts N.E.K.O.'s rules; this test
//! checks what it heard against the reply. Needs `espeak-ng` and `python3-websockets`
//! (.ci/setup.sh installs them).

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

async fn neko_client(url: &str, rate: u32) -> Value {
    neko_client_args(url, rate, &[]).await
}

async fn neko_client_args(url: &str, rate: u32, extra: &[&'static str]) -> Value {
    let extra = extra.to_vec();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/neko/neko_client.py");
    let url = url.to_owned();
    let run = tokio::task::spawn_blocking(move || {
        std::process::Command::new("/usr/bin/python3").arg(script).arg(url).arg(rate.to_string()).args(extra).output()
    });
    let out = tokio::time::timeout(Duration::from_secs(120), run).await.expect("the client finishes").unwrap();
    let out = out.expect("python3 runs");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "N.E.K.O. client at {rate} Hz failed:\n{stderr}\n{stdout}");
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Two users (two API keys): only the newest socket per character *and user* is live.
const KEYS: [&str; 2] = ["neko-desktop-key-0123456789", "neko-mobile-key-0123456789"];

/// A desktop (48 kHz) and a mobile (16 kHz) frontend at once; each hears a whole reply, then
/// barges into the next.
async fn desktop_and_mobile(ts: &TestServer, emotions: bool) {
    // By name, as N.E.K.O. does; the id works too. The API key rides in `?token=`.
    let desktop_url = format!("ws://{}/ws/Aiko?token={}", ts.addr(), KEYS[0]);
    let mobile_url = format!("ws://{}/ws/aiko?token={}", ts.addr(), KEYS[1]);
    let (desktop, mobile) = tokio::join!(neko_client(&desktop_url, 48_000), neko_client(&mobile_url, 16_000));
    let reply = media::wav::parse(include_bytes!("../src/providers/scripted_reply.wav")).unwrap();
    let reply_s = reply.samples.len() as f64 / f64::from(reply.rate_hz);
    for s in [&desktop, &mobile] {
        let heard = s["reply_s"].as_f64().unwrap();
        assert!((heard - reply_s).abs() <= reply_s * 0.1, "heard {heard:.2} s of a {reply_s:.2} s reply: {s}");
        assert!(s["reply_rms"].as_f64().unwrap() > 500.0, "the reply is speech: {s}");
        assert!(s["reply_text"].as_str().unwrap().starts_with("Hi! I am Aiko."), "{s}");
        if emotions {
            assert!(s["emotions"].as_array().unwrap().iter().any(|e| e == "happy"), "{s}");
        }
        let cut = s["interrupted_after_s"].as_f64().unwrap();
        assert!(cut > 0.5 && cut < reply_s - 1.0, "the second reply was cut mid-way ({cut:.2} s): {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neko_frontend_talks_and_barges_in_at_48_and_16_khz() {
    let ts = TestServer::start_with(|c| c.api_keys = KEYS.iter().map(|k| k.to_string()).collect()).await;
    desktop_and_mobile(&ts, true).await;
    // Each frontend's speech reached the model: four committed turns (two each).
    assert!(ts.recorder.turns().len() >= 4, "turns: {}", ts.recorder.turns().len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neko_frontend_talks_through_the_fake_openai_server() {
    use common::fake_openai::{FakeOpenAi, FakeOptions, Reply, reply_speech};
    let (text, audio) = reply_speech();
    let script = (0..12).map(|_| Reply::Speech { text: text.clone(), audio: audio.clone() }).collect();
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
        c.api_keys = KEYS.iter().map(|k| k.to_string()).collect();
    })
    .await;
    desktop_and_mobile(&ts, false).await;
    // The model heard both frontends' audio and was told what was heard of the cut reply.
    let conns = fake.conns();
    assert_eq!(conns.len(), 2, "one model session per frontend");
    for c in &conns {
        let secs = c.audio.len() as f64 / 24_000.0;
        assert!(secs > 3.0, "the frontend's speech reached the model ({secs:.2} s)");
        assert!(c.commits.len() >= 2, "turns committed: {:?}", c.commits);
        assert!(!c.of_type("conversation.item.truncate").is_empty(), "the barge-in truncated the reply");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neko_route_auth_and_the_newest_socket_wins() {
    const KEY: &str = "neko-only-key-0123456789";
    let ts = TestServer::start_with(|c| c.api_keys = vec![KEY.into()]).await;
    let url = |who: &str, token: &str| format!("ws://{}/ws/{who}?token={token}", ts.addr());
    for (what, u, status) in [
        ("no key", format!("ws://{}/ws/aiko", ts.addr()), 401),
        ("a wrong key", url("aiko", "not-a-key-0123456789"), 401),
        ("an unknown character", url("nobody", KEY), 404),
    ] {
        match tokio_tungstenite::connect_async(u).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), status, "{what}"),
            other => panic!("{what}: {other:?}"),
        }
    }
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let start = Message::text(r#"{"action":"start_session","input_type":"audio","new_session":true}"#);
    let (mut first, _) = tokio_tungstenite::connect_async(url("aiko", KEY)).await.unwrap();
    first.send(start.clone()).await.unwrap();
    let started = |m: &Message| m.to_text().unwrap_or("").contains("session_started");
    while !started(&first.next().await.unwrap().unwrap()) {}
    let (mut second, _) = tokio_tungstenite::connect_async(url("aiko", KEY)).await.unwrap();
    second.send(start).await.unwrap();
    while !started(&second.next().await.unwrap().unwrap()) {}
    // The older socket is told and closed; the newer one lives on.
    let mut told = false;
    while let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), first.next()).await.unwrap() {
        told |= m.to_text().unwrap_or("").contains("session_ended_by_server");
    }
    assert!(told, "the older socket got session_ended_by_server");
    second.send(Message::text(r#"{"action":"ping"}"#)).await.unwrap();
    while !second.next().await.unwrap().unwrap().to_text().unwrap_or("").contains("pong") {}
    // Malformed JSON ends the session, as in N.E.K.O.
    second.send(Message::text("{not json")).await.unwrap();
    let mut closed = None;
    while let Some(Ok(m)) = tokio::time::timeout(Duration::from_secs(5), second.next()).await.unwrap() {
        if let Message::Close(f) = m {
            closed = f.map(|f| u16::from(f.code));
        }
    }
    assert_eq!(closed, Some(1007), "malformed JSON closes the socket");
}

/// The offline default: PocketSphinx hears the frontend's eSpeak NG question, the persona answers,
/// eSpeak NG speaks; one turn (the persona's replies are short).
#[cfg(feature = "local")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neko_frontend_talks_with_the_local_provider() {
    use std::sync::Arc;

    use kotodama::providers::RealtimeProvider;
    use kotodama::providers::cascade::{CascadeProvider, local};
    let engines = tokio::task::spawn_blocking(|| local::stages(&local::LocalSettings::default()))
        .await
        .unwrap()
        .expect("offline engines load");
    let provider: Arc<dyn RealtimeProvider> = Arc::new(CascadeProvider::new(engines.cascade("local")).unwrap());
    let ts = TestServer::start_with_providers(|c| c.provider = Some("local".into()), move |_| vec![provider]).await;
    let s = neko_client_args(&format!("ws://{}/ws/aiko", ts.addr()), 16_000, &["one-turn"]).await;
    assert!(s["reply_s"].as_f64().unwrap() > 0.5, "a spoken reply: {s}");
    assert!(s["reply_rms"].as_f64().unwrap() > 300.0, "the reply is speech: {s}");
    assert!(!s["reply_text"].as_str().unwrap().trim().is_empty(), "{s}");
    let heard = s["user_transcripts"].as_array().unwrap();
    assert!(!heard.is_empty(), "PocketSphinx's transcript reached the frontend as user_transcript: {s}");
}
