//! `kotodama-loadgen`: how many live voice sessions does one machine hold?
//!
//! It starts a kotodama server (or targets a running one), then ramps the number of concurrent
//! WebRTC client sessions (10, 20, 40, ...). Each client is a real WebRTC peer (ICE, DTLS-SRTP,
//! SCTP and the `events` data channel) sending real Opus speech in a loop of turns (or a question
//! every `--every` seconds), a quarter of them barging in; the server answers through its
//! `scripted` provider after a configurable model delay. By default every client is a sans-IO
//! `rtc` core driven by one loop thread that also paces them (`client_loop.rs`); with
//! `--client-driver task` each is a webrtc-rs peer with its own driver task, paced by one loop.
//! Either way there is no task or timer per client for sending, the speech is encoded once and
//! nothing received is decoded. Every step is held and measured: agent packet lateness and loss
//! as the clients receive them, turn and barge-in latency, the server's own per-stage latency
//! histograms (scraped from `/metrics`), the server's CPU and RSS (from `/proc`) and the
//! generator's own CPU. It stops when p99 lateness passes the bound or loss appears, prints a
//! table, and writes JSON and a PNG plot.

mod client;
mod client_loop;
#[path = "../../../tests/common/client_peer.rs"]
mod client_peer;
mod plot;
mod report;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use client::{Client, Probe, Speech, TalkProfile};
use report::StepReport;

const USAGE: &str = "\
kotodama-loadgen — ramp concurrent WebRTC voice sessions against kotodama and measure

USAGE: kotodama-loadgen [options]
  --url <http://host:port>   target a running server (default: start one)
  --server-pid <pid>         with --url: the server's pid, for CPU and RSS
  --steps <n,n,...>          concurrent sessions per step (default 10,20,40,80,120,160,200,240)
  --hold <secs>              measurement time per step (default 15)
  --model-delay-ms <ms>      the scripted provider's response delay (default 200; 0: server-only)
  --barge <fraction>         share of turns that barge in (default 0.25)
  --question-ms <ms>         speak only the first <ms> of the 4.4 s question (issue 14's profile:
                             2700, a 2.7 s sentence)
  --reply-ms <ms>            a started server's scripted reply cut to <ms> (default: the whole
                             7.5 s; issue 14's profile: 2200)
  --peer-driver <task|loop>  a started server's media.peer_driver (default task)
  --client-driver <loop|task> the simulated clients: sans-IO cores driven by one loop thread
                             (default), or webrtc-rs peers with a driver task each
  --profile <talk|silent>    talk in turns, or stay connected and silent (default talk)
  --every <secs>             talk: start a question every <secs> s (e.g. 6) instead of taking
                             turns (ask, hear the reply, pause 0.5 s)
  --mic <silence|dtx>        how clients send silence: a coded frame every 20 ms (aiortc), or Opus
                             DTX as Chrome does with usedtx=1 (default silence)
  --max-lateness-ms <ms>     stop when p99 lateness passes this (default 20)
  --server-cpus <list>       pin a started server to these CPUs (taskset syntax, e.g. 1)
  --server-rt <prio>         run a started server at SCHED_RR priority <prio> (chrt -r; root)
  --opus-complexity <0..10>  a started server's encoder complexity (default: the server's default)
  --api-key <key>            API key for session creation
  --json <file>              write the report as JSON (default loadgen.json)
  --png <file>               write a plot (default loadgen.png)
";

/// How the simulated clients are driven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientDriver {
    /// Sans-IO cores in one loop thread ([`client_loop`]).
    Loop,
    /// A webrtc-rs peer per client with its driver task, paced by [`pace`].
    Task,
}

struct Opts {
    url: Option<String>,
    server_pid: Option<u32>,
    steps: Vec<usize>,
    hold: Duration,
    model_delay_ms: u64,
    barge: f64,
    profile: client::Profile,
    every: Option<Duration>,
    mic: client::MicMode,
    max_lateness_ms: f64,
    server_cpus: Option<String>,
    server_rt: Option<u8>,
    opus_complexity: Option<u8>,
    question_ms: Option<u64>,
    reply_ms: Option<u64>,
    peer_driver: Option<String>,
    client_driver: ClientDriver,
    api_key: Option<String>,
    json: PathBuf,
    png: PathBuf,
}

