//! The OpenAI Realtime wire protocol, sans-IO: client messages built as JSON text, server
//! messages parsed into [`ServerMessage`]. Both generations of names are understood: the GA
//! names (`response.output_audio.delta`, `session.type = "realtime"`, nested `audio.input` /
//! `audio.output` session fields) and the beta names (`response.audio.delta`, `modalities`,
//! `input_audio_format: "pcm16"`) still spoken by Azure OpenAI, xAI, StepFun, GLM-Realtime and
//! Qwen-Omni. Nothing here touches a socket or a clock, so every event is unit-tested on
//! recorded JSON.

use serde_json::{Value, json};

pub use crate::providers::wire::ProtocolError;
use crate::providers::wire::{b64_to_pcm, pcm_to_b64};

pub use crate::providers::HistoryItem;
pub use crate::providers::tools::ToolSpec;

/// Which generation of the protocol the server speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// The GA protocol (OpenAI since 2025-08).
    Ga,
    /// The beta protocol (`OpenAI-Beta: realtime=v1`; most compatible servers).
    Beta,
}

/// Who detects the end of the user's turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TurnDetection {
    /// The server's energy VAD.
    ServerVad,
    /// The server's semantic end-of-turn model.
    SemanticVad,
    /// Our VAD: the client commits the buffer and asks for a response.
    Local,
}

/// What `session.update` configures.
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// The model (GA puts it in the session; beta only in the URL).
    pub model: String,
    /// System instructions.
    pub instructions: String,
    /// Output voice.
    pub voice: String,
    /// Input PCM rate in Hz.
    pub input_rate_hz: u32,
    /// Turn detection.
    pub turn_detection: TurnDetection,
    /// Input transcription model (None: no user transcripts).
    pub transcription_model: Option<String>,
    /// Tools offered.
    pub tools: Vec<ToolSpec>,
}

fn turn_detection_json(td: TurnDetection) -> Value {
    match td {
        // interrupt_response: the server cancels its reply when the user speaks; we also cancel
        // ourselves and truncate to what was heard, which the server cannot know.
        TurnDetection::ServerVad => json!({"type": "server_vad", "create_response": true, "interrupt_response": true}),
        TurnDetection::SemanticVad => {
            json!({"type": "semantic_vad", "create_response": true, "interrupt_response": true})
        }
        TurnDetection::Local => Value::Null,
    }
}

fn tools_json(tools: &[ToolSpec]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| json!({"type": "function", "name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect(),
    )
}

/// `session.update` with everything the session needs.
pub fn session_update(dialect: Dialect, p: &SessionParams) -> String {
    let transcription = p.transcription_model.as_ref().map_or(Value::Null, |m| json!({"model": m}));
    let session = match dialect {
        Dialect::Ga => json!({
            "type": "realtime",
            "model": p.model,
            "output_modalities": ["audio"],
            "instructions": p.instructions,
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": p.input_rate_hz},
                    "transcription": transcription,
                    "turn_detection": turn_detection_json(p.turn_detection),
                },
                "output": {
                    "format": {"type": "audio/pcm", "rate": OUTPUT_RATE_HZ},
                    "voice": p.voice,
                },
            },
            "tools": tools_json(&p.tools),
            "tool_choice": "auto",
        }),
        Dialect::Beta => json!({
            "modalities": ["audio", "text"],
            "instructions": p.instructions,
            "voice": p.voice,
            "input_audio_format": "pcm16",
            "output_audio_format": "pcm16",
            "input_audio_transcription": transcription,
            "turn_detection": turn_detection_json(p.turn_detection),
            "tools": tools_json(&p.tools),
            "tool_choice": "auto",
        }),
    };
    json!({"type": "session.update", "session": session}).to_string()
}

