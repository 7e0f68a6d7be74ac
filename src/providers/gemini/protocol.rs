//! The Gemini Live wire protocol (`BidiGenerateContent` over WebSocket), sans-IO: client
//! messages built as JSON text, server messages parsed into [`ServerMessage`]. Nothing here
//! touches a socket or a clock, so every message is unit-tested on recorded JSON.
//!
//! Source of the facts: the Live API WebSockets reference (ai.google.dev/api/live) and the
//! session-management guide (ai.google.dev/gemini-api/docs/live-session). Each client message
//! has exactly one of `setup`, `clientContent`, `realtimeInput`, `toolResponse`; the server
//! answers `setup` with `setupComplete` and may send its messages as text or binary frames
//! (both carry the same JSON). Audio in is 16 kHz mono s16le, audio out 24 kHz (the rate is also
//! read from the part's `mimeType`).

use std::time::Duration;

use serde_json::{Value, json};

use crate::providers::HistoryItem;
use crate::providers::tools::ToolSpec;
pub use crate::providers::wire::ProtocolError;
use crate::providers::wire::{b64_to_pcm, pcm_to_b64};

/// The rate of the user's audio the Live API takes.
pub const INPUT_RATE_HZ: u32 = 16_000;
/// The rate of the model's audio when its `mimeType` does not say.
pub const OUTPUT_RATE_HZ: u32 = 24_000;

/// Context window compression (`contextWindowCompression`): without it an audio-only session
/// ends after about 15 minutes; with it the session is unbounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compression {
    /// Tokens of context that trigger compression (None: the server's default).
    pub trigger_tokens: Option<u64>,
    /// Tokens the sliding window keeps (None: the server's default).
    pub target_tokens: Option<u64>,
}

/// What `setup` configures.
#[derive(Debug, Clone, PartialEq)]
pub struct SetupParams {
    /// Model resource name; `models/` is added when absent.
    pub model: String,
    /// System instructions (sent as a Content object with one text part).
    pub instructions: String,
    /// Prebuilt voice name, e.g. `Kore`.
    pub voice: String,
    /// BCP-47 language of the speech, e.g. `en-US` (None: the model's choice).
    pub language: Option<String>,
    /// The server detects activity (true) or the client sends `activityStart` / `activityEnd`.
    pub server_vad: bool,
    /// Ask for transcripts of the user's audio.
    pub input_transcription: bool,
    /// Ask for transcripts of the model's audio.
    pub output_transcription: bool,
    /// Tools offered as function declarations.
    pub tools: Vec<ToolSpec>,
    /// A handle from `sessionResumptionUpdate` to resume (None: a new session, resumable).
    pub resume_handle: Option<String>,
    /// Context window compression (None: off).
    pub compression: Option<Compression>,
}

/// The model as a resource name (`models/...`).
pub fn model_name(model: &str) -> String {
    if model.starts_with("models/") || model.starts_with("projects/") {
        model.to_owned()
    } else {
        format!("models/{model}")
    }
}

/// The first client message: `setup`.
pub fn setup(p: &SetupParams) -> String {
    let mut speech = json!({"voiceConfig": {"prebuiltVoiceConfig": {"voiceName": p.voice}}});
    if let Some(lang) = &p.language {
        speech["languageCode"] = json!(lang);
    }
    let mut setup = json!({
        "model": model_name(&p.model),
        "generationConfig": {"responseModalities": ["AUDIO"], "speechConfig": speech},
        "systemInstruction": {"parts": [{"text": p.instructions}]},
        "realtimeInputConfig": {"automaticActivityDetection": {"disabled": !p.server_vad}},
        // transparent: the server reports the last client message each handle includes, so the
        // messages after it can be sent again on the resumed connection.
        "sessionResumption": match &p.resume_handle {
            Some(h) => json!({"handle": h, "transparent": true}),
            None => json!({"transparent": true}),
        },
    });
    if !p.tools.is_empty() {
        let decls: Vec<Value> = p
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "parameters": t.parameters}))
            .collect();
        setup["tools"] = json!([{"functionDeclarations": decls}]);
    }
    if p.input_transcription {
        setup["inputAudioTranscription"] = json!({});
    }
    if p.output_transcription {
        setup["outputAudioTranscription"] = json!({});
    }
    if let Some(c) = p.compression {
        let mut window = json!({});
        if let Some(t) = c.target_tokens {
            window["targetTokens"] = json!(t.to_string());
        }
        let mut cwc = json!({"slidingWindow": window});
        if let Some(t) = c.trigger_tokens {
            cwc["triggerTokens"] = json!(t.to_string());
        }
        setup["contextWindowCompression"] = cwc;
    }
    json!({ "setup": setup }).to_string()
}

