//! The nested tier, part (a): the built-in test guest on a KVM with real SVM/VMX semantics.
//! Here that is L1 (the stock Debian kernel under QEMU TCG `-cpu max`, with kvm-amd loaded); on
//! a host whose own KVM is kvm-intel/kvm-amd the same job runs on the host
//! (docs/nested-tier.md). Run alone: `cargo test -p integration-tests --test nested -- --nocapture`.

use std::time::{Duration, Instant};

use integration_tests::nested::{
    L1Kit, NestedJob, Ran, expect_passed, l1_kit, l1_options, nested_vmm_bin, run_with_real_kvm,
};
use integration_tests::{assert_contiguous, reports_by_vcpu};
use vmm_tools::nested::{NestedError, run_in_l1};

/// `vmm run` of the built-in guest (3 reports on 1 vCPU), then `vmm demo` (its 2 vCPUs; apply
/// and revert the signed sample patch while the guest runs). Both outputs go to the log for the
/// host side to check too.
const BUILTIN_JOB: &str = r#"
echo "job: kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) CPU(s), KVM $(ls -l /dev/kvm)"
"$VMM" run --vcpus 1 --cmdline "reports=3 cpus=1" >run.log 2>&1
rc=$?
cat run.log
reports=$(grep -c '^hp: vcpu=0 seq=' run.log)
if [ "$rc" = 0 ] && [ "$reports" = 3 ] && grep -q '^hp: all 1 vcpus done' run.log; then
  nested_result builtin-run pass
else
  nested_result builtin-run fail "exit=$rc reports=$reports"
fi
nested_check demo "$VMM" demo
"#;

#[test]
fn builtin_guest_runs_and_is_hot_patched_on_svm_kvm() {
    let started = Instant::now();
    let job = NestedJob::new("builtin-guest", BUILTIN_JOB, &nested_vmm_bin())
        .timeout(Duration::from_secs(240));
    let outcome = run_with_real_kvm(&job, &l1_options());
    expect_passed(&outcome, &["builtin-run", "demo"]);

    // The host side reads the guest's own lines too: a job that printed "pass" without the
    // reports, or a demo that did not say ok, fails here.
    let lines: Vec<String> = outcome.job_lines().iter().map(|l| l.to_string()).collect();
    let by_vcpu = reports_by_vcpu(&lines);
    let reports = by_vcpu.get(&0).map(Vec::as_slice).unwrap_or(&[]);
    assert_eq!(
        reports.len(),
        3,
        "expected 3 reports from vCPU 0\n{}",
        outcome.log()
    );
    assert_contiguous(0, reports);
    assert!(
        reports.iter().all(|r| r.bad == 0 && r.v1 == r.calls),
        "the unpatched guest gave wrong results\n{}",
        outcome.log()
    );
    for needed in ["applied patch", "reverted:", "vmm demo: ok"] {
        assert!(
            lines.iter().any(|l| l.contains(needed)),
            "the demo printed no {needed:?}\n{}",
            outcome.log()
        );
    }
    if outcome.ran == Ran::L1 {
        let facts = outcome.l1.as_ref().expect("an L1 run has L1 facts");
        assert!(facts.nested_paging && facts.kvm, "{}", outcome.log());
    }
    let t = &outcome.timings;
    eprintln!(
        "nested tier (a) wall time: initramfs build {:.1?}, L1 boot to job start {:.1?} (/init at {:.1?}), job {:.1?}, test total {:.1?}",
        t.build,
        t.boot,
        t.init.unwrap_or_default(),
        t.job.unwrap_or_default(),
        started.elapsed()
    );
}

/// L1 whose KVM modules do not load must fail with the log, never start the job: the modules
/// are replaced by files that are not modules.
#[test]
fn l1_without_loadable_kvm_modules_fails_loudly() {
    let kit = l1_kit();
    let bogus = tempfile::tempdir().expect("temp dir for bogus modules");
    for m in vmm_tools::nested::L1_MODULES {
        std::fs::write(bogus.path().join(format!("{m}.ko")), b"not a module")
            .expect("write a bogus module");
    }
    let broken = L1Kit {
        modules: bogus.path().to_path_buf(),
        ..kit
    };
    let job = NestedJob::new(
        "must-not-run",
        "nested_result ran fail should-not-run",
        &nested_vmm_bin(),
    )
    .timeout(Duration::from_secs(60));
    match run_in_l1(&job, &broken, &l1_options()) {
        Err(NestedError::L1Kvm { why, log }) => {
            assert!(why.contains("insmod irqbypass.ko failed"), "{why}\n{log}");
            assert!(!log.contains("NESTED-JOB-START"), "{log}");
        }
        Err(other) => panic!("expected an L1Kvm error, got: {other}"),
        Ok(o) => panic!("the job ran without KVM modules:\n{}", o.log()),
    }
}
