//! The data-channel (and WebSocket fallback) message schema: the one definition of every event.
//!
//! Every message, in both directions, is one UTF-8 JSON object whose `"type"` field names the
//! variant (`#[serde(tag = "type")]`). Names and fields are fixed by API v1; new variants and new
//! optional fields may be added, nothing may be renamed or removed.
//!
//! * [`ServerEvent`]: server -> client; serialise with [`ServerEvent::to_json`].
//! * [`ClientEvent`]: client -> server; parse with [`parse_client_message`], which returns
//!   `Ok(None)` for a well-formed object of an unknown type (ignored, forward compatible) and a
//!   typed [`EventError`] (whose [`EventError::code`] becomes the `error` event's `code`) for
//!   anything malformed. A malformed message changes nothing.
//!
//! Golden fixtures for every variant live in `signaling/tests/fixtures/events/`.

use std::fmt;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Version of the data-channel protocol, sent as `protocol` in `session.ready`.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest client message accepted, in bytes (16 KiB). Checked before any parsing; only an
/// `image` message may be larger, up to [`MAX_IMAGE_MESSAGE`].
pub const MAX_CLIENT_MESSAGE: usize = 16 * 1024;

/// Largest `image` client message, in bytes (63 KiB: it fits one 64 KiB data-channel message,
/// the SCTP limit the server announces, and one WebSocket message). The image inside is limited
/// further by the server (decoded bytes, rate).
pub const MAX_IMAGE_MESSAGE: usize = 63 * 1024;

