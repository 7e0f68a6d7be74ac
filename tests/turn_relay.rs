//! TURN REST credentials against a real coturn on loopback (`turn-config/turnserver.test.conf`):
//! a client forced to relay only talks to the character through coturn with the credentials
//! `POST /v1/sessions` minted; a wrong secret or an expired credential fails the allocation; and
//! the production `denied-peer-ip` set refuses to relay to a loopback peer. Loopback traffic only.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use common::coturn::{Coturn, production_denied_peer_ips};
use common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use webrtc::peer_connection::{RTCIceCandidateType, RTCIceServer, RTCPeerConnectionState};

const SECRET: &str = "kotodama-test-turn-secret-0123456789";
const OLD_SECRET: &str = "kotodama-previous-turn-secret-98765";

/// The TURN REST password, computed here independently of the product's minting.
fn rest_password(secret: &str, username: &str) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

async fn server_with_turn(coturn: &Coturn) -> TestServer {
    let url = coturn.turn_url();
    TestServer::start_with(move |c| {
        c.turn
            .apply_env(&|k: &str| match k {
                "KOTODAMA_TURN_URLS" => Some(url.clone()),
                "KOTODAMA_TURN_SECRET" => Some(SECRET.to_owned()),
                _ => None,
            })
            .unwrap();
    })
    .await
}

/// POST /v1/sessions: (session_id, token, offer_url, ice_servers).
async fn create(ts: &TestServer) -> (String, String, String, Vec<Value>) {
    let res = ts.http.post(format!("{}/v1/sessions", ts.base)).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(res.status(), 201);
    let v: Value = res.json().await.unwrap();
    let s = |k: &str| v[k].as_str().unwrap().to_owned();
    (s("session_id"), s("token"), s("offer_url"), v["ice_servers"].as_array().unwrap().clone())
}

fn to_rtc(servers: &[Value]) -> Vec<RTCIceServer> {
    servers
        .iter()
        .map(|s| RTCIceServer {
            urls: s["urls"].as_array().unwrap().iter().map(|u| u.as_str().unwrap().to_owned()).collect(),
            username: s["username"].as_str().unwrap_or_default().to_owned(),
            credential: s["credential"].as_str().unwrap_or_default().to_owned(),
        })
        .collect()
}

