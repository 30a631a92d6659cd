//! The stacks a running x86-64 kernel switches to for interrupts and exceptions, so that the
//! engine sees the context a handler interrupted
//! (`patch_engine::rewrites::TextRewrites::interrupted_stacks`).
//!
//! A vCPU parked in a handler runs on another stack than the code it interrupted, and the
//! engine's scan of its own stack never reaches the interrupted RIP, which may be inside the
//! bytes a jump displaces (`docs/patch-engine.md`, "Threads the hypervisor cannot see"):
//! - an interrupt taken in kernel mode saves the interrupted RIP in `pt_regs` on the task
//!   stack, then `call_on_irqstack` (`arch/x86/include/asm/irq_stack.h`) stores the task
//!   stack pointer in the top slot of the CPU's IRQ stack and switches to it;
//! - an exception with its own stack (NMI, `#DB`, `#MC`, `#DF`, and `#VC` in a kernel built
//!   for SEV-ES: the TSS's IST entries) has the CPU push the interrupted RIP, CS and RSP at
//!   the top of that stack.
//!
//! Both lead back, and they nest (an NMI in an interrupt handler): the chain is followed a few
//! hops.

use guest_control::{GuestControl, VcpuState};
use patch_engine::rewrites::GuestMemory;

use crate::Kallsyms;

/// `IRQ_STACK_SIZE` of x86-64 without KASAN (`PAGE_SIZE << IRQ_STACK_ORDER`, order 2).
pub const IRQ_STACK_SIZE: u64 = 16 << 10;

/// `EXCEPTION_STKSZ` of 6.1 without KASAN (`PAGE_SIZE << EXCEPTION_STACK_ORDER`, order 1):
/// each IST stack is two pages above a guard page (their tops 12 KiB apart, as measured).
pub const EXCEPTION_STACK_SIZE: u64 = 8 << 10;

/// At most this many CPUs' stacks are read at attach (`nr_cpu_ids` is the guest's word).
pub const MAX_CPUS: u32 = 1024;

/// Handlers interrupting handlers followed back at most this far.
pub const MAX_HOPS: usize = 3;

/// Where `x86_hw_tss.ist[0]` is in the per-CPU `cpu_tss_rw` (packed: `reserved1` u32, `sp0`,
/// `sp1`, `sp2`, `reserved2`, then `ist[7]`).
const TSS_IST_OFFSET: u64 = 4 + 4 * 8;
const IST_ENTRIES: u64 = 7;

/// From the top of an IST stack down to the CPU's frame: `#DF`'s error code, RIP, CS, RFLAGS,
/// RSP, SS.
const IST_FRAME: u64 = 6 * 8;
const IST_FRAME_CS: u64 = 4 * 8;
const IST_FRAME_RSP: u64 = 2 * 8;

/// Where each possible CPU's per-CPU area starts (`__per_cpu_offset[cpu]` for the first
/// `nr_cpu_ids`, at most [`MAX_CPUS`]): a per-CPU symbol's value is an offset from it. Empty
/// when the kernel lacks the symbols or they cannot be read.
pub fn per_cpu_bases<G: GuestControl + ?Sized>(
    guest: &G,
    vcpu: &VcpuState,
    kallsyms: &Kallsyms,
    slide: u64,
) -> Vec<u64> {
    let word = |gva: u64, len: usize| -> Option<u64> {
        let b = guest.read_virtual(vcpu, gva, len).ok()?;
        let mut w = [0u8; 8];
        w[..len].copy_from_slice(b.get(..len)?);
        Some(u64::from_le_bytes(w))
    };
    let (Some(nr), Some(offsets)) = (
        kallsyms.lookup("nr_cpu_ids"),
        kallsyms.lookup("__per_cpu_offset"),
    ) else {
        return Vec::new();
    };
    let Some(cpus) = word(nr.wrapping_add(slide), 4) else {
        return Vec::new();
    };
    (0..u64::from((cpus as u32).min(MAX_CPUS)))
        .filter_map(|cpu| word(offsets.wrapping_add(slide).wrapping_add(cpu * 8), 8))
        .collect()
}

/// Each online CPU's interrupt and exception stacks, read at attach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InterruptStacks {
    /// `hardirq_stack_ptr` per CPU: the IRQ stack's top slot, where `call_on_irqstack` saves
    /// the stack pointer it switched from (`map_irq_stack` stores "TOS" = stack + size − 8).
    pub irq_tops: Vec<u64>,
    /// The TSS's non-zero IST entries per CPU: the tops of the exception stacks.
    pub ist_tops: Vec<u64>,
}

