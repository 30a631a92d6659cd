//! The planner: from one site of a patch and the bytes the guest holds there, the exact writes
//! that patch it, every check of ARCHITECTURE §3 done first. Pure: no guest, no KVM, so every
//! rule is unit-tested on real compiler output.
//!
//! A site becomes three things:
//! - the **jump** written over whole instructions at the site (`jmp rel32`, or `jmp [rip]` with
//!   an 8-byte address when the arena is out of rel32 reach), the rest of the displaced bytes
//!   filled with `int3` (nothing may branch there: rule 3);
//! - the **code** in the arena: the new function, or for a micropatch the inserted code followed
//!   by the relocated displaced instructions and a jump back (the stub);
//! - the **escape copy** for function sites: the displaced instructions relocated, then a jump
//!   back. A vCPU parked in the middle of the displaced bytes is moved to the same instruction
//!   there (as Detours does), so it finishes its call of the old function.

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Decoder, DecoderOptions, FlowControl, Instruction,
    InstructionBlock, Mnemonic, OpKind, Register,
};
use patch_format::SiteKind;
use thiserror::Error;

/// `endbr64`: kept in place at a function's entry so IBT still accepts indirect calls.
pub const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];
/// The 5-byte NOP at a Linux function's entry once booted (its `-pg -mfentry`
/// `call __fentry__`, rewritten by the kernel; gcc's `-mnop-mcount` emits it directly).
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// The one-byte NOP: gcc's `-fpatchable-function-entry=N` puts N of them at the entry.
pub const NOP1: u8 = 0x90;
/// Size of `jmp rel32`.
pub const JMP_REL32_LEN: usize = 5;
/// Size of `jmp qword [rip+0]` followed by the 8-byte target.
pub const JMP_ABS_LEN: usize = 14;
/// Filler for displaced bytes after the jump: traps if anything ever executes it.
pub const INT3: u8 = 0xcc;

/// Why a site cannot be patched. Each message names the site and what the author can do.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error(
        "site {site}: ftrace is using this function (its entry holds a call where the kernel keeps a NOP while nothing traces it); stop tracing it (or unload the livepatch/kprobe using it) and apply again: the patcher does not fight the guest's ftrace"
    )]
    FtraceActive { site: String },
    #[error(
        "site {site}: the guest's bytes differ from the patch's expected bytes at +{offset:#x} (expected {expected:#04x}, found {found:#04x}); the patch was built for other code"
    )]
    ExpectedMismatch {
        site: String,
        offset: usize,
        expected: u8,
        found: u8,
    },
    #[error(
        "site {site}: the guest holds {found} bytes there but the patch expects {expected}; the patch was built for other code"
    )]
    ExpectedLength {
        site: String,
        expected: usize,
        found: usize,
    },
    #[error(
        "site {site}: {at:#x} is not an instruction boundary (it splits the instruction at {insn:#x}); place the site on a whole instruction"
    )]
    SplitsInstruction { site: String, at: u64, insn: u64 },
    #[error(
        "site {site}: bytes at +{offset:#x} do not decode as x86-64 instructions; the site must be code"
    )]
    Undecodable { site: String, offset: usize },
    #[error(
        "site {site}: the function has {available} bytes from {at:#x} but the jump needs {needed}; too short to patch there (patch its callers instead)"
    )]
    TooShort {
        site: String,
        at: u64,
        available: usize,
        needed: usize,
    },
    #[error(
        "site {site}: the micropatch displaces {have} bytes of whole instructions but the jump needs {needed}; rebuild the patch with a longer site"
    )]
    DisplacedTooShort {
        site: String,
        have: usize,
        needed: usize,
    },
    #[error(
        "site {site}: {function} is a compiler-split cold part, not a function: its parent jumps into it wherever the compiler chose, which no check of this part alone can see; patch the parent function instead"
    )]
    ColdPart { site: String, function: String },
    #[error(
        "site {site}: the guest's bytes at {at:#x} differ from the patch's (expected {expected:#04x}, found {found:#04x}) where the guest's OS rewrites its own code ({what}); this patcher does not reconcile that form, so the patch cannot be checked against it"
    )]
    RewrittenByOs {
        site: String,
        at: u64,
        expected: u8,
        found: u8,
        what: String,
    },
    #[error(
        "site {site}: the code at {at:#x} must stay where it is ({what}), and it lies inside the bytes the jump would displace ({start:#x}..{end:#x}): the kernel's next rewrite there would corrupt the jump, or the moved instruction would lose what the kernel ties to its address, so this site cannot be patched (choose another site, or patch the functions that call it)"
    )]
    LiveRewrite {
        site: String,
        at: u64,
        what: String,
        start: u64,
        end: u64,
    },
    #[error(
        "site {site}: {why}; a thread stopped at {at:#x}, one of the {count} instructions the jump would displace, would resume in the middle of the jump, and the hypervisor cannot see or move such threads; run the guest kernel without full preemption (Linux: boot with preempt=voluntary, or write voluntary to /sys/kernel/debug/sched/preempt) or choose a site whose first instruction is at least the jump's {jump_len} bytes"
    )]
    PreemptedInsideJump {
        site: String,
        why: String,
        at: u64,
        count: usize,
        jump_len: usize,
    },
    #[error(
        "site {site}: the micropatch expects {have} bytes, but only {max} may be displaced there (the fewest whole instructions that cover the {jump_len}-byte jump, and those after them that branch back into them); rebuild the patch with the shorter site"
    )]
    ExpectedTooLong {
        site: String,
        have: usize,
        max: usize,
        jump_len: usize,
    },
    #[error(
        "site {site}: the instruction at {from:#x} branches to {to:#x}, inside the overwritten range {start:#x}..{end:#x}; it would land in the middle of the jump (choose another site)"
    )]
    BranchIntoRange {
        site: String,
        from: u64,
        to: u64,
        start: u64,
        end: u64,
    },
    #[error(
        "site {site}: the endbr64 at {at:#x} would be overwritten; under IBT an indirect branch there would fault (start the site after it)"
    )]
    DisplacesEndbr { site: String, at: u64 },
    #[error(
        "site {site}: the call at {at:#x} would be displaced before other instructions; its return address would point inside the trampoline (a call may only be the last displaced instruction)"
    )]
    CallNotLast { site: String, at: u64 },
    #[error(
        "site {site}: the displaced instruction at {at:#x} cannot be relocated ({reason}); choose another site"
    )]
    Unrelocatable {
        site: String,
        at: u64,
        reason: String,
    },
    #[error(
        "site {site}: the built trampoline does not verify: {reason} (this is a bug; please report it)"
    )]
    Verify { site: String, reason: String },
    #[error(
        "site {site}: a function site must be at its function's start ({start:#x}), not at {at:#x}; use a micropatch to patch inside a function"
    )]
    NotFunctionStart { site: String, at: u64, start: u64 },
    #[error("site {site}: the site at {at:#x} lies outside its function {start:#x}..{end:#x}")]
    OutsideFunction {
        site: String,
        at: u64,
        start: u64,
        end: u64,
    },
    #[error(
        "site {site}: the displaced bytes {at:#x}..{site_end:#x} run past the end of their function at {end:#x}; shorten the site"
    )]
    PastFunctionEnd {
        site: String,
        at: u64,
        site_end: u64,
        end: u64,
    },
}

