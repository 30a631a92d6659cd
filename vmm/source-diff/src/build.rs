//! `vmm patch build --source-diff`: from a fix's unified diff to a patch for the running
//! kernel (`docs/source-patches.md`).
//!
//! 1. The diff is read: only `.c` files of the tree, no file created or deleted, no type
//!    definition changed (a struct's layout is shared with code the patch does not replace).
//! 2. The kernel's own source tree is found or fetched and prepared ([`crate::tree`]).
//! 3. Each unit is compiled before and after ([`crate::compile`]) and the objects compared
//!    ([`crate::objdiff`]). Changed variables (initial values) are refused; `__init` code is
//!    ignored with a note (it has run and been freed).
//! 4. The pre-fix code of every changed function must be the running kernel's (run-pre):
//!    the proof that the tree is the kernel's source.
//! 5. Each changed function's new code is linked ([`crate::link`]) and becomes one function
//!    site of the patch, its expected bytes the kernel's whole function.

use std::path::{Path, PathBuf};

use linux_guest::Kallsyms;
use linux_guest::patch::{KernelCode, KernelPatchError, build_kernel_patch_from_code};
use patch_format::{Metadata, Patch};
use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::clobbers::{Clobbers, callers_in_unit};
use crate::compile::{CompileError, compile_both};
use crate::elf::Unit;
use crate::layout::Layouts;
use crate::link::{DataSet, Kernel, LinkError, Linker, Resolved};
use crate::objdiff::diff;
use crate::reach::{IncludeIndex, KernelUnits};
use crate::tree::{KernelBuild, SourceTree, TreeError};
use crate::unified::{ConstructKind, DiffError, apply_exactly, code_text, constructs, parse};

/// Where the source comes from.
#[derive(Debug, Clone)]
pub enum SourceChoice {
    /// A prepared tree the user gives.
    Tree(PathBuf),
    /// The distribution's source package, prepared under this cache directory.
    Cache(PathBuf),
}

/// What the build found, for the operator and for `vmm patch inspect`.
#[derive(Debug, Clone, Default)]
pub struct SourceReport {
    pub diff_sha256: String,
    pub source: String,
    pub files: Vec<String>,
    /// Kernel functions replaced (kallsyms names).
    pub changed: Vec<String>,
    /// Functions the fix adds, carried in the code of the functions using them.
    pub added: Vec<String>,
    pub resolved: Vec<Resolved>,
    pub notes: Vec<String>,
    /// The tree was fetched and prepared by this build.
    pub prepared_now: bool,
    /// WARN()/BUG() were compiled as calls for patch code (`compile::WARN_REWRITE`).
    pub warn_rewritten: bool,
}

impl SourceReport {
    /// The text the patch's description carries: signed with it, shown by `inspect`.
    pub fn description(&self, user: &str) -> String {
        let mut d = String::new();
        if !user.is_empty() {
            d.push_str(user);
            d.push('\n');
        }
        d.push_str(&format!(
            "source diff sha256 {} against {}\n",
            self.diff_sha256, self.source
        ));
        d.push_str(&format!("files: {}\n", self.files.join(", ")));
        d.push_str(&format!("changed functions: {}\n", self.changed.join(", ")));
        if !self.added.is_empty() {
            d.push_str(&format!("new functions: {}\n", self.added.join(", ")));
        }
        let mut refs: Vec<String> = self
            .resolved
            .iter()
            .map(|r| format!("{} -> {}", r.symbol, r.how))
            .collect();
        refs.sort();
        refs.dedup();
        let mut notes = String::new();
        for n in &self.notes {
            notes.push_str(&format!("note: {n}\n"));
        }
        // The description is one string of the format (at most MAX_STRING bytes): the
        // references that do not fit are counted, not listed.
        let budget = patch_format::limits::MAX_STRING.saturating_sub(d.len() + notes.len() + 64);
        d.push_str("references:\n");
        let mut used = 0;
        for (i, r) in refs.iter().enumerate() {
            let line = format!("  {r}\n");
            if used + line.len() > budget {
                d.push_str(&format!("  … and {} more\n", refs.len() - i));
                break;
            }
            used += line.len();
            d.push_str(&line);
        }
        d.push_str(&notes);
        d
    }
}

