//! No per-frame heap allocation on the hot paths after warm-up, and a playout queue sized by the
//! audio it holds, checked with a counting global allocator (per thread, so parallel tests do not
//! interfere).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::*;
use media::pcm::{FRAME, PcmRef};
use media::{Playout, PlayoutConfig, Uplink, UplinkConfig, UplinkEvent};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
    /// The largest single allocation (bytes) since the last [`largest_allocation`].
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
    let _ = LARGEST.try_with(|c| c.set(c.get().max(size)));
}

// SAFETY: forwards to the system allocator; only adds a thread-local counter bump.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(Cell::get)
}

/// The largest allocation since the previous call, in bytes.
fn largest_allocation() -> usize {
    LARGEST.with(|c| c.replace(0))
}

#[test]
fn uplink_steady_state_does_not_allocate_even_with_loss_and_garbage() {
    let b = allocs();
    drop(std::hint::black_box(vec![1u8; 10]));
    assert_eq!(allocs(), b + 1, "the counting allocator must see allocations");
    let speech = user_question().samples;
    let packets = encode_packets(&speech, client_encoder());
    let garbage = vec![0xfcu8; 1 << 20];
    for rate in [24_000, 16_000, 48_000] {
        let mut up = Uplink::new(UplinkConfig { output_rate_hz: rate, ..UplinkConfig::default() }).expect("uplink");
        let mut sink = 0usize;
        let mut run = |up: &mut Uplink, range: std::ops::Range<usize>| {
            for i in range {
                if i % 9 == 4 {
                    continue; // loss -> PLC / FEC
                }
                let payload: &[u8] = if i % 31 == 0 {
                    &garbage
                } else if i % 37 == 0 {
                    &[]
                } else {
                    &packets[i]
                };
                up.push(FRAME * i as u32, rtp(i as u16, payload));
                while let Some(ev) = up.poll() {
                    if let UplinkEvent::Audio(a) = ev {
                        sink += a.samples.len();
                    }
                }
            }
        };
        run(&mut up, 0..40);
        let before = allocs();
        run(&mut up, 40..packets.len());
        let n = allocs() - before;
        assert_eq!(n, 0, "{rate} Hz: {n} allocations over {} packets", packets.len() - 40);
        assert!(up.stats().utterances >= 1 && sink > 0);
    }
}

#[test]
fn playout_steady_state_does_not_allocate() {
    let reply = agent_reply().samples;
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let mut buf = [0u8; 1500];
    let mut now = FRAME;
    let mut frames = 0;
    let mut step = |p: &mut Playout, chunk: &[i16], now: &mut std::time::Duration| {
        let mut rest = chunk;
        while !rest.is_empty() {
            let n = p.push("item", PcmRef::new(24_000, rest)).expect("push");
            rest = &rest[n..];
            *now += FRAME;
            if p.poll(*now, &mut buf).is_some() {
                frames += 1;
            }
        }
        *now += FRAME;
        if p.poll(*now, &mut buf).is_some() {
            frames += 1;
        }
    };
    let mut chunks = reply.chunks(480); // 20 ms deltas at 24 kHz
    for c in chunks.by_ref().take(10) {
        step(&mut p, c, &mut now);
    }
    let before = allocs();
    for c in chunks {
        step(&mut p, c, &mut now);
    }
    let n = allocs() - before;
    assert_eq!(n, 0, "{n} allocations while pushing and sending");
    assert!(frames > 300);
}

/// The playout queue is a ring whose head walks through all of its capacity, so every byte
/// reserved ends up resident. It starts small and grows with the audio a provider sends ahead
/// of the clock: a 10 s `max_buffered` is not reserved (960 KB) for every session up front.
#[test]
fn the_playout_queue_grows_with_the_audio_held_not_to_max_buffered() {
    const BYTES_PER_SECOND_48K: usize = 48_000 * 2;
    let reply = agent_reply().samples; // 24 kHz
    let _ = largest_allocation();
    let mut p = Playout::new(PlayoutConfig::default()).expect("playout");
    let at_start = largest_allocation();
    assert!(at_start <= BYTES_PER_SECOND_48K / 2, "{at_start} bytes reserved at start");

    // A provider faster than real time: the whole reply at once.
    let held = 48_000 * reply.len() / 24_000 * 2;
    assert_eq!(p.push("r1", PcmRef::new(24_000, &reply)).expect("push"), reply.len());
    let grown = largest_allocation();
    assert!(grown >= held && grown <= held * 3 / 2 + 9_600, "{grown} bytes for {held} bytes of audio held");

    // Played out in full, in order, from the grown ring.
    assert!(p.finish_item("r1"));
    let (mut buf, mut now, mut frames) = ([0u8; 1500], FRAME, 0usize);
    while p.buffered() > std::time::Duration::ZERO {
        if p.poll(now, &mut buf).is_some() {
            frames += 1;
        }
        now += FRAME;
    }
    assert_eq!(frames, reply.len().div_ceil(480));

    // Filled to max_buffered: never reserved beyond it (plus a few frames of headroom).
    let max = 10 * BYTES_PER_SECOND_48K;
    let long: Vec<i16> = reply.iter().copied().cycle().take(24_000 * 12).collect();
    let taken = p.push("r2", PcmRef::new(24_000, &long)).expect("push");
    assert!(taken < long.len(), "backpressure at max_buffered");
    let largest = largest_allocation();
    assert!(largest > max / 2 && largest <= max + 4 * 960 * 2, "{largest} bytes at max_buffered");
}
