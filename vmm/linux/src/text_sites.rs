//! The places where a Linux kernel rewrites its own text, from the tables it carries for
//! itself in the vmlinux (docs/qemu-backend.md, "Text the kernel rewrites while it runs").
//!
//! Some of these rewrites happen only while it boots (alternatives, paravirt, retpolines,
//! return thunks): the guest then holds their final form, which the displaced bytes copy as
//! they are. Others happen at any time while it runs:
//! - jump labels (`__jump_table`): `static_branch_enable()` / `dynamic_debug` toggle a 2- or
//!   5-byte NOP into a jump;
//! - static calls (`.static_call_sites`): `static_call_update()` rewrites a 5-byte call;
//! - ftrace (`__mcount_loc`): turns the entry's 5-byte NOP into a call while tracing;
//! - SMP lock prefixes (`.smp_locks`): rewritten between `lock` and `ds` when a kernel booted
//!   on one CPU gains another (only then: a kernel booted with several keeps none of them).
//!
//! A jump placed over one of those would be overwritten by the kernel's next rewrite (and the
//! kernel's own checks, e.g. `jump_label.c`'s, BUG when the bytes there are not what they
//! expect), so the engine must never displace them.

use thiserror::Error;

use crate::Kallsyms;
use crate::patch::file_bytes;

/// What rewrites a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mechanism {
    JumpLabel,
    StaticCall,
    Ftrace,
    SmpLock,
    Alternative,
    Paravirt,
    Retpoline,
    ReturnThunk,
    /// A static call's trampoline (`__SCT__*`): `static_call_update()` rewrites its jump.
    StaticCallTrampoline,
    /// An instruction with an exception-table fixup (`__ex_table`): not a rewrite, but it must
    /// stay where it is, since run from a relocated copy its fault would find no fixup.
    ExceptionFixup,
}

impl Mechanism {
    /// How operators and the kernel's sources name it.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::JumpLabel => "a jump label (static key / dynamic debug, __jump_table)",
            Mechanism::StaticCall => "a static call (.static_call_sites)",
            Mechanism::Ftrace => "an ftrace call site (__mcount_loc)",
            Mechanism::SmpLock => "an SMP lock prefix (.smp_locks)",
            Mechanism::Alternative => "an alternative (.altinstructions)",
            Mechanism::Paravirt => "a paravirt call (.parainstructions)",
            Mechanism::Retpoline => "a retpoline site (.retpoline_sites)",
            Mechanism::ReturnThunk => "a return thunk (.return_sites)",
            Mechanism::StaticCallTrampoline => {
                "a static call trampoline (__SCT__, rewritten by static_call_update)"
            }
            Mechanism::ExceptionFixup => {
                "an instruction with an exception fixup (__ex_table), whose fault would find no fixup if run from a copy"
            }
        }
    }

    /// Must never be displaced: rewritten while the kernel runs (not only while it boots), or,
    /// for an exception fixup, bound to its address.
    pub fn at_run_time(self) -> bool {
        matches!(
            self,
            Mechanism::JumpLabel
                | Mechanism::StaticCall
                | Mechanism::Ftrace
                | Mechanism::SmpLock
                | Mechanism::StaticCallTrampoline
                | Mechanism::ExceptionFixup
        )
    }
}

/// One site, at its link-time address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TextSite {
    pub addr: u64,
    /// Bytes the rewrite may touch from `addr`.
    pub len: u8,
    pub mechanism: Mechanism,
}

/// The x86-64 5-byte NOP the kernel puts at disabled jump labels, static calls and ftrace sites.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];
/// The 2-byte NOP of a disabled short jump label.
pub const NOP2: [u8; 2] = [0x66, 0x90];
const INT3: u8 = 0xcc;
const LOCK: u8 = 0xf0;
/// `ds` segment prefix: what a UP kernel writes over its lock prefixes.
const DS: u8 = 0x3e;

