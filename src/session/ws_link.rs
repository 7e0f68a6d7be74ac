//! The WebSocket client link (`GET /v1/sessions/{id}/ws`): the same session as over WebRTC for
//! clients that cannot do WebRTC (embedded devices, server-side bots, UDP-blocked networks).
//!
//! # Wire format
//! - **Text frames** carry exactly the api-v1 events (`docs/api-v1.md`) both ways, spelled by the
//!   link's [`EventCodec`], plus one link message: the **first** client message must be
//!   `{"type":"audio.format","codec":"opus"}` or
//!   `{"type":"audio.format","codec":"pcm16","rate_hz":16000|24000|48000}`. It fixes the audio
//!   format of both directions; `session.ready` follows once it is accepted. Later link messages:
//!   `{"type":"vad","state":"speech_started"|"speech_stopped"}` and `{"type":"control.end_turn"}`
//!   (a client's own VAD, push-to-talk), and `{"type":"playback","item_id","played_ms"}`: the
//!   milliseconds of an agent item the client has played from its buffer, sent as it plays.
//! - **Binary frames** carry audio, each behind a [`HEADER_LEN`]-byte header:
//!
//!   | byte | meaning |
//!   |---|---|
//!   | 0 | kind: [`KIND_AUDIO`] (`0x01`); any other kind closes with 1003 |
//!   | 1 | flags: bit 0 [`FLAG_TALKSPURT`] = first frame of a talk spurt (server -> client); others 0 |
//!   | 2..4 | sequence number, u16 big-endian, +1 per frame (wraps); the server reorders and conceals Opus gaps by it |
//!
//!   then the payload: one Opus packet (20 ms, 48 kHz, RFC 7587 payload) for `opus`, or PCM16
//!   little-endian mono samples at `rate_hz` for `pcm16` (client frames of any length up to
//!   [`MAX_MESSAGE_BYTES`]; server frames are 20 ms: 320/480/960 samples at 16/24/48 kHz).
//!
//! The character's audio is paced in real time by the session (one frame per 20 ms), so
//! `agent.interrupted.played_ms` counts frames sent, as over WebRTC; a client that reports its
//! playback (`playback`) gets it cut at its last report plus the time since, at most what was
//! sent (so a client buffering ahead is not credited with audio it has not played).
//!
//! # Transcoding
//! The session core speaks Opus both ways (its uplink decodes Opus, its playout encodes Opus).
//! For a `pcm16` client this link encodes the client's PCM into 20 ms Opus packets (in the
//! socket's reader task) and decodes the playout's frames back to PCM at the client's rate. That
//! costs one Opus encode and one decode per 20 ms per direction (about as much as the WebRTC
//! path's own codec work) and keeps the core unchanged; a PCM input of the uplink would save it.
//!
//! # Backpressure and limits (the stated policy)
//! - The send queue to the socket holds [`SEND_QUEUE`] messages. A frame of agent audio that
//!   does not fit is dropped and counted (`kotodama_queue_drops_total{queue="audio_to_client"}`);
//!   after [`MAX_CONSECUTIVE_DROPS`] drops in a row (1 s of audio) the client is closed with
//!   **1013** (try again later) and the session ends (`peer_disconnected`). Events that do not
//!   fit are dropped and counted (`events_to_client`).
//! - A message larger than [`MAX_MESSAGE_BYTES`] closes with **1009**; more than
//!   [`MAX_MESSAGES_PER_SEC`] messages in one second closes with **1008**; binary audio before
//!   `audio.format`, a bad `audio.format` or no `audio.format` within [`FORMAT_TIMEOUT`] closes
//!   with **1008**; an unknown binary kind with **1003**; PCM of an odd byte length with **1007**.
//! - The server pings every [`PING_INTERVAL`]; a client silent (no message, no pong) for
//!   [`LIVENESS_TIMEOUT`] is closed with **1001** and the session ends (`peer_disconnected`).
//! - The session's own limits apply as over WebRTC (idle timeout, maximum duration, the node's
//!   session limit at creation, the single-use session token).
//! - A session that ends closes the socket with **1000** (1001 on server shutdown), after its
//!   last events (`session.ended`), within [`CLOSE_TIMEOUT`].

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The payload type a WebSocket link reports for its Opus frames (it has no SDP; the uplink of a
/// WebSocket session takes every frame as Opus).
const WS_OPUS_PT: u8 = 111;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use bytes::Bytes;
use futures::stream::SplitStream;
use futures::{SinkExt, StreamExt};
use signaling::events::ServerEvent;
use tokio::sync::{mpsc, watch};

use super::EndReason;
use super::conversation::AudioFrame;
use super::link::{ClientAudio, ClientLink, ClientVoice, EventCodec, LinkError, LinkEvent, LinkStats};

/// Bytes of the binary audio header.
pub const HEADER_LEN: usize = 4;
/// Header kind byte of an audio frame.
pub const KIND_AUDIO: u8 = 0x01;
/// Header flag: first frame of a talk spurt.
pub const FLAG_TALKSPURT: u8 = 0x01;
/// Largest client message, text or binary (64 KiB: > 300 ms of 48 kHz PCM16, any event).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Largest message the WebSocket layer reads at all (larger ones fail in the parser, also 1009).
pub const MAX_READ_BYTES: usize = 2 * 1024 * 1024;
/// Messages queued towards the socket (640 ms of 20 ms audio frames).
pub const SEND_QUEUE: usize = 32;
/// Agent audio frames dropped in a row (queue full) before the client is closed with 1013.
pub const MAX_CONSECUTIVE_DROPS: u32 = 50;
/// Client messages per second before the client is closed with 1008 (10 ms PCM frames are 100/s).
pub const MAX_MESSAGES_PER_SEC: u32 = 400;
/// Client messages waiting for the session task; beyond, audio and events are dropped and counted.
const INBOUND_QUEUE: usize = 64;
/// How often the server pings.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A client that sends nothing (not even a pong) this long is closed with 1001.
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(45);
/// The `audio.format` message must come this soon after the upgrade.
pub const FORMAT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the close frame (and what was queued before it) to reach the client.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Close codes (RFC 6455 section 7.4.1).
mod code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const UNSUPPORTED: u16 = 1003;
    pub const INVALID_PAYLOAD: u16 = 1007;
    pub const POLICY: u16 = 1008;
    pub const TOO_BIG: u16 = 1009;
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// The audio format of a WebSocket client, both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireAudio {
    /// 20 ms Opus packets at 48 kHz.
    Opus,
    /// PCM16 little-endian mono at 16000, 24000 or 48000 Hz.
    Pcm16 {
        /// Sample rate in Hz.
        rate_hz: u32,
    },
}

