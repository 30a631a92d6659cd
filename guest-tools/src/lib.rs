//! Guest images for the tests and the demo: the freestanding test guest, built in two versions
//! (v1 and the "fixed" v2) by `build.rs`, plus the protocol it speaks and the reference formulas
//! the host uses to check its results. `protocol.rs` and `reference.rs` are compiled into the
//! guest too: one source of truth.

pub mod protocol;
pub mod reference;

use std::path::Path;

/// Which build of the test guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestBuild {
    V1,
    V2,
}

static V1: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest-v1.elf"));
static V2: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test-guest-v2.elf"));

/// The ELF image (with its symbols) of a test-guest build.
pub fn test_guest(build: GuestBuild) -> &'static [u8] {
    match build {
        GuestBuild::V1 => V1,
        GuestBuild::V2 => V2,
    }
}

/// Where that ELF is on disk (in this crate's build output), for tools that take a path.
pub fn test_guest_path(build: GuestBuild) -> &'static Path {
    match build {
        GuestBuild::V1 => Path::new(concat!(env!("OUT_DIR"), "/test-guest-v1.elf")),
        GuestBuild::V2 => Path::new(concat!(env!("OUT_DIR"), "/test-guest-v2.elf")),
    }
}
