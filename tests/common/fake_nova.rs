//! A fake Amazon Nova Sonic: an in-process HTTP client for the AWS SDK (the smithy
//! `HttpClient` / `HttpConnector` traits), so the product's real SDK path runs unchanged: the
//! request is SigV4-signed, every input event is an event-stream frame signed in a chain, and
//! the replies are event-stream frames the SDK parses. Why in-process and not a loopback HTTP/2
//! server: the signing, the framing and the parsing are all above the connector, so it tests the
//! same code; it needs no TLS root, no h2 server and no port, and it cannot flake on sockets.
//!
//! Per stream it records the request (URI, `Authorization`), every input event but audio (as
//! JSON), the user's audio (16 kHz) and whether the stream was closed in order. It answers user
//! turns (an energy VAD on the audio block, or an interactive USER text) with scripted replies
//! in Nova's order: SPECULATIVE text, the AUDIO block, FINAL text, END_TURN; barges in itself
//! (`{ "interrupted" : true }`, INTERRUPTED) when the user speaks over a reply; runs the tool
//! handshake; stays silent; or fails mid-reply with a `ModelStreamErrorException`. It decodes and
//! encodes frames with `aws-smithy-eventstream` and shares no code with the product's protocol
//! module.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use aws_smithy_eventstream::frame::{read_message_from, write_message_to};
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::event_stream::{Header, HeaderValue, Message};
use base64::Engine;
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::energy_vad::{EnergyVad, VadEdge};
use super::fake_openai::SpokenReply;

/// What the fake answers a user turn with.
#[derive(Debug, Clone)]
pub enum NReply {
    /// Speech: `plan` as SPECULATIVE text, the audio (24 kHz), `spoken` as FINAL text.
    Speech { plan: String, spoken: String, audio: Vec<i16> },
    /// A tool use; the reply after it answers once the result arrived.
    ToolUse { name: String, input: Value },
    /// Nothing at all (a reply that never comes).
    Silence,
    /// Speech that fails with a `ModelStreamErrorException` after `after` of its audio.
    FailAfter { spoken: String, audio: Vec<i16>, after: Duration },
}

/// Everything one stream received.
#[derive(Debug, Clone, Default)]
pub struct NConn {
    pub uri: String,
    pub authorization: String,
    /// Input events except `audioInput`, in order (the inner JSON of each chunk).
    pub events: Vec<Value>,
    /// Frames whose outer message carried a `:chunk-signature`.
    pub signed_frames: usize,
    pub audio: Vec<i16>,
    /// contentEnd (audio) -> promptEnd -> sessionEnd arrived, in that order.
    pub closed_in_order: bool,
    pub ended: bool,
    pub opened_at: Option<Instant>,
}

impl NConn {
    /// The input events named `name`.
    pub fn named(&self, name: &str) -> Vec<Value> {
        self.events.iter().filter_map(|e| e["event"].get(name).cloned()).collect()
    }
    /// Names of the input events, in order.
    pub fn names(&self) -> Vec<String> {
        self.events.iter().filter_map(|e| e["event"].as_object()?.keys().next().cloned()).collect()
    }
    /// The text blocks as (role, interactive, text).
    pub fn text_blocks(&self) -> Vec<(String, bool, String)> {
        let mut out = Vec::new();
        let mut open: Option<(String, String, bool)> = None;
        let mut text = String::new();
        for e in &self.events {
            let ev = &e["event"];
            if let Some(cs) = ev.get("contentStart").filter(|c| c["type"] == "TEXT") {
                open = Some((
                    cs["contentName"].as_str().unwrap().into(),
                    cs["role"].as_str().unwrap().into(),
                    cs["interactive"] == true,
                ));
                text.clear();
            } else if let Some(t) = ev.get("textInput") {
                text.push_str(t["content"].as_str().unwrap());
            } else if let Some(ce) = ev.get("contentEnd")
                && open.as_ref().is_some_and(|(n, _, _)| ce["contentName"] == n.as_str())
            {
                let (_, role, interactive) = open.take().unwrap();
                out.push((role, interactive, std::mem::take(&mut text)));
            }
        }
        out
    }
}

