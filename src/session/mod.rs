//! Sessions: the registry of this node's sessions and the task that runs each live one.
//!
//! A session is created by `POST /v1/sessions` (state `created`), becomes live when its offer is
//! answered (a [`task::SessionTask`] is spawned, `connecting` then `connected`), and ends exactly
//! once with an [`EndReason`] (`ended`). Ended sessions stay in memory for a while and are then
//! evicted; the store ([`crate::store`]) keeps them for good.
//!
//! Persistence: the row is inserted before `POST /v1/sessions` answers; `connected`, every final
//! utterance and `ended` go to the node's [`StoreWriter`] with `try_write` as they happen (the
//! session task never waits on the database). A write refused by a full queue marks the session
//! dirty, and its transcript and end are rewritten (idempotently) once the session has ended.

pub mod speech;
pub(crate) mod task;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use signaling::events::{AgentState, Role};
use tokio::sync::{mpsc, oneshot};
use webrtc::peer_connection::RTCIceCandidateInit;

use crate::config::{Character, Config};
use crate::peer::{Peer, PeerSettings};
use crate::providers::{RealtimeProvider, SessionConfig};
use crate::store::redis::Redis;
use crate::store::writer::{StoreWriter, Write};
use crate::store::{Store, StoredSession, StoredState, StoredTurn};

/// Capacity of the channel from the peer's callbacks to the session task: ~1 s of RTP plus
/// data-channel messages. When full, the callbacks drop RTP and count it.
const PEER_CHANNEL_CAPACITY: usize = 64;
/// Capacity of the control channel (end, trickled candidates).
const CONTROL_CHANNEL_CAPACITY: usize = 32;
/// Ended sessions stay queryable this long.
const ENDED_RETENTION: Duration = Duration::from_secs(3600);
/// At most this many candidates per trickle request.
const MAX_TRICKLE_CANDIDATES: usize = 64;

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndReason {
    /// The client sent DELETE.
    ClientEnded,
    /// The peer connection failed (ICE consent expired or DTLS failed).
    PeerFailed,
    /// The peer closed the connection.
    PeerClosed,
    /// The session reached its maximum duration.
    MaxDuration,
    /// No offer arrived in time.
    ConnectTimeout,
    /// The provider session ended and could not continue.
    ProviderClosed,
    /// The server shut down.
    Shutdown,
    /// An operator or another node ended it (admin API, cross-node control).
    Admin,
    /// Nobody spoke or wrote for `session.idle_timeout_secs`.
    IdleTimeout,
}

impl EndReason {
    /// The `end_reason` of the API (`GET /v1/sessions/{id}`, `session.ended`).
    pub fn api(self) -> signaling::host::EndReason {
        use signaling::host::EndReason as Api;
        match self {
            EndReason::ClientEnded => Api::ClientRequest,
            EndReason::PeerFailed | EndReason::PeerClosed => Api::PeerDisconnected,
            EndReason::MaxDuration => Api::MaxDuration,
            EndReason::ConnectTimeout => Api::NeverConnected,
            EndReason::ProviderClosed => Api::ProviderError,
            EndReason::Shutdown => Api::ServerShutdown,
            EndReason::Admin => Api::ClientRequest,
            EndReason::IdleTimeout => Api::IdleTimeout,
        }
    }

    /// The API's `end_reason` string.
    pub fn as_str(self) -> String {
        serde_json::to_value(self.api()).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
    }
}

/// Commands to a live session task.
#[derive(Debug)]
pub(crate) enum Control {
    /// End the session.
    End(EndReason),
    /// A remote ICE candidate from PATCH.
    Trickle(RTCIceCandidateInit),
    /// A user text turn from outside the client (admin API, another node).
    Inject(String),
    /// An ICE restart from PATCH `If-Match: *`; the reply carries the server's sdpfrag.
    IceRestart(crate::peer::IceRestart, oneshot::Sender<Result<String, crate::peer::PeerError>>),
}

/// The lifecycle phase of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Created, waiting for the offer.
    Created,
    /// Offer answered, ICE/DTLS in progress.
    Connecting,
    /// Media flowing.
    Connected,
    /// Over.
    Ended,
}

impl Phase {
    /// The `state` string of `GET /v1/sessions/{id}`.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Created => "created",
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Ended => "ended",
        }
    }
}

/// One stored turn of the transcript.
#[derive(Debug, Clone)]
pub struct Turn {
    /// Sequence number within the session, from 1.
    pub seq: u64,
    /// Who spoke.
    pub role: Role,
    /// What was said (for an interrupted agent turn: what was heard).
    pub text: String,
    /// Whether barge-in cut the turn.
    pub interrupted: bool,
    /// When it was stored.
    pub at: SystemTime,
}

