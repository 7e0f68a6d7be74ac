//! One Nova Sonic provider session: the task that owns both directions of the stream. See the
//! module docs of [`super`] for what is mapped to what.
//!
//! Invariants: the input events go out in the documented order (the opening events were queued
//! before the stream opened; the audio block stays open until the close sequence); one kotodama
//! item per model response, which begins with its first ASSISTANT block and ends when its audio
//! ended with END_TURN and its FINAL text block closed (or when something newer begins); audio
//! after a barge-in is dropped until the next response; a requested reply that shows nothing
//! within the reply timeout is reported once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_bedrockruntime::operation::invoke_model_with_bidirectional_stream::InvokeModelWithBidirectionalStreamError;
use aws_sdk_bedrockruntime::types::InvokeModelWithBidirectionalStreamOutput;
use aws_sdk_bedrockruntime::types::error::InvokeModelWithBidirectionalStreamOutputError;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::protocol::{self, Inference, Kind, OutputEvent, Role, Stage, StopReason};
use super::provider::{Input, chunk};
use super::settings::NovaSonicSettings;
use crate::providers::tools::ToolEffect;
use crate::providers::{Pcm, ProviderCommand, ProviderError, ProviderEvent, SessionConfig, Speaker};

/// At most this many tool calls run at once; more get an error result.
const MAX_CONCURRENT_TOOL_CALLS: usize = 8;
/// After the close events, wait this long for `completionEnd` (seed 002).
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The receiving side of the stream, as the SDK gives it.
pub type Receiver = aws_sdk_bedrockruntime::primitives::event_stream::EventReceiver<
    InvokeModelWithBidirectionalStreamOutput,
    InvokeModelWithBidirectionalStreamOutputError,
>;

/// The prompt's and the audio block's names, and a counter for other blocks.
pub struct Names {
    prompt: String,
    audio: String,
    next: u64,
}

impl Names {
    /// Fresh random names (the samples use UUIDs; any unique string does).
    pub fn new() -> Self {
        let id = || format!("{:032x}", rand::random::<u128>());
        Self { prompt: id(), audio: id(), next: 0 }
    }

    fn content(&mut self) -> String {
        self.next += 1;
        format!("{}-{}", self.prompt, self.next)
    }
}

impl Default for Names {
    fn default() -> Self {
        Self::new()
    }
}

/// The events that open a session: `sessionStart`, `promptStart`, the SYSTEM block, the history
/// (once, before audio, USER first, within 40 KB) and the start of the one audio block.
pub fn opening_events(settings: &NovaSonicSettings, cfg: &SessionConfig, names: &Names) -> Vec<String> {
    let inference = Inference {
        max_tokens: settings.max_tokens,
        top_p: settings.top_p,
        temperature: settings.temperature,
        sensitivity: settings.endpointing_sensitivity,
    };
    let mut out = vec![
        protocol::session_start(&inference),
        protocol::prompt_start(&names.prompt, &settings.voice_for(cfg.voice_for("nova_sonic")), &cfg.tools.specs()),
    ];
    let mut n = 0;
    let mut content = || {
        n += 1;
        format!("{}-h{n}", names.prompt)
    };
    out.extend(protocol::text_block(&names.prompt, &content(), Role::System, false, &cfg.instructions));
    for (role, text) in protocol::history_items(&cfg.history) {
        out.extend(protocol::text_block(&names.prompt, &content(), role, false, &text));
    }
    out.push(protocol::audio_start(&names.prompt, &names.audio));
    out
}

/// Why the stream could not be opened: access and validation problems are configuration.
pub fn open_error(
    e: aws_sdk_bedrockruntime::error::SdkError<InvokeModelWithBidirectionalStreamError>,
) -> ProviderError {
    use InvokeModelWithBidirectionalStreamError as E;
    match e.as_service_error() {
        Some(E::AccessDeniedException(x)) => {
            ProviderError::Config(format!("Bedrock denied access ({x}): check the credentials and model access"))
        }
        Some(E::ValidationException(x)) => ProviderError::Config(format!("Bedrock rejected the request: {x}")),
        Some(E::ResourceNotFoundException(x)) => {
            ProviderError::Config(format!("model not found ({x}): check nova_sonic.model and the region"))
        }
        _ => ProviderError::Unavailable(format!(
            "Nova Sonic stream: {}",
            aws_sdk_bedrockruntime::error::DisplayErrorContext(&e)
        )),
    }
}

/// A tool call that finished.
struct ToolDone {
    id: String,
    output: String,
    effects: Vec<ToolEffect>,
}

