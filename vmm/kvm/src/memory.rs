//! Guest memory: RAM and the patch arena; allocation, the host-capacity check, and the host
//! mappings KVM's memory slots are cut from.

use thiserror::Error;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, MemoryRegionAddress,
};

use crate::layout::{self, MIN_MEMORY};

/// The guest memory type used throughout the VMM.
///
/// It holds every RAM region of [`layout::ram_regions`] and the patch arena
/// ([`layout::PATCH_ARENA`]) as a region of its own, so reads and writes at arena addresses go
/// through the same guest-physical accessors as RAM. Which is which is decided by address:
/// [`is_arena`] (the arena never shares a region with RAM).
pub type GuestMemory = GuestMemoryMmap;

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
    #[error("could not allocate {requested_mib} MiB of guest memory; ask for less with --memory")]
    Allocate {
        requested_mib: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
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
    GuestMemoryMmap::from_ranges(&ranges).map_err(|source| MemoryError::Allocate {
        requested_mib,
        source,
    })
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
