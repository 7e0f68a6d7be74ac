//! A small adaptive reorder window for the uplink's RTP packets, before decode.
//!
//! Packets are released in sequence order. The next expected packet passes at once (an in-order
//! stream is never delayed); a packet that arrives after a gap is held until the missing ones
//! arrive or until the gap has waited [`ReorderWindow::hold`], then the missing ones are given
//! up (the uplink conceals them). The hold adapts to the path: it grows to the waits that
//! recovered a packet (or that would have: a packet that arrives after its gap was given up
//! raises it) and decays slowly back towards [`MIN_HOLD`] on clean stretches, never above the
//! configured maximum. The window has [`SLOTS`] slots of [`MAX_PAYLOAD`] bytes, allocated once,
//! and never overflows: a gap with half the window queued behind it (a burst after a stall) is
//! given up at once, and a packet [`SLOTS`] or more ahead of the next expected one (a long loss)
//! drops what is held before it (counted as lost by the caller's sequence accounting). A jump of
//! [`crate::uplink::MAX_DROPOUT`] or more is a new stream.
//!
//! Sans-IO: `now` is the arrival time (media time since session start); [`ReorderWindow::deadline`]
//! says when a held gap must be given up if nothing else arrives.

use std::time::Duration;

/// Slots of the window (a power of two): 16 x 20 ms = 320 ms of audio.
pub const SLOTS: usize = 16;
/// Largest RTP payload kept (an Ethernet MTU); a larger one is kept as an empty payload (the
/// uplink counts it as a decode error and conceals it).
pub const MAX_PAYLOAD: usize = 1500;
/// The hold never decays below this (one 20 ms frame).
pub const MIN_HOLD: Duration = Duration::from_millis(20);
/// The hold a new stream starts with (two frames).
pub const INITIAL_HOLD: Duration = Duration::from_millis(40);

/// One packet in a slot.
struct Slot {
    used: bool,
    audio: bool,
    seq: u16,
    timestamp: u32,
    arrival: Duration,
    len: usize,
    data: [u8; MAX_PAYLOAD],
}

/// A packet released in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Released<'a> {
    /// Sequence numbers given up just before this packet (0 when it is the next one).
    pub missing: u16,
    /// Its sequence number.
    pub seq: u16,
    /// Its RTP timestamp (48 kHz for Opus).
    pub timestamp: u32,
    /// When it arrived.
    pub arrival: Duration,
    /// Its payload.
    pub payload: &'a [u8],
    /// False for a packet that only holds its sequence number (another payload type, e.g.
    /// telephone-event): not audio, and not a loss either.
    pub audio: bool,
}

/// What [`ReorderWindow::insert`] did with a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    /// Held (possibly released at once by the next `pop`).
    Held,
    /// Already released or given up (late) or already held (duplicate): dropped.
    LateOrDuplicate,
    /// A new stream (big jump): what was held of the old one was dropped; the caller resets.
    Restarted,
}

/// The reorder window; see the module docs.
pub struct ReorderWindow {
    slots: Box<[Slot]>,
    /// Next sequence number to release.
    next: Option<u16>,
    held: usize,
    hold: Duration,
    max_hold: Duration,
    /// When the last gap was given up (to measure how late a straggler was).
    gave_up_at: Option<Duration>,
    now: Duration,
    reordered: u64,
    /// Sequence numbers skipped by a forced advance, reported with the next release.
    skipped: u16,
}

impl std::fmt::Debug for ReorderWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReorderWindow")
            .field("next", &self.next)
            .field("held", &self.held)
            .field("hold", &self.hold)
            .finish_non_exhaustive()
    }
}

impl ReorderWindow {
    /// An empty window whose hold adapts up to `max_hold` (clamped to >= [`MIN_HOLD`]).
    pub fn new(max_hold: Duration) -> Self {
        let max_hold = max_hold.max(MIN_HOLD);
        let empty = || Slot {
            used: false,
            audio: false,
            seq: 0,
            timestamp: 0,
            arrival: Duration::ZERO,
            len: 0,
            data: [0; MAX_PAYLOAD],
        };
        let slots = (0..SLOTS).map(|_| empty()).collect::<Vec<_>>().into_boxed_slice();
        Self {
            slots,
            next: None,
            held: 0,
            hold: INITIAL_HOLD.min(max_hold),
            max_hold,
            gave_up_at: None,
            now: Duration::ZERO,
            reordered: 0,
            skipped: 0,
        }
    }

    /// The current hold: how long a gap waits for its packets.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    /// Packets that arrived after a successor and were put back in order.
    pub fn reordered(&self) -> u64 {
        self.reordered
    }

