//! The canonical binary encoding (format versions 1 and 2) and its strict parser.
//!
//! Encoding rules (see docs/patch-format.md): little-endian fixed-width
//! integers, `u32` length prefixes, `u8` tags with a closed set of values, a
//! fixed field order, sorted lists without duplicates. There are no varints and
//! no optional fields that may be either absent or empty, so each patch has
//! exactly one encoding; the parser rejects every other byte string.
//!
//! The parser never panics, never reads out of bounds, and allocates at most a
//! small constant factor of the input size, which is itself capped at
//! [`limits::MAX_FILE`].

use crate::keys::{KeyId, SignatureBlock};
use crate::model::*;
use sha2::{Digest, Sha256};
use std::fmt;

/// The 8 magic bytes that start every `.hpatch` file.
pub const MAGIC: [u8; 8] = *b"HVPATCH\0";
/// Size of the fixed header: magic, version, reserved, body length, signature length.
pub const HEADER_LEN: usize = 20;
/// Domain separator prepended to `header || body` before signing, so a patch
/// signature can never be confused with a signature over anything else.
pub const SIGNATURE_CONTEXT: &[u8] = b"hvpatch signature v1\0";

const SIG_UNSIGNED: u8 = 0;
const SIG_ED25519: u8 = 1;
const SIG_ED25519_LEN: usize = 1 + 8 + 64;

/// The first 4 bytes of every version-2 body. Read as a version-1 body they would be the
/// length of `meta.name`, 0x32765048, far over the 4 KiB string limit: no byte string is both a
/// v1 and a v2 body, so the id (SHA-256 of the body) names one patch whatever the version.
pub const BODY_TAG_V2: [u8; 4] = *b"HPv2";

const RELOC_TARGET_SYMBOL: u8 = 1;
const RELOC_TARGET_DATA: u8 = 2;

/// Where in the file a field is: a dotted path such as `sites[3].relocations[0].symbol`.
/// Copyable and allocation-free so the parser's happy path costs nothing for it.
#[derive(Clone, Copy)]
pub(crate) struct Fp {
    parts: [(&'static str, Option<u32>); 4],
    n: usize,
}

impl Fp {
    pub(crate) const fn root(name: &'static str) -> Fp {
        Fp {
            parts: [(name, None), ("", None), ("", None), ("", None)],
            n: 1,
        }
    }
    fn idx(name: &'static str, i: usize) -> Fp {
        let mut f = Fp::root(name);
        f.parts[0].1 = Some(u32::try_from(i).unwrap_or(u32::MAX));
        f
    }
    fn f(mut self, name: &'static str) -> Fp {
        if self.n < self.parts.len() {
            self.parts[self.n] = (name, None);
            self.n += 1;
        }
        self
    }
    fn i(mut self, name: &'static str, i: usize) -> Fp {
        if self.n < self.parts.len() {
            self.parts[self.n] = (name, Some(u32::try_from(i).unwrap_or(u32::MAX)));
            self.n += 1;
        }
        self
    }
}

impl fmt::Display for Fp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (k, (name, idx)) in self.parts.iter().take(self.n).enumerate() {
            if k > 0 {
                f.write_str(".")?;
            }
            f.write_str(name)?;
            if let Some(i) = idx {
                write!(f, "[{i}]")?;
            }
        }
        Ok(())
    }
}

