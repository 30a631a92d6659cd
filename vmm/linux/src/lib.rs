//! Reading a stock Linux kernel from outside, without an agent in the guest or debug packages:
//! the vmlinux out of its bzImage ([`bzimage`]) and the kernel's own symbol table out of the
//! vmlinux ([`kallsyms`]), so the patcher can find functions by name in a distribution kernel.

pub mod address_space;
pub mod arena;
pub mod attach;
pub mod boot_forms;
pub mod boot_rewrites;
pub mod bzimage;
pub mod engine;
pub mod image_cache;
pub mod interrupt_stacks;
pub mod kallsyms;
pub mod kaslr;
pub mod patch;
pub mod preemption;
pub mod tasks;
pub mod text_sites;

pub use bzimage::{LinuxImageError, MAX_VMLINUX_SIZE, vmlinux_from_bzimage};
pub use kallsyms::{
    AddressEncoding, Kallsyms, KallsymsError, KallsymsLayout, KernelSymbol, TableOrder, build_id,
    linux_banner,
};
