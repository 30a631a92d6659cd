//! The planner on real compiler output.
//!
//! # Fixtures: embedded bytes, checked against gcc when there is one
//!
//! The code under test is `tests/fixtures.c`, compiled and linked by gcc -O2 in eight variants
//! (plain, `-fcf-protection=full`, `-fpatchable-function-entry=5`, `-pg -mfentry`,
//! `-pg -mfentry -mnop-mcount`, each with and without IBT) at a fixed address (`.text` at
//! 0x401000, no PIE), so branches, calls and RIP-relative operands are resolved as in a real
//! image. `tests/fixtures.rs` embeds each image's `.text` and symbols, with the source, the
//! exact commands and the toolchain in its header comment.
//!
//! Why embed rather than compile at test time: the assertions below name exact addresses
//! (this `je` at 0x401043 targets 0x401050), which only hold for one compiler's output; gcc
//! versions and distributions (Ubuntu turns on CET and PIE by default) emit different code.
//! Embedded bytes make every run, with or without gcc, test the same instructions.
//!
//! What keeps the embedded bytes honest: `gcc::fixtures_match_gcc` rebuilds every image
//! with the gcc on `PATH` (and skips, saying so, when there is none). With the recorded
//! toolchain the bytes and symbols must be identical; with another one it runs
//! [`check_image`] on the fresh output: every function and every micropatch site the
//! fresh code offers, planned and checked against an independent oracle of the rules, so
//! the planner must give the same answers on any gcc's code. `check_image` runs on the
//! embedded images too (`embedded_images_follow_the_rules`).
//!
//! Each image is also checked loaded at a Linux kernel's text address (above 4 GiB; the code
//! is position-independent within the image, so only the symbols move), where a far arena
//! can no longer reach RIP-relative operands.
//!
//! To change the fixtures: edit `tests/fixtures.c`, then regenerate `tests/fixtures.rs`
//! (`PLAN_FIXTURES_REGEN=1 cargo test -p vmm --lib engine::plan::tests::gcc`, `cargo fmt`).
//!
//! Nothing here trusts the planner's own verification: plans are decoded back with iced-x86
//! by the helpers below (BlockEncoder's long forms, a branch through an 8-byte pointer placed
//! after the code, are followed to the pointer).

use super::*;
use iced_x86::Mnemonic;

mod fixtures;
mod gcc;

/// A linked fixture image: `.text` at `text_at`, and its symbols (name, address, size).
#[derive(Debug, Clone, Copy)]
pub struct Image<'a> {
    pub name: &'a str,
    pub flags: &'a str,
    pub text_at: u64,
    pub text: &'a [u8],
    pub symbols: &'a [(&'a str, u64, u64)],
}

/// What a variant puts at every function's entry, before its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Nothing,
    /// `-fpatchable-function-entry=5`: five one-byte NOPs.
    PatchableNops,
    /// `-pg -mfentry`: `call __fentry__`, which [`Image::boot`] turns into [`NOP5`].
    FentryCall,
    /// `-mnop-mcount`: gcc's own [`NOP5`].
    Nop5,
}

impl<'a> Image<'a> {
    fn symbol(&self, name: &str) -> (u64, u64) {
        self.symbols
            .iter()
            .find(|s| s.0 == name)
            .map(|s| (s.1, s.2))
            .unwrap_or_else(|| panic!("{}: no symbol {name}", self.name))
    }

    fn ibt(&self) -> bool {
        self.flags.contains("-fcf-protection=full")
    }

    fn entry(&self) -> Entry {
        if self.flags.contains("-fpatchable-function-entry=5") {
            Entry::PatchableNops
        } else if self.flags.contains("-mnop-mcount") {
            Entry::Nop5
        } else if self.flags.contains("-mfentry") {
            Entry::FentryCall
        } else {
            Entry::Nothing
        }
    }

    /// Bytes before the body of every function: `endbr64`, then the entry NOPs.
    fn entry_len(&self) -> usize {
        let ibt = if self.ibt() { ENDBR64.len() } else { 0 };
        ibt + if self.entry() == Entry::Nothing { 0 } else { 5 }
    }

    /// The functions (symbols with a size, inside `.text`), by address.
    fn functions(&self) -> Vec<(&'a str, u64, u64)> {
        let end = self.text_at + self.text.len() as u64;
        let mut f: Vec<_> = self
            .symbols
            .iter()
            .copied()
            .filter(|&(_, a, s)| s > 0 && a >= self.text_at && a + s <= end)
            .collect();
        f.sort_by_key(|s| s.1);
        f
    }

    /// `.text` as a running guest holds it: like Linux at boot, every `call __fentry__` at a
    /// function's entry becomes [`NOP5`]. Checks every entry has the variant's shape.
    fn boot(&self) -> Booted<'a> {
        let mut text = self.text.to_vec();
        for (name, at, _) in self.functions() {
            let mut o = (at - self.text_at) as usize;
            if self.ibt() {
                assert_eq!(
                    text[o..o + 4],
                    ENDBR64,
                    "{}: {name} has no endbr64",
                    self.name
                );
                o += 4;
            }
            let entry = &mut text[o..o + 5];
            match self.entry() {
                Entry::Nothing => {}
                Entry::PatchableNops => assert_eq!(entry, [NOP1; 5], "{}: {name}", self.name),
                Entry::Nop5 => assert_eq!(entry, NOP5, "{}: {name}", self.name),
                Entry::FentryCall => {
                    let next = self.text_at + (o + 5) as u64;
                    let rel = i32::from_le_bytes(entry[1..5].try_into().unwrap());
                    let target = next.wrapping_add_signed(i64::from(rel));
                    assert_eq!(entry[0], 0xe8, "{}: {name} has no call at entry", self.name);
                    assert_eq!(target, self.symbol("__fentry__").0, "{}: {name}", self.name);
                    entry.copy_from_slice(&NOP5);
                }
            }
        }
        Booted {
            img: *self,
            text_at: self.text_at,
            text,
            symbols: self.symbols.to_vec(),
        }
    }
}

/// An image's code as the guest holds it (see [`Image::boot`]), possibly loaded elsewhere.
struct Booted<'a> {
    img: Image<'a>,
    text_at: u64,
    text: Vec<u8>,
    symbols: Vec<(&'a str, u64, u64)>,
}

impl<'a> Booted<'a> {
    /// The same image loaded at `text_at`, its data with it (as a kernel above 4 GiB is):
    /// the code is position-independent within the image, so only symbols move.
    fn rebased(&self, text_at: u64) -> Booted<'a> {
        let delta = text_at.wrapping_sub(self.text_at);
        Booted {
            img: self.img,
            text_at,
            text: self.text.clone(),
            symbols: self
                .symbols
                .iter()
                .map(|&(n, a, s)| (n, a.wrapping_add(delta), s))
                .collect(),
        }
    }

    fn symbol(&self, name: &str) -> (u64, u64) {
        self.symbols
            .iter()
            .find(|s| s.0 == name)
            .map(|s| (s.1, s.2))
            .unwrap_or_else(|| panic!("{}: no symbol {name}", self.img.name))
    }

    /// The functions (symbols with a size, inside `.text`), by address.
    fn functions(&self) -> Vec<(&'a str, u64, u64)> {
        let end = self.text_at + self.text.len() as u64;
        let mut f: Vec<_> = self
            .symbols
            .iter()
            .copied()
            .filter(|&(_, a, s)| s > 0 && a >= self.text_at && a + s <= end)
            .collect();
        f.sort_by_key(|s| s.1);
        f
    }

    fn bytes(&self, at: u64, len: usize) -> &[u8] {
        let o = (at - self.text_at) as usize;
        &self.text[o..o + len]
    }

    /// A function's address and bytes.
    fn func(&self, name: &str) -> (u64, &[u8]) {
        let (at, size) = self.symbol(name);
        (at, self.bytes(at, size as usize))
    }

    fn function_code(&self, name: &str) -> FunctionCode<'_> {
        let (start, bytes) = self.func(name);
        FunctionCode { start, bytes }
    }

    /// A function site on the whole function `name`.
    fn function_site(&self, name: &str) -> SiteInput<'_> {
        let (at, bytes) = self.func(name);
        SiteInput {
            name: name.into(),
            kind: SiteKind::Function,
            at,
            expected: bytes,
            current: bytes,
            function: None,
        }
    }

    /// A micropatch site of `len` bytes at `at` in function `func` (bounds known).
    fn micro(&self, func: &str, at: u64, len: usize) -> SiteInput<'_> {
        let f = self.function_code(func);
        SiteInput {
            name: format!("{func}+{:#x}", at.wrapping_sub(f.start)),
            kind: SiteKind::Micropatch,
            at,
            expected: self.bytes(at, len),
            current: self.bytes(at, len),
            function: Some(f),
        }
    }
}

