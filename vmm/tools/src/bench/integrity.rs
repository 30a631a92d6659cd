//! `vmm bench integrity`: what code integrity costs. The workload's call rate with `enforce`
//! and with `off` (protection should cost nothing until the guest writes its code: reads and
//! instruction fetches never exit), and the cost of one trapped write, from a guest that does
//! little else (`mode=tamper writes=N`).

use std::time::Duration;

use serde::Serialize;

use super::{BenchError, HostInfo, latest_report, rate};
use guest_control::stats::{Summary, summarize};
use kvm_vmm::integrity::Mode;
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig};

/// `compute` calls per report in the call-rate runs: a report every few ms, so a window of a
/// few seconds is measured to well under 1%.
const RATE_BATCH: u64 = 200_000;
/// Calls and trapped-write attempts per report in the write-cost runs: the writes dominate.
const WRITE_BATCH: u64 = 100;
const WRITES_PER_BATCH: u64 = 2_000;

#[derive(Debug, Clone, Serialize)]
pub struct RateRun {
    pub mode: Mode,
    pub round: usize,
    pub calls_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct WriteCost {
    pub mode: Mode,
    pub writes: u64,
    pub seconds: f64,
    /// Wall time per write attempt, including the calls between batches (a few percent).
    pub us_per_write: f64,
    /// Violations the VMM recorded in the window (must equal `writes` unless `off`).
    pub violations: u64,
    /// The VMM's own handling time per trapped write (the rest is KVM's exit, emulation and
    /// re-entry).
    pub handle_ns: Summary,
}

#[derive(Debug, Clone, Serialize)]
pub struct IntegrityReport {
    pub benchmark: &'static str,
    pub host: HostInfo,
    pub window_s: f64,
    pub rate_runs: Vec<RateRun>,
    pub calls_per_s_off: Summary,
    pub calls_per_s_enforce: Summary,
    /// Median enforce rate / median off rate (1.0 = free).
    pub enforce_over_off: f64,
    pub write_cost: Vec<WriteCost>,
    /// Failures of the free correctness checks (a violation count that does not match).
    pub failures: Vec<String>,
}

fn boot(mode: Mode, cmdline: &str) -> Result<std::sync::Arc<Vm>, BenchError> {
    let mut config = VmConfig::builtin(1, 64, cmdline);
    config.console = ConsoleSink::Discard;
    config.code_integrity = mode;
    Ok(Vm::start(config)?)
}

fn stop(vm: &Vm) {
    vm.request_stop(kvm_vmm::devices::StopReason::Requested(
        "benchmark done".into(),
    ));
    vm.join();
}

pub fn run(rounds: usize, window: Duration, host: HostInfo) -> Result<IntegrityReport, BenchError> {
    let mut rate_runs = Vec::new();
    for round in 0..rounds {
        // Alternate the order so drift in host load does not favour one mode.
        let order = if round % 2 == 0 {
            [Mode::Off, Mode::Enforce]
        } else {
            [Mode::Enforce, Mode::Off]
        };
        for mode in order {
            let vm = boot(mode, &format!("batch={RATE_BATCH}"))?;
            let calls_per_s = rate(&vm, window)?.calls_per_s;
            let violations = vm.integrity_metrics().violations;
            stop(&vm);
            if violations != 0 {
                return Err(BenchError::Setup(format!(
                    "the normal workload made {violations} code writes"
                )));
            }
            rate_runs.push(RateRun {
                mode,
                round,
                calls_per_s,
            });
        }
    }
    let rates = |m: Mode| -> Vec<u64> {
        rate_runs
            .iter()
            .filter(|r| r.mode == m)
            .map(|r| r.calls_per_s as u64)
            .collect()
    };
    let off = summarize(&rates(Mode::Off));
    let enforce = summarize(&rates(Mode::Enforce));
    let enforce_over_off = enforce.p50 as f64 / (off.p50 as f64).max(1.0);

    let mut write_cost = Vec::new();
    let mut failures = Vec::new();
    for mode in [Mode::Off, Mode::Audit, Mode::Enforce] {
        let vm = boot(
            mode,
            &format!("mode=tamper batch={WRITE_BATCH} writes={WRITES_PER_BATCH}"),
        )?;
        let (_, seq0, _) = latest_report(&vm, 2, Duration::from_secs(30))?;
        let (t0, seq0, calls0) = latest_report(&vm, seq0 + 1, Duration::from_secs(30))?;
        let v0 = vm.integrity_metrics().violations;
        std::thread::sleep(window);
        let (_, seq1, _) = latest_report(&vm, seq0 + 1, Duration::from_secs(60))?;
        let (t1, _, calls1) = latest_report(&vm, seq1 + 1, Duration::from_secs(60))?;
        // Read at once: the next batch's first writes may already be counted.
        let metrics = vm.integrity_metrics();
        let v1 = metrics.violations;
        stop(&vm);
        let writes = (calls1 - calls0) / WRITE_BATCH * WRITES_PER_BATCH;
        let secs = (t1 - t0).as_secs_f64();
        let violations = v1 - v0;
        // The counter is read just after the window's reports, so up to one batch of writes
        // may fall on either side.
        if mode != Mode::Off && violations.abs_diff(writes) > WRITES_PER_BATCH {
            failures.push(format!(
                "{mode}: {writes} trapped writes made but {violations} violations recorded"
            ));
        }
        write_cost.push(WriteCost {
            mode,
            writes,
            seconds: secs,
            us_per_write: secs * 1e6 / writes.max(1) as f64,
            violations,
            handle_ns: metrics.handle_ns,
        });
    }
    Ok(IntegrityReport {
        benchmark: "integrity",
        host,
        window_s: window.as_secs_f64(),
        rate_runs,
        calls_per_s_off: off,
        calls_per_s_enforce: enforce,
        enforce_over_off,
        write_cost,
        failures,
    })
}

pub fn table(r: &IntegrityReport) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "Workload call rate, 1 vCPU, {} rounds of {:.1} s per mode (calls/s):\n",
        r.rate_runs.len() / 2,
        r.window_s
    ));
    t.push_str("| mode    | p50        | mean       | max        |\n");
    t.push_str("|---------|------------|------------|------------|\n");
    for (name, s) in [
        ("off", &r.calls_per_s_off),
        ("enforce", &r.calls_per_s_enforce),
    ] {
        t.push_str(&format!(
            "| {name:<7} | {:>10} | {:>10.0} | {:>10} |\n",
            s.p50, s.mean, s.max
        ));
    }
    t.push_str(&format!(
        "enforce / off (p50): {:.3}\n\nOne guest write to its code (mode=tamper, {} writes per {} calls):\n",
        r.enforce_over_off, WRITES_PER_BATCH, WRITE_BATCH
    ));
    t.push_str(
        "| mode    | writes     | µs per write | VMM handling p50/p99 µs | violations recorded |\n",
    );
    t.push_str(
        "|---------|------------|--------------|-------------------------|---------------------|\n",
    );
    for w in &r.write_cost {
        t.push_str(&format!(
            "| {:<7} | {:>10} | {:>12.3} | {:>23} | {:>19} |\n",
            w.mode.to_string(),
            w.writes,
            w.us_per_write,
            if w.mode == Mode::Off {
                "-".to_string()
            } else {
                format!(
                    "{:.1} / {:.1}",
                    w.handle_ns.p50 as f64 / 1e3,
                    w.handle_ns.p99 as f64 / 1e3
                )
            },
            w.violations
        ));
    }
    for f in &r.failures {
        t.push_str(&format!("FAILED: {f}\n"));
    }
    t
}
