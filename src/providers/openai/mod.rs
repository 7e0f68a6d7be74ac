//! The `openai` provider: the OpenAI Realtime WebSocket protocol (GA or beta dialect), which
//! also reaches Azure OpenAI, xAI, StepFun, GLM-Realtime and Qwen-Omni realtime.
//!
//! [`RealtimeProvider::connect`] opens the socket (TLS with bundled roots), sends `session.update`
//! and replays [`SessionConfig::history`] as conversation items, then spawns one task per
//! provider session that owns the socket and `select!`s over:
//! - commands from the session task (audio -> `input_audio_buffer.append`, commit, text, cancel,
//!   truncate, generate_reply, close),
//! - server messages (parsed by [`protocol`], mapped to [`ProviderEvent`]s),
//! - finished tool calls (run by the character's [`ToolRegistry`], never longer than their
//!   timeout; the result goes back as `function_call_output` and a `response.create` follows once
//!   the model's response that asked for it is done),
//! - the client's own tools ([`ProviderCommand::UpdateSession`] sends a partial `session.update`
//!   with the character's tools plus the client's): their calls go to the session as
//!   [`ProviderEvent::ToolCall`] and count as in flight until the client's
//!   [`ProviderCommand::ToolOutput`] (or, after `CLIENT_TOOL_TIMEOUT_MS`, an error output) comes
//!   back, then the same follow-up `response.create` as for our own tools. A voice change is
//!   refused once the model produced audio (the Realtime API's own rule).
//!
//! Invariants: at most one `response.create` is outstanding for a set of tool calls; a response
//! that only called tools is not reported as done (the follow-up response is the reply); `Ready`
//! is sent once the server confirmed our configuration (`session.updated`); an unexpected end of
//! the socket is reported as [`ProviderEvent::Closed`] (resilience lives above the trait, in
//! [`super::resilient`]). The API key is never logged.

pub mod protocol;
pub mod transport;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use self::protocol::{Dialect, ServerMessage, SessionParams, TurnDetection};
use super::tools::{ToolEffect, ToolRegistry, ToolSpec};
use super::{
    AudioFormat, COMMAND_CHANNEL_CAPACITY, Capabilities, EVENT_CHANNEL_CAPACITY, Pcm, ProviderCommand, ProviderError,
    ProviderEvent, ProviderSession, RealtimeProvider, SessionConfig, Speaker,
};

/// Voices the OpenAI Realtime API offers; a character voice outside this list falls back to the
/// configured default.
pub const OPENAI_VOICES: &[&str] =
    &["alloy", "ash", "ballad", "cedar", "coral", "echo", "marin", "sage", "shimmer", "verse"];
/// At most this many tool calls of one session run at once; more get an error output.
const MAX_CONCURRENT_TOOL_CALLS: usize = 8;
/// Call names remembered from `output_item.added` (beta servers omit the name later).
const MAX_REMEMBERED_CALLS: usize = 64;

/// A secret that never appears in logs or `Debug` output.
#[derive(Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.0.trim().is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

/// Settings of the `openai` provider (`[openai]` in kotodama.toml, `OPENAI_*` in the environment).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiSettings {
    /// WebSocket URL (`OPENAI_REALTIME_URL`); `?model=` is added when absent.
    pub url: String,
    /// API key (`OPENAI_API_KEY`), sent as `Authorization: Bearer`.
    pub api_key: Option<Secret>,
    /// Model (`OPENAI_REALTIME_MODEL`).
    pub model: String,
    /// Voice for every character; unset: the character's voice when OpenAI has it, else `marin`.
    pub voice: Option<String>,
    /// `server_vad`, `semantic_vad` or `local` (our VAD commits turns).
    pub turn_detection: TurnDetection,
    /// Input transcription model; empty: no user transcripts.
    pub transcription_model: String,
    /// `ga` or `beta`.
    pub dialect: Dialect,
    /// Extra handshake headers, e.g. Azure's `api-key` (values are never logged).
    pub extra_headers: std::collections::BTreeMap<String, Secret>,
    /// Input sample rate: 24000 (OpenAI) or 16000 (Qwen-Omni).
    pub input_rate_hz: u32,
    /// Recycle provider sessions before this many seconds (OpenAI ends them at 60 min).
    pub max_session_secs: u64,
    /// WebSocket connect timeout, ms.
    pub connect_timeout_ms: u64,
}

