//! A cache of what is derived from a bzImage: its decompressed vmlinux (about 1 s of XZ per
//! command otherwise, for ~0.1 s of patching work).
//!
//! Keyed by the SHA-256 of the bzImage. Each entry is a 32-byte header (a magic, the vmlinux's
//! length and its XXH3-128 checksum) followed by the vmlinux, checked on every read: a damaged
//! entry is recomputed, never used, and entries are written to a temporary file, synced and
//! renamed, so none is ever torn. The directory must be owned by this user and not writable by
//! group or others, and entries must be regular files of this user (never followed through a
//! symlink), so another local user cannot plant a kernel image for the patcher to trust.
//! Failing any of that, the image is decompressed as if there were no cache.
//!
//! Why a non-cryptographic checksum on the entry: what could change an entry is damage, not an
//! adversary (the ownership checks keep other users out, and this user can change the bzImage
//! itself). The key, which another party's image could try to collide with, stays SHA-256.
//! The entry is read on every `vmm run` of a bzImage (the VMM boots the kernel from it), and
//! where the VMM's user space is emulated a SHA-256 of its ~60 MB took 2 s of the boot.
//!
//! Where: `$VMM_CACHE_DIR` if set (`off` disables the cache), else `$XDG_CACHE_HOME/vmm`, else
//! `$HOME/.cache/vmm`; entries live in its `linux/` subdirectory.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The first 8 bytes of an entry (format 2: length and XXH3-128; format 1 had a bare SHA-256).
const MAGIC: &[u8; 8] = b"VMMKIMG2";
const HEADER: usize = 32;

fn header(vmlinux: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&(vmlinux.len() as u64).to_le_bytes());
    h[16..].copy_from_slice(&xxhash_rust::xxh3::xxh3_128(vmlinux).to_le_bytes());
    h
}

use crate::bzimage::{LinuxImageError, MAX_VMLINUX_SIZE};

/// The cache directory this process uses, if any.
pub fn default_dir() -> Option<PathBuf> {
    let base = match std::env::var_os("VMM_CACHE_DIR") {
        Some(v) if v == "off" => return None,
        Some(v) => PathBuf::from(v),
        None => match std::env::var_os("XDG_CACHE_HOME") {
            Some(x) if !x.is_empty() => PathBuf::from(x).join("vmm"),
            _ => PathBuf::from(std::env::var_os("HOME")?).join(".cache/vmm"),
        },
    };
    Some(base.join("linux"))
}

/// Whether a read came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cache,
    Decompressed,
}

/// The vmlinux of `bzimage`: from the cache in `dir` when a valid entry is there, else
/// decompressed (and stored for next time when `dir` can hold it).
pub fn vmlinux(bzimage: &[u8], dir: Option<&Path>) -> Result<(Vec<u8>, Source), LinuxImageError> {
    let Some(dir) = dir else {
        return Ok((crate::vmlinux_from_bzimage(bzimage)?, Source::Decompressed));
    };
    let t = std::time::Instant::now();
    let key = hex::encode(Sha256::digest(bzimage));
    tracing::debug!(
        us = t.elapsed().as_micros() as u64,
        bytes = bzimage.len(),
        "image cache key"
    );
    let entry = dir.join(format!("{key}.vmlinux"));
    match read_entry(dir, &entry) {
        Ok(Some(v)) => return Ok((v, Source::Cache)),
        Ok(None) => {}
        Err(why) => {
            tracing::warn!(entry = %entry.display(), %why, "ignoring the kernel image cache entry")
        }
    }
    let v = crate::vmlinux_from_bzimage(bzimage)?;
    if let Err(why) = write_entry(dir, &entry, &v) {
        tracing::warn!(dir = %dir.display(), %why, "cannot cache the decompressed kernel image");
    }
    Ok((v, Source::Decompressed))
}

/// Refuses what another user could have planted or could change.
fn private(path: &Path, meta: &fs::Metadata, dir: bool) -> Result<(), String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let kind = if dir {
        meta.file_type().is_dir()
    } else {
        meta.file_type().is_file()
    };
    if !kind {
        return Err(format!(
            "{} is not a {}",
            path.display(),
            if dir { "directory" } else { "regular file" }
        ));
    }
    if meta.uid() != euid {
        return Err(format!("{} is owned by another user", path.display()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!("{} is writable by group or others", path.display()));
    }
    Ok(())
}

