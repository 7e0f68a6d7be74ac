//! Pipeline assembly: from a session's character and provider to a ready [`SessionTask`].
//!
//! The [`SessionBuilder`] holds what every session of a node is built from (the providers, the
//! media and peer settings, the tools) and makes, for one answered offer: the provider chain with
//! resilience, the media parts (uplink, playout, barge-in, timed speech), the conversation core,
//! the client link and the task. The registry ([`super::SessionManager`]) only decides *when*.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::conversation::{Conversation, ConversationConfig, MediaParts};
use super::link::ApiV1;
use super::speech::AgentSpeech;
use super::task::SessionTask;
use super::webrtc_link::WebRtcLink;
use super::{Control, SessionError, SessionShared};
use crate::config::{Character, Config};
use crate::peer::{Peer, PeerSettings};
use crate::providers::resilient::ResilientProvider;
use crate::providers::{ProviderSession, RealtimeProvider, SessionConfig};

/// Capacity of the channel from the peer's callbacks to the session task: ~10 s of RTP plus
/// data-channel messages, so the burst a sender flushes after a stall (its queued packets arrive
/// within a millisecond, faster than the task decodes them) fits; 64 slots dropped a third of a
/// 3 s burst. tokio allocates the slots in blocks of 32 as they fill, so an idle session does not
/// pay for them. When full, the callbacks drop RTP and count it.
const PEER_CHANNEL_CAPACITY: usize = 512;
/// Capacity of the control channel (end, trickled candidates).
const CONTROL_CHANNEL_CAPACITY: usize = 32;

/// A live session ready to run: its task, the SDP answer and the task's control handle.
pub(crate) struct Built {
    /// The task (not yet spawned).
    pub task: SessionTask<WebRtcLink<ApiV1>>,
    /// The SDP answer for the client.
    pub answer: String,
    /// Control of the task (end, trickle, inject).
    pub control: mpsc::Sender<Control>,
}

/// Builds the live parts of this node's sessions.
pub(crate) struct SessionBuilder {
    config: Arc<Config>,
    providers: HashMap<String, Arc<dyn RealtimeProvider>>,
    peer_settings: PeerSettings,
    vad: media::VadConfig,
    encoder: media::EncoderConfig,
    /// The tools every character's model may call (built-ins for now).
    tools: Arc<crate::providers::tools::ToolRegistry>,
    /// Moderation before speech (validated at start, so it compiles).
    moderator: Option<Arc<crate::moderation::Moderator>>,
}

impl SessionBuilder {
    /// A builder for `config` with these providers (by name).
    pub fn new(
        config: Arc<Config>,
        providers: Vec<Arc<dyn RealtimeProvider>>,
        udp_mux: Option<Arc<crate::udp_mux::UdpMux>>,
    ) -> Self {
        let providers = providers.into_iter().map(|p| (p.name().to_owned(), p)).collect();
        let peer_settings = PeerSettings {
            bind_ip: config.bind.ip(),
            public_ip: config.advertised_ip(),
            peer_timeout: Duration::from_secs(config.session.peer_timeout_secs),
            // Validated at start: a bad range never reaches here.
            ports: config.udp_port_range().ok().flatten().map(|(a, b)| Arc::new(crate::peer::PortRange::new(a, b))),
            mux: udp_mux,
        };
        let m = &config.media;
        let vad = media::VadConfig {
            mode: match m.vad_mode {
                0 => media::VadMode::Quality,
                1 => media::VadMode::LowBitrate,
                2 => media::VadMode::Aggressive,
                _ => media::VadMode::VeryAggressive,
            },
            min_speech: Duration::from_millis(m.min_speech_ms),
            min_silence: Duration::from_millis(m.min_silence_ms),
            ..Default::default()
        };
        let encoder =
            media::EncoderConfig { bitrate_bps: m.opus_bitrate, complexity: m.opus_complexity, ..Default::default() };
        let tools = Arc::new(crate::providers::tools::ToolRegistry::builtin());
        let moderator = crate::moderation::Moderator::new(&config.moderation).ok().map(Arc::new);
        Self { config, providers, peer_settings, vad, encoder, tools, moderator }
    }

    /// Whether this node offers provider `name`.
    pub fn has_provider(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }

    /// Answer `offer` for `shared` speaking as `character`: the peer and the provider session
    /// are opened concurrently (the client waits for both).
    pub async fn webrtc(
        &self,
        shared: &Arc<SessionShared>,
        character: &Character,
        offer: &signaling::sdp::ValidOffer,
    ) -> Result<Built, SessionError> {
        let provider = self.provider_chain(&shared.provider, character)?;
        let media = self.media_parts(provider.input_format().rate_hz, Some(offer.opus_payload_type()))?;
        let (peer_tx, peer_rx) = mpsc::channel(PEER_CHANNEL_CAPACITY);
        let cfg = self.provider_config(shared, character);
        let (session, answered) =
            tokio::join!(provider.connect(cfg), Peer::answer(&self.peer_settings, offer, peer_tx));
        let (peer, answer) = answered.map_err(|e| match e {
            crate::peer::PeerError::Offer(m) => SessionError::BadOffer(m),
            crate::peer::PeerError::Answer(e) => SessionError::OfferRefused(e),
            crate::peer::PeerError::NoMediaPort => SessionError::NoMediaPort,
            other => SessionError::Internal(other.to_string()),
        })?;
        let result = if session.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::telemetry::PROVIDER_CONNECTS, "provider" => provider.name().to_owned(), "result" => result)
            .increment(1);
        let session = match session {
            Ok(s) => s,
            Err(e) => {
                peer.close().await;
                return Err(SessionError::ProviderUnavailable(e.to_string()));
            }
        };
        let link = WebRtcLink::new(peer, peer_rx, ApiV1);
        let (control, control_rx) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
        let conv = self.conversation_config(shared, character, &provider);
        let task = self.task(shared, link, control_rx, session, Conversation::new(conv, media));
        Ok(Built { task, answer, control })
    }

    /// A session task for a client that is already connected through `link` (a WebSocket):
    /// the provider session is opened first; its failure is the caller's error.
    pub async fn with_link<L: super::link::ClientLink>(
        &self,
        shared: &Arc<SessionShared>,
        character: &Character,
        link: L,
    ) -> Result<(SessionTask<L>, mpsc::Sender<Control>), SessionError> {
        let provider = self.provider_chain(&shared.provider, character)?;
        // A WebSocket carries only Opus frames (its own framing): no payload type to filter.
        let media = self.media_parts(provider.input_format().rate_hz, None)?;
        let session = provider.connect(self.provider_config(shared, character)).await;
        let result = if session.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::telemetry::PROVIDER_CONNECTS, "provider" => provider.name().to_owned(), "result" => result)
            .increment(1);
        let session = session.map_err(|e| SessionError::ProviderUnavailable(e.to_string()))?;
        let (control, control_rx) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
        let conv = self.conversation_config(shared, character, &provider);
        Ok((self.task(shared, link, control_rx, session, Conversation::new(conv, media)), control))
    }

    fn conversation_config(
        &self,
        shared: &SessionShared,
        character: &Character,
        provider: &ResilientProvider,
    ) -> ConversationConfig {
        ConversationConfig {
            session_id: shared.id.clone(),
            character: shared.character.clone(),
            provider: provider.name().to_owned(),
            caps: provider.capabilities(),
            greeting: character.greeting.clone(),
            idle_timeout: (self.config.session.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(self.config.session.idle_timeout_secs)),
            moderator: self.moderator.clone(),
            reply_timeout: Some(self.config.resilience.policy().reply_timeout),
            start_timeout: Some(self.config.resilience.start_timeout()),
        }
    }

    fn task<L: super::link::ClientLink>(
        &self,
        shared: &Arc<SessionShared>,
        link: L,
        control_rx: mpsc::Receiver<Control>,
        provider: ProviderSession,
        conv: Conversation,
    ) -> SessionTask<L> {
        SessionTask {
            shared: Arc::clone(shared),
            start: Instant::now(),
            deadline: shared.created_instant + self.config.session.max_duration(),
            link,
            control_rx,
            provider,
            conv,
            pacing_hist: metrics::histogram!(crate::telemetry::PACING_LATENESS),
            uplink_hist: metrics::histogram!(crate::telemetry::UPLINK_LATENCY),
        }
    }

    /// The session's provider first, then the character's other providers (failover), each once,
    /// behind the resilience layer; providers this node does not offer (e.g. openai without a
    /// key) are skipped.
    fn provider_chain(&self, first: &str, character: &Character) -> Result<ResilientProvider, SessionError> {
        let mut chain: Vec<Arc<dyn RealtimeProvider>> = Vec::new();
        for name in std::iter::once(first).chain(character.providers.iter().map(String::as_str)) {
            if let Some(p) = self.providers.get(name)
                && !chain.iter().any(|c| c.name() == name)
            {
                chain.push(Arc::clone(p));
            }
        }
        if chain.is_empty() {
            return Err(SessionError::UnknownProvider(first.to_owned()));
        }
        ResilientProvider::new(chain, self.config.resilience.policy())
            .map_err(|e| SessionError::Internal(e.to_string()))
    }

    /// Uplink (to the provider's input rate, decoding only the offer's Opus payload type),
    /// playout, barge-in and timed speech.
    fn media_parts(&self, input_rate_hz: u32, opus_payload_type: Option<u8>) -> Result<MediaParts, SessionError> {
        let internal = |e: media::MediaError| SessionError::Internal(e.to_string());
        let uplink = media::Uplink::new(media::UplinkConfig {
            output_rate_hz: input_rate_hz,
            vad: self.vad,
            opus_payload_type,
            ..Default::default()
        })
        .map_err(internal)?;
        let playout = media::Playout::new(media::PlayoutConfig {
            encoder: self.encoder,
            // tokio timers wake up to ~1 ms late; a 2 ms tolerance keeps the 20 ms grid at real time
            // instead of letting each late wake-up push every later frame back (measured slip ~6%).
            jitter_tolerance: Duration::from_millis(2),
            ..Default::default()
        })
        .map_err(internal)?;
        Ok(MediaParts { uplink, playout, barge_in: media::BargeIn::default(), speech: AgentSpeech::new(true) })
    }

    fn provider_config(&self, shared: &SessionShared, character: &Character) -> SessionConfig {
        SessionConfig {
            session_id: shared.id.clone(),
            character_id: character.id.clone(),
            character_name: character.name.clone(),
            instructions: character.persona.clone(),
            voice: character.voice.clone(),
            voices: character.voices.clone().into_iter().collect(),
            language: character.language.clone(),
            history: Vec::new(),
            tools: match &character.tools {
                Some(names) => Arc::new(self.tools.only(names)),
                None => Arc::clone(&self.tools),
            },
            // Validated at start (config::validate): an invalid name never reaches here.
            viseme_overrides: crate::providers::cascade::viseme_overrides(&character.visemes).unwrap_or_default(),
            moderator: self.moderator.clone(),
        }
    }
}
