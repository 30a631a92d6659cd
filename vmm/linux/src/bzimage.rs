//! The uncompressed kernel (`vmlinux`, an ELF) out of a bzImage (`vmlinuz`), without running it.
//!
//! A bzImage is the real-mode setup code (`setup_sects` 512-byte sectors after the boot sector)
//! followed by the protected-mode code: a small decompressor with the compressed vmlinux
//! embedded. Since boot protocol 2.08 the setup header says where that payload is
//! (`payload_offset`/`payload_length` at 0x248/0x24c, relative to the protected-mode code).
//! Debian compresses it with XZ (`CONFIG_KERNEL_XZ=y`) using the kernel's `scripts/xz_wrap.sh`:
//! CRC32 check, the x86 BCJ filter, then LZMA2.
//!
//! The XZ stream (container, BCJ filter, block checks) is decoded by `lzma-rust2`. The input is
//! untrusted: the output is read in bounded steps and the decoder is stopped as soon as it
//! would produce more than [`MAX_VMLINUX_SIZE`] bytes, the output buffer never grows past that
//! limit, and the LZMA2 dictionary a block header asks for is capped at
//! [`MAX_XZ_DICTIONARY`] before it is allocated.

use std::io::Read;

/// Largest vmlinux we agree to produce (1 GiB). Debian's 6.1 vmlinux is 66 MB; even
/// allyesconfig kernels stay far below this. It bounds the memory a hostile image can make us
/// allocate (LZMA2 can expand ~7000:1).
pub const MAX_VMLINUX_SIZE: u64 = 1 << 30;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const XZ_MAGIC: &[u8; 6] = b"\xfd7zXZ\0";

/// Largest LZMA2 dictionary (plus the decoder's own state) a block may ask for: 256 MiB. The
/// kernel's `scripts/xz_wrap.sh` uses 32 MiB; the XZ format allows up to 4 GiB, which a hostile
/// header could otherwise make us allocate before decoding a byte.
pub const MAX_XZ_DICTIONARY: u64 = 256 << 20;