/// Server -> client events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum ServerEvent {
    /// Sent once, when the `events` channel opens: which session, protocol, character and provider.
    #[serde(rename = "session.ready")]
    SessionReady {
        /// The session this channel belongs to.
        session_id: String,
        /// Always [`PROTOCOL_VERSION`] for this schema.
        protocol: u32,
        /// Character id.
        character: String,
        /// Provider name.
        provider: String,
        /// The session is being recorded (audio and events, for replay and export; extension,
        /// sent only when true).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        recording: bool,
    },
    /// The agent's state changed.
    #[serde(rename = "state")]
    State {
        /// The new state.
        state: AgentState,
    },
    /// Voice activity detection saw the user start speaking.
    #[serde(rename = "user.speech_started")]
    UserSpeechStarted {
        /// Milliseconds since the session started.
        at_ms: u64,
    },
    /// Voice activity detection saw the user stop speaking.
    #[serde(rename = "user.speech_stopped")]
    UserSpeechStopped {
        /// Milliseconds since the session started.
        at_ms: u64,
    },
    /// Transcript of an utterance: partials carry the cumulative text (`final: false`), then
    /// exactly one final per utterance.
    #[serde(rename = "transcript")]
    Transcript {
        /// Who spoke.
        role: Role,
        /// The conversation item (utterance) this text belongs to.
        item_id: String,
        /// Cumulative text so far (or the final text).
        text: String,
        /// `true` exactly once per utterance, on the last message.
        #[serde(rename = "final")]
        is_final: bool,
    },
    /// The character's emotion changed.
    #[serde(rename = "emotion")]
    Emotion {
        /// The new emotion.
        emotion: Emotion,
        /// The agent item the emotion belongs to, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item_id: Option<String>,
    },
    /// A mouth shape for lip sync, timed relative to the start of that item's audio.
    #[serde(rename = "viseme")]
    Viseme {
        /// The agent item whose audio this viseme belongs to.
        item_id: String,
        /// The mouth shape.
        viseme: Viseme,
        /// Start, in milliseconds from the start of the item's audio.
        start_ms: u64,
        /// Duration in milliseconds.
        duration_ms: u64,
    },
    /// Barge-in cut the agent's speech; only `played_ms` of the item's audio was sent.
    #[serde(rename = "agent.interrupted")]
    AgentInterrupted {
        /// The interrupted agent item.
        item_id: String,
        /// Milliseconds of that item's audio that were actually played out.
        played_ms: u64,
    },
    /// Moderation stopped the agent's reply before it was spoken, or the user's text before it
    /// reached the model (extension): the audio was cut where the flagged sentence began (or the
    /// reply to the flagged user turn was cancelled) and the character's safe fallback line
    /// follows. The denied text is never sent, here or in any transcript.
    #[serde(rename = "moderation")]
    Moderation {
        /// The policy category that matched (e.g. `deny`, `credentials`).
        category: String,
        /// The agent item that was cut, or the user's item (`""` for typed text).
        item_id: String,
        /// Whose text was flagged: `agent` or `user`.
        source: String,
    },
    /// Something the client should know went wrong (e.g. a malformed client message).
    #[serde(rename = "error")]
    Error {
        /// Machine-readable code, e.g. `bad_message`, `message_too_large`.
        code: String,
        /// Human-readable explanation.
        message: String,
    },
    /// Reply to a client `ping`.
    #[serde(rename = "pong")]
    Pong,
    /// The character makes a gesture (extension of api-v1): `nod`, `wave`, `shrug`, ... as the
    /// model names it; released with the speech it accompanies.
    #[serde(rename = "gesture")]
    Gesture {
        /// The gesture's name.
        gesture: String,
        /// The agent item it belongs to, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        item_id: Option<String>,
    },
    /// The session is ending (extension of api-v1): sent just before the server closes the
    /// connection, so the client can tell a shutdown or a time limit from a network failure.
    #[serde(rename = "session.ended")]
    SessionEnded {
        /// Why, as in `GET /v1/sessions/{id}`'s `end_reason` (e.g. `server_shutdown`, `max_duration`).
        reason: String,
    },
    /// An external agent's result reached the session (extension, `POST
    /// /v1/sessions/{id}/agent-results`; N.E.K.O.'s `agent_notification`): it is in the model's
    /// context for the next turn, or spoken at once.
    #[serde(rename = "agent_notification")]
    AgentNotification {
        /// The result.
        text: String,
        /// Which agent produced it (e.g. `browser-agent`).
        source: String,
        /// Its status as the agent reports it (e.g. `completed`, `failed`).
        status: String,
    },
    /// A translation of a final transcript for subtitles (extension, issue 15): sent after the
    /// `transcript` with `final: true` of `item_id` when the user's language differs from the
    /// character's and a translation endpoint is configured (`[translation]`).
    #[serde(rename = "transcript.translation")]
    TranscriptTranslation {
        /// Whose words (today: the agent's).
        role: Role,
        /// The item of the final transcript translated.
        item_id: String,
        /// The translated text.
        text: String,
        /// The language translated into (BCP 47 tag, e.g. `ja`): the user's.
        language: String,
    },
    /// The session reached one of its budgets (extension): model tokens, session time or tool
    /// calls, per session or per user per day. With `action` `end` the session ends next
    /// (`session.ended {reason: "budget_exceeded"}`); with `degrade` it stays connected but the
    /// character no longer answers.
    #[serde(rename = "budget.exceeded")]
    BudgetExceeded {
        /// Which budget: `tokens`, `minutes` or `tool_calls`.
        kind: String,
        /// Whose budget: `session` or `user_day` (the user's UTC day).
        scope: String,
        /// The limit, in `unit`.
        limit: u64,
        /// What was used when it was reached, in `unit`.
        used: u64,
        /// Unit of `limit` and `used`: `tokens`, `seconds` (for `minutes`) or `calls`.
        unit: String,
        /// What happens now: `end` or `degrade`.
        action: String,
    },
    /// The model called a tool the client declared (extension: `session.update {tools}`); the
    /// client runs it and answers with `tool.output` under the same `call_id` (the model waits
    /// for it, at most [`CLIENT_TOOL_TIMEOUT_MS`], then gets an error output). Shape of OpenAI
    /// Realtime's `function_call` item (`call_id`, `name`, `arguments`).
    #[serde(rename = "tool.call")]
    ToolCall {
        /// The call's id, echoed in `tool.output`.
        call_id: String,
        /// The declared tool's name.
        name: String,
        /// The arguments as the model wrote them: a JSON object as text (it may not match the
        /// schema; the client validates).
        arguments: String,
    },
}

impl ServerEvent {
    /// `session.ready` with `protocol` set to [`PROTOCOL_VERSION`].
    pub fn session_ready(
        session_id: impl Into<String>,
        character: impl Into<String>,
        provider: impl Into<String>,
    ) -> Self {
        ServerEvent::SessionReady {
            session_id: session_id.into(),
            protocol: PROTOCOL_VERSION,
            character: character.into(),
            provider: provider.into(),
            recording: false,
        }
    }

