//! Which units of the running kernel a changed header reaches.
//!
//! A header's code (inline functions, macros) is compiled into every unit that includes it,
//! directly or through other headers. A fix that changes one is patched by compiling each of
//! those units before and after, as the diff's own `.c` files are (`docs/source-patches.md`
//! §1). Two sets decide which:
//!
//! - **The kernel's units**: the C files kbuild compiles into `vmlinux` for this `.config`,
//!   read once from `make -n vmlinux` in the prepared tree (nothing is built: the tree has no
//!   objects, so every command is printed) and kept in the tree; units an earlier build left a
//!   command file for are added (kbuild would not print an object that exists). Modules are
//!   not there (`make vmlinux` builds only what is built in).
//! - **The includers**: every file whose `#include` names the header, then every file
//!   including those, to a fixed point. An include is taken to name every file whose path ends
//!   with it (`"internal.h"` names `fs/internal.h` and `mm/internal.h` alike), and conditional
//!   includes are always taken: a superset of what the preprocessor would do, so no unit is
//!   missed, at worst one compiled for nothing. `#include MACRO` is not followed (the kernel
//!   uses it for trace events, whose header re-includes itself).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use crate::compile::CompileError;
use crate::tree::SourceTree;

/// Where the kernel's unit list is kept in a prepared tree.
const UNITS_FILE: &str = ".hotpatch-units";

/// Directories no built-in x86 unit includes from (host tools, other architectures, docs).
pub(crate) fn skipped(rel: &str) -> bool {
    const SKIP: [&str; 7] = [
        ".git",
        ".hotpatch-saved",
        "tools",
        "scripts",
        "Documentation",
        "samples",
        "usr",
    ];
    let top = rel.split('/').next().unwrap_or("");
    SKIP.contains(&top)
        || rel
            .strip_prefix("arch/")
            .is_some_and(|a| !a.starts_with("x86") && a.contains('/'))
}

/// The C units built into `vmlinux` (paths relative to the tree), and the assembly ones.
#[derive(Debug, Clone, Default)]
pub struct KernelUnits {
    pub c: BTreeSet<String>,
    pub asm: BTreeSet<String>,
}

impl KernelUnits {
    /// The tree's unit list, read from `make -n vmlinux` the first time and kept.
    pub fn of(tree: &SourceTree) -> Result<KernelUnits, CompileError> {
        let path = tree.dir.join(UNITS_FILE);
        // Kept only while the configuration is the one it was read for.
        let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        let fresh = match (mtime(&path), mtime(&tree.dir.join(".config"))) {
            (Some(kept), Some(config)) => kept >= config,
            _ => false,
        };
        let kept = if fresh {
            std::fs::read_to_string(&path).ok()
        } else {
            None
        };
        let text = match kept {
            Some(t) => t,
            None => {
                let out = Command::new("make")
                    .args(["-n", "-k"])
                    .arg(format!("CC={}", tree.cc))
                    .arg("vmlinux")
                    .current_dir(&tree.dir)
                    .output()
                    .map_err(|source| CompileError::Io {
                        path: tree.dir.clone(),
                        source,
                    })?;
                let listed = units_in_commands(&String::from_utf8_lossy(&out.stdout));
                if listed.is_empty() {
                    return Err(CompileError::Failed {
                        unit: "vmlinux".into(),
                        when: "listing the kernel's units (make -n vmlinux)",
                        detail: String::from_utf8_lossy(&out.stderr)
                            .lines()
                            .rev()
                            .take(10)
                            .collect::<Vec<_>>()
                            .join("\n"),
                    });
                }
                let text: String = listed.iter().map(|u| format!("{u}\n")).collect();
                std::fs::write(&path, &text).map_err(|source| CompileError::Io {
                    path: path.clone(),
                    source,
                })?;
                text
            }
        };
        let mut units = KernelUnits::default();
        for u in text.lines().map(str::to_string) {
            if u.ends_with(".c") {
                units.c.insert(u);
            } else {
                units.asm.insert(u);
            }
        }
        units.c.extend(built_before(&tree.dir));
        Ok(units)
    }
}

