//! `[media]`: the audio pipeline (VAD, Opus) and the media UDP ports.

use serde::Deserialize;

use super::{ConfigError, Section, env, err, require_range};

/// Audio pipeline settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaSettings {
    /// webrtc-vad aggressiveness 0..=3.
    pub vad_mode: u8,
    /// Minimum speech before a speech start is reported, ms.
    pub min_speech_ms: u64,
    /// Silence that ends an utterance, ms.
    pub min_silence_ms: u64,
    /// Opus bitrate of the character's voice, bits/s.
    pub opus_bitrate: u32,
    /// Opus encoder complexity 0..=10.
    pub opus_complexity: u8,
    /// UDP port range for media, `"40000-40999"` (`KOTODAMA_UDP_PORTS`); unset: ephemeral ports.
    pub udp_ports: Option<String>,
    /// One UDP port for the media of every session (`KOTODAMA_UDP_PORT`); excludes `udp_ports`.
    pub udp_port: Option<u16>,
    /// What drives the peers' WebRTC stacks (`KOTODAMA_PEER_DRIVER`): `task` (webrtc-rs' driver
    /// task per peer, the default) or `loop` (one loop and one UDP socket for every peer, about a
    /// tenth of the per-packet cost; no ICE-TCP, no `udp_ports`). See BENCHMARKS.md.
    pub peer_driver: PeerDriver,
}

/// `media.peer_driver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerDriver {
    /// webrtc-rs' own driver task per peer connection.
    #[default]
    Task,
    /// One event loop for every peer connection of the node ([`crate::peer_loop`]).
    Loop,
}

impl Default for MediaSettings {
    fn default() -> Self {
        Self {
            vad_mode: 2,
            min_speech_ms: 100,
            min_silence_ms: 500,
            opus_bitrate: 32_000,
            opus_complexity: 1,
            udp_ports: None,
            udp_port: None,
            peer_driver: PeerDriver::Task,
        }
    }
}

impl MediaSettings {
    /// The media UDP port range (first, last), if configured.
    pub fn udp_port_range(&self) -> Result<Option<(u16, u16)>, ConfigError> {
        let Some(spec) = &self.udp_ports else { return Ok(None) };
        let bad =
            || err("media.udp_ports", format!("`{spec}` is not a range"), "use e.g. 40000-40999 (KOTODAMA_UDP_PORTS)");
        let (a, b) = spec.split_once('-').ok_or_else(bad)?;
        let (min, max): (u16, u16) = (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
        if min == 0 || min > max {
            return Err(bad());
        }
        Ok(Some((min, max)))
    }
}

impl Section for MediaSettings {
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = env::value(get, "KOTODAMA_UDP_PORTS") {
            self.udp_ports = Some(v);
        }
        if let Some(v) = env::value(get, "KOTODAMA_PEER_DRIVER") {
            self.peer_driver = match v.to_ascii_lowercase().as_str() {
                "task" => PeerDriver::Task,
                "loop" => PeerDriver::Loop,
                _ => {
                    return Err(err("KOTODAMA_PEER_DRIVER", format!("`{v}` is not a peer driver"), "use task or loop"));
                }
            };
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        require_range("media.vad_mode", self.vad_mode, 0..=3, "use 0 (quality) .. 3 (very aggressive)")?;
        if self.opus_complexity > 10 {
            return Err(err("media.opus_complexity", "out of range", "use 0..=10"));
        }
        if !(6_000..=510_000).contains(&self.opus_bitrate) {
            return Err(err("media.opus_bitrate", "out of range", "use 6000..=510000 bits/s"));
        }
        if self.min_speech_ms < 10 || self.min_silence_ms < 10 {
            return Err(err("media.min_speech_ms", "below one 10 ms VAD frame", "use at least 10"));
        }
        if self.peer_driver == PeerDriver::Loop && self.udp_ports.is_some() {
            return Err(err(
                "media.peer_driver (KOTODAMA_PEER_DRIVER) and media.udp_ports (KOTODAMA_UDP_PORTS)",
                "the peer loop runs every peer on one socket, not a port per session",
                "unset media.udp_ports (set media.udp_port for a fixed port), or use peer_driver = \"task\"",
            ));
        }
        self.udp_port_range().map(drop)
    }
}
