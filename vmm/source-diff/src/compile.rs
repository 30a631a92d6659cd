//! Compiling the units a fix touches, before and after the fix, with the kernel's own build
//! (kbuild: the same flags, objtool as in the real build) plus `-ffunction-sections
//! -fdata-sections`, so every function and variable can be compared on its own.
//!
//! The tree is shared by every build from the cache, so a build holds an exclusive lock on
//! it for its whole length, and puts every file the fix changes back byte for byte before
//! releasing it, also when compiling fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use crate::tree::{SourceTree, tail};

#[derive(Debug, Error)]
pub enum CompileError {
    #[error(
        "the diff does not apply to {tree}: {detail}; it was made against another version of \
         the source (the running kernel's is {tree})"
    )]
    DoesNotApply { tree: String, detail: String },
    #[error("compiling {unit} {when} the fix failed: {detail}")]
    Failed {
        unit: String,
        when: &'static str,
        detail: String,
    },
    #[error(
        "{unit} is built as part of a module in this kernel's configuration (kbuild compiles \
         it with -DMODULE); module patching is a later step: only code built into vmlinux \
         can be patched today"
    )]
    Module { unit: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CompileError + '_ {
    move |source| CompileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Both builds of one unit.
#[derive(Debug, Clone)]
pub struct UnitObjects {
    /// `fs/proc/base.c`.
    pub unit: String,
    pub pre: Vec<u8>,
    pub post: Vec<u8>,
}

/// The flags added to the kernel's for the diff.
pub const DIFF_CFLAGS: &str = "-ffunction-sections -fdata-sections";

/// Holds the tree's lock; on drop, puts back every saved file.
struct Session<'t> {
    tree: &'t SourceTree,
    _lock: File,
    saved: Vec<(PathBuf, Vec<u8>)>,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        for (path, bytes) in &self.saved {
            if let Err(e) = std::fs::write(path, bytes) {
                tracing::error!(path = %path.display(), error = %e, "could not restore a source file; the tree at {} needs `patch -R`", self.tree.dir.display());
            }
        }
    }
}

/// Compiles every unit in `units` (paths of `.c` files relative to the tree) before and
/// after applying the unified diff at `diff_file`.
pub fn compile_both(
    tree: &SourceTree,
    diff_file: &Path,
    touched_files: &[String],
    units: &[String],
) -> Result<Vec<UnitObjects>, CompileError> {
    let lock_path = tree.dir.join(".hotpatch-lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    let mut session = Session {
        tree,
        _lock: lock,
        saved: Vec::new(),
    };
    let mut pre = Vec::new();
    for u in units {
        pre.push(compile(tree, u, "before")?);
    }
    // Apply: check first so a diff that does not apply leaves nothing half-done.
    let patch = |extra: &[&str]| {
        Command::new("patch")
            .args([
                "-p1",
                "--forward",
                "--batch",
                "--no-backup-if-mismatch",
                "-r",
                "-",
            ])
            .args(extra)
            .arg("-i")
            .arg(diff_file)
            .current_dir(&tree.dir)
            .output()
    };
    let dry = patch(&["--dry-run"]).map_err(io(&tree.dir))?;
    if !dry.status.success() {
        return Err(CompileError::DoesNotApply {
            tree: tree.describe.clone(),
            detail: tail(&String::from_utf8_lossy(&dry.stdout)),
        });
    }
    for f in touched_files {
        let p = tree.dir.join(f);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        session.saved.push((p, bytes));
    }
    let applied = patch(&[]).map_err(io(&tree.dir))?;
    if !applied.status.success() {
        return Err(CompileError::DoesNotApply {
            tree: tree.describe.clone(),
            detail: tail(&String::from_utf8_lossy(&applied.stdout)),
        });
    }
    let mut out = Vec::new();
    for (u, pre) in units.iter().zip(pre) {
        let post = compile(tree, u, "after")?;
        out.push(UnitObjects {
            unit: u.clone(),
            pre,
            post,
        });
    }
    drop(session);
    // The tree's objects are now the post-fix ones: remove them, so nothing mistakes them
    // for the source's.
    for u in units {
        let _ = std::fs::remove_file(tree.dir.join(object_path(u)));
    }
    Ok(out)
}

fn object_path(unit: &str) -> String {
    format!("{}.o", unit.strip_suffix(".c").unwrap_or(unit))
}

/// `make <unit>.o` with the diff's flags; the object's bytes.
fn compile(tree: &SourceTree, unit: &str, when: &'static str) -> Result<Vec<u8>, CompileError> {
    let obj = object_path(unit);
    let obj_path = tree.dir.join(&obj);
    let _ = std::fs::remove_file(&obj_path);
    let started = std::time::Instant::now();
    let out = Command::new("make")
        .arg("-s")
        .arg(format!("CC={}", tree.cc))
        .arg(format!("KCFLAGS={DIFF_CFLAGS}"))
        .arg(&obj)
        .current_dir(&tree.dir)
        .output()
        .map_err(io(&tree.dir))?;
    if !out.status.success() {
        return Err(CompileError::Failed {
            unit: unit.to_string(),
            when,
            detail: tail(&String::from_utf8_lossy(&out.stderr)),
        });
    }
    tracing::info!(
        unit,
        when,
        ms = started.elapsed().as_millis() as u64,
        "compiled"
    );
    let (dir, file) = match obj.rsplit_once('/') {
        Some((d, f)) => (d.to_string(), f.to_string()),
        None => (String::new(), obj.clone()),
    };
    let cmd = tree.dir.join(&dir).join(format!(".{file}.cmd"));
    if let Ok(text) = std::fs::read_to_string(&cmd)
        && text
            .lines()
            .next()
            .is_some_and(|l| l.contains(" -DMODULE "))
    {
        return Err(CompileError::Module {
            unit: unit.to_string(),
        });
    }
    std::fs::read(&obj_path).map_err(io(&obj_path))
}
