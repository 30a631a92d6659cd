//! `vmm bench call`: what a patched call costs the guest. A function replacement sends every
//! call of the function through a jump into the arena; the patch that replaces `mix` by a
//! byte-identical copy of itself (the patch benchmark's one-site patch) isolates that jump's
//! cost, since the copy computes the same thing at the same speed. The workload calls `mix`
//! once per `compute` call, so the `compute` call rate the guest reports is the measure.
//!
//! Three modes, measured in every round on one running guest: unpatched, the copy reached by
//! the 5-byte `jmp rel32` (the arena is near, as on every guest this VMM boots), and the copy
//! reached by the 14-byte `jmp [rip]` ([`patch_engine::EngineConfig::far_jumps`]): what an
//! arena out of rel32 reach of the patched code costs, measured on a near one.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{
    BenchError, BenchPatches, BenchSite, CallRate, HostInfo, ONE_SITE_FUNCTION, OpSamples,
    bench_engine_with, bench_patches, boot_guest, engine_call, finish, pass, rate,
};
use kvm_vmm::vm::Vm;
use patch_engine::journal::PatchRecord;
use patch_engine::plan;

/// The near jump may slow the patched call rate by at most this much (issue 16).
pub const TARGET_NEAR_SLOWER_PCT: f64 = 1.0;

/// How `mix` is reached in a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallMode {
    /// The original function, no patch applied.
    Unpatched,
    /// The copy in the arena, through `jmp rel32` at the function's entry.
    Near,
    /// The copy in the arena, through `jmp [rip]` + the 8-byte address.
    Far,
}

impl CallMode {
    pub const ALL: [CallMode; 3] = [CallMode::Unpatched, CallMode::Near, CallMode::Far];

    pub fn name(self) -> &'static str {
        match self {
            CallMode::Unpatched => "unpatched",
            CallMode::Near => "near",
            CallMode::Far => "far",
        }
    }

    /// What the engine wrote at the function's entry, for the table.
    pub fn jump(self) -> &'static str {
        match self {
            CallMode::Unpatched => "-",
            CallMode::Near => "jmp rel32 (5 bytes)",
            CallMode::Far => "jmp [rip] (14 bytes)",
        }
    }

    /// The opcode bytes the patched site must start with: the check that the mode measured is
    /// the jump it is named after (a planner that quietly picked the other one would make the
    /// comparison meaningless).
    fn opcode(self) -> Option<(&'static [u8], &'static str)> {
        match self {
            CallMode::Unpatched => None,
            CallMode::Near => Some((&[0xe9], "e9 (jmp rel32)")),
            CallMode::Far => Some((&[0xff, 0x25], "ff 25 (jmp [rip])")),
        }
    }

    /// The order of a round. Reversed every other round, so over each pair of rounds every
    /// mode's mean position is the same and a linear drift of the host favours none.
    pub fn order(round: usize) -> [CallMode; 3] {
        let mut order = Self::ALL;
        if round % 2 == 1 {
            order.reverse();
        }
        order
    }
}

/// One measurement window.
#[derive(Debug, Clone, Serialize)]
pub struct CallRun {
    pub round: usize,
    pub mode: CallMode,
    #[serde(flatten)]
    pub rate: CallRate,
    /// The bytes the engine wrote at the function's entry (hex), as its patch record says.
    pub site_patched: Option<String>,
}

/// One mode over all rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ModeStats {
    pub mode: CallMode,
    pub jump: &'static str,
    /// Median over rounds (the figure compared).
    pub p50_calls_per_s: f64,
    pub min_calls_per_s: f64,
    pub max_calls_per_s: f64,
    pub mean_calls_per_s: f64,
    /// `(1 - p50 / unpatched p50) × 100`: positive = slower than unpatched.
    pub slower_pct: f64,
    /// The same, taken round by round against that round's unpatched rate, then the median
    /// over rounds: less sensitive to the host drifting between rounds.
    pub paired_slower_pct_p50: f64,
}

