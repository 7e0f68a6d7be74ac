//! Sessions: the registry of this node's sessions and the task that runs each live one.
//!
//! A session is created by `POST /v1/sessions` (state `created`), becomes live when its offer is
//! answered (a [`task::SessionTask`] is spawned, `connecting` then `connected`), and ends exactly
//! once with an [`EndReason`] (`ended`). Ended sessions stay in memory for a while and are then
//! evicted; the store ([`crate::store`]) keeps them for good.
//!
//! Persistence: the row is inserted before `POST /v1/sessions` answers; `connected`, every final
//! utterance and `ended` go to the node's [`StoreWriter`] with `submit` as they happen (through
//! its fsync'd journal; the session task never waits on the database). A final transcript is
//! held back from the client until its turn is durable (the task's `DurableGate`). A write
//! refused by both the journal and the queue marks the session dirty, and its transcript and
//! end are rewritten (idempotently) once the session has ended.
//!
//! ## Layers of a live session
//!
//! ```text
//!   client ── ClientLink (transport + EventCodec dialect) ──┐
//!                                                          task (select!, IO only) ── ProviderSession
//!   registry (SessionManager) ── SessionBuilder ──> builds ┘      │
//!                                                          Conversation (sans-IO: every decision)
//! ```
//!
//! - [`conversation::Conversation`] holds every decision (turn-taking, barge-in through
//!   `media::BargeIn`, agent state, echo suppression, idle, greeting, history, heard text) and the
//!   media parts; it is driven as `handle_input(now, input)` / `poll_output()` and tested on
//!   virtual time.
//! - [`task::SessionTask`] `select!`s over the link, the provider, control and the core's timeout,
//!   and carries out the core's outputs. It is generic over its link.
//! - [`link::ClientLink`] is "a connected client": audio in (Opus with RTP timestamps, or PCM
//!   framed by the link), paced audio out, events in and out through an [`link::EventCodec`] (one
//!   per dialect), state. The links present:
//!   - [`webrtc_link::WebRtcLink`]: one WebRTC peer (`POST /v1/sessions/{id}/offer`), the first;
//!   - [`ws_link::WsLink`]: a WebSocket (`GET /v1/sessions/{id}/ws`, Opus or PCM16 frames), also
//!     in N.E.K.O.'s mode (`/ws/{character}`);
//!   - [`whip_link::WhipLink`]: a WHIP publisher's microphone in, WHEP players' audio and events
//!     out (RFC 9725).
//!
//!   The dialects (codecs) present: api-v1 ([`link::ApiV1`], `docs/api-v1.md`), N.E.K.O.
//!   ([`neko::NekoCodec`]), oai-events ([`oai_events::OaiEventsCodec`]: OpenAI Realtime's events
//!   for the Agents SDK, `POST /v1/realtime/calls`) and RTVI ([`rtvi::RtviCodec`]: Pipecat's
//!   client, `POST /api/offer`).
//! - [`builder::SessionBuilder`] assembles provider chain, media parts, core, link and task; the
//!   manager is only the registry (map, phases, end, sweep, drain).
//! - The conversation history has one owner, the core: it records each turn as heard and hands
//!   the provider layers a read-only view ([`crate::providers::SessionConfig::session_history`]),
//!   which the resilience layer replays into every provider session it opens.
//!
//! **Adding a transport or a dialect** is a new file: a transport implements
//! [`link::ClientLink`] (its `recv` yields [`link::LinkEvent`]s, `send_audio` writes the playout's
//! frames, `send_event` encodes with its codec) and the builder gets a constructor for it; a
//! dialect implements [`link::EventCodec`]. The seam, as in `link.rs` (futures written as
//! `async fn` here):
//!
//! ```ignore
//! pub trait EventCodec: Send {
//!     fn name(&self) -> &'static str;
//!     /// Zero or more wire messages for one server event (stateful: ids, handshakes).
//!     fn encode(&mut self, ev: &ServerEvent, out: &mut Vec<String>);
//!     /// One client message; Ok(None) for a well-formed message the server ignores.
//!     fn decode(&mut self, msg: &[u8]) -> Result<Option<ClientEvent>, EventError>;
//!     fn handshake_done(&self) -> bool { true }            // RTVI: after `client-ready`
//!     fn take_replies(&mut self, _out: &mut Vec<String>) {} // a dialect's own responses
//!     fn end_requested(&self) -> bool { false }            // RTVI `disconnect-bot`
//! }
//! pub trait ClientLink: Send {
//!     async fn recv(&mut self) -> Option<LinkEvent>;          // audio, events, open/close, state
//!     async fn send_audio(&mut self, frame: &AudioFrame<'_>) -> Result<(), LinkError>;
//!     async fn send_event(&mut self, ev: &ServerEvent);       // never blocks; drops and counts
//!     async fn add_candidate(&mut self, c: RTCIceCandidateInit) -> Result<(), LinkError>;
//!     fn restart_ice(&mut self, r: IceRestart) -> BoxFuture<'static, Result<String, LinkError>>;
//!     async fn loss_fraction(&mut self) -> Option<f64>;
//!     fn stats(&self) -> LinkStats;
//!     async fn close(&mut self, grace: Duration);
//! }
//! ```
//!
//! Neither the conversation core nor the task changes for a new link or codec.