/// Where the tests put the arena: within rel32 reach of 0x401000 (the test guest's layout)...
const ARENA: u64 = 0x7fe0_0000;
/// ...or out of it (needs the 14-byte jump).
const FAR_ARENA: u64 = 0x7f12_3456_7000;
/// Where a Linux x86-64 kernel's text starts, to load images above 4 GiB...
const KERNEL_TEXT: u64 = 0xffff_ffff_8100_0000;
/// ...and an arena within rel32 reach of it.
const KERNEL_ARENA: u64 = 0xffff_ffff_c000_0000;

/// Decodes all of `bytes` at `ip` (independently of the planner).
fn insns(bytes: &[u8], ip: u64) -> Vec<Instruction> {
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let out: Vec<Instruction> = d.iter().collect();
    assert!(
        out.iter().all(|i| !i.is_invalid()),
        "undecodable at {ip:#x}"
    );
    out
}

/// The target of a direct near branch (jmp, jcc, call, loop, jrcxz, xbegin).
fn direct_target(i: &Instruction) -> Option<u64> {
    (i.op_count() > 0 && (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::NearBranch64))
        .then(|| i.near_branch_target())
}

fn calls(i: &Instruction) -> bool {
    matches!(
        i.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    )
}

/// One instruction of a relocated copy as it executes.
#[derive(Debug, Clone, Copy)]
struct Exec {
    ip: u64,
    len: usize,
    /// The first instruction actually encoded.
    insn: Instruction,
    /// What it does: for a long form, the branch it stands for.
    mnemonic: Mnemonic,
    target: Option<u64>,
}

impl Exec {
    /// Whether the encoder wrote this branch as a long form (through a pointer).
    fn is_long(&self) -> bool {
        self.target.is_some() && direct_target(&self.insn) != self.target
    }
}

fn decode_at(copy: &[u8], at: u64, off: usize) -> Instruction {
    let mut d = Decoder::with_ip(64, &copy[off..], at + off as u64, DecoderOptions::NONE);
    let i = d.decode();
    assert!(
        !i.is_invalid(),
        "copy at {:#x} does not decode",
        at + off as u64
    );
    i
}

/// `jmp/call qword [rip+d]` reading an 8-byte pointer inside the copy: (slot, pointer).
fn via_pointer(copy: &[u8], at: u64, i: &Instruction) -> Option<(u64, u64)> {
    if !matches!(i.code(), Code::Jmp_rm64 | Code::Call_rm64) || !i.is_ip_rel_memory_operand() {
        return None;
    }
    let slot = i.ip_rel_memory_address();
    let o = usize::try_from(slot.checked_sub(at)?).ok()?;
    let b = copy.get(o..o + 8)?;
    Some((slot, u64::from_le_bytes(b.try_into().unwrap())))
}

/// Decodes the first `count` instructions of a copy at `at`, folding BlockEncoder's long forms
/// (`jmp/call [rip]` + pointer; `j!cc +8; jmp [rip]` for a jcc) back into the branch they
/// stand for, and checks that what follows the code is only int3 alignment and exactly the
/// pointers those use.
fn read_copy(copy: &[u8], at: u64, count: usize) -> Vec<Exec> {
    let mut out = Vec::new();
    let mut slots = Vec::new();
    let mut off = 0usize;
    while out.len() < count {
        let i = decode_at(copy, at, off);
        let ip = at + off as u64;
        let e = if let Some((slot, to)) = via_pointer(copy, at, &i) {
            slots.push(slot);
            let mnemonic = if i.code() == Code::Jmp_rm64 {
                Mnemonic::Jmp
            } else {
                Mnemonic::Call
            };
            Exec {
                ip,
                len: i.len(),
                insn: i,
                mnemonic,
                target: Some(to),
            }
        } else if i.code().is_jcc_short() && off + i.len() < copy.len() {
            let j = decode_at(copy, at, off + i.len());
            match via_pointer(copy, at, &j) {
                Some((slot, to))
                    if j.code() == Code::Jmp_rm64 && i.near_branch_target() == j.next_ip() =>
                {
                    slots.push(slot);
                    Exec {
                        ip,
                        len: i.len() + j.len(),
                        insn: i,
                        mnemonic: i.code().negate_condition_code().mnemonic(),
                        target: Some(to),
                    }
                }
                _ => Exec {
                    ip,
                    len: i.len(),
                    insn: i,
                    mnemonic: i.mnemonic(),
                    target: direct_target(&i),
                },
            }
        } else {
            Exec {
                ip,
                len: i.len(),
                insn: i,
                mnemonic: i.mnemonic(),
                target: direct_target(&i),
            }
        };
        off += e.len;
        out.push(e);
    }
    let code_end = at + off as u64;
    if slots.is_empty() {
        assert_eq!(off, copy.len(), "bytes after the copy's code");
    } else {
        let data = code_end.next_multiple_of(8);
        let pad = (data - code_end) as usize;
        assert!(copy[off..off + pad].iter().all(|&b| b == INT3), "padding");
        slots.sort_unstable();
        let want: Vec<u64> = (0..slots.len() as u64).map(|k| data + 8 * k).collect();
        assert_eq!(slots, want, "pointers must follow the code, each used once");
        assert_eq!(
            copy.len(),
            off + pad + 8 * slots.len(),
            "bytes after the data"
        );
    }
    out
}

/// Checks a relocated copy of `displaced` at `copy_at`: the same instructions, every branch
/// to the same absolute target (a branch to a displaced instruction to its copy), every
/// RIP-relative operand at the same absolute address, then a jump back to `end`. Returns
/// each displaced instruction's copy.
fn check_copy(displaced: &[Instruction], copy: &[u8], copy_at: u64, end: u64) -> Vec<Exec> {
    let got = read_copy(copy, copy_at, displaced.len() + 1);
    let map = |t: u64| {
        displaced
            .iter()
            .position(|d| d.ip() == t)
            .map_or(t, |k| got[k].ip)
    };
    for (d, g) in displaced.iter().zip(&got) {
        assert_eq!(
            g.mnemonic,
            d.mnemonic(),
            "{:#x}: {d} copied as {}",
            d.ip(),
            g.insn
        );
        match direct_target(d) {
            Some(t) => assert_eq!(g.target, Some(map(t)), "{:#x}: {d} retargeted", d.ip()),
            None => {
                let mut g_insn = g.insn;
                if d.is_ip_rel_memory_operand() {
                    // Same absolute address, RIP-relative or (from far, below 4 GiB)
                    // EIP-relative with an address-size prefix.
                    assert!(g.insn.is_ip_rel_memory_operand());
                    assert_eq!(g.insn.ip_rel_memory_address(), d.ip_rel_memory_address());
                    if g.insn.memory_base() == iced_x86::Register::EIP {
                        assert!(d.ip_rel_memory_address() <= u64::from(u32::MAX));
                        assert_eq!(
                            decode_at(copy, copy_at, (g.ip - copy_at) as usize).len(),
                            g.len
                        );
                        assert_eq!(copy[(g.ip - copy_at) as usize], 0x67, "addr32 prefix");
                        g_insn.set_memory_base(iced_x86::Register::RIP);
                        g_insn.set_memory_displ_size(d.memory_displ_size());
                    }
                }
                assert_eq!(g_insn, *d, "{:#x}: {d} copied as {}", d.ip(), g.insn);
            }
        }
    }
    let back = got.last().unwrap();
    assert_eq!(
        (back.mnemonic, back.target),
        (Mnemonic::Jmp, Some(end)),
        "the copy must end with a jump back to {end:#x}"
    );
    got
}

/// Checks the jump written at `at`: to `to`, `jump_len` long, the rest int3.
fn check_jump(jump: &[u8], at: u64, to: u64, jump_len: usize, fill: usize) {
    assert_eq!(jump.len(), fill);
    if jump_len == JMP_REL32_LEN {
        assert_eq!(jump[0], 0xe9);
        let rel = i32::from_le_bytes(jump[1..5].try_into().unwrap());
        assert_eq!((at + 5).wrapping_add_signed(i64::from(rel)), to);
    } else {
        assert_eq!(jump_len, JMP_ABS_LEN);
        assert_eq!(jump[..6], [0xff, 0x25, 0, 0, 0, 0]);
        assert_eq!(u64::from_le_bytes(jump[6..14].try_into().unwrap()), to);
    }
    assert!(
        jump[jump_len..].iter().all(|&b| b == INT3),
        "fill: {jump:02x?}"
    );
    let i = decode_at(jump, at, 0);
    assert_eq!(i.mnemonic(), Mnemonic::Jmp);
}

