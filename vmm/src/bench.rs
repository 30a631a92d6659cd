//! Benchmarks that need a live VM (run by `scripts/bench` through `vmm bench …`).
//!
//! They measure; they never assert timings. Correctness checks that come for free (progress,
//! no wrong results, no lost reports) are reported as failures, since a fast wrong answer is
//! worthless.

use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::stats::{Summary, summarize};
use crate::vm::{ConsoleSink, Vm, VmConfig, VmError};

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("the guest did not report from every vCPU within {0:?}; is it running?")]
    NoReports(Duration),
    #[error("pause/resume failed in cycle {cycle}: {message}")]
    Cycle { cycle: usize, message: String },
    #[error("the guest misbehaved during the benchmark: {0}")]
    Guest(String),
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
    // Every vCPU must still make progress after the cycles.
    wait_reports(&vm, &before, Duration::from_secs(30))?;
    let reports = vm.reports();
    vm.request_stop(crate::devices::StopReason::Requested(
        "benchmark done".into(),
    ));
    vm.join();
    for (id, r) in reports.iter().enumerate() {
        let bad = r.last.map(|l| l.bad).unwrap_or(0);
        if bad > 0 || r.seq_errors > 0 || r.invalid > 0 {
            return Err(BenchError::Guest(format!(
                "vCPU {id}: {bad} wrong results, {} report sequence errors, {} invalid reports",
                r.seq_errors, r.invalid
            )));
        }
    }
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
