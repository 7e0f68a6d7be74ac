//! The conversation core: every decision of one live session, sans-IO.
//!
//! [`Conversation`] owns the media parts by value (the [`Uplink`]: decode, VAD, resample; the
//! [`Playout`]: resample, encode, 20 ms pacing; [`BargeIn`]; the timed [`AgentSpeech`]) and the
//! conversation state: turn-taking, barge-in, the agent state, echo suppression of typed turns, the
//! idle timeout, the greeting, the history and the text the user heard. It never reads a clock,
//! awaits or sends: the caller (the session task, [`super::task`]) drives it in the style of
//! `media` and str0m:
//!
//! ```text
//! conv.handle_input(now, input);              // now: media time since the session started
//! while let Some(out) = conv.poll_output() {  // drain after every input
//!     match out { Event(e) => link.send_event(e), Audio(f) => link.send_audio(f),
//!                 Provider(c) => provider.try_send(c) /* refused -> Input::Refused */, ... }
//! }
//! sleep_until(conv.poll_timeout()) -> handle_input(now, Input::Timeout)
//! ```
//!
//! Invariants:
//! - Barge-in goes through [`BargeIn`]: user speech (our VAD, or the provider's) through
//!   `on_speech_started`, the client's `interrupt` through `interrupt`, so each cut carries its
//!   real [`media::InterruptReason`]. A cut sends `Cancel` and `Truncate{item_id, audio_end,
//!   heard}` to the provider, where `heard` is exactly the words released with the frames played.
//! - The agent turn is recorded once: when its audio has been played (complete), or when it is cut
//!   (interrupted, holding what was heard). Late audio and text of a cut item are dropped.
//! - A typed user turn is recorded when typed; the provider's echo of it as a user transcript is
//!   not recorded again (the one echo suppression of the tree).
//! - Provider events are only wanted ([`Conversation::wants_provider_events`]) while playout has
//!   room, so a provider that streams faster than real time is held back by its channel.

use std::collections::VecDeque;
use std::time::Duration;

use media::{BargeIn, InterruptReason, Interruption, Playout, Uplink, UplinkEvent};
use signaling::events::{AgentState, ClientEvent, Emotion, Role, ServerEvent};

use super::EndReason;
use super::budget::{Budget, BudgetPlan, OnLimit, SessionUsage};
use super::speech::AgentSpeech;
use crate::moderation::Source;
use crate::providers::{
    Capabilities, HistoryItem, HistoryView, Pcm, ProviderCommand, ProviderEvent, SharedHistory, Speaker,
};
use crate::telemetry;

/// Largest Opus frame the playout produces (20 ms at <= 510 kbit/s is < 1300 bytes).
const MAX_FRAME_BYTES: usize = 1500;
/// Playout holds at most this much audio before the provider is held back.
const PLAYOUT_HEADROOM: Duration = Duration::from_millis(500);

/// What the core needs to know about its session.
#[derive(Debug, Clone)]
pub struct ConversationConfig {
    /// Session id (for `session.ready`).
    pub session_id: String,
    /// Character id (for `session.ready`).
    pub character: String,
    /// Provider name (for `session.ready` and error metrics).
    pub provider: String,
    /// What the provider can do (server VAD: whether our VAD commits turns; truncation).
    pub caps: Capabilities,
    /// Instructions for a reply the character speaks first, once the client and the model are up.
    pub greeting: Option<String>,
    /// End the session after this long without speech, client messages or agent audio.
    pub idle_timeout: Option<Duration>,
    /// Checks agent text before it is spoken ([`crate::moderation`]); `None`: no checks.
    pub moderator: Option<std::sync::Arc<crate::moderation::Moderator>>,
    /// The session's budget caps ([`super::budget`]; [`BudgetPlan::unlimited`]: usage is only
    /// counted).
    pub budget: BudgetPlan,
    /// Provider deadline for every reply (spoken turn, typed turn, greeting): the provider must
    /// show progress within this, or the turn is given up (`error` `reply_timeout`) and a silent
    /// provider session replaced (`resilience.reply_timeout_ms`). `None`: no deadline.
    pub reply_timeout: Option<Duration>,
    /// Provider deadline for session start: the provider must be ready this long after the
    /// session task started, or its session is replaced (`error` `provider_timeout`;
    /// `resilience.start_timeout_ms`). `None`: no deadline.
    pub start_timeout: Option<Duration>,
}

/// The media parts the core drives, built by the session builder.
pub struct MediaParts {
    /// Client audio in: decode, VAD, resample to the provider's rate.
    pub uplink: Uplink,
    /// Character audio out: resample, encode, pace.
    pub playout: Playout,
    /// The barge-in policy.
    pub barge_in: BargeIn,
    /// Words, visemes and emotions timed to the agent's audio.
    pub speech: AgentSpeech,
}

/// Something that happened, for [`Conversation::handle_input`].
#[derive(Debug)]
pub enum Input {
    /// One Opus packet of the client's microphone.
    ClientOpus {
        /// RTP sequence number (loss and reordering are handled by the uplink).
        seq: u16,
        /// RTP timestamp (48 kHz): gaps (DTX) count as elapsed media time.
        timestamp: u32,
        /// RTP payload type (only the negotiated Opus type is decoded).
        payload_type: u8,
        /// RTP SSRC (a new one is a new stream).
        ssrc: u32,
        /// The Opus payload.
        payload: bytes::Bytes,
    },
    /// The client's media is flowing (WebRTC: the peer connection is connected): from now on a
    /// silent microphone is reported (`error` `no_audio`).
    MediaConnected,
    /// The client's event channel opened: events can reach it.
    ClientConnected,
    /// The client's event channel closed.
    ClientDisconnected,
    /// A client event, decoded by the link's dialect (`None`: one the core does not act on).
    Client(Option<ClientEvent>),
    /// A client message that could not be decoded: answered with an `error` event.
    BadClientMessage {
        /// Machine-readable code (api-v1 `error.code`).
        code: String,
        /// What was wrong.
        message: String,
    },
    /// The client's own VAD edge or end of turn.
    ClientVoice(super::link::ClientVoice),
    /// The client's playback progress of an agent item (a WebSocket client plays from its own
    /// buffer): a barge-in cuts at what it played by now, not at what was sent.
    ClientPlayback {
        /// The agent item playing.
        item_id: String,
        /// How much of it the client has played.
        played: Duration,
    },
    /// A typed user turn from outside the client (admin API, another node).
    UserText(String),
    /// An external agent's result: told to the client, put in the model's context.
    AgentResult(AgentResult),
    /// An event of the provider session.
    Provider(ProviderEvent),
    /// The provider's command queue refused this command (full); the core undoes what it assumed.
    Refused(ProviderCommand),
    /// Time passed: the playout may have a frame due, the idle timeout may have expired.
    Timeout,
}

/// A connected session with no audio from the client this long is reported (log, metric, event).
const NO_AUDIO_AFTER: Duration = Duration::from_secs(5);
/// Provider deadlines missed in a row, with nothing at all heard from the provider, that end the
/// session (`session.ended` `provider_error`): the first replaces the provider session
/// ([`ProviderCommand::Restart`]), the second gives up.
const MAX_SILENT_DEADLINES: u32 = 2;

