//! Adapters over the OpenAI-compatible HTTP APIs most self-hosted servers speak.
//!
//! - STT: `POST {base}/v1/audio/transcriptions` (multipart: `file` = 16 kHz WAV, `model`,
//!   `response_format=json`) -> `{"text": ...}`: whisper.cpp server, faster-whisper servers,
//!   OpenAI, Groq. Batch: the utterance is buffered (bounded) and sent at `finish`.
//! - LLM: `POST {base}/v1/chat/completions` with `stream: true` -> server-sent events
//!   `data: {"choices":[{"delta":{"content":"..."}}]}` ... `data: [DONE]`: Ollama, llama.cpp,
//!   vLLM, OpenAI, DeepSeek.
//! - TTS: `POST {base}/v1/audio/speech` `{model, input, voice, response_format}` -> streamed
//!   audio: raw `pcm` (s16le mono at the configured rate, 24 kHz for OpenAI and Kokoro-FastAPI)
//!   or `wav` (header read for the rate; Piper servers).
//!
//! Every request has a deadline for the response head and an idle deadline between body chunks
//! ([`Endpoint::timeout`]); HTTP statuses map to [`StageError`]s (401/403 unauthorized, 429 busy,
//! 5xx unavailable, other 4xx bad request), so failover and circuit breakers act on them. Keys
//! are sent as `Authorization: Bearer` and never logged.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryFutureExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::MAX_TURN_AUDIO;
use super::error::StageError;
use super::llm::{ChatRequest, LanguageModel};
use super::stt::{STT_RATE_HZ, SpeechToText, SttStream};
use super::tts::{SpeechChunk, TextToSpeech};
use crate::providers::Pcm;

/// Largest response body of a transcription (JSON), bytes.
const MAX_TRANSCRIPT_BODY: usize = 256 * 1024;
/// Longest SSE line accepted, bytes (a malicious server cannot make us buffer more).
const MAX_SSE_LINE: usize = 256 * 1024;

/// One server of one stage.
#[derive(Clone)]
pub struct Endpoint {
    /// Base URL, e.g. `http://127.0.0.1:11434` (the `/v1/...` path is appended).
    pub base_url: String,
    /// Bearer key, if the server wants one.
    pub api_key: Option<String>,
    /// Model name.
    pub model: String,
    /// TTS voice (overrides the character's voice when set).
    pub voice: Option<String>,
    /// TTS: raw `pcm` sample rate (ignored for `wav`).
    pub pcm_rate_hz: u32,
    /// TTS `response_format`: `pcm` or `wav`.
    pub audio_format: String,
    /// Deadline for the response head, and between body chunks.
    pub timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("model", &self.model)
            .finish()
    }
}

impl Endpoint {
    /// An endpoint with defaults: no key, 24 kHz pcm, 10 s timeout.
    pub fn new(base_url: &str, model: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            api_key: None,
            model: model.to_owned(),
            voice: None,
            pcm_rate_hz: 24_000,
            audio_format: "pcm".into(),
            timeout: Duration::from_secs(10),
        }
    }

    fn url(&self, path: &str) -> String {
        let base = self.base_url.trim_end_matches('/');
        if base.ends_with("/v1") { format!("{base}{path}") } else { format!("{base}/v1{path}") }
    }

    fn request(&self, client: &reqwest::Client, path: &str) -> reqwest::RequestBuilder {
        let rb = client.post(self.url(path));
        match &self.api_key {
            Some(k) => rb.bearer_auth(k),
            None => rb,
        }
    }

    /// POST `body` as JSON to `path` (with the head deadline; non-2xx statuses are errors) and
    /// open the response body as a stream. The future owns a copy of the endpoint and the client,
    /// so the stream outlives the adapter that opened it.
    fn post_streamed(
        &self,
        client: &reqwest::Client,
        path: &'static str,
        body: Value,
    ) -> impl Future<Output = Result<(Endpoint, BodyStream), StageError>> + Send + 'static {
        let (ep, client) = (self.clone(), client.clone());
        async move {
            let res = ep.send(ep.request(&client, path).json(&body)).await?;
            Ok((ep, res.bytes_stream().boxed()))
        }
    }

    /// Send, with the head deadline; non-2xx statuses become errors.
    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response, StageError> {
        let res = tokio::time::timeout(self.timeout, rb.send())
            .await
            .map_err(|_| StageError::Timeout(format!("{} did not answer within {:?}", self.base_url, self.timeout)))?
            .map_err(|e| StageError::Unavailable(format!("{}: {}", self.base_url, without_url(&e))))?;
        let status = res.status();
        if status.is_success() {
            return Ok(res);
        }
        let body = tokio::time::timeout(self.timeout, res.text()).await.ok().and_then(Result::ok).unwrap_or_default();
        let detail: String = body.chars().take(200).collect();
        let msg = format!("{} answered {status}: {detail}", self.base_url);
        Err(match status.as_u16() {
            401 | 403 => StageError::Unauthorized(msg),
            408 => StageError::Timeout(msg),
            429 => StageError::Busy(msg),
            s if s >= 500 => StageError::Unavailable(msg),
            _ => StageError::BadRequest(msg),
        })
    }
}

