// Reference formulas of the test guest's workload: the oracles and the input generator.
//
// Shared, byte for byte, between the host crate (`guest_tools::reference`) and the freestanding
// guest (`include!`d by `guest/main.rs`, where it classifies every `compute` result). Plain
// `core`-only Rust, no inner attributes or inner doc comments.
//
// These are deliberately *not* the guest's patchable functions (`compute`, `triangle`, `mix`,
// `next_state` in `guest/workload.rs`): those are separate compiled functions that a hot patch
// rewrites, while the oracles here are inlined into the guest's loop and must keep computing the
// original v1 and v2 formulas whatever is patched. `core::hint::black_box` on the inputs keeps
// the optimiser from proving an oracle equal to a patchable function and merging the two.
//
// The formulas:
//   triangle_v1(n) = n * (n - 1) / 2        (the "bug": off by one)
//   triangle_v2(n) = n * (n + 1) / 2        (the fix)
//   mix(x)         = the splitmix64 finalizer (a bijection on u64; identical in v1 and v2)
//   compute_v1(x)  = mix(triangle_v1(x) ^ rotl(x, 32))
//   compute_v2(x)  = mix(triangle_v2(clamp(x, INPUT_MIN, INPUT_MAX)) ^ rotl(x, 32) ^ V2_SALT)
//
// For every x in INPUT_MIN..=INPUT_MAX: triangle_v1(x) != triangle_v2(x) (they differ by x >= 1)
// and mix is a bijection, so compute_v1(x) != compute_v2(x). The salt makes a half-applied
// patch visible too: v2's compute with v1's triangle, or v1's compute with v2's triangle, give
// results that equal neither oracle (the guest counts them as `bad`).
//
// `mode=probe` calls the assembly function `probe` instead of `compute`, and `mode=spin` first
// calls `spin_wait` (both identical in v1 and v2; micropatch targets):
//   probe_v1(x)      = x * PROBE_FACTOR                   (wrapping; what `probe` returns)
//   probe_clamped(x) = min(x, PROBE_LIMIT) * PROBE_FACTOR (after the intended micropatch)
//   spin_wait(n)     = SPIN_TOKEN                         (after n `pause` iterations)
// PROBE_FACTOR is odd, so multiplying by it is a bijection: the two probe oracles differ exactly
// for the inputs above PROBE_LIMIT (about 90% of the generated ones).

/// Smallest input the workload generates.
pub const INPUT_MIN: u64 = 1;
/// Largest input the workload generates.
pub const INPUT_MAX: u64 = 1_000_000;
/// Constant v2's `compute` folds into its result.
pub const V2_SALT: u64 = 0x0000_0002_0000_0000;

/// The multiplier of `probe` (`mode=probe`): the value of the guest's `PROBE_FACTOR` static,
/// which `probe` loads RIP-relative. Odd, so multiplying by it is a bijection on u64.
pub const PROBE_FACTOR: u64 = 0x9e37_79b9_7f4a_7c15;
/// The bound the intended micropatch of `probe` enforces (`if x > PROBE_LIMIT { x = PROBE_LIMIT }`
/// before the load). About 90% of the generated inputs (uniform in `INPUT_MIN..=INPUT_MAX`) are
/// above it; for the others the clamp changes nothing.
pub const PROBE_LIMIT: u64 = 100_000;
/// What `spin_wait` returns (`mode=spin`): the value of the guest's `SPIN_TOKEN` static, which
/// `spin_wait` loads RIP-relative after its loop ("HPSPINOK").
pub const SPIN_TOKEN: u64 = 0x4850_5350_494e_4f4b;

/// What `mode=tamper` makes `compute` return once its overwrite lands: the word it writes over
/// `compute`'s first 8 bytes is `mov eax, TAMPER_RESULT; ret; int3; int3`.
pub const TAMPER_RESULT: u64 = 0x0bad_c0de;
/// The 8 bytes `mode=tamper` writes over the start of `compute` (little-endian).
pub const TAMPER_WORD: u64 = u64::from_le_bytes([0xb8, 0xde, 0xc0, 0xad, 0x0b, 0xc3, 0xcc, 0xcc]);

/// v1's `triangle`: `n * (n - 1) / 2` (off by one), wrapping.
#[inline(always)]
pub fn triangle_v1(n: u64) -> u64 {
    n.wrapping_mul(n.wrapping_sub(1)) / 2
}

/// v2's `triangle`: `n * (n + 1) / 2`, wrapping.
#[inline(always)]
pub fn triangle_v2(n: u64) -> u64 {
    n.wrapping_mul(n.wrapping_add(1)) / 2
}