pub mod budget;
pub(crate) mod builder;
pub mod conversation;
mod durable_gate;
pub mod link;
pub mod neko;
pub mod oai_events;
mod privacy;
pub mod rtvi;
pub mod speech;
pub(crate) mod task;
pub mod tenant;
pub mod webrtc_link;
pub mod whip_link;
pub mod ws_link;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use signaling::events::{AgentState, Role};
use tokio::sync::{mpsc, oneshot};
use webrtc::peer_connection::RTCIceCandidateInit;

use crate::cluster::Cluster;
use crate::config::{Character, Config};
use crate::providers::RealtimeProvider;
use crate::store::redis::Redis;
use crate::store::writer::{StoreWriter, Write};
use crate::store::{Store, StoredSession, StoredState, StoredTurn};

/// Ended sessions stay queryable this long.
const ENDED_RETENTION: Duration = Duration::from_secs(3600);
/// At most this many candidates per trickle request.
const MAX_TRICKLE_CANDIDATES: usize = 64;

/// Why a session ended: the API's one set (`end_reason` of `GET /v1/sessions/{id}`,
/// `session.ended`, the store's column).
pub use signaling::host::EndReason;
use signaling::host::SessionInfo;
/// The lifecycle phase of a session: the API's one set (`state` of `GET /v1/sessions/{id}`).
pub use signaling::host::SessionState;

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
    IceRestart(crate::peer::IceRestart, oneshot::Sender<Result<String, link::LinkError>>),
    /// An external agent's result (`POST /v1/sessions/{id}/agent-results`).
    AgentResult(conversation::AgentResult),
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
    /// The session is recorded ([`crate::recording`]): asked at creation, or by configuration.
    pub record: bool,
    /// The conversation it continues ([`CreateOptions::continues`]), bounded as the replayed
    /// history is ([`crate::providers::MAX_HISTORY_ITEMS`], [`crate::providers::MAX_HISTORY_CHARS`]).
    pub continues: Vec<crate::providers::HistoryItem>,
    created_instant: Instant,
    state: Mutex<SharedState>,
    writer: StoreWriter,
    cluster: Option<Cluster>,
    /// A store write was refused by a full queue: rewrite everything once ended.
    dirty: AtomicBool,
    /// Sequence numbers of turns, from 1.
    next_seq: AtomicU64,
}

