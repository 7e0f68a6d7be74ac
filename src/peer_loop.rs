//! One event loop for every peer of a node (`media.peer_driver = "loop"`, issue 14).
//!
//! webrtc-rs 0.21 wraps its sans-IO core (`rtc::peer_connection::RTCPeerConnection`) in a driver
//! task per peer: per packet it runs its whole loop (every component's `poll_write`, events,
//! reads and timeouts behind locks, a new timer and a `select!` over futures), ~36 us per packet
//! on this project's VM (BENCHMARKS.md, "Fourth round"). The same core driven directly costs
//! 3-6 us per 20 ms frame each way (BENCHMARKS.md, "Fifth round").
//!
//! [`PeerLoop`] owns one UDP socket and every peer's core. A datagram goes to its peer by the
//! ufrag in a STUN request's `USERNAME` (RFC 8445 §7.2.2), and by source address once the peer
//! has been reached from it; only that peer is then serviced (its writes sent, its events and
//! reads forwarded, its next deadline filed in one timer heap). Sessions talk to the loop through
//! one bounded command queue: an RTP packet to send, a data-channel text, or a job run on the
//! peer's core (candidates, stats, ICE restart). The loop itself allocates nothing per datagram but the
//! packet's own buffer.
//!
//! What it does not do (use `media.peer_driver = "task"`): ICE-TCP (RFC 6544) candidates and a
//! port range per session; its one socket is `media.udp_port` or an ephemeral port.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use rtc::data_channel::RTCDataChannelId;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent};
use rtc::peer_connection::message::{RTCMessage, TaggedRTCMessage};
use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpSenderId;
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use tokio::sync::{mpsc, oneshot};

use crate::peer::{EventChannel, PeerCounters, PeerEvent};

/// Commands queued from sessions to the loop (all sessions of a node share the queue).
pub const COMMAND_QUEUE: usize = 8192;
/// Datagrams or commands handled per wake before the loop yields to the sessions it woke (so a
/// burst of every client's packet at once does not hold one worker for the whole burst).
const BATCH: usize = 32;
/// Largest UDP datagram read (a DTLS flight or an Opus packet fits; larger ones are cut, and fail
/// their checks).
const MAX_DATAGRAM: usize = 2048;
/// Source addresses remembered per peer (a client's ICE candidates that reached us); the oldest is
/// forgotten beyond this.
const MAX_ADDRS_PER_PEER: usize = 8;
/// Data-channel bytes a peer may have queued and unacknowledged before events to it are dropped
/// (the same bound as the per-peer driver's send-buffer limit).
const MAX_OUTSTANDING: usize = 1024 * 1024;
/// How often a session's command is retried when the queue is full (close only: it must not be
/// lost).
const CLOSE_RETRY: Duration = Duration::from_millis(5);

/// A job run on a peer's core inside the loop (`now` is the loop's clock).
type Job = Box<dyn FnOnce(&mut RTCPeerConnection, Instant) + Send>;

enum Command {
    /// Take over a peer whose offer/answer is done (built on the caller's task).
    Adopt(Box<Adopted>),
    /// Send one RTP packet on the peer's audio sender.
    Rtp { peer: u64, sender: RTCRtpSenderId, packet: rtp::Packet },
    /// Send a text message on a data channel.
    Text { peer: u64, channel: RTCDataChannelId, text: String },
    /// Run a job on the peer's core.
    Run { peer: u64, job: Job },
    /// Close the peer and forget it.
    Close { peer: u64 },
}

struct Adopted {
    id: u64,
    pc: RTCPeerConnection,
    ufrag: String,
    events: mpsc::Sender<PeerEvent>,
    counters: Arc<PeerCounters>,
}

/// The node's loop: one socket, every peer.
#[derive(Debug)]
pub struct PeerLoop {
    commands: mpsc::Sender<Command>,
    /// The address in the peers' host candidates (and the local address of every datagram).
    candidate: SocketAddr,
    next_id: AtomicU64,
    /// Datagrams that matched no peer.
    pub unrouted: Arc<AtomicU64>,
    /// Live peers.
    live: Arc<AtomicUsize>,
}