/// Units `make vmlinux` compiles that are not kernel text a patch could replace: host tools,
/// the initramfs generator, the 16-bit real-mode blob and the decompressor (built with their
/// own flags, from their own Makefiles), and the vDSO (user code mapped into processes).
const NOT_KERNEL_TEXT: [&str; 6] = [
    "scripts/",
    "usr/",
    "arch/x86/realmode/rm/",
    "arch/x86/boot/",
    "arch/x86/entry/vdso/",
    "arch/x86/purgatory/",
];

/// The sources of the compile commands in `make -n` output: `… -c -o fs/open.o fs/open.c`
/// (C) and `… -c -o arch/x86/entry/entry_64.o arch/x86/entry/entry_64.S` (assembly).
pub fn units_in_commands(out: &str) -> BTreeSet<String> {
    let mut units = BTreeSet::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if w != "-c" {
                continue;
            }
            let (Some("-o"), Some(obj), Some(src)) = (words.next(), words.next(), words.next())
            else {
                break;
            };
            let src = src.trim_end_matches(';');
            let stem = |p: &str| p.rsplit_once('.').map(|(s, _)| s.to_string());
            if (src.ends_with(".c") || src.ends_with(".S"))
                && obj.ends_with(".o")
                && stem(obj) == stem(src)
                && !NOT_KERNEL_TEXT.iter().any(|d| src.starts_with(d))
            {
                units.insert(src.to_string());
            }
            break;
        }
    }
    units
}

/// C units with a kbuild command file that are not modules: compiled before (by an earlier
/// build of a fix, or a whole build of the tree), so `make -n` may not have printed them.
fn built_before(dir: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    walk(dir, "", &mut |rel, name| {
        let Some(obj) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_suffix(".o.cmd"))
        else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(dir.join(rel).join(name)) else {
            return;
        };
        let Some(first) = text.lines().next() else {
            return;
        };
        let src = if rel.is_empty() {
            format!("{obj}.c")
        } else {
            format!("{rel}/{obj}.c")
        };
        if !first.contains(" -DMODULE ") && first.trim_end().ends_with(&format!(" {src}")) {
            out.insert(src);
        }
    });
    out
}

/// Calls `f(dir relative to root, file name)` for every file under `root`, skipping the
/// directories of [`skipped`].
fn walk(root: &Path, rel: &str, f: &mut dyn FnMut(&str, &str)) {
    let Ok(entries) = std::fs::read_dir(root.join(rel)) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let sub = if rel.is_empty() {
            name.clone()
        } else {
            format!("{rel}/{name}")
        };
        match e.file_type() {
            Ok(t) if t.is_dir() && !skipped(&sub) => walk(root, &sub, f),
            Ok(t) if t.is_dir() => {}
            Ok(t) if t.is_file() => f(rel, &name),
            _ => {}
        }
    }
}

/// One `#include` as written: `"…"` (quoted) or `<…>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub quoted: bool,
    pub name: String,
}

/// The `#include`s of a C or header file, as written (`linux/fs.h`, `internal.h`,
/// `../foo.h`).
pub fn includes_of(text: &str) -> Vec<Include> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        let Some(rest) = rest.trim_start().strip_prefix("include") else {
            continue;
        };
        let rest = rest.trim_start();
        let (close, quoted) = match rest.chars().next() {
            Some('<') => ('>', false),
            Some('"') => ('"', true),
            _ => continue,
        };
        let Some(end) = rest[1..].find(close) else {
            continue;
        };
        let name = &rest[1..1 + end];
        if !name.is_empty() {
            out.push(Include {
                quoted,
                name: name.to_string(),
            });
        }
    }
    out
}

