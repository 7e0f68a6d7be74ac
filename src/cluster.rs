//! The cluster: which node hosts which session, which nodes are alive, where new sessions go,
//! the owner redirect, and the control bus.
//!
//! With Redis configured, every node:
//!
//! * writes a heartbeat ([`NodeHeartbeat`]: node id, advertise URL, load = sessions not ended,
//!   last seen) every `cluster.heartbeat_interval_ms`, alive for `cluster.heartbeat_expiry_ms`;
//! * registers the sessions it creates (`session id -> advertise URL`) and, every heartbeat,
//!   renews those entries and re-creates the ones Redis lost (a restart that came back empty):
//!   within one period every live session is routable again from every node;
//! * answers requests for sessions it does not hold with a 307 to their owner;
//! * watches the other nodes: when one's heartbeat has expired, exactly one survivor (the holder
//!   of the `reap:<node id>` lock, `SET NX PX`) marks that node's open sessions ended `node_lost`
//!   in the shared store at the dead node's last heartbeat, drops their registry entries (no more
//!   307 to a dead node) and leaves word (`reaped:<node id>`): a node that was only cut off from
//!   Redis finds it at its next heartbeat and ends its own sessions `node_lost` too, so store and
//!   node agree. With SQLite every node has its own store: the survivor's update finds nothing,
//!   and the dead node's sessions are ended `crash`, at its last heartbeat, when it restarts;
//! * places new sessions (`cluster.placement = "least_loaded"`): `POST /v1/sessions` (and Pipecat's
//!   `POST /api/offer`, a WHIP publish) on a node holding at least one session more than the least-loaded live,
//!   accepting node is answered 307 to the same route on that node;
//! * listens on its own control channel (and [`ALL_NODES`]) for messages other nodes send to the
//!   sessions it hosts: end, inject a text turn, forget deleted sessions.
//!
//! Without Redis there is one node and [`SessionManager`] holds no `Cluster`.
//!
//! This module is the one owner of that logic; the registry ([`SessionManager`]) and the HTTP
//! layer ask it, and `store::redis` only speaks the Redis commands.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use crate::config::{ClusterSettings, Placement};
use crate::session::{EndReason, SessionError, SessionManager};
use crate::store::redis::{ALL_NODES, ControlMessage, NodeHeartbeat, Redis};
use crate::store::{StoreError, StoredSession, StoredState, from_ms, to_ms};

/// Where a session lives, as far as the registry knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node, or no registry entry (ended, expired, or never registered).
    HereOrNobody,
    /// Another node, by its advertise URL (the 307 target).
    Elsewhere(String),
}