#[derive(Debug)]
struct SharedState {
    phase: SessionState,
    agent_state: AgentState,
    ended_at: Option<SystemTime>,
    ended_instant: Option<Instant>,
    end_reason: Option<EndReason>,
    /// The transcript so far, as stored (one row type for memory, store and API).
    turns: Vec<StoredTurn>,
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

impl SessionShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        // Only plain data is behind this lock; a panic while holding it cannot break invariants
        // that matter more than keeping the node up.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_agent_state(&self, s: AgentState) {
        self.lock().agent_state = s;
    }

    /// A client starts connecting: `created` -> `connecting`; an ended or already connected
    /// session refuses.
    fn begin_connect(&self) -> Result<(), SessionError> {
        let mut st = self.lock();
        match st.phase {
            SessionState::Created => st.phase = SessionState::Connecting,
            SessionState::Ended => return Err(SessionError::Ended),
            _ => return Err(SessionError::AlreadyConnected),
        }
        Ok(())
    }

    /// The connect attempt failed before the session went live: back to `created`, so the
    /// client can try again (e.g. with a corrected offer).
    fn connect_failed(&self) {
        let mut st = self.lock();
        if st.phase == SessionState::Connecting && st.live.is_none() {
            st.phase = SessionState::Created;
        }
    }

    pub(crate) fn mark_connected(&self) {
        let mut st = self.lock();
        if st.phase == SessionState::Connecting {
            st.phase = SessionState::Connected;
            drop(st);
            self.submit(Write::Connected { id: self.id.clone(), at: SystemTime::now() });
        }
    }

    /// Queue a store write without waiting; a refusal marks the session for a rewrite at its end.
    fn queue(&self, w: Write) {
        if !self.writer.try_write(w) {
            self.mark_dirty();
        }
    }

    /// Submit a session write (through the journal); a refusal marks the session for a rewrite.
    fn submit(&self, w: Write) {
        if !self.writer.submit(w, false).0 {
            self.mark_dirty();
        }
    }

    /// Mark the session for a rewrite of its transcript and end once it has ended.
    pub(crate) fn mark_dirty(&self) {
        if !self.dirty.swap(true, Ordering::Relaxed) {
            tracing::warn!(session_id = %self.id, "store queue full; this session is rewritten when it ends");
        }
    }

    /// Record a final utterance (empty text is not recorded) and submit it for the store. The
    /// receiver says when it is durable ([`crate::store::journal::Durability`]); the final
    /// transcript is held back from the client until then. None: nothing was recorded.
    pub(crate) fn push_turn(
        &self,
        role: Role,
        text: &str,
        interrupted: bool,
    ) -> Option<tokio::sync::oneshot::Receiver<crate::store::journal::Durability>> {
        let text = text.trim();
        if text.is_empty() {
            return None;
        }
        let turn = {
            let mut st = self.lock();
            let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
            let turn = StoredTurn {
                session_id: self.id.clone(),
                seq,
                role,
                text: text.to_owned(),
                interrupted,
                started_at: None,
                ended_at: SystemTime::now(),
                tool_calls: None,
            };
            st.turns.push(turn.clone());
            turn
        };
        let (accepted, durable) = self.writer.submit(Write::Turn(turn), true);
        if !accepted {
            self.mark_dirty();
        }
        durable
    }

    /// Queue a moderation flag for the review queue and count it (`kotodama_moderation_flags_total`).
    pub(crate) fn push_flag(&self, flag: conversation::Flag) {
        metrics::counter!(crate::telemetry::MODERATION_FLAGS, "category" => flag.category.clone()).increment(1);
        let flag = crate::store::StoredFlag {
            id: signaling::id::new_id("flag"),
            session_id: self.id.clone(),
            turn: self.next_seq.load(Ordering::Relaxed).saturating_sub(1),
            item_id: flag.item_id,
            category: flag.category,
            text: flag.text,
            policy_version: flag.policy_version,
            source: flag.source,
            created_at: SystemTime::now(),
        };
        self.queue(Write::Flag(flag));
    }

    /// Queue what the session used for the store (`session_usage`; before its end).
    pub(crate) fn push_usage(&self, usage: budget::SessionUsage) {
        self.queue(Write::Usage(crate::store::StoredUsage {
            session_id: self.id.clone(),
            user_id: self.user_id.clone(),
            character: self.character.clone(),
            usage,
            ended_at: SystemTime::now(),
        }));
    }

    fn end(&self, reason: EndReason) -> bool {
        let at = SystemTime::now();
        {
            let mut st = self.lock();
            if st.phase == SessionState::Ended {
                return false;
            }
            st.phase = SessionState::Ended;
            st.end_reason = Some(reason);
            st.ended_at = Some(at);
            st.ended_instant = Some(Instant::now());
            st.live = None;
        }
        self.submit(Write::Ended { id: self.id.clone(), at, reason: reason.as_str().to_owned() });
        if let Some(cluster) = &self.cluster {
            // Off this (possibly audio) path; an entry left behind expires with its TTL.
            cluster.unregister_later(&self.id);
        }
        crate::telemetry::add_with(crate::telemetry::SESSIONS_ENDED, "reason", reason.as_str().to_owned(), 1);
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
        let n = turns.len();
        for t in turns {
            self.writer.write(Write::Turn(t)).await;
        }
        if let Some((reason, at)) = end {
            self.writer.write(Write::Ended { id: self.id.clone(), at, reason: reason.as_str().to_owned() }).await;
        }
        tracing::info!(session_id = %self.id, turns = n, "session rewritten to the store after queue overflow");
    }

    /// The session as `GET /v1/sessions/{id}` reports it.
    pub fn info(&self) -> SessionInfo {
        let st = self.lock();
        SessionInfo {
            session_id: self.id.clone(),
            state: st.phase,
            character: self.character.clone(),
            provider: self.provider.clone(),
            created_at: self.created_at.into(),
            ended_at: st.ended_at.map(Into::into),
            end_reason: st.end_reason,
        }
    }

    /// The lifecycle phase.
    pub fn phase(&self) -> SessionState {
        self.lock().phase
    }

    /// The agent's conversational state.
    pub fn agent_state(&self) -> AgentState {
        self.lock().agent_state
    }

    /// The transcript so far.
    pub fn turns(&self) -> Vec<StoredTurn> {
        self.lock().turns.clone()
    }

    /// The whole conversation for a session that continues this one: what this one continued,
    /// then its own turns (an interrupted agent turn as heard), bounded as replayed history is.
    pub fn conversation(&self) -> Vec<crate::providers::HistoryItem> {
        use crate::providers::{History, HistoryItem};
        let own = self.turns().into_iter().map(|t| HistoryItem::said(t.role, t.text));
        History::from_items(self.continues.iter().cloned().chain(own)).to_vec()
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
    /// The stack's answer would not work for this offer.
    #[error(transparent)]
    OfferRefused(signaling::answer::AnswerError),
    /// No media port is free (`media.udp_ports` exhausted or held by another process).
    #[error("no free media port")]
    NoMediaPort,
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
    /// Another node hosts the session: its advertise URL (HTTP 307).
    #[error("the session is hosted by {0}")]
    Elsewhere(String),
    /// The session registry (Redis) could not be asked.
    #[error("session registry unavailable: {0}")]
    Registry(String),
    /// The node hosting the session did not receive the control message.
    #[error("the node hosting this session is not listening")]
    OwnerNotListening,
    /// The session exists but has not connected yet.
    #[error("the session has not connected yet")]
    NotLive,
    /// The live session's control queue is full.
    #[error("the session is busy")]
    Busy,
    /// No stored data for the user (privacy export/delete).
    #[error("no data for this user")]
    NoUserData,
    /// Live sessions on other nodes were told to end; the request must be retried.
    #[error("{0} live session(s) on other nodes were told to end; retry")]
    LiveElsewhere(usize),
    /// The creating API key holds as many sessions as it may ([`tenant`]; HTTP 429).
    #[error("this API key already holds {max} session(s) {}; retry after {} s", match limit { tenant::KeyLimit::Pending => "not yet connected", tenant::KeyLimit::Live => "not yet ended" }, retry_after.as_secs())]
    KeyLimit {
        /// Which limit.
        limit: tenant::KeyLimit,
        /// Its configured value.
        max: usize,
        /// When a slot is expected to free up.
        retry_after: Duration,
    },
}

