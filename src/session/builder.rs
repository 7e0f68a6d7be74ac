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

use super::budget::BudgetPlan;
use super::conversation::{Conversation, ConversationConfig};
use super::link::{ApiV1, EventCodec};
use super::task::SessionTask;
use super::webrtc_link::WebRtcLink;
use super::{Control, SessionError, SessionShared};
use crate::config::{Character, Config};
use crate::peer::{Peer, PeerSettings};
use crate::providers::resilient::ResilientProvider;
use crate::providers::{ProviderSession, RealtimeProvider, SessionConfig};
use crate::recording::format::{FORMAT_VERSION, Header, MediaSpec};
use crate::recording::{Recorder, Recordings};

/// Capacity of the channel from the peer's callbacks to the session task: ~10 s of RTP plus
/// data-channel messages, so the burst a sender flushes after a stall (its queued packets arrive
/// within a millisecond, faster than the task decodes them) fits; 64 slots dropped a third of a
/// 3 s burst. tokio allocates the slots in blocks of 32 as they fill, so an idle session does not
/// pay for them. When full, the callbacks drop RTP and count it.
const PEER_CHANNEL_CAPACITY: usize = 512;
/// Capacity of the control channel (end, trickled candidates).
const CONTROL_CHANNEL_CAPACITY: usize = 32;

/// A live session ready to run: its task, the SDP answer and the task's control handle. `C` is
/// the dialect of its data channel (api-v1 by default, RTVI for Pipecat's `/api/offer`).
pub(crate) struct Built<C: EventCodec = ApiV1> {
    /// The task (not yet spawned).
    pub task: SessionTask<WebRtcLink<C>>,
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
    /// Moderation policies (the newest version of each; the admin API replaces them).
    policies: Arc<crate::moderation::policies::Policies>,
    /// Long-term memory: read at start, learnt from at the end (sessions with a user only).
    memory: Option<Arc<crate::memory::Memory>>,
    /// Where the users' daily usage is read (budgets per user per day); `None`: daily limits
    /// count only the session itself.
    usage_store: Option<Arc<dyn crate::store::Store>>,
    /// The daily tokens of users with live sessions on this node, shared by their sessions.
    live_users: std::sync::Mutex<HashMap<String, std::sync::Weak<super::budget::UserTokens>>>,
    /// Where recorded sessions go (`None`: the store could not be opened; nothing is recorded).
    recordings: Option<Arc<Recordings>>,
    /// Subtitles in the user's language (`None`: no `[translation]` endpoint).
    translator: Option<Arc<crate::translation::Translator>>,
}

impl SessionBuilder {
    /// The node's peer loop (`media.peer_driver = "loop"`).
    pub fn peer_loop(&self) -> Option<&Arc<crate::peer_loop::PeerLoop>> {
        self.peer_settings.peer_loop.as_ref()
    }

