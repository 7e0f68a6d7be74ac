//! The task that owns one live session.
//!
//! It owns, by value, the uplink pipeline (decode, VAD, resample), the playout (resample, encode,
//! pacing), the provider session and the peer, and `select!`s over: control (end, trickle), the
//! playout clock, the peer's forwarded events, the provider's events and the session deadline.
//! Provider events are only read while playout has room, so a provider that streams faster than
//! real time is held back by its bounded channel instead of filling memory.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use media::{BargeIn, Playout, Uplink, UplinkEvent};
use signaling::events::{AgentState, ClientEvent, Role, ServerEvent};
use tokio::sync::mpsc;
use webrtc::data_channel::DataChannel;
use webrtc::peer_connection::RTCPeerConnectionState;

use super::speech::AgentSpeech;
use super::{Control, EndReason, SessionShared};
use crate::peer::{Peer, PeerEvent};
use crate::providers::{Capabilities, Pcm, ProviderCommand, ProviderEvent, ProviderSession, Speaker};
use crate::telemetry;

/// Largest Opus frame we produce (20 ms at <= 510 kbit/s is < 1300 bytes).
const MAX_OPUS_FRAME: usize = 1500;
/// Playout holds at most this much audio before the provider is held back.
const PLAYOUT_HEADROOM: Duration = Duration::from_millis(500);

/// Everything the task needs, built by the manager when the offer is answered.
pub(crate) struct SessionTask {
    pub shared: Arc<SessionShared>,
    pub start: Instant,
    pub deadline: Instant,
    /// End the session after this long without activity (speech, messages, agent audio).
    pub idle_timeout: Option<Duration>,
    pub peer: Peer,
    pub peer_rx: mpsc::Receiver<PeerEvent>,
    pub control_rx: mpsc::Receiver<Control>,
    pub provider: ProviderSession,
    pub provider_name: String,
    pub caps: Capabilities,
    pub uplink: Uplink,
    pub playout: Playout,
    pub barge_in: BargeIn,
    pub speech: AgentSpeech,
    /// Per-packet histograms, resolved once (no registry lookup on the 20 ms path).
    pub pacing_hist: metrics::Histogram,
    pub uplink_hist: metrics::Histogram,
    /// Instructions for a reply the character speaks first, once the client and the model are up.
    pub greeting: Option<String>,
}

/// Mutable per-session state outside the media parts.
struct Conversation {
    dc: Option<Arc<dyn DataChannel>>,
    ready_sent: bool,
    provider_ready: bool,
    state: AgentState,
    /// The agent item currently being played or prepared.
    agent_item: Option<String>,
    /// The greeting was asked for.
    greeted: bool,
    /// An item we cut: its late audio and transcript are dropped.
    cancelled_item: Option<String>,
    /// The provider said the response is complete; we go back to listening when playout drains.
    response_done: bool,
    uplink_dropped: u64,
    events_dropped: u64,
    /// Session time of the first RTP packet: stream positions (VAD edges) are relative to it.
    first_rtp: Option<Duration>,
    /// Provider audio arrived while playout was idle at this instant (downlink latency start).
    idle_audio_at: Option<Instant>,
    /// The user's turn in flight: when it was committed, the silence waited, first provider audio.
    turn: Option<TurnTiming>,
    /// Counters already exported (the task exports deltas).
    exported: Exported,
    /// Provider audio the playout had no room for yet; no provider event is read until it is in.
    pending: Option<PendingAudio>,
    /// User turns so far (the `turn` field of this session's log lines).
    turns: u64,
    /// Timed events due now (reused buffer).
    due: Vec<ServerEvent>,
    /// Flush ticks so far, and the loss the encoder's FEC is set for (percent).
    fec_ticks: u64,
    fec_loss_pct: u8,
    /// The last typed user turn, already recorded: its echo as a provider transcript is not.
    typed_pending: Option<String>,
    /// Last user speech onset, client message or agent audio frame (idle timeout).
    last_activity: Instant,
}

