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
//! ([`session::conversation`]) makes every decision; a thin task does the IO between a client
//! link ([`session::link::ClientLink`]: a transport, today the WebRTC peer, plus an event codec per
//! client dialect, today api-v1) and the provider session. A new transport or dialect is a new
//! module behind that seam. [`cluster`] owns the multi-node parts (registry, 307 redirect, control
//! bus).
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
pub mod pipecat;
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
