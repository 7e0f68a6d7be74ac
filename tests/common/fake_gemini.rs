//! A fake Gemini Live server: a real WebSocket server on loopback speaking the Live API's
//! `BidiGenerateContent` messages (ai.google.dev/api/live), scripted per test. It records per
//! connection the handshake path, every client message but audio, the user's audio (decoded,
//! 16 kHz) and the resumption handle it was opened with. It answers `setup` with
//! `setupComplete`, detects the user's turns by energy (automatic activity detection) or by
//! `activityStart` / `activityEnd`, answers text turns, streams scripted replies faster than real
//! time (audio + `outputTranscription`), interrupts itself when the user speaks over it, runs
//! the tool-call handshake, and sends `sessionResumptionUpdate` after each turn and `goAway`
//! followed by a forced close when scripted. Frames go out as text or, optionally, binary.
//! It shares no code with the product's protocol module, so the two check each other.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use super::energy_vad::{EnergyVad, VadEdge};
use super::fake_openai::SpokenReply;

/// What the fake answers a user turn with.
#[derive(Debug, Clone)]
pub enum GReply {
    /// A spoken reply (24 kHz) with this transcript.
    Speech { text: String, audio: Vec<i16> },
    /// A function call; the reply after it answers once the response for it arrived.
    ToolCall { name: String, args: Value },
    /// A function call the model cancels `after` it was sent (the next reply then starts at once).
    CancelledToolCall { name: String, args: Value, after: Duration },
    /// Speech during which `goAway {timeLeft}` is sent after `go_away_after` of its audio went
    /// out; the connection is closed (1001) `time_left` later.
    SpeechWithGoAway { text: String, audio: Vec<i16>, go_away_after: Duration, time_left: Duration },
    /// Speech, then the connection drops without a close frame or goAway (a network failure)
    /// right after the turn's resumption update.
    SpeechThenDrop { text: String, audio: Vec<i16> },
}

/// Knobs of the fake.
#[derive(Debug, Clone)]
pub struct GOptions {
    /// Send every server message as a binary frame (the real service does).
    pub binary: bool,
    /// What the user "said" (input transcription).
    pub user_transcript: String,
    /// Audio per `serverContent`.
    pub chunk: Duration,
    /// Time between chunks (faster than real time, like the real service).
    pub interval: Duration,
}

impl Default for GOptions {
    fn default() -> Self {
        Self {
            binary: false,
            user_transcript: "What is the weather like?".into(),
            chunk: Duration::from_millis(100),
            interval: Duration::from_millis(25),
        }
    }
}

/// Everything one connection received.
#[derive(Debug, Clone, Default)]
pub struct GConn {
    /// Request path and query.
    pub path: String,
    /// Every client message except `realtimeInput.audio`, in order.
    pub received: Vec<Value>,
    /// Decoded user audio (16 kHz).
    pub audio: Vec<i16>,
    /// The `setup` message.
    pub setup: Value,
    /// The handle it resumed (None: a new session).
    pub resumed: Option<String>,
    /// The handles it issued, in order.
    pub issued: Vec<String>,
    /// Client message count (setup = index 0) when each `toolResponse` / turn arrived, etc.
    pub messages: u64,
    /// The socket is gone.
    pub closed: bool,
    /// When it was accepted.
    pub opened_at: Option<Instant>,
    /// When the fake closed it (goAway).
    pub forced_close_at: Option<Instant>,
}

impl GConn {
    /// Client messages that carry `field` at the top level.
    pub fn with(&self, field: &str) -> Vec<Value> {
        self.received.iter().filter(|v| v.get(field).is_some()).cloned().collect()
    }
    /// Position of the first message matching `pred`.
    pub fn pos(&self, pred: impl Fn(&Value) -> bool) -> Option<usize> {
        self.received.iter().position(pred)
    }
}

#[derive(Default)]
pub struct State {
    script: VecDeque<GReply>,
    handles: u64,
}

/// The fake server.
pub type FakeGemini = super::FakeServer<State, GOptions, GConn>;

impl FakeGemini {
    /// Serve `script` at the Live API's path; [`FakeGemini::url`] is the URL to configure
    /// (`GEMINI_LIVE_URL`).
    pub async fn start(opts: GOptions, script: Vec<GReply>) -> FakeGemini {
        let state = State { script: script.into(), ..Default::default() };
        let path = "/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent";
        Self::listen(state, opts, path, Self::serve).await
    }

    async fn serve(self, tcp: tokio::net::TcpStream) {
        let mut path = String::new();
        #[allow(clippy::result_large_err)]
        let cb = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            path = req.uri().to_string();
            Ok(resp)
        };
        let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else { return };
        let idx = self.open_conn(GConn { path, opened_at: Some(Instant::now()), ..Default::default() });
        GSession::new(self.clone(), idx).run(ws).await;
        self.with_conn(idx, |c| c.closed = true);
    }
}

