//! Deterministic replay of a recorded session (`kotodama replay <recording>`).
//!
//! The conversation core ([`crate::session::conversation`]) is sans-IO: every decision follows
//! from its inputs and the media time they arrive at. A recording ([`crate::recording`]) holds
//! those inputs; a replay builds the same core from the recording's header (through the current
//! code, with optional setting overrides) and feeds them again on virtual time, with no clock,
//! socket or model:
//!
//! - client inputs (Opus packets, events, VAD edges, connects) at their recorded instants;
//! - a provider that answers from the recorded provider events: each at its recorded instant, but
//!   never while the core holds the provider back ([`Conversation::wants_provider_events`], as the
//!   live task does), and refusing exactly the commands the live provider refused;
//! - timeouts: the recorded ones (the live timer's real wake-ups, so frames leave exactly as
//!   late as they did), plus one at the core's own deadline when the recording has no wake-up
//!   within [`TIMER_SLACK`] of it (a changed setting made the core want a different one);
//! - nothing after the last recorded input (the live session ended there).
//!
//! The result is the core's output stream ([`Replayed::report`]): client events, agent states,
//! provider commands, turns, with their media time, then the transcript and a summary of the
//! audio. `--compare` diffs it against the recorded outputs; identical code and settings give an
//! identical stream (the item ids and the session id come from the recording; nothing else is
//! random).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use signaling::events::{Role, ServerEvent};

use crate::recording::format::{EVENTS_FILE, FORMAT_VERSION, Header, Line, RecCommand, RecInput, RecOutput, ns};
use crate::session::conversation::{Conversation, ConversationConfig, Input, Output};

/// A recorded timer wake-up this close after the core's deadline is taken as the live timer's
/// (late) wake-up for it; without one, the replay wakes the core at its deadline.
pub const TIMER_SLACK: Duration = Duration::from_millis(40);

/// Settings a replay may change (the recording's header holds the ones the session used).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Overrides {
    /// libfvad mode 0..=3.
    pub vad_mode: Option<u8>,
    /// Voiced audio before a speech start, ms.
    pub vad_min_speech_ms: Option<u64>,
    /// Unvoiced audio before a speech stop, ms.
    pub vad_min_silence_ms: Option<u64>,
    /// Energy floor, dBFS.
    pub vad_energy_floor_dbfs: Option<f32>,
}

/// A recording's event log, read.
#[derive(Debug, Clone)]
pub struct Recording {
    /// The header (first line).
    pub header: Header,
    /// Every line after the header.
    pub lines: Vec<Line>,
}

impl Recording {
    /// Read `path`: a recording directory (holding `events.jsonl`) or the event log itself.
    /// Errors: unreadable, not an event log, or another format version.
    pub fn load(path: &Path) -> Result<Self, String> {
        let file: PathBuf = if path.is_dir() { path.join(EVENTS_FILE) } else { path.to_owned() };
        let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", file.display()))
    }

    /// Parse an event log. Errors: not an event log, or another format version.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut lines = crate::recording::read_lines(text)?;
        if lines.is_empty() {
            return Err("empty event log".into());
        }
        let Line::Header(header) = lines.remove(0) else { return Err("the first line is not the header".into()) };
        if header.format != FORMAT_VERSION {
            return Err(format!("format {} (this build replays format {FORMAT_VERSION})", header.format));
        }
        Ok(Self { header: *header, lines })
    }

    /// Whether the recording says it holds every line (the session ended, nothing was lost).
    pub fn complete(&self) -> bool {
        matches!(self.lines.last(), Some(Line::End { complete: true, .. }))
    }

    /// The outputs recorded live, with their media time (ns).
    pub fn outputs(&self) -> Vec<(u64, RecOutput)> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Out { t_ns, output } => Some((*t_ns, output.clone())),
                _ => None,
            })
            .collect()
    }
}

/// What a replay produced.
#[derive(Debug, Clone, Default)]
pub struct Replayed {
    /// The core's outputs with the media time (ns) of the input that produced them.
    pub outputs: Vec<(u64, RecOutput)>,
}

/// Where an input of the replay comes from.
struct Timed {
    t_ns: u64,
    /// Position in the recording (ties at one instant keep the recorded order).
    seq: usize,
    input: RecInput,
}

