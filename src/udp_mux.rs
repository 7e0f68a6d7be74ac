//! One UDP socket for the media of every session (ICE UDP mux, `KOTODAMA_UDP_PORT` /
//! `media.udp_port`), demultiplexed by ICE username and remote address.
//!
//! Why this road: webrtc-rs 0.21's async layer lets a custom [`Runtime`] own the datagrams (its
//! `wrap_udp_socket` returns any [`AsyncUdpSocket`]; the driver polls `poll_recv`/`poll_send`
//! directly, without a boxed future per datagram), so each peer keeps the whole tested async stack
//! (ICE, DTLS, SRTP, SCTP, tracks, data channels) and only its socket is virtual. Driving the
//! sans-IO `rtc` core directly would mean re-writing the 2,500-line driver (timers, gathering,
//! data-channel back-pressure, ICE restart rebinding) for every session. The cost of this road is
//! one extra copy (into a recycled buffer of the peer's queue), a lock and a wake-up per inbound
//! datagram (measured in BENCHMARKS.md).
//!
//! How it works: each peer is built with a [`MuxRuntime`] (the Tokio runtime plus this socket).
//! The driver binds an ordinary socket on an ephemeral port as usual; the runtime drops it at once
//! and hands back a [`MuxedSocket`] on the shared one, so the process holds exactly one media UDP
//! socket at steady state. The peer's candidates name the ephemeral port; [`MuxLease::rewrite_ports`]
//! puts the shared port in the SDP the client sees. Inbound:
//!
//! - a STUN message (RFC 7983: first byte 0..=3, RFC 8489 magic cookie) whose `USERNAME` is
//!   `<our ufrag>:<theirs>` (RFC 8445 §7.2.2) goes to the peer that owns that ufrag, and teaches
//!   the mux the sender's address (this is how a peer-reflexive client is found);
//! - anything else (DTLS, SRTP, SRTCP, STUN responses) goes by remote address, learnt from those
//!   checks and from every address a peer sends to.
//!
//! ICE-TCP (RFC 6544): with `tcp` the same port number is also a TCP listener. A connection's
//! first RFC 4571 frame (the client's STUN Binding request) names the peer by its USERNAME, and
//! the connection, that frame included, goes to the peer's virtual listener; the driver frames
//! the rest as usual. The server is passive only: [`MuxRuntime`] refuses to dial.
//!
//! Datagrams for nobody are dropped and counted. A peer's queue is bounded
//! ([`QUEUE_DATAGRAMS`]); when full the datagram is dropped and counted (UDP semantics; ICE, DTLS
//! and SCTP retransmit, Opus has PLC). Sends never block: a full socket buffer drops and counts.
//! A peer's routes go away with its [`MuxLease`]; other peers' routes are untouched.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use crate::config::{Config, ConfigError, MediaSettings};
use futures::task::AtomicWaker;
use webrtc::runtime::{AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, RecvMeta, Runtime, TokioRuntime, Transmit};

/// Datagrams queued per peer before the mux drops (20 ms of audio is one; DTLS flights are a few).
pub const QUEUE_DATAGRAMS: usize = 256;
/// Emptied buffers a peer keeps for reuse.
const FREE_BUFFERS: usize = 16;
/// Largest datagram read (WebRTC keeps to ~1200 bytes; a 1500-byte MTU bounds the rest).
const MAX_DATAGRAM: usize = 1500;
/// STUN attribute USERNAME (RFC 8489 §14.3).
const ATTR_USERNAME: u16 = 0x0006;

/// Counters of the shared socket.
#[derive(Debug, Default)]
pub struct MuxCounters {
    /// Datagrams delivered to a peer.
    pub delivered: AtomicU64,
    /// Datagrams no peer owns (unknown ufrag and address).
    pub unroutable: AtomicU64,
    /// Datagrams dropped because a peer's queue was full.
    pub queue_full: AtomicU64,
    /// Sends dropped because the socket buffer was full.
    pub send_dropped: AtomicU64,
}

/// Datagrams waiting for a peer, and the emptied buffers they are copied into (reused, so the
/// steady-state path allocates nothing).
#[derive(Debug, Default)]
struct SlotQueue {
    ready: VecDeque<(Vec<u8>, SocketAddr)>,
    free: Vec<Vec<u8>>,
}