impl InterruptStacks {
    /// Reads them through `vcpu`'s kernel view, with run-time addresses `slide` past the
    /// link-time ones. Either list is empty when the kernel's symbols lack the names it needs
    /// (another layout): the engine then scans only what it scanned before, each vCPU's own
    /// stack.
    pub fn read<G: GuestControl + ?Sized>(
        guest: &G,
        vcpu: &VcpuState,
        kallsyms: &Kallsyms,
        slide: u64,
    ) -> InterruptStacks {
        let word = |gva: u64, len: usize| -> Option<u64> {
            let b = guest.read_virtual(vcpu, gva, len).ok()?;
            let mut w = [0u8; 8];
            w[..len].copy_from_slice(b.get(..len)?);
            Some(u64::from_le_bytes(w))
        };
        let bases = per_cpu_bases(guest, vcpu, kallsyms, slide);
        if bases.is_empty() {
            return InterruptStacks::default();
        }
        // Per-CPU symbols are offsets into each CPU's area (type A), not addresses.
        let per_cpu = |name: &str| kallsyms.lookup_symbol(name).filter(|s| s.is_absolute());
        let irq_tops = per_cpu("hardirq_stack_ptr").map_or_else(Vec::new, |ptr| {
            bases
                .iter()
                .filter_map(|base| word(base.wrapping_add(ptr.address), 8))
                .filter(|&top| top != 0)
                .collect()
        });
        let ist_tops = per_cpu("cpu_tss_rw").map_or_else(Vec::new, |tss| {
            bases
                .iter()
                .flat_map(|base| {
                    let ist = base.wrapping_add(tss.address).wrapping_add(TSS_IST_OFFSET);
                    (0..IST_ENTRIES).filter_map(move |i| word(ist.wrapping_add(i * 8), 8))
                })
                .filter(|&top| top != 0)
                .collect()
        });
        InterruptStacks { irq_tops, ist_tops }
    }

    /// Whether both kinds were found (the kernel's symbols had what the read needs).
    pub fn known(&self) -> bool {
        !self.irq_tops.is_empty() && !self.ist_tops.is_empty()
    }

    /// Whether `rsp` is on one of the CPUs' IRQ or exception stacks.
    pub fn holds(&self, rsp: u64) -> bool {
        let within = |end: u64, size: u64| rsp < end && rsp >= end.saturating_sub(size);
        self.ist_tops
            .iter()
            .any(|&top| within(top, EXCEPTION_STACK_SIZE))
            || self
                .irq_tops
                .iter()
                .any(|&top| within(top.saturating_add(8), IRQ_STACK_SIZE))
    }

