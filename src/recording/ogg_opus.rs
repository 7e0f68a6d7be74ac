//! Opus packets into an Ogg Opus file (RFC 7845) on a timeline: gaps (DTX, loss, the agent being
//! silent between replies) are filled with encoded 20 ms silence so the file's duration is the
//! session's media time and both parties' files line up. The container is the `ogg` crate's.

use std::io::Write;

use ogg::writing::{PacketWriteEndInfo, PacketWriter};

/// Samples per second of every Ogg Opus granule position (RFC 7845 §4).
pub const GRANULE_RATE: u64 = 48_000;
/// One 20 ms frame at [`GRANULE_RATE`].
const FRAME: u64 = 960;

/// An Ogg Opus stream being written: headers first, then packets placed at sample positions.
pub struct OggOpusWriter<W: Write> {
    ogg: PacketWriter<'static, W>,
    serial: u32,
    /// Samples written so far (the end of the last packet), at 48 kHz.
    cursor: u64,
    /// The newest packet, held back so the last one can carry the end-of-stream flag.
    held: Option<(Vec<u8>, u64)>,
    /// One encoded 20 ms frame of silence.
    silence: Vec<u8>,
    /// Bytes of packets written (headers excluded).
    bytes: u64,
}

impl<W: Write> OggOpusWriter<W> {
    /// A stream with serial number `serial`, mono, its `OpusHead` and `OpusTags` (vendor
    /// `kotodama`, plus `comments` as `KEY=value`) written. Errors: the writer's.
    pub fn new(w: W, serial: u32, comments: &[(&str, &str)]) -> std::io::Result<Self> {
        let mut ogg = PacketWriter::new(w);
        // OpusHead, RFC 7845 §5.1: version 1, 1 channel, pre-skip 0 (packets are placed on the
        // timeline as received), input rate 48 kHz, gain 0, mapping family 0.
        let mut head = Vec::with_capacity(19);
        head.extend_from_slice(b"OpusHead");
        head.push(1);
        head.push(1);
        head.extend_from_slice(&0u16.to_le_bytes());
        head.extend_from_slice(&48_000u32.to_le_bytes());
        head.extend_from_slice(&0i16.to_le_bytes());
        head.push(0);
        ogg.write_packet(head, serial, PacketWriteEndInfo::EndPage, 0)?;
        // OpusTags, RFC 7845 §5.2: vendor string, then user comments.
        let vendor = b"kotodama";
        let mut tags = Vec::with_capacity(64);
        tags.extend_from_slice(b"OpusTags");
        tags.extend_from_slice(&(vendor.len() as u32).to_le_bytes());
        tags.extend_from_slice(vendor);
        tags.extend_from_slice(&(comments.len() as u32).to_le_bytes());
        for (k, v) in comments {
            let c = format!("{k}={v}");
            tags.extend_from_slice(&(c.len() as u32).to_le_bytes());
            tags.extend_from_slice(c.as_bytes());
        }
        ogg.write_packet(tags, serial, PacketWriteEndInfo::EndPage, 0)?;
        let silence = silence_frame().map_err(std::io::Error::other)?;
        Ok(Self { ogg, serial, cursor: 0, held: None, silence, bytes: 0 })
    }

    /// Place `packet` at sample `at` (48 kHz since the timeline's start): the gap before it is
    /// filled with silence; a packet that would overlap what is written (late, duplicate) or
    /// that is not valid Opus is skipped (returns false).
    pub fn push(&mut self, at: u64, packet: &[u8]) -> std::io::Result<bool> {
        let Some(n) = media::codec::packet_samples(packet) else { return Ok(false) };
        if at + FRAME / 2 < self.cursor {
            return Ok(false);
        }
        while self.cursor + FRAME <= at {
            let silence = self.silence.clone();
            self.emit(silence, self.cursor + FRAME)?;
        }
        self.emit(packet.to_vec(), self.cursor + n as u64)?;
        Ok(true)
    }

    /// Bytes of audio packets written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Samples on the timeline so far (48 kHz).
    pub fn samples(&self) -> u64 {
        self.cursor
    }

    fn emit(&mut self, packet: Vec<u8>, end: u64) -> std::io::Result<()> {
        self.bytes += packet.len() as u64;
        self.cursor = end;
        if let Some((p, gp)) = self.held.replace((packet, end)) {
            self.ogg.write_packet(p, self.serial, PacketWriteEndInfo::NormalPacket, gp)?;
        }
        Ok(())
    }

    /// End the stream (the last packet carries end-of-stream; an empty stream gets one frame of
    /// silence) and return the writer.
    pub fn finish(mut self) -> std::io::Result<W> {
        let (p, gp) = match self.held.take() {
            Some(last) => last,
            None => (self.silence.clone(), FRAME),
        };
        self.ogg.write_packet(p, self.serial, PacketWriteEndInfo::EndStream, gp)?;
        Ok(self.ogg.into_inner())
    }
}

/// 20 ms of digital silence, encoded by libopus (48 kHz mono).
fn silence_frame() -> Result<Vec<u8>, media::CodecError> {
    let mut enc = media::OpusEncoder::new(media::EncoderConfig::default())?;
    let mut out = [0u8; 256];
    let n = enc.encode(&[0i16; FRAME as usize], &mut out)?;
    Ok(out[..n].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_filled_and_overlaps_skipped() {
        let mut enc = media::OpusEncoder::new(media::EncoderConfig::default()).unwrap();
        let mut buf = [0u8; 1500];
        let tone: Vec<i16> = (0..960).map(|i| ((i as f64 * 0.05).sin() * 8000.0) as i16).collect();
        let n = enc.encode(&tone, &mut buf).unwrap();
        let mut w = OggOpusWriter::new(Vec::new(), 7, &[("SESSION_ID", "s")]).unwrap();
        assert!(w.push(0, &buf[..n]).unwrap());
        // 100 ms later: four frames of silence in between.
        assert!(w.push(960 * 5, &buf[..n]).unwrap());
        assert!(!w.push(960 * 2, &buf[..n]).unwrap(), "an overlapping packet is skipped");
        assert!(!w.push(960 * 6, b"").unwrap(), "not Opus");
        assert_eq!(w.samples(), 960 * 6);
        let bytes = w.finish().unwrap();
        let mut r = ogg::reading::PacketReader::new(std::io::Cursor::new(bytes));
        let mut packets = Vec::new();
        while let Some(p) = r.read_packet().unwrap() {
            let (gp, last) = (p.absgp_page(), p.last_in_stream());
            packets.push((p.data, gp, last));
        }
        assert!(packets[0].0.starts_with(b"OpusHead") && packets[1].0.starts_with(b"OpusTags"));
        assert_eq!(packets.len(), 2 + 6, "headers, 2 packets, 4 silence frames");
        let last = packets.last().unwrap();
        assert!(last.2, "the last packet ends the stream");
        assert_eq!(last.1, 960 * 6, "the final granule position is the timeline's length");
    }
}
