//! The VMM library: VM plumbing, vCPU control, the control API and its client.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library; integration tests and
//! benchmarks use the same pieces.

pub mod api;
pub mod bench;
pub mod boot;
pub mod client;
pub mod cpuid;
pub mod demo;
pub mod demo_linux;
pub mod devices;
pub mod engine;
pub mod guest;
pub mod integrity;
pub mod layout;
pub mod linux;
pub mod memory;
pub mod pagetables;
pub mod paging;
pub mod patching;
pub mod phases;
pub mod qemu;
pub mod stats;
pub mod vcpu;
pub mod vm;