/// Whether `bytes` (a whole site of `mechanism` at link-time `addr`) is a form the kernel
/// puts there: int3 first (mid `text_poke_bp`), a NOP, a `jmp`/`call` whose target
/// `target_ok` accepts, `ret` for a static call to nothing, `lock`/`ds` at a lock prefix.
pub fn known_form(
    mechanism: Mechanism,
    addr: u64,
    bytes: &[u8],
    target_ok: &impl Fn(u64) -> bool,
) -> bool {
    let Some(&first) = bytes.first() else {
        return false;
    };
    if mechanism == Mechanism::SmpLock {
        return bytes.len() == 1 && (first == LOCK || first == DS);
    }
    if first == INT3 {
        return true;
    }
    // A static call trampoline is a 5-byte instruction followed by the kernel's signature
    // (`ud1 %esp, %ecx`), which no rewrite touches.
    let insn = if mechanism == Mechanism::StaticCallTrampoline && bytes.len() == 8 {
        if bytes[5..] != SCT_SIGNATURE {
            return false;
        }
        &bytes[..5]
    } else if mechanism == Mechanism::JumpLabel && (first == 0xeb || bytes.starts_with(&NOP2)) {
        // A short jump label: its 2-byte forms within the 5 bytes its table entry spans.
        &bytes[..2.min(bytes.len())]
    } else {
        bytes
    };
    let rel_target = |rel: i64| {
        addr.wrapping_add(insn.len() as u64)
            .wrapping_add(rel as u64)
    };
    match insn {
        [0xeb, rel] => target_ok(rel_target(i64::from(*rel as i8))),
        b if b == NOP2 => true,
        b if b == NOP5 => true,
        [op @ (0xe8 | 0xe9), r0, r1, r2, r3] => {
            let rel = i32::from_le_bytes([*r0, *r1, *r2, *r3]);
            // A jump label only ever jumps; calls are static calls and ftrace.
            (*op == 0xe9 || mechanism != Mechanism::JumpLabel)
                && target_ok(rel_target(i64::from(rel)))
        }
        [0xc3, ..] => matches!(
            mechanism,
            Mechanism::StaticCall | Mechanism::StaticCallTrampoline
        ),
        _ => false,
    }
}

/// The bytes after a static call trampoline's instruction (`ud1 %esp, %ecx`).
const SCT_SIGNATURE: [u8; 3] = [0x0f, 0xb9, 0xcc];

#[derive(Debug, Error)]
pub enum TextSitesError {
    #[error(
        "the vmlinux has no {0}: cannot tell where the kernel rewrites its own text, and patching over such a site would crash it"
    )]
    NoSymbol(&'static str),
    #[error("the vmlinux's {table} table ({start:#x}..{end:#x}) is not in the file")]
    NotInFile {
        table: &'static str,
        start: u64,
        end: u64,
    },
}

/// Every site of every table, sorted by address.
#[derive(Debug, Clone, Default)]
pub struct KernelTextSites {
    sites: Vec<TextSite>,
    /// `[__init_begin, __init_end)`: text the kernel frees (and poisons) after booting.
    init: Option<(u64, u64)>,
    /// What each boot-time rewrite may have written, for reconciling a function's body.
    boot: BootSites,
}

/// One entry of `.altinstructions` (`struct alt_instr`), with its replacement's bytes from the
/// file (`.altinstr_replacement` is freed after boot: the file is the only place to read them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Alternative {
    /// Link-time address of the original instructions.
    pub instr: u64,
    pub instrlen: u8,
    /// Link-time address of the replacement.
    pub repl: u64,
    /// `X86_FEATURE_*`, with `ALTINSTR_FLAG_INV` (0x8000) for "patch when absent".
    pub cpuid: u16,
    pub replacement: Vec<u8>,
}

/// One entry of `.parainstructions` (6.1: `struct paravirt_patch_site { u8 *instr; u8 type;
/// u8 len; }`, 16 bytes with padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParavirtSite {
    /// Link-time address.
    pub instr: u64,
    /// Index of the op in `pv_ops` (a `void *` array for this purpose).
    pub op: u8,
    pub len: u8,
}

/// One entry of `.static_call_sites` (`struct static_call_site { s32 addr; s32 key; }`, the
/// key's low bits flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticCallSite {
    /// Link-time address of the call (or tail-call jump).
    pub addr: u64,
    /// Link-time address of its `struct static_call_key`.
    pub key: u64,
    /// `STATIC_CALL_SITE_TAIL`: a tail call (`jmp`), rewritten to `ret` for a NULL function.
    pub tail: bool,
    /// The key's trampoline (`__SCT__x` for the key `__SCK__x`), link-time.
    pub trampoline: Option<u64>,
}

/// One entry of `__jump_table` (`struct jump_entry { s32 code; s32 target; long key; }`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JumpLabelSite {
    /// Link-time address of the NOP or jump.
    pub addr: u64,
    /// Link-time address it jumps to when enabled.
    pub target: u64,
}

