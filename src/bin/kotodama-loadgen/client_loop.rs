//! Every simulated client in one loop (`--client-driver loop`, the default; issue 14).
//!
//! A webrtc-rs peer runs a driver task per peer that costs ~36 us per packet in its own machinery
//! (the server's reason for `src/peer_loop.rs`). Here each client is the sans-IO core underneath
//! (`rtc::peer_connection::RTCPeerConnection`, an offerer) with a UDP socket of its own (the
//! server tells clients apart by their address), and one thread drives them all: one `epoll` set
//! (mio) over every client's socket, one timer heap for the cores' deadlines, and the 20 ms
//! pacing tick that sends each client's next packet ([`Voice::frame`]), spread over the period in
//! 2 ms slots ([`SLOTS`]). A readable socket is drained and only its client is serviced (events,
//! reads, writes, next deadline); nothing is decoded, and lateness and loss come from the RTP
//! headers with the instant each datagram was read.
//!
//! Connecting (`POST /v1/sessions`, the offer, the answer) runs on the caller's Tokio task; the
//! connected core is then handed to the loop through a bounded queue.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::BytesMut;
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token, Waker};
use rtc::interceptor::Registry;
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::configure_rtcp_reports;
use rtc::peer_connection::configuration::media_engine::MediaEngine;
use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::rtp_transceiver::rtp_sender::{RTCRtpCodecParameters, RtpCodecKind};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::{mpsc, oneshot};

use crate::client::{MicMode, NewSession, Probe, Profile, Recv, Speech, TalkProfile, Voice, on_packet};
use crate::client_peer::{FRAME_TICKS, OPUS_PT, answered_opus_pt, opus_codec};

/// Connected clients waiting to be adopted by the loop.
const ADOPT_QUEUE: usize = 64;
/// Largest UDP datagram read (a DTLS flight or an Opus packet fits).
const MAX_DATAGRAM: usize = 2048;
/// The pacing period: one packet per client per tick.
const TICK: Duration = Duration::from_millis(20);
/// The tick is spread over this many slots (client `i` sends in slot `i % SLOTS`, 2 ms apart), so
/// that the clients' packets reach the server spread over the period as independent users' do,
/// not as one burst that the server's loop would queue (and count as its own uplink latency).
const SLOTS: usize = 10;
/// The waker's token (client tokens are their index).
const WAKER: Token = Token(usize::MAX);
/// Socket errors (ICMP errors of earlier sends) read per wake before giving up on a socket.
const MAX_ERRORS_PER_READ: usize = 64;

/// The loop's handle: connects clients into it and stops it.
pub struct ClientLoop {
    adopt: mpsc::Sender<Command>,
    waker: Arc<Waker>,
}

enum Command {
    /// Take over a connected client.
    Adopt(Box<LoopClient>),
    /// Hang up every client, then say so.
    Stop(oneshot::Sender<()>),
}

/// One client inside the loop.
struct LoopClient {
    pc: RTCPeerConnection,
    socket: UdpSocket,
    local: SocketAddr,
    sender: RTCRtpSenderId,
    ssrc: u32,
    pt: u8,
    seq: u16,
    ts: u32,
    voice: Voice,
    recv: Arc<Mutex<Recv>>,
    /// The core's next deadline (`poll_timeout`), as last seen.
    deadline: Option<Instant>,
    /// The heap entry standing for this client (an entry popped at another instant is stale).
    filed: Option<Instant>,
}

