//! The KVM VMM: VM and vCPUs (kvm-ioctls), guest memory and its KVM slots (vm-memory), boot
//! (PVH, 64-bit ELF entry and Linux bzImage; ACPI tables for Linux guests), devices, code integrity, and this VMM as a
//! [`guest_control::GuestControl`] backend ([`guest`]).

pub mod acpi;
pub mod boot;
pub mod builder;
pub mod cpuid;
pub mod devices;
pub mod guest;
pub mod integrity;
pub mod kaslr;
pub mod layout;
pub mod log_limit;
pub mod memory;
pub mod pagetables;
pub mod vcpu;
pub mod vm;
