//! The downlink: agent speech (PCM at any rate, per item) -> queue at the encoder's input rate
//! -> one Opus frame every 20 ms against the caller's clock.
//!
//! The queue runs at [`EncoderConfig::input_rate_hz`] (48 kHz by default). PCM pushed at that
//! rate goes in as is; any other rate is resampled to it. A session whose provider speaks at
//! 24 kHz encodes at 24 kHz: no resampler, half the queue, and the same packets on the wire
//! (20 ms frames of the 48 kHz RTP clock, RFC 7587 §4.1; coded super-wideband, all a 24 kHz
//! source holds).
//!
//! # Run loop
//! ```text
//! on provider AudioDelta{item_id, pcm}:  n = playout.push(item_id, pcm)?;  keep pcm[n..] if n < len
//! on provider AudioDone{item_id}:        playout.finish_item(item_id)
//! timer at playout.next_due():           while let Some(f) = playout.poll(now, &mut buf) { send(&buf[..f.len]) }
//! ```
//! Audio is queued as PCM and encoded just in time in [`Playout::poll`], so [`Playout::clear`]
//! (barge-in) only drops samples and reports what was sent.
//!
//! # Pacing
//! Frames go out on a 20 ms grid anchored at the start of each talk spurt: the first frame of a
//! spurt goes out as soon as it is polled, frame `k` is due at `anchor + k x 20 ms`. A poll emits
//! at most one frame, never before its due time, and never less than
//! `20 ms - jitter_tolerance` of `now` after the previous frame (the default tolerance is 0:
//! two frames are always >= 20 ms of `now` apart, so there are no bursts). A frame polled a whole
//! frame or more after its due time is a stall: it is counted, and the grid is re-anchored at
//! `now`, so sending resumes at real-time rate instead of catching up. When the queue runs dry
//! and the next frame arrives a frame or more after its slot, a new talk spurt starts (counted as
//! an underrun if the item was still open).
//!
//! With a strict 0 ms tolerance and a timer that always fires late (tokio rounds sleeps up to the
//! next millisecond), the lateness of a spurt can only grow, so the grid slips by the timer's
//! lateness per frame until a re-anchor. `jitter_tolerance` of 1-2 ms lets the grid absorb that.
//!
//! # Backpressure
//! The queue holds at most [`PlayoutConfig::max_buffered`] (default 10 s) of audio. `push`
//! accepts what fits and returns how many input samples it took; the caller keeps the rest and
//! offers it again once frames have gone out ([`Playout::has_room_for`] says when). Providers
//! usually send faster than real time, so the session task must hold (not drop) the remainder
//! and stop reading provider audio while it holds some.
//!
//! Every 20 ms frame belongs to exactly one item: an item's tail is padded with silence to a
//! whole frame when it is finished (explicitly or by the next item's first push).
//!
//! # Silence (DTX)
//! Between talk spurts nothing is encoded: the pacing clock keeps running, so the next spurt's
//! RTP timestamps (`due` in 48 kHz units) jump by the pause. With [`PlayoutConfig::dtx`], each
//! spurt ends with one Opus DTX frame in the slot after its last frame (a slot later while an
//! open item waits for audio; the next slot after [`Playout::clear`]), repeated every
//! [`DTX_REFRESH`] of the pause (2.5 packets/s instead of 50): the TOC byte of the last frame with code 0 and no frame data (RFC 6716
//! §3.1; a frame of 0 bytes is a DTX frame, §3.2.1), 1 byte on the wire. Receivers then play
//! comfort noise instead of concealing a lost stream: libwebrtc's NetEq takes an Opus payload of
//! <= 2 bytes as DTX and counts no concealment for the pause that follows, which is also what
//! libwebrtc's own sender does (it sends the first DTX packet of a pause and nothing after it).

use std::collections::VecDeque;
use std::time::Duration;

use crate::MediaError;
use crate::codec::{EncoderConfig, OpusEncoder};
use crate::pcm::{FRAME, FRAME_SAMPLES, PcmRef, duration_to_samples, samples_to_duration};
use crate::resample::{Alignment, Resampler};

/// Frames later than this after their due time count as late.
pub const LATE_THRESHOLD: Duration = Duration::from_millis(5);

/// A pause repeats its DTX frame this often, as libopus' DTX does (one frame per 400 ms of
/// silence): libwebrtc's NetEq plays comfort noise after a DTX frame, but falls back to
/// concealment when none comes for about a second (measured in Chromium, see BENCHMARKS.md).
pub const DTX_REFRESH: Duration = Duration::from_millis(400);