#[derive(Debug, Error)]
pub enum SourceBuildError {
    #[error("the source diff {path}")]
    Diff {
        path: String,
        #[source]
        source: DiffError,
    },
    #[error(
        "the diff changes {file}, which is neither C source nor a C header; a function-level \
         live patch is built from .c and .h changes only (build files and Kconfig change the \
         build itself, assembly is not compared)"
    )]
    NotCFile { file: String },
    #[error(
        "the diff changes {headers}, which {count} units built into the kernel include \
         ({examples}); a patch compiles each of them before and after, and this is more than \
         the {max} a build compiles (--max-units)"
    )]
    TooManyUnits {
        headers: String,
        count: usize,
        examples: String,
        max: usize,
    },
    #[error(
        "the diff changes {headers}, which assembly units built into the kernel include \
         ({units}); the builder compares compiled C only, so this fix cannot be patched live"
    )]
    HeaderInAssembly { headers: String, units: String },
    #[error(
        "the diff {what} {file}; a live patch changes existing units only (new files need \
         a new build)"
    )]
    FileSet { what: &'static str, file: String },
    #[error(
        "the diff changes the definition of {name} ({file}:{line}); code the patch does not \
         replace uses its layout, so this fix cannot be applied live: reboot into the fixed \
         kernel"
    )]
    TypeChange {
        name: String,
        file: String,
        line: u32,
    },
    #[error(
        "{unit}: {}; code the patch does not replace, and data already in memory, use the \
         old one, so this fix cannot be applied live: reboot into the fixed kernel",
        .changes.join("; ")
    )]
    LayoutChange { unit: String, changes: Vec<String> },
    #[error("{unit}: its type layouts cannot be compared")]
    Dwarf {
        unit: String,
        #[source]
        source: crate::layout::DwarfError,
    },
    #[error(
        "the fix changes the initial value of {name} ({section}) in {unit}; a live patch \
         replaces code, not data that has been in use since boot"
    )]
    DataChanged {
        name: String,
        section: String,
        unit: String,
    },
    #[error(
        "{unit}: none of its functions are in the running kernel; it is not built into this \
         kernel (a module, or not configured): module patching is a later step"
    )]
    NotBuiltIn { unit: String },
    #[error(
        "the fix changes no function built into the kernel (only {what}); there is nothing to \
         patch"
    )]
    NothingChanged { what: String },
    #[error(
        "{function}: the new code writes {} which the old code never did, and {} in the same \
         unit call it unchanged; GCC compiled those callers to keep values in these registers \
         across the call (interprocedural register allocation), so replacing only {function} \
         would corrupt them",
        .registers.join(", "),
        .callers.join(", ")
    )]
    IpaRa {
        function: String,
        registers: Vec<String>,
        callers: Vec<String>,
    },
    #[error(
        "{unit}: {} changed but the running kernel has no such function (GCC inlined it into \
         its callers there); the callers could not be found",
        .functions.join(", ")
    )]
    Inlining {
        unit: String,
        functions: Vec<String>,
    },
    #[error("the kernel's banner cannot be read; is this a Linux kernel image?")]
    NoBanner,
    #[error(transparent)]
    Tree(#[from] TreeError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("{unit}")]
    Object {
        unit: String,
        #[source]
        source: crate::elf::ElfError,
    },
    #[error("{unit}")]
    Link {
        unit: String,
        #[source]
        source: LinkError,
    },
    #[error(transparent)]
    Patch(#[from] KernelPatchError),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The running kernel a fix is built for.
pub struct TargetKernel<'a> {
    pub vmlinux: &'a [u8],
    pub kallsyms: &'a Kallsyms,
    pub banner: &'a str,
}

/// The checks of step 1: the files the diff changes (`.c` and `.h`), each checked.
pub fn check_diff(
    text: &str,
    diff_path: &str,
    tree: Option<&Path>,
) -> Result<Vec<String>, SourceBuildError> {
    let files = parse(text).map_err(|source| SourceBuildError::Diff {
        path: diff_path.to_string(),
        source,
    })?;
    let mut units = Vec::new();
    for f in &files {
        if f.created || f.deleted {
            return Err(SourceBuildError::FileSet {
                what: if f.created { "creates" } else { "deletes" },
                file: f.path.clone(),
            });
        }
        if !f.path.ends_with(".c") && !f.path.ends_with(".h") {
            return Err(SourceBuildError::NotCFile {
                file: f.path.clone(),
            });
        }
        if let Some(dir) = tree
            && let Ok(src) = std::fs::read_to_string(dir.join(&f.path))
        {
            let before = SourceText::new(&src);
            // The file with the diff applied, read once for every definition it touches.
            let after_text = apply_exactly(&src, &f.hunks);
            let after = after_text.as_deref().map(SourceText::new);
            for h in &f.hunks {
                for &line in &h.touched {
                    if let Some(c) = before.constructs.iter().find(|c| {
                        c.kind == ConstructKind::Type && c.first_line <= line && line <= c.last_line
                    }) && !same_code_after(&before, c, after.as_ref())
                    {
                        return Err(SourceBuildError::TypeChange {
                            name: c.name.clone(),
                            file: f.path.clone(),
                            line,
                        });
                    }
                }
            }
        }
        if !units.contains(&f.path) {
            units.push(f.path.clone());
        }
    }
    Ok(units)
}

/// One version of a C file, split once: its lines and its top-level constructs.
struct SourceText<'a> {
    lines: Vec<&'a str>,
    constructs: Vec<crate::unified::Construct>,
}

