//! Building patches: from two linked builds of the guest (`build_from_elfs`),
//! or from a hand-written manifest and a relocatable object (`manifest`).

use crate::elf::{ElfError, Image, Sym, SymKind};
use crate::model::*;
use crate::x86::{FieldKind, Insn, decode_all};
use std::collections::{BTreeMap, BTreeSet};

/// The descriptive part of a patch, supplied by whoever builds it: the metadata (advisories and
/// replaced ids in any order; the builder sorts and de-duplicates them) and the target's name.
#[derive(Clone, Debug, Default)]
pub struct PatchInfo {
    pub meta: Metadata,
    /// Name of the target image; defaults to a name the builder derives.
    pub target_name: Option<String>,
}

/// Why a patch could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("function {function}: {reason}")]
    Function { function: String, reason: String },
    #[error("--function {0}: no such function in both builds")]
    UnknownFunction(String),
    #[error("--function {0}: the function is the same in both builds (nothing to patch)")]
    Unchanged(String),
    #[error("no function differs between the two builds: nothing to patch")]
    NoChanges,
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("object: {0}")]
    Object(String),
    #[error("site {site}: {reason}")]
    Site { site: String, reason: String },
    #[error(transparent)]
    Invalid(#[from] crate::EncodeError),
}

/// What the builder found, for the operator to review.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct BuildReport {
    /// Functions that differ and got a site.
    pub changed: Vec<String>,
    /// Number of functions found identical (modulo moved addresses).
    pub unchanged: usize,
    /// Functions only in the new build (not patched; referencing them is an error).
    pub added: Vec<String>,
    /// Functions only in the old build.
    pub removed: Vec<String>,
    /// Things worth a look that did not stop the build.
    pub warnings: Vec<String>,
}

/// A built patch and the builder's findings.
#[derive(Clone, Debug)]
pub struct BuildOutput {
    pub patch: Patch,
    pub report: BuildReport,
}

/// An address field resolved to something comparable across builds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum SymTarget {
    /// Inside the function itself, as an offset from its start.
    Internal(u64),
    /// `symbol + offset` elsewhere.
    External { symbol: String, offset: u64 },
    /// A GOT slot (static links keep them for code compiled as PIC): compared
    /// by the symbol whose address the slot holds.
    GotSlot { symbol: String, offset: u64 },
    /// Unnamed data (string literals, constants): compared by section, offset in
    /// the section and, for read-only sections, the first bytes there. Equal
    /// across builds when the section's layout did not change around it.
    Anon {
        section: String,
        offset: u64,
        content: Vec<Word>,
    },
    /// Outside every section: only the raw address is known.
    Unresolved(u64),
}

/// How many bytes of unnamed read-only data are compared.
const ANON_COMPARE: u64 = 32;

/// An 8-byte word of unnamed read-only data: constants often hold pointers
/// (e.g. a panic location's file name), compared by what they point to.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Word {
    Raw(Vec<u8>),
    /// `section or symbol name`, offset.
    Addr(String, u64),
}

fn words(img: &Image<'_>, bytes: &[u8]) -> Vec<Word> {
    bytes
        .chunks(8)
        .map(|c| {
            let v = <[u8; 8]>::try_from(c).ok().map(u64::from_le_bytes);
            match v {
                Some(v) if v != 0 && img.is_address(v) => {
                    if let Some(s) = img.containing(v).first() {
                        Word::Addr(s.name.clone(), v - s.addr)
                    } else if let Some(sec) = img.section_at(v) {
                        Word::Addr(sec.name.clone(), v - sec.addr)
                    } else {
                        Word::Raw(c.to_vec())
                    }
                }
                _ => Word::Raw(c.to_vec()),
            }
        })
        .collect()
}

/// An instruction with its address fields masked out and their targets made symbolic.
#[derive(Clone, Debug, PartialEq, Eq)]
struct NormInsn {
    masked: Vec<u8>,
    targets: Vec<SymTarget>,
}

