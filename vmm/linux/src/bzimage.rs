//! The uncompressed kernel (`vmlinux`, an ELF) out of a bzImage (`vmlinuz`), without running it.
//!
//! A bzImage is the real-mode setup code (`setup_sects` 512-byte sectors after the boot sector)
//! followed by the protected-mode code: a small decompressor with the compressed vmlinux
//! embedded. Since boot protocol 2.08 the setup header says where that payload is
//! (`payload_offset`/`payload_length` at 0x248/0x24c, relative to the protected-mode code).
//! Debian compresses it with XZ (`CONFIG_KERNEL_XZ=y`) using the kernel's `scripts/xz_wrap.sh`:
//! CRC32 check, the x86 BCJ filter, then LZMA2.
//!
//! `lzma-rs` decodes LZMA2 but its XZ reader rejects the BCJ filter, so this module parses the
//! XZ container itself (it is small and fully specified), hands each block's LZMA2 data to
//! `lzma_rs::lzma2_decompress`, undoes the BCJ filter and verifies the block check. The input is
//! untrusted: every length is bounds-checked, and the LZMA2 chunk headers are summed *before*
//! decoding so that a hostile image cannot make us allocate more than [`MAX_VMLINUX_SIZE`].

use sha2::{Digest, Sha256};

/// Largest vmlinux we agree to produce (1 GiB). Debian's 6.1 vmlinux is 66 MB; even
/// allyesconfig kernels stay far below this. It bounds the memory a hostile image can make us
/// allocate (LZMA2 can expand ~7000:1).
pub const MAX_VMLINUX_SIZE: u64 = 1 << 30;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const XZ_MAGIC: &[u8; 6] = b"\xfd7zXZ\0";
const XZ_FOOTER_MAGIC: &[u8; 2] = b"YZ";
/// XZ filter IDs (xz-file-format.txt, 5.3).
const FILTER_X86: u64 = 0x04;
const FILTER_LZMA2: u64 = 0x21;

/// Why a kernel image could not be turned into its vmlinux ELF.
#[derive(Debug, thiserror::Error)]
pub enum LinuxImageError {
    /// Shorter than the setup header.
    #[error(
        "the kernel image is only {len} bytes, too short for a bzImage setup header \
         ({need} bytes): pass the kernel's vmlinuz (bzImage) or its uncompressed vmlinux ELF"
    )]
    TooShort {
        /// The input's length.
        len: usize,
        /// The bytes needed to read the header fields used here.
        need: usize,
    },
    /// No `HdrS` at 0x202 and not an ELF either.
    #[error(
        "not a Linux bzImage nor an ELF: no \"HdrS\" setup-header magic at offset 0x202 \
         (found {found:02x?}): pass the kernel's vmlinuz (bzImage) or its uncompressed vmlinux"
    )]
    NotBzImage {
        /// The four bytes found at 0x202.
        found: [u8; 4],
    },
    /// The setup header predates `payload_offset`/`payload_length`.
    #[error(
        "boot protocol {major}.{minor:02} is too old: the payload location is in the setup \
         header only since 2.08 (Linux 2.6.26); extract the vmlinux with the kernel's \
         scripts/extract-vmlinux and pass that instead"
    )]
    OldBootProtocol {
        /// Major version (high byte of the `version` field).
        major: u8,
        /// Minor version (low byte).
        minor: u8,
    },
    /// `payload_offset`/`payload_length` point outside the file.
    #[error(
        "the setup header places the compressed kernel at {start:#x}..{end:#x} (payload_offset \
         {offset:#x} + payload_length {length:#x} after the protected-mode code at \
         {pm_start:#x}), beyond the end of the {file_len}-byte image: the file is truncated or \
         corrupt, download it again"
    )]
    PayloadOutOfBounds {
        /// Start of the protected-mode code, `(setup_sects + 1) * 512`.
        pm_start: u64,
        /// `payload_offset` from the header.
        offset: u32,
        /// `payload_length` from the header.
        length: u32,
        /// Computed file offset of the payload.
        start: u64,
        /// Computed end of the payload.
        end: u64,
        /// The image's length.
        file_len: usize,
    },
    /// A compression we recognise but do not decode.
    #[error(
        "the kernel payload is {compression}-compressed, which this reader does not support \
         (it reads XZ, Debian's choice): pass the uncompressed vmlinux instead (the kernel's \
         scripts/extract-vmlinux extracts it), or use a kernel built with CONFIG_KERNEL_XZ=y"
    )]
    UnsupportedCompression {
        /// The compression's name, e.g. `gzip`.
        compression: &'static str,
    },
    /// The payload starts with nothing we know.
    #[error(
        "the kernel payload starts with {magic:02x?}, which is no known compression magic \
         (XZ, gzip, bzip2, LZMA, LZO, LZ4, zstd) nor ELF: the image is corrupt or of an unknown \
         kind"
    )]
    UnknownPayload {
        /// Up to the first 8 bytes of the payload.
        magic: Vec<u8>,
    },
    /// The XZ stream is malformed or fails its checks.
    #[error(
        "the XZ-compressed kernel is corrupt at byte {offset:#x} of the stream: {reason}; \
         download the kernel package again"
    )]
    CorruptXz {
        /// Offset in the XZ stream where the problem was found.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
    /// The XZ stream uses a feature the kernel's decompressor never needs.
    #[error(
        "the XZ-compressed kernel uses {feature}, which this reader does not support (it \
         supports what the kernel's own XZ decompressor does: LZMA2 with the x86 BCJ filter, \
         CRC32 or no check; CRC64 and SHA-256 checks too): pass the uncompressed vmlinux instead"
    )]
    UnsupportedXz {
        /// The unsupported feature.
        feature: String,
    },
    /// The payload would decompress to more than [`MAX_VMLINUX_SIZE`].
    #[error(
        "the kernel payload would decompress to more than {limit} bytes ({size} announced so \
         far): that is no kernel (or a decompression bomb), refusing to allocate it"
    )]
    TooLarge {
        /// Uncompressed size reached when the limit was crossed.
        size: u64,
        /// The limit, [`MAX_VMLINUX_SIZE`].
        limit: u64,
    },
    /// The decompressed payload is not an ELF.
    #[error(
        "the decompressed kernel payload is not an ELF (it starts with {magic:02x?}): the image \
         is corrupt or not a Linux kernel"
    )]
    PayloadNotElf {
        /// Up to the first 8 bytes of the decompressed data.
        magic: Vec<u8>,
    },
}