impl<'a> SourceText<'a> {
    fn new(text: &'a str) -> Self {
        SourceText {
            lines: text.lines().collect(),
            constructs: constructs(text),
        }
    }

    /// Construct `c`'s lines as the compiler reads them ([`code_text`]).
    fn code_of(&self, c: &crate::unified::Construct) -> String {
        let (a, b) = (
            (c.first_line as usize).saturating_sub(1),
            (c.last_line as usize).min(self.lines.len()),
        );
        code_text(
            &self
                .lines
                .get(a..b)
                .map(|l| l.join("\n"))
                .unwrap_or_default(),
        )
    }
}

/// Whether type definition `c` of `old` reads the same to the compiler in `new`: only
/// comments or white space changed, or an enum only gained enumerators and kept every old
/// value ([`crate::enums`]). A fix that rewords a comment inside a struct, or adds a state to
/// an enum, changes no layout and must not be refused for it. When the new text is unknown
/// (the diff does not apply exactly), the definition counts as changed.
fn same_code_after(
    old: &SourceText<'_>,
    c: &crate::unified::Construct,
    new: Option<&SourceText<'_>>,
) -> bool {
    let Some(new) = new else { return false };
    // The same definition in the new text: the one of the same kind and name at the same
    // position among its namesakes.
    let namesakes = |t: &SourceText<'_>| {
        t.constructs
            .iter()
            .filter(|o| o.kind == c.kind && o.name == c.name)
            .cloned()
            .collect::<Vec<_>>()
    };
    let nth = namesakes(old).iter().position(|o| o == c);
    let twin = nth.and_then(|n| namesakes(new).into_iter().nth(n));
    twin.is_some_and(|t| {
        let (before, after) = (old.code_of(c), new.code_of(&t));
        before == after
            || (c.name.split(' ').next() == Some("enum")
                && crate::enums::keeps_values(&before, &after))
    })
}

/// Builds the patch for `diff_path` against `kernel`.
pub fn build_from_source_diff(
    kernel: &TargetKernel<'_>,
    diff_path: &Path,
    source: &SourceChoice,
    max_units: usize,
    meta: Metadata,
) -> Result<(Patch, SourceReport), SourceBuildError> {
    let text = std::fs::read_to_string(diff_path).map_err(|source| SourceBuildError::Io {
        path: diff_path.to_path_buf(),
        source,
    })?;
    let shown = diff_path.display().to_string();
    // Step 1 without the tree (cheap refusals first), then again with it (type changes).
    check_diff(&text, &shown, None)?;
    let build = KernelBuild::from_banner(kernel.banner).ok_or(SourceBuildError::NoBanner)?;
    let tree = match source {
        SourceChoice::Tree(dir) => SourceTree::given(dir, &build)?,
        SourceChoice::Cache(dir) => SourceTree::debian(dir, &build, kernel.banner)?,
    };
    let touched = check_diff(&text, &shown, Some(&tree.dir))?;
    let (units, notes) = units_to_compile(&tree, &text, &touched, max_units)?;
    let abs_diff = std::fs::canonicalize(diff_path).map_err(|source| SourceBuildError::Io {
        path: diff_path.to_path_buf(),
        source,
    })?;
    let objects = compile_both(&tree, &abs_diff, &touched, &units)?;

    let report = SourceReport {
        diff_sha256: hex::encode(Sha256::digest(text.as_bytes())),
        source: tree.describe.clone(),
        files: touched.clone(),
        prepared_now: tree.prepared_now,
        notes,
        ..SourceReport::default()
    };
    build_from_objects(kernel, &objects, report, meta)
}

/// How many units a build compiles at most by default (each three or four times).
pub const DEFAULT_MAX_UNITS: usize = 64;

