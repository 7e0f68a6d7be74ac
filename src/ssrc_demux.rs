//! Single-m-line demux of the client's audio (issue 12, kind 2): RTP on the one audio m-line is
//! the client's microphone whatever its SSRC.
//!
//! The WebRTC stack binds an audio receiver to the first SSRC it sees (or the one the offer
//! declares with `a=ssrc`), and drops RTP of any other SSRC (`rtc`'s interceptor handler finds no
//! receiver for it: the undeclared-SSRC shortcut only applies before a receiver has codings). A
//! gateway that switches sources or an SDK that re-creates its sender sends a new SSRC on the
//! same m-line, and the session went deaf. RFC 8843 §9.2 routes RTP by MID / SSRC; with one audio
//! m-line (all this server negotiates) every RTP packet belongs to it.
//!
//! [`SsrcDemux`] is an interceptor at the wire end of the inbound chain. It learns the SSRC the
//! stack bound (`bind_remote_stream`), and rewrites RTP of any other SSRC onto it, renumbered so
//! the stream stays continuous: the new source's first packet follows the last packet out (next
//! sequence number; timestamp advanced by the arrival time since, at the 48 kHz Opus clock, at
//! least one 20 ms frame). Everything after the chain (statistics, the track, the session's
//! uplink with its reorder window and DTX gap handling) sees one stream. A source that comes back
//! keeps its own mapping; at most [`MAX_SOURCES`] are remembered (the oldest is forgotten). RTCP
//! and the outbound leg pass through untouched. Payloads are never read or logged. Each new
//! source is logged (its SSRC) and counted (`kotodama_ssrc_changes_total`).

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;

/// Sources (SSRCs) whose mapping is kept.
pub const MAX_SOURCES: usize = 8;
/// RTP clock of Opus (RFC 7587 §4.1: always 48 kHz).
const CLOCK_HZ: u64 = 48_000;
/// One 20 ms Opus frame at [`CLOCK_HZ`].
const FRAME_TICKS: u32 = 960;
/// Where it sits in the chain: below every named slot (`Slot::CongestionControl` is 1 000), so
/// every interceptor sees the continuous stream.
pub const SLOT: usize = 500;

/// How one source's packets map onto the bound stream.
#[derive(Debug, Clone, Copy)]
struct Source {
    ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
    /// Last use, for forgetting the oldest.
    used: Instant,
}

/// The last packet out on the bound stream.
#[derive(Debug, Clone, Copy)]
struct Last {
    seq: u16,
    ts: u32,
    at: Instant,
}

