//! A fake OpenAI-compatible server (the real wire protocol over real HTTP on loopback) for the
//! cascade's STT, LLM and TTS adapters, with scriptable errors, stalls and slow streams, and a
//! record of what it was asked and when.
//!
//! - `POST /v1/audio/transcriptions`: answers `{"text": <stt_text>}` after checking a WAV came.
//! - `POST /v1/chat/completions`: streams `llm_script` as SSE chat chunks (each after its delay),
//!   then `data: [DONE]`.
//! - `POST /v1/audio/speech`: streams raw 24 kHz s16le pcm: a 220 Hz tone of `tts_ms_per_char`
//!   per input character, in 100 ms chunks, each after `tts_chunk_delay`.
//! - `POST /v1/embeddings`: one vector of [`EMBEDDING_DIMS`] per input: its words (lowercased
//!   letters and digits) hashed into the dimensions and counted, so texts that share words are
//!   near by cosine (OpenAI API reference, "Embeddings": `{"data": [{"index", "embedding"}]}`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};

/// What the fake does.
#[derive(Clone)]
pub struct FakeBehavior {
    pub stt_text: String,
    pub stt_status: Option<u16>,
    /// (delay before, content delta) pairs.
    pub llm_script: Vec<(Duration, String)>,
    pub llm_status: Option<u16>,
    /// Accept the request and never answer.
    pub llm_stall: bool,
    pub tts_status: Option<u16>,
    pub tts_ms_per_char: u64,
    pub tts_chunk_delay: Duration,
}

impl Default for FakeBehavior {
    fn default() -> Self {
        Self {
            stt_text: "tell me about the weather".into(),
            stt_status: None,
            llm_script: Vec::new(),
            llm_status: None,
            llm_stall: false,
            tts_status: None,
            tts_ms_per_char: 50,
            tts_chunk_delay: Duration::from_millis(5),
        }
    }
}

/// What the fake saw.
#[derive(Default, Debug, Clone)]
pub struct FakeLog {
    /// (when, WAV bytes) of transcription requests.
    pub stt: Vec<(Instant, usize)>,
    /// (when, request JSON) of chat requests.
    pub llm: Vec<(Instant, Value)>,
    /// When each chat stream sent its last byte.
    pub llm_done: Vec<Instant>,
    /// (when, input text) of speech requests.
    pub tts: Vec<(Instant, String)>,
    /// Speech streams that ended early because the client went away.
    pub tts_cancelled: usize,
    /// Speech streams sent completely.
    pub tts_completed: usize,
    /// Authorization headers seen.
    pub auth: Vec<String>,
    /// Inputs of embeddings requests, one list per request.
    pub embeddings: Vec<Vec<String>>,
}

#[derive(Clone)]
pub struct Fake {
    pub addr: SocketAddr,
    pub behavior: Arc<Mutex<FakeBehavior>>,
    pub log: Arc<Mutex<FakeLog>>,
}

impl Fake {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    pub fn log(&self) -> FakeLog {
        self.log.lock().unwrap().clone()
    }
    pub fn set(&self, f: impl FnOnce(&mut FakeBehavior)) {
        f(&mut self.behavior.lock().unwrap());
    }
}

/// JSON `{"emotion":..,"text":..}` of a reply, cut into deltas of `n` characters.
pub fn json_deltas(emotion: &str, text: &str, n: usize, delay: Duration) -> Vec<(Duration, String)> {
    let s = json!({"emotion": emotion, "text": text}).to_string();
    let chars: Vec<char> = s.chars().collect();
    chars.chunks(n).map(|c| (delay, c.iter().collect())).collect()
}

