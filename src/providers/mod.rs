//! Realtime model sessions behind one trait.
//!
//! A provider turns the user's audio (and typed text) into the character's speech. Every provider,
//! whether a speech-to-speech WebSocket API or a local cascade, is driven the same way: the session
//! task sends [`ProviderCommand`]s and receives [`ProviderEvent`]s over two bounded channels. What a
//! provider can do (server-side turn detection, truncation, transcripts, tools, a maximum session
//! length) is declared in [`Capabilities`], so the session task decides, for example, whether our
//! own VAD commits the user's turn.
//!
//! Provider sessions are fallible and may end at any time; the session task treats
//! [`ProviderEvent::Closed`] and a closed event channel alike.

pub mod cascade;
pub mod gemini;
pub mod nova_sonic;
pub mod openai;
pub mod resilient;
pub mod scripted;
pub mod table;
pub mod tools;
pub mod voices;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::mpsc;

/// Capacity of the command channel into a provider session. Audio is sent every 20 ms; when the
/// provider falls behind by more than this many commands, the session task drops uplink audio and
/// counts it (it never blocks the media path).
pub const COMMAND_CHANNEL_CAPACITY: usize = 64;
/// Capacity of the event channel out of a provider session. A provider that produces audio faster
/// than real time is held back here: the session task only reads events while playout has room.
pub const EVENT_CHANNEL_CAPACITY: usize = 32;

pub use media::Pcm;

/// The audio format a provider takes as input ([`RealtimeProvider::input_format`]) or sends
/// its replies in ([`RealtimeProvider::output_format`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AudioFormat {
    /// Samples per second, mono s16.
    pub rate_hz: u32,
}

/// What a provider can do; the session task adapts to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// The provider detects the end of the user's turn itself. When false, our VAD commits turns
    /// with [`ProviderCommand::CommitTurn`].
    pub server_vad: bool,
    /// The provider can truncate the agent's last item to what the user heard.
    pub truncation: bool,
    /// The provider transcribes the user's speech.
    pub user_transcripts: bool,
    /// The provider can call tools.
    pub tools: bool,
    /// The provider takes images (camera or screen frames) with the audio.
    pub images: bool,
    /// The longest a provider session may last before it must be recycled (None: unbounded).
    pub max_session: Option<Duration>,
}

impl Capabilities {
    /// What a provider that leaves turn-taking to us declares (the local cascade, the test fakes):
    /// our VAD commits turns (no server VAD); it truncates its context and transcribes the user;
    /// no tools, no images, no session limit.
    pub const fn local_turns() -> Self {
        Self {
            server_vad: false,
            truncation: true,
            user_transcripts: true,
            tools: false,
            images: false,
            max_session: None,
        }
    }
}

/// The configuration a provider session starts with.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// The kotodama session id (for logs and provider-side tracing).
    pub session_id: String,
    /// The character's id.
    pub character_id: String,
    /// The character's display name.
    pub character_name: String,
    /// System instructions (persona).
    pub instructions: String,
    /// The voice to speak with.
    pub voice: String,
    /// Voices per provider name, chosen by the character (see [`SessionConfig::voice_for`]).
    pub voices: std::collections::HashMap<String, String>,
    /// Language tag, e.g. `en-US`.
    pub language: String,
    /// The conversation so far, replayed into a fresh provider session (reconnect, recycling,
    /// failover). Agent turns hold what the user heard, never more.
    pub history: Vec<HistoryItem>,
    /// The session's conversation history as the session core records it (read-only): the
    /// resilience layer ([`resilient`]) replays it into every provider session it opens after the
    /// first. Providers themselves read [`SessionConfig::history`]. Default: no session core (an
    /// empty history that never changes).
    pub session_history: HistoryView,
    /// The tools the model may call.
    pub tools: Arc<tools::ToolRegistry>,
    /// The character's phoneme -> viseme overrides (providers that know phonemes use them).
    pub viseme_overrides: std::collections::HashMap<String, signaling::events::Viseme>,
    /// Moderation before speech: providers that produce text before speech (the cascade)
    /// check each sentence before synthesizing it; `None`: no checks.
    pub moderator: Option<Arc<crate::moderation::Moderator>>,
}

