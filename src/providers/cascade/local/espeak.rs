//! eSpeak NG text-to-speech with phoneme timings, on one worker thread.
//!
//! eSpeak NG keeps its engine in process-global state and is not thread-safe, so the engine is
//! initialised once per process ([`Espeak::global`]) and owned by a single worker thread named
//! `espeak-ng`. Requests reach it through a bounded queue ([`QUEUE_CAPACITY`]; when full the
//! request fails at once with [`StageError::Busy`] instead of blocking a tokio worker).
//!
//! Run loop of the worker: take a job; skip it if its receiver is gone (cancelled while queued);
//! select the voice; `espeak_Synth` in synchronous mode, whose callback (on this same thread)
//! turns every audio buffer and the phoneme events inside it into a [`SpeechChunk`] and
//! `blocking_send`s it to the job's bounded channel. When the receiver is dropped (barge-in,
//! cancelled reply) the send fails and the callback returns 1, which aborts synthesis within one
//! buffer (~50 ms of audio): cancelled speech stops costing CPU at once.

use std::cell::RefCell;
use std::ffi::CString;
use std::os::raw::{c_int, c_short, c_uint};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::mpsc;

use super::espeak_ffi as ffi;
use crate::providers::Pcm;
use crate::providers::cascade::error::StageError;
use crate::providers::cascade::tts::{PhonemeMark, SpeechChunk};

/// Pending synthesis requests, all sessions together.
pub const QUEUE_CAPACITY: usize = 64;
/// Chunks buffered per request before the worker waits for the consumer (~50 ms each).
pub const CHUNK_CHANNEL_CAPACITY: usize = 16;
/// Length of the audio buffers eSpeak hands to the callback.
const BUFFER_MS: c_int = 50;
/// Longest text accepted in one request (a sentence, in practice).
pub const MAX_TEXT_BYTES: usize = 4096;
/// The voice used when a character's voice is not an eSpeak voice name.
pub const DEFAULT_VOICE: &str = "en-us+f3";

struct Job {
    text: String,
    voice: String,
    out: mpsc::Sender<Result<SpeechChunk, StageError>>,
}

/// Handle to the process's eSpeak NG worker.
pub struct Espeak {
    jobs: std::sync::mpsc::SyncSender<Job>,
    rate_hz: u32,
}

static ENGINE: OnceLock<Result<Espeak, String>> = OnceLock::new();

/// What the callback writes into, for the job being synthesised on the worker thread.
struct Sink {
    out: mpsc::Sender<Result<SpeechChunk, StageError>>,
    rate_hz: u32,
    aborted: bool,
}

thread_local! {
    static SINK: RefCell<Option<Sink>> = const { RefCell::new(None) };
}