/// How many recently cleared item ids are remembered so their stragglers are dropped.
const CLEARED_MEMORY: usize = 8;

/// Audio the queue holds before its first growth: 500 ms (48 KB at 48 kHz, 24 KB at 24 kHz).
/// A provider that streams at real time never needs more; one that sends a reply faster grows
/// it (see [`Playout::push`]).
const INITIAL_RING: Duration = Duration::from_millis(500);

/// Playout settings. Defaults: encoder defaults, 10 s queue, 0 ms jitter tolerance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlayoutConfig {
    /// Opus encoder settings. Its [`EncoderConfig::input_rate_hz`] is the queue's rate: set it
    /// to the rate the agent's audio comes at (when libopus takes it) to skip the resampler.
    pub encoder: EncoderConfig,
    /// Most agent audio held in the queue. Default 10 s.
    pub max_buffered: Duration,
    /// How much earlier than 20 ms after the previous frame a frame may go out to hold the
    /// grid (0..=5 ms). Default 0: strictly never two frames within 20 ms of `now`.
    pub jitter_tolerance: Duration,
    /// End each talk spurt with one 1-byte Opus DTX frame ([`OutFrame::dtx`]; see the module
    /// docs). Default false (the bare playout sends audio frames only); sessions turn it on.
    pub dtx: bool,
}

impl Default for PlayoutConfig {
    fn default() -> Self {
        Self {
            encoder: EncoderConfig::default(),
            max_buffered: Duration::from_secs(10),
            jitter_tolerance: Duration::ZERO,
            dtx: false,
        }
    }
}

/// One encoded 20 ms frame, written to the `out` buffer given to [`Playout::poll`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutFrame<'a> {
    /// Bytes of Opus written to `out`.
    pub len: usize,
    /// The item this frame belongs to.
    pub item_id: &'a str,
    /// Position of this frame in the item's audio.
    pub item_offset: Duration,
    /// When the frame was due (the pacing grid); `now - due` is its lateness.
    pub due: Duration,
    /// First frame of a talk spurt (set the RTP marker bit).
    pub talkspurt_start: bool,
    /// A 1-byte Opus DTX frame that ends a talk spurt ([`PlayoutConfig::dtx`]): no audio, no
    /// item (`item_id` is empty). Send it over RTP like any frame; a link that carries PCM
    /// skips it.
    pub dtx: bool,
}

/// What [`Playout::clear`] dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cleared {
    /// The item that was playing (or next to play).
    pub item_id: String,
    /// How much of it was sent: frames emitted x 20 ms.
    pub played: Duration,
}

/// Counters since the playout was built.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlayoutStats {
    /// Frames sent.
    pub frames_out: u64,
    /// Frames sent more than [`LATE_THRESHOLD`] after their due time (`next_due`).
    pub late_frames: u64,
    /// Frames sent a whole frame or more late (grid re-anchored, no catch-up).
    pub stalls: u64,
    /// Largest lateness (`now - due`) seen.
    pub max_lateness: Duration,
    /// How far the grid slipped because a frame polled late pushed the next one out by the
    /// minimum spacing (see `jitter_tolerance`): the send rate fell behind real time by this much.
    pub slip: Duration,
    /// Times the queue ran dry while an item was still open.
    pub underruns: u64,
    /// Audio dropped by `clear`.
    pub dropped: Duration,
    /// Input samples pushed for an already-cleared item and discarded.
    pub dropped_after_clear: u64,
    /// Frames libopus failed to encode (only with an `out` buffer that is too small).
    pub encode_errors: u64,
    /// Items started.
    pub items: u64,
    /// DTX frames sent (one per talk spurt with [`PlayoutConfig::dtx`]).
    pub dtx_frames: u64,
}

#[derive(Debug)]
struct Item {
    id: String,
    /// Samples of this item in the ring, not yet sent.
    queued: usize,
    /// Frames taken from the ring (sent or failed to encode).
    frames: u64,
    finished: bool,
}

impl Item {
    fn done(&self) -> bool {
        self.finished && self.queued == 0
    }
}

