//! A cache of what is derived from a bzImage: its decompressed vmlinux (about 1 s of XZ per
//! command otherwise, for ~0.1 s of patching work).
//!
//! Keyed by the SHA-256 of the bzImage. Each entry is the SHA-256 of the vmlinux followed by
//! the vmlinux, checked on every read: a torn or damaged entry is recomputed, never used. The
//! directory must be owned by this user and not writable by group or others, and entries must
//! be regular files of this user (never followed through a symlink), so another local user
//! cannot plant a kernel image for the patcher to trust. Failing any of that, the image is
//! decompressed as if there were no cache.
//!
//! Where: `$VMM_CACHE_DIR` if set (`off` disables the cache), else `$XDG_CACHE_HOME/vmm`, else
//! `$HOME/.cache/vmm`; entries live in its `linux/` subdirectory.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

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
    let key = hex::encode(Sha256::digest(bzimage));
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
    private(entry, &f.metadata().map_err(|e| e.to_string())?, false)?;
    let mut data = Vec::new();
    (&mut f)
        .take(MAX_VMLINUX_SIZE + 33)
        .read_to_end(&mut data)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if data.len() < 32 || data.len() as u64 > MAX_VMLINUX_SIZE + 32 {
        return Err("it has the wrong size".into());
    }
    let body = data.split_off(32);
    if Sha256::digest(&body).as_slice() != &data[..] {
        return Err("its checksum does not match (damaged or torn)".into());
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
        f.write_all(&Sha256::digest(vmlinux))
            .map_err(|e| e.to_string())?;
        f.write_all(vmlinux).map_err(|e| e.to_string())?;
        f.sync_all().map_err(|e| e.to_string())?;
        fs::rename(&tmp, entry).map_err(|e| e.to_string())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