/// This node's sessions.
pub struct SessionManager {
    config: Arc<Config>,
    /// The catalog: configured characters with the admin API's edits applied (swapped whole).
    characters: std::sync::RwLock<Arc<Vec<Character>>>,
    default_provider: String,
    sessions: Mutex<HashMap<String, Arc<SessionShared>>>,
    draining: AtomicBool,
    builder: builder::SessionBuilder,
    store: Arc<dyn Store>,
    writer: StoreWriter,
    node_id: String,
    advertise_url: String,
    cluster: Option<Cluster>,
    memory: Arc<crate::memory::Memory>,
    /// Per-API-key limits on pending and live sessions.
    key_limits: tenant::KeyLimits,
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
    /// The node's peer loop (`media.peer_driver = "loop"`).
    pub peer_loop: Option<Arc<crate::peer_loop::PeerLoop>>,
    /// Long-term memory per user and character.
    pub memory: Arc<crate::memory::Memory>,
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
    /// Record the session (`"record"` in the body); `None`: as configured (`[recording]`).
    pub record: Option<bool>,
    /// The conversation this session continues (Pipecat's `restart_pc` replaces a failed peer
    /// connection with a new session): the provider opens with it as prior history, as a
    /// resumed provider session does ([`crate::providers::SessionConfig::history`]).
    pub continues: Vec<crate::providers::HistoryItem>,
}

