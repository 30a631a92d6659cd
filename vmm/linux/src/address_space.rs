//! The kernel's view of a vCPU's address space, which every walk into kernel memory uses.

use guest_control::VcpuState;

/// The kernel half of a vCPU's address space: under page-table isolation a vCPU halted in
/// user mode runs on the user copy (CR3 bit 12), which does not map kernel data; the low 12
/// bits may be a PCID.
pub fn kernel_view(v: &VcpuState) -> VcpuState {
    let mut k = *v;
    k.paging.cr3 &= !0x1fff;
    k
}
