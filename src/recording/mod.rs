//! Session recording: the user's and the character's audio as Ogg Opus files and an event log of
//! everything the conversation core was fed and decided, so that `kotodama replay` can drive the
//! same core again on virtual time ([`crate::replay`]).
//!
//! A recording is three objects under `<session_id>/` in the recording store
//! ([`crate::config::RecordingSettings::url`], the `object_store` crate: a local directory by
//! default, or an S3-compatible bucket):
//!
//! | object | what |
//! |---|---|
//! | `events.jsonl` | [`format::Line`]s: a header, the core's inputs with their media time, its outputs, the end |
//! | `user.opus` | the client's Opus packets as received, on the session's media timeline (Ogg Opus, RFC 7845) |
//! | `agent.opus` | the frames sent to the client, on the same timeline |
//!
//! The session task ([`crate::session::task`]) hands every input and output to a [`Recorder`]
//! (a copy into a bounded channel: it never blocks the 20 ms path); a writer on a blocking thread
//! serialises them. A full channel loses lines and marks the recording incomplete; past
//! `max_bytes` the recording stops and is marked incomplete. Recordings older than
//! `retention_days` are deleted by a sweep every [`RETENTION_SWEEP`].

pub mod format;
pub mod ogg_opus;

use std::io::{BufWriter, Write};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use futures::TryStreamExt as _;
use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;
use tokio::sync::mpsc;

use self::format::{AGENT_AUDIO_FILE, EVENTS_FILE, FILES, Header, Line, RecInput, RecOutput, USER_AUDIO_FILE, ns};
use self::ogg_opus::{GRANULE_RATE, OggOpusWriter};
use crate::config::RecordingSettings;
use crate::session::conversation::{Input, Output};

/// Lines waiting for the writer: about 40 s of a talking session (client packets, provider
/// audio, frames out); past it lines are lost and the recording is marked incomplete.
pub const RECORDER_QUEUE: usize = 4096;
/// How often recordings past their retention are deleted.
pub const RETENTION_SWEEP: Duration = Duration::from_secs(3600);

/// Why a recording could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordingError {
    /// The store refused (I/O, credentials, network).
    #[error("recording store: {0}")]
    Store(#[from] object_store::Error),
    /// Local files.
    #[error("recording files: {0}")]
    Io(#[from] std::io::Error),
    /// The configured URL cannot be used.
    #[error("recording.url: {0}")]
    Url(String),
}

/// The recording store of this node.
pub struct Recordings {
    store: Arc<dyn ObjectStore>,
    /// The store's directory when it is the local filesystem: recordings are written in place.
    local: Option<PathBuf>,
    settings: RecordingSettings,
}

impl std::fmt::Debug for Recordings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recordings").field("local", &self.local).field("url", &self.settings.url).finish()
    }
}

