//! One axum app: signaling's API v1 router (with this node's [`SessionManager`] as its host),
//! the WebSocket transport and the N.E.K.O. route ([`crate::ws`]), agent results
//! ([`crate::agent_results`]), the web demo at `/`, and `/metrics`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use signaling::host::{
    CharacterInfo, CreateSessionRequest, CreatedSession, ETag, IfMatch, OfferAnswer, SessionHost, SessionInfo,
    TranscriptEntry, TrickleOutcome, TrickleRequest, UserScope,
};
use signaling::problem::ApiError;
use signaling::sdp::ValidOffer;
use webrtc::peer_connection::RTCIceCandidateInit;

use crate::session::{EndReason, SessionError, SessionManager};
use crate::store::StoredSession;

/// Retry-After for 503s.
const RETRY_AFTER: Duration = Duration::from_secs(5);

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

/// A session error as the API's problem+json.
pub(crate) fn to_api(e: SessionError) -> ApiError {
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
            ApiError::unprocessable("offer_not_negotiable", format!("the WebRTC stack rejected the offer: {m}"))
        }
        SessionError::OfferRefused(e) => e.into(),
        SessionError::NoMediaPort => {
            tracing::warn!("no free UDP port in media.udp_ports (held by other sessions or processes)");
            ApiError::unavailable(
                "no media port is free on this node; create a new session after Retry-After",
                RETRY_AFTER,
            )
        }
        SessionError::ProviderUnavailable(m) => {
            ApiError::unavailable(format!("model provider unavailable: {m}"), RETRY_AFTER)
        }
        SessionError::UnknownPeer => ApiError::unknown_peer(),
        SessionError::Storage(m) => {
            tracing::error!(error = %m, "storage unavailable");
            ApiError::unavailable("session storage is unavailable", RETRY_AFTER)
        }
        SessionError::StaleEtag => ApiError::stale_etag(),
        SessionError::IceRestartUnsupported => ApiError::ice_restart_unsupported(),
        SessionError::Elsewhere(owner) => ApiError::elsewhere(owner),
        SessionError::Registry(m) => {
            tracing::error!(error = %m, "session registry unavailable");
            ApiError::unavailable("session registry unavailable", RETRY_AFTER)
        }
        SessionError::OwnerNotListening => {
            ApiError::unavailable("the node hosting this session is not listening", RETRY_AFTER)
        }
        SessionError::NotLive => ApiError::conflict("not_live", "the session has not connected yet"),
        SessionError::Busy => ApiError::unavailable("the session is busy", RETRY_AFTER),
        SessionError::NoUserData => ApiError::not_found("no_user_data", "no data for this user"),
        e @ SessionError::LiveElsewhere(_) => ApiError::conflict("sessions_live_elsewhere", e.to_string()),
        e @ SessionError::KeyLimit { limit, retry_after, .. } => ApiError::TooManyRequests {
            reason: signaling::problem::Reason::new(limit.code(), e.to_string()),
            retry_after,
        },
        other => ApiError::internal(other),
    }
}

/// The candidates of a trickle-ICE sdpfrag as webrtc-rs takes them.
pub(crate) fn candidate_inits(frag: &signaling::sdp::SdpFrag) -> Vec<RTCIceCandidateInit> {
    frag.candidates
        .iter()
        .map(|c| RTCIceCandidateInit {
            candidate: c.candidate.clone(),
            sdp_mid: c.mid.clone(),
            username_fragment: frag.ice_ufrag.clone(),
            ..Default::default()
        })
        .collect()
}

fn storage_error(e: crate::store::StoreError) -> ApiError {
    to_api(SessionError::Storage(e.to_string()))
}

impl Host {
    /// A session this node does not hold in memory: 307 to its owner, else its stored record.
    async fn stored(&self, session_id: &str) -> Result<StoredSession, ApiError> {
        self.manager.stored(session_id).await.map_err(to_api)
    }

