//! The patch journal: a durable, append-only record of every patch's state.
//!
//! The engine writes a record *before* it acts (`Applying`, `Reverting`) and again after
//! (`Applied`, `Reverted`, `Failed`), and waits for each record to reach the disk. That is what
//! lets `list` survive a VMM or API restart, and what turns a crash in the middle of an apply into
//! a reported, recoverable condition ([`Recovery::interrupted`]) instead of a silently
//! half-applied patch.
//!
//! Apply latency is a design target (end-to-end apply < 2 ms p50), so a state change costs one
//! `write` of one JSON line plus one `fdatasync`, nothing more. The file is only rewritten
//! (compacted) once superseded records pile up, and then atomically: temp file, fsync, rename,
//! fsync of the directory.
//!
//! Line format, one per record:
//!
//! ```text
//! {"v":1,"seq":7,"crc":"1a2b3c4d","rec":{...PatchRecord...}}
//! ```
//!
//! `crc` is the first 8 hex digits of SHA-256 over the compact JSON serialization of `rec`, i.e.
//! over the exact bytes after `"rec":`. On open those stored bytes are hashed as they are, so a
//! changed byte anywhere in the record (values, field names, an added field) is caught, not just
//! a torn write.
//!
//! Only the *last* line may be bad: appends are single writes followed by `fdatasync`, so a crash
//! can tear at most the line being written, and that write was never acknowledged to the engine.
//! A bad line anywhere else means the file was damaged or edited, and the journal refuses to guess.
//!
//! One VMM per state dir: an exclusive `flock` on `patches.lock` in the state dir. The lock lives
//! on its own file rather than on `patches.journal` because compaction replaces the journal's
//! inode; a lock on the old inode would let a second VMM that had opened the old file win the
//! lock after the rename and believe it owns the directory.

use std::collections::HashMap;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Name of the journal inside the state dir.
pub const JOURNAL_FILE: &str = "patches.journal";
/// Name of the lock file inside the state dir (holds the owner's pid, for error messages).
pub const LOCK_FILE: &str = "patches.lock";
/// Compaction writes here first; a leftover one is an interrupted compaction and is discarded.
const TMP_FILE: &str = "patches.journal.tmp";
/// Beside the journal, the signed patch file of every patch that may be in the guest: the
/// journal is a record, never a source of bytes to write (docs/patch-engine.md, "Who vouches
/// for every byte"), so recovery and a revert after a restart re-derive what they write from
/// the signed file kept here and check the record against it.
pub const PATCHES_DIR: &str = "patches";
/// The only line format this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;
/// Compact once the file holds this many lines (and at least twice as many as live records, so
/// a journal with many live patches is not rewritten on every put).
pub const COMPACT_AT: usize = 4096;
/// On open, compact when at least this many superseded lines exist and they outnumber the live
/// records; below that the rewrite costs more than the replay it saves.
const OPEN_COMPACT_MIN_SUPERSEDED: usize = 256;

/// Lifecycle of a patch. `Applying` and `Reverting` are written before the guest is touched,
/// so finding one as the last state on open means the VMM died mid-operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PatchState {
    Applying,
    Applied,
    Reverting,
    Reverted,
    Failed,
}

/// One patched site, with the bytes needed to undo it (ARCHITECTURE.md §4: revert restores
/// exactly what was there).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteRecord {
    pub location: String,
    pub gva: u64,
    pub gpa: u64,
    #[serde(with = "hex_bytes")]
    pub original: Vec<u8>,
    #[serde(with = "hex_bytes")]
    pub patched: Vec<u8>,
}

/// Guest memory a patch placed code in; kept so the arena is not reused while still live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArenaRecord {
    pub gpa: u64,
    pub len: u64,
}

/// Everything the engine must remember about one patch across a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchRecord {
    /// 64 lowercase hex digits (the patch id as `patch-format` prints it).
    pub id: String,
    pub name: String,
    pub state: PatchState,
    pub sites: Vec<SiteRecord>,
    pub arena: Vec<ArenaRecord>,
    pub replaces: Vec<String>,
    /// Unix seconds.
    pub applied_at: Option<u64>,
    /// Unix seconds.
    pub reverted_at: Option<u64>,
    pub apply_blackout_us: Option<u64>,
    pub revert_blackout_us: Option<u64>,
    pub moved_vcpus: u32,
    /// Function-replacement sites: with more than one, the patch switches a vCPU's whole set
    /// of functions at once, so its code must be idle around every apply and revert.
    #[serde(default)]
    pub function_sites: u32,
    /// The image build the patch was applied to (`build-id:…` / `text:…`): recovery touches
    /// a guest only when it runs the same build. Absent in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// How many threads of the OS off the vCPUs (Linux tasks) the apply's blackout checked,
    /// when the backend lists them (`EngineConfig::list_threads`) and the patch needed them:
    /// it replaces several functions, or a jump displaces several instructions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads_checked: Option<u32>,
    /// Why it failed, or what recovery did; shown to the operator.
    pub note: Option<String>,
}