/// Returns the vmlinux ELF inside a bzImage, or `bytes` itself (copied) when it already is an
/// ELF, so callers can accept either a `vmlinuz` or a `vmlinux`.
///
/// Supports XZ payloads (what Debian and most distributions' x86 kernels use) and uncompressed
/// ones (`CONFIG_KERNEL_UNCOMPRESSED`); the other compressions the kernel offers are recognised
/// and reported by name. Debian's 6.1 kernel (8 MB → 66 MB) takes ~2.5 s in a debug build:
/// lzma-rs's decoder is generic, so it is compiled at the *caller's* opt-level and the
/// workspace's `opt-level = 3` for lzma-rs barely helps (LZMA2 alone: 2.2 s debug, 0.56 s
/// release); the BCJ pass and the CRC32 add ~0.25 s.
pub fn vmlinux_from_bzimage(bytes: &[u8]) -> Result<Vec<u8>, LinuxImageError> {
    if bytes.starts_with(ELF_MAGIC) {
        return Ok(bytes.to_vec());
    }
    let payload = bzimage_payload(bytes)?;
    let vmlinux = if payload.starts_with(ELF_MAGIC) {
        payload.to_vec()
    } else if payload.starts_with(XZ_MAGIC) {
        let (out, consumed) = decode_xz(payload, MAX_VMLINUX_SIZE)?;
        // The kernel build appends the uncompressed size (little-endian u32, `size_append`) to
        // the compressed file, and payload_length covers it: a free cross-check.
        if let Some(trailer) = payload.get(consumed..)
            && trailer.len() == 4
        {
            let announced = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
            if u64::from(announced) != out.len() as u64 {
                return Err(LinuxImageError::CorruptXz {
                    offset: consumed,
                    reason: format!(
                        "the size appended after the stream says {announced} bytes, the stream \
                         decoded to {}",
                        out.len()
                    ),
                });
            }
        }
        out
    } else {
        return Err(match compression_name(payload) {
            Some(compression) => LinuxImageError::UnsupportedCompression { compression },
            None => LinuxImageError::UnknownPayload {
                magic: payload.iter().take(8).copied().collect(),
            },
        });
    };
    if !vmlinux.starts_with(ELF_MAGIC) {
        return Err(LinuxImageError::PayloadNotElf {
            magic: vmlinux.iter().take(8).copied().collect(),
        });
    }
    Ok(vmlinux)
}

/// The compressed payload of a bzImage, located through its setup header
/// (Documentation/arch/x86/boot.rst).
fn bzimage_payload(bytes: &[u8]) -> Result<&[u8], LinuxImageError> {
    const SETUP_SECTS: usize = 0x1f1;
    const HEADER: usize = 0x202;
    const VERSION: usize = 0x206;
    const PAYLOAD_OFFSET: usize = 0x248;
    const PAYLOAD_LENGTH: usize = 0x24c;
    const NEED: usize = PAYLOAD_LENGTH + 4;

    let (Some(magic), Some(version)) = (bytes.get(HEADER..HEADER + 4), le16(bytes, VERSION)) else {
        return Err(LinuxImageError::TooShort {
            len: bytes.len(),
            need: NEED,
        });
    };
    if magic != b"HdrS" {
        let mut found = [0u8; 4];
        found.copy_from_slice(magic);
        return Err(LinuxImageError::NotBzImage { found });
    }
    if version < 0x0208 {
        let [minor, major] = version.to_le_bytes();
        return Err(LinuxImageError::OldBootProtocol { major, minor });
    }
    let (Some(&setup_sects), Some(offset), Some(length)) = (
        bytes.get(SETUP_SECTS),
        le32(bytes, PAYLOAD_OFFSET),
        le32(bytes, PAYLOAD_LENGTH),
    ) else {
        return Err(LinuxImageError::TooShort {
            len: bytes.len(),
            need: NEED,
        });
    };
    // boot.rst: "If this field is 0, the real value is 4."
    let setup_sects = if setup_sects == 0 { 4 } else { setup_sects };
    let pm_start = (u64::from(setup_sects) + 1) * 512;
    let start = pm_start + u64::from(offset);
    let end = start + u64::from(length);
    match (usize::try_from(start), usize::try_from(end)) {
        (Ok(s), Ok(e)) if e <= bytes.len() => Ok(&bytes[s..e]),
        _ => Err(LinuxImageError::PayloadOutOfBounds {
            pm_start,
            offset,
            length,
            start,
            end,
            file_len: bytes.len(),
        }),
    }
}

