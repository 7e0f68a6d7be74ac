//! The WebSocket under a realtime session: `tokio-tungstenite` over rustls with the bundled
//! Mozilla roots (`webpki-roots`), so nothing is read from the system or downloaded at run time.
//! `ws://` is accepted for local servers (tests, self-hosted compatibles).

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};

/// A connected socket.
pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Largest server message accepted: audio deltas are a few tens of KiB; 16 MiB bounds a broken
/// or hostile server without rejecting any real message.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TransportError {
    /// The URL or a header is unusable: configuration, not retryable.
    #[error("bad request: {0}")]
    Request(String),
    /// The server refused the upgrade with this HTTP status (401: bad key).
    #[error("server answered HTTP {0}")]
    Status(u16),
    /// Network, TLS or handshake failure.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The handshake took too long.
    #[error("connect timed out")]
    Timeout,
}

impl TransportError {
    /// Whether trying again may help.
    pub fn retryable(&self) -> bool {
        match self {
            TransportError::Request(_) => false,
            TransportError::Status(s) => *s >= 500 || *s == 429 || *s == 408,
            TransportError::Connect(_) | TransportError::Timeout => true,
        }
    }
}

fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    Arc::clone(CONFIG.get_or_init(|| {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Holds: the ring provider supports the default protocol versions.
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(cfg)
    }))
}

/// Open `url` with these extra headers (authorization included), within `timeout`.
pub async fn connect(url: &str, headers: &[(String, String)], timeout: Duration) -> Result<Socket, TransportError> {
    let mut req = url.into_client_request().map_err(|e| TransportError::Request(e.to_string()))?;
    for (k, v) in headers {
        let name =
            HeaderName::from_bytes(k.as_bytes()).map_err(|_| TransportError::Request(format!("header name `{k}`")))?;
        let value = HeaderValue::from_str(v).map_err(|_| TransportError::Request(format!("value of header `{k}`")))?;
        req.headers_mut().insert(name, value);
    }
    let mut ws_cfg = WebSocketConfig::default();
    ws_cfg.max_message_size = Some(MAX_MESSAGE_BYTES);
    ws_cfg.max_frame_size = Some(MAX_MESSAGE_BYTES);
    let connector = Connector::Rustls(tls_config());
    let fut = tokio_tungstenite::connect_async_tls_with_config(req, Some(ws_cfg), true, Some(connector));
    match tokio::time::timeout(timeout, fut).await {
        Err(_) => Err(TransportError::Timeout),
        Ok(Ok((socket, _resp))) => Ok(socket),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            Err(TransportError::Status(resp.status().as_u16()))
        }
        Ok(Err(e)) => Err(TransportError::Connect(e.to_string())),
    }
}