/// `mix`, the same in v1 and v2: the splitmix64 finalizer (a bijection on u64).
#[inline(always)]
pub fn mix(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What `compute(x)` returns when the running `compute` is version `compute_version` (1 or 2)
/// and the running `triangle` is version `triangle_version` (1 or 2). Any other version number
/// is treated as 2.
#[inline(always)]
pub fn compute_with(x: u64, compute_version: u32, triangle_version: u32) -> u64 {
    let x = core::hint::black_box(x);
    let n = if compute_version == 1 {
        x
    } else {
        x.clamp(INPUT_MIN, INPUT_MAX)
    };
    let t = if triangle_version == 1 {
        triangle_v1(n)
    } else {
        triangle_v2(n)
    };
    let salt = if compute_version == 1 { 0 } else { V2_SALT };
    mix(t ^ x.rotate_left(32) ^ salt)
}

/// The v1 oracle: what v1's `compute(x)` returns.
#[inline(always)]
pub fn compute_v1(x: u64) -> u64 {
    let x = core::hint::black_box(x);
    mix(triangle_v1(x) ^ x.rotate_left(32))
}

/// The v2 oracle: what v2's `compute(x)` returns.
#[inline(always)]
pub fn compute_v2(x: u64) -> u64 {
    let x = core::hint::black_box(x);
    mix(triangle_v2(x.clamp(INPUT_MIN, INPUT_MAX)) ^ x.rotate_left(32) ^ V2_SALT)
}

/// How a `compute` result compares with the two oracles.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Equal to [`compute_v1`].
    V1,
    /// Equal to [`compute_v2`] (and not to v1).
    V2,
    /// Equal to neither.
    Bad,
}

/// Classifies `y = compute(x)` against the oracles, exactly as the guest does.
#[inline(always)]
pub fn classify(x: u64, y: u64) -> Verdict {
    if y == compute_v1(x) {
        Verdict::V1
    } else if y == compute_v2(x) {
        Verdict::V2
    } else {
        Verdict::Bad
    }
}

/// The probe oracle: what `probe(x)` returns as built (v1 and v2 alike).
#[inline(always)]
pub fn probe_v1(x: u64) -> u64 {
    core::hint::black_box(x).wrapping_mul(PROBE_FACTOR)
}

/// What `probe(x)` returns once micropatched to clamp its input to [`PROBE_LIMIT`].
#[inline(always)]
pub fn probe_clamped(x: u64) -> u64 {
    let x = core::hint::black_box(x);
    (if x > PROBE_LIMIT { PROBE_LIMIT } else { x }).wrapping_mul(PROBE_FACTOR)
}

/// Classifies `y = probe(x)` (`mode=probe`), exactly as the guest does: [`probe_v1`] is
/// [`Verdict::V1`], else [`probe_clamped`] is [`Verdict::V2`], else [`Verdict::Bad`]. (For
/// `x <= PROBE_LIMIT` both oracles agree, so such a result is always `V1`.)
#[inline(always)]
pub fn classify_probe(x: u64, y: u64) -> Verdict {
    if y == probe_v1(x) {
        Verdict::V1
    } else if y == probe_clamped(x) {
        Verdict::V2
    } else {
        Verdict::Bad
    }
}

/// The initial generator state of vCPU `cpu` (never 0: xorshift would stay at 0).
#[inline(always)]
pub fn seed_for_vcpu(cpu: u64) -> u64 {
    let s = 0x2545_f491_4f6c_dd1d ^ cpu.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    if s == 0 { 1 } else { s }
}

/// One xorshift64 step: the next generator state (`next_state` in the guest).
#[inline(always)]
pub fn next_state(s: u64) -> u64 {
    let mut s = s;
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    s
}

/// Maps a generator state to a workload input in `INPUT_MIN..=INPUT_MAX`.
#[inline(always)]
pub fn input_from_state(s: u64) -> u64 {
    INPUT_MIN + (s >> 11) % (INPUT_MAX - INPUT_MIN + 1)
}

/// The inputs vCPU `cpu` feeds to `compute`, in order: the guest's loop is
/// `s = next_state(s); x = input_from_state(s); y = compute(x)`, starting from
/// `s = seed_for_vcpu(cpu)`.
#[derive(Debug, Clone)]
pub struct Inputs {
    state: u64,
}

impl Inputs {
    /// The input sequence of vCPU `cpu`.
    pub fn for_vcpu(cpu: u64) -> Inputs {
        Inputs {
            state: seed_for_vcpu(cpu),
        }
    }
}

impl Iterator for Inputs {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        self.state = next_state(self.state);
        Some(input_from_state(self.state))
    }
}
