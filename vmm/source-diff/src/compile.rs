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
    #[error("{}", path.display())]
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
    /// Before the fix, as the kernel was built ([`KERNEL_LAYOUT_CFLAGS`]): what the run-pre
    /// check compares with the running kernel.
    pub pre: Vec<u8>,
    /// Before the fix, built as `post` is ([`DIFF_CFLAGS`], and [`WARN_REWRITE`] when
    /// `warn_rewritten`): the baseline of the comparison.
    pub base: Vec<u8>,
    /// After the fix.
    pub post: Vec<u8>,
    /// `base` and `post` were built with `WARN()` as a call (see [`WARN_REWRITE`]).
    pub warn_rewritten: bool,
    /// With the rewrite, when it changed which functions GCC keeps out of line: `base` and
    /// `post` without it, for the builder to fall back on (`build::build_from_objects`).
    pub plain: Option<(Vec<u8>, Vec<u8>)>,
    /// GCC's interprocedural register allocation was on for the unit (no `-pg`): callers in
    /// it may rely on a callee's actual clobbers ([`crate::clobbers`]).
    pub ipa_ra: bool,
}

/// The flags added to the kernel's for the diff.
pub const DIFF_CFLAGS: &str = "-ffunction-sections -fdata-sections";

/// The flags added for the build compared with the running kernel: functions in sections of
/// their own (their code is the same as without), data laid out as in the kernel's own build
/// (one `.data`, one `.bss` per unit), which is how a file-local variable is told apart from
/// others of its name (`link::Linker::kernel_name`).
pub const KERNEL_LAYOUT_CFLAGS: &str = "-ffunction-sections";

/// The architecture's `BUG()`/`WARN()` header, rewritten for patch code: the kernel finds a
/// `WARN()`'s bug-table entry by the address of its `ud2` in its own text or a module's, never
/// in the arena, so there a `ud2` would oops instead of warning. With these definitions, put
/// before the header includes the generic one, a `WARN()` calls `__warn()` (what the kernel's
/// `report_bug()` calls for a warning: the message with file, line and address, a stack dump,
/// the taint; `WARN_ONCE`-style warnings are rate-limited by the global printk limit instead
/// of once, which would need a variable), and `BUG()` is a bare `ud2` (an oops, as `BUG()` is,
/// reported as an invalid opcode).
pub const WARN_REWRITE: &str = r#"
/* vmm source-diff: WARN() and BUG() for live patch code (docs/source-patches.md). */
extern int __printk_ratelimit(const char *func);
#undef BUG
#define BUG()								\
do {									\
	instrumentation_begin();					\
	asm volatile(ASM_UD2);						\
	__builtin_unreachable();					\
} while (0)
#undef __WARN_FLAGS
#define __WARN_FLAGS(flags)						\
do {									\
	unsigned long __hp_ip;						\
	instrumentation_begin();					\
	asm volatile("lea 0(%%rip), %0" : "=r" (__hp_ip));		\
	if (!((flags) & BUGFLAG_ONCE) || __printk_ratelimit(__FILE__))	\
		__warn(__FILE__, __LINE__, (void *)__hp_ip,		\
		       (unsigned int)((BUGFLAG_WARNING | (flags)) >> 8),	\
		       NULL, NULL);					\
	instrumentation_end();						\
} while (0)
"#;

/// The header [`WARN_REWRITE`] goes into, and the line it goes before.
const BUG_HEADER: &str = "arch/x86/include/asm/bug.h";
const BUG_HEADER_ANCHOR: &str = "#include <asm-generic/bug.h>";

/// The architecture's static-branch header, and the jumps its `asm goto` emits. The assembler
/// picks `jmp rel8` where the target is near, and objtool turns an initially-off site into a
/// 2-byte NOP: too short for the 5-byte jump to a stub that tests the key, which is how patch
/// code keeps its jump labels (`link::Linker::jump_labels`). For patch code (the comparison's
/// builds, never the one compared with the running kernel) the jumps are forced to 32-bit
/// displacements with `jmp.d32`. The templates keep their lines, and GCC sizes an `asm` by its
/// lines when deciding what to inline, so the rewrite cannot change the unit's inlining.
const JUMP_LABEL_HEADER: &str = "arch/x86/include/asm/jump_label.h";
const JUMP_LABEL_REWRITES: [(&str, &str); 2] = [
    (
        "\"jmp %l[l_yes] # objtool NOPs this \\n\\t\"",
        "\"jmp.d32 %l[l_yes] # objtool NOPs this \\n\\t\"",
    ),
    ("\"jmp %l[l_yes]\\n\\t\"", "\"jmp.d32 %l[l_yes]\\n\\t\""),
];

