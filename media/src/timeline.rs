//! Events tied to positions in an agent item's audio, released as the playout sends that audio.
//!
//! A word of the transcript, a viseme or an emotion change belongs to a moment of the character's
//! speech. The provider usually produces them ahead of the audio; the session task puts each into
//! the [`Timeline`] with its offset in the item's audio and, every time the playout sends a frame,
//! takes out what that frame reached. So an event leaves with the frame it belongs to: never more
//! than one frame late, and early by at most the configured lead. Clearing an item (barge-in) drops
//! its events: text the user never heard is never sent.
//!
//! Sans-IO: positions are the playout's item offsets, not clocks.

use std::collections::VecDeque;
use std::time::Duration;

/// Most events held per timeline; beyond this the oldest are released at once (counted), so a
/// misbehaving provider cannot grow memory without bound.
pub const MAX_PENDING: usize = 4096;

/// One pending event.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry<T> {
    item_id: String,
    at: Duration,
    seq: u64,
    event: T,
}

/// Events waiting for their audio.
#[derive(Debug, Clone)]
pub struct Timeline<T> {
    pending: VecDeque<Entry<T>>,
    lead: Duration,
    seq: u64,
    overflowed: u64,
}

impl<T> Timeline<T> {
    /// A timeline that releases events up to `lead` before their audio is sent.
    pub fn new(lead: Duration) -> Self {
        Self { pending: VecDeque::new(), lead, seq: 0, overflowed: 0 }
    }

    /// Hold `event` until the playout sends `item_id`'s audio at `at`. Events of one item keep
    /// their order when their offsets tie.
    pub fn push(&mut self, item_id: &str, at: Duration, event: T) -> Option<T> {
        let overflow = if self.pending.len() >= MAX_PENDING {
            self.overflowed += 1;
            self.pending.pop_front().map(|e| e.event)
        } else {
            None
        };
        self.seq += 1;
        let entry = Entry { item_id: item_id.to_owned(), at, seq: self.seq, event };
        // Keep sorted by (at, seq) within the queue; new events are usually last.
        let pos =
            self.pending.iter().rposition(|e| e.item_id != entry.item_id || e.at <= entry.at).map_or(0, |p| p + 1);
        self.pending.insert(pos, entry);
        overflow
    }

    /// The playout just sent the frame of `item_id` that starts at `offset` and lasts `frame`:
    /// take every event of that item at or before `offset + frame + lead`, in order, and every
    /// event of items before it (an item that was skipped or ended).
    pub fn release(&mut self, item_id: &str, offset: Duration, frame: Duration, out: &mut Vec<T>) {
        let horizon = offset + frame + self.lead;
        let mut i = 0;
        while i < self.pending.len() {
            let e = &self.pending[i];
            let due = if e.item_id == item_id { e.at < horizon } else { !self.is_later_item(item_id, &e.item_id) };
            if due {
                if let Some(e) = self.pending.remove(i) {
                    out.push(e.event);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Whether `other` was pushed only after events of `current` (so it plays later).
    fn is_later_item(&self, current: &str, other: &str) -> bool {
        let first_current = self.pending.iter().position(|e| e.item_id == current);
        let first_other = self.pending.iter().position(|e| e.item_id == other);
        match (first_current, first_other) {
            (Some(c), Some(o)) => o > c,
            // Nothing left of the current item: an item still pending is the next one.
            (None, Some(_)) => true,
            _ => false,
        }
    }

    /// Everything still pending for `item_id` (the item's audio was fully sent): in order.
    pub fn flush_item(&mut self, item_id: &str, out: &mut Vec<T>) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].item_id == item_id {
                if let Some(e) = self.pending.remove(i) {
                    out.push(e.event);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Drop everything pending for `item_id` (barge-in); returns how many were dropped.
    pub fn drop_item(&mut self, item_id: &str) -> usize {
        let before = self.pending.len();
        self.pending.retain(|e| e.item_id != item_id);
        before - self.pending.len()
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Events released early because the timeline was full.
    pub fn overflowed(&self) -> u64 {
        self.overflowed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    const F: Duration = Duration::from_millis(20);

    #[test]
    fn events_leave_with_the_frame_that_reaches_them() {
        let mut t = Timeline::new(Duration::ZERO);
        for (i, at) in [0u64, 35, 40, 100, 1000].iter().enumerate() {
            t.push("a", ms(*at), i);
        }
        let mut out = Vec::new();
        t.release("a", ms(0), F, &mut out);
        assert_eq!(out, vec![0], "frame [0,20) carries the event at 0");
        out.clear();
        t.release("a", ms(20), F, &mut out);
        assert_eq!(out, vec![1], "frame [20,40) carries 35 but not 40");
        out.clear();
        t.release("a", ms(40), F, &mut out);
        assert_eq!(out, vec![2]);
        out.clear();
        t.release("a", ms(80), F, &mut out);
        assert!(out.is_empty(), "100 ms is in a later frame");
        t.release("a", ms(100), F, &mut out);
        assert_eq!(out, vec![3]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn lead_releases_early_by_at_most_the_lead() {
        let mut t = Timeline::new(ms(60));
        t.push("a", ms(70), 'x');
        t.push("a", ms(90), 'y');
        let mut out = Vec::new();
        t.release("a", ms(0), F, &mut out);
        assert_eq!(out, vec!['x'], "70 < 0 + 20 + 60");
        out.clear();
        t.release("a", ms(20), F, &mut out);
        assert_eq!(out, vec!['y']);
    }

    #[test]
    fn out_of_order_pushes_come_out_in_time_order_and_ties_keep_push_order() {
        let mut t = Timeline::new(Duration::ZERO);
        t.push("a", ms(50), "late");
        t.push("a", ms(10), "early");
        t.push("a", ms(10), "early-2");
        let mut out = Vec::new();
        t.release("a", ms(60), F, &mut out);
        assert_eq!(out, vec!["early", "early-2", "late"]);
    }

    #[test]
    fn a_cut_item_loses_its_events_and_the_next_item_is_not_released_early() {
        let mut t = Timeline::new(Duration::ZERO);
        t.push("a", ms(500), 1);
        t.push("b", ms(0), 2);
        t.push("b", ms(300), 3);
        assert_eq!(t.drop_item("a"), 1);
        let mut out = Vec::new();
        t.release("b", ms(0), F, &mut out);
        assert_eq!(out, vec![2]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn events_of_an_earlier_item_are_released_when_a_later_item_plays() {
        let mut t = Timeline::new(Duration::ZERO);
        t.push("a", ms(5000), 1);
        t.push("b", ms(0), 2);
        t.push("b", ms(500), 3);
        let mut out = Vec::new();
        t.release("b", ms(0), F, &mut out);
        assert_eq!(out, vec![1, 2], "item a is over: its stragglers go first");
    }

    #[test]
    fn flush_item_releases_the_rest_in_order() {
        let mut t = Timeline::new(Duration::ZERO);
        t.push("a", ms(900), 2);
        t.push("a", ms(800), 1);
        t.push("b", ms(0), 3);
        let mut out = Vec::new();
        t.flush_item("a", &mut out);
        assert_eq!(out, vec![1, 2]);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn the_queue_is_bounded() {
        let mut t = Timeline::new(Duration::ZERO);
        for i in 0..MAX_PENDING + 10 {
            t.push("a", ms(i as u64), i);
        }
        assert_eq!(t.len(), MAX_PENDING);
        assert_eq!(t.overflowed(), 10);
    }
}
