//! One compiled translation unit, as the differ and the linker read it: sections (bytes,
//! flags, relocations) and symbols, copied out of the ELF once so that the comparison and
//! the linking work on plain data.
//!
//! The kernel's units are compiled with `-ffunction-sections -fdata-sections` for the diff
//! (`docs/source-patches.md`), so most functions and variables have a section of their own,
//! but not all: `__init`, `noinstr` and other attributed code share named sections, so a
//! function is always its symbol's range, never a whole section.

use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionFlags,
    SymbolKind, SymbolSection,
};

/// What a section holds, as far as patching is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionClass {
    /// Allocated and executable.
    Text,
    /// Allocated, read-only, merged NUL-terminated strings (`.rodata.str1.1`).
    Strings,
    /// Allocated, read-only (`.rodata*`, constants).
    ReadOnly,
    /// Allocated and writable: variables (`.data*`, `.bss*`), per-CPU data included.
    Writable,
    /// Allocated tables the kernel reads at boot or run time (`__jump_table`, `__ex_table`,
    /// …) and anything else allocated.
    OtherAlloc,
    /// Not allocated (notes, `.discard.*` is allocated-but-dropped: see the linker).
    NotAlloc,
}

#[derive(Debug, Clone)]
pub struct Section {
    pub name: String,
    pub class: SectionClass,
    pub align: u64,
    /// File bytes (zeros for `SHT_NOBITS`).
    pub data: Vec<u8>,
    /// Sorted by offset.
    pub relocs: Vec<Reloc>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reloc {
    pub offset: u64,
    pub r_type: u32,
    /// Index into [`Unit::symbols`].
    pub symbol: usize,
    pub addend: i64,
    /// From the field to the end of its instruction (a PC-relative field in code counts from
    /// there: `cmpl $0, x(%rip)` ends one byte after its displacement); the field's width in
    /// code outside a function's instructions; 0 outside code (a table's or a variable's
    /// `.long x - .` points at `x` itself).
    pub to_next_ip: u8,
}

impl Reloc {
    /// The field's width in bytes, `None` for types the builder does not handle.
    pub fn width(&self) -> Option<u64> {
        match self.r_type {
            r::PC32 | r::PLT32 | r::ABS32 | r::ABS32S => Some(4),
            r::ABS64 | r::PC64 => Some(8),
            _ => None,
        }
    }

    pub fn is_pc_relative(&self) -> bool {
        matches!(self.r_type, r::PC32 | r::PLT32 | r::PC64)
    }

