//! Building a patch by hand: a TOML manifest names the target symbols and an
//! ELF relocatable object (`.o`) holds the new code.
//!
//! ```toml
//! name = "fix-compute"
//! description = "Bounds check in compute"
//! author = "Jane Doe <jane@example.org>"
//! advisories = ["CVE-2026-0001"]
//! replaces = []                 # patch ids (hex) this one supersedes
//! created = 1700000000          # optional; else the builder's default
//! object = "fix.o"              # relative to the manifest's directory
//!
//! [target]
//! elf = "guest-v1.elf"          # identity and expected bytes come from here
//! name = "test-guest v1"        # optional; default: the file name
//!
//! [[site]]
//! kind = "function"
//! target = "compute"            # or "compute+0x10", or "0x101234"
//! code = "compute_fixed"        # symbol in the object
//!
//! [[site]]
//! kind = "micropatch"
//! at = "triangle+0x12"          # an instruction boundary
//! code = "triangle_check"
//! ```

use crate::build::{BuildError, BuildOutput, BuildReport, PatchInfo, metadata};
use crate::elf::{Image, Sym, SymKind};
use crate::model::*;
use crate::x86::decode_all;
use object::{
    Object, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SymbolKind,
    SymbolSection,
};
use serde::Deserialize;
use std::path::Path;

/// A parsed manifest file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub advisories: Vec<String>,
    #[serde(default)]
    pub replaces: Vec<String>,
    pub created: Option<u64>,
    /// Path of the relocatable object with the new code.
    pub object: String,
    pub target: ManifestTarget,
    #[serde(rename = "site", default)]
    pub sites: Vec<ManifestSite>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManifestTarget {
    /// Path of the guest image the patch applies to.
    pub elf: String,
    pub name: Option<String>,
}

#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManifestSite {
    /// `"function"` or `"micropatch"`.
    pub kind: String,
    /// Function sites: what to replace.
    pub target: Option<String>,
    /// Micropatch sites: where to insert.
    pub at: Option<String>,
    /// Symbol in the object holding the new code.
    pub code: String,
}

impl Manifest {
    pub fn parse(text: &str) -> Result<Manifest, BuildError> {
        toml::from_str(text).map_err(|e| BuildError::Manifest(e.to_string()))
    }
}

/// Parses `name`, `name+0x12`, `name+18` or an address `0x101234`.
pub fn parse_location(s: &str) -> Result<Location, String> {
    let s = s.trim();
    let num = |t: &str| -> Result<u64, String> {
        let t = t.trim();
        let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
            Some(h) => u64::from_str_radix(h, 16),
            None => t.parse::<u64>(),
        };
        r.map_err(|_| format!("{t:?} is not a number (use decimal or 0x hex)"))
    };
    if s.is_empty() {
        return Err("empty location".into());
    }
    if s.starts_with("0x") || s.starts_with("0X") {
        return Ok(Location::Address(num(s)?));
    }
    match s.split_once('+') {
        Some((name, off)) if !name.trim().is_empty() => Ok(Location::Symbol {
            name: name.trim().to_string(),
            offset: num(off)?,
        }),
        Some(_) => Err(format!("{s:?}: missing symbol name before '+'")),
        None => Ok(Location::Symbol {
            name: s.to_string(),
            offset: 0,
        }),
    }
}

/// Reads the manifest and the files it names (relative to its directory) and
/// builds the patch. `created` is used when the manifest has no `created`.
pub fn build_from_manifest_file(path: &Path, created: u64) -> Result<BuildOutput, BuildError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| BuildError::Manifest(format!("{}: {e}", path.display())))?;
    let m = Manifest::parse(&text)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let read = |p: &str| {
        let full = dir.join(p);
        std::fs::read(&full).map_err(|e| BuildError::Manifest(format!("{}: {e}", full.display())))
    };
    let target = read(&m.target.elf)?;
    let object = read(&m.object)?;
    build_from_manifest(&m, &target, &object, created)
}

