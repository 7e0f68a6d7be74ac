//! Metrics: one Prometheus recorder per process, the metric names, and small helpers.
//!
//! Every metric kotodama exports is named here, with its unit in the name. Latency histograms have
//! explicit buckets fine enough for the targets in `performance.md` (1 ms and below for the media
//! path). The recorder is process-global (the `metrics` facade is), so several servers in one
//! process (tests) share it.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Sessions created.
pub const SESSIONS_CREATED: &str = "kotodama_sessions_created_total";
/// Counter: connected sessions whose client sent no audio for 5 s (once per silent stretch).
pub const NO_AUDIO_TOTAL: &str = "kotodama_no_audio_total";
/// Counter: a new SSRC on a session's audio m-line taken as the client's microphone
/// ([`crate::ssrc_demux`]; once per new source).
pub const SSRC_CHANGES_TOTAL: &str = "kotodama_ssrc_changes_total";
/// Sessions ended, by `reason`.
pub const SESSIONS_ENDED: &str = "kotodama_sessions_ended_total";
/// Sessions not yet ended (gauge, set at scrape time).
pub const SESSIONS_LIVE: &str = "kotodama_sessions_live";
/// RTP arrival of a user audio packet -> its audio handed to the provider.
pub const UPLINK_LATENCY: &str = "kotodama_uplink_latency_seconds";
/// Provider audio received while playout was idle -> its first RTP packet out.
pub const DOWNLINK_LATENCY: &str = "kotodama_downlink_latency_seconds";
/// A final turn recorded -> the client events held behind it released (its journal append and
/// fsync: the delay durability adds to a final transcript).
pub const TRANSCRIPT_DURABLE: &str = "kotodama_transcript_durable_seconds";
/// How late each outbound frame was written against its pacing slot.
pub const PACING_LATENESS: &str = "kotodama_pacing_lateness_seconds";
/// End of the user's speech -> first agent RTP packet, by `part`: `total`, `silence` (waiting for
/// the end-of-turn silence), `model` (commit -> first provider audio), `server` (first provider
/// audio -> first packet).
pub const TURN_LATENCY: &str = "kotodama_turn_latency_seconds";
/// User speech onset (stream position) -> agent audio stopped.
pub const BARGE_IN_LATENCY: &str = "kotodama_barge_in_latency_seconds";
/// RTP packets, by `direction` (`in`, `out`).
pub const RTP_PACKETS: &str = "kotodama_rtp_packets_total";
/// Inbound RTP packets inferred lost.
pub const RTP_LOST: &str = "kotodama_rtp_lost_total";
/// Inbound RTP packets late or duplicated.
pub const RTP_LATE: &str = "kotodama_rtp_late_total";
/// Frames concealed by PLC.
pub const PLC_FRAMES: &str = "kotodama_plc_frames_total";
/// Frames recovered by FEC.
pub const FEC_FRAMES: &str = "kotodama_fec_frames_total";
/// Opus payloads rejected by the decoder.
pub const DECODE_ERRORS: &str = "kotodama_decode_errors_total";
/// Outbound frames written more than 5 ms late.
pub const LATE_FRAMES: &str = "kotodama_playout_late_frames_total";
/// Items dropped from a bounded queue, by `queue`.
pub const QUEUE_DROPS: &str = "kotodama_queue_drops_total";
/// Provider session opens, by `provider` and `result` (`ok`, `error`).
pub const PROVIDER_CONNECTS: &str = "kotodama_provider_connects_total";
/// Provider errors, by `provider`.
pub const PROVIDER_ERRORS: &str = "kotodama_provider_errors_total";
/// Agent replies moderation flagged (cut before they were spoken), by `category`.
pub const MODERATION_FLAGS: &str = "kotodama_moderation_flags_total";
/// Moderation endpoint checks that failed or missed their deadline.
pub const MODERATION_ENDPOINT_FAILURES: &str = "kotodama_moderation_endpoint_failures_total";
/// HTTP requests, by `route` and `status`.
pub const HTTP_REQUESTS: &str = "kotodama_http_requests_total";
/// HTTP request duration, by `route`.
pub const HTTP_DURATION: &str = "kotodama_http_request_duration_seconds";

const MEDIA_BUCKETS: &[f64] =
    &[0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];
const TURN_BUCKETS: &[f64] =
    &[0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Install the process-wide recorder (once) and return the handle that renders `/metrics`.
/// `None` when another recorder was installed first by the embedding program.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(TURN_LATENCY.into()), TURN_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), MEDIA_BUCKETS))
                .ok()?;
            builder.install_recorder().ok()
        })
        .clone()
}

/// Record a duration in seconds.
pub fn observe(name: &'static str, d: Duration) {
    histogram!(name).record(d.as_secs_f64());
}

/// Record a duration in seconds with one label.
pub fn observe_with(name: &'static str, key: &'static str, value: &'static str, d: Duration) {
    histogram!(name, key => value).record(d.as_secs_f64());
}

/// Add to a counter.
pub fn add(name: &'static str, n: u64) {
    if n > 0 {
        counter!(name).increment(n);
    }
}

/// Add to a counter with one label.
pub fn add_with(name: &'static str, key: &'static str, value: String, n: u64) {
    if n > 0 {
        counter!(name, key => value).increment(n);
    }
}
