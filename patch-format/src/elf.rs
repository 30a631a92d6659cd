//! Reading linked ELF executables (the guest images): symbols, loaded bytes by
//! address, and the target identity.

use crate::model::TargetIdentity;
use object::{
    Object, ObjectSection, ObjectSegment, ObjectSymbol, SectionKind, SegmentFlags, SymbolKind,
};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

/// What a symbol names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SymKind {
    Func,
    Object,
    Other,
}

#[derive(Clone, Debug)]
pub(crate) struct Sym {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub kind: SymKind,
    pub global: bool,
    /// The symbol's section is writable (so its contents may differ at run time).
    pub writable: bool,
}

impl Sym {
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Why an ELF file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub struct ElfError {
    pub what: String,
    pub reason: String,
}

/// An allocated section (for naming addresses no symbol covers).
pub(crate) struct Section {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    pub writable: bool,
}

pub(crate) struct Segment<'a> {
    pub addr: u64,
    pub data: &'a [u8],
}

/// A linked executable: its symbols and its loaded (file-backed) bytes.
pub(crate) struct Image<'a> {
    /// Sorted by address (then name).
    pub syms: Vec<Sym>,
    /// `max_end[i]` = the largest `end()` among `syms[..=i]`: lets address
    /// look-ups scan backwards from a binary search and stop early.
    max_end: Vec<u64>,
    by_name: HashMap<String, Vec<usize>>,
    segments: Vec<Segment<'a>>,
    pub sections: Vec<Section>,
    pub build_id: Option<Vec<u8>>,
    pub text_sha256: [u8; 32],
}

