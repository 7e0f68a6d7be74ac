//! Latency the provider path adds, through the real `openai` provider wrapped in the resilient
//! provider, over a loopback WebSocket to a minimal Realtime server:
//! - uplink: `ProviderCommand::AppendAudio` (20 ms at 24 kHz) -> the server has read the
//!   `input_audio_buffer.append` frame;
//! - downlink: the server writes a `response.output_audio.delta` (100 ms) -> the session task
//!   would receive `ProviderEvent::AudioDelta`.
//!
//! `cargo bench --bench openai_path` prints p50/p99/max over a few thousand samples (wall time on
//! a shared machine: read the medians; the target is <= 1 ms p99 for each direction).
//!
//! Measured on the 2-core dev machine while other builds ran (2026-11-21): uplink p50 15 us,
//! p99 60 us; downlink p50 21 us, p99 82 us.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use kotodama::providers::openai::protocol::TurnDetection;
use kotodama::providers::openai::{OpenAiProvider, OpenAiSettings, Secret};
use kotodama::providers::resilient::{ResiliencePolicy, ResilientProvider};
use kotodama::providers::tools::ToolRegistry;
use kotodama::providers::{Pcm, ProviderCommand, ProviderEvent, RealtimeProvider, SessionConfig};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const SAMPLES: usize = 3000;

fn pct(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn report(name: &str, v: Vec<Duration>) {
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<10} n={} p50={:.0} us p99={:.0} us max={:.0} us",
        v.len(),
        us(pct(v.clone(), 0.5)),
        us(pct(v.clone(), 0.99)),
        us(pct(v, 1.0))
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run());
}

async fn run() {
    // The server: acknowledges the session, reports each append's arrival, sends deltas on demand.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (arrived_tx, mut arrived_rx) = mpsc::channel::<Instant>(16);
    let (send_tx, mut send_rx) = mpsc::channel::<()>(16);
    let (sent_tx, mut sent_rx) = mpsc::channel::<Instant>(16);
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
        let pcm: Vec<u8> = (0..2400).flat_map(|i: i32| ((i % 200 - 100) as i16 * 50).to_le_bytes()).collect();
        let delta = serde_json::json!({"type": "response.output_audio.delta", "response_id": "r", "item_id": "msg_1",
            "output_index": 0, "content_index": 0, "delta": base64::engine::general_purpose::STANDARD.encode(pcm)})
        .to_string();
        loop {
            tokio::select! {
                m = ws.next() => {
                    let Some(Ok(Message::Text(t))) = m else { break };
                    let now = Instant::now();
                    if t.contains("\"input_audio_buffer.append\"") {
                        let _ = arrived_tx.send(now).await;
                    } else if t.contains("\"session.update\"") {
                        ws.send(Message::text(r#"{"type":"session.updated","session":{}}"#)).await.unwrap();
                    }
                }
                Some(()) = send_rx.recv() => {
                    let t0 = Instant::now();
                    ws.send(Message::text(delta.clone())).await.unwrap();
                    let _ = sent_tx.send(t0).await;
                }
            }
        }
    });

    let settings = OpenAiSettings {
        url: format!("ws://{addr}/v1/realtime"),
        api_key: Some(Secret::new("bench")),
        turn_detection: TurnDetection::Local,
        ..Default::default()
    };
    let inner: Arc<dyn RealtimeProvider> = Arc::new(OpenAiProvider::new(settings));
    let provider = ResilientProvider::new(vec![inner], ResiliencePolicy::default()).unwrap();
    let cfg = SessionConfig {
        session_id: "bench".into(),
        character_id: "aiko".into(),
        character_name: "Aiko".into(),
        instructions: "bench".into(),
        voice: "marin".into(),
        voices: Default::default(),
        language: "en-US".into(),
        history: vec![],
        session_history: Default::default(),
        tools: Arc::new(ToolRegistry::builtin()),
        viseme_overrides: Default::default(),
        moderator: None,
    };
    let mut session = provider.connect(cfg).await.unwrap();
    assert!(matches!(session.events.recv().await, Some(ProviderEvent::Ready)));

    let frame: Vec<i16> = (0..480).map(|i| ((i % 100) as i16 - 50) * 100).collect();
    let mut up = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES + 100 {
        let t0 = Instant::now();
        session
            .commands
            .send(ProviderCommand::AppendAudio(Pcm { rate_hz: 24_000, samples: frame.clone() }))
            .await
            .unwrap();
        let at = arrived_rx.recv().await.unwrap();
        if i >= 100 {
            up.push(at - t0);
        }
    }
    let mut down = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES + 100 {
        send_tx.send(()).await.unwrap();
        let ev = session.events.recv().await.unwrap();
        let got = Instant::now();
        let t0 = sent_rx.recv().await.unwrap();
        assert!(matches!(ev, ProviderEvent::AudioDelta { .. }), "{ev:?}");
        if i >= 100 {
            down.push(got - t0);
        }
    }
    report("uplink", up);
    report("downlink", down);
}
