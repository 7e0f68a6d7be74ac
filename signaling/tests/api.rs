//! API v1 end to end through the real router (`tower::ServiceExt::oneshot`), against an
//! in-memory `SessionHost` that records what it was asked. Every error status of the contract
//! is provoked by sending the bad request, and every error body must be problem+json.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::{HeaderMap, Request, StatusCode, header};
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tower::ServiceExt as _;

use common::{without_lines, without_section};
use signaling::events::Role;
use signaling::id::{new_peer_id, new_session_id};
use signaling::sdp::TrickleCandidate;
use signaling::token::{TokenConfig, TokenSecret};
use signaling::{
    ApiError, ApiKeys, ApiState, CharacterInfo, CreateSessionRequest, CreatedSession, ETag, EndReason, IceServer,
    IfMatch, OfferAnswer, Problem, SessionHost, SessionInfo, SessionState, TokenIssuer, TranscriptEntry,
    TrickleOutcome, TrickleRequest, ValidOffer, VerifyMode, router,
};

// ---- an in-memory host that records its calls ------------------------------------------------

const ANSWER: &str = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=kotodama\r\nt=0 0\r\n";
const RESTART_FRAG: &str = "a=ice-ufrag:srv2\r\na=ice-pwd:serverpassword0000000000\r\n";

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Create(CreateSessionRequest),
    Offer { session: String, opus_pt: u8 },
    Trickle { session: String, peer: String, request: TrickleRequest },
    End { session: String, peer: Option<String> },
}

struct FakeSession {
    info: SessionInfo,
    peer: Option<(String, ETag)>,
    candidates: Vec<TrickleCandidate>,
    transcript: Vec<TranscriptEntry>,
}

#[derive(Default)]
struct State {
    sessions: HashMap<String, FakeSession>,
    calls: Vec<Call>,
}

struct FakeHost {
    state: Mutex<State>,
    accepting: AtomicBool,
    ice_restart: AtomicBool,
    fail_internally: AtomicBool,
}

