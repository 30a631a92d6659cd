//! Waiting for what the test guest computes to settle into a phase: every call returning v1's
//! result, or v2's. The demo, the integration tests and anyone watching a patch take effect
//! ask the same question of the guest's reports.

use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;

use kvm_vmm::devices::reports::GuestReport;
use kvm_vmm::vm::Vm;

/// Calls and their verdicts, over some batches, summed over vCPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub calls: u64,
    pub v1: u64,
    pub v2: u64,
    /// Results that are neither v1's nor v2's: never expected.
    pub bad: u64,
}

impl Counts {
    /// The counters of one report (everything since boot).
    pub fn of(r: &GuestReport) -> Counts {
        Counts {
            calls: r.calls,
            v1: r.v1,
            v2: r.v2,
            bad: r.bad,
        }
    }

    /// What one vCPU computed between report `a` and the later report `b`.
    pub fn between(a: &GuestReport, b: &GuestReport) -> Counts {
        Counts {
            calls: b.calls - a.calls,
            v1: b.v1 - a.v1,
            v2: b.v2 - a.v2,
            bad: b.bad - a.bad,
        }
    }

    pub fn add(&mut self, o: Counts) {
        self.calls += o.calls;
        self.v1 += o.v1;
        self.v2 += o.v2;
        self.bad += o.bad;
    }
}

/// All calls returned v1's result.
pub fn all_v1(c: &Counts) -> bool {
    c.calls > 0 && c.v1 == c.calls
}

/// All calls returned v2's result.
pub fn all_v2(c: &Counts) -> bool {
    c.calls > 0 && c.v2 == c.calls
}

#[derive(Debug, Error)]
pub enum PhaseError {
    #[error("the guest stopped: {0}")]
    Stopped(String),
    #[error(
        "the guest's results did not settle within {timeout:?} (clean batches per vCPU: {clean:?}; last reports: {last:?})"
    )]
    Timeout {
        timeout: Duration,
        clean: Vec<u64>,
        last: Vec<Option<GuestReport>>,
    },
}

/// A phase reached.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The clean batches, summed over vCPUs.
    pub counts: Counts,
    /// Each vCPU's newest report.
    pub last: Vec<Option<GuestReport>>,
}

fn last_reports(vm: &Vm) -> Vec<Option<GuestReport>> {
    vm.reports().into_iter().map(|r| r.last).collect()
}

/// Waits until every vCPU has reported at least `batches` consecutive batches, all begun after
/// this call, each satisfying `want` with no bad result.
pub fn wait(
    vm: &Vm,
    want: impl Fn(&Counts) -> bool,
    batches: u64,
    timeout: Duration,
) -> Result<Settled, PhaseError> {
    let deadline = Instant::now() + timeout;
    // The batch in progress now may have begun before the caller's change: counting starts at
    // the first report after it.
    let start = last_reports(vm);
    let n = start.len();
    let mut prev: Vec<Option<GuestReport>> = vec![None; n];
    let mut base = prev.clone();
    let mut clean = vec![0u64; n];
    loop {
        if let Some(reason) = vm.stop_reason() {
            return Err(PhaseError::Stopped(reason.to_string()));
        }
        let now = last_reports(vm);
        for i in 0..n {
            let Some(c) = now.get(i).copied().flatten() else {
                continue;
            };
            let Some(p) = prev[i] else {
                if start[i].map(|s| s.seq) != Some(c.seq) {
                    prev[i] = Some(c);
                    base[i] = Some(c);
                }
                continue;
            };
            if c.seq == p.seq {
                continue;
            }
            let d = Counts::between(&p, &c);
            if d.bad == 0 && want(&d) {
                clean[i] += c.seq - p.seq;
            } else {
                clean[i] = 0;
                base[i] = Some(c);
            }
            prev[i] = Some(c);
        }
        if clean.iter().all(|&k| k >= batches) {
            let mut counts = Counts::default();
            for (b, c) in base.iter().zip(&now) {
                if let (Some(b), Some(c)) = (b, c) {
                    counts.add(Counts::between(b, c));
                }
            }
            return Ok(Settled { counts, last: now });
        }
        if Instant::now() > deadline {
            return Err(PhaseError::Timeout {
                timeout,
                clean,
                last: now,
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
