//! The forms Linux 6.1 writes over whole sites of its boot-time rewrite tables, and the
//! check that a function's running bytes at such a site are exactly one of them.
//!
//! A patch's expected bytes come from the vmlinux file; while it boots (and, for static calls,
//! whenever `static_call_update()` runs) the kernel rewrites three kinds of site in the middle
//! of functions, each listed in a table the image carries for itself:
//! - `.static_call_sites`: the `call`/`jmp __SCT__x` to a static call's trampoline becomes a
//!   direct `call`/`jmp` to the key's function, `nop5` for a NULL one (a tail call: `ret;
//!   int3 ×4` or the return thunk, as the trampoline itself), or `cs cs cs xor eax, eax` for
//!   `__static_call_return0` (`arch/x86/kernel/static_call.c`, `__static_call_transform`);
//! - `.parainstructions`: the indirect `call *pv_ops[op]` becomes `call` to the op's function,
//!   `call paravirt_BUG` for a NULL op, or NOPs for `_paravirt_nop`, padded with NOPs
//!   (`arch/x86/kernel/paravirt.c`, `paravirt_patch`, and `apply_paravirt`);
//! - `.altinstructions`: the original instructions, when the CPU lacks the feature, with their
//!   NOP padding re-encoded (`optimize_nops`); else the replacement from
//!   `.altinstr_replacement`, its `call`/`jmp` targets kept absolute (a `jmp` may be shortened
//!   to `jmp rel8`), padded with NOPs (`apply_alternatives`, `recompute_jump`). Paravirt runs
//!   first, so an alternative's "original" at a paravirt site is the paravirt form.
//!
//! And one run-time table, whose sites a function's body may hold in either state:
//! `__jump_table` (a static key or dynamic debug enabled at boot, or since): the 2- or 5-byte
//! NOP, or `jmp` (`rel8`/`rel32`, the same size) to exactly the entry's target
//! (`arch/x86/kernel/jump_label.c`, `__jump_label_set_jump_code`). As before, one in the
//! bytes the jump displaces is refused (the kernel may flip it at any time).
//!
//! A site is accepted only as a whole: the running bytes over its full extent (lying inside
//! the function) must decode to exactly one of its forms, instruction by instruction, with
//! NOP-class instructions as padding; a branch or RIP-relative operand must reach the same
//! absolute address. What a form depends on that only the running kernel knows (where a
//! static call's trampoline jumps now, what `pv_ops` holds) is read from the guest and must
//! itself be a form of the kernel's (a jump into the kernel's text). Anything else stays a
//! difference, which rule 1 refuses, naming the mechanism. Nothing here accepts a byte outside
//! the tables' sites.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};
use patch_engine::rewrites::GuestMemory;

use crate::text_sites::{Alternative, BootSites, JumpLabelSite, ParavirtSite, StaticCallSite};

/// The 5-byte NOP `__static_call_transform` writes for a call to NULL (`x86_nops[5]`).
const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// `cs cs cs xor eax, eax`: a call to `__static_call_return0`, inlined.
pub const XOR5_EAX: [u8; 5] = [0x2e, 0x2e, 0x2e, 0x31, 0xc0];
/// `ret; int3 ×4`: a static call trampoline, or tail call, to NULL (no return thunk).
const RET_INT3: [u8; 5] = [0xc3, 0xcc, 0xcc, 0xcc, 0xcc];
/// The 2-byte NOP of a disabled short jump label (`x86_nops[2]`).
const NOP2: [u8; 2] = [0x66, 0x90];

/// Where one reconciliation happens: the function's bytes, the run-time address they start
/// at and the KASLR slide (run-time = link-time + slide).
pub(crate) struct Body<'a> {
    /// The file's bytes of the function (what the patch expects).
    pub file: &'a [u8],
    /// The guest's.
    pub current: &'a [u8],
    pub at: u64,
    pub slide: u64,
    pub memory: GuestMemory<'a>,
}

