//! A client whose network changes keeps its session: the client runs in its own network namespace
//! (`ip netns`, a veth pair to the server's namespace; only addresses on that pair are used), talks,
//! loses its address (replaced by another, as on a Wi-Fi -> LTE handover), restarts ICE over PATCH
//! with sockets bound on the new address, and talks again in the same session: audio resumes, no
//! turn is lost, the transcript has no gap or duplicate. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).

mod common;

use std::time::Duration;

use common::ice::{one_turn, restart_pc};
use common::netns::server_on_veth;
use common::*;
use serde_json::Value;

const API_KEY: &str = "network-change-test-api-key";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_address_changes_restarts_ice_and_keeps_its_session() {
    let (ns, server_ip, ts) = server_on_veth(API_KEY).await;
    let base = ts.base.clone();
    let res = ts.http.post(format!("{base}/v1/sessions")).bearer_auth(API_KEY).json(&serde_json::json!({})).send();
    let created: Value = res.await.unwrap().json().await.unwrap();
    let (id, token) =
        (created["session_id"].as_str().unwrap().to_owned(), created["token"].as_str().unwrap().to_owned());
    let offer_url = created["offer_url"].as_str().unwrap().to_owned();

    // The client, inside the namespace: every interface's address, rebound on an ICE restart.
    let netns = ns.runtime();
    let net =
        ClientNet { udp_addrs: vec!["0.0.0.0:0".parse().unwrap()], rebind_on_restart: true, ..ClientNet::default() };
    let (b, t, n) = (base.clone(), token.clone(), net.clone());
    let mut client = netns
        .spawn(async move { TestClient::connect_on(&n, &b, &reqwest::Client::new(), &offer_url, &t).await })
        .await
        .unwrap();
    assert!(client.answer.contains(&server_ip), "the server's candidates are on the veth: {}", client.answer);
    client.wait_event("session.ready", Duration::from_secs(15), |e| e["type"] == "session.ready").await;
    one_turn(&mut client, 0).await;

    // The network changes: the client's address goes away and another one comes.
    ns.exec(&["addr", "del", &format!("{}/24", ns.addr(2)), "dev", &ns.inner_if]);
    ns.exec(&["addr", "add", &format!("{}/24", ns.addr(3)), "dev", &ns.inner_if]);
    let http = ts.http.clone();
    let (b, t) = (base.clone(), token.clone());
    let (pc, location) = (client.pc.clone(), client.location.clone());
    let restarted = netns.spawn(async move { restart_pc(&pc, &location, &b, &http, &t).await }).await.unwrap();
    assert_eq!(restarted.status, 200, "{}", restarted.sdpfrag);
    let local = client.pc.local_description().await.unwrap().sdp;
    assert!(
        local.contains(&format!(" {} ", ns.addr(3))),
        "the client's new candidates are on its new address:\n{local}"
    );

    // Same session: the next turn is heard both ways and recorded after the first.
    let heard_before = client.inbox.lock().unwrap().agent_pcm.len();
    one_turn(&mut client, 1).await;
    assert_eq!(ts.recorder.turns().len(), 2, "both user turns reached the provider");
    assert!(peak_rms(&ts.recorder.turns()[1].samples, 24_000) > 1000.0, "the second turn is speech");
    let heard_after = client.inbox.lock().unwrap().agent_pcm.len() - heard_before;
    assert!(heard_after > 48_000 * 6, "the second reply was heard: {:.2} s", heard_after as f64 / 48_000.0);
    let res = ts.http.get(format!("{base}/v1/sessions/{id}/transcript")).bearer_auth(&token).send().await.unwrap();
    let entries: Vec<Value> = res.json().await.unwrap();
    let seqs: Vec<u64> = entries.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(entries.len(), 2, "one agent entry per turn: {entries:#?}");
    assert_eq!(seqs[1], seqs[0] + 1, "no gap, no duplicate: {seqs:?}");
    assert_eq!(ts.session_json(&id, &token).await["state"], "connected");
    client.close().await;
}
