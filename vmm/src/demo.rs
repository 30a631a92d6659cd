//! `vmm demo`: the product in one command. Boots the built-in guest, shows what it computes,
//! hot-patches it with the embedded signed sample (v1 → v2) while it runs, shows the results
//! change, reverts, shows them return.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use crate::devices::reports::GuestReport;
use crate::engine::{EngineConfig, EngineError};
use crate::patching::{self, PatchingError, SAMPLE_PATCH};
use crate::vm::{ConsoleSink, Vm, VmConfig, VmError};

#[derive(Debug, Error)]
pub enum DemoError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Patching(#[from] PatchingError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("{0}")]
    Guest(String),
}

/// What the guest computed during one phase, summed over vCPUs: calls whose result matched
/// v1's formula, v2's, or neither (never expected), and one sample input/output.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phase {
    pub calls: u64,
    pub v1: u64,
    pub v2: u64,
    pub bad: u64,
    pub sample_x: u64,
    pub sample_y: u64,
}

/// The demo's outcome (`vmm demo --json`).
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    pub patch_id: String,
    pub vcpus: usize,
    pub before: Phase,
    pub after: Phase,
    pub after_revert: Phase,
    pub apply_blackout_us: u64,
    pub revert_blackout_us: u64,
    pub apply_total_us: u64,
    pub moved_vcpus: u32,
    /// Blackouts the apply needed (more than 1 when a vCPU was in the way).
    pub apply_attempts: u32,
    /// Calls over the whole run whose result was neither version's (must be 0).
    pub bad_total: u64,
}

fn snapshot(vm: &Vm) -> Vec<Option<GuestReport>> {
    vm.reports().into_iter().map(|r| r.last).collect()
}

/// Waits until every vCPU has reported `batches` batches whose calls were all of `want`
/// (`|r| r.v1` or `|r| r.v2`), counting from now. Returns the summed counts of those batches.
fn wait_phase(
    vm: &Vm,
    want: fn(&GuestReport) -> u64,
    batches: u64,
    timeout: Duration,
) -> Result<Phase, DemoError> {
    let deadline = Instant::now() + timeout;
    let start = snapshot(vm);
    let n = start.len();
    // Per vCPU: the report where the clean run began, and how many clean batches since.
    let mut base: Vec<Option<GuestReport>> = start.clone();
    let mut clean = vec![0u64; n];
    let mut prev = start;
    let mut phase = Phase::default();
    loop {
        if let Some(reason) = vm.stop_reason() {
            return Err(DemoError::Guest(format!("the guest stopped: {reason}")));
        }
        let now = snapshot(vm);
        for i in 0..n {
            let (Some(p), Some(c)) = (
                prev.get(i).cloned().flatten(),
                now.get(i).cloned().flatten(),
            ) else {
                if let Some(c) = now.get(i).cloned().flatten() {
                    prev[i] = Some(c);
                    base[i] = Some(c);
                }
                continue;
            };
            if c.seq == p.seq {
                continue;
            }
            let calls = c.calls - p.calls;
            if want(&c) - want(&p) == calls && c.bad == p.bad {
                clean[i] += c.seq - p.seq;
            } else {
                clean[i] = 0;
                base[i] = Some(c);
            }
            prev[i] = Some(c);
        }
        if clean.iter().all(|&k| k >= batches) {
            for (b, c) in base.iter().zip(&now) {
                if let (Some(b), Some(c)) = (b, c) {
                    phase.calls += c.calls - b.calls;
                    phase.v1 += c.v1 - b.v1;
                    phase.v2 += c.v2 - b.v2;
                    phase.bad += c.bad - b.bad;
                    phase.sample_x = c.last_input;
                    phase.sample_y = c.last_output;
                }
            }
            return Ok(phase);
        }
        if Instant::now() > deadline {
            return Err(DemoError::Guest(format!(
                "the guest did not settle within {timeout:?} (clean batches per vCPU: {clean:?})"
            )));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn show(label: &str, p: &Phase, quiet: bool) {
    if !quiet {
        println!(
            "  {label:<13} {:>12} calls: {:>12} v1, {:>12} v2, {} wrong   e.g. compute({:#x}) = {:#x}",
            p.calls, p.v1, p.v2, p.bad, p.sample_x, p.sample_y
        );
    }
}

/// Runs the demo on `vcpus` vCPUs. With `quiet`, prints nothing (the caller prints JSON).
pub fn run(vcpus: usize, quiet: bool) -> Result<DemoReport, DemoError> {
    let mut config = VmConfig::builtin(vcpus, 128, &format!("cpus={vcpus}"));
    config.console = ConsoleSink::Discard;
    config.keep_console = false;
    let image = config.image.bytes.clone();
    let vm = Vm::start(config)?;
    let result = (|| -> Result<DemoReport, DemoError> {
        let engine_config = EngineConfig {
            trusted_keys: vec![patching::demo_key()],
            ..EngineConfig::default()
        };
        let mut engine = patching::engine_for(
            Arc::clone(&vm),
            "built-in test guest",
            &image,
            engine_config,
            None,
        )?;
        if !quiet {
            println!(
                "vmm demo: built-in test guest on {vcpus} vCPUs, each calling compute() in a loop (ring 3)"
            );
        }
        let settle = Duration::from_secs(30);
        let before = wait_phase(&vm, |r| r.v1, 3, settle)?;
        show("before:", &before, quiet);
        let applied = engine.apply(SAMPLE_PATCH)?;
        let id = applied.patch.id.clone();
        if !quiet {
            println!(
                "  applied patch {} ({}): {} sites, blackout {} µs, {} µs end to end",
                &id[..16],
                applied.patch.name,
                applied.patch.sites.len(),
                applied.patch.apply_blackout_us.unwrap_or(0),
                applied.total_us
            );
        }
        let after = wait_phase(&vm, |r| r.v2, 3, settle)?;
        show("after patch:", &after, quiet);
        let reverted = engine.revert(&id)?;
        if !quiet {
            println!(
                "  reverted: blackout {} µs",
                reverted.revert_blackout_us.unwrap_or(0)
            );
        }
        let after_revert = wait_phase(&vm, |r| r.v1, 3, settle)?;
        show("after revert:", &after_revert, quiet);
        let bad_total = vm
            .reports()
            .iter()
            .filter_map(|r| r.last.map(|l| l.bad))
            .sum();
        Ok(DemoReport {
            patch_id: id,
            vcpus,
            before,
            after,
            after_revert,
            apply_blackout_us: applied.patch.apply_blackout_us.unwrap_or(0),
            revert_blackout_us: reverted.revert_blackout_us.unwrap_or(0),
            apply_total_us: applied.total_us,
            moved_vcpus: applied.patch.moved_vcpus,
            apply_attempts: applied.attempts,
            bad_total,
        })
    })();
    vm.request_stop(crate::devices::StopReason::Requested(
        "demo finished".into(),
    ));
    vm.join();
    let report = result?;
    if report.bad_total != 0 {
        return Err(DemoError::Guest(format!(
            "{} calls returned a value that is neither v1's nor v2's",
            report.bad_total
        )));
    }
    if !quiet {
        println!(
            "vmm demo: ok — the guest kept running through apply and revert, no wrong results"
        );
    }
    Ok(report)
}
