//! `vmm bench source-diff`: how much of a real distribution update the source-diff builder turns
//! into live patches, and how long a build takes (`docs/source-patches.md`).
//!
//! Every `.c` file that differs between the running kernel's source and a later version's is
//! taken as one fix (its own unified diff), compiled before and after on the running kernel's
//! prepared tree, and each changed function classed: patchable (run-pre, IPA-RA and link all
//! pass), or the reason it is not. Units are first sorted out without compiling: other
//! architectures, and units none of whose functions the running kernel has (modules, code not
//! configured in); header changes are counted but not split into functions (a header reaches
//! every unit that includes it). Build times: one fix on the prepared tree, per unit; and the
//! first build of a fix with an empty cache (fetch, unpack, prepare, compile), with `--cold`.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use linux_guest::attach::KernelImage;
use linux_guest::patch::{KernelCode, KernelPatchError, build_kernel_patch_from_code};
use patch_format::Metadata;
use serde::Serialize;
use source_diff::build::{
    SourceBuildError, SourceReport, TargetKernel, analyze_unit, c_file_units, check_diff,
    units_to_compile,
};
use source_diff::compile::{CompileError, compile_both};
use source_diff::link::{DataSet, LinkError};
use source_diff::reach::IncludeIndex;
use source_diff::tree::{KernelBuild, SourceTree, unpack_source};
use source_diff::unified::{ConstructKind, constructs};

#[derive(Debug, Clone, Serialize)]
pub struct UnitResult {
    pub unit: String,
    /// Changed functions (pre-fix names) and, for each, `patchable` or the reason class.
    pub functions: BTreeMap<String, String>,
    /// The refusal's full message where one applies to the unit or a function.
    pub details: Vec<String>,
    pub build_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SourceDiffReport {
    pub kernel: String,
    pub old_version: String,
    pub new_version: String,
    pub changed_c_files: usize,
    pub changed_headers: usize,
    pub other_arch_files: usize,
    pub not_in_kernel_files: usize,
    pub units_compiled: usize,
    pub changed_functions: usize,
    pub patchable: usize,
    pub reasons: BTreeMap<String, usize>,
    pub units: Vec<UnitResult>,
    /// Seconds to build one unit's fix on the prepared tree: median and max.
    pub build_s_median: f64,
    pub build_s_max: f64,
    /// The first build with an empty cache (`--cold`): fetch, unpack, prepare, compile.
    pub cold_build_s: Option<f64>,
    pub prepare_s: Option<f64>,
    pub host: super::HostInfo,
}

/// A short class for a refusal, for the table.
fn reason_class(e: &SourceBuildError) -> String {
    match e {
        SourceBuildError::TypeChange { .. } => "type definition changed".into(),
        SourceBuildError::DataChanged { .. } => "variable's initial value changed".into(),
        SourceBuildError::Inlining { .. } => "inlined where the kernel has it out of line".into(),
        SourceBuildError::NotBuiltIn { .. } => "not built into the kernel".into(),
        SourceBuildError::IpaRa { .. } => "new code clobbers more registers (IPA-RA)".into(),
        SourceBuildError::Compile(CompileError::Module { .. }) => "module".into(),
        SourceBuildError::Compile(CompileError::Failed { .. }) => "does not compile".into(),
        SourceBuildError::Compile(CompileError::DoesNotApply { .. }) => {
            "diff does not apply".into()
        }
        SourceBuildError::Link { source, .. } => match source {
            LinkError::PreMismatch { .. } => "run-pre mismatch".into(),
            LinkError::NotInKernel { .. } => "refers to a symbol the kernel lacks".into(),
            LinkError::Ambiguous { .. } => "ambiguous kernel symbol".into(),
            LinkError::TooLarge { .. } => "too large".into(),
            LinkError::Unsupported { what, .. } => {
                let w = what.as_str();
                if w.contains("exception-table") {
                    "exception table (user access)".into()
                } else if w.contains("alternative") {
                    "CPU alternative".into()
                } else if w.contains("WARN") {
                    "WARN/BUG".into()
                } else if w.contains("jump label") {
                    "jump label (2-byte or odd)".into()
                } else if w.contains("which the fix adds") || w.contains("allocate writable") {
                    "new variable".into()
                } else if w.contains("absolute address") || w.contains("stored in data") {
                    "address of code taken".into()
                } else if w.contains("table this builder does not know") {
                    "unknown kernel table".into()
                } else if w.contains("holds addresses") {
                    "pointer table in new data".into()
                } else {
                    format!("unsupported: {}", w.chars().take(60).collect::<String>())
                }
            }
        },
        SourceBuildError::Patch(e) => match e {
            KernelPatchError::AbsoluteSymbol { .. } => {
                "per-CPU variable without %gs (RIP-relative)".into()
            }
            KernelPatchError::UnknownSymbol { .. } => "refers to a symbol the kernel lacks".into(),
            KernelPatchError::AmbiguousSymbol { .. } => "ambiguous kernel symbol".into(),
            other => format!(
                "kernel patch: {}",
                other.to_string().chars().take(60).collect::<String>()
            ),
        },
        other => format!(
            "other: {}",
            other.to_string().chars().take(60).collect::<String>()
        ),
    }
}

/// The full chain of an error, for the details.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// `diff -rq` of the two trees: the files that differ (paths relative to the trees).
fn changed_files(old: &Path, new: &Path) -> Result<Vec<String>> {
    let out = Command::new("diff")
        .arg("-rq")
        .arg(old)
        .arg(new)
        .output()
        .context("running diff -rq")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("{}/", old.display());
    Ok(text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("Files ")?;
            let (a, _) = rest.split_once(" and ")?;
            a.strip_prefix(&prefix).map(str::to_string)
        })
        .collect())
}

