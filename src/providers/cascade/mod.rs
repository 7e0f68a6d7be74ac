//! The cascade provider: speech-to-text -> language model -> text-to-speech, each a failover list
//! of adapters ([`stt`], [`llm`], [`tts`]), behind the same [`RealtimeProvider`] trait as the
//! speech-to-speech providers.
//!
//! Turns come from our VAD (`server_vad: false`): the session task sends
//! [`ProviderCommand::CommitTurn`] after the configured silence.
//!
//! ## One session's run loop
//!
//! The session task owns the conversation ([`prompt::PromptManager`]), the utterance being
//! transcribed, and at most one job in flight, and `select!`s over:
//! - commands: `AppendAudio` feeds the live STT stream (started at the session VAD's
//!   `SpeechStarted`, with a 500 ms pre-roll, so streaming engines decode while the user speaks and a silent
//!   session holds no engine) and a bounded copy of the turn's audio (for STT failover); `CommitTurn`/`Text` start a reply; `Cancel` aborts the job in flight;
//!   `Truncate` cuts the last agent turn in the prompt to what the user heard;
//! - the STT partials of the current utterance (-> user `Transcript` partials);
//! - the job: first the transcription (a spawned task finishing the STT stream, with failover),
//!   then the reply task.
//!
//! The reply task runs two halves concurrently: the producer reads the LLM's token stream
//! through the structured-output reader ([`structured`]) and the sentence splitter
//! ([`sentence`]), sending each finished sentence into a small queue; the consumer speaks
//! sentences in order, streaming `AudioDelta`s as the TTS produces them, with `Viseme` events from
//! the TTS's phoneme marks ([`viseme`]) and the agent transcript released sentence by sentence.
//! Time to first audio is therefore STT finish + LLM time to the first sentence + TTS time to its
//! first chunk.
//!
//! ## Cancellation
//!
//! `Cancel` aborts the job's task. Dropping it drops the LLM and TTS streams, which cancels their
//! HTTP requests and makes the eSpeak worker abort synthesis at its next buffer; queued sentences
//! are dropped with the queue. The session task also discards any late event of the cut item, so
//! nothing of a cancelled reply is heard after the cut.

pub mod error;
pub mod failover;
pub mod llm;
#[cfg(feature = "local")]
pub mod local;
pub mod openai;
pub mod prompt;
pub mod sentence;
pub mod structured;
pub mod stt;
pub mod tts;
pub mod viseme;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use self::error::StageError;
use self::failover::Failover;
use self::llm::{ChatRequest, ChatRole, LanguageModel};
use self::prompt::PromptManager;
use self::sentence::SentenceSplitter;
use self::structured::{Piece, StructuredReader};
use self::stt::{STT_RATE_HZ, SpeechToText, SttStream};
use self::tts::TextToSpeech;
use self::viseme::{VisemeMap, VisemeTrack};
use super::{
    AudioFormat, COMMAND_CHANNEL_CAPACITY, Capabilities, EVENT_CHANNEL_CAPACITY, Pcm, ProviderCommand, ProviderError,
    ProviderEvent, ProviderSession, RealtimeProvider, SessionConfig, Speaker,
};

/// The turn's audio kept for STT failover and pre-roll (the rest is dropped, oldest first).
pub const MAX_TURN_AUDIO: Duration = Duration::from_secs(30);
/// Audio before the chunk that started the stream, given to it first.
const STT_PREROLL: Duration = Duration::from_millis(500);
/// Sentences the producer may run ahead of speech.
const SENTENCE_QUEUE: usize = 16;
/// Partial transcripts buffered from the STT engine (newer ones are dropped when full).
const PARTIAL_QUEUE: usize = 8;