/// What the core is waiting for from the provider, until when (media time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProviderWait {
    /// `Ready` of the provider session (session start).
    Ready(Duration),
    /// Progress of the reply the agent owes (a transcript, audio, its end).
    Reply(Duration),
}

impl ProviderWait {
    fn at(self) -> Duration {
        match self {
            ProviderWait::Ready(at) | ProviderWait::Reply(at) => at,
        }
    }
}
/// An external agent's result (seed 000's agent callbacks; N.E.K.O.'s `agent_notification`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentResult {
    /// The result, as the model should read it.
    pub text: String,
    /// Which agent produced it.
    pub source: String,
    /// Its status (`completed`, `failed`, ...).
    pub status: String,
    /// Speak it now (a reply is generated at once) instead of waiting for the user's next turn.
    #[serde(default)]
    pub speak_now: bool,
}

/// A 20 ms frame of the character's voice, encoded by the playout.
#[derive(Debug)]
pub struct AudioFrame<'a> {
    /// The encoded frame (Opus).
    pub payload: &'a [u8],
    /// The agent item (reply) it belongs to: dialects that name replies (N.E.K.O. `speech_id`,
    /// oai-events `item_id`) tag their audio with it.
    pub item_id: &'a str,
    /// Its playout time (media time): the RTP timestamp is `due` in 48 kHz units.
    pub due: Duration,
    /// First frame of a talk spurt (RTP marker).
    pub talkspurt_start: bool,
    /// How late the frame leaves (`now - due`).
    pub lateness: Duration,
    /// A 1-byte Opus DTX frame ending a talk spurt (`media::OutFrame::dtx`, RFC 6716 §3.2.1): no
    /// audio and no item (`item_id` empty). RTP links send it; links that carry PCM skip it.
    pub dtx: bool,
}

/// What the caller must do, from [`Conversation::poll_output`].
#[derive(Debug)]
pub enum Output<'a> {
    /// Send this event to the client.
    Event(ServerEvent),
    /// The agent state changed: tell the client (`state`) and the registry.
    State(AgentState),
    /// Send this command to the provider (`try_send`; on refusal feed [`Input::Refused`], except
    /// audio, which is dropped and counted).
    Provider(ProviderCommand),
    /// A final turn for the transcript (store).
    Turn {
        /// Who spoke.
        role: Role,
        /// What was said; for a cut agent turn, what was heard.
        text: String,
        /// Whether barge-in cut it.
        interrupted: bool,
    },
    /// Moderation flagged agent text (store it for review; never send it to the client).
    Flag(Flag),
    /// Send this frame of the character's voice now.
    Audio(AudioFrame<'a>),
    /// End the session.
    End(EndReason),
}

/// Agent (or user) text that moderation flagged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flag {
    /// The agent item that was cut.
    pub item_id: String,
    /// The category that matched.
    pub category: String,
    /// The denied text (the flagged sentence).
    pub text: String,
    /// The policy's version ([`crate::moderation::Moderator::version`]).
    pub policy_version: String,
    /// Whose text it was.
    pub source: Source,
}

/// Owned outputs waiting in the queue (audio is kept in the core's frame buffer).
#[derive(Debug)]
enum Queued {
    Event(ServerEvent),
    State(AgentState),
    Provider(ProviderCommand),
    Turn { role: Role, text: String, interrupted: bool },
    Flag(Flag),
    Audio { len: usize, due: Duration, talkspurt_start: bool, lateness: Duration, dtx: bool },
    End(EndReason),
}

/// The part of an audio delta still waiting for room in the playout queue.
struct PendingAudio {
    item_id: String,
    pcm: Pcm,
    /// Samples of `pcm` already accepted.
    offset: usize,
}

/// The user's turn in flight (turn latency): committed at, the silence waited, first agent audio.
#[derive(Debug, Clone, Copy)]
struct TurnTiming {
    committed_at: Duration,
    silence: Duration,
    first_audio_at: Option<Duration>,
}

/// The conversation state machine of one session. See the module docs.
pub struct Conversation {
    cfg: ConversationConfig,
    media: MediaParts,
    /// Connected but no audio from the client (checked on every timeout).
    no_audio: media::NoAudioWatch,
    out: VecDeque<Queued>,
    frame: Box<[u8; MAX_FRAME_BYTES]>,
    /// The item of the frame in `frame` (reused buffer: no allocation per frame).
    frame_item: String,
    now: Duration,
    client_connected: bool,
    ready_sent: bool,
    provider_ready: bool,
    greeted: bool,
    state: AgentState,
    /// The agent item currently being played or prepared.
    agent_item: Option<String>,
    /// An item we cut: its late audio and text are dropped.
    cancelled_item: Option<String>,
    /// The provider said the reply is complete; back to listening when playout drains.
    response_done: bool,
    pending: Option<PendingAudio>,
    /// Media time of the first client packet: VAD positions are relative to it.
    first_audio: Option<Duration>,
    /// Provider audio arrived while playout was idle (downlink latency start).
    idle_audio_at: Option<Duration>,
    turn: Option<TurnTiming>,
    /// User turns committed by our VAD so far.
    turns: u64,
    /// User speech started since the last commit (a turn to commit).
    turn_open: bool,
    /// Timed events due now (reused buffer).
    due: Vec<ServerEvent>,
    /// The last typed user turn, already recorded: its echo as a provider transcript is not.
    typed_pending: Option<String>,
    last_activity: Duration,
    /// The conversation as the user heard it: this core is its one writer; the provider layers
    /// read it ([`Conversation::history_view`]).
    history: SharedHistory,
    /// Why the agent was last cut off.
    last_interruption: Option<InterruptReason>,
    /// The agent item whose text is being released, and how many bytes of it passed moderation.
    moderated: Option<(String, usize)>,
    /// The user item whose transcript moderation flagged: its later transcripts are dropped.
    flagged_user_item: Option<String>,
    /// Usage and caps of the session.
    budget: Budget,
    /// A budget was reached with [`OnLimit::Degrade`]: the model gets no more user input.
    degraded: bool,
    /// The session is recorded (announced in `session.ready`).
    recording: bool,
    /// The provider deadline in force (session start, or the reply owed).
    provider_wait: Option<ProviderWait>,
    /// Some provider event arrived since `provider_wait` was armed (a live but unhelpful provider
    /// is not replaced; a silent one is).
    provider_heard: bool,
    /// Deadlines missed in a row with nothing heard from the provider.
    silent_deadlines: u32,
    /// Client images: one per second passes ([`crate::image`]); the client was told of drops.
    images: crate::image::ImageGate,
    images_told: bool,
    /// The client's last playback report: (item, played, when reported).
    client_played: Option<(String, Duration, Duration)>,
}

