//! The OpenAI Realtime call surface over HTTP (`POST /v1/realtime/client_secrets`,
//! `/v1/realtime/calls`, `/calls/{id}/hangup`): ephemeral keys (expiry 10..=7200 s, single use),
//! both offer encodings (the Agents SDK's `application/sdp`, openai-node's multipart `sdp` +
//! `session`), the answer carrying the server's candidates, hangup, CORS, and bad input answered
//! with problem+json. The offers are a real webrtc-rs peer's.

mod common;

use common::*;
use reqwest::header;
use serde_json::{Value, json};

const KEY: &str = "sk-kotodama-test-0123456789";

async fn server_with_key() -> TestServer {
    TestServer::start_with(|c| c.api_keys = vec![KEY.to_owned()]).await
}

async fn offer_sdp() -> String {
    client_offer(true, true).await.5
}

async fn mint(ts: &TestServer, body: Value) -> reqwest::Response {
    ts.http.post(format!("{}/v1/realtime/client_secrets", ts.base)).bearer_auth(KEY).json(&body).send().await.unwrap()
}

async fn problem(res: reqwest::Response, status: u16) -> Value {
    assert_eq!(res.status(), status);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/problem+json");
    res.json().await.unwrap()
}

#[tokio::test]
async fn a_client_secret_opens_exactly_one_call_which_hangup_ends() {
    let ts = server_with_key().await;
    let url = format!("{}/v1/realtime/client_secrets", ts.base);
    let no_key = ts.http.post(&url).json(&json!({})).send().await.unwrap();
    problem(no_key, 401).await;

    let before = time_now();
    let res = mint(&ts, json!({"session": {"type": "realtime", "instructions": "Be brief."}})).await;
    assert_eq!(res.status(), 200);
    let secret: Value = res.json().await.unwrap();
    let ek = secret["value"].as_str().unwrap().to_owned();
    assert!(ek.starts_with("ek_") && ek.len() > 20, "{ek}");
    let expires_at = secret["expires_at"].as_i64().unwrap();
    assert!((expires_at - before - 600).abs() <= 2, "600 s by default: {expires_at} vs {before}");
    assert!(secret["session"]["instructions"].as_str().unwrap().ends_with("Be brief."), "{secret}");

    let calls = format!("{}/v1/realtime/calls", ts.base);
    let post_offer = |auth: String, sdp: String| {
        ts.http
            .post(&calls)
            .header(header::CONTENT_TYPE, "application/sdp")
            .header(header::AUTHORIZATION, auth)
            .header("X-OpenAI-Agents-SDK", "openai-agents-sdk.realtime")
            .body(sdp)
            .send()
    };
    let res = post_offer(format!("Bearer {ek}"), offer_sdp().await).await.unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()[header::CONTENT_TYPE], "application/sdp");
    let location = res.headers()[header::LOCATION].to_str().unwrap().to_owned();
    let call_id = location.strip_prefix("/v1/realtime/calls/").expect("Location names the call").to_owned();
    let answer = res.text().await.unwrap();
    assert!(answer.starts_with("v=0") && answer.contains("a=candidate:"), "the answer carries candidates: {answer}");

    // Single use: the same secret cannot open a second call.
    let again = post_offer(format!("Bearer {ek}"), offer_sdp().await).await.unwrap();
    assert_eq!(problem(again, 401).await["code"], "invalid_client_secret");
    let unknown = post_offer("Bearer ek_nope".into(), offer_sdp().await).await.unwrap();
    problem(unknown, 401).await;

    // The call is a session: an API key reads it.
    let session = get_json(&ts.http, &format!("{}/v1/sessions/{call_id}", ts.base), KEY).await;
    assert_ne!(session["state"], "ended", "{session}");

    let hangup = format!("{calls}/{call_id}/hangup");
    problem(ts.http.post(&hangup).send().await.unwrap(), 401).await;
    let res = ts.http.post(&hangup).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let session = get_json(&ts.http, &format!("{}/v1/sessions/{call_id}", ts.base), KEY).await;
    assert_eq!(session["state"], "ended");
    assert_eq!(session["end_reason"], "client_request");
    let missing = ts.http.post(format!("{calls}/sess_unknown/hangup")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(problem(missing, 404).await["code"], "unknown_call");
}

fn time_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