fn resolve_target(img: &Image<'_>, func: &Sym, target: u64) -> SymTarget {
    if func.addr <= target && target < func.end() {
        return SymTarget::Internal(target - func.addr);
    }
    if let Some(s) = img.containing(target).first() {
        return SymTarget::External {
            symbol: s.name.clone(),
            offset: target - s.addr,
        };
    }
    let Some(sec) = img.section_at(target) else {
        return SymTarget::Unresolved(target);
    };
    let offset = target - sec.addr;
    if sec.name == ".got" || sec.name == ".got.plt" {
        let slot = img
            .read(target, 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes);
        if let Some(value) = slot
            && let Some(s) = img.containing(value).first()
        {
            return SymTarget::GotSlot {
                symbol: s.name.clone(),
                offset: value - s.addr,
            };
        }
    }
    let content = if sec.writable {
        Vec::new()
    } else {
        let n = ANON_COMPARE.min(sec.size - offset);
        img.read(target, n)
            .map(|b| words(img, b))
            .unwrap_or_default()
    };
    SymTarget::Anon {
        section: sec.name.clone(),
        offset,
        content,
    }
}

/// A function decoded from an image.
struct Decoded<'a> {
    bytes: &'a [u8],
    insns: Result<Vec<Insn>, usize>,
}

fn decode_function<'a>(img: &Image<'a>, f: &Sym) -> Option<Decoded<'a>> {
    let bytes = img.read(f.addr, f.size)?;
    let insns = decode_all(bytes, f.addr, &|a| img.is_address(a));
    Some(Decoded { bytes, insns })
}

fn normalize(img: &Image<'_>, f: &Sym, d: &Decoded<'_>) -> Option<Vec<NormInsn>> {
    let insns = d.insns.as_ref().ok()?;
    let mut out = Vec::with_capacity(insns.len());
    for i in insns {
        let start = usize::try_from(i.ip - f.addr).ok()?;
        let mut masked = d.bytes.get(start..start + i.len)?.to_vec();
        let mut targets = Vec::new();
        for fld in &i.fields {
            for b in masked.iter_mut().skip(fld.offset).take(fld.width) {
                *b = 0;
            }
            targets.push(resolve_target(img, f, fld.target));
        }
        out.push(NormInsn { masked, targets });
    }
    Some(out)
}

/// Whether two versions of a function are the same modulo addresses that moved.
fn same_function(old: &Image<'_>, of: &Sym, new: &Image<'_>, nf: &Sym) -> bool {
    let (Some(od), Some(nd)) = (decode_function(old, of), decode_function(new, nf)) else {
        return false;
    };
    match (normalize(old, of, &od), normalize(new, nf, &nd)) {
        (Some(a), Some(b)) => a == b,
        // Undecodable code: only identical bytes at the identical address are the same.
        _ => od.bytes == nd.bytes && of.addr == nf.addr,
    }
}

/// Builds a patch replacing every function that differs between `old` and
/// `new` (or only those in `only`, which must all differ).
///
/// Each site's expected bytes are the whole old function; its code is the new
/// function with every reference outside itself (calls, jumps, RIP-relative and
/// absolute data references) turned into a symbolic relocation and the field
/// zeroed, so the code does not depend on where the new build placed things.
pub fn build_from_elfs(
    old_elf: &[u8],
    new_elf: &[u8],
    only: &[String],
    info: &PatchInfo,
) -> Result<BuildOutput, BuildError> {
    let old = Image::parse("OLD", old_elf)?;
    let new = Image::parse("NEW", new_elf)?;
    let Analysis {
        old_funcs,
        new_funcs,
        changed,
        mut report,
    } = analyze(&old, &new);
    let selected: Vec<String> = if only.is_empty() {
        changed.iter().cloned().collect()
    } else {
        let mut v = Vec::new();
        for name in only {
            if !(old_funcs.contains_key(name) && new_funcs.contains_key(name)) {
                return Err(BuildError::UnknownFunction(name.clone()));
            }
            if !changed.contains(name) {
                return Err(BuildError::Unchanged(name.clone()));
            }
            v.push(name.clone());
        }
        v.sort();
        v.dedup();
        v
    };
    if selected.is_empty() {
        return Err(BuildError::NoChanges);
    }

    let mut sites = Vec::new();
    for name in &selected {
        let (Some(of), Some(nf)) = (old_funcs.get(name), new_funcs.get(name)) else {
            return Err(BuildError::UnknownFunction(name.clone()));
        };
        if name.contains(".cold") || name.contains(".part.") {
            return Err(BuildError::Function {
                function: name.clone(),
                reason: "is a split-off part of another function (gcc .cold/.part); rebuild with -fno-reorder-blocks-and-partition -fno-partial-inlining".into(),
            });
        }
        let fail = |reason: String| BuildError::Function {
            function: name.clone(),
            reason,
        };
        let expected = old
            .read(of.addr, of.size)
            .ok_or_else(|| {
                fail(format!(
                    "OLD has no file bytes at {:#x}+{:#x}",
                    of.addr, of.size
                ))
            })?
            .to_vec();
        let code = function_code(&old, &new, nf, &changed, &mut report).map_err(|r| {
            if only.is_empty() {
                fail(format!(
                    "{r}\n(changed functions: {}; select the ones to patch with --function)",
                    selected.join(", ")
                ))
            } else {
                fail(r)
            }
        })?;
        sites.push(Site {
            kind: SiteKind::Function,
            target: Location::Symbol {
                name: name.clone(),
                offset: 0,
            },
            expected,
            code: code.0,
            relocations: code.1,
        });
    }
    report.changed = selected;

    let mut patch = Patch {
        meta: metadata(info),
        target: old.identity(info.target_name.as_deref().unwrap_or("guest")),
        sites,
        data: Vec::new(),
    };
    patch.normalize();
    patch.validate()?;
    Ok(BuildOutput { patch, report })
}