#[derive(Debug, Default)]
struct State {
    script: VecDeque<NReply>,
    conns: Vec<NConn>,
    /// Streams from this index on fail at once with this exception (None: never).
    refuse_from: Option<usize>,
}

/// The fake: give it to the SDK as its HTTP client.
#[derive(Debug, Clone)]
pub struct FakeNova {
    state: Arc<Mutex<State>>,
    pub user_transcript: String,
    /// Audio per `audioOutput` and the time between them (faster than real time).
    pub chunk: Duration,
    pub interval: Duration,
}

impl FakeNova {
    pub fn new(script: Vec<NReply>) -> FakeNova {
        FakeNova {
            state: Arc::new(Mutex::new(State { script: script.into(), ..Default::default() })),
            user_transcript: "What is the weather like?".into(),
            chunk: Duration::from_millis(100),
            interval: Duration::from_millis(25),
        }
    }

    pub fn conns(&self) -> Vec<NConn> {
        self.state.lock().unwrap().conns.clone()
    }

    pub fn conn(&self, i: usize) -> NConn {
        self.conns().get(i).cloned().unwrap_or_else(|| panic!("stream {i} was never opened"))
    }

    pub fn push_reply(&self, r: NReply) {
        self.state.lock().unwrap().script.push_back(r);
    }

    fn with_conn<R>(&self, i: usize, f: impl FnOnce(&mut NConn) -> R) -> R {
        f(&mut self.state.lock().unwrap().conns[i])
    }
}

impl HttpClient for FakeNova {
    fn http_connector(&self, _: &HttpConnectorSettings, _: &RuntimeComponents) -> SharedHttpConnector {
        SharedHttpConnector::new(self.clone())
    }
}

impl HttpConnector for FakeNova {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let fake = self.clone();
        HttpConnectorFuture::new(async move {
            let idx = {
                let mut st = fake.state.lock().unwrap();
                st.conns.push(NConn {
                    uri: request.uri().to_owned(),
                    authorization: request.headers().get("authorization").unwrap_or_default().to_owned(),
                    opened_at: Some(Instant::now()),
                    ..Default::default()
                });
                st.conns.len() - 1
            };
            let (tx, rx) = mpsc::channel::<Bytes>(64);
            tokio::spawn(Stream::new(fake, idx, tx).run(request.into_body()));
            let mut resp = HttpResponse::new(200.try_into().unwrap(), SdkBody::from_body_1_x(ChanBody(rx)));
            resp.headers_mut().insert("content-type", "application/vnd.amazon.eventstream");
            Ok(resp)
        })
    }
}

/// The response body: frames from the stream task.
struct ChanBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChanBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(http_body::Frame::data(b))))
    }
}

fn frame(headers: Vec<(&'static str, &'static str)>, payload: Vec<u8>) -> Bytes {
    let mut m = Message::new(payload);
    for (k, v) in headers {
        m = m.add_header(Header::new(k, HeaderValue::String(v.into())));
    }
    let mut buf = Vec::new();
    write_message_to(&m, &mut buf).unwrap();
    Bytes::from(buf)
}

/// An output event as a `chunk` frame.
fn chunk_frame(event: Value) -> Bytes {
    let b64 = base64::engine::general_purpose::STANDARD.encode(event.to_string());
    let headers = vec![(":message-type", "event"), (":event-type", "chunk"), (":content-type", "application/json")];
    frame(headers, json!({ "bytes": b64 }).to_string().into_bytes())
}

/// A modeled exception frame.
fn exception_frame(kind: &'static str, message: &str) -> Bytes {
    let headers =
        vec![(":message-type", "exception"), (":exception-type", kind), (":content-type", "application/json")];
    frame(headers, json!({ "message": message }).to_string().into_bytes())
}

