//! Test harness: the kotodama server in-process on loopback, and a real webrtc-rs client peer
//! that speaks Opus (real libopus) and records what it hears and every event it receives.
#![allow(dead_code)]

pub mod browser;
pub mod client_peer;
pub mod coturn;
pub mod energy_vad;
pub mod fake_gemini;
pub mod fake_nova;
pub mod fake_openai;
pub mod fake_openai_http;
pub mod ice;
pub mod listen;
pub mod netns;
pub mod ssrc_switch;
pub mod whip;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kotodama::config::Config;
use kotodama::providers::RealtimeProvider;
use kotodama::providers::scripted::{ScriptRecorder, ScriptedConfig, ScriptedProvider};
use kotodama::server::RunningServer;
use serde_json::Value;
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionEventHandler, RTCIceGatheringState, RTCPeerConnectionState, RTCSessionDescription,
};

pub use self::client_peer::ClientNet;
use self::client_peer::{GatheringDone, MicSender, OPUS_PT, answered_opus_pt, client_peer_on};

pub const SAMPLE_RATE: u32 = 48_000;
pub const FRAME: usize = 960; // 20 ms at 48 kHz

/// Read a 16-bit mono WAV from tests/data.
pub fn wav(name: &str) -> (u32, Vec<i16>) {
    let path = format!("{}/tests/data/{name}", env!("CARGO_MANIFEST_DIR"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let pcm = media::wav::parse(&bytes).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    (pcm.rate_hz, pcm.samples)
}

/// RMS of a slice.
pub use media::pcm::rms;

/// A fake provider server on a free loopback port: its address, the path of its WebSocket
/// endpoint, its options, its state (the script) and one log per connection, shared by the tasks
/// that serve its connections. Each WebSocket fake (`fake_openai`, `fake_gemini`) is this with its
/// own state `S`, options `O` and connection log `C`.
pub struct FakeServer<S, O, C> {
    pub addr: SocketAddr,
    path: &'static str,
    pub(crate) state: Arc<Mutex<S>>,
    pub(crate) opts: Arc<O>,
    conns: Arc<Mutex<Vec<C>>>,
}

impl<S, O, C> Clone for FakeServer<S, O, C> {
    fn clone(&self) -> Self {
        let (state, opts, conns) = (Arc::clone(&self.state), Arc::clone(&self.opts), Arc::clone(&self.conns));
        Self { addr: self.addr, path: self.path, state, opts, conns }
    }
}

impl<S: Send + 'static, O: Send + Sync + 'static, C: Clone + Send + 'static> FakeServer<S, O, C> {
    /// Listen on a free loopback port for the WebSocket endpoint at `path` (`/v1/realtime`);
    /// every accepted TCP connection is handed to `serve` on a task of its own (the fakes' accept
    /// loop).
    pub async fn listen<Fut>(
        state: S,
        opts: O,
        path: &'static str,
        serve: impl Fn(Self, tokio::net::TcpStream) -> Fut + Send + 'static,
    ) -> Self
    where
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (state, opts) = (Arc::new(Mutex::new(state)), Arc::new(opts));
        let fake = Self { addr, path, state, opts, conns: Arc::default() };
        let f = fake.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(serve(f.clone(), tcp));
            }
        });
        fake
    }

    /// The URL to configure for the provider: `ws://{addr}{path}`.
    pub fn url(&self) -> String {
        format!("ws://{}{}", self.addr, self.path)
    }

    /// Every connection's log so far.
    pub fn conns(&self) -> Vec<C> {
        self.conns.lock().unwrap().clone()
    }

    /// Connection `i`'s log (panics when it was never opened).
    pub fn conn(&self, i: usize) -> C {
        self.conns().get(i).cloned().unwrap_or_else(|| panic!("connection {i} was never opened"))
    }

    /// Log a connection that was opened; its index.
    pub(crate) fn open_conn(&self, log: C) -> usize {
        let mut conns = self.conns.lock().unwrap();
        conns.push(log);
        conns.len() - 1
    }

    /// Change connection `i`'s log.
    pub(crate) fn with_conn<R>(&self, i: usize, f: impl FnOnce(&mut C) -> R) -> R {
        f(&mut self.conns.lock().unwrap()[i])
    }
}

