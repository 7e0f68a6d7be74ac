//! Session recording end to end: a real webrtc-rs client speaks eSpeak NG sentences to a recorded
//! session (the second barges in on the character's reply); the recording's Ogg Opus files decode
//! with libopus to the audio each side heard, its event log holds every input and output (the
//! events the client received, the transcript the store kept), it replays to the same transcript
//! and interruption, and the admin API exports it.
#![cfg(feature = "local")]

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use kotodama::recording::format::{Line, RecInput, RecOutput};
use kotodama::replay::{self, Overrides, Recording};
use serde_json::{Value, json};

const ADMIN_KEY: &str = "recording-test-admin-key-0123456789";
const USER_KEY: &str = "recording-test-user-key-0123456789";

/// Decode an Ogg Opus file with libopus: (48 kHz mono samples, the last page's granule position).
fn decode_ogg_opus(path: &Path) -> (Vec<i16>, u64) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut reader = ogg::reading::PacketReader::new(std::io::BufReader::new(file));
    let mut decoder = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let (mut pcm, mut granule, mut n) = (Vec::new(), 0, 0);
    let mut buf = vec![0i16; 5760];
    while let Some(packet) = reader.read_packet().expect("a valid Ogg stream") {
        n += 1;
        match n {
            1 => assert!(packet.data.starts_with(b"OpusHead"), "the first packet is OpusHead"),
            2 => assert!(packet.data.starts_with(b"OpusTags"), "the second packet is OpusTags"),
            _ => {
                let got = decoder.decode(&packet.data, &mut buf, false).expect("libopus decodes every packet");
                pcm.extend_from_slice(&buf[..got]);
            }
        }
        granule = packet.absgp_page();
    }
    (pcm, granule)
}

/// Milliseconds of 20 ms windows louder than `threshold` RMS (at `rate_hz`).
fn active_ms(s: &[i16], rate_hz: u32, threshold: f64) -> u64 {
    let w = (rate_hz / 50) as usize;
    s.chunks(w).filter(|c| c.len() == w && rms(c) > threshold).count() as u64 * 20
}

