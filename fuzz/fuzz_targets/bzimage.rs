//! Fuzz target: arbitrary bytes as a bzImage whose vmlinux is extracted (header, XZ container,
//! BCJ, LZMA2, size limit).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = linux_guest::vmlinux_from_bzimage(data);
});