/// The loudest 100 ms window's RMS.
pub fn peak_rms(s: &[i16], rate_hz: u32) -> f64 {
    let w = (rate_hz / 10) as usize;
    s.chunks(w).map(rms).fold(0.0, f64::max)
}

/// Start of the first and end of the last 20 ms window whose RMS passes `threshold`.
pub fn speech_span(s: &[i16], rate_hz: u32, threshold: f64) -> Option<(Duration, Duration)> {
    let w = (rate_hz / 50) as usize;
    let voiced: Vec<usize> = s.chunks(w).enumerate().filter(|(_, c)| rms(c) > threshold).map(|(i, _)| i).collect();
    let first = *voiced.first()?;
    let last = *voiced.last()?;
    Some((Duration::from_millis(first as u64 * 20), Duration::from_millis((last as u64 + 1) * 20)))
}

/// `text` spoken by eSpeak NG (the offline engine), resampled to the client's 48 kHz.
#[cfg(feature = "local")]
pub fn espeak_48k(text: &str) -> Vec<i16> {
    espeak_at(text, 48_000)
}

/// `text` spoken by eSpeak NG, resampled to `rate_hz`.
#[cfg(feature = "local")]
pub fn espeak_at(text: &str, rate_hz: u32) -> Vec<i16> {
    use kotodama::providers::cascade::local::espeak::Espeak;
    let (pcm, _) = Espeak::global().expect("espeak-ng").synthesize_blocking(text, "en-us").expect("synthesis");
    let mut r = media::Resampler::new(pcm.rate_hz, rate_hz, media::Alignment::Trimmed).expect("resampler");
    let mut out = Vec::new();
    r.process(&pcm.samples, &mut |s: &[i16]| out.extend_from_slice(s)).unwrap();
    r.flush(&mut |s: &[i16]| out.extend_from_slice(s)).unwrap();
    out
}

/// A fresh directory under the system temp dir (left for the OS to clean: tests may be killed).
pub fn temp_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "kotodama-test-{what}-{}-{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A fresh Postgres database on the machine's server (`KOTODAMA_TEST_POSTGRES_URL`, default
/// `postgres://postgres@127.0.0.1:5432/test`), dropped when this value is dropped.
pub struct PgTestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgTestDb {
    pub async fn create() -> PgTestDb {
        sqlx::any::install_default_drivers();
        let admin_url = std::env::var("KOTODAMA_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
        let name = format!("kotodama_t_{:016x}", rand::random::<u64>());
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("Postgres at {admin_url} (./test.sh starts it): {e}"));
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str()).await.expect("create database");
        let _ = sqlx::Connection::close(conn).await;
        let base = admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).unwrap_or(admin_url.clone());
        PgTestDb { url: format!("{base}/{name}"), admin_url, name }
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // A runtime of its own: Drop may run inside or outside one.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                if let Ok(mut conn) = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin_url).await {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::Executor::execute(&mut conn, sql.as_str()).await;
                }
            })
        })
        .join();
    }
}

