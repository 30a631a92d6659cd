//! Where a running Linux kernel's text legitimately differs from its vmlinux file, and how the
//! expected-bytes check (rule 1) accounts for it.
//!
//! A patch's expected bytes come from the file; the kernel rewrites two kinds of instruction
//! while it boots, and both must match in either form or no stock kernel could be patched:
//! - the `call __fentry__` at a function's entry (`-mfentry`) becomes the 5-byte NOP
//!   `0f 1f 44 00 00` (ftrace turns it back into a call, to its own trampoline, while it traces
//!   the function);
//! - `jmp __x86_return_thunk` (`-mfunction-return=thunk-extern`) becomes `ret; int3 ×4` on CPUs
//!   that need no return-thunk mitigation.
//!
//! - with KASLR, every absolute reference to the kernel image in its text (`mov rsi,
//!   linux_proc_banner`, sign-extended 32-bit immediates and displacements, 64-bit ones) is
//!   relocated by the decompressor: it holds the link-time value plus the slide.
//!
//! - whole sites of the boot-time tables in a function's body: a static call (`call`/`jmp`
//!   to where its key's trampoline jumps now, `nop5`, `xor eax, eax`), a paravirt call (a
//!   direct call to its op), an alternative (its replacement, relocated, or its original with
//!   re-encoded NOPs), and a jump label in either state (its NOP, or a jump to its entry's
//!   target): [`crate::boot_forms`].
//!
//! Only these rewrites are accepted, each only at an instruction boundary of the expected
//! code (a whole table-listed site, for the last kind) and only towards its known rewritten
//! form; everything else must match byte for byte.
//! A live ftrace call at the entry is refused: ftrace owns that site, and the patcher does not
//! fight it.

use iced_x86::{Code, Decoder, DecoderOptions};

use patch_engine::plan::{NOP5, PlanError};
use std::sync::Arc;

use crate::interrupt_stacks::InterruptStacks;
use crate::tasks::KernelTasks;

use patch_engine::rewrites::{LiveRewrite, SiteText, TextRewrites};
use patch_engine::target::Target;

use crate::text_sites::{KernelTextSites, Mechanism};

/// The stock Linux kernel's rewrites, for the engine's rule 1 (see the module doc): its
/// fentry and return-thunk symbols and KASLR slide come from the target. With the kernel's
/// tables of text it rewrites ([`KernelTextSites`]), also where it rewrites while it runs.
#[derive(Debug, Clone, Default)]
pub struct LinuxBootRewrites {
    sites: Arc<KernelTextSites>,
    /// The kernel booted on one CPU and keeps its lock prefixes to rewrite when it gains one.
    smp_locks_live: bool,
    /// Built with page-table isolation ([`crate::address_space::kernel_view`]).
    pti: bool,
    /// The CPUs' interrupt and exception stacks ([`crate::interrupt_stacks`]).
    interrupt_stacks: InterruptStacks,
    /// Where its tasks are ([`crate::tasks`]).
    tasks: Option<KernelTasks>,
}

impl LinuxBootRewrites {
    pub fn new(sites: Arc<KernelTextSites>, smp_locks_live: bool) -> LinuxBootRewrites {
        LinuxBootRewrites {
            sites,
            smp_locks_live,
            pti: false,
            interrupt_stacks: InterruptStacks::default(),
            tasks: None,
        }
    }

    /// With where the kernel's tasks are, read at attach: the engine can then scan the stack
    /// of every task no vCPU runs (when its configuration asks for it).
    pub fn with_tasks(mut self, tasks: Option<KernelTasks>) -> LinuxBootRewrites {
        self.tasks = tasks;
        self
    }

    /// With the CPUs' interrupt and exception stacks read at attach.
    pub fn with_interrupt_stacks(mut self, stacks: InterruptStacks) -> LinuxBootRewrites {
        self.interrupt_stacks = stacks;
        self
    }

    /// For a kernel built with page-table isolation (`address_space::has_pti`).
    pub fn with_pti(mut self, pti: bool) -> LinuxBootRewrites {
        self.pti = pti;
        self
    }
}

impl TextRewrites for LinuxBootRewrites {
    fn code_view(&self, vcpu: &guest_control::VcpuState) -> guest_control::VcpuState {
        crate::address_space::kernel_view(vcpu, self.pti)
    }