impl SessionConfig {
    /// The character's voice for provider `name`: its per-provider choice, else `voice`.
    pub fn voice_for(&self, name: &str) -> &str {
        self.voices.get(name).map_or(self.voice.as_str(), String::as_str)
    }
}

/// A past turn, replayed into a fresh provider session as context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryItem {
    /// What the user said.
    User(String),
    /// What the agent said, as heard.
    Agent(String),
}

impl HistoryItem {
    /// `text` as said by `role`.
    pub fn said(role: signaling::events::Role, text: String) -> Self {
        match role {
            signaling::events::Role::User => HistoryItem::User(text),
            signaling::events::Role::Agent => HistoryItem::Agent(text),
        }
    }

    /// The turn's text.
    pub fn text(&self) -> &str {
        match self {
            HistoryItem::User(t) | HistoryItem::Agent(t) => t,
        }
    }
}

/// History items kept for replay (older turns are dropped, not summarised).
pub const MAX_HISTORY_ITEMS: usize = 40;
/// Characters of history kept for replay.
pub const MAX_HISTORY_CHARS: usize = 16_000;

/// One turn kept in a [`History`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Its place in the session: 1 for the first turn ever kept, counting turns since dropped.
    pub seq: u64,
    /// The provider item it came from (an agent reply, a transcribed user turn); `None` for turns
    /// from elsewhere (typed text, an agent result).
    pub item_id: Option<String>,
    /// The turn.
    pub item: HistoryItem,
}

/// The conversation so far, bounded to the most recent [`MAX_HISTORY_ITEMS`] items and
/// [`MAX_HISTORY_CHARS`] characters. Empty turns are not kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    entries: std::collections::VecDeque<HistoryEntry>,
    chars: usize,
    /// Turns kept so far (the last one's `seq`).
    pushed: u64,
}

impl History {
    /// A history holding `items` (bounded like every push).
    pub fn from_items(items: impl IntoIterator<Item = HistoryItem>) -> Self {
        let mut h = Self::default();
        for i in items {
            h.push(i);
        }
        h
    }

    /// Append a turn, dropping the oldest beyond the bounds. False when it was empty (not kept).
    pub fn push(&mut self, item: HistoryItem) -> bool {
        self.push_from(item, None)
    }

    /// Append a turn that came from provider item `item_id` (see [`HistoryEntry::item_id`]).
    pub fn push_from(&mut self, item: HistoryItem, item_id: Option<&str>) -> bool {
        if item.text().trim().is_empty() {
            return false;
        }
        self.chars += item.text().len();
        self.pushed += 1;
        self.entries.push_back(HistoryEntry { seq: self.pushed, item_id: item_id.map(str::to_owned), item });
        while self.entries.len() > MAX_HISTORY_ITEMS || self.chars > MAX_HISTORY_CHARS {
            match self.entries.pop_front() {
                Some(old) => self.chars -= old.item.text().len(),
                None => break,
            }
        }
        true
    }

    /// The turns, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &HistoryItem> {
        self.entries.iter().map(|e| &e.item)
    }

    /// The kept turns pushed after turn `seq`, oldest first.
    pub fn since(&self, seq: u64) -> impl Iterator<Item = &HistoryEntry> {
        self.entries.iter().filter(move |e| e.seq > seq)
    }

    /// The `seq` of the last turn pushed (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.pushed
    }

    /// A copy for a provider session's [`SessionConfig::history`].
    pub fn to_vec(&self) -> Vec<HistoryItem> {
        self.iter().cloned().collect()
    }
}

/// The session's conversation history with its one writer, the session core
/// ([`crate::session::conversation`]): it records each turn as the user heard it. The layers below
/// read it through [`HistoryView`]s instead of keeping copies of their own. Recording is a
/// synchronous update (no await, no IO).
#[derive(Debug)]
pub struct SharedHistory(tokio::sync::watch::Sender<History>);