impl WireAudio {
    /// Parse the `audio.format` message; the error is the close reason.
    pub fn from_message(text: &str) -> Result<Self, String> {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Format {
            #[serde(rename = "type")]
            kind: String,
            codec: String,
            rate_hz: Option<u32>,
        }
        let f: Format = serde_json::from_str(text)
            .map_err(|_| "the first message must be {\"type\":\"audio.format\",\"codec\":...}".to_owned())?;
        match (f.kind.as_str(), f.codec.as_str(), f.rate_hz) {
            ("audio.format", "opus", None | Some(48_000)) => Ok(Self::Opus),
            ("audio.format", "pcm16", Some(r @ (16_000 | 24_000 | 48_000))) => Ok(Self::Pcm16 { rate_hz: r }),
            ("audio.format", "pcm16", _) => Err("pcm16 needs rate_hz 16000, 24000 or 48000".to_owned()),
            ("audio.format", c, _) => Err(format!("unknown codec `{}` (opus or pcm16)", truncate(c, 32))),
            _ => Err("the first message must be {\"type\":\"audio.format\",...}".to_owned()),
        }
    }
}

/// The link's own client messages besides `audio.format` (seed 004): `{"type":"vad","state":
/// "speech_started"|"speech_stopped"}` from a client running its own VAD, and
/// `{"type":"control.end_turn"}` (push-to-talk released). Anything else goes to the codec.
fn client_voice(text: &str) -> Option<ClientVoice> {
    #[derive(serde::Deserialize)]
    struct Voice<'a> {
        #[serde(rename = "type", borrow)]
        kind: &'a str,
        #[serde(default, borrow)]
        state: Option<&'a str>,
    }
    if !text.contains("\"vad\"") && !text.contains("control.end_turn") {
        return None;
    }
    let v: Voice<'_> = serde_json::from_str(text).ok()?;
    match (v.kind, v.state) {
        ("control.end_turn", _) => Some(ClientVoice::EndTurn),
        ("vad", Some("speech_started")) => Some(ClientVoice::SpeechStarted),
        ("vad", Some("speech_stopped")) => Some(ClientVoice::SpeechStopped),
        _ => None,
    }
}

/// The client's playback progress (a link message): `{"type":"playback","item_id":"...",
/// "played_ms":N}`, the milliseconds of that agent item it has played so far. Sent as it plays
/// (e.g. every 100-250 ms); a barge-in then cuts `agent.interrupted.played_ms` and the model's
/// truncation at what it played rather than at what was sent. Anything else goes to the codec.
fn client_playback(text: &str) -> Option<LinkEvent> {
    #[derive(serde::Deserialize)]
    struct Playback {
        #[serde(rename = "type")]
        kind: String,
        item_id: String,
        played_ms: u64,
    }
    if !text.contains("\"playback\"") {
        return None;
    }
    let p: Playback = serde_json::from_str(text).ok()?;
    (p.kind == "playback" && p.item_id.len() <= 128)
        .then(|| LinkEvent::Playback { item_id: p.item_id, played: Duration::from_millis(p.played_ms) })
}

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// What the socket's reader hands the session task.
#[derive(Debug)]
enum FromSocket {
    Format(WireAudio),
    Audio {
        arrival: Instant,
        seq: u16,
        payload: Bytes,
    },
    Text(Utf8Bytes),
    /// The client ended the session (N.E.K.O. `end_session`).
    End(EndReason),
}

/// Counters the reader task keeps (each only grows).
#[derive(Debug, Default)]
struct ReaderCounters {
    audio_in: AtomicU64,
    audio_dropped: AtomicU64,
    messages_dropped: AtomicU64,
}

/// The close the link or the reader asked for: (code, reason).
type CloseRequest = Option<(u16, String)>;