/// One peer's inbound queue.
#[derive(Debug, Default)]
struct Slot {
    queue: Mutex<SlotQueue>,
    waker: AtomicWaker,
    /// Addresses this peer has sent to (routes already registered).
    sent_to: Mutex<Vec<SocketAddr>>,
    /// Ports of the placeholder sockets and listeners the driver bound (named in its candidates).
    placeholder_ports: Mutex<Vec<u16>>,
    /// Where ICE-TCP connections for this peer go (set when the driver asks for a listener).
    tcp: Mutex<Option<tokio::sync::mpsc::Sender<Accepted>>>,
}

/// An ICE-TCP connection handed to a peer's listener, with its remote address.
type Accepted = (Arc<dyn AsyncTcpStream>, SocketAddr);

#[derive(Debug, Default)]
struct Routes {
    by_ufrag: HashMap<String, u64>,
    by_addr: HashMap<SocketAddr, u64>,
    slots: HashMap<u64, Arc<Slot>>,
}

/// The shared media socket and its routing table.
#[derive(Debug)]
pub struct UdpMux {
    socket: tokio::net::UdpSocket,
    local: SocketAddr,
    /// The ICE-TCP passive listener on the same port number, when bound.
    tcp_local: Option<SocketAddr>,
    routes: Mutex<Routes>,
    next_id: AtomicU64,
    counters: MuxCounters,
}

impl UdpMux {
    /// Bind UDP `addr` (and, with `tcp`, TCP on the same address and port for ICE-TCP passive
    /// candidates, RFC 6544) and start the receive tasks. Errors: the binds' (port taken, address
    /// not local).
    pub fn bind(addr: SocketAddr, tcp: bool) -> io::Result<Arc<UdpMux>> {
        let std = std::net::UdpSocket::bind(addr)?;
        std.set_nonblocking(true)?;
        let local = std.local_addr()?;
        let listener = match tcp {
            true => Some(std::net::TcpListener::bind(local)?),
            false => None,
        };
        let tcp_local = listener.as_ref().map(|l| l.local_addr()).transpose()?;
        let mux = Arc::new(UdpMux {
            socket: tokio::net::UdpSocket::from_std(std)?,
            local,
            tcp_local,
            routes: Mutex::new(Routes::default()),
            next_id: AtomicU64::new(1),
            counters: MuxCounters::default(),
        });
        tokio::spawn(receive_loop(Arc::downgrade(&mux)));
        if let Some(listener) = listener {
            listener.set_nonblocking(true)?;
            tokio::spawn(accept_loop(Arc::downgrade(&mux), tokio::net::TcpListener::from_std(listener)?));
        }
        Ok(mux)
    }

    /// The ICE-TCP listener's address, when there is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp_local
    }

    /// The shared socket's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The counters.
    pub fn counters(&self) -> &MuxCounters {
        &self.counters
    }

    /// Peers with routes now.
    pub fn peers(&self) -> usize {
        self.lock().slots.len()
    }

    /// A new peer's lease: its runtime (give it to the peer connection builder) and its routes.
    pub fn lease(self: &Arc<Self>) -> MuxLease {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot::default());
        self.lock().slots.insert(id, Arc::clone(&slot));
        MuxLease { mux: Arc::clone(self), id, slot }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hand one datagram to its peer (see the module docs for the rules).
    fn route(&self, datagram: &[u8], from: SocketAddr) {
        let slot = {
            let mut routes = self.lock();
            let by_ufrag = stun_local_ufrag(datagram).and_then(|u| routes.by_ufrag.get(u).copied());
            let id = match by_ufrag {
                Some(id) => {
                    routes.by_addr.insert(from, id);
                    Some(id)
                }
                None => routes.by_addr.get(&from).copied(),
            };
            id.and_then(|id| routes.slots.get(&id).cloned())
        };
        let Some(slot) = slot else {
            self.counters.unroutable.fetch_add(1, Ordering::Relaxed);
            return;
        };
        {
            let mut queue = slot.queue.lock().unwrap_or_else(|p| p.into_inner());
            if queue.ready.len() >= QUEUE_DATAGRAMS {
                self.counters.queue_full.fetch_add(1, Ordering::Relaxed);
                return;
            }
            let mut buf = queue.free.pop().unwrap_or_else(|| Vec::with_capacity(MAX_DATAGRAM));
            buf.clear();
            buf.extend_from_slice(datagram);
            queue.ready.push_back((buf, from));
        }
        self.counters.delivered.fetch_add(1, Ordering::Relaxed);
        slot.waker.wake();
    }
}