/// The units to compile for a diff changing `touched`: its `.c` files, and every unit built
/// into the kernel that includes one of its headers ([`crate::reach`]); notes saying which.
pub fn units_to_compile(
    tree: &SourceTree,
    text: &str,
    touched: &[String],
    max_units: usize,
) -> Result<(Vec<String>, Vec<String>), SourceBuildError> {
    let (mut units, mut notes) = c_file_units(tree, touched)?;
    let (declaring, declared) = declaration_only(tree, text, touched);
    notes.extend(declared);
    let headers: Vec<String> = touched
        .iter()
        .filter(|f| f.ends_with(".h") && !declaring.contains(*f))
        .cloned()
        .collect();
    if headers.is_empty() {
        if units.is_empty() {
            return Err(SourceBuildError::NothingChanged {
                what: format!(
                    "changes in {} that reach no unit's code: declarations of names no file \
                     of the kernel uses, comments",
                    declaring.join(", ")
                ),
            });
        }
        return Ok((units, notes));
    }
    let kernel = KernelUnits::of(tree)?;
    let shown = headers.join(", ");
    let reached: Vec<String> = if headers
        .iter()
        .any(|h| crate::reach::FORCED_INCLUDES.contains(&h.as_str()))
    {
        kernel.c.iter().cloned().collect()
    } else {
        let index = IncludeIndex::of_tree(&tree.dir);
        let all = index.includers(&headers);
        let asm: Vec<&String> = all.iter().filter(|f| kernel.asm.contains(*f)).collect();
        if !asm.is_empty() {
            return Err(SourceBuildError::HeaderInAssembly {
                headers: shown,
                units: list_some(&asm),
            });
        }
        all.into_iter().filter(|f| kernel.c.contains(f)).collect()
    };
    let count = reached.len();
    if units.is_empty() && reached.is_empty() {
        return Err(SourceBuildError::NothingChanged {
            what: format!(
                "{shown}, which no unit built into the kernel includes (modules, other \
                 architectures or configurations)"
            ),
        });
    }
    for u in &reached {
        if !units.contains(u) {
            units.push(u.clone());
        }
    }
    if units.len() > max_units {
        return Err(SourceBuildError::TooManyUnits {
            headers: shown,
            count: units.len(),
            examples: list_some(&units.iter().collect::<Vec<_>>()),
            max: max_units,
        });
    }
    notes.push(format!(
        "{shown}: included by {count} units built into the kernel, each compiled before and \
         after: {}",
        reached.join(", ")
    ));
    Ok((units, notes))
}

/// The units that compile the diff's `.c` files: each file itself, or, when kbuild compiles
/// it only inside other files of its directory ([`crate::reach::c_includers`]), those of them
/// built into the kernel, with a note. A file neither built in nor part of a built-in unit
/// stays (a module's: compiling it tells [`SourceBuildError::NotBuiltIn`]).
pub fn c_file_units(
    tree: &SourceTree,
    touched: &[String],
) -> Result<(Vec<String>, Vec<String>), SourceBuildError> {
    let mut units: Vec<String> = Vec::new();
    let mut notes = Vec::new();
    let mut kernel: Option<KernelUnits> = None;
    for f in touched.iter().filter(|f| f.ends_with(".c")) {
        let includers = crate::reach::c_includers(&tree.dir, f);
        if includers.is_empty() {
            units.push(f.clone());
            continue;
        }
        let kernel = match &kernel {
            Some(k) => k,
            None => kernel.insert(KernelUnits::of(tree)?),
        };
        let built: Vec<&String> = includers.iter().filter(|u| kernel.c.contains(*u)).collect();
        if kernel.c.contains(f) || built.is_empty() {
            units.push(f.clone());
        }
        if !built.is_empty() {
            notes.push(format!(
                "{f}: compiled as part of {}, which include{} it",
                list_some(&built),
                if built.len() == 1 { "s" } else { "" }
            ));
        }
        units.extend(built.into_iter().cloned());
    }
    let mut seen = std::collections::HashSet::new();
    units.retain(|u| seen.insert(u.clone()));
    Ok((units, notes))
}

/// The diff's headers whose change only declares names no file of the tree mentions
/// ([`crate::additions`]): they change the code of no unit but the diff's own, so their
/// includers need not be compiled. With a note for each. When the tree cannot be searched,
/// none is (every header then reaches its includers, as before).
fn declaration_only(
    tree: &SourceTree,
    text: &str,
    touched: &[String],
) -> (Vec<String>, Vec<String>) {
    let Ok(files) = parse(text) else {
        return (Vec::new(), Vec::new());
    };
    let mut candidates = Vec::new();
    for f in files.iter().filter(|f| touched.contains(&f.path)) {
        if let Ok(old) = std::fs::read_to_string(tree.dir.join(&f.path))
            && let Some(d) = crate::additions::declarations(&old, f)
        {
            candidates.push((f.path.clone(), d));
        }
    }
    let all: Vec<String> = candidates
        .iter()
        .flat_map(|(_, d)| d.added.iter().chain(&d.removed).cloned())
        .collect();
    let Ok(used) = crate::additions::mentioned(&tree.dir, &all) else {
        return (Vec::new(), Vec::new());
    };
    let (mut declaring, mut notes) = (Vec::new(), Vec::new());
    for (header, d) in candidates {
        if !crate::additions::reaches_nothing(&header, &d, &used) {
            continue;
        }
        let mut what = Vec::new();
        if !d.added.is_empty() {
            what.push(format!(
                "declares names no file of the kernel uses ({})",
                d.added.join(", ")
            ));
        }
        if !d.removed.is_empty() {
            what.push(format!(
                "drops declarations only it used ({})",
                d.removed.join(", ")
            ));
        }
        notes.push(match what.is_empty() {
            true => format!(
                "{header}: its change is only comments and spacing; it changes no unit's code, \
                 so its includers are not compiled"
            ),
            false => format!(
                "{header}: its change only {}; it changes no other unit's code, so only the \
                 diff's own units are compiled",
                what.join(" and ")
            ),
        });
        declaring.push(header);
    }
    (declaring, notes)
}