/// What [`Journal::open`] found that the caller has to act on or report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// A partial or damaged last line was found, dropped, and the file truncated back to the
    /// last good line. The dropped write was never acknowledged, so no acknowledged state is lost
    /// in the crash case; it is reported because it can also mean damage.
    pub torn_tail: bool,
    /// Ids whose last recorded state is `Applying` or `Reverting`: the VMM stopped mid-operation
    /// and the engine must decide (and record) what became of them.
    pub interrupted: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error(
        "patch journal: cannot {op} {}; check that --state-dir names a writable local \
         directory owned by this user and that its disk has free space",
        path.display()
    )]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "state dir {} is in use by another vmm process{}; stop that vmm, or give this one its own \
         --state-dir",
        dir.display(),
        holder_suffix(*holder)
    )]
    Locked { dir: PathBuf, holder: Option<u32> },

    #[error(
        "patch journal {} is corrupt at line {line}: {reason}. Only a damaged last line can come \
         from a crash, so this file was damaged or edited and the vmm will not guess at patch \
         state. Inspect it, then move it aside (e.g. `mv {} {}.bad`) to start with an empty patch \
         history; the vmm will then know nothing about the patches recorded in it",
        path.display(),
        path.display(),
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        reason: String,
    },

    #[error(
        "patch journal {} line {line} uses format version {version}, but this vmm only \
         understands version {FORMAT_VERSION}; it was probably written by a newer vmm. Run that \
         version, or move the file aside (e.g. `mv {} {}.v{version}`) to start with an empty \
         patch history",
        path.display(),
        path.display(),
        path.display()
    )]
    UnsupportedVersion {
        path: PathBuf,
        line: usize,
        version: u64,
    },

    #[error(
        "refusing the patch state at {}: it {reason}. Another user could plant patch history          that recovery would act on; use a state dir only this user can write (mode 0700), or          remove it to start afresh",
        path.display()
    )]
    Unsafe { path: PathBuf, reason: &'static str },

    #[error("refusing to journal patch record: {reason}; this is a bug in the caller")]
    InvalidRecord { reason: String },

    #[error(
        "patch journal {} is unusable after an earlier I/O error (the disk may not hold what this \
         process believes); no further patch state can be recorded. Restart the vmm so it can \
         recover from the file",
        path.display()
    )]
    Poisoned { path: PathBuf },
}

