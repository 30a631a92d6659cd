//! Benchmarks that need a live VM (run by `scripts/bench` through `vmm bench …`).
//!
//! They measure; they never assert timings. Correctness checks that come for free (progress,
//! no wrong results, no lost reports) are reported as failures, since a fast wrong answer is
//! worthless.

pub mod call_cost;
pub mod coverage;
pub mod integrity;
pub mod linux;
pub mod linux_vmm;
pub mod patch_l1;
pub mod qemu;
pub mod source_diff;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::{Decoder, DecoderOptions, FlowControl, OpKind};
use object::{Object, ObjectSegment};
use patch_format::{
    ImageInfo, ImageSymbol, Location, Metadata, Patch, PublicKey, SecretKey, Site, SiteKind,
};
use serde::Serialize;
use thiserror::Error;

use crate::sample;
use control_api::client::{ApiClient, ClientError};
use control_api::server::{ApiContext, ApiServer};
use guest_control::stats::{Summary, summarize};
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig, VmError};
use patch_engine::plan::{self, FunctionCode, SiteInput};
use patch_engine::shared::SharedEngine;
use patch_engine::{Engine, EngineConfig, EngineError};

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Patching(#[from] EngineError),
    #[error(transparent)]
    ApiServer(#[from] control_api::server::ApiError),
    #[error("building the benchmark's patches: {0}")]
    Setup(String),
    #[error("{op} failed in cycle {cycle}")]
    Engine {
        op: &'static str,
        cycle: usize,
        #[source]
        source: Box<EngineError>,
    },
    #[error("{op} through the API failed in cycle {cycle}: {message}")]
    Api {
        op: &'static str,
        cycle: usize,
        message: String,
    },
    #[error("the guest did not report from every vCPU within {0:?}; is it running?")]
    NoReports(Duration),
    #[error("pause/resume failed in cycle {cycle}: {message}")]
    Cycle { cycle: usize, message: String },
    #[error("cycle {cycle}: {message}")]
    Unexpected { cycle: usize, message: String },
    #[error("the guest misbehaved during the benchmark: {0}")]
    Guest(String),
    #[error("cannot create a temporary directory for the benchmark (check TMPDIR)")]
    TempDir(#[source] std::io::Error),
    #[error("round {round}, {mode}: the patched site {site} starts with {found}, not {expected}")]
    WrongJump {
        round: usize,
        mode: &'static str,
        site: String,
        expected: &'static str,
        found: String,
    },
}

/// One run of the pause/resume benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct PauseBench {
    pub vcpus: usize,
    pub cycles: usize,
    pub gap_us: u64,
    pub park_us: Summary,
    pub blackout_us: Summary,
    /// Sum over vCPUs of compute() calls per second, on the host clock, over the whole run.
    pub calls_per_sec: f64,
    pub calls_per_sec_per_vcpu: Vec<f64>,
}

fn wait_reports(vm: &Vm, at_least: &[u64], timeout: Duration) -> Result<(), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        let reports = vm.reports();
        if reports.iter().zip(at_least).all(|(r, min)| r.count > *min) {
            return Ok(());
        }
        if let Some(reason) = vm.stop_reason() {
            return Err(BenchError::Guest(reason.to_string()));
        }
        if Instant::now() >= deadline {
            return Err(BenchError::NoReports(timeout));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// `(when seen, seq, calls)` of vCPU 0's latest report, once it has one with `seq >= min_seq`.
/// Polled every 200 µs: over a window of seconds that is well under the 1% the call-rate
/// benchmarks resolve.
pub(crate) fn latest_report(
    vm: &Vm,
    min_seq: u64,
    timeout: Duration,
) -> Result<(Instant, u64, u64), BenchError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(r) = vm.reports().first().and_then(|r| r.last)
            && r.seq >= min_seq
        {
            return Ok((Instant::now(), r.seq, r.calls));
        }
        if let Some(reason) = vm.stop_reason() {
            return Err(BenchError::Guest(format!("the guest stopped: {reason}")));
        }
        if Instant::now() > deadline {
            return Err(BenchError::NoReports(timeout));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// vCPU 0's `compute` call rate over one window, from the guest's own reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CallRate {
    pub calls_per_s: f64,
    /// Calls counted between the two reports that bound the window.
    pub calls: u64,
    /// Host time between those two reports' arrivals.
    pub seconds: f64,
}

/// Calls per second over at least `window`, measured between two report arrivals, so whole
/// batches only: the batch running when this is called (a boot, a patch being applied) is not
/// counted.
pub(crate) fn rate(vm: &Vm, window: Duration) -> Result<CallRate, BenchError> {
    let timeout = Duration::from_secs(30);
    let (_, seq0, _) = latest_report(vm, 2, timeout)?;
    let (t0, seq0, calls0) = latest_report(vm, seq0 + 1, timeout)?;
    std::thread::sleep(window);
    let (_, seq1, _) = latest_report(vm, seq0 + 1, timeout)?;
    let (t1, _, calls1) = latest_report(vm, seq1 + 1, timeout)?;
    // The counts are the guest's word: a count that goes backwards is its fault, not a panic.
    let calls = calls1.checked_sub(calls0).ok_or_else(|| {
        BenchError::Guest(format!(
            "vCPU 0's call count went backwards ({calls0} → {calls1})"
        ))
    })?;
    let seconds = (t1 - t0).as_secs_f64();
    Ok(CallRate {
        calls_per_s: calls as f64 / seconds.max(1e-9),
        calls,
        seconds,
    })
}

/// Waits for every vCPU to report again after `before` (it still makes progress), stops the
/// VM and checks the guest's reports over the whole run: no wrong result, none lost or invalid.
fn finish(
    vm: &Vm,
    before: &[u64],
) -> Result<Vec<kvm_vmm::devices::reports::VcpuReports>, BenchError> {
    let reports = stop_after_progress(vm, before)?;
    check_reports(&reports)?;
    Ok(reports)
}

/// Waits for every vCPU to report again after `before`, then stops the VM; its last reports.
fn stop_after_progress(
    vm: &Vm,
    before: &[u64],
) -> Result<Vec<kvm_vmm::devices::reports::VcpuReports>, BenchError> {
    let progressed = wait_reports(vm, before, Duration::from_secs(30));
    let reports = vm.reports();
    vm.request_stop(kvm_vmm::devices::StopReason::Requested(
        "benchmark done".into(),
    ));
    vm.join();
    progressed?;
    Ok(reports)
}

/// No wrong result, no lost or invalid report, on any vCPU.
fn check_reports(reports: &[kvm_vmm::devices::reports::VcpuReports]) -> Result<(), BenchError> {
    for (id, r) in reports.iter().enumerate() {
        let bad = r.last.map(|l| l.bad).unwrap_or(0);
        if bad > 0 || r.seq_errors > 0 || r.invalid > 0 {
            return Err(BenchError::Guest(format!(
                "vCPU {id}: {bad} wrong results, {} report sequence errors, {} invalid reports",
                r.seq_errors, r.invalid
            )));
        }
    }
    Ok(())
}

/// Boots the built-in guest on `vcpus` vCPUs and runs `cycles` pause/resume cycles while it
/// works, `gap` apart.
pub fn pause_resume(vcpus: usize, cycles: usize, gap: Duration) -> Result<PauseBench, BenchError> {
    let mut config = VmConfig::builtin(vcpus, 128, "batch=1048576");
    config.console = ConsoleSink::Discard;
    let vm = Vm::start(config)?;
    let zero = vec![0u64; vcpus];
    wait_reports(&vm, &zero, Duration::from_secs(30))?;
    let before: Vec<u64> = vm.reports().iter().map(|r| r.count).collect();
    let mut park = Vec::with_capacity(cycles);
    let mut blackout = Vec::with_capacity(cycles);
    for cycle in 0..cycles {
        let (info, _) = vm.pause().map_err(|e| BenchError::Cycle {
            cycle,
            message: e.to_string(),
        })?;
        let resumed = vm.resume().map_err(|e| BenchError::Cycle {
            cycle,
            message: e.to_string(),
        })?;
        park.push(info.park_us);
        blackout.push(resumed.blackout_us);
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    }
    let reports = finish(&vm, &before)?;
    let per_vcpu: Vec<f64> = reports
        .iter()
        .map(|r| r.calls_per_sec.unwrap_or(0.0))
        .collect();
    Ok(PauseBench {
        vcpus,
        cycles,
        gap_us: gap.as_micros() as u64,
        park_us: summarize(&park),
        blackout_us: summarize(&blackout),
        calls_per_sec: per_vcpu.iter().sum(),
        calls_per_sec_per_vcpu: per_vcpu,
    })
}

/// The table `scripts/bench` prints.
pub fn pause_table(runs: &[PauseBench]) -> String {
    let mut out = String::new();
    out.push_str("pause/resume floor (µs; park = request → all vCPUs parked, blackout = all parked → all running)\n");
    out.push_str(&format!(
        "{:>5} {:>7} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>14}\n",
        "vcpus",
        "cycles",
        "park p50",
        "park p99",
        "park max",
        "blk p50",
        "blk p99",
        "blk max",
        "calls/s (sum)"
    ));
    for r in runs {
        out.push_str(&format!(
            "{:>5} {:>7} | {:>9} {:>9} {:>9} | {:>9} {:>9} {:>9} | {:>14.0}\n",
            r.vcpus,
            r.cycles,
            r.park_us.p50,
            r.park_us.p99,
            r.park_us.max,
            r.blackout_us.p50,
            r.blackout_us.p99,
            r.blackout_us.max,
            r.calls_per_sec
        ));
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The hot-patch benchmark (`vmm bench patch`): blackout of apply and revert against the
// pause/resume floor measured in the same run, the API's end-to-end latency, and a storm of
// apply/revert cycles the guest checks result by result.

/// Seed of the benchmark's signing key. Public (it is in the source): only the engines this
/// benchmark starts trust it.
const BENCH_KEY_SEED: [u8; 32] = *b"hvpatch bench key: not a secret!";
/// Creation time of the benchmark's patches: fixed, so their ids never change.
const BENCH_CREATED: u64 = 1_767_225_600;
/// Sites of the many-site patch.
pub const MANY_SITES: usize = 16;
/// The function the one-site patch replaces by a byte-identical copy of itself.
const ONE_SITE_FUNCTION: &str = "mix";
/// Functions the workload runs on every call, in the order the many-site patch takes sites
/// from them, round robin: every stub it installs runs millions of times a second.
const HOT_FUNCTIONS: [&str; 4] = ["compute", "triangle", "mix", "next_input"];
/// Where the workload's loop is (inlined): its sites come next if the hot functions are short
/// of them, those nearest a call of a hot function (the loops) first.
const LOOP_FUNCTION: &str = "guest_main";
/// What each site of the many-site patch inserts: a one-byte `nop`.
const NOP: u8 = 0x90;
/// The name the engine and the patches give the guest image (the identity check compares the
/// build id and the text hash, not the name).
const GUEST_NAME: &str = "built-in test guest";
/// A busy engine (a vCPU was in the way in each of its own retried blackouts) gets this many
/// more calls before the benchmark gives up.
const BUSY_CALLS: u32 = 20;
/// Targets the table checks (they are reported, never asserted).
pub const TARGET_BLACKOUT_RATIO: f64 = 1.1;
/// The engine's own work inside a blackout, at most this share of the floor (p50).
pub const TARGET_ENGINE_SHARE: f64 = 0.10;
pub const TARGET_API_P50_US: u64 = 2000;

/// A site of a benchmark patch, as the JSON shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BenchSite {
    pub location: String,
    pub gva: u64,
    pub len: usize,
    /// The bytes the site expects (the whole function, or the displaced instructions), hex.
    pub expected: String,
}

/// The signed patches the benchmark applies, and the key that signed them.
pub struct BenchPatches {
    pub key: PublicKey,
    /// `mix` replaced by a byte-identical copy of itself.
    pub one_site: Vec<u8>,
    pub one_site_sites: Vec<BenchSite>,
    /// [`MANY_SITES`] micropatches, each inserting a `nop` before whole instructions.
    pub many_sites: Vec<u8>,
    pub many_sites_sites: Vec<BenchSite>,
    /// The embedded v1 → v2 sample, re-signed with the bench key (same body, same id).
    pub sample: Vec<u8>,
}

fn setup(message: impl Into<String>) -> BenchError {
    BenchError::Setup(message.into())
}

/// The bytes of `[addr, addr + size)` from the ELF's file-backed segments.
fn image_bytes<'a>(elf: &object::File<'a>, addr: u64, size: u64) -> Option<&'a [u8]> {
    elf.segments()
        .find_map(|s| s.data_range(addr, size).ok().flatten())
}

/// Checks that code reaches nothing outside itself: no memory operand (only registers, and
/// its own stack through push/pop), no call, no branch out of `[start, start + len)`, nothing
/// indirect. A copy of such code anywhere computes the same function.
fn self_contained(name: &str, start: u64, bytes: &[u8]) -> Result<(), String> {
    let insns = plan::decode(bytes, start).map_err(|o| format!("{name}+{o:#x} does not decode"))?;
    let end = start + bytes.len() as u64;
    for i in &insns {
        let at = i.ip() - start;
        if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
            return Err(format!("{name}+{at:#x} has a memory operand"));
        }
        match i.flow_control() {
            FlowControl::Next | FlowControl::Return => {}
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
                if (start..end).contains(&i.near_branch_target()) => {}
            other => {
                return Err(format!(
                    "{name}+{at:#x} is a {other:?} that may leave the function"
                ));
            }
        }
    }
    Ok(())
}

