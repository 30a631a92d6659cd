//! The kernel's view of a vCPU's address space, which every walk into kernel memory uses.

use guest_control::VcpuState;

/// The kernel half of a vCPU's address space. A kernel built with page-table isolation
/// (`pti`) allocates each top-level table as two pages, the kernel's then the user copy, and a
/// vCPU halted in user mode runs on the copy (CR3 bit 12), which does not map kernel data. A
/// kernel built without it allocates one page, anywhere: bit 12 is then part of the address.
/// The low 12 bits may be a PCID (the walker ignores them).
pub fn kernel_view(v: &VcpuState, pti: bool) -> VcpuState {
    let mut k = *v;
    if pti {
        k.paging.cr3 &= !0x1fff;
    }
    k
}

/// Whether `kallsyms` is a kernel's built with page-table isolation (whether or not it is on
/// at run time: its top-level tables are two pages all the same).
pub fn has_pti(kallsyms: &crate::Kallsyms) -> bool {
    kallsyms.lookup("pti_finalize").is_some() || kallsyms.lookup("pti_init").is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use guest_control::paging::PagingRegs;

    #[test]
    fn bit_12_is_the_user_copy_only_in_a_kernel_built_with_pti() {
        let v = VcpuState {
            id: 0,
            rip: 0,
            rsp: 0,
            cpl: 3,
            paging: PagingRegs {
                cr0: 0,
                cr3: 0x288f000 | 0x5,
                cr4: 0,
                efer: 0,
            },
        };
        assert_eq!(kernel_view(&v, true).paging.cr3, 0x288e000);
        assert_eq!(kernel_view(&v, false).paging.cr3 & !0xfff, 0x288f000);
    }
}
