//! The in-memory form of a hot patch. Every value of these types that passes
//! [`Patch::validate`](crate::Patch::validate) has exactly one encoding, so the
//! patch id (SHA-256 of that encoding) names the patch's content and nothing else.

use std::fmt;

/// Hard limits of the format (versions 1 and 2). They bound what the parser will accept (and
/// so what it can be made to allocate); the encoder refuses anything beyond them.
pub mod limits {
    /// Largest accepted `.hpatch` file.
    pub const MAX_FILE: usize = 16 * 1024 * 1024;
    /// Most sites in one patch.
    pub const MAX_SITES: usize = 4096;
    /// Largest new code of one site.
    pub const MAX_CODE: usize = 1024 * 1024;
    /// Largest expected pre-patch bytes of one site.
    pub const MAX_EXPECTED: usize = 1024 * 1024;
    /// Most relocations of one site.
    pub const MAX_RELOCATIONS: usize = 65536;
    /// Longest string (bytes of UTF-8).
    pub const MAX_STRING: usize = 4096;
    /// Most advisory ids.
    pub const MAX_ADVISORIES: usize = 256;
    /// Most replaced patch ids.
    pub const MAX_REPLACES: usize = 256;
    /// Longest build id (GNU build ids are 20 bytes for sha1, 16 for md5/uuid).
    pub const MAX_BUILD_ID: usize = 64;
    /// Most read-only data blocks of one patch (version 2).
    pub const MAX_DATA_BLOCKS: usize = 4096;
    /// Largest data block (version 2).
    pub const MAX_DATA: usize = 1024 * 1024;
    /// Largest alignment a data block may ask for: a page. The arena places blocks at
    /// guest-virtual addresses that are multiples of it.
    pub const MAX_DATA_ALIGN: u32 = 4096;
}

/// Splits livepatch's `sympos` off a symbol name: `name,N` (N ≥ 1, decimal) names the N-th, in
/// address order, of the symbols called `name` (static functions of one name in several files).
/// Any other name is returned whole with `None`.
pub fn split_sympos(name: &str) -> (&str, Option<usize>) {
    if let Some((base, pos)) = name.rsplit_once(',')
        && !base.is_empty()
        && !pos.is_empty()
        && pos.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = pos.parse::<usize>()
        && n >= 1
    {
        return (base, Some(n));
    }
    (name, None)
}

/// The newest format version this crate writes: 2, for patches that carry read-only data.
/// A patch without data is still written as version 1 (see [`Patch::format_version`]), so
/// version-1 readers keep reading it and its id does not change.
pub const FORMAT_VERSION: u16 = 2;

/// Every format version this crate reads.
pub const SUPPORTED_VERSIONS: [u16; 2] = [1, 2];

/// A patch id: SHA-256 of the canonical body encoding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PatchId(pub [u8; 32]);

impl PatchId {
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<PatchId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).ok()?;
        Some(PatchId(out))
    }
}

impl fmt::Display for PatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PatchId({self})")
    }
}

/// A whole patch: what it is, what it applies to, and what it changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Patch {
    pub meta: Metadata,
    pub target: TargetIdentity,
    /// Sorted by [`Site::target`], no two at the same location.
    pub sites: Vec<Site>,
    /// Read-only data the sites' code refers to (string literals, constant tables), placed by
    /// the engine in the arena next to the code and reached through relocations whose target
    /// is [`RelocTarget::Data`]. Indexed by those relocations; every block is referenced by at
    /// least one. Empty for a version-1 patch.
    pub data: Vec<DataBlock>,
}

/// One block of read-only data a patch carries (format version 2): bytes the engine copies into
/// the arena at an address aligned to `align`. Nothing writes it afterwards: there is no
/// per-patch writable state (the guest would have to be trusted to keep it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataBlock {
    /// Alignment of the block's guest-virtual address: a power of two, 1..=4096.
    pub align: u32,
    /// The contents, 1..=1 MiB.
    pub bytes: Vec<u8>,
}

/// Human-facing description of a patch, plus the ids it supersedes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Metadata {
    /// Short name, non-empty.
    pub name: String,
    /// Free text; may contain newlines and tabs.
    pub description: String,
    pub author: String,
    /// Creation time in seconds since the Unix epoch. Part of the body, so two
    /// builds at different times have different ids (use `SOURCE_DATE_EPOCH` to
    /// reproduce a build exactly).
    pub created: u64,
    /// Advisory ids (e.g. `CVE-2026-1234`), sorted, no duplicates.
    pub advisories: Vec<String>,
    /// Patches this one supersedes (cumulative / atomic replace), sorted, no duplicates.
    pub replaces: Vec<PatchId>,
}

/// What the patch applies to. Applying it to anything else must be refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetIdentity {
    /// Human-readable name of the guest image, non-empty.
    pub name: String,
    /// GNU build-id note of the image (1..=64 bytes).
    pub build_id: Option<Vec<u8>>,
    /// SHA-256 of the concatenated file contents of the image's executable
    /// `PT_LOAD` segments, in program-header order.
    pub text_sha256: Option<[u8; 32]>,
}

/// Where a site is, resolved against the running guest's symbols at apply time.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Location {
    /// `name + offset`.
    Symbol { name: String, offset: u64 },
    /// An absolute guest-virtual address (no KASLR slide applied by the format).
    Address(u64),
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Symbol { name, offset: 0 } => write!(f, "{name}"),
            Location::Symbol { name, offset } => write!(f, "{name}+{offset:#x}"),
            Location::Address(a) => write!(f, "{a:#x}"),
        }
    }
}

/// The two kinds of change a site makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteKind {
    /// Redirect the function at `target` to `code` (kpatch / Windows Hotpatch).
    Function,
    /// Run `code` before the whole instructions in `expected`, which the engine
    /// relocates after it, then continue after them (0patch / Detours).
    Micropatch,
}

