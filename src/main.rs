//! The `kotodama` binary: `kotodama serve [--config kotodama.toml]`.

use std::path::PathBuf;
use std::process::ExitCode;

use kotodama::config::Config;
use tracing_subscriber::EnvFilter;

const USAGE: &str = "\
kotodama — a WebRTC media server that gives AI characters a voice

USAGE:
    kotodama serve [--config <file>]    start the server
    kotodama --help                     show this help
    kotodama --version                  show the version

OPTIONS:
    -c, --config <file>   configuration file (default: ./kotodama.toml if present; none needed)

ENVIRONMENT (overrides the file):
    KOTODAMA_BIND          host:port of HTTP (default 127.0.0.1:8080)
    KOTODAMA_PUBLIC_IP     address advertised in ICE candidates (default: the bind address)
    KOTODAMA_API_KEYS      comma-separated API keys or sha256:<hex> digests (required on a non-loopback bind)
    KOTODAMA_ADMIN_API_KEYS  admin keys (also every user's data), same forms
    KOTODAMA_PROVIDER      provider for new sessions (default: scripted)
    KOTODAMA_TOKEN_SECRET  session-token secret, >= 32 bytes (default: random per start)
    KOTODAMA_DATABASE_URL  sqlite://... (default sqlite://data/kotodama.db) or postgres://...
    KOTODAMA_TOKEN_ALG     HS256 (default), RS256 or EdDSA; with KOTODAMA_TOKEN_KID and
                           KOTODAMA_TOKEN_PRIVATE_KEY_FILE / KOTODAMA_TOKEN_PUBLIC_KEY_FILE (PEM)
    KOTODAMA_REDIS_URL     redis://... (unset: single node, in-process state)
    KOTODAMA_REDIS_PREFIX  prefix of every Redis key (default kotodama:)
    KOTODAMA_ADVERTISE_URL URL other nodes redirect this node's clients to (default http://<bind>)
    KOTODAMA_NODE_ID       stable node id in the store (default: the advertise URL)
    KOTODAMA_LOG           log filter, e.g. info or kotodama=debug (default info)
    KOTODAMA_LOG_FORMAT    `json` for JSON lines
    OPENAI_API_KEY, OPENAI_REALTIME_URL, OPENAI_REALTIME_MODEL   the OpenAI Realtime provider
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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

    init_tracing();
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
    match runtime.block_on(kotodama::server::serve_until_signal(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kotodama: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing() {
    let filter = EnvFilter::try_from_env("KOTODAMA_LOG")
        .unwrap_or_else(|_| EnvFilter::new("info,webrtc=warn,rtc=warn,rtc_ice=warn,rtc_dtls=warn,rtc_sctp=warn"));
    let json = std::env::var("KOTODAMA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("json"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