fn parse_args() -> anyhow::Result<Opts> {
    let mut o = Opts {
        url: None,
        server_pid: None,
        steps: vec![10, 20, 40, 80, 120, 160, 200, 240],
        hold: Duration::from_secs(15),
        model_delay_ms: 200,
        barge: 0.25,
        profile: client::Profile::Talk,
        every: None,
        mic: client::MicMode::Silence,
        max_lateness_ms: 20.0,
        server_cpus: None,
        server_rt: None,
        opus_complexity: None,
        question_ms: None,
        reply_ms: None,
        peer_driver: None,
        client_driver: ClientDriver::Loop,
        api_key: None,
        json: "loadgen.json".into(),
        png: "loadgen.png".into(),
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| args.get(i + 1).cloned().with_context(|| format!("{} needs a value", args[i]));
        match args[i].as_str() {
            "-h" | "--help" => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            "--url" => o.url = Some(val(i)?),
            "--server-pid" => o.server_pid = Some(val(i)?.parse()?),
            "--steps" => o.steps = val(i)?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?,
            "--hold" => o.hold = Duration::from_secs(val(i)?.parse()?),
            "--model-delay-ms" => o.model_delay_ms = val(i)?.parse()?,
            "--barge" => o.barge = val(i)?.parse()?,
            "--profile" => {
                o.profile = match val(i)?.as_str() {
                    "talk" => client::Profile::Talk,
                    "silent" => client::Profile::Silent,
                    other => anyhow::bail!("--profile {other}: use talk or silent"),
                }
            }
            "--every" => {
                let secs: f64 = val(i)?.parse()?;
                anyhow::ensure!(secs > 0.0 && secs < 3600.0, "--every must be within (0, 3600) seconds");
                o.every = Some(Duration::from_secs_f64(secs));
            }
            "--mic" => {
                o.mic = match val(i)?.as_str() {
                    "silence" => client::MicMode::Silence,
                    "dtx" => client::MicMode::Dtx,
                    other => anyhow::bail!("--mic {other}: use silence or dtx"),
                }
            }
            "--max-lateness-ms" => o.max_lateness_ms = val(i)?.parse()?,
            "--server-cpus" => o.server_cpus = Some(val(i)?),
            "--server-rt" => o.server_rt = Some(val(i)?.parse()?),
            "--opus-complexity" => o.opus_complexity = Some(val(i)?.parse()?),
            "--question-ms" => o.question_ms = Some(val(i)?.parse()?),
            "--reply-ms" => o.reply_ms = Some(val(i)?.parse()?),
            "--peer-driver" => {
                let driver = val(i)?;
                anyhow::ensure!(driver == "task" || driver == "loop", "--peer-driver {driver}: use task or loop");
                o.peer_driver = Some(driver);
            }
            "--client-driver" => {
                o.client_driver = match val(i)?.as_str() {
                    "loop" => ClientDriver::Loop,
                    "task" => ClientDriver::Task,
                    other => anyhow::bail!("--client-driver {other}: use loop or task"),
                }
            }
            "--api-key" => o.api_key = Some(val(i)?),
            "--json" => o.json = val(i)?.into(),
            "--png" => o.png = val(i)?.into(),
            other => anyhow::bail!("unknown argument `{other}` (see --help)"),
        }
        i += 2;
    }
    anyhow::ensure!(!o.steps.is_empty(), "--steps is empty");
    anyhow::ensure!(o.question_ms.is_none_or(|ms| ms >= 200), "--question-ms must be at least 200");
    anyhow::ensure!(
        o.url.is_none() || o.reply_ms.is_none(),
        "--reply-ms applies to a server the generator starts; with --url set scripted.reply_ms on that server"
    );
    anyhow::ensure!((0.0..=1.0).contains(&o.barge), "--barge must be within 0..1");
    Ok(o)
}