/// The C files of `file`'s own directory that `#include "<its name>"`, and those including
/// them in turn: kbuild compiles some C files only inside another (`kernel/sched/psi.c` and
/// `rt.c` are parts of `build_utility.c` and `build_policy.c`), and compiled alone they do
/// not build, nor would their functions sit where the kernel's do. Sorted.
pub fn c_includers(tree_dir: &Path, file: &str) -> Vec<String> {
    let (dir, _) = file.rsplit_once('/').unwrap_or(("", file));
    let Ok(entries) = std::fs::read_dir(tree_dir.join(dir)) else {
        return Vec::new();
    };
    let mut texts: Vec<(String, Vec<String>)> = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".c") {
            continue;
        }
        let Ok(bytes) = std::fs::read(e.path()) else {
            continue;
        };
        let quoted = includes_of(&String::from_utf8_lossy(&bytes))
            .into_iter()
            .filter(|i| i.quoted && !i.name.contains('/'))
            .map(|i| i.name)
            .collect();
        texts.push((name, quoted));
    }
    let path = |name: &str| {
        if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        }
    };
    let mut out = BTreeSet::new();
    let mut frontier = vec![file.rsplit('/').next().unwrap_or(file).to_string()];
    while let Some(included) = frontier.pop() {
        for (name, quoted) in &texts {
            if quoted.contains(&included) && out.insert(path(name)) {
                frontier.push(name.clone());
            }
        }
    }
    out.remove(file);
    out.into_iter().collect()
}

/// kbuild's include directories for x86 (`LINUXINCLUDE`), searched in this order after the
/// including file's own directory for a quoted include.
const INCLUDE_DIRS: [&str; 7] = [
    "arch/x86/include",
    "arch/x86/include/generated",
    "include",
    "arch/x86/include/uapi",
    "arch/x86/include/generated/uapi",
    "include/uapi",
    "include/generated/uapi",
];

/// Headers every unit includes (`-include` in kbuild's flags).
pub const FORCED_INCLUDES: [&str; 3] = [
    "include/linux/compiler-version.h",
    "include/linux/kconfig.h",
    "include/linux/compiler_types.h",
];

/// `a/b/../c` → `a/c`; `None` above the root.
fn normalize(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for p in path.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            p => parts.push(p),
        }
    }
    Some(parts.join("/"))
}

/// Where the compiler finds `inc` for `includer`, when it is in the tree at one of the places
/// it looks first (the includer's directory for a quoted include, then [`INCLUDE_DIRS`]).
/// `None`: only a directory a Makefile adds (`ccflags-y += -I…`) could hold it.
fn resolve(files: &BTreeSet<String>, includer: &str, inc: &Include) -> Option<String> {
    if inc.quoted {
        let dir = includer.rsplit_once('/').map_or("", |(d, _)| d);
        if let Some(p) = normalize(&format!("{dir}/{}", inc.name))
            && files.contains(&p)
        {
            return Some(p);
        }
    }
    INCLUDE_DIRS
        .iter()
        .filter_map(|d| normalize(&format!("{d}/{}", inc.name)))
        .find(|p| files.contains(p))
}

/// Every `.c` and `.h` file of the tree by what it includes.
pub struct IncludeIndex {
    /// Resolved header → the files including it.
    exact: BTreeMap<String, Vec<String>>,
    /// For includes not resolved: the name without leading `./` and `../` → the files using
    /// it (any file whose path ends with the name may be the one).
    by_tail: BTreeMap<String, Vec<String>>,
}

/// Where a tree's include index is kept: `F path` per file, `I file q|a name` per include.
const INDEX_FILE: &str = ".hotpatch-includes";

impl IncludeIndex {
    /// The tree's index, read from every `.c` and `.h` file. Kept in a tree this builder
    /// unpacked and prepared (`.hotpatch-prepared`: its files change only for a build, and are
    /// put back); a tree the user gives may change between builds, so it is read each time.
    pub fn of_tree(dir: &Path) -> IncludeIndex {
        let cache = dir.join(INDEX_FILE);
        let ours = dir.join(".hotpatch-prepared").is_file();
        let kept = match ours {
            true => std::fs::read_to_string(&cache).ok(),
            false => None,
        };
        let (files, raw) = match kept {
            Some(text) => parse_index(&text),
            None if !ours => scan_tree(dir),
            None => {
                let (files, raw) = scan_tree(dir);
                let mut text = String::new();
                for f in &files {
                    text.push_str(&format!("F {f}\n"));
                }
                for (f, incs) in &raw {
                    for i in incs {
                        let q = if i.quoted { 'q' } else { 'a' };
                        text.push_str(&format!("I {f} {q} {}\n", i.name));
                    }
                }
                if let Err(e) = std::fs::write(&cache, text) {
                    tracing::warn!(path = %cache.display(), error = %e, "could not keep the include index");
                }
                (files, raw)
            }
        };
        Self::build(&files, raw)
    }

