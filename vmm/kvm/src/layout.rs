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
/// PVH module list (one `hvm_modlist_entry`: the initrd).
pub const PVH_MODLIST: u64 = 0x8000;
/// Identity-map page tables built by the VMM for the 64-bit entry path (PML4, PDPT, 4 PDs).
pub const PAGE_TABLES: u64 = 0x9000;
/// Bytes reserved for the page tables: PML4 + PDPT + 4 page directories.
pub const PAGE_TABLES_SIZE: u64 = 6 * 0x1000;
/// ACPI tables (RSDP first) for Linux guests, in the BIOS area the e820 map leaves out, where
/// Linux also looks for an RSDP when nothing tells it where one is.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI area.
pub const ACPI_END: u64 = 0x10_0000;
/// The in-kernel IOAPIC's MMIO base (KVM's default, and what the MADT says).
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// The local APICs' MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// The ACPI sleep control register (hardware-reduced ACPI): the guest writes its S5 sleep type
/// here to power off. The sleep status register is the port after it. (Not 0x600, where
/// cloud-hypervisor puts it: that is the test guest's report port.)
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x700;
/// The ACPI sleep status register.
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x701;
/// The i8042 command port: 0xfe written here pulses the CPU reset line (reboot). The FADT's
/// reset register points here too.
pub const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042 data port.
pub const I8042_DATA_PORT: u16 = 0x60;
/// The i8042 command that resets the machine.
pub const I8042_RESET: u8 = 0xfe;
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
/// virtio-MMIO devices (the `--disk` block devices): one 4 KiB register window each, the
/// first at this address in the 32-bit MMIO hole, the next ones right after it. A Linux
/// guest learns of them from the ACPI DSDT (`acpi.rs`).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-MMIO device's register window (registers + config space).
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// How many virtio-MMIO devices fit: their windows end well below the KVM TSS.
pub const VIRTIO_MMIO_MAX_DEVICES: usize = 8;
/// The interrupt line (GSI, an IOAPIC pin) of the first virtio-MMIO device; device `i` uses
/// `VIRTIO_MMIO_GSI_START + i` (5..=12: no emulated legacy device uses those; COM1 is 4).
pub const VIRTIO_MMIO_GSI_START: u32 = 5;
/// The smallest guest this VMM builds: boot structures plus room to load an image.
pub const MIN_MEMORY: u64 = 4 << 20;

/// Start of the patch arena: guest-physical memory the VMM reserves for hot-patch code.
///
/// Why here: guest kernels and the test guest run their text at and just above 1 MiB, and a
/// `jmp rel32` reaches ±2 GiB from the end of the jump. The arena's last byte is below 2 GiB,
/// so it is less than 2 GiB away from 1 MiB in both directions (text → arena and back). The
/// test guest identity-maps the low 4 GiB with 2 MiB user/executable pages, so the arena,
/// 2 MiB-aligned and 2 MiB long, is exactly one such page: user code can run there at once.
/// It sits below the MMIO hole and is never RAM: RAM that would fall here continues after it.
pub const PATCH_ARENA_START: u64 = 0x7fe0_0000;
/// Size of the patch arena: one 2 MiB page.
pub const PATCH_ARENA_SIZE: u64 = 2 << 20;
/// End (exclusive) of the patch arena.
pub const PATCH_ARENA_END: u64 = PATCH_ARENA_START + PATCH_ARENA_SIZE;
/// The patch arena as a region, for code that hashes or walks it.
pub const PATCH_ARENA: ArenaRegion = ArenaRegion {
    start: PATCH_ARENA_START,
    size: PATCH_ARENA_SIZE,
};

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

/// The guest-physical range of the patch arena.
///
/// A type of its own (not a [`RamRegion`]) so that arena and RAM ranges cannot be mixed up:
/// the arena is guest memory but never in the guest's RAM map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaRegion {
    pub start: u64,
    pub size: u64,
}

impl ArenaRegion {
    pub const fn end(&self) -> u64 {
        self.start + self.size
    }

    /// Whether `[gpa, gpa + len)` lies wholly inside the arena (`false` on overflow).
    pub const fn contains(&self, gpa: u64, len: u64) -> bool {
        match gpa.checked_add(len) {
            Some(end) => gpa >= self.start && end <= self.end(),
            None => false,
        }
    }

    /// Whether `[start, end)` shares at least one byte with the arena.
    pub const fn overlaps(&self, start: u64, end: u64) -> bool {
        start < self.end() && end > self.start && start < end
    }
}

/// Guest-physical ranges that are never RAM, in address order: RAM that would fall in one
/// continues at its end.
const RAM_HOLES: [(u64, u64); 2] = [
    (PATCH_ARENA_START, PATCH_ARENA_END),
    (MMIO_HOLE_START, MMIO_HOLE_END),
];

