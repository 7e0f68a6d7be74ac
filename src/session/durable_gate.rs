//! Finals shown only once kept: the session task holds client events back behind a final turn
//! until the store writer says the turn is durable (appended to the fsync'd journal, see
//! [`crate::store::journal`]), so a final transcript the user saw survives a crash.
//!
//! Only events wait (audio never does, nor the events timed to it: visemes, emotions, gestures
//! and the agent's words as spoken): everything else sent after the turn is held in order, and
//! released when every pending turn is answered. A turn that could not be made durable (the
//! journal is full or failing) is announced with an `error` event `transcript_not_durable`
//! before the held events. The wait is one journal append + `fdatasync` (group-committed),
//! measured as `kotodama_transcript_durable_seconds`.

use std::collections::VecDeque;
use std::time::Instant;

use signaling::events::ServerEvent;
use tokio::sync::oneshot;

use crate::store::journal::Durability;

/// Events held at most; beyond that they are released in order without waiting.
const MAX_HELD: usize = 1024;

/// Client events waiting for the turns before them to be durable.
pub(crate) struct DurableGate {
    waits: VecDeque<(Instant, oneshot::Receiver<Durability>)>,
    held: VecDeque<ServerEvent>,
    hist: metrics::Histogram,
}

impl Default for DurableGate {
    fn default() -> Self {
        DurableGate {
            waits: VecDeque::new(),
            held: VecDeque::new(),
            hist: metrics::histogram!(crate::telemetry::TRANSCRIPT_DURABLE),
        }
    }
}

impl DurableGate {
    /// A turn was recorded: hold later events until `durable` answers.
    pub fn wait(&mut self, durable: oneshot::Receiver<Durability>) {
        self.waits.push_back((Instant::now(), durable));
    }

    /// Whether a turn is still waiting to be durable.
    pub fn is_waiting(&self) -> bool {
        !self.waits.is_empty()
    }

    /// `ev` to send now, or None when it was held. Past [`MAX_HELD`], the held events are
    /// released in order (appended to `out`) and the gate stops waiting.
    pub fn hold(&mut self, ev: ServerEvent, out: &mut Vec<ServerEvent>) -> Option<ServerEvent> {
        if self.waits.is_empty() || timed_to_audio(&ev) {
            return Some(ev);
        }
        self.held.push_back(ev);
        if self.held.len() >= MAX_HELD {
            tracing::warn!(
                held = self.held.len(),
                "durable gate overflowed; events released before their turn is stored"
            );
            self.waits.clear();
            out.extend(self.held.drain(..));
        }
        None
    }

    /// The oldest pending turn's answer (cancel safe). Pending forever when none waits.
    pub async fn next(&mut self) -> Durability {
        match self.waits.front_mut() {
            Some((_, rx)) => rx.await.unwrap_or(Durability::Refused),
            None => std::future::pending().await,
        }
    }

    /// The oldest pending turn answered `d`: once none waits, the events to send, in order (an
    /// `error` first for each turn that is not durable).
    pub fn resolve(&mut self, d: Durability, out: &mut Vec<ServerEvent>) {
        if let Some((since, _)) = self.waits.pop_front() {
            self.hist.record(since.elapsed().as_secs_f64());
        }
        if !d.is_durable() {
            out.push(not_durable());
        }
        // Answers already in hand count too.
        while let Some((since, rx)) = self.waits.front_mut() {
            match rx.try_recv() {
                Ok(d) => {
                    self.hist.record(since.elapsed().as_secs_f64());
                    if !d.is_durable() {
                        out.push(not_durable());
                    }
                    self.waits.pop_front();
                }
                Err(oneshot::error::TryRecvError::Closed) => {
                    out.push(not_durable());
                    self.waits.pop_front();
                }
                Err(oneshot::error::TryRecvError::Empty) => return,
            }
        }
        out.extend(self.held.drain(..));
    }

    /// At the end: whatever is held, after waiting at most `grace` for the pending turns.
    pub async fn settle(&mut self, grace: std::time::Duration, out: &mut Vec<ServerEvent>) {
        let deadline = tokio::time::Instant::now() + grace;
        while self.is_waiting() {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(d) => self.resolve(d, out),
                Err(_) => break,
            }
        }
        self.waits.clear();
        out.extend(self.held.drain(..));
    }
}

/// Events scheduled against the agent's audio (visemes, emotions, gestures, the agent's words as
/// they are spoken): never held, so they stay in step with what is heard.
fn timed_to_audio(ev: &ServerEvent) -> bool {
    match ev {
        ServerEvent::Viseme { .. } | ServerEvent::Emotion { .. } | ServerEvent::Gesture { .. } => true,
        ServerEvent::Transcript { role, is_final, .. } => *role == signaling::events::Role::Agent && !is_final,
        _ => false,
    }
}

fn not_durable() -> ServerEvent {
    ServerEvent::Error {
        code: "transcript_not_durable".to_owned(),
        message: "the final transcript before this could not be stored durably yet (store and journal unavailable); \
                  it is kept in memory and may be lost if the server fails"
            .to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use signaling::events::{AgentState, ServerEvent};

    fn ev(i: u8) -> ServerEvent {
        ServerEvent::State { state: if i % 2 == 0 { AgentState::Listening } else { AgentState::Speaking } }
    }

    #[tokio::test]
    async fn events_after_a_turn_wait_until_it_is_durable() {
        let mut gate = DurableGate::default();
        let mut out = Vec::new();
        assert!(gate.hold(ev(0), &mut out).is_some(), "nothing waits: sent at once");
        let (tx, rx) = oneshot::channel();
        gate.wait(rx);
        assert!(gate.hold(ev(1), &mut out).is_none());
        assert!(gate.hold(ev(2), &mut out).is_none());
        assert!(out.is_empty());
        tx.send(Durability::Journaled).unwrap();
        let d = gate.next().await;
        gate.resolve(d, &mut out);
        assert_eq!(out, vec![ev(1), ev(2)]);
        assert!(!gate.is_waiting());
    }

    #[tokio::test]
    async fn a_turn_that_is_not_durable_is_announced_first() {
        let mut gate = DurableGate::default();
        let mut out = Vec::new();
        let (tx, rx) = oneshot::channel();
        gate.wait(rx);
        assert!(gate.hold(ev(1), &mut out).is_none());
        tx.send(Durability::Queued).unwrap();
        let d = gate.next().await;
        gate.resolve(d, &mut out);
        assert!(matches!(&out[0], ServerEvent::Error { code, .. } if code == "transcript_not_durable"));
        assert_eq!(out[1], ev(1));
    }
}
