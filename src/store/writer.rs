//! The node's store writer: one task that applies session and transcript writes in order, so
//! the session tasks (which own the audio path) never wait on the database.
//!
//! Run loop: receive a [`Write`] from the bounded queue, apply it (retrying transient failures
//! with backoff), repeat; a [`Write::Flush`] is answered once everything queued before it is
//! applied. One task means the writes of one session reach the database in the order they
//! were made (`connected`, turns, `ended`).
//!
//! Outages: while the database is unreachable ([`StoreError::Connect`]) the write at the head of
//! the queue is retried for as long as it takes (backoff up to 2 s), so an outage loses nothing
//! as long as the queue has room; the writer reports the store as unavailable meanwhile
//! ([`StoreWriter::store_available`], which `/readyz` follows) and logs the outage once when it
//! starts and once when it ends. Other failures ([`StoreError::Query`]) get a few attempts.
//!
//! Journal ([`super::journal`], the server's default): session writes (`connected`, turns,
//! `ended`) go through [`StoreWriter::submit`], are appended to an fsync'd local file first and
//! then queued; when the queue ([`QUEUE_CAPACITY`] writes) is full they wait in the file and the
//! writer reads them back, in order, once its queue is empty. Nothing is dropped while the
//! journal has room, and a crash loses nothing journaled (replayed at start).
//!
//! Beyond that (no journal, or the journal full): the session task only ever calls
//! [`StoreWriter::try_write`]/[`StoreWriter::submit`]. When the queue is full the write is
//! dropped *from the queue*, counted (`dropped`), and the caller marks its session dirty; when
//! that session ends, its whole transcript and end are rewritten with [`StoreWriter::write`]
//! (which waits for room, off the audio path). Turn writes are idempotent by
//! `(session_id, seq)`, so the rewrite is harmless. A crash then can lose those turns: the count
//! says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};

use super::journal::{Durability, Journal, JournalHandle};
use super::redis::Redis;
use super::{Store, StoreError, StoredTurn};

/// Writes queued per node before [`StoreWriter::try_write`] refuses.
pub const QUEUE_CAPACITY: usize = 4096;
/// Attempts per write when the database fails transiently.
const MAX_ATTEMPTS: u32 = 5;
/// How long a [`Write::Flush`] waits for the recent-turns pushes to Redis still in flight (they
/// are best effort: a slow Redis must not hold a flush, e.g. a privacy delete, for long).
const RECENT_FLUSH_WAIT: Duration = Duration::from_secs(2);

/// One write.
#[derive(Debug)]
pub enum Write {
    /// The session's media flowed.
    Connected {
        /// Session id.
        id: String,
        /// When.
        at: SystemTime,
    },
    /// A final utterance.
    Turn(StoredTurn),
    /// A moderation flag for the review queue.
    Flag(super::StoredFlag),
    /// What a session used (before its `Ended`).
    Usage(super::StoredUsage),
    /// The session ended.
    Ended {
        /// Session id.
        id: String,
        /// When.
        at: SystemTime,
        /// The API's end reason.
        reason: String,
    },
    /// Answer when everything queued before this is applied.
    Flush(oneshot::Sender<()>),
}

/// Counters of the writer.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Writes applied.
    pub written: AtomicU64,
    /// Writes refused by a full queue (rewritten at the session's end).
    pub dropped: AtomicU64,
    /// Writes that failed after every retry.
    pub failed: AtomicU64,
    /// The last write found the database unreachable (cleared by the next success).
    pub unavailable: AtomicBool,
}

/// Handle to the node's writer task. Cheap to clone.
#[derive(Clone)]
pub struct StoreWriter {
    /// The bounded queue; `true` marks a write that is also in the journal.
    tx: mpsc::Sender<(Write, bool)>,
    stats: Arc<WriterStats>,
    journal: Option<JournalHandle>,
}

impl std::fmt::Debug for StoreWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreWriter").field("stats", &self.stats).finish()
    }
}

impl StoreWriter {
    /// Start the writer task for `store`. It ends when every handle is dropped.
    /// With `redis`, each stored turn is also pushed onto its session's recent window.
    pub fn spawn(store: Arc<dyn Store>, redis: Option<Redis>) -> (StoreWriter, JoinHandle<()>) {
        Self::spawn_with_capacity(store, redis, QUEUE_CAPACITY)
    }