/// Everything a built plan must be, decoded back independently. `code` is what was passed to
/// [`build`]; returns the copy of the displaced instructions.
fn check_plan(b: &Booted<'_>, p: &SitePlan, code: &[u8], escape_at: u64) -> Vec<Exec> {
    let a = &p.analysis;
    let (start, end) = a.range();
    check_jump(&p.jump, start, p.code_at, a.jump_len, a.displaced_len());
    assert!(a.displaced_len() >= a.jump_len);
    assert_eq!(p.original, b.bytes(start, a.displaced_len()));
    assert_eq!(a.displaced_bytes, p.original);
    let displaced = insns(&p.original, start);
    assert_eq!(
        displaced.iter().map(Instruction::ip).collect::<Vec<_>>(),
        a.displaced.iter().map(Instruction::ip).collect::<Vec<_>>()
    );
    let (copy_at, copy) = match a.kind {
        SiteKind::Function => {
            assert_eq!(p.arena.len(), 2);
            assert_eq!(p.arena[0], (p.code_at, code.to_vec()));
            assert_eq!(p.arena[1].0, escape_at);
            (escape_at, &p.arena[1].1[..])
        }
        SiteKind::Micropatch => {
            assert_eq!(p.arena.len(), 1);
            let (at, stub) = &p.arena[0];
            assert_eq!(*at, p.code_at);
            assert_eq!(
                &stub[..code.len()],
                code,
                "the stub starts with the patch code"
            );
            (p.code_at + code.len() as u64, &stub[code.len()..])
        }
    };
    let got = check_copy(&displaced, copy, copy_at, end);
    // vCPUs: the first displaced instruction stays (it will run the jump); every other one
    // moves to its copy; a RIP between instruction boundaries has nowhere to go.
    for (k, d) in displaced.iter().enumerate() {
        assert_eq!(p.moves[k], (d.ip(), got[k].ip));
        assert!((copy_at..copy_at + copy.len() as u64).contains(&got[k].ip));
        let want = if k == 0 { d.ip() } else { got[k].ip };
        assert_eq!(p.relocate_rip(d.ip()), Some(want));
    }
    assert_eq!(p.moves.len(), displaced.len());
    for rip in start..end {
        if !displaced.iter().any(|d| d.ip() == rip) {
            assert_eq!(p.relocate_rip(rip), None, "{rip:#x} splits an instruction");
        }
    }
    assert_eq!(p.relocate_rip(start - 1), Some(start - 1));
    assert_eq!(p.relocate_rip(end), Some(end));
    got
}

/// What the rules say about displacing `displaced` (whole instructions) of a function whose
/// instructions are `finsns`, decided independently of the planner: `Ok(())` or the name of
/// the error.
fn oracle(
    finsns: &[Instruction],
    displaced: &[Instruction],
    far: bool,
) -> Result<(), &'static str> {
    let start = displaced[0].ip();
    let end = displaced.last().unwrap().next_ip();
    if displaced.iter().any(|i| i.code() == Code::Endbr64) {
        return Err("DisplacesEndbr");
    }
    if displaced[..displaced.len() - 1].iter().any(calls) {
        return Err("CallNotLast");
    }
    let inside = |ip: u64| (start..end).contains(&ip);
    let into = finsns.iter().any(|i| {
        direct_target(i).is_some_and(|t| {
            t > start && t < end && (!inside(i.ip()) || !displaced.iter().any(|d| d.ip() == t))
        })
    });
    if into {
        return Err("BranchIntoRange");
    }
    // From far away, an operand is only reachable RIP- or EIP-relative below 4 GiB.
    let high = |i: &Instruction| {
        i.is_ip_rel_memory_operand() && i.ip_rel_memory_address() > u64::from(u32::MAX)
    };
    if far && displaced.iter().any(high) {
        return Err("Unrelocatable");
    }
    Ok(())
}

/// Whether a micropatch may displace `displaced`, decided independently of the planner: no
/// further than the shortest run of whole instructions from its start that holds the jump,
/// grown while an instruction after the run branches back into the run's interior.
fn oracle_extent(finsns: &[Instruction], displaced: &[Instruction], jump_len: usize) -> bool {
    let start = displaced[0].ip();
    let end = displaced.last().unwrap().next_ip();
    let first = finsns.iter().position(|i| i.ip() == start).unwrap();
    let mut limit = start;
    for i in &finsns[first..] {
        if limit - start >= jump_len as u64 {
            break;
        }
        limit = i.next_ip();
    }
    let mut grew = true;
    while grew {
        grew = false;
        for i in finsns {
            if i.ip() >= limit && direct_target(i).is_some_and(|t| t > start && t < limit) {
                limit = i.next_ip();
                grew = true;
            }
        }
    }
    end <= limit
}

fn error_name(e: &PlanError) -> &'static str {
    match e {
        PlanError::ExpectedMismatch { .. } => "ExpectedMismatch",
        PlanError::ExpectedLength { .. } => "ExpectedLength",
        PlanError::SplitsInstruction { .. } => "SplitsInstruction",
        PlanError::Undecodable { .. } => "Undecodable",
        PlanError::TooShort { .. } => "TooShort",
        PlanError::DisplacedTooShort { .. } => "DisplacedTooShort",
        PlanError::ExpectedTooLong { .. } => "ExpectedTooLong",
        PlanError::LiveRewrite { .. } => "LiveRewrite",
        PlanError::PreemptedInsideJump { .. } => "PreemptedInsideJump",
        PlanError::RewrittenByOs { .. } => "RewrittenByOs",
        PlanError::ColdPart { .. } => "ColdPart",
        PlanError::BranchIntoRange { .. } => "BranchIntoRange",
        PlanError::CallNotLast { .. } => "CallNotLast",
        PlanError::DisplacesEndbr { .. } => "DisplacesEndbr",
        PlanError::Unrelocatable { .. } => "Unrelocatable",
        PlanError::Verify { .. } => "Verify",
        PlanError::OutsideFunction { .. } => "OutsideFunction",
        PlanError::NotFunctionStart { .. } => "NotFunctionStart",
        PlanError::PastFunctionEnd { .. } => "PastFunctionEnd",
        PlanError::FtraceActive { .. } => "FtraceActive",
    }
}

/// Tallies of outcomes, to prove the checks ran on something.
#[derive(Debug, Default)]
struct Tally {
    ok: usize,
    ok_inner_branch: usize,
    /// Plans whose copy holds a long form (`jmp/call [rip]`) other than the jump back.
    ok_long_branch: usize,
    /// Accepted by the rules, but longer than the jump needs ([`check_extent`]).
    too_long: usize,
    errors: std::collections::BTreeMap<&'static str, usize>,
}

/// Plans every function of the image as a function site, with the near 5-byte jump and the
/// far 14-byte one, and checks each answer against [`oracle`] and each plan with
/// [`check_plan`].
fn check_function_sites(b: &Booted<'_>, near_arena: u64) -> Tally {
    let img = &b.img;
    let mut t = Tally::default();
    for (name, at, size) in b.functions() {
        let (_, bytes) = b.func(name);
        let finsns = insns(bytes, at);
        let body = at + img.entry_len() as u64;
        for (jump_len, code_at) in [(JMP_REL32_LEN, near_arena), (JMP_ABS_LEN, FAR_ARENA)] {
            let ctx = format!("{}: function {name}, {jump_len}-byte jump", img.name);
            let got = analyze(&b.function_site(name), jump_len);
            // The jump goes after endbr64 and the entry NOPs, over whole instructions.
            let mut displaced = Vec::new();
            for i in finsns.iter().filter(|i| i.ip() >= body) {
                if displaced.iter().map(Instruction::len).sum::<usize>() >= jump_len {
                    break;
                }
                displaced.push(*i);
            }
            if displaced.iter().map(Instruction::len).sum::<usize>() < jump_len {
                assert_eq!(
                    got.unwrap_err(),
                    PlanError::TooShort {
                        site: name.into(),
                        at: body,
                        available: (at + size - body) as usize,
                        needed: jump_len,
                    },
                    "{ctx}"
                );
                *t.errors.entry("TooShort").or_default() += 1;
                continue;
            }
            let want = oracle(&finsns, &displaced, jump_len == JMP_ABS_LEN);
            let result = got.and_then(|a| {
                assert_eq!(a.jump_at, body, "{ctx}");
                let escape_at = code_at + 0x1003;
                build(&a, &[0xc3], code_at, escape_at).map(|p| (p, escape_at))
            });
            match (want, result) {
                (Ok(()), Ok((p, escape_at))) => {
                    check_plan(b, &p, &[0xc3], escape_at);
                    assert_eq!(p.relocate_rip(at), Some(at), "{ctx}: entry");
                    t.ok += 1;
                }
                (w, r) => {
                    let detail = format!("{ctx}: {:?}", r.as_ref().err());
                    let r = r.map(|_| ()).map_err(|e| error_name(&e));
                    assert_eq!(r, w, "{detail}");
                    *t.errors.entry(w.unwrap_err()).or_default() += 1;
                }
            }
        }
    }
    t
}

