//! KVM memory slots: guest memory cut at page granularity so protected code is mapped to the
//! guest read-only (`KVM_MEM_READONLY`) and everything else stays an ordinary writable slot.
//!
//! Planning is pure (unit-tested below); [`SlotTable::change`] turns one plan into the next with
//! the fewest KVM calls: slots that stay the same are not touched, so the guest's other memory
//! keeps its mappings when a range is added at run time.

use kvm_bindings::{KVM_MEM_READONLY, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use serde::Serialize;
use thiserror::Error;

pub use crate::memory::Backing;

/// One KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub slot: u32,
    #[serde(serialize_with = "crate::integrity::hex")]
    pub gpa: u64,
    pub size: u64,
    #[serde(skip)]
    pub host: u64,
    pub readonly: bool,
}

impl Slot {
    fn same_mapping(&self, other: &Slot) -> bool {
        (self.gpa, self.size, self.host, self.readonly)
            == (other.gpa, other.size, other.host, other.readonly)
    }
}

#[derive(Debug, Error)]
pub enum SlotError {
    #[error(
        "protecting these code ranges needs {needed} KVM memory slots but this host's KVM allows {max}; protect fewer, larger ranges"
    )]
    TooMany { needed: usize, max: usize },
    #[error("KVM refused memory slot {slot} at guest-physical {gpa:#x} ({size} bytes{ro})", ro = if *readonly { ", read-only" } else { "" })]
    Register {
        slot: u32,
        gpa: u64,
        size: u64,
        readonly: bool,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Cuts every backing piece at the edges of the `protected` ranges (sorted, disjoint,
/// page-aligned): the pieces inside are read-only, the rest writable. Slot numbers are not
/// assigned here. With nothing protected the result is one writable slot per backing piece —
/// exactly the memory map of a VM without code integrity.
pub fn plan(backing: &[Backing], protected: &[(u64, u64)]) -> Vec<Slot> {
    let mut out = Vec::new();
    for b in backing {
        let end = b.gpa + b.size;
        let mut at = b.gpa;
        while at < end {
            // The first protected range that ends after `at` decides the next cut.
            let next = protected.iter().find(|(_, e)| *e > at);
            let (readonly, cut) = match next {
                Some(&(s, e)) if s <= at => (true, e.min(end)),
                Some(&(s, _)) => (false, s.min(end)),
                None => (false, end),
            };
            out.push(Slot {
                slot: 0,
                gpa: at,
                size: cut - at,
                host: b.host + (at - b.gpa),
                readonly,
            });
            at = cut;
        }
    }
    out
}

/// The slots currently registered with KVM.
#[derive(Debug, Default)]
pub struct SlotTable {
    slots: Vec<Slot>,
}

impl SlotTable {
    pub fn slots(&self) -> &[Slot] {
        &self.slots
    }

    /// Makes KVM's slots match `wanted` (from [`plan`]). Slots already mapped the same way keep
    /// their number; the others are deleted first (KVM refuses overlapping slots), then added
    /// under free numbers.
    ///
    /// Call only before the vCPUs first run or while every vCPU is parked: between the delete
    /// and the add, the memory is not mapped at all and a running vCPU would fault on it.
    pub fn change(
        &mut self,
        vm: &VmFd,
        wanted: &[Slot],
        max_slots: usize,
    ) -> Result<(), SlotError> {
        if wanted.len() > max_slots {
            return Err(SlotError::TooMany {
                needed: wanted.len(),
                max: max_slots,
            });
        }
        let (keep, drop): (Vec<Slot>, Vec<Slot>) = self
            .slots
            .iter()
            .partition(|old| wanted.iter().any(|w| w.same_mapping(old)));
        for old in &drop {
            set(vm, &Slot { size: 0, ..*old }, old.readonly)?;
            tracing::debug!(
                slot = old.slot,
                gpa = format_args!("{:#x}", old.gpa),
                "memory slot removed"
            );
        }
        let mut used: Vec<u32> = keep.iter().map(|s| s.slot).collect();
        let mut next_free = 0u32;
        let mut result = keep;
        for w in wanted {
            if result.iter().any(|k| k.same_mapping(w)) {
                continue;
            }
            while used.contains(&next_free) {
                next_free += 1;
            }
            let slot = Slot {
                slot: next_free,
                ..*w
            };
            used.push(next_free);
            set(vm, &slot, slot.readonly)?;
            tracing::debug!(
                slot = slot.slot,
                gpa = format_args!("{:#x}", slot.gpa),
                size = slot.size,
                readonly = slot.readonly,
                "memory slot"
            );
            result.push(slot);
        }
        result.sort_by_key(|s| s.gpa);
        self.slots = result;
        Ok(())
    }
}

fn set(vm: &VmFd, s: &Slot, readonly: bool) -> Result<(), SlotError> {
    let desc = kvm_userspace_memory_region {
        slot: s.slot,
        flags: if readonly { KVM_MEM_READONLY } else { 0 },
        guest_phys_addr: s.gpa,
        memory_size: s.size,
        userspace_addr: s.host,
    };
    // SAFETY: `host` points into a live mapping owned by the VM's `GuestMemory`, at least `size`
    // bytes long (plan() only cuts backing pieces, never extends them), and that memory outlives
    // the VM fd: the VM object drops the VM fd before unmapping guest memory. A size of 0 deletes
    // the slot and maps nothing.
    unsafe { vm.set_user_memory_region(desc) }.map_err(|source| SlotError::Register {
        slot: s.slot,
        gpa: s.gpa,
        size: s.size,
        readonly,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: Backing = Backing {
        gpa: 0,
        size: 0x800_0000,
        host: 0x7f00_0000_0000,
    };
    const ARENA: Backing = Backing {
        gpa: 0x7fe0_0000,
        size: 0x20_0000,
        host: 0x7f10_0000_0000,
    };

    fn shape(slots: &[Slot]) -> Vec<(u64, u64, bool)> {
        slots.iter().map(|s| (s.gpa, s.size, s.readonly)).collect()
    }

    #[test]
    fn nothing_protected_is_one_writable_slot_per_region() {
        let p = plan(&[RAM, ARENA], &[]);
        assert_eq!(
            shape(&p),
            vec![(0, 0x800_0000, false), (0x7fe0_0000, 0x20_0000, false)]
        );
        assert_eq!(p[1].host, ARENA.host);
    }

    #[test]
    fn code_is_cut_out_read_only_with_matching_host_addresses() {
        let p = plan(
            &[RAM, ARENA],
            &[(0x10_0000, 0x10_6000), (0x7fe0_0000, 0x8000_0000)],
        );
        assert_eq!(
            shape(&p),
            vec![
                (0, 0x10_0000, false),
                (0x10_0000, 0x6000, true),
                (0x10_6000, 0x800_0000 - 0x10_6000, false),
                (0x7fe0_0000, 0x20_0000, true),
            ]
        );
        assert_eq!(p[1].host, RAM.host + 0x10_0000);
        assert_eq!(p[2].host, RAM.host + 0x10_6000);
        // The pieces tile the regions exactly.
        let total: u64 = p.iter().map(|s| s.size).sum();
        assert_eq!(total, RAM.size + ARENA.size);
    }

    #[test]
    fn ranges_at_the_edges_and_across_regions_are_clamped() {
        let p = plan(&[RAM, ARENA], &[(0, 0x1000), (0x7ff_f000, 0x7fe0_1000)]);
        assert_eq!(
            shape(&p),
            vec![
                (0, 0x1000, true),
                (0x1000, 0x7ff_e000, false),
                (0x7ff_f000, 0x1000, true),
                (0x7fe0_0000, 0x1000, true),
                (0x7fe0_1000, 0x1f_f000, false),
            ]
        );
    }

    #[test]
    fn adjacent_ranges_give_adjacent_read_only_slots() {
        let p = plan(&[RAM], &[(0x1000, 0x2000), (0x3000, 0x4000)]);
        assert_eq!(
            shape(&p),
            vec![
                (0, 0x1000, false),
                (0x1000, 0x1000, true),
                (0x2000, 0x1000, false),
                (0x3000, 0x1000, true),
                (0x4000, 0x800_0000 - 0x4000, false),
            ]
        );
    }
}
