//! The Tokio runtime for a peer with a UDP socket of its own, without UDP GRO/GSO.
//!
//! Why: webrtc-rs' Tokio runtime enables UDP GRO on every socket (through `quinn-udp`), and its
//! peer driver then sizes two receive buffers per socket for 64 coalesced datagrams: 2 x 96 KB
//! per session, against 2 x 2 KB without GRO (`webrtc` 0.21, `gro_recv_buf_len`): 188 KB of
//! every session's heap, and 0.12-0.15 MB of its RSS in the load generator's runs (glibc's
//! `calloc` clears recycled memory, so those pages become resident; BENCHMARKS.md, issue 14).
//! Batching buys a voice session nothing: a peer exchanges ~50 datagrams/s with one client, never
//! the 16 same-destination datagrams in one flush the driver needs before it sends with GSO, and
//! 20 ms apart there is nothing for GRO to coalesce; ICE, DTLS, SCTP and SRTP datagrams all fit
//! the 2 KB buffer (under the 1,500-byte MTU). Everything else is the Tokio runtime, unchanged.
//!
//! The shared socket of `media.udp_port` has its own runtime ([`crate::udp_mux`]), which never
//! reported GRO either.

use std::future::Future;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use webrtc::runtime::{AsyncTcpListener, AsyncTcpStream, AsyncUdpSocket, RecvMeta, Runtime, TokioRuntime, Transmit};

/// Inside an `impl Runtime for ...`: the methods a peer runtime takes unchanged from
/// [`TokioRuntime`] (`spawn`, `now`, `sleep`, `interval`, `block_on`, `resolve_host`). This
/// runtime and [`crate::udp_mux`]'s differ from Tokio's only in their sockets.
macro_rules! tokio_executor_and_dns {
    () => {
        fn spawn(
            &self,
            future: ::std::pin::Pin<Box<dyn ::std::future::Future<Output = ()> + Send>>,
        ) -> Box<dyn ::webrtc::runtime::JoinHandle> {
            ::webrtc::runtime::TokioRuntime.spawn(future)
        }

        fn resolve_host<'a>(
            &'a self,
            host: &'a str,
        ) -> ::std::pin::Pin<
            Box<dyn ::std::future::Future<Output = ::std::io::Result<Vec<::std::net::SocketAddr>>> + Send + 'a>,
        > {
            ::webrtc::runtime::TokioRuntime.resolve_host(host)
        }

        fn now(&self) -> ::std::time::Instant {
            ::webrtc::runtime::TokioRuntime.now()
        }

        fn sleep(
            &self,
            duration: ::std::time::Duration,
        ) -> ::std::pin::Pin<Box<dyn ::std::future::Future<Output = ()> + Send + 'static>> {
            ::webrtc::runtime::TokioRuntime.sleep(duration)
        }

        fn interval(&self, period: ::std::time::Duration) -> Box<dyn ::webrtc::runtime::AsyncInterval> {
            ::webrtc::runtime::TokioRuntime.interval(period)
        }

        fn block_on(&self, future: ::std::pin::Pin<Box<dyn ::std::future::Future<Output = ()> + '_>>) {
            ::webrtc::runtime::TokioRuntime.block_on(future)
        }
    };
}
pub(crate) use tokio_executor_and_dns;

/// The Tokio runtime whose UDP sockets are plain (one datagram per receive, no GRO/GSO).
#[derive(Debug, Default)]
pub struct PlainUdpRuntime;

impl Runtime for PlainUdpRuntime {
    tokio_executor_and_dns!();

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> io::Result<Arc<dyn AsyncUdpSocket>> {
        socket.set_nonblocking(true)?;
        Ok(Arc::new(PlainUdpSocket(tokio::net::UdpSocket::from_std(socket)?)))
    }

    fn wrap_tcp_listener(&self, listener: std::net::TcpListener) -> io::Result<Arc<dyn AsyncTcpListener>> {
        TokioRuntime.wrap_tcp_listener(listener)
    }

    fn connect_tcp<'a>(
        &'a self,
        remote_addr: SocketAddr,
    ) -> Pin<Box<dyn Future<Output = io::Result<Arc<dyn AsyncTcpStream>>> + Send + 'a>> {
        TokioRuntime.connect_tcp(remote_addr)
    }

    fn name(&self) -> &'static str {
        "tokio+plain-udp"
    }
}

/// A Tokio UDP socket that reports one datagram per message (`max_gro_segments` and
/// `max_gso_segments` keep their default of 1, so the driver neither coalesces sends nor sizes
/// receive buffers for coalesced reads).
#[derive(Debug)]
struct PlainUdpSocket(tokio::net::UdpSocket);

impl AsyncUdpSocket for PlainUdpSocket {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn poll_send(&self, cx: &mut Context<'_>, transmit: &Transmit<'_>) -> Poll<io::Result<usize>> {
        // `segment_size` is only set for sockets that report GSO; this one does not.
        self.0.poll_send_to(cx, transmit.contents, transmit.destination)
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else { return Poll::Ready(Ok(0)) };
        let mut read = tokio::io::ReadBuf::new(buf);
        match self.0.poll_recv_from(cx, &mut read) {
            Poll::Ready(Ok(from)) => {
                let n = read.filled().len();
                m.addr = from;
                m.len = n;
                // At least 1: the driver de-segments by `stride` (a 0 would divide by zero).
                m.stride = n.max(1);
                m.ecn = None;
                m.dst_ip = None;
                Poll::Ready(Ok(1))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A datagram goes out and comes back whole, with its sender, one per receive; the socket
    /// reports no batching, so the driver sizes its buffers for single datagrams.
    #[tokio::test]
    async fn sends_and_receives_single_datagrams_without_batching() {
        let rt = PlainUdpRuntime;
        let a = rt.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        let b = rt.wrap_udp_socket(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
        assert_eq!((a.max_gro_segments(), a.max_gso_segments()), (1, 1));
        let to = b.local_addr().unwrap();
        for payload in [&b"first"[..], &[0x80; 1200][..]] {
            a.send_to(payload, to).await.unwrap();
        }
        let mut buf = [0u8; 2000];
        let (n, from) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!((&buf[..n], from), (&b"first"[..], a.local_addr().unwrap()));
        let (n, _) = b.recv_from(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &[0x80; 1200][..]);
    }
}