/// `out` (the expected bytes, with the per-instruction rewrites already taken) with every
/// whole boot-time site whose running bytes are one of its kernel's forms taken from
/// `current`; the count of sites taken.
pub(crate) fn reconcile_sites(boot: &BootSites, body: &Body<'_>, out: &mut [u8]) -> usize {
    if body.current.len() != out.len() || body.file.len() != out.len() {
        return 0;
    }
    let lo = body.at.wrapping_sub(body.slide);
    let hi = lo.saturating_add(out.len() as u64);
    let mut starts: Vec<u64> = Vec::new();
    starts.extend(sites_in(&boot.alternatives, |a| a.instr, lo, hi));
    starts.extend(sites_in(&boot.paravirt, |p| p.instr, lo, hi));
    starts.extend(sites_in(&boot.static_calls, |s| s.addr, lo, hi));
    starts.extend(sites_in(&boot.jump_labels, |j| j.addr, lo, hi));
    starts.sort_unstable();
    starts.dedup();
    let mut taken = 0;
    for link in starts {
        let off = (link - lo) as usize;
        let alts = boot.alternatives_at(link);
        let pv = boot.paravirt_at(link);
        let sc = boot.static_call_at(link);
        let jl = boot.jump_label_at(link);
        let len = alts
            .iter()
            .map(|a| usize::from(a.instrlen))
            .chain(pv.map(|p| usize::from(p.len)))
            .chain(sc.map(|_| static_call_len(&body.file[off..])))
            .chain(jl.map(|_| jump_label_len(&body.file[off..])))
            .max()
            .unwrap_or(0);
        let end = off + len;
        if len == 0 || end > out.len() {
            continue;
        }
        let have = &body.current[off..end];
        if out[off..end] == *have {
            continue;
        }
        let run = body.at.wrapping_add(off as u64);
        let ok = match (sc, jl) {
            // A static call site or a jump label is nothing else: its forms are exact bytes.
            (Some(sc), _) => static_call_form(boot, sc, &body.file[off..end], have, run, body),
            (None, Some(jl)) => jump_label_form(jl, have, run, body.slide),
            (None, None) => {
                same_code(&out[off..end], run, have, run, &|t| t)
                    || pv.is_some_and(|p| {
                        paravirt_form(boot, p, &body.file[off..end], have, run, body)
                    })
                    || alts
                        .iter()
                        .any(|a| alternative_form(a, have, run, body.slide))
            }
        };
        if ok {
            out[off..end].copy_from_slice(have);
            taken += 1;
        }
    }
    taken
}

/// The link-time addresses in `[lo, hi)` of a table sorted by address (`at` gives each entry's).
fn sites_in<'a, T>(
    table: &'a [T],
    at: impl Fn(&T) -> u64 + Copy + 'a,
    lo: u64,
    hi: u64,
) -> impl Iterator<Item = u64> + 'a {
    let from = table.partition_point(|e| at(e) < lo);
    table[from..].iter().map(at).take_while(move |&a| a < hi)
}

/// A jump label's length from its file bytes (the kernel decodes the instruction there):
/// 2 for `jmp rel8` or the 2-byte NOP, 5 for `jmp rel32` or the 5-byte NOP, 0 (no site to
/// reconcile) for anything else.
fn jump_label_len(file: &[u8]) -> usize {
    match file {
        [0xeb, _, ..] => 2,
        [0x66, 0x90, ..] => 2,
        [0xe9, _, _, _, _, ..] => 5,
        f if f.starts_with(&NOP5) => 5,
        _ => 0,
    }
}

/// Whether `have` (run-time `run`) is a state of the jump label `jl`: its NOP, or a jump of
/// the same size to exactly the entry's target.
fn jump_label_form(jl: &JumpLabelSite, have: &[u8], run: u64, slide: u64) -> bool {
    let to = jl.target.wrapping_add(slide);
    match have.len() {
        2 => {
            have == NOP2
                || (have[0] == 0xeb
                    && run
                        .wrapping_add(2)
                        .wrapping_add(i64::from(have[1] as i8) as u64)
                        == to)
        }
        5 => have == NOP5 || rel32_to(&[0xe9], run, to).as_deref() == Some(have),
        _ => false,
    }
}

/// A static call site's length from its file bytes: a `call`/`jmp rel32` (5), or a
/// conditional tail call `jcc rel32` (6).
fn static_call_len(file: &[u8]) -> usize {
    match file {
        [0x0f, cc, ..] if cc & 0xf0 == 0x80 => 6,
        _ => 5,
    }
}

fn rel32_target(bytes: &[u8], ip: u64, opcode_len: usize) -> Option<u64> {
    let r = bytes.get(opcode_len..opcode_len + 4)?;
    let rel = i32::from_le_bytes([r[0], r[1], r[2], r[3]]);
    Some(
        ip.wrapping_add((opcode_len + 4) as u64)
            .wrapping_add(i64::from(rel) as u64),
    )
}

fn rel32_to(opcode: &[u8], ip: u64, to: u64) -> Option<Vec<u8>> {
    let next = ip.wrapping_add(opcode.len() as u64 + 4);
    let rel = i32::try_from(to.wrapping_sub(next) as i64).ok()?;
    let mut b = opcode.to_vec();
    b.extend_from_slice(&rel.to_le_bytes());
    Some(b)
}

