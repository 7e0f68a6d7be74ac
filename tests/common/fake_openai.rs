//! A fake OpenAI Realtime server: a real WebSocket server on loopback speaking the real wire
//! protocol (GA or beta names), scripted per test. It records everything it receives per
//! connection (messages, decoded input audio at 24 kHz, handshake headers) and answers each
//! `response.create` (or each turn its energy VAD detects, in server-VAD mode) with the next
//! scripted [`Reply`]: speech with transcript deltas, a tool call, a mid-response disconnect.
//! Connections can be refused (HTTP 503) or expired (`session_expired` error, then close).
//! It does not share code with the product's protocol module, so the two check each other.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};

use super::energy_vad::{EnergyVad, VadEdge};

/// Input tokens every response's `usage` reports.
pub const INPUT_TOKENS: u64 = 120;
/// Milliseconds of output audio per reported output token.
pub const AUDIO_MS_PER_TOKEN: u64 = 50;

/// What the fake answers a response with.
#[derive(Debug, Clone)]
pub enum Reply {
    /// Spoken reply (24 kHz) with this transcript.
    Speech { text: String, audio: Vec<i16> },
    /// A function call; the next reply answers the follow-up `response.create`.
    ToolCall { name: String, arguments: String },
    /// Like `Speech`, but the socket is dropped (no close frame) after this much audio was sent.
    DropAfter { text: String, audio: Vec<i16>, after: Duration },
    /// Speech composed from what the model was given: `prefix` and the `output` of the last
    /// `function_call_output` item this connection received, spoken by eSpeak NG (24 kHz).
    SpeakToolOutput { prefix: String },
}

/// Knobs of the fake.
#[derive(Debug, Clone)]
pub struct FakeOptions {
    /// GA names (true) or beta names (false).
    pub ga: bool,
    /// Detect turns by energy and answer them (server VAD), as OpenAI does by default.
    pub server_vad: bool,
    /// What the user "said" (input transcription).
    pub user_transcript: String,
    /// Audio per delta.
    pub chunk: Duration,
    /// Time between deltas (faster than real time, like the real service).
    pub interval: Duration,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            ga: true,
            server_vad: false,
            user_transcript: "What is the weather like?".into(),
            chunk: Duration::from_millis(100),
            interval: Duration::from_millis(25),
        }
    }
}

/// Everything one connection received.
#[derive(Debug, Clone, Default)]
pub struct ConnLog {
    /// Request path and query.
    pub path: String,
    /// Handshake headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Every message except `input_audio_buffer.append`, in order.
    pub received: Vec<Value>,
    /// Decoded input audio (s16 at the session's input rate).
    pub audio: Vec<i16>,
    /// `audio.len()` at each commit (local turn detection) or detected end of turn (server VAD).
    pub commits: Vec<usize>,
    /// The socket is gone.
    pub closed: bool,
    /// When it was accepted.
    pub opened_at: Option<Instant>,
}

impl ConnLog {
    pub fn of_type(&self, ty: &str) -> Vec<Value> {
        self.received.iter().filter(|v| v["type"] == ty).cloned().collect()
    }
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }
}

#[derive(Default)]
pub struct State {
    script: VecDeque<Reply>,
    /// Handshakes refused with 503 from this connection index on (None: never).
    refuse_from: Option<usize>,
    /// Connection index -> expire after this long.
    expire: Vec<(usize, Duration)>,
    /// Connection index -> goes silent after this many completed responses (0: sends nothing,
    /// not even `session.created`); it keeps reading and recording.
    mute: Vec<(usize, usize)>,
    handshakes: usize,
}

/// The fake server.
pub type FakeOpenAi = super::FakeServer<State, FakeOptions, ConnLog>;

impl FakeOpenAi {
    /// Serve `script` at `/v1/realtime`; [`FakeOpenAi::url`] is the URL to configure
    /// (`openai.url`).
    pub async fn start(opts: FakeOptions, script: Vec<Reply>) -> FakeOpenAi {
        let state = State { script: script.into(), ..Default::default() };
        Self::listen(state, opts, "/v1/realtime", Self::serve).await
    }

