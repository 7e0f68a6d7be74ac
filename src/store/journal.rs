//! The store writer's local journal: an append-only, fsync'd file of writes that are not yet in
//! the database, so that neither a long database outage nor a crash loses them.
//!
//! Every session write that must survive (`connected`, each final utterance, `ended`) is
//! appended here first by the journal thread ([`JournalHandle::submit`]), in batches (group
//! commit: one `write` + one `fdatasync` per batch), and only then handed to the writer's bounded
//! queue. Whoever waits on a write's [`Durability`] (the session task holding back a final
//! transcript until it is kept) is answered after the `fdatasync`.
//!
//! * **Spill.** When the writer's queue is full, the write stays only in the journal, and so do
//!   all later ones (order is kept): the writer reads them back from the file once its queue is
//!   empty ([`Journal::take_spilled`]), then the journal hands writes to the queue again.
//! * **Truncation.** A write leaves the journal when the writer has applied it; once no journaled
//!   write is outstanding the file is truncated to zero bytes.
//! * **Replay.** At start the file's records are read back in order and become the writer's
//!   first writes (before anything new). A torn last record (a crash during an append, which was
//!   never acknowledged) is dropped.
//! * **Bound.** At most `max_bytes` ([`DEFAULT_MAX_BYTES`], `KOTODAMA_JOURNAL_MAX_BYTES`). When a
//!   write does not fit, it is not journaled: it goes to the queue as before (held in memory
//!   while the process lives) and its waiter is told [`Durability::Queued`], or
//!   [`Durability::Refused`] when the queue is full as well.
//!
//! Format: one JSON object per line (`{"w":"turn",...}`), times as unix milliseconds. One file
//! per node (`<dir>/<node id>.journal`): a restarted node must keep its `KOTODAMA_NODE_ID` to
//! replay it. Never two processes on one file.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use signaling::events::Role;
use tokio::sync::{mpsc, oneshot};

use super::writer::Write;
use super::{StoredTurn, from_ms, to_ms};

/// Default bound of the journal file (64 MiB, about 200 000 turns of 300 bytes).
pub const DEFAULT_MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Writes waiting for the journal thread before [`JournalHandle::submit`] refuses.
const SUBMIT_CAPACITY: usize = 4096;
/// Writes per group commit at most.
const BATCH: usize = 256;
/// Bytes read back per [`Journal::take_spilled`] call.
const SPILL_CHUNK: usize = 1024 * 1024;

/// What became of a submitted write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Appended and fsync'd: it survives a crash and an outage.
    Journaled,
    /// Not journaled (the journal is full or failing) but queued: lost if the process dies.
    Queued,
    /// Neither journaled nor queued: the caller must rewrite it later.
    Refused,
}

impl Durability {
    /// Whether the write survives a crash of this process.
    pub fn is_durable(self) -> bool {
        self == Durability::Journaled
    }
}

/// A journal record (one line).
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "w", rename_all = "snake_case")]
enum Record {
    Connected {
        id: String,
        at_ms: i64,
    },
    Turn {
        session_id: String,
        seq: u64,
        role: Role,
        text: String,
        interrupted: bool,
        started_at_ms: Option<i64>,
        ended_at_ms: i64,
        tool_calls: Option<serde_json::Value>,
    },
    Ended {
        id: String,
        at_ms: i64,
        reason: String,
    },
}

impl Record {
    /// The record of `w`; None for writes the journal does not keep (flags, usage, flush).
    fn of(w: &Write) -> Option<Record> {
        Some(match w {
            Write::Connected { id, at } => Record::Connected { id: id.clone(), at_ms: to_ms(*at) },
            Write::Turn(t) => Record::Turn {
                session_id: t.session_id.clone(),
                seq: t.seq,
                role: t.role,
                text: t.text.clone(),
                interrupted: t.interrupted,
                started_at_ms: t.started_at.map(to_ms),
                ended_at_ms: to_ms(t.ended_at),
                tool_calls: t.tool_calls.clone(),
            },
            Write::Ended { id, at, reason } => {
                Record::Ended { id: id.clone(), at_ms: to_ms(*at), reason: reason.clone() }
            }
            _ => return None,
        })
    }

    fn into_write(self) -> Write {
        match self {
            Record::Connected { id, at_ms } => Write::Connected { id, at: from_ms(at_ms) },
            Record::Turn { session_id, seq, role, text, interrupted, started_at_ms, ended_at_ms, tool_calls } => {
                Write::Turn(StoredTurn {
                    session_id,
                    seq,
                    role,
                    text,
                    interrupted,
                    started_at: started_at_ms.map(from_ms),
                    ended_at: from_ms(ended_at_ms),
                    tool_calls,
                })
            }
            Record::Ended { id, at_ms, reason } => Write::Ended { id, at: from_ms(at_ms), reason },
        }
    }
}

