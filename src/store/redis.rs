//! Redis: the cluster's short-term state (`KOTODAMA_REDIS_URL`).
//!
//! * [`ShortTermStore`] for the router: used token ids and idempotency records
//!   (`SET key value NX GET PX ttl`, atomic), rate-limit windows (`INCR` + `PEXPIRE` in one
//!   script).
//! * The session registry: `session:<id>` -> the advertised URL of the node hosting it, with a
//!   TTL the owner refreshes ([`REGISTRY_TTL`]; a node that dies stops refreshing and its entries
//!   expire), removed when the session ends. Other nodes redirect (307) requests to the owner.
//! * A sliding window of each live session's recent turns (`recent:<id>`, the last
//!   [`RECENT_TURNS`], expiring an hour after the last one): what a model or an operator wants
//!   at hand without a database query.
//! * Cross-node control: `control:<node id>` pub/sub channels carrying [`ControlMessage`]s
//!   (end a session, inject a text turn) to the node that hosts the session.
//!
//! Every key and channel starts with the configured prefix (`kotodama:` by default).

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt as _;
use redis::aio::ConnectionManager;
use serde::{Deserialize, Serialize};
use signaling::short_term::{ShortTermError, ShortTermStore};
use tokio::sync::mpsc;

use super::{StoreError, StoredTurn};

/// Lifetime of a registry entry; the owner refreshes it every [`REGISTRY_REFRESH`].
pub const REGISTRY_TTL: Duration = Duration::from_secs(30);
/// How often a node refreshes its registry entries.
pub const REGISTRY_REFRESH: Duration = Duration::from_secs(10);
/// Turns kept in a session's recent window.
pub const RECENT_TURNS: isize = 20;
/// Control messages buffered between the subscriber and the node; beyond, they are dropped
/// and logged (the sender sees no ack either way: control is best effort, like pub/sub).
pub const CONTROL_QUEUE: usize = 64;

const RATE_SCRIPT: &str = "local c = redis.call('INCR', KEYS[1]) \
     if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
     return {c, redis.call('PTTL', KEYS[1])}";

/// A message to the node hosting a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
#[non_exhaustive]
pub enum ControlMessage {
    /// End the session (reason `client_request`).
    End {
        /// Session id.
        session_id: String,
    },
    /// Inject a text turn as if the user had typed it (e.g. a tool result or operator note).
    Inject {
        /// Session id.
        session_id: String,
        /// The text.
        text: String,
    },
    /// Drop these (deleted) sessions from memory; sent to every node.
    Forget {
        /// Session ids.
        session_ids: Vec<String>,
    },
}

/// The channel every node listens to, besides its own.
pub const ALL_NODES: &str = "all";

/// A connection to Redis with the key prefix.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis").field("prefix", &self.prefix).finish_non_exhaustive()
    }
}

fn redis_err(e: redis::RedisError) -> StoreError {
    StoreError::Connect(e.to_string())
}