/// Plans a micropatch at every instruction boundary of every function, over every run of
/// whole instructions from `jump_len` to 32 bytes, and checks each answer against
/// [`oracle`] and each plan with [`check_plan`].
fn check_micropatch_sites(b: &Booted<'_>, jump_len: usize, code_at: u64) -> Tally {
    let img = &b.img;
    let far = jump_len == JMP_ABS_LEN;
    let code = [0x48, 0xff, 0xc0]; // inc rax: odd length, so the copy starts unaligned
    let mut t = Tally::default();
    for (name, at, _) in b.functions() {
        let (_, bytes) = b.func(name);
        let finsns = insns(bytes, at);
        for s in 0..finsns.len() {
            for e in s..finsns.len() {
                let displaced = &finsns[s..=e];
                let start = displaced[0].ip();
                let len = (displaced.last().unwrap().next_ip() - start) as usize;
                if len < jump_len {
                    continue;
                }
                if len > 32 {
                    break;
                }
                let ctx = format!(
                    "{}: {name} {start:#x}+{len}, {jump_len}-byte jump",
                    img.name
                );
                let want = oracle(&finsns, displaced, far);
                let got = analyze(&b.micro(name, start, len), jump_len)
                    .and_then(|a| build(&a, &code, code_at, 0));
                match (want, got) {
                    (Ok(()), Ok(p)) => {
                        let capped = check_extent(&b.micro(name, start, len), &p.analysis);
                        assert_eq!(
                            capped.is_err(),
                            !oracle_extent(&finsns, displaced, jump_len),
                            "{ctx}: {capped:?}"
                        );
                        if capped.is_err() {
                            t.too_long += 1;
                        }
                        let copy = check_plan(b, &p, &code, 0);
                        t.ok += 1;
                        if copy[..copy.len() - 1].iter().any(Exec::is_long) {
                            t.ok_long_branch += 1;
                        }
                        let (s, e) = p.analysis.range();
                        if displaced
                            .iter()
                            .any(|d| direct_target(d).is_some_and(|x| (s..e).contains(&x)))
                        {
                            t.ok_inner_branch += 1;
                        }
                    }
                    (w, r) => {
                        let detail = format!("{ctx}: {:?}", r.as_ref().err());
                        let r = r.map(|_| ()).map_err(|e| error_name(&e));
                        assert_eq!(r, w, "{detail}");
                        *t.errors.entry(w.unwrap_err()).or_default() += 1;
                    }
                }
            }
        }
    }
    t
}

/// The rules, on every function and site one image offers (embedded or freshly compiled):
/// the entry conventions of its variant, `ret0` too short everywhere, and every function
/// site and micropatch site, with the arena near (5-byte jump) and far (14-byte jump), as
/// [`oracle`] says, each plan decoding back right. Twice: where gcc linked the image, and
/// loaded where a kernel is (above 4 GiB, where far RIP-relative operands cannot be reached).
pub(super) fn check_image(img: &Image<'_>) {
    let low = img.boot();
    // `int ret0(void) { return 0; }`, shorter than any jump at -O2 (`xor %eax,%eax; ret`).
    let (at, size) = low.symbol("ret0");
    let body = size as usize - img.entry_len();
    assert!(body < JMP_REL32_LEN, "{}: ret0 is {body} bytes", img.name);
    assert_eq!(
        analyze(&low.function_site("ret0"), JMP_REL32_LEN).unwrap_err(),
        PlanError::TooShort {
            site: "ret0".into(),
            at: at + img.entry_len() as u64,
            available: body,
            needed: JMP_REL32_LEN,
        },
        "{}",
        img.name
    );
    let kernel = low.rebased(KERNEL_TEXT);
    for (b, near_arena) in [(&low, ARENA), (&kernel, KERNEL_ARENA)] {
        let ctx = format!("{} at {:#x}", img.name, b.text_at);
        let f = check_function_sites(b, near_arena);
        assert!(f.ok >= 6, "{ctx}: {f:?}");
        let near = check_micropatch_sites(b, JMP_REL32_LEN, near_arena);
        assert!(near.ok >= 50, "{ctx}: {near:?}");
        assert!(near.ok_inner_branch >= 1, "{ctx}: {near:?}");
        assert!(near.too_long >= 1, "{ctx}: {near:?}");
        for must in ["BranchIntoRange", "CallNotLast"] {
            assert!(near.errors.contains_key(must), "{ctx}: {near:?}");
        }
        let far = check_micropatch_sites(b, JMP_ABS_LEN, FAR_ARENA);
        assert!(far.ok >= 10, "{ctx}: {far:?}");
        assert!(far.ok_long_branch >= 3, "{ctx}: {far:?}");
        assert_eq!(
            far.errors.contains_key("Unrelocatable"),
            b.text_at == KERNEL_TEXT,
            "{ctx}: {far:?}"
        );
    }
}

#[test]
fn embedded_images_follow_the_rules() {
    assert_eq!(fixtures::ALL.len(), gcc::VARIANTS.len());
    for img in &fixtures::ALL {
        check_image(img);
        // xor %eax,%eax; ret after the entry, in every variant.
        let (at, size) = img.boot().symbol("ret0");
        let o = (at - img.text_at) as usize + img.entry_len();
        assert_eq!(size as usize, img.entry_len() + 3, "{}", img.name);
        assert_eq!(img.text[o..o + 3], [0x31, 0xc0, 0xc3], "{}", img.name);
    }
}

// ---------------------------------------------------------------------------------------
// The cases one by one, on exact instructions of the embedded images. The disassembly in
// the comments is objdump's of the image named.
// ---------------------------------------------------------------------------------------

use fixtures::{
    FENTRY, IBT, IBT_FENTRY, IBT_NOP_MCOUNT, IBT_PATCHABLE, NOP_MCOUNT, PATCHABLE, PLAIN,
};

/// `compute` of the v1 test guest (rustc, frame pointers): push rbp; mov rbp,rsp; push rbx;
/// push rax; mov rbx,rdi; call triangle; ...
const COMPUTE: [u8; 35] = [
    0x55, 0x48, 0x89, 0xe5, 0x53, 0x50, 0x48, 0x89, 0xfb, 0xe8, 0x22, 0x00, 0x00, 0x00, 0x48, 0xc1,
    0xc3, 0x20, 0x48, 0x31, 0xc3, 0x48, 0x89, 0xdf, 0x48, 0x83, 0xc4, 0x08, 0x5b, 0x5d, 0xe9, 0x2d,
    0x00, 0x00, 0x00,
];

#[test]
fn function_jump_displaces_whole_instructions() {
    let site = SiteInput {
        name: "f".into(),
        kind: SiteKind::Function,
        at: 0x100480,
        expected: &COMPUTE,
        current: &COMPUTE,
        function: None,
    };
    let a = analyze(&site, JMP_REL32_LEN).unwrap();
    assert_eq!(a.jump_at, 0x100480);
    assert_eq!(a.displaced_len(), 5); // push rbp; mov rbp,rsp; push rbx
    let p = build(&a, &[0xc3], 0x7fe0_0000, 0x7fe0_0040).unwrap();
    assert_eq!(p.jump[0], 0xe9);
    assert_eq!(p.original, COMPUTE[..5]);
    assert_eq!(p.relocate_rip(0x100480), Some(0x100480));
    assert_eq!(p.relocate_rip(0x100481), Some(0x7fe0_0041));
    assert_eq!(p.relocate_rip(0x100484), Some(0x7fe0_0044));
    assert_eq!(p.relocate_rip(0x100485), Some(0x100485));
}

/// Case 1. IBT `first_or`:
/// ```text
/// 401040: f3 0f 1e fa     endbr64
/// 401044: 48 85 ff        test %rdi,%rdi
/// 401047: 74 0b           je   401054
/// 401049: 48 8b 05 b0 0f  mov  0xfb0(%rip),%rax   # counter
/// ```
#[test]
fn endbr64_stays_and_the_jump_goes_at_plus_4() {
    let b = IBT.boot();
    let (at, bytes) = b.func("first_or");
    assert_eq!((at, &bytes[..4]), (0x401040, &ENDBR64[..]));
    let a = analyze(&b.function_site("first_or"), JMP_REL32_LEN).unwrap();
    assert_eq!(a.range(), (0x401044, 0x401049));
    assert_eq!(a.displaced_bytes, [0x48, 0x85, 0xff, 0x74, 0x0b]);
    let escape = ARENA + 0x100;
    let p = build(&a, &[0xc3], ARENA, escape).unwrap();
    let copy = check_plan(&b, &p, &[0xc3], escape);

    // The function as patched: endbr64 untouched, then the jump to the new function.
    let mut patched = bytes.to_vec();
    patched[4..9].copy_from_slice(&p.jump);
    let entry = insns(&patched[..9], at);
    assert_eq!(entry[0].code(), Code::Endbr64);
    assert_eq!(entry[1].code(), Code::Jmp_rel32_64);
    assert_eq!(entry[1].near_branch_target(), ARENA);

    // vCPUs: at the function's start (endbr64) and at the jump they stay; on the displaced
    // `je` they move to its copy, which still goes to 0x401054.
    assert_eq!(p.relocate_rip(0x401040), Some(0x401040));
    assert_eq!(p.relocate_rip(0x401044), Some(0x401044));
    assert_eq!(p.relocate_rip(0x401047), Some(escape + 3));
    assert_eq!(copy[1].ip, escape + 3);
    assert_eq!(
        (copy[1].mnemonic, copy[1].target),
        (Mnemonic::Je, Some(0x401054))
    );
    assert_eq!(p.relocate_rip(0x401045), None); // inside `test`
    assert_eq!(p.relocate_rip(0x401049), Some(0x401049));
}