impl Espeak {
    /// The process's engine, started on first use. Fails when eSpeak NG's data is missing.
    pub fn global() -> Result<&'static Espeak, StageError> {
        ENGINE.get_or_init(Self::start).as_ref().map_err(|e| StageError::Config(e.clone()))
    }

    /// Output sample rate (22050 Hz for the standard voices).
    pub fn rate_hz(&self) -> u32 {
        self.rate_hz
    }

    fn start() -> Result<Espeak, String> {
        let (jobs_tx, jobs_rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE_CAPACITY);
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<Result<u32, String>>(1);
        std::thread::Builder::new()
            .name("espeak-ng".into())
            .spawn(move || {
                // SAFETY: first and only initialisation of the global engine, on the thread that will
                // make every later call.
                let rate = unsafe {
                    ffi::espeak_Initialize(
                        ffi::AUDIO_OUTPUT_SYNCHRONOUS,
                        BUFFER_MS,
                        std::ptr::null(),
                        ffi::INITIALIZE_PHONEME_EVENTS | ffi::INITIALIZE_DONT_EXIT,
                    )
                };
                if rate <= 0 {
                    let _ = ready_tx.send(Err("espeak_Initialize failed: is espeak-ng-data installed? \
                                               (apt-get install libespeak-ng-dev)"
                        .to_owned()));
                    return;
                }
                // SAFETY: the callback only touches this thread's SINK.
                unsafe { ffi::espeak_SetSynthCallback(Some(synth_callback)) };
                let _ = ready_tx.send(Ok(rate as u32));
                worker(rate as u32, jobs_rx);
            })
            .map_err(|e| format!("cannot start the espeak-ng thread: {e}"))?;
        let rate_hz = ready_rx.recv().map_err(|_| "the espeak-ng thread died while starting".to_owned())??;
        Ok(Espeak { jobs: jobs_tx, rate_hz })
    }

    /// Speak `text` with `voice` (an eSpeak voice name such as `en-us+f3`; anything else gets
    /// [`DEFAULT_VOICE`]). Chunks stream out as they are synthesised; drop the receiver to cancel.
    pub fn synthesize(
        &self,
        text: &str,
        voice: &str,
    ) -> Result<mpsc::Receiver<Result<SpeechChunk, StageError>>, StageError> {
        if text.len() > MAX_TEXT_BYTES {
            return Err(StageError::BadRequest(format!("text of {} bytes exceeds {MAX_TEXT_BYTES}", text.len())));
        }
        let (tx, rx) = mpsc::channel(CHUNK_CHANNEL_CAPACITY);
        let job = Job { text: text.to_owned(), voice: voice.to_owned(), out: tx };
        self.jobs.try_send(job).map_err(|e| match e {
            std::sync::mpsc::TrySendError::Full(_) => StageError::Busy("espeak-ng queue full".into()),
            std::sync::mpsc::TrySendError::Disconnected(_) => StageError::Unavailable("espeak-ng thread ended".into()),
        })?;
        Ok(rx)
    }

    /// Speak `text` completely (for tools and tests; never call this on a tokio worker).
    pub fn synthesize_blocking(&self, text: &str, voice: &str) -> Result<(Pcm, Vec<PhonemeMark>), StageError> {
        let mut rx = self.synthesize(text, voice)?;
        let mut samples = Vec::new();
        let mut phonemes = Vec::new();
        while let Some(chunk) = rx.blocking_recv() {
            let chunk = chunk?;
            samples.extend_from_slice(&chunk.pcm.samples);
            phonemes.extend(chunk.phonemes);
        }
        Ok((Pcm { rate_hz: self.rate_hz, samples }, phonemes))
    }
}

fn worker(rate_hz: u32, jobs: std::sync::mpsc::Receiver<Job>) {
    let mut current_voice = String::new();
    while let Ok(job) = jobs.recv() {
        if job.out.is_closed() {
            continue; // cancelled while queued
        }
        let voice = if is_espeak_voice(&job.voice) { job.voice.as_str() } else { DEFAULT_VOICE };
        if voice != current_voice {
            let ok = CString::new(voice)
                // SAFETY: a valid NUL-terminated string; engine calls are serialised on this thread.
                .map(|c| unsafe { ffi::espeak_SetVoiceByName(c.as_ptr()) } == ffi::EE_OK)
                .unwrap_or(false);
            if !ok {
                let _ = job.out.blocking_send(Err(StageError::BadRequest(format!("unknown eSpeak voice `{voice}`"))));
                continue;
            }
            current_voice = voice.to_owned();
        }
        let Ok(text) = CString::new(job.text.replace('\0', " ")) else { continue };
        let out = job.out.clone();
        SINK.with(|s| *s.borrow_mut() = Some(Sink { out: job.out, rate_hz, aborted: false }));
        let mut id: c_uint = 0;
        // SAFETY: text is NUL-terminated and outlives the synchronous call; the callback is ours.
        let rc = unsafe {
            ffi::espeak_Synth(
                text.as_ptr().cast(),
                text.as_bytes_with_nul().len(),
                0,
                ffi::POS_CHARACTER,
                0,
                ffi::CHARS_UTF8,
                &mut id,
                std::ptr::null_mut(),
            )
        };
        let aborted = SINK.with(|s| s.borrow_mut().take().is_some_and(|s| s.aborted));
        if rc != ffi::EE_OK && !aborted {
            let _ = out.blocking_send(Err(StageError::Unavailable(format!("espeak_Synth returned {rc}"))));
        }
    }
}