/// Spawn the node `cmd` (the binary with its `serve` arguments and environment) in `dir`, its
/// output to the file `log`, and wait until `http://127.0.0.1:<port>` answers `/readyz` 200
/// (panics with the log after a generous minute). Returns the child and its base URL.
pub async fn spawn_node(
    mut cmd: std::process::Command,
    dir: &std::path::Path,
    log: &std::path::Path,
    port: u16,
) -> (std::process::Child, String) {
    let file = std::fs::File::create(log).unwrap();
    let child = cmd.current_dir(dir).stdout(file.try_clone().unwrap()).stderr(file).spawn().expect("spawn kotodama");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status() == 200
        {
            return (child, base);
        }
        assert!(Instant::now() < deadline, "node not ready: {}", std::fs::read_to_string(log).unwrap_or_default());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A random key prefix for Redis, so parallel tests never see each other's keys.
pub fn redis_prefix() -> String {
    format!("kotodama-test-{:016x}:", rand::random::<u64>())
}

/// GET `url` with `Authorization: Bearer <token>` (a session token or an API key), as JSON.
pub async fn get_json(http: &reqwest::Client, url: &str, token: &str) -> Value {
    let res = http.get(url).bearer_auth(token).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    res.json().await.unwrap_or_else(|e| panic!("GET {url}: not JSON: {e}"))
}

/// POST /v1/sessions `{}` on the server at `base` (with an API key when given): the response body
/// (`session_id`, `token`, `offer_url`, ...).
pub async fn create_session_at(http: &reqwest::Client, base: &str, api_key: Option<&str>) -> Value {
    let mut req = http.post(format!("{base}/v1/sessions")).json(&serde_json::json!({}));
    if let Some(key) = api_key {
        req = req.bearer_auth(key);
    }
    req.send().await.unwrap().json().await.unwrap()
}

/// A transcript (`GET /v1/sessions/{id}/transcript`) as `(role, text, interrupted)` per turn.
pub fn transcript_turns(transcript: &Value) -> Vec<(String, String, bool)> {
    let turns = transcript.as_array().unwrap_or_else(|| panic!("a transcript is an array: {transcript}"));
    turns
        .iter()
        .map(|t| (t["role"].as_str().unwrap().into(), t["text"].as_str().unwrap().into(), t["interrupted"] == true))
        .collect()
}

/// The `session_id` and `token` of a [`create_session_at`] body.
pub fn id_and_token(created: &Value) -> (String, String) {
    (created["session_id"].as_str().unwrap().to_owned(), created["token"].as_str().unwrap().to_owned())
}

/// The agent has been `speaking` at least `n_speaking` times and the state is back to `listening`.
pub fn back_to_listening(n_speaking: usize) -> impl Fn(&[Value]) -> bool {
    move |evs| {
        let states: Vec<&Value> = evs.iter().filter(|e| e["type"] == "state").collect();
        states.last().is_some_and(|e| e["state"] == "listening")
            && states.iter().filter(|e| e["state"] == "speaking").count() >= n_speaking
    }
}

/// When the first event matching `pred` arrived in `log`.
pub fn event_at(log: &[Received], pred: impl Fn(&Value) -> bool) -> Option<Instant> {
    log.iter().find_map(|r| match r {
        Received::Event { at, event } if pred(event) => Some(*at),
        _ => None,
    })
}

/// A server in-process with the scripted provider and a recorder of what the provider received.
pub struct TestServer {
    pub server: RunningServer,
    pub recorder: Arc<ScriptRecorder>,
    pub base: String,
    pub http: reqwest::Client,
}

impl TestServer {
    /// The value of the unlabelled metric `name` in `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.base)).send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok()).unwrap_or(0.0)
    }

    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    /// The scripted provider (with a recorder) as the default provider; `tweak` adjusts the config.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let recorder = Arc::new(ScriptRecorder::default());
        let rec = Arc::clone(&recorder);
        let mut ts = Self::start_with_providers(
            |config| {
                config.provider = Some("scripted".into());
                config.scripted.response_delay_ms = 100;
                tweak(config);
            },
            move |config| {
                let mut script = ScriptedConfig::builtin().expect("builtin script");
                script.response_delay = Duration::from_millis(config.scripted.response_delay_ms);
                let mut providers =
                    vec![Arc::new(ScriptedProvider::new(script).with_recorder(rec)) as Arc<dyn RealtimeProvider>];
                if config.openai_configured() {
                    providers.push(Arc::new(kotodama::providers::openai::OpenAiProvider::new(config.openai.clone())));
                }
                providers
            },
        )
        .await;
        ts.recorder = recorder;
        ts
    }

    /// A server with the providers `make` builds from the (tweaked) config; new sessions use
    /// `config.provider` (set it to one of them).
    pub async fn start_with_providers(
        tweak: impl FnOnce(&mut Config),
        make: impl FnOnce(&Config) -> Vec<Arc<dyn RealtimeProvider>>,
    ) -> TestServer {
        let mut config = Config {
            bind: "127.0.0.1:0".parse().unwrap(),
            database_url: format!("sqlite://{}/kotodama.db", temp_dir("store").display()),
            ..Config::default()
        };
        config.scripted.response_delay_ms = 100;
        // `KOTODAMA_TEST_PEER_DRIVER=loop`: every in-process server of the suite runs its peers on
        // the peer loop (a test that sets a driver or a port range itself keeps it).
        if std::env::var("KOTODAMA_TEST_PEER_DRIVER").is_ok_and(|v| v == "loop") {
            config.media.peer_driver = kotodama::config::PeerDriver::Loop;
        }
        tweak(&mut config);
        if config.media.udp_ports.is_some() {
            config.media.peer_driver = kotodama::config::PeerDriver::Task;
        }
        config.validate().expect("test config valid");
        let providers = make(&config);
        let server = kotodama::server::start(config, providers).await.expect("server starts");
        let base = format!("http://{}", server.addr());
        TestServer { server, recorder: Arc::new(ScriptRecorder::default()), base, http: reqwest::Client::new() }
    }

    /// A server whose sessions use the OpenAI provider pointed at `url` (a fake), the scripted
    /// provider also available (failover); `tweak` adjusts the rest.
    pub async fn start_openai(url: &str, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let url = url.to_owned();
        Self::start_with(move |c| {
            c.openai.url = url;
            c.openai.api_key = Some(kotodama::config::Secret::new("sk-test-key"));
            c.provider = Some("openai".into());
            tweak(c);
        })
        .await
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// GET /v1/sessions/{id} with the session's token, as JSON.
    pub async fn session_json(&self, id: &str, token: &str) -> Value {
        get_json(&self.http, &format!("{}/v1/sessions/{id}", self.base), token).await
    }

    /// GET /v1/sessions/{id}/transcript with the session's token, as JSON.
    pub async fn transcript_json(&self, id: &str, token: &str) -> Value {
        get_json(&self.http, &format!("{}/v1/sessions/{id}/transcript", self.base), token).await
    }

    /// POST /v1/sessions: (session_id, token, offer_url).
    pub async fn create_session(&self) -> (String, String, String) {
        let res =
            self.http.post(format!("{}/v1/sessions", self.base)).json(&serde_json::json!({})).send().await.unwrap();
        assert_eq!(res.status(), 201, "POST /v1/sessions");
        let v: Value = res.json().await.unwrap();
        (
            v["session_id"].as_str().unwrap().to_owned(),
            v["token"].as_str().unwrap().to_owned(),
            v["offer_url"].as_str().unwrap().to_owned(),
        )
    }
}