/// The journal file and its bookkeeping (shared by the journal thread and the writer).
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Offset of the first record not handed to the queue (spill mode) and how many follow.
    spill_from: Option<u64>,
    spilled: u64,
    /// Journaled writes not yet applied by the writer.
    outstanding: u64,
    /// The last append or fsync failed (the journal is skipped until one succeeds).
    failing: bool,
}

/// Errors opening the journal (at start: they name the key to fix).
#[derive(Debug, thiserror::Error)]
#[error("journal {path}: {source} (set KOTODAMA_JOURNAL_DIR to a writable directory)")]
pub struct JournalError {
    /// The journal file.
    pub path: String,
    /// The IO error.
    #[source]
    pub source: std::io::Error,
}

impl Journal {
    /// Open (or create) `<dir>/<name>.journal`. Records left by an earlier run are kept and
    /// become the writer's first writes (a torn last line is cut off). Errors: the directory or
    /// file cannot be created, read or written.
    pub fn open(dir: &Path, name: &str, max_bytes: u64) -> Result<Arc<Journal>, JournalError> {
        let safe: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        let path = dir.join(format!("{safe}.journal"));
        let err = |source| JournalError { path: path.display().to_string(), source };
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path).map_err(err)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(err)?;
        let (records, good) = parse(&bytes);
        if (good as usize) < bytes.len() {
            tracing::warn!(path = %path.display(), dropped_bytes = bytes.len() - good as usize, "journal: torn last record dropped");
            file.set_len(good).map_err(err)?;
        }
        let n = records.len() as u64;
        if n > 0 {
            tracing::warn!(path = %path.display(), writes = n, bytes = good, "journal: replaying writes left by the last run");
        }
        let state =
            State { file, len: good, spill_from: (n > 0).then_some(0), spilled: n, outstanding: n, failing: false };
        Ok(Arc::new(Journal { path, max_bytes, state: Mutex::new(state) }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the journal now.
    pub fn bytes(&self) -> u64 {
        self.lock().len
    }

    /// Journaled writes waiting only in the file (not in the queue).
    pub fn spilled(&self) -> u64 {
        self.lock().spilled
    }

    /// Append `lines` (whole records) and fsync; false on an IO error (logged once).
    fn append(&self, st: &mut State, lines: &[u8]) -> bool {
        let res = st.file.write_all(lines).and_then(|()| st.file.sync_data());
        match res {
            Ok(()) => {
                st.len += lines.len() as u64;
                if std::mem::replace(&mut st.failing, false) {
                    tracing::warn!(path = %self.path.display(), "journal writable again");
                }
                true
            }
            Err(e) => {
                // A partial line may be left: cut back to the last whole record.
                let _ = st.file.set_len(st.len);
                if !std::mem::replace(&mut st.failing, true) {
                    tracing::error!(path = %self.path.display(), error = %e, "journal append failed; writes are held in memory only");
                }
                false
            }
        }
    }

    /// One write applied by the writer (journaled ones only): truncate once none is left.
    pub fn applied(&self) {
        let mut st = self.lock();
        st.outstanding = st.outstanding.saturating_sub(1);
        if st.outstanding == 0 && st.spill_from.is_none() && st.len > 0 {
            match st.file.set_len(0) {
                Ok(()) => st.len = 0,
                Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "journal truncation failed"),
            }
        }
    }

    /// The next spilled writes, in order (about [`SPILL_CHUNK`] bytes), or None when nothing is
    /// spilled. Once the last one is taken the journal hands new writes to the queue again.
    pub fn take_spilled(&self) -> Option<Vec<Write>> {
        let mut st = self.lock();
        let from = st.spill_from?;
        let want = usize::try_from(st.len - from).unwrap_or(usize::MAX).min(SPILL_CHUNK);
        let mut buf = vec![0u8; want];
        let read = st.file.seek(SeekFrom::Start(from)).and_then(|_| st.file.read_exact(&mut buf));
        if let Err(e) = read {
            tracing::error!(path = %self.path.display(), error = %e, "journal read failed; spilled writes lost");
            st.outstanding = st.outstanding.saturating_sub(st.spilled);
            (st.spill_from, st.spilled) = (None, 0);
            return None;
        }
        let (mut records, mut used) = parse(&buf);
        if records.is_empty() && want > 0 {
            // One record longer than a chunk: read it whole.
            let end = buf.len();
            let mut rest = Vec::new();
            let _ = st.file.read_to_end(&mut rest);
            buf.extend_from_slice(&rest);
            (records, used) = parse(&buf);
            if records.is_empty() {
                tracing::error!(path = %self.path.display(), bytes = end, "journal record unreadable; spilled writes lost");
                st.outstanding = st.outstanding.saturating_sub(st.spilled);
                (st.spill_from, st.spilled) = (None, 0);
                return None;
            }
        }
        let next = from + used;
        st.spilled = st.spilled.saturating_sub(records.len() as u64);
        st.spill_from = (next < st.len).then_some(next);
        if st.spill_from.is_none() {
            st.spilled = 0;
        }
        Some(records.into_iter().map(Record::into_write).collect())
    }
}

/// The whole records of `bytes` and the length they take (a torn or bad line ends the parse).
fn parse(bytes: &[u8]) -> (Vec<Record>, u64) {
    let mut records = Vec::new();
    let mut used = 0usize;
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if line.last() != Some(&b'\n') {
            break;
        }
        match serde_json::from_slice::<Record>(&line[..line.len() - 1]) {
            Ok(r) => records.push(r),
            Err(_) => break,
        }
        used += line.len();
    }
    (records, used as u64)
}

