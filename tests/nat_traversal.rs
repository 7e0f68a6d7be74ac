//! NAT traversal without TURN: offers with no candidates (the OpenAI Agents SDK's) and offers whose
//! only candidate is an mDNS `.local` name connect through peer-reflexive learning; the server
//! opens no mDNS socket; and an ICE restart over PATCH keeps the session, its provider session
//! and its transcript.

mod common;

use std::time::Duration;

use common::ice::{one_turn, own_udp_sockets, restart_ice};
use common::*;
use serde_json::Value;

async fn transcript(ts: &TestServer, id: &str, token: &str) -> Vec<Value> {
    let res = ts.http.get(format!("{}/v1/sessions/{id}/transcript", ts.base)).bearer_auth(token).send().await.unwrap();
    res.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_less_non_trickling_offer_connects_and_no_mdns_socket_is_opened() {
    let ts = TestServer::start().await;
    let (_, token, offer_url) = ts.create_session().await;
    let net = ClientNet { offer_candidates: false, ..ClientNet::default() };
    let mut client = TestClient::connect_on(&net, &ts.base, &ts.http, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(15), |e| e["type"] == "session.ready").await;
    one_turn(&mut client, 0).await;
    assert_eq!(ts.recorder.turns().len(), 1, "the user's audio reached the provider");
    assert!(client.inbox.lock().unwrap().agent_pcm.len() > 48_000 * 6, "the client heard the reply");

    let sockets = own_udp_sockets();
    assert!(!sockets.iter().any(|a| a.port() == 5353), "an mDNS socket is open: {sockets:?}");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offer_whose_only_candidate_is_an_mdns_name_connects_without_resolving_it() {
    let ts = TestServer::start().await;
    let (_, token, offer_url) = ts.create_session().await;
    let (pc, dc, _track, _ssrc, inbox, sdp) = client_offer_on(&ClientNet::default(), true, true).await;
    // What a browser sends: its host address hidden behind a random `.local` name.
    let offer: String = sdp
        .split_inclusive('\n')
        .map(|l| {
            if l.starts_with("a=candidate:") {
                l.replace("127.0.0.1", "1f0e3dad-9bd4-4a6b-8f3c-2a1b5c6d7e8f.local")
            } else {
                l.to_owned()
            }
        })
        .collect();
    assert!(offer.contains(".local "), "{offer}");
    let res = ts
        .http
        .post(format!("{}{offer_url}", ts.base))
        .bearer_auth(&token)
        .header("Content-Type", "application/sdp")
        .body(offer)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let answer = res.text().await.unwrap();
    pc.set_remote_description(webrtc::peer_connection::RTCSessionDescription::answer(answer).unwrap()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !inbox.lock().unwrap().states.contains(&webrtc::peer_connection::RTCPeerConnectionState::Connected) {
        assert!(std::time::Instant::now() < deadline, "never connected: {:?}", inbox.lock().unwrap().states);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(dc);
    pc.close().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ice_restart_answers_200_with_new_credentials_and_the_session_continues() {
    let ts = TestServer::start_with(|c| {
        c.turn
            .apply_env(&|k: &str| match k {
                "KOTODAMA_TURN_URLS" => Some("turn:127.0.0.1:3478?transport=udp".into()),
                "KOTODAMA_TURN_SECRET" => Some("restart-test-secret-0123456789".into()),
                _ => None,
            })
            .unwrap();
    })
    .await;
    let (id, token, offer_url) = ts.create_session().await;
    let mut client = TestClient::connect(&ts, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(15), |e| e["type"] == "session.ready").await;
    one_turn(&mut client, 0).await;
    let old_server_ufrag =
        client.answer.lines().find_map(|l| l.trim_end().strip_prefix("a=ice-ufrag:")).unwrap().to_owned();

    let restarted = restart_ice(&client, &ts.base, &ts.http, &token).await;
    assert_eq!(restarted.status, 200, "{}", restarted.sdpfrag);
    assert_eq!(restarted.content_type, "application/trickle-ice-sdpfrag");
    assert!(restarted.etag.starts_with('"') && restarted.etag != client.etag, "new ETag {}", restarted.etag);
    let new_ufrag = restarted.sdpfrag.lines().find_map(|l| l.strip_prefix("a=ice-ufrag:")).expect("ufrag");
    assert_ne!(new_ufrag, old_server_ufrag, "the server's credentials change");
    assert!(restarted.sdpfrag.contains("a=candidate:") && restarted.sdpfrag.contains("a=end-of-candidates"));
    // Fresh TURN credentials for the new network (RFC 9725 §4.6 Link headers).
    let link = restarted.links.iter().find(|l| l.starts_with("<turn:")).expect("a TURN Link header");
    assert!(link.contains("rel=\"ice-server\"") && link.contains(&format!(":{id}\"")), "{link}");
    assert!(link.contains("credential=\"") && link.contains("credential-type=\"password\""), "{link}");

    // The old ETag is stale now; the new one takes trickled candidates.
    let patch = |etag: String| {
        ts.http
            .patch(format!("{}{}", ts.base, client.location))
            .bearer_auth(&token)
            .header("Content-Type", "application/trickle-ice-sdpfrag")
            .header("If-Match", etag)
            .body("a=end-of-candidates\r\n")
            .send()
    };
    assert_eq!(patch(client.etag.clone()).await.unwrap().status(), 412);
    assert_eq!(patch(restarted.etag.clone()).await.unwrap().status(), 204);

    // Same session, same provider session: the second turn is answered and recorded after the first.
    one_turn(&mut client, 1).await;
    assert_eq!(ts.recorder.turns().len(), 2, "both user turns reached the provider");
    let entries = transcript(&ts, &id, &token).await;
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    let roles: Vec<&str> = entries.iter().map(|e| e["role"].as_str().unwrap()).collect();
    // The scripted provider transcribes its own replies only: one agent entry per turn.
    assert_eq!(roles, ["agent", "agent"], "{entries:#?}");
    assert_eq!(seqs[1], seqs[0] + 1, "no gap, no duplicate: {seqs:?}");
    assert_eq!(ts.session_json(&id, &token).await["state"], "connected");
    client.close().await;
}