    fn interrupted_stacks(
        &self,
        vcpu: &guest_control::VcpuState,
        memory: patch_engine::rewrites::GuestMemory<'_>,
    ) -> Vec<u64> {
        self.interrupt_stacks.interrupted(vcpu, memory)
    }

    fn user_frame_at(
        &self,
        vcpu: &guest_control::VcpuState,
        rsp: u64,
        memory: patch_engine::rewrites::GuestMemory<'_>,
    ) -> Option<u64> {
        // Only a task stack ends in user mode's registers: the interrupt and exception stacks
        // end in the kernel's own frames (an IST frame's RIP may be a kernel one), so they
        // must be known to be ruled out.
        if vcpu.cpl != 0 || !self.interrupt_stacks.known() || self.interrupt_stacks.holds(rsp) {
            return None;
        }
        let tasks = self.tasks.as_ref()?;
        tasks.user_frame_below(tasks.task_stack_top(rsp)?, memory)
    }

    fn lists_threads(&self) -> bool {
        self.tasks.is_some()
    }

    fn threads(
        &self,
        memory: patch_engine::rewrites::GuestMemory<'_>,
    ) -> Result<Vec<patch_engine::threads::ThreadStack>, String> {
        match &self.tasks {
            Some(tasks) => tasks.stacks(memory),
            None => Ok(Vec::new()),
        }
    }

    fn live_rewrite(&self, start: u64, end: u64, target: &Target) -> Option<LiveRewrite> {
        let slide = target.slide;
        self.sites
            .touching(start.wrapping_sub(slide), end.wrapping_sub(slide))
            .find(|s| match s.mechanism {
                Mechanism::SmpLock => self.smp_locks_live,
                m => m.at_run_time(),
            })
            .map(|s| LiveRewrite {
                at: s.addr.wrapping_add(slide),
                what: s.mechanism.name().to_string(),
            })
    }

    fn reconcile(&self, t: &SiteText<'_>, target: &Target) -> Result<Vec<u8>, PlanError> {
        let fentry = target.symbol("__fentry__");
        // A kernel booted on one CPU turns every `lock` prefix its `.smp_locks` lists into a
        // `ds` prefix (same instruction, no bus lock); only there is that accepted. Taken
        // first, so the same instruction's other rewrites (a KASLR-relocated displacement,
        // `lock incl sym(,%rbp,4)`) are judged on an otherwise equal instruction.
        let mut expected = t.expected.to_vec();
        if t.current.len() == t.expected.len() {
            for (i, (&want, &have)) in t.expected.iter().zip(t.current).enumerate() {
                if want == LOCK
                    && have == DS
                    && self.sites.of_at(
                        Mechanism::SmpLock,
                        (t.at + i as u64).wrapping_sub(target.slide),
                    )
                {
                    expected[i] = DS;
                }
            }
        }
        let mut out = reconcile(
            t.site,
            &expected,
            t.current,
            t.at,
            t.function_entry,
            KernelRewrites {
                fentry,
                return_thunk: target.symbol("__x86_return_thunk"),
                slide: target.slide,
            },
        )?;
        // Past the site's own entry, other functions' entries (ftrace knows each one, from
        // `__mcount_loc`) hold their NOP in the running kernel: the expected bytes of a
        // function whose symbol also covers unnamed code after it run through one.
        if let (Some(fentry), true) = (fentry, t.current.len() == t.expected.len()) {
            let mut decoder = Decoder::with_ip(64, t.expected, t.at, DecoderOptions::NONE);
            for insn in decoder.iter().skip(usize::from(t.function_entry)) {
                if insn.is_invalid() {
                    break;
                }
                let off = (insn.ip() - t.at) as usize;
                let end = off + insn.len();
                if insn.code() == Code::Call_rel32_64
                    && insn.near_branch_target() == fentry
                    && t.current.get(off..end) == Some(&NOP5[..])
                    && self
                        .sites
                        .of_at(Mechanism::Ftrace, insn.ip().wrapping_sub(target.slide))
                {
                    out[off..end].copy_from_slice(&NOP5);
                }
            }
        }
        // Whole sites the kernel rewrote at boot (static calls, paravirt, alternatives), each
        // only towards one of its own forms (crate::boot_forms).
        crate::boot_forms::reconcile_sites(
            self.sites.boot(),
            &crate::boot_forms::Body {
                file: t.expected,
                current: t.current,
                at: t.at,
                slide: target.slide,
                memory: t.memory,
            },
            &mut out,
        );
        Ok(out)
    }

