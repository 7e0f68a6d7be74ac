//! The client-link seam: "a connected client", whatever carries it.
//!
//! The session task drives one [`ClientLink`]: it receives [`LinkEvent`]s (the client's audio,
//! its decoded events, the link's state) and sends the character's paced audio frames and the
//! server's events. How the bytes travel (WebRTC RTP + a data channel, a WebSocket with PCM16
//! frames) is the link's business; how events are spelled on the wire (api-v1, RTVI, oai-events,
//! N.E.K.O.) is its [`EventCodec`]'s. The conversation core ([`super::conversation`]) sees neither.
//!
//! Implementations: [`super::webrtc_link::WebRtcLink`] (the `Peer` of `crate::peer`, the `events`
//! data channel, api-v1 JSON through [`ApiV1`]) and [`super::ws_link::WsLink`] (a WebSocket: api-v1
//! through [`ApiV1`], or N.E.K.O. through [`super::neko::NekoCodec`]). A new transport or dialect
//! is a new file implementing one of these traits; the core and the task do not change.
//!
//! The WebSocket link added [`LinkEvent::Voice`] (a client's own VAD edges and end of turn, fed to
//! the core as `Input::ClientVoice`) and [`LinkStats::audio_out_dropped`] (a client too slow for
//! its audio).
//!
//! What the design leaves room for (issues 15, 16):
//! - **PCM over WebSocket** at 16, 24 or 48 kHz: today [`super::ws_link`] transcodes in the link
//!   (PCM -> Opus in, Opus -> PCM out); [`ClientAudio`] could grow a `Pcm` variant (the uplink
//!   taking PCM after its decoder) and the playout be built for the link's output format, saving
//!   one encode and one decode per 20 ms.
//! - **Played progress reported by the client** (a WebSocket client plays from its own buffer, so
//!   the server cannot know what was heard): done as [`LinkEvent::Playback`] ->
//!   `conversation::Input::ClientPlayback`; the core cuts `played` there (the heard text still
//!   follows the frames sent).
//! - **Dialects with their own ids** (item ids, response ids, event ids): an [`EventCodec`] is
//!   stateful (`&mut self`) and may write zero or several wire messages for one [`ServerEvent`], so
//!   it can number events, open and close responses and map our item ids to its own.
//! - **Handshakes** such as RTVI's `client-ready` / `bot-ready`: the codec decodes the client's
//!   message as [`ClientEvent`]s or nothing, and writes `bot-ready` for `session.ready`. Noise a
//!   dialect ignores (RTVI's raw `ping: <ms>` strings) decodes to `Ok(None)`; a dialect that ends
//!   the session on malformed input (N.E.K.O.) has its link return [`LinkEvent::Closed`] instead of
//!   [`LinkEvent::BadMessage`].
//! - **Replies named on the wire**: every [`AudioFrame`] carries its agent `item_id`, so a link
//!   can tag audio (N.E.K.O. `audio_chunk {speech_id}`, oai-events `output_audio_buffer.*`).
//! - **Client-side VAD and an explicit end of turn** (seed 004's `vad` / `control.end_turn`): done
//!   as [`LinkEvent::Voice`] -> `conversation::Input::ClientVoice` (a turn is committed once).
//! - **Other data-channel labels** (`oai-events`, RTVI's `chat`): the WebRTC link is built with
//!   the codec of the label the client opened.

use std::future::Future;

use futures::future::BoxFuture;
use std::time::{Duration, Instant};

use signaling::events::{ClientEvent, EventError, ServerEvent};

use super::EndReason;
use super::conversation::AudioFrame;

/// Audio from the client's microphone.
#[derive(Debug)]
#[non_exhaustive]
pub enum ClientAudio {
    /// One Opus packet (RTP sequence number; 48 kHz clock).
    Opus {
        /// RTP sequence number (the uplink reorders and conceals gaps).
        seq: u16,
        /// RTP timestamp (48 kHz): a gap (DTX, a paused sender) is elapsed media time.
        timestamp: u32,
        /// RTP payload type: only the negotiated Opus type is decoded (not telephone-event).
        payload_type: u8,
        /// RTP SSRC: a new one starts a new stream in the uplink.
        ssrc: u32,
        /// The Opus payload.
        payload: bytes::Bytes,
    },
}