impl<'a> Image<'a> {
    pub fn parse(what: &str, data: &'a [u8]) -> Result<Image<'a>, ElfError> {
        let err = |reason: String| ElfError {
            what: what.to_string(),
            reason,
        };
        let file =
            object::File::parse(data).map_err(|e| err(format!("not a readable ELF file: {e}")))?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(err(format!(
                "architecture {:?} is not supported (x86-64 only)",
                file.architecture()
            )));
        }
        if file.kind() != object::ObjectKind::Executable {
            return Err(err(format!(
                "is a {:?} file, expected a linked executable",
                file.kind()
            )));
        }
        let mut segments = Vec::new();
        let mut hasher = Sha256::new();
        for seg in file.segments() {
            let d = seg
                .data()
                .map_err(|e| err(format!("segment at {:#x}: {e}", seg.address())))?;
            if let SegmentFlags::Elf { p_flags, .. } = seg.flags()
                && p_flags.0 & object::elf::PF_X.0 != 0
            {
                hasher.update(d);
            }
            segments.push(Segment {
                addr: seg.address(),
                data: d,
            });
        }
        let build_id = file
            .build_id()
            .map_err(|e| err(format!("build-id note: {e}")))?
            .map(<[u8]>::to_vec);
        let mut sections = Vec::new();
        for sec in file.sections() {
            let object::SectionFlags::Elf { sh_flags, .. } = sec.flags() else {
                continue;
            };
            if sh_flags.0 & object::elf::SHF_ALLOC.0 == 0 || sec.size() == 0 {
                continue;
            }
            sections.push(Section {
                name: sec.name().unwrap_or("?").to_string(),
                addr: sec.address(),
                size: sec.size(),
                writable: sh_flags.0 & object::elf::SHF_WRITE.0 != 0,
            });
        }
        let mut syms = Vec::new();
        for s in file.symbols() {
            let kind = match s.kind() {
                SymbolKind::Text => SymKind::Func,
                SymbolKind::Data => SymKind::Object,
                SymbolKind::Unknown => SymKind::Other,
                _ => continue,
            };
            if s.is_undefined() {
                continue;
            }
            let Some(idx) = s.section_index() else {
                continue;
            };
            let Ok(name) = s.name() else { continue };
            if name.is_empty() {
                continue;
            }
            let writable = file
                .section_by_index(idx)
                .map(|sec| {
                    matches!(
                        sec.kind(),
                        SectionKind::Data | SectionKind::UninitializedData | SectionKind::Tls
                    ) || matches!(sec.flags(), object::SectionFlags::Elf { sh_flags, .. } if sh_flags.0 & object::elf::SHF_WRITE.0 != 0)
                })
                .unwrap_or(false);
            syms.push(Sym {
                name: name.to_string(),
                addr: s.address(),
                size: s.size(),
                kind,
                global: s.is_global(),
                writable,
            });
        }
        syms.sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, s) in syms.iter().enumerate() {
            by_name.entry(s.name.clone()).or_default().push(i);
        }
        let mut max_end = Vec::with_capacity(syms.len());
        let mut m = 0u64;
        for s in &syms {
            m = m.max(s.end().max(s.addr.saturating_add(1)));
            max_end.push(m);
        }
        Ok(Image {
            syms,
            max_end,
            by_name,
            segments,
            sections,
            build_id,
            text_sha256: hasher.finalize().into(),
        })
    }

    pub fn identity(&self, name: &str) -> TargetIdentity {
        TargetIdentity {
            name: name.to_string(),
            build_id: self.build_id.clone(),
            text_sha256: Some(self.text_sha256),
        }
    }

    /// The file-backed bytes at `[addr, addr + len)`, if one segment holds them all.
    pub fn read(&self, addr: u64, len: u64) -> Option<&'a [u8]> {
        self.segments.iter().find_map(|s| {
            let start = addr.checked_sub(s.addr)?;
            let end = start.checked_add(len)?;
            s.data
                .get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
        })
    }

    /// The allocated section containing `addr`.
    pub fn section_at(&self, addr: u64) -> Option<&Section> {
        self.sections
            .iter()
            .find(|s| s.addr <= addr && addr - s.addr < s.size)
    }

    /// All symbols with this name.
    pub fn named(&self, name: &str) -> Vec<&Sym> {
        self.by_name
            .get(name)
            .map(|v| v.iter().filter_map(|&i| self.syms.get(i)).collect())
            .unwrap_or_default()
    }

    /// The one symbol with this name, or why not.
    pub fn unique(&self, name: &str) -> Result<&Sym, String> {
        match self.named(name).as_slice() {
            [] => Err(format!("no symbol {name:?}")),
            [s] => Ok(s),
            many => Err(format!(
                "{} symbols are named {name:?}; the name is ambiguous",
                many.len()
            )),
        }
    }

    /// Function symbols (`STT_FUNC`, size > 0).
    pub fn functions(&self) -> impl Iterator<Item = &Sym> {
        self.syms
            .iter()
            .filter(|s| s.kind == SymKind::Func && s.size > 0)
    }

    /// Symbols that may contain `addr`: those starting at or before it whose
    /// range (or start, for unsized ones) could reach it.
    fn candidates(&self, addr: u64) -> impl Iterator<Item = &Sym> {
        let upto = self.syms.partition_point(|s| s.addr <= addr);
        (0..upto)
            .rev()
            .take_while(move |&i| self.max_end.get(i).is_some_and(|&e| e > addr))
            .filter_map(move |i| self.syms.get(i))
            .filter(move |s| {
                if s.size == 0 {
                    s.addr == addr
                } else {
                    addr < s.end()
                }
            })
    }

    /// The symbols that contain `addr` (sized symbols covering it, or unsized
    /// ones starting exactly there), best first: functions and objects before
    /// other symbols, sized before unsized, globals before locals, then by name.
    pub fn containing(&self, addr: u64) -> Vec<&Sym> {
        let mut v: Vec<&Sym> = self.candidates(addr).collect();
        v.sort_by(|a, b| {
            (a.kind == SymKind::Other, a.size == 0, !a.global, &a.name).cmp(&(
                b.kind == SymKind::Other,
                b.size == 0,
                !b.global,
                &b.name,
            ))
        });
        v
    }

    /// Whether `addr` is inside a sized function or data symbol, or an
    /// allocated section: used to tell absolute addresses from plain numbers in
    /// immediates (a heuristic: linked executables keep no relocations).
    pub fn is_address(&self, addr: u64) -> bool {
        self.candidates(addr)
            .any(|s| s.size > 0 && s.kind != SymKind::Other)
            || self.section_at(addr).is_some()
    }
}

/// A symbol of a guest image as the patch engine needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSymbol {
    pub name: String,
    pub addr: u64,
    pub size: u64,
    /// `STT_FUNC`: its bytes are code, so the engine may decode it.
    pub function: bool,
}

/// What the engine reads from the image a guest was booted from: its identity (to check a
/// patch targets this build) and its symbols (to resolve sites and relocations).
#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub identity: TargetIdentity,
    /// Sorted by address, then name.
    pub symbols: Vec<ImageSymbol>,
}

/// Reads the identity and symbols of a linked x86-64 executable.
pub fn read_image(name: &str, elf: &[u8]) -> Result<ImageInfo, ElfError> {
    let img = Image::parse(name, elf)?;
    let symbols = img
        .syms
        .iter()
        .map(|s| ImageSymbol {
            name: s.name.clone(),
            addr: s.addr,
            size: s.size,
            function: s.kind == SymKind::Func,
        })
        .collect();
    Ok(ImageInfo {
        identity: img.identity(name),
        symbols,
    })
}