    /// The wire `type` of this event, e.g. `"session.ready"`.
    pub fn type_name(&self) -> &'static str {
        match self {
            ServerEvent::SessionReady { .. } => "session.ready",
            ServerEvent::State { .. } => "state",
            ServerEvent::UserSpeechStarted { .. } => "user.speech_started",
            ServerEvent::UserSpeechStopped { .. } => "user.speech_stopped",
            ServerEvent::Transcript { .. } => "transcript",
            ServerEvent::Emotion { .. } => "emotion",
            ServerEvent::Viseme { .. } => "viseme",
            ServerEvent::AgentInterrupted { .. } => "agent.interrupted",
            ServerEvent::Moderation { .. } => "moderation",
            ServerEvent::Error { .. } => "error",
            ServerEvent::Pong => "pong",
            ServerEvent::SessionEnded { .. } => "session.ended",
            ServerEvent::Gesture { .. } => "gesture",
            ServerEvent::AgentNotification { .. } => "agent_notification",
            ServerEvent::BudgetExceeded { .. } => "budget.exceeded",
            ServerEvent::TranscriptTranslation { .. } => "transcript.translation",
            ServerEvent::ToolCall { .. } => "tool.call",
        }
    }

    /// Every server `type` this schema knows.
    pub const TYPES: &'static [&'static str] = &[
        "session.ready",
        "state",
        "user.speech_started",
        "user.speech_stopped",
        "transcript",
        "emotion",
        "viseme",
        "agent.interrupted",
        "error",
        "pong",
        "session.ended",
        "gesture",
        "agent_notification",
        "moderation",
        "budget.exceeded",
        "transcript.translation",
        "tool.call",
    ];

    /// One JSON object, ready to send as a data-channel text message.
    pub fn to_json(&self) -> String {
        // Serialisation cannot fail for these types (string keys only, infallible Serialize
        // impls); the fallback keeps this function total anyway.
        serde_json::to_string(self).unwrap_or_else(|_| {
            r#"{"type":"error","code":"internal","message":"event serialisation failed"}"#.to_owned()
        })
    }
}

/// Client -> server events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "type")]
#[non_exhaustive]
pub enum ClientEvent {
    /// A typed user message, handled like a spoken turn.
    #[serde(rename = "text")]
    Text {
        /// The message text.
        text: String,
    },
    /// Stop the agent now (barge-in without speech).
    #[serde(rename = "interrupt")]
    Interrupt,
    /// Liveness check; the server answers `pong`.
    #[serde(rename = "ping")]
    Ping,
    /// A screen or camera frame for models that take images (extension, issue 15): a data URL
    /// `data:image/jpeg;base64,...` or `data:image/png;base64,...`. The message may be up to
    /// [`MAX_IMAGE_MESSAGE`] bytes; the server limits the image's size and rate and answers an
    /// `error` (`images_unsupported` once, `image_too_large`, `bad_image`,
    /// `image_rate_limited`) when it drops one.
    #[serde(rename = "image")]
    Image {
        /// The image as a data URL.
        data: String,
    },
    /// Change the running session (extension; OpenAI Realtime's `session.update`): absent fields
    /// stay as they are. `instructions` are added to the character's persona, `voice` replaces
    /// its voice where the provider allows it (OpenAI: before the character first spoke),
    /// `tools` replaces the tools the client declared (the character's own tools stay), `language`
    /// sets the user's language for translated subtitles (issue 15). A
    /// provider that cannot take a change answers an `error` (`session_update_unsupported`).
    #[serde(rename = "session.update")]
    SessionUpdate {
        /// Instructions for the rest of the session (at most [`MAX_CLIENT_INSTRUCTIONS`] bytes).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instructions: Option<String>,
        /// A provider voice name (e.g. OpenAI's `marin`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        voice: Option<String>,
        /// Tools the model may call and the client runs (`tool.call` -> `tool.output`); at most
        /// [`MAX_CLIENT_TOOLS`].
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tools: Option<Vec<ToolDeclaration>>,
        /// The user's language (BCP 47 tag, e.g. `ja`, `en-US`): agent transcripts get a
        /// `transcript.translation` into it when it differs from the character's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        language: Option<String>,
    },
    /// The result of a `tool.call` (extension): the model continues with it once every call of
    /// its response is answered.
    #[serde(rename = "tool.output")]
    ToolOutput {
        /// The `call_id` of the `tool.call`.
        call_id: String,
        /// The result as text (JSON or plain words), at most [`MAX_TOOL_OUTPUT`] bytes.
        output: String,
    },
}

