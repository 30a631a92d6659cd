//! Fuzz target: arbitrary bytes through the .hpatch parser.
//!
//! Checks, beyond "never panics": whatever parses is canonical (re-encoding
//! gives back the same bytes), and inspecting it (disassembly of arbitrary
//! code with arbitrary relocations) never panics either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use patch_format::{SecretKey, SignatureBlock, inspect_json, inspect_text, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(p) = parse(data) else { return };
    let again = match &p.signature {
        SignatureBlock::Unsigned => p.patch.to_file_unsigned(),
        SignatureBlock::Ed25519 { .. } => {
            p.patch
                .to_file_signed(&SecretKey::from_seed(&[0; 32]))
                .map(|mut v| {
                    // Keep the input's signature block: only the encoding is compared.
                    let n = v.len();
                    v[n - 72..].copy_from_slice(&data[data.len() - 72..]);
                    v
                })
        }
    };
    assert_eq!(
        again.as_deref().ok(),
        Some(data),
        "parsed input is not canonical"
    );
    let _ = p.verify(&[]);
    let _ = inspect_text(&p, None, true);
    let _ = inspect_json(&p, None, true);
});
