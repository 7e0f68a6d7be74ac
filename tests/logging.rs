//! Operators' logs: JSON lines carry the session id and a trace id on every line from a session's
//! task, and no token ever appears in them (debug level included).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use webrtc::peer_connection::RTCSessionDescription;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_carry_session_and_trace_ids_and_never_tokens() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_kotodama"))
        .arg("serve")
        .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
        .env("KOTODAMA_PROVIDER", "scripted")
        .env("KOTODAMA_LOG", "debug")
        .env("KOTODAMA_LOG_FORMAT", "json")
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v: serde_json::Value = http
        .post(format!("{base}/v1/sessions"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let (id, token, offer_url) =
        (v["session_id"].as_str().unwrap(), v["token"].as_str().unwrap(), v["offer_url"].as_str().unwrap());
    let (pc, _dc, _track, _ssrc, _inbox, offer) = client_offer(true, true).await;
    let res = http
        .post(format!("{base}{offer_url}"))
        .header("Content-Type", "application/sdp")
        .bearer_auth(token)
        .body(offer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let location = res.headers()["location"].to_str().unwrap().to_owned();
    pc.set_remote_description(RTCSessionDescription::answer(res.text().await.unwrap()).unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A bad token, too: it must not be echoed into the logs either.
    let _ = http.delete(format!("{base}{location}")).bearer_auth("not.a.token-SECRETMARK").send().await.unwrap();
    assert_eq!(http.delete(format!("{base}{location}")).bearer_auth(token).send().await.unwrap().status(), 200);
    let _ = pc.close().await;
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);

    assert!(!log.contains(token), "the session token appears in the logs");
    assert!(!log.contains("SECRETMARK"), "a presented token appears in the logs");
    let lines: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert!(lines.len() > 3, "JSON lines: {log}");
    let in_session: Vec<&serde_json::Value> = lines.iter().filter(|l| l["span"]["name"] == "session").collect();
    assert!(!in_session.is_empty(), "lines from the session task carry its span: {log}");
    for l in &in_session {
        assert_eq!(l["span"]["session_id"], id, "{l}");
        let trace = l["span"]["trace_id"].as_str().unwrap_or_default();
        assert_eq!(trace.len(), 32, "a 128-bit hex trace id: {l}");
    }
    assert!(
        in_session.iter().any(|l| l["fields"]["message"] == "session ended"),
        "the end of the session is logged inside its span: {log}"
    );
}
