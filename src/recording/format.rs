//! The event log of a recording (`events.jsonl`): one JSON object per line, in the order the
//! session task fed and drained the conversation core ([`crate::session::conversation`]).
//!
//! ```text
//! {"kind":"header","format":1,"session_id":"sess_..","media":{..},..}    first line: how the core was built
//! {"kind":"in","t_ns":20113,"input":{"type":"client_opus","seq":..,"payload":"<base64>"}}
//! {"kind":"out","t_ns":20113,"output":{"type":"event","event":{"type":"user.speech_started","at_ms":..}}}
//! {"kind":"end","t_ns":9120331,"reason":"client_request","complete":true}   last line
//! ```
//!
//! `t_ns` is the media time (nanoseconds since the session task started) at which the input was
//! fed; an output carries the time of the input that produced it. Inputs are everything the core
//! reacts to, with every field it reads (client Opus packets, client events, provider events with
//! their PCM, refusals, timeouts), so feeding them again at the same instants reproduces every
//! decision ([`crate::replay`]). Outputs are recorded for comparison only; audio frames sent to the
//! client are listed without their payload (it is in `agent.opus`).
//!
//! Why the `Rec*` types mirror the core's types instead of deriving serde on them: this is a file
//! format with a version ([`FORMAT_VERSION`]); a recording must read back after the in-memory
//! types change (a renamed field, a new variant), and its shape differs where a file needs it to
//! (durations as integer ns/ms, PCM as base64, user audio summarised, `Speaker` as api-v1's
//! `Role`). The mirrors and their `From` conversions are the format's one definition.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use signaling::events::{AgentState, ClientEvent, Role, ServerEvent};

use crate::providers::tools::ToolSpec;
use crate::providers::{Capabilities, HistoryItem, Pcm, ProviderCommand, ProviderEvent, SessionUpdate, Speaker};
use crate::session::conversation::{AgentResult, Input, Output};
use crate::session::link::ClientVoice;

/// Version of this format (the header's `format`); a replay refuses other versions.
pub const FORMAT_VERSION: u32 = 1;
/// The event log's object name inside a recording.
pub const EVENTS_FILE: &str = "events.jsonl";
/// The user's audio (Ogg Opus, RFC 7845), on the session's media timeline.
pub const USER_AUDIO_FILE: &str = "user.opus";
/// The character's audio as sent to the client (Ogg Opus), on the session's media timeline.
pub const AGENT_AUDIO_FILE: &str = "agent.opus";
/// Every file of a recording.
pub const FILES: [&str; 3] = [EVENTS_FILE, USER_AUDIO_FILE, AGENT_AUDIO_FILE];

/// One line of the event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Line {
    /// First line: what the core was built from (boxed: it is far larger than the other lines).
    Header(Box<Header>),
    /// An input fed at `t_ns`.
    In {
        /// Media time, nanoseconds.
        t_ns: u64,
        /// The input.
        input: RecInput,
    },
    /// An output drained after the input at `t_ns`.
    Out {
        /// Media time of the input that produced it, nanoseconds.
        t_ns: u64,
        /// The output.
        output: RecOutput,
    },
    /// Last line: the session ended.
    End {
        /// Media time, nanoseconds.
        t_ns: u64,
        /// The session's end reason (api-v1 `session.ended` `reason`).
        reason: String,
        /// False when lines were lost (the writer fell behind) or the size limit cut the recording:
        /// such a recording does not replay exactly.
        complete: bool,
    },
}

/// How the session's core was built: enough to build the same core again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    /// [`FORMAT_VERSION`].
    pub format: u32,
    /// Session id.
    pub session_id: String,
    /// Character id.
    pub character: String,
    /// Provider name.
    pub provider: String,
    /// When the session task started (RFC 3339, UTC); informational, never replayed.
    pub started_at: String,
    /// What the provider could do.
    pub caps: CapsSpec,
    /// The character's greeting instructions.
    pub greeting: Option<String>,
    /// Idle timeout, ms (`None`: never).
    pub idle_timeout_ms: Option<u64>,
    /// The media parts' settings.
    pub media: MediaSpec,
    /// The moderation policy checked before speech (`None`: none).
    pub moderation: Option<crate::config::ModerationSettings>,
}

