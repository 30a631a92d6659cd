// The workload: ordinary compiled functions (real prologues, frame pointers on) called in a
// tight loop, every result checked against two independent oracles, a report per batch.
//
// The patchable functions are `compute`, `triangle` and `mix`, in that order in the binary (link.ld), then
// `next_input`, which is identical in v1 and v2 but moves because v2's `compute` is longer.
// v2 is the "fix": `triangle` loses its off-by-one and `compute` clamps its input.
//
// `mode=probe` calls the assembly `probe` instead of `compute`; `mode=spin` first calls the
// assembly `spin_wait` once. Both come right after `next_input` and are the same in v1 and v2:
// they are targets for micropatches at fixed offsets.

use core::sync::atomic::{AtomicBool, Ordering};

use crate::cmdline::{Mode, Options};
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

// The micropatch targets of `mode=probe` and `mode=spin`: hand-written so that their bytes, and
// so the offsets a micropatch names, are fixed (docs/guest-protocol.md has the layout). The same
// source in v1 and v2, so identical bytes; link.ld puts them right after `next_input`.
//
// probe(x) = x * PROBE_FACTOR (wrapping), the factor loaded RIP-relative from a static:
//   +0 push rbp | +1 mov rbp, rsp | +4 mov rax, [rip + PROBE_FACTOR] | +11 imul rax, rdi
//   +15 pop rbp | +16 ret                                            (17 bytes)
// spin_wait(n) = SPIN_TOKEN after n `pause`s; the loop's head (+7) lies in the bytes a patch at
// +4 displaces:
//   +0 push rbp | +1 mov rbp, rsp | +4 mov rax, rdi | +7 pause | +9 dec rax | +12 jnz +7
//   +14 mov rax, [rip + SPIN_TOKEN] | +21 pop rbp | +22 ret          (23 bytes)
core::arch::global_asm!(
    r#"
    .pushsection .text.probe, "ax", @progbits
    .p2align 4
    .globl probe
    .type probe, @function
probe:
    push rbp
    mov rbp, rsp
    mov rax, qword ptr [rip + {probe_factor}]
    imul rax, rdi
    pop rbp
    ret
    .size probe, . - probe
    .popsection

    .pushsection .text.spin_wait, "ax", @progbits
    .p2align 4
    .globl spin_wait
    .type spin_wait, @function
spin_wait:
    push rbp
    mov rbp, rsp
    mov rax, rdi
2:
    pause
    dec rax
    jnz 2b
    mov rax, qword ptr [rip + {spin_token}]
    pop rbp
    ret
    .size spin_wait, . - spin_wait
    .popsection

    .pushsection .text.tamper_store, "ax", @progbits
    .p2align 4
    .globl tamper_store
    .type tamper_store, @function
tamper_store:
    mov qword ptr [rdi], rsi
    ret
    .size tamper_store, . - tamper_store
    .popsection
"#,
    probe_factor = sym PROBE_FACTOR,
    spin_token = sym SPIN_TOKEN,
);

// SAFETY: `probe` and `spin_wait` above follow the SysV ABI (argument in rdi, result in rax,
// only rax and the flags clobbered, the stack balanced), read only their immutable statics and
// access nothing else, so calling them is safe for any argument (`spin_wait(0)` would only spin
// for 2^64 iterations; the command line refuses `spin=0`).
unsafe extern "C" {
    /// `x * PROBE_FACTOR` (wrapping).
    pub safe fn probe(x: u64) -> u64;
    /// Executes `pause` `iterations` times, then returns `SPIN_TOKEN`.
    pub safe fn spin_wait(iterations: u64) -> u64;
    /// `*dst = value` with one 8-byte store, `mov [rdi], rsi`, at the symbol's first byte (so a
    /// hypervisor that traps the write can be checked to name this address).
    fn tamper_store(dst: *mut u64, value: u64);
}

/// `probe`'s multiplier, loaded by `probe` at run time (a micropatch may redirect the load).
#[unsafe(no_mangle)]
pub static PROBE_FACTOR: u64 = reference::PROBE_FACTOR;