/// A reply being streamed (its text goes out after the audio, as Nova's FINAL text block).
struct Streaming {
    reply: SpokenReply,
    fail_at: Option<usize>,
    audio_id: String,
}

struct Stream {
    fake: FakeNova,
    idx: usize,
    out: mpsc::Sender<Bytes>,
    prompt: String,
    audio_content: String,
    vad: EnergyVad,
    streaming: Option<Streaming>,
    waiting_tool: Option<String>,
    ids: u64,
    open_block: Option<(String, String, bool)>,
    block_text: String,
    close_steps: Vec<&'static str>,
    /// Replies finished on this stream (each reports [`USAGE_PER_REPLY`] more tokens).
    replies_done: u64,
}

impl Stream {
    fn new(fake: FakeNova, idx: usize, out: mpsc::Sender<Bytes>) -> Stream {
        Stream {
            fake,
            idx,
            out,
            prompt: String::new(),
            audio_content: String::new(),
            vad: EnergyVad::new(16_000),
            streaming: None,
            waiting_tool: None,
            ids: 0,
            open_block: None,
            block_text: String::new(),
            close_steps: Vec::new(),
            replies_done: 0,
        }
    }

    fn id(&mut self, what: &str) -> String {
        self.ids += 1;
        format!("{what}-{}-{}", self.idx, self.ids)
    }

    async fn emit(&self, name: &str, mut body: Value) -> bool {
        body["promptName"] = json!(self.prompt);
        body["sessionId"] = json!(format!("session-{}", self.idx));
        body["completionId"] = json!(format!("completion-{}", self.idx));
        self.out.send(chunk_frame(json!({ "event": { name: body } }))).await.is_ok()
    }

    async fn run(mut self, mut body: SdkBody) {
        let mut buf = Vec::<u8>::new();
        let mut tick = tokio::time::interval(self.fake.interval);
        let refuse = self.fake.state.lock().unwrap().refuse_from.is_some_and(|r| self.idx >= r);
        if refuse {
            let _ = self.out.send(exception_frame("ServiceUnavailableException", "try again later")).await;
            return self.fake.with_conn(self.idx, |c| c.ended = true);
        }
        loop {
            tokio::select! {
                f = body.frame() => match f {
                    Some(Ok(f)) => {
                        if let Ok(data) = f.into_data() {
                            buf.extend_from_slice(&data);
                        }
                        if !self.drain(&mut buf).await {
                            break;
                        }
                    }
                    _ => break,
                },
                _ = tick.tick(), if self.streaming.is_some() => {
                    if !self.stream_step().await {
                        break;
                    }
                }
            }
        }
        self.fake.with_conn(self.idx, |c| c.ended = true);
    }

    /// Decode every whole frame in `buf`; false when the stream is over.
    async fn drain(&mut self, buf: &mut Vec<u8>) -> bool {
        while buf.len() >= 4 {
            let total = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if buf.len() < total {
                return true;
            }
            let bytes: Vec<u8> = buf.drain(..total).collect();
            let outer = read_message_from(&bytes[..]).expect("an event-stream frame");
            let signed = outer.headers().iter().any(|h| h.name().as_str() == ":chunk-signature");
            self.fake.with_conn(self.idx, |c| c.signed_frames += usize::from(signed));
            if outer.payload().is_empty() {
                continue; // the empty signed frame that ends the input
            }
            let inner = read_message_from(&outer.payload()[..]).expect("a signed frame wraps an event frame");
            let v: Value = serde_json::from_slice(inner.payload()).expect("chunk payload is JSON");
            let b64 = v["bytes"].as_str().expect("chunk carries bytes");
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
            let event: Value = serde_json::from_slice(&bytes).expect("the event is JSON");
            if !self.on_event(event).await {
                return false;
            }
        }
        true
    }