/// The first few of a list, and how many more.
fn list_some(items: &[&String]) -> String {
    let mut s: Vec<String> = items.iter().take(6).map(|i| i.to_string()).collect();
    if items.len() > 6 {
        s.push(format!("{} more", items.len() - 6));
    }
    s.join(", ")
}

/// Steps 3 to 5 on units already compiled both ways; `report` has the diff's and the tree's
/// part filled in.
pub fn build_from_objects(
    kernel: &TargetKernel<'_>,
    objects: &[crate::compile::UnitObjects],
    mut report: SourceReport,
    meta: Metadata,
) -> Result<(Patch, SourceReport), SourceBuildError> {
    let mut data = DataSet::default();
    let mut code = Vec::new();
    let mut ignored = Vec::new();
    for (tag, o) in objects.iter().enumerate() {
        let a = analyze_unit(kernel, o, tag, &mut data, &mut report)?;
        if let Some(e) = a.refusal {
            return Err(e);
        }
        ignored.extend(a.ignored);
        for (_, result) in a.functions {
            let (kernel_name, linked) = result?;
            report.changed.push(kernel_name.clone());
            code.push(KernelCode {
                function: kernel_name,
                code: linked.code,
                relocations: linked.relocations,
            });
        }
    }
    if report.warn_rewritten {
        report.notes.push(
            "WARN() in the new code calls __warn() (WARN_ONCE: rate-limited, not once); BUG() \
             is a bare ud2"
                .into(),
        );
    }
    if !ignored.is_empty() {
        report
            .notes
            .push(format!("not patched: {}", ignored.join(", ")));
    }
    if code.is_empty() {
        return Err(SourceBuildError::NothingChanged {
            what: if ignored.is_empty() {
                "comments, or code the compiler emits identically".into()
            } else {
                ignored.join(", ")
            },
        });
    }
    let meta = Metadata {
        description: report.description(&meta.description),
        ..meta
    };
    let patch =
        build_kernel_patch_from_code(kernel.vmlinux, kernel.kallsyms, code, data.blocks, meta)?;
    Ok((patch, report))
}

/// A changed function as a site: its kernel name and linked code, or why it cannot be one.
pub type FunctionResult = Result<(String, crate::link::LinkedFunction), SourceBuildError>;

/// One unit's changed functions and what became of each.
pub struct UnitAnalysis {
    /// Every changed function (pre-fix names), `.cold` fragments and boot-time code included.
    pub changed: Vec<String>,
    /// Why no function of the unit can be patched (a changed variable, inlining the kernel
    /// hides, not built in), if so.
    pub refusal: Option<SourceBuildError>,
    /// Each function that would become a site: its kernel name and code, or why not.
    pub functions: Vec<(String, FunctionResult)>,
    /// Changed boot-time functions, not patched: `name (section: …)`.
    pub ignored: Vec<String>,
}