/// Everything `vmm bench call` measured (written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    pub benchmark: &'static str,
    pub host: HostInfo,
    /// The function replaced by a copy of itself.
    pub function: BenchSite,
    pub vcpus: usize,
    pub rounds: usize,
    pub window_s: f64,
    pub runs: Vec<CallRun>,
    pub modes: Vec<ModeStats>,
    pub near_slower_pct: f64,
    pub far_slower_pct: f64,
    /// `(max - min) / p50 × 100` of the unpatched runs: how far the host moved the same code's
    /// rate between windows. A difference between modes well under it is not resolved.
    pub unpatched_spread_pct: f64,
    pub target_near_slower_pct_max: f64,
    pub near_target_met: bool,
}

/// `(1 - x / base) × 100`, 0 for a zero base (no rate to compare with).
fn slower_pct(x: f64, base: f64) -> f64 {
    if base > 0.0 {
        (1.0 - x / base) * 100.0
    } else {
        0.0
    }
}

/// Nearest-rank median of `v` (the convention of `guest_control::stats::summarize`, on
/// floats: the rates are compared to well under a call per second); 0 when empty.
fn median(v: &[f64]) -> f64 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => 0.0,
        n => sorted[n.div_ceil(2) - 1],
    }
}

/// Shapes the runs into the report: per-mode statistics, the ratios, the target.
pub fn report(
    host: HostInfo,
    function: BenchSite,
    window: Duration,
    runs: Vec<CallRun>,
) -> CallReport {
    let rates = |m: CallMode| -> Vec<f64> {
        runs.iter()
            .filter(|r| r.mode == m)
            .map(|r| r.rate.calls_per_s)
            .collect()
    };
    let base = median(&rates(CallMode::Unpatched));
    let modes: Vec<ModeStats> = CallMode::ALL
        .iter()
        .map(|&mode| {
            let v = rates(mode);
            let p50 = median(&v);
            let paired: Vec<f64> = runs
                .iter()
                .filter(|r| r.mode == mode)
                .filter_map(|r| {
                    runs.iter()
                        .find(|u| u.mode == CallMode::Unpatched && u.round == r.round)
                        .map(|u| slower_pct(r.rate.calls_per_s, u.rate.calls_per_s))
                })
                .collect();
            ModeStats {
                mode,
                jump: mode.jump(),
                p50_calls_per_s: p50,
                min_calls_per_s: v.iter().copied().reduce(f64::min).unwrap_or(0.0),
                max_calls_per_s: v.iter().copied().reduce(f64::max).unwrap_or(0.0),
                mean_calls_per_s: v.iter().sum::<f64>() / v.len().max(1) as f64,
                slower_pct: slower_pct(p50, base),
                paired_slower_pct_p50: median(&paired),
            }
        })
        .collect();
    let pct = |m: CallMode| {
        modes
            .iter()
            .find(|s| s.mode == m)
            .map_or(0.0, |s| s.slower_pct)
    };
    let (near_slower_pct, far_slower_pct) = (pct(CallMode::Near), pct(CallMode::Far));
    let unpatched_spread_pct = modes
        .iter()
        .find(|s| s.mode == CallMode::Unpatched)
        .filter(|s| s.p50_calls_per_s > 0.0)
        .map_or(0.0, |s| {
            (s.max_calls_per_s - s.min_calls_per_s) / s.p50_calls_per_s * 100.0
        });
    let rounds = runs.iter().map(|r| r.round + 1).max().unwrap_or(0);
    CallReport {
        benchmark: "call",
        host,
        function,
        vcpus: 1,
        rounds,
        window_s: window.as_secs_f64(),
        runs,
        modes,
        near_slower_pct,
        far_slower_pct,
        unpatched_spread_pct,
        target_near_slower_pct_max: TARGET_NEAR_SLOWER_PCT,
        near_target_met: near_slower_pct <= TARGET_NEAR_SLOWER_PCT,
    }
}

