//! Debian's `simple-whip-client` (`/usr/bin/whip-client`, GStreamer webrtcbin + libnice, RSA DTLS
//! certificate, no BUNDLE group, trickle over PATCH with `If-Match`) publishes eSpeak NG speech to
//! a character, and a webrtc-rs WHEP player hears the scripted character answer.
//!
//! Two workarounds for Debian 12, both local to this test (neither touches the client):
//! - whip-client links libsoup 2 while libnice's UPnP (libgupnp-igd -> libgupnp 1.6) pulls in
//!   libsoup 3, and libsoup aborts at start ("libsoup2 symbols detected"). A stub
//!   `libgupnp-igd-1.0.so.4` (four no-op functions, compiled here with `cc`) is found first through
//!   `LD_LIBRARY_PATH`, so libsoup 3 is never loaded; libnice then runs without UPnP port mapping,
//!   which nothing here needs.
//! - libnice does not send to 127.0.0.1 from the same host, so the client runs in its own network
//!   namespace joined by a veth pair, and the server listens on the pair's address.
//!
//! Needs root (`ip netns`), `simple-whip-client` and the GStreamer plugins (.ci/setup.sh installs
//! them) and a C compiler.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::server_on_veth;
use common::whip::*;
use common::*;

const API_KEY: &str = "whip-gstreamer-test-api-key";

/// The stub `libgupnp-igd-1.0.so.4` in a fresh directory (for `LD_LIBRARY_PATH`).
fn igd_stub() -> std::path::PathBuf {
    let dir = temp_dir("igd-stub");
    let src = dir.join("igd_stub.c");
    std::fs::write(
        &src,
        "/* No UPnP: stands in for libgupnp-igd so libnice does not load libsoup 3. */\n\
         void *gupnp_simple_igd_thread_new(void) { return 0; }\n\
         unsigned long gupnp_simple_igd_get_type(void) { return 80; /* G_TYPE_OBJECT */ }\n\
         void gupnp_simple_igd_add_port(void *a, const char *p, unsigned short e, const char *l,\n\
             unsigned short lp, unsigned int t, const char *d) {}\n\
         void gupnp_simple_igd_remove_port_local(void *a, const char *p, const char *l, unsigned short lp) {}\n",
    )
    .unwrap();
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-Wl,-soname,libgupnp-igd-1.0.so.4", "-o"])
        .arg(dir.join("libgupnp-igd-1.0.so.4"))
        .arg(&src)
        .output()
        .expect("a C compiler (cc; .ci/setup.sh installs build-essential)");
    assert!(out.status.success(), "stub build: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

#[cfg(feature = "local")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gstreamer_simple_whip_client_publishes_and_a_whep_player_hears_the_character() {
    assert!(
        std::path::Path::new("/usr/bin/whip-client").exists(),
        "/usr/bin/whip-client is missing: run ./test.sh (apt-get install simple-whip-client)"
    );
    let (ns, _, ts) = server_on_veth(API_KEY).await;
    let stub = igd_stub();

    // The microphone: 4 s of silence (connecting), the question, 12 s of silence for the reply.
    let speech = tokio::task::spawn_blocking(|| espeak_48k("Hello! Who is on the show tonight?")).await.unwrap();
    let mut mic = vec![0i16; 48_000 * 4];
    mic.extend_from_slice(&speech);
    mic.extend(std::iter::repeat_n(0i16, 48_000 * 12));
    let wav = temp_dir("whip-gst").join("mic.wav");
    std::fs::write(&wav, media::wav::to_bytes(media::PcmRef::new(48_000, &mic))).unwrap();
    let pipeline = format!(
        "filesrc location={} ! wavparse ! identity sync=true ! audioconvert ! audioresample ! queue ! \
         opusenc ! rtpopuspay pt=100 ! queue ! application/x-rtp,media=audio,encoding-name=OPUS,payload=100",
        wav.display()
    );
    let log = temp_dir("whip-gst").join("whip-client.log");
    let mut client = Command::new("ip")
        .args(["netns", "exec", &ns.name, "env"])
        .arg(format!("LD_LIBRARY_PATH={}", stub.display()))
        .args(["whip-client", "-o", "-l", "5", "-t", API_KEY, "-u"])
        .arg(format!("{}/v1/characters/aiko/whip", ts.base))
        .args(["-A", &pipeline])
        .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
        .stderr(Stdio::null())
        .spawn()
        .expect("whip-client starts");
    let client_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // The publisher's session appears and connects (DTLS with its RSA certificate).
    let deadline = Instant::now() + Duration::from_secs(20);
    let id = loop {
        let live = ts.server.manager().live_ids();
        if let Some(id) = live.first()
            && ts.server.manager().get(id).is_some_and(|s| s.phase() == kotodama::session::SessionState::Connected)
        {
            break id.clone();
        }
        assert!(Instant::now() < deadline, "whip-client connected; its log:\n{}", client_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(client_log().contains("201"), "whip-client got 201: {}", client_log());

    // A player in our namespace (any interface, so it reaches the server on the veth).
    let net = ClientNet { udp_addrs: vec!["0.0.0.0:0".parse().unwrap()], ..ClientNet::default() };
    let player = play_on(&net, &ts.base, &ts.http, &format!("/v1/sessions/{id}"), Some(API_KEY), true).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let done = |evs: &[serde_json::Value]| {
        evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
            && back_to_listening(1)(evs)
    };
    while !done(&player.events()) {
        assert!(
            Instant::now() < deadline,
            "the reply reached the player: {:#?}\nwhip-client:\n{}",
            player.events(),
            client_log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ts.recorder.turns().len(), 1, "GStreamer's speech was one user turn");
    let heard = player.heard();
    let span = speech_span(&heard, 48_000, 500.0).expect("the player heard the reply");
    eprintln!("measured: simple-whip-client -> WHEP player heard {:.2} s of voice", (span.1 - span.0).as_secs_f64());
    assert!(span.1 - span.0 > Duration::from_secs(1), "heard {:?}", span.1 - span.0);

    // SIGINT: whip-client DELETEs its resource and the session ends.
    // SAFETY: signalling the child we spawned, by its pid.
    unsafe { libc::kill(client.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while ts.server.manager().get(&id).unwrap().phase() != kotodama::session::SessionState::Ended {
        assert!(Instant::now() < deadline, "whip-client's DELETE ended the session:\n{}", client_log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = client.kill();
    let _ = client.wait();
    let _ = player.pc.close().await;
}
