//! The patch engine on the real test guest, in-process: a function replacement built from the
//! v1 and v2 images, a micropatch that displaces a RIP-relative load, and a micropatch applied
//! while a vCPU is parked inside the bytes it displaces.

use std::time::{Duration, Instant};

use guest_control::GuestControl;
use guest_tools::reference::{self, PROBE_LIMIT};
use guest_tools::{GuestBuild, test_guest};
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use integration_tests::patching::*;
use patch_engine::journal::PatchState;
use patch_format::{Metadata, PatchInfo, SiteKind};

const SETTLE: Duration = Duration::from_secs(20);

#[test]
fn function_replacement_from_v1_to_v2_and_back_on_two_vcpus() {
    let vm = boot(2, 32, "cpus=2 batch=1000000", false);
    let out = patch_format::build_from_elfs(
        test_guest(GuestBuild::V1),
        test_guest(GuestBuild::V2),
        &[],
        &PatchInfo {
            meta: Metadata {
                name: "v1-to-v2".into(),
                created: 1_700_000_000,
                ..Metadata::default()
            },
            target_name: Some(IMAGE_NAME.into()),
        },
    )
    .expect("build v1 → v2");
    let mut changed = out.report.changed.clone();
    changed.sort();
    assert_eq!(changed, ["compute", "triangle"], "the v1 → v2 diff");
    assert!(
        out.patch.sites.iter().all(|s| s.kind == SiteKind::Function),
        "function replacement sites"
    );
    let file = signed(&out.patch);
    let mut engine = engine(&vm, None);

    let before = wait_phase(&vm, "all-v1 results before the patch", all_v1, 2, SETTLE);
    assert!(before.calls > 0);

    let t = Instant::now();
    let applied = engine.apply(&file).expect("apply v1 → v2");
    assert_running(&vm, "after the apply");
    assert!(!applied.already_applied);
    assert_eq!(applied.patch.state, PatchState::Applied);
    assert_eq!(applied.patch.sites.len(), 2);
    let after = wait_phase(&vm, "all-v2 results after the patch", all_v2, 2, SETTLE);
    println!(
        "every vCPU computes v2 {:?} after the apply (blackout {:?} µs, {} attempt(s))",
        t.elapsed(),
        applied.patch.apply_blackout_us,
        applied.attempts
    );
    assert_eq!(after.v2, after.calls);

    let t = Instant::now();
    let reverted = engine.revert(&applied.patch.id).expect("revert");
    assert_eq!(reverted.state, PatchState::Reverted);
    let back = wait_phase(&vm, "all-v1 results after the revert", all_v1, 2, SETTLE);
    println!(
        "every vCPU computes v1 again {:?} after the revert",
        t.elapsed()
    );
    assert_eq!(back.v1, back.calls);

    assert_running(&vm, "at the end");
    assert_no_bad(&vm);
    assert_text_is_original(&vm, "after the revert");
    stop(&vm);
}

/// `cmp rdi, PROBE_LIMIT; jbe skip; mov edi, PROBE_LIMIT; skip: nop` — clamps probe's argument.
fn clamp_code() -> Vec<u8> {
    use iced_x86::code_asm::*;
    let mut a = CodeAssembler::new(64).expect("assembler");
    let mut skip = a.create_label();
    a.cmp(rdi, PROBE_LIMIT as i32).expect("cmp");
    a.jbe(skip).expect("jbe");
    a.mov(edi, PROBE_LIMIT as u32).expect("mov");
    a.set_label(&mut skip).expect("label");
    a.nop().expect("nop");
    let code = a.assemble(0).expect("assemble");
    let limit = (PROBE_LIMIT as u32).to_le_bytes();
    let mut want = vec![0x48, 0x81, 0xff];
    want.extend_from_slice(&limit);
    want.extend_from_slice(&[0x76, 0x05, 0xbf]);
    want.extend_from_slice(&limit);
    want.push(0x90);
    assert_eq!(code, want, "cmp rdi, imm32; jbe +5; mov edi, imm32; nop");
    code
}

