//! ICE server lists handed to clients in the `POST /v1/sessions` response.
//!
//! The shape is the W3C `RTCIceServer` dictionary, so a browser can pass `ice_servers`
//! straight to `new RTCPeerConnection({iceServers})`: `{"urls":[..],"username"?,"credential"?}`,
//! with `username` and `credential` omitted (not `null`) when there are none.

use serde::{Deserialize, Serialize};

/// One STUN or TURN server.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:`, `turn:` or `turns:` URLs.
    pub urls: Vec<String>,
    /// TURN username; omitted when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential; omitted when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

impl IceServer {
    /// A STUN server (no credentials).
    pub fn stun(url: impl Into<String>) -> Self {
        IceServer { urls: vec![url.into()], username: None, credential: None }
    }

    /// A TURN server with credentials.
    pub fn turn(urls: Vec<String>, username: impl Into<String>, credential: impl Into<String>) -> Self {
        IceServer { urls, username: Some(username.into()), credential: Some(credential.into()) }
    }
}

// Credentials are secrets for as long as they live: keep them out of logs.
impl std::fmt::Debug for IceServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IceServer")
            .field("urls", &self.urls)
            .field("username", &self.username)
            .field("credential", &self.credential.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_server_omits_username_and_credential() {
        let json = serde_json::to_string(&IceServer::stun("stun:stun.example.org:3478")).expect("serialises");
        assert_eq!(json, r#"{"urls":["stun:stun.example.org:3478"]}"#);
    }

    #[test]
    fn turn_server_has_all_three_fields() {
        let server =
            IceServer::turn(vec!["turn:turn.example.org:3478?transport=udp".into()], "1700000000:sess_x", "c2VjcmV0");
        let json = serde_json::to_string(&server).expect("serialises");
        assert_eq!(
            json,
            r#"{"urls":["turn:turn.example.org:3478?transport=udp"],"username":"1700000000:sess_x","credential":"c2VjcmV0"}"#
        );
        let back: IceServer = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, server);
        assert!(!format!("{server:?}").contains("c2VjcmV0"), "credential leaked into Debug");
    }
}