/// The code a site lives in, when its bounds are known (from the image's symbols): used to
/// find instruction boundaries (rule 2) and branches into the overwritten range (rule 3).
#[derive(Debug, Clone, Copy)]
pub struct FunctionCode<'a> {
    pub start: u64,
    pub bytes: &'a [u8],
}

/// One site of a patch, resolved against the guest.
#[derive(Debug, Clone)]
pub struct SiteInput<'a> {
    /// How the site is named in messages (`compute`, `probe+0x4`, `0x101234`).
    pub name: String,
    pub kind: SiteKind,
    /// Guest-virtual address of the site.
    pub at: u64,
    /// The bytes the patch expects at `at` (whole old function for function sites).
    pub expected: &'a [u8],
    /// What the guest holds at `at`, `expected.len()` bytes (applied patches' bytes already
    /// replaced by their originals when the caller replaces them).
    pub current: &'a [u8],
    /// The function around a micropatch site (function sites are their own `expected`).
    pub function: Option<FunctionCode<'a>>,
}

/// Where the jump goes and what it displaces: known before arena space is chosen.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub name: String,
    pub kind: SiteKind,
    /// First byte the jump overwrites (after `endbr64` / an ftrace NOP for function sites).
    pub jump_at: u64,
    /// The whole instructions the jump overwrites, decoded at their addresses.
    pub displaced: Vec<Instruction>,
    /// Their bytes.
    pub displaced_bytes: Vec<u8>,
    /// Which jump size the displaced bytes were chosen for.
    pub jump_len: usize,
}

impl Analysis {
    pub fn displaced_len(&self) -> usize {
        self.displaced_bytes.len()
    }
    pub fn range(&self) -> (u64, u64) {
        (
            self.jump_at,
            self.jump_at + self.displaced_bytes.len() as u64,
        )
    }
}

