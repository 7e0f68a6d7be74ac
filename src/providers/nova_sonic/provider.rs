//! The provider and its AWS SDK set-up (feature `nova-sonic`).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use aws_config::{BehaviorVersion, SdkConfig};
use aws_credential_types::provider::ProvideCredentials;
use aws_sdk_bedrockruntime::types::error::InvokeModelWithBidirectionalStreamInputError;
use aws_sdk_bedrockruntime::types::{BidirectionalInputPayloadPart, InvokeModelWithBidirectionalStreamInput};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::sync::{OnceCell, mpsc};

use super::settings::NovaSonicSettings;
use super::{protocol, session};
use crate::providers::{
    AudioFormat, COMMAND_CHANNEL_CAPACITY, Capabilities, EVENT_CHANNEL_CAPACITY, ProviderError, ProviderSession,
    RealtimeProvider, SessionConfig,
};

/// Input events queued towards the stream (audio every 20 ms; the opening events first).
const INPUT_CHANNEL_CAPACITY: usize = 256;

/// One input event for the SDK.
pub(crate) type Input = InvokeModelWithBidirectionalStreamInput;

/// The input side of the stream: events from the session task, in order.
pub(crate) struct InputStream(mpsc::Receiver<Input>);

impl futures::Stream for InputStream {
    type Item = Result<Input, InvokeModelWithBidirectionalStreamInputError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|o| o.map(Ok))
    }
}

/// Wrap one JSON event as a `chunk`.
pub(crate) fn chunk(json: String) -> Input {
    let part =
        BidirectionalInputPayloadPart::builder().bytes(aws_sdk_bedrockruntime::primitives::Blob::new(json)).build();
    InvokeModelWithBidirectionalStreamInput::Chunk(part)
}

/// The Nova Sonic provider.
#[derive(Debug, Clone)]
pub struct NovaSonicProvider {
    settings: Arc<NovaSonicSettings>,
    sdk: Arc<OnceCell<SdkConfig>>,
    /// When the credentials used last expire (None: static credentials).
    expiry: Arc<Mutex<Option<SystemTime>>>,
}

impl NovaSonicProvider {
    /// A provider that loads the AWS configuration from the environment at its first session.
    pub fn new(settings: NovaSonicSettings) -> Self {
        Self { settings: Arc::new(settings), sdk: Arc::new(OnceCell::new()), expiry: Arc::new(Mutex::new(None)) }
    }

    /// A provider with this AWS configuration (an embedding program's, or a test's HTTP client
    /// and credentials).
    pub fn with_sdk_config(settings: NovaSonicSettings, sdk: SdkConfig) -> Self {
        Self {
            settings: Arc::new(settings),
            sdk: Arc::new(OnceCell::new_with(Some(sdk))),
            expiry: Arc::new(Mutex::new(None)),
        }
    }

    fn time_to_expiry(&self) -> Option<Duration> {
        let at = (*self.expiry.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(at.duration_since(SystemTime::now()).unwrap_or_default())
    }
}

/// The SDK configuration from the environment, with rustls (ring) over hyper.
async fn load_sdk_config(settings: &NovaSonicSettings) -> SdkConfig {
    use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
    let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(r) = &settings.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    let sdk = loader.load().await;
    if sdk.region().is_none() {
        return sdk.into_builder().region(aws_config::Region::from_static("us-east-1")).build();
    }
    sdk
}

impl RealtimeProvider for NovaSonicProvider {
    fn name(&self) -> &str {
        "nova_sonic"
    }

    /// The model's own turn detection, no truncation, user transcripts, tools, no images, and
    /// a session limit from the stream limit and the credentials' expiry (as of now).
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            server_vad: true,
            truncation: false,
            user_transcripts: true,
            tools: true,
            images: false,
            max_session: Some(self.settings.lifetime(self.time_to_expiry())),
        }
    }

    fn input_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: protocol::INPUT_RATE_HZ }
    }

    /// The session's `audioOutputConfiguration` asks for 24 kHz LPCM.
    fn output_format(&self) -> AudioFormat {
        AudioFormat { rate_hz: protocol::OUTPUT_RATE_HZ }
    }

    fn connect(&self, cfg: SessionConfig) -> BoxFuture<'static, Result<ProviderSession, ProviderError>> {
        let this = self.clone();
        async move {
            let settings = Arc::clone(&this.settings);
            let sdk = this.sdk.get_or_init(|| load_sdk_config(&settings)).await.clone();
            // Each stream is signed with credentials resolved for it, whose expiry sets its lifetime:
            // a renewed stream always starts with fresh ones.
            let credentials = this.resolve_credentials(&sdk).await?;
            let conf = aws_sdk_bedrockruntime::config::Builder::from(&sdk).credentials_provider(credentials).build();
            let client = aws_sdk_bedrockruntime::Client::from_conf(conf);
            let (input_tx, input_rx) = mpsc::channel(INPUT_CHANNEL_CAPACITY);
            let names = session::Names::new();
            for ev in session::opening_events(&settings, &cfg, &names) {
                // The channel holds the opening events: it is empty and larger than they are.
                let _ = input_tx.try_send(chunk(ev));
            }
            let send = client
                .invoke_model_with_bidirectional_stream()
                .model_id(&settings.model)
                .body(InputStream(input_rx).into())
                .send();
            let timeout = Duration::from_millis(settings.connect_timeout_ms);
            let output = tokio::time::timeout(timeout, send)
                .await
                .map_err(|_| ProviderError::Unavailable("Nova Sonic did not answer the stream in time".into()))?
                .map_err(session::open_error)?;
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
            let (ev_tx, ev_rx) = mpsc::channel(EVENT_CHANNEL_CAPACITY);
            let conn = session::Connection::new(settings, cfg, names, input_tx, ev_tx);
            tokio::spawn(conn.run(output.body, cmd_rx));
            Ok(ProviderSession { commands: cmd_tx, events: ev_rx })
        }
        .boxed()
    }
}

impl NovaSonicProvider {
    /// Resolve credentials from the chain (not a cache) and remember when they expire.
    async fn resolve_credentials(&self, sdk: &SdkConfig) -> Result<aws_credential_types::Credentials, ProviderError> {
        let provider = sdk.credentials_provider().ok_or_else(|| {
            ProviderError::Config(
                "no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or a web identity"
                    .into(),
            )
        })?;
        let creds = provider.provide_credentials().await.map_err(|e| {
            ProviderError::Config(format!(
                "AWS credentials could not be loaded ({e}): check the AWS_* variables or the profile"
            ))
        })?;
        *self.expiry.lock().unwrap_or_else(|p| p.into_inner()) = creds.expiry();
        Ok(creds)
    }
}
