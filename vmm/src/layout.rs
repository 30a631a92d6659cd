//! Where things live in guest-physical memory.
//!
//! One place for every fixed address the VMM writes at boot, so that the memory map handed to
//! the guest, the page tables and the loaders cannot disagree. The low addresses follow the
//! conventions Linux and PVH guests expect (nothing below 1 MiB but boot structures).

/// Boot GDT shared by the PVH and the 64-bit entry paths.
pub const BOOT_GDT: u64 = 0x500;
/// Number of 8-byte entries in the boot GDT (null, code32/64, data, TSS).
pub const BOOT_GDT_ENTRIES: usize = 4;
/// PVH `hvm_start_info`, or the Linux zero page on the 64-bit entry path.
pub const BOOT_INFO: u64 = 0x6000;
/// PVH memory map table (array of `hvm_memmap_table_entry`).
pub const PVH_MEMMAP: u64 = 0x7000;
/// Identity-map page tables built by the VMM for the 64-bit entry path (PML4, PDPT, 4 PDs).
pub const PAGE_TABLES: u64 = 0x9000;
/// Bytes reserved for the page tables: PML4 + PDPT + 4 page directories.
pub const PAGE_TABLES_SIZE: u64 = 6 * 0x1000;
/// Kernel command line, NUL-terminated.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line accepted, including the NUL.
pub const CMDLINE_MAX: usize = 0x1_0000;
/// End of the conventional low memory the guest may use as RAM (EBDA starts here).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Images are loaded at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole: RAM above it is moved to 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// KVM's TSS needs three pages of guest-physical space no RAM uses (VMX requirement).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// The smallest guest this VMM builds: boot structures plus room to load an image.
pub const MIN_MEMORY: u64 = 4 << 20;

/// A range of guest-physical RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRegion {
    pub start: u64,
    pub size: u64,
}

impl RamRegion {
    pub fn end(&self) -> u64 {
        self.start + self.size
    }
}

/// Splits `mem_size` bytes of RAM around the 32-bit MMIO hole.
///
/// Why: devices and the KVM TSS live in [3 GiB, 4 GiB); RAM that would fall there is placed
/// above 4 GiB instead, as on real PCs.
pub fn ram_regions(mem_size: u64) -> Vec<RamRegion> {
    if mem_size <= MMIO_HOLE_START {
        vec![RamRegion {
            start: 0,
            size: mem_size,
        }]
    } else {
        vec![
            RamRegion {
                start: 0,
                size: MMIO_HOLE_START,
            },
            RamRegion {
                start: MMIO_HOLE_END,
                size: mem_size - MMIO_HOLE_START,
            },
        ]
    }
}

/// E820 memory types used in the map given to the guest.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the memory map the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The memory map handed to the guest: low RAM below the EBDA, then RAM from 1 MiB.
///
/// The first MiB above `LOW_RAM_END` (EBDA, VGA, BIOS) is absent so a guest never allocates
/// the boot structures' neighbourhood; boot structures below `LOW_RAM_END` are the guest's to
/// reclaim once booted, as with any PC firmware.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: LOW_RAM_END,
        kind: E820_RAM,
    }];
    for region in ram_regions(mem_size) {
        let start = region.start.max(HIMEM_START);
        if region.end() > start {
            map.push(E820Entry {
                addr: start,
                size: region.end() - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(
            ram_regions(128 << 20),
            vec![RamRegion {
                start: 0,
                size: 128 << 20
            }]
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let regions = ram_regions(6 << 30);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[0].end(), MMIO_HOLE_START);
        assert_eq!(regions[1].start, MMIO_HOLE_END);
        let total: u64 = regions.iter().map(|r| r.size).sum();
        assert_eq!(total, 6 << 30);
        const { assert!(KVM_TSS_ADDR >= MMIO_HOLE_START && KVM_TSS_ADDR + 3 * 4096 <= MMIO_HOLE_END) };
    }

    #[test]
    fn exactly_the_hole_start_is_one_region() {
        assert_eq!(ram_regions(MMIO_HOLE_START).len(), 1);
    }

    #[test]
    fn e820_leaves_the_legacy_hole_out() {
        let map = e820_map(64 << 20);
        assert_eq!(map.len(), 2);
        assert_eq!(map[0].addr, 0);
        assert_eq!(map[0].size, LOW_RAM_END);
        assert_eq!(map[1].addr, HIMEM_START);
        assert_eq!(map[1].addr + map[1].size, 64 << 20);
        // No entry overlaps another and all are RAM.
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }

    #[test]
    fn e820_covers_ram_above_4g() {
        let map = e820_map(5 << 30);
        let last = map.last().copied().unwrap_or(E820Entry {
            addr: 0,
            size: 0,
            kind: 0,
        });
        assert_eq!(last.addr, MMIO_HOLE_END);
        assert_eq!(
            last.addr + last.size,
            (5u64 << 30) + (MMIO_HOLE_END - MMIO_HOLE_START)
        );
    }

    #[test]
    fn fixed_structures_do_not_overlap_and_fit_below_low_ram_end() {
        let mut ranges = [
            (BOOT_GDT, (BOOT_GDT_ENTRIES * 8) as u64),
            (BOOT_INFO, 0x1000),
            (PVH_MEMMAP, 0x1000),
            (PAGE_TABLES, PAGE_TABLES_SIZE),
            (CMDLINE, CMDLINE_MAX as u64),
        ];
        ranges.sort();
        for w in ranges.windows(2) {
            assert!(
                w[0].0 + w[0].1 <= w[1].0,
                "{:x?} overlaps {:x?}",
                w[0],
                w[1]
            );
        }
        let (last, size) = ranges[ranges.len() - 1];
        assert!(last + size <= LOW_RAM_END);
    }
}
