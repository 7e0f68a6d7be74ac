//! One Gemini Live provider session: the task that owns the socket (and, while resuming, the
//! next one). See the module docs of [`super`] for what is mapped to what.
//!
//! Invariants: every client message after `setup` is counted (`setup` is 0 on each connection)
//! and kept until a `sessionResumptionUpdate` says the handle includes it, so a resumed
//! connection gets exactly the messages the old one may have missed (bounded: the oldest go
//! first); a model turn's audio after `interrupted` or our `Cancel` is dropped until its
//! `turnComplete`; a cancelled tool call's result is never sent.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::protocol::{self, FunctionCall, FunctionResponse, ServerContent, ServerMessage};
use super::settings::{GeminiSettings, GeminiTurnDetection};
use crate::providers::openai::transport::Socket;
use crate::providers::tools::ToolEffect;
use crate::providers::{Pcm, ProviderCommand, ProviderError, ProviderEvent, SessionConfig, Speaker};

/// At most this many tool calls run at once; more get an error response.
const MAX_CONCURRENT_TOOL_CALLS: usize = 8;
/// Client messages kept for a resume (at 20 ms of audio each: 20 s).
const MAX_UNACKED: usize = 1000;
/// User audio kept to send after `activityStart` (local turn detection): 300 ms at 16 kHz, so
/// the onset our VAD needed to decide is not lost.
const PREROLL_SAMPLES: usize = 4800;
/// Close codes after which resuming cannot help (invalid argument, policy).
const FATAL_CLOSE_CODES: &[u16] = &[1007, 1008];

/// A tool call that finished.
pub(crate) struct ToolDone {
    id: String,
    name: String,
    output: String,
    effects: Vec<ToolEffect>,
}

/// Why the loop stopped.
enum Stop {
    /// We closed it (Close command or the session task went away).
    Ours,
    /// The server or the network ended it and it could not be resumed.
    Theirs(String),
}

/// What the socket produced.
enum Frame {
    Data(Vec<u8>),
    Closed { code: u16, reason: String },
    Nothing,
}

/// The model turn being received.
#[derive(Default)]
struct Turn {
    item_id: Option<String>,
    text: String,
    /// Interrupted or cancelled: the rest of this turn is not played.
    discard: bool,
}

/// Our own turn detection (`turn_detection = "local"`).
#[derive(Default)]
struct LocalTurns {
    /// `activityStart` sent, `activityEnd` not yet.
    activity_open: bool,
    /// A user turn (or text) was handed over and its answer is not complete.
    awaiting: bool,
    preroll: VecDeque<Vec<i16>>,
    preroll_len: usize,
}

/// The state of one provider session (owned by its task).
pub struct Connection {
    settings: Arc<GeminiSettings>,
    cfg: SessionConfig,
    events: mpsc::Sender<ProviderEvent>,
    socket: Option<Socket>,
    /// Client messages sent on the current connection (`setup` was 0).
    sent: u64,
    /// Messages the newest handle may not include: (index, JSON).
    unacked: VecDeque<(u64, String)>,
    handle: Option<String>,
    /// The server announced the end of this connection.
    go_away: bool,
    resuming: Option<JoinHandle<Result<Socket, ProviderError>>>,
    next: Option<Socket>,
    /// The handle `resuming` / `next` was opened with.
    next_handle: Option<String>,
    /// Model turns ended so far, and how many had ended when `handle` / `next_handle` came: a
    /// connection resumed from a handle older than the last turn would answer that turn again.
    ended_turns: u64,
    handle_turns: u64,
    next_turns: u64,
    turn: Turn,
    turns: u64,
    user: String,
    user_turns: u64,
    local: LocalTurns,
    calls: HashMap<String, JoinHandle<()>>,
}

impl Connection {
    /// A session for `cfg`, reporting to `events`.
    pub fn new(settings: Arc<GeminiSettings>, cfg: SessionConfig, events: mpsc::Sender<ProviderEvent>) -> Self {
        Self {
            settings,
            cfg,
            events,
            socket: None,
            sent: 0,
            unacked: VecDeque::new(),
            handle: None,
            go_away: false,
            resuming: None,
            next: None,
            next_handle: None,
            ended_turns: 0,
            handle_turns: 0,
            next_turns: 0,
            turn: Turn::default(),
            turns: 0,
            user: String::new(),
            user_turns: 0,
            local: LocalTurns::default(),
            calls: HashMap::new(),
        }
    }

