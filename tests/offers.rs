//! Answers to real-shaped offers are checked before they go out (issue 12, kind 1), and a local
//! resource failure is a 503, not a 500 (kind 10).
//!
//! Each offer of `tests/data/offers/` is posted to a running server; the answer is verified here
//! with this file's own reading of the SDP (not the server's checker): one answer section per
//! offer section with the same mids, the audio section accepted, `sendrecv`, with Opus (by name)
//! and the agent's track, video rejected, the data channel accepted, `a=setup` complementing the
//! offer and BUNDLE only over offered mids. Offers the server cannot serve get a specific 422 and
//! leave the session ready for a corrected offer.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

fn offer(name: &str) -> String {
    let path = format!("{}/tests/data/offers/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One m-section: (kind, port, attribute lines).
struct Section {
    kind: String,
    port: u16,
    attrs: Vec<String>,
}

impl Section {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find_map(|a| a.strip_prefix(key).and_then(|r| r.strip_prefix(':').or(r.is_empty().then_some(""))))
    }
    fn has(&self, key: &str) -> bool {
        self.attr(key).is_some()
    }
    fn mid(&self) -> Option<&str> {
        self.attr("mid")
    }
}

/// (session-level attributes, sections).
fn sections(sdp: &str) -> (Vec<String>, Vec<Section>) {
    let mut session = Vec::new();
    let mut out: Vec<Section> = Vec::new();
    for line in sdp.lines().map(str::trim) {
        if let Some(m) = line.strip_prefix("m=") {
            let mut f = m.split_whitespace();
            let kind = f.next().unwrap_or_default().to_owned();
            let port = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            out.push(Section { kind, port, attrs: Vec::new() });
        } else if let Some(a) = line.strip_prefix("a=") {
            match out.last_mut() {
                Some(s) => s.attrs.push(a.to_owned()),
                None => session.push(a.to_owned()),
            }
        }
    }
    (session, out)
}

fn bundle(session: &[String]) -> Vec<String> {
    session
        .iter()
        .filter_map(|a| a.strip_prefix("group:BUNDLE"))
        .flat_map(|v| v.split_whitespace().map(str::to_owned))
        .collect()
}

async fn post_offer(ts: &TestServer, sdp: &str) -> (String, String, u16, reqwest::header::HeaderMap, String) {
    let (id, token, offer_url) = ts.create_session().await;
    let res = ts
        .http
        .post(format!("{}{offer_url}", ts.base))
        .header("Content-Type", "application/sdp")
        .bearer_auth(&token)
        .body(sdp.to_owned())
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    let headers = res.headers().clone();
    (id, token, status, headers, res.text().await.unwrap())
}

/// Verifies `answer` against `offer`; `audio_mid` is the offer's audio section.
fn verify_answer(name: &str, offer: &str, answer: &str, audio_mid: &str) {
    let (osess, offered) = sections(offer);
    let (asess, answered) = sections(answer);
    assert_eq!(answered.len(), offered.len(), "{name}: one answer section per offer section");
    let offered_setup = offered[0].attr("setup").or_else(|| osess.iter().find_map(|a| a.strip_prefix("setup:")));
    for (o, a) in offered.iter().zip(&answered) {
        assert_eq!(a.kind, o.kind, "{name}: section kinds in order");
        let mid = o.mid().unwrap_or_default();
        match o.kind.as_str() {
            "audio" if mid == audio_mid => {
                assert_ne!(a.port, 0, "{name}: audio accepted");
                assert_eq!(a.mid(), Some(audio_mid), "{name}: audio mid");
                assert!(a.has("sendrecv"), "{name}: audio sendrecv in {:?}", a.attrs);
                assert!(
                    a.attrs.iter().any(|l| l.starts_with("rtpmap:") && l.to_ascii_lowercase().contains(" opus/48000")),
                    "{name}: Opus in the answer's audio"
                );
                assert!(
                    a.has("msid") || a.attrs.iter().any(|l| l.starts_with("ssrc:")),
                    "{name}: agent track on audio"
                );
                // Opus by name: the answer keeps the offer's payload type for it (RFC 3264 §6.1),
                // wherever the offer listed it and whatever number it gave it.
                let opus_pt = |s: &Section| {
                    s.attrs.iter().find_map(|l| {
                        let (pt, enc) = l.strip_prefix("rtpmap:")?.split_once(' ')?;
                        enc.to_ascii_lowercase().starts_with("opus/48000").then(|| pt.to_owned())
                    })
                };
                assert_eq!(opus_pt(a), opus_pt(o), "{name}: Opus payload type as offered");
            }
            "application" => {
                assert_ne!(a.port, 0, "{name}: data channel accepted");
                assert_eq!(a.mid(), o.mid(), "{name}: data mid");
            }
            _ => {
                assert_eq!(a.port, 0, "{name}: {} section {mid} rejected", o.kind);
                assert!(!a.has("msid"), "{name}: no track on {mid}");
            }
        }
        let setup = a.attr("setup").or_else(|| asess.iter().find_map(|l| l.strip_prefix("setup:")));
        if a.port != 0 {
            let want: &[&str] = match offered_setup {
                Some("active") => &["passive"],
                Some("passive") => &["active"],
                _ => &["active", "passive"],
            };
            assert!(
                setup.is_some_and(|s| want.contains(&s)),
                "{name}: answer setup {setup:?} for offer {offered_setup:?}"
            );
        }
    }
    let (ob, ab) = (bundle(&osess), bundle(&asess));
    assert!(ab.iter().all(|m| ob.contains(m)), "{name}: answer BUNDLE {ab:?} only over offered {ob:?}");
    for m in [audio_mid, offered.iter().find(|s| s.kind == "application").and_then(Section::mid).unwrap()] {
        assert!(ab.iter().any(|b| b == m), "{name}: {m} bundled in {ab:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_real_shaped_offer_gets_a_verified_answer_or_a_specific_422() {
    let ts = TestServer::start().await;
    let answered = [
        ("chrome.sdp", "0"),
        ("firefox.sdp", "0"),
        ("safari.sdp", "0"),
        ("mobile_libwebrtc.sdp", "audio"),
        ("setup_active.sdp", "0"),
        ("gstreamer_webrtcbin_max_bundle.sdp", "audio0"),
        ("pipecat_small_webrtc.sdp", "0"),
        ("flutter_webrtc_android.sdp", "0"),
        ("firefox_audio_video.sdp", "0"),
        ("safari_audio_video.sdp", "0"),
    ];
    for (name, audio_mid) in answered {
        let sdp = offer(name);
        let (id, token, status, _, body) = post_offer(&ts, &sdp).await;
        assert_eq!(status, 201, "{name}: {body}");
        verify_answer(name, &sdp, &body, audio_mid);
        assert_eq!(ts.session_json(&id, &token).await["state"], "connecting", "{name}");
    }
    let refused = [
        ("gstreamer_webrtcbin_no_bundle.sdp", "no_bundle", "bundle-policy"),
        ("sip_gateway_pcmu_only.sdp", "no_opus", "opus/48000"),
    ];
    for (name, code, fix) in refused {
        let (id, token, status, _, body) = post_offer(&ts, &offer(name)).await;
        assert_eq!(status, 422, "{name}: {body}");
        let problem: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(problem["code"], code, "{name}: {problem}");
        assert!(problem["detail"].as_str().unwrap().contains(fix), "{name}: the detail names the fix");
        assert_eq!(ts.session_json(&id, &token).await["state"], "created", "{name}: a corrected offer may follow");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_with_setup_active_is_answered_passive_and_dtls_connects() {
    let ts = TestServer::start().await;
    let (id, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect_with(&ClientNet::default(), &ts.base, &ts.http, &offer_url, &token, |sdp| {
        sdp.replace("a=setup:actpass", "a=setup:active")
    })
    .await;
    assert!(client.answer.contains("a=setup:passive"), "answer:\n{}", client.answer);
    // DTLS and SCTP up: the data channel opens and the session says hello.
    client.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    assert_eq!(ts.session_json(&id, &token).await["state"], "connected");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_media_port_held_by_another_process_is_503_with_retry_after_and_ends_the_session() {
    // Another process holds the only media port.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let ts = TestServer::start_with(|c| {
        c.media.udp_ports = Some(format!("{port}-{port}"));
        c.session.max_sessions = 1;
    })
    .await;
    let (id, token, status, headers, body) = post_offer(&ts, &offer("chrome.sdp")).await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.get("retry-after").is_some(), "Retry-After on 503");
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert!(problem["detail"].as_str().unwrap().contains("media port"), "{problem}");
    let info = ts.session_json(&id, &token).await;
    assert_eq!(info["state"], "ended", "not left `created`: {info}");
    drop(held);
}
