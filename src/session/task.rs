//! The task that runs one live session: IO only.
//!
//! It owns the [`Conversation`] (every decision, sans-IO), the client link and the provider
//! session, and `select!`s over: control (end, trickle, inject), the core's next timeout (playout
//! frame due, idle deadline), the link's events, the provider's events and the session deadline.
//! After every input it drains the core's outputs into the link, the provider and the registry.
//! Provider events are only read while the core wants them (playout has room), so a provider that
//! streams faster than real time is held back by its bounded channel instead of filling memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use signaling::events::{ClientEvent, ServerEvent};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::conversation::{Conversation, Input, Output};
use super::link::{ClientAudio, ClientLink, LinkEvent, LinkStats};
use super::{Control, EndReason, SessionShared};
use crate::providers::{ProviderCommand, ProviderSession};
use crate::telemetry;

/// How long the last events may take to reach the client at the end.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// Everything the task needs, built by the session builder when the offer is answered.
pub(crate) struct SessionTask<L: ClientLink> {
    pub shared: Arc<SessionShared>,
    pub start: Instant,
    pub deadline: Instant,
    pub link: L,
    pub control_rx: mpsc::Receiver<Control>,
    pub provider: ProviderSession,
    pub conv: Conversation,
    /// Per-packet histograms, resolved once (no registry lookup on the 20 ms path).
    pub pacing_hist: metrics::Histogram,
    pub uplink_hist: metrics::Histogram,
    /// Long-term memory of the session's user with its character (and the character's name):
    /// learns from the heard transcript once the session ends.
    pub memory: Option<(Arc<crate::memory::Memory>, crate::memory::Owner, String)>,
    /// Records every input and output of the core when the session is recorded.
    pub recorder: Option<crate::recording::Recorder>,
    /// Subtitles in the user's language: final agent transcripts translated off the task.
    pub translation: crate::translation::SessionTranslation,
    /// Client events held behind a final turn until it is durable.
    pub gate: super::durable_gate::DurableGate,
}

/// IO counters of the task, exported as deltas.
#[derive(Debug, Default, Clone, Copy)]
struct Counters {
    uplink_to_provider_dropped: u64,
    /// Flush ticks so far, and the loss the encoder's FEC is set for (percent).
    fec_ticks: u64,
    fec_loss_pct: u8,
}

#[derive(Debug, Default, Clone, Copy)]
struct Exported {
    uplink: media::UplinkStats,
    playout: media::PlayoutStats,
    link: LinkStats,
    uplink_to_provider_dropped: u64,
}

/// What one drain of the core's outputs did.
#[derive(Debug, Default)]
struct Drained {
    end: Option<EndReason>,
    audio_to_provider: bool,
}

