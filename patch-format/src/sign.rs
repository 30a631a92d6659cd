//! Signing and verifying `.hpatch` files (the keys themselves are in `keys`).
//!
//! Signatures are ed25519 (ed25519-dalek, strict verification) over
//! `SIGNATURE_CONTEXT || header || body`. A key is named by its key id: the
//! first 8 bytes of SHA-256 of the 32-byte public key.

use crate::codec::{ParseError, ParsedPatch, signed_message};
use crate::keys::{KeyId, PublicKey, SecretKey, SignatureBlock};

/// Why a patch's signature was not accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VerifyError {
    #[error("patch is unsigned (development only); sign it with `vmm patch sign --key`")]
    Unsigned,
    #[error("patch is signed by key {key_id}, which is not among the trusted keys")]
    UntrustedKey { key_id: KeyId },
    #[error(
        "signature by key {key_id} does not match the patch: the file was altered or signed with another key"
    )]
    BadSignature { key_id: KeyId },
}

impl ParsedPatch {
    /// Checks the signature against the trusted keys and returns the key that
    /// signed it. Unsigned patches are always refused.
    pub fn verify(&self, trusted: &[PublicKey]) -> Result<KeyId, VerifyError> {
        let (key_id, signature) = match &self.signature {
            SignatureBlock::Unsigned => return Err(VerifyError::Unsigned),
            SignatureBlock::Ed25519 { key_id, signature } => (*key_id, signature),
        };
        let key = trusted
            .iter()
            .find(|k| k.key_id() == key_id)
            .ok_or(VerifyError::UntrustedKey { key_id })?;
        if !key.verifies(&signed_message(&self.header_and_body), signature) {
            return Err(VerifyError::BadSignature { key_id });
        }
        Ok(key_id)
    }
}

/// Signs (or re-signs) an existing `.hpatch` file with `key`. The body and so
/// the patch id stay the same.
pub fn sign_file(file: &[u8], key: &SecretKey) -> Result<Vec<u8>, ParseError> {
    let parsed = crate::parse(file)?;
    Ok(crate::codec::sign_body(parsed.version, parsed.body(), key))
}

/// Strips the signature, leaving an unsigned (development) file with the same id.
pub fn unsigned_file(file: &[u8]) -> Result<Vec<u8>, ParseError> {
    let parsed = crate::parse(file)?;
    Ok(crate::codec::assemble_unsigned(
        parsed.version,
        parsed.body(),
    ))
}
