//! The Amazon Nova Sonic event protocol, sans-IO: the JSON input events a session sends over
//! Bedrock's `InvokeModelWithBidirectionalStream` (each one the `bytes` of a `chunk`), and the
//! output events parsed into [`OutputEvent`]. Nothing here touches the SDK, a socket or a clock.
//!
//! Source of the facts: the Nova 2 Sonic user guide (docs.aws.amazon.com/nova/latest/nova2-userguide:
//! sonic-input-events, sonic-output-events, sonic-turn-taking) and the AWS samples. The input order
//! is `sessionStart`, `promptStart`, the SYSTEM text block, the history (once, before any audio,
//! USER first), one USER AUDIO block for the whole stream (16 kHz lpcm, base64), interactive USER
//! text and TOOL result blocks as needed, and to close: the audio `contentEnd`, `promptEnd`,
//! `sessionEnd`. Every event after `sessionStart` names the prompt (`promptName`) and each block
//! its content (`contentName`).

use serde_json::{Value, json};

use crate::providers::HistoryItem;
use crate::providers::tools::ToolSpec;
pub use crate::providers::wire::ProtocolError;
use crate::providers::wire::{b64_to_pcm, pcm_to_b64};

/// The rate of the user's audio.
pub const INPUT_RATE_HZ: u32 = 16_000;
/// The rate of the model's audio (asked for in `promptStart`).
pub const OUTPUT_RATE_HZ: u32 = 24_000;
/// The whole history sent at the start of a session is at most this many bytes of text.
pub const MAX_HISTORY_BYTES: usize = 40 * 1024;
/// One `textInput` carries at most this many bytes; longer texts go in several.
pub const MAX_TEXT_INPUT_BYTES: usize = 1024;

/// How quickly the model decides the user's turn ended (`endpointingSensitivity`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Sensitivity {
    /// Fastest (about 1.5 s of pause).
    High,
    /// Balanced.
    Medium,
    /// Waits longest.
    Low,
}

impl Sensitivity {
    fn wire(self) -> &'static str {
        match self {
            Sensitivity::High => "HIGH",
            Sensitivity::Medium => "MEDIUM",
            Sensitivity::Low => "LOW",
        }
    }
}

/// What `sessionStart` configures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Inference {
    /// `maxTokens`.
    pub max_tokens: u32,
    /// `topP`.
    pub top_p: f32,
    /// `temperature`.
    pub temperature: f32,
    /// `turnDetectionConfiguration.endpointingSensitivity`.
    pub sensitivity: Sensitivity,
}

fn event(name: &str, body: Value) -> String {
    json!({ "event": { name: body } }).to_string()
}

/// `sessionStart`.
pub fn session_start(i: &Inference) -> String {
    event(
        "sessionStart",
        json!({
            "inferenceConfiguration": {"maxTokens": i.max_tokens, "topP": i.top_p, "temperature": i.temperature},
            "turnDetectionConfiguration": {"endpointingSensitivity": i.sensitivity.wire()},
        }),
    )
}

/// `promptStart`: 24 kHz lpcm speech in `voice`, text and tool-use output, the tools (their
/// schemas as JSON text, as the API wants).
pub fn prompt_start(prompt: &str, voice: &str, tools: &[ToolSpec]) -> String {
    let mut body = json!({
        "promptName": prompt,
        "textOutputConfiguration": {"mediaType": "text/plain"},
        "audioOutputConfiguration": {
            "mediaType": "audio/lpcm", "sampleRateHertz": OUTPUT_RATE_HZ, "sampleSizeBits": 16,
            "channelCount": 1, "voiceId": voice, "encoding": "base64", "audioType": "SPEECH",
        },
    });
    if !tools.is_empty() {
        let specs: Vec<Value> = tools
            .iter()
            .map(|t| json!({"toolSpec": {"name": t.name, "description": t.description, "inputSchema": {"json": t.parameters.to_string()}}}))
            .collect();
        body["toolUseOutputConfiguration"] = json!({"mediaType": "application/json"});
        body["toolConfiguration"] = json!({ "tools": specs });
    }
    event("promptStart", body)
}

/// Who a text block is from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The system prompt.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
}

impl Role {
    fn wire(self) -> &'static str {
        match self {
            Role::System => "SYSTEM",
            Role::User => "USER",
            Role::Assistant => "ASSISTANT",
        }
    }
}

