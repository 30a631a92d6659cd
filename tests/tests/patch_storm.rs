//! A patch storm: the v1 → v2 sample applied and reverted 2,000 times while both vCPUs call
//! `compute` in a tight loop and check every result. No call may return a value that is neither
//! v1's nor v2's (a half-applied patch would: see `reference::compute_with`), the guest must never
//! stop, and at the end the text must be exactly the image's.

use std::time::{Duration, Instant};

use integration_tests::patching::*;
use patch_engine::journal::PatchState;

const CYCLES: usize = 2_000;

#[test]
fn two_thousand_apply_revert_cycles_under_load() {
    let vm = boot(2, 32, "cpus=2 batch=100000", false);
    let mut engine = engine(&vm, None);
    let sample = sample_signed();
    wait_phase(
        &vm,
        "all-v1 results before the storm",
        all_v1,
        2,
        Duration::from_secs(20),
    );
    let start = total(&vm);

    let t = Instant::now();
    let mut attempts = 0u64;
    let mut moved = 0u64;
    for cycle in 0..CYCLES {
        let out = engine
            .apply(&sample)
            .unwrap_or_else(|e| panic!("cycle {cycle}: apply: {e}"));
        assert!(!out.already_applied, "cycle {cycle}");
        attempts += u64::from(out.attempts);
        moved += u64::from(out.patch.moved_vcpus);
        let r = engine
            .revert(&out.patch.id)
            .unwrap_or_else(|e| panic!("cycle {cycle}: revert: {e}"));
        assert_eq!(r.state, PatchState::Reverted, "cycle {cycle}");
        if cycle % 100 == 0 {
            assert_running(&vm, &format!("in cycle {cycle}"));
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the storm is too slow: {cycle} cycles in {:?}",
            t.elapsed()
        );
    }
    let elapsed = t.elapsed();
    let m = engine.metrics();
    println!(
        "patch storm: {CYCLES} apply+revert cycles in {elapsed:.2?} ({:.0} cycles/s); {} blackout attempts, {} busy retries, {} vCPUs moved; apply blackout p50 {} µs p99 {} µs",
        CYCLES as f64 / elapsed.as_secs_f64(),
        attempts,
        m.busy_retries,
        moved,
        m.apply_blackout_us.p50,
        m.apply_blackout_us.p99,
    );
    assert_eq!(m.applies, CYCLES as u64);
    assert_eq!(m.reverts, CYCLES as u64);
    assert_eq!(m.applied, 0);

    // Every result came back after the last revert as v1's; the storm itself saw both.
    wait_phase(
        &vm,
        "all-v1 results after the storm",
        all_v1,
        2,
        Duration::from_secs(20),
    );
    let end = total(&vm);
    println!(
        "during the storm: {} calls, {} v1, {} v2, {} bad",
        end.calls - start.calls,
        end.v1 - start.v1,
        end.v2 - start.v2,
        end.bad - start.bad
    );
    assert!(
        end.v2 > start.v2,
        "no call saw the patch applied during the storm"
    );
    assert_running(&vm, "after the storm");
    assert_no_bad(&vm);
    assert_text_is_original(&vm, "after 2,000 apply/revert cycles");
    stop(&vm);
}