impl Conversation {
    /// A conversation at media time zero, agent `initializing`.
    pub fn new(cfg: ConversationConfig, media: MediaParts) -> Self {
        let budget = Budget::new(cfg.budget.clone());
        let cfg_start = cfg.start_timeout;
        Self {
            cfg,
            media,
            out: VecDeque::with_capacity(32),
            frame: Box::new([0; MAX_FRAME_BYTES]),
            frame_item: String::with_capacity(64),
            now: Duration::ZERO,
            client_connected: false,
            ready_sent: false,
            provider_ready: false,
            greeted: false,
            state: AgentState::Initializing,
            agent_item: None,
            cancelled_item: None,
            response_done: false,
            pending: None,
            first_audio: None,
            idle_audio_at: None,
            turn: None,
            turns: 0,
            turn_open: false,
            due: Vec::with_capacity(16),
            typed_pending: None,
            last_activity: Duration::ZERO,
            history: SharedHistory::default(),
            no_audio: media::NoAudioWatch::new(NO_AUDIO_AFTER),
            last_interruption: None,
            moderated: None,
            flagged_user_item: None,
            budget,
            degraded: false,
            recording: false,
            provider_wait: cfg_start.map(ProviderWait::Ready),
            provider_heard: false,
            silent_deadlines: 0,
            images: crate::image::ImageGate::default(),
            images_told: false,
            client_played: None,
        }
    }

    /// What the core was built with.
    pub fn config(&self) -> &ConversationConfig {
        &self.cfg
    }

    /// Announce in `session.ready` that the session is recorded ([`crate::recording`]).
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    /// Feed one input at media time `now` (monotonic). Drain [`Self::poll_output`] afterwards.
    pub fn handle_input(&mut self, now: Duration, input: Input) {
        self.now = self.now.max(now);
        match input {
            Input::ClientOpus { seq, timestamp, payload_type, ssrc, payload } => {
                let packet = media::RtpIn { seq, timestamp, payload_type, ssrc, payload: &payload };
                self.on_client_audio(packet)
            }
            Input::MediaConnected => self.no_audio.connected(self.now),
            Input::ClientConnected => {
                self.client_connected = true;
                self.maybe_ready();
            }
            Input::ClientDisconnected => self.client_connected = false,
            Input::Client(ev) => self.on_client_event(ev),
            Input::BadClientMessage { code, message } => {
                self.last_activity = self.now;
                self.event(ServerEvent::Error { code, message });
            }
            Input::UserText(text) => self.user_text(text),
            Input::AgentResult(r) => self.agent_result(r),
            Input::ClientVoice(v) => self.on_client_voice(v),
            Input::ClientPlayback { item_id, played } => self.client_played = Some((item_id, played, self.now)),
            Input::Provider(ev) => self.on_provider_event(ev),
            Input::Refused(cmd) => self.on_refused(cmd),
            Input::Timeout => self.on_timeout(),
        }
        self.push_pending();
        self.check_budget();
    }