    /// Refuse handshakes (HTTP 503) from connection number `n` (0-based) on.
    pub fn refuse_from(&self, n: usize) {
        self.state.lock().unwrap().refuse_from = Some(n);
    }

    /// Connection `n` expires (error `session_expired`, then close) after `after`.
    pub fn expire(&self, n: usize, after: Duration) {
        self.state.lock().unwrap().expire.push((n, after));
    }

    /// Connection `n` goes silent after `replies` completed responses (0: accepts the socket and
    /// never sends a thing): a provider that hangs.
    pub fn mute(&self, n: usize, replies: usize) {
        self.state.lock().unwrap().mute.push((n, replies));
    }

    pub fn push_reply(&self, r: Reply) {
        self.state.lock().unwrap().script.push_back(r);
    }

    async fn serve(self, tcp: tokio::net::TcpStream) {
        let (refuse, n) = {
            let mut st = self.state.lock().unwrap();
            let n = st.handshakes;
            st.handshakes += 1;
            (st.refuse_from.is_some_and(|r| n >= r), n)
        };
        let mut log = ConnLog::default();
        // The callback's signature is tungstenite's; its large error type is not ours to box.
        #[allow(clippy::result_large_err)]
        let cb = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
            log.path = req.uri().to_string();
            log.headers = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_ascii_lowercase(), v.to_str().unwrap_or("").to_owned()))
                .collect();
            if refuse {
                let mut r = ErrorResponse::new(Some("overloaded".into()));
                *r.status_mut() = tokio_tungstenite::tungstenite::http::StatusCode::SERVICE_UNAVAILABLE;
                return Err(r);
            }
            Ok(resp)
        };
        let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, cb).await else { return };
        log.opened_at = Some(Instant::now());
        let idx = self.open_conn(log);
        let expire_at =
            self.state.lock().unwrap().expire.iter().find(|(c, _)| *c == n).map(|(_, d)| Instant::now() + *d);
        let mute = self.state.lock().unwrap().mute.iter().find(|(c, _)| *c == n).map(|(_, k)| *k);
        Conn::new(self.clone(), idx, n, mute).run(ws, expire_at).await;
        self.with_conn(idx, |c| c.closed = true);
    }
}

/// A spoken reply going out chunk by chunk, its transcript running ahead of the audio as the real
/// services' does (twice as far through the words as the audio is through its samples). The
/// Gemini and Nova Sonic fakes stream their replies with it too (Nova sends no transcript deltas).
pub struct SpokenReply {
    /// The transcript.
    pub text: String,
    /// The audio (24 kHz).
    pub audio: Vec<i16>,
    /// Samples sent so far.
    pub pos: usize,
    /// Transcript words sent so far.
    words_sent: usize,
}

impl SpokenReply {
    pub fn new(text: String, audio: Vec<i16>) -> Self {
        Self { text, audio, pos: 0, words_sent: 0 }
    }

