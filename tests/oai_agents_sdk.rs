//! The unchanged OpenAI Agents SDK (`@openai/agents-realtime@0.20.0`, its UMD bundle from npm)
//! in Debian's headless Chromium talks with a kotodama character: a page of another origin
//! (served here, so CORS is exercised) mints nothing itself; the test mints an `ek_` client
//! secret, the page calls `RealtimeSession.connect({apiKey: ek})` with the SDK's WebRTC
//! transport pointed at `/v1/realtime/calls`. Upstream is the fake OpenAI Realtime server (real
//! wire protocol), which transcribes the user and answers with eSpeak speech.
//!
//! Checked: the SDK's own history holds the user's transcript and the agent's; the agent was
//! heard (inbound RTP audio energy in the page); `interrupt()` cuts the agent, and the
//! truncation (`audio_end_ms`, the item's heard transcript) matches what played; the page made
//! no request beyond the two local origins; kotodama's visemes arrive as `kotodama.viseme`. Needs `chromium` and tests/browser's npm packages
//! (`./test.sh` installs both).

mod common;

use common::fake_openai::{FakeOpenAi, FakeOptions, Reply, reply_speech};
use common::*;
use serde_json::{Value, json};

/// Serve oai.html and the SDK's UMD bundle on a loopback port of its own (another origin).
async fn serve_page() -> String {
    let root = common::browser::browser_dir();
    let bundle = root.join("node_modules/@openai/agents-realtime/dist/bundle/openai-realtime-agents.umd.js");
    assert!(bundle.exists(), "{} is missing: run ./test.sh (or `npm ci --prefix tests/browser`)", bundle.display());
    let html = std::fs::read_to_string(root.join("oai.html")).unwrap();
    let js = std::fs::read(bundle).unwrap();
    let app =
        axum::Router::new().route("/", axum::routing::get(move || async move { axum::response::Html(html) })).route(
            "/openai-realtime-agents.umd.js",
            axum::routing::get(move || async move { ([("content-type", "text/javascript")], js) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn events_of<'a>(page: &'a Value, kind: &str) -> Vec<&'a Value> {
    page["events"].as_array().unwrap().iter().filter(|e| e["ev"]["type"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agents_sdk_talks_with_a_character_and_interrupts_it_in_chromium() {
    let (reply_text, reply_audio) = reply_speech();
    let script = vec![
        Reply::Speech { text: reply_text.clone(), audio: reply_audio.clone() },
        Reply::Speech { text: reply_text.clone(), audio: reply_audio },
    ];
    let fake = FakeOpenAi::start(FakeOptions::default(), script).await;
    let ts = TestServer::start_openai(&fake.url(), |_| {}).await;

    let body = json!({"expires_after": {"anchor": "created_at", "seconds": 600},
                      "session": {"type": "realtime", "instructions": "Mention the weather."}});
    let minted = ts.http.post(format!("{}/v1/realtime/client_secrets", ts.base)).json(&body).send().await.unwrap();
    assert_eq!(minted.status(), 200, "open on loopback without keys");
    let secret: Value = minted.json().await.unwrap();
    let ek = secret["value"].as_str().expect("a client secret").to_owned();

    let page_base = serve_page().await;
    let (_, question) = wav("user_question.wav");
    let mut mic = vec![0i16; 24_000];
    mic.extend_from_slice(&question);
    mic.extend(std::iter::repeat_n(0i16, 48_000 * 25));
    let out_dir = common::browser::out_dir();
    let mic_path = out_dir.join("mic-oai.wav");
    std::fs::write(&mic_path, media::wav::to_bytes(media::PcmRef::new(48_000, &mic))).unwrap();
    let args = vec![format!("{page_base}/"), ts.base.clone(), ek, mic_path.display().to_string(), "45000".into()];
    let run = common::browser::run_node("oai.mjs", args).await;
    std::fs::write(out_dir.join("oai-run.json"), run.to_string()).unwrap();
    assert_eq!(
        run["ok"], true,
        "the SDK finished both turns: {}\nconsole: {}\npartial: {}",
        run["error"], run["console"], run["partial"]
    );

    // Nothing was loaded from the internet.
    for url in run["requests"].as_array().unwrap() {
        let url = url.as_str().unwrap();
        assert!(url.starts_with(&page_base) || url.starts_with(&ts.base), "the page requested {url}");
    }
    let first = &run["first"];
    assert_eq!(first["errors"], json!([]), "the SDK reported no error");

    // The SDK's history: the user's spoken question with its transcript, the agent's answer.
    let history = first["history"].as_array().unwrap();
    let user = history.iter().find(|i| i["role"] == "user").expect("a user item");
    assert_eq!(user["content"][0]["type"], "input_audio");
    assert_eq!(user["content"][0]["transcript"], "What is the weather like?");
    let agent = history.iter().find(|i| i["role"] == "assistant").expect("an assistant item");
    assert_eq!(agent["status"], "completed");
    assert_eq!(agent["content"][0]["type"], "output_audio");
    assert_eq!(agent["content"][0]["transcript"], reply_text.as_str(), "the whole reply was heard");
    for kind in [
        "session.created",
        "session.updated",
        "input_audio_buffer.committed",
        "response.created",
        "output_audio_buffer.started",
        "response.done",
        "output_audio_buffer.stopped",
    ] {
        assert!(!events_of(first, kind).is_empty(), "the SDK accepted `{kind}`");
    }
    // The client's instructions reached the character's persona.
    let created = events_of(first, "session.created")[0];
    assert!(created["ev"]["session"]["instructions"].as_str().unwrap().contains("Mention the weather."), "{created}");

    // kotodama's visemes reach the page through the SDK's generic events, named by the agent item.
    let visemes = events_of(first, "kotodama.viseme");
    assert!(visemes.len() > 20, "visemes for an avatar: {}", visemes.len());
    assert!(visemes.iter().all(|v| v["ev"]["item_id"] == agent["itemId"]), "the visemes belong to the reply");

    // Heard: the received audio's energy over the first reply (~7 s of speech).
    let levels = first["levels"].as_array().unwrap();
    let loud = levels.iter().filter(|l| l["level"].as_f64().unwrap() > 0.02).count();
    let played = levels.last().map_or(0.0, |l| l["duration"].as_f64().unwrap());
    eprintln!("measured: {loud} of {} stats samples above 0.02, {played:.1} s of audio received", levels.len());
    assert!(loud > 30, "the agent's voice was heard: {loud} loud samples of {}", levels.len());

    // The interrupted reply: cleared, truncated where the page had heard it.
    let second = &run["second"];
    let n = first["events"].as_array().unwrap().len();
    let later: Vec<&Value> = second["events"].as_array().unwrap()[n..].iter().collect();
    let find = |kind: &str| later.iter().find(|e| e["ev"]["type"] == kind).copied();
    let started = find("output_audio_buffer.started").expect("the typed message was answered");
    let truncated = find("conversation.item.truncated").expect("interrupt() truncated the reply");
    assert!(find("output_audio_buffer.cleared").is_some(), "the output buffer was cleared");
    let audio_end = truncated["ev"]["audio_end_ms"].as_f64().unwrap();
    let heard = run["interruptAt"].as_f64().unwrap() - started["t"].as_f64().unwrap();
    eprintln!("measured: truncated at {audio_end:.0} ms, the page had heard {heard:.0} ms when it interrupted");
    assert!((audio_end - heard).abs() < 500.0, "truncation {audio_end} ms matches what played ({heard:.0} ms)");
    let item_id = truncated["ev"]["item_id"].as_str().unwrap();
    let cut = second["history"].as_array().unwrap().iter().find(|i| i["itemId"] == item_id).unwrap();
    assert_eq!(cut["status"], "incomplete");
    let cut_text = cut["content"][0]["transcript"].as_str().unwrap();
    assert!(
        !cut_text.is_empty() && cut_text.len() < reply_text.len() && reply_text.starts_with(cut_text.trim_end()),
        "the cut item holds the words heard: {cut_text:?}"
    );
    assert!(find("output_audio_buffer.stopped").is_none(), "a cleared buffer is not also reported stopped");

    // The call is a kotodama session: hang it up.
    let call_id = run["callId"].as_str().expect("the SDK read the call id from Location");
    let res = ts.http.post(format!("{}/v1/realtime/calls/{call_id}/hangup", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 200);
}
