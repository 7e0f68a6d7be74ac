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
//! no request beyond the two local origins; kotodama's visemes arrive as `kotodama.viseme`. And
//! the SDK's own `tool()`: declared in its mid-session `session.update`, called by the model (the
//! fake), run in the page, its output sent back; the reply the model then speaks carries it (SDK
//! history and audio heard). Needs `chromium` and tests/browser's npm packages (`./test.sh`
//! installs both).

mod common;

use common::fake_openai::{FakeOpenAi, FakeOptions, Reply, WEATHER_ARGS, reply_speech, weather_tool_script};
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

/// An `ek_` client secret for one call (the open API on loopback).
async fn mint(ts: &TestServer) -> String {
    let body = json!({"expires_after": {"anchor": "created_at", "seconds": 600},
                      "session": {"type": "realtime", "instructions": "Mention the weather."}});
    let minted = ts.http.post(format!("{}/v1/realtime/client_secrets", ts.base)).json(&body).send().await.unwrap();
    assert_eq!(minted.status(), 200, "open on loopback without keys");
    let secret: Value = minted.json().await.unwrap();
    secret["value"].as_str().expect("a client secret").to_owned()
}

/// Run oai.mjs in `mode` (`talk` or `tool`) with the test question as the fake microphone.
async fn run_page(page_base: &str, ts: &TestServer, ek: String, mode: &str) -> Value {
    let (_, question) = wav("user_question.wav");
    let mut mic = vec![0i16; 24_000];
    mic.extend_from_slice(&question);
    mic.extend(std::iter::repeat_n(0i16, 48_000 * 25));
    let mic_path = common::browser::out_dir().join(format!("mic-oai-{mode}.wav"));
    std::fs::write(&mic_path, media::wav::to_bytes(media::PcmRef::new(48_000, &mic))).unwrap();
    let args =
        vec![format!("{page_base}/"), ts.base.clone(), ek, mic_path.display().to_string(), "45000".into(), mode.into()];
    common::browser::run_node("oai.mjs", args).await
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

    let ek = mint(&ts).await;
    let page_base = serve_page().await;
    let out_dir = common::browser::out_dir();
    let run = run_page(&page_base, &ts, ek, "talk").await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_tool_is_called_by_the_model_and_its_result_spoken_in_chromium() {
    // The model answers the spoken question with a call of the page's `get_weather`, then speaks
    // what the tool returned (the fake composes that reply from the `function_call_output` it got).
    let fake = FakeOpenAi::start(FakeOptions::default(), weather_tool_script("Here is the weather. ")).await;
    let ts = TestServer::start_openai(&fake.url(), |_| {}).await;
    let ek = mint(&ts).await;
    let page_base = serve_page().await;
    let run = run_page(&page_base, &ts, ek, "tool").await;
    std::fs::write(common::browser::out_dir().join("oai-tool-run.json"), run.to_string()).unwrap();
    assert_eq!(
        run["ok"], true,
        "the tool turn finished: {}\nconsole: {}\npartial: {}",
        run["error"], run["console"], run["partial"]
    );
    let page = &run["first"];
    assert_eq!(page["errors"], json!([]), "the SDK reported no error");

    // The SDK declared its tool mid-session and the model session was given it.
    let upstream = fake.conn(0);
    let updates = upstream.of_type("session.update");
    let declared = updates.iter().skip(1).find_map(|u| u["session"]["tools"].as_array().cloned()).unwrap_or_default();
    let weather = declared.iter().find(|t| t["name"] == "get_weather").expect("get_weather offered to the model");
    assert_eq!(weather["type"], "function");
    assert_eq!(weather["parameters"]["required"], json!(["city"]), "the SDK's schema as declared");
    assert!(declared.iter().any(|t| t["name"] == "set_emotion"), "the character's own tools stay: {declared:?}");

    // The page's tool ran once with the model's arguments; the SDK saw the GA function_call item.
    let calls = page["toolCalls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(calls[0]["input"]["city"], "Tokyo");
    let done = events_of(page, "response.output_item.done");
    let fc =
        done.iter().map(|e| &e["ev"]["item"]).find(|i| i["type"] == "function_call").expect("a function_call item");
    assert_eq!((fc["name"].as_str(), fc["arguments"].as_str()), (Some("get_weather"), Some(WEATHER_ARGS)));
    let call_id = fc["call_id"].as_str().unwrap();

    // Its output went back to the model under the model's call id, then the model continued.
    let outputs: Vec<Value> = upstream
        .of_type("conversation.item.create")
        .into_iter()
        .filter(|v| v["item"]["type"] == "function_call_output")
        .collect();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    assert_eq!(outputs[0]["item"]["call_id"], call_id, "the call id the model issued (the fake's)");
    let tool_said = "It is sunny and 21 degrees in Tokyo.";
    assert_eq!(outputs[0]["item"]["output"], tool_said);
    let after = upstream.received.iter().position(|v| v["item"]["type"] == "function_call_output").unwrap();
    assert!(upstream.received[after..].iter().any(|v| v["type"] == "response.create"), "the model was asked to go on");

    // The spoken reply carries the tool's output: in the SDK's history and heard in the page.
    let history = page["history"].as_array().unwrap();
    let reply =
        history.iter().find(|i| i["role"] == "assistant" && i["status"] == "completed").expect("an assistant reply");
    let transcript = reply["content"][0]["transcript"].as_str().unwrap();
    assert_eq!(transcript, format!("Here is the weather. {tool_said}"));
    let item = history.iter().find(|i| i["type"] == "function_call").expect("the tool call in the history");
    assert_eq!(item["output"], tool_said);
    let t_call = calls[0]["t"].as_f64().unwrap();
    let levels = page["levels"].as_array().unwrap();
    let loud =
        levels.iter().filter(|l| l["t"].as_f64().unwrap() > t_call && l["level"].as_f64().unwrap() > 0.02).count();
    let heard = levels.last().map_or(0.0, |l| l["duration"].as_f64().unwrap());
    eprintln!("measured: {loud} loud stats samples after the tool ran, {heard:.1} s of audio received");
    assert!(loud > 10, "the reply after the tool was heard: {loud} loud samples");
}