async fn receive_loop(mux: std::sync::Weak<UdpMux>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let Some(m) = mux.upgrade() else { return };
        match m.socket.recv_from(&mut buf).await {
            Ok((n, from)) => m.route(&buf[..n], from),
            // ICMP errors of one peer surface here (ECONNREFUSED); they concern nobody else.
            Err(e) if webrtc_retryable(&e) => {}
            Err(e) => {
                tracing::error!(error = %e, "media UDP socket failed");
                return;
            }
        }
    }
}

async fn accept_loop(mux: std::sync::Weak<UdpMux>, listener: tokio::net::TcpListener) {
    loop {
        let accepted = listener.accept().await;
        let Some(m) = mux.upgrade() else { return };
        match accepted {
            Ok((stream, from)) => {
                tokio::spawn(tcp_handshake(m, stream, from));
            }
            Err(e) if webrtc_retryable(&e) => {}
            Err(e) => {
                // Too many open files and the like: back off rather than spin.
                tracing::warn!(error = %e, "ICE-TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Read the connection's first RFC 4571 frame (a STUN Binding request), find its peer by the
/// USERNAME's ufrag, and hand the connection (that frame included) to that peer's listener.
async fn tcp_handshake(mux: Arc<UdpMux>, mut stream: tokio::net::TcpStream, from: SocketAddr) {
    use tokio::io::AsyncReadExt as _;
    let first = async {
        let mut head = [0u8; 2];
        stream.read_exact(&mut head).await.ok()?;
        let len = usize::from(u16::from_be_bytes(head));
        if len > MAX_DATAGRAM {
            return None;
        }
        let mut frame = vec![0u8; 2 + len];
        frame[..2].copy_from_slice(&head);
        stream.read_exact(&mut frame[2..]).await.ok()?;
        Some(frame)
    };
    let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(5), first).await else { return };
    let tx = {
        let routes = mux.lock();
        let slot =
            stun_local_ufrag(&frame[2..]).and_then(|u| routes.by_ufrag.get(u)).and_then(|id| routes.slots.get(id));
        slot.and_then(|s| s.tcp.lock().unwrap_or_else(|p| p.into_inner()).clone())
    };
    let Some(tx) = tx else {
        mux.counters.unroutable.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Ok(local) = stream.local_addr() else { return };
    let (read, write) = stream.into_split();
    let stream = MuxedTcpStream {
        prefix: Mutex::new(Some(frame)),
        read: tokio::sync::Mutex::new(read),
        write: tokio::sync::Mutex::new(write),
        local,
        peer: from,
    };
    let _ = tx.try_send((Arc::new(stream), from));
}

/// An accepted ICE-TCP connection whose first frame the mux has already read.
#[derive(Debug)]
struct MuxedTcpStream {
    prefix: Mutex<Option<Vec<u8>>>,
    read: tokio::sync::Mutex<tokio::net::tcp::OwnedReadHalf>,
    write: tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>,
    local: SocketAddr,
    peer: SocketAddr,
}

impl AsyncTcpStream for MuxedTcpStream {
    fn read<'a, 'b>(&'a self, buf: &'b mut [u8]) -> Pin<Box<dyn Future<Output = io::Result<usize>> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(async move {
            {
                let mut prefix = self.prefix.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(head) = prefix.as_mut() {
                    let n = head.len().min(buf.len());
                    buf[..n].copy_from_slice(&head[..n]);
                    head.drain(..n);
                    if head.is_empty() {
                        *prefix = None;
                    }
                    return Ok(n);
                }
            }
            use tokio::io::AsyncReadExt as _;
            self.read.lock().await.read(buf).await
        })
    }

    fn write_all<'a, 'b>(&'a self, buf: &'b [u8]) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send + 'b>>
    where
        'a: 'b,
    {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt as _;
            self.write.lock().await.write_all(buf).await
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.peer)
    }
}

/// A peer's ICE-TCP listener: the connections the mux routed to it.
#[derive(Debug)]
struct MuxedTcpListener {
    accepted: tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Accepted>>,
    local: SocketAddr,
}

impl AsyncTcpListener for MuxedTcpListener {
    fn accept<'a>(&'a self) -> Pin<Box<dyn Future<Output = io::Result<Accepted>> + Send + 'a>> {
        Box::pin(async move {
            match self.accepted.lock().await.recv().await {
                Some(a) => Ok(a),
                // The lease ended: the peer is closing; nothing more will come.
                None => std::future::pending().await,
            }
        })
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

fn webrtc_retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::TimedOut
    )
}

/// The local ufrag of a STUN request: the part of `USERNAME` before `:` (RFC 8445 §7.2.2).
/// `None` for anything that is not a STUN request with a USERNAME: a response's USERNAME (libnice
/// puts the request's in its responses) names the other side first, so responses are routed by
/// their source address.
pub(crate) fn stun_local_ufrag(d: &[u8]) -> Option<&str> {
    if d.len() < 20 || d[0] > 3 || d[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    // The class bits C1 (0x0100) and C0 (0x0010) of the message type are 0 for a request
    // (RFC 8489 §5).
    if u16::from_be_bytes([d[0], d[1]]) & 0x0110 != 0 {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
    let attrs = d.get(20..20 + len)?;
    let mut at = 0;
    while at + 4 <= attrs.len() {
        let kind = u16::from_be_bytes([attrs[at], attrs[at + 1]]);
        let alen = usize::from(u16::from_be_bytes([attrs[at + 2], attrs[at + 3]]));
        let value = attrs.get(at + 4..at + 4 + alen)?;
        if kind == ATTR_USERNAME {
            let username = std::str::from_utf8(value).ok()?;
            return username.split(':').next();
        }
        at += 4 + alen.div_ceil(4) * 4;
    }
    None
}

/// One peer's place on the shared socket; dropping it removes the peer's routes (and only its).
#[derive(Debug)]
pub struct MuxLease {
    mux: Arc<UdpMux>,
    id: u64,
    slot: Arc<Slot>,
}

impl MuxLease {
    /// The shared ICE-TCP listener's address, when there is one.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.mux.tcp_local
    }

    /// The runtime to build this peer's connection with.
    pub fn runtime(&self) -> Arc<dyn Runtime> {
        Arc::new(MuxRuntime { mux: Arc::clone(&self.mux), id: self.id, slot: Arc::clone(&self.slot) })
    }

    /// Route STUN requests for `ufrag` (this peer's local ICE username fragment) here. Called
    /// after every local description (answer, ICE restart); older ufrags keep routing until
    /// the lease ends (a restart's late checks still arrive).
    pub fn set_ufrag(&self, ufrag: &str) {
        self.mux.lock().by_ufrag.insert(ufrag.to_owned(), self.id);
    }

    /// `sdp` with the placeholder sockets' and listeners' ports replaced by the shared port (the
    /// same number for UDP and ICE-TCP) in `a=candidate` lines
    /// (`candidate:<foundation> <component> <transport> <priority> <address> <port> ...`,
    /// RFC 8839 §5.1).
    pub fn rewrite_ports(&self, sdp: &str) -> String {
        let ports = self.slot.placeholder_ports.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let shared = self.mux.local.port().to_string();
        let mut out = String::with_capacity(sdp.len());
        for line in sdp.split_inclusive('\n') {
            if !line.starts_with("a=candidate:") {
                out.push_str(line);
                continue;
            }
            let fields: Vec<&str> = line.split(' ').collect();
            for (i, f) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(' ');
                }
                let placeholder = i == 5 && f.parse::<u16>().is_ok_and(|p| ports.contains(&p));
                out.push_str(if placeholder { &shared } else { f });
            }
        }
        out
    }
}