/// Whether the run-time address `t` is in the kernel's text.
fn in_text(boot: &BootSites, t: u64, slide: u64) -> bool {
    boot.symbols
        .text
        .is_some_and(|(a, b)| (a..b).contains(&t.wrapping_sub(slide)))
}

/// Where a static call's trampoline sends its callers now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trampoline {
    /// `jmp f` (run-time).
    Jump(u64),
    /// NULL: `ret; int3 ×4`.
    Ret,
    /// NULL on a CPU with the return thunk: `jmp __x86_return_thunk` (run-time).
    ReturnThunk(u64),
}

/// The trampoline at run-time `tramp` as the guest holds it; `None` for anything else
/// (mid-rewrite, unreadable).
fn trampoline_state(boot: &BootSites, tramp: u64, body: &Body<'_>) -> Option<Trampoline> {
    let t = body.memory.read(tramp, 5)?;
    if t == RET_INT3 {
        return Some(Trampoline::Ret);
    }
    if t[0] != 0xe9 {
        return None;
    }
    let f = rel32_target(&t, tramp, 1)?;
    let thunk = boot
        .symbols
        .return_thunk
        .map(|r| r.wrapping_add(body.slide));
    Some(if Some(f) == thunk {
        Trampoline::ReturnThunk(f)
    } else {
        Trampoline::Jump(f)
    })
}

/// Whether `have` (run-time `run`) is what `__static_call_transform` writes at the site `sc`
/// (file bytes `file`) for where its key's trampoline jumps now.
fn static_call_form(
    boot: &BootSites,
    sc: &StaticCallSite,
    file: &[u8],
    have: &[u8],
    run: u64,
    body: &Body<'_>,
) -> bool {
    let slide = body.slide;
    let Some(tramp_link) = sc.trampoline else {
        return false;
    };
    // The file's instruction: a call, a tail call or a conditional tail call to the key's
    // trampoline, agreeing with the table's tail flag.
    let link = run.wrapping_sub(slide);
    let (opcode, tail): (&[u8], bool) = match file {
        [0xe8, ..] if file.len() == 5 => (&file[..1], false),
        [0xe9, ..] if file.len() == 5 => (&file[..1], true),
        [0x0f, cc, ..] if file.len() == 6 && cc & 0xf0 == 0x80 => (&file[..2], true),
        _ => return false,
    };
    if tail != sc.tail || rel32_target(file, link, opcode.len()) != Some(tramp_link) {
        return false;
    }
    let tramp = tramp_link.wrapping_add(slide);
    let Some(state) = trampoline_state(boot, tramp, body) else {
        return false;
    };
    let return0 = boot
        .symbols
        .static_call_return0
        .map(|r| r.wrapping_add(slide));
    let want: Option<Vec<u8>> = match (state, opcode) {
        (Trampoline::Jump(f), _) if !in_text(boot, f, slide) => None,
        (Trampoline::Jump(f), [0xe8]) if return0 == Some(f) => Some(XOR5_EAX.to_vec()),
        (Trampoline::Jump(f), op) => rel32_to(op, run, f),
        (_, [0xe8]) => Some(NOP5.to_vec()),
        // A tail call to NULL returns, the way the trampoline does.
        (Trampoline::Ret, [0xe9]) => Some(RET_INT3.to_vec()),
        (Trampoline::ReturnThunk(t), [0xe9]) => rel32_to(&[0xe9], run, t),
        // A conditional one jumps to a `ret` of the kernel's.
        (_, op) => boot
            .symbols
            .static_call_return
            .and_then(|r| rel32_to(op, run, r.wrapping_add(slide))),
    };
    want.as_deref() == Some(have)
}

/// Whether `have` is what `apply_paravirt` writes at `p` (file bytes `file`, an indirect call
/// through `pv_ops[op]`) for the op the guest's `pv_ops` holds.
fn paravirt_form(
    boot: &BootSites,
    p: &ParavirtSite,
    file: &[u8],
    have: &[u8],
    run: u64,
    body: &Body<'_>,
) -> bool {
    let slide = body.slide;
    let Some(pv_ops) = boot.symbols.pv_ops else {
        return false;
    };
    let slot = pv_ops.wrapping_add(8 * u64::from(p.op));
    // The file's site is `call [rip + pv_ops[op]]`, as PARAVIRT_CALL emits it.
    let mut d = Decoder::with_ip(64, file, run.wrapping_sub(slide), DecoderOptions::NONE);
    let call = d.decode();
    if call.is_invalid()
        || call.mnemonic() != Mnemonic::Call
        || !call.is_ip_rel_memory_operand()
        || call.ip_rel_memory_address() != slot
    {
        return false;
    }
    let Some(word) = body.memory.read(slot.wrapping_add(slide), 8) else {
        return false;
    };
    let mut w = [0u8; 8];
    w.copy_from_slice(&word);
    let op = u64::from_le_bytes(w);
    let run_of = |s: Option<u64>| s.map(|a| a.wrapping_add(slide));
    let target = if op == 0 {
        match run_of(boot.symbols.paravirt_bug) {
            Some(b) => b,
            None => return false,
        }
    } else if Some(op) == run_of(boot.symbols.paravirt_nop) {
        return all_nops(have, run);
    } else {
        op
    };
    if !in_text(boot, target, slide) {
        return false;
    }
    let Some(call) = rel32_to(&[0xe8], run, target) else {
        return false;
    };
    same_code(&call, run, have, run, &|t| t)
}