/// Replay `rec` through the current code with `overrides`. Errors: the header's settings are
/// refused, or an input cannot be rebuilt.
pub fn run(rec: &Recording, overrides: &Overrides) -> Result<Replayed, String> {
    let h = &rec.header;
    let mut spec = h.media;
    spec.vad_mode = overrides.vad_mode.unwrap_or(spec.vad_mode);
    spec.vad_min_speech_ms = overrides.vad_min_speech_ms.unwrap_or(spec.vad_min_speech_ms);
    spec.vad_min_silence_ms = overrides.vad_min_silence_ms.unwrap_or(spec.vad_min_silence_ms);
    spec.vad_energy_floor_dbfs = overrides.vad_energy_floor_dbfs.unwrap_or(spec.vad_energy_floor_dbfs);
    let media = spec.parts().map_err(|e| format!("media settings refused: {e}"))?;
    let moderator = match &h.moderation {
        Some(m) => Some(Arc::new(crate::moderation::Moderator::new(m).map_err(|e| format!("moderation: {e}"))?)),
        None => None,
    };
    let cfg = ConversationConfig {
        session_id: h.session_id.clone(),
        character: h.character.clone(),
        provider: h.provider.clone(),
        caps: h.caps.into(),
        greeting: h.greeting.clone(),
        idle_timeout: h.idle_timeout_ms.map(Duration::from_millis),
        moderator,
        // Budgets are not recorded yet: a replay runs unlimited (a recorded session that ended on
        // its budget shows the difference under --compare).
        budget: crate::session::budget::BudgetPlan::new(&Default::default(), None),
        // Provider deadlines are not recorded either: a replay feeds the recorded provider events
        // and timer wake-ups, so a recorded deadline shows as a difference under --compare.
        reply_timeout: None,
        start_timeout: None,
    };
    let mut conv = Conversation::new(cfg, media);
    conv.set_recording(true);

    let (mut client, mut provider, mut refusals) = (VecDeque::new(), VecDeque::new(), VecDeque::new());
    // The live core was last driven at the last recorded input: nothing is fed after it.
    let end_ns = rec.lines.iter().rev().find_map(|l| match l {
        Line::In { t_ns, .. } => Some(*t_ns),
        _ => None,
    });
    for (seq, line) in rec.lines.iter().enumerate() {
        match line {
            Line::In { t_ns, input: RecInput::Refused { command } } => refusals.push_back((*t_ns, command.clone())),
            Line::In { t_ns, input: input @ RecInput::Provider { .. } } => {
                provider.push_back(Timed { t_ns: *t_ns, seq, input: input.clone() })
            }
            Line::In { t_ns, input } => client.push_back(Timed { t_ns: *t_ns, seq, input: input.clone() }),
            _ => {}
        }
    }

    let mut out = Replayed::default();
    let mut now = 0u64;
    let mut last_synth: Option<u64> = None;
    loop {
        // The next recorded client input, the next provider event (while wanted), or a wake-up.
        let next_client = client.front().map(|c: &Timed| (c.t_ns, c.seq));
        let next_provider =
            provider.front().filter(|_| conv.wants_provider_events()).map(|p: &Timed| (p.t_ns.max(now), p.seq));
        // A deadline already past is due now (the live timer fires at once, as late as it is).
        let synth = conv.poll_timeout().map(|d| ns(d).max(now)).filter(|&d| {
            last_synth.is_none_or(|l| d > l)
                && !client
                    .iter()
                    .take_while(|c| c.t_ns <= d + ns(TIMER_SLACK))
                    .any(|c| c.t_ns >= d && matches!(c.input, RecInput::Timeout))
        });
        let synth = synth.map(|d| (d, usize::MAX));
        let Some(&(t, seq)) = [next_client, next_provider, synth].iter().flatten().min() else { break };
        if end_ns.is_some_and(|e| t > e) {
            break;
        }
        let input = if seq == usize::MAX {
            last_synth = Some(t);
            RecInput::Timeout
        } else if next_client.is_some_and(|c| c.1 == seq) {
            client.pop_front().map(|c| c.input).unwrap_or(RecInput::Timeout)
        } else {
            provider.pop_front().map(|p| p.input).unwrap_or(RecInput::Timeout)
        };
        now = now.max(t);
        conv.handle_input(Duration::from_nanos(now), input.to_input()?);
        if drain(&mut conv, now, &mut refusals, &mut out)? {
            break;
        }
    }
    Ok(out)
}