#[test]
fn micropatch_displacing_a_rip_relative_load_changes_probe() {
    let vm = boot(2, 32, "cpus=2 mode=probe batch=1000000", false);
    let (probe, probe_bytes) = elf_symbol(GuestBuild::V1, "probe");
    let (factor_at, _) = elf_symbol(GuestBuild::V1, "PROBE_FACTOR");
    // The displaced instruction: the 7-byte `mov rax, [rip + PROBE_FACTOR]` at probe+4.
    let expected = probe_bytes[4..11].to_vec();
    let mut dec = Decoder::with_ip(64, &expected, probe + 4, DecoderOptions::NONE);
    let load = dec.decode();
    assert_eq!(load.mnemonic(), Mnemonic::Mov);
    assert_eq!(load.len(), 7);
    assert!(load.is_ip_rel_memory_operand());
    assert_eq!(load.ip_rel_memory_address(), factor_at);
    let code = clamp_code();
    let file = signed(&micropatch("clamp-probe", "probe", 4, &expected, &code));
    let mut engine = engine(&vm, None);

    let before = wait_phase(&vm, "probe v1 before the patch", all_v1, 2, SETTLE);
    assert_eq!(before.v2, 0);

    let applied = engine.apply(&file).expect("apply the clamp micropatch");
    assert_running(&vm, "after the apply");
    let site = &applied.patch.sites[0];
    assert_eq!(site.gva, probe + 4);
    assert_eq!(site.original, expected);
    assert_eq!(site.patched[0], 0xe9, "jmp rel32 at the site");
    assert_eq!(&site.patched[5..], &[0xcc, 0xcc], "int3 fill");
    assert_eq!(read(&vm, site.gpa, 7), site.patched);
    // The stub in the arena: the inserted code, then the load relocated so that it still
    // reads PROBE_FACTOR, then a jump back to probe+11.
    let stub_rec = &applied.patch.arena[0];
    let stub = read(&vm, stub_rec.gpa, stub_rec.len as usize);
    assert_eq!(&stub[..code.len()], &code[..]);
    let stub_gva = stub_rec.gpa; // the arena is identity-mapped
    let mut dec = Decoder::with_ip(
        64,
        &stub[code.len()..],
        stub_gva + code.len() as u64,
        DecoderOptions::NONE,
    );
    let moved = dec.decode();
    assert_eq!(moved.mnemonic(), Mnemonic::Mov);
    assert_eq!(moved.op0_register(), Register::RAX);
    assert_eq!(moved.op1_kind(), OpKind::Memory);
    assert_eq!(
        moved.ip_rel_memory_address(),
        factor_at,
        "the relocated load still reads PROBE_FACTOR"
    );
    let back = dec.decode();
    assert_eq!(back.mnemonic(), Mnemonic::Jmp);
    assert_eq!(
        back.near_branch_target(),
        probe + 11,
        "jump back after the site"
    );

    // ≈90% of the inputs are above the limit and now clamped (counted as v2), the rest
    // unchanged (v1); nothing else.
    let after = wait_phase(
        &vm,
        "clamped probe results after the patch",
        |d| d.v2 > 0 && d.v1 + d.v2 == d.calls,
        3,
        SETTLE,
    );
    let share = after.v2 as f64 / after.calls as f64;
    assert!(
        (0.85..0.95).contains(&share),
        "{share:.3} of the calls were clamped; the inputs above PROBE_LIMIT are ≈0.9: {after:?}"
    );
    for r in vm.reports().iter().filter_map(|r| r.last) {
        assert_eq!(
            r.last_output,
            reference::probe_clamped(r.last_input),
            "probe({}) after the patch",
            r.last_input
        );
    }

    engine.revert(&applied.patch.id).expect("revert");
    let back = wait_phase(&vm, "probe v1 after the revert", all_v1, 2, SETTLE);
    assert_eq!(back.v2, 0);
    assert_running(&vm, "at the end");
    assert_no_bad(&vm);
    assert_text_is_original(&vm, "after the revert");
    stop(&vm);
}