/// [`Capabilities`], serialisable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsSpec {
    /// See [`Capabilities::server_vad`].
    pub server_vad: bool,
    /// See [`Capabilities::truncation`].
    pub truncation: bool,
    /// See [`Capabilities::user_transcripts`].
    pub user_transcripts: bool,
    /// See [`Capabilities::tools`].
    pub tools: bool,
    /// See [`Capabilities::images`].
    pub images: bool,
    /// See [`Capabilities::max_session`], ms.
    pub max_session_ms: Option<u64>,
}

impl From<Capabilities> for CapsSpec {
    fn from(c: Capabilities) -> Self {
        Self {
            server_vad: c.server_vad,
            truncation: c.truncation,
            user_transcripts: c.user_transcripts,
            tools: c.tools,
            images: c.images,
            max_session_ms: c.max_session.map(ms),
        }
    }
}

impl From<CapsSpec> for Capabilities {
    fn from(c: CapsSpec) -> Self {
        Self {
            server_vad: c.server_vad,
            truncation: c.truncation,
            user_transcripts: c.user_transcripts,
            tools: c.tools,
            images: c.images,
            max_session: c.max_session_ms.map(Duration::from_millis),
        }
    }
}

/// The settings the session builder gives the media parts (uplink, VAD, playout, encoder, timed
/// speech): the live session and a replay build them from this one description
/// ([`MediaSpec::parts`]), so they cannot drift apart.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MediaSpec {
    /// The provider's input rate, Hz (the uplink resamples to it).
    pub input_rate_hz: u32,
    /// The negotiated Opus payload type (`None`: every packet is Opus, e.g. a WebSocket).
    pub opus_payload_type: Option<u8>,
    /// libfvad mode 0..=3 (`media.vad_mode`).
    pub vad_mode: u8,
    /// Voiced audio before a speech start, ms (`media.min_speech_ms`).
    pub vad_min_speech_ms: u64,
    /// Unvoiced audio before a speech stop, ms (`media.min_silence_ms`).
    pub vad_min_silence_ms: u64,
    /// Frames quieter than this count as unvoiced, dBFS.
    pub vad_energy_floor_dbfs: f32,
    /// Opus encoder bitrate, bit/s.
    pub opus_bitrate_bps: u32,
    /// Opus encoder complexity 0..=10.
    pub opus_complexity: u8,
    /// Playout jitter tolerance, ms.
    pub jitter_tolerance_ms: u64,
    /// Visemes estimated from the audio when the provider sends none.
    pub estimate_visemes: bool,
    /// Each talk spurt ends with Opus DTX frames (`media::PlayoutConfig::dtx`); absent in
    /// recordings made before DTX (false).
    #[serde(default)]
    pub dtx: bool,
    /// The uplink decodes at the provider's input rate when libopus can
    /// (`media::UplinkConfig::decode_at_output_rate`); absent in recordings made before it
    /// (false: decoded at 48 kHz and resampled, as they were recorded).
    #[serde(default)]
    pub decode_at_input_rate: bool,
    /// The Opus encoder's input rate, Hz (`media::EncoderConfig::input_rate_hz`): the provider's
    /// output rate when libopus encodes it, so its audio is not resampled. Absent in recordings
    /// made before it: 48000, what they were encoded at.
    #[serde(default = "encoder_input_rate_default")]
    pub encoder_input_rate_hz: u32,
}

fn encoder_input_rate_default() -> u32 {
    media::OPUS_RATE
}

impl MediaSpec {
    /// The VAD settings.
    pub fn vad(&self) -> media::VadConfig {
        media::VadConfig {
            mode: match self.vad_mode {
                0 => media::VadMode::Quality,
                1 => media::VadMode::LowBitrate,
                2 => media::VadMode::Aggressive,
                _ => media::VadMode::VeryAggressive,
            },
            min_speech: Duration::from_millis(self.vad_min_speech_ms),
            min_silence: Duration::from_millis(self.vad_min_silence_ms),
            energy_floor_dbfs: self.vad_energy_floor_dbfs,
        }
    }