/// What the client received, in arrival order.
#[derive(Debug, Clone)]
pub enum Received {
    /// An agent audio packet, decoded.
    Audio { at: Instant, samples: usize, rms: f64, marker: bool, rtp_ts: u32 },
    /// A data-channel event.
    Event { at: Instant, event: Value },
}

#[derive(Default)]
pub struct Inbox {
    pub log: Vec<Received>,
    pub agent_pcm: Vec<i16>,
    /// Connection states, in order.
    pub states: Vec<RTCPeerConnectionState>,
    /// Opus DTX frames received (not decoded, not in `log` or `agent_pcm`).
    pub dtx_frames: u64,
}

/// A real WebRTC client peer.
pub struct TestClient {
    pub pc: Arc<dyn PeerConnection>,
    pub dc: Arc<dyn DataChannel>,
    pub inbox: Arc<Mutex<Inbox>>,
    mic: MicSender,
    encoder: opus::Encoder,
    pub answer: String,
    pub location: String,
    pub etag: String,
    pub sent_samples: usize,
}

struct ClientHandler {
    inbox: Arc<Mutex<Inbox>>,
    gathered: GatheringDone,
    state_tx: mpsc::UnboundedSender<RTCPeerConnectionState>,
}

fn ib_dtx(inbox: &Mutex<Inbox>) {
    inbox.lock().unwrap().dtx_frames += 1;
}

