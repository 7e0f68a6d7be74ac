//! The `gemini` provider: Google's Gemini Live API (`BidiGenerateContent` over WebSocket).
//!
//! [`RealtimeProvider::connect`] opens the socket ([`super::openai::transport`]: rustls with the
//! bundled roots), sends `setup` and waits for `setupComplete`, seeds
//! [`SessionConfig::history`] as `clientContent` (`turnComplete: false`), then spawns one task
//! per provider session ([`session::Connection`]) that owns the socket and `select!`s over the
//! session task's commands, the server's frames (text or binary, the same JSON), finished tool
//! calls and the resuming connection being opened.
//!
//! What it maps (facts from ai.google.dev/api/live and .../gemini-api/docs/live-session):
//! - audio: 16 kHz s16le in (`realtimeInput.audio`), 24 kHz out (`modelTurn.parts[].inlineData`);
//!   one kotodama item per model turn (`gemini-<n>`); `turnComplete` ends it.
//! - turns: the server's automatic activity detection (`turn_detection = "server"`), or ours:
//!   `activityStart` before the user's audio (with ~300 ms of pre-roll) and `activityEnd` on
//!   [`ProviderCommand::CommitTurn`]; our barge-in (`Cancel`) opens an activity, which stops the
//!   model.
//! - barge-in by the model: `interrupted` -> [`ProviderEvent::UserSpeechStarted`] at once (the
//!   session clears playout and records what was heard); the rest of that turn is dropped.
//!   Gemini cannot truncate its context to what was heard, so `truncation` is false.
//! - transcripts: `inputTranscription` / `outputTranscription` chunks become partials; the user's
//!   final comes at the end of the model's turn (the chunks are not ordered with the audio), the
//!   agent's final with `turnComplete`.
//! - tools: `toolCall` -> the character's [`ToolRegistry`] -> `toolResponse` (the model goes on by
//!   itself); `toolCallCancellation` aborts the call and no response is sent for it.
//! - connection limits: `sessionResumption` is always on (`transparent`), and the newest handle
//!   is kept with the client messages sent after the last one it includes. On `goAway` the next
//!   connection is opened at once with the handle (make before break) and takes over at the next
//!   turn boundary, or when the old one closes, whichever comes first; the kept messages are sent
//!   again on it. An unexpected close with a handle resumes the same way; without one (or if the
//!   resume fails) the session reports [`ProviderEvent::Closed`] and the resilient wrapper
//!   reconnects with the history.
//!
//! The API key (or ephemeral token) is sent in the URL's query, as the API requires, and the URL
//! is never logged.

pub mod session;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

pub use self::settings::{GEMINI_VOICES, GeminiSettings, GeminiTurnDetection};
use super::openai::transport::{self, Socket};
use super::{
    AudioFormat, COMMAND_CHANNEL_CAPACITY, Capabilities, EVENT_CHANNEL_CAPACITY, ProviderError, ProviderSession,
    RealtimeProvider, SessionConfig,
};

pub mod protocol;

/// The Gemini Live provider.
#[derive(Debug, Clone)]
pub struct GeminiProvider {
    settings: Arc<GeminiSettings>,
}

impl GeminiProvider {
    /// A provider with these settings.
    pub fn new(settings: GeminiSettings) -> Self {
        Self { settings: Arc::new(settings) }
    }
}

impl RealtimeProvider for GeminiProvider {
    fn name(&self) -> &str {
        "gemini"
    }

    fn capabilities(&self) -> Capabilities {
        self.settings.capabilities()
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: protocol::INPUT_RATE_HZ }
    }

    /// Gemini Live speaks 24 kHz PCM (a chunk whose MIME type says otherwise is resampled).
    fn output_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: protocol::OUTPUT_RATE_HZ }
    }

    fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>> {
        let settings = Arc::clone(&self.settings);
        async move {
            let socket = open(&settings, &cfg, None).await?;
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
            let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
            let conn = session::Connection::new(settings, cfg, ev_tx);
            tokio::spawn(conn.run(socket, cmd_rx));
            Ok(ProviderSession { commands: cmd_tx, events: ev_rx })
        }
        .boxed()
    }
}

/// Open a connection: socket, `setup` (resuming `handle` when given), `setupComplete`, and for a
/// new session the history. Close codes 1007/1008 (bad key, model or argument) are configuration
/// errors; the rest may be retried.
pub(crate) async fn open(
    settings: &GeminiSettings,
    cfg: &SessionConfig,
    handle: Option<String>,
) -> Result<Socket, ProviderError> {
    let url = settings.ws_url().map_err(ProviderError::Config)?;
    let timeout = Duration::from_millis(settings.connect_timeout_ms);
    let mut socket = transport::connect(&url, &[], timeout).await.map_err(|e| match e {
        transport::TransportError::Status(401 | 403) => {
            ProviderError::Config("the Gemini API key was rejected (HTTP 401/403): check GEMINI_API_KEY".into())
        }
        e if e.retryable() => ProviderError::Unavailable(e.to_string()),
        e => ProviderError::Config(e.to_string()),
    })?;
    let resuming = handle.is_some();
    let setup = protocol::setup(&settings.setup_params(cfg, handle));
    let unavailable = |e: tokio_tungstenite::tungstenite::Error| ProviderError::Unavailable(e.to_string());
    socket.send(Message::text(setup)).await.map_err(unavailable)?;
    tokio::time::timeout(timeout, wait_setup_complete(&mut socket))
        .await
        .map_err(|_| ProviderError::Unavailable("no setupComplete in time".into()))??;
    if !resuming && let Some(h) = protocol::history(&cfg.history) {
        socket.send(Message::text(h)).await.map_err(unavailable)?;
    }
    Ok(socket)
}

async fn wait_setup_complete(socket: &mut Socket) -> Result<(), ProviderError> {
    while let Some(msg) = socket.next().await {
        let frame = match msg.map_err(|e| ProviderError::Unavailable(e.to_string()))? {
            Message::Text(t) => t.as_bytes().to_vec(),
            Message::Binary(b) => b.to_vec(),
            Message::Close(f) => {
                let (code, reason) =
                    f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
                let what = format!("Gemini closed the setup with {code} {reason}");
                return Err(if matches!(code, 1007 | 1008) {
                    ProviderError::Config(format!("{what}: check gemini.model, GEMINI_API_KEY and the voice"))
                } else {
                    ProviderError::Unavailable(what)
                });
            }
            _ => continue,
        };
        if let Ok(protocol::ServerMessage::SetupComplete) = protocol::parse(&frame) {
            return Ok(());
        }
    }
    Err(ProviderError::Unavailable("the socket ended before setupComplete".into()))
}
