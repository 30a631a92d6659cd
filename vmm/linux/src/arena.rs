//! The patch arena inside a running Linux kernel's address space.
//!
//! New code must be executable from every guest address space and within ±2 GiB (rel32) of
//! kernel text. The kernel maps its image through one page directory (`level2_kernel_pgt`,
//! 2 MiB entries) covering the 1 GiB kernel-image area from `__START_KERNEL_map`; every address
//! space shares it (the top PML4 entry of each process points at the same tables). Entries past
//! the image's end are cleared at boot (`cleanup_highmap`) and never used again: modules,
//! vmalloc and the fixmap live elsewhere. So the hypervisor writes one 2 MiB entry there, after
//! `_end` with a free 2 MiB gap, pointing at guest-physical memory the kernel was told not to
//! use (`memmap=2M$GPA` on its command line: e820-reserved, so neither the allocator, nor the
//! direct map, nor physical KASLR touch it). The mapping is global, writable only by ring 0,
//! executable.
//!
//! Safety against the kernel's later allocations: nothing in the kernel allocates in that page
//! directory after boot, and the physical pages are reserved from the start. Both are checked
//! in the running guest before anything is written: the range must be reserved in the kernel's
//! own e820 table (what it allocates from, `memmap=` applied) and must not overlap the kernel's
//! image (`check_arena_memory`); the page-directory entry must be empty, or already ours.

use thiserror::Error;

use super::Kallsyms;
use guest_control::{GuestControl, GuestError, VcpuState};

pub const ARENA_SIZE: u64 = 2 << 20;
/// `__START_KERNEL_map + KERNEL_IMAGE_SIZE` (1 GiB with KASLR): the image area's end.
pub const IMAGE_AREA_END: u64 = 0xffff_ffff_c000_0000;

use guest_control::pte::{
    ACCESSED, ADDR_MASK as ADDR, DIRTY, GLOBAL, PAGE_SIZE_BIT as HUGE, PRESENT, WRITABLE,
};

#[derive(Debug, Error)]
pub enum KernelArenaError {
    #[error("the arena's guest-physical address {0:#x} is not 2 MiB-aligned")]
    Misaligned(u64),
    #[error("kallsyms has no _end: cannot tell where the kernel image ends")]
    NoEnd,
    #[error(
        "no free 2 MiB slot after the kernel image (it ends at {end:#x}, the image area at {IMAGE_AREA_END:#x})"
    )]
    NoRoom { end: u64 },
    #[error(
        "the kernel's page tables do not map the image area as expected ({0}); is this a 64-bit Linux kernel?"
    )]
    Tables(String),
    #[error(
        "the page-directory slot for {gva:#x} already holds {entry:#x}: the kernel uses it; refusing to overwrite it"
    )]
    InUse { gva: u64, entry: u64 },
    #[error(
        "the arena's guest-physical range {gpa:#x}..{end:#x} is not reserved by the running kernel ({found}); nothing was written. Boot the guest with `memmap=2M${gpa:#x}` on its command line (in GRUB's config the `$` must be escaped: `memmap=2M\\${gpa:#x}`), or give --arena a 2 MiB range the kernel reserved",
        end = gpa + ARENA_SIZE
    )]
    NotReserved { gpa: u64, found: String },
    #[error(
        "the arena's guest-physical range {gpa:#x}..{end:#x} overlaps the running kernel's own image at {image_start:#x}..{image_end:#x}; nothing was written. Give --arena a range reserved with memmap= (physical KASLR never places the kernel there)",
        end = gpa + ARENA_SIZE
    )]
    OverlapsKernel {
        gpa: u64,
        image_start: u64,
        image_end: u64,
    },
    #[error(
        "kallsyms has no {0}: cannot check that the arena is memory the kernel does not use; refusing to write it"
    )]
    NoSymbol(&'static str),
    #[error(transparent)]
    Guest(#[from] GuestError),
}

/// `E820_TYPE_RESERVED`: what `memmap=nn$ss` makes of a range.
const E820_RESERVED: u32 = 2;
/// More entries than any kernel's table holds (`E820_MAX_ENTRIES` is 128 + 3 × MAX_NUMNODES,
/// 3,200 for Debian's 1,024 nodes): a larger count is not a table to believe.
const E820_MAX_ENTRIES: u32 = 8192;
/// `struct e820_entry` is packed: `u64 addr, u64 size, u32 type`.
const E820_ENTRY_LEN: usize = 20;

/// One entry of the running kernel's memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The running kernel's own memory map (`*e820_table`, the table it allocates from, with
/// `memmap=` applied), read through `vcpu`: the kernel's view of a parked vCPU
/// ([`crate::address_space::kernel_view`]), as every function here takes.
pub fn read_e820<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    kallsyms: &Kallsyms,
    slide: u64,
) -> Result<Vec<E820Entry>, KernelArenaError> {
    let view = *vcpu;
    let ptr_at = kallsyms
        .lookup("e820_table")
        .ok_or(KernelArenaError::NoSymbol("e820_table"))?
        .wrapping_add(slide);
    let table = u64::from_le_bytes(
        guest
            .read_virtual(&view, ptr_at, 8)?
            .try_into()
            .map_err(|_| KernelArenaError::Tables("short read of e820_table".into()))?,
    );
    let count = u32::from_le_bytes(
        guest
            .read_virtual(&view, table, 4)?
            .try_into()
            .map_err(|_| KernelArenaError::Tables("short read of the e820 table".into()))?,
    );
    if count > E820_MAX_ENTRIES {
        return Err(KernelArenaError::NotReserved {
            gpa: 0,
            found: format!("the kernel's e820 table claims {count} entries"),
        });
    }
    let bytes = guest.read_virtual(
        &view,
        table.wrapping_add(4),
        count as usize * E820_ENTRY_LEN,
    )?;
    Ok(bytes
        .chunks_exact(E820_ENTRY_LEN)
        .map(|e| {
            let u64_at = |o: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&e[o..o + 8]);
                u64::from_le_bytes(b)
            };
            E820Entry {
                addr: u64_at(0),
                size: u64_at(8),
                kind: u32::from_le_bytes([e[16], e[17], e[18], e[19]]),
            }
        })
        .collect())
}

