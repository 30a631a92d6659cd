//! Keys and the signature block's data: ed25519 secret and public keys, their files, key ids.
//! Knows nothing of the file encoding, so the codec and the signing code both build on it.

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
    /// Strict ed25519 verification of `signature` over `message`.
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(signature);
        self.0.verify_strict(message, &sig).is_ok()
    }

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