    async fn on_event(&mut self, e: Value) -> bool {
        let ev = &e["event"];
        if let Some(a) = ev.get("audioInput") {
            let bytes = base64::engine::general_purpose::STANDARD.decode(a["content"].as_str().unwrap()).unwrap();
            let samples: Vec<i16> = bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
            self.fake.with_conn(self.idx, |c| c.audio.extend_from_slice(&samples));
            for edge in self.vad.push(&samples) {
                match edge {
                    VadEdge::Started => self.barge_in().await,
                    VadEdge::Ended => {
                        self.user_said().await;
                        self.next_reply().await;
                    }
                }
            }
            return true;
        }
        self.fake.with_conn(self.idx, |c| c.events.push(e.clone()));
        if let Some(p) = ev.get("promptStart") {
            self.prompt = p["promptName"].as_str().unwrap().to_owned();
            self.emit("completionStart", json!({})).await;
        }
        if let Some(cs) = ev.get("contentStart") {
            if cs["type"] == "AUDIO" {
                self.audio_content = cs["contentName"].as_str().unwrap().to_owned();
            }
            let name = cs["contentName"].as_str().unwrap().to_owned();
            self.open_block = Some((name, cs["role"].as_str().unwrap_or("").to_owned(), cs["interactive"] == true));
        }
        if let Some(t) = ev.get("textInput") {
            self.block_text.push_str(t["content"].as_str().unwrap());
        }
        if ev.get("toolResult").is_some() {
            self.waiting_tool = None;
        }
        if let Some(ce) = ev.get("contentEnd") {
            if ce["contentName"] == self.audio_content.as_str() {
                self.close_steps.push("contentEnd");
            } else if let Some((_, role, interactive)) = self.open_block.take() {
                self.block_text.clear();
                if (role == "USER" && interactive) || role == "TOOL" {
                    self.next_reply().await;
                }
            }
        }
        if ev.get("promptEnd").is_some() {
            self.close_steps.push("promptEnd");
        }
        if ev.get("sessionEnd").is_some() {
            self.close_steps.push("sessionEnd");
            let in_order = self.close_steps == ["contentEnd", "promptEnd", "sessionEnd"];
            self.fake.with_conn(self.idx, |c| c.closed_in_order = in_order);
            self.emit("completionEnd", json!({"stopReason": "END_TURN"})).await;
            return false;
        }
        true
    }

    /// The user's words as a USER text block (Nova's transcript of the audio).
    async fn user_said(&mut self) {
        let id = self.id("user");
        let text = self.fake.user_transcript.clone();
        self.emit("contentStart", json!({"contentId": id, "type": "TEXT", "role": "USER", "additionalModelFields": "{\"generationStage\":\"FINAL\"}"})).await;
        self.emit("textOutput", json!({"contentId": id, "content": text, "role": "USER"})).await;
        self.emit("contentEnd", json!({"contentId": id, "type": "TEXT", "stopReason": "END_TURN"})).await;
    }

    async fn barge_in(&mut self) {
        let Some(s) = self.streaming.take() else { return };
        let id = self.id("text");
        self.emit("contentStart", json!({"contentId": id, "type": "TEXT", "role": "ASSISTANT", "additionalModelFields": "{\"generationStage\":\"SPECULATIVE\"}"})).await;
        self.emit("textOutput", json!({"contentId": id, "content": "{ \"interrupted\" : true }", "role": "ASSISTANT"}))
            .await;
        self.emit("contentEnd", json!({"contentId": id, "type": "TEXT", "stopReason": "INTERRUPTED"})).await;
        self.emit("contentEnd", json!({"contentId": s.audio_id, "type": "AUDIO", "stopReason": "INTERRUPTED"})).await;
    }