/// A client connected over a WebSocket. Built before the upgrade ([`WsLink::new`]); the socket
/// is driven by the [`WsPump`] once the upgrade completes.
pub struct WsLink<C: EventCodec> {
    codec: C,
    rx: mpsc::Receiver<FromSocket>,
    tx: Option<mpsc::Sender<Message>>,
    close: watch::Sender<CloseRequest>,
    done: watch::Receiver<bool>,
    counters: Arc<ReaderCounters>,
    down: Option<OpusToPcm>,
    pcm_out: Vec<u8>,
    wire: Vec<String>,
    /// `Connected` went out; `EventsOpen` is next.
    open_next: bool,
    events_open: bool,
    events_dropped: u64,
    audio_out_dropped: u64,
    consecutive_drops: u32,
    /// Sequence number of the next frame to the client.
    seq_out: u16,
    /// The highest client frame so far (sequence number, its 48 kHz media time): client frames
    /// get RTP-like timestamps extended from it, so a sequence wrap is no jump.
    newest_in: Option<(u16, u32)>,
    /// N.E.K.O. framing: `audio_chunk {speech_id}` + a bare PCM frame instead of our header.
    neko: bool,
    /// The link gave up on the client (too slow): the session ends with this.
    failed: Option<EndReason>,
    end_reason: Option<String>,
    closed: bool,
}

/// Drives one upgraded socket for its [`WsLink`]: a reader (limits, format, transcoding of the
/// client's PCM) and a writer (send queue, pings, the close frame).
pub struct WsPump {
    /// The send queue, for the reader's own answers (N.E.K.O. `status`); weak, so the queue
    /// still closes when the link lets go of it.
    neko_out: Option<mpsc::WeakSender<Message>>,
    to_link: mpsc::Sender<FromSocket>,
    from_link: mpsc::Receiver<Message>,
    close: watch::Sender<CloseRequest>,
    done: watch::Sender<bool>,
    counters: Arc<ReaderCounters>,
}

impl<C: EventCodec> WsLink<C> {
    /// A link speaking `codec`, and the pump to run on the upgraded socket.
    pub fn new(codec: C) -> (Self, WsPump) {
        let (to_link, rx) = mpsc::channel(INBOUND_QUEUE);
        let (tx, from_link) = mpsc::channel(SEND_QUEUE);
        let (close, _) = watch::channel(None);
        let (done_tx, done) = watch::channel(false);
        let counters = Arc::new(ReaderCounters::default());
        let link = Self {
            codec,
            rx,
            tx: Some(tx),
            close: close.clone(),
            done,
            counters: Arc::clone(&counters),
            down: None,
            pcm_out: Vec::with_capacity(HEADER_LEN + 2 * media::pcm::FRAME_SAMPLES),
            wire: Vec::with_capacity(4),
            open_next: false,
            events_open: false,
            events_dropped: 0,
            audio_out_dropped: 0,
            consecutive_drops: 0,
            seq_out: 0,
            newest_in: None,
            neko: false,
            failed: None,
            end_reason: None,
            closed: false,
        };
        let weak = tx_weak(&link);
        (link, WsPump { to_link, from_link, close, done: done_tx, counters, neko_out: weak })
    }

    /// A link in N.E.K.O.'s framing (`/ws/{character}`): the pump reads `stream_data` audio
    /// ([`WsPump::run_neko`]); the character's voice goes out as `audio_chunk {speech_id}` and one
    /// binary frame of PCM16 LE mono 48 kHz per 20 ms.
    pub fn new_neko(codec: C) -> (Self, WsPump) {
        let (mut link, pump) = Self::new(codec);
        link.neko = true;
        (link, pump)
    }

    /// One 20 ms frame per sequence number: a frame's 48 kHz media time is 960 per number from
    /// the newest frame (signed, so a late frame lands before it and a wrap is a step of one),
    /// and a skipped number is a gap the uplink conceals.
    fn media_time(&mut self, seq: u16) -> u32 {
        let Some((newest_seq, newest_ts)) = self.newest_in else {
            self.newest_in = Some((seq, 0));
            return 0;
        };
        let delta = seq.wrapping_sub(newest_seq) as i16;
        let ts = newest_ts.wrapping_add_signed(i32::from(delta) * 960);
        if delta > 0 {
            self.newest_in = Some((seq, ts));
        }
        ts
    }

    fn map(&mut self, msg: FromSocket) -> Option<LinkEvent> {
        Some(match msg {
            FromSocket::Format(format) => {
                if let WireAudio::Pcm16 { rate_hz } = format {
                    match OpusToPcm::new(rate_hz) {
                        Ok(d) => self.down = Some(d),
                        Err(e) => {
                            tracing::warn!(error = %e, "building the PCM downlink failed");
                            return Some(LinkEvent::Closed(self.give_up(code::POLICY, "audio format unavailable")));
                        }
                    }
                }
                self.open_next = true;
                LinkEvent::Connected
            }
            FromSocket::Audio { arrival, seq, payload } => {
                let timestamp = self.media_time(seq);
                LinkEvent::Audio {
                    arrival,
                    audio: ClientAudio::Opus { seq, timestamp, payload_type: WS_OPUS_PT, ssrc: 0, payload },
                }
            }
            FromSocket::End(reason) => {
                self.closed = true;
                LinkEvent::Closed(reason)
            }
            FromSocket::Text(text)
                if !self.neko
                    && let Some(v) = client_voice(&text) =>
            {
                LinkEvent::Voice(v)
            }
            FromSocket::Text(text)
                if !self.neko
                    && let Some(ev) = client_playback(&text) =>
            {
                ev
            }
            FromSocket::Text(text) => match self.codec.decode(text.as_bytes()) {
                Ok(ev) => LinkEvent::Event(ev),
                Err(e) => LinkEvent::BadMessage(e),
            },
        })
    }