    /// The next `chunk` samples as base64 of s16le; `None` once every sample went out.
    pub fn next_audio(&mut self, chunk: usize) -> Option<String> {
        if self.pos >= self.audio.len() {
            return None;
        }
        let end = (self.pos + chunk).min(self.audio.len());
        let bytes: Vec<u8> = self.audio[self.pos..end].iter().flat_map(|x| x.to_le_bytes()).collect();
        self.pos = end;
        Some(base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    /// The transcript words now due and not yet sent, as a delta (with a leading space after the
    /// first); `None` when none are due.
    pub fn transcript_delta(&mut self) -> Option<String> {
        let words: Vec<&str> = self.text.split_whitespace().collect();
        let due = ((words.len() * self.pos * 2).div_ceil(self.audio.len().max(1))).min(words.len());
        if due <= self.words_sent {
            return None;
        }
        let mut delta = words[self.words_sent..due].join(" ");
        if self.words_sent > 0 {
            delta.insert(0, ' ');
        }
        self.words_sent = due;
        Some(delta)
    }
}

/// A reply being streamed.
struct Streaming {
    response_id: String,
    item_id: String,
    reply: SpokenReply,
    drop_after: Option<usize>,
}

struct Conn {
    fake: FakeOpenAi,
    idx: usize,
    seq: usize,
    ga: bool,
    server_vad: bool,
    transcription: bool,
    input_rate: u32,
    streaming: Option<Streaming>,
    /// Turn detection in server-VAD mode.
    vad: EnergyVad,
    /// Silent after this many `response.done` sent.
    mute_after: Option<usize>,
    responses_done: usize,
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

enum Flow {
    Go,
    Drop,
}

impl Conn {
    fn new(fake: FakeOpenAi, idx: usize, n: usize, mute_after: Option<usize>) -> Self {
        let ga = fake.opts.ga;
        let server_vad = fake.opts.server_vad;
        Conn {
            fake,
            idx,
            seq: n * 1000,
            ga,
            server_vad,
            transcription: false,
            input_rate: 24_000,
            streaming: None,
            vad: EnergyVad::new(24_000),
            mute_after,
            responses_done: 0,
        }
    }

    fn muted(&self) -> bool {
        self.mute_after.is_some_and(|k| self.responses_done >= k)
    }

    fn id(&mut self, prefix: &str) -> String {
        self.seq += 1;
        format!("{prefix}_{:04}", self.seq)
    }

    fn name<'a>(&self, ga: &'a str, beta: &'a str) -> &'a str {
        if self.ga { ga } else { beta }
    }

    async fn run(mut self, mut ws: Ws, expire_at: Option<Instant>) {
        let created = json!({"type": "session.created", "event_id": "event_1", "session": {"id": "sess_fake", "object": "realtime.session"}});
        if !self.muted() && ws.send(Message::text(created.to_string())).await.is_err() {
            return;
        }
        let mut tick = tokio::time::interval(self.fake.opts.interval);
        let expire = async move {
            match expire_at {
                Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expire);
        loop {
            let mut out = Vec::new();
            let flow = tokio::select! {
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        let v: Value = serde_json::from_str(&t).unwrap_or(Value::Null);
                        self.on_message(v, &mut out)
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                    Some(Ok(_)) => Flow::Go,
                },
                _ = tick.tick(), if self.streaming.is_some() => self.stream_step(&mut out),
                _ = &mut expire => {
                    let e = json!({"type": "error", "event_id": "event_exp", "error": {"type": "invalid_request_error", "code": "session_expired", "message": "Your session hit the maximum duration of 60 minutes.", "param": null, "event_id": null}});
                    let _ = ws.send(Message::text(e.to_string())).await;
                    let _ = ws.close(None).await;
                    return;
                }
            };
            for m in out {
                if self.muted() {
                    break;
                }
                self.responses_done += usize::from(m["type"] == "response.done");
                if ws.send(Message::text(m.to_string())).await.is_err() {
                    return;
                }
            }
            if let Flow::Drop = flow {
                // Abrupt: no close frame, like a network failure.
                return;
            }
        }
    }

    fn on_message(&mut self, v: Value, out: &mut Vec<Value>) -> Flow {
        let ty = v["type"].as_str().unwrap_or("").to_owned();
        if ty == "input_audio_buffer.append" {
            let bytes =
                base64::engine::general_purpose::STANDARD.decode(v["audio"].as_str().unwrap_or("")).unwrap_or_default();
            let samples: Vec<i16> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
            self.fake.with_conn(self.idx, |c| c.audio.extend_from_slice(&samples));
            if self.server_vad {
                self.vad(&samples, out);
            }
            return Flow::Go;
        }
        self.fake.with_conn(self.idx, |c| c.received.push(v.clone()));
        match ty.as_str() {
            "session.update" => {
                // A partial update (only some keys) changes only what it names, as OpenAI's does.
                let s = &v["session"];
                let (input, rate) = if self.ga {
                    (&s["audio"]["input"], s["audio"]["input"]["format"]["rate"].as_u64())
                } else {
                    (s, None)
                };
                let (td, tr) = if self.ga {
                    ("turn_detection", "transcription")
                } else {
                    ("turn_detection", "input_audio_transcription")
                };
                if let Some(td) = input.get(td) {
                    self.server_vad = td.is_object();
                }
                if let Some(tr) = input.get(tr) {
                    self.transcription = tr.is_object();
                }
                if let Some(r) = rate {
                    self.input_rate = r as u32;
                    self.vad = EnergyVad::new(self.input_rate);
                }
                out.push(json!({"type": "session.updated", "event_id": "event_2", "session": s}));
            }
            "input_audio_buffer.commit" => {
                let len = self.fake.with_conn(self.idx, |c| c.audio.len());
                let committed_before = self.fake.with_conn(self.idx, |c| c.commits.last().copied().unwrap_or(0));
                if len == committed_before {
                    out.push(json!({"type": "error", "error": {"type": "invalid_request_error", "code": "input_audio_buffer_commit_empty", "message": "buffer too small"}}));
                } else {
                    self.commit(out);
                }
            }
            "response.create" => self.start_reply(&v, out),
            "response.cancel" => {
                if let Some(s) = self.streaming.take() {
                    out.push(self.response_done(
                        &s.response_id,
                        "cancelled",
                        vec![json!({"id": s.item_id, "type": "message", "role": "assistant"})],
                    ));
                } else {
                    out.push(json!({"type": "error", "error": {"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "no active response"}}));
                }
            }
            "conversation.item.truncate" => {
                out.push(json!({"type": "conversation.item.truncated", "item_id": v["item_id"], "content_index": 0, "audio_end_ms": v["audio_end_ms"]}));
            }
            "conversation.item.create" => {
                let id = self.id("item");
                let ty = self.name("conversation.item.added", "conversation.item.created");
                out.push(json!({"type": ty, "item": {"id": id, "type": v["item"]["type"]}}));
            }
            _ => {}
        }
        Flow::Go
    }

    fn commit(&mut self, out: &mut Vec<Value>) {
        let item = self.id("item");
        self.fake.with_conn(self.idx, |c| {
            let n = c.audio.len();
            c.commits.push(n)
        });
        out.push(json!({"type": "input_audio_buffer.committed", "previous_item_id": null, "item_id": item}));
        if self.transcription {
            let t = self.fake.opts.user_transcript.clone();
            let half = t.len() / 2;
            let cut = t.char_indices().map(|(i, _)| i).find(|&i| i >= half).unwrap_or(0);
            out.push(json!({"type": "conversation.item.input_audio_transcription.delta", "item_id": item, "content_index": 0, "delta": &t[..cut]}));
            out.push(json!({"type": "conversation.item.input_audio_transcription.completed", "item_id": item, "content_index": 0, "transcript": t}));
        }
    }

    /// Server VAD: the energy VAD's edges as OpenAI reports them; the end of speech commits the
    /// turn and answers it.
    fn vad(&mut self, samples: &[i16], out: &mut Vec<Value>) {
        for edge in self.vad.push(samples) {
            match edge {
                VadEdge::Started => {
                    let ms =
                        self.fake.with_conn(self.idx, |c| c.audio.len()) as u64 * 1000 / u64::from(self.input_rate);
                    out.push(json!({"type": "input_audio_buffer.speech_started", "audio_start_ms": ms, "item_id": "pending"}));
                    if let Some(s) = self.streaming.take() {
                        // interrupt_response: the server cancels its own reply.
                        out.push(self.response_done(
                            &s.response_id,
                            "cancelled",
                            vec![json!({"id": s.item_id, "type": "message"})],
                        ));
                    }
                }
                VadEdge::Ended => {
                    out.push(
                        json!({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 0, "item_id": "pending"}),
                    );
                    self.commit(out);
                    self.start_reply(&json!({}), out);
                }
            }
        }
    }

    fn response_done(&self, id: &str, status: &str, output: Vec<Value>) -> Value {
        self.response_done_with(id, status, output, "", 0)
    }

    /// `response.done` with a `usage` object shaped as OpenAI's (Realtime API reference): a fixed
    /// [`INPUT_TOKENS`] of input, and output tokens of one per word of `text` plus one per
    /// [`AUDIO_MS_PER_TOKEN`] of `audio_samples` (24 kHz).
    fn response_done_with(
        &self,
        id: &str,
        status: &str,
        output: Vec<Value>,
        text: &str,
        audio_samples: usize,
    ) -> Value {
        let text_tokens = text.split_whitespace().count() as u64;
        let audio_tokens = (audio_samples as u64 / 24).div_ceil(AUDIO_MS_PER_TOKEN);
        let output_tokens = text_tokens + audio_tokens;
        let usage = json!({
            "total_tokens": INPUT_TOKENS + output_tokens,
            "input_tokens": INPUT_TOKENS,
            "output_tokens": output_tokens,
            "input_token_details": {"text_tokens": INPUT_TOKENS, "audio_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
        });
        json!({"type": "response.done", "event_id": "event_done", "response": {"id": id, "object": "realtime.response", "status": status, "status_details": null, "output": output, "usage": usage}})
    }

    fn start_reply(&mut self, _req: &Value, out: &mut Vec<Value>) {
        let next = self.fake.state.lock().unwrap().script.pop_front();
        let response_id = self.id("resp");
        out.push(json!({"type": "response.created", "response": {"id": response_id, "object": "realtime.response", "status": "in_progress", "output": []}}));
        match next {
            None => {
                out.push(self.response_done(&response_id, "completed", vec![]));
            }
            Some(Reply::ToolCall { name, arguments }) => {
                let item = self.id("fc");
                let call = self.id("call");
                out.push(json!({"type": "response.output_item.added", "response_id": response_id, "output_index": 0, "item": {"id": item, "object": "realtime.item", "type": "function_call", "status": "in_progress", "name": name, "call_id": call, "arguments": ""}}));
                out.push(json!({"type": "response.function_call_arguments.delta", "response_id": response_id, "item_id": item, "output_index": 0, "call_id": call, "delta": arguments}));
                let mut done = json!({"type": "response.function_call_arguments.done", "response_id": response_id, "item_id": item, "output_index": 0, "call_id": call, "arguments": arguments});
                if self.ga {
                    done["name"] = json!(name);
                }
                out.push(done);
                let fc = json!({"id": item, "object": "realtime.item", "type": "function_call", "status": "completed", "name": name, "call_id": call, "arguments": arguments});
                out.push(json!({"type": "response.output_item.done", "response_id": response_id, "output_index": 0, "item": fc}));
                out.push(self.response_done(&response_id, "completed", vec![fc]));
            }
            Some(Reply::Speech { text, audio }) => self.begin_speech(response_id, text, audio, None, out),
            Some(Reply::SpeakToolOutput { prefix }) => {
                let outputs = self.fake.with_conn(self.idx, |c| c.of_type("conversation.item.create"));
                let given = outputs.iter().rev().find(|v| v["item"]["type"] == "function_call_output");
                let text = format!("{prefix}{}", given.and_then(|v| v["item"]["output"].as_str()).unwrap_or_default());
                // eSpeak NG at the Realtime API's 24 kHz (it blocks: off the async worker).
                #[cfg(feature = "local")]
                let audio = tokio::task::block_in_place(|| super::espeak_at(&text, 24_000));
                #[cfg(not(feature = "local"))]
                let audio = reply_speech().1;
                self.begin_speech(response_id, text, audio, None, out)
            }
            Some(Reply::DropAfter { text, audio, after }) => {
                let n = (after.as_millis() as usize) * 24;
                self.begin_speech(response_id, text, audio, Some(n), out)
            }
        }
    }

    fn begin_speech(
        &mut self,
        response_id: String,
        text: String,
        audio: Vec<i16>,
        drop_after: Option<usize>,
        out: &mut Vec<Value>,
    ) {
        let item_id = self.id("msg");
        out.push(json!({"type": "response.output_item.added", "response_id": response_id, "output_index": 0, "item": {"id": item_id, "object": "realtime.item", "type": "message", "status": "in_progress", "role": "assistant", "content": []}}));
        out.push(json!({"type": "response.content_part.added", "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "part": {"type": "audio", "transcript": ""}}));
        self.streaming = Some(Streaming { response_id, item_id, reply: SpokenReply::new(text, audio), drop_after });
    }

    fn stream_step(&mut self, out: &mut Vec<Value>) -> Flow {
        let chunk = (self.fake.opts.chunk.as_millis() as usize) * 24;
        let ga = self.ga;
        let Some(s) = self.streaming.as_mut() else { return Flow::Go };
        if s.drop_after.is_some_and(|n| s.reply.pos >= n) {
            self.streaming = None;
            return Flow::Drop;
        }
        if let Some(b64) = s.reply.next_audio(chunk) {
            let ty = if ga { "response.output_audio.delta" } else { "response.audio.delta" };
            out.push(json!({"type": ty, "response_id": s.response_id, "item_id": s.item_id, "output_index": 0, "content_index": 0, "delta": b64}));
            if let Some(delta) = s.reply.transcript_delta() {
                let ty = if ga { "response.output_audio_transcript.delta" } else { "response.audio_transcript.delta" };
                out.push(json!({"type": ty, "response_id": s.response_id, "item_id": s.item_id, "output_index": 0, "content_index": 0, "delta": delta}));
            }
            return Flow::Go;
        }
        let Streaming { response_id, item_id, reply, .. } = self.streaming.take().unwrap();
        let (audio_done, tr_done) = if ga {
            ("response.output_audio.done", "response.output_audio_transcript.done")
        } else {
            ("response.audio.done", "response.audio_transcript.done")
        };
        out.push(json!({"type": audio_done, "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0}));
        out.push(json!({"type": tr_done, "response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0, "transcript": reply.text}));
        let item = json!({"id": item_id, "object": "realtime.item", "type": "message", "status": "completed", "role": "assistant", "content": [{"type": "output_audio", "transcript": reply.text}]});
        out.push(
            json!({"type": "response.output_item.done", "response_id": response_id, "output_index": 0, "item": item}),
        );
        out.push(self.response_done_with(&response_id, "completed", vec![item], &reply.text, reply.audio.len()));
        Flow::Go
    }
}

/// The arguments of [`weather_tool_script`]'s call.
pub const WEATHER_ARGS: &str = r#"{"city":"Tokyo"}"#;

/// A client tool's round trip: the model calls `get_weather` with [`WEATHER_ARGS`] (a tool the
/// client declares), then speaks `prefix` and the output the client returned.
pub fn weather_tool_script(prefix: &str) -> Vec<Reply> {
    vec![
        Reply::ToolCall { name: "get_weather".into(), arguments: WEATHER_ARGS.into() },
        Reply::SpeakToolOutput { prefix: prefix.into() },
    ]
}

/// 24 kHz speech from the repository (espeak-ng) and its transcript.
pub fn reply_speech() -> (String, Vec<i16>) {
    let pcm = media::wav::parse(include_bytes!("../../src/providers/scripted_reply.wav")).unwrap();
    assert_eq!(pcm.rate_hz, 24_000);
    (
        "Hi! I am Aiko. It is nice to meet you. The weather is lovely today, and I am happy to chat with you for a while."
            .into(),
        pcm.samples,
    )
}

/// A short reply: the first `secs` of the speech, with the words of that share.
pub fn short_speech(secs: f64) -> (String, Vec<i16>) {
    let (text, audio) = reply_speech();
    let n = ((secs * 24_000.0) as usize).min(audio.len());
    let words: Vec<&str> = text.split_whitespace().collect();
    let k = (words.len() * n).div_ceil(audio.len()).max(1);
    (words[..k].join(" "), audio[..n].to_vec())
}
