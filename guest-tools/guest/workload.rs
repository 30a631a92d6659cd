// The workload: ordinary compiled functions (real prologues, frame pointers on) called in a
// tight loop, every result checked against two independent oracles, a report per batch.
//
// The patchable functions are `compute`, `triangle` and `mix`, in that order in the binary (link.ld), then
// `next_input`, which is identical in v1 and v2 but moves because v2's `compute` is longer.
// v2 is the "fix": `triangle` loses its off-by-one and `compute` clamps its input.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::cmdline::Options;
use crate::console::{outl, Line};
use crate::protocol::{self, Report};
use crate::reference;
#[cfg(guest_v2)]
use crate::reference::{INPUT_MAX, INPUT_MIN};

#[cfg(not(guest_v2))]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn compute(x: u64) -> u64 {
    mix(triangle(x) ^ x.rotate_left(32))
}

#[cfg(guest_v2)]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn compute(x: u64) -> u64 {
    let n = x.clamp(INPUT_MIN, INPUT_MAX);
    mix(triangle(n) ^ x.rotate_left(32) ^ reference::V2_SALT)
}

#[cfg(not(guest_v2))]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn triangle(n: u64) -> u64 {
    n.wrapping_mul(n.wrapping_sub(1)) / 2
}

#[cfg(guest_v2)]
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn triangle(n: u64) -> u64 {
    n.wrapping_mul(n.wrapping_add(1)) / 2
}

#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn mix(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Advances the per-vCPU input generator and returns the next input.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn next_input(state: &mut u64) -> u64 {
    *state = reference::next_state(*state);
    reference::input_from_state(*state)
}

/// Each vCPU's report record, read by the VMM through the report port.
#[repr(C, align(64))]
struct Slot(core::cell::UnsafeCell<Report>);
// SAFETY: slot i is written only by vCPU i (and read by the host while that vCPU is stopped in
// its `out`); no two guest threads share a slot.
unsafe impl Sync for Slot {}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Slot = Slot(core::cell::UnsafeCell::new(Report {
    magic: 0,
    version: 0,
    vcpu: 0,
    build: 0,
    flags: 0,
    seq: 0,
    calls: 0,
    v1: 0,
    v2: 0,
    bad: 0,
    last_input: 0,
    last_output: 0,
}));
static SLOTS: [Slot; protocol::MAX_CPUS] = [EMPTY; protocol::MAX_CPUS];

/// Set by nothing today; a future mode can stop all vCPUs early.
static STOP: AtomicBool = AtomicBool::new(false);

/// Runs until `opts.reports` reports were made (forever when 0).
pub fn run(cpu: u64, opts: &Options) {
    let compute_fn: extern "C" fn(u64) -> u64 = core::hint::black_box(compute);
    let mut state = reference::seed_for_vcpu(cpu);
    let (mut calls, mut v1, mut v2, mut bad) = (0u64, 0u64, 0u64, 0u64);
    let (mut x, mut y) = (0u64, 0u64);
    let mut seq = 0u64;
    let slot = SLOTS[cpu as usize % protocol::MAX_CPUS].0.get();
    while !STOP.load(Ordering::Relaxed) {
        for _ in 0..opts.batch {
            x = next_input(&mut state);
            y = compute_fn(x);
            match reference::classify(x, y) {
                reference::Verdict::V1 => v1 += 1,
                reference::Verdict::V2 => v2 += 1,
                reference::Verdict::Bad => bad += 1,
            }
        }
        calls += opts.batch;
        seq += 1;
        let mut line = Line::new();
        line.str("hp: vcpu=")
            .u64(cpu)
            .str(" seq=")
            .u64(seq)
            .str(" calls=")
            .u64(calls)
            .str(" v1=")
            .u64(v1)
            .str(" v2=")
            .u64(v2)
            .str(" bad=")
            .u64(bad)
            .str(" x=")
            .u64(x)
            .str(" y=")
            .u64(y);
        line.emit();
        let last = opts.reports != 0 && seq >= opts.reports;
        let report = Report {
            magic: protocol::REPORT_MAGIC,
            version: protocol::PROTOCOL_VERSION,
            vcpu: cpu as u16,
            build: crate::build(),
            flags: if last { protocol::REPORT_FLAG_FINAL } else { 0 },
            seq,
            calls,
            v1,
            v2,
            bad,
            last_input: x,
            last_output: y,
        };
        // SAFETY: this vCPU's own slot (see `Slot`); a volatile write so the record is in memory
        // before the `out` that tells the host to read it.
        unsafe { core::ptr::write_volatile(slot, report) };
        outl(protocol::REPORT_PORT, slot as u64 as u32);
        if last {
            return;
        }
    }
}