/// A partial `session.update` of a running session (the Realtime API merges it into the
/// session): only the given parts. GA names the voice `audio.output.voice`, beta `voice`.
pub fn session_patch(
    dialect: Dialect,
    instructions: Option<&str>,
    voice: Option<&str>,
    tools: Option<&[ToolSpec]>,
) -> String {
    let mut session = serde_json::Map::new();
    if dialect == Dialect::Ga {
        session.insert("type".into(), "realtime".into());
    }
    if let Some(i) = instructions {
        session.insert("instructions".into(), i.into());
    }
    if let Some(v) = voice {
        match dialect {
            Dialect::Ga => session.insert("audio".into(), json!({"output": {"voice": v}})),
            Dialect::Beta => session.insert("voice".into(), v.into()),
        };
    }
    if let Some(t) = tools {
        session.insert("tools".into(), tools_json(t));
    }
    json!({"type": "session.update", "session": session}).to_string()
}

/// The rate of the agent's audio (both dialects: 24 kHz mono s16le).
pub const OUTPUT_RATE_HZ: u32 = 24_000;

/// `input_audio_buffer.append` with s16le PCM, base64.
pub fn append_audio(samples: &[i16]) -> String {
    let b64 = pcm_to_b64(samples);
    format!(r#"{{"type":"input_audio_buffer.append","audio":"{b64}"}}"#)
}

/// `input_audio_buffer.commit`: our VAD ended the user's turn.
pub fn commit() -> String {
    json!({"type": "input_audio_buffer.commit"}).to_string()
}

/// `input_audio_buffer.clear`: drop uncommitted audio.
pub fn clear_input() -> String {
    json!({"type": "input_audio_buffer.clear"}).to_string()
}

/// `response.create`, optionally with per-response instructions (e.g. a greeting).
pub fn response_create(instructions: Option<&str>) -> String {
    match instructions {
        Some(i) => json!({"type": "response.create", "response": {"instructions": i}}).to_string(),
        None => json!({"type": "response.create"}).to_string(),
    }
}

/// `response.cancel`.
pub fn response_cancel() -> String {
    json!({"type": "response.cancel"}).to_string()
}

/// `conversation.item.truncate`: cut the agent's audio item to what the user heard.
pub fn truncate(item_id: &str, audio_end_ms: u64) -> String {
    json!({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0, "audio_end_ms": audio_end_ms})
        .to_string()
}

/// `conversation.item.create` with a user text message.
pub fn user_text(text: &str) -> String {
    history_item(Dialect::Ga, &HistoryItem::User(text.to_owned()))
}

/// `conversation.item.create` with a user message holding one image: an `input_image` content
/// part whose `image_url` is the data URL (OpenAI Realtime reference; PNG or JPEG). It joins
/// the context; the model sees it with the user's next turn.
pub fn input_image(image: &crate::image::ImageFrame) -> String {
    let part = json!({"type": "input_image", "image_url": image.data_url()});
    json!({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [part]}})
        .to_string()
}

/// `conversation.item.create` replaying one past turn.
pub fn history_item(dialect: Dialect, item: &HistoryItem) -> String {
    let item = match item {
        HistoryItem::User(t) => {
            json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": t}]})
        }
        HistoryItem::Agent(t) => {
            let ty = match dialect {
                Dialect::Ga => "output_text",
                Dialect::Beta => "text",
            };
            json!({"type": "message", "role": "assistant", "content": [{"type": ty, "text": t}]})
        }
    };
    json!({"type": "conversation.item.create", "item": item}).to_string()
}

/// `conversation.item.create` with a tool's output.
pub fn function_call_output(call_id: &str, output: &str) -> String {
    json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "call_id": call_id, "output": output}})
        .to_string()
}

/// A function call found in the output of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionCall {
    /// The id the output must quote.
    pub call_id: String,
    /// Function name.
    pub name: String,
    /// JSON arguments, as text.
    pub arguments: String,
}

