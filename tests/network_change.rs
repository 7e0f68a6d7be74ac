//! A client whose network changes keeps its session: the client runs in its own network namespace
//! (`ip netns`, a veth pair to the server's namespace; only addresses on that pair are used), talks,
//! loses its address (replaced by another, as on a Wi-Fi -> LTE handover), restarts ICE over PATCH
//! with sockets bound on the new address, and talks again in the same session: audio resumes, no
//! turn is lost, the transcript has no gap or duplicate. Needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN).

mod common;

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use common::ice::{one_turn, restart_pc};
use common::*;
use serde_json::Value;

const API_KEY: &str = "network-change-test-api-key";

/// A network namespace joined to ours by a veth pair `10.213.<n>.1/24 (ours) <-> .2 (its)`.
struct NetNs {
    name: String,
    inner_if: String,
    subnet: u8,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("`ip` (iproute2; .ci/setup.sh installs it)");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

impl NetNs {
    fn create() -> NetNs {
        let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
        let subnet = 1 + rand::random::<u8>() % 250;
        let (name, outer, inner) = (format!("kt-{tag}"), format!("kt{tag}o"), format!("kt{tag}i"));
        ip(&["netns", "add", &name]);
        let ns = NetNs { name: name.clone(), inner_if: inner.clone(), subnet };
        ip(&["link", "add", &outer, "type", "veth", "peer", "name", &inner]);
        ip(&["link", "set", &inner, "netns", &name]);
        ip(&["addr", "add", &format!("10.213.{subnet}.1/24"), "dev", &outer]);
        ip(&["link", "set", &outer, "up"]);
        ns.exec(&["addr", "add", &format!("10.213.{subnet}.2/24"), "dev", &inner]);
        ns.exec(&["link", "set", &inner, "up"]);
        ns
    }

    fn exec(&self, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.name, "ip"];
        all.extend_from_slice(args);
        ip(&all);
    }

    fn addr(&self, host: u8) -> String {
        format!("10.213.{}.{host}", self.subnet)
    }

    /// A single-threaded runtime whose thread lives in this namespace: sockets made by tasks on
    /// it (the client's HTTP and WebRTC sockets) belong to the namespace.
    fn runtime(&self) -> tokio::runtime::Handle {
        let path = format!("/var/run/netns/{}", self.name);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).expect("netns file");
            // SAFETY: setns on this thread only, with a namespace file we opened.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            tx.send(rt.handle().clone()).unwrap();
            rt.block_on(std::future::pending::<()>());
        });
        rx.recv().unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its veth end, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_whose_address_changes_restarts_ice_and_keeps_its_session() {
    let ns = NetNs::create();
    let server_ip = ns.addr(1);
    let ts = TestServer::start_with(|c| {
        c.bind = format!("{server_ip}:0").parse().unwrap();
        c.api_keys = vec![API_KEY.to_owned()];
    })
    .await;
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