/// The model response being received.
#[derive(Default)]
struct Response {
    item_id: Option<String>,
    /// FINAL (spoken) text so far.
    spoken: String,
    audio_ended: bool,
    /// A FINAL text block is open.
    final_open: bool,
    /// Barged in (or cancelled): the rest is not played.
    discard: bool,
}

/// What an open output block is.
#[derive(Clone, Copy)]
struct Block {
    kind: Kind,
    user: bool,
    stage: Stage,
}

/// The state of one provider session (owned by its task).
pub struct Connection {
    settings: Arc<NovaSonicSettings>,
    cfg: SessionConfig,
    names: Names,
    input: mpsc::Sender<Input>,
    events: mpsc::Sender<ProviderEvent>,
    blocks: HashMap<String, Block>,
    response: Response,
    responses: u64,
    user_text: String,
    users: u64,
    calls: HashMap<String, JoinHandle<()>>,
    reply_deadline: Option<Instant>,
    /// The stream's last `usageEvent.totalTokens` (reported as the increase since).
    usage_total: u64,
}

impl Connection {
    /// A session for `cfg` whose opening events were queued on `input`.
    pub fn new(
        settings: Arc<NovaSonicSettings>,
        cfg: SessionConfig,
        names: Names,
        input: mpsc::Sender<Input>,
        events: mpsc::Sender<ProviderEvent>,
    ) -> Self {
        Self {
            settings,
            cfg,
            names,
            input,
            events,
            blocks: HashMap::new(),
            response: Response::default(),
            responses: 0,
            user_text: String::new(),
            users: 0,
            calls: HashMap::new(),
            reply_deadline: None,
            usage_total: 0,
        }
    }

