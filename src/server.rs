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
use crate::session::{Backends, SessionManager};
use crate::store::redis::Redis;
use crate::store::sql::SqlStore;
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoredCharacter};
use signaling::token::{KeyMaterial, TokenConfig, TokenIssuer, TokenKey, TokenKeys, TokenSecret};
use signaling::{ApiKeys, KeyRole};

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
    store: SqlStore,
    writer: StoreWriter,
    advertise_url: String,
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

    /// The durable store.
    pub fn store(&self) -> &SqlStore {
        &self.store
    }

    /// The URL other nodes send this node's clients to.
    pub fn advertise_url(&self) -> &str {
        &self.advertise_url
    }

    /// Drain (readyz 503, new sessions 503, live sessions ended within the grace), flush every
    /// pending store write, then stop HTTP and close the database.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.manager.drain(self.drain_grace).await;
        self.manager.unregister_all().await;
        self.writer.flush().await;
        let s = self.writer.stats();
        tracing::info!(
            written = s.written.load(std::sync::atomic::Ordering::Relaxed),
            dropped = s.dropped.load(std::sync::atomic::Ordering::Relaxed),
            failed = s.failed.load(std::sync::atomic::Ordering::Relaxed),
            "store writes flushed"
        );
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(join) = self.join.take() {
            join.await.context("HTTP server task")?.context("HTTP server")?;
        }
        self.store.close().await;
        Ok(())
    }
}

/// The session-token configuration: HS256 with the secret, or the configured key set.
fn token_config(config: &Config) -> anyhow::Result<TokenConfig> {
    let secret = match &config.token_secret {
        Some(s) => Some(TokenSecret::new(s.as_bytes().to_vec()).context("KOTODAMA_TOKEN_SECRET")?),
        None => None,
    };
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("{key}: cannot read {}", path.display()))
    };
    let t = &config.tokens;
    let alg = t.algorithm.as_deref().unwrap_or("HS256");
    let signing = match alg {
        "RS256" | "EdDSA" => {
            // Validated at load: both files and the kid are set.
            let private_pem = Some(read(
                "KOTODAMA_TOKEN_PRIVATE_KEY_FILE",
                t.private_key_file.as_deref().context("KOTODAMA_TOKEN_PRIVATE_KEY_FILE is required")?,
            )?);
            let public_pem = read(
                "KOTODAMA_TOKEN_PUBLIC_KEY_FILE",
                t.public_key_file.as_deref().context("KOTODAMA_TOKEN_PUBLIC_KEY_FILE is required")?,
            )?;
            let material = if alg == "RS256" {
                KeyMaterial::Rs256 { private_pem, public_pem }
            } else {
                KeyMaterial::EdDsa { private_pem, public_pem }
            };
            Some(TokenKey { kid: t.kid.clone(), material })
        }
        _ if t.kid.is_some() || !t.previous.is_empty() => {
            let secret = secret.clone().unwrap_or_else(TokenSecret::random);
            Some(TokenKey { kid: t.kid.clone(), material: KeyMaterial::Hs256(secret) })
        }
        _ => None,
    };
    let keys = match signing {
        None => None,
        Some(signing) => {
            let mut previous = Vec::new();
            for p in &t.previous {
                let material = match p.algorithm.as_str() {
                    "HS256" => KeyMaterial::Hs256(
                        TokenSecret::new(p.secret.clone().unwrap_or_default().into_bytes())
                            .context("tokens.previous secret")?,
                    ),
                    alg => {
                        let public_pem = read(
                            "tokens.previous",
                            p.public_key_file.as_deref().context("tokens.previous public_key_file")?,
                        )?;
                        if alg == "RS256" {
                            KeyMaterial::Rs256 { private_pem: None, public_pem }
                        } else {
                            KeyMaterial::EdDsa { private_pem: None, public_pem }
                        }
                    }
                };
                previous.push(TokenKey { kid: Some(p.kid.clone()), material });
            }
            Some(TokenKeys { signing, previous })
        }
    };
    Ok(TokenConfig { secret, keys, ttl: config.session.token_ttl(), manage_grace: config.session.max_duration() })
}

