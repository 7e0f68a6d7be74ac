//! Redis: the cluster's short-term state (`KOTODAMA_REDIS_URL`).
//!
//! * [`ShortTermStore`] for the router: used token ids and idempotency records
//!   (`SET key value NX GET PX ttl`, atomic), rate-limit windows (`INCR` + `PEXPIRE` in one
//!   script).
//! * The session registry: `session:<id>` -> the advertised URL of the node hosting it, with a
//!   TTL (`cluster.heartbeat_expiry_ms`) the owner renews every heartbeat and re-creates when it is
//!   missing (Redis restarted empty); removed when the session ends. Other nodes redirect (307)
//!   requests to the owner.
//! * Node heartbeats ([`NodeHeartbeat`]): `node:<node id>` expires with the heartbeat (present =
//!   alive), `node-seen:<node id>` keeps the last one for [`SEEN_TTL`] (when a dead node was last
//!   seen), `nodes` is the set of node ids to watch, `reap:<node id>` the lock (`SET NX PX`) that
//!   lets exactly one survivor end a dead node's sessions, and `reaped:<node id>` tells a node
//!   cut off from Redis that it was declared dead (its incarnation).
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

/// How long the last heartbeat of a node is kept after it stopped (`node-seen:<id>`): the
/// `ended_at` of its sessions when it is found dead or restarts.
pub const SEEN_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Turns kept in a session's recent window.
pub const RECENT_TURNS: isize = 20;
/// Control messages buffered between the subscriber and the node; beyond, they are dropped
/// and logged (the sender sees no ack either way: control is best effort, like pub/sub).
pub const CONTROL_QUEUE: usize = 64;

const RATE_SCRIPT: &str = "local c = redis.call('INCR', KEYS[1]) \
     if c == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end \
     return {c, redis.call('PTTL', KEYS[1])}";

/// Push a turn onto a session's recent window only while the session is registered
/// (`KEYS[2]`, `session:<id>`): a push that lands after the session's end unregistered it must
/// not re-create the window (it would outlive the session, and a privacy delete, for an hour).
/// Atomic, as every script is. `ARGV`: the turn's JSON, the last index kept, the expiry in ms.
const PUSH_RECENT_SCRIPT: &str = "if redis.call('EXISTS', KEYS[2]) == 0 then return 0 end \
     redis.call('LPUSH', KEYS[1], ARGV[1]) \
     redis.call('LTRIM', KEYS[1], 0, ARGV[2]) \
     redis.call('PEXPIRE', KEYS[1], ARGV[3]) \
     return 1";

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