/// Whether reserved entries of `map` cover `[start, end)` whole, and no other entry touches it.
/// `Err` says what the map holds there instead.
pub fn check_reserved(map: &[E820Entry], start: u64, end: u64) -> Result<(), String> {
    let touching: Vec<&E820Entry> = map
        .iter()
        .filter(|e| e.addr < end && start < e.addr.saturating_add(e.size))
        .collect();
    if let Some(e) = touching.iter().find(|e| e.kind != E820_RESERVED) {
        return Err(format!(
            "its e820 map has {}..{} as {} there",
            hexa(e.addr),
            hexa(e.addr.saturating_add(e.size)),
            e820_kind(e.kind)
        ));
    }
    let mut reserved: Vec<(u64, u64)> = touching
        .iter()
        .map(|e| (e.addr, e.addr.saturating_add(e.size)))
        .collect();
    reserved.sort_unstable();
    let mut covered = start;
    for (a, b) in reserved {
        if a > covered {
            break;
        }
        covered = covered.max(b);
    }
    if covered >= end {
        Ok(())
    } else if covered == start {
        Err("its e820 map has nothing there: not RAM the kernel was told to leave alone".into())
    } else {
        Err(format!(
            "its e820 map reserves only {}..{} of it",
            hexa(start),
            hexa(covered)
        ))
    }
}

fn hexa(v: u64) -> String {
    format!("{v:#x}")
}

fn e820_kind(kind: u32) -> String {
    match kind {
        1 => "usable RAM".into(),
        2 => "reserved".into(),
        3 => "ACPI data".into(),
        4 => "ACPI NVS".into(),
        5 => "unusable".into(),
        7 => "persistent memory".into(),
        12 => "protected memory".into(),
        k => format!("type {k}"),
    }
}

/// The kernel image's guest-physical range (`_text` to `_end`; KASLR places it as one block).
pub fn image_phys<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    kallsyms: &Kallsyms,
    slide: u64,
) -> Result<(u64, u64), KernelArenaError> {
    let text = kallsyms
        .lookup("_text")
        .ok_or(KernelArenaError::NoSymbol("_text"))?;
    let end = kallsyms.lookup("_end").ok_or(KernelArenaError::NoEnd)?;
    let start = guest.translate(vcpu, text.wrapping_add(slide))?.gpa;
    Ok((start, start.saturating_add(end.saturating_sub(text))))
}