/// Steps 3 to 5 for one unit: the comparison, the unit's refusals, and each changed function's
/// run-pre check, IPA-RA check and link. Only an unreadable object is an error here.
pub fn analyze_unit(
    kernel: &TargetKernel<'_>,
    o: &crate::compile::UnitObjects,
    tag: usize,
    data: &mut DataSet,
    report: &mut SourceReport,
) -> Result<UnitAnalysis, SourceBuildError> {
    let parse = |b: &[u8]| {
        Unit::parse(b).map_err(|source| SourceBuildError::Object {
            unit: o.unit.clone(),
            source,
        })
    };
    let pre = parse(&o.pre)?;
    let (mut base, mut post) = (parse(&o.base)?, parse(&o.post)?);
    let mut d = diff(&base, &post);
    let mut out = UnitAnalysis {
        changed: Vec::new(),
        refusal: None,
        functions: Vec::new(),
        ignored: Vec::new(),
    };
    // The comparison's variables must go by the kernel's names: the same static locals, so
    // the same `name.N` numbering, as the kernel-layout build.
    let object_names = |u: &Unit| -> std::collections::BTreeSet<String> {
        u.objects().map(|(_, s)| s.name.clone()).collect()
    };
    let unseen_of = |d: &crate::objdiff::UnitDiff| -> Vec<String> {
        d.changed
            .iter()
            .map(|(p, _)| p.clone())
            .filter(|p| pre.defined(p).is_none())
            .collect()
    };
    if o.warn_rewritten {
        // A changed function the kernel does not have out of line (the rewrite made GCC stop
        // inlining it): its inlined copies in the kernel's callers would go unseen.
        let mut unseen = unseen_of(&d);
        if object_names(&base) != object_names(&pre) {
            unseen.push("(its static variables)".into());
        }
        match (&o.plain, unseen.is_empty()) {
            (_, true) => report.warn_rewritten = true,
            (Some((b, p)), false) => {
                base = parse(b)?;
                post = parse(p)?;
                d = diff(&base, &post);
                report.notes.push(format!(
                    "{}: compiling WARN() as a call changed GCC's inlining ({} out of line \
                     only then); compared as the kernel was built, so WARN() in the new code \
                     is refused",
                    o.unit,
                    unseen.join(", ")
                ));
            }
            (None, false) => {
                // No build without the rewrite to fall back on: comparing these would bind
                // the new code's static locals by names the kernel's build does not use.
                out.refusal = Some(SourceBuildError::Inlining {
                    unit: o.unit.clone(),
                    functions: unseen,
                });
                return Ok(out);
            }
        }
    }
    out.changed = d.changed.iter().map(|(p, _)| p.clone()).collect();
    if d.changed.is_empty() && d.data_changed.is_empty() && d.data_added.is_empty() {
        // Nothing of this unit changes (a header it includes changed code it does not use):
        // whether it is the kernel's does not matter.
        return Ok(out);
    }
    let unseen = unseen_of(&d);
    let in_kernel = pre
        .functions()
        .any(|(_, s)| !s.local && kernel.kallsyms.named(&s.name).next().is_some());
    if !unseen.is_empty() {
        out.refusal = Some(SourceBuildError::Inlining {
            unit: o.unit.clone(),
            functions: unseen,
        });
        return Ok(out);
    }
    if !in_kernel {
        out.refusal = Some(SourceBuildError::NotBuiltIn {
            unit: o.unit.clone(),
        });
        return Ok(out);
    }
    // Dynamic debug descriptors (`__dyndbg`) hold a call site's file, line and format for the
    // debugfs control file; the format printed is the one the call passes, so new code may
    // use the kernel's descriptor of the same call site even when its line moved.
    if let Some((name, _, section)) = d
        .data_changed
        .iter()
        .find(|(_, _, s)| !s.starts_with(".init") && !s.starts_with(".exit") && s != "__dyndbg")
    {
        out.refusal = Some(SourceBuildError::DataChanged {
            name: name.clone(),
            section: section.clone(),
            unit: o.unit.clone(),
        });
        return Ok(out);
    }
    // What the compiler laid out, before and after: a layout, enumerator, variable size or
    // external signature that changed refuses the unit.
    match (Layouts::of(&base), Layouts::of(&post)) {
        (Ok(before), Ok(after)) => {
            if !after.has_debug_info {
                report.notes.push(format!(
                    "{}: built without debug information, so type layouts were compared only \
                     where the diff touches a definition",
                    o.unit
                ));
            }
            let changes = before.changes(&after);
            if !changes.is_empty() {
                out.refusal = Some(SourceBuildError::LayoutChange {
                    unit: o.unit.clone(),
                    changes: changes.into_iter().map(|c| c.what).collect(),
                });
                return Ok(out);
            }
        }
        (Err(e), _) | (_, Err(e)) => {
            out.refusal = Some(SourceBuildError::Dwarf {
                unit: o.unit.clone(),
                source: e,
            });
            return Ok(out);
        }
    }
    // Data the fix adds that no new code refers to (new code that did would be refused at
    // link): said, never dropped silently.
    for (name, section) in &d.data_added {
        if section.starts_with(".init") || section.starts_with(".exit") {
            continue;
        }
        if !name.starts_with("__ksymtab") && !name.starts_with("__kstrtab") {
            report.notes.push(format!(
                "{}: {name} ({section}) is data the fix adds that no replaced function uses; \
                 not in the patch",
                o.unit
            ));
        }
    }
    // A new EXPORT_SYMBOL is a section `___ksymtab+NAME` (or `___ksymtab_gpl+NAME`) of its own.
    let sections = |u: &Unit| -> std::collections::BTreeSet<String> {
        u.sections.iter().map(|s| s.name.clone()).collect()
    };
    let base_sections = sections(&base);
    for sec in sections(&post).difference(&base_sections) {
        if let Some((_, sym)) = sec
            .strip_prefix("___ksymtab")
            .and_then(|rest| rest.split_once('+'))
        {
            report.notes.push(format!(
                "{}: the fix exports {sym}; a live patch cannot add an export, so a module \
                 that needs it loads only after a reboot into the fixed kernel",
                o.unit
            ));
        }
    }
    let linker = Linker {
        kernel: Kernel {
            vmlinux: kernel.vmlinux,
            kallsyms: kernel.kallsyms,
        },
        pre: &base,
        post: &post,
        kernel_pre: &pre,
        diff: &d,
        unit_tag: tag,
    };
    for (pre_name, post_name) in &d.changed {
        let sec = section_of(&post, post_name);
        if sec.starts_with(".init") || sec.starts_with(".exit") {
            out.ignored
                .push(format!("{pre_name} ({sec}: boot-time code, already run)"));
            continue;
        }
        if post_name.ends_with(".cold") {
            continue; // carried in its parent's code
        }
        let link_err = |source| SourceBuildError::Link {
            unit: o.unit.clone(),
            source,
        };
        // Only a unit compiled with IPA-RA on has callers that depend on a callee's clobbers.
        let ipa_ra = match o.ipa_ra {
            true => check_ipa_ra(&pre, &post, pre_name, post_name, &d.changed),
            false => Ok(()),
        };
        let result = ipa_ra
            .and_then(|()| linker.check_pre(pre_name).map_err(link_err))
            .and_then(|kernel_name| {
                let linked = linker
                    .link(post_name, &kernel_name, data, &mut report.resolved)
                    .map_err(link_err)?;
                Ok((kernel_name, linked))
            });
        if let Ok((_, linked)) = &result {
            for c in &linked.carried {
                if d.added.contains(c) && !report.added.contains(c) {
                    report.added.push(c.clone());
                }
            }
        }
        out.functions.push((pre_name.clone(), result));
    }
    Ok(out)
}