fn holder_suffix(holder: Option<u32>) -> String {
    match holder {
        Some(pid) if pid == std::process::id() => format!(" (this process, pid {pid})"),
        Some(pid) => format!(" (pid {pid})"),
        None => String::new(),
    }
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> JournalError + 'a {
    move |source| JournalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Open journal with the state-dir lock held; dropping it releases the lock.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// Held only for its `flock`, which lasts as long as the descriptor.
    _lock: File,
    /// Bytes of the file that are known-good; appends go exactly here.
    len: u64,
    /// Lines in the file, live and superseded.
    lines: usize,
    next_seq: u64,
    records: Vec<PatchRecord>,
    index: HashMap<String, usize>,
    compact_at: usize,
    /// Line count at which `put` next tries to compact; pushed back after a failed attempt so a
    /// full disk does not add a failing rewrite to every apply.
    next_compact: usize,
    /// Set when the on-disk state can no longer be trusted to match `len`/`records`.
    poisoned: bool,
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, takes the state-dir lock, replays it and
    /// repairs a torn tail.
    pub fn open(dir: &Path) -> Result<(Journal, Recovery), JournalError> {
        Self::open_with(dir, COMPACT_AT)
    }

    fn open_with(dir: &Path, compact_at: usize) -> Result<(Journal, Recovery), JournalError> {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err("create state dir", dir))?;
        // Another user must not be able to plant or swap files here (as ssh insists of ~/.ssh).
        let meta = fs::symlink_metadata(dir).map_err(io_err("inspect state dir", dir))?;
        check_private(dir, &meta, true)?;
        let lock = lock_dir(dir)?;

        let tmp = dir.join(TMP_FILE);
        match fs::remove_file(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove stale", &tmp)(e)),
        }

        let path = dir.join(JOURNAL_FILE);
        let mut file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => {
                // The new directory entry must be durable too, or the first records could vanish
                // with it in a crash.
                sync_dir(dir)?;
                f
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_err("open", &path))?,
            Err(e) => return Err(io_err("create", &path)(e)),
        };

        check_private(
            &path,
            &file.metadata().map_err(io_err("inspect", &path))?,
            false,
        )?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io_err("read", &path))?;
        let replay = replay(&path, &data)?;

        if let Some(reason) = &replay.torn {
            tracing::warn!(
                path = %path.display(),
                dropped_bytes = data.len() as u64 - replay.good_len,
                reason = %reason,
                "dropping damaged last line of the patch journal"
            );
            file.set_len(replay.good_len)
                .map_err(io_err("truncate torn tail of", &path))?;
            file.sync_all().map_err(io_err("sync", &path))?;
        }

        let recovery = Recovery {
            torn_tail: replay.torn.is_some(),
            interrupted: replay
                .records
                .iter()
                .filter(|r| matches!(r.state, PatchState::Applying | PatchState::Reverting))
                .map(|r| r.id.clone())
                .collect(),
        };

        let mut journal = Journal {
            dir: dir.to_path_buf(),
            path,
            file,
            _lock: lock,
            len: replay.good_len,
            lines: replay.lines,
            next_seq: replay.last_seq.saturating_add(1),
            records: replay.records,
            index: replay.index,
            compact_at,
            next_compact: 0,
            poisoned: false,
        };
        journal.next_compact = journal.compact_threshold();

        let superseded = journal.lines - journal.records.len();
        if superseded >= OPEN_COMPACT_MIN_SUPERSEDED && superseded >= journal.records.len() {
            journal.compact()?;
        }
        Ok((journal, recovery))
    }

    /// The patch states recorded in `dir`, read without writing anything: no state dir or
    /// journal is created, the lock is not taken, a torn last line is skipped (not truncated)
    /// and nothing is reconciled with the guest. What `vmm patch list` shows for a QEMU VM.
    /// A missing journal means no patches.
    pub fn read_only(dir: &Path) -> Result<Vec<PatchRecord>, JournalError> {
        let path = dir.join(JOURNAL_FILE);
        let data = match fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        Ok(replay(&path, &data)?.records)
    }

    /// Current state of every patch, in the order each was first recorded.
    pub fn records(&self) -> &[PatchRecord] {
        &self.records
    }

    pub fn get(&self, id: &str) -> Option<&PatchRecord> {
        self.index.get(id).map(|&i| &self.records[i])
    }

    /// Durably records `rec` (replacing any earlier record with the same id). When this returns
    /// `Ok` the record is on disk; on `Err` the in-memory state is unchanged and the engine must
    /// not proceed as if it were recorded.
    pub fn put(&mut self, rec: PatchRecord) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        validate(&rec).map_err(|reason| JournalError::InvalidRecord { reason })?;
        if self.next_seq == u64::MAX {
            // The sequence would run out (a file carried from elsewhere may start near the
            // top): renumber from 1 in a compacted file rather than wrap.
            self.compact()?;
        }
        let line = encode_line(self.next_seq, &rec)?;

        if let Err(e) = self.file.write_all_at(&line, self.len) {
            // A partial write must not stay in front of the next append, or the next open would
            // see a bad line in the middle. Cut it off; if even that fails, stop writing.
            let cut = self
                .file
                .set_len(self.len)
                .and_then(|()| self.file.sync_data());
            if cut.is_err() {
                self.poisoned = true;
            }
            return Err(io_err("append to", &self.path)(e));
        }
        if let Err(e) = self.file.sync_data() {
            // After a failed fdatasync the kernel may have dropped the dirty pages and cleared the
            // error, so retrying would "succeed" without the data: never trust this file again.
            self.poisoned = true;
            return Err(io_err("fdatasync", &self.path)(e));
        }

        self.len += line.len() as u64;
        self.lines += 1;
        self.next_seq += 1;
        match self.index.get(&rec.id) {
            Some(&i) => self.records[i] = rec,
            None => {
                self.index.insert(rec.id.clone(), self.records.len());
                self.records.push(rec);
            }
        }

        if self.lines >= self.next_compact {
            // The record is already durable; a failed compaction only leaves a longer file, so it
            // is reported in the log rather than as a failed put.
            if let Err(e) = self.compact() {
                tracing::warn!(error = %e, "patch journal compaction failed; will retry later");
                self.next_compact = self.lines + self.compact_at.max(1);
            }
        }
        Ok(())
    }

    /// Rewrites the journal to hold one line per patch. Atomic: a crash leaves either the old
    /// file or the new one, both describing the same state.
    pub fn compact(&mut self) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned {
                path: self.path.clone(),
            });
        }
        // A compacted file starts its own sequence: numbers never run out.
        let mut seq = 1u64;
        let mut content = Vec::new();
        for rec in &self.records {
            content.extend_from_slice(&encode_line(seq, rec)?);
            seq += 1;
        }

        let tmp = self.dir.join(TMP_FILE);
        let new_file = match write_new_file(&tmp, &content) {
            Ok(f) => f,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = fs::rename(&tmp, &self.path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename compacted journal onto", &self.path)(e));
        }
        // From here on appends must go to the new inode: the old one is unlinked.
        self.file = new_file;
        self.len = content.len() as u64;
        self.lines = self.records.len();
        self.next_seq = seq;
        if let Err(e) = sync_dir(&self.dir) {
            // The rename may not survive a crash, and appends to the new file would then vanish
            // with it.
            self.poisoned = true;
            return Err(e);
        }
        self.next_compact = self.compact_threshold();
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the signed file of patch `id` is kept.
    pub fn kept_patch_path(&self, id: &str) -> PathBuf {
        self.dir.join(PATCHES_DIR).join(format!("{id}.hpatch"))
    }

    /// Durably keeps the signed patch file of `id` beside the journal (before its intent is
    /// recorded, so every record that can be acted on has its file). Atomic: temp file, fsync,
    /// rename, fsync of the directory; never through a symlink.
    pub fn keep_patch(&mut self, id: &str, file: &[u8]) -> Result<(), JournalError> {
        validate_id(id).map_err(|reason| JournalError::InvalidRecord { reason })?;
        let dir = self.dir.join(PATCHES_DIR);
        match DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => sync_dir(&self.dir)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_err("create", &dir)(e)),
        }
        let meta = fs::symlink_metadata(&dir).map_err(io_err("inspect", &dir))?;
        check_private(&dir, &meta, true)?;
        let path = self.kept_patch_path(id);
        let tmp = dir.join(format!("{id}.hpatch.tmp"));
        let _ = fs::remove_file(&tmp);
        if let Err(e) = write_new_file(&tmp, file) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("rename kept patch onto", &path)(e));
        }
        sync_dir(&dir)
    }

    /// The kept signed file of patch `id`, or `None` when there is none. Refused (as the
    /// journal is) when another user could have planted or changed it; bounded to the format's
    /// largest file, so a planted huge file cannot exhaust memory.
    pub fn kept_patch(&self, id: &str) -> Result<Option<Vec<u8>>, JournalError> {
        validate_id(id).map_err(|reason| JournalError::InvalidRecord { reason })?;
        let path = self.kept_patch_path(id);
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(JournalError::Unsafe {
                    path,
                    reason: "is not a regular file (symlinks are not followed)",
                });
            }
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        check_private(
            &path,
            &file.metadata().map_err(io_err("inspect", &path))?,
            false,
        )?;
        let limit = patch_format::limits::MAX_FILE as u64;
        let mut data = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut data)
            .map_err(io_err("read", &path))?;
        if data.len() as u64 > limit {
            return Err(JournalError::Unsafe {
                path,
                reason: "is larger than any patch file can be",
            });
        }
        Ok(Some(data))
    }

    /// Forgets the kept file of a patch that can no longer be in the guest (reverted, or
    /// failed with nothing written). A file that cannot be removed only costs disk space.
    pub fn drop_patch(&mut self, id: &str) {
        if validate_id(id).is_err() {
            return;
        }
        let path = self.kept_patch_path(id);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove a kept patch file")
            }
        }
    }

    fn compact_threshold(&self) -> usize {
        self.compact_at.max(2 * self.records.len()).max(1)
    }
}

