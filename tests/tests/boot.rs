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