    /// [`StoreWriter::spawn`] with another queue capacity (tests of the overflow policy).
    pub fn spawn_with_capacity(
        store: Arc<dyn Store>,
        redis: Option<Redis>,
        capacity: usize,
    ) -> (StoreWriter, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(WriterStats::default());
        let join = tokio::spawn(run(store, redis, rx, Arc::clone(&stats), None));
        (StoreWriter { tx, stats, journal: None }, join)
    }

    /// [`StoreWriter::spawn_with_capacity`] with a local journal ([`super::journal`]): session
    /// writes are appended and fsync'd before they are queued, spill to the file when the queue
    /// is full, and the journal's records left by an earlier run are applied first.
    /// Errors: the journal thread cannot be started.
    pub fn spawn_with_journal(
        store: Arc<dyn Store>,
        redis: Option<Redis>,
        capacity: usize,
        journal: Arc<Journal>,
    ) -> std::io::Result<(StoreWriter, JoinHandle<()>)> {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(WriterStats::default());
        let handle = JournalHandle::spawn(Arc::clone(&journal), tx.clone())?;
        let join = tokio::spawn(run(store, redis, rx, Arc::clone(&stats), Some(journal)));
        Ok((StoreWriter { tx, stats, journal: Some(handle) }, join))
    }

    /// Submit a session write (`connected`, a turn, `ended`): through the journal when there is
    /// one, else straight to the queue. With `ack`, the receiver says when (and whether) it is
    /// durable; without a journal it answers [`Durability::Queued`] at once. False (and
    /// counted) when it could be neither journaled nor queued: the caller rewrites it later.
    pub fn submit(&self, w: Write, ack: bool) -> (bool, Option<oneshot::Receiver<Durability>>) {
        let w = match &self.journal {
            Some(j) => match j.submit(w, ack) {
                Ok(rx) => return (true, rx),
                Err(w) => w,
            },
            None => w,
        };
        let queued = self.try_write(w);
        let rx = ack.then(|| {
            let (tx, rx) = oneshot::channel();
            let _ = tx.send(if queued { Durability::Queued } else { Durability::Refused });
            rx
        });
        (queued, rx)
    }

    /// Writes waiting for the database: in the queue and spilled to the journal.
    pub fn queued(&self) -> u64 {
        let in_queue = self.tx.max_capacity().saturating_sub(self.tx.capacity()) as u64;
        in_queue + self.journal.as_ref().map_or(0, |j| j.journal().spilled())
    }

    /// Bytes in the journal (0 without one).
    pub fn journal_bytes(&self) -> u64 {
        self.journal.as_ref().map_or(0, |j| j.journal().bytes())
    }