/// What the manager and the session task share about one session.
#[derive(Debug)]
pub struct SessionShared {
    /// Session id.
    pub id: String,
    /// Character id.
    pub character: String,
    /// Provider name.
    pub provider: String,
    /// Creation time.
    pub created_at: SystemTime,
    /// The application's user id, if given at creation.
    pub user_id: Option<String>,
    /// Short id of the API key that created it, if any.
    pub api_key_id: Option<String>,
    created_instant: Instant,
    state: Mutex<SharedState>,
    writer: StoreWriter,
    redis: Option<Redis>,
    /// A store write was refused by a full queue: rewrite everything once ended.
    dirty: AtomicBool,
    /// Sequence numbers of turns, from 1.
    next_seq: AtomicU64,
}

#[derive(Debug)]
struct SharedState {
    phase: Phase,
    agent_state: AgentState,
    ended_at: Option<SystemTime>,
    ended_instant: Option<Instant>,
    end_reason: Option<EndReason>,
    turns: Vec<Turn>,
    /// The live task's handles, while live.
    live: Option<LiveHandle>,
}

#[derive(Debug)]
struct LiveHandle {
    peer_id: String,
    etag: String,
    control: mpsc::Sender<Control>,
    done: Option<oneshot::Receiver<()>>,
}

/// A snapshot of a session for the API.
#[derive(Debug, Clone)]
pub struct SessionSnapshot {
    /// Session id.
    pub id: String,
    /// Lifecycle phase.
    pub phase: Phase,
    /// The agent's conversational state.
    pub agent_state: AgentState,
    /// Character id.
    pub character: String,
    /// Provider name.
    pub provider: String,
    /// Creation time.
    pub created_at: SystemTime,
    /// End time.
    pub ended_at: Option<SystemTime>,
    /// Why it ended.
    pub end_reason: Option<EndReason>,
}

impl SessionShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        // Only plain data is behind this lock; a panic while holding it cannot break invariants
        // that matter more than keeping the node up.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_agent_state(&self, s: AgentState) {
        self.lock().agent_state = s;
    }

    pub(crate) fn mark_connected(&self) {
        let mut st = self.lock();
        if st.phase == Phase::Connecting {
            st.phase = Phase::Connected;
            drop(st);
            self.queue(Write::Connected { id: self.id.clone(), at: SystemTime::now() });
        }
    }

    /// Queue a store write without waiting; a refusal marks the session for a rewrite at its end.
    fn queue(&self, w: Write) {
        if !self.writer.try_write(w) && !self.dirty.swap(true, Ordering::Relaxed) {
            tracing::warn!(session_id = %self.id, "store queue full; this session is rewritten when it ends");
        }
    }

    /// Record a final utterance (empty text is not recorded) and queue it for the store.
    pub(crate) fn push_turn(&self, role: Role, text: &str, interrupted: bool) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        let turn = {
            let mut st = self.lock();
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let turn = Turn { seq, role, text: text.to_owned(), interrupted, at: SystemTime::now() };
            st.turns.push(turn.clone());
            turn
        };
        self.queue(Write::Turn(self.stored_turn(&turn)));
    }

    fn stored_turn(&self, t: &Turn) -> StoredTurn {
        StoredTurn {
            session_id: self.id.clone(),
            seq: t.seq,
            role: t.role,
            text: t.text.clone(),
            interrupted: t.interrupted,
            started_at: None,
            ended_at: t.at,
            tool_calls: None,
        }
    }

    fn end(&self, reason: EndReason) -> bool {
        let at = SystemTime::now();
        {
            let mut st = self.lock();
            if st.phase == Phase::Ended {
                return false;
            }
            st.phase = Phase::Ended;
            st.end_reason = Some(reason);
            st.ended_at = Some(at);
            st.ended_instant = Some(Instant::now());
            st.live = None;
        }
        self.queue(Write::Ended { id: self.id.clone(), at, reason: reason.as_str() });
        if let Some(redis) = self.redis.clone() {
            // Off this (possibly audio) path; an entry left behind expires with its TTL.
            let id = self.id.clone();
            tokio::spawn(async move {
                if let Err(e) = redis.unregister(&id).await {
                    tracing::warn!(session_id = %id, error = %e, "registry entry not removed (it expires)");
                }
            });
        }
        crate::telemetry::add_with(crate::telemetry::SESSIONS_ENDED, "reason", reason.as_str(), 1);
        true
    }

    /// After the end: if any write was refused by a full queue, rewrite the whole record
    /// (waiting for room; turn writes are idempotent).
    pub(crate) async fn persist_after_end(&self) {
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let (turns, end) = {
            let st = self.lock();
            (st.turns.clone(), st.end_reason.zip(st.ended_at))
        };
        for t in &turns {
            self.writer.write(Write::Turn(self.stored_turn(t))).await;
        }
        if let Some((reason, at)) = end {
            self.writer.write(Write::Ended { id: self.id.clone(), at, reason: reason.as_str() }).await;
        }
        tracing::info!(session_id = %self.id, turns = turns.len(), "session rewritten to the store after queue overflow");
    }

    /// A snapshot for the API.
    pub fn snapshot(&self) -> SessionSnapshot {
        let st = self.lock();
        SessionSnapshot {
            id: self.id.clone(),
            phase: st.phase,
            agent_state: st.agent_state,
            character: self.character.clone(),
            provider: self.provider.clone(),
            created_at: self.created_at,
            ended_at: st.ended_at,
            end_reason: st.end_reason,
        }
    }

    /// The stored transcript.
    pub fn turns(&self) -> Vec<Turn> {
        self.lock().turns.clone()
    }
}