/// The one sized function symbol named `name`.
fn unique_function<'a>(info: &'a ImageInfo, name: &str) -> Result<&'a ImageSymbol, BenchError> {
    let mut it = info.symbols.iter().filter(|s| s.name == name);
    match (it.next(), it.next()) {
        (Some(s), None) if s.function && s.size > 0 => Ok(s),
        _ => Err(setup(format!(
            "the v1 guest has no single sized function {name:?}"
        ))),
    }
}

fn bench_patch(info: &ImageInfo, name: &str, description: &str, mut sites: Vec<Site>) -> Patch {
    sites.sort_by(|a, b| a.target.cmp(&b.target));
    Patch {
        meta: Metadata {
            name: name.into(),
            description: description.into(),
            author: "vmm bench".into(),
            created: BENCH_CREATED,
            advisories: Vec::new(),
            replaces: Vec::new(),
        },
        target: info.identity.clone(),
        sites,
        data: Vec::new(),
    }
}

/// `mix` replaced by a copy of its own bytes: a real function replacement that changes no
/// result, whatever the guest computes while it is applied.
fn one_site_patch(
    elf: &object::File<'_>,
    info: &ImageInfo,
) -> Result<(Patch, Vec<BenchSite>), BenchError> {
    let sym = unique_function(info, ONE_SITE_FUNCTION)?;
    let bytes = image_bytes(elf, sym.addr, sym.size)
        .ok_or_else(|| setup(format!("{ONE_SITE_FUNCTION} has no bytes in the v1 ELF")))?;
    self_contained(ONE_SITE_FUNCTION, sym.addr, bytes).map_err(|e| {
        setup(format!(
            "the one-site patch runs a copy of {ONE_SITE_FUNCTION} from the arena, but {e}"
        ))
    })?;
    let site = Site {
        kind: SiteKind::Function,
        target: Location::Symbol {
            name: ONE_SITE_FUNCTION.into(),
            offset: 0,
        },
        expected: bytes.to_vec(),
        code: bytes.to_vec(),
        relocations: Vec::new(),
    };
    let shown = vec![BenchSite {
        location: ONE_SITE_FUNCTION.into(),
        gva: sym.addr,
        len: bytes.len(),
        expected: hex::encode(bytes),
    }];
    let patch = bench_patch(
        info,
        "bench-1-site",
        "Benchmark: mix() replaced by a byte-identical copy of itself (changes no result)",
        vec![site],
    );
    Ok((patch, shown))
}