/// Decodes `bytes` at `ip` into whole instructions; `Err(offset)` at the first that fails.
pub fn decode(bytes: &[u8], ip: u64) -> Result<Vec<Instruction>, usize> {
    let mut dec = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    while dec.can_decode() {
        let pos = dec.position();
        let i = dec.decode();
        if i.is_invalid() {
            return Err(pos);
        }
        out.push(i);
    }
    Ok(out)
}

/// Decodes from a known boundary up to the first undecodable byte (padding, data): the
/// instructions a compiler laid out, which is what boundary and branch checks need.
fn decode_prefix(bytes: &[u8], ip: u64) -> Vec<Instruction> {
    let mut dec = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut out = Vec::new();
    while dec.can_decode() {
        let i = dec.decode();
        if i.is_invalid() {
            break;
        }
        out.push(i);
    }
    out
}

/// The absolute target of a direct near branch, if `i` is one.
fn branch_target(i: &Instruction) -> Option<u64> {
    (0..i.op_count())
        .any(|n| {
            matches!(
                i.op_kind(n),
                OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16
            )
        })
        .then(|| i.near_branch_target())
}

fn is_call(i: &Instruction) -> bool {
    matches!(
        i.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    )
}

/// The furthest end a micropatch at `at` may displace to: the fewest whole instructions that
/// cover a `jump_len` jump, extended by any later instruction that branches back into them (a
/// loop's tail, which rule 3 would otherwise refuse), until nothing later does. `fend` when
/// the function's instructions end first.
fn micropatch_reach(finsns: &[Instruction], at: u64, jump_len: usize, fend: u64) -> u64 {
    let Some(first) = finsns.iter().position(|i| i.ip() == at) else {
        return fend;
    };
    let Some(cover) = finsns[first..]
        .iter()
        .find(|i| i.next_ip() - at >= jump_len as u64)
    else {
        return fend;
    };
    let mut end = cover.next_ip();
    loop {
        let back = finsns
            .iter()
            .filter(|i| i.ip() >= end)
            .filter(|i| branch_target(i).is_some_and(|t| t > at && t < end))
            .map(Instruction::next_ip)
            .max();
        match back {
            Some(e) if e > end => end = e,
            _ => return end,
        }
    }
}

/// A micropatch overwrites no more guest code than its jump needs: every displaced byte is
/// code the guest then runs only as a relocated copy, so a signed patch cannot make the
/// engine take over a whole function (or a megabyte of code) as a "micropatch". Checked on an
/// analysis [`analyze`] accepted, against the function's instructions.
pub fn check_extent(site: &SiteInput<'_>, a: &Analysis) -> Result<(), PlanError> {
    let Some(f) = site.function else {
        return Ok(());
    };
    if a.kind != SiteKind::Micropatch {
        return Ok(());
    }
    let fend = f.start + f.bytes.len() as u64;
    let finsns = decode_prefix(f.bytes, f.start);
    let max = micropatch_reach(&finsns, a.jump_at, a.jump_len, fend);
    let (_, end) = a.range();
    if end > max {
        return Err(PlanError::ExpectedTooLong {
            site: a.name.clone(),
            have: a.displaced_len(),
            max: max.saturating_sub(a.jump_at) as usize,
            jump_len: a.jump_len,
        });
    }
    Ok(())
}

/// A jump covers no place where a thread the hypervisor cannot see may resume
/// ([`crate::threads`]): called only for a guest whose scheduler hides threads, with why its
/// kernel preempts kernel code at any instruction if it does. Then every instruction boundary
/// inside the displaced bytes is such a place. Otherwise only a return address is, after a call
/// the jump displaces before its last instruction, which rule 7 refuses for every guest. The
/// jump's own start is never one: a thread resuming there takes the jump.
pub fn check_hidden_threads(a: &Analysis, preempted: Option<&str>) -> Result<(), PlanError> {
    match (preempted, a.displaced.get(1)) {
        (Some(why), Some(second)) => Err(PlanError::PreemptedInsideJump {
            site: a.name.clone(),
            why: why.to_string(),
            at: second.ip(),
            count: a.displaced.len(),
            jump_len: a.jump_len,
        }),
        _ => Ok(()),
    }
}

/// Whether a rel32 jump at `from` (5 bytes long) reaches `to`.
pub fn rel32_reaches(from: u64, to: u64) -> bool {
    let d = i128::from(to) - i128::from(from) - JMP_REL32_LEN as i128;
    i32::try_from(d).is_ok()
}

