//! kotodama: a WebRTC media server that gives AI characters a voice.
//!
//! A client opens a session over HTTP (`signaling`), sends its microphone as Opus over WebRTC
//! ([`peer`]), and the session task ([`session`]) runs the audio pipeline (`media`: decode, VAD,
//! resample; resample, encode, paced playout) between the peer and a realtime model session
//! ([`providers`]). Events (transcripts, state, emotions, interruptions) go to the client on the
//! `events` data channel.
//!
//! [`server::Server`] wires it together; `main.rs` only parses the command line.

pub mod config;
pub mod http;
pub mod peer;
pub mod providers;
pub mod server;
pub mod session;
pub mod store;
