//! Patches the engine must refuse, each with its own error, leaving the guest byte-for-byte
//! unchanged (all RAM and the patch arena hashed before and after) and no applied journal
//! record.
//!
//! The guest keeps running and changing its RAM, so each case: warms the engine (one apply and
//! revert of the sample, so it has cached the guest's paging registers and needs no pause to
//! plan), parks the VM as an operator would (`Vm::pause`), hashes, tries the bad patch (a
//! refusal happens while planning, before any pause: the pause counter must not move), hashes
//! again and resumes.

use guest_tools::GuestBuild;
use integration_tests::TempDir;
use integration_tests::patching::*;
use kvm_vmm::vm::Vm;
use object::{Object, ObjectSection};
use patch_engine::journal::{Journal, PatchState};
use patch_engine::plan::PlanError;
use patch_engine::target::TargetError;
use patch_engine::{Engine, EngineConfig, EngineError};
use patch_format::SiteKind;

use std::sync::Arc;

struct Setup {
    vm: Arc<Vm>,
    engine: Engine<Vm>,
    dir: TempDir,
}

fn setup(config: EngineConfig) -> Setup {
    let vm = boot(2, 16, "cpus=2 batch=1000000", false);
    let dir = TempDir::new("refusal");
    let mut engine = engine_with(&vm, Some(dir.path()), config);
    // Warm up: learns the paging registers; proves the engine works on this guest.
    let sample = sample_signed();
    let id = engine.apply(&sample).expect("warm-up apply").patch.id;
    engine.revert(&id).expect("warm-up revert");
    assert_text_is_original(&vm, "after the warm-up");
    Setup { vm, engine, dir }
}