/// Drain the core's outputs into `out`, refusing what the recording says the provider refused;
/// true when the core ended the session.
fn drain(
    conv: &mut Conversation,
    now: u64,
    refusals: &mut VecDeque<(u64, RecCommand)>,
    out: &mut Replayed,
) -> Result<bool, String> {
    let mut t = now;
    let mut ended = false;
    loop {
        let (rec, refused) = {
            let Some(o) = conv.poll_output() else { break };
            let rec = RecOutput::from_output(&o);
            let refused = match &o {
                Output::Provider(_) => {
                    let command = match &rec {
                        RecOutput::Provider { command } => command,
                        _ => unreachable!("a provider output is recorded as one"),
                    };
                    refusals.front().is_some_and(|(_, c)| c == command).then(|| refusals.pop_front()).flatten()
                }
                Output::End(_) => {
                    ended = true;
                    None
                }
                _ => None,
            };
            (rec, refused)
        };
        out.outputs.push((t, rec));
        if let Some((rt, command)) = refused {
            t = t.max(rt);
            conv.handle_input(Duration::from_nanos(t), Input::Refused(command.to_command()?));
        }
    }
    Ok(ended)
}

impl Replayed {
    /// The report of an output stream (see [`report`]).
    pub fn report(&self) -> Vec<String> {
        report(&self.outputs)
    }
}

/// The lines a replay prints and `--compare` diffs: every output but audio frames and user
/// audio chunks, as `<t ms> <json>`; then the transcript (`transcript: <role>: <text>`, with
/// `[interrupted]`); then one summary line per agent item's frames and one for the user audio
/// sent to the provider.
pub fn report(outputs: &[(u64, RecOutput)]) -> Vec<String> {
    let mut lines = Vec::with_capacity(outputs.len());
    let mut turns = Vec::new();
    // (item, frames, first due, last due, talk spurts)
    let mut items: Vec<(String, u64, u64, u64, u64)> = Vec::new();
    let (mut chunks, mut samples) = (0u64, 0u64);
    for (t, o) in outputs {
        match o {
            RecOutput::Audio { item_id, due_us, talkspurt_start, .. } => {
                match items.iter_mut().find(|i| &i.0 == item_id) {
                    Some(i) => {
                        i.1 += 1;
                        i.3 = *due_us;
                        i.4 += u64::from(*talkspurt_start);
                    }
                    None => items.push((item_id.clone(), 1, *due_us, *due_us, u64::from(*talkspurt_start))),
                }
                continue;
            }
            RecOutput::Provider { command: RecCommand::AppendAudio { samples: n, .. } } => {
                chunks += 1;
                samples += *n as u64;
                continue;
            }
            RecOutput::Turn { role, text, interrupted } => {
                let role = if *role == Role::User { "user" } else { "agent" };
                turns.push(format!("transcript: {role}: {text}{}", if *interrupted { " [interrupted]" } else { "" }));
            }
            _ => {}
        }
        let json = serde_json::to_string(o).unwrap_or_default();
        lines.push(format!("{:>12.6} {json}", *t as f64 / 1e6));
    }
    lines.extend(turns);
    for (item, frames, first, last, spurts) in items {
        lines.push(format!(
            "audio: {item}: {frames} frames, due {:.3}..{:.3} ms, {spurts} talk spurts",
            first as f64 / 1000.0,
            last as f64 / 1000.0
        ));
    }
    lines.push(format!("audio: to provider: {chunks} chunks, {samples} samples"));
    lines
}

/// The `agent.interrupted` events of an output stream: (item id, played ms).
pub fn interruptions(outputs: &[(u64, RecOutput)]) -> Vec<(String, u64)> {
    outputs
        .iter()
        .filter_map(|(_, o)| match o {
            RecOutput::Event { event: ServerEvent::AgentInterrupted { item_id, played_ms } } => {
                Some((item_id.clone(), *played_ms))
            }
            _ => None,
        })
        .collect()
}

/// The differences between two reports, as unified-diff-like lines (`-` recorded, `+` replayed)
/// around each differing line, at most `limit` of them; empty when equal.
pub fn diff(recorded: &[String], replayed: &[String], limit: usize) -> Vec<String> {
    let mut out = Vec::new();
    let n = recorded.len().max(replayed.len());
    let mut shown = 0;
    for i in 0..n {
        let (a, b) = (recorded.get(i), replayed.get(i));
        if a == b {
            continue;
        }
        if shown == limit {
            out.push(format!("... (more differences from line {})", i + 1));
            break;
        }
        shown += 1;
        out.push(format!("@@ line {} @@", i + 1));
        if let Some(a) = a {
            out.push(format!("-{a}"));
        }
        if let Some(b) = b {
            out.push(format!("+{b}"));
        }
    }
    out
}

