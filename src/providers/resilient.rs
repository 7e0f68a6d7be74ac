//! Resilience above the provider trait: reconnect, make-before-break recycling and failover, once
//! for every provider.
//!
//! [`ResilientProvider`] wraps an ordered list of providers (the first is preferred; the rest are
//! failover targets) and is itself a [`RealtimeProvider`], so the session task sees one logical
//! provider session whatever happens underneath. One supervisor task per session owns the live
//! inner session and `select!`s over: commands from the session task, the inner session's events,
//! the next session being opened in the background (recycling), and the reconnect timer.
//!
//! What it replays is not its own: the conversation history is the session core's (one owner,
//! [`crate::session::conversation`]), read through [`SessionConfig::session_history`]: user turns
//! (spoken or typed), agent turns *as heard*, agent results, bounded to the most recent
//! [`super::MAX_HISTORY_ITEMS`] items / [`super::MAX_HISTORY_CHARS`] characters. Every session it
//! opens after the first starts with that history (after [`SessionConfig::history`], what the
//! first one started with). What it keeps itself: whether a reply is in flight (a turn was
//! committed or text sent, until `ResponseDone`), the item id of the reply being received, and
//! when the user last spoke (from the session's VAD edges: `SpeechStarted` .. `CommitTurn`).
//!
//! Invariants:
//! - Reconnect (socket dropped, `Closed`, or a `session_expired` error): the WebRTC leg stays up;
//!   the client gets a `provider_reconnecting` notice; a reply cut mid-way is closed for the task
//!   (`AudioDone` + `ResponseDone`), whose playout goes on; the session records the reply as heard
//!   when its playout ends, and the reconnect waits for that (at most [`HEARD_WAIT`]) so the new
//!   session starts with it in its history (recorded later, it is appended with
//!   `AppendHistory`). The new session is **never** asked to repeat an agent turn. Only a user turn that got
//!   no agent audio at all is answered again (`GenerateReply`), so no turn is lost either. Attempts
//!   back off with jitter (base x 2^n, x0.5..1.5, capped); after
//!   [`ResiliencePolicy::attempts_per_provider`] failed attempts, or as many drops within
//!   [`FLAPPING_WINDOW`], the next provider is tried (`provider_failover`); when none is left the
//!   session gets a final error and `Closed`.
//! - User audio during the gap is buffered up to [`ResiliencePolicy::gap_buffer`] (oldest dropped
//!   first and counted) and sent to the new session; other commands are queued (bounded).
//! - Recycling: [`ResiliencePolicy::recycle_lead`] before the inner provider's `max_session`, the
//!   next session is opened in the background with the history so far; it replaces the live one at
//!   the first turn boundary (no reply in flight and the user quiet for
//!   [`ResiliencePolicy::quiet_for`]), with the turns recorded meanwhile appended as history. A reply
//!   in flight is never cut by a swap, and an utterance only when it runs a whole lead time past
//!   the limit.
//!   Audio already handed to the session task keeps playing, so the user hears no gap. The limit
//!   is the one the provider declared when its session was adopted (a provider with expiring
//!   credentials declares the time to their expiry minus its margin: seed 002's recycling, for
//!   every provider), capped by [`ResiliencePolicy::max_session`]; a swap also waits until no
//!   agent audio came for [`AGENT_QUIET`].
//! - A turn whose provider sessions fail more than [`MAX_RESTARTS_PER_TURN`] times (no reply
//!   completed in between) is moved to the next provider, or given up with a final error.
//! - Capabilities are the preferred provider's, passed through as declared.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{
    AudioFormat, COMMAND_CHANNEL_CAPACITY, Capabilities, EVENT_CHANNEL_CAPACITY, History, HistoryItem, HistoryView,
    Pcm, ProviderCommand, ProviderError, ProviderEvent, ProviderSession, RealtimeProvider, SessionConfig,
    SessionUpdate, Speaker,
};

/// Commands (other than audio) queued while reconnecting.
const MAX_QUEUED_COMMANDS: usize = 16;
/// Drops of one provider within this window count towards failing over from it.
const FLAPPING_WINDOW: Duration = Duration::from_secs(120);
/// A swap also waits until the agent's audio has stopped coming for this long (seed 002: the
/// reply's end, then 1 s without new audio).
const AGENT_QUIET: Duration = Duration::from_secs(1);
/// A turn whose provider session fails more often than this is given up (seed 002).
pub const MAX_RESTARTS_PER_TURN: u32 = 3;
/// After a drop mid-reply, the reconnect waits at most this long for the session to record what
/// was heard of the reply (it does when the reply's playout ends: at most the playout queue plus
/// the event channel's audio), so the new session starts with it.
pub const HEARD_WAIT: Duration = Duration::from_secs(3);

/// How the wrapper reacts to trouble.
#[derive(Debug, Clone)]
pub struct ResiliencePolicy {
    /// Connect attempts per provider before failing over to the next.
    pub attempts_per_provider: u32,
    /// First reconnect delay.
    pub backoff_base: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// User audio kept while reconnecting.
    pub gap_buffer: Duration,
    /// Cap on the providers' `max_session` (None: each provider's own).
    pub max_session: Option<Duration>,
    /// Open the next session this long before the limit.
    pub recycle_lead: Duration,
    /// Silence required before a recycle swap.
    pub quiet_for: Duration,
    /// A reply (spoken or typed turn, greeting) that shows no sign of life this long is given up:
    /// the client gets a `reply_timeout` error and the agent listens again. The session's core
    /// keeps this deadline (`session::conversation`); a silent session is replaced through
    /// [`ProviderCommand::Restart`].
    pub reply_timeout: Duration,
}

impl Default for ResiliencePolicy {
    fn default() -> Self {
        Self {
            attempts_per_provider: 3,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(5),
            gap_buffer: Duration::from_secs(5),
            max_session: None,
            recycle_lead: Duration::from_secs(60),
            quiet_for: Duration::from_millis(1500),
            reply_timeout: Duration::from_secs(15),
        }
    }
}

