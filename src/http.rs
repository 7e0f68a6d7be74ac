//! One axum app: signaling's API v1 router (with this node's [`SessionManager`] as its host),
//! the web demo at `/`, and `/metrics`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use signaling::host::{
    CharacterInfo, CreateSessionRequest, CreatedSession, ETag, IfMatch, OfferAnswer, SessionHost, SessionInfo,
    SessionState, TranscriptEntry, TrickleOutcome, TrickleRequest,
};
use signaling::problem::ApiError;
use signaling::sdp::ValidOffer;
use time::OffsetDateTime;
use webrtc::peer_connection::RTCIceCandidateInit;

use crate::session::{EndReason, Phase, SessionError, SessionManager};

/// Retry-After for 503s.
const RETRY_AFTER: Duration = Duration::from_secs(5);

/// The web demo, embedded so the binary serves it from any working directory.
const INDEX_HTML: &str = include_str!("../web-demo/index.html");
const APP_JS: &str = include_str!("../web-demo/app.js");
const SCHEMA_JS: &str = include_str!("../web-demo/schema.js");
const EVENTS_DTS: &str = include_str!("../web-demo/events.d.ts");

/// [`SessionHost`] for the HTTP layer, backed by the session manager.
pub struct Host {
    manager: Arc<SessionManager>,
    ice_servers: Vec<signaling::ice::IceServer>,
}

impl Host {
    /// A host for `manager`.
    pub fn new(manager: Arc<SessionManager>) -> Self {
        Self { manager, ice_servers: Vec::new() }
    }
}

fn to_api(e: SessionError) -> ApiError {
    match e {
        SessionError::NotFound => ApiError::unknown_session(),
        SessionError::Ended => ApiError::session_already_ended(),
        SessionError::AlreadyConnected => ApiError::already_connected(),
        SessionError::UnknownCharacter(id) => ApiError::unknown_character(&id),
        SessionError::UnknownProvider(p) => {
            ApiError::bad_request("unknown_provider", format!("provider `{p}` is not configured on this server"))
        }
        SessionError::Draining => ApiError::unavailable("server is shutting down; retry on another node", RETRY_AFTER),
        SessionError::AtCapacity => ApiError::unavailable("server is at its session limit", RETRY_AFTER),
        SessionError::BadOffer(m) => {
            ApiError::bad_request("bad_sdp", format!("the WebRTC stack rejected the offer: {m}"))
        }
        SessionError::ProviderUnavailable(m) => {
            ApiError::unavailable(format!("model provider unavailable: {m}"), RETRY_AFTER)
        }
        SessionError::UnknownPeer => ApiError::unknown_peer(),
        SessionError::StaleEtag => ApiError::stale_etag(),
        SessionError::IceRestartUnsupported => ApiError::ice_restart_unsupported(),
        other => ApiError::internal(other),
    }
}