/// Longest client `session.update.instructions`, bytes.
pub const MAX_CLIENT_INSTRUCTIONS: usize = 8 * 1024;
/// Most tools a client may declare.
pub const MAX_CLIENT_TOOLS: usize = 64;
/// Longest `tool.output.output`, bytes.
pub const MAX_TOOL_OUTPUT: usize = 8 * 1024;
/// How long the model waits for a client's `tool.output`, ms; then it gets an error output.
pub const CLIENT_TOOL_TIMEOUT_MS: u64 = 30_000;

/// A tool the client declares and runs (OpenAI Realtime's function tool: `name`,
/// `description`, JSON-schema `parameters`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ToolDeclaration {
    /// Function name: 1 to 64 of `a-z A-Z 0-9 _ -` (OpenAI's rule for function names).
    pub name: String,
    /// What it does (the model reads this).
    #[serde(default)]
    pub description: String,
    /// JSON schema of the arguments (an object schema; `{}` when absent).
    #[serde(default)]
    pub parameters: serde_json::Value,
}

impl ToolDeclaration {
    /// Whether `name` is a valid function name (1 to 64 of `a-z A-Z 0-9 _ -`).
    pub fn valid_name(name: &str) -> bool {
        (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }
}

impl ClientEvent {
    /// Every client `type` this schema knows.
    pub const TYPES: &'static [&'static str] = &["text", "interrupt", "ping", "image", "session.update", "tool.output"];

    /// The wire `type` of this event.
    pub fn type_name(&self) -> &'static str {
        match self {
            ClientEvent::Text { .. } => "text",
            ClientEvent::Interrupt => "interrupt",
            ClientEvent::Ping => "ping",
            ClientEvent::Image { .. } => "image",
            ClientEvent::SessionUpdate { .. } => "session.update",
            ClientEvent::ToolOutput { .. } => "tool.output",
        }
    }

    /// One JSON object (used by test clients and the WebSocket fallback).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| format!(r#"{{"type":"{}"}}"#, self.type_name()))
    }
}

/// Why a client message was rejected. Each maps to the `code` of the `error` event sent back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// Larger than [`MAX_CLIENT_MESSAGE`]; not parsed at all.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the message received.
        len: usize,
        /// The limit ([`MAX_CLIENT_MESSAGE`]).
        limit: usize,
    },
    /// Not valid UTF-8.
    #[error("message is not valid UTF-8")]
    NotUtf8,
    /// Not valid JSON.
    #[error("message is not valid JSON: {0}")]
    NotJson(String),
    /// Valid JSON but not an object.
    #[error("message is not a JSON object")]
    NotObject,
    /// No `type` field.
    #[error("message has no \"type\" field")]
    MissingType,
    /// `type` is present but not a string.
    #[error("message \"type\" is not a string")]
    TypeNotString,
    /// A known `type` with missing or ill-typed fields.
    #[error("bad \"{kind}\" message: {reason}")]
    BadFields {
        /// The message type.
        kind: String,
        /// What was wrong.
        reason: String,
    },
}

impl EventError {
    /// The `code` of the `error` event answering this message.
    pub fn code(&self) -> &'static str {
        match self {
            EventError::TooLarge { .. } => "message_too_large",
            EventError::NotUtf8 => "invalid_utf8",
            EventError::NotJson(_) => "invalid_json",
            EventError::NotObject => "not_an_object",
            EventError::MissingType => "missing_type",
            EventError::TypeNotString => "invalid_type",
            EventError::BadFields { .. } => "bad_message",
        }
    }

    /// The `error` event to send back to the client.
    pub fn to_server_event(&self) -> ServerEvent {
        ServerEvent::Error { code: self.code().to_owned(), message: self.to_string() }
    }
}