impl ClientLoop {
    /// Start the loop on a thread of its own, pacing every client by `speech` and `talk`.
    /// Errors: creating the epoll set or its waker.
    pub fn start(speech: Arc<Speech>, talk: TalkProfile) -> io::Result<ClientLoop> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let (adopt, rx) = mpsc::channel(ADOPT_QUEUE);
        let hub = Hub { poll, rx, clients: Vec::new(), timers: BinaryHeap::new(), speech, talk };
        std::thread::Builder::new().name("loadgen-clients".into()).spawn(move || hub.run())?;
        Ok(ClientLoop { adopt, waker })
    }

    /// Create a session on `base`, connect a client to it and hand the client to the loop,
    /// sending silence as `mic` says and acting as `profile` says (see [`Voice::with_profile`]).
    /// Returns the handle to its measurements. Errors: HTTP, the offer/answer, the socket's bind,
    /// or the loop has stopped.
    pub async fn connect(
        &self,
        http: &reqwest::Client,
        base: &str,
        api_key: Option<&str>,
        (mic, profile, every): (MicMode, Profile, Option<Duration>),
    ) -> anyhow::Result<Probe> {
        let session = NewSession::create(http, base, api_key).await?;
        let std_socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
        std_socket.set_nonblocking(true)?;
        let local = std_socket.local_addr()?;
        let Offerer { mut pc, sender, ssrc, offer } = offerer(local).context("client peer")?;
        let answer = session.offer(http, base, offer).await?;
        let pt = answered_opus_pt(&answer).unwrap_or(OPUS_PT);
        let answer = RTCSessionDescription::answer(answer).context("the server's answer")?;
        pc.set_remote_description(Instant::now(), answer).context("the server's answer")?;
        let recv = Arc::new(Mutex::new(Recv::default()));
        let voice = Voice::new(Arc::clone(&recv)).with_profile(mic, profile, every);
        let probe = voice.probe();
        let client = LoopClient {
            pc,
            socket: UdpSocket::from_std(std_socket),
            local,
            sender,
            ssrc,
            pt,
            seq: rand::random(),
            ts: rand::random(),
            voice,
            recv,
            deadline: None,
            filed: None,
        };
        self.adopt
            .send(Command::Adopt(Box::new(client)))
            .await
            .map_err(|_| anyhow::anyhow!("the client loop has stopped"))?;
        self.waker.wake()?;
        Ok(probe)
    }

    /// Hang up every client (their DTLS close_notify is sent) and stop the loop.
    pub async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        if self.adopt.send(Command::Stop(tx)).await.is_ok() && self.waker.wake().is_ok() {
            let _ = rx.await;
        }
    }
}

/// A client's core with its offer set as local description.
struct Offerer {
    pc: RTCPeerConnection,
    sender: RTCRtpSenderId,
    ssrc: u32,
    offer: String,
}

/// The core of a client as a browser would open it (the same offer as `client_peer::load_peer`'s):
/// one Opus microphone track (payload type 111, in-band FEC), a data channel labelled `events`,
/// RTCP sender/receiver reports as the only interceptors, and its one host candidate `local` in
/// the offer (gathering complete: no trickle). Errors: the core's.
fn offerer(local: SocketAddr) -> anyhow::Result<Offerer> {
    let now = Instant::now();
    let mut me = MediaEngine::default();
    me.register_codec(RTCRtpCodecParameters { rtp_codec: opus_codec(), payload_type: OPUS_PT }, RtpCodecKind::Audio)?;
    let mut pc = RTCPeerConnectionBuilder::new()
        .with_configuration(RTCConfigurationBuilder::new().build())
        .with_media_engine(me)
        .with_setting_engine(
            SettingEngineBuilder::new().with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled).build(),
        )
        .with_interceptor_registry(configure_rtcp_reports(Registry::new()))
        .build(now)?;
    let ssrc: u32 = rand::random();
    let sender = pc.add_track(crate::client_peer::mic_stream_track(ssrc))?;
    pc.create_data_channel("events", None)?;
    pc.add_local_candidate(kotodama::peer_loop::host_candidate(local).map_err(anyhow::Error::msg)?)?;
    // End of gathering: the offer is complete.
    pc.add_local_candidate(RTCIceCandidateInit::default())?;
    let offer = pc.create_offer(None)?;
    pc.set_local_description(now, offer)?;
    let offer = pc.local_description().context("no local description")?.sdp.clone();
    Ok(Offerer { pc, sender, ssrc, offer })
}

struct Hub {
    poll: Poll,
    rx: mpsc::Receiver<Command>,
    /// Clients by token (never removed before the loop stops).
    clients: Vec<LoopClient>,
    timers: BinaryHeap<Reverse<(Instant, usize)>>,
    speech: Arc<Speech>,
    talk: TalkProfile,
}