/// Micropatch sites in function `sym` (bytes `bytes`): runs of whole instructions at least a
/// jump long that the planner accepts with the function's bytes supplied, and can build a
/// stub for, none overlapping, in address order. `(offset, expected bytes)`.
fn nop_sites(sym: &ImageSymbol, bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let arena = kvm_vmm::layout::PATCH_ARENA;
    let mut decoder = Decoder::with_ip(64, bytes, sym.addr, DecoderOptions::NONE);
    let mut insns = Vec::new();
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.is_invalid() {
            break;
        }
        insns.push(i);
    }
    let mut out = Vec::new();
    let mut first = 0;
    while first < insns.len() {
        let at = insns[first].ip();
        // The jump the engine will use (it decides the same way).
        let jump_len = if plan::rel32_reaches(at, arena.start)
            && plan::rel32_reaches(at, arena.start + arena.size)
        {
            plan::JMP_REL32_LEN
        } else {
            plan::JMP_ABS_LEN
        };
        let (mut next, mut len) = (first, 0usize);
        while next < insns.len() && len < jump_len {
            len += insns[next].len();
            next += 1;
        }
        let offset = (at - sym.addr) as usize;
        let Some(expected) = bytes.get(offset..offset + len).filter(|_| len >= jump_len) else {
            break;
        };
        let input = SiteInput {
            name: format!("{}+{offset:#x}", sym.name),
            kind: SiteKind::Micropatch,
            at,
            expected,
            current: expected,
            function: Some(FunctionCode {
                start: sym.addr,
                bytes,
            }),
        };
        let plannable = plan::analyze(&input, jump_len)
            .and_then(|a| plan::build(&a, &[NOP], arena.start, 0))
            .is_ok();
        if plannable {
            out.push((offset as u64, expected.to_vec()));
            first = next;
        } else {
            first += 1;
        }
    }
    out
}

/// Addresses of the direct calls in `bytes` (code at `start`) to any of `targets`.
fn calls_to(start: u64, bytes: &[u8], targets: &[u64]) -> Vec<u64> {
    let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    let mut out = Vec::new();
    while decoder.can_decode() {
        let i = decoder.decode();
        if i.is_invalid() {
            break;
        }
        if i.flow_control() == FlowControl::Call && targets.contains(&i.near_branch_target()) {
            out.push(i.ip());
        }
    }
    out
}

/// A candidate site: address, offset in its function, expected bytes, function name.
type Candidate = (u64, u64, Vec<u8>, String);

