//! The N.E.K.O. dialect (`/ws/{character}`): N.E.K.O.'s own WebSocket messages on the same session
//! core (`../shared/docs/protocols.md`, "N.E.K.O. WebSocket protocol", from its router and
//! frontend source).
//!
//! The socket side is [`super::ws_link`] in its N.E.K.O. mode (audio in as `stream_data` JSON
//! arrays of int16 samples, audio out as `audio_chunk {speech_id}` + one binary PCM16 LE 48 kHz
//! frame per 20 ms). This codec maps the events:
//!
//! | api-v1 server event | N.E.K.O. message |
//! |---|---|
//! | `session.ready` | `session_started {input_mode:"audio"}` |
//! | agent `transcript` (partial: cumulative) | `gemini_response {text: the new words, isNewMessage, turn_id, request_id}`, `isNewMessage: true` once per reply |
//! | agent `transcript` (final) | the last new words, then `system {data:"turn end"}` |
//! | user `transcript` (final) | `user_transcript {text}` |
//! | `agent.interrupted {item_id}` | `user_activity {interrupted_speech_id: item_id}` (the `speech_id` of its audio) |
//! | `emotion` | `emotion {emotion}` |
//! | `error {code, message}` | `status {message: "<JSON {code, details}>"}` |
//! | `pong` | `pong` |
//! | `session.ended {reason}` | `session_ended_by_server {reason}` |
//!
//! Client actions decoded here: `stream_data {input_type:"text", data}` (a typed turn),
//! `stream_data {input_type:"screen"|"camera", data: "data:image/jpeg;base64,..."}` (an api-v1
//! `image`: to models that take images, else one `status` `images_unsupported`),
//! `language_update {language}` and `start_session {language}` (the user's language, api-v1
//! `session.update`: agent text is then translated for it, [`crate::translation`]) and `ping`;
//! the socket reader handles `stream_data` audio, `end_session` and unknown actions.
//! N.E.K.O. has no message for a translation, so `transcript.translation` is not sent to it.

use serde_json::{Value, json};
use signaling::events::{ClientEvent, EventError, Role, ServerEvent};

use super::link::EventCodec;

/// N.E.K.O. messages for api-v1 events (see the module docs).
#[derive(Debug, Default)]
pub struct NekoCodec {
    /// The reply whose text is being streamed, and how much of it went out.
    reply: Option<(String, usize)>,
    /// The reply last cut by barge-in: the client dropped it, so its closing transcript (the
    /// heard text) is not streamed again.
    cut: Option<String>,
}

impl NekoCodec {
    /// The new words of agent transcript `text` of `item_id` as `gemini_response` (if any).
    fn agent_text(&mut self, item_id: &str, text: &str, out: &mut Vec<String>) {
        let new_message = self.reply.as_ref().is_none_or(|(id, _)| id != item_id);
        if new_message {
            self.reply = Some((item_id.to_owned(), 0));
        }
        let Some((_, sent)) = self.reply.as_mut() else { return };
        // Partials are cumulative; a text that does not extend what was sent restarts it.
        let start = if text.is_char_boundary(*sent) && *sent <= text.len() { *sent } else { 0 };
        let delta = &text[start..];
        *sent = text.len();
        if delta.is_empty() && !new_message {
            return;
        }
        out.push(
            json!({"type": "gemini_response", "text": delta, "isNewMessage": new_message,
                   "turn_id": item_id, "request_id": item_id})
            .to_string(),
        );
    }
}