/// Checks the applied record's site: the function's entry, holding the mode's jump.
fn check_jump(
    record: &PatchRecord,
    mode: CallMode,
    round: usize,
    function: &BenchSite,
) -> Result<String, BenchError> {
    let wrong = |expected: &'static str, found: String| BenchError::WrongJump {
        round,
        mode: mode.name(),
        site: function.location.clone(),
        expected,
        found,
    };
    let Some((opcode, expected)) = mode.opcode() else {
        return Ok(String::new());
    };
    let [site] = record.sites.as_slice() else {
        return Err(wrong(
            expected,
            format!("a patch record with {} sites", record.sites.len()),
        ));
    };
    if site.gva != function.gva {
        return Err(wrong(
            expected,
            format!("a site at {:#x}, not {:#x}", site.gva, function.gva),
        ));
    }
    if !site.patched.starts_with(opcode) {
        return Err(wrong(expected, hex::encode(&site.patched)));
    }
    Ok(hex::encode(&site.patched))
}

/// One window in `mode`: for a patched mode, a fresh engine (near or far jumps) applies the
/// copy, the rate is measured, and the patch is reverted before the next mode. A fresh engine
/// each time, because the jump kind is the engine's configuration, and an engine attaching
/// reads the arena's ledger, so it never reuses code the previous one left in quarantine.
fn measure(
    vm: &Arc<Vm>,
    patches: &BenchPatches,
    function: &BenchSite,
    mode: CallMode,
    round: usize,
    window: Duration,
) -> Result<CallRun, BenchError> {
    let (rate, site_patched) = match mode {
        CallMode::Unpatched => (rate(vm, window)?, None),
        CallMode::Near | CallMode::Far => {
            let mut engine = bench_engine_with(vm, &patches.key, mode == CallMode::Far)?;
            // Not timed here (the patch benchmark times them): these only collect busy retries.
            let mut ops = OpSamples::default();
            let applied =
                engine_call("apply", round, &mut ops, || engine.apply(&patches.one_site))?;
            if applied.already_applied {
                return Err(BenchError::Unexpected {
                    cycle: round,
                    message: format!(
                        "{}: the copy was still applied (the previous revert did not take)",
                        mode.name()
                    ),
                });
            }
            let id = applied.patch.id.clone();
            let measured = check_jump(&applied.patch, mode, round, function)
                .and_then(|site| rate(vm, window).map(|r| (r, site)));
            // Reverted whatever happened, so the next mode starts from the original code.
            let reverted = engine_call("revert", round, &mut ops, || engine.revert(&id));
            let (rate, site) = measured?;
            reverted?;
            (rate, Some(site))
        }
    };
    Ok(CallRun {
        round,
        mode,
        rate,
        site_patched,
    })
}

/// Boots the built-in guest on 1 vCPU and measures `rounds` rounds of the three modes.
pub fn run(rounds: usize, window: Duration, host: HostInfo) -> Result<CallReport, BenchError> {
    let patches = bench_patches()?;
    let [function] = patches.one_site_sites.as_slice() else {
        return Err(BenchError::Setup(format!(
            "the one-site patch has {} sites",
            patches.one_site_sites.len()
        )));
    };
    // A function replacement puts the whole jump at the function's entry: the far mode needs
    // the function to hold 14 bytes (`mix` is 64).
    if function.len < plan::JMP_ABS_LEN {
        return Err(BenchError::Setup(format!(
            "{ONE_SITE_FUNCTION} is {} bytes, too short for the {}-byte jmp [rip] of the far mode",
            function.len,
            plan::JMP_ABS_LEN
        )));
    }
    let (vm, before) = boot_guest(1)?;
    let measure_all = || -> Result<Vec<CallRun>, BenchError> {
        let mut runs = Vec::with_capacity(rounds * CallMode::ALL.len());
        for round in 0..rounds {
            for mode in CallMode::order(round) {
                runs.push(measure(&vm, &patches, function, mode, round, window)?);
            }
        }
        Ok(runs)
    };
    let runs = match measure_all() {
        Ok(runs) => runs,
        Err(e) => {
            // Not left running behind the error.
            vm.request_stop(kvm_vmm::devices::StopReason::Requested(
                "benchmark failed".into(),
            ));
            vm.join();
            return Err(e);
        }
    };
    // The copy changes no result: the guest's checks over the whole run must agree.
    finish(&vm, &before)?;
    Ok(report(host, function.clone(), window, runs))
}