impl Command {
    /// The peer the command is for.
    fn peer(&self) -> u64 {
        match self {
            Command::Adopt(a) => a.id,
            Command::Rtp { peer, .. }
            | Command::Text { peer, .. }
            | Command::Run { peer, .. }
            | Command::Close { peer } => *peer,
        }
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Command")
    }
}

impl PeerLoop {
    /// Bind `bind` (port 0: ephemeral) and start the loop on the current Tokio runtime. Host
    /// candidates name `public_ip` and the bound port. Errors: the bind's.
    pub fn bind(bind: SocketAddr, public_ip: IpAddr) -> io::Result<Arc<PeerLoop>> {
        let std_socket = std::net::UdpSocket::bind(bind)?;
        std_socket.set_nonblocking(true)?;
        let socket = tokio::net::UdpSocket::from_std(std_socket)?;
        let candidate = SocketAddr::new(public_ip, socket.local_addr()?.port());
        let (commands, rx) = mpsc::channel(COMMAND_QUEUE);
        let unrouted = Arc::new(AtomicU64::new(0));
        let live = Arc::new(AtomicUsize::new(0));
        let hub = Hub {
            socket,
            local: candidate,
            peers: HashMap::new(),
            by_ufrag: HashMap::new(),
            by_addr: HashMap::new(),
            timers: BinaryHeap::new(),
            unrouted: Arc::clone(&unrouted),
            live: Arc::clone(&live),
            weak: commands.downgrade(),
        };
        tokio::spawn(hub.run(rx));
        Ok(Arc::new(PeerLoop { commands, candidate, next_id: AtomicU64::new(1), unrouted, live }))
    }

    /// The address peers' host candidates carry.
    pub fn candidate_addr(&self) -> SocketAddr {
        self.candidate
    }

    /// Peers the loop holds.
    pub fn peers(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Hand a peer whose answer is set to the loop. `ufrag` is its local ICE ufrag (routes STUN).
    /// Errors: the loop is gone (the runtime is shutting down).
    pub(crate) async fn adopt(
        self: &Arc<Self>,
        pc: RTCPeerConnection,
        ufrag: String,
        sender: RTCRtpSenderId,
        events: mpsc::Sender<PeerEvent>,
        counters: Arc<PeerCounters>,
    ) -> Result<LoopPeer, ()> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let adopted = Adopted { id, pc, ufrag, events, counters };
        self.commands.send(Command::Adopt(Box::new(adopted))).await.map_err(drop)?;
        Ok(LoopPeer { id, sender, owner: Arc::clone(self) })
    }
}

/// A session's handle on its peer in the loop; dropping it closes the peer.
#[derive(Debug)]
pub struct LoopPeer {
    id: u64,
    sender: RTCRtpSenderId,
    owner: Arc<PeerLoop>,
}

/// Why a command did not reach the loop.
#[derive(Debug, thiserror::Error)]
pub enum LoopError {
    /// The queue is full (the loop is behind): the packet or message is dropped.
    #[error("the peer loop's queue is full")]
    Full,
    /// The loop or the peer is gone.
    #[error("the peer is closed")]
    Closed,
}

impl LoopPeer {
    /// The sender of the character's voice.
    pub fn sender(&self) -> RTCRtpSenderId {
        self.sender
    }

    /// Close the peer (idempotent; dropping the handle does the same).
    pub async fn close(&self) {
        let _ = self.owner.commands.send(Command::Close { peer: self.id }).await;
    }

    /// Queue one RTP packet (never waits). Errors: [`LoopError::Full`] drops it.
    pub fn write_rtp(&self, packet: rtp::Packet) -> Result<(), LoopError> {
        self.owner.commands.try_send(Command::Rtp { peer: self.id, sender: self.sender, packet }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LoopError::Full,
            mpsc::error::TrySendError::Closed(_) => LoopError::Closed,
        })
    }

    /// Run `f` on the peer's core in the loop and return its result. Errors:
    /// [`LoopError::Closed`] when the peer or the loop is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut RTCPeerConnection, Instant) -> T + Send + 'static,
    ) -> Result<T, LoopError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |pc, now| {
            let _ = tx.send(f(pc, now));
        });
        self.owner.commands.send(Command::Run { peer: self.id, job }).await.map_err(|_| LoopError::Closed)?;
        rx.await.map_err(|_| LoopError::Closed)
    }
}

