//! Guest page-table walks (GVA → GPA) that are safe on hostile tables.
//!
//! The patch engine must find where a guest-virtual address lives in guest-physical memory using
//! the guest's own page tables, which the guest controls. This walker reads at most one entry per
//! level (so a walk is at most five 8-byte reads: no loops a guest could build), refuses reserved
//! encodings instead of guessing, bounds every read by guest RAM, and reports the effective
//! permissions (writable, user, executable) combined across levels as the MMU does.
//! KVM's own `KVM_TRANSLATE` is not used: its answer would still have to be trusted blindly.

use thiserror::Error;

use crate::pte::{ADDR_MASK, NO_EXECUTE, PAGE_SIZE_BIT as PAGE_SIZE, PRESENT, USER, WRITABLE};

const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const EFER_NXE: u64 = 1 << 11;

/// The levels of the 64-bit page tables `regs` walk: 5 with CR4.LA57, else 4; `None` when
/// the vCPU is not in 64-bit paging mode (paging off, or not long mode with PAE).
pub fn long_mode_levels(regs: &PagingRegs) -> Option<u8> {
    let long = regs.cr0 & CR0_PG != 0 && regs.efer & EFER_LMA != 0 && regs.cr4 & CR4_PAE != 0;
    long.then_some(if regs.cr4 & CR4_LA57 != 0 { 5 } else { 4 })
}

/// The control registers that decide how a vCPU translates addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingRegs {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

/// Reads guest-physical memory for the walker; `None` when the address is not guest RAM.
pub trait PhysRead {
    fn read_u64(&self, gpa: u64) -> Option<u64>;
}

/// Where a virtual address lives and what the guest may do there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// Size of the page that maps it (4 KiB, 2 MiB, 1 GiB, or the whole space without paging).
    pub page_size: u64,
    pub writable: bool,
    pub user: bool,
    pub executable: bool,
}

#[derive(Debug, Clone, Copy, Error, PartialEq, Eq)]
pub enum WalkError {
    #[error(
        "the vCPU uses 32-bit paging or PAE without long mode, which the walker does not support"
    )]
    UnsupportedMode,
    #[error("{gva:#x} is not a canonical address for {levels}-level paging")]
    NonCanonical { gva: u64, levels: u8 },
    #[error("{gva:#x} is not mapped: the level-{level} entry at {entry_gpa:#x} is not present")]
    NotPresent { gva: u64, level: u8, entry_gpa: u64 },
    #[error("the level-{level} page-table entry at {entry_gpa:#x} is outside guest memory")]
    EntryOutsideMemory { level: u8, entry_gpa: u64 },
    #[error("the level-{level} entry at {entry_gpa:#x} ({entry:#x}) uses a reserved encoding")]
    Reserved {
        level: u8,
        entry_gpa: u64,
        entry: u64,
    },
}

/// Translates `gva` through the page tables described by `regs`.
pub fn translate(
    mem: &impl PhysRead,
    regs: &PagingRegs,
    gva: u64,
) -> Result<Translation, WalkError> {
    if regs.cr0 & CR0_PG == 0 {
        // Paging off: addresses are physical (32-bit protected mode, as at a PVH entry).
        return Ok(Translation {
            gpa: gva & 0xffff_ffff,
            page_size: 1 << 32,
            writable: true,
            user: true,
            executable: true,
        });
    }
    let levels = long_mode_levels(regs).ok_or(WalkError::UnsupportedMode)?;
    let va_bits = 12 + 9 * u32::from(levels);
    // Canonical: bits 63..va_bits-1 all equal.
    let top = (gva as i64) >> (va_bits - 1);
    if top != 0 && top != -1 {
        return Err(WalkError::NonCanonical { gva, levels });
    }
    let nx_enabled = regs.efer & EFER_NXE != 0;
    let mut table = regs.cr3 & ADDR_MASK;
    let (mut writable, mut user, mut executable) = (true, true, true);
    for level in (1..=levels).rev() {
        let shift = 12 + 9 * (u32::from(level) - 1);
        let index = (gva >> shift) & 0x1ff;
        let entry_gpa = table + index * 8;
        let entry = mem
            .read_u64(entry_gpa)
            .ok_or(WalkError::EntryOutsideMemory { level, entry_gpa })?;
        if entry & PRESENT == 0 {
            return Err(WalkError::NotPresent {
                gva,
                level,
                entry_gpa,
            });
        }
        if entry & NO_EXECUTE != 0 && !nx_enabled {
            // NX set while EFER.NXE is off is a reserved-bit fault on hardware.
            return Err(WalkError::Reserved {
                level,
                entry_gpa,
                entry,
            });
        }
        writable &= entry & WRITABLE != 0;
        user &= entry & USER != 0;
        executable &= entry & NO_EXECUTE == 0;
        // Bit 7 is the page size only above the last level; in a 4 KiB entry it is PAT (a
        // memory type), which a guest may set on any page, text included.
        let large = level > 1 && entry & PAGE_SIZE != 0;
        if large && level >= 4 {
            return Err(WalkError::Reserved {
                level,
                entry_gpa,
                entry,
            });
        }
        if level == 1 || large {
            let page_size = 1u64 << shift;
            let base = entry & ADDR_MASK;
            // A large page's base must be aligned to its size (bit 12 is PAT there).
            let base = if large {
                let pat_cleared = base & !(1 << 12);
                if pat_cleared & (page_size - 1) != 0 {
                    return Err(WalkError::Reserved {
                        level,
                        entry_gpa,
                        entry,
                    });
                }
                pat_cleared
            } else {
                base
            };
            return Ok(Translation {
                gpa: base | (gva & (page_size - 1)),
                page_size,
                writable,
                user,
                executable,
            });
        }
        table = entry & ADDR_MASK;
    }
    // Unreachable for levels >= 1; keep the walker total without panicking.
    Err(WalkError::UnsupportedMode)
}

