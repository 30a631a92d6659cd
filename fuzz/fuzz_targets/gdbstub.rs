//! Fuzz target: what a gdbstub sends the QEMU backend, through its parsers: packet payloads
//! (run-length decoding) and target descriptions (XML with nested includes). The framing
//! (`$…#xx`, acks, retransmission) is tested against a fake stub in qemu-backend's unit tests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qemu_backend::rsp::{RegLayout, decode_rle};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which & 1 == 0 {
        let _ = decode_rle(rest);
    } else if let Ok(text) = std::str::from_utf8(rest) {
        // The description includes itself (and anything else) from the same text: a loop must
        // be refused, not followed.
        let _ = RegLayout::from_target(text, |_| Ok(text.to_string()));
    }
});
