//! Hot patches for a stock Linux kernel, built from what the distribution ships: the vmlinux
//! inside its bzImage (the bytes a patch expects) and the kernel's own kallsyms tables (the
//! symbols sites and relocations name). No debug package, no `.symtab`.
//!
//! - [`kernel_image_info`] is the kernel as the patch engine sees it (identity and sized
//!   symbols), the counterpart of `patch_format::read_image` for the test guest's ELF.
//! - [`build_kernel_patch`] makes function sites from a relocatable object, as
//!   `patch_format::build_from_manifest` does for the test guest: one `SiteKind::Function` site
//!   per [`KernelFix`], its expected bytes the old function's bytes from the file, its code and
//!   relocations from [`patch_format::PatchObject`], and the read-only data the code uses
//!   (string literals, `const` arrays: the object's `.rodata*` sections) as the patch's data
//!   blocks (format version 2).
//!
//! Kallsyms records no sizes. A symbol's extent here is the distance to the next symbol at a
//! greater address, which for a function includes the padding after it (`int3`s or NOPs up to
//! the next 16-byte boundary). That padding is in the file and in memory alike, so it is part of
//! the expected bytes: exactly the extent, nothing trimmed.

use std::collections::HashMap;

use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, elf};
use patch_format::limits::MAX_EXPECTED;
use patch_format::{
    BuildError, EncodeError, ImageInfo, ImageSymbol, Location, Metadata, Patch, PatchObject, Site,
    SiteKind, TargetIdentity,
};
use thiserror::Error;

use super::{Kallsyms, KernelSymbol, build_id, linux_banner};

/// One function to replace: the kernel function `function` (a kallsyms name, e.g.
/// `version_proc_show`) is redirected to the code of `code_symbol` in the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFix {
    pub function: String,
    pub code_symbol: String,
}

impl KernelFix {
    pub fn new(function: impl Into<String>, code_symbol: impl Into<String>) -> KernelFix {
        KernelFix {
            function: function.into(),
            code_symbol: code_symbol.into(),
        }
    }
}

/// Why a kernel patch cannot be built. Every message names the function (and where it applies,
/// the code symbol) and says what to change.
#[derive(Debug, Error)]
pub enum KernelPatchError {
    #[error("no fixes given: name at least one kernel function and the object symbol replacing it")]
    NoFixes,
    #[error(
        "the vmlinux has no GNU build-id note; a kernel patch names its target by build id (the \
         running kernel's text differs from the file, so there is no text hash to fall back \
         on): use the vmlinux extracted from the kernel's own bzImage"
    )]
    NoBuildId,
    #[error(
        "function {function}: listed twice; give each kernel function one replacement (a patch \
         has one site per location)"
    )]
    DuplicateFunction { function: String },
    #[error(
        "function {function}: the kernel has no symbol of that name; check it against \
         /proc/kallsyms of this kernel (gcc may have renamed a static function, e.g. \
         {function}.isra.0 or {function}.constprop.0, or inlined it away)"
    )]
    UnknownFunction { function: String },
    #[error(
        "function {function}: the kernel symbol at {address:#x} is of type {kind:?}, not code \
         (t/T); only functions can be replaced"
    )]
    NotAFunction {
        function: String,
        address: u64,
        kind: char,
    },
    #[error(
        "function {function}: {} kernel symbols have that name ({}); name the one to replace \
         as {function},N, the N-th in address order (as livepatch's sympos)",
        .symbols.len(),
        describe(.symbols)
    )]
    AmbiguousFunction {
        function: String,
        /// Every symbol of that name: address and type letter.
        symbols: Vec<(u64, char)>,
    },
    #[error(
        "function {function} at {address:#x}: no symbol follows it, so its extent is unknown; \
         only functions followed by another kernel symbol can be replaced"
    )]
    NoExtent { function: String, address: u64 },
    #[error(
        "function {function} at {address:#x}: its extent ({size} bytes, up to the next symbol) \
         exceeds the format's {MAX_EXPECTED}-byte limit for expected bytes; the symbol table \
         has a gap after it: pick another function"
    )]
    TooLarge {
        function: String,
        address: u64,
        size: u64,
    },
    #[error(
        "function {function} at {address:#x}: the vmlinux file holds no bytes for \
         [{address:#x}, +{size:#x}); the symbols do not belong to this vmlinux (extract both \
         from the same bzImage)"
    )]
    NoFileBytes {
        function: String,
        address: u64,
        size: u64,
    },
    #[error("the patch code object cannot be read")]
    Object(#[source] BuildError),
    #[error("replacement for {function}")]
    Code {
        function: String,
        #[source]
        source: BuildError,
    },
    #[error(
        "replacement for {function}: {code_symbol}+{offset:#x} refers to {symbol:?}, which the \
         kernel does not have; patch code may reference only kernel symbols (see \
         /proc/kallsyms); besides them it can bring only read-only data of its own (string \
         literals, `const` data), no functions or variables"
    )]
    UnknownSymbol {
        function: String,
        code_symbol: String,
        offset: u32,
        symbol: String,
    },
    #[error(
        "replacement for {function}: {code_symbol}+{offset:#x} refers to {symbol:?}, an \
         absolute kernel symbol (type {kind:?}: a per-CPU offset or a constant, not an address \
         in the kernel image) through a RIP-relative reference, which would point at nothing: \
         refer to per-CPU data %gs-relative with an absolute displacement, as the kernel does \
         (`movq %gs:SYMBOL, %rax`, an R_X86_64_32S relocation)"
    )]
    AbsoluteSymbol {
        function: String,
        code_symbol: String,
        offset: u32,
        symbol: String,
        kind: char,
    },
    #[error(
        "replacement for {function}: {code_symbol}+{offset:#x} refers to {symbol:?}, but {} \
         kernel symbols have that name ({}); relocations resolve unique names only: reference \
         a uniquely named symbol instead",
        .symbols.len(),
        describe(.symbols)
    )]
    AmbiguousSymbol {
        function: String,
        code_symbol: String,
        offset: u32,
        symbol: String,
        symbols: Vec<(u64, char)>,
    },
    #[error("the built patch is not valid")]
    Invalid(#[from] EncodeError),
}

