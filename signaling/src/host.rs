//! The seam between the HTTP API and whoever hosts sessions (`src/` implements it).
//!
//! The router does everything that is about HTTP: authentication, content types, body limits,
//! SDP and sdpfrag validation, token issue, ids, status codes and headers. The host does
//! everything that is about sessions: creating them, answering offers, adding candidates,
//! ending them and reporting on them. It answers with [`ApiError`] where the outcome is an HTTP
//! error the contract names (404 unknown session or peer, 409, 412, 422, 503...).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::events::Role;
use crate::ice::IceServer;
use crate::id::new_id;
use crate::problem::ApiError;
use crate::sdp::{SdpFrag, ValidOffer};

/// Whoever hosts sessions. Object safe (`Arc<dyn SessionHost>`).
#[async_trait]
pub trait SessionHost: Send + Sync + 'static {
    /// Whether new sessions are accepted now; false while draining or not yet ready
    /// (`/readyz` is 503 and `POST /v1/sessions` is 503 + `Retry-After`). Must be cheap.
    fn accepting(&self) -> bool;

    /// Extra members of the `/readyz` body (200 and 503 alike), e.g. the store's state:
    /// `{"store":"unavailable","queued":12,"journal_bytes":3456}`. Must be cheap. Default: none.
    fn readiness(&self) -> serde_json::Map<String, serde_json::Value> {
        serde_json::Map::new()
    }

    /// The characters clients may pick (`GET /v1/characters`).
    async fn characters(&self) -> Vec<CharacterInfo>;

    /// Where a valid `POST /v1/sessions` should be served, asked before its idempotency record
    /// and rate limit (a redirected request counts once, on the node that creates): `Ok` here,
    /// [`ApiError::Elsewhere`] (307 to the same route on that node) when a cluster places new
    /// sessions on a less loaded node. Default: here.
    async fn place_new_session(&self) -> Result<(), ApiError> {
        Ok(())
    }

    /// Create a session (`POST /v1/sessions`). The host picks the id with
    /// [`crate::id::new_session_id`] (CSPRNG, URL safe) and the ICE servers for this client.
    /// Errors: [`ApiError::unknown_character`] (404), unknown provider (404 or 422),
    /// [`ApiError::unavailable`] (503) when it cannot take more sessions.
    async fn create_session(&self, request: CreateSessionRequest) -> Result<CreatedSession, ApiError>;

    /// Answer a validated offer (`POST /v1/sessions/{id}/offer`). The answer carries all of the
    /// server's ICE candidates. Errors: [`ApiError::unknown_session`] (404), 409 when the
    /// session already has a peer or has ended.
    async fn offer(&self, session_id: &str, offer: ValidOffer) -> Result<OfferAnswer, ApiError>;

    /// Trickle ICE or ICE restart on a peer (`PATCH .../peers/{peer_id}`). For
    /// [`TrickleRequest::Candidates`] the host compares `if_match` with the peer's current ETag
    /// ([`ApiError::stale_etag`], 412). For [`TrickleRequest::IceRestart`] it may answer
    /// [`ApiError::ice_restart_unsupported`] (422). Errors: 404 unknown session or peer.
    async fn trickle(
        &self,
        session_id: &str,
        peer_id: &str,
        request: TrickleRequest,
    ) -> Result<TrickleOutcome, ApiError>;

    /// End the session (`DELETE /v1/sessions/{id}`, or `.../peers/{peer_id}` with `peer_id`):
    /// media stops, the provider is closed. Errors: 404 unknown session or peer, and
    /// [`ApiError::session_already_ended`] (404) when it has already ended.
    async fn end(&self, session_id: &str, peer_id: Option<&str>) -> Result<(), ApiError>;

    /// Report on a session, live or ended (`GET /v1/sessions/{id}`). Errors: 404.
    async fn session(&self, session_id: &str) -> Result<SessionInfo, ApiError>;

    /// The session's transcript so far, in `seq` order (`GET .../transcript`). Errors: 404.
    async fn transcript(&self, session_id: &str) -> Result<Vec<TranscriptEntry>, ApiError>;

    /// Hand a user text turn to a live session (`POST /v1/sessions/{id}/messages`): a tool
    /// result, an operator note. The host may deliver it to another node. Default: 422.
    async fn inject(&self, session_id: &str, text: String) -> Result<(), ApiError> {
        let _ = (session_id, text);
        Err(ApiError::unprocessable("inject_unsupported", "this server cannot inject messages"))
    }

    /// Everything held for `user_id` within `scope` (`GET /v1/users/{user_id}/data`), as JSON.
    /// Default: 404 (a host without durable user data).
    async fn export_user(&self, user_id: &str, scope: UserScope) -> Result<serde_json::Value, ApiError> {
        let _ = (user_id, scope);
        Err(ApiError::not_found("no_user_data", "no data for this user"))
    }

    /// Hard-delete everything held for `user_id` within `scope`, ending its live sessions first
    /// (`DELETE /v1/users/{user_id}/data`); answers what was deleted. Default: 404.
    async fn delete_user(&self, user_id: &str, scope: UserScope) -> Result<serde_json::Value, ApiError> {
        let _ = (user_id, scope);
        Err(ApiError::not_found("no_user_data", "no data for this user"))
    }
}

