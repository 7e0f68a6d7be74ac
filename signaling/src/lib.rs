//! # signaling: kotodama's client-facing surface
//!
//! Everything a client (browser, mobile WebRTC SDK, test peer) touches before and around the
//! media: the HTTP API v1, session tokens, SDP checks, ICE server lists and the data-channel
//! event schema. It knows nothing about media, WebRTC stacks or model providers: where it
//! needs "whoever hosts sessions" it calls the [`SessionHost`] trait, which the `kotodama`
//! crate (`src/`) implements. Dependency direction: `kotodama -> signaling`, never back, and
//! never `signaling -> media`.
//!
//! ## One session, from the client's side
//!
//! 1. `POST /v1/sessions` (API key when configured) -> the host creates the session
//!    ([`SessionHost::create_session`]); the router issues a session token ([`token`]) and
//!    answers `201 {session_id, token, expires_at, ice_servers, offer_url}`.
//! 2. `POST {offer_url}` with `application/sdp` and `Authorization: Bearer <token>` -> the
//!    router checks the token (strict expiry), size (64 KiB), and the offer ([`sdp`]: one
//!    sendrecv Opus audio m-line, an SCTP data channel, a DTLS fingerprint), then hands a
//!    [`sdp::ValidOffer`] to [`SessionHost::offer`] -> `201` + SDP answer + `Location` of the
//!    peer + `ETag`.
//! 3. Optional `PATCH {Location}` (`application/trickle-ice-sdpfrag`, `If-Match`) to trickle
//!    candidates or restart ICE ([`SessionHost::trickle`]).
//! 4. The data channel `events` carries [`events::ServerEvent`]s and [`events::ClientEvent`]s
//!    as JSON; parse client messages with [`events::parse_client_message`].
//! 5. `DELETE {Location}` or `DELETE /v1/sessions/{id}` ends it; `GET /v1/sessions/{id}` and
//!    `.../transcript` report on it (token accepted up to an hour past expiry, see [`token`]).
//!
//! ## Modules
//!
//! * [`api`]: the axum router ([`router`]), its state ([`ApiState`]) and limits.
//! * [`host`]: the [`SessionHost`] trait and the types it exchanges with the router.
//! * [`events`]: every data-channel message, with the emotion set and the 15 visemes.
//! * [`token`]: session JWTs ([`TokenIssuer`]): HS256, RS256 or EdDSA with `kid` rotation,
//!   the algorithm pinned per key, redacted in `Debug`.
//! * [`short_term`]: used token ids, idempotency records, rate-limit counters
//!   ([`ShortTermStore`]; in process or, from `src/`, on Redis).
//! * [`sdp`]: offer validation and RFC 8840 trickle fragments.
//! * [`problem`]: RFC 9457 problem+json and [`ApiError`], one variant per status.
//! * [`ice`]: [`IceServer`] as clients receive it.
//! * [`auth`]: API keys held as SHA-256 digests with roles (user, admin), bearer parsing.
//! * [`id`]: 128-bit CSPRNG ids for sessions, peers, ETags and token ids.
//!
//! ## Visemes
//!
//! `viseme` events name one of the 15 Oculus/Meta Lipsync visemes, exactly as spelled here:
//! `sil`, `PP`, `FF`, `TH`, `DD`, `kk`, `CH`, `SS`, `nn`, `RR`, `aa`, `E`, `ih`, `oh`, `ou`
//! (see [`events::Viseme`] for the sounds each stands for). `start_ms`/`duration_ms` are
//! relative to the start of that agent item's audio.
//!
//! ## Emotions
//!
//! `emotion` events carry `neutral`, `happy`, `sad`, `angry`, `surprised`, `fearful`,
//! `disgusted`, `thinking` or `relaxed`; the set is open and other names are passed through
//! verbatim ([`events::Emotion::Other`]); clients render names they do not know as `neutral`.
//!
//! ## Invariants
//!
//! * Every HTTP error is problem+json with the contract's status; 500s never carry their cause.
//! * Tokens, API keys, TURN credentials and the token secret never reach logs or `Debug`.
//! * Input never panics the server: bodies are size-limited before parsing, parsers return
//!   typed errors ([`events::EventError`], [`sdp::SdpError`], [`token::TokenError`]).

pub mod answer;
pub mod api;
pub mod auth;
pub mod codegen;
pub mod events;
pub mod host;
pub mod ice;
pub mod id;
pub mod identity;
pub mod problem;
pub mod sdp;
pub mod short_term;
pub mod token;
pub mod token_keys;
pub mod turn;
pub mod whip;

pub use api::{ApiState, Limits, router, routes};
pub use auth::{ApiKeyIdentity, ApiKeys, KeyRole};
pub use events::{ClientEvent, EventError, ServerEvent, parse_client_message};
pub use host::{
    CharacterInfo, CreateSessionRequest, CreatedSession, ETag, EndReason, IfMatch, OfferAnswer, SessionHost,
    SessionInfo, SessionState, TranscriptEntry, TrickleOutcome, TrickleRequest, UserScope,
};
pub use ice::IceServer;
pub use id::new_id;
pub use identity::{Caller, EndUser, EndUserVerifier};
pub use problem::{ApiError, Problem};
pub use sdp::{SdpError, SdpFrag, ValidOffer};
pub use short_term::{MemoryShortTerm, ShortTermError, ShortTermStore};
pub use token::{IssuedToken, KeyMaterial, TokenError, TokenIssuer, TokenKey, TokenKeys, VerifyMode};
