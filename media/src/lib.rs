//! # media: kotodama's sans-IO audio pipeline
//!
//! Everything here is driven by the session's conversation core (`src/session/` of the
//! `kotodama` crate), which owns one [`Uplink`], one [`Playout`] and one [`BargeIn`] by value.
//! Nothing in this crate reads a clock, spawns, locks or does IO: time comes in as
//! `now: Duration`, the media time since the session started, so the whole pipeline runs on
//! virtual time in tests.
//!
//! ## Run loop (one session)
//! ```text
//! loop select! {
//!   rtp packet from the peer at `now`:
//!       uplink.push(now, RtpIn { seq, timestamp, payload_type, ssrc, payload });
//!       (and when uplink.next_timeout() passes: uplink.handle_timeout(now))
//!       while let Some(ev) = uplink.poll() {
//!           match ev {
//!               UplinkEvent::Audio(pcm)            => provider.append_audio(pcm),   // output_rate_hz
//!               UplinkEvent::SpeechStarted { at } => if let Some(i) = barge_in.on_speech_started(at, &mut playout) {
//!                                                        client.send(agent.interrupted{i.item_id, i.played_ms()});
//!                                                        provider.cancel(); provider.truncate(i.item_id, i.played_ms());
//!                                                    }
//!               UplinkEvent::SpeechStopped { .. }  => { /* end of user turn */ }
//!           }
//!       }
//!   provider AudioDelta { item_id, pcm }:  n = playout.push(&item_id, pcm)?;  hold pcm[n..] (backpressure)
//!   provider AudioDone { item_id }:        playout.finish_item(&item_id);
//!   client `interrupt`:                    barge_in.interrupt(&mut playout) -> same as above
//!   sleep_until(playout.next_due()):       while let Some(f) = playout.poll(now, &mut buf) { track.write(&buf[..f.len], f.talkspurt_start) }
//! }
//! ```
//! Each [`Interruption`] carries its [`InterruptReason`] (user speech at a stream position, or
//! the client's request), which is what metrics and logs record.
//!
//! ## Invariants
//! - Uplink: packets pass a small adaptive reorder window; every packet in order yields its
//!   decoded duration; a gap is concealed (PLC, FEC for the last missing frame when the next
//!   packet carries LBRR) up to 100 ms; timestamp gaps (DTX) are filled with silence, so media
//!   time is RTP time; other payload types never reach the decoder; late/duplicate packets are
//!   dropped; hostile payloads are counted and concealed, never a panic. Event
//!   times are stream positions from sample counts (deterministic).
//! - Playout: at most one 20 ms frame per `poll`, never before it is due, never two frames
//!   within `20 ms - jitter_tolerance` (default 0) of `now`; after a stall it resumes at real-time
//!   rate; the queue is bounded and `push` reports partial acceptance. `clear()` reports the
//!   frames of the current item actually emitted x 20 ms.
//! - No per-frame allocation after warm-up: buffers are sized at construction; the only
//!   allocations on the way are one id `String` per playout item, a resampler rebuild when
//!   an item's sample rate changes, and the playout queue's growth (by half at a time, up to
//!   `max_buffered`) when a provider sends audio faster than it is played.
//!
//! ## Modules
//! [`pcm`] unit-carrying audio types; [`codec`] Opus with PLC/FEC; [`vad`] libfvad +
//! hysteresis; [`resample`] rubato FFT resampler; [`reorder`] the uplink's reorder window; [`no_audio`] the connected-but-deaf watch; [`uplink`]; [`playout`]; [`barge_in`];
//! [`wav`] test/bench helper.

pub mod barge_in;
pub mod codec;
pub mod no_audio;
pub mod pcm;
pub mod playout;
pub mod reorder;
pub mod resample;
pub mod timeline;
pub mod uplink;
pub mod vad;
pub mod viseme;
pub mod wav;

pub use barge_in::{BargeIn, BargeInConfig, InterruptReason, Interruption};
pub use codec::{CodecError, EncoderConfig, OpusDecoder, OpusEncoder};
pub use no_audio::{NoAudio, NoAudioWatch};
pub use pcm::{FRAME, OPUS_RATE, Pcm, PcmRef};
pub use playout::{Cleared, OutFrame, Playout, PlayoutConfig, PlayoutStats};
pub use resample::{Alignment, ResampleError, Resampler};
pub use timeline::Timeline;
pub use uplink::{DTX_MAX_BYTES, RtpIn, Uplink, UplinkConfig, UplinkEvent, UplinkStats};
pub use vad::{Vad, VadConfig, VadEdge, VadMode};
pub use viseme::{MouthShape, ShapeRun, VisemeEstimator};
pub use wav::WavError;

/// Errors of the media crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// A setting is out of range; `key` names it and `reason` says what is allowed.
    #[error("invalid media setting `{key}`: {reason}")]
    InvalidConfig {
        /// The offending key, e.g. `uplink.output_rate_hz`.
        key: &'static str,
        /// What is allowed.
        reason: &'static str,
    },
    /// Opus failed.
    #[error(transparent)]
    Codec(#[from] CodecError),
    /// The resampler failed.
    #[error(transparent)]
    Resample(#[from] ResampleError),
    /// A WAV file could not be read or written.
    #[error(transparent)]
    Wav(#[from] WavError),
    /// Audio was pushed for an item after `finish_item`.
    #[error("playout item `{item_id}` is already finished")]
    ItemFinished {
        /// The item.
        item_id: String,
    },
}

impl MediaError {
    /// Whether retrying the same call can succeed (none of these errors are transient).
    pub fn retryable(&self) -> bool {
        false
    }
}
