//! PocketSphinx speech-to-text (offline), decoding while the user speaks.
//!
//! Decoding is incremental: the cascade starts a stream when a turn's audio begins and pushes
//! audio as it arrives, so when our VAD commits the turn only the end of the utterance is left to
//! search (end of turn -> transcript is tens of milliseconds, not a whole decode).
//!
//! Threads: a decoder is CPU-bound C code, so each utterance runs on its own OS thread
//! (`pocketsphinx`), never on a tokio worker. Audio reaches it through a bounded queue
//! ([`AUDIO_QUEUE_CHUNKS`]; when the decoder falls that far behind, new audio is dropped and
//! counted). Decoders are expensive to load (~1 s, ~90 MB each, see BENCHMARKS.md), so they are
//! loaded on demand and pooled: nothing is loaded at the server's start (only the model files'
//! presence is checked, so a missing model still fails the start, naming the package); the first
//! session of a provider that uses PocketSphinx loads one in the background
//! ([`SpeechToText::prepare`]); at most `max_decoders` exist, a further one is loaded only when
//! every loaded one is busy with a concurrent utterance, and an utterance that finds none free
//! and the pool full waits for one.
//!
//! An utterance longer than [`MAX_UTTERANCE`] is restarted (the older part is forgotten): the
//! decoder's memory stays bounded when a turn is never committed.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{mpsc, oneshot};

use super::sphinx_ffi as ffi;
use crate::providers::Pcm;
use crate::providers::cascade::error::StageError;
use crate::providers::cascade::stt::{STT_RATE_HZ, SpeechToText, SttStream};

/// Default model directory of Debian's `pocketsphinx-en-us`.
pub const DEFAULT_MODEL_DIR: &str = "/usr/share/pocketsphinx/model/en-us";
/// Audio chunks (10 ms each from the uplink) queued per utterance before new ones are dropped.
pub const AUDIO_QUEUE_CHUNKS: usize = 1000;
/// Longest utterance kept.
pub const MAX_UTTERANCE: Duration = Duration::from_secs(60);
/// A partial transcript is offered after every this much new audio.
const PARTIAL_EVERY: Duration = Duration::from_millis(400);

struct Decoder(*mut ffi::ps_decoder_t);
// SAFETY: a decoder has no thread affinity; the pool hands each to one thread at a time.
unsafe impl Send for Decoder {}
impl Drop for Decoder {
    fn drop(&mut self) {
        // SAFETY: the pointer came from ps_init and is freed once.
        unsafe { ffi::ps_free(self.0) };
    }
}

impl Decoder {
    fn hyp(&self) -> String {
        let mut score = 0i32;
        // SAFETY: valid decoder; the returned string is owned by the decoder and copied at once.
        let p = unsafe { ffi::ps_get_hyp(self.0, &mut score) };
        if p.is_null() { String::new() } else { unsafe { CStr::from_ptr(p) }.to_string_lossy().trim().to_owned() }
    }
}

struct Pool {
    args: Vec<CString>,
    state: Mutex<PoolState>,
    returned: Condvar,
    max: usize,
    /// A background load ([`SpeechToText::prepare`]) was started.
    warming: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct PoolState {
    free: Vec<Decoder>,
    /// Decoders loaded or loading.
    count: usize,
    /// Loads in progress (at most one: loads are serialized, a taker waits for a running load
    /// rather than loading a copy of its own next to it).
    loading: usize,
}

impl Pool {
    fn load(&self) -> Result<Decoder, StageError> {
        let mut argv: Vec<*mut std::os::raw::c_char> = self.args.iter().map(|a| a.as_ptr().cast_mut()).collect();
        // SAFETY: argv points at NUL-terminated strings that outlive the call; cmd_ln copies them.
        let config = unsafe {
            ffi::cmd_ln_parse_r(std::ptr::null_mut(), ffi::ps_args(), argv.len() as i32, argv.as_mut_ptr(), 1)
        };
        if config.is_null() {
            return Err(StageError::Config("pocketsphinx rejected its arguments".into()));
        }
        // SAFETY: config is valid; ps_init takes its own reference, so ours is released after.
        let ps = unsafe { ffi::ps_init(config) };
        unsafe { ffi::cmd_ln_free_r(config) };
        if ps.is_null() {
            return Err(StageError::Config("pocketsphinx could not load its model".into()));
        }
        Ok(Decoder(ps))
    }

    fn take(&self) -> Result<Decoder, StageError> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = g.free.pop() {
                return Ok(d);
            }
            if g.loading == 0 && g.count < self.max {
                g.count += 1;
                g.loading += 1;
                drop(g);
                let d = self.load();
                let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
                g.loading -= 1;
                if d.is_err() {
                    g.count -= 1;
                }
                drop(g);
                // Waiters re-check: a loader of `prepare` gives its decoder back, others may load.
                self.returned.notify_all();
                return d;
            }
            g = self.returned.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Decoders loaded so far (in use or free), not counting one being loaded.
    fn loaded(&self) -> usize {
        let g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        g.count - g.loading
    }

    fn give_back(&self, d: Decoder) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).free.push(d);
        self.returned.notify_one();
    }
}

/// The PocketSphinx adapter.
pub struct Sphinx {
    pool: Arc<Pool>,
}