/// The three stages and the settings of a cascade.
pub struct CascadeConfig {
    /// The provider's name in the API (`local`, `cascade`).
    pub name: String,
    /// Speech-to-text adapters, in order of preference.
    pub stt: Vec<Arc<dyn SpeechToText>>,
    /// Language models, in order of preference.
    pub llm: Vec<Arc<dyn LanguageModel>>,
    /// Text-to-speech adapters, in order of preference.
    pub tts: Vec<Arc<dyn TextToSpeech>>,
    /// Prompt budget per request, estimated tokens.
    pub token_budget: usize,
    /// Most tokens asked for per reply.
    pub max_reply_tokens: u32,
}

impl CascadeConfig {
    /// A copy sharing the same adapters.
    pub fn clone_stages(&self) -> Self {
        Self {
            name: self.name.clone(),
            stt: self.stt.clone(),
            llm: self.llm.clone(),
            tts: self.tts.clone(),
            token_budget: self.token_budget,
            max_reply_tokens: self.max_reply_tokens,
        }
    }
}

struct Stages {
    name: String,
    stt: Failover<dyn SpeechToText>,
    llm: Failover<dyn LanguageModel>,
    tts: Failover<dyn TextToSpeech>,
    token_budget: usize,
    max_reply_tokens: u32,
}

/// The cascade provider.
pub struct CascadeProvider {
    stages: Arc<Stages>,
}

impl CascadeProvider {
    /// A cascade over these stages. Every stage needs at least one adapter.
    pub fn new(cfg: CascadeConfig) -> Result<Self, ProviderError> {
        for (stage, n) in [("stt", cfg.stt.len()), ("llm", cfg.llm.len()), ("tts", cfg.tts.len())] {
            if n == 0 {
                return Err(ProviderError::Config(format!("cascade `{}` has no {stage} adapter", cfg.name)));
            }
        }
        Ok(Self {
            stages: Arc::new(Stages {
                name: cfg.name,
                stt: Failover::new(cfg.stt),
                llm: Failover::new(cfg.llm),
                tts: Failover::new(cfg.tts),
                token_budget: cfg.token_budget,
                max_reply_tokens: cfg.max_reply_tokens,
            }),
        })
    }
}

impl RealtimeProvider for CascadeProvider {
    fn name(&self) -> &str {
        &self.stages.name
    }

    fn moderates_text(&self) -> bool {
        true
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::local_turns()
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: STT_RATE_HZ }
    }

    // `output_format`: the default (unknown, 48 kHz). The TTS engines fail over to one another
    // and differ in rate (eSpeak 22.05 kHz, an HTTP endpoint's WAV says its own).

    fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>> {
        let stages = Arc::clone(&self.stages);
        // Engines load on first use: a session of this provider warms them while it connects.
        for (_, stt) in stages.stt.order(Instant::now()) {
            stt.prepare();
        }
        async move {
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
            let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
            tokio::spawn(Session::new(stages, cfg, ev_tx).run(cmd_rx));
            Ok(ProviderSession { commands: cmd_tx, events: ev_rx })
        }
        .boxed()
    }
}

/// What the cascade does right now.
enum Job {
    Idle,
    /// Finishing the STT stream of a committed turn (with failover).
    Transcribing {
        user_item: String,
        task: JoinHandle<Result<String, StageError>>,
    },
    /// Generating and speaking a reply.
    Replying {
        item_id: String,
        task: JoinHandle<()>,
    },
}

/// A sentence the reply task started to speak.
#[derive(Debug)]
struct Spoken {
    item_id: String,
    text: String,
}

struct Session {
    stages: Arc<Stages>,
    cfg: SessionConfig,
    events: mpsc::Sender<ProviderEvent>,
    prompt: PromptManager,
    visemes: Arc<VisemeMap>,
    /// The live STT stream and the index of its adapter in the failover list.
    stt: Option<(usize, Box<dyn SttStream>)>,
    partials: Option<mpsc::Receiver<String>>,
    turn_audio: Vec<i16>,
    turn_no: u64,
    job: Job,
    /// What the current/last reply spoke, sentence by sentence (for truncation and memory).
    spoken: Vec<Spoken>,
    spoken_tx: mpsc::Sender<Spoken>,
    spoken_rx: mpsc::Receiver<Spoken>,
}