/// Downlink playout state; see the module docs.
pub struct Playout {
    cfg: PlayoutConfig,
    enc: OpusEncoder,
    rs: Option<Resampler>,
    /// The queue's (and encoder's input) sample rate, Hz.
    rate: u32,
    /// Samples of one 20 ms frame at `rate`.
    frame_samples: usize,
    /// Audio queued at `rate`.
    ring: VecDeque<i16>,
    max_samples: usize,
    /// The most the ring is ever grown to: `max_samples` plus headroom for padding and one
    /// resampler chunk beyond the accounting bound.
    max_ring: usize,
    items: VecDeque<Item>,
    cleared: VecDeque<String>,
    /// The frame being encoded: its first `frame_samples` (sized for the largest, 48 kHz).
    frame: [i16; FRAME_SAMPLES],
    in_spurt: bool,
    anchor: Duration,
    k: u32,
    last_emit: Option<Duration>,
    dry: bool,
    /// TOC byte of the last encoded frame (the DTX frame repeats its configuration).
    toc: Option<u8>,
    /// Slot of the DTX frame owed by a spurt that ended (sent unless a new spurt starts first).
    dtx_due: Option<Duration>,
    /// Slot of the next DTX refresh of the current pause.
    dtx_refresh: Option<Duration>,
    stats: PlayoutStats,
}