/// A reply being streamed.
struct Streaming {
    reply: SpokenReply,
    go_away: Option<(usize, Duration)>,
    drop_after: bool,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

struct GSession {
    fake: FakeGemini,
    idx: usize,
    setup_done: bool,
    server_vad: bool,
    streaming: Option<Streaming>,
    /// A tool call waiting for its response: its id.
    waiting_tool: Option<String>,
    cancel_at: Option<(tokio::time::Instant, String)>,
    close_at: Option<tokio::time::Instant>,
    /// Drop the socket (no close frame) once the pending messages are out.
    drop_now: bool,
    calls: u64,
    // Turn detection.
    in_activity: bool,
    activity_audio: usize,
    vad: EnergyVad,
}

impl GSession {
    fn new(fake: FakeGemini, idx: usize) -> Self {
        GSession {
            fake,
            idx,
            setup_done: false,
            server_vad: true,
            streaming: None,
            waiting_tool: None,
            cancel_at: None,
            close_at: None,
            drop_now: false,
            calls: 0,
            in_activity: false,
            activity_audio: 0,
            vad: EnergyVad::new(16_000),
        }
    }

    async fn send(&self, ws: &mut Ws, v: Value) -> bool {
        let msg = if self.fake.opts.binary {
            Message::binary(v.to_string().into_bytes())
        } else {
            Message::text(v.to_string())
        };
        ws.send(msg).await.is_ok()
    }