    /// Queue `w` without waiting; false (and counted) when the queue is full or the writer is gone.
    pub fn try_write(&self, w: Write) -> bool {
        match self.tx.try_send((w, false)) {
            Ok(()) => true,
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Queue `w`, waiting for room (never on the audio path).
    pub async fn write(&self, w: Write) {
        if self.tx.send((w, false)).await.is_err() {
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wait until everything submitted or queued so far is applied (or failed for good).
    pub async fn flush(&self) {
        if let Some(j) = &self.journal {
            j.barrier().await;
        }
        let (tx, rx) = oneshot::channel();
        if self.tx.send((Write::Flush(tx), false)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// False while writes wait for an unreachable database.
    pub fn store_available(&self) -> bool {
        !self.stats.unavailable.load(Ordering::Relaxed)
    }

    /// The counters.
    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }
}

async fn run(
    store: Arc<dyn Store>,
    redis: Option<Redis>,
    mut rx: mpsc::Receiver<(Write, bool)>,
    stats: Arc<WriterStats>,
    journal: Option<Arc<Journal>>,
) {
    // Recent-turns pushes in flight: a flush waits for them, so a privacy delete that flushes
    // and then removes the session's Redis keys cannot be followed by a push that re-creates one.
    let mut pushes = JoinSet::new();
    loop {
        while pushes.try_join_next().is_some() {}
        // Spilled writes come after everything queued before the spill: only read them back
        // once the queue is empty.
        if rx.is_empty()
            && let Some(batch) = journal.as_ref().and_then(|j| j.take_spilled())
        {
            for w in batch {
                apply_with_retry(store.as_ref(), &redis, &w, &stats, 0, &mut pushes).await;
                if let Some(j) = &journal {
                    j.applied();
                }
            }
            continue;
        }
        let Some((w, journaled)) = rx.recv().await else { break };
        if let Write::Flush(done) = w {
            // Everything spilled before the flush is applied first.
            while let Some(batch) = journal.as_ref().and_then(|j| j.take_spilled()) {
                for w in batch {
                    apply_with_retry(store.as_ref(), &redis, &w, &stats, rx.len(), &mut pushes).await;
                    if let Some(j) = &journal {
                        j.applied();
                    }
                }
            }
            let _ =
                tokio::time::timeout(RECENT_FLUSH_WAIT, async { while pushes.join_next().await.is_some() {} }).await;
            let _ = done.send(());
            continue;
        }
        apply_with_retry(store.as_ref(), &redis, &w, &stats, rx.len(), &mut pushes).await;
        if journaled && let Some(j) = &journal {
            j.applied();
        }
    }
}

/// Apply one write: transient failures are retried a few times, an unreachable database for as
/// long as it takes.
async fn apply_with_retry(
    store: &dyn Store,
    redis: &Option<Redis>,
    w: &Write,
    stats: &WriterStats,
    queued: usize,
    pushes: &mut JoinSet<()>,
) {
    let (what, id) = match w {
        Write::Flush(_) => return,
        Write::Connected { id, .. } => ("connected", id),
        Write::Turn(t) => ("turn", &t.session_id),
        Write::Flag(f) => ("flag", &f.session_id),
        Write::Usage(u) => ("usage", &u.session_id),
        Write::Ended { id, .. } => ("ended", id),
    };
    let mut attempt = 0;
    loop {
        attempt += 1;
        match apply(store, w).await {
            Ok(()) => {
                if stats.unavailable.swap(false, Ordering::Relaxed) {
                    tracing::warn!(queued, "store reachable again; queued writes resume");
                }
                stats.written.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(session_id = %id, write = what, "stored");
                if let (Some(redis), Write::Turn(t)) = (redis, w) {
                    // Best effort and never in the way of the durable writes behind it.
                    let (redis, t) = (redis.clone(), t.clone());
                    pushes.spawn(async move {
                        if let Err(e) = redis.push_recent(&t).await {
                            tracing::debug!(session_id = %t.session_id, error = %e, "recent-turns window not updated");
                        }
                    });
                }
                return;
            }
            Err(e @ StoreError::Connect(_)) => {
                // Unreachable: wait for it, however long; the queue and the journal hold what
                // comes meanwhile.
                if !stats.unavailable.swap(true, Ordering::Relaxed) {
                    tracing::error!(session_id = %id, write = what, error = %e, "store unreachable; writes wait for it");
                }
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) if e.retryable() && attempt < MAX_ATTEMPTS => {
                tracing::warn!(session_id = %id, write = what, attempt, error = %e, "store write failed; retrying");
                tokio::time::sleep(backoff(attempt)).await;
            }
            Err(e) => {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(session_id = %id, write = what, error = %e, "store write lost");
                return;
            }
        }
    }
}

/// 50 ms, 200 ms, 800 ms, then 2 s between attempts.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(4u64.saturating_pow(attempt.saturating_sub(1).min(8))))
        .min(Duration::from_secs(2))
}

async fn apply(store: &dyn Store, w: &Write) -> Result<(), StoreError> {
    match w {
        Write::Connected { id, at } => store.mark_connected(id, *at).await,
        Write::Turn(t) => store.put_turn(t).await,
        Write::Flag(f) => store.put_flag(f).await,
        Write::Usage(u) => store.put_usage(u).await,
        Write::Ended { id, at, reason } => store.mark_ended(id, *at, reason).await,
        Write::Flush(_) => Ok(()),
    }
}