impl Default for SharedHistory {
    fn default() -> Self {
        Self(tokio::sync::watch::channel(History::default()).0)
    }
}

impl SharedHistory {
    /// Record a turn (from provider item `item_id`, if any); readers are woken. False when it was
    /// empty (not kept).
    pub fn push(&self, item: HistoryItem, item_id: Option<&str>) -> bool {
        self.0.send_if_modified(|h| h.push_from(item, item_id))
    }

    /// A read-only view for the layers below.
    pub fn view(&self) -> HistoryView {
        HistoryView(Some(self.0.subscribe()))
    }

    /// The turns, oldest first.
    pub fn to_vec(&self) -> Vec<HistoryItem> {
        self.0.borrow().to_vec()
    }
}

/// A read-only view of a session's [`SharedHistory`] (cheap to clone). The default view has no
/// writer: an empty history that never changes.
#[derive(Debug, Clone, Default)]
pub struct HistoryView(Option<tokio::sync::watch::Receiver<History>>);

impl HistoryView {
    /// Read the history as it is now (do not hold this across an await).
    pub fn read<R>(&self, f: impl FnOnce(&History) -> R) -> R {
        match &self.0 {
            Some(rx) => f(&rx.borrow()),
            None => f(&History::default()),
        }
    }

    /// Wait until the writer records a turn the view has not been woken for; never returns once
    /// the writer is gone (or for the default view).
    pub async fn changed(&mut self) {
        let open = match &mut self.0 {
            Some(rx) => rx.changed().await.is_ok(),
            None => false,
        };
        if !open {
            std::future::pending::<()>().await;
        }
    }
}

/// Whether a final user transcript is the provider's echo of a typed message (one rule for every
/// layer: compared trimmed).
pub fn is_echo(typed: &str, transcript: &str) -> bool {
    typed.trim() == transcript.trim()
}

/// Commands from the session task to a provider session.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ProviderCommand {
    /// User audio at the provider's input rate.
    AppendAudio(Pcm),
    /// The session's VAD (the one voice detector of the tree, `media::Vad`) heard the user start
    /// speaking; its end is [`ProviderCommand::CommitTurn`]. Layers that need to know whether the
    /// user is talking (recycling at a quiet boundary, starting a speech-to-text stream) use these
    /// edges; providers with their own turn detection may ignore them.
    SpeechStarted,
    /// Our VAD decided the user's turn ended: answer it.
    CommitTurn,
    /// A typed user message: answer it.
    Text(String),
    /// Speak now without user input (a greeting), with optional per-reply instructions.
    GenerateReply {
        /// Instructions for this reply only.
        instructions: Option<String>,
    },
    /// Stop generating the current response (barge-in or the client's `interrupt`).
    Cancel,
    /// Cut the agent item to what the user heard, so the model's context holds only that.
    Truncate {
        /// The agent item that was cut.
        item_id: String,
        /// Milliseconds of that item's audio the user actually received.
        audio_end: Duration,
        /// The words of that item the user heard (released with the frames played), as the
        /// session recorded them: layers that keep text context use this, never re-derive it
        /// (as LiveKit's `truncate(..., audio_transcript)`).
        heard: String,
    },
    /// A screen or camera frame for a provider that takes images ([`Capabilities::images`];
    /// checked and rate-limited by the session, [`crate::image`]). Others ignore it.
    Image(crate::image::ImageFrame),
    /// Add turns to the model's context without answering (used when a pre-opened session takes
    /// over and turns happened after its history was taken).
    AppendHistory(Vec<HistoryItem>),
    /// The session found the provider session unresponsive (a provider deadline passed with
    /// nothing heard from it, issue 12 kind 7): replace it (reconnect, or fail over to the next
    /// provider). Carried out by the resilience layer ([`resilient`]); a provider session ignores it.
    Restart,
    /// Change the running model session (the client's `session.update`): see [`SessionUpdate`].
    /// A provider that cannot apply a part answers [`ProviderEvent::Error`] with code
    /// [`SESSION_UPDATE_UNSUPPORTED`] and keeps running as it was.
    UpdateSession(SessionUpdate),
    /// The client's result of a [`ProviderEvent::ToolCall`]: handed to the model as the call's
    /// output; the model continues once every call of its response is answered.
    ToolOutput {
        /// The call's id.
        call_id: String,
        /// The result as text.
        output: String,
    },
    /// End the provider session.
    Close,
}