const USAGE: &str = "\
USAGE:
    kotodama replay <recording> [--compare] [--out <file>] [overrides]

    <recording>   a recording directory (with events.jsonl) or its events.jsonl

    --compare                     diff the replayed outputs against the recorded ones;
                                  exit status 1 when they differ
    --out <file>                  write the report there instead of standard output
    --vad-mode <0..3>             overrides: libfvad mode
    --vad-min-speech-ms <ms>                 voiced audio before a speech start
    --vad-min-silence-ms <ms>                unvoiced audio before a speech stop
    --vad-energy-floor-dbfs <dB>             energy floor
";

/// `kotodama replay ...` (arguments after `replay`): 0 replayed (and equal with `--compare`), 1
/// different, 2 usage, 65 an unreadable recording (EX_DATAERR), 74 the report cannot be written.
pub fn main(args: &[String]) -> ExitCode {
    let mut path = None;
    let (mut compare, mut out_file) = (false, None);
    let mut o = Overrides::default();
    let mut i = 0;
    let usage = |msg: &str| {
        eprintln!("kotodama replay: {msg}\n{USAGE}");
        ExitCode::from(2)
    };
    while i < args.len() {
        let a = args[i].as_str();
        let mut value = || {
            i += 1;
            args.get(i).cloned()
        };
        let bad = |what: &str| format!("{a} needs {what}");
        match a {
            "-h" | "--help" => {
                print!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--compare" => compare = true,
            "--out" => match value() {
                Some(v) => out_file = Some(PathBuf::from(v)),
                None => return usage(&bad("a file")),
            },
            "--vad-mode" => match value().and_then(|v| v.parse().ok()).filter(|m: &u8| *m <= 3) {
                Some(v) => o.vad_mode = Some(v),
                None => return usage(&bad("0, 1, 2 or 3")),
            },
            "--vad-min-speech-ms" => match value().and_then(|v| v.parse().ok()).filter(|v: &u64| *v >= 10) {
                Some(v) => o.vad_min_speech_ms = Some(v),
                None => return usage(&bad("milliseconds >= 10")),
            },
            "--vad-min-silence-ms" => match value().and_then(|v| v.parse().ok()).filter(|v: &u64| *v >= 10) {
                Some(v) => o.vad_min_silence_ms = Some(v),
                None => return usage(&bad("milliseconds >= 10")),
            },
            "--vad-energy-floor-dbfs" => match value().and_then(|v| v.parse().ok()).filter(|v: &f32| v.is_finite()) {
                Some(v) => o.vad_energy_floor_dbfs = Some(v),
                None => return usage(&bad("a number of dBFS, e.g. -55")),
            },
            p if !p.starts_with('-') && path.is_none() => path = Some(PathBuf::from(p)),
            other => return usage(&format!("unknown argument `{other}`")),
        }
        i += 1;
    }
    let Some(path) = path else { return usage("which recording?") };
    let rec = match Recording::load(&path) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kotodama replay: {e}");
            return ExitCode::from(65);
        }
    };
    if !rec.complete() {
        eprintln!("kotodama replay: warning: the recording is incomplete (lines lost or cut); the replay may differ");
    }
    let replayed = match run(&rec, &o) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kotodama replay: {e}");
            return ExitCode::from(65);
        }
    };
    let lines = replayed.report();
    let mut text = lines.join("\n");
    text.push('\n');
    let written = match &out_file {
        Some(f) => std::fs::write(f, &text),
        None => std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes()),
    };
    if let Err(e) = written {
        eprintln!("kotodama replay: writing the report: {e}");
        return ExitCode::from(74);
    }
    if !compare {
        return ExitCode::SUCCESS;
    }
    let differences = diff(&report(&rec.outputs()), &lines, 20);
    if differences.is_empty() {
        eprintln!("kotodama replay: identical to the recording ({} lines)", lines.len());
        return ExitCode::SUCCESS;
    }
    eprintln!("kotodama replay: differs from the recording:");
    for d in differences {
        eprintln!("{d}");
    }
    ExitCode::from(1)
}