    /// Close the client with `code` and end the session (`peer_disconnected`).
    fn give_up(&mut self, code: u16, reason: &str) -> EndReason {
        self.close.send_replace(Some((code, reason.to_owned())));
        self.closed = true;
        EndReason::PeerDisconnected
    }

    /// Queue a message for the socket; `false` when the queue is full (or the socket gone).
    fn queue(&mut self, msg: Message) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.try_send(msg).is_ok())
    }

    fn encode_frame(&mut self, frame: &AudioFrame<'_>) -> Bytes {
        let seq = self.seq_out;
        self.seq_out = seq.wrapping_add(1);
        let flags = if frame.talkspurt_start { FLAG_TALKSPURT } else { 0 };
        self.pcm_out.clear();
        if !self.neko {
            self.pcm_out.extend_from_slice(&[KIND_AUDIO, flags]);
            self.pcm_out.extend_from_slice(&seq.to_be_bytes());
        }
        match self.down.as_mut() {
            Some(down) => down.decode(frame.payload, &mut self.pcm_out),
            None => self.pcm_out.extend_from_slice(frame.payload),
        }
        Bytes::copy_from_slice(&self.pcm_out)
    }
}

impl<C: EventCodec> ClientLink for WsLink<C> {
    async fn recv(&mut self) -> Option<LinkEvent> {
        if std::mem::take(&mut self.open_next) {
            self.events_open = true;
            return Some(LinkEvent::EventsOpen);
        }
        if let Some(reason) = self.failed.take() {
            return Some(LinkEvent::Closed(reason));
        }
        loop {
            let Some(msg) = self.rx.recv().await else {
                // The reader is gone: the client closed, broke a limit, or never upgraded.
                return (!std::mem::replace(&mut self.closed, true))
                    .then_some(LinkEvent::Closed(EndReason::PeerDisconnected));
            };
            if let Some(ev) = self.map(msg) {
                return Some(ev);
            }
        }
    }

    async fn send_audio(&mut self, frame: &AudioFrame<'_>) -> Result<(), LinkError> {
        if frame.dtx {
            // A WebSocket carries audio, not RTP: the pause is simply no frames.
            return Ok(());
        }
        let bytes = self.encode_frame(frame);
        let room = self.tx.as_ref().is_some_and(|tx| tx.capacity() >= 2);
        if self.neko && room {
            let chunk = format!(r#"{{"type":"audio_chunk","speech_id":{}}}"#, serde_json::Value::from(frame.item_id));
            self.queue(Message::Text(chunk.into()));
        }
        if (room || !self.neko) && self.queue(Message::Binary(bytes)) {
            self.consecutive_drops = 0;
            return Ok(());
        }
        self.audio_out_dropped += 1;
        self.consecutive_drops += 1;
        if self.consecutive_drops == MAX_CONSECUTIVE_DROPS && !self.closed {
            let reason = format!("client too slow: {MAX_CONSECUTIVE_DROPS} audio frames dropped in a row");
            self.failed = Some(self.give_up(code::TRY_AGAIN_LATER, &reason));
        }
        Err(LinkError::Write("send queue full: frame dropped".into()))
    }

    async fn send_event(&mut self, ev: &ServerEvent) {
        if let ServerEvent::SessionEnded { reason } = ev {
            self.end_reason = Some(reason.clone());
        }
        if !self.events_open {
            return;
        }
        self.codec.encode(ev, &mut self.wire);
        let mut wire = std::mem::take(&mut self.wire);
        for msg in wire.drain(..) {
            if !self.queue(Message::Text(msg.into())) {
                self.events_dropped += 1;
            }
        }
        self.wire = wire;
    }

    async fn add_candidate(
        &mut self,
        _candidate: webrtc::peer_connection::RTCIceCandidateInit,
    ) -> Result<(), LinkError> {
        Err(LinkError::Unsupported("websocket"))
    }

    async fn loss_fraction(&mut self) -> Option<f64> {
        // TCP: nothing is lost, so the encoder needs no FEC.
        None
    }

    fn stats(&self) -> LinkStats {
        LinkStats {
            audio_in: self.counters.audio_in.load(Ordering::Relaxed),
            audio_dropped: self.counters.audio_dropped.load(Ordering::Relaxed),
            messages_dropped: self.counters.messages_dropped.load(Ordering::Relaxed),
            events_dropped: self.events_dropped,
            audio_out_dropped: self.audio_out_dropped,
        }
    }

    async fn close(&mut self, grace: Duration) {
        let code = match self.end_reason.as_deref() {
            Some("server_shutdown") => code::GOING_AWAY,
            _ => code::NORMAL,
        };
        let reason = self.end_reason.take().unwrap_or_else(|| "session ended".to_owned());
        // The writer sends what is queued, then this close frame (a close already requested
        // wins), within CLOSE_TIMEOUT; we wait for it at most `grace`.
        self.close.send_if_modified(|c| {
            c.is_none() && {
                *c = Some((code, reason));
                true
            }
        });
        self.tx = None;
        let mut done = self.done.clone();
        let _ = tokio::time::timeout(grace, done.wait_for(|d| *d)).await;
    }
}

fn tx_weak<C: EventCodec>(link: &WsLink<C>) -> Option<mpsc::WeakSender<Message>> {
    link.tx.as_ref().map(mpsc::Sender::downgrade)
}

impl WsPump {
    /// Run the socket until the session or the client ends it.
    pub async fn run(self, socket: WebSocket) {
        self.run_as(socket, None).await
    }