/// How much decoded data is asked of the XZ reader at a time.
const READ_CHUNK: usize = 1 << 16;

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
    /// The XZ stream is malformed, truncated, fails its checks, or uses what the decoder lacks.
    #[error(
        "the XZ-compressed kernel could not be decoded (stopped after byte {offset:#x} of the \
         stream): the image is truncated or corrupt, or uses an XZ feature the decoder does not \
         support; download the kernel package again, or pass the uncompressed vmlinux instead"
    )]
    CorruptXz {
        /// How many bytes of the XZ stream the decoder had consumed.
        offset: usize,
        /// The decoder's report.
        #[source]
        source: std::io::Error,
    },
    /// The size the kernel build appended after the XZ stream disagrees with the stream.
    #[error(
        "the size appended after the XZ-compressed kernel says {announced} bytes, but the \
         stream decoded to {decoded}: the image is corrupt, download the kernel package again"
    )]
    SizeMismatch {
        /// The appended size (little-endian u32 after the stream).
        announced: u32,
        /// What the stream decoded to.
        decoded: usize,
    },
    /// The payload decompresses to more than [`MAX_VMLINUX_SIZE`].
    #[error(
        "the kernel payload decompresses to more than {limit} bytes: that is no kernel (or a \
         decompression bomb), refusing to decompress it further"
    )]
    TooLarge {
        /// The limit, [`MAX_VMLINUX_SIZE`].
        limit: u64,
    },
    /// Memory for the decompressed kernel could not be reserved.
    #[error(
        "could not reserve {bytes} bytes for the decompressed kernel: free some memory, or \
         pass the uncompressed vmlinux instead"
    )]
    OutOfMemory {
        /// The buffer size that was asked for.
        bytes: usize,
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
/// and reported by name.
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
        if let Some(&[a, b, c, d]) = payload.get(consumed..) {
            let announced = u32::from_le_bytes([a, b, c, d]);
            if u64::from(announced) != out.len() as u64 {
                return Err(LinuxImageError::SizeMismatch {
                    announced,
                    decoded: out.len(),
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

/// Decodes one XZ stream at the start of `stream`, producing at most `limit` bytes; returns the
/// data and the stream's length. Trailing bytes after the stream are left to the caller.
fn decode_xz(stream: &[u8], limit: u64) -> Result<(Vec<u8>, usize), LinuxImageError> {
    let mem_limit_kb = u32::try_from(MAX_XZ_DICTIONARY >> 10).unwrap_or(u32::MAX);
    let mut xz = lzma_rust2::XzReader::new_mem_limit(stream, false, mem_limit_kb);
    // A kernel compresses ~4-8:1; start with room for that and grow (never past `limit`).
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let guess = stream.len().saturating_mul(8).min(limit);
    let out = read_bounded(&mut xz, limit, guess).map_err(|e| match e {
        BoundedReadError::Read(source) => LinuxImageError::CorruptXz {
            offset: stream.len() - xz.inner().len(),
            source,
        },
        BoundedReadError::TooLarge => LinuxImageError::TooLarge {
            limit: limit as u64,
        },
        BoundedReadError::OutOfMemory(bytes) => LinuxImageError::OutOfMemory { bytes },
    })?;
    // The reader stops right after the stream footer: what is left of the slice is the trailer.
    Ok((out, stream.len() - xz.inner().len()))
}

/// Why [`read_bounded`] stopped.
#[derive(Debug)]
enum BoundedReadError {
    Read(std::io::Error),
    /// The reader had more than `limit` bytes.
    TooLarge,
    /// Reserving this many bytes failed.
    OutOfMemory(usize),
}

/// Reads `reader` to its end into a buffer whose capacity never exceeds `limit` (starting at
/// `initial`, clamped to `limit`); fails with [`BoundedReadError::TooLarge`] as soon as the
/// reader yields byte `limit + 1`.
fn read_bounded(
    reader: &mut impl Read,
    limit: usize,
    initial: usize,
) -> Result<Vec<u8>, BoundedReadError> {
    let mut out = Vec::new();
    reserve_total(&mut out, initial.min(limit))?;
    let mut chunk = vec![0u8; READ_CHUNK];
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => return Ok(out),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(BoundedReadError::Read(e)),
        };
        let needed = out.len().saturating_add(n);
        if needed > limit {
            return Err(BoundedReadError::TooLarge);
        }
        if needed > out.capacity() {
            // Double, as Vec would, but never past the limit.
            // (`needed <= limit` here, so the clamp's bounds are ordered.)
            let total = out.capacity().saturating_mul(2).clamp(needed, limit);
            reserve_total(&mut out, total)?;
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Grows `out`'s capacity to exactly `total` bytes (if it is smaller).
fn reserve_total(out: &mut Vec<u8>, total: usize) -> Result<(), BoundedReadError> {
    let extra = total.saturating_sub(out.len());
    out.try_reserve_exact(extra)
        .map_err(|_| BoundedReadError::OutOfMemory(total))
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

    /// An XZ stream as lzma-rust2 writes it with the kernel's options (x86 BCJ, LZMA2, CRC32).
    fn xz(data: &[u8]) -> Vec<u8> {
        use lzma_rust2::{CheckType, FilterType, XzOptions, XzWriter};
        use std::io::Write;
        let mut options = XzOptions::with_preset(1);
        options.set_check_sum_type(CheckType::Crc32);
        options.prepend_pre_filter(FilterType::BcjX86, 0);
        let mut w = XzWriter::new(Vec::new(), options).expect("xz writer");
        w.write_all(data).expect("compress");
        w.finish().expect("finish")
    }

    /// [`xz`] plus the kernel build's appended size.
    fn kernel_payload(data: &[u8]) -> Vec<u8> {
        let mut payload = xz(data);
        payload.extend_from_slice(&(data.len() as u32).to_le_bytes());
        payload
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
            matches!(err, LinuxImageError::SizeMismatch { announced, decoded: 5007 } if announced == 5007 ^ 1),
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
            let err = decode_xz(&good[..len], MAX_VMLINUX_SIZE).expect_err("truncated");
            assert!(
                matches!(err, LinuxImageError::CorruptXz { offset, .. } if offset <= len),
                "len {len}: {err}"
            );
        }
        let mut wrong = 0;
        for i in 0..good.len() {
            for flip in [0x01, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[i] ^= flip;
                // An error, never a panic, and never wrong data: the block check covers the
                // output. (Decoders ignore the range coder's first byte, which is always 0, so
                // flipping it still decodes correctly.)
                if let Ok((out, _)) = decode_xz(&bad, MAX_VMLINUX_SIZE) {
                    wrong += usize::from(out != bcj_sample());
                }
            }
        }
        assert_eq!(wrong, 0, "corrupted streams decoded to wrong data");
        // The error names the cause once: the decoder's report is the source, not the message.
        let err = decode_xz(&good[..good.len() / 2], MAX_VMLINUX_SIZE).expect_err("cut");
        let source = std::error::Error::source(&err)
            .expect("a source")
            .to_string();
        assert!(!err.to_string().contains(&source), "{err}");
    }

    #[test]
    fn decompression_bombs_are_refused_while_streaming() {
        // 3 MiB of zeros compress to a few hundred bytes; with a 1 MiB limit decoding stops.
        let bomb = xz(&vec![0u8; 3 << 20]);
        assert!(bomb.len() < 4096, "{} bytes", bomb.len());
        let err = decode_xz(&bomb, 1 << 20).expect_err("bomb");
        assert!(
            matches!(err, LinuxImageError::TooLarge { limit } if limit == 1 << 20),
            "{err}"
        );
        // Exactly at the limit is fine.
        let (out, _) = decode_xz(&bomb, 3 << 20).expect("at the limit");
        assert_eq!(out.len(), 3 << 20);
        // The buffer never grows past the limit, however the reads fall.
        let limit = 1_000_003;
        let out = read_bounded(&mut &vec![7u8; limit][..], limit, 10).expect("at the limit");
        assert_eq!(out.len(), limit);
        assert!(out.capacity() <= limit, "capacity {}", out.capacity());
        assert!(matches!(
            read_bounded(&mut &vec![7u8; limit + 1][..], limit, limit * 4),
            Err(BoundedReadError::TooLarge)
        ));
    }

    #[test]
    fn huge_dictionaries_are_refused_before_allocating() {
        // A block header asking for a 1.5 GiB LZMA2 dictionary (property byte 39).
        let mut stream = xz(b"\x7fELF");
        // Stream header (12 bytes), then the block header: size, flags, [BCJ filter], LZMA2
        // filter id 0x21, property size 1, property. Find the LZMA2 property and raise it.
        let at = stream[12..]
            .windows(2)
            .position(|w| w == [0x21, 0x01])
            .expect("LZMA2 filter flags")
            + 12
            + 2;
        stream[at] = 39;
        let header_len = (usize::from(stream[12]) + 1) * 4;
        let crc_at = 12 + header_len - 4;
        let crc = crc32_for_test(&stream[12..crc_at]);
        stream[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        let err = decode_xz(&stream, MAX_VMLINUX_SIZE).expect_err("dictionary");
        assert!(matches!(err, LinuxImageError::CorruptXz { .. }), "{err}");
        let source = std::error::Error::source(&err)
            .expect("a source")
            .to_string();
        assert!(source.contains("mem"), "{source}");
    }

    /// Bitwise CRC32 (IEEE), to re-seal a block header the test edits.
    fn crc32_for_test(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    0xedb8_8320 ^ (crc >> 1)
                } else {
                    crc >> 1
                };
            }
        }
        !crc
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