/// Parse one client message.
///
/// * `Ok(Some(event))`: a known, well-formed event.
/// * `Ok(None)`: a well-formed object whose `type` this server does not know; ignore it.
/// * `Err(_)`: malformed; answer with [`EventError::to_server_event`] and change nothing.
///
/// Unknown extra fields on known types are ignored (forward compatibility).
pub fn parse_client_message(bytes: &[u8]) -> Result<Option<ClientEvent>, EventError> {
    if bytes.len() > MAX_IMAGE_MESSAGE {
        return Err(EventError::TooLarge { len: bytes.len(), limit: MAX_IMAGE_MESSAGE });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| EventError::NotUtf8)?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| EventError::NotJson(e.to_string()))?;
    let object = value.as_object().ok_or(EventError::NotObject)?;
    let kind = match object.get("type") {
        None => return Err(EventError::MissingType),
        Some(serde_json::Value::String(kind)) => kind.clone(),
        Some(_) => return Err(EventError::TypeNotString),
    };
    if bytes.len() > MAX_CLIENT_MESSAGE && kind != "image" {
        return Err(EventError::TooLarge { len: bytes.len(), limit: MAX_CLIENT_MESSAGE });
    }
    if !ClientEvent::TYPES.contains(&kind.as_str()) {
        return Ok(None);
    }
    serde_json::from_value(value).map(Some).map_err(|e| EventError::BadFields { kind, reason: e.to_string() })
}

/// The agent's conversational state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AgentState {
    /// Session set up, provider connecting; not listening yet.
    Initializing,
    /// Waiting for the user.
    Listening,
    /// The user's turn ended; the agent is preparing an answer.
    Thinking,
    /// Agent audio is playing.
    Speaking,
}

/// Who produced a piece of conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// The human.
    User,
    /// The AI character.
    Agent,
}

/// The character's emotion.
///
/// The documented set is serialised in lowercase: `neutral`, `happy`, `sad`, `angry`,
/// `surprised`, `fearful`, `disgusted`, `thinking`, `relaxed`. The set is open: a provider may
/// name another emotion, which is kept verbatim as [`Emotion::Other`] rather than lost; clients
/// should render an emotion they do not know as `neutral`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Emotion {
    /// `neutral`
    Neutral,
    /// `happy`
    Happy,
    /// `sad`
    Sad,
    /// `angry`
    Angry,
    /// `surprised`
    Surprised,
    /// `fearful`
    Fearful,
    /// `disgusted`
    Disgusted,
    /// `thinking`
    Thinking,
    /// `relaxed`
    Relaxed,
    /// Any other name (never one of the names above; use [`Emotion::from_str`] to build one).
    Other(String),
}

impl Emotion {
    /// The documented emotions, in order.
    pub const KNOWN: [Emotion; 9] = [
        Emotion::Neutral,
        Emotion::Happy,
        Emotion::Sad,
        Emotion::Angry,
        Emotion::Surprised,
        Emotion::Fearful,
        Emotion::Disgusted,
        Emotion::Thinking,
        Emotion::Relaxed,
    ];

    /// The wire name.
    pub fn as_str(&self) -> &str {
        match self {
            Emotion::Other(name) => name,
            known => known.known_name().unwrap_or_default(),
        }
    }

    /// The wire name of a documented emotion; `None` for [`Emotion::Other`].
    fn known_name(&self) -> Option<&'static str> {
        Some(match self {
            Emotion::Neutral => "neutral",
            Emotion::Happy => "happy",
            Emotion::Sad => "sad",
            Emotion::Angry => "angry",
            Emotion::Surprised => "surprised",
            Emotion::Fearful => "fearful",
            Emotion::Disgusted => "disgusted",
            Emotion::Thinking => "thinking",
            Emotion::Relaxed => "relaxed",
            Emotion::Other(_) => return None,
        })
    }

    /// The wire names of the documented emotions, in the order of [`Emotion::KNOWN`]: the one
    /// list for tool schemas, prompts and configuration checks.
    pub fn known_names() -> [&'static str; 9] {
        Emotion::KNOWN.each_ref().map(|e| e.known_name().unwrap_or_default())
    }

    /// Whether `name` is exactly a documented emotion's wire name.
    pub fn is_known(name: &str) -> bool {
        Emotion::known_names().contains(&name)
    }

    /// Map what models and TTS markup say (`joy`, `smiling`, `laughs`, `mad`, `scared`, `hmm`,
    /// `calm`, ...) onto the documented set; `None` for words that are no emotion.
    pub fn normalize(word: &str) -> Option<Emotion> {
        let w = word.trim().trim_matches(|c: char| !c.is_alphanumeric()).to_ascii_lowercase();
        let e = match w.as_str() {
            "neutral" | "normal" | "plain" => Emotion::Neutral,
            "happy" | "joy" | "joyful" | "glad" | "smile" | "smiles" | "smiling" | "laugh" | "laughs" | "laughing"
            | "excited" | "cheerful" | "delighted" => Emotion::Happy,
            "sad" | "sadness" | "unhappy" | "sorrow" | "cry" | "cries" | "crying" | "sigh" | "sighs" => Emotion::Sad,
            "angry" | "anger" | "mad" | "annoyed" | "furious" | "frustrated" => Emotion::Angry,
            "surprised" | "surprise" | "shocked" | "amazed" | "astonished" | "wow" | "gasp" | "gasps" => {
                Emotion::Surprised
            }
            "fearful" | "fear" | "afraid" | "scared" | "nervous" | "anxious" | "worried" => Emotion::Fearful,
            "disgusted" | "disgust" | "gross" | "eww" => Emotion::Disgusted,
            "thinking" | "think" | "thoughtful" | "pondering" | "curious" | "hmm" | "confused" => Emotion::Thinking,
            "relaxed" | "calm" | "content" | "peaceful" | "relieved" => Emotion::Relaxed,
            _ => return None,
        };
        Some(e)
    }
}

