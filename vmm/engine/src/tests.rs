//! The engine against a fake hypervisor: sparse memory, scripted vCPUs. Exercises the safety
//! logic (moves, busy, consistency, tamper, replace, recovery) without KVM; the integration
//! tests do the same on the real guest.

use super::*;
use crate::threads::{HiddenThreads, Preemption};
use guest_control::paging::Translation;
use patch_format::{
    ImageInfo, ImageSymbol, Location, Metadata, Patch, PatchId, SecretKey, Site, SiteKind,
    TargetIdentity,
};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

const F_AT: u64 = 0x1000;
const G_AT: u64 = 0x1100;
/// push rbp; mov rbp,rsp; mov rax,rdi; add rax,1; pop rbp; ret
const F: [u8; 13] = [
    0x55, 0x48, 0x89, 0xe5, 0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, 0x01, 0x5d, 0xc3,
];
/// Same with `add rax,2`.
const G: [u8; 13] = [
    0x55, 0x48, 0x89, 0xe5, 0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, 0x02, 0x5d, 0xc3,
];
const ARENA: ArenaWindow = ArenaWindow {
    gpa: 0x10_0000,
    gva: 0x10_0000,
    size: 0x1000,
};

/// The arena's bytes the allocator may hand out: all but the ledger at its end.
fn capacity() -> u64 {
    ARENA.size - ledger::Layout::for_arena(ARENA.size).chunk().len
}

/// Decides, per write (guest-physical address), whether the fake backend fails it.
type WriteFault = Box<dyn FnMut(u64) -> bool + Send>;

#[derive(Default)]
struct Fake {
    mem: Mutex<HashMap<u64, Vec<u8>>>,
    vcpus: Mutex<Vec<VcpuState>>,
    paused: Mutex<bool>,
    pauses: Mutex<u32>,
    /// Fault injection: writes, pauses, resumes and vCPU moves that fail.
    write_fault: Mutex<Option<WriteFault>>,
    fail_pause: Mutex<bool>,
    fail_resume: Mutex<bool>,
    fail_set_rip: Mutex<bool>,
    /// Slows every read down, as a struggling host would.
    read_delay: Mutex<Option<Duration>>,
    /// While set, reads of a running guest (planning's) wait until it is cleared.
    hold_reads: Mutex<bool>,
    hold_cv: std::sync::Condvar,
    /// A read was held.
    held: std::sync::atomic::AtomicBool,
    /// The CR3 and address of every translation that found a page.
    translated_with: Mutex<Vec<(u64, u64)>>,
    /// Top-level tables the guest has freed (a process that exited): nothing is mapped
    /// through them any more.
    freed_roots: Mutex<Vec<u64>>,
    /// Pages the guest mapped elsewhere: guest-virtual page → guest-physical frame.
    remap: Mutex<HashMap<u64, u64>>,
    /// Guest-virtual ranges `[start, end)` mapped supervisor-only (a kernel's text); the rest
    /// is user-accessible, as the test guest's is.
    supervisor: Mutex<Vec<(u64, u64)>>,
    /// Top-level tables in which the `supervisor` ranges are not mapped at all: a kernel with
    /// page-table isolation, whose user tables map the user's pages and not the kernel's.
    user_roots: Mutex<Vec<u64>>,
}

impl Fake {
    fn new(rips: &[(u64, u64)]) -> Arc<Fake> {
        let f = Fake::default();
        f.write_phys(F_AT, &F).unwrap();
        f.write_phys(G_AT, &G).unwrap();
        *f.vcpus.lock().unwrap() = rips
            .iter()
            .enumerate()
            .map(|(id, &(rip, rsp))| VcpuState {
                id,
                rip,
                rsp,
                cpl: 3,
                paging: PagingRegs {
                    cr0: 0,
                    cr3: 0,
                    cr4: 0,
                    efer: 0,
                },
            })
            .collect();
        Arc::new(f)
    }
    fn bytes(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0; len];
        self.read_phys(gpa, &mut b).unwrap();
        b
    }
    fn hold_reads(&self, on: bool) {
        *self.hold_reads.lock().unwrap() = on;
        self.hold_cv.notify_all();
    }
    fn rip(&self, id: usize) -> u64 {
        self.vcpus.lock().unwrap()[id].rip
    }
    fn snapshot(&self) -> Vec<(u64, Vec<u8>)> {
        let mut v: Vec<_> = self
            .mem
            .lock()
            .unwrap()
            .iter()
            .map(|(k, b)| (*k, b.clone()))
            .collect();
        v.sort();
        v
    }
}

impl GuestControl for Fake {
    fn vcpu_count(&self) -> usize {
        self.vcpus.lock().unwrap().len()
    }
    fn pause_all(&self) -> Result<Vec<Option<VcpuState>>, GuestError> {
        let mut p = self.paused.lock().unwrap();
        if *p {
            return Err(GuestError::AlreadyPaused);
        }
        if *self.fail_pause.lock().unwrap() {
            return Err(GuestError::Pause("injected pause failure".into()));
        }
        *p = true;
        *self.pauses.lock().unwrap() += 1;
        Ok(self
            .vcpus
            .lock()
            .unwrap()
            .iter()
            .map(|v| Some(*v))
            .collect())
    }
    fn resume_all(&self) -> Result<Duration, GuestError> {
        if *self.fail_resume.lock().unwrap() {
            return Err(GuestError::Resume("injected resume failure".into()));
        }
        *self.paused.lock().unwrap() = false;
        Ok(Duration::from_micros(7))
    }
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        if let Some(d) = *self.read_delay.lock().unwrap() {
            std::thread::sleep(d);
        }
        let mut hold = self.hold_reads.lock().unwrap();
        while *hold && !*self.paused.lock().unwrap() {
            self.held.store(true, std::sync::atomic::Ordering::SeqCst);
            hold = self.hold_cv.wait(hold).unwrap();
        }
        drop(hold);
        let m = self.mem.lock().unwrap();
        for (i, b) in buf.iter_mut().enumerate() {
            let a = gpa + i as u64;
            *b = m.get(&(a & !0xfff)).map_or(0, |p| p[(a & 0xfff) as usize]);
        }
        Ok(())
    }
    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        if let Some(fault) = self.write_fault.lock().unwrap().as_mut()
            && fault(gpa)
        {
            return Err(GuestError::OutsideMemory {
                gpa,
                len: data.len(),
            });
        }
        let mut m = self.mem.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            let a = gpa + i as u64;
            m.entry(a & !0xfff).or_insert_with(|| vec![0; 4096])[(a & 0xfff) as usize] = *b;
        }
        Ok(())
    }
    fn set_rip(&self, vcpu: usize, rip: u64) -> Result<(), GuestError> {
        if !*self.paused.lock().unwrap() {
            return Err(GuestError::NotPaused);
        }
        if *self.fail_set_rip.lock().unwrap() {
            return Err(GuestError::SetRip {
                vcpu,
                source: "injected failure".into(),
            });
        }
        self.vcpus.lock().unwrap()[vcpu].rip = rip;
        Ok(())
    }
    fn translate(&self, v: &VcpuState, gva: u64) -> Result<Translation, GuestError> {
        let supervisor = self
            .supervisor
            .lock()
            .unwrap()
            .iter()
            .any(|&(a, b)| gva >= a && gva < b);
        let hidden = supervisor && self.user_roots.lock().unwrap().contains(&v.paging.cr3);
        if hidden || self.freed_roots.lock().unwrap().contains(&v.paging.cr3) {
            return Err(GuestError::Walk(
                guest_control::paging::WalkError::NotPresent {
                    gva,
                    level: 4,
                    entry_gpa: v.paging.cr3,
                },
            ));
        }
        let gpa = match self.remap.lock().unwrap().get(&(gva & !0xfff)) {
            Some(frame) => frame | (gva & 0xfff),
            None => gva,
        };
        self.translated_with
            .lock()
            .unwrap()
            .push((v.paging.cr3, gva));
        Ok(Translation {
            gpa,
            page_size: 4096,
            writable: true,
            user: !supervisor,
            executable: true,
        })
    }
}

fn identity() -> TargetIdentity {
    TargetIdentity {
        name: "fake".into(),
        build_id: Some(vec![1, 2, 3, 4]),
        text_sha256: None,
    }
}

fn target() -> Target {
    let sym = |name: &str, addr| ImageSymbol {
        name: name.into(),
        addr,
        size: 13,
        function: true,
    };
    Target::new(
        ImageInfo {
            identity: identity(),
            symbols: vec![sym("f", F_AT), sym("g", G_AT)],
        },
        0,
    )
}

fn key() -> SecretKey {
    SecretKey::from_seed(&[7; 32])
}

fn engine(g: &Arc<Fake>, dir: Option<&Path>) -> Engine<Fake> {
    let config = EngineConfig {
        trusted_keys: vec![key().public()],
        max_attempts: 3,
        // Loaded test hosts deschedule threads for tens of ms: only the test of the cap
        // itself uses a tight one.
        max_check: Duration::from_secs(5),
        ..EngineConfig::default()
    };
    Engine::new(
        Arc::clone(g),
        target(),
        ARENA,
        config,
        dir,
        Box::new(crate::rewrites::NoRewrites),
    )
    .unwrap()
}

/// An engine on `target` trusting the test key, with `config`'s other settings.
fn engine_for(g: &Arc<Fake>, target: Target, config: EngineConfig) -> Engine<Fake> {
    let config = EngineConfig {
        trusted_keys: vec![key().public()],
        ..config
    };
    Engine::new(
        Arc::clone(g),
        target,
        ARENA,
        config,
        None,
        Box::new(crate::rewrites::NoRewrites),
    )
    .unwrap()
}

/// An engine trusting the test key, over an OS layer of the test's own.
fn engine_with_os(g: &Arc<Fake>, os: Box<dyn rewrites::TextRewrites>) -> Engine<Fake> {
    let config = EngineConfig {
        trusted_keys: vec![key().public()],
        max_attempts: 3,
        ..EngineConfig::default()
    };
    Engine::new(Arc::clone(g), target(), ARENA, config, None, os).unwrap()
}