impl Drop for MuxLease {
    fn drop(&mut self) {
        let mut routes = self.mux.lock();
        routes.slots.remove(&self.id);
        routes.by_ufrag.retain(|_, id| *id != self.id);
        routes.by_addr.retain(|_, id| *id != self.id);
    }
}

/// The Tokio runtime, except that UDP sockets are this peer's view of the shared socket.
#[derive(Debug)]
struct MuxRuntime {
    mux: Arc<UdpMux>,
    id: u64,
    slot: Arc<Slot>,
}

impl Runtime for MuxRuntime {
    crate::plain_udp::tokio_executor_and_dns!();

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        // The driver's own socket only names a port for its candidates: close it now.
        let port = socket.local_addr()?.port();
        drop(socket);
        self.slot.placeholder_ports.lock().unwrap_or_else(|p| p.into_inner()).push(port);
        Ok(Arc::new(MuxedSocket { mux: Arc::clone(&self.mux), id: self.id, slot: Arc::clone(&self.slot) }))
    }

    fn wrap_tcp_listener(&self, listener: std::net::TcpListener) -> io::Result<Arc<dyn AsyncTcpListener>> {
        let Some(shared) = self.mux.tcp_local else { return TokioRuntime.wrap_tcp_listener(listener) };
        // As for UDP: the driver's listener only names a port; the shared one accepts.
        let port = listener.local_addr()?.port();
        drop(listener);
        self.slot.placeholder_ports.lock().unwrap_or_else(|p| p.into_inner()).push(port);
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        *self.slot.tcp.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
        Ok(Arc::new(MuxedTcpListener { accepted: tokio::sync::Mutex::new(rx), local: shared }))
    }

    fn connect_tcp<'a>(
        &'a self,
        _remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        // The server is ICE-TCP passive only: it never dials an address a client named.
        Box::pin(async { Err(io::Error::new(io::ErrorKind::PermissionDenied, "the server does not dial ICE-TCP")) })
    }

    fn name(&self) -> &'static str {
        "tokio+udp-mux"
    }
}