impl FakeHost {
    fn new() -> Arc<Self> {
        Arc::new(FakeHost {
            state: Mutex::new(State::default()),
            accepting: AtomicBool::new(true),
            ice_restart: AtomicBool::new(false),
            fail_internally: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock means another assertion already failed; keep going to report it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    fn candidates(&self, session: &str) -> Vec<TrickleCandidate> {
        self.lock().sessions.get(session).map(|s| s.candidates.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl SessionHost for FakeHost {
    fn accepting(&self) -> bool {
        self.accepting.load(Ordering::SeqCst)
    }

    async fn characters(&self) -> Vec<CharacterInfo> {
        let mut extra = serde_json::Map::new();
        extra.insert("description".into(), json!("A cheerful guide"));
        vec![
            CharacterInfo {
                id: "aoi".into(),
                name: "Aoi".into(),
                language: "ja-JP".into(),
                voice: "alloy".into(),
                extra,
            },
            CharacterInfo {
                id: "kenji".into(),
                name: "Kenji".into(),
                language: "en-US".into(),
                voice: "verse".into(),
                extra: serde_json::Map::new(),
            },
        ]
    }

    async fn create_session(&self, request: CreateSessionRequest) -> Result<CreatedSession, ApiError> {
        self.lock().calls.push(Call::Create(request.clone()));
        if self.fail_internally.load(Ordering::SeqCst) {
            return Err(ApiError::internal("database password hunter2 rejected"));
        }
        let character = request.character.unwrap_or_else(|| "aoi".into());
        if character != "aoi" && character != "kenji" {
            return Err(ApiError::unknown_character(&character));
        }
        let id = new_session_id();
        let info = SessionInfo {
            session_id: id.clone(),
            state: SessionState::Created,
            character,
            provider: request.provider.unwrap_or_else(|| "scripted".into()),
            created_at: OffsetDateTime::now_utc(),
            ended_at: None,
            end_reason: None,
        };
        let transcript = vec![
            TranscriptEntry {
                seq: 0,
                role: Role::User,
                text: "Hello?".into(),
                interrupted: false,
                at: OffsetDateTime::now_utc(),
            },
            TranscriptEntry {
                seq: 1,
                role: Role::Agent,
                text: "Hi! I was about to".into(),
                interrupted: true,
                at: OffsetDateTime::now_utc(),
            },
        ];
        self.lock().sessions.insert(id.clone(), FakeSession { info, peer: None, candidates: vec![], transcript });
        Ok(CreatedSession {
            session_id: id,
            ice_servers: vec![
                IceServer::stun("stun:stun.example.org:3478"),
                IceServer::turn(
                    vec!["turn:turn.example.org:3478?transport=udp".into()],
                    "1700000000:user",
                    "credential",
                ),
            ],
        })
    }

    async fn offer(&self, session_id: &str, offer: ValidOffer) -> Result<OfferAnswer, ApiError> {
        let mut state = self.lock();
        state.calls.push(Call::Offer { session: session_id.into(), opus_pt: offer.opus_payload_type() });
        let session = state.sessions.get_mut(session_id).ok_or_else(ApiError::unknown_session)?;
        if session.info.state == SessionState::Ended {
            return Err(ApiError::offer_after_end());
        }
        if session.peer.is_some() {
            return Err(ApiError::already_connected());
        }
        let peer_id = new_peer_id();
        let etag = ETag::generate();
        session.peer = Some((peer_id.clone(), etag.clone()));
        session.info.state = SessionState::Connecting;
        Ok(OfferAnswer { sdp: ANSWER.into(), peer_id, etag })
    }

    async fn trickle(
        &self,
        session_id: &str,
        peer_id: &str,
        request: TrickleRequest,
    ) -> Result<TrickleOutcome, ApiError> {
        let ice_restart = self.ice_restart.load(Ordering::SeqCst);
        let mut state = self.lock();
        state.calls.push(Call::Trickle { session: session_id.into(), peer: peer_id.into(), request: request.clone() });
        let session = state.sessions.get_mut(session_id).ok_or_else(ApiError::unknown_session)?;
        let Some((peer, etag)) = session.peer.as_mut() else {
            return Err(ApiError::unknown_peer());
        };
        if peer != peer_id {
            return Err(ApiError::unknown_peer());
        }
        match request {
            TrickleRequest::Candidates { if_match, frag } => {
                if !if_match.matches(etag) {
                    return Err(ApiError::stale_etag());
                }
                session.candidates.extend(frag.candidates);
                Ok(TrickleOutcome::Added)
            }
            TrickleRequest::IceRestart { .. } if !ice_restart => Err(ApiError::ice_restart_unsupported()),
            TrickleRequest::IceRestart { .. } => {
                *etag = ETag::generate();
                Ok(TrickleOutcome::Restarted { sdpfrag: RESTART_FRAG.into(), etag: etag.clone() })
            }
        }
    }

    async fn end(&self, session_id: &str, peer_id: Option<&str>) -> Result<(), ApiError> {
        let mut state = self.lock();
        state.calls.push(Call::End { session: session_id.into(), peer: peer_id.map(str::to_owned) });
        let session = state.sessions.get_mut(session_id).ok_or_else(ApiError::unknown_session)?;
        if session.info.state == SessionState::Ended {
            return Err(ApiError::session_already_ended());
        }
        if let Some(peer_id) = peer_id
            && session.peer.as_ref().map(|(p, _)| p.as_str()) != Some(peer_id)
        {
            return Err(ApiError::unknown_peer());
        }
        session.info.state = SessionState::Ended;
        session.info.ended_at = Some(OffsetDateTime::now_utc());
        session.info.end_reason = Some(EndReason::ClientRequest);
        Ok(())
    }

    async fn session(&self, session_id: &str) -> Result<SessionInfo, ApiError> {
        self.lock().sessions.get(session_id).map(|s| s.info.clone()).ok_or_else(ApiError::unknown_session)
    }

    async fn transcript(&self, session_id: &str) -> Result<Vec<TranscriptEntry>, ApiError> {
        self.lock().sessions.get(session_id).map(|s| s.transcript.clone()).ok_or_else(ApiError::unknown_session)
    }
}

// ---- harness ---------------------------------------------------------------------------------

const API_KEY: &str = "test-api-key-0123456789";

struct Harness {
    host: Arc<FakeHost>,
    tokens: TokenIssuer,
    app: Router,
}

impl Harness {
    fn open() -> Self {
        Self::with_keys(&[])
    }

    fn with_keys(keys: &[&str]) -> Self {
        let host = FakeHost::new();
        let tokens = TokenIssuer::new(TokenConfig {
            secret: Some(TokenSecret::new(vec![42u8; 32]).expect("32-byte secret")),
            ..TokenConfig::default()
        })
        .expect("token config");
        let state = ApiState::new(host.clone(), tokens.clone()).with_api_keys(ApiKeys::new(keys));
        Harness { host, tokens, app: router(state) }
    }

    async fn send(&self, request: Request<Body>) -> Resp {
        let response = self.app.clone().oneshot(request).await.unwrap_or_else(|e| match e {});
        let status = response.status();
        let headers = response.headers().clone();
        let body =
            axum::body::to_bytes(response.into_body(), usize::MAX).await.expect("response body readable").to_vec();
        Resp { status, headers, body }
    }

    /// POST /v1/sessions with `{}`; returns (session_id, token).
    async fn create(&self) -> (String, String) {
        let r = self.send(json_post("/v1/sessions", "{}", Some(API_KEY))).await;
        assert_eq!(r.status, StatusCode::CREATED, "create failed: {}", r.text());
        let v = r.json();
        (v["session_id"].as_str().expect("session_id").to_owned(), v["token"].as_str().expect("token").to_owned())
    }

    /// Create a session and POST the Chrome offer; returns (session, token, peer url, etag).
    async fn connect(&self) -> (String, String, String, String) {
        let (id, token) = self.create().await;
        let r = self.send(offer_request(&id, Some(&token), &fixture("chrome_offer.sdp"))).await;
        assert_eq!(r.status, StatusCode::CREATED, "offer failed: {}", r.text());
        let location = r.header(header::LOCATION).expect("Location").to_owned();
        let etag = r.header(header::ETAG).expect("ETag").to_owned();
        (id, token, location, etag)
    }
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }

    fn header(&self, name: header::HeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert an RFC 9457 problem with `status` (and `code` when given); return it.
    #[track_caller]
    fn problem(&self, status: StatusCode, code: Option<&str>) -> Problem {
        assert_eq!(self.status, status, "expected {status}, got {} with body {}", self.status, self.text());
        assert_eq!(
            self.header(header::CONTENT_TYPE),
            Some("application/problem+json"),
            "error {status} must be problem+json"
        );
        let problem: Problem =
            serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("not a problem body ({e}): {}", self.text()));
        assert_eq!(problem.status, status.as_u16(), "problem.status");
        assert_eq!(problem.type_, "about:blank");
        assert!(!problem.title.is_empty() && !problem.detail.is_empty());
        if let Some(code) = code {
            assert_eq!(problem.code.as_deref(), Some(code), "problem code: {problem:?}");
        }
        if status == StatusCode::UNAUTHORIZED {
            assert_eq!(
                self.header(header::WWW_AUTHENTICATE),
                Some("Bearer"),
                "401 must carry WWW-Authenticate: Bearer"
            );
        }
        problem
    }
}

fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sdp").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn request(method: &str, uri: &str, bearer: Option<&str>) -> http::request::Builder {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(token) = bearer {
        b = b.header(header::AUTHORIZATION, format!("Bearer {token}"));
    }
    b
}

fn json_post(uri: &str, body: &str, bearer: Option<&str>) -> Request<Body> {
    request("POST", uri, bearer)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_owned()))
        .expect("request")
}

fn empty(method: &str, uri: &str, bearer: Option<&str>) -> Request<Body> {
    request(method, uri, bearer).body(Body::empty()).expect("request")
}

fn offer_request(id: &str, token: Option<&str>, sdp: &str) -> Request<Body> {
    request("POST", &format!("/v1/sessions/{id}/offer"), token)
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(Body::from(sdp.to_owned()))
        .expect("request")
}

fn patch(location: &str, token: &str, if_match: Option<&str>, frag: &str) -> Request<Body> {
    let mut b = request("PATCH", location, Some(token)).header(header::CONTENT_TYPE, "application/trickle-ice-sdpfrag");
    if let Some(tag) = if_match {
        b = b.header(header::IF_MATCH, tag);
    }
    b.body(Body::from(frag.to_owned())).expect("request")
}

fn keys(v: &Value) -> Vec<String> {
    let mut k: Vec<String> =
        v.as_object().unwrap_or_else(|| panic!("expected an object, got {v}")).keys().cloned().collect();
    k.sort();
    k
}

// ---- health ----------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_is_200() {
    let h = Harness::open();
    assert_eq!(h.send(empty("GET", "/healthz", None)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn readyz_is_200_while_accepting_and_503_with_retry_after_while_draining() {
    let h = Harness::open();
    assert_eq!(h.send(empty("GET", "/readyz", None)).await.status, StatusCode::OK);
    h.host.accepting.store(false, Ordering::SeqCst);
    let r = h.send(empty("GET", "/readyz", None)).await;
    r.problem(StatusCode::SERVICE_UNAVAILABLE, Some("unavailable"));
    assert_eq!(r.header(header::RETRY_AFTER), Some("5"));
}

// ---- characters ------------------------------------------------------------------------------

#[tokio::test]
async fn characters_lists_id_name_language_voice_and_extras() {
    let h = Harness::open();
    let r = h.send(empty("GET", "/v1/characters", None)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header(header::CONTENT_TYPE), Some("application/json"));
    let v = r.json();
    assert_eq!(
        v[0],
        json!({"id":"aoi","name":"Aoi","language":"ja-JP","voice":"alloy","description":"A cheerful guide"})
    );
    assert_eq!(keys(&v[1]), ["id", "language", "name", "voice"]);
}

// ---- POST /v1/sessions -----------------------------------------------------------------------

#[tokio::test]
async fn create_session_returns_201_with_the_contract_fields() {
    let h = Harness::with_keys(&[API_KEY]);
    let r = h.send(json_post("/v1/sessions", r#"{"character":"kenji","provider":"openai"}"#, Some(API_KEY))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header(header::CONTENT_TYPE), Some("application/json"));
    assert_eq!(r.header(header::CACHE_CONTROL), Some("no-store"), "body carries a token");
    let v = r.json();
    assert_eq!(keys(&v), ["expires_at", "ice_servers", "offer_url", "session_id", "token"]);
    let id = v["session_id"].as_str().expect("session_id is a string");
    assert!(id.starts_with("sess_") && id.len() >= 27, "128-bit id: {id}");
    assert_eq!(v["offer_url"], format!("/v1/sessions/{id}/offer"));
    assert_eq!(r.header(header::LOCATION), Some(format!("/v1/sessions/{id}").as_str()));
    assert_eq!(
        v["ice_servers"],
        json!([
            {"urls":["stun:stun.example.org:3478"]},
            {"urls":["turn:turn.example.org:3478?transport=udp"],"username":"1700000000:user","credential":"credential"}
        ])
    );
    let expires =
        OffsetDateTime::parse(v["expires_at"].as_str().expect("string"), &Rfc3339).expect("expires_at is RFC 3339");
    let ttl = expires - OffsetDateTime::now_utc();
    assert!(
        ttl > time::Duration::minutes(9) && ttl <= time::Duration::minutes(10),
        "default token ttl is 10 minutes, got {ttl}"
    );
    let token = v["token"].as_str().expect("token");
    h.tokens.verify(token, id, VerifyMode::Connect).expect("the issued token is a session token for this session");
    let calls = h.host.calls();
    let [Call::Create(req)] = &calls[..] else { panic!("one create call: {calls:?}") };
    assert_eq!((req.character.as_deref(), req.provider.as_deref()), (Some("kenji"), Some("openai")));
}

#[tokio::test]
async fn create_session_with_an_empty_body_uses_defaults() {
    let h = Harness::open();
    let r = h.send(empty("POST", "/v1/sessions", None)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(h.host.calls(), [Call::Create(CreateSessionRequest::default())]);
}

#[tokio::test]
async fn create_session_with_bad_json_is_400() {
    let h = Harness::open();
    for body in ["{not json", r#"{"character":5}"#, "[]", "null"] {
        let r = h.send(json_post("/v1/sessions", body, None)).await;
        r.problem(StatusCode::BAD_REQUEST, Some("bad_json"));
    }
    assert!(h.host.calls().is_empty(), "the host must not see bad requests");
}

#[tokio::test]
async fn create_session_with_a_non_json_body_is_415() {
    let h = Harness::open();
    for content_type in [Some("text/plain"), Some("application/x-www-form-urlencoded"), None] {
        let mut b = request("POST", "/v1/sessions", None);
        if let Some(ct) = content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        let r = h.send(b.body(Body::from("character=aoi")).expect("request")).await;
        r.problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"));
    }
    let ok = request("POST", "/v1/sessions", None)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(Body::from("{}"))
        .expect("request");
    assert_eq!(h.send(ok).await.status, StatusCode::CREATED, "parameters are allowed");
}

#[tokio::test]
async fn create_session_without_or_with_a_wrong_api_key_is_401() {
    let h = Harness::with_keys(&[API_KEY, "second-key"]);
    h.send(json_post("/v1/sessions", "{}", None)).await.problem(StatusCode::UNAUTHORIZED, Some("api_key_missing"));
    h.send(json_post("/v1/sessions", "{}", Some("wrong-key")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("api_key_invalid"));
    let basic = request("POST", "/v1/sessions", None)
        .header(header::AUTHORIZATION, format!("Basic {API_KEY}"))
        .body(Body::empty())
        .expect("request");
    h.send(basic).await.problem(StatusCode::UNAUTHORIZED, Some("api_key_missing"));
    assert!(h.host.calls().is_empty());
    let r = h.send(json_post("/v1/sessions", "{}", Some("second-key"))).await;
    assert_eq!(r.status, StatusCode::CREATED, "any configured key works");
}

#[tokio::test]
async fn create_session_with_an_unknown_character_is_404() {
    let h = Harness::open();
    h.send(json_post("/v1/sessions", r#"{"character":"nobody"}"#, None))
        .await
        .problem(StatusCode::NOT_FOUND, Some("unknown_character"));
}

#[tokio::test]
async fn create_session_while_draining_is_503_with_retry_after() {
    let h = Harness::open();
    h.host.accepting.store(false, Ordering::SeqCst);
    let r = h.send(json_post("/v1/sessions", "{}", None)).await;
    r.problem(StatusCode::SERVICE_UNAVAILABLE, None);
    let retry: u64 =
        r.header(header::RETRY_AFTER).expect("503 must carry Retry-After").parse().expect("Retry-After in seconds");
    assert!(retry >= 1);
    assert!(h.host.calls().is_empty(), "a draining server must not create sessions");
}

#[tokio::test]
async fn create_session_with_an_oversized_body_is_413() {
    let h = Harness::open();
    let body = format!(r#"{{"character":"{}"}}"#, "a".repeat(17 * 1024));
    h.send(json_post("/v1/sessions", &body, None)).await.problem(StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"));
}

#[tokio::test]
async fn internal_host_errors_are_500_without_the_cause() {
    let h = Harness::open();
    h.host.fail_internally.store(true, Ordering::SeqCst);
    let r = h.send(json_post("/v1/sessions", "{}", None)).await;
    let p = r.problem(StatusCode::INTERNAL_SERVER_ERROR, Some("internal"));
    assert!(!r.text().contains("hunter2"), "500 leaked its cause: {p:?}");
}

// ---- POST offer ------------------------------------------------------------------------------

#[tokio::test]
async fn offer_returns_201_with_answer_location_and_etag() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let r = h.send(offer_request(&id, Some(&token), &fixture("chrome_offer.sdp"))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    assert_eq!(r.header(header::CONTENT_TYPE), Some("application/sdp"));
    assert_eq!(r.text(), ANSWER);
    let location = r.header(header::LOCATION).expect("Location");
    let peer = location
        .strip_prefix(&format!("/v1/sessions/{id}/peers/"))
        .unwrap_or_else(|| panic!("Location {location} is not a peer of {id}"));
    assert!(peer.starts_with("peer_"));
    let etag = r.header(header::ETAG).expect("ETag");
    assert!(etag.len() > 2 && etag.starts_with('"') && etag.ends_with('"'), "strong quoted ETag: {etag}");
    assert!(h.host.calls().contains(&Call::Offer { session: id.clone(), opus_pt: 111 }));
}

#[tokio::test]
async fn offers_from_firefox_and_webrtc_rs_are_accepted_with_content_type_parameters() {
    for name in ["firefox_offer.sdp", "webrtc_rs_offer.sdp"] {
        let h = Harness::open();
        let (id, token) = h.create().await;
        let req = request("POST", &format!("/v1/sessions/{id}/offer"), Some(&token))
            .header(header::CONTENT_TYPE, "Application/SDP; charset=utf-8")
            .body(Body::from(fixture(name)))
            .expect("request");
        let r = h.send(req).await;
        assert_eq!(r.status, StatusCode::CREATED, "{name}: {}", r.text());
    }
}

#[tokio::test]
async fn offer_with_another_content_type_is_415() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    for ct in ["application/json", "text/plain", "application/sdpx"] {
        let req = request("POST", &format!("/v1/sessions/{id}/offer"), Some(&token))
            .header(header::CONTENT_TYPE, ct)
            .body(Body::from(fixture("chrome_offer.sdp")))
            .expect("request");
        h.send(req).await.problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"));
    }
    let no_ct = request("POST", &format!("/v1/sessions/{id}/offer"), Some(&token))
        .body(Body::from(fixture("chrome_offer.sdp")))
        .expect("request");
    h.send(no_ct).await.problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, None);
}

#[tokio::test]
async fn offer_body_over_64_kib_is_413_problem_json() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let mut sdp = fixture("chrome_offer.sdp");
    while sdp.len() <= 65 * 1024 {
        sdp.push_str("a=x-padding:0123456789abcdef0123456789abcdef0123456789abcdef\r\n");
    }
    // Streamed without Content-Length: the limit is enforced while reading.
    h.send(offer_request(&id, Some(&token), &sdp)).await.problem(StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"));
    // With an honest Content-Length: refused before reading.
    let req = request("POST", &format!("/v1/sessions/{id}/offer"), Some(&token))
        .header(header::CONTENT_TYPE, "application/sdp")
        .header(header::CONTENT_LENGTH, sdp.len())
        .body(Body::from(sdp))
        .expect("request");
    h.send(req).await.problem(StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large"));
    assert!(
        !h.host.calls().iter().any(|c| matches!(c, Call::Offer { .. })),
        "the host must not see an oversized offer"
    );
}

#[tokio::test]
async fn offer_of_exactly_64_kib_is_not_413() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let mut sdp = fixture("chrome_offer.sdp");
    let pad_line = |n: usize| format!("a=x-pad:{}\r\n", "p".repeat(n));
    let overhead = pad_line(0).len();
    sdp.push_str(&pad_line(64 * 1024 - sdp.len() - overhead));
    assert_eq!(sdp.len(), 64 * 1024);
    let r = h.send(offer_request(&id, Some(&token), &sdp)).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
}

#[tokio::test]
async fn garbage_sdp_is_400() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    for (body, code) in [("hello, I am not SDP", "not_sdp"), ("v=0\r\nthis is garbage\r\n", "sdp_unparsable")] {
        h.send(offer_request(&id, Some(&token), body)).await.problem(StatusCode::BAD_REQUEST, Some(code));
    }
    let req = request("POST", &format!("/v1/sessions/{id}/offer"), Some(&token))
        .header(header::CONTENT_TYPE, "application/sdp")
        .body(Body::from(b"v=0\r\n\xff\xfe".to_vec()))
        .expect("request");
    h.send(req).await.problem(StatusCode::BAD_REQUEST, Some("sdp_not_utf8"));
}

#[tokio::test]
async fn offer_without_audio_is_422() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let sdp = without_section(&fixture("chrome_offer.sdp"), "m=audio");
    h.send(offer_request(&id, Some(&token), &sdp)).await.problem(StatusCode::UNPROCESSABLE_ENTITY, Some("no_audio"));
}

#[tokio::test]
async fn offer_without_a_data_channel_is_422() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let sdp = without_section(&fixture("chrome_offer.sdp"), "m=application");
    h.send(offer_request(&id, Some(&token), &sdp))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("no_data_channel"));
}

#[tokio::test]
async fn offer_without_a_fingerprint_is_422() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let sdp = without_lines(&fixture("chrome_offer.sdp"), |l| l.starts_with("a=fingerprint"));
    h.send(offer_request(&id, Some(&token), &sdp))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("no_fingerprint"));
}

#[tokio::test]
async fn recvonly_audio_or_no_opus_is_422() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let recvonly = fixture("chrome_offer.sdp").replacen("a=sendrecv", "a=recvonly", 1);
    h.send(offer_request(&id, Some(&token), &recvonly))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("audio_not_sendrecv"));
    let no_opus = without_lines(&fixture("chrome_offer.sdp"), |l| l.contains("opus/48000"));
    h.send(offer_request(&id, Some(&token), &no_opus)).await.problem(StatusCode::UNPROCESSABLE_ENTITY, Some("no_opus"));
    assert!(!h.host.calls().iter().any(|c| matches!(c, Call::Offer { .. })), "invalid offers must not reach the host");
}

#[tokio::test]
async fn offer_without_a_token_is_401() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    h.send(offer_request(&id, None, &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_missing"));
}

#[tokio::test]
async fn offer_with_a_token_for_another_session_is_401() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    let (_, other_token) = h.create().await;
    h.send(offer_request(&id, Some(&other_token), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_wrong_session"));
}

#[tokio::test]
async fn offer_with_an_expired_token_is_401() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    let old = h.tokens.issue_at(&id, OffsetDateTime::now_utc() - time::Duration::minutes(11)).expect("issue");
    h.send(offer_request(&id, Some(old.token.expose()), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_expired"));
}

#[tokio::test]
async fn offer_with_an_alg_none_token_is_401() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD
        .encode(format!(r#"{{"sub":"{id}","scope":"session","iat":{now},"nbf":{now},"exp":{},"jti":"x"}}"#, now + 600));
    let forged = format!("{header}.{claims}.");
    h.send(offer_request(&id, Some(&forged), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_bad_algorithm"));
}

#[tokio::test]
async fn offer_with_a_token_signed_by_another_key_is_401() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    let foreign = TokenIssuer::random().issue(&id).expect("issue");
    h.send(offer_request(&id, Some(foreign.token.expose()), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_bad_signature"));
}

#[tokio::test]
async fn offer_for_an_unknown_session_is_404() {
    let h = Harness::open();
    let ghost = new_session_id();
    let token = h.tokens.issue(&ghost).expect("issue");
    h.send(offer_request(&ghost, Some(token.token.expose()), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::NOT_FOUND, Some("unknown_session"));
    h.send(offer_request("bad%20id", Some(token.token.expose()), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::NOT_FOUND, Some("unknown_session"));
}

#[tokio::test]
async fn second_offer_is_409_and_offer_after_end_is_409() {
    let h = Harness::open();
    let (id, token, _, _) = h.connect().await;
    h.send(offer_request(&id, Some(&token), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::CONFLICT, Some("already_connected"));

    let (id2, token2) = h.create().await;
    let r = h.send(empty("DELETE", &format!("/v1/sessions/{id2}"), Some(&token2))).await;
    assert_eq!(r.status, StatusCode::OK);
    h.send(offer_request(&id2, Some(&token2), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::CONFLICT, Some("session_ended"));
}

// ---- PATCH peer ------------------------------------------------------------------------------

#[tokio::test]
async fn patch_with_matching_etag_adds_candidates_204() {
    let h = Harness::open();
    let (id, token, location, etag) = h.connect().await;
    let r = h.send(patch(&location, &token, Some(&etag), &fixture("trickle_chrome.sdpfrag"))).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert!(r.body.is_empty());
    let candidates = h.host.candidates(&id);
    assert_eq!(candidates.len(), 3, "all trickled candidates reach the host");
    assert_eq!(candidates[0].mid.as_deref(), Some("0"));
}

#[tokio::test]
async fn patch_without_if_match_is_428() {
    let h = Harness::open();
    let (_, token, location, _) = h.connect().await;
    h.send(patch(&location, &token, None, &fixture("trickle_chrome.sdpfrag")))
        .await
        .problem(StatusCode::PRECONDITION_REQUIRED, Some("if_match_required"));
}

#[tokio::test]
async fn patch_with_a_stale_etag_is_412() {
    let h = Harness::open();
    let (_, token, location, _) = h.connect().await;
    h.send(patch(&location, &token, Some("\"stale\""), &fixture("trickle_chrome.sdpfrag")))
        .await
        .problem(StatusCode::PRECONDITION_FAILED, Some("etag_mismatch"));
}

#[tokio::test]
async fn patch_with_another_content_type_is_415() {
    let h = Harness::open();
    let (_, token, location, etag) = h.connect().await;
    let req = request("PATCH", &location, Some(&token))
        .header(header::CONTENT_TYPE, "application/sdp")
        .header(header::IF_MATCH, etag)
        .body(Body::from(fixture("trickle_chrome.sdpfrag")))
        .expect("request");
    h.send(req).await.problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, Some("unsupported_media_type"));
}

#[tokio::test]
async fn patch_without_a_token_is_401_and_for_an_unknown_peer_is_404() {
    let h = Harness::open();
    let (id, token, location, etag) = h.connect().await;
    let req = request("PATCH", &location, None)
        .header(header::CONTENT_TYPE, "application/trickle-ice-sdpfrag")
        .header(header::IF_MATCH, etag.clone())
        .body(Body::from(fixture("trickle_chrome.sdpfrag")))
        .expect("request");
    h.send(req).await.problem(StatusCode::UNAUTHORIZED, Some("token_missing"));
    let unknown = format!("/v1/sessions/{id}/peers/{}", new_peer_id());
    h.send(patch(&unknown, &token, Some(&etag), &fixture("trickle_chrome.sdpfrag")))
        .await
        .problem(StatusCode::NOT_FOUND, Some("unknown_peer"));
}

#[tokio::test]
async fn patch_with_a_broken_sdpfrag_is_400() {
    let h = Harness::open();
    let (_, token, location, etag) = h.connect().await;
    h.send(patch(&location, &token, Some(&etag), "this is not an sdpfrag"))
        .await
        .problem(StatusCode::BAD_REQUEST, Some("sdpfrag_unparsable"));
}

#[tokio::test]
async fn ice_restart_is_422_when_the_host_cannot_and_200_with_a_new_etag_when_it_can() {
    let h = Harness::open();
    let (_, token, location, etag) = h.connect().await;
    h.send(patch(&location, &token, Some("*"), &fixture("ice_restart.sdpfrag")))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("ice_restart_unsupported"));
    assert!(
        h.host.calls().iter().any(|c| matches!(c, Call::Trickle { request: TrickleRequest::IceRestart { .. }, .. })),
        "If-Match * with new credentials must reach the host as an ICE restart"
    );

    h.host.ice_restart.store(true, Ordering::SeqCst);
    let r = h.send(patch(&location, &token, Some("*"), &fixture("ice_restart.sdpfrag"))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.header(header::CONTENT_TYPE), Some("application/trickle-ice-sdpfrag"));
    assert_eq!(r.text(), RESTART_FRAG);
    let new_etag = r.header(header::ETAG).expect("new ETag").to_owned();
    assert_ne!(new_etag, etag, "ICE restart must change the ETag");
    h.send(patch(&location, &token, Some(&etag), &fixture("trickle_chrome.sdpfrag")))
        .await
        .problem(StatusCode::PRECONDITION_FAILED, None);
    let ok = h.send(patch(&location, &token, Some(&new_etag), &fixture("trickle_chrome.sdpfrag"))).await;
    assert_eq!(ok.status, StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn if_match_star_without_new_credentials_is_a_plain_trickle() {
    let h = Harness::open();
    let (_, token, location, _) = h.connect().await;
    let frag = "a=mid:0\r\na=candidate:1 1 udp 2122260223 192.0.2.1 61764 typ host\r\n";
    let r = h.send(patch(&location, &token, Some("*"), frag)).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.text());
    assert!(h.host.calls().iter().any(|c| matches!(
        c,
        Call::Trickle { request: TrickleRequest::Candidates { if_match: IfMatch::Any, .. }, .. }
    )));
}

// ---- DELETE ----------------------------------------------------------------------------------

#[tokio::test]
async fn delete_session_is_200_then_404_already_ended() {
    let h = Harness::open();
    let (id, token, _, _) = h.connect().await;
    let uri = format!("/v1/sessions/{id}");
    let r = h.send(empty("DELETE", &uri, Some(&token))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    assert_eq!(r.json(), json!({"session_id": id, "state": "ended"}));
    let again = h.send(empty("DELETE", &uri, Some(&token))).await;
    let p = again.problem(StatusCode::NOT_FOUND, Some("session_ended"));
    assert_eq!(p.detail, "session already ended");
}

#[tokio::test]
async fn delete_peer_location_ends_the_session() {
    let h = Harness::open();
    let (id, token, location, _) = h.connect().await;
    let r = h.send(empty("DELETE", &location, Some(&token))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let peer = location.rsplit('/').next().map(str::to_owned);
    assert!(h.host.calls().contains(&Call::End { session: id.clone(), peer }));
    h.send(empty("DELETE", &location, Some(&token))).await.problem(StatusCode::NOT_FOUND, None);
}

#[tokio::test]
async fn delete_without_or_with_a_foreign_token_is_401() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    let (_, other) = h.create().await;
    let uri = format!("/v1/sessions/{id}");
    h.send(empty("DELETE", &uri, None)).await.problem(StatusCode::UNAUTHORIZED, Some("token_missing"));
    h.send(empty("DELETE", &uri, Some(&other))).await.problem(StatusCode::UNAUTHORIZED, Some("token_wrong_session"));
    assert!(
        !h.host.calls().iter().any(|c| matches!(c, Call::End { .. })),
        "unauthorised DELETE must not reach the host"
    );
}

#[tokio::test]
async fn delete_of_an_unknown_session_is_404() {
    let h = Harness::open();
    let ghost = new_session_id();
    let token = h.tokens.issue(&ghost).expect("issue");
    h.send(empty("DELETE", &format!("/v1/sessions/{ghost}"), Some(token.token.expose())))
        .await
        .problem(StatusCode::NOT_FOUND, Some("unknown_session"));
}

#[tokio::test]
async fn an_expired_token_still_ends_its_session_within_the_grace() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    let old = h.tokens.issue_at(&id, OffsetDateTime::now_utc() - time::Duration::minutes(30)).expect("issue");
    let r = h.send(empty("DELETE", &format!("/v1/sessions/{id}"), Some(old.token.expose()))).await;
    assert_eq!(r.status, StatusCode::OK, "manage mode accepts an expired token: {}", r.text());
    let ancient = h.tokens.issue_at(&id, OffsetDateTime::now_utc() - time::Duration::minutes(75)).expect("issue");
    h.send(empty("GET", &format!("/v1/sessions/{id}"), Some(ancient.token.expose())))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_expired"));
}

#[tokio::test]
async fn an_api_key_can_end_a_session() {
    let h = Harness::with_keys(&[API_KEY]);
    let (id, _) = h.create().await;
    let r = h.send(empty("DELETE", &format!("/v1/sessions/{id}"), Some(API_KEY))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
}

// ---- GET session / transcript ----------------------------------------------------------------

#[tokio::test]
async fn get_session_with_token_or_api_key_returns_the_contract_fields() {
    let h = Harness::with_keys(&[API_KEY]);
    let (id, token) = h.create().await;
    let uri = format!("/v1/sessions/{id}");
    for credential in [token.as_str(), API_KEY] {
        let r = h.send(empty("GET", &uri, Some(credential))).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text());
        let v = r.json();
        assert_eq!(keys(&v), ["character", "created_at", "provider", "session_id", "state"]);
        assert_eq!(v["session_id"], id.as_str());
        assert_eq!(v["state"], "created");
        assert_eq!(v["character"], "aoi");
        assert_eq!(v["provider"], "scripted");
        OffsetDateTime::parse(v["created_at"].as_str().expect("string"), &Rfc3339).expect("created_at is RFC 3339");
    }
    let r = h.send(empty("DELETE", &uri, Some(&token))).await;
    assert_eq!(r.status, StatusCode::OK);
    let v = h.send(empty("GET", &uri, Some(&token))).await.json();
    assert_eq!(v["state"], "ended");
    assert_eq!(v["end_reason"], "client_request");
    OffsetDateTime::parse(v["ended_at"].as_str().expect("ended_at present"), &Rfc3339).expect("ended_at is RFC 3339");
}

#[tokio::test]
async fn get_session_without_credentials_is_401_and_unknown_is_404() {
    let h = Harness::with_keys(&[API_KEY]);
    let (id, _) = h.create().await;
    h.send(empty("GET", &format!("/v1/sessions/{id}"), None))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_missing"));
    h.send(empty("GET", &format!("/v1/sessions/{id}"), Some("not-a-key-nor-token")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_malformed"));
    h.send(empty("GET", &format!("/v1/sessions/{}", new_session_id()), Some(API_KEY)))
        .await
        .problem(StatusCode::NOT_FOUND, Some("unknown_session"));
}

#[tokio::test]
async fn open_mode_does_not_open_other_sessions() {
    let h = Harness::open();
    let (id, _) = h.create().await;
    h.send(empty("GET", &format!("/v1/sessions/{id}/transcript"), None)).await.problem(StatusCode::UNAUTHORIZED, None);
}

#[tokio::test]
async fn transcript_returns_entries_with_the_contract_fields() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    let r = h.send(empty("GET", &format!("/v1/sessions/{id}/transcript"), Some(&token))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text());
    let v = r.json();
    let entries = v.as_array().expect("a JSON array");
    assert_eq!(entries.len(), 2);
    for entry in entries {
        assert_eq!(keys(entry), ["at", "interrupted", "role", "seq", "text"]);
        OffsetDateTime::parse(entry["at"].as_str().expect("string"), &Rfc3339).expect("at is RFC 3339");
    }
    assert_eq!(entries[0]["role"], "user");
    assert_eq!(entries[1]["role"], "agent");
    assert_eq!(entries[1]["interrupted"], true);
    assert_eq!(entries[1]["seq"], 1);
}

// ---- routing ---------------------------------------------------------------------------------

#[tokio::test]
async fn unknown_route_is_404_problem() {
    let h = Harness::open();
    for uri in ["/nope", "/v1/sessions/x/y/z", "/v2/sessions"] {
        h.send(empty("GET", uri, None)).await.problem(StatusCode::NOT_FOUND, Some("no_route"));
    }
}

#[tokio::test]
async fn wrong_method_is_405_problem_with_allow() {
    let h = Harness::open();
    let r = h.send(empty("PUT", "/v1/sessions", None)).await;
    r.problem(StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed"));
    assert_eq!(r.header(header::ALLOW), Some("POST"));
    let r = h.send(empty("POST", "/v1/characters", None)).await;
    r.problem(StatusCode::METHOD_NOT_ALLOWED, None);
}

// ---- single-use offers, idempotency, rate limits, roles, redirects ---------------------------

#[tokio::test]
async fn a_tokens_offer_is_single_use_even_if_the_host_would_accept_again() {
    let h = Harness::open();
    let (id, token, ..) = h.connect().await;
    // A host that would take a second offer (the peer went away, the session is reusable):
    // the token already connected once, so it may not again.
    {
        let mut state = h.host.lock();
        let s = state.sessions.get_mut(&id).expect("session");
        s.peer = None;
        s.info.state = SessionState::Created;
    }
    h.send(offer_request(&id, Some(&token), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("token_replayed"));
    // A new token for the session connects.
    let fresh = h.tokens.issue(&id).expect("issue");
    let r = h.send(offer_request(&id, Some(fresh.token.expose()), &fixture("chrome_offer.sdp"))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text());
    // Sequentially, the contract's 409 still comes first for a connected session.
    h.send(offer_request(&id, Some(fresh.token.expose()), &fixture("chrome_offer.sdp")))
        .await
        .problem(StatusCode::CONFLICT, Some("already_connected"));
}

#[tokio::test]
async fn a_failed_offer_does_not_use_up_the_token() {
    let h = Harness::open();
    let (id, token) = h.create().await;
    // Unparsable SDP is refused before the token is used up.
    h.send(offer_request(&id, Some(&token), "v=0\r\nnot sdp")).await.problem(StatusCode::BAD_REQUEST, None);
    let r = h.send(offer_request(&id, Some(&token), &fixture("chrome_offer.sdp"))).await;
    assert_eq!(r.status, StatusCode::CREATED, "the same token still connects: {}", r.text());
}

fn with_key(mut req: Request<Body>, name: &str, value: &str) -> Request<Body> {
    req.headers_mut().insert(header::HeaderName::from_bytes(name.as_bytes()).unwrap(), value.parse().unwrap());
    req
}

#[tokio::test]
async fn idempotency_key_replays_the_same_201_and_refuses_another_body() {
    let h = Harness::with_keys(&[API_KEY]);
    let first = h
        .send(with_key(json_post("/v1/sessions", r#"{"character":"aoi"}"#, Some(API_KEY)), "Idempotency-Key", "k-1"))
        .await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    let again = h
        .send(with_key(json_post("/v1/sessions", r#"{"character":"aoi"}"#, Some(API_KEY)), "Idempotency-Key", "k-1"))
        .await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.text());
    assert_eq!(again.body, first.body, "the same 201 body, token included");
    assert_eq!(again.header(header::LOCATION), first.header(header::LOCATION));
    assert_eq!(again.header(header::CACHE_CONTROL), Some("no-store"));
    let creates = h.host.calls().iter().filter(|c| matches!(c, Call::Create(_))).count();
    assert_eq!(creates, 1, "the host created one session");

    h.send(with_key(json_post("/v1/sessions", r#"{"character":"kenji"}"#, Some(API_KEY)), "Idempotency-Key", "k-1"))
        .await
        .problem(StatusCode::CONFLICT, Some("idempotency_key_reused"));
    // Another key, or no key: new sessions.
    let other = h
        .send(with_key(json_post("/v1/sessions", r#"{"character":"aoi"}"#, Some(API_KEY)), "Idempotency-Key", "k-2"))
        .await;
    assert_eq!(other.status, StatusCode::CREATED);
    assert_ne!(other.json()["session_id"], first.json()["session_id"]);
    h.send(with_key(json_post("/v1/sessions", "{}", Some(API_KEY)), "Idempotency-Key", ""))
        .await
        .problem(StatusCode::BAD_REQUEST, Some("bad_idempotency_key"));
    // A failed creation does not burn the key.
    let bad = h
        .send(with_key(json_post("/v1/sessions", r#"{"character":"nobody"}"#, Some(API_KEY)), "Idempotency-Key", "k-3"))
        .await;
    assert_eq!(bad.status, StatusCode::NOT_FOUND);
    let bad_again = h
        .send(with_key(json_post("/v1/sessions", r#"{"character":"nobody"}"#, Some(API_KEY)), "Idempotency-Key", "k-3"))
        .await;
    assert_eq!(bad_again.status, StatusCode::NOT_FOUND, "retried, not replayed as 409");
}

#[tokio::test]
async fn session_creation_is_rate_limited_per_key_with_retry_after() {
    let host = FakeHost::new();
    let limits = signaling::Limits { sessions_per_minute_per_key: 2, ..signaling::Limits::default() };
    let state = ApiState::new(host.clone(), TokenIssuer::random())
        .with_api_keys(ApiKeys::new([API_KEY, "second-key-0123456789"]))
        .with_limits(limits);
    let app = router(state);
    let send = |req: Request<Body>| {
        let app = app.clone();
        async move { app.oneshot(req).await.unwrap_or_else(|e| match e {}) }
    };
    for _ in 0..2 {
        assert_eq!(send(json_post("/v1/sessions", "{}", Some(API_KEY))).await.status(), StatusCode::CREATED);
    }
    let limited = send(json_post("/v1/sessions", "{}", Some(API_KEY))).await;
    assert_eq!(limited.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = limited.headers()[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        send(json_post("/v1/sessions", "{}", Some("second-key-0123456789"))).await.status(),
        StatusCode::CREATED,
        "another key has its own budget"
    );
}

#[tokio::test]
async fn user_data_routes_need_an_api_key_and_pass_the_scope() {
    let h = Harness::with_keys(&[API_KEY]);
    h.send(empty("GET", "/v1/users/u1/data", None)).await.problem(StatusCode::UNAUTHORIZED, Some("api_key_missing"));
    let (_, token) = h.create().await;
    h.send(empty("GET", "/v1/users/u1/data", Some(&token)))
        .await
        .problem(StatusCode::UNAUTHORIZED, Some("api_key_invalid"));
    // The fake host holds no user data: the default answer is 404.
    h.send(empty("GET", "/v1/users/u1/data", Some(API_KEY))).await.problem(StatusCode::NOT_FOUND, Some("no_user_data"));
    h.send(empty("DELETE", "/v1/users/u1/data", Some(API_KEY)))
        .await
        .problem(StatusCode::NOT_FOUND, Some("no_user_data"));
    h.send(json_post("/v1/sessions", r#"{"user_id":"has space"}"#, Some(API_KEY)))
        .await
        .problem(StatusCode::BAD_REQUEST, Some("bad_user_id"));
    let r = h.send(json_post("/v1/sessions", r#"{"user_id":"user-42"}"#, Some(API_KEY))).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let created = h.host.calls().into_iter().rev().find_map(|c| match c {
        Call::Create(req) => Some(req),
        _ => None,
    });
    let created = created.expect("create call");
    assert_eq!(created.user_id.as_deref(), Some("user-42"));
    assert_eq!(
        created.api_key_id.as_deref(),
        Some(&signaling::auth::key_digest(API_KEY).iter().take(6).map(|b| format!("{b:02x}")).collect::<String>()[..]),
        "the host learns which key created the session, by its short digest id"
    );
}

struct ElsewhereHost;

#[async_trait]
impl SessionHost for ElsewhereHost {
    fn accepting(&self) -> bool {
        true
    }
    async fn characters(&self) -> Vec<CharacterInfo> {
        vec![]
    }
    async fn create_session(&self, _: CreateSessionRequest) -> Result<CreatedSession, ApiError> {
        Err(ApiError::elsewhere("http://node-b.example:8080"))
    }
    async fn offer(&self, _: &str, _: ValidOffer) -> Result<OfferAnswer, ApiError> {
        Err(ApiError::elsewhere("http://node-b.example:8080"))
    }
    async fn trickle(&self, _: &str, _: &str, _: TrickleRequest) -> Result<TrickleOutcome, ApiError> {
        Err(ApiError::elsewhere("http://node-b.example:8080"))
    }
    async fn end(&self, _: &str, _: Option<&str>) -> Result<(), ApiError> {
        Err(ApiError::elsewhere("http://node-b.example:8080/"))
    }
    async fn session(&self, _: &str) -> Result<SessionInfo, ApiError> {
        Err(ApiError::elsewhere("http://node-b.example:8080"))
    }
    async fn transcript(&self, _: &str) -> Result<Vec<TranscriptEntry>, ApiError> {
        Err(ApiError::elsewhere("http://node-b.example:8080"))
    }
}

#[tokio::test]
async fn a_session_on_another_node_is_a_307_to_the_same_path_there() {
    let tokens = TokenIssuer::random();
    let app = router(ApiState::new(Arc::new(ElsewhereHost), tokens.clone()));
    let id = new_session_id();
    let token = tokens.issue(&id).unwrap().token.expose().to_owned();
    for (method, path) in [
        ("GET", format!("/v1/sessions/{id}")),
        ("GET", format!("/v1/sessions/{id}/transcript")),
        ("DELETE", format!("/v1/sessions/{id}")),
        ("DELETE", format!("/v1/sessions/{id}/peers/{}", new_peer_id())),
    ] {
        let r = app.clone().oneshot(empty(method, &path, Some(&token))).await.unwrap_or_else(|e| match e {});
        assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT, "{method} {path}");
        assert_eq!(r.headers()[header::LOCATION], format!("http://node-b.example:8080{path}"), "{method} {path}");
    }
    let r = app
        .clone()
        .oneshot(offer_request(&id, Some(&token), &fixture("chrome_offer.sdp")))
        .await
        .unwrap_or_else(|e| match e {});
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(r.headers()[header::LOCATION], format!("http://node-b.example:8080/v1/sessions/{id}/offer"));
    let body = axum::body::to_bytes(r.into_body(), usize::MAX).await.unwrap();
    let p: Problem = serde_json::from_slice(&body).expect("problem+json body");
    assert_eq!(p.code.as_deref(), Some("session_elsewhere"));
}

#[tokio::test]
async fn injected_messages_are_checked_before_the_host_sees_them() {
    let h = Harness::with_keys(&[API_KEY]);
    let (id, token) = h.create().await;
    let uri = format!("/v1/sessions/{id}/messages");
    h.send(json_post(&uri, r#"{"text":"hi"}"#, None)).await.problem(StatusCode::UNAUTHORIZED, Some("token_missing"));
    h.send(json_post(&uri, r#"{"txt":"hi"}"#, Some(&token))).await.problem(StatusCode::BAD_REQUEST, Some("bad_json"));
    h.send(json_post(&uri, r#"{"text":"   "}"#, Some(&token)))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("bad_text"));
    let long = format!(r#"{{"text":"{}"}}"#, "a".repeat(5000));
    h.send(json_post(&uri, &long, Some(API_KEY))).await.problem(StatusCode::UNPROCESSABLE_ENTITY, Some("bad_text"));
    // The fake host cannot inject: its default answer.
    h.send(json_post(&uri, r#"{"text":"hi"}"#, Some(&token)))
        .await
        .problem(StatusCode::UNPROCESSABLE_ENTITY, Some("inject_unsupported"));
}
