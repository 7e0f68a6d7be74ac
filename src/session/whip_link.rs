//! The WHIP/WHEP client link: the session's uplink comes from one peer (a WHIP publisher's
//! send-only microphone, RFC 9725) and its downlink goes to others (WHEP players that pull the
//! character's voice) — the shape of a live stream with an AI co-host.
//!
//! [`WhipLink`] is a [`ClientLink`]: `recv` yields the publisher's RTP, its connection state and
//! whatever the players' `events` data channels say; `send_audio` writes each 20 ms frame to every
//! attached player (none attached: the frame goes nowhere, the conversation runs on); `send_event`
//! goes to the players' data channels (api-v1 JSON). A publisher has no data channel, so the link
//! reports the event channel open as soon as the publisher's media connects (the core then sends
//! `session.ready` and starts listening); a player whose channel opens later first gets the last
//! `session.ready` and `state` events again, so it knows where the session is.
//!
//! Players come and go while the session runs: the HTTP layer ([`crate::whip`]) answers a WHEP
//! offer with [`super::SessionManager::whep_player`] and hands the peer to the running link as a
//! [`PlayerCmd`]; a player that fails or is deleted is closed and removed. The session ends when
//! the publisher goes (its peer closes or fails) or on DELETE of the WHIP resource.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use signaling::events::ServerEvent;
use tokio::sync::mpsc;
use webrtc::peer_connection::{RTCIceCandidateInit, RTCPeerConnectionState};

use super::conversation::AudioFrame;
use super::link::{ApiV1, ClientAudio, ClientLink, EventCodec, LinkError, LinkEvent, LinkStats};
use super::{CreateOptions, EndReason, SessionError, SessionManager, SessionShared, SessionState};
use crate::peer::{Peer, PeerEvent};

/// Most WHEP players one session feeds at once (each costs one RTP write per 20 ms frame).
pub const MAX_PLAYERS: usize = 16;
/// Most event watchers (`GET /v1/sessions/{id}/events`) of one session.
pub const MAX_WATCHERS: usize = 16;
/// Events a watcher may fall behind by before it misses some (counted in `events_dropped`).
pub const WATCHER_QUEUE: usize = 64;
/// Capacity of a player's channel to the link (state changes and data-channel messages only:
/// a WHEP player sends no audio).
const PLAYER_CHANNEL_CAPACITY: usize = 64;

/// A change to the players of a running [`WhipLink`] (from the HTTP layer).
pub enum PlayerCmd {
    /// Start sending to this answered player; its callbacks arrive on `events`.
    Attach {
        /// The player's id (its WHEP resource is `/v1/sessions/{session}/whep/{id}`).
        id: String,
        /// Its peer.
        peer: Peer,
        /// Its forwarded callbacks.
        events: mpsc::Receiver<PeerEvent>,
    },
    /// A trickled candidate for a player (PATCH of its WHEP resource).
    Trickle {
        /// The player's id.
        id: String,
        /// The candidate.
        candidate: RTCIceCandidateInit,
    },
    /// Send the session's api-v1 events (JSON text) to `tx` too, starting with the last
    /// `session.ready` and `state`; dropped when `tx` closes or the session ends. Beyond
    /// [`MAX_WATCHERS`] the sender is dropped at once (its stream ends).
    Watch {
        /// Where the events go (bounded: [`WATCHER_QUEUE`]; a full queue loses events).
        tx: mpsc::Sender<String>,
    },
    /// The ids of the players still attached (a player whose connection failed or closed has
    /// left), answered once every command sent before this one was carried out.
    Live {
        /// Where the ids go.
        reply: tokio::sync::oneshot::Sender<Vec<String>>,
    },
    /// Stop and close a player (DELETE of its WHEP resource).
    Detach {
        /// The player's id.
        id: String,
    },
}

/// One attached WHEP player.
struct Player {
    id: String,
    peer: Peer,
    dc: Option<crate::peer::EventChannel>,
}