impl Session {
    fn new(stages: Arc<Stages>, cfg: SessionConfig, events: mpsc::Sender<ProviderEvent>) -> Self {
        let mut prompt = PromptManager::new(&cfg.character_name, &cfg.instructions, stages.token_budget);
        // A session that replaces another (reconnect, recycling, failover) starts with its context.
        for item in &cfg.history {
            match item {
                crate::providers::HistoryItem::User(t) => prompt.record(ChatRole::User, t),
                crate::providers::HistoryItem::Agent(t) => prompt.record(ChatRole::Assistant, t),
            }
        }
        let visemes = Arc::new(VisemeMap::new(cfg.viseme_overrides.clone()));
        let (spoken_tx, spoken_rx) = mpsc::channel(64);
        Self {
            stages,
            cfg,
            events,
            prompt,
            visemes,
            stt: None,
            partials: None,
            turn_audio: Vec::new(),
            turn_no: 0,
            job: Job::Idle,
            spoken: Vec::new(),
            spoken_tx,
            spoken_rx,
        }
    }

    async fn run(mut self, mut commands: mpsc::Receiver<ProviderCommand>) {
        if self.events.send(ProviderEvent::Ready).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                biased;
                cmd = commands.recv() => {
                    let Some(cmd) = cmd else { break };
                    if !self.on_command(cmd).await { break; }
                }
                Some(s) = self.spoken_rx.recv() => self.spoken.push(s),
                partial = recv_opt(&mut self.partials) => match partial {
                    // A partial that moderation would flag is not shown (its final is checked
                    // before the model, see `user_turn`).
                    Some(text) if self.cfg.moderator.as_ref().is_some_and(|m| m.checks_user_input() && m.check(&text).is_some()) => {}
                    Some(text) => {
                        let ev = ProviderEvent::Transcript {
                            speaker: Speaker::User,
                            item_id: self.user_item(self.turn_no + 1),
                            text,
                            is_final: false,
                        };
                        if self.events.send(ev).await.is_err() { break; }
                    }
                    None => self.partials = None,
                },
                done = job_done(&mut self.job) => {
                    if !self.on_job_done(done).await { break; }
                }
            }
        }
        self.abort_job().await;
        let _ = self.events.try_send(ProviderEvent::Closed);
    }

    fn user_item(&self, n: u64) -> String {
        format!("{}-user-{n}", self.cfg.session_id)
    }

    /// Handle a command; false ends the session.
    async fn on_command(&mut self, cmd: ProviderCommand) -> bool {
        match cmd {
            ProviderCommand::AppendAudio(pcm) => self.on_audio(pcm),
            ProviderCommand::SpeechStarted => self.start_stt(),
            ProviderCommand::CommitTurn => {
                self.abort_job().await;
                self.turn_no += 1;
                let user_item = self.user_item(self.turn_no);
                let stream = self.stt.take();
                self.partials = None;
                let audio = std::mem::take(&mut self.turn_audio);
                let stages = Arc::clone(&self.stages);
                let task = tokio::spawn(transcribe(stages, stream, audio));
                self.job = Job::Transcribing { user_item, task };
            }
            ProviderCommand::Text(text) => {
                self.abort_job().await;
                self.turn_no += 1;
                let user_item = self.user_item(self.turn_no);
                return self.user_turn(user_item, text).await;
            }
            ProviderCommand::GenerateReply { instructions } => {
                // Speak first (a greeting): the reply is generated as if the user had said hello,
                // or had asked for what the instructions describe.
                self.abort_job().await;
                self.turn_no += 1;
                self.start_reply(instructions.as_deref().unwrap_or("hello"));
            }
            ProviderCommand::AppendHistory(items) => {
                for item in items {
                    match item {
                        crate::providers::HistoryItem::User(t) => self.prompt.record(ChatRole::User, &t),
                        crate::providers::HistoryItem::Agent(t) => self.prompt.record(ChatRole::Assistant, &t),
                    }
                }
            }
            ProviderCommand::Cancel => self.abort_job().await,
            ProviderCommand::Truncate { item_id, audio_end, heard } => {
                while let Ok(s) = self.spoken_rx.try_recv() {
                    self.spoken.push(s);
                }
                // What the user heard is the session's account (the words released with the
                // frames played), never re-derived here; the prompt's last agent turn is this
                // item's only when some of it was spoken (or the cut came before any audio).
                if self.spoken.iter().any(|s| s.item_id == item_id) || audio_end.is_zero() {
                    self.prompt.truncate_last_agent(&heard);
                }
            }
            ProviderCommand::UpdateSession(update) => {
                let ev = crate::providers::session_update_unsupported("cascade", &update);
                return self.events.send(ev).await.is_ok();
            }
            // The cascade's models take no images (`Capabilities::images` false).
            ProviderCommand::Restart | ProviderCommand::ToolOutput { .. } | ProviderCommand::Image(_) => {}
            ProviderCommand::Close => return false,
        }
        true
    }

    fn on_audio(&mut self, pcm: Pcm) {
        if pcm.rate_hz != STT_RATE_HZ {
            return; // the session task resamples to input_format(); anything else is a bug upstream
        }
        let max = (MAX_TURN_AUDIO.as_millis() as usize) * STT_RATE_HZ as usize / 1000;
        self.turn_audio.extend_from_slice(&pcm.samples);
        if self.turn_audio.len() > max {
            let excess = self.turn_audio.len() - max;
            self.turn_audio.drain(..excess);
        }
        if let Some((_, s)) = self.stt.as_mut() {
            s.push(&pcm);
        }
    }

    /// The session's VAD heard the user start: open a speech-to-text stream (and the engine it
    /// holds, e.g. a PocketSphinx decoder) only now, so a silent session holds no engine. The
    /// pre-roll (the tail of `turn_audio`) gives it the start of the utterance, which the VAD
    /// confirms only after its minimum speech.
    fn start_stt(&mut self) {
        if self.stt.is_some() {
            return;
        }
        let now = Instant::now();
        for (i, adapter) in self.stages.stt.order(now) {
            let (tx, rx) = mpsc::channel(PARTIAL_QUEUE);
            match adapter.start(Some(tx)) {
                Ok(mut s) => {
                    let pre = (STT_PREROLL.as_millis() as usize) * STT_RATE_HZ as usize / 1000;
                    let preroll = &self.turn_audio[self.turn_audio.len().saturating_sub(pre)..];
                    if !preroll.is_empty() {
                        s.push(&Pcm { rate_hz: STT_RATE_HZ, samples: preroll.to_vec() });
                    }
                    self.stt = Some((i, s));
                    self.partials = Some(rx);
                    break;
                }
                Err(e) => {
                    self.stages.stt.report(i, !e.retryable(), now);
                    tracing::warn!(adapter = adapter.name(), error = %e, "speech-to-text could not start");
                }
            }
        }
    }

    /// A final user turn (typed or transcribed): reported, then answered; false ends the session.
    async fn user_turn(&mut self, user_item: String, text: String) -> bool {
        if let Some(moderator) = self.cfg.moderator.clone().filter(|m| m.checks_user_input())
            && let Some(verdict) = moderator.check_with_endpoint(&text).await
        {
            return self.flagged_user_turn(user_item, text, verdict, &moderator).await;
        }
        let ev = ProviderEvent::Transcript {
            speaker: Speaker::User,
            item_id: user_item,
            text: text.clone(),
            is_final: true,
        };
        if self.events.send(ev).await.is_err() {
            return false;
        }
        self.start_reply(&text);
        true
    }

    /// The job finished; false ends the session.
    async fn on_job_done(&mut self, done: JobDone) -> bool {
        match done {
            JobDone::Transcript { user_item, result } => {
                self.job = Job::Idle;
                match result {
                    Ok(text) if !text.trim().is_empty() => return self.user_turn(user_item, text).await,
                    Ok(_) => {
                        // Nothing intelligible (a cough, noise): no reply; the session goes back to listening.
                        let ev = ProviderEvent::ResponseDone { item_id: format!("{user_item}-none") };
                        return self.events.send(ev).await.is_ok();
                    }
                    Err(e) => {
                        let ev = stage_error("stt", &e);
                        let done = ProviderEvent::ResponseDone { item_id: format!("{user_item}-none") };
                        return self.events.send(ev).await.is_ok() && self.events.send(done).await.is_ok();
                    }
                }
            }
            JobDone::Reply { item_id } => {
                self.job = Job::Idle;
                self.remember_reply(&item_id);
            }
        }
        true
    }

    /// A user turn moderation flagged (before the model saw it): reported without its text as a
    /// transcript, then the fallback line is spoken; the model never gets the turn.
    async fn flagged_user_turn(
        &mut self,
        user_item: String,
        text: String,
        verdict: crate::moderation::Verdict,
        moderator: &crate::moderation::Moderator,
    ) -> bool {
        tracing::info!(item_id = %user_item, category = %verdict.category, "user turn flagged before the model");
        let ev = ProviderEvent::Moderated {
            item_id: user_item,
            category: verdict.category,
            text,
            policy_version: moderator.version().to_owned(),
            source: crate::moderation::Source::User,
            replaced: true,
        };
        if self.events.send(ev).await.is_err() {
            return false;
        }
        let (item_id, mut ctx) = self.reply_ctx();
        ctx.moderator = None;
        let fallback = moderator.fallback().to_owned();
        let task = tokio::spawn(async move {
            let (tx, rx) = mpsc::channel(1);
            let _ = tx.send(fallback).await;
            drop(tx);
            speak(&ctx, rx).await;
            let _ = ctx.events.send(ProviderEvent::ResponseDone { item_id: ctx.item_id.clone() }).await;
        });
        self.job = Job::Replying { item_id, task };
        true
    }

    /// The next reply's item id and context.
    fn reply_ctx(&mut self) -> (String, ReplyCtx) {
        let item_id = format!("{}-agent-{}", self.cfg.session_id, self.turn_no);
        self.spoken.clear();
        let ctx = ReplyCtx {
            stages: Arc::clone(&self.stages),
            events: self.events.clone(),
            spoken: self.spoken_tx.clone(),
            item_id: item_id.clone(),
            voice: self.cfg.voice.clone(),
            visemes: Arc::clone(&self.visemes),
            moderator: self.cfg.moderator.clone(),
        };
        (item_id, ctx)
    }

    fn start_reply(&mut self, user_text: &str) {
        self.prompt.record(ChatRole::User, user_text);
        let req = ChatRequest {
            messages: self.prompt.build(),
            character_name: self.cfg.character_name.clone(),
            max_tokens: self.stages.max_reply_tokens,
        };
        let (item_id, ctx) = self.reply_ctx();
        let task = tokio::spawn(reply(ctx, req));
        self.job = Job::Replying { item_id, task };
    }

    /// Put what the reply spoke into the conversation memory.
    fn remember_reply(&mut self, item_id: &str) {
        while let Ok(s) = self.spoken_rx.try_recv() {
            self.spoken.push(s);
        }
        let text: Vec<&str> = self.spoken.iter().filter(|s| s.item_id == item_id).map(|s| s.text.as_str()).collect();
        self.prompt.record(ChatRole::Assistant, &text.join(" "));
    }

    /// Stop whatever is in flight, at once.
    async fn abort_job(&mut self) {
        match std::mem::replace(&mut self.job, Job::Idle) {
            Job::Idle => {}
            Job::Transcribing { task, .. } => task.abort(),
            Job::Replying { item_id, task } => {
                task.abort();
                self.remember_reply(&item_id);
                let _ = self.events.send(ProviderEvent::ResponseDone { item_id }).await;
            }
        }
    }
}

