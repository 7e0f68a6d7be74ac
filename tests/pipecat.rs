//! Pipecat's client against kotodama (issue 16, item 2): the signalling routes of
//! `small-webrtc-transport` (`POST`/`PATCH /api/offer`, and per session
//! `/v1/sessions/{id}/api/offer`) and, in Debian's Chromium, the unchanged
//! `@pipecat-ai/client-js` 1.13 + `@pipecat-ai/small-webrtc-transport` 1.10 from
//! tests/browser/node_modules (bundled by esbuild into a page served on the server's origin,
//! `tests/browser/pipecat.mjs`): `connect()` resolves on `bot-ready`, the spoken question and a
//! `sendText()` each get a `bot-output` and audio the page hears, the typed text comes back as
//! `user-transcription`, a client request gets its `server-response`.
//!
//! The browser test needs `chromium` and the npm packages of tests/browser (./test.sh installs
//! both).

mod common;

use common::*;
use std::time::Duration;

use serde_json::{Value, json};

fn pipecat_offer() -> String {
    let path = format!("{}/tests/data/offers/pipecat_small_webrtc.sdp", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// (m kind, port, mid) of each m-section of `sdp`.
fn m_lines(sdp: &str) -> Vec<(String, u16, String)> {
    let mut out: Vec<(String, u16, String)> = Vec::new();
    for line in sdp.lines() {
        if let Some(m) = line.strip_prefix("m=") {
            let mut f = m.split_whitespace();
            let kind = f.next().unwrap_or_default().to_owned();
            out.push((kind, f.next().and_then(|p| p.parse().ok()).unwrap_or(0), String::new()));
        } else if let (Some(mid), Some(last)) = (line.trim().strip_prefix("a=mid:"), out.last_mut()) {
            last.2 = mid.to_owned();
        }
    }
    out
}

async fn post(ts: &TestServer, path: &str, body: Value, token: Option<&str>) -> (u16, Value) {
    let mut req = ts.http.post(format!("{}{path}", ts.base)).json(&body);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

async fn patch(ts: &TestServer, path: &str, body: Value) -> (u16, Value) {
    let res = ts.http.patch(format!("{}{path}", ts.base)).json(&body).send().await.unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_offer_answers_pipecats_three_m_lines_as_json_and_takes_json_trickle() {
    let ts = TestServer::start().await;
    let offer = json!({"sdp": pipecat_offer(), "type": "offer", "pc_id": null, "restart_pc": false,
                       "requestData": {"character": "aiko"}});
    let (status, answer) = post(&ts, "/api/offer", offer.clone(), None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["type"], "answer");
    let pc_id = answer["pc_id"].as_str().unwrap().to_owned();
    let session = pc_id.split('.').next().unwrap().to_owned();
    assert!(session.starts_with("sess_"), "pc_id names the session: {pc_id}");
    let lines = m_lines(answer["sdp"].as_str().unwrap());
    let summary: Vec<(&str, bool, &str)> = lines.iter().map(|(k, p, m)| (k.as_str(), *p != 0, m.as_str())).collect();
    assert_eq!(summary[0], ("audio", true, "0"), "the voice on the first audio transceiver: {summary:?}");
    assert_eq!((summary[1].0, summary[1].1), ("video", false), "camera line rejected: {summary:?}");
    assert_eq!((summary[2].0, summary[2].1), ("video", false), "screen line rejected: {summary:?}");
    assert_eq!(summary[3], ("application", true, "3"), "data channel accepted: {summary:?}");

    // Trickle as the transport sends it, every 200 ms after the answer.
    let candidate = "candidate:1467250027 1 udp 2122260223 127.0.0.1 46243 typ host generation 0";
    let trickle = json!({"pc_id": pc_id, "candidates": [
        {"candidate": candidate, "sdp_mid": "0", "sdp_mline_index": 0},
        {"candidate": "", "sdp_mid": "0", "sdp_mline_index": 0}]});
    let (status, body) = patch(&ts, "/api/offer", trickle).await;
    assert_eq!((status, &body["status"]), (200, &json!("success")), "{body}");
    let (status, body) = patch(&ts, "/api/offer", json!({"pc_id": "sess_x.peer_y.e_z", "candidates": []})).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("unknown_pc_id")), "{body}");
    let many: Vec<Value> = (0..65).map(|_| json!({"candidate": candidate, "sdp_mid": "0"})).collect();
    let (status, body) = patch(&ts, "/api/offer", json!({"pc_id": pc_id, "candidates": many})).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("too_many_candidates")), "{body}");

    // The reconnect of the transport: a new peer connection replaces the old one.
    let mut again = offer;
    again["pc_id"] = json!(pc_id);
    again["restart_pc"] = json!(true);
    let (status, second) = post(&ts, "/api/offer", again, None).await;
    assert_eq!(status, 200, "{second}");
    assert_ne!(second["pc_id"], answer["pc_id"], "a new peer connection");
    let (status, body) = patch(&ts, "/api/offer", json!({"pc_id": pc_id, "candidates": []})).await;
    assert_eq!(status, 404, "the replaced session's peer is gone: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_offer_refuses_bad_requests_with_named_problems() {
    let ts = TestServer::start().await;
    let res = ts.http.post(format!("{}/api/offer", ts.base)).body("v=0").send().await.unwrap();
    assert_eq!(res.status(), 415, "JSON only");
    let res = ts
        .http
        .post(format!("{}/api/offer", ts.base))
        .header("Content-Type", "application/json")
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.json::<Value>().await.unwrap()["code"], "bad_json");
    let (status, body) = post(&ts, "/api/offer", json!({"sdp": pipecat_offer(), "type": "answer"}), None).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("not_an_offer")), "{body}");
    let pcmu = pipecat_offer().replace("a=rtpmap:111 opus/48000/2", "a=rtpmap:111 G726-32/8000");
    let (status, body) = post(&ts, "/api/offer", json!({"sdp": pcmu, "type": "offer"}), None).await;
    assert_eq!((status, body["code"].as_str()), (422, Some("no_opus")), "{body}");
    let (status, body) = post(
        &ts,
        "/api/offer",
        json!({"sdp": pipecat_offer(), "type": "offer", "requestData": {"character": "nobody"}}),
        None,
    )
    .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("unknown_character")), "{body}");
    let res = ts.http.get(format!("{}/api/offer", ts.base)).send().await.unwrap();
    assert_eq!(res.status(), 405);
    // A page on another origin (a dev server) may call the route.
    let res = ts
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/api/offer", ts.base))
        .header("Origin", "http://localhost:5173")
        .header("Access-Control-Request-Method", "POST")
        .header("Access-Control-Request-Headers", "authorization,content-type")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 204);
    let h = |k: &str| res.headers().get(k).and_then(|v| v.to_str().ok()).unwrap_or_default().to_ascii_lowercase();
    assert_eq!(h("access-control-allow-origin"), "*");
    assert!(h("access-control-allow-headers").contains("authorization"), "Authorization named");
    assert!(h("access-control-allow-methods").contains("patch"));
    let huge = "x".repeat(kotodama::pipecat::MAX_OFFER_REQUEST_BYTES);
    let (status, _) = post(&ts, "/api/offer", json!({"sdp": huge, "type": "offer"}), None).await;
    assert_eq!(status, 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_offer_counts_against_the_session_creation_limit() {
    let ts = TestServer::start_with(|c| c.session.create_per_minute_per_ip = 1).await;
    let offer = json!({"sdp": pipecat_offer(), "type": "offer"});
    let (status, body) = post(&ts, "/api/offer", offer.clone(), None).await;
    assert_eq!(status, 200, "{body}");
    let res = ts.http.post(format!("{}/api/offer", ts.base)).json(&offer).send().await.unwrap();
    assert_eq!(res.status(), 429, "the second session within a minute from this IP");
    assert!(res.headers().get("retry-after").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_session_route_takes_the_session_token_once() {
    let ts = TestServer::start().await;
    let (id, token, _) = ts.create_session().await;
    let path = format!("/v1/sessions/{id}/api/offer");
    let offer = json!({"sdp": pipecat_offer(), "type": "offer", "pc_id": null, "restart_pc": false});
    let (status, body) = post(&ts, &path, offer.clone(), None).await;
    assert_eq!((status, body["code"].as_str()), (401, Some("token_missing")), "{body}");
    let (other, other_token, _) = ts.create_session().await;
    let (status, _) = post(&ts, &path, offer.clone(), Some(&other_token)).await;
    assert_eq!(status, 401, "another session's token");
    let (status, answer) = post(&ts, &path, offer.clone(), Some(&token)).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["pc_id"].as_str().unwrap().starts_with(&format!("{id}.")));
    assert_eq!(ts.session_json(&id, &token).await["state"], "connecting");
    let (status, body) = post(&ts, &path, offer, Some(&token)).await;
    assert_eq!(status, 409, "one peer per session: {body}");
    let candidate = "candidate:1 1 udp 2122260223 127.0.0.1 40000 typ host";
    let trickle = json!({"pc_id": answer["pc_id"], "candidates": [{"candidate": candidate, "sdp_mid": "0"}]});
    let res = ts
        .http
        .patch(format!("{}/v1/sessions/{other}/api/offer", ts.base))
        .bearer_auth(&other_token)
        .json(&trickle)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "a pc_id of another session");
    let res = ts.http.patch(format!("{}{path}", ts.base)).bearer_auth(&token).json(&trickle).send().await.unwrap();
    assert_eq!(res.status(), 200);
}

/// The microphone file: half a second of silence, `speech`, then silence long enough for the
/// whole test (Chromium loops the file).
fn mic(speech: &[i16]) -> Vec<i16> {
    let mut m = vec![0i16; 24_000];
    m.extend_from_slice(speech);
    m.extend(std::iter::repeat_n(0i16, 48_000 * 40));
    m
}

/// Whether the page heard the bot between `from` and `to` (page ms): RMS above silence for at
/// least `min_ms`.
fn heard(levels: &[Value], from: f64, to: f64, min_ms: f64) -> f64 {
    let loud = levels
        .iter()
        .filter(|l| l["t"].as_f64().is_some_and(|t| t >= from && t <= to))
        .filter(|l| l["rms"].as_f64().unwrap_or(0.0) > 0.01)
        .count();
    let ms = loud as f64 * 20.0;
    assert!(ms >= min_ms, "voice heard for {ms} ms between {from:.0} and {to:.0} ms (want >= {min_ms})");
    ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unchanged_pipecat_client_talks_in_chromium() {
    let (rate, question) = wav("user_question.wav");
    assert_eq!(rate, 48_000);
    let ts = TestServer::start().await;
    let page =
        common::browser::run_runner("pipecat.mjs", &ts.base, &mic(&question), "pipecat", "pipecat.png", &["45000"])
            .await;
    let events = page["events"].as_array().cloned().unwrap_or_default();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
    assert_eq!(
        page["ok"], true,
        "the page finished: {}\nevents: {kinds:?}\nconsole: {}",
        page["error"], page["console"]
    );
    assert_eq!(page["external"], json!([]), "nothing fetched from outside loopback");

    let first = |kind: &str| events.iter().find(|e| e["type"] == kind);
    let at = |e: &Value| e["t"].as_f64().unwrap();
    let ready = first("bot-ready").expect("bot-ready");
    assert!(ready["data"]["version"].as_str().unwrap().starts_with("2."), "{ready}");
    assert_eq!(page["connected"]["version"], ready["data"]["version"], "connect() resolved with bot-ready");
    assert!(!kinds.contains(&"error"), "no error event (the ping strings and signalling are ignored): {kinds:?}");

    // The spoken question: the user's speech edges, then a spoken reply the page heard.
    assert!(kinds.contains(&"user-started-speaking") && kinds.contains(&"user-stopped-speaking"), "{kinds:?}");
    let outputs: Vec<&Value> = events.iter().filter(|e| e["type"] == "bot-output").collect();
    assert!(outputs.len() >= 2, "two replies: {kinds:?}");
    assert!(outputs[0]["data"]["text"].as_str().unwrap().contains("Aiko"), "{}", outputs[0]);
    let starts: Vec<f64> = events.iter().filter(|e| e["type"] == "bot-started-speaking").map(at).collect();
    let stops: Vec<f64> = events.iter().filter(|e| e["type"] == "bot-stopped-speaking").map(at).collect();
    let levels = page["levels"].as_array().unwrap();
    let first_ms = heard(levels, starts[0], stops[0] + 500.0, 1500.0);

    // sendText: the text comes back as the user's transcription, then a second spoken reply.
    let sent = at(first("text-sent").expect("text sent"));
    let typed = events
        .iter()
        .find(|e| e["type"] == "user-transcription" && e["data"]["final"] == true && at(e) >= sent)
        .expect("the typed text as user-transcription");
    assert_eq!(typed["data"]["text"], "Please tell me about the weather.");
    let reply_start = *starts.iter().find(|&&t| t >= sent).expect("the bot spoke after sendText");
    let reply_stop = *stops.iter().find(|&&t| t >= reply_start).unwrap();
    let second_ms = heard(levels, reply_start, reply_stop + 500.0, 1500.0);
    assert!(outputs.iter().any(|o| at(o) >= sent), "a bot-output for the typed turn");
    assert_eq!(page["response"], json!({"d": null}), "client-message answered by server-response");
    let emotion = events.iter().find(|e| e["type"] == "server-message" && e["data"]["type"] == "emotion");
    assert!(emotion.is_some(), "kotodama's emotion event as server-message: {kinds:?}");
    let ttfb = events.iter().find_map(|e| (e["type"] == "metrics").then(|| e["data"]["ttfb"][0]["value"].as_f64()));
    assert!(ttfb.flatten().is_some_and(|s| s > 0.0), "metrics {{ttfb}} in seconds: {kinds:?}");
    println!(
        "measured: pipecat client heard {first_ms:.0} ms of the first reply, {second_ms:.0} ms of the typed reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_per_session_route_claims_the_tokens_jti_like_the_offer() {
    let prefix = redis_prefix();
    let redis_url = std::env::var("KOTODAMA_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let (url, pre) = (redis_url.clone(), prefix.clone());
    let ts = TestServer::start_with(move |c| {
        c.redis_url = Some(url);
        c.redis_prefix = pre;
        c.token_secret = Some("pipecat-jti-test-secret-0123456789abcdef".into());
    })
    .await;
    let (id, token, _) = ts.create_session().await;
    // The token's jti, from its JWT payload.
    use base64::Engine;
    let payload = token.split('.').nth(1).unwrap();
    let claims: Value =
        serde_json::from_slice(&base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
    let key = format!("{prefix}jti:{}", claims["jti"].as_str().unwrap());
    let mut redis = redis::Client::open(redis_url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let before: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
    assert_eq!(before, None);
    let offer = json!({"sdp": pipecat_offer(), "type": "offer", "pc_id": null, "restart_pc": false});
    let (status, answer) = post(&ts, &format!("/v1/sessions/{id}/api/offer"), offer, Some(&token)).await;
    assert_eq!(status, 200, "{answer}");
    let used: Option<String> = redis::cmd("GET").arg(&key).query_async(&mut redis).await.unwrap();
    assert_eq!(used.as_deref(), Some("1"), "the token is used up for every node (single use)");
    ts.server.shutdown().await.unwrap();
}

/// Pipecat's own server keeps its bot across `restart_pc`; here the replacing session continues
/// the replaced one's conversation: its model opens with the old turns as prior history. A
/// `pc_id` that does not name the old session's current peer carries nothing over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_pc_continues_the_conversation_of_the_replaced_session() {
    use kotodama::providers::HistoryItem;
    const KEY: &str = "pipecat-restart-test-api-key";
    let ts = TestServer::start_with(|c| c.api_keys = vec![KEY.into()]).await;
    let offer = json!({"sdp": pipecat_offer(), "type": "offer", "pc_id": null, "restart_pc": false});
    let (status, first) = post(&ts, "/api/offer", offer.clone(), Some(KEY)).await;
    assert_eq!(status, 200, "{first}");
    let pc_id = first["pc_id"].as_str().unwrap().to_owned();
    let session = pc_id.split('.').next().unwrap().to_owned();
    let said = "My name is Kenji and I like tea.";
    let (status, body) = post(&ts, &format!("/v1/sessions/{session}/messages"), json!({"text": said}), Some(KEY)).await;
    assert_eq!(status, 202, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let res =
            ts.http.get(format!("{}/v1/sessions/{session}/transcript", ts.base)).bearer_auth(KEY).send().await.unwrap();
        let transcript: Value = res.json().await.unwrap();
        let turns = transcript.as_array().cloned().unwrap_or_default();
        if turns.iter().any(|t| t["role"] == "user" && t["text"] == said) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the typed turn was not recorded: {transcript}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = ts.recorder.histories().len();

    // A forged pc_id (right session, wrong peer) ends nothing and carries nothing.
    let mut forged = offer.clone();
    forged["pc_id"] = json!(format!("{session}.peer_forged.e_x"));
    forged["restart_pc"] = json!(true);
    let (status, body) = post(&ts, "/api/offer", forged, Some(KEY)).await;
    assert_eq!(status, 200, "{body}");
    let histories = ts.recorder.histories();
    assert_eq!(histories.len(), opened + 1, "one more provider session");
    assert_eq!(histories.last().unwrap(), &Vec::<HistoryItem>::new(), "nothing carried over a forged pc_id");

    let mut again = offer;
    again["pc_id"] = json!(pc_id);
    again["restart_pc"] = json!(true);
    let (status, second) = post(&ts, "/api/offer", again, Some(KEY)).await;
    assert_eq!(status, 200, "{second}");
    let new_session = second["pc_id"].as_str().unwrap().split('.').next().unwrap().to_owned();
    assert_ne!(new_session, session, "a new session replaces the old one");
    let histories = ts.recorder.histories();
    assert_eq!(histories.len(), opened + 2);
    let carried = histories.last().unwrap();
    assert_eq!(carried.first(), Some(&HistoryItem::User(said.into())), "the model hears the old turns: {carried:?}");
    assert!(
        carried.iter().all(|h| matches!(h, HistoryItem::User(t) if t == said) || matches!(h, HistoryItem::Agent(_))),
        "only the old session's turns: {carried:?}"
    );
    let res = ts.http.get(format!("{}/v1/sessions/{session}", ts.base)).bearer_auth(KEY).send().await.unwrap();
    let old: Value = res.json().await.unwrap();
    assert_eq!(old["state"], "ended", "{old}");
    ts.server.shutdown().await.unwrap();
}
