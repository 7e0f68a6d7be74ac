//! A client-side interceptor that re-creates the sender's identity mid-stream: after `after`
//! RTP packets every outgoing packet gets a new SSRC (random sequence number and timestamp
//! offsets, as a re-created `RTCRtpSender` or a gateway switching sources sends). It sits at the
//! wire end of the outbound chain, so the SRTP layer below encrypts the packets for the new SSRC
//! and the server sees a real second source on the same audio m-line (issue 12, kind 2).

use std::collections::VecDeque;
use std::time::Instant;

use rtc::interceptor::{Interceptor, Packet, StreamInfo, TaggedPacket};
use rtc::sansio::Protocol;
use rtc::shared::error::Error;
use webrtc::peer_connection::Registry;

/// Below every named slot, as the server's demux: nearest the wire.
pub const SLOT: usize = 500;

/// See the module docs.
pub struct SsrcSwitch {
    after: u64,
    sent: u64,
    ssrc: u32,
    seq_offset: u16,
    ts_offset: u32,
    read_queue: VecDeque<TaggedPacket>,
    write_queue: VecDeque<TaggedPacket>,
}

impl SsrcSwitch {
    /// Switch to a new random SSRC after `after` RTP packets.
    pub fn new(after: u64) -> SsrcSwitch {
        SsrcSwitch {
            after,
            sent: 0,
            ssrc: rand::random(),
            seq_offset: rand::random(),
            ts_offset: rand::random(),
            read_queue: VecDeque::new(),
            write_queue: VecDeque::new(),
        }
    }
}

impl Protocol<TaggedPacket, TaggedPacket, ()> for SsrcSwitch {
    type Rout = TaggedPacket;
    type Wout = TaggedPacket;
    type Eout = ();
    type Error = Error;
    type Time = Instant;

    fn handle_read(&mut self, msg: TaggedPacket) -> Result<(), Self::Error> {
        self.read_queue.push_back(msg);
        Ok(())
    }

    fn poll_read(&mut self) -> Option<Self::Rout> {
        self.read_queue.pop_front()
    }

    fn handle_write(&mut self, mut msg: TaggedPacket) -> Result<(), Self::Error> {
        if let Packet::Rtp(p) = &mut msg.message.packet {
            self.sent += 1;
            if self.sent > self.after {
                p.header.ssrc = self.ssrc;
                p.header.sequence_number = p.header.sequence_number.wrapping_add(self.seq_offset);
                p.header.timestamp = p.header.timestamp.wrapping_add(self.ts_offset);
            }
        }
        self.write_queue.push_back(msg);
        Ok(())
    }

    fn poll_write(&mut self) -> Option<Self::Wout> {
        self.write_queue.pop_front()
    }
}

impl Interceptor for SsrcSwitch {
    fn bind_local_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_local_stream(&mut self, _info: &StreamInfo) {}
    fn bind_remote_stream(&mut self, _info: &StreamInfo) {}
    fn unbind_remote_stream(&mut self, _info: &StreamInfo) {}
}

/// A [`super::ClientNet::interceptors`] hook: the client sends from a new SSRC after `after`
/// RTP packets.
pub fn after(after: u64) -> std::sync::Arc<dyn Fn(Registry) -> Registry + Send + Sync> {
    std::sync::Arc::new(move |registry: Registry| registry.with(SLOT.into(), SsrcSwitch::new(after)))
}