/// Split `text` into pieces of at most [`MAX_TEXT_INPUT_BYTES`] at character boundaries.
pub fn text_pieces(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = text;
    while rest.len() > MAX_TEXT_INPUT_BYTES {
        let mut cut = MAX_TEXT_INPUT_BYTES;
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        out.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    out.push(rest);
    out
}

/// A text block: `contentStart` (TEXT, `role`, `interactive`), its `textInput`s, `contentEnd`.
/// An interactive USER text asks the model to answer it.
pub fn text_block(prompt: &str, content: &str, role: Role, interactive: bool, text: &str) -> Vec<String> {
    let mut out = vec![event(
        "contentStart",
        json!({"promptName": prompt, "contentName": content, "type": "TEXT", "interactive": interactive,
               "role": role.wire(), "textInputConfiguration": {"mediaType": "text/plain"}}),
    )];
    for piece in text_pieces(text) {
        out.push(event("textInput", json!({"promptName": prompt, "contentName": content, "content": piece})));
    }
    out.push(content_end(prompt, content));
    out
}

/// The history to replay: the newest items that fit [`MAX_HISTORY_BYTES`], starting with a USER
/// item (an agent item first gets a short USER note before it, as the model requires).
pub fn history_items(items: &[HistoryItem]) -> Vec<(Role, String)> {
    let mut kept = Vec::new();
    let mut bytes = 0;
    for item in items.iter().rev() {
        let (role, text) = match item {
            HistoryItem::User(t) => (Role::User, t),
            HistoryItem::Agent(t) => (Role::Assistant, t),
        };
        if text.trim().is_empty() {
            continue;
        }
        if bytes + text.len() > MAX_HISTORY_BYTES {
            break;
        }
        bytes += text.len();
        kept.push((role, text.clone()));
    }
    kept.reverse();
    if kept.first().is_some_and(|(r, _)| *r == Role::Assistant) {
        kept.insert(0, (Role::User, "[Resuming conversation]".to_owned()));
    }
    kept
}

/// `contentStart` of the one USER AUDIO block (16 kHz lpcm, base64).
pub fn audio_start(prompt: &str, content: &str) -> String {
    event(
        "contentStart",
        json!({"promptName": prompt, "contentName": content, "type": "AUDIO", "interactive": true, "role": "USER",
               "audioInputConfiguration": {"mediaType": "audio/lpcm", "sampleRateHertz": INPUT_RATE_HZ,
                   "sampleSizeBits": 16, "channelCount": 1, "audioType": "SPEECH", "encoding": "base64"}}),
    )
}

/// `audioInput`: user audio, 16 kHz s16le.
pub fn audio_input(prompt: &str, content: &str, samples: &[i16]) -> String {
    event("audioInput", json!({"promptName": prompt, "contentName": content, "content": pcm_to_b64(samples)}))
}

/// `contentEnd` of a block.
pub fn content_end(prompt: &str, content: &str) -> String {
    event("contentEnd", json!({"promptName": prompt, "contentName": content}))
}

/// A tool result block: `contentStart` (TOOL, role TOOL, `toolUseId`), `toolResult`, `contentEnd`.
pub fn tool_result(prompt: &str, content: &str, tool_use_id: &str, result: &str) -> Vec<String> {
    vec![
        event(
            "contentStart",
            json!({"promptName": prompt, "contentName": content, "interactive": false, "type": "TOOL", "role": "TOOL",
                   "toolResultInputConfiguration": {"toolUseId": tool_use_id, "type": "TEXT",
                       "textInputConfiguration": {"mediaType": "text/plain"}}}),
        ),
        event("toolResult", json!({"promptName": prompt, "contentName": content, "content": result})),
        content_end(prompt, content),
    ]
}

/// `promptEnd`.
pub fn prompt_end(prompt: &str) -> String {
    event("promptEnd", json!({ "promptName": prompt }))
}

/// `sessionEnd`.
pub fn session_end() -> String {
    event("sessionEnd", json!({}))
}

/// What a content block carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Text (a transcript or the model's words).
    Text,
    /// Audio.
    Audio,
    /// A tool use.
    Tool,
    /// Something else.
    Other,
}