impl<L: ClientLink> SessionTask<L> {
    /// Run until the session ends; returns why it ended.
    pub async fn run(mut self) -> EndReason {
        let mut counters = Counters::default();
        let mut exported = Exported::default();
        let mut flush = tokio::time::interval(Duration::from_secs(1));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let deadline = tokio::time::Instant::from_std(self.deadline);
        // Both timers live as long as the task: a `Sleep` made per iteration would be inserted
        // into and removed from tokio's timer wheel (under its lock) twice per packet and frame;
        // the core's timer is only re-armed when its instant changes.
        let max_duration = tokio::time::sleep_until(deadline);
        tokio::pin!(max_duration);
        let core_timer = tokio::time::sleep_until(deadline);
        tokio::pin!(core_timer);
        let mut armed: Option<tokio::time::Instant> = None;
        let reason = loop {
            let wake = self.conv.poll_timeout().map(|d| tokio::time::Instant::from_std(self.start + d));
            if wake != armed {
                if let Some(at) = wake {
                    core_timer.as_mut().reset(at);
                }
                armed = wake;
            }
            let provider_room = self.conv.wants_provider_events();
            let gate_waiting = self.gate.is_waiting();
            let step = tokio::select! {
                biased;
                ctl = self.control_rx.recv() => match ctl {
                    Some(Control::End(reason)) => break reason,
                    Some(Control::Inject(text)) => self.input(Input::UserText(text), &mut counters).await,
                    Some(Control::IceRestart(restart, reply)) => {
                        // On a task of its own: the restart waits for gathering, pacing must not.
                        let restarting = self.link.restart_ice(restart);
                        tokio::spawn(async move { let _ = reply.send(restarting.await); });
                        Drained::default()
                    }
                    Some(Control::AgentResult(r)) => self.input(Input::AgentResult(r), &mut counters).await,
                    Some(Control::Trickle(c)) => {
                        if let Err(e) = self.link.add_candidate(c).await {
                            tracing::debug!(session_id = %self.shared.id, error = %e, "trickled candidate rejected");
                        }
                        Drained::default()
                    }
                    None => break EndReason::ServerShutdown,
                },
                // Before media and provider events (biased): a final held for the journal goes
                // out as soon as it is durable, not when the provider's stream pauses.
                durable = self.gate.next(), if gate_waiting => self.release(Some(durable)).await,
                _ = &mut core_timer, if armed.is_some() => self.input(Input::Timeout, &mut counters).await,
                ev = self.link.recv() => match ev {
                    Some(ev) => self.on_link_event(ev, &mut counters).await,
                    None => break EndReason::PeerDisconnected,
                },
                ev = self.provider.events.recv(), if provider_room => match ev {
                    Some(ev) => self.input(Input::Provider(ev), &mut counters).await,
                    None => break EndReason::ProviderError,
                },
                tr = self.translation.next() => match tr {
                    crate::translation::Translated::Event(ev) => {
                        self.emit(ev).await;
                        Drained::default()
                    }
                    crate::translation::Translated::UserText(text) => {
                        self.to_provider(ProviderCommand::Text(text), &mut counters);
                        Drained::default()
                    }
                },
                _ = &mut max_duration => break EndReason::MaxDuration,
                _ = flush.tick() => {
                    self.export_stats(&counters, &mut exported);
                    self.adapt_fec(&mut counters).await;
                    // Once a second the core also checks what only a clock can see (no audio).
                    self.input(Input::Timeout, &mut counters).await
                }
            };
            if let Some(reason) = step.end {
                break reason;
            }
        };
        self.finish(reason, &counters, &mut exported).await;
        reason
    }

    /// Media time: since the session's start.
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Feed the core and carry out what it decided.
    async fn input(&mut self, input: Input, counters: &mut Counters) -> Drained {
        let now = self.now();
        if let Some(r) = self.recorder.as_mut() {
            r.input(now, &input);
        }
        self.conv.handle_input(now, input);
        self.drain(counters).await
    }

    async fn on_link_event(&mut self, ev: LinkEvent, counters: &mut Counters) -> Drained {
        let input = match ev {
            LinkEvent::Audio { arrival, audio: ClientAudio::Opus { seq, timestamp, payload_type, ssrc, payload } } => {
                let drained =
                    self.input(Input::ClientOpus { seq, timestamp, payload_type, ssrc, payload }, counters).await;
                if drained.audio_to_provider {
                    self.uplink_hist.record(arrival.elapsed().as_secs_f64());
                }
                return drained;
            }
            LinkEvent::EventsOpen => Input::ClientConnected,
            LinkEvent::EventsClosed => Input::ClientDisconnected,
            // The user's language is the translation task's (IO); the rest is the core's.
            LinkEvent::Event(Some(ClientEvent::SessionUpdate { instructions, voice, tools, language })) => {
                if let Some(language) = language
                    && let Some(notice) = self.translation.set_user_language(&language)
                {
                    self.link.send_event(&notice).await;
                }
                if instructions.is_none() && voice.is_none() && tools.is_none() {
                    return Drained::default();
                }
                Input::Client(Some(ClientEvent::SessionUpdate { instructions, voice, tools, language: None }))
            }
            LinkEvent::Event(ev) => Input::Client(ev),
            LinkEvent::Voice(v) => Input::ClientVoice(v),
            LinkEvent::Playback { item_id, played } => Input::ClientPlayback { item_id, played },
            LinkEvent::BadMessage(e) => Input::BadClientMessage { code: e.code().to_owned(), message: e.to_string() },
            LinkEvent::Connected => {
                self.shared.mark_connected();
                Input::MediaConnected
            }
            LinkEvent::Closed(reason) => return Drained { end: Some(reason), audio_to_provider: false },
        };
        self.input(input, counters).await
    }