struct Analysis {
    old_funcs: BTreeMap<String, Sym>,
    new_funcs: BTreeMap<String, Sym>,
    changed: BTreeSet<String>,
    report: BuildReport,
}

/// Compares the two builds function by function.
fn analyze(old: &Image<'_>, new: &Image<'_>) -> Analysis {
    let mut report = BuildReport::default();

    // Functions by name, unique names only.
    let funcs = |img: &Image<'_>| -> (BTreeMap<String, Sym>, BTreeSet<String>) {
        let mut m: BTreeMap<String, Sym> = BTreeMap::new();
        let mut dup = BTreeSet::new();
        for f in img.functions() {
            if m.insert(f.name.clone(), f.clone()).is_some() {
                dup.insert(f.name.clone());
            }
        }
        for d in &dup {
            m.remove(d);
        }
        (m, dup)
    };
    let (old_funcs, old_dup) = funcs(old);
    let (new_funcs, new_dup) = funcs(new);
    for d in old_dup.union(&new_dup) {
        report.warnings.push(format!(
            "several functions are named {d:?}; they were not compared (patch them by address with a manifest)"
        ));
    }
    for name in new_funcs.keys() {
        if !old_funcs.contains_key(name) && !old_dup.contains(name) {
            report.added.push(name.clone());
        }
    }
    for name in old_funcs.keys() {
        if !new_funcs.contains_key(name) && !new_dup.contains(name) {
            report.removed.push(name.clone());
        }
    }

    let mut changed: BTreeSet<String> = BTreeSet::new();
    for (name, nf) in &new_funcs {
        let Some(of) = old_funcs.get(name) else {
            continue;
        };
        if same_function(old, of, new, nf) {
            report.unchanged += 1;
        } else {
            changed.insert(name.clone());
        }
    }

    Analysis {
        old_funcs,
        new_funcs,
        changed,
        report,
    }
}

/// Which functions differ between two builds (modulo moved addresses),
/// without building anything: `changed` lists them all.
pub fn diff_elfs(old_elf: &[u8], new_elf: &[u8]) -> Result<BuildReport, BuildError> {
    let old = Image::parse("OLD", old_elf)?;
    let new = Image::parse("NEW", new_elf)?;
    let mut a = analyze(&old, &new);
    a.report.changed = a.changed.into_iter().collect();
    Ok(a.report)
}

/// The metadata in canonical form: advisories and replaced ids sorted, without duplicates.
pub(crate) fn metadata(info: &PatchInfo) -> Metadata {
    let mut meta = info.meta.clone();
    meta.advisories.sort();
    meta.advisories.dedup();
    meta.replaces.sort();
    meta.replaces.dedup();
    meta
}

