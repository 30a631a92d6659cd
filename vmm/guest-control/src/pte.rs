//! x86-64 page-table entry bits (Intel SDM vol. 3, 4.5).
//!
//! One copy for everything that reads or writes guest page tables: the walker ([`crate::paging`]),
//! a backend's identity map for 64-bit entry images, and an OS layer's own mappings (the Linux
//! kernel arena).

pub const PRESENT: u64 = 1 << 0;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const ACCESSED: u64 = 1 << 5;
pub const DIRTY: u64 = 1 << 6;
pub const PAGE_SIZE_BIT: u64 = 1 << 7;
pub const GLOBAL: u64 = 1 << 8;
pub const NO_EXECUTE: u64 = 1 << 63;
/// Bits 12..51 of an entry hold the physical address of the next level or of the page.
pub const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