    /// Fresh media parts. Errors: a setting the media layer refuses.
    pub fn parts(&self) -> Result<crate::session::conversation::MediaParts, media::MediaError> {
        let uplink = media::Uplink::new(media::UplinkConfig {
            output_rate_hz: self.input_rate_hz,
            vad: self.vad(),
            opus_payload_type: self.opus_payload_type,
            decode_at_output_rate: self.decode_at_input_rate,
            ..Default::default()
        })?;
        let encoder = media::EncoderConfig {
            input_rate_hz: self.encoder_input_rate_hz,
            bitrate_bps: self.opus_bitrate_bps,
            complexity: self.opus_complexity,
            ..Default::default()
        };
        let playout = media::Playout::new(media::PlayoutConfig {
            encoder,
            jitter_tolerance: Duration::from_millis(self.jitter_tolerance_ms),
            dtx: self.dtx,
            ..Default::default()
        })?;
        Ok(crate::session::conversation::MediaParts {
            uplink,
            playout,
            barge_in: media::BargeIn::default(),
            speech: crate::session::speech::AgentSpeech::new(self.estimate_visemes),
        })
    }
}

/// An [`Input`] of the core, with every field it reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RecInput {
    /// [`Input::ClientOpus`].
    ClientOpus {
        /// RTP sequence number.
        seq: u16,
        /// RTP timestamp (48 kHz).
        timestamp: u32,
        /// RTP payload type.
        payload_type: u8,
        /// RTP SSRC.
        ssrc: u32,
        /// The Opus payload.
        #[serde(with = "b64")]
        payload: Vec<u8>,
    },
    /// [`Input::MediaConnected`].
    MediaConnected,
    /// [`Input::ClientConnected`].
    ClientConnected,
    /// [`Input::ClientDisconnected`].
    ClientDisconnected,
    /// [`Input::Client`] (`null`: a message the core does not act on).
    Client {
        /// The decoded event.
        event: Option<ClientEvent>,
    },
    /// [`Input::BadClientMessage`].
    BadClientMessage {
        /// api-v1 `error.code`.
        code: String,
        /// What was wrong.
        message: String,
    },
    /// [`Input::ClientVoice`]: `speech_started`, `speech_stopped` or `end_turn`.
    ClientVoice {
        /// The edge.
        voice: String,
    },
    /// [`Input::ClientPlayback`].
    ClientPlayback {
        /// The agent item playing.
        item_id: String,
        /// Milliseconds of it the client played.
        played_ms: u64,
    },
    /// [`Input::UserText`].
    UserText {
        /// The typed turn.
        text: String,
    },
    /// [`Input::AgentResult`].
    AgentResult {
        /// The result.
        text: String,
        /// Which agent.
        source: String,
        /// Its status.
        status: String,
        /// Speak it now.
        speak_now: bool,
    },
    /// [`Input::Provider`].
    Provider {
        /// The provider event.
        event: RecProviderEvent,
    },
    /// [`Input::Refused`]: the provider's queue refused this command.
    Refused {
        /// The refused command.
        command: RecCommand,
    },
    /// [`Input::Timeout`].
    Timeout,
}