/// Errors of session operations, mapped to HTTP statuses by the API layer.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No such session.
    #[error("unknown session")]
    NotFound,
    /// The session has ended.
    #[error("session already ended")]
    Ended,
    /// The session is already connected (or connecting).
    #[error("session already connected")]
    AlreadyConnected,
    /// No such character.
    #[error("unknown character `{0}`")]
    UnknownCharacter(String),
    /// No such provider.
    #[error("unknown provider `{0}`")]
    UnknownProvider(String),
    /// The store refused the write that must precede the answer.
    #[error("storage unavailable: {0}")]
    Storage(String),
    /// The node is draining.
    #[error("server is shutting down")]
    Draining,
    /// The node is at its session limit.
    #[error("server is at its session limit")]
    AtCapacity,
    /// The WebRTC stack rejected the offer.
    #[error("offer rejected: {0}")]
    BadOffer(String),
    /// The provider could not be reached.
    #[error("model provider unavailable: {0}")]
    ProviderUnavailable(String),
    /// Local failure.
    #[error("internal error: {0}")]
    Internal(String),
    /// The peer id or ETag does not match.
    #[error("unknown peer")]
    UnknownPeer,
    /// If-Match does not match the current ETag.
    #[error("stale ETag")]
    StaleEtag,
    /// `If-Match: *` (an ICE restart) without new ICE credentials.
    #[error("If-Match * without new ICE credentials")]
    IceRestartUnsupported,
}

/// Media pipeline settings for new sessions, derived from the configuration.
#[derive(Debug, Clone)]
struct MediaDefaults {
    vad: media::VadConfig,
    encoder: media::EncoderConfig,
}

/// This node's sessions.
pub struct SessionManager {
    config: Arc<Config>,
    characters: Vec<Character>,
    providers: HashMap<String, Arc<dyn RealtimeProvider>>,
    default_provider: String,
    sessions: Mutex<HashMap<String, Arc<SessionShared>>>,
    draining: AtomicBool,
    peer_settings: PeerSettings,
    media: MediaDefaults,
    /// The tools every character's model may call (built-ins for now).
    tools: Arc<crate::providers::tools::ToolRegistry>,
    store: Arc<dyn Store>,
    writer: StoreWriter,
    node_id: String,
    advertise_url: String,
    redis: Option<Redis>,
}

/// Where a node keeps what outlives its sessions' tasks.
#[derive(Clone)]
pub struct Backends {
    /// Durable store.
    pub store: Arc<dyn Store>,
    /// The node's writer to it.
    pub writer: StoreWriter,
    /// This node's id in the store.
    pub node_id: String,
    /// The URL other nodes redirect to for this node's sessions.
    pub advertise_url: String,
    /// Redis (cluster state), when configured.
    pub redis: Option<Redis>,
    /// The one media UDP socket every session shares (`KOTODAMA_UDP_PORT`), when configured.
    pub udp_mux: Option<Arc<crate::udp_mux::UdpMux>>,
}

/// Who asks for a new session, and for whom.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Character id (`None`: the first configured).
    pub character: Option<String>,
    /// Provider name (`None`: the configured default).
    pub provider: Option<String>,
    /// The application's user id (privacy export/delete).
    pub user_id: Option<String>,
    /// Short id of the creating API key.
    pub api_key_id: Option<String>,
}