/// The relay candidates a relay-only client gathers with `servers` (empty: the allocation failed).
async fn relay_candidates(servers: Vec<RTCIceServer>) -> Vec<String> {
    let net = ClientNet { ice_servers: servers, relay_only: true, ..ClientNet::default() };
    let (pc, _dc, _t, _ssrc, _inbox, sdp) = client_offer_on(&net, true, true).await;
    pc.close().await.ok();
    // Component 1 only (webrtc-rs also lists an RTCP component with BUNDLE).
    sdp.lines()
        .filter(|l| l.starts_with("a=candidate:") && l.contains(" typ relay") && l.split(' ').nth(1) == Some("1"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_only_client_talks_to_the_character_through_coturn() {
    let coturn = Coturn::start(&[SECRET], &[]);
    let ts = server_with_turn(&coturn).await;
    let (session_id, token, offer_url, servers) = create(&ts).await;

    // The minted credential: <expiry>:<session id>, HMAC-SHA1 of the shared secret, lifetime
    // covering the maximum session (3600 s) plus the connect window (600 s).
    assert_eq!(servers.len(), 1, "{servers:?}");
    assert_eq!(servers[0]["urls"][0], coturn.turn_url());
    let username = servers[0]["username"].as_str().unwrap();
    let (expiry, id) = username.split_once(':').unwrap();
    assert_eq!(id, session_id);
    let lifetime = expiry.parse::<u64>().unwrap() - unix_now();
    assert!((4190..=4200).contains(&lifetime), "credential lifetime {lifetime} s");
    assert_eq!(servers[0]["credential"], rest_password(SECRET, username));

    let net = ClientNet { ice_servers: to_rtc(&servers), relay_only: true, ..ClientNet::default() };
    let mut client = TestClient::connect_on(&net, &ts.base, &ts.http, &offer_url, &token).await;
    client.wait_event("session.ready", Duration::from_secs(15), |e| e["type"] == "session.ready").await;

    // The path in use is coturn's relay.
    let sctp = client.pc.sctp().await.expect("sctp transport");
    let pair = sctp.transport().ice_transport().get_selected_candidate_pair().await.unwrap().expect("selected pair");
    assert_eq!(pair.local().typ, RTCIceCandidateType::Relay, "selected pair {pair}");
    assert_eq!(pair.local().address, "127.0.0.1");

    // One turn: the provider hears the user, the client hears the character.
    common::ice::one_turn(&mut client, 0).await;
    let turns = ts.recorder.turns();
    assert_eq!(turns.len(), 1, "one user turn reached the provider");
    assert!(peak_rms(&turns[0].samples, 24_000) > 1000.0, "the provider heard speech");
    let heard = turns[0].total_samples as f64 / 24_000.0;
    assert!(heard > 1.0, "the provider heard {heard:.2} s");
    let agent = client.inbox.lock().unwrap().agent_pcm.clone();
    let agent_secs = agent.len() as f64 / 48_000.0;
    assert!(agent_secs > 6.5, "the client heard {agent_secs:.2} s of the 7.5 s reply through the relay");
    assert!(peak_rms(&agent, 48_000) > 1000.0, "the agent's audio is speech");
    let types: Vec<String> = client.events().iter().map(|e| e["type"].as_str().unwrap_or("?").to_owned()).collect();
    for t in ["session.ready", "user.speech_started", "user.speech_stopped", "transcript", "state"] {
        assert!(types.iter().any(|x| x == t), "no {t} event: {types:?}");
    }
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_or_expired_credential_fails_the_allocation_and_a_rotated_secret_still_works() {
    // coturn in the middle of a rotation: the new secret and the previous one.
    let coturn = Coturn::start(&[SECRET, OLD_SECRET], &[]);
    let server = |username: String, secret: &str| {
        let credential = rest_password(secret, &username);
        vec![RTCIceServer { urls: vec![coturn.turn_url()], username, credential }]
    };
    let valid = format!("{}:sess_ok", unix_now() + 600);

    let good = relay_candidates(server(valid.clone(), SECRET)).await;
    assert_eq!(good.len(), 1, "a valid credential allocates a relay: {good:?}");
    let rotated = relay_candidates(server(valid.clone(), OLD_SECRET)).await;
    assert_eq!(rotated.len(), 1, "the previous secret is still accepted during a rotation");

    let wrong = relay_candidates(server(valid.clone(), "another-secret-entirely-0123456")).await;
    assert!(wrong.is_empty(), "a credential from a wrong secret allocated: {wrong:?}");
    let old = format!("{}:sess_old", unix_now() - 60);
    let expired = relay_candidates(server(old.clone(), SECRET)).await;
    assert!(expired.is_empty(), "an expired credential allocated: {expired:?}");
    let log = coturn.log_text();
    for user in [valid, old] {
        assert!(log.contains(&format!("Cannot find credentials of user <{user}>")), "coturn refused {user}:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_denied_peer_ip_refuses_to_relay_to_a_loopback_peer() {
    // The test config allows loopback peers; the production deny list must still refuse them.
    let denied = production_denied_peer_ips();
    assert!(denied.iter().any(|l| l == "denied-peer-ip=127.0.0.0-127.255.255.255"), "{denied:?}");
    let coturn = Coturn::start(&[SECRET], &denied);
    let ts = server_with_turn(&coturn).await;
    let (session_id, token, offer_url, servers) = create(&ts).await;
    let net = ClientNet { ice_servers: to_rtc(&servers), relay_only: true, ..ClientNet::default() };
    let client = TestClient::connect_on(&net, &ts.base, &ts.http, &offer_url, &token).await;

    // The allocation succeeds; the permission to reach the server's loopback address does not.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let log = coturn.log_text();
        if log.contains("A peer IP 127.0.0.1 denied in the range: 127.0.0.0-127.255.255.255") {
            break;
        }
        assert!(Instant::now() < deadline, "coturn never refused the loopback peer:\n{log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let states = client.inbox.lock().unwrap().states.clone();
    assert!(!states.contains(&RTCPeerConnectionState::Connected), "connected through a denied peer: {states:?}");
    let info = ts.session_json(&session_id, &token).await;
    assert_ne!(info["state"], "connected");
    client.close().await;
}