impl Hub {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let slot_len = TICK / SLOTS as u32;
        let mut next_tick = Instant::now() + slot_len;
        let mut slot = 0;
        loop {
            let wake_at = self.timers.peek().map_or(next_tick, |Reverse((at, _))| (*at).min(next_tick));
            let timeout = wake_at.saturating_duration_since(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, Some(timeout))
                && e.kind() != io::ErrorKind::Interrupted
            {
                eprintln!("client loop: epoll failed: {e}");
                return;
            }
            for ev in &events {
                if ev.token() != WAKER {
                    self.read_all(ev.token().0, &mut buf);
                }
            }
            // Commands (the waker's token, or a command that came with another wake).
            loop {
                match self.rx.try_recv() {
                    Ok(Command::Adopt(c)) => self.adopt(*c),
                    Ok(Command::Stop(done)) => {
                        self.close_all();
                        let _ = done.send(());
                        return;
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.close_all();
                        return;
                    }
                }
            }
            let now = Instant::now();
            if now >= next_tick {
                self.tick(slot, now);
                slot = (slot + 1) % SLOTS;
                next_tick += slot_len;
                // Late (the loop was behind): the next slot a slot from now, not a burst.
                if next_tick <= now {
                    next_tick = now + slot_len;
                }
            }
            self.expire(Instant::now());
        }
    }

    fn adopt(&mut self, mut c: LoopClient) {
        let token = Token(self.clients.len());
        if let Err(e) = self.poll.registry().register(&mut c.socket, token, Interest::READABLE) {
            eprintln!("client loop: cannot watch a client's socket: {e}");
            return;
        }
        self.clients.push(c);
        self.service(token.0);
    }

    /// Read every datagram waiting on client `i`'s socket, then service the client once.
    fn read_all(&mut self, i: usize, buf: &mut [u8]) {
        let Some(c) = self.clients.get_mut(i) else { return };
        let mut errors = 0;
        loop {
            let (n, from) = match c.socket.recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    errors += 1;
                    if errors > MAX_ERRORS_PER_READ {
                        break;
                    }
                    continue;
                }
            };
            let msg = TaggedBytesMut {
                now: Instant::now(),
                transport: TransportContext {
                    local_addr: c.local,
                    peer_addr: from,
                    ecn: None,
                    transport_protocol: TransportProtocol::UDP,
                },
                message: BytesMut::from(&buf[..n]),
            };
            // A datagram the core refuses is dropped, as a browser would.
            let _ = c.pc.handle_read(msg);
        }
        self.service(i);
    }

    /// One 20 ms frame of every client in `slot` (see [`SLOTS`]).
    fn tick(&mut self, slot: usize, now: Instant) {
        for i in (slot..self.clients.len()).step_by(SLOTS) {
            let c = &mut self.clients[i];
            let Some(payload) = c.voice.frame(now, &self.speech, &self.talk) else {
                c.ts = c.ts.wrapping_add(FRAME_TICKS);
                continue;
            };
            c.seq = c.seq.wrapping_add(1);
            c.ts = c.ts.wrapping_add(FRAME_TICKS);
            let header = rtp::header::Header {
                version: 2,
                payload_type: c.pt,
                sequence_number: c.seq,
                timestamp: c.ts,
                ssrc: c.ssrc,
                ..Default::default()
            };
            // Not sendable yet (before DTLS) or any more (closed): dropped, as by the task driver.
            if let Some(mut s) = c.pc.rtp_sender(c.sender) {
                let _ = s.write_rtp(now, rtp::Packet { header, payload });
            }
            self.service(i);
        }
    }

    /// Handle every due deadline.
    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((at, i))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(c) = self.clients.get_mut(i) else { continue };
            if c.filed != Some(at) {
                continue;
            }
            c.filed = None;
            match c.deadline {
                Some(d) if d <= now => {
                    c.deadline = None;
                    let _ = c.pc.handle_timeout(now);
                    self.service(i);
                }
                Some(d) => {
                    c.filed = Some(d);
                    self.timers.push(Reverse((d, i)));
                }
                None => {}
            }
        }
    }

    /// Drop the client's events, account its agent packets, drop its data-channel messages (the
    /// events are not what is measured; reading them acknowledges them), send what it has to
    /// send and file its next deadline.
    fn service(&mut self, i: usize) {
        let Some(c) = self.clients.get_mut(i) else { return };
        while c.pc.poll_event().is_some() {}
        while let Some(TaggedRTCMessage { now, message }) = c.pc.poll_read() {
            if let RTCMessage::RtpPacket(_, p) = message {
                on_packet(&c.recv, &p.header, now);
            }
        }
        while let Some(msg) = c.pc.poll_write() {
            // A full send buffer drops the datagram, as the network would.
            let _ = c.socket.send_to(&msg.message, msg.transport.peer_addr);
        }
        c.deadline = c.pc.poll_timeout();
        if let Some(d) = c.deadline
            && c.filed.is_none_or(|filed| d < filed)
        {
            c.filed = Some(d);
            self.timers.push(Reverse((d, i)));
        }
    }

    fn close_all(&mut self) {
        for c in &mut self.clients {
            let _ = c.pc.close();
            while let Some(msg) = c.pc.poll_write() {
                let _ = c.socket.send_to(&msg.message, msg.transport.peer_addr);
            }
        }
        self.clients.clear();
    }
}