    /// Carry out the core's outputs, in order.
    async fn drain(&mut self, counters: &mut Counters) -> Drained {
        let mut drained = Drained::default();
        while let Some(out) = self.conv.poll_output() {
            if let Some(r) = self.recorder.as_mut() {
                r.output(&out);
            }
            match out {
                Output::Event(ev) => {
                    self.translation.on_event(&ev);
                    self.emit(ev).await
                }
                Output::State(state) => {
                    self.shared.set_agent_state(state);
                    self.emit(ServerEvent::State { state }).await;
                }
                Output::Provider(ProviderCommand::Text(text)) => {
                    // Typed text may be translated for a text-only model first (off this task).
                    if let Err(text) = self.translation.user_text(text) {
                        self.to_provider(ProviderCommand::Text(text), counters);
                    }
                }
                Output::Provider(cmd) => drained.audio_to_provider |= self.to_provider(cmd, counters),
                Output::Turn { role, text, interrupted } => {
                    if let Some(durable) = self.shared.push_turn(role, &text, interrupted) {
                        self.gate.wait(durable);
                    }
                }
                Output::Flag(flag) => self.shared.push_flag(flag),
                Output::Audio(frame) => {
                    if let Err(e) = self.link.send_audio(&frame).await {
                        tracing::debug!(session_id = %self.shared.id, error = %e, "writing agent audio failed");
                    }
                    self.pacing_hist.record(frame.lateness.as_secs_f64());
                }
                Output::End(reason) => drained.end = Some(reason),
            }
        }
        drained
    }

    /// Hand `cmd` to the provider without waiting: full, audio and images are dropped and
    /// counted; other commands go back to the core as refused. True when audio went.
    fn to_provider(&mut self, cmd: ProviderCommand, counters: &mut Counters) -> bool {
        let audio = matches!(cmd, ProviderCommand::AppendAudio(_));
        match self.provider.commands.try_send(cmd) {
            Ok(()) => audio,
            Err(TrySendError::Full(ProviderCommand::AppendAudio(_) | ProviderCommand::Image(_))) => {
                counters.uplink_to_provider_dropped += 1;
                false
            }
            Err(TrySendError::Full(cmd) | TrySendError::Closed(cmd)) => {
                let (now, refused) = (self.now(), Input::Refused(cmd));
                if let Some(r) = self.recorder.as_mut() {
                    r.input(now, &refused);
                }
                self.conv.handle_input(now, refused);
                false
            }
        }
    }

    /// Send `ev` to the client, or hold it while a final turn before it is not yet durable.
    async fn emit(&mut self, ev: ServerEvent) {
        let mut released = Vec::new();
        if let Some(ev) = self.gate.hold(ev, &mut released) {
            self.link.send_event(&ev).await;
        }
        for ev in released {
            self.link.send_event(&ev).await;
        }
    }

    /// A held turn was answered (`Some`), or the session ends (`None`: wait out the rest
    /// briefly): send what the gate releases.
    async fn release(&mut self, durable: Option<crate::store::journal::Durability>) -> Drained {
        let mut released = Vec::new();
        match durable {
            Some(d) => self.gate.resolve(d, &mut released),
            None => self.gate.settle(CLOSE_GRACE, &mut released).await,
        }
        for ev in released {
            self.link.send_event(&ev).await;
        }
        Drained::default()
    }

    /// In-band FEC follows the loss the client reports (as libwebrtc does): libopus spends bits
    /// and ~50 us per frame on it only while packets are being lost. Checked every 5 s.
    async fn adapt_fec(&mut self, counters: &mut Counters) {
        counters.fec_ticks += 1;
        if !counters.fec_ticks.is_multiple_of(5) {
            return;
        }
        let Some(lost) = self.link.loss_fraction().await else { return };
        // Round up and cap: libopus wants a percentage; 0 turns LBRR off.
        let pct = ((lost * 100.0).ceil() as u8).min(30);
        if pct != counters.fec_loss_pct {
            counters.fec_loss_pct = pct;
            if let Err(e) = self.conv.set_expected_loss(pct) {
                tracing::debug!(error = %e, "setting the encoder's expected loss failed");
            }
        }
    }