    /// A builder for `config` with these providers (by name).
    pub fn new(
        config: Arc<Config>,
        providers: Vec<Arc<dyn RealtimeProvider>>,
        udp_mux: Option<Arc<crate::udp_mux::UdpMux>>,
        peer_loop: Option<Arc<crate::peer_loop::PeerLoop>>,
    ) -> Self {
        let providers = providers.into_iter().map(|p| (p.name().to_owned(), p)).collect();
        let peer_settings = PeerSettings {
            bind_ip: config.bind.ip(),
            public_ip: config.advertised_ip(),
            peer_timeout: Duration::from_secs(config.session.peer_timeout_secs),
            // Validated at start: a bad range never reaches here.
            ports: config.udp_port_range().ok().flatten().map(|(a, b)| Arc::new(crate::peer::PortRange::new(a, b))),
            mux: udp_mux,
            peer_loop,
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
        let policies = Arc::new(crate::moderation::policies::Policies::new(config.moderation.clone()));
        let recordings = Recordings::open(&config.recording)
            .map_err(|e| tracing::error!(error = %e, "recording store unavailable; sessions are not recorded"))
            .ok();
        let translator = crate::translation::Translator::new(&config.translation);
        Self {
            translator,
            config,
            providers,
            peer_settings,
            vad,
            encoder,
            tools,
            policies,
            memory: None,
            usage_store: None,
            live_users: Default::default(),
            recordings,
        }
    }

    /// With long-term memory.
    pub fn with_memory(mut self, memory: Arc<crate::memory::Memory>) -> Self {
        self.memory = Some(memory);
        self
    }

    /// The memory of `shared`'s user with its character, when it has a user and memory is on.
    fn memory_of(&self, shared: &SessionShared) -> Option<(Arc<crate::memory::Memory>, crate::memory::Owner)> {
        let memory = self.memory.as_ref().filter(|m| m.enabled())?;
        let owner = crate::memory::Owner { user_id: shared.user_id.clone()?, character: shared.character.clone() };
        Some((Arc::clone(memory), owner))
    }

    /// What `shared`'s character remembers of its user (none without a user).
    async fn memories(&self, shared: &SessionShared) -> Vec<crate::memory::MemoryRecord> {
        match self.memory_of(shared) {
            Some((memory, owner)) => memory.for_session(&owner).await,
            None => Vec::new(),
        }
    }

    /// Read users' daily usage from `store` (per-user budgets).
    pub fn with_usage_store(mut self, store: Arc<dyn crate::store::Store>) -> Self {
        self.usage_store = Some(store);
        self
    }

    /// The session's budget: the global limits with the character's overrides, capped by what
    /// the user has left today (ended sessions since 00:00 UTC, from the store). A store that
    /// cannot answer is logged and counts as nothing used (availability over strictness).
    async fn budget_plan(&self, shared: &SessionShared, character: &Character) -> BudgetPlan {
        let limits = self.config.budget.overridden_by(character.budget.as_ref());
        let today = match (&shared.user_id, &self.usage_store) {
            (Some(user), Some(store)) if limits.has_user_limits() => {
                let now = crate::store::to_ms(std::time::SystemTime::now());
                let midnight = crate::store::from_ms(now - now.rem_euclid(86_400_000));
                match store.usage_since(user, midnight).await {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::warn!(session_id = %shared.id, error = %e, "user's usage today unknown; daily budgets count this session only");
                        Some(Default::default())
                    }
                }
            }
            (Some(_), _) => Some(Default::default()),
            (None, _) => None,
        };
        match (&shared.user_id, today) {
            (Some(user), Some(today)) if limits.user_tokens_per_day.is_some_and(|t| t > 0) => {
                BudgetPlan::shared(&limits, today, self.user_tokens(user, today.tokens))
            }
            _ => BudgetPlan::new(&limits, today),
        }
    }

    /// The shared daily token counter of `user`: the one its live sessions use, else a new one
    /// starting at `stored` (its ended sessions' tokens today).
    fn user_tokens(&self, user: &str, stored: u64) -> Arc<super::budget::UserTokens> {
        let mut live = self.live_users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = live.get(user).and_then(std::sync::Weak::upgrade) {
            return t;
        }
        live.retain(|_, t| t.strong_count() > 0);
        let t = Arc::new(super::budget::UserTokens::new(stored));
        live.insert(user.to_owned(), Arc::downgrade(&t));
        t
    }

    /// The moderation policies new sessions are built with.
    pub fn policies(&self) -> &Arc<crate::moderation::policies::Policies> {
        &self.policies
    }

    /// `session` behind the moderation endpoint's checks when the policy has an endpoint and the
    /// provider does not check text itself ([`crate::moderation::guard`]).
    fn guarded(
        session: ProviderSession,
        provider: &ResilientProvider,
        moderator: &Arc<crate::moderation::Moderator>,
    ) -> ProviderSession {
        if provider.moderates_text() {
            return session;
        }
        crate::moderation::guard::guard(session, Arc::clone(moderator))
    }

    /// Whether this node offers provider `name`.
    pub fn has_provider(&self, name: &str) -> bool {
        self.providers.contains_key(name)
    }

    /// Answer `offer` for `shared` speaking as `character`, its events spelled by `codec`: the
    /// peer and the provider session are opened concurrently (the client waits for both).
    pub async fn webrtc<C: EventCodec>(
        &self,
        shared: &Arc<SessionShared>,
        character: &Character,
        offer: &signaling::sdp::ValidOffer,
        codec: C,
    ) -> Result<Built<C>, SessionError> {
        let (task, answer, control) =
            self.answered(shared, character, offer, |peer, rx| WebRtcLink::new(peer, rx, codec)).await?;
        Ok(Built { task, answer, control })
    }