    fn scope_key(scope: &UserScope) -> Option<&str> {
        match scope {
            UserScope::CreatedBy(k) => Some(k.as_str()),
            _ => None,
        }
    }
}

#[async_trait]
impl SessionHost for Host {
    fn accepting(&self) -> bool {
        // Not ready while store writes wait for an unreachable database (`/readyz` 503).
        self.manager.accepting() && self.manager.writer().store_available()
    }

    fn readiness(&self) -> serde_json::Map<String, serde_json::Value> {
        // The store writer's state: waiting writes (queue + journal spill) and journal size.
        let w = self.manager.writer();
        let store = if w.store_available() { "available" } else { "unavailable" };
        let mut m = serde_json::Map::new();
        m.insert("store".into(), store.into());
        m.insert("queued".into(), w.queued().into());
        m.insert("journal_bytes".into(), w.journal_bytes().into());
        m
    }

    async fn characters(&self) -> Vec<CharacterInfo> {
        self.manager.characters().iter().map(CharacterInfo::from).collect()
    }

    async fn place_new_session(&self) -> Result<(), ApiError> {
        self.manager.place().await.map_err(to_api)
    }

    async fn create_session(&self, request: CreateSessionRequest) -> Result<CreatedSession, ApiError> {
        let options = crate::session::CreateOptions {
            character: request.character,
            provider: request.provider,
            user_id: request.user_id,
            api_key_id: request.api_key_id,
            record: request.record,
            continues: Vec::new(),
        };
        let s = self.manager.create(options).await.map_err(to_api)?;
        Ok(CreatedSession { session_id: s.id.clone(), ice_servers: self.ice_servers.clone() })
    }

    async fn offer(&self, session_id: &str, offer: ValidOffer) -> Result<OfferAnswer, ApiError> {
        if self.manager.get(session_id).is_none() {
            self.stored(session_id).await?;
        }
        let (sdp, peer_id, etag) = self.manager.offer(session_id, offer).await.map_err(to_api)?;
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
            _ if self.manager.get(session_id).is_none() => {
                self.stored(session_id).await?;
                Err(ApiError::unknown_session())
            }
            TrickleRequest::IceRestart { frag } => {
                let restart = crate::peer::IceRestart {
                    ufrag: frag.ice_ufrag.clone().unwrap_or_default(),
                    pwd: frag.ice_pwd.clone().unwrap_or_default(),
                    candidates: candidate_inits(&frag),
                };
                let (sdpfrag, etag) = self.manager.restart_ice(session_id, peer_id, restart).await.map_err(to_api)?;
                let etag =
                    ETag::new(etag.trim_matches('"')).ok_or_else(|| ApiError::internal("generated ETag invalid"))?;
                Ok(TrickleOutcome::Restarted { sdpfrag, etag })
            }
            TrickleRequest::Candidates { if_match, frag } => {
                let tags = match &if_match {
                    IfMatch::Any => "*".to_owned(),
                    IfMatch::Tags(t) => t.iter().map(|t| format!("\"{t}\"")).collect::<Vec<_>>().join(", "),
                };
                self.manager.trickle(session_id, peer_id, &tags, candidate_inits(&frag)).await.map_err(to_api)?;
                Ok(TrickleOutcome::Added)
            }
        }
    }

    async fn end(&self, session_id: &str, peer_id: Option<&str>) -> Result<(), ApiError> {
        if self.manager.get(session_id).is_none() {
            return Err(to_api(self.manager.not_here(session_id).await));
        }
        self.manager.end(session_id, peer_id, EndReason::ClientRequest).await.map_err(to_api)
    }

    async fn inject(&self, session_id: &str, text: String) -> Result<(), ApiError> {
        self.manager.inject_anywhere(session_id, text).await.map_err(to_api)
    }

    async fn export_user(&self, user_id: &str, scope: UserScope) -> Result<serde_json::Value, ApiError> {
        self.manager.export_user(user_id, Self::scope_key(&scope)).await.map_err(to_api)
    }

    async fn delete_user(&self, user_id: &str, scope: UserScope) -> Result<serde_json::Value, ApiError> {
        let deleted = self.manager.delete_user(user_id, Self::scope_key(&scope)).await.map_err(to_api)?;
        Ok(serde_json::json!({ "user_id": user_id, "deleted_sessions": deleted }))
    }

    async fn session(&self, session_id: &str) -> Result<SessionInfo, ApiError> {
        match self.manager.get(session_id) {
            Some(s) => Ok(s.info()),
            None => Ok(self.stored(session_id).await?.into()),
        }
    }

    async fn transcript(&self, session_id: &str) -> Result<Vec<TranscriptEntry>, ApiError> {
        let turns = match self.manager.get(session_id) {
            Some(s) => s.turns(),
            None => {
                self.stored(session_id).await?;
                self.manager.store().turns(session_id).await.map_err(storage_error)?
            }
        };
        Ok(turns.into_iter().map(Into::into).collect())
    }
}