/// A provider list with reconnect, recycling and failover.
pub struct ResilientProvider {
    chain: Vec<Arc<dyn RealtimeProvider>>,
    policy: ResiliencePolicy,
}

impl ResilientProvider {
    /// Wrap `chain` (non-empty; every provider must take the first one's input rate).
    pub fn new(chain: Vec<Arc<dyn RealtimeProvider>>, policy: ResiliencePolicy) -> Result<Self, ProviderError> {
        let first = chain.first().ok_or_else(|| ProviderError::Config("no provider to wrap".into()))?;
        let rate = first.input_format().rate_hz;
        if let Some(p) = chain.iter().find(|p| p.input_format().rate_hz != rate) {
            return Err(ProviderError::Config(format!(
                "failover provider `{}` takes {} Hz input but `{}` takes {rate} Hz; list providers with one input rate",
                p.name(),
                p.input_format().rate_hz,
                first.name()
            )));
        }
        Ok(Self { chain, policy })
    }
}

impl RealtimeProvider for ResilientProvider {
    fn name(&self) -> &str {
        self.chain[0].name()
    }

    /// Only when every provider of the chain does (a failover may land on any of them).
    fn moderates_text(&self) -> bool {
        self.chain.iter().all(|p| p.moderates_text())
    }

    /// The preferred provider's, as declared: the wrapper adds resilience, not abilities (a
    /// `CommitTurn` or `Truncate` a provider cannot use is still taken and not passed on).
    fn capabilities(&self) -> Capabilities {
        self.chain[0].capabilities()
    }

    fn input_format(&self) -> AudioFormat {
        self.chain[0].input_format()
    }

    /// The preferred provider's (a failover to one that speaks at another rate is resampled).
    fn output_format(&self) -> AudioFormat {
        self.chain[0].output_format()
    }

    fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>> {
        let chain = self.chain.clone();
        let policy = self.policy.clone();
        async move {
            // The first session: each provider once, in order (the client is waiting for its answer).
            let mut last_err = None;
            for (idx, p) in chain.iter().enumerate() {
                match p.connect(cfg.clone()).await {
                    Ok(inner) => {
                        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
                        let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
                        let sup = Supervisor::new(chain, policy, cfg, idx, inner, ev_tx);
                        if idx > 0 {
                            let notice = failover_notice(&sup.chain[0..idx], sup.chain[idx].name());
                            let _ = sup.events.try_send(notice);
                        }
                        tokio::spawn(sup.run(cmd_rx));
                        return Ok(ProviderSession { commands: cmd_tx, events: ev_rx });
                    }
                    Err(e) => {
                        tracing::warn!(session_id = %cfg.session_id, provider = %p.name(), error = %e, "provider connect failed");
                        last_err = Some(e);
                    }
                }
            }
            Err(last_err.unwrap_or_else(|| ProviderError::Config("no provider".into())))
        }
        .boxed()
    }
}

fn failover_notice(failed: &[Arc<dyn RealtimeProvider>], to: &str) -> ProviderEvent {
    let from: Vec<&str> = failed.iter().map(|p| p.name()).collect();
    ProviderEvent::Notice {
        code: "provider_failover".into(),
        message: format!("model provider {} unavailable; continuing with {to}", from.join(", ")),
    }
}

/// The agent reply being received (its text is the session's to record).
#[derive(Debug)]
struct AgentReply {
    item_id: String,
    /// The history's last `seq` when it began: the session records it after that.
    from_seq: u64,
}

struct Live {
    session: ProviderSession,
    idx: usize,
    started: Instant,
    server_vad: bool,
    truncation: bool,
    /// Its `Ready` is not forwarded again after a swap.
    swallow_ready: bool,
    /// Its limit, as declared when it was adopted (a provider whose credentials expire declares
    /// less than its stream limit), capped by the policy's.
    max_session: Option<Duration>,
}

/// The next session being opened in the background (a task, so the supervisor stays `Sync`-free
/// of futures and the attempt is aborted with it).
type Opening = tokio::task::JoinHandle<(usize, Result<ProviderSession, ProviderError>)>;

struct Supervisor {
    chain: Vec<Arc<dyn RealtimeProvider>>,
    policy: ResiliencePolicy,
    cfg: SessionConfig,
    events: mpsc::Sender<ProviderEvent>,
    live: Option<Live>,
    /// The session's history (read-only; [`SessionConfig::session_history`]).
    history: HistoryView,
    /// The live session's context holds the history up to this `seq` (later turns reach it by
    /// their own commands, or as [`Self::orphan`]).
    live_seq: u64,
    /// The history `seq` the next (pre-opened) session was given.
    next_seq: u64,
    reply: Option<AgentReply>,
    /// The reply of a session no longer live, not yet recorded by the session (its playout goes
    /// on): once recorded, it is appended to the live session's context.
    orphan: Option<AgentReply>,
    /// A reconnect waits for [`Self::orphan`] until then ([`HEARD_WAIT`]).
    orphan_wait: Option<Instant>,
    /// A user turn is waiting for (or getting) its reply.
    responding: bool,
    /// Agent audio of the current reply has been forwarded.
    reply_audio_seen: bool,
    /// Audio time since the session started, by uplink samples (the wrapper's clock for quiet).
    uplink_time: Duration,
    last_voice: Duration,
    /// Between the session VAD's `SpeechStarted` and its `CommitTurn`.
    speaking: bool,
    /// The user spoke since the last end of turn: the live session's input buffer holds an
    /// utterance a swap would lose.
    uncommitted_speech: bool,
    // Reconnect state.
    attempt: u32,
    /// The provider to try next.
    pending_idx: usize,
    /// The provider that was live when the outage began (a different one is a failover).
    first_idx_of_outage: usize,
    /// Recent drops of the live provider: one that keeps dropping is failed over from.
    drops: VecDeque<Instant>,
    reconnect_at: Option<Instant>,
    gap_audio: VecDeque<Pcm>,
    gap_audio_len: Duration,
    gap_dropped: u64,
    /// Uplink chunks the live inner session had no room for.
    audio_dropped: u64,
    queued: VecDeque<ProviderCommand>,
    answer_after_reconnect: bool,
    // Recycling state.
    next: Option<(usize, ProviderSession)>,
    opening: Option<Opening>,
    /// After a failed pre-open, do not try again before this.
    open_not_before: Option<Instant>,
    /// A `Ready` was forwarded: the `Ready` of a replacement session is not forwarded again.
    ready_forwarded: bool,
    /// When agent audio last came from the live session.
    last_agent_audio: Option<Instant>,
    /// Provider sessions lost since the last completed reply.
    restarts_in_turn: u32,
    /// The client's session changes so far, given again to every replacement session.
    session_update: SessionUpdate,
}

