//! Code integrity (`vmm run --code-integrity`): the guest's code is mapped read-only to it, its
//! writes there are dropped (enforce) or performed (audit) and reported either way, the patch
//! engine keeps working, and `off` leaves the memory map as it was.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_tools::GuestBuild;
use guest_tools::reference::{TAMPER_RESULT, TAMPER_WORD};
use integration_tests::patching::*;
use integration_tests::{TempDir, VmmProcess, cli, cli_output, stdout, wait_for_socket};
use kvm_vmm::integrity::{Action, IntegrityStatus, Mode, RangeSource};
use kvm_vmm::layout;
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig};

const SETTLE: Duration = Duration::from_secs(20);

fn boot_with(mode: Mode, vcpus: usize, cmdline: &str) -> Arc<Vm> {
    integration_tests::require_kvm();
    let mut config = VmConfig::builtin(vcpus, 32, cmdline);
    config.console = ConsoleSink::Discard;
    config.keep_console = true;
    config.code_integrity = mode;
    Vm::start(config).expect("start VM")
}

/// The guest's own account of its attack: `(target, rip of the store)`.
fn tamper_line(vm: &Vm) -> (u64, u64) {
    let line = wait_console(vm, "the guest's tamper line", SETTLE, |l| {
        l.contains(" tamper target=")
    });
    let field = |k: &str| -> u64 {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {line:?}"))
    };
    (field("target="), field("rip="))
}

