//! The `nova_sonic` provider: Amazon Nova 2 Sonic through Bedrock's
//! `InvokeModelWithBidirectionalStream`, with the AWS SDK for Rust doing the SigV4 signing (the
//! request and every event), the event-stream framing and the HTTP/2 stream.
//!
//! [`RealtimeProvider::connect`] loads the SDK configuration once (region, the standard
//! credential chain: environment, profile, web identity, container and instance roles;
//! `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`), resolves the credentials to learn when they expire,
//! queues the opening events ([`protocol`]: `sessionStart`, `promptStart`, the system prompt,
//! the history, the one USER AUDIO block) and opens the stream; one task per provider session
//! ([`session::Connection`]) then owns both directions.
//!
//! What it maps (Nova 2 Sonic user guide, seed 002):
//! - the model detects turns itself (`endpointingSensitivity`), so [`ProviderCommand::CommitTurn`]
//!   is not needed; barge-in is the model's: a `{ "interrupted" : true }` text or a
//!   `stopReason: INTERRUPTED` -> [`ProviderEvent::UserSpeechStarted`] (the session clears
//!   playout and keeps what was heard); Nova cannot truncate its context.
//! - ASSISTANT text comes twice: SPECULATIVE (planned) and FINAL (spoken); only FINAL text
//!   becomes the transcript. USER text blocks are the user's transcript.
//! - tools: `toolUse` -> the character's registry -> a TOOL result block; the model goes on.
//! - typed text and `generate_reply` are interactive USER text; one that gets no answer within
//!   `nova_sonic.reply_timeout_ms` (10 s) ends with an `error` event `reply_timeout`.
//! - the stream lives at most [`settings::NovaSonicSettings::lifetime`]: the shorter of the
//!   ~8 min limit and the credentials' expiry minus 180 s, never under 10 s. That is declared as
//!   `max_session` when the session opens, so the resilient wrapper renews it at a turn boundary
//!   with the heard history; every stream resolves credentials from the chain afresh and is signed
//!   with them.
//! - closing sends the audio `contentEnd`, `promptEnd` and `sessionEnd` in order and waits up
//!   to 2 s for `completionEnd`.
//!
//! The fake in tests/ plugs in as the SDK's HTTP client, so tests run this exact code path.

pub mod protocol;
#[cfg(feature = "nova-sonic")]
mod provider;
#[cfg(feature = "nova-sonic")]
pub mod session;
pub mod settings;

#[cfg(feature = "nova-sonic")]
pub use self::provider::NovaSonicProvider;
pub use self::settings::{NOVA_VOICES, NovaSonicSettings};
