//! The cascade over OpenAI-compatible HTTP servers (fake servers speaking the real wire protocol
//! on loopback), driven through the real WebRTC client: streaming with speech starting at the
//! first sentence, structured output (and a malformed one), failover on errors and stalls, an
//! error event when every model fails, and barge-in cancelling the reply in flight.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_openai_http::*;
use common::*;
use kotodama::providers::RealtimeProvider;
use kotodama::providers::cascade::openai::{Endpoint, OpenAiChat, OpenAiSpeech, OpenAiStt, client};
use kotodama::providers::cascade::{CascadeConfig, CascadeProvider};
use serde_json::Value;

fn endpoint(fake: &Fake, timeout: Duration) -> Endpoint {
    let mut ep = Endpoint::new(&fake.url(), "test-model");
    ep.api_key = Some("sk-test-key".into());
    ep.timeout = timeout;
    ep
}

/// A cascade whose every stage is the list of `fakes`, in order, with an 800 ms deadline.
fn cascade(fakes: &[&Fake]) -> Arc<dyn RealtimeProvider> {
    cascade_with(fakes, Duration::from_millis(800))
}

fn cascade_with(fakes: &[&Fake], timeout: Duration) -> Arc<dyn RealtimeProvider> {
    let endpoint = |f: &Fake| endpoint(f, timeout);
    let c = client();
    let cfg = CascadeConfig {
        name: "cascade".into(),
        stt: fakes.iter().map(|f| Arc::new(OpenAiStt::new(endpoint(f), c.clone(), None)) as _).collect(),
        llm: fakes.iter().map(|f| Arc::new(OpenAiChat::new(endpoint(f), c.clone())) as _).collect(),
        tts: fakes.iter().map(|f| Arc::new(OpenAiSpeech::new(endpoint(f), c.clone())) as _).collect(),
        token_budget: 2000,
        max_reply_tokens: 200,
    };
    Arc::new(CascadeProvider::new(cfg).unwrap())
}

async fn server(provider: Arc<dyn RealtimeProvider>) -> TestServer {
    TestServer::start_with_providers(|c| c.provider = Some("cascade".into()), move |_| vec![provider]).await
}