/// Translates `len` bytes from `gva`, split where they cross pages: `(gpa, len)` pieces in order.
pub fn translate_range(
    mem: &impl PhysRead,
    regs: &PagingRegs,
    gva: u64,
    len: u64,
) -> Result<Vec<(u64, u64)>, WalkError> {
    let mut pieces = Vec::new();
    let mut at = gva;
    let end = gva.saturating_add(len);
    while at < end {
        let t = translate(mem, regs, at)?;
        let in_page = t.page_size - (t.gpa & (t.page_size - 1));
        let n = in_page.min(end - at);
        match pieces.last_mut() {
            Some((gpa, l)) if *gpa + *l == t.gpa => *l += n,
            _ => pieces.push((t.gpa, n)),
        }
        at += n;
    }
    Ok(pieces)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Sparse guest memory: 8-byte words, with a RAM limit.
    #[derive(Default)]
    struct Mem {
        words: HashMap<u64, u64>,
        limit: u64,
    }
    impl PhysRead for Mem {
        fn read_u64(&self, gpa: u64) -> Option<u64> {
            (gpa.checked_add(8)? <= self.limit).then(|| self.words.get(&gpa).copied().unwrap_or(0))
        }
    }
    impl Mem {
        fn new() -> Self {
            Mem {
                words: HashMap::new(),
                limit: 1 << 32,
            }
        }
        fn set(&mut self, table: u64, index: u64, value: u64) {
            self.words.insert(table + index * 8, value);
        }
    }

    const P: u64 = PRESENT | WRITABLE | USER;
    fn long4() -> PagingRegs {
        PagingRegs {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | EFER_NXE | (1 << 8),
        }
    }
    fn idx(gva: u64, level: u32) -> u64 {
        (gva >> (12 + 9 * (level - 1))) & 0x1ff
    }

    /// Maps kernel-style high address 0xffffffff81000000 with 4 KiB pages.
    fn four_k(mem: &mut Mem, gva: u64, gpa: u64, leaf_flags: u64) {
        mem.set(0x1000, idx(gva, 4), 0x2000 | P);
        mem.set(0x2000, idx(gva, 3), 0x3000 | P);
        mem.set(0x3000, idx(gva, 2), 0x4000 | P);
        mem.set(0x4000, idx(gva, 1), gpa | leaf_flags);
    }

    #[test]
    fn four_kib_pages_in_the_higher_half() {
        let mut mem = Mem::new();
        let gva = 0xffff_ffff_8100_0000u64;
        four_k(&mut mem, gva, 0x20_0000, PRESENT | NO_EXECUTE);
        let t = translate(&mem, &long4(), gva + 0x123).expect("mapped");
        assert_eq!(t.gpa, 0x20_0123);
        assert_eq!(t.page_size, 4096);
        assert!(!t.writable && !t.user && !t.executable);
    }

    #[test]
    fn the_pat_bit_of_a_4_kib_page_is_no_page_size() {
        // Bit 7 of a last-level entry selects a memory type: an odd frame stays odd.
        let mut mem = Mem::new();
        let gva = 0xffff_ffff_8100_0000u64;
        four_k(&mut mem, gva, 0x5000, PRESENT | PAGE_SIZE);
        let t = translate(&mem, &long4(), gva + 0x10).expect("mapped");
        assert_eq!((t.gpa, t.page_size), (0x5010, 4096));
    }

    #[test]
    fn large_pages() {
        let mut mem = Mem::new();
        let regs = long4();
        // 2 MiB page at PD level.
        mem.set(0x1000, 0, 0x2000 | P);
        mem.set(0x2000, 0, 0x3000 | P);
        mem.set(0x3000, 1, 0x40_0000 | P | PAGE_SIZE);
        let t = translate(&mem, &regs, 0x20_1234).expect("2M");
        assert_eq!((t.gpa, t.page_size), (0x40_1234, 2 << 20));
        // 1 GiB page at PDPT level.
        mem.set(0x2000, 1, 0x8000_0000 | P | PAGE_SIZE);
        let t = translate(&mem, &regs, 0x4000_0042).expect("1G");
        assert_eq!((t.gpa, t.page_size), (0x8000_0042, 1 << 30));
        assert!(t.executable && t.writable);
    }

    #[test]
    fn five_level_paging() {
        let mut mem = Mem::new();
        let mut regs = long4();
        regs.cr4 |= CR4_LA57;
        let gva = 0xff00_0000_0000_1000u64;
        mem.set(0x1000, idx(gva, 5), 0x2000 | P);
        mem.set(0x2000, idx(gva, 4), 0x3000 | P);
        mem.set(0x3000, idx(gva, 3), 0x4000 | P);
        mem.set(0x4000, idx(gva, 2), 0x5000 | P);
        mem.set(0x5000, idx(gva, 1), 0x9000 | P);
        assert_eq!(translate(&mem, &regs, gva + 8).map(|t| t.gpa), Ok(0x9008));
        // Canonical for 5 levels, not for 4.
        assert!(matches!(
            translate(&mem, &long4(), gva),
            Err(WalkError::NonCanonical { levels: 4, .. })
        ));
    }

    #[test]
    fn hostile_tables_are_refused_not_followed() {
        let mut mem = Mem::new();
        let regs = long4();
        // Not present.
        assert!(matches!(
            translate(&mem, &regs, 0x1000),
            Err(WalkError::NotPresent { level: 4, .. })
        ));
        // A table pointer outside guest RAM.
        mem.set(0x1000, 0, 0xf_ffff_ffff_f000 | P);
        assert!(matches!(
            translate(&mem, &regs, 0x1000),
            Err(WalkError::EntryOutsideMemory { level: 3, .. })
        ));
        // PS at the PML4 level is reserved.
        mem.set(0x1000, 0, 0x2000 | P | PAGE_SIZE);
        assert!(matches!(
            translate(&mem, &regs, 0x1000),
            Err(WalkError::Reserved { level: 4, .. })
        ));
        // A misaligned 2 MiB page.
        mem.set(0x1000, 0, 0x2000 | P);
        mem.set(0x2000, 0, 0x3000 | P);
        mem.set(0x3000, 0, 0x40_3000 | P | PAGE_SIZE);
        assert!(matches!(
            translate(&mem, &regs, 0x10),
            Err(WalkError::Reserved { level: 2, .. })
        ));
        // A self-referencing table: the walk still ends after exactly four reads, with the
        // table itself as the "page" — defined, bounded, and no loop.
        mem.set(0x1000, 0, 0x1000 | P);
        assert_eq!(
            translate(&mem, &regs, 0x8).map(|t| (t.gpa, t.page_size)),
            Ok((0x1008, 4096))
        );
        // NX with EFER.NXE off is reserved.
        let mut no_nx = regs;
        no_nx.efer &= !EFER_NXE;
        four_k(&mut mem, 0x7000_0000, 0x5000, P | NO_EXECUTE);
        assert!(matches!(
            translate(&mem, &no_nx, 0x7000_0000),
            Err(WalkError::Reserved { level: 1, .. })
        ));
    }

    #[test]
    fn permissions_combine_across_levels() {
        let mut mem = Mem::new();
        let gva = 0x6000_0000u64;
        mem.set(0x1000, idx(gva, 4), 0x2000 | PRESENT | USER); // read-only above
        mem.set(0x2000, idx(gva, 3), 0x3000 | P);
        mem.set(0x3000, idx(gva, 2), 0x4000 | P | NO_EXECUTE);
        mem.set(0x4000, idx(gva, 1), 0x7000 | P);
        let t = translate(&mem, &long4(), gva).expect("mapped");
        assert!(!t.writable && t.user && !t.executable);
    }

    #[test]
    fn paging_off_is_identity_and_legacy_modes_are_refused() {
        let mem = Mem::new();
        let off = PagingRegs {
            cr0: 1,
            cr3: 0,
            cr4: 0,
            efer: 0,
        };
        assert_eq!(
            translate(&mem, &off, 0x12_3456).map(|t| t.gpa),
            Ok(0x12_3456)
        );
        let legacy = PagingRegs {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: 0,
            efer: 0,
        };
        assert_eq!(
            translate(&mem, &legacy, 0x1000),
            Err(WalkError::UnsupportedMode)
        );
    }

    #[test]
    fn ranges_split_at_page_boundaries() {
        let mut mem = Mem::new();
        let regs = long4();
        let gva = 0x40_0ffcu64;
        four_k(&mut mem, 0x40_0000, 0x9000, P);
        mem.set(0x4000, idx(0x40_1000, 1), 0x5000 | P); // next page is elsewhere
        let pieces = translate_range(&mem, &regs, gva, 8).expect("range");
        assert_eq!(pieces, vec![(0x9ffc, 4), (0x5000, 4)]);
        // Contiguous pages merge into one piece.
        mem.set(0x4000, idx(0x40_1000, 1), 0xa000 | P);
        assert_eq!(translate_range(&mem, &regs, gva, 8), Ok(vec![(0x9ffc, 8)]));
    }
}