/// `0xffffffff81000000 (t), ...`.
fn describe(symbols: &[(u64, char)]) -> String {
    symbols
        .iter()
        .map(|(a, k)| format!("{a:#x} ({k})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The kernel as the patch engine sees it:
/// - identity: name `Linux <release>` (the word after `Linux version ` in `linux_banner`; `Linux`
///   alone when the banner cannot be read), the GNU build-id note, and **no** text hash: the
///   running kernel's text differs from the file (ftrace's NOPs, alternatives, return thunks);
/// - symbols: every kallsyms symbol except the absolute ones (`A`/`a`: per-CPU offsets and
///   constants), sized by the distance to the next symbol at a strictly greater address (0 for
///   the last), `function` for text symbols (`t`/`T`), sorted by (address, name).
pub fn kernel_image_info(vmlinux: &[u8], kallsyms: &Kallsyms) -> ImageInfo {
    let identity = kernel_identity(vmlinux, kallsyms);
    SymbolTable::new(kallsyms.symbols()).image_info(identity)
}

/// The bytes of the vmlinux file at link-time virtual address `vaddr`, `len` of them, through the
/// ELF's `PT_LOAD` program headers (`p_vaddr`, `p_offset`, `p_filesz`). `None` unless one segment
/// holds the whole range in the file (not a 64-bit ELF, an address in no segment, or a range
/// running into `.bss`).
pub fn file_bytes(vmlinux: &[u8], vaddr: u64, len: usize) -> Option<&[u8]> {
    let header = elf::FileHeader64::<Endianness>::parse(vmlinux).ok()?;
    let endian = header.endian().ok()?;
    let len = u64::try_from(len).ok()?;
    for ph in header.program_headers(endian, vmlinux).ok()? {
        if ph.p_type(endian) != elf::PT_LOAD {
            continue;
        }
        let Some(delta) = vaddr.checked_sub(ph.p_vaddr(endian)) else {
            continue;
        };
        if delta.checked_add(len)? > ph.p_filesz(endian) {
            continue;
        }
        let start = usize::try_from(ph.p_offset(endian).checked_add(delta)?).ok()?;
        let end = start.checked_add(usize::try_from(len).ok()?)?;
        return vmlinux.get(start..end);
    }
    None
}

/// Builds a patch replacing each fix's kernel function by the code of its symbol in `object`
/// (an x86-64 relocatable object, e.g. from `guest_tools::kernel_patch::compile`).
///
/// For each fix: a [`SiteKind::Function`] site at `function+0`; `expected` = the function's
/// bytes in the vmlinux file from its kallsyms address over its extent (the distance to the next
/// symbol at a greater address, inter-function padding included, nothing trimmed), so they start
/// with the file's `call __fentry__` that the engine matches against the running kernel's NOP;
/// `code`/`relocations` from [`PatchObject::code`], and the patch's data blocks from the
/// read-only sections the code uses (writable data is refused). The function name must be a unique kallsyms
/// name of a text symbol, and every relocation symbol a unique, non-absolute kallsyms name:
/// the engine resolves both by unique name at apply time. The target is
/// [`kernel_image_info`]'s identity (the build id is required). The patch is normalized and
/// validated.
pub fn build_kernel_patch(
    vmlinux: &[u8],
    kallsyms: &Kallsyms,
    object: &[u8],
    fixes: &[KernelFix],
    meta: Metadata,
) -> Result<Patch, KernelPatchError> {
    let identity = kernel_identity(vmlinux, kallsyms);
    build_patch(
        vmlinux,
        &SymbolTable::new(kallsyms.symbols()),
        identity,
        object,
        fixes,
        meta,
    )
}

/// The new code of one kernel function, already linked: what [`build_kernel_patch_from_code`]
/// makes a function site of (the source-diff builder produces these).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCode {
    /// The kernel function replaced: a kallsyms name, `name,N` for the N-th of several.
    pub function: String,
    pub code: Vec<u8>,
    /// Symbolic relocations: kernel symbols (`name,N` allowed) or the patch's data blocks.
    pub relocations: Vec<patch_format::Relocation>,
}

/// [`build_kernel_patch`] for code linked elsewhere: one function site per [`KernelCode`],
/// its expected bytes the kernel's whole function from the file, every relocation symbol
/// checked against kallsyms as there, `data` the patch's read-only data blocks.
pub fn build_kernel_patch_from_code(
    vmlinux: &[u8],
    kallsyms: &Kallsyms,
    functions: Vec<KernelCode>,
    data: Vec<patch_format::DataBlock>,
    meta: Metadata,
) -> Result<Patch, KernelPatchError> {
    let identity = kernel_identity(vmlinux, kallsyms);
    check_inputs(&identity, functions.len())?;
    let table = SymbolTable::new(kallsyms.symbols());
    let mut sites = Vec::with_capacity(functions.len());
    let mut seen: Vec<String> = Vec::with_capacity(functions.len());
    for f in functions {
        if seen.contains(&f.function) {
            return Err(KernelPatchError::DuplicateFunction {
                function: f.function,
            });
        }
        seen.push(f.function.clone());
        let expected = function_bytes(vmlinux, &table, &f.function)?;
        let fix = KernelFix::new(&f.function, &f.function);
        sites.push(function_site(
            &table,
            &fix,
            expected,
            f.code,
            f.relocations,
        )?);
    }
    finish_patch(meta, identity, sites, data)
}

/// A patch needs the kernel's build id (its only identity) and at least one function.
fn check_inputs(identity: &TargetIdentity, functions: usize) -> Result<(), KernelPatchError> {
    if identity.build_id.is_none() {
        return Err(KernelPatchError::NoBuildId);
    }
    if functions == 0 {
        return Err(KernelPatchError::NoFixes);
    }
    Ok(())
}

/// The function site replacing `fix.function` (whose whole bytes in the file are `expected`)
/// with `code`; every relocation symbol checked against the kernel's symbols (data relocations
/// point into the patch's own blocks, placed by the engine).
fn function_site(
    table: &SymbolTable<'_>,
    fix: &KernelFix,
    expected: &[u8],
    code: Vec<u8>,
    relocations: Vec<patch_format::Relocation>,
) -> Result<Site, KernelPatchError> {
    for r in &relocations {
        if let Some(symbol) = r.symbol_name() {
            let gs_relative = gs_rip_relative_at(&code, r.offset);
            check_relocation_symbol(table, fix, r.offset, symbol, r.kind, gs_relative)?;
        }
    }
    Ok(Site {
        kind: SiteKind::Function,
        target: Location::Symbol {
            name: fix.function.clone(),
            offset: 0,
        },
        expected: expected.to_vec(),
        code,
        relocations,
    })
}

/// The patch of `sites` and `data`, normalized and validated.
fn finish_patch(
    meta: Metadata,
    target: TargetIdentity,
    sites: Vec<Site>,
    data: Vec<patch_format::DataBlock>,
) -> Result<Patch, KernelPatchError> {
    let mut patch = Patch {
        meta,
        target,
        sites,
        data,
    };
    patch.normalize();
    patch.validate()?;
    Ok(patch)
}

/// `Linux <release>`, the build id, no text hash.
fn kernel_identity(vmlinux: &[u8], kallsyms: &Kallsyms) -> TargetIdentity {
    let release = linux_banner(vmlinux, kallsyms).and_then(|b| release_of(&b));
    TargetIdentity {
        name: match release {
            Some(r) => format!("Linux {r}"),
            None => "Linux".to_string(),
        },
        build_id: build_id(vmlinux),
        text_sha256: None,
    }
}

/// The release in a banner: the word after `Linux version `.
fn release_of(banner: &str) -> Option<String> {
    banner
        .strip_prefix("Linux version ")?
        .split_whitespace()
        .next()
        .map(str::to_string)
}

/// The located (non-absolute) symbols with their extents, and a name index.
struct SymbolTable<'a> {
    /// All symbols, for diagnosing names only the absolute ones have.
    all: &'a [KernelSymbol],
    /// Sorted by (address, name), with extents.
    located: Vec<(&'a KernelSymbol, u64)>,
    /// Indices into `located` by name.
    by_name: HashMap<&'a str, Vec<usize>>,
}

impl<'a> SymbolTable<'a> {
    fn new(all: &'a [KernelSymbol]) -> SymbolTable<'a> {
        let mut sorted: Vec<&KernelSymbol> = all.iter().filter(|s| !s.is_absolute()).collect();
        sorted.sort_by(|a, b| (a.address, &a.name).cmp(&(b.address, &b.name)));
        let mut located = Vec::with_capacity(sorted.len());
        let mut next_greater = 0;
        for (i, s) in sorted.iter().enumerate() {
            if next_greater <= i {
                next_greater = i + 1;
            }
            while sorted
                .get(next_greater)
                .is_some_and(|n| n.address == s.address)
            {
                next_greater += 1;
            }
            let size = sorted
                .get(next_greater)
                .map_or(0, |n| n.address - s.address);
            located.push((*s, size));
        }
        let mut by_name: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, (s, _)) in located.iter().enumerate() {
            by_name.entry(s.name.as_str()).or_default().push(i);
        }
        SymbolTable {
            all,
            located,
            by_name,
        }
    }

    fn image_info(&self, identity: TargetIdentity) -> ImageInfo {
        ImageInfo {
            identity,
            symbols: self
                .located
                .iter()
                .map(|(s, size)| ImageSymbol {
                    name: s.name.clone(),
                    addr: s.address,
                    size: *size,
                    function: s.is_text(),
                })
                .collect(),
        }
    }

    /// The located symbols called `name`.
    fn named(&self, name: &str) -> Vec<(&'a KernelSymbol, u64)> {
        self.by_name
            .get(name)
            .map(|v| v.iter().map(|&i| self.located[i]).collect())
            .unwrap_or_default()
    }

    /// The absolute symbol called `name`, if only such exist.
    fn absolute(&self, name: &str) -> Option<&'a KernelSymbol> {
        self.all.iter().find(|s| s.is_absolute() && s.name == name)
    }
}

fn build_patch(
    vmlinux: &[u8],
    table: &SymbolTable<'_>,
    identity: TargetIdentity,
    object: &[u8],
    fixes: &[KernelFix],
    meta: Metadata,
) -> Result<Patch, KernelPatchError> {
    check_inputs(&identity, fixes.len())?;
    let mut sites = Vec::with_capacity(fixes.len());
    let mut object = PatchObject::parse(object).map_err(KernelPatchError::Object)?;
    for (i, fix) in fixes.iter().enumerate() {
        let function = &fix.function;
        if fixes[..i].iter().any(|f| &f.function == function) {
            return Err(KernelPatchError::DuplicateFunction {
                function: function.clone(),
            });
        }
        let expected = function_bytes(vmlinux, table, function)?;
        let (code, relocations) =
            object
                .code(&fix.code_symbol)
                .map_err(|source| KernelPatchError::Code {
                    function: function.clone(),
                    source,
                })?;
        sites.push(function_site(table, fix, expected, code, relocations)?);
    }
    finish_patch(meta, identity, sites, object.into_data())
}

/// The whole function `name` from the file: unique text symbol, extent up to the next symbol.
fn function_bytes<'v>(
    vmlinux: &'v [u8],
    table: &SymbolTable<'_>,
    name: &str,
) -> Result<&'v [u8], KernelPatchError> {
    let function = name.to_string();
    let mut named = table.named(name);
    // `name,N`: the N-th of several symbols of that name, in address order.
    if let (true, (base, Some(pos))) = (named.is_empty(), patch_format::split_sympos(name)) {
        let mut all = table.named(base);
        all.sort_by_key(|(s, _)| s.address);
        named = all.get(pos - 1).copied().into_iter().collect();
    }
    let (sym, size) = match named.as_slice() {
        [] => {
            return Err(match table.absolute(name) {
                Some(s) => KernelPatchError::NotAFunction {
                    function,
                    address: s.address,
                    kind: s.kind,
                },
                None => KernelPatchError::UnknownFunction { function },
            });
        }
        [one] => *one,
        many => {
            return Err(KernelPatchError::AmbiguousFunction {
                function,
                symbols: many.iter().map(|(s, _)| (s.address, s.kind)).collect(),
            });
        }
    };
    if !sym.is_text() {
        return Err(KernelPatchError::NotAFunction {
            function,
            address: sym.address,
            kind: sym.kind,
        });
    }
    if size == 0 {
        return Err(KernelPatchError::NoExtent {
            function,
            address: sym.address,
        });
    }
    let len = usize::try_from(size)
        .ok()
        .filter(|&l| l <= MAX_EXPECTED)
        .ok_or_else(|| KernelPatchError::TooLarge {
            function: function.clone(),
            address: sym.address,
            size,
        })?;
    file_bytes(vmlinux, sym.address, len).ok_or(KernelPatchError::NoFileBytes {
        function,
        address: sym.address,
        size,
    })
}