    /// Run until closed.
    pub async fn run(mut self, mut output: Receiver, mut commands: mpsc::Receiver<ProviderCommand>) {
        self.emit(ProviderEvent::Ready).await;
        let (tool_tx, mut tool_rx) = mpsc::channel::<ToolDone>(MAX_CONCURRENT_TOOL_CALLS);
        let ended_by_us = loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None | Some(ProviderCommand::Close) => break true,
                    Some(cmd) => self.on_command(cmd).await,
                },
                ev = output.recv() => match ev {
                    Ok(Some(InvokeModelWithBidirectionalStreamOutput::Chunk(part))) => {
                        let bytes = part.bytes().map(|b| b.as_ref().to_vec()).unwrap_or_default();
                        self.on_output(&bytes, &tool_tx).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break false,
                    Err(e) => {
                        let message = format!("{}", aws_sdk_bedrockruntime::error::DisplayErrorContext(&e));
                        tracing::warn!(session_id = %self.cfg.session_id, error = %message, "nova sonic stream failed");
                        self.emit(ProviderEvent::Error { code: "nova_sonic_stream".into(), message, retryable: true }).await;
                        break false;
                    }
                },
                Some(done) = tool_rx.recv() => self.on_tool_done(done).await,
                _ = sleep_until_opt(self.reply_deadline) => self.on_reply_timeout().await,
            }
        };
        for (_, call) in self.calls.drain() {
            call.abort();
        }
        if ended_by_us {
            self.close(&mut output).await;
        } else {
            self.emit(ProviderEvent::Closed).await;
        }
    }

    /// The close sequence in order, then up to [`CLOSE_WAIT`] for `completionEnd`.
    async fn close(&mut self, output: &mut Receiver) {
        let p = self.names.prompt.clone();
        for ev in [protocol::content_end(&p, &self.names.audio), protocol::prompt_end(&p), protocol::session_end()] {
            let _ = self.input.send(chunk(ev)).await;
        }
        let wait = async {
            while let Ok(Some(ev)) = output.recv().await {
                if let InvokeModelWithBidirectionalStreamOutput::Chunk(part) = ev
                    && let Some(b) = part.bytes()
                    && let Ok(OutputEvent::CompletionEnd) = protocol::parse(b.as_ref())
                {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, wait).await;
    }

    async fn emit(&self, ev: ProviderEvent) {
        // The session task holds us back here while its playout is full (backpressure).
        let _ = self.events.send(ev).await;
    }

    async fn send(&self, events: Vec<String>) {
        for ev in events {
            if self.input.send(chunk(ev)).await.is_err() {
                return; // the stream is gone; the output side reports it
            }
        }
    }

    async fn on_command(&mut self, cmd: ProviderCommand) {
        match cmd {
            ProviderCommand::AppendAudio(pcm) => {
                let ev = protocol::audio_input(&self.names.prompt, &self.names.audio, &pcm.samples);
                // Audio is dropped rather than waited for when the stream falls behind.
                let _ = self.input.try_send(chunk(ev));
            }
            ProviderCommand::Text(text) => self.ask(text).await,
            ProviderCommand::GenerateReply { instructions } => {
                self.ask(instructions.unwrap_or_else(|| "Please continue.".into())).await
            }
            ProviderCommand::Cancel => self.response.discard = self.response.item_id.is_some(),
            // Nova Sonic takes its system prompt, voice and tools at `promptStart` only.
            ProviderCommand::UpdateSession(update) => {
                self.emit(crate::providers::session_update_unsupported("nova_sonic", &update)).await
            }
            // The model detects turns itself, keeps its own context (no truncation) and takes
            // history only at the start of a stream.
            ProviderCommand::SpeechStarted
            | ProviderCommand::CommitTurn
            | ProviderCommand::Truncate { .. }
            | ProviderCommand::AppendHistory(_)
            | ProviderCommand::Restart
            | ProviderCommand::Image(_)
            | ProviderCommand::ToolOutput { .. }
            | ProviderCommand::Close => {}
        }
    }

    /// An interactive USER text the model answers, with the reply timeout armed.
    async fn ask(&mut self, text: String) {
        let name = self.names.content();
        self.send(protocol::text_block(&self.names.prompt, &name, Role::User, true, &text)).await;
        self.reply_deadline = Some(Instant::now() + Duration::from_millis(self.settings.reply_timeout_ms));
    }

    async fn on_reply_timeout(&mut self) {
        self.reply_deadline = None;
        let secs = self.settings.reply_timeout_ms as f64 / 1000.0;
        tracing::warn!(session_id = %self.cfg.session_id, "nova sonic did not answer a requested reply in time");
        let message = format!("Nova Sonic did not answer within {secs} s");
        self.emit(ProviderEvent::Error { code: "reply_timeout".into(), message, retryable: true }).await;
        self.emit(ProviderEvent::ResponseDone { item_id: String::new() }).await;
    }

    async fn on_output(&mut self, bytes: &[u8], tools: &mpsc::Sender<ToolDone>) {
        let ev = match protocol::parse(bytes) {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(session_id = %self.cfg.session_id, error = %e, "unreadable nova sonic event ignored");
                return;
            }
        };
        match ev {
            OutputEvent::ContentStart { content_id, kind, user, stage } => {
                self.on_block_start(content_id, Block { kind, user, stage }).await
            }
            OutputEvent::Text { content_id, text } => self.on_text(&content_id, text).await,
            OutputEvent::Audio { samples, .. } => {
                if !self.response.discard {
                    let item_id = self.item();
                    let pcm = Pcm { rate_hz: protocol::OUTPUT_RATE_HZ, samples };
                    self.emit(ProviderEvent::AudioDelta { item_id, pcm }).await;
                }
            }
            OutputEvent::ToolUse { tool_use_id, name, input } => self.start_call(tool_use_id, name, input, tools),
            OutputEvent::ContentEnd { content_id, kind, stop } => self.on_block_end(&content_id, kind, stop).await,
            OutputEvent::CompletionEnd => self.finish_response().await,
            OutputEvent::Usage { total_tokens } => {
                // A running total: the budget gets the increase (a smaller total is a new stream).
                let used = total_tokens.checked_sub(self.usage_total).unwrap_or(total_tokens);
                self.usage_total = total_tokens;
                if used > 0 {
                    self.emit(ProviderEvent::Usage { tokens: used }).await;
                }
            }
            OutputEvent::CompletionStart | OutputEvent::Other(_) => {}
        }
    }

    fn item(&mut self) -> String {
        self.reply_deadline = None;
        if self.response.item_id.is_none() {
            self.responses += 1;
        }
        let n = self.responses;
        self.response.item_id.get_or_insert_with(|| format!("nova-{n}")).clone()
    }

    async fn on_block_start(&mut self, content_id: String, block: Block) {
        if block.user {
            // The user speaks again: whatever the model said before is complete.
            self.finish_response().await;
        } else if block.kind == Kind::Text && block.stage == Stage::Speculative && self.response.audio_ended {
            // A new response begins (also after a tool call).
            self.finish_response().await;
        }
        if !block.user && block.kind != Kind::Tool {
            self.item();
            self.response.final_open |= block.kind == Kind::Text && block.stage == Stage::Final;
        }
        self.blocks.insert(content_id, block);
    }

    async fn on_text(&mut self, content_id: &str, text: String) {
        if protocol::is_interruption(&text) {
            return self.barge_in().await;
        }
        let Some(block) = self.blocks.get(content_id).copied() else { return };
        if block.user {
            self.user_text.push_str(&text);
            let (item_id, text) = (format!("nova-user-{}", self.users + 1), self.user_text.trim().to_owned());
            self.emit(ProviderEvent::Transcript { speaker: Speaker::User, item_id, text, is_final: false }).await;
        } else if block.stage == Stage::Final && !self.response.discard {
            // Only what was spoken; SPECULATIVE text is a plan that may change.
            if !self.response.spoken.is_empty() {
                self.response.spoken.push(' ');
            }
            self.response.spoken.push_str(text.trim());
            let (item_id, text) = (self.item(), self.response.spoken.clone());
            self.emit(ProviderEvent::Transcript { speaker: Speaker::Agent, item_id, text, is_final: false }).await;
        }
    }

    async fn barge_in(&mut self) {
        if !self.response.discard {
            self.response.discard = true;
            self.emit(ProviderEvent::UserSpeechStarted).await;
        }
    }

    async fn on_block_end(&mut self, content_id: &str, kind: Kind, stop: StopReason) {
        let block = self.blocks.remove(content_id);
        if stop == StopReason::Interrupted {
            self.barge_in().await;
        }
        match block {
            Some(b) if b.user => {
                if !self.user_text.trim().is_empty() {
                    self.users += 1;
                    let (item_id, text) = (format!("nova-user-{}", self.users), std::mem::take(&mut self.user_text));
                    let text = text.trim().to_owned();
                    self.emit(ProviderEvent::Transcript { speaker: Speaker::User, item_id, text, is_final: true })
                        .await;
                }
                self.user_text.clear();
            }
            Some(b) if b.kind == Kind::Text && b.stage == Stage::Final => {
                self.response.final_open = false;
                if self.response.audio_ended || self.response.discard {
                    self.finish_response().await;
                }
            }
            _ if kind == Kind::Audio && matches!(stop, StopReason::EndTurn | StopReason::Interrupted) => {
                self.response.audio_ended = true;
                if !self.response.final_open && stop == StopReason::Interrupted {
                    self.finish_response().await;
                }
            }
            _ => {}
        }
    }

    /// The response is complete: its spoken text as the final transcript, then done.
    async fn finish_response(&mut self) {
        let r = std::mem::take(&mut self.response);
        let Some(item_id) = r.item_id else { return };
        if !r.discard {
            if !r.spoken.is_empty() {
                let ev = ProviderEvent::Transcript {
                    speaker: Speaker::Agent,
                    item_id: item_id.clone(),
                    text: r.spoken,
                    is_final: true,
                };
                self.emit(ev).await;
            }
            self.emit(ProviderEvent::AudioDone { item_id: item_id.clone() }).await;
        }
        self.emit(ProviderEvent::ResponseDone { item_id }).await;
    }

    fn start_call(&mut self, id: String, name: String, input: String, tools: &mpsc::Sender<ToolDone>) {
        self.reply_deadline = None;
        if self.calls.len() >= MAX_CONCURRENT_TOOL_CALLS {
            let tx = tools.clone();
            let output = r#"{"error":"too many tool calls at once"}"#.to_owned();
            tokio::spawn(async move { tx.send(ToolDone { id, output, effects: vec![] }).await });
            return;
        }
        tracing::info!(session_id = %self.cfg.session_id, tool = %name, tool_use_id = %id, "tool call");
        let registry = Arc::clone(&self.cfg.tools);
        let tx = tools.clone();
        let key = id.clone();
        let task = tokio::spawn(async move {
            let r = registry.call(&name, &input).await;
            if r.failed {
                tracing::warn!(tool = %name, output = %r.output, "tool call failed; the model is told");
            }
            let _ = tx.send(ToolDone { id, output: r.output, effects: r.effects }).await;
        });
        self.calls.insert(key, task);
    }

    async fn on_tool_done(&mut self, done: ToolDone) {
        self.calls.remove(&done.id);
        for e in done.effects {
            match e {
                ToolEffect::Emotion(emotion) => {
                    let item_id = self.response.item_id.clone();
                    self.emit(ProviderEvent::Emotion { item_id, emotion }).await;
                }
            }
        }
        let name = self.names.content();
        self.send(protocol::tool_result(&self.names.prompt, &name, &done.id, &done.output)).await;
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
