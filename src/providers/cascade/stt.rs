//! Speech-to-text: the first stage of the cascade.
//!
//! An utterance is a stream: the cascade [`SpeechToText::start`]s one when a turn's audio begins,
//! [`SttStream::push`]es the audio as it arrives (so streaming engines decode while the user
//! speaks) and [`SttStream::finish`]es it when our VAD commits the turn. Batch engines (an HTTP
//! `/v1/audio/transcriptions` server) buffer and send at `finish`. Dropping a stream abandons it.

use futures::future::BoxFuture;
use tokio::sync::mpsc;

use super::error::StageError;
use crate::providers::Pcm;

/// Every speech-to-text adapter takes 16 kHz mono s16 (what Whisper and PocketSphinx expect).
pub const STT_RATE_HZ: u32 = 16_000;

/// One speech-to-text engine or server.
pub trait SpeechToText: Send + Sync {
    /// For logs and error messages.
    fn name(&self) -> &str;
    /// Begin an utterance. Cumulative partial transcripts, when the engine has them, are offered
    /// to `partials` with `try_send` (dropped when the receiver lags).
    fn start(&self, partials: Option<mpsc::Sender<String>>) -> Result<Box<dyn SttStream>, StageError>;
    /// A session that may use this engine started: load what the first utterance needs in the
    /// background (engines load on first use, not at the server's start). Never blocks. Default:
    /// nothing to load.
    fn prepare(&self) {}
}

/// One utterance in progress.
pub trait SttStream: Send {
    /// More audio at [`STT_RATE_HZ`]; never blocks (a lagging engine drops and counts).
    fn push(&mut self, pcm: &Pcm);
    /// The utterance is over: its final transcript (possibly empty).
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<String, StageError>>;
}
