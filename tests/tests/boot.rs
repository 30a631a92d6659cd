//! The test guest boots under this VMM on several vCPUs and computes what it should.

use std::time::Duration;

use guest_tools::reference;
use integration_tests::*;

fn boot_and_check(vcpus: usize) {
    require_kvm();
    let n = vcpus.to_string();
    // cpus=N: the guest powers off only once all N vCPUs came online and finished, so a vCPU
    // scheduled late on an overcommitted host is never missed.
    let cmdline = format!("reports=3 batch=1000000 cpus={vcpus}");
    let mut vmm = VmmProcess::spawn(&[
        "run",
        "--vcpus",
        &n,
        "--memory",
        "64",
        "--cmdline",
        &cmdline,
    ]);
    let status = vmm.wait(Duration::from_secs(120));
    let lines = vmm.lines();
    assert!(
        status.success(),
        "guest on {vcpus} vCPUs did not power off cleanly: {status}\nstdout:\n{}\nstderr:\n{}",
        lines.join("\n"),
        vmm.stderr()
    );
    for id in 0..vcpus {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("hp: vcpu={id} online"))),
            "vCPU {id} never came online:\n{}",
            lines.join("\n")
        );
    }
    let by_vcpu = reports_by_vcpu(&lines);
    assert_eq!(by_vcpu.len(), vcpus, "reports from {:?}", by_vcpu.keys());
    for (vcpu, reports) in &by_vcpu {
        assert_eq!(
            reports.len(),
            3,
            "vCPU {vcpu} sent {} reports",
            reports.len()
        );
        assert_contiguous(*vcpu, reports);
        let mut prev_calls = 0;
        for r in reports {
            assert!(r.calls > prev_calls, "vCPU {vcpu} made no progress: {r:?}");
            prev_calls = r.calls;
            assert_eq!(r.bad, 0, "vCPU {vcpu} computed wrong results: {r:?}");
            assert_eq!(
                r.v1, r.calls,
                "v1 guest must compute v1 results only: {r:?}"
            );
            assert_eq!(r.v2, 0);
            // The host-side reference agrees with what the guest computed.
            assert_eq!(
                r.y,
                reference::compute_v1(r.x),
                "compute({}) on vCPU {vcpu}",
                r.x
            );
        }
    }
}

#[test]
fn boots_on_one_vcpu() {
    boot_and_check(1);
}

#[test]
fn boots_on_two_vcpus() {
    boot_and_check(2);
}

#[test]
fn boots_on_four_vcpus() {
    boot_and_check(4);
}

#[test]
fn guest_exit_status_is_forwarded() {
    require_kvm();
    // The test guest refuses an unknown option and powers off with status 2.
    let mut vmm = VmmProcess::spawn(&["run", "--cmdline", "no-such-option=1"]);
    let status = vmm.wait(Duration::from_secs(60));
    assert_eq!(
        status.code(),
        Some(guest_tools::protocol::EXIT_BAD_CMDLINE as i32),
        "stdout:\n{}\nstderr:\n{}",
        vmm.lines().join("\n"),
        vmm.stderr()
    );
}

/// Boots the test guest on one vCPU with `cmdline`, expects a clean power-off, and returns the
/// console lines.
fn boot_one_vcpu(cmdline: &str) -> Vec<String> {
    require_kvm();
    let mut vmm = VmmProcess::spawn(&[
        "run",
        "--vcpus",
        "1",
        "--memory",
        "64",
        "--cmdline",
        cmdline,
    ]);
    let status = vmm.wait(Duration::from_secs(120));
    let lines = vmm.lines();
    assert!(
        status.success(),
        "guest with {cmdline:?} did not power off cleanly: {status}\nstdout:\n{}\nstderr:\n{}",
        lines.join("\n"),
        vmm.stderr()
    );
    lines
}

#[test]
fn probe_mode_computes_v1_probe_results() {
    let lines = boot_one_vcpu("mode=probe reports=3 cpus=1");
    let all = lines.join("\n");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("hp: vcpu=0 cmdline=") && l.contains(" mode=probe ")),
        "{all}"
    );
    let by_vcpu = reports_by_vcpu(&lines);
    assert_eq!(by_vcpu.keys().copied().collect::<Vec<_>>(), [0], "{all}");
    let reports = &by_vcpu[&0];
    assert_eq!(reports.len(), 3, "{all}");
    assert_contiguous(0, reports);
    let mut prev_calls = 0;
    for r in reports {
        assert!(r.calls > prev_calls, "no progress: {r:?}");
        prev_calls = r.calls;
        assert_eq!(r.bad, 0, "wrong probe results: {r:?}");
        assert_eq!(r.v2, 0, "an unpatched probe gave clamped results: {r:?}");
        assert_eq!(r.v1, r.calls, "{r:?}");
        // What the guest printed is probe's result, not compute's.
        assert_eq!(r.y, reference::probe_v1(r.x), "probe({}) {r:?}", r.x);
        assert_ne!(r.y, reference::compute_v1(r.x), "{r:?}");
    }
}

#[test]
fn spin_mode_spins_then_runs_the_normal_workload() {
    // A million `pause`s: some tens of milliseconds.
    let spin = 1_000_000;
    let lines = boot_one_vcpu(&format!("mode=spin spin={spin} reports=2 cpus=1"));
    let all = lines.join("\n");
    let spin_line = format!("hp: vcpu=0 spin={spin}");
    let spin_at = lines
        .iter()
        .position(|l| *l == spin_line)
        .unwrap_or_else(|| panic!("no {spin_line:?} line:\n{all}"));
    let first_report = lines
        .iter()
        .position(|l| parse_report(l).is_some())
        .unwrap_or_else(|| panic!("no report:\n{all}"));
    assert!(spin_at < first_report, "reports before the spin:\n{all}");
    let by_vcpu = reports_by_vcpu(&lines);
    assert_eq!(by_vcpu.keys().copied().collect::<Vec<_>>(), [0], "{all}");
    let reports = &by_vcpu[&0];
    assert_eq!(reports.len(), 2, "{all}");
    assert_contiguous(0, reports);
    for r in reports {
        // bad = 0 also says spin_wait returned SPIN_TOKEN.
        assert_eq!(r.bad, 0, "{r:?}\n{all}");
        assert_eq!(r.v2, 0, "{r:?}");
        assert_eq!(r.v1, r.calls, "{r:?}");
        assert_eq!(
            r.calls,
            r.seq * guest_tools::protocol::DEFAULT_BATCH,
            "{r:?}"
        );
        assert_eq!(r.y, reference::compute_v1(r.x), "compute({}) {r:?}", r.x);
    }
}