impl FromStr for Emotion {
    type Err = std::convert::Infallible;

    /// Known names match case-insensitively; anything else becomes [`Emotion::Other`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        Ok(Emotion::KNOWN.into_iter().find(|e| e.as_str() == lower).unwrap_or_else(|| Emotion::Other(s.to_owned())))
    }
}

impl fmt::Display for Emotion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Emotion {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl schemars::JsonSchema for Emotion {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Emotion".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // An open set: the documented names, or any other non-empty string.
        let known: Vec<&str> = Emotion::KNOWN.iter().map(Emotion::as_str).collect();
        schemars::json_schema!({
            "anyOf": [{ "type": "string", "enum": known }, { "type": "string", "minLength": 1 }]
        })
    }
}

impl<'de> Deserialize<'de> for Emotion {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        if name.is_empty() {
            return Err(D::Error::custom("emotion must not be empty"));
        }
        let Ok(emotion) = name.parse();
        Ok(emotion)
    }
}

/// A mouth shape: the 15 Oculus/Meta Lipsync visemes, serialised with exactly these names.
///
/// | index | name | sounds |
/// |---|---|---|
/// | 0 | `sil` | silence |
/// | 1 | `PP` | p, b, m |
/// | 2 | `FF` | f, v |
/// | 3 | `TH` | th |
/// | 4 | `DD` | t, d |
/// | 5 | `kk` | k, g |
/// | 6 | `CH` | ch, j, sh |
/// | 7 | `SS` | s, z |
/// | 8 | `nn` | n, l |
/// | 9 | `RR` | r |
/// | 10 | `aa` | a (father) |
/// | 11 | `E` | e (bed) |
/// | 12 | `ih` | i (tip) |
/// | 13 | `oh` | o (toe) |
/// | 14 | `ou` | u (book) |
///
/// The set is closed: an unknown name fails to deserialise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Viseme {
    /// Silence / neutral mouth.
    #[serde(rename = "sil")]
    Sil,
    /// p, b, m.
    #[serde(rename = "PP")]
    PP,
    /// f, v.
    #[serde(rename = "FF")]
    FF,
    /// th.
    #[serde(rename = "TH")]
    TH,
    /// t, d.
    #[serde(rename = "DD")]
    DD,
    /// k, g.
    #[serde(rename = "kk")]
    Kk,
    /// ch, j, sh.
    #[serde(rename = "CH")]
    CH,
    /// s, z.
    #[serde(rename = "SS")]
    SS,
    /// n, l.
    #[serde(rename = "nn")]
    Nn,
    /// r.
    #[serde(rename = "RR")]
    RR,
    /// a as in "father".
    #[serde(rename = "aa")]
    Aa,
    /// e as in "bed".
    #[serde(rename = "E")]
    E,
    /// i as in "tip".
    #[serde(rename = "ih")]
    Ih,
    /// o as in "toe".
    #[serde(rename = "oh")]
    Oh,
    /// u as in "book".
    #[serde(rename = "ou")]
    Ou,
}

