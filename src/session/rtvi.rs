//! The Pipecat RTVI dialect: the messages `@pipecat-ai/client-js` exchanges with a bot over
//! `small-webrtc-transport`'s data channel (labelled [`DATA_CHANNEL_LABEL`], `chat`), on the same
//! session core (`../shared/docs/protocols.md`, "Pipecat client ... and RTVI", read from
//! client-js 1.13 `rtvi/messages.ts` and small-webrtc-transport 1.10 `smallWebRTCTransport.ts`).
//!
//! Every message is the RTVI 2.x envelope `{label:"rtvi-ai", type, id, data}` (JSON text). The
//! handshake: the client sends `client-ready {version, about}` once its transport is up and its
//! `connect()` waits, with no time limit, for `bot-ready {version}`. The link holds the session's
//! `EventsOpen` back until `client-ready` ([`EventCodec::handshake_done`]), so `session.ready`
//! (sent as `bot-ready`), the greeting and everything after it reach a client that listens.
//!
//! | api-v1 server event | RTVI message(s) |
//! |---|---|
//! | `session.ready` | `bot-ready {version:"2.1.0", about:{library:"kotodama", session_id, character, provider}}` |
//! | `state` thinking | `bot-llm-started` |
//! | `state` speaking | (`bot-llm-stopped`), `bot-started-speaking`, `bot-tts-started`, then once per reply `metrics {ttfb}` (seconds from the user's end of speech) |
//! | `state` listening / initializing | (`bot-llm-stopped`), (`bot-tts-stopped`, `bot-stopped-speaking`) |
//! | `user.speech_started` / `_stopped` | `user-started-speaking` / `user-stopped-speaking` |
//! | user `transcript` | `user-transcription {text, final, timestamp (RFC 3339), user_id:""}` |
//! | agent `transcript` partial (cumulative) | `bot-tts-text {text: the new words}` |
//! | agent `transcript` final | the last new words, then `bot-output {text, spoken:true, will_be_spoken:true, aggregated_by:"sentence"}` |
//! | `agent.interrupted {item_id, played_ms}` | `bot-interrupted {item_id, played_ms}` (+ the stop events when speaking) |
//! | `error {code, message}` | `error {error: message, message, code, fatal:false}` |
//! | `pong` | nothing (the transport's keep-alive is a raw string, not answered) |
//! | `tool.call {call_id, name, arguments}` | `llm-function-call-started {function_name}`, `llm-function-call-in-progress {function_name, tool_call_id, arguments}` (client-js runs the callback registered with `registerFunctionCallHandler`) |
//! | every other event (`emotion`, `viseme`, `gesture`, `moderation`, `agent_notification`, `session.ended`) | `server-message {data: the api-v1 event}` |
//!
//! Client messages: `client-ready` (handshake), `send-text {content}` (a typed user turn),
//! `client-message {t, d}` (acknowledged with `server-response {t, d:null}` under the request's
//! `id`; `t: "session.update"` with api-v1's `session.update` fields in `d` is how an RTVI client
//! declares its tools, other `t` are not acted on), `llm-function-call-result {tool_call_id,
//! result}` (api-v1 `tool.output`, answered `llm-function-call-stopped`), `disconnect-bot` (ends
//! the session), `dtmf`, `ui-*` and `append-to-context` (ignored). Another `type` is
//! answered `error-response {error}` under its `id`. The transport's raw `ping: <ms>` strings
//! (every second) and its `{"type":"signalling",...}` messages (`trackStatus`) are ignored without
//! an error event; malformed JSON is an `error` event as in api-v1.
//!
//! Not mapped (no event on the seam yet): `user-audio-level`/`bot-audio-level`; the
//! `llm-function-call-*` messages are sent for the client's own tools only (the character's
//! server-side tools run inside the provider and are not reported).

use std::time::Instant;

use serde_json::{Value, json};
use signaling::events::{AgentState, ClientEvent, EventError, MAX_CLIENT_MESSAGE, Role, ServerEvent};

use super::link::EventCodec;