    /// Offset in the target symbol's section the field points at: the addend, plus the field
    /// width for PC-relative fields (exact unless an immediate follows the field).
    pub fn pointed(&self, unit: &Unit) -> i128 {
        let s = &unit.symbols[self.symbol];
        i128::from(s.value)
            + i128::from(self.addend)
            + if self.is_pc_relative() {
                i128::from(self.to_next_ip)
            } else {
                0
            }
    }
}

/// The x86-64 relocation types, as plain numbers.
pub mod r {
    pub const ABS64: u32 = object::elf::R_X86_64_64.0;
    pub const PC32: u32 = object::elf::R_X86_64_PC32.0;
    pub const PLT32: u32 = object::elf::R_X86_64_PLT32.0;
    pub const ABS32: u32 = object::elf::R_X86_64_32.0;
    pub const ABS32S: u32 = object::elf::R_X86_64_32S.0;
    pub const PC64: u32 = object::elf::R_X86_64_PC64.0;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymKind {
    Function,
    Object,
    Section,
    Other,
}

#[derive(Debug, Clone)]
pub struct Symbol {
    pub name: String,
    pub kind: SymKind,
    pub local: bool,
    /// Index into [`Unit::sections`], `None` when undefined (or absolute/common).
    pub section: Option<usize>,
    pub value: u64,
    pub size: u64,
}

impl Symbol {
    pub fn is_undefined(&self) -> bool {
        self.section.is_none() && self.kind != SymKind::Section
    }
}

/// One relocatable object.
#[derive(Debug, Clone)]
pub struct Unit {
    pub sections: Vec<Section>,
    pub symbols: Vec<Symbol>,
}

#[derive(Debug, thiserror::Error)]
#[error("{what}")]
pub struct ElfError {
    pub what: String,
}

impl Unit {
    /// Reads an x86-64 relocatable object.
    pub fn parse(bytes: &[u8]) -> Result<Unit, ElfError> {
        let err = |what: String| ElfError { what };
        let file = object::File::parse(bytes).map_err(|e| err(format!("not an ELF file: {e}")))?;
        if file.kind() != object::ObjectKind::Relocatable
            || file.architecture() != object::Architecture::X86_64
        {
            return Err(err(format!(
                "expected an x86-64 relocatable object, found {:?} {:?}",
                file.architecture(),
                file.kind()
            )));
        }
        // Sections by their ELF index (index 0 is the null section).
        let max_index = file.sections().map(|s| s.index().0).max().unwrap_or(0);
        let mut sections: Vec<Section> = (0..=max_index)
            .map(|_| Section {
                name: String::new(),
                class: SectionClass::NotAlloc,
                align: 1,
                data: Vec::new(),
                relocs: Vec::new(),
            })
            .collect();
        let mut symbols: Vec<Symbol> = Vec::new();
        let max_sym = file.symbols().map(|s| s.index().0).max().unwrap_or(0);
        symbols.resize(
            max_sym + 1,
            Symbol {
                name: String::new(),
                kind: SymKind::Other,
                local: true,
                section: None,
                value: 0,
                size: 0,
            },
        );
        for s in file.symbols() {
            let section = match s.section() {
                SymbolSection::Section(i) => Some(i.0),
                _ => None,
            };
            let kind = match s.kind() {
                SymbolKind::Text => SymKind::Function,
                SymbolKind::Data => SymKind::Object,
                SymbolKind::Section => SymKind::Section,
                _ => SymKind::Other,
            };
            symbols[s.index().0] = Symbol {
                name: s.name().unwrap_or("").to_string(),
                kind,
                local: s.is_local(),
                section,
                value: s.address(),
                size: s.size(),
            };
        }
        for sec in file.sections() {
            let name = sec.name().unwrap_or("").to_string();
            let SectionFlags::Elf { sh_flags, .. } = sec.flags() else {
                continue;
            };
            let f = sh_flags.0;
            let (alloc, write, exec, strings) = (
                f & object::elf::SHF_ALLOC.0 != 0,
                f & object::elf::SHF_WRITE.0 != 0,
                f & object::elf::SHF_EXECINSTR.0 != 0,
                f & object::elf::SHF_STRINGS.0 != 0,
            );
            let class = match (alloc, write, exec) {
                (false, _, _) => SectionClass::NotAlloc,
                (true, _, true) => SectionClass::Text,
                (true, true, false) if is_table(&name) => SectionClass::OtherAlloc,
                (true, true, false) => SectionClass::Writable,
                (true, false, false) if strings => SectionClass::Strings,
                (true, false, false) if name.starts_with(".rodata") => SectionClass::ReadOnly,
                (true, false, false) => SectionClass::OtherAlloc,
            };
            let data = if sec.kind() == object::SectionKind::UninitializedData {
                vec![0; usize::try_from(sec.size()).map_err(|e| err(e.to_string()))?]
            } else {
                sec.data()
                    .map_err(|e| err(format!("section {name}: {e}")))?
                    .to_vec()
            };
            let mut relocs = Vec::new();
            for (offset, r) in sec.relocations() {
                let RelocationFlags::Elf { r_type } = r.flags() else {
                    return Err(err(format!("{name}+{offset:#x}: not an ELF relocation")));
                };
                let RelocationTarget::Symbol(t) = r.target() else {
                    return Err(err(format!(
                        "{name}+{offset:#x}: relocation target is not a symbol"
                    )));
                };
                let r = Reloc {
                    offset,
                    r_type: r_type.0,
                    symbol: t.0,
                    addend: r.addend(),
                    to_next_ip: 0,
                };
                relocs.push(Reloc {
                    to_next_ip: if class == SectionClass::Text {
                        r.width().unwrap_or(4) as u8
                    } else {
                        0
                    },
                    ..r
                });
            }
            relocs.sort_by_key(|r| r.offset);
            sections[sec.index().0] = Section {
                name,
                class,
                align: sec.align().max(1),
                data,
                relocs,
            };
        }
        let mut unit = Unit { sections, symbols };
        unit.find_instruction_ends();
        Ok(unit)
    }

    /// Sets [`Reloc::to_next_ip`] of every relocation inside a function's instructions, by
    /// decoding each function once.
    fn find_instruction_ends(&mut self) {
        let funcs: Vec<(usize, u64, u64)> = self
            .symbols
            .iter()
            .filter(|s| s.kind == SymKind::Function && s.size > 0)
            .filter_map(|s| Some((s.section?, s.value, s.size)))
            .collect();
        for (sec, start, size) in funcs {
            let section = &mut self.sections[sec];
            if section.class != SectionClass::Text {
                continue;
            }
            let (Ok(a), Ok(b)) = (usize::try_from(start), usize::try_from(start + size)) else {
                continue;
            };
            let Some(bytes) = section.data.get(a..b) else {
                continue;
            };
            let mut decoder =
                iced_x86::Decoder::with_ip(64, bytes, start, iced_x86::DecoderOptions::NONE);
            let first = section.relocs.partition_point(|r| r.offset < start);
            let mut i = first;
            while decoder.can_decode() && i < section.relocs.len() {
                let ins = decoder.decode();
                let (ip, end) = (ins.ip(), ins.next_ip());
                while let Some(r) = section.relocs.get_mut(i) {
                    if r.offset >= end {
                        break;
                    }
                    if r.offset >= ip && !ins.is_invalid() {
                        r.to_next_ip = (end - r.offset) as u8;
                    }
                    i += 1;
                }
            }
        }
    }