#[async_trait::async_trait]
impl PeerConnectionEventHandler for ClientHandler {
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        self.gathered.on_state(state);
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        self.inbox.lock().unwrap().states.push(state);
        let _ = self.state_tx.send(state);
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let inbox = Arc::clone(&self.inbox);
        tokio::spawn(async move {
            let mut decoder = opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono).unwrap();
            let mut pcm = vec![0i16; 5760];
            while let Some(ev) = track.poll().await {
                if let TrackRemoteEvent::OnRtpPacket(p) = ev {
                    if p.payload.len() <= media::DTX_MAX_BYTES {
                        // An Opus DTX frame (the server's pauses): comfort noise, no agent audio,
                        // as libwebrtc's NetEq takes it.
                        ib_dtx(&inbox);
                        continue;
                    }
                    let n = decoder.decode(&p.payload, &mut pcm, false).unwrap_or(0);
                    let mut ib = inbox.lock().unwrap();
                    let r = rms(&pcm[..n]);
                    ib.agent_pcm.extend_from_slice(&pcm[..n]);
                    ib.log.push(Received::Audio {
                        at: Instant::now(),
                        samples: n,
                        rms: r,
                        marker: p.header.marker,
                        rtp_ts: p.header.timestamp,
                    });
                }
            }
        });
    }
}

/// A client peer before its answer: (peer, `events` channel, mic track, its SSRC, inbox, offer SDP).
pub type ClientParts = (
    Arc<dyn PeerConnection>,
    Option<Arc<dyn DataChannel>>,
    Option<Arc<TrackLocalStaticRTP>>,
    u32,
    Arc<Mutex<Inbox>>,
    String,
);

/// Build a client peer and its offer (with candidates). `with_audio` / `with_dc` allow building
/// offers the server must reject.
pub async fn client_offer(with_audio: bool, with_dc: bool) -> ClientParts {
    client_offer_on(&ClientNet::default(), with_audio, with_dc).await
}

/// [`client_offer`] on the network `net` describes.
pub async fn client_offer_on(net: &ClientNet, with_audio: bool, with_dc: bool) -> ClientParts {
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let (gathered, grx) = GatheringDone::new();
    let (state_tx, _state_rx) = mpsc::unbounded_channel();
    let handler = Arc::new(ClientHandler { inbox: Arc::clone(&inbox), gathered, state_tx });
    let p = client_peer_on(net, handler, grx, with_audio, with_dc).await.unwrap();
    (p.pc, p.dc, p.track, p.ssrc, inbox, p.offer)
}

/// Log every message of `dc` (JSON events) into `inbox`, on a task of its own.
pub fn read_events(dc: Arc<dyn DataChannel>, inbox: Arc<Mutex<Inbox>>) {
    tokio::spawn(async move {
        while let Some(ev) = dc.poll().await {
            if let DataChannelEvent::OnMessage(m) = ev {
                let v: Value = serde_json::from_slice(&m.data).unwrap_or(Value::Null);
                inbox.lock().unwrap().log.push(Received::Event { at: Instant::now(), event: v });
            }
        }
    });
}