/// The data-channel label small-webrtc-transport opens (`createDataChannel("chat")`).
pub const DATA_CHANNEL_LABEL: &str = "chat";
/// The `label` of every RTVI message.
pub const MESSAGE_LABEL: &str = "rtvi-ai";
/// The RTVI protocol version this server speaks (`bot-ready {version}`; client-js 1.13 warns
/// below major version 2).
pub const PROTOCOL_VERSION: &str = "2.1.0";

/// RTVI messages for api-v1 events (see the module docs).
#[derive(Debug)]
pub struct RtviCodec {
    /// `client-ready` arrived.
    client_ready: bool,
    /// Messages owed to the client for what it sent (responses), drained by the link.
    replies: Vec<String>,
    /// `disconnect-bot` arrived.
    end: bool,
    /// Numbering of the server's own message ids.
    next_id: u64,
    /// The bot is speaking (`bot-started-speaking` went out without its stop).
    speaking: bool,
    /// The model is working on a reply (`bot-llm-started` went out without its stop).
    thinking: bool,
    /// The reply whose text is being streamed, and how many bytes of it went out.
    reply: Option<(String, usize)>,
    /// The reply last cut by barge-in: its closing (heard) transcript is not streamed again.
    cut: Option<String>,
    /// When the user's last utterance ended: the next `speaking` reports `metrics {ttfb}`.
    turn_end: Option<Instant>,
}

impl Default for RtviCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl RtviCodec {
    /// A codec for one client connection (before `client-ready`).
    pub fn new() -> Self {
        Self {
            client_ready: false,
            replies: Vec::new(),
            end: false,
            next_id: 0,
            speaking: false,
            thinking: false,
            reply: None,
            cut: None,
            turn_end: None,
        }
    }

    /// One envelope with a fresh server id.
    fn message(&mut self, kind: &str, data: Value) -> String {
        self.next_id += 1;
        let id = format!("kd-{}", self.next_id);
        envelope(kind, &id, data)
    }

    fn push(&mut self, out: &mut Vec<String>, kind: &str, data: Value) {
        let msg = self.message(kind, data);
        out.push(msg);
    }

    fn stop_thinking(&mut self, out: &mut Vec<String>) {
        if std::mem::take(&mut self.thinking) {
            self.push(out, "bot-llm-stopped", json!({}));
        }
    }

    fn stop_speaking(&mut self, out: &mut Vec<String>) {
        if std::mem::take(&mut self.speaking) {
            self.push(out, "bot-tts-stopped", json!({}));
            self.push(out, "bot-stopped-speaking", json!({}));
        }
    }

    fn state(&mut self, state: AgentState, out: &mut Vec<String>) {
        match state {
            AgentState::Thinking => {
                if !std::mem::replace(&mut self.thinking, true) {
                    self.push(out, "bot-llm-started", json!({}));
                }
            }
            AgentState::Speaking => {
                self.stop_thinking(out);
                if !std::mem::replace(&mut self.speaking, true) {
                    self.push(out, "bot-started-speaking", json!({}));
                    self.push(out, "bot-tts-started", json!({}));
                }
                if let Some(end) = self.turn_end.take() {
                    let ttfb = end.elapsed().as_secs_f64();
                    self.push(out, "metrics", json!({"ttfb": [{"processor": "kotodama", "value": ttfb}]}));
                }
            }
            _ => {
                self.stop_thinking(out);
                self.stop_speaking(out);
            }
        }
    }

    /// The new words of agent transcript `text` of `item_id` as `bot-tts-text` (if any).
    fn agent_text(&mut self, item_id: &str, text: &str, out: &mut Vec<String>) {
        if self.reply.as_ref().is_none_or(|(id, _)| id != item_id) {
            self.reply = Some((item_id.to_owned(), 0));
        }
        let Some((_, sent)) = self.reply.as_mut() else { return };
        // Partials are cumulative; a text that does not extend what was sent restarts it.
        let start = if *sent <= text.len() && text.is_char_boundary(*sent) { *sent } else { 0 };
        *sent = text.len();
        let delta = &text[start..];
        if !delta.is_empty() {
            self.push(out, "bot-tts-text", json!({ "text": delta }));
        }
    }

    /// Answer request `id` (a client message that expects a response).
    fn reply_to(&mut self, kind: &str, id: &str, data: Value) {
        self.replies.push(envelope(kind, id, data));
    }
}