/// Start `kotodama serve` next to this binary on a free port with the scripted provider.
fn spawn_server(o: &Opts, max_sessions: usize) -> anyhow::Result<(Child, String)> {
    let exe = std::env::current_exe()?.with_file_name("kotodama");
    anyhow::ensure!(exe.exists(), "{} not found: build it (cargo build --release --bins)", exe.display());
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = std::env::temp_dir().join(format!("kotodama-loadgen-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("kotodama.toml");
    std::fs::write(
        &cfg,
        format!(
            "provider = \"scripted\"\n[session]\nmax_sessions = {}\n{}[scripted]\nresponse_delay_ms = {}\n{}{}",
            max_sessions + 16,
            // Every session comes from this one address within a minute or two: the per-IP and
            // per-key creation rates (120 and 600 a minute by default) would stop the ramp.
            "create_per_minute_per_ip = 0\ncreate_per_minute_per_key = 0\n",
            o.model_delay_ms,
            o.reply_ms.map(|ms| format!("reply_ms = {ms}\n")).unwrap_or_default(),
            o.opus_complexity.map(|c| format!("[media]\nopus_complexity = {c}\n")).unwrap_or_default()
        ),
    )?;
    // [chrt -r P] [taskset -c CPUS] kotodama serve ...
    let mut argv: Vec<std::ffi::OsString> = Vec::new();
    if let Some(prio) = o.server_rt {
        argv.extend(["chrt".into(), "-r".into(), prio.to_string().into()]);
    }
    if let Some(cpus) = &o.server_cpus {
        argv.extend(["taskset".into(), "-c".into(), cpus.into()]);
    }
    argv.push(exe.into_os_string());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    cmd.arg("serve")
        .arg("--config")
        .arg(&cfg)
        .env("KOTODAMA_BIND", format!("127.0.0.1:{port}"))
        .env("KOTODAMA_LOG", "warn")
        .env("KOTODAMA_PEER_DRIVER", o.peer_driver.as_deref().unwrap_or("task"))
        .env_remove("OPENAI_API_KEY")
        .env_remove("KOTODAMA_PROVIDER")
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd.spawn().context("starting the server")?;
    Ok((child, format!("http://127.0.0.1:{port}")))
}

/// A line above the progress bar, or on stderr when the bar is hidden (not a terminal: indicatif's
/// `println` then prints nothing, and connect failures and the reason a ramp stopped were lost).
fn say(bar: &ProgressBar, line: impl AsRef<str>) {
    if bar.is_hidden() {
        eprintln!("{}", line.as_ref());
    } else {
        bar.println(line);
    }
}

/// Sessions connecting at once while ramping.
const CONNECTS_AT_ONCE: usize = 8;

/// The one pacing loop: every 20 ms, each client's next packet (new clients arrive on `add`).
/// Ends, hanging up every client, when `add` closes.
async fn pace(mut add: tokio::sync::mpsc::Receiver<Client>, speech: Arc<Speech>, talk: TalkProfile) {
    let mut clients: Vec<Client> = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        loop {
            match add.try_recv() {
                Ok(c) => clients.push(c),
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    futures::future::join_all(clients.into_iter().map(Client::close)).await;
                    return;
                }
            }
        }
        let now = Instant::now();
        for c in &mut clients {
            c.frame(now, &speech, &talk).await;
        }
    }
}

/// The running clients, by driver.
enum Clients {
    Loop(client_loop::ClientLoop),
    Task { add_tx: tokio::sync::mpsc::Sender<Client>, pacer: tokio::task::JoinHandle<()> },
}

impl Clients {
    /// Connect one more client and start it talking; returns its measurements' handle.
    async fn connect(&self, http: &reqwest::Client, base: &str, o: &Opts) -> anyhow::Result<Probe> {
        let key = o.api_key.as_deref();
        match self {
            Clients::Loop(l) => l.connect(http, base, key, (o.mic, o.profile, o.every)).await,
            Clients::Task { add_tx, .. } => {
                let c = Client::connect(http, base, key).await?.with_profile(o.mic, o.profile, o.every);
                let probe = c.probe();
                add_tx.send(c).await.map_err(|_| anyhow::anyhow!("the pacing loop has stopped"))?;
                Ok(probe)
            }
        }
    }