impl SessionManager {
    /// A manager for `config` with these providers (by name), persisting through `backends`.
    pub fn new(config: Arc<Config>, providers: Vec<Arc<dyn RealtimeProvider>>, backends: Backends) -> Arc<Self> {
        let default_provider = config.provider_name().to_owned();
        let config_limits = config.session.clone();
        let builder = builder::SessionBuilder::new(
            Arc::clone(&config),
            providers,
            backends.udp_mux.clone(),
            backends.peer_loop.clone(),
        )
        .with_memory(Arc::clone(&backends.memory))
        .with_usage_store(Arc::clone(&backends.store));
        let cluster = backends
            .redis
            .map(|r| Cluster::new(r, backends.advertise_url.clone(), backends.node_id.clone(), config.cluster.clone()));
        Arc::new(Self {
            characters: std::sync::RwLock::new(Arc::new(config.characters())),
            config,
            default_provider,
            sessions: Mutex::new(HashMap::new()),
            draining: AtomicBool::new(false),
            builder,
            store: backends.store,
            writer: backends.writer,
            cluster,
            node_id: backends.node_id,
            advertise_url: backends.advertise_url,
            memory: backends.memory,
            key_limits: tenant::KeyLimits::new(&config_limits),
        })
    }

    /// Redis, when configured.
    pub fn redis(&self) -> Option<&Redis> {
        self.cluster.as_ref().map(Cluster::redis)
    }

    /// The cluster (registry, redirect, control bus), when Redis is configured.
    pub fn cluster(&self) -> Option<&Cluster> {
        self.cluster.as_ref()
    }

    /// The URL other nodes send this node's clients to.
    pub fn advertise_url(&self) -> &str {
        &self.advertise_url
    }

    /// Remove this node's sessions from the Redis registry (at the end of a drain: the spawned
    /// removals of ended sessions may not run before the process exits).
    pub async fn unregister_all(&self) {
        let Some(cluster) = &self.cluster else { return };
        let ids: Vec<String> = self.map().keys().cloned().collect();
        cluster.unregister_all(&ids).await;
    }

    /// Drop an ended session from memory (after a privacy delete).
    pub fn forget(&self, id: &str) {
        self.map().remove(id);
    }

    /// Hand a user text turn to live session `id` (admin API, cross-node control).
    pub fn inject(&self, id: &str, text: String) -> Result<(), SessionError> {
        self.control(id, Control::Inject(text))
    }

    /// Hand an external agent's result to live session `id` on this node: the client is told
    /// (`agent_notification`), the model gets it in its context (or speaks it at once).
    pub fn agent_result(&self, id: &str, result: conversation::AgentResult) -> Result<(), SessionError> {
        self.control(id, Control::AgentResult(result))
    }

