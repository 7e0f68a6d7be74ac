//! The `scripted` provider: deterministic canned replies, for tests and demos.
//!
//! It understands nothing: each user turn (committed by our VAD, or a typed `text` message) is
//! answered with the next reply of its script, after a configurable delay. A reply is real speech
//! audio streamed faster than real time in 100 ms chunks (as real providers do), an emotion, and
//! an agent transcript whose partials follow the audio word by word. `Cancel` stops the reply at
//! once. What it received (audio per turn, truncations) can be observed through a
//! [`ScriptRecorder`], which is how the integration tests check what the "model" heard.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::{
    AudioFormat, COMMAND_CHANNEL_CAPACITY, Capabilities, EVENT_CHANNEL_CAPACITY, HistoryItem, Pcm, ProviderCommand,
    ProviderError, ProviderEvent, ProviderSession, RealtimeProvider, SessionConfig, Speaker,
};

/// The built-in reply: espeak-ng speech, 24 kHz mono.
const DEFAULT_REPLY_WAV: &[u8] = include_bytes!("scripted_reply.wav");
const DEFAULT_REPLY_TEXT: &str = "Hi! I am Aiko. It is nice to meet you. The weather is lovely \
                                  today, and I am happy to chat with you for a while.";
/// Audio is handed over in chunks of this length.
const CHUNK: Duration = Duration::from_millis(100);
/// At most this much received audio is kept per recorded turn (a bound on test memory).
const MAX_RECORDED_TURN: Duration = Duration::from_secs(60);

/// One canned reply.
#[derive(Debug, Clone)]
pub struct ScriptedReply {
    /// What the character says (the transcript).
    pub text: String,
    /// The emotion announced with the reply.
    pub emotion: String,
    /// The speech.
    pub audio: Pcm,
}

impl ScriptedReply {
    /// The first `len` of this reply: the audio cut at `len`, the transcript cut to the words
    /// released by then (words follow the audio in proportion, as [`ScriptedProvider`] streams
    /// them). A `len` at or past the end leaves the reply whole.
    pub fn truncated(mut self, len: Duration) -> Self {
        let keep = usize::try_from(media::pcm::duration_to_samples(len, self.audio.rate_hz)).unwrap_or(usize::MAX);
        let total = self.audio.samples.len();
        if keep >= total {
            return self;
        }
        let words: Vec<&str> = self.text.split_whitespace().collect();
        let kept_words = words_due(words.len(), keep, total).max(1);
        self.text = words[..kept_words].join(" ");
        self.audio.samples.truncate(keep);
        self
    }
}

/// Configuration of the scripted provider.
#[derive(Debug, Clone)]
pub struct ScriptedConfig {
    /// Replies, used in turn and then cycled.
    pub replies: Vec<ScriptedReply>,
    /// Delay between the end of the user's turn and the first reply audio (simulated model time).
    pub response_delay: Duration,
    /// Input rate the provider asks for.
    pub input_rate_hz: u32,
}

impl ScriptedConfig {
    /// The built-in script: one spoken reply, answered after 150 ms, 24 kHz input.
    pub fn builtin() -> Result<Self, ProviderError> {
        let audio = media::wav::parse(DEFAULT_REPLY_WAV)
            .map_err(|e| ProviderError::Config(format!("built-in scripted reply: {e}")))?;
        Ok(Self {
            replies: vec![ScriptedReply { text: DEFAULT_REPLY_TEXT.to_owned(), emotion: "happy".to_owned(), audio }],
            response_delay: Duration::from_millis(150),
            input_rate_hz: 24_000,
        })
    }
}

/// A turn as the scripted provider received it.
#[derive(Debug, Clone, Default)]
pub struct RecordedTurn {
    /// The rate of every chunk received (the session must send the provider's input rate).
    pub rates_hz: Vec<u32>,
    /// The audio received in this turn (up to [`MAX_RECORDED_TURN`]).
    pub samples: Vec<i16>,
    /// Total samples received, including any beyond the kept bound.
    pub total_samples: usize,
}