/// This node's view of the cluster.
#[derive(Clone)]
pub struct Cluster {
    redis: Redis,
    advertise_url: String,
    node_id: String,
    /// Random per process start (tells this run from an earlier one with the same node id).
    incarnation: String,
    settings: ClusterSettings,
    /// Set by [`Self::leave`]: no more heartbeats.
    stopped: Arc<AtomicBool>,
    /// Heartbeats are written one at a time, each with the load counted under this lock: the
    /// last one written is never older than an earlier one.
    beat_lock: Arc<tokio::sync::Mutex<()>>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("advertise_url", &self.advertise_url)
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

fn storage(e: StoreError) -> SessionError {
    SessionError::Storage(e.to_string())
}

impl Cluster {
    /// The cluster through `redis`, this node `node_id` reachable at `advertise_url`.
    pub fn new(redis: Redis, advertise_url: String, node_id: String, settings: ClusterSettings) -> Self {
        let incarnation = signaling::id::new_id("n");
        Self {
            redis,
            advertise_url,
            node_id,
            incarnation,
            settings,
            stopped: Arc::new(AtomicBool::new(false)),
            beat_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// The Redis connection (short-term state shared with the API layer).
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Write this node's heartbeat with the `load` (sessions not ended) counted now; returns the
    /// incarnation another node declared dead under this node id, if any.
    async fn beat(&self, load: impl FnOnce() -> usize, accepting: bool) -> Result<Option<String>, StoreError> {
        let _one_at_a_time = self.beat_lock.lock().await;
        let beat = NodeHeartbeat {
            node_id: self.node_id.clone(),
            url: self.advertise_url.clone(),
            incarnation: self.incarnation.clone(),
            load: u64::try_from(load()).unwrap_or(u64::MAX),
            accepting,
            last_seen_ms: to_ms(SystemTime::now()),
        };
        self.redis.heartbeat(&beat, self.settings.heartbeat_expiry()).await
    }

    /// Record that this node hosts `session_id` (already counted by `load`), and publish the new
    /// load at once, so placement decisions on other nodes see it.
    pub async fn register(&self, session_id: &str, load: impl FnOnce() -> usize) -> Result<(), SessionError> {
        let expiry = self.settings.heartbeat_expiry();
        self.redis.register(session_id, &self.advertise_url, expiry).await.map_err(storage)?;
        if let Err(e) = self.beat(load, true).await {
            tracing::warn!(error = %e, "heartbeat after a new session not written (the next one is)");
        }
        Ok(())
    }

    /// Drop `session_id`'s entry, off the caller's path (an entry left behind expires).
    pub fn unregister_later(&self, session_id: &str) {
        let (redis, id) = (self.redis.clone(), session_id.to_owned());
        tokio::spawn(async move {
            if let Err(e) = redis.unregister(&id).await {
                tracing::warn!(session_id = %id, error = %e, "registry entry not removed (it expires)");
            }
        });
    }

    /// Drop the entries of `ids` now (end of a drain).
    pub async fn unregister_all(&self, ids: &[String]) {
        for id in ids {
            if let Err(e) = self.redis.unregister(id).await {
                tracing::warn!(session_id = %id, error = %e, "registry entry not removed (it expires)");
            }
        }
    }

    /// Stop the heartbeat and leave the watched set (a clean stop: nothing to end).
    pub async fn leave(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        if let Err(e) = self.redis.unwatch(&self.node_id).await {
            tracing::warn!(error = %e, "heartbeat not removed at shutdown (it expires)");
        }
    }

    /// Who hosts `session_id`. `Err(Storage)` when the registry cannot be asked.
    pub async fn owner(&self, session_id: &str) -> Result<Owner, SessionError> {
        match self.redis.owner(session_id).await.map_err(|e| SessionError::Registry(e.to_string()))? {
            Some(url) if url != self.advertise_url => Ok(Owner::Elsewhere(url)),
            _ => Ok(Owner::HereOrNobody),
        }
    }

    /// Send `msg` to the node at `owner`; `Err(OwnerNotListening)` when nobody received it.
    pub async fn send(&self, owner: &str, msg: &ControlMessage) -> Result<(), SessionError> {
        match self.redis.publish(owner, msg).await.map_err(storage)? {
            0 => Err(SessionError::OwnerNotListening),
            _ => Ok(()),
        }
    }

    /// Tell every node to drop `ids` from memory (after a privacy delete); best effort.
    pub async fn forget_everywhere(&self, ids: &[String]) {
        let msg = ControlMessage::Forget { session_ids: ids.to_vec() };
        if let Err(e) = self.redis.publish(ALL_NODES, &msg).await {
            tracing::warn!(error = %e, "other nodes not told to forget deleted sessions (they age out)");
        }
    }

    /// The advertise URL of the node a new session should go to instead of this one, holding
    /// `local_load` sessions: the least-loaded live node accepting sessions, when this one holds
    /// at least one more (ties: the lowest URL). `None`: here (placement `local`, no other
    /// node, or Redis cannot be asked: creating here beats failing).
    pub async fn least_loaded(&self, local_load: usize) -> Option<String> {
        if self.settings.placement != Placement::LeastLoaded {
            return None;
        }
        let nodes = match self.redis.nodes().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "node loads unavailable; placing the new session here");
                return None;
            }
        };
        let best = nodes
            .into_iter()
            .filter_map(|(_, beat)| beat)
            .filter(|b| b.accepting && b.url != self.advertise_url)
            .min_by(|a, b| a.load.cmp(&b.load).then_with(|| a.url.cmp(&b.url)))?;
        (u64::try_from(local_load).unwrap_or(u64::MAX) > best.load).then_some(best.url)
    }

