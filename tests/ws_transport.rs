//! The WebSocket transport (`GET /v1/sessions/{id}/ws`) end to end: a tokio-tungstenite client
//! speaks real speech (Opus through real libopus, or PCM16 at 16/24/48 kHz) to the in-process
//! server with the scripted provider, hears the reply, sees the api-v1 events, and the transcript
//! is stored; a client that never reads is closed with 1013; hostile input gets clear close codes
//! while another session keeps talking. Issue 15's seed 000 behaviours: images reach the fake
//! OpenAI server as `input_image` and the fake Gemini server as `realtimeInput.video` (oversized and
//! flooding frames get errors, a provider without images one error), agent transcripts are
//! translated by a fake chat server (typed text too, before the cascade's model), and a client's
//! playback report sets `agent.interrupted.played_ms`.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::listen::states;
use common::*;
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

type Sink = futures::stream::SplitSink<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    Message,
>;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Format {
    Opus,
    Pcm(u32),
}

impl Format {
    fn message(self) -> String {
        match self {
            Format::Opus => r#"{"type":"audio.format","codec":"opus"}"#.to_owned(),
            Format::Pcm(r) => format!(r#"{{"type":"audio.format","codec":"pcm16","rate_hz":{r}}}"#),
        }
    }
    fn rate(self) -> u32 {
        match self {
            Format::Opus => 48_000,
            Format::Pcm(r) => r,
        }
    }
}

#[derive(Default)]
struct WsInbox {
    events: Vec<(Instant, Value)>,
    /// Agent audio, decoded, at the format's rate.
    pcm: Vec<i16>,
    frames: Vec<(Instant, u16, u8)>,
    close: Option<u16>,
    bad_frames: usize,
}

struct WsClient {
    format: Format,
    sink: Sink,
    inbox: Arc<Mutex<WsInbox>>,
    enc: opus::Encoder,
    seq: u16,
}

fn ws_url(ts: &TestServer, id: &str, token: &str) -> String {
    format!("ws://{}/v1/sessions/{id}/ws?token={token}", ts.addr())
}

impl WsClient {
    async fn connect(ts: &TestServer, format: Format) -> (WsClient, String, String) {
        let (id, token, _) = ts.create_session().await;
        (Self::connect_to(ts.addr(), &id, &token, format).await, id, token)
    }

    /// A client of session `id` on the server at `addr`.
    async fn connect_to(addr: std::net::SocketAddr, id: &str, token: &str, format: Format) -> WsClient {
        let url = format!("ws://{addr}/v1/sessions/{id}/ws?token={token}");
        let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("upgrade");
        let (mut sink, stream) = ws.split();
        sink.send(Message::text(format.message())).await.unwrap();
        let inbox = Arc::new(Mutex::new(WsInbox::default()));
        tokio::spawn(read_loop(stream, format, Arc::clone(&inbox)));
        let enc = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip).unwrap();
        WsClient { format, sink, inbox, enc, seq: 0 }
    }

    fn events(&self) -> Vec<Value> {
        self.inbox.lock().unwrap().events.iter().map(|(_, e)| e.clone()).collect()
    }

    async fn wait_event(&self, what: &str, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        wait_event_in(what, timeout, || self.events(), pred).await
    }

    /// Send one 20 ms frame of 48 kHz audio (`pcm48`) in the client's format.
    async fn send_frame(&mut self, pcm: &[i16]) {
        let mut msg = vec![0x01, 0x00];
        msg.extend_from_slice(&self.seq.to_be_bytes());
        self.seq = self.seq.wrapping_add(1);
        match self.format {
            Format::Opus => {
                let mut out = [0u8; 1500];
                let n = self.enc.encode(pcm, &mut out).unwrap();
                msg.extend_from_slice(&out[..n]);
            }
            Format::Pcm(_) => msg.extend(pcm.iter().flat_map(|s| s.to_le_bytes())),
        }
        self.sink.send(Message::binary(msg)).await.unwrap();
    }

    /// Stream `samples` (at the format's rate) in real time, 20 ms per frame.
    async fn speak(&mut self, samples: &[i16]) {
        let n = (self.format.rate() / 50) as usize;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        for chunk in samples.chunks(n) {
            tick.tick().await;
            let mut frame = chunk.to_vec();
            frame.resize(n, 0);
            self.send_frame(&frame).await;
        }
    }

    async fn silence_until(&mut self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let n = (self.format.rate() / 50) as usize;
        let zeros = vec![0i16; n];
        let end = Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while !pred(&self.events()) {
            assert!(Instant::now() < end, "timed out waiting for {what}; events: {:?}", self.events());
            tick.tick().await;
            self.send_frame(&zeros).await;
        }
    }
}

async fn read_loop(
    mut stream: impl futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    format: Format,
    inbox: Arc<Mutex<WsInbox>>,
) {
    let mut dec = opus::Decoder::new(48_000, opus::Channels::Mono).unwrap();
    let mut pcm = vec![0i16; 5760];
    while let Some(Ok(msg)) = stream.next().await {
        let now = Instant::now();
        let mut ib = inbox.lock().unwrap();
        match msg {
            Message::Text(t) => ib.events.push((now, serde_json::from_str(&t).expect("events are JSON"))),
            Message::Binary(b) if b.len() >= 4 && b[0] == 0x01 => {
                ib.frames.push((now, u16::from_be_bytes([b[2], b[3]]), b[1]));
                match format {
                    Format::Opus => {
                        let n = dec.decode(&b[4..], &mut pcm, false).unwrap();
                        ib.pcm.extend_from_slice(&pcm[..n]);
                    }
                    Format::Pcm(_) => {
                        let s: Vec<i16> = b[4..].chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
                        ib.pcm.extend(s);
                    }
                }
            }
            Message::Binary(_) => ib.bad_frames += 1,
            Message::Close(f) => ib.close = Some(f.map_or(1005, |f| u16::from(f.code))),
            _ => {}
        }
    }
}