    /// Answer a WHIP publisher's `offer` (send-only audio, no data channel) for `shared`, as
    /// [`Self::webrtc`] does; the link sends the character's voice to the WHEP players attached
    /// through `players` ([`super::whip_link`]). Returns the task, the answer and the control.
    pub async fn whip(
        &self,
        shared: &Arc<SessionShared>,
        character: &Character,
        offer: &signaling::sdp::ValidOffer,
        players: mpsc::Receiver<super::whip_link::PlayerCmd>,
    ) -> Result<(SessionTask<super::whip_link::WhipLink>, String, mpsc::Sender<Control>), SessionError> {
        self.answered(shared, character, offer, |peer, rx| super::whip_link::WhipLink::new(peer, rx, players)).await
    }

    /// The peer for `offer` and the provider session, opened concurrently (the client waits for
    /// both), and the task over the link `link` makes of the peer.
    async fn answered<L: super::link::ClientLink>(
        &self,
        shared: &Arc<SessionShared>,
        character: &Character,
        offer: &signaling::sdp::ValidOffer,
        link: impl FnOnce(Peer, mpsc::Receiver<crate::peer::PeerEvent>) -> L,
    ) -> Result<(SessionTask<L>, String, mpsc::Sender<Control>), SessionError> {
        let provider = self.provider_chain(&shared.provider, character)?;
        let spec = self.media_spec(&provider, Some(offer.opus_payload_type()));
        let media = spec.parts().map_err(|e| SessionError::Internal(e.to_string()))?;
        let (peer_tx, peer_rx) = mpsc::channel(PEER_CHANNEL_CAPACITY);
        let (cfg, conv, moderator) = self.prepare(shared, character, &provider, media).await;
        let (session, answered) =
            tokio::join!(provider.connect(cfg), Peer::answer(&self.peer_settings, offer, peer_tx));
        let (peer, answer) = answered.map_err(peer_error)?;
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
        let link = link(peer, peer_rx);
        let (control, control_rx) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
        let session = Self::guarded(session, &provider, &moderator);
        let task = self.task(shared, character, link, control_rx, session, conv, spec);
        Ok((task, answer, control))
    }

    /// Answer a WHEP player's receive-only `offer`: its peer (the agent's voice goes out on it
    /// once the session's link attaches it) and the answer. `events` receives its callbacks.
    pub async fn player(
        &self,
        offer: &signaling::sdp::ValidOffer,
        events: mpsc::Sender<crate::peer::PeerEvent>,
    ) -> Result<(Peer, String), SessionError> {
        Peer::answer(&self.peer_settings, offer, events).await.map_err(peer_error)
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
        let spec = self.media_spec(&provider, None);
        let media = spec.parts().map_err(|e| SessionError::Internal(e.to_string()))?;
        let (cfg, conv, moderator) = self.prepare(shared, character, &provider, media).await;
        let session = provider.connect(cfg).await;
        let result = if session.is_ok() { "ok" } else { "error" };
        metrics::counter!(crate::telemetry::PROVIDER_CONNECTS, "provider" => provider.name().to_owned(), "result" => result)
            .increment(1);
        let session = session.map_err(|e| SessionError::ProviderUnavailable(e.to_string()))?;
        let (control, control_rx) = mpsc::channel(CONTROL_CHANNEL_CAPACITY);
        let session = Self::guarded(session, &provider, &moderator);
        Ok((self.task(shared, character, link, control_rx, session, conv, spec), control))
    }

