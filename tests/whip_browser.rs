//! WHIP and WHEP with real, unchanged browser clients: `@eyevinn/whip-web-client@1.1.7` (from
//! npm, bundled by esbuild) publishes Chromium's fake microphone (an eSpeak NG WAV) to a
//! character, and a WHEP player page (plain `RTCPeerConnection`, receive-only) in the same
//! Chromium hears the scripted character answer; the pages come from another origin, so CORS is
//! exercised too. Runner: `tests/browser/whip.mjs`.
//!
//! Needs `chromium` and the npm packages of tests/browser (./test.sh installs both).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;
use serde_json::Value;

#[cfg(feature = "local")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eyevinn_publishes_and_a_whep_player_in_chromium_hears_the_character() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    assert!(
        root.join("tests/browser/node_modules/@eyevinn/whip-web-client").exists(),
        "tests/browser/node_modules is missing: run ./test.sh (or `npm ci --prefix tests/browser`)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(std::path::Path::new(&chromium).exists(), "{chromium} is missing: run ./test.sh");
    let ts = TestServer::start().await;

    // The fake microphone: 4 s of silence (the WHIP handshake), the question, then silence for the
    // reply (Chromium loops the file).
    let speech = tokio::task::spawn_blocking(|| espeak_48k("Hello! Who is on the show tonight?")).await.unwrap();
    let mut mic = vec![0i16; 48_000 * 4];
    mic.extend_from_slice(&speech);
    mic.extend(std::iter::repeat_n(0i16, 48_000 * 20));
    let out_dir = root.join("target/browser");
    std::fs::create_dir_all(&out_dir).unwrap();
    let wav_path = out_dir.join("mic-whip.wav");
    std::fs::write(&wav_path, media::wav::to_bytes(media::PcmRef::new(48_000, &mic))).unwrap();

    let base = ts.base.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg(root.join("tests/browser/whip.mjs"))
            .arg(&base)
            .arg(&wav_path)
            .arg("aiko")
            .arg("45000")
            .env("CHROMIUM", chromium)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let page: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!("runner output is JSON ({e}): {stdout}\n{}", String::from_utf8_lossy(&output.stderr))
    });
    assert_eq!(page["ok"], true, "the WHIP/WHEP run finished: {}\nconsole: {:#}", page["error"], page["console"]);

    // The unchanged client found the resource at the session's URL and trickled (OPTIONS lists PATCH).
    let resource = page["resource"].as_str().unwrap();
    let id = resource.rsplit('/').next().unwrap();
    assert_eq!(resource, format!("{}/v1/sessions/{id}", ts.base));
    assert_eq!(page["trickled"], true, "Eyevinn's client trickled: {:#}", page["console"]);
    assert_eq!(page["publisherState"], "connected");

    // The player got the session's events on its channel: the publisher's speech, the reply.
    let events: Vec<&Value> = page["events"].as_array().unwrap().iter().map(|e| &e["event"]).collect();
    for t in ["session.ready", "user.speech_started", "user.speech_stopped"] {
        assert!(events.iter().any(|e| e["type"] == t), "the player received `{t}`: {events:?}");
    }
    let reply = events
        .iter()
        .find(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        .expect("the reply's transcript");
    assert!(!reply["text"].as_str().unwrap().is_empty());
    assert_eq!(ts.recorder.turns().len(), 1, "the published speech was one user turn");

    // Heard: the received track's level rose above silence for seconds.
    let levels = page["levels"].as_array().unwrap();
    let loud = levels.iter().filter(|l| l["voice"].as_f64().unwrap() > 0.02).count();
    eprintln!("measured: WHEP player in Chromium: voice above silence in {loud} of {} 20 ms samples", levels.len());
    assert!(loud > 100, "the reply was heard for > 2 s: {loud} loud samples of {}", levels.len());

    // The client's destroy() is a DELETE of its resource: the session ended.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while ts.server.manager().get(id).unwrap().phase() != kotodama::session::SessionState::Ended {
        assert!(std::time::Instant::now() < deadline, "DELETE from destroy() ended the session");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