fn write_new_file(path: &Path, content: &[u8]) -> Result<File, JournalError> {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err("create", path))?;
    f.write_all(content).map_err(io_err("write", path))?;
    f.sync_all().map_err(io_err("sync", path))?;
    Ok(f)
}

/// Refuses a state dir (`dir = true`) or a file in it that another user could have planted or
/// could change: not owned by this process's user, writable by group or others, or not what it
/// should be (a symlink, a FIFO, a device...).
fn check_private(path: &Path, meta: &fs::Metadata, dir: bool) -> Result<(), JournalError> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let kind_ok = if dir {
        meta.file_type().is_dir()
    } else {
        meta.file_type().is_file()
    };
    let reason = if !kind_ok {
        Some(if dir {
            "is not a directory (symlinks are not followed)"
        } else {
            "is not a regular file (symlinks are not followed)"
        })
    } else if meta.uid() != euid {
        Some("is owned by another user")
    } else if meta.mode() & 0o022 != 0 {
        Some("is writable by group or others")
    } else {
        None
    };
    match reason {
        None => Ok(()),
        Some(reason) => Err(JournalError::Unsafe {
            path: path.to_path_buf(),
            reason,
        }),
    }
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("sync directory", dir))
}

fn lock_dir(dir: &Path) -> Result<File, JournalError> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)
        .map_err(io_err("open lock file", &path))?;
    check_private(
        &path,
        &f.metadata().map_err(io_err("inspect", &path))?,
        false,
    )?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut s = String::new();
            let holder = f
                .read_to_string(&mut s)
                .ok()
                .and_then(|_| s.trim().parse().ok());
            return Err(JournalError::Locked {
                dir: dir.to_path_buf(),
                holder,
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_err("lock", &path)(e)),
    }
    // The pid is only there to make the "in use" error useful; failing to write it must not stop
    // the VMM, and the lock itself is what enforces exclusion.
    let _ = f
        .set_len(0)
        .and_then(|()| f.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0));
    Ok(f)
}

fn validate(rec: &PatchRecord) -> Result<(), String> {
    validate_id(&rec.id)
}

/// Ids name files in the state dir: exactly 64 lowercase hex digits, nothing a path can hide in.
fn validate_id(id: &str) -> Result<(), String> {
    let ok = id.len() == 64
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("patch id {id:?} is not 64 lowercase hex digits"))
    }
}

fn crc(rec_json: &[u8]) -> String {
    hex::encode(&Sha256::digest(rec_json)[..4])
}

fn encode_line(seq: u64, rec: &PatchRecord) -> Result<Vec<u8>, JournalError> {
    let body = serde_json::to_vec(rec).map_err(|e| JournalError::InvalidRecord {
        reason: format!("cannot serialize record for {:?}: {e}", rec.id),
    })?;
    // Built by hand so `rec` is serialized once, for both the checksum and the line. serde_json
    // escapes control characters, so the body never contains a raw newline.
    let head = format!(
        "{{\"v\":{FORMAT_VERSION},\"seq\":{seq},\"crc\":\"{}\",\"rec\":",
        crc(&body)
    );
    let mut line = Vec::with_capacity(head.len() + body.len() + 2);
    line.extend_from_slice(head.as_bytes());
    line.extend_from_slice(&body);
    line.extend_from_slice(b"}\n");
    Ok(line)
}

struct Line {
    seq: u64,
    rec: PatchRecord,
}

enum LineError {
    /// Damage: dropped if it is the last line, fatal otherwise.
    Bad(String),
    /// A well-formed line from another format version: always fatal, never "repaired" away.
    Version(u64),
}

/// Replays the bytes of a journal file as [`Journal::open`] does, without a file: the
/// records it holds, or why it is corrupt. For the fuzzer and for offline inspection.
pub fn replay_bytes(data: &[u8]) -> Result<Vec<PatchRecord>, JournalError> {
    replay(Path::new("<bytes>"), data).map(|r| r.records)
}