/// A WHIP publisher's session: uplink from the publisher, downlink to the WHEP players.
pub struct WhipLink {
    uplink: Peer,
    uplink_rx: mpsc::Receiver<PeerEvent>,
    commands: mpsc::Receiver<PlayerCmd>,
    players: Vec<Player>,
    /// Event-only listeners ([`PlayerCmd::Watch`]).
    watchers: Vec<mpsc::Sender<String>>,
    /// Every player's callbacks, tagged with its id (one forwarding task per player).
    player_tx: mpsc::Sender<(String, PeerEvent)>,
    player_rx: mpsc::Receiver<(String, PeerEvent)>,
    codec: ApiV1,
    wire: Vec<String>,
    /// The last `session.ready` and `state` events, for players that join later.
    ready: Option<String>,
    state: Option<String>,
    /// `EventsOpen` is due (the publisher's media connected).
    open_due: bool,
    events_dropped: u64,
    closed: bool,
}

impl WhipLink {
    /// Wrap the publisher's answered peer, the receiver of its callbacks and the receiver of
    /// player changes.
    pub fn new(uplink: Peer, uplink_rx: mpsc::Receiver<PeerEvent>, commands: mpsc::Receiver<PlayerCmd>) -> Self {
        let (player_tx, player_rx) = mpsc::channel(PLAYER_CHANNEL_CAPACITY);
        Self {
            uplink,
            uplink_rx,
            commands,
            players: Vec::new(),
            watchers: Vec::new(),
            player_tx,
            player_rx,
            codec: ApiV1,
            wire: Vec::with_capacity(4),
            ready: None,
            state: None,
            open_due: false,
            events_dropped: 0,
            closed: false,
        }
    }

    fn on_uplink(&mut self, ev: PeerEvent) -> Option<LinkEvent> {
        Some(match ev {
            PeerEvent::Rtp { arrival, seq, timestamp, payload_type, ssrc, payload } => {
                LinkEvent::Audio { arrival, audio: ClientAudio::Opus { seq, timestamp, payload_type, ssrc, payload } }
            }
            PeerEvent::State(RTCPeerConnectionState::Connected) => {
                self.open_due = true;
                LinkEvent::Connected
            }
            PeerEvent::State(RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) => {
                LinkEvent::Closed(EndReason::PeerDisconnected)
            }
            // A publisher has no data channel; one that opens some other channel is ignored.
            _ => return None,
        })
    }

    async fn on_command(&mut self, cmd: PlayerCmd) {
        match cmd {
            PlayerCmd::Attach { id, peer, mut events } => {
                if self.players.len() >= MAX_PLAYERS {
                    peer.close().await;
                    return;
                }
                let tx = self.player_tx.clone();
                let tag = id.clone();
                tokio::spawn(async move {
                    while let Some(ev) = events.recv().await {
                        if tx.send((tag.clone(), ev)).await.is_err() {
                            break;
                        }
                    }
                });
                self.players.push(Player { id, peer, dc: None });
            }
            PlayerCmd::Trickle { id, candidate } => {
                if let Some(p) = self.players.iter().find(|p| p.id == id)
                    && let Err(e) = p.peer.add_candidate(candidate).await
                {
                    tracing::debug!(player = %id, error = %e, "trickled player candidate rejected");
                }
            }
            PlayerCmd::Detach { id } => self.remove(&id).await,
            PlayerCmd::Watch { tx } => {
                self.watchers.retain(|w| !w.is_closed());
                if self.watchers.len() < MAX_WATCHERS {
                    for msg in self.ready.iter().chain(self.state.iter()) {
                        let _ = tx.try_send(msg.clone());
                    }
                    self.watchers.push(tx);
                }
            }
            PlayerCmd::Live { reply } => {
                let _ = reply.send(self.players.iter().map(|p| p.id.clone()).collect());
            }
        }
    }

    async fn remove(&mut self, id: &str) {
        if let Some(i) = self.players.iter().position(|p| p.id == id) {
            let p = self.players.swap_remove(i);
            if let Some(dc) = p.dc {
                dc.close().await;
            }
            p.peer.close().await;
        }
    }

    async fn on_player(&mut self, id: String, ev: PeerEvent) -> Option<LinkEvent> {
        match ev {
            PeerEvent::ChannelOpen(dc) => {
                // Catch the player up: the session's greeting and where the agent is now.
                for msg in self.ready.iter().chain(self.state.iter()) {
                    if dc.try_send_text(msg).await.is_err() {
                        self.events_dropped += 1;
                    }
                }
                if let Some(p) = self.players.iter_mut().find(|p| p.id == id) {
                    p.dc = Some(dc);
                }
                None
            }
            PeerEvent::ChannelClosed => {
                if let Some(p) = self.players.iter_mut().find(|p| p.id == id) {
                    p.dc = None;
                }
                None
            }
            PeerEvent::Message(bytes) => Some(match self.codec.decode(&bytes) {
                Ok(ev) => LinkEvent::Event(ev),
                Err(e) => LinkEvent::BadMessage(e),
            }),
            PeerEvent::State(RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed) => {
                self.remove(&id).await;
                None
            }
            _ => None,
        }
    }
}