impl SessionManager {
    /// A manager for `config` with these providers (by name), persisting through `backends`.
    pub fn new(config: Arc<Config>, providers: Vec<Arc<dyn RealtimeProvider>>, backends: Backends) -> Arc<Self> {
        let providers: HashMap<String, Arc<dyn RealtimeProvider>> =
            providers.into_iter().map(|p| (p.name().to_owned(), p)).collect();
        let default_provider = config.provider_name().to_owned();
        let peer_settings = PeerSettings {
            bind_ip: config.bind.ip(),
            public_ip: config.advertised_ip(),
            peer_timeout: Duration::from_secs(config.session.peer_timeout_secs),
            // Validated at start: a bad range never reaches here.
            ports: config.udp_port_range().ok().flatten().map(|(a, b)| Arc::new(crate::peer::PortRange::new(a, b))),
            mux: backends.udp_mux.clone(),
        };
        let m = &config.media;
        let media = MediaDefaults {
            vad: media::VadConfig {
                mode: match m.vad_mode {
                    0 => media::VadMode::Quality,
                    1 => media::VadMode::LowBitrate,
                    2 => media::VadMode::Aggressive,
                    _ => media::VadMode::VeryAggressive,
                },
                min_speech: Duration::from_millis(m.min_speech_ms),
                min_silence: Duration::from_millis(m.min_silence_ms),
                ..Default::default()
            },
            encoder: media::EncoderConfig {
                bitrate_bps: m.opus_bitrate,
                complexity: m.opus_complexity,
                ..Default::default()
            },
        };
        Arc::new(Self {
            characters: config.characters(),
            config,
            providers,
            default_provider,
            sessions: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            peer_settings,
            media,
            tools: Arc::new(crate::providers::tools::ToolRegistry::builtin()),
            store: backends.store,
            writer: backends.writer,
            node_id: backends.node_id,
            advertise_url: backends.advertise_url,
            redis: backends.redis,
        })
    }

    /// Redis, when configured.
    pub fn redis(&self) -> Option<&Redis> {
        self.redis.as_ref()
    }

    /// The URL other nodes send this node's clients to.
    pub fn advertise_url(&self) -> &str {
        &self.advertise_url
    }

    /// Remove this node's sessions from the Redis registry (at the end of a drain: the spawned
    /// removals of ended sessions may not run before the process exits).
    pub async fn unregister_all(&self) {
        let Some(redis) = &self.redis else { return };
        let ids: Vec<String> = self.map().keys().cloned().collect();
        for id in ids {
            if let Err(e) = redis.unregister(&id).await {
                tracing::warn!(session_id = %id, error = %e, "registry entry not removed (it expires)");
            }
        }
    }

    /// Drop an ended session from memory (after a privacy delete).
    pub fn forget(&self, id: &str) {
        self.map().remove(id);
    }