/// The new version of a replaced function may clobber only what the old one did, if callers
/// in its unit stay unreplaced ([`crate::clobbers`]).
fn check_ipa_ra(
    pre: &Unit,
    post: &Unit,
    pre_name: &str,
    post_name: &str,
    changed: &[(String, String)],
) -> Result<(), SourceBuildError> {
    let (Some(a), Some(b)) = (pre.defined(pre_name), post.defined(post_name)) else {
        return Ok(());
    };
    let old = Clobbers::new(pre).of(a);
    let new = Clobbers::new(post).of(b);
    if new.is_subset_of(old) {
        return Ok(());
    }
    let callers: Vec<String> = callers_in_unit(pre, a)
        .into_iter()
        .map(|c| pre.symbols[c].name.clone())
        .filter(|c| !changed.iter().any(|(p, _)| p == c))
        .collect();
    if callers.is_empty() {
        return Ok(());
    }
    Err(SourceBuildError::IpaRa {
        function: pre_name.to_string(),
        registers: new.minus(old),
        callers,
    })
}

fn section_of(u: &Unit, name: &str) -> String {
    u.defined(name)
        .and_then(|i| u.symbols[i].section)
        .map(|s| u.sections[s].name.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str =
        "struct s {\n\tint a; /* the count */\n\tlong b;\n};\n\nint f(void)\n{\n\treturn 1;\n}\n";

    fn check(diff: &str) -> Result<Vec<String>, SourceBuildError> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fs")).unwrap();
        std::fs::write(dir.path().join("fs/x.c"), OLD).unwrap();
        check_diff(diff, "fix.patch", Some(dir.path()))
    }

    #[test]
    fn a_struct_whose_comments_alone_change_is_not_a_type_change() {
        let comment = "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,4 +1,5 @@\n struct s {\n-\tint a; /* the count */\n+\tint a;   /* how many:\n+\t\t    the count */\n \tlong b;\n };\n";
        assert_eq!(check(comment).unwrap(), vec!["fs/x.c".to_string()]);
        // A comment-only hunk in a function next to it is fine too, as before.
        let both = "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,9 +1,9 @@\n struct s {\n-\tint a; /* the count */\n+\tint a; // the count\n \tlong b;\n };\n \n int f(void)\n {\n-\treturn 1;\n+\treturn 2;\n }\n";
        assert!(check(both).is_ok());
    }

    #[test]
    fn a_struct_whose_members_change_is_refused_with_its_line() {
        let member = "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,4 +1,4 @@\n struct s {\n \tint a; /* the count */\n-\tlong b;\n+\tint b;\n };\n";
        match check(member) {
            Err(SourceBuildError::TypeChange { name, line, .. }) => {
                assert_eq!((name.as_str(), line), ("struct s", 3));
            }
            other => panic!("expected a type change, got {other:?}"),
        }
        // A comment turned into code is a change, though the words are the same.
        let uncommented = "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,4 +1,4 @@\n struct s {\n-\tint a; /* the count */\n+\tint a; int count;\n \tlong b;\n };\n";
        assert!(matches!(
            check(uncommented),
            Err(SourceBuildError::TypeChange { .. })
        ));
    }

    #[test]
    fn an_enum_gaining_a_state_is_no_type_change_unless_a_value_moves() {
        let old = "enum state {\n\tIDLE,\n\tBUSY,\n\tNR_STATES\n};\n";
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("fs")).unwrap();
        std::fs::write(dir.path().join("fs/x.c"), old).unwrap();
        let appended = "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,5 +1,6 @@\n enum state {\n \tIDLE,\n \tBUSY,\n-\tNR_STATES\n+\tNR_STATES,\n+\tBROKEN = 9\n };\n";
        assert!(check_diff(appended, "fix.patch", Some(dir.path())).is_ok());
        let before_count = "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,5 +1,6 @@\n enum state {\n \tIDLE,\n \tBUSY,\n+\tBROKEN,\n \tNR_STATES\n };\n";
        assert!(matches!(
            check_diff(before_count, "fix.patch", Some(dir.path())),
            Err(SourceBuildError::TypeChange { name, .. }) if name == "enum state"
        ));
    }

    #[test]
    fn a_diff_that_does_not_apply_exactly_is_judged_strictly() {
        // Its context is not what the file says: the new text is unknown, so a touched struct
        // counts as changed even if the hunk only rewords a comment.
        let stale = "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -1,4 +1,4 @@\n struct s {\n-\tint a; /* the number */\n+\tint a; /* the count */\n \tlong b;\n };\n";
        assert!(matches!(
            check(stale),
            Err(SourceBuildError::TypeChange { .. })
        ));
    }

    #[test]
    fn a_c_file_compiled_inside_another_unit_is_built_in_that_unit() {
        let dir = tempfile::tempdir().unwrap();
        let sched = dir.path().join("kernel/sched");
        std::fs::create_dir_all(&sched).unwrap();
        std::fs::write(sched.join("build_policy.c"), "#include \"rt.c\"\n").unwrap();
        std::fs::write(sched.join("rt.c"), "int rt(void) { return 1; }\n").unwrap();
        std::fs::write(sched.join("core.c"), "int core(void) { return 1; }\n").unwrap();
        std::fs::write(dir.path().join(".config"), "").unwrap();
        std::fs::write(
            dir.path().join(".hotpatch-units"),
            "kernel/sched/build_policy.c\nkernel/sched/core.c\n",
        )
        .unwrap();
        let tree = SourceTree {
            dir: dir.path().to_path_buf(),
            cc: "gcc".into(),
            describe: "test".into(),
            prepared_now: false,
        };
        let touched = [
            "kernel/sched/rt.c".to_string(),
            "kernel/sched/core.c".to_string(),
        ];
        let (units, notes) = units_to_compile(&tree, "", &touched, 64).unwrap();
        assert_eq!(
            units,
            ["kernel/sched/build_policy.c", "kernel/sched/core.c"]
        );
        assert!(
            notes[0].contains("kernel/sched/rt.c: compiled as part of kernel/sched/build_policy.c"),
            "{notes:?}"
        );
    }

    #[test]
    fn a_header_declaring_only_new_names_reaches_only_the_diffs_own_units() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("include/linux")).unwrap();
        std::fs::create_dir_all(dir.path().join("mm")).unwrap();
        std::fs::write(
            dir.path().join("include/linux/x.h"),
            "#ifndef X_H\n#define X_H\nint old_one(void);\n#endif\n",
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("fs")).unwrap();
        std::fs::write(dir.path().join("fs/x.c"), OLD).unwrap();
        // mm/b.c includes the header and already calls `taken`, declared elsewhere.
        std::fs::write(
            dir.path().join("mm/b.c"),
            "#include <linux/x.h>\nint g(void) { return taken(); }\n",
        )
        .unwrap();
        // The kernel's unit list, as `make -n vmlinux` would have left it.
        std::fs::write(dir.path().join(".config"), "").unwrap();
        std::fs::write(dir.path().join(".hotpatch-units"), "fs/x.c\nmm/b.c\n").unwrap();
        let tree = SourceTree {
            dir: dir.path().to_path_buf(),
            cc: "gcc".into(),
            describe: "test".into(),
            prepared_now: false,
        };
        let header = |added: &str| {
            format!(
                "--- a/include/linux/x.h\n+++ b/include/linux/x.h\n@@ -3,2 +3,3 @@\n int old_one(void);\n+{added}\n #endif\n"
            )
        };
        let c_part =
            "--- a/fs/x.c\n+++ b/fs/x.c\n@@ -8,1 +8,1 @@\n-\treturn 1;\n+\treturn new_one();\n";
        let both = format!("{}{c_part}", header("int new_one(void);"));
        let touched = check_diff(&both, "fix.patch", Some(dir.path())).unwrap();
        // mm/b.c includes the header but cannot compile differently: only fs/x.c is compiled.
        let (units, notes) = units_to_compile(&tree, &both, &touched, 64).unwrap();
        assert_eq!(units, vec!["fs/x.c".to_string()]);
        assert!(notes[0].contains("only declares names") && notes[0].contains("new_one"));
        // The header alone changes nothing that could be patched.
        let alone = header("int new_one(void);");
        assert!(matches!(
            units_to_compile(&tree, &alone, &["include/linux/x.h".into()], 64),
            Err(SourceBuildError::NothingChanged { .. })
        ));
        // A name another file already uses is not new: the header reaches its includers.
        let used = format!("{}{c_part}", header("int taken(void);"));
        let touched = check_diff(&used, "fix.patch", Some(dir.path())).unwrap();
        let (units, _) = units_to_compile(&tree, &used, &touched, 64).unwrap();
        assert_eq!(units, vec!["fs/x.c".to_string(), "mm/b.c".to_string()]);
    }
}