/// A change to a running model session; `None` leaves that part as it is.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionUpdate {
    /// Instructions added to the character's persona for the rest of the session.
    pub instructions: Option<String>,
    /// The provider's voice name; only before the character first spoke (OpenAI Realtime refuses
    /// a voice change once the session produced audio).
    pub voice: Option<String>,
    /// The tools the client declared (replacing its earlier ones; the character's own tools stay).
    /// Their calls are [`ProviderEvent::ToolCall`]s, answered by [`ProviderCommand::ToolOutput`].
    pub tools: Option<Vec<tools::ToolSpec>>,
}

impl SessionUpdate {
    /// A later update on top of this one (what a fresh provider session must be given).
    pub fn merge(&mut self, later: SessionUpdate) {
        if later.instructions.is_some() {
            self.instructions = later.instructions;
        }
        if later.voice.is_some() {
            self.voice = later.voice;
        }
        if later.tools.is_some() {
            self.tools = later.tools;
        }
    }

    /// Whether it changes nothing.
    pub fn is_empty(&self) -> bool {
        self.instructions.is_none() && self.voice.is_none() && self.tools.is_none()
    }
}

/// [`ProviderEvent::Error`] code of a [`ProviderCommand::UpdateSession`] the provider cannot apply.
pub const SESSION_UPDATE_UNSUPPORTED: &str = "session_update_unsupported";

/// The error a provider without mid-session changes answers an update with (`provider`: its name).
pub fn session_update_unsupported(provider: &str, update: &SessionUpdate) -> ProviderEvent {
    let mut parts = Vec::new();
    if update.instructions.is_some() {
        parts.push("instructions");
    }
    if update.voice.is_some() {
        parts.push("voice");
    }
    if update.tools.is_some() {
        parts.push("tools");
    }
    ProviderEvent::Error {
        code: SESSION_UPDATE_UNSUPPORTED.into(),
        message: format!(
            "the `{provider}` provider cannot change {} of a running session; they stay as the call started",
            parts.join(", ")
        ),
        retryable: false,
    }
}

/// Who said something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Speaker {
    /// The human.
    User,
    /// The character.
    Agent,
}

