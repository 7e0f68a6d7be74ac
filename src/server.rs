//! Starting, running and stopping a kotodama node.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::providers::RealtimeProvider;
use crate::providers::table::ProviderSetupError;
use crate::session::{Backends, SessionManager};
use crate::store::redis::Redis;
use crate::store::sql::SqlStore;
use crate::store::writer::StoreWriter;
use crate::store::{Store, StoredCharacter};
use signaling::token::TokenIssuer;
use signaling::token_keys::TokenLoadError;
use signaling::{ApiKeys, KeyRole};

/// The providers a configuration asks for (the provider table's rows this node offers).
pub fn providers_for(config: &Config) -> Result<Vec<Arc<dyn RealtimeProvider>>, ProviderSetupError> {
    crate::providers::table::build_all(config)
}

/// Why a node could not start or stop cleanly. Each names the configuration key to look at.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A provider could not be built.
    #[error(transparent)]
    Providers(#[from] ProviderSetupError),
    /// A setting could only be checked against the machine at start (the media UDP port, TURN).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// The session-token keys could not be loaded.
    #[error("session token keys ([tokens], KOTODAMA_TOKEN_*): {0}")]
    TokenKeys(#[from] TokenLoadError),
    /// The session-token keys were refused.
    #[error("session token keys ([tokens], KOTODAMA_TOKEN_*): {0}")]
    Tokens(#[from] signaling::token::TokenConfigError),
    /// An API key is malformed.
    #[error("{key}: {source}")]
    ApiKeys {
        /// `KOTODAMA_API_KEYS` or `KOTODAMA_ADMIN_API_KEYS`.
        key: &'static str,
        /// Which entry.
        source: signaling::auth::ApiKeyError,
    },
    /// The database or Redis could not be reached or used.
    #[error("{what}: {source}")]
    Store {
        /// What was being done, with the key to fix (the URL without its password).
        what: String,
        /// Why.
        source: crate::store::StoreError,
    },
    /// A socket could not be bound or served.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Why.
        source: std::io::Error,
    },
    /// A background task panicked or was cancelled.
    #[error("{what}: {source}")]
    Task {
        /// Which task.
        what: &'static str,
        /// Why.
        source: tokio::task::JoinError,
    },
}

fn store_error(what: impl Into<String>) -> impl FnOnce(crate::store::StoreError) -> ServerError {
    let what = what.into();
    move |source| ServerError::Store { what, source }
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
    pub async fn shutdown(mut self) -> Result<(), ServerError> {
        self.manager.drain(self.drain_grace).await;
        self.manager.unregister_all().await;
        if let Some(cluster) = self.manager.cluster() {
            cluster.leave().await;
        }
        // Bounded: with the database down, queued writes would wait for it forever.
        if tokio::time::timeout(SHUTDOWN_FLUSH, self.writer.flush()).await.is_err() {
            tracing::error!(
                "store unreachable at shutdown: queued writes not flushed within {SHUTDOWN_FLUSH:?} \
                 (journaled ones are written at the next start)"
            );
        }
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
            let served = join.await.map_err(|source| ServerError::Task { what: "HTTP server task", source })?;
            served.map_err(|source| ServerError::Io { what: "HTTP server".into(), source })?;
        }
        self.store.close().await;
        Ok(())
    }
}

/// Longest the shutdown waits for queued store writes.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(10);

/// The node's store writer with its journal (`KOTODAMA_JOURNAL_DIR`, one file per node id).
fn start_writer(
    config: &Config,
    store: &SqlStore,
    redis: Option<Redis>,
    node_id: &str,
) -> Result<(StoreWriter, tokio::task::JoinHandle<()>), ServerError> {
    let dir = crate::config::storage::journal_dir(config);
    let journal =
        crate::store::journal::Journal::open(&dir, node_id, config.journal_max_bytes).map_err(|e| ServerError::Io {
            what: format!("store journal {} (KOTODAMA_JOURNAL_DIR: use a writable directory)", e.path),
            source: e.source,
        })?;
    tracing::info!(path = %journal.path().display(), max_bytes = config.journal_max_bytes, "store journal");
    let store = Arc::new(store.clone()) as Arc<dyn Store>;
    StoreWriter::spawn_with_journal(store, redis, config.store_queue, journal)
        .map_err(|source| ServerError::Io { what: "starting the store journal thread".into(), source })
}