/// The chunks of a streamed response body.
type BodyStream = BoxStream<'static, reqwest::Result<bytes::Bytes>>;

/// A stream that first awaits `opened` (the request; its error is the stream's one item) and then
/// yields what `step` reads from the opened state, until `step` returns `None` or hands back no
/// state (after an error).
fn open_then<S, T, O, F, Fut>(opened: O, step: F) -> BoxStream<'static, Result<T, StageError>>
where
    S: Send + 'static,
    T: Send + 'static,
    O: Future<Output = Result<S, StageError>> + Send + 'static,
    F: Fn(S) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Option<(Result<T, StageError>, Option<S>)>> + Send + 'static,
{
    futures::stream::once(opened)
        .flat_map(move |opened| match opened {
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
            Ok(state) => {
                let step = step.clone();
                futures::stream::unfold(Some(state), move |state| {
                    let step = step.clone();
                    async move { step(state?).await }
                })
                .boxed()
            }
        })
        .boxed()
}

/// The next chunk of a streamed response body: `None` at its end; a stall longer than the
/// endpoint's timeout is [`StageError::Timeout`] (`stalled` says what stalled), a broken
/// connection [`StageError::Unavailable`].
async fn next_chunk(ep: &Endpoint, body: &mut BodyStream, stalled: &str) -> Result<Option<bytes::Bytes>, StageError> {
    match tokio::time::timeout(ep.timeout, body.next()).await {
        Err(_) => Err(StageError::Timeout(format!("{}: {stalled}", ep.base_url))),
        Ok(Some(Ok(bytes))) => Ok(Some(bytes)),
        Ok(Some(Err(e))) => Err(StageError::Unavailable(format!("{}: {}", ep.base_url, without_url(&e)))),
        Ok(None) => Ok(None),
    }
}

/// reqwest errors print the URL, which may carry a key in a query string: keep only the kind.
fn without_url(e: &reqwest::Error) -> String {
    if e.is_connect() {
        "connection failed".into()
    } else if e.is_timeout() {
        "timed out".into()
    } else if e.is_body() || e.is_decode() {
        "bad response body".into()
    } else {
        "request failed".into()
    }
}

/// A shared HTTP client (connection pool, rustls).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(60)).build().unwrap_or_default()
}

// ---------------------------------------------------------------- STT

/// `POST /v1/audio/transcriptions`.
pub struct OpenAiStt {
    endpoint: Endpoint,
    client: reqwest::Client,
    language: Option<String>,
}

impl OpenAiStt {
    /// An adapter for `endpoint`; `language` (ISO 639-1, e.g. `en`) is passed when set.
    pub fn new(endpoint: Endpoint, client: reqwest::Client, language: Option<String>) -> Self {
        Self { endpoint, client, language }
    }
}

impl SpeechToText for OpenAiStt {
    fn name(&self) -> &str {
        &self.endpoint.base_url
    }

    fn start(&self, _partials: Option<mpsc::Sender<String>>) -> Result<Box<dyn SttStream>, StageError> {
        Ok(Box::new(BufferedUtterance {
            endpoint: self.endpoint.clone(),
            client: self.client.clone(),
            language: self.language.clone(),
            samples: Vec::new(),
        }))
    }
}

struct BufferedUtterance {
    endpoint: Endpoint,
    client: reqwest::Client,
    language: Option<String>,
    samples: Vec<i16>,
}