    /// The conversation core and the provider's configuration of a new session: memories, budget
    /// and moderation policy are looked up once, and the provider reads the core's history (its
    /// one owner). The policy is returned for the provider's moderation guard.
    async fn prepare(
        &self,
        shared: &SessionShared,
        character: &Character,
        provider: &ResilientProvider,
        media: crate::session::conversation::MediaParts,
    ) -> (SessionConfig, Conversation, Arc<crate::moderation::Moderator>) {
        let memories = self.memories(shared).await;
        let budget = self.budget_plan(shared, character).await;
        let moderator = self.policies.for_character(character);
        let cfg = self.provider_config(shared, character, &memories, &budget, &moderator);
        let conv_cfg = self.conversation_config(shared, character, provider, budget, Arc::clone(&moderator));
        let conv = Conversation::new(conv_cfg, media);
        (SessionConfig { session_history: conv.history_view(), ..cfg }, conv, moderator)
    }

    fn conversation_config(
        &self,
        shared: &SessionShared,
        character: &Character,
        provider: &ResilientProvider,
        budget: BudgetPlan,
        moderator: Arc<crate::moderation::Moderator>,
    ) -> ConversationConfig {
        ConversationConfig {
            session_id: shared.id.clone(),
            character: shared.character.clone(),
            provider: provider.name().to_owned(),
            caps: provider.capabilities(),
            greeting: character.greeting.clone(),
            idle_timeout: (self.config.session.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(self.config.session.idle_timeout_secs)),
            moderator: Some(moderator),
            budget,
            reply_timeout: Some(self.config.resilience.policy().reply_timeout),
            start_timeout: Some(self.config.resilience.start_timeout()),
        }
    }

    fn task<L: super::link::ClientLink>(
        &self,
        shared: &Arc<SessionShared>,
        character: &Character,
        link: L,
        control_rx: mpsc::Receiver<Control>,
        provider: ProviderSession,
        mut conv: Conversation,
        spec: MediaSpec,
    ) -> SessionTask<L> {
        let recorder = self.recorder(shared, conv.config(), spec);
        conv.set_recording(recorder.is_some());
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
            memory: self.memory_of(shared).map(|(memory, owner)| (memory, owner, character.name.clone())),
            recorder,
            translation: crate::translation::SessionTranslation::new(
                self.translator.clone(),
                &shared.id,
                &character.language,
            ),
            gate: Default::default(),
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
    /// playout (encoding at the provider's output rate, see [`encoder_rate_for`]), barge-in and
    /// timed speech: built from one [`MediaSpec`], which a recording keeps so a replay builds the
    /// same parts.
    fn media_spec(&self, provider: &dyn RealtimeProvider, opus_payload_type: Option<u8>) -> MediaSpec {
        let m = &self.config.media;
        MediaSpec {
            input_rate_hz: provider.input_format().rate_hz,
            encoder_input_rate_hz: encoder_rate_for(provider.output_format().rate_hz),
            opus_payload_type,
            vad_mode: m.vad_mode.min(3),
            vad_min_speech_ms: m.min_speech_ms,
            vad_min_silence_ms: m.min_silence_ms,
            vad_energy_floor_dbfs: self.vad.energy_floor_dbfs,
            opus_bitrate_bps: self.encoder.bitrate_bps,
            opus_complexity: self.encoder.complexity,
            // tokio timers wake up to ~1 ms late; a 2 ms tolerance keeps the 20 ms grid at real time
            // instead of letting each late wake-up push every later frame back (measured slip ~6%).
            jitter_tolerance_ms: 2,
            estimate_visemes: true,
            // Each reply ends with an Opus DTX frame: browsers play the pause as comfort noise,
            // not as concealment of a lost stream (media::playout, "Silence (DTX)").
            dtx: true,
            // No resampler between the Opus decoder and a 24 or 16 kHz provider (media::uplink,
            // "Decode rate").
            decode_at_input_rate: true,
        }
    }

    /// The recorder of `shared`'s session when it is recorded (and the store is usable): its
    /// header describes the core about to be built.
    fn recorder(&self, shared: &SessionShared, conv: &ConversationConfig, media: MediaSpec) -> Option<Recorder> {
        let store = self.recordings.as_ref().filter(|_| shared.record)?;
        let started_at =
            time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        let header = Header {
            format: FORMAT_VERSION,
            session_id: shared.id.clone(),
            character: shared.character.clone(),
            provider: conv.provider.clone(),
            started_at,
            caps: conv.caps.into(),
            greeting: conv.greeting.clone(),
            idle_timeout_ms: conv.idle_timeout.map(|d| d.as_millis() as u64),
            media,
            moderation: conv.moderator.as_ref().map(|m| m.settings().clone()),
        };
        match store.start(header) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::error!(session_id = %shared.id, error = %e, "recording could not start; session not recorded");
                None
            }
        }
    }

    /// The recording store, when recording is possible on this node.
    pub fn recordings(&self) -> Option<&Arc<Recordings>> {
        self.recordings.as_ref()
    }

    /// The provider's session settings: the character, with what it remembers of the user in
    /// the memory slot of its instructions and the `recall` tool when the session has a user; the
    /// session's own tool registry, whose calls count against its budget.
    fn provider_config(
        &self,
        shared: &SessionShared,
        character: &Character,
        memories: &[crate::memory::MemoryRecord],
        budget: &BudgetPlan,
        moderator: &Arc<crate::moderation::Moderator>,
    ) -> SessionConfig {
        let mut tools = match &character.tools {
            Some(names) => self.tools.only(names),
            None => (*self.tools).clone(),
        };
        if let Some((memory, owner)) = self.memory_of(shared).filter(|(m, _)| m.offers_recall()) {
            tools.register(memory.recall_tool(owner));
        }
        SessionConfig {
            session_id: shared.id.clone(),
            character_id: character.id.clone(),
            character_name: character.name.clone(),
            instructions: character.persona.clone() + &crate::memory::instructions_block(memories),
            voice: character.voice.clone(),
            voices: character.voices.clone().into_iter().collect(),
            language: character.language.clone(),
            history: shared.continues.clone(),
            // Set to the conversation core's view once it is built (see `answered`).
            session_history: Default::default(),
            tools: Arc::new(tools.with_budget(Arc::clone(&budget.tool_calls))),
            // Validated at start (config::validate): an invalid name never reaches here.
            viseme_overrides: crate::providers::cascade::viseme_overrides(&character.visemes).unwrap_or_default(),
            moderator: Some(Arc::clone(moderator)),
        }
    }
}