/// Builds the patch from a parsed manifest, the target image and the object.
pub fn build_from_manifest(
    m: &Manifest,
    target_elf: &[u8],
    object_file: &[u8],
    created: u64,
) -> Result<BuildOutput, BuildError> {
    let img = Image::parse(&format!("target {}", m.target.elf), target_elf)?;
    let obj = parse_object(object_file)
        .map_err(|reason| BuildError::Manifest(format!("object {}: {reason}", m.object)))?;
    let mut data = DataSections::default();
    let mut replaces = Vec::new();
    for r in &m.replaces {
        replaces.push(PatchId::from_hex(r).ok_or_else(|| {
            BuildError::Manifest(format!("replaces: {r:?} is not a patch id (64 hex digits)"))
        })?);
    }
    let default_name = Path::new(&m.target.elf)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| m.target.elf.clone());
    let info = PatchInfo {
        meta: Metadata {
            name: m.name.clone(),
            description: m.description.clone(),
            author: m.author.clone(),
            created: m.created.unwrap_or(created),
            advisories: m.advisories.clone(),
            replaces,
        },
        target_name: Some(m.target.name.clone().unwrap_or(default_name)),
    };
    let mut report = BuildReport::default();
    let mut sites: Vec<Site> = Vec::new();
    for (i, ms) in m.sites.iter().enumerate() {
        let label = format!("[[site]] {} ({})", i + 1, ms.code);
        let fail = |reason: String| BuildError::Site {
            site: label.clone(),
            reason,
        };
        let (kind, loc_text) = match (ms.kind.as_str(), &ms.target, &ms.at) {
            ("function", Some(t), None) => (SiteKind::Function, t),
            ("micropatch", None, Some(a)) => (SiteKind::Micropatch, a),
            ("function", _, _) => {
                return Err(fail(
                    "kind = \"function\" needs `target = \"symbol\"` (and no `at`)".into(),
                ));
            }
            ("micropatch", _, _) => {
                return Err(fail(
                    "kind = \"micropatch\" needs `at = \"symbol+offset\"` (and no `target`)".into(),
                ));
            }
            (k, _, _) => {
                return Err(fail(format!(
                    "kind {k:?} is not \"function\" or \"micropatch\""
                )));
            }
        };
        let loc = parse_location(loc_text).map_err(&fail)?;
        let addr = match &loc {
            Location::Address(a) => *a,
            Location::Symbol { name, offset } => {
                let s = img.unique(name).map_err(|e| fail(format!("target: {e}")))?;
                s.addr
                    .checked_add(*offset)
                    .ok_or_else(|| fail("target address overflows".into()))?
            }
        };
        let func = img
            .containing(addr)
            .into_iter()
            .find(|s| s.kind == SymKind::Func && s.size > 0)
            .cloned()
            .ok_or_else(|| {
                fail(format!(
                    "{loc} ({addr:#x}) is not inside a function of the target"
                ))
            })?;
        let expected = match kind {
            SiteKind::Function => {
                // From the target to the end of its function: the whole function
                // when the target is its entry.
                img.read(addr, func.end() - addr)
                    .ok_or_else(|| fail(format!("no file bytes at {addr:#x} in the target")))?
                    .to_vec()
            }
            SiteKind::Micropatch => displaced_bytes(&img, &func, addr).map_err(&fail)?,
        };
        let (code, relocations) = object_code(&obj, &ms.code, &mut data).map_err(&fail)?;
        for name in relocations.iter().filter_map(Relocation::symbol_name) {
            img.unique(name)
                .map_err(|e| fail(format!("relocation against {name:?}: the target has {e}")))?;
        }
        if kind == SiteKind::Micropatch
            && let Ok(insns) = decode_all(&code, 0, &|_| false)
            && insns
                .last()
                .is_some_and(|i| i.instr.flow_control() == iced_x86::FlowControl::Return)
        {
            report.warnings.push(format!(
                "{label}: micropatch code ends in `ret`; micropatch code runs inline and falls through to the displaced instructions (write it in assembly)"
            ));
        }
        if let Some(prev) = sites.iter().find(|s| s.target == loc) {
            return Err(fail(format!(
                "another site already targets {}",
                prev.target
            )));
        }
        report.changed.push(loc.to_string());
        sites.push(Site {
            kind,
            target: loc,
            expected,
            code,
            relocations,
        });
    }
    let mut patch = Patch {
        meta: metadata(&info),
        target: img.identity(info.target_name.as_deref().unwrap_or("guest")),
        sites,
        data: data.blocks,
    };
    patch.normalize();
    patch.validate()?;
    Ok(BuildOutput { patch, report })
}

