//! Recordings as regression tests: `tests/data/recordings/barge-in/` is a real recorded session
//! (a webrtc-rs client speaking eSpeak NG sentences, the scripted character answering, the user
//! barging in; made by `tests/recording.rs` with `KOTODAMA_TEST_KEEP_RECORDING`). Replayed through
//! this build's conversation core it must give the recorded outputs exactly: the same transcript,
//! the same `agent.interrupted` at the same `played_ms`, the same truncation, every event at the
//! same media time; a changed VAD setting must show up in `kotodama replay --compare`.

use std::path::PathBuf;
use std::process::Command;

use kotodama::recording::format::{RecCommand, RecOutput};
use kotodama::replay::{self, Overrides, Recording};

fn recording_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/recordings/barge-in")
}

fn recording() -> Recording {
    let rec = Recording::load(&recording_dir()).expect("the committed recording reads");
    assert!(rec.complete(), "the committed recording is complete");
    rec
}

fn truncations(outputs: &[(u64, RecOutput)]) -> Vec<RecCommand> {
    outputs
        .iter()
        .filter_map(|(_, o)| match o {
            RecOutput::Provider { command: c @ RecCommand::Truncate { .. } } => Some(c.clone()),
            _ => None,
        })
        .collect()
}

fn turns(outputs: &[(u64, RecOutput)]) -> Vec<RecOutput> {
    outputs.iter().filter(|(_, o)| matches!(o, RecOutput::Turn { .. })).map(|(_, o)| o.clone()).collect()
}

#[test]
fn committed_barge_in_recording_replays_exactly_twice() {
    let rec = recording();
    let recorded = rec.outputs();
    let interrupted = replay::interruptions(&recorded);
    assert_eq!(interrupted.len(), 1, "the recording has one barge-in: {interrupted:?}");
    assert!(interrupted[0].1 > 0, "the agent had played some of its reply: {interrupted:?}");
    assert_eq!(truncations(&recorded).len(), 1, "and one truncation");
    assert!(
        turns(&recorded).iter().any(|t| matches!(t, RecOutput::Turn { interrupted: true, .. })),
        "an interrupted agent turn"
    );

    for run in 1..=2 {
        let replayed = replay::run(&rec, &Overrides::default()).expect("replays");
        assert_eq!(replay::interruptions(&replayed.outputs), interrupted, "run {run}: same agent.interrupted");
        assert_eq!(truncations(&replayed.outputs), truncations(&recorded), "run {run}: same truncation");
        assert_eq!(turns(&replayed.outputs), turns(&recorded), "run {run}: same transcript");
        let differences = replay::diff(&replay::report(&recorded), &replayed.report(), 10);
        assert!(
            differences.is_empty(),
            "run {run}: the replay differs from the recording:\n{}",
            differences.join("\n")
        );
    }
}

#[test]
fn a_changed_vad_setting_changes_the_replay() {
    let rec = recording();
    let slower = Overrides { vad_min_speech_ms: Some(rec.header.media.vad_min_speech_ms + 200), ..Default::default() };
    let replayed = replay::run(&rec, &slower).expect("replays");
    let differences = replay::diff(&replay::report(&rec.outputs()), &replayed.report(), 10);
    assert!(!differences.is_empty(), "a later speech start must move the VAD edges and the barge-in");
    let (before, after) = (replay::interruptions(&rec.outputs()), replay::interruptions(&replayed.outputs));
    assert_ne!(before, after, "the barge-in lands later: {before:?} vs {after:?}");
}

#[test]
fn kotodama_replay_compare_exit_status() {
    let bin = env!("CARGO_BIN_EXE_kotodama");
    let same = Command::new(bin).arg("replay").arg(recording_dir()).arg("--compare").output().unwrap();
    let stderr = String::from_utf8_lossy(&same.stderr);
    assert_eq!(same.status.code(), Some(0), "identical replay: {stderr}");
    let stdout = String::from_utf8_lossy(&same.stdout);
    assert!(stdout.contains("agent.interrupted"), "the report lists the events");
    assert!(stdout.contains("transcript: agent: ") && stdout.contains("[interrupted]"), "and the transcript");

    let changed = Command::new(bin)
        .args(["replay", "--compare", "--vad-min-silence-ms", "1500"])
        .arg(recording_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&changed.stderr);
    assert_eq!(changed.status.code(), Some(1), "a changed VAD setting differs: {stderr}");
    assert!(stderr.contains("differs from the recording"), "{stderr}");

    let bad = Command::new(bin).args(["replay", "/nonexistent/recording"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(65), "an unreadable recording");
    let usage = Command::new(bin).args(["replay", "--vad-mode", "9", "x"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2), "a bad override");
}