impl std::fmt::Debug for Playout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Playout")
            .field("cfg", &self.cfg)
            .field("buffered", &self.buffered())
            .field("items", &self.items)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Playout {
    /// Builds the encoder and a queue of [`INITIAL_RING`] at the encoder's input rate; the
    /// queue grows (by half, never past `max_buffered` plus a few frames) only when a push
    /// needs more.
    pub fn new(cfg: PlayoutConfig) -> Result<Self, MediaError> {
        if cfg.max_buffered < FRAME * 5 || cfg.max_buffered > Duration::from_secs(120) {
            return Err(MediaError::InvalidConfig { key: "playout.max_buffered", reason: "must be 100 ms ..= 120 s" });
        }
        if cfg.jitter_tolerance > Duration::from_millis(5) {
            return Err(MediaError::InvalidConfig { key: "playout.jitter_tolerance", reason: "must be 0 ..= 5 ms" });
        }
        // Validates the rate: one libopus encodes, so 20 ms is a whole number of samples.
        let enc = OpusEncoder::new(cfg.encoder)?;
        let rate = cfg.encoder.input_rate_hz;
        let frame_samples = cfg.encoder.frame_samples();
        let max_samples = duration_to_samples(cfg.max_buffered, rate) as usize;
        let max_ring = max_samples + 4 * frame_samples;
        // Not the whole `max_buffered` up front: a ring's head walks through all of its capacity,
        // so every page of a 10 s queue (960 KB at 48 kHz) ends up resident in every talking
        // session, although replies streamed at real time never hold more than a few frames.
        let initial = duration_to_samples(INITIAL_RING, rate) as usize;
        let ring = VecDeque::with_capacity(initial.min(max_ring));
        Ok(Self {
            enc,
            cfg,
            rs: None,
            rate,
            frame_samples,
            ring,
            max_samples,
            max_ring,
            items: VecDeque::with_capacity(8),
            cleared: VecDeque::with_capacity(CLEARED_MEMORY),
            frame: [0; FRAME_SAMPLES],
            in_spurt: false,
            anchor: Duration::ZERO,
            k: 0,
            last_emit: None,
            dry: false,
            toc: None,
            dtx_due: None,
            dtx_refresh: None,
            stats: PlayoutStats::default(),
        })
    }

    /// Queues `pcm` (any rate; resampled to the encoder's input rate unless it is that rate)
    /// as the continuation of item `item_id`.
    /// A new id finishes the previous item. Returns the number of input samples accepted:
    /// less than `pcm.samples.len()` when the queue is full, and the caller must offer the rest
    /// again later (backpressure). Pushes for an item removed by [`Playout::clear`] are
    /// accepted and discarded.
    pub fn push(&mut self, item_id: &str, pcm: PcmRef<'_>) -> Result<usize, MediaError> {
        if pcm.rate_hz == 0 || pcm.rate_hz > 384_000 {
            return Err(MediaError::InvalidConfig { key: "pcm.rate_hz", reason: "must be 1..=384000 Hz" });
        }
        if self.cleared.iter().any(|c| c == item_id) {
            self.stats.dropped_after_clear += pcm.samples.len() as u64;
            return Ok(pcm.samples.len());
        }
        self.pop_done();
        match self.items.back() {
            Some(b) if b.id == item_id && b.finished => {
                return Err(MediaError::ItemFinished { item_id: item_id.to_owned() });
            }
            Some(b) if b.id == item_id => {}
            _ => {
                self.finish_open_item();
                self.items.push_back(Item { id: item_id.to_owned(), queued: 0, frames: 0, finished: false });
                self.stats.items += 1;
                if let Some(rs) = self.rs.as_mut() {
                    rs.reset();
                }
            }
        }
        if self.rs.as_ref().is_none_or(|r| r.in_rate() != pcm.rate_hz) {
            // A rate change mid-item: flush what the old rate owes, then switch.
            self.flush_resampler();
            // At the queue's rate this is a passthrough (no delay, no copy beyond the queue's).
            self.rs = Some(Resampler::new(pcm.rate_hz, self.rate, Alignment::Trimmed)?);
        }
        let room_out = self.max_samples.saturating_sub(self.committed());
        // Input samples whose output fits, minus one for rounding.
        let room_in = ((room_out as u64 * u64::from(pcm.rate_hz)) / u64::from(self.rate)).saturating_sub(1) as usize;
        let take = pcm.samples.len().min(room_in);
        if take == 0 {
            return Ok(0);
        }
        self.reserve_for(take, pcm.rate_hz);
        let (Some(rs), Some(item)) = (self.rs.as_mut(), self.items.back_mut()) else {
            return Ok(0);
        };
        let ring = &mut self.ring;
        rs.process(&pcm.samples[..take], &mut |s: &[i16]| {
            ring.extend(s);
            item.queued += s.len();
        })?;
        Ok(take)
    }

    /// Ends item `item_id`: flushes the resampler tail and pads the last frame with silence.
    /// Returns false when `item_id` is not the open item (already finished, cleared, unknown).
    pub fn finish_item(&mut self, item_id: &str) -> bool {
        match self.items.back() {
            Some(b) if b.id == item_id && !b.finished => {
                self.finish_open_item();
                true
            }
            _ => false,
        }
    }

    /// When the next frame should be polled: `None` when nothing is ready to send. May be in
    /// the past (poll at once).
    pub fn next_due(&self) -> Option<Duration> {
        if !self.frame_ready() {
            if !self.cfg.dtx {
                return None;
            }
            // The end of the spurt (its DTX frame) or the owed DTX frame.
            return if self.in_spurt { Some(self.spurt_end()) } else { self.dtx_due.or(self.dtx_refresh) };
        }
        let earliest = self.earliest_after_last();
        if self.in_spurt { Some(self.spurt_due()) } else { Some(earliest) }
    }

    /// Emits at most one 20 ms frame into `out` if one is due at `now` (`out` of
    /// [`crate::codec::MAX_FRAME_BYTES`] always suffices). `now` is media time since the
    /// session start and must not go backwards.
    pub fn poll<'a>(&'a mut self, now: Duration, out: &mut [u8]) -> Option<OutFrame<'a>> {
        self.pop_done();
        if !self.frame_ready() {
            if self.in_spurt && now >= self.spurt_end() {
                // Nothing to send in this slot: the spurt ends here.
                if self.items.back().is_some_and(|i| !i.finished) {
                    self.stats.underruns += 1;
                }
                self.in_spurt = false;
                self.dtx_due = Some(self.spurt_due());
            }
            if !self.in_spurt && self.dtx_due.is_none() {
                self.dtx_due = self.dtx_refresh.take();
            }
            return match self.dtx_due {
                Some(due) if self.cfg.dtx && now >= due && now >= self.earliest_after_last() => self.emit_dtx(now, out),
                _ => None,
            };
        }
        if now < self.earliest_after_last() {
            return None;
        }
        // A new spurt replaces the DTX frame the previous one still owed, and ends the pause.
        self.dtx_due = None;
        self.dtx_refresh = None;
        let mut talkspurt_start = false;
        if self.in_spurt && self.dry && now >= self.spurt_due().saturating_add(FRAME) {
            // The queue ran dry and this frame came a slot or more too late: a new spurt.
            if self.items.front().is_some_and(|i| i.frames > 0) {
                self.stats.underruns += 1;
            }
            self.in_spurt = false;
        }
        let due = if self.in_spurt {
            let grid = self.grid_due();
            let due = self.spurt_due();
            if now < due {
                return None;
            }
            if due > grid {
                // Minimum spacing pushed this frame off the grid: the grid slips with it.
                self.stats.slip += due - grid;
                self.anchor += due - grid;
            }
            let late = now - due;
            self.stats.max_lateness = self.stats.max_lateness.max(late);
            if late > LATE_THRESHOLD {
                self.stats.late_frames += 1;
            }
            if late >= FRAME {
                // Stall: resume at real-time rate from now, no catch-up burst.
                self.stats.stalls += 1;
                self.anchor = now;
                self.k = 0;
            }
            due
        } else {
            talkspurt_start = true;
            self.in_spurt = true;
            self.anchor = now;
            self.k = 0;
            now
        };
        self.k = self.k.saturating_add(1);
        self.last_emit = Some(now);

        // Take the frame from the front item: `pop_done` + `frame_ready` put it at index 0
        // and guarantee it holds a whole frame at the front of the ring.
        let fs = self.frame_samples;
        let take = fs.min(self.ring.len());
        let (a, b) = self.ring.as_slices();
        let from_a = take.min(a.len());
        self.frame[..from_a].copy_from_slice(&a[..from_a]);
        self.frame[from_a..take].copy_from_slice(&b[..take - from_a]);
        self.ring.drain(..take);
        let enc = self.enc.encode(&self.frame[..fs], out);
        if let Ok(len) = enc
            && len > 0
        {
            self.toc = out.first().copied();
        }
        let (item_offset, ok) = match self.items.front_mut() {
            Some(item) => {
                item.queued = item.queued.saturating_sub(fs);
                let offset = FRAME * item.frames as u32;
                item.frames += 1;
                (offset, true)
            }
            None => (Duration::ZERO, false),
        };
        self.dry = !self.frame_ready();
        match enc {
            Ok(len) if ok => {
                self.stats.frames_out += 1;
                let item_id = self.items.front().map_or("", |i| i.id.as_str());
                Some(OutFrame { len, item_id, item_offset, due, talkspurt_start, dtx: false })
            }
            _ => {
                self.stats.encode_errors += 1;
                None
            }
        }
    }

    /// Drops everything queued (barge-in). Returns the current item and how much of it was
    /// sent, or `None` when nothing was playing or queued. Later pushes for the dropped items
    /// are discarded; the next item starts a new talk spurt on a fresh encoder.
    pub fn clear(&mut self) -> Option<Cleared> {
        self.pop_done();
        let dropped = samples_to_duration(self.ring.len() as u64, self.rate);
        self.stats.dropped += dropped;
        self.ring.clear();
        if let Some(rs) = self.rs.as_mut() {
            rs.reset();
        }
        if self.in_spurt {
            // The cut spurt ends with its DTX frame in the next slot.
            self.dtx_due = Some(self.spurt_due());
        }
        self.in_spurt = false;
        self.dry = false;
        let mut current = None;
        for item in self.items.drain(..) {
            if current.is_none() {
                current = Some(Cleared { played: FRAME * item.frames as u32, item_id: item.id.clone() });
            }
            if self.cleared.len() == CLEARED_MEMORY {
                self.cleared.pop_front();
            }
            self.cleared.push_back(item.id);
        }
        if current.is_some() {
            self.enc.reset();
        }
        current
    }

    /// Agent audio queued, or an item still open (more audio expected).
    pub fn is_active(&self) -> bool {
        self.items.iter().any(|i| !i.done())
    }

    /// Whether `dur` more audio fits in the queue now.
    pub fn has_room_for(&self, dur: Duration) -> bool {
        self.committed() + duration_to_samples(dur, self.rate) as usize <= self.max_samples
    }

    /// Audio queued (not counting the resampler's few ms in flight).
    pub fn buffered(&self) -> Duration {
        samples_to_duration(self.ring.len() as u64, self.rate)
    }

    /// The queue's sample rate, Hz: the encoder's input rate ([`EncoderConfig::input_rate_hz`]).
    pub fn rate_hz(&self) -> u32 {
        self.rate
    }

    /// The item currently playing (or next to play) and how much of it was sent.
    pub fn current_item(&self) -> Option<(&str, Duration)> {
        self.items.iter().find(|i| !i.done()).map(|i| (i.id.as_str(), FRAME * i.frames as u32))
    }

    /// Expected downlink loss (percent, from the client's RTCP receiver reports): with FEC
    /// enabled in the encoder config, LBRR is coded while this is above zero.
    pub fn set_expected_loss(&mut self, pct: u8) -> Result<(), MediaError> {
        Ok(self.enc.set_expected_loss(pct)?)
    }

    /// Counters.
    pub fn stats(&self) -> PlayoutStats {
        self.stats
    }

    fn grid_due(&self) -> Duration {
        self.anchor.saturating_add(FRAME * self.k)
    }

    /// Due time of the next frame of the current spurt: the grid, unless the minimum spacing
    /// after the previous frame is later.
    fn spurt_due(&self) -> Duration {
        self.grid_due().max(self.earliest_after_last())
    }

    /// When a spurt whose queue ran dry ends: at its next slot; with DTX, a slot later while its
    /// item is open (audio arriving within that slot continues the spurt, no DTX frame).
    fn spurt_end(&self) -> Duration {
        let due = self.spurt_due();
        let open = self.items.back().is_some_and(|i| !i.finished);
        if self.cfg.dtx && open { due.saturating_add(FRAME) } else { due }
    }

    /// Writes the owed DTX frame (the last frame's TOC byte with code 0: one frame of 0 bytes,
    /// RFC 6716 §3.1/§3.2.1) into `out`, due in its slot.
    fn emit_dtx<'a>(&'a mut self, now: Duration, out: &mut [u8]) -> Option<OutFrame<'a>> {
        let due = self.dtx_due.take()?;
        let (Some(toc), Some(first)) = (self.toc, out.first_mut()) else { return None };
        *first = toc & 0xFC;
        self.last_emit = Some(now);
        self.stats.dtx_frames += 1;
        self.dtx_refresh = Some(due.saturating_add(DTX_REFRESH));
        Some(OutFrame { len: 1, item_id: "", item_offset: Duration::ZERO, due, talkspurt_start: false, dtx: true })
    }

    fn earliest_after_last(&self) -> Duration {
        self.last_emit.map_or(Duration::ZERO, |t| t.saturating_add(FRAME - self.cfg.jitter_tolerance))
    }

    /// Grows the ring, before `input` samples at `rate_hz` are resampled into it, to hold what
    /// is committed plus their output (and what a later flush and padding add): by at least half
    /// its capacity (a few growths per session, amortised over pushes, never in `poll`; doubling
    /// would reserve up to twice the audio held), at most `max_ring`.
    fn reserve_for(&mut self, input: usize, rate_hz: u32) {
        let out = (input as u64 * u64::from(self.rate)).div_ceil(u64::from(rate_hz.max(1))) as usize;
        let chunk = self.rs.as_ref().map_or(0, Resampler::chunk_out);
        let needed = (self.committed() + out + chunk).min(self.max_ring);
        let cap = self.ring.capacity();
        if needed > cap {
            let target = needed.max(cap.saturating_add(cap / 2)).min(self.max_ring);
            self.ring.reserve_exact(target - self.ring.len());
        }
    }

    /// Samples queued plus samples the resampler still owes, plus one frame of padding.
    fn committed(&self) -> usize {
        let owed = self.rs.as_ref().map_or(0, |r| r.owed_output() as usize + r.chunk_out());
        self.ring.len() + owed + self.frame_samples
    }

    fn frame_ready(&self) -> bool {
        for item in &self.items {
            if item.queued >= self.frame_samples {
                return true;
            }
            if !item.done() {
                return false;
            }
        }
        false
    }

    fn pop_done(&mut self) {
        while self.items.front().is_some_and(Item::done) {
            self.items.pop_front();
        }
    }

    fn flush_resampler(&mut self) {
        let (Some(rs), Some(item)) = (self.rs.as_mut(), self.items.back_mut()) else {
            return;
        };
        if item.finished {
            return;
        }
        let ring = &mut self.ring;
        // Sizes are fixed at construction; on the impossible error we lose a tail of a few ms.
        let _ = rs.flush(&mut |s: &[i16]| {
            ring.extend(s);
            item.queued += s.len();
        });
    }

    fn finish_open_item(&mut self) {
        if self.items.back().is_none_or(|i| i.finished) {
            return;
        }
        self.flush_resampler();
        if let Some(item) = self.items.back_mut() {
            let fs = self.frame_samples;
            let pad = (fs - item.queued % fs) % fs;
            self.ring.extend(std::iter::repeat_n(0i16, pad));
            item.queued += pad;
            item.finished = true;
        }
    }
}
