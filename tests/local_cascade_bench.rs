//! Benchmark (run by hand, not in CI): end of the user's turn -> first agent audio with the
//! offline cascade, over 20 turns through the real WebRTC client, and the memory the offline
//! engines take. `cargo test --test local_cascade_bench -- --ignored --nocapture`
//!
//! The end of the turn is when the client sent its last voiced frame; the first agent audio is
//! the first decoded agent packet with speech energy. The difference includes the VAD's silence
//! threshold (media.min_silence_ms, 500 ms by default), which is reported separately. Each reply
//! is cut with the client's `interrupt` once it started, to keep the run short.
#![cfg(feature = "local")]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kotodama::providers::RealtimeProvider;
use kotodama::providers::cascade::CascadeProvider;
use kotodama::providers::cascade::local::{self, espeak::Espeak};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run by hand"]
async fn local_cascade_turn_latency() {
    let rss0 = rss_kib();
    tokio::task::spawn_blocking(|| Espeak::global().map(|_| ())).await.unwrap().unwrap();
    let rss_espeak = rss_kib();
    let engines =
        tokio::task::spawn_blocking(|| local::stages(&local::LocalSettings::default())).await.unwrap().unwrap();
    let question = tokio::task::spawn_blocking(|| espeak_48k("Hello. What time is it now?")).await.unwrap();
    let rss_loaded = rss_kib();
    let provider: Arc<dyn RealtimeProvider> = Arc::new(CascadeProvider::new(engines.cascade("local")).unwrap());
    let ts = TestServer::start_with_providers(|c| c.provider = Some("local".into()), move |_| vec![provider]).await;
    let (_id, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    let (_, voiced_end) = speech_span(&question, 48_000, 300.0).unwrap();
    let mut lat = Vec::new();
    let mut rss_turn1 = 0;
    let question_len = Duration::from_secs_f64(question.len() as f64 / 48_000.0);
    for turn in 0..20 {
        client.silence(Duration::from_millis(300)).await;
        let from = client.log().len();
        client.speak(&question).await;
        // speak() is paced in real time: the last voiced frame left this long before it returned.
        let turn_end = Instant::now() - question_len.saturating_sub(voiced_end);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let first = loop {
            let heard = client.log()[from..].iter().find_map(|r| match r {
                Received::Audio { at, rms, .. } if *rms > 300.0 && *at > turn_end => Some(*at),
                _ => None,
            });
            if let Some(at) = heard {
                break at;
            }
            assert!(turn_end.elapsed() < Duration::from_secs(20), "no reply in turn {turn}");
            tick.tick().await;
            client.send_frame(&[0i16; FRAME]).await;
        };
        lat.push(first - turn_end);
        if turn == 0 {
            rss_turn1 = rss_kib();
        }
        client.send_text(r#"{"type":"interrupt"}"#).await;
        client
            .silence_until("the cut", Duration::from_secs(10), |evs| {
                evs.iter().filter(|e| e["type"] == "agent.interrupted").count() > turn
            })
            .await;
    }
    let rss_session = rss_kib();
    lat.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let p50 = ms(lat[lat.len() / 2]);
    let silence = 500.0;
    eprintln!(
        "local cascade, {} turns: end of turn -> first agent audio p50 {p50:.0} ms (min {:.0}, max {:.0}); \
         beyond the {silence:.0} ms silence threshold: p50 {:.0} ms",
        lat.len(),
        ms(lat[0]),
        ms(*lat.last().unwrap()),
        p50 - silence
    );
    eprintln!(
        "memory (VmRSS, KiB): before engines {rss0}, eSpeak NG loaded {rss_espeak} (+{}), PocketSphinx loaded \
         {rss_loaded} (+{}), server + client + one live session after turn 1 {rss_turn1}, after turn 20 {rss_session}",
        rss_espeak.saturating_sub(rss0),
        rss_loaded.saturating_sub(rss_espeak),
    );
    client.close().await;
    ts.server.shutdown().await.unwrap();
}