/// `realtimeInput.audio`: user audio, 16 kHz s16le, base64.
pub fn audio(samples: &[i16]) -> String {
    format!(
        r#"{{"realtimeInput":{{"audio":{{"data":"{}","mimeType":"audio/pcm;rate={INPUT_RATE_HZ}"}}}}}}"#,
        pcm_to_b64(samples)
    )
}

/// `realtimeInput.activityStart` (automatic activity detection off): the user begins a turn;
/// the model stops speaking if it was.
pub fn activity_start() -> String {
    json!({"realtimeInput": {"activityStart": {}}}).to_string()
}

/// `realtimeInput.activityEnd` (automatic activity detection off): the user's turn is over.
pub fn activity_end() -> String {
    json!({"realtimeInput": {"activityEnd": {}}}).to_string()
}

fn content(item: &HistoryItem) -> Value {
    match item {
        HistoryItem::User(t) => json!({"role": "user", "parts": [{"text": t}]}),
        HistoryItem::Agent(t) => json!({"role": "model", "parts": [{"text": t}]}),
    }
}

/// `realtimeInput.video {data, mimeType}`: one screen or camera frame (Gemini Live takes images
/// as video frames in the realtime input, protocols.md).
pub fn video(image: &crate::image::ImageFrame) -> String {
    json!({"realtimeInput": {"video": {"data": image.base64, "mimeType": image.mime_type}}}).to_string()
}

/// `clientContent` with one user text turn that the model answers (`turnComplete: true`).
pub fn user_text(text: &str) -> String {
    json!({"clientContent": {"turns": [content(&HistoryItem::User(text.to_owned()))], "turnComplete": true}})
        .to_string()
}

/// `clientContent` seeding past turns without asking for an answer (`turnComplete: false`);
/// None when there is nothing to send.
pub fn history(items: &[HistoryItem]) -> Option<String> {
    if items.is_empty() {
        return None;
    }
    let turns: Vec<Value> = items.iter().map(content).collect();
    Some(json!({"clientContent": {"turns": turns, "turnComplete": false}}).to_string())
}

/// One answered function call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionResponse {
    /// The call's `id`.
    pub id: String,
    /// The function's name.
    pub name: String,
    /// The tool's JSON output (an object goes as is; anything else is wrapped as `{"output": ...}`,
    /// since `response` must be a JSON object).
    pub output: String,
}

/// `toolResponse` with these answers.
pub fn tool_response(responses: &[FunctionResponse]) -> String {
    let list: Vec<Value> = responses
        .iter()
        .map(|r| {
            let response = match serde_json::from_str::<Value>(&r.output) {
                Ok(v @ Value::Object(_)) => v,
                Ok(other) => json!({ "output": other }),
                Err(_) => json!({ "output": r.output }),
            };
            json!({"id": r.id, "name": r.name, "response": response})
        })
        .collect();
    json!({"toolResponse": {"functionResponses": list}}).to_string()
}

/// A function call the model asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionCall {
    /// Call id (quoted in the response and in cancellations).
    pub id: String,
    /// Function name.
    pub name: String,
    /// Arguments as JSON text (`{}` when absent).
    pub args: String,
}