    /// Packets held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Advance the clock (arrival time or a timer) without a packet.
    pub fn set_now(&mut self, now: Duration) {
        self.now = self.now.max(now);
    }

    /// Take a packet that arrived at `now`; `audio: false` keeps only its place in the sequence.
    pub fn insert(&mut self, now: Duration, seq: u16, timestamp: u32, payload: &[u8], audio: bool) -> Inserted {
        self.set_now(now);
        let next = *self.next.get_or_insert(seq);
        let d = seq.wrapping_sub(next);
        let mut restarted = false;
        if d >= 0x8000 {
            let behind = 0u16.wrapping_sub(d);
            if behind <= crate::uplink::MAX_MISORDER {
                self.straggler();
                return Inserted::LateOrDuplicate;
            }
            restarted = true;
        } else if d >= crate::uplink::MAX_DROPOUT {
            restarted = true;
        }
        if restarted {
            self.clear();
            self.next = Some(seq);
        } else if usize::from(d) >= SLOTS {
            // Too far ahead: give up the oldest gaps so the window keeps its size.
            let first_kept = seq.wrapping_sub(SLOTS as u16 - 1);
            self.skipped = self.skipped.saturating_add(first_kept.wrapping_sub(next));
            self.next = Some(first_kept);
            self.drop_before(first_kept);
        }
        let index = usize::from(seq) % SLOTS;
        if self.occupied(seq) {
            return Inserted::LateOrDuplicate;
        }
        if self.held > 0 && self.is_gap_filler(seq) {
            // It filled a gap: the path reorders by about this much.
            let waited = now.saturating_sub(self.first_held_arrival().unwrap_or(now));
            self.grow(waited);
            self.reordered += 1;
        }
        let len = if payload.len() > MAX_PAYLOAD { 0 } else { payload.len() };
        let slot = &mut self.slots[index];
        slot.used = true;
        slot.audio = audio;
        slot.seq = seq;
        slot.timestamp = timestamp;
        slot.arrival = now;
        slot.len = len;
        slot.data[..len].copy_from_slice(&payload[..len]);
        self.held += 1;
        if restarted { Inserted::Restarted } else { Inserted::Held }
    }