#[test]
fn micropatch_moves_a_vcpu_parked_in_the_displaced_loop() {
    // One vCPU spins in spin_wait's loop (+7..+14) for a few seconds (≈35–46 M iterations/s).
    let vm = boot(1, 32, "cpus=1 mode=spin spin=150000000 batch=1000000", true);
    let (spin_wait, bytes) = elf_symbol(GuestBuild::V1, "spin_wait");
    // mov rax, rdi; pause; dec rax; jnz +7 — the loop lies wholly inside [+4, +14).
    let expected = bytes[4..14].to_vec();
    assert_eq!(
        expected,
        [0x48, 0x89, 0xf8, 0xf3, 0x90, 0x48, 0xff, 0xc8, 0x75, 0xf9]
    );
    let file = signed(&micropatch("spin-nop", "spin_wait", 4, &expected, &[0x90]));
    let mut engine = engine(&vm, None);

    wait_console(&vm, "`hp: vcpu=0 spin=`", SETTLE, |l| {
        l.starts_with("hp: vcpu=0 spin=")
    });
    assert!(
        vm.reports()[0].last.is_none(),
        "the vCPU finished spinning before the patch; raise spin="
    );
    let applied = engine.apply(&file).expect("apply while the vCPU spins");
    assert!(
        applied.patch.moved_vcpus >= 1,
        "the vCPU parked in the loop was moved to the relocated copy: {:?}",
        applied.patch
    );
    assert!(
        vm.reports()[0].last.is_none(),
        "the vCPU finished spinning before the patch; raise spin="
    );

    // It keeps spinning, in the arena copy.
    let arena = vm.arena();
    let states = vm.pause_all().expect("pause");
    let rip = states[0].expect("vCPU 0").rip;
    vm.resume_all().expect("resume");
    assert!(
        (arena.start..arena.end()).contains(&rip),
        "vCPU 0 at {rip:#x}, not in the arena {:#x}..{:#x} (spin_wait at {spin_wait:#x})",
        arena.start,
        arena.end()
    );

    // Reverting takes the jump out; the vCPU still finishes in the copy, whose arena memory
    // waits in quarantine: the next blackout (another patch's apply) must not free or reuse it
    // while the vCPU runs there.
    let reverted = engine.revert(&applied.patch.id).expect("revert");
    assert_eq!(reverted.state, PatchState::Reverted);
    assert_text_is_original(&vm, "after the revert");
    let stub = &applied.patch.arena[0];
    let stub_bytes = read(&vm, stub.gpa, stub.len as usize);
    assert_eq!(engine.arena().quarantined_bytes(), stub.len);
    let (_, probe) = elf_symbol(GuestBuild::V1, "probe");
    let other = signed(&micropatch("probe-nop", "probe", 4, &probe[4..11], &[0x90]));
    let other = engine.apply(&other).expect("apply another patch");
    assert!(
        vm.reports()[0].last.is_none(),
        "the vCPU finished spinning too early for this check; raise spin="
    );
    assert_eq!(
        engine.arena().quarantined_bytes(),
        stub.len,
        "the copy a vCPU runs in left quarantine"
    );
    for a in &other.patch.arena {
        assert!(
            a.gpa + a.len <= stub.gpa || a.gpa >= stub.gpa + stub.len,
            "the new patch's code {a:?} reuses the copy a vCPU runs in ({stub:?})"
        );
    }
    assert_eq!(read(&vm, stub.gpa, stub.len as usize), stub_bytes);

    let deadline = Instant::now() + Duration::from_secs(60);
    while vm.reports()[0].last.is_none() {
        assert_running(&vm, "while the vCPU finishes spinning");
        assert!(
            Instant::now() < deadline,
            "vCPU 0 never returned from spin_wait"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = vm.reports()[0].last.expect("a report");
    assert_eq!(
        first.bad, 0,
        "spin_wait returned a wrong token after the move: {first:?}"
    );
    wait_phase(&vm, "compute results after spinning", all_v1, 2, SETTLE);
    // Now nothing runs in the copy: the next blackout frees it (only the patch reverted in
    // that blackout is left in quarantine).
    engine
        .revert(&other.patch.id)
        .expect("revert the other patch");
    assert_eq!(
        engine.arena().quarantined_bytes(),
        other.patch.arena.iter().map(|a| a.len).sum::<u64>(),
        "the idle copy was not freed"
    );
    assert_no_bad(&vm);
    assert_text_is_original(&vm, "at the end");
    stop(&vm);
}
