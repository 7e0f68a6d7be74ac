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
use crate::store::StoreError;
use crate::store::redis::{ALL_NODES, ControlMessage, REGISTRY_REFRESH, Redis};

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
        match self.redis.owner(session_id).await.map_err(storage)? {
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
        ControlMessage::End { session_id } => m.end(&session_id, None, EndReason::Admin).await.map(|()| session_id),
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