/// A symbol's code, its relocations, and the data blocks the relocations index.
pub type ObjectCode = (Vec<u8>, Vec<Relocation>, Vec<DataBlock>);

/// The code of `symbol` in an x86-64 relocatable object (`.o`), its relocations made symbolic
/// and the read-only data it uses: [`PatchObject::code`] for a single symbol. The relocations
/// index the returned data blocks.
pub fn code_from_object(object_file: &[u8], symbol: &str) -> Result<ObjectCode, BuildError> {
    let fail = |reason: String| BuildError::Function {
        function: symbol.to_string(),
        reason,
    };
    let obj = parse_object(object_file).map_err(|reason| fail(format!("object: {reason}")))?;
    let mut data = DataSections::default();
    let (code, relocations) = object_code(&obj, symbol, &mut data).map_err(fail)?;
    Ok((code, relocations, data.blocks))
}

/// An x86-64 relocatable object (`.o`) that a patch's site code comes from, symbol by symbol,
/// collecting the read-only data the code uses into the patch's data blocks (format version
/// 2): what a manifest's `code = "symbol"` takes, for builders that find their targets
/// elsewhere (e.g. a Linux kernel's own symbol table).
///
/// For each [`PatchObject::code`]:
/// - The bytes are the symbol's (`st_size`; an unsized symbol, such as an assembly label,
///   extends to the next symbol of its section or the section's end).
/// - Relocations against undefined symbols become [`Relocation`]s against guest symbols
///   (sorted by offset) with their fields zeroed: `R_X86_64_PC32`/`PLT32` → rel32,
///   `R_X86_64_64` → abs64, `R_X86_64_32` → abs32, `R_X86_64_32S` → abs32s. GOT-relative and
///   other types are refused.
/// - PC-relative references into the symbol's own code are resolved here.
/// - References into a read-only data section of the object (`.rodata`, `.rodata.str1.1`,
///   `.rodata.cst8`, ...: string literals, `const` arrays) become relocations against a data
///   block holding that whole section, with its alignment; each section becomes one block,
///   numbered in the order first referenced, shared by every site of the patch. A data section
///   that itself holds relocations (a table of pointers) is refused: data blocks are copied
///   as they are, never relocated.
/// - References to writable data (`.data`, `.bss`: variables) are refused: a patch has no
///   per-patch writable state (nothing would keep it across a revert or a replacement, and the
///   arena is mapped for code); so are references to other functions of the object.
///
/// It does not check that the relocation symbols exist in the target: the caller knows the
/// target. Errors are [`BuildError::Function`] naming the symbol.
pub struct PatchObject<'a> {
    obj: object::File<'a>,
    data: DataSections,
}