/// A server message, by meaning (both dialects map to the same variant).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerMessage {
    /// `session.created`.
    SessionCreated,
    /// `session.updated`: our configuration is in force.
    SessionUpdated,
    /// `response.created`.
    ResponseCreated {
        /// Response id.
        response_id: String,
    },
    /// `response.output_item.added`: a message or a function call begins.
    OutputItemAdded {
        /// Item id.
        item_id: String,
        /// `message` or `function_call`.
        kind: String,
        /// For a function call: its name and call id.
        call: Option<(String, String)>,
    },
    /// `response.output_audio.delta` / `response.audio.delta`.
    AudioDelta {
        /// The agent item.
        item_id: String,
        /// PCM s16le decoded from base64, 24 kHz mono.
        samples: Vec<i16>,
    },
    /// `response.output_audio.done` / `response.audio.done`.
    AudioDone {
        /// The agent item.
        item_id: String,
    },
    /// `response.output_audio_transcript.delta` / `response.audio_transcript.delta` (and the text
    /// modality's `response.output_text.delta` / `response.text.delta`).
    AgentTranscriptDelta {
        /// The agent item.
        item_id: String,
        /// New text.
        delta: String,
    },
    /// `response.output_audio_transcript.done` / `response.audio_transcript.done` (and text `.done`).
    AgentTranscriptDone {
        /// The agent item.
        item_id: String,
        /// The whole text.
        transcript: String,
    },
    /// `conversation.item.input_audio_transcription.delta`.
    UserTranscriptDelta {
        /// The user item.
        item_id: String,
        /// New text.
        delta: String,
    },
    /// `conversation.item.input_audio_transcription.completed`.
    UserTranscriptDone {
        /// The user item.
        item_id: String,
        /// The whole text.
        transcript: String,
    },
    /// `input_audio_buffer.speech_started` (server VAD).
    SpeechStarted {
        /// Position in the input buffer, ms.
        audio_start_ms: u64,
    },
    /// `input_audio_buffer.speech_stopped` (server VAD).
    SpeechStopped,
    /// `input_audio_buffer.committed`.
    InputCommitted {
        /// The user item created from the buffer.
        item_id: String,
    },
    /// `response.function_call_arguments.done`.
    FunctionCallArgumentsDone {
        /// Call id.
        call_id: String,
        /// Function name, when the server says it (GA); beta gives it in `output_item.added`.
        name: Option<String>,
        /// JSON arguments, as text.
        arguments: String,
    },
    /// `conversation.item.truncated`.
    Truncated {
        /// The agent item.
        item_id: String,
        /// Where it was cut.
        audio_end_ms: u64,
    },
    /// `response.done`.
    ResponseDone {
        /// Response id.
        response_id: String,
        /// `completed`, `cancelled`, `failed`, `incomplete`.
        status: String,
        /// Message items of the response (their ids).
        message_items: Vec<String>,
        /// Function calls in the response.
        calls: Vec<FunctionCall>,
        /// A failed response's error, if any.
        error: Option<(String, String)>,
        /// `response.usage.total_tokens` (input + output, text and audio), when reported
        /// (OpenAI Realtime API reference, `response.done`).
        total_tokens: Option<u64>,
    },
    /// `error`.
    Error {
        /// `error.type`.
        kind: String,
        /// `error.code` (may be empty).
        code: String,
        /// `error.message`.
        message: String,
    },
    /// Anything else (rate limits, content parts, item lifecycle we do not need).
    Other(String),
}

fn s(v: &Value, kind: &str, field: &'static str) -> Result<String, ProtocolError> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| ProtocolError::MissingField { kind: kind.to_owned(), field })
}

fn s_or_empty(v: &Value, field: &str) -> String {
    v.get(field).and_then(Value::as_str).unwrap_or_default().to_owned()
}

