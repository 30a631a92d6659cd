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
//! directory after boot, and the physical pages are reserved from the start. The entry is
//! checked before it is written (empty, or already ours), so a kernel that did use the slot is
//! refused rather than corrupted.

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
    #[error(transparent)]
    Guest(#[from] GuestError),
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
    let gva = arena_gva(kallsyms, slide)?;
    let pml4 = crate::address_space::kernel_view(vcpu).paging.cr3 & ADDR;
    let level = |table: u64, shift: u32| -> Result<u64, KernelArenaError> {
        let at = table + ((gva >> shift) & 511) * 8;
        Ok(guest.read_u64(at)?)
    };
    let pml4e = level(pml4, 39)?;
    if pml4e & PRESENT == 0 {
        return Err(KernelArenaError::Tables(format!(
            "PML4 entry {pml4e:#x} not present"
        )));
    }
    let pdpte = level(pml4e & ADDR, 30)?;
    if pdpte & PRESENT == 0 || pdpte & HUGE != 0 {
        return Err(KernelArenaError::Tables(format!(
            "PDPT entry {pdpte:#x} is not a page directory"
        )));
    }
    let pd_entry_at = (pdpte & ADDR) + ((gva >> 21) & 511) * 8;
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