/// Why a byte string is not a valid `.hpatch` file. Every variant names the
/// byte offset (from the start of the file) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("file is {len} bytes, over the {max}-byte limit of a .hpatch file")]
    FileTooLarge { len: usize, max: usize },
    #[error(
        "offset {offset}, {field}: file ends early: {need} bytes needed, {have} left (truncated or not a .hpatch file)"
    )]
    Truncated {
        offset: usize,
        field: String,
        need: usize,
        have: usize,
    },
    #[error("offset 0, magic: not a .hpatch file (starts with {found}, expected {expected})")]
    BadMagic { found: String, expected: String },
    #[error(
        "offset {offset}, {field}: format version {found} is not supported; this build reads versions {supported} (upgrade the tool or rebuild the patch)"
    )]
    UnsupportedVersion {
        offset: usize,
        field: String,
        found: u16,
        /// The versions this build reads, e.g. `1 and 2`.
        supported: &'static str,
    },
    #[error("offset {offset}, {field}: reserved, must be 0 but is {value}")]
    Reserved {
        offset: usize,
        field: String,
        value: u64,
    },
    #[error("offset {offset}, {field}: declares {declared} bytes but the file has {actual}")]
    SizeMismatch {
        offset: usize,
        field: String,
        declared: u64,
        actual: u64,
    },
    #[error("offset {offset}, {field}: {value} is over the limit of {max}")]
    OverLimit {
        offset: usize,
        field: String,
        value: u64,
        max: u64,
    },
    #[error("offset {offset}, {field}: must not be empty")]
    Empty { offset: usize, field: String },
    #[error("offset {offset}, {field}: not valid UTF-8")]
    BadUtf8 { offset: usize, field: String },
    #[error("offset {offset}, {field}: control character {ch:?} is not allowed here")]
    ControlChar {
        offset: usize,
        field: String,
        ch: char,
    },
    /// An invisible formatting character (Unicode general category Cf: bidi embeddings,
    /// overrides and isolates, LRM/RLM/ALM, zero-width joiners, ...), which can make a name
    /// or description display as something other than what it says.
    #[error(
        "offset {offset}, {field}: invisible formatting character {ch:?} is not allowed (it can \
         make the text display differently from what it contains); remove it"
    )]
    FormatChar {
        offset: usize,
        field: String,
        ch: char,
    },
    #[error("offset {offset}, {field}: unknown value {value} (allowed: {allowed})")]
    BadTag {
        offset: usize,
        field: String,
        value: u64,
        allowed: &'static str,
    },
    #[error("offset {offset}, {field}: not canonical: {reason}")]
    NotCanonical {
        offset: usize,
        field: String,
        reason: String,
    },
    #[error("offset {offset}, {field}: {reason}")]
    Invalid {
        offset: usize,
        field: String,
        reason: String,
    },
    #[error("offset {offset}: {count} trailing bytes after the {after}")]
    Trailing {
        offset: usize,
        count: usize,
        after: &'static str,
    },
}

impl ParseError {
    /// The byte offset the error refers to.
    pub fn offset(&self) -> usize {
        match self {
            ParseError::FileTooLarge { .. } | ParseError::BadMagic { .. } => 0,
            ParseError::Truncated { offset, .. }
            | ParseError::UnsupportedVersion { offset, .. }
            | ParseError::Reserved { offset, .. }
            | ParseError::SizeMismatch { offset, .. }
            | ParseError::OverLimit { offset, .. }
            | ParseError::Empty { offset, .. }
            | ParseError::BadUtf8 { offset, .. }
            | ParseError::ControlChar { offset, .. }
            | ParseError::FormatChar { offset, .. }
            | ParseError::BadTag { offset, .. }
            | ParseError::NotCanonical { offset, .. }
            | ParseError::Invalid { offset, .. }
            | ParseError::Trailing { offset, .. } => *offset,
        }
    }
}

/// Why a patch could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The patch breaks a rule of the format; the offset is where the field
    /// would have been in the encoding.
    #[error(transparent)]
    Invalid(#[from] ParseError),
    #[error("{field}: {len} bytes cannot be length-prefixed")]
    TooLong { field: String, len: usize },
}

/// Whether `ch` is an invisible formatting character (general category Cf), which covers the
/// bidi controls U+202A–U+202E, U+2066–U+2069, U+200E/U+200F and U+061C.
fn is_format_char(ch: char) -> bool {
    use unicode_general_category::{GeneralCategory, get_general_category};
    get_general_category(ch) == GeneralCategory::Format
}

/// Why a patch file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The read itself failed.
    #[error("cannot read the patch file")]
    Io(#[source] std::io::Error),
    /// The input is longer than any patch can be.
    #[error(
        "the input is larger than {max} bytes, the format's limit for a patch file: it is no \
         patch (check the path)"
    )]
    TooLarge { max: usize },
}