impl Supervisor {
    fn new(
        chain: Vec<Arc<dyn RealtimeProvider>>,
        policy: ResiliencePolicy,
        cfg: SessionConfig,
        idx: usize,
        inner: ProviderSession,
        events: mpsc::Sender<ProviderEvent>,
    ) -> Self {
        let caps = chain[idx].capabilities();
        let history = cfg.session_history.clone();
        let live_seq = history.read(History::last_seq);
        let max_session = capped(policy.max_session, caps.max_session);
        Self {
            live: Some(Live {
                session: inner,
                idx,
                started: Instant::now(),
                server_vad: caps.server_vad,
                truncation: caps.truncation,
                swallow_ready: false,
                max_session,
            }),
            chain,
            policy,
            cfg,
            events,
            history,
            live_seq,
            next_seq: live_seq,
            reply: None,
            orphan: None,
            orphan_wait: None,
            responding: false,
            reply_audio_seen: false,
            uplink_time: Duration::ZERO,
            last_voice: Duration::ZERO,
            speaking: false,
            uncommitted_speech: false,
            attempt: 0,
            pending_idx: idx,
            first_idx_of_outage: idx,
            drops: VecDeque::new(),
            reconnect_at: None,
            gap_audio: VecDeque::new(),
            gap_audio_len: Duration::ZERO,
            gap_dropped: 0,
            audio_dropped: 0,
            queued: VecDeque::new(),
            answer_after_reconnect: false,
            next: None,
            opening: None,
            open_not_before: None,
            ready_forwarded: false,
            last_agent_audio: None,
            restarts_in_turn: 0,
            session_update: SessionUpdate::default(),
        }
    }

    /// When to start opening the next session, and the hard limit.
    fn recycle_times(&self) -> Option<(Instant, Instant)> {
        let live = self.live.as_ref()?;
        let max = live.max_session?;
        let limit = live.started + max;
        Some((limit - self.policy.recycle_lead.min(max / 2), limit))
    }

    async fn run(mut self, mut commands: mpsc::Receiver<ProviderCommand>) {
        loop {
            let recycle = self.recycle_times();
            let open_at = recycle
                .filter(|_| self.next.is_none() && self.opening.is_none())
                .map(|(at, _)| self.open_not_before.map_or(at, |nb| nb.max(at)));
            // With the next session ready, wake at the limit and at the forced-swap time (the
            // quiet condition changes with uplink audio, which wakes the loop anyway). Only future
            // instants: a past one would spin the loop.
            let now = Instant::now();
            let limit = recycle
                .filter(|_| self.next.is_some())
                .and_then(|(_, l)| [l, l + self.policy.recycle_lead].into_iter().find(|t| *t > now));
            tokio::select! {
                biased;
                cmd = commands.recv() => match cmd {
                    None | Some(ProviderCommand::Close) => break,
                    Some(cmd) => self.on_command(cmd).await,
                },
                ev = recv_live(&mut self.live) => match ev {
                    Some(ev) => self.on_inner_event(ev).await,
                    None => self.on_drop("the model session ended").await,
                },
                (idx, res) = poll_opt(&mut self.opening) => {
                    self.opening = None;
                    match res {
                        Ok(s) => self.next = Some((idx, s)),
                        Err(e) => {
                            // Try again at the next turn; the live session is still fine.
                            tracing::warn!(session_id = %self.cfg.session_id, error = %e, "opening the next provider session failed");
                            self.open_not_before = Some(Instant::now() + self.policy.recycle_lead / 4);
                        }
                    }
                }
                _ = sleep_until_opt(open_at) => self.start_opening_next(),
                _ = sleep_until_opt(limit) => {}
                _ = sleep_until_opt(self.reconnect_at) => self.reconnect().await,
                _ = self.history.changed() => self.on_history_changed().await,
            }
            if self.live.is_none() && self.reconnect_at.is_none() {
                break;
            }
            self.maybe_swap().await;
        }
        if let Some(live) = self.live.take() {
            let _ = live.session.commands.try_send(ProviderCommand::Close);
        }
        if let Some((_, next)) = self.next.take() {
            let _ = next.commands.try_send(ProviderCommand::Close);
        }
        if let Some(opening) = self.opening.take() {
            opening.abort();
        }
        if self.gap_dropped > 0 || self.audio_dropped > 0 {
            tracing::info!(
                session_id = %self.cfg.session_id,
                dropped_while_reconnecting = self.gap_dropped,
                dropped_provider_full = self.audio_dropped,
                "user audio chunks dropped"
            );
        }
    }

    /// The history a new provider session starts with, and the `seq` it is complete up to: what
    /// the first session started with, then every turn the session recorded.
    fn snapshot(&self) -> (Vec<HistoryItem>, u64) {
        self.history.read(|h| {
            let items = History::from_items(self.cfg.history.iter().chain(h.iter()).cloned());
            (items.to_vec(), h.last_seq())
        })
    }

    /// Whether the session has recorded `reply` (as heard).
    fn recorded(&self, reply: &AgentReply) -> bool {
        self.history.read(|h| {
            h.since(reply.from_seq)
                .any(|e| matches!(e.item, HistoryItem::Agent(_)) && e.item_id.as_deref() == Some(&reply.item_id))
        })
    }