enum JobDone {
    Transcript { user_item: String, result: Result<String, StageError> },
    Reply { item_id: String },
}

/// Resolves when the job's task ends (never when idle).
async fn job_done(job: &mut Job) -> JobDone {
    match job {
        Job::Idle => std::future::pending().await,
        Job::Transcribing { user_item, task } => {
            let result = match task.await {
                Ok(r) => r,
                Err(e) => Err(StageError::Unavailable(format!("transcription task: {e}"))),
            };
            JobDone::Transcript { user_item: user_item.clone(), result }
        }
        Job::Replying { item_id, task } => {
            let _ = task.await;
            JobDone::Reply { item_id: item_id.clone() }
        }
    }
}

async fn recv_opt<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

fn stage_error(stage: &str, e: &StageError) -> ProviderEvent {
    ProviderEvent::Error { code: e.code(stage), message: format!("{stage}: {e}"), retryable: e.retryable() }
}

/// Finish the live STT stream; on failure, transcribe the kept audio with the next adapters.
async fn transcribe(
    stages: Arc<Stages>,
    stream: Option<(usize, Box<dyn SttStream>)>,
    audio: Vec<i16>,
) -> Result<String, StageError> {
    let mut last_err = None;
    let mut live = None;
    if let Some((i, stream)) = stream {
        live = Some(i);
        match stream.finish().await {
            Ok(t) => {
                stages.stt.report(i, true, Instant::now());
                return Ok(t);
            }
            Err(e) => {
                tracing::warn!(error = %e, "live speech-to-text failed; failing over");
                stages.stt.report(i, !e.retryable(), Instant::now());
                last_err = Some(e);
            }
        }
    }
    if audio.is_empty() {
        return Ok(String::new()); // a commit with no audio at all: nothing was said
    }
    let pcm = Pcm { rate_hz: STT_RATE_HZ, samples: audio };
    for (i, adapter) in stages.stt.order(Instant::now()).into_iter().filter(|(i, _)| Some(*i) != live) {
        let attempt = async {
            let mut s = adapter.start(None)?;
            s.push(&pcm);
            s.finish().await
        };
        match attempt.await {
            Ok(t) => {
                stages.stt.report(i, true, Instant::now());
                return Ok(t);
            }
            Err(e) => {
                tracing::warn!(adapter = adapter.name(), error = %e, "speech-to-text failed");
                stages.stt.report(i, !e.retryable(), Instant::now());
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| StageError::Unavailable("no speech-to-text adapter".into())))
}

struct ReplyCtx {
    stages: Arc<Stages>,
    events: mpsc::Sender<ProviderEvent>,
    spoken: mpsc::Sender<Spoken>,
    item_id: String,
    voice: String,
    visemes: Arc<VisemeMap>,
    moderator: Option<Arc<crate::moderation::Moderator>>,
}

/// Generate and speak one reply (see the module docs).
async fn reply(ctx: ReplyCtx, req: ChatRequest) {
    let (sentence_tx, sentence_rx) = mpsc::channel::<String>(SENTENCE_QUEUE);
    let producer = produce(&ctx, req, sentence_tx);
    let consumer = speak(&ctx, sentence_rx);
    let ((), ()) = tokio::join!(producer, consumer);
    let _ = ctx.events.send(ProviderEvent::ResponseDone { item_id: ctx.item_id.clone() }).await;
}

/// The LLM half: tokens -> structured pieces -> sentences.
async fn produce(ctx: &ReplyCtx, req: ChatRequest, sentences: mpsc::Sender<String>) {
    let mut stream = match open_llm(&ctx.stages, req).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ctx.events.send(stage_error("llm", &e)).await;
            return;
        }
    };
    let mut reader = StructuredReader::default();
    let mut splitter = SentenceSplitter::default();
    let mut pieces = stream.first.take().map(|d| reader.push(&d)).unwrap_or_default();
    loop {
        for piece in pieces.drain(..) {
            if !handle_piece(ctx, piece, &mut splitter, &sentences).await {
                return;
            }
        }
        match stream.rest.next().await {
            Some(Ok(delta)) => pieces = reader.push(&delta),
            Some(Err(e)) => {
                let _ = ctx.events.send(stage_error("llm", &e)).await;
                break;
            }
            None => break,
        }
    }
    for piece in reader.finish() {
        if !handle_piece(ctx, piece, &mut splitter, &sentences).await {
            return;
        }
    }
    if reader.malformed {
        tracing::debug!(item_id = %ctx.item_id, "model output was not the asked-for JSON; read with the fallback");
    }
    if let Some(rest) = splitter.finish() {
        let _ = sentences.send(rest).await;
    }
}