    pub fn from_files<'a>(files: impl IntoIterator<Item = (&'a str, &'a str)>) -> IncludeIndex {
        let mut names = BTreeSet::new();
        let mut raw = Vec::new();
        for (file, text) in files {
            names.insert(file.to_string());
            raw.push((file.to_string(), includes_of(text)));
        }
        Self::build(&names, raw)
    }

    fn build(files: &BTreeSet<String>, raw: Vec<(String, Vec<Include>)>) -> IncludeIndex {
        let mut exact: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut by_tail: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (file, incs) in raw {
            for inc in incs {
                match resolve(files, &file, &inc) {
                    Some(p) => exact.entry(p).or_default().push(file.clone()),
                    None => {
                        let mut name = inc.name.as_str();
                        while let Some(n) =
                            name.strip_prefix("./").or_else(|| name.strip_prefix("../"))
                        {
                            name = n;
                        }
                        by_tail
                            .entry(name.to_string())
                            .or_default()
                            .push(file.clone());
                    }
                }
            }
        }
        IncludeIndex { exact, by_tail }
    }

    /// Every file that includes one of `headers`, directly or through others (the headers
    /// themselves not counted).
    pub fn includers(&self, headers: &[String]) -> BTreeSet<String> {
        let mut seen: BTreeSet<String> = headers.iter().cloned().collect();
        let mut frontier: Vec<String> = headers.to_vec();
        let mut out = BTreeSet::new();
        while let Some(p) = frontier.pop() {
            let mut users: Vec<&String> = self.exact.get(&p).into_iter().flatten().collect();
            // Every unresolved name that may be `p`: each tail of its path.
            let mut tail = p.as_str();
            loop {
                users.extend(self.by_tail.get(tail).into_iter().flatten());
                match tail.split_once('/') {
                    Some((_, rest)) => tail = rest,
                    None => break,
                }
            }
            for f in users {
                if seen.insert(f.clone()) {
                    out.insert(f.clone());
                    frontier.push(f.clone());
                }
            }
        }
        out
    }
}

fn scan_tree(dir: &Path) -> (BTreeSet<String>, Vec<(String, Vec<Include>)>) {
    let mut files = BTreeSet::new();
    let mut raw = Vec::new();
    walk(dir, "", &mut |rel, name| {
        if !(name.ends_with(".c") || name.ends_with(".h")) {
            return;
        }
        let file = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let Ok(bytes) = std::fs::read(dir.join(&file)) else {
            return;
        };
        raw.push((file.clone(), includes_of(&String::from_utf8_lossy(&bytes))));
        files.insert(file);
    });
    (files, raw)
}