/// A [`ProviderEvent`], serialisable (PCM as base64 of little-endian s16).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RecProviderEvent {
    /// [`ProviderEvent::Ready`].
    Ready,
    /// [`ProviderEvent::AudioDelta`].
    AudioDelta {
        /// Agent item.
        item_id: String,
        /// Sample rate, Hz.
        rate_hz: u32,
        /// Mono s16 samples.
        #[serde(with = "b64_pcm")]
        pcm: Vec<i16>,
    },
    /// [`ProviderEvent::AudioDone`].
    AudioDone {
        /// Agent item.
        item_id: String,
    },
    /// [`ProviderEvent::Transcript`].
    Transcript {
        /// `user` or `agent`.
        role: Role,
        /// Item.
        item_id: String,
        /// Text (cumulative for partials).
        text: String,
        /// Final.
        is_final: bool,
    },
    /// [`ProviderEvent::Emotion`].
    Emotion {
        /// Item, if any.
        item_id: Option<String>,
        /// Emotion name.
        emotion: String,
    },
    /// [`ProviderEvent::Viseme`].
    Viseme {
        /// Agent item.
        item_id: String,
        /// Viseme.
        viseme: signaling::events::Viseme,
        /// Offset in the item's audio, ns.
        start_ns: u64,
        /// Hold, ns.
        duration_ns: u64,
    },
    /// [`ProviderEvent::Gesture`].
    Gesture {
        /// Agent item.
        item_id: String,
        /// Gesture name.
        gesture: String,
    },
    /// [`ProviderEvent::UserSpeechStarted`].
    UserSpeechStarted,
    /// [`ProviderEvent::ResponseDone`].
    ResponseDone {
        /// Agent item.
        item_id: String,
    },
    /// [`ProviderEvent::Error`].
    Error {
        /// Code.
        code: String,
        /// Message.
        message: String,
        /// Retryable.
        retryable: bool,
    },
    /// [`ProviderEvent::Notice`].
    Notice {
        /// Code.
        code: String,
        /// Message.
        message: String,
    },
    /// [`ProviderEvent::Usage`].
    Usage {
        /// Tokens used by one response.
        tokens: u64,
    },
    /// [`ProviderEvent::Moderated`].
    Moderated {
        /// Item.
        item_id: String,
        /// Category.
        category: String,
        /// Denied text.
        text: String,
        /// Policy version.
        policy_version: String,
        /// Whose text (absent in older recordings: the agent's).
        #[serde(default)]
        source: crate::moderation::Source,
        /// Whether the provider replaced it (absent in older recordings: it did).
        #[serde(default = "replaced_default")]
        replaced: bool,
    },
    /// [`ProviderEvent::ToolCall`].
    ToolCall {
        /// Call id.
        call_id: String,
        /// Tool name.
        name: String,
        /// Arguments (JSON text).
        arguments: String,
    },
    /// [`ProviderEvent::Closed`].
    Closed,
}

/// A [`ProviderCommand`], serialisable; user audio is summarised (rate and sample count).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RecCommand {
    /// [`ProviderCommand::AppendAudio`], summarised.
    AppendAudio {
        /// Rate, Hz.
        rate_hz: u32,
        /// Samples.
        samples: usize,
    },
    /// [`ProviderCommand::SpeechStarted`].
    SpeechStarted,
    /// [`ProviderCommand::CommitTurn`].
    CommitTurn,
    /// [`ProviderCommand::Text`].
    Text {
        /// The typed turn.
        text: String,
    },
    /// [`ProviderCommand::GenerateReply`].
    GenerateReply {
        /// Per-reply instructions.
        instructions: Option<String>,
    },
    /// [`ProviderCommand::Cancel`].
    Cancel,
    /// [`ProviderCommand::Truncate`].
    Truncate {
        /// The cut item.
        item_id: String,
        /// Audio the user received, ms.
        audio_end_ms: u64,
        /// The words heard.
        heard: String,
    },
    /// [`ProviderCommand::AppendHistory`]: `(role, text)` pairs.
    AppendHistory {
        /// The turns.
        items: Vec<(Role, String)>,
    },
    /// [`ProviderCommand::Restart`].
    Restart,
    /// [`ProviderCommand::UpdateSession`].
    UpdateSession {
        /// Instructions.
        instructions: Option<String>,
        /// Voice.
        voice: Option<String>,
        /// The client's tools.
        tools: Option<Vec<signaling::events::ToolDeclaration>>,
    },
    /// [`ProviderCommand::ToolOutput`].
    ToolOutput {
        /// Call id.
        call_id: String,
        /// The client's result.
        output: String,
    },
    /// [`ProviderCommand::Close`].
    Close,
    /// [`ProviderCommand::Image`], summarised (the image itself is not recorded).
    Image {
        /// `image/jpeg` or `image/png`.
        mime_type: String,
        /// Length of its base64, bytes.
        base64_len: usize,
    },
}

/// An [`Output`] of the core (audio frames without their payload).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RecOutput {
    /// [`Output::Event`].
    Event {
        /// The event sent to the client.
        event: ServerEvent,
    },
    /// [`Output::State`].
    State {
        /// The new agent state.
        state: AgentState,
    },
    /// [`Output::Provider`].
    Provider {
        /// The command.
        command: RecCommand,
    },
    /// [`Output::Turn`].
    Turn {
        /// Who.
        role: Role,
        /// What (heard).
        text: String,
        /// Cut by barge-in.
        interrupted: bool,
    },
    /// [`Output::Flag`].
    Flag {
        /// Item.
        item_id: String,
        /// Category.
        category: String,
    },
    /// [`Output::Audio`]: one 20 ms frame.
    Audio {
        /// Agent item.
        item_id: String,
        /// Playout time, µs.
        due_us: u64,
        /// First frame of a talk spurt.
        talkspurt_start: bool,
        /// Encoded size, bytes.
        bytes: usize,
    },
    /// [`Output::End`].
    End {
        /// The end reason.
        reason: String,
    },
}