impl SttStream for BufferedUtterance {
    fn push(&mut self, pcm: &Pcm) {
        if pcm.rate_hz != STT_RATE_HZ {
            return;
        }
        let max = (MAX_TURN_AUDIO.as_millis() as usize) * STT_RATE_HZ as usize / 1000;
        self.samples.extend_from_slice(&pcm.samples);
        if self.samples.len() > max {
            let excess = self.samples.len() - max;
            self.samples.drain(..excess);
        }
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<String, StageError>> {
        async move {
            let wav = media::wav::to_bytes(media::PcmRef { rate_hz: STT_RATE_HZ, samples: &self.samples });
            let file = reqwest::multipart::Part::bytes(wav)
                .file_name("turn.wav")
                .mime_str("audio/wav")
                .map_err(|e| StageError::BadRequest(e.to_string()))?;
            let mut form = reqwest::multipart::Form::new()
                .part("file", file)
                .text("model", self.endpoint.model.clone())
                .text("response_format", "json");
            if let Some(l) = &self.language {
                form = form.text("language", l.clone());
            }
            let ep = &self.endpoint;
            let res = ep.send(ep.request(&self.client, "/audio/transcriptions").multipart(form)).await?;
            let body = read_limited(ep, res, MAX_TRANSCRIPT_BODY).await?;
            let v: Value = serde_json::from_slice(&body)
                .map_err(|e| StageError::BadResponse(format!("{}: transcription is not JSON: {e}", ep.base_url)))?;
            v.get("text")
                .and_then(Value::as_str)
                .map(|t| t.trim().to_owned())
                .ok_or_else(|| StageError::BadResponse(format!("{}: no `text` in the transcription", ep.base_url)))
        }
        .boxed()
    }
}

async fn read_limited(ep: &Endpoint, res: reqwest::Response, max: usize) -> Result<Vec<u8>, StageError> {
    let mut body = Vec::new();
    let mut stream = res.bytes_stream();
    loop {
        let next = tokio::time::timeout(ep.timeout, stream.next())
            .await
            .map_err(|_| StageError::Timeout(format!("{}: body stalled", ep.base_url)))?;
        match next {
            Some(Ok(b)) => {
                if body.len() + b.len() > max {
                    return Err(StageError::BadResponse(format!("{}: body over {max} bytes", ep.base_url)));
                }
                body.extend_from_slice(&b);
            }
            Some(Err(e)) => return Err(StageError::Unavailable(format!("{}: {}", ep.base_url, without_url(&e)))),
            None => return Ok(body),
        }
    }
}

// ---------------------------------------------------------------- LLM

/// `POST /v1/chat/completions` with `stream: true`.
pub struct OpenAiChat {
    endpoint: Endpoint,
    client: reqwest::Client,
}

impl OpenAiChat {
    /// An adapter for `endpoint`.
    pub fn new(endpoint: Endpoint, client: reqwest::Client) -> Self {
        Self { endpoint, client }
    }
}

impl LanguageModel for OpenAiChat {
    fn name(&self) -> &str {
        &self.endpoint.base_url
    }

    fn stream(&self, req: ChatRequest) -> BoxStream<'static, Result<String, StageError>> {
        let messages: Vec<Value> =
            req.messages.iter().map(|m| json!({"role": m.role.as_str(), "content": m.content})).collect();
        let body = json!({
            "model": self.endpoint.model,
            "messages": messages,
            "stream": true,
            "max_tokens": req.max_tokens,
        });
        let opened = self.endpoint.post_streamed(&self.client, "/chat/completions", body);
        let opened = opened.map_ok(|(ep, body)| (ep, body, SseDecoder::default()));
        open_then(opened, |(ep, mut body, mut sse)| async move {
            loop {
                match sse.next_event() {
                    Ok(Some(SseEvent::Done)) => return None,
                    Ok(Some(SseEvent::Delta(d))) => return Some((Ok(d), Some((ep, body, sse)))),
                    Ok(None) => {}
                    Err(e) => return Some((Err(e), None)),
                }
                match next_chunk(&ep, &mut body, "token stream stalled").await {
                    Ok(Some(bytes)) => {
                        if let Err(e) = sse.feed(&bytes) {
                            return Some((Err(e), None));
                        }
                    }
                    // The server closed without [DONE]: what arrived is the reply.
                    Ok(None) => return None,
                    Err(e) => return Some((Err(e), None)),
                }
            }
        })
    }
}

/// What one SSE event of a chat completion stream carries.
#[derive(Debug, Clone, PartialEq)]
pub enum SseEvent {
    /// Text content.
    Delta(String),
    /// `data: [DONE]`.
    Done,
}

/// Incremental server-sent-events decoder for chat completion chunks (sans-IO).
#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
}