/// Reads a patch file from `r`, reading at most [`limits::MAX_FILE`]` + 1` bytes so that an
/// endless or huge input (`/dev/zero`) is refused without being buffered.
pub fn read_patch(r: impl std::io::Read) -> Result<Vec<u8>, ReadError> {
    use std::io::Read;
    let mut out = Vec::new();
    r.take(limits::MAX_FILE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(ReadError::Io)?;
    if out.len() > limits::MAX_FILE {
        return Err(ReadError::TooLarge {
            max: limits::MAX_FILE,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------- encoding

struct Writer {
    out: Vec<u8>,
}

impl Writer {
    fn u8(&mut self, v: u8) {
        self.out.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.out.extend_from_slice(&v.to_le_bytes());
    }
    fn len(&mut self, n: usize, f: Fp) -> Result<(), EncodeError> {
        let n32 = u32::try_from(n).map_err(|_| EncodeError::TooLong {
            field: f.to_string(),
            len: n,
        })?;
        self.u32(n32);
        Ok(())
    }
    fn bytes(&mut self, b: &[u8], f: Fp) -> Result<(), EncodeError> {
        self.len(b.len(), f)?;
        self.out.extend_from_slice(b);
        Ok(())
    }
}

impl Patch {
    /// The canonical body encoding. Fails if the patch breaks any rule of the
    /// format (the result is checked by the parser, so whatever encodes also parses).
    pub fn encode_body(&self) -> Result<Vec<u8>, EncodeError> {
        let body = self.write_body()?;
        // Validate by parsing: the encoder and the parser cannot disagree.
        parse_body(&body, HEADER_LEN, self.format_version())?;
        Ok(body)
    }

    /// Checks every rule of the format without keeping the encoding.
    pub fn validate(&self) -> Result<(), EncodeError> {
        self.encode_body().map(|_| ())
    }

    /// The patch id: SHA-256 of the canonical body.
    pub fn id(&self) -> Result<PatchId, EncodeError> {
        Ok(body_id(&self.encode_body()?))
    }

    fn write_body(&self) -> Result<Vec<u8>, EncodeError> {
        let version = self.format_version();
        let mut w = Writer { out: Vec::new() };
        if version == 2 {
            w.out.extend_from_slice(&BODY_TAG_V2);
        }
        let m = &self.meta;
        let meta = Fp::root("meta");
        w.bytes(m.name.as_bytes(), meta.f("name"))?;
        w.bytes(m.description.as_bytes(), meta.f("description"))?;
        w.bytes(m.author.as_bytes(), meta.f("author"))?;
        w.u64(m.created);
        w.len(m.advisories.len(), meta.f("advisories"))?;
        for a in &m.advisories {
            w.bytes(a.as_bytes(), meta.f("advisories"))?;
        }
        w.len(m.replaces.len(), meta.f("replaces"))?;
        for r in &m.replaces {
            w.out.extend_from_slice(&r.0);
        }
        let t = &self.target;
        let tf = Fp::root("target");
        w.bytes(t.name.as_bytes(), tf.f("name"))?;
        match &t.build_id {
            None => w.u8(0),
            Some(b) => {
                w.u8(1);
                w.bytes(b, tf.f("build_id"))?;
            }
        }
        match &t.text_sha256 {
            None => w.u8(0),
            Some(h) => {
                w.u8(1);
                w.out.extend_from_slice(h);
            }
        }
        if version == 2 {
            w.len(self.data.len(), Fp::root("data"))?;
            for (i, d) in self.data.iter().enumerate() {
                w.u32(d.align);
                w.bytes(&d.bytes, Fp::idx("data", i).f("bytes"))?;
            }
        }
        w.len(self.sites.len(), Fp::root("sites"))?;
        for (i, s) in self.sites.iter().enumerate() {
            let sf = Fp::idx("sites", i);
            w.u8(s.kind.tag());
            match &s.target {
                Location::Symbol { name, offset } => {
                    w.u8(1);
                    w.bytes(name.as_bytes(), sf.f("target"))?;
                    w.u64(*offset);
                }
                Location::Address(a) => {
                    w.u8(2);
                    w.u64(*a);
                }
            }
            w.bytes(&s.expected, sf.f("expected"))?;
            w.bytes(&s.code, sf.f("code"))?;
            w.len(s.relocations.len(), sf.f("relocations"))?;
            for (j, r) in s.relocations.iter().enumerate() {
                let rf = sf.i("relocations", j);
                w.u32(r.offset);
                w.u8(r.kind.tag());
                match (&r.target, version) {
                    (RelocTarget::Symbol(name), 1) => w.bytes(name.as_bytes(), rf.f("symbol"))?,
                    (RelocTarget::Symbol(name), _) => {
                        w.u8(RELOC_TARGET_SYMBOL);
                        w.bytes(name.as_bytes(), rf.f("symbol"))?;
                    }
                    (RelocTarget::Data(block), _) => {
                        w.u8(RELOC_TARGET_DATA);
                        w.u32(*block);
                    }
                }
                w.u64(r.addend as u64);
            }
        }
        Ok(w.out)
    }

    /// A complete unsigned file. Unsigned patches are for development only:
    /// the file says so and `verify` refuses them.
    pub fn to_file_unsigned(&self) -> Result<Vec<u8>, EncodeError> {
        let body = self.encode_body()?;
        check_file_size(body.len(), 1)?;
        Ok(assemble(
            self.format_version(),
            &body,
            &SignatureBlock::Unsigned,
        ))
    }

    /// A complete file signed with `key`.
    pub fn to_file_signed(&self, key: &crate::SecretKey) -> Result<Vec<u8>, EncodeError> {
        let body = self.encode_body()?;
        check_file_size(body.len(), SIG_ED25519_LEN)?;
        Ok(sign_body(self.format_version(), &body, key))
    }
}

fn check_file_size(body_len: usize, sig_len: usize) -> Result<(), EncodeError> {
    let len = HEADER_LEN + body_len + sig_len;
    if len > limits::MAX_FILE {
        return Err(ParseError::FileTooLarge {
            len,
            max: limits::MAX_FILE,
        }
        .into());
    }
    Ok(())
}

pub(crate) fn body_id(body: &[u8]) -> PatchId {
    PatchId(Sha256::digest(body).into())
}

fn header(version: u16, body_len: usize, sig_len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&version.to_le_bytes());
    // h[10..12]: reserved, zero.
    // Lengths fit: the body was validated against limits far below u32::MAX.
    h[12..16].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(sig_len as u32).to_le_bytes());
    h
}

fn sig_block_bytes(sig: &SignatureBlock) -> Vec<u8> {
    match sig {
        SignatureBlock::Unsigned => vec![SIG_UNSIGNED],
        SignatureBlock::Ed25519 { key_id, signature } => {
            let mut v = Vec::with_capacity(SIG_ED25519_LEN);
            v.push(SIG_ED25519);
            v.extend_from_slice(&key_id.0);
            v.extend_from_slice(signature);
            v
        }
    }
}

fn assemble(version: u16, body: &[u8], sig: &SignatureBlock) -> Vec<u8> {
    let sb = sig_block_bytes(sig);
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + sb.len());
    out.extend_from_slice(&header(version, body.len(), sb.len()));
    out.extend_from_slice(body);
    out.extend_from_slice(&sb);
    out
}

pub(crate) fn assemble_unsigned(version: u16, body: &[u8]) -> Vec<u8> {
    assemble(version, body, &SignatureBlock::Unsigned)
}

/// The exact bytes an ed25519 signature covers.
pub(crate) fn signed_message(header_and_body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + header_and_body.len());
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(header_and_body);
    m
}

/// `body` signed with `key` in a file of format `version` (the header, version included, is
/// signed with the body).
pub(crate) fn sign_body(version: u16, body: &[u8], key: &crate::SecretKey) -> Vec<u8> {
    let mut hb = Vec::with_capacity(HEADER_LEN + body.len());
    hb.extend_from_slice(&header(version, body.len(), SIG_ED25519_LEN));
    hb.extend_from_slice(body);
    let signature = key.sign(&signed_message(&hb));
    let sig = SignatureBlock::Ed25519 {
        key_id: key.key_id(),
        signature,
    };
    let mut out = hb;
    out.extend_from_slice(&sig_block_bytes(&sig));
    out
}

// ---------------------------------------------------------------- parsing

/// A parsed, structurally valid `.hpatch` file. Its signature is not checked
/// yet: call [`ParsedPatch::verify`].
#[derive(Clone, Debug)]
pub struct ParsedPatch {
    pub patch: Patch,
    /// The file's format version (1 or 2): always `patch.format_version()`, since each patch
    /// has one encoding.
    pub version: u16,
    /// SHA-256 of the body.
    pub id: PatchId,
    pub signature: SignatureBlock,
    /// `header || body` as read, which is what the signature covers.
    pub(crate) header_and_body: Vec<u8>,
}

impl ParsedPatch {
    /// The canonical body bytes (what the id is the hash of).
    pub fn body(&self) -> &[u8] {
        self.header_and_body.get(HEADER_LEN..).unwrap_or(&[])
    }

    /// Size of the whole file.
    pub fn file_len(&self) -> usize {
        self.header_and_body.len() + sig_block_bytes(&self.signature).len()
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Absolute file offset of `buf[0]`, for error messages.
    base: usize,
}

/// Which characters a string field may hold.
#[derive(Clone, Copy, PartialEq)]
enum Text {
    /// One line, no control characters, non-empty.
    Line,
    /// One line, no control characters, may be empty.
    LineOrEmpty,
    /// May contain `\n` and `\t`, no other control characters, may be empty.
    Para,
}

impl<'a> Reader<'a> {
    fn off(&self) -> usize {
        self.base + self.pos
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize, f: Fp) -> Result<&'a [u8], ParseError> {
        if n > self.remaining() {
            return Err(ParseError::Truncated {
                offset: self.off(),
                field: f.to_string(),
                need: n,
                have: self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, f: Fp) -> Result<[u8; N], ParseError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, f)?);
        Ok(a)
    }
    fn u8(&mut self, f: Fp) -> Result<u8, ParseError> {
        Ok(self.array::<1>(f)?[0])
    }
    fn u16(&mut self, f: Fp) -> Result<u16, ParseError> {
        Ok(u16::from_le_bytes(self.array(f)?))
    }
    fn u32(&mut self, f: Fp) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array(f)?))
    }
    fn u64(&mut self, f: Fp) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array(f)?))
    }
    /// A `u32` count or length, checked against `max` before anything is allocated.
    fn count(&mut self, max: usize, f: Fp) -> Result<usize, ParseError> {
        let at = self.off();
        let n = self.u32(f)? as usize;
        if n > max {
            return Err(ParseError::OverLimit {
                offset: at,
                field: f.to_string(),
                value: n as u64,
                max: max as u64,
            });
        }
        Ok(n)
    }
    fn bytes(&mut self, min: usize, max: usize, f: Fp) -> Result<&'a [u8], ParseError> {
        let at = self.off();
        let n = self.count(max, f)?;
        if n < min {
            return Err(if n == 0 {
                ParseError::Empty {
                    offset: at,
                    field: f.to_string(),
                }
            } else {
                ParseError::Invalid {
                    offset: at,
                    field: f.to_string(),
                    reason: format!("{n} bytes, at least {min} required"),
                }
            });
        }
        self.take(n, f)
    }
    fn string(&mut self, text: Text, f: Fp) -> Result<String, ParseError> {
        let min = if text == Text::Line { 1 } else { 0 };
        let start = self.off() + 4;
        let b = self.bytes(min, limits::MAX_STRING, f)?;
        let s = std::str::from_utf8(b).map_err(|e| ParseError::BadUtf8 {
            offset: start + e.valid_up_to(),
            field: f.to_string(),
        })?;
        for (i, ch) in s.char_indices() {
            let allowed = text == Text::Para && (ch == '\n' || ch == '\t');
            if ch.is_control() && !allowed {
                return Err(ParseError::ControlChar {
                    offset: start + i,
                    field: f.to_string(),
                    ch,
                });
            }
            if is_format_char(ch) {
                return Err(ParseError::FormatChar {
                    offset: start + i,
                    field: f.to_string(),
                    ch,
                });
            }
        }
        Ok(s.to_owned())
    }
    fn tag(&mut self, max: u8, allowed: &'static str, f: Fp) -> Result<u8, ParseError> {
        let at = self.off();
        let v = self.u8(f)?;
        if v > max {
            return Err(ParseError::BadTag {
                offset: at,
                field: f.to_string(),
                value: v.into(),
                allowed,
            });
        }
        Ok(v)
    }
}

