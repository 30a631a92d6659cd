//! `vmm demo`: the product in one command. Boots the built-in guest, shows what it computes,
//! hot-patches it with the embedded signed sample (v1 → v2) while it runs, shows the results
//! change, reverts, shows them return.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use thiserror::Error;

use crate::phases::{self, Counts, PhaseError, all_v1, all_v2};
use crate::sample::{self, SAMPLE_PATCH};
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig, VmError};
use patch_engine::{EngineConfig, EngineError};

#[derive(Debug, Error)]
pub enum DemoError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Phase(#[from] PhaseError),
    #[error("{0}")]
    Guest(String),
}

/// What the guest computed during one phase, summed over vCPUs: calls whose result matched
/// v1's formula, v2's, or neither (never expected), and one sample input/output.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    #[serde(flatten)]
    pub counts: Counts,
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

/// Waits for a phase and keeps one sample input/output from its last reports.
fn phase(vm: &Vm, want: fn(&Counts) -> bool) -> Result<Phase, DemoError> {
    let settled = phases::wait(vm, want, 3, Duration::from_secs(30))?;
    let sample = settled.last.iter().flatten().last();
    Ok(Phase {
        counts: settled.counts,
        sample_x: sample.map_or(0, |r| r.last_input),
        sample_y: sample.map_or(0, |r| r.last_output),
    })
}

fn show(label: &str, p: &Phase, quiet: bool) {
    if !quiet {
        println!(
            "  {label:<13} {:>12} calls: {:>12} v1, {:>12} v2, {} wrong   e.g. compute({:#x}) = {:#x}",
            p.counts.calls, p.counts.v1, p.counts.v2, p.counts.bad, p.sample_x, p.sample_y
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
            trusted_keys: vec![sample::demo_key()],
            ..EngineConfig::default()
        };
        let mut engine = sample::engine_for(
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
        let before = phase(&vm, all_v1)?;
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
        let after = phase(&vm, all_v2)?;
        show("after patch:", &after, quiet);
        let reverted = engine.revert(&id)?;
        if !quiet {
            println!(
                "  reverted: blackout {} µs",
                reverted.revert_blackout_us.unwrap_or(0)
            );
        }
        let after_revert = phase(&vm, all_v1)?;
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
    vm.request_stop(kvm_vmm::devices::StopReason::Requested(
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