/// Poll `events` (a client's events so far) every 10 ms until one matches `pred`; returns it.
/// Panics after `timeout`, naming `what` and listing the events.
pub async fn wait_event_in(
    what: &str,
    timeout: Duration,
    events: impl Fn() -> Vec<Value>,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = events().into_iter().find(|v| pred(v)) {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; events so far: {:#?}", events());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The events logged in `inbox` so far.
pub fn events_of(inbox: &Mutex<Inbox>) -> Vec<Value> {
    inbox
        .lock()
        .unwrap()
        .log
        .iter()
        .filter_map(|r| match r {
            Received::Event { event, .. } => Some(event.clone()),
            _ => None,
        })
        .collect()
}

impl TestClient {
    /// Create a session on `ts` and connect to it; returns once the offer is answered.
    pub async fn connect(ts: &TestServer, offer_url: &str, token: &str) -> TestClient {
        Self::connect_to(&ts.base, &ts.http, offer_url, token).await
    }

    /// Connect to the session of `offer_url` on the server at `base` (any process).
    pub async fn connect_to(base: &str, http: &reqwest::Client, offer_url: &str, token: &str) -> TestClient {
        Self::connect_with(&ClientNet::default(), base, http, offer_url, token, |sdp| sdp).await
    }

    /// [`TestClient::connect_to`] on the network `net` describes.
    pub async fn connect_on(
        net: &ClientNet,
        base: &str,
        http: &reqwest::Client,
        offer_url: &str,
        token: &str,
    ) -> TestClient {
        Self::connect_with(net, base, http, offer_url, token, |sdp| sdp).await
    }

    /// [`TestClient::connect_on`], posting `munge(offer)` instead of the client's own offer (the
    /// client keeps its real local description).
    pub async fn connect_with(
        net: &ClientNet,
        base: &str,
        http: &reqwest::Client,
        offer_url: &str,
        token: &str,
        munge: impl FnOnce(String) -> String,
    ) -> TestClient {
        let (pc, dc, track, ssrc, inbox, sdp) = client_offer_on(net, true, true).await;
        let url = format!("{base}{offer_url}");
        let (status, headers, answer) = whip::post_sdp(http, &url, Some(token), munge(sdp)).await;
        assert_eq!(status, 201, "offer answered: {answer}");
        let client = TestClient::answered((pc, dc, track, ssrc, inbox), answer, &headers).await;
        if net.tcp_only {
            // webrtc-rs dials only passive candidates it is handed one by one (not those of the
            // SDP), so hand them over as a browser's stack would have taken them.
            for line in client.answer.lines().filter(|l| l.contains(" tcptype passive") && l.contains(" 1 tcp ")) {
                let init = webrtc::peer_connection::RTCIceCandidateInit {
                    candidate: line.trim_start_matches("a=").trim_end().to_owned(),
                    sdp_mid: Some("0".into()),
                    ..Default::default()
                };
                client.pc.add_ice_candidate(init).await.unwrap();
            }
        }
        read_events(Arc::clone(&client.dc), Arc::clone(&client.inbox));
        client
    }

    /// The client of an answered offer: `answer` set as its remote description, the microphone
    /// sending on the answered Opus payload type, `location` and `etag` from the answer's
    /// `headers`. Without a data channel (a WHIP publisher) it holds one that never opens.
    pub async fn answered(
        (pc, dc, track, ssrc, inbox): (
            Arc<dyn PeerConnection>,
            Option<Arc<dyn DataChannel>>,
            Option<Arc<TrackLocalStaticRTP>>,
            u32,
            Arc<Mutex<Inbox>>,
        ),
        answer: String,
        headers: &reqwest::header::HeaderMap,
    ) -> TestClient {
        pc.set_remote_description(RTCSessionDescription::answer(answer.clone()).unwrap()).await.unwrap();
        let dc = match dc {
            Some(dc) => dc,
            None => pc.create_data_channel("unused", None).await.unwrap(),
        };
        let pt = answered_opus_pt(&answer).unwrap_or(OPUS_PT);
        let mut encoder = opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip).unwrap();
        encoder.set_inband_fec(true).unwrap();
        TestClient {
            pc,
            dc,
            inbox,
            mic: MicSender::new(track.expect("a microphone track"), ssrc, pt),
            encoder,
            answer,
            location: whip::header(headers, "location"),
            etag: whip::header(headers, "etag"),
            sent_samples: 0,
        }
    }

    /// Wait until an event matching `pred` has arrived; returns it.
    pub async fn wait_event(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        wait_event_in(what, timeout, || self.events(), pred).await
    }

    /// Events received so far.
    pub fn events(&self) -> Vec<Value> {
        events_of(&self.inbox)
    }

    /// Encode and send one 20 ms frame (960 samples at 48 kHz) as RTP.
    pub async fn send_frame(&mut self, frame: &[i16]) {
        let mut out = [0u8; 1500];
        let n = self.encoder.encode(frame, &mut out).expect("encode");
        self.send_payload(Bytes::copy_from_slice(&out[..n])).await;
        self.sent_samples += frame.len();
    }

    /// Send a raw payload as the next RTP packet (for hostile-input tests).
    pub async fn send_payload(&mut self, payload: Bytes) {
        self.mic.send(payload).await;
    }

    /// Send `samples` (48 kHz) in real time, one frame per 20 ms (padded with silence).
    pub async fn speak(&mut self, samples: &[i16]) {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        for chunk in samples.chunks(FRAME) {
            tick.tick().await;
            let mut frame = [0i16; FRAME];
            frame[..chunk.len()].copy_from_slice(chunk);
            self.send_frame(&frame).await;
        }
    }

    /// Speak the test question (`tests/data/user_question.wav`), then send silence until `pred`
    /// holds for the received events (or `timeout`).
    pub async fn ask_until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let (_, question) = wav("user_question.wav");
        self.speak(&question).await;
        self.silence_until(what, timeout, pred).await;
    }

    /// After the user talked over the agent (from log position `from`): wait for
    /// `agent.interrupted`, then send silence until `stops` `user.speech_stopped` events in all.
    /// Returns the `agent.interrupted` event, the log, and when the interruption and the first
    /// speech stop after `from` arrived.
    pub async fn barge_in_window(
        &mut self,
        from: usize,
        what: &str,
        stops: usize,
    ) -> (Value, Vec<Received>, Instant, Instant) {
        let interrupted =
            self.wait_event("agent.interrupted", Duration::from_secs(5), |e| e["type"] == "agent.interrupted").await;
        self.silence_until(what, Duration::from_secs(10), |evs| {
            evs.iter().filter(|e| e["type"] == "user.speech_stopped").count() >= stops
        })
        .await;
        let log = self.log();
        let t_int = event_at(&log[from..], |e| e["type"] == "agent.interrupted").unwrap();
        let t_stop = event_at(&log[from..], |e| e["type"] == "user.speech_stopped").unwrap();
        (interrupted, log, t_int, t_stop)
    }

    /// Send silence in real time.
    pub async fn silence(&mut self, d: Duration) {
        let n = (d.as_millis() as usize / 20) * FRAME;
        self.speak(&vec![0i16; n]).await;
    }

    /// Silence as an Opus DTX sender sends it (`usedtx=1`): one packet every 400 ms in real time,
    /// contiguous sequence numbers, the timestamp advancing by 400 ms per packet; until `pred`
    /// holds for the received events (or `timeout`).
    pub async fn dtx_silence_until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        const DTX_INTERVAL: Duration = Duration::from_millis(400);
        let deadline = Instant::now() + timeout;
        let mut out = [0u8; 1500];
        loop {
            if pred(&self.events()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; events so far: {:#?}", self.events());
            let n = self.encoder.encode(&[0i16; FRAME], &mut out).unwrap();
            // `send_payload` adds one frame of timestamp: the rest of the 400 ms first.
            self.mic.skip((SAMPLE_RATE / 1000 * 400) - FRAME as u32);
            self.send_payload(Bytes::copy_from_slice(&out[..n])).await;
            tokio::time::sleep(DTX_INTERVAL).await;
        }
    }

    /// Send silence until `pred` holds for the received events (or `timeout`).
    pub async fn silence_until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            if pred(&self.events()) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; events so far: {:#?}", self.events());
            tick.tick().await;
            self.send_frame(&[0i16; FRAME]).await;
        }
    }

    pub async fn send_text(&self, text: &str) {
        self.dc.send_text(text).await.expect("data channel send");
    }

    pub fn log(&self) -> Vec<Received> {
        self.inbox.lock().unwrap().log.clone()
    }

    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

/// Number of open file descriptors of this process (sockets included).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}