/// The stage of an ASSISTANT text block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// What the model plans to say (may not be spoken).
    Speculative,
    /// What was actually spoken.
    Final,
    /// Not given.
    None,
}

/// How a block or completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// More of the turn follows.
    PartialTurn,
    /// The turn is over.
    EndTurn,
    /// The user barged in.
    Interrupted,
    /// Not given or unknown.
    Other,
}

/// A Nova Sonic output event.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum OutputEvent {
    /// `completionStart`.
    CompletionStart,
    /// `contentStart` of an output block.
    ContentStart {
        /// Its `contentId`.
        content_id: String,
        /// Its `type`.
        kind: Kind,
        /// Whether it is the user's (their transcript) or the model's.
        user: bool,
        /// `generationStage` from `additionalModelFields` (ASSISTANT text).
        stage: Stage,
    },
    /// `textOutput`.
    Text {
        /// The block.
        content_id: String,
        /// The text.
        text: String,
    },
    /// `audioOutput`: 24 kHz s16le.
    Audio {
        /// The block.
        content_id: String,
        /// The samples.
        samples: Vec<i16>,
    },
    /// `toolUse`.
    ToolUse {
        /// Id to quote in the result.
        tool_use_id: String,
        /// Tool name.
        name: String,
        /// JSON arguments as text.
        input: String,
    },
    /// `contentEnd`.
    ContentEnd {
        /// The block.
        content_id: String,
        /// Its `type`.
        kind: Kind,
        /// Its `stopReason`.
        stop: StopReason,
    },
    /// `completionEnd`.
    CompletionEnd,
    /// `usageEvent`: `totalTokens`, the running total of the stream (input + output, speech +
    /// text; its `details.delta` is the change, `details.total` the same total by kind; AWS
    /// Nova user guide, "Handling output events with the bidirectional API").
    Usage {
        /// `totalTokens` so far in this stream.
        total_tokens: u64,
    },
    /// Anything else.
    Other(String),
}

fn str_of(v: &Value, field: &str) -> String {
    v.get(field).and_then(Value::as_str).unwrap_or_default().to_owned()
}

fn kind_of(v: &Value) -> Kind {
    match v.get("type").and_then(Value::as_str) {
        Some("TEXT") => Kind::Text,
        Some("AUDIO") => Kind::Audio,
        Some("TOOL") => Kind::Tool,
        _ => Kind::Other,
    }
}

fn stage_of(v: &Value) -> Stage {
    // `additionalModelFields` is JSON text: {"generationStage":"SPECULATIVE"}.
    let fields = v.get("additionalModelFields").and_then(Value::as_str).unwrap_or_default();
    let stage = serde_json::from_str::<Value>(fields).ok().and_then(|f| f.get("generationStage").cloned());
    match stage.as_ref().and_then(Value::as_str) {
        Some("SPECULATIVE") => Stage::Speculative,
        Some("FINAL") => Stage::Final,
        _ => Stage::None,
    }
}

fn stop_of(v: &Value) -> StopReason {
    match v.get("stopReason").and_then(Value::as_str) {
        Some("PARTIAL_TURN") => StopReason::PartialTurn,
        Some("END_TURN") => StopReason::EndTurn,
        Some("INTERRUPTED") => StopReason::Interrupted,
        _ => StopReason::Other,
    }
}

/// Parse one output event (the `bytes` of a `chunk`).
pub fn parse(bytes: &[u8]) -> Result<OutputEvent, ProtocolError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let ev = v.get("event").and_then(Value::as_object).ok_or_else(|| ProtocolError::Malformed("no `event`".into()))?;
    let (name, body) = ev.iter().next().ok_or_else(|| ProtocolError::Malformed("empty `event`".into()))?;
    Ok(match name.as_str() {
        "completionStart" => OutputEvent::CompletionStart,
        "contentStart" => OutputEvent::ContentStart {
            content_id: str_of(body, "contentId"),
            kind: kind_of(body),
            user: body.get("role").and_then(Value::as_str) == Some("USER"),
            stage: stage_of(body),
        },
        "textOutput" => OutputEvent::Text { content_id: str_of(body, "contentId"), text: str_of(body, "content") },
        "audioOutput" => {
            OutputEvent::Audio { content_id: str_of(body, "contentId"), samples: b64_to_pcm(&str_of(body, "content"))? }
        }
        "toolUse" => OutputEvent::ToolUse {
            tool_use_id: str_of(body, "toolUseId"),
            name: str_of(body, "toolName"),
            input: str_of(body, "content"),
        },
        "contentEnd" => {
            OutputEvent::ContentEnd { content_id: str_of(body, "contentId"), kind: kind_of(body), stop: stop_of(body) }
        }
        "completionEnd" => OutputEvent::CompletionEnd,
        "usageEvent" => match body.get("totalTokens").and_then(Value::as_u64) {
            Some(total_tokens) => OutputEvent::Usage { total_tokens },
            None => OutputEvent::Other("usageEvent".into()),
        },
        other => OutputEvent::Other(other.to_owned()),
    })
}

