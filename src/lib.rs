//! kotodama: a WebRTC media server that gives AI characters a voice.
//!
//! A client opens a session over HTTP (`signaling`), sends its microphone as Opus over WebRTC
//! ([`peer`]), and the session task ([`session`]) runs the audio pipeline (`media`: decode, VAD,
//! resample; resample, encode, paced playout) between the peer and a realtime model session
//! ([`providers`]). Events (transcripts, state, emotions, interruptions) go to the client on the
//! `events` data channel.
//!
//! What outlives a session task lives in [`store`]: sessions and transcripts in SQLite or
//! Postgres (written by one writer task per node, off the audio path, through an fsync'd local
//! journal that outlives database outages and crashes: [`store::journal`]), and, with Redis, the
//! cluster's short-term state (session registry, used token ids, idempotency, rate limits,
//! recent turns, cross-node control).
//!
//! A live session is layered (see [`session`]): a sans-IO conversation core
//! ([`session::conversation`]) makes every decision and owns the conversation history; a thin
//! task does the IO between a client link and the provider session. The seam is two traits:
//!
//! ```ignore
//! pub trait ClientLink: Send {   // "a connected client": a transport
//!     async fn recv(&mut self) -> Option<LinkEvent>;   // audio (Opus / PCM), events, open/close
//!     async fn send_audio(&mut self, frame: &AudioFrame<'_>) -> Result<(), LinkError>;
//!     async fn send_event(&mut self, ev: &ServerEvent); // spelled by the link's EventCodec
//!     /* ICE candidates and restart, loss, stats, close */
//! }
//! pub trait EventCodec: Send {   // a client dialect
//!     fn encode(&mut self, ev: &ServerEvent, out: &mut Vec<String>);
//!     fn decode(&mut self, msg: &[u8]) -> Result<Option<ClientEvent>, EventError>;
//! }
//! ```
//!
//! Transports ([`session::link::ClientLink`]): WebRTC ([`session::webrtc_link`]), WebSocket
//! ([`session::ws_link`], also for N.E.K.O.'s `/ws/{character}`) and WHIP/WHEP
//! ([`session::whip_link`], [`whip`]). Dialects ([`session::link::EventCodec`]): api-v1, N.E.K.O.
//! ([`session::neko`]), oai-events ([`session::oai_events`], OpenAI's Agents SDK through
//! [`realtime_calls`]) and RTVI ([`session::rtvi`], Pipecat's client through [`pipecat`]). A new
//! transport or dialect is a new module behind that seam; neither the core nor the task changes.
//! [`cluster`] owns the multi-node parts (registry, 307 redirect, control bus).
//!
//! [`server::start`] wires it together; `main.rs` only parses the command line.

pub mod admin;
pub mod agent_results;
pub mod cluster;
pub mod config;
pub mod http;
pub mod http_server;
pub mod image;
pub mod memory;
pub mod moderation;
pub mod oidc;
pub mod otlp;
pub mod peer;
pub mod peer_loop;
pub mod pipecat;
pub mod plain_udp;
pub mod providers;
pub mod realtime_calls;
pub mod recording;
pub mod replay;
pub mod server;
pub mod session;
pub mod ssrc_demux;
pub mod store;
pub mod telemetry;
pub mod translation;
pub mod turn_settings;
pub mod udp_mux;
pub mod web_demo;
pub mod whip;
pub mod ws;