#[tokio::test]
async fn client_secret_expiry_is_bounded_and_bad_bodies_are_problems() {
    let ts = server_with_key().await;
    for seconds in [9, 7201, 0] {
        let res = mint(&ts, json!({"expires_after": {"anchor": "created_at", "seconds": seconds}})).await;
        assert_eq!(problem(res, 400).await["code"], "invalid_expires_after", "{seconds} s");
    }
    for seconds in [10, 7200] {
        let res = mint(&ts, json!({"expires_after": {"anchor": "created_at", "seconds": seconds}})).await;
        assert_eq!(res.status(), 200, "{seconds} s");
        let v: Value = res.json().await.unwrap();
        assert!((v["expires_at"].as_i64().unwrap() - time_now() - seconds).abs() <= 2);
    }
    let res = mint(&ts, json!({"session": {"type": "transcription"}})).await;
    assert_eq!(problem(res, 400).await["code"], "invalid_session");
    let res = mint(&ts, json!({"session": {"instructions": 5}})).await;
    assert_eq!(problem(res, 400).await["code"], "invalid_session");
    let url = format!("{}/v1/realtime/client_secrets", ts.base);
    let res = ts
        .http
        .post(&url)
        .bearer_auth(KEY)
        .header(header::CONTENT_TYPE, "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(problem(res, 400).await["code"], "bad_json");
    let big = json!({"session": {"instructions": "x".repeat(64 * 1024)}});
    problem(mint(&ts, big).await, 413).await;
}

#[tokio::test]
async fn openai_node_multipart_calls_carry_their_session_and_bad_offers_are_problems() {
    let ts = TestServer::start().await; // loopback without keys: open
    let calls = format!("{}/v1/realtime/calls", ts.base);
    let form = reqwest::multipart::Form::new()
        .text("sdp", offer_sdp().await)
        .text("session", json!({"type": "realtime", "model": "gpt-realtime", "instructions": "Say hi."}).to_string());
    let res = ts.http.post(&calls).header(header::ACCEPT, "application/sdp").multipart(form).send().await.unwrap();
    assert_eq!(res.status(), 201);
    assert!(res.headers()[header::LOCATION].to_str().unwrap().starts_with("/v1/realtime/calls/sess_"));
    assert!(res.text().await.unwrap().contains("a=fingerprint:"));

    let no_sdp = reqwest::multipart::Form::new().text("session", "{}");
    let res = ts.http.post(&calls).multipart(no_sdp).send().await.unwrap();
    assert_eq!(problem(res, 400).await["code"], "bad_multipart");
    let bad_session = reqwest::multipart::Form::new().text("sdp", offer_sdp().await).text("session", "{");
    let res = ts.http.post(&calls).multipart(bad_session).send().await.unwrap();
    assert_eq!(problem(res, 400).await["code"], "invalid_session");
    let res = ts.http.post(&calls).header(header::CONTENT_TYPE, "text/plain").body("v=0").send().await.unwrap();
    problem(res, 415).await;
    let res = ts.http.post(&calls).header(header::CONTENT_TYPE, "application/sdp").body("hello").send().await.unwrap();
    problem(res, 400).await;
    let no_dc = client_offer(true, false).await.5;
    let res = ts.http.post(&calls).header(header::CONTENT_TYPE, "application/sdp").body(no_dc).send().await.unwrap();
    problem(res, 422).await;
    let huge = format!("{}a=x-pad:{}\r\n", offer_sdp().await, "p".repeat(70 * 1024));
    let res = ts.http.post(&calls).header(header::CONTENT_TYPE, "application/sdp").body(huge).send().await.unwrap();
    problem(res, 413).await;
}

#[tokio::test]
async fn cors_preflight_names_the_sdk_headers_and_responses_expose_location() {
    let ts = TestServer::start().await;
    for path in ["/v1/realtime/calls", "/v1/realtime/client_secrets", "/v1/realtime/calls/sess_x/hangup"] {
        let res = ts
            .http
            .request(reqwest::Method::OPTIONS, format!("{}{path}", ts.base))
            .header(header::ORIGIN, "http://page.example")
            .header(header::ACCESS_CONTROL_REQUEST_METHOD, "POST")
            .header(header::ACCESS_CONTROL_REQUEST_HEADERS, "authorization,content-type,x-openai-agents-sdk")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 204, "{path}");
        let h = res.headers();
        assert_eq!(h[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        let allowed = h[header::ACCESS_CONTROL_ALLOW_HEADERS].to_str().unwrap().to_ascii_lowercase();
        for name in ["authorization", "content-type", "x-openai-agents-sdk"] {
            assert!(allowed.split(',').any(|a| a.trim() == name), "{path}: {name} is named in {allowed}");
        }
        assert!(h[header::ACCESS_CONTROL_ALLOW_METHODS].to_str().unwrap().contains("POST"));
    }
    let res = ts
        .http
        .post(format!("{}/v1/realtime/calls", ts.base))
        .header(header::ORIGIN, "http://page.example")
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(offer_sdp().await)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    assert_eq!(res.headers()[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
    assert_eq!(res.headers()[header::ACCESS_CONTROL_EXPOSE_HEADERS], "Location");
    let get = ts.http.get(format!("{}/v1/realtime/calls", ts.base)).send().await.unwrap();
    problem(get, 405).await;
}

#[tokio::test]
async fn minting_and_calling_count_against_the_session_rate_limit() {
    let ts = TestServer::start_with(|c| {
        c.api_keys = vec![KEY.to_owned()];
        c.session.create_per_minute_per_key = 2;
    })
    .await;
    for _ in 0..2 {
        assert_eq!(mint(&ts, json!({})).await.status(), 200);
    }
    let limited = mint(&ts, json!({})).await;
    assert!(limited.headers().contains_key(header::RETRY_AFTER));
    problem(limited, 429).await;
    // A call placed with the API key itself is one more session in the same bucket.
    let res = ts
        .http
        .post(format!("{}/v1/realtime/calls", ts.base))
        .bearer_auth(KEY)
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(offer_sdp().await)
        .send()
        .await
        .unwrap();
    problem(res, 429).await;
}

#[tokio::test]
async fn an_expired_client_secret_is_refused_by_name() {
    let ts = server_with_key().await;
    let res = mint(&ts, json!({"expires_after": {"anchor": "created_at", "seconds": 10}})).await;
    let ek = res.json::<Value>().await.unwrap()["value"].as_str().unwrap().to_owned();
    tokio::time::sleep(std::time::Duration::from_millis(10_300)).await;
    let res = ts
        .http
        .post(format!("{}/v1/realtime/calls", ts.base))
        .bearer_auth(&ek)
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(offer_sdp().await)
        .send()
        .await
        .unwrap();
    assert_eq!(problem(res, 401).await["code"], "client_secret_expired");
}