/// The name of the compression whose magic `payload` starts with, for the ones the kernel can
/// be built with (`scripts/Makefile.lib` `cmd_*`, `lib/decompress.c`'s table).
fn compression_name(payload: &[u8]) -> Option<&'static str> {
    const MAGICS: &[(&[u8], &str)] = &[
        (b"\x1f\x8b", "gzip"),
        (b"\x1f\x9e", "gzip"),
        (b"BZh", "bzip2"),
        (b"\x5d\x00\x00", "LZMA"),
        (b"\x89LZO", "LZO"),
        (b"\x02\x21\x4c\x18", "LZ4"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (XZ_MAGIC, "XZ"),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| payload.starts_with(magic))
        .map(|&(_, name)| name)
}

fn le16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn be16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

/// How a block's integrity is checked (xz-file-format.txt, 2.1.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    None,
    Crc32,
    Crc64,
    Sha256,
}

impl Check {
    fn size(self) -> usize {
        match self {
            Check::None => 0,
            Check::Crc32 => 4,
            Check::Crc64 => 8,
            Check::Sha256 => 32,
        }
    }

    fn verify(self, data: &[u8], stored: &[u8]) -> bool {
        match self {
            Check::None => true,
            Check::Crc32 => stored == crc32(data).to_le_bytes(),
            Check::Crc64 => stored == crc64(data).to_le_bytes(),
            Check::Sha256 => stored == Sha256::digest(data).as_slice(),
        }
    }
}

/// A reader over the XZ stream that turns running off the end into a typed error naming where.
struct XzReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> XzReader<'a> {
    fn corrupt(&self, reason: impl Into<String>) -> LinuxImageError {
        LinuxImageError::CorruptXz {
            offset: self.pos,
            reason: reason.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], LinuxImageError> {
        match self
            .pos
            .checked_add(n)
            .and_then(|end| self.data.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.corrupt(format!("truncated in the {what}"))),
        }
    }

    fn byte(&mut self, what: &str) -> Result<u8, LinuxImageError> {
        Ok(self.take(1, what)?[0])
    }

    /// A variable-length integer (xz-file-format.txt, 1.2): at most 9 bytes, 63 bits.
    fn vli(&mut self, what: &str) -> Result<u64, LinuxImageError> {
        let mut value = 0u64;
        for i in 0..9 {
            let b = self.byte(what)?;
            value |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                if i > 0 && b == 0 {
                    return Err(self.corrupt(format!("non-minimal integer in the {what}")));
                }
                return Ok(value);
            }
        }
        Err(self.corrupt(format!("integer longer than 9 bytes in the {what}")))
    }

    /// Skips zero padding up to a multiple of 4 bytes from `from`.
    fn pad4(&mut self, from: usize, what: &str) -> Result<(), LinuxImageError> {
        while !(self.pos - from).is_multiple_of(4) {
            if self.byte(what)? != 0 {
                return Err(self.corrupt(format!("non-zero {what}")));
            }
        }
        Ok(())
    }
}

/// One block's filter chain, as far as we support them: optional x86 BCJ, then LZMA2.
struct BlockHeader {
    compressed_size: Option<u64>,
    uncompressed_size: Option<u64>,
    /// `Some(start offset)` when the x86 BCJ filter is in the chain.
    x86_bcj: Option<u32>,
}