/// What `spin_wait` returns, loaded by it at run time after its loop.
#[unsafe(no_mangle)]
pub static SPIN_TOKEN: u64 = reference::SPIN_TOKEN;

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

/// Results so far.
#[derive(Default)]
struct Counts {
    calls: u64,
    v1: u64,
    v2: u64,
    bad: u64,
}

/// Where `mode=spam` claims its reports are: above the 4 GiB-limited RAM of any test VM.
const SPAM_REPORT_GPA: u32 = 0xffff_f000;

/// Runs the workload of `opts.mode` until `opts.reports` reports were made (forever when 0).
pub fn run(cpu: u64, opts: &Options) {
    let mut counts = Counts::default();
    match opts.mode {
        Mode::Normal | Mode::Spam => {}
        Mode::Probe => {
            let probe_fn: extern "C" fn(u64) -> u64 = core::hint::black_box(probe);
            return work(cpu, opts, probe_fn, reference::classify_probe, counts);
        }
        Mode::Tamper => {
            let target = compute as *const () as u64;
            let mut line = Line::new();
            line.str("hp: vcpu=")
                .u64(cpu)
                .str(" tamper target=")
                .u64(target)
                .str(" rip=")
                .u64(tamper_store as *const () as u64)
                .str(" word=")
                .u64(reference::TAMPER_WORD)
                .str(" writes=")
                .u64(opts.writes);
            line.emit();
        }
        Mode::Spin => {
            let mut line = Line::new();
            line.str("hp: vcpu=").u64(cpu).str(" spin=").u64(opts.spin);
            line.emit();
            let spin_fn: extern "C" fn(u64) -> u64 = core::hint::black_box(spin_wait);
            if spin_fn(opts.spin) != reference::SPIN_TOKEN {
                // One bad call, so that v1 + v2 + bad = calls still holds.
                counts.calls += 1;
                counts.bad += 1;
            }
        }
    }
    let compute_fn: extern "C" fn(u64) -> u64 = core::hint::black_box(compute);
    work(cpu, opts, compute_fn, reference::classify, counts)
}

/// Calls `f` on the generated inputs, classifying each result with `classify`, and reports
/// every `opts.batch` calls.
#[inline(always)]
fn work(
    cpu: u64,
    opts: &Options,
    f: extern "C" fn(u64) -> u64,
    classify: impl Fn(u64, u64) -> reference::Verdict,
    counts: Counts,
) {
    let Counts {
        mut calls,
        mut v1,
        mut v2,
        mut bad,
    } = counts;
    let mut state = reference::seed_for_vcpu(cpu);
    let (mut x, mut y) = (0u64, 0u64);
    let mut seq = 0u64;
    let slot = SLOTS[cpu as usize % protocol::MAX_CPUS].0.get();
    let tamper_writes = if opts.mode == Mode::Tamper { opts.writes } else { 0 };
    let tamper_target = compute as *const () as *mut u64;
    let spam_reports = if opts.mode == Mode::Spam { opts.writes } else { 0 };
    while !STOP.load(Ordering::Relaxed) {
        for _ in 0..spam_reports {
            // A report "at" an address far outside RAM: the host must count it invalid and
            // neither crash nor flood its log.
            outl(protocol::REPORT_PORT, SPAM_REPORT_GPA);
        }
        for _ in 0..tamper_writes {
            // SAFETY: this is the attack `mode=tamper` exists for: the guest maps its text
            // writable, so the store is architecturally valid; where it lands (or not) is up to
            // the hypervisor. `compute`'s address is 16-byte aligned, so the 8 bytes stay inside
            // the function, and after a landed write `compute` is still a valid function
            // (`mov eax, imm32; ret`) following the same ABI.
            unsafe { tamper_store(tamper_target, reference::TAMPER_WORD) };
        }
        for _ in 0..opts.batch {
            x = next_input(&mut state);
            y = f(x);
            match classify(x, y) {
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