/// Lays `mem_size` bytes of RAM out from address 0, around the patch arena and the 32-bit
/// MMIO hole.
///
/// Why: the arena must not be RAM the guest allocates, and devices and the KVM TSS live in
/// [3 GiB, 4 GiB); RAM that would fall into either continues after it (above 4 GiB for the
/// MMIO hole, as on real PCs). The total is always `mem_size` (clamped at the top of the
/// address space).
pub fn ram_regions(mem_size: u64) -> Vec<RamRegion> {
    let mut regions = Vec::with_capacity(RAM_HOLES.len() + 1);
    let mut cursor = 0u64;
    let mut remaining = mem_size;
    for (hole_start, hole_end) in RAM_HOLES {
        if remaining == 0 {
            break;
        }
        if cursor < hole_start {
            let size = remaining.min(hole_start - cursor);
            regions.push(RamRegion {
                start: cursor,
                size,
            });
            remaining -= size;
        }
        cursor = cursor.max(hole_end);
    }
    let size = remaining.min(u64::MAX - cursor);
    if size > 0 {
        regions.push(RamRegion {
            start: cursor,
            size,
        });
    }
    regions
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

/// The memory map handed to the guest: low RAM below the EBDA, then RAM from 1 MiB, and the
/// patch arena as reserved, in address order.
///
/// The first MiB above `LOW_RAM_END` (EBDA, VGA, BIOS) is absent so a guest never allocates
/// the boot structures' neighbourhood; boot structures below `LOW_RAM_END` are the guest's to
/// reclaim once booted, as with any PC firmware. The arena is listed as reserved (even when
/// all RAM is below it) so a guest that scans its map knows the range is taken, not free
/// address space to put devices in.
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
    map.push(E820Entry {
        addr: PATCH_ARENA_START,
        size: PATCH_ARENA_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|e| e.addr);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn total(regions: &[RamRegion]) -> u64 {
        regions.iter().map(|r| r.size).sum()
    }

    /// No RAM region touches the arena or the MMIO hole, and regions are ordered and disjoint.
    fn assert_well_formed(regions: &[RamRegion]) {
        for r in regions {
            assert!(r.size > 0, "{r:x?}");
            assert!(!PATCH_ARENA.overlaps(r.start, r.end()), "{r:x?}");
            assert!(
                r.end() <= MMIO_HOLE_START || r.start >= MMIO_HOLE_END,
                "{r:x?}"
            );
        }
        for w in regions.windows(2) {
            assert!(w[0].end() <= w[1].start, "{w:x?}");
        }
    }

    #[test]
    fn the_arena_is_within_rel32_of_the_text_both_ways() {
        // A jmp at text >= 1 MiB reaches every arena byte, and a jmp ending anywhere in the
        // arena reaches back to 1 MiB: both distances are below 2 GiB.
        const { assert!(PATCH_ARENA_END - HIMEM_START <= 1 << 31) };
        const { assert!(PATCH_ARENA_START & ((2 << 20) - 1) == 0 && PATCH_ARENA_SIZE == 2 << 20) };
        const { assert!(PATCH_ARENA_END <= MMIO_HOLE_START) };
        assert!(PATCH_ARENA.contains(PATCH_ARENA_START, PATCH_ARENA_SIZE));
        assert!(!PATCH_ARENA.contains(PATCH_ARENA_END - 1, 2));
        assert!(!PATCH_ARENA.contains(u64::MAX, 2));
        assert!(PATCH_ARENA.overlaps(PATCH_ARENA_END - 1, PATCH_ARENA_END + 10));
        assert!(!PATCH_ARENA.overlaps(0, PATCH_ARENA_START));
    }

    #[test]
    fn small_memory_is_one_region_below_the_arena() {
        let regions = ram_regions(128 << 20);
        assert_eq!(
            regions,
            vec![RamRegion {
                start: 0,
                size: 128 << 20
            }]
        );
        assert_well_formed(&regions);
        // RAM that ends exactly at the arena is still one region.
        assert_eq!(
            ram_regions(PATCH_ARENA_START),
            vec![RamRegion {
                start: 0,
                size: PATCH_ARENA_START
            }]
        );
    }

    #[test]
    fn memory_crossing_the_arena_continues_after_it() {
        let regions = ram_regions(2 << 30);
        assert_eq!(
            regions,
            vec![
                RamRegion {
                    start: 0,
                    size: PATCH_ARENA_START
                },
                RamRegion {
                    start: PATCH_ARENA_END,
                    size: PATCH_ARENA_SIZE
                },
            ]
        );
        assert_well_formed(&regions);
        assert_eq!(total(&regions), 2 << 30);
    }

    #[test]
    fn memory_crossing_the_mmio_hole_continues_at_4g() {
        let regions = ram_regions(6 << 30);
        assert_eq!(regions.len(), 3);
        assert_eq!(regions[0].end(), PATCH_ARENA_START);
        assert_eq!(regions[1].start, PATCH_ARENA_END);
        assert_eq!(regions[1].end(), MMIO_HOLE_START);
        assert_eq!(regions[2].start, MMIO_HOLE_END);
        assert_well_formed(&regions);
        assert_eq!(total(&regions), 6 << 30);
        const { assert!(KVM_TSS_ADDR >= MMIO_HOLE_START && KVM_TSS_ADDR + 3 * 4096 <= MMIO_HOLE_END) };
        const {
            assert!(
                VIRTIO_MMIO_START >= MMIO_HOLE_START
                    && VIRTIO_MMIO_START + VIRTIO_MMIO_MAX_DEVICES as u64 * VIRTIO_MMIO_SIZE
                        <= KVM_TSS_ADDR
            )
        };
    }

    #[test]
    fn memory_filling_up_to_the_hole_stays_below_it() {
        let regions = ram_regions(MMIO_HOLE_START - PATCH_ARENA_SIZE);
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].end(), MMIO_HOLE_START);
        // One more MiB goes above 4 GiB.
        let regions = ram_regions(MMIO_HOLE_START - PATCH_ARENA_SIZE + (1 << 20));
        assert_eq!(regions.len(), 3);
        assert_eq!(
            regions[2],
            RamRegion {
                start: MMIO_HOLE_END,
                size: 1 << 20
            }
        );
    }

    #[test]
    fn every_size_keeps_its_total_and_avoids_the_holes() {
        for mib in [
            4u64,
            64,
            2045,
            2046,
            2047,
            2048,
            3070,
            3071,
            3072,
            4096,
            1 << 20,
        ] {
            let regions = ram_regions(mib << 20);
            assert_well_formed(&regions);
            assert_eq!(total(&regions), mib << 20, "{mib} MiB");
        }
        // Absurd sizes are clamped at the top of the address space, not overflowed.
        let regions = ram_regions(u64::MAX);
        assert_well_formed(&regions);
        assert!(ram_regions(0).is_empty());
    }

    /// Entries are ordered and disjoint, the arena is reserved exactly once, and no RAM entry
    /// overlaps the arena or the MMIO hole.
    fn assert_map_well_formed(map: &[E820Entry]) {
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr, "{w:x?}");
        }
        let arena: Vec<_> = map.iter().filter(|e| e.kind == E820_RESERVED).collect();
        assert_eq!(
            arena,
            vec![&E820Entry {
                addr: PATCH_ARENA_START,
                size: PATCH_ARENA_SIZE,
                kind: E820_RESERVED
            }]
        );
        for e in map.iter().filter(|e| e.kind == E820_RAM) {
            assert!(!PATCH_ARENA.overlaps(e.addr, e.addr + e.size), "{e:x?}");
            assert!(
                e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END,
                "{e:x?}"
            );
        }
    }

    #[test]
    fn e820_leaves_the_legacy_hole_out_and_reserves_the_arena_beyond_ram() {
        let map = e820_map(64 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[0].addr, 0);
        assert_eq!(map[0].size, LOW_RAM_END);
        assert_eq!(map[1].addr, HIMEM_START);
        assert_eq!(map[1].addr + map[1].size, 64 << 20);
        assert_eq!(map[2].addr, PATCH_ARENA_START);
        assert_map_well_formed(&map);
    }

    #[test]
    fn e820_puts_the_arena_between_ram_that_crosses_it() {
        let map = e820_map(2 << 30);
        let kinds: Vec<_> = map.iter().map(|e| (e.addr, e.kind)).collect();
        assert_eq!(
            kinds,
            vec![
                (0, E820_RAM),
                (HIMEM_START, E820_RAM),
                (PATCH_ARENA_START, E820_RESERVED),
                (PATCH_ARENA_END, E820_RAM),
            ]
        );
        assert_eq!(map[1].addr + map[1].size, PATCH_ARENA_START);
        assert_eq!(map[3].size, PATCH_ARENA_SIZE);
        assert_map_well_formed(&map);
    }

    #[test]
    fn e820_covers_ram_above_4g() {
        let map = e820_map(5 << 30);
        assert_map_well_formed(&map);
        let last = map.last().copied().unwrap_or(E820Entry {
            addr: 0,
            size: 0,
            kind: 0,
        });
        assert_eq!(last.addr, MMIO_HOLE_END);
        assert_eq!(
            last.addr + last.size,
            (5u64 << 30) + (MMIO_HOLE_END - MMIO_HOLE_START) + PATCH_ARENA_SIZE
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