/// What the scripted provider received, shared with whoever wants to observe it (tests).
#[derive(Debug, Default)]
pub struct ScriptRecorder {
    inner: Mutex<RecorderState>,
}

#[derive(Debug, Default)]
struct RecorderState {
    turns: Vec<RecordedTurn>,
    current: RecordedTurn,
    truncations: Vec<(String, Duration)>,
    cancels: usize,
    texts: Vec<String>,
    histories: Vec<Vec<HistoryItem>>,
}

impl ScriptRecorder {
    /// Completed user turns (audio received up to each commit).
    pub fn turns(&self) -> Vec<RecordedTurn> {
        self.lock().turns.clone()
    }
    /// Audio received since the last commit.
    pub fn current(&self) -> RecordedTurn {
        self.lock().current.clone()
    }
    /// Truncations received: (item_id, audio_end).
    pub fn truncations(&self) -> Vec<(String, Duration)> {
        self.lock().truncations.clone()
    }
    /// How many `Cancel` commands arrived.
    pub fn cancels(&self) -> usize {
        self.lock().cancels
    }
    /// The history each session of this provider was opened with, in connect order.
    pub fn histories(&self) -> Vec<Vec<HistoryItem>> {
        self.lock().histories.clone()
    }
    /// Typed texts received.
    pub fn texts(&self) -> Vec<String> {
        self.lock().texts.clone()
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, RecorderState> {
        // A poisoned lock only means a test thread panicked while reading; the data is plain.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn record_audio(&self, pcm: &Pcm) {
        let mut st = self.lock();
        let max = (MAX_RECORDED_TURN.as_millis() as usize) * pcm.rate_hz as usize / 1000;
        let cur = &mut st.current;
        if cur.rates_hz.last() != Some(&pcm.rate_hz) {
            cur.rates_hz.push(pcm.rate_hz);
        }
        cur.total_samples += pcm.samples.len();
        let room = max.saturating_sub(cur.samples.len());
        cur.samples.extend_from_slice(&pcm.samples[..room.min(pcm.samples.len())]);
    }
    fn commit(&self) {
        let mut st = self.lock();
        let turn = std::mem::take(&mut st.current);
        st.turns.push(turn);
    }
}

/// The scripted provider.
pub struct ScriptedProvider {
    config: Arc<ScriptedConfig>,
    recorder: Option<Arc<ScriptRecorder>>,
}

impl ScriptedProvider {
    /// A provider with this script.
    pub fn new(config: ScriptedConfig) -> Self {
        Self { config: Arc::new(config), recorder: None }
    }
    /// Record what every session of this provider receives.
    pub fn with_recorder(mut self, recorder: Arc<ScriptRecorder>) -> Self {
        self.recorder = Some(recorder);
        self
    }
}

impl RealtimeProvider for ScriptedProvider {
    fn name(&self) -> &str {
        "scripted"
    }

    fn capabilities(&self) -> Capabilities {
        // It does not transcribe the user (it knows no words, only turns).
        Capabilities { user_transcripts: false, ..Capabilities::local_turns() }
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: self.config.input_rate_hz }
    }

    /// Its replies' rate when they all share one (the built-in reply is 24 kHz), else unknown.
    fn output_format(&self) -> AudioFormat {
        let mut rates = self.config.replies.iter().map(|r| r.audio.rate_hz);
        match rates.next() {
            Some(first) if rates.all(|r| r == first) => AudioFormat { rate_hz: first },
            _ => AudioFormat { rate_hz: media::OPUS_RATE },
        }
    }

    fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>> {
        let config = Arc::clone(&self.config);
        let recorder = self.recorder.clone();
        async move {
            if config.replies.is_empty() {
                return Err(ProviderError::Config("scripted provider has no replies".into()));
            }
            if let Some(rec) = &recorder {
                rec.lock().histories.push(cfg.history.clone());
            }
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
            let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
            tokio::spawn(run(config, recorder, cfg.session_id, cmd_rx, ev_tx));
            Ok(ProviderSession { commands: cmd_tx, events: ev_rx })
        }
        .boxed()
    }
}

/// The provider session's task: one reply at a time, cancellable.
async fn run(
    config: Arc<ScriptedConfig>,
    recorder: Option<Arc<ScriptRecorder>>,
    session_id: String,
    mut commands: mpsc::Receiver<ProviderCommand>,
    events: mpsc::Sender<ProviderEvent>,
) {
    if events.send(ProviderEvent::Ready).await.is_err() {
        return;
    }
    let mut turn_no: usize = 0;
    let mut reply: Option<ReplyState> = None;
    loop {
        // While a reply is in progress, alternate between producing it and reading commands.
        let step = async {
            match reply.as_mut() {
                Some(r) => r.next_event(&config).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { break };
                match cmd {
                    ProviderCommand::AppendAudio(pcm) => {
                        if let Some(rec) = &recorder { rec.record_audio(&pcm); }
                    }
                    ProviderCommand::CommitTurn | ProviderCommand::Text(_) | ProviderCommand::GenerateReply { .. } => {
                        if let ProviderCommand::Text(t) = &cmd {
                            if let Some(rec) = &recorder { rec.lock().texts.push(t.clone()); }
                            let ev = ProviderEvent::Transcript {
                                speaker: Speaker::User,
                                item_id: format!("user-{turn_no}"),
                                text: t.clone(),
                                is_final: true,
                            };
                            if events.send(ev).await.is_err() { break; }
                        } else if let (ProviderCommand::CommitTurn, Some(rec)) = (&cmd, &recorder) {
                            rec.commit();
                        }
                        let idx = turn_no % config.replies.len();
                        turn_no += 1;
                        reply = Some(ReplyState::new(
                            format!("{session_id}-agent-{turn_no}"), idx, config.response_delay));
                    }
                    // No client tools are ever called here, so no outputs arrive.
                    ProviderCommand::SpeechStarted
                    | ProviderCommand::Restart
                    | ProviderCommand::ToolOutput { .. }
                    | ProviderCommand::Image(_) => {}
                    ProviderCommand::UpdateSession(update) => {
                        let ev = super::session_update_unsupported("scripted", &update);
                        if events.send(ev).await.is_err() { break; }
                    }
                    ProviderCommand::Cancel => {
                        if let Some(rec) = &recorder { rec.lock().cancels += 1; }
                        if let Some(r) = reply.take() {
                            let done = ProviderEvent::ResponseDone { item_id: r.item_id };
                            if events.send(done).await.is_err() { break; }
                        }
                    }
                    ProviderCommand::Truncate { item_id, audio_end, .. } => {
                        if let Some(rec) = &recorder { rec.lock().truncations.push((item_id, audio_end)); }
                    }
                    ProviderCommand::AppendHistory(items) => {
                        if let Some(rec) = &recorder
                            && let Some(h) = rec.lock().histories.last_mut()
                        {
                            h.extend(items);
                        }
                    }
                    ProviderCommand::Close => break,
                }
            }
            ev = step => {
                match ev {
                    Some(ev) => {
                        let last = matches!(ev, ProviderEvent::ResponseDone { .. });
                        if events.send(ev).await.is_err() { break; }
                        if last { reply = None; }
                    }
                    None => reply = None,
                }
            }
        }
    }
    let _ = events.try_send(ProviderEvent::Closed);
}

/// Words of a `words`-word transcript released once `pos` of its `total` audio samples are: in
/// proportion, rounded up (a word is out as soon as its audio starts), never more than all.
fn words_due(words: usize, pos: usize, total: usize) -> usize {
    (words * pos).div_ceil(total.max(1)).min(words)
}