fn function_site(name: &str, old: &[u8], new: &[u8]) -> Site {
    Site {
        kind: SiteKind::Function,
        target: Location::Symbol {
            name: name.into(),
            offset: 0,
        },
        expected: old.to_vec(),
        code: new.to_vec(),
        relocations: Vec::new(),
    }
}

fn patch(name: &str, sites: Vec<Site>, replaces: Vec<PatchId>) -> Patch {
    let mut p = Patch {
        meta: Metadata {
            name: name.into(),
            created: 1,
            replaces,
            ..Metadata::default()
        },
        target: identity(),
        sites,
        data: Vec::new(),
    };
    p.normalize();
    p
}

/// f := g's body (returns x+2).
fn fix_f() -> Patch {
    patch("fix-f", vec![function_site("f", &F, &G)], Vec::new())
}

fn signed(p: &Patch) -> Vec<u8> {
    p.to_file_signed(&key()).unwrap()
}

fn temp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("engine-test-{tag}-"))
        .tempdir()
        .unwrap()
}

#[test]
fn apply_then_revert_restores_every_byte() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let before = g.bytes(F_AT, 13);
    let mut e = engine(&g, None);
    let out = e.apply(&signed(&fix_f())).unwrap();
    assert!(!out.already_applied);
    let code_at = ARENA.gva;
    // The jump replaces push rbp; mov rbp,rsp; mov rax,rdi (whole instructions, 7 bytes).
    let jump = g.bytes(F_AT, 7);
    assert_eq!(jump[0], 0xe9);
    let rel = i32::from_le_bytes(jump[1..5].try_into().unwrap());
    assert_eq!((F_AT as i64 + 5 + i64::from(rel)) as u64, code_at);
    assert_eq!(&jump[5..], &[plan::INT3; 2]);
    assert_eq!(g.bytes(code_at, 13), G);
    assert_eq!(g.bytes(F_AT + 7, 6), F[7..]);
    // Idempotent.
    assert!(e.apply(&signed(&fix_f())).unwrap().already_applied);
    let r = e.revert(&out.patch.id[..8]).unwrap();
    assert_eq!(r.state, PatchState::Reverted);
    assert_eq!(g.bytes(F_AT, 13), before);
    assert!(matches!(
        e.revert(&out.patch.id),
        Err(EngineError::NotApplied { .. })
    ));
}

#[test]
fn unsigned_and_untrusted_are_refused_without_touching_the_guest() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mem = g.snapshot();
    let mut e = engine(&g, None);
    let unsigned = fix_f().to_file_unsigned().unwrap();
    assert!(matches!(e.apply(&unsigned), Err(EngineError::Unsigned)));
    let other = fix_f()
        .to_file_signed(&SecretKey::from_seed(&[9; 32]))
        .unwrap();
    assert!(matches!(e.apply(&other), Err(EngineError::Signature(_))));
    let mut wrong = fix_f();
    wrong.target.build_id = Some(vec![9, 9]);
    assert!(matches!(
        e.apply(&signed(&wrong)),
        Err(EngineError::Target(TargetError::BuildId { .. }))
    ));
    let mut stale = fix_f();
    stale.sites[0].expected[10] = 0x07;
    let err = e.apply(&signed(&stale)).unwrap_err();
    assert!(err.to_string().contains("expected bytes at +0xa"), "{err}");
    assert_eq!(g.snapshot(), mem, "a refused patch changed guest memory");
    assert_eq!(
        *g.pauses.lock().unwrap(),
        1,
        "only the paging calibration paused"
    );

    let mut open = engine(&g, None);
    open.config.allow_unsigned = true;
    assert!(open.apply(&unsigned).is_ok());
}

#[test]
fn a_vcpu_in_displaced_bytes_is_moved_to_the_copy() {
    // vCPU 0 sits after `push rbp` (inside the 7 displaced bytes), vCPU 1 at f's entry.
    let g = Fake::new(&[(F_AT + 1, 0x8000), (F_AT, 0x8000)]);
    let mut e = engine(&g, None);
    let out = e.apply(&signed(&fix_f())).unwrap();
    assert_eq!(out.patch.moved_vcpus, 1);
    assert_eq!(
        g.rip(1),
        F_AT,
        "a vCPU at the entry stays: it will take the jump"
    );
    let moved = g.rip(0);
    assert!((ARENA.gva..ARENA.gva + ARENA.size).contains(&moved));
    // The copy at the new RIP is `mov rbp,rsp; mov rax,rdi; jmp f+7`.
    assert_eq!(g.bytes(moved, 6), [0x48, 0x89, 0xe5, 0x48, 0x89, 0xf8]);
    assert_eq!(g.bytes(moved + 6, 1), [0xe9]);
    let rel = i32::from_le_bytes(g.bytes(moved + 7, 4).try_into().unwrap());
    assert_eq!((moved as i64 + 11 + i64::from(rel)) as u64, F_AT + 7);
}

#[test]
fn a_refusal_after_staging_leaves_the_arena_as_it_was() {
    // The arena holds what earlier patches left there; the apply stages its code and ledger,
    // then backs off (a vCPU is inside old f).
    let g = Fake::new(&[(F_AT + 7, 0x8000)]);
    g.write_phys(ARENA.gpa, &vec![0xab; capacity() as usize])
        .unwrap();
    let mut e = engine(&g, None);
    let arena = |g: &Fake| g.bytes(ARENA.gpa, ARENA.size as usize);
    let (before, code) = (arena(&g), g.bytes(F_AT, 0x200));
    let both = patch(
        "fix-both",
        vec![function_site("f", &F, &G), function_site("g", &G, &F)],
        Vec::new(),
    );
    assert!(matches!(
        e.apply(&signed(&both)),
        Err(EngineError::Busy { .. })
    ));
    assert!(arena(&g) == before, "the arena holds what it held");
    assert_eq!(g.bytes(F_AT, 0x200), code);
    assert_eq!(e.arena().free_bytes(), capacity(), "arena given back");
    // The ledger goes on from the one the guest holds: the next apply is recorded there.
    g.vcpus.lock().unwrap()[0].rip = 0x5000;
    let id = e.apply(&signed(&both)).unwrap().patch.id;
    drop(e);
    let e = engine(&g, None);
    assert!(
        e.find(&id).is_ok(),
        "the next attach finds the patch by its ledger"
    );
}

#[test]
fn multi_function_patches_wait_until_old_code_is_idle() {
    // vCPU 0 is in the middle of f (past the displaced bytes): a patch replacing f and g
    // together must not let it finish old f against new g.
    let g = Fake::new(&[(F_AT + 7, 0x8000)]);
    let mem = g.snapshot();
    let mut e = engine(&g, None);
    let both = patch(
        "fix-both",
        vec![function_site("f", &F, &G), function_site("g", &G, &F)],
        Vec::new(),
    );
    let err = e.apply(&signed(&both)).unwrap_err();
    assert!(
        matches!(err, EngineError::Busy { attempts: 3, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("running old f"), "{err}");
    assert_eq!(
        g.bytes(F_AT, 13),
        mem.iter().find(|(k, _)| *k == 0x1000).unwrap().1[..13]
    );
    assert_eq!(e.arena().free_bytes(), capacity(), "arena given back");
    assert_eq!(e.records()[0].state, PatchState::Failed);
    // Once the vCPU has left, it applies.
    g.vcpus.lock().unwrap()[0].rip = 0x5000;
    assert!(e.apply(&signed(&both)).is_ok());
}

#[test]
fn a_return_address_into_displaced_bytes_blocks_the_write() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.write_phys(0x8010, &(F_AT + 4).to_le_bytes()).unwrap();
    let mut e = engine(&g, None);
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(err.to_string().contains("on its stack"), "{err}");
    assert_eq!(g.bytes(F_AT, 13), F);
}

/// A vCPU in user mode (CPL 3) whose stack holds words inside the displaced bytes of f and
/// inside g, as a local user can write them there.
fn user_stack_holding_kernel_words(cpl: u8) -> Arc<Fake> {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.vcpus.lock().unwrap()[0].cpl = cpl;
    g.write_phys(0x8010, &(F_AT + 4).to_le_bytes()).unwrap();
    g.write_phys(0x8018, &(G_AT + 7).to_le_bytes()).unwrap();
    g
}

#[test]
fn a_user_mode_stack_cannot_hold_back_a_patch_of_supervisor_only_code() {
    let both = patch(
        "fix-both",
        vec![function_site("f", &F, &G), function_site("g", &G, &F)],
        Vec::new(),
    );
    // f, g and the arena on supervisor-only pages (a kernel's text), the vCPU in user mode:
    // its stack is the user's, and no return into kernel code is on it. Both patches apply
    // and revert.
    let kernel = vec![(0x1000, 0x2000), (ARENA.gva, ARENA.gva + ARENA.size)];
    let g = user_stack_holding_kernel_words(3);
    *g.supervisor.lock().unwrap() = kernel.clone();
    let mut e = engine(&g, None);
    let out = e
        .apply(&signed(&fix_f()))
        .expect("a user's stack words are not returns");
    assert_eq!(out.attempts, 1);
    e.revert(&out.patch.id).expect("revert");
    assert_eq!(g.bytes(F_AT, 13), F);
    let out = e
        .apply(&signed(&both))
        .expect("nor do they hold old g busy");
    assert_eq!(out.attempts, 1);
    e.revert(&out.patch.id).expect("revert");

    // The same words on the stack of a vCPU in kernel mode are returns: busy, unchanged.
    let g = user_stack_holding_kernel_words(0);
    *g.supervisor.lock().unwrap() = kernel;
    let mut e = engine(&g, None);
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(err.to_string().contains("on its stack"), "{err}");
    let err = e.apply(&signed(&both)).unwrap_err();
    assert!(matches!(err, EngineError::Busy { .. }), "{err}");
    assert_eq!(
        (g.bytes(F_AT, 13), g.bytes(G_AT, 13)),
        (F.to_vec(), G.to_vec())
    );

    // A range user mode can reach keeps the checks for every vCPU: here g, on a user page.
    let g = user_stack_holding_kernel_words(3);
    *g.supervisor.lock().unwrap() = vec![(0x1000, 0x1100)];
    let mut e = engine(&g, None);
    assert!(
        e.apply(&signed(&fix_f())).is_ok(),
        "f alone is out of reach"
    );
    let mut e = engine(&user_stack_holding_kernel_words(3), None);
    let err = e.apply(&signed(&both)).unwrap_err();
    assert!(err.to_string().contains("on its stack"), "{err}");
}

#[test]
fn the_scan_of_a_vcpus_stack_ends_where_the_os_finds_the_registers_user_mode_left() {
    /// User mode's registers from 0x8040 up on the stack a vCPU at 0x8000 is on.
    struct UserFrame;
    impl rewrites::TextRewrites for UserFrame {
        fn reconcile(&self, t: &rewrites::SiteText<'_>, _: &Target) -> Result<Vec<u8>, PlanError> {
            Ok(t.expected.to_vec())
        }
        fn user_frame_at(
            &self,
            _: &VcpuState,
            rsp: u64,
            _: rewrites::GuestMemory<'_>,
        ) -> Option<u64> {
            (rsp == 0x8000).then_some(0x8040)
        }
    }
    // A word inside f's displaced bytes in that frame (a system call's argument) is the
    // user's: the patch applies.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.vcpus.lock().unwrap()[0].cpl = 0;
    g.write_phys(0x8048, &(F_AT + 4).to_le_bytes()).unwrap();
    let mut e = engine_with_os(&g, Box::new(UserFrame));
    let id = e
        .apply(&signed(&fix_f()))
        .expect("the frame is not scanned")
        .patch
        .id;
    e.revert(&id).expect("revert");
    // Below it, the same word is the kernel's: busy, unchanged.
    g.write_phys(0x8038, &(F_AT + 4).to_le_bytes()).unwrap();
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(err.to_string().contains("on its stack"), "{err}");
    assert_eq!(g.bytes(F_AT, 13), F);
}

#[test]
fn the_guest_rewriting_a_patched_site_blocks_revert() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let id = e.apply(&signed(&fix_f())).unwrap().patch.id;
    g.write_phys(F_AT + 1, &[0x90]).unwrap();
    assert!(matches!(e.revert(&id), Err(EngineError::Tampered { .. })));
}