/// The new function's code and relocations.
fn function_code(
    old: &Image<'_>,
    new: &Image<'_>,
    nf: &Sym,
    changed: &BTreeSet<String>,
    report: &mut BuildReport,
) -> Result<(Vec<u8>, Vec<Relocation>), String> {
    let d = decode_function(new, nf)
        .ok_or_else(|| format!("NEW has no file bytes at {:#x}+{:#x}", nf.addr, nf.size))?;
    let insns = d.insns.as_ref().map_err(|off| {
        format!(
            "NEW's code does not decode at offset {off:#x} (data in code?); it cannot be relocated"
        )
    })?;
    let mut code = d.bytes.to_vec();
    let mut relocs = Vec::new();
    for i in insns {
        let ioff = i.ip - nf.addr;
        for fld in &i.fields {
            let at = format!("instruction at +{ioff:#x}");
            let t = resolve_target(new, nf, fld.target);
            let (symbol, sym_off) = match (&t, fld.kind) {
                (SymTarget::Internal(_), FieldKind::Rel8 | FieldKind::Rel32) => continue,
                (SymTarget::Internal(_), _) => {
                    return Err(format!(
                        "{at} holds the absolute address of its own code; such code cannot be moved"
                    ));
                }
                (_, FieldKind::Rel8) => {
                    return Err(format!(
                        "{at} is a short jump to {:#x} outside the function; it cannot reach from the patch area",
                        fld.target
                    ));
                }
                (SymTarget::Unresolved(a), _) => {
                    return Err(format!(
                        "{at} refers to {a:#x}, which is in no symbol and no section of NEW; it cannot be made symbolic"
                    ));
                }
                (
                    SymTarget::Anon {
                        section, offset, ..
                    },
                    _,
                ) => {
                    return Err(format!(
                        "{at} refers to unnamed data at {section}+{offset:#x} (a literal, constant or jump table); a build from two executables references only named guest symbols (it carries no data; a build from an object can): give the data a symbol in the guest, or move it into the code"
                    ));
                }
                (SymTarget::GotSlot { symbol, offset }, FieldKind::Rel32) => {
                    // Relax GOT loads the way linkers do (GOTPCRELX), keeping
                    // the displacement field where it is:
                    //   mov r64, [rip+slot]  48 8b /r  ->  lea r64, [rip+sym]  48 8d /r
                    //   call [rip+slot]      ff 15     ->  addr32 call sym     67 e8
                    //   jmp [rip+slot]       ff 25     ->  jmp sym; nop        e9 .. 90
                    let field_at = ioff as usize + fld.offset;
                    let op_at = field_at.checked_sub(2);
                    let ins = i.instr.code();
                    let pair = op_at
                        .and_then(|o| code.get(o..field_at))
                        .map(<[u8]>::to_vec);
                    let relaxed = match (ins, pair.as_deref(), op_at) {
                        (iced_x86::Code::Mov_r64_rm64, Some([0x8b, _]), Some(o)) => {
                            code[o] = 0x8d;
                            "lea"
                        }
                        (iced_x86::Code::Call_rm64, Some([0xff, 0x15]), Some(o))
                            if i.len == fld.offset + 4 =>
                        {
                            code[o] = 0x67;
                            code[o + 1] = 0xe8;
                            "a direct call"
                        }
                        (iced_x86::Code::Jmp_rm64, Some([0xff, 0x25]), Some(o))
                            if i.len == fld.offset + 4 =>
                        {
                            // e9 rel32 then nop: the field moves one byte back.
                            code[o] = 0xe9;
                            code.copy_within(field_at..field_at + 4, o + 1);
                            code[o + 5] = 0x90;
                            let sym_off = *offset;
                            check_reference(old, new, symbol, sym_off, true, changed, report)
                                .map_err(|e| {
                                    format!("{at} refers to {symbol}+{sym_off:#x}: {e}")
                                })?;
                            for b in code.iter_mut().skip(o + 1).take(4) {
                                *b = 0;
                            }
                            relocs.push(Relocation::symbol(
                                u32::try_from(o + 1).map_err(|e| e.to_string())?,
                                RelocKind::Rel32,
                                symbol.clone(),
                                // The jump ends 4 bytes after the field.
                                sym_off as i64 - 4,
                            ));
                            report.warnings.push(format!(
                                "{}: {at}: GOT jump to {symbol} relaxed to a direct jump",
                                nf.name
                            ));
                            continue;
                        }
                        _ => {
                            return Err(format!(
                                "{at} uses the GOT slot of {symbol} in a way that cannot be relaxed (only mov r64/call/jmp through [rip+slot])"
                            ));
                        }
                    };
                    report.warnings.push(format!(
                        "{}: {at}: GOT use of {symbol} relaxed to {relaxed}",
                        nf.name
                    ));
                    (symbol.clone(), *offset)
                }
                (SymTarget::GotSlot { symbol, .. }, _) => {
                    return Err(format!(
                        "{at} holds the absolute address of the GOT slot of {symbol}"
                    ));
                }
                (SymTarget::External { symbol, offset }, _) => (symbol.clone(), *offset),
            };
            check_reference(old, new, &symbol, sym_off, fld.is_branch, changed, report)
                .map_err(|e| format!("{at} refers to {symbol}+{sym_off:#x}: {e}"))?;
            let field_off = ioff + fld.offset as u64;
            let (kind, addend) = match fld.kind {
                FieldKind::Rel32 => {
                    // The CPU adds the displacement to the end of the instruction,
                    // which is (len - field offset) bytes after the field.
                    let tail = (i.len - fld.offset) as i64;
                    (RelocKind::Rel32, sym_off as i64 - tail)
                }
                FieldKind::Abs32 => (RelocKind::Abs32, sym_off as i64),
                FieldKind::Abs32S => (RelocKind::Abs32S, sym_off as i64),
                FieldKind::Abs64 => (RelocKind::Abs64, sym_off as i64),
                FieldKind::Rel8 => continue,
            };
            if kind != RelocKind::Rel32 {
                report.warnings.push(format!(
                    "{}: {at} uses {symbol}+{sym_off:#x} as an absolute address ({}); check that it is an address, not a number",
                    nf.name,
                    kind.as_str()
                ));
            }
            let start = usize::try_from(field_off).map_err(|e| e.to_string())?;
            for b in code.iter_mut().skip(start).take(fld.width) {
                *b = 0;
            }
            relocs.push(Relocation::symbol(
                u32::try_from(field_off).map_err(|e| e.to_string())?,
                kind,
                symbol,
                addend,
            ));
        }
    }
    relocs.sort_by_key(|r| r.offset);
    Ok((code, relocs))
}