    fn control(&self, id: &str, ctl: Control) -> Result<(), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        let st = shared.lock();
        if st.phase == SessionState::Ended {
            return Err(SessionError::Ended);
        }
        let live = st.live.as_ref().ok_or(SessionError::NotLive)?;
        live.control.try_send(ctl).map_err(|_| SessionError::Busy)
    }

    /// Long-term memory (privacy export/delete, the memories API).
    pub fn memory(&self) -> &Arc<crate::memory::Memory> {
        &self.memory
    }

    /// The recording store (`None`: it could not be opened; nothing is recorded).
    pub fn recordings(&self) -> Option<&Arc<crate::recording::Recordings>> {
        self.builder.recordings()
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
        self.map().values().filter(|s| s.lock().phase != SessionState::Ended).map(|s| s.id.clone()).collect()
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<SessionShared>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The characters new sessions may use (the first is the default).
    pub fn characters(&self) -> Arc<Vec<Character>> {
        Arc::clone(&self.characters.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replace the catalog (the admin API after an edit): sessions created from now on use it.
    pub fn set_characters(&self, characters: Vec<Character>) {
        *self.characters.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(characters);
    }

    /// The moderation policies new sessions use (the admin API replaces them after an edit).
    pub fn policies(&self) -> &Arc<crate::moderation::policies::Policies> {
        self.builder.policies()
    }

    /// The node's peer loop (`media.peer_driver = "loop"`).
    pub fn peer_loop(&self) -> Option<&Arc<crate::peer_loop::PeerLoop>> {
        self.builder.peer_loop()
    }

    /// Whether new sessions are accepted.
    pub fn accepting(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }

    /// Sessions not yet ended.
    pub fn live_count(&self) -> usize {
        self.map().values().filter(|s| s.lock().phase != SessionState::Ended).count()
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
        let catalog = self.characters();
        let character = match character {
            Some(id) => {
                catalog.iter().find(|c| c.id == id).ok_or_else(|| SessionError::UnknownCharacter(id.to_owned()))?
            }
            None => catalog.first().ok_or_else(|| SessionError::UnknownCharacter(String::new()))?,
        };
        let provider = provider
            .or(character.provider.as_deref())
            .or(character.providers.first().map(String::as_str))
            .unwrap_or(&self.default_provider);
        if !self.builder.has_provider(provider) {
            return Err(SessionError::UnknownProvider(provider.to_owned()));
        }
        self.sweep();
        if self.live_count() >= self.config.session.max_sessions {
            return Err(SessionError::AtCapacity);
        }
        let _slot = match &options.api_key_id {
            Some(key) => Some(self.key_limits.reserve(key, &self.map())?),
            None => None,
        };
        let shared = Arc::new(SessionShared {
            id: signaling::id::new_session_id(),
            character: character.id.clone(),
            provider: provider.to_owned(),
            created_at: SystemTime::now(),
            user_id: options.user_id.clone(),
            api_key_id: options.api_key_id.clone(),
            record: options.record.unwrap_or_else(|| self.config.recording.records_character(&character.id)),
            continues: crate::providers::History::from_items(options.continues.iter().cloned()).to_vec(),
            created_instant: Instant::now(),
            writer: self.writer.clone(),
            cluster: self.cluster.clone(),
            dirty: AtomicBool::new(false),
            next_seq: AtomicU64::new(1),
            state: Mutex::new(SharedState {
                phase: SessionState::Created,
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
        // In the map first: the load a heartbeat publishes counts it from now on.
        self.map().insert(shared.id.clone(), Arc::clone(&shared));
        if let Some(cluster) = &self.cluster
            && let Err(e) = cluster.register(&shared.id, || self.live_count()).await
        {
            self.map().remove(&shared.id);
            return Err(e);
        }
        crate::telemetry::add(crate::telemetry::SESSIONS_CREATED, 1);
        Ok(shared)
    }

    /// Expire sessions that never connected and forget long-ended ones.
    pub fn sweep(&self) {
        let connect_timeout = Duration::from_secs(self.config.session.connect_timeout_secs);
        let mut map = self.map();
        map.retain(|_, s| {
            let mut st = s.lock();
            if st.phase == SessionState::Created && s.created_instant.elapsed() > connect_timeout {
                drop(st);
                s.end(EndReason::NeverConnected);
                return true;
            }
            if st.phase == SessionState::Ended {
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
        offer: signaling::sdp::ValidOffer,
    ) -> Result<(String, String, String), SessionError> {
        self.offer_with(id, offer, link::ApiV1, |_| {}).await
    }

    /// [`Self::offer`] for a client of another dialect: its events are spelled by `codec`, and
    /// `adjust` adapts the session's character (instructions, voice) for this call only.
    pub async fn offer_with<C: link::EventCodec + 'static>(
        self: &Arc<Self>,
        id: &str,
        offer: signaling::sdp::ValidOffer,
        codec: C,
        adjust: impl FnOnce(&mut Character),
    ) -> Result<(String, String, String), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        shared.begin_connect()?;
        match self.start_live(&shared, &offer, codec, adjust).await {
            Ok(v) => Ok(v),
            Err(e) => {
                shared.connect_failed();
                // A local resource failure is not the client's to fix: end the session (not left
                // `created` until the connect timeout); the 503 tells the client when to retry.
                if matches!(e, SessionError::NoMediaPort) {
                    shared.end(EndReason::InternalError);
                }
                Err(e)
            }
        }
    }

    async fn start_live<C: link::EventCodec + 'static>(
        self: &Arc<Self>,
        shared: &Arc<SessionShared>,
        offer: &signaling::sdp::ValidOffer,
        codec: C,
        adjust: impl FnOnce(&mut Character),
    ) -> Result<(String, String, String), SessionError> {
        let catalog = self.characters();
        let mut character = catalog
            .iter()
            .find(|c| c.id == shared.character)
            .ok_or_else(|| SessionError::UnknownCharacter(shared.character.clone()))?
            .clone();
        adjust(&mut character);
        let built = self.builder.webrtc(shared, &character, offer, codec).await?;
        let (peer_id, etag) = go_live(shared, built.task, built.control)?;
        Ok((built.answer, peer_id, etag))
    }

    /// Make session `id` live over an already connected client `link` (a WebSocket): the
    /// provider session is opened and the task spawned. Returns the peer id (the link's name in
    /// `DELETE /v1/sessions/{id}/peers/{peer_id}`).
    pub async fn connect_link<L: link::ClientLink + 'static>(&self, id: &str, link: L) -> Result<String, SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        shared.begin_connect()?;
        let catalog = self.characters();
        let character = catalog.iter().find(|c| c.id == shared.character);
        let built = match character {
            Some(c) => self.builder.with_link(&shared, c, link).await,
            None => Err(SessionError::UnknownCharacter(shared.character.clone())),
        };
        let result = built.and_then(|(task, control)| go_live(&shared, task, control));
        if result.is_err() {
            shared.connect_failed();
        }
        result.map(|(peer_id, _)| peer_id)
    }

    /// End session `id` (optionally only if `peer_id` matches) and wait, bounded, until its task
    /// has released everything.
    pub async fn end(&self, id: &str, peer_id: Option<&str>, reason: EndReason) -> Result<(), SessionError> {
        let shared = self.get(id).ok_or(SessionError::NotFound)?;
        let (control, done) = {
            let mut st = shared.lock();
            if st.phase == SessionState::Ended {
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
            if st.phase == SessionState::Ended {
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
            let live = st.live.as_ref().filter(|_| st.phase != SessionState::Ended).ok_or(SessionError::UnknownPeer)?;
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
        let ends = ids.iter().map(|id| self.end(id, None, EndReason::ServerShutdown));
        let _ = tokio::time::timeout(grace, futures::future::join_all(ends)).await;
    }
}

/// Register a built task as the session's live handle and spawn it: (peer id, ETag).
fn go_live<L: link::ClientLink + 'static>(
    shared: &Arc<SessionShared>,
    task: task::SessionTask<L>,
    control: mpsc::Sender<Control>,
) -> Result<(String, String), SessionError> {
    let (done_tx, done_rx) = oneshot::channel();
    let peer_id = signaling::id::new_peer_id();
    let etag = format!("\"{}\"", signaling::id::new_id("e"));
    {
        let mut st = shared.lock();
        if st.phase == SessionState::Ended {
            // Ended (DELETE or shutdown) while we were connecting.
            drop(st);
            let _ = control.try_send(Control::End(EndReason::ClientRequest));
            tokio::spawn(task.run());
            return Err(SessionError::Ended);
        }
        st.live = Some(LiveHandle { peer_id: peer_id.clone(), etag: etag.clone(), control, done: Some(done_rx) });
    }
    spawn_task(Arc::clone(shared), task, done_tx);
    tracing::info!(session_id = %shared.id, peer_id = %peer_id, provider = %shared.provider, "session live");
    Ok((peer_id, etag))
}

/// Run a live session's task; its end is recorded and persisted, then `done` fires.
fn spawn_task<L: link::ClientLink + 'static>(
    shared: Arc<SessionShared>,
    task: task::SessionTask<L>,
    done: oneshot::Sender<()>,
) {
    // Every log line of this session carries its id, a W3C-style trace id and the turn number.
    let trace_id = format!("{:032x}", rand::random::<u128>());
    let span =
        tracing::info_span!("session", session_id = %shared.id, trace_id = %trace_id, turn = tracing::field::Empty);
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let reason = task.run().await;
            shared.end(reason);
            shared.persist_after_end().await;
            let _ = done.send(());
        },
        span,
    ));
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
            record: false,
            continues: Vec::new(),
            created_instant: Instant::now(),
            state: Mutex::new(SharedState {
                phase: SessionState::Connecting,
                agent_state: AgentState::Listening,
                ended_at: None,
                ended_instant: None,
                end_reason: None,
                turns: Vec::new(),
                live: None,
            }),
            writer: writer.clone(),
            cluster: None,
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
        assert!(shared.end(EndReason::ClientRequest));
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