#[test]
fn overlap_is_refused_and_replace_swaps_in_one_blackout() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let first = e.apply(&signed(&fix_f())).unwrap().patch.id;
    // Another patch of f without `replaces`: refused.
    let f3 = {
        let mut b = G;
        b[10] = 3;
        b
    };
    let again = patch("f-plus-3", vec![function_site("f", &F, &f3)], Vec::new());
    let err = e.apply(&signed(&again)).unwrap_err();
    assert!(matches!(err, EngineError::Overlap { .. }), "{err}");
    // With `replaces`, it goes in and the first comes out together.
    let pauses = *g.pauses.lock().unwrap();
    let id = PatchId::from_hex(&first).unwrap();
    let replacing = patch("f-plus-3", vec![function_site("f", &F, &f3)], vec![id]);
    let out = e.apply(&signed(&replacing)).unwrap();
    assert_eq!(out.replaced, vec![first.clone()]);
    assert_eq!(*g.pauses.lock().unwrap(), pauses + 1, "one blackout");
    assert_eq!(e.find(&first).unwrap().state, PatchState::Reverted);
    let code_at = {
        let j = g.bytes(F_AT, 5);
        (F_AT as i64 + 5 + i64::from(i32::from_le_bytes(j[1..5].try_into().unwrap()))) as u64
    };
    assert_eq!(g.bytes(code_at, 13), f3);
    e.revert(&out.patch.id).unwrap();
    assert_eq!(g.bytes(F_AT, 13), F);
}

#[test]
fn an_os_whose_threads_sleep_in_kernel_code_keeps_reverted_code_for_the_run() {
    // No vCPU is anywhere near the reverted code: a Linux task asleep in it would still
    // return into it when it wakes, so none of it is handed out again.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let config = EngineConfig {
        hidden_threads: HiddenThreads::Scheduled(Preemption::Voluntary),
        ..EngineConfig::default()
    };
    let mut e = engine_for(&g, target(), config);
    let first = e.apply(&signed(&fix_f())).unwrap().patch;
    let code_of = |r: &PatchRecord| g.bytes(r.arena[0].gpa, r.arena[0].len as usize);
    let kept = code_of(&first);
    e.revert(&first.id).unwrap();
    let held = e.arena().quarantined_bytes();
    assert!(held > 0);
    for _ in 0..3 {
        let again = e.apply(&signed(&fix_f())).unwrap().patch;
        assert!(
            again
                .arena
                .iter()
                .all(|a| first.arena.iter().all(|b| a.gpa != b.gpa)),
            "the reverted patch's chunks are not handed out again"
        );
        e.revert(&again.id).unwrap();
    }
    assert_eq!(
        code_of(&first),
        kept,
        "its code is still there for a sleeper"
    );
    assert!(e.arena().quarantined_bytes() >= 4 * held);
}

#[test]
fn reverted_arena_code_is_reused_only_once_idle() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let out = e.apply(&signed(&fix_f())).unwrap();
    // The vCPU is inside the new f when it is reverted: the chunk must stay reserved.
    g.vcpus.lock().unwrap()[0].rip = ARENA.gva + 2;
    e.revert(&out.patch.id).unwrap();
    let held = e.arena().quarantined_bytes();
    assert!(held > 0);
    // Next blackout, still there: kept.
    let out2 = e.apply(&signed(&fix_f())).unwrap();
    assert_ne!(
        g.bytes(F_AT, 5),
        F[..5],
        "applied again (into other arena space)"
    );
    // The chunk the vCPU is in stays, and with it the rest of its patch (the escape copy next
    // to it, and data if it had any): a patch's chunks are freed together.
    let still = e.arena().quarantined_bytes();
    assert_eq!(still, held);
    assert!(
        e.arena()
            .quarantined()
            .any(|(a, b)| (a..b).contains(&(ARENA.gva + 2)))
    );
    // It left: the next blackout frees the rest, and the second copy retired after it.
    g.vcpus.lock().unwrap()[0].rip = 0x5000;
    e.revert(&out2.patch.id).unwrap();
    e.apply(&signed(&fix_f())).unwrap();
    assert_eq!(e.arena().quarantined_bytes(), 0);
}

#[test]
fn journal_survives_restart_and_a_restarted_guest_is_noticed() {
    let tmp = temp_dir("restart");
    let dir = tmp.path().to_path_buf();
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let id = {
        let mut e = engine(&g, Some(&dir));
        e.apply(&signed(&fix_f())).unwrap().patch.id
    };
    // Same guest, new engine (API restart): still applied, arena still reserved.
    {
        let e = engine(&g, Some(&dir));
        assert_eq!(e.find(&id).unwrap().state, PatchState::Applied);
        assert!(e.arena().free_bytes() < capacity());
    }
    // A fresh guest (VMM restart): the patch is not there any more.
    let fresh = Fake::new(&[(0x5000, 0x8000)]);
    let e = engine(&fresh, Some(&dir));
    let r = e.find(&id).unwrap();
    assert_eq!(r.state, PatchState::Reverted);
    assert!(
        r.note.as_deref().unwrap_or("").contains("restarted"),
        "{r:?}"
    );
    drop(e);
    drop(tmp);
}

#[test]
fn a_crash_mid_apply_is_repaired() {
    let tmp = temp_dir("crash");
    let dir = tmp.path().to_path_buf();
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let both = patch(
        "fix-both",
        vec![function_site("f", &F, &G), function_site("g", &G, &F)],
        Vec::new(),
    );
    // Apply, then forge the journal's last word back to "applying" and undo one site: the
    // state a crash between the two site writes would leave.
    let rec = {
        let mut e = engine(&g, Some(&dir));
        let mut r = e.apply(&signed(&both)).unwrap().patch;
        r.state = PatchState::Applying;
        e.put(r.clone()).unwrap();
        r
    };
    let s = &rec.sites[1];
    g.write_phys(s.gpa, &s.original).unwrap();
    let e = engine(&g, Some(&dir));
    let r = e.find(&rec.id).unwrap();
    assert_eq!(r.state, PatchState::Failed);
    assert!(
        r.note.as_deref().unwrap_or("").contains("restored"),
        "{r:?}"
    );
    assert_eq!(g.bytes(F_AT, 13), F);
    assert_eq!(g.bytes(G_AT, 13), G);
    drop(e);
    drop(tmp);
}

fn both() -> Patch {
    patch(
        "fix-both",
        vec![function_site("f", &F, &G), function_site("g", &G, &F)],
        Vec::new(),
    )
}

/// Fails every write into `[from, to)`, and with `then_all` every write after the first
/// failure too (so the engine's undo fails as well).
fn fail_writes_in(g: &Fake, from: u64, to: u64, then_all: bool) {
    let mut tripped = false;
    *g.write_fault.lock().unwrap() = Some(Box::new(move |gpa| {
        tripped |= (from..to).contains(&gpa);
        tripped && (then_all || (from..to).contains(&gpa))
    }));
}

#[test]
fn a_failed_write_in_the_blackout_rolls_back_every_site_written() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    // f's jump is written first, then g's fails: f must be put back before the guest resumes.
    fail_writes_in(&g, G_AT, G_AT + 13, false);
    let err = e.apply(&signed(&both())).unwrap_err();
    assert!(matches!(err, EngineError::Guest(_)), "{err}");
    assert_eq!(g.bytes(F_AT, 13), F, "f's jump was left in place");
    assert_eq!(g.bytes(G_AT, 13), G);
    assert_eq!(
        g.bytes(ARENA.gpa, capacity() as usize),
        vec![0; capacity() as usize]
    );
    assert_eq!(e.arena().free_bytes(), capacity(), "arena given back");
    assert_eq!(e.records()[0].state, PatchState::Failed);
    assert!(!*g.paused.lock().unwrap(), "the guest was left paused");
    // Without the fault the same patch applies.
    *g.write_fault.lock().unwrap() = None;
    assert!(e.apply(&signed(&both())).is_ok());
}

