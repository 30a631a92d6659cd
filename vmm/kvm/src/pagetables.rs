//! Identity-map page tables the VMM builds for images entered directly in 64-bit mode.
//!
//! A PVH image builds its own tables (it starts with paging off); an ELF entered in long mode
//! needs paging on from its first instruction, so the VMM provides an identity map of the
//! first 4 GiB with 2 MiB pages: enough for the image, the boot structures and the MMIO hole.

use crate::layout::PAGE_TABLES;

pub use guest_control::pte::{
    ACCESSED, ADDR_MASK, DIRTY, GLOBAL, NO_EXECUTE, PAGE_SIZE_BIT, PRESENT, USER, WRITABLE,
};

const PAGE: u64 = 0x1000;
const HUGE_2M: u64 = 2 << 20;
/// Gibibytes covered by the identity map (one page directory each).
pub const MAPPED_GIB: u64 = 4;

/// The page-table pages, ready to be written at `PAGE_TABLES`: PML4, PDPT, then one page
/// directory per mapped GiB. Returns (guest-physical address, page contents) pairs.
pub fn identity_map() -> Vec<(u64, [u64; 512])> {
    let pml4_addr = PAGE_TABLES;
    let pdpt_addr = PAGE_TABLES + PAGE;
    let mut pml4 = [0u64; 512];
    pml4[0] = pdpt_addr | PRESENT | WRITABLE;
    let mut pdpt = [0u64; 512];
    let mut pages = Vec::with_capacity(2 + MAPPED_GIB as usize);
    let mut directories = Vec::with_capacity(MAPPED_GIB as usize);
    for gib in 0..MAPPED_GIB {
        let pd_addr = PAGE_TABLES + (2 + gib) * PAGE;
        pdpt[gib as usize] = pd_addr | PRESENT | WRITABLE;
        let mut pd = [0u64; 512];
        for (i, entry) in pd.iter_mut().enumerate() {
            let phys = (gib << 30) + i as u64 * HUGE_2M;
            *entry = phys | PRESENT | WRITABLE | PAGE_SIZE_BIT;
        }
        directories.push((pd_addr, pd));
    }
    pages.push((pml4_addr, pml4));
    pages.push((pdpt_addr, pdpt));
    pages.extend(directories);
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::PAGE_TABLES_SIZE;
    use std::collections::HashMap;

    /// Walks the built tables the way the MMU would, for a 4-level, 4 KiB-granular lookup.
    fn translate(tables: &HashMap<u64, [u64; 512]>, cr3: u64, va: u64) -> Option<u64> {
        let mut table = cr3 & ADDR_MASK;
        for level in (0..4).rev() {
            let index = ((va >> (12 + 9 * level)) & 0x1ff) as usize;
            let entry = tables.get(&table)?[index];
            if entry & PRESENT == 0 {
                return None;
            }
            if level > 0 && entry & PAGE_SIZE_BIT != 0 {
                let page_size = 1u64 << (12 + 9 * level);
                return Some((entry & ADDR_MASK & !(page_size - 1)) | (va & (page_size - 1)));
            }
            table = entry & ADDR_MASK;
            if level == 0 {
                return Some(table | (va & 0xfff));
            }
        }
        None
    }

    #[test]
    fn identity_maps_the_first_four_gib() {
        let tables: HashMap<_, _> = identity_map().into_iter().collect();
        for va in [
            0u64,
            0x1000,
            0x10_0000,
            0x1234_5678,
            0xbfff_ffff,
            0xffff_fffe,
        ] {
            assert_eq!(translate(&tables, PAGE_TABLES, va), Some(va), "va {va:#x}");
        }
        assert_eq!(translate(&tables, PAGE_TABLES, 1 << 32), None);
        assert_eq!(translate(&tables, PAGE_TABLES, 0xffff_8000_0000_0000), None);
    }

    #[test]
    fn tables_fit_their_reserved_space() {
        let pages = identity_map();
        assert_eq!(pages.len() as u64 * PAGE, PAGE_TABLES_SIZE);
        for (addr, _) in &pages {
            assert!(*addr >= PAGE_TABLES && *addr + PAGE <= PAGE_TABLES + PAGE_TABLES_SIZE);
            assert_eq!(addr % PAGE, 0);
        }
    }

    #[test]
    fn entries_are_writable_present_and_large_at_the_leaves() {
        let pages = identity_map();
        for (_, pd) in &pages[2..] {
            assert!(pd.iter().all(|e| e & (PRESENT | WRITABLE | PAGE_SIZE_BIT)
                == (PRESENT | WRITABLE | PAGE_SIZE_BIT)));
        }
        // No reserved bits and no NX bit anywhere: the image must be executable.
        for (_, page) in &pages {
            assert!(page.iter().all(|e| e >> 52 == 0));
        }
    }
}