/// Microseconds of `d` (saturating).
pub fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Nanoseconds of `d` (saturating): media times are recorded exactly, so a replay feeds the core
/// the very instants it saw.
pub fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn replaced_default() -> bool {
    true
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RecInput {
    /// The recorded form of `input` (copies its payload).
    pub fn from_input(input: &Input) -> Self {
        match input {
            Input::ClientOpus { seq, timestamp, payload_type, ssrc, payload } => RecInput::ClientOpus {
                seq: *seq,
                timestamp: *timestamp,
                payload_type: *payload_type,
                ssrc: *ssrc,
                payload: payload.to_vec(),
            },
            Input::MediaConnected => RecInput::MediaConnected,
            Input::ClientConnected => RecInput::ClientConnected,
            Input::ClientDisconnected => RecInput::ClientDisconnected,
            Input::Client(event) => RecInput::Client { event: event.clone() },
            Input::BadClientMessage { code, message } => {
                RecInput::BadClientMessage { code: code.clone(), message: message.clone() }
            }
            Input::ClientVoice(v) => RecInput::ClientVoice {
                voice: match v {
                    ClientVoice::SpeechStarted => "speech_started",
                    ClientVoice::SpeechStopped => "speech_stopped",
                    ClientVoice::EndTurn => "end_turn",
                }
                .to_owned(),
            },
            Input::ClientPlayback { item_id, played } => {
                RecInput::ClientPlayback { item_id: item_id.clone(), played_ms: ms(*played) }
            }
            Input::UserText(text) => RecInput::UserText { text: text.clone() },
            Input::AgentResult(r) => RecInput::AgentResult {
                text: r.text.clone(),
                source: r.source.clone(),
                status: r.status.clone(),
                speak_now: r.speak_now,
            },
            Input::Provider(ev) => RecInput::Provider { event: RecProviderEvent::from_event(ev) },
            Input::Refused(cmd) => RecInput::Refused { command: RecCommand::from_command(cmd) },
            Input::Timeout => RecInput::Timeout,
        }
    }

    /// The input to feed again. Errors: a field this version cannot rebuild (an unknown voice edge,
    /// a summarised command).
    pub fn to_input(&self) -> Result<Input, String> {
        Ok(match self {
            RecInput::ClientOpus { seq, timestamp, payload_type, ssrc, payload } => Input::ClientOpus {
                seq: *seq,
                timestamp: *timestamp,
                payload_type: *payload_type,
                ssrc: *ssrc,
                payload: bytes::Bytes::copy_from_slice(payload),
            },
            RecInput::MediaConnected => Input::MediaConnected,
            RecInput::ClientConnected => Input::ClientConnected,
            RecInput::ClientDisconnected => Input::ClientDisconnected,
            RecInput::Client { event } => Input::Client(event.clone()),
            RecInput::BadClientMessage { code, message } => {
                Input::BadClientMessage { code: code.clone(), message: message.clone() }
            }
            RecInput::ClientVoice { voice } => Input::ClientVoice(match voice.as_str() {
                "speech_started" => ClientVoice::SpeechStarted,
                "speech_stopped" => ClientVoice::SpeechStopped,
                "end_turn" => ClientVoice::EndTurn,
                other => return Err(format!("unknown client voice edge `{other}`")),
            }),
            RecInput::ClientPlayback { item_id, played_ms } => {
                Input::ClientPlayback { item_id: item_id.clone(), played: Duration::from_millis(*played_ms) }
            }
            RecInput::UserText { text } => Input::UserText(text.clone()),
            RecInput::AgentResult { text, source, status, speak_now } => Input::AgentResult(AgentResult {
                text: text.clone(),
                source: source.clone(),
                status: status.clone(),
                speak_now: *speak_now,
            }),
            RecInput::Provider { event } => Input::Provider(event.to_event()),
            RecInput::Refused { command } => Input::Refused(command.to_command()?),
            RecInput::Timeout => Input::Timeout,
        })
    }
}

impl RecProviderEvent {
    /// The recorded form of `ev` (copies its PCM).
    pub fn from_event(ev: &ProviderEvent) -> Self {
        match ev {
            ProviderEvent::Ready => Self::Ready,
            ProviderEvent::AudioDelta { item_id, pcm } => {
                Self::AudioDelta { item_id: item_id.clone(), rate_hz: pcm.rate_hz, pcm: pcm.samples.clone() }
            }
            ProviderEvent::AudioDone { item_id } => Self::AudioDone { item_id: item_id.clone() },
            ProviderEvent::Transcript { speaker, item_id, text, is_final } => Self::Transcript {
                role: match speaker {
                    Speaker::User => Role::User,
                    Speaker::Agent => Role::Agent,
                },
                item_id: item_id.clone(),
                text: text.clone(),
                is_final: *is_final,
            },
            ProviderEvent::Emotion { item_id, emotion } => {
                Self::Emotion { item_id: item_id.clone(), emotion: emotion.clone() }
            }
            ProviderEvent::Viseme { item_id, viseme, start, duration } => Self::Viseme {
                item_id: item_id.clone(),
                viseme: *viseme,
                start_ns: ns(*start),
                duration_ns: ns(*duration),
            },
            ProviderEvent::Gesture { item_id, gesture } => {
                Self::Gesture { item_id: item_id.clone(), gesture: gesture.clone() }
            }
            ProviderEvent::UserSpeechStarted => Self::UserSpeechStarted,
            ProviderEvent::ResponseDone { item_id } => Self::ResponseDone { item_id: item_id.clone() },
            ProviderEvent::Error { code, message, retryable } => {
                Self::Error { code: code.clone(), message: message.clone(), retryable: *retryable }
            }
            ProviderEvent::Notice { code, message } => Self::Notice { code: code.clone(), message: message.clone() },
            ProviderEvent::Moderated { item_id, category, text, policy_version, source, replaced } => Self::Moderated {
                item_id: item_id.clone(),
                category: category.clone(),
                text: text.clone(),
                policy_version: policy_version.clone(),
                source: *source,
                replaced: *replaced,
            },
            ProviderEvent::Usage { tokens } => Self::Usage { tokens: *tokens },
            ProviderEvent::ToolCall { call_id, name, arguments } => {
                Self::ToolCall { call_id: call_id.clone(), name: name.clone(), arguments: arguments.clone() }
            }
            ProviderEvent::Closed => Self::Closed,
        }
    }

    /// The event to feed again.
    pub fn to_event(&self) -> ProviderEvent {
        match self.clone() {
            Self::Ready => ProviderEvent::Ready,
            Self::AudioDelta { item_id, rate_hz, pcm } => {
                ProviderEvent::AudioDelta { item_id, pcm: Pcm { rate_hz, samples: pcm } }
            }
            Self::AudioDone { item_id } => ProviderEvent::AudioDone { item_id },
            Self::Transcript { role, item_id, text, is_final } => ProviderEvent::Transcript {
                speaker: match role {
                    Role::User => Speaker::User,
                    Role::Agent => Speaker::Agent,
                },
                item_id,
                text,
                is_final,
            },
            Self::Emotion { item_id, emotion } => ProviderEvent::Emotion { item_id, emotion },
            Self::Viseme { item_id, viseme, start_ns, duration_ns } => ProviderEvent::Viseme {
                item_id,
                viseme,
                start: Duration::from_nanos(start_ns),
                duration: Duration::from_nanos(duration_ns),
            },
            Self::Gesture { item_id, gesture } => ProviderEvent::Gesture { item_id, gesture },
            Self::UserSpeechStarted => ProviderEvent::UserSpeechStarted,
            Self::Usage { tokens } => ProviderEvent::Usage { tokens },
            Self::ResponseDone { item_id } => ProviderEvent::ResponseDone { item_id },
            Self::Error { code, message, retryable } => ProviderEvent::Error { code, message, retryable },
            Self::Notice { code, message } => ProviderEvent::Notice { code, message },
            Self::Moderated { item_id, category, text, policy_version, source, replaced } => {
                ProviderEvent::Moderated { item_id, category, text, policy_version, source, replaced }
            }
            Self::ToolCall { call_id, name, arguments } => ProviderEvent::ToolCall { call_id, name, arguments },
            Self::Closed => ProviderEvent::Closed,
        }
    }
}

impl RecCommand {
    /// The recorded form of `cmd` (user audio summarised).
    pub fn from_command(cmd: &ProviderCommand) -> Self {
        match cmd {
            ProviderCommand::AppendAudio(pcm) => Self::AppendAudio { rate_hz: pcm.rate_hz, samples: pcm.samples.len() },
            ProviderCommand::SpeechStarted => Self::SpeechStarted,
            ProviderCommand::CommitTurn => Self::CommitTurn,
            ProviderCommand::Text(text) => Self::Text { text: text.clone() },
            ProviderCommand::GenerateReply { instructions } => {
                Self::GenerateReply { instructions: instructions.clone() }
            }
            ProviderCommand::Cancel => Self::Cancel,
            ProviderCommand::Truncate { item_id, audio_end, heard } => {
                Self::Truncate { item_id: item_id.clone(), audio_end_ms: ms(*audio_end), heard: heard.clone() }
            }
            ProviderCommand::AppendHistory(items) => Self::AppendHistory {
                items: items
                    .iter()
                    .map(|i| match i {
                        HistoryItem::User(t) => (Role::User, t.clone()),
                        HistoryItem::Agent(t) => (Role::Agent, t.clone()),
                    })
                    .collect(),
            },
            ProviderCommand::Restart => Self::Restart,
            ProviderCommand::Image(i) => Self::Image { mime_type: i.mime_type.to_owned(), base64_len: i.base64.len() },
            ProviderCommand::UpdateSession(u) => Self::UpdateSession {
                instructions: u.instructions.clone(),
                voice: u.voice.clone(),
                tools: u.tools.as_ref().map(|t| t.iter().map(ToolSpec::declaration).collect()),
            },
            ProviderCommand::ToolOutput { call_id, output } => {
                Self::ToolOutput { call_id: call_id.clone(), output: output.clone() }
            }
            ProviderCommand::Close => Self::Close,
        }
    }

    /// The command again. Errors: user audio (recorded as a summary only; the core never needs a
    /// refused audio command back: the task drops it).
    pub fn to_command(&self) -> Result<ProviderCommand, String> {
        Ok(match self.clone() {
            Self::AppendAudio { .. } => return Err("a refused append_audio cannot be replayed".into()),
            Self::Image { .. } => return Err("a refused image cannot be replayed".into()),
            Self::SpeechStarted => ProviderCommand::SpeechStarted,
            Self::CommitTurn => ProviderCommand::CommitTurn,
            Self::Text { text } => ProviderCommand::Text(text),
            Self::GenerateReply { instructions } => ProviderCommand::GenerateReply { instructions },
            Self::Cancel => ProviderCommand::Cancel,
            Self::Truncate { item_id, audio_end_ms, heard } => {
                ProviderCommand::Truncate { item_id, audio_end: Duration::from_millis(audio_end_ms), heard }
            }
            Self::AppendHistory { items } => {
                ProviderCommand::AppendHistory(items.into_iter().map(|(role, t)| HistoryItem::said(role, t)).collect())
            }
            Self::Restart => ProviderCommand::Restart,
            Self::UpdateSession { instructions, voice, tools } => ProviderCommand::UpdateSession(SessionUpdate {
                instructions,
                voice,
                tools: tools.map(|t| t.into_iter().map(ToolSpec::from).collect()),
            }),
            Self::ToolOutput { call_id, output } => ProviderCommand::ToolOutput { call_id, output },
            Self::Close => ProviderCommand::Close,
        })
    }
}

impl RecOutput {
    /// The recorded form of `out` (an audio frame without its payload).
    pub fn from_output(out: &Output<'_>) -> Self {
        match out {
            Output::Event(event) => Self::Event { event: event.clone() },
            Output::State(state) => Self::State { state: *state },
            Output::Provider(cmd) => Self::Provider { command: RecCommand::from_command(cmd) },
            Output::Turn { role, text, interrupted } => {
                Self::Turn { role: *role, text: text.clone(), interrupted: *interrupted }
            }
            Output::Flag(f) => Self::Flag { item_id: f.item_id.clone(), category: f.category.clone() },
            Output::Audio(frame) => Self::Audio {
                item_id: frame.item_id.to_owned(),
                due_us: us(frame.due),
                talkspurt_start: frame.talkspurt_start,
                bytes: frame.payload.len(),
            },
            Output::End(reason) => Self::End { reason: reason.as_str().to_owned() },
        }
    }
}

/// Bytes as standard base64 (RFC 4648 §4).
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

/// Mono s16 PCM as base64 of its little-endian bytes.
mod b64_pcm {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[i16], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<i16>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        let bytes = STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)?;
        if bytes.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd number of PCM bytes"));
        }
        Ok(bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_through_json() {
        let lines = vec![
            Line::In {
                t_ns: 20_000_000,
                input: RecInput::ClientOpus {
                    seq: 7,
                    timestamp: 960,
                    payload_type: 111,
                    ssrc: 42,
                    payload: vec![0xf8, 0xff, 0xfe],
                },
            },
            Line::In {
                t_ns: 40_000_000,
                input: RecInput::Provider {
                    event: RecProviderEvent::AudioDelta {
                        item_id: "i1".into(),
                        rate_hz: 24_000,
                        pcm: vec![-1, 0, 32767],
                    },
                },
            },
            Line::Out {
                t_ns: 40_000_000,
                output: RecOutput::Event {
                    event: ServerEvent::AgentInterrupted { item_id: "i1".into(), played_ms: 120 },
                },
            },
            Line::End { t_ns: 50_000_000, reason: "client_request".into(), complete: true },
        ];
        for line in lines {
            let text = serde_json::to_string(&line).unwrap();
            assert!(!text.contains('\n'));
            let back: Line = serde_json::from_str(&text).unwrap();
            assert_eq!(back, line, "{text}");
        }
    }

    #[test]
    fn media_specs_recorded_before_the_encoder_and_decoder_rates_replay_at_48_khz() {
        // The media spec of tests/data/recordings/barge-in (no `dtx`, no encoder or decode rate).
        let old = r#"{"input_rate_hz":24000,"opus_payload_type":111,"vad_mode":2,"vad_min_speech_ms":100,
            "vad_min_silence_ms":500,"vad_energy_floor_dbfs":-55.0,"opus_bitrate_bps":32000,
            "opus_complexity":1,"jitter_tolerance_ms":2,"estimate_visemes":true}"#;
        let spec: MediaSpec = serde_json::from_str(old).unwrap();
        assert_eq!((spec.encoder_input_rate_hz, spec.dtx, spec.decode_at_input_rate), (48_000, false, false));
        let parts = spec.parts().unwrap();
        assert_eq!((parts.playout.rate_hz(), parts.uplink.decode_rate_hz()), (48_000, 48_000));
        // A new recording keeps its rates, and the replay's playout and uplink run at them.
        let new = MediaSpec { encoder_input_rate_hz: 24_000, decode_at_input_rate: true, ..spec };
        let text = serde_json::to_string(&new).unwrap();
        assert!(text.contains(r#""encoder_input_rate_hz":24000"#), "{text}");
        assert!(text.contains(r#""decode_at_input_rate":true"#), "{text}");
        let back: MediaSpec = serde_json::from_str(&text).unwrap();
        assert_eq!(back, new);
        let parts = back.parts().unwrap();
        assert_eq!((parts.playout.rate_hz(), parts.uplink.decode_rate_hz()), (24_000, 24_000));
    }

    #[test]
    fn inputs_rebuild_what_the_core_reads() {
        let ev = ProviderEvent::Transcript {
            speaker: Speaker::Agent,
            item_id: "i2".into(),
            text: "hello".into(),
            is_final: false,
        };
        let rec = RecInput::from_input(&Input::Provider(ev));
        let Input::Provider(ProviderEvent::Transcript { speaker, item_id, text, is_final }) = rec.to_input().unwrap()
        else {
            panic!("not a transcript")
        };
        assert_eq!((speaker, item_id.as_str(), text.as_str(), is_final), (Speaker::Agent, "i2", "hello", false));
        let refused = RecInput::Refused { command: RecCommand::AppendAudio { rate_hz: 24_000, samples: 480 } };
        assert!(refused.to_input().is_err(), "user audio is only summarised");
    }
}
