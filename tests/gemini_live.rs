//! The Gemini Live provider end to end: a real webrtc-rs client talks to the in-process server,
//! whose `gemini` provider talks to a fake Gemini Live server over a real WebSocket
//! (tests/common/fake_gemini.rs). We check what the model received (setup, the user's audio,
//! activity edges, tool responses, the resumption handle) and what the client heard and saw.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_gemini::{FakeGemini, GOptions, GReply};
use common::fake_openai::{reply_speech, short_speech};
use common::listen::*;
use common::*;
use kotodama::config::{Config, Secret};
use kotodama::providers::gemini::{GeminiProvider, GeminiSettings, GeminiTurnDetection};
use kotodama::providers::tools::{Tool, ToolOutput, ToolRegistry, ToolSpec};
use kotodama::providers::{ProviderCommand, ProviderEvent, RealtimeProvider, SessionConfig, Speaker};
use serde_json::{Value, json};

/// A server whose sessions use the `gemini` provider pointed at `fake`.
async fn start_gemini(fake: &FakeGemini, tweak: impl FnOnce(&mut Config)) -> TestServer {
    let url = fake.url();
    TestServer::start_with_providers(
        move |c| {
            c.gemini.url = Some(url);
            c.gemini.api_key = Some(Secret::new("test-gemini-key"));
            c.provider = Some("gemini".into());
            tweak(c);
        },
        |c| vec![Arc::new(GeminiProvider::new(c.gemini.clone())) as Arc<dyn RealtimeProvider>],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoken_turn_with_server_activity_detection_over_binary_frames() {
    let (text, audio) = reply_speech();
    let opts = GOptions { binary: true, ..Default::default() };
    let fake = FakeGemini::start(opts, vec![GReply::Speech { text: text.clone(), audio: audio.clone() }]).await;
    let ts = start_gemini(&fake, |c| c.gemini.model = "gemini-live-test".into()).await;
    let (_sid, _token, mut client) = connect(&ts).await;
    let ready = client.events().into_iter().find(|e| e["type"] == "session.ready").unwrap();
    assert_eq!(ready["provider"], "gemini");

    // The handshake and the setup.
    let c0 = fake.conn(0);
    assert!(c0.path.ends_with("BidiGenerateContent?key=test-gemini-key"), "{}", c0.path);
    let s = &c0.setup;
    assert_eq!(s["model"], "models/gemini-live-test");
    assert!(s["systemInstruction"]["parts"][0]["text"].as_str().unwrap().starts_with("You are Aiko"), "{s}");
    assert_eq!(s["generationConfig"]["responseModalities"], json!(["AUDIO"]));
    assert_eq!(s["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"], "Kore");
    assert_eq!(s["realtimeInputConfig"]["automaticActivityDetection"]["disabled"], false);
    assert_eq!((s["inputAudioTranscription"].clone(), s["outputAudioTranscription"].clone()), (json!({}), json!({})));
    assert!(s["contextWindowCompression"]["slidingWindow"].is_object());
    assert_eq!(s["sessionResumption"], json!({"transparent": true}));
    let tools: Vec<&str> =
        s["tools"][0]["functionDeclarations"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(tools, ["get_time", "set_emotion"]);

    client.silence(Duration::from_millis(300)).await;
    ask_and_wait_reply(&mut client, 1).await;

    // The model heard the user's audio at 16 kHz, as long as the client sent it, with speech.
    let c0 = fake.conn(0);
    assert_model_heard_question(&c0.audio, 16_000, client.sent_samples);
    assert!(c0.with("realtimeInput").iter().all(|m| m["realtimeInput"].get("activityStart").is_none()), "server VAD");

    let (hole, spurts) = media_holes(&client.log(), 0, None);
    eprintln!("measured: plain reply: largest media hole {} ms, {spurts} talkspurt(s)", hole.as_millis());
    // The client heard the whole reply and saw both transcripts.
    let heard = client.inbox.lock().unwrap().agent_pcm.clone();
    let (heard_secs, reply_secs) = (heard.len() as f64 / 48_000.0, audio.len() as f64 / 24_000.0);
    assert!((heard_secs - reply_secs).abs() <= reply_secs * 0.1, "heard {heard_secs:.2} s of {reply_secs:.2} s");
    assert!(peak_rms(&heard, 48_000) > 1000.0);
    let evs = client.events();
    let user_finals: Vec<&Value> =
        evs.iter().filter(|e| e["type"] == "transcript" && e["role"] == "user" && e["final"] == true).collect();
    assert_eq!(user_finals.len(), 1);
    assert_eq!(user_finals[0]["text"], "What is the weather like?");
    assert!(count(&evs, |e| e["type"] == "transcript" && e["role"] == "user" && e["final"] == false) >= 2, "partials");
    assert_eq!(agent_finals(&evs), [text]);
    let states = states(&evs);
    assert_eq!(states.last(), Some(&"listening"));
    assert!(states.contains(&"speaking"), "{states:?}");
    assert_eq!(count(&evs, |e| e["type"] == "error"), 0, "no errors: {evs:#?}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_with_our_turn_detection_stops_the_model_and_keeps_what_was_heard() {
    let (text, audio) = reply_speech();
    let (t2, a2) = short_speech(1.0);
    let script = vec![GReply::Speech { text: text.clone(), audio }, GReply::Speech { text: t2.clone(), audio: a2 }];
    let fake = FakeGemini::start(GOptions::default(), script).await;
    let ts = start_gemini(&fake, |c| c.gemini.turn_detection = GeminiTurnDetection::Local).await;
    let (session_id, token, mut client) = connect(&ts).await;
    assert_eq!(fake.conn(0).setup["realtimeInputConfig"]["automaticActivityDetection"]["disabled"], true);

    // Turn 1: our VAD ends it (activityEnd); the long reply plays; the user talks over it.
    let (_, question) = wav("user_question.wav");
    client.silence(Duration::from_millis(200)).await;
    client
        .ask_until("the reply to play", Duration::from_secs(20), |evs| evs.iter().any(|e| is_state(e, "speaking")))
        .await;
    let from = client.log().len();
    client.silence(Duration::from_millis(1500)).await;
    client.speak(&question[..48_000]).await;
    let interrupted =
        client.wait_event("agent.interrupted", Duration::from_secs(5), |e| e["type"] == "agent.interrupted").await;
    // Turn 2 (the words spoken over the reply) is answered with the short reply.
    client.silence_until("the second reply", Duration::from_secs(20), |evs| agent_finals(evs).contains(&t2)).await;

    let c0 = fake.conn(0);
    let start = |m: &Value| m.pointer("/realtimeInput/activityStart").is_some();
    let end = |m: &Value| m.pointer("/realtimeInput/activityEnd").is_some();
    let starts: Vec<usize> = (0..c0.received.len()).filter(|&i| start(&c0.received[i])).collect();
    let ends: Vec<usize> = (0..c0.received.len()).filter(|&i| end(&c0.received[i])).collect();
    assert!(starts.len() >= 2 && ends.len() >= 2, "activity edges: {starts:?} {ends:?}");
    assert!(starts[0] < ends[0] && ends[0] < starts[1] && starts[1] < ends[1], "in order: {starts:?} {ends:?}");
    let played = interrupted["played_ms"].as_u64().unwrap();
    let heard_ms = agent_ms_after(&client.log(), 0);
    let full_ms = audio_ms(&reply_speech().1) + audio_ms(&short_speech(1.0).1);
    eprintln!("measured: interrupted after {played} ms; heard {heard_ms:.0} ms of {full_ms:.0} ms of replies");
    assert!((1000..4000).contains(&played), "the reply was cut where the user spoke: {played} ms");
    assert!(heard_ms < full_ms - 2000.0, "the rest of the cut reply was not played");
    assert!(agent_ms_after(&client.log(), from) > 900.0, "the second reply was heard");

    // The stored turn holds what was heard, marked interrupted.
    let tr = transcript(&ts, &session_id, &token).await;
    let cut = tr.iter().find(|r| r["role"] == "agent" && r["interrupted"] == true).expect("cut turn");
    let cut = cut["text"].as_str().unwrap();
    assert!(text.starts_with(cut) && cut.len() < text.len() / 2, "heard text `{cut}`");
    ts.server.shutdown().await.unwrap();
}

fn audio_ms(samples_24k: &[i16]) -> f64 {
    samples_24k.len() as f64 / 24.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_turn_with_a_tool_call_round_trip() {
    let (t1, a1) = short_speech(1.5);
    let script = vec![
        GReply::ToolCall { name: "set_emotion".into(), args: json!({"emotion": "surprised"}) },
        GReply::Speech { text: t1.clone(), audio: a1 },
    ];
    let fake = FakeGemini::start(GOptions::default(), script).await;
    let ts = start_gemini(&fake, |c| c.characters = vec![character_with_voices()]).await;
    let (_sid, _token, mut client) = connect(&ts).await;
    let voice =
        &fake.conn(0).setup["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"];
    assert_eq!(voice, "Charon", "the character's voice for gemini");
    client.send_text(r#"{"type":"text","text":"How do you feel?"}"#).await;
    client.silence_until("the reply", Duration::from_secs(20), |evs| agent_finals(evs).contains(&t1)).await;

    let c0 = fake.conn(0);
    let text = c0.with("clientContent");
    assert_eq!(
        text.last().unwrap()["clientContent"],
        json!({"turns": [{"role": "user", "parts": [{"text": "How do you feel?"}]}], "turnComplete": true})
    );
    let responses = c0.with("toolResponse");
    assert_eq!(responses.len(), 1);
    assert_eq!(
        responses[0]["toolResponse"]["functionResponses"],
        json!([{"id": "function-call-0-1", "name": "set_emotion", "response": {"ok": true}}])
    );
    let evs = client.events();
    assert!(evs.iter().any(|e| e["type"] == "emotion" && e["emotion"] == "surprised"), "the tool's emotion");
    assert_eq!(count(&evs, |e| e["type"] == "error"), 0, "{evs:#?}");
    ts.server.shutdown().await.unwrap();
}

/// A registry with a tool that takes a second, so the model can cancel it while it runs.
fn tools_with_a_slow_lookup() -> ToolRegistry {
    let mut tools = ToolRegistry::builtin();
    tools.register(Tool {
        spec: ToolSpec {
            name: "slow_lookup".into(),
            description: "Looks something up, slowly.".into(),
            parameters: json!({"type": "object", "properties": {}}),
        },
        handler: Arc::new(|_| {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(ToolOutput { output: json!({"found": true}), effects: vec![] })
            })
        }),
        timeout: Duration::from_secs(5),
    });
    tools
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_the_model_cancels_gets_no_response() {
    let (t1, a1) = short_speech(1.0);
    let script = vec![
        GReply::CancelledToolCall { name: "slow_lookup".into(), args: json!({}), after: Duration::from_millis(200) },
        GReply::Speech { text: t1.clone(), audio: a1 },
    ];
    let fake = FakeGemini::start(GOptions::default(), script).await;
    let settings = GeminiSettings { url: Some(fake.url()), ..Default::default() };
    let cfg = SessionConfig {
        session_id: "s1".into(),
        character_id: "aiko".into(),
        character_name: "Aiko".into(),
        instructions: "You are Aiko.".into(),
        voice: "puck".into(),
        voices: Default::default(),
        language: "en-US".into(),
        history: vec![],
        session_history: Default::default(),
        tools: Arc::new(tools_with_a_slow_lookup()),
        viseme_overrides: Default::default(),
        moderator: None,
    };
    let mut s = GeminiProvider::new(settings).connect(cfg).await.expect("connects");
    assert!(matches!(s.events.recv().await, Some(ProviderEvent::Ready)));
    assert_eq!(
        fake.conn(0).setup["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"],
        "Puck"
    );
    s.commands.send(ProviderCommand::Text("Look it up".into())).await.unwrap();
    let mut audio = 0usize;
    let mut finals = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, s.events.recv()).await.expect("the reply in time") {
            Some(ProviderEvent::AudioDelta { pcm, .. }) => audio += pcm.samples.len(),
            Some(ProviderEvent::Transcript { speaker: Speaker::Agent, text, is_final: true, .. }) => finals.push(text),
            Some(ProviderEvent::ResponseDone { .. }) => break,
            Some(_) => {}
            None => panic!("the session ended"),
        }
    }
    // Long enough for the cancelled call to have finished, had it not been aborted.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(finals, [t1]);
    assert_eq!(audio, 24_000, "the reply after the cancellation was delivered whole");
    assert!(fake.conn(0).with("toolResponse").is_empty(), "no response for a cancelled call");
    s.commands.send(ProviderCommand::Close).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_away_and_a_forced_close_resume_the_session_without_an_audible_gap() {
    let (ta, aa) = short_speech(1.0);
    let (tb, ab) = reply_speech();
    let (tc, ac) = short_speech(1.5);
    let script = vec![
        GReply::Speech { text: ta.clone(), audio: aa },
        GReply::SpeechWithGoAway {
            text: tb.clone(),
            audio: ab.clone(),
            go_away_after: Duration::from_secs(1),
            time_left: Duration::from_secs(3),
        },
        GReply::Speech { text: tc.clone(), audio: ac },
    ];
    let fake = FakeGemini::start(GOptions::default(), script).await;
    let ts = start_gemini(&fake, |_| {}).await;
    let (_sid, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(200)).await;
    ask_and_wait_reply(&mut client, 1).await;

    // Turn 2: goAway 1 s into the 7.5 s reply, the connection closed 3 s later.
    let from = client.log().len();
    ask_and_wait_reply(&mut client, 2).await;
    let log = client.log();
    // Where the provider swapped connections: when the resumed one was opened (the old one was
    // closed then or just before). A hole there would be the resume's; holes elsewhere can only
    // come from a CPU-starved session task on a loaded machine, so they are printed, not asserted.
    let resumed_at = fake.conns().last().unwrap().opened_at.unwrap();
    let window = (resumed_at - Duration::from_millis(500), resumed_at + Duration::from_millis(500));
    let (hole_at_swap, _) = media_holes(&log, from, Some(window));
    let (hole, spurts) = media_holes(&log, from, None);
    let heard = agent_ms_after(&log, from);
    eprintln!(
        "measured: reply across goAway + close: heard {heard:.0} ms of {:.0} ms; media hole around the resume {} ms, \
         over the reply {} ms; {spurts} talkspurt(s); largest arrival gap {} ms",
        audio_ms(&ab),
        hole_at_swap.as_millis(),
        hole.as_millis(),
        max_packet_gap(&log, from).as_millis()
    );
    assert!(
        log.iter().any(|r| matches!(r, Received::Audio { at, .. } if *at > window.1)),
        "the swap happened mid-reply"
    );
    // One talkspurt: the playout never ran dry (an underrun starts a new spurt), so the resume
    // left no gap in the audio. The RTP timeline may still step by a frame when the 2-core machine
    // starves the session task (a stall re-anchors the pacing grid): at most one frame is allowed.
    assert_eq!(spurts, 1, "the reply played as one talkspurt");
    assert!(hole_at_swap <= Duration::from_millis(40), "a {} ms hole at the resume", hole_at_swap.as_millis());
    assert!((heard - audio_ms(&ab)).abs() < 400.0, "the whole reply was heard: {heard:.0} ms");

    // Turn 3 goes to the resumed connection, which carried the newest handle of the first one.
    ask_and_wait_reply(&mut client, 3).await;
    let conns = fake.conns();
    let c0 = &conns[0];
    assert!(c0.closed);
    let last = conns.last().unwrap();
    assert!(conns.len() >= 2, "a second connection");
    assert_eq!(last.resumed.as_ref(), c0.issued.last(), "resumed from the newest handle: {:?}", c0.issued);
    assert!(last.with("clientContent").is_empty(), "a resumed session gets no history again");
    assert_eq!(last.setup["model"], c0.setup["model"]);
    assert_eq!(last.setup["tools"], c0.setup["tools"]);
    let (m0, _) = speech_span(&last.audio, 16_000, 300.0).expect("the resumed session heard turn 3");
    assert!(m0 > Duration::ZERO);
    assert!(conns[1..conns.len() - 1].iter().all(|c| c.audio.is_empty()), "stale resumes took no audio");
    let evs = client.events();
    assert_eq!(agent_finals(&evs), [ta, tb, tc]);
    assert_eq!(count(&evs, |e| e["type"] == "error"), 0, "the user notices nothing: {evs:#?}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_between_turns_is_resumed_from_the_newest_handle() {
    let (ta, aa) = short_speech(1.0);
    let (tb, ab) = short_speech(1.5);
    let script =
        vec![GReply::SpeechThenDrop { text: ta.clone(), audio: aa }, GReply::Speech { text: tb.clone(), audio: ab }];
    let fake = FakeGemini::start(GOptions::default(), script).await;
    let ts = start_gemini(&fake, |_| {}).await;
    let (_sid, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(200)).await;
    ask_and_wait_reply(&mut client, 1).await;
    ask_and_wait_reply(&mut client, 2).await;
    let conns = fake.conns();
    assert_eq!(conns.len(), 2, "one resume");
    assert_eq!(conns[1].resumed.as_ref(), conns[0].issued.last(), "resumed from the newest handle");
    assert!(conns[1].with("clientContent").is_empty(), "no history again: the handle carries the context");
    speech_span(&conns[1].audio, 16_000, 300.0).expect("the resumed connection heard turn 2");
    let evs = client.events();
    assert_eq!(agent_finals(&evs), [ta, tb]);
    assert_eq!(count(&evs, |e| e["type"] == "error"), 0, "the user notices nothing: {evs:#?}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_metadata_is_the_token_budgets_count() {
    let (text, audio) = short_speech(2.0);
    let fake = FakeGemini::start(GOptions::default(), vec![GReply::Speech { text, audio }]).await;
    // The fake's turnComplete carries usageMetadata.totalTokenCount 321: over a 300-token cap.
    let ts = start_gemini(&fake, |c| c.budget.tokens = Some(300)).await;
    let (session_id, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(300)).await;
    let (exceeded, usage) = ask_until_budget_ends(&ts, &mut client, &session_id).await;
    assert_eq!((exceeded["kind"].as_str(), exceeded["used"].as_u64()), (Some("tokens"), Some(321)), "{exceeded}");
    assert_eq!((usage.usage.totals.tokens, usage.usage.tokens_reported), (321, true), "the report, not an estimate");
    ts.server.shutdown().await.unwrap();
}
