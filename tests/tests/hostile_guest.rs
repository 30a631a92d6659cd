//! A hostile guest must not crash, stall or flood the VMM: `mode=spam` sends thousands of
//! invalid reports per second; every one is counted, the log stays a trickle, pauses still
//! park every vCPU promptly and the guest's own valid reports keep arriving.

use std::time::{Duration, Instant};

use integration_tests::patching::{boot, stop};

#[test]
fn a_guest_spamming_invalid_reports_cannot_flood_or_stall_the_vmm() {
    integration_tests::require_kvm();
    let vm = boot(2, 16, "cpus=2 batch=20000 mode=spam writes=2000", false);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let invalid: u64 = vm.reports().iter().map(|r| r.invalid).sum();
        let valid: u64 = vm.reports().iter().map(|r| r.count).sum();
        if invalid >= 20_000 && valid >= 4 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the spamming guest made {invalid} invalid and {valid} valid reports"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The log let through at most a burst plus one line a second; the rest was held back.
    let invalid: u64 = vm.reports().iter().map(|r| r.invalid).sum();
    let suppressed = vm.report_log_suppressed();
    assert!(
        suppressed + 100 >= invalid,
        "{invalid} invalid reports but only {suppressed} warnings held back"
    );
    // Pauses still work.
    for _ in 0..20 {
        let (info, snaps) = vm.pause().expect("pause a spamming guest");
        assert!(snaps.iter().all(Option::is_some), "{info:?}");
        vm.resume().expect("resume");
    }
    assert!(vm.reports().iter().all(|r| r.seq_errors == 0));
    stop(&vm);
}
