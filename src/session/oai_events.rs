//! The `oai-events` dialect: OpenAI Realtime's GA server and client events on the WebRTC data
//! channel the OpenAI Agents SDK (`@openai/agents-realtime`, `OpenAIRealtimeWebRTC`) and
//! openai-node open (`../shared/docs/protocols.md`, "OpenAI Realtime over WebRTC"; event shapes
//! from developers.openai.com/api/reference/resources/realtime/server-events and the SDK's own
//! `openaiRealtimeEvents` schemas, which it validates every event against and silently drops
//! what fails).
//!
//! Every server message carries a string `event_id` (`event_<n>`); items carry `item_id`,
//! responses `response_id`, `output_index` 0 and `content_index` 0 (one audio part per reply).
//!
//! | api-v1 server event | oai-events messages |
//! |---|---|
//! | `session.ready` | `session.created {session}` |
//! | `user.speech_started` | `input_audio_buffer.speech_started {item_id, audio_start_ms}` (a new user item) |
//! | `user.speech_stopped` | `input_audio_buffer.speech_stopped`, `input_audio_buffer.committed`, `conversation.item.added` + `.done` (user item, `content:[{type:"input_audio", transcript:null}]`) |
//! | user `transcript` | `conversation.item.input_audio_transcription.delta` (new words), final: `...completed {transcript}` |
//! | `state: speaking` | `response.created`, `output_audio_buffer.started {response_id}` |
//! | agent `transcript` (partial) | first: `response.output_item.added`, `conversation.item.added`, `response.content_part.added`; then `response.output_audio_transcript.delta` (new words) |
//! | agent `transcript` (final: what was heard) | `response.output_audio.done`, `response.output_audio_transcript.done`, `response.content_part.done`, `response.output_item.done`, `conversation.item.done` (`content:[{type:"output_audio", transcript}]`), `response.done` |
//! | `agent.interrupted {item_id, played_ms}` | `output_audio_buffer.cleared`, `conversation.item.truncated {item_id, content_index:0, audio_end_ms: played_ms}` (the response then ends `cancelled`) |
//! | `state: listening` after speaking | `output_audio_buffer.stopped {response_id}` (unless cleared) |
//! | `error {code, message}` | `error {error:{type:"invalid_request_error", code, message}}` |
//! | `tool.call {call_id, name, arguments}` | a `function_call` item: `response.output_item.added` (in progress), `conversation.item.added`, `response.function_call_arguments.delta` / `.done`, `response.output_item.done` (completed: the SDK runs its tool on it), `conversation.item.done`; in a `response.created` ... `response.done` of its own unless a spoken reply is open |
//! | `emotion`, `viseme`, `gesture`, `moderation`, `agent_notification`, `session.ended` | `kotodama.<type>` with the api-v1 fields (the SDK hands unknown events to `transport.on("*")`) |
//!
//! Client events decoded: `session.update` (what changed of `instructions`, `audio.output.voice`
//! and the function `tools` becomes api-v1 `session.update`, which the provider applies where it
//! can; acknowledged with `session.updated` carrying the session as it runs, see [`OaiSession`]),
//! `conversation.item.create` of a user message (`input_text`: a typed turn; acknowledged with
//! `conversation.item.added` + `.done`) or of a `function_call_output` (api-v1 `tool.output`:
//! the model continues once every call of its response is answered, so the SDK's following
//! `response.create` needs no action), `response.cancel` and the WebRTC-only
//! `output_audio_buffer.clear` (both: interrupt), `conversation.item.retrieve` (answered with
//! `conversation.item.retrieved`, or an `error` naming the unknown item). Others
//! (`response.create`: replies follow every committed turn; `conversation.item.truncate`: the
//! server truncates at what it played; `input_audio_buffer.*`) are well formed and ignored.
//! Acknowledgements are the codec's own replies ([`EventCodec::take_replies`]).

use std::collections::VecDeque;

use serde_json::{Value, json};
use signaling::events::{AgentState, ClientEvent, EventError, Role, ServerEvent};

use super::link::EventCodec;

/// The data-channel label the OpenAI clients open.
pub const OAI_EVENTS_LABEL: &str = "oai-events";
/// Largest client message, in bytes (64 KiB: a `session.update` with tool schemas is larger
/// than api-v1's 16 KiB events; the peer's SCTP limit is the same).
pub const MAX_OAI_MESSAGE: usize = 64 * 1024;
/// Items kept for `conversation.item.retrieve` (the newest).
const MAX_ITEMS: usize = 128;

/// The session a call runs with (from `client_secrets`' or the multipart call's `session`),
/// echoed in `session.created` / `session.updated` in OpenAI's `realtime.session` shape.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OaiSession {
    /// The model name the client asked for (kept as given; kotodama's provider answers).
    pub model: String,
    /// The instructions in effect (the character's persona, or the client's when it gave them).
    pub instructions: String,
    /// The voice in effect.
    pub voice: String,
}

impl OaiSession {
    fn to_json(&self, id: &str, tools: &[Value]) -> Value {
        json!({
            "type": "realtime",
            "object": "realtime.session",
            "id": id,
            "model": self.model,
            "output_modalities": ["audio"],
            "instructions": self.instructions,
            "tools": tools,
            "tool_choice": "auto",
            "audio": {
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": null,
                    "noise_reduction": null,
                    "turn_detection": {"type": "server_vad", "create_response": true, "interrupt_response": true},
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": self.voice, "speed": 1.0},
            },
        })
    }
}