impl EventCodec for NekoCodec {
    fn name(&self) -> &'static str {
        "neko"
    }

    fn encode(&mut self, ev: &ServerEvent, out: &mut Vec<String>) {
        let msg = match ev {
            ServerEvent::SessionReady { .. } => json!({"type": "session_started", "input_mode": "audio"}),
            ServerEvent::Transcript { role: Role::Agent, item_id, .. } if self.cut.as_ref() == Some(item_id) => {
                return;
            }
            ServerEvent::Transcript { role: Role::Agent, item_id, text, is_final } => {
                self.agent_text(item_id, text, out);
                if !*is_final {
                    return;
                }
                self.reply = None;
                json!({"type": "system", "data": "turn end"})
            }
            ServerEvent::Transcript { role: Role::User, text, is_final: true, .. } => {
                json!({"type": "user_transcript", "text": text})
            }
            ServerEvent::AgentInterrupted { item_id, .. } => {
                self.reply = None;
                self.cut = Some(item_id.clone());
                json!({"type": "user_activity", "interrupted_speech_id": item_id})
            }
            ServerEvent::Emotion { emotion, .. } => json!({"type": "emotion", "emotion": emotion}),
            ServerEvent::Error { code, message } => {
                json!({"type": "status", "message": json!({"code": code, "details": message}).to_string()})
            }
            ServerEvent::Pong => json!({"type": "pong"}),
            ServerEvent::SessionEnded { reason } => json!({"type": "session_ended_by_server", "reason": reason}),
            ServerEvent::AgentNotification { text, source, status } => {
                json!({"type": "agent_notification", "text": text, "source": source, "status": status})
            }
            _ => return,
        };
        out.push(msg.to_string());
    }

    fn decode(&mut self, msg: &[u8]) -> Result<Option<ClientEvent>, EventError> {
        let v: Value = serde_json::from_slice(msg).map_err(|e| EventError::NotJson(e.to_string()))?;
        Ok(match (v["action"].as_str(), v["input_type"].as_str(), &v["data"]) {
            (Some("stream_data"), Some("text"), Value::String(text)) => Some(ClientEvent::Text { text: text.clone() }),
            (Some("stream_data"), Some("screen" | "camera"), Value::String(data)) => {
                Some(ClientEvent::Image { data: data.clone() })
            }
            (Some("language_update" | "start_session"), _, _) => {
                let language = v["language"].as_str().or(v["data"]["language"].as_str());
                language.map(|l| ClientEvent::SessionUpdate {
                    language: Some(l.to_owned()),
                    instructions: None,
                    voice: None,
                    tools: None,
                })
            }
            (Some("ping"), _, _) => Some(ClientEvent::Ping),
            _ => None,
        })
    }
}

/// A `status` message (N.E.K.O.'s JSON-encoded `{code, details}` inside `message`).
pub fn status(code: &str, details: &str) -> String {
    json!({"type": "status", "message": json!({"code": code, "details": details}).to_string()}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::link::codec_test_support::{agent, enc};

    #[test]
    fn one_new_message_per_reply_with_the_new_words_then_turn_end() {
        let mut c = NekoCodec::default();
        let a = enc(&mut c, agent("r1", "Hi!", false));
        assert_eq!((a[0]["text"].as_str(), a[0]["isNewMessage"].as_bool()), (Some("Hi!"), Some(true)));
        let b = enc(&mut c, agent("r1", "Hi! I am", false));
        assert_eq!((b[0]["text"].as_str(), b[0]["isNewMessage"].as_bool()), (Some(" I am"), Some(false)));
        let f = enc(&mut c, agent("r1", "Hi! I am Aiko.", true));
        assert_eq!(f[0]["text"], " Aiko.");
        assert_eq!(f[1], json!({"type": "system", "data": "turn end"}));
        let n = enc(&mut c, agent("r2", "Again", false));
        assert_eq!(n[0]["isNewMessage"], true, "a new reply is a new message");
        let cut = enc(&mut c, ServerEvent::AgentInterrupted { item_id: "r2".into(), played_ms: 200 });
        assert_eq!(cut[0], json!({"type": "user_activity", "interrupted_speech_id": "r2"}));
        assert!(enc(&mut c, agent("r2", "Ag", true)).is_empty(), "the cut reply's heard text is not resent");
    }

    #[test]
    fn status_carries_json_encoded_code_and_details() {
        let mut c = NekoCodec::default();
        let s = enc(&mut c, ServerEvent::Error { code: "busy".into(), message: "try again".into() });
        let inner: Value = serde_json::from_str(s[0]["message"].as_str().unwrap()).unwrap();
        assert_eq!(inner, json!({"code": "busy", "details": "try again"}));
        let text = br#"{"action":"stream_data","input_type":"text","data":"hello"}"#;
        assert_eq!(c.decode(text).unwrap(), Some(ClientEvent::Text { text: "hello".into() }));
        assert_eq!(c.decode(br#"{"action":"ping"}"#).unwrap(), Some(ClientEvent::Ping));
        assert_eq!(c.decode(br#"{"action":"voice_play_start"}"#).unwrap(), None);
        let screen = br#"{"action":"stream_data","input_type":"screen","data":"data:image/jpeg;base64,/9j/"}"#;
        assert_eq!(c.decode(screen).unwrap(), Some(ClientEvent::Image { data: "data:image/jpeg;base64,/9j/".into() }));
        let lang = br#"{"action":"language_update","language":"ja"}"#;
        assert_eq!(
            c.decode(lang).unwrap(),
            Some(ClientEvent::SessionUpdate {
                language: Some("ja".into()),
                instructions: None,
                voice: None,
                tools: None
            })
        );
        assert_eq!(c.decode(br#"{"action":"start_session","input_type":"audio"}"#).unwrap(), None);
    }
}