async fn handle_piece(
    ctx: &ReplyCtx,
    piece: Piece,
    splitter: &mut SentenceSplitter,
    sentences: &mpsc::Sender<String>,
) -> bool {
    match piece {
        Piece::Text(t) => {
            for s in splitter.push(&t) {
                if sentences.send(s).await.is_err() {
                    return false;
                }
            }
        }
        Piece::Emotion(e) => {
            let ev = ProviderEvent::Emotion { item_id: Some(ctx.item_id.clone()), emotion: e.to_lowercase() };
            if ctx.events.send(ev).await.is_err() {
                return false;
            }
        }
        Piece::Gesture(g) => {
            let ev = ProviderEvent::Gesture { item_id: ctx.item_id.clone(), gesture: g };
            if ctx.events.send(ev).await.is_err() {
                return false;
            }
        }
        Piece::Actions(a) => tracing::debug!(item_id = %ctx.item_id, actions = %a, "model actions (not executed)"),
    }
    true
}

struct LlmStream {
    first: Option<String>,
    rest: futures::stream::BoxStream<'static, Result<String, StageError>>,
}

/// Open the first language model that yields a first delta (failover happens before any text).
async fn open_llm(stages: &Stages, req: ChatRequest) -> Result<LlmStream, StageError> {
    let mut last = None;
    for (i, model) in stages.llm.order(Instant::now()) {
        let mut rest = model.stream(req.clone());
        match rest.next().await {
            Some(Ok(first)) => {
                stages.llm.report(i, true, Instant::now());
                return Ok(LlmStream { first: Some(first), rest });
            }
            Some(Err(e)) => {
                tracing::warn!(adapter = model.name(), error = %e, "language model failed");
                stages.llm.report(i, !e.retryable(), Instant::now());
                last = Some(e);
            }
            None => {
                stages.llm.report(i, true, Instant::now());
                return Ok(LlmStream { first: None, rest });
            }
        }
    }
    Err(last.unwrap_or_else(|| StageError::Unavailable("no language model".into())))
}