/// A write waiting for the journal thread.
struct Submission {
    write: Write,
    ack: Option<oneshot::Sender<Durability>>,
}

/// Handle to the journal thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct JournalHandle {
    tx: mpsc::Sender<Submission>,
    journal: Arc<Journal>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission").finish_non_exhaustive()
    }
}

impl JournalHandle {
    /// Start the journal thread: it appends submitted writes, then hands them to `queue` (the
    /// writer's queue; `true` marks a journaled write). It ends when every handle is dropped.
    pub fn spawn(journal: Arc<Journal>, queue: mpsc::Sender<(Write, bool)>) -> std::io::Result<JournalHandle> {
        let (tx, rx) = mpsc::channel(SUBMIT_CAPACITY);
        let j = Arc::clone(&journal);
        std::thread::Builder::new().name("store-journal".into()).spawn(move || run(j, rx, queue))?;
        Ok(JournalHandle { tx, journal })
    }

    /// Submit `w` without waiting. With `ack`, the returned receiver says once it is durable (or
    /// why not). Err(w) when the journal thread's queue is full or gone (the caller falls back).
    pub fn submit(&self, w: Write, ack: bool) -> Result<Option<oneshot::Receiver<Durability>>, Write> {
        let (tx, rx) = if ack {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        match self.tx.try_send(Submission { write: w, ack: tx }) {
            Ok(()) => Ok(rx),
            Err(e) => Err(e.into_inner().write),
        }
    }

    /// Wait until everything submitted before is appended and handed on (to the queue or the
    /// spill), waiting for room in the thread's queue.
    pub async fn barrier(&self) {
        let (done, _) = oneshot::channel();
        let (ack, rx) = oneshot::channel();
        if self.tx.send(Submission { write: Write::Flush(done), ack: Some(ack) }).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// The journal.
    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }
}

fn run(journal: Arc<Journal>, mut rx: mpsc::Receiver<Submission>, queue: mpsc::Sender<(Write, bool)>) {
    let mut batch: Vec<Submission> = Vec::with_capacity(BATCH);
    let mut lines: Vec<u8> = Vec::new();
    let mut ends: Vec<Option<usize>> = Vec::with_capacity(BATCH);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(s) => batch.push(s),
                Err(_) => break,
            }
        }
        commit(&journal, &mut batch, &mut lines, &mut ends, &queue);
    }
}