/// The reply being spoken.
#[derive(Debug)]
struct Reply {
    response_id: String,
    /// The agent item (known from its first transcript).
    item_id: Option<String>,
    /// Bytes of the cumulative transcript already sent as deltas.
    sent: usize,
    /// `output_audio_buffer.started` went out (and neither `stopped` nor `cleared` yet).
    audio: bool,
    /// Cut by barge-in or `response.cancel`.
    cancelled: bool,
}

/// OpenAI Realtime GA events for api-v1 events (see the module docs).
#[derive(Debug)]
pub struct OaiEventsCodec {
    session_id: String,
    session: OaiSession,
    next_event: u64,
    /// Items by id, newest last (bounded by [`MAX_ITEMS`]).
    items: VecDeque<(String, Value)>,
    /// The last item of the conversation (`previous_item_id` of the next).
    last_item: Option<String>,
    /// The user item whose speech is open (between speech_started and its transcript).
    user_open: Option<String>,
    /// Committed user items still waiting for their transcript, oldest first.
    user_awaiting: VecDeque<String>,
    /// Bytes of the open user transcript already sent as deltas.
    user_sent: usize,
    /// A typed turn's text: the provider's echo of it is not a new user item.
    typed: Option<String>,
    reply: Option<Reply>,
    /// The last reply, after its `response.done` (for `output_audio_buffer.stopped`).
    finished_audio: Option<String>,
    /// Replies owed to the client for what it sent (acks, retrieved items).
    replies: Vec<String>,
    /// The instructions the call was created with (a client's `session.update` adds to them).
    base_instructions: String,
    /// What the client's `session.update`s set so far (only changes are handed on).
    client: ClientSettings,
}

/// The parts of `session.update` handed to the session, as last handed on.
#[derive(Debug, Default)]
struct ClientSettings {
    instructions: Option<String>,
    voice: Option<String>,
    /// The function tools as the client declared them (echoed in `session.updated`).
    tools: Vec<Value>,
}

impl OaiEventsCodec {
    /// A codec for session `session_id` running `session`.
    pub fn new(session_id: impl Into<String>, session: OaiSession) -> Self {
        Self {
            session_id: session_id.into(),
            session,
            next_event: 0,
            items: VecDeque::new(),
            last_item: None,
            user_open: None,
            user_awaiting: VecDeque::new(),
            user_sent: 0,
            typed: None,
            reply: None,
            finished_audio: None,
            replies: Vec::new(),
            base_instructions: String::new(),
            client: ClientSettings::default(),
        }
        .with_base()
    }

    fn with_base(mut self) -> Self {
        self.base_instructions = self.session.instructions.clone();
        self
    }

    /// One server message: `fields` plus `type` and a fresh `event_id`.
    fn msg(&mut self, kind: &str, mut fields: Value) -> String {
        self.next_event += 1;
        if let Value::Object(m) = &mut fields {
            m.insert("type".into(), kind.into());
            m.insert("event_id".into(), format!("event_{}", self.next_event).into());
        }
        fields.to_string()
    }

    fn new_item_id(&mut self) -> String {
        signaling::id::new_id("item")
    }

    /// Remember `item` (by its `id`) for retrieval; a known id is replaced in place.
    fn store(&mut self, item: &Value) {
        let id = item["id"].as_str().unwrap_or_default().to_owned();
        if let Some(slot) = self.items.iter_mut().find(|(i, _)| *i == id) {
            slot.1 = item.clone();
            return;
        }
        if self.items.len() == MAX_ITEMS {
            self.items.pop_front();
        }
        self.items.push_back((id, item.clone()));
    }

    fn item(&self, id: &str) -> Option<&Value> {
        self.items.iter().find(|(i, _)| i == id).map(|(_, v)| v)
    }

    /// `conversation.item.added` and `.done` for a completed item appended to the conversation.
    fn append_item(&mut self, item: Value, out: &mut Vec<String>) {
        let id = item["id"].as_str().unwrap_or_default().to_owned();
        let previous = self.last_item.replace(id);
        self.store(&item);
        out.push(self.msg("conversation.item.added", json!({"previous_item_id": previous, "item": item})));
        out.push(self.msg("conversation.item.done", json!({"previous_item_id": previous, "item": item})));
    }

    fn user_audio_item(id: &str, transcript: Option<&str>) -> Value {
        json!({"id": id, "object": "realtime.item", "type": "message", "role": "user", "status": "completed",
               "content": [{"type": "input_audio", "transcript": transcript}]})
    }

    fn assistant_item(id: &str, status: &str, transcript: Option<&str>) -> Value {
        let content = match transcript {
            Some(t) => json!([{"type": "output_audio", "transcript": t}]),
            None => json!([]),
        };
        json!({"id": id, "object": "realtime.item", "type": "message", "role": "assistant", "status": status,
               "content": content})
    }

    /// The open reply, made (`response.created`) if there is none.
    fn open_reply(&mut self, out: &mut Vec<String>) -> &mut Reply {
        if self.reply.is_none() {
            let response_id = signaling::id::new_id("resp");
            let created = self.msg(
                "response.created",
                json!({"response": {"id": response_id, "object": "realtime.response", "status": "in_progress",
                                     "output": [], "output_modalities": ["audio"]}}),
            );
            out.push(created);
            self.finished_audio = None;
            self.reply = Some(Reply { response_id, item_id: None, sent: 0, audio: false, cancelled: false });
        }
        self.reply.as_mut().unwrap_or_else(|| unreachable!("set just above"))
    }