impl ClientLink for WhipLink {
    async fn recv(&mut self) -> Option<LinkEvent> {
        loop {
            if std::mem::take(&mut self.open_due) {
                return Some(LinkEvent::EventsOpen);
            }
            tokio::select! {
                ev = self.uplink_rx.recv() => match ev {
                    Some(ev) => if let Some(ev) = self.on_uplink(ev) { return Some(ev) },
                    None => {
                        return (!std::mem::replace(&mut self.closed, true))
                            .then_some(LinkEvent::Closed(EndReason::PeerDisconnected));
                    }
                },
                Some(cmd) = self.commands.recv() => self.on_command(cmd).await,
                Some((id, ev)) = self.player_rx.recv() => {
                    if let Some(ev) = self.on_player(id, ev).await {
                        return Some(ev);
                    }
                }
            }
        }
    }

    async fn send_audio(&mut self, frame: &AudioFrame<'_>) -> Result<(), LinkError> {
        // RTP timestamps on the playout clock: 48 kHz units of the frame's due time.
        let ts = (frame.due.as_micros() as u64 * 48 / 1000) as u32;
        let mut failed = None;
        for p in &mut self.players {
            if let Err(e) = p.peer.write_opus(frame.payload, ts, frame.talkspurt_start).await {
                failed = Some(e);
            }
        }
        failed.map_or(Ok(()), |e| Err(LinkError::Write(e.to_string())))
    }

    async fn send_event(&mut self, ev: &ServerEvent) {
        self.codec.encode(ev, &mut self.wire);
        match ev {
            ServerEvent::SessionReady { .. } => self.ready = self.wire.first().cloned(),
            ServerEvent::State { .. } => self.state = self.wire.first().cloned(),
            _ => {}
        }
        for msg in self.wire.drain(..) {
            for dc in self.players.iter().filter_map(|p| p.dc.as_ref()) {
                if dc.try_send_text(&msg).await.is_err() {
                    self.events_dropped += 1;
                }
            }
            for w in &self.watchers {
                if let Err(mpsc::error::TrySendError::Full(_)) = w.try_send(msg.clone()) {
                    self.events_dropped += 1;
                }
            }
        }
    }

    async fn add_candidate(&mut self, candidate: RTCIceCandidateInit) -> Result<(), LinkError> {
        self.uplink.add_candidate(candidate).await.map_err(|e| LinkError::Write(e.to_string()))
    }