pub async fn start_fake(behavior: FakeBehavior) -> Fake {
    let fake_state = (Arc::new(Mutex::new(behavior)), Arc::new(Mutex::new(FakeLog::default())));
    let app = Router::new()
        .route("/v1/audio/transcriptions", post(stt))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/audio/speech", post(speech))
        .route("/v1/embeddings", post(embeddings))
        .with_state(fake_state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Fake { addr, behavior: fake_state.0, log: fake_state.1 }
}

type St = (Arc<Mutex<FakeBehavior>>, Arc<Mutex<FakeLog>>);

fn note_auth(st: &St, h: &HeaderMap) {
    if let Some(a) = h.get("authorization").and_then(|v| v.to_str().ok()) {
        st.1.lock().unwrap().auth.push(a.to_owned());
    }
}

fn status(code: u16) -> Response {
    let s = StatusCode::from_u16(code).unwrap();
    (s, axum::Json(json!({"error": {"message": "scripted failure"}}))).into_response()
}

async fn stt(State(st): State<St>, h: HeaderMap, body: Bytes) -> Response {
    note_auth(&st, &h);
    let b = st.0.lock().unwrap().clone();
    if let Some(c) = b.stt_status {
        return status(c);
    }
    let has_wav = body.windows(4).any(|w| w == b"RIFF") && body.windows(4).any(|w| w == b"WAVE");
    if !has_wav {
        return status(400);
    }
    st.1.lock().unwrap().stt.push((Instant::now(), body.len()));
    axum::Json(json!({"text": b.stt_text})).into_response()
}

async fn chat(State(st): State<St>, h: HeaderMap, axum::Json(req): axum::Json<Value>) -> Response {
    note_auth(&st, &h);
    let b = st.0.lock().unwrap().clone();
    st.1.lock().unwrap().llm.push((Instant::now(), req));
    if let Some(c) = b.llm_status {
        return status(c);
    }
    if b.llm_stall {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let log = Arc::clone(&st.1);
    let stream = async_stream(b.llm_script, log);
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(stream)).unwrap()
}

fn async_stream(
    script: Vec<(Duration, String)>,
    log: Arc<Mutex<FakeLog>>,
) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> {
    let items: Vec<Option<(Duration, String)>> = script.into_iter().map(Some).chain([None]).collect();
    futures::stream::unfold((items.into_iter(), log), |(mut it, log)| async move {
        let item = it.next()?;
        let bytes = match item {
            Some((delay, delta)) => {
                tokio::time::sleep(delay).await;
                let chunk = json!({"choices": [{"index": 0, "delta": {"content": delta}}]});
                format!("data: {chunk}\n\n")
            }
            None => {
                log.lock().unwrap().llm_done.push(Instant::now());
                "data: [DONE]\n\n".to_owned()
            }
        };
        Some((Ok(Bytes::from(bytes)), (it, log)))
    })
}

/// Counts a speech stream as cancelled unless it was marked complete.
struct StreamGuard {
    log: Arc<Mutex<FakeLog>>,
    complete: bool,
}
impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut l = self.log.lock().unwrap();
        if self.complete { l.tts_completed += 1 } else { l.tts_cancelled += 1 }
    }
}

async fn speech(State(st): State<St>, h: HeaderMap, axum::Json(req): axum::Json<Value>) -> Response {
    note_auth(&st, &h);
    let b = st.0.lock().unwrap().clone();
    let input = req["input"].as_str().unwrap_or("").to_owned();
    st.1.lock().unwrap().tts.push((Instant::now(), input.clone()));
    if let Some(c) = b.tts_status {
        return status(c);
    }
    let total = (input.chars().count() as u64 * b.tts_ms_per_char * 24) as usize; // samples at 24 kHz
    let chunk = 2400usize;
    let guard = StreamGuard { log: Arc::clone(&st.1), complete: false };
    let stream = futures::stream::unfold((0usize, guard), move |(pos, mut guard)| async move {
        if pos >= total {
            guard.complete = true;
            drop(guard);
            return None;
        }
        tokio::time::sleep(b.tts_chunk_delay).await;
        let end = (pos + chunk).min(total);
        let mut bytes = Vec::with_capacity((end - pos) * 2);
        for i in pos..end {
            let v = ((i as f64 * 2.0 * std::f64::consts::PI * 220.0 / 24_000.0).sin() * 8000.0) as i16;
            bytes.extend_from_slice(&v.to_le_bytes());
        }
        Some((Ok::<_, std::io::Error>(Bytes::from(bytes)), (end, guard)))
    });
    Response::builder().header("content-type", "audio/pcm").body(Body::from_stream(stream)).unwrap()
}

/// Dimensions of the fake's embeddings.
pub const EMBEDDING_DIMS: usize = 64;

/// The fake's embedding of `text`: word counts hashed (FNV-1a) into [`EMBEDDING_DIMS`].
pub fn fake_embedding(text: &str) -> Vec<f32> {
    let mut v = vec![0f32; EMBEDDING_DIMS];
    for w in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let h = w
            .to_lowercase()
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
        v[(h % EMBEDDING_DIMS as u64) as usize] += 1.0;
    }
    v
}

async fn embeddings(State(st): State<St>, h: HeaderMap, axum::Json(req): axum::Json<Value>) -> Response {
    note_auth(&st, &h);
    let inputs: Vec<String> = match &req["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(a) => a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect(),
        _ => return status(400),
    };
    if req["model"].as_str().is_none_or(str::is_empty) {
        return status(400);
    }
    st.1.lock().unwrap().embeddings.push(inputs.clone());
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": fake_embedding(t)}))
        .collect();
    axum::Json(json!({"object": "list", "data": data, "model": req["model"], "usage": {"prompt_tokens": 0, "total_tokens": 0}}))
        .into_response()
}
