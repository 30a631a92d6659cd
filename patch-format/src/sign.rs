//! Keys, key files and the signature block.
//!
//! Signatures are ed25519 (ed25519-dalek, strict verification) over
//! `SIGNATURE_CONTEXT || header || body`. A key is named by its key id: the
//! first 8 bytes of SHA-256 of the 32-byte public key.

use crate::codec::{ParseError, ParsedPatch, signed_message};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Read;

/// First line of a secret key file.
pub const SECRET_KEY_HEADER: &str = "hvpatch-ed25519-secret-key-v1";
/// First line of a public key file.
pub const PUBLIC_KEY_HEADER: &str = "hvpatch-ed25519-public-key-v1";

/// First 8 bytes of SHA-256 of a public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}
impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

/// The signature block at the end of a file.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum SignatureBlock {
    /// Not signed: for development only; verification always refuses it.
    Unsigned,
    Ed25519 {
        key_id: KeyId,
        signature: [u8; 64],
    },
}

/// An ed25519 signing key (the 32-byte seed).
pub struct SecretKey(SigningKey);

/// An ed25519 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

/// Problems with key files.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyFileError {
    #[error(
        "line 1: expected the header {expected:?}, found {found:?} (is this the right kind of key file?)"
    )]
    BadHeader {
        expected: &'static str,
        found: String,
    },
    #[error("line 2: expected 64 hex digits (32 bytes): {reason}")]
    BadHex { reason: String },
    #[error("line {line}: unexpected content after the key")]
    Trailing { line: usize },
    #[error("the 32 bytes are not a valid ed25519 public key")]
    NotAPoint,
    #[error("cannot read random bytes from the OS: {0}")]
    Random(String),
}

fn key_id_of(public: &[u8; 32]) -> KeyId {
    let h = Sha256::digest(public);
    let mut id = [0u8; 8];
    id.copy_from_slice(&h[..8]);
    KeyId(id)
}

/// Splits a key file into its header and the 32 bytes on line 2. Strict: two
/// lines, optional final newline, nothing else.
fn parse_key_text(text: &str, header: &'static str) -> Result<[u8; 32], KeyFileError> {
    let mut lines = text.split('\n');
    let first = lines.next().unwrap_or("");
    if first != header {
        return Err(KeyFileError::BadHeader {
            expected: header,
            found: first.chars().take(64).collect(),
        });
    }
    let hexline = lines.next().unwrap_or("");
    let mut out = [0u8; 32];
    hex::decode_to_slice(hexline, &mut out).map_err(|e| KeyFileError::BadHex {
        reason: e.to_string(),
    })?;
    match (lines.next(), lines.next()) {
        (None, _) | (Some(""), None) => Ok(out),
        _ => Err(KeyFileError::Trailing { line: 3 }),
    }
}

impl SecretKey {
    /// A new key from the OS's random source.
    pub fn generate() -> Result<SecretKey, KeyFileError> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| KeyFileError::Random(e.to_string()))?;
        Ok(SecretKey::from_seed(&seed))
    }
    /// The key for a 32-byte seed (deterministic; tests use fixed seeds).
    pub fn from_seed(seed: &[u8; 32]) -> SecretKey {
        SecretKey(SigningKey::from_bytes(seed))
    }
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }
    pub fn key_id(&self) -> KeyId {
        self.public().key_id()
    }
    pub(crate) fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
    /// The key file: header line, then the seed in hex.
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_KEY_HEADER}\n{}\n", hex::encode(self.0.to_bytes()))
    }
    pub fn from_file_text(text: &str) -> Result<SecretKey, KeyFileError> {
        Ok(SecretKey::from_seed(&parse_key_text(
            text,
            SECRET_KEY_HEADER,
        )?))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(key id {}, seed hidden)", self.key_id())
    }
}

impl PublicKey {
    pub fn from_bytes(b: &[u8; 32]) -> Result<PublicKey, KeyFileError> {
        VerifyingKey::from_bytes(b)
            .map(PublicKey)
            .map_err(|_| KeyFileError::NotAPoint)
    }
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }
    pub fn key_id(&self) -> KeyId {
        key_id_of(&self.0.to_bytes())
    }
    /// The key file: header line, then the public key in hex.
    pub fn to_file_text(&self) -> String {
        format!("{PUBLIC_KEY_HEADER}\n{}\n", hex::encode(self.0.to_bytes()))
    }
    pub fn from_file_text(text: &str) -> Result<PublicKey, KeyFileError> {
        PublicKey::from_bytes(&parse_key_text(text, PUBLIC_KEY_HEADER)?)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey(key id {})", self.key_id())
    }
}

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
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        key.0
            .verify_strict(&signed_message(&self.header_and_body), &sig)
            .map_err(|_| VerifyError::BadSignature { key_id })?;
        Ok(key_id)
    }
}

/// Signs (or re-signs) an existing `.hpatch` file with `key`. The body and so
/// the patch id stay the same.
pub fn sign_file(file: &[u8], key: &SecretKey) -> Result<Vec<u8>, ParseError> {
    let parsed = crate::parse(file)?;
    Ok(crate::codec::sign_body(parsed.body(), key))
}

/// Strips the signature, leaving an unsigned (development) file with the same id.
pub fn unsigned_file(file: &[u8]) -> Result<Vec<u8>, ParseError> {
    let parsed = crate::parse(file)?;
    Ok(crate::codec::assemble_unsigned(parsed.body()))
}