/// `serverContent`: a piece of the model's turn, with its flags.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ServerContent {
    /// Audio parts of `modelTurn`, each with its rate (from `mimeType`, else 24 kHz).
    pub audio: Vec<(u32, Vec<i16>)>,
    /// Text parts of `modelTurn` (thoughts excluded).
    pub text: String,
    /// `inputTranscription.text`: more of the user's words.
    pub input_transcription: Option<String>,
    /// `outputTranscription.text`: more of the model's spoken words.
    pub output_transcription: Option<String>,
    /// The user interrupted the model: its generation stopped.
    pub interrupted: bool,
    /// The model finished generating (audio may still be in flight).
    pub generation_complete: bool,
    /// The model's turn is over.
    pub turn_complete: bool,
    /// `usageMetadata.totalTokenCount` beside it: the tokens of the generation it belongs to
    /// (prompt + response; Gemini API reference, Live API `UsageMetadata`).
    pub usage_tokens: Option<u64>,
}

/// A server message, by its one `messageType` field (`usageMetadata` beside `serverContent` is
/// [`ServerContent::usage_tokens`]; beside other types it is ignored).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ServerMessage {
    /// `setupComplete`: media may flow.
    SetupComplete,
    /// `serverContent`.
    Content(ServerContent),
    /// `toolCall.functionCalls`.
    ToolCall(Vec<FunctionCall>),
    /// `toolCallCancellation.ids`: calls whose results are no longer wanted.
    ToolCallCancellation(Vec<String>),
    /// `goAway`: the connection will be closed after `time_left`.
    GoAway {
        /// `timeLeft` (a protobuf Duration such as `"10s"`), when given and readable.
        time_left: Option<Duration>,
    },
    /// `sessionResumptionUpdate`.
    ResumptionUpdate {
        /// `newHandle` (None when empty or not resumable).
        handle: Option<String>,
        /// `lastConsumedClientMessageIndex`: the last client message (counted from 0 = `setup`
        /// on this connection) the handle's state includes.
        last_consumed: Option<u64>,
    },
    /// Only `usageMetadata`: its `totalTokenCount`.
    Usage(u64),
    /// A message type this module does not know.
    Other(String),
}

/// A protobuf JSON Duration (`"1.5s"`) as a [`Duration`]; `None` when it is not one, negative,
/// or beyond what a `Duration` holds (found by the `provider_events` fuzz target: a `goAway`
/// `timeLeft` of `"689888890088890066045932s"` panicked the session's provider task).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.trim().strip_suffix('s')?.parse().ok()?;
    Duration::try_from_secs_f64(secs).ok()
}

fn rate_of(mime: &str) -> u32 {
    mime.split(';')
        .filter_map(|p| p.trim().strip_prefix("rate="))
        .find_map(|r| r.parse().ok())
        .unwrap_or(OUTPUT_RATE_HZ)
}

fn text_of(v: &Value, field: &str) -> Option<String> {
    v.get(field)?.get("text")?.as_str().map(str::to_owned)
}

fn flag(v: &Value, field: &str) -> bool {
    v.get(field).and_then(Value::as_bool).unwrap_or(false)
}

fn server_content(c: &Value) -> Result<ServerContent, ProtocolError> {
    let mut out = ServerContent::default();
    let parts = c.pointer("/modelTurn/parts").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    for part in parts {
        if let Some(inline) = part.get("inlineData") {
            let mime = inline.get("mimeType").and_then(Value::as_str).unwrap_or_default();
            if mime.starts_with("audio/pcm") {
                let data = inline.get("data").and_then(Value::as_str).unwrap_or_default();
                out.audio.push((rate_of(mime), b64_to_pcm(data)?));
            }
        } else if let Some(t) = part.get("text").and_then(Value::as_str)
            && !flag(part, "thought")
        {
            out.text.push_str(t);
        }
    }
    out.input_transcription = text_of(c, "inputTranscription");
    out.output_transcription = text_of(c, "outputTranscription");
    out.interrupted = flag(c, "interrupted");
    out.generation_complete = flag(c, "generationComplete");
    out.turn_complete = flag(c, "turnComplete");
    Ok(out)
}

fn function_calls(v: &Value) -> Vec<FunctionCall> {
    let calls = v.get("functionCalls").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
    calls
        .iter()
        .map(|c| FunctionCall {
            id: c.get("id").and_then(Value::as_str).unwrap_or_default().to_owned(),
            name: c.get("name").and_then(Value::as_str).unwrap_or_default().to_owned(),
            args: c.get("args").filter(|a| !a.is_null()).map_or_else(|| "{}".to_owned(), Value::to_string),
        })
        .collect()
}