/// Checks rules 1, 2, 3 and 7 and chooses the displaced instructions.
///
/// `jump_len` is the jump the caller can use ([`JMP_REL32_LEN`] when the arena is within
/// ±2 GiB of the site, else [`JMP_ABS_LEN`]).
pub fn analyze(site: &SiteInput<'_>, jump_len: usize) -> Result<Analysis, PlanError> {
    let name = || site.name.clone();
    // Rule 1: the guest holds exactly what the patch was built against.
    if site.current.len() != site.expected.len() {
        return Err(PlanError::ExpectedLength {
            site: name(),
            expected: site.expected.len(),
            found: site.current.len(),
        });
    }
    if let Some(offset) = site
        .expected
        .iter()
        .zip(site.current)
        .position(|(e, c)| e != c)
    {
        return Err(PlanError::ExpectedMismatch {
            site: name(),
            offset,
            expected: site.expected[offset],
            found: site.current[offset],
        });
    }

    // The function the site lives in, decoded from its start (a known boundary).
    let (fstart, fbytes) = match (site.kind, site.function) {
        // A function site replaces the whole function: it starts at the function's start and
        // is analysed against the function's real bytes and extent (rule 3 over all of it),
        // however few bytes the patch expects.
        (SiteKind::Function, Some(f)) if f.start == site.at => (f.start, f.bytes),
        (SiteKind::Function, Some(f)) => {
            return Err(PlanError::NotFunctionStart {
                site: name(),
                at: site.at,
                start: f.start,
            });
        }
        (SiteKind::Function, None) => (site.at, site.expected),
        (SiteKind::Micropatch, Some(f)) => (f.start, f.bytes),
        (SiteKind::Micropatch, None) => (site.at, site.expected),
    };
    let fend = fstart + fbytes.len() as u64;
    if site.at < fstart || site.at >= fend {
        return Err(PlanError::OutsideFunction {
            site: name(),
            at: site.at,
            start: fstart,
            end: fend,
        });
    }
    let finsns = decode_prefix(fbytes, fstart);

    let (jump_at, displaced) = match site.kind {
        SiteKind::Function => {
            // Keep `endbr64` (IBT) in place, and leave the entry's patchable NOPs to their
            // owner: the 5-byte NOP of a booted Linux `call __fentry__` (ftrace rewrites it
            // when tracing is switched on), or the run of one-byte NOPs of
            // `-fpatchable-function-entry=N` (rewritten by whatever reads
            // `__patchable_function_entries`). The jump goes after them; a vCPU parked on them
            // just runs into it. The cost: the function needs those bytes more.
            let mut skip = 0usize;
            if site.expected.starts_with(&ENDBR64) {
                skip += ENDBR64.len();
            }
            let rest = &site.expected[skip..];
            if rest.starts_with(&NOP5) {
                skip += NOP5.len();
            } else {
                skip += rest.iter().take_while(|&&b| b == NOP1).count();
            }
            let jump_at = site.at + skip as u64;
            let mut displaced = Vec::new();
            let mut covered = 0usize;
            for i in finsns.iter().filter(|i| i.ip() >= jump_at) {
                if covered >= jump_len {
                    break;
                }
                displaced.push(*i);
                covered += i.len();
            }
            if covered < jump_len {
                return Err(PlanError::TooShort {
                    site: name(),
                    at: jump_at,
                    available: (fend - jump_at) as usize,
                    needed: jump_len,
                });
            }
            (jump_at, displaced)
        }
        SiteKind::Micropatch => {
            // Rule 2: the site is on a boundary of the function's instruction stream.
            if site.function.is_some() {
                if let Some(split) = finsns
                    .iter()
                    .find(|i| i.ip() < site.at && site.at < i.next_ip())
                {
                    return Err(PlanError::SplitsInstruction {
                        site: name(),
                        at: site.at,
                        insn: split.ip(),
                    });
                }
                if !finsns.iter().any(|i| i.ip() == site.at) {
                    return Err(PlanError::Undecodable {
                        site: name(),
                        offset: (site.at - fstart) as usize,
                    });
                }
                // ...and so is its end, inside the function (checked before decoding the
                // expected bytes alone: a split last instruction would not decode there).
                let end = site.at + site.expected.len() as u64;
                if end > fend {
                    return Err(PlanError::PastFunctionEnd {
                        site: name(),
                        at: site.at,
                        site_end: end,
                        end: fend,
                    });
                }
                if let Some(split) = finsns.iter().find(|i| i.ip() < end && end < i.next_ip()) {
                    return Err(PlanError::SplitsInstruction {
                        site: name(),
                        at: end,
                        insn: split.ip(),
                    });
                }
            }
            // The expected bytes are exactly the displaced whole instructions.
            let displaced =
                decode(site.expected, site.at).map_err(|offset| PlanError::Undecodable {
                    site: name(),
                    offset,
                })?;
            if site.expected.len() < jump_len {
                return Err(PlanError::DisplacedTooShort {
                    site: name(),
                    have: site.expected.len(),
                    needed: jump_len,
                });
            }
            (site.at, displaced)
        }
    };

    let start = jump_at;
    let end = displaced.last().map_or(jump_at, Instruction::next_ip);

    // IBT: an `endbr64` marks an indirect-branch target (a function's entry, a switch case, a
    // setjmp return): overwritten by the jump (or in its middle), indirect branches there
    // would fault. Function sites keep the entry's out of the range above.
    if let Some(e) = displaced.iter().find(|i| i.code() == Code::Endbr64) {
        return Err(PlanError::DisplacesEndbr {
            site: name(),
            at: e.ip(),
        });
    }
    // Rule 7: a call displaced before the last instruction would leave a return address
    // inside the trampoline.
    if let Some(call) = displaced.iter().rev().skip(1).find(|i| is_call(i)) {
        return Err(PlanError::CallNotLast {
            site: name(),
            at: call.ip(),
        });
    }
    // Rule 3: nothing outside the displaced range branches into its interior. Branches from
    // inside to an instruction inside move with the relocated copy, so they stay correct.
    let outside = finsns.iter().filter(|i| i.ip() < start || i.ip() >= end);
    for (i, from_inside) in outside
        .map(|i| (i, false))
        .chain(displaced.iter().map(|i| (i, true)))
    {
        if let Some(t) = branch_target(i)
            && t > start
            && t < end
            && !(from_inside && displaced.iter().any(|d| d.ip() == t))
        {
            return Err(PlanError::BranchIntoRange {
                site: name(),
                from: i.ip(),
                to: t,
                start,
                end,
            });
        }
    }
    let off = (jump_at - site.at) as usize;
    let len = (end - jump_at) as usize;
    let displaced_bytes = site
        .expected
        .get(off..off + len)
        .ok_or_else(|| PlanError::TooShort {
            site: name(),
            at: jump_at,
            available: site.expected.len().saturating_sub(off),
            needed: len,
        })?
        .to_vec();
    Ok(Analysis {
        name: site.name.clone(),
        kind: site.kind,
        jump_at,
        displaced,
        displaced_bytes,
        jump_len,
    })
}