    /// The reply item `item_id` of the live session: tracked (a new one replaces the last).
    fn track_reply(&mut self, item_id: &str) {
        if self.reply.as_ref().is_some_and(|r| r.item_id == item_id) {
            return;
        }
        if self.orphan.as_ref().is_some_and(|o| o.item_id == item_id) {
            // The live session reuses the id of an earlier session's reply: the two cannot be
            // told apart in the history, so the earlier one is not appended later.
            self.orphan = None;
        }
        let from_seq = self.history.read(History::last_seq);
        self.reply = Some(AgentReply { item_id: item_id.to_owned(), from_seq });
    }

    /// The session recorded a turn. Reconnecting: a reconnect waiting for the cut reply goes
    /// now. Live: the cut reply of an earlier session, recorded only now, is appended to the live
    /// session's context; every other turn reached it by its own command or came from it.
    async fn on_history_changed(&mut self) {
        let orphan_recorded = self.orphan.as_ref().is_some_and(|o| self.recorded(o));
        let Some(tx) = self.live.as_ref().map(|l| l.session.commands.clone()) else {
            if orphan_recorded && self.orphan_wait.is_some() && self.reconnect_at == self.orphan_wait {
                self.reconnect_at = Some(Instant::now());
            }
            return;
        };
        let late: Vec<HistoryItem> = match &self.orphan {
            Some(o) if orphan_recorded => self.history.read(|h| {
                h.since(self.live_seq)
                    .filter(|e| e.item_id.as_deref() == Some(&o.item_id))
                    .map(|e| e.item.clone())
                    .collect()
            }),
            _ => Vec::new(),
        };
        if orphan_recorded {
            self.orphan = None;
        }
        self.live_seq = self.history.read(History::last_seq);
        if !late.is_empty() {
            let _ = tx.send(ProviderCommand::AppendHistory(late)).await;
        }
    }

    async fn emit(&self, ev: ProviderEvent) {
        let _ = self.events.send(ev).await;
    }

    // --- commands from the session task ---

    async fn on_command(&mut self, cmd: ProviderCommand) {
        match &cmd {
            ProviderCommand::AppendAudio(pcm) => {
                self.uplink_time += pcm.duration();
                if self.speaking {
                    self.last_voice = self.uplink_time;
                }
            }
            ProviderCommand::SpeechStarted => {
                self.speaking = true;
                self.uncommitted_speech = true;
                self.last_voice = self.uplink_time;
            }
            ProviderCommand::CommitTurn => {
                // Our VAD saw the end of the turn (a server VAD commits at about the same time).
                self.speaking = false;
                self.last_voice = self.uplink_time;
                self.uncommitted_speech = false;
                if self.live.as_ref().is_some_and(|l| l.server_vad) {
                    return;
                }
                self.responding = true;
                self.reply_audio_seen = false;
            }
            ProviderCommand::Text(_) => {
                self.responding = true;
                self.reply_audio_seen = false;
            }
            ProviderCommand::GenerateReply { .. } => {
                self.responding = true;
                self.reply_audio_seen = false;
            }
            ProviderCommand::Truncate { item_id, .. } => {
                // The session cut the reply and recorded what was heard of it.
                if self.reply.as_ref().is_some_and(|r| &r.item_id == item_id) {
                    self.reply = None;
                }
                self.responding = false;
                if self.live.as_ref().is_some_and(|l| !l.truncation) {
                    return;
                }
            }
            ProviderCommand::Cancel => {
                self.responding = false;
            }
            ProviderCommand::Restart => {
                // The session saw a deadline pass with nothing from this provider session: treat
                // it as dropped (the flapping count moves a provider that keeps doing it on).
                if let Some(live) = &self.live {
                    let _ = live.session.commands.try_send(ProviderCommand::Close);
                    self.on_drop("the model stopped answering").await;
                }
                return;
            }
            ProviderCommand::UpdateSession(update) => {
                self.session_update.merge(update.clone());
                if self.live.is_none() {
                    // The replacement session gets the merged update (see `after_swap`).
                    return;
                }
            }
            ProviderCommand::Close
            | ProviderCommand::AppendHistory(_)
            | ProviderCommand::ToolOutput { .. }
            | ProviderCommand::Image(_) => {}
        }
        match &self.live {
            Some(live) => {
                // Audio may be dropped when the inner provider falls behind (the task does the same);
                // every other command must arrive.
                if let ProviderCommand::AppendAudio(_) = cmd {
                    if live.session.commands.try_send(cmd).is_err() {
                        self.audio_dropped += 1;
                    }
                } else if live.session.commands.send(cmd).await.is_err() {
                    self.on_drop("the model session stopped taking commands").await;
                }
            }
            None => self.queue_during_gap(cmd),
        }
    }

    fn queue_during_gap(&mut self, cmd: ProviderCommand) {
        match cmd {
            ProviderCommand::AppendAudio(pcm) => {
                let d = pcm.duration();
                self.gap_audio.push_back(pcm);
                self.gap_audio_len += d;
                while self.gap_audio_len > self.policy.gap_buffer {
                    if let Some(old) = self.gap_audio.pop_front() {
                        self.gap_audio_len = self.gap_audio_len.saturating_sub(old.duration());
                        self.gap_dropped += 1;
                    } else {
                        break;
                    }
                }
            }
            // Nothing to cancel or cut in a session that does not exist yet; an agent result is
            // in the session's history, which the new session starts with.
            ProviderCommand::Cancel
            | ProviderCommand::Truncate { .. }
            | ProviderCommand::SpeechStarted
            | ProviderCommand::AppendHistory(_) => {}
            other => {
                if self.queued.len() < MAX_QUEUED_COMMANDS {
                    self.queued.push_back(other);
                } else {
                    self.gap_dropped += 1;
                }
            }
        }
    }

    // --- events from the inner session ---

