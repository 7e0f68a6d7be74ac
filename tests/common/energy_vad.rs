//! The fakes' turn detection: an energy VAD over 20 ms windows. 100 ms above the threshold starts
//! speech, 500 ms below it ends the turn (like a server VAD with a 500 ms silence setting).
#![allow(dead_code)]

/// What a chunk of audio changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VadEdge {
    /// The user started speaking.
    Started,
    /// The user's turn ended.
    Ended,
}

/// The detector, fed with audio at `rate_hz`.
#[derive(Debug)]
pub struct EnergyVad {
    window: usize,
    voiced_ms: u64,
    silent_ms: u64,
    in_speech: bool,
    carry: Vec<i16>,
}

impl EnergyVad {
    pub fn new(rate_hz: u32) -> Self {
        Self { window: (rate_hz / 50) as usize, voiced_ms: 0, silent_ms: 0, in_speech: false, carry: Vec::new() }
    }

    /// Feed samples; the edges they caused, in order.
    pub fn push(&mut self, samples: &[i16]) -> Vec<VadEdge> {
        let mut edges = Vec::new();
        self.carry.extend_from_slice(samples);
        while self.carry.len() >= self.window {
            let win: Vec<i16> = self.carry.drain(..self.window).collect();
            let rms = (win.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / win.len() as f64).sqrt();
            if rms > 800.0 {
                self.voiced_ms += 20;
                self.silent_ms = 0;
                if !self.in_speech && self.voiced_ms >= 100 {
                    self.in_speech = true;
                    edges.push(VadEdge::Started);
                }
            } else {
                self.silent_ms += 20;
                if self.silent_ms >= 100 {
                    self.voiced_ms = 0;
                }
                if self.in_speech && self.silent_ms >= 500 {
                    self.in_speech = false;
                    edges.push(VadEdge::Ended);
                }
            }
        }
        edges
    }
}