fn not_canonical(offset: usize, f: Fp, reason: impl Into<String>) -> ParseError {
    ParseError::NotCanonical {
        offset,
        field: f.to_string(),
        reason: reason.into(),
    }
}

/// Parses a complete `.hpatch` file. Strict: anything that is not the
/// canonical encoding of a valid patch is an error naming offset and field.
pub fn parse(file: &[u8]) -> Result<ParsedPatch, ParseError> {
    if file.len() > limits::MAX_FILE {
        return Err(ParseError::FileTooLarge {
            len: file.len(),
            max: limits::MAX_FILE,
        });
    }
    let mut r = Reader {
        buf: file,
        pos: 0,
        base: 0,
    };
    let h = Fp::root("header");
    let magic = r.take(MAGIC.len(), h.f("magic"))?;
    if magic != MAGIC {
        return Err(ParseError::BadMagic {
            found: hex::encode(magic),
            expected: hex::encode(MAGIC),
        });
    }
    let at = r.off();
    let version = r.u16(h.f("version"))?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(ParseError::UnsupportedVersion {
            offset: at,
            field: h.f("version").to_string(),
            found: version,
            supported: "1 and 2",
        });
    }
    let at = r.off();
    let reserved = r.u16(h.f("reserved"))?;
    if reserved != 0 {
        return Err(ParseError::Reserved {
            offset: at,
            field: h.f("reserved").to_string(),
            value: reserved.into(),
        });
    }
    let body_len_at = r.off();
    let body_len = r.u32(h.f("body_len"))? as usize;
    let sig_len_at = r.off();
    let sig_len = r.u32(h.f("signature_len"))? as usize;
    let actual = file.len() - HEADER_LEN;
    if body_len > actual {
        return Err(ParseError::SizeMismatch {
            offset: body_len_at,
            field: h.f("body_len").to_string(),
            declared: body_len as u64,
            actual: actual as u64,
        });
    }
    if sig_len != actual - body_len {
        return Err(ParseError::SizeMismatch {
            offset: sig_len_at,
            field: h.f("signature_len").to_string(),
            declared: sig_len as u64,
            actual: (actual - body_len) as u64,
        });
    }
    let body = r.take(body_len, Fp::root("body"))?;
    let patch = parse_body(body, HEADER_LEN, version)?;
    let signature = parse_signature(
        r.take(sig_len, Fp::root("signature"))?,
        HEADER_LEN + body_len,
    )?;
    Ok(ParsedPatch {
        patch,
        version,
        id: body_id(body),
        signature,
        header_and_body: file[..HEADER_LEN + body_len].to_vec(),
    })
}

