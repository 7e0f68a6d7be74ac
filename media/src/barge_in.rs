//! Barge-in: the decision to stop the agent when the user talks over it (or asks to).
//!
//! Pure: it takes the VAD edge (or the client's `interrupt` message) and the playout, clears
//! the playout when agent audio is queued or playing, and returns what the session task must
//! tell the others: `agent.interrupted{item_id, played_ms}` to the client, and `Cancel` +
//! `Truncate{item_id, audio_end_ms: played_ms}` to the provider, so the model's context holds
//! only what the user heard.

use std::time::Duration;

use crate::playout::Playout;
use crate::uplink::UplinkEvent;

/// Why the agent was interrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptReason {
    /// The VAD heard the user start speaking at stream position `at`.
    UserSpeech {
        /// Uplink stream position of the speech onset.
        at: Duration,
    },
    /// The client sent an explicit `interrupt`.
    ClientRequest,
    /// Moderation flagged the reply before it was spoken (the server cut it).
    Moderation,
    /// The session reached a budget configured to end it (the server cut the reply there).
    Budget,
}

/// The outcome of a barge-in: what was cut and how much of it the user heard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interruption {
    /// The agent item that was playing.
    pub item_id: String,
    /// Audio of that item actually sent (frames emitted x 20 ms).
    pub played: Duration,
    /// What triggered it.
    pub reason: InterruptReason,
}

impl Interruption {
    /// `played` in whole milliseconds, as the wire and the providers' truncate calls want it.
    pub fn played_ms(&self) -> u64 {
        self.played.as_millis() as u64
    }
}

/// Barge-in settings. Default: enabled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BargeInConfig {
    /// When false, user speech never interrupts (explicit `interrupt` still does).
    pub enabled: bool,
}

impl Default for BargeInConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// Barge-in policy (stateless apart from its counter).
#[derive(Clone, Debug, Default)]
pub struct BargeIn {
    cfg: BargeInConfig,
    interruptions: u64,
}

impl BargeIn {
    /// A policy with `cfg`.
    pub fn new(cfg: BargeInConfig) -> Self {
        Self { cfg, interruptions: 0 }
    }

    /// VAD speech onset: interrupts when the playout is active and barge-in is enabled.
    pub fn on_speech_started(&mut self, at: Duration, playout: &mut Playout) -> Option<Interruption> {
        if !self.cfg.enabled {
            return None;
        }
        self.cut(playout, InterruptReason::UserSpeech { at })
    }

    /// Convenience: feed every uplink event; acts on `SpeechStarted` only.
    pub fn on_uplink_event(&mut self, ev: &UplinkEvent<'_>, playout: &mut Playout) -> Option<Interruption> {
        match *ev {
            UplinkEvent::SpeechStarted { at } => self.on_speech_started(at, playout),
            _ => None,
        }
    }

    /// The client's explicit `interrupt`: interrupts whenever the playout is active.
    pub fn interrupt(&mut self, playout: &mut Playout) -> Option<Interruption> {
        self.cut(playout, InterruptReason::ClientRequest)
    }

    /// Interruptions made so far.
    pub fn interruptions(&self) -> u64 {
        self.interruptions
    }

    fn cut(&mut self, playout: &mut Playout, reason: InterruptReason) -> Option<Interruption> {
        if !playout.is_active() {
            return None;
        }
        let cleared = playout.clear()?;
        self.interruptions += 1;
        Some(Interruption { item_id: cleared.item_id, played: cleared.played, reason })
    }
}