/// Decodes one XZ stream at the start of `stream`; returns the data and the stream's length.
/// Trailing bytes after the stream are left to the caller.
fn decode_xz(stream: &[u8], limit: u64) -> Result<(Vec<u8>, usize), LinuxImageError> {
    let mut r = XzReader {
        data: stream,
        pos: 0,
    };
    // Stream header: magic, flags (2 bytes), CRC32 of the flags.
    if r.take(6, "stream header")? != XZ_MAGIC {
        return Err(r.corrupt("no XZ magic"));
    }
    let flags = r.take(2, "stream header")?;
    let flags_crc = r.take(4, "stream header")?;
    if flags_crc != crc32(flags).to_le_bytes() {
        return Err(r.corrupt("stream header CRC32 mismatch"));
    }
    if flags[0] != 0 || flags[1] & 0xf0 != 0 {
        return Err(LinuxImageError::UnsupportedXz {
            feature: format!("reserved stream flags {flags:02x?}"),
        });
    }
    let check = match flags[1] & 0x0f {
        0x00 => Check::None,
        0x01 => Check::Crc32,
        0x04 => Check::Crc64,
        0x0a => Check::Sha256,
        other => {
            return Err(LinuxImageError::UnsupportedXz {
                feature: format!("check type {other:#x}"),
            });
        }
    };

    let mut out: Vec<u8> = Vec::new();
    // (unpadded size, uncompressed size) of each block, compared with the index at the end.
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    loop {
        let block_start = r.pos;
        let size_byte = *stream
            .get(block_start)
            .ok_or_else(|| r.corrupt("truncated before the index"))?;
        if size_byte == 0 {
            break; // index indicator
        }
        let header = read_block_header(&mut r)?;
        let header_size = r.pos - block_start;
        let data_start = r.pos;
        let rest = stream.get(data_start..).unwrap_or(&[]);
        let (packed, unpacked) =
            scan_lzma2(rest, limit.saturating_sub(out.len() as u64)).map_err(|e| match e {
                Lzma2ScanError::Corrupt(at, reason) => LinuxImageError::CorruptXz {
                    offset: data_start + at,
                    reason,
                },
                Lzma2ScanError::TooLarge(size) => LinuxImageError::TooLarge {
                    size: out.len() as u64 + size,
                    limit,
                },
            })?;
        if header.compressed_size.is_some_and(|c| c != packed as u64)
            || header.uncompressed_size.is_some_and(|u| u != unpacked)
        {
            return Err(r.corrupt("block sizes differ from its header's"));
        }
        let block_out_start = out.len();
        let want = usize::try_from(unpacked).map_err(|_| LinuxImageError::TooLarge {
            size: unpacked,
            limit,
        })?;
        out.try_reserve_exact(want)
            .map_err(|_| LinuxImageError::TooLarge {
                size: out.len() as u64 + unpacked,
                limit,
            })?;
        let mut lzma2 = r.take(packed, "LZMA2 data")?;
        lzma_rs::lzma2_decompress(&mut lzma2, &mut out).map_err(|e| {
            LinuxImageError::CorruptXz {
                offset: data_start,
                reason: format!("LZMA2 data: {e}"),
            }
        })?;
        let block_out = &mut out[block_out_start..];
        if block_out.len() as u64 != unpacked {
            return Err(LinuxImageError::CorruptXz {
                offset: data_start,
                reason: format!(
                    "LZMA2 data decoded to {} bytes, its chunk headers say {unpacked}",
                    block_out.len()
                ),
            });
        }
        if let Some(start) = header.x86_bcj {
            bcj_x86(block_out, start, false);
        }
        r.pad4(block_start, "block padding")?;
        let stored = r.take(check.size(), "block check")?;
        if !check.verify(block_out, stored) {
            return Err(r.corrupt(format!("block {} fails its {check:?} check", blocks.len())));
        }
        blocks.push(((header_size + packed + check.size()) as u64, unpacked));
    }

    // Index: indicator, record count, (unpadded, uncompressed) per block, padding, CRC32.
    let index_start = r.pos;
    r.byte("index")?;
    let count = r.vli("index")?;
    if count != blocks.len() as u64 {
        return Err(r.corrupt(format!(
            "the index lists {count} blocks, the stream has {}",
            blocks.len()
        )));
    }
    for &(unpadded, uncompressed) in &blocks {
        if r.vli("index")? != unpadded || r.vli("index")? != uncompressed {
            return Err(r.corrupt("index record differs from its block"));
        }
    }
    r.pad4(index_start, "index padding")?;
    let index_crc = crc32(&stream[index_start..r.pos]);
    if r.take(4, "index")? != index_crc.to_le_bytes() {
        return Err(r.corrupt("index CRC32 mismatch"));
    }
    let index_size = (r.pos - index_start) as u64;

    // Stream footer: CRC32 of (backward size, flags), backward size, flags, "YZ".
    let footer_crc = r.take(4, "stream footer")?;
    let backward = r.take(4, "stream footer")?;
    let footer_flags = r.take(2, "stream footer")?;
    let mut crc_input = [0u8; 6];
    crc_input[..4].copy_from_slice(backward);
    crc_input[4..].copy_from_slice(footer_flags);
    if footer_crc != crc32(&crc_input).to_le_bytes() {
        return Err(r.corrupt("stream footer CRC32 mismatch"));
    }
    let backward_size = (u64::from(u32::from_le_bytes([
        backward[0],
        backward[1],
        backward[2],
        backward[3],
    ])) + 1)
        * 4;
    if backward_size != index_size || footer_flags != flags {
        return Err(r.corrupt("stream footer disagrees with the header or the index"));
    }
    if r.take(2, "stream footer")? != XZ_FOOTER_MAGIC {
        return Err(r.corrupt("no stream footer magic"));
    }
    Ok((out, r.pos))
}

/// Reads a block header (xz-file-format.txt, 3.1) and checks that its filter chain is one we
/// decode.
fn read_block_header(r: &mut XzReader<'_>) -> Result<BlockHeader, LinuxImageError> {
    let start = r.pos;
    let size = (usize::from(r.byte("block header")?) + 1) * 4;
    let whole = stream_slice(r, start, size)?;
    let (body, stored_crc) = whole.split_at(size - 4);
    if stored_crc != crc32(body).to_le_bytes() {
        return Err(r.corrupt("block header CRC32 mismatch"));
    }
    let flags = r.byte("block header")?;
    if flags & 0x3c != 0 {
        return Err(LinuxImageError::UnsupportedXz {
            feature: format!("reserved block flags {flags:#04x}"),
        });
    }
    let compressed_size = if flags & 0x40 != 0 {
        Some(r.vli("block header")?)
    } else {
        None
    };
    let uncompressed_size = if flags & 0x80 != 0 {
        Some(r.vli("block header")?)
    } else {
        None
    };
    let filters = usize::from(flags & 0x03) + 1;
    let mut x86_bcj = None;
    for i in 0..filters {
        let id = r.vli("block header")?;
        let props_len = r.vli("block header")?;
        let props_len =
            usize::try_from(props_len).map_err(|_| r.corrupt("huge filter properties"))?;
        let props = r.take(props_len, "block header")?;
        let last = i + 1 == filters;
        match (id, last) {
            (FILTER_LZMA2, true) => {
                // One byte: the dictionary size; lzma-rs reads it from the LZMA2 chunks anyway.
                if props.len() != 1 || props[0] > 40 {
                    return Err(r.corrupt("bad LZMA2 filter properties"));
                }
            }
            (FILTER_X86, false) if x86_bcj.is_none() => {
                x86_bcj = Some(match props {
                    [] => 0,
                    [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
                    _ => return Err(r.corrupt("bad x86 BCJ filter properties")),
                });
            }
            _ => {
                return Err(LinuxImageError::UnsupportedXz {
                    feature: format!(
                        "the filter chain with {} (filter {} of {filters})",
                        filter_name(id),
                        i + 1
                    ),
                });
            }
        }
    }
    if r.pos > start + size - 4 {
        return Err(r.corrupt("block header fields overrun its size"));
    }
    if body[r.pos - start..].iter().any(|&b| b != 0) {
        return Err(r.corrupt("non-zero block header padding"));
    }
    r.pos = start + size;
    Ok(BlockHeader {
        compressed_size,
        uncompressed_size,
        x86_bcj,
    })
}

fn stream_slice<'a>(
    r: &XzReader<'a>,
    start: usize,
    len: usize,
) -> Result<&'a [u8], LinuxImageError> {
    start
        .checked_add(len)
        .and_then(|end| r.data.get(start..end))
        .ok_or_else(|| r.corrupt("truncated in a block header"))
}