/// The bytes of a jump from `at` to `to`, `len` long (5 or 14), then `int3` up to `fill`.
pub fn jump_bytes(at: u64, to: u64, jump_len: usize, fill: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(fill);
    if jump_len == JMP_REL32_LEN {
        let d = i32::try_from(i128::from(to) - i128::from(at) - JMP_REL32_LEN as i128).ok()?;
        out.push(0xe9);
        out.extend_from_slice(&d.to_le_bytes());
    } else {
        out.extend_from_slice(&[0xff, 0x25, 0, 0, 0, 0]);
        out.extend_from_slice(&to.to_le_bytes());
    }
    if out.len() > fill {
        return None;
    }
    out.resize(fill, INT3);
    Some(out)
}

/// Where a jump that [`jump_bytes`] wrote at `at` goes: `None` unless `bytes` are exactly one
/// of its two forms followed by `int3` fill. How the engine recognises its own jumps in a
/// record it did not make in this run.
pub fn jump_target(at: u64, bytes: &[u8]) -> Option<u64> {
    let (to, len) = match bytes {
        [0xe9, d @ ..] if d.len() >= 4 => {
            let d = i32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            let to = at
                .wrapping_add(JMP_REL32_LEN as u64)
                .wrapping_add(i64::from(d) as u64);
            (to, JMP_REL32_LEN)
        }
        [0xff, 0x25, 0, 0, 0, 0, a @ ..] if a.len() >= 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(&a[..8]);
            (u64::from_le_bytes(b), JMP_ABS_LEN)
        }
        _ => return None,
    };
    bytes[len..].iter().all(|&b| b == INT3).then_some(to)
}