    /// The next packet that may be released at the current time, in order; `None` while the next
    /// one is missing and its gap has not waited the hold yet.
    pub fn pop(&mut self) -> Option<Released<'_>> {
        let next = self.next?;
        if self.held == 0 {
            return None;
        }
        let mut missing = 0u16;
        let index = if self.occupied(next) {
            usize::from(next) % SLOTS
        } else {
            let first = self.first_held_arrival()?;
            // Half the window behind one gap (a burst after a stall) gives the gap up at once.
            if self.now < first + self.hold && self.held < SLOTS / 2 {
                return None;
            }
            // Give the gap up: release the next held packet after it.
            let (offset, index) = (1..SLOTS as u16).find_map(|k| {
                let s = next.wrapping_add(k);
                self.occupied(s).then_some((k, usize::from(s) % SLOTS))
            })?;
            missing = offset;
            self.gave_up_at = Some(self.now);
            index
        };
        self.decay();
        missing = missing.saturating_add(std::mem::take(&mut self.skipped));
        let slot = &mut self.slots[index];
        self.next = Some(slot.seq.wrapping_add(1));
        self.held -= 1;
        // Free the slot but keep its buffer (no allocation per packet).
        slot.used = false;
        let slot = &self.slots[index];
        Some(Released {
            missing,
            seq: slot.seq,
            timestamp: slot.timestamp,
            arrival: slot.arrival,
            payload: &slot.data[..slot.len],
            audio: slot.audio,
        })
    }

    /// When a held gap must be given up if nothing arrives before (`None`: nothing held back).
    pub fn deadline(&self) -> Option<Duration> {
        let next = self.next?;
        if self.held == 0 || self.occupied(next) {
            return None;
        }
        self.first_held_arrival().map(|t| t + self.hold)
    }

    /// Forget everything held (a new stream); the hold is kept (the path did not change).
    pub fn clear(&mut self) {
        for slot in self.slots.iter_mut() {
            slot.used = false;
        }
        self.held = 0;
        self.next = None;
        self.skipped = 0;
    }

    fn occupied(&self, seq: u16) -> bool {
        let slot = &self.slots[usize::from(seq) % SLOTS];
        slot.used && slot.seq == seq
    }

    fn held_slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().filter(|s| s.used)
    }

    fn first_held_arrival(&self) -> Option<Duration> {
        self.held_slots().map(|s| s.arrival).min()
    }

    /// `seq` is older than a held packet (it arrived after its successor).
    fn is_gap_filler(&self, seq: u16) -> bool {
        self.held_slots().any(|s| s.seq.wrapping_sub(seq) < 0x8000 && s.seq != seq)
    }

    fn drop_before(&mut self, first_kept: u16) {
        let mut dropped = 0;
        for slot in self.slots.iter_mut() {
            // Everything held lies within SLOTS of the old `next`, so "before" is unambiguous.
            if slot.used && slot.seq.wrapping_sub(first_kept) >= 0x8000 {
                slot.used = false;
                dropped += 1;
            }
        }
        self.held = self.held.saturating_sub(dropped);
    }

    /// A packet arrived after its gap was given up: the hold was too short by about its delay.
    fn straggler(&mut self) {
        if let Some(at) = self.gave_up_at {
            let needed = self.hold + self.now.saturating_sub(at);
            self.grow(needed);
        }
    }

    fn grow(&mut self, waited: Duration) {
        let wanted = waited.mul_f64(1.25) + Duration::from_millis(5);
        self.hold = self.hold.max(wanted).min(self.max_hold);
    }

    /// Back towards the minimum by 1/256 of the excess per released packet (about half in 3.5 s
    /// of 20 ms packets).
    fn decay(&mut self) {
        let excess = self.hold.saturating_sub(MIN_HOLD);
        self.hold -= excess / 256;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn drain(w: &mut ReorderWindow) -> Vec<(u16, u16)> {
        let mut out = Vec::new();
        while let Some(r) = w.pop() {
            out.push((r.seq, r.missing));
        }
        out
    }

    #[test]
    fn in_order_packets_pass_at_once() {
        let mut w = ReorderWindow::new(MS(100));
        for i in 0..40u16 {
            assert_eq!(w.insert(MS(20 * u64::from(i)), 65530u16.wrapping_add(i), 0, &[1], true), Inserted::Held);
            assert_eq!(drain(&mut w), vec![(65530u16.wrapping_add(i), 0)]);
        }
    }

    #[test]
    fn a_swapped_pair_is_put_back_in_order() {
        let mut w = ReorderWindow::new(MS(100));
        w.insert(MS(0), 10, 0, &[1], true);
        assert_eq!(drain(&mut w), vec![(10, 0)]);
        w.insert(MS(20), 12, 0, &[1], true);
        assert!(drain(&mut w).is_empty(), "12 waits for 11");
        assert_eq!(w.deadline(), Some(MS(20) + w.hold()));
        w.insert(MS(25), 11, 0, &[1], true);
        assert_eq!(drain(&mut w), vec![(11, 0), (12, 0)]);
    }

    #[test]
    fn a_lost_packet_is_given_up_after_the_hold() {
        let mut w = ReorderWindow::new(MS(100));
        w.insert(MS(0), 1, 0, &[1], true);
        drain(&mut w);
        w.insert(MS(40), 3, 0, &[1], true);
        assert!(drain(&mut w).is_empty());
        w.set_now(MS(40) + w.hold());
        assert_eq!(drain(&mut w), vec![(3, 1)]);
        // 2 arrives later still: late, and the hold grows.
        let before = w.hold();
        assert_eq!(w.insert(MS(120), 2, 0, &[1], true), Inserted::LateOrDuplicate);
        assert!(w.hold() > before);
        assert!(w.hold() <= MS(100));
    }

    #[test]
    fn a_burst_far_ahead_forces_old_gaps_out_instead_of_overflowing() {
        let mut w = ReorderWindow::new(MS(100));
        w.insert(MS(0), 0, 0, &[1], true);
        drain(&mut w);
        // 1 never comes; 2..=100 arrive in one burst (all at the same instant), each followed by
        // the caller's drain as the uplink does.
        let mut got = Vec::new();
        for s in 2..=100u16 {
            w.insert(MS(3000), s, 0, &[1], true);
            assert!(w.held() <= SLOTS / 2);
            got.extend(drain(&mut w));
        }
        let seqs: Vec<u16> = got.iter().map(|&(s, _)| s).collect();
        assert_eq!(seqs, (2..=100).collect::<Vec<_>>(), "every packet of the burst released, in order");
        assert_eq!(got[0].1, 1, "the one missing packet was given up");
    }

    #[test]
    fn a_huge_jump_restarts() {
        let mut w = ReorderWindow::new(MS(100));
        w.insert(MS(0), 100, 0, &[1], true);
        drain(&mut w);
        assert_eq!(w.insert(MS(20), 20_000, 0, &[1], true), Inserted::Restarted);
        assert_eq!(drain(&mut w), vec![(20_000, 0)]);
        assert_eq!(w.insert(MS(40), 20_000, 0, &[1], true), Inserted::LateOrDuplicate);
    }
}