/// Parse one server text frame.
pub fn parse(text: &str) -> Result<ServerMessage, ProtocolError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let kind = v.get("type").and_then(Value::as_str).ok_or_else(|| ProtocolError::Malformed("no `type`".into()))?;
    let k = kind;
    Ok(match kind {
        "session.created" => ServerMessage::SessionCreated,
        "session.updated" => ServerMessage::SessionUpdated,
        "response.created" => ServerMessage::ResponseCreated {
            response_id: v.get("response").map(|r| s_or_empty(r, "id")).unwrap_or_default(),
        },
        "response.output_item.added" => {
            let item = v.get("item").ok_or_else(|| ProtocolError::MissingField { kind: k.into(), field: "item" })?;
            let item_kind = s_or_empty(item, "type");
            let call = (item_kind == "function_call").then(|| (s_or_empty(item, "name"), s_or_empty(item, "call_id")));
            ServerMessage::OutputItemAdded { item_id: s(item, k, "id")?, kind: item_kind, call }
        }
        "response.output_audio.delta" | "response.audio.delta" => {
            ServerMessage::AudioDelta { item_id: s(&v, k, "item_id")?, samples: b64_to_pcm(&s(&v, k, "delta")?)? }
        }
        "response.output_audio.done" | "response.audio.done" => {
            ServerMessage::AudioDone { item_id: s(&v, k, "item_id")? }
        }
        "response.output_audio_transcript.delta"
        | "response.audio_transcript.delta"
        | "response.output_text.delta"
        | "response.text.delta" => {
            ServerMessage::AgentTranscriptDelta { item_id: s(&v, k, "item_id")?, delta: s(&v, k, "delta")? }
        }
        "response.output_audio_transcript.done" | "response.audio_transcript.done" => {
            ServerMessage::AgentTranscriptDone { item_id: s(&v, k, "item_id")?, transcript: s(&v, k, "transcript")? }
        }
        "response.output_text.done" | "response.text.done" => {
            ServerMessage::AgentTranscriptDone { item_id: s(&v, k, "item_id")?, transcript: s(&v, k, "text")? }
        }
        "conversation.item.input_audio_transcription.delta" => {
            ServerMessage::UserTranscriptDelta { item_id: s(&v, k, "item_id")?, delta: s(&v, k, "delta")? }
        }
        "conversation.item.input_audio_transcription.completed" => {
            ServerMessage::UserTranscriptDone { item_id: s(&v, k, "item_id")?, transcript: s(&v, k, "transcript")? }
        }
        "input_audio_buffer.speech_started" => ServerMessage::SpeechStarted {
            audio_start_ms: v.get("audio_start_ms").and_then(Value::as_u64).unwrap_or(0),
        },
        "input_audio_buffer.speech_stopped" => ServerMessage::SpeechStopped,
        "input_audio_buffer.committed" => ServerMessage::InputCommitted { item_id: s_or_empty(&v, "item_id") },
        "response.function_call_arguments.done" => ServerMessage::FunctionCallArgumentsDone {
            call_id: s(&v, k, "call_id")?,
            name: v.get("name").and_then(Value::as_str).map(str::to_owned),
            arguments: s(&v, k, "arguments")?,
        },
        "conversation.item.truncated" => ServerMessage::Truncated {
            item_id: s(&v, k, "item_id")?,
            audio_end_ms: v.get("audio_end_ms").and_then(Value::as_u64).unwrap_or(0),
        },
        "response.done" => {
            let r =
                v.get("response").ok_or_else(|| ProtocolError::MissingField { kind: k.into(), field: "response" })?;
            let mut message_items = Vec::new();
            let mut calls = Vec::new();
            for item in r.get("output").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default() {
                match item.get("type").and_then(Value::as_str) {
                    Some("message") => message_items.push(s_or_empty(item, "id")),
                    Some("function_call") => calls.push(FunctionCall {
                        call_id: s_or_empty(item, "call_id"),
                        name: s_or_empty(item, "name"),
                        arguments: s_or_empty(item, "arguments"),
                    }),
                    _ => {}
                }
            }
            let error = r
                .get("status_details")
                .and_then(|d| d.get("error"))
                .filter(|e| e.is_object())
                .map(|e| (s_or_empty(e, "code"), s_or_empty(e, "message")));
            ServerMessage::ResponseDone {
                response_id: s_or_empty(r, "id"),
                status: s_or_empty(r, "status"),
                message_items,
                calls,
                error,
                total_tokens: r.get("usage").and_then(|u| u.get("total_tokens")).and_then(Value::as_u64),
            }
        }
        "error" => {
            let e = v.get("error").ok_or_else(|| ProtocolError::MissingField { kind: k.into(), field: "error" })?;
            ServerMessage::Error {
                kind: s_or_empty(e, "type"),
                code: s_or_empty(e, "code"),
                message: s_or_empty(e, "message"),
            }
        }
        other => ServerMessage::Other(other.to_owned()),
    })
}