/// [`MANY_SITES`] one-`nop` micropatches at distinct, non-overlapping sites the planner
/// accepts: round robin from [`HOT_FUNCTIONS`], then, only if those are short of sites, from
/// the loop in [`LOOP_FUNCTION`], then from the image's other functions in address order.
fn many_site_patch(
    elf: &object::File<'_>,
    info: &ImageInfo,
) -> Result<(Patch, Vec<BenchSite>), BenchError> {
    let unique = |s: &&ImageSymbol| {
        s.function && s.size > 0 && info.symbols.iter().filter(|o| o.name == s.name).count() == 1
    };
    let named = |name: &str| info.symbols.iter().filter(unique).find(|s| s.name == name);
    let candidates = |sym: &ImageSymbol| -> Vec<Candidate> {
        image_bytes(elf, sym.addr, sym.size)
            .map(|bytes| nop_sites(sym, bytes))
            .unwrap_or_default()
            .into_iter()
            .map(|(off, b)| (sym.addr + off, off, b, sym.name.clone()))
            .collect()
    };
    let hot: Vec<Vec<Candidate>> = HOT_FUNCTIONS
        .iter()
        .filter_map(|name| named(name))
        .map(candidates)
        .collect();
    let mut picked: Vec<Candidate> = Vec::new();
    // Aliases (two names, one address) must not give the same bytes twice.
    let take = |c: &Candidate, picked: &mut Vec<Candidate>| {
        let (a, b) = (c.0, c.0 + c.2.len() as u64);
        let free = picked
            .iter()
            .all(|p| b <= p.0 || p.0 + p.2.len() as u64 <= a);
        if free && picked.len() < MANY_SITES {
            picked.push(c.clone());
        }
    };
    let rounds = hot.iter().map(Vec::len).max().unwrap_or(0);
    for round in 0..rounds {
        for list in &hot {
            if let Some(c) = list.get(round) {
                take(c, &mut picked);
            }
        }
    }
    if picked.len() < MANY_SITES
        && let Some(sym) = named(LOOP_FUNCTION)
    {
        let hot_addrs: Vec<u64> = HOT_FUNCTIONS
            .iter()
            .filter_map(|n| named(n))
            .map(|s| s.addr)
            .collect();
        let calls = image_bytes(elf, sym.addr, sym.size)
            .map(|b| calls_to(sym.addr, b, &hot_addrs))
            .unwrap_or_default();
        let mut list = candidates(sym);
        list.sort_by_key(|c| {
            calls
                .iter()
                .map(|&at| at.abs_diff(c.0))
                .min()
                .unwrap_or(u64::MAX)
        });
        for c in &list {
            take(c, &mut picked);
        }
    }
    if picked.len() < MANY_SITES {
        for sym in info
            .symbols
            .iter()
            .filter(unique)
            .filter(|s| s.name != LOOP_FUNCTION && !HOT_FUNCTIONS.contains(&s.name.as_str()))
        {
            for c in candidates(sym) {
                take(&c, &mut picked);
            }
            if picked.len() == MANY_SITES {
                break;
            }
        }
    }
    if picked.len() < MANY_SITES {
        return Err(setup(format!(
            "found only {} plannable micropatch sites in the v1 guest, {MANY_SITES} needed",
            picked.len()
        )));
    }
    picked.sort_by_key(|c| c.0);
    let shown = picked
        .iter()
        .map(|(gva, off, b, name)| BenchSite {
            location: format!("{name}+{off:#x}"),
            gva: *gva,
            len: b.len(),
            expected: hex::encode(b),
        })
        .collect();
    let sites = picked
        .into_iter()
        .map(|(_, offset, expected, name)| Site {
            kind: SiteKind::Micropatch,
            target: Location::Symbol { name, offset },
            expected,
            code: vec![NOP],
            relocations: Vec::new(),
        })
        .collect();
    let patch = bench_patch(
        info,
        "bench-16-sites",
        "Benchmark: a nop inserted at 16 sites of the functions the workload runs (changes no result)",
        sites,
    );
    Ok((patch, shown))
}

/// Builds and signs the benchmark's patches against the built-in guest (v1).
pub fn bench_patches() -> Result<BenchPatches, BenchError> {
    let v1 = guest_tools::test_guest(guest_tools::GuestBuild::V1);
    let info = patch_format::read_image(GUEST_NAME, v1).map_err(|e| setup(e.to_string()))?;
    let elf = object::File::parse(v1).map_err(|e| setup(format!("the v1 guest ELF: {e}")))?;
    let key = SecretKey::from_seed(&BENCH_KEY_SEED);
    let sign = |p: &Patch| {
        p.to_file_signed(&key)
            .map_err(|e| setup(format!("{}: {e}", p.meta.name)))
    };
    let (one, one_site_sites) = one_site_patch(&elf, &info)?;
    let (many, many_sites_sites) = many_site_patch(&elf, &info)?;
    Ok(BenchPatches {
        key: key.public(),
        one_site: sign(&one)?,
        one_site_sites,
        many_sites: sign(&many)?,
        many_sites_sites,
        sample: patch_format::sign_file(sample::SAMPLE_PATCH, &key)
            .map_err(|e| setup(format!("re-signing the sample patch: {e}")))?,
    })
}

/// Boots the built-in guest (workload running, `cpus=N`) and waits for a report from every
/// vCPU; the report counts then.
fn boot_guest(vcpus: usize) -> Result<(Arc<Vm>, Vec<u64>), BenchError> {
    let mut config = VmConfig::builtin(vcpus, 128, &format!("batch=1048576 cpus={vcpus}"));
    config.console = ConsoleSink::Discard;
    let vm = Vm::start(config)?;
    wait_reports(&vm, &vec![0u64; vcpus], Duration::from_secs(30))?;
    let counts = vm.reports().iter().map(|r| r.count).collect();
    Ok((vm, counts))
}

/// An engine for the benchmark's guest that trusts the bench key only.
fn bench_engine(vm: &Arc<Vm>, key: &PublicKey) -> Result<Engine<Vm>, BenchError> {
    bench_engine_with(vm, key, false)
}

/// [`bench_engine`], with [`EngineConfig::far_jumps`] as given: the call benchmark's far mode
/// needs the 14-byte jump on a guest whose arena `jmp rel32` reaches.
fn bench_engine_with(
    vm: &Arc<Vm>,
    key: &PublicKey,
    far_jumps: bool,
) -> Result<Engine<Vm>, BenchError> {
    Ok(sample::engine_for(
        vm.clone(),
        GUEST_NAME,
        guest_tools::test_guest(guest_tools::GuestBuild::V1),
        EngineConfig {
            trusted_keys: vec![key.clone()],
            far_jumps,
            ..Default::default()
        },
        None,
    )?)
}

/// One engine operation over a run.
#[derive(Debug, Clone, Serialize)]
pub struct OpBench {
    /// All vCPUs parked → all running, as the engine's patch record reports it (µs).
    pub blackout_us: Summary,
    /// The engine call, request → return (µs): parse, signature, plan, arena writes, blackout.
    pub call_us: Summary,
    /// Of the blackout, the engine's own work with every vCPU parked (µs): checks, writes,
    /// vCPU moves; the rest is the hypervisor's pause and resume.
    pub engine_us: Summary,
    /// The engine's work by phase, ns p50 each: re-check of the guest, scan of the parked
    /// vCPUs, writes and moves.
    pub phases_ns_p50: patch_engine::BlackoutPhases,
    /// Blackouts the engine retried inside a call because a vCPU was in the way (apply only:
    /// a revert does not report them).
    pub retried_blackouts: u64,
    /// Calls that gave up busy and were repeated by the benchmark.
    pub busy_calls: u64,
}

