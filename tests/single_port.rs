//! One UDP port for every session (`KOTODAMA_UDP_PORT`): 50 concurrent sessions, each with its
//! own webrtc-rs client, share the server's one media socket; each client hears only its own
//! agent (every reply is a tone of its own frequency, named in its transcript, and the client
//! checks the tone it heard against the name it read); the process holds exactly one server-side
//! media UDP socket; ending half of the sessions leaves the others working.

mod common;

use std::time::{Duration, Instant};

use common::fake_openai::{FakeOpenAi, FakeOptions, Reply};
use common::ice::own_udp_sockets;
use common::*;
use futures::future::join_all;
use kotodama::config::PeerDriver;

const SESSIONS: usize = 50;

/// One test at a time: the 50-session test counts every UDP socket of the process.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn tone_hz(k: usize) -> f64 {
    300.0 + 30.0 * k as f64
}

/// 0.8 s of a sine at `tone_hz(k)`, 24 kHz (the provider's output rate).
fn tone(k: usize) -> Vec<i16> {
    (0..19_200).map(|i| ((i as f64 * tone_hz(k) * std::f64::consts::TAU / 24_000.0).sin() * 8000.0) as i16).collect()
}

/// The power of `hz` in `pcm` (48 kHz), Goertzel.
fn power(pcm: &[i16], hz: f64) -> f64 {
    let coeff = 2.0 * (std::f64::consts::TAU * hz / 48_000.0).cos();
    let (mut s1, mut s2) = (0.0f64, 0.0f64);
    for &x in pcm {
        let s = f64::from(x) + coeff * s1 - s2;
        s2 = s1;
        s1 = s;
    }
    s1 * s1 + s2 * s2 - coeff * s1 * s2
}

/// Which of the `n` tones `pcm` holds most of.
fn loudest_tone(pcm: &[i16], n: usize) -> usize {
    (0..n).max_by(|a, b| power(pcm, tone_hz(*a)).total_cmp(&power(pcm, tone_hz(*b)))).unwrap()
}