    /// Hand a user text turn to live session `id` (admin API, cross-node control).
    pub fn inject(&self, id: &str, text: String) -> Result<(), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        let st = shared.lock();
        if st.phase == Phase::Ended {
            return Err(SessionError::Ended);
        }
        let live = st.live.as_ref().ok_or(SessionError::NotFound)?;
        live.control.try_send(Control::Inject(text)).map_err(|_| SessionError::Internal("session busy".into()))
    }

    /// The durable store.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The store writer.
    pub fn writer(&self) -> &StoreWriter {
        &self.writer
    }

    /// This node's id (`sessions.node_id`).
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Ids of the sessions not yet ended.
    pub fn live_ids(&self) -> Vec<String> {
        self.map().values().filter(|s| s.lock().phase != Phase::Ended).map(|s| s.id.clone()).collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SessionShared>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The configured characters.
    pub fn characters(&self) -> &[Character] {
        &self.characters
    }

    /// Whether new sessions are accepted.
    pub fn accepting(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }

    /// Sessions not yet ended.
    pub fn live_count(&self) -> usize {
        self.map().values().filter(|s| s.lock().phase != Phase::Ended).count()
    }

    /// Look a session up.
    pub fn get(&self, id: &str) -> Option<Arc<SessionShared>> {
        self.map().get(id).cloned()
    }

    /// Create a session (state `created`), stored before it is returned.
    pub async fn create(&self, options: CreateOptions) -> Result<Arc<SessionShared>, SessionError> {
        let (character, provider) = (options.character.as_deref(), options.provider.as_deref());
        if !self.accepting() {
            return Err(SessionError::Draining);
        }
        let character = match character {
            Some(id) => self
                .characters
                .iter()
                .find(|c| c.id == id)
                .ok_or_else(|| SessionError::UnknownCharacter(id.to_owned()))?,
            None => self.characters.first().ok_or_else(|| SessionError::UnknownCharacter(String::new()))?,
        };
        let provider = provider
            .or(character.provider.as_deref())
            .or(character.providers.first().map(String::as_str))
            .unwrap_or(&self.default_provider);
        if !self.providers.contains_key(provider) {
            return Err(SessionError::UnknownProvider(provider.to_owned()));
        }
        self.sweep();
        if self.live_count() >= self.config.session.max_sessions {
            return Err(SessionError::AtCapacity);
        }
        let shared = Arc::new(SessionShared {
            id: signaling::id::new_session_id(),
            character: character.id.clone(),
            provider: provider.to_owned(),
            created_at: SystemTime::now(),
            user_id: options.user_id.clone(),
            api_key_id: options.api_key_id.clone(),
            created_instant: Instant::now(),
            writer: self.writer.clone(),
            redis: self.redis.clone(),
            dirty: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
            state: Mutex::new(SharedState {
                phase: Phase::Created,
                agent_state: AgentState::Initializing,
                ended_at: None,
                ended_instant: None,
                end_reason: None,
                turns: Vec::new(),
                live: None,
            }),
        });
        let record = StoredSession {
            id: shared.id.clone(),
            character: shared.character.clone(),
            provider: shared.provider.clone(),
            user_id: shared.user_id.clone(),
            api_key_id: shared.api_key_id.clone(),
            node_id: self.node_id.clone(),
            state: StoredState::Created,
            end_reason: None,
            created_at: shared.created_at,
            connected_at: None,
            ended_at: None,
        };
        self.store.create_session(&record).await.map_err(|e| SessionError::Storage(e.to_string()))?;
        if let Some(redis) = &self.redis {
            redis.register(&shared.id, &self.advertise_url).await.map_err(|e| SessionError::Storage(e.to_string()))?;
        }
        self.map().insert(shared.id.clone(), Arc::clone(&shared));
        crate::telemetry::add(crate::telemetry::SESSIONS_CREATED, 1);
        Ok(shared)
    }

    /// Expire sessions that never connected and forget long-ended ones.
    pub fn sweep(&self) {
        let connect_timeout = Duration::from_secs(self.config.session.connect_timeout_secs);
        let mut map = self.map();
        map.retain(|_, s| {
            let mut st = s.lock();
            if st.phase == Phase::Created && s.created_instant.elapsed() > connect_timeout {
                drop(st);
                s.end(EndReason::ConnectTimeout);
                return true;
            }
            if st.phase == Phase::Ended {
                let old = st.ended_instant.is_some_and(|t| t.elapsed() > ENDED_RETENTION);
                st.live = None;
                return !old;
            }
            true
        });
    }

    /// Answer the offer of session `id`: starts the live session task.
    /// Returns (answer SDP, peer id, ETag).
    pub async fn offer(
        self: &Arc<Self>,
        id: &str,
        offer_sdp: String,
    ) -> Result<(String, String, String), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        {
            let mut st = shared.lock();
            match st.phase {
                Phase::Created => st.phase = Phase::Connecting,
                Phase::Ended => return Err(SessionError::Ended),
                Phase::Connecting | Phase::Connected => return Err(SessionError::AlreadyConnected),
            }
        }
        match self.start_live(&shared, offer_sdp).await {
            Ok(v) => Ok(v),
            Err(e) => {
                // Let the client try again with a corrected offer.
                let mut st = shared.lock();
                if st.phase == Phase::Connecting && st.live.is_none() {
                    st.phase = Phase::Created;
                }
                Err(e)
            }
        }
    }

    async fn start_live(
        self: &Arc<Self>,
        shared: &Arc<SessionShared>,
        offer_sdp: String,
    ) -> Result<(String, String, String), SessionError> {
        let character = self
            .characters
            .iter()
            .find(|c| c.id == shared.character)
            .cloned()
            .ok_or_else(|| SessionError::UnknownCharacter(shared.character.clone()))?;
        // The session's provider first, then the character's other providers (failover), each once;
        // providers this node does not offer (e.g. openai without a key) are skipped.
        let mut chain: Vec<Arc<dyn RealtimeProvider>> = Vec::new();
        for name in std::iter::once(&shared.provider).chain(character.providers.iter()) {
            if let Some(p) = self.providers.get(name)
                && !chain.iter().any(|c| c.name() == name)
            {
                chain.push(Arc::clone(p));
            }
        }
        if chain.is_empty() {
            return Err(SessionError::UnknownProvider(shared.provider.clone()));
        }
        let provider = crate::providers::resilient::ResilientProvider::new(chain, self.config.resilience.policy())
            .map_err(|e| SessionError::Internal(e.to_string()))?;
        let input_rate_hz = provider.input_format().rate_hz;
        let uplink = media::Uplink::new(media::UplinkConfig {
            output_rate_hz: input_rate_hz,
            vad: self.media.vad,
            ..Default::default()
        })
        .map_err(|e| SessionError::Internal(e.to_string()))?;
        let playout = media::Playout::new(media::PlayoutConfig {
            encoder: self.media.encoder,
            // tokio timers wake up to ~1 ms late; a 2 ms tolerance keeps the 20 ms grid at real time
            // instead of letting each late wake-up push every later frame back (measured slip ~6%).
            jitter_tolerance: Duration::from_millis(2),
            ..Default::default()
        })
        .map_err(|e| SessionError::Internal(e.to_string()))?;

        let (peer_tx, peer_rx) = mpsc::channel(PEER_CHANNEL_CAPACITY);
        let cfg = SessionConfig {
            session_id: shared.id.clone(),
            character_id: character.id.clone(),
            character_name: character.name.clone(),
            instructions: character.persona.clone(),
            voice: character.voice.clone(),
            language: character.language.clone(),
            history: Vec::new(),
            tools: match &character.tools {
                Some(names) => Arc::new(self.tools.only(names)),
                None => Arc::clone(&self.tools),
            },
            // Validated at start (config::validate): an invalid name never reaches here.
            viseme_overrides: crate::providers::cascade::viseme_overrides(&character.visemes).unwrap_or_default(),
        };
        // Open the model session and the peer concurrently: the client waits for both.
        let (provider_session, answered) =
            tokio::join!(provider.connect(cfg), Peer::answer(&self.peer_settings, offer_sdp, peer_tx));
        let (peer, answer) = answered.map_err(|e| match e {
            crate::peer::PeerError::Offer(m) => SessionError::BadOffer(m),
            other => SessionError::Internal(other.to_string()),
        })?;
        let result = if provider_session.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::telemetry::PROVIDER_CONNECTS, "provider" => provider.name().to_owned(), "result" => result)
            .increment(1);
        let provider_session = match provider_session {
            Ok(p) => p,
            Err(e) => {
                peer.close().await;
                return Err(SessionError::ProviderUnavailable(e.to_string()));
            }
        };

        let (control_tx, control_rx) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
        let (done_tx, done_rx) = oneshot::channel();
        let peer_id = signaling::id::new_peer_id();
        let etag = format!("\"{}\"", signaling::id::new_id("e"));
        let start = Instant::now();
        let task = task::SessionTask {
            shared: Arc::clone(shared),
            start,
            deadline: shared.created_instant + self.config.session.max_duration(),
            idle_timeout: (self.config.session.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(self.config.session.idle_timeout_secs)),
            peer,
            peer_rx,
            control_rx,
            provider: provider_session,
            provider_name: provider.name().to_owned(),
            caps: provider.capabilities(),
            uplink,
            playout,
            barge_in: media::BargeIn::default(),
            speech: speech::AgentSpeech::new(true),
            pacing_hist: metrics::histogram!(crate::telemetry::PACING_LATENESS),
            uplink_hist: metrics::histogram!(crate::telemetry::UPLINK_LATENCY),
            greeting: character.greeting.clone(),
        };
        {
            let mut st = shared.lock();
            if st.phase == Phase::Ended {
                // Ended (DELETE or shutdown) while we were connecting.
                drop(st);
                let _ = control_tx.try_send(Control::End(EndReason::ClientEnded));
                tokio::spawn(task.run());
                return Err(SessionError::Ended);
            }
            st.live = Some(LiveHandle {
                peer_id: peer_id.clone(),
                etag: etag.clone(),
                control: control_tx,
                done: Some(done_rx),
            });
        }
        let shared2 = Arc::clone(shared);
        // Every log line of this session carries its id, a W3C-style trace id and the turn number.
        let trace_id = format!("{:032x}", rand::random::<u128>());
        let span =
            tracing::info_span!("session", session_id = %shared.id, trace_id = %trace_id, turn = tracing::field::Empty);
        tokio::spawn(tracing::Instrument::instrument(
            async move {
                let reason = task.run().await;
                shared2.end(reason);
                shared2.persist_after_end().await;
                let _ = done_tx.send(());
            },
            span,
        ));
        tracing::info!(session_id = %shared.id, peer_id = %peer_id, provider = %shared.provider, "session live");
        Ok((answer, peer_id, etag))
    }

    /// End session `id` (optionally only if `peer_id` matches) and wait, bounded, until its task
    /// has released everything.
    pub async fn end(&self, id: &str, peer_id: Option<&str>, reason: EndReason) -> Result<(), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        let (control, done) = {
            let mut st = shared.lock();
            if st.phase == Phase::Ended {
                return Err(SessionError::Ended);
            }
            match st.live.as_mut() {
                Some(live) => {
                    if peer_id.is_some_and(|p| p != live.peer_id) {
                        return Err(SessionError::UnknownPeer);
                    }
                    (Some(live.control.clone()), live.done.take())
                }
                None => (None, None),
            }
        };
        match control {
            Some(control) => {
                let _ = control.send(Control::End(reason)).await;
                if let Some(done) = done {
                    let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
                }
                // The task marks the end itself; make sure even if it was stuck.
                shared.end(reason);
            }
            None => {
                if peer_id.is_some() {
                    return Err(SessionError::UnknownPeer);
                }
                shared.end(reason);
            }
        }
        Ok(())
    }

    /// Hand trickled candidates to a live session. `if_match` is the client's ETag.
    pub async fn trickle(
        &self,
        id: &str,
        peer_id: &str,
        if_match: &str,
        candidates: Vec<RTCIceCandidateInit>,
    ) -> Result<(), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        let control = {
            let st = shared.lock();
            if st.phase == Phase::Ended {
                return Err(SessionError::NotFound);
            }
            let live = st.live.as_ref().ok_or(SessionError::UnknownPeer)?;
            if live.peer_id != peer_id {
                return Err(SessionError::UnknownPeer);
            }
            if if_match.trim() == "*" {
                return Err(SessionError::IceRestartUnsupported);
            }
            if !etag_matches(if_match, &live.etag) {
                return Err(SessionError::StaleEtag);
            }
            live.control.clone()
        };
        for c in candidates.into_iter().take(MAX_TRICKLE_CANDIDATES) {
            if control.try_send(Control::Trickle(c)).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Restart ICE on a live session's peer (PATCH with `If-Match: *` and new credentials):
    /// returns the server's sdpfrag and the peer's new ETag. The session task, its provider
    /// session and its transcript continue. Errors: 404s as for [`Self::trickle`],
    /// [`SessionError::BadOffer`] when the stack refuses the restart.
    pub async fn restart_ice(
        &self,
        id: &str,
        peer_id: &str,
        restart: crate::peer::IceRestart,
    ) -> Result<(String, String), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        let control = {
            let st = shared.lock();
            let live = st.live.as_ref().filter(|_| st.phase != Phase::Ended).ok_or(SessionError::UnknownPeer)?;
            if live.peer_id != peer_id {
                return Err(SessionError::UnknownPeer);
            }
            live.control.clone()
        };
        let (tx, rx) = oneshot::channel();
        let busy = || SessionError::Internal("session busy".into());
        control.send_timeout(Control::IceRestart(restart, tx), Duration::from_secs(5)).await.map_err(|_| busy())?;
        let sdpfrag = rx.await.map_err(|_| SessionError::Ended)?.map_err(|e| SessionError::BadOffer(e.to_string()))?;
        let etag = format!("\"{}\"", signaling::id::new_id("e"));
        if let Some(live) = shared.lock().live.as_mut() {
            live.etag = etag.clone();
        }
        Ok((sdpfrag, etag))
    }

    /// Start draining: refuse new sessions, end live ones, wait up to `grace` for them.
    pub async fn drain(&self, grace: Duration) {
        self.draining.store(true, Ordering::SeqCst);
        let ids: Vec<String> = self.map().keys().cloned().collect();
        let ends = ids.iter().map(|id| self.end(id, None, EndReason::Shutdown));
        let _ = tokio::time::timeout(grace, futures::future::join_all(ends)).await;
    }
}

