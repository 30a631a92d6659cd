//! The per-CPU IRQ stacks of a running x86-64 kernel, so that the engine sees the context an
//! interrupt handler interrupted (`patch_engine::rewrites::TextRewrites::interrupted_stack`).
//!
//! An interrupt taken in kernel mode saves the interrupted RIP in `pt_regs` on the task stack,
//! then `call_on_irqstack` (`arch/x86/include/asm/irq_stack.h`) stores the task stack pointer
//! in the top slot of the CPU's IRQ stack and switches to it. A vCPU parked in the handler
//! runs on the IRQ stack: the engine's scan of its own stack never reaches the interrupted
//! RIP, which may be inside the bytes a jump displaces (`docs/patch-engine.md`, "Threads the
//! hypervisor cannot see"). The top slot leads back to it.

use guest_control::{GuestControl, VcpuState};
use patch_engine::rewrites::GuestMemory;

use crate::Kallsyms;

/// `IRQ_STACK_SIZE` of x86-64 without KASAN (`PAGE_SIZE << IRQ_STACK_ORDER`, order 2).
pub const IRQ_STACK_SIZE: u64 = 16 << 10;

/// At most this many CPUs' stacks are read at attach (`nr_cpu_ids` is the guest's word).
pub const MAX_CPUS: u32 = 1024;

/// Each online CPU's `hardirq_stack_ptr`: the IRQ stack's top slot, where `call_on_irqstack`
/// saves the stack pointer it switched from (`map_irq_stack` stores "TOS" = stack + size − 8).
/// Read at attach, through `vcpu`'s kernel view, with run-time addresses `slide` past the
/// link-time ones. Empty when the kernel's symbols lack any of the names (another layout):
/// the engine then scans only each vCPU's own stack, as before.
pub fn tops<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    kallsyms: &Kallsyms,
    slide: u64,
) -> Vec<u64> {
    let (Some(nr), Some(offsets), Some(ptr)) = (
        kallsyms.lookup("nr_cpu_ids"),
        kallsyms.lookup("__per_cpu_offset"),
        kallsyms.lookup_symbol("hardirq_stack_ptr"),
    ) else {
        return Vec::new();
    };
    // The per-CPU symbol is an offset into each CPU's area (type A), not an address.
    if !ptr.is_absolute() {
        return Vec::new();
    }
    let word = |gva: u64, len: usize| -> Option<u64> {
        let b = guest.read_virtual(vcpu, gva, len).ok()?;
        let mut w = [0u8; 8];
        w[..len].copy_from_slice(b.get(..len)?);
        Some(u64::from_le_bytes(w))
    };
    let Some(cpus) = word(nr.wrapping_add(slide), 4) else {
        return Vec::new();
    };
    let cpus = (cpus as u32).min(MAX_CPUS);
    (0..u64::from(cpus))
        .filter_map(|cpu| {
            let base = word(offsets.wrapping_add(slide).wrapping_add(cpu * 8), 8)?;
            word(base.wrapping_add(ptr.address), 8)
        })
        .filter(|&top| top != 0)
        .collect()
}

/// The stack pointer the vCPU left for the IRQ stack it runs on, when it runs on one of `tops`
/// in kernel mode and has not returned from it (the slot holds an address outside that stack).
pub fn interrupted(tops: &[u64], vcpu: &VcpuState, memory: GuestMemory<'_>) -> Option<u64> {
    if vcpu.cpl != 0 {
        return None;
    }
    let top = *tops.iter().find(|&&top| {
        let end = top.saturating_add(8);
        vcpu.rsp < end && vcpu.rsp >= end.saturating_sub(IRQ_STACK_SIZE)
    })?;
    let saved = u64::from_le_bytes(memory.read(top, 8)?.try_into().ok()?);
    let end = top.saturating_add(8);
    let on_this_stack = saved < end && saved >= end.saturating_sub(IRQ_STACK_SIZE);
    (saved != 0 && !on_this_stack).then_some(saved)
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_control::paging::PagingRegs;

    fn at(rsp: u64, cpl: u8) -> VcpuState {
        VcpuState {
            id: 0,
            rip: 0xffff_ffff_8100_0000,
            rsp,
            cpl,
            paging: PagingRegs {
                cr0: 0,
                cr3: 0,
                cr4: 0,
                efer: 0,
            },
        }
    }

    #[test]
    fn a_vcpu_on_an_irq_stack_leads_back_to_the_task_stack_it_left() {
        const TOP0: u64 = 0xffff_c900_0000_3ff8;
        const TOP1: u64 = 0xffff_c900_0004_3ff8;
        const TASK_RSP: u64 = 0xffff_c900_0123_7e40;
        let tops = [TOP0, TOP1];
        let read = |gva: u64, len: usize| {
            (gva == TOP1 && len == 8).then(|| TASK_RSP.to_le_bytes().to_vec())
        };
        let memory = GuestMemory(&read);
        // Deep in the handler on CPU 1's IRQ stack, at its very top, and in user mode.
        assert_eq!(
            interrupted(&tops, &at(TOP1 - 0x2000, 0), memory),
            Some(TASK_RSP)
        );
        assert_eq!(interrupted(&tops, &at(TOP1, 0), memory), Some(TASK_RSP));
        assert_eq!(interrupted(&tops, &at(TOP1 - 0x2000, 3), memory), None);
        // On a task stack, below an IRQ stack, or on one whose slot cannot be read: nothing.
        assert_eq!(interrupted(&tops, &at(TASK_RSP, 0), memory), None);
        assert_eq!(
            interrupted(&tops, &at(TOP1 + 8 - IRQ_STACK_SIZE - 8, 0), memory),
            None
        );
        assert_eq!(interrupted(&tops, &at(TOP0 - 0x100, 0), memory), None);
    }

    #[test]
    fn a_slot_pointing_into_its_own_stack_is_no_interrupted_context() {
        const TOP: u64 = 0xffff_c900_0000_3ff8;
        let stale = TOP - 0x800;
        let read = |_: u64, _: usize| Some(stale.to_le_bytes().to_vec());
        assert_eq!(
            interrupted(&[TOP], &at(TOP - 0x100, 0), GuestMemory(&read)),
            None
        );
    }
}