/// One node's heartbeat: who it is, where it is reached, how loaded it is, when it was seen.
/// Stored as JSON under `node:<node_id>` (expiring) and `node-seen:<node_id>` (kept).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeHeartbeat {
    /// The node's id in the store (`sessions.node_id`, `KOTODAMA_NODE_ID`).
    pub node_id: String,
    /// Its advertise URL (the target of redirects to it).
    pub url: String,
    /// A random id per process start: tells a restarted node from the one that died.
    pub incarnation: String,
    /// Its sessions not yet ended.
    pub load: u64,
    /// Whether it takes new sessions (false while draining).
    pub accepting: bool,
    /// When this heartbeat was written: unix ms of the node's clock.
    pub last_seen_ms: i64,
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

    /// Record that `session_id` is hosted at `node_url`, for `ttl` (renewed by the owner).
    pub async fn register(&self, session_id: &str, node_url: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("SET")
            .arg(self.key(&format!("session:{session_id}")))
            .arg(node_url)
            .arg("PX")
            .arg(ms(ttl))
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// Renew the entries of these (live) sessions for `ttl`; returns the ids that had no entry
    /// (Redis lost it: the caller re-creates those still live with [`Self::register_missing`]).
    pub async fn refresh(&self, session_ids: &[String], ttl: Duration) -> Result<Vec<String>, StoreError> {
        if session_ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in session_ids {
            pipe.cmd("PEXPIRE").arg(self.key(&format!("session:{id}"))).arg(ms(ttl));
        }
        let mut c = self.conn.clone();
        let renewed: Vec<i64> = pipe.query_async(&mut c).await.map_err(redis_err)?;
        Ok(session_ids.iter().zip(renewed).filter(|(_, r)| *r == 0).map(|(id, _)| id.clone()).collect())
    }

    /// Re-create the entries of `session_ids` (hosted at `node_url`) where none exists.
    pub async fn register_missing(
        &self,
        session_ids: &[String],
        node_url: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        if session_ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for id in session_ids {
            pipe.cmd("SET").arg(self.key(&format!("session:{id}"))).arg(node_url).arg("NX").arg("PX").arg(ms(ttl));
            pipe.ignore();
        }
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }

    /// Write this node's heartbeat, alive for `expiry`; returns the incarnation another node
    /// declared dead under this node id, if any (`reaped:<node id>`).
    pub async fn heartbeat(&self, beat: &NodeHeartbeat, expiry: Duration) -> Result<Option<String>, StoreError> {
        let json = serde_json::to_string(beat).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let id = &beat.node_id;
        let mut c = self.conn.clone();
        let (reaped,): (Option<String>,) = redis::pipe()
            .cmd("SET")
            .arg(self.key(&format!("node:{id}")))
            .arg(&json)
            .arg("PX")
            .arg(ms(expiry))
            .ignore()
            .cmd("SET")
            .arg(self.key(&format!("node-seen:{id}")))
            .arg(&json)
            .arg("PX")
            .arg(ms(SEEN_TTL))
            .ignore()
            .cmd("SADD")
            .arg(self.key("nodes"))
            .arg(id)
            .ignore()
            .cmd("GET")
            .arg(self.key(&format!("reaped:{id}")))
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(reaped)
    }

    /// Every watched node with its current heartbeat (`None`: expired, the node is dead).
    pub async fn nodes(&self) -> Result<Vec<(String, Option<NodeHeartbeat>)>, StoreError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> =
            redis::cmd("SMEMBERS").arg(self.key("nodes")).query_async(&mut c).await.map_err(redis_err)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|id| self.key(&format!("node:{id}"))).collect();
        let beats: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut c).await.map_err(redis_err)?;
        Ok(ids.into_iter().zip(beats).map(|(id, b)| (id, b.and_then(|j| serde_json::from_str(&j).ok()))).collect())
    }

    /// The last heartbeat `node_id` wrote (kept [`SEEN_TTL`] after it stopped).
    pub async fn last_seen(&self, node_id: &str) -> Result<Option<NodeHeartbeat>, StoreError> {
        let mut c = self.conn.clone();
        let json: Option<String> = redis::cmd("GET")
            .arg(self.key(&format!("node-seen:{node_id}")))
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(json.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Take the lock to end dead `node_id`'s sessions (`SET reap:<id> NX PX ttl`): true for the
    /// one caller that got it, and only while the node is still without a heartbeat.
    pub async fn claim_reap(&self, node_id: &str, by: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut c = self.conn.clone();
        let (claimed, alive): (Option<String>, bool) = redis::pipe()
            .cmd("SET")
            .arg(self.key(&format!("reap:{node_id}")))
            .arg(by)
            .arg("NX")
            .arg("PX")
            .arg(ms(ttl))
            .cmd("EXISTS")
            .arg(self.key(&format!("node:{node_id}")))
            .query_async(&mut c)
            .await
            .map_err(redis_err)?;
        Ok(claimed.is_some() && !alive)
    }

    /// Dead `node_id` (incarnation `incarnation`) was dealt with: drop its sessions' entries,
    /// stop watching it, and leave word for it in case it was only cut off (kept a day).
    pub async fn reaped(&self, node_id: &str, incarnation: &str, session_ids: &[String]) -> Result<(), StoreError> {
        let mut pipe = redis::pipe();
        for id in session_ids {
            pipe.cmd("DEL").arg(self.key(&format!("session:{id}"))).ignore();
        }
        pipe.cmd("SREM").arg(self.key("nodes")).arg(node_id).ignore();
        pipe.cmd("SET").arg(self.key(&format!("reaped:{node_id}"))).arg(incarnation).arg("PX").arg(86_400_000u64);
        pipe.ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(redis_err)
    }

    /// Stop watching `node_id` and drop its heartbeat (a clean stop: nothing to end; or a node
    /// seen too long ago).
    pub async fn unwatch(&self, node_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .cmd("SREM")
            .arg(self.key("nodes"))
            .arg(node_id)
            .ignore()
            .cmd("DEL")
            .arg(self.key(&format!("node:{node_id}")))
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(redis_err)
    }

    /// Drop the notice that `node_id` was declared dead (it has ended its sessions).
    pub async fn clear_reaped(&self, node_id: &str) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("DEL").arg(self.key(&format!("reaped:{node_id}"))).query_async(&mut c).await.map_err(redis_err)
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

    /// Push a final turn onto the session's recent window, while the session is registered
    /// (see [`PUSH_RECENT_SCRIPT`]).
    pub async fn push_recent(&self, turn: &StoredTurn) -> Result<(), StoreError> {
        let json = serde_json::to_string(turn).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let mut c = self.conn.clone();
        redis::cmd("EVAL")
            .arg(PUSH_RECENT_SCRIPT)
            .arg(2)
            .arg(self.key(&format!("recent:{}", turn.session_id)))
            .arg(self.key(&format!("session:{}", turn.session_id)))
            .arg(json)
            .arg(RECENT_TURNS - 1)
            .arg(3_600_000u64)
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