impl SiteKind {
    pub(crate) fn tag(self) -> u8 {
        match self {
            SiteKind::Function => 1,
            SiteKind::Micropatch => 2,
        }
    }
    pub(crate) fn from_tag(t: u8) -> Option<SiteKind> {
        match t {
            1 => Some(SiteKind::Function),
            2 => Some(SiteKind::Micropatch),
            _ => None,
        }
    }
    /// Lower-case name used in docs, manifests and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            SiteKind::Function => "function",
            SiteKind::Micropatch => "micropatch",
        }
    }
}

/// One change to the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Site {
    pub kind: SiteKind,
    pub target: Location,
    /// Bytes that must be at `target` before patching (Ksplice's run-pre
    /// check). Function sites: the whole old function (see docs); micropatch
    /// sites: the whole instructions displaced by the jump (>= 5 bytes).
    pub expected: Vec<u8>,
    /// The new code, position independent except for `relocations`.
    pub code: Vec<u8>,
    /// Sorted by offset, fields within `code` and not overlapping.
    pub relocations: Vec<Relocation>,
}

/// How a relocation's value is computed and stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RelocKind {
    /// `S + A - P` as a signed 32-bit little-endian value (`R_X86_64_PC32`/`PLT32`).
    Rel32,
    /// `S + A` as a 64-bit little-endian value (`R_X86_64_64`).
    Abs64,
    /// `S + A` as an unsigned (zero-extended) 32-bit value (`R_X86_64_32`).
    Abs32,
    /// `S + A` as a sign-extended 32-bit value (`R_X86_64_32S`).
    Abs32S,
}

impl RelocKind {
    pub(crate) fn tag(self) -> u8 {
        match self {
            RelocKind::Rel32 => 1,
            RelocKind::Abs64 => 2,
            RelocKind::Abs32 => 3,
            RelocKind::Abs32S => 4,
        }
    }
    pub(crate) fn from_tag(t: u8) -> Option<RelocKind> {
        match t {
            1 => Some(RelocKind::Rel32),
            2 => Some(RelocKind::Abs64),
            3 => Some(RelocKind::Abs32),
            4 => Some(RelocKind::Abs32S),
            _ => None,
        }
    }
    /// Size of the patched field in bytes.
    pub fn width(self) -> usize {
        match self {
            RelocKind::Abs64 => 8,
            RelocKind::Rel32 | RelocKind::Abs32 | RelocKind::Abs32S => 4,
        }
    }
    /// Lower-case name used in docs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RelocKind::Rel32 => "rel32",
            RelocKind::Abs64 => "abs64",
            RelocKind::Abs32 => "abs32",
            RelocKind::Abs32S => "abs32s",
        }
    }
}

/// What a relocation's `S` is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RelocTarget {
    /// A symbol of the running guest, resolved at apply time.
    Symbol(String),
    /// The start of the patch's data block with this index ([`Patch::data`]), wherever the
    /// engine places it (format version 2).
    Data(u32),
}

impl fmt::Display for RelocTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RelocTarget::Symbol(s) => f.write_str(s),
            RelocTarget::Data(i) => write!(f, "data[{i}]"),
        }
    }
}

/// A symbolic relocation, resolved when the patch is applied: against the running guest's
/// symbols (like kernel livepatch's `.klp.rela` relocations) or against one of the patch's own
/// data blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relocation {
    /// Offset of the field in the site's `code`.
    pub offset: u32,
    pub kind: RelocKind,
    /// S: a guest symbol or a data block of the patch.
    pub target: RelocTarget,
    /// Addend (A).
    pub addend: i64,
}

impl Relocation {
    /// A relocation against the guest symbol `symbol`.
    pub fn symbol(offset: u32, kind: RelocKind, symbol: impl Into<String>, addend: i64) -> Self {
        Relocation {
            offset,
            kind,
            target: RelocTarget::Symbol(symbol.into()),
            addend,
        }
    }

    /// The guest symbol it refers to, `None` for a data relocation.
    pub fn symbol_name(&self) -> Option<&str> {
        match &self.target {
            RelocTarget::Symbol(s) => Some(s),
            RelocTarget::Data(_) => None,
        }
    }
}

impl Patch {
    /// The format version this patch is written in: 1 without data, 2 with. Each patch has one
    /// encoding, so a patch without data is never written as version 2.
    pub fn format_version(&self) -> u16 {
        let data_reloc = self.sites.iter().any(|s| {
            s.relocations
                .iter()
                .any(|r| matches!(r.target, RelocTarget::Data(_)))
        });
        if self.data.is_empty() && !data_reloc {
            1
        } else {
            2
        }
    }

    /// Puts the order-insensitive lists into their canonical order (advisories,
    /// replaces, sites, relocations). Duplicates are left for `validate` to report.
    pub fn normalize(&mut self) {
        self.meta.advisories.sort();
        self.meta.replaces.sort();
        self.sites.sort_by(|a, b| a.target.cmp(&b.target));
        for s in &mut self.sites {
            s.relocations.sort_by_key(|r| r.offset);
        }
    }
}

#[cfg(test)]
mod sympos_tests {
    use super::split_sympos;

    #[test]
    fn sympos_is_split_off_only_when_it_is_one() {
        assert_eq!(
            split_sympos("load_elf_binary,2"),
            ("load_elf_binary", Some(2))
        );
        assert_eq!(split_sympos("load_elf_binary"), ("load_elf_binary", None));
        for whole in ["f,0", "f,", ",2", "f,x", "f,-1", "f,2a"] {
            assert_eq!(split_sympos(whole), (whole, None), "{whole}");
        }
    }
}
