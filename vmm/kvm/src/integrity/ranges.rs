//! Which guest-physical memory holds code: ranges from the guest image, the patch arena, the
//! command line and the API, page-aligned (KVM slots, and so protection, work in whole pages).

use object::read::elf::{ElfFile64, ProgramHeader};
use object::{Endianness, elf};
use serde::Serialize;
use thiserror::Error;

use crate::layout;

pub const PAGE: u64 = 4096;

/// Where a protected range came from (shown to operators, so they can tell the image's code
/// from ranges someone added).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RangeSource {
    /// An executable program header of the guest's ELF image.
    Image,
    /// The patch arena: patch code lives there, so the guest must not write it either.
    Arena,
    /// `vmm run --code-range`.
    CommandLine,
    /// `POST /v1/integrity/ranges` (or `vmm integrity --protect`).
    Api,
    /// A Linux guest's kernel text (`_stext`..`_etext`), protected once the kernel has booted.
    KernelText,
}

/// A protected guest-physical range, `[start, end)`, page-aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CodeRange {
    #[serde(serialize_with = "crate::integrity::hex")]
    pub start: u64,
    #[serde(serialize_with = "crate::integrity::hex")]
    pub end: u64,
    pub source: RangeSource,
}

impl CodeRange {
    /// The range covering every page `[start, end)` touches.
    pub fn covering(start: u64, end: u64, source: RangeSource) -> CodeRange {
        CodeRange {
            start: start & !(PAGE - 1),
            end: end.saturating_add(PAGE - 1) & !(PAGE - 1),
            source,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum RangeError {
    #[error(
        "code range {0:?} is not START-END or START+LENGTH (numbers in hex with 0x, or decimal), e.g. 0x100000-0x106000"
    )]
    Syntax(String),
    #[error("code range {start:#x}-{end:#x} is empty; END must be above START")]
    Empty { start: u64, end: u64 },
    #[error(
        "code range {start:#x}-{end:#x} is not all guest memory (guest RAM is {ram}; the patch arena is {arena_start:#x}-{arena_end:#x}); give a range inside them"
    )]
    OutsideMemory {
        start: u64,
        end: u64,
        ram: String,
        arena_start: u64,
        arena_end: u64,
    },
    #[error("the guest image's program headers cannot be read: {0}")]
    Image(String),
}

fn number(s: &str) -> Option<u64> {
    let s = s.trim().replace('_', "");
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses `START-END` or `START+LENGTH` into `[start, end)` (not yet page-aligned).
pub fn parse(text: &str) -> Result<(u64, u64), RangeError> {
    let syntax = || RangeError::Syntax(text.to_string());
    let (start, end) = if let Some((a, b)) = text.split_once('+') {
        let start = number(a).ok_or_else(syntax)?;
        let len = number(b).ok_or_else(syntax)?;
        (start, start.checked_add(len).ok_or_else(syntax)?)
    } else if let Some((a, b)) = text.split_once('-') {
        (number(a).ok_or_else(syntax)?, number(b).ok_or_else(syntax)?)
    } else {
        return Err(syntax());
    };
    if end <= start {
        return Err(RangeError::Empty { start, end });
    }
    Ok((start, end))
}

/// Checks that `[start, end)` lies in guest RAM (of `mem_size` bytes) or in the patch arena:
/// protecting anything else would mean nothing (there is no memory there to write).
pub fn check_in_memory(start: u64, end: u64, mem_size: u64) -> Result<(), RangeError> {
    let ram = layout::ram_regions(mem_size);
    // Every page of the range must be covered by one RAM region or the arena.
    let mut at = start;
    while at < end {
        let region_end = ram
            .iter()
            .map(|r| (r.start, r.start + r.size))
            .chain(std::iter::once((
                layout::PATCH_ARENA_START,
                layout::PATCH_ARENA_END,
            )))
            .find(|(s, e)| *s <= at && at < *e)
            .map(|(_, e)| e);
        match region_end {
            Some(e) => at = e,
            None => {
                return Err(RangeError::OutsideMemory {
                    start,
                    end,
                    ram: ram
                        .iter()
                        .map(|r| format!("{:#x}-{:#x}", r.start, r.start + r.size))
                        .collect::<Vec<_>>()
                        .join(", "),
                    arena_start: layout::PATCH_ARENA_START,
                    arena_end: layout::PATCH_ARENA_END,
                });
            }
        }
    }
    Ok(())
}

/// What the guest image says about its code.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ImageCode {
    /// Guest-physical ranges of executable `PT_LOAD` segments, page-aligned.
    pub ranges: Vec<CodeRange>,
    /// Pages that hold code and also part of a writable segment: the guest's own data writes
    /// there will be seen as violations (a linker script that does not page-align its data).
    pub shared_pages: Vec<u64>,
}