/// Ask for one reply; return (the tone its transcript names, the tone heard in the new audio).
async fn ask(client: &TestClient, finals_before: usize) -> (usize, usize) {
    let heard_before = client.inbox.lock().unwrap().agent_pcm.len();
    client.send_text(r#"{"type":"text","text":"which tone are you?"}"#).await;
    let finals = |c: &TestClient| {
        c.events()
            .into_iter()
            .filter(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
            .collect::<Vec<_>>()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while finals(client).len() <= finals_before {
        assert!(Instant::now() < deadline, "no reply; events: {:#?}", client.events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = finals(client)[finals_before]["text"].as_str().unwrap().to_owned();
    let named: usize = text.trim_start_matches("tone ").trim().parse().expect("tone <k>");
    // The audio plays out in real time after the transcript is final: wait until it has.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let heard = client.inbox.lock().unwrap().agent_pcm.len() - heard_before;
        if heard >= 38_000 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pcm = client.inbox.lock().unwrap().agent_pcm[heard_before..].to_vec();
    assert!(pcm.len() >= 30_000, "session asking for tone {named} heard only {} samples", pcm.len());
    (named, loudest_tone(&pcm, SESSIONS + SESSIONS / 2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sessions_share_one_udp_port_and_each_hears_only_its_own_agent() {
    fifty_sessions_on_one_port(PeerDriver::Task).await;
}

/// The same with `media.peer_driver = "loop"`: one loop drives every peer on the one socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_sessions_in_the_peer_loop_share_its_socket_and_each_hears_only_its_own_agent() {
    fifty_sessions_on_one_port(PeerDriver::Loop).await;
}

async fn fifty_sessions_on_one_port(driver: PeerDriver) {
    let _serial = SERIAL.lock().await;
    let replies = (0..SESSIONS + SESSIONS / 2).map(|k| Reply::Speech { text: format!("tone {k}"), audio: tone(k) });
    let fake = FakeOpenAi::start(FakeOptions::default(), replies.collect()).await;
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ts = TestServer::start_openai(&fake.url(), |c| {
        c.media.udp_port = Some(port);
        c.media.peer_driver = driver;
    })
    .await;

    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..SESSIONS / 10 {
        let batch = join_all((0..10).map(|_| async {
            let (id, token, offer_url) = ts.create_session().await;
            (id, token.clone(), TestClient::connect(&ts, &offer_url, &token).await)
        }))
        .await;
        for (id, token, client) in batch {
            assert!(client.answer.contains(&format!(" 127.0.0.1 {port} typ host")), "{}", client.answer);
            ids.push((id, token));
            clients.push(client);
        }
    }
    for c in &clients {
        c.wait_event("session.ready", Duration::from_secs(30), |e| e["type"] == "session.ready").await;
    }
    // One media socket on the server's side: the clients hold one each, the server one in all.
    let sockets = own_udp_sockets();
    assert_eq!(sockets.iter().filter(|a| a.port() == port).count(), 1, "{sockets:?}");
    assert_eq!(sockets.len(), SESSIONS + 1, "50 client sockets and the shared one: {sockets:?}");

    let answers = join_all(clients.iter().map(|c| ask(c, 0))).await;
    let mut named: Vec<usize> = Vec::new();
    for (i, (name, heard)) in answers.iter().enumerate() {
        assert_eq!(name, heard, "session {i} read `tone {name}` but heard tone {heard}");
        named.push(*name);
    }
    named.sort_unstable();
    named.dedup();
    assert_eq!(named.len(), SESSIONS, "every session got its own reply");

    // Half of the sessions end; the other half keeps talking over the same port.
    for ((id, token), client) in ids.iter().zip(&clients).take(SESSIONS / 2) {
        let res = ts.http.delete(format!("{}/v1/sessions/{id}", ts.base)).bearer_auth(token).send().await.unwrap();
        assert_eq!(res.status(), 200);
        client.close().await;
    }
    let survivors = &clients[SESSIONS / 2..];
    let answers = join_all(survivors.iter().map(|c| ask(c, 1))).await;
    for (name, heard) in answers {
        assert_eq!(name, heard, "after the others ended: read `tone {name}`, heard tone {heard}");
        assert!(name >= SESSIONS, "a reply of the second round");
    }
    let sockets = own_udp_sockets();
    assert_eq!(sockets.iter().filter(|a| a.port() == port).count(), 1, "the shared socket stays: {sockets:?}");
    if driver == PeerDriver::Loop {
        // The ended sessions' peers left the loop; the survivors are still in it.
        let peers = ts.metric("kotodama_peer_loop_peers").await;
        assert_eq!(peers as usize, SESSIONS - SESSIONS / 2, "peers in the loop after half ended");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_shared_port_a_candidate_less_offer_connects_and_ice_restarts() {
    candidate_less_offer_and_ice_restart(PeerDriver::Task).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_peer_loop_a_candidate_less_offer_connects_and_ice_restarts() {
    candidate_less_offer_and_ice_restart(PeerDriver::Loop).await;
}

async fn candidate_less_offer_and_ice_restart(driver: PeerDriver) {
    let _serial = SERIAL.lock().await;
    // Peer-reflexive learning: the server knows the client only from its checks, routed by ufrag.
    let net = ClientNet { offer_candidates: false, ..ClientNet::default() };
    let (ts, port, token, mut client) = client_over_shared_port(net, driver).await;
    client.wait_event("session.ready", Duration::from_secs(15), |e| e["type"] == "session.ready").await;
    reply_heard(&client, 0).await;

    // The restarted generation has a new server ufrag: the mux routes it to the same peer.
    let restarted = common::ice::restart_ice(&client, &ts.base, &ts.http, &token).await;
    assert_eq!(restarted.status, 200, "{}", restarted.sdpfrag);
    assert!(restarted.sdpfrag.contains(&format!(" 127.0.0.1 {port} typ host")), "{}", restarted.sdpfrag);
    client
        .silence_until("the first reply to end", Duration::from_secs(20), |evs| {
            evs.iter().rfind(|e| e["type"] == "state").is_some_and(|e| e["state"] == "listening")
        })
        .await;
    let before = client.inbox.lock().unwrap().agent_pcm.len();
    reply_heard(&client, before).await;
    client.close().await;
}

/// A server whose sessions all use one free UDP port (`media.udp_port`), and a client of a new
/// session connected to it over `net`: (server, port, the session's token, client).
async fn client_over_shared_port(net: ClientNet, driver: PeerDriver) -> (TestServer, u16, String, TestClient) {
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let ts = TestServer::start_with(|c| {
        c.media.udp_port = Some(port);
        c.media.peer_driver = driver;
    })
    .await;
    let (_, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect_on(&net, &ts.base, &ts.http, &offer_url, &token).await;
    (ts, port, token, client)
}

/// Type a message; wait until 2 s more of the agent's voice than `before` samples was heard.
async fn reply_heard(c: &TestClient, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    c.send_text(r#"{"type":"text","text":"hello"}"#).await;
    while c.inbox.lock().unwrap().agent_pcm.len() < before + 48_000 * 2 {
        assert!(Instant::now() < deadline, "no agent audio; events: {:#?}", c.events());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_udp_connects_over_ice_tcp_on_the_same_port() {
    let _serial = SERIAL.lock().await;
    let (_ts, port, _, client) =
        client_over_shared_port(ClientNet { tcp_only: true, ..ClientNet::default() }, PeerDriver::Task).await;
    assert!(
        client.answer.contains(" tcp ")
            && client.answer.contains(&format!(" 127.0.0.1 {port} typ host tcptype passive")),
        "{}",
        client.answer
    );
    client.wait_event("session.ready", Duration::from_secs(15), |e| e["type"] == "session.ready").await;
    let sctp = client.pc.sctp().await.expect("sctp transport");
    let pair = sctp.transport().ice_transport().get_selected_candidate_pair().await.unwrap().expect("selected pair");
    assert_eq!(pair.remote().port, port, "selected pair {pair}");
    assert_eq!(pair.local().protocol, webrtc::peer_connection::RTCIceProtocol::Tcp, "selected pair {pair}");
    reply_heard(&client, 0).await;
    client.close().await;
}