#[derive(Default)]
struct OpSamples {
    blackout: Vec<u64>,
    engine: Vec<u64>,
    phases: Vec<patch_engine::BlackoutPhases>,
    call: Vec<u64>,
    retried: u64,
    busy: u64,
}

impl OpSamples {
    fn with_capacity(n: usize) -> Self {
        OpSamples {
            blackout: Vec::with_capacity(n),
            engine: Vec::with_capacity(n),
            call: Vec::with_capacity(n),
            ..Default::default()
        }
    }
    fn bench(&self) -> OpBench {
        OpBench {
            blackout_us: summarize(&self.blackout),
            engine_us: summarize(&self.engine),
            phases_ns_p50: {
                let p50 = |f: fn(&patch_engine::BlackoutPhases) -> u64| {
                    let v: Vec<u64> = self.phases.iter().map(f).collect();
                    summarize(&v).p50
                };
                patch_engine::BlackoutPhases {
                    recheck_ns: p50(|p| p.recheck_ns),
                    scan_ns: p50(|p| p.scan_ns),
                    write_ns: p50(|p| p.write_ns),
                    threads: self.phases.iter().map(|p| p.threads).max().unwrap_or(0),
                }
            },
            call_us: summarize(&self.call),
            retried_blackouts: self.retried,
            busy_calls: self.busy,
        }
    }
}

/// Runs an engine call, repeating it while it answers busy; records its duration.
fn engine_call<T>(
    op: &'static str,
    cycle: usize,
    samples: &mut OpSamples,
    mut call: impl FnMut() -> Result<T, EngineError>,
) -> Result<T, BenchError> {
    let mut busy = 0;
    loop {
        let t0 = Instant::now();
        match call() {
            Ok(v) => {
                samples.call.push(t0.elapsed().as_micros() as u64);
                return Ok(v);
            }
            Err(EngineError::Busy { .. }) if busy < BUSY_CALLS => {
                busy += 1;
                samples.busy += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(source) => {
                return Err(BenchError::Engine {
                    op,
                    cycle,
                    source: Box::new(source),
                });
            }
        }
    }
}

/// Applies `file`; returns the patch id.
fn apply(
    engine: &SharedEngine<Vm>,
    file: &[u8],
    op: &'static str,
    cycle: usize,
    samples: &mut OpSamples,
) -> Result<String, BenchError> {
    let out = engine_call(op, cycle, samples, || engine.apply(file))?;
    let cycle_error = |message: String| BenchError::Unexpected { cycle, message };
    if out.already_applied {
        return Err(cycle_error(format!(
            "{op}: the patch was still applied (the previous revert did not take)"
        )));
    }
    let blackout = out
        .patch
        .apply_blackout_us
        .ok_or_else(|| cycle_error(format!("{op}: the patch record has no apply blackout")))?;
    samples.blackout.push(blackout);
    samples.engine.extend(engine.read().last_engine_us());
    samples.phases.extend(engine.read().last_phases());
    samples.retried += u64::from(out.attempts.saturating_sub(1));
    Ok(out.patch.id)
}

fn revert(
    engine: &SharedEngine<Vm>,
    id: &str,
    op: &'static str,
    cycle: usize,
    samples: &mut OpSamples,
) -> Result<(), BenchError> {
    let record = engine_call(op, cycle, samples, || engine.revert(id))?;
    let blackout = record
        .revert_blackout_us
        .ok_or_else(|| BenchError::Unexpected {
            cycle,
            message: format!("{op}: the patch record has no revert blackout"),
        })?;
    samples.blackout.push(blackout);
    samples.engine.extend(engine.read().last_engine_us());
    samples.phases.extend(engine.read().last_phases());
    Ok(())
}

/// One request through the API socket, repeated while the engine answers busy (503): the
/// JSON answer and the successful request's latency, request sent → response received (µs).
fn api_call(
    op: &'static str,
    cycle: usize,
    busy: &mut u64,
    mut request: impl FnMut() -> Result<serde_json::Value, ClientError>,
) -> Result<(serde_json::Value, u64), BenchError> {
    let mut tries = 0;
    loop {
        let t0 = Instant::now();
        match request() {
            Ok(v) => return Ok((v, t0.elapsed().as_micros() as u64)),
            Err(ClientError::Refused { status: 503, .. }) if tries < BUSY_CALLS => {
                tries += 1;
                *busy += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(BenchError::Api {
                    op,
                    cycle,
                    message: e.to_string(),
                });
            }
        }
    }
}

/// One vCPU count of the patch benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct PatchBench {
    pub vcpus: usize,
    pub cycles: usize,
    pub gap_us: u64,
    /// Plain pause + resume, one per cycle, interleaved with the patch operations: the floor.
    pub floor_park_us: Summary,
    pub floor_blackout_us: Summary,
    /// The one-site patch (`mix` replaced by a copy of itself), through the engine.
    pub apply_1: OpBench,
    pub revert_1: OpBench,
    /// The 16-site patch (a `nop` at each site), through the engine.
    pub apply_16: OpBench,
    pub revert_16: OpBench,
    /// Blackout p50 / floor blackout p50.
    pub apply_1_ratio: f64,
    pub revert_1_ratio: f64,
    pub apply_16_ratio: f64,
    pub revert_16_ratio: f64,
    /// The engine's work inside the blackout, p50 / floor blackout p50 (the largest of the four
    /// operations).
    pub engine_share: f64,
    /// The one-site patch through a real API server on a Unix socket and [`ApiClient`]:
    /// `POST /v1/patches` sent → response received (µs).
    pub api_apply_us: Summary,
    /// `POST /v1/patches/ID/revert` sent → response received (µs).
    pub api_revert_us: Summary,
    /// API requests answered busy (503) and repeated.
    pub api_busy: u64,
    /// Engine counters at the end of the run.
    pub engine_busy_retries: u64,
    pub moved_vcpus: u64,
    /// compute() calls per second, summed over vCPUs, over the whole run.
    pub calls_per_sec: f64,
}

fn ratio(x: &Summary, floor: &Summary) -> f64 {
    x.p50 as f64 / floor.p50.max(1) as f64
}