fn parse_signature(b: &[u8], base: usize) -> Result<SignatureBlock, ParseError> {
    let mut r = Reader {
        buf: b,
        pos: 0,
        base,
    };
    let f = Fp::root("signature");
    let kind = r.tag(
        SIG_ED25519,
        "0 = unsigned (development), 1 = ed25519",
        f.f("kind"),
    )?;
    let sig = if kind == SIG_UNSIGNED {
        SignatureBlock::Unsigned
    } else {
        let key_id = KeyId(r.array(f.f("key_id"))?);
        let signature = r.array::<64>(f.f("ed25519"))?;
        SignatureBlock::Ed25519 { key_id, signature }
    };
    if r.remaining() != 0 {
        return Err(ParseError::Trailing {
            offset: r.off(),
            count: r.remaining(),
            after: "signature block",
        });
    }
    Ok(sig)
}

/// Parses a body of format `version` (1 or 2) that starts at file offset `base`.
fn parse_body(body: &[u8], base: usize, version: u16) -> Result<Patch, ParseError> {
    let mut r = Reader {
        buf: body,
        pos: 0,
        base,
    };
    if version == 2 {
        let at = r.off();
        let tag = r.take(BODY_TAG_V2.len(), Fp::root("body_tag"))?;
        if tag != BODY_TAG_V2 {
            return Err(ParseError::Invalid {
                offset: at,
                field: "body_tag".into(),
                reason: format!(
                    "a version-2 body starts with {} (\"HPv2\"), this one with {}",
                    hex::encode(BODY_TAG_V2),
                    hex::encode(tag)
                ),
            });
        }
    }
    let mf = Fp::root("meta");
    let name = r.string(Text::Line, mf.f("name"))?;
    let description = r.string(Text::Para, mf.f("description"))?;
    let author = r.string(Text::LineOrEmpty, mf.f("author"))?;
    let created = r.u64(mf.f("created"))?;
    let n = r.count(limits::MAX_ADVISORIES, mf.f("advisories"))?;
    let mut advisories: Vec<String> = Vec::new();
    for i in 0..n {
        let at = r.off();
        let a = r.string(Text::Line, mf.i("advisories", i))?;
        if let Some(prev) = advisories.last()
            && prev.as_bytes() >= a.as_bytes()
        {
            return Err(not_canonical(
                at,
                mf.i("advisories", i),
                "advisories must be sorted and unique",
            ));
        }
        advisories.push(a);
    }
    let n = r.count(limits::MAX_REPLACES, mf.f("replaces"))?;
    let mut replaces: Vec<PatchId> = Vec::new();
    for i in 0..n {
        let at = r.off();
        let id = PatchId(r.array(mf.i("replaces", i))?);
        if let Some(prev) = replaces.last()
            && *prev >= id
        {
            return Err(not_canonical(
                at,
                mf.i("replaces", i),
                "replaced ids must be sorted and unique",
            ));
        }
        replaces.push(id);
    }

    let tf = Fp::root("target");
    let tname = r.string(Text::Line, tf.f("name"))?;
    let build_id = match r.tag(1, "0 = absent, 1 = present", tf.f("build_id.present"))? {
        0 => None,
        _ => Some(r.bytes(1, limits::MAX_BUILD_ID, tf.f("build_id"))?.to_vec()),
    };
    let at = r.off();
    let text_sha256 = match r.tag(1, "0 = absent, 1 = present", tf.f("text_sha256.present"))? {
        0 => None,
        _ => Some(r.array::<32>(tf.f("text_sha256"))?),
    };
    if build_id.is_none() && text_sha256.is_none() {
        return Err(ParseError::Invalid {
            offset: at,
            field: tf.to_string(),
            reason: "no build id and no text hash: the target would not be identified".into(),
        });
    }

    let data = if version == 2 {
        parse_data(&mut r)?
    } else {
        Vec::new()
    };
    // Which data blocks some relocation refers to: every one must be used.
    let mut used = vec![false; data.len()];

    let n = r.count(limits::MAX_SITES, Fp::root("sites"))?;
    let mut sites: Vec<Site> = Vec::new();
    for i in 0..n {
        let start = r.off();
        let site = parse_site(&mut r, i, version, &mut used)?;
        if let Some(prev) = sites.last()
            && prev.target >= site.target
        {
            return Err(not_canonical(
                start,
                Fp::idx("sites", i).f("target"),
                format!(
                    "sites must be sorted by target without duplicates ({} after {})",
                    site.target, prev.target
                ),
            ));
        }
        sites.push(site);
    }
    if r.remaining() != 0 {
        return Err(ParseError::Trailing {
            offset: r.off(),
            count: r.remaining(),
            after: "body",
        });
    }
    if let Some(unused) = used.iter().position(|u| !u) {
        return Err(not_canonical(
            r.off(),
            Fp::idx("data", unused),
            "no relocation refers to this data block: a patch carries only data its code uses",
        ));
    }
    Ok(Patch {
        meta: Metadata {
            name,
            description,
            author,
            created,
            advisories,
            replaces,
        },
        target: TargetIdentity {
            name: tname,
            build_id,
            text_sha256,
        },
        sites,
        data,
    })
}