/// A peer that could not answer, as the session error the API maps to its status.
fn peer_error(e: crate::peer::PeerError) -> SessionError {
    match e {
        crate::peer::PeerError::Offer(m) => SessionError::BadOffer(m),
        crate::peer::PeerError::Answer(e) => SessionError::OfferRefused(e),
        crate::peer::PeerError::NoMediaPort => SessionError::NoMediaPort,
        other => SessionError::Internal(other.to_string()),
    }
}

/// The Opus encoder's input rate for a provider that speaks at `output_rate_hz`: that rate when
/// libopus encodes it (8, 12, 16, 24 or 48 kHz), so the playout queues the provider's audio as
/// is; else 48 kHz, and the playout resamples. The RTP clock is 48 kHz either way (RFC 7587
/// §4.1).
pub(crate) fn encoder_rate_for(output_rate_hz: u32) -> u32 {
    if media::codec::is_opus_pcm_rate(output_rate_hz) { output_rate_hz } else { media::OPUS_RATE }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::AudioFormat;
    use crate::providers::scripted::{ScriptedConfig, ScriptedProvider};

    #[test]
    fn the_encoder_runs_at_the_provider_output_rate_when_libopus_takes_it() {
        assert_eq!(encoder_rate_for(24_000), 24_000);
        assert_eq!(encoder_rate_for(16_000), 16_000);
        assert_eq!(encoder_rate_for(48_000), 48_000);
        // eSpeak's 22.05 kHz, CD rate, 32 kHz, nonsense: 48 kHz and the playout resamples.
        for rate in [22_050, 44_100, 32_000, 96_000, 0] {
            assert_eq!(encoder_rate_for(rate), 48_000, "{rate} Hz");
        }
    }

    #[test]
    fn the_built_in_scripted_provider_is_encoded_at_24_khz() {
        let scripted = ScriptedProvider::new(ScriptedConfig::builtin().expect("built-in script"));
        assert_eq!(scripted.output_format(), AudioFormat { rate_hz: 24_000 });
        assert_eq!(encoder_rate_for(scripted.output_format().rate_hz), 24_000);
    }
}