/// Voice activity the client detected itself, or its explicit end of turn (seed 004's `vad`
/// events and `control.end_turn`), for clients that run their own VAD or push-to-talk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientVoice {
    /// The user started speaking (barges in like our VAD's speech start).
    SpeechStarted,
    /// The user stopped speaking: the turn ends now (without waiting for our VAD's silence).
    SpeechStopped,
    /// End the user's turn now (push-to-talk released).
    EndTurn,
}

/// What a link reports to its session task.
#[derive(Debug)]
#[non_exhaustive]
pub enum LinkEvent {
    /// Client audio, and when it arrived (uplink latency).
    Audio {
        /// When the link received it.
        arrival: Instant,
        /// The audio.
        audio: ClientAudio,
    },
    /// The event channel is open: events sent from now on reach the client.
    EventsOpen,
    /// The event channel closed (the link may still carry audio).
    EventsClosed,
    /// A client event, decoded by the link's codec (`None`: a well-formed message of a type the
    /// server does not act on).
    Event(Option<ClientEvent>),
    /// A client message the codec rejected; the session answers with an `error` event.
    BadMessage(EventError),
    /// The client's own voice activity or end of turn.
    Voice(ClientVoice),
    /// The client's playback progress of an agent item (a WebSocket client playing from its own
    /// buffer reports it): barge-in cuts there (`agent.interrupted.played_ms`, truncation).
    Playback {
        /// The agent item playing.
        item_id: String,
        /// How much of it the client has played.
        played: Duration,
    },
    /// Media is flowing (WebRTC: the peer connection is connected).
    Connected,
    /// The client is gone; the session ends with this reason.
    Closed(EndReason),
}

/// Counters a link keeps (each only grows).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LinkStats {
    /// Client audio packets received.
    pub audio_in: u64,
    /// Client audio packets dropped because the session task was behind.
    pub audio_dropped: u64,
    /// Client messages dropped (session behind, or too large).
    pub messages_dropped: u64,
    /// Server events dropped (no channel, or its buffer full).
    pub events_dropped: u64,
    /// Frames of the character's audio dropped because the client could not take them (a
    /// WebSocket client that does not read; WebRTC leaves this to RTP and congestion control).
    pub audio_out_dropped: u64,
}

/// Why a link operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The transport refused the write.
    #[error("link write failed: {0}")]
    Write(String),
    /// The operation does not exist on this transport (e.g. ICE candidates on a WebSocket).
    #[error("not supported by the {0} link")]
    Unsupported(&'static str),
}

/// A connected client. Methods never block on the client: a full buffer drops and counts.
///
/// Static dispatch (the task is generic over its link), so the 20 ms path boxes nothing.
pub trait ClientLink: Send {
    /// The next thing the client did; `None` once the link is gone for good.
    fn recv(&mut self) -> impl Future<Output = Option<LinkEvent>> + Send;
    /// Send one frame of the character's voice, now (the core paces frames against the clock).
    fn send_audio(&mut self, frame: &AudioFrame<'_>) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// Send a server event (encoded by the link's codec); dropped and counted when it cannot go.
    fn send_event(&mut self, ev: &ServerEvent) -> impl Future<Output = ()> + Send;
    /// A trickled remote ICE candidate (WebRTC only).
    fn add_candidate(
        &mut self,
        candidate: webrtc::peer_connection::RTCIceCandidateInit,
    ) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// Restart ICE with the client's new credentials (WebRTC only; RFC 8445 §9): the returned
    /// future owns what it needs and yields the server's sdpfrag, so the session task runs it on
    /// a task of its own and keeps pacing audio meanwhile. Default: unsupported.
    fn restart_ice(&mut self, _restart: crate::peer::IceRestart) -> BoxFuture<'static, Result<String, LinkError>> {
        Box::pin(std::future::ready(Err(LinkError::Unsupported("this"))))
    }
    /// The share of our audio the client reports lost, 0.0..=1.0 (RTCP; `None` when unknown).
    fn loss_fraction(&mut self) -> impl Future<Output = Option<f64>> + Send;
    /// Counters so far.
    fn stats(&self) -> LinkStats;
    /// Flush what is queued for the client (bounded by `grace`), then close. Idempotent.
    fn close(&mut self, grace: Duration) -> impl Future<Output = ()> + Send;
}