    fn is_local(&self) -> bool {
        self.settings.turn_detection == GeminiTurnDetection::Local
    }

    /// Run until closed; `socket` has completed its setup.
    pub async fn run(mut self, socket: Socket, mut commands: mpsc::Receiver<ProviderCommand>) {
        self.socket = Some(socket);
        self.sent = history_sent(&self.cfg);
        self.emit(ProviderEvent::Ready).await;
        let (tool_tx, mut tool_rx) = mpsc::channel::<ToolDone>(MAX_CONCURRENT_TOOL_CALLS);
        let stop = loop {
            let stop = tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(ProviderCommand::Close) => Some(Stop::Ours),
                    Some(cmd) => { self.on_command(cmd).await; None }
                },
                frame = next_frame(&mut self.socket) => self.on_frame(frame, &tool_tx).await,
                Some(done) = tool_rx.recv() => { self.on_tool_done(done).await; None }
                res = poll_resume(&mut self.resuming) => { self.resuming = None; self.on_resumed(res) }
            };
            if let Some(stop) = stop {
                break stop;
            }
            self.maybe_swap().await;
        };
        for (_, call) in self.calls.drain() {
            call.abort();
        }
        if let Some(r) = self.resuming.take() {
            r.abort();
        }
        match stop {
            Stop::Ours => {
                if let Some(mut s) = self.socket.take() {
                    let _ = s.send(Message::Close(None)).await;
                }
            }
            Stop::Theirs(why) => {
                tracing::warn!(session_id = %self.cfg.session_id, reason = %why, "gemini live session ended");
                self.emit(ProviderEvent::Closed).await;
            }
        }
    }

    async fn emit(&self, ev: ProviderEvent) {
        // The session task holds us back here while its playout is full (backpressure).
        let _ = self.events.send(ev).await;
    }

    /// Send one client message (kept for a resume); a dead socket only keeps it.
    async fn send(&mut self, msg: String) {
        self.sent += 1;
        if self.unacked.len() >= MAX_UNACKED {
            self.unacked.pop_front();
        }
        self.unacked.push_back((self.sent, msg.clone()));
        if let Some(s) = self.socket.as_mut()
            && let Err(e) = s.send(Message::text(msg)).await
        {
            tracing::debug!(session_id = %self.cfg.session_id, error = %e, "gemini send failed; the read side reports the end");
        }
    }

    // --- commands from the session task ---

    async fn on_command(&mut self, cmd: ProviderCommand) {
        match cmd {
            ProviderCommand::AppendAudio(pcm) => self.on_audio(pcm).await,
            ProviderCommand::CommitTurn => {
                if self.is_local() && self.local.activity_open {
                    self.local.activity_open = false;
                    self.local.awaiting = true;
                    self.send(protocol::activity_end()).await;
                }
            }
            ProviderCommand::Text(t) => {
                self.local.awaiting = true;
                self.send(protocol::user_text(&t)).await;
            }
            ProviderCommand::GenerateReply { instructions } => {
                // Gemini has no per-reply instructions: they go as a user turn the model answers.
                let prompt = instructions.unwrap_or_else(|| "Please continue.".into());
                self.local.awaiting = true;
                self.send(protocol::user_text(&prompt)).await;
            }
            ProviderCommand::Cancel => {
                self.turn.discard = self.turn.item_id.is_some() || self.local.awaiting;
                if self.is_local() && !self.local.activity_open {
                    // A new activity stops the model (START_OF_ACTIVITY_INTERRUPTS, the default).
                    self.open_activity().await;
                }
            }
            ProviderCommand::AppendHistory(items) => {
                if let Some(h) = protocol::history(&items) {
                    self.send(h).await;
                }
            }
            ProviderCommand::Image(image) => self.send(protocol::video(&image)).await,
            // Gemini keeps its own context; the heard text lives in the resilient wrapper.
            // Activity start follows the audio itself (with its pre-roll), not the VAD edge.
            // The Live API takes instructions, voice and tools in `setup` only.
            ProviderCommand::UpdateSession(update) => {
                self.emit(crate::providers::session_update_unsupported("gemini", &update)).await
            }
            ProviderCommand::SpeechStarted
            | ProviderCommand::Truncate { .. }
            | ProviderCommand::Restart
            | ProviderCommand::ToolOutput { .. }
            | ProviderCommand::Close => {}
        }
    }

    async fn on_audio(&mut self, pcm: Pcm) {
        if !self.is_local() {
            return self.send(protocol::audio(&pcm.samples)).await;
        }
        if self.local.activity_open {
            return self.send(protocol::audio(&pcm.samples)).await;
        }
        if !self.local.awaiting && self.turn.item_id.is_none() {
            self.local.preroll.push_back(pcm.samples);
            self.open_activity().await;
            return;
        }
        // Between turns the audio only feeds the pre-roll.
        self.local.preroll_len += pcm.samples.len();
        self.local.preroll.push_back(pcm.samples);
        while self.local.preroll_len > PREROLL_SAMPLES {
            match self.local.preroll.pop_front() {
                Some(old) => self.local.preroll_len -= old.len(),
                None => break,
            }
        }
    }

    async fn open_activity(&mut self) {
        self.local.activity_open = true;
        self.local.awaiting = false;
        self.send(protocol::activity_start()).await;
        self.local.preroll_len = 0;
        let preroll: Vec<Vec<i16>> = self.local.preroll.drain(..).collect();
        for chunk in preroll {
            self.send(protocol::audio(&chunk)).await;
        }
    }

    // --- the server ---

    async fn on_frame(&mut self, frame: Frame, tools: &mpsc::Sender<ToolDone>) -> Option<Stop> {
        let data = match frame {
            Frame::Nothing => return None,
            Frame::Closed { code, reason } => return self.on_closed(code, reason),
            Frame::Data(d) => d,
        };
        let msg = match protocol::parse(&data) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(session_id = %self.cfg.session_id, error = %e, "unreadable gemini message ignored");
                return None;
            }
        };
        match msg {
            ServerMessage::Content(c) => {
                let usage = c.usage_tokens;
                self.on_content(c).await;
                if let Some(tokens) = usage {
                    self.emit(ProviderEvent::Usage { tokens }).await;
                }
            }
            ServerMessage::Usage(tokens) => self.emit(ProviderEvent::Usage { tokens }).await,
            ServerMessage::ToolCall(calls) => self.start_calls(calls, tools).await,
            ServerMessage::ToolCallCancellation(ids) => {
                for id in ids {
                    if let Some(call) = self.calls.remove(&id) {
                        tracing::info!(session_id = %self.cfg.session_id, call_id = %id, "tool call cancelled by the model");
                        call.abort();
                    }
                }
            }
            ServerMessage::GoAway { time_left } => {
                tracing::info!(session_id = %self.cfg.session_id, time_left_ms = time_left.map(|t| t.as_millis() as u64), "gemini goAway: resuming on a new connection");
                self.go_away = true;
                self.start_resume();
            }
            ServerMessage::ResumptionUpdate { handle, last_consumed } => {
                if let Some(h) = handle {
                    self.handle = Some(h);
                    self.handle_turns = self.ended_turns;
                    // Without an index the handle is taken to include everything sent so far.
                    let last = last_consumed.unwrap_or(self.sent);
                    while self.unacked.front().is_some_and(|(i, _)| *i <= last) {
                        self.unacked.pop_front();
                    }
                    if self.go_away {
                        // A connection resumed from an older handle would lack the turns since:
                        // open it again from this one (or at all, if goAway came before a handle).
                        self.restart_resume().await;
                    }
                }
            }
            ServerMessage::SetupComplete | ServerMessage::Other(_) => {}
        }
        None
    }

    fn on_closed(&mut self, code: u16, reason: String) -> Option<Stop> {
        self.socket = None;
        if self.next.is_some() || self.resuming.is_some() {
            return None;
        }
        if self.handle.is_none() || FATAL_CLOSE_CODES.contains(&code) {
            return Some(Stop::Theirs(format!("closed: {code} {reason}")));
        }
        tracing::info!(session_id = %self.cfg.session_id, code, "gemini connection closed; resuming");
        self.start_resume();
        None
    }

    async fn restart_resume(&mut self) {
        if self.next_handle == self.handle {
            return;
        }
        if let Some(r) = self.resuming.take() {
            r.abort();
        }
        if let Some(mut stale) = self.next.take() {
            let _ = stale.send(Message::Close(None)).await;
        }
        self.start_resume();
    }

    fn start_resume(&mut self) {
        if self.resuming.is_some() || self.next.is_some() {
            return;
        }
        let Some(handle) = self.handle.clone() else {
            tracing::warn!(session_id = %self.cfg.session_id, "no resumption handle yet; the session ends with this connection");
            return;
        };
        self.next_handle = Some(handle.clone());
        self.next_turns = self.handle_turns;
        let (settings, cfg) = (Arc::clone(&self.settings), self.cfg.clone());
        self.resuming = Some(tokio::spawn(async move { super::open(&settings, &cfg, Some(handle)).await }));
    }

    fn on_resumed(&mut self, res: Result<Socket, ProviderError>) -> Option<Stop> {
        if res.is_err() {
            self.next_handle = None;
        }
        match res {
            Ok(s) => {
                self.next = Some(s);
                None
            }
            Err(e) if self.socket.is_none() => Some(Stop::Theirs(format!("resuming failed: {e}"))),
            Err(e) => {
                tracing::warn!(session_id = %self.cfg.session_id, error = %e, "resuming failed; the old connection goes on");
                None
            }
        }
    }

    /// Move to the resumed connection at a turn boundary, or at once when the old one is gone.
    async fn maybe_swap(&mut self) {
        let boundary = self.next_turns == self.ended_turns
            && self.turn.item_id.is_none()
            && !self.local.awaiting
            && !self.local.activity_open
            && self.calls.is_empty()
            && self.user.is_empty();
        if self.next.is_none() || (self.socket.is_some() && !boundary) {
            return;
        }
        let Some(next) = self.next.take() else { return };
        self.go_away = false;
        self.next_handle = None;
        if let Some(mut old) = self.socket.replace(next) {
            let _ = old.send(Message::Close(None)).await;
        }
        if self.turn.item_id.is_some() {
            // The old connection took the rest of this turn with it: close it for the task.
            self.end_turn().await;
        }
        let n = self.replay().await;
        tracing::info!(session_id = %self.cfg.session_id, replayed = n, "gemini session resumed on a new connection");
    }

    /// Send the kept messages again on the new connection, renumbered, with one flush (and a
    /// yield now and then, so a long replay never holds a runtime worker).
    async fn replay(&mut self) -> usize {
        let replay: Vec<(u64, String)> = self.unacked.drain(..).collect();
        let n = replay.len();
        self.sent = 0;
        let Some(socket) = self.socket.as_mut() else { return 0 };
        for (i, (_, msg)) in replay.into_iter().enumerate() {
            self.sent += 1;
            self.unacked.push_back((self.sent, msg.clone()));
            if socket.feed(Message::text(msg)).await.is_err() {
                break;
            }
            if i % 64 == 63 {
                tokio::task::yield_now().await;
            }
        }
        let _ = socket.flush().await;
        n
    }

    async fn on_content(&mut self, c: ServerContent) {
        if let Some(t) = c.input_transcription.filter(|t| !t.is_empty()) {
            self.user.push_str(&t);
            let item_id = format!("gemini-user-{}", self.user_turns + 1);
            let text = self.user.trim().to_owned();
            self.emit(ProviderEvent::Transcript { speaker: Speaker::User, item_id, text, is_final: false }).await;
        }
        if c.interrupted && !self.turn.discard {
            self.turn.discard = true;
            self.emit(ProviderEvent::UserSpeechStarted).await;
        }
        for (rate_hz, samples) in c.audio {
            if !self.turn.discard {
                let item_id = self.turn_item();
                self.emit(ProviderEvent::AudioDelta { item_id, pcm: Pcm { rate_hz, samples } }).await;
            }
        }
        let spoken = c.output_transcription.unwrap_or_default() + &c.text;
        if !spoken.is_empty() && !self.turn.discard {
            let item_id = self.turn_item();
            self.turn.text.push_str(&spoken);
            let text = self.turn.text.trim().to_owned();
            self.emit(ProviderEvent::Transcript { speaker: Speaker::Agent, item_id, text, is_final: false }).await;
        }
        if c.turn_complete {
            self.end_turn().await;
        }
    }

    fn turn_item(&mut self) -> String {
        if self.turn.item_id.is_none() {
            self.turns += 1;
        }
        self.turn.item_id.get_or_insert_with(|| format!("gemini-{}", self.turns)).clone()
    }

    /// The model's turn is over: the user's final, then the agent's, then done.
    async fn end_turn(&mut self) {
        if !self.user.trim().is_empty() {
            self.user_turns += 1;
            let item_id = format!("gemini-user-{}", self.user_turns);
            let text = std::mem::take(&mut self.user).trim().to_owned();
            self.emit(ProviderEvent::Transcript { speaker: Speaker::User, item_id, text, is_final: true }).await;
        }
        self.user.clear();
        let turn = std::mem::take(&mut self.turn);
        self.local.awaiting = false;
        self.ended_turns += 1;
        match turn.item_id {
            Some(item_id) => {
                if !turn.discard {
                    let text = turn.text.trim().to_owned();
                    if !text.is_empty() {
                        let ev = ProviderEvent::Transcript {
                            speaker: Speaker::Agent,
                            item_id: item_id.clone(),
                            text,
                            is_final: true,
                        };
                        self.emit(ev).await;
                    }
                    self.emit(ProviderEvent::AudioDone { item_id: item_id.clone() }).await;
                }
                self.emit(ProviderEvent::ResponseDone { item_id }).await;
            }
            // A turn that only called tools continues after their responses.
            None if !self.calls.is_empty() => {}
            None => self.emit(ProviderEvent::ResponseDone { item_id: String::new() }).await,
        }
    }

    // --- tools ---

    async fn start_calls(&mut self, calls: Vec<FunctionCall>, tools: &mpsc::Sender<ToolDone>) {
        for call in calls {
            if self.calls.len() >= MAX_CONCURRENT_TOOL_CALLS {
                let output = r#"{"error":"too many tool calls at once"}"#.to_owned();
                let r = FunctionResponse { id: call.id, name: call.name, output };
                self.send(protocol::tool_response(&[r])).await;
                continue;
            }
            tracing::info!(session_id = %self.cfg.session_id, tool = %call.name, call_id = %call.id, "tool call");
            let registry = Arc::clone(&self.cfg.tools);
            let tx = tools.clone();
            let FunctionCall { id, name, args } = call;
            let key = id.clone();
            let task = tokio::spawn(async move {
                let r = registry.call(&name, &args).await;
                if r.failed {
                    tracing::warn!(tool = %name, output = %r.output, "tool call failed; the model is told");
                }
                // Capacity equals the in-flight bound: this never waits.
                let _ = tx.send(ToolDone { id, name, output: r.output, effects: r.effects }).await;
            });
            self.calls.insert(key, task);
        }
    }

    async fn on_tool_done(&mut self, done: ToolDone) {
        if self.calls.remove(&done.id).is_none() {
            return; // cancelled meanwhile
        }
        for e in done.effects {
            match e {
                ToolEffect::Emotion(emotion) => {
                    let item_id = self.turn.item_id.clone();
                    self.emit(ProviderEvent::Emotion { item_id, emotion }).await;
                }
            }
        }
        let r = FunctionResponse { id: done.id, name: done.name, output: done.output };
        self.send(protocol::tool_response(&[r])).await;
    }
}

