//! Builds the sample patch `vmm demo` applies: the test guest's v1→v2 fix (`compute` and
//! `triangle`), signed with the demo key. Built here, from the very guest images embedded in
//! the binary, so the sample always matches the built-in guest.

use patch_format::{Metadata, PatchInfo, SecretKey, build_from_elfs};
use std::path::PathBuf;

/// Seed of the demo signing key. It is public (it is in this file): only `vmm demo`, which
/// trusts nothing else, accepts patches signed with it.
const DEMO_SEED: [u8; 32] = *b"hvpatch demo key: not a secret!!";

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let v1 = guest_tools::test_guest(guest_tools::GuestBuild::V1);
    let v2 = guest_tools::test_guest(guest_tools::GuestBuild::V2);
    let info = PatchInfo {
        meta: Metadata {
            name: "test-guest-v2-fix".into(),
            description: "Sample fix for the built-in test guest: triangle() off-by-one and compute() input clamp (v1 -> v2)".into(),
            author: "vmm demo".into(),
            created: 1_767_225_600, // 2026-01-01: fixed, so the sample's id never changes
            advisories: vec!["DEMO-0001".into()],
            replaces: Vec::new(),
        },
        target_name: Some("built-in test guest".into()),
    };
    let built = build_from_elfs(v1, v2, &[], &info).expect("the test guest's v1->v2 patch builds");
    let key = SecretKey::from_seed(&DEMO_SEED);
    let file = built
        .patch
        .to_file_signed(&key)
        .expect("the sample patch encodes");
    std::fs::write(out.join("sample.hpatch"), file).expect("write sample.hpatch");
    std::fs::write(out.join("demo.pub"), key.public().to_file_text()).expect("write demo.pub");
    println!("cargo::rerun-if-changed=build.rs");
}