impl Viseme {
    /// All 15 visemes in Oculus index order.
    pub const ALL: [Viseme; 15] = [
        Viseme::Sil,
        Viseme::PP,
        Viseme::FF,
        Viseme::TH,
        Viseme::DD,
        Viseme::Kk,
        Viseme::CH,
        Viseme::SS,
        Viseme::Nn,
        Viseme::RR,
        Viseme::Aa,
        Viseme::E,
        Viseme::Ih,
        Viseme::Oh,
        Viseme::Ou,
    ];

    /// The wire name (`sil`, `PP`, ..., `ou`).
    pub fn as_str(self) -> &'static str {
        match self {
            Viseme::Sil => "sil",
            Viseme::PP => "PP",
            Viseme::FF => "FF",
            Viseme::TH => "TH",
            Viseme::DD => "DD",
            Viseme::Kk => "kk",
            Viseme::CH => "CH",
            Viseme::SS => "SS",
            Viseme::Nn => "nn",
            Viseme::RR => "RR",
            Viseme::Aa => "aa",
            Viseme::E => "E",
            Viseme::Ih => "ih",
            Viseme::Oh => "oh",
            Viseme::Ou => "ou",
        }
    }

    /// The Oculus viseme index, 0 (`sil`) to 14 (`ou`).
    pub fn index(self) -> u8 {
        self as u8
    }
}

impl FromStr for Viseme {
    type Err = UnknownViseme;

    /// Exactly a wire name (`sil`, `PP`, ..., `ou`; case matters: `E` and `ih`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Viseme::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| UnknownViseme(s.to_owned()))
    }
}

/// A name that is none of the 15 visemes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a viseme (use sil, PP, FF, TH, DD, kk, CH, SS, nn, RR, aa, E, ih, oh or ou)")]
pub struct UnknownViseme(pub String);

impl fmt::Display for Viseme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emotion_words_normalise_to_the_documented_set() {
        assert_eq!(Emotion::normalize("Laughs"), Some(Emotion::Happy));
        assert_eq!(Emotion::normalize("*sighs*"), Some(Emotion::Sad));
        assert_eq!(Emotion::normalize("hmm"), Some(Emotion::Thinking));
        assert_eq!(Emotion::normalize("scared"), Some(Emotion::Fearful));
        assert_eq!(Emotion::normalize("table"), None);
        for e in Emotion::KNOWN {
            assert_eq!(Emotion::normalize(e.as_str()), Some(e.clone()), "every documented name maps to itself");
        }
    }

    #[test]
    fn viseme_names_and_indices_match_the_oculus_table() {
        let names: Vec<&str> = Viseme::ALL.iter().map(|v| v.as_str()).collect();
        assert_eq!(names, ["sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "nn", "RR", "aa", "E", "ih", "oh", "ou"]);
        for (i, v) in Viseme::ALL.iter().enumerate() {
            assert_eq!(usize::from(v.index()), i, "index of {v}");
            let json = serde_json::to_string(v).expect("a unit variant serialises");
            assert_eq!(json, format!("\"{}\"", v.as_str()), "serde name of {v:?}");
        }
    }

    #[test]
    fn emotion_keeps_unknown_names_and_normalises_known_ones() {
        assert_eq!("HAPPY".parse::<Emotion>(), Ok(Emotion::Happy));
        assert_eq!("excited".parse::<Emotion>(), Ok(Emotion::Other("excited".into())));
        let e: Emotion = serde_json::from_str("\"Sad\"").expect("a string is an emotion");
        assert_eq!(e, Emotion::Sad);
        assert!(serde_json::from_str::<Emotion>("\"\"").is_err(), "empty emotion must be rejected");
    }

    #[test]
    fn client_types_list_matches_the_enum() {
        for kind in ClientEvent::TYPES {
            let json = match *kind {
                "text" => r#"{"type":"text","text":"x"}"#.to_owned(),
                "tool.output" => r#"{"type":"tool.output","call_id":"c","output":"x"}"#.to_owned(),
                "image" => r#"{"type":"image","data":"data:image/png;base64,AA=="}"#.to_owned(),
                other => format!(r#"{{"type":"{other}"}}"#),
            };
            let event = parse_client_message(json.as_bytes())
                .unwrap_or_else(|e| panic!("{kind} should parse: {e}"))
                .unwrap_or_else(|| panic!("{kind} should be known"));
            assert_eq!(event.type_name(), *kind);
        }
    }
}