/// Waits until `pred` holds for the VM's integrity status.
fn wait_integrity(vm: &Vm, what: &str, pred: impl Fn(&IntegrityStatus) -> bool) -> IntegrityStatus {
    let deadline = Instant::now() + SETTLE;
    loop {
        let s = vm.integrity();
        if pred(&s) {
            return s;
        }
        assert_running(vm, &format!("while waiting for {what}"));
        assert!(
            Instant::now() < deadline,
            "no {what} within {SETTLE:?}: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The first violation must be the guest's one store, exactly where the guest says it made it.
fn assert_reported(s: &IntegrityStatus, target: u64, rip: u64, action: Action) {
    let v = s.recent.first().expect("a recorded violation");
    assert_eq!(v.vcpu, 0);
    assert_eq!(
        v.rip,
        Some(rip),
        "the writer's RIP (next RIP {:#x})",
        v.next_rip
    );
    assert_eq!(v.next_rip, rip + 3, "mov [rdi], rsi is 3 bytes");
    assert_eq!(v.instruction.as_deref(), Some("mov [rdi],rsi"));
    assert_eq!(v.gpa, target);
    assert_eq!(v.size, 8);
    assert_eq!(v.bytes, hex::encode(TAMPER_WORD.to_le_bytes()));
    assert_eq!(v.cpl, 3, "the workload runs in ring 3");
    assert_eq!(v.action, action);
    assert_eq!(s.by_vcpu.iter().sum::<u64>(), s.metrics.violations);
}

#[test]
fn enforce_drops_the_guests_write_reports_it_and_the_guest_keeps_running() {
    let vm = boot_with(Mode::Enforce, 1, "mode=tamper batch=200000");
    let (target, rip) = tamper_line(&vm);
    // The guest names its own symbols: check them against the image, so a wrong line cannot
    // make a wrong report pass.
    assert_eq!(target, elf_symbol(GuestBuild::V1, "compute").0);
    assert_eq!(rip, elf_symbol(GuestBuild::V1, "tamper_store").0);

    // Every batch tries the write again; every result stays v1's.
    let counts = wait_phase(&vm, "v1 results despite the overwrites", all_v1, 3, SETTLE);
    assert!(counts.calls >= 3 * 200_000);
    let s = wait_integrity(&vm, "three violations", |s| s.metrics.violations >= 3);
    assert_reported(&s, target, rip, Action::Dropped);
    assert_eq!(s.metrics.dropped, s.metrics.violations);
    assert_eq!(s.metrics.written, 0);
    assert_eq!(s.metrics.mode, Mode::Enforce);
    assert_text_is_original(&vm, "under enforce");
    assert_eq!(
        read(&vm, target, 8),
        elf_symbol(GuestBuild::V1, "compute").1[..8]
    );

    // Still running: more batches, more (dropped) attempts.
    let before = s.metrics.violations;
    wait_phase(&vm, "more v1 results", all_v1, 2, SETTLE);
    assert!(vm.integrity().metrics.violations > before);
    assert_no_bad(&vm);
    stop(&vm);
}

#[test]
fn audit_lets_the_write_land_and_reports_it() {
    let vm = boot_with(Mode::Audit, 1, "mode=tamper batch=200000");
    let (target, rip) = tamper_line(&vm);
    let s = wait_integrity(&vm, "a violation", |s| s.metrics.violations >= 1);
    assert_reported(&s, target, rip, Action::Written);
    assert_eq!(read(&vm, target, 8), TAMPER_WORD.to_le_bytes());
    // The guest now computes what the attacker wrote.
    let deadline = Instant::now() + SETTLE;
    loop {
        let last = vm.reports()[0].last;
        if let Some(r) = last
            && r.seq >= 2
            && r.last_output == TAMPER_RESULT
        {
            assert!(r.bad > 0, "{r:?}");
            break;
        }
        assert_running(&vm, "after the audited write");
        assert!(
            Instant::now() < deadline,
            "the overwritten compute never ran: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vm.integrity().metrics.dropped, 0);
    stop(&vm);
}

#[test]
fn a_hot_patch_under_enforce_works_and_revert_restores_the_bytes() {
    let vm = boot_with(Mode::Enforce, 2, "cpus=2 batch=1000000");
    let mut engine = engine(&vm, None);
    wait_phase(&vm, "v1 before the patch", all_v1, 2, SETTLE);
    let applied = engine.apply(&sample_signed()).expect("apply under enforce");
    assert!(!applied.already_applied);
    let after = wait_phase(&vm, "v2 after the patch", all_v2, 2, SETTLE);
    assert_eq!(after.v2, after.calls);
    engine
        .revert(&applied.patch.id)
        .expect("revert under enforce");
    wait_phase(&vm, "v1 after the revert", all_v1, 2, SETTLE);
    assert_text_is_original(&vm, "after the revert under enforce");
    assert_no_bad(&vm);
    // The engine wrote text and arena through the VMM's mapping: nothing trapped.
    assert_eq!(vm.integrity().metrics.violations, 0);
    stop(&vm);
}

#[test]
fn off_leaves_the_memory_map_as_it_was_and_enforce_cuts_out_only_code() {
    // Off: one writable slot per memory region, as before code integrity existed; the guest's
    // write lands and nothing is recorded.
    let vm = boot_with(Mode::Off, 1, "mode=tamper batch=200000");
    let mut regions: Vec<(u64, u64)> = vm.ram_regions().iter().map(|r| (r.start, r.size)).collect();
    regions.push((vm.arena().start, vm.arena().size));
    let s = vm.integrity();
    let slots: Vec<(u64, u64, bool)> = s
        .slots
        .iter()
        .map(|x| (x.gpa, x.size, x.readonly))
        .collect();
    let expected: Vec<(u64, u64, bool)> = regions.iter().map(|&(g, n)| (g, n, false)).collect();
    assert_eq!(slots, expected);
    assert!(s.ranges.is_empty());
    let (target, _) = tamper_line(&vm);
    let deadline = Instant::now() + SETTLE;
    while read(&vm, target, 8) != TAMPER_WORD.to_le_bytes() {
        assert!(
            Instant::now() < deadline,
            "the write never landed under off"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(vm.integrity().metrics.violations, 0);
    stop(&vm);

    // Enforce: the read-only slots are exactly the image's code pages and the arena.
    let vm = boot_with(Mode::Enforce, 1, "reports=1 batch=1000");
    let s = vm.integrity();
    let text_end = (elf_symbol(GuestBuild::V1, "tamper_store").0 + 4096) & !4095;
    let ro: Vec<(u64, u64)> = s
        .slots
        .iter()
        .filter(|x| x.readonly)
        .map(|x| (x.gpa, x.gpa + x.size))
        .collect();
    assert_eq!(ro.len(), 2, "{:?}", s.slots);
    assert_eq!(ro[0].0, guest_tools::protocol::LINK_ADDRESS);
    assert!(
        ro[0].1 >= text_end && ro[0].1.is_multiple_of(4096),
        "{ro:?}"
    );
    assert_eq!(ro[1], (layout::PATCH_ARENA_START, layout::PATCH_ARENA_END));
    let sources: Vec<RangeSource> = s.ranges.iter().map(|r| r.source).collect();
    assert_eq!(sources, [RangeSource::Image, RangeSource::Arena]);
    // The slots still tile all of memory.
    let total: u64 = s.slots.iter().map(|x| x.size).sum();
    assert_eq!(total, regions.iter().map(|r| r.1).sum::<u64>());
    stop(&vm);
}

/// The CLI flow: the three modes from `vmm run`, `vmm integrity`, ranges added at run time, and
/// a guest hammering its code does not flood the log.
#[test]
fn cli_shows_violations_protects_ranges_and_rate_limits_the_log() {
    integration_tests::require_kvm();
    let dir = TempDir::new("integrity-cli");
    let sock = dir.path().join("api.sock");
    let sock_s = sock.to_str().expect("utf-8 path");
    let mut vmm = VmmProcess::spawn(&[
        "run",
        "--code-integrity",
        "enforce",
        "--api-sock",
        sock_s,
        "--cmdline",
        "mode=tamper batch=20000 writes=100",
    ]);
    wait_for_socket(&sock, &mut vmm);
    let started = Instant::now();
    let deadline = started + SETTLE;
    let count = |o: &str| -> u64 {
        o.split_whitespace()
            .skip_while(|w| *w != "violations")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let shown = loop {
        let out = cli(&["integrity", "--api-sock", sock_s]);
        assert!(out.status.success(), "{out:?}");
        let text = stdout(&out);
        if count(&text) >= 2000 {
            break text;
        }
        assert!(Instant::now() < deadline, "too few violations:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let elapsed = started.elapsed().as_secs() + 2;
    assert!(shown.contains("code integrity enforce"), "{shown}");
    assert!(
        shown.contains("(image)") && shown.contains("(arena)"),
        "{shown}"
    );
    assert!(shown.contains("mov [rdi],rsi"), "{shown}");
    assert!(shown.contains("-> dropped"), "{shown}");

    // Run-time protection of one more range: a fresh read-only slot appears.
    let out = cli(&[
        "integrity",
        "--api-sock",
        sock_s,
        "--protect",
        "0x400000+0x3000",
        "--json",
    ]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).expect("JSON");
    let ranges = v["ranges"].as_array().expect("ranges");
    assert!(
        ranges
            .iter()
            .any(|r| r["start"] == "0x400000" && r["end"] == "0x403000" && r["source"] == "api"),
        "{v}"
    );
    assert!(
        v["slots"]
            .as_array()
            .expect("slots")
            .iter()
            .any(|s| s["gpa"] == "0x400000" && s["readonly"] == true),
        "{v}"
    );
    let out = cli_output(&[
        "integrity",
        "--api-sock",
        sock_s,
        "--protect",
        "0x7000000-0x9000000",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not all guest memory"),
        "{out:?}"
    );
    // The metrics and the VM status carry the counters too.
    let m = cli(&["status", "--api-sock", sock_s, "--json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout(&m)).expect("JSON");
    assert_eq!(status["code_integrity"]["mode"], "enforce");

    vmm.signal(libc::SIGTERM);
    vmm.wait(Duration::from_secs(10));
    // Thousands of violations, a bounded number of log lines: a burst, then about one a second.
    let logged = vmm
        .stderr()
        .matches("guest wrote to protected code")
        .count() as u64;
    assert!(logged >= 1, "{}", vmm.stderr());
    assert!(
        logged <= kvm_vmm::integrity::LOG_BURST as u64 + elapsed + 5,
        "{logged} log lines in about {elapsed} s"
    );

    // Off refuses run-time protection with a reason; a bad --code-range is refused at start.
    let sock2 = dir.path().join("off.sock");
    let sock2_s = sock2.to_str().expect("utf-8 path");
    let mut off = VmmProcess::spawn(&["run", "--api-sock", sock2_s, "--cmdline", "batch=100000"]);
    wait_for_socket(&sock2, &mut off);
    let out = cli_output(&[
        "integrity",
        "--api-sock",
        sock2_s,
        "--protect",
        "0x100000+0x1000",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--code-integrity enforce"),
        "{out:?}"
    );
    let out = cli(&["integrity", "--api-sock", sock2_s]);
    assert!(stdout(&out).contains("code integrity off"), "{out:?}");
    drop(off);
    let out = cli_output(&[
        "run",
        "--code-integrity",
        "audit",
        "--code-range",
        "0x100000-0x50000000",
        "--cmdline",
        "reports=1",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not all guest memory"),
        "{out:?}"
    );
}