/// The user's question (48 kHz WAV) at `rate`.
fn question_at(rate: u32) -> Vec<i16> {
    let (r, q) = wav("user_question.wav");
    assert_eq!(r, 48_000);
    if rate == 48_000 {
        return q;
    }
    let mut rs = media::Resampler::new(48_000, rate, media::Alignment::Trimmed).unwrap();
    let mut out = Vec::new();
    rs.process(&q, &mut |c| out.extend_from_slice(c)).unwrap();
    rs.flush(&mut |c| out.extend_from_slice(c)).unwrap();
    out
}

fn scripted_reply() -> (u32, Vec<i16>) {
    let pcm = media::wav::parse(include_bytes!("../src/providers/scripted_reply.wav")).unwrap();
    (pcm.rate_hz, pcm.samples)
}

fn agent_final(evs: &[Value]) -> bool {
    evs.iter().any(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
}

fn back_to_listening(evs: &[Value]) -> bool {
    let states: Vec<&Value> = evs.iter().filter(|e| e["type"] == "state").collect();
    states.last().is_some_and(|e| e["state"] == "listening") && states.iter().any(|e| e["state"] == "speaking")
}

/// One full turn over `format`: (session id, token, events, agent audio at the format's rate).
async fn one_turn(ts: &TestServer, format: Format) -> (String, String, Vec<Value>, Vec<i16>) {
    let (c, id, token) = WsClient::connect(ts, format).await;
    let (evs, pcm) = talk(c).await;
    (id, token, evs, pcm)
}

/// The question and the whole reply over a connected client: (events, agent audio).
async fn talk(mut c: WsClient) -> (Vec<Value>, Vec<i16>) {
    let format = c.format;
    c.wait_event("session.ready", Duration::from_secs(10), |e| e["type"] == "session.ready").await;
    c.wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening").await;
    let question = question_at(format.rate());
    c.speak(&question).await;
    c.silence_until("the agent's final transcript", Duration::from_secs(40), agent_final).await;
    c.silence_until("back to listening", Duration::from_secs(20), back_to_listening).await;
    let pcm = c.inbox.lock().unwrap().pcm.clone();
    (c.events(), pcm)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_with_opus_and_pcm16_at_each_rate() {
    let ts = TestServer::start().await;
    let formats = [Format::Opus, Format::Pcm(16_000), Format::Pcm(24_000), Format::Pcm(48_000)];
    // All four at once: one session's transport does not disturb another's.
    let results = futures::future::join_all(formats.iter().map(|&f| one_turn(&ts, f))).await;
    let (reply_rate, reply) = scripted_reply();
    let reply_secs = reply.len() as f64 / f64::from(reply_rate);
    let mut transcripts = Vec::new();
    for (format, (id, token, evs, pcm)) in formats.iter().zip(&results) {
        let rate = format.rate();
        let heard = pcm.len() as f64 / f64::from(rate);
        assert!(
            (heard - reply_secs).abs() <= reply_secs * 0.1,
            "{format:?}: heard {heard:.2} s of agent audio; the reply is {reply_secs:.2} s"
        );
        let loud = peak_rms(pcm, rate);
        assert!(loud > 1000.0, "{format:?}: the agent's audio is speech (peak RMS {loud:.0})");
        let ty: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(ty[0], "session.ready", "{format:?}: {ty:?}");
        let states = states(&evs);
        assert_eq!(states, ["initializing", "listening", "thinking", "speaking", "listening"], "{format:?}");
        // Our VAD heard the question through this transport: its edges bracket the speech.
        let at = |t: &str| evs.iter().find(|e| e["type"] == t).map(|e| e["at_ms"].as_i64().unwrap());
        let (started, stopped) = (at("user.speech_started"), at("user.speech_stopped"));
        let vad_len = stopped.expect("speech_stopped") - started.expect("speech_started");
        let (_, q) = wav("user_question.wav");
        let (s0, s1) = speech_span(&q, 48_000, 300.0).unwrap();
        let true_len = (s1 - s0).as_millis() as i64;
        assert!(
            (vad_len - true_len).abs() < 400,
            "{format:?}: VAD saw {vad_len} ms of speech; the WAV has {true_len} ms"
        );
        assert!(ty.iter().filter(|t| **t == "viseme").count() > 50, "{format:?}: visemes with the audio");
        assert!(evs.iter().any(|e| e["type"] == "emotion" && e["emotion"] == "happy"), "{format:?}");
        // The provider heard the question: one committed turn per session, speech, not silence.
        let tr = ts.transcript_json(id, token).await;
        let rows: Vec<(String, String)> = tr
            .as_array()
            .expect("transcript array")
            .iter()
            .map(|r| (r["role"].as_str().unwrap().to_owned(), r["text"].as_str().unwrap().to_owned()))
            .collect();
        transcripts.push(rows);
    }
    // The recorder is shared by the four sessions: together it heard four questions of speech.
    let turns = ts.recorder.turns();
    let total: f64 = turns.iter().map(|t| t.total_samples as f64 / 24_000.0).sum();
    let (_, q) = wav("user_question.wav");
    let (s0, s1) = speech_span(&q, 48_000, 300.0).unwrap();
    assert!(total >= 4.0 * (s1 - s0).as_secs_f64(), "the provider heard {total:.2} s from four questions");
    assert!(turns.iter().any(|t| peak_rms(&t.samples, 24_000) > 1000.0), "the provider heard speech");
    assert!(transcripts[0].iter().any(|(role, text)| role == "agent" && text.starts_with("Hi! I am Aiko.")));
    assert!(transcripts.iter().all(|t| *t == transcripts[0]), "the same transcript stored: {transcripts:?}");
}

type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket over a client socket with a tiny MSS and receive buffer, so the server's send
/// buffer for it stays small (the kernel sizes it from the MSS) and a client that stops reading
/// backs the server up within a second of audio instead of megabytes.
async fn narrow_ws(ts: &TestServer, url: &str) -> RawWs {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_tcp_mss(536).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.set_nonblocking(true).unwrap();
    let sock = tokio::net::TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    let stream = sock.connect(ts.addr()).await.unwrap();
    tokio_tungstenite::client_async(url, stream).await.expect("upgrade").0
}

/// Read until the server's close frame: its code (panics on EOF without one or on timeout).
async fn close_code(ws: &mut RawWs, timeout: Duration) -> (u16, String, Vec<Value>) {
    let mut events = Vec::new();
    let read = async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
                Ok(Message::Close(None)) => return (1005, String::new()),
                Ok(Message::Text(t)) => events.push(serde_json::from_str(&t).unwrap()),
                Ok(_) => {}
                Err(e) => panic!("read failed before a close frame: {e}"),
            }
        }
        panic!("connection ended without a close frame")
    };
    let (code, reason) = tokio::time::timeout(timeout, read).await.expect("a close frame in time");
    (code, reason, events)
}