/// Events from a provider session to the session task.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ProviderEvent {
    /// The provider session is ready for audio.
    Ready,
    /// A chunk of the agent's speech for `item_id`.
    AudioDelta {
        /// The agent item (one reply) this audio belongs to.
        item_id: String,
        /// The audio, at whatever rate the provider produces.
        pcm: Pcm,
    },
    /// The agent item's audio is complete.
    AudioDone {
        /// The finished item.
        item_id: String,
    },
    /// Transcript text (cumulative for partials).
    Transcript {
        /// Whose words.
        speaker: Speaker,
        /// The item the text belongs to.
        item_id: String,
        /// Cumulative text so far, or the final text.
        text: String,
        /// Whether this is the one final transcript of the utterance.
        is_final: bool,
    },
    /// The character's emotion changed.
    Emotion {
        /// The item it belongs to, if any.
        item_id: Option<String>,
        /// An emotion name from the documented set.
        emotion: String,
    },
    /// A mouth shape with its position in the item's audio (from TTS phoneme timings). Providers
    /// without timings send none; the session estimates visemes from the audio instead.
    Viseme {
        /// The agent item.
        item_id: String,
        /// The viseme.
        viseme: signaling::events::Viseme,
        /// Offset in the item's audio.
        start: Duration,
        /// How long the shape holds.
        duration: Duration,
    },
    /// The character makes a gesture (structured output), at the current point of its speech.
    Gesture {
        /// The agent item.
        item_id: String,
        /// The gesture's name.
        gesture: String,
    },
    /// The provider's own VAD heard the user start speaking (barge-in when we have not already).
    UserSpeechStarted,
    /// The provider's response for `item_id` is complete (audio and text).
    ResponseDone {
        /// The finished item.
        item_id: String,
    },
    /// Something went wrong; `retryable` says whether reconnecting may help.
    Error {
        /// Short machine-readable code.
        code: String,
        /// Human-readable message.
        message: String,
        /// Whether a reconnect may help.
        retryable: bool,
    },
    /// Something the client should know that is not a failure of its request: the provider
    /// session was reconnected, recycled or failed over (codes `provider_reconnecting`,
    /// `provider_reconnected`, `provider_recycled`, `provider_failover`).
    Notice {
        /// Short machine-readable code.
        code: String,
        /// Human-readable message.
        message: String,
    },
    /// Moderation flagged text. `replaced`: the provider dropped it itself and says the fallback
    /// line instead (the cascade: agent text before TTS, user text before the LLM); else a check
    /// after the provider flagged it ([`crate::moderation::guard`]: the moderation endpoint on a
    /// speech-to-speech session) and the session cuts the reply and has the fallback said.
    Moderated {
        /// The reply item (agent), or the user's item (`""`: typed text).
        item_id: String,
        /// The category that matched.
        category: String,
        /// The denied text (for the review queue only).
        text: String,
        /// The policy's version.
        policy_version: String,
        /// Whose text it was.
        source: crate::moderation::Source,
        /// Whether the provider already replaced it with the fallback line.
        replaced: bool,
    },
    /// The provider reported the model tokens one response used (input + output, as the
    /// provider counts them: OpenAI Realtime `response.done.usage.total_tokens`); budgets count
    /// these instead of their text estimate ([`crate::session::budget`]).
    Usage {
        /// Tokens used by that response.
        tokens: u64,
    },
    /// The model called a tool the client declared ([`SessionUpdate::tools`]): the client runs it
    /// and answers with [`ProviderCommand::ToolOutput`].
    ToolCall {
        /// The call's id.
        call_id: String,
        /// The tool's name.
        name: String,
        /// The arguments, JSON text as the model wrote it.
        arguments: String,
    },
    /// The provider session ended.
    Closed,
}

/// The two ends of a live provider session.
pub struct ProviderSession {
    /// Commands into the provider.
    pub commands: mpsc::Sender<ProviderCommand>,
    /// Events out of the provider.
    pub events: mpsc::Receiver<ProviderEvent>,
}

/// Why a provider session could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProviderError {
    /// The provider is misconfigured (missing key, bad URL): not retryable.
    #[error("provider configuration: {0}")]
    Config(String),
    /// The provider could not be reached or failed: retryable.
    #[error("provider unavailable: {0}")]
    Unavailable(String),
}

impl ProviderError {
    /// Whether trying again later may succeed.
    pub fn retryable(&self) -> bool {
        matches!(self, ProviderError::Unavailable(_))
    }
}

/// A realtime speech model: makes provider sessions.
pub trait RealtimeProvider: Send + Sync {
    /// The provider's name as used in the API (`scripted`, `openai`, ...).
    fn name(&self) -> &str;
    /// Whether the provider checks text with [`SessionConfig::moderator`] itself, the moderation
    /// endpoint included (the cascade: before TTS and before the LLM). When false and the policy
    /// has an endpoint, the session puts [`crate::moderation::guard`] around the provider.
    fn moderates_text(&self) -> bool {
        false
    }
    /// What this provider can do.
    fn capabilities(&self) -> Capabilities;
    /// The input audio format it expects.
    fn input_format(&self) -> AudioFormat;
    /// The format of its reply audio ([`ProviderEvent::AudioDelta`]) when it is fixed and known;
    /// the session encodes the downlink at this rate when libopus can (no resampler). Default
    /// 48 kHz: unknown, encode at 48 kHz. Audio at any other rate still plays (resampled).
    fn output_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: media::OPUS_RATE }
    }
    /// Open a provider session.
    fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>>;
}