/// Whether `have` is `a`'s replacement as `apply_alternatives` copies it to run-time `run`:
/// branch and RIP-relative targets outside the replacement keep their absolute address
/// (moved by the slide like the whole image), those inside it move with the code.
fn alternative_form(a: &Alternative, have: &[u8], run: u64, slide: u64) -> bool {
    let (lo, hi) = (a.repl, a.repl.saturating_add(a.replacement.len() as u64));
    let map = |t: u64| {
        if (lo..hi).contains(&t) {
            run.wrapping_add(t - lo)
        } else {
            t.wrapping_add(slide)
        }
    };
    same_code(&a.replacement, a.repl, have, run, &map)
}

fn all_nops(have: &[u8], run: u64) -> bool {
    same_code(&[], run, have, run, &|t| t)
}

/// The instructions of `bytes` (decoded at `ip`), NOP-class ones left out; `None` when the
/// bytes do not decode into whole instructions.
fn decode(bytes: &[u8], ip: u64) -> Option<Vec<Instruction>> {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    let mut len = 0;
    for insn in d.iter() {
        if insn.is_invalid() {
            return None;
        }
        len += insn.len();
        if insn.mnemonic() != Mnemonic::Nop {
            out.push(insn);
        }
    }
    (len == bytes.len()).then_some(out)
}

/// Whether `have` (at `have_ip`) holds the same instructions as `want` (at `want_ip`), NOP
/// padding aside: each the same operation on the same operands, with `map` taking an absolute
/// address `want` reaches (a branch target, a RIP-relative operand) to the one `have` must.
pub(crate) fn same_code(
    want: &[u8],
    want_ip: u64,
    have: &[u8],
    have_ip: u64,
    map: &dyn Fn(u64) -> u64,
) -> bool {
    let (Some(w), Some(h)) = (decode(want, want_ip), decode(have, have_ip)) else {
        return false;
    };
    w.len() == h.len() && w.iter().zip(&h).all(|(w, h)| same_insn(w, h, map))
}

fn is_near_branch(i: &Instruction) -> bool {
    matches!(
        i.flow_control(),
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
    ) && i.op_count() == 1
        && matches!(
            i.op0_kind(),
            OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
        )
}