/// Before anything is written: the arena at `gpa` is memory the running kernel reserved and
/// not its own image (`memmap=` missing or mistyped leaves it RAM the kernel may hand out, and
/// physical KASLR may even have put the kernel there).
pub fn check_arena_memory<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    kallsyms: &Kallsyms,
    slide: u64,
    gpa: u64,
) -> Result<(), KernelArenaError> {
    let end = gpa.saturating_add(ARENA_SIZE);
    let (image_start, image_end) = image_phys(guest, vcpu, kallsyms, slide)?;
    if gpa < image_end && image_start < end {
        return Err(KernelArenaError::OverlapsKernel {
            gpa,
            image_start,
            image_end,
        });
    }
    let map = read_e820(guest, vcpu, kallsyms, slide)?;
    check_reserved(&map, gpa, end).map_err(|found| KernelArenaError::NotReserved { gpa, found })
}

/// Where the arena lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelArena {
    pub gva: u64,
    pub gpa: u64,
    pub size: u64,
}

/// The arena's virtual address for a kernel with `slide`: the second 2 MiB slot after `_end`.
pub fn arena_gva(kallsyms: &Kallsyms, slide: u64) -> Result<u64, KernelArenaError> {
    let end = kallsyms
        .lookup("_end")
        .ok_or(KernelArenaError::NoEnd)?
        .wrapping_add(slide);
    let gva = end
        .checked_add(ARENA_SIZE - 1)
        .map(|e| (e & !(ARENA_SIZE - 1)) + ARENA_SIZE)
        .filter(|g| {
            g.checked_add(ARENA_SIZE)
                .is_some_and(|e| e <= IMAGE_AREA_END)
        })
        .ok_or(KernelArenaError::NoRoom { end })?;
    Ok(gva)
}

/// The guest-physical address of the page directory that maps `gva` in the kernel's view of
/// `vcpu`'s address space, walking the levels the vCPU actually uses: five with CR4.LA57 (the
/// kernel enables it by itself on CPUs that have it), else four. Every upper entry must be
/// present and point at a table (not a large page).
fn page_directory_of<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    gva: u64,
) -> Result<u64, KernelArenaError> {
    let regs = vcpu.paging;
    let top = guest_control::paging::long_mode_levels(&regs).ok_or_else(|| {
        KernelArenaError::Tables(format!(
            "vCPU {} is not in 64-bit paging mode (CR0 {:#x}, CR4 {:#x}, EFER {:#x})",
            vcpu.id, regs.cr0, regs.cr4, regs.efer
        ))
    })?;
    let top = u32::from(top);
    let mut table = regs.cr3 & ADDR;
    // Levels `top` down to 3 (the PDPT): each entry leads to the next table.
    for level in (3..=top).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry = guest.read_u64(table + ((gva >> shift) & 511) * 8)?;
        if entry & PRESENT == 0 || entry & HUGE != 0 {
            return Err(KernelArenaError::Tables(format!(
                "level-{level} entry {entry:#x} for {gva:#x} is not a present table ({top}-level paging)"
            )));
        }
        table = entry & ADDR;
    }
    Ok(table)
}

/// The arena's slot must be in the kernel's own page directory for its image,
/// `level2_kernel_pgt` (inside the image, so at its offset from `_text` in physical memory
/// too, the image starting at guest-physical `image_start`): a walk to `pd` that went astray (a
/// wrong paging mode, a hostile table) lands elsewhere and is refused. The arena and `_text`
/// share one page directory by construction, so comparing the two walks would prove nothing.
/// Not checked for an image without the symbol (there is nothing to compare with).
fn check_kernel_page_directory(
    kallsyms: &Kallsyms,
    image_start: u64,
    pd: u64,
) -> Result<(), KernelArenaError> {
    let (Some(text), Some(l2)) = (
        kallsyms.lookup("_text"),
        kallsyms.lookup("level2_kernel_pgt"),
    ) else {
        return Ok(());
    };
    let kernel_pd = image_start.wrapping_add(l2.wrapping_sub(text));
    if kernel_pd != pd {
        return Err(KernelArenaError::Tables(format!(
            "the arena's page directory is at {pd:#x}, not the kernel's level2_kernel_pgt \
             ({kernel_pd:#x})"
        )));
    }
    Ok(())
}