/// The data blocks of a version-2 body: at least one (a patch without data is version 1),
/// each with a power-of-two alignment up to a page and 1 byte to 1 MiB of contents.
fn parse_data(r: &mut Reader<'_>) -> Result<Vec<DataBlock>, ParseError> {
    let at = r.off();
    let n = r.count(limits::MAX_DATA_BLOCKS, Fp::root("data"))?;
    if n == 0 {
        return Err(not_canonical(
            at,
            Fp::root("data"),
            "a version-2 patch carries at least one data block (a patch without data is written \
             as version 1, and a data relocation needs the block it names)",
        ));
    }
    let mut data = Vec::new();
    for i in 0..n {
        let df = Fp::idx("data", i);
        let at = r.off();
        let align = r.u32(df.f("align"))?;
        if !align.is_power_of_two() || align > limits::MAX_DATA_ALIGN {
            return Err(ParseError::Invalid {
                offset: at,
                field: df.f("align").to_string(),
                reason: format!(
                    "alignment {align} is not a power of two from 1 to {}",
                    limits::MAX_DATA_ALIGN
                ),
            });
        }
        let bytes = r.bytes(1, limits::MAX_DATA, df.f("bytes"))?.to_vec();
        data.push(DataBlock { align, bytes });
    }
    Ok(data)
}

