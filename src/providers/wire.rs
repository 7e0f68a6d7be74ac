//! Small wire helpers shared by the JSON speech-to-speech protocols (OpenAI Realtime, Gemini
//! Live, Nova Sonic): audio as base64 of little-endian signed 16-bit mono PCM, the encoding all
//! three use for `input_audio_buffer.append.audio` / `response.output_audio.delta.delta`
//! (OpenAI), `realtimeInput.audio.data` / `inlineData.data` (Gemini) and `audioInput.content` /
//! `audioOutput.content` (Nova Sonic); and the one error type of their parsers.

use base64::Engine;

/// Audio that is not base64 of whole s16le samples.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audio is not base64 s16le PCM: {0}")]
pub struct BadAudio(pub String);

/// A provider message we could not read (the error of `openai::protocol::parse`,
/// `gemini::protocol::parse` and `nova_sonic::protocol::parse`). The provider sessions log it and
/// skip the message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// Not JSON, or not the protocol's envelope (OpenAI: no `type`; Gemini: not an object; Nova
    /// Sonic: not `{"event": {<name>: {...}}}`).
    #[error("malformed server message: {0}")]
    Malformed(String),
    /// A known message type with a missing or wrong field (OpenAI Realtime).
    #[error("server message `{kind}` lacks `{field}`")]
    MissingField {
        /// The message type.
        kind: String,
        /// The field.
        field: &'static str,
    },
    /// Audio that is not base64 of s16le.
    #[error(transparent)]
    BadAudio(#[from] BadAudio),
}

/// Base64 (standard alphabet, padded) of `samples` as s16le bytes.
pub fn pcm_to_b64(samples: &[i16]) -> String {
    let mut bytes = Vec::with_capacity(samples.len() * 2);
    for s in samples {
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    base64::engine::general_purpose::STANDARD.encode(&bytes)
}

/// Samples from base64 of s16le bytes; an odd byte count or bad base64 is an error.
pub fn b64_to_pcm(b64: &str) -> Result<Vec<i16>, BadAudio> {
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| BadAudio(e.to_string()))?;
    if bytes.len() % 2 != 0 {
        return Err(BadAudio(format!("{} bytes is not whole s16 samples", bytes.len())));
    }
    Ok(bytes.chunks_exact(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm_round_trips_and_odd_bytes_are_refused() {
        let s = [0i16, 1, -1, i16::MAX, i16::MIN];
        assert_eq!(b64_to_pcm(&pcm_to_b64(&s)).unwrap(), s);
        assert_eq!(pcm_to_b64(&[1]), "AQA=");
        assert!(b64_to_pcm("AA==").is_err());
        assert!(b64_to_pcm("!!").is_err());
    }
}