/// The displaced instructions relocated to `at`, then a jump back to the instruction after
/// them. Returns the bytes and the address of each displaced instruction's copy.
///
/// Out of rel32 reach of a target (an arena far from the code: the 14-byte jump case), the
/// encoder writes a branch as its long form, through an 8-byte pointer it stores after the
/// code (`jmp/call qword [rip+d]`; a jcc becomes `j!cc short +8; jmp qword [rip+d]`). The jump
/// back is always such a branch then. [`walk_copy`] finds the instructions in either form.
pub fn relocate(a: &Analysis, at: u64) -> Result<(Vec<u8>, Vec<u64>), PlanError> {
    let unrelocatable = |at: u64, reason: String| PlanError::Unrelocatable {
        site: a.name.clone(),
        at,
        reason,
    };
    let (start, end) = a.range();
    // `loop`/`jrcxz` only have a rel8 form: from the arena they can only reach the copy.
    for i in &a.displaced {
        if (i.code().is_loop() || i.code().is_loopcc() || i.code().is_jcx_short())
            && let Some(t) = branch_target(i)
            && !(start..end).contains(&t)
        {
            return Err(unrelocatable(
                i.ip(),
                format!(
                    "{:?} reaches {t:#x} with an 8-bit displacement only",
                    i.mnemonic()
                ),
            ));
        }
    }
    let mut block = a.displaced.clone();
    let mut back = Instruction::with_branch(Code::Jmp_rel32_64, end)
        .map_err(|e| unrelocatable(a.jump_at, e.to_string()))?;
    // The encoder matches branch targets to instructions by IP: give the jump back an IP no
    // branch can target, or a displaced branch to `end` (or the jump itself) would loop.
    back.set_ip(0);
    block.push(back);
    let r = BlockEncoder::encode(
        64,
        InstructionBlock::new(&block, at),
        BlockEncoderOptions::NONE,
    )
    .map_err(|e| unrelocatable(a.jump_at, e.to_string()))?;
    // The encoder reports no offset for an instruction it wrote as a long form: walk the code.
    let (copy, _) = walk_copy(&r.code_buffer, at, &block)
        .map_err(|e| unrelocatable(a.jump_at, format!("the encoder's output: {e}")))?;
    let addrs = copy.iter().take(a.displaced.len()).map(|c| c.ip).collect();
    Ok((r.code_buffer, addrs))
}

/// An upper bound of the bytes the relocated copy takes anywhere in the same arena as `at`:
/// the encoding depends on whether targets are within rel32 reach, and, when long forms are
/// used, on the copy's alignment (their pointers are 8-byte aligned).
pub fn copy_len(a: &Analysis, at: u64) -> Result<usize, PlanError> {
    let mut len = 0;
    for k in 0..8 {
        len = len.max(relocate(a, at + k)?.0.len());
    }
    Ok(len)
}

/// One instruction of a relocated copy, as it executes.
#[derive(Debug, Clone, Copy)]
struct CopyInsn {
    ip: u64,
    len: usize,
    /// The first instruction encoded there (for a long form: `jmp [rip]`, `call [rip]` or the
    /// inverted short jcc).
    insn: Instruction,
    /// The branch target, for a long form read from its pointer.
    target: Option<u64>,
    /// The pointer a long form reads.
    slot: Option<u64>,
}

/// `jmp/call qword [rip+d]` through a pointer stored in `copy` (at `at`): (slot, pointer).
fn pointer_branch(copy: &[u8], at: u64, i: &Instruction) -> Option<(u64, u64)> {
    if !matches!(i.code(), Code::Jmp_rm64 | Code::Call_rm64) || !i.is_ip_rel_memory_operand() {
        return None;
    }
    let slot = i.ip_rel_memory_address();
    let o = usize::try_from(slot.checked_sub(at)?).ok()?;
    let b = copy.get(o..o.checked_add(8)?)?;
    Some((slot, u64::from_le_bytes(b.try_into().ok()?)))
}

/// Finds in `copy` (at `at`) the encoding of each of `want`, in order: the instruction itself,
/// or for a direct branch its long form. Returns them and where the code ends.
fn walk_copy(copy: &[u8], at: u64, want: &[Instruction]) -> Result<(Vec<CopyInsn>, usize), String> {
    let decode_at = |off: usize| -> Result<Instruction, String> {
        let bytes = copy.get(off..).ok_or("the copy is truncated")?;
        let mut dec = Decoder::with_ip(64, bytes, at + off as u64, DecoderOptions::NONE);
        let i = dec.decode();
        if i.is_invalid() {
            return Err(format!("the copy does not decode at +{off:#x}"));
        }
        Ok(i)
    };
    let mut out = Vec::with_capacity(want.len());
    let mut off = 0usize;
    for w in want {
        let i = decode_at(off)?;
        let ip = at + off as u64;
        let plain = CopyInsn {
            ip,
            len: i.len(),
            insn: i,
            target: branch_target(&i),
            slot: None,
        };
        let c = if branch_target(w).is_none() {
            plain
        } else if let Some((slot, to)) =
            pointer_branch(copy, at, &i).filter(|_| match w.mnemonic() {
                Mnemonic::Jmp => i.code() == Code::Jmp_rm64,
                Mnemonic::Call => i.code() == Code::Call_rm64,
                _ => false,
            })
        {
            // `jmp/call [rip]`: a long jmp or call.
            CopyInsn {
                ip,
                len: i.len(),
                insn: i,
                target: Some(to),
                slot: Some(slot),
            }
        } else if w.code().is_jcc_short_or_near()
            && i.code().is_jcc_short()
            && i.code().negate_condition_code().mnemonic() == w.mnemonic()
        {
            // `j!cc short skip; jmp [rip]; skip:`: a long jcc.
            let j = decode_at(off + i.len())?;
            match pointer_branch(copy, at, &j) {
                Some((slot, to))
                    if j.code() == Code::Jmp_rm64 && i.near_branch_target() == j.next_ip() =>
                {
                    CopyInsn {
                        ip,
                        len: i.len() + j.len(),
                        insn: i,
                        target: Some(to),
                        slot: Some(slot),
                    }
                }
                _ => plain,
            }
        } else {
            plain
        };
        off += c.len;
        out.push(c);
    }
    Ok((out, off))
}