#[test]
fn an_undo_that_fails_keeps_the_arena_code_the_guest_can_reach() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    fail_writes_in(&g, G_AT, G_AT + 13, true);
    let err = e.apply(&signed(&both())).unwrap_err();
    assert!(matches!(err, EngineError::Stranded { .. }), "{err}");
    // f's jump could not be undone: the code it jumps to must still be there.
    let jump = g.bytes(F_AT, 5);
    assert_eq!(jump[0], 0xe9);
    let rel = i32::from_le_bytes(jump[1..5].try_into().unwrap());
    let target = (F_AT as i64 + 5 + i64::from(rel)) as u64;
    assert_eq!(
        g.bytes(target, 13),
        G,
        "arena code under a live jump was wiped"
    );
    assert!(
        e.arena().free_bytes() < capacity(),
        "arena under a live jump was freed"
    );
    assert!(!*g.paused.lock().unwrap());
}

#[test]
fn a_failed_vcpu_move_rolls_back_the_writes() {
    // vCPU 0 sits inside f's displaced bytes: it must be moved, and the move fails.
    let g = Fake::new(&[(F_AT + 1, 0x8000)]);
    let mut e = engine(&g, None);
    *g.fail_set_rip.lock().unwrap() = true;
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(matches!(err, EngineError::Guest(_)), "{err}");
    assert_eq!(g.bytes(F_AT, 13), F);
    assert_eq!(g.rip(0), F_AT + 1);
    assert_eq!(e.arena().free_bytes(), capacity());
}

#[test]
fn a_failed_pause_or_resume_never_frees_code_in_use() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    // Calibrate paging first, so the failing pause is the blackout's.
    let id = e.apply(&signed(&fix_f())).unwrap().patch.id;
    e.revert(&id).unwrap();
    *g.fail_pause.lock().unwrap() = true;
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(
        matches!(err, EngineError::Guest(GuestError::Pause(_))),
        "{err}"
    );
    assert_eq!(g.bytes(F_AT, 13), F);
    *g.fail_pause.lock().unwrap() = false;

    // Resume fails after every site was written: the patch is in, its code must stay.
    *g.fail_resume.lock().unwrap() = true;
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(matches!(err, EngineError::Stranded { .. }), "{err}");
    assert_eq!(g.bytes(F_AT, 1), [0xe9]);
    assert!(e.arena().free_bytes() < capacity());
}

#[test]
fn a_hostile_stack_pointer_cannot_make_the_scan_wrap_or_grow() {
    // RSP at the very top of the address space: the page arithmetic must not wrap to 0 and
    // scan all of memory.
    let g = Fake::new(&[(0x5000, u64::MAX - 7)]);
    let mut e = engine(&g, None);
    e.config.stack_scan = usize::MAX;
    let vcpu = g.vcpus.lock().unwrap()[0];
    let (words, _) = e.stack_words(&vcpu);
    assert_eq!(words.len(), 1, "scanned past the top of the address space");
    // A huge configured scan is capped.
    let vcpu = VcpuState {
        rsp: 0x8000,
        ..vcpu
    };
    assert_eq!(e.stack_words(&vcpu).0.len(), MAX_STACK_SCAN / 8);
    assert!(e.apply(&signed(&fix_f())).is_ok());
}

#[test]
fn recovery_notes_say_what_the_guest_holds_and_another_build_is_not_touched() {
    let dir = temp_dir("recovery-notes");
    let g = Fake::new(&[(0x5000, 0x8000)]);
    // Applied, then the journal forged to "applying" and both sites set back: what a restart
    // of the guest after the sites were written looks like. The note must not claim the apply
    // stopped before writing.
    let rec = {
        let mut e = engine(&g, Some(dir.path()));
        let mut r = e.apply(&signed(&both())).unwrap().patch;
        r.state = PatchState::Applying;
        e.put(r.clone()).unwrap();
        r
    };
    for s in &rec.sites {
        g.write_phys(s.gpa, &s.original).unwrap();
    }
    let e = engine(&g, Some(dir.path()));
    let note = e.find(&rec.id).unwrap().note.clone().unwrap_or_default();
    assert!(
        note.contains("holds the original bytes at every site"),
        "{note}"
    );
    assert!(!note.contains("before any site was written"), "{note}");
    drop(e);

    // A record for another build: the guest holds its patched bytes at one site, but recovery
    // must not touch a guest running other code.
    let mut e = engine(&g, Some(dir.path()));
    let mut r = e.apply(&signed(&fix_f())).unwrap().patch;
    r.state = PatchState::Applying;
    r.target = Some("build-id:00".into());
    e.put(r.clone()).unwrap();
    drop(e);
    let before = g.snapshot();
    let e = engine(&g, Some(dir.path()));
    assert_eq!(
        g.snapshot(),
        before,
        "recovery wrote into a guest of another build"
    );
    let got = e.find(&r.id).unwrap();
    assert_eq!(got.state, PatchState::Failed);
    assert!(
        got.note
            .as_deref()
            .unwrap_or("")
            .contains("was not touched"),
        "{got:?}"
    );
    drop(e);

    // Half-written with one site overwritten by the guest: the note says which were left.
    let g2 = Fake::new(&[(0x5000, 0x8000)]);
    let dir2 = temp_dir("recovery-partial");
    let rec = {
        let mut e = engine(&g2, Some(dir2.path()));
        let mut r = e.apply(&signed(&both())).unwrap().patch;
        r.state = PatchState::Applying;
        e.put(r.clone()).unwrap();
        r
    };
    g2.write_phys(rec.sites[1].gpa, &[0x90; 5]).unwrap();
    let e = engine(&g2, Some(dir2.path()));
    let note = e.find(&rec.id).unwrap().note.clone().unwrap_or_default();
    assert!(note.contains("1 of 2 sites restored"), "{note}");
    assert!(note.contains("left alone"), "{note}");
    assert_eq!(g2.bytes(F_AT, 13), F);
    drop(e);
}

#[test]
fn checks_that_keep_the_guest_parked_too_long_write_nothing() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    e.config.max_check = MAX_CHECK_TIME;
    let before = g.bytes(F_AT, 13);
    *g.read_delay.lock().unwrap() = Some(MAX_CHECK_TIME / 2);
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(matches!(err, EngineError::Busy { .. }), "{err}");
    assert!(err.to_string().contains("µs limit"), "{err}");
    assert_eq!(g.bytes(F_AT, 13), before);
    assert!(!*g.paused.lock().unwrap());
}

#[test]
fn a_patch_checked_outside_the_engine_applies_and_its_refusals_count() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let before = g.bytes(F_AT, 1);
    let v = e.verifier();
    let unsigned = fix_f().to_file_unsigned().unwrap();
    assert!(matches!(v.check(&unsigned), Err(EngineError::Unsigned)));
    assert!(matches!(v.check(b"junk"), Err(EngineError::Malformed(_))));
    e.note_refused();
    assert_eq!(g.bytes(F_AT, 1), before, "checking touched the guest");
    let out = e
        .apply_checked(v.check(&signed(&fix_f())).unwrap())
        .unwrap();
    assert!(!out.already_applied);
    assert_eq!(g.bytes(F_AT, 1), [0xe9]);
    let again = e
        .apply_checked(v.check(&signed(&fix_f())).unwrap())
        .unwrap();
    assert!(again.already_applied);
    assert_eq!(e.metrics().refused, 1);
    assert_eq!(e.metrics().applied, 1);
}

/// Applies `both()` with a state dir, then rewrites its journal record with `forge` and sets
/// the second site back to its original bytes: a half-written apply whose record says what
/// `forge` made it say. Returns the record as forged.
fn forged_half_apply(
    g: &Arc<Fake>,
    dir: &Path,
    forge: impl FnOnce(&mut PatchRecord),
) -> PatchRecord {
    let mut e = engine(g, Some(dir));
    let mut r = e.apply(&signed(&both())).unwrap().patch;
    let s = r.sites[1].clone();
    g.write_phys(s.gpa, &s.original).unwrap();
    r.state = PatchState::Applying;
    forge(&mut r);
    e.put(r.clone()).unwrap();
    r
}

fn kept_file(dir: &Path, id: &str) -> std::path::PathBuf {
    dir.join(journal::PATCHES_DIR).join(format!("{id}.hpatch"))
}

#[test]
fn recovery_writes_only_bytes_the_signed_patch_vouches_for() {
    let expect_untouched = |g: &Arc<Fake>, dir: &Path, id: &str, want: &str| {
        let before = g.snapshot();
        let e = engine(g, Some(dir));
        assert_eq!(
            g.snapshot(),
            before,
            "recovery wrote into the guest ({want})"
        );
        let r = e.find(id).unwrap();
        assert_eq!(r.state, PatchState::Failed, "{r:?}");
        let note = r.note.clone().unwrap_or_default();
        assert!(
            note.contains("not recovered") && note.contains(want),
            "{note}"
        );
    };

    // Original bytes that are not the patch's expected bytes: a local user's code.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-bytes");
    let r = forged_half_apply(&g, dir.path(), |r| {
        r.sites[0].original = vec![0xcc; r.sites[0].original.len()]
    });
    expect_untouched(&g, dir.path(), &r.id, "original bytes are not the ones");

    // The right bytes aimed at other code: a guest-physical address the site is not at, whose
    // current bytes the record claims as "patched".
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-gpa");
    let other_code = [0x0f, 0x0b, 0x0f, 0x0b, 0x0f, 0x0b, 0x0f];
    g.write_phys(0x2000, &other_code).unwrap();
    let r = forged_half_apply(&g, dir.path(), |r| {
        r.sites[0].gpa = 0x2000;
        r.sites[0].patched = other_code.to_vec();
    });
    expect_untouched(&g, dir.path(), &r.id, "guest's page tables put it at");

    // Patched bytes that are no jump of this engine.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-jump");
    let r = forged_half_apply(&g, dir.path(), |r| {
        r.sites[0].patched = vec![0x90; r.sites[0].patched.len()]
    });
    g.write_phys(r.sites[0].gpa, &r.sites[0].patched).unwrap();
    expect_untouched(&g, dir.path(), &r.id, "not a jump this engine writes");

    // No signed file beside the journal, or another (validly signed) patch's file there.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-missing");
    let r = forged_half_apply(&g, dir.path(), |_| {});
    std::fs::remove_file(kept_file(dir.path(), &r.id)).unwrap();
    expect_untouched(&g, dir.path(), &r.id, "is missing");

    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-other");
    let r = forged_half_apply(&g, dir.path(), |_| {});
    std::fs::write(kept_file(dir.path(), &r.id), signed(&fix_f())).unwrap();
    expect_untouched(&g, dir.path(), &r.id, "not this one");

    // A kept file no trusted key signed any more (the operator rotated keys).
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-key");
    let r = forged_half_apply(&g, dir.path(), |_| {});
    let other = SecretKey::from_seed(&[9; 32]);
    std::fs::write(
        kept_file(dir.path(), &r.id),
        both().to_file_signed(&other).unwrap(),
    )
    .unwrap();
    expect_untouched(&g, dir.path(), &r.id, "refused now");

    // The honest record of the same crash is repaired, and its kept file is then dropped.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-honest");
    let r = forged_half_apply(&g, dir.path(), |_| {});
    let e = engine(&g, Some(dir.path()));
    assert_eq!(g.bytes(F_AT, 13), F);
    assert_eq!(g.bytes(G_AT, 13), G);
    assert_eq!(e.find(&r.id).unwrap().state, PatchState::Failed);
    assert!(!kept_file(dir.path(), &r.id).exists());
}