fn to_time(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

#[async_trait]
impl SessionHost for Host {
    fn accepting(&self) -> bool {
        self.manager.accepting()
    }

    async fn characters(&self) -> Vec<CharacterInfo> {
        self.manager
            .characters()
            .iter()
            .map(|c| CharacterInfo {
                id: c.id.clone(),
                name: c.name.clone(),
                language: c.language.clone(),
                voice: c.voice.clone(),
                extra: if c.expressions.is_empty() {
                    serde_json::Map::new()
                } else {
                    let mut m = serde_json::Map::new();
                    m.insert("expressions".into(), serde_json::json!(c.expressions));
                    m
                },
            })
            .collect()
    }

    async fn create_session(&self, request: CreateSessionRequest) -> Result<CreatedSession, ApiError> {
        let s = self.manager.create(request.character.as_deref(), request.provider.as_deref()).map_err(to_api)?;
        Ok(CreatedSession { session_id: s.id.clone(), ice_servers: self.ice_servers.clone() })
    }

    async fn offer(&self, session_id: &str, offer: ValidOffer) -> Result<OfferAnswer, ApiError> {
        let (sdp, peer_id, etag) = self.manager.offer(session_id, offer.into_sdp()).await.map_err(to_api)?;
        let etag = ETag::new(etag.trim_matches('"')).ok_or_else(|| ApiError::internal("generated ETag invalid"))?;
        Ok(OfferAnswer { sdp, peer_id, etag })
    }

    async fn trickle(
        &self,
        session_id: &str,
        peer_id: &str,
        request: TrickleRequest,
    ) -> Result<TrickleOutcome, ApiError> {
        match request {
            TrickleRequest::IceRestart { .. } => {
                // Validate the session and peer first so a stale URL still gets its 404.
                self.manager.trickle(session_id, peer_id, "*", Vec::new()).await.map_err(to_api)?;
                Err(ApiError::ice_restart_unsupported())
            }
            TrickleRequest::Candidates { if_match, frag } => {
                let tags = match &if_match {
                    IfMatch::Any => "*".to_owned(),
                    IfMatch::Tags(t) => t.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", "),
                };
                let candidates = frag
                    .candidates
                    .iter()
                    .map(|c| RTCIceCandidateInit {
                        candidate: c.candidate.clone(),
                        sdp_mid: c.mid.clone(),
                        username_fragment: frag.ice_ufrag.clone(),
                        ..Default::default()
                    })
                    .collect();
                self.manager.trickle(session_id, peer_id, &tags, candidates).await.map_err(to_api)?;
                Ok(TrickleOutcome::Added)
            }
        }
    }

    async fn end(&self, session_id: &str, peer_id: Option<&str>) -> Result<(), ApiError> {
        self.manager.end(session_id, peer_id, EndReason::ClientEnded).await.map_err(to_api)
    }

    async fn session(&self, session_id: &str) -> Result<SessionInfo, ApiError> {
        let s = self.manager.get(session_id).ok_or_else(ApiError::unknown_session)?;
        let snap = s.snapshot();
        Ok(SessionInfo {
            session_id: snap.id,
            state: match snap.phase {
                Phase::Created => SessionState::Created,
                Phase::Connecting => SessionState::Connecting,
                Phase::Connected => SessionState::Connected,
                Phase::Ended => SessionState::Ended,
            },
            character: snap.character,
            provider: snap.provider,
            created_at: to_time(snap.created_at),
            ended_at: snap.ended_at.map(to_time),
            end_reason: snap.end_reason.map(EndReason::api),
        })
    }

    async fn transcript(&self, session_id: &str) -> Result<Vec<TranscriptEntry>, ApiError> {
        let s = self.manager.get(session_id).ok_or_else(ApiError::unknown_session)?;
        Ok(s.turns()
            .into_iter()
            .map(|t| TranscriptEntry {
                seq: t.seq,
                role: t.role,
                text: t.text,
                interrupted: t.interrupted,
                at: to_time(t.at),
            })
            .collect())
    }
}

/// The whole HTTP app.
pub fn app(api: signaling::api::ApiState, manager: Arc<SessionManager>) -> Router {
    let prometheus = crate::telemetry::install();
    signaling::api::router(api)
        .route("/", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML) }))
        .route("/index.html", get(|| async { ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX_HTML) }))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], APP_JS) }))
        .route("/schema.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], SCHEMA_JS) }))
        .route("/events.d.ts", get(|| async { ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], EVENTS_DTS) }))
        .route(
            "/metrics",
            get(move || {
                let m = Arc::clone(&manager);
                let p = prometheus.clone();
                async move { metrics(&m, p.as_ref()).into_response() }
            }),
        )
        .layer(axum::middleware::from_fn(count_requests))
}

/// Count requests by matched route (never the raw path: ids would explode cardinality) and status.
async fn count_requests(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let start = std::time::Instant::now();
    let res = next.run(req).await;
    let status = res.status().as_u16().to_string();
    metrics::counter!(crate::telemetry::HTTP_REQUESTS, "route" => route.clone(), "status" => status).increment(1);
    metrics::histogram!(crate::telemetry::HTTP_DURATION, "route" => route).record(start.elapsed().as_secs_f64());
    res
}

fn metrics(
    m: &SessionManager,
    prometheus: Option<&metrics_exporter_prometheus::PrometheusHandle>,
) -> impl IntoResponse {
    metrics::gauge!(crate::telemetry::SESSIONS_LIVE).set(m.live_count() as f64);
    let mut body = prometheus.map(|p| p.render()).unwrap_or_default();
    body.push_str(&format!(
        "# HELP kotodama_accepting Whether this node accepts new sessions.\n\
         # TYPE kotodama_accepting gauge\n\
         kotodama_accepting {}\n",
        u8::from(m.accepting()),
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}
