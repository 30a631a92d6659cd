//! Fuzz target: arbitrary bytes as a patch journal file (what recovery reads at start).
//! Never panics, and never allocates without bound (libFuzzer's RSS limit).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = patch_engine::journal::replay_bytes(data);
});