/// The static-branch header with [`JUMP_LABEL_REWRITES`] made, if it has every one of them.
fn rewrite_jump_labels(header: &str) -> Option<String> {
    let mut text = header.to_string();
    for (from, to) in JUMP_LABEL_REWRITES {
        if !text.contains(from) {
            return None;
        }
        text = text.replace(from, to);
    }
    Some(text)
}

/// Holds the tree's lock; on drop, puts back every saved file.
struct Session<'t> {
    tree: &'t SourceTree,
    _lock: File,
    /// Each saved file: its bytes and modification time.
    saved: Vec<(PathBuf, Vec<u8>, std::time::SystemTime)>,
}

impl Session<'_> {
    /// Saves `rel` (once) so that drop restores it.
    fn save(&mut self, rel: &str) -> Result<(Vec<u8>, std::time::SystemTime), CompileError> {
        let p = self.tree.dir.join(rel);
        let bytes = std::fs::read(&p).map_err(io(&p))?;
        let mtime = std::fs::metadata(&p)
            .and_then(|m| m.modified())
            .map_err(io(&p))?;
        if !self.saved.iter().any(|(q, _, _)| *q == p) {
            // Kept in the tree too, before anything is changed: a build killed before it
            // restores leaves them for the next build to put back ([`recover`]).
            let keep = self.tree.dir.join(SAVED_DIR).join(rel);
            if let Some(parent) = keep.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            write_with_mtime(&keep, &bytes, mtime)?;
            self.saved.push((p, bytes.clone(), mtime));
        }
        Ok((bytes, mtime))
    }

    fn restore(&mut self, rel: &str) -> Result<(), CompileError> {
        let p = self.tree.dir.join(rel);
        if let Some((_, bytes, mtime)) = self.saved.iter().find(|(q, _, _)| *q == p) {
            write_with_mtime(&p, bytes, *mtime)?;
        }
        Ok(())
    }
}

/// Overwrites `path` and sets its modification time to `mtime`: a header rewritten for one
/// unit's compile must not make kbuild rebuild its `prepare` outputs (which depend on every
/// header) with the rewrite, and a restored file is the tree's file exactly, time included; the
/// unit itself is always rebuilt (its object is removed first).
fn write_with_mtime(
    path: &Path,
    bytes: &[u8],
    mtime: std::time::SystemTime,
) -> Result<(), CompileError> {
    std::fs::write(path, bytes).map_err(io(path))?;
    let f = File::options().write(true).open(path).map_err(io(path))?;
    f.set_modified(mtime).map_err(io(path))?;
    Ok(())
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let mut all = true;
        for (path, bytes, mtime) in &self.saved {
            if let Err(e) = write_with_mtime(path, bytes, *mtime) {
                all = false;
                tracing::error!(path = %path.display(), error = %e, "could not restore a source file; the next build of this tree restores it from {SAVED_DIR}");
            }
        }
        if all {
            let _ = std::fs::remove_dir_all(self.tree.dir.join(SAVED_DIR));
        }
    }
}

/// Where a build keeps the originals of the files it changes, inside the tree.
const SAVED_DIR: &str = ".hotpatch-saved";

/// Puts back the files an interrupted build left changed (killed between changing and
/// restoring them), from the originals it kept; the tree lock is held.
fn recover(tree: &SourceTree) -> Result<(), CompileError> {
    let saved = tree.dir.join(SAVED_DIR);
    if !saved.is_dir() {
        return Ok(());
    }
    let mut stack = vec![saved.clone()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).map_err(io(&dir))? {
            let path = e.map_err(io(&dir))?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let Ok(rel) = path.strip_prefix(&saved) else {
                continue;
            };
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let mtime = std::fs::metadata(&path)
                .and_then(|m| m.modified())
                .map_err(io(&path))?;
            let target = tree.dir.join(rel);
            tracing::warn!(file = %rel.display(), "restoring a file an interrupted build left changed");
            write_with_mtime(&target, &bytes, mtime)?;
        }
    }
    std::fs::remove_dir_all(&saved).map_err(io(&saved))
}