    /// Where the contexts a vCPU parked in kernel mode interrupted keep their stacks, nearest
    /// first: for a vCPU on an IST stack, the CPU's frame at its top (which holds the
    /// interrupted RIP); for one on an IRQ stack, the task stack its top slot saved. Followed
    /// from each to the next while the interrupted context was in kernel mode on another such
    /// stack, at most [`MAX_HOPS`].
    pub fn interrupted(&self, vcpu: &VcpuState, memory: GuestMemory<'_>) -> Vec<u64> {
        let word = |gva: u64| Some(u64::from_le_bytes(memory.read(gva, 8)?.try_into().ok()?));
        let within = |rsp: u64, end: u64, size: u64| rsp < end && rsp >= end.saturating_sub(size);
        let mut found = Vec::new();
        if vcpu.cpl != 0 {
            return found;
        }
        let mut rsp = vcpu.rsp;
        while found.len() < MAX_HOPS {
            if let Some(&top) = self
                .ist_tops
                .iter()
                .find(|&&top| within(rsp, top, EXCEPTION_STACK_SIZE))
            {
                found.push(top.saturating_sub(IST_FRAME));
                // The exception came from kernel mode: go on from the stack it was on.
                match (word(top - IST_FRAME_CS), word(top - IST_FRAME_RSP)) {
                    (Some(cs), Some(next))
                        if cs & 3 == 0 && !within(next, top, EXCEPTION_STACK_SIZE) =>
                    {
                        rsp = next;
                        continue;
                    }
                    _ => break,
                }
            }
            let Some(&top) = self
                .irq_tops
                .iter()
                .find(|&&top| within(rsp, top.saturating_add(8), IRQ_STACK_SIZE))
            else {
                break;
            };
            // A slot pointing into its own stack is stale or forged: nothing to follow.
            match word(top) {
                Some(saved)
                    if saved != 0 && !within(saved, top.saturating_add(8), IRQ_STACK_SIZE) =>
                {
                    found.push(saved);
                    rsp = saved;
                }
                _ => break,
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_control::paging::PagingRegs;
    use std::collections::HashMap;

    const IRQ_TOP0: u64 = 0xffff_c900_0000_3ff8;
    const IRQ_TOP1: u64 = 0xffff_c900_0004_3ff8;
    const NMI_TOP1: u64 = 0xffff_fe00_0004_e000;
    const TASK_RSP: u64 = 0xffff_c900_0123_7e40;

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

    fn stacks() -> InterruptStacks {
        InterruptStacks {
            irq_tops: vec![IRQ_TOP0, IRQ_TOP1],
            ist_tops: vec![NMI_TOP1],
        }
    }

    /// Guest memory holding `words` (8-byte reads only).
    fn holding(words: &[(u64, u64)]) -> impl Fn(u64, usize) -> Option<Vec<u8>> + use<> {
        let m: HashMap<u64, u64> = words.iter().copied().collect();
        move |gva, len| {
            (len == 8)
                .then(|| m.get(&gva).map(|w| w.to_le_bytes().to_vec()))
                .flatten()
        }
    }

    #[test]
    fn a_vcpu_on_an_irq_stack_leads_back_to_the_task_stack_it_left() {
        let read = holding(&[(IRQ_TOP1, TASK_RSP)]);
        let memory = GuestMemory(&read);
        let s = stacks();
        // Deep in the handler on CPU 1's IRQ stack, at its very top, and in user mode.
        assert_eq!(s.interrupted(&at(IRQ_TOP1 - 0x2000, 0), memory), [TASK_RSP]);
        assert_eq!(s.interrupted(&at(IRQ_TOP1, 0), memory), [TASK_RSP]);
        assert!(s.interrupted(&at(IRQ_TOP1 - 0x2000, 3), memory).is_empty());
        // On a task stack, below an IRQ stack, or on one whose slot cannot be read: nothing.
        assert!(s.interrupted(&at(TASK_RSP, 0), memory).is_empty());
        assert!(
            s.interrupted(&at(IRQ_TOP1 + 8 - IRQ_STACK_SIZE - 8, 0), memory)
                .is_empty()
        );
        assert!(s.interrupted(&at(IRQ_TOP0 - 0x100, 0), memory).is_empty());
    }

    #[test]
    fn a_slot_pointing_into_its_own_stack_is_no_interrupted_context() {
        let read = holding(&[(IRQ_TOP0, IRQ_TOP0 - 0x800)]);
        let s = stacks();
        assert!(
            s.interrupted(&at(IRQ_TOP0 - 0x100, 0), GuestMemory(&read))
                .is_empty()
        );
    }

    #[test]
    fn an_nmi_in_an_interrupt_handler_leads_back_through_both() {
        // The NMI interrupted the handler on CPU 1's IRQ stack (kernel CS), which had
        // interrupted the task.
        let in_handler = IRQ_TOP1 - 0x300;
        let read = holding(&[
            (NMI_TOP1 - IST_FRAME_CS, 0x10),
            (NMI_TOP1 - IST_FRAME_RSP, in_handler),
            (IRQ_TOP1, TASK_RSP),
        ]);
        let s = stacks();
        assert_eq!(
            s.interrupted(&at(NMI_TOP1 - 0x200, 0), GuestMemory(&read)),
            [NMI_TOP1 - IST_FRAME, TASK_RSP]
        );
        // An NMI from user mode: its frame is scanned (a user RIP matches no kernel site),
        // and there is nothing further.
        let read = holding(&[
            (NMI_TOP1 - IST_FRAME_CS, 0x33),
            (NMI_TOP1 - IST_FRAME_RSP, 0x7ffc_0000_1000),
        ]);
        assert_eq!(
            s.interrupted(&at(NMI_TOP1 - 0x200, 0), GuestMemory(&read)),
            [NMI_TOP1 - IST_FRAME]
        );
    }
}