/// The interceptor (see the module docs). One per peer connection.
#[derive(Default)]
pub struct SsrcDemux {
    /// The SSRC the stack bound for the audio receiver.
    bound: Option<u32>,
    sources: Vec<Source>,
    last: Option<Last>,
    /// Packets of other SSRCs rewritten so far.
    rewritten: u64,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl SsrcDemux {
    /// Packets of other SSRCs rewritten onto the bound stream so far.
    pub fn rewritten(&self) -> u64 {
        self.rewritten
    }

    /// Map one RTP header (arrived at `now`) onto the bound stream.
    fn map(&mut self, header: &mut rtc::rtp::header::Header, now: Instant) {
        let bound = *self.bound.get_or_insert(header.ssrc);
        if header.ssrc != bound {
            let (seq_offset, ts_offset) = self.source(header, now);
            self.rewritten += 1;
            header.ssrc = bound;
            header.sequence_number = header.sequence_number.wrapping_add(seq_offset);
            header.timestamp = header.timestamp.wrapping_add(ts_offset);
        }
        let newer = self.last.is_none_or(|l| header.sequence_number.wrapping_sub(l.seq) < 0x8000);
        if newer {
            self.last = Some(Last { seq: header.sequence_number, ts: header.timestamp, at: now });
        }
    }

    /// The offsets of `header`'s source, created so its first packet follows the last one out.
    fn source(&mut self, header: &rtc::rtp::header::Header, now: Instant) -> (u16, u32) {
        if let Some(s) = self.sources.iter_mut().find(|s| s.ssrc == header.ssrc) {
            s.used = now;
            return (s.seq_offset, s.ts_offset);
        }
        let (seq, ts) = match self.last {
            Some(l) => {
                let elapsed = now.saturating_duration_since(l.at);
                let ticks = (elapsed.as_micros() as u64 * CLOCK_HZ / 1_000_000).min(u64::from(u32::MAX / 2)) as u32;
                (l.seq.wrapping_add(1), l.ts.wrapping_add(ticks.max(FRAME_TICKS)))
            }
            None => (header.sequence_number, header.timestamp),
        };
        tracing::info!(ssrc = header.ssrc, "a new SSRC on the audio m-line: taken as the client's microphone");
        metrics::counter!(crate::telemetry::SSRC_CHANGES_TOTAL).increment(1);
        let source = Source {
            ssrc: header.ssrc,
            seq_offset: seq.wrapping_sub(header.sequence_number),
            ts_offset: ts.wrapping_sub(header.timestamp),
            used: now,
        };
        if self.sources.len() >= MAX_SOURCES
            && let Some(oldest) = self.sources.iter().enumerate().min_by_key(|(_, s)| s.used).map(|(i, _)| i)
        {
            self.sources.swap_remove(oldest);
        }
        self.sources.push(source);
        (source.seq_offset, source.ts_offset)
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SsrcDemux {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(p) = &mut msg.message.packet {
            self.map(&mut p.header, msg.now);
        }
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for SsrcDemux {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, info: &StreamInfo) {
        // The stack's binding wins over a first packet seen earlier (there is none: it binds
        // before the chain reads).
        self.bound.get_or_insert(info.ssrc);
    }
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn header(ssrc: u32, seq: u16, ts: u32) -> rtc::rtp::header::Header {
        rtc::rtp::header::Header {
            version: 2,
            payload_type: 111,
            sequence_number: seq,
            timestamp: ts,
            ssrc,
            ..Default::default()
        }
    }

    #[test]
    fn a_new_ssrc_continues_the_bound_stream_after_the_time_that_passed() {
        let mut d = SsrcDemux::default();
        let t0 = Instant::now();
        for i in 0..50u16 {
            let mut h = header(0xAAAA, 1000 + i, 5_000 + u32::from(i) * 960);
            d.map(&mut h, t0 + Duration::from_millis(20 * u64::from(i)));
            assert_eq!((h.ssrc, h.sequence_number), (0xAAAA, 1000 + i), "the bound stream is untouched");
        }
        // 300 ms after the last packet, a re-created sender: new SSRC, random seq and timestamp.
        let at = t0 + Duration::from_millis(20 * 49 + 300);
        let mut h = header(0xBBBB, 60_000, 4_000_000_000);
        d.map(&mut h, at);
        assert_eq!(h.ssrc, 0xAAAA);
        assert_eq!(h.sequence_number, 1050, "next sequence number");
        assert_eq!(h.timestamp, 5_000 + 49 * 960 + 300 * 48, "the timestamp advanced by the 300 ms");
        let mut h = header(0xBBBB, 60_001, 4_000_000_960);
        d.map(&mut h, at + Duration::from_millis(20));
        assert_eq!((h.sequence_number, h.timestamp), (1051, 5_000 + 49 * 960 + 300 * 48 + 960));
        assert_eq!(d.rewritten(), 2);
    }

    #[test]
    fn a_switch_back_reuses_the_old_mapping_and_sources_are_bounded() {
        let mut d = SsrcDemux::default();
        d.bind_remote_stream(&StreamInfo { ssrc: 1, ..Default::default() });
        let t0 = Instant::now();
        let mut h = header(2, 10, 10);
        d.map(&mut h, t0);
        let first = (h.sequence_number, h.timestamp);
        let mut h = header(2, 11, 970);
        d.map(&mut h, t0 + Duration::from_millis(20));
        assert_eq!((h.sequence_number, h.timestamp), (first.0.wrapping_add(1), first.1.wrapping_add(960)));
        for ssrc in 3..3 + MAX_SOURCES as u32 * 2 {
            let mut h = header(ssrc, 0, 0);
            d.map(&mut h, t0 + Duration::from_millis(u64::from(ssrc) * 40));
            assert_eq!(h.ssrc, 1);
        }
        assert!(d.sources.len() <= MAX_SOURCES);
    }
}