fn same_insn(w: &Instruction, h: &Instruction, map: &dyn Fn(u64) -> u64) -> bool {
    if w.has_lock_prefix() != h.has_lock_prefix()
        || w.has_rep_prefix() != h.has_rep_prefix()
        || w.has_repne_prefix() != h.has_repne_prefix()
    {
        return false;
    }
    // A direct branch may change size (`recompute_jump` shortens a `jmp`), never its
    // condition or where it goes.
    if is_near_branch(w) {
        return is_near_branch(h)
            && w.mnemonic() == h.mnemonic()
            && w.condition_code() == h.condition_code()
            && map(w.near_branch_target()) == h.near_branch_target();
    }
    if w.code() != h.code()
        || w.op_count() != h.op_count()
        || w.segment_prefix() != h.segment_prefix()
    {
        return false;
    }
    (0..w.op_count()).all(|i| {
        let kind = w.op_kind(i);
        if kind != h.op_kind(i) {
            return false;
        }
        match kind {
            OpKind::Register => w.op_register(i) == h.op_register(i),
            OpKind::Immediate8
            | OpKind::Immediate8_2nd
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => w.immediate(i) == h.immediate(i),
            OpKind::Memory => {
                w.memory_base() == h.memory_base()
                    && w.memory_index() == h.memory_index()
                    && w.memory_index_scale() == h.memory_index_scale()
                    && w.memory_size() == h.memory_size()
                    && w.memory_segment() == h.memory_segment()
                    && if w.is_ip_rel_memory_operand() {
                        map(w.ip_rel_memory_address()) == h.ip_rel_memory_address()
                    } else {
                        w.memory_displacement64() == h.memory_displacement64()
                    }
            }
            // String operands (`rep movsb`) and the like: given by the code and prefixes.
            OpKind::MemorySegSI
            | OpKind::MemorySegESI
            | OpKind::MemorySegRSI
            | OpKind::MemorySegDI
            | OpKind::MemorySegEDI
            | OpKind::MemorySegRDI
            | OpKind::MemoryESDI
            | OpKind::MemoryESEDI
            | OpKind::MemoryESRDI => true,
            // Far branches and the rest: not in the kernel's rewrites.
            _ => false,
        }
    }) && (w.op_count() > 0 || w.len() == h.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot_rewrites::LinuxBootRewrites;
    use crate::text_sites::{BootSymbols, KernelTextSites};
    use patch_engine::rewrites::{SiteText, TextRewrites};
    use patch_engine::target::Target;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    const SLIDE: u64 = 0x1ec0_0000;
    const TEXT: (u64, u64) = (0xffff_ffff_8100_0000, 0xffff_ffff_81e0_2000);
    /// The function under test, link-time.
    const F: u64 = 0xffff_ffff_8100_1000;
    const TRAMP: u64 = 0xffff_ffff_81e0_0020;
    const KEY: u64 = 0xffff_ffff_82a1_a730;
    const CALLEE: u64 = 0xffff_ffff_8110_0000;
    const OTHER: u64 = 0xffff_ffff_8120_0000;
    const RETURN0: u64 = 0xffff_ffff_8126_03e0;
    const SC_RETURN: u64 = 0xffff_ffff_8103_eaa0;
    const THUNK: u64 = 0xffff_ffff_81e0_1d30;
    const PV_OPS: u64 = 0xffff_ffff_82a3_b680;
    const PV_NOP: u64 = 0xffff_ffff_81c0_1b0a;
    const PV_BUG: u64 = 0xffff_ffff_81a4_8130;
    const REPL: u64 = 0xffff_ffff_8330_1064;

    fn symbols() -> BootSymbols {
        BootSymbols {
            pv_ops: Some(PV_OPS),
            paravirt_nop: Some(PV_NOP),
            paravirt_bug: Some(PV_BUG),
            static_call_return0: Some(RETURN0),
            static_call_return: Some(SC_RETURN),
            return_thunk: Some(THUNK),
            text: Some(TEXT),
        }
    }

    fn rel(opcode: &[u8], at: u64, to: u64) -> Vec<u8> {
        rel32_to(opcode, at, to).unwrap()
    }

    /// Guest memory: run-time address → bytes.
    struct Guest(BTreeMap<u64, Vec<u8>>);

    impl Guest {
        fn read(&self, gva: u64, len: usize) -> Option<Vec<u8>> {
            let (base, b) = self.0.range(..=gva).next_back()?;
            let off = usize::try_from(gva - base).ok()?;
            b.get(off..off + len).map(<[u8]>::to_vec)
        }
    }

    /// `expected` reconciled against `current` (both of the function at `F`), with `boot`.
    fn reconcile(boot: BootSites, guest: &Guest, expected: &[u8], current: &[u8]) -> Vec<u8> {
        let info = patch_format::ImageInfo {
            identity: patch_format::TargetIdentity {
                name: "Linux".into(),
                build_id: Some(vec![1]),
                text_sha256: None,
            },
            symbols: Vec::new(),
        };
        let target = Target::new(info, SLIDE);
        let sites = KernelTextSites::from_sites(Vec::new()).with_boot(boot);
        let r = LinuxBootRewrites::new(Arc::new(sites), false);
        let read = |gva: u64, len: usize| guest.read(gva, len);
        r.reconcile(
            &SiteText {
                site: "f",
                expected,
                current,
                at: F + SLIDE,
                function_entry: false,
                memory: GuestMemory(&read),
            },
            &target,
        )
        .unwrap()
    }

    fn accepted(boot: BootSites, guest: &Guest, expected: &[u8], current: &[u8]) -> bool {
        reconcile(boot, guest, expected, current) == current
    }

    /// `push rbp; <site>; pop rbp; ret` with the site at F+1.
    fn body(site: &[u8]) -> Vec<u8> {
        let mut b = vec![0x55];
        b.extend_from_slice(site);
        b.extend_from_slice(&[0x5d, 0xc3]);
        b
    }

    fn static_call(tail: bool) -> BootSites {
        BootSites {
            static_calls: vec![StaticCallSite {
                addr: F + 1,
                key: KEY,
                tail,
                trampoline: Some(TRAMP),
            }],
            symbols: symbols(),
            ..Default::default()
        }
    }

    fn trampoline(bytes: Vec<u8>) -> Guest {
        Guest(BTreeMap::from([(TRAMP + SLIDE, bytes)]))
    }

    #[test]
    fn a_static_call_site_is_accepted_as_a_call_to_where_its_trampoline_jumps() {
        let file = body(&rel(&[0xe8], F + 1, TRAMP));
        let run = F + SLIDE + 1;
        let to_callee = trampoline(rel(&[0xe9], TRAMP + SLIDE, CALLEE + SLIDE));
        let running = body(&rel(&[0xe8], run, CALLEE + SLIDE));
        assert!(accepted(static_call(false), &to_callee, &file, &running));
        // A call elsewhere than the trampoline goes: refused.
        let elsewhere = body(&rel(&[0xe8], run, OTHER + SLIDE));
        assert!(!accepted(static_call(false), &to_callee, &file, &elsewhere));
        // The same call with no trampoline to read (no guest), or no table entry: refused.
        assert!(!accepted(
            static_call(false),
            &Guest(BTreeMap::new()),
            &file,
            &running
        ));
        let no_table = BootSites {
            symbols: symbols(),
            ..Default::default()
        };
        assert!(!accepted(no_table, &to_callee, &file, &running));
        // A trampoline (and call) out of the kernel's text (a module, the arena): refused.
        let out = 0xffff_ffff_c000_0000u64;
        let to_out = trampoline(rel(&[0xe9], TRAMP + SLIDE, out));
        assert!(!accepted(
            static_call(false),
            &to_out,
            &file,
            &body(&rel(&[0xe8], run, out))
        ));
        // As a tail call (jmp) where the site is a call: refused.
        let jmp = body(&rel(&[0xe9], run, CALLEE + SLIDE));
        assert!(!accepted(static_call(false), &to_callee, &file, &jmp));
        // Mid text_poke_bp (int3 first): refused.
        let mut poked = running.clone();
        poked[1] = 0xcc;
        assert!(!accepted(static_call(false), &to_callee, &file, &poked));
        // Accepted at the site, a difference next to it stays one.
        let mut next = running.clone();
        next[6] = 0x5e;
        let got = reconcile(static_call(false), &to_callee, &file, &next);
        assert_eq!(got[1..6], next[1..6]);
        assert_eq!(got[6], 0x5d);
    }

    #[test]
    fn a_static_call_to_null_or_to_return0_has_the_kernels_inline_forms() {
        let file = body(&rel(&[0xe8], F + 1, TRAMP));
        let null = trampoline(RET_INT3.to_vec());
        assert!(accepted(static_call(false), &null, &file, &body(&NOP5)));
        assert!(!accepted(
            static_call(false),
            &null,
            &file,
            &body(&XOR5_EAX)
        ));
        let return0 = trampoline(rel(&[0xe9], TRAMP + SLIDE, RETURN0 + SLIDE));
        assert!(accepted(
            static_call(false),
            &return0,
            &file,
            &body(&XOR5_EAX)
        ));
        assert!(!accepted(static_call(false), &return0, &file, &body(&NOP5)));
        // 6.1 before the `cs cs cs` form used `66 66 48 31 c0`: not this kernel's.
        let old = [0x66, 0x66, 0x48, 0x31, 0xc0];
        assert!(!accepted(static_call(false), &return0, &file, &body(&old)));
        // A tail call to NULL returns the way its trampoline does.
        let tail = body(&rel(&[0xe9], F + 1, TRAMP));
        assert!(accepted(static_call(true), &null, &tail, &body(&RET_INT3)));
        let run = F + SLIDE + 1;
        let thunk = trampoline(rel(&[0xe9], TRAMP + SLIDE, THUNK + SLIDE));
        let to_thunk = body(&rel(&[0xe9], run, THUNK + SLIDE));
        assert!(accepted(static_call(true), &thunk, &tail, &to_thunk));
        assert!(!accepted(static_call(true), &null, &tail, &to_thunk));
        // The table's tail flag must agree with the file's instruction.
        assert!(!accepted(
            static_call(false),
            &null,
            &tail,
            &body(&RET_INT3)
        ));
    }

    fn paravirt(op: u8) -> BootSites {
        BootSites {
            paravirt: vec![ParavirtSite {
                instr: F + 1,
                op,
                len: 6,
            }],
            symbols: symbols(),
            ..Default::default()
        }
    }

    /// `call [rip + pv_ops[op]]` at F+1 (link-time).
    fn pv_call(op: u8) -> Vec<u8> {
        let slot = PV_OPS + 8 * u64::from(op);
        let disp = slot.wrapping_sub(F + 1 + 6) as i32;
        let mut b = vec![0xff, 0x15];
        b.extend_from_slice(&disp.to_le_bytes());
        b
    }

    fn pv_ops(op: u8, value: u64) -> Guest {
        Guest(BTreeMap::from([(
            PV_OPS + SLIDE + 8 * u64::from(op),
            value.to_le_bytes().to_vec(),
        )]))
    }

    #[test]
    fn a_paravirt_site_is_accepted_as_a_direct_call_to_its_op() {
        let file = body(&pv_call(44));
        let run = F + SLIDE + 1;
        let guest = pv_ops(44, CALLEE + SLIDE);
        let mut call = rel(&[0xe8], run, CALLEE + SLIDE);
        call.push(0x90);
        assert!(accepted(paravirt(44), &guest, &file, &body(&call)));
        // Another function, another op's slot, no pv_ops to read: refused.
        let mut other = rel(&[0xe8], run, OTHER + SLIDE);
        other.push(0x90);
        assert!(!accepted(paravirt(44), &guest, &file, &body(&other)));
        assert!(!accepted(
            paravirt(45),
            &guest,
            &body(&pv_call(45)),
            &body(&call)
        ));
        assert!(!accepted(
            paravirt(44),
            &Guest(BTreeMap::new()),
            &file,
            &body(&call)
        ));
        // The padding is a NOP, not any byte.
        let mut int3 = call.clone();
        int3[5] = 0xcc;
        assert!(!accepted(paravirt(44), &guest, &file, &body(&int3)));
        // _paravirt_nop: NOPs over the whole site; NULL: a call to paravirt_BUG.
        let nops = [0x66, 0x0f, 0x1f, 0x44, 0x00, 0x00];
        assert!(accepted(
            paravirt(44),
            &pv_ops(44, PV_NOP + SLIDE),
            &file,
            &body(&nops)
        ));
        assert!(!accepted(paravirt(44), &guest, &file, &body(&nops)));
        let mut bug = rel(&[0xe8], run, PV_BUG + SLIDE);
        bug.push(0x90);
        assert!(accepted(paravirt(44), &pv_ops(44, 0), &file, &body(&bug)));
    }

    fn alternative(replacement: Vec<u8>, instrlen: u8) -> BootSites {
        BootSites {
            alternatives: vec![Alternative {
                instr: F + 1,
                instrlen,
                repl: REPL,
                cpuid: 0x110,
                replacement,
            }],
            symbols: symbols(),
            ..Default::default()
        }
    }

    #[test]
    fn an_alternative_is_accepted_as_its_replacement_relocated_or_its_original() {
        let none = Guest(BTreeMap::new());
        let run = F + SLIDE + 1;
        // Original: call [rip+X] (6 bytes); replacement: mov cr3, rdi (3 bytes).
        let file = body(&pv_call(45));
        let mut repl = vec![0x0f, 0x22, 0xdf];
        let alt = || alternative(vec![0x0f, 0x22, 0xdf], 6);
        repl.extend_from_slice(&[0x0f, 0x1f, 0x00]);
        assert!(accepted(alt(), &none, &file, &body(&repl)));
        // Padding of one-byte NOPs is as good; any other byte is not.
        let ones = [0x0f, 0x22, 0xdf, 0x90, 0x90, 0x90];
        assert!(accepted(alt(), &none, &file, &body(&ones)));
        let bad = [0x0f, 0x22, 0xdf, 0x90, 0x90, 0xcc];
        assert!(!accepted(alt(), &none, &file, &body(&bad)));
        // Another register: not the replacement.
        let other = [0x0f, 0x22, 0xde, 0x90, 0x90, 0x90];
        assert!(!accepted(alt(), &none, &file, &body(&other)));
        // A call in the replacement keeps its absolute target (moved by the slide).
        let call = rel(&[0xe8], REPL, CALLEE);
        let calls = || alternative(call.clone(), 6);
        let mut moved = rel(&[0xe8], run, CALLEE + SLIDE);
        moved.push(0x90);
        assert!(accepted(calls(), &none, &file, &body(&moved)));
        // Copied without relocating it: not the kernel's form.
        let mut verbatim = call.clone();
        verbatim.push(0x90);
        assert!(!accepted(calls(), &none, &file, &body(&verbatim)));
        // A jmp shortened to rel8 (recompute_jump), same target.
        let near = F + 0x40;
        let jmp = rel(&[0xe9], REPL, near);
        let short = [
            0xeb,
            (near + SLIDE).wrapping_sub(run + 2) as u8,
            0x0f,
            0x1f,
            0x00,
            0x90,
        ];
        assert!(accepted(alternative(jmp, 6), &none, &file, &body(&short)));
        // The original form with its NOP padding re-encoded (optimize_nops).
        let orig = body(&[0x48, 0x89, 0xf8, 0x90, 0x90, 0x90]);
        let recoded = body(&[0x48, 0x89, 0xf8, 0x0f, 0x1f, 0x00]);
        assert!(accepted(alt(), &none, &orig, &recoded));
        // A RIP-relative load in the replacement keeps what it reads.
        let data = 0xffff_ffff_82a0_0000u64;
        let disp = |at: u64| (data.wrapping_sub(at + 7) as i32).to_le_bytes();
        let mut load = vec![0x48, 0x8b, 0x05];
        load.extend_from_slice(&disp(REPL));
        let mut copied = vec![0x48, 0x8b, 0x05];
        copied.extend_from_slice(&(data + SLIDE).wrapping_sub(run + 7).to_le_bytes()[..4]);
        let long = body(&[0x90; 7]);
        assert!(accepted(
            alternative(load.clone(), 7),
            &none,
            &long,
            &body(&copied)
        ));
        assert!(!accepted(
            alternative(load.clone(), 7),
            &none,
            &long,
            &body(&load)
        ));
    }

    fn jump_label(target: u64) -> BootSites {
        BootSites {
            jump_labels: vec![JumpLabelSite {
                addr: F + 1,
                target,
            }],
            symbols: symbols(),
            ..Default::default()
        }
    }

    #[test]
    fn a_jump_label_in_the_body_is_accepted_in_either_state_and_only_to_its_target() {
        let none = Guest(BTreeMap::new());
        let run = F + SLIDE + 1;
        let to = F + 0x40;
        // 5 bytes: the file's NOP, enabled at boot (a jmp to the entry's target), and back.
        let file = body(&NOP5);
        let enabled = body(&rel(&[0xe9], run, to + SLIDE));
        assert!(accepted(jump_label(to), &none, &file, &enabled));
        let file_jmp = body(&rel(&[0xe9], F + 1, to));
        assert!(accepted(jump_label(to), &none, &file_jmp, &body(&NOP5)));
        // A jump elsewhere, a call, or mid text_poke_bp (int3 first): refused.
        let elsewhere = body(&rel(&[0xe9], run, to + SLIDE + 0x10));
        assert!(!accepted(jump_label(to), &none, &file, &elsewhere));
        let call = body(&rel(&[0xe8], run, to + SLIDE));
        assert!(!accepted(jump_label(to), &none, &file, &call));
        let mut poked = enabled.clone();
        poked[1] = 0xcc;
        assert!(!accepted(jump_label(to), &none, &file, &poked));
        // 2 bytes: the 2-byte NOP and a jmp rel8 to the target, nothing else.
        let short = |b: [u8; 2]| {
            let mut v = vec![0x55];
            v.extend_from_slice(&b);
            v.extend_from_slice(&[0x5d, 0xc3]);
            v
        };
        let rel8 = (to + SLIDE).wrapping_sub(run + 2) as u8;
        assert!(accepted(
            jump_label(to),
            &none,
            &short(NOP2),
            &short([0xeb, rel8])
        ));
        assert!(accepted(
            jump_label(to),
            &none,
            &short([0xeb, rel8]),
            &short(NOP2)
        ));
        assert!(!accepted(
            jump_label(to),
            &none,
            &short(NOP2),
            &short([0xeb, rel8.wrapping_add(1)])
        ));
        assert!(!accepted(
            jump_label(to),
            &none,
            &short(NOP2),
            &short([0x90, 0x90])
        ));
    }

    #[test]
    fn a_site_reaching_past_the_function_or_bytes_in_no_site_are_not_accepted() {
        let none = Guest(BTreeMap::new());
        // The alternative claims 8 bytes from F+1; the function has 6.
        let file = [0x55, 0x90, 0x90, 0x90, 0x5d, 0xc3];
        let running = [0x55, 0xfa, 0x90, 0x90, 0x5d, 0xc3];
        assert!(!accepted(
            alternative(vec![0xfa], 8),
            &none,
            &file,
            &running
        ));
        assert!(accepted(alternative(vec![0xfa], 3), &none, &file, &running));
        // The same difference with no table entry there.
        let elsewhere = BootSites {
            alternatives: vec![Alternative {
                instr: F + 0x100,
                instrlen: 3,
                repl: REPL,
                cpuid: 0x110,
                replacement: vec![0xfa],
            }],
            symbols: symbols(),
            ..Default::default()
        };
        assert!(!accepted(elsewhere, &none, &file, &running));
    }
}