fn short_err(e: redis::RedisError) -> ShortTermError {
    ShortTermError(e.to_string())
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Redis {
    /// Connect (and check with a PING).
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(redis_err)?;
        // Bounded waits: a request that needs Redis fails (503) rather than hanging, and a node
        // pointed at an unreachable Redis says so within seconds.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(2)
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        let mut conn = client.get_connection_manager_with_config(config).await.map_err(redis_err)?;
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(redis_err)?;
        Ok(Redis { client, conn, prefix: prefix.to_owned() })
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.prefix)
    }

    /// Record that `session_id` is hosted at `node_url`.
    pub async fn register(&self, session_id: &str, node_url: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(&format!("session:{session_id}")))
            .arg(node_url)
            .arg("PX")
            .arg(ms(REGISTRY_TTL))
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// Keep the entries of these (live) sessions.
    pub async fn refresh(&self, session_ids: &[String]) -> Result<(), StoreError> {
        if session_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in session_ids {
            pipe.cmd("PEXPIRE").arg(self.key(&format!("session:{id}"))).arg(ms(REGISTRY_TTL)).ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }

    /// Forget a session (it ended).
    pub async fn unregister(&self, session_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL")
            .arg(self.key(&format!("session:{session_id}")))
            .arg(self.key(&format!("recent:{session_id}")))
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// The advertised URL of the node hosting `session_id`, if it is live somewhere.
    pub async fn owner(&self, session_id: &str) -> Result<Option<String>, StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("GET").arg(self.key(&format!("session:{session_id}"))).query_async(&mut c).await.map_err(redis_err)
    }

    /// Push a final turn onto the session's recent window.
    pub async fn push_recent(&self, turn: &StoredTurn) -> Result<(), StoreError> {
        let key = self.key(&format!("recent:{}", turn.session_id));
        let json = serde_json::to_string(turn).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut c = self.conn.clone();
        redis::pipe()
            .cmd("LPUSH")
            .arg(&key)
            .arg(json)
            .ignore()
            .cmd("LTRIM")
            .arg(&key)
            .arg(0)
            .arg(RECENT_TURNS - 1)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&key)
            .arg(3_600_000u64)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// The session's recent turns, newest first (JSON objects).
    pub async fn recent(&self, session_id: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        let mut c = self.conn.clone();
        let items: Vec<String> = redis::cmd("LRANGE")
            .arg(self.key(&format!("recent:{session_id}")))
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(items.iter().filter_map(|s| serde_json::from_str(s).ok()).collect())
    }

    /// Send `msg` to the node `node_id`; returns how many subscribers received it.
    pub async fn publish(&self, node_id: &str, msg: &ControlMessage) -> Result<u64, StoreError> {
        let json = serde_json::to_string(msg).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut c = self.conn.clone();
        redis::cmd("PUBLISH")
            .arg(self.key(&format!("control:{node_id}")))
            .arg(json)
            .query_async(&mut c)
            .await
            .map_err(redis_err)
    }

    /// Subscribe to this node's control channel and [`ALL_NODES`]: messages arrive on the returned receiver
    /// (bounded, [`CONTROL_QUEUE`]; a full queue drops and logs). Resubscribes after a lost
    /// connection, with backoff, until the receiver is dropped.
    /// Returns once the first subscription is in place (or failed; it is then retried), so
    /// messages published after this call are received.
    pub async fn subscribe(&self, node_id: &str) -> mpsc::Receiver<ControlMessage> {
        let (tx, rx) = mpsc::channel(CONTROL_QUEUE);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let mut ready_tx = Some(ready_tx);
        let client = self.client.clone();
        let channels = [self.key(&format!("control:{node_id}")), self.key(&format!("control:{ALL_NODES}"))];
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while !tx.is_closed() {
                let mut pubsub = match client.get_async_pubsub().await {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!(error = %e, "redis control subscription failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                };
                if let Err(e) = pubsub.subscribe(&channels[..]).await {
                    tracing::warn!(error = %e, "redis control subscription failed; retrying");
                    tokio::time::sleep(backoff).await;
                    continue;
                }
                backoff = Duration::from_millis(100);
                if let Some(ready) = ready_tx.take() {
                    let _ = ready.send(());
                }
                let mut stream = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = tx.closed() => return,
                        msg = stream.next() => {
                            let Some(msg) = msg else { break };
                            let Ok(payload) = msg.get_payload::<String>() else { continue };
                            match serde_json::from_str::<ControlMessage>(&payload) {
                                Ok(m) => {
                                    if tx.try_send(m).is_err() {
                                        tracing::warn!("control queue full; message dropped");
                                    }
                                }
                                Err(e) => tracing::warn!(error = %e, "unreadable control message ignored"),
                            }
                        }
                    }
                }
            }
        });
        if tokio::time::timeout(Duration::from_secs(5), ready_rx).await.is_err() {
            tracing::warn!("redis control subscription not ready yet; retrying in the background");
        }
        rx
    }
}

#[async_trait]
impl ShortTermStore for Redis {
    async fn set_nx(&self, key: &str, value: &[u8], ttl: Duration) -> Result<Option<Vec<u8>>, ShortTermError> {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(key))
            .arg(value)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(ms(ttl))
            .query_async(&mut c)
            .await
            .map_err(short_err)
    }

    async fn set(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), ShortTermError> {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(key))
            .arg(value)
            .arg("PX")
            .arg(ms(ttl))
            .query_async(&mut c)
            .await
            .map_err(short_err)
    }

    async fn delete(&self, key: &str) -> Result<(), ShortTermError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL").arg(self.key(key)).query_async(&mut c).await.map_err(short_err)
    }

    async fn hit(&self, key: &str, window: Duration) -> Result<(u64, Duration), ShortTermError> {
        let mut c = self.conn.clone();
        let (count, pttl): (u64, i64) = redis::cmd("EVAL")
            .arg(RATE_SCRIPT)
            .arg(1)
            .arg(self.key(key))
            .arg(ms(window))
            .query_async(&mut c)
            .await
            .map_err(short_err)?;
        let left = if pttl > 0 { Duration::from_millis(pttl as u64) } else { window };
        Ok((count, left))
    }
}
