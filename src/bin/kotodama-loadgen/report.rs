//! Server samples (metrics scrape + /proc) and the per-step report.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::client::Sample;

/// Cumulative histogram buckets of one series: (upper bound in seconds, cumulative count).
type Buckets = Vec<(f64, f64)>;

/// The server at one instant.
#[derive(Debug, Clone, Default)]
pub struct ServerSample {
    at: Option<Instant>,
    /// utime + stime, in clock ticks.
    cpu_ticks: Option<u64>,
    /// The generator's own utime + stime, in clock ticks.
    gen_cpu_ticks: Option<u64>,
    rss_kb: Option<u64>,
    histograms: BTreeMap<String, Buckets>,
}

fn proc_stat(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some((ticks, rss))
}

/// Parse the `_bucket` series of a Prometheus text exposition: key = name + labels except `le`.
fn parse_histograms(text: &str) -> BTreeMap<String, Buckets> {
    let mut out: BTreeMap<String, Buckets> = BTreeMap::new();
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        let Some((name, labels)) = series.split_once("_bucket{") else { continue };
        let labels = labels.trim_end_matches('}');
        let mut le = None;
        let mut rest = Vec::new();
        for kv in labels.split(',') {
            match kv.split_once('=') {
                Some(("le", v)) => le = Some(v.trim_matches('"').to_owned()),
                Some(_) => rest.push(kv),
                None => {}
            }
        }
        let (Some(le), Ok(v)) = (le, value.parse::<f64>()) else { continue };
        let bound = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
        let key = if rest.is_empty() { name.to_owned() } else { format!("{name}{{{}}}", rest.join(",")) };
        out.entry(key).or_default().push((bound, v));
    }
    for b in out.values_mut() {
        b.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// Scrape the server now.
pub async fn server_sample(http: &reqwest::Client, base: &str, pid: Option<u32>) -> ServerSample {
    let text = match http.get(format!("{base}/metrics")).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    };
    let (cpu_ticks, rss_kb) = match pid.and_then(proc_stat) {
        Some((t, r)) => (Some(t), Some(r)),
        None => (None, None),
    };
    let gen_cpu_ticks = proc_stat(std::process::id()).map(|(t, _)| t);
    ServerSample { at: Some(Instant::now()), cpu_ticks, gen_cpu_ticks, rss_kb, histograms: parse_histograms(&text) }
}

/// The `q` quantile (ms) of what a histogram gained between two scrapes, interpolated within the
/// bucket; `None` when nothing was observed.
fn quantile_ms(before: &ServerSample, after: &ServerSample, key: &str, q: f64) -> Option<f64> {
    let a = after.histograms.get(key)?;
    let b = before.histograms.get(key);
    let delta: Vec<(f64, f64)> = a
        .iter()
        .map(|&(le, c)| {
            let prev = b.and_then(|b| b.iter().find(|x| x.0 == le)).map_or(0.0, |x| x.1);
            (le, c - prev)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let target = q * total;
    let mut lower = 0.0;
    let mut below = 0.0;
    for &(le, cum) in &delta {
        if cum >= target {
            let upper = if le.is_finite() { le } else { lower * 2.0 };
            let frac = if cum > below { (target - below) / (cum - below) } else { 0.0 };
            return Some((lower + (upper - lower) * frac) * 1000.0);
        }
        lower = le;
        below = cum;
    }
    None
}

fn pct(v: &mut [f32], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    f64::from(v[i])
}

/// The median and the 99th percentile of one latency, ms.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Spread {
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
}

impl Spread {
    /// Of client-side samples (ms); zero when there are none.
    fn of(v: &mut [f32]) -> Self {
        Self { p50_ms: pct(v, 0.5), p99_ms: pct(v, 0.99) }
    }

    /// Of a server histogram's observations between two scrapes.
    fn scraped(before: &ServerSample, after: &ServerSample, name: &str) -> Option<Self> {
        Some(Self { p50_ms: quantile_ms(before, after, name, 0.5)?, p99_ms: quantile_ms(before, after, name, 0.99)? })
    }

    /// `p50/p99` with `decimals` places.
    fn cell(&self, decimals: usize) -> String {
        format!("{:.decimals$}/{:.decimals$}", self.p50_ms, self.p99_ms)
    }
}

/// One step of the ramp.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Concurrent sessions.
    pub sessions: usize,
    /// Agent packets the clients received in the window.
    pub packets: u64,
    /// Agent packets lost.
    pub lost: u64,
    /// Client-observed frame lateness (vs. RTP timestamps).
    pub lateness: Spread,
    /// Server-added uplink latency (RTP arrival -> provider).
    pub uplink: Option<Spread>,
    /// Server-added downlink latency (provider audio -> RTP out).
    pub downlink: Option<Spread>,
    /// Server pacing lateness p99, ms.
    pub pacing_p99_ms: Option<f64>,
    /// Turn: end of speech -> first agent packet at the client, minus the model delay (includes
    /// the end-of-turn silence threshold).
    pub turn: Spread,
    /// Server's share of the turn (first provider audio -> first packet), p99, ms.
    pub turn_server_p99_ms: Option<f64>,
    /// Barge-in: onset -> agent audio stopped at the server, p99, ms (includes min speech).
    pub barge_in_p99_ms: Option<f64>,
    /// Server CPU over the window, % of one core.
    pub cpu_percent: Option<f64>,
    /// Server RSS at the end of the window, MB.
    pub rss_mb: Option<f64>,
    /// CPU per session, % of one core.
    pub cpu_percent_per_session: Option<f64>,
    /// RSS per session above the idle server, MB.
    pub rss_mb_per_session: Option<f64>,
    /// The generator's own CPU over the window, % of one core.
    pub generator_cpu_percent: Option<f64>,
    /// The generator's CPU per session, % of one core.
    pub generator_cpu_percent_per_session: Option<f64>,
}

