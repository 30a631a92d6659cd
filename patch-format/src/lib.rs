//! The hot-patch file format (`.hpatch`, format versions 1 and 2; see
//! `docs/patch-format.md`): the patch model, its canonical encoding and strict
//! parser, ed25519 signing, relocation resolution, and builders that make
//! patches from ELF files. Knows nothing of KVM.

mod build;
mod codec;
mod elf;
mod inspect;
mod keys;
mod manifest;
mod model;
mod reloc;
mod sign;
mod x86;

pub use build::{BuildError, BuildOutput, BuildReport, PatchInfo, build_from_elfs, diff_elfs};
pub use codec::{
    BODY_TAG_V2, EncodeError, HEADER_LEN, MAGIC, ParseError, ParsedPatch, ReadError,
    SIGNATURE_CONTEXT, parse, read_patch,
};
pub use elf::{ElfError, ImageInfo, ImageSymbol, read_image};
pub use inspect::{format_utc, inspect_json, inspect_text};
pub use keys::{
    KeyFileError, KeyId, PUBLIC_KEY_HEADER, PublicKey, SECRET_KEY_HEADER, SecretKey, SignatureBlock,
};
pub use manifest::{
    Manifest, ManifestSite, ManifestTarget, ObjectCode, PatchObject, build_from_manifest,
    build_from_manifest_file, code_from_object, parse_location,
};
pub use model::*;
pub use reloc::{RelocError, apply_relocations};
pub use sign::{VerifyError, sign_file, unsigned_file};
pub use x86::{DisasmLine, disassemble};