#[test]
fn a_revert_after_restart_needs_the_signed_patch_beside_the_journal() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let dir = temp_dir("vouch-revert");
    let id = engine(&g, Some(dir.path()))
        .apply(&signed(&fix_f()))
        .unwrap()
        .patch
        .id;
    let kept = kept_file(dir.path(), &id);
    assert!(
        kept.exists(),
        "the signed file is kept while the patch is in"
    );

    // Without it the patch stays in, listed with why, and a revert writes nothing.
    let saved = std::fs::read(&kept).unwrap();
    std::fs::remove_file(&kept).unwrap();
    {
        let mut e = engine(&g, Some(dir.path()));
        let r = e.find(&id).unwrap();
        assert_eq!(r.state, PatchState::Applied);
        assert!(
            r.note.as_deref().unwrap_or("").contains("will not revert"),
            "{r:?}"
        );
        let before = g.snapshot();
        let err = e.revert(&id).unwrap_err();
        assert!(matches!(err, EngineError::Unvouched { .. }), "{err}");
        assert!(err.to_string().contains("is missing"), "{err}");
        assert_eq!(g.snapshot(), before);
        // Nor can a patch replace it.
        let mut p = fix_f();
        p.meta.name = "fix-f-2".into();
        p.meta.replaces = vec![PatchId::from_hex(&id).unwrap()];
        p.normalize();
        let err = e.apply(&signed(&p)).unwrap_err();
        assert!(matches!(err, EngineError::Unvouched { .. }), "{err}");
        assert_eq!(g.snapshot(), before);
    }

    // Put back, the next run may revert it, and the file goes with the patch.
    std::fs::write(&kept, saved).unwrap();
    let mut e = engine(&g, Some(dir.path()));
    e.revert(&id).unwrap();
    assert_eq!(g.bytes(F_AT, 13), F);
    assert!(!kept.exists());
}

#[test]
fn the_list_and_metrics_answer_while_a_patch_is_planned() {
    use std::sync::atomic::Ordering;
    use std::sync::mpsc;
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let shared = Arc::new(shared::SharedEngine::new(engine(&g, None)));
    // Planning stops in its first read of the running guest, until released.
    g.hold_reads(true);
    let apply = {
        let shared = shared.clone();
        std::thread::spawn(move || shared.apply(&signed(&fix_f())))
    };
    let t0 = Instant::now();
    while !g.held.load(Ordering::SeqCst) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "planning never read the guest"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Readers answer now, on another thread so that a regression fails instead of hanging.
    let (tx, rx) = mpsc::channel();
    {
        let shared = shared.clone();
        std::thread::spawn(move || {
            let e = shared.read();
            let _ = tx.send((e.metrics().applies, e.records().len()));
        });
    }
    let got = rx.recv_timeout(Duration::from_secs(30));
    assert_eq!(
        got,
        Ok((0, 0)),
        "metrics and the list waited for the planning"
    );
    assert!(!apply.is_finished());
    g.hold_reads(false);
    let out = apply.join().unwrap().unwrap();
    assert_eq!(shared.read().records().len(), 1);
    assert_eq!(shared.read().metrics().applies, 1);
    assert_eq!(g.bytes(F_AT, 13)[0], 0xe9, "{out:?}");
    shared.revert(&out.patch.id).unwrap();
    assert_eq!(g.bytes(F_AT, 13), F);
}

#[test]
fn a_request_that_panicked_holding_the_engine_does_not_stop_the_others() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let shared = Arc::new(shared::SharedEngine::new(engine(&g, None)));
    let s2 = shared.clone();
    let _ = std::thread::spawn(move || {
        let _e = s2.write();
        panic!("a handler panicked");
    })
    .join();
    assert!(shared.read().records().is_empty());
    let out = shared.apply(&signed(&fix_f())).unwrap();
    shared.revert(&out.patch.id).unwrap();
    assert_eq!(g.bytes(F_AT, 13), F);
}

#[test]
fn a_site_across_a_page_the_guest_remapped_since_planning_is_not_written() {
    // h's first instructions straddle a page boundary.
    const H_AT: u64 = 0x1ffd;
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.write_phys(H_AT, &F).unwrap();
    let target = Target::new(
        ImageInfo {
            identity: identity(),
            symbols: vec![ImageSymbol {
                name: "h".into(),
                addr: H_AT,
                size: 13,
                function: true,
            }],
        },
        0,
    );
    let mut e = engine_for(&g, target, EngineConfig::default());
    let fix = patch("fix-h", vec![function_site("h", &F, &G)], Vec::new());
    let paging = e.paging().unwrap();
    let planned = e
        .plan_apply(e.verifier().check(&signed(&fix)).unwrap(), paging)
        .unwrap();
    // The guest moves h's second page to a copy (same bytes, another frame); its page-table
    // root stays the same.
    let second = g.bytes(0x2000, 0x1000);
    g.write_phys(0x9000, &second).unwrap();
    g.remap.lock().unwrap().insert(0x2000, 0x9000);
    let code = |g: &Fake| (g.bytes(0x1000, 0x2000), g.bytes(0x9000, 0x1000));
    let before = code(&g);
    let r = e.commit_planned(planned);
    assert!(matches!(r, Err(EngineError::Raced { .. })), "{r:?}");
    assert!(code(&g) == before, "no byte of h's frames was written");
    // Planned again, through the new mapping: h is no longer one contiguous range.
    assert!(matches!(
        e.apply(&signed(&fix)),
        Err(EngineError::Discontiguous { .. })
    ));
    assert!(code(&g) == before);
}

#[test]
fn a_plan_made_before_another_change_is_refused_as_stale() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let paging = e.paging().unwrap();
    let planned = e
        .plan_apply(e.verifier().check(&signed(&fix_f())).unwrap(), paging)
        .unwrap();
    // Another patch goes in between planning and commit.
    let other = patch("fix-g", vec![function_site("g", &G, &F)], Vec::new());
    e.apply(&signed(&other)).unwrap();
    let before = g.snapshot();
    assert!(matches!(e.commit_planned(planned), Err(EngineError::Stale)));
    assert_eq!(g.snapshot(), before);
}

#[test]
fn sites_are_translated_in_the_address_space_the_os_maps_its_code_in() {
    /// A kernel with page-table isolation: a vCPU parked in user mode holds the user CR3.
    struct KernelView;
    impl rewrites::TextRewrites for KernelView {
        fn reconcile(&self, t: &rewrites::SiteText<'_>, _: &Target) -> Result<Vec<u8>, PlanError> {
            Ok(t.expected.to_vec())
        }
        fn code_view(&self, v: &VcpuState) -> VcpuState {
            let mut k = *v;
            k.paging.cr3 &= !0x1fff;
            k
        }
    }
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.vcpus.lock().unwrap()[0].paging.cr3 = 0x7000 | 0x1000;
    // The user tables do not map the kernel's code or the arena.
    *g.supervisor.lock().unwrap() = vec![(0x1000, 0x2000), (ARENA.gva, ARENA.gva + ARENA.size)];
    *g.user_roots.lock().unwrap() = vec![0x7000 | 0x1000];
    let mut e = engine_with_os(&g, Box::new(KernelView));
    let id = e.apply(&signed(&fix_f())).unwrap().patch.id;
    e.revert(&id).unwrap();
    // The code (sites, functions) through the kernel's view; a vCPU's own stack is read
    // through its own page tables, which map it whichever half it runs in.
    let code: Vec<u64> = g
        .translated_with
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, gva)| (F_AT..G_AT + 13).contains(gva))
        .map(|(cr3, _)| *cr3)
        .collect();
    assert!(!code.is_empty());
    assert!(code.iter().all(|&cr3| cr3 == 0x6000), "{code:x?}");
}

#[test]
fn page_tables_learned_from_a_process_that_has_exited_are_learned_again() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.vcpus.lock().unwrap()[0].paging.cr3 = 0xa000;
    let mut e = engine(&g, None);
    e.apply(&signed(&fix_f())).unwrap();
    // The process the vCPU ran exits: its table is freed and the vCPU runs another.
    g.freed_roots.lock().unwrap().push(0xa000);
    g.vcpus.lock().unwrap()[0].paging.cr3 = 0xb000;
    let pauses = *g.pauses.lock().unwrap();
    e.apply(&signed(&fix_g())).unwrap();
    assert_eq!(g.bytes(G_AT, 1), [0xe9], "g is patched");
    assert_eq!(
        *g.pauses.lock().unwrap(),
        pauses + 2,
        "one short pause to learn the tables again, one blackout"
    );
}

fn fix_g() -> Patch {
    patch("fix-g", vec![function_site("g", &G, &F)], Vec::new())
}

