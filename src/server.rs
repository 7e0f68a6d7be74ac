//! Starting, running and stopping a kotodama node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::providers::RealtimeProvider;
use crate::providers::cascade::{CascadeConfig, CascadeProvider};
use crate::providers::scripted::{ScriptedConfig, ScriptedProvider};
use crate::session::SessionManager;

/// The providers a configuration asks for. The offline engines are loaded here, before the
/// server listens, so a missing model fails the start with the package to install.
pub fn providers_for(config: &Config) -> anyhow::Result<Vec<Arc<dyn RealtimeProvider>>> {
    let mut script = ScriptedConfig::builtin()?;
    script.response_delay = Duration::from_millis(config.scripted.response_delay_ms);
    let mut providers: Vec<Arc<dyn RealtimeProvider>> = vec![Arc::new(ScriptedProvider::new(script))];
    if config.openai_configured() {
        providers.push(Arc::new(crate::providers::openai::OpenAiProvider::new(config.openai.clone())));
    }
    #[cfg(feature = "local")]
    let local = {
        use crate::providers::cascade::local;
        let settings = local::LocalSettings {
            sphinx_model_dir: config.local.sphinx_model_dir.clone(),
            max_decoders: config.local.max_decoders,
        };
        let engines = local::stages(&settings).context("the offline engines (provider `local`; local.*)")?;
        let mut cascade = engines.cascade("local");
        cascade.token_budget = config.local.token_budget;
        providers.push(Arc::new(CascadeProvider::new(cascade.clone_stages())?));
        Some(cascade)
    };
    #[cfg(not(feature = "local"))]
    let local: Option<CascadeConfig> = None;
    if config.cascade.configured() || config.provider_name() == "cascade" {
        providers.push(Arc::new(http_cascade(config, local.as_ref())?));
    }
    Ok(providers)
}

/// The `cascade` provider: the configured servers, then (local_fallback) the offline engines.
fn http_cascade(config: &Config, local: Option<&CascadeConfig>) -> anyhow::Result<CascadeProvider> {
    use crate::providers::cascade::openai::{Endpoint, OpenAiChat, OpenAiSpeech, OpenAiStt, client};
    let c = &config.cascade;
    let http = client();
    let endpoint = |e: &crate::config::EndpointSettings| {
        let mut ep = Endpoint::new(&e.base_url, &e.model);
        ep.api_key = e.api_key.clone();
        ep.voice = e.voice.clone();
        ep.audio_format = e.format.clone().unwrap_or_else(|| "pcm".into());
        ep.pcm_rate_hz = e.sample_rate.unwrap_or(24_000);
        ep.timeout = Duration::from_millis(c.timeout_ms);
        ep
    };
    let language = config.characters().first().map(|ch| ch.language.split('-').next().unwrap_or("en").to_owned());
    let mut cfg = CascadeConfig {
        name: "cascade".into(),
        stt: c.stt.iter().map(|e| Arc::new(OpenAiStt::new(endpoint(e), http.clone(), language.clone())) as _).collect(),
        llm: c.llm.iter().map(|e| Arc::new(OpenAiChat::new(endpoint(e), http.clone())) as _).collect(),
        tts: c.tts.iter().map(|e| Arc::new(OpenAiSpeech::new(endpoint(e), http.clone())) as _).collect(),
        token_budget: config.local.token_budget,
        max_reply_tokens: 300,
    };
    if c.local_fallback
        && let Some(l) = local
    {
        cfg.stt.extend(l.stt.iter().cloned());
        cfg.llm.extend(l.llm.iter().cloned());
        cfg.tts.extend(l.tts.iter().cloned());
    }
    CascadeProvider::new(cfg).context("provider `cascade` (cascade.*)")
}

/// A node serving HTTP in the background.
pub struct RunningServer {
    addr: SocketAddr,
    manager: Arc<SessionManager>,
    stop: Option<oneshot::Sender<()>>,
    join: Option<JoinHandle<std::io::Result<()>>>,
    drain_grace: Duration,
}

impl RunningServer {
    /// The bound HTTP address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The node's sessions.
    pub fn manager(&self) -> &Arc<SessionManager> {
        &self.manager
    }

    /// Drain (readyz 503, new sessions 503, live sessions ended within the grace), then stop HTTP.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.manager.drain(self.drain_grace).await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            join.await.context("HTTP server task")?.context("HTTP server")?;
        }
        Ok(())
    }
}

/// Bind and serve `config` with `providers`, in the background.
pub async fn start(config: Config, providers: Vec<Arc<dyn RealtimeProvider>>) -> anyhow::Result<RunningServer> {
    let config = Arc::new(config);
    let secret = match &config.token_secret {
        Some(s) => Some(signaling::token::TokenSecret::new(s.as_bytes().to_vec()).context("KOTODAMA_TOKEN_SECRET")?),
        None => None,
    };
    let tokens = signaling::token::TokenIssuer::new(signaling::token::TokenConfig {
        secret,
        ttl: config.session.token_ttl(),
        manage_grace: config.session.max_duration(),
    })
    .context("session tokens")?;
    let manager = SessionManager::new(Arc::clone(&config), providers);
    let host = Arc::new(crate::http::Host::new(Arc::clone(&manager)));
    let api = signaling::api::ApiState::new(host, tokens)
        .with_api_keys(signaling::auth::ApiKeys::new(config.api_keys.iter().cloned()));
    let app = crate::http::app(api, Arc::clone(&manager));

    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot bind {} (KOTODAMA_BIND): is another server running there?", config.bind))?;
    let addr = listener.local_addr()?;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let join = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = stop_rx.await;
            })
            .await
    });

    // Housekeeping: expire sessions that never connected, forget long-ended ones.
    let sweeper = Arc::downgrade(&manager);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            match sweeper.upgrade() {
                Some(m) => m.sweep(),
                None => break,
            }
        }
    });

    Ok(RunningServer {
        addr,
        manager,
        stop: Some(stop_tx),
        join: Some(join),
        drain_grace: Duration::from_secs(config.session.drain_grace_secs),
    })
}

/// Run until SIGINT or SIGTERM, then drain and stop.
pub async fn serve_until_signal(config: Config) -> anyhow::Result<()> {
    // Loading the offline engines blocks for about a second: not on a runtime worker.
    let cfg = config.clone();
    let providers = tokio::task::spawn_blocking(move || providers_for(&cfg)).await.context("loading providers")??;
    let provider = config.provider_name().to_owned();
    let storage = if config.database_url.starts_with("sqlite:") {
        "sqlite (in-memory until persistence lands)"
    } else {
        "postgres"
    };
    let auth = if config.api_keys.is_empty() { "open (loopback, no API key)" } else { "API key required" };
    let server = start(config, providers).await?;
    tracing::info!(
        url = %format!("http://{}", server.addr()),
        provider = %provider,
        storage = %storage,
        auth = %auth,
        "kotodama listening; open the URL for the web demo"
    );
    wait_for_signal().await;
    tracing::info!(live_sessions = server.manager().live_count(), "shutting down: draining sessions");
    server.shutdown().await?;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
