//! What the project builds around the product, not into it: benchmarks ([`bench`]), the demos
//! ([`demo`], [`demo_linux`]), the embedded sample patch and demo key ([`sample`]), the waiter
//! for the test guest's results ([`phases`]), a QEMU launcher ([`qemu_launch`]) and the nested
//! tier's runner ([`nested`]: jobs where KVM has real SVM/VMX, in L1 under QEMU TCG if need
//! be). Shared by the `vmm` binary's demo and bench commands and by the integration tests;
//! never published.

pub mod bench;
pub mod demo;
pub mod demo_linux;
pub mod nested;
pub mod phases;
pub mod qemu_launch;
pub mod sample;