/// Bind and serve `config` with `providers`, in the background.
pub async fn start(config: Config, providers: Vec<Arc<dyn RealtimeProvider>>) -> Result<RunningServer, ServerError> {
    let config = Arc::new(config);
    let token_config = config.tokens.load(
        config.token_secret.as_deref(),
        config.session.token_ttl(),
        config.session.max_duration(),
    )?;
    let tokens = TokenIssuer::new(token_config)?;
    let api_keys = ApiKeys::default()
        .parse(KeyRole::User, config.api_keys.iter())
        .map_err(|source| ServerError::ApiKeys { key: "KOTODAMA_API_KEYS", source })?
        .parse(KeyRole::Admin, config.admin_api_keys.iter())
        .map_err(|source| ServerError::ApiKeys { key: "KOTODAMA_ADMIN_API_KEYS", source })?;

    let store = SqlStore::connect(&config.database_url).await.map_err(store_error(format!(
        "KOTODAMA_DATABASE_URL ({}): fix the URL or start the database",
        redact_url(&config.database_url)
    )))?;
    let characters: Vec<StoredCharacter> = config.characters().iter().map(StoredCharacter::from).collect();
    store.upsert_characters(&characters).await.map_err(store_error("storing the configured characters"))?;
    let redis =
        match &config.redis_url {
            Some(url) => Some(Redis::connect(url, &config.redis_prefix).await.map_err(store_error(format!(
                "KOTODAMA_REDIS_URL ({}): fix the URL or start Redis",
                redact_url(url)
            )))?),
            None => None,
        };

    let listener = tokio::net::TcpListener::bind(config.bind).await.map_err(|source| ServerError::Io {
        what: format!("cannot bind {} (KOTODAMA_BIND): is another server running there?", config.bind),
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| ServerError::Io { what: "the bound address".into(), source })?;
    if let Some((before, after)) = crate::http_server::raise_descriptor_limit() {
        tracing::info!(before, after, "raised the open-file limit (RLIMIT_NOFILE) to its hard limit");
    }
    let http_settings = config.http.clone();
    let advertise_url = config.advertise_url.clone().unwrap_or_else(|| format!("http://{addr}"));
    let node_id = config.node_id.clone().unwrap_or_else(|| advertise_url.clone());

    // The journal first: what a crash left in it (finals the clients saw, ends) is written
    // before the sessions still open are marked as crashed.
    let (writer, _writer_task) = start_writer(&config, &store, redis.clone(), &node_id)?;
    writer.flush().await;
    // Sessions this node left open are from a crash: no drain ended them. They ended when the
    // node was last seen alive (its last cluster heartbeat), not now.
    let crashed_at = last_heartbeat(redis.as_ref(), &node_id).await.unwrap_or_else(std::time::SystemTime::now);
    let orphans = store
        .end_orphans(&node_id, crashed_at, "crash")
        .await
        .map_err(store_error("marking sessions left open by a crash"))?;
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
    let memory = crate::memory::Memory::new(&config, store.pool().clone(), store.backend())
        .await
        .map_err(store_error("long-term memory (memory.embeddings needs pgvector on Postgres)"))?;
    let peer_loop = crate::peer_loop::bind_configured(&config)?;
    let manager = SessionManager::new(
        Arc::clone(&config),
        providers,
        Backends {
            store: Arc::new(store.clone()),
            writer: writer.clone(),
            node_id,
            advertise_url: advertise_url.clone(),
            redis: redis.clone(),
            udp_mux: match peer_loop {
                Some(_) => None,
                None => crate::udp_mux::bind_configured(&config)?,
            },
            peer_loop,
            memory,
        },
    );
    let host = Arc::new(crate::http::Host::new(Arc::clone(&manager)));
    let limits = signaling::Limits {
        sessions_per_minute_per_key: config.session.create_per_minute_per_key,
        sessions_per_minute_per_ip: config.session.create_per_minute_per_ip,
        idempotency_ttl: config.session.token_ttl(),
        ..signaling::Limits::default()
    };
    let turn = config.turn.ice_server_set(config.session.max_duration(), config.session.token_ttl())?;
    for entry in &config.turn.0 {
        // URLs and realm only: the secrets never reach a log.
        tracing::info!(urls = ?entry.urls, realm = ?entry.realm, secrets = entry.secrets.len(), "STUN/TURN servers for clients");
    }
    let mut api =
        signaling::api::ApiState::new(host, tokens).with_api_keys(api_keys).with_limits(limits).with_turn(turn);
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
    .map_err(store_error("loading the admin API's character edits"))?;
    let web_demo = crate::web_demo::routes(config.web_demo_dir.as_deref());
    let app = crate::http::app(api, Arc::clone(&manager), admin, web_demo);

    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let join = tokio::spawn(async move { crate::http_server::serve(listener, app, http_settings, stop_rx).await });

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

/// When node `node_id` last wrote its cluster heartbeat (`None`: no Redis, or no heartbeat kept).
async fn last_heartbeat(redis: Option<&Redis>, node_id: &str) -> Option<std::time::SystemTime> {
    match redis?.last_seen(node_id).await {
        Ok(beat) => beat.map(|b| crate::store::from_ms(b.last_seen_ms)),
        Err(e) => {
            tracing::warn!(error = %e, "last heartbeat not read: sessions left open end at the restart time");
            None
        }
    }
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
pub async fn serve_until_signal(config: Config) -> Result<(), ServerError> {
    // Loading the offline engines blocks for about a second: not on a runtime worker.
    let cfg = config.clone();
    let providers = tokio::task::spawn_blocking(move || providers_for(&cfg))
        .await
        .map_err(|source| ServerError::Task { what: "loading providers", source })??;
    let provider = config.provider_name().to_owned();
    let storage = redact_url(&config.database_url);
    let auth = if config.api_keys.is_empty() { "open (loopback, no API key)" } else { "API key required" };
    let server = start(config, providers).await?;
    release_startup_heap();
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

/// Hands the memory freed after start-up (configuration, migrations, provider tables) back to
/// the kernel: glibc keeps freed chunks resident in its arenas until a trim (`malloc_trim(3)`).
/// Part of keeping an idle node small (BENCHMARKS.md, issue 14).
fn release_startup_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
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
