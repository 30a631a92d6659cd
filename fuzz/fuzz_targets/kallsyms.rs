//! Fuzz target: arbitrary bytes as a vmlinux whose kallsyms tables are searched and decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = linux_guest::Kallsyms::from_vmlinux(data) {
        let _ = k.symbols().len();
    }
});