impl<'a> PatchObject<'a> {
    /// Parses `object_file`, which must be an x86-64 relocatable object.
    pub fn parse(object_file: &'a [u8]) -> Result<PatchObject<'a>, BuildError> {
        let obj = parse_object(object_file).map_err(BuildError::Object)?;
        Ok(PatchObject {
            obj,
            data: DataSections::default(),
        })
    }

    /// The code of `symbol` and its relocations; the data it uses joins [`PatchObject::data`].
    pub fn code(&mut self, symbol: &str) -> Result<(Vec<u8>, Vec<Relocation>), BuildError> {
        object_code(&self.obj, symbol, &mut self.data).map_err(|reason| BuildError::Function {
            function: symbol.to_string(),
            reason,
        })
    }

    /// The data blocks the code taken so far uses, as [`Patch::data`] takes them.
    pub fn data(&self) -> &[DataBlock] {
        &self.data.blocks
    }

    /// The data blocks, for the patch.
    pub fn into_data(self) -> Vec<DataBlock> {
        self.data.blocks
    }
}

/// Read-only data of one object collected into a patch's data blocks: block `i` is the range
/// `ranges[i]` (section, start, length) of the object: a sized data symbol (a `const` array or
/// string) when one covers what the code refers to, else the whole section (string literals
/// in `.rodata.str1.1`, unnamed constants).
#[derive(Debug, Default)]
struct DataSections {
    blocks: Vec<DataBlock>,
    ranges: Vec<(object::SectionIndex, u64, u64)>,
}

impl DataSections {
    /// The block holding offset `at` of read-only section `sec` (added on first use) and the
    /// block's start in the section, or why that data cannot be carried.
    fn block_of(
        &mut self,
        obj: &object::File<'_>,
        sec: &object::Section<'_, '_>,
        at: i128,
    ) -> Result<(u32, u64), String> {
        let name = sec.name().unwrap_or("?");
        let whole = sec.data().map_err(|e| format!("section {name}: {e}"))?;
        // A sized object symbol of the section covering `at`, else the whole section.
        let (start, len) = obj
            .symbols()
            .filter(|s| s.section() == SymbolSection::Section(sec.index()))
            .filter(|s| s.kind() == SymbolKind::Data && s.size() > 0)
            .map(|s| (s.address(), s.size()))
            .find(|(a, n)| (i128::from(*a)..i128::from(*a) + i128::from(*n)).contains(&at))
            .unwrap_or((0, whole.len() as u64));
        if let Some(i) = self
            .ranges
            .iter()
            .position(|r| *r == (sec.index(), start, len))
        {
            return Ok((u32::try_from(i).map_err(|e| e.to_string())?, start));
        }
        let end = start.saturating_add(len);
        if sec
            .relocations()
            .any(|(off, _)| off < end && off.saturating_add(8) > start)
        {
            return Err(format!(
                "{name}+{start:#x}..{end:#x} holds addresses (relocations: a table of \
                 pointers or a jump table); a patch's data blocks are copied as they are, never \
                 relocated: keep only plain constants and string literals in read-only data \
                 (compile with -fno-jump-tables)"
            ));
        }
        let bytes = usize::try_from(start)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(a, b)| whole.get(a..b))
            .ok_or_else(|| format!("{name}+{start:#x}..{end:#x} is outside the section's data"))?
            .to_vec();
        if bytes.is_empty() {
            return Err(format!("section {name} holds no bytes in the object"));
        }
        if bytes.len() > limits::MAX_DATA {
            return Err(format!(
                "{name}+{start:#x} is {} bytes, over the format's {}-byte limit for a data block",
                bytes.len(),
                limits::MAX_DATA
            ));
        }
        // A symbol inside the section is aligned as far as both its offset and the section's
        // alignment allow.
        let sec_align = sec.align().max(1);
        let align = if start == 0 {
            sec_align
        } else {
            sec_align.min(1 << start.trailing_zeros())
        };
        let align = u32::try_from(align)
            .ok()
            .filter(|a| a.is_power_of_two() && *a <= limits::MAX_DATA_ALIGN)
            .ok_or_else(|| {
                format!(
                    "section {name} asks for alignment {}; data blocks are aligned to a power of \
                     two up to {}",
                    sec.align(),
                    limits::MAX_DATA_ALIGN
                )
            })?;
        if self.blocks.len() >= limits::MAX_DATA_BLOCKS {
            return Err(format!(
                "more than {} read-only data blocks referenced",
                limits::MAX_DATA_BLOCKS
            ));
        }
        self.blocks.push(DataBlock { align, bytes });
        self.ranges.push((sec.index(), start, len));
        Ok((
            u32::try_from(self.blocks.len() - 1).map_err(|e| e.to_string())?,
            start,
        ))
    }
}

/// What kind of memory a section of the object is, for a reference from patch code into it.
enum SectionUse {
    /// Allocated, neither writable nor executable: `.rodata*`.
    ReadOnly,
    /// Allocated and writable: `.data*`, `.bss*`.
    Writable,
    /// Anything else (code, non-allocated sections).
    Other,
}

fn section_use(sec: &object::Section<'_, '_>) -> SectionUse {
    use object::SectionKind as K;
    match sec.kind() {
        K::ReadOnlyData | K::ReadOnlyString
            if sec.name().is_ok_and(|n| n.starts_with(".rodata")) =>
        {
            SectionUse::ReadOnly
        }
        K::Data | K::UninitializedData | K::Tls | K::UninitializedTls => SectionUse::Writable,
        _ => SectionUse::Other,
    }
}

/// Parses `object_file`, checking that it is an x86-64 relocatable object.
fn parse_object(object_file: &[u8]) -> Result<object::File<'_>, String> {
    let obj =
        object::File::parse(object_file).map_err(|e| format!("not a readable ELF file: {e}"))?;
    if obj.kind() != object::ObjectKind::Relocatable
        || obj.architecture() != object::Architecture::X86_64
    {
        return Err(format!(
            "expected an x86-64 relocatable object (.o), found {:?} {:?}",
            obj.architecture(),
            obj.kind()
        ));
    }
    Ok(obj)
}