/// A reference from new code to `symbol + offset` will be resolved against
/// the running (OLD) guest: make sure it means the same thing there.
fn check_reference(
    old: &Image<'_>,
    new: &Image<'_>,
    symbol: &str,
    offset: u64,
    is_branch: bool,
    changed: &BTreeSet<String>,
    report: &mut BuildReport,
) -> Result<(), String> {
    let ns = new.unique(symbol).map_err(|e| format!("NEW: {e}"))?;
    let os = old.unique(symbol).map_err(|e| {
        format!("the running guest (OLD) has no unique symbol of that name ({e}); patches cannot add new functions or data")
    })?;
    if symbol.contains(".cold") || symbol.contains(".part.") {
        return Err(
            "it is a split-off part of a function (gcc .cold/.part), which belongs to the old body"
                .into(),
        );
    }
    match ns.kind {
        SymKind::Func => {
            if offset != 0 && changed.contains(symbol) {
                return Err(
                    "the function changed, so an offset inside it means something else in OLD"
                        .into(),
                );
            }
            if is_branch && offset != 0 {
                report
                    .warnings
                    .push(format!("branch into the middle of {symbol} (+{offset:#x})"));
            }
        }
        SymKind::Object | SymKind::Other => {
            if os.size != ns.size {
                return Err(format!(
                    "the data object changed size ({} bytes in OLD, {} in NEW); data layout changes cannot be hot-patched",
                    os.size, ns.size
                ));
            }
            if !ns.writable && ns.size > 0 {
                let a = old.read(os.addr, os.size);
                let b = new.read(ns.addr, ns.size);
                if a.is_some() && b.is_some() && a != b {
                    return Err(
                        "the read-only data changed; the patch would use OLD's contents".into(),
                    );
                }
            }
        }
    }
    Ok(())
}
