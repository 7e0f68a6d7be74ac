//! Operators' logs: JSON lines carry the session id and a trace id on every line from a session's
//! task, and no token ever appears in them (debug level included).

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;

use common::*;
use webrtc::peer_connection::{PeerConnection, RTCSessionDescription};

/// Wait for a spawned server, create a session and connect a client peer to it:
/// (session id, token, peer URL, the peer).
async fn connect(http: &reqwest::Client, base: &str) -> (String, String, String, std::sync::Arc<dyn PeerConnection>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{base}/healthz")).send().await.is_err() {
        assert!(Instant::now() < deadline, "server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = create_session_at(http, base, None).await;
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
    (id.to_owned(), token.to_owned(), location, pc)
}

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
    // The server never blocks on its log pipe (it drops lines instead): read it as it goes so
    // nothing is dropped here.
    let mut child = child;
    let drain = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out_reader = drain(Box::new(child.stdout.take().unwrap()));
    let err_reader = drain(Box::new(child.stderr.take().unwrap()));
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let (id, token, location, pc) = connect(&http, &base).await;
    let (id, token) = (id.as_str(), token.as_str());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A bad token, too: it must not be echoed into the logs either.
    let _ = http.delete(format!("{base}{location}")).bearer_auth("not.a.token-SECRETMARK").send().await.unwrap();
    assert_eq!(http.delete(format!("{base}{location}")).bearer_auth(token).send().await.unwrap().status(), 200);
    let _ = pc.close().await;
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert!(status.success(), "clean exit");
    let (out, err) = (out_reader.join().unwrap(), err_reader.join().unwrap());
    let log = String::from_utf8_lossy(&out).to_string() + &String::from_utf8_lossy(&err);

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

/// A fake OpenTelemetry collector: accepts OTLP/HTTP protobuf on /v1/traces and keeps the requests.
async fn collector()
-> (String, Arc<Mutex<Vec<opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    let got: Arc<Mutex<Vec<ExportTraceServiceRequest>>> = Arc::default();
    let sink = Arc::clone(&got);
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let sink = Arc::clone(&sink);
            async move {
                assert_eq!(headers["content-type"], "application/x-protobuf");
                let req = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
                sink.lock().unwrap().push(req);
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_exported_as_otlp_spans_when_configured() {
    let (collector_url, got) = collector().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(env!("CARGO_BIN_EXE_kotodama"))
        .arg("serve")
        .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
        .env("KOTODAMA_PROVIDER", "scripted")
        .env("KOTODAMA_OTLP_ENDPOINT", &collector_url)
        .env_remove("OPENAI_API_KEY")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let (id, token, _location, pc) = connect(&http, &base).await;
    let (id, token) = (id.as_str(), token.as_str());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(http.delete(format!("{base}/v1/sessions/{id}")).bearer_auth(token).send().await.unwrap().status(), 200);
    let _ = pc.close().await;
    Command::new("kill").arg("-TERM").arg(child.id().to_string()).status().unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap().status).await.unwrap();
    assert!(status.success());

    let requests = got.lock().unwrap().clone();
    let spans: Vec<_> = requests
        .iter()
        .flat_map(|r| &r.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .collect();
    let session = spans
        .iter()
        .find(|s| s.name == "session")
        .unwrap_or_else(|| panic!("a `session` span among {} spans", spans.len()));
    let attr = |k: &str| {
        session.attributes.iter().find(|a| a.key == k).and_then(|a| a.value.as_ref()).map(|v| format!("{:?}", v.value))
    };
    assert!(attr("session_id").is_some_and(|v| v.contains(id)), "session_id attribute: {:?}", session.attributes);
    assert!(attr("trace_id").is_some(), "trace_id attribute");
    assert!(session.end_time_unix_nano > session.start_time_unix_nano, "the span closed when the session ended");
    let everything = format!("{requests:?}");
    assert!(!everything.contains(token), "no token in exported spans");
}