/// How events are spelled on the wire: one codec per client dialect.
pub trait EventCodec: Send {
    /// The dialect's name (`api-v1`, ...), for logs.
    fn name(&self) -> &'static str;
    /// Append the wire message(s) for `ev` to `out` (zero or more).
    fn encode(&mut self, ev: &ServerEvent, out: &mut Vec<String>);
    /// Decode one client message: `Ok(None)` for a well-formed message the server ignores.
    fn decode(&mut self, msg: &[u8]) -> Result<Option<ClientEvent>, EventError>;
    /// Whether the client has greeted as its dialect requires before events flow (RTVI
    /// `client-ready`): until then a link holds [`LinkEvent::EventsOpen`] back, so
    /// `session.ready` and the greeting wait for a client that listens. Default: no handshake.
    fn handshake_done(&self) -> bool {
        true
    }
    /// Move the messages the codec owes the client for what it decoded (a dialect's responses
    /// to requests, e.g. RTVI `server-response`) to `out`; the link sends them at once.
    fn take_replies(&mut self, _out: &mut Vec<String>) {}
    /// Whether a decoded message asked to end the session (RTVI `disconnect-bot`): the link then
    /// reports [`LinkEvent::Closed`] with `EndReason::ClientRequest`.
    fn end_requested(&self) -> bool {
        false
    }
}

/// Today's events (`docs/api-v1.md`): one JSON object per event, `signaling::events` as is.
#[derive(Debug, Default, Clone, Copy)]
pub struct ApiV1;

impl EventCodec for ApiV1 {
    fn name(&self) -> &'static str {
        "api-v1"
    }

    fn encode(&mut self, ev: &ServerEvent, out: &mut Vec<String>) {
        out.push(ev.to_json());
    }

    fn decode(&mut self, msg: &[u8]) -> Result<Option<ClientEvent>, EventError> {
        signaling::events::parse_client_message(msg)
    }
}

/// What the dialect codecs' unit tests share: a codec's wire messages as JSON values.
#[cfg(test)]
pub(crate) mod codec_test_support {
    use serde_json::Value;
    use signaling::events::{Role, ServerEvent};

    use super::EventCodec;

    /// The messages `c` writes for `ev`, parsed.
    pub fn enc(c: &mut impl EventCodec, ev: ServerEvent) -> Vec<Value> {
        let mut out = Vec::new();
        c.encode(&ev, &mut out);
        parsed(&out)
    }

    /// The replies `c` owes the client for what it decoded, parsed.
    pub fn replies(c: &mut impl EventCodec) -> Vec<Value> {
        let mut out = Vec::new();
        c.take_replies(&mut out);
        parsed(&out)
    }

    fn parsed(out: &[String]) -> Vec<Value> {
        out.iter().map(|m| serde_json::from_str(m).unwrap()).collect()
    }

    /// Each message's `type`.
    pub fn types(v: &[Value]) -> Vec<&str> {
        v.iter().map(|e| e["type"].as_str().unwrap()).collect()
    }

    /// The agent's transcript of `item` so far (`is_final`: the whole of it).
    pub fn agent(item: &str, text: &str, is_final: bool) -> ServerEvent {
        ServerEvent::Transcript { role: Role::Agent, item_id: item.into(), text: text.into(), is_final }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_v1_is_the_schema_json_both_ways() {
        let mut codec = ApiV1;
        let mut out = Vec::new();
        codec.encode(&ServerEvent::Pong, &mut out);
        assert_eq!(out, vec![ServerEvent::Pong.to_json()]);
        assert_eq!(codec.decode(br#"{"type":"ping"}"#).unwrap(), Some(ClientEvent::Ping));
        assert_eq!(codec.decode(b"{").unwrap_err().code(), "invalid_json");
    }
}