fn read_entry(dir: &Path, entry: &Path) -> Result<Option<Vec<u8>>, String> {
    match fs::symlink_metadata(dir) {
        Ok(m) => private(dir, &m, true)?,
        Err(_) => return Ok(None),
    }
    let mut f = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(entry)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let meta = f.metadata().map_err(|e| e.to_string())?;
    private(entry, &meta, false)?;
    let mut head = [0u8; HEADER];
    f.read_exact(&mut head)
        .map_err(|_| "it is shorter than its header".to_string())?;
    if &head[..8] != MAGIC {
        return Err("it is not in this version's format (it is rebuilt)".into());
    }
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap_or_default());
    if len > MAX_VMLINUX_SIZE || meta.len() != HEADER as u64 + len {
        return Err("it has the wrong size".into());
    }
    // Exactly `len` bytes, read once into a buffer of that size (no growth, no copy).
    let mut body = Vec::with_capacity(len as usize);
    (&mut f)
        .take(len)
        .read_to_end(&mut body)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if body.len() as u64 != len {
        return Err("it changed size while being read".into());
    }
    let t = std::time::Instant::now();
    let ok = header(&body) == head;
    tracing::debug!(
        us = t.elapsed().as_micros() as u64,
        bytes = body.len(),
        "image cache entry checked"
    );
    if !ok {
        return Err("its checksum does not match (damaged)".into());
    }
    Ok(Some(body))
}

fn write_entry(dir: &Path, entry: &Path, vmlinux: &[u8]) -> Result<(), String> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| e.to_string())?;
    private(
        dir,
        &fs::symlink_metadata(dir).map_err(|e| e.to_string())?,
        true,
    )?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        entry
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("entry"),
        std::process::id()
    ));
    let result = (|| -> Result<(), String> {
        let mut f: File = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| e.to_string())?;
        f.write_all(&header(vmlinux)).map_err(|e| e.to_string())?;
        f.write_all(vmlinux).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        fs::rename(&tmp, entry).map_err(|e| e.to_string())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// An "image" that is already an ELF: the cache stores it as its own vmlinux.
    fn image() -> Vec<u8> {
        let mut b = b"\x7fELF".to_vec();
        b.extend((0..100_000u32).map(|i| (i * 7 % 251) as u8));
        b
    }

    fn entry_of(dir: &Path, bz: &[u8]) -> PathBuf {
        dir.join(format!("{}.vmlinux", hex::encode(Sha256::digest(bz))))
    }

    #[test]
    fn entries_are_reused_and_a_damaged_or_old_one_is_rebuilt_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("linux");
        let bz = image();
        assert_eq!(
            vmlinux(&bz, Some(&dir)).unwrap(),
            (bz.clone(), Source::Decompressed)
        );
        let entry = entry_of(&dir, &bz);
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!((mode(&dir), mode(&entry)), (0o700, 0o600));
        assert_eq!(
            vmlinux(&bz, Some(&dir)).unwrap(),
            (bz.clone(), Source::Cache)
        );
        // One flipped byte in the body: recomputed, and the entry repaired.
        let mut raw = fs::read(&entry).unwrap();
        raw[HEADER + 500] ^= 1;
        fs::write(&entry, &raw).unwrap();
        assert_eq!(
            vmlinux(&bz, Some(&dir)).unwrap(),
            (bz.clone(), Source::Decompressed)
        );
        assert_eq!(vmlinux(&bz, Some(&dir)).unwrap().1, Source::Cache);
        // A truncated entry, and one in the first format (a bare SHA-256, then the body).
        let raw = fs::read(&entry).unwrap();
        fs::write(&entry, &raw[..raw.len() - 1]).unwrap();
        assert_eq!(vmlinux(&bz, Some(&dir)).unwrap().1, Source::Decompressed);
        let mut old = Sha256::digest(&bz).to_vec();
        old.extend_from_slice(&bz);
        fs::write(&entry, &old).unwrap();
        assert_eq!(
            vmlinux(&bz, Some(&dir)).unwrap(),
            (bz.clone(), Source::Decompressed)
        );
        assert_eq!(vmlinux(&bz, Some(&dir)).unwrap().1, Source::Cache);
    }

    #[test]
    fn entries_another_user_could_have_planted_are_never_used() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("linux");
        let bz = image();
        vmlinux(&bz, Some(&dir)).unwrap();
        let entry = entry_of(&dir, &bz);
        // A valid entry for other bytes, made group-writable: ignored.
        let mut planted = b"\x7fELF planted".to_vec();
        planted.resize(1000, 0);
        let mut raw = header(&planted).to_vec();
        raw.extend_from_slice(&planted);
        fs::write(&entry, &raw).unwrap();
        fs::set_permissions(&entry, fs::Permissions::from_mode(0o660)).unwrap();
        assert_eq!(
            vmlinux(&bz, Some(&dir)).unwrap(),
            (bz.clone(), Source::Decompressed)
        );
        // A symlink to such a file: not followed.
        let elsewhere = tmp.path().join("elsewhere");
        fs::write(&elsewhere, &raw).unwrap();
        fs::set_permissions(&elsewhere, fs::Permissions::from_mode(0o600)).unwrap();
        let _ = fs::remove_file(&entry);
        std::os::unix::fs::symlink(&elsewhere, &entry).unwrap();
        assert_eq!(
            vmlinux(&bz, Some(&dir)).unwrap(),
            (bz.clone(), Source::Decompressed)
        );
        // A directory others can write: not used at all.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(vmlinux(&bz, Some(&dir)).unwrap().1, Source::Decompressed);
    }
}