/// Boots the built-in guest on `vcpus` vCPUs and runs `cycles` cycles of: pause + resume (the
/// floor), apply + revert of the one-site patch, of the 16-site patch, and apply + revert of
/// the one-site patch through the API; `gap` of guest running after each operation.
pub fn patch_cycles(
    vcpus: usize,
    cycles: usize,
    gap: Duration,
    patches: &BenchPatches,
) -> Result<PatchBench, BenchError> {
    let (vm, before) = boot_guest(vcpus)?;
    let engine = Arc::new(SharedEngine::new(bench_engine(&vm, &patches.key)?));
    // The API socket of this run, in a fresh directory removed when the run ends.
    let socket_dir = tempfile::Builder::new()
        .prefix("vmm-bench-")
        .tempdir()
        .map_err(BenchError::TempDir)?;
    let socket = socket_dir.path().join(format!("api-{vcpus}.sock"));
    let server = ApiServer::start(
        &socket,
        ApiContext {
            vm: vm.clone(),
            engine: control_api::server::EngineSlot::ready(engine.clone()),
        },
    )?;
    let client = ApiClient::new(&socket);
    let pace = || {
        if !gap.is_zero() {
            std::thread::sleep(gap);
        }
    };
    let cycle_error = |cycle, e: kvm_vmm::vcpu::ControlError| BenchError::Cycle {
        cycle,
        message: e.to_string(),
    };
    let (mut floor_park, mut floor_blackout) =
        (Vec::with_capacity(cycles), Vec::with_capacity(cycles));
    let mut a1 = OpSamples::with_capacity(cycles);
    let mut r1 = OpSamples::with_capacity(cycles);
    let mut a16 = OpSamples::with_capacity(cycles);
    let mut r16 = OpSamples::with_capacity(cycles);
    let (mut api_apply, mut api_revert) = (Vec::with_capacity(cycles), Vec::with_capacity(cycles));
    let mut api_busy = 0;
    for cycle in 0..cycles {
        let (info, _) = vm.pause().map_err(|e| cycle_error(cycle, e))?;
        let resumed = vm.resume().map_err(|e| cycle_error(cycle, e))?;
        floor_park.push(info.park_us);
        floor_blackout.push(resumed.blackout_us);
        pace();

        let id = apply(&engine, &patches.one_site, "apply (1 site)", cycle, &mut a1)?;
        pace();
        revert(&engine, &id, "revert (1 site)", cycle, &mut r1)?;
        pace();
        let id = apply(
            &engine,
            &patches.many_sites,
            "apply (16 sites)",
            cycle,
            &mut a16,
        )?;
        pace();
        revert(&engine, &id, "revert (16 sites)", cycle, &mut r16)?;
        pace();

        let (answer, us) = api_call("apply", cycle, &mut api_busy, || {
            client.apply(&patches.one_site)
        })?;
        let id = match answer.pointer("/patch/id").and_then(|v| v.as_str()) {
            Some(id) if answer.get("already_applied") == Some(&false.into()) => id.to_string(),
            _ => {
                return Err(BenchError::Api {
                    op: "apply",
                    cycle,
                    message: format!("unexpected answer {answer}"),
                });
            }
        };
        api_apply.push(us);
        pace();
        let (answer, us) = api_call("revert", cycle, &mut api_busy, || client.revert(&id))?;
        if answer.get("state").and_then(|v| v.as_str()) != Some("reverted") {
            return Err(BenchError::Api {
                op: "revert",
                cycle,
                message: format!("unexpected answer {answer}"),
            });
        }
        api_revert.push(us);
        pace();
    }
    let metrics = engine.read().metrics();
    drop(server);
    let reports = finish(&vm, &before)?;
    let floor_blackout_us = summarize(&floor_blackout);
    let (apply_1, revert_1, apply_16, revert_16) =
        (a1.bench(), r1.bench(), a16.bench(), r16.bench());
    Ok(PatchBench {
        vcpus,
        cycles,
        gap_us: gap.as_micros() as u64,
        floor_park_us: summarize(&floor_park),
        apply_1_ratio: ratio(&apply_1.blackout_us, &floor_blackout_us),
        revert_1_ratio: ratio(&revert_1.blackout_us, &floor_blackout_us),
        apply_16_ratio: ratio(&apply_16.blackout_us, &floor_blackout_us),
        revert_16_ratio: ratio(&revert_16.blackout_us, &floor_blackout_us),
        engine_share: [&apply_1, &revert_1, &apply_16, &revert_16]
            .iter()
            .map(|o| ratio(&o.engine_us, &floor_blackout_us))
            .fold(0.0, f64::max),
        floor_blackout_us,
        apply_1,
        revert_1,
        apply_16,
        revert_16,
        api_apply_us: summarize(&api_apply),
        api_revert_us: summarize(&api_revert),
        api_busy,
        engine_busy_retries: metrics.busy_retries,
        moved_vcpus: metrics.moved_vcpus,
        calls_per_sec: reports.iter().filter_map(|r| r.calls_per_sec).sum(),
    })
}

/// The patch storm: apply/revert cycles of the v1 → v2 sample as fast as they go, the guest
/// checking every result.
#[derive(Debug, Clone, Serialize)]
pub struct StormBench {
    pub vcpus: usize,
    pub cycles: usize,
    pub patch: String,
    pub seconds: f64,
    /// Apply + revert pairs per second.
    pub cycles_per_sec: f64,
    pub apply: OpBench,
    pub revert: OpBench,
    /// Results the guest checked from just before the storm to just after it, summed over
    /// vCPUs, and what they matched: v1's formula, v2's.
    pub calls: u64,
    pub v1: u64,
    pub v2: u64,
    /// Results that matched neither, over the whole run. Must be 0.
    pub bad: u64,
    pub report_seq_errors: u64,
    pub invalid_reports: u64,
    pub engine_busy_retries: u64,
    pub moved_vcpus: u64,
}