    /// Defined functions with a size, by section and address.
    pub fn functions(&self) -> impl Iterator<Item = (usize, &Symbol)> {
        self.symbols.iter().enumerate().filter(|(_, s)| {
            s.kind == SymKind::Function && s.section.is_some() && s.size > 0 && !s.name.is_empty()
        })
    }

    /// Defined data objects.
    pub fn objects(&self) -> impl Iterator<Item = (usize, &Symbol)> {
        self.symbols
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == SymKind::Object && s.section.is_some() && !s.name.is_empty())
    }

    /// The defined function or object called `name`.
    pub fn defined(&self, name: &str) -> Option<usize> {
        self.symbols.iter().position(|s| {
            s.name == name
                && s.section.is_some()
                && matches!(s.kind, SymKind::Function | SymKind::Object | SymKind::Other)
        })
    }

    /// The bytes of a defined symbol.
    pub fn bytes_of(&self, sym: usize) -> Option<&[u8]> {
        let s = &self.symbols[sym];
        let sec = &self.sections[s.section?];
        let start = usize::try_from(s.value).ok()?;
        let end = start.checked_add(usize::try_from(s.size).ok()?)?;
        sec.data.get(start..end)
    }

    /// The relocations of a defined symbol's range, with offsets relative to its start.
    pub fn relocs_of(&self, sym: usize) -> Vec<Reloc> {
        let s = &self.symbols[sym];
        let Some(sec) = s.section else {
            return Vec::new();
        };
        let end = s.value.saturating_add(s.size);
        self.sections[sec]
            .relocs
            .iter()
            .filter(|r| r.offset >= s.value && r.offset < end)
            .map(|r| Reloc {
                offset: r.offset - s.value,
                ..*r
            })
            .collect()
    }

    /// The named function or object of section `sec` covering offset `at` (a sized symbol
    /// containing it, or one starting exactly there).
    pub fn symbol_at(&self, sec: usize, at: i128) -> Option<usize> {
        self.symbols
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                s.section == Some(sec)
                    && matches!(s.kind, SymKind::Function | SymKind::Object | SymKind::Other)
                    && !s.name.is_empty()
                    && !s.name.starts_with(".L")
            })
            .filter(|(_, s)| {
                let a = i128::from(s.value);
                at == a || (at > a && at < a + i128::from(s.size))
            })
            // Prefer a typed symbol (function, object) over a label (`STT_NOTYPE`, e.g. the
            // `.BTF_ids` sets), then a sized one; among equals, the first.
            .max_by_key(|(i, s)| (s.kind != SymKind::Other, s.size > 0, usize::MAX - *i))
            .map(|(i, _)| i)
    }
}

/// Writable sections the kernel treats as tables, not variables.
fn is_table(name: &str) -> bool {
    matches!(
        name,
        "__jump_table" | "__ex_table" | "__bug_table" | ".static_call_sites" | "__tracepoints"
    ) || name.starts_with(".discard")
}

/// A symbol name without GCC's numbered suffixes (`foo.isra.0` → `foo.isra`,
/// `__already_done.12` → `__already_done`), which change when unrelated code in the unit
/// changes; clone kinds (`.isra`, `.constprop`, `.part`, `.cold`) are kept.
pub fn normalized_name(name: &str) -> String {
    let joined = name
        .split('.')
        .enumerate()
        .filter(|(i, part)| *i == 0 || !part.chars().all(|c| c.is_ascii_digit()))
        .map(|(_, p)| p)
        .collect::<Vec<_>>()
        .join(".");
    // `__UNIQUE_ID_<what><counter>` (the kernel's `__COUNTER__`-made names, e.g. dynamic
    // debug descriptors): the counter moves with any code before it.
    match joined.strip_prefix("__UNIQUE_ID_") {
        Some(rest) => {
            let (head, tail) = rest.split_once('.').map_or((rest, ""), |(h, t)| (h, t));
            let head = head.trim_end_matches(|c: char| c.is_ascii_digit());
            if tail.is_empty() {
                format!("__UNIQUE_ID_{head}")
            } else {
                format!("__UNIQUE_ID_{head}.{tail}")
            }
        }
        None => joined,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_suffixes_are_dropped() {
        assert_eq!(normalized_name("foo.isra.0"), "foo.isra");
        assert_eq!(normalized_name("__already_done.12"), "__already_done");
        assert_eq!(
            normalized_name("foo.constprop.0.isra.0"),
            "foo.constprop.isra"
        );
        assert_eq!(normalized_name("foo.cold"), "foo.cold");
        assert_eq!(normalized_name("plain"), "plain");
        assert_eq!(
            normalized_name("__UNIQUE_ID_ddebug398.5"),
            "__UNIQUE_ID_ddebug"
        );
        assert_eq!(
            normalized_name("__UNIQUE_ID___addressable_x421"),
            "__UNIQUE_ID___addressable_x"
        );
    }
}