/// eSpeak voice names: a language (`en`, `en-us`), optionally `+variant`. Character voices meant
/// for other engines (`aiko`, `alloy`) are not.
pub fn is_espeak_voice(v: &str) -> bool {
    let lang = v.split('+').next().unwrap_or("");
    let mut parts = lang.split('-');
    let first = parts.next().unwrap_or("");
    (2..=3).contains(&first.len())
        && first.chars().all(|c| c.is_ascii_lowercase())
        && parts.all(|p| !p.is_empty() && p.len() <= 8 && p.chars().all(|c| c.is_ascii_alphanumeric()))
}

/// Called by eSpeak (on the worker thread, inside `espeak_Synth`) with each audio buffer.
unsafe extern "C" fn synth_callback(wav: *mut c_short, numsamples: c_int, events: *mut ffi::espeak_EVENT) -> c_int {
    let mut phonemes = Vec::new();
    if !events.is_null() {
        let mut ev = events;
        loop {
            // SAFETY: eSpeak passes an array terminated by an event of type 0.
            let e = unsafe { *ev };
            if e.type_ == ffi::EVENT_LIST_TERMINATED {
                break;
            }
            if e.type_ == ffi::EVENT_PHONEME {
                // SAFETY: for phoneme events the union holds up to 8 name bytes.
                let raw = unsafe { e.id.string };
                let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                let name = String::from_utf8_lossy(&raw[..end]).into_owned();
                let start = Duration::from_millis(e.audio_position.max(0) as u64);
                phonemes.push(PhonemeMark { phoneme: name, start });
            }
            // SAFETY: still inside the terminated array.
            ev = unsafe { ev.add(1) };
        }
    }
    let samples = if wav.is_null() || numsamples <= 0 {
        Vec::new()
    } else {
        // SAFETY: eSpeak hands `numsamples` valid samples.
        unsafe { std::slice::from_raw_parts(wav, numsamples as usize) }.to_vec()
    };
    if samples.is_empty() && phonemes.is_empty() {
        return 0;
    }
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(sink) = s.as_mut() else { return 1 };
        let chunk = SpeechChunk { pcm: Pcm { rate_hz: sink.rate_hz, samples }, phonemes };
        if sink.out.blocking_send(Ok(chunk)).is_err() {
            sink.aborted = true;
            return 1;
        }
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voice_names() {
        assert!(is_espeak_voice("en-us"));
        assert!(is_espeak_voice("en-us+f3"));
        assert!(is_espeak_voice("en"));
        assert!(!is_espeak_voice("aiko"));
        assert!(!is_espeak_voice("alloy"));
        assert!(!is_espeak_voice(""));
    }

    #[test]
    fn speaks_with_phoneme_marks_inside_the_audio() {
        let engine = Espeak::global().expect("espeak-ng available");
        let (pcm, phonemes) = engine.synthesize_blocking("Hello there, my friend.", "en-us").unwrap();
        let secs = pcm.duration().as_secs_f64();
        assert!((0.8..4.0).contains(&secs), "spoke {secs:.2} s");
        let rms = pcm.rms();
        assert!(rms > 300.0, "audible speech, rms {rms:.0}");
        assert!(phonemes.len() >= 10, "phonemes: {phonemes:?}");
        let names: Vec<&str> = phonemes.iter().map(|p| p.phoneme.as_str()).collect();
        assert!(names.contains(&"h"), "`hello` starts with h: {names:?}");
        assert!(phonemes.windows(2).all(|w| w[0].start <= w[1].start), "marks in order");
        let end = Duration::from_secs_f64(secs);
        assert!(phonemes.iter().all(|p| p.start <= end), "marks inside the audio");
    }

    #[test]
    fn dropping_the_receiver_cancels() {
        let engine = Espeak::global().expect("espeak-ng available");
        let long = "This is a long sentence that keeps going on and on. ".repeat(20);
        let mut rx = engine.synthesize(&long, "en-us").unwrap();
        let first = rx.blocking_recv().expect("a first chunk").unwrap();
        assert!(!first.pcm.samples.is_empty() || !first.phonemes.is_empty());
        drop(rx);
        // The engine is free again: a new request completes.
        let (pcm, _) = engine.synthesize_blocking("Yes.", "en-us").unwrap();
        assert!(!pcm.samples.is_empty());
    }
}