fn parse_symbol(r: &mut Reader<'_>, f: Fp) -> Result<String, ParseError> {
    // Symbol names: one line, non-empty; `Text::Line` already refuses NUL.
    r.string(Text::Line, f)
}

fn parse_site(
    r: &mut Reader<'_>,
    i: usize,
    version: u16,
    used: &mut [bool],
) -> Result<Site, ParseError> {
    let sf = Fp::idx("sites", i);
    let at = r.off();
    let kind_tag = r.u8(sf.f("kind"))?;
    let kind = SiteKind::from_tag(kind_tag).ok_or_else(|| ParseError::BadTag {
        offset: at,
        field: sf.f("kind").to_string(),
        value: kind_tag.into(),
        allowed: "1 = function, 2 = micropatch",
    })?;
    let at = r.off();
    let target = match r.u8(sf.f("target.kind"))? {
        1 => {
            let name = parse_symbol(r, sf.f("target.symbol"))?;
            let offset = r.u64(sf.f("target.offset"))?;
            Location::Symbol { name, offset }
        }
        2 => Location::Address(r.u64(sf.f("target.address"))?),
        v => {
            return Err(ParseError::BadTag {
                offset: at,
                field: sf.f("target.kind").to_string(),
                value: v.into(),
                allowed: "1 = symbol+offset, 2 = address",
            });
        }
    };
    let expected = r.bytes(1, limits::MAX_EXPECTED, sf.f("expected"))?.to_vec();
    let code = r.bytes(1, limits::MAX_CODE, sf.f("code"))?.to_vec();
    let n = r.count(limits::MAX_RELOCATIONS, sf.f("relocations"))?;
    let mut relocations: Vec<Relocation> = Vec::new();
    let mut next_free: u64 = 0;
    for j in 0..n {
        let rf = sf.i("relocations", j);
        let at = r.off();
        let offset = r.u32(rf.f("offset"))?;
        let kat = r.off();
        let ktag = r.u8(rf.f("kind"))?;
        let rkind = RelocKind::from_tag(ktag).ok_or_else(|| ParseError::BadTag {
            offset: kat,
            field: rf.f("kind").to_string(),
            value: ktag.into(),
            allowed: "1 = rel32, 2 = abs64, 3 = abs32, 4 = abs32s",
        })?;
        let target = if version == 1 {
            RelocTarget::Symbol(parse_symbol(r, rf.f("symbol"))?)
        } else {
            let tat = r.off();
            match r.u8(rf.f("target"))? {
                RELOC_TARGET_SYMBOL => RelocTarget::Symbol(parse_symbol(r, rf.f("symbol"))?),
                RELOC_TARGET_DATA => {
                    let bat = r.off();
                    let block = r.u32(rf.f("data"))?;
                    let Some(u) = used.get_mut(block as usize) else {
                        return Err(ParseError::Invalid {
                            offset: bat,
                            field: rf.f("data").to_string(),
                            reason: format!(
                                "data block {block} does not exist (the patch has {})",
                                used.len()
                            ),
                        });
                    };
                    *u = true;
                    RelocTarget::Data(block)
                }
                v => {
                    return Err(ParseError::BadTag {
                        offset: tat,
                        field: rf.f("target").to_string(),
                        value: v.into(),
                        allowed: "1 = symbol, 2 = data block",
                    });
                }
            }
        };
        let addend = r.u64(rf.f("addend"))? as i64;
        let end = u64::from(offset) + rkind.width() as u64;
        if end > code.len() as u64 {
            return Err(ParseError::Invalid {
                offset: at,
                field: rf.f("offset").to_string(),
                reason: format!(
                    "{}-byte field at {offset} runs past the end of the {}-byte code",
                    rkind.width(),
                    code.len()
                ),
            });
        }
        if u64::from(offset) < next_free {
            return Err(not_canonical(
                at,
                rf.f("offset"),
                "relocations must be sorted by offset and must not overlap",
            ));
        }
        next_free = end;
        relocations.push(Relocation {
            offset,
            kind: rkind,
            target,
            addend,
        });
    }
    Ok(Site {
        kind,
        target,
        expected,
        code,
        relocations,
    })
}