/// Splits a v1 line into `seq`, `crc` and the raw bytes of `rec`, exactly as `encode_line`
/// writes it. The checksum is taken over those raw bytes rather than over a re-serialization, so
/// any changed byte in the record is caught (an added unknown field included) and verifying an
/// old file does not depend on this build's serde_json formatting byte-for-byte like the writer's.
fn split_v1(bytes: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    let rest = bytes.strip_prefix(b"{\"v\":1,\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    let seq = std::str::from_utf8(&rest[..digits]).ok()?.parse().ok()?;
    let rest = rest[digits..].strip_prefix(b",\"crc\":\"")?;
    let (crc, rest) = (rest.get(..8)?, rest.get(8..)?);
    let body = rest.strip_prefix(b"\",\"rec\":")?.strip_suffix(b"}")?;
    Some((seq, crc, body))
}

fn decode_line(bytes: &[u8]) -> Result<Line, LineError> {
    let Some((seq, stored_crc, body)) = split_v1(bytes) else {
        // Not a v1 line; say whether it is another version or just damage.
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| LineError::Bad(format!("not JSON: {e}")))?;
        return match value.get("v").and_then(serde_json::Value::as_u64) {
            Some(v) if v != FORMAT_VERSION => Err(LineError::Version(v)),
            _ => Err(LineError::Bad(
                "not a journal line of the form {\"v\":1,\"seq\":N,\"crc\":\"...\",\"rec\":{...}}"
                    .into(),
            )),
        };
    };
    let want = crc(body);
    if stored_crc != want.as_bytes() {
        return Err(LineError::Bad(format!(
            "checksum mismatch (line says {:?}, record hashes to {want:?})",
            String::from_utf8_lossy(stored_crc)
        )));
    }
    let rec: PatchRecord = serde_json::from_slice(body)
        .map_err(|e| LineError::Bad(format!("record does not parse: {e}")))?;
    validate(&rec).map_err(LineError::Bad)?;
    Ok(Line { seq, rec })
}

struct Replay {
    records: Vec<PatchRecord>,
    index: HashMap<String, usize>,
    lines: usize,
    last_seq: u64,
    good_len: u64,
    /// Why the last line was dropped, if it was.
    torn: Option<String>,
}

fn replay(path: &Path, data: &[u8]) -> Result<Replay, JournalError> {
    let mut r = Replay {
        records: Vec::new(),
        index: HashMap::new(),
        lines: 0,
        last_seq: 0,
        good_len: 0,
        torn: None,
    };
    let mut pos = 0usize;
    let mut line_no = 0usize;
    while pos < data.len() {
        line_no += 1;
        let Some(nl) = data[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| pos + i)
        else {
            r.torn = Some(format!(
                "line {line_no} is incomplete ({} bytes, no newline)",
                data.len() - pos
            ));
            break;
        };
        let is_last = nl + 1 == data.len();
        let line = match decode_line(&data[pos..nl]) {
            Ok(line) => line,
            Err(LineError::Version(version)) => {
                return Err(JournalError::UnsupportedVersion {
                    path: path.to_path_buf(),
                    line: line_no,
                    version,
                });
            }
            Err(LineError::Bad(reason)) if is_last => {
                r.torn = Some(format!("line {line_no}: {reason}"));
                break;
            }
            Err(LineError::Bad(reason)) => {
                return Err(JournalError::Corrupt {
                    path: path.to_path_buf(),
                    line: line_no,
                    reason,
                });
            }
        };
        // A checksummed line out of sequence is not a torn write but a spliced or edited file,
        // so it is fatal even at the end.
        if line.seq <= r.last_seq {
            return Err(JournalError::Corrupt {
                path: path.to_path_buf(),
                line: line_no,
                reason: format!(
                    "sequence number {} does not follow {} of the previous line",
                    line.seq, r.last_seq
                ),
            });
        }
        r.last_seq = line.seq;
        r.lines += 1;
        match r.index.get(&line.rec.id) {
            Some(&i) => r.records[i] = line.rec,
            None => {
                r.index.insert(line.rec.id.clone(), r.records.len());
                r.records.push(line.rec);
            }
        }
        pos = nl + 1;
        r.good_len = pos as u64;
    }
    Ok(r)
}