fn filter_name(id: u64) -> String {
    let name = match id {
        0x03 => "the delta filter",
        0x04 => "the x86 BCJ filter not first",
        0x05 => "the PowerPC BCJ filter",
        0x06 => "the IA-64 BCJ filter",
        0x07 => "the ARM BCJ filter",
        0x08 => "the ARM-Thumb BCJ filter",
        0x09 => "the SPARC BCJ filter",
        0x0a => "the ARM64 BCJ filter",
        0x0b => "the RISC-V BCJ filter",
        0x21 => "LZMA2 not last",
        _ => return format!("unknown filter {id:#x}"),
    };
    name.to_string()
}

enum Lzma2ScanError {
    Corrupt(usize, String),
    TooLarge(u64),
}

/// Walks the LZMA2 chunk headers (without decoding) and returns the stream's length (through
/// its end marker) and its uncompressed size. Fails as soon as the size exceeds `limit`, so
/// nothing is allocated for a decompression bomb.
fn scan_lzma2(data: &[u8], limit: u64) -> Result<(usize, u64), Lzma2ScanError> {
    let truncated = |at: usize| Lzma2ScanError::Corrupt(at, "truncated LZMA2 data".into());
    let mut pos = 0usize;
    let mut total = 0u64;
    loop {
        let control = *data.get(pos).ok_or_else(|| truncated(pos))?;
        let (header, unpacked, packed) = match control {
            0x00 => return Ok((pos + 1, total)),
            // Uncompressed chunk (with or without dictionary reset): 16-bit size - 1.
            0x01 | 0x02 => {
                let size = usize::from(be16(data, pos + 1).ok_or_else(|| truncated(pos))?) + 1;
                (3, size as u64, size)
            }
            0x03..=0x7f => {
                return Err(Lzma2ScanError::Corrupt(
                    pos,
                    format!("invalid LZMA2 control byte {control:#04x}"),
                ));
            }
            // LZMA chunk: 21-bit unpacked size - 1, 16-bit packed size - 1, then a properties
            // byte when the control asks for a state reset with new properties (>= 0xc0).
            _ => {
                let low = be16(data, pos + 1).ok_or_else(|| truncated(pos))?;
                let packed = be16(data, pos + 3).ok_or_else(|| truncated(pos))?;
                let unpacked = ((u64::from(control & 0x1f) << 16) | u64::from(low)) + 1;
                let header = if control >= 0xc0 { 6 } else { 5 };
                (header, unpacked, usize::from(packed) + 1)
            }
        };
        total += unpacked;
        if total > limit {
            return Err(Lzma2ScanError::TooLarge(total));
        }
        pos += header + packed;
        if pos > data.len() {
            return Err(truncated(data.len()));
        }
    }
}

/// The x86 BCJ filter (xz's `simple/x86.c`, xz-embedded's `bcj_x86`), applied to a whole block
/// at once: converts the absolute targets the encoder stored in `call`/`jmp rel32` back to
/// relative ones (`encode == false`), or the reverse (`encode == true`, used by the tests).
/// `start` is the filter's start offset property (0 by default).
fn bcj_x86(buf: &mut [u8], start: u32, encode: bool) {
    const ALLOWED: [bool; 8] = [true, true, true, false, true, false, false, false];
    const BIT_NUM: [u32; 8] = [0, 1, 2, 2, 3, 3, 3, 3];
    fn msbyte_ok(b: u8) -> bool {
        b == 0x00 || b == 0xff
    }
    if buf.len() <= 4 {
        return;
    }
    let end = buf.len() - 4;
    let mut prev_pos = usize::MAX;
    let mut prev_mask = 0u32;
    let mut i = 0usize;
    while i < end {
        if buf[i] & 0xfe != 0xe8 {
            i += 1;
            continue;
        }
        let distance = i.wrapping_sub(prev_pos);
        if distance > 3 {
            prev_mask = 0;
        } else {
            // distance is 1..=3 here.
            prev_mask = (prev_mask << (distance - 1)) & 7;
            if prev_mask != 0 {
                let b = buf[i + 4 - BIT_NUM[prev_mask as usize] as usize];
                if !ALLOWED[prev_mask as usize] || msbyte_ok(b) {
                    prev_pos = i;
                    prev_mask = (prev_mask << 1) | 1;
                    i += 1;
                    continue;
                }
            }
        }
        prev_pos = i;
        if msbyte_ok(buf[i + 4]) {
            let mut src = u32::from_le_bytes([buf[i + 1], buf[i + 2], buf[i + 3], buf[i + 4]]);
            let pos = start.wrapping_add(i as u32).wrapping_add(5);
            let mut dest;
            loop {
                dest = if encode {
                    src.wrapping_add(pos)
                } else {
                    src.wrapping_sub(pos)
                };
                if prev_mask == 0 {
                    break;
                }
                let j = BIT_NUM[prev_mask as usize] * 8;
                if !msbyte_ok((dest >> (24 - j)) as u8) {
                    break;
                }
                src = dest ^ ((1u32 << (32 - j)) - 1);
            }
            dest &= 0x01ff_ffff;
            dest |= 0u32.wrapping_sub(dest & 0x0100_0000);
            buf[i + 1..i + 5].copy_from_slice(&dest.to_le_bytes());
            i += 5;
        } else {
            prev_mask = (prev_mask << 1) | 1;
            i += 1;
        }
    }
}