impl Default for OpenAiSettings {
    fn default() -> Self {
        Self {
            url: "wss://api.openai.com/v1/realtime".into(),
            api_key: None,
            model: "gpt-realtime".into(),
            voice: None,
            turn_detection: TurnDetection::ServerVad,
            transcription_model: "gpt-4o-mini-transcribe".into(),
            dialect: Dialect::Ga,
            extra_headers: Default::default(),
            input_rate_hz: 24_000,
            max_session_secs: 20 * 60,
            connect_timeout_ms: 10_000,
        }
    }
}

impl OpenAiSettings {
    /// The URL with `model` in the query.
    pub fn full_url(&self) -> String {
        if self.url.contains("model=") {
            self.url.clone()
        } else if self.url.contains('?') {
            format!("{}&model={}", self.url, self.model)
        } else {
            format!("{}?model={}", self.url, self.model)
        }
    }

    fn headers(&self) -> Vec<(String, String)> {
        let mut h = Vec::new();
        if let Some(k) = self.api_key.as_ref().filter(|k| !k.is_empty()) {
            h.push(("Authorization".to_owned(), format!("Bearer {}", k.expose())));
        }
        if self.dialect == Dialect::Beta {
            h.push(("OpenAI-Beta".to_owned(), "realtime=v1".to_owned()));
        }
        for (k, v) in &self.extra_headers {
            h.push((k.clone(), v.expose().to_owned()));
        }
        h
    }

    fn voice_for(&self, character_voice: &str) -> String {
        if let Some(v) = &self.voice {
            return v.clone();
        }
        if OPENAI_VOICES.contains(&character_voice) {
            return character_voice.to_owned();
        }
        match self.dialect {
            Dialect::Ga => "marin".into(),
            Dialect::Beta => "alloy".into(),
        }
    }
}

/// The OpenAI Realtime provider.
#[derive(Debug, Clone)]
pub struct OpenAiProvider {
    settings: Arc<OpenAiSettings>,
}

impl OpenAiProvider {
    /// A provider with these settings.
    pub fn new(settings: OpenAiSettings) -> Self {
        Self { settings: Arc::new(settings) }
    }
}

impl RealtimeProvider for OpenAiProvider {
    fn name(&self) -> &str {
        "openai"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            server_vad: self.settings.turn_detection != TurnDetection::Local,
            truncation: true,
            user_transcripts: !self.settings.transcription_model.is_empty(),
            tools: true,
            images: true,
            max_session: Some(Duration::from_secs(self.settings.max_session_secs)),
        }
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: self.settings.input_rate_hz }
    }

    /// The session asks for `audio/pcm` at 24 kHz (the only PCM rate the Realtime API sends).
    fn output_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: protocol::OUTPUT_RATE_HZ }
    }

    fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>> {
        let settings = Arc::clone(&self.settings);
        async move {
            let timeout = Duration::from_millis(settings.connect_timeout_ms);
            let mut socket =
                transport::connect(&settings.full_url(), &settings.headers(), timeout).await.map_err(|e| match e {
                    transport::TransportError::Status(401 | 403) => ProviderError::Config(
                        "the OpenAI API key was rejected (HTTP 401/403): check OPENAI_API_KEY".into(),
                    ),
                    e if e.retryable() => ProviderError::Unavailable(e.to_string()),
                    e => ProviderError::Config(e.to_string()),
                })?;
            let params = SessionParams {
                model: settings.model.clone(),
                instructions: cfg.instructions.clone(),
                voice: settings.voice_for(cfg.voice_for("openai")),
                input_rate_hz: settings.input_rate_hz,
                turn_detection: settings.turn_detection,
                transcription_model: Some(settings.transcription_model.clone()).filter(|m| !m.is_empty()),
                tools: cfg.tools.specs(),
            };
            let unavailable = |e: tokio_tungstenite::tungstenite::Error| ProviderError::Unavailable(e.to_string());
            socket
                .send(Message::text(protocol::session_update(settings.dialect, &params)))
                .await
                .map_err(unavailable)?;
            for item in &cfg.history {
                socket
                    .send(Message::text(protocol::history_item(settings.dialect, item)))
                    .await
                    .map_err(unavailable)?;
            }
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
            let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
            let conn = Connection::new(settings, cfg, ev_tx);
            tokio::spawn(conn.run(socket, cmd_rx));
            Ok(ProviderSession { commands: cmd_tx, events: ev_rx })
        }
        .boxed()
    }
}