    async fn on_inner_event(&mut self, ev: ProviderEvent) {
        match &ev {
            ProviderEvent::Ready => {
                if let Some(live) = self.live.as_mut()
                    && live.swallow_ready
                {
                    live.swallow_ready = false;
                    return;
                }
                self.ready_forwarded = true;
            }
            ProviderEvent::AudioDelta { item_id, .. } => {
                self.reply_audio_seen = true;
                self.last_agent_audio = Some(Instant::now());
                self.responding = true;
                self.track_reply(item_id);
            }
            ProviderEvent::Transcript { speaker: Speaker::Agent, item_id, .. } => self.track_reply(item_id),
            ProviderEvent::Transcript { speaker: Speaker::User, is_final: true, .. } => {
                // The provider heard the utterance to its end (its own turn detection).
                self.uncommitted_speech = false;
                if self.live.as_ref().is_some_and(|l| l.server_vad) {
                    // With server turn detection the transcript is our first sign of a user turn.
                    self.responding = true;
                }
            }
            ProviderEvent::ResponseDone { .. } => {
                self.responding = false;
                self.restarts_in_turn = 0;
            }
            ProviderEvent::Error { code, .. } if code == "session_expired" => {
                self.on_drop("the model session expired").await;
                return;
            }
            ProviderEvent::Closed => {
                self.on_drop("the model session closed").await;
                return;
            }
            _ => {}
        }
        self.emit(ev).await;
    }

    /// The live session is gone: close the reply for the task, plan a reconnect.
    async fn on_drop(&mut self, why: &str) {
        let Some(live) = self.live.take() else { return };
        let name = self.chain[live.idx].name().to_owned();
        tracing::warn!(session_id = %self.cfg.session_id, provider = %name, reason = %why, "provider session lost; reconnecting");
        if let Some(r) = self.reply.take() {
            self.emit(ProviderEvent::AudioDone { item_id: r.item_id.clone() }).await;
            self.emit(ProviderEvent::ResponseDone { item_id: r.item_id.clone() }).await;
            // What was handed to playout is still playing: the session records what of it was
            // heard when it ends, and the new session starts with that.
            if !self.recorded(&r) {
                self.orphan = Some(r);
                self.orphan_wait = Some(Instant::now() + HEARD_WAIT);
            }
        } else if self.responding {
            self.emit(ProviderEvent::ResponseDone { item_id: String::new() }).await;
        }
        // A user turn that got no agent audio is answered by the new session; one that did is not
        // repeated.
        self.answer_after_reconnect = self.responding && !self.reply_audio_seen;
        self.responding = false;
        self.restarts_in_turn += 1;
        if self.restarts_in_turn > MAX_RESTARTS_PER_TURN && live.idx + 1 == self.chain.len() {
            return self.give_up(format!("{name} failed {} times in one turn", self.restarts_in_turn)).await;
        }
        if let Some((_, next)) = self.next.take() {
            // A pre-opened session lacks nothing but the latest turns: use it right away.
            self.live = Some(self.adopt(live.idx, next, self.ready_forwarded));
            self.append_missed(self.next_seq).await;
            self.after_swap("provider_reconnected", "the model session was replaced".into()).await;
            return;
        }
        self.emit(ProviderEvent::Notice {
            code: "provider_reconnecting".into(),
            message: format!("the connection to {name} dropped ({why}); reconnecting"),
        })
        .await;
        self.attempt = 0;
        self.first_idx_of_outage = live.idx;
        // A provider that connects but keeps dropping fails "repeatedly": move on when there is
        // somewhere to go.
        let now = Instant::now();
        self.drops.retain(|t| now.duration_since(*t) < FLAPPING_WINDOW);
        self.drops.push_back(now);
        let flapping = self.drops.len() as u32 >= self.policy.attempts_per_provider
            || self.restarts_in_turn > MAX_RESTARTS_PER_TURN;
        if flapping && live.idx + 1 < self.chain.len() {
            self.drops.clear();
            self.schedule_reconnect(live.idx + 1);
        } else {
            self.schedule_reconnect(live.idx);
        }
    }

    /// No provider is left to try: the session gets a final error and `Closed`.
    async fn give_up(&mut self, why: String) {
        self.reconnect_at = None;
        self.emit(ProviderEvent::Error {
            code: "provider_unavailable".into(),
            message: format!("no model provider could be reached: {why}"),
            retryable: false,
        })
        .await;
        self.emit(ProviderEvent::Closed).await;
    }

    fn schedule_reconnect(&mut self, idx: usize) {
        let exp = self.policy.backoff_base.saturating_mul(1u32 << self.attempt.min(10));
        let jitter = 0.5 + rand::random::<f64>();
        let delay = exp.mul_f64(jitter).min(self.policy.backoff_max);
        self.reconnect_at = Some(Instant::now() + delay);
        self.pending_idx = idx;
    }

    async fn reconnect(&mut self) {
        self.reconnect_at = None;
        if let Some(until) = self.orphan_wait.take()
            && Instant::now() < until
            && self.orphan.as_ref().is_some_and(|o| !self.recorded(o))
        {
            // The cut reply is still playing: wait for what was heard of it (woken when the
            // session records it).
            self.orphan_wait = Some(until);
            self.reconnect_at = Some(until);
            return;
        }
        let idx = self.pending_idx;
        let mut cfg = self.cfg.clone();
        let (history, seq) = self.snapshot();
        cfg.history = history;
        if self.orphan.as_ref().is_some_and(|o| self.recorded(o)) {
            self.orphan = None;
        }
        let res = self.chain[idx].connect(cfg).await;
        match res {
            Ok(session) => {
                // Turns recorded since the snapshot reach it by their own commands (queued or
                // still coming), or as the orphan once recorded.
                self.live_seq = seq;
                let failover = idx != self.first_idx_of_outage;
                self.live = Some(self.adopt(idx, session, self.ready_forwarded));
                let (code, message) = if failover {
                    ("provider_failover", format!("continuing with {}", self.chain[idx].name()))
                } else {
                    ("provider_reconnected", format!("reconnected to {}", self.chain[idx].name()))
                };
                self.after_swap(code, message).await;
            }
            Err(e) => {
                self.attempt += 1;
                tracing::warn!(session_id = %self.cfg.session_id, provider = %self.chain[idx].name(), attempt = self.attempt, error = %e, "reconnect failed");
                if self.attempt < self.policy.attempts_per_provider && e.retryable() {
                    self.schedule_reconnect(idx);
                } else if idx + 1 < self.chain.len() {
                    self.attempt = 0;
                    self.schedule_reconnect(idx + 1);
                    self.reconnect_at = Some(Instant::now());
                } else {
                    self.give_up(e.to_string()).await;
                }
            }
        }
    }