/// `If-Match` may list several ETags, weak or strong.
fn etag_matches(if_match: &str, etag: &str) -> bool {
    if_match.split(',').map(|t| t.trim().trim_start_matches("W/")).any(|t| t == etag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sql::SqlStore;
    use crate::store::{StoreError, StoredCharacter, UserData};

    /// The real SQLite store behind a gate that holds every turn write until opened: a
    /// database that has stalled.
    struct Stalled {
        inner: SqlStore,
        open: tokio::sync::watch::Receiver<bool>,
    }

    impl Stalled {
        async fn wait(&self) {
            let mut open = self.open.clone();
            let _ = open.wait_for(|o| *o).await;
        }
    }

    #[async_trait::async_trait]
    impl Store for Stalled {
        fn backend(&self) -> &'static str {
            "stalled"
        }
        async fn upsert_characters(&self, c: &[StoredCharacter]) -> Result<(), StoreError> {
            self.inner.upsert_characters(c).await
        }
        async fn create_session(&self, s: &StoredSession) -> Result<(), StoreError> {
            self.inner.create_session(s).await
        }
        async fn mark_connected(&self, id: &str, at: SystemTime) -> Result<(), StoreError> {
            self.inner.mark_connected(id, at).await
        }
        async fn mark_ended(&self, id: &str, at: SystemTime, reason: &str) -> Result<(), StoreError> {
            self.inner.mark_ended(id, at, reason).await
        }
        async fn put_turn(&self, t: &StoredTurn) -> Result<(), StoreError> {
            self.wait().await;
            self.inner.put_turn(t).await
        }
        async fn session(&self, id: &str) -> Result<Option<StoredSession>, StoreError> {
            self.inner.session(id).await
        }
        async fn turns(&self, id: &str) -> Result<Vec<StoredTurn>, StoreError> {
            self.inner.turns(id).await
        }
        async fn end_orphans(&self, n: &str, at: SystemTime, r: &str) -> Result<Vec<String>, StoreError> {
            self.inner.end_orphans(n, at, r).await
        }
        async fn user_data(&self, u: &str, k: Option<&str>) -> Result<UserData, StoreError> {
            self.inner.user_data(u, k).await
        }
        async fn delete_user(&self, u: &str, k: Option<&str>) -> Result<Vec<String>, StoreError> {
            self.inner.delete_user(u, k).await
        }
    }

    #[tokio::test]
    async fn a_full_store_queue_never_blocks_and_loses_nothing_once_the_session_ends() {
        let dir =
            std::env::temp_dir().join(format!("kotodama-overflow-{}-{}", std::process::id(), rand::random::<u64>()));
        let inner = SqlStore::connect(&format!("sqlite://{}/k.db", dir.display())).await.expect("sqlite");
        let (open_tx, open_rx) = tokio::sync::watch::channel(false);
        let store: Arc<dyn Store> = Arc::new(Stalled { inner: inner.clone(), open: open_rx });
        let (writer, _task) = StoreWriter::spawn_with_capacity(Arc::clone(&store), None, 2);
        let now = SystemTime::now();
        let record = StoredSession {
            id: "sess_overflow".into(),
            character: "aiko".into(),
            provider: "scripted".into(),
            user_id: None,
            api_key_id: None,
            node_id: "n".into(),
            state: StoredState::Created,
            end_reason: None,
            created_at: now,
            connected_at: None,
            ended_at: None,
        };
        store.create_session(&record).await.unwrap();
        let shared = SessionShared {
            id: record.id.clone(),
            character: "aiko".into(),
            provider: "scripted".into(),
            created_at: now,
            user_id: None,
            api_key_id: None,
            created_instant: Instant::now(),
            state: Mutex::new(SharedState {
                phase: Phase::Connecting,
                agent_state: AgentState::Listening,
                ended_at: None,
                ended_instant: None,
                end_reason: None,
                turns: Vec::new(),
                live: None,
            }),
            writer: writer.clone(),
            redis: None,
            dirty: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
        };
        // The database stalls: the first write waits in the writer, two fill the queue, the
        // rest are refused at once (push_turn returns; the caller never waits).
        for i in 0..8 {
            shared.push_turn(if i % 2 == 0 { Role::User } else { Role::Agent }, &format!("turn {i}"), false);
        }
        assert!(writer.stats().dropped.load(Ordering::Relaxed) >= 5, "{:?}", writer.stats());
        assert!(shared.dirty.load(Ordering::Relaxed), "the session knows it must be rewritten");
        assert!(shared.end(EndReason::ClientEnded));
        // The database recovers; the end of the session rewrites everything it holds.
        open_tx.send(true).unwrap();
        shared.persist_after_end().await;
        writer.flush().await;
        let turns = inner.turns("sess_overflow").await.unwrap();
        let got: Vec<(u64, String)> = turns.into_iter().map(|t| (t.seq, t.text)).collect();
        let want: Vec<(u64, String)> = (0..8).map(|i| (i + 1, format!("turn {i}"))).collect();
        assert_eq!(got, want, "every turn stored once, in order");
        let stored = inner.session("sess_overflow").await.unwrap().unwrap();
        assert_eq!((stored.state, stored.end_reason.as_deref()), (StoredState::Ended, Some("client_request")));
        inner.close().await;
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn if_match_accepts_lists_and_weak_tags() {
        assert!(etag_matches("\"a\"", "\"a\""));
        assert!(etag_matches("\"x\", W/\"a\"", "\"a\""));
        assert!(!etag_matches("\"b\"", "\"a\""));
    }
}
