//! Guest memory: RAM and the patch arena; allocation, the host-capacity check, and the host
//! mappings KVM's memory slots are cut from.

use std::sync::Arc;

use thiserror::Error;
use vm_memory::bitmap::{Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};

use crate::layout::{self, MIN_MEMORY};

/// The guest memory type used throughout the VMM.
///
/// It holds every RAM region of [`layout::ram_regions`] and the patch arena
/// ([`layout::PATCH_ARENA`]) as a region of its own, so reads and writes at arena addresses go
/// through the same guest-physical accessors as RAM. Which is which is decided by address:
/// [`is_arena`] (the arena never shares a region with RAM). Each region's host mapping is
/// [`HostMapping`]'s.
pub type GuestMemory = GuestMemoryMmap<OwnedMapping>;

/// Host pages KVM can map whole into the guest's nested page tables (NPT/EPT): 2 MiB.
const HUGE_PAGE: usize = 2 << 20;

/// One region's host memory: anonymous, at a 2 MiB-aligned address, advised for transparent
/// huge pages (`MADV_HUGEPAGE`, as QEMU does for guest RAM).
///
/// Why not vm-memory's own mapping: it takes whatever address `mmap` returns, and KVM maps a
/// guest page with one huge nested-page entry only where the host address and the guest
/// address have the same offset in a 2 MiB page, and the host page is itself huge. With 4 KiB
/// nested pages every first touch of guest memory is a nested fault; under nested
/// virtualisation each costs the L1 hypervisor an exit, and a Linux boot writes ~70 MB while
/// it decompresses itself (`docs/linux-guests.md`).
#[derive(Debug)]
pub struct HostMapping {
    addr: usize,
    size: usize,
}

impl HostMapping {
    fn new(size: usize) -> std::io::Result<HostMapping> {
        let total = size
            .checked_add(HUGE_PAGE)
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: a new anonymous private mapping at an address the kernel picks: it overlaps
        // nothing of this process.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = p as usize;
        let aligned = (start + HUGE_PAGE - 1) & !(HUGE_PAGE - 1);
        let end = aligned + size;
        // Give back the slack before and after, so exactly [aligned, end) stays mapped.
        // SAFETY: both ranges lie inside the mapping just made, and nothing refers to them.
        unsafe {
            if aligned > start {
                libc::munmap(start as *mut libc::c_void, aligned - start);
            }
            if start + total > end {
                libc::munmap(end as *mut libc::c_void, start + total - end);
            }
        }
        // Advice only: without transparent huge pages (or with them off) the memory is the
        // same, in 4 KiB pages.
        // SAFETY: [aligned, end) is this mapping; madvise changes no contents.
        if unsafe { libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE) } != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "no transparent huge pages for guest memory");
        }
        Ok(HostMapping {
            addr: aligned,
            size,
        })
    }
}

impl Drop for HostMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `new` and is unmapped only here, when the last
        // region using it (its `OwnedMapping`) is gone.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.size);
        }
    }
}

// SAFETY: `HostMapping` is an address range, not a pointer anything dereferences through it;
// the memory itself is accessed through vm-memory's volatile slices.
unsafe impl Send for HostMapping {}
// SAFETY: as above; `HostMapping` has no interior state.
unsafe impl Sync for HostMapping {}

/// What vm-memory calls a region's bitmap, used here to own the region's [`HostMapping`]: the
/// region is built over the raw mapping (vm-memory then never unmaps it), and drops its bitmap
/// with it, which unmaps. No dirty tracking (as `()`).
#[derive(Debug, Clone, Default)]
pub struct OwnedMapping {
    _mapping: Option<Arc<HostMapping>>,
}

impl WithBitmapSlice<'_> for OwnedMapping {
    type S = ();
}

impl Bitmap for OwnedMapping {
    fn mark_dirty(&self, _offset: usize, _len: usize) {}

    fn dirty_at(&self, _offset: usize) -> bool {
        false
    }

    fn slice_at(&self, _offset: usize) {}
}

