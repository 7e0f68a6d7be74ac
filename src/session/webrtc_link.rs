//! The WebRTC client link: the [`Peer`] (Opus over RTP both ways) and its `events` data channel,
//! spelled by an [`EventCodec`] (api-v1 on `events`, RTVI on Pipecat's `chat`, [`super::rtvi`]).
//!
//! A codec with a handshake (RTVI `client-ready`) holds [`LinkEvent::EventsOpen`] back until the
//! client greeted; responses a codec owes (RTVI `server-response`) go out as soon as the request
//! is decoded.
//!
//! The peer's callbacks forward into a bounded channel ([`PeerEvent`]); this link turns those into
//! [`LinkEvent`]s. It never waits on the client: a data-channel write that cannot go is dropped and
//! counted.

use std::sync::atomic::Ordering;
use std::time::Duration;

use signaling::events::ServerEvent;
use tokio::sync::mpsc;
use webrtc::peer_connection::{RTCIceCandidateInit, RTCPeerConnectionState};

use super::EndReason;
use super::conversation::AudioFrame;
use super::link::{ClientAudio, ClientLink, EventCodec, LinkError, LinkEvent, LinkStats};
use crate::peer::{Peer, PeerEvent};

/// A client connected over WebRTC.
pub struct WebRtcLink<C: EventCodec> {
    peer: Peer,
    rx: mpsc::Receiver<PeerEvent>,
    dc: Option<crate::peer::EventChannel>,
    codec: C,
    /// Encoded wire messages (reused buffer).
    wire: Vec<String>,
    events_dropped: u64,
    closed: bool,
    /// The channel opened but the codec's handshake is pending: `EventsOpen` waits for it.
    open_pending: bool,
}

impl<C: EventCodec> WebRtcLink<C> {
    /// Wrap an answered peer and the receiver of its forwarded events.
    pub fn new(peer: Peer, rx: mpsc::Receiver<PeerEvent>, codec: C) -> Self {
        Self {
            peer,
            rx,
            dc: None,
            codec,
            wire: Vec::with_capacity(4),
            events_dropped: 0,
            closed: false,
            open_pending: false,
        }
    }

    fn map(&mut self, ev: PeerEvent) -> Option<LinkEvent> {
        Some(match ev {
            PeerEvent::Rtp { arrival, seq, timestamp, payload_type, ssrc, payload } => {
                LinkEvent::Audio { arrival, audio: ClientAudio::Opus { seq, timestamp, payload_type, ssrc, payload } }
            }
            PeerEvent::ChannelOpen(dc) => {
                self.dc = Some(dc);
                if !self.codec.handshake_done() {
                    // The dialect's greeting comes first (RTVI `client-ready`).
                    self.open_pending = true;
                    return None;
                }
                LinkEvent::EventsOpen
            }
            PeerEvent::Message(bytes) => match self.codec.decode(&bytes) {
                Ok(_) if self.codec.end_requested() => LinkEvent::Closed(EndReason::ClientRequest),
                Ok(None) if self.open_pending && self.codec.handshake_done() => {
                    self.open_pending = false;
                    LinkEvent::EventsOpen
                }
                Ok(ev) => LinkEvent::Event(ev),
                Err(e) => LinkEvent::BadMessage(e),
            },
            PeerEvent::ChannelClosed => {
                self.dc = None;
                LinkEvent::EventsClosed
            }
            PeerEvent::State(RTCPeerConnectionState::Connected) => LinkEvent::Connected,
            PeerEvent::State(RTCPeerConnectionState::Failed) => LinkEvent::Closed(EndReason::PeerDisconnected),
            PeerEvent::State(RTCPeerConnectionState::Closed) => LinkEvent::Closed(EndReason::PeerDisconnected),
            PeerEvent::State(_) => return None,
        })
    }
}

impl<C: EventCodec> WebRtcLink<C> {
    /// Send what the codec owes the client for the message it just decoded (responses).
    async fn send_replies(&mut self) {
        self.codec.take_replies(&mut self.wire);
        if !self.wire.is_empty() {
            self.flush_wire().await;
        }
    }

    /// Send the encoded messages in `wire` (dropped and counted when they cannot go).
    async fn flush_wire(&mut self) {
        let Some(dc) = &self.dc else {
            self.wire.clear();
            return;
        };
        for msg in self.wire.drain(..) {
            if dc.try_send_text(&msg).await.is_err() {
                self.events_dropped += 1;
            }
        }
    }
}

impl<C: EventCodec> ClientLink for WebRtcLink<C> {
    async fn recv(&mut self) -> Option<LinkEvent> {
        loop {
            let Some(ev) = self.rx.recv().await else {
                // The peer's callbacks are gone: the connection failed underneath.
                return (!std::mem::replace(&mut self.closed, true))
                    .then_some(LinkEvent::Closed(EndReason::PeerDisconnected));
            };
            let ev = self.map(ev);
            self.send_replies().await;
            if let Some(ev) = ev {
                return Some(ev);
            }
        }
    }

    async fn send_audio(&mut self, frame: &AudioFrame<'_>) -> Result<(), LinkError> {
        // RTP timestamps on the playout clock: 48 kHz units of the frame's due time.
        let ts = (frame.due.as_micros() as u64 * 48 / 1000) as u32;
        self.peer
            .write_opus(frame.payload, ts, frame.talkspurt_start)
            .await
            .map_err(|e| LinkError::Write(e.to_string()))
    }

    async fn send_event(&mut self, ev: &ServerEvent) {
        if self.dc.is_none() {
            return;
        }
        self.codec.encode(ev, &mut self.wire);
        self.flush_wire().await;
    }

    async fn add_candidate(&mut self, candidate: RTCIceCandidateInit) -> Result<(), LinkError> {
        self.peer.add_candidate(candidate).await.map_err(|e| LinkError::Write(e.to_string()))
    }

    fn restart_ice(
        &mut self,
        restart: crate::peer::IceRestart,
    ) -> futures::future::BoxFuture<'static, Result<String, LinkError>> {
        let restarting = self.peer.restart_ice(restart);
        Box::pin(async move { restarting.await.map_err(|e| LinkError::Write(e.to_string())) })
    }

    async fn loss_fraction(&mut self) -> Option<f64> {
        self.peer.remote_fraction_lost().await
    }

    fn stats(&self) -> LinkStats {
        let c = self.peer.counters();
        LinkStats {
            audio_in: c.rtp_in.load(Ordering::Relaxed),
            audio_dropped: c.rtp_dropped.load(Ordering::Relaxed),
            messages_dropped: c.messages_dropped.load(Ordering::Relaxed),
            events_dropped: self.events_dropped,
            audio_out_dropped: c.rtp_out_dropped.load(Ordering::Relaxed),
        }
    }

    async fn close(&mut self, grace: Duration) {
        if let Some(dc) = self.dc.take() {
            // Let the last events (session.ended) reach the client before the close: wait, bounded,
            // until SCTP has them acknowledged.
            let steps = (grace.as_millis() / 10).max(1);
            for _ in 0..steps {
                if dc.outstanding_bytes().await == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            dc.close().await;
        }
        self.peer.close().await;
    }
}