/// CRC-32 (IEEE 802.3, reflected, as XZ and gzip use), slicing-by-8 so that checking a 66 MB
/// kernel stays cheap even in unoptimised builds.
fn crc32(data: &[u8]) -> u32 {
    // A static, not a const: a const array would be copied at each use in debug builds.
    static TABLES: [[u32; 256]; 8] = crc32_tables();
    let mut crc = !0u32;
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = crc ^ u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        crc = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][c[4] as usize]
            ^ TABLES[2][c[5] as usize]
            ^ TABLES[1][c[6] as usize]
            ^ TABLES[0][c[7] as usize];
    }
    for &b in chunks.remainder() {
        crc = TABLES[0][((crc ^ u32::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

const fn crc32_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut n = 1;
    while n < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[n - 1][i];
            t[n][i] = t[0][(prev & 0xff) as usize] ^ (prev >> 8);
            i += 1;
        }
        n += 1;
    }
    t
}

/// CRC-64 (ECMA-182, reflected, as XZ uses). Byte-at-a-time: only for CRC64-checked XZ
/// streams, which kernel builds do not produce.
fn crc64(data: &[u8]) -> u64 {
    static TABLE: [u64; 256] = {
        let mut t = [0u64; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u64;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 {
                    0xc96c_5795_d787_0f42 ^ (c >> 1)
                } else {
                    c >> 1
                };
                k += 1;
            }
            t[i] = c;
            i += 1;
        }
        t
    };
    let mut crc = !0u64;
    for &b in data {
        crc = TABLE[((crc ^ u64::from(b)) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// x86-ish code with `call`/`jmp rel32` for the BCJ filter to rewrite: 64 ×
    /// `push rbp; mov rbp,rsp; call X; pop rbp; ret; int3; int3; jmp Y`.
    fn bcj_sample() -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0u32..64 {
            v.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0xe8]);
            v.extend_from_slice(&i.wrapping_mul(0x1234).wrapping_sub(0x80000).to_le_bytes());
            v.extend_from_slice(&[0x5d, 0xc3, 0xcc, 0xcc, 0xe9]);
            v.extend_from_slice(&(i * 16).to_le_bytes());
        }
        v
    }

    /// `xz --format=xz --check=crc32 --x86 --lzma2=preset=6` of [`bcj_sample`] (xz 5.4): the
    /// same options as the kernel's scripts/xz_wrap.sh, made by the reference implementation.
    const XZ_CRC32_X86: &str = concat!(
        "fd377a585a0000016922de3602010400210116000d86351fe0047f01355d002a920da4e4be53ef07fa7c2ee3",
        "0c6f08aab9c3d82ca0d551b595f6295c1a49844cc2af5db47d1a0f12e01be66a97c1263dfe1535e62231f709",
        "bf1a88ddb6e5510eef4f1b74f0be5482b554a6fcbaa17539012838ed504cbaebe3b6c7b7b67ab55180932b3f",
        "41ccd65b0f8e736e731b6cdcd29042832c951b5451aae33c9f3f06799bfd742ffea7bad32bb05d75934e2f44",
        "28169b6ed527a46f9d8b7c1612b97a10d3d8632b0ba73b13af41a3ae8154dbccd4de8f3019a3149483ce7d40",
        "e2fd7565973d81d7545eb89ab0f3b4e60c548f2f893e05ef4073bb3b11c97119ed45934bf5a66bd04d73df60",
        "f09b434736baf7068fb2317c29763fdcbaae1654f71dcb95a338b07eed2710164e3944546ecff92272f9ed96",
        "fbc9471aca465b3340f7a6781f47c9c19d0970d36cbe1199a6fcc78dacd0b320000000003368b2b80001cd02",
        "8009000063076bf63e300d8b020000000001595a",
    );

    /// `xz --format=xz --check=crc64 --lzma2=preset=1` of [`bcj_sample`]: no BCJ, CRC64.
    const XZ_CRC64: &str = concat!(
        "fd377a585a000004e6d6b4460200210110000000a8708e86e0047f012a5d002a920da4e4be300107fa7c2ee3",
        "0572cd30fb5aa26ea7d307eaf3d3477022756926844f06ca002cc70a7af55125fe999b7f85ca70d0fa502dd4",
        "9dfca5f5f7aeec48f28a4b64f92ee908bfcf43f01d7daa8c1965bdce870e1618352889734004ef603ec58b28",
        "acf627ec1c698f57b08fc07d34f12887a8546cf248b4b3f9b98a93e465da37002410b0d0e1b4eb038e7107b0",
        "1ee6a3fb182b6072827ce019a678e28f2c1a093d4a0f3276fc5296069b937d60901be3910ecf5dd0a2551b08",
        "30ec2108b8577cd594258c4df3a15da5c4d842acbad31517a7cda78567808c05e74897a837293bb7effdf418",
        "60ad86a9505bb47b2261bd905bc365b30b43218135088ec915a1a4ac17b23d863a5dcf0aea2c57f788313927",
        "ea96b6a851e7505bce49042e727f11ff243da7050000000040f32058116cb9d00001c60280090000a0f7ac9c",
        "b1c467fb020000000004595a",
    );

    fn unhex(s: &str) -> Vec<u8> {
        hex::decode(s).expect("test vector is hex")
    }

    /// A minimal bzImage: boot sector + `setup_sects` setup sectors with the header fields
    /// this module reads, then the protected-mode part with `payload` at `payload_offset`.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let payload_offset = 0x2cc_u32;
        let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload_offset as usize];
        b[0x1f1] = setup_sects;
        b[0x1fe..0x200].copy_from_slice(&[0x55, 0xaa]);
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020f_u16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&payload_offset.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(payload);
        b.extend_from_slice(&[0xcc; 100]); // the rest of the decompressor
        b
    }

    fn fake_elf() -> Vec<u8> {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.extend((0..5000u32).map(|i| (i * 7 % 251) as u8));
        elf
    }

    /// An XZ stream as lzma-rs writes it (no check, no BCJ, LZMA2), plus the kernel build's
    /// appended size.
    fn kernel_payload(data: &[u8]) -> Vec<u8> {
        let mut xz = Vec::new();
        lzma_rs::xz_compress(&mut &data[..], &mut xz).expect("compress");
        xz.extend_from_slice(&(data.len() as u32).to_le_bytes());
        xz
    }

    #[test]
    fn checksums_match_reference_values() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc64(b"123456789"), 0x995d_c9bb_df19_39fa);
        // Slicing-by-8 agrees with the byte loop on every alignment/remainder.
        let data: Vec<u8> = (0..100u32).map(|i| (i * 37 + 11) as u8).collect();
        for len in 0..data.len() {
            let mut crc = !0u32;
            for &b in &data[..len] {
                crc ^= u32::from(b);
                for _ in 0..8 {
                    crc = if crc & 1 != 0 {
                        0xedb8_8320 ^ (crc >> 1)
                    } else {
                        crc >> 1
                    };
                }
            }
            assert_eq!(crc32(&data[..len]), !crc, "len {len}");
        }
    }

    #[test]
    fn decodes_xz_made_by_xz_utils_with_the_kernel_options() {
        let (out, used) = decode_xz(&unhex(XZ_CRC32_X86), MAX_VMLINUX_SIZE).expect("decode");
        assert_eq!(out, bcj_sample(), "LZMA2 + x86 BCJ + CRC32");
        assert_eq!(used, XZ_CRC32_X86.len() / 2);
        let (out, _) = decode_xz(&unhex(XZ_CRC64), MAX_VMLINUX_SIZE).expect("decode");
        assert_eq!(out, bcj_sample(), "LZMA2 + CRC64");
    }

    #[test]
    fn bcj_encode_then_decode_is_identity() {
        // Pseudo-random bytes dense in e8/e9 and 00/ff, to hit every prev_mask case.
        let mut state = 0x1234_5678_u32;
        let data: Vec<u8> = (0..20_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                [0xe8, 0xe9, 0x00, 0xff, 0x12, (state >> 8) as u8][(state % 6) as usize]
            })
            .collect();
        for start in [0, 0x1000, 0xffff_fff0] {
            let mut buf = data.clone();
            bcj_x86(&mut buf, start, true);
            assert_ne!(buf, data, "the encoder changed something");
            bcj_x86(&mut buf, start, false);
            assert_eq!(buf, data, "start {start:#x}");
        }
        // Short buffers are left alone.
        let mut tiny = vec![0xe8, 0, 0, 0];
        bcj_x86(&mut tiny, 0, false);
        assert_eq!(tiny, [0xe8, 0, 0, 0]);
    }

    #[test]
    fn extracts_the_elf_from_a_bzimage() {
        let elf = fake_elf();
        let image = bzimage(&kernel_payload(&elf));
        assert_eq!(vmlinux_from_bzimage(&image).expect("extract"), elf);
        // An ELF is returned as it is, and so is an uncompressed payload.
        assert_eq!(vmlinux_from_bzimage(&elf).expect("elf"), elf);
        assert_eq!(
            vmlinux_from_bzimage(&bzimage(&elf)).expect("raw payload"),
            elf
        );
    }

    #[test]
    fn the_appended_size_must_match() {
        let elf = fake_elf();
        let mut payload = kernel_payload(&elf);
        let n = payload.len();
        payload[n - 4] ^= 1;
        let err = vmlinux_from_bzimage(&bzimage(&payload)).expect_err("size mismatch");
        assert!(
            matches!(err, LinuxImageError::CorruptXz { .. }) && err.to_string().contains("size"),
            "{err}"
        );
    }

    #[test]
    fn a_non_elf_payload_is_refused() {
        let payload = unhex(XZ_CRC32_X86);
        let err = vmlinux_from_bzimage(&bzimage(&payload)).expect_err("not an ELF");
        assert!(
            matches!(err, LinuxImageError::PayloadNotElf { .. }),
            "{err}"
        );
    }

    #[test]
    fn other_compressions_are_named() {
        for (magic, name) in [
            (&b"\x1f\x8b\x08\x00"[..], "gzip"),
            (b"\x28\xb5\x2f\xfd\x00", "zstd"),
            (b"\x02\x21\x4c\x18\x00", "LZ4"),
            (b"BZh91AY", "bzip2"),
            (b"\x89LZO\x00\r\n", "LZO"),
            (b"\x5d\x00\x00\x80\x00", "LZMA"),
        ] {
            let err = vmlinux_from_bzimage(&bzimage(magic)).expect_err(name);
            assert!(
                matches!(err, LinuxImageError::UnsupportedCompression { compression } if compression == name),
                "{name}: {err}"
            );
            assert!(err.to_string().contains(name), "{err}");
        }
        let err = vmlinux_from_bzimage(&bzimage(b"\x01\x02\x03\x04")).expect_err("unknown");
        assert!(
            matches!(err, LinuxImageError::UnknownPayload { .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_headers_are_reported() {
        let err = vmlinux_from_bzimage(&[0u8; 100]).expect_err("short");
        assert!(
            matches!(err, LinuxImageError::TooShort { len: 100, .. }),
            "{err}"
        );
        let err = vmlinux_from_bzimage(&[0u8; 4096]).expect_err("no HdrS");
        assert!(matches!(err, LinuxImageError::NotBzImage { .. }), "{err}");

        let mut old = bzimage(b"\x7fELF");
        old[0x206..0x208].copy_from_slice(&0x0207_u16.to_le_bytes());
        let err = vmlinux_from_bzimage(&old).expect_err("old");
        assert!(
            matches!(err, LinuxImageError::OldBootProtocol { major: 2, minor: 7 }),
            "{err}"
        );

        let mut beyond = bzimage(b"\x7fELF");
        beyond[0x24c..0x250].copy_from_slice(&u32::MAX.to_le_bytes());
        let err = vmlinux_from_bzimage(&beyond).expect_err("out of bounds");
        assert!(
            matches!(err, LinuxImageError::PayloadOutOfBounds { .. }),
            "{err}"
        );

        // A truncated download: the header is intact, the payload is cut.
        let image = bzimage(&kernel_payload(&fake_elf()));
        let err = vmlinux_from_bzimage(&image[..image.len() - 200]).expect_err("truncated");
        assert!(
            matches!(err, LinuxImageError::PayloadOutOfBounds { .. }),
            "{err}"
        );
    }

    #[test]
    fn truncated_or_corrupted_xz_never_panics() {
        let good = unhex(XZ_CRC32_X86);
        for len in 0..good.len() {
            assert!(
                decode_xz(&good[..len], MAX_VMLINUX_SIZE).is_err(),
                "len {len}"
            );
        }
        for i in 0..good.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                // An error, never a panic, and never wrong data: the block check covers the
                // output. (lzma-rs ignores the range coder's first byte, which is always 0,
                // so flipping it still decodes correctly.)
                if let Ok((out, _)) = decode_xz(&bad, MAX_VMLINUX_SIZE) {
                    assert_eq!(out, bcj_sample(), "byte {i} ^ {flip:#x} decoded wrongly");
                }
            }
        }
    }

    /// A single-block XZ stream (no check) around raw LZMA2 data, with a valid block header.
    fn xz_around_lzma2(lzma2: &[u8]) -> Vec<u8> {
        let mut s = XZ_MAGIC.to_vec();
        let flags = [0u8, 0];
        s.extend_from_slice(&flags);
        s.extend_from_slice(&crc32(&flags).to_le_bytes());
        let header = [0x02, 0x00, 0x21, 0x01, 0x16, 0, 0, 0];
        s.extend_from_slice(&header);
        s.extend_from_slice(&crc32(&header).to_le_bytes());
        s.extend_from_slice(lzma2);
        s
    }

    #[test]
    fn decompression_bombs_are_refused_before_allocating() {
        // LZMA chunks that each announce 2 MiB from 1 packed byte: 600 of them = 1.2 GiB.
        let mut lzma2 = Vec::new();
        for _ in 0..600 {
            lzma2.extend_from_slice(&[0xff, 0xff, 0xff, 0x00, 0x00, 0x5d, 0x00]);
        }
        lzma2.push(0x00);
        let err = decode_xz(&xz_around_lzma2(&lzma2), MAX_VMLINUX_SIZE).expect_err("bomb");
        assert!(matches!(err, LinuxImageError::TooLarge { .. }), "{err}");
        // Invalid control bytes and truncation are corruption, not panics.
        let err = decode_xz(&xz_around_lzma2(&[0x05]), MAX_VMLINUX_SIZE).expect_err("control");
        assert!(err.to_string().contains("control byte"), "{err}");
        let err = decode_xz(&xz_around_lzma2(&[0x01, 0x00]), MAX_VMLINUX_SIZE).expect_err("cut");
        assert!(matches!(err, LinuxImageError::CorruptXz { .. }), "{err}");
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x9e37_79b9_u32;
        for len in (0..3000).step_by(7) {
            let mut image: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    state as u8
                })
                .collect();
            let _ = vmlinux_from_bzimage(&image);
            // Also with a valid-looking header around the garbage.
            if image.len() > 0x250 {
                image[0x202..0x206].copy_from_slice(b"HdrS");
                image[0x206..0x208].copy_from_slice(&0x020f_u16.to_le_bytes());
                image[0x1f1] = 0;
                image[0x248..0x250].copy_from_slice(&[0; 8]);
                let _ = vmlinux_from_bzimage(&image);
            }
        }
    }
}