    fn explain(&self, at: u64, target: &Target) -> Option<String> {
        let link = at.wrapping_sub(target.slide);
        if self.sites.in_freed_init(link) {
            return Some(
                "init memory, freed and poisoned after boot (__init_begin..__init_end): the function no longer exists in the running kernel".into(),
            );
        }
        self.sites
            .touching(link, link + 1)
            .next()
            .map(|s| s.mechanism.name().to_string())
    }
}

/// The `lock` prefix, and the `ds` prefix the kernel replaces it by on one CPU.
const LOCK: u8 = 0xf0;
const DS: u8 = 0x3e;

/// `ret; int3; int3; int3; int3`: the kernel's replacement of `jmp __x86_return_thunk`.
const RET_INT3: [u8; 5] = [0xc3, 0xcc, 0xcc, 0xcc, 0xcc];

/// The kernel's well-known rewrite targets, at run-time addresses (`None`: not a Linux target).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KernelRewrites {
    pub fentry: Option<u64>,
    pub return_thunk: Option<u64>,
    /// The KASLR slide absolute references were relocated by (0: none).
    pub slide: u64,
}

/// `expected` with the kernel's boot-time rewrites taken from `current` where (and only where)
/// they are the known ones. `at` is the run-time address of both; `function_entry` says the
/// bytes start at a function's entry (where the fentry call lives).
pub fn reconcile(
    site: &str,
    expected: &[u8],
    current: &[u8],
    at: u64,
    function_entry: bool,
    k: KernelRewrites,
) -> Result<Vec<u8>, PlanError> {
    let mut out = expected.to_vec();
    if (k.fentry.is_none() && k.return_thunk.is_none()) || current.len() != expected.len() {
        return Ok(out);
    }
    let mut decoder = Decoder::with_ip(64, expected, at, DecoderOptions::NONE);
    for insn in decoder.iter() {
        if insn.is_invalid() {
            break;
        }
        let off = (insn.ip() - at) as usize;
        let end = off + insn.len();
        let (Some(want), Some(have)) = (expected.get(off..end), current.get(off..end)) else {
            break;
        };
        if want == have {
            continue;
        }
        let target = insn.near_branch_target();
        match insn.code() {
            Code::Call_rel32_64 if off == 0 && function_entry && Some(target) == k.fentry => {
                if have == NOP5 {
                    out[off..end].copy_from_slice(have);
                } else if have[0] == 0xe8 {
                    return Err(PlanError::FtraceActive {
                        site: site.to_string(),
                    });
                }
            }
            Code::Jmp_rel32_64 if Some(target) == k.return_thunk && have == RET_INT3 => {
                out[off..end].copy_from_slice(have);
            }
            _ if k.slide != 0 && relocated_by(&insn, want, have, at + off as u64, k.slide) => {
                out[off..end].copy_from_slice(have);
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Whether `have` is `want` (one instruction at `ip`) with its absolute immediate or
/// displacement moved by `slide`, and nothing else changed.
fn relocated_by(
    insn: &iced_x86::Instruction,
    want: &[u8],
    have: &[u8],
    ip: u64,
    slide: u64,
) -> bool {
    let mut d = Decoder::with_ip(64, want, ip, DecoderOptions::NONE);
    let Some(w) = d.iter().next() else {
        return false;
    };
    let offsets = d.get_constant_offsets(&w);
    let mut h = Decoder::with_ip(64, have, ip, DecoderOptions::NONE);
    match h.iter().next() {
        Some(h) if h.code() == insn.code() && h.len() == insn.len() => {}
        _ => return false,
    }
    // A direct branch's offset is relative: KASLR never moves it.
    if w.is_call_near() || w.is_jmp_short_or_near() || w.is_jcc_short_or_near() {
        return false;
    }
    // RIP-relative operands are position-independent: KASLR never rewrites them, except a
    // per-CPU one (`gs:[rip+X]`): X names an offset in the per-CPU area, not an image address,
    // so the decompressor's inverse relocations take the slide back off it. The absolute
    // immediate of an instruction with an ordinary RIP-relative operand (`movq $sym,
    // x(%rip)`, `cmpq $sym, x(%rip)`) is moved like any other; its displacement must stay.
    let per_cpu = w.is_ip_rel_memory_operand() && w.segment_prefix() == iced_x86::Register::GS;
    let rip_relative = w.is_ip_rel_memory_operand() && !per_cpu;
    let slide = if per_cpu { slide.wrapping_neg() } else { slide };
    let mut fields = Vec::new();
    if offsets.has_displacement() && !rip_relative {
        fields.push((offsets.displacement_offset(), offsets.displacement_size()));
    }
    if offsets.has_immediate() && !per_cpu {
        fields.push((offsets.immediate_offset(), offsets.immediate_size()));
    }
    let in_field = |i: usize| fields.iter().any(|&(o, n)| i >= o && i < o + n);
    if (0..want.len()).any(|i| want[i] != have[i] && !in_field(i)) {
        return false;
    }
    let mut moved = false;
    for (o, n) in fields {
        let (a, b) = (&want[o..o + n], &have[o..o + n]);
        if a == b {
            continue;
        }
        let delta_ok = match n {
            4 => {
                let x = u32::from_le_bytes([a[0], a[1], a[2], a[3]]);
                let y = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                y.wrapping_sub(x) == slide as u32
            }
            8 => {
                let mut x = [0u8; 8];
                let mut y = [0u8; 8];
                x.copy_from_slice(a);
                y.copy_from_slice(b);
                u64::from_le_bytes(y).wrapping_sub(u64::from_le_bytes(x)) == slide
            }
            _ => false,
        };
        if !delta_ok {
            return false;
        }
        moved = true;
    }
    moved
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: u64 = 0xffff_ffff_9141_1e30;
    const FENTRY: u64 = 0xffff_ffff_9107_6650;
    const THUNK: u64 = 0xffff_ffff_91c0_0000;

    fn rel(from_end: u64, to: u64) -> [u8; 4] {
        (to.wrapping_sub(from_end) as i32).to_le_bytes()
    }

    /// call __fentry__; xor eax,eax; jmp __x86_return_thunk
    fn file_bytes() -> Vec<u8> {
        let mut b = vec![0xe8];
        b.extend(rel(AT + 5, FENTRY));
        b.extend([0x31, 0xc0, 0xe9]);
        b.extend(rel(AT + 12, THUNK));
        b
    }

    fn k() -> KernelRewrites {
        KernelRewrites {
            fentry: Some(FENTRY),
            return_thunk: Some(THUNK),
            slide: 0,
        }
    }

    #[test]
    fn absolute_references_moved_by_the_slide_are_accepted_and_only_those() {
        // mov rsi, 0xffffffff82000280 (48 c7 c6 imm32, sign-extended)
        let file = [0x48, 0xc7, 0xc6, 0x80, 0x02, 0x00, 0x82];
        let slide = 0x2540_0000u64;
        let moved = (0xffff_ffff_8200_0280u64 + slide) as u32;
        let mut running = file;
        running[3..7].copy_from_slice(&moved.to_le_bytes());
        let kk = KernelRewrites { slide, ..k() };
        assert_eq!(
            reconcile("f", &file, &running, AT, false, kk).ok(),
            Some(running.to_vec())
        );
        // Moved by something else: not accepted.
        let mut wrong = file;
        wrong[3..7].copy_from_slice(&(moved + 0x1000).to_le_bytes());
        assert_eq!(
            reconcile("f", &file, &wrong, AT, false, kk).ok(),
            Some(file.to_vec())
        );
        // Without a slide nothing moves.
        assert_eq!(
            reconcile("f", &file, &running, AT, false, k()).ok(),
            Some(file.to_vec())
        );
    }

    #[test]
    fn accepts_the_booted_forms_and_only_them() {
        let file = file_bytes();
        let mut booted = file.clone();
        booted[..5].copy_from_slice(&NOP5);
        booted[7..12].copy_from_slice(&RET_INT3);
        let r = reconcile("f", &file, &booted, AT, true, k());
        assert_eq!(r.ok(), Some(booted.clone()));
        // Unchanged return thunk (mitigation on) is simply equal.
        let mut with_thunk = file.clone();
        with_thunk[..5].copy_from_slice(&NOP5);
        assert_eq!(
            reconcile("f", &file, &with_thunk, AT, true, k()).ok(),
            Some(with_thunk.clone())
        );
        // A real difference elsewhere stays a difference (rule 1 then refuses it).
        let mut other = booted.clone();
        other[5] = 0x33;
        assert_eq!(
            reconcile("f", &file, &other, AT, true, k()).ok(),
            Some({
                let mut e = booted.clone();
                e[5] = 0x31;
                e
            })
        );
        // Not a Linux target: nothing is reconciled.
        assert_eq!(
            reconcile("f", &file, &booted, AT, true, KernelRewrites::default()).ok(),
            Some(file.clone())
        );
        // The NOP is only accepted at the entry of a function site.
        assert_eq!(
            reconcile("f", &file, &booted, AT, false, k())
                .ok()
                .map(|e| e[..5].to_vec()),
            Some(file[..5].to_vec())
        );
    }

    #[test]
    fn the_immediate_of_an_instruction_with_a_rip_relative_operand_moves_its_displacement_does_not()
    {
        // movq $0xffffffff82a04000, 0x1a1841f(%rip): 48 c7 05 disp32 imm32
        let file = [
            0x48, 0xc7, 0x05, 0x1f, 0x84, 0xa1, 0x01, 0x00, 0x40, 0xa0, 0x82,
        ];
        let slide = 0x1c00_0000u64;
        let kk = KernelRewrites { slide, ..k() };
        let mut running = file;
        running[7..11].copy_from_slice(&(0x82a0_4000u32 + slide as u32).to_le_bytes());
        assert_eq!(
            reconcile("f", &file, &running, AT, false, kk).ok(),
            Some(running.to_vec())
        );
        // The displacement moved (by the slide, or with the immediate): not KASLR's.
        let mut disp = file;
        disp[3..7].copy_from_slice(&(0x01a1_841fu32 + slide as u32).to_le_bytes());
        assert_eq!(
            reconcile("f", &file, &disp, AT, false, kk).ok(),
            Some(file.to_vec())
        );
        let mut both = running;
        both[3..7].copy_from_slice(&disp[3..7]);
        assert_eq!(
            reconcile("f", &file, &both, AT, false, kk).ok(),
            Some(file.to_vec())
        );
    }

    #[test]
    fn a_branch_whose_offset_moved_by_the_slide_is_not_a_relocation() {
        let slide = 0x1c00_0000u64;
        let kk = KernelRewrites { slide, ..k() };
        // call rel32, jmp rel32, jne rel32
        for file in [
            vec![0xe8, 0x10, 0x00, 0x00, 0x00],
            vec![0xe9, 0x10, 0x00, 0x00, 0x00],
            vec![0x0f, 0x85, 0x10, 0x00, 0x00, 0x00],
        ] {
            let mut running = file.clone();
            let n = running.len();
            let rel = u32::from_le_bytes(running[n - 4..].try_into().unwrap());
            running[n - 4..].copy_from_slice(&rel.wrapping_add(slide as u32).to_le_bytes());
            assert_eq!(
                reconcile("f", &file, &running, AT, false, kk).ok(),
                Some(file.clone()),
                "{file:02x?}"
            );
        }
    }

    #[test]
    fn a_traced_function_is_refused() {
        let file = file_bytes();
        let mut traced = file.clone();
        traced[1..5].copy_from_slice(&rel(AT + 5, 0xffff_ffff_a000_0000));
        assert!(matches!(
            reconcile("f", &file, &traced, AT, true, k()),
            Err(PlanError::FtraceActive { .. })
        ));
    }

    #[test]
    fn per_cpu_references_moved_back_by_the_slide_are_accepted_and_only_those() {
        // mov eax, gs:[rip+X]: 65 8b 05 disp32
        let file = [0x65, 0x8b, 0x05, 0x10, 0x20, 0x03, 0x00];
        let slide = 0x2540_0000u64;
        let mut running = file;
        let x = u32::from_le_bytes([0x10, 0x20, 0x03, 0x00]);
        running[3..7].copy_from_slice(&x.wrapping_sub(slide as u32).to_le_bytes());
        let kk = KernelRewrites { slide, ..k() };
        assert_eq!(
            reconcile("f", &file, &running, AT, false, kk).ok(),
            Some(running.to_vec())
        );
        // Moved forward, as an image address would be: not a per-CPU relocation.
        let mut forward = file;
        forward[3..7].copy_from_slice(&x.wrapping_add(slide as u32).to_le_bytes());
        assert_eq!(
            reconcile("f", &file, &forward, AT, false, kk).ok(),
            Some(file.to_vec())
        );
        // The same displacement without the GS prefix is an ordinary RIP-relative operand,
        // which KASLR never touches.
        let plain = [0x8b, 0x05, 0x10, 0x20, 0x03, 0x00];
        let mut moved = plain;
        moved[2..6].copy_from_slice(&x.wrapping_sub(slide as u32).to_le_bytes());
        assert_eq!(
            reconcile("f", &plain, &moved, AT, false, kk).ok(),
            Some(plain.to_vec())
        );
    }

    fn linux(sites: Vec<crate::text_sites::TextSite>) -> (LinuxBootRewrites, Target) {
        let info = patch_format::ImageInfo {
            identity: patch_format::TargetIdentity {
                name: "Linux".into(),
                build_id: Some(vec![1]),
                text_sha256: None,
            },
            symbols: Vec::new(),
        };
        (
            LinuxBootRewrites::new(Arc::new(KernelTextSites::from_sites(sites)), false),
            Target::new(info, 0),
        )
    }

    #[test]
    fn a_listed_lock_prefix_made_ds_and_a_relocated_displacement_in_one_instruction_are_accepted() {
        use crate::text_sites::TextSite;
        // lock incl -0x7d3c9060(,%rbp,4): f0 ff 04 ad disp32
        let file = [0xf0, 0xff, 0x04, 0xad, 0xa0, 0x6f, 0xc3, 0x82];
        let slide = 0x1c00_0000u64;
        let mut up = file;
        up[0] = DS;
        up[4..8].copy_from_slice(&(0x82c3_6fa0u32 + slide as u32).to_le_bytes());
        let sites = vec![TextSite {
            addr: AT.wrapping_sub(slide),
            len: 1,
            mechanism: Mechanism::SmpLock,
        }];
        let info = patch_format::ImageInfo {
            identity: patch_format::TargetIdentity {
                name: "Linux".into(),
                build_id: Some(vec![1]),
                text_sha256: None,
            },
            symbols: vec![patch_format::ImageSymbol {
                name: "__fentry__".into(),
                addr: FENTRY.wrapping_sub(slide),
                size: 1,
                function: true,
            }],
        };
        let target = Target::new(info, slide);
        let r = LinuxBootRewrites::new(Arc::new(KernelTextSites::from_sites(sites)), false);
        let text = |current: &[u8]| {
            r.reconcile(
                &SiteText {
                    site: "f",
                    expected: &file,
                    current,
                    at: AT,
                    function_entry: false,
                    memory: patch_engine::rewrites::GuestMemory::NONE,
                },
                &target,
            )
            .unwrap()
        };
        assert_eq!(text(&up), up.to_vec());
        // Unlisted, the prefix stays a difference (and so does the displacement with it).
        let unlisted = LinuxBootRewrites::new(Arc::new(KernelTextSites::default()), false);
        let got = unlisted
            .reconcile(
                &SiteText {
                    site: "f",
                    expected: &file,
                    current: &up,
                    at: AT,
                    function_entry: false,
                    memory: patch_engine::rewrites::GuestMemory::NONE,
                },
                &target,
            )
            .unwrap();
        assert_eq!(got, file.to_vec());
    }

    #[test]
    fn a_lock_prefix_the_kernel_made_ds_on_one_cpu_is_accepted_where_smp_locks_lists_it() {
        use crate::text_sites::TextSite;
        // lock inc qword [rip+0x10]; lock inc qword [rip+0x10]
        let one = [0xf0, 0x48, 0xff, 0x05, 0x10, 0, 0, 0];
        let file: Vec<u8> = one.iter().chain(one.iter()).copied().collect();
        let mut up = file.clone();
        up[0] = DS;
        up[8] = DS;
        // Only the first is listed in .smp_locks.
        let (r, target) = linux(vec![TextSite {
            addr: AT,
            len: 1,
            mechanism: Mechanism::SmpLock,
        }]);
        let text = SiteText {
            site: "f",
            expected: &file,
            current: &up,
            at: AT,
            function_entry: false,
            memory: patch_engine::rewrites::GuestMemory::NONE,
        };
        let got = r.reconcile(&text, &target).unwrap();
        assert_eq!(got[0], DS, "the listed prefix");
        assert_eq!(got[8], LOCK, "an unlisted prefix stays a difference");
        // The refusal for the unlisted one can name what the kernel does there, when it knows.
        assert_eq!(r.explain(AT + 8, &target), None);
        assert!(r.explain(AT, &target).unwrap().contains("lock prefix"));
    }
}