/// A tool call that finished (or a client's call whose answer did not come in time).
struct ToolDone {
    call_id: String,
    output: String,
    effects: Vec<ToolEffect>,
    /// A client tool's timeout: void when the client answered first.
    client_timeout: bool,
}

/// Why the connection loop stopped.
enum Stop {
    /// We closed it (Close command or the session task went away).
    Ours,
    /// The server or the network ended it.
    Theirs(String),
}

/// One item's transcript as its deltas arrive (OpenAI Realtime sends the text of an item in
/// pieces: `response.output_audio_transcript.delta`,
/// `conversation.item.input_audio_transcription.delta`).
#[derive(Default)]
struct ItemTranscript {
    /// The item being transcribed.
    item: Option<String>,
    /// Its text so far.
    text: String,
}

impl ItemTranscript {
    /// A new item (or none): the text starts empty.
    fn start(&mut self, item: Option<String>) {
        self.item = item;
        self.text.clear();
    }

    /// Add `delta` of `item_id` (a delta of another item starts that item); the text so far.
    fn append(&mut self, item_id: &str, delta: &str) -> String {
        if self.item.as_deref() != Some(item_id) {
            self.start(Some(item_id.to_owned()));
        }
        self.text.push_str(delta);
        self.text.clone()
    }
}

/// The state of one provider session (owned by its task).
struct Connection {
    settings: Arc<OpenAiSettings>,
    cfg: SessionConfig,
    events: mpsc::Sender<ProviderEvent>,
    ready: bool,
    response_active: bool,
    /// The message item of the active response (the one whose audio we play) and its transcript
    /// so far.
    agent: ItemTranscript,
    /// The user's item being transcribed and its transcript so far.
    user: ItemTranscript,
    /// Names of calls announced by `output_item.added` (beta omits them later).
    call_names: HashMap<String, String>,
    /// Calls already started (a call appears in `arguments.done` and again in `response.done`).
    started_calls: HashSet<String>,
    calls_in_flight: usize,
    /// Tool outputs were sent: the model must be asked to continue once its response is done.
    followup_needed: bool,
    /// The tools the client declared (`session.update`), offered besides the character's.
    client_tools: Vec<ToolSpec>,
    /// Client tool calls waiting for the client's output.
    client_calls: HashSet<String>,
    /// The model produced audio in this session (its voice can no longer change).
    spoke: bool,
}

impl Connection {
    fn new(settings: Arc<OpenAiSettings>, cfg: SessionConfig, events: mpsc::Sender<ProviderEvent>) -> Self {
        Self {
            settings,
            cfg,
            events,
            ready: false,
            response_active: false,
            agent: ItemTranscript::default(),
            user: ItemTranscript::default(),
            call_names: HashMap::new(),
            started_calls: HashSet::new(),
            calls_in_flight: 0,
            followup_needed: false,
            client_tools: Vec::new(),
            client_calls: HashSet::new(),
            spoke: false,
        }
    }