/// The whole HTTP app: the API, the WebSocket routes, the admin API ([`crate::admin`]), the web
/// demo's routes and `/metrics`.
pub fn app(api: signaling::api::ApiState, manager: Arc<SessionManager>, admin: Router, web_demo: Router) -> Router {
    let prometheus = crate::telemetry::install();
    let whip = crate::whip::Whip::new(api.clone(), Arc::clone(&manager));
    signaling::api::router(api.clone())
        .merge(whip.routes())
        .merge(crate::ws::routes(api.clone(), Arc::clone(&manager)))
        .merge(crate::pipecat::routes(api.clone(), Arc::clone(&manager)))
        .merge(crate::memory::http::routes(api.clone(), Arc::clone(&manager)))
        .merge(crate::agent_results::routes(api.clone(), Arc::clone(&manager)))
        .merge(crate::realtime_calls::routes(api, Arc::clone(&manager)))
        .merge(admin)
        .merge(web_demo)
        .route(
            "/metrics",
            get(move || {
                let m = Arc::clone(&manager);
                let p = prometheus.clone();
                async move { metrics(&m, p.as_ref()).into_response() }
            }),
        )
        // WHIP resources (`/v1/sessions/{id}` of a WHIP session) take PATCH/DELETE/OPTIONS the WHIP way.
        .layer(axum::middleware::from_fn_with_state(whip, crate::whip::resource_requests))
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
    use std::sync::atomic::Ordering;
    if let Some(pl) = m.peer_loop() {
        body.push_str(&format!(
            "# HELP kotodama_peer_loop_peers Peer connections the node's peer loop drives.\n\
             # TYPE kotodama_peer_loop_peers gauge\n\
             kotodama_peer_loop_peers {}\n\
             # HELP kotodama_peer_loop_unrouted_total Datagrams on the peer loop's socket that matched no peer.\n\
             # TYPE kotodama_peer_loop_unrouted_total counter\n\
             kotodama_peer_loop_unrouted_total {}\n",
            pl.peers(),
            pl.unrouted.load(Ordering::Relaxed),
        ));
    }
    let w = m.writer().stats();
    body.push_str(&format!(
        "# HELP kotodama_store_writes_total Session and transcript writes by outcome (dropped: queue full, \
         rewritten at the session's end; failed: lost after retries).\n\
         # TYPE kotodama_store_writes_total counter\n\
         kotodama_store_writes_total{{result=\"written\"}} {}\n\
         kotodama_store_writes_total{{result=\"dropped\"}} {}\n\
         kotodama_store_writes_total{{result=\"failed\"}} {}\n",
        w.written.load(Ordering::Relaxed),
        w.dropped.load(Ordering::Relaxed),
        w.failed.load(Ordering::Relaxed),
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body)
}