fn chunks_of(r: &PatchRecord) -> Vec<(u64, u64)> {
    r.arena.iter().map(|a| (a.gpa, a.gpa + a.len)).collect()
}

#[test]
fn another_state_dir_sees_the_live_patch_in_the_guest_and_never_allocates_over_it() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let (a, b) = (temp_dir("ledger-a"), temp_dir("ledger-b"));
    let first = engine(&g, Some(a.path()))
        .apply(&signed(&fix_f()))
        .unwrap()
        .patch;

    // A fresh state dir (or a lost one): the guest's ledger names the patch, its jump is there.
    let mut e = engine(&g, Some(b.path()));
    let seen = e.find(&first.id).unwrap().clone();
    assert_eq!(seen.state, PatchState::Applied);
    assert!(
        seen.note.as_deref().unwrap_or("").contains("arena ledger"),
        "{seen:?}"
    );
    assert_eq!(chunks_of(&seen), chunks_of(&first));
    // Nothing vouches for its original bytes here: no revert, the guest untouched.
    let before = g.snapshot();
    let err = e.revert(&first.id).unwrap_err();
    assert!(matches!(err, EngineError::Unvouched { .. }), "{err}");
    assert_eq!(g.snapshot(), before);
    // A new patch goes elsewhere in the arena.
    let other = e.apply(&signed(&fix_g())).unwrap().patch;
    for (s, t) in chunks_of(&other) {
        for (u, v) in chunks_of(&first) {
            assert!(t <= u || s >= v, "{:?} over the live {:?}", (s, t), (u, v));
        }
    }
    // Its signed file, given again, adopts it; then it reverts like any other.
    let adopted = e.apply(&signed(&fix_f())).unwrap();
    assert!(adopted.already_applied);
    assert_eq!(adopted.patch.sites[0].location, "f");
    e.revert(&first.id).unwrap();
    assert_eq!(g.bytes(F_AT, 13), F);
    e.revert(&other.id).unwrap();
    assert_eq!(g.bytes(G_AT, 13), G);
    drop(e);
    // No state dir at all: the same from the guest.
    let g2 = Fake::new(&[(0x5000, 0x8000)]);
    let id = engine(&g2, None).apply(&signed(&fix_f())).unwrap().patch.id;
    let e2 = engine(&g2, None);
    assert_eq!(e2.find(&id).unwrap().state, PatchState::Applied);
}

#[test]
fn a_ledger_is_a_claim_to_verify_not_to_believe() {
    let layout = ledger::Layout::for_arena(ARENA.size);
    // The jump gone (the guest restarted the code, say): the patch is not listed, and its
    // chunks wait in quarantine rather than being handed out at once.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let first = engine(&g, None).apply(&signed(&fix_f())).unwrap().patch;
    g.write_phys(F_AT, &F).unwrap();
    let e = engine(&g, None);
    assert!(e.find(&first.id).is_err());
    assert!(e.arena().quarantined_bytes() > 0);
    drop(e);
    // Both slots scribbled on: no claim is believed (and nothing crashes).
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let first = engine(&g, None).apply(&signed(&fix_f())).unwrap().patch;
    g.write_phys(ARENA.gpa + layout.offset + 20, &[0x41; 4])
        .unwrap();
    g.write_phys(ARENA.gpa + layout.offset + layout.slot + 20, &[0x41; 4])
        .unwrap();
    let e = engine(&g, None);
    assert!(e.find(&first.id).is_err());
    assert_eq!(e.arena().free_bytes(), capacity());
}

#[test]
fn a_ledger_claiming_a_site_at_the_top_of_the_address_space_is_disbelieved_not_a_panic() {
    // The ledger lives in guest memory: a guest can write one with a self-consistent
    // checksum that claims a jump in the last bytes of the address space.
    let layout = ledger::Layout::for_arena(ARENA.size);
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let l = ledger::Ledger {
        seq: 1,
        owner: [0; 16],
        chunks: vec![ledger::Claim {
            patch: [7; 32],
            chunk: Chunk { offset: 0, len: 64 },
            quarantined: false,
        }],
        sites: vec![ledger::SiteClaim {
            patch: [7; 32],
            gva: 0xffff_ffff_ffff_fff0,
            len: 16,
        }],
    };
    let bytes = l.encode(layout.slot).unwrap();
    g.write_phys(ARENA.gpa + layout.offset + layout.slot, &bytes)
        .unwrap();
    let e = engine(&g, None);
    assert!(e.records().is_empty());
    assert_eq!(
        e.arena().free_bytes() + e.arena().quarantined_bytes(),
        capacity()
    );
}

#[test]
fn far_jumps_can_be_asked_for_where_a_near_one_would_reach() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let config = EngineConfig {
        trusted_keys: vec![key().public()],
        far_jumps: true,
        ..EngineConfig::default()
    };
    let mut e = Engine::new(
        g.clone(),
        target(),
        ARENA,
        config,
        None,
        Box::new(crate::rewrites::NoRewrites),
    )
    .unwrap();
    // f (13 bytes) holds a 5-byte jump but not the 14-byte one it was asked for.
    let before = g.snapshot();
    match e.apply(&signed(&fix_f())) {
        Err(EngineError::Plan(PlanError::TooShort { needed: 14, .. })) => {}
        other => panic!("expected the far jump to be planned: {other:?}"),
    }
    assert_eq!(g.snapshot(), before);
}

#[test]
fn a_dry_run_checks_everything_and_writes_nothing() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let before = g.snapshot();
    e.dry_run(&signed(&fix_f())).unwrap();
    let mut wrong = fix_f();
    wrong.sites[0].expected[3] ^= 1;
    wrong.normalize();
    assert!(matches!(
        e.dry_run(&signed(&wrong)),
        Err(EngineError::Plan(PlanError::ExpectedMismatch { .. }))
    ));
    assert_eq!(g.snapshot(), before);
    assert!(e.records().is_empty());
    assert_eq!(e.metrics().refused, 0);
}

#[test]
fn a_difference_where_the_os_rewrites_its_code_is_refused_naming_it() {
    struct Explains;
    impl rewrites::TextRewrites for Explains {
        fn reconcile(&self, t: &rewrites::SiteText<'_>, _: &Target) -> Result<Vec<u8>, PlanError> {
            Ok(t.expected.to_vec())
        }
        fn explain(&self, at: u64, _: &Target) -> Option<String> {
            (at == F_AT + 4).then(|| "an alternative (.altinstructions)".to_string())
        }
    }
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let config = EngineConfig {
        trusted_keys: vec![key().public()],
        ..EngineConfig::default()
    };
    let mut e = Engine::new(g.clone(), target(), ARENA, config, None, Box::new(Explains)).unwrap();
    g.write_phys(F_AT + 4, &[0x90]).unwrap();
    let before = g.snapshot();
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(
        matches!(err, EngineError::Plan(PlanError::RewrittenByOs { at, .. }) if at == F_AT + 4),
        "{err:?}"
    );
    assert!(err.to_string().contains("an alternative"), "{err}");
    assert_eq!(g.snapshot(), before);
    // Elsewhere the plain refusal stays.
    g.write_phys(F_AT + 4, &[F[4]]).unwrap();
    g.write_phys(F_AT + 7, &[0x90]).unwrap();
    assert!(matches!(
        e.apply(&signed(&fix_f())),
        Err(EngineError::Plan(PlanError::ExpectedMismatch {
            offset: 7,
            ..
        }))
    ));
}

#[test]
fn absolute_symbols_resolve_unslid_and_only_when_no_image_symbol_has_the_name() {
    let t = Target::new(
        ImageInfo {
            identity: identity(),
            symbols: vec![ImageSymbol {
                name: "f".into(),
                addr: F_AT,
                size: 13,
                function: true,
            }],
        },
        0x2000_0000,
    )
    .with_absolute([
        ("current_task".to_string(), 0x1fb80),
        ("f".to_string(), 0x10),
        ("twice".to_string(), 1),
        ("twice".to_string(), 2),
    ]);
    assert_eq!(t.symbol("current_task"), Some(0x1fb80));
    assert_eq!(t.symbol("f"), Some(F_AT + 0x2000_0000));
    assert_eq!(t.symbol("twice"), None);
    assert_eq!(t.symbol("nothing"), None);
}

#[test]
fn a_cold_part_is_not_a_function_to_patch() {
    let cold = Target::new(
        ImageInfo {
            identity: identity(),
            symbols: vec![ImageSymbol {
                name: "f.cold".into(),
                addr: F_AT,
                size: 13,
                function: true,
            }],
        },
        0,
    );
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let config = EngineConfig {
        trusted_keys: vec![key().public()],
        ..EngineConfig::default()
    };
    let mut e = Engine::new(
        g.clone(),
        cold,
        ARENA,
        config,
        None,
        Box::new(crate::rewrites::NoRewrites),
    )
    .unwrap();
    let before = g.snapshot();
    let p = patch("cold", vec![function_site("f.cold", &F, &G)], Vec::new());
    let err = e.apply(&signed(&p)).unwrap_err();
    assert!(
        matches!(&err, EngineError::Plan(PlanError::ColdPart { function, .. }) if function == "f.cold"),
        "{err:?}"
    );
    assert_eq!(g.snapshot(), before);
}

/// f := code that reads the patch's own data: `lea rax, [rip+data[1]]` (rel32), `movabs rcx,
/// data[0]+2` (abs64), `ret`. Block 1 asks for 64-byte alignment.
fn fix_f_with_data() -> Patch {
    let mut code = vec![0x48, 0x8d, 0x05, 0, 0, 0, 0];
    code.extend_from_slice(&[0x48, 0xb9, 0, 0, 0, 0, 0, 0, 0, 0]);
    code.push(0xc3);
    let mut site = function_site("f", &F, &code);
    site.relocations = vec![
        patch_format::Relocation {
            offset: 3,
            kind: patch_format::RelocKind::Rel32,
            target: patch_format::RelocTarget::Data(1),
            addend: -4,
        },
        patch_format::Relocation {
            offset: 9,
            kind: patch_format::RelocKind::Abs64,
            target: patch_format::RelocTarget::Data(0),
            addend: 2,
        },
    ];
    let mut p = patch("fix-f-data", vec![site], Vec::new());
    p.data = vec![
        patch_format::DataBlock {
            align: 1,
            bytes: b"hello\0".to_vec(),
        },
        patch_format::DataBlock {
            align: 64,
            bytes: vec![0x11; 8],
        },
    ];
    p
}