/// Runs the storm: `cycles` apply/revert cycles of the sample patch on `vcpus` vCPUs.
pub fn patch_storm(
    vcpus: usize,
    cycles: usize,
    patches: &BenchPatches,
) -> Result<StormBench, BenchError> {
    let (vm, before) = boot_guest(vcpus)?;
    let engine = SharedEngine::new(bench_engine(&vm, &patches.key)?);
    let sums = |reports: &[kvm_vmm::devices::reports::VcpuReports]| {
        reports
            .iter()
            .filter_map(|r| r.last)
            .fold((0, 0, 0), |(c, a, b), l| (c + l.calls, a + l.v1, b + l.v2))
    };
    let start = sums(&vm.reports());
    let mut a = OpSamples::with_capacity(cycles);
    let mut r = OpSamples::with_capacity(cycles);
    let t0 = Instant::now();
    let mut note = t0 + Duration::from_secs(10);
    for cycle in 0..cycles {
        let id = apply(&engine, &patches.sample, "storm apply", cycle, &mut a)?;
        revert(&engine, &id, "storm revert", cycle, &mut r)?;
        if Instant::now() >= note {
            note += Duration::from_secs(10);
            eprintln!(
                "bench: storm {}/{cycles} cycles, {:.0} cycles/s",
                cycle + 1,
                (cycle + 1) as f64 / t0.elapsed().as_secs_f64()
            );
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    let metrics = engine.read().metrics();
    let reports = stop_after_progress(&vm, &before)?;
    let end = sums(&reports);
    Ok(StormBench {
        vcpus,
        cycles,
        patch: "test-guest-v2-fix (the v1 → v2 sample)".into(),
        seconds,
        cycles_per_sec: cycles as f64 / seconds.max(1e-9),
        apply: a.bench(),
        revert: r.bench(),
        calls: end.0 - start.0,
        v1: end.1 - start.1,
        v2: end.2 - start.2,
        bad: reports.iter().filter_map(|r| r.last).map(|l| l.bad).sum(),
        report_seq_errors: reports.iter().map(|r| r.seq_errors).sum(),
        invalid_reports: reports.iter().map(|r| r.invalid).sum(),
        engine_busy_retries: metrics.busy_retries,
        moved_vcpus: metrics.moved_vcpus,
    })
}

/// What the benchmark ran on.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub nproc: usize,
    pub cpu_model: Option<String>,
    pub kernel: Option<String>,
    pub loadavg_before: Option<String>,
    pub loadavg_after: Option<String>,
    pub optimized_build: bool,
}

/// `/proc/loadavg`'s three load averages.
pub fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

pub fn host_info() -> HostInfo {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).ok();
    HostInfo {
        nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cpu_model: read("/proc/cpuinfo").and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        }),
        kernel: read("/proc/sys/kernel/osrelease").map(|k| k.trim().to_string()),
        loadavg_before: loadavg(),
        loadavg_after: None,
        optimized_build: !cfg!(debug_assertions),
    }
}

/// The targets, per vCPU count: `true` = met.
#[derive(Debug, Clone, Serialize)]
pub struct RunTargets {
    pub vcpus: usize,
    pub apply_1_ratio: bool,
    pub apply_16_ratio: bool,
    pub revert_1_ratio: bool,
    pub revert_16_ratio: bool,
    pub engine_share: bool,
    pub api_apply_p50: bool,
    pub api_revert_p50: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Targets {
    /// Apply and revert blackout p50 at most this many times the floor's p50.
    pub apply_blackout_ratio_max: f64,
    /// The engine's in-blackout work p50 at most this share of the floor's p50.
    pub engine_share_max: f64,
    /// API end-to-end p50 below this (µs).
    pub api_e2e_p50_below_us: u64,
    pub runs: Vec<RunTargets>,
    /// The storm gave no wrong result (`None`: no storm ran).
    pub storm_no_bad_results: Option<bool>,
    pub all_met: bool,
}

pub fn targets(runs: &[PatchBench], storm: Option<&StormBench>) -> Targets {
    let runs: Vec<RunTargets> = runs
        .iter()
        .map(|r| RunTargets {
            vcpus: r.vcpus,
            apply_1_ratio: r.apply_1_ratio <= TARGET_BLACKOUT_RATIO,
            apply_16_ratio: r.apply_16_ratio <= TARGET_BLACKOUT_RATIO,
            revert_1_ratio: r.revert_1_ratio <= TARGET_BLACKOUT_RATIO,
            revert_16_ratio: r.revert_16_ratio <= TARGET_BLACKOUT_RATIO,
            engine_share: r.engine_share <= TARGET_ENGINE_SHARE,
            api_apply_p50: r.api_apply_us.p50 < TARGET_API_P50_US,
            api_revert_p50: r.api_revert_us.p50 < TARGET_API_P50_US,
        })
        .collect();
    let storm_no_bad_results = storm.map(|s| s.bad == 0);
    let all_met = runs.iter().all(|t| {
        t.apply_1_ratio
            && t.apply_16_ratio
            && t.revert_1_ratio
            && t.revert_16_ratio
            && t.engine_share
            && t.api_apply_p50
            && t.api_revert_p50
    }) && storm_no_bad_results != Some(false);
    Targets {
        apply_blackout_ratio_max: TARGET_BLACKOUT_RATIO,
        engine_share_max: TARGET_ENGINE_SHARE,
        api_e2e_p50_below_us: TARGET_API_P50_US,
        runs,
        storm_no_bad_results,
        all_met,
    }
}

/// Everything `vmm bench patch` measured (written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct PatchReport {
    pub benchmark: &'static str,
    pub host: HostInfo,
    pub one_site: Vec<BenchSite>,
    pub many_sites: Vec<BenchSite>,
    pub runs: Vec<PatchBench>,
    pub storm: Option<StormBench>,
    pub targets: Targets,
}

fn p50_p99(s: &Summary) -> String {
    format!("{}/{}", s.p50, s.p99)
}

fn pass(ok: bool) -> &'static str {
    if ok { "pass" } else { "FAIL" }
}