/// For regions vm-memory maps itself (`GuestMemory::from_ranges`, tests): it owns those
/// mappings, so this owns nothing.
impl NewBitmap for OwnedMapping {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

/// One guest region over a new [`HostMapping`].
fn region(gpa: u64, size: usize) -> Result<GuestRegionMmap<OwnedMapping>, String> {
    let mapping = HostMapping::new(size).map_err(|e| e.to_string())?;
    let addr = mapping.addr as *mut u8;
    let owner = OwnedMapping {
        _mapping: Some(Arc::new(mapping)),
    };
    // SAFETY: `addr` and `size` are exactly the mapping `owner` holds, and the region keeps
    // `owner` (its bitmap) for as long as it lives, so the memory stays mapped.
    let builder = unsafe {
        MmapRegionBuilder::new_with_bitmap(size, owner)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .with_raw_mmap_pointer(addr)
    };
    let mapped = builder.build().map_err(|e| e.to_string())?;
    GuestRegionMmap::new(mapped, GuestAddress(gpa))
        .ok_or_else(|| format!("guest region at {gpa:#x} of {size} bytes overflows"))
}

/// Whether the region starting at `gpa` is the patch arena rather than RAM.
pub fn is_arena(gpa: u64) -> bool {
    gpa == layout::PATCH_ARENA_START
}

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error(
        "guest memory of {requested_mib} MiB is too small: at least {} MiB is needed for boot structures and the image",
        MIN_MEMORY >> 20
    )]
    TooSmall { requested_mib: u64 },
    #[error(
        "guest memory of {requested_mib} MiB is more than this host can give ({available_mib} MiB of RAM + swap); ask for less with --memory"
    )]
    MoreThanHost {
        requested_mib: u64,
        available_mib: u64,
    },
    #[error(
        "could not allocate {requested_mib} MiB of guest memory ({detail}); ask for less with --memory"
    )]
    Allocate { requested_mib: u64, detail: String },
    #[error("guest memory at {gpa:#x} has no host mapping")]
    NoHostAddress { gpa: u64 },
}

/// Total RAM + swap of the host, in bytes, from `sysinfo(2)`.
fn host_capacity() -> Option<u64> {
    // SAFETY: `sysinfo` only writes into the zeroed struct we pass; the struct is plain data.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `sysinfo` struct for the duration of the call.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return None;
    }
    let unit = u64::from(info.mem_unit.max(1));
    Some((info.totalram as u64).saturating_add(info.totalswap as u64) * unit)
}

/// Checks the request against what the host has, then maps the guest's RAM and the patch arena
/// (each an anonymous, zero-filled mapping).
///
/// Why check first: anonymous mappings are lazily backed, so an impossible request would
/// otherwise succeed here and the guest would be killed by the OOM killer much later. The
/// arena counts too: patches fill it while the guest runs.
pub fn allocate(mem_size: u64) -> Result<GuestMemory, MemoryError> {
    let requested_mib = mem_size >> 20;
    if mem_size < MIN_MEMORY {
        return Err(MemoryError::TooSmall { requested_mib });
    }
    if let Some(capacity) = host_capacity()
        && mem_size.saturating_add(layout::PATCH_ARENA_SIZE) > capacity
    {
        return Err(MemoryError::MoreThanHost {
            requested_mib,
            available_mib: capacity >> 20,
        });
    }
    let mut ranges = Vec::new();
    for r in layout::ram_regions(mem_size) {
        // A region larger than the host's address space cannot be mapped (32-bit hosts).
        let size = usize::try_from(r.size).map_err(|_| MemoryError::MoreThanHost {
            requested_mib,
            available_mib: usize::MAX as u64 >> 20,
        })?;
        ranges.push((GuestAddress(r.start), size));
    }
    ranges.push((
        GuestAddress(layout::PATCH_ARENA_START),
        layout::PATCH_ARENA_SIZE as usize,
    ));
    ranges.sort_by_key(|(addr, _)| *addr);
    let allocate = |detail: String| MemoryError::Allocate {
        requested_mib,
        detail,
    };
    let regions = ranges
        .iter()
        .map(|(gpa, size)| region(gpa.0, *size))
        .collect::<Result<Vec<_>, _>>()
        .map_err(allocate)?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| allocate(e.to_string()))
}

/// One piece of guest memory with its host mapping (a region of the VMM's `GuestMemory`): what
/// KVM memory slots are cut from. Memory owns it; code integrity only cuts slots out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backing {
    pub gpa: u64,
    pub size: u64,
    pub host: u64,
}