/// A fully built site: what to write where, and how to move vCPUs parked in its bytes.
#[derive(Debug, Clone)]
pub struct SitePlan {
    pub analysis: Analysis,
    /// The jump (plus `int3` fill) to write at `analysis.jump_at`.
    pub jump: Vec<u8>,
    /// The original bytes it replaces (the undo record).
    pub original: Vec<u8>,
    /// Where the jump goes: the new function or the micropatch stub.
    pub code_at: u64,
    /// Arena contents: (address, bytes).
    pub arena: Vec<(u64, Vec<u8>)>,
    /// For every displaced instruction: (its address, its relocated copy's address). A vCPU
    /// parked at the first one is left alone (it will execute the jump).
    pub moves: Vec<(u64, u64)>,
}

impl SitePlan {
    /// Where a vCPU parked at `rip` must go, `Some(rip)` if it may stay, `None` if no safe
    /// place exists (not on a displaced instruction boundary).
    pub fn relocate_rip(&self, rip: u64) -> Option<u64> {
        let (start, end) = self.analysis.range();
        if rip <= start || rip >= end {
            return Some(rip);
        }
        self.moves
            .iter()
            .find(|(from, _)| *from == rip)
            .map(|&(_, to)| to)
    }
}

/// Builds the site: `code` (relocations already applied for `code_at`) is the new function, or
/// the micropatch's inserted instructions, which the relocated copy follows directly.
/// `escape_at` is where a function site's escape copy goes (ignored for micropatches).
pub fn build(
    a: &Analysis,
    code: &[u8],
    code_at: u64,
    escape_at: u64,
) -> Result<SitePlan, PlanError> {
    let verify_err = |reason: String| PlanError::Verify {
        site: a.name.clone(),
        reason,
    };
    let copy_at = match a.kind {
        SiteKind::Function => escape_at,
        SiteKind::Micropatch => code_at + code.len() as u64,
    };
    let (copy_bytes, copy_addrs) = relocate(a, copy_at)?;
    let arena = match a.kind {
        SiteKind::Function => vec![(code_at, code.to_vec()), (escape_at, copy_bytes.clone())],
        SiteKind::Micropatch => {
            let mut stub = code.to_vec();
            stub.extend_from_slice(&copy_bytes);
            vec![(code_at, stub)]
        }
    };
    let jump = jump_bytes(a.jump_at, code_at, a.jump_len, a.displaced_len())
        .ok_or_else(|| verify_err(format!("the jump to {code_at:#x} does not fit")))?;
    let plan = SitePlan {
        analysis: a.clone(),
        jump,
        original: a.displaced_bytes.clone(),
        code_at,
        arena,
        moves: a
            .displaced
            .iter()
            .map(Instruction::ip)
            .zip(copy_addrs.iter().copied())
            .collect(),
    };
    verify(&plan, copy_at, &copy_bytes).map_err(verify_err)?;
    Ok(plan)
}

/// Whether `copy` is `orig` (IP and length aside). A RIP-relative operand may have become
/// EIP-relative: out of rel32 reach of a target below 4 GiB, the encoder addresses it as
/// `[eip+d]` (address-size prefix), which reaches the same absolute address.
fn same_insn(orig: &Instruction, copy: &Instruction) -> bool {
    let mut c = *copy;
    if orig.memory_base() == Register::RIP && c.memory_base() == Register::EIP {
        if c.ip_rel_memory_address() != orig.ip_rel_memory_address() {
            return false;
        }
        c.set_memory_base(Register::RIP);
        c.set_memory_displacement64(orig.memory_displacement64());
        c.set_memory_displ_size(orig.memory_displ_size());
    }
    c == *orig
}