/// Whether a text output is the model's barge-in marker `{ "interrupted" : true }`.
pub fn is_interruption(text: &str) -> bool {
    serde_json::from_str::<Value>(text).ok().and_then(|v| v.get("interrupted").and_then(Value::as_bool)) == Some(true)
}

#[cfg(test)]
mod tests {
    //! Recorded events, written from the Nova 2 Sonic user guide's examples.
    use super::*;

    fn v(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    #[test]
    fn input_events_in_the_documented_shapes() {
        let i = Inference { max_tokens: 1024, top_p: 0.9, temperature: 0.7, sensitivity: Sensitivity::High };
        let s = v(&session_start(&i));
        assert_eq!(s["event"]["sessionStart"]["turnDetectionConfiguration"]["endpointingSensitivity"], "HIGH");
        assert_eq!(s["event"]["sessionStart"]["inferenceConfiguration"]["maxTokens"], 1024);
        let tools =
            [ToolSpec { name: "get_time".into(), description: "t".into(), parameters: json!({"type": "object"}) }];
        let p = v(&prompt_start("p1", "tiffany", &tools));
        let p = &p["event"]["promptStart"];
        assert_eq!(p["promptName"], "p1");
        assert_eq!(p["audioOutputConfiguration"]["sampleRateHertz"], 24000);
        assert_eq!(p["audioOutputConfiguration"]["voiceId"], "tiffany");
        assert_eq!(p["toolConfiguration"]["tools"][0]["toolSpec"]["inputSchema"]["json"], r#"{"type":"object"}"#);
        assert!(v(&prompt_start("p1", "tiffany", &[]))["event"]["promptStart"].get("toolConfiguration").is_none());

        let sys = text_block("p1", "c1", Role::System, false, "Be kind.");
        assert_eq!(sys.len(), 3);
        let cs = v(&sys[0]);
        assert_eq!(cs["event"]["contentStart"]["role"], "SYSTEM");
        assert_eq!(cs["event"]["contentStart"]["interactive"], false);
        assert_eq!(
            v(&sys[1])["event"]["textInput"],
            json!({"promptName": "p1", "contentName": "c1", "content": "Be kind."})
        );
        assert_eq!(v(&sys[2]), json!({"event": {"contentEnd": {"promptName": "p1", "contentName": "c1"}}}));
        let a = v(&audio_start("p1", "a1"));
        assert_eq!(a["event"]["contentStart"]["type"], "AUDIO");
        assert_eq!(a["event"]["contentStart"]["audioInputConfiguration"]["sampleRateHertz"], 16000);
        let ai = v(&audio_input("p1", "a1", &[1, -1]));
        assert_eq!(b64_to_pcm(ai["event"]["audioInput"]["content"].as_str().unwrap()).unwrap(), [1, -1]);
        let t = tool_result("p1", "t1", "tool-1", r#"{"ok":true}"#);
        assert_eq!(v(&t[0])["event"]["contentStart"]["toolResultInputConfiguration"]["toolUseId"], "tool-1");
        assert_eq!(v(&t[1])["event"]["toolResult"]["content"], r#"{"ok":true}"#);
        assert_eq!(v(&prompt_end("p1")), json!({"event": {"promptEnd": {"promptName": "p1"}}}));
        assert_eq!(v(&session_end()), json!({"event": {"sessionEnd": {}}}));
    }

    #[test]
    fn long_texts_are_split_and_history_is_bounded_and_starts_with_the_user() {
        let long = "é".repeat(700); // 1400 bytes
        let pieces = text_pieces(&long);
        assert_eq!(pieces.len(), 2);
        assert!(pieces.iter().all(|p| p.len() <= MAX_TEXT_INPUT_BYTES));
        assert_eq!(pieces.concat(), long);
        assert_eq!(text_block("p", "c", Role::User, true, &long).len(), 4);

        let h = history_items(&[
            HistoryItem::Agent("Hi".into()),
            HistoryItem::User("Yo".into()),
            HistoryItem::Agent("".into()),
        ]);
        assert_eq!(
            h,
            [(Role::User, "[Resuming conversation]".into()), (Role::Assistant, "Hi".into()), (Role::User, "Yo".into())]
        );
        let big: Vec<HistoryItem> = (0..100).map(|i| HistoryItem::User(format!("{i:04}{}", "x".repeat(996)))).collect();
        let h = history_items(&big);
        assert_eq!(h.len(), 40, "40 KB of 1 KB items");
        assert!(h[0].1.starts_with("0060"), "the newest are kept");
    }

    #[test]
    fn output_events() {
        let start = br#"{"event":{"contentStart":{"sessionId":"s","promptName":"p","completionId":"c","contentId":"t1","type":"TEXT","role":"ASSISTANT","additionalModelFields":"{\"generationStage\":\"SPECULATIVE\"}","textOutputConfiguration":{"mediaType":"text/plain"}}}}"#;
        assert_eq!(
            parse(start).unwrap(),
            OutputEvent::ContentStart {
                content_id: "t1".into(),
                kind: Kind::Text,
                user: false,
                stage: Stage::Speculative
            }
        );
        let user = br#"{"event":{"contentStart":{"contentId":"u1","type":"TEXT","role":"USER","additionalModelFields":"{\"generationStage\":\"FINAL\"}"}}}"#;
        assert_eq!(
            parse(user).unwrap(),
            OutputEvent::ContentStart { content_id: "u1".into(), kind: Kind::Text, user: true, stage: Stage::Final }
        );
        let text = br#"{"event":{"textOutput":{"sessionId":"s","promptName":"p","completionId":"c","contentId":"t1","content":"Hello there.","role":"ASSISTANT"}}}"#;
        assert_eq!(parse(text).unwrap(), OutputEvent::Text { content_id: "t1".into(), text: "Hello there.".into() });
        let audio =
            format!(r#"{{"event":{{"audioOutput":{{"contentId":"a1","content":"{}"}}}}}}"#, pcm_to_b64(&[3, -3]));
        assert_eq!(
            parse(audio.as_bytes()).unwrap(),
            OutputEvent::Audio { content_id: "a1".into(), samples: vec![3, -3] }
        );
        let tool =
            br#"{"event":{"toolUse":{"contentId":"x","toolUseId":"tu-1","toolName":"get_time","content":"{}"}}}"#;
        assert_eq!(
            parse(tool).unwrap(),
            OutputEvent::ToolUse { tool_use_id: "tu-1".into(), name: "get_time".into(), input: "{}".into() }
        );
        let end = br#"{"event":{"contentEnd":{"contentId":"a1","type":"AUDIO","stopReason":"INTERRUPTED"}}}"#;
        assert_eq!(
            parse(end).unwrap(),
            OutputEvent::ContentEnd { content_id: "a1".into(), kind: Kind::Audio, stop: StopReason::Interrupted }
        );
        let end = br#"{"event":{"contentEnd":{"contentId":"a1","type":"AUDIO","stopReason":"END_TURN"}}}"#;
        assert!(matches!(parse(end).unwrap(), OutputEvent::ContentEnd { stop: StopReason::EndTurn, .. }));
        assert_eq!(
            parse(br#"{"event":{"completionEnd":{"stopReason":"END_TURN"}}}"#).unwrap(),
            OutputEvent::CompletionEnd
        );
        assert_eq!(
            parse(br#"{"event":{"usageEvent":{"totalTokens":5}}}"#).unwrap(),
            OutputEvent::Usage { total_tokens: 5 }
        );
        assert!(matches!(parse(b"{}"), Err(ProtocolError::Malformed(_))));
        assert!(matches!(parse(b"nope"), Err(ProtocolError::Malformed(_))));
        assert!(is_interruption(r#"{ "interrupted" : true }"#));
        assert!(!is_interruption("interrupted"));
        assert!(!is_interruption(r#"{"interrupted":false}"#));
    }
}