/// Wait for the recording's last line (written after the session ended).
async fn finished_recording(dir: &Path) -> Recording {
    for _ in 0..200 {
        if let Ok(rec) = Recording::load(dir)
            && matches!(rec.lines.last(), Some(Line::End { .. }))
        {
            return rec;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no finished recording in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_barge_in_session_decodes_replays_and_exports() {
    let (question, barge) = tokio::task::spawn_blocking(|| {
        (espeak_48k("Hello. What is your name?"), espeak_48k("Wait, stop. Tell me about the weather instead."))
    })
    .await
    .unwrap();
    let store = temp_dir("recordings");
    let url = store.display().to_string();
    let ts = TestServer::start_with(move |c| {
        c.recording.url = url;
        c.admin_api_keys = vec![ADMIN_KEY.into()];
        c.api_keys = vec![USER_KEY.into()];
    })
    .await;

    // Not recorded unless asked: `session.ready` says nothing.
    let plain: Value = create(&ts, json!({})).await;
    assert_eq!(ts.server.manager().get(plain["session_id"].as_str().unwrap()).map(|s| s.record), Some(false));

    let created = create(&ts, json!({"record": true})).await;
    let (session_id, token) = id_and_token(&created);
    let offer_url = created["offer_url"].as_str().unwrap();
    let mut client = TestClient::connect(&ts, offer_url, &token).await;
    let ready = client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    assert_eq!(ready["recording"], true, "session.ready announces the recording: {ready}");
    client.wait_event("listening", Duration::from_secs(5), |e| e["type"] == "state" && e["state"] == "listening").await;

    client.silence(Duration::from_millis(300)).await;
    client.speak(&question).await;
    client
        .silence_until("the reply to start", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| e["type"] == "state" && e["state"] == "speaking")
        })
        .await;
    client.silence(Duration::from_millis(1000)).await;
    let from = client.log().len();
    client.speak(&barge).await;
    let (interrupted, ..) = client.barge_in_window(from, "the barge-in utterance to end", 2).await;
    client.silence(Duration::from_millis(300)).await;
    let url = format!("{}{}", ts.base, client.location);
    assert_eq!(ts.http.delete(&url).bearer_auth(&token).send().await.unwrap().status(), 200);

    let dir = store.join(&session_id);
    let rec = finished_recording(&dir).await;
    if let Ok(keep) = std::env::var("KOTODAMA_TEST_KEEP_RECORDING") {
        // How tests/data/recordings/ was made.
        copy_dir(&dir, Path::new(&keep));
    }

    // --- The event log is complete: what the client received, what the store kept. ---
    assert!(rec.complete(), "nothing lost");
    assert_eq!(rec.header.session_id, session_id);
    let inputs: Vec<&RecInput> = rec
        .lines
        .iter()
        .filter_map(|l| match l {
            Line::In { input, .. } => Some(input),
            _ => None,
        })
        .collect();
    let packets = inputs.iter().filter(|i| matches!(i, RecInput::ClientOpus { .. })).count();
    let sent_packets = client.sent_samples / FRAME;
    assert!(
        packets as f64 >= sent_packets as f64 * 0.95 && packets <= sent_packets,
        "{packets} client packets recorded; the client sent {sent_packets}"
    );
    for kind in ["client_connected", "media_connected", "timeout"] {
        assert!(
            inputs.iter().any(|i| serde_json::to_value(i).unwrap()["type"] == kind),
            "the log has a `{kind}` input"
        );
    }
    let provider_kinds: Vec<String> = inputs
        .iter()
        .filter_map(|i| match i {
            RecInput::Provider { event } => Some(serde_json::to_value(event).unwrap()["type"].as_str()?.to_owned()),
            _ => None,
        })
        .collect();
    for kind in ["ready", "audio_delta", "transcript"] {
        assert!(provider_kinds.iter().any(|k| k == kind), "provider `{kind}` events recorded: {provider_kinds:?}");
    }
    let outputs = rec.outputs();
    let recorded_events: Vec<Value> = outputs
        .iter()
        .filter_map(|(_, o)| match o {
            RecOutput::Event { event } => Some(serde_json::to_value(event).unwrap()),
            RecOutput::State { state } => Some(json!({"type": "state", "state": state})),
            _ => None,
        })
        .collect();
    let received: Vec<Value> = client.events().into_iter().filter(|e| e["type"] != "session.ended").collect();
    assert_eq!(
        recorded_events[..received.len()],
        received[..],
        "the log holds every event the client received, in order"
    );
    let stored = transcript_turns(&ts.transcript_json(&session_id, &token).await);
    let turns = recorded_turns(&outputs);
    assert_eq!(turns, stored, "the log's turns are the stored transcript");
    assert!(turns.iter().any(|t| t.0 == "agent" && t.2), "an interrupted agent turn: {turns:?}");

    // --- The audio files decode to what each side heard. ---
    let (user_pcm, user_granule) = decode_ogg_opus(&dir.join("user.opus"));
    assert_eq!(user_pcm.len() as u64, user_granule, "the user file decodes to its timeline's length");
    let last_packet_ns = rec
        .lines
        .iter()
        .rev()
        .find_map(|l| match l {
            Line::In { t_ns, input: RecInput::ClientOpus { .. } } => Some(*t_ns),
            _ => None,
        })
        .unwrap();
    let user_secs = user_pcm.len() as f64 / 48_000.0;
    let timeline_secs = last_packet_ns as f64 / 1e9 + 0.02;
    assert!(
        (user_secs - timeline_secs).abs() < 0.25,
        "user.opus lasts {user_secs:.2} s; the last packet arrived at {timeline_secs:.2} s"
    );
    let spoken_ms = active_ms(&question, 48_000, 300.0) + active_ms(&barge, 48_000, 300.0);
    let recorded_ms = active_ms(&user_pcm, 48_000, 300.0);
    assert!(
        recorded_ms.abs_diff(spoken_ms) <= spoken_ms / 10,
        "user.opus holds {recorded_ms} ms of speech; the client spoke {spoken_ms} ms"
    );

    let (agent_pcm, agent_granule) = decode_ogg_opus(&dir.join("agent.opus"));
    assert_eq!(agent_pcm.len() as u64, agent_granule, "the agent file decodes to its timeline's length");
    let heard = client.inbox.lock().unwrap().agent_pcm.clone();
    let (heard_ms, agent_ms) = (active_ms(&heard, 48_000, 300.0), active_ms(&agent_pcm, 48_000, 300.0));
    eprintln!(
        "measured: {packets} packets, user.opus {user_secs:.2} s ({recorded_ms} ms speech of {spoken_ms}), \
         agent.opus {:.2} s ({agent_ms} ms voice; client heard {heard_ms} ms), played_ms {}",
        agent_pcm.len() as f64 / 48_000.0,
        interrupted["played_ms"]
    );
    assert!(heard_ms > 500, "the client heard the character: {heard_ms} ms");
    // Everything heard is in the file; the file may hold a little more: frames the link dropped
    // under load or that were in flight when the session was deleted.
    assert!(
        agent_ms + 60 >= heard_ms && agent_ms <= heard_ms + (heard_ms / 5).max(200),
        "agent.opus holds {agent_ms} ms of voice; the client heard {heard_ms} ms"
    );
    let last_due_us = outputs
        .iter()
        .rev()
        .find_map(|(_, o)| match o {
            RecOutput::Audio { due_us, .. } => Some(*due_us),
            _ => None,
        })
        .unwrap();
    let last_end = last_due_us * 48 / 1000 + 960;
    assert!(
        agent_granule.abs_diff(last_end) < 960,
        "agent.opus ends ({agent_granule}) with the last frame sent ({last_end}, 48 kHz samples)"
    );

    // --- It replays to the same transcript, interruption and truncation, twice. ---
    let recorded_interruptions = replay::interruptions(&outputs);
    assert_eq!(
        recorded_interruptions,
        vec![(interrupted["item_id"].as_str().unwrap().to_owned(), interrupted["played_ms"].as_u64().unwrap())]
    );
    let first = replay::run(&rec, &Overrides::default()).unwrap();
    let second = replay::run(&rec, &Overrides::default()).unwrap();
    assert_eq!(first.report(), second.report(), "a replay is deterministic");
    assert_eq!(replay::interruptions(&first.outputs), recorded_interruptions, "same agent.interrupted");
    assert_eq!(recorded_turns(&first.outputs), turns, "same transcript");
    assert_eq!(truncations(&first.outputs), truncations(&outputs), "same truncation");
    let differences = replay::diff(&replay::report(&outputs), &first.report(), 5);
    eprintln!("replay vs. recording: {} differing lines {differences:#?}", differences.len());

    // --- The admin API exports it (admin only, audited). ---
    let export = format!("{}/v1/admin/sessions/{session_id}/recording", ts.base);
    let res = ts.http.get(&export).bearer_auth(USER_KEY).send().await.unwrap();
    assert_eq!(res.status(), 403, "not for a user key");
    let res = ts.http.get(&export).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let manifest: Value = res.json().await.unwrap();
    let names: Vec<&str> = manifest["files"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["events.jsonl", "user.opus", "agent.opus"], "{manifest}");
    assert_eq!(manifest["transcript"].as_array().unwrap().len(), stored.len(), "{manifest}");
    let file_url = format!("{}{}", ts.base, manifest["files"][2]["url"].as_str().unwrap());
    let res = ts.http.get(&file_url).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "audio/ogg");
    assert_eq!(res.bytes().await.unwrap().as_ref(), std::fs::read(dir.join("agent.opus")).unwrap().as_slice());
    let res = ts.http.get(format!("{export}/secrets.txt")).bearer_auth(ADMIN_KEY).send().await.unwrap();
    assert_eq!(res.status(), 404);
    let other = plain["session_id"].as_str().unwrap();
    let res = ts
        .http
        .get(format!("{}/v1/admin/sessions/{other}/recording", ts.base))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "a session that was not recorded");
    let audit = get_json(&ts.http, &format!("{}/v1/admin/audit", ts.base), ADMIN_KEY).await;
    let actions: Vec<&str> = audit.as_array().unwrap().iter().filter_map(|a| a["action"].as_str()).collect();
    assert!(actions.contains(&"session.recording.export"), "{actions:?}");
    assert!(actions.contains(&"session.recording.download"), "{actions:?}");
}

async fn create(ts: &TestServer, body: Value) -> Value {
    let res = ts.http.post(format!("{}/v1/sessions", ts.base)).bearer_auth(USER_KEY).json(&body).send().await.unwrap();
    assert_eq!(res.status(), 201, "POST /v1/sessions {body}");
    res.json().await.unwrap()
}

/// The turns of an output stream: (role, text, interrupted).
fn recorded_turns(outputs: &[(u64, RecOutput)]) -> Vec<(String, String, bool)> {
    outputs
        .iter()
        .filter_map(|(_, o)| match o {
            RecOutput::Turn { role, text, interrupted } => {
                Some((serde_json::to_value(role).unwrap().as_str().unwrap().to_owned(), text.clone(), *interrupted))
            }
            _ => None,
        })
        .collect()
}

/// The truncate commands of an output stream.
fn truncations(outputs: &[(u64, RecOutput)]) -> Vec<Value> {
    outputs
        .iter()
        .filter_map(|(_, o)| match o {
            RecOutput::Provider { command } => Some(serde_json::to_value(command).unwrap()),
            _ => None,
        })
        .filter(|c| c["type"] == "truncate")
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let dest: PathBuf = to.join(e.file_name());
        std::fs::copy(e.path(), dest).unwrap();
    }
}
