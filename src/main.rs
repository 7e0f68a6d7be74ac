//! The `kotodama` binary: `kotodama serve [--config kotodama.toml]`, `kotodama replay <recording>`.

use std::path::PathBuf;
use std::process::ExitCode;

use kotodama::config::Config;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
kotodama — a WebRTC media server that gives AI characters a voice

USAGE:
    kotodama serve [--config <file>]    start the server
    kotodama replay <recording> [--compare] [--out <file>] [--vad-...]
                                        replay a recorded session through this build's core
                                        (see kotodama replay --help)
    kotodama --help                     show this help
    kotodama --version                  show the version

OPTIONS:
    -c, --config <file>   configuration file (default: ./kotodama.toml if present; none needed)

ENVIRONMENT (overrides the file):
    KOTODAMA_BIND          host:port of HTTP (default 127.0.0.1:8080)
    KOTODAMA_PUBLIC_IP     address advertised in ICE candidates (default: the bind address)
    KOTODAMA_API_KEYS      comma-separated API keys or sha256:<hex> digests (required on a non-loopback bind)
    KOTODAMA_ADMIN_API_KEYS  admin keys (also every user's data), same forms
    KOTODAMA_PROVIDER      provider for new sessions (default: local, the offline cascade)
    KOTODAMA_TOKEN_SECRET  session-token secret, >= 32 bytes (default: random per start)
    KOTODAMA_DATABASE_URL  sqlite://... (default sqlite://data/kotodama.db) or postgres://...
    KOTODAMA_TOKEN_ALG     HS256 (default), RS256 or EdDSA; with KOTODAMA_TOKEN_KID and
                           KOTODAMA_TOKEN_PRIVATE_KEY_FILE / KOTODAMA_TOKEN_PUBLIC_KEY_FILE (PEM)
    KOTODAMA_REDIS_URL     redis://... (unset: single node, in-process state)
    KOTODAMA_REDIS_PREFIX  prefix of every Redis key (default kotodama:)
    KOTODAMA_ADVERTISE_URL URL other nodes redirect this node's clients to (default http://<bind>)
    KOTODAMA_NODE_ID       stable node id in the store (default: the advertise URL)
    KOTODAMA_CLUSTER_PLACEMENT  least_loaded (default: a new session may 307 to a less loaded node) or local
    KOTODAMA_CLUSTER_HEARTBEAT_INTERVAL_MS, KOTODAMA_CLUSTER_HEARTBEAT_EXPIRY_MS  node heartbeat (default 5000, 15000)
    KOTODAMA_WEB_DEMO_DIR  serve the web demo from this directory (default: the built-in demo)
    KOTODAMA_LOG           log filter, e.g. info or kotodama=debug (default info)
    KOTODAMA_LOG_FORMAT    `json` for JSON lines
    KOTODAMA_OTLP_ENDPOINT OpenTelemetry collector (OTLP/HTTP), e.g. http://127.0.0.1:4318; unset: off
    KOTODAMA_RECORD        1: record every session (audio + events; see kotodama replay)
    KOTODAMA_RECORDING_URL where recordings go: a directory (default data/recordings) or s3://bucket/prefix
    OPENAI_API_KEY, OPENAI_REALTIME_URL, OPENAI_REALTIME_MODEL   the OpenAI Realtime provider
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("replay") {
        return kotodama::replay::main(&args[1..]);
    }
    let mut config_path: Option<PathBuf> = None;
    let mut command: Option<&str> = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "-h" | "--help" | "help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "-V" | "--version" => {
                println!("kotodama {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            "-c" | "--config" => {
                let Some(p) = args.get(i + 1) else {
                    eprintln!("kotodama: --config needs a file path");
                    return ExitCode::from(2);
                };
                config_path = Some(PathBuf::from(p));
                i += 1;
            }
            "serve" if command.is_none() => command = Some("serve"),
            other => {
                eprintln!("kotodama: unknown argument `{other}` (see kotodama --help)");
                return ExitCode::from(2);
            }
        }
        i += 1;
    }
    if command != Some("serve") {
        eprint!("{USAGE}");
        return ExitCode::from(2);
    }

    let telemetry = match init_tracing() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kotodama: {e}");
            return ExitCode::from(78);
        }
    };
    let config = match Config::load(config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kotodama: {e}");
            return ExitCode::from(78); // EX_CONFIG
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kotodama: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(kotodama::server::serve_until_signal(config));
    if let Some(t) = &telemetry.traces {
        // Send what is batched before exiting.
        let _ = t.force_flush();
        let _ = t.shutdown();
    }
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kotodama: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What must live until exit for logs and traces to be flushed.
struct Telemetry {
    traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    _logs: tracing_appender::non_blocking::WorkerGuard,
}

/// Logs to stdout (text or JSON lines) and, when an OTLP endpoint is configured, spans to it.
///
/// Log lines go through a bounded, lossy, non-blocking writer: a slow reader of stdout (a full
/// pipe, a stalled log shipper) makes the server drop log lines, never stall its media tasks.
fn init_tracing() -> Result<Telemetry, String> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let filter = EnvFilter::try_from_env("KOTODAMA_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,webrtc=warn,rtc=warn,rtc_ice=warn,rtc_dtls=warn,rtc_sctp=warn"));
    let json = std::env::var("KOTODAMA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        // 8192 lines: the queue's slots are allocated and written up front (64k lines held 2 MB
        // of an idle server's ~30 MB); the writer thread drains it continuously.
        .buffered_lines_limit(8 * 1024)
        .finish(std::io::stdout());
    let fmt = if json {
        // JSON lines with the current span's fields (session_id, trace_id, turn).
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(writer)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().with_target(false).with_writer(writer).boxed()
    };
    let provider = match kotodama::otlp::endpoint_from_env() {
        Some(endpoint) => Some(kotodama::otlp::provider(&endpoint)?),
        None => None,
    };
    let otel = provider.as_ref().map(kotodama::otlp::layer);
    tracing_subscriber::registry().with(fmt.with_filter(filter)).with(otel).init();
    Ok(Telemetry { traces: provider, _logs: guard })
}