    async fn run(mut self, socket: transport::Socket, mut commands: mpsc::Receiver<ProviderCommand>) {
        let (mut sink, mut stream) = socket.split();
        let (tool_tx, mut tool_rx) = mpsc::channel::<ToolDone>(MAX_CONCURRENT_TOOL_CALLS);
        let sid = self.cfg.session_id.clone();
        let stop = loop {
            let mut out: Vec<String> = Vec::new();
            let stop = tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(ProviderCommand::Close) => Some(Stop::Ours),
                    Some(cmd) => { self.on_command(cmd, &mut out).await; None }
                },
                msg = stream.next() => match msg {
                    None => Some(Stop::Theirs("socket ended".into())),
                    Some(Err(e)) => Some(Stop::Theirs(e.to_string())),
                    Some(Ok(Message::Text(t))) => self.on_server_text(&t, &mut out, &tool_tx).await,
                    Some(Ok(Message::Close(f))) => Some(Stop::Theirs(
                        f.map(|f| format!("closed by the server: {} {}", u16::from(f.code), f.reason)).unwrap_or_else(|| "closed by the server".into()),
                    )),
                    Some(Ok(_)) => None,
                },
                Some(done) = tool_rx.recv() => { self.on_tool_done(done, &mut out).await; None }
            };
            let mut stop = stop;
            for text in out {
                if let Err(e) = sink.send(Message::text(text)).await {
                    stop = Some(Stop::Theirs(e.to_string()));
                    break;
                }
            }
            if let Some(stop) = stop {
                break stop;
            }
        };
        match stop {
            Stop::Ours => {
                let _ = sink.send(Message::Close(None)).await;
            }
            Stop::Theirs(why) => {
                tracing::warn!(session_id = %sid, reason = %why, "openai realtime socket ended");
                let _ = self.events.send(ProviderEvent::Closed).await;
            }
        }
    }

    async fn on_command(&mut self, cmd: ProviderCommand, out: &mut Vec<String>) {
        match cmd {
            ProviderCommand::AppendAudio(pcm) => out.push(protocol::append_audio(&pcm.samples)),
            // The server (or our CommitTurn) detects turns; the onset edge is not on the wire.
            ProviderCommand::SpeechStarted => {}
            ProviderCommand::CommitTurn => {
                if self.settings.turn_detection == TurnDetection::Local {
                    out.push(protocol::commit());
                    out.push(protocol::response_create(None));
                }
            }
            ProviderCommand::Text(t) => {
                out.push(protocol::user_text(&t));
                out.push(protocol::response_create(None));
            }
            ProviderCommand::GenerateReply { instructions } => {
                out.push(protocol::response_create(instructions.as_deref()))
            }
            ProviderCommand::Cancel => {
                // The user moved on: tool results still land in the context, but no follow-up reply.
                self.followup_needed = false;
                // Sent even when no response seems active: with server VAD the server may be
                // starting one we have not heard of yet; "not active" errors are benign.
                out.push(protocol::response_cancel());
            }
            ProviderCommand::Truncate { item_id, audio_end, .. } => {
                out.push(protocol::truncate(&item_id, audio_end.as_millis() as u64))
            }
            ProviderCommand::AppendHistory(items) => {
                for item in &items {
                    out.push(protocol::history_item(self.settings.dialect, item));
                }
            }
            ProviderCommand::Image(image) => out.push(protocol::input_image(&image)),
            ProviderCommand::UpdateSession(update) => self.on_update(update, out).await,
            ProviderCommand::ToolOutput { call_id, output } => {
                if self.client_calls.remove(&call_id) {
                    let done = ToolDone { call_id, output, effects: vec![], client_timeout: false };
                    self.on_tool_done(done, out).await;
                } else {
                    let message =
                        format!("no tool call `{call_id}` is waiting for an output (unknown, answered or timed out)");
                    self.emit(ProviderEvent::Error { code: "unknown_tool_call".into(), message, retryable: false })
                        .await;
                }
            }
            ProviderCommand::Close | ProviderCommand::Restart => {}
        }
    }

    /// The client's `session.update`: a partial `session.update` upstream. Instructions add to
    /// the character's persona; the client's tools are offered besides the character's (a
    /// client tool named like one of the character's is left out: the character's runs); a
    /// voice change after the model first spoke is refused.
    async fn on_update(&mut self, update: super::SessionUpdate, out: &mut Vec<String>) {
        let instructions = update.instructions.map(|extra| {
            let persona = self.cfg.instructions.trim_end();
            if persona.is_empty() { extra } else { format!("{persona}\n\n{extra}") }
        });
        let mut voice = update.voice;
        if voice.is_some() && self.spoke {
            voice = None;
            let message = "the voice cannot change once the character has spoken (OpenAI Realtime keeps the \
                           voice of a session's first audio); the other changes were applied"
                .to_owned();
            let code = super::SESSION_UPDATE_UNSUPPORTED.to_owned();
            self.emit(ProviderEvent::Error { code, message, retryable: false }).await;
        }
        let tools = update.tools.map(|client| {
            self.client_tools = client.into_iter().filter(|t| !self.cfg.tools.contains(&t.name)).collect();
            let mut all = self.cfg.tools.specs();
            all.extend(self.client_tools.iter().cloned());
            all
        });
        if instructions.is_none() && voice.is_none() && tools.is_none() {
            return;
        }
        let dialect = self.settings.dialect;
        out.push(protocol::session_patch(dialect, instructions.as_deref(), voice.as_deref(), tools.as_deref()));
    }

    async fn emit(&self, ev: ProviderEvent) {
        // The session task holds us back here while its playout is full (backpressure).
        let _ = self.events.send(ev).await;
    }

    async fn on_server_text(
        &mut self,
        text: &str,
        out: &mut Vec<String>,
        tools: &mpsc::Sender<ToolDone>,
    ) -> Option<Stop> {
        let msg = match protocol::parse(text) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(session_id = %self.cfg.session_id, error = %e, "unreadable openai message ignored");
                return None;
            }
        };
        match msg {
            ServerMessage::SessionUpdated => {
                if !self.ready {
                    self.ready = true;
                    self.emit(ProviderEvent::Ready).await;
                }
            }
            ServerMessage::ResponseCreated { .. } => {
                self.response_active = true;
                self.agent.start(None);
            }
            ServerMessage::OutputItemAdded { item_id, kind, call } => {
                if kind == "message" {
                    self.agent.start(Some(item_id));
                } else if let Some((name, call_id)) = call {
                    if self.call_names.len() >= MAX_REMEMBERED_CALLS {
                        self.call_names.clear();
                    }
                    self.call_names.insert(call_id, name);
                }
            }
            ServerMessage::AudioDelta { item_id, samples } => {
                self.spoke = true;
                self.agent.item.get_or_insert_with(|| item_id.clone());
                let pcm = Pcm { rate_hz: protocol::OUTPUT_RATE_HZ, samples };
                self.emit(ProviderEvent::AudioDelta { item_id, pcm }).await;
            }
            ServerMessage::AudioDone { item_id } => self.emit(ProviderEvent::AudioDone { item_id }).await,
            ServerMessage::AgentTranscriptDelta { item_id, delta } => {
                let text = self.agent.append(&item_id, &delta);
                self.emit(ProviderEvent::Transcript { speaker: Speaker::Agent, item_id, text, is_final: false }).await;
            }
            ServerMessage::AgentTranscriptDone { item_id, transcript } => {
                self.agent.text.clear();
                let ev =
                    ProviderEvent::Transcript { speaker: Speaker::Agent, item_id, text: transcript, is_final: true };
                self.emit(ev).await;
            }
            ServerMessage::UserTranscriptDelta { item_id, delta } => {
                let text = self.user.append(&item_id, &delta);
                self.emit(ProviderEvent::Transcript { speaker: Speaker::User, item_id, text, is_final: false }).await;
            }
            ServerMessage::UserTranscriptDone { item_id, transcript } => {
                self.user.start(None);
                let ev =
                    ProviderEvent::Transcript { speaker: Speaker::User, item_id, text: transcript, is_final: true };
                self.emit(ev).await;
            }
            ServerMessage::SpeechStarted { .. } => self.emit(ProviderEvent::UserSpeechStarted).await,
            ServerMessage::FunctionCallArgumentsDone { call_id, name, arguments } => {
                let name = name.or_else(|| self.call_names.get(&call_id).cloned());
                if let Some(name) = name
                    && let Some(ev) = self.start_call(call_id, name, arguments, out, tools)
                {
                    self.emit(ev).await;
                }
            }
            ServerMessage::ResponseDone { status, message_items, calls, error, total_tokens, .. } => {
                self.response_active = false;
                if let Some(tokens) = total_tokens {
                    self.emit(ProviderEvent::Usage { tokens }).await;
                }
                let had_calls = !calls.is_empty();
                for c in calls {
                    if let Some(ev) = self.start_call(c.call_id, c.name, c.arguments, out, tools) {
                        self.emit(ev).await;
                    }
                }
                if let Some((code, message)) = error {
                    tracing::warn!(session_id = %self.cfg.session_id, %code, %message, "openai response failed");
                    let retryable = protocol::error_retryable("", &code);
                    self.emit(ProviderEvent::Error { code, message, retryable }).await;
                }
                if !message_items.is_empty() || !had_calls || status != "completed" {
                    let item_id = message_items.last().cloned().or_else(|| self.agent.item.clone()).unwrap_or_default();
                    self.emit(ProviderEvent::ResponseDone { item_id }).await;
                }
                self.agent.item = None;
                self.maybe_follow_up(out);
            }
            ServerMessage::Error { kind, code, message } => {
                if protocol::error_benign(&code) {
                    tracing::debug!(session_id = %self.cfg.session_id, %code, %message, "openai: expected race");
                } else {
                    let retryable = protocol::error_retryable(&kind, &code);
                    tracing::warn!(session_id = %self.cfg.session_id, %kind, %code, %message, retryable, "openai error");
                    let code = if code.is_empty() { kind } else { code };
                    self.emit(ProviderEvent::Error { code, message, retryable }).await;
                }
            }
            ServerMessage::SessionCreated
            | ServerMessage::SpeechStopped
            | ServerMessage::InputCommitted { .. }
            | ServerMessage::Truncated { .. }
            | ServerMessage::Other(_) => {}
        }
        None
    }

    /// Run a call of the model: ours through the registry, a client's by asking the session
    /// (the returned [`ProviderEvent::ToolCall`]), with a timeout that answers for the client.
    fn start_call(
        &mut self,
        call_id: String,
        name: String,
        arguments: String,
        out: &mut Vec<String>,
        tools: &mpsc::Sender<ToolDone>,
    ) -> Option<ProviderEvent> {
        if !self.started_calls.insert(call_id.clone()) {
            return None;
        }
        if self.started_calls.len() > MAX_REMEMBERED_CALLS * 4 {
            // Only duplicates within one response matter; forget old ids (bounded memory).
            self.started_calls.clear();
            self.started_calls.insert(call_id.clone());
        }
        self.followup_needed = true;
        if self.calls_in_flight >= MAX_CONCURRENT_TOOL_CALLS {
            out.push(protocol::function_call_output(&call_id, r#"{"error":"too many tool calls at once"}"#));
            return None;
        }
        self.calls_in_flight += 1;
        tracing::info!(session_id = %self.cfg.session_id, tool = %name, %call_id, "tool call");
        if !self.cfg.tools.contains(&name) && self.client_tools.iter().any(|t| t.name == name) {
            self.client_calls.insert(call_id.clone());
            let (tx, id) = (tools.clone(), call_id.clone());
            let output =
                serde_json::json!({"error": format!("the client did not answer `{name}` in time")}).to_string();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(signaling::events::CLIENT_TOOL_TIMEOUT_MS)).await;
                let _ = tx.send(ToolDone { call_id: id, output, effects: vec![], client_timeout: true }).await;
            });
            return Some(ProviderEvent::ToolCall { call_id, name, arguments });
        }
        let registry: Arc<ToolRegistry> = Arc::clone(&self.cfg.tools);
        let tx = tools.clone();
        tokio::spawn(async move {
            let r = registry.call(&name, &arguments).await;
            if r.failed {
                tracing::warn!(tool = %name, output = %r.output, "tool call failed; the model is told");
            }
            // Capacity equals the in-flight bound, so this never waits; a closed channel means the
            // session is gone and the result has nowhere to go.
            let _ = tx.send(ToolDone { call_id, output: r.output, effects: r.effects, client_timeout: false }).await;
        });
        None
    }

    async fn on_tool_done(&mut self, done: ToolDone, out: &mut Vec<String>) {
        if done.client_timeout {
            if !self.client_calls.remove(&done.call_id) {
                return; // the client answered in time
            }
            tracing::warn!(session_id = %self.cfg.session_id, call_id = %done.call_id, "client tool timed out; the model is told");
        }
        self.calls_in_flight = self.calls_in_flight.saturating_sub(1);
        for e in done.effects {
            match e {
                ToolEffect::Emotion(emotion) => {
                    let item_id = self.agent.item.clone();
                    self.emit(ProviderEvent::Emotion { item_id, emotion }).await;
                }
            }
        }
        out.push(protocol::function_call_output(&done.call_id, &done.output));
        self.maybe_follow_up(out);
    }

    /// Ask the model to continue once every tool result is in and its response is over.
    fn maybe_follow_up(&mut self, out: &mut Vec<String>) {
        if self.followup_needed && self.calls_in_flight == 0 && !self.response_active {
            self.followup_needed = false;
            out.push(protocol::response_create(None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_items_transcript_accumulates_its_deltas_and_restarts_for_another_item() {
        let mut t = ItemTranscript::default();
        assert_eq!(t.append("item_a", "Hello"), "Hello");
        assert_eq!(t.append("item_a", " there."), "Hello there.");
        assert_eq!(t.append("item_b", "Next"), "Next", "a delta of another item starts it");
        assert_eq!(t.item.as_deref(), Some("item_b"));
        t.start(None);
        assert_eq!((t.item, t.text.as_str()), (None, ""));
    }

    #[test]
    fn api_key_never_shows_in_debug() {
        let s = OpenAiSettings { api_key: Some(Secret::new("sk-very-secret")), ..Default::default() };
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("sk-very-secret"), "{dbg}");
        assert!(dbg.contains("***"));
    }

    #[test]
    fn model_goes_into_the_url_once() {
        let s = OpenAiSettings::default();
        assert_eq!(s.full_url(), "wss://api.openai.com/v1/realtime?model=gpt-realtime");
        let s = OpenAiSettings { url: "wss://x/realtime?api-version=1".into(), ..Default::default() };
        assert_eq!(s.full_url(), "wss://x/realtime?api-version=1&model=gpt-realtime");
        let s = OpenAiSettings { url: "wss://x/realtime?model=m".into(), ..Default::default() };
        assert_eq!(s.full_url(), "wss://x/realtime?model=m");
    }

    #[test]
    fn voice_prefers_setting_then_a_known_character_voice() {
        let s = OpenAiSettings::default();
        assert_eq!(s.voice_for("aiko"), "marin");
        assert_eq!(s.voice_for("coral"), "coral");
        let s = OpenAiSettings { voice: Some("ash".into()), ..Default::default() };
        assert_eq!(s.voice_for("coral"), "ash");
    }
}