/// CPU between two samples' tick counts, % of one core.
fn cpu_between(a: Option<u64>, b: Option<u64>, before: &ServerSample, after: &ServerSample) -> Option<f64> {
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let (a, b, t0, t1) = (a?, b?, before.at?, after.at?);
    Some(b.saturating_sub(a) as f64 / ticks_per_sec / (t1 - t0).as_secs_f64().max(1e-3) * 100.0)
}

impl StepReport {
    /// Combine a window's samples.
    pub fn build(
        sessions: usize,
        samples: &[Sample],
        before: &ServerSample,
        after: &ServerSample,
        idle: &ServerSample,
        model_delay_ms: u64,
    ) -> Self {
        let mut lateness: Vec<f32> = samples.iter().flat_map(|s| s.lateness_ms.iter().copied()).collect();
        let mut turns: Vec<f32> =
            samples.iter().flat_map(|s| s.turn_ms.iter().map(|t| t - model_delay_ms as f32)).collect();
        let cpu_percent = cpu_between(before.cpu_ticks, after.cpu_ticks, before, after);
        let gen_cpu = cpu_between(before.gen_cpu_ticks, after.gen_cpu_ticks, before, after);
        let rss_mb = after.rss_kb.map(|k| k as f64 / 1024.0);
        let idle_mb = idle.rss_kb.map(|k| k as f64 / 1024.0);
        let n = sessions.max(1) as f64;
        StepReport {
            sessions,
            packets: samples.iter().map(|s| s.packets).sum(),
            lost: samples.iter().map(|s| s.lost).sum(),
            lateness: Spread::of(&mut lateness),
            uplink: Spread::scraped(before, after, "kotodama_uplink_latency_seconds"),
            downlink: Spread::scraped(before, after, "kotodama_downlink_latency_seconds"),
            pacing_p99_ms: quantile_ms(before, after, "kotodama_pacing_lateness_seconds", 0.99),
            turn: Spread::of(&mut turns),
            turn_server_p99_ms: quantile_ms(before, after, "kotodama_turn_latency_seconds{part=\"server\"}", 0.99),
            barge_in_p99_ms: quantile_ms(before, after, "kotodama_barge_in_latency_seconds", 0.99),
            cpu_percent,
            rss_mb,
            cpu_percent_per_session: cpu_percent.map(|c| c / n),
            rss_mb_per_session: match (rss_mb, idle_mb) {
                (Some(r), Some(i)) => Some((r - i).max(0.0) / n),
                _ => None,
            },
            generator_cpu_percent: gen_cpu,
            generator_cpu_percent_per_session: gen_cpu.map(|c| c / n),
        }
    }

    /// The table header.
    pub fn header() -> String {
        format!(
            "{:>8} {:>8} {:>5} {:>15} {:>15} {:>15} {:>9} {:>15} {:>9} {:>9} {:>7} {:>8} {:>7} {:>7} {:>7}",
            "sessions",
            "packets",
            "lost",
            "late p50/p99",
            "up p50/p99",
            "down p50/p99",
            "pace p99",
            "turn p50/p99",
            "srv p99",
            "barge99",
            "cpu%",
            "rss MB",
            "cpu%/s",
            "MB/s",
            "gen%/s"
        )
    }

    /// One table row.
    pub fn row(&self) -> String {
        let o = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
        format!(
            "{:>8} {:>8} {:>5} {:>15} {:>15} {:>15} {:>9} {:>15} {:>9} {:>9} {:>7} {:>8} {:>7} {:>7} {:>7}",
            self.sessions,
            self.packets,
            self.lost,
            self.lateness.cell(2),
            self.uplink.map_or("-/-".to_owned(), |s| s.cell(2)),
            self.downlink.map_or("-/-".to_owned(), |s| s.cell(2)),
            o(self.pacing_p99_ms),
            self.turn.cell(0),
            o(self.turn_server_p99_ms),
            o(self.barge_in_p99_ms),
            o(self.cpu_percent),
            o(self.rss_mb),
            o(self.cpu_percent_per_session),
            o(self.rss_mb_per_session),
            o(self.generator_cpu_percent_per_session),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_bucket_deltas() {
        let before = ServerSample {
            histograms: parse_histograms(
                "x_bucket{le=\"0.001\"} 10\nx_bucket{le=\"0.002\"} 10\nx_bucket{le=\"+Inf\"} 10\n",
            ),
            ..Default::default()
        };
        let after = ServerSample {
            histograms: parse_histograms(
                "x_bucket{le=\"0.001\"} 60\nx_bucket{le=\"0.002\"} 110\nx_bucket{le=\"+Inf\"} 110\n",
            ),
            ..Default::default()
        };
        // 50 new in (0, 1 ms], 50 in (1, 2 ms]: the median is 1 ms, p99 is ~1.98 ms.
        assert!((quantile_ms(&before, &after, "x", 0.5).unwrap() - 1.0).abs() < 1e-9);
        assert!((quantile_ms(&before, &after, "x", 0.99).unwrap() - 1.98).abs() < 1e-9);
        assert_eq!(quantile_ms(&before, &before, "x", 0.5), None, "nothing observed");
    }

    #[test]
    fn labelled_series_keep_their_labels() {
        let h = parse_histograms("t_bucket{part=\"server\",le=\"0.01\"} 3\nt_bucket{part=\"model\",le=\"0.01\"} 1\n");
        assert_eq!(h["t{part=\"server\"}"], vec![(0.01, 3.0)]);
        assert_eq!(h["t{part=\"model\"}"], vec![(0.01, 1.0)]);
    }
}