/// Every region of `mem` with its host mapping, in address order: what KVM's memory slots are
/// cut from (`integrity::slots`). The patch arena is its own region, so it never shares a slot
/// with RAM.
pub fn backing(mem: &GuestMemory) -> Result<Vec<Backing>, MemoryError> {
    mem.iter()
        .map(|region| {
            let gpa = region.start_addr().0;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| MemoryError::NoHostAddress { gpa })? as u64;
            Ok(Backing {
                gpa,
                size: region.len(),
                host,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// Whether any mapping of this process covers `addr` (`/proc/self/maps`).
    fn mapped(addr: u64) -> bool {
        let maps = std::fs::read_to_string("/proc/self/maps").expect("maps");
        maps.lines().any(|l| {
            let range = l.split_whitespace().next().unwrap_or("");
            let Some((a, b)) = range.split_once('-') else {
                return false;
            };
            let (a, b) = (
                u64::from_str_radix(a, 16).unwrap_or(0),
                u64::from_str_radix(b, 16).unwrap_or(0),
            );
            a <= addr && addr < b
        })
    }

    #[test]
    fn regions_are_huge_page_aligned_and_live_as_long_as_the_memory() {
        let mem = allocate(64 << 20).expect("allocate");
        let regions = backing(&mem).expect("backing");
        for r in &regions {
            // Same offset in a 2 MiB page on both sides: huge nested-page entries possible.
            assert_eq!(r.host % HUGE_PAGE as u64, r.gpa % HUGE_PAGE as u64, "{r:?}");
            assert!(mapped(r.host));
        }
        mem.write_obj(0x1234_5678u32, GuestAddress(0x20_0000))
            .expect("write");
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x20_0000)).expect("read"),
            0x1234_5678
        );
        // A clone keeps the mapping (the last one gone unmaps it; not checked here: another
        // test's mapping may take the freed range at once).
        let clone = mem.clone();
        drop(mem);
        assert!(regions.iter().all(|r| mapped(r.host)));
        assert_eq!(
            clone
                .read_obj::<u32>(GuestAddress(0x20_0000))
                .expect("read"),
            0x1234_5678
        );
    }

    #[test]
    fn refuses_tiny_memory() {
        assert!(matches!(
            allocate(1 << 20),
            Err(MemoryError::TooSmall { .. })
        ));
    }

    #[test]
    fn refuses_more_than_the_host() {
        let err = allocate(1 << 50).err();
        assert!(
            matches!(err, Some(MemoryError::MoreThanHost { .. })),
            "{err:?}"
        );
        let msg = err.map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("--memory"), "{msg}");
    }

    #[test]
    fn allocates_and_is_writable() {
        let mem = allocate(16 << 20).ok();
        let Some(mem) = mem else {
            panic!("16 MiB must be allocatable")
        };
        assert!(
            mem.write_obj(0xdead_beefu32, GuestAddress(0x10_0000))
                .is_ok()
        );
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x10_0000)).ok(),
            Some(0xdead_beef)
        );
        assert!(mem.read_obj::<u32>(GuestAddress(16 << 20)).is_err());
    }

    #[test]
    fn the_arena_is_its_own_zeroed_writable_region() {
        let Some(mem) = allocate(16 << 20).ok() else {
            panic!("16 MiB must be allocatable")
        };
        let starts: Vec<u64> = mem.iter().map(|r| r.start_addr().0).collect();
        assert_eq!(starts, vec![0, layout::PATCH_ARENA_START]);
        let arena: Vec<_> = mem.iter().filter(|r| is_arena(r.start_addr().0)).collect();
        assert_eq!(arena.len(), 1);
        assert_eq!(arena[0].len(), layout::PATCH_ARENA_SIZE);
        let mut bytes = vec![0xffu8; layout::PATCH_ARENA_SIZE as usize];
        assert!(
            mem.read_slice(&mut bytes, GuestAddress(layout::PATCH_ARENA_START))
                .is_ok()
        );
        assert!(bytes.iter().all(|b| *b == 0));
        let last = layout::PATCH_ARENA_END - 4;
        assert!(mem.write_obj(0x1234_5678u32, GuestAddress(last)).is_ok());
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(last)).ok(),
            Some(0x1234_5678)
        );
        // The arena ends where its region ends: nothing is mapped after it.
        assert!(
            mem.read_obj::<u32>(GuestAddress(layout::PATCH_ARENA_END - 2))
                .is_err()
        );
    }
}