    /// Beat, re-assert this node's registry entries, and finish the sessions of dead nodes;
    /// every `cluster.heartbeat_interval_ms`. Also obey control messages sent to this node.
    pub async fn spawn_tasks(&self, manager: &Arc<SessionManager>) {
        // The first heartbeat before the node serves: from its first request on, it is alive.
        self.tick(manager).await;
        let weak = Arc::downgrade(manager);
        let cluster = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cluster.settings.heartbeat_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { break };
                if cluster.stopped.load(Ordering::SeqCst) {
                    break;
                }
                cluster.tick(&m).await;
            }
        });
        let weak = Arc::downgrade(manager);
        let mut control = self.redis.subscribe(&self.advertise_url).await;
        tokio::spawn(async move {
            while let Some(msg) = control.recv().await {
                let Some(m) = weak.upgrade() else { break };
                apply(&m, msg).await;
            }
        });
    }

    async fn tick(&self, m: &SessionManager) {
        match self.beat(|| m.live_count(), m.accepting()).await {
            Ok(Some(reaped)) if reaped == self.incarnation => self.fenced(m).await,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "heartbeat not written"),
        }
        if let Err(e) = self.reassert(m).await {
            tracing::warn!(error = %e, "registry entries not renewed");
        }
        match self.redis.nodes().await {
            Ok(nodes) => {
                for (node_id, _) in nodes.into_iter().filter(|(id, beat)| beat.is_none() && *id != self.node_id) {
                    if let Err(e) = self.reap(m, &node_id).await {
                        tracing::warn!(node_id = %node_id, error = %e, "a dead node's sessions not ended yet (retried)");
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cluster nodes not read"),
        }
    }

    /// Renew this node's registry entries; re-create the missing ones of sessions still live.
    async fn reassert(&self, m: &SessionManager) -> Result<(), StoreError> {
        let expiry = self.settings.heartbeat_expiry();
        let missing = self.redis.refresh(&m.live_ids(), expiry).await?;
        if missing.is_empty() {
            return Ok(());
        }
        // Ended since the list was taken: not re-created.
        let live = m.live_ids();
        let missing: Vec<String> = missing.into_iter().filter(|id| live.contains(id)).collect();
        self.redis.register_missing(&missing, &self.advertise_url, expiry).await?;
        tracing::warn!(sessions = missing.len(), "registry entries were missing (Redis lost them): re-created");
        Ok(())
    }

    /// Another node declared this one dead (Redis did not hear from it within the expiry) and
    /// ended its sessions in the store: end them here too, so node, store and registry agree.
    async fn fenced(&self, m: &SessionManager) {
        let ids = m.live_ids();
        tracing::error!(
            node_id = %self.node_id,
            sessions = ids.len(),
            "another node declared this node dead (no heartbeat within the expiry): its sessions end (node_lost)"
        );
        futures::future::join_all(ids.iter().map(|id| m.end(id, None, EndReason::NodeLost))).await;
        if let Err(e) = self.redis.clear_reaped(&self.node_id).await {
            tracing::warn!(error = %e, "dead-node notice not cleared");
        }
    }

    /// Node `node_id` has no heartbeat: if this node wins the lock, mark its open sessions ended
    /// `node_lost` at its last heartbeat and drop their registry entries.
    async fn reap(&self, m: &SessionManager, node_id: &str) -> Result<(), StoreError> {
        let Some(last) = self.redis.last_seen(node_id).await? else {
            return self.redis.unwatch(node_id).await;
        };
        if !self.redis.claim_reap(node_id, &self.node_id, self.settings.heartbeat_expiry()).await? {
            return Ok(());
        }
        let last_seen = from_ms(last.last_seen_ms);
        let ids = m.store().end_lost_node(node_id, last_seen, SystemTime::now()).await?;
        self.redis.reaped(node_id, &last.incarnation, &ids).await?;
        tracing::warn!(
            dead_node = %node_id,
            url = %last.url,
            last_seen_ms = last.last_seen_ms,
            sessions = ids.len(),
            "node stopped its heartbeat: its sessions ended (node_lost)"
        );
        Ok(())
    }
}

/// Carry out a control message another node sent.
async fn apply(m: &SessionManager, msg: ControlMessage) {
    let result = match msg {
        ControlMessage::End { session_id } => {
            m.end(&session_id, None, EndReason::ClientRequest).await.map(|()| session_id)
        }
        ControlMessage::Inject { session_id, text } => m.inject(&session_id, text).map(|()| session_id),
        ControlMessage::Forget { session_ids } => {
            for id in &session_ids {
                m.forget(id);
            }
            return;
        }
    };
    match result {
        Ok(id) => tracing::info!(session_id = %id, "control message applied"),
        Err(e) => tracing::warn!(error = %e, "control message not applied"),
    }
}

/// The cluster-wide answers of the registry: what the HTTP layer asks about any session id.
impl SessionManager {
    /// `Err(Elsewhere)` when another node hosts `session_id` (the HTTP layer answers 307).
    pub async fn locate(&self, session_id: &str) -> Result<(), SessionError> {
        match self.cluster() {
            Some(c) => match c.owner(session_id).await? {
                Owner::Elsewhere(url) => Err(SessionError::Elsewhere(url)),
                Owner::HereOrNobody => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Where `POST /v1/sessions` should create: `Err(Elsewhere(url))` when another live node is
    /// less loaded by at least one session (placement `least_loaded`; HTTP 307 to its
    /// `POST /v1/sessions`), else here.
    pub async fn place(&self) -> Result<(), SessionError> {
        let Some(c) = self.cluster() else { return Ok(()) };
        match c.least_loaded(self.live_count()).await {
            Some(url) => Err(SessionError::Elsewhere(url)),
            None => Ok(()),
        }
    }

    /// A session this node does not hold in memory: `Elsewhere` when it is live on another node,
    /// else its stored record (`NotFound` when there is none).
    pub async fn stored(&self, session_id: &str) -> Result<StoredSession, SessionError> {
        self.locate(session_id).await?;
        self.store().session(session_id).await.map_err(storage)?.ok_or(SessionError::NotFound)
    }

    /// `NotFound` or `Ended` for a session this node does not hold, by its stored record.
    pub async fn not_here(&self, session_id: &str) -> SessionError {
        match self.stored(session_id).await {
            Ok(s) if s.state == StoredState::Ended => SessionError::Ended,
            Ok(_) => SessionError::NotFound,
            Err(e) => e,
        }
    }

    /// Hand a user text turn to live session `session_id` wherever it runs: here directly, on
    /// another node over the control bus (callers need not follow redirects).
    pub async fn inject_anywhere(&self, session_id: &str, text: String) -> Result<(), SessionError> {
        if self.get(session_id).is_some() {
            return self.inject(session_id, text);
        }
        if let Some(c) = self.cluster()
            && let Owner::Elsewhere(owner) = c.owner(session_id).await?
        {
            let msg = ControlMessage::Inject { session_id: session_id.to_owned(), text };
            return c.send(&owner, &msg).await;
        }
        let stored = self.store().session(session_id).await.map_err(storage)?.ok_or(SessionError::NotFound)?;
        Err(if stored.state == StoredState::Ended { SessionError::Ended } else { SessionError::NotFound })
    }

    /// End the live ones of `sessions` (a privacy delete): here at once; on other nodes over the
    /// control bus, answered with `LiveElsewhere(n)` so the caller retries once they have ended.
    pub async fn end_everywhere(&self, sessions: &[StoredSession]) -> Result<(), SessionError> {
        let mut remote_live = 0;
        for s in sessions.iter().filter(|s| s.state != StoredState::Ended) {
            if self.get(&s.id).is_some() {
                let _ = self.end(&s.id, None, EndReason::ClientRequest).await;
            } else if let Some(c) = self.cluster()
                && let Ok(Owner::Elsewhere(owner)) = c.owner(&s.id).await
            {
                if let Err(e) = c.send(&owner, &ControlMessage::End { session_id: s.id.clone() }).await {
                    tracing::warn!(session_id = %s.id, error = %e, "cross-node end not sent");
                }
                remote_live += 1;
            }
        }
        if remote_live > 0 {
            return Err(SessionError::LiveElsewhere(remote_live));
        }
        Ok(())
    }

    /// Drop deleted sessions from memory, here and on every node.
    pub async fn forget_everywhere(&self, ids: &[String]) {
        for id in ids {
            self.forget(id);
        }
        if let Some(c) = self.cluster() {
            c.forget_everywhere(ids).await;
        }
    }
}