/// A peer's view of the shared socket.
#[derive(Debug)]
struct MuxedSocket {
    mux: Arc<UdpMux>,
    id: u64,
    slot: Arc<Slot>,
}

impl MuxedSocket {
    /// Route replies from `to` to this peer (once per address).
    fn learn(&self, to: SocketAddr) {
        let mut sent = self.slot.sent_to.lock().unwrap_or_else(|p| p.into_inner());
        if !sent.contains(&to) {
            sent.push(to);
            self.mux.lock().by_addr.insert(to, self.id);
        }
    }
}

impl AsyncUdpSocket for MuxedSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.mux.local)
    }

    fn poll_send(&self, _cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        self.learn(transmit.destination);
        match self.mux.socket.try_send_to(transmit.contents, transmit.destination) {
            Ok(n) => Poll::Ready(Ok(n)),
            // Never wait on a socket every session shares: drop like a full network would.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.mux.counters.send_dropped.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Ok(transmit.contents.len()))
            }
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let pop = || self.slot.queue.lock().unwrap_or_else(|p| p.into_inner()).ready.pop_front();
        let next = match pop() {
            Some(d) => Some(d),
            None => {
                // Register, then look again: a datagram queued in between would otherwise wait.
                self.slot.waker.register(cx.waker());
                pop()
            }
        };
        let Some((datagram, from)) = next else { return Poll::Pending };
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else { return Poll::Ready(Ok(0)) };
        let n = datagram.len().min(buf.len());
        buf[..n].copy_from_slice(&datagram[..n]);
        m.addr = from;
        m.len = n;
        m.stride = n.max(1);
        m.ecn = None;
        m.dst_ip = Some(self.mux.local.ip());
        let mut queue = self.slot.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.free.len() < FREE_BUFFERS {
            queue.free.push(datagram);
        }
        Poll::Ready(Ok(1))
    }
}

// ---- configuration: `media.udp_port` / `KOTODAMA_UDP_PORT` ------------------------------------