    /// Export counter deltas since the last call.
    fn export_stats(&self, counters: &Counters, e: &mut Exported) {
        use telemetry::{QUEUE_DROPS, add, add_with};
        let (up, po, link) = (self.conv.uplink_stats(), self.conv.playout_stats(), self.link.stats());
        add_with(telemetry::RTP_PACKETS, "direction", "in".into(), up.packets - e.uplink.packets);
        add_with(telemetry::RTP_PACKETS, "direction", "out".into(), po.frames_out - e.playout.frames_out);
        add(telemetry::RTP_LOST, up.lost - e.uplink.lost);
        add(telemetry::RTP_LATE, up.late_or_duplicate - e.uplink.late_or_duplicate);
        add(telemetry::PLC_FRAMES, up.plc_frames - e.uplink.plc_frames);
        add(telemetry::FEC_FRAMES, up.fec_frames - e.uplink.fec_frames);
        add(telemetry::DECODE_ERRORS, up.decode_errors - e.uplink.decode_errors);
        add(telemetry::LATE_FRAMES, po.late_frames - e.playout.late_frames);
        let to_provider = counters.uplink_to_provider_dropped;
        add_with(QUEUE_DROPS, "queue", "uplink_to_provider".into(), to_provider - e.uplink_to_provider_dropped);
        add_with(QUEUE_DROPS, "queue", "events_to_client".into(), link.events_dropped - e.link.events_dropped);
        add_with(QUEUE_DROPS, "queue", "rtp_to_session".into(), link.audio_dropped - e.link.audio_dropped);
        add_with(QUEUE_DROPS, "queue", "messages_to_session".into(), link.messages_dropped - e.link.messages_dropped);
        add_with(QUEUE_DROPS, "queue", "audio_to_client".into(), link.audio_out_dropped - e.link.audio_out_dropped);
        *e = Exported { uplink: up, playout: po, link, uplink_to_provider_dropped: to_provider };
    }

    /// The end: last stats, the provider closed, the client told (unless it is gone), the link closed.
    async fn finish(&mut self, reason: EndReason, counters: &Counters, exported: &mut Exported) {
        let ended_at = self.now();
        self.export_stats(counters, exported);
        self.shared.push_usage(self.conv.usage());
        let _ = self.provider.commands.try_send(ProviderCommand::Close);
        self.release(None).await;
        if reason != EndReason::PeerDisconnected {
            self.link.send_event(&ServerEvent::SessionEnded { reason: reason.as_str().to_owned() }).await;
        }
        self.link.close(CLOSE_GRACE).await;
        if let Some(r) = self.recorder.take() {
            let complete = r.finish(ended_at, reason.as_str()).await;
            tracing::info!(session_id = %self.shared.id, complete, "recording closed");
        }
        let link = self.link.stats();
        tracing::info!(
            session_id = %self.shared.id,
            reason = %reason.as_str(),
            rtp_in = link.audio_in,
            rtp_dropped = link.audio_dropped,
            uplink_to_provider_dropped = counters.uplink_to_provider_dropped,
            uplink = ?self.conv.uplink_stats(),
            playout = ?self.conv.playout_stats(),
            events_dropped = link.events_dropped,
            "session ended"
        );
        if let Some((memory, owner, character_name)) = self.memory.take() {
            let ended = crate::memory::EndedSession {
                session_id: self.shared.id.clone(),
                owner,
                character_name,
                api_key_id: self.shared.api_key_id.clone(),
                turns: self.shared.turns(),
            };
            // Off the session: the extractor may ask a model, and the task must end now.
            tokio::spawn(tracing::Instrument::in_current_span(async move {
                memory.remember(ended).await;
            }));
        }
    }
}
