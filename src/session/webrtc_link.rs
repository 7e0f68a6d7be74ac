//! The WebRTC client link: the [`Peer`] (Opus over RTP both ways) and its `events` data channel,
//! spelled by an [`EventCodec`] (api-v1 today).
//!
//! The peer's callbacks forward into a bounded channel ([`PeerEvent`]); this link turns those into
//! [`LinkEvent`]s. It never waits on the client: a data-channel write that cannot go is dropped and
//! counted.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use signaling::events::ServerEvent;
use tokio::sync::mpsc;
use webrtc::data_channel::DataChannel;
use webrtc::peer_connection::{RTCIceCandidateInit, RTCPeerConnectionState};

use super::EndReason;
use super::conversation::AudioFrame;
use super::link::{ClientAudio, ClientLink, EventCodec, LinkError, LinkEvent, LinkStats};
use crate::peer::{Peer, PeerEvent};

/// A client connected over WebRTC.
pub struct WebRtcLink<C: EventCodec> {
    peer: Peer,
    rx: mpsc::Receiver<PeerEvent>,
    dc: Option<Arc<dyn DataChannel>>,
    codec: C,
    /// Encoded wire messages (reused buffer).
    wire: Vec<String>,
    events_dropped: u64,
    closed: bool,
}

impl<C: EventCodec> WebRtcLink<C> {
    /// Wrap an answered peer and the receiver of its forwarded events.
    pub fn new(peer: Peer, rx: mpsc::Receiver<PeerEvent>, codec: C) -> Self {
        Self { peer, rx, dc: None, codec, wire: Vec::with_capacity(4), events_dropped: 0, closed: false }
    }

    /// Send the encoded messages waiting in `wire` (dropped and counted without a channel).
    async fn send_wire(&mut self) {
        for msg in self.wire.drain(..) {
            match &self.dc {
                Some(dc) if dc.try_send_text(&msg).await.is_ok() => {}
                _ => self.events_dropped += 1,
            }
        }
    }

    fn map(&mut self, ev: PeerEvent) -> Option<LinkEvent> {
        Some(match ev {
            PeerEvent::Rtp { arrival, seq, timestamp, payload_type, ssrc, payload } => {
                LinkEvent::Audio { arrival, audio: ClientAudio::Opus { seq, timestamp, payload_type, ssrc, payload } }
            }
            PeerEvent::ChannelOpen(dc) => {
                self.dc = Some(dc);
                LinkEvent::EventsOpen
            }
            PeerEvent::Message(bytes) => {
                let decoded = self.codec.decode(&bytes);
                // The dialect's own acknowledgements go out before the event is acted on.
                self.codec.take_replies(&mut self.wire);
                match decoded {
                    Ok(ev) => LinkEvent::Event(ev),
                    Err(e) => LinkEvent::BadMessage(e),
                }
            }
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

impl<C: EventCodec> ClientLink for WebRtcLink<C> {
    async fn recv(&mut self) -> Option<LinkEvent> {
        loop {
            let Some(ev) = self.rx.recv().await else {
                // The peer's callbacks are gone: the connection failed underneath.
                return (!std::mem::replace(&mut self.closed, true))
                    .then_some(LinkEvent::Closed(EndReason::PeerDisconnected));
            };
            let ev = self.map(ev);
            self.send_wire().await;
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
        self.send_wire().await;
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
            audio_out_dropped: 0,
        }
    }

    async fn close(&mut self, grace: Duration) {
        if let Some(dc) = self.dc.take() {
            // Let the last events (session.ended) reach the client before the close: wait, bounded,
            // until SCTP has them acknowledged.
            let steps = (grace.as_millis() / 10).max(1);
            for _ in 0..steps {
                if dc.outstanding_bytes().await.map_or(true, |n| n == 0) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let _ = dc.close().await;
        }
        self.peer.close().await;
    }
}