/// Parse one server frame (text or binary: the same JSON).
pub fn parse(frame: &[u8]) -> Result<ServerMessage, ProtocolError> {
    let v: Value = serde_json::from_slice(frame).map_err(|e| ProtocolError::Malformed(e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| ProtocolError::Malformed("not a JSON object".into()))?;
    if obj.contains_key("setupComplete") {
        return Ok(ServerMessage::SetupComplete);
    }
    let usage = obj.get("usageMetadata").and_then(|u| u.get("totalTokenCount")).and_then(Value::as_u64);
    if let Some(c) = obj.get("serverContent") {
        return Ok(ServerMessage::Content(ServerContent { usage_tokens: usage, ..server_content(c)? }));
    }
    if let Some(t) = obj.get("toolCall") {
        return Ok(ServerMessage::ToolCall(function_calls(t)));
    }
    if let Some(c) = obj.get("toolCallCancellation") {
        let ids = c.get("ids").and_then(Value::as_array).map(Vec::as_slice).unwrap_or_default();
        return Ok(ServerMessage::ToolCallCancellation(
            ids.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        ));
    }
    if let Some(g) = obj.get("goAway") {
        return Ok(ServerMessage::GoAway {
            time_left: g.get("timeLeft").and_then(Value::as_str).and_then(parse_duration),
        });
    }
    if let Some(u) = obj.get("sessionResumptionUpdate") {
        let resumable = flag(u, "resumable");
        let handle = u.get("newHandle").and_then(Value::as_str).filter(|h| resumable && !h.is_empty());
        // int64 in protobuf JSON may come as a string.
        let last = u.get("lastConsumedClientMessageIndex");
        let last_consumed = last.and_then(Value::as_u64).or_else(|| last?.as_str()?.parse().ok());
        return Ok(ServerMessage::ResumptionUpdate { handle: handle.map(str::to_owned), last_consumed });
    }
    match usage {
        Some(tokens) if obj.len() == 1 => Ok(ServerMessage::Usage(tokens)),
        _ => Ok(ServerMessage::Other(obj.keys().next().cloned().unwrap_or_default())),
    }
}

#[cfg(test)]
mod tests {
    //! Recorded messages, written from the Live API reference and the session guide.
    use super::*;

    fn params() -> SetupParams {
        SetupParams {
            model: "gemini-2.5-flash-native-audio-preview-12-2025".into(),
            instructions: "You are Aiko.".into(),
            voice: "Kore".into(),
            language: Some("en-US".into()),
            server_vad: true,
            input_transcription: true,
            output_transcription: true,
            tools: vec![ToolSpec {
                name: "get_time".into(),
                description: "time".into(),
                parameters: json!({"type": "object", "properties": {}}),
            }],
            resume_handle: None,
            compression: Some(Compression { trigger_tokens: Some(25_600), target_tokens: Some(12_800) }),
        }
    }

    #[test]
    fn setup_carries_the_whole_configuration() {
        let v: Value = serde_json::from_str(&setup(&params())).unwrap();
        let s = &v["setup"];
        assert_eq!(v.as_object().unwrap().len(), 1, "exactly one field per client message");
        assert_eq!(s["model"], "models/gemini-2.5-flash-native-audio-preview-12-2025");
        assert_eq!(s["generationConfig"]["responseModalities"], json!(["AUDIO"]));
        assert_eq!(s["generationConfig"]["speechConfig"]["voiceConfig"]["prebuiltVoiceConfig"]["voiceName"], "Kore");
        assert_eq!(s["generationConfig"]["speechConfig"]["languageCode"], "en-US");
        assert_eq!(s["systemInstruction"], json!({"parts": [{"text": "You are Aiko."}]}));
        assert_eq!(s["realtimeInputConfig"]["automaticActivityDetection"]["disabled"], false);
        assert_eq!(s["inputAudioTranscription"], json!({}));
        assert_eq!(s["outputAudioTranscription"], json!({}));
        assert_eq!(s["sessionResumption"], json!({"transparent": true}));
        assert_eq!(s["tools"][0]["functionDeclarations"][0]["name"], "get_time");
        assert_eq!(
            s["contextWindowCompression"],
            json!({"slidingWindow": {"targetTokens": "12800"}, "triggerTokens": "25600"})
        );

        let p = SetupParams {
            model: "models/m".into(),
            server_vad: false,
            input_transcription: false,
            tools: vec![],
            resume_handle: Some("h-1".into()),
            compression: None,
            language: None,
            ..params()
        };
        let s = serde_json::from_str::<Value>(&setup(&p)).unwrap()["setup"].clone();
        assert_eq!(s["model"], "models/m");
        assert_eq!(s["realtimeInputConfig"]["automaticActivityDetection"]["disabled"], true);
        assert_eq!(s["sessionResumption"], json!({"handle": "h-1", "transparent": true}));
        for absent in ["tools", "inputAudioTranscription", "contextWindowCompression"] {
            assert!(s.get(absent).is_none(), "{absent}");
        }
        assert!(s["generationConfig"]["speechConfig"].get("languageCode").is_none());
    }

    #[test]
    fn realtime_input_and_client_content() {
        let a: Value = serde_json::from_str(&audio(&[1, -2])).unwrap();
        assert_eq!(a["realtimeInput"]["audio"]["mimeType"], "audio/pcm;rate=16000");
        assert_eq!(b64_to_pcm(a["realtimeInput"]["audio"]["data"].as_str().unwrap()).unwrap(), vec![1, -2]);
        assert_eq!(
            serde_json::from_str::<Value>(&activity_start()).unwrap(),
            json!({"realtimeInput": {"activityStart": {}}})
        );
        assert_eq!(
            serde_json::from_str::<Value>(&activity_end()).unwrap(),
            json!({"realtimeInput": {"activityEnd": {}}})
        );
        let t: Value = serde_json::from_str(&user_text("Hello")).unwrap();
        assert_eq!(
            t,
            json!({"clientContent": {"turns": [{"role": "user", "parts": [{"text": "Hello"}]}], "turnComplete": true}})
        );
        let h: Value = serde_json::from_str(
            &history(&[HistoryItem::User("Hi".into()), HistoryItem::Agent("Hello!".into())]).unwrap(),
        )
        .unwrap();
        assert_eq!(h["clientContent"]["turnComplete"], false);
        assert_eq!(h["clientContent"]["turns"][1], json!({"role": "model", "parts": [{"text": "Hello!"}]}));
        assert_eq!(history(&[]), None);
    }

    #[test]
    fn tool_responses_are_objects() {
        let r: Value = serde_json::from_str(&tool_response(&[
            FunctionResponse { id: "c1".into(), name: "get_time".into(), output: r#"{"time":"10:00"}"#.into() },
            FunctionResponse { id: "c2".into(), name: "x".into(), output: "42".into() },
            FunctionResponse { id: "c3".into(), name: "y".into(), output: "not json".into() },
        ]))
        .unwrap();
        let list = &r["toolResponse"]["functionResponses"];
        assert_eq!(list[0], json!({"id": "c1", "name": "get_time", "response": {"time": "10:00"}}));
        assert_eq!(list[1]["response"], json!({"output": 42}));
        assert_eq!(list[2]["response"], json!({"output": "not json"}));
    }

    #[test]
    fn server_content_with_audio_transcripts_and_flags() {
        assert_eq!(parse(br#"{"setupComplete":{}}"#).unwrap(), ServerMessage::SetupComplete);
        let audio_msg = format!(
            r#"{{"serverContent":{{"modelTurn":{{"parts":[{{"inlineData":{{"mimeType":"audio/pcm;rate=24000","data":"{}"}}}},{{"text":"thinking...","thought":true}}]}}}}}}"#,
            pcm_to_b64(&[5, -5, 7])
        );
        let ServerMessage::Content(c) = parse(audio_msg.as_bytes()).unwrap() else { panic!() };
        assert_eq!(c.audio, vec![(24_000, vec![5, -5, 7])]);
        assert_eq!(c.text, "", "thoughts are not speech");
        assert!(!c.turn_complete && !c.interrupted);

        let tr = br#"{"serverContent":{"outputTranscription":{"text":" lovely day"}},"usageMetadata":{"totalTokenCount":120}}"#;
        let ServerMessage::Content(c) = parse(tr).unwrap() else { panic!() };
        assert_eq!(c.output_transcription.as_deref(), Some(" lovely day"));
        assert_eq!(c.usage_tokens, Some(120), "usage beside the content is kept");
        let tr = br#"{"serverContent":{"inputTranscription":{"text":"What is"}}}"#;
        let ServerMessage::Content(c) = parse(tr).unwrap() else { panic!() };
        assert_eq!(c.input_transcription.as_deref(), Some("What is"));

        let ServerMessage::Content(c) = parse(br#"{"serverContent":{"interrupted":true}}"#).unwrap() else { panic!() };
        assert!(c.interrupted);
        let done = br#"{"serverContent":{"generationComplete":true}}"#;
        let ServerMessage::Content(c) = parse(done).unwrap() else { panic!() };
        assert!(c.generation_complete && !c.turn_complete);
        let done = br#"{"serverContent":{"turnComplete":true},"usageMetadata":{"promptTokenCount":9}}"#;
        let ServerMessage::Content(c) = parse(done).unwrap() else { panic!() };
        assert!(c.turn_complete);

        let bad = br#"{"serverContent":{"modelTurn":{"parts":[{"inlineData":{"mimeType":"audio/pcm;rate=24000","data":"AA=="}}]}}}"#;
        assert!(matches!(parse(bad), Err(ProtocolError::BadAudio(_))));
        let ServerMessage::Content(c) = parse(
            format!(r#"{{"serverContent":{{"modelTurn":{{"parts":[{{"inlineData":{{"mimeType":"audio/pcm","data":"{}"}}}}]}}}}}}"#, pcm_to_b64(&[1]))
                .as_bytes(),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(c.audio[0].0, 24_000, "no rate in the mime type: 24 kHz");
    }

    #[test]
    fn tool_calls_cancellations_go_away_and_resumption() {
        let call = br#"{"toolCall":{"functionCalls":[{"id":"function-call-1","name":"set_emotion","args":{"emotion":"happy"}},{"id":"function-call-2","name":"get_time"}]}}"#;
        assert_eq!(
            parse(call).unwrap(),
            ServerMessage::ToolCall(vec![
                FunctionCall {
                    id: "function-call-1".into(),
                    name: "set_emotion".into(),
                    args: r#"{"emotion":"happy"}"#.into()
                },
                FunctionCall { id: "function-call-2".into(), name: "get_time".into(), args: "{}".into() },
            ])
        );
        assert_eq!(
            parse(br#"{"toolCallCancellation":{"ids":["function-call-2"]}}"#).unwrap(),
            ServerMessage::ToolCallCancellation(vec!["function-call-2".into()])
        );
        assert_eq!(
            parse(br#"{"goAway":{"timeLeft":"1.500s"}}"#).unwrap(),
            ServerMessage::GoAway { time_left: Some(Duration::from_millis(1500)) }
        );
        assert_eq!(parse(br#"{"goAway":{}}"#).unwrap(), ServerMessage::GoAway { time_left: None });
        assert_eq!(
            parse(br#"{"sessionResumptionUpdate":{"newHandle":"CiQ5","resumable":true,"lastConsumedClientMessageIndex":"17"}}"#)
                .unwrap(),
            ServerMessage::ResumptionUpdate { handle: Some("CiQ5".into()), last_consumed: Some(17) }
        );
        assert_eq!(
            parse(br#"{"sessionResumptionUpdate":{"resumable":false}}"#).unwrap(),
            ServerMessage::ResumptionUpdate { handle: None, last_consumed: None }
        );
        assert_eq!(parse(br#"{"usageMetadata":{"totalTokenCount":1}}"#).unwrap(), ServerMessage::Usage(1));
        assert!(matches!(parse(b"nope"), Err(ProtocolError::Malformed(_))));
        assert!(matches!(parse(b"[1]"), Err(ProtocolError::Malformed(_))));
        assert_eq!(parse_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_duration("-1s"), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("689888890088890066045932s"), None, "too big for a Duration: no panic");
        assert_eq!(parse_duration("NaNs"), None);
        assert_eq!(parse_duration("infs"), None);
    }
}