/// The table `scripts/bench` prints.
pub fn patch_table(report: &PatchReport) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "hot-patch blackout vs the pause/resume floor measured in the same run (µs p50/p99, all parked → all running;\n\
         ×floor = blackout p50 / floor p50, target apply and revert ≤ {TARGET_BLACKOUT_RATIO}×; eng = the engine's own work with the vCPUs parked,\n\
         µs p50, target ≤ {:.0}% of the floor; API = request sent → response received, target p50 < {TARGET_API_P50_US} µs)\n",
        TARGET_ENGINE_SHARE * 100.0
    ));
    out.push_str(&format!(
        "{:>5} | {:>9} | {:>25} | {:>25} | {:>25} | {:>25} | {:>12} | {:>12}\n",
        "vcpus",
        "floor",
        "apply 1-site ×floor eng",
        "revert 1-site ×floor eng",
        "apply 16-site ×floor eng",
        "revert 16-site ×floor eng",
        "API apply",
        "API revert"
    ));
    let op = |o: &OpBench, r: f64| {
        format!(
            "{:>11} {:>5.2}× {:>5}",
            p50_p99(&o.blackout_us),
            r,
            o.engine_us.p50
        )
    };
    for r in &report.runs {
        out.push_str(&format!(
            "{:>5} | {:>9} | {:>25} | {:>25} | {:>25} | {:>25} | {:>12} | {:>12}\n",
            r.vcpus,
            p50_p99(&r.floor_blackout_us),
            op(&r.apply_1, r.apply_1_ratio),
            op(&r.revert_1, r.revert_1_ratio),
            op(&r.apply_16, r.apply_16_ratio),
            op(&r.revert_16, r.revert_16_ratio),
            p50_p99(&r.api_apply_us),
            p50_p99(&r.api_revert_us),
        ));
    }
    out.push_str(
        "engine's blackout work by phase, ns p50: re-check (page tables, site bytes) / scan of \
         the parked vCPUs (RIPs, stack words) / writes and vCPU moves\n",
    );
    let phases = |o: &OpBench| {
        let p = &o.phases_ns_p50;
        format!("{}/{}/{}", p.recheck_ns, p.scan_ns, p.write_ns)
    };
    for r in &report.runs {
        out.push_str(&format!(
            "{:>5} | apply 1-site {} | revert 1-site {} | apply 16-site {} | revert 16-site {}\n",
            r.vcpus,
            phases(&r.apply_1),
            phases(&r.revert_1),
            phases(&r.apply_16),
            phases(&r.revert_16),
        ));
    }
    if let Some(s) = &report.storm {
        out.push_str(&format!(
            "patch storm: {} apply/revert cycles of the v1 → v2 sample on {} vCPUs in {:.1} s = {:.0} cycles/s; \
             guest checked {} results (v1 {}, v2 {}), bad {}; apply blackout p50/p99 {} µs, revert {} µs; \
             busy retries {}\n",
            s.cycles,
            s.vcpus,
            s.seconds,
            s.cycles_per_sec,
            s.calls,
            s.v1,
            s.v2,
            s.bad,
            p50_p99(&s.apply.blackout_us),
            p50_p99(&s.revert.blackout_us),
            s.engine_busy_retries,
        ));
    }
    let t = &report.targets;
    for r in &t.runs {
        out.push_str(&format!(
            "targets {} vCPU(s): ≤ {TARGET_BLACKOUT_RATIO}× apply 1-site {}, 16-site {}, revert 1-site {}, 16-site {}; engine ≤ {:.0}% of the floor {} (worst {:.0}%); API apply p50 < {TARGET_API_P50_US} µs {}, API revert p50 {}\n",
            r.vcpus,
            pass(r.apply_1_ratio),
            pass(r.apply_16_ratio),
            pass(r.revert_1_ratio),
            pass(r.revert_16_ratio),
            TARGET_ENGINE_SHARE * 100.0,
            pass(r.engine_share),
            report
                .runs
                .iter()
                .find(|x| x.vcpus == r.vcpus)
                .map_or(0.0, |x| x.engine_share * 100.0),
            pass(r.api_apply_p50),
            pass(r.api_revert_p50),
        ));
    }
    if let Some(ok) = t.storm_no_bad_results {
        out.push_str(&format!("targets storm: bad = 0 {}\n", pass(ok)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_patches_are_signed_harmless_and_distinct() {
        let p = bench_patches().expect("the benchmark's patches build");
        let trusted = [p.key.clone()];

        let one = patch_format::parse(&p.one_site).expect("1-site patch parses");
        one.verify(&trusted).expect("signed by the bench key");
        let [site] = one.patch.sites.as_slice() else {
            panic!("the 1-site patch has {} sites", one.patch.sites.len());
        };
        assert_eq!(site.kind, SiteKind::Function);
        assert_eq!(site.target.to_string(), ONE_SITE_FUNCTION);
        assert_eq!(
            site.code, site.expected,
            "mix is replaced by a copy of itself"
        );
        assert!(site.relocations.is_empty());

        let many = patch_format::parse(&p.many_sites).expect("16-site patch parses");
        many.verify(&trusted).expect("signed by the bench key");
        assert_eq!(many.patch.sites.len(), MANY_SITES);
        assert_eq!(p.many_sites_sites.len(), MANY_SITES);
        for s in &many.patch.sites {
            assert_eq!(s.kind, SiteKind::Micropatch);
            assert_eq!(s.code, vec![NOP]);
            assert!(s.expected.len() >= plan::JMP_REL32_LEN);
        }
        // Distinct and non-overlapping (the JSON copy is sorted by address).
        for w in p.many_sites_sites.windows(2) {
            assert!(w[0].gva + w[0].len as u64 <= w[1].gva, "{w:?} overlap");
        }
        // With today's guest the hot functions have enough sites: every stub really runs.
        for s in &p.many_sites_sites {
            let f = s.location.split('+').next().unwrap_or_default();
            assert!(
                HOT_FUNCTIONS.contains(&f),
                "{} is not in a hot function",
                s.location
            );
        }

        let sample = patch_format::parse(&p.sample).expect("sample parses");
        sample.verify(&trusted).expect("re-signed by the bench key");
        let original = patch_format::parse(sample::SAMPLE_PATCH).expect("sample parses");
        assert_eq!(sample.id, original.id, "re-signing keeps the body");
    }

    #[test]
    fn self_contained_refuses_code_that_reaches_out() {
        // push rbp; mov rbp, rsp; mov rax, rdi; pop rbp; ret
        let pure = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x89, 0xf8, 0x5d, 0xc3];
        assert!(self_contained("f", 0x1000, &pure).is_ok());
        // mov rax, [rip + 0]; ret
        let rip_rel = [0x48, 0x8b, 0x05, 0, 0, 0, 0, 0xc3];
        assert!(self_contained("f", 0x1000, &rip_rel).is_err());
        // call +0 (to the next instruction, inside: still refused, a call leaves a frame)
        let call = [0xe8, 0, 0, 0, 0, 0xc3];
        assert!(self_contained("f", 0x1000, &call).is_err());
        // jmp rel32 out of the function
        let jmp_out = [0xe9, 0x00, 0x10, 0, 0];
        assert!(self_contained("f", 0x1000, &jmp_out).is_err());
        // jne back inside it
        let loop_back = [0x48, 0xff, 0xc8, 0x75, 0xfb, 0xc3];
        assert!(self_contained("f", 0x1000, &loop_back).is_ok());
    }
}
