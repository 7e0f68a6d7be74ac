//! Text-to-speech: the last stage of the cascade.
//!
//! One call speaks one sentence and streams [`SpeechChunk`]s as they are synthesised, so the
//! first audio can be played while the rest is still being made. Engines that know their phoneme
//! timings (eSpeak NG) attach [`PhonemeMark`]s, which become exact visemes; others send none and
//! the client falls back to visemes from the audio. Dropping the stream cancels synthesis.

use std::time::Duration;

use futures::stream::BoxStream;

use super::error::StageError;
use crate::providers::Pcm;

/// A phoneme starting at `start` from the beginning of the sentence's audio.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhonemeMark {
    /// The engine's phoneme name (eSpeak mnemonics, e.g. `h`, `@`, `aI`, `_:` for a pause).
    pub phoneme: String,
    /// Offset from the start of this sentence's audio.
    pub start: Duration,
}

/// A piece of synthesised speech.
#[derive(Debug, Clone)]
pub struct SpeechChunk {
    /// Mono audio, any rate (the playout resamples).
    pub pcm: Pcm,
    /// Phonemes whose start falls in (or just before) this chunk.
    pub phonemes: Vec<PhonemeMark>,
}

/// One text-to-speech engine or server.
pub trait TextToSpeech: Send + Sync {
    /// For logs and error messages.
    fn name(&self) -> &str;
    /// Speak `text` with `voice`. The stream ends after the last chunk; an error item ends it too.
    fn synthesize(&self, text: &str, voice: &str) -> BoxStream<'static, Result<SpeechChunk, StageError>>;
}