/// Byte strings as lowercase hex, so the journal stays readable with `jq`/`less`.
mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        hex::decode(&s).map_err(|e| D::Error::custom(format!("bad hex byte string: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path that does not exist yet (the journal creates it) inside a fresh temporary
    /// directory, which is removed with everything in it on drop.
    struct TempDir(PathBuf, #[allow(dead_code)] tempfile::TempDir);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let parent = tempfile::Builder::new()
                .prefix(&format!("vmm-journal-{tag}-"))
                .tempdir()
                .expect("temp dir");
            TempDir(parent.path().join("journal"), parent)
        }
    }

    fn id(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn rec(n: u8, state: PatchState) -> PatchRecord {
        PatchRecord {
            function_sites: 0,
            target: None,
            id: id(n),
            name: format!("patch-{n}"),
            state,
            sites: vec![SiteRecord {
                location: "do_thing+0x10".into(),
                gva: 0xffff_ffff_8100_0000 + u64::from(n),
                gpa: 0x100_0000 + u64::from(n),
                original: vec![0x55, 0x48, 0x89, 0xe5, 0x90],
                patched: vec![0xe9, 1, 2, 3, n],
            }],
            arena: vec![ArenaRecord {
                gpa: 0x200_0000,
                len: 4096,
            }],
            replaces: vec![],
            applied_at: Some(1_700_000_000),
            reverted_at: None,
            apply_blackout_us: Some(42),
            revert_blackout_us: None,
            moved_vcpus: 1,
            threads_checked: None,
            note: Some("line\nbreak and \"quotes\" — ünïcode".into()),
        }
    }

    fn file_lines(j: &Journal) -> Vec<String> {
        fs::read_to_string(j.path())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn a_state_dir_or_file_others_can_write_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = TempDir::new("open-dir");
        fs::create_dir_all(&d.0).unwrap();
        fs::set_permissions(&d.0, fs::Permissions::from_mode(0o777)).unwrap();
        let err = Journal::open(&d.0).unwrap_err();
        assert!(matches!(err, JournalError::Unsafe { .. }), "{err}");
        assert!(
            err.to_string().contains("writable by group or others"),
            "{err}"
        );
        // Made private, it opens; a journal file others can write is refused too.
        fs::set_permissions(&d.0, fs::Permissions::from_mode(0o700)).unwrap();
        drop(Journal::open(&d.0).unwrap());
        let path = d.0.join(JOURNAL_FILE);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666)).unwrap();
        assert!(matches!(
            Journal::open(&d.0),
            Err(JournalError::Unsafe { .. })
        ));
    }

    #[test]
    fn symlinks_in_the_state_dir_are_never_followed() {
        let d = TempDir::new("symlinks");
        let victim_dir = TempDir::new("victim");
        fs::create_dir_all(&victim_dir.0).unwrap();
        let victim = victim_dir.0.join("precious");
        fs::write(&victim, "keep me\n").unwrap();
        for name in [LOCK_FILE, JOURNAL_FILE] {
            let _ = fs::remove_dir_all(&d.0);
            DirBuilder::new().mode(0o700).create(&d.0).unwrap();
            std::os::unix::fs::symlink(&victim, d.0.join(name)).unwrap();
            let err = Journal::open(&d.0).unwrap_err();
            assert!(
                matches!(err, JournalError::Io { .. } | JournalError::Unsafe { .. }),
                "{name}: {err}"
            );
            assert_eq!(fs::read_to_string(&victim).unwrap(), "keep me\n", "{name}");
        }
        // The state dir itself as a symlink to a private directory is refused as well.
        let _ = fs::remove_dir_all(&d.0);
        std::os::unix::fs::symlink(&victim_dir.0, &d.0).unwrap();
        assert!(matches!(
            Journal::open(&d.0),
            Err(JournalError::Unsafe { .. })
        ));
        let _ = fs::remove_file(&d.0);
    }

    #[test]
    fn the_sequence_never_wraps() {
        let d = TempDir::new("seq-wrap");
        DirBuilder::new().mode(0o700).create(&d.0).unwrap();
        // A journal whose last line carries the largest sequence number.
        let line = encode_line(u64::MAX, &rec(1, PatchState::Applied)).unwrap();
        let path = d.0.join(JOURNAL_FILE);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(&line)
            .unwrap();
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(2, PatchState::Applied)).unwrap();
        j.put(rec(3, PatchState::Applied)).unwrap();
        drop(j);
        let (j, _) = Journal::open(&d.0).expect("reopen after the sequence ran out");
        assert_eq!(j.records().len(), 3);
    }

    #[test]
    fn round_trip_put_reopen() {
        let d = TempDir::new("roundtrip");
        let (mut j, rec0) = Journal::open(&d.0).unwrap();
        assert_eq!(rec0, Recovery::default());
        assert!(j.records().is_empty());
        assert!(j.path().ends_with(JOURNAL_FILE));

        let a = rec(1, PatchState::Applied);
        let mut b = rec(2, PatchState::Failed);
        b.sites.clear();
        b.note = None;
        j.put(a.clone()).unwrap();
        j.put(b.clone()).unwrap();
        assert_eq!(j.records(), &[a.clone(), b.clone()]);
        drop(j);

        let (j, r) = Journal::open(&d.0).unwrap();
        assert_eq!(r, Recovery::default());
        assert_eq!(j.records(), &[a.clone(), b]);
        assert_eq!(j.get(&id(1)), Some(&a));
        assert_eq!(j.get(&id(9)), None);

        let line = &file_lines(&j)[0];
        assert!(line.starts_with("{\"v\":1,\"seq\":1,\"crc\":\""), "{line}");
        assert!(line.contains("\"original\":\"554889e590\""), "{line}");
        assert!(line.contains("\"state\":\"applied\""), "{line}");
    }

    #[test]
    fn state_dir_and_files_are_private() {
        let d = TempDir::new("perms");
        let sd = d.0.join("nested/state");
        let (j, _) = Journal::open(&sd).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sd), 0o700);
        assert_eq!(mode(j.path()), 0o600);
        assert_eq!(mode(&sd.join(LOCK_FILE)), 0o600);
    }

    #[test]
    fn put_replaces_by_id_and_keeps_first_appearance_order() {
        let d = TempDir::new("replace");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applying)).unwrap();
        j.put(rec(2, PatchState::Applying)).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        let mut r2 = rec(2, PatchState::Failed);
        r2.note = Some("busy".into());
        j.put(r2.clone()).unwrap();
        j.put(rec(3, PatchState::Reverting)).unwrap();

        let want = vec![
            rec(1, PatchState::Applied),
            r2,
            rec(3, PatchState::Reverting),
        ];
        assert_eq!(j.records(), want.as_slice());
        assert_eq!(file_lines(&j).len(), 5);
        drop(j);

        let (j, r) = Journal::open(&d.0).unwrap();
        assert_eq!(j.records(), want.as_slice());
        assert!(!r.torn_tail);
        assert_eq!(r.interrupted, vec![id(3)]);
    }

    #[test]
    fn interrupted_lists_applying_and_reverting() {
        let d = TempDir::new("interrupted");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applying)).unwrap();
        j.put(rec(2, PatchState::Applied)).unwrap();
        j.put(rec(3, PatchState::Reverting)).unwrap();
        j.put(rec(4, PatchState::Reverted)).unwrap();
        drop(j);
        let (_, r) = Journal::open(&d.0).unwrap();
        assert_eq!(r.interrupted, vec![id(1), id(3)]);
    }

    #[test]
    fn read_only_reads_while_locked_and_writes_nothing() {
        let d = TempDir::new("read-only");
        let missing = d.0.join("never-created");
        assert_eq!(Journal::read_only(&missing).unwrap(), Vec::new());
        assert!(!missing.exists(), "read_only created the state dir");

        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        j.put(rec(2, PatchState::Applying)).unwrap();
        let path = j.path().to_path_buf();
        // Half a line, as a crash would leave it; the writer still holds the lock.
        let half = encode_line(3, &rec(2, PatchState::Applied)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&half[..half.len() / 2]).unwrap();
        drop(f);
        let before = fs::read(&path).unwrap();

        let got = Journal::read_only(&d.0).unwrap();
        assert_eq!(
            got,
            vec![rec(1, PatchState::Applied), rec(2, PatchState::Applying)]
        );
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "read_only changed the journal"
        );
        drop(j);
    }

    #[test]
    fn torn_tail_is_dropped_truncated_and_appends_continue() {
        let d = TempDir::new("torn");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        j.put(rec(2, PatchState::Applying)).unwrap();
        let path = j.path().to_path_buf();
        drop(j);
        let good = fs::read(&path).unwrap();

        // Half of a real next line, as a crash mid-write would leave it.
        let half = encode_line(3, &rec(2, PatchState::Applied)).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&half[..half.len() / 2]).unwrap();
        drop(f);

        let (mut j, r) = Journal::open(&d.0).unwrap();
        assert!(r.torn_tail);
        assert_eq!(r.interrupted, vec![id(2)]);
        assert_eq!(
            fs::read(&path).unwrap(),
            good,
            "file truncated to last good line"
        );
        assert_eq!(j.get(&id(2)).unwrap().state, PatchState::Applying);

        j.put(rec(2, PatchState::Applied)).unwrap();
        j.put(rec(3, PatchState::Applied)).unwrap();
        drop(j);
        let (j, r) = Journal::open(&d.0).unwrap();
        assert_eq!(r, Recovery::default());
        assert_eq!(
            j.records(),
            &[
                rec(1, PatchState::Applied),
                rec(2, PatchState::Applied),
                rec(3, PatchState::Applied)
            ]
        );
    }

    #[test]
    fn damaged_complete_last_line_is_dropped() {
        let d = TempDir::new("badlast");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        let path = j.path().to_path_buf();
        drop(j);
        let good = fs::read(&path).unwrap();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"\0\0\0\0\0\0\n").unwrap();
        drop(f);

        let (j, r) = Journal::open(&d.0).unwrap();
        assert!(r.torn_tail);
        assert_eq!(j.records(), &[rec(1, PatchState::Applied)]);
        assert_eq!(fs::read(&path).unwrap(), good);
    }

    #[test]
    fn corrupt_middle_line_is_an_error_naming_file_and_line() {
        let d = TempDir::new("corrupt");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        j.put(rec(2, PatchState::Applied)).unwrap();
        j.put(rec(3, PatchState::Applied)).unwrap();
        let path = j.path().to_path_buf();
        let mut lines = file_lines(&j);
        drop(j);
        lines[1] = "{\"v\":1,\"seq\":2,garbage".into();
        fs::write(&path, lines.join("\n") + "\n").unwrap();
        let before = fs::read(&path).unwrap();

        let err = Journal::open(&d.0).unwrap_err();
        match &err {
            JournalError::Corrupt { line, .. } => assert_eq!(*line, 2),
            e => panic!("wrong error {e:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains("line 2"), "{msg}");
        assert!(msg.contains("move it aside"), "{msg}");
        assert_eq!(
            fs::read(&path).unwrap(),
            before,
            "a corrupt journal is not modified"
        );
    }

    #[test]
    fn bad_crc_is_detected() {
        let d = TempDir::new("crc");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        j.put(rec(2, PatchState::Applied)).unwrap();
        let path = j.path().to_path_buf();
        let mut lines = file_lines(&j);
        drop(j);
        // Valid JSON, valid record, but one byte of undo data altered.
        assert!(lines[0].contains("554889e590"));
        lines[0] = lines[0].replace("554889e590", "554889e591");
        fs::write(&path, lines.join("\n") + "\n").unwrap();

        let err = Journal::open(&d.0).unwrap_err();
        match &err {
            JournalError::Corrupt {
                line: 1, reason, ..
            } => {
                assert!(reason.contains("checksum"), "{reason}")
            }
            e => panic!("wrong error {e:?}"),
        }

        // The same damage on the last line counts as a torn tail.
        lines[0] = lines[0].replace("554889e591", "554889e590");
        lines[1] = lines[1].replace("554889e590", "554889e591");
        fs::write(&path, lines.join("\n") + "\n").unwrap();
        let (j, r) = Journal::open(&d.0).unwrap();
        assert!(r.torn_tail);
        assert_eq!(j.records(), &[rec(1, PatchState::Applied)]);
    }

    #[test]
    fn unknown_field_breaks_crc() {
        let d = TempDir::new("unknown");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        j.put(rec(2, PatchState::Applied)).unwrap();
        let path = j.path().to_path_buf();
        let mut lines = file_lines(&j);
        drop(j);
        lines[0] = lines[0].replace("\"rec\":{", "\"rec\":{\"extra\":1,");
        fs::write(&path, lines.join("\n") + "\n").unwrap();
        assert!(matches!(
            Journal::open(&d.0),
            Err(JournalError::Corrupt { line: 1, .. })
        ));
    }

    #[test]
    fn newer_version_is_a_clear_error_even_on_last_line() {
        let d = TempDir::new("version");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        let path = j.path().to_path_buf();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"v\":2,\"seq\":2,\"whatever\":{}}\n")
            .unwrap();
        drop(f);
        let err = Journal::open(&d.0).unwrap_err();
        assert!(
            matches!(
                err,
                JournalError::UnsupportedVersion {
                    line: 2,
                    version: 2,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("newer vmm"), "{err}");
    }

    #[test]
    fn out_of_order_seq_is_corrupt() {
        let d = TempDir::new("seq");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        let path = j.path().to_path_buf();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&encode_line(1, &rec(2, PatchState::Applied)).unwrap())
            .unwrap();
        drop(f);
        assert!(matches!(
            Journal::open(&d.0),
            Err(JournalError::Corrupt { line: 2, .. })
        ));
    }

    #[test]
    fn put_rejects_bad_id() {
        let d = TempDir::new("badid");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        let mut r = rec(0xab, PatchState::Applied);
        r.id = r.id.to_uppercase();
        assert!(matches!(j.put(r), Err(JournalError::InvalidRecord { .. })));
        assert!(j.records().is_empty());
        assert_eq!(fs::metadata(j.path()).unwrap().len(), 0);
    }

    #[test]
    fn compaction_keeps_state_and_shrinks_file() {
        let d = TempDir::new("compact");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        for round in 0..20 {
            for n in 1..=3 {
                let state = if round % 2 == 0 {
                    PatchState::Applying
                } else {
                    PatchState::Applied
                };
                j.put(rec(n, state)).unwrap();
            }
        }
        j.put(rec(4, PatchState::Reverting)).unwrap();
        let before_state = j.records().to_vec();
        let before_len = fs::metadata(j.path()).unwrap().len();
        assert_eq!(j.lines, 61);

        j.compact().unwrap();
        assert_eq!(j.records(), before_state.as_slice());
        let after_len = fs::metadata(j.path()).unwrap().len();
        assert!(after_len * 10 < before_len, "{after_len} vs {before_len}");
        assert_eq!(file_lines(&j).len(), 4);
        assert!(!d.0.join(TMP_FILE).exists());

        // Appends after compaction land in the new file and survive a reopen.
        j.put(rec(5, PatchState::Applied)).unwrap();
        let mut want = before_state.clone();
        want.push(rec(5, PatchState::Applied));
        drop(j);
        let (j, r) = Journal::open(&d.0).unwrap();
        assert_eq!(j.records(), want.as_slice());
        assert_eq!(r.interrupted, vec![id(4)]);
        assert!(!r.torn_tail);
    }

    #[test]
    fn put_compacts_automatically_past_threshold() {
        let d = TempDir::new("autocompact");
        let (mut j, _) = Journal::open_with(&d.0, 8).unwrap();
        for i in 0..30u8 {
            j.put(rec(i % 2, PatchState::Applied)).unwrap();
            assert!(j.lines < 8, "lines {} after put {i}", j.lines);
        }
        assert_eq!(file_lines(&j).len(), j.lines);
        drop(j);
        let (j, _) = Journal::open(&d.0).unwrap();
        assert_eq!(
            j.records(),
            &[rec(0, PatchState::Applied), rec(1, PatchState::Applied)]
        );
    }

    #[test]
    fn open_compacts_many_superseded_records() {
        let d = TempDir::new("opencompact");
        // A large threshold so puts do not compact; open should.
        let (mut j, _) = Journal::open_with(&d.0, usize::MAX).unwrap();
        let mut r = rec(7, PatchState::Applied);
        for i in 0..OPEN_COMPACT_MIN_SUPERSEDED as u64 + 1 {
            r.applied_at = Some(i);
            j.put(r.clone()).unwrap();
        }
        drop(j);
        let (j, _) = Journal::open(&d.0).unwrap();
        assert_eq!(j.records(), &[r]);
        assert_eq!(file_lines(&j).len(), 1);
    }

    #[test]
    fn stale_compaction_temp_file_is_discarded() {
        let d = TempDir::new("staletmp");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        j.put(rec(1, PatchState::Applied)).unwrap();
        drop(j);
        fs::write(d.0.join(TMP_FILE), b"half a compaction").unwrap();
        let (j, r) = Journal::open(&d.0).unwrap();
        assert_eq!(r, Recovery::default());
        assert_eq!(j.records(), &[rec(1, PatchState::Applied)]);
        assert!(!d.0.join(TMP_FILE).exists());
    }

    #[test]
    fn second_open_of_same_state_dir_fails_while_locked() {
        let d = TempDir::new("lock");
        let (mut j, _) = Journal::open(&d.0).unwrap();
        let err = Journal::open(&d.0).unwrap_err();
        match &err {
            JournalError::Locked { holder, .. } => assert_eq!(*holder, Some(std::process::id())),
            e => panic!("wrong error {e:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains("in use by another vmm process"), "{msg}");
        assert!(msg.contains(&d.0.display().to_string()), "{msg}");

        // The lock follows the state dir across compaction (which replaces the journal inode).
        j.put(rec(1, PatchState::Applied)).unwrap();
        j.compact().unwrap();
        assert!(matches!(
            Journal::open(&d.0),
            Err(JournalError::Locked { .. })
        ));

        drop(j);
        let (j, _) = Journal::open(&d.0).unwrap();
        assert_eq!(j.records().len(), 1);
    }

    #[test]
    fn io_errors_say_what_to_do() {
        let d = TempDir::new("io");
        fs::create_dir_all(&d.0).unwrap();
        let file = d.0.join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let err = Journal::open(&file).unwrap_err();
        assert!(matches!(err, JournalError::Io { .. }), "{err:?}");
        assert!(err.to_string().contains("--state-dir"), "{err}");
    }
}