/// Whether a provider error may go away on a fresh session (reconnect) rather than being the
/// request's fault.
pub fn error_retryable(kind: &str, code: &str) -> bool {
    matches!(kind, "server_error") || matches!(code, "session_expired" | "rate_limit_exceeded" | "server_error")
}

/// Errors that only say a cancel or truncate raced the end of the response: expected during
/// barge-in, logged at debug, never shown to the user.
pub fn error_benign(code: &str) -> bool {
    matches!(
        code,
        "response_cancel_not_active" | "item_truncate_invalid_item_id" | "conversation_already_has_active_response"
    )
}

#[cfg(test)]
mod tests {
    //! Recorded server messages, written from the official reference (GA and beta names).
    use super::*;

    #[test]
    fn session_lifecycle_messages() {
        let created = r#"{"type":"session.created","event_id":"event_C9G5RJeJ2gF77mV7f2B1j","session":{"type":"realtime","object":"realtime.session","id":"sess_C9G5QPteg4UIbotdKLoYQ","model":"gpt-realtime-2025-08-28","output_modalities":["audio"],"instructions":"Your knowledge cutoff is 2023-10.","tools":[],"tool_choice":"auto","max_output_tokens":"inf","tracing":null,"prompt":null,"expires_at":1756324625,"audio":{"input":{"format":{"type":"audio/pcm","rate":24000},"transcription":null,"noise_reduction":null,"turn_detection":{"type":"server_vad","threshold":0.5,"prefix_padding_ms":300,"silence_duration_ms":200,"idle_timeout_ms":null,"create_response":true,"interrupt_response":true}},"output":{"format":{"type":"audio/pcm","rate":24000},"voice":"marin","speed":1}},"include":null}}"#;
        assert_eq!(parse(created).unwrap(), ServerMessage::SessionCreated);
        let updated = r#"{"type":"session.updated","event_id":"event_C9G8mqI3IucaojlVKE8Cs","session":{"type":"realtime","object":"realtime.session","id":"sess_C9G8l3zp50uFv4qgxfJ8o","model":"gpt-realtime-2025-08-28"}}"#;
        assert_eq!(parse(updated).unwrap(), ServerMessage::SessionUpdated);
    }

    #[test]
    fn audio_delta_in_both_dialects_decodes_s16le() {
        let samples = [0i16, 1, -1, i16::MAX, i16::MIN, 1234];
        for ty in ["response.output_audio.delta", "response.audio.delta"] {
            let m = format!(
                r#"{{"type":"{ty}","event_id":"event_3456","response_id":"resp_001","item_id":"msg_008","output_index":0,"content_index":0,"delta":"{}"}}"#,
                pcm_to_b64(&samples)
            );
            assert_eq!(
                parse(&m).unwrap(),
                ServerMessage::AudioDelta { item_id: "msg_008".into(), samples: samples.to_vec() },
                "{ty}"
            );
        }
        let odd = r#"{"type":"response.output_audio.delta","item_id":"m","delta":"AA=="}"#;
        assert!(matches!(parse(odd), Err(ProtocolError::BadAudio(_))));
        let done = r#"{"type":"response.output_audio.done","event_id":"event_5678","response_id":"resp_001","item_id":"msg_008","output_index":0,"content_index":0}"#;
        assert_eq!(parse(done).unwrap(), ServerMessage::AudioDone { item_id: "msg_008".into() });
        let beta_done = r#"{"type":"response.audio.done","event_id":"e","response_id":"r","item_id":"msg_9","output_index":0,"content_index":0}"#;
        assert_eq!(parse(beta_done).unwrap(), ServerMessage::AudioDone { item_id: "msg_9".into() });
    }