/// `{label:"rtvi-ai", type, id, data}`.
fn envelope(kind: &str, id: &str, data: Value) -> String {
    json!({"label": MESSAGE_LABEL, "type": kind, "id": id, "data": data}).to_string()
}

/// Now as RFC 3339 (RTVI `user-transcription.timestamp` is an ISO 8601 string).
fn timestamp() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

impl EventCodec for RtviCodec {
    fn name(&self) -> &'static str {
        "rtvi"
    }

    fn encode(&mut self, ev: &ServerEvent, out: &mut Vec<String>) {
        match ev {
            ServerEvent::SessionReady { session_id, character, provider, .. } => {
                let about = json!({"library": "kotodama", "library_version": env!("CARGO_PKG_VERSION"),
                                   "session_id": session_id, "character": character, "provider": provider});
                self.push(out, "bot-ready", json!({"version": PROTOCOL_VERSION, "about": about}));
            }
            ServerEvent::State { state } => self.state(*state, out),
            ServerEvent::UserSpeechStarted { .. } => self.push(out, "user-started-speaking", json!({})),
            ServerEvent::UserSpeechStopped { .. } => {
                self.turn_end = Some(Instant::now());
                self.push(out, "user-stopped-speaking", json!({}));
            }
            ServerEvent::Transcript { role: Role::User, text, is_final, .. } => {
                let data = json!({"text": text, "final": is_final, "timestamp": timestamp(), "user_id": ""});
                self.push(out, "user-transcription", data);
            }
            ServerEvent::Transcript { role: Role::Agent, item_id, .. } if self.cut.as_ref() == Some(item_id) => {}
            ServerEvent::Transcript { role: Role::Agent, item_id, text, is_final } => {
                self.agent_text(item_id, text, out);
                if *is_final {
                    self.reply = None;
                    let data = json!({"text": text, "spoken": true, "will_be_spoken": true,
                                      "aggregated_by": "sentence"});
                    self.push(out, "bot-output", data);
                }
            }
            ServerEvent::AgentInterrupted { item_id, played_ms } => {
                self.reply = None;
                self.cut = Some(item_id.clone());
                self.push(out, "bot-interrupted", json!({"item_id": item_id, "played_ms": played_ms}));
                self.stop_speaking(out);
            }
            ServerEvent::Error { code, message } => {
                self.push(out, "error", json!({"error": message, "message": message, "code": code, "fatal": false}));
            }
            ServerEvent::Pong => {}
            ServerEvent::ToolCall { call_id, name, arguments } => {
                let args: Value = serde_json::from_str(arguments).unwrap_or_else(|_| json!({}));
                self.push(out, "llm-function-call-started", json!({"function_name": name}));
                let data = json!({"function_name": name, "tool_call_id": call_id, "arguments": args});
                self.push(out, "llm-function-call-in-progress", data);
            }
            other => {
                let data: Value = serde_json::from_str(&other.to_json()).unwrap_or(Value::Null);
                self.push(out, "server-message", data);
            }
        }
    }

    fn decode(&mut self, msg: &[u8]) -> Result<Option<ClientEvent>, EventError> {
        if msg.len() > MAX_CLIENT_MESSAGE {
            return Err(EventError::TooLarge { len: msg.len(), limit: MAX_CLIENT_MESSAGE });
        }
        // small-webrtc-transport's keep-alive: the raw text `ping: <ms since epoch>`.
        if msg.starts_with(b"ping:") {
            return Ok(None);
        }
        let text = std::str::from_utf8(msg).map_err(|_| EventError::NotUtf8)?;
        let v: Value = serde_json::from_str(text).map_err(|e| EventError::NotJson(e.to_string()))?;
        let object = v.as_object().ok_or(EventError::NotObject)?;
        let kind = match object.get("type") {
            None => return Err(EventError::MissingType),
            Some(Value::String(kind)) => kind.as_str(),
            Some(_) => return Err(EventError::TypeNotString),
        };
        // Transport messages (`signalling {message:{type:"trackStatus"}}`) and anything without
        // the RTVI label are not RTVI's.
        if kind == "signalling" || object.get("label").and_then(Value::as_str) != Some(MESSAGE_LABEL) {
            return Ok(None);
        }
        let id = object.get("id").and_then(Value::as_str).unwrap_or_default();
        let data = object.get("data").unwrap_or(&Value::Null);
        let bad = |reason: &str| EventError::BadFields { kind: kind.to_owned(), reason: reason.to_owned() };
        Ok(match kind {
            "client-ready" => {
                self.client_ready = true;
                None
            }
            "send-text" => match data.get("content") {
                Some(Value::String(content)) if !content.trim().is_empty() => {
                    Some(ClientEvent::Text { text: content.clone() })
                }
                _ => return Err(bad("data.content must be a non-empty string")),
            },
            "client-message" => {
                let t = data.get("t").and_then(Value::as_str).ok_or_else(|| bad("data.t must be a string"))?;
                let update = if t == "session.update" {
                    // The api-v1 `session.update` fields in `d` (how an RTVI client declares tools).
                    let d = data.get("d").cloned().unwrap_or_else(|| json!({}));
                    let mut msg = d.as_object().cloned().ok_or_else(|| bad("data.d must be an object"))?;
                    msg.insert("type".into(), "session.update".into());
                    let ev = serde_json::from_value::<ClientEvent>(Value::Object(msg));
                    Some(ev.map_err(|e| bad(&format!("data.d is no session.update: {e}")))?)
                } else {
                    None
                };
                let response = json!({"t": t, "d": null});
                self.reply_to("server-response", id, response);
                update
            }
            "llm-function-call-result" => {
                let call_id = data.get("tool_call_id").and_then(Value::as_str);
                let call_id = call_id.filter(|c| !c.is_empty()).ok_or_else(|| bad("data.tool_call_id is required"))?;
                let result = data.get("result").cloned().unwrap_or(Value::Null);
                let output = match &result {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                };
                let stopped = json!({"function_name": data.get("function_name"), "tool_call_id": call_id,
                                     "cancelled": false, "result": result});
                let msg = self.message("llm-function-call-stopped", stopped);
                self.replies.push(msg);
                Some(ClientEvent::ToolOutput { call_id: call_id.to_owned(), output })
            }
            "disconnect-bot" => {
                self.end = true;
                None
            }
            "dtmf" | "append-to-context" | "ui-event" | "ui-snapshot" | "ui-cancel-job-group" => None,
            other => {
                let error = format!("kotodama does not handle RTVI `{other}` messages");
                self.reply_to("error-response", id, json!({ "error": error }));
                None
            }
        })
    }

    fn handshake_done(&self) -> bool {
        self.client_ready
    }

    fn take_replies(&mut self, out: &mut Vec<String>) {
        out.append(&mut self.replies);
    }

    fn end_requested(&self) -> bool {
        self.end
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::link::codec_test_support::{agent, enc, types};

    #[test]
    fn handshake_waits_for_client_ready_and_answers_bot_ready_in_the_envelope() {
        let mut c = RtviCodec::new();
        assert!(!c.handshake_done());
        assert_eq!(c.decode(b"ping: 1764480000000").unwrap(), None, "keep-alive ignored");
        let track = br#"{"type":"signalling","message":{"type":"trackStatus","receiver_index":0,"enabled":true}}"#;
        assert_eq!(c.decode(track).unwrap(), None, "signalling ignored");
        assert!(!c.handshake_done());
        let ready = br#"{"label":"rtvi-ai","type":"client-ready","id":"a1","data":{"version":"2.1.0","about":{"library":"@pipecat-ai/client-js"}}}"#;
        assert_eq!(c.decode(ready).unwrap(), None);
        assert!(c.handshake_done());
        let m = enc(&mut c, ServerEvent::session_ready("sess_1", "aiko", "scripted"));
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["label"], "rtvi-ai");
        assert_eq!(m[0]["type"], "bot-ready");
        assert_eq!(m[0]["data"]["version"], PROTOCOL_VERSION);
        assert_eq!(m[0]["data"]["about"]["session_id"], "sess_1");
        assert!(m[0]["id"].as_str().is_some_and(|id| !id.is_empty()));
    }

    #[test]
    fn a_spoken_turn_maps_to_speaking_transcription_and_bot_output() {
        let mut c = RtviCodec::new();
        assert_eq!(types(&enc(&mut c, ServerEvent::UserSpeechStarted { at_ms: 10 })), ["user-started-speaking"]);
        assert_eq!(types(&enc(&mut c, ServerEvent::UserSpeechStopped { at_ms: 900 })), ["user-stopped-speaking"]);
        let u = enc(
            &mut c,
            ServerEvent::Transcript { role: Role::User, item_id: "u1".into(), text: "hello".into(), is_final: true },
        );
        assert_eq!(u[0]["type"], "user-transcription");
        assert_eq!((u[0]["data"]["text"].as_str(), u[0]["data"]["final"].as_bool()), (Some("hello"), Some(true)));
        assert!(u[0]["data"]["timestamp"].as_str().unwrap().contains('T'), "RFC 3339: {}", u[0]);
        assert_eq!(types(&enc(&mut c, ServerEvent::State { state: AgentState::Thinking })), ["bot-llm-started"]);
        let speaking = enc(&mut c, ServerEvent::State { state: AgentState::Speaking });
        assert_eq!(types(&speaking), ["bot-llm-stopped", "bot-started-speaking", "bot-tts-started", "metrics"]);
        assert!(speaking[3]["data"]["ttfb"][0]["value"].as_f64().unwrap() >= 0.0);
        let a = enc(&mut c, agent("r1", "Hi!", false));
        assert_eq!((a[0]["type"].as_str(), a[0]["data"]["text"].as_str()), (Some("bot-tts-text"), Some("Hi!")));
        let b = enc(&mut c, agent("r1", "Hi! I am Aiko.", true));
        assert_eq!(types(&b), ["bot-tts-text", "bot-output"]);
        assert_eq!(b[0]["data"]["text"], " I am Aiko.", "only the new words");
        assert_eq!(b[1]["data"]["text"], "Hi! I am Aiko.");
        assert_eq!(b[1]["data"]["spoken"], true);
        let done = enc(&mut c, ServerEvent::State { state: AgentState::Listening });
        assert_eq!(types(&done), ["bot-tts-stopped", "bot-stopped-speaking"]);
        assert!(enc(&mut c, ServerEvent::State { state: AgentState::Listening }).is_empty(), "stops sent once");
    }

    #[test]
    fn barge_in_is_bot_interrupted_and_the_cut_reply_is_not_resent() {
        let mut c = RtviCodec::new();
        enc(&mut c, ServerEvent::State { state: AgentState::Speaking });
        enc(&mut c, agent("r2", "Once upon", false));
        let cut = enc(&mut c, ServerEvent::AgentInterrupted { item_id: "r2".into(), played_ms: 240 });
        assert_eq!(types(&cut), ["bot-interrupted", "bot-tts-stopped", "bot-stopped-speaking"]);
        assert_eq!(cut[0]["data"]["played_ms"], 240);
        assert!(enc(&mut c, agent("r2", "Once", true)).is_empty(), "the heard text of a cut reply is not resent");
    }

    #[test]
    fn extensions_go_out_as_server_message_and_errors_as_error() {
        let mut c = RtviCodec::new();
        let e = enc(&mut c, ServerEvent::Emotion { emotion: signaling::events::Emotion::Happy, item_id: None });
        assert_eq!((e[0]["type"].as_str(), e[0]["data"]["type"].as_str()), (Some("server-message"), Some("emotion")));
        assert_eq!(e[0]["data"]["emotion"], "happy");
        let err = enc(&mut c, ServerEvent::Error { code: "bad_message".into(), message: "nope".into() });
        assert_eq!(err[0]["type"], "error");
        assert_eq!((err[0]["data"]["error"].as_str(), err[0]["data"]["fatal"].as_bool()), (Some("nope"), Some(false)));
        assert!(enc(&mut c, ServerEvent::Pong).is_empty());
        let ids: Vec<&str> = [&e[0], &err[0]].iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert_ne!(ids[0], ids[1], "each server message has its own id");
    }

    #[test]
    fn client_messages_decode_and_requests_get_responses_under_their_id() {
        let mut c = RtviCodec::new();
        let text = br#"{"label":"rtvi-ai","type":"send-text","id":"s1","data":{"content":"tell me a story","options":{"audio_response":true}}}"#;
        assert_eq!(c.decode(text).unwrap(), Some(ClientEvent::Text { text: "tell me a story".into() }));
        let empty = br#"{"label":"rtvi-ai","type":"send-text","id":"s2","data":{}}"#;
        assert_eq!(c.decode(empty).unwrap_err().code(), "bad_message");

        let ask = br#"{"label":"rtvi-ai","type":"client-message","id":"q7","data":{"t":"get-mood","d":{}}}"#;
        assert_eq!(c.decode(ask).unwrap(), None);
        let odd = br#"{"label":"rtvi-ai","type":"update-config","id":"q8","data":{}}"#;
        assert_eq!(c.decode(odd).unwrap(), None);
        let mut replies = Vec::new();
        c.take_replies(&mut replies);
        let replies: Vec<Value> = replies.iter().map(|r| serde_json::from_str(r).unwrap()).collect();
        assert_eq!(replies.len(), 2);
        assert_eq!((replies[0]["type"].as_str(), replies[0]["id"].as_str()), (Some("server-response"), Some("q7")));
        assert_eq!(replies[0]["data"]["t"], "get-mood");
        assert_eq!((replies[1]["type"].as_str(), replies[1]["id"].as_str()), (Some("error-response"), Some("q8")));
        let mut again = Vec::new();
        c.take_replies(&mut again);
        assert!(again.is_empty(), "replies are drained");

        assert!(!c.end_requested());
        let bye = br#"{"label":"rtvi-ai","type":"disconnect-bot","id":"d1","data":{}}"#;
        assert_eq!(c.decode(bye).unwrap(), None);
        assert!(c.end_requested());

        assert_eq!(c.decode(b"{").unwrap_err().code(), "invalid_json");
        assert_eq!(c.decode(b"[1]").unwrap_err().code(), "not_an_object");
        let big = vec![b' '; MAX_CLIENT_MESSAGE + 1];
        assert_eq!(c.decode(&big).unwrap_err().code(), "message_too_large");
    }

    #[test]
    fn client_tools_are_declared_called_and_answered_in_rtvi_terms() {
        let mut c = RtviCodec::new();
        let declare = json!({"label": "rtvi-ai", "type": "client-message", "id": "m1",
            "data": {"t": "session.update", "d": {"tools": [{"name": "get_weather", "parameters": {"type": "object"}}]}}});
        let Some(ClientEvent::SessionUpdate { tools: Some(tools), .. }) =
            c.decode(declare.to_string().as_bytes()).unwrap()
        else {
            panic!("a session update")
        };
        assert_eq!(tools[0].name, "get_weather");
        let mut out = Vec::new();
        let call = ServerEvent::ToolCall {
            call_id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Oslo"}"#.into(),
        };
        c.encode(&call, &mut out);
        let out: Vec<Value> = out.iter().map(|m| serde_json::from_str(m).unwrap()).collect();
        assert_eq!(out[0]["type"], "llm-function-call-started");
        assert_eq!(out[1]["type"], "llm-function-call-in-progress");
        assert_eq!(
            (out[1]["data"]["tool_call_id"].as_str(), out[1]["data"]["arguments"]["city"].as_str()),
            (Some("call_1"), Some("Oslo"))
        );
        let result = json!({"label": "rtvi-ai", "type": "llm-function-call-result", "id": "r1",
            "data": {"function_name": "get_weather", "tool_call_id": "call_1", "arguments": {}, "result": {"sky": "clear"}}});
        assert_eq!(
            c.decode(result.to_string().as_bytes()).unwrap(),
            Some(ClientEvent::ToolOutput { call_id: "call_1".into(), output: r#"{"sky":"clear"}"#.into() })
        );
        let mut replies = Vec::new();
        c.take_replies(&mut replies);
        let stopped: Value = serde_json::from_str(replies.last().unwrap()).unwrap();
        assert_eq!(
            (stopped["type"].as_str(), stopped["data"]["cancelled"].as_bool()),
            (Some("llm-function-call-stopped"), Some(false))
        );
    }
}
