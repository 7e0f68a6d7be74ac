//! The offline stages: PocketSphinx (speech-to-text), the persona responder (the "brain") and
//! eSpeak NG (text-to-speech with phoneme timings). Native engines run on their own threads,
//! never on tokio's workers (see each module).

pub mod espeak;
mod espeak_ffi;
pub mod persona;
pub mod sphinx;
mod sphinx_ffi;

use std::path::Path;
use std::sync::Arc;

use futures::StreamExt;
use futures::stream::BoxStream;

use super::CascadeConfig;
use super::error::StageError;
use super::tts::{SpeechChunk, TextToSpeech};

/// eSpeak NG as a text-to-speech adapter.
#[derive(Debug, Clone, Copy, Default)]
pub struct EspeakTts;

impl TextToSpeech for EspeakTts {
    fn name(&self) -> &str {
        "espeak-ng"
    }

    fn synthesize(&self, text: &str, voice: &str) -> BoxStream<'static, Result<SpeechChunk, StageError>> {
        match espeak::Espeak::global().and_then(|e| e.synthesize(text, voice)) {
            Ok(rx) => futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) }).boxed(),
            Err(e) => futures::stream::once(async move { Err(e) }).boxed(),
        }
    }
}

/// Settings of the offline engines.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    /// PocketSphinx model directory (Debian: /usr/share/pocketsphinx/model/en-us).
    pub sphinx_model_dir: std::path::PathBuf,
    /// Most PocketSphinx decoders alive at once (concurrent utterances).
    pub max_decoders: usize,
}

impl Default for LocalSettings {
    fn default() -> Self {
        Self { sphinx_model_dir: sphinx::DEFAULT_MODEL_DIR.into(), max_decoders: 4 }
    }
}

/// The three offline stages. Nothing is loaded here, only checked (the PocketSphinx model files):
/// PocketSphinx loads when a session of a provider that uses it starts, eSpeak NG at the first
/// synthesis, so a node whose sessions use a cloud provider holds neither (see BENCHMARKS.md).
/// Errors: [`StageError::Config`] naming the missing model file and its package.
pub fn stages(settings: &LocalSettings) -> Result<LocalStages, StageError> {
    let sphinx = sphinx::Sphinx::new(Path::new(&settings.sphinx_model_dir), settings.max_decoders)?;
    Ok(LocalStages { sphinx: Arc::new(sphinx) })
}

/// Loaded offline engines.
pub struct LocalStages {
    /// PocketSphinx.
    pub sphinx: Arc<sphinx::Sphinx>,
}

impl LocalStages {
    /// A fully offline cascade named `name`.
    pub fn cascade(&self, name: &str) -> CascadeConfig {
        CascadeConfig {
            name: name.to_owned(),
            stt: vec![self.sphinx.clone()],
            llm: vec![Arc::new(persona::PersonaResponder)],
            tts: vec![Arc::new(EspeakTts)],
            token_budget: super::prompt::DEFAULT_TOKEN_BUDGET,
            max_reply_tokens: 300,
        }
    }
}
