//! Minimal 16-bit PCM mono WAV reading and writing (for tests, benches and tools).
//!
//! Reads RIFF/WAVE with a `fmt ` chunk of format 1 (PCM), 16 bits; skips other chunks. Stereo
//! files are rejected rather than silently mixed.

use std::path::Path;

use crate::pcm::{Pcm, PcmRef};

/// Errors of the WAV helper.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WavError {
    /// Reading or writing the file failed.
    #[error("wav io: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a supported WAV.
    #[error("unsupported or malformed wav: {0}")]
    Format(&'static str),
}

fn u16_at(b: &[u8], i: usize) -> Option<u16> {
    Some(u16::from_le_bytes([*b.get(i)?, *b.get(i + 1)?]))
}

fn u32_at(b: &[u8], i: usize) -> Option<u32> {
    Some(u32::from_le_bytes([*b.get(i)?, *b.get(i + 1)?, *b.get(i + 2)?, *b.get(i + 3)?]))
}

/// Parses a 16-bit mono PCM WAV.
pub fn parse(bytes: &[u8]) -> Result<Pcm, WavError> {
    if bytes.len() < 12 || &bytes[0..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err(WavError::Format("not RIFF/WAVE"));
    }
    let mut i = 12;
    let mut rate = None;
    while i + 8 <= bytes.len() {
        let id = &bytes[i..i + 4];
        let len = u32_at(bytes, i + 4).ok_or(WavError::Format("truncated chunk header"))? as usize;
        let body = i + 8;
        let end = body.checked_add(len).ok_or(WavError::Format("chunk length overflow"))?;
        if id == b"fmt " {
            let fmt = u16_at(bytes, body).ok_or(WavError::Format("truncated fmt"))?;
            let channels = u16_at(bytes, body + 2).ok_or(WavError::Format("truncated fmt"))?;
            let r = u32_at(bytes, body + 4).ok_or(WavError::Format("truncated fmt"))?;
            let bits = u16_at(bytes, body + 14).ok_or(WavError::Format("truncated fmt"))?;
            if fmt != 1 || bits != 16 {
                return Err(WavError::Format("only 16-bit integer PCM is supported"));
            }
            if channels != 1 {
                return Err(WavError::Format("only mono is supported"));
            }
            if r == 0 {
                return Err(WavError::Format("zero sample rate"));
            }
            rate = Some(r);
        } else if id == b"data" {
            let rate_hz = rate.ok_or(WavError::Format("data before fmt"))?;
            // Tolerate a data length past the end (streamed writers) by clamping.
            let data = &bytes[body..end.min(bytes.len())];
            let samples = data.chunks_exact(2).map(|c| i16::from_le_bytes([c[0], c[1]])).collect();
            return Ok(Pcm::new(rate_hz, samples));
        }
        // Chunks are padded to even length.
        i = end + (len & 1);
    }
    Err(WavError::Format("no data chunk"))
}

/// Reads a 16-bit mono PCM WAV file.
pub fn read(path: impl AsRef<Path>) -> Result<Pcm, WavError> {
    parse(&std::fs::read(path)?)
}

/// Serializes `pcm` as a 16-bit mono PCM WAV.
pub fn to_bytes(pcm: PcmRef<'_>) -> Vec<u8> {
    let data_len = (pcm.samples.len() * 2) as u32;
    let mut b = Vec::with_capacity(44 + data_len as usize);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&pcm.rate_hz.to_le_bytes());
    b.extend_from_slice(&(pcm.rate_hz * 2).to_le_bytes());
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in pcm.samples {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

/// Writes `pcm` as a 16-bit mono PCM WAV file.
pub fn write(path: impl AsRef<Path>, pcm: PcmRef<'_>) -> Result<(), WavError> {
    std::fs::write(path, to_bytes(pcm))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_reads_the_speech_fixtures() {
        let pcm = Pcm::new(16_000, vec![0, 1, -1, i16::MAX, i16::MIN]);
        assert_eq!(parse(&to_bytes(pcm.as_ref())).expect("parse"), pcm);
        let q = read(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/user_question.wav")).expect("fixture");
        assert_eq!(q.rate_hz, 48_000);
        assert_eq!(q.samples.len(), 209_112);
        let a = read(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data/agent_reply.wav")).expect("fixture");
        assert_eq!(a.rate_hz, 24_000);
    }

    #[test]
    fn malformed_inputs_are_errors_not_panics() {
        assert!(parse(b"").is_err());
        assert!(parse(b"RIFF\0\0\0\0WAVE").is_err());
        let mut b = to_bytes(PcmRef::new(8_000, &[1, 2, 3]));
        b[22] = 2; // stereo
        assert!(parse(&b).is_err());
        let b = to_bytes(PcmRef::new(8_000, &[1, 2, 3]));
        for n in 0..b.len() {
            let _ = parse(&b[..n]);
        }
    }
}