impl SseDecoder {
    /// Add bytes from the body.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<(), StageError> {
        self.buf.extend_from_slice(bytes);
        if self.buf.len() > MAX_SSE_LINE && !self.buf.contains(&b'\n') {
            return Err(StageError::BadResponse("server-sent event line too long".into()));
        }
        Ok(())
    }

    /// The next event with content, if a complete one is buffered.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, StageError> {
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let Some(data) = line.strip_prefix("data:") else { continue }; // comments, event:, id:, blank
            let data = data.trim();
            if data == "[DONE]" {
                return Ok(Some(SseEvent::Done));
            }
            if data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(data)
                .map_err(|e| StageError::BadResponse(format!("chat chunk is not JSON: {e}")))?;
            if let Some(err) = v.get("error") {
                return Err(StageError::Unavailable(format!("model error: {err}")));
            }
            let content = v
                .pointer("/choices/0/delta/content")
                .or_else(|| v.pointer("/choices/0/message/content"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !content.is_empty() {
                return Ok(Some(SseEvent::Delta(content.to_owned())));
            }
        }
        Ok(None)
    }
}

// ---------------------------------------------------------------- TTS

/// `POST /v1/audio/speech`, streamed.
pub struct OpenAiSpeech {
    endpoint: Endpoint,
    client: reqwest::Client,
}

impl OpenAiSpeech {
    /// An adapter for `endpoint`.
    pub fn new(endpoint: Endpoint, client: reqwest::Client) -> Self {
        Self { endpoint, client }
    }
}

impl TextToSpeech for OpenAiSpeech {
    fn name(&self) -> &str {
        &self.endpoint.base_url
    }

    fn synthesize(&self, text: &str, voice: &str) -> BoxStream<'static, Result<SpeechChunk, StageError>> {
        let ep = &self.endpoint;
        let voice = ep.voice.clone().unwrap_or_else(|| voice.to_owned());
        let body = json!({
            "model": ep.model,
            "input": text,
            "voice": voice,
            "response_format": ep.audio_format,
        });
        let dec = PcmDecoder::new(ep.pcm_rate_hz, ep.audio_format == "wav");
        let opened = ep.post_streamed(&self.client, "/audio/speech", body).map_ok(move |(ep, body)| (ep, body, dec));
        open_then(opened, |(ep, mut body, mut dec)| async move {
            loop {
                match next_chunk(&ep, &mut body, "audio stalled").await {
                    Ok(Some(bytes)) => match dec.feed(&bytes) {
                        Ok(Some(pcm)) => {
                            return Some((Ok(SpeechChunk { pcm, phonemes: Vec::new() }), Some((ep, body, dec))));
                        }
                        Ok(None) => {}
                        Err(e) => return Some((Err(e), None)),
                    },
                    Ok(None) => return None,
                    Err(e) => return Some((Err(e), None)),
                }
            }
        })
    }
}

/// Streamed s16le bytes (optionally a WAV) -> PCM chunks (sans-IO).
#[derive(Debug)]
pub struct PcmDecoder {
    rate_hz: u32,
    header: Option<Vec<u8>>,
    carry: Option<u8>,
}

impl PcmDecoder {
    /// Raw pcm at `rate_hz`, or a WAV whose header gives the rate.
    pub fn new(rate_hz: u32, wav: bool) -> Self {
        Self { rate_hz, header: wav.then(Vec::new), carry: None }
    }

    /// Add bytes; returns the samples completed.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Option<Pcm>, StageError> {
        let mut data: &[u8] = bytes;
        let owned;
        if let Some(h) = self.header.as_mut() {
            h.extend_from_slice(bytes);
            if h.len() > 64 * 1024 {
                return Err(StageError::BadResponse("WAV header too long".into()));
            }
            let Some((rate, start)) = wav_header(h)? else { return Ok(None) };
            self.rate_hz = rate;
            owned = h[start..].to_vec();
            self.header = None;
            data = &owned;
        }
        let mut samples = Vec::with_capacity(data.len() / 2 + 1);
        let mut it = data.iter().copied();
        if let Some(lo) = self.carry.take() {
            match it.next() {
                Some(hi) => samples.push(i16::from_le_bytes([lo, hi])),
                None => self.carry = Some(lo),
            }
        }
        let rest: Vec<u8> = it.collect();
        let mut pairs = rest.chunks_exact(2);
        for p in &mut pairs {
            samples.push(i16::from_le_bytes([p[0], p[1]]));
        }
        if let [b] = pairs.remainder() {
            self.carry = Some(*b);
        }
        if samples.is_empty() {
            return Ok(None);
        }
        Ok(Some(Pcm { rate_hz: self.rate_hz, samples }))
    }
}