/// The table `scripts/bench` prints.
pub fn table(r: &CallReport) -> String {
    let mut t = format!(
        "Cost of a patched call: {} replaced by a byte-identical copy of itself ({} bytes at {:#x}),\n\
         {} vCPU, {} rounds of {:.1} s per mode in alternating order (compute() calls/s, one {} call each;\n\
         slower = 1 - p50 / unpatched p50; paired = the median of each round's own ratio):\n",
        r.function.location,
        r.function.len,
        r.function.gva,
        r.vcpus,
        r.rounds,
        r.window_s,
        r.function.location,
    );
    t.push_str(
        "| mode      | jump at entry        | p50 calls/s | min         | max         | slower  | paired  |\n",
    );
    t.push_str(
        "|-----------|----------------------|-------------|-------------|-------------|---------|---------|\n",
    );
    for m in &r.modes {
        let pct = |x: f64| {
            if m.mode == CallMode::Unpatched {
                "-".to_string()
            } else {
                format!("{x:+.2}%")
            }
        };
        t.push_str(&format!(
            "| {:<9} | {:<20} | {:>11.0} | {:>11.0} | {:>11.0} | {:>7} | {:>7} |\n",
            m.mode.name(),
            m.jump,
            m.p50_calls_per_s,
            m.min_calls_per_s,
            m.max_calls_per_s,
            pct(m.slower_pct),
            pct(m.paired_slower_pct_p50),
        ));
    }
    t.push_str(&format!(
        "unpatched runs spread {:.1}% of their p50 (max - min): differences well under that are host noise\n",
        r.unpatched_spread_pct
    ));
    t.push_str(&format!(
        "target near ≤ {TARGET_NEAR_SLOWER_PCT}% slower: {} ({:+.2}%); far (no target): {:+.2}%\n",
        pass(r.near_target_met),
        r.near_slower_pct,
        r.far_slower_pct,
    ));
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo {
            nproc: 2,
            cpu_model: None,
            kernel: None,
            loadavg_before: None,
            loadavg_after: None,
            optimized_build: false,
        }
    }

    fn run(round: usize, mode: CallMode, calls_per_s: f64) -> CallRun {
        CallRun {
            round,
            mode,
            rate: CallRate {
                calls_per_s,
                calls: calls_per_s as u64 * 2,
                seconds: 2.0,
            },
            site_patched: match mode {
                CallMode::Unpatched => None,
                CallMode::Near => Some("e9fb0f0000".into()),
                CallMode::Far => Some("ff2500000000".into()),
            },
        }
    }

    fn function() -> BenchSite {
        BenchSite {
            location: "mix".into(),
            gva: 0x1004d0,
            len: 64,
            expected: String::new(),
        }
    }

    #[test]
    fn rounds_alternate_so_every_mode_averages_the_same_position() {
        assert_eq!(
            CallMode::order(0),
            [CallMode::Unpatched, CallMode::Near, CallMode::Far]
        );
        assert_eq!(
            CallMode::order(1),
            [CallMode::Far, CallMode::Near, CallMode::Unpatched]
        );
        for mode in CallMode::ALL {
            let pos: usize = (0..2)
                .map(|r| CallMode::order(r).iter().position(|m| *m == mode).unwrap())
                .sum();
            assert_eq!(pos, 2, "{mode:?}");
        }
    }

    #[test]
    fn report_compares_medians_and_checks_the_near_target() {
        let mut runs = Vec::new();
        for (round, (u, n, f)) in [
            (100.0, 99.5, 97.0),
            (102.0, 101.0, 99.0),
            (90.0, 89.0, 88.0),
        ]
        .into_iter()
        .enumerate()
        {
            for (mode, x) in [
                (CallMode::Unpatched, u),
                (CallMode::Near, n),
                (CallMode::Far, f),
            ] {
                runs.push(run(round, mode, x * 1e6));
            }
        }
        let r = report(host(), function(), Duration::from_secs(2), runs);
        assert_eq!(r.rounds, 3);
        assert_eq!(r.modes.len(), 3);
        let near = &r.modes[1];
        assert_eq!(near.mode, CallMode::Near);
        assert_eq!(near.p50_calls_per_s, 99.5e6);
        assert_eq!(near.min_calls_per_s, 89.0e6);
        assert_eq!(near.max_calls_per_s, 101.0e6);
        assert!(
            (r.near_slower_pct - 0.5).abs() < 1e-9,
            "{}",
            r.near_slower_pct
        );
        assert!(
            (r.far_slower_pct - 3.0).abs() < 1e-9,
            "{}",
            r.far_slower_pct
        );
        // Paired: round 0 0.5%, round 1 0.98%, round 2 1.11% → median 0.98%.
        let round_1 = (1.0 - 101.0 / 102.0) * 100.0;
        assert!((near.paired_slower_pct_p50 - round_1).abs() < 1e-9);
        assert!(r.near_target_met);
        // Unpatched 90, 100, 102 (M calls/s): (102 - 90) / 100.
        assert!((r.unpatched_spread_pct - 12.0).abs() < 1e-9);

        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["benchmark"], "call");
        assert_eq!(json["runs"].as_array().unwrap().len(), 9);
        assert_eq!(json["runs"][1]["mode"], "near");
        assert_eq!(json["runs"][1]["calls_per_s"], 99.5e6);
        assert_eq!(json["runs"][1]["site_patched"], "e9fb0f0000");
        assert_eq!(json["modes"][2]["mode"], "far");
        assert_eq!(json["target_near_slower_pct_max"], 1.0);
        assert!(json["host"].is_object());

        let t = table(&r);
        assert!(t.contains("| near      | jmp rel32 (5 bytes)"), "{t}");
        assert!(t.contains("+0.50%"), "{t}");
        assert!(t.contains("unpatched runs spread 12.0%"), "{t}");
        assert!(t.contains("target near ≤ 1% slower: pass (+0.50%); far (no target): +3.00%"));
    }

    #[test]
    fn a_near_jump_over_one_percent_fails_the_target() {
        let runs = vec![
            run(0, CallMode::Unpatched, 100.0),
            run(0, CallMode::Near, 98.0),
            run(0, CallMode::Far, 98.0),
        ];
        let r = report(host(), function(), Duration::from_secs(1), runs);
        assert!(!r.near_target_met);
        assert!(table(&r).contains("FAIL (+2.00%)"));
    }

    #[test]
    fn the_jump_check_wants_the_modes_opcode_at_the_functions_entry() {
        let record = |gva, patched: &[u8]| PatchRecord {
            id: "00".repeat(32),
            name: "bench-1-site".into(),
            state: patch_engine::journal::PatchState::Applied,
            sites: vec![patch_engine::journal::SiteRecord {
                location: "mix".into(),
                gva,
                gpa: gva,
                original: vec![0x55; patched.len()],
                patched: patched.to_vec(),
            }],
            arena: Vec::new(),
            replaces: Vec::new(),
            applied_at: None,
            reverted_at: None,
            apply_blackout_us: None,
            revert_blackout_us: None,
            moved_vcpus: 0,
            function_sites: 1,
            target: None,
            threads_checked: None,
            note: None,
        };
        let f = function();
        let near = record(f.gva, &[0xe9, 1, 2, 3, 4]);
        let far = record(f.gva, &[0xff, 0x25, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(
            check_jump(&near, CallMode::Near, 0, &f).unwrap(),
            "e901020304"
        );
        assert!(check_jump(&far, CallMode::Far, 0, &f).is_ok());
        assert!(matches!(
            check_jump(&near, CallMode::Far, 3, &f),
            Err(BenchError::WrongJump { round: 3, .. })
        ));
        assert!(check_jump(&far, CallMode::Near, 0, &f).is_err());
        assert!(
            check_jump(
                &record(f.gva + 1, &[0xe9, 0, 0, 0, 0]),
                CallMode::Near,
                0,
                &f
            )
            .is_err()
        );
    }
}