/// Apply `KOTODAMA_UDP_PORT` to `media.udp_port`.
pub fn apply_env(media: &mut MediaSettings, get: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    if let Some(v) = get("KOTODAMA_UDP_PORT").filter(|v| !v.trim().is_empty()) {
        media.udp_port = Some(v.trim().parse().ok().filter(|p| *p > 0).ok_or_else(|| ConfigError {
            key: "KOTODAMA_UDP_PORT".into(),
            problem: format!("`{v}` is not a port 1..=65535"),
            fix: "use e.g. 3479 (open it for UDP in the firewall)".into(),
        })?);
    }
    Ok(())
}

/// `media.udp_port` and `media.udp_ports` exclude each other, and the shared port needs a
/// concrete bind address: on a wildcard bind webrtc-rs makes one socket per interface, and the
/// shared socket could not tell them apart.
pub fn validate(config: &Config) -> Result<(), ConfigError> {
    let media = &config.media;
    if media.udp_port.is_some() && config.bind.ip().is_unspecified() {
        return Err(ConfigError {
            key: "media.udp_port (KOTODAMA_UDP_PORT)".into(),
            problem: format!("the bind address {} is a wildcard", config.bind.ip()),
            fix: "set KOTODAMA_BIND to the interface's own address (and KOTODAMA_PUBLIC_IP behind 1:1 NAT)".into(),
        });
    }
    match (media.udp_port, &media.udp_ports) {
        (Some(0), _) => Err(ConfigError {
            key: "media.udp_port (KOTODAMA_UDP_PORT)".into(),
            problem: "port 0".into(),
            fix: "use a fixed port, e.g. 3479".into(),
        }),
        (Some(_), Some(_)) => Err(ConfigError {
            key: "media.udp_port (KOTODAMA_UDP_PORT) and media.udp_ports (KOTODAMA_UDP_PORTS)".into(),
            problem: "both are set: one shared port, or one port per session, not both".into(),
            fix: "unset one of them (KOTODAMA_UDP_PORT alone is the one-port setup)".into(),
        }),
        _ => Ok(()),
    }
}