    fn adopt(&self, idx: usize, session: ProviderSession, swallow_ready: bool) -> Live {
        let caps = self.chain[idx].capabilities();
        Live {
            session,
            idx,
            started: Instant::now(),
            server_vad: caps.server_vad,
            truncation: caps.truncation,
            swallow_ready,
            max_session: capped(self.policy.max_session, caps.max_session),
        }
    }

    /// A pre-opened session, now live, was given the history up to `seq`: the turns recorded
    /// since (each went to the session it replaces) are appended to its context.
    async fn append_missed(&mut self, seq: u64) {
        let (missed, last): (Vec<HistoryItem>, u64) =
            self.history.read(|h| (h.since(seq).map(|e| e.item.clone()).collect(), h.last_seq()));
        if self.orphan.as_ref().is_some_and(|o| self.recorded(o)) {
            self.orphan = None;
        }
        self.live_seq = last;
        if let Some(live) = self.live.as_ref().filter(|_| !missed.is_empty()) {
            let tx = live.session.commands.clone();
            let _ = tx.send(ProviderCommand::AppendHistory(missed)).await;
        }
    }

    /// After a new session took over: say so, flush what the gap held, answer a lost turn.
    async fn after_swap(&mut self, code: &str, message: String) {
        self.emit(ProviderEvent::Notice { code: code.into(), message }).await;
        let Some(live) = &self.live else { return };
        let tx = live.session.commands.clone();
        if !self.session_update.is_empty() {
            let _ = tx.send(ProviderCommand::UpdateSession(self.session_update.clone())).await;
        }
        while let Some(pcm) = self.gap_audio.pop_front() {
            let _ = tx.try_send(ProviderCommand::AppendAudio(pcm));
        }
        self.gap_audio_len = Duration::ZERO;
        let queued: Vec<ProviderCommand> = self.queued.drain(..).collect();
        let mut asked = false;
        for cmd in queued {
            asked |= matches!(
                cmd,
                ProviderCommand::CommitTurn | ProviderCommand::Text(_) | ProviderCommand::GenerateReply { .. }
            );
            let _ = tx.send(cmd).await;
        }
        if std::mem::take(&mut self.answer_after_reconnect) && !asked {
            self.responding = true;
            let _ = tx.send(ProviderCommand::GenerateReply { instructions: None }).await;
        }
    }

    // --- recycling ---

    fn start_opening_next(&mut self) {
        let Some(live) = &self.live else { return };
        let idx = live.idx;
        let mut cfg = self.cfg.clone();
        (cfg.history, self.next_seq) = self.snapshot();
        let provider = Arc::clone(&self.chain[idx]);
        tracing::info!(session_id = %self.cfg.session_id, provider = %provider.name(), "opening the next provider session (recycling)");
        self.opening = Some(tokio::spawn(async move { (idx, provider.connect(cfg).await) }));
    }

    async fn maybe_swap(&mut self) {
        if self.next.is_none() || self.responding {
            return;
        }
        let Some((_, limit)) = self.recycle_times() else { return };
        // Never mid-utterance (the old session holds the uncommitted audio), unless the user has
        // talked past the limit by a whole lead time.
        let agent_quiet = self.last_agent_audio.is_none_or(|t| t.elapsed() >= AGENT_QUIET);
        let quiet = agent_quiet && self.uplink_time.saturating_sub(self.last_voice) >= self.policy.quiet_for;
        // A reply whose playout has not ended is not recorded in the session's history yet: a
        // provider that takes history only when a stream opens (Nova Sonic) would lose it if the
        // swap came first. Its recording then makes the pre-opened session stale (re-opened below).
        let reply_playing = self.reply.as_ref().is_some_and(|r| !self.recorded(r));
        if (!quiet || self.uncommitted_speech || reply_playing) && Instant::now() < limit + self.policy.recycle_lead {
            return;
        }
        let recorded_since = self.history.read(History::last_seq) > self.next_seq;
        if recorded_since && Instant::now() < limit + self.policy.recycle_lead {
            // The pre-opened session lacks the turns since its snapshot, and not every provider
            // can take them later (Nova Sonic takes history only when a stream opens): open it
            // again with the whole context, still ahead of the limit.
            if let Some((_, stale)) = self.next.take() {
                let _ = stale.commands.try_send(ProviderCommand::Close);
            }
            self.start_opening_next();
            return;
        }
        let Some((idx, next)) = self.next.take() else { return };
        if let Some(old) = self.live.take() {
            let _ = old.session.commands.try_send(ProviderCommand::Close);
        }
        self.live = Some(self.adopt(idx, next, self.ready_forwarded));
        if let Some(r) = self.reply.take().filter(|r| !self.recorded(r)) {
            // Its playout may still be ending: appended once the session records it.
            self.orphan = Some(r);
        }
        self.open_not_before = None;
        self.append_missed(self.next_seq).await;
        tracing::info!(session_id = %self.cfg.session_id, "provider session recycled at a turn boundary");
        self.after_swap("provider_recycled", "the model session was renewed before its time limit".into()).await;
    }
}

