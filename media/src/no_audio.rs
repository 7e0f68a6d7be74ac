//! "Connected but no audio": a session whose peer is connected but whose uplink has delivered no
//! RTP for [`NoAudioWatch::limit`] is deaf (a sender that never started, a new SSRC the stack
//! dropped, a muted track that sends nothing). The watch turns the uplink's last arrival into one
//! alarm per silent stretch and one recovery when audio comes back, so the session can log it,
//! count it and tell the client. Sans-IO: times are media time since session start.

use std::time::Duration;

/// A change the caller reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoAudio {
    /// No audio since `since` (the last packet, or the connection when none came yet).
    Started {
        /// Start of the silent stretch.
        since: Duration,
    },
    /// Audio arrived again after an alarm.
    Recovered,
}

/// The watch; see the module docs.
#[derive(Debug, Clone)]
pub struct NoAudioWatch {
    limit: Duration,
    connected_at: Option<Duration>,
    alarmed: bool,
}

impl NoAudioWatch {
    /// A watch that alarms after `limit` without audio while connected.
    pub fn new(limit: Duration) -> Self {
        Self { limit, connected_at: None, alarmed: false }
    }

    /// The silence that raises the alarm.
    pub fn limit(&self) -> Duration {
        self.limit
    }

    /// The peer connected at `now` (the watch starts counting).
    pub fn connected(&mut self, now: Duration) {
        self.connected_at.get_or_insert(now);
    }

    /// Check at `now`, given the arrival time of the last RTP packet (`None`: none yet).
    pub fn check(&mut self, now: Duration, last_arrival: Option<Duration>) -> Option<NoAudio> {
        let connected = self.connected_at?;
        let since = last_arrival.map_or(connected, |t| t.max(connected));
        let silent = now.saturating_sub(since) >= self.limit;
        match (silent, self.alarmed) {
            (true, false) => {
                self.alarmed = true;
                Some(NoAudio::Started { since })
            }
            (false, true) => {
                self.alarmed = false;
                Some(NoAudio::Recovered)
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn alarms_once_per_silent_stretch_and_recovers() {
        let mut w = NoAudioWatch::new(S(5));
        assert_eq!(w.check(S(30), None), None, "not connected: nothing to say");
        w.connected(S(1));
        assert_eq!(w.check(S(5), None), None);
        assert_eq!(w.check(S(6), None), Some(NoAudio::Started { since: S(1) }), "never any audio");
        assert_eq!(w.check(S(7), None), None, "once");
        assert_eq!(w.check(S(8), Some(S(8))), Some(NoAudio::Recovered));
        assert_eq!(w.check(S(12), Some(S(8))), None);
        assert_eq!(w.check(S(13), Some(S(8))), Some(NoAudio::Started { since: S(8) }), "audio stopped");
    }
}