    /// Run a N.E.K.O. socket whose `start_session` was read (`rate_hz`: the client's audio rate
    /// when it named one; else 16 kHz for 160- or 320-sample chunks, 48 kHz otherwise;
    /// `language`: the user's language when it named one, as a `language_update`).
    pub async fn run_neko(self, socket: WebSocket, rate_hz: Option<u32>, language: Option<String>) {
        let _ = self.to_link.send(FromSocket::Format(WireAudio::Pcm16 { rate_hz: media::OPUS_RATE })).await;
        if let Some(language) = language {
            let update = serde_json::json!({"action": "language_update", "language": language}).to_string();
            let _ = self.to_link.send(FromSocket::Text(update.into())).await;
        }
        let neko = NekoIn { out: self.neko_out.clone(), rate_hz };
        self.run_as(socket, Some(neko)).await
    }

    async fn run_as(self, socket: WebSocket, neko: Option<NekoIn>) {
        let (sink, stream) = socket.split();
        let epoch = Instant::now();
        let last_seen = Arc::new(AtomicU64::new(0));
        let liveness = Liveness { last_seen: Arc::clone(&last_seen), epoch, close: self.close.clone() };
        let writer = tokio::spawn(write_loop(sink, self.from_link, liveness));
        let reader = Reader {
            to_link: self.to_link,
            close: self.close.clone(),
            counters: self.counters,
            last_seen,
            epoch,
            up: None,
            format: neko.as_ref().map(|_| WireAudio::Pcm16 { rate_hz: media::OPUS_RATE }),
            window: (Instant::now(), 0),
            neko,
        };
        let stream = reader.run(stream).await;
        // The closing handshake (RFC 6455 section 7.1.1): keep reading, and discarding, until the
        // client's close frame, so the socket is not closed with unread input (the kernel would
        // then reset it, destroying our close frame on the way).
        let drain = tokio::time::timeout(CLOSE_TIMEOUT, drain(stream));
        let _ = tokio::join!(writer, drain);
        let _ = self.done.send(true);
    }
}

/// What the writer needs to tell a silent client from a live one, and to close.
struct Liveness {
    /// Media time (ms since `epoch`) of the client's last message.
    last_seen: Arc<AtomicU64>,
    epoch: Instant,
    close: watch::Sender<CloseRequest>,
}

/// The writer: the send queue in order, pings, then the close frame. A forced close (a limit,
/// a slow client) cuts the queue; a normal one drains it first, bounded by [`CLOSE_TIMEOUT`].
async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Message>,
    live: Liveness,
) {
    let mut close = live.close.subscribe();
    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            biased;
            _ = close.changed() => {
                if forced(&close) { break }
                deadline.get_or_insert(tokio::time::Instant::now() + CLOSE_TIMEOUT);
                continue;
            }
            msg = queue.recv() => match msg { Some(m) => m, None => break },
            _ = ping.tick() => {
                let seen = Duration::from_millis(live.last_seen.load(Ordering::Relaxed));
                if live.epoch.elapsed().saturating_sub(seen) > LIVENESS_TIMEOUT {
                    live.close.send_replace(Some((code::GOING_AWAY, "no answer to pings".into())));
                    break;
                }
                Message::Ping(Bytes::new())
            }
        };
        let give_up = sleep_until_opt(deadline);
        tokio::select! {
            r = sink.send(msg) => if r.is_err() { return },
            _ = close.changed() => if forced(&close) { break },
            _ = give_up => return,
        }
    }
    let (code, reason) = close.borrow().clone().unwrap_or((code::NORMAL, "session ended".to_owned()));
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sink.send(close_msg(code, &reason))).await;
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether the close asked for cuts the queue: anything but the session's normal end.
fn forced(close: &watch::Receiver<CloseRequest>) -> bool {
    close.borrow().as_ref().is_some_and(|(c, _)| *c != code::NORMAL && *c != code::GOING_AWAY)
}

pub(crate) fn close_msg(code: u16, reason: &str) -> Message {
    // RFC 6455 section 5.5: a control frame's payload is <= 125 bytes (2 of them the code).
    Message::Close(Some(CloseFrame { code, reason: truncate(reason, 123).into() }))
}

/// The reader: limits, the format handshake, the client's audio.
struct Reader {
    to_link: mpsc::Sender<FromSocket>,
    close: watch::Sender<CloseRequest>,
    counters: Arc<ReaderCounters>,
    last_seen: Arc<AtomicU64>,
    epoch: Instant,
    up: Option<PcmToOpus>,
    format: Option<WireAudio>,
    /// Start of the current one-second window and the messages in it.
    window: (Instant, u32),
    /// N.E.K.O. mode.
    neko: Option<NekoIn>,
}

/// The reader's N.E.K.O. state.
struct NekoIn {
    out: Option<mpsc::WeakSender<Message>>,
    rate_hz: Option<u32>,
}

/// Why the reader stops: the close to send, if any.
type Stop = Option<(u16, String)>;