/// Bind and serve `config` with `providers`, in the background.
pub async fn start(config: Config, providers: Vec<Arc<dyn RealtimeProvider>>) -> anyhow::Result<RunningServer> {
    let config = Arc::new(config);
    let tokens = TokenIssuer::new(token_config(&config)?).context("session token keys ([tokens], KOTODAMA_TOKEN_*)")?;
    let api_keys = ApiKeys::default()
        .parse(KeyRole::User, config.api_keys.iter())
        .context("KOTODAMA_API_KEYS")?
        .parse(KeyRole::Admin, config.admin_api_keys.iter())
        .context("KOTODAMA_ADMIN_API_KEYS")?;

    let store = SqlStore::connect(&config.database_url).await.with_context(|| {
        format!("KOTODAMA_DATABASE_URL ({}): fix the URL or start the database", redact_url(&config.database_url))
    })?;
    let characters: Vec<StoredCharacter> = config
        .characters()
        .into_iter()
        .map(|c| StoredCharacter {
            id: c.id,
            name: c.name,
            language: c.language,
            voice: c.voice,
            persona: c.persona,
            avatar: c.avatar,
            provider: c.provider,
        })
        .collect();
    store.upsert_characters(&characters).await.context("storing the configured characters")?;
    let redis = match &config.redis_url {
        Some(url) => Some(
            Redis::connect(url, &config.redis_prefix)
                .await
                .with_context(|| format!("KOTODAMA_REDIS_URL ({}): fix the URL or start Redis", redact_url(url)))?,
        ),
        None => None,
    };

    let listener = tokio::net::TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot bind {} (KOTODAMA_BIND): is another server running there?", config.bind))?;
    let addr = listener.local_addr()?;
    let advertise_url = config.advertise_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let node_id = config.node_id.clone().unwrap_or_else(|| advertise_url.clone());

    // Sessions this node left open are from a crash: no drain ended them.
    let orphans = store
        .end_orphans(&node_id, std::time::SystemTime::now(), "crash")
        .await
        .context("marking sessions left open by a crash")?;
    if !orphans.is_empty() {
        let shown: Vec<&str> = orphans.iter().take(20).map(String::as_str).collect();
        tracing::warn!(
            node_id = %node_id,
            sessions = orphans.len(),
            ids = ?shown,
            "sessions left open by a crash marked ended (crash)"
        );
        if let Some(redis) = &redis {
            for id in &orphans {
                // Other nodes would otherwise redirect to this node until the entries expire.
                let _ = redis.unregister(id).await;
            }
        }
    }
    let (writer, _writer_task) = StoreWriter::spawn(Arc::new(store.clone()) as Arc<dyn Store>, redis.clone());
    let manager = SessionManager::new(
        Arc::clone(&config),
        providers,
        Backends {
            store: Arc::new(store.clone()),
            writer: writer.clone(),
            node_id,
            advertise_url: advertise_url.clone(),
            redis: redis.clone(),
        },
    );
    let host = Arc::new(crate::http::Host::new(Arc::clone(&manager)));
    let limits = signaling::Limits {
        sessions_per_minute_per_key: config.session.create_per_minute_per_key,
        sessions_per_minute_per_ip: config.session.create_per_minute_per_ip,
        idempotency_ttl: config.session.token_ttl(),
        ..signaling::Limits::default()
    };
    let mut api = signaling::api::ApiState::new(host, tokens).with_api_keys(api_keys).with_limits(limits);
    if let Some(verifier) = crate::oidc::OidcVerifier::new(&config.oidc) {
        api = api.with_end_users(verifier);
    }
    if let Some(redis) = &redis {
        api = api.with_short_term(Arc::new(redis.clone()));
        if let Some(cluster) = manager.cluster() {
            cluster.spawn_tasks(&manager).await;
        }
    }
    let admin = crate::admin::start(
        api.clone(),
        Arc::clone(&manager),
        crate::admin::store::AdminStore::new(store.pool().clone()),
        config.characters(),
    )
    .await
    .context("loading the admin API's character edits")?;
    let app = crate::http::app(api, Arc::clone(&manager), admin);

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
        store,
        writer,
        advertise_url,
    })
}

/// `url` without its password, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Run until SIGINT or SIGTERM, then drain and stop.
pub async fn serve_until_signal(config: Config) -> anyhow::Result<()> {
    // Loading the offline engines blocks for about a second: not on a runtime worker.
    let cfg = config.clone();
    let providers = tokio::task::spawn_blocking(move || providers_for(&cfg)).await.context("loading providers")??;
    let provider = config.provider_name().to_owned();
    let storage = redact_url(&config.database_url);
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