/// Progress through one reply.
struct ReplyState {
    item_id: String,
    reply: usize,
    delay: Option<Duration>,
    emotion_sent: bool,
    /// Samples of the reply audio already handed over.
    pos: usize,
    /// Words of the transcript already released.
    words_sent: usize,
    audio_done: bool,
    final_sent: bool,
}

impl ReplyState {
    fn new(item_id: String, reply: usize, delay: Duration) -> Self {
        Self {
            item_id,
            reply,
            delay: Some(delay),
            emotion_sent: false,
            pos: 0,
            words_sent: 0,
            audio_done: false,
            final_sent: false,
        }
    }

    /// The next event of this reply, in order: emotion, then audio chunks interleaved with
    /// transcript partials (words released in proportion to the audio handed over), then the
    /// audio end, the final transcript and the response end.
    async fn next_event(&mut self, config: &ScriptedConfig) -> Option<ProviderEvent> {
        if let Some(d) = self.delay.take() {
            tokio::time::sleep(d).await;
        }
        let r = &config.replies[self.reply];
        if !self.emotion_sent {
            self.emotion_sent = true;
            return Some(ProviderEvent::Emotion { item_id: Some(self.item_id.clone()), emotion: r.emotion.clone() });
        }
        let words: Vec<&str> = r.text.split_whitespace().collect();
        let due_words = words_due(words.len(), self.pos, r.audio.samples.len());
        if self.words_sent < due_words {
            self.words_sent = due_words;
            return Some(ProviderEvent::Transcript {
                speaker: Speaker::Agent,
                item_id: self.item_id.clone(),
                text: words[..self.words_sent].join(" "),
                is_final: false,
            });
        }
        if self.pos < r.audio.samples.len() {
            let chunk = (CHUNK.as_millis() as usize) * r.audio.rate_hz as usize / 1000;
            let end = (self.pos + chunk).min(r.audio.samples.len());
            let pcm = Pcm { rate_hz: r.audio.rate_hz, samples: r.audio.samples[self.pos..end].to_vec() };
            self.pos = end;
            return Some(ProviderEvent::AudioDelta { item_id: self.item_id.clone(), pcm });
        }
        if !self.audio_done {
            self.audio_done = true;
            return Some(ProviderEvent::AudioDone { item_id: self.item_id.clone() });
        }
        if !self.final_sent {
            self.final_sent = true;
            return Some(ProviderEvent::Transcript {
                speaker: Speaker::Agent,
                item_id: self.item_id.clone(),
                text: r.text.clone(),
                is_final: true,
            });
        }
        Some(ProviderEvent::ResponseDone { item_id: self.item_id.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_reply_keeps_the_audio_prefix_and_the_words_spoken_in_it() {
        let whole = ScriptedConfig::builtin().unwrap().replies.remove(0);
        let total_words = whole.text.split_whitespace().count();
        let short = whole.clone().truncated(Duration::from_millis(2_200));
        assert_eq!(short.audio.samples.len(), 2_200 * whole.audio.rate_hz as usize / 1000);
        assert_eq!(short.audio.samples[..], whole.audio.samples[..short.audio.samples.len()]);
        let words = short.text.split_whitespace().count();
        assert!(words > 0 && words < total_words, "{words} of {total_words} words kept: {:?}", short.text);
        assert!(whole.text.starts_with(&short.text), "{:?} is not a prefix of the reply", short.text);
        // Words kept in proportion to the audio kept (the last one may be partly spoken).
        let share = short.audio.samples.len() as f64 / whole.audio.samples.len() as f64;
        assert_eq!(words, (total_words as f64 * share).ceil() as usize);
        let same = whole.clone().truncated(Duration::from_secs(60));
        assert_eq!((same.text, same.audio.samples.len()), (whole.text, whole.audio.samples.len()));
    }
}