/// (rate, offset of the sample data) once the header is complete.
fn wav_header(h: &[u8]) -> Result<Option<(u32, usize)>, StageError> {
    if h.len() < 12 {
        return Ok(None);
    }
    if &h[0..4] != b"RIFF" || &h[8..12] != b"WAVE" {
        return Err(StageError::BadResponse("audio is not a WAV".into()));
    }
    let mut pos = 12;
    let mut rate = None;
    while pos + 8 <= h.len() {
        let id = &h[pos..pos + 4];
        let len = u32::from_le_bytes([h[pos + 4], h[pos + 5], h[pos + 6], h[pos + 7]]) as usize;
        if id == b"data" {
            let rate = rate.ok_or_else(|| StageError::BadResponse("WAV data before fmt".into()))?;
            return Ok(Some((rate, pos + 8)));
        }
        if pos + 8 + len > h.len() {
            return Ok(None);
        }
        if id == b"fmt " && len >= 16 {
            let f = &h[pos + 8..];
            let format = u16::from_le_bytes([f[0], f[1]]);
            let channels = u16::from_le_bytes([f[2], f[3]]);
            let bits = u16::from_le_bytes([f[14], f[15]]);
            if format != 1 || channels != 1 || bits != 16 {
                return Err(StageError::BadResponse(format!(
                    "WAV must be 16-bit mono PCM (format {format}, {channels} channels, {bits} bits)"
                )));
            }
            rate = Some(u32::from_le_bytes([f[4], f[5], f[6], f[7]]));
        }
        pos += 8 + len + (len & 1);
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_decoder_reads_split_chunks_comments_and_done() {
        let mut d = SseDecoder::default();
        d.feed(b": keep-alive\n\ndata: {\"choices\":[{\"delta\":{\"role\":\"assistant\"}}]}\n\nda").unwrap();
        assert_eq!(d.next_event().unwrap(), None, "role-only chunk has no content; the rest is incomplete");
        d.feed(b"ta: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\r\n\r\n").unwrap();
        assert_eq!(d.next_event().unwrap(), Some(SseEvent::Delta("Hel".into())));
        d.feed(b"data: [DONE]\n\n").unwrap();
        assert_eq!(d.next_event().unwrap(), Some(SseEvent::Done));
    }

    #[test]
    fn sse_decoder_reports_garbage_and_errors() {
        let mut d = SseDecoder::default();
        d.feed(b"data: {not json\n").unwrap();
        assert!(matches!(d.next_event(), Err(StageError::BadResponse(_))));
        let mut d = SseDecoder::default();
        d.feed(b"data: {\"error\":{\"message\":\"overloaded\"}}\n").unwrap();
        assert!(d.next_event().unwrap_err().retryable());
    }

    #[test]
    fn pcm_decoder_handles_odd_splits_and_wav_headers() {
        let mut d = PcmDecoder::new(24_000, false);
        assert_eq!(d.feed(&[1]).unwrap(), None);
        let p = d.feed(&[0, 2, 0, 3]).unwrap().unwrap();
        assert_eq!(p.samples, vec![1, 2]);
        assert_eq!(d.feed(&[0]).unwrap().unwrap().samples, vec![3]);

        let wav = media::wav::to_bytes(media::PcmRef { rate_hz: 22_050, samples: &[5, -5, 7] });
        let mut d = PcmDecoder::new(24_000, true);
        assert_eq!(d.feed(&wav[..20]).unwrap(), None);
        let p = d.feed(&wav[20..]).unwrap().unwrap();
        assert_eq!((p.rate_hz, p.samples), (22_050, vec![5, -5, 7]));
        assert!(PcmDecoder::new(24_000, true).feed(b"NOTAWAVEFILE....").is_err());
    }

    #[test]
    fn urls_and_debug_never_show_the_key() {
        let mut ep = Endpoint::new("http://h:1/", "m");
        assert_eq!(ep.url("/chat/completions"), "http://h:1/v1/chat/completions");
        ep.base_url = "http://h:1/v1".into();
        assert_eq!(ep.url("/audio/speech"), "http://h:1/v1/audio/speech");
        ep.api_key = Some("sk-secret".into());
        assert!(!format!("{ep:?}").contains("sk-secret"));
    }
}