/// The TTS half: sentences -> audio, visemes and transcript, in order.
async fn speak(ctx: &ReplyCtx, mut sentences: mpsc::Receiver<String>) {
    let mut offset = Duration::ZERO;
    let mut track = VisemeTrack::default();
    let mut said = String::new();
    let mut any_audio = false;
    while let Some(mut sentence) = sentences.recv().await {
        let flagged = match moderate(ctx, &sentence).await {
            Some(fallback) => {
                // The rest of the reply is not generated: the producer's next send fails.
                sentences.close();
                sentence = fallback;
                true
            }
            None => false,
        };
        let Some(sent_len) = speak_sentence(ctx, &sentence, offset, &mut track, &mut said).await else {
            return;
        };
        any_audio |= !sent_len.is_zero();
        offset += sent_len;
        if flagged {
            break;
        }
    }
    if let Some(v) = track.finish(offset)
        && !send_viseme(ctx, v).await
    {
        return;
    }
    if any_audio {
        let _ = ctx.events.send(ProviderEvent::AudioDone { item_id: ctx.item_id.clone() }).await;
    }
    if !said.is_empty() {
        let ev = ProviderEvent::Transcript {
            speaker: Speaker::Agent,
            item_id: ctx.item_id.clone(),
            text: said,
            is_final: true,
        };
        let _ = ctx.events.send(ev).await;
    }
}