/// The symbols the boot-time rewrites use (link-time addresses).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BootSymbols {
    /// `pv_ops`: the paravirt ops' table, indexed by a site's `op`.
    pub pv_ops: Option<u64>,
    /// `_paravirt_nop`: an op the kernel patches out to NOPs.
    pub paravirt_nop: Option<u64>,
    /// `paravirt_BUG`: what a NULL op is patched to call.
    pub paravirt_bug: Option<u64>,
    /// `__static_call_return0`: a call to it is patched to `xor eax, eax`.
    pub static_call_return0: Option<u64>,
    /// `__static_call_return`: where a conditional tail call to NULL jumps.
    pub static_call_return: Option<u64>,
    /// `__x86_return_thunk`.
    pub return_thunk: Option<u64>,
    /// `[_stext, _etext)`: the kernel's text, where a rewritten call may go.
    pub text: Option<(u64, u64)>,
}

/// The boot-time rewrite tables, by address.
#[derive(Debug, Clone, Default)]
pub struct BootSites {
    pub alternatives: Vec<Alternative>,
    pub paravirt: Vec<ParavirtSite>,
    pub static_calls: Vec<StaticCallSite>,
    /// Jump labels: rewritten while the kernel runs too (never displaced), but in a body
    /// their state at the time of the check is one of two exact forms.
    pub jump_labels: Vec<JumpLabelSite>,
    pub symbols: BootSymbols,
}

/// `STATIC_CALL_SITE_TAIL` and `STATIC_CALL_SITE_INIT`, in the key field's low bits.
const STATIC_CALL_SITE_TAIL: u64 = 1;
const STATIC_CALL_SITE_FLAGS: u64 = 3;

impl BootSites {
    fn from_vmlinux(vmlinux: &[u8], kallsyms: &Kallsyms) -> BootSites {
        let sym = |n: &str| kallsyms.lookup(n);
        let table = |start: &str, end: &str, entry: usize| -> Option<(u64, &[u8])> {
            let (s, e) = (sym(start)?, sym(end)?);
            let count = usize::try_from(e.checked_sub(s)? / entry as u64).ok()?;
            if count > MAX_SITES_PER_TABLE {
                return None;
            }
            Some((s, file_bytes(vmlinux, s, count * entry)?))
        };
        let rel = |field: u64, b: &[u8]| -> u64 {
            let v = i32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            field.wrapping_add(i64::from(v) as u64)
        };
        let mut alternatives = Vec::new();
        if let Some((start, bytes)) = table("__alt_instructions", "__alt_instructions_end", 12) {
            for (i, e) in bytes.chunks_exact(12).enumerate() {
                let field = start + (i * 12) as u64;
                let (instr, repl) = (rel(field, &e[0..4]), rel(field + 4, &e[4..8]));
                let (instrlen, repllen) = (e[10], e[11]);
                // The kernel pads the original to the longest replacement (BUG_ON otherwise).
                if repllen > instrlen {
                    continue;
                }
                // A replacement the file does not hold cannot be checked: the site keeps only
                // its original form.
                let replacement = file_bytes(vmlinux, repl, usize::from(repllen))
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default();
                if replacement.len() != usize::from(repllen) {
                    continue;
                }
                alternatives.push(Alternative {
                    instr,
                    instrlen,
                    repl,
                    cpuid: u16::from_le_bytes([e[8], e[9]]),
                    replacement,
                });
            }
        }
        alternatives.sort_by_key(|a| a.instr);
        let mut paravirt = Vec::new();
        if let Some((_, bytes)) = table("__parainstructions", "__parainstructions_end", 16) {
            for e in bytes.chunks_exact(16) {
                let mut a = [0u8; 8];
                a.copy_from_slice(&e[..8]);
                let instr = u64::from_le_bytes(a);
                if instr != 0 {
                    paravirt.push(ParavirtSite {
                        instr,
                        op: e[8],
                        len: e[9],
                    });
                }
            }
        }
        paravirt.sort_by_key(|p| p.instr);
        let mut static_calls = Vec::new();
        if let Some((start, bytes)) =
            table("__start_static_call_sites", "__stop_static_call_sites", 8)
        {
            for (i, e) in bytes.chunks_exact(8).enumerate() {
                let field = start + (i * 8) as u64;
                let raw = rel(field + 4, &e[4..8]);
                let key = raw & !STATIC_CALL_SITE_FLAGS;
                // The key's trampoline: `__SCK__x` has `__SCT__x`.
                let trampoline = kallsyms
                    .containing(key)
                    .filter(|k| k.address == key)
                    .and_then(|k| k.name.strip_prefix("__SCK__"))
                    .and_then(|n| sym(&format!("__SCT__{n}")));
                static_calls.push(StaticCallSite {
                    addr: rel(field, &e[0..4]),
                    key,
                    tail: raw & STATIC_CALL_SITE_TAIL != 0,
                    trampoline,
                });
            }
        }
        static_calls.sort_by_key(|s| s.addr);
        let mut jump_labels = Vec::new();
        if let Some((start, bytes)) = table("__start___jump_table", "__stop___jump_table", 16) {
            for (i, e) in bytes.chunks_exact(16).enumerate() {
                let field = start + (i * 16) as u64;
                jump_labels.push(JumpLabelSite {
                    addr: rel(field, &e[0..4]),
                    target: rel(field + 4, &e[4..8]),
                });
            }
        }
        jump_labels.sort_by_key(|j| j.addr);
        BootSites {
            alternatives,
            paravirt,
            static_calls,
            jump_labels,
            symbols: BootSymbols {
                pv_ops: sym("pv_ops"),
                paravirt_nop: sym("_paravirt_nop"),
                paravirt_bug: sym("paravirt_BUG"),
                static_call_return0: sym("__static_call_return0"),
                static_call_return: sym("__static_call_return"),
                return_thunk: sym("__x86_return_thunk"),
                text: sym("_stext").zip(sym("_etext")),
            },
        }
    }