/// The shorter of two optional limits.
fn capped(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

async fn recv_live(live: &mut Option<Live>) -> Option<ProviderEvent> {
    match live {
        Some(l) => l.session.events.recv().await,
        None => std::future::pending().await,
    }
}

async fn poll_opt(f: &mut Option<Opening>) -> (usize, Result<ProviderSession, ProviderError>) {
    match f {
        Some(f) => match f.await {
            Ok(r) => r,
            Err(e) => (0, Err(ProviderError::Unavailable(format!("opening task failed: {e}")))),
        },
        None => std::future::pending().await,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The supervisor on tokio's paused clock (virtual time: timers fire as soon as every task
    //! waits) with a recording fake provider in the role of LiveKit's `FakeRealtimeSession`: each
    //! connect records the history it was given and hands the test the session's other ends.

    use std::sync::Mutex;

    use crate::providers::SharedHistory;

    use super::*;

    /// The test's ends of one inner session: what the supervisor sent, and where to push events.
    struct Inner {
        history: Vec<HistoryItem>,
        commands: mpsc::Receiver<ProviderCommand>,
        events: mpsc::Sender<ProviderEvent>,
    }

    struct Fake {
        max_session: Option<Duration>,
        opened: Arc<Mutex<Vec<Inner>>>,
    }

    impl RealtimeProvider for Fake {
        fn name(&self) -> &str {
            "fake"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities { max_session: self.max_session, ..Capabilities::local_turns() }
        }
        fn input_format(&self) -> AudioFormat {
            AudioFormat { rate_hz: 24_000 }
        }
        fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>> {
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
            let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
            let inner = Inner { history: cfg.history, commands: cmd_rx, events: ev_tx };
            self.opened.lock().unwrap().push(inner);
            async move { Ok(ProviderSession { commands: cmd_tx, events: ev_rx }) }.boxed()
        }
    }

    fn config(session_history: HistoryView) -> SessionConfig {
        SessionConfig {
            session_id: "sess_r".into(),
            character_id: "aiko".into(),
            character_name: "Aiko".into(),
            instructions: String::new(),
            voice: "marin".into(),
            voices: Default::default(),
            language: "en-US".into(),
            history: Vec::new(),
            session_history,
            tools: Arc::new(super::super::tools::ToolRegistry::builtin()),
            viseme_overrides: Default::default(),
            moderator: None,
        }
    }

    /// The wrapper over the fake, and the session's history (the test records in it what the
    /// session core would, as it would).
    async fn start(
        max_session: Option<Duration>,
        policy: ResiliencePolicy,
    ) -> (ProviderSession, Arc<Mutex<Vec<Inner>>>, SharedHistory) {
        let opened = Arc::new(Mutex::new(Vec::new()));
        let fake: Arc<dyn RealtimeProvider> = Arc::new(Fake { max_session, opened: Arc::clone(&opened) });
        let history = SharedHistory::default();
        let cfg = config(history.view());
        let session = ResilientProvider::new(vec![fake], policy).unwrap().connect(cfg).await.unwrap();
        (session, opened, history)
    }

    fn take(opened: &Mutex<Vec<Inner>>, n: usize) -> Inner {
        let mut v = opened.lock().unwrap();
        assert!(v.len() > n, "session #{n} was opened ({} so far)", v.len());
        v.remove(n)
    }

    /// 20 ms of uplink audio.
    fn chunk() -> ProviderCommand {
        ProviderCommand::AppendAudio(Pcm { rate_hz: 24_000, samples: vec![0; 480] })
    }

    #[tokio::test(start_paused = true)]
    async fn a_provider_drop_mid_reply_replays_only_the_heard_history_and_no_agent_turn() {
        let (session, opened, history) = start(None, ResiliencePolicy::default()).await;
        let mut first = take(&opened, 0);
        let (cmds, mut events) = (session.commands, session.events);
        // Each step waits until the supervisor has passed it on, as a live session interleaves.
        history.push(HistoryItem::User("tell me a story".into()), None);
        cmds.send(ProviderCommand::Text("tell me a story".into())).await.unwrap();
        assert!(matches!(first.commands.recv().await, Some(ProviderCommand::Text(_))));
        let said = "Once upon a time there was a little fox who lived by the river";
        let pcm = Pcm { rate_hz: 24_000, samples: vec![1; 24_000] };
        first.events.send(ProviderEvent::AudioDelta { item_id: "a1".into(), pcm }).await.unwrap();
        let partial = ProviderEvent::Transcript {
            speaker: Speaker::Agent,
            item_id: "a1".into(),
            text: said.into(),
            is_final: false,
        };
        first.events.send(partial).await.unwrap();
        while !matches!(events.recv().await, Some(ProviderEvent::Transcript { .. })) {}
        // The user cut in: the session says what was heard.
        let heard = "Once upon a time";
        history.push(HistoryItem::Agent(heard.into()), Some("a1"));
        cmds.send(ProviderCommand::Cancel).await.unwrap();
        let audio_end = Duration::from_millis(900);
        cmds.send(ProviderCommand::Truncate { item_id: "a1".into(), audio_end, heard: heard.into() }).await.unwrap();
        while !matches!(first.commands.recv().await, Some(ProviderCommand::Truncate { .. })) {}
        // The model session drops.
        drop(first);
        loop {
            match events.recv().await.expect("the supervisor stays up") {
                ProviderEvent::Notice { code, .. } if code == "provider_reconnected" => break,
                _ => {}
            }
        }
        let mut second = take(&opened, 0);
        assert_eq!(
            second.history,
            vec![HistoryItem::User("tell me a story".into()), HistoryItem::Agent(heard.into())],
            "the new session hears the user's turn and only what was heard of the reply"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        while let Ok(cmd) = second.commands.try_recv() {
            assert!(!matches!(cmd, ProviderCommand::GenerateReply { .. }), "an agent turn is never repeated");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn recycling_waits_for_a_quiet_turn_boundary() {
        let policy = ResiliencePolicy {
            recycle_lead: Duration::from_secs(2),
            quiet_for: Duration::from_millis(1_500),
            ..Default::default()
        };
        let (session, opened, _history) = start(Some(Duration::from_secs(10)), policy).await;
        let mut first = take(&opened, 0);
        let mut events = session.events;
        let cmds = session.commands;
        let mut t = Duration::ZERO;
        let mut recycled_at = None;
        // The user speaks from 7 s to 10.5 s, across the time the next session is ready (8 s)
        // and the limit (10 s); the reply is done at 11 s; then all is quiet.
        while t < Duration::from_secs(14) && recycled_at.is_none() {
            if t == Duration::from_secs(7) {
                cmds.send(ProviderCommand::SpeechStarted).await.unwrap();
            }
            if t == Duration::from_millis(10_500) {
                cmds.send(ProviderCommand::CommitTurn).await.unwrap();
            }
            if t == Duration::from_secs(11) {
                first.events.send(ProviderEvent::ResponseDone { item_id: "r1".into() }).await.unwrap();
            }
            cmds.send(chunk()).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            t += Duration::from_millis(20);
            while first.commands.try_recv().is_ok() {}
            while let Ok(ev) = events.try_recv() {
                if matches!(ev, ProviderEvent::Notice { ref code, .. } if code == "provider_recycled") {
                    recycled_at = Some(t);
                }
            }
        }
        let at = recycled_at.expect("recycled before the limit plus its lead");
        // Quiet since the commit at 10.5 s for 1.5 s, and the reply done: 12 s.
        assert!(at >= Duration::from_secs(12), "never while the user speaks or a reply runs: swapped at {at:?}");
        assert!(at <= Duration::from_millis(12_100), "at the first quiet boundary: {at:?}");
    }

    /// Read the supervisor's events until `code`'s notice, returning when it came.
    async fn until_notice(events: &mut mpsc::Receiver<ProviderEvent>, code: &str) -> Instant {
        loop {
            match events.recv().await.expect("the supervisor stays up") {
                ProviderEvent::Notice { code: c, .. } if c == code => return Instant::now(),
                _ => {}
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drop_mid_reply_replays_exactly_the_sessions_heard_history() {
        let (session, opened, history) = start(None, ResiliencePolicy::default()).await;
        let first = take(&opened, 0);
        let (cmds, mut events) = (session.commands, session.events);
        let say = |item_id: &str, text: &str, is_final| ProviderEvent::Transcript {
            speaker: Speaker::Agent,
            item_id: item_id.into(),
            text: text.into(),
            is_final,
        };
        let audio = |item_id: &str| ProviderEvent::AudioDelta {
            item_id: item_id.into(),
            pcm: Pcm { rate_hz: 24_000, samples: vec![1; 24_000] },
        };
        // A typed turn, answered and played to its end (the core records each as it happens).
        history.push(HistoryItem::User("what is the weather like?".into()), None);
        cmds.send(ProviderCommand::Text("what is the weather like?".into())).await.unwrap();
        first.events.send(audio("a0")).await.unwrap();
        first.events.send(say("a0", "It is sunny all day.", true)).await.unwrap();
        first.events.send(ProviderEvent::ResponseDone { item_id: "a0".into() }).await.unwrap();
        history.push(HistoryItem::Agent("It is sunny all day.".into()), Some("a0"));
        // An agent result: context for the next reply.
        let note = HistoryItem::User("[result from travel (completed)] The train leaves at 9:40.".into());
        history.push(note.clone(), None);
        cmds.send(ProviderCommand::AppendHistory(vec![note])).await.unwrap();
        // A spoken turn, transcribed by the provider.
        cmds.send(ProviderCommand::SpeechStarted).await.unwrap();
        cmds.send(ProviderCommand::CommitTurn).await.unwrap();
        let asked = ProviderEvent::Transcript {
            speaker: Speaker::User,
            item_id: "u1".into(),
            text: "when does my train leave?".into(),
            is_final: true,
        };
        first.events.send(asked).await.unwrap();
        history.push(HistoryItem::User("when does my train leave?".into()), Some("u1"));
        // The reply starts; the model session drops in the middle of it.
        first.events.send(audio("a1")).await.unwrap();
        first.events.send(say("a1", "Your train leaves at 9:40 from platform", false)).await.unwrap();
        while !matches!(events.recv().await, Some(ProviderEvent::Transcript { is_final: false, .. })) {}
        drop(first);
        let dropped_at = Instant::now();
        while !matches!(events.recv().await, Some(ProviderEvent::ResponseDone { .. })) {}
        // The reply's playout goes on for a second; then the core records what was heard.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(opened.lock().unwrap().len(), 0, "no reconnect before the cut reply is recorded");
        history.push(HistoryItem::Agent("Your train leaves at 9:40".into()), Some("a1"));
        let reconnected_at = until_notice(&mut events, "provider_reconnected").await;
        assert!(reconnected_at - dropped_at < HEARD_WAIT, "went as soon as it was recorded");
        let mut second = take(&opened, 0);
        assert_eq!(second.history, history.to_vec(), "the new session starts with exactly the session's history");
        assert_eq!(second.history.len(), 5);
        tokio::time::sleep(Duration::from_secs(1)).await;
        while let Ok(cmd) = second.commands.try_recv() {
            assert!(!matches!(cmd, ProviderCommand::GenerateReply { .. }), "an agent turn is never repeated");
            assert!(!matches!(cmd, ProviderCommand::AppendHistory(_)), "nothing appended twice: {cmd:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_cut_reply_recorded_after_the_reconnect_is_appended_to_the_new_session() {
        let (session, opened, history) = start(None, ResiliencePolicy::default()).await;
        let first = take(&opened, 0);
        let (cmds, mut events) = (session.commands, session.events);
        history.push(HistoryItem::User("tell me a story".into()), None);
        cmds.send(ProviderCommand::Text("tell me a story".into())).await.unwrap();
        let pcm = Pcm { rate_hz: 24_000, samples: vec![1; 24_000] };
        first.events.send(ProviderEvent::AudioDelta { item_id: "a1".into(), pcm }).await.unwrap();
        while !matches!(events.recv().await, Some(ProviderEvent::AudioDelta { .. })) {}
        drop(first);
        // The playout outlasts the wait: the new session starts without the reply ...
        until_notice(&mut events, "provider_reconnected").await;
        let mut second = take(&opened, 0);
        assert_eq!(second.history, vec![HistoryItem::User("tell me a story".into())]);
        // ... and gets it appended once the core records it.
        history.push(HistoryItem::Agent("Once upon a time".into()), Some("a1"));
        loop {
            match second.commands.recv().await.expect("the new session stays open") {
                ProviderCommand::AppendHistory(items) => {
                    assert_eq!(items, vec![HistoryItem::Agent("Once upon a time".into())]);
                    break;
                }
                ProviderCommand::GenerateReply { .. } => panic!("an agent turn is never repeated"),
                _ => {}
            }
        }
    }
}