impl Drop for LoopPeer {
    fn drop(&mut self) {
        let cmd = Command::Close { peer: self.id };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = self.owner.commands.try_send(cmd) {
            // A close must not be lost (the peer would live on in the loop): retry off this task.
            let commands = self.owner.commands.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    tokio::time::sleep(CLOSE_RETRY).await;
                    let _ = commands.send(cmd).await;
                });
            }
        }
    }
}

/// A data channel of a peer in the loop (cheap to clone).
#[derive(Debug, Clone)]
pub struct LoopChannel {
    peer: u64,
    channel: RTCDataChannelId,
    commands: mpsc::Sender<Command>,
    /// Bytes queued on the channel, as the loop last saw them.
    outstanding: Arc<AtomicUsize>,
}

impl LoopChannel {
    /// Queue a text message (never waits). Errors: the queue is full, or the client has not
    /// acknowledged [`MAX_OUTSTANDING`] bytes (a stalled client): the message is dropped.
    pub fn try_send_text(&self, text: &str) -> Result<(), LoopError> {
        if self.outstanding.load(Ordering::Relaxed) > MAX_OUTSTANDING {
            return Err(LoopError::Full);
        }
        let cmd = Command::Text { peer: self.peer, channel: self.channel, text: text.to_owned() };
        self.commands.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => LoopError::Full,
            mpsc::error::TrySendError::Closed(_) => LoopError::Closed,
        })
    }

    /// Bytes sent on the channel and not yet acknowledged by the client's SCTP.
    pub async fn outstanding_bytes(&self) -> usize {
        let channel = self.channel;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |pc, _| {
            let _ = tx.send(pc.data_channel(channel).map_or(0, |dc| dc.outstanding_bytes()));
        });
        if self.commands.send(Command::Run { peer: self.peer, job }).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Close the channel (RFC 8831 §6.7: the SCTP stream is reset).
    pub async fn close(&self) {
        let channel = self.channel;
        let job: Job = Box::new(move |pc, _| {
            if let Some(mut dc) = pc.data_channel(channel) {
                let _ = dc.close();
            }
        });
        let _ = self.commands.send(Command::Run { peer: self.peer, job }).await;
    }
}

/// A peer inside the loop.
struct Entry {
    pc: RTCPeerConnection,
    ufrag: String,
    addrs: Vec<SocketAddr>,
    events: mpsc::Sender<PeerEvent>,
    counters: Arc<PeerCounters>,
    /// The core's next deadline (`poll_timeout`), as last seen.
    deadline: Option<Instant>,
    /// The heap entry that stands for this peer (`None`: none). An entry popped at another
    /// instant was superseded by an earlier one and is dropped.
    filed: Option<Instant>,
    /// The session's channels (by id) and their outstanding-bytes mirrors.
    channels: Vec<(RTCDataChannelId, Arc<AtomicUsize>)>,
}

struct Hub {
    socket: tokio::net::UdpSocket,
    local: SocketAddr,
    peers: HashMap<u64, Entry>,
    by_ufrag: HashMap<String, u64>,
    by_addr: HashMap<SocketAddr, u64>,
    timers: BinaryHeap<Reverse<(Instant, u64)>>,
    unrouted: Arc<AtomicU64>,
    live: Arc<AtomicUsize>,
    /// For the channels handed to sessions (weak: the loop ends when the last session's sender
    /// and the [`PeerLoop`] are gone).
    weak: mpsc::WeakSender<Command>,
}