    /// Alternatives whose original instructions start at `addr` (link-time), in table order
    /// by address (an `ALTERNATIVE_2` has two).
    pub fn alternatives_at(&self, addr: u64) -> &[Alternative] {
        let from = self.alternatives.partition_point(|a| a.instr < addr);
        let to = self.alternatives.partition_point(|a| a.instr <= addr);
        &self.alternatives[from..to]
    }

    pub fn paravirt_at(&self, addr: u64) -> Option<&ParavirtSite> {
        let i = self.paravirt.partition_point(|p| p.instr < addr);
        self.paravirt.get(i).filter(|p| p.instr == addr)
    }

    pub fn static_call_at(&self, addr: u64) -> Option<&StaticCallSite> {
        let i = self.static_calls.partition_point(|s| s.addr < addr);
        self.static_calls.get(i).filter(|s| s.addr == addr)
    }

    pub fn jump_label_at(&self, addr: u64) -> Option<&JumpLabelSite> {
        let i = self.jump_labels.partition_point(|j| j.addr < addr);
        self.jump_labels.get(i).filter(|j| j.addr == addr)
    }
}

/// A table: its kallsyms bounds, entry size, where the code address is in an entry, whether
/// that address is relative to the entry field (`s32`) or absolute (`u64`), and how many bytes
/// at the site the rewrite touches.
struct Table {
    start: &'static str,
    end: &'static str,
    entry: usize,
    relative: bool,
    site_len: u8,
    mechanism: Mechanism,
}

/// The x86-64 layouts of Linux 6.1: `struct jump_entry { s32 code, target; long key; }`,
/// `struct static_call_site { s32 addr, key; }`, `struct alt_instr { s32 instr_offset,
/// repl_offset; u16 cpuid; u8 instrlen, replacementlen; }` (packed, 12 bytes; its length
/// byte is read per entry), `struct paravirt_patch_site { u8 *instr; u8 type, len; }` (16),
/// and `s32` lists for the lock prefixes, retpolines and return thunks; `__mcount_loc` holds
/// absolute addresses.
const TABLES: &[Table] = &[
    Table {
        start: "__start___jump_table",
        end: "__stop___jump_table",
        entry: 16,
        relative: true,
        site_len: 5,
        mechanism: Mechanism::JumpLabel,
    },
    Table {
        start: "__start_static_call_sites",
        end: "__stop_static_call_sites",
        entry: 8,
        relative: true,
        site_len: 5,
        mechanism: Mechanism::StaticCall,
    },
    Table {
        start: "__start_mcount_loc",
        end: "__stop_mcount_loc",
        entry: 8,
        relative: false,
        site_len: 5,
        mechanism: Mechanism::Ftrace,
    },
    Table {
        start: "__smp_locks",
        end: "__smp_locks_end",
        entry: 4,
        relative: true,
        site_len: 1,
        mechanism: Mechanism::SmpLock,
    },
    Table {
        start: "__start___ex_table",
        end: "__stop___ex_table",
        entry: 12,
        relative: true,
        site_len: 1,
        mechanism: Mechanism::ExceptionFixup,
    },
    Table {
        start: "__alt_instructions",
        end: "__alt_instructions_end",
        entry: 12,
        relative: true,
        site_len: 0,
        mechanism: Mechanism::Alternative,
    },
    Table {
        start: "__parainstructions",
        end: "__parainstructions_end",
        entry: 16,
        relative: false,
        site_len: 0,
        mechanism: Mechanism::Paravirt,
    },
    Table {
        start: "__retpoline_sites",
        end: "__retpoline_sites_end",
        entry: 4,
        relative: true,
        site_len: 6,
        mechanism: Mechanism::Retpoline,
    },
    Table {
        start: "__return_sites",
        end: "__return_sites_end",
        entry: 4,
        relative: true,
        site_len: 5,
        mechanism: Mechanism::ReturnThunk,
    },
];