/// The part of an audio delta still waiting for room in the playout queue.
struct PendingAudio {
    item_id: String,
    pcm: Pcm,
    /// Samples of `pcm` already accepted.
    offset: usize,
}

#[derive(Debug, Clone, Copy)]
struct TurnTiming {
    committed_at: Instant,
    silence: Duration,
    first_audio_at: Option<Instant>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Exported {
    uplink: media::UplinkStats,
    playout: media::PlayoutStats,
    uplink_dropped: u64,
    events_dropped: u64,
    rtp_dropped: u64,
    messages_dropped: u64,
}

impl SessionTask {
    /// Run until the session ends; returns why it ended.
    pub async fn run(mut self) -> EndReason {
        let mut conv = Conversation {
            dc: None,
            ready_sent: false,
            provider_ready: false,
            state: AgentState::Initializing,
            agent_item: None,
            greeted: false,
            cancelled_item: None,
            response_done: false,
            uplink_dropped: 0,
            events_dropped: 0,
            first_rtp: None,
            idle_audio_at: None,
            turn: None,
            exported: Exported::default(),
            pending: None,
            turns: 0,
            due: Vec::with_capacity(16),
            fec_ticks: 0,
            fec_loss_pct: 0,
            typed_pending: None,
            last_activity: Instant::now(),
        };
        let mut flush = tokio::time::interval(Duration::from_secs(1));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut frame = [0u8; MAX_OPUS_FRAME];
        let deadline = tokio::time::Instant::from_std(self.deadline);
        let reason = loop {
            let next_due = self.playout.next_due().map(|d| tokio::time::Instant::from_std(self.start + d));
            let provider_room = conv.pending.is_none() && self.playout.has_room_for(PLAYOUT_HEADROOM);
            let idle_at = self.idle_timeout.map(|t| tokio::time::Instant::from_std(conv.last_activity + t));
            tokio::select! {
                biased;
                ctl = self.control_rx.recv() => match ctl {
                    Some(Control::End(reason)) => break reason,
                    Some(Control::Inject(text)) => self.user_text(&mut conv, text).await,
                    Some(Control::IceRestart(restart, reply)) => {
                        // On a task of its own: the restart waits for gathering, pacing must not.
                        let restarting = self.peer.restart_ice(restart);
                        tokio::spawn(async move { let _ = reply.send(restarting.await); });
                    }
                    Some(Control::Trickle(c)) => {
                        if let Err(e) = self.peer.add_candidate(c).await {
                            tracing::debug!(session_id = %self.shared.id, error = %e, "trickled candidate rejected");
                        }
                    }
                    None => break EndReason::Shutdown,
                },
                _ = sleep_until_opt(next_due) => {
                    self.pace(&mut conv, &mut frame).await;
                    self.push_pending(&mut conv);
                }
                ev = self.peer_rx.recv() => {
                    let Some(ev) = ev else { break EndReason::PeerFailed };
                    if let Some(reason) = self.on_peer_event(&mut conv, ev).await { break reason; }
                }
                ev = self.provider.events.recv(), if provider_room => {
                    match ev {
                        Some(ev) => self.on_provider_event(&mut conv, ev).await,
                        None => break EndReason::ProviderClosed,
                    }
                }
                _ = tokio::time::sleep_until(deadline) => break EndReason::MaxDuration,
                _ = flush.tick() => {
                    self.export_stats(&mut conv);
                    self.adapt_fec(&mut conv).await;
                }
                _ = sleep_until_opt(idle_at) => {
                    if self.playout.is_active() {
                        conv.last_activity = Instant::now();
                    } else {
                        break EndReason::IdleTimeout;
                    }
                }
            }
        };
        self.export_stats(&mut conv);
        let _ = self.provider.commands.try_send(ProviderCommand::Close);
        if !matches!(reason, EndReason::PeerFailed | EndReason::PeerClosed) {
            self.emit(&mut conv, ServerEvent::SessionEnded { reason: reason.as_str() }).await;
        }
        if let Some(dc) = conv.dc.take() {
            // Let the last events (session.ended) reach the client before the close: wait, bounded,
            // until SCTP has them acknowledged.
            for _ in 0..50 {
                if dc.outstanding_bytes().await.map_or(true, |n| n == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = dc.close().await;
        }
        self.peer.close().await;
        let c = self.peer.counters();
        tracing::info!(
            session_id = %self.shared.id,
            reason = %reason.as_str(),
            rtp_in = c.rtp_in.load(Ordering::Relaxed),
            rtp_dropped = c.rtp_dropped.load(Ordering::Relaxed),
            uplink_to_provider_dropped = conv.uplink_dropped,
            uplink = ?self.uplink.stats(),
            playout = ?self.playout.stats(),
            events_dropped = conv.events_dropped,
            "session ended"
        );
        reason
    }
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl SessionTask {
    /// Media time: since the session's start.
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    fn ms(d: Duration) -> u64 {
        d.as_millis() as u64
    }

    /// Send an event on the data channel; never blocks (a full channel drops and counts).
    async fn emit(&mut self, conv: &mut Conversation, ev: ServerEvent) {
        let Some(dc) = &conv.dc else { return };
        if dc.try_send_text(&ev.to_json()).await.is_err() {
            conv.events_dropped += 1;
        }
    }

    async fn set_state(&mut self, conv: &mut Conversation, state: AgentState) {
        if conv.state != state {
            conv.state = state;
            self.shared.set_agent_state(state);
            self.emit(conv, ServerEvent::State { state }).await;
        }
    }

    /// Send `session.ready` and go to listening once both the channel and the provider are up.
    async fn maybe_ready(&mut self, conv: &mut Conversation) {
        if conv.ready_sent || conv.dc.is_none() {
            return;
        }
        conv.ready_sent = true;
        let ready = ServerEvent::SessionReady {
            session_id: self.shared.id.clone(),
            protocol: signaling::events::PROTOCOL_VERSION,
            character: self.shared.character.clone(),
            provider: self.provider_name.clone(),
        };
        self.emit(conv, ready).await;
        self.emit(conv, ServerEvent::State { state: AgentState::Initializing }).await;
        if conv.provider_ready {
            self.set_state(conv, AgentState::Listening).await;
            self.maybe_greet(conv).await;
        }
    }

    /// Speak first (the character's greeting) once the client listens and the model is ready.
    async fn maybe_greet(&mut self, conv: &mut Conversation) {
        if conv.greeted || !conv.ready_sent || !conv.provider_ready {
            return;
        }
        let Some(instructions) = self.greeting.clone() else { return };
        conv.greeted = true;
        let cmd = ProviderCommand::GenerateReply { instructions: Some(instructions) };
        if self.provider.commands.try_send(cmd).is_ok() {
            self.set_state(conv, AgentState::Thinking).await;
        }
    }

    /// Write the frame that is due, if any.
    async fn pace(&mut self, conv: &mut Conversation, buf: &mut [u8]) {
        let now = self.now();
        let Some(frame) = self.playout.poll(now, buf) else {
            self.after_playout_progress(conv).await;
            return;
        };
        let ts = (frame.due.as_micros() as u64 * 48 / 1000) as u32;
        let marker = frame.talkspurt_start;
        let len = frame.len;
        // The words, visemes and emotions this frame reaches leave with it.
        self.speech.on_frame(frame.item_id, frame.item_offset, media::FRAME, &mut conv.due);
        let lateness = now.saturating_sub(frame.due);
        if let Err(e) = self.peer.write_opus(&buf[..len], ts, marker).await {
            tracing::debug!(session_id = %self.shared.id, error = %e, "writing agent audio failed");
        }
        self.pacing_hist.record(lateness.as_secs_f64());
        if let Some(t) = conv.idle_audio_at.take() {
            telemetry::observe(telemetry::DOWNLINK_LATENCY, t.elapsed());
        }
        if let Some(turn) = conv.turn.take() {
            let out = Instant::now();
            let first_audio = turn.first_audio_at.unwrap_or(out);
            telemetry::observe_with(telemetry::TURN_LATENCY, "part", "silence", turn.silence);
            telemetry::observe_with(telemetry::TURN_LATENCY, "part", "model", first_audio - turn.committed_at);
            telemetry::observe_with(telemetry::TURN_LATENCY, "part", "server", out - first_audio);
            telemetry::observe_with(telemetry::TURN_LATENCY, "part", "total", turn.silence + (out - turn.committed_at));
        }
        if conv.state != AgentState::Speaking {
            self.set_state(conv, AgentState::Speaking).await;
        }
        self.emit_due(conv).await;
        self.after_playout_progress(conv).await;
    }

    /// Send the timed events that are due, in order.
    async fn emit_due(&mut self, conv: &mut Conversation) {
        let mut due = std::mem::take(&mut conv.due);
        for ev in due.drain(..) {
            self.emit(conv, ev).await;
        }
        conv.due = due;
    }

    /// Back to listening once the reply is complete and fully played; its final transcript (and
    /// anything not yet sent) goes out, and the turn is stored.
    async fn after_playout_progress(&mut self, conv: &mut Conversation) {
        if conv.response_done && !self.playout.is_active() {
            conv.response_done = false;
            conv.agent_item = None;
            if let Some((_, text, complete)) = self.speech.finish(&mut conv.due) {
                self.shared.push_turn(Role::Agent, &text, !complete);
            }
            self.emit_due(conv).await;
            if conv.state == AgentState::Speaking || conv.state == AgentState::Thinking {
                self.set_state(conv, AgentState::Listening).await;
            }
        }
    }

    /// Cut the agent off: playout cleared, client told, provider told what was heard.
    async fn interrupt(&mut self, conv: &mut Conversation) {
        let cut = self.barge_in.interrupt(&mut self.playout);
        let item_id = match (&cut, &conv.agent_item) {
            (Some(c), _) => Some((c.item_id.clone(), c.played)),
            (None, Some(item)) => Some((item.clone(), Duration::ZERO)),
            (None, None) => None,
        };
        let _ = self.provider.commands.try_send(ProviderCommand::Cancel);
        if let Some((item_id, played)) = item_id {
            if self.caps.truncation {
                let _ = self
                    .provider
                    .commands
                    .try_send(ProviderCommand::Truncate { item_id: item_id.clone(), audio_end: played });
            }
            let interrupted = ServerEvent::AgentInterrupted { item_id: item_id.clone(), played_ms: Self::ms(played) };
            self.emit(conv, interrupted).await;
            // The agent's turn ends with the words that were released while it played.
            let text = self.speech.cut().map(|(_, heard)| heard).unwrap_or_default();
            self.shared.push_turn(Role::Agent, &text, true);
            self.emit(
                conv,
                ServerEvent::Transcript { role: Role::Agent, item_id: item_id.clone(), text, is_final: true },
            )
            .await;
            conv.cancelled_item = Some(item_id);
        }
        conv.agent_item = None;
        conv.response_done = false;
        conv.pending = None;
        self.set_state(conv, AgentState::Listening).await;
    }

    async fn on_peer_event(&mut self, conv: &mut Conversation, ev: PeerEvent) -> Option<EndReason> {
        match ev {
            PeerEvent::Rtp { seq, payload, arrival, .. } => {
                let now = self.now();
                conv.first_rtp.get_or_insert(now);
                self.uplink.push_rtp(now, seq, &payload);
                if self.drain_uplink(conv).await {
                    self.uplink_hist.record(arrival.elapsed().as_secs_f64());
                }
            }
            PeerEvent::ChannelOpen(dc) => {
                conv.dc = Some(dc);
                self.maybe_ready(conv).await;
            }
            PeerEvent::Message(bytes) => self.on_client_message(conv, &bytes).await,
            PeerEvent::ChannelClosed => {
                conv.dc = None;
            }
            PeerEvent::State(state) => match state {
                RTCPeerConnectionState::Connected => self.shared.mark_connected(),
                RTCPeerConnectionState::Failed => return Some(EndReason::PeerFailed),
                RTCPeerConnectionState::Closed => return Some(EndReason::PeerClosed),
                _ => {}
            },
        }
        None
    }

    /// Hand everything the uplink produced to the provider and the client; true when audio went
    /// to the provider.
    async fn drain_uplink(&mut self, conv: &mut Conversation) -> bool {
        let mut sent_audio = false;
        let mut started = false;
        let mut stopped = None;
        let mut started_at = Duration::ZERO;
        while let Some(ev) = self.uplink.poll() {
            match ev {
                UplinkEvent::Audio(pcm) => {
                    let cmd = ProviderCommand::AppendAudio(Pcm { rate_hz: pcm.rate_hz, samples: pcm.samples.to_vec() });
                    if self.provider.commands.try_send(cmd).is_err() {
                        conv.uplink_dropped += 1;
                    } else {
                        sent_audio = true;
                    }
                }
                UplinkEvent::SpeechStarted { at } => {
                    conv.last_activity = Instant::now();
                    started = true;
                    started_at = at;
                }
                UplinkEvent::SpeechStopped { at } => stopped = Some(at),
            }
        }
        let base = conv.first_rtp.unwrap_or_default();
        // How long ago, in stream time, a stream position was (the latest packet is "now").
        let position = self.uplink.position();
        let ago = |at: Duration| position.saturating_sub(at);
        if started {
            let onset_ago = ago(started_at);
            self.emit(conv, ServerEvent::UserSpeechStarted { at_ms: Self::ms(base + started_at) }).await;
            if self.playout.is_active() || conv.state == AgentState::Speaking {
                self.interrupt(conv).await;
                telemetry::observe(telemetry::BARGE_IN_LATENCY, onset_ago);
            }
        }
        if let Some(at) = stopped {
            let silence = ago(at);
            self.emit(conv, ServerEvent::UserSpeechStopped { at_ms: Self::ms(base + at) }).await;
            if !self.caps.server_vad {
                let _ = self.provider.commands.try_send(ProviderCommand::CommitTurn);
                conv.turn = Some(TurnTiming { committed_at: Instant::now(), silence, first_audio_at: None });
                conv.turns += 1;
                tracing::Span::current().record("turn", conv.turns);
                tracing::debug!(silence_ms = silence.as_millis() as u64, "user turn committed");
                self.set_state(conv, AgentState::Thinking).await;
            }
        }
        sent_audio
    }

    /// Move pending provider audio into the playout as far as it has room (backpressure: the
    /// provider's events are not read while audio is pending).
    fn push_pending(&mut self, conv: &mut Conversation) {
        let Some(p) = conv.pending.as_mut() else { return };
        let rest = &p.pcm.samples[p.offset..];
        match self.playout.push(&p.item_id, media::PcmRef { rate_hz: p.pcm.rate_hz, samples: rest }) {
            Ok(accepted) => {
                p.offset += accepted;
                if p.offset >= p.pcm.samples.len() {
                    conv.pending = None;
                }
            }
            Err(e) => {
                tracing::warn!(session_id = %self.shared.id, error = %e, "agent audio dropped");
                conv.pending = None;
            }
        }
    }

    /// In-band FEC follows the loss the client reports (as libwebrtc does): libopus spends bits
    /// and ~50 us per frame on it only while packets are being lost. Checked every 5 s.
    async fn adapt_fec(&mut self, conv: &mut Conversation) {
        conv.fec_ticks += 1;
        if !conv.fec_ticks.is_multiple_of(5) {
            return;
        }
        let Some(lost) = self.peer.remote_fraction_lost().await else { return };
        // Round up and cap: libopus wants a percentage; 0 turns LBRR off.
        let pct = ((lost * 100.0).ceil() as u8).min(30);
        if pct != conv.fec_loss_pct {
            conv.fec_loss_pct = pct;
            if let Err(e) = self.playout.set_expected_loss(pct) {
                tracing::debug!(error = %e, "setting the encoder's expected loss failed");
            }
        }
    }

    /// Export counter deltas since the last call.
    fn export_stats(&self, conv: &mut Conversation) {
        use telemetry::{add, add_with};
        let up = self.uplink.stats();
        let po = self.playout.stats();
        let c = self.peer.counters();
        let rtp_dropped = c.rtp_dropped.load(Ordering::Relaxed);
        let messages_dropped = c.messages_dropped.load(Ordering::Relaxed);
        let e = &conv.exported;
        add_with(telemetry::RTP_PACKETS, "direction", "in".into(), up.packets - e.uplink.packets);
        add_with(telemetry::RTP_PACKETS, "direction", "out".into(), po.frames_out - e.playout.frames_out);
        add(telemetry::RTP_LOST, up.lost - e.uplink.lost);
        add(telemetry::RTP_LATE, up.late_or_duplicate - e.uplink.late_or_duplicate);
        add(telemetry::PLC_FRAMES, up.plc_frames - e.uplink.plc_frames);
        add(telemetry::FEC_FRAMES, up.fec_frames - e.uplink.fec_frames);
        add(telemetry::DECODE_ERRORS, up.decode_errors - e.uplink.decode_errors);
        add(telemetry::LATE_FRAMES, po.late_frames - e.playout.late_frames);
        add_with(telemetry::QUEUE_DROPS, "queue", "uplink_to_provider".into(), conv.uplink_dropped - e.uplink_dropped);
        add_with(telemetry::QUEUE_DROPS, "queue", "events_to_client".into(), conv.events_dropped - e.events_dropped);
        add_with(telemetry::QUEUE_DROPS, "queue", "rtp_to_session".into(), rtp_dropped - e.rtp_dropped);
        add_with(telemetry::QUEUE_DROPS, "queue", "messages_to_session".into(), messages_dropped - e.messages_dropped);
        conv.exported = Exported {
            uplink: up,
            playout: po,
            uplink_dropped: conv.uplink_dropped,
            events_dropped: conv.events_dropped,
            rtp_dropped,
            messages_dropped,
        };
    }

    async fn on_client_message(&mut self, conv: &mut Conversation, bytes: &[u8]) {
        conv.last_activity = Instant::now();
        match signaling::events::parse_client_message(bytes) {
            Ok(Some(ClientEvent::Ping)) => self.emit(conv, ServerEvent::Pong).await,
            Ok(Some(ClientEvent::Interrupt)) => {
                if self.playout.is_active() || conv.agent_item.is_some() {
                    self.interrupt(conv).await;
                }
            }
            Ok(Some(ClientEvent::Text { text })) => self.user_text(conv, text).await,
            Ok(Some(_)) | Ok(None) => {}
            Err(e) => {
                let ev = ServerEvent::Error { code: e.code().to_owned(), message: e.to_string() };
                self.emit(conv, ev).await;
            }
        }
    }

    /// A typed (or injected) user turn: recorded at once, then handed to the provider.
    async fn user_text(&mut self, conv: &mut Conversation, text: String) {
        conv.last_activity = Instant::now();
        if self.playout.is_active() {
            self.interrupt(conv).await;
        }
        self.shared.push_turn(Role::User, &text, false);
        // A provider that echoes typed text as a user transcript must not record it twice.
        conv.typed_pending = Some(text.trim().to_owned());
        if self.provider.commands.try_send(ProviderCommand::Text(text)).is_err() {
            let ev = ServerEvent::Error { code: "busy".into(), message: "the model is busy; try again".into() };
            self.emit(conv, ev).await;
        } else {
            self.set_state(conv, AgentState::Thinking).await;
        }
    }

    async fn on_provider_event(&mut self, conv: &mut Conversation, ev: ProviderEvent) {
        match ev {
            ProviderEvent::Ready => {
                conv.provider_ready = true;
                if conv.ready_sent {
                    self.set_state(conv, AgentState::Listening).await;
                    self.maybe_greet(conv).await;
                }
            }
            ProviderEvent::AudioDelta { item_id, pcm } => {
                if conv.cancelled_item.as_deref() == Some(item_id.as_str()) {
                    return;
                }
                conv.agent_item = Some(item_id.clone());
                if !self.playout.is_active() {
                    conv.idle_audio_at = Some(Instant::now());
                }
                if let Some(turn) = conv.turn.as_mut() {
                    turn.first_audio_at.get_or_insert_with(Instant::now);
                }
                self.speech.on_audio(&item_id, pcm.as_ref(), &mut conv.due);
                conv.pending = Some(PendingAudio { item_id, pcm, offset: 0 });
                self.push_pending(conv);
            }
            ProviderEvent::AudioDone { item_id } => {
                if conv.cancelled_item.as_deref() != Some(item_id.as_str()) {
                    self.playout.finish_item(&item_id);
                    self.speech.on_audio_done(&item_id);
                }
            }
            ProviderEvent::Transcript { speaker, item_id, text, is_final } => {
                if conv.cancelled_item.as_deref() == Some(item_id.as_str()) {
                    return;
                }
                let role = match speaker {
                    Speaker::User => Role::User,
                    Speaker::Agent => Role::Agent,
                };
                if role == Role::Agent {
                    // Agent words are sent as they are spoken (see `speech`), the final when the
                    // reply has been played.
                    conv.agent_item.get_or_insert_with(|| item_id.clone());
                    self.speech.on_text(&item_id, &text, is_final, &mut conv.due);
                } else {
                    if is_final {
                        // A typed turn is recorded when typed; its echo from the provider is not.
                        let echo = conv.typed_pending.as_deref() == Some(text.trim());
                        if echo {
                            conv.typed_pending = None;
                        } else {
                            self.shared.push_turn(role, &text, false);
                        }
                    }
                    self.emit(conv, ServerEvent::Transcript { role, item_id, text, is_final }).await;
                }
                self.emit_due(conv).await;
            }
            ProviderEvent::Emotion { item_id, emotion } => {
                if item_id.is_some() && item_id == conv.cancelled_item {
                    return;
                }
                let emotion = signaling::events::Emotion::normalize(&emotion)
                    .unwrap_or_else(|| emotion.parse().unwrap_or(signaling::events::Emotion::Neutral));
                match item_id {
                    // An emotion inside a reply changes the face when the voice gets there.
                    Some(item) => {
                        conv.agent_item.get_or_insert_with(|| item.clone());
                        self.speech.on_emotion(&item, emotion, &mut conv.due);
                    }
                    None => self.emit(conv, ServerEvent::Emotion { emotion, item_id: None }).await,
                }
                self.emit_due(conv).await;
            }
            ProviderEvent::Gesture { item_id, gesture } => {
                if conv.cancelled_item.as_deref() != Some(item_id.as_str()) {
                    conv.agent_item.get_or_insert_with(|| item_id.clone());
                    self.speech.on_gesture(&item_id, gesture, &mut conv.due);
                    self.emit_due(conv).await;
                }
            }
            ProviderEvent::Viseme { item_id, viseme, start, duration } => {
                if conv.cancelled_item.as_deref() != Some(item_id.as_str()) {
                    self.speech.on_viseme(&item_id, viseme, start, duration, &mut conv.due);
                    self.emit_due(conv).await;
                }
            }
            ProviderEvent::UserSpeechStarted => {
                if self.playout.is_active() {
                    self.interrupt(conv).await;
                }
            }
            ProviderEvent::ResponseDone { item_id } => {
                if conv.cancelled_item.as_deref() != Some(item_id.as_str()) {
                    conv.response_done = true;
                    self.after_playout_progress(conv).await;
                }
            }
            ProviderEvent::Error { code, message, retryable } => {
                telemetry::add_with(telemetry::PROVIDER_ERRORS, "provider", self.provider_name.clone(), 1);
                tracing::warn!(session_id = %self.shared.id, %code, %message, retryable, "provider error");
                self.emit(conv, ServerEvent::Error { code, message }).await;
            }
            ProviderEvent::Notice { code, message } => {
                tracing::info!(session_id = %self.shared.id, %code, %message, "provider notice");
                self.emit(conv, ServerEvent::Error { code, message }).await;
            }
            ProviderEvent::Closed => {
                let ev =
                    ServerEvent::Error { code: "provider_closed".into(), message: "the model session ended".into() };
                self.emit(conv, ev).await;
            }
        }
    }
}