impl Sphinx {
    /// The model in `model_dir` (layout of Debian's `pocketsphinx-en-us`): checks its files are
    /// there (error: [`StageError::Config`] naming the package) and loads nothing; decoders load
    /// on first use ([`SpeechToText::prepare`], [`SpeechToText::start`]), up to `max_decoders`.
    pub fn new(model_dir: &Path, max_decoders: usize) -> Result<Self, StageError> {
        let hmm = model_dir.join("en-us");
        let lm = model_dir.join("en-us.lm.bin");
        let dict = model_dir.join("cmudict-en-us.dict");
        for p in [&hmm, &lm, &dict] {
            if !p.exists() {
                return Err(StageError::Config(format!(
                    "PocketSphinx model file {} is missing: apt-get install pocketsphinx-en-us \
                     (or set local.sphinx_model_dir)",
                    p.display()
                )));
            }
        }
        let path =
            |p: &PathBuf| CString::new(p.to_string_lossy().as_bytes()).map_err(|e| StageError::Config(e.to_string()));
        let args = vec![
            CString::new("-hmm").unwrap_or_default(),
            path(&hmm)?,
            CString::new("-lm").unwrap_or_default(),
            path(&lm)?,
            CString::new("-dict").unwrap_or_default(),
            path(&dict)?,
            CString::new("-logfn").unwrap_or_default(),
            CString::new("/dev/null").unwrap_or_default(),
        ];
        static QUIET: std::sync::Once = std::sync::Once::new();
        // SAFETY: a NULL log stream silences SphinxBase's global logger; done once, before any decoder.
        QUIET.call_once(|| unsafe { ffi::err_set_logfp(std::ptr::null_mut()) });
        let pool = Arc::new(Pool {
            args,
            state: Mutex::new(PoolState::default()),
            returned: Condvar::new(),
            max: max_decoders.max(1),
            warming: std::sync::atomic::AtomicBool::new(false),
        });
        Ok(Self { pool })
    }

    /// Decoders loaded so far (each holds its own copy of the model; 0 until first use).
    pub fn decoders_loaded(&self) -> usize {
        self.pool.loaded()
    }
}

impl SpeechToText for Sphinx {
    fn name(&self) -> &str {
        "pocketsphinx"
    }

    /// Loads the first decoder on a thread of its own, once (later ones load when utterances
    /// overlap). A failure is logged; the first utterance then reports it.
    fn prepare(&self) {
        if self.pool.warming.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let pool = Arc::clone(&self.pool);
        let spawned = std::thread::Builder::new().name("pocketsphinx-load".into()).spawn(move || {
            if pool.loaded() > 0 {
                return; // an utterance got there first
            }
            match pool.take() {
                Ok(d) => pool.give_back(d),
                Err(e) => tracing::warn!(error = %e, "loading a PocketSphinx decoder failed"),
            }
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the PocketSphinx loader thread");
        }
    }

    fn start(&self, partials: Option<mpsc::Sender<String>>) -> Result<Box<dyn SttStream>, StageError> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<i16>>(AUDIO_QUEUE_CHUNKS);
        let (done_tx, done_rx) = oneshot::channel();
        let pool = Arc::clone(&self.pool);
        std::thread::Builder::new()
            .name("pocketsphinx".into())
            .spawn(move || {
                let r = decode_utterance(&pool, rx, partials);
                let _ = done_tx.send(r);
            })
            .map_err(|e| StageError::Unavailable(format!("cannot start a decoder thread: {e}")))?;
        Ok(Box::new(SphinxStream { tx: Some(tx), done: done_rx, dropped: 0 }))
    }
}

fn decode_utterance(
    pool: &Pool,
    audio: std::sync::mpsc::Receiver<Vec<i16>>,
    partials: Option<mpsc::Sender<String>>,
) -> Result<String, StageError> {
    let dec = pool.take()?;
    let max_samples = (MAX_UTTERANCE.as_millis() as usize) * STT_RATE_HZ as usize / 1000;
    let partial_every = (PARTIAL_EVERY.as_millis() as usize) * STT_RATE_HZ as usize / 1000;
    // SAFETY (all ps_* calls below): `dec` is a valid decoder owned by this thread.
    unsafe { ffi::ps_start_utt(dec.0) };
    let mut in_utt = 0usize;
    let mut since_partial = 0usize;
    let mut last_partial = String::new();
    // The channel closes when the stream is finished or dropped: then the utterance ends.
    while let Ok(chunk) = audio.recv() {
        if in_utt + chunk.len() > max_samples {
            unsafe {
                ffi::ps_end_utt(dec.0);
                ffi::ps_start_utt(dec.0);
            }
            in_utt = 0;
        }
        unsafe { ffi::ps_process_raw(dec.0, chunk.as_ptr(), chunk.len(), 0, 0) };
        in_utt += chunk.len();
        since_partial += chunk.len();
        if since_partial >= partial_every
            && let Some(p) = &partials
        {
            since_partial = 0;
            let hyp = dec.hyp();
            if !hyp.is_empty() && hyp != last_partial {
                last_partial = hyp.clone();
                let _ = p.try_send(hyp);
            }
        }
    }
    unsafe { ffi::ps_end_utt(dec.0) };
    let text = dec.hyp();
    pool.give_back(dec);
    Ok(text)
}

struct SphinxStream {
    tx: Option<std::sync::mpsc::SyncSender<Vec<i16>>>,
    done: oneshot::Receiver<Result<String, StageError>>,
    dropped: u64,
}

impl SttStream for SphinxStream {
    fn push(&mut self, pcm: &Pcm) {
        if pcm.rate_hz != STT_RATE_HZ || pcm.samples.is_empty() {
            return;
        }
        if let Some(tx) = &self.tx
            && tx.try_send(pcm.samples.clone()).is_err()
        {
            self.dropped += 1;
        }
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<String, StageError>> {
        self.tx = None;
        let dropped = self.dropped;
        async move {
            if dropped > 0 {
                tracing::debug!(dropped, "pocketsphinx fell behind; audio chunks dropped");
            }
            self.done.await.map_err(|_| StageError::Unavailable("pocketsphinx decoder thread ended".into()))?
        }
        .boxed()
    }
}