impl Reader {
    /// Read until the client or a limit ends it; the stream is handed back for the close.
    async fn run(mut self, mut stream: SplitStream<WebSocket>) -> SplitStream<WebSocket> {
        let mut closing = self.close.subscribe();
        let format_deadline = tokio::time::Instant::now() + FORMAT_TIMEOUT;
        let stop = loop {
            let format_wait = async {
                if self.format.is_none() {
                    tokio::time::sleep_until(format_deadline).await
                } else {
                    std::future::pending().await
                }
            };
            let msg = tokio::select! {
                _ = closing.changed() => break None,
                _ = format_wait => break Some((code::POLICY, "no audio.format message in time".to_owned())),
                msg = stream.next() => msg,
            };
            match self.on_message(msg).await {
                Ok(()) => {}
                Err(stop) => break stop,
            }
        };
        if let Some((code, reason)) = stop {
            tracing::debug!(code, %reason, "closing the WebSocket");
            self.close.send_if_modified(|c| {
                c.is_none() && {
                    *c = Some((code, reason));
                    true
                }
            });
        } else {
            // The client left: the session ends, the writer stops with it.
            self.close.send_if_modified(|c| {
                c.is_none() && {
                    *c = Some((code::NORMAL, "client closed".into()));
                    true
                }
            });
        }
        stream
    }