/// Where `f`'s jump leads.
fn jump_target(g: &Fake) -> u64 {
    let jump = g.bytes(F_AT, 5);
    assert_eq!(jump[0], 0xe9, "f is patched");
    let rel = i32::from_le_bytes(jump[1..5].try_into().unwrap());
    (F_AT as i64 + 5 + i64::from(rel)) as u64
}

#[test]
fn data_is_placed_in_the_arena_relocated_accounted_for_and_freed_by_revert() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let free0 = e.arena().free_bytes();
    let out = e.apply(&signed(&fix_f_with_data())).unwrap();
    let code_at = jump_target(&g);
    let code = g.bytes(code_at, 18);
    // The rel32 reaches block 1, 64-byte aligned, holding its bytes.
    let disp = i32::from_le_bytes(code[3..7].try_into().unwrap());
    let block1 = (code_at as i64 + 7 + i64::from(disp)) as u64;
    assert_eq!(block1 % 64, 0, "{block1:#x}");
    assert_eq!(g.bytes(block1, 8), vec![0x11; 8]);
    // The abs64 is block 0 + 2.
    let block0 = u64::from_le_bytes(code[9..17].try_into().unwrap()) - 2;
    assert_eq!(g.bytes(block0, 6), b"hello\0");
    // Both blocks lie in one chunk of the patch's record (so the ledger and revert know it),
    // apart from its code.
    let chunks = chunks_of(&out.patch);
    let data_chunk = chunks
        .iter()
        .find(|(s, t)| (*s..*t).contains(&block0))
        .copied()
        .expect("a recorded chunk holds the data");
    assert!((data_chunk.0..data_chunk.1).contains(&(block1 + 7)));
    assert!(!(data_chunk.0..data_chunk.1).contains(&code_at));
    for (s, t) in &chunks {
        assert!(*t <= data_chunk.0 || *s >= data_chunk.1 || (*s, *t) == data_chunk);
    }
    // Every byte of the data chunk is the patch's or zero.
    let whole = g.bytes(data_chunk.0, (data_chunk.1 - data_chunk.0) as usize);
    let nonzero: usize = whole.iter().filter(|b| **b != 0).count();
    assert_eq!(nonzero, b"hello".len() + 8);
    assert_eq!(
        e.arena().free_bytes(),
        free0 - chunks.iter().map(|(s, t)| t - s).sum::<u64>()
    );
    // A second patch never lands on the data.
    let other = e.apply(&signed(&fix_g())).unwrap().patch;
    for (s, t) in chunks_of(&other) {
        assert!(t <= data_chunk.0 || s >= data_chunk.1);
    }
    e.revert(&other.id).unwrap();
    // Revert: f is back; the code and the data wait in quarantine together while a vCPU is
    // still in the new code, and are freed together once it left.
    g.vcpus.lock().unwrap()[0].rip = code_at + 7;
    e.revert(&out.patch.id).unwrap();
    assert_eq!(g.bytes(F_AT, 13), F);
    assert!(
        e.arena()
            .quarantined()
            .any(|(a, b)| (a..b).contains(&block0))
    );
    let g_id = e.apply(&signed(&fix_g())).unwrap().patch.id;
    assert!(
        e.arena()
            .quarantined()
            .any(|(a, b)| (a..b).contains(&block0)),
        "the data was freed while its code could still run"
    );
    g.vcpus.lock().unwrap()[0].rip = 0x5000;
    e.revert(&g_id).unwrap();
    e.apply(&signed(&fix_g())).unwrap();
    assert_eq!(e.arena().quarantined_bytes(), 0);
    assert!(
        !e.arena()
            .quarantined()
            .any(|(a, b)| (a..b).contains(&block0))
    );
}

#[test]
fn data_that_does_not_fit_is_refused_with_the_guest_untouched() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = engine(&g, None);
    let mem = g.snapshot();
    let mut p = fix_f_with_data();
    p.data[0].bytes = vec![0x5a; capacity() as usize];
    let err = e.apply(&signed(&p)).unwrap_err();
    assert!(matches!(err, EngineError::ArenaFull { .. }), "{err}");
    assert_eq!(g.snapshot(), mem, "a refused patch changed guest memory");
    assert_eq!(e.arena().free_bytes(), capacity());
    // A dry run places the data too, and writes nothing.
    e.dry_run(&signed(&fix_f_with_data())).unwrap();
    assert_eq!(g.snapshot(), mem);
}

/// What a refusal must leave as it was: the code and the arena.
fn code_and_arena(g: &Fake) -> (Vec<u8>, Vec<u8>) {
    (
        g.bytes(F_AT, 0x400),
        g.bytes(ARENA.gpa, ARENA.size as usize),
    )
}

fn scheduled(preemption: Preemption) -> EngineConfig {
    EngineConfig {
        hidden_threads: HiddenThreads::Scheduled(preemption),
        ..EngineConfig::default()
    }
}

#[test]
fn a_kernel_that_preempts_anywhere_gets_no_jump_over_several_instructions() {
    // f's jump displaces three instructions (push rbp; mov rbp,rsp; mov rax,rdi).
    const MODE: u64 = 0x3000;
    let dynamic = || {
        scheduled(Preemption::Dynamic {
            mode_at: MODE,
            voluntary: vec![0, 1],
        })
    };
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let refused = |e: &mut Engine<Fake>| {
        let before = code_and_arena(&g);
        let err = e.apply(&signed(&fix_f())).unwrap_err();
        assert!(code_and_arena(&g) == before, "the guest is byte-identical");
        assert!(
            matches!(
                &err,
                EngineError::Plan(PlanError::PreemptedInsideJump { at, count: 3, .. })
                    if *at == F_AT + 1
            ),
            "{err}"
        );
        err.to_string()
    };
    let full = refused(&mut engine_for(&g, target(), scheduled(Preemption::Full)));
    assert!(full.contains("full preemption"), "{full}");
    g.write_phys(MODE, &2u32.to_le_bytes()).unwrap();
    let mode_full = refused(&mut engine_for(&g, target(), dynamic()));
    assert!(mode_full.contains("word holds 2"), "{mode_full}");
    // A mode word that cannot be read counts as full.
    let unreadable = scheduled(Preemption::Dynamic {
        mode_at: u64::MAX - 1,
        voluntary: vec![0, 1],
    });
    let why = refused(&mut engine_for(&g, target(), unreadable));
    assert!(why.contains("could not be read"), "{why}");
    // Voluntary: it goes in.
    g.write_phys(MODE, &1u32.to_le_bytes()).unwrap();
    let mut e = engine_for(&g, target(), dynamic());
    let id = e.apply(&signed(&fix_f())).unwrap().patch.id;
    e.revert(&id).unwrap();
    // Switched to full between planning and the blackout: nothing is written.
    let paging = e.paging().unwrap();
    let planned = e
        .plan_apply(e.verifier().check(&signed(&fix_f())).unwrap(), paging)
        .unwrap();
    g.write_phys(MODE, &2u32.to_le_bytes()).unwrap();
    let before = code_and_arena(&g);
    let err = e.commit_planned(planned).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Plan(PlanError::PreemptedInsideJump { .. })
        ),
        "{err}"
    );
    assert!(code_and_arena(&g) == before, "the guest is byte-identical");
}

#[test]
fn an_interrupted_context_on_another_stack_holds_the_write_back() {
    /// An OS whose vCPU, parked in an interrupt handler, left the interrupted context's
    /// stack at `TASK_RSP` (Linux: the IRQ stack's top slot).
    struct Interrupted;
    const TASK_RSP: u64 = 0x9000;
    impl rewrites::TextRewrites for Interrupted {
        fn reconcile(&self, t: &rewrites::SiteText<'_>, _: &Target) -> Result<Vec<u8>, PlanError> {
            Ok(t.expected.to_vec())
        }
        fn interrupted_stacks(&self, _: &VcpuState, memory: rewrites::GuestMemory<'_>) -> Vec<u64> {
            // Read through the vCPU's own tables, like its stack.
            memory
                .read(0x8ff8, 8)
                .map(|_| TASK_RSP)
                .into_iter()
                .collect()
        }
    }
    // The interrupted RIP is f+4, inside the bytes f's jump displaces; the handler's own stack
    // (at 0x8000) holds nothing of f.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.write_phys(TASK_RSP + 0x80, &(F_AT + 4).to_le_bytes())
        .unwrap();
    let mut e = engine_with_os(&g, Box::new(Interrupted));
    let before = code_and_arena(&g);
    let err = e.apply(&signed(&fix_f())).unwrap_err();
    assert!(
        matches!(&err, EngineError::Busy { .. }) && err.to_string().contains("on its stack"),
        "{err}"
    );
    assert!(code_and_arena(&g) == before, "the guest is byte-identical");
    // The interrupted context returned: the next apply goes in.
    g.write_phys(TASK_RSP + 0x80, &0u64.to_le_bytes()).unwrap();
    e.apply(&signed(&fix_f())).unwrap();
    assert_eq!(g.bytes(F_AT, 1), [0xe9]);
}

/// An OS that lists one thread off the vCPUs, its stack at `[0x9000, 0xa000)`, saved sp
/// `0x9e00`; or whose list cannot be read, or never ends (a forged loop).
#[derive(Clone, Copy, PartialEq)]
enum Sleeper {
    Listed,
    Unreadable,
    Endless,
}

const SLEEPER_SP: u64 = 0x9e00;