    #[test]
    fn agent_transcripts_in_both_dialects() {
        for ty in
            ["response.output_audio_transcript.delta", "response.audio_transcript.delta", "response.output_text.delta"]
        {
            let m = format!(
                r#"{{"type":"{ty}","event_id":"event_4546","response_id":"resp_001","item_id":"msg_008","output_index":0,"content_index":0,"delta":"Hello, how can I a"}}"#
            );
            assert_eq!(
                parse(&m).unwrap(),
                ServerMessage::AgentTranscriptDelta { item_id: "msg_008".into(), delta: "Hello, how can I a".into() }
            );
        }
        for ty in ["response.output_audio_transcript.done", "response.audio_transcript.done"] {
            let m = format!(
                r#"{{"type":"{ty}","event_id":"event_4748","response_id":"resp_001","item_id":"msg_008","output_index":0,"content_index":0,"transcript":"Hello, how can I assist you today?"}}"#
            );
            assert_eq!(
                parse(&m).unwrap(),
                ServerMessage::AgentTranscriptDone {
                    item_id: "msg_008".into(),
                    transcript: "Hello, how can I assist you today?".into()
                }
            );
        }
        let text_done = r#"{"type":"response.output_text.done","item_id":"msg_1","text":"Hi."}"#;
        assert_eq!(
            parse(text_done).unwrap(),
            ServerMessage::AgentTranscriptDone { item_id: "msg_1".into(), transcript: "Hi.".into() }
        );
    }

    #[test]
    fn user_transcription_and_vad_edges() {
        let delta = r#"{"type":"conversation.item.input_audio_transcription.delta","event_id":"event_001","item_id":"item_001","content_index":0,"delta":"Hello"}"#;
        assert_eq!(
            parse(delta).unwrap(),
            ServerMessage::UserTranscriptDelta { item_id: "item_001".into(), delta: "Hello".into() }
        );
        let done = r#"{"type":"conversation.item.input_audio_transcription.completed","event_id":"event_2122","item_id":"msg_003","content_index":0,"transcript":"Hello, how are you?","usage":{"type":"tokens","total_tokens":22,"input_tokens":13,"output_tokens":9}}"#;
        assert_eq!(
            parse(done).unwrap(),
            ServerMessage::UserTranscriptDone { item_id: "msg_003".into(), transcript: "Hello, how are you?".into() }
        );
        let started = r#"{"type":"input_audio_buffer.speech_started","event_id":"event_1516","audio_start_ms":1000,"item_id":"msg_003"}"#;
        assert_eq!(parse(started).unwrap(), ServerMessage::SpeechStarted { audio_start_ms: 1000 });
        let stopped = r#"{"type":"input_audio_buffer.speech_stopped","event_id":"event_1718","audio_end_ms":2000,"item_id":"msg_003"}"#;
        assert_eq!(parse(stopped).unwrap(), ServerMessage::SpeechStopped);
        let committed = r#"{"type":"input_audio_buffer.committed","event_id":"event_1121","previous_item_id":"msg_001","item_id":"msg_002"}"#;
        assert_eq!(parse(committed).unwrap(), ServerMessage::InputCommitted { item_id: "msg_002".into() });
    }

    #[test]
    fn function_calls_in_both_dialects() {
        let ga = r#"{"type":"response.function_call_arguments.done","event_id":"event_5556","response_id":"resp_002","item_id":"fc_001","output_index":0,"call_id":"call_001","name":"get_weather","arguments":"{\"location\": \"San Francisco\"}"}"#;
        assert_eq!(
            parse(ga).unwrap(),
            ServerMessage::FunctionCallArgumentsDone {
                call_id: "call_001".into(),
                name: Some("get_weather".into()),
                arguments: r#"{"location": "San Francisco"}"#.into()
            }
        );
        let beta = r#"{"type":"response.function_call_arguments.done","event_id":"event_5556","response_id":"resp_002","item_id":"fc_001","output_index":0,"call_id":"call_001","arguments":"{}"}"#;
        assert_eq!(
            parse(beta).unwrap(),
            ServerMessage::FunctionCallArgumentsDone { call_id: "call_001".into(), name: None, arguments: "{}".into() }
        );
        let added = r#"{"type":"response.output_item.added","event_id":"event_3334","response_id":"resp_001","output_index":0,"item":{"id":"fc_001","object":"realtime.item","type":"function_call","status":"in_progress","name":"get_time","call_id":"call_001","arguments":""}}"#;
        assert_eq!(
            parse(added).unwrap(),
            ServerMessage::OutputItemAdded {
                item_id: "fc_001".into(),
                kind: "function_call".into(),
                call: Some(("get_time".into(), "call_001".into()))
            }
        );
        let msg_added = r#"{"type":"response.output_item.added","event_id":"e","response_id":"resp_001","output_index":0,"item":{"id":"msg_007","object":"realtime.item","type":"message","status":"in_progress","role":"assistant","content":[]}}"#;
        assert_eq!(
            parse(msg_added).unwrap(),
            ServerMessage::OutputItemAdded { item_id: "msg_007".into(), kind: "message".into(), call: None }
        );
    }