/// Case 2. The entry NOPs of ftrace (`call __fentry__` turned into [`NOP5`] at boot, or
/// gcc's own with `-mnop-mcount`) and of `-fpatchable-function-entry=5` (five `nop`), with
/// and without `endbr64` before them: the jump goes right after them, over `bump`'s first
/// body instruction `mov counter(%rip),%rax` (7 bytes), and the NOPs stay as they are.
#[test]
fn entry_nops_are_left_to_their_owner() {
    let cases: [(&Image<'_>, [u8; 5], u64); 6] = [
        (&PATCHABLE, [NOP1; 5], 5),
        (&IBT_PATCHABLE, [NOP1; 5], 9),
        (&FENTRY, NOP5, 5),
        (&IBT_FENTRY, NOP5, 9),
        (&NOP_MCOUNT, NOP5, 5),
        (&IBT_NOP_MCOUNT, NOP5, 9),
    ];
    for (img, nops, skip) in cases {
        let b = img.boot();
        let (at, bytes) = b.func("bump");
        let body = at + skip;
        assert_eq!(
            bytes[skip as usize - 5..skip as usize],
            nops,
            "{}",
            img.name
        );
        if img.entry() == Entry::FentryCall {
            // What gcc emitted there, before the boot-time rewrite: `call __fentry__`.
            let o = (body - 5 - img.text_at) as usize;
            assert_eq!(img.text[o], 0xe8, "{}", img.name);
        }
        let a = analyze(&b.function_site("bump"), JMP_REL32_LEN).unwrap();
        assert_eq!(a.range(), (body, body + 7), "{}", img.name);
        assert_eq!(a.displaced.len(), 1);
        assert_eq!(
            a.displaced[0].ip_rel_memory_address(),
            b.symbol("counter").0
        );
        let p = build(&a, &[0xc3], ARENA, ARENA + 0x100).unwrap();
        check_plan(&b, &p, &[0xc3], ARENA + 0x100);
        // A vCPU on the entry (endbr64 or the NOP) stays: it runs into the jump.
        assert_eq!(p.relocate_rip(at), Some(at));
        assert_eq!(p.relocate_rip(body - 5), Some(body - 5));
    }
}

/// Case 3. Functions shorter than the jump, after endbr64 when there is one.
#[test]
fn short_functions_are_too_short() {
    let too_short = |b: &Booted<'_>, name: &str, jump_len: usize, at: u64, available: usize| {
        assert_eq!(
            analyze(&b.function_site(name), jump_len).unwrap_err(),
            PlanError::TooShort {
                site: name.into(),
                at,
                available,
                needed: jump_len,
            }
        );
    };
    let plain = PLAIN.boot();
    let ibt = IBT.boot();
    // `int ret0(void) { return 0; }`: xor %eax,%eax; ret.
    assert_eq!(plain.func("ret0").1, [0x31, 0xc0, 0xc3]);
    too_short(&plain, "ret0", JMP_REL32_LEN, 0x401000, 3);
    too_short(&plain, "ret0", JMP_ABS_LEN, 0x401000, 3);
    too_short(&ibt, "ret0", JMP_REL32_LEN, 0x401004, 3);
    // IBT `helper`, 10 bytes: endbr64; lea 0x1(%rdi,%rdi,2),%rax (5); ret. Room for a
    // rel32 jump (exactly its 5 bytes, no fill), not for the 14-byte one.
    assert_eq!(ibt.symbol("helper"), (0x4010d0, 10));
    too_short(&ibt, "helper", JMP_ABS_LEN, 0x4010d4, 6);
    let a = analyze(&ibt.function_site("helper"), JMP_REL32_LEN).unwrap();
    assert_eq!(a.range(), (0x4010d4, 0x4010d9));
    // `get_counter`, 8 bytes: mov counter(%rip),%rax (7); ret.
    too_short(&plain, "get_counter", JMP_ABS_LEN, 0x401010, 8);
    assert!(analyze(&plain.function_site("get_counter"), JMP_REL32_LEN).is_ok());
}

/// Decodes the first instruction of `bytes` at `ip`.
fn first_insn(bytes: &[u8], ip: u64) -> Instruction {
    decode_at(bytes, ip, 0)
}

/// Case 4. PLAIN `bump`:
/// ```text
/// 401020: 48 8b 05 d9 0f 00 00  mov  0xfd9(%rip),%rax   # 402000 <counter>
/// 401027: 48 01 f8              add  %rdi,%rax
/// 40102a: 48 89 05 cf 0f 00 00  mov  %rax,0xfcf(%rip)   # 402000 <counter>
/// ```
/// Relocated 2 GiB away (the arena at 0x7fe0_0000), the load still reads `counter`.
#[test]
fn rip_relative_operand_keeps_its_absolute_address() {
    let b = PLAIN.boot();
    let counter = b.symbol("counter").0;
    assert_eq!(counter, 0x402000);
    assert!(rel32_reaches(0x401020, ARENA) && ARENA - 0x401020 > 0x7f00_0000);

    // As a micropatch: the stub is the inserted code, then the copy.
    let code = [NOP1];
    let a = analyze(&b.micro("bump", 0x401020, 7), JMP_REL32_LEN).unwrap();
    let p = build(&a, &code, ARENA, 0).unwrap();
    check_plan(&b, &p, &code, 0);
    let stub = &p.arena[0].1;
    let copy_at = ARENA + 1;
    let mov = first_insn(&stub[1..], copy_at);
    assert_eq!(mov.code(), Code::Mov_r64_rm64);
    assert_eq!(mov.memory_base(), iced_x86::Register::RIP);
    assert_eq!(mov.ip_rel_memory_address(), counter);
    let disp = (counter as i64 - (copy_at + 7) as i64) as i32;
    assert_eq!(
        stub[1..8],
        [&[0x48, 0x8b, 0x05][..], &disp.to_le_bytes()].concat()[..]
    );

    // As a function site, the same instruction in the escape copy; `get_counter` too.
    for name in ["bump", "get_counter"] {
        let a = analyze(&b.function_site(name), JMP_REL32_LEN).unwrap();
        let escape = ARENA + 0x803;
        let p = build(&a, &[0xc3], ARENA, escape).unwrap();
        check_plan(&b, &p, &[0xc3], escape);
        let mov = first_insn(&p.arena[1].1, escape);
        assert_eq!(
            (mov.code(), mov.ip_rel_memory_address()),
            (Code::Mov_r64_rm64, counter)
        );
    }
}