/// Whose data a privacy request may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum UserScope {
    /// Everything (an admin key).
    All,
    /// Only sessions created with this API key (its short id).
    CreatedBy(String),
}

/// A character in `GET /v1/characters`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CharacterInfo {
    /// Id used in `POST /v1/sessions` `character`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// BCP 47 language tag, e.g. `en-US`.
    pub language: String,
    /// Voice name (provider specific).
    pub voice: String,
    /// Any further fields (description, avatar...), flattened into the object.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// Body of `POST /v1/sessions`; an empty body is the default (server's default character and
/// provider). Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSessionRequest {
    /// Character id; `None` = the default character.
    #[serde(default)]
    pub character: Option<String>,
    /// Provider name; `None` = the configured provider.
    #[serde(default)]
    pub provider: Option<String>,
    /// The application's id for the end user (extension): what privacy export and delete
    /// (`/v1/users/{user_id}`) find. 1..=128 visible ASCII characters.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Record this session (extension): audio and events kept for replay and admin export;
    /// `None` = as the server is configured. Announced in `session.ready` (`recording: true`).
    #[serde(default)]
    pub record: Option<bool>,
    /// Short id of the API key that authenticated the request (set by the router, never read
    /// from the body); `None` when the API is open.
    #[serde(skip)]
    pub api_key_id: Option<String>,
}

/// What the host made for `POST /v1/sessions`; the router adds the token and URLs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedSession {
    /// The new session's id (URL safe; see [`crate::id::is_valid_id`]).
    pub session_id: String,
    /// ICE servers for this client.
    pub ice_servers: Vec<IceServer>,
}

/// The answer to an offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferAnswer {
    /// SDP answer (audio sendrecv), with all server candidates.
    pub sdp: String,
    /// Id of the new peer (URL safe), used in its `Location`.
    pub peer_id: String,
    /// The peer's current ETag.
    pub etag: ETag,
}

/// A strong entity tag for a peer's ICE state (WHIP). Holds the opaque part; the header value
/// is it in double quotes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ETag(String);

impl ETag {
    /// A fresh random tag.
    pub fn generate() -> Self {
        ETag(new_id(""))
    }

    /// A tag from its opaque part; `None` unless 1..=128 visible ASCII characters without `"`
    /// (RFC 9110 `etagc`, restricted to ASCII).
    pub fn new(opaque: impl Into<String>) -> Option<Self> {
        let opaque = opaque.into();
        let ok = !opaque.is_empty()
            && opaque.len() <= 128
            && opaque.bytes().all(|b| b == 0x21 || (0x23..=0x7e).contains(&b));
        ok.then_some(ETag(opaque))
    }

    /// The opaque part, without quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The `ETag` header value: `"<opaque>"`.
    pub fn header_value(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

/// A parsed `If-Match` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `If-Match: *`.
    Any,
    /// The strong entity tags listed (opaque parts, without quotes). Weak tags (`W/"..."`)
    /// never match under the strong comparison If-Match uses, so they are dropped.
    Tags(Vec<String>),
}

impl IfMatch {
    /// Parse a header value; bare tokens without quotes are accepted as opaque tags.
    pub fn parse(value: &str) -> IfMatch {
        let value = value.trim();
        if value == "*" {
            return IfMatch::Any;
        }
        let tags = value
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty() && !t.starts_with("W/"))
            .map(|t| t.strip_prefix('"').and_then(|t| t.strip_suffix('"')).unwrap_or(t).to_owned())
            .collect();
        IfMatch::Tags(tags)
    }

    /// Whether this precondition holds for a peer whose current tag is `current`.
    pub fn matches(&self, current: &ETag) -> bool {
        match self {
            IfMatch::Any => true,
            IfMatch::Tags(tags) => tags.iter().any(|t| t == current.as_str()),
        }
    }
}

/// What a PATCH asks of a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrickleRequest {
    /// Add the client's candidates to the current ICE session. The host must check `if_match`
    /// against the peer's ETag and answer 412 when it does not match.
    Candidates {
        /// The request's `If-Match`.
        if_match: IfMatch,
        /// The fragment (candidates, maybe end-of-candidates).
        frag: SdpFrag,
    },
    /// `If-Match: *` with a new ufrag/pwd: restart ICE (RFC 9725 §4.3.2).
    IceRestart {
        /// The client's new credentials and candidates.
        frag: SdpFrag,
    },
}

/// What the host did with a PATCH.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrickleOutcome {
    /// Candidates added: 204.
    Added,
    /// ICE restarted: 200 with the server's sdpfrag and the peer's new ETag.
    Restarted {
        /// The server's new ICE credentials and candidates (`application/trickle-ice-sdpfrag`).
        sdpfrag: String,
        /// The peer's new ETag.
        etag: ETag,
    },
}