/// The whole instructions at `addr` covering at least 5 bytes (the size of a
/// `jmp rel32`), checking that `addr` is an instruction boundary of `func`.
fn displaced_bytes(img: &Image<'_>, func: &Sym, addr: u64) -> Result<Vec<u8>, String> {
    let bytes = img
        .read(func.addr, func.size)
        .ok_or_else(|| format!("no file bytes for {} in the target", func.name))?;
    let insns = decode_all(bytes, func.addr, &|_| false).map_err(|off| {
        format!(
            "{} does not decode at +{off:#x}; cannot find instruction boundaries",
            func.name
        )
    })?;
    let first = insns.iter().position(|i| i.ip == addr).ok_or_else(|| {
        format!(
            "{}+{:#x} is not an instruction boundary of {}",
            func.name,
            addr - func.addr,
            func.name
        )
    })?;
    let mut end = addr;
    for i in &insns[first..] {
        if end - addr >= 5 {
            break;
        }
        end = i.ip + i.len as u64;
    }
    if end - addr < 5 {
        return Err(format!(
            "fewer than 5 bytes of whole instructions from {}+{:#x} to the end of the function; no room for a jump",
            func.name,
            addr - func.addr
        ));
    }
    let start = (addr - func.addr) as usize;
    bytes
        .get(start..(end - func.addr) as usize)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| "displaced range outside the function".into())
}