/// Out of rel32 reach, a target below 4 GiB is reached EIP-relative (address-size
/// prefix); above 4 GiB (a kernel's data) it cannot be, and the site is refused.
#[test]
fn rip_relative_operand_from_a_far_arena() {
    let b = PLAIN.boot();
    let a = analyze(&b.function_site("bump"), JMP_ABS_LEN).unwrap();
    let escape = FAR_ARENA + 0x40;
    let p = build(&a, &[0xc3], FAR_ARENA, escape).unwrap();
    let copy = check_plan(&b, &p, &[0xc3], escape);
    for c in [&copy[0], &copy[2]] {
        assert_eq!(c.insn.memory_base(), iced_x86::Register::EIP);
        assert_eq!(c.insn.ip_rel_memory_address(), 0x402000);
    }

    let k = b.rebased(KERNEL_TEXT);
    let a = analyze(&k.function_site("bump"), JMP_ABS_LEN).unwrap();
    assert_eq!(a.displaced[0].ip_rel_memory_address(), KERNEL_TEXT + 0x1000);
    match build(&a, &[0xc3], FAR_ARENA, escape).unwrap_err() {
        PlanError::Unrelocatable { at, reason, .. } => {
            assert_eq!(at, KERNEL_TEXT + 0x20);
            assert!(reason.contains("too far away"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    // Near it, fine.
    let p = build(&a, &[0xc3], KERNEL_ARENA, KERNEL_ARENA + 0x40).unwrap();
    check_plan(&k, &p, &[0xc3], KERNEL_ARENA + 0x40);
}

/// Case 5: rule 2. A micropatch site must start and end on instruction boundaries of its
/// function (PLAIN `bump` above).
#[test]
fn micropatch_site_must_be_whole_instructions() {
    let b = PLAIN.boot();
    let err = analyze(&b.micro("bump", 0x401021, 9), JMP_REL32_LEN).unwrap_err();
    assert_eq!(
        err,
        PlanError::SplitsInstruction {
            site: "bump+0x1".into(),
            at: 0x401021,
            insn: 0x401020,
        }
    );
    // Ending one byte into `add %rdi,%rax`.
    let err = analyze(&b.micro("bump", 0x401020, 8), JMP_REL32_LEN).unwrap_err();
    assert_eq!(
        err,
        PlanError::SplitsInstruction {
            site: "bump+0x0".into(),
            at: 0x401028,
            insn: 0x401027,
        }
    );
    // Without the function's bounds only the site's own bytes can tell: they do not decode.
    let mut site = b.micro("bump", 0x401020, 8);
    site.function = None;
    assert_eq!(
        analyze(&site, JMP_REL32_LEN).unwrap_err(),
        PlanError::Undecodable {
            site: "bump+0x0".into(),
            offset: 7,
        }
    );
    // Whole instructions: fine, with or without bounds.
    let mut site = b.micro("bump", 0x401020, 10);
    assert!(analyze(&site, JMP_REL32_LEN).is_ok());
    site.function = None;
    assert!(analyze(&site, JMP_REL32_LEN).is_ok());
}

/// A micropatch site must lie inside its function: PLAIN `get_counter` is
/// `mov counter(%rip),%rax; ret` (0x401010..0x401018), then 8 bytes of padding.
#[test]
fn micropatch_site_must_stay_inside_its_function() {
    let b = PLAIN.boot();
    let f = b.function_code("get_counter");
    let site = SiteInput {
        name: "s".into(),
        kind: SiteKind::Micropatch,
        at: 0x401017,
        expected: b.bytes(0x401017, 9), // ret; nopl 0x0(%rax,%rax,1)
        current: b.bytes(0x401017, 9),
        function: Some(f),
    };
    assert_eq!(
        analyze(&site, JMP_REL32_LEN).unwrap_err(),
        PlanError::PastFunctionEnd {
            site: "s".into(),
            at: 0x401017,
            site_end: 0x401020,
            end: 0x401018,
        }
    );
    let site = SiteInput {
        at: 0x401020,
        expected: b.bytes(0x401020, 7),
        current: b.bytes(0x401020, 7),
        ..site
    };
    assert_eq!(
        analyze(&site, JMP_REL32_LEN).unwrap_err(),
        PlanError::OutsideFunction {
            site: "s".into(),
            at: 0x401020,
            start: 0x401010,
            end: 0x401018,
        }
    );
}

/// Case 5: rule 3. PLAIN `sum`:
/// ```text
/// 401080: 48 85 f6        test %rsi,%rsi
/// 401083: 7e 1b           jle  4010a0
/// 401085: 48 8d 14 f7     lea  (%rdi,%rsi,8),%rdx
/// 401089: 31 c0           xor  %eax,%eax
/// 40108b: 0f 1f 44 00 00  nopl 0x0(%rax,%rax,1)
/// 401090: 48 03 07        add  (%rdi),%rax        <- loop head
/// 401093: 48 83 c7 08     add  $0x8,%rdi
/// 401097: 48 39 d7        cmp  %rdx,%rdi
/// 40109a: 75 f4           jne  401090
/// 40109c: c3              ret
/// ```
#[test]
fn branch_into_the_overwritten_range_is_refused() {
    let b = PLAIN.boot();
    // The loop head is inside 0x40108b..0x401093 but not its start; the loop's `jne` is
    // outside: it would land in the middle of the jump.
    assert_eq!(
        analyze(&b.micro("sum", 0x40108b, 8), JMP_REL32_LEN).unwrap_err(),
        PlanError::BranchIntoRange {
            site: "sum+0xb".into(),
            from: 0x40109a,
            to: 0x401090,
            start: 0x40108b,
            end: 0x401093,
        }
    );
    // A function site too: IBT `spin` is endbr64; nopl 0x0(%rax); then its loop
    // `4010b8: mov (%rdi),%rax; test %rax,%rax; jne 4010b8`.
    let ibt = IBT.boot();
    assert_eq!(
        analyze(&ibt.function_site("spin"), JMP_REL32_LEN).unwrap_err(),
        PlanError::BranchIntoRange {
            site: "spin".into(),
            from: 0x4010be,
            to: 0x4010b8,
            start: 0x4010b4,
            end: 0x4010bb,
        }
    );
}

/// A branch to the first byte of the range lands on the jump: allowed. PLAIN `spin` is
/// `4010b0: mov (%rdi),%rax; test %rax,%rax; jne 4010b0; ret`: a vCPU spinning there enters
/// the new function at its next iteration.
#[test]
fn branch_to_the_range_start_is_allowed() {
    let b = PLAIN.boot();
    let a = analyze(&b.function_site("spin"), JMP_REL32_LEN).unwrap();
    assert_eq!(a.range(), (0x4010b0, 0x4010b6));
    let p = build(&a, &[0xc3], ARENA, ARENA + 0x100).unwrap();
    check_plan(&b, &p, &[0xc3], ARENA + 0x100);
    // And the `sum` loop head as a micropatch site: add (%rdi),%rax; add $0x8,%rdi.
    let a = analyze(&b.micro("sum", 0x401090, 7), JMP_REL32_LEN).unwrap();
    let p = build(&a, &[NOP1], ARENA, 0).unwrap();
    check_plan(&b, &p, &[NOP1], 0);
}

/// Case 5: a loop wholly inside the displaced bytes moves with them: the copy loops within
/// itself (and the inserted code runs once, on entry).
#[test]
fn loop_inside_the_displaced_bytes_loops_in_the_copy() {
    let b = PLAIN.boot();
    let code = [NOP1, NOP1];
    let copy_at = ARENA + 2;
    // The loop, head first: 401090..40109c.
    let a = analyze(&b.micro("sum", 0x401090, 12), JMP_REL32_LEN).unwrap();
    let p = build(&a, &code, ARENA, 0).unwrap();
    let copy = check_plan(&b, &p, &code, 0);
    assert_eq!(copy.len(), 5);
    assert_eq!(copy[0].ip, copy_at);
    assert_eq!(
        (copy[3].mnemonic, copy[3].target),
        (Mnemonic::Jne, Some(copy_at))
    );
    assert_eq!(
        (copy[4].mnemonic, copy[4].target),
        (Mnemonic::Jmp, Some(0x40109c))
    );
    // With the NOP before it: the head is inside the range, reached only from inside.
    let a = analyze(&b.micro("sum", 0x40108b, 17), JMP_REL32_LEN).unwrap();
    let p = build(&a, &code, ARENA, 0).unwrap();
    let copy = check_plan(&b, &p, &code, 0);
    assert_eq!(copy[1].ip, copy_at + 5);
    assert_eq!(
        (copy[4].mnemonic, copy[4].target),
        (Mnemonic::Jne, Some(copy_at + 5))
    );
    // A vCPU in the middle of the loop continues in the copy's loop.
    assert_eq!(p.relocate_rip(0x401097), Some(copy[3].ip));
}

/// Case 5: rule 7. PLAIN `twice`:
/// ```text
/// 4010d0: e8 eb ff ff ff  call 4010c0 <helper>
/// 4010d5: 48 89 c7        mov  %rax,%rdi
/// 4010d8: 48 89 c2        mov  %rax,%rdx
/// 4010db: e8 e0 ff ff ff  call 4010c0 <helper>
/// 4010e0: 48 01 d0        add  %rdx,%rax
/// ```
#[test]
fn call_only_as_the_last_displaced_instruction() {
    let b = PLAIN.boot();
    assert_eq!(
        analyze(&b.micro("twice", 0x4010d0, 8), JMP_REL32_LEN).unwrap_err(),
        PlanError::CallNotLast {
            site: "twice+0x0".into(),
            at: 0x4010d0,
        }
    );
    assert_eq!(
        analyze(&b.function_site("twice"), JMP_ABS_LEN).unwrap_err(),
        PlanError::CallNotLast {
            site: "twice".into(),
            at: 0x4010d0,
        }
    );
    // Last: the copied call returns to the copy's jump back, which continues at 0x4010e0.
    let a = analyze(&b.micro("twice", 0x4010d5, 11), JMP_REL32_LEN).unwrap();
    let p = build(&a, &[NOP1], ARENA, 0).unwrap();
    let copy = check_plan(&b, &p, &[NOP1], 0);
    assert_eq!(
        (copy[2].mnemonic, copy[2].target),
        (Mnemonic::Call, Some(0x4010c0))
    );
    assert_eq!(copy[3].ip, copy[2].ip + copy[2].len as u64);
    assert_eq!(
        (copy[3].mnemonic, copy[3].target),
        (Mnemonic::Jmp, Some(0x4010e0))
    );
    // The function's first instruction is that call: alone displaced, it is last.
    let a = analyze(&b.function_site("twice"), JMP_REL32_LEN).unwrap();
    assert_eq!(a.range(), (0x4010d0, 0x4010d5));
    let p = build(&a, &[0xc3], ARENA, ARENA + 0x100).unwrap();
    check_plan(&b, &p, &[0xc3], ARENA + 0x100);
}

/// Case 5: rule 1, and a site shorter than the jump.
#[test]
fn expected_bytes_and_site_length() {
    let b = PLAIN.boot();
    let mut guest = b.bytes(0x401020, 7).to_vec();
    guest[3] = 0x00; // the guest's `mov` reads another address
    let site = SiteInput {
        current: &guest,
        ..b.micro("bump", 0x401020, 7)
    };
    let err = analyze(&site, JMP_REL32_LEN).unwrap_err();
    assert_eq!(
        err,
        PlanError::ExpectedMismatch {
            site: "bump+0x0".into(),
            offset: 3,
            expected: 0xd9,
            found: 0x00,
        }
    );
    assert!(err.to_string().contains("+0x3"), "{err}");
    let site = SiteInput {
        current: &guest[..6],
        ..b.micro("bump", 0x401020, 7)
    };
    assert_eq!(
        analyze(&site, JMP_REL32_LEN).unwrap_err(),
        PlanError::ExpectedLength {
            site: "bump+0x0".into(),
            expected: 7,
            found: 6,
        }
    );

    // `add %rdi,%rax` alone: 3 bytes.
    assert_eq!(
        analyze(&b.micro("bump", 0x401027, 3), JMP_REL32_LEN).unwrap_err(),
        PlanError::DisplacedTooShort {
            site: "bump+0x7".into(),
            have: 3,
            needed: JMP_REL32_LEN,
        }
    );
    // mov + add, 10 bytes: enough for rel32, not for the 14-byte jump.
    assert!(analyze(&b.micro("bump", 0x401020, 10), JMP_REL32_LEN).is_ok());
    assert_eq!(
        analyze(&b.micro("bump", 0x401020, 10), JMP_ABS_LEN).unwrap_err(),
        PlanError::DisplacedTooShort {
            site: "bump+0x0".into(),
            have: 10,
            needed: JMP_ABS_LEN,
        }
    );
}

/// Case 6. The arena out of rel32 reach: `jmp *0x0(%rip)` + the 8-byte address, int3 after.
/// The copy's branches (PLAIN `sum`'s `jle 4010a0` and the jump back) are then long forms
/// through pointers after the copy's code.
#[test]
fn absolute_jump_when_the_arena_is_out_of_reach() {
    let b = PLAIN.boot();
    assert!(!rel32_reaches(0x401080, FAR_ARENA));
    let a = analyze(&b.function_site("sum"), JMP_ABS_LEN).unwrap();
    // test; jle; lea; xor; nopl: 16 bytes.
    assert_eq!(a.range(), (0x401080, 0x401090));
    let escape = FAR_ARENA + 0x1003;
    let p = build(&a, &[0xc3], FAR_ARENA, escape).unwrap();
    let mut want = vec![0xff, 0x25, 0, 0, 0, 0];
    want.extend_from_slice(&FAR_ARENA.to_le_bytes());
    want.extend_from_slice(&[INT3, INT3]);
    assert_eq!(p.jump, want);
    let j = first_insn(&p.jump, 0x401080);
    assert_eq!(j.code(), Code::Jmp_rm64);
    assert_eq!(j.ip_rel_memory_address(), 0x401086);

    let copy = check_plan(&b, &p, &[0xc3], escape);
    assert!(copy[1].is_long() && copy[1].mnemonic == Mnemonic::Jle);
    assert_eq!(copy[1].target, Some(0x4010a0));
    assert_eq!(copy[1].insn.mnemonic(), Mnemonic::Jg); // jg +8 over jmp *ptr(%rip)
    assert!(copy[5].is_long());
    assert_eq!(
        (copy[5].mnemonic, copy[5].target),
        (Mnemonic::Jmp, Some(0x401090))
    );

    // The same range as a micropatch.
    let a = analyze(&b.micro("sum", 0x401080, 16), JMP_ABS_LEN).unwrap();
    let p = build(&a, &[NOP1; 3], FAR_ARENA, 0).unwrap();
    check_plan(&b, &p, &[NOP1; 3], 0);

    // The 14-byte jump may be used with a near arena too.
    let a = analyze(&b.function_site("sum"), JMP_ABS_LEN).unwrap();
    let p = build(&a, &[0xc3], ARENA, ARENA + 0x100).unwrap();
    let copy = check_plan(&b, &p, &[0xc3], ARENA + 0x100);
    assert!(!copy.iter().any(Exec::is_long));
}

/// The engine sizes the arena chunk with [`copy_len`] at one address and builds at another:
/// with long forms the size depends on alignment (their pointers are 8-byte aligned).
#[test]
fn copy_len_bounds_the_copy_anywhere() {
    let b = PLAIN.boot();
    let a = analyze(&b.function_site("sum"), JMP_ABS_LEN).unwrap();
    let lens: Vec<usize> = (0..8)
        .map(|k| relocate(&a, FAR_ARENA + k).unwrap().0.len())
        .collect();
    assert!(lens.iter().min() < lens.iter().max(), "{lens:?}");
    for base in [FAR_ARENA, FAR_ARENA + 3] {
        assert_eq!(copy_len(&a, base).unwrap(), *lens.iter().max().unwrap());
    }
}

/// Case 7. PLAIN `first_or`: `401040: test %rdi,%rdi; 401043: je 401050 (74 0b)`. The
/// copy's `je` must still reach 0x401050: rel8 cannot from the arena, so it becomes rel32.
#[test]
fn short_jcc_out_of_the_range_becomes_near() {
    let b = PLAIN.boot();
    let a = analyze(&b.micro("first_or", 0x401040, 5), JMP_REL32_LEN).unwrap();
    assert_eq!(a.displaced[1].code(), Code::Je_rel8_64);
    let code = [NOP1; 3];
    let p = build(&a, &code, ARENA, 0).unwrap();
    let copy = check_plan(&b, &p, &code, 0);
    let je = first_insn(&p.arena[0].1[3 + 3..], ARENA + 6);
    assert_eq!(je.code(), Code::Je_rel32_64);
    assert_eq!(je.near_branch_target(), 0x401050);
    assert_eq!(copy[2].target, Some(0x401045));
}

/// Case 8. PLAIN `count_positive`:
/// ```text
/// 401063: 48 85 ff              test %rdi,%rdi
/// 401066: 7e 08                 jle  401070
/// 401068: 48 83 05 90 0f 00 00  addq $0x1,0xf90(%rip)   # counter
/// 40106f: 01
/// 401070: c3                    ret
/// ```
/// The `jle` targets exactly the byte after the displaced range: the copy's `jle` goes
/// there (not into the copy), and the copy ends with the jump back there.
#[test]
fn copy_jumps_back_after_the_displaced_bytes() {
    let b = PLAIN.boot();
    let a = analyze(&b.micro("count_positive", 0x401063, 13), JMP_REL32_LEN).unwrap();
    assert_eq!(a.range(), (0x401063, 0x401070));
    let p = build(&a, &[NOP1], ARENA, 0).unwrap();
    let copy = check_plan(&b, &p, &[NOP1], 0);
    assert_eq!(copy.len(), 4);
    assert_eq!(
        (copy[1].mnemonic, copy[1].target),
        (Mnemonic::Jle, Some(0x401070))
    );
    assert_eq!(copy[2].insn.ip_rel_memory_address(), 0x402000);
    assert_eq!(
        (copy[3].mnemonic, copy[3].target),
        (Mnemonic::Jmp, Some(0x401070))
    );
    let stub = &p.arena[0].1;
    assert_eq!(copy[3].ip + copy[3].len as u64, ARENA + stub.len() as u64);

    // IBT, as a function site with the 14-byte jump: mov; test; jle 401074; addq: 16 bytes.
    let ibt = IBT.boot();
    let a = analyze(&ibt.function_site("count_positive"), JMP_ABS_LEN).unwrap();
    assert_eq!(a.range(), (0x401064, 0x401074));
    let p = build(&a, &[0xc3], ARENA, ARENA + 0x100).unwrap();
    let copy = check_plan(&ibt, &p, &[0xc3], ARENA + 0x100);
    assert_eq!(copy[2].target, Some(0x401074));
    assert_eq!(copy[4].target, Some(0x401074));
}

/// `loop`/`jrcxz` have only a rel8 form: out of the copy they cannot reach (no compiler
/// output here: gcc does not emit them; hand-assembled).
#[test]
fn rel8_only_branches_out_of_the_range_are_unrelocatable() {
    // 0: dec %rcx; 3: jrcxz 0xa; 5: loop 0; 7: nop; nop; nop; a: ret
    let f = [
        0x48, 0xff, 0xc9, 0xe3, 0x05, 0xe2, 0xf9, 0x90, 0x90, 0x90, 0xc3,
    ];
    let site = |len: usize| SiteInput {
        name: "f".into(),
        kind: SiteKind::Micropatch,
        at: 0x1000,
        expected: &f[..len],
        current: &f[..len],
        function: Some(FunctionCode {
            start: 0x1000,
            bytes: &f,
        }),
    };
    let a = analyze(&site(5), JMP_REL32_LEN).unwrap();
    match build(&a, &[], ARENA, 0).unwrap_err() {
        PlanError::Unrelocatable { at, reason, .. } => {
            assert_eq!(at, 0x1003);
            assert!(reason.contains("8-bit"), "{reason}");
        }
        e => panic!("{e:?}"),
    }
    // dec; jrcxz; loop; nop; nop; nop: the jrcxz target 0x100a is still outside.
    assert!(matches!(
        build(&analyze(&site(10), JMP_REL32_LEN).unwrap(), &[], ARENA, 0),
        Err(PlanError::Unrelocatable { .. })
    ));
    // Whole, up to the ret: both targets inside, the copy keeps them short.
    let a = analyze(&site(11), JMP_REL32_LEN).unwrap();
    let p = build(&a, &[], ARENA, 0).unwrap();
    let copy = insns(&p.arena[0].1, ARENA);
    assert_eq!(copy[1].code(), Code::Jrcxz_rel8_64);
    assert_eq!(copy[1].near_branch_target(), ARENA + 0xa);
    assert_eq!(copy[2].code(), Code::Loop_rel8_64_RCX);
    assert_eq!(copy[2].near_branch_target(), ARENA);
}

/// Rule 3 inside the range: a displaced branch into the middle of another displaced
/// instruction (overlapping instructions, an anti-disassembly trick; hand-assembled) has no
/// counterpart in the copy.
#[test]
fn branch_into_the_middle_of_a_displaced_instruction_is_refused() {
    // 0: jmp 3 (into the immediate of:) 2: mov $0x90909090,%eax; 7: ret
    let f = [0xeb, 0x01, 0xb8, 0x90, 0x90, 0x90, 0x90, 0xc3];
    let site = SiteInput {
        name: "f".into(),
        kind: SiteKind::Micropatch,
        at: 0x1000,
        expected: &f[..7],
        current: &f[..7],
        function: Some(FunctionCode {
            start: 0x1000,
            bytes: &f,
        }),
    };
    assert_eq!(
        analyze(&site, JMP_REL32_LEN).unwrap_err(),
        PlanError::BranchIntoRange {
            site: "f".into(),
            from: 0x1000,
            to: 0x1003,
            start: 0x1000,
            end: 0x1007,
        }
    );
}

/// Rule 4: the planner's own decoding-back ([`verify`]) refuses a built site that is not
/// exactly what was meant. PLAIN `sum` as a function site with a far arena (its copy:
/// `test; jg +8; jmp *p1(%rip); lea; xor; nopl; jmp *p2(%rip); int3...; p1; p2`), and
/// `bump` near (its copy starts with `mov counter(%rip),%rax`).
#[test]
fn verify_refuses_what_was_not_meant() {
    let b = PLAIN.boot();
    let escape = FAR_ARENA + 0x1003;
    let a = analyze(&b.function_site("sum"), JMP_ABS_LEN).unwrap();
    let p = build(&a, &[0xc3], FAR_ARENA, escape).unwrap();
    let copy = p.arena[1].1.clone();
    assert_eq!(verify(&p, escape, &copy), Ok(()));
    let refused = |p: &SitePlan, copy: &[u8], why: &str| {
        let e = verify(p, escape, copy).unwrap_err();
        assert!(e.contains(why), "{e}");
    };

    // The long `jle` made unconditional: `cs cs jmp *p1(%rip)`, same length, same pointer.
    assert_eq!(copy[3..7], [0x7f, 0x06, 0xff, 0x25]);
    let mut t = copy.clone();
    t[3..5].copy_from_slice(&[0x2e, 0x2e]);
    refused(&p, &t, "Jle");
    // Its pointer changed.
    let p1 = (first_insn(&copy[5..], escape + 5).ip_rel_memory_address() - escape) as usize;
    let mut t = copy.clone();
    t[p1] ^= 1;
    refused(&p, &t, "branch to 0x4010a0");
    // A byte more after the pointers; the alignment padding not int3.
    let mut t = copy.clone();
    t.push(0);
    refused(&p, &t, "more than its code");
    let mut t = copy.clone();
    t[p1 - 1] = 0x90;
    refused(&p, &t, "more than its code");
    // A vCPU would be moved elsewhere than the copy of its instruction.
    let mut q = p.clone();
    q.moves[1].1 += 1;
    refused(&q, &copy, "vCPU moves");
    // The jump: its target, its fill.
    let mut q = p.clone();
    q.jump[6] ^= 1;
    refused(&q, &copy, "the jump goes to");
    let mut q = p.clone();
    q.jump[15] = 0x90;
    refused(&q, &copy, "int3");

    // Near: the RIP-relative load reading next to `counter`.
    let a = analyze(&b.function_site("bump"), JMP_REL32_LEN).unwrap();
    let escape = ARENA + 0x100;
    let p = build(&a, &[0xc3], ARENA, escape).unwrap();
    let mut t = p.arena[1].1.clone();
    assert_eq!(t[..3], [0x48, 0x8b, 0x05]);
    let disp = i32::from_le_bytes(t[3..7].try_into().unwrap()) + 8;
    t[3..7].copy_from_slice(&disp.to_le_bytes());
    let e = verify(&p, escape, &t).unwrap_err();
    assert!(
        e.contains("RIP-relative operand 0x402000 became 0x402008"),
        "{e}"
    );
    // Another register.
    let mut t = p.arena[1].1.clone();
    t[2] = 0x0d; // mov ...,%rcx
    let e = verify(&p, escape, &t).unwrap_err();
    assert!(e.contains("became"), "{e}");
}

/// A call displaced last, from a far arena: `call *p(%rip)`, returning to the copy's jump
/// back. PLAIN `call_late`:
/// ```text
/// 4010fb: 48 8d 04 b6     lea  (%rsi,%rsi,4),%rax
/// 4010ff: 48 29 d7        sub  %rdx,%rdi
/// 401102: 48 01 c7        add  %rax,%rdi
/// 401105: e8 b6 ff ff ff  call 4010c0 <helper>
/// 40110a: 48 01 d0        add  %rdx,%rax
/// ```
#[test]
fn far_call_goes_through_a_pointer() {
    let b = PLAIN.boot();
    assert_eq!(b.symbol("helper").0, 0x4010c0);
    let a = analyze(&b.micro("call_late", 0x4010fb, 15), JMP_ABS_LEN).unwrap();
    let p = build(&a, &[NOP1], FAR_ARENA, 0).unwrap();
    let copy = check_plan(&b, &p, &[NOP1], 0);
    let call = &copy[3];
    assert!(call.is_long());
    assert_eq!(call.insn.code(), Code::Call_rm64);
    assert_eq!(
        (call.mnemonic, call.target),
        (Mnemonic::Call, Some(0x4010c0))
    );
    assert_eq!(copy[4].ip, call.ip + call.len as u64);
    assert_eq!(
        (copy[4].mnemonic, copy[4].target),
        (Mnemonic::Jmp, Some(0x40110a))
    );
}

/// Under IBT an `endbr64` marks where indirect branches may land: a micropatch must not
/// overwrite one. IBT `first_or` starts `endbr64; test %rdi,%rdi` (see above).
#[test]
fn micropatch_over_endbr64_is_refused() {
    let b = IBT.boot();
    assert_eq!(
        analyze(&b.micro("first_or", 0x401040, 7), JMP_REL32_LEN).unwrap_err(),
        PlanError::DisplacesEndbr {
            site: "first_or+0x0".into(),
            at: 0x401040,
        }
    );
    // Right after it: fine.
    assert!(analyze(&b.micro("first_or", 0x401044, 5), JMP_REL32_LEN).is_ok());
}

/// A micropatch displaces no more than its jump needs, and a loop's tail that branches back
/// into those bytes (spin_wait's shape: `mov rax,rdi; pause; dec rax; jnz pause; ret`).
#[test]
fn micropatch_extent_is_what_the_jump_needs() {
    let f = [
        0x48, 0x89, 0xf8, 0xf3, 0x90, 0x48, 0xff, 0xc8, 0x75, 0xf9, 0xc3,
    ];
    let site = |len: usize| SiteInput {
        name: "f".into(),
        kind: SiteKind::Micropatch,
        at: 0x1000,
        expected: &f[..len],
        current: &f[..len],
        function: Some(FunctionCode {
            start: 0x1000,
            bytes: &f,
        }),
    };
    // mov; pause covers the jump, but the jnz would land inside: the rules refuse it...
    assert!(matches!(
        analyze(&site(5), JMP_REL32_LEN),
        Err(PlanError::BranchIntoRange { .. })
    ));
    // ...so the loop's tail may come along, and no more.
    let a = analyze(&site(10), JMP_REL32_LEN).unwrap();
    check_extent(&site(10), &a).unwrap();
    let a = analyze(&site(11), JMP_REL32_LEN).unwrap();
    assert_eq!(
        check_extent(&site(11), &a).unwrap_err(),
        PlanError::ExpectedTooLong {
            site: "f".into(),
            have: 11,
            max: 10,
            jump_len: JMP_REL32_LEN,
        }
    );
    // PLAIN `sum`'s loop head is a site of 7 bytes (add (%rdi),%rax; add $0x8,%rdi); the
    // jne back to it targets the range start, which the jump is: no reason to take more.
    let b = PLAIN.boot();
    let a = analyze(&b.micro("sum", 0x401090, 12), JMP_REL32_LEN).unwrap();
    assert!(matches!(
        check_extent(&b.micro("sum", 0x401090, 12), &a),
        Err(PlanError::ExpectedTooLong { max: 7, .. })
    ));
    let a = analyze(&b.micro("sum", 0x401090, 7), JMP_REL32_LEN).unwrap();
    check_extent(&b.micro("sum", 0x401090, 7), &a).unwrap();
}