    #[test]
    fn response_lifecycle() {
        let created = r#"{"type":"response.created","event_id":"event_C9G8pqbTEddBSIxbBN6Os","response":{"object":"realtime.response","id":"resp_C9G8p7IH2WxLbkgPNouYL","status":"in_progress","status_details":null,"output":[],"conversation_id":"conv_C9G8mmBkLhQJwCon3hoJN","output_modalities":["audio"],"max_output_tokens":"inf","audio":{"output":{"format":{"type":"audio/pcm","rate":24000},"voice":"marin"}},"usage":null,"metadata":null}}"#;
        assert_eq!(
            parse(created).unwrap(),
            ServerMessage::ResponseCreated { response_id: "resp_C9G8p7IH2WxLbkgPNouYL".into() }
        );
        let done = r#"{"type":"response.done","event_id":"event_3132","response":{"id":"resp_001","object":"realtime.response","status":"completed","status_details":null,"output":[{"id":"msg_006","object":"realtime.item","type":"message","status":"completed","role":"assistant","content":[{"type":"output_audio","transcript":"Sure."}]},{"id":"fc_1","object":"realtime.item","type":"function_call","status":"completed","name":"set_emotion","call_id":"call_9","arguments":"{\"emotion\":\"happy\"}"}],"usage":{"total_tokens":50}}}"#;
        assert_eq!(
            parse(done).unwrap(),
            ServerMessage::ResponseDone {
                response_id: "resp_001".into(),
                status: "completed".into(),
                message_items: vec!["msg_006".into()],
                calls: vec![FunctionCall {
                    call_id: "call_9".into(),
                    name: "set_emotion".into(),
                    arguments: r#"{"emotion":"happy"}"#.into()
                }],
                error: None,
                total_tokens: Some(50),
            }
        );
        let failed = r#"{"type":"response.done","response":{"id":"resp_2","status":"failed","status_details":{"type":"failed","error":{"type":"server_error","code":"server_error","message":"boom"}},"output":[]}}"#;
        assert!(matches!(
            parse(failed).unwrap(),
            ServerMessage::ResponseDone { ref status, error: Some((ref c, _)), .. } if status == "failed" && c == "server_error"
        ));
        let truncated = r#"{"type":"conversation.item.truncated","event_id":"event_2526","item_id":"msg_004","content_index":0,"audio_end_ms":1500}"#;
        assert_eq!(
            parse(truncated).unwrap(),
            ServerMessage::Truncated { item_id: "msg_004".into(), audio_end_ms: 1500 }
        );
    }