    async fn on_message(&mut self, msg: Option<Result<Message, axum::Error>>) -> Result<(), Stop> {
        let msg = match msg {
            None | Some(Ok(Message::Close(_))) => return Err(None),
            Some(Err(e)) => return Err(read_error(&e)),
            Some(Ok(m)) => m,
        };
        self.last_seen.store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.rate_limit()?;
        match msg {
            Message::Text(t) if t.len() > MAX_MESSAGE_BYTES => Err(too_big(t.len())),
            Message::Binary(b) if b.len() > MAX_MESSAGE_BYTES => Err(too_big(b.len())),
            Message::Text(t) if self.neko.is_some() => self.on_neko_text(t).await,
            Message::Binary(_) if self.neko.is_some() => {
                Err(Some((code::UNSUPPORTED, "N.E.K.O. clients send audio as stream_data".into())))
            }
            Message::Text(t) if self.format.is_none() => self.on_format(&t).await,
            Message::Text(t) => {
                if self.to_link.try_send(FromSocket::Text(t)).is_err() {
                    self.counters.messages_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            Message::Binary(b) => self.on_audio(b),
            _ => Ok(()),
        }
    }

    /// One N.E.K.O. action: audio and images here, `end_session` ends, unknown actions get a
    /// `status`; the rest goes to the codec. Malformed JSON ends the session, as in N.E.K.O.
    async fn on_neko_text(&mut self, t: Utf8Bytes) -> Result<(), Stop> {
        let v: serde_json::Value = serde_json::from_str(&t)
            .map_err(|_| Some((code::INVALID_PAYLOAD, "malformed JSON ends the session".to_owned())))?;
        match (v["action"].as_str(), v["input_type"].as_str()) {
            (Some("stream_data"), Some("audio")) => self.on_neko_audio(&v["data"]),
            (Some("end_session"), _) => {
                let _ = self.to_link.send(FromSocket::End(EndReason::ClientRequest)).await;
                Err(Some((code::NORMAL, "end_session".into())))
            }
            // Text, screen/camera images, `ping`, the language: the codec's (`NekoCodec::decode`).
            (
                Some(
                    "stream_data" | "ping" | "pause_session" | "voice_play_start" | "voice_play_end"
                    | "language_update" | "greeting_check" | "start_session",
                ),
                _,
            ) => {
                if self.to_link.try_send(FromSocket::Text(t)).is_err() {
                    self.counters.messages_dropped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
            (action, _) => {
                let action = truncate(action.unwrap_or("(none)"), 64).to_owned();
                self.neko_status("UNKNOWN_ACTION", &format!("unknown action `{action}`"));
                Ok(())
            }
        }
    }

    /// `stream_data` audio: a JSON array of int16 samples.
    fn on_neko_audio(&mut self, data: &serde_json::Value) -> Result<(), Stop> {
        let Some(arr) = data.as_array() else {
            self.neko_status("INVALID_AUDIO", "audio data must be an array of int16 samples");
            return Ok(());
        };
        let samples: Option<Vec<i16>> = arr.iter().map(|x| x.as_i64().and_then(|i| i16::try_from(i).ok())).collect();
        let Some(samples) = samples else {
            self.neko_status("INVALID_AUDIO", "audio data must be an array of int16 samples");
            return Ok(());
        };
        if self.up.is_none() {
            let named = self.neko.as_ref().and_then(|n| n.rate_hz);
            let rate = named.unwrap_or(if matches!(samples.len(), 160 | 320) { 16_000 } else { 48_000 });
            self.up = Some(PcmToOpus::new(rate).map_err(|e| Some((code::POLICY, e.to_string())))?);
        }
        let arrival = Instant::now();
        let (to_link, counters) = (&self.to_link, &self.counters);
        if let Some(up) = self.up.as_mut() {
            up.push_samples(&samples, &mut |seq, payload| forward(to_link, counters, arrival, seq, payload));
        }
        Ok(())
    }

    fn neko_status(&self, code: &str, details: &str) {
        let out = self.neko.as_ref().and_then(|n| n.out.as_ref()).and_then(mpsc::WeakSender::upgrade);
        if let Some(out) = out {
            let _ = out.try_send(Message::Text(super::neko::status(code, details).into()));
        }
    }

    fn rate_limit(&mut self) -> Result<(), Stop> {
        let (start, n) = &mut self.window;
        if start.elapsed() >= Duration::from_secs(1) {
            *start = Instant::now();
            *n = 0;
        }
        *n += 1;
        if *n > MAX_MESSAGES_PER_SEC {
            return Err(Some((code::POLICY, format!("more than {MAX_MESSAGES_PER_SEC} messages in one second"))));
        }
        Ok(())
    }

    async fn on_format(&mut self, text: &str) -> Result<(), Stop> {
        let format = WireAudio::from_message(text).map_err(|reason| Some((code::POLICY, reason)))?;
        if let WireAudio::Pcm16 { rate_hz } = format {
            let up = PcmToOpus::new(rate_hz).map_err(|e| Some((code::POLICY, e.to_string())))?;
            self.up = Some(up);
        }
        self.format = Some(format);
        self.to_link.send(FromSocket::Format(format)).await.map_err(|_| None)
    }

    fn on_audio(&mut self, b: Bytes) -> Result<(), Stop> {
        let Some(format) = self.format else {
            return Err(Some((code::POLICY, "binary audio before the audio.format message".into())));
        };
        if b.len() < HEADER_LEN || b[0] != KIND_AUDIO {
            return Err(Some((code::UNSUPPORTED, "unknown binary frame (kind byte 0x01 = audio)".into())));
        }
        let seq = u16::from_be_bytes([b[2], b[3]]);
        let arrival = Instant::now();
        let (to_link, counters) = (&self.to_link, &self.counters);
        let mut forward = |seq: u16, payload: Bytes| forward(to_link, counters, arrival, seq, payload);
        match (format, self.up.as_mut()) {
            (WireAudio::Pcm16 { .. }, Some(up)) => {
                if !(b.len() - HEADER_LEN).is_multiple_of(2) {
                    return Err(Some((code::INVALID_PAYLOAD, "PCM16 payload of an odd byte length".into())));
                }
                up.push(&b[HEADER_LEN..], &mut forward);
            }
            _ => forward(seq, b.slice(HEADER_LEN..)),
        }
        Ok(())
    }
}

/// Hand one Opus packet of the client to the session task (dropped and counted when it is behind).
fn forward(to_link: &mpsc::Sender<FromSocket>, counters: &ReaderCounters, arrival: Instant, seq: u16, payload: Bytes) {
    counters.audio_in.fetch_add(1, Ordering::Relaxed);
    if to_link.try_send(FromSocket::Audio { arrival, seq, payload }).is_err() {
        counters.audio_dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Read and discard until the client's close frame or the end of the connection.
pub(crate) async fn drain(mut stream: SplitStream<WebSocket>) {
    while let Some(Ok(msg)) = stream.next().await {
        if matches!(msg, Message::Close(_)) {
            break;
        }
    }
}

fn too_big(len: usize) -> Stop {
    Some((code::TOO_BIG, format!("message of {len} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")))
}

/// A read error: oversize messages get 1009; anything else (broken connection, bad framing)
/// just ends the socket.
pub(crate) fn read_error(e: &axum::Error) -> Stop {
    let text = e.to_string();
    if text.contains("Space limit exceeded") || text.contains("too long") || text.contains("too big") {
        return Some((code::TOO_BIG, format!("message exceeds the limit of {MAX_MESSAGE_BYTES} bytes")));
    }
    tracing::debug!(error = %text, "WebSocket read failed");
    None
}

/// The client's PCM16 at its rate -> 48 kHz -> 20 ms Opus packets for the session's uplink.
struct PcmToOpus {
    rs: media::Resampler,
    samples: Vec<i16>,
    pcm48: Vec<i16>,
    enc: media::OpusEncoder,
    out: Box<[u8; 1500]>,
    seq: u16,
}

impl PcmToOpus {
    fn new(rate_hz: u32) -> Result<Self, media::MediaError> {
        let enc = media::OpusEncoder::new(media::EncoderConfig { complexity: 1, ..Default::default() })?;
        Ok(Self {
            rs: media::Resampler::new(rate_hz, media::OPUS_RATE, media::Alignment::Stream)?,
            // Sized for 20 ms frames; a client sending larger frames grows them once.
            samples: Vec::with_capacity(media::pcm::FRAME_SAMPLES),
            pcm48: Vec::with_capacity(4 * media::pcm::FRAME_SAMPLES),
            enc,
            out: Box::new([0; 1500]),
            seq: 0,
        })
    }

    /// Take little-endian PCM16 bytes (even length); emit every whole 20 ms packet.
    fn push(&mut self, le: &[u8], emit: &mut impl FnMut(u16, Bytes)) {
        let mut samples = std::mem::take(&mut self.samples);
        samples.clear();
        samples.extend(le.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])));
        self.push_samples(&samples, emit);
        self.samples = samples;
    }

    /// Take samples at the client's rate; emit every whole 20 ms packet.
    fn push_samples(&mut self, samples: &[i16], emit: &mut impl FnMut(u16, Bytes)) {
        let pcm48 = &mut self.pcm48;
        if let Err(e) = self.rs.process(samples, &mut |chunk| pcm48.extend_from_slice(chunk)) {
            tracing::debug!(error = %e, "resampling client audio failed");
            return;
        }
        let n = media::pcm::FRAME_SAMPLES;
        let mut at = 0;
        while self.pcm48.len() - at >= n {
            if let Ok(len) = self.enc.encode(&self.pcm48[at..at + n], &mut self.out[..]) {
                emit(self.seq, Bytes::copy_from_slice(&self.out[..len]));
                self.seq = self.seq.wrapping_add(1);
            }
            at += n;
        }
        self.pcm48.drain(..at);
    }
}

/// The playout's Opus frames -> PCM16 little-endian at the client's rate.
struct OpusToPcm {
    dec: media::OpusDecoder,
    rs: media::Resampler,
    pcm48: Box<[i16; media::pcm::FRAME_SAMPLES * 6]>,
}

impl OpusToPcm {
    fn new(rate_hz: u32) -> Result<Self, media::MediaError> {
        Ok(Self {
            dec: media::OpusDecoder::new()?,
            rs: media::Resampler::new(media::OPUS_RATE, rate_hz, media::Alignment::Stream)?,
            pcm48: Box::new([0; media::pcm::FRAME_SAMPLES * 6]),
        })
    }

    /// Decode one packet and append its PCM16 LE bytes to `out` (a packet libopus rejects is
    /// concealed as 20 ms).
    fn decode(&mut self, packet: &[u8], out: &mut Vec<u8>) {
        let n = match self.dec.decode(packet, &mut self.pcm48[..]) {
            Ok(n) => n,
            Err(_) => self.dec.conceal(media::pcm::FRAME_SAMPLES, &mut self.pcm48[..]).unwrap_or(0),
        };
        let sink = &mut |chunk: &[i16]| out.extend(chunk.iter().flat_map(|s| s.to_le_bytes()));
        if let Err(e) = self.rs.process(&self.pcm48[..n], sink) {
            tracing::debug!(error = %e, "resampling agent audio failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_format_message_names_codec_and_rate() {
        assert_eq!(WireAudio::from_message(r#"{"type":"audio.format","codec":"opus"}"#), Ok(WireAudio::Opus));
        for rate in [16_000, 24_000, 48_000] {
            let msg = format!(r#"{{"type":"audio.format","codec":"pcm16","rate_hz":{rate}}}"#);
            assert_eq!(WireAudio::from_message(&msg), Ok(WireAudio::Pcm16 { rate_hz: rate }));
        }
        for bad in [
            r#"{"type":"audio.format","codec":"pcm16","rate_hz":44100}"#,
            r#"{"type":"audio.format","codec":"pcm16"}"#,
            r#"{"type":"audio.format","codec":"mp3"}"#,
            r#"{"type":"ping"}"#,
            r#"{"type":"audio.format","codec":"opus","extra":1}"#,
            "garbage",
        ] {
            assert!(WireAudio::from_message(bad).is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn client_vad_and_end_turn_are_link_messages() {
        assert_eq!(client_voice(r#"{"type":"control.end_turn"}"#), Some(ClientVoice::EndTurn));
        assert_eq!(client_voice(r#"{"type":"vad","state":"speech_started"}"#), Some(ClientVoice::SpeechStarted));
        assert_eq!(client_voice(r#"{"type":"vad","state":"speech_stopped"}"#), Some(ClientVoice::SpeechStopped));
        assert_eq!(client_voice(r#"{"type":"vad","state":"maybe"}"#), None);
        assert_eq!(client_voice(r#"{"type":"text","text":"\"vad\""}"#), None);
    }

    #[test]
    fn playback_progress_is_a_link_message() {
        let ev = client_playback(r#"{"type":"playback","item_id":"r1","played_ms":740}"#);
        assert!(matches!(ev, Some(LinkEvent::Playback { ref item_id, played })
            if item_id == "r1" && played == Duration::from_millis(740)));
        assert!(client_playback(r#"{"type":"playback","item_id":"r1"}"#).is_none(), "played_ms is required");
        assert!(client_playback(r#"{"type":"text","text":"\"playback\""}"#).is_none());
    }

    #[test]
    fn pcm_round_trips_through_opus_at_each_rate() {
        for rate in [16_000u32, 24_000, 48_000] {
            let mut up = PcmToOpus::new(rate).unwrap();
            let mut down = OpusToPcm::new(rate).unwrap();
            // 1 s of a 440 Hz tone at -12 dBFS, sent as 10 ms frames.
            let tone: Vec<i16> = (0..rate)
                .map(|i| (8000.0 * (i as f64 * 440.0 * std::f64::consts::TAU / rate as f64).sin()) as i16)
                .collect();
            let mut packets = Vec::new();
            for chunk in tone.chunks(rate as usize / 100) {
                let le: Vec<u8> = chunk.iter().flat_map(|s| s.to_le_bytes()).collect();
                up.push(&le, &mut |seq, p| packets.push((seq, p)));
            }
            // 1 s minus the resampler's startup delay: 49 or 50 packets, numbered in order.
            assert!((49..=50).contains(&packets.len()), "{rate} Hz: {} packets", packets.len());
            assert!(packets.iter().enumerate().all(|(i, (s, _))| *s as usize == i));
            let mut out = Vec::new();
            for (_, p) in &packets {
                down.decode(p, &mut out);
            }
            let pcm: Vec<i16> = out.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
            let secs = pcm.len() as f64 / f64::from(rate);
            assert!((0.95..=1.0).contains(&secs), "{rate} Hz: {secs:.3} s back");
            let tail = &pcm[pcm.len() / 2..];
            let rms = (tail.iter().map(|&s| f64::from(s).powi(2)).sum::<f64>() / tail.len() as f64).sqrt();
            // A sine of amplitude 8000 has an RMS of ~5657.
            assert!((4500.0..7000.0).contains(&rms), "{rate} Hz: RMS {rms:.0}");
        }
    }
}