    async fn next_reply(&mut self) {
        if self.waiting_tool.is_some() {
            return;
        }
        let next = self.fake.state.lock().unwrap().script.pop_front();
        match next {
            None | Some(NReply::Silence) => {}
            Some(NReply::ToolUse { name, input }) => {
                let (block, tool_id) = (self.id("tool"), self.id("tooluse"));
                self.emit("contentStart", json!({"contentId": block, "type": "TOOL", "role": "TOOL"})).await;
                self.emit(
                    "toolUse",
                    json!({"contentId": block, "toolUseId": tool_id, "toolName": name, "content": input.to_string()}),
                )
                .await;
                self.emit("contentEnd", json!({"contentId": block, "type": "TOOL", "stopReason": "TOOL_USE"})).await;
                self.waiting_tool = Some(tool_id);
            }
            Some(NReply::Speech { plan, spoken, audio }) => self.begin(plan, spoken, audio, None).await,
            Some(NReply::FailAfter { spoken, audio, after }) => {
                let at = after.as_millis() as usize * 24;
                self.begin(spoken.clone(), spoken, audio, Some(at)).await
            }
        }
    }

    async fn begin(&mut self, plan: String, spoken: String, audio: Vec<i16>, fail_at: Option<usize>) {
        let text_id = self.id("text");
        self.emit("contentStart", json!({"contentId": text_id, "type": "TEXT", "role": "ASSISTANT", "additionalModelFields": "{\"generationStage\":\"SPECULATIVE\"}"})).await;
        self.emit("textOutput", json!({"contentId": text_id, "content": plan, "role": "ASSISTANT"})).await;
        self.emit("contentEnd", json!({"contentId": text_id, "type": "TEXT", "stopReason": "PARTIAL_TURN"})).await;
        let audio_id = self.id("audio");
        self.emit("contentStart", json!({"contentId": audio_id, "type": "AUDIO", "role": "ASSISTANT", "audioOutputConfiguration": {"mediaType": "audio/lpcm", "sampleRateHertz": 24000}})).await;
        self.streaming = Some(Streaming { reply: SpokenReply::new(spoken, audio), fail_at, audio_id });
    }

    /// One audio chunk, or the end of the reply; false when the stream failed.
    async fn stream_step(&mut self) -> bool {
        let chunk = self.fake.chunk.as_millis() as usize * 24;
        let Some(s) = self.streaming.as_mut() else { return true };
        if s.fail_at.is_some_and(|n| s.reply.pos >= n) {
            self.streaming = None;
            let _ = self.out.send(exception_frame("ModelStreamErrorException", "the model stream failed")).await;
            return false;
        }
        if let Some(b64) = s.reply.next_audio(chunk) {
            let id = s.audio_id.clone();
            self.emit("audioOutput", json!({"contentId": id, "content": b64, "role": "ASSISTANT"})).await;
            return true;
        }
        let s = self.streaming.take().unwrap();
        self.emit("contentEnd", json!({"contentId": s.audio_id, "type": "AUDIO", "stopReason": "END_TURN"})).await;
        let id = self.id("final");
        self.emit("contentStart", json!({"contentId": id, "type": "TEXT", "role": "ASSISTANT", "additionalModelFields": "{\"generationStage\":\"FINAL\"}"})).await;
        self.emit("textOutput", json!({"contentId": id, "content": s.reply.text, "role": "ASSISTANT"})).await;
        self.emit("contentEnd", json!({"contentId": id, "type": "TEXT", "stopReason": "END_TURN"})).await;
        self.replies_done += 1;
        self.emit("usageEvent", usage_event(self.replies_done)).await;
        true
    }
}

/// Tokens each finished reply adds: input 100 speech + 20 text, output 150 speech + 30 text.
pub const USAGE_PER_REPLY: u64 = 300;

/// Nova's `usageEvent` after `replies` replies: the last reply's `details.delta` and the running
/// totals (`details.total`, `totalInputTokens`, `totalOutputTokens`, `totalTokens`).
fn usage_event(replies: u64) -> Value {
    let side = |speech: u64, text: u64| json!({"speechTokens": speech, "textTokens": text});
    json!({
        "details": {
            "delta": {"input": side(100, 20), "output": side(150, 30)},
            "total": {"input": side(100 * replies, 20 * replies), "output": side(150 * replies, 30 * replies)},
        },
        "totalInputTokens": 120 * replies,
        "totalOutputTokens": 180 * replies,
        "totalTokens": USAGE_PER_REPLY * replies,
    })
}