    /// The reply's item is `item_id`: announced once (`output_item.added`, `item.added`,
    /// `content_part.added`).
    fn reply_item(&mut self, item_id: &str, out: &mut Vec<String>) -> (String, usize) {
        let reply = self.open_reply(out);
        if reply.item_id.as_deref() == Some(item_id) {
            return (reply.response_id.clone(), reply.sent);
        }
        reply.item_id = Some(item_id.to_owned());
        reply.sent = 0;
        let response_id = reply.response_id.clone();
        let item = Self::assistant_item(item_id, "in_progress", None);
        let previous = self.last_item.replace(item_id.to_owned());
        self.store(&item);
        let ids = json!({"response_id": response_id, "output_index": 0});
        let mut added = ids.clone();
        added["item"] = item.clone();
        out.push(self.msg("response.output_item.added", added));
        out.push(self.msg("conversation.item.added", json!({"previous_item_id": previous, "item": item})));
        let mut part = ids;
        part["item_id"] = item_id.into();
        part["content_index"] = 0.into();
        part["part"] = json!({"type": "audio", "transcript": ""});
        out.push(self.msg("response.content_part.added", part));
        (response_id, 0)
    }

    fn agent_transcript(&mut self, item_id: &str, text: &str, is_final: bool, out: &mut Vec<String>) {
        let (response_id, sent) = self.reply_item(item_id, out);
        let ids = json!({"response_id": response_id, "item_id": item_id, "output_index": 0, "content_index": 0});
        let start = if sent <= text.len() && text.is_char_boundary(sent) { sent } else { 0 };
        if start < text.len() {
            let mut delta = ids.clone();
            delta["delta"] = text[start..].into();
            out.push(self.msg("response.output_audio_transcript.delta", delta));
        }
        if let Some(r) = self.reply.as_mut() {
            r.sent = text.len();
        }
        if !is_final {
            return;
        }
        let cancelled = self.reply.as_ref().is_some_and(|r| r.cancelled);
        let audio = self.reply.as_ref().is_some_and(|r| r.audio);
        out.push(self.msg("response.output_audio.done", ids.clone()));
        let mut done = ids.clone();
        done["transcript"] = text.into();
        out.push(self.msg("response.output_audio_transcript.done", done));
        let mut part = ids;
        part["part"] = json!({"type": "audio", "transcript": text});
        out.push(self.msg("response.content_part.done", part));
        let item = Self::assistant_item(item_id, if cancelled { "incomplete" } else { "completed" }, Some(text));
        self.store(&item);
        let previous = self.previous_of(item_id);
        out.push(
            self.msg("response.output_item.done", json!({"response_id": response_id, "output_index": 0, "item": item})),
        );
        out.push(self.msg("conversation.item.done", json!({"previous_item_id": previous, "item": item})));
        let status = if cancelled { "cancelled" } else { "completed" };
        out.push(self.msg(
            "response.done",
            json!({"response": {"id": response_id, "object": "realtime.response", "status": status,
                                 "output": [item], "output_modalities": ["audio"],
                                 "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}}),
        ));
        self.reply = None;
        self.finished_audio = audio.then_some(response_id);
    }

    /// The item before `id` in the conversation (as announced).
    fn previous_of(&self, id: &str) -> Option<String> {
        let pos = self.items.iter().position(|(i, _)| i == id)?;
        pos.checked_sub(1).and_then(|p| self.items.get(p)).map(|(i, _)| i.clone())
    }

    /// The user item a transcript belongs to: the oldest committed one still waiting for its
    /// transcript, else the speech still open (providers may transcribe before our VAD's stop).
    fn user_target(&self) -> Option<String> {
        if let Some(id) = self.user_awaiting.front() {
            return Some(id.clone());
        }
        let open = self.user_open.as_ref()?;
        let transcribed = self.item(open).is_some_and(|i| !i["content"][0]["transcript"].is_null());
        (!transcribed).then(|| open.clone())
    }

    fn user_transcript(&mut self, text: &str, is_final: bool, out: &mut Vec<String>) {
        let target = self.user_target();
        if target.is_none() && self.typed.as_deref().is_some_and(|t| t.trim() == text.trim()) {
            // The provider's echo of a typed turn: that item exists already.
            if is_final {
                self.typed = None;
            }
            return;
        }
        let id = match target {
            Some(id) => id,
            None if !is_final => return,
            None => {
                // A transcript with no speech edges seen (a provider-detected turn): its item now.
                let id = self.new_item_id();
                self.append_item(Self::user_audio_item(&id, None), out);
                self.user_awaiting.push_back(id.clone());
                id
            }
        };
        let start =
            if self.user_sent <= text.len() && text.is_char_boundary(self.user_sent) { self.user_sent } else { 0 };
        if !is_final {
            if start < text.len() {
                let delta = json!({"item_id": id, "content_index": 0, "delta": &text[start..]});
                out.push(self.msg("conversation.item.input_audio_transcription.delta", delta));
            }
            self.user_sent = text.len();
            return;
        }
        self.user_sent = 0;
        let item = Self::user_audio_item(&id, Some(text));
        if self.user_awaiting.front() == Some(&id) {
            self.user_awaiting.pop_front();
            self.store(&item);
        } else {
            // Transcribed while the speech is still open: the item joins the conversation now
            // (its speech_stopped / committed follow).
            self.append_item(item, out);
        }
        out.push(self.msg(
            "conversation.item.input_audio_transcription.completed",
            json!({"item_id": id, "content_index": 0, "transcript": text}),
        ));
    }

    fn state(&mut self, state: AgentState, out: &mut Vec<String>) {
        match state {
            AgentState::Speaking => {
                let reply = self.open_reply(out);
                if !reply.audio {
                    reply.audio = true;
                    let response_id = reply.response_id.clone();
                    out.push(self.msg("output_audio_buffer.started", json!({"response_id": response_id})));
                }
            }
            AgentState::Listening => {
                if let Some(response_id) = self.finished_audio.take() {
                    out.push(self.msg("output_audio_buffer.stopped", json!({"response_id": response_id})));
                }
            }
            _ => {}
        }
    }

    fn interrupted(&mut self, item_id: &str, played_ms: u64, out: &mut Vec<String>) {
        let (response_id, _) = self.reply_item(item_id, out);
        if let Some(r) = self.reply.as_mut() {
            r.cancelled = true;
            if std::mem::take(&mut r.audio) {
                out.push(self.msg("output_audio_buffer.cleared", json!({"response_id": response_id})));
            }
        }
        out.push(self.msg(
            "conversation.item.truncated",
            json!({"item_id": item_id, "content_index": 0, "audio_end_ms": played_ms}),
        ));
    }

    /// What OpenAI has no event for (the avatar's emotion, visemes and gestures, moderation,
    /// agent notifications, the session's end) as `kotodama.<api-v1 type>` with the api-v1
    /// fields: the SDK passes events it does not know to `transport.on("*")` (its generic event
    /// schema needs only `type`), so an avatar page can use them.
    fn extension(&mut self, ev: &ServerEvent, out: &mut Vec<String>) {
        let Ok(mut v) = serde_json::to_value(ev) else { return };
        let kind = format!("kotodama.{}", ev.type_name());
        if let Value::Object(m) = &mut v {
            m.remove("type");
        }
        out.push(self.msg(&kind, v));
    }

    /// `session.update`: what changed of `instructions`, `audio.output.voice` and the function
    /// `tools` goes to the session (api-v1 `session.update`); acknowledged with the session as it
    /// runs. Tools of another type (`mcp`) are refused with an `error`.
    fn session_update(&mut self, v: &Value) -> Result<Option<ClientEvent>, EventError> {
        let s = &v["session"];
        let bad = |reason: String| EventError::BadFields { kind: "session.update".into(), reason };
        if let Some(model) = s["model"].as_str() {
            self.session.model = model.to_owned();
        }
        let instructions = s["instructions"].as_str().map(str::to_owned);
        let voice = s["audio"]["output"]["voice"].as_str().or_else(|| s["voice"].as_str()).map(str::to_owned);
        let tools = match &s["tools"] {
            Value::Null => None,
            Value::Array(tools) => {
                if let Some(other) = tools.iter().find(|t| t["type"] != "function") {
                    return Err(bad(format!("only function tools are supported, not `{}`", other["type"])));
                }
                Some(tools.clone())
            }
            _ => return Err(bad("session.tools must be an array".into())),
        };
        let mut update = (None, None, None);
        if instructions.is_some() && instructions != self.client.instructions {
            update.0 = instructions.clone();
            self.client.instructions = instructions;
        }
        if voice.is_some() && voice.as_deref() != Some(self.session.voice.as_str()) && voice != self.client.voice {
            update.1 = voice.clone();
            self.client.voice = voice;
        }
        if let Some(tools) = tools.filter(|t| *t != self.client.tools) {
            let declared = tools
                .iter()
                .map(|t| serde_json::from_value(t.clone()).map_err(|e| bad(format!("tool `{}`: {e}", t["name"]))))
                .collect::<Result<Vec<signaling::events::ToolDeclaration>, _>>()?;
            update.2 = Some(declared);
            self.client.tools = tools;
        }
        if let Some(extra) = &self.client.instructions {
            let base = self.base_instructions.trim_end();
            self.session.instructions = if base.is_empty() { extra.clone() } else { format!("{base}\n\n{extra}") };
        }
        if let Some(voice) = &self.client.voice {
            self.session.voice = voice.clone();
        }
        let session = self.session.to_json(&self.session_id, &self.client.tools);
        let ack = self.msg("session.updated", json!({"session": session}));
        self.replies.push(ack);
        Ok(match update {
            (None, None, None) => None,
            (instructions, voice, tools) => {
                Some(ClientEvent::SessionUpdate { instructions, voice, tools, language: None })
            }
        })
    }

    /// A `function_call_output` item: the client's answer to a `function_call` (api-v1
    /// `tool.output`); acknowledged as an item of the conversation.
    fn tool_output(&mut self, item: &Value) -> Result<Option<ClientEvent>, EventError> {
        let bad =
            |reason: &str| EventError::BadFields { kind: "conversation.item.create".into(), reason: reason.into() };
        let call_id =
            item["call_id"].as_str().filter(|c| !c.is_empty()).ok_or_else(|| bad("item.call_id is required"))?;
        let output = item["output"].as_str().ok_or_else(|| bad("item.output must be a string"))?;
        let id = match item["id"].as_str() {
            Some(id) if !id.is_empty() && id.len() <= 64 => id.to_owned(),
            _ => self.new_item_id(),
        };
        let stored = json!({"id": id, "object": "realtime.item", "type": "function_call_output", "status": "completed",
                            "call_id": call_id, "output": output});
        let mut acks = Vec::new();
        self.append_item(stored, &mut acks);
        self.replies.append(&mut acks);
        Ok(Some(ClientEvent::ToolOutput { call_id: call_id.to_owned(), output: output.to_owned() }))
    }

    /// The model called a client tool: a `function_call` item as the Realtime API announces it
    /// (`output_item.added` in progress, the arguments, `output_item.done` completed: the SDK
    /// runs the tool on that), in the reply being spoken, else in a response of its own that
    /// ends with it (`response.done`, as a response that only calls tools does).
    fn tool_call(&mut self, call_id: &str, name: &str, arguments: &str, out: &mut Vec<String>) {
        let own = self.reply.as_ref().is_none_or(|r| r.item_id.is_none());
        let output_index = if own { 0 } else { 1 };
        let response_id = self.open_reply(out).response_id.clone();
        let id = self.new_item_id();
        let item = |status: &str, args: &str| {
            json!({"id": id, "object": "realtime.item", "type": "function_call", "status": status,
                   "name": name, "call_id": call_id, "arguments": args})
        };
        let (added, done) = (item("in_progress", ""), item("completed", arguments));
        let previous = self.last_item.replace(id.clone());
        self.store(&done);
        let ids = json!({"response_id": response_id, "output_index": output_index});
        let with = |mut v: Value, k: &str, x: Value| {
            v[k] = x;
            v
        };
        out.push(self.msg("response.output_item.added", with(ids.clone(), "item", added.clone())));
        out.push(self.msg("conversation.item.added", json!({"previous_item_id": previous, "item": added})));
        let mut args = with(ids.clone(), "item_id", id.clone().into());
        args["call_id"] = call_id.into();
        out.push(self.msg("response.function_call_arguments.delta", with(args.clone(), "delta", arguments.into())));
        out.push(self.msg("response.function_call_arguments.done", with(args, "arguments", arguments.into())));
        out.push(self.msg("response.output_item.done", with(ids, "item", done.clone())));
        out.push(self.msg("conversation.item.done", json!({"previous_item_id": previous, "item": done})));
        if own {
            out.push(self.msg(
                "response.done",
                json!({"response": {"id": response_id, "object": "realtime.response", "status": "completed",
                                     "output": [done], "output_modalities": ["audio"],
                                     "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}}}),
            ));
            self.reply = None;
        }
    }

    fn error_reply(&mut self, code: &str, message: &str, client_event_id: Option<&str>) {
        let err = self.msg(
            "error",
            json!({"error": {"type": "invalid_request_error", "code": code, "message": message,
                             "event_id": client_event_id}}),
        );
        self.replies.push(err);
    }

    /// `conversation.item.create`: a user text message becomes a typed turn.
    fn item_create(&mut self, v: &Value) -> Result<Option<ClientEvent>, EventError> {
        let item = &v["item"];
        let bad =
            |reason: &str| EventError::BadFields { kind: "conversation.item.create".into(), reason: reason.into() };
        match item["type"].as_str() {
            Some("message") => {}
            Some("function_call_output") => return self.tool_output(item),
            Some(_) => return Ok(None),
            None => return Err(bad("item.type is required")),
        }
        if item["role"].as_str() != Some("user") {
            return Ok(None);
        }
        let text: Vec<&str> = item["content"]
            .as_array()
            .ok_or_else(|| bad("item.content must be an array"))?
            .iter()
            .filter(|c| c["type"] == "input_text")
            .filter_map(|c| c["text"].as_str())
            .collect();
        let text = text.join(" ");
        if text.trim().is_empty() {
            return Ok(None);
        }
        let id = match item["id"].as_str() {
            Some(id) if !id.is_empty() && id.len() <= 64 => id.to_owned(),
            _ => self.new_item_id(),
        };
        let item = json!({"id": id, "object": "realtime.item", "type": "message", "role": "user",
                          "status": "completed", "content": [{"type": "input_text", "text": text}]});
        let mut acks = Vec::new();
        self.append_item(item, &mut acks);
        self.replies.append(&mut acks);
        self.typed = Some(text.clone());
        Ok(Some(ClientEvent::Text { text }))
    }
}

impl EventCodec for OaiEventsCodec {
    fn name(&self) -> &'static str {
        "oai-events"
    }

    fn encode(&mut self, ev: &ServerEvent, out: &mut Vec<String>) {
        match ev {
            ServerEvent::SessionReady { .. } => {
                let session = self.session.to_json(&self.session_id, &self.client.tools);
                out.push(self.msg("session.created", json!({"session": session})));
            }
            ServerEvent::UserSpeechStarted { at_ms } => {
                let id = self.new_item_id();
                self.user_open = Some(id.clone());
                self.user_sent = 0;
                out.push(
                    self.msg("input_audio_buffer.speech_started", json!({"item_id": id, "audio_start_ms": at_ms})),
                );
            }
            ServerEvent::UserSpeechStopped { at_ms } => {
                let id = match self.user_open.take() {
                    Some(id) => id,
                    None => self.new_item_id(),
                };
                out.push(self.msg("input_audio_buffer.speech_stopped", json!({"item_id": id, "audio_end_ms": at_ms})));
                if self.item(&id).is_some() {
                    // Already transcribed and announced.
                    let previous = self.previous_of(&id);
                    let committed = json!({"item_id": id, "previous_item_id": previous});
                    out.push(self.msg("input_audio_buffer.committed", committed));
                } else {
                    let previous = self.last_item.clone();
                    let committed = json!({"item_id": id, "previous_item_id": previous});
                    out.push(self.msg("input_audio_buffer.committed", committed));
                    self.append_item(Self::user_audio_item(&id, None), out);
                    self.user_awaiting.push_back(id);
                }
            }
            ServerEvent::Transcript { role: Role::User, text, is_final, .. } => {
                self.user_transcript(text, *is_final, out)
            }
            ServerEvent::Transcript { role: Role::Agent, item_id, text, is_final } => {
                self.agent_transcript(item_id, text, *is_final, out)
            }
            ServerEvent::State { state } => self.state(*state, out),
            ServerEvent::ToolCall { call_id, name, arguments } => self.tool_call(call_id, name, arguments, out),
            ServerEvent::AgentInterrupted { item_id, played_ms } => self.interrupted(item_id, *played_ms, out),
            ServerEvent::Error { code, message } => {
                let err = self.msg(
                    "error",
                    json!({"error": {"type": "invalid_request_error", "code": code, "message": message}}),
                );
                out.push(err);
            }
            ServerEvent::Emotion { .. }
            | ServerEvent::Viseme { .. }
            | ServerEvent::Gesture { .. }
            | ServerEvent::Moderation { .. }
            | ServerEvent::AgentNotification { .. }
            | ServerEvent::SessionEnded { .. } => self.extension(ev, out),
            _ => {}
        }
    }

    fn decode(&mut self, msg: &[u8]) -> Result<Option<ClientEvent>, EventError> {
        if msg.len() > MAX_OAI_MESSAGE {
            return Err(EventError::TooLarge { len: msg.len(), limit: MAX_OAI_MESSAGE });
        }
        let v: Value = serde_json::from_slice(msg).map_err(|e| EventError::NotJson(e.to_string()))?;
        if !v.is_object() {
            return Err(EventError::NotObject);
        }
        let kind = match &v["type"] {
            Value::String(k) => k.as_str(),
            Value::Null => return Err(EventError::MissingType),
            _ => return Err(EventError::TypeNotString),
        };
        Ok(match kind {
            "session.update" => return self.session_update(&v),
            "conversation.item.create" => return self.item_create(&v),
            "response.cancel" | "output_audio_buffer.clear" => Some(ClientEvent::Interrupt),
            "conversation.item.retrieve" => {
                let id = v["item_id"].as_str().unwrap_or_default();
                match self.item(id).cloned() {
                    Some(item) => {
                        let retrieved = self.msg("conversation.item.retrieved", json!({"item": item}));
                        self.replies.push(retrieved);
                    }
                    None => {
                        let message = format!("no item with id `{id}` in this conversation");
                        self.error_reply("item_not_found", &message, v["event_id"].as_str());
                    }
                }
                None
            }
            _ => None,
        })
    }

    fn take_replies(&mut self, out: &mut Vec<String>) {
        out.append(&mut self.replies);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::link::codec_test_support::{agent, enc, replies, types};

    fn codec() -> OaiEventsCodec {
        OaiEventsCodec::new(
            "sess_1",
            OaiSession { model: "gpt-realtime".into(), instructions: "Be Aiko.".into(), voice: "alloy".into() },
        )
    }

    #[test]
    fn every_server_event_has_a_unique_string_event_id() {
        let mut c = codec();
        let mut all = enc(&mut c, ServerEvent::session_ready("sess_1", "aiko", "scripted"));
        all.extend(enc(&mut c, ServerEvent::UserSpeechStarted { at_ms: 500 }));
        all.extend(enc(&mut c, ServerEvent::UserSpeechStopped { at_ms: 1500 }));
        all.extend(enc(&mut c, ServerEvent::State { state: AgentState::Speaking }));
        all.extend(enc(&mut c, agent("it_a", "Hi!", true)));
        all.extend(enc(&mut c, ServerEvent::State { state: AgentState::Listening }));
        let ids: std::collections::HashSet<&str> = all.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
        assert_eq!(ids.len(), all.len(), "{all:?}");
        assert_eq!(all[0]["type"], "session.created");
        assert_eq!(all[0]["session"]["instructions"], "Be Aiko.");
    }

    #[test]
    fn a_spoken_user_turn_is_an_input_audio_item_whose_transcript_arrives_later() {
        let mut c = codec();
        let started = enc(&mut c, ServerEvent::UserSpeechStarted { at_ms: 500 });
        let id = started[0]["item_id"].as_str().unwrap().to_owned();
        let stopped = enc(&mut c, ServerEvent::UserSpeechStopped { at_ms: 1500 });
        assert_eq!(
            types(&stopped),
            [
                "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed",
                "conversation.item.added",
                "conversation.item.done"
            ]
        );
        let content = &stopped[2]["item"]["content"][0];
        assert_eq!(content["type"], "input_audio");
        assert!(content.as_object().unwrap().contains_key("transcript"), "the key is there even when null");
        assert_eq!(stopped[2]["item"]["id"], id.as_str());
        let user =
            ServerEvent::Transcript { role: Role::User, item_id: "u".into(), text: "Hello".into(), is_final: true };
        let done = enc(&mut c, user);
        assert_eq!(done[0]["type"], "conversation.item.input_audio_transcription.completed");
        assert_eq!((done[0]["item_id"].as_str(), done[0]["transcript"].as_str()), (Some(id.as_str()), Some("Hello")));
        // The SDK then retrieves the item: it carries the transcript now.
        let retrieve = json!({"type": "conversation.item.retrieve", "item_id": id}).to_string();
        assert_eq!(c.decode(retrieve.as_bytes()).unwrap(), None);
        let got = replies(&mut c);
        assert_eq!(got[0]["type"], "conversation.item.retrieved");
        assert_eq!(got[0]["item"]["content"][0]["transcript"], "Hello");
    }

    #[test]
    fn a_transcript_before_the_speech_stops_fills_the_same_user_item() {
        let mut c = codec();
        let started = enc(&mut c, ServerEvent::UserSpeechStarted { at_ms: 500 });
        let id = started[0]["item_id"].as_str().unwrap().to_owned();
        let user = ServerEvent::Transcript { role: Role::User, item_id: "u".into(), text: "Hi".into(), is_final: true };
        let early = enc(&mut c, user);
        assert_eq!(
            types(&early),
            [
                "conversation.item.added",
                "conversation.item.done",
                "conversation.item.input_audio_transcription.completed"
            ]
        );
        assert_eq!(early[0]["item"]["content"][0]["transcript"], "Hi");
        let stopped = enc(&mut c, ServerEvent::UserSpeechStopped { at_ms: 1500 });
        assert_eq!(types(&stopped), ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]);
        assert_eq!(stopped[1]["item_id"], id.as_str(), "one item for one utterance");
    }

    #[test]
    fn a_reply_streams_deltas_and_ends_with_its_transcript_in_the_item() {
        let mut c = codec();
        let start = enc(&mut c, ServerEvent::State { state: AgentState::Speaking });
        assert_eq!(types(&start), ["response.created", "output_audio_buffer.started"]);
        let rid = start[0]["response"]["id"].as_str().unwrap().to_owned();
        let first = enc(&mut c, agent("it_a", "Hi!", false));
        assert_eq!(
            types(&first),
            [
                "response.output_item.added",
                "conversation.item.added",
                "response.content_part.added",
                "response.output_audio_transcript.delta"
            ]
        );
        let more = enc(&mut c, agent("it_a", "Hi! I am Aiko.", false));
        assert_eq!(more[0]["delta"], " I am Aiko.");
        assert_eq!(more[0]["response_id"], rid.as_str());
        let fin = enc(&mut c, agent("it_a", "Hi! I am Aiko.", true));
        let last = fin.last().unwrap();
        assert_eq!(last["type"], "response.done");
        assert_eq!(last["response"]["status"], "completed");
        let done = fin.iter().find(|e| e["type"] == "conversation.item.done").unwrap();
        assert_eq!(done["item"]["content"][0], json!({"type": "output_audio", "transcript": "Hi! I am Aiko."}));
        let stop = enc(&mut c, ServerEvent::State { state: AgentState::Listening });
        assert_eq!(types(&stop), ["output_audio_buffer.stopped"]);
        assert_eq!(stop[0]["response_id"], rid.as_str());
    }

    #[test]
    fn barge_in_clears_the_buffer_truncates_at_what_played_and_cancels_the_response() {
        let mut c = codec();
        enc(&mut c, ServerEvent::State { state: AgentState::Speaking });
        enc(&mut c, agent("it_a", "Hi! I am", false));
        assert_eq!(c.decode(br#"{"type":"response.cancel"}"#).unwrap(), Some(ClientEvent::Interrupt));
        assert_eq!(c.decode(br#"{"type":"output_audio_buffer.clear"}"#).unwrap(), Some(ClientEvent::Interrupt));
        let cut = enc(&mut c, ServerEvent::AgentInterrupted { item_id: "it_a".into(), played_ms: 640 });
        assert_eq!(types(&cut), ["output_audio_buffer.cleared", "conversation.item.truncated"]);
        assert_eq!(cut[1]["audio_end_ms"], 640);
        let fin = enc(&mut c, agent("it_a", "Hi!", true));
        assert_eq!(fin.last().unwrap()["response"]["status"], "cancelled");
        assert!(enc(&mut c, ServerEvent::State { state: AgentState::Listening }).is_empty(), "cleared, not stopped");
        c.decode(br#"{"type":"conversation.item.retrieve","item_id":"it_a"}"#).unwrap();
        let got = replies(&mut c);
        assert_eq!(got[0]["item"]["content"][0]["transcript"], "Hi!", "the item holds what was heard");
        assert_eq!(got[0]["item"]["status"], "incomplete");
    }

    #[test]
    fn avatar_events_pass_through_as_kotodama_extensions() {
        let mut c = codec();
        let v = enc(
            &mut c,
            ServerEvent::Viseme {
                item_id: "it_a".into(),
                viseme: signaling::events::Viseme::Aa,
                start_ms: 40,
                duration_ms: 60,
            },
        );
        assert_eq!(v[0]["type"], "kotodama.viseme");
        assert_eq!((v[0]["viseme"].as_str(), v[0]["start_ms"].as_u64()), (Some("aa"), Some(40)));
        assert!(v[0]["event_id"].is_string());
        let e = enc(&mut c, ServerEvent::Emotion { emotion: signaling::events::Emotion::Happy, item_id: None });
        assert_eq!((e[0]["type"].as_str(), e[0]["emotion"].as_str()), (Some("kotodama.emotion"), Some("happy")));
        assert!(enc(&mut c, ServerEvent::Pong).is_empty(), "OpenAI has no ping");
    }

    #[test]
    fn client_events_map_to_turns_and_acks() {
        let mut c = codec();
        assert_eq!(c.decode(br#"{"type":"session.update","session":{"type":"realtime"}}"#).unwrap(), None);
        assert_eq!(types(&replies(&mut c)), ["session.updated"]);
        let create = br#"{"type":"conversation.item.create","item":{"type":"message","role":"user","content":[{"type":"input_text","text":"Hello there"}]}}"#;
        assert_eq!(c.decode(create).unwrap(), Some(ClientEvent::Text { text: "Hello there".into() }));
        assert_eq!(types(&replies(&mut c)), ["conversation.item.added", "conversation.item.done"]);
        let echo = ServerEvent::Transcript {
            role: Role::User,
            item_id: "u".into(),
            text: "Hello there".into(),
            is_final: true,
        };
        assert!(enc(&mut c, echo).is_empty(), "the provider's echo of a typed turn is not a second item");
        assert_eq!(c.decode(br#"{"type":"response.create"}"#).unwrap(), None);
        c.decode(br#"{"type":"conversation.item.retrieve","item_id":"nope","event_id":"e1"}"#).unwrap();
        let err = replies(&mut c);
        assert_eq!(
            (err[0]["type"].as_str(), err[0]["error"]["code"].as_str()),
            (Some("error"), Some("item_not_found"))
        );
        assert_eq!(c.decode(b"{").unwrap_err().code(), "invalid_json");
        assert_eq!(c.decode(br#"{"no":"type"}"#).unwrap_err().code(), "missing_type");
        let huge = vec![b' '; MAX_OAI_MESSAGE + 1];
        assert_eq!(c.decode(&huge).unwrap_err().code(), "message_too_large");
    }

    #[test]
    fn session_update_hands_on_what_changed_and_echoes_the_tools() {
        let mut c = codec();
        let tool = json!({"type": "function", "name": "get_weather", "description": "Weather.",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}});
        let msg = json!({"type": "session.update", "session": {"type": "realtime", "instructions": "Be brief.",
                         "tools": [tool], "audio": {"output": {"voice": "alloy"}}}});
        let Some(ClientEvent::SessionUpdate { instructions, voice, tools, .. }) =
            c.decode(msg.to_string().as_bytes()).unwrap()
        else {
            panic!("a session update")
        };
        assert_eq!(instructions.as_deref(), Some("Be brief."));
        assert_eq!(voice, None, "the voice in effect is no change");
        let tools = tools.unwrap();
        assert_eq!(
            (tools[0].name.as_str(), tools[0].parameters["properties"]["city"]["type"].as_str()),
            ("get_weather", Some("string"))
        );
        let ack = replies(&mut c);
        assert_eq!(ack[0]["session"]["instructions"], "Be Aiko.\n\nBe brief.");
        assert_eq!(ack[0]["session"]["tools"][0]["name"], "get_weather");
        // The same update again changes nothing; it is still acknowledged.
        assert_eq!(c.decode(msg.to_string().as_bytes()).unwrap(), None);
        assert_eq!(types(&replies(&mut c)), ["session.updated"]);
        let mcp = json!({"type": "session.update", "session": {"tools": [{"type": "mcp", "server_label": "x"}]}});
        assert_eq!(c.decode(mcp.to_string().as_bytes()).unwrap_err().code(), "bad_message");
    }

    #[test]
    fn a_client_tool_call_is_a_function_call_item_and_its_output_goes_back() {
        let mut c = codec();
        let call =
            ServerEvent::ToolCall { call_id: "call_1".into(), name: "get_weather".into(), arguments: "{}".into() };
        let out = enc(&mut c, call);
        assert_eq!(
            types(&out),
            [
                "response.created",
                "response.output_item.added",
                "conversation.item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "conversation.item.done",
                "response.done"
            ]
        );
        assert_eq!(out[1]["item"]["status"], "in_progress", "the SDK runs the tool once: on the completed item");
        let item = &out[5]["item"];
        assert_eq!((item["type"].as_str(), item["status"].as_str()), (Some("function_call"), Some("completed")));
        assert_eq!((item["call_id"].as_str(), item["name"].as_str()), (Some("call_1"), Some("get_weather")));
        assert_eq!(out[5]["response_id"], out[0]["response"]["id"]);
        let answer = json!({"type": "conversation.item.create",
                            "item": {"type": "function_call_output", "call_id": "call_1", "output": "Sunny."}});
        assert_eq!(
            c.decode(answer.to_string().as_bytes()).unwrap(),
            Some(ClientEvent::ToolOutput { call_id: "call_1".into(), output: "Sunny.".into() })
        );
        let acks = replies(&mut c);
        assert_eq!(types(&acks), ["conversation.item.added", "conversation.item.done"]);
        assert_eq!(acks[0]["previous_item_id"], item["id"]);
        let no_id =
            json!({"type": "conversation.item.create", "item": {"type": "function_call_output", "output": "x"}});
        assert_eq!(c.decode(no_id.to_string().as_bytes()).unwrap_err().code(), "bad_message");
    }
}