/// The page-directory entry the arena's mapping goes in: its guest-physical address and what it
/// holds now (0 before the first attach).
pub fn slot_entry<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    kallsyms: &Kallsyms,
    slide: u64,
) -> Result<(u64, u64), KernelArenaError> {
    let gva = arena_gva(kallsyms, slide)?;
    let at = page_directory_of(guest, vcpu, gva)? + ((gva >> 21) & 511) * 8;
    Ok((at, guest.read_u64(at)?))
}

/// Maps the arena (guest-physical `gpa`) at [`arena_gva`] through the kernel page tables of
/// `vcpu`. Call with the guest paused. Idempotent: an entry that already maps `gpa` there is
/// accepted as is (a second command on the same guest).
pub fn install<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    kallsyms: &Kallsyms,
    slide: u64,
    gpa: u64,
) -> Result<KernelArena, KernelArenaError> {
    if !gpa.is_multiple_of(ARENA_SIZE) {
        return Err(KernelArenaError::Misaligned(gpa));
    }
    check_arena_memory(guest, vcpu, kallsyms, slide, gpa)?;
    let gva = arena_gva(kallsyms, slide)?;
    let pd = page_directory_of(guest, vcpu, gva)?;
    let (image_start, _) = image_phys(guest, vcpu, kallsyms, slide)?;
    check_kernel_page_directory(kallsyms, image_start, pd)?;
    let pd_entry_at = pd + ((gva >> 21) & 511) * 8;
    let entry = guest.read_u64(pd_entry_at)?;
    let want = gpa | PRESENT | WRITABLE | ACCESSED | DIRTY | HUGE | GLOBAL;
    if entry != 0 && entry != want {
        return Err(KernelArenaError::InUse { gva, entry });
    }
    if entry == 0 {
        guest.write_phys(pd_entry_at, &want.to_le_bytes())?;
        tracing::info!(
            gva = format_args!("{gva:#x}"),
            gpa = format_args!("{gpa:#x}"),
            "patch arena mapped into the kernel"
        );
    }
    Ok(KernelArena {
        gva,
        gpa,
        size: ARENA_SIZE,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_control::paging::PagingRegs;
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Duration;

    /// Sparse guest-physical memory of 8-byte words.
    #[derive(Default)]
    struct Mem(Mutex<HashMap<u64, u64>>);

    impl GuestControl for Mem {
        fn vcpu_count(&self) -> usize {
            1
        }
        fn pause_all(&self) -> Result<Vec<Option<VcpuState>>, GuestError> {
            Ok(Vec::new())
        }
        fn resume_all(&self) -> Result<Duration, GuestError> {
            Ok(Duration::ZERO)
        }
        fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
            let w = self.0.lock().unwrap().get(&gpa).copied().unwrap_or(0);
            buf.copy_from_slice(&w.to_le_bytes()[..buf.len()]);
            Ok(())
        }
        fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
            let mut w = [0u8; 8];
            w[..data.len()].copy_from_slice(data);
            self.0.lock().unwrap().insert(gpa, u64::from_le_bytes(w));
            Ok(())
        }
        fn set_rip(&self, _: usize, _: u64) -> Result<(), GuestError> {
            Ok(())
        }
    }

    const CR0_PG: u64 = 1 << 31;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_LA57: u64 = 1 << 12;
    const EFER_LMA: u64 = 1 << 10;

    fn vcpu(cr3: u64, la57: bool) -> VcpuState {
        VcpuState {
            id: 0,
            rip: 0,
            rsp: 0,
            cpl: 0,
            paging: PagingRegs {
                cr0: CR0_PG,
                cr3,
                cr4: CR4_PAE | if la57 { CR4_LA57 } else { 0 },
                efer: EFER_LMA,
            },
        }
    }

    const KERNEL: u64 = 0xffff_ffff_8100_0000;

    /// Tables mapping `KERNEL` down to a page directory at `pd`; returns CR3.
    fn tables(mem: &Mem, la57: bool, pd: u64) -> u64 {
        let (pml5, pml4, pdpt) = (0x10_0000, 0x20_0000, 0x30_0000);
        let idx = |shift: u32| ((KERNEL >> shift) & 511) * 8;
        let put = |at: u64, v: u64| mem.write_phys(at, &v.to_le_bytes()).unwrap();
        put(pml4 + idx(39), pdpt | PRESENT | WRITABLE);
        put(pdpt + idx(30), pd | PRESENT | WRITABLE);
        if la57 {
            put(pml5 + idx(48), pml4 | PRESENT | WRITABLE);
            pml5
        } else {
            pml4
        }
    }

    #[test]
    fn the_walk_follows_the_vcpus_paging_mode() {
        for la57 in [false, true] {
            let mem = Mem::default();
            let cr3 = tables(&mem, la57, 0x40_0000);
            assert_eq!(
                page_directory_of(&mem, &vcpu(cr3, la57), KERNEL).unwrap(),
                0x40_0000,
                "la57={la57}"
            );
        }
        // A 5-level guest walked as 4-level would take its PML5 for a PML4: the top entry
        // there is empty, and the walk refuses instead of writing into some other table.
        let mem = Mem::default();
        let cr3 = tables(&mem, true, 0x40_0000);
        assert!(page_directory_of(&mem, &vcpu(cr3, false), KERNEL).is_err());
    }

    #[test]
    fn large_pages_and_non_long_mode_are_refused() {
        let mem = Mem::default();
        let cr3 = tables(&mem, false, 0x40_0000);
        let pdpt_entry = 0x30_0000 + ((KERNEL >> 30) & 511) * 8;
        mem.write_phys(pdpt_entry, &(0x4000_0000 | PRESENT | HUGE).to_le_bytes())
            .unwrap();
        assert!(page_directory_of(&mem, &vcpu(cr3, false), KERNEL).is_err());
        let mut v = vcpu(cr3, false);
        v.paging.efer = 0;
        assert!(page_directory_of(&mem, &v, KERNEL).is_err());
    }

    #[test]
    fn the_arena_goes_only_in_the_kernels_own_page_directory() {
        // The image at 16 MiB physical; level2_kernel_pgt 0x1a0f000 into it.
        const IMAGE: u64 = 0x100_0000;
        let kallsyms = Kallsyms::from_symbols(vec![
            crate::KernelSymbol {
                address: KERNEL,
                kind: 'T',
                name: "_text".into(),
            },
            crate::KernelSymbol {
                address: KERNEL + 0x1a0_f000,
                kind: 'D',
                name: "level2_kernel_pgt".into(),
            },
        ]);
        let kernel_pd = IMAGE + 0x1a0_f000;
        let mem = Mem::default();
        let cr3 = tables(&mem, false, kernel_pd);
        let pd = page_directory_of(&mem, &vcpu(cr3, false), KERNEL).unwrap();
        check_kernel_page_directory(&kallsyms, IMAGE, pd).unwrap();
        // A hostile PDPT entry leads the walk to a table of the guest's choosing (where the
        // entry written would map the arena for whatever else that table maps): refused.
        let elsewhere = tables(&mem, false, 0x7700_0000);
        let pd = page_directory_of(&mem, &vcpu(elsewhere, false), KERNEL).unwrap();
        let why = check_kernel_page_directory(&kallsyms, IMAGE, pd).unwrap_err();
        assert!(why.to_string().contains("level2_kernel_pgt"), "{why}");
        // No symbol: nothing to compare with.
        let bare = Kallsyms::from_symbols(Vec::new());
        check_kernel_page_directory(&bare, IMAGE, pd).unwrap();
    }

    #[test]
    fn only_memory_the_kernel_reserved_is_an_arena() {
        let e = |addr: u64, size: u64, kind: u32| E820Entry { addr, size, kind };
        let (a, b) = (0x1000_0000, 0x1020_0000);
        // memmap=2M$0x10000000 splits the RAM around a reserved entry.
        let map = [
            e(0x10_0000, 0x0ff0_0000, 1),
            e(a, ARENA_SIZE, 2),
            e(b, 0x1000_0000, 1),
        ];
        assert_eq!(check_reserved(&map, a, b), Ok(()));
        // No memmap=: usable RAM, named as such.
        let ram = [e(0x10_0000, 0x3000_0000, 1)];
        let why = check_reserved(&ram, a, b).unwrap_err();
        assert!(why.contains("usable RAM"), "{why}");
        // A reservation that stops short, or none at all (a hole in the map).
        let short = [e(a, 0x10_0000, 2)];
        assert!(check_reserved(&short, a, b).unwrap_err().contains("only"));
        assert!(
            check_reserved(&[], a, b)
                .unwrap_err()
                .contains("nothing there")
        );
        // Two adjacent reserved entries cover it together.
        let two = [e(a, 0x10_0000, 2), e(a + 0x10_0000, 0x10_0000, 2)];
        assert_eq!(check_reserved(&two, a, b), Ok(()));
    }
}