/// Rule 4: decodes what was built and checks it is exactly what was meant.
fn verify(p: &SitePlan, copy_at: u64, copy: &[u8]) -> Result<(), String> {
    let a = &p.analysis;
    let (start, end) = a.range();
    // The jump: one instruction to the code, then only int3.
    let jumps = decode_prefix(&p.jump, start);
    let j = jumps.first().ok_or("the jump does not decode")?;
    let target = match j.code() {
        Code::Jmp_rel32_64 => j.near_branch_target(),
        Code::Jmp_rm64
            if j.is_ip_rel_memory_operand() && j.ip_rel_memory_address() == j.next_ip() =>
        {
            let o = j.len();
            let b = p
                .jump
                .get(o..o + 8)
                .ok_or("the jump's address is missing")?;
            u64::from_le_bytes(b.try_into().map_err(|_| "bad address")?)
        }
        c => return Err(format!("the jump decodes as {c:?}")),
    };
    if target != p.code_at {
        return Err(format!(
            "the jump goes to {target:#x}, not {:#x}",
            p.code_at
        ));
    }
    let used = if j.code() == Code::Jmp_rel32_64 {
        j.len()
    } else {
        JMP_ABS_LEN
    };
    if p.jump.len() != a.displaced_len() || p.jump[used..].iter().any(|&b| b != INT3) {
        return Err("the fill after the jump is not all int3".into());
    }

    // The copy: each displaced instruction, same operation, same absolute targets, then the
    // jump back; after it only the long forms' pointers.
    let mut want = a.displaced.clone();
    want.push(Instruction::with_branch(Code::Jmp_rel32_64, end).map_err(|e| e.to_string())?);
    let (got, code_len) = walk_copy(copy, copy_at, &want)?;
    let map = |t: u64| -> u64 {
        // Branches inside the displaced range follow their instruction into the copy.
        a.displaced
            .iter()
            .zip(&got)
            .find(|(d, _)| d.ip() == t)
            .map_or(t, |(_, g)| g.ip)
    };
    for (orig, new) in a.displaced.iter().zip(&got) {
        match branch_target(orig) {
            // A long form's mnemonic is not the branch's (`jne` for a `je`...): walk_copy
            // matched it to the branch; its target is checked here.
            Some(t) => {
                if new.slot.is_none() && new.insn.mnemonic() != orig.mnemonic() {
                    return Err(format!(
                        "{:#x}: {:?} became {:?}",
                        orig.ip(),
                        orig.mnemonic(),
                        new.insn.mnemonic()
                    ));
                }
                if new.target != Some(map(t)) {
                    return Err(format!(
                        "{:#x}: branch to {:#x} became a branch to {:x?}",
                        orig.ip(),
                        map(t),
                        new.target
                    ));
                }
            }
            // Same instruction, operands and all (a RIP-relative operand's absolute address
            // included; IP and length are not compared).
            None if !same_insn(orig, &new.insn) => {
                if orig.is_ip_rel_memory_operand()
                    && orig.ip_rel_memory_address() != new.insn.ip_rel_memory_address()
                {
                    return Err(format!(
                        "{:#x}: RIP-relative operand {:#x} became {:#x}",
                        orig.ip(),
                        orig.ip_rel_memory_address(),
                        new.insn.ip_rel_memory_address()
                    ));
                }
                return Err(format!(
                    "{:#x}: `{orig}` became `{}` when copied",
                    orig.ip(),
                    new.insn
                ));
            }
            None => {}
        }
    }
    let back = got.last().ok_or("empty copy")?;
    if back.insn.mnemonic() != Mnemonic::Jmp || back.target != Some(end) {
        return Err(format!("the copy does not jump back to {end:#x}"));
    }
    if p.moves.len() != a.displaced.len()
        || p.moves
            .iter()
            .zip(a.displaced.iter().zip(&got))
            .any(|(&(from, to), (d, g))| from != d.ip() || to != g.ip)
    {
        return Err("the vCPU moves do not match the copy".into());
    }
    // After the code: int3 up to an 8-byte boundary, then exactly the pointers used.
    let mut slots: Vec<u64> = got.iter().filter_map(|g| g.slot).collect();
    slots.sort_unstable();
    let code_end = copy_at + code_len as u64;
    let pad = if slots.is_empty() {
        0
    } else {
        (code_end.next_multiple_of(8) - code_end) as usize
    };
    let data = code_end + pad as u64;
    if copy.len() != code_len + pad + 8 * slots.len()
        || copy[code_len..code_len + pad].iter().any(|&b| b != INT3)
        || slots
            .iter()
            .enumerate()
            .any(|(k, &s)| s != data + 8 * k as u64)
    {
        return Err("the copy holds more than its code and the pointers it uses".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests;