/// The bytes of symbol `name` in the object and its relocations made symbolic; read-only data
/// it refers to joins `rodata`.
fn object_code(
    obj: &object::File<'_>,
    name: &str,
    rodata: &mut DataSections,
) -> Result<(Vec<u8>, Vec<Relocation>), String> {
    let sym = obj
        .symbols()
        .find(|s| s.name() == Ok(name) && !s.is_undefined())
        .ok_or_else(|| format!("code: the object defines no symbol {name:?}"))?;
    let SymbolSection::Section(sec_idx) = sym.section() else {
        return Err(format!("code: symbol {name:?} is not in a section"));
    };
    let sec = obj
        .section_by_index(sec_idx)
        .map_err(|e| format!("code: section of {name:?}: {e}"))?;
    let data = sec
        .data()
        .map_err(|e| format!("code: section {:?}: {e}", sec.name().unwrap_or("?")))?;
    let start = sym.address();
    let size = if sym.size() > 0 {
        sym.size()
    } else {
        // Unsized (assembly label): up to the next symbol in the section or its end.
        obj.symbols()
            .filter(|s| s.section() == SymbolSection::Section(sec_idx) && s.address() > start)
            .filter(|s| {
                matches!(
                    s.kind(),
                    SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
                )
            })
            .map(|s| s.address())
            .min()
            .unwrap_or(data.len() as u64)
            .saturating_sub(start)
    };
    let end = start.saturating_add(size);
    let mut code = usize::try_from(start)
        .ok()
        .zip(usize::try_from(end).ok())
        .and_then(|(a, b)| data.get(a..b))
        .ok_or_else(|| format!("code: {name:?} lies outside its section's data"))?
        .to_vec();
    if code.is_empty() {
        return Err(format!("code: {name:?} is empty"));
    }
    let mut relocs = Vec::new();
    for (off, r) in sec.relocations() {
        if off < start || off >= end {
            continue;
        }
        let field = off - start;
        let RelocationFlags::Elf { r_type } = r.flags() else {
            return Err(format!("relocation at +{field:#x}: not an ELF relocation"));
        };
        use object::elf::{
            R_X86_64_32, R_X86_64_32S, R_X86_64_64, R_X86_64_GOTPCREL, R_X86_64_GOTPCRELX,
            R_X86_64_PC32, R_X86_64_PLT32, R_X86_64_REX_GOTPCRELX,
        };
        let kind = match r_type {
            R_X86_64_PC32 | R_X86_64_PLT32 => RelocKind::Rel32,
            R_X86_64_64 => RelocKind::Abs64,
            R_X86_64_32 => RelocKind::Abs32,
            R_X86_64_32S => RelocKind::Abs32S,
            R_X86_64_GOTPCREL | R_X86_64_GOTPCRELX | R_X86_64_REX_GOTPCRELX => {
                return Err(format!(
                    "relocation at +{field:#x}: GOT-relative relocation (type {r_type}); compile without PIC (gcc -fno-pic, rustc -C relocation-model=static)"
                ));
            }
            other => {
                return Err(format!(
                    "relocation at +{field:#x}: type {other} is not supported (only R_X86_64_PC32/PLT32/64/32/32S)"
                ));
            }
        };
        if field + kind.width() as u64 > size {
            return Err(format!(
                "relocation at +{field:#x} runs past the end of {name:?}"
            ));
        }
        let RelocationTarget::Symbol(tidx) = r.target() else {
            return Err(format!("relocation at +{field:#x}: target is not a symbol"));
        };
        let t = obj
            .symbol_by_index(tidx)
            .map_err(|e| format!("relocation at +{field:#x}: {e}"))?;
        let addend = r.addend();
        let fstart = field as usize;
        let fend = fstart + kind.width();
        if t.is_undefined() {
            let tname = t
                .name()
                .map_err(|e| format!("relocation at +{field:#x}: symbol name: {e}"))?;
            relocs.push(Relocation::symbol(
                u32::try_from(field).map_err(|e| e.to_string())?,
                kind,
                tname,
                addend,
            ));
            if let Some(f) = code.get_mut(fstart..fend) {
                f.fill(0);
            }
            continue;
        }
        // Defined in the object: only references into the code itself can be
        // kept, and only position-independent (PC-relative) ones.
        let same_section = t.section() == SymbolSection::Section(sec_idx);
        let t_addr = t.address() as i128 + i128::from(addend);
        let pc_target = t_addr + kind.width() as i128;
        let inside = same_section && (start as i128..=end as i128).contains(&pc_target);
        if !inside {
            // String literals are reached through their (unnamed) section symbol.
            let tsec = t.section_index().and_then(|i| obj.section_by_index(i).ok());
            let tname = match t.name() {
                Ok(n) if !n.is_empty() => format!("{n:?}"),
                _ => match &tsec {
                    Some(s) => format!("section {}", s.name().unwrap_or("?")),
                    None => "?".to_string(),
                },
            };
            let sec_name = tsec
                .as_ref()
                .map_or("?", |s| s.name().unwrap_or("?"))
                .to_string();
            match tsec.as_ref().map(|s| (s, section_use(s))) {
                Some((sec, SectionUse::ReadOnly)) => {
                    // What the code points at: for a PC-relative field, the symbol plus the
                    // addend plus the field's width (exact unless an immediate follows it).
                    let pointed = i128::from(t.address())
                        + i128::from(addend)
                        + if kind == RelocKind::Rel32 { 4 } else { 0 };
                    let (block, block_start) =
                        rodata.block_of(obj, sec, pointed).map_err(|why| {
                            format!("relocation at +{field:#x} refers to {tname}: {why}")
                        })?;
                    // S = the block, A = the symbol's offset in the block plus the ELF addend.
                    let addend = i64::try_from(i128::from(t.address()) - i128::from(block_start))
                        .ok()
                        .and_then(|a| a.checked_add(addend))
                        .ok_or_else(|| {
                            format!("relocation at +{field:#x}: offset into {sec_name} overflows")
                        })?;
                    relocs.push(Relocation {
                        offset: u32::try_from(field).map_err(|e| e.to_string())?,
                        kind,
                        target: RelocTarget::Data(block),
                        addend,
                    });
                    if let Some(f) = code.get_mut(fstart..fend) {
                        f.fill(0);
                    }
                    continue;
                }
                Some((_, SectionUse::Writable)) => {
                    return Err(format!(
                        "relocation at +{field:#x} refers to {tname} in writable section \
                         {sec_name} (a variable) defined in the object; a patch has no \
                         per-patch writable state yet (it carries read-only data only: nothing \
                         would keep a variable across a revert or a replacement): use the \
                         guest's own variables (declare them `extern`), the stack, or `const` \
                         data"
                    ));
                }
                _ => {
                    return Err(format!(
                        "relocation at +{field:#x} refers to {tname} defined in the object \
                         outside {name:?}; a site carries only its own code and read-only \
                         data: declare guest symbols `extern`, and make helper functions \
                         `static inline` so they are part of the code"
                    ));
                }
            }
        }
        if kind != RelocKind::Rel32 {
            return Err(format!(
                "relocation at +{field:#x}: absolute address of the patch code itself; the code must be position independent"
            ));
        }
        // S + A - P, all relative to the section: independent of placement.
        let v = i32::try_from(t_addr - off as i128)
            .map_err(|_| format!("relocation at +{field:#x}: internal displacement overflows"))?;
        if let Some(f) = code.get_mut(fstart..fend) {
            f.copy_from_slice(&v.to_le_bytes());
        }
    }
    relocs.sort_by_key(|r| r.offset);
    Ok((code, relocs))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gcc -c` of `source` into a fresh temporary directory; the object's bytes.
    fn compile(source: &str) -> Vec<u8> {
        let tmp = tempfile::Builder::new()
            .prefix("pf-code-from-object-")
            .tempdir()
            .unwrap();
        let dir = tmp.path();
        let (src, obj) = (dir.join("fix.c"), dir.join("fix.o"));
        std::fs::write(&src, source).unwrap();
        let out = std::process::Command::new("gcc")
            .args([
                "-c",
                "-O2",
                "-fno-pic",
                "-ffreestanding",
                "-fcf-protection=none",
            ])
            .args(["-fno-asynchronous-unwind-tables", "-o"])
            .arg(&obj)
            .arg(&src)
            .output()
            .expect("gcc (needed by this test) runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let bytes = std::fs::read(&obj).unwrap();
        tmp.close().unwrap();
        bytes
    }

    #[test]
    fn code_from_object_makes_relocations_symbolic_and_names_what_is_wrong() {
        let obj = compile(
            "extern int guest_helper(int);\n\
             int fixed(int x) { return guest_helper(x) + 1; }\n\
             static const char text[] = \"data\";\n\
             const char *uses_data(void) { return text; }\n\
             int counter;\n\
             int uses_variable(void) { return ++counter; }\n\
             static const char *const table[] = { \"a\", \"b\" };\n\
             const char *uses_pointers(int i) { return table[i]; }\n",
        );
        let (code, relocs, data) = code_from_object(&obj, "fixed").unwrap();
        assert!(!code.is_empty());
        assert!(data.is_empty(), "no data used: {data:?}");
        assert_eq!(relocs.len(), 1, "{relocs:?}");
        let r = &relocs[0];
        assert_eq!(
            (r.kind, r.symbol_name(), r.addend),
            (RelocKind::Rel32, Some("guest_helper"), -4)
        );
        let field = r.offset as usize..r.offset as usize + 4;
        assert_eq!(&code[field], &[0; 4], "relocation fields are zeroed");

        let missing = code_from_object(&obj, "nowhere").unwrap_err().to_string();
        assert!(
            missing.contains("nowhere") && missing.contains("defines no symbol"),
            "{missing}"
        );
        // Read-only data becomes a data block (the whole section) and a data relocation.
        let (code, relocs, data) = code_from_object(&obj, "uses_data").unwrap();
        let [block] = data.as_slice() else {
            panic!("one block: {data:?}");
        };
        let text_at = block
            .bytes
            .windows(5)
            .position(|w| w == b"data\0")
            .expect("the literal is in the block") as i64;
        let [r] = relocs.as_slice() else {
            panic!("one relocation: {relocs:?}");
        };
        assert_eq!(r.target, RelocTarget::Data(0));
        let pc_adjust = if r.kind == RelocKind::Rel32 { -4 } else { 0 };
        assert_eq!(r.addend, text_at + pc_adjust, "{r:?}");
        let field = r.offset as usize..r.offset as usize + r.kind.width();
        assert!(code[field].iter().all(|b| *b == 0));
        // Writable data: refused, saying why.
        let var = code_from_object(&obj, "uses_variable")
            .unwrap_err()
            .to_string();
        assert!(
            var.contains("writable") && var.contains("no per-patch writable state"),
            "{var}"
        );
        // Read-only data holding addresses: refused.
        let ptrs = code_from_object(&obj, "uses_pointers")
            .unwrap_err()
            .to_string();
        assert!(ptrs.contains("holds addresses"), "{ptrs}");
        let garbage = code_from_object(b"not an object", "fixed")
            .unwrap_err()
            .to_string();
        assert!(
            garbage.contains("fixed") && garbage.contains("not a readable ELF"),
            "{garbage}"
        );
    }
}
