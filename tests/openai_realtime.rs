//! The OpenAI Realtime provider end to end: a real webrtc-rs client talks to the in-process
//! server, whose `openai` provider talks to a fake OpenAI Realtime server over a real WebSocket
//! (tests/common/fake_openai.rs). We check what the model received (session.update, the user's
//! audio, cancel/truncate, tool outputs, replayed context) and what the client heard and saw.

mod common;

use std::time::{Duration, Instant};

use common::fake_openai::{
    FakeOpenAi, FakeOptions, Reply, WEATHER_ARGS, reply_speech, short_speech, weather_tool_script,
};
use common::listen::*;
use common::*;
use serde_json::Value;

/// A server on `fake` whose turns our VAD commits, reconnecting after 50 ms, and a client that has
/// heard its first reply.
async fn first_reply_with_fast_reconnect(fake: &FakeOpenAi) -> (TestServer, TestClient) {
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
        c.resilience.backoff_base_ms = 50;
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(200)).await;
    ask_and_wait_reply(&mut client, 1).await;
    (ts, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoken_turn_over_the_ga_dialect_with_local_turn_detection() {
    let (text, audio) = reply_speech();
    let fake =
        FakeOpenAi::start(FakeOptions::default(), vec![Reply::Speech { text: text.clone(), audio: audio.clone() }])
            .await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
        c.openai.model = "gpt-realtime-test".into();
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    let ready = client.events().into_iter().find(|e| e["type"] == "session.ready").unwrap();
    assert_eq!(ready["provider"], "openai");

    // The handshake and the session configuration.
    let c0 = fake.conn(0);
    assert_eq!(c0.path, "/v1/realtime?model=gpt-realtime-test");
    assert_eq!(c0.header("authorization").as_deref(), Some("Bearer sk-test-key"));
    assert_eq!(c0.header("openai-beta"), None, "GA sends no beta header");
    let update = &c0.of_type("session.update")[0]["session"];
    assert_eq!(update["type"], "realtime");
    assert!(update["instructions"].as_str().unwrap().starts_with("You are Aiko"), "{update}");
    assert_eq!(update["audio"]["output"]["voice"], "marin", "aiko is no OpenAI voice: the default is used");
    assert_eq!(update["audio"]["input"]["format"], serde_json::json!({"type": "audio/pcm", "rate": 24000}));
    assert_eq!(update["audio"]["output"]["format"], serde_json::json!({"type": "audio/pcm", "rate": 24000}));
    assert_eq!(update["audio"]["input"]["turn_detection"], Value::Null, "local turn detection");
    assert_eq!(update["audio"]["input"]["transcription"]["model"], "gpt-4o-mini-transcribe");
    let tools: Vec<&str> = update["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(tools, ["get_time", "set_emotion"]);
    assert!(update["tools"][1]["parameters"]["properties"]["emotion"]["enum"].is_array());

    client.silence(Duration::from_millis(300)).await;
    ask_and_wait_reply(&mut client, 1).await;

    // The model received the user's audio at 24 kHz, as long as the client sent it, and speech.
    let c0 = fake.conn(0);
    assert_eq!(c0.of_type("input_audio_buffer.commit").len(), 1, "our VAD committed one turn");
    assert_eq!(c0.of_type("response.create").len(), 1);
    assert_model_heard_question(&c0.audio, 24_000, client.sent_samples);
    assert!(peak_rms(&c0.audio, 24_000) > 1000.0);

    // The client heard the reply, saw both transcripts and the states in order.
    let heard = client.inbox.lock().unwrap().agent_pcm.clone();
    let heard_secs = heard.len() as f64 / 48_000.0;
    let reply_secs = audio.len() as f64 / 24_000.0;
    assert!(
        (heard_secs - reply_secs).abs() <= reply_secs * 0.1,
        "heard {heard_secs:.2} s of a {reply_secs:.2} s reply"
    );
    assert!(peak_rms(&heard, 48_000) > 1000.0);
    let evs = client.events();
    let user_final = evs.iter().find(|e| e["type"] == "transcript" && e["role"] == "user" && e["final"] == true);
    assert_eq!(user_final.unwrap()["text"], "What is the weather like?");
    assert!(count(&evs, |e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == false) >= 3, "partials");
    assert_eq!(agent_finals(&evs), [text.as_str()]);
    let states = states(&evs);
    assert_eq!(states, ["initializing", "listening", "thinking", "speaking", "listening"]);
    assert_eq!(count(&evs, |e| e["type"] == "error"), 0, "no errors: {evs:#?}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_cancels_and_truncates_to_what_the_client_received_beta_server_vad() {
    let (text, audio) = reply_speech();
    let (t1, a1) = short_speech(1.5);
    let opts = FakeOptions { ga: false, server_vad: true, ..Default::default() };
    let script = vec![Reply::Speech { text: t1, audio: a1 }, Reply::Speech { text: text.clone(), audio }];
    let fake = FakeOpenAi::start(opts, script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.dialect = kotodama::providers::openai::protocol::Dialect::Beta;
    })
    .await;
    let (session_id, token, mut client) = connect(&ts).await;
    let c0 = fake.conn(0);
    assert_eq!(c0.header("openai-beta").as_deref(), Some("realtime=v1"));
    let update = &c0.of_type("session.update")[0]["session"];
    assert_eq!(update["input_audio_format"], "pcm16");
    assert_eq!(update["turn_detection"]["type"], "server_vad");
    assert_eq!(update["voice"], "alloy");

    // Turn 1: the server's VAD ends the turn; a short reply.
    client.silence(Duration::from_millis(200)).await;
    ask_and_wait_reply(&mut client, 1).await;
    assert!(fake.conn(0).of_type("input_audio_buffer.commit").is_empty(), "server VAD: we never commit");

    // Turn 2: the long reply; the user barges in after ~1.5 s of it.
    let from = client.log().len();
    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client
        .silence_until("the second reply to play", Duration::from_secs(20), |evs| {
            count(evs, |e| is_state(e, "speaking")) >= 2
        })
        .await;
    client.silence(Duration::from_millis(1500)).await;
    client.speak(&question[..48_000]).await;
    let interrupted =
        client.wait_event("agent.interrupted", Duration::from_secs(5), |e| e["type"] == "agent.interrupted").await;
    client.silence(Duration::from_millis(800)).await;

    let c0 = fake.conn(0);
    let cancels = c0.of_type("response.cancel");
    let truncs = c0.of_type("conversation.item.truncate");
    assert!(!cancels.is_empty(), "response.cancel sent");
    assert_eq!(truncs.len(), 1, "one truncate: {truncs:?}");
    let pos = |ty: &str| c0.received.iter().position(|v| v["type"] == ty).unwrap();
    assert!(pos("response.cancel") < pos("conversation.item.truncate"), "cancel, then truncate");
    assert_eq!(truncs[0]["item_id"], interrupted["item_id"]);
    assert_eq!(truncs[0]["content_index"], 0);
    let audio_end_ms = truncs[0]["audio_end_ms"].as_u64().unwrap();
    let client_ms = agent_ms_after(&client.log(), from);
    eprintln!("measured: truncate audio_end_ms {audio_end_ms}, client received {client_ms:.0} ms of that reply");
    assert!(
        (audio_end_ms as f64 - client_ms).abs() <= 40.0,
        "audio_end_ms {audio_end_ms} vs {client_ms:.0} ms received"
    );
    assert_eq!(interrupted["played_ms"].as_u64().unwrap(), audio_end_ms);

    // The stored turn holds what was heard, marked interrupted: a prefix, shorter than the reply.
    let tr = ts.transcript_json(&session_id, &token).await;
    let cut = tr
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["role"] == "agent" && r["interrupted"] == true)
        .expect("interrupted turn");
    let cut = cut["text"].as_str().unwrap();
    assert!(!cut.is_empty() && text.starts_with(cut) && cut.len() < text.len() / 2, "heard text `{cut}`");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greeting_and_tool_calls_round_trip_and_failures_never_stall_the_turn() {
    let (g, ga) = short_speech(1.0);
    let (t1, a1) = short_speech(2.0);
    let (t2, a2) = short_speech(1.5);
    let script = vec![
        Reply::Speech { text: g, audio: ga },
        Reply::ToolCall { name: "set_emotion".into(), arguments: r#"{"emotion":"surprised"}"#.into() },
        Reply::Speech { text: t1.clone(), audio: a1 },
        Reply::ToolCall { name: "launch_rockets".into(), arguments: "{}".into() },
        Reply::Speech { text: t2.clone(), audio: a2 },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
        c.characters = vec![kotodama::config::Character {
            id: "kai".into(),
            name: "Kai".into(),
            language: "en-US".into(),
            voice: "coral".into(),
            persona: "You are Kai.".into(),
            greeting: Some("Greet the user warmly.".into()),
            providers: vec![],
            tools: None,
            ..Default::default()
        }];
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;

    // The character speaks first.
    client
        .silence_until("the greeting", Duration::from_secs(15), |evs| {
            count(evs, |e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true) >= 1
                && evs.iter().rev().find(|e| e["type"] == "state").is_some_and(|e| e["state"] == "listening")
        })
        .await;
    let c0 = fake.conn(0);
    assert_eq!(c0.of_type("session.update")[0]["session"]["audio"]["output"]["voice"], "coral");
    assert_eq!(c0.of_type("response.create")[0]["response"]["instructions"], "Greet the user warmly.");

    // Turn 1: the model calls set_emotion, gets the result, and then speaks.
    ask_and_wait_reply(&mut client, 2).await;
    let c0 = fake.conn(0);
    let outputs = c0.of_type("conversation.item.create");
    let out1 = outputs.iter().find(|v| v["item"]["type"] == "function_call_output").expect("tool output sent");
    assert_eq!(out1["item"]["output"], r#"{"ok":true}"#);
    assert!(out1["item"]["call_id"].as_str().unwrap().starts_with("call_"));
    let types: Vec<&str> = c0.received.iter().map(|v| v["type"].as_str().unwrap()).collect();
    let out_pos = types.iter().position(|t| *t == "conversation.item.create").unwrap();
    assert_eq!(types[out_pos + 1], "response.create", "the result is followed by response.create: {types:?}");
    let evs = client.events();
    assert!(evs.iter().any(|e| e["type"] == "emotion" && e["emotion"] == "surprised"), "emotion event from the tool");
    assert!(evs.iter().any(|e| e["type"] == "transcript" && e["final"] == true && e["text"] == t1.as_str()));

    // Turn 2 (typed): an unknown tool gets an error output and the reply still comes.
    client.send_text(r#"{"type":"text","text":"Launch the rockets"}"#).await;
    client
        .silence_until("the reply after the failed tool", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["final"] == true && e["text"] == t2.as_str())
        })
        .await;
    let c0 = fake.conn(0);
    let items = c0.of_type("conversation.item.create");
    let user_text = items.iter().find(|v| v["item"]["role"] == "user").expect("typed text became a user item");
    assert_eq!(
        user_text["item"]["content"][0],
        serde_json::json!({"type": "input_text", "text": "Launch the rockets"})
    );
    let outs: Vec<&Value> = items.iter().filter(|v| v["item"]["type"] == "function_call_output").collect();
    assert_eq!(outs.len(), 2);
    assert!(outs[1]["item"]["output"].as_str().unwrap().contains("unknown tool `launch_rockets`"), "{}", outs[1]);
    assert_eq!(c0.of_type("response.create").len(), 5, "greeting, turn, tool follow-up, text, tool follow-up");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_socket_reconnects_replays_context_and_repeats_no_agent_turn() {
    let (ta, aa) = short_speech(1.5);
    let (tb, ab) = reply_speech();
    let (tc, ac) = short_speech(1.0);
    let script = vec![
        Reply::Speech { text: ta.clone(), audio: aa },
        Reply::DropAfter { text: tb.clone(), audio: ab, after: Duration::from_millis(1000) },
        Reply::Speech { text: tc.clone(), audio: ac },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let (ts, mut client) = first_reply_with_fast_reconnect(&fake).await;

    // Turn 2: the socket drops 1 s into the reply.
    let from = client.log().len();
    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client
        .silence_until("reconnected", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| e["type"] == "error" && e["code"] == "provider_reconnected")
                && evs.iter().rev().find(|e| e["type"] == "state").is_some_and(|e| e["state"] == "listening")
        })
        .await;
    let evs = client.events();
    assert!(evs.iter().any(|e| e["type"] == "error" && e["code"] == "provider_reconnecting"), "{evs:#?}");
    assert!(!evs.iter().any(|e| e["type"] == "session.ended"), "the session survives");
    let b_ms = agent_ms_after(&client.log(), from);
    assert!((900.0..1300.0).contains(&b_ms), "the client heard {b_ms:.0} ms of the cut reply (1000 ms were sent)");

    // The new session got the configuration and the conversation, and was not asked to speak.
    assert!(fake.conn(0).closed);
    let c1 = fake.conn(1);
    assert_eq!(c1.of_type("session.update").len(), 1);
    let replayed: Vec<(String, String)> = c1
        .of_type("conversation.item.create")
        .iter()
        .map(|v| {
            (
                v["item"]["role"].as_str().unwrap().to_owned(),
                v["item"]["content"][0]["text"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(replayed.len(), 4, "{replayed:?}");
    assert_eq!(replayed[0], ("user".into(), "What is the weather like?".into()));
    assert_eq!(replayed[1], ("assistant".into(), ta.clone()));
    assert_eq!(replayed[2].0, "user");
    assert_eq!(replayed[3].0, "assistant");
    assert!(
        tb.starts_with(&replayed[3].1) && replayed[3].1.len() < tb.len(),
        "the cut reply as sent: {:?}",
        replayed[3].1
    );
    assert_eq!(c1.of_type("response.create").len(), 0, "no agent turn is repeated");

    // Turn 3 goes to the new session and is answered once.
    let from = client.log().len();
    // The cut reply ended with a final of what was heard: C is the third final.
    ask_and_wait_reply(&mut client, 3).await;
    let c1 = fake.conn(1);
    assert_eq!(c1.of_type("response.create").len(), 1);
    let c_ms = agent_ms_after(&client.log(), from);
    assert!((c_ms - 1000.0).abs() < 150.0, "heard {c_ms:.0} ms of the 1 s reply");
    let finals: Vec<String> = client
        .events()
        .iter()
        .filter(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(finals.first(), Some(&ta));
    assert_eq!(finals.last(), Some(&tc));
    assert_eq!(finals.len(), 3, "{finals:?}");
    assert!(
        tb.starts_with(&finals[1]) && finals[1].len() < tb.len(),
        "the cut reply ends with what was heard: {:?}",
        finals[1]
    );
    assert_eq!(fake.conns().len(), 2, "one reconnect");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycling_swaps_sessions_at_a_turn_boundary_without_an_audible_gap() {
    let (ta, aa) = reply_speech();
    let (tb, ab) = short_speech(1.0);
    let script = vec![Reply::Speech { text: ta.clone(), audio: aa }, Reply::Speech { text: tb.clone(), audio: ab }];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
        c.resilience.max_session_ms = Some(4000);
        c.resilience.recycle_lead_ms = 2000;
        c.resilience.quiet_ms = 300;
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    let from = client.log().len();
    client.silence(Duration::from_millis(200)).await;
    // The reply (7.5 s) plays across the 4 s limit; the next session was opened at 2 s.
    ask_and_wait_reply(&mut client, 1).await;
    client
        .silence_until("the recycle", Duration::from_secs(10), |evs| {
            evs.iter().any(|e| e["type"] == "error" && e["code"] == "provider_recycled")
        })
        .await;
    let c0 = fake.conn(0);
    let c1 = fake.conn(1);
    let limit = c0.opened_at.unwrap() + Duration::from_secs(4);
    assert!(c1.opened_at.unwrap() < limit, "make before break: the next session opened before the limit");
    let log = client.log();
    let notice_at = log
        .iter()
        .find_map(|r| match r {
            Received::Event { at, event } if event["code"] == "provider_recycled" => Some(*at),
            _ => None,
        })
        .unwrap();
    let last_audio =
        log.iter().rev().find_map(|r| if let Received::Audio { at, .. } = r { Some(*at) } else { None }).unwrap();
    assert!(last_audio > notice_at + Duration::from_millis(500), "the swap happened while the reply was playing");
    // Around the swap the media timeline has no hole; over the whole reply there is one talkspurt.
    // (Holes elsewhere can only come from the session task being starved of CPU, which a loaded
    // 2-core CI machine does; they are printed, not asserted.)
    let window = (notice_at - Duration::from_millis(300), notice_at + Duration::from_millis(500));
    let (hole_at_swap, _) = media_holes(&log, from, Some(window));
    let (hole, spurts) = media_holes(&log, from, None);
    let gap = max_packet_gap(&log, from);
    eprintln!(
        "measured: recycle swap {} ms before the reply's end; media hole around the swap {} ms, over the reply {} ms; \
         {spurts} talkspurt(s); largest arrival gap {} ms",
        (last_audio - notice_at).as_millis(),
        hole_at_swap.as_millis(),
        hole.as_millis(),
        gap.as_millis()
    );
    assert!(hole_at_swap <= Duration::from_millis(40), "a {} ms hole at the swap", hole_at_swap.as_millis());
    assert_eq!(spurts, 1, "the reply played as one talkspurt (no underrun)");
    let heard = agent_ms_after(&client.log(), from);
    assert!((heard - 7490.0).abs() < 400.0, "the whole reply was heard: {heard:.0} ms");

    // Turn 2 goes to a newer session (with a 4 s limit, sessions keep being renewed), which knows
    // the conversation; the older ones are closed. Each turn was committed and answered once.
    ask_and_wait_reply(&mut client, 2).await;
    let conns = fake.conns();
    eprintln!(
        "measured: {} provider sessions for ~{} s of conversation",
        conns.len(),
        conns[0].opened_at.unwrap().elapsed().as_secs()
    );
    assert_eq!(conns[0].of_type("input_audio_buffer.commit").len(), 1);
    let commits: usize = conns.iter().map(|c| c.of_type("input_audio_buffer.commit").len()).sum();
    let creates: usize = conns.iter().map(|c| c.of_type("response.create").len()).sum();
    assert_eq!((commits, creates), (2, 2), "two turns, two replies, none lost or repeated");
    let (k, cn) =
        conns.iter().enumerate().skip(1).find(|(_, c)| !c.of_type("input_audio_buffer.commit").is_empty()).unwrap();
    assert!(conns[..k].iter().all(|c| c.closed), "the sessions before it were closed");
    let replayed: Vec<String> = cn
        .of_type("conversation.item.create")
        .iter()
        .map(|v| v["item"]["content"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(replayed, vec!["What is the weather like?".to_owned(), ta.clone()], "context carried");
    let first_commit = cn.received.iter().position(|v| v["type"] == "input_audio_buffer.commit").unwrap();
    let last_item = cn.received.iter().rposition(|v| v["type"] == "conversation.item.create").unwrap();
    assert!(last_item < first_commit, "the context arrived before the next turn");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_moves_the_session_to_the_next_provider_with_the_context() {
    let (ta, aa) = short_speech(1.5);
    let (tb, ab) = reply_speech();
    let script = vec![
        Reply::Speech { text: ta.clone(), audio: aa },
        Reply::DropAfter { text: tb, audio: ab, after: Duration::from_millis(500) },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    fake.refuse_from(1);
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
        c.resilience.backoff_base_ms = 50;
        c.characters = vec![kotodama::config::Character {
            id: "aiko".into(),
            name: "Aiko".into(),
            language: "en-US".into(),
            voice: "marin".into(),
            persona: "You are Aiko.".into(),
            greeting: None,
            providers: vec!["openai".into(), "scripted".into()],
            tools: Some(vec![]),
            ..Default::default()
        }];
        c.provider = None;
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(200)).await;
    ask_and_wait_reply(&mut client, 1).await;
    let failover = |evs: &[Value]| evs.iter().any(|e| e["type"] == "error" && e["code"] == "provider_failover");
    client.ask_until("failover", Duration::from_secs(20), failover).await;
    assert_eq!(fake.conns().len(), 1, "reconnects to openai were refused");
    assert_eq!(fake.conn(0).of_type("session.update")[0]["session"]["tools"], serde_json::json!([]), "tools = []");
    let histories = ts.recorder.histories();
    assert_eq!(histories.len(), 1, "the scripted provider was connected once");
    let h = &histories[0];
    use kotodama::providers::HistoryItem;
    assert_eq!(h[0], HistoryItem::User("What is the weather like?".into()));
    assert_eq!(h[1], HistoryItem::Agent(ta.clone()));
    assert!(matches!(&h[2], HistoryItem::User(_)));
    assert_eq!(h.len(), 4, "{h:?}");

    // The next turn is answered by the scripted provider.
    client.silence(Duration::from_millis(1500)).await;
    let n = count(&client.events(), |e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true);
    ask_and_wait_reply(&mut client, n + 1).await;
    assert_eq!(ts.recorder.turns().len(), 1, "the scripted provider heard the user's turn");
    let last = client
        .events()
        .into_iter()
        .rev()
        .find(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        .unwrap();
    assert!(last["text"].as_str().unwrap().starts_with("Hi! I am Aiko."), "{last}");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requested_reply_that_never_starts_times_out_and_the_agent_listens_again() {
    let ts = TestServer::start_with(|c| {
        c.scripted.response_delay_ms = 60_000;
        c.resilience.reply_timeout_ms = 1_000;
    })
    .await;
    let (_sid, _token, client) = connect(&ts).await;
    client.send_text(r#"{"type":"text","text":"Are you there?"}"#).await;
    let e = client
        .wait_event("reply_timeout", Duration::from_secs(10), |e| e["type"] == "error" && e["code"] == "reply_timeout")
        .await;
    assert!(e["message"].as_str().unwrap().contains("did not answer"), "{e}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let evs = client.events();
        let states = states(&evs);
        if states.ends_with(&["thinking", "listening"]) {
            break;
        }
        assert!(Instant::now() < deadline, "the agent did not return to listening: {states:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(ts.recorder.cancels(), 1, "the late reply was cancelled");
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_provider_session_is_replaced_and_the_conversation_goes_on() {
    let (ta, aa) = short_speech(1.0);
    let (tb, ab) = short_speech(1.5);
    let script = vec![Reply::Speech { text: ta.clone(), audio: aa }, Reply::Speech { text: tb.clone(), audio: ab }];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    fake.expire(0, Duration::from_secs(8));
    let (ts, mut client) = first_reply_with_fast_reconnect(&fake).await;
    client
        .silence_until("the expired session to be replaced", Duration::from_secs(15), |evs| {
            evs.iter().any(|e| e["type"] == "error" && e["code"] == "provider_reconnected")
        })
        .await;
    let evs = client.events();
    assert!(
        !evs.iter().any(|e| e["type"] == "error" && e["code"] == "session_expired"),
        "expiry is handled, not shown"
    );
    assert!(evs.iter().any(|e| e["type"] == "error" && e["code"] == "provider_reconnecting"));
    ask_and_wait_reply(&mut client, 2).await;
    let c1 = fake.conn(1);
    let replayed: Vec<String> = c1
        .of_type("conversation.item.create")
        .iter()
        .map(|v| v["item"]["content"][0]["text"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(replayed, vec!["What is the weather like?".to_owned(), ta], "context replayed");
    assert_eq!(c1.of_type("response.create").len(), 1, "only the new turn is answered");
    let last = client
        .events()
        .into_iter()
        .rev()
        .find(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true);
    assert_eq!(last.unwrap()["text"], tb.as_str());
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_declares_a_tool_mid_session_runs_the_models_call_and_the_result_is_spoken() {
    let fake = FakeOpenAi::start(FakeOptions::default(), weather_tool_script("The weather: ")).await;
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.openai.turn_detection = kotodama::providers::openai::protocol::TurnDetection::Local;
    })
    .await;
    let (_sid, _token, mut client) = connect(&ts).await;
    client.silence(Duration::from_millis(200)).await;

    // session.update mid-session: the model session gets instructions, voice and the client's tool.
    let update = serde_json::json!({"type": "session.update", "instructions": "Speak like a pirate.", "voice": "ash",
        "tools": [{"name": "get_weather", "description": "The weather in a city.",
                   "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]});
    client.send_text(&update.to_string()).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.conn(0).of_type("session.update").len() < 2 {
        assert!(Instant::now() < deadline, "the update reached the model");
        client.silence(Duration::from_millis(50)).await;
    }
    let patch = &fake.conn(0).of_type("session.update")[1]["session"];
    assert_eq!(patch["type"], "realtime");
    let instructions = patch["instructions"].as_str().unwrap();
    assert!(instructions.starts_with("You are Aiko") && instructions.ends_with("\n\nSpeak like a pirate."), "{patch}");
    assert_eq!(patch["audio"]["output"]["voice"], "ash", "before the first audio the voice may change");
    assert!(patch["audio"]["input"].is_null(), "a partial update: turn detection untouched: {patch}");
    let tools: Vec<&str> = patch["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(tools, ["get_time", "set_emotion", "get_weather"], "the character's tools stay");

    // The model calls the client's tool: the client gets tool.call and answers tool.output.
    client.send_text(r#"{"type":"text","text":"What is the weather in Tokyo?"}"#).await;
    let mut call = Value::Null;
    client
        .silence_until("tool.call", Duration::from_secs(10), |evs| evs.iter().any(|e| e["type"] == "tool.call"))
        .await;
    for e in client.events() {
        if e["type"] == "tool.call" {
            call = e;
        }
    }
    assert_eq!((call["name"].as_str(), call["arguments"].as_str()), (Some("get_weather"), Some(WEATHER_ARGS)));
    let call_id = call["call_id"].as_str().unwrap().to_owned();
    assert!(call_id.starts_with("call_"), "the model's own call id: {call_id}");
    let output = serde_json::json!({"type": "tool.output", "call_id": call_id, "output": "Sunny and 21 degrees."});
    client.send_text(&output.to_string()).await;
    client
        .silence_until("the reply carrying the tool's output", Duration::from_secs(20), |evs| {
            evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
                && back_to_listening(1)(evs)
        })
        .await;
    let c0 = fake.conn(0);
    let out = c0.of_type("conversation.item.create").into_iter().find(|v| v["item"]["type"] == "function_call_output");
    let out = out.expect("the client's output reached the model");
    assert_eq!(
        (out["item"]["call_id"].as_str(), out["item"]["output"].as_str()),
        (Some(call_id.as_str()), Some("Sunny and 21 degrees."))
    );
    let reply =
        client.events().into_iter().find(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true);
    assert_eq!(reply.unwrap()["text"], "The weather: Sunny and 21 degrees.");
    let heard = client.inbox.lock().unwrap().agent_pcm.clone();
    eprintln!("measured: the client heard peak RMS {:.0} over {} samples", peak_rms(&heard, 48_000), heard.len());
    assert!(peak_rms(&heard, 48_000) > 1000.0, "the reply was heard");

    // After the character spoke, its voice stays (OpenAI's rule); an unknown call id is an error.
    client.send_text(r#"{"type":"session.update","voice":"coral"}"#).await;
    client.send_text(r#"{"type":"tool.output","call_id":"call_nope","output":"x"}"#).await;
    client
        .silence_until("both errors", Duration::from_secs(10), |evs| {
            evs.iter().any(|e| e["type"] == "error" && e["code"] == "session_update_unsupported")
                && evs.iter().any(|e| e["type"] == "error" && e["code"] == "unknown_tool_call")
        })
        .await;
    assert_eq!(fake.conn(0).of_type("session.update").len(), 2, "nothing left to send for a refused voice");
    // Bad declarations are refused before they reach the model.
    client.send_text(r#"{"type":"session.update","tools":[{"name":"no spaces allowed"}]}"#).await;
    client
        .silence_until("bad_session_update", Duration::from_secs(10), |evs| {
            evs.iter().any(|e| e["type"] == "error" && e["code"] == "bad_session_update")
        })
        .await;
    ts.server.shutdown().await.unwrap();
}