    async fn run(mut self, mut ws: Ws) {
        let mut tick = tokio::time::interval(self.fake.opts.interval);
        loop {
            let mut out = Vec::new();
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            let cancel_at = self.cancel_at.as_ref().map_or(far, |(t, _)| *t);
            let close_at = self.close_at.unwrap_or(far);
            tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        self.on_message(v, &mut out);
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                },
                _ = tick.tick(), if self.streaming.is_some() => self.stream_step(&mut out),
                _ = tokio::time::sleep_until(cancel_at), if self.cancel_at.is_some() => {
                    let (_, id) = self.cancel_at.take().unwrap();
                    out.push(json!({"toolCallCancellation": {"ids": [id]}}));
                    self.next_reply(&mut out);
                }
                _ = tokio::time::sleep_until(close_at), if self.close_at.is_some() => {
                    self.fake.with_conn(self.idx, |c| c.forced_close_at = Some(Instant::now()));
                    let frame = CloseFrame { code: CloseCode::Away, reason: "session time is up".into() };
                    let _ = ws.close(Some(frame)).await;
                    return;
                }
            }
            for v in out {
                if !self.send(&mut ws, v).await {
                    return;
                }
            }
            if self.drop_now {
                self.fake.with_conn(self.idx, |c| c.forced_close_at = Some(Instant::now()));
                return; // dropped: no close frame, like a network failure
            }
        }
    }

    fn on_message(&mut self, v: Value, out: &mut Vec<Value>) {
        let n = self.fake.with_conn(self.idx, |c| {
            c.messages += 1;
            c.messages - 1
        });
        if let Some(a) = v.pointer("/realtimeInput/audio") {
            assert_eq!(a["mimeType"], "audio/pcm;rate=16000", "input audio format");
            let bytes = base64::engine::general_purpose::STANDARD.decode(a["data"].as_str().unwrap_or("")).unwrap();
            let samples: Vec<i16> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
            self.fake.with_conn(self.idx, |c| c.audio.extend_from_slice(&samples));
            self.on_audio(&samples, out);
            return;
        }
        self.fake.with_conn(self.idx, |c| c.received.push(v.clone()));
        assert_eq!(v.as_object().map(|o| o.len()), Some(1), "exactly one field per client message: {v}");
        if let Some(setup) = v.get("setup") {
            assert_eq!(n, 0, "setup comes first");
            self.on_setup(setup, out);
        } else {
            assert!(self.setup_done, "nothing before setupComplete: {v}");
        }
        if v.pointer("/realtimeInput/activityStart").is_some() {
            self.in_activity = true;
            self.activity_audio = 0;
            self.interrupt(out);
        }
        if v.pointer("/realtimeInput/activityEnd").is_some() && self.in_activity {
            self.in_activity = false;
            if self.activity_audio > 0 {
                self.user_turn_ended(out);
            }
        }
        if let Some(cc) = v.get("clientContent")
            && cc["turnComplete"] == true
        {
            self.next_reply(out);
        }
        if let Some(tr) = v.get("toolResponse") {
            let answered: Vec<&str> =
                tr["functionResponses"].as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
            if self.waiting_tool.as_deref().is_some_and(|w| answered.contains(&w)) {
                self.waiting_tool = None;
                self.next_reply(out);
            }
        }
    }

    fn on_setup(&mut self, setup: &Value, out: &mut Vec<Value>) {
        self.server_vad =
            setup.pointer("/realtimeInputConfig/automaticActivityDetection/disabled") != Some(&json!(true));
        let handle = setup.pointer("/sessionResumption/handle").and_then(Value::as_str).map(str::to_owned);
        self.fake.with_conn(self.idx, |c| {
            c.setup = setup.clone();
            c.resumed = handle;
        });
        self.setup_done = true;
        out.push(json!({"setupComplete": {}}));
        self.resumption_update(out);
    }

    fn resumption_update(&mut self, out: &mut Vec<Value>) {
        let last = self.fake.with_conn(self.idx, |c| c.messages.saturating_sub(1));
        let handle = {
            let mut st = self.fake.state.lock().unwrap();
            st.handles += 1;
            format!("handle-{}", st.handles)
        };
        self.fake.with_conn(self.idx, |c| c.issued.push(handle.clone()));
        out.push(json!({"sessionResumptionUpdate": {"newHandle": handle, "resumable": true, "lastConsumedClientMessageIndex": last.to_string()}}));
    }

    fn on_audio(&mut self, samples: &[i16], out: &mut Vec<Value>) {
        if !self.server_vad {
            if self.in_activity {
                self.activity_audio += samples.len();
            }
            return;
        }
        for edge in self.vad.push(samples) {
            match edge {
                VadEdge::Started => self.interrupt(out),
                VadEdge::Ended => self.user_turn_ended(out),
            }
        }
    }

    /// The user spoke over the model: it stops, says so, and ends its turn.
    fn interrupt(&mut self, out: &mut Vec<Value>) {
        if self.streaming.take().is_some() {
            out.push(json!({"serverContent": {"interrupted": true}}));
            out.push(json!({"serverContent": {"turnComplete": true}}));
        }
    }

    fn user_turn_ended(&mut self, out: &mut Vec<Value>) {
        let t = self.fake.opts.user_transcript.clone();
        let cut = t.find(' ').map_or(t.len(), |i| i + 1);
        out.push(json!({"serverContent": {"inputTranscription": {"text": &t[..cut]}}}));
        out.push(json!({"serverContent": {"inputTranscription": {"text": &t[cut..]}}}));
        self.next_reply(out);
    }

    fn next_reply(&mut self, out: &mut Vec<Value>) {
        let next = self.fake.state.lock().unwrap().script.pop_front();
        match next {
            None => {
                out.push(json!({"serverContent": {"turnComplete": true}}));
                self.resumption_update(out);
            }
            Some(GReply::Speech { text, audio }) => {
                self.streaming =
                    Some(Streaming { reply: SpokenReply::new(text, audio), go_away: None, drop_after: false })
            }
            Some(GReply::SpeechThenDrop { text, audio }) => {
                self.streaming =
                    Some(Streaming { reply: SpokenReply::new(text, audio), go_away: None, drop_after: true })
            }
            Some(GReply::SpeechWithGoAway { text, audio, go_away_after, time_left }) => {
                let at = go_away_after.as_millis() as usize * 24;
                let reply = SpokenReply::new(text, audio);
                self.streaming = Some(Streaming { reply, go_away: Some((at, time_left)), drop_after: false })
            }
            Some(GReply::ToolCall { name, args }) => {
                let id = self.call_id();
                out.push(json!({"toolCall": {"functionCalls": [{"id": id, "name": name, "args": args}]}}));
                self.waiting_tool = Some(id);
            }
            Some(GReply::CancelledToolCall { name, args, after }) => {
                let id = self.call_id();
                out.push(json!({"toolCall": {"functionCalls": [{"id": id, "name": name, "args": args}]}}));
                self.cancel_at = Some((tokio::time::Instant::now() + after, id));
            }
        }
    }

    fn call_id(&mut self) -> String {
        self.calls += 1;
        format!("function-call-{}-{}", self.idx, self.calls)
    }

    fn stream_step(&mut self, out: &mut Vec<Value>) {
        let chunk = self.fake.opts.chunk.as_millis() as usize * 24;
        let Some(s) = self.streaming.as_mut() else { return };
        if let Some(b64) = s.reply.next_audio(chunk) {
            out.push(json!({"serverContent": {"modelTurn": {"parts": [{"inlineData": {"mimeType": "audio/pcm;rate=24000", "data": b64}}]}}}));
            // Transcription chunks run ahead of the audio and come as separate messages.
            if let Some(delta) = s.reply.transcript_delta() {
                out.push(json!({"serverContent": {"outputTranscription": {"text": delta}}}));
            }
            if let Some((at, left)) = s.go_away
                && s.reply.pos >= at
            {
                s.go_away = None;
                out.push(json!({"goAway": {"timeLeft": format!("{:.3}s", left.as_secs_f64())}}));
                self.close_at = Some(tokio::time::Instant::now() + left);
            }
            return;
        }
        let drop = self.streaming.take().is_some_and(|s| s.drop_after);
        out.push(json!({"serverContent": {"generationComplete": true}}));
        out.push(json!({"serverContent": {"turnComplete": true}, "usageMetadata": {
            "promptTokenCount": 250, "responseTokenCount": 71, "totalTokenCount": 321,
            "promptTokensDetails": [{"modality": "AUDIO", "tokenCount": 180}, {"modality": "TEXT", "tokenCount": 70}],
            "responseTokensDetails": [{"modality": "AUDIO", "tokenCount": 71}],
        }}));
        self.resumption_update(out);
        self.drop_now = drop;
    }
}