async fn connected(ts: &TestServer) -> TestClient {
    let (_id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(ts, &offer_url, &token).await;
    client
        .wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening")
        .await;
    client
}

fn finals(evs: &[Value], role: &str) -> Vec<String> {
    evs.iter()
        .filter(|e| e["type"] == "transcript" && e["role"] == role && e["final"] == true)
        .map(|e| e["text"].as_str().unwrap().to_owned())
        .collect()
}

fn first_audio_after(log: &[Received], t: Instant) -> Option<Instant> {
    log.iter().find_map(|r| match r {
        Received::Audio { at, rms, .. } if *at > t && *rms > 500.0 => Some(*at),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speech_starts_at_the_first_sentence_and_structured_output_is_read() {
    let mut script = vec![(Duration::from_millis(20), r#"{"emotion": "happy", "text": "The sun is"#.to_owned())];
    script.push((Duration::from_millis(20), " out today. ".into()));
    // The model "thinks" 1.5 s before its second sentence: the first must already be playing.
    script.push((Duration::from_millis(1500), "It will rain later.".into()));
    script.push((Duration::from_millis(20), r#"", "gesture": "nod"}"#.into()));
    let fake = start_fake(FakeBehavior { llm_script: script, ..Default::default() }).await;
    let ts = server(cascade_with(&[&fake], Duration::from_secs(3))).await;
    let mut client = connected(&ts).await;

    let (_, question) = wav("user_question.wav");
    client.silence(Duration::from_millis(200)).await;
    client.speak(&question).await;
    client.silence_until("the reply to be spoken", Duration::from_secs(30), back_to_listening(1)).await;
    let evs = client.events();
    let log = fake.log();

    // STT got the turn as a WAV of about the speech's length; its text is the user transcript.
    assert_eq!(log.stt.len(), 1, "one transcription request");
    let question_secs = question.len() as f64 / 48_000.0;
    let wav_secs = log.stt[0].1 as f64 / 32_000.0; // 16 kHz s16 (multipart overhead is tiny)
    assert!(wav_secs > question_secs * 0.8, "STT got {wav_secs:.2} s of audio for {question_secs:.2} s of speech");
    assert_eq!(finals(&evs, "user"), ["tell me about the weather"]);
    assert!(log.auth.iter().all(|a| a == "Bearer sk-test-key") && !log.auth.is_empty(), "keys sent as Bearer");

    // The LLM request carried the persona, the format and the user's words, streaming.
    let req = &log.llm[0].1;
    assert_eq!(req["stream"], true);
    assert_eq!(req["messages"][0]["role"], "system");
    assert!(req["messages"][0]["content"].as_str().unwrap().contains("Aiko"));
    assert_eq!(req["messages"].as_array().unwrap().last().unwrap()["content"], "tell me about the weather");

    // TTS started on the first sentence long before the model finished, and so did the audio.
    let tts: Vec<&str> = log.tts.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(tts, ["The sun is out today.", "It will rain later."]);
    let llm_done = log.llm_done[0];
    assert!(log.tts[0].0 + Duration::from_millis(1000) < llm_done, "first sentence sent to TTS before the model ended");
    let first_audio = first_audio_after(&client.log(), log.llm[0].0).expect("agent audio");
    assert!(first_audio < llm_done, "the client heard the first sentence while the model was still writing");

    // Structured output: emotion event, the text only (no JSON) in the transcript, all of it heard.
    assert!(evs.iter().any(|e| e["type"] == "emotion" && e["emotion"] == "happy"));
    assert!(
        evs.iter().any(|e| e["type"] == "gesture" && e["gesture"] == "nod"),
        "the model's gesture reaches the client as an event"
    );
    assert_eq!(finals(&evs, "agent"), ["The sun is out today. It will rain later."]);
    let pcm = client.inbox.lock().unwrap().agent_pcm.clone();
    let expected = (21 + 19) as f64 * 0.050;
    let (a, b) = speech_span(&pcm, 48_000, 1000.0).expect("tone heard");
    let heard = (b - a).as_secs_f64();
    assert!(
        (heard - expected).abs() < 0.6,
        "heard {heard:.2} s of the {expected:.2} s reply (with the gap between sentences)"
    );

    // A malformed structured reply still reaches the user, words intact.
    fake.set(|b| {
        b.llm_script = vec![(Duration::ZERO, r#"{"emotion": "sad", "reply": "I could not format this."#.into())];
    });
    client.send_text(r#"{"type":"text","text":"say something broken"}"#).await;
    client.silence_until("the malformed reply", Duration::from_secs(15), |evs| finals(evs, "agent").len() >= 2).await;
    let agent = finals(&client.events(), "agent");
    assert!(agent[1].contains("I could not format this."), "malformed output spoken: {agent:?}");
    assert!(!agent[1].contains('{'), "no JSON punctuation spoken: {agent:?}");
    client.close().await;
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_and_stalled_servers_fail_over_and_total_failure_is_an_error_event() {
    let good_script = json_deltas("neutral", "Backup speaking. All good.", 6, Duration::from_millis(5));
    let bad = start_fake(FakeBehavior {
        stt_status: Some(500),
        llm_stall: true,
        tts_status: Some(503),
        ..Default::default()
    })
    .await;
    let good = start_fake(FakeBehavior { llm_script: good_script, ..Default::default() }).await;
    let ts = server(cascade(&[&bad, &good])).await;
    let mut client = connected(&ts).await;

    let (_, question) = wav("user_question.wav");
    client.speak(&question).await;
    client.silence_until("the backup reply", Duration::from_secs(30), back_to_listening(1)).await;
    let evs = client.events();
    let (b, g) = (bad.log(), good.log());
    assert_eq!(g.stt.len(), 1, "the second STT transcribed after the first answered 500");
    assert_eq!(b.llm.len(), 1, "the stalled model was tried");
    assert_eq!(g.llm.len(), 1, "the second model answered after the first timed out");
    assert!(!b.tts.is_empty() && g.tts.len() == 2, "TTS failed over: bad {:?}, good {:?}", b.tts, g.tts);
    assert_eq!(finals(&evs, "user"), ["tell me about the weather"]);
    assert_eq!(finals(&evs, "agent"), ["Backup speaking. All good."]);
    assert!(!evs.iter().any(|e| e["type"] == "error"), "a successful failover is not an error: {evs:#?}");
    assert!(peak_rms(&client.inbox.lock().unwrap().agent_pcm, 48_000) > 1000.0, "the reply was heard");

    // Every model failing: an error event naming the stage, and the agent listens again.
    good.set(|b| b.llm_status = Some(500));
    bad.set(|b| {
        b.llm_stall = false;
        b.llm_status = Some(502);
    });
    client.send_text(r#"{"type":"text","text":"are you there"}"#).await;
    let err = client.wait_event("an llm error", Duration::from_secs(10), |e| e["type"] == "error").await;
    assert_eq!(err["code"], "llm_unavailable", "{err}");
    client.silence_until("listening again", Duration::from_secs(10), back_to_listening(1)).await;
    client.close().await;
    ts.server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barge_in_cancels_the_reply_in_flight_and_nothing_of_it_follows_the_cut() {
    let long = "This is a long answer that goes on. ".repeat(8);
    let fake = start_fake(FakeBehavior {
        llm_script: json_deltas("neutral", long.trim(), 8, Duration::from_millis(5)),
        tts_chunk_delay: Duration::from_millis(60),
        ..Default::default()
    })
    .await;
    let ts = server(cascade(&[&fake])).await;
    let mut client = connected(&ts).await;
    let speaking = |evs: &[Value]| evs.iter().any(|e| e["type"] == "state" && e["state"] == "speaking");
    client.ask_until("the reply to start", Duration::from_secs(20), speaking).await;
    client.silence(Duration::from_millis(1200)).await;
    let from = client.log().len();
    client.speak(&wav("user_question.wav").1).await;
    let (_, log, t_int, t_stop) = client.barge_in_window(from, "the barge-in turn to end", 2).await;
    let late = log.iter().filter(|r| matches!(r, Received::Audio { at, .. } if *at > t_int && *at < t_stop)).count();
    assert!(late <= 2, "{late} agent packets after agent.interrupted");
    let f = fake.log();
    let started_after_cut =
        f.tts.iter().filter(|(at, _)| *at > t_int + Duration::from_millis(200) && *at < t_stop).count();
    assert_eq!(started_after_cut, 0, "no sentence of the cut reply is synthesised after the cut");
    assert!(f.tts.len() < 8, "the reply's later sentences were never requested: {}", f.tts.len());
    assert!(f.tts_cancelled >= 1, "the speech stream in flight was dropped (cancelled {})", f.tts_cancelled);

    // The barge-in turn's request holds only what the user heard of the cut reply.
    let played_ms = log[from..]
        .iter()
        .find_map(|r| match r {
            Received::Event { event, .. } if event["type"] == "agent.interrupted" => event["played_ms"].as_u64(),
            _ => None,
        })
        .unwrap();
    client.silence_until("the next model request", Duration::from_secs(10), |_| fake.log().llm.len() >= 2).await;
    let req = fake.log().llm[1].1.clone();
    let msgs = req["messages"].as_array().unwrap();
    let cut = msgs.iter().rev().find(|m| m["role"] == "assistant").expect("the cut reply is in the context");
    let cut = cut["content"].as_str().unwrap();
    assert!(cut.ends_with("(interrupted)"), "marked as interrupted: {cut}");
    // The context keeps the words the session released with the frames played (its one account of
    // what was heard): a prefix of the reply, as long as `played_ms` of it. Each sentence is 8 words
    // in 35 characters = 1.75 s of the fake TTS.
    let heard = cut.trim_end_matches("(interrupted)").trim();
    assert!(long.starts_with(heard), "what was heard is the start of the reply: {cut}");
    let words = heard.split_whitespace().count() as f64;
    let expected = played_ms as f64 * 8.0 / 1750.0;
    assert!(
        words >= 1.0 && (words - expected).abs() <= 2.5,
        "context keeps the {expected:.1} words played in {played_ms} ms, not {words}: {cut}"
    );
    client.close().await;
    ts.server.shutdown().await.unwrap();
}