impl Hub {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let mut batch = Vec::with_capacity(BATCH);
        let sleep = tokio::time::sleep(Duration::from_secs(3600));
        tokio::pin!(sleep);
        loop {
            let next = self.timers.peek().map(|Reverse((at, _))| *at);
            if let Some(at) = next {
                sleep.as_mut().reset(tokio::time::Instant::from_std(at));
            }
            // Unbiased: a steady stream of commands must not starve the socket, nor the reverse.
            let more = tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => {
                    if n == 0 {
                        return;
                    }
                    let now = Instant::now();
                    for cmd in batch.drain(..) {
                        let id = cmd.peer();
                        self.isolate(id, |hub| hub.command(cmd, now));
                    }
                    n == BATCH
                }
                ready = self.socket.readable() => ready.is_ok() && self.read_some(&mut buf),
                () = &mut sleep, if next.is_some() => false,
            };
            // Deadlines are checked after every wake (a heap peek when none is due), so a busy
            // loop never lets them slip.
            self.expire(Instant::now());
            if more {
                tokio::task::yield_now().await;
            }
        }
    }

    /// Read up to [`BATCH`] datagrams waiting on the socket and feed each to its peer. Returns
    /// whether more may be waiting.
    fn read_some(&mut self, buf: &mut [u8]) -> bool {
        let mut errors = 0;
        for _ in 0..BATCH {
            let (n, from) = match self.socket.try_recv_from(buf) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                // ICMP errors of earlier sends surface here (one each): not fatal. Bounded, so a
                // socket that keeps failing cannot hold the loop.
                Err(e) => {
                    errors += 1;
                    if errors > 64 {
                        tracing::warn!(error = %e, "peer loop socket keeps failing");
                        return false;
                    }
                    continue;
                }
            };
            let datagram = &buf[..n];
            let Some(id) = self.route(datagram, from) else {
                self.unrouted.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            let now = Instant::now();
            let msg = TaggedBytesMut {
                now,
                transport: TransportContext {
                    local_addr: self.local,
                    peer_addr: from,
                    ecn: None,
                    transport_protocol: TransportProtocol::UDP,
                },
                message: BytesMut::from(datagram),
            };
            self.isolate(id, |hub| {
                let Some(entry) = hub.peers.get_mut(&id) else { return };
                if let Err(e) = entry.pc.handle_read(msg) {
                    tracing::trace!(error = %e, "datagram refused by the peer");
                }
                hub.service(id, now);
            });
        }
        true
    }

    /// The peer a datagram from `from` belongs to: by the ufrag of a STUN request (which also
    /// files `from` for that peer), else by the address it came from. A STUN response is routed by
    /// address: libnice echoes the request's USERNAME in it, which names the client's ufrag first.
    fn route(&mut self, datagram: &[u8], from: SocketAddr) -> Option<u64> {
        if let Some(ufrag) = crate::udp_mux::stun_local_ufrag(datagram)
            && let Some(&id) = self.by_ufrag.get(ufrag)
        {
            if self.by_addr.get(&from) != Some(&id) {
                let entry = self.peers.get_mut(&id)?;
                if entry.addrs.len() >= MAX_ADDRS_PER_PEER {
                    let old = entry.addrs.remove(0);
                    self.by_addr.remove(&old);
                }
                entry.addrs.push(from);
                if let Some(prev) = self.by_addr.insert(from, id)
                    && let Some(other) = self.peers.get_mut(&prev)
                {
                    other.addrs.retain(|a| *a != from);
                }
            }
            return Some(id);
        }
        self.by_addr.get(&from).copied()
    }

    fn command(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::Adopt(a) => {
                let Adopted { id, pc, ufrag, events, counters } = *a;
                self.by_ufrag.insert(ufrag.clone(), id);
                let entry = Entry {
                    pc,
                    ufrag,
                    addrs: Vec::new(),
                    events,
                    counters,
                    deadline: None,
                    filed: None,
                    channels: Vec::new(),
                };
                self.peers.insert(id, entry);
                self.live.store(self.peers.len(), Ordering::Relaxed);
                self.service(id, now);
            }
            Command::Rtp { peer, sender, packet } => {
                let Some(entry) = self.peers.get_mut(&peer) else { return };
                if let Some(mut s) = entry.pc.rtp_sender(sender)
                    && let Err(e) = s.write_rtp(now, packet)
                {
                    tracing::trace!(error = %e, "RTP not sent");
                }
                self.service(peer, now);
            }
            Command::Text { peer, channel, text } => {
                let Some(entry) = self.peers.get_mut(&peer) else { return };
                if let Some(mut dc) = entry.pc.data_channel(channel) {
                    if let Err(e) = dc.send_text(now, text) {
                        tracing::trace!(error = %e, "event not sent");
                    }
                    let queued = dc.outstanding_bytes();
                    if let Some((_, outstanding)) = entry.channels.iter().find(|(c, _)| *c == channel) {
                        outstanding.store(queued, Ordering::Relaxed);
                    }
                }
                self.service(peer, now);
            }
            Command::Run { peer, job } => {
                let Some(entry) = self.peers.get_mut(&peer) else { return };
                job(&mut entry.pc, now);
                // A job may have restarted ICE (a new local ufrag).
                if let Some(ufrag) = entry.pc.local_description().and_then(|d| crate::peer::ice_ufrag(&d.sdp))
                    && ufrag != entry.ufrag
                {
                    self.by_ufrag.remove(&entry.ufrag);
                    self.by_ufrag.insert(ufrag.clone(), peer);
                    entry.ufrag = ufrag;
                }
                self.service(peer, now);
            }
            Command::Close { peer } => {
                let Some(mut entry) = self.forget(peer) else { return };
                let _ = entry.pc.close();
                // The close's own datagrams (DTLS close_notify) still go out.
                while let Some(msg) = entry.pc.poll_write() {
                    let _ = self.socket.try_send_to(&msg.message, msg.transport.peer_addr);
                }
            }
        }
    }

    /// Remove a peer and its routes.
    fn forget(&mut self, id: u64) -> Option<Entry> {
        let entry = self.peers.remove(&id)?;
        self.by_ufrag.remove(&entry.ufrag);
        for a in &entry.addrs {
            if self.by_addr.get(a) == Some(&id) {
                self.by_addr.remove(a);
            }
        }
        self.live.store(self.peers.len(), Ordering::Relaxed);
        Some(entry)
    }

    /// Run `f`, work on peer `id`, so that a panic inside the WebRTC stack (a bug reached by a
    /// hostile packet, say) fails that peer alone: it is dropped and its session told the
    /// connection failed, and the loop goes on for every other peer.
    fn isolate(&mut self, id: u64, f: impl FnOnce(&mut Self)) {
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self))).is_err() {
            tracing::error!(peer = id, "the WebRTC stack panicked on this peer; dropping it");
            if let Some(entry) = self.forget(id) {
                use rtc::peer_connection::state::RTCPeerConnectionState as S;
                deliver(&entry.events, PeerEvent::State(S::Failed));
            }
        }
    }

    /// Handle every due deadline.
    fn expire(&mut self, now: Instant) {
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                return;
            }
            self.timers.pop();
            let Some(entry) = self.peers.get_mut(&id) else { continue };
            if entry.filed != Some(at) {
                continue;
            }
            entry.filed = None;
            match entry.deadline {
                Some(d) if d <= now => {
                    entry.deadline = None;
                    self.isolate(id, |hub| {
                        let Some(entry) = hub.peers.get_mut(&id) else { return };
                        if let Err(e) = entry.pc.handle_timeout(now) {
                            tracing::trace!(error = %e, "peer timeout handling failed");
                        }
                        hub.service(id, now);
                    });
                }
                // Moved later since it was filed: file the later one.
                Some(d) => {
                    entry.filed = Some(d);
                    self.timers.push(Reverse((d, id)));
                }
                None => {}
            }
        }
    }

    /// Send what the peer has to send, forward its events and reads, and file its next deadline.
    fn service(&mut self, id: u64, now: Instant) {
        let Hub { peers, weak, socket, timers, .. } = self;
        let Some(entry) = peers.get_mut(&id) else { return };
        // Events before reads: a channel's open comes before its first message.
        while let Some(ev) = entry.pc.poll_event() {
            match ev {
                RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                    deliver(&entry.events, PeerEvent::State(state));
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(channel)) => {
                    let Some(dc) = entry.pc.data_channel(channel) else { continue };
                    if !crate::peer::is_session_channel(dc.label()) {
                        tracing::debug!(label = dc.label(), "ignoring data channel with an unknown label");
                        continue;
                    }
                    let Some(commands) = weak.upgrade() else { continue };
                    let outstanding = Arc::new(AtomicUsize::new(0));
                    entry.channels.push((channel, Arc::clone(&outstanding)));
                    let open = LoopChannel { peer: id, channel, commands, outstanding };
                    deliver(&entry.events, PeerEvent::ChannelOpen(EventChannel::Loop(open)));
                }
                RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnClose(channel)) => {
                    if let Some(at) = entry.channels.iter().position(|(c, _)| *c == channel) {
                        entry.channels.remove(at);
                        deliver(&entry.events, PeerEvent::ChannelClosed);
                    }
                }
                _ => {}
            }
        }
        while let Some(TaggedRTCMessage { message, .. }) = entry.pc.poll_read() {
            match message {
                RTCMessage::RtpPacket(_, p) => {
                    let ev = PeerEvent::Rtp {
                        arrival: now,
                        payload_type: p.header.payload_type,
                        ssrc: p.header.ssrc,
                        seq: p.header.sequence_number,
                        timestamp: p.header.timestamp,
                        payload: p.payload,
                    };
                    match entry.events.try_send(ev) {
                        Ok(()) => entry.counters.rtp_in.fetch_add(1, Ordering::Relaxed),
                        Err(_) => entry.counters.rtp_dropped.fetch_add(1, Ordering::Relaxed),
                    };
                }
                RTCMessage::DataChannelMessage(channel, msg) => {
                    if !entry.channels.iter().any(|(c, _)| *c == channel) {
                        continue;
                    }
                    if entry.events.try_send(PeerEvent::Message(msg.data)).is_err() {
                        entry.counters.messages_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
        }
        while let Some(msg) = entry.pc.poll_write() {
            // A full send buffer drops the datagram, as the network would.
            let _ = socket.try_send_to(&msg.message, msg.transport.peer_addr);
        }
        // Only channels with something queued can change (a send sets it non-zero first).
        for (channel, outstanding) in &entry.channels {
            if outstanding.load(Ordering::Relaxed) > 0
                && let Some(dc) = entry.pc.data_channel(*channel)
            {
                outstanding.store(dc.outstanding_bytes(), Ordering::Relaxed);
            }
        }
        entry.deadline = entry.pc.poll_timeout();
        if let Some(d) = entry.deadline
            && entry.filed.is_none_or(|filed| d < filed)
        {
            // An earlier deadline: file it (the later entry, if any, is dropped when popped).
            entry.filed = Some(d);
            timers.push(Reverse((d, id)));
        }
    }
}

/// Forward a rare event that must not be lost without making the loop wait: a full queue hands
/// the send to a task of its own.
fn deliver(events: &mpsc::Sender<PeerEvent>, ev: PeerEvent) {
    if let Err(mpsc::error::TrySendError::Full(ev)) = events.try_send(ev) {
        let events = events.clone();
        tokio::spawn(async move {
            let _ = events.send(ev).await;
        });
    }
}

/// The host candidate (RFC 8445 §5.1.1.1) of a UDP socket at `addr`, as a sans-IO `rtc` peer
/// takes it in `add_local_candidate`: what the loop's peers and the generator's clients announce.
/// Errors: the stack's, as text.
pub fn host_candidate(addr: SocketAddr) -> Result<rtc::peer_connection::transport::RTCIceCandidateInit, String> {
    use rtc::peer_connection::transport::{CandidateConfig, CandidateHostConfig, RTCIceCandidate};
    let host = CandidateHostConfig {
        base_config: CandidateConfig {
            network: "udp".to_owned(),
            address: addr.ip().to_string(),
            port: addr.port(),
            component: 1,
            ..Default::default()
        },
        ..Default::default()
    }
    .new_candidate_host()
    .map_err(|e| e.to_string())?;
    RTCIceCandidate::from(&host).to_json().map_err(|e| e.to_string())
}

/// Start the node's peer loop when `media.peer_driver = "loop"`: one UDP socket on the HTTP bind's
/// address and `media.udp_port` (unset: an ephemeral port). Errors name the key and the bind's
/// cause.
pub fn bind_configured(config: &crate::config::Config) -> Result<Option<Arc<PeerLoop>>, crate::config::ConfigError> {
    if config.media.peer_driver != crate::config::PeerDriver::Loop {
        return Ok(None);
    }
    let addr = SocketAddr::new(config.bind.ip(), config.media.udp_port.unwrap_or(0));
    let peer_loop = PeerLoop::bind(addr, config.advertised_ip()).map_err(|e| {
        crate::config::err(
            "media.peer_driver (KOTODAMA_PEER_DRIVER)",
            format!("cannot bind the peer loop's UDP socket {addr}: {e}"),
            "choose a free media.udp_port (KOTODAMA_UDP_PORT), or stop what holds it",
        )
    })?;
    tracing::info!(candidate = %peer_loop.candidate_addr(), "one loop and one UDP socket for every peer");
    Ok(Some(peer_loop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::media_stream::MediaStreamTrack;
    use rtc::peer_connection::RTCPeerConnectionBuilder;
    use rtc::peer_connection::configuration::RTCConfigurationBuilder;
    use rtc::peer_connection::configuration::media_engine::MediaEngine;
    use rtc::peer_connection::state::RTCPeerConnectionState;
    use rtc::rtp_transceiver::rtp_sender::{
        RTCRtpCodec, RTCRtpCodecParameters, RTCRtpEncodingParameters, RtpCodecKind,
    };

    /// A peer with an Opus track and an offer set (what the loop adopts), its ufrag and sender.
    fn peer() -> (RTCPeerConnection, String, RTCRtpSenderId) {
        let opus = RTCRtpCodec {
            mime_type: "audio/opus".into(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        };
        let mut me = MediaEngine::default();
        me.register_codec(RTCRtpCodecParameters { rtp_codec: opus.clone(), payload_type: 111 }, RtpCodecKind::Audio)
            .unwrap();
        let now = Instant::now();
        let mut pc = RTCPeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .build(now)
            .unwrap();
        let encodings = vec![RTCRtpEncodingParameters { codec: opus, ..Default::default() }];
        let track = MediaStreamTrack::new("s".into(), "t".into(), "l".into(), RtpCodecKind::Audio, encodings);
        let sender = pc.add_track(track).unwrap();
        let offer = pc.create_offer(None).unwrap();
        pc.set_local_description(now, offer).unwrap();
        let ufrag = crate::peer::ice_ufrag(&pc.local_description().unwrap().sdp).unwrap();
        (pc, ufrag, sender)
    }

    async fn peers_become(pl: &PeerLoop, n: usize) {
        for _ in 0..200 {
            if pl.peers() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pl.peers(), n);
    }

    #[tokio::test]
    async fn a_panic_in_one_peers_stack_fails_that_peer_alone_and_a_dropped_handle_frees_its_peer() {
        let pl = PeerLoop::bind("127.0.0.1:0".parse().unwrap(), "127.0.0.1".parse().unwrap()).unwrap();
        let counters = Arc::new(PeerCounters::default());
        let (a_tx, mut a_rx) = mpsc::channel(16);
        let (pc, ufrag, sender) = peer();
        let a = pl.adopt(pc, ufrag, sender, a_tx, Arc::clone(&counters)).await.unwrap();
        let (b_tx, _b_rx) = mpsc::channel(16);
        let (pc, ufrag, sender) = peer();
        let b = pl.adopt(pc, ufrag, sender, b_tx, counters).await.unwrap();
        peers_become(&pl, 2).await;

        let crashed = a.run(|_, _| -> bool { panic!("a bug in the stack") }).await;
        assert!(matches!(crashed, Err(LoopError::Closed)), "{crashed:?}");
        let told = tokio::time::timeout(Duration::from_secs(5), a_rx.recv()).await.unwrap();
        assert!(matches!(told, Some(PeerEvent::State(RTCPeerConnectionState::Failed))), "the session hears it failed");
        peers_become(&pl, 1).await;
        // The other peer is served on as before.
        assert!(b.run(|pc, _| pc.local_description().is_some()).await.unwrap());
        assert!(matches!(a.write_rtp(rtp::Packet::default()), Ok(())), "a queued packet for a gone peer is harmless");

        drop(b);
        peers_become(&pl, 0).await;
    }
}