fn parse_index(text: &str) -> (BTreeSet<String>, Vec<(String, Vec<Include>)>) {
    let mut files = BTreeSet::new();
    let mut raw: Vec<(String, Vec<Include>)> = Vec::new();
    for line in text.lines() {
        if let Some(f) = line.strip_prefix("F ") {
            files.insert(f.to_string());
        } else if let Some(rest) = line.strip_prefix("I ") {
            let mut p = rest.splitn(3, ' ');
            let (Some(f), Some(q), Some(name)) = (p.next(), p.next(), p.next()) else {
                continue;
            };
            let inc = Include {
                quoted: q == "q",
                name: name.to_string(),
            };
            match raw.last_mut() {
                Some((last, incs)) if last == f => incs.push(inc),
                _ => raw.push((f.to_string(), vec![inc])),
            }
        }
    }
    (files, raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn include_names_are_read_as_written() {
        let src = "#include <linux/fs.h>\n  #  include \"internal.h\"\n#include \"../../foo/bar.h\"\n\
                   #include TRACE_INCLUDE(TRACE_INCLUDE_FILE)\n#define X 1\n// #include <no.h> is a comment\n";
        let incs = includes_of(src);
        let names: Vec<(bool, &str)> = incs.iter().map(|i| (i.quoted, i.name.as_str())).collect();
        assert_eq!(
            names,
            [
                (false, "linux/fs.h"),
                (true, "internal.h"),
                (true, "../../foo/bar.h")
            ]
        );
    }

    #[test]
    fn includers_are_found_through_other_headers() {
        let files = [
            (
                "fs/open.c",
                "#include <linux/fs.h>\n#include \"internal.h\"\n",
            ),
            ("fs/internal.h", "#include <linux/mount.h>\n"),
            ("fs/namei.c", "#include \"internal.h\"\n"),
            ("mm/internal.h", ""),
            ("mm/slub.c", "#include \"internal.h\"\n"),
            ("kernel/fork.c", "#include <linux/mount.h>\n"),
            ("kernel/time.c", "#include <linux/time.h>\n"),
            ("include/linux/fs.h", "#include <linux/mount.h>\n"),
            ("include/linux/mount.h", ""),
            (
                "drivers/x/y.c",
                "#include \"../z/priv.h\"\n#include \"extra.h\"\n",
            ),
            ("drivers/z/priv.h", ""),
            ("drivers/w/extra.h", ""),
        ];
        let index = IncludeIndex::from_files(files.iter().copied());
        let list = |h: &str| {
            index
                .includers(&[h.to_string()])
                .into_iter()
                .collect::<Vec<_>>()
        };
        // "internal.h" in fs/ is fs/internal.h: mm's includer is not one.
        assert_eq!(list("fs/internal.h"), ["fs/namei.c", "fs/open.c"]);
        assert_eq!(
            list("include/linux/mount.h"),
            [
                "fs/internal.h",
                "fs/namei.c",
                "fs/open.c",
                "include/linux/fs.h",
                "kernel/fork.c"
            ]
        );
        assert_eq!(list("drivers/z/priv.h"), ["drivers/x/y.c"]);
        // Not found where the compiler looks first: a Makefile's -I may hold it, so any
        // header of that name counts.
        assert_eq!(list("drivers/w/extra.h"), ["drivers/x/y.c"]);
    }

    #[test]
    fn a_c_file_compiled_inside_another_is_found_in_its_includers() {
        let dir = std::env::temp_dir().join(format!("c-includers-{}", std::process::id()));
        let sched = dir.join("kernel/sched");
        std::fs::create_dir_all(&sched).unwrap();
        for (name, text) in [
            (
                "build_utility.c",
                "#include <linux/psi.h>\n#include \"sched.h\"\n# include \"psi.c\"\n",
            ),
            ("build_policy.c", "#include \"rt_all.c\"\n"),
            ("rt_all.c", "#include \"rt.c\"\n"),
            ("psi.c", "#include <linux/psi.h>\n"),
            ("rt.c", ""),
            ("core.c", "#include \"sched.h\"\n"),
            ("sched.h", ""),
        ] {
            std::fs::write(sched.join(name), text).unwrap();
        }
        assert_eq!(
            c_includers(&dir, "kernel/sched/psi.c"),
            ["kernel/sched/build_utility.c"]
        );
        // Through an intermediate file, to a fixed point.
        assert_eq!(
            c_includers(&dir, "kernel/sched/rt.c"),
            ["kernel/sched/build_policy.c", "kernel/sched/rt_all.c"]
        );
        // A unit of its own, and a file of another directory.
        assert!(c_includers(&dir, "kernel/sched/core.c").is_empty());
        assert!(c_includers(&dir, "kernel/fork.c").is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn units_are_read_from_the_compile_commands() {
        let out = "  gcc-12 -Wp,-MMD,fs/.open.o.d -nostdinc -O2 -c -o fs/open.o fs/open.c; ./tools/objtool/objtool --hacks=jump_label fs/open.o\n\
                   gcc-12 -c -o arch/x86/entry/entry_64.o arch/x86/entry/entry_64.S\n\
                   gcc -Wp,-MMD,scripts/mod/.empty.o.d -c -o scripts/mod/empty.o scripts/mod/empty.c\n\
                   echo fs/open.c\n";
        assert_eq!(
            units_in_commands(out).into_iter().collect::<Vec<_>>(),
            ["arch/x86/entry/entry_64.S", "fs/open.c"]
        );
    }
}