/// Puts back what an interrupted build left changed in `tree`, under the tree's lock: for a
/// caller that reads the tree's files before its first build (a comparison of two trees).
pub fn recover_tree(tree: &SourceTree) -> Result<(), CompileError> {
    let lock_path = tree.dir.join(".hotpatch-lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    recover(tree)
}

/// The defined function and variable names of an object, to compare two builds' inlining
/// and their static locals' numbering (GCC numbers `name.N` across the unit: a rewrite that
/// added one would shift the names the kernel's copies go by).
fn function_names(obj: &[u8]) -> Option<std::collections::BTreeSet<String>> {
    let u = crate::elf::Unit::parse(obj).ok()?;
    Some(
        u.functions()
            .chain(u.objects())
            .map(|(_, s)| s.name.clone())
            .collect(),
    )
}

/// Compiles every unit in `units` (paths of `.c` files relative to the tree) before and
/// after applying the unified diff at `diff_file`: before as the kernel was built, then
/// before and after with [`WARN_REWRITE`]. When the rewrite changes which functions GCC keeps
/// out of line in a unit (its inlining), the unit is also compiled before and after without
/// it ([`UnitObjects::plain`]).
pub fn compile_both(
    tree: &SourceTree,
    diff_file: &Path,
    touched_files: &[String],
    units: &[String],
) -> Result<Vec<UnitObjects>, CompileError> {
    let lock_path = tree.dir.join(".hotpatch-lock");
    let lock = File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    recover(tree)?;
    let mut session = Session {
        tree,
        _lock: lock,
        saved: Vec::new(),
    };
    // Check that the diff applies before anything else: one that does not is refused at
    // once, and leaves nothing half-done.
    let patch = |extra: &[&str]| {
        // No fuzz: every context line must be the tree's, or the fix was made against other
        // code than the running kernel's.
        Command::new("patch")
            .args([
                "-p1",
                "--forward",
                "--batch",
                "--fuzz=0",
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
    let all = vec![true; units.len()];
    let pre: Vec<Vec<u8>> = compile_some(tree, units, &all, "before", KERNEL_LAYOUT_CFLAGS)?
        .into_iter()
        .flatten()
        .collect();
    let ipa: Vec<bool> = units
        .iter()
        .map(|u| ipa_ra(command_line(tree, u).as_deref()))
        .collect();
    // Every later build is patch code's: 5-byte jump labels from here on (put back on drop).
    if let Ok((h, mtime)) = session.save(JUMP_LABEL_HEADER)
        && let Some(r) = rewrite_jump_labels(&String::from_utf8_lossy(&h))
    {
        write_with_mtime(&tree.dir.join(JUMP_LABEL_HEADER), r.as_bytes(), mtime)?;
    }
    // The WARN rewrite, when the header has the expected shape.
    let header = session.save(BUG_HEADER).ok();
    let rewritten = header.as_ref().and_then(|(h, mtime)| {
        let text = String::from_utf8_lossy(h);
        let at = text.find(BUG_HEADER_ANCHOR)?;
        Some((
            format!("{}{WARN_REWRITE}\n{}", &text[..at], &text[at..]),
            *mtime,
        ))
    });
    // Before the fix, with the rewrite, and whether GCC kept the same functions out of line.
    let mut base: Vec<Option<(Vec<u8>, bool)>> = Vec::new();
    if let Some((r, mtime)) = &rewritten {
        let p = tree.dir.join(BUG_HEADER);
        write_with_mtime(&p, r.as_bytes(), *mtime)?;
        let built = compile_some(tree, units, &all, "before (WARN rewritten)", DIFF_CFLAGS)?;
        for (plain, b) in pre.iter().zip(built) {
            base.push(b.map(|b| {
                let same_inlining =
                    function_names(plain).is_some() && function_names(plain) == function_names(&b);
                (b, same_inlining)
            }));
        }
    } else {
        base.resize(units.len(), None);
    }
    for f in touched_files {
        session.save(f)?;
    }
    let applied = patch(&[]).map_err(io(&tree.dir))?;
    if !applied.status.success() {
        return Err(CompileError::DoesNotApply {
            tree: tree.describe.clone(),
            detail: tail(&String::from_utf8_lossy(&applied.stdout)),
        });
    }
    let rewritten_units: Vec<bool> = base.iter().map(Option::is_some).collect();
    let post_rewritten = compile_some(
        tree,
        units,
        &rewritten_units,
        "after (WARN rewritten)",
        DIFF_CFLAGS,
    )?;
    session.restore(BUG_HEADER)?;
    // Without the rewrite too, where it is missing or changed the unit's inlining: after the
    // fix, then before it (the fix's files put back for that).
    let needs_plain: Vec<bool> = base
        .iter()
        .map(|b| b.as_ref().is_none_or(|(_, same)| !same))
        .collect();
    let plain_post = compile_some(tree, units, &needs_plain, "after", DIFF_CFLAGS)?;
    let mut plain_base = vec![None; units.len()];
    if needs_plain.iter().any(|n| *n) {
        for f in touched_files {
            session.restore(f)?;
        }
        plain_base = compile_some(tree, units, &needs_plain, "before", DIFF_CFLAGS)?;
    }
    let mut out = Vec::new();
    for ((((((u, pre), base), post_w), plain_post), plain_base), ipa_ra) in units
        .iter()
        .zip(pre)
        .zip(base)
        .zip(post_rewritten)
        .zip(plain_post)
        .zip(plain_base)
        .zip(ipa)
    {
        let plain = plain_base.zip(plain_post);
        out.push(match (base, post_w, plain) {
            (Some((base, _)), Some(post), plain) => UnitObjects {
                unit: u.clone(),
                pre,
                base,
                post,
                warn_rewritten: true,
                plain,
                ipa_ra,
            },
            (_, _, Some((base, post))) => UnitObjects {
                unit: u.clone(),
                pre,
                base,
                post,
                warn_rewritten: false,
                plain: None,
                ipa_ra,
            },
            _ => {
                return Err(CompileError::Failed {
                    unit: u.clone(),
                    when: "after",
                    detail: "no build without the WARN rewrite was made (a bug of the builder)"
                        .into(),
                });
            }
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

/// `make -jN <unit>.o …` with the diff's flags for the `units` marked in `which`, in one kbuild
/// run (the tree's own parallelism); each marked unit's object bytes, `None` for the others.
/// The first unit that did not compile is the error; a unit kbuild built as part of a module
/// is refused.
fn compile_some(
    tree: &SourceTree,
    units: &[String],
    which: &[bool],
    when: &'static str,
    cflags: &str,
) -> Result<Vec<Option<Vec<u8>>>, CompileError> {
    let chosen: Vec<&String> = units
        .iter()
        .zip(which)
        .filter(|(_, w)| **w)
        .map(|(u, _)| u)
        .collect();
    if chosen.is_empty() {
        return Ok(vec![None; units.len()]);
    }
    let objs: Vec<String> = chosen.iter().map(|u| object_path(u)).collect();
    for o in &objs {
        let _ = std::fs::remove_file(tree.dir.join(o));
    }
    let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
    let started = std::time::Instant::now();
    let out = Command::new("make")
        .args(["-s", "-k", &format!("-j{jobs}")])
        .arg(format!("CC={}", tree.cc))
        .arg(format!("KCFLAGS={cflags}"))
        .args(&objs)
        .current_dir(&tree.dir)
        .output()
        .map_err(io(&tree.dir))?;
    tracing::info!(
        units = chosen.len(),
        when,
        ms = started.elapsed().as_millis() as u64,
        "compiled"
    );
    // A failure first (the unit whose object is missing, else all of them), then modules.
    let failed = |unit: String| CompileError::Failed {
        unit,
        when,
        detail: tail(&String::from_utf8_lossy(&out.stderr)),
    };
    if let Some(u) = chosen
        .iter()
        .find(|u| !tree.dir.join(object_path(u)).is_file())
    {
        return Err(failed(u.to_string()));
    }
    if !out.status.success() {
        let all: Vec<&str> = chosen.iter().map(|u| u.as_str()).collect();
        return Err(failed(all.join(", ")));
    }
    let mut result = Vec::with_capacity(units.len());
    for (u, w) in units.iter().zip(which) {
        if !*w {
            result.push(None);
            continue;
        }
        if command_line(tree, u).is_some_and(|l| l.contains(" -DMODULE ")) {
            return Err(CompileError::Module { unit: u.clone() });
        }
        let obj_path = tree.dir.join(object_path(u));
        result.push(Some(std::fs::read(&obj_path).map_err(io(&obj_path))?));
    }
    Ok(result)
}

/// The compiler command kbuild last used for `unit` (the first line of its `.o.cmd` file).
fn command_line(tree: &SourceTree, unit: &str) -> Option<String> {
    let obj = object_path(unit);
    let (dir, file) = obj.rsplit_once('/').unwrap_or(("", &obj));
    let cmd = tree.dir.join(dir).join(format!(".{file}.cmd"));
    let text = std::fs::read_to_string(cmd).ok()?;
    text.lines().next().map(str::to_string)
}

/// Whether GCC's interprocedural register allocation was on for a unit compiled with this
/// command: `-O2` turns it on, profiling (`-pg`, ftrace's `__fentry__` calls) turns it off for
/// the whole unit, `notrace` functions included (GCC's `process_options`; checked with gcc 12).
/// Unknown counts as on, the safe side for the check that depends on it.
fn ipa_ra(command: Option<&str>) -> bool {
    command.is_none_or(|l| !l.contains(" -pg ") && !l.contains(" -fno-ipa-ra "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_labels_are_forced_to_five_bytes() {
        let header = r#"
	asm goto("1:"
		"jmp %l[l_yes] # objtool NOPs this \n\t"
		JUMP_TABLE_ENTRY
	asm goto("1:"
		"jmp %l[l_yes]\n\t"
		JUMP_TABLE_ENTRY
"#;
        let r = rewrite_jump_labels(header).expect("both templates found");
        assert_eq!(r.matches("jmp.d32 %l[l_yes]").count(), 2, "{r}");
        assert_eq!(r.lines().count(), header.lines().count());
        // A header of another shape is left alone.
        assert_eq!(
            rewrite_jump_labels(&header.replace("jmp %l[l_yes]\\n", "x")),
            None
        );
    }

    #[test]
    fn profiling_turns_ipa_ra_off() {
        let cmd = "savedcmd_fs/open.o := gcc -Wp,-MMD -O2 -pg -mrecord-mcount -mfentry -c -o fs/open.o fs/open.c";
        assert!(!ipa_ra(Some(cmd)));
        assert!(ipa_ra(Some(&cmd.replace(" -pg", ""))));
        assert!(!ipa_ra(Some(&cmd.replace(" -pg", " -fno-ipa-ra"))));
        assert!(ipa_ra(None));
    }

    #[test]
    fn an_interrupted_build_is_undone_by_the_next() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = SourceTree {
            dir: dir.path().to_path_buf(),
            cc: "gcc".into(),
            describe: "test tree".into(),
            prepared_now: false,
        };
        let unit = dir.path().join("fs/x.c");
        std::fs::create_dir_all(unit.parent().expect("parent")).expect("mkdir");
        std::fs::write(&unit, "int x = 1;\n").expect("write");
        let mtime = std::fs::metadata(&unit)
            .and_then(|m| m.modified())
            .expect("mtime");
        // A build saved the file, changed it, and was killed before restoring it.
        {
            let lock = File::create(dir.path().join(".hotpatch-lock")).expect("lock");
            let mut s = Session {
                tree: &tree,
                _lock: lock,
                saved: Vec::new(),
            };
            s.save("fs/x.c").expect("save");
            std::fs::write(&unit, "int x = 2; /* the fix */\n").expect("patch");
            std::mem::forget(s);
        }
        assert!(dir.path().join(SAVED_DIR).join("fs/x.c").is_file());
        recover(&tree).expect("recover");
        assert_eq!(
            std::fs::read_to_string(&unit).expect("read"),
            "int x = 1;\n"
        );
        assert_eq!(
            std::fs::metadata(&unit)
                .and_then(|m| m.modified())
                .expect("mtime"),
            mtime
        );
        assert!(!dir.path().join(SAVED_DIR).exists());
        // Nothing to do the next time.
        recover(&tree).expect("recover again");
    }
}
