//! Which caller-saved registers a function may change, as GCC's interprocedural register
//! allocation (`-fipa-ra`, on at `-O2`) sees it.
//!
//! When GCC compiles a call to a function of the same unit that it has already compiled, it
//! uses that function's real clobber set instead of the ABI's: the caller may keep a value in
//! `%rcx` across the call if the callee never writes `%rcx`. A live patch replaces the callee
//! but not the callers that did not change: if the new callee writes a register the old one did
//! not, such a caller loses a live value. So for every replaced function with callers in its
//! unit that the patch does not replace, the new clobber set must be within the old one
//! (`docs/source-patches.md` §4).

use std::collections::BTreeMap;

use iced_x86::{Decoder, DecoderOptions, FlowControl, InstructionInfoFactory, OpAccess, Register};

use crate::elf::{SymKind, Unit};

/// A set of the nine caller-saved general registers (bit i: [`CALLER_SAVED`]\[i]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegSet(pub u16);

/// `%rax %rcx %rdx %rsi %rdi %r8 %r9 %r10 %r11`.
pub const CALLER_SAVED: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

impl RegSet {
    pub const ALL: RegSet = RegSet((1 << 9) - 1);

    fn add(&mut self, r: Register) {
        let full = r.full_register();
        if let Some(i) = CALLER_SAVED.iter().position(|c| *c == full) {
            self.0 |= 1 << i;
        }
    }

    pub fn is_subset_of(self, other: RegSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// The registers in `self` and not in `other`, by name.
    pub fn minus(self, other: RegSet) -> Vec<String> {
        CALLER_SAVED
            .iter()
            .enumerate()
            .filter(|(i, _)| (self.0 & !other.0) & (1 << i) != 0)
            .map(|(_, r)| format!("%{r:?}").to_lowercase())
            .collect()
    }
}

/// Symbols a call or jump may go to without clobbering anything the caller keeps: the
/// profiling hook (saves everything) and the return thunk (a `jmp` to it is the return).
fn transparent(name: &str) -> bool {
    matches!(name, "__fentry__" | "__x86_return_thunk")
}

/// The clobber sets of a unit's functions, computed on demand.
pub struct Clobbers<'u> {
    unit: &'u Unit,
    memo: BTreeMap<usize, RegSet>,
}

impl<'u> Clobbers<'u> {
    pub fn new(unit: &'u Unit) -> Self {
        Clobbers {
            unit,
            memo: BTreeMap::new(),
        }
    }

    /// What function `sym` (an index into the unit's symbols) may clobber, its callees in the
    /// unit included; anything it calls outside the unit, or indirectly, clobbers everything.
    pub fn of(&mut self, sym: usize) -> RegSet {
        if let Some(s) = self.memo.get(&sym) {
            return *s;
        }
        // A cycle resolves to everything: conservative.
        self.memo.insert(sym, RegSet::ALL);
        let (set, callees) = self.direct(sym);
        let mut set = set;
        for c in callees {
            if set == RegSet::ALL {
                break;
            }
            set.0 |= self.of(c).0;
        }
        self.memo.insert(sym, set);
        set
    }

    /// The registers `sym`'s own instructions write, and the unit's functions it calls or
    /// jumps to (`ALL` already for anything unknown).
    fn direct(&self, sym: usize) -> (RegSet, Vec<usize>) {
        let u = self.unit;
        let Some(bytes) = u.bytes_of(sym) else {
            return (RegSet::ALL, Vec::new());
        };
        let relocs = u.relocs_of(sym);
        let mut set = RegSet::default();
        let mut callees = Vec::new();
        let mut decoder = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
        let mut info = InstructionInfoFactory::new();
        while decoder.can_decode() {
            let ins = decoder.decode();
            if ins.is_invalid() {
                // Data in text or a `ud2` sequence: assume the worst.
                return (RegSet::ALL, Vec::new());
            }
            for r in info.info(&ins).used_registers() {
                if matches!(
                    r.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                ) {
                    set.add(r.register());
                }
            }
            let flow = ins.flow_control();
            if matches!(
                flow,
                FlowControl::Call | FlowControl::IndirectCall | FlowControl::IndirectBranch
            ) || (matches!(
                flow,
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
            )) {
                let (start, end) = (ins.ip(), ins.next_ip());
                let target = relocs
                    .iter()
                    .find(|r| r.offset >= start && r.offset < end)
                    .map(|r| {
                        let s = &u.symbols[r.symbol];
                        if s.kind == SymKind::Section {
                            s.section
                                .and_then(|sec| u.symbol_at(sec, r.pointed(u)))
                                .unwrap_or(r.symbol)
                        } else {
                            r.symbol
                        }
                    });
                match (flow, target) {
                    // A branch inside the function (no relocation): nothing called.
                    (FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch, None) => {}
                    (FlowControl::IndirectCall | FlowControl::IndirectBranch, _) => {
                        return (RegSet::ALL, Vec::new());
                    }
                    (_, Some(t)) if transparent(&u.symbols[t].name) => {}
                    (_, Some(t))
                        if u.symbols[t].kind == SymKind::Function
                            && u.symbols[t].section.is_some() =>
                    {
                        if t != sym {
                            callees.push(t);
                        }
                    }
                    // Anything else: outside the unit, or unknown.
                    _ => return (RegSet::ALL, Vec::new()),
                }
            }
        }
        (set, callees)
    }
}

/// The unit's functions that call or jump to `sym` (a direct reference from their code).
pub fn callers_in_unit(unit: &Unit, sym: usize) -> Vec<usize> {
    unit.functions()
        .filter(|(i, _)| *i != sym)
        .filter(|(i, _)| {
            unit.relocs_of(*i).iter().any(|r| {
                let s = &unit.symbols[r.symbol];
                let t = if s.kind == SymKind::Section {
                    s.section
                        .and_then(|sec| unit.symbol_at(sec, r.pointed(unit)))
                } else {
                    Some(r.symbol)
                };
                t == Some(sym)
            })
        })
        .map(|(i, _)| i)
        .collect()
}