/// Client messages `open` sent after `setup` on the first connection (the history, if any).
fn history_sent(cfg: &SessionConfig) -> u64 {
    u64::from(!cfg.history.is_empty())
}

async fn next_frame(socket: &mut Option<Socket>) -> Frame {
    let Some(s) = socket.as_mut() else { return std::future::pending().await };
    match s.next().await {
        Some(Ok(Message::Text(t))) => Frame::Data(t.as_bytes().to_vec()),
        Some(Ok(Message::Binary(b))) => Frame::Data(b.to_vec()),
        Some(Ok(Message::Close(f))) => {
            let (code, reason) = f.map(|f| (u16::from(f.code), f.reason.to_string())).unwrap_or((1005, String::new()));
            Frame::Closed { code, reason }
        }
        Some(Ok(_)) => Frame::Nothing,
        Some(Err(e)) => Frame::Closed { code: 1006, reason: e.to_string() },
        None => Frame::Closed { code: 1006, reason: "socket ended".into() },
    }
}

async fn poll_resume(r: &mut Option<JoinHandle<Result<Socket, ProviderError>>>) -> Result<Socket, ProviderError> {
    match r {
        Some(h) => h.await.unwrap_or_else(|e| Err(ProviderError::Unavailable(format!("resume task failed: {e}")))),
        None => std::future::pending().await,
    }
}