    /// Hang up every client.
    async fn stop(self) {
        match self {
            Clients::Loop(l) => l.stop().await,
            Clients::Task { add_tx, pacer } => {
                drop(add_tx);
                let _ = pacer.await;
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let opts = parse_args()?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(opts))
}

async fn run(o: Opts) -> anyhow::Result<()> {
    let max_n = *o.steps.iter().max().unwrap_or(&10);
    let (mut child, base, pid) = match &o.url {
        Some(u) => (None, u.trim_end_matches('/').to_owned(), o.server_pid),
        None => {
            let (c, b) = spawn_server(&o, max_n)?;
            let pid = c.id();
            (Some(StartedServer(c)), b, Some(pid))
        }
    };
    let http = reqwest::Client::new();
    let ready_deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{base}/readyz")).send().await.map(|r| r.status().as_u16() != 200).unwrap_or(true) {
        anyhow::ensure!(Instant::now() < ready_deadline, "server at {base} not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let wav = include_bytes!("../../../tests/data/user_question.wav");
    let pcm = media::wav::parse(wav)?;
    let question = o.question_ms.map_or(pcm.samples.len(), |ms| {
        let n = media::pcm::duration_to_samples(Duration::from_millis(ms), pcm.rate_hz);
        usize::try_from(n).unwrap_or(usize::MAX).min(pcm.samples.len())
    });
    let speech = Arc::new(Speech::encode(&pcm.samples[..question])?);
    let talk = TalkProfile { barge: o.barge, every: o.every };
    let clients = match o.client_driver {
        ClientDriver::Loop => Clients::Loop(client_loop::ClientLoop::start(Arc::clone(&speech), talk)?),
        ClientDriver::Task => {
            let (add_tx, add_rx) = tokio::sync::mpsc::channel(CONNECTS_AT_ONCE);
            let pacer = tokio::spawn(pace(add_rx, Arc::clone(&speech), talk));
            Clients::Task { add_tx, pacer }
        }
    };
    let mut probes: Vec<Probe> = Vec::new();
    let mut reports: Vec<StepReport> = Vec::new();
    let idle = report::server_sample(&http, &base, pid).await;

    let total_secs = o.steps.len() as u64 * (o.hold.as_secs() + 5);
    let bar = ProgressBar::new(total_secs);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    for &n in &o.steps {
        bar.set_message(format!("ramping to {n} sessions"));
        let mut failed = 0usize;
        while probes.len() < n && failed <= 5 {
            // A few connects at a time: each waits on ICE gathering and two HTTP round trips.
            let batch = (n - probes.len()).min(CONNECTS_AT_ONCE);
            let connects = (0..batch).map(|_| clients.connect(&http, &base, &o));
            for r in futures::future::join_all(connects).await {
                match r {
                    Ok(probe) => probes.push(probe),
                    Err(e) => {
                        failed += 1;
                        say(&bar, format!("session {} failed to connect: {e:#}", probes.len() + 1));
                    }
                }
            }
        }
        // Let the new sessions settle into their talk loop, then measure.
        tokio::time::sleep(Duration::from_secs(5)).await;
        bar.inc(5);
        for p in &probes {
            p.take(true);
        }
        let before = report::server_sample(&http, &base, pid).await;
        bar.set_message(format!("holding {n} sessions"));
        for _ in 0..o.hold.as_secs() {
            tokio::time::sleep(Duration::from_secs(1)).await;
            bar.inc(1);
        }
        let after = report::server_sample(&http, &base, pid).await;
        let samples: Vec<client::Sample> = probes.iter().map(|p| p.take(true)).collect();
        let step = StepReport::build(probes.len(), &samples, &before, &after, &idle, o.model_delay_ms);
        say(&bar, step.row());
        let stop_now = step.lateness.p99_ms > o.max_lateness_ms || step.lost > 0 || failed > 5;
        reports.push(step);
        if stop_now {
            say(&bar, format!("a bound broke at {n} sessions ({} connected): stopping the ramp", probes.len()));
            break;
        }
    }
    bar.finish_and_clear();
    let _ = tokio::time::timeout(Duration::from_secs(30), clients.stop()).await;

    println!("{}", StepReport::header());
    for r in &reports {
        println!("{}", r.row());
    }
    std::fs::write(&o.json, serde_json::to_string_pretty(&reports)?)?;
    plot::draw(&o.png, &reports)?;
    println!("wrote {} and {}", o.json.display(), o.png.display());
    drop(child.take());
    Ok(())
}

/// The server the generator started: stopped (SIGTERM, then SIGKILL after 10 s) when the run
/// ends, on every path out of [`run`] (an error writing the report left it running before).
struct StartedServer(Child);

impl Drop for StartedServer {
    fn drop(&mut self) {
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