/// Reads the executable segments of an ELF image. Images that are not 64-bit ELF have no
/// segments we can name: the operator gives their code with `--code-range`.
pub fn image_code(bytes: &[u8]) -> Result<ImageCode, RangeError> {
    let Ok(file) = ElfFile64::<Endianness>::parse(bytes) else {
        return Ok(ImageCode::default());
    };
    let endian = file.endian();
    let mut code = Vec::new();
    let mut writable = Vec::new();
    for ph in file.elf_program_headers() {
        if ph.p_type(endian) != elf::PT_LOAD || ph.p_memsz(endian) == 0 {
            continue;
        }
        let start = ph.p_paddr(endian);
        let end = start
            .checked_add(ph.p_memsz(endian))
            .ok_or_else(|| RangeError::Image(format!("segment at {start:#x} wraps around")))?;
        let flags = ph.p_flags(endian);
        if flags.contains(elf::PF_X) {
            code.push(CodeRange::covering(start, end, RangeSource::Image));
        }
        if flags.contains(elf::PF_W) {
            writable.push((start, end));
        }
    }
    let mut shared_pages = Vec::new();
    for r in &code {
        for &(ws, we) in &writable {
            let mut page = r.start.max(ws & !(PAGE - 1));
            while page < r.end.min(we) {
                if !shared_pages.contains(&page) {
                    shared_pages.push(page);
                }
                page += PAGE;
            }
        }
    }
    Ok(ImageCode {
        ranges: code,
        shared_pages,
    })
}

/// The union of `ranges` as sorted, disjoint `[start, end)` pairs.
pub fn merged(ranges: &[CodeRange]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.end)).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms_and_refuses_garbage() {
        assert_eq!(parse("0x100000-0x106000"), Ok((0x100000, 0x106000)));
        assert_eq!(parse("0x100000+0x2000"), Ok((0x100000, 0x102000)));
        assert_eq!(parse("4096+4096"), Ok((4096, 8192)));
        assert!(matches!(
            parse("0x2000-0x1000"),
            Err(RangeError::Empty { .. })
        ));
        assert!(matches!(parse("0x1000+0"), Err(RangeError::Empty { .. })));
        assert!(matches!(parse("text"), Err(RangeError::Syntax(_))));
        assert!(matches!(parse("0x1000-zz"), Err(RangeError::Syntax(_))));
        assert!(matches!(
            parse("0xffffffffffffffff+2"),
            Err(RangeError::Syntax(_))
        ));
    }

    #[test]
    fn covering_rounds_outwards_to_pages() {
        let r = CodeRange::covering(0x100010, 0x105cea, RangeSource::Image);
        assert_eq!((r.start, r.end), (0x100000, 0x106000));
        let r = CodeRange::covering(0x1000, 0x2000, RangeSource::Api);
        assert_eq!((r.start, r.end), (0x1000, 0x2000));
    }

    #[test]
    fn memory_check_accepts_ram_and_arena_only() {
        let mem = 128 << 20;
        assert!(check_in_memory(0x100000, 0x200000, mem).is_ok());
        assert!(check_in_memory(layout::PATCH_ARENA_START, layout::PATCH_ARENA_END, mem).is_ok());
        let err = check_in_memory(0x100000, (128 << 20) + 0x1000, mem).err();
        assert!(
            matches!(err, Some(RangeError::OutsideMemory { .. })),
            "{err:?}"
        );
        assert!(check_in_memory(0xfee0_0000, 0xfee0_1000, mem).is_err());
    }

    #[test]
    fn merges_overlapping_and_touching_ranges() {
        let r = |s, e| CodeRange {
            start: s,
            end: e,
            source: RangeSource::Api,
        };
        assert_eq!(
            merged(&[
                r(0x5000, 0x6000),
                r(0x1000, 0x3000),
                r(0x3000, 0x4000),
                r(0x2000, 0x2800)
            ]),
            vec![(0x1000, 0x4000), (0x5000, 0x6000)]
        );
    }

    #[test]
    fn the_test_guest_has_one_code_segment_and_no_shared_page() {
        let bytes = guest_tools::test_guest(guest_tools::GuestBuild::V1);
        let code = image_code(bytes).unwrap_or_default();
        assert_eq!(code.ranges.len(), 1, "{code:?}");
        assert_eq!(code.ranges[0].start, guest_tools::protocol::LINK_ADDRESS);
        assert!(code.ranges[0].end > code.ranges[0].start);
        assert!(code.shared_pages.is_empty(), "{code:?}");
        // Not an ELF: nothing to name, not an error.
        assert_eq!(image_code(b"not an elf"), Ok(ImageCode::default()));
    }
}