    fn restart_ice(
        &mut self,
        restart: crate::peer::IceRestart,
    ) -> futures::future::BoxFuture<'static, Result<String, LinkError>> {
        let restarting = self.uplink.restart_ice(restart);
        Box::pin(async move { restarting.await.map_err(|e| LinkError::Write(e.to_string())) })
    }

    async fn loss_fraction(&mut self) -> Option<f64> {
        // What the listeners lose: the worst player's report.
        let mut worst: Option<f64> = None;
        for p in &self.players {
            if let Some(l) = p.peer.remote_fraction_lost().await {
                worst = Some(worst.map_or(l, |w| w.max(l)));
            }
        }
        worst
    }

    fn stats(&self) -> LinkStats {
        let c = self.uplink.counters();
        let player_drops: u64 =
            self.players.iter().map(|p| p.peer.counters().messages_dropped.load(Ordering::Relaxed)).sum();
        LinkStats {
            audio_in: c.rtp_in.load(Ordering::Relaxed),
            audio_dropped: c.rtp_dropped.load(Ordering::Relaxed),
            messages_dropped: player_drops,
            events_dropped: self.events_dropped,
            audio_out_dropped: self
                .players
                .iter()
                .map(|p| p.peer.counters().rtp_out_dropped.load(Ordering::Relaxed))
                .sum(),
        }
    }

    async fn close(&mut self, grace: Duration) {
        // Let the last events (session.ended) reach the players, bounded, then close everything.
        let steps = (grace.as_millis() / 10).max(1);
        for _ in 0..steps {
            let mut pending = false;
            for dc in self.players.iter().filter_map(|p| p.dc.as_ref()) {
                pending |= dc.outstanding_bytes().await > 0;
            }
            if !pending {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.watchers.clear();
        for p in self.players.drain(..) {
            if let Some(dc) = p.dc {
                dc.close().await;
            }
            p.peer.close().await;
        }
        self.uplink.close().await;
    }
}

/// A started WHIP session ([`SessionManager::whip_publish`]).
pub struct WhipStarted {
    /// The new session's id.
    pub session_id: String,
    /// The SDP answer for the publisher.
    pub answer: String,
    /// The publisher's peer id (for trickle and ICE restart through the manager).
    pub peer_id: String,
    /// The publisher's ETag (`"..."`).
    pub etag: String,
    /// Where WHEP players are handed to the running link.
    pub players: mpsc::Sender<PlayerCmd>,
}

impl SessionManager {
    /// Create a session for a WHIP publisher and make it live on its send-only `offer`
    /// (validated by `signaling::whip::validate_whip_offer`). A failure after creation ends the
    /// session (a publisher retries with a new POST). Errors: as for `POST /v1/sessions` and
    /// the offer ([`SessionError`]).
    pub async fn whip_publish(
        &self,
        options: CreateOptions,
        offer: signaling::sdp::ValidOffer,
    ) -> Result<WhipStarted, SessionError> {
        let shared = self.create(options).await?;
        shared.lock().phase = SessionState::Connecting;
        match self.whip_live(&shared, &offer).await {
            Ok(started) => Ok(started),
            Err(e) => {
                shared.end(match e {
                    SessionError::BadOffer(_) | SessionError::OfferRefused(_) => EndReason::NeverConnected,
                    _ => EndReason::InternalError,
                });
                Err(e)
            }
        }
    }

    async fn whip_live(
        &self,
        shared: &Arc<SessionShared>,
        offer: &signaling::sdp::ValidOffer,
    ) -> Result<WhipStarted, SessionError> {
        let catalog = self.characters();
        let character = catalog
            .iter()
            .find(|c| c.id == shared.character)
            .ok_or_else(|| SessionError::UnknownCharacter(shared.character.clone()))?;
        let (players, players_rx) = mpsc::channel(MAX_PLAYERS * 2);
        let bundled = signaling::whip::with_lone_bundle(offer);
        let stack_offer = bundled.as_ref().unwrap_or(offer);
        let (task, answer, control) = self.builder.whip(shared, character, stack_offer, players_rx).await?;
        let answer = signaling::whip::one_way_answer(
            &answer,
            offer.audio_mid(),
            signaling::whip::WhipRole::Publish,
            bundled.is_some(),
        );
        let (peer_id, etag) = super::go_live(shared, task, control)?;
        Ok(WhipStarted { session_id: shared.id.clone(), answer, peer_id, etag, players })
    }

    /// Answer a WHEP player's receive-only `offer` for the live WHIP session whose link listens
    /// on `players`: returns the answer and the player's id. Errors: [`SessionError::Ended`]
    /// when the session has ended, the offer errors of [`Self::offer`].
    pub async fn whep_player(
        &self,
        players: &mpsc::Sender<PlayerCmd>,
        offer: &signaling::sdp::ValidOffer,
    ) -> Result<(String, String), SessionError> {
        if players.is_closed() {
            return Err(SessionError::Ended);
        }
        let (tx, events) = mpsc::channel(PLAYER_CHANNEL_CAPACITY);
        let bundled = signaling::whip::with_lone_bundle(offer);
        let (peer, answer) = self.builder.player(bundled.as_ref().unwrap_or(offer), tx).await?;
        let answer = signaling::whip::one_way_answer(
            &answer,
            offer.audio_mid(),
            signaling::whip::WhipRole::Play,
            bundled.is_some(),
        );
        let id = signaling::id::new_peer_id();
        if let Err(mpsc::error::SendError(PlayerCmd::Attach { peer, .. })) =
            players.send(PlayerCmd::Attach { id: id.clone(), peer, events }).await
        {
            peer.close().await;
            return Err(SessionError::Ended);
        }
        Ok((answer, id))
    }
}