/// Append one batch (one fsync), hand its writes to the queue unless spilling, answer waiters.
fn commit(
    journal: &Journal,
    batch: &mut Vec<Submission>,
    lines: &mut Vec<u8>,
    ends: &mut Vec<Option<usize>>,
    queue: &mpsc::Sender<(Write, bool)>,
) {
    lines.clear();
    ends.clear();
    let mut st = journal.lock();
    let room = journal.max_bytes.saturating_sub(st.len);
    for s in batch.iter() {
        let start = lines.len();
        let fits = Record::of(&s.write).is_some_and(|r| serde_json::to_writer(&mut *lines, &r).is_ok());
        lines.push(b'\n');
        if !fits || (lines.len() as u64) > room {
            lines.truncate(start);
            ends.push(None);
        } else {
            ends.push(Some(lines.len()));
        }
    }
    let base = st.len;
    let appended = !lines.is_empty() && journal.append(&mut st, lines);
    let mut prev_end = 0usize;
    for (s, end) in batch.drain(..).zip(ends.iter()) {
        let start = base + prev_end as u64;
        prev_end = end.unwrap_or(prev_end);
        let durability = if matches!(s.write, Write::Flush(_)) {
            // A barrier ([`JournalHandle::barrier`]): everything before it is handed on.
            Durability::Queued
        } else if appended && end.is_some() {
            st.outstanding += 1;
            if st.spill_from.is_none() && queue.try_send((s.write, true)).is_err() {
                // The queue is full: this and every later write wait in the file, in order.
                st.spill_from = Some(start);
                tracing::warn!(path = %journal.path.display(), "store queue full; writes spill to the journal");
            }
            if st.spill_from.is_some() {
                st.spilled += 1;
            }
            Durability::Journaled
        } else {
            match queue.try_send((s.write, false)) {
                Ok(()) => Durability::Queued,
                Err(_) => Durability::Refused,
            }
        };
        if let Some(ack) = s.ack {
            let _ = ack.send(durability);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn turn(seq: u64) -> Write {
        Write::Turn(StoredTurn {
            session_id: "s1".into(),
            seq,
            role: Role::User,
            text: format!("turn {seq}"),
            interrupted: false,
            started_at: None,
            ended_at: SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_000 + seq),
            tool_calls: None,
        })
    }

    fn seq_of(w: &Write) -> u64 {
        match w {
            Write::Turn(t) => t.seq,
            _ => u64::MAX,
        }
    }

    #[tokio::test]
    async fn writes_spill_when_the_queue_is_full_and_come_back_in_order() {
        let dir = std::env::temp_dir().join(format!("journal-test-{}", signaling::id::new_id("j")));
        let journal = Journal::open(&dir, "node", DEFAULT_MAX_BYTES).unwrap();
        let (qtx, mut qrx) = mpsc::channel(2);
        let h = JournalHandle::spawn(Arc::clone(&journal), qtx).unwrap();
        let mut acks = Vec::new();
        for seq in 0..10 {
            acks.push(h.submit(turn(seq), true).unwrap().unwrap());
        }
        for a in acks {
            assert_eq!(a.await.unwrap(), Durability::Journaled);
        }
        // Two fit the queue; eight wait in the file.
        assert_eq!(journal.spilled(), 8);
        let mut seen: Vec<u64> = Vec::new();
        while let Ok((w, journaled)) = qrx.try_recv() {
            assert!(journaled);
            seen.push(seq_of(&w));
            journal.applied();
        }
        while let Some(ws) = journal.take_spilled() {
            for w in ws {
                seen.push(seq_of(&w));
                journal.applied();
            }
        }
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(journal.bytes(), 0, "truncated once everything was applied");
        // New writes go to the queue again.
        assert_eq!(h.submit(turn(10), true).unwrap().unwrap().await.unwrap(), Durability::Journaled);
        assert_eq!(seq_of(&qrx.recv().await.unwrap().0), 10);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_restart_replays_what_was_not_applied_and_drops_a_torn_record() {
        let dir = std::env::temp_dir().join(format!("journal-test-{}", signaling::id::new_id("j")));
        {
            let journal = Journal::open(&dir, "node", DEFAULT_MAX_BYTES).unwrap();
            let (qtx, _qrx) = mpsc::channel(16);
            let h = JournalHandle::spawn(Arc::clone(&journal), qtx).unwrap();
            for seq in 0..3 {
                h.submit(turn(seq), true).unwrap().unwrap().await.unwrap();
            }
            // "Crash": nothing applied. A torn append follows.
            let mut f = OpenOptions::new().append(true).open(journal.path()).unwrap();
            f.write_all(br#"{"w":"turn","session_id":"s1","se"#).unwrap();
        }
        let journal = Journal::open(&dir, "node", DEFAULT_MAX_BYTES).unwrap();
        let replayed: Vec<u64> = journal.take_spilled().unwrap().iter().map(seq_of).collect();
        assert_eq!(replayed, vec![0, 1, 2]);
        assert!(journal.take_spilled().is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_full_journal_says_so_and_still_queues() {
        let dir = std::env::temp_dir().join(format!("journal-test-{}", signaling::id::new_id("j")));
        let journal = Journal::open(&dir, "node", 200).unwrap();
        let (qtx, mut qrx) = mpsc::channel(16);
        let h = JournalHandle::spawn(Arc::clone(&journal), qtx).unwrap();
        assert_eq!(h.submit(turn(0), true).unwrap().unwrap().await.unwrap(), Durability::Journaled);
        assert_eq!(h.submit(turn(1), true).unwrap().unwrap().await.unwrap(), Durability::Queued);
        assert!(qrx.recv().await.unwrap().1, "the first is journaled");
        assert!(!qrx.recv().await.unwrap().1, "the second only queued");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