/// The kernel never has more sites than this (6.1: ≈ 6,000 jump labels, 4,000 static calls,
/// 50,000 ftrace sites, 9,000 lock prefixes); a table claiming more is not one to believe.
const MAX_SITES_PER_TABLE: usize = 1 << 20;

impl KernelTextSites {
    /// Reads every table from `vmlinux`. The run-time tables (jump labels, static calls,
    /// ftrace, lock prefixes) must be there; a kernel built without one of the boot-time ones
    /// (no retpolines, say) simply has no such sites.
    pub fn from_vmlinux(vmlinux: &[u8], kallsyms: &Kallsyms) -> Result<Self, TextSitesError> {
        let mut sites = Vec::new();
        for t in TABLES {
            let (Some(start), Some(end)) = (kallsyms.lookup(t.start), kallsyms.lookup(t.end))
            else {
                if t.mechanism.at_run_time() {
                    return Err(TextSitesError::NoSymbol(t.start));
                }
                continue;
            };
            let len = end.saturating_sub(start);
            let count = usize::try_from(len / t.entry as u64).unwrap_or(usize::MAX);
            if count > MAX_SITES_PER_TABLE {
                return Err(TextSitesError::NotInFile {
                    table: t.start,
                    start,
                    end,
                });
            }
            // `.smp_locks` is padded to a page with zeros: stop at the first empty entry.
            let bytes =
                file_bytes(vmlinux, start, count * t.entry).ok_or(TextSitesError::NotInFile {
                    table: t.start,
                    start,
                    end,
                })?;
            for (i, e) in bytes.chunks_exact(t.entry).enumerate() {
                let field = start + (i * t.entry) as u64;
                let addr = if t.relative {
                    let rel = i32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                    if rel == 0 {
                        continue;
                    }
                    field.wrapping_add(i64::from(rel) as u64)
                } else {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&e[..8]);
                    match u64::from_le_bytes(b) {
                        0 => continue,
                        a => a,
                    }
                };
                let site_len = match t.mechanism {
                    Mechanism::Alternative => e[10],
                    Mechanism::Paravirt => e[9],
                    // objtool leaves a 2-byte NOP (or `jmp rel8`) where the jump is short.
                    Mechanism::JumpLabel => match file_bytes(vmlinux, addr, 2) {
                        Some([0xeb, _]) | Some([0x66, 0x90]) => 2,
                        _ => t.site_len,
                    },
                    _ => t.site_len,
                };
                sites.push(TextSite {
                    addr,
                    len: site_len.max(1),
                    mechanism: t.mechanism,
                });
            }
        }
        // Static call trampolines are no table but symbols: `jmp rel32; ud1` (8 bytes) each.
        sites.extend(
            kallsyms
                .symbols()
                .iter()
                .filter(|s| s.name.starts_with("__SCT__") && s.is_text())
                .map(|s| TextSite {
                    addr: s.address,
                    len: 8,
                    mechanism: Mechanism::StaticCallTrampoline,
                }),
        );
        sites.sort_unstable();
        let init = kallsyms
            .lookup("__init_begin")
            .zip(kallsyms.lookup("__init_end"));
        Ok(KernelTextSites {
            sites,
            init,
            boot: BootSites::from_vmlinux(vmlinux, kallsyms),
        })
    }

    /// From a list of sites (tests, and kernels whose tables were read elsewhere).
    pub fn from_sites(mut sites: Vec<TextSite>) -> KernelTextSites {
        sites.sort_unstable();
        KernelTextSites {
            sites,
            init: None,
            boot: BootSites::default(),
        }
    }

    /// With these boot-time tables (tests).
    pub fn with_boot(mut self, mut boot: BootSites) -> KernelTextSites {
        boot.alternatives.sort_by_key(|a| a.instr);
        boot.paravirt.sort_by_key(|p| p.instr);
        boot.static_calls.sort_by_key(|s| s.addr);
        boot.jump_labels.sort_by_key(|j| j.addr);
        self.boot = boot;
        self
    }

    /// The boot-time rewrite tables' entries.
    pub fn boot(&self) -> &BootSites {
        &self.boot
    }

    /// `[__init_begin, __init_end)`, link-time, when the image has it.
    pub fn freed_init(&self) -> Option<(u64, u64)> {
        self.init
    }

    /// Whether `addr` (link-time) is in the init memory the kernel frees after booting.
    pub fn in_freed_init(&self, addr: u64) -> bool {
        self.init.is_some_and(|(a, b)| (a..b).contains(&addr))
    }

    /// Sites of `mechanism`, for reports and tests.
    pub fn of(&self, mechanism: Mechanism) -> impl Iterator<Item = &TextSite> {
        self.sites.iter().filter(move |s| s.mechanism == mechanism)
    }

    /// Whether a site of `mechanism` starts exactly at `addr` (link-time).
    pub fn of_at(&self, mechanism: Mechanism, addr: u64) -> bool {
        self.touching(addr, addr + 1)
            .any(|s| s.mechanism == mechanism && s.addr == addr)
    }

    pub fn len(&self) -> usize {
        self.sites.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }

    /// Ends every function symbol of `symbols` at the next function entry ftrace knows of
    /// (`__mcount_loc`): kallsyms sizes a symbol up to the next *named* one, which counts in
    /// unnamed code after it (the body of an overridden `__weak` default, with its own entry),
    /// and the planner would analyse that as part of the function.
    pub fn cut_at_function_entries(&self, symbols: &mut [patch_format::ImageSymbol]) {
        let entries: Vec<u64> = self.of(Mechanism::Ftrace).map(|s| s.addr).collect();
        for sym in symbols.iter_mut().filter(|s| s.function && s.size > 0) {
            let next = entries.partition_point(|&e| e <= sym.addr);
            if let Some(&e) = entries.get(next)
                && e < sym.addr.saturating_add(sym.size)
            {
                sym.size = e - sym.addr;
            }
        }
    }

    /// Whether writing `data` at link-time address `at` is one of the kernel's own run-time
    /// rewrites: it lies inside one site of a run-time table (jump label, static call, ftrace
    /// call, static-call trampoline, SMP lock prefix), and the site's bytes before and after it
    /// are forms of that site ([`known_form`]; an int3 on the first byte while the rest changes
    /// is a step of `text_poke_bp`'s protocol). A site holding a hot patch's jump (its target
    /// is the arena, which `target_ok` refuses) is never the kernel's to rewrite, so a guest
    /// cannot write a patched function's entry back to its NOP and undo a fix. `current` reads a site's bytes as they are;
    /// `target_ok` says whether a jump or call may go to a link-time address.
    ///
    /// Code integrity for a Linux guest lets exactly these writes through; they are vouched
    /// for by the image's own tables, never by the guest.
    pub fn judge_rewrite(
        &self,
        at: u64,
        data: &[u8],
        current: impl Fn(u64, usize) -> Option<Vec<u8>>,
        target_ok: impl Fn(u64) -> bool,
    ) -> Option<Mechanism> {
        let end = at.checked_add(data.len() as u64)?;
        self.touching(at, end)
            .filter(|s| {
                matches!(
                    s.mechanism,
                    Mechanism::JumpLabel
                        | Mechanism::StaticCall
                        | Mechanism::Ftrace
                        | Mechanism::StaticCallTrampoline
                        | Mechanism::SmpLock
                )
            })
            .find(|s| {
                if s.addr > at || s.addr + u64::from(s.len) < end {
                    return false;
                }
                let Some(before) = current(s.addr, usize::from(s.len)) else {
                    return false;
                };
                let mut after = before.clone();
                let off = (at - s.addr) as usize;
                after[off..off + data.len()].copy_from_slice(data);
                // From one of the site's forms to another: a site that holds something else
                // (a hot patch's jump into the arena) is not the kernel's to rewrite.
                known_form(s.mechanism, s.addr, &before, &target_ok)
                    && known_form(s.mechanism, s.addr, &after, &target_ok)
            })
            .map(|s| s.mechanism)
    }

    /// Sites whose rewrite touches `[start, end)` (link-time addresses), in address order.
    pub fn touching(&self, start: u64, end: u64) -> impl Iterator<Item = &TextSite> {
        // No site is longer than 255 bytes: look from there.
        let from = self
            .sites
            .partition_point(|s| s.addr.saturating_add(255) < start);
        self.sites[from..]
            .iter()
            .take_while(move |s| s.addr < end)
            .filter(move |s| s.addr.saturating_add(u64::from(s.len)) > start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITE: u64 = 0xffff_ffff_8100_1000;

    fn sites() -> KernelTextSites {
        KernelTextSites::from_sites(vec![
            TextSite {
                addr: SITE,
                len: 5,
                mechanism: Mechanism::JumpLabel,
            },
            TextSite {
                addr: SITE + 0x100,
                len: 5,
                mechanism: Mechanism::StaticCall,
            },
            TextSite {
                addr: SITE + 0x200,
                len: 1,
                mechanism: Mechanism::SmpLock,
            },
            TextSite {
                addr: SITE + 0x300,
                len: 5,
                mechanism: Mechanism::Alternative,
            },
            TextSite {
                addr: SITE + 0x400,
                len: 8,
                mechanism: Mechanism::StaticCallTrampoline,
            },
        ])
    }

    fn in_text(t: u64) -> bool {
        (0xffff_ffff_8100_0000..0xffff_ffff_8200_0000).contains(&t)
    }

    fn jmp(from: u64, to: u64) -> [u8; 5] {
        let rel = (to as i64 - (from as i64 + 5)) as i32;
        let r = rel.to_le_bytes();
        [0xe9, r[0], r[1], r[2], r[3]]
    }

    /// Replays writes over `mem` (site address → bytes), each judged against the bytes
    /// before it, as the VMM does for every trapped fragment.
    fn judge(
        mem: &mut std::collections::BTreeMap<u64, Vec<u8>>,
        at: u64,
        data: &[u8],
    ) -> Option<Mechanism> {
        let s = sites();
        let verdict = s.judge_rewrite(
            at,
            data,
            |addr, len| mem.get(&addr).filter(|b| b.len() == len).cloned(),
            in_text,
        );
        if verdict.is_some()
            && let Some((base, bytes)) = mem.range_mut(..=at).next_back()
        {
            let off = (at - *base) as usize;
            bytes[off..off + data.len()].copy_from_slice(data);
        }
        verdict
    }

    #[test]
    fn text_poke_bp_enabling_a_jump_label_passes_step_by_step() {
        let mut mem = std::collections::BTreeMap::from([(SITE, NOP5.to_vec())]);
        let target = jmp(SITE, SITE + 0x40);
        // int3 first, then the tail, then the opcode: every step is vouched for.
        assert_eq!(judge(&mut mem, SITE, &[0xcc]), Some(Mechanism::JumpLabel));
        assert_eq!(
            judge(&mut mem, SITE + 1, &target[1..]),
            Some(Mechanism::JumpLabel)
        );
        assert_eq!(
            judge(&mut mem, SITE, &target[..1]),
            Some(Mechanism::JumpLabel)
        );
        assert_eq!(mem[&SITE], target.to_vec());
        // And back to the NOP.
        assert_eq!(judge(&mut mem, SITE, &NOP5), Some(Mechanism::JumpLabel));
        // A short jump label flips between its 2-byte forms.
        assert_eq!(judge(&mut mem, SITE, &NOP2), Some(Mechanism::JumpLabel));
        assert_eq!(
            judge(&mut mem, SITE, &[0xeb, 0x10]),
            Some(Mechanism::JumpLabel)
        );
        assert_eq!(
            judge(&mut mem, SITE, &[0xeb, 0x80]),
            Some(Mechanism::JumpLabel),
            "back into text"
        );
    }

    #[test]
    fn writes_that_are_not_the_kernels_own_rewrites_are_not_vouched_for() {
        let mut mem = std::collections::BTreeMap::from([
            (SITE, NOP5.to_vec()),
            (SITE + 0x100, NOP5.to_vec()),
            (SITE + 0x200, vec![0xf0]),
            (SITE + 0x300, NOP5.to_vec()),
        ]);
        // A jump out of the kernel's text, a call at a jump label, arbitrary bytes.
        assert_eq!(judge(&mut mem, SITE, &jmp(SITE, 0x4000_0000)), None);
        let mut call = jmp(SITE, SITE + 0x40);
        call[0] = 0xe8;
        assert_eq!(judge(&mut mem, SITE, &call), None);
        assert_eq!(judge(&mut mem, SITE, &[0x90, 0x90, 0x90, 0x48, 0x31]), None);
        // Crossing the site's end, or next to it, or at a boot-time-only site.
        assert_eq!(judge(&mut mem, SITE + 3, &[0, 0, 0]), None);
        assert_eq!(judge(&mut mem, SITE + 5, &[0xcc]), None);
        assert_eq!(judge(&mut mem, SITE + 0x300, &[0xcc]), None);
        // A static call may call; its lock prefix neighbour only flips lock/ds.
        let mut sc = jmp(SITE + 0x100, SITE + 0x40);
        sc[0] = 0xe8;
        assert_eq!(
            judge(&mut mem, SITE + 0x100, &sc),
            Some(Mechanism::StaticCall)
        );
        assert_eq!(
            judge(&mut mem, SITE + 0x100, &[0xc3]),
            Some(Mechanism::StaticCall)
        );
        assert_eq!(
            judge(&mut mem, SITE + 0x200, &[0x3e]),
            Some(Mechanism::SmpLock)
        );
        assert_eq!(judge(&mut mem, SITE + 0x200, &[0xcc]), None);
        // Nothing unmapped is vouched for.
        assert_eq!(judge(&mut mem, SITE + 0x500, &[0xcc]), None);
    }

    /// A hot patch's jump at a function's ftrace site targets the arena: the guest may not
    /// write the site back to its NOP (undoing the fix), nor step it through int3.
    #[test]
    fn a_site_holding_a_hot_patch_jump_is_not_the_kernels_to_rewrite() {
        let arena = 0xffff_ffff_c100_0000u64;
        let to_arena = jmp(SITE, arena);
        let mut mem = std::collections::BTreeMap::from([(SITE, to_arena.to_vec())]);
        let s = sites();
        let read = |addr: u64, len: usize| mem.get(&addr).filter(|b| b.len() == len).cloned();
        let not_arena = |t: u64| in_text(t) && !(arena..arena + 0x20_0000).contains(&t);
        assert_eq!(s.judge_rewrite(SITE, &NOP5, read, not_arena), None);
        assert_eq!(s.judge_rewrite(SITE, &[0xcc], read, not_arena), None);
        mem.insert(SITE, NOP5.to_vec());
        let read = |addr: u64, len: usize| mem.get(&addr).filter(|b| b.len() == len).cloned();
        assert_eq!(
            s.judge_rewrite(SITE, &[0xcc], read, not_arena),
            Some(Mechanism::JumpLabel)
        );
    }

    /// `static_call_update()` on a trampoline (`__SCT__tp_func_sched_wakeup` when a tracepoint
    /// is enabled): 8 bytes, the 5-byte jump then the `ud1` signature, rewritten by
    /// `text_poke_bp` in three steps.
    #[test]
    fn a_static_call_trampoline_is_retargeted_and_keeps_its_signature() {
        let at = SITE + 0x400;
        let mut tramp = jmp(at, SITE + 0x80).to_vec();
        tramp.extend_from_slice(&SCT_SIGNATURE);
        let mut mem = std::collections::BTreeMap::from([(at, tramp)]);
        let next = jmp(at, SITE - 0x1000);
        assert_eq!(
            judge(&mut mem, at, &[0xcc]),
            Some(Mechanism::StaticCallTrampoline)
        );
        assert_eq!(
            judge(&mut mem, at + 1, &next[1..]),
            Some(Mechanism::StaticCallTrampoline)
        );
        assert_eq!(
            judge(&mut mem, at, &next[..1]),
            Some(Mechanism::StaticCallTrampoline)
        );
        assert_eq!(
            judge(&mut mem, at, &[0xc3]),
            Some(Mechanism::StaticCallTrampoline)
        );
        // Its signature is not the kernel's to rewrite, nor is a jump out of its text.
        assert_eq!(judge(&mut mem, at + 5, &[0x90]), None);
        assert_eq!(judge(&mut mem, at, &jmp(at, 0x1000)), None);
    }
}