    #[test]
    fn errors_and_unknown_messages() {
        let e = r#"{"type":"error","event_id":"event_890","error":{"type":"invalid_request_error","code":"invalid_event","message":"The 'type' field is missing.","param":null,"event_id":"event_567"}}"#;
        assert_eq!(
            parse(e).unwrap(),
            ServerMessage::Error {
                kind: "invalid_request_error".into(),
                code: "invalid_event".into(),
                message: "The 'type' field is missing.".into()
            }
        );
        assert!(!error_retryable("invalid_request_error", "invalid_event"));
        assert!(error_retryable("invalid_request_error", "session_expired"));
        assert!(error_retryable("server_error", ""));
        assert!(error_benign("response_cancel_not_active"));
        let rl = r#"{"type":"rate_limits.updated","event_id":"e","rate_limits":[]}"#;
        assert_eq!(parse(rl).unwrap(), ServerMessage::Other("rate_limits.updated".into()));
        assert!(matches!(parse("not json"), Err(ProtocolError::Malformed(_))));
        assert!(matches!(parse(r#"{"no":"type"}"#), Err(ProtocolError::Malformed(_))));
        assert!(matches!(
            parse(r#"{"type":"response.output_audio.delta","delta":""}"#),
            Err(ProtocolError::MissingField { field: "item_id", .. })
        ));
    }

    #[test]
    fn client_messages_in_both_dialects() {
        let p = SessionParams {
            model: "gpt-realtime".into(),
            instructions: "Be kind.".into(),
            voice: "marin".into(),
            input_rate_hz: 24_000,
            turn_detection: TurnDetection::ServerVad,
            transcription_model: Some("gpt-4o-mini-transcribe".into()),
            tools: vec![ToolSpec {
                name: "get_time".into(),
                description: "time".into(),
                parameters: json!({"type":"object"}),
            }],
        };
        let ga: Value = serde_json::from_str(&session_update(Dialect::Ga, &p)).unwrap();
        assert_eq!(ga["type"], "session.update");
        assert_eq!(ga["session"]["type"], "realtime");
        assert_eq!(ga["session"]["audio"]["input"]["format"], json!({"type":"audio/pcm","rate":24000}));
        assert_eq!(ga["session"]["audio"]["input"]["turn_detection"]["type"], "server_vad");
        assert_eq!(ga["session"]["audio"]["input"]["transcription"]["model"], "gpt-4o-mini-transcribe");
        assert_eq!(ga["session"]["audio"]["output"]["voice"], "marin");
        assert_eq!(ga["session"]["tools"][0]["name"], "get_time");
        assert_eq!(ga["session"]["tools"][0]["type"], "function");
        let beta: Value = serde_json::from_str(&session_update(
            Dialect::Beta,
            &SessionParams { turn_detection: TurnDetection::Local, ..p },
        ))
        .unwrap();
        assert_eq!(beta["session"]["input_audio_format"], "pcm16");
        assert_eq!(beta["session"]["voice"], "marin");
        assert_eq!(beta["session"]["turn_detection"], Value::Null);
        assert_eq!(beta["session"]["input_audio_transcription"]["model"], "gpt-4o-mini-transcribe");

        let a: Value = serde_json::from_str(&append_audio(&[1, -2])).unwrap();
        assert_eq!(a["type"], "input_audio_buffer.append");
        assert_eq!(b64_to_pcm(a["audio"].as_str().unwrap()).unwrap(), vec![1, -2]);
        let t: Value = serde_json::from_str(&truncate("msg_1", 1234)).unwrap();
        assert_eq!(
            t,
            json!({"type":"conversation.item.truncate","item_id":"msg_1","content_index":0,"audio_end_ms":1234})
        );
        let o: Value = serde_json::from_str(&function_call_output("call_1", "{\"ok\":true}")).unwrap();
        assert_eq!(o["item"]["type"], "function_call_output");
        assert_eq!(o["item"]["call_id"], "call_1");
        let h: Value = serde_json::from_str(&history_item(Dialect::Beta, &HistoryItem::Agent("Hi".into()))).unwrap();
        assert_eq!(h["item"]["content"][0], json!({"type":"text","text":"Hi"}));
        let h: Value = serde_json::from_str(&history_item(Dialect::Ga, &HistoryItem::Agent("Hi".into()))).unwrap();
        assert_eq!(h["item"]["content"][0], json!({"type":"output_text","text":"Hi"}));
        let r: Value = serde_json::from_str(&response_create(Some("Greet"))).unwrap();
        assert_eq!(r["response"]["instructions"], "Greet");
    }
}