    /// The next thing to do, until `None`.
    pub fn poll_output(&mut self) -> Option<Output<'_>> {
        Some(match self.out.pop_front()? {
            Queued::Event(e) => Output::Event(e),
            Queued::State(s) => Output::State(s),
            Queued::Provider(c) => Output::Provider(c),
            Queued::Turn { role, text, interrupted } => Output::Turn { role, text, interrupted },
            Queued::Flag(f) => Output::Flag(f),
            Queued::Audio { len, due, talkspurt_start, lateness, dtx } => {
                let payload = &self.frame[..len];
                let item_id = if dtx { "" } else { self.frame_item.as_str() };
                Output::Audio(AudioFrame { payload, item_id, due, talkspurt_start, lateness, dtx })
            }
            Queued::End(r) => Output::End(r),
        })
    }

    /// When to feed [`Input::Timeout`] next (media time): the next frame due, the idle deadline,
    /// the end of the uplink's wait for a missing packet, the provider deadline. (The no-audio
    /// watch is checked on every timeout; the task feeds one at least once a second.)
    pub fn poll_timeout(&self) -> Option<Duration> {
        let idle = self.cfg.idle_timeout.map(|t| self.last_activity + t);
        let provider = self.provider_wait.map(ProviderWait::at);
        [self.media.playout.next_due(), idle, self.media.uplink.next_timeout(), self.budget.deadline(), provider]
            .into_iter()
            .flatten()
            .min()
    }

    /// Whether the caller should read provider events now (no audio waiting for playout room).
    pub fn wants_provider_events(&self) -> bool {
        self.pending.is_none() && self.media.playout.has_room_for(PLAYOUT_HEADROOM)
    }

    /// The agent's conversational state.
    pub fn agent_state(&self) -> AgentState {
        self.state
    }

    /// The conversation so far, as the user heard it (bounded: [`crate::providers::History`]):
    /// user turns (spoken or typed), agent turns as heard, agent results.
    pub fn history(&self) -> Vec<HistoryItem> {
        self.history.to_vec()
    }

    /// A read-only view of [`Self::history`] for the provider session's
    /// [`crate::providers::SessionConfig::session_history`]: the resilience layer replays it into
    /// every provider session it opens (one owner of the history: this core).
    pub fn history_view(&self) -> HistoryView {
        self.history.view()
    }

    /// Why the agent was last cut off (user speech, with its stream position, or the client's
    /// request).
    pub fn last_interruption(&self) -> Option<InterruptReason> {
        self.last_interruption
    }

    /// Uplink counters (packets, loss, PLC, FEC).
    pub fn uplink_stats(&self) -> media::UplinkStats {
        self.media.uplink.stats()
    }

    /// Playout counters (frames out, late frames).
    pub fn playout_stats(&self) -> media::PlayoutStats {
        self.media.playout.stats()
    }

    /// Tell the encoder the loss the client reports (percent; in-band FEC follows it).
    pub fn set_expected_loss(&mut self, pct: u8) -> Result<(), media::MediaError> {
        self.media.playout.set_expected_loss(pct)
    }

    fn event(&mut self, ev: ServerEvent) {
        self.out.push_back(Queued::Event(ev));
    }

    fn command(&mut self, cmd: ProviderCommand) {
        use ProviderCommand::{AppendAudio, CommitTurn, GenerateReply, SpeechStarted, Text};
        if self.degraded && matches!(cmd, AppendAudio(_) | SpeechStarted | CommitTurn | Text(_) | GenerateReply { .. })
        {
            return;
        }
        self.out.push_back(Queued::Provider(cmd));
    }

    /// What the session used so far (stored when it ends).
    pub fn usage(&self) -> SessionUsage {
        self.budget.usage(self.now)
    }

    /// A budget reached: the client is told once; then the session ends (a reply being spoken
    /// is cut there, its heard part recorded) or degrades (the model gets no more input).
    /// Checked once the client listens (`session.ready` sent), so the event reaches it; a cap
    /// reached before is reported then.
    fn check_budget(&mut self) {
        if !self.ready_sent {
            return;
        }
        let Some(hit) = self.budget.check(self.now) else { return };
        tracing::info!(session_id = %self.cfg.session_id, kind = hit.kind.as_str(), scope = hit.scope.as_str(),
            limit = hit.limit, used = hit.used, action = hit.action.as_str(), "budget reached");
        self.event(hit.event());
        match hit.action {
            OnLimit::End => {
                if self.media.playout.is_active() || self.agent_item.is_some() {
                    let cut = self.media.barge_in.interrupt(&mut self.media.playout);
                    self.interrupt(cut, InterruptReason::Budget);
                }
                self.out.push_back(Queued::End(EndReason::BudgetExceeded));
            }
            OnLimit::Degrade => self.degraded = true,
        }
    }

    fn set_state(&mut self, state: AgentState) {
        if self.state != state {
            self.state = state;
            self.out.push_back(Queued::State(state));
        }
        self.follow_reply_deadline();
    }

    /// A reply is owed while the agent is thinking or speaking: its deadline runs (from the
    /// moment it became owed); otherwise none does. The start deadline is left alone.
    fn follow_reply_deadline(&mut self) {
        let owed = matches!(self.state, AgentState::Thinking | AgentState::Speaking);
        match (owed, self.provider_wait) {
            (true, None) => self.arm_reply_deadline(),
            (false, Some(ProviderWait::Reply(_))) => self.provider_wait = None,
            _ => {}
        }
    }

    fn arm_reply_deadline(&mut self) {
        if let Some(t) = self.cfg.reply_timeout {
            self.provider_wait = Some(ProviderWait::Reply(self.now + t));
            self.provider_heard = false;
        }
    }

    /// Record a final turn (of provider item `item_id`, if any): the transcript (store) and the
    /// history.
    fn record(&mut self, role: Role, text: &str, interrupted: bool, item_id: Option<&str>) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        self.budget.on_text(text);
        self.history.push(HistoryItem::said(role, text.to_owned()), item_id);
        self.out.push_back(Queued::Turn { role, text: text.to_owned(), interrupted });
    }

    /// Send the timed events that are due, in order.
    fn flush_due(&mut self) {
        let mut due = std::mem::take(&mut self.due);
        self.out.extend(due.drain(..).map(Queued::Event));
        self.due = due;
    }

    /// `session.ready` and listening once both the client and the provider are up.
    fn maybe_ready(&mut self) {
        if self.ready_sent || !self.client_connected {
            return;
        }
        self.ready_sent = true;
        self.event(ServerEvent::SessionReady {
            session_id: self.cfg.session_id.clone(),
            protocol: signaling::events::PROTOCOL_VERSION,
            character: self.cfg.character.clone(),
            provider: self.cfg.provider.clone(),
            recording: self.recording,
        });
        self.event(ServerEvent::State { state: AgentState::Initializing });
        if self.provider_ready {
            self.set_state(AgentState::Listening);
            self.maybe_greet();
        }
    }

    /// Speak first (the greeting) once the client listens and the model is ready.
    fn maybe_greet(&mut self) {
        if self.greeted || !self.ready_sent || !self.provider_ready {
            return;
        }
        let Some(instructions) = self.cfg.greeting.clone() else { return };
        self.greeted = true;
        self.command(ProviderCommand::GenerateReply { instructions: Some(instructions) });
        self.set_state(AgentState::Thinking);
    }

    /// A command we assumed sent was refused: a requested reply will not come.
    fn on_refused(&mut self, cmd: ProviderCommand) {
        if matches!(cmd, ProviderCommand::UpdateSession(_) | ProviderCommand::ToolOutput { .. }) {
            let message = "the model is busy and did not take the client's message; send it again".into();
            return self.event(ServerEvent::Error { code: "busy".into(), message });
        }
        if !matches!(cmd, ProviderCommand::Text(_) | ProviderCommand::GenerateReply { .. }) {
            return;
        }
        // The `thinking` that followed the command has not left yet (outputs are drained in
        // order): take it back rather than flip the client's state twice.
        let before = self.out.len();
        self.out.retain(|q| !matches!(q, Queued::State(AgentState::Thinking)));
        if self.out.len() == before {
            self.set_state(AgentState::Listening);
        } else {
            self.state = AgentState::Listening;
        }
        self.follow_reply_deadline();
        if matches!(cmd, ProviderCommand::Text(_)) {
            self.event(ServerEvent::Error { code: "busy".into(), message: "the model is busy; try again".into() });
        }
    }

    fn on_timeout(&mut self) {
        if !self.out.iter().any(|q| matches!(q, Queued::Audio { .. })) {
            self.pace();
        }
        if self.media.uplink.next_timeout().is_some_and(|t| t <= self.now) {
            // A packet held behind a gap waited long enough: release what follows it.
            self.media.uplink.handle_timeout(self.now);
            self.drain_uplink();
        }
        self.watch_audio();
        self.check_provider_deadline();
        let Some(idle) = self.cfg.idle_timeout else { return };
        if self.now >= self.last_activity + idle {
            if self.media.playout.is_active() {
                self.last_activity = self.now;
            } else {
                self.out.push_back(Queued::End(EndReason::IdleTimeout));
            }
        }
    }

    /// Take the frame that is due, if any, with the timed events it reaches.
    fn pace(&mut self) {
        let now = self.now;
        let Some(frame) = self.media.playout.poll(now, &mut self.frame[..]) else {
            self.after_playout_progress();
            return;
        };
        let (due, talkspurt_start, len) = (frame.due, frame.talkspurt_start, frame.len);
        if frame.dtx {
            // The end of a talk spurt: no audio, nothing heard, the agent state is unchanged.
            let lateness = now.saturating_sub(due);
            self.out.push_back(Queued::Audio { len, due, talkspurt_start, lateness, dtx: true });
            self.after_playout_progress();
            return;
        }
        self.media.speech.on_frame(frame.item_id, frame.item_offset, media::FRAME, &mut self.due);
        if self.frame_item != frame.item_id {
            self.frame_item.clear();
            self.frame_item.push_str(frame.item_id);
        }
        let lateness = now.saturating_sub(due);
        self.out.push_back(Queued::Audio { len, due, talkspurt_start, lateness, dtx: false });
        self.last_activity = now;
        if let Some(t) = self.idle_audio_at.take() {
            telemetry::observe(telemetry::DOWNLINK_LATENCY, now.saturating_sub(t));
        }
        if let Some(turn) = self.turn.take() {
            observe_turn(turn, now);
        }
        self.set_state(AgentState::Speaking);
        self.flush_due();
        self.after_playout_progress();
    }

    /// Back to listening once the reply is complete and fully played; its final transcript (and
    /// anything not yet sent) goes out, and the turn is recorded.
    fn after_playout_progress(&mut self) {
        if !self.response_done || self.media.playout.is_active() {
            return;
        }
        self.response_done = false;
        self.agent_item = None;
        if let Some((item_id, text, complete)) = self.media.speech.finish(&mut self.due) {
            self.record(Role::Agent, &text, !complete, Some(&item_id));
        }
        self.flush_due();
        if matches!(self.state, AgentState::Speaking | AgentState::Thinking) {
            self.set_state(AgentState::Listening);
        }
    }

    /// Move pending provider audio into the playout as far as it has room.
    fn push_pending(&mut self) {
        let Some(p) = self.pending.as_mut() else { return };
        let rest = &p.pcm.samples[p.offset..];
        match self.media.playout.push(&p.item_id, media::PcmRef { rate_hz: p.pcm.rate_hz, samples: rest }) {
            Ok(accepted) => {
                p.offset += accepted;
                if p.offset >= p.pcm.samples.len() {
                    self.pending = None;
                }
            }
            Err(e) => {
                tracing::warn!(session_id = %self.cfg.session_id, error = %e, "agent audio dropped");
                self.pending = None;
            }
        }
    }

    // --- the user ---

    /// "Connected but no audio": log, count and tell the client once per silent stretch.
    fn watch_audio(&mut self) {
        match self.no_audio.check(self.now, self.media.uplink.stats().last_arrival) {
            Some(media::NoAudio::Started { since }) => {
                let secs = self.now.saturating_sub(since).as_secs();
                tracing::warn!(silent_secs = secs, "connected but no audio from the client");
                metrics::counter!(telemetry::NO_AUDIO_TOTAL).increment(1);
                let message =
                    format!("no audio from your microphone for {secs} s: check that it is unmuted and sending");
                self.event(ServerEvent::Error { code: "no_audio".into(), message });
            }
            Some(media::NoAudio::Recovered) => tracing::info!("audio from the client resumed"),
            None => {}
        }
    }

    fn on_client_audio(&mut self, packet: media::RtpIn<'_>) {
        let now = self.now;
        self.first_audio.get_or_insert(now);
        self.media.uplink.push(now, packet);
        self.drain_uplink();
    }

    /// Everything the uplink has ready: audio to the provider, then the VAD edges.
    fn drain_uplink(&mut self) {
        let (mut started, mut stopped) = (None, None);
        while let Some(ev) = self.media.uplink.poll() {
            match ev {
                UplinkEvent::Audio(_) if self.degraded => {}
                UplinkEvent::Audio(pcm) => {
                    let pcm = Pcm { rate_hz: pcm.rate_hz, samples: pcm.samples.to_vec() };
                    self.out.push_back(Queued::Provider(ProviderCommand::AppendAudio(pcm)));
                }
                UplinkEvent::SpeechStarted { at } => started = Some(at),
                UplinkEvent::SpeechStopped { at } => stopped = Some(at),
            }
        }
        if let Some(at) = started {
            self.on_speech_started(at);
        }
        if let Some(at) = stopped {
            self.on_speech_stopped(at);
        }
    }

    /// Our VAD heard the user start speaking at stream position `at`.
    fn on_speech_started(&mut self, at: Duration) {
        self.last_activity = self.now;
        self.turn_open = true;
        let base = self.first_audio.unwrap_or_default();
        self.event(ServerEvent::UserSpeechStarted { at_ms: ms(base + at) });
        self.command(ProviderCommand::SpeechStarted);
        if self.barge_in(at) {
            let ago = self.media.uplink.position().saturating_sub(at);
            telemetry::observe(telemetry::BARGE_IN_LATENCY, ago);
        }
    }

    /// User speech (ours or the provider's VAD) over the agent: cut it. True when it was cut.
    fn barge_in(&mut self, at: Duration) -> bool {
        let cut = self.media.barge_in.on_speech_started(at, &mut self.media.playout);
        // Speaking with nothing left in playout (between the last frame and `response.done`).
        let finishing = self.state == AgentState::Speaking && !self.media.playout.is_active();
        if cut.is_none() && !finishing {
            return false;
        }
        self.interrupt(cut, InterruptReason::UserSpeech { at });
        true
    }

    /// Our VAD heard the user stop at `at`: that ends the user's turn. `CommitTurn` always goes
    /// down (the resilience layer needs the edge); it reaches only providers without their own
    /// turn detection ([`crate::providers::Capabilities::server_vad`]), which the layer filters.
    fn on_speech_stopped(&mut self, at: Duration) {
        let base = self.first_audio.unwrap_or_default();
        self.event(ServerEvent::UserSpeechStopped { at_ms: ms(base + at) });
        self.commit_turn(self.media.uplink.position().saturating_sub(at));
    }

    /// The client's VAD or push-to-talk: a start barges in as ours does; a stop or `end_turn`
    /// commits the open turn at once (once: our VAD's later stop finds it committed).
    fn on_client_voice(&mut self, v: super::link::ClientVoice) {
        use super::link::ClientVoice;
        self.last_activity = self.now;
        match v {
            ClientVoice::SpeechStarted if !self.turn_open => self.on_speech_started(self.media.uplink.position()),
            ClientVoice::SpeechStarted => {}
            ClientVoice::SpeechStopped | ClientVoice::EndTurn => self.commit_turn(Duration::ZERO),
        }
    }

    /// End the user's open turn: the provider answers it.
    fn commit_turn(&mut self, silence: Duration) {
        if !std::mem::take(&mut self.turn_open) || self.degraded {
            return;
        }
        self.command(ProviderCommand::CommitTurn);
        self.turn = Some(TurnTiming { committed_at: self.now, silence, first_audio_at: None });
        self.turns += 1;
        tracing::Span::current().record("turn", self.turns);
        tracing::debug!(silence_ms = ms(silence), "user turn committed");
        self.set_state(AgentState::Thinking);
    }

    fn on_client_event(&mut self, ev: Option<ClientEvent>) {
        self.last_activity = self.now;
        match ev {
            Some(ClientEvent::Ping) => self.event(ServerEvent::Pong),
            Some(ClientEvent::Interrupt) => {
                if self.media.playout.is_active() || self.agent_item.is_some() {
                    let cut = self.media.barge_in.interrupt(&mut self.media.playout);
                    self.interrupt(cut, InterruptReason::ClientRequest);
                }
            }
            Some(ClientEvent::Text { text }) => self.user_text(text),
            Some(ClientEvent::Image { data }) => self.image(&data),
            Some(ClientEvent::SessionUpdate { instructions, voice, tools, .. }) => {
                self.session_update(instructions, voice, tools)
            }
            Some(ClientEvent::ToolOutput { call_id, output }) => {
                if output.len() > signaling::events::MAX_TOOL_OUTPUT {
                    let limit = signaling::events::MAX_TOOL_OUTPUT;
                    let message = format!("tool.output.output is {} bytes; the limit is {limit}", output.len());
                    self.event(ServerEvent::Error { code: "bad_tool_output".into(), message });
                    return;
                }
                self.command(ProviderCommand::ToolOutput { call_id, output });
            }
            Some(_) | None => {}
        }
    }

    /// A client's screen or camera frame: to a provider that takes images, checked and at most
    /// one per second ([`crate::image`]). A provider without images, and the first frame dropped
    /// by the rate limit, get one `error` each (`images_unsupported`, `image_rate_limited`); a
    /// bad or oversized frame gets `bad_image` / `image_too_large` every time.
    fn image(&mut self, data_url: &str) {
        if !self.cfg.caps.images {
            if !std::mem::replace(&mut self.images_told, true) {
                let message = format!("the `{}` provider does not take images; they are dropped", self.cfg.provider);
                self.event(ServerEvent::Error { code: "images_unsupported".into(), message });
            }
            return;
        }
        let image = match crate::image::ImageFrame::from_data_url(data_url) {
            Ok(image) => image,
            Err(e) => return self.event(ServerEvent::Error { code: e.code().into(), message: e.to_string() }),
        };
        if self.images.admit(self.now) {
            self.command(ProviderCommand::Image(image));
        } else if !std::mem::replace(&mut self.images_told, true) {
            let message = format!(
                "at most one image per {} ms reaches the model; the others are dropped",
                crate::image::MIN_IMAGE_INTERVAL.as_millis()
            );
            self.event(ServerEvent::Error { code: "image_rate_limited".into(), message });
        }
    }

    /// The client's `session.update`: checked against the limits, then handed to the provider
    /// (which applies what it can and answers an `error` for the rest).
    fn session_update(
        &mut self,
        instructions: Option<String>,
        voice: Option<String>,
        tools: Option<Vec<signaling::events::ToolDeclaration>>,
    ) {
        use signaling::events::{MAX_CLIENT_INSTRUCTIONS, MAX_CLIENT_TOOLS, ToolDeclaration};
        let bad = |message: String| ServerEvent::Error { code: "bad_session_update".into(), message };
        if instructions.as_ref().is_some_and(|i| i.len() > MAX_CLIENT_INSTRUCTIONS) {
            return self.event(bad(format!("instructions are limited to {MAX_CLIENT_INSTRUCTIONS} bytes")));
        }
        if voice.as_ref().is_some_and(|v| !ToolDeclaration::valid_name(v)) {
            return self.event(bad("voice must be 1 to 64 of a-z A-Z 0-9 _ -".into()));
        }
        if let Some(t) = &tools {
            if t.len() > MAX_CLIENT_TOOLS {
                return self.event(bad(format!("at most {MAX_CLIENT_TOOLS} tools")));
            }
            if let Some(d) = t.iter().find(|d| !ToolDeclaration::valid_name(&d.name)) {
                return self.event(bad(format!("tool name `{}` must be 1 to 64 of a-z A-Z 0-9 _ -", d.name)));
            }
            if let Some(d) = t.iter().find(|d| !(d.parameters.is_null() || d.parameters.is_object())) {
                return self.event(bad(format!("tool `{}`: parameters must be a JSON schema object", d.name)));
            }
        }
        let tools = tools.map(|t| t.into_iter().map(crate::providers::tools::ToolSpec::from).collect());
        let update = crate::providers::SessionUpdate { instructions, voice, tools };
        if !update.is_empty() {
            self.command(ProviderCommand::UpdateSession(update));
        }
    }

    /// An agent's result: the client is told; the model gets it as context for its next reply
    /// (every provider takes history items), or answers with it now when `speak_now` is set.
    fn agent_result(&mut self, r: AgentResult) {
        self.last_activity = self.now;
        let note = HistoryItem::User(format!("[result from {} ({})] {}", r.source, r.status, r.text));
        // Context, not speech: in the history (replayed on reconnect), not in the transcript.
        self.history.push(note.clone(), None);
        self.command(ProviderCommand::AppendHistory(vec![note]));
        if r.speak_now && !self.degraded && self.agent_item.is_none() && !self.media.playout.is_active() {
            let instructions =
                format!("Tell the user, briefly and in character, this result from {}: {}", r.source, r.text);
            self.command(ProviderCommand::GenerateReply { instructions: Some(instructions) });
            self.set_state(AgentState::Thinking);
        }
        self.event(ServerEvent::AgentNotification { text: r.text, source: r.source, status: r.status });
    }

    /// A typed (or injected) user turn: recorded at once, then handed to the provider.
    fn user_text(&mut self, text: String) {
        self.last_activity = self.now;
        if self.degraded {
            let message = "this session's budget is used up: the character no longer answers".into();
            self.event(ServerEvent::Error { code: "budget_exceeded".into(), message });
            return;
        }
        if let Some(flag) = self.check_user("", &text) {
            // Never recorded nor sent: the model does not see it.
            self.moderation_cut(flag);
            return;
        }
        if self.media.playout.is_active() {
            let cut = self.media.barge_in.interrupt(&mut self.media.playout);
            self.interrupt(cut, InterruptReason::ClientRequest);
        }
        self.record(Role::User, &text, false, None);
        self.typed_pending = Some(text.trim().to_owned());
        self.command(ProviderCommand::Text(text));
        self.set_state(AgentState::Thinking);
    }

    /// Cut the agent off: the client is told, the provider told what was heard, the turn recorded.
    fn interrupt(&mut self, cut: Option<Interruption>, reason: InterruptReason) {
        let item = match (cut, &self.agent_item) {
            (Some(c), _) => {
                let played = self.played_by_client(&c.item_id, c.played);
                Some((c.item_id, played))
            }
            (None, Some(item)) => Some((item.clone(), Duration::ZERO)),
            (None, None) => None,
        };
        tracing::debug!(?reason, item = ?item.as_ref().map(|i| &i.0), "agent interrupted");
        self.last_interruption = Some(reason);
        self.command(ProviderCommand::Cancel);
        if let Some((item_id, played)) = item {
            // The agent's turn ends with the words released while it played.
            let heard = self.media.speech.cut().map(|(_, heard)| heard).unwrap_or_default();
            // Always sent: the layers below keep the heard text from it; a provider that cannot
            // cut its own context ([`Capabilities::truncation`] false) ignores it.
            let (truncated, heard_text) = (item_id.clone(), heard.clone());
            self.command(ProviderCommand::Truncate { item_id: truncated, audio_end: played, heard: heard_text });
            self.event(ServerEvent::AgentInterrupted { item_id: item_id.clone(), played_ms: ms(played) });
            self.record(Role::Agent, &heard, true, Some(&item_id));
            let transcript =
                ServerEvent::Transcript { role: Role::Agent, item_id: item_id.clone(), text: heard, is_final: true };
            self.event(transcript);
            self.cancelled_item = Some(item_id);
        }
        self.agent_item = None;
        self.response_done = false;
        self.pending = None;
        self.set_state(AgentState::Listening);
    }

    /// What the client played of `item_id` by now: its last report plus the time since (it
    /// kept playing), never more than `sent`; `sent` without a report of that item.
    fn played_by_client(&self, item_id: &str, sent: Duration) -> Duration {
        match &self.client_played {
            Some((item, played, at)) if item == item_id => (*played + (self.now - *at)).min(sent),
            _ => sent,
        }
    }

    // --- the provider ---

    fn is_cancelled(&self, item_id: &str) -> bool {
        self.cancelled_item.as_deref() == Some(item_id)
    }

    fn on_provider_event(&mut self, ev: ProviderEvent) {
        self.on_provider_progress(&ev);
        match ev {
            ProviderEvent::Ready => {
                self.provider_ready = true;
                if self.ready_sent {
                    self.set_state(AgentState::Listening);
                    self.maybe_greet();
                }
            }
            ProviderEvent::AudioDelta { item_id, pcm } => self.on_agent_audio(item_id, pcm),
            ProviderEvent::AudioDone { item_id } => {
                if !self.is_cancelled(&item_id) {
                    self.media.playout.finish_item(&item_id);
                    self.media.speech.on_audio_done(&item_id);
                }
            }
            ProviderEvent::Transcript { speaker, item_id, text, is_final } => {
                if !self.is_cancelled(&item_id) {
                    self.on_transcript(speaker, item_id, text, is_final);
                }
            }
            ProviderEvent::UserSpeechStarted => {
                if self.media.playout.is_active() {
                    self.barge_in(self.media.uplink.position());
                }
            }
            ProviderEvent::ResponseDone { item_id } => {
                if !self.is_cancelled(&item_id) {
                    self.response_done = true;
                    self.after_playout_progress();
                }
            }
            ev @ (ProviderEvent::Emotion { .. } | ProviderEvent::Gesture { .. } | ProviderEvent::Viseme { .. }) => {
                self.on_expression(ev)
            }
            ProviderEvent::Usage { tokens } => self.budget.on_reported(tokens),
            // A client tool: the client runs it and answers `tool.output`.
            ProviderEvent::ToolCall { call_id, name, arguments } => {
                self.event(ServerEvent::ToolCall { call_id, name, arguments })
            }
            ProviderEvent::Moderated { item_id, category, text, policy_version, source, replaced } => {
                self.on_moderated(Flag { item_id, category, text, policy_version, source }, replaced)
            }
            ev => self.on_provider_status(ev),
        }
    }

    fn on_agent_audio(&mut self, item_id: String, pcm: Pcm) {
        if self.is_cancelled(&item_id) {
            return;
        }
        self.agent_item = Some(item_id.clone());
        self.last_activity = self.now;
        if !self.media.playout.is_active() {
            self.idle_audio_at = Some(self.now);
        }
        if let Some(turn) = self.turn.as_mut() {
            turn.first_audio_at.get_or_insert(self.now);
        }
        self.media.speech.on_audio(&item_id, pcm.as_ref(), &mut self.due);
        self.pending = Some(PendingAudio { item_id, pcm, offset: 0 });
    }

    fn on_transcript(&mut self, speaker: Speaker, item_id: String, text: String, is_final: bool) {
        match speaker {
            // Agent words are sent as they are spoken (see `speech`), the final when played.
            Speaker::Agent => {
                self.agent_item.get_or_insert_with(|| item_id.clone());
                if let Some(text) = self.moderate(&item_id, text, is_final) {
                    self.media.speech.on_text(&item_id, &text, is_final, &mut self.due);
                }
            }
            Speaker::User => self.on_user_transcript(item_id, text, is_final),
        }
        self.flush_due();
    }

    /// The user's words as the provider transcribed them: checked when the policy checks user
    /// input (a flag drops this item's transcripts and cancels and replaces the reply to it).
    fn on_user_transcript(&mut self, item_id: String, text: String, is_final: bool) {
        if self.flagged_user_item.as_deref() == Some(item_id.as_str()) {
            return;
        }
        if let Some(flag) = self.check_user(&item_id, &text) {
            self.flagged_user_item = Some(item_id);
            self.moderation_cut(flag);
            return;
        }
        if is_final {
            // A typed turn is recorded when typed; its echo from the provider is not.
            if self.typed_pending.as_deref().is_some_and(|t| crate::providers::is_echo(t, &text)) {
                self.typed_pending = None;
            } else {
                self.record(Role::User, &text, false, Some(&item_id));
            }
        }
        self.event(ServerEvent::Transcript { role: Role::User, item_id, text, is_final });
    }

    /// The flag of user `text` (item `item_id`, `""` when typed), when the policy checks user
    /// input and its local lists match.
    fn check_user(&self, item_id: &str, text: &str) -> Option<Flag> {
        let moderator = self.cfg.moderator.as_ref().filter(|m| m.checks_user_input())?;
        let verdict = moderator.check(text)?;
        Some(Flag {
            item_id: item_id.to_owned(),
            category: verdict.category,
            text: text.trim().to_owned(),
            policy_version: moderator.version().to_owned(),
            source: Source::User,
        })
    }

    /// A flag from the provider side: `replaced` (the provider already says the fallback): only
    /// the client and the review queue are told; else the reply is cut and replaced here.
    fn on_moderated(&mut self, flag: Flag, replaced: bool) {
        let already_cut = flag.source == Source::Agent && self.is_cancelled(&flag.item_id);
        if replaced || already_cut {
            self.event(moderation_event(&flag));
            self.out.push_back(Queued::Flag(flag));
            return;
        }
        if flag.source == Source::User {
            self.flagged_user_item = Some(flag.item_id.clone());
        }
        self.moderation_cut(flag);
    }

    /// The part of the agent's cumulative `text` that may be released to speech (and so to the
    /// client): whole sentences, all of it when final, each checked before release. `None`:
    /// nothing new to release, or the reply was flagged and cut.
    fn moderate(&mut self, item_id: &str, text: String, is_final: bool) -> Option<String> {
        let Some(moderator) = self.cfg.moderator.clone() else { return Some(text) };
        let end = if is_final { text.len() } else { crate::moderation::sentence_end(&text)? };
        let checked = match &self.moderated {
            Some((id, n)) if id == item_id => (*n).min(end),
            _ => 0,
        };
        if end <= checked && !is_final {
            return None;
        }
        let fresh = text.get(checked..end).unwrap_or(&text);
        if let Some(verdict) = moderator.check(fresh) {
            let flag = Flag {
                item_id: item_id.to_owned(),
                category: verdict.category,
                text: fresh.trim().to_owned(),
                policy_version: moderator.version().to_owned(),
                source: Source::Agent,
            };
            self.moderation_cut(flag);
            return None;
        }
        self.moderated = Some((item_id.to_owned(), end));
        Some(text[..end].to_owned())
    }

    /// A flagged reply (or user turn): cut like a barge-in (the provider keeps only what was
    /// heard; a reply to flagged user speech is cancelled), tell the client the category, queue
    /// the flag for review, and have the character say the policy's fallback line.
    fn moderation_cut(&mut self, flag: Flag) {
        tracing::info!(session_id = %self.cfg.session_id, category = %flag.category, source = flag.source.as_str(), "flagged by moderation");
        let speaking = self.media.playout.is_active() || self.agent_item.is_some();
        if flag.source == Source::Agent || speaking {
            let cut = self.media.barge_in.interrupt(&mut self.media.playout);
            if flag.source == Source::Agent {
                self.agent_item.get_or_insert_with(|| flag.item_id.clone());
            }
            self.interrupt(cut, InterruptReason::Moderation);
        } else if !flag.item_id.is_empty() {
            // Flagged speech: the model may have begun a reply to it.
            self.command(ProviderCommand::Cancel);
        }
        self.moderated = None;
        self.event(moderation_event(&flag));
        self.out.push_back(Queued::Flag(flag));
        let fallback = self.cfg.moderator.as_ref().map(|m| m.fallback().to_owned()).unwrap_or_default();
        let instructions = format!("Say exactly this, and nothing else: \"{fallback}\"");
        self.command(ProviderCommand::GenerateReply { instructions: Some(instructions) });
        self.set_state(AgentState::Thinking);
    }

    /// Emotions, gestures and visemes: timed to the reply's audio.
    fn on_expression(&mut self, ev: ProviderEvent) {
        match ev {
            ProviderEvent::Emotion { item_id, emotion } => {
                if item_id.as_deref().is_some_and(|i| self.is_cancelled(i)) {
                    return;
                }
                let emotion =
                    Emotion::normalize(&emotion).unwrap_or_else(|| emotion.parse().unwrap_or(Emotion::Neutral));
                match item_id {
                    // An emotion inside a reply changes the face when the voice gets there.
                    Some(item) => {
                        self.agent_item.get_or_insert_with(|| item.clone());
                        self.media.speech.on_emotion(&item, emotion, &mut self.due);
                    }
                    None => self.event(ServerEvent::Emotion { emotion, item_id: None }),
                }
            }
            ProviderEvent::Gesture { item_id, gesture } if !self.is_cancelled(&item_id) => {
                self.agent_item.get_or_insert_with(|| item_id.clone());
                self.media.speech.on_gesture(&item_id, gesture, &mut self.due);
            }
            ProviderEvent::Viseme { item_id, viseme, start, duration } if !self.is_cancelled(&item_id) => {
                self.media.speech.on_viseme(&item_id, viseme, start, duration, &mut self.due);
            }
            _ => {}
        }
        self.flush_due();
    }

    /// Anything the provider itself sent (not the resilience layer's notices and errors) shows
    /// it alive; `Ready` ends the start deadline, progress on the owed reply moves its deadline on.
    fn on_provider_progress(&mut self, ev: &ProviderEvent) {
        if matches!(ev, ProviderEvent::Notice { .. } | ProviderEvent::Error { .. } | ProviderEvent::Closed) {
            return;
        }
        self.provider_heard = true;
        self.silent_deadlines = 0;
        match (ev, self.provider_wait) {
            (ProviderEvent::Ready, Some(ProviderWait::Ready(_))) => {
                self.provider_wait = None;
                self.follow_reply_deadline();
            }
            (
                ProviderEvent::AudioDelta { .. }
                | ProviderEvent::AudioDone { .. }
                | ProviderEvent::Transcript { speaker: Speaker::Agent, .. },
                Some(ProviderWait::Reply(_)),
            ) => self.arm_reply_deadline(),
            _ => {}
        }
    }

    /// A provider deadline passed (issue 12, kind 7): the client gets an `error`; an owed reply is
    /// given up (what was played of it is the agent's turn, the rest is dropped) and the agent
    /// listens again; a provider session that said nothing at all since the deadline was armed
    /// is replaced ([`ProviderCommand::Restart`]: reconnect or failover); a second silent miss in
    /// a row ends the session (`provider_error`).
    fn check_provider_deadline(&mut self) {
        let Some(wait) = self.provider_wait.filter(|w| w.at() <= self.now) else { return };
        if let ProviderWait::Reply(_) = wait
            && (self.media.playout.buffered() >= media::FRAME || self.pending.is_some())
        {
            // Still playing what came (a whole frame or more; less is a remainder that waits for
            // more audio): the provider is held back by us, not silent.
            self.arm_reply_deadline();
            self.provider_heard = true;
            return;
        }
        self.provider_wait = None;
        let silent = !self.provider_heard || matches!(wait, ProviderWait::Ready(_));
        self.silent_deadlines = if silent { self.silent_deadlines + 1 } else { 0 };
        let (code, limit, what) = match wait {
            ProviderWait::Ready(_) => ("provider_timeout", self.cfg.start_timeout, "get ready"),
            ProviderWait::Reply(_) => ("reply_timeout", self.cfg.reply_timeout, "answer"),
        };
        let secs = limit.unwrap_or_default().as_secs_f64();
        let provider = self.cfg.provider.clone();
        telemetry::add_with(telemetry::PROVIDER_ERRORS, "provider", provider, 1);
        tracing::warn!(session_id = %self.cfg.session_id, code, silent, "provider deadline passed");
        if self.silent_deadlines >= MAX_SILENT_DEADLINES {
            let message = format!("the model did not {what} within {secs} s, again; ending the session");
            self.event(ServerEvent::Error { code: code.into(), message });
            self.out.push_back(Queued::End(EndReason::ProviderError));
            return;
        }
        let message = if silent {
            format!("the model did not {what} within {secs} s; reconnecting to it")
        } else {
            format!("the model did not {what} within {secs} s; please try again")
        };
        self.event(ServerEvent::Error { code: code.into(), message });
        if let ProviderWait::Reply(_) = wait {
            self.command(ProviderCommand::Cancel);
            if let Some(item) = self.agent_item.clone() {
                // Less than a frame is left (a remainder waiting for audio that will not come).
                self.media.playout.clear();
                self.cancelled_item = Some(item);
                self.response_done = true;
                self.after_playout_progress();
            }
            self.pending = None;
            self.response_done = false;
            self.agent_item = None;
            self.set_state(AgentState::Listening);
        }
        if silent {
            self.command(ProviderCommand::Restart);
            if let ProviderWait::Ready(_) = wait {
                self.provider_wait = self.cfg.start_timeout.map(|t| ProviderWait::Ready(self.now + t));
                self.provider_heard = false;
            }
        }
    }

    /// Errors, notices, the end of the provider session: the client is told.
    fn on_provider_status(&mut self, ev: ProviderEvent) {
        let provider = &self.cfg.provider;
        let ev = match ev {
            ProviderEvent::Error { code, message, retryable } => {
                telemetry::add_with(telemetry::PROVIDER_ERRORS, "provider", provider.clone(), 1);
                tracing::warn!(session_id = %self.cfg.session_id, %code, %message, retryable, "provider error");
                ServerEvent::Error { code, message }
            }
            ProviderEvent::Notice { code, message } => {
                tracing::info!(session_id = %self.cfg.session_id, %code, %message, "provider notice");
                ServerEvent::Error { code, message }
            }
            ProviderEvent::Closed => {
                ServerEvent::Error { code: "provider_closed".into(), message: "the model session ended".into() }
            }
            _ => return,
        };
        self.event(ev);
    }
}

/// Turn latency parts, from the commit of the user's turn to the first frame out (media time).
fn observe_turn(turn: TurnTiming, out: Duration) {
    use telemetry::{TURN_LATENCY, observe_with};
    let first_audio = turn.first_audio_at.unwrap_or(out);
    observe_with(TURN_LATENCY, "part", "silence", turn.silence);
    observe_with(TURN_LATENCY, "part", "model", first_audio.saturating_sub(turn.committed_at));
    observe_with(TURN_LATENCY, "part", "server", out.saturating_sub(first_audio));
    observe_with(TURN_LATENCY, "part", "total", turn.silence + out.saturating_sub(turn.committed_at));
}

/// The client's `moderation` event of `flag`: category and source, never the text.
fn moderation_event(flag: &Flag) -> ServerEvent {
    ServerEvent::Moderation {
        category: flag.category.clone(),
        item_id: flag.item_id.clone(),
        source: flag.source.as_str().to_owned(),
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
#[path = "conversation_tests.rs"]
mod tests;