/// Bind the shared socket when `media.udp_port` is set, on the HTTP bind's address. Errors name
/// the key and the bind's cause.
pub fn bind_configured(config: &Config) -> Result<Option<Arc<UdpMux>>, ConfigError> {
    let Some(port) = config.media.udp_port else { return Ok(None) };
    let addr = SocketAddr::new(config.bind.ip(), port);
    let mux = UdpMux::bind(addr, true).map_err(|e| ConfigError {
        key: "media.udp_port (KOTODAMA_UDP_PORT)".into(),
        problem: format!("cannot bind UDP and TCP {addr}: {e}"),
        fix: "choose a port free for both UDP and TCP, or stop what holds it".into(),
    })?;
    tracing::info!(%addr, "media on one UDP port for every session");
    Ok(Some(mux))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun_request(username: &str) -> Vec<u8> {
        let mut attrs = Vec::new();
        attrs.extend_from_slice(&ATTR_USERNAME.to_be_bytes());
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while attrs.len() % 4 != 0 {
            attrs.push(0);
        }
        // PRIORITY after USERNAME, to check the walk past a padded attribute.
        attrs.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
        let mut d = vec![0x00, 0x01];
        d.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        d.extend_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
        d.extend_from_slice(&[7u8; 12]);
        d.extend_from_slice(&attrs);
        d
    }

    #[test]
    fn one_port_and_a_port_range_exclude_each_other_and_a_wildcard_bind_is_refused() {
        let mut config = Config::default();
        apply_env(&mut config.media, &|k: &str| (k == "KOTODAMA_UDP_PORT").then(|| "3479".to_owned())).unwrap();
        assert_eq!(config.media.udp_port, Some(3479));
        assert!(validate(&config).is_ok());
        config.media.udp_ports = Some("40000-40999".into());
        let e = validate(&config).unwrap_err();
        assert!(e.key.contains("KOTODAMA_UDP_PORT") && e.key.contains("KOTODAMA_UDP_PORTS"), "{}", e.key);
        config.media.udp_ports = None;
        config.bind = "0.0.0.0:8080".parse().unwrap();
        assert!(validate(&config).unwrap_err().fix.contains("KOTODAMA_BIND"));
        let bad = apply_env(&mut config.media, &|_: &str| Some("70000".to_owned())).unwrap_err();
        assert_eq!(bad.key, "KOTODAMA_UDP_PORT");
    }

    #[test]
    fn the_local_ufrag_is_read_from_a_stun_username() {
        assert_eq!(stun_local_ufrag(&stun_request("srvU:cliX")), Some("srvU"));
        // A success response (0x0101) carrying the request's USERNAME, as libnice sends them.
        let mut response = stun_request("cliX:srvU");
        response[0..2].copy_from_slice(&0x0101u16.to_be_bytes());
        assert_eq!(stun_local_ufrag(&response), None);
        assert_eq!(stun_local_ufrag(&stun_request("abcde:f")), Some("abcde"));
        // DTLS, RTP, truncated or hostile STUN: no ufrag, no panic.
        assert_eq!(stun_local_ufrag(&[22, 254, 253, 0, 0]), None);
        assert_eq!(stun_local_ufrag(&[0x80; 40]), None);
        let mut lying = stun_request("srvU:cliX");
        lying[3] = 0xff;
        assert_eq!(stun_local_ufrag(&lying), None);
        let mut short = stun_request("srvU:cliX");
        short[22..24].copy_from_slice(&0xfff0u16.to_be_bytes());
        assert_eq!(stun_local_ufrag(&short), None);
    }

    #[tokio::test]
    async fn datagrams_go_to_the_peer_by_ufrag_then_by_address_and_a_lease_frees_only_its_routes() {
        let mux = UdpMux::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let (a, b) = (mux.lease(), mux.lease());
        a.set_ufrag("ufragA");
        b.set_ufrag("ufragB");
        let from1: SocketAddr = "127.0.0.1:1001".parse().unwrap();
        let from2: SocketAddr = "127.0.0.1:1002".parse().unwrap();
        mux.route(&stun_request("ufragB:x"), from2);
        mux.route(&stun_request("ufragA:y"), from1);
        mux.route(&[23, 254, 253, 1], from1); // DTLS from A's client
        mux.route(&[0x80, 111, 0, 1], from2); // RTP from B's client
        mux.route(&[0x80, 111, 0, 2], "127.0.0.1:9".parse().unwrap()); // nobody's
        let queued =
            |l: &MuxLease| l.slot.queue.lock().unwrap().ready.iter().map(|(d, f)| (d[0], *f)).collect::<Vec<_>>();
        assert_eq!(queued(&a), vec![(0x00, from1), (23, from1)]);
        assert_eq!(queued(&b), vec![(0x00, from2), (0x80, from2)]);
        assert_eq!(mux.counters().unroutable.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(mux.peers(), 1);
        mux.route(&[0x80, 111, 0, 3], from2);
        assert_eq!(queued(&b).len(), 3, "B still routed after A left");
        mux.route(&[23, 254, 253, 2], from1);
        assert_eq!(mux.counters().unroutable.load(Ordering::Relaxed), 2, "A's address no longer routes");
    }

    #[tokio::test]
    async fn candidates_name_the_shared_port() {
        let mux = UdpMux::bind("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let lease = mux.lease();
        let rt = lease.runtime();
        let placeholder = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = placeholder.local_addr().unwrap().port();
        let _socket = rt.wrap_udp_socket(placeholder).unwrap();
        let sdp = format!(
            "a=candidate:1 1 udp 2130706431 127.0.0.1 {port} typ host\r\n\
             a=candidate:2 1 udp 2130706431 127.0.0.1 {} typ host\r\nm=audio {port} x\r\n",
            port.wrapping_add(1)
        );
        let shared = mux.local_addr().port();
        assert_eq!(
            lease.rewrite_ports(&sdp),
            format!(
                "a=candidate:1 1 udp 2130706431 127.0.0.1 {shared} typ host\r\n\
                 a=candidate:2 1 udp 2130706431 127.0.0.1 {} typ host\r\nm=audio {port} x\r\n",
                port.wrapping_add(1)
            )
        );
        assert!(std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok(), "the placeholder socket is closed");
    }
}
