//! The cluster: which node hosts which session, the owner redirect, and the control bus.
//!
//! With Redis configured, every node registers the sessions it creates (`session id -> advertise
//! URL`, with a TTL its refresh task keeps alive), answers requests for sessions it does not hold
//! with a 307 to their owner, and listens on its own control channel (and [`ALL_NODES`]) for
//! messages other nodes send to the sessions it hosts: end, inject a text turn, forget deleted
//! sessions. Without Redis there is one node and [`SessionManager`] holds no `Cluster`.
//!
//! This module is the one owner of that logic; the registry ([`SessionManager`]) and the HTTP
//! layer ask it, and `store::redis` only speaks the Redis commands.

use std::sync::Arc;

use crate::session::{EndReason, SessionError, SessionManager};
use crate::store::redis::{ALL_NODES, ControlMessage, REGISTRY_REFRESH, Redis};
use crate::store::{StoreError, StoredSession, StoredState};

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
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("advertise_url", &self.advertise_url).finish_non_exhaustive()
    }
}

fn storage(e: StoreError) -> SessionError {
    SessionError::Storage(e.to_string())
}

impl Cluster {
    /// The cluster through `redis`, this node reachable at `advertise_url`.
    pub fn new(redis: Redis, advertise_url: String) -> Self {
        Self { redis, advertise_url }
    }

    /// The Redis connection (short-term state shared with the API layer).
    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    /// Record that this node hosts `session_id`.
    pub async fn register(&self, session_id: &str) -> Result<(), SessionError> {
        self.redis.register(session_id, &self.advertise_url).await.map_err(storage)
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

    /// Keep this node's registry entries alive, and obey control messages sent to it.
    pub async fn spawn_tasks(&self, manager: &Arc<SessionManager>) {
        let weak = Arc::downgrade(manager);
        let redis = self.redis.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(REGISTRY_REFRESH);
            loop {
                tick.tick().await;
                let Some(m) = weak.upgrade() else { break };
                if let Err(e) = redis.refresh(&m.live_ids()).await {
                    tracing::warn!(error = %e, "registry refresh failed");
                }
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