impl Recordings {
    /// The store `settings.url` names (a local directory is created), with its retention sweep
    /// started when called inside a tokio runtime. Errors: an unusable URL or directory.
    pub fn open(settings: &RecordingSettings) -> Result<Arc<Self>, RecordingError> {
        let url = settings.url.trim();
        let (store, local): (Arc<dyn ObjectStore>, Option<PathBuf>) = if let Some(rest) = url.strip_prefix("s3://") {
            let s3 = object_store::aws::AmazonS3Builder::from_env()
                .with_url(format!("s3://{rest}"))
                .build()
                .map_err(|e| RecordingError::Url(e.to_string()))?;
            let prefix = rest.split_once('/').map(|(_, p)| p.trim_matches('/')).unwrap_or("");
            if prefix.is_empty() {
                (Arc::new(s3), None)
            } else {
                (Arc::new(object_store::prefix::PrefixStore::new(s3, prefix.to_owned())), None)
            }
        } else {
            let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            std::fs::create_dir_all(&dir)?;
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
            (Arc::new(fs), Some(dir))
        };
        let this = Arc::new(Self { store, local, settings: settings.clone() });
        if settings.retention_days > 0
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(retention_loop(Arc::downgrade(&this)));
        }
        Ok(this)
    }

    /// The settings this store was opened with.
    pub fn settings(&self) -> &RecordingSettings {
        &self.settings
    }

    /// Start recording the session `header` describes. Errors: its files cannot be created.
    pub fn start(self: &Arc<Self>, header: Header) -> Result<Recorder, RecordingError> {
        let id = header.session_id.clone();
        let (dir, upload) = match &self.local {
            Some(root) => (root.join(&id), false),
            None => (std::env::temp_dir().join(format!("kotodama-recording-{id}")), true),
        };
        std::fs::create_dir_all(&dir)?;
        let mut writer = Writer::create(&dir, &header, self.settings.max_bytes)?;
        writer.write(Msg { line: Line::Header(Box::new(header)), agent_audio: None })?;
        let (tx, rx) = mpsc::channel(RECORDER_QUEUE);
        let store = upload.then(|| Arc::clone(self));
        let rt = tokio::runtime::Handle::current();
        let done = tokio::task::spawn_blocking(move || {
            let complete = writer.run(rx);
            if let Some(store) = store {
                rt.block_on(store.upload(&id, &dir));
            }
            complete
        });
        Ok(Recorder { tx, t: Duration::ZERO, lost: 0, done })
    }

    /// Copy a finished recording from the staging directory `dir` into the store, then remove it.
    async fn upload(&self, id: &str, dir: &FsPath) {
        for name in FILES {
            let path = dir.join(name);
            let result = match tokio::fs::read(&path).await {
                Ok(bytes) => {
                    self.store.put(&object(id, name), bytes.into()).await.map(|_| ()).map_err(|e| e.to_string())
                }
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = result {
                tracing::error!(session_id = %id, file = name, error = %e, "recording upload failed");
            }
        }
        let _ = tokio::fs::remove_dir_all(dir).await;
    }

    /// The recording's files with their sizes (bytes); empty when there is none.
    pub async fn files(&self, id: &str) -> Result<Vec<(String, u64)>, RecordingError> {
        let mut out = Vec::new();
        for name in FILES {
            match self.store.head(&object(id, name)).await {
                Ok(meta) => out.push((name.to_owned(), meta.size)),
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// One file of a recording (`None`: no such recording or file). `name` must be one of
    /// [`format::FILES`].
    pub async fn read(&self, id: &str, name: &str) -> Result<Option<bytes::Bytes>, RecordingError> {
        if !FILES.contains(&name) {
            return Ok(None);
        }
        match self.store.get(&object(id, name)).await {
            Ok(r) => Ok(Some(r.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Delete every recording file older than the retention (`now - retention_days`); returns
    /// how many objects were deleted.
    pub async fn sweep(&self, now: SystemTime) -> Result<usize, RecordingError> {
        if self.settings.retention_days == 0 {
            return Ok(0);
        }
        let keep = Duration::from_secs(self.settings.retention_days * 86_400);
        let Some(cutoff) = now.checked_sub(keep) else { return Ok(0) };
        let old: Vec<ObjectPath> = self
            .store
            .list(None)
            .try_filter(|m| std::future::ready(SystemTime::from(m.last_modified) < cutoff))
            .map_ok(|m| m.location)
            .try_collect()
            .await?;
        for path in &old {
            self.store.delete(path).await?;
        }
        if let Some(root) = &self.local {
            // Directories left empty by the deletes.
            if let Ok(entries) = std::fs::read_dir(root) {
                for e in entries.flatten() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        Ok(old.len())
    }
}

fn object(id: &str, name: &str) -> ObjectPath {
    ObjectPath::from(format!("{id}/{name}"))
}

async fn retention_loop(recordings: Weak<Recordings>) {
    let mut tick = tokio::time::interval(RETENTION_SWEEP);
    loop {
        tick.tick().await;
        let Some(r) = recordings.upgrade() else { break };
        match r.sweep(SystemTime::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "recordings past their retention deleted"),
            Err(e) => tracing::warn!(error = %e, "recording retention sweep failed"),
        }
    }
}

/// One message to the writer: a line, and the Opus payload of an audio frame sent to the client.
struct Msg {
    line: Line,
    agent_audio: Option<Vec<u8>>,
}

/// The session task's end of a recording: copies inputs and outputs into the writer's queue.
pub struct Recorder {
    tx: mpsc::Sender<Msg>,
    /// Media time of the last input (outputs carry it).
    t: Duration,
    /// Lines lost to a full queue.
    lost: u64,
    done: tokio::task::JoinHandle<bool>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").field("lost", &self.lost).finish_non_exhaustive()
    }
}

impl Recorder {
    /// `input` is about to be fed at media time `now`.
    pub fn input(&mut self, now: Duration, input: &Input) {
        self.t = now;
        let line = Line::In { t_ns: ns(now), input: RecInput::from_input(input) };
        self.send(Msg { line, agent_audio: None });
    }

    /// `out` was drained (after the last input).
    pub fn output(&mut self, out: &Output<'_>) {
        let agent_audio = match out {
            Output::Audio(frame) => Some(frame.payload.to_vec()),
            _ => None,
        };
        let line = Line::Out { t_ns: ns(self.t), output: RecOutput::from_output(out) };
        self.send(Msg { line, agent_audio });
    }

    fn send(&mut self, msg: Msg) {
        if self.tx.try_send(msg).is_err() {
            self.lost += 1;
        }
    }

    /// The session ended at `now` for `reason`: the last line is written, the files closed (and
    /// uploaded to a remote store). Returns whether the recording is complete.
    pub async fn finish(self, now: Duration, reason: &str) -> bool {
        let complete = self.lost == 0;
        if self.lost > 0 {
            tracing::warn!(lost = self.lost, "recording incomplete: the writer fell behind");
        }
        let line = Line::End { t_ns: ns(now), reason: reason.to_owned(), complete };
        let _ = self.tx.send(Msg { line, agent_audio: None }).await;
        drop(self.tx);
        self.done.await.unwrap_or(false) && complete
    }
}

/// The writer's side: the event log and the two Ogg Opus files.
struct Writer {
    events: BufWriter<std::fs::File>,
    user: OggOpusWriter<BufWriter<std::fs::File>>,
    agent: OggOpusWriter<BufWriter<std::fs::File>>,
    /// Where the current user SSRC's RTP timestamps start on the timeline: (ssrc, first
    /// timestamp, its sample position).
    user_anchor: Option<(u32, u32, u64)>,
    written: u64,
    max_bytes: u64,
    truncated: bool,
}

impl Writer {
    fn create(dir: &FsPath, header: &Header, max_bytes: u64) -> std::io::Result<Self> {
        let file = |name: &str| std::fs::File::create(dir.join(name)).map(BufWriter::new);
        let comments = [("SESSION_ID", header.session_id.as_str()), ("CHARACTER", header.character.as_str())];
        let user = OggOpusWriter::new(file(USER_AUDIO_FILE)?, 1, &[comments[0], comments[1], ("ROLE", "user")])?;
        let agent = OggOpusWriter::new(file(AGENT_AUDIO_FILE)?, 2, &[comments[0], comments[1], ("ROLE", "agent")])?;
        Ok(Self { events: file(EVENTS_FILE)?, user, agent, user_anchor: None, written: 0, max_bytes, truncated: false })
    }

    /// Write until the recorder is dropped; returns whether nothing was cut or failed.
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) -> bool {
        let mut ok = true;
        while let Some(msg) = rx.blocking_recv() {
            if let Err(e) = self.write(msg) {
                tracing::error!(error = %e, "recording write failed; the rest is not recorded");
                ok = false;
                break;
            }
        }
        let closed = (|| -> std::io::Result<()> {
            self.events.flush()?;
            self.user.finish()?.flush()?;
            self.agent.finish()?.flush()
        })();
        if let Err(e) = closed {
            tracing::error!(error = %e, "closing the recording failed");
            ok = false;
        }
        ok && !self.truncated
    }

    fn write(&mut self, msg: Msg) -> std::io::Result<()> {
        let size = self.written + self.user.bytes() + self.agent.bytes();
        let last = matches!(msg.line, Line::End { .. });
        if self.truncated && !last {
            return Ok(());
        }
        if size > self.max_bytes && !last {
            self.truncated = true;
            tracing::warn!(max_bytes = self.max_bytes, "recording reached its size limit; stopped");
            return Ok(());
        }
        match (&msg.line, msg.agent_audio) {
            (Line::In { t_ns, input: RecInput::ClientOpus { ssrc, timestamp, payload, .. } }, _) => {
                let at = self.user_position(*t_ns, *ssrc, *timestamp);
                self.user.push(at, payload)?;
            }
            (Line::Out { output: RecOutput::Audio { due_us, .. }, .. }, Some(payload)) => {
                self.agent.push(due_us * GRANULE_RATE / 1_000_000, &payload)?;
            }
            _ => {}
        }
        let line = match msg.line {
            Line::End { t_ns, reason, complete } => Line::End { t_ns, reason, complete: complete && !self.truncated },
            line => line,
        };
        let mut text = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
        text.push(b'\n');
        self.written += text.len() as u64;
        self.events.write_all(&text)
    }

    /// Where a client packet goes on the timeline: its RTP timestamp relative to the first of
    /// its SSRC, which is placed at that packet's arrival.
    fn user_position(&mut self, t_ns: u64, ssrc: u32, timestamp: u32) -> u64 {
        let (_, ts0, base) = match self.user_anchor {
            Some(a) if a.0 == ssrc => a,
            _ => {
                let a = (ssrc, timestamp, t_ns * GRANULE_RATE / 1_000_000_000);
                self.user_anchor = Some(a);
                a
            }
        };
        // Within half the RTP clock's range, a timestamp before the first is a late packet.
        let delta = timestamp.wrapping_sub(ts0);
        if delta > u32::MAX / 2 { 0 } else { base + u64::from(delta) }
    }
}

/// Read an event log. Errors: I/O, or a line that is not a [`Line`] (with its number).
pub fn read_lines(text: &str) -> Result<Vec<Line>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}