impl rewrites::TextRewrites for Sleeper {
    fn reconcile(&self, t: &rewrites::SiteText<'_>, _: &Target) -> Result<Vec<u8>, PlanError> {
        Ok(t.expected.to_vec())
    }
    fn lists_threads(&self) -> bool {
        true
    }
    fn threads(
        &self,
        memory: rewrites::GuestMemory<'_>,
    ) -> Result<Vec<crate::threads::ThreadStack>, String> {
        match self {
            Sleeper::Listed => {}
            Sleeper::Unreadable => return Err("a task list entry at 0x9000 cannot be read".into()),
            Sleeper::Endless => {
                while memory.read(0x9000, 8).is_some() {}
                return Err("a task list entry cannot be read".into());
            }
        }
        // Read through the kernel's view, like the Linux walk.
        memory.read(0x9000, 8).ok_or("unreadable")?;
        Ok(vec![crate::threads::ThreadStack {
            name: "task 42 (sleeper)".into(),
            sp: SLEEPER_SP,
            base: 0x9000,
            top: 0xa000,
            user_frame: 0,
        }])
    }
}

fn listing(config: EngineConfig, fails: bool, g: &Arc<Fake>) -> Engine<Fake> {
    let config = EngineConfig {
        trusted_keys: vec![key().public()],
        max_attempts: 3,
        list_threads: crate::threads::ThreadListing::Thorough,
        ..config
    };
    Engine::new(
        Arc::clone(g),
        target(),
        ARENA,
        config,
        None,
        Box::new(if fails {
            Sleeper::Unreadable
        } else {
            Sleeper::Listed
        }),
    )
    .unwrap()
}

fn both_functions() -> Patch {
    patch(
        "fix-both",
        vec![function_site("f", &F, &G), function_site("g", &G, &F)],
        Vec::new(),
    )
}

/// A guest whose listed thread ([`Sleeper`]) holds `word` at `SLEEPER_SP + above`.
fn sleeper_holding(above: u64, word: u64) -> Arc<Fake> {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.write_phys(SLEEPER_SP + above, &word.to_le_bytes())
        .unwrap();
    g
}

/// Applies `p`, which a listed thread must hold back: busy, its message naming each of
/// `says`, and the guest byte-identical.
fn held_back(e: &mut Engine<Fake>, g: &Fake, p: &Patch, says: &[&str]) {
    let before = code_and_arena(g);
    let err = e.apply(&signed(p)).unwrap_err();
    assert!(
        matches!(&err, EngineError::Busy { .. })
            && says.iter().all(|w| err.to_string().contains(w)),
        "{err}"
    );
    assert!(code_and_arena(g) == before, "the guest is byte-identical");
}

#[test]
fn a_task_asleep_in_an_old_function_holds_a_multi_function_patch_back() {
    // The sleeper's stack holds a return address into old f, past its entry, 0x100 above its
    // saved sp (out of reach of every vCPU's scan).
    let g = sleeper_holding(0x100, F_AT + 11);
    let mut e = listing(scheduled(Preemption::Voluntary), false, &g);
    held_back(
        &mut e,
        &g,
        &both_functions(),
        &["after 3 attempts", "task 42 (sleeper)", "inside old f"],
    );
    // A word below its saved sp is dead stack, not something it returns through.
    g.write_phys(SLEEPER_SP + 0x100, &0u64.to_le_bytes())
        .unwrap();
    g.write_phys(SLEEPER_SP - 0x10, &(F_AT + 11).to_le_bytes())
        .unwrap();
    let out = e.apply(&signed(&both_functions())).unwrap();
    assert_eq!(out.patch.threads_checked, Some(1));
    assert_eq!(e.last_phases().unwrap().threads, 1);
    assert_eq!(g.bytes(F_AT, 1), [0xe9]);
}

#[test]
fn without_listing_a_sleeper_is_not_seen() {
    // The same sleeper, with `list_threads` off (as for a kernel without BTF): the
    // multi-function patch goes in, which is the documented gap the listing closes.
    let g = sleeper_holding(0x100, F_AT + 11);
    let mut e = Engine::new(
        Arc::clone(&g),
        target(),
        ARENA,
        EngineConfig {
            trusted_keys: vec![key().public()],
            ..scheduled(Preemption::Voluntary)
        },
        None,
        Box::new(Sleeper::Listed),
    )
    .unwrap();
    let out = e.apply(&signed(&both_functions())).unwrap();
    assert_eq!(out.patch.threads_checked, None);
}

#[test]
fn a_preempted_task_is_seen_so_a_preempting_kernel_keeps_jumps_over_several_instructions() {
    // Under full preemption, with the tasks listed, f's jump over three instructions is
    // planned; a task preempted at f+4 (its RIP in pt_regs on its stack) holds it back.
    let g = sleeper_holding(0x98, F_AT + 4);
    let mut e = listing(scheduled(Preemption::Full), false, &g);
    held_back(
        &mut e,
        &g,
        &fix_f(),
        &["task 42 (sleeper)", "resume in the middle"],
    );
    // It ran on: the patch goes in, three instructions displaced.
    g.write_phys(SLEEPER_SP + 0x98, &0u64.to_le_bytes())
        .unwrap();
    let id = e.apply(&signed(&fix_f())).unwrap().patch.id;
    assert_eq!(g.bytes(F_AT, 1), [0xe9]);
    e.revert(&id).unwrap();
    assert_eq!(g.bytes(F_AT, 13), F);
}

#[test]
fn a_task_list_that_cannot_be_read_refuses_only_what_needs_it() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let refused = |e: &mut Engine<Fake>, p: &Patch| {
        let before = code_and_arena(&g);
        let err = e.apply(&signed(p)).unwrap_err();
        assert!(code_and_arena(&g) == before, "the guest is byte-identical");
        assert!(
            matches!(&err, EngineError::Busy { why, .. } if why.contains("could not be listed") && why.contains("cannot be read")),
            "{err}"
        );
        err.to_string()
    };
    // A multi-function patch must know where every task sleeps.
    let mut e = listing(scheduled(Preemption::Voluntary), true, &g);
    let why = refused(&mut e, &both_functions());
    assert!(why.contains("several functions"), "{why}");
    // Under full preemption a jump over several instructions must know where they resume.
    let mut e = listing(scheduled(Preemption::Full), true, &g);
    let why = refused(&mut e, &fix_f());
    assert!(why.contains("full preemption"), "{why}");
    // A single function under voluntary preemption does not need the list: a sleeper returns
    // past the displaced bytes (rule 7).
    let mut e = listing(scheduled(Preemption::Voluntary), true, &g);
    let out = e.apply(&signed(&fix_f())).unwrap();
    assert_eq!(out.patch.threads_checked, None);
}

#[test]
fn a_jump_over_one_instruction_lists_no_threads() {
    // h's first instruction is 5 bytes long (mov eax, imm32): nothing can resume inside it, so
    // the blackout does not walk the threads, even a list that would fail.
    const H_AT: u64 = 0x1200;
    const H: [u8; 6] = [0xb8, 0x01, 0x00, 0x00, 0x00, 0xc3];
    let g = Fake::new(&[(0x5000, 0x8000)]);
    g.write_phys(H_AT, &H).unwrap();
    let target = Target::new(
        ImageInfo {
            identity: identity(),
            symbols: vec![ImageSymbol {
                name: "h".into(),
                addr: H_AT,
                size: 6,
                function: true,
            }],
        },
        0,
    );
    let mut e = Engine::new(
        Arc::clone(&g),
        target,
        ARENA,
        EngineConfig {
            trusted_keys: vec![key().public()],
            list_threads: crate::threads::ThreadListing::Thorough,
            ..scheduled(Preemption::Full)
        },
        None,
        Box::new(Sleeper::Unreadable),
    )
    .unwrap();
    let p = patch(
        "fix-h",
        vec![function_site("h", &H, &[0xb8, 2, 0, 0, 0, 0xc3])],
        Vec::new(),
    );
    let out = e.apply(&signed(&p)).unwrap();
    assert_eq!(out.patch.threads_checked, None);
    assert_eq!(g.bytes(H_AT, 1), [0xe9]);
}

#[test]
fn a_task_list_that_never_ends_is_cut_at_the_time_cap() {
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let mut e = Engine::new(
        Arc::clone(&g),
        target(),
        ARENA,
        EngineConfig {
            trusted_keys: vec![key().public()],
            list_threads: crate::threads::ThreadListing::Thorough,
            max_attempts: 2,
            max_check: Duration::from_millis(5),
            ..scheduled(Preemption::Voluntary)
        },
        None,
        Box::new(Sleeper::Endless),
    )
    .unwrap();
    let before = code_and_arena(&g);
    let err = e.apply(&signed(&both_functions())).unwrap_err();
    assert!(
        matches!(&err, EngineError::Busy { attempts: 2, why } if why.contains("limit")),
        "{err}"
    );
    assert!(code_and_arena(&g) == before, "the guest is byte-identical");
}

#[test]
fn essential_listing_walks_only_where_the_change_needs_it() {
    // Essential (a slow backend): f's jump over three instructions under voluntary preemption
    // needs no walk, even from an OS whose list would fail; under full preemption it walks,
    // and the sleeper preempted at f+4 holds it back.
    let g = Fake::new(&[(0x5000, 0x8000)]);
    let essential = |preemption, fails| {
        Engine::new(
            Arc::clone(&g),
            target(),
            ARENA,
            EngineConfig {
                trusted_keys: vec![key().public()],
                max_attempts: 2,
                list_threads: crate::threads::ThreadListing::Essential,
                ..scheduled(preemption)
            },
            None,
            Box::new(if fails {
                Sleeper::Unreadable
            } else {
                Sleeper::Listed
            }),
        )
        .unwrap()
    };
    let mut e = essential(Preemption::Voluntary, true);
    let out = e.apply(&signed(&fix_f())).unwrap();
    assert_eq!(out.patch.threads_checked, None);
    e.revert(&out.patch.id).unwrap();
    g.write_phys(SLEEPER_SP + 0x98, &(F_AT + 4).to_le_bytes())
        .unwrap();
    let mut e = essential(Preemption::Full, false);
    held_back(&mut e, &g, &fix_f(), &["task 42 (sleeper)"]);
    g.write_phys(SLEEPER_SP + 0x98, &0u64.to_le_bytes())
        .unwrap();
    let out = e.apply(&signed(&fix_f())).unwrap();
    assert_eq!(out.patch.threads_checked, Some(1));
}