/// Check `sentence` before it is synthesized: when flagged, the session is told (`moderation`
/// event, review queue) and the fallback line is returned, to be spoken instead.
async fn moderate(ctx: &ReplyCtx, sentence: &str) -> Option<String> {
    let moderator = ctx.moderator.as_ref()?;
    let verdict = moderator.check_with_endpoint(sentence).await?;
    tracing::info!(item_id = %ctx.item_id, category = %verdict.category, "sentence flagged before TTS");
    let ev = ProviderEvent::Moderated {
        item_id: ctx.item_id.clone(),
        category: verdict.category,
        text: sentence.trim().to_owned(),
        policy_version: moderator.version().to_owned(),
        source: crate::moderation::Source::Agent,
        replaced: true,
    };
    let _ = ctx.events.send(ev).await;
    Some(moderator.fallback().to_owned())
}

async fn send_viseme(ctx: &ReplyCtx, v: viseme::TimedViseme) -> bool {
    let ev =
        ProviderEvent::Viseme { item_id: ctx.item_id.clone(), viseme: v.viseme, start: v.start, duration: v.duration };
    ctx.events.send(ev).await.is_ok()
}

/// Speak one sentence starting at `offset` of the item's audio; returns its audio length (None:
/// the session is gone).
async fn speak_sentence(
    ctx: &ReplyCtx,
    sentence: &str,
    offset: Duration,
    track: &mut VisemeTrack,
    said: &mut String,
) -> Option<Duration> {
    let mut last_err = None;
    for (i, engine) in ctx.stages.tts.order(Instant::now()) {
        let mut stream = engine.synthesize(sentence, &ctx.voice);
        let mut len = Duration::ZERO;
        let mut started = false;
        loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if !started {
                        started = true;
                        ctx.stages.tts.report(i, true, Instant::now());
                        if !said.is_empty() {
                            said.push(' ');
                        }
                        said.push_str(sentence);
                        let _ =
                            ctx.spoken.send(Spoken { item_id: ctx.item_id.clone(), text: sentence.to_owned() }).await;
                        let ev = ProviderEvent::Transcript {
                            speaker: Speaker::Agent,
                            item_id: ctx.item_id.clone(),
                            text: said.clone(),
                            is_final: false,
                        };
                        ctx.events.send(ev).await.ok()?;
                    }
                    for mark in &chunk.phonemes {
                        if let Some(v) = track.push(ctx.visemes.viseme(&mark.phoneme), offset + mark.start) {
                            send_viseme(ctx, v).await.then_some(())?;
                        }
                    }
                    if chunk.pcm.samples.is_empty() || chunk.pcm.rate_hz == 0 {
                        continue;
                    }
                    len += chunk.pcm.duration();
                    let ev = ProviderEvent::AudioDelta { item_id: ctx.item_id.clone(), pcm: chunk.pcm };
                    ctx.events.send(ev).await.ok()?;
                }
                Some(Err(e)) => {
                    tracing::warn!(adapter = engine.name(), error = %e, "text-to-speech failed");
                    ctx.stages.tts.report(i, !e.retryable(), Instant::now());
                    if started {
                        // Part of the sentence was heard: report, keep what was said, go on.
                        ctx.events.send(stage_error("tts", &e)).await.ok()?;
                        return Some(len);
                    }
                    last_err = Some(e);
                    break;
                }
                None => {
                    if !started {
                        ctx.stages.tts.report(i, true, Instant::now());
                    }
                    return Some(len);
                }
            }
        }
    }
    if let Some(e) = last_err {
        ctx.events.send(stage_error("tts", &e)).await.ok()?;
    }
    Some(Duration::ZERO)
}

/// Per-character viseme overrides from the configuration: phoneme -> viseme name.
pub fn viseme_overrides(map: &HashMap<String, String>) -> Result<HashMap<String, signaling::events::Viseme>, String> {
    map.iter()
        .map(|(p, v)| {
            v.parse()
                .map(|v| (p.clone(), v))
                .map_err(|e: signaling::events::UnknownViseme| format!("{e} (phoneme `{p}`)"))
        })
        .collect()
}