/// Lifecycle of a session, as reported by `GET /v1/sessions/{id}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum SessionState {
    /// Created, waiting for the offer.
    Created,
    /// Offer answered, ICE/DTLS in progress.
    Connecting,
    /// Media and data channel up.
    Connected,
    /// Over; see `end_reason`.
    Ended,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EndReason {
    /// The client sent DELETE.
    ClientRequest,
    /// The client never sent an offer before its token expired.
    NeverConnected,
    /// ICE/DTLS failed or the peer went away.
    PeerDisconnected,
    /// No activity for too long.
    IdleTimeout,
    /// Reached the maximum session duration.
    MaxDuration,
    /// The model provider failed.
    ProviderError,
    /// The server shut down.
    ServerShutdown,
    /// A server bug or unexpected failure.
    InternalError,
    /// The node hosting it stopped without draining (crash, `kill -9`); found at its restart.
    Crash,
    /// It reached a budget (tokens, minutes or tool calls) configured to end the session.
    BudgetExceeded,
    /// The node hosting it stopped renewing its cluster heartbeat (it died or lost Redis for
    /// longer than `cluster.heartbeat_expiry_ms`); another node ended it, at the dead node's
    /// last heartbeat.
    NodeLost,
}

/// A string that names no variant of an API enum (a stored value from a newer version, a typo).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {kind} `{value}`")]
pub struct UnknownName {
    /// Which enum (`session state`, `end reason`).
    pub kind: &'static str,
    /// The string that was given.
    pub value: String,
}

/// `as_str` / `FromStr` of a unit enum from one table of (variant, wire name), so the two can
/// never disagree with each other (the serde names are checked against them in the tests).
macro_rules! wire_names {
    ($ty:ident, $kind:literal, { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl $ty {
            /// Every variant, in declaration order.
            pub const ALL: &'static [$ty] = &[$($ty::$variant),+];

            /// The wire name (as in the JSON of the API, the store and `session.ended`).
            pub fn as_str(self) -> &'static str {
                match self {
                    $($ty::$variant => $name),+
                }
            }
        }

        impl std::str::FromStr for $ty {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($name => Ok($ty::$variant),)+
                    other => Err(UnknownName { kind: $kind, value: other.to_owned() }),
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

wire_names!(SessionState, "session state", {
    Created => "created",
    Connecting => "connecting",
    Connected => "connected",
    Ended => "ended",
});

wire_names!(EndReason, "end reason", {
    ClientRequest => "client_request",
    NeverConnected => "never_connected",
    PeerDisconnected => "peer_disconnected",
    IdleTimeout => "idle_timeout",
    MaxDuration => "max_duration",
    ProviderError => "provider_error",
    ServerShutdown => "server_shutdown",
    InternalError => "internal_error",
    Crash => "crash",
    BudgetExceeded => "budget_exceeded",
    NodeLost => "node_lost",
});

/// `GET /v1/sessions/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Session id.
    pub session_id: String,
    /// Lifecycle state.
    pub state: SessionState,
    /// Character id.
    pub character: String,
    /// Provider name.
    pub provider: String,
    /// Creation time (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// End time (RFC 3339), when ended.
    #[serde(default, with = "time::serde::rfc3339::option", skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<OffsetDateTime>,
    /// Why it ended, when ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<EndReason>,
}

/// One entry of `GET /v1/sessions/{id}/transcript`: a final utterance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptEntry {
    /// Position in the conversation, from 0, strictly increasing.
    pub seq: u64,
    /// Who spoke.
    pub role: Role,
    /// What was said (for an interrupted agent item, what was heard).
    pub text: String,
    /// The agent was cut off by barge-in.
    pub interrupted: bool,
    /// When the utterance ended (RFC 3339).
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_enum_names_are_their_serde_names_both_ways() {
        for s in SessionState::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
            assert_eq!(s.as_str().parse::<SessionState>().unwrap(), *s);
        }
        for r in EndReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
            assert_eq!(r.as_str().parse::<EndReason>().unwrap(), *r);
        }
        let e = "exploded".parse::<EndReason>().unwrap_err();
        assert_eq!(e.to_string(), "unknown end reason `exploded`");
    }

    #[test]
    fn if_match_parsing() {
        assert_eq!(IfMatch::parse("*"), IfMatch::Any);
        assert_eq!(IfMatch::parse(" \"abc\" "), IfMatch::Tags(vec!["abc".into()]));
        assert_eq!(IfMatch::parse("\"a\", W/\"b\", c"), IfMatch::Tags(vec!["a".into(), "c".into()]));
        let tag = ETag::new("a").expect("valid tag");
        assert!(IfMatch::parse("\"x\", \"a\"").matches(&tag));
        assert!(!IfMatch::parse("W/\"a\"").matches(&tag), "weak tags never match");
        assert!(IfMatch::Any.matches(&tag));
    }

    #[test]
    fn etag_rejects_quotes_and_controls() {
        assert!(ETag::new("ok-tag_1").is_some());
        for bad in ["", "a\"b", "a b", "é", "a\n"] {
            assert!(ETag::new(bad).is_none(), "{bad:?}");
        }
        let g = ETag::generate();
        assert_eq!(g.header_value(), format!("\"{}\"", g.as_str()));
        assert!(ETag::new(g.as_str()).is_some(), "generated tags are valid");
    }
}
