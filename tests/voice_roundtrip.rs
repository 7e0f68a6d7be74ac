//! The whole voice path over a real WebRTC connection on loopback: a webrtc-rs client speaks real
//! speech (Opus, real libopus) to the in-process server with the scripted provider, and we check
//! what the provider heard, what the client heard, the events and their order, barge-in, and that
//! DELETE frees the session's resources.

mod common;

use std::time::{Duration, Instant};

use common::listen::states;
use common::*;
use serde_json::Value;

fn types(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| e["type"].as_str().unwrap_or("?").to_owned()).collect()
}

fn agent_packets_between(log: &[Received], from: Instant, to: Instant) -> usize {
    log.iter().filter(|r| matches!(r, Received::Audio { at, .. } if *at > from && *at < to)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_round_trip_barge_in_and_delete() {
    let fds_before = open_fds();
    let ts = TestServer::start().await;
    let (session_id, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    assert!(client.location.starts_with(&format!("/v1/sessions/{session_id}/")), "Location: {}", client.location);
    assert!(client.etag.starts_with('"'), "ETag is quoted: {}", client.etag);
    assert!(client.answer.contains("a=candidate:"), "the answer carries the server's candidates");

    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    client.wait_event("listening", Duration::from_secs(5), |e| e["type"] == "state" && e["state"] == "listening").await;

    // --- Turn 1: the user asks; the character answers in full. ---
    let (rate, question) = wav("user_question.wav");
    assert_eq!(rate, 48_000);
    let (speech_start, speech_end) = speech_span(&question, rate, 300.0).expect("the WAV has speech");
    client.silence(Duration::from_millis(300)).await;
    client.speak(&question).await;
    let sent_at_commit_min = client.sent_samples;
    client
        .silence_until("the agent's final transcript", Duration::from_secs(30), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        })
        .await;
    client.silence_until("back to listening", Duration::from_secs(15), back_to_listening(1)).await;

    // The provider heard the user's audio at its input rate, as long as it was sent, not silent.
    let turns = ts.recorder.turns();
    assert_eq!(turns.len(), 1, "one committed user turn");
    assert_eq!(turns[0].rates_hz, vec![24_000], "audio reaches the provider at its input rate");
    let heard = turns[0].total_samples as f64 / 24_000.0;
    // The turn is committed after min_silence (500 ms) of silence following the speech.
    let sent_before_commit = sent_at_commit_min as f64 / 48_000.0;
    assert!(
        heard >= sent_before_commit * 0.9 && heard <= (sent_before_commit + 1.0) * 1.1,
        "provider heard {heard:.2} s; the client had sent {sent_before_commit:.2} s of speech before the commit"
    );
    let user_peak = peak_rms(&turns[0].samples, 24_000);
    assert!(user_peak > 1000.0, "the provider's audio is speech, peak RMS {user_peak:.0}");

    // VAD edges bracket the speech: their distance is the speech's length.
    let evs = client.events();
    let started = evs.iter().find(|e| e["type"] == "user.speech_started").expect("speech_started");
    let stopped = evs.iter().find(|e| e["type"] == "user.speech_stopped").expect("speech_stopped");
    let vad_len = stopped["at_ms"].as_u64().unwrap() as i64 - started["at_ms"].as_u64().unwrap() as i64;
    let true_len = (speech_end - speech_start).as_millis() as i64;
    assert!((vad_len - true_len).abs() < 400, "VAD saw {vad_len} ms of speech; the WAV has {true_len} ms");

    // The client heard the whole scripted reply: 7.49 s, not silent.
    let (reply_rate, reply) = {
        let pcm = media::wav::parse(include_bytes!("../src/providers/scripted_reply.wav")).unwrap();
        (pcm.rate_hz, pcm.samples)
    };
    let reply_secs = reply.len() as f64 / f64::from(reply_rate);
    let (heard_samples, agent_pcm) = {
        let ib = client.inbox.lock().unwrap();
        (ib.agent_pcm.len(), ib.agent_pcm.clone())
    };
    let heard_secs = heard_samples as f64 / 48_000.0;
    assert!(
        (heard_secs - reply_secs).abs() <= reply_secs * 0.1,
        "client decoded {heard_secs:.2} s of agent audio; the reply is {reply_secs:.2} s"
    );
    assert!(peak_rms(&agent_pcm, 48_000) > 1000.0, "the agent's audio is speech");

    // Words and visemes travel with the audio they belong to: an event about offset `start_ms` of
    // the reply arrives when the audio packet carrying that offset does, within one frame late
    // and 120 ms early (plus loopback jitter). The packet's offset in the reply is the audio
    // before it (decoded samples, 48 kHz), not its RTP timestamp: when the model's audio comes
    // late the playout runs dry and the timestamps jump over the gap, which is not reply audio.
    // Comparing with that packet's own arrival, not with the first packet's arrival +
    // `start_ms`, keeps a late audio burst on a loaded machine from counting as event skew.
    let log = client.log();
    let audio: Vec<(std::time::Instant, u64)> = log
        .iter()
        .filter_map(|r| match r {
            Received::Audio { at, samples, .. } => Some((*at, *samples as u64)),
            _ => None,
        })
        .scan(0u64, |before, (at, n)| {
            let offset_ms = *before / 48;
            *before += n;
            Some((at, offset_ms))
        })
        .collect();
    assert!(!audio.is_empty(), "agent audio arrived");
    let audio_at = |offset_ms: u64| audio.iter().find(|(_, off)| *off + 20 > offset_ms).map(|(at, _)| *at);
    let mut skews = Vec::new();
    let mut starts = Vec::new();
    for r in &log {
        if let Received::Event { at, event } = r
            && event["type"] == "viseme"
        {
            let start = event["start_ms"].as_u64().unwrap();
            starts.push(start);
            if let Some(carrier) = audio_at(start) {
                let skew = if *at >= carrier {
                    (*at - carrier).as_millis() as i64
                } else {
                    -((carrier - *at).as_millis() as i64)
                };
                skews.push(skew);
            }
        }
    }
    assert!(starts.len() > 50, "visemes while the agent speaks: {}", starts.len());
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "viseme start_ms increases");
    assert!(*starts.last().unwrap() as f64 >= reply_secs * 1000.0 * 0.9, "visemes cover the reply");
    assert!(skews.len() * 10 >= starts.len() * 9, "most visemes have their audio packet: {}", skews.len());
    skews.sort();
    let (skew_min, skew_p50, skew_max) = (skews[0], skews[skews.len() / 2], skews[skews.len() - 1]);
    assert!(skew_min >= -120 && skew_max <= 60, "viseme arrival vs. its audio: {skew_min}..{skew_max} ms");
    let partials: Vec<(std::time::Instant, usize)> = log
        .iter()
        .filter_map(|r| match r {
            Received::Event { at, event }
                if event["type"] == "transcript" && event["role"] == "agent" && event["final"] == false =>
            {
                Some((*at, event["text"].as_str().unwrap().split_whitespace().count()))
            }
            _ => None,
        })
        .collect();
    assert!(partials.len() >= 10, "agent words released one by one: {} partials", partials.len());
    assert!(partials.windows(2).all(|w| w[0].1 < w[1].1), "partials grow word by word");
    let spread = partials.last().unwrap().0 - partials[0].0;
    assert!(spread.as_secs_f64() > reply_secs * 0.6, "words spread over the reply ({spread:?}), not sent at once");

    // Events in a sane order.
    let ty = types(&evs);
    assert_eq!(ty[0], "session.ready", "session.ready comes first: {ty:?}");
    let states = states(&evs);
    assert_eq!(states, ["initializing", "listening", "thinking", "speaking", "listening"], "state sequence");
    let pos = |pred: &dyn Fn(&Value) -> bool| evs.iter().position(pred).unwrap();
    assert!(pos(&|e| e["type"] == "user.speech_started") < pos(&|e| e["type"] == "user.speech_stopped"));
    assert!(pos(&|e| e["type"] == "user.speech_stopped") < pos(&|e| e["state"] == "thinking"));
    let finals: Vec<&Value> = evs.iter().filter(|e| e["type"] == "transcript" && e["final"] == true).collect();
    assert_eq!(finals.len(), 1, "exactly one final for the reply");
    assert!(finals[0]["text"].as_str().unwrap().starts_with("Hi! I am Aiko."), "{}", finals[0]);
    assert!(evs.iter().any(|e| e["type"] == "emotion" && e["emotion"] == "happy"));

    // --- Turn 2: the user asks again and barges in while the character answers. ---
    client.speak(&question).await;
    client
        .silence_until("the second reply to start", Duration::from_secs(20), |evs| {
            evs.iter().filter(|e| e["type"] == "state" && e["state"] == "speaking").count() >= 2
        })
        .await;
    client.silence(Duration::from_millis(1000)).await;
    let barge_in_from = client.log().len();
    client.speak(&question).await;
    let (interrupted, log, t_int, t_stop) =
        client.barge_in_window(barge_in_from, "the barge-in utterance to end", 3).await;
    let late = agent_packets_between(&log, t_int, t_stop);
    eprintln!(
        "measured: provider heard {heard:.2} s (sent {sent_before_commit:.2} s), VAD {vad_len} ms vs WAV {true_len} ms, \
         client heard {heard_secs:.2} s of a {reply_secs:.2} s reply, {late} packets after agent.interrupted, played_ms {}, \
         viseme skew min/p50/max {skew_min}/{skew_p50}/{skew_max} ms",
        interrupted["played_ms"]
    );
    assert!(late <= 2, "{late} agent packets arrived after agent.interrupted (at most 2 allowed)");

    let played_ms = interrupted["played_ms"].as_u64().unwrap();
    assert!((800..7000).contains(&played_ms), "played_ms {played_ms} matches ~1 s of reply + reaction time");
    let truncs = ts.recorder.truncations();
    assert_eq!(truncs.len(), 1, "the provider was told to truncate once");
    assert_eq!(truncs[0].0, interrupted["item_id"].as_str().unwrap());
    assert_eq!(truncs[0].1.as_millis() as u64, played_ms, "truncated at what was played");
    assert!(ts.recorder.cancels() >= 1, "the provider was told to cancel");

    // The interrupted turn is stored as interrupted with the heard text.
    let tr = ts.transcript_json(&session_id, &token).await;
    let rows = tr.as_array().unwrap();
    assert!(rows.iter().any(|r| r["role"] == "agent" && r["interrupted"] == true), "transcript: {tr}");
    assert!(rows.iter().any(|r| r["role"] == "agent" && r["interrupted"] == false), "transcript: {tr}");

    // --- DELETE ends the session and frees everything. ---
    let url = format!("{}{}", ts.base, client.location);
    let res = ts.http.delete(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let res = ts.http.delete(&url).bearer_auth(&token).send().await.unwrap();
    assert_eq!(res.status(), 404, "DELETE twice");
    let info: Value = ts.session_json(&session_id, &token).await;
    assert_eq!(info["state"], "ended", "{info}");
    assert_eq!(info["end_reason"], "client_request", "{info}");
    assert_eq!(ts.server.manager().live_count(), 0);

    // The conversation is visible in /metrics: each stage's latency was observed.
    let metrics = ts.http.get(format!("{}/metrics", ts.base)).send().await.unwrap().text().await.unwrap();
    let count = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    assert!(count("kotodama_uplink_latency_seconds_count") > 200.0, "uplink latency observed per packet:\n{metrics}");
    assert!(count("kotodama_turn_latency_seconds_count{part=\"total\"}") >= 2.0, "two turns timed");
    assert!(count("kotodama_barge_in_latency_seconds_count") >= 1.0, "the barge-in timed");
    assert!(count("kotodama_pacing_lateness_seconds_count") > 300.0, "every agent frame's lateness observed");
    assert!(count("kotodama_rtp_packets_total{direction=\"in\"}") > 500.0, "inbound packets counted");
    assert!(count("kotodama_sessions_ended_total{reason=\"client_request\"}") >= 1.0);
    let sum = count("kotodama_barge_in_latency_seconds_sum");
    eprintln!("measured: barge-in onset -> audio stop {:.0} ms (min_speech 100 ms)", sum * 1000.0);
    client.close().await;
    drop(client);
    ts.server.shutdown().await.unwrap();
    // Every socket and file the session opened is closed again.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now_fds = open_fds();
        if now_fds <= fds_before + 2 {
            break;
        }
        assert!(Instant::now() < deadline, "file descriptors leaked: {fds_before} before, {now_fds} after");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
