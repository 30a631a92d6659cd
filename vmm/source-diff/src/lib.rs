//! Kernel live patches from a source diff, as kpatch-build makes them, for a kernel patched
//! from outside (`docs/source-patches.md`): the fix's diff, the running kernel's own source
//! and compiler, and its image (the bytes a patch expects, the symbols it links against).
//!
//! - [`unified`]: the diff, and what it may touch.
//! - [`enums`]: when a changed enum keeps every old value, and so is no type change.
//! - [`tree`]: the kernel's source, fetched and prepared once.
//! - [`compile`]: the touched units before and after.
//! - [`elf`], [`objdiff`]: the objects, compared per function.
//! - [`reach`]: which of the kernel's units a changed header reaches.
//! - [`additions`]: header changes that only declare new names, and so reach no other unit.
//! - [`link`]: the changed functions' code, linked against the running kernel.
//! - [`clobbers`]: what callers the patch keeps may assume about a replaced callee.
//! - [`layout`]: what the compiler laid out (types, variables, signatures), before and after.
//! - [`build`]: all of it, into a patch.

pub mod additions;
pub mod build;
pub mod clobbers;
pub mod compile;
pub mod elf;
pub mod enums;
pub mod layout;
pub mod link;
pub mod objdiff;
pub mod reach;
pub mod tree;
pub mod unified;

pub use build::{
    SourceBuildError, SourceChoice, SourceReport, TargetKernel, build_from_source_diff,
};