/// Whether the running kernel has any function defined in the old version of `file`.
fn in_kernel(image: &KernelImage, file: &Path) -> bool {
    let Ok(src) = std::fs::read_to_string(file) else {
        return false;
    };
    constructs(&src)
        .iter()
        .filter(|c| c.kind == ConstructKind::Function && !c.name.is_empty())
        .any(|c| image.kallsyms.named(&c.name).any(|s| s.is_text()))
}

/// The functions of the old `file` that the diff's hunks touch (by the lines they remove or
/// insert at), for a unit that cannot be compiled.
fn touched_functions(file: &Path, diff_text: &str) -> Vec<String> {
    let (Ok(src), Ok(files)) = (
        std::fs::read_to_string(file),
        source_diff::unified::parse(diff_text),
    ) else {
        return Vec::new();
    };
    let cs = constructs(&src);
    let mut out: Vec<String> = Vec::new();
    for f in &files {
        for h in &f.hunks {
            for &line in &h.touched {
                if let Some(c) = cs.iter().find(|c| {
                    c.kind == ConstructKind::Function
                        && c.first_line.saturating_sub(1) <= line
                        && line <= c.last_line
                }) && !out.contains(&c.name)
                {
                    out.push(c.name.clone());
                }
            }
        }
    }
    out
}

