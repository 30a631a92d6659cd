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
        Ok(KernelTextSites { sites, init })
    }

    /// From a list of sites (tests, and kernels whose tables were read elsewhere).
    pub fn from_sites(mut sites: Vec<TextSite>) -> KernelTextSites {
        sites.sort_unstable();
        KernelTextSites { sites, init: None }
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