/// Tries `file` with the VM parked; asserts it is refused with an error `check` accepts whose
/// message contains `phrase`, that guest memory did not change and that nothing was applied.
fn refuse(
    s: &mut Setup,
    file: &[u8],
    phrase: &str,
    check: impl Fn(&EngineError) -> bool,
) -> EngineError {
    let applied_before: Vec<String> = applied_ids(&s.engine);
    let records_before = s.engine.records().to_vec();
    let refused_before = s.engine.metrics().refused;
    s.vm.pause().expect("operator pause");
    let pauses = s.vm.pause_metrics().pauses;
    let before = MemorySnapshot::take(&s.vm);
    let result = s.engine.apply(file);
    let after = MemorySnapshot::take(&s.vm);
    let pauses_after = s.vm.pause_metrics().pauses;
    s.vm.resume().expect("resume");

    let err = match result {
        Ok(out) => panic!("the patch was applied: {:?}", out.patch),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(check(&err), "wrong error variant: {err:?}");
    assert!(
        msg.contains(phrase),
        "the message does not say {phrase:?}: {msg}"
    );
    before.assert_same(&after, &format!("refused patch ({msg})"));
    assert_eq!(pauses, pauses_after, "a refused patch paused the guest");
    assert_eq!(s.engine.metrics().refused, refused_before + 1);
    // No record was written or changed (the signature cases share the warm-up sample's id:
    // its `reverted` record must stay as it was).
    assert_eq!(
        s.engine.records(),
        &records_before[..],
        "a refused patch changed the journal"
    );
    assert_eq!(applied_ids(&s.engine), applied_before);
    assert_running(&s.vm, "after the refusal");
    err
}

fn applied_ids(e: &Engine<Vm>) -> Vec<String> {
    e.records()
        .iter()
        .filter(|r| r.state == PatchState::Applied)
        .map(|r| r.id.clone())
        .collect()
}

/// Checks the guest still computes correctly (v1, or v2 with the applied sample), stops it,
/// and checks the journal on disk holds no applied record except `allowed`.
fn finish(s: Setup, allowed: &[String]) {
    let Setup { vm, engine, dir } = s;
    let want = if allowed.is_empty() { all_v1 } else { all_v2 };
    wait_phase(
        &vm,
        "correct results after the refusal",
        want,
        1,
        std::time::Duration::from_secs(20),
    );
    assert_no_bad(&vm);
    drop(engine);
    stop(&vm);
    let (journal, _) = Journal::open(dir.path()).expect("reopen the journal");
    for r in journal.records() {
        assert!(
            r.state != PatchState::Applied || allowed.contains(&r.id),
            "journal record {} ({}) is applied",
            r.id,
            r.name
        );
        assert!(
            !matches!(r.state, PatchState::Applying | PatchState::Failed),
            "journal record {} is {:?}",
            r.id,
            r.state
        );
    }
}

#[test]
fn wrong_expected_bytes() {
    let mut s = setup(EngineConfig::default());
    let mut p = sample_patch();
    let site = p
        .sites
        .iter_mut()
        .find(|s| s.target.to_string() == "triangle")
        .expect("triangle site");
    site.expected[6] ^= 0x01;
    let err = refuse(
        &mut s,
        &signed(&p),
        "differ from the patch's expected bytes",
        |e| {
            matches!(
                e,
                EngineError::Plan(PlanError::ExpectedMismatch { offset: 6, .. })
            )
        },
    );
    assert!(err.to_string().contains("triangle"), "{err}");
    finish(s, &[]);
}

#[test]
fn wrong_target_build_id_and_text_hash() {
    let mut s = setup(EngineConfig::default());
    let mut p = sample_patch();
    p.target.build_id.as_mut().expect("build id")[0] ^= 0xff;
    refuse(
        &mut s,
        &signed(&p),
        "wrong target: the patch is for build id",
        |e| matches!(e, EngineError::Target(TargetError::BuildId { .. })),
    );
    let mut p = sample_patch();
    p.target.text_sha256.as_mut().expect("text hash")[31] ^= 0xff;
    refuse(
        &mut s,
        &signed(&p),
        "wrong target: the patch is for text SHA-256",
        |e| matches!(e, EngineError::Target(TargetError::TextHash { .. })),
    );
    finish(s, &[]);
}

#[test]
fn unsigned_patch() {
    let mut s = setup(EngineConfig {
        allow_unsigned: false,
        ..EngineConfig::default()
    });
    let file = sample_patch().to_file_unsigned().expect("encode");
    refuse(&mut s, &file, "the patch is unsigned", |e| {
        matches!(e, EngineError::Unsigned)
    });
    finish(s, &[]);
}

#[test]
fn signed_by_an_untrusted_key() {
    let mut s = setup(EngineConfig::default());
    let file = sample_patch()
        .to_file_signed(&untrusted_key())
        .expect("encode");
    refuse(&mut s, &file, "not among the trusted keys", |e| {
        matches!(
            e,
            EngineError::Signature(patch_format::VerifyError::UntrustedKey { .. })
        )
    });
    finish(s, &[]);
}

#[test]
fn corrupted_signature() {
    let mut s = setup(EngineConfig::default());
    let mut file = sample_signed();
    // The signature is the file's last 64 bytes.
    let n = file.len();
    file[n - 10] ^= 0x40;
    refuse(&mut s, &file, "does not match the patch", |e| {
        matches!(
            e,
            EngineError::Signature(patch_format::VerifyError::BadSignature { .. })
        )
    });
    finish(s, &[]);
}

#[test]
fn micropatch_splitting_an_instruction() {
    let mut s = setup(EngineConfig::default());
    // compute: +0 push rbp | +1 mov rbp, rsp (3 bytes) | +4 push rbx | ...: +2 splits the mov.
    let (_, compute) = elf_symbol(GuestBuild::V1, "compute");
    assert_eq!(
        &compute[1..4],
        &[0x48, 0x89, 0xe5],
        "mov rbp, rsp at compute+1"
    );
    let p = micropatch("split", "compute", 2, &compute[2..7], &[0x90]);
    refuse(&mut s, &signed(&p), "is not an instruction boundary", |e| {
        matches!(e, EngineError::Plan(PlanError::SplitsInstruction { .. }))
    });
    finish(s, &[]);
}

#[test]
fn micropatch_with_a_branch_into_the_overwritten_range() {
    let mut s = setup(EngineConfig::default());
    // spin_wait+4: `mov rax, rdi; pause` (5 bytes); the loop's `jnz` at +12, left in place,
    // branches to +7, inside [+4, +9).
    let (spin_wait, bytes) = elf_symbol(GuestBuild::V1, "spin_wait");
    assert_eq!(&bytes[4..9], &[0x48, 0x89, 0xf8, 0xf3, 0x90]);
    let p = micropatch("into-range", "spin_wait", 4, &bytes[4..9], &[0x90]);
    let err = refuse(&mut s, &signed(&p), "inside the overwritten range", |e| {
        matches!(
            e,
            EngineError::Plan(PlanError::BranchIntoRange { from, to, .. })
                if *from == spin_wait + 12 && *to == spin_wait + 7
        )
    });
    assert!(err.to_string().contains("branches to"), "{err}");
    finish(s, &[]);
}

#[test]
fn micropatch_overlapping_an_applied_patch() {
    let mut s = setup(EngineConfig::default());
    let sample = sample_signed();
    let sample_id = s.engine.apply(&sample).expect("apply the sample").patch.id;
    // compute+0..5 (push rbp; mov rbp, rsp; push rbx) is where the sample's jump is.
    let (_, compute) = elf_symbol(GuestBuild::V1, "compute");
    let p = micropatch("overlap", "compute", 0, &compute[..5], &[0x90]);
    refuse(
        &mut s,
        &signed(&p),
        "overlaps",
        |e| matches!(e, EngineError::Overlap { patch, .. } if *patch == sample_id),
    );
    // The same for a site inside triangle, the sample's other function.
    let (_, triangle) = elf_symbol(GuestBuild::V1, "triangle");
    let p = micropatch("overlap-2", "triangle", 4, &triangle[4..12], &[0x90]);
    let err = refuse(&mut s, &signed(&p), "stack patches by replacing", |e| {
        matches!(e, EngineError::Overlap { .. })
    });
    assert!(err.to_string().contains(&sample_id), "{err}");
    finish(s, std::slice::from_ref(&sample_id));
}

#[test]
fn micropatch_displacing_a_call_before_another_instruction() {
    let mut s = setup(EngineConfig::default());
    // compute+9: `call triangle` (5 bytes) then `rol rbx, 0x20` (4 bytes).
    let (compute_at, compute) = elf_symbol(GuestBuild::V1, "compute");
    assert_eq!(compute[9], 0xe8, "call rel32 at compute+9");
    assert_eq!(&compute[14..18], &[0x48, 0xc1, 0xc3, 0x20], "rol rbx, 0x20");
    let p = micropatch("call-not-last", "compute", 9, &compute[9..18], &[0x90]);
    refuse(
        &mut s,
        &signed(&p),
        "a call may only be the last displaced",
        |e| matches!(e, EngineError::Plan(PlanError::CallNotLast { at, .. }) if *at == compute_at + 9),
    );
    finish(s, &[]);
}

#[test]
fn a_micropatch_longer_than_its_jump_needs() {
    let mut s = setup(EngineConfig::default());
    // probe+4: `mov rax, [rip+PROBE_FACTOR]` (7 bytes) holds the jump alone; taking
    // `imul rax, rdi` too (11 bytes) breaks no other rule, but overwrites code for nothing.
    let (_, probe) = elf_symbol(GuestBuild::V1, "probe");
    assert_eq!(
        &probe[11..15],
        &[0x48, 0x0f, 0xaf, 0xc7],
        "imul rax, rdi at probe+11"
    );
    let p = micropatch("too-long", "probe", 4, &probe[4..15], &[0x90]);
    refuse(&mut s, &signed(&p), "only 7 may be displaced", |e| {
        matches!(
            e,
            EngineError::Plan(PlanError::ExpectedTooLong {
                have: 11,
                max: 7,
                ..
            })
        )
    });
    finish(s, &[]);
}

#[test]
fn function_site_in_a_functions_tail() {
    let mut s = setup(EngineConfig::default());
    // No function of the test guest is shorter than 5 bytes (the smallest has 6), so the only
    // way to name too little code for a jump used to be a function site at probe's 2-byte
    // tail `pop rbp; ret` (+15). A function site must start at its function's start, so it
    // is refused as such (the too-short rule itself is covered by the planner's tests).
    let (probe_at, probe) = elf_symbol(GuestBuild::V1, "probe");
    assert_eq!(&probe[15..], &[0x5d, 0xc3]);
    let mut p = micropatch("too-short", "probe", 15, &probe[15..], &[0x5d, 0xc3]);
    p.sites[0].kind = SiteKind::Function;
    refuse(
        &mut s,
        &signed(&p),
        "must be at its function's start",
        |e| {
            matches!(
                e,
                EngineError::Plan(PlanError::NotFunctionStart { at, start, .. })
                    if *at == probe_at + 15 && *start == probe_at
            )
        },
    );
    finish(s, &[]);
}

/// A signed patch with one site of `kind` at `target`.
fn one_site(
    name: &str,
    kind: SiteKind,
    target: patch_format::Location,
    expected: &[u8],
    code: &[u8],
) -> patch_format::Patch {
    let mut p = micropatch(name, "compute", 0, expected, code);
    p.sites[0].kind = kind;
    p.sites[0].target = target;
    p
}

fn at(addr: u64) -> patch_format::Location {
    patch_format::Location::Address(addr)
}

fn sym(name: &str, offset: u64) -> patch_format::Location {
    patch_format::Location::Symbol {
        name: name.into(),
        offset,
    }
}

#[test]
fn function_site_not_at_the_function_start() {
    // compute+2 is inside `mov rbp, rsp`; the expected bytes match the guest there, so only the
    // whole-function rule stands between this signed patch and a #GP.
    let mut s = setup(EngineConfig::default());
    let (_, compute) = elf_symbol(GuestBuild::V1, "compute");
    let p = one_site(
        "mid-function",
        SiteKind::Function,
        sym("compute", 2),
        &compute[2..],
        &[0x31, 0xc0, 0xc3],
    );
    refuse(
        &mut s,
        &signed(&p),
        "must be at its function's start",
        |e| matches!(e, EngineError::Plan(PlanError::NotFunctionStart { .. })),
    );
    finish(s, &[]);
}

#[test]
fn function_site_with_a_short_expected_still_gets_the_branch_check() {
    // spin_wait+4 with only the 5 displaced bytes as expected: the loop's `jnz` (+12 → +7)
    // lies outside `expected`, but the check runs over the whole function.
    let mut s = setup(EngineConfig::default());
    let (_, bytes) = elf_symbol(GuestBuild::V1, "spin_wait");
    let p = one_site(
        "short-expected",
        SiteKind::Function,
        sym("spin_wait", 4),
        &bytes[4..9],
        &[0xc3],
    );
    refuse(&mut s, &signed(&p), "function's start", |e| {
        matches!(e, EngineError::Plan(PlanError::NotFunctionStart { .. }))
    });
    finish(s, &[]);
}

#[test]
fn sites_outside_the_targets_code() {
    let mut s = setup(EngineConfig::default());
    let arena = kvm_vmm::layout::PATCH_ARENA_START;
    let elf = test_guest_object();
    let rodata = elf
        .sections()
        .find(|sec| sec.name() == Ok(".rodata"))
        .map(|sec| sec.address())
        .expect("the test guest has .rodata");
    let cases: [(&str, u64); 4] = [
        ("the patch arena", arena + 0x100),
        (".rodata", rodata),
        ("the page directory", kvm_vmm::layout::PAGE_TABLES),
        ("zeroed RAM outside the image", 0x80_0000),
    ];
    for (what, addr) in cases {
        let len = 8usize;
        let current = read(&s.vm, addr, len);
        let p = one_site(what, SiteKind::Micropatch, at(addr), &current, &[0x90]);
        let err = refuse(&mut s, &signed(&p), "", |e| {
            matches!(
                e,
                EngineError::NotInCode { .. } | EngineError::InArena { .. }
            )
        });
        assert!(
            err.to_string().contains("not inside a function")
                || err.to_string().contains("patch arena"),
            "{what}: {err}"
        );
    }
    finish(s, &[]);
}

fn test_guest_object() -> object::File<'static> {
    object::File::parse(guest_tools::test_guest(GuestBuild::V1)).expect("guest ELF")
}