/// One file's change as a unified diff with `a/`/`b/` labels.
fn file_diff(old: &Path, new: &Path, rel: &str) -> Result<String> {
    let out = Command::new("diff")
        .args([
            "-u",
            "--label",
            &format!("a/{rel}"),
            "--label",
            &format!("b/{rel}"),
        ])
        .arg(old.join(rel))
        .arg(new.join(rel))
        .output()
        .context("running diff -u")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    kernel: &Path,
    new_version: &str,
    cache: &Path,
    max_units: Option<usize>,
    only_units: Option<&[String]>,
    header_units: usize,
    cold_fix: Option<&Path>,
    jobs: usize,
    host: super::HostInfo,
) -> Result<SourceDiffReport> {
    let image = KernelImage::from_file(kernel)?;
    let build = KernelBuild::from_banner(&image.banner).context("the kernel's banner")?;
    let old_version = build
        .debian_version
        .clone()
        .context("not a Debian kernel (no package version in its banner)")?;
    let target = TargetKernel {
        vmlinux: &image.vmlinux,
        kallsyms: &image.kallsyms,
        banner: &image.banner,
    };

    // The first build with an empty cache, when asked: a fresh cache directory.
    let (mut cold_build_s, mut prepare_s) = (None, None);
    if let Some(fix) = cold_fix {
        let fresh = tempfile::Builder::new()
            .prefix("vmm-bench-cold-source-")
            .tempdir_in(cache.parent().unwrap_or(Path::new("/tmp")))?;
        let t = Instant::now();
        let tree = SourceTree::debian(fresh.path(), &build, &image.banner)?;
        prepare_s = Some(t.elapsed().as_secs_f64());
        let units = check_diff(&std::fs::read_to_string(fix)?, "cold fix", Some(&tree.dir))?;
        let objects = compile_both(&tree, &std::fs::canonicalize(fix)?, &units, &units)?;
        for (i, o) in objects.iter().enumerate() {
            let mut report = SourceReport::default();
            analyze_unit(&target, o, i, &mut DataSet::default(), &mut report)?;
        }
        cold_build_s = Some(t.elapsed().as_secs_f64());
        eprintln!(
            "cold build: {:.1} s (of which fetch+unpack+prepare {:.1} s)",
            cold_build_s.unwrap_or(0.0),
            prepare_s.unwrap_or(0.0)
        );
    }

    let tree = SourceTree::debian(cache, &build, &image.banner)?;
    let series = build.series().context("no series in the release")?;
    let new_tree = unpack_source(cache, &series, new_version)?;
    // A run killed mid-build may have left a fix applied or a header rewritten in a tree:
    // put them back before the trees are compared, or those files would count as unchanged.
    source_diff::compile::recover_tree(&tree)?;
    let files = changed_files(&tree.dir, &new_tree)?;
    let c_files: Vec<&String> = files.iter().filter(|f| f.ends_with(".c")).collect();
    let changed_headers = files.iter().filter(|f| f.ends_with(".h")).count();
    let mut other_arch = 0;
    let mut not_in_kernel = 0;
    let mut candidates: Vec<String> = Vec::new();
    for f in &c_files {
        let elsewhere = (f.starts_with("arch/") && !f.starts_with("arch/x86/"))
            || ["tools/", "scripts/", "samples/"]
                .iter()
                .any(|p| f.starts_with(p));
        if elsewhere {
            other_arch += 1;
        } else if !in_kernel(&image, &tree.dir.join(f)) {
            not_in_kernel += 1;
        } else {
            candidates.push(f.to_string());
        }
    }
    if let Some(only) = only_units {
        candidates.retain(|c| only.contains(c));
    }
    if let Some(m) = max_units {
        candidates.truncate(m);
    }
    eprintln!(
        "bench source-diff: {} .c files changed ({} other arch/tools, {} not in this kernel), \
         {} headers; compiling {} units",
        c_files.len(),
        other_arch,
        not_in_kernel,
        changed_headers,
        candidates.len()
    );
    let scratch = tempfile::Builder::new()
        .prefix("vmm-bench-source-diff-")
        .tempdir()?;
    // The update's changed headers, and who includes each (for units needing them).
    let index = IncludeIndex::of_tree(&tree.dir);
    let headers = Headers {
        includers: files
            .iter()
            .filter(|f| f.ends_with(".h"))
            .filter(|f| !f.starts_with("arch/") || f.starts_with("arch/x86/"))
            .map(|h| (h.clone(), index.includers(std::slice::from_ref(h))))
            .collect(),
        max_units: header_units,
    };
    drop(index);
    // Workers, each with its own copy of the prepared tree (a tree is locked per build).
    let jobs = jobs.max(1);
    let mut trees = vec![tree.clone()];
    for j in 1..jobs {
        let dir = tree.dir.with_file_name(format!("tree-job{j}"));
        if !dir.join(".hotpatch-prepared").is_file() {
            let _ = std::fs::remove_dir_all(&dir);
            let st = Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(&tree.dir)
                .arg(&dir)
                .status()
                .context("copying the prepared tree")?;
            anyhow::ensure!(
                st.success(),
                "copying the prepared tree to {}",
                dir.display()
            );
        }
        let copy = SourceTree {
            dir,
            ..tree.clone()
        };
        source_diff::compile::recover_tree(&copy)?;
        trees.push(copy);
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done: std::sync::Mutex<Vec<(usize, UnitResult)>> = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for t in &trees {
            let (next, done, candidates, target, new_tree, scratch, headers) = (
                &next,
                &done,
                &candidates,
                &target,
                &new_tree,
                scratch.path(),
                &headers,
            );
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(rel) = candidates.get(i) else { break };
                    let r = one_unit(target, t, new_tree, rel, i, scratch, headers).unwrap_or_else(
                        |e| UnitResult {
                            unit: rel.clone(),
                            functions: BTreeMap::from([(
                                "(unit)".to_string(),
                                format!("bench error: {e}"),
                            )]),
                            details: vec![format!("{e:#}")],
                            build_s: 0.0,
                        },
                    );
                    let mut d = done.lock().unwrap_or_else(|p| p.into_inner());
                    eprintln!(
                        "[{}/{}] {rel}: {:.1} s, {:?}",
                        d.len() + 1,
                        candidates.len(),
                        r.build_s,
                        r.functions
                    );
                    d.push((i, r));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(|p| p.into_inner());
    done.sort_by_key(|(i, _)| *i);
    let units: Vec<UnitResult> = done.into_iter().map(|(_, r)| r).collect();
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let (mut changed_functions, mut patchable) = (0, 0);
    for result in &units {
        for (name, class) in &result.functions {
            if name == "(unit)" {
                continue;
            }
            changed_functions += 1;
            if class == "patchable" {
                patchable += 1;
            } else {
                *reasons.entry(class.clone()).or_default() += 1;
            }
        }
    }
    let mut times: Vec<f64> = units.iter().map(|u| u.build_s).collect();
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(SourceDiffReport {
        kernel: image.name.clone(),
        old_version,
        new_version: new_version.to_string(),
        changed_c_files: c_files.len(),
        changed_headers,
        other_arch_files: other_arch,
        not_in_kernel_files: not_in_kernel,
        units_compiled: units.len(),
        changed_functions,
        patchable,
        reasons,
        build_s_median: times.get(times.len() / 2).copied().unwrap_or(0.0),
        build_s_max: times.last().copied().unwrap_or(0.0),
        cold_build_s,
        prepare_s,
        units,
        host,
    })
}

/// The update's changed headers, for a unit that compiles only with them: which of them each
/// file includes (directly or not).
pub struct Headers {
    /// Changed header → every file including it.
    includers: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// The most units a header retry may compile.
    max_units: usize,
}

impl Headers {
    fn needed_by(&self, unit: &str) -> Vec<String> {
        self.includers
            .iter()
            .filter(|(_, users)| users.contains(unit))
            .map(|(h, _)| h.clone())
            .collect()
    }
}

/// One changed file as one fix: compiled both ways on `tree` and every changed function
/// classed. A file that does not compile alone is tried again with the update's changes to
/// the headers it includes (and so every built-in unit they reach): the type-free ones first.
fn one_unit(
    target: &TargetKernel<'_>,
    tree: &SourceTree,
    new_tree: &Path,
    rel: &str,
    i: usize,
    scratch: &Path,
    headers: &Headers,
) -> Result<UnitResult> {
    let rel = &rel.to_string();
    let diff_text = file_diff(&tree.dir, new_tree, rel)?;
    let diff_path = scratch.join(format!("{i}.patch"));
    std::fs::write(&diff_path, &diff_text)?;
    let t = Instant::now();
    let mut result = UnitResult {
        unit: rel.clone(),
        functions: BTreeMap::new(),
        details: Vec::new(),
        build_s: 0.0,
    };
    let type_change = check_diff(&diff_text, rel, Some(&tree.dir)).err();
    let one = std::slice::from_ref(rel);
    // A file kbuild compiles only inside another (`kernel/sched/psi.c`) is built in it.
    let units = match c_file_units(tree, one) {
        Ok((units, _)) => units,
        Err(e) => {
            result.details.push(chain(&e));
            result.functions.insert("(unit)".into(), reason_class(&e));
            return Ok(result);
        }
    };
    match compile_both(tree, &diff_path, one, &units) {
        Err(e @ CompileError::Failed { .. }) if type_change.is_none() => {
            // The headers the units it is compiled in include (psi.c's are build_utility.c's).
            let mut needed = headers.needed_by(rel);
            for u in units.iter().filter(|u| *u != rel) {
                for h in headers.needed_by(u) {
                    if !needed.contains(&h) {
                        needed.push(h);
                    }
                }
            }
            result.details.push(chain(&SourceBuildError::Compile(e)));
            let outcome = match needed.is_empty() {
                true => Err("needs the update's other changes (does not compile alone)".into()),
                false => with_headers(
                    target,
                    tree,
                    new_tree,
                    rel,
                    &diff_text,
                    &needed,
                    i,
                    scratch,
                    headers.max_units,
                    &mut result,
                ),
            };
            if let Err(class) = outcome {
                // Its changed functions are counted from the diff's hunks: the functions of
                // the old file they touch.
                for f in touched_functions(&tree.dir.join(rel), &diff_text) {
                    result.functions.insert(f, class.clone());
                }
            }
        }
        Err(e) => {
            let e = SourceBuildError::Compile(e);
            result.details.push(chain(&e));
            result.functions.insert("(unit)".into(), reason_class(&e));
        }
        Ok(objects) => classify(target, &objects[0], type_change, None, &mut result),
    }
    result.build_s = t.elapsed().as_secs_f64();
    Ok(result)
}

/// The retry with the headers `rel` needs: `Err(class)` for every function of the file when
/// the combined fix is refused before its units are analysed.
#[allow(clippy::too_many_arguments)]
fn with_headers(
    target: &TargetKernel<'_>,
    tree: &SourceTree,
    new_tree: &Path,
    rel: &str,
    diff_text: &str,
    needed: &[String],
    i: usize,
    scratch: &Path,
    max_units: usize,
    result: &mut UnitResult,
) -> std::result::Result<(), String> {
    // First the header lines the file's change names: the update's hunks in those headers
    // that bring a name the new code uses (a prototype, a macro, a member), and the hunks
    // those need in turn. This stands in for the upstream commit, which changed the file and
    // the few header lines it needs; the two trees do not say which lines that was.
    match named_header_diffs(
        tree,
        new_tree,
        rel,
        diff_text,
        needed,
        &format!("{i}"),
        scratch,
    ) {
        Ok(named) if !named.is_empty() => {
            let diffs: Vec<&str> = named.iter().map(|n| n.1.as_str()).collect();
            let shown: Vec<String> = named
                .iter()
                .map(|(h, _, kept, all)| format!("{h} ({kept} of {all} hunks)"))
                .collect();
            let mut trial = UnitResult {
                unit: rel.to_string(),
                functions: BTreeMap::new(),
                details: Vec::new(),
                build_s: 0.0,
            };
            let outcome = retry_with(
                target,
                tree,
                rel,
                diff_text,
                &diffs,
                &format!("{i}-named"),
                scratch,
                max_units,
                "the header lines it uses",
                &mut trial,
            );
            match outcome {
                Err(class) if class.starts_with("needs the update's other changes") => {
                    result.details.push(format!(
                        "with the header lines it uses ({}) it does not compile: {}",
                        shown.join(", "),
                        trial.details.first().map(String::as_str).unwrap_or("")
                    ));
                }
                outcome => {
                    result.details.push(format!(
                        "built with the header lines it uses: {}",
                        shown.join(", ")
                    ));
                    result.details.extend(trial.details);
                    result.functions.extend(trial.functions);
                    return outcome;
                }
            }
        }
        Ok(_) => result
            .details
            .push("no hunk of its changed headers brings a name its change uses".into()),
        Err(e) => return Err(format!("bench error: {e:#}")),
    }
    // The smallest retry first: the changed headers whose own diff changes no type
    // definition. A file often needs only a new prototype or macro from one header while
    // another it includes changes a struct the fix does not use; adding every changed header
    // at once would refuse it for that struct (an upper bound of the type-change class).
    // Each header's diff, made once for the type check and both retries.
    let mut diffs = Vec::with_capacity(needed.len());
    for h in needed {
        let d = file_diff(&tree.dir, new_tree, h).map_err(|e| format!("bench error: {e}"))?;
        let type_free = check_diff(&d, h, Some(&tree.dir)).is_ok();
        diffs.push((h.clone(), d, type_free));
    }
    let free: Vec<String> = diffs.iter().filter(|d| d.2).map(|d| d.0.clone()).collect();
    let free_diffs: Vec<&str> = diffs.iter().filter(|d| d.2).map(|d| d.1.as_str()).collect();
    let all_diffs: Vec<&str> = diffs.iter().map(|d| d.1.as_str()).collect();
    if !free.is_empty() && free.len() < needed.len() {
        let mut trial = UnitResult {
            unit: rel.to_string(),
            functions: BTreeMap::new(),
            details: Vec::new(),
            build_s: 0.0,
        };
        let tag = format!("{i}-free");
        if retry_with(
            target,
            tree,
            rel,
            diff_text,
            &free_diffs,
            &tag,
            scratch,
            max_units,
            "its headers",
            &mut trial,
        )
        .is_ok()
        {
            result.details.push(format!(
                "built with the update's type-free headers only: {}",
                free.join(", ")
            ));
            result.details.extend(trial.details);
            result.functions.extend(trial.functions);
            return Ok(());
        }
        result.details.push(format!(
            "with only the update's type-free headers ({} of {}) the fix does not build or is \
             refused: {}",
            free.len(),
            needed.len(),
            trial
                .details
                .first()
                .map(String::as_str)
                .unwrap_or("(no detail)")
        ));
    } else if free.is_empty() {
        result.details.push(format!(
            "every changed header it includes ({}) changes a type definition",
            needed.len()
        ));
    }
    retry_with(
        target,
        tree,
        rel,
        diff_text,
        &all_diffs,
        &i.to_string(),
        scratch,
        max_units,
        "its headers",
        result,
    )
}

/// The identifiers of C text (comments and strings included: a superset).
fn idents(text: &str) -> std::collections::BTreeSet<&str> {
    source_diff::unified::words(text)
        .filter(|w| w.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'))
        .collect()
}

/// The lines a unified diff adds, joined.
fn added_lines(diff: &str) -> String {
    diff.lines()
        .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
        .map(|l| &l[1..])
        .collect::<Vec<_>>()
        .join("\n")
}

/// For each of `needed` (changed headers `rel` includes), a diff of only the hunks that bring
/// a name the fix of `rel` uses, directly or through another such hunk: (header, diff, hunks
/// kept, hunks in all). Empty when no hunk brings one. Hunks are taken from `diff -U0`, so two
/// changes a few lines apart are judged apart.
fn named_header_diffs(
    tree: &SourceTree,
    new_tree: &Path,
    rel: &str,
    diff_text: &str,
    needed: &[String],
    tag: &str,
    scratch: &Path,
) -> Result<Vec<(String, String, usize, usize)>> {
    let old_c = std::fs::read_to_string(tree.dir.join(rel))?;
    // Comments are left out: a comment naming a macro does not need it.
    let added_c = source_diff::unified::code_text(&added_lines(diff_text));
    let old_c_ids = idents(&old_c);
    let mut wanted: std::collections::BTreeSet<String> = idents(&added_c)
        .into_iter()
        .filter(|w| !old_c_ids.contains(w))
        .map(str::to_string)
        .collect();
    // Per header: its old text, its -U0 hunks, and each hunk's new identifiers.
    let mut headers = Vec::new();
    for h in needed {
        let out = Command::new("diff")
            .args([
                "-U0",
                "--label",
                &format!("a/{h}"),
                "--label",
                &format!("b/{h}"),
            ])
            .arg(tree.dir.join(h))
            .arg(new_tree.join(h))
            .output()
            .context("running diff -U0")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let Ok(mut files) = source_diff::unified::parse(&text) else {
            continue;
        };
        let Some(file) = files.pop() else { continue };
        let old = std::fs::read_to_string(tree.dir.join(h))?;
        let old_ids = idents(&old);
        let new_ids: Vec<std::collections::BTreeSet<String>> = file
            .hunks
            .iter()
            .map(|hk| {
                let plus: Vec<&str> = hk
                    .body
                    .iter()
                    .filter(|(k, _)| *k == b'+')
                    .map(|(_, t)| t.as_str())
                    .collect();
                idents(&source_diff::unified::code_text(&plus.join("\n")))
                    .into_iter()
                    .filter(|w| !old_ids.contains(w))
                    .map(str::to_string)
                    .collect()
            })
            .collect();
        let n = file.hunks.len();
        headers.push((h.clone(), old, file, new_ids, vec![false; n]));
    }
    // To a fixed point: a kept hunk's new names are wanted too.
    loop {
        let mut more = false;
        for (_, _, _, ids, kept) in headers.iter_mut() {
            for (j, set) in ids.iter().enumerate() {
                if !kept[j] && set.iter().any(|w| wanted.contains(w)) {
                    kept[j] = true;
                    more = true;
                    wanted.extend(set.iter().cloned());
                }
            }
        }
        if !more {
            break;
        }
    }
    let mut out = Vec::new();
    for (n, (h, old, file, _, kept)) in headers.into_iter().enumerate() {
        let hunks: Vec<source_diff::unified::Hunk> = file
            .hunks
            .iter()
            .zip(&kept)
            .filter(|(_, k)| **k)
            .map(|(hk, _)| hk.clone())
            .collect();
        if hunks.is_empty() {
            continue;
        }
        let Some(partial) = source_diff::unified::apply_exactly(&old, &hunks) else {
            continue;
        };
        let path = scratch.join(format!("{tag}-named-{n}.h"));
        std::fs::write(&path, partial)?;
        let d = Command::new("diff")
            .args([
                "-u",
                "--label",
                &format!("a/{h}"),
                "--label",
                &format!("b/{h}"),
            ])
            .arg(tree.dir.join(&h))
            .arg(&path)
            .output()
            .context("running diff -u")?;
        out.push((
            h,
            String::from_utf8_lossy(&d.stdout).into_owned(),
            hunks.len(),
            file.hunks.len(),
        ));
    }
    Ok(out)
}

/// One retry of `rel`'s fix with the update's `header_diffs` added.
#[allow(clippy::too_many_arguments)]
fn retry_with(
    target: &TargetKernel<'_>,
    tree: &SourceTree,
    rel: &str,
    diff_text: &str,
    header_diffs: &[&str],
    tag: &str,
    scratch: &Path,
    max_units: usize,
    what: &str,
    result: &mut UnitResult,
) -> std::result::Result<(), String> {
    let mut text = diff_text.to_string();
    for d in header_diffs {
        text.push_str(d);
    }
    let path = scratch.join(format!("{tag}-headers.patch"));
    std::fs::write(&path, &text).map_err(|e| format!("bench error: {e}"))?;
    let refused = |e: SourceBuildError, result: &mut UnitResult| {
        result.details.push(chain(&e));
        match &e {
            SourceBuildError::TooManyUnits { .. } => {
                format!("with {what}: they reach more than {max_units} units")
            }
            SourceBuildError::Compile(CompileError::Failed { .. }) => {
                format!("needs the update's other changes (does not compile with {what})")
            }
            e => format!("with {what}: {}", reason_class(e)),
        }
    };
    let touched = check_diff(&text, rel, Some(&tree.dir)).map_err(|e| refused(e, result))?;
    let (units, _) =
        units_to_compile(tree, &text, &touched, max_units).map_err(|e| refused(e, result))?;
    let objects = compile_both(tree, &path, &touched, &units)
        .map_err(|e| refused(SourceBuildError::Compile(e), result))?;
    let own = c_file_units(tree, std::slice::from_ref(&rel.to_string()))
        .map(|(units, _)| units)
        .map_err(|e| refused(e, result))?;
    // Every other unit the headers reach must be patchable too, or the fix is not.
    let mut other: Option<String> = None;
    for o in objects.iter().filter(|o| !own.contains(&o.unit)) {
        let mut scratch_result = UnitResult {
            unit: o.unit.clone(),
            functions: BTreeMap::new(),
            details: Vec::new(),
            build_s: 0.0,
        };
        classify(target, o, None, None, &mut scratch_result);
        if let Some(bad) = scratch_result
            .functions
            .values()
            .find(|c| *c != "patchable")
        {
            result.details.extend(scratch_result.details);
            other = Some(format!("a unit its headers reach: {bad}"));
            break;
        }
    }
    match objects.iter().find(|o| own.contains(&o.unit)) {
        Some(o) => classify(target, o, None, other, result),
        None => return Err("bench error: the unit was not compiled".into()),
    }
    Ok(())
}

/// Each changed function of one compiled unit, patchable or why not; `unit_refusal` (a type
/// change seen in the diff) or `imposed` (why the fix as a whole is not) class every one.
fn classify(
    target: &TargetKernel<'_>,
    objects: &source_diff::compile::UnitObjects,
    unit_refusal: Option<SourceBuildError>,
    imposed: Option<String>,
    result: &mut UnitResult,
) {
    let rel = &objects.unit;
    let mut report = SourceReport::default();
    let mut data = DataSet::default();
    match analyze_unit(target, objects, 0, &mut data, &mut report) {
        Err(e) => {
            result.details.push(chain(&e));
            result.functions.insert("(unit)".into(), reason_class(&e));
        }
        Ok(a) if matches!(a.refusal, Some(SourceBuildError::NotBuiltIn { .. })) => {
            // Not the kernel's code after all: no function of it counts.
            let e = a
                .refusal
                .unwrap_or(SourceBuildError::NotBuiltIn { unit: rel.clone() });
            result.details.push(chain(&e));
            result.functions.insert("(unit)".into(), reason_class(&e));
        }
        Ok(a) => {
            let unit_refusal = unit_refusal.or(a.refusal);
            if let Some(e) = &unit_refusal {
                result.details.push(chain(e));
            }
            let mut seen: Vec<String> = Vec::new();
            for (name, r) in &a.functions {
                seen.push(name.clone());
                let class = match (&unit_refusal, r) {
                    (Some(e), _) => reason_class(e),
                    // What `vmm patch build` does last: the kernel patch of that
                    // function, with its checks of every relocation.
                    (None, Ok((kernel_name, linked))) => {
                        match final_patch(target, kernel_name, linked, &data) {
                            Ok(()) => imposed.clone().unwrap_or_else(|| "patchable".to_string()),
                            Err(e) => {
                                result.details.push(chain(&e));
                                reason_class(&e)
                            }
                        }
                    }
                    (None, Err(e)) => {
                        result.details.push(chain(e));
                        reason_class(e)
                    }
                };
                result.functions.insert(name.clone(), class);
            }
            // Refused units list every changed function; `.cold` fragments and
            // boot-time code are not functions of their own here.
            for name in &a.changed {
                if !seen.contains(name)
                    && !name.ends_with(".cold")
                    && !a.ignored.iter().any(|g| g.starts_with(&format!("{name} ")))
                {
                    let class = match &unit_refusal {
                        Some(e) => reason_class(e),
                        None => continue,
                    };
                    result.functions.insert(name.clone(), class);
                }
            }
        }
    }
}

/// The signed patch's last step for one function: `build_kernel_patch_from_code`, which checks
/// the site and every relocation against the kernel's symbols.
fn final_patch(
    target: &TargetKernel<'_>,
    kernel_name: &str,
    linked: &source_diff::link::LinkedFunction,
    data: &DataSet,
) -> Result<(), SourceBuildError> {
    // Only the data blocks this function refers to, renumbered (a patch carries no other).
    let mut blocks: Vec<patch_format::DataBlock> = Vec::new();
    let mut renumbered: BTreeMap<u32, u32> = BTreeMap::new();
    let mut relocations = linked.relocations.clone();
    for r in &mut relocations {
        if let patch_format::RelocTarget::Data(b) = &mut r.target {
            let next = renumbered.len() as u32;
            let new = *renumbered.entry(*b).or_insert(next);
            if new == next
                && let Some(block) = data.blocks.get(*b as usize)
            {
                blocks.push(block.clone());
            }
            *b = new;
        }
    }
    let code = vec![KernelCode {
        function: kernel_name.to_string(),
        code: linked.code.clone(),
        relocations,
    }];
    let meta = Metadata {
        name: "bench".into(),
        ..Metadata::default()
    };
    build_kernel_patch_from_code(target.vmlinux, target.kallsyms, code, blocks, meta)?;
    Ok(())
}

pub fn table(r: &SourceDiffReport) -> String {
    let mut t = String::new();
    let pct = |n: usize| {
        if r.changed_functions == 0 {
            0.0
        } else {
            100.0 * n as f64 / r.changed_functions as f64
        }
    };
    t.push_str(&format!(
        "source-diff coverage: {} ({}) -> {}\n",
        r.kernel, r.old_version, r.new_version
    ));
    t.push_str(&format!(
        "changed .c files {} (other arch/tools {}, not in this kernel {}), headers {} (not split into functions)\n",
        r.changed_c_files, r.other_arch_files, r.not_in_kernel_files, r.changed_headers
    ));
    t.push_str(&format!(
        "units compiled {}, changed built-in functions {}, patchable {} ({:.1}%)\n",
        r.units_compiled,
        r.changed_functions,
        r.patchable,
        pct(r.patchable)
    ));
    t.push_str("| why not patchable | functions | % of changed |\n|---|---|---|\n");
    let mut rs: Vec<(&String, &usize)> = r.reasons.iter().collect();
    rs.sort_by(|a, b| b.1.cmp(a.1));
    for (why, n) in rs {
        t.push_str(&format!("| {why} | {n} | {:.1}% |\n", pct(*n)));
    }
    t.push_str(&format!(
        "build of one unit's fix on the prepared tree: median {:.1} s, max {:.1} s\n",
        r.build_s_median, r.build_s_max
    ));
    if let (Some(c), Some(p)) = (r.cold_build_s, r.prepare_s) {
        t.push_str(&format!(
            "first build with an empty cache: {c:.1} s (fetch, unpack, prepare {p:.1} s)\n"
        ));
    }
    t
}