/// Whether the 32-bit field at `offset` of `code` is the displacement of a `%gs:`-prefixed
/// RIP-relative memory operand, as GCC compiles the kernel's `this_cpu_*()` operations
/// (`decq %gs:nr_unused(%rip)`): the address is gs base + the variable's per-CPU offset, the
/// displacement reaching that small value from the top of the address space by wrapping
/// (`patch_format::apply_relocations`). Decoded from the start of the code; anything else, or
/// code that does not decode to an instruction holding the field, is not.
fn gs_rip_relative_at(code: &[u8], offset: u32) -> bool {
    use iced_x86::{Decoder, DecoderOptions, Register};
    let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut ins = iced_x86::Instruction::default();
    while d.can_decode() {
        d.decode_out(&mut ins);
        let start = ins.ip() as usize;
        if start + ins.len() <= offset as usize {
            continue;
        }
        let c = d.get_constant_offsets(&ins);
        return !ins.is_invalid()
            && ins.segment_prefix() == Register::GS
            && ins.memory_base() == Register::RIP
            && c.has_displacement()
            && c.displacement_size() == 4
            && start + c.displacement_offset() == offset as usize;
    }
    false
}

/// A relocation symbol must be one located kernel symbol, or a per-CPU offset referred to
/// absolutely or `%gs:`-relative (`gs_relative`: see [`gs_rip_relative_at`]).
fn check_relocation_symbol(
    table: &SymbolTable<'_>,
    fix: &KernelFix,
    offset: u32,
    symbol: &str,
    kind: patch_format::RelocKind,
    gs_relative: bool,
) -> Result<(), KernelPatchError> {
    let function = fix.function.clone();
    let code_symbol = fix.code_symbol.clone();
    let symbol_name = symbol.to_string();
    let mut named = table.named(symbol);
    // `name,N`: the N-th of several symbols of that name, in address order (as the engine
    // resolves it).
    if let (true, (base, Some(pos))) = (named.is_empty(), patch_format::split_sympos(symbol)) {
        let mut all = table.named(base);
        all.sort_by_key(|(s, _)| s.address);
        named = all.get(pos - 1).copied().into_iter().collect();
    }
    match named.as_slice() {
        [_] => Ok(()),
        // A per-CPU offset (`%gs:current_task`): an absolute value, which the engine resolves
        // unslid; only an absolute reference to it means anything, or a `%gs:` RIP-relative
        // one, whose address is the same value.
        [] if table.absolute(symbol).is_some()
            && (gs_relative && kind == patch_format::RelocKind::Rel32
                || matches!(
                    kind,
                    patch_format::RelocKind::Abs32S
                        | patch_format::RelocKind::Abs32
                        | patch_format::RelocKind::Abs64
                )) =>
        {
            Ok(())
        }
        [] => Err(match table.absolute(symbol) {
            Some(s) => KernelPatchError::AbsoluteSymbol {
                function,
                code_symbol,
                offset,
                symbol: symbol_name,
                kind: s.kind,
            },
            None => KernelPatchError::UnknownSymbol {
                function,
                code_symbol,
                offset,
                symbol: symbol_name,
            },
        }),
        many => Err(KernelPatchError::AmbiguousSymbol {
            function,
            code_symbol,
            offset,
            symbol: symbol_name,
            symbols: many.iter().map(|(s, _)| (s.address, s.kind)).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use patch_format::RelocKind;

    const BASE: u64 = 0xffff_ffff_8100_0000;

    fn sym(address: u64, kind: char, name: &str) -> KernelSymbol {
        KernelSymbol {
            address,
            kind,
            name: name.to_string(),
        }
    }

    /// Symbols as kallsyms lists them: per-CPU ones first, aliases, a duplicate static name,
    /// data, and a last symbol without extent.
    fn symbols() -> Vec<KernelSymbol> {
        vec![
            sym(0, 'A', "fixed_percpu_data"),
            sym(0x1fb80, 'A', "pcpu_hot"),
            sym(BASE, 'T', "_stext"),
            sym(BASE, 'T', "target_fn"),
            sym(BASE + 0x40, 't', "other_fn"),
            sym(BASE + 0x80, 't', "dup"),
            sym(BASE + 0xc0, 't', "dup"),
            sym(BASE + 0x100, 'T', "helper"),
            sym(BASE + 0x140, 'T', "__x86_return_thunk"),
            sym(BASE + 0x180, 'T', "big_gap"),
            sym(BASE + 0x40_0000, 'D', "some_data"),
            sym(BASE + 0x40_0100, 'B', "_end"),
        ]
    }

    /// The text at `BASE`: each function `call __fentry__` (as in the file), a body, `int3`
    /// padding up to 0x40.
    fn text() -> Vec<u8> {
        let mut t = Vec::new();
        for f in 0..6u8 {
            let mut func = vec![
                0xe8, 0, 0, 0, 0, 0x48, 0x89, 0xf8, 0x04, f, 0xe9, 0, 0, 0, 0,
            ];
            func.resize(0x40, 0xcc);
            t.extend_from_slice(&func);
        }
        t
    }

    /// A 64-bit ELF with one `PT_LOAD` of `text` at `vaddr` (file offset 0x1000) followed by
    /// `bss` zero-fill bytes: what `file_bytes` reads.
    fn elf(vaddr: u64, text: &[u8], bss: u64) -> Vec<u8> {
        let mut e = vec![0u8; 0x1000];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little endian
        e[6] = 1; // EV_CURRENT
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        e[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
        let ph = &mut e[64..120];
        ph[0..4].copy_from_slice(&elf::PT_LOAD.0.to_le_bytes());
        ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R X
        ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
        ph[16..24].copy_from_slice(&vaddr.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&vaddr.to_le_bytes()); // p_paddr
        ph[32..40].copy_from_slice(&(text.len() as u64).to_le_bytes()); // p_filesz
        ph[40..48].copy_from_slice(&(text.len() as u64 + bss).to_le_bytes()); // p_memsz
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        e.extend_from_slice(text);
        e
    }

    fn identity() -> TargetIdentity {
        TargetIdentity {
            name: "Linux 6.1.0-test".into(),
            build_id: Some(vec![0xeb; 20]),
            text_sha256: None,
        }
    }

    fn meta() -> Metadata {
        Metadata {
            name: "kernel-fix".into(),
            created: 1_700_000_000,
            ..Metadata::default()
        }
    }

    /// Patch code referring to kernel symbols good and bad.
    const FIXES_C: &str = "
extern int helper(int);
extern int nothere(int);
extern int dup(int);
extern int pcpu_hot;
int fix(int x) { return helper(x) + 1; }
int calls_missing(int x) { return nothere(x); }
int calls_dup(int x) { return dup(x); }
int reads_percpu(void) { return pcpu_hot; }
int reads_percpu_gs(void)
{
	int v;
	asm(\"movl %%gs:%1, %0\" : \"=r\"(v) : \"m\"(pcpu_hot));
	return v;
}
";

    fn object() -> Vec<u8> {
        let tmp = tempfile::Builder::new()
            .prefix("vmm-linux-patch-")
            .tempdir()
            .unwrap();
        let path = guest_tools::kernel_patch::compile(FIXES_C, tmp.path()).expect("gcc builds");
        let bytes = std::fs::read(&path).unwrap();
        tmp.close().unwrap();
        bytes
    }

    fn build(fixes: &[(&str, &str)]) -> Result<Patch, KernelPatchError> {
        let syms = symbols();
        let vmlinux = elf(BASE, &text(), 0x1000);
        let fixes: Vec<KernelFix> = fixes.iter().map(|(f, c)| KernelFix::new(*f, *c)).collect();
        build_patch(
            &vmlinux,
            &SymbolTable::new(&syms),
            identity(),
            &object(),
            &fixes,
            meta(),
        )
    }

    #[test]
    fn file_bytes_reads_through_the_program_headers() {
        let t = text();
        let e = elf(BASE, &t, 0x1000);
        assert_eq!(file_bytes(&e, BASE, 0x40), Some(&t[..0x40]));
        assert_eq!(file_bytes(&e, BASE + 0x41, 3), Some(&t[0x41..0x44]));
        assert_eq!(file_bytes(&e, BASE + 0x180 - 2, 2), Some(&t[0x17e..]));
        // Into .bss (memsz > filesz), past the segment, below it, not an ELF.
        assert_eq!(file_bytes(&e, BASE + 0x180 - 2, 3), None);
        assert_eq!(file_bytes(&e, BASE + 0x200, 1), None);
        assert_eq!(file_bytes(&e, BASE - 1, 2), None);
        assert_eq!(file_bytes(&e, u64::MAX, 2), None);
        assert_eq!(file_bytes(b"not an elf", BASE, 1), None);
        assert_eq!(file_bytes(&e[..100], BASE, 1), None);
    }

    #[test]
    fn image_info_sizes_symbols_up_to_the_next_address_and_drops_absolute_ones() {
        let syms = symbols();
        let info = SymbolTable::new(&syms).image_info(identity());
        let got: Vec<(&str, u64, u64, bool)> = info
            .symbols
            .iter()
            .map(|s| (s.name.as_str(), s.addr - BASE, s.size, s.function))
            .collect();
        assert_eq!(
            got,
            vec![
                ("_stext", 0, 0x40, true),
                ("target_fn", 0, 0x40, true),
                ("other_fn", 0x40, 0x40, true),
                ("dup", 0x80, 0x40, true),
                ("dup", 0xc0, 0x40, true),
                ("helper", 0x100, 0x40, true),
                ("__x86_return_thunk", 0x140, 0x40, true),
                ("big_gap", 0x180, 0x40_0000 - 0x180, true),
                ("some_data", 0x40_0000, 0x100, false),
                ("_end", 0x40_0100, 0, false),
            ]
        );
        assert_eq!(info.identity, identity());
        assert_eq!(
            release_of("Linux version 6.1.0-56-amd64 (debian-kernel@lists.debian.org) ...\n"),
            Some("6.1.0-56-amd64".to_string())
        );
        assert_eq!(release_of("Linux"), None);
    }

    #[test]
    fn builds_a_function_site_with_the_whole_old_function_and_symbolic_relocations() {
        let patch = build(&[("target_fn", "fix")]).unwrap();
        assert_eq!(patch.target, identity());
        assert_eq!(patch.meta, meta());
        let [site] = patch.sites.as_slice() else {
            panic!("one site: {:?}", patch.sites);
        };
        assert_eq!(site.kind, SiteKind::Function);
        assert_eq!(
            site.target,
            Location::Symbol {
                name: "target_fn".into(),
                offset: 0
            }
        );
        assert_eq!(
            site.expected,
            text()[..0x40].to_vec(),
            "the padding included"
        );
        assert_eq!(site.expected[0], 0xe8, "call __fentry__ as in the file");
        let relocs: Vec<(&str, RelocKind)> = site
            .relocations
            .iter()
            .filter_map(|r| r.symbol_name().map(|s| (s, r.kind)))
            .collect();
        assert!(relocs.contains(&("helper", RelocKind::Rel32)), "{relocs:?}");
        assert!(
            relocs.contains(&("__x86_return_thunk", RelocKind::Rel32)),
            "returns go through the kernel's return thunk: {relocs:?}"
        );
    }

    #[test]
    fn refuses_what_the_engine_could_not_resolve_with_a_clear_reason() {
        let err = build(&[("nope", "fix")]).unwrap_err();
        assert!(
            matches!(&err, KernelPatchError::UnknownFunction { function } if function == "nope"),
            "{err}"
        );
        assert!(err.to_string().contains("/proc/kallsyms"), "{err}");

        let err = build(&[("dup", "fix")]).unwrap_err().to_string();
        assert!(
            err.contains("2 kernel symbols") && err.contains("0xffffffff81000080 (t)"),
            "{err}"
        );
        assert!(err.contains("0xffffffff810000c0 (t)"), "{err}");
        assert!(err.contains("dup,N"), "{err}");
        // By position: the second `dup` in address order.
        let p = build(&[("dup,2", "fix")]).expect("dup,2");
        assert_eq!(
            p.sites[0].target,
            Location::Symbol {
                name: "dup,2".into(),
                offset: 0
            }
        );
        assert!(matches!(
            build(&[("dup,3", "fix")]).unwrap_err(),
            KernelPatchError::UnknownFunction { .. }
        ));

        let err = build(&[("some_data", "fix")]).unwrap_err();
        assert!(
            matches!(err, KernelPatchError::NotAFunction { kind: 'D', .. }),
            "{err}"
        );
        let err = build(&[("pcpu_hot", "fix")]).unwrap_err();
        assert!(
            matches!(err, KernelPatchError::NotAFunction { kind: 'A', .. }),
            "{err}"
        );
        let err = build(&[("_end", "fix")]).unwrap_err();
        assert!(
            matches!(err, KernelPatchError::NotAFunction { .. }),
            "{err}"
        );
        let err = build(&[("big_gap", "fix")]).unwrap_err();
        assert!(matches!(err, KernelPatchError::TooLarge { .. }), "{err}");
        let err = build(&[("target_fn", "fix"), ("target_fn", "fix")]).unwrap_err();
        assert!(
            matches!(err, KernelPatchError::DuplicateFunction { .. }),
            "{err}"
        );
        let err = build(&[]).unwrap_err();
        assert!(matches!(err, KernelPatchError::NoFixes), "{err}");

        // The message names the function; its source names the missing code symbol.
        let err = build(&[("target_fn", "no_such_code")]).unwrap_err();
        let cause = std::error::Error::source(&err).map(ToString::to_string);
        assert!(err.to_string().contains("target_fn"), "{err}");
        assert!(
            !err.to_string().contains("no_such_code"),
            "the cause is printed once, by whoever prints the chain: {err}"
        );
        assert!(
            cause.as_deref().is_some_and(|c| c.contains("no_such_code")),
            "{cause:?}"
        );

        let err = build(&[("other_fn", "calls_missing")]).unwrap_err();
        assert!(
            matches!(&err, KernelPatchError::UnknownSymbol { symbol, code_symbol, .. }
                if symbol == "nothere" && code_symbol == "calls_missing"),
            "{err}"
        );
        assert!(err.to_string().contains("\"nothere\""), "{err}");
        let err = build(&[("other_fn", "calls_dup")]).unwrap_err();
        assert!(
            matches!(&err, KernelPatchError::AmbiguousSymbol { symbols, .. } if symbols.len() == 2),
            "{err}"
        );
        let err = build(&[("other_fn", "reads_percpu")]).unwrap_err();
        assert!(
            matches!(&err, KernelPatchError::AbsoluteSymbol { symbol, kind: 'A', .. }
                if symbol == "pcpu_hot"),
            "{err}"
        );
        // `%gs:pcpu_hot(%rip)`, as GCC compiles this_cpu_read(): the per-CPU variable.
        let p = build(&[("other_fn", "reads_percpu_gs")]).expect("a %gs: RIP-relative read");
        let r = &p.sites[0].relocations;
        assert!(
            r.iter()
                .any(|r| r.symbol_name() == Some("pcpu_hot")
                    && r.kind == patch_format::RelocKind::Rel32),
            "{r:?}"
        );

        let syms = symbols();
        let vmlinux = elf(BASE, &text(), 0);
        let no_id = TargetIdentity {
            build_id: None,
            ..identity()
        };
        let fixes = [KernelFix::new("target_fn", "fix")];
        let err = build_patch(
            &vmlinux,
            &SymbolTable::new(&syms),
            no_id,
            &object(),
            &fixes,
            meta(),
        )
        .unwrap_err();
        assert!(matches!(err, KernelPatchError::NoBuildId), "{err}");

        // Symbols from another kernel: the file has no bytes there.
        let moved = elf(BASE + 0x1000, &text(), 0);
        let err = build_patch(
            &moved,
            &SymbolTable::new(&syms),
            identity(),
            &object(),
            &fixes,
            meta(),
        )
        .unwrap_err();
        assert!(matches!(err, KernelPatchError::NoFileBytes { .. }), "{err}");

        // The last symbol has no extent.
        let last = [sym(BASE, 'T', "target_fn")];
        let err = build_patch(
            &vmlinux,
            &SymbolTable::new(&last),
            identity(),
            &object(),
            &fixes,
            meta(),
        )
        .unwrap_err();
        assert!(matches!(err, KernelPatchError::NoExtent { .. }), "{err}");
    }
}