async fn session_state(ts: &TestServer, id: &str, token: &str) -> (String, String) {
    let v = ts.session_json(id, token).await;
    (v["state"].as_str().unwrap_or("?").to_owned(), v["end_reason"].as_str().unwrap_or("").to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_with_1013() {
    let ts = TestServer::start().await;
    let (id, token, _) = ts.create_session().await;
    let mut ws = narrow_ws(&ts, &ws_url(&ts, &id, &token)).await;
    ws.send(Message::text(Format::Pcm(48_000).message())).await.unwrap();
    // Read until listening, then only write: the question, then silence, never reading again.
    loop {
        let Some(Ok(Message::Text(t))) = ws.next().await else { continue };
        let e: Value = serde_json::from_str(&t).unwrap();
        if e["type"] == "state" && e["state"] == "listening" {
            break;
        }
    }
    let question = question_at(48_000);
    let frames = question.chunks(960).map(|c| c.to_vec()).chain(std::iter::repeat(vec![0i16; 960]));
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let started = Instant::now();
    for (seq, mut frame) in frames.enumerate() {
        frame.resize(960, 0);
        tick.tick().await;
        let mut msg = vec![0x01, 0x00];
        msg.extend_from_slice(&(seq as u16).to_be_bytes());
        msg.extend(frame.iter().flat_map(|s| s.to_le_bytes()));
        if ws.send(Message::binary(msg)).await.is_err()
            || seq % 25 == 0 && session_state(&ts, &id, &token).await.0 == "ended"
        {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "the server never gave up on a client that does not read");
    }
    let (state, reason) = session_state(&ts, &id, &token).await;
    assert_eq!((state.as_str(), reason.as_str()), ("ended", "peer_disconnected"));
    // Now read what the server managed to queue: audio, then the close frame with 1013.
    let (code, why, _) = close_code(&mut ws, Duration::from_secs(10)).await;
    assert_eq!(code, 1013, "close reason: {why}");
    let metrics = ts.http.get(format!("{}/metrics", ts.base)).send().await.unwrap().text().await.unwrap();
    let dropped: f64 = metrics
        .lines()
        .find(|l| l.starts_with("kotodama_queue_drops_total") && l.contains("audio_to_client"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0);
    assert!(dropped >= 50.0, "audio frames dropped and counted before the close: {dropped}");
}

/// A fresh session's socket (plain client), with `first` sent as its first messages.
async fn hostile(ts: &TestServer, first: Vec<Message>) -> RawWs {
    let (id, token, _) = ts.create_session().await;
    let stream = tokio::net::TcpStream::connect(ts.addr()).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(ws_url(ts, &id, &token), stream).await.expect("upgrade");
    for m in first {
        // The server may close mid-way (a flood): later sends fail, which is the point.
        if ws.send(m).await.is_err() {
            break;
        }
    }
    ws
}

fn audio(payload: &[u8]) -> Message {
    let mut m = vec![0x01, 0x00, 0x00, 0x00];
    m.extend_from_slice(payload);
    Message::binary(m)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_clear_close_codes_and_leaves_other_sessions_alone() {
    let ts = TestServer::start().await;
    // A session talks while the others misbehave.
    let (healthy, ()) = tokio::join!(one_turn(&ts, Format::Opus), misbehave(&ts));
    let (_, _, evs, pcm) = healthy;
    let (rate, reply) = scripted_reply();
    let (heard, want) = (pcm.len() as f64 / 48_000.0, reply.len() as f64 / f64::from(rate));
    assert!((heard - want).abs() <= want * 0.1, "the healthy session heard {heard:.2} s of {want:.2} s");
    assert!(agent_final(&evs));
    let ok = ts.http.get(format!("{}/healthz", ts.base)).send().await.unwrap();
    assert_eq!(ok.status(), 200, "the server is up");
}

async fn misbehave(ts: &TestServer) {
    let opus = || Message::text(Format::Opus.message());
    let mib = vec![0u8; 1 << 20];
    let cases: Vec<(&str, Vec<Message>, u16)> = vec![
        ("garbage first", vec![Message::text("\u{1}garbage{")], 1008),
        ("binary before the format", vec![audio(&[0; 100])], 1008),
        ("an unknown codec", vec![Message::text(r#"{"type":"audio.format","codec":"mp3"}"#)], 1008),
        ("a 1 MiB binary frame", vec![opus(), Message::binary(mib.clone())], 1009),
        ("a 1 MiB text frame", vec![opus(), Message::text("x".repeat(1 << 20))], 1009),
        ("an unknown binary kind", vec![opus(), Message::binary(vec![0x7f, 0, 0, 0, 1, 2])], 1003),
        ("odd PCM", vec![Message::text(Format::Pcm(16_000).message()), audio(&[1, 2, 3])], 1007),
        (
            "10,000 messages at once",
            std::iter::once(opus()).chain((0..10_000).map(|_| Message::text(r#"{"type":"ping"}"#))).collect(),
            1008,
        ),
    ];
    for (what, first, want) in cases {
        let mut ws = hostile(ts, first).await;
        let (code, reason, _) = close_code(&mut ws, Duration::from_secs(15)).await;
        assert_eq!(code, want, "{what}: closed with {code} ({reason})");
        assert!(!reason.is_empty(), "{what}: the close says why");
    }
    // A bad event after the format is an `error` event, as on the data channel; the socket stays.
    let mut ws = hostile(ts, vec![opus(), Message::text("{"), Message::text(r#"{"type":"ping"}"#)]).await;
    let mut seen = Vec::new();
    while !seen.iter().any(|e: &Value| e["type"] == "pong") {
        let Some(Ok(Message::Text(t))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap() else {
            panic!("the socket stayed open and answered; got {seen:?}")
        };
        seen.push(serde_json::from_str(&t).unwrap());
    }
    assert!(seen.iter().any(|e| e["type"] == "error" && e["code"] == "invalid_json"), "{seen:?}");

    // The HTTP side: problem+json before any upgrade.
    let (id, token, _) = ts.create_session().await;
    let url = format!("{}/v1/sessions/{id}/ws", ts.base);
    let status = |r: reqwest::Response| r.status().as_u16();
    assert_eq!(status(ts.http.get(&url).send().await.unwrap()), 401, "no token");
    assert_eq!(status(ts.http.get(format!("{url}?token=nope")).send().await.unwrap()), 401, "a bad token");
    let plain = ts.http.get(format!("{url}?token={token}")).send().await.unwrap();
    assert_eq!(plain.status(), 400, "not a WebSocket upgrade");
    assert_eq!(plain.headers()["content-type"], "application/problem+json");
    let (ws, _) = tokio_tungstenite::connect_async(ws_url(ts, &id, &token)).await.expect("the token connects once");
    let again = tokio_tungstenite::connect_async(ws_url(ts, &id, &token)).await;
    assert!(again.is_err(), "a second socket for a connected session is refused");
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_to_talk_end_turn_and_client_vad_barge_in() {
    let ts = TestServer::start().await;
    let (mut c, _, _) = WsClient::connect(&ts, Format::Pcm(16_000)).await;
    c.wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening").await;
    // Push-to-talk: the question, then `control.end_turn` and no more audio at all, so our VAD
    // never hears the silence that would end the turn: only the client's command can.
    c.speak(&question_at(16_000)).await;
    c.sink.send(Message::text(r#"{"type":"control.end_turn"}"#)).await.unwrap();
    c.wait_event("thinking", Duration::from_secs(5), |e| e["type"] == "state" && e["state"] == "thinking").await;
    c.wait_event("speaking", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "speaking").await;
    assert_eq!(ts.recorder.turns().len(), 1, "end_turn committed the turn once");
    // The client's own VAD says the user speaks over the character: barge-in.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // What the client had received when its VAD fired: the cut lands there, give or take the
    // command's trip and a frame in flight (measured, not assumed from the sleep, so a loaded
    // machine that paces the reply late does not count as a wrong `played_ms`).
    let heard_at_vad = c.inbox.lock().unwrap().pcm.len() as u64 * 1000 / 16_000;
    c.sink.send(Message::text(r#"{"type":"vad","state":"speech_started"}"#)).await.unwrap();
    let cut = c.wait_event("agent.interrupted", Duration::from_secs(5), |e| e["type"] == "agent.interrupted").await;
    let played = cut["played_ms"].as_u64().unwrap();
    let cut_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ib = c.inbox.lock().unwrap();
    let heard_ms = ib.pcm.len() as u64 * 1000 / 16_000;
    assert!(heard_at_vad >= 500, "the reply was playing when the client's VAD fired ({heard_at_vad} ms heard)");
    assert!(
        played >= heard_at_vad && played <= heard_at_vad + 500,
        "played_ms {played}: the cut is where the client barged in ({heard_at_vad} ms heard then)"
    );
    assert!(heard_ms.abs_diff(played) <= 100, "played_ms {played} is what was sent ({heard_ms} ms heard)");
    let late = ib.frames.iter().filter(|(at, _, _)| *at > cut_at + Duration::from_millis(50)).count();
    assert_eq!(late, 0, "no audio of the cut reply after agent.interrupted");
    assert_eq!(ts.recorder.turns().len(), 1, "the barge-in alone commits nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_results_reach_the_client_and_the_models_context_or_are_spoken_now() {
    let ts = TestServer::start().await;
    let (c, id, _) = WsClient::connect(&ts, Format::Opus).await;
    c.wait_event("listening", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "listening").await;
    let url = format!("{}/v1/sessions/{id}/agent-results", ts.base);
    let post = |body: Value| ts.http.post(&url).json(&body).send();
    let text = "The train to Kyoto leaves at 9:40 from platform 3.";
    let res = post(serde_json::json!({"text": text, "source": "travel-agent", "status": "completed"})).await.unwrap();
    assert_eq!(res.status(), 202);
    let note = c.wait_event("agent_notification", Duration::from_secs(5), |e| e["type"] == "agent_notification").await;
    assert_eq!(
        (note["text"].as_str(), note["source"].as_str(), note["status"].as_str()),
        (Some(text), Some("travel-agent"), Some("completed"))
    );
    // In the model's context before the next turn, and no reply of its own.
    let context = ts.recorder.histories().last().cloned().unwrap_or_default();
    assert!(context.iter().any(|h| h.text().contains(text) && h.text().contains("travel-agent")), "{context:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.inbox.lock().unwrap().frames.is_empty(), "a plain result is not spoken");
    // speak_now: the character answers with it at once.
    let res = post(serde_json::json!({"text": "Your package arrived.", "source": "mail", "status": "completed", "speak_now": true}))
        .await
        .unwrap();
    assert_eq!(res.status(), 202);
    c.wait_event("speaking", Duration::from_secs(10), |e| e["type"] == "state" && e["state"] == "speaking").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(c.inbox.lock().unwrap().frames.len() > 10, "the character speaks");
    // Bad requests are problem+json.
    let bad = ts.http.post(&url).body("text").send().await.unwrap();
    assert_eq!(bad.status(), 415);
    assert_eq!(post(serde_json::json!({"text": "x"})).await.unwrap().status(), 400, "source and status are required");
    let gone = ts.http.post(format!("{}/v1/sessions/sess_nope/agent-results", ts.base));
    let gone = gone.json(&serde_json::json!({"text": "x", "source": "a", "status": "ok"})).send().await.unwrap();
    assert_eq!(gone.status(), 404);
}

/// (user + system CPU time, RSS in KiB) of process `pid`, from /proc (clock ticks of 10 ms).
fn proc_usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap();
    (Duration::from_millis(ticks * 10), rss.parse().unwrap())
}

/// The `kotodama` binary serving on a free loopback port with the scripted provider; killed on drop.
struct ServerProcess {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl ServerProcess {
    async fn start() -> ServerProcess {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let db = temp_dir("bench").join("kotodama.db");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_kotodama"))
            .arg("serve")
            .env_remove("OPENAI_API_KEY")
            .env_remove("KOTODAMA_API_KEYS")
            .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
            .env("KOTODAMA_PROVIDER", "scripted")
            .env("KOTODAMA_DATABASE_URL", format!("sqlite://{}", db.display()))
            .env("KOTODAMA_LOG", "warn")
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let http = reqwest::Client::new();
        for _ in 0..400 {
            if http.get(format!("http://{addr}/readyz")).send().await.is_ok_and(|r| r.status() == 200) {
                return ServerProcess { child, addr };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not become ready");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Benchmark (BENCHMARKS.md): **server-only** CPU time and memory of N concurrent one-turn sessions
/// over WebRTC, the WebSocket with Opus and the WebSocket with PCM16 48 kHz. The server is the
/// `kotodama` binary in its own process (scripted provider); the clients run here; CPU and RSS are
/// read from the server's /proc entry, so the clients' own work is not counted.
/// `cargo test --locked --test ws_transport -- --ignored --nocapture server_cpu_per_session`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore]
async fn server_cpu_per_session_websocket_vs_webrtc() {
    const N: usize = 8;
    for mode in ["webrtc", "ws-opus", "ws-pcm48"] {
        let server = ServerProcess::start().await;
        let (base, http, pid) = (format!("http://{}", server.addr), reqwest::Client::new(), server.child.id());
        let (cpu0, rss0) = proc_usage(pid);
        let t0 = Instant::now();
        let runs = (0..N).map(|_| async {
            let created = create_session_at(&http, &base, None).await;
            let (id, token) = id_and_token(&created);
            match mode {
                "webrtc" => {
                    let offer_url = created["offer_url"].as_str().unwrap();
                    let mut client = TestClient::connect_to(&base, &http, offer_url, &token).await;
                    let listening = |e: &Value| e["type"] == "state" && e["state"] == "listening";
                    client.wait_event("listening", Duration::from_secs(15), listening).await;
                    client.speak(&question_at(48_000)).await;
                    client.silence_until("the reply", Duration::from_secs(40), agent_final).await;
                    client.silence_until("listening", Duration::from_secs(20), back_to_listening).await;
                    client.close().await;
                }
                "ws-opus" => drop(talk(WsClient::connect_to(server.addr, &id, &token, Format::Opus).await).await),
                _ => drop(talk(WsClient::connect_to(server.addr, &id, &token, Format::Pcm(48_000)).await).await),
            }
        });
        let peak = Arc::new(Mutex::new(rss0));
        let sampler = {
            let peak = Arc::clone(&peak);
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let mut p = peak.lock().unwrap();
                    *p = (*p).max(proc_usage(pid).1);
                }
            })
        };
        futures::future::join_all(runs).await;
        sampler.abort();
        let (cpu, wall) = (proc_usage(pid).0 - cpu0, t0.elapsed());
        let per_session = cpu.as_secs_f64() / wall.as_secs_f64() / N as f64 * 100.0;
        let rss = (*peak.lock().unwrap()).saturating_sub(rss0) / N as u64;
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!(
            "{mode}: {N} sessions, {wall:.1?} wall, server {cpu:.2?} CPU = {:.0} ms per session, {per_session:.2} % of a core per session; server peak RSS +{rss} KiB per session; loadavg {}",
            cpu.as_millis() as f64 / N as f64,
            load.trim()
        );
    }
}

/// A N.E.K.O. socket (`/ws/aiko`, open on loopback) with `first` sent.
async fn neko_hostile(ts: &TestServer, first: Vec<Message>) -> RawWs {
    let stream = tokio::net::TcpStream::connect(ts.addr()).await.unwrap();
    let url = format!("ws://{}/ws/aiko", ts.addr());
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.expect("upgrade");
    for m in first {
        if ws.send(m).await.is_err() {
            break;
        }
    }
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_neko_input_gets_clear_close_codes_and_leaves_other_sessions_alone() {
    let ts = TestServer::start().await;
    let (healthy, ()) = tokio::join!(one_turn(&ts, Format::Pcm(24_000)), async {
        let start = || Message::text(r#"{"action":"start_session","input_type":"audio","new_session":true}"#);
        let big = "x".repeat(1 << 20);
        let cases: Vec<(&str, Vec<Message>, u16)> = vec![
            ("binary before start_session", vec![Message::binary(vec![0u8; 1000])], 1003),
            ("garbage", vec![Message::text("\u{0}garbage")], 1007),
            ("1 MiB before start_session", vec![Message::text(big.clone())], 1009),
            ("1 MiB after start_session", vec![start(), Message::text(big.clone())], 1009),
            ("binary after start_session", vec![start(), Message::binary(vec![1u8; 100])], 1003),
            (
                "10,000 messages at once",
                std::iter::once(start()).chain((0..10_000).map(|_| Message::text(r#"{"action":"ping"}"#))).collect(),
                1008,
            ),
        ];
        for (what, first, want) in cases {
            let mut ws = neko_hostile(&ts, first).await;
            let (code, reason, _) = close_code(&mut ws, Duration::from_secs(15)).await;
            assert_eq!(code, want, "{what}: closed with {code} ({reason})");
        }
        // Audio that is not int16 samples is a `status`, not a crash; the session goes on.
        let bad_audio = Message::text(r#"{"action":"stream_data","input_type":"audio","data":[1,"a",99999]}"#);
        let mut ws = neko_hostile(&ts, vec![start(), bad_audio, Message::text(r#"{"action":"ping"}"#)]).await;
        let mut seen = Vec::new();
        while !seen.iter().any(|e: &Value| e["type"] == "pong") {
            let Some(Ok(Message::Text(t))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap()
            else {
                panic!("the socket stayed open; got {seen:?}")
            };
            seen.push(serde_json::from_str(&t).unwrap());
        }
        assert!(seen.iter().any(|e| e["type"] == "status" && e["message"].as_str().unwrap().contains("INVALID_AUDIO")));
    });
    let (_, _, evs, pcm) = healthy;
    let (rate, reply) = scripted_reply();
    let (heard, want) = (pcm.len() as f64 / 24_000.0, reply.len() as f64 / f64::from(rate));
    assert!((heard - want).abs() <= want * 0.1, "the healthy session heard {heard:.2} s of {want:.2} s");
    assert!(agent_final(&evs));
}

/// An api-v1 `image` event: a data URL of `bytes` bytes of JPEG (SOI marker, then filler; the
/// server and the models' fakes check type, base64 and size, not pixels).
fn image_event(bytes: usize) -> String {
    use base64::Engine as _;
    let mut jpeg = vec![0xff, 0xd8, 0xff, 0xe0];
    jpeg.resize(bytes, 0x11);
    let url = format!("data:image/jpeg;base64,{}", base64::engine::general_purpose::STANDARD.encode(&jpeg));
    serde_json::json!({"type": "image", "data": url}).to_string()
}

fn errors_with(evs: &[Value], code: &str) -> usize {
    evs.iter().filter(|e| e["type"] == "error" && e["code"] == code).count()
}

/// A listening WebSocket session on `ts` (PCM16 16 kHz).
async fn listening(ts: &TestServer) -> WsClient {
    let (c, _, _) = WsClient::connect(ts, Format::Pcm(16_000)).await;
    c.wait_event("listening", Duration::from_secs(15), |e| e["type"] == "state" && e["state"] == "listening").await;
    c
}

/// Send `n` images of `bytes` each, back to back.
async fn send_images(c: &mut WsClient, n: usize, bytes: usize) {
    for _ in 0..n {
        c.sink.send(Message::text(image_event(bytes))).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_reach_openai_as_input_image_oversized_and_floods_get_errors() {
    use common::fake_openai::{FakeOpenAi, FakeOptions};
    let fake = FakeOpenAi::start(FakeOptions::default(), Vec::new()).await;
    let ts = TestServer::start_openai(&fake.url(), |_| {}).await;
    let mut c = listening(&ts).await;
    send_images(&mut c, 1, 20_000).await;
    let images = || {
        let conns = fake.conns();
        let items = conns.first().map(|c| c.of_type("conversation.item.create")).unwrap_or_default();
        items.into_iter().filter(|i| i["item"]["content"][0]["type"] == "input_image").collect::<Vec<_>>()
    };
    let end = Instant::now() + Duration::from_secs(10);
    while images().is_empty() {
        assert!(Instant::now() < end, "no input_image reached the model; events {:?}", c.events());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let item = &images()[0]["item"];
    assert_eq!(item["role"], "user");
    let url = item["content"][0]["image_url"].as_str().unwrap();
    assert_eq!(url, serde_json::from_str::<Value>(&image_event(20_000)).unwrap()["data"], "the data URL unchanged");
    // Larger than the 32 KiB limit (but within the message limit): an error, nothing sent.
    send_images(&mut c, 1, 40_000).await;
    c.wait_event("image_too_large", Duration::from_secs(5), |e| e["code"] == "image_too_large").await;
    // A flood: at most one per second passes; the client is told once.
    send_images(&mut c, 30, 2_000).await;
    c.wait_event("image_rate_limited", Duration::from_secs(5), |e| e["code"] == "image_rate_limited").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let passed = images().len();
    assert!(passed < 31, "the flood was limited: {passed} of 31 images reached the model");
    assert_eq!(errors_with(&c.events(), "image_rate_limited"), 1, "told once");
    // A message beyond the WebSocket limit still closes with 1009.
    send_images(&mut c, 1, 60_000).await;
    let end = Instant::now() + Duration::from_secs(10);
    while c.inbox.lock().unwrap().close.is_none() {
        assert!(Instant::now() < end, "no close after a 80 KiB message");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(c.inbox.lock().unwrap().close, Some(1009));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_reach_gemini_as_realtime_video() {
    use common::fake_gemini::{FakeGemini, GOptions};
    use kotodama::providers::RealtimeProvider;
    use kotodama::providers::gemini::GeminiProvider;
    let fake = FakeGemini::start(GOptions::default(), Vec::new()).await;
    let url = fake.url();
    let ts = TestServer::start_with_providers(
        move |c| {
            c.gemini.url = Some(url);
            c.gemini.api_key = Some(kotodama::config::Secret::new("test-gemini-key"));
            c.provider = Some("gemini".into());
        },
        |c| vec![Arc::new(GeminiProvider::new(c.gemini.clone())) as Arc<dyn RealtimeProvider>],
    )
    .await;
    let mut c = listening(&ts).await;
    send_images(&mut c, 1, 10_000).await;
    let end = Instant::now() + Duration::from_secs(10);
    let video = loop {
        let conns = fake.conns();
        let found =
            conns.first().and_then(|g| g.received.iter().find_map(|m| m.pointer("/realtimeInput/video").cloned()));
        if let Some(v) = found {
            break v;
        }
        assert!(Instant::now() < end, "no realtimeInput.video reached Gemini; events {:?}", c.events());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(video["mimeType"], "image/jpeg");
    let sent = serde_json::from_str::<Value>(&image_event(10_000)).unwrap();
    let b64 = sent["data"].as_str().unwrap().strip_prefix("data:image/jpeg;base64,").unwrap().to_owned();
    assert_eq!(video["data"], b64, "the frame's base64, unchanged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_without_images_answers_one_error_and_neko_frames_get_one_status() {
    // The scripted provider, like the cascade, takes no images.
    let ts = TestServer::start().await;
    let mut c = listening(&ts).await;
    send_images(&mut c, 3, 1_000).await;
    c.wait_event("images_unsupported", Duration::from_secs(5), |e| e["code"] == "images_unsupported").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(errors_with(&c.events(), "images_unsupported"), 1, "one error for three images");
    // N.E.K.O. screen frames on the same provider: one `status` with the code.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws/aiko", ts.addr())).await.unwrap();
    ws.send(Message::text(r#"{"action":"start_session","input_type":"audio"}"#)).await.unwrap();
    let frame = serde_json::json!({"action": "stream_data", "input_type": "screen",
        "data": serde_json::from_str::<Value>(&image_event(1_000)).unwrap()["data"]});
    let mut statuses = Vec::new();
    let read = async {
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let v: Value = serde_json::from_str(&t).unwrap();
            if v["type"] == "session_started" {
                for _ in 0..3 {
                    ws.send(Message::text(frame.to_string())).await.unwrap();
                }
            }
            if v["type"] == "status" {
                statuses.push(v["message"].as_str().unwrap().to_owned());
                if statuses.iter().any(|s| s.contains("images_unsupported")) {
                    return;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(15), read).await.expect("a status for the screen frames");
    assert_eq!(statuses.iter().filter(|s| s.contains("images_unsupported")).count(), 1, "{statuses:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_transcripts_get_translations_in_the_users_language() {
    use common::fake_openai_http::{FakeBehavior, start_fake};
    let behavior = FakeBehavior {
        llm_script: vec![(Duration::ZERO, "こんにちは！".into()), (Duration::ZERO, "私はアイコです。".into())],
        ..Default::default()
    };
    let chat = start_fake(behavior).await;
    let chat_url = chat.url();
    let ts = TestServer::start_with(|c| {
        c.translation.url = Some(chat_url);
        c.translation.api_key = Some(kotodama::config::Secret::new("sk-translate"));
    })
    .await;
    let mut c = listening(&ts).await;
    c.sink.send(Message::text(r#"{"type":"session.update","language":"ja"}"#)).await.unwrap();
    c.sink.send(Message::text(r#"{"type":"text","text":"Who are you?"}"#)).await.unwrap();
    let tr = c
        .wait_event("transcript.translation", Duration::from_secs(30), |e| e["type"] == "transcript.translation")
        .await;
    assert_eq!((tr["role"].as_str(), tr["language"].as_str()), (Some("agent"), Some("ja")));
    assert_eq!(tr["text"], "こんにちは！私はアイコです。");
    let evs = c.events();
    let final_item = evs
        .iter()
        .find(|e| e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true)
        .map(|e| e["item_id"].clone());
    assert_eq!(final_item, Some(tr["item_id"].clone()), "the translation names the final transcript's item");
    // The chat endpoint was asked to translate that text, with the key.
    let log = chat.log();
    let asked = &log.llm[0].1;
    let final_text =
        evs.iter().find(|e| e["type"] == "transcript" && e["final"] == true && e["role"] == "agent").unwrap()["text"]
            .clone();
    assert_eq!(asked["messages"][1]["content"], final_text);
    assert!(asked["messages"][0]["content"].as_str().unwrap().contains("`ja`"), "{asked}");
    assert!(log.auth.iter().all(|a| a == "Bearer sk-translate"), "{:?}", log.auth);
    assert_eq!(errors_with(&evs, "translation_unavailable"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_translation_endpoint_the_client_gets_one_notice() {
    let ts = TestServer::start().await;
    let mut c = listening(&ts).await;
    for lang in ["ja", "de", "en-GB"] {
        let msg = serde_json::json!({"type": "session.update", "language": lang}).to_string();
        c.sink.send(Message::text(msg)).await.unwrap();
    }
    c.sink.send(Message::text(r#"{"type":"text","text":"Who are you?"}"#)).await.unwrap();
    c.wait_event("the reply", Duration::from_secs(30), |e| {
        e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let evs = c.events();
    assert_eq!(errors_with(&evs, "translation_unavailable"), 1, "one notice: {evs:?}");
    assert!(!evs.iter().any(|e| e["type"] == "transcript.translation"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_playback_report_sets_played_ms_of_the_cut() {
    let ts = TestServer::start().await;
    let mut c = listening(&ts).await;
    c.sink.send(Message::text(r#"{"type":"text","text":"Who are you?"}"#)).await.unwrap();
    let speaking = |e: &Value| e["type"] == "state" && e["state"] == "speaking";
    c.wait_event("speaking", Duration::from_secs(15), speaking).await;
    // Wait until a second of the reply has arrived, then say only 200 ms of it was played.
    let end = Instant::now() + Duration::from_secs(20);
    while c.inbox.lock().unwrap().pcm.len() < 16_000 {
        assert!(Instant::now() < end, "no second of the reply");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let item =
        c.events().iter().rev().find(|e| e["type"] == "transcript" && e["role"] == "agent").unwrap()["item_id"].clone();
    let report = serde_json::json!({"type": "playback", "item_id": item, "played_ms": 200}).to_string();
    c.sink.send(Message::text(report)).await.unwrap();
    c.sink.send(Message::text(r#"{"type":"interrupt"}"#)).await.unwrap();
    let cut = c.wait_event("agent.interrupted", Duration::from_secs(5), |e| e["type"] == "agent.interrupted").await;
    let received_ms = c.inbox.lock().unwrap().pcm.len() as u64 * 1000 / 16_000;
    let played = cut["played_ms"].as_u64().unwrap();
    assert_eq!(cut["item_id"], item);
    // The report plus the moment between the two messages, far below the >= 1 s sent.
    assert!(played >= 200 && played < received_ms / 2, "played_ms {played}; {received_ms} ms were sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_user_text_is_translated_before_a_text_only_model_where_configured() {
    use common::fake_openai_http::{FakeBehavior, start_fake};
    use kotodama::providers::RealtimeProvider;
    use kotodama::providers::cascade::openai::{Endpoint, OpenAiChat, OpenAiSpeech, OpenAiStt, client};
    use kotodama::providers::cascade::{CascadeConfig, CascadeProvider};
    // The translator answers with the English question; the cascade's model with its reply.
    let chat =
        start_fake(FakeBehavior { llm_script: vec![(Duration::ZERO, "Who are you?".into())], ..Default::default() })
            .await;
    let model = start_fake(FakeBehavior {
        llm_script: vec![(Duration::ZERO, "I am Aiko, nice to meet you.".into())],
        ..Default::default()
    })
    .await;
    let ep = Endpoint::new(&model.url(), "test-model");
    let c = client();
    let cascade = CascadeConfig {
        name: "cascade".into(),
        stt: vec![Arc::new(OpenAiStt::new(ep.clone(), c.clone(), None)) as _],
        llm: vec![Arc::new(OpenAiChat::new(ep.clone(), c.clone())) as _],
        tts: vec![Arc::new(OpenAiSpeech::new(ep, c)) as _],
        token_budget: 2000,
        max_reply_tokens: 200,
    };
    let provider = Arc::new(CascadeProvider::new(cascade).unwrap()) as Arc<dyn RealtimeProvider>;
    let chat_url = chat.url();
    let ts = TestServer::start_with_providers(
        move |c| {
            c.provider = Some("cascade".into());
            c.translation.url = Some(chat_url);
            c.translation.user_text = true;
        },
        move |_| vec![provider],
    )
    .await;
    let mut c = listening(&ts).await;
    c.sink.send(Message::text(r#"{"type":"session.update","language":"ja"}"#)).await.unwrap();
    c.sink.send(Message::text(r#"{"type":"text","text":"あなたは誰ですか？"}"#)).await.unwrap();
    c.wait_event("the reply", Duration::from_secs(30), |e| {
        e["type"] == "transcript" && e["role"] == "agent" && e["final"] == true
    })
    .await;
    // The translator was asked first, from ja into the character's en-US ...
    let asked = chat.log().llm[0].1.clone();
    assert_eq!(asked["messages"][1]["content"], "あなたは誰ですか？");
    assert!(asked["messages"][0]["content"].as_str().unwrap().contains("from the language tagged `ja`"), "{asked}");
    // ... and the model got its English, not the Japanese.
    let prompt = model.log().llm[0].1.clone();
    let last = prompt["messages"].as_array().unwrap().last().unwrap().clone();
    assert_eq!((last["role"].as_str(), last["content"].as_str()), (Some("user"), Some("Who are you?")), "{prompt}");
    // The typed turn is stored as typed.
    let evs = c.events();
    assert!(!evs.iter().any(|e| e["type"] == "error" && e["code"] == "busy"), "{evs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_on_the_data_channel_reaches_openai() {
    use common::fake_openai::{FakeOpenAi, FakeOptions};
    let fake = FakeOpenAi::start(FakeOptions::default(), Vec::new()).await;
    let ts = TestServer::start_openai(&fake.url(), |_| {}).await;
    let (_, token, offer_url) = ts.create_session().await;
    let client = TestClient::connect(&ts, &offer_url, &token).await;
    let listening = |e: &Value| e["type"] == "state" && e["state"] == "listening";
    client.wait_event("listening", Duration::from_secs(15), listening).await;
    // 30 KB of JPEG: a 40 KB message, over the 16 KiB of other events, within one SCTP message.
    client.send_text(&image_event(30_000)).await;
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let items = fake.conns().first().map(|c| c.of_type("conversation.item.create")).unwrap_or_default();
        if let Some(i) = items.iter().find(|i| i["item"]["content"][0]["type"] == "input_image") {
            assert!(i["item"]["content"][0]["image_url"].as_str().unwrap().starts_with("data:image/jpeg;base64,/9j/"));
            break;
        }
        assert!(Instant::now() < end, "no input_image from the data channel; events {:?}", client.events());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!client.events().iter().any(|e| e["type"] == "error"), "{:?}", client.events());
}
