//! `vmm bench coverage`: on the running stock kernel, the share of all named text functions a
//! function replacement would be accepted for, per boot shape (vCPUs, CPU model, LA57), with
//! every refusal classified by the mechanism that caused it.
//!
//! What is measured: for each function `F`, a one-site patch replacing `F` by `ret` (a
//! [`SiteKind::Function`] site at `F+0`, `expected` = the vmlinux file's bytes of `F` over its
//! kallsyms extent, as [`linux_guest::patch::build_kernel_patch`] builds them) is given to
//! [`Engine::dry_run`]: every check an apply makes (parse, signature, identity, every rule, arena
//! space), nothing written. The files are signed by a key made for the run, which the engine
//! trusts: signing and checking cost ~0.1 ms of the ~2.5 ms a function takes, and an engine
//! accepting unsigned patches logs a warning for each one (50,000 lines).
//!
//! "All named text functions" = every kallsyms text symbol (`t`/`T`) with a non-zero extent,
//! aliases and `.cold`/`.part` fragments included: each is a name an operator could write in a
//! patch. A name several symbols share is swept as `name,N` (the N-th in the engine's order,
//! livepatch's sympos), as a patch must name it. Nothing is left out silently; the tool refuses
//! three kinds itself, each its own class, without asking the engine:
//! - the name is not unique and its position could not be computed (never, in practice);
//! - the vmlinux file does not hold the function's bytes over its extent;
//! - its extent is larger than a patch file may carry.
//!
//! The second denominator, "patchable functions", is all of them but what the running kernel
//! cannot call ([`Excluded`]): freed init text (`[__init_begin, __init_end)`), `.cold`/`.part`
//! fragments of a parent the image has (patched by patching the parent, as kpatch does) and the
//! static call trampolines (`.static_call.text`, which `static_call_update()` rewrites). Each
//! excluded class is counted and printed with its outcomes; the target is judged on this share.
//!
//! Every other refusal is the engine's, named from its error: a rule (too short, a branch into
//! the jump, a run-time rewrite in the way...), freed init memory (`[__init_begin, __init_end)`:
//! unmapped, or mapped with other bytes, after boot), or "the bytes differ from the file". For
//! the last the tool reads the guest's bytes and attributes every byte that differs (after the
//! rewrites the engine reconciles) to what rewrote it: the kernel's table of that mechanism
//! (alternatives, paravirt, retpolines, SMP locks...; [`KernelTextSites`]), the static call
//! trampolines' section (`static_call_update()` retargets them), or the KASLR relocation tables the build appends to the vmlinux (a field that holds the file's value moved
//! by the slide, as the decompressor's `handle_relocations` moves it). A difference nothing
//! explains is "unexplained", the one class that names no mechanism (target: none).
//!
//! "Unsafe accepted" comes from an audit independent of the engine's rules, over every accepted
//! function: the jump's displaced range (computed here from the guest's bytes, which the engine
//! planned on: a boot-time rewrite can move where the first instructions end) must not be
//! entered by a direct branch from anywhere in the kernel's text (a `.cold` part jumping back,
//! a tail call into the middle), hold an instruction with an exception fixup or a fixup's
//! target, hold a run-time rewrite site (from the kernel's tables, and the static call
//! trampolines), the start of another symbol, an `endbr64`, a call before its last
//! instruction, or run past the function. Indirect branches, the bug table and BPF's text pokes
//! are not audited.
//!
//! Speed: every dry run reads guest memory through QEMU's gdbstub, which serves it only while
//! the guest is halted; the guest is halted once for the whole sweep, so no read halts and
//! continues it on its own ([`QemuGuest`]'s reads inside a pause go straight to the stub). A
//! sweep runs in passes over residues mod [`STRIDE`] in bit-reversed order, so after 2^j passes
//! the functions done are exactly every (STRIDE / 2^j)-th: when a time budget is set and the
//! next doubling would not fit, the sweep stops there and the report says which functions it
//! sampled.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use iced_x86::{Code, Decoder, DecoderOptions, FlowControl, Instruction};
use serde::Serialize;
use thiserror::Error;

use super::HostInfo;
use crate::demo_linux;
use guest_control::{GuestControl, GuestError, VcpuState};
use linux_guest::attach::KernelImage;
use linux_guest::boot_rewrites::LinuxBootRewrites;
use linux_guest::text_sites::{KernelTextSites, Mechanism};
use patch_engine::plan::{ENDBR64, JMP_ABS_LEN, JMP_REL32_LEN, NOP1, NOP5, PlanError};
use patch_engine::rewrites::{GuestMemory, SiteText, TextRewrites};
use patch_engine::target::TargetError;
use patch_engine::{Engine, EngineConfig, EngineError};
use patch_format::{
    ImageSymbol, Location, Metadata, Patch, SecretKey, Site, SiteKind, TargetIdentity,
};
use qemu_backend::QemuGuest;

/// Passes of a sweep: residues mod this, in bit-reversed order (a power of two).
pub const STRIDE: usize = 64;
/// Target: at least this share of all named text functions accepted, at every boot shape.
pub const TARGET_ACCEPTED: f64 = 0.95;
/// Examples of functions kept per class in the table.
const EXAMPLES: usize = 3;
/// CR4.LA57: 5-level paging.
const CR4_LA57: u64 = 1 << 12;
/// Progress lines on stderr this often.
const PROGRESS: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum CoverageError {
    #[error("booting the kernel under QEMU ({vcpus} vCPUs, CPU {cpu}) failed")]
    Boot {
        vcpus: usize,
        cpu: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    Qemu(#[from] qemu_backend::QemuError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("cannot read the kernel image")]
    Image(#[source] linux_guest::attach::LinuxAttachError),
    #[error("the guest has no parked vCPU to read its paging state from")]
    NoVcpu,
    #[error("cannot create a temporary directory for the benchmark (check TMPDIR)")]
    TempDir(#[source] std::io::Error),
    #[error("cannot make the run's signing key")]
    Key(#[source] patch_format::KeyFileError),
}

/// QEMU's CPU model for a boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuModel {
    /// QEMU's default (`qemu64`): 4-level paging.
    Default,
    /// `-cpu max`: every feature the accelerator offers; under TCG that includes LA57, and a
    /// Debian kernel (`CONFIG_X86_5LEVEL=y`) then runs on 5-level page tables.
    Max,
}

impl CpuModel {
    pub fn parse(s: &str) -> Option<CpuModel> {
        match s {
            "default" => Some(CpuModel::Default),
            "max" => Some(CpuModel::Max),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            CpuModel::Default => "default",
            CpuModel::Max => "max",
        }
    }

    fn qemu_arg(self) -> Option<&'static str> {
        match self {
            CpuModel::Default => None,
            CpuModel::Max => Some("max"),
        }
    }
}

/// One boot to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootShape {
    pub vcpus: usize,
    pub cpu: CpuModel,
}

/// A refusal class.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Class {
    pub name: String,
    /// The class names the mechanism (a rule, a kernel rewrite, freed init text...); false
    /// only for differences nothing explains and for failures that are no rule at all.
    pub names_mechanism: bool,
}

impl Class {
    fn named(name: impl Into<String>) -> Class {
        Class {
            name: name.into(),
            names_mechanism: true,
        }
    }

    fn unnamed(name: impl Into<String>) -> Class {
        Class {
            name: name.into(),
            names_mechanism: false,
        }
    }
}

/// The class of a function the tool cannot even name in a patch (name not unique).
pub const DUPLICATE_NAME: &str =
    "duplicate name (not unique among the image's symbols: a patch cannot name it)";
/// A difference from the file that no mechanism's table explains.
pub const UNEXPLAINED: &str = "bytes differ from the file (unexplained)";
/// Functions in the init memory (`[__init_begin, __init_end)`: init text, and the exit text of
/// built-in code), which the kernel frees once booted.
pub const FREED_INIT: &str = "freed init memory (.init.text, .exit.text: discarded after boot)";
/// Static call trampolines, which `static_call_update()` retargets while the kernel runs; no
/// table lists them: they are the section.
const STATIC_CALL_TRAMPOLINE: &str =
    "a static call trampoline (.static_call.text, retargeted by static_call_update)";

/// One refusal class in a boot's report.
#[derive(Debug, Clone, Serialize)]
pub struct ClassCount {
    pub class: String,
    pub names_mechanism: bool,
    pub count: usize,
    /// Of the functions swept.
    pub pct: f64,
    /// Refusals of this class among the patchable functions.
    pub patchable_count: usize,
    /// Of the patchable functions swept.
    pub patchable_pct: f64,
    pub examples: Vec<String>,
}

/// A class of named text left out of the patchable functions.
#[derive(Debug, Clone, Serialize)]
pub struct ExcludedCount {
    pub class: Excluded,
    pub reason: &'static str,
    /// Swept functions of the class.
    pub count: usize,
    /// Of the functions swept.
    pub pct: f64,
    /// Of them, what the engine accepted anyway (the rest it refused).
    pub accepted: usize,
    pub examples: Vec<String>,
}

/// One refused function.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    pub function: String,
    /// Link-time address.
    pub addr: String,
    pub class: String,
    /// The engine's message (or the tool's reason).
    pub detail: String,
}

/// An accepted function the audit flags.
#[derive(Debug, Clone, Serialize)]
pub struct Hazard {
    pub function: String,
    pub addr: String,
    pub kind: String,
    pub detail: String,
}

/// Accepted functions the audit flags, by kind of hazard.
#[derive(Debug, Clone, Serialize)]
pub struct HazardCount {
    pub kind: String,
    pub count: usize,
    pub examples: Vec<String>,
}

/// The targets of one boot: `true` = met.
#[derive(Debug, Clone, Serialize)]
pub struct BootTargets {
    pub accepted_at_least_95_pct: bool,
    pub no_unsafe_accepted: bool,
    pub every_refusal_names_its_mechanism: bool,
}

/// One boot's sweep.
#[derive(Debug, Clone, Serialize)]
pub struct BootCoverage {
    pub vcpus: usize,
    pub cpu: CpuModel,
    /// CR4.LA57 of a parked vCPU.
    pub la57: bool,
    pub cr4: String,
    pub kaslr_slide: String,
    /// The kernel booted on one CPU and would rewrite its lock prefixes on gaining one.
    pub smp_locks_live: bool,
    /// The jump a function replacement gets here (`jmp rel32` when the arena is in reach).
    pub jump_len: usize,
    /// All named text functions of the image (kallsyms text symbols with a non-zero extent).
    pub functions: usize,
    /// Every `every`-th of them (by address) was swept.
    pub every: usize,
    pub swept: usize,
    pub accepted: usize,
    /// Of the functions swept.
    pub accepted_pct: f64,
    /// Swept functions the running kernel can call: all swept but the excluded classes.
    pub patchable: usize,
    /// Of those, accepted.
    pub accepted_patchable: usize,
    /// Of the patchable functions swept: what the target is judged on.
    pub accepted_patchable_pct: f64,
    /// What is not counted among the patchable functions, by class, with its outcomes.
    pub excluded: Vec<ExcludedCount>,
    /// Functions whose name is not unique, swept as `name,N`, and how many were accepted.
    pub duplicate_names: usize,
    pub duplicate_names_accepted: usize,
    /// Refusals whose class names no mechanism.
    pub unnamed_refusals: usize,
    /// Of the refusals: the share whose class names its mechanism.
    pub named_refusals_pct: f64,
    /// Accepted functions the audit flags.
    pub unsafe_accepted: usize,
    pub classes: Vec<ClassCount>,
    pub hazard_kinds: Vec<HazardCount>,
    pub hazards: Vec<Hazard>,
    pub refusals: Vec<Refusal>,
    pub accepted_functions: Vec<String>,
    pub sweep_seconds: f64,
    pub us_per_function: f64,
    pub targets: BootTargets,
}

/// Everything `vmm bench coverage` measured (written as JSON).
#[derive(Debug, Clone, Serialize)]
pub struct CoverageReport {
    pub benchmark: &'static str,
    pub host: HostInfo,
    pub accel: &'static str,
    pub kernel: String,
    pub boots: Vec<BootCoverage>,
    /// Every boot met every target.
    pub all_met: bool,
}

/// A function of the image, link-time.
#[derive(Debug, Clone)]
struct Function {
    name: String,
    addr: u64,
    /// Kallsyms extent (to the next symbol at a greater address): what the patch expects.
    size: u64,
    /// Extent as the engine sees it (cut at the next ftrace entry): what the audit decodes.
    cut: u64,
    unique: bool,
    /// For a name several symbols share: its position among them in the engine's order
    /// (address, then name), as a patch names it (`name,N`, livepatch's sympos).
    sympos: Option<usize>,
    /// Not a function the running kernel can call, left out of the patchable share.
    excluded: Option<Excluded>,
}

impl Function {
    /// The name a patch gives it: `name`, or `name,N` when the name is not unique.
    fn patch_name(&self) -> Option<String> {
        match (self.unique, self.sympos) {
            (true, _) => Some(self.name.clone()),
            (false, Some(n)) => Some(format!("{},{n}", self.name)),
            (false, None) => None,
        }
    }
}

/// Named text that is not a function the running kernel can call, so not counted among the
/// patchable functions (each class is counted and printed, nothing is dropped silently).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Excluded {
    /// In `[__init_begin, __init_end)`: freed (and poisoned) once the kernel booted.
    FreedInit,
    /// A compiler-split `.cold`/`.part` fragment of a function the image has: patched by
    /// patching its parent, as kpatch does.
    Fragment,
    /// A static call trampoline (`.static_call.text`): `static_call_update()` rewrites it.
    StaticCallTrampoline,
}

impl Excluded {
    pub fn reason(self) -> &'static str {
        match self {
            Excluded::FreedInit => {
                "freed init memory (__init_begin..__init_end: discarded after boot, not callable)"
            }
            Excluded::Fragment => {
                ".cold/.part fragment of a parent function (patched by patching the parent, as kpatch does)"
            }
            Excluded::StaticCallTrampoline => {
                "static call trampoline (.static_call.text, __SCT__*: rewritten by static_call_update)"
            }
        }
    }
}

/// The parent a compiler-split fragment's name points to (`f` of `f.cold`, `f.cold.3`,
/// `f.part.0`, `f.isra.0.cold`), if the name is a fragment's.
pub fn fragment_parent(name: &str) -> Option<&str> {
    let cold = name.match_indices(".cold").map(|(i, _)| i).find(|&i| {
        let rest = &name[i + ".cold".len()..];
        rest.is_empty() || rest.starts_with('.')
    });
    let cut = cold.into_iter().chain(name.find(".part.")).min()?;
    let parent = &name[..cut];
    (!parent.is_empty()).then_some(parent)
}

/// Why `(name, addr)` is not a patchable function, or `None`. `text_names` says whether a
/// name is a text symbol of the image.
fn exclusion(
    name: &str,
    addr: u64,
    freed: (u64, u64),
    static_calls: (u64, u64),
    text_names: &dyn Fn(&str) -> bool,
) -> Option<Excluded> {
    if (freed.0..freed.1).contains(&addr) {
        return Some(Excluded::FreedInit);
    }
    if (static_calls.0..static_calls.1).contains(&addr) || name.starts_with("__SCT__") {
        return Some(Excluded::StaticCallTrampoline);
    }
    fragment_parent(name)
        .filter(|p| text_names(p))
        .map(|_| Excluded::Fragment)
}

/// All named text functions, by (address, name).
fn functions(image: &KernelImage) -> Vec<Function> {
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let mut cut_syms = info.symbols.clone();
    image.text_sites.cut_at_function_entries(&mut cut_syms);
    let mut count: HashMap<&str, usize> = HashMap::new();
    for s in &info.symbols {
        *count.entry(s.name.as_str()).or_default() += 1;
    }
    // The engine orders symbols by (address, name) and takes `name,N` as the N-th.
    let mut order: Vec<(u64, &str)> = info
        .symbols
        .iter()
        .filter(|s| count.get(s.name.as_str()).is_some_and(|&c| c > 1))
        .map(|s| (s.addr, s.name.as_str()))
        .collect();
    order.sort_unstable();
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut sympos: HashMap<(u64, &str), usize> = HashMap::new();
    for (addr, name) in order {
        let n = seen.entry(name).or_default();
        *n += 1;
        sympos.entry((addr, name)).or_insert(*n);
    }
    let sym = |n: &str| image.kallsyms.lookup(n).unwrap_or(0);
    let freed = (sym("__init_begin"), sym("__init_end"));
    let static_calls = (
        sym("__static_call_text_start"),
        sym("__static_call_text_end"),
    );
    let text_names = |n: &str| image.kallsyms.named(n).any(|s| s.is_text());
    info.symbols
        .iter()
        .zip(&cut_syms)
        .filter(|(s, _)| s.function && s.size > 0)
        .map(|(s, c)| Function {
            name: s.name.clone(),
            addr: s.addr,
            size: s.size,
            cut: c.size,
            unique: count.get(s.name.as_str()) == Some(&1),
            sympos: sympos.get(&(s.addr, s.name.as_str())).copied(),
            excluded: exclusion(&s.name, s.addr, freed, static_calls, &text_names),
        })
        .collect()
}

/// The residues mod [`STRIDE`] in the order the passes take them: bit-reversed, so the first
/// 2^j of them are exactly the multiples of STRIDE / 2^j.
pub fn pass_order() -> Vec<usize> {
    let bits = STRIDE.trailing_zeros();
    (0..STRIDE)
        .map(|j| j.reverse_bits() >> (usize::BITS - bits))
        .collect()
}

/// The function-replacement patch for `f`, unsigned.
fn replacement(
    identity: &TargetIdentity,
    key: &SecretKey,
    name: &str,
    expected: Vec<u8>,
) -> Result<Vec<u8>, String> {
    let mut p = Patch {
        meta: Metadata {
            name: "coverage".into(),
            created: 1,
            ..Default::default()
        },
        target: identity.clone(),
        sites: vec![Site {
            kind: SiteKind::Function,
            target: Location::Symbol {
                name: name.to_string(),
                offset: 0,
            },
            expected,
            code: vec![0xc3],
            relocations: Vec::new(),
        }],
        data: Vec::new(),
    };
    p.normalize();
    p.to_file_signed(key).map_err(|e| e.to_string())
}

/// The class of an engine refusal, from its variant. `init` says the function lies in the
/// kernel's init memory (freed after boot). Byte mismatches are attributed by the caller.
pub fn class_of(e: &EngineError, init: bool) -> Class {
    use EngineError as E;
    match e {
        E::Plan(p) => plan_class(p),
        E::Target(TargetError::Ambiguous { .. }) => Class::named(DUPLICATE_NAME),
        E::Target(TargetError::NoSymbol { .. }) => {
            Class::unnamed("the engine knows no such symbol")
        }
        E::Target(TargetError::OffsetOutside { .. }) => {
            Class::unnamed("site offset outside the symbol")
        }
        E::Target(_) => Class::unnamed("wrong target identity"),
        E::Unmapped { .. } if init => Class::named(FREED_INIT),
        E::Unmapped { .. } => Class::named("not mapped in the running kernel (not init memory)"),
        E::Discontiguous { .. } => Class::named("physically discontiguous pages"),
        E::NotInCode { .. } => Class::named("not inside a sized function symbol"),
        E::InArena { .. } => Class::named("inside the patch arena"),
        E::Overlap { .. } | E::SelfOverlap { .. } => Class::named("overlaps another site"),
        E::ArenaFull { .. } => Class::named("the arena has no room for it"),
        E::Reloc { .. } => Class::named("a relocation cannot be resolved"),
        other => Class::unnamed(format!("no rule: {}", variant(other))),
    }
}

fn plan_class(p: &PlanError) -> Class {
    use PlanError as P;
    match p {
        P::FtraceActive { .. } => Class::named("ftrace is tracing it (its entry holds a call)"),
        P::LiveRewrite { what, .. } => Class::named(format!(
            "the jump would displace a run-time rewrite: {what}"
        )),
        P::ExpectedMismatch { .. } => Class::unnamed(UNEXPLAINED),
        P::RewrittenByOs { what, .. } => Class::named(format!(
            "bytes differ where the kernel rewrote its code, in a form not reconciled: {what}"
        )),
        P::ColdPart { .. } => {
            Class::named("a compiler-split .cold part (its parent jumps into it; patch the parent)")
        }
        P::ExpectedLength { .. } => Class::unnamed("the guest holds fewer bytes than expected"),
        P::TooShort { .. } => Class::named("too short for the jump"),
        P::BranchIntoRange { .. } => Class::named("a branch in the function lands inside the jump"),
        P::DisplacesEndbr { .. } => Class::named("the jump would overwrite an endbr64"),
        P::CallNotLast { .. } => {
            Class::named("a call would be displaced before other instructions")
        }
        P::Unrelocatable { .. } => Class::named("a displaced instruction cannot be relocated"),
        P::PreemptedInsideJump { .. } => Class::named(
            "the kernel preempts anywhere (preempt=full) and the jump covers several instructions",
        ),
        P::Undecodable { .. } => Class::named("bytes do not decode as instructions"),
        P::Verify { .. } => Class::unnamed("the built trampoline does not verify (engine bug)"),
        other => Class::named(format!("site shape: {}", plan_variant(other))),
    }
}

fn variant(e: &EngineError) -> String {
    let d = format!("{e:?}");
    d.split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

fn plan_variant(e: &PlanError) -> String {
    let d = format!("{e:?}");
    d.split(['(', ' ', '{'])
        .next()
        .unwrap_or_default()
        .to_string()
}

/// The class of a byte mismatch, from the differing offsets of `expected` (after the engine's
/// reconciliation) against `current`: what rewrote the first difference, or [`UNEXPLAINED`]
/// when anything differs that nothing explains. `explain(i)` names what rewrote offset `i`.
pub fn mismatch_class(
    expected: &[u8],
    current: &[u8],
    explain: impl Fn(usize) -> Option<&'static str>,
) -> (Class, String) {
    let diffs: Vec<usize> = expected
        .iter()
        .zip(current)
        .enumerate()
        .filter(|(_, (e, c))| e != c)
        .map(|(i, _)| i)
        .collect();
    if let Some(&i) = diffs.iter().find(|&&i| explain(i).is_none()) {
        return (
            Class::unnamed(UNEXPLAINED),
            format!(
                "{} bytes differ; +{i:#x} (file {:#04x}, guest {:#04x}) is explained by no table of kernel text rewrites nor a KASLR relocation",
                diffs.len(),
                expected[i],
                current[i]
            ),
        );
    }
    let Some(first) = diffs.first().and_then(|&i| explain(i)) else {
        // The engine saw a difference the reconciled bytes do not show: not explained.
        return (
            Class::unnamed(UNEXPLAINED),
            "the engine saw a difference this tool's reconciliation does not".into(),
        );
    };
    let mut all: Vec<&'static str> = diffs.iter().filter_map(|&i| explain(i)).collect();
    all.sort_unstable();
    all.dedup();
    (
        Class::named(format!("bytes differ from the file at {first}")),
        format!("{} bytes differ, all at: {}", diffs.len(), all.join("; ")),
    )
}

/// How the decompressor moves a KASLR relocation's field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RelocKind {
    /// 4 bytes, plus the slide.
    Add32,
    /// 4 bytes, minus the slide (per-CPU references).
    Inverse32,
    /// 8 bytes, plus the slide.
    Add64,
}

impl RelocKind {
    fn name(self) -> &'static str {
        match self {
            RelocKind::Add32 => "a KASLR relocation (32-bit, vmlinux.relocs)",
            RelocKind::Inverse32 => "a KASLR inverse relocation (32-bit, per-CPU, vmlinux.relocs)",
            RelocKind::Add64 => "a KASLR relocation (64-bit, vmlinux.relocs)",
        }
    }

    fn width(self) -> u64 {
        match self {
            RelocKind::Add64 => 8,
            _ => 4,
        }
    }

    /// `guest` is `file` moved as the decompressor moves this kind by `slide`.
    fn moved(self, file: &[u8], guest: &[u8], slide: u64) -> bool {
        let le = |b: &[u8]| {
            let mut v = [0u8; 8];
            v[..b.len()].copy_from_slice(b);
            u64::from_le_bytes(v)
        };
        let (x, y) = (le(file), le(guest));
        match self {
            RelocKind::Add32 => (y as u32) == (x as u32).wrapping_add(slide as u32),
            RelocKind::Inverse32 => (y as u32) == (x as u32).wrapping_sub(slide as u32),
            RelocKind::Add64 => y == x.wrapping_add(slide),
        }
    }
}

/// The KASLR relocation tables `arch/x86/tools/relocs` appends to the kernel before
/// compression: read backwards from the end of the decompressed image, zero-terminated lists of
/// 32-bit relocations, inverse 32-bit ones, then 64-bit ones, each a link-time address
/// truncated to 32 bits (sign-extended back).
#[derive(Debug, Default)]
pub struct KaslrRelocs {
    /// By address.
    relocs: Vec<(u64, RelocKind)>,
}

impl KaslrRelocs {
    /// The tables at the end of `image`, each address checked to lie in `[lo, hi)`; empty when
    /// the tail does not read as such tables (a vmlinux without them, or another layout).
    pub fn from_image(image: &[u8], lo: u64, hi: u64) -> KaslrRelocs {
        let mut relocs = Vec::new();
        let mut at = image.len();
        for kind in [RelocKind::Add32, RelocKind::Inverse32, RelocKind::Add64] {
            loop {
                let Some(w) = at.checked_sub(4).and_then(|s| image.get(s..s + 4)) else {
                    return KaslrRelocs::default();
                };
                at -= 4;
                let v = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                if v == 0 {
                    break;
                }
                let addr = i64::from(v as i32) as u64;
                if addr < lo || addr >= hi {
                    return KaslrRelocs::default();
                }
                relocs.push((addr, kind));
            }
        }
        relocs.sort_unstable_by_key(|r| r.0);
        KaslrRelocs { relocs }
    }

    pub fn len(&self) -> usize {
        self.relocs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.relocs.is_empty()
    }

    /// What relocated byte `i` of `file`/`guest` (both at link-time `base`): a relocation whose
    /// field covers it, lies inside both, and holds the file's value moved by `slide`.
    fn explain(
        &self,
        base: u64,
        file: &[u8],
        guest: &[u8],
        i: usize,
        slide: u64,
    ) -> Option<&'static str> {
        let x = base + i as u64;
        let from = self.relocs.partition_point(|r| r.0 + 8 <= x);
        self.relocs[from..]
            .iter()
            .take_while(|r| r.0 <= x)
            .filter(|(a, k)| x < a + k.width())
            .find(|(a, k)| {
                let Some(o) = a.checked_sub(base).map(|o| o as usize) else {
                    return false;
                };
                let n = k.width() as usize;
                match (file.get(o..o + n), guest.get(o..o + n)) {
                    (Some(f), Some(g)) => k.moved(f, g, slide),
                    _ => false,
                }
            })
            .map(|(_, k)| k.name())
    }
}

/// Where the kernel's text is entered other than at a function's start: direct branch targets
/// from every text symbol, the exception table, and the symbols' own starts (link-time).
struct EntryPoints {
    /// (target, source) of every direct jmp/jcc/call, by target.
    branches: Vec<(u64, u64)>,
    /// Instructions that have an exception fixup, sorted.
    faulting: Vec<u64>,
    /// Fixup targets, sorted.
    fixups: Vec<u64>,
    /// Every located symbol's address, sorted.
    symbols: Vec<u64>,
}

impl EntryPoints {
    fn new(image: &KernelImage, fns: &[Function], all: &[ImageSymbol]) -> EntryPoints {
        let mut branches = Vec::new();
        for f in fns {
            let Some(bytes) =
                linux_guest::patch::file_bytes(&image.vmlinux, f.addr, f.size as usize)
            else {
                continue;
            };
            let mut d = Decoder::with_ip(64, bytes, f.addr, DecoderOptions::NONE);
            for insn in d.iter() {
                if insn.is_invalid() {
                    continue;
                }
                if is_direct_branch(&insn) {
                    branches.push((insn.near_branch_target(), insn.ip()));
                }
            }
        }
        branches.sort_unstable();
        let (mut faulting, mut fixups) = (Vec::new(), Vec::new());
        let table = |n: &str| image.kallsyms.lookup(n);
        if let (Some(start), Some(stop)) = (table("__start___ex_table"), table("__stop___ex_table"))
            && let Some(len) = stop.checked_sub(start)
            && let Some(t) = linux_guest::patch::file_bytes(&image.vmlinux, start, len as usize)
        {
            // struct exception_table_entry { int insn, fixup, data; }, each relative to itself.
            for (i, e) in t.chunks_exact(12).enumerate() {
                let at = start + 12 * i as u64;
                let rel = |o: usize| {
                    let b: [u8; 4] = e[o..o + 4].try_into().unwrap_or_default();
                    (at + o as u64).wrapping_add_signed(i64::from(i32::from_le_bytes(b)))
                };
                faulting.push(rel(0));
                fixups.push(rel(4));
            }
        }
        faulting.sort_unstable();
        fixups.sort_unstable();
        let mut symbols: Vec<u64> = all.iter().map(|s| s.addr).collect();
        symbols.sort_unstable();
        symbols.dedup();
        EntryPoints {
            branches,
            faulting,
            fixups,
            symbols,
        }
    }

    /// Values of `sorted` in `(lo, hi)` (exclusive both ends).
    fn inside(sorted: &[u64], lo: u64, hi: u64) -> Option<u64> {
        let i = sorted.partition_point(|&v| v <= lo);
        sorted.get(i).copied().filter(|&v| v < hi)
    }
}

fn is_direct_branch(insn: &Instruction) -> bool {
    matches!(
        insn.flow_control(),
        FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
    ) && insn.near_branch_target() != 0
}

/// Where a function replacement's jump goes and what it displaces, computed from the file's
/// bytes of the function `[start, start + bytes.len())` as the engine's rule says, but here:
/// after an `endbr64` and the entry's `call __fentry__` (the running kernel's NOP) or run of
/// one-byte NOPs, the fewest whole instructions covering `jump_len` bytes.
pub fn displaced(
    start: u64,
    bytes: &[u8],
    fentry: Option<u64>,
    jump_len: usize,
) -> Result<(u64, Vec<Instruction>), String> {
    let mut skip = 0usize;
    if bytes.starts_with(&ENDBR64) {
        skip += ENDBR64.len();
    }
    let rest = &bytes[skip..];
    let fentry_call = rest.first() == Some(&0xe8)
        && rest.len() >= 5
        && fentry.is_some_and(|f| {
            let b: [u8; 4] = rest[1..5].try_into().unwrap_or_default();
            let next = start + skip as u64 + 5;
            next.wrapping_add_signed(i64::from(i32::from_le_bytes(b))) == f
        });
    if fentry_call || rest.starts_with(&NOP5) {
        skip += 5;
    } else {
        skip += rest.iter().take_while(|&&b| b == NOP1).count();
    }
    let at = start + skip as u64;
    let mut out = Vec::new();
    let mut covered = 0;
    let mut d = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    for insn in d.iter() {
        if covered >= jump_len {
            break;
        }
        if insn.is_invalid() {
            return Err(format!("undecodable at {:#x}", insn.ip()));
        }
        if insn.ip() < at {
            continue;
        }
        covered += insn.len();
        out.push(insn);
    }
    if covered < jump_len {
        return Err("too short".into());
    }
    Ok((at, out))
}

/// What the audit knows of the kernel besides the function.
struct AuditContext<'a> {
    entries: &'a EntryPoints,
    sites: &'a KernelTextSites,
    smp_locks_live: bool,
    fentry: Option<u64>,
    /// The static call trampolines' section, link-time.
    static_calls: (u64, u64),
}

/// What the audit found wrong with an accepted function: a kind (the table's row) and the
/// particulars.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub kind: &'static str,
    pub detail: String,
}

fn finding(kind: &'static str, detail: String) -> Option<Finding> {
    Some(Finding { kind, detail })
}

/// The first hazard of replacing the function `f` (file bytes `bytes` over its engine extent)
/// with a `jump_len`-byte jump, or `None`.
fn audit(f: &Function, bytes: &[u8], jump_len: usize, cx: &AuditContext<'_>) -> Option<Finding> {
    let (at, insns) = match displaced(f.addr, bytes, cx.fentry, jump_len) {
        Ok(d) => d,
        Err(why) => {
            return finding(
                "the displaced range cannot be computed",
                format!("from the file's bytes: {why}"),
            );
        }
    };
    let end = insns.last().map_or(at, Instruction::next_ip);
    let fend = f.addr + bytes.len() as u64;
    if end > fend {
        return finding(
            "the displaced range runs past the function",
            format!("it ends at {end:#x}, the function at {fend:#x}"),
        );
    }
    if let Some(i) = insns.iter().find(|i| i.code() == Code::Endbr64) {
        return finding("an endbr64 is displaced", format!("at {:#x}", i.ip()));
    }
    if let Some(i) = insns[..insns.len().saturating_sub(1)].iter().find(|i| {
        i.flow_control() == FlowControl::Call || i.flow_control() == FlowControl::IndirectCall
    }) {
        return finding(
            "a call is displaced before other instructions",
            format!("at {:#x}", i.ip()),
        );
    }
    if let Some(s) = cx.sites.touching(at, end).find(|s| match s.mechanism {
        Mechanism::SmpLock => cx.smp_locks_live,
        m => m.at_run_time(),
    }) {
        return finding(
            "a run-time rewrite site is displaced",
            format!("{} at {:#x}", s.mechanism.name(), s.addr),
        );
    }
    if at < cx.static_calls.1 && end > cx.static_calls.0 {
        return finding(
            "the jump is in a static call trampoline (.static_call.text)",
            format!(
                "static_call_update() rewrites the trampoline's jump at {at:#x} while the kernel runs: the patch would be silently undone"
            ),
        );
    }
    let e = cx.entries;
    let i = e.branches.partition_point(|&(t, _)| t <= at);
    if let Some(&(t, from)) = e.branches.get(i).filter(|(t, _)| *t < end) {
        return finding(
            "a branch from outside the function lands inside the jump",
            format!("the instruction at {from:#x} branches to {t:#x}, inside {at:#x}..{end:#x}"),
        );
    }
    if let Some(x) = e.faulting.iter().copied().find(|&x| x >= at && x < end) {
        return finding(
            "an instruction with an exception fixup is displaced",
            format!(
                "at {x:#x} (__ex_table): run from the escape copy, its fault would find no fixup"
            ),
        );
    }
    if let Some(x) = EntryPoints::inside(&e.fixups, at, end) {
        return finding(
            "an exception fixup lands inside the jump",
            format!("at {x:#x} (__ex_table)"),
        );
    }
    if let Some(x) = EntryPoints::inside(&e.symbols, at, end) {
        return finding(
            "another symbol starts inside the jump",
            format!("at {x:#x}"),
        );
    }
    None
}

/// What every boot's sweep shares: the image and what the tool read out of it once.
struct Kernel<'a> {
    image: &'a KernelImage,
    fns: Vec<Function>,
    identity: TargetIdentity,
    entries: EntryPoints,
    relocs: KaslrRelocs,
    /// Signs the sweep's patches; the run's engines trust it and nothing else.
    key: SecretKey,
    /// `[__init_begin, __init_end)`, link-time: freed once the kernel booted.
    freed: (u64, u64),
    /// `[__static_call_text_start, __static_call_text_end)`, link-time.
    static_calls: (u64, u64),
}

/// Measures `shapes`, one boot each, in order.
pub fn run(
    kernel: &Path,
    busybox: &Path,
    accel: &'static str,
    shapes: &[BootShape],
    budget: Option<Duration>,
    host: HostInfo,
) -> Result<CoverageReport, CoverageError> {
    let image = KernelImage::from_file(kernel).map_err(CoverageError::Image)?;
    let fns = functions(&image);
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    eprintln!(
        "bench: {} named text functions ({} with a duplicated name); decoding the kernel's text for the audit…",
        fns.len(),
        fns.iter().filter(|f| !f.unique).count()
    );
    let sym = |n: &str| image.kallsyms.lookup(n).unwrap_or(0);
    let relocs = KaslrRelocs::from_image(&image.vmlinux, sym("_text"), sym("_end"));
    eprintln!("bench: {} KASLR relocations in the image", relocs.len());
    let k = Kernel {
        entries: EntryPoints::new(&image, &fns, &info.symbols),
        image: &image,
        fns,
        identity: info.identity,
        relocs,
        key: SecretKey::generate().map_err(CoverageError::Key)?,
        freed: (sym("__init_begin"), sym("__init_end")),
        static_calls: (
            sym("__static_call_text_start"),
            sym("__static_call_text_end"),
        ),
    };
    let mut boots = Vec::new();
    for &shape in shapes {
        boots.push(boot_sweep(kernel, busybox, accel, shape, budget, &k)?);
    }
    let all_met = boots.iter().all(|b| {
        b.targets.accepted_at_least_95_pct
            && b.targets.no_unsafe_accepted
            && b.targets.every_refusal_names_its_mechanism
    });
    Ok(CoverageReport {
        benchmark: "coverage",
        host,
        accel,
        kernel: image.banner.trim_end().to_string(),
        boots,
        all_met,
    })
}

/// One function's outcome.
enum Outcome {
    Accepted(Option<Finding>),
    Refused(Class, String),
}

/// What a boot's sweep found, besides the outcomes.
struct Swept {
    vcpu: VcpuState,
    smp_locks_live: bool,
    outcomes: Vec<Option<Outcome>>,
    every: usize,
    seconds: f64,
}

fn boot_sweep(
    kernel: &Path,
    busybox: &Path,
    accel: &'static str,
    shape: BootShape,
    budget: Option<Duration>,
    k: &Kernel<'_>,
) -> Result<BootCoverage, CoverageError> {
    let image = k.image;
    let boot_err = |source: Box<dyn std::error::Error + Send + Sync>| CoverageError::Boot {
        vcpus: shape.vcpus,
        cpu: shape.cpu.name(),
        source,
    };
    // Removed when dropped, after QEMU and the engine that use it (declared before them).
    let tmp = tempfile::Builder::new()
        .prefix("vmm-bench-coverage-")
        .tempdir()
        .map_err(CoverageError::TempDir)?;
    let dir = tmp.path().to_path_buf();
    eprintln!(
        "bench: booting the kernel on {} vCPU(s), CPU {}…",
        shape.vcpus,
        shape.cpu.name()
    );
    let mut q = demo_linux::boot_on(
        &dir,
        kernel,
        busybox,
        accel,
        shape.vcpus,
        shape.cpu.qemu_arg(),
    )
    .map_err(|e| boot_err(e.into()))?;
    demo_linux::wait_booted(&mut q).map_err(|e| boot_err(e.into()))?;
    let guest = Arc::new(q.attach()?);
    let config = EngineConfig {
        trusted_keys: vec![k.key.public()],
        ..Default::default()
    };
    let mut engine = demo_linux::engine(guest.clone(), image, config, &dir.join("state"))
        .map_err(|e| boot_err(e.into()))?;
    let slide = engine.target().slide;
    let window = engine.arena().window;
    let arena = (window.gva, window.gva.saturating_add(window.size));
    let jump_len = jump_len_at(image_text_start(image).wrapping_add(slide), arena);

    // The engine reads the paging registers once, in a pause of its own: let its first dry run
    // do that before the sweep's pause (its result is not counted; the sweep runs it again).
    if let Some(f) = k.fns.iter().find(|f| f.unique)
        && let Some(b) = linux_guest::patch::file_bytes(&image.vmlinux, f.addr, f.size as usize)
        && let Ok(file) = replacement(&k.identity, &k.key, &f.name, b.to_vec())
    {
        let _ = engine.dry_run(&file);
    }

    let vcpus = guest.pause_all()?;
    let result = (|| {
        let vcpu = vcpus
            .iter()
            .flatten()
            .next()
            .copied()
            .ok_or(CoverageError::NoVcpu)?;
        let view = linux_guest::address_space::kernel_view(
            &vcpu,
            linux_guest::address_space::has_pti(&image.kallsyms),
        );
        let smp_locks_live = match image.kallsyms.lookup("uniproc_patched") {
            Some(at) => guest.read_virtual(&view, at.wrapping_add(slide), 1)?[0] != 0,
            None => true,
        };
        let mut s = Sweeper {
            engine: &mut engine,
            guest: &guest,
            k,
            view,
            slide,
            rewrites: LinuxBootRewrites::new(image.text_sites.clone(), smp_locks_live)
                .with_pti(linux_guest::address_space::has_pti(&image.kallsyms)),
            audit: AuditContext {
                entries: &k.entries,
                sites: &image.text_sites,
                smp_locks_live,
                fentry: image.kallsyms.lookup("__fentry__"),
                static_calls: k.static_calls,
            },
            arena,
        };
        let (outcomes, every, seconds) = s.sweep(budget);
        Ok::<_, CoverageError>(Swept {
            vcpu,
            smp_locks_live,
            outcomes,
            every,
            seconds,
        })
    })();
    let resumed = guest.resume_all();
    let swept = result?;
    resumed?;
    drop(engine);
    drop(guest);
    drop(q);
    drop(tmp);
    Ok(summarize(shape, slide, jump_len, &k.fns, swept))
}

/// The jump the engine places at `gva`: `jmp rel32` when it reaches the whole arena (and far
/// jumps are not forced, as they are not here), else `jmp [rip]`.
fn jump_len_at(gva: u64, arena: (u64, u64)) -> usize {
    let near = patch_engine::plan::rel32_reaches(gva, arena.0)
        && patch_engine::plan::rel32_reaches(gva, arena.1);
    if near { JMP_REL32_LEN } else { JMP_ABS_LEN }
}

/// The image's `_stext` (link-time), where the arena's reach is judged from.
fn image_text_start(image: &KernelImage) -> u64 {
    image.kallsyms.lookup("_stext").unwrap_or(0)
}

struct Sweeper<'a> {
    engine: &'a mut Engine<QemuGuest>,
    guest: &'a QemuGuest,
    k: &'a Kernel<'a>,
    /// The kernel's view of a parked vCPU: what the tool reads guest text through.
    view: VcpuState,
    slide: u64,
    rewrites: LinuxBootRewrites,
    audit: AuditContext<'a>,
    /// The arena's guest-virtual `[start, end)`: whether a site's jump is near.
    arena: (u64, u64),
}

impl Sweeper<'_> {
    /// Outcomes by index into the functions (`None`: not swept), every how many were swept,
    /// seconds.
    fn sweep(&mut self, budget: Option<Duration>) -> (Vec<Option<Outcome>>, usize, f64) {
        let n = self.k.fns.len();
        let mut out: Vec<Option<Outcome>> = (0..n).map(|_| None).collect();
        let t0 = Instant::now();
        let mut note = t0 + PROGRESS;
        let mut done = 0usize;
        let order = pass_order();
        let mut passes = 0usize;
        while passes < STRIDE {
            // The next doubling (passes → 2·passes) costs about what the passes so far did.
            if passes > 0
                && let Some(b) = budget
                && t0.elapsed() * 2 > b
            {
                break;
            }
            let upto = if passes == 0 { 1 } else { passes * 2 };
            for &r in &order[passes..upto] {
                for i in (r..n).step_by(STRIDE) {
                    out[i] = Some(self.one(&self.k.fns[i]));
                    done += 1;
                    if Instant::now() >= note {
                        note += PROGRESS;
                        let s = t0.elapsed().as_secs_f64();
                        eprintln!(
                            "bench: {done}/{n} functions in {s:.0} s ({:.1} ms each)",
                            1e3 * s / done as f64
                        );
                    }
                }
            }
            passes = upto;
        }
        (out, STRIDE / passes, t0.elapsed().as_secs_f64())
    }

    fn in_freed(&self, f: &Function) -> bool {
        f.addr >= self.k.freed.0 && f.addr < self.k.freed.1
    }

    fn one(&mut self, f: &Function) -> Outcome {
        let Some(name) = f.patch_name() else {
            return Outcome::Refused(
                Class::named(DUPLICATE_NAME),
                "not swept: the name is not unique and its position is unknown".into(),
            );
        };
        let image = self.k.image;
        let Some(expected) =
            linux_guest::patch::file_bytes(&image.vmlinux, f.addr, f.size as usize)
        else {
            return Outcome::Refused(
                Class::named("the vmlinux file does not hold its bytes"),
                format!(
                    "{} bytes from {:#x} are in no loaded segment of the file",
                    f.size, f.addr
                ),
            );
        };
        let file = match replacement(&self.k.identity, &self.k.key, &name, expected.to_vec()) {
            Ok(file) => file,
            Err(e) => {
                return Outcome::Refused(Class::named("too large for a patch file"), e);
            }
        };
        match self.engine.dry_run(&file) {
            Ok(()) => Outcome::Accepted(self.audit(f)),
            // Freed after boot: its pages hold whatever the allocator put there since.
            Err(e @ EngineError::Plan(PlanError::ExpectedMismatch { .. })) if self.in_freed(f) => {
                Outcome::Refused(Class::named(FREED_INIT), e.to_string())
            }
            Err(EngineError::Plan(PlanError::ExpectedMismatch { .. })) => {
                let (class, detail) = self.explain(f, expected);
                Outcome::Refused(class, detail)
            }
            Err(e) => Outcome::Refused(class_of(&e, self.in_freed(f)), e.to_string()),
        }
    }

    /// The audit of an accepted function, over the guest's bytes: the engine plans the jump
    /// on the running code, whose boot-time sites (an alternative's NOPs re-encoded, a
    /// replacement) the file does not show, so the displaced range is computed from the same
    /// bytes (decoded at the link-time address, as the tables are).
    fn audit(&self, f: &Function) -> Option<Finding> {
        let at = f.addr.wrapping_add(self.slide);
        let bytes = match self.guest.read_virtual(&self.view, at, f.cut as usize) {
            Ok(b) => b,
            Err(e) => {
                return finding(
                    "the displaced range cannot be computed",
                    format!("the guest's bytes could not be read: {e}"),
                );
            }
        };
        let jump_len = jump_len_at(at, self.arena);
        audit(f, &bytes, jump_len, &self.audit)
    }

    /// What made the guest's bytes of `f` differ from the file's.
    fn explain(&self, f: &Function, expected: &[u8]) -> (Class, String) {
        let at = f.addr.wrapping_add(self.slide);
        let current = match self.guest.read_virtual(&self.view, at, expected.len()) {
            Ok(c) => c,
            Err(e) => {
                return (
                    Class::unnamed(UNEXPLAINED),
                    format!("the guest's bytes could not be read to explain the difference: {e}"),
                );
            }
        };
        let read = |gva: u64, len: usize| self.guest.read_virtual(&self.view, gva, len).ok();
        let text = SiteText {
            site: &f.name,
            expected,
            current: &current,
            at,
            function_entry: true,
            memory: GuestMemory(&read),
        };
        let reconciled = self
            .rewrites
            .reconcile(&text, self.engine.target())
            .unwrap_or_else(|_| expected.to_vec());
        let sites = &self.k.image.text_sites;
        let base = f.addr;
        let (sc_lo, sc_hi) = self.k.static_calls;
        mismatch_class(&reconciled, &current, |i| {
            let a = base + i as u64;
            if a >= sc_lo && a < sc_hi {
                return Some(STATIC_CALL_TRAMPOLINE);
            }
            match sites.touching(a, a + 1).next() {
                Some(s) => Some(s.mechanism.name()),
                None => self
                    .k
                    .relocs
                    .explain(base, expected, &current, i, self.slide),
            }
        })
    }
}

fn summarize(
    shape: BootShape,
    slide: u64,
    jump_len: usize,
    fns: &[Function],
    swept: Swept,
) -> BootCoverage {
    let Swept {
        vcpu,
        smp_locks_live,
        outcomes,
        every,
        seconds,
    } = swept;
    let mut classes: HashMap<Class, (usize, usize, Vec<String>)> = HashMap::new();
    let mut kinds: HashMap<&'static str, (usize, Vec<String>)> = HashMap::new();
    let mut excluded: HashMap<Excluded, (usize, usize, Vec<String>)> = HashMap::new();
    let (mut refusals, mut hazards, mut accepted) = (Vec::new(), Vec::new(), Vec::new());
    let (mut patchable, mut accepted_patchable) = (0usize, 0usize);
    let (mut duplicates, mut duplicates_accepted) = (0usize, 0usize);
    for (f, o) in fns.iter().zip(&outcomes) {
        let Some(o) = o else { continue };
        let ok = matches!(o, Outcome::Accepted(_));
        match f.excluded {
            Some(x) => {
                let e = excluded.entry(x).or_default();
                e.0 += 1;
                e.1 += usize::from(ok);
                if e.2.len() < EXAMPLES {
                    e.2.push(f.name.clone());
                }
            }
            None => {
                patchable += 1;
                accepted_patchable += usize::from(ok);
            }
        }
        if !f.unique {
            duplicates += 1;
            duplicates_accepted += usize::from(ok);
        }
        match o {
            Outcome::Accepted(h) => {
                accepted.push(f.patch_name().unwrap_or_else(|| f.name.clone()));
                if let Some(h) = h {
                    let k = kinds.entry(h.kind).or_default();
                    k.0 += 1;
                    if k.1.len() < EXAMPLES {
                        k.1.push(f.name.clone());
                    }
                    hazards.push(Hazard {
                        function: f.name.clone(),
                        addr: format!("{:#x}", f.addr),
                        kind: h.kind.to_string(),
                        detail: h.detail.clone(),
                    });
                }
            }
            Outcome::Refused(c, detail) => {
                let e = classes.entry(c.clone()).or_default();
                e.0 += 1;
                e.1 += usize::from(f.excluded.is_none());
                if e.2.len() < EXAMPLES {
                    e.2.push(f.name.clone());
                }
                refusals.push(Refusal {
                    function: f.name.clone(),
                    addr: format!("{:#x}", f.addr),
                    class: c.name.clone(),
                    detail: detail.clone(),
                });
            }
        }
    }
    let swept = outcomes.iter().filter(|o| o.is_some()).count();
    let pct = |n: usize, of: usize| {
        if of == 0 {
            0.0
        } else {
            100.0 * n as f64 / of as f64
        }
    };
    let mut classes: Vec<ClassCount> = classes
        .into_iter()
        .map(|(c, (count, in_patchable, examples))| ClassCount {
            class: c.name,
            names_mechanism: c.names_mechanism,
            count,
            pct: pct(count, swept),
            patchable_count: in_patchable,
            patchable_pct: pct(in_patchable, patchable),
            examples,
        })
        .collect();
    let mut excluded: Vec<ExcludedCount> = excluded
        .into_iter()
        .map(|(class, (count, accepted, examples))| ExcludedCount {
            class,
            reason: class.reason(),
            count,
            pct: pct(count, swept),
            accepted,
            examples,
        })
        .collect();
    excluded.sort_by_key(|e| e.class);
    classes.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.class.cmp(&b.class)));
    let mut hazard_kinds: Vec<HazardCount> = kinds
        .into_iter()
        .map(|(kind, (count, examples))| HazardCount {
            kind: kind.to_string(),
            count,
            examples,
        })
        .collect();
    hazard_kinds.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.kind.cmp(&b.kind)));
    let unnamed: usize = classes
        .iter()
        .filter(|c| !c.names_mechanism)
        .map(|c| c.count)
        .sum();
    let accepted_pct = pct(accepted.len(), swept);
    let accepted_patchable_pct = pct(accepted_patchable, patchable);
    BootCoverage {
        vcpus: shape.vcpus,
        cpu: shape.cpu,
        la57: vcpu.paging.cr4 & CR4_LA57 != 0,
        cr4: format!("{:#x}", vcpu.paging.cr4),
        kaslr_slide: format!("{slide:#x}"),
        smp_locks_live,
        jump_len,
        functions: fns.len(),
        every,
        swept,
        accepted: accepted.len(),
        accepted_pct,
        patchable,
        accepted_patchable,
        accepted_patchable_pct,
        excluded,
        duplicate_names: duplicates,
        duplicate_names_accepted: duplicates_accepted,
        unnamed_refusals: unnamed,
        named_refusals_pct: if refusals.is_empty() {
            100.0
        } else {
            pct(refusals.len() - unnamed, refusals.len())
        },
        unsafe_accepted: hazards.len(),
        classes,
        hazard_kinds,
        targets: BootTargets {
            accepted_at_least_95_pct: accepted_patchable_pct >= 100.0 * TARGET_ACCEPTED,
            no_unsafe_accepted: hazards.is_empty(),
            every_refusal_names_its_mechanism: unnamed == 0,
        },
        hazards,
        refusals,
        accepted_functions: accepted,
        sweep_seconds: seconds,
        us_per_function: 1e6 * seconds / swept.max(1) as f64,
    }
}

fn pass(ok: bool) -> &'static str {
    if ok { "pass" } else { "FAIL" }
}

/// The tables `scripts/bench` prints: one per boot.
pub fn table(r: &CoverageReport) -> String {
    let mut t = format!(
        "Function-replacement coverage of the running kernel ({}, QEMU {}): each named text function\n\
         replaced by `ret` in a dry run (every check of an apply, nothing written), a name several\n\
         symbols share as `name,N`. Two denominators: all named text functions, and the patchable\n\
         ones (all but the classes listed under \"not patchable functions\", which the running kernel\n\
         cannot call). \"bytes differ from the file at X\": the kernel rewrote them through X (at boot,\n\
         or since) and the engine does not reconcile that form; \"unsafe (audit)\": accepted, but the\n\
         tool's own audit finds a hazard.\n",
        r.kernel, r.accel
    );
    for b in &r.boots {
        let sample = if b.every == 1 {
            "all".to_string()
        } else {
            format!("every {}-th by address, from the first", b.every)
        };
        t.push_str(&format!(
            "\n{} vCPU(s), CPU {}, LA57 {} (CR4 {}), KASLR slide {}, jump {} bytes: {} of {} named text functions swept ({sample}), {} of them patchable, in {:.0} s ({:.0} µs each)\n",
            b.vcpus,
            b.cpu.name(),
            if b.la57 { "on" } else { "off" },
            b.cr4,
            b.kaslr_slide,
            b.jump_len,
            b.swept,
            b.functions,
            b.patchable,
            b.sweep_seconds,
            b.us_per_function,
        ));
        // (outcome, count of all, count among the patchable (None: not counted there), examples)
        let mut rows: Vec<(String, usize, Option<usize>, String)> = vec![(
            "accepted".into(),
            b.accepted,
            Some(b.accepted_patchable),
            String::new(),
        )];
        for h in &b.hazard_kinds {
            rows.push((
                format!("  unsafe (audit): {}", h.kind),
                h.count,
                None,
                h.examples.join(", "),
            ));
        }
        for c in &b.classes {
            let tag = if c.names_mechanism {
                ""
            } else {
                " [names no mechanism]"
            };
            rows.push((
                format!("refused: {}{tag}", c.class),
                c.count,
                Some(c.patchable_count),
                c.examples.join(", "),
            ));
        }
        let w = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0);
        t.push_str(&format!(
            "| {:<w$} | {:>6} | {:>6} | {:>9} | {:>6} | examples\n",
            "outcome", "all", "%", "patchable", "%"
        ));
        t.push_str(&format!(
            "|-{:-<w$}-|--------|--------|-----------|--------|---------\n",
            ""
        ));
        let pct = |n: usize, of: usize| 100.0 * n as f64 / of.max(1) as f64;
        for (name, count, patchable, examples) in rows {
            let (pn, pp) = match patchable {
                Some(n) => (n.to_string(), format!("{:.2}", pct(n, b.patchable))),
                None => ("".into(), "".into()),
            };
            t.push_str(&format!(
                "| {name:<w$} | {count:>6} | {:>6.2} | {pn:>9} | {pp:>6} | {examples}\n",
                pct(count, b.swept)
            ));
        }
        t.push_str("not patchable functions (left out of the patchable share; their outcomes are in the rows above):\n");
        for e in &b.excluded {
            t.push_str(&format!(
                "  {:>6} ({:.2}% of all; {} accepted, {} refused) {}: {}\n",
                e.count,
                e.pct,
                e.accepted,
                e.count - e.accepted,
                e.reason,
                e.examples.join(", ")
            ));
        }
        t.push_str(&format!(
            "duplicate names swept as name,N: {}, accepted {}\n",
            b.duplicate_names, b.duplicate_names_accepted
        ));
        t.push_str(&format!(
            "accepted: {:.2}% of all named text functions, {:.2}% of the patchable ones\n",
            b.accepted_pct, b.accepted_patchable_pct
        ));
        t.push_str(&format!(
            "targets: accepted ≥ {:.0}% of the patchable {} ({:.2}%); unsafe accepted = 0 {} ({}); refusals naming their mechanism 100% {} ({:.2}%, {} name none)\n",
            100.0 * TARGET_ACCEPTED,
            pass(b.targets.accepted_at_least_95_pct),
            b.accepted_patchable_pct,
            pass(b.targets.no_unsafe_accepted),
            b.unsafe_accepted,
            pass(b.targets.every_refusal_names_its_mechanism),
            b.named_refusals_pct,
            b.unnamed_refusals,
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passes_in_bit_reversed_order_sample_every_kth() {
        let order = pass_order();
        assert_eq!(order.len(), STRIDE);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..STRIDE).collect::<Vec<_>>());
        // After 2^j passes the residues done are exactly the multiples of STRIDE / 2^j.
        let mut p = 1;
        while p <= STRIDE {
            let mut done: Vec<usize> = order[..p].to_vec();
            done.sort_unstable();
            let k = STRIDE / p;
            assert_eq!(
                done,
                (0..STRIDE).step_by(k).collect::<Vec<_>>(),
                "{p} passes"
            );
            p *= 2;
        }
    }

    #[test]
    fn refusals_are_classed_by_their_mechanism() {
        let live = EngineError::Plan(PlanError::LiveRewrite {
            site: "f".into(),
            at: 0,
            what: Mechanism::JumpLabel.name().into(),
            start: 0,
            end: 5,
        });
        let c = class_of(&live, false);
        assert!(c.names_mechanism);
        assert!(c.name.contains("jump label"), "{}", c.name);
        let unmapped = EngineError::Unmapped {
            site: "f".into(),
            gva: 0,
            reason: "not present".into(),
        };
        assert!(class_of(&unmapped, true).name.contains("init"));
        assert!(!class_of(&unmapped, false).name.contains("freed init"));
        let short = EngineError::Plan(PlanError::TooShort {
            site: "f".into(),
            at: 0,
            available: 1,
            needed: 5,
        });
        assert_eq!(class_of(&short, false).name, "too short for the jump");
        // A mismatch the caller could not attribute names no mechanism.
        let mismatch = EngineError::Plan(PlanError::ExpectedMismatch {
            site: "f".into(),
            offset: 3,
            expected: 1,
            found: 2,
        });
        assert!(!class_of(&mismatch, false).names_mechanism);
        assert!(!class_of(&EngineError::Stale, false).names_mechanism);
    }

    #[test]
    fn a_difference_outside_every_table_is_unexplained() {
        let file = [1, 2, 3, 4, 5, 6];
        let guest = [1, 9, 3, 4, 7, 6];
        // Both differences at an alternative: explained by it.
        let (c, _) = mismatch_class(&file, &guest, |i| {
            (1..5).contains(&i).then_some(Mechanism::Alternative.name())
        });
        assert!(c.names_mechanism);
        assert!(c.name.contains("alternative"), "{}", c.name);
        // The second one in no table: unexplained, however the first is explained.
        let (c, detail) = mismatch_class(&file, &guest, |i| {
            (i == 1).then_some(Mechanism::Alternative.name())
        });
        assert_eq!(c.name, UNEXPLAINED);
        assert!(!c.names_mechanism);
        assert!(detail.contains("+0x4"), "{detail}");
    }

    #[test]
    fn a_boot_is_summarized_by_class_with_its_targets() {
        let f = |name: &str, addr: u64| Function {
            name: name.into(),
            addr,
            size: 16,
            cut: 16,
            unique: true,
            sympos: None,
            excluded: None,
        };
        let fns = vec![f("a", 0x10), f("b", 0x20), f("c", 0x30), f("d", 0x40)];
        let outcomes = vec![
            Some(Outcome::Accepted(None)),
            Some(Outcome::Accepted(Some(Finding {
                kind: "k",
                detail: "d".into(),
            }))),
            Some(Outcome::Refused(
                Class::named("too short for the jump"),
                "x".into(),
            )),
            None,
        ];
        let vcpu = VcpuState {
            id: 0,
            rip: 0,
            rsp: 0,
            cpl: 0,
            paging: guest_control::paging::PagingRegs {
                cr0: 0,
                cr3: 0,
                cr4: CR4_LA57,
                efer: 0,
            },
        };
        let shape = BootShape {
            vcpus: 2,
            cpu: CpuModel::Max,
        };
        let swept = Swept {
            vcpu,
            smp_locks_live: false,
            outcomes,
            every: 1,
            seconds: 1.0,
        };
        let b = summarize(shape, 0, 5, &fns, swept);
        assert!(b.la57);
        assert_eq!((b.swept, b.accepted, b.unsafe_accepted), (3, 2, 1));
        assert_eq!(b.classes.len(), 1);
        assert_eq!(b.classes[0].examples, vec!["c".to_string()]);
        assert_eq!(b.hazard_kinds[0].count, 1);
        assert!(!b.targets.accepted_at_least_95_pct);
        assert!(!b.targets.no_unsafe_accepted);
        assert!(b.targets.every_refusal_names_its_mechanism);
        let report = CoverageReport {
            benchmark: "coverage",
            host: crate::bench::host_info(),
            accel: "tcg",
            kernel: "k".into(),
            boots: vec![b],
            all_met: false,
        };
        let t = table(&report);
        assert!(t.contains("LA57 on"), "{t}");
        assert!(t.contains("refused: too short for the jump"), "{t}");
        assert!(t.contains("unsafe (audit): k"), "{t}");
    }

    #[test]
    fn what_the_kernel_cannot_call_is_left_out_of_the_patchable_share_and_counted() {
        let freed = (0x9000, 0xa000);
        let sct = (0x8000, 0x8100);
        let text = |n: &str| ["f", "g.isra.0"].contains(&n);
        let x = |name: &str, addr: u64| exclusion(name, addr, freed, sct, &text);
        assert_eq!(x("f", 0x1000), None);
        assert_eq!(x("init_f", 0x9100), Some(Excluded::FreedInit));
        assert_eq!(
            x("__SCT__tp_func_x", 0x8010),
            Some(Excluded::StaticCallTrampoline)
        );
        assert_eq!(
            x("__static_call_text_start", 0x8000),
            Some(Excluded::StaticCallTrampoline)
        );
        for frag in ["f.cold", "f.cold.3", "f.part.0", "g.isra.0.cold"] {
            assert_eq!(x(frag, 0x2000), Some(Excluded::Fragment), "{frag}");
        }
        // A fragment whose parent the image does not have, and names that only look alike,
        // stay patchable functions.
        assert_eq!(x("h.cold", 0x2000), None);
        assert_eq!(x("f.coldplug", 0x2000), None);
        assert_eq!(fragment_parent("f.constprop.0"), None);

        let f =
            |name: &str, addr: u64, excluded: Option<Excluded>, sympos: Option<usize>| Function {
                name: name.into(),
                addr,
                size: 16,
                cut: 16,
                unique: sympos.is_none(),
                sympos,
                excluded,
            };
        let fns = vec![
            f("a", 0x10, None, None),
            f("a.cold", 0x20, Some(Excluded::Fragment), None),
            f("dup", 0x30, None, Some(1)),
            f("dup", 0x40, None, Some(2)),
            f("init_x", 0x9100, Some(Excluded::FreedInit), None),
        ];
        assert_eq!(fns[3].patch_name().as_deref(), Some("dup,2"));
        let refused = |c: &str| Some(Outcome::Refused(Class::named(c), "x".into()));
        let outcomes = vec![
            Some(Outcome::Accepted(None)),
            refused("cold"),
            Some(Outcome::Accepted(None)),
            refused("short"),
            refused("init"),
        ];
        let vcpu = VcpuState {
            id: 0,
            rip: 0,
            rsp: 0,
            cpl: 0,
            paging: guest_control::paging::PagingRegs {
                cr0: 0,
                cr3: 0,
                cr4: 0,
                efer: 0,
            },
        };
        let swept = Swept {
            vcpu,
            smp_locks_live: false,
            outcomes,
            every: 1,
            seconds: 1.0,
        };
        let shape = BootShape {
            vcpus: 1,
            cpu: CpuModel::Default,
        };
        let b = summarize(shape, 0, 5, &fns, swept);
        assert_eq!((b.swept, b.accepted), (5, 2));
        assert_eq!((b.patchable, b.accepted_patchable), (3, 2));
        assert!((b.accepted_pct - 40.0).abs() < 1e-9);
        assert!((b.accepted_patchable_pct - 100.0 * 2.0 / 3.0).abs() < 1e-9);
        assert_eq!((b.duplicate_names, b.duplicate_names_accepted), (2, 1));
        assert!(b.accepted_functions.contains(&"dup,1".to_string()));
        let counted: Vec<(Excluded, usize, usize)> = b
            .excluded
            .iter()
            .map(|e| (e.class, e.count, e.accepted))
            .collect();
        assert_eq!(
            counted,
            vec![(Excluded::FreedInit, 1, 0), (Excluded::Fragment, 1, 0)]
        );
        let short = b.classes.iter().find(|c| c.class == "short").unwrap();
        assert_eq!((short.count, short.patchable_count), (1, 1));
        let cold = b.classes.iter().find(|c| c.class == "cold").unwrap();
        assert_eq!(cold.patchable_count, 0);
        let report = CoverageReport {
            benchmark: "coverage",
            host: crate::bench::host_info(),
            accel: "tcg",
            kernel: "k".into(),
            boots: vec![b],
            all_met: false,
        };
        let t = table(&report);
        assert!(t.contains("3 of them patchable"), "{t}");
        assert!(t.contains(Excluded::Fragment.reason()), "{t}");
        assert!(
            t.contains("duplicate names swept as name,N: 2, accepted 1"),
            "{t}"
        );
    }

    #[test]
    fn kaslr_relocations_are_read_from_the_image_tail_and_checked() {
        let (lo, hi) = (0xffff_ffff_8100_0000u64, 0xffff_ffff_8400_0000u64);
        let word = |a: u64| (a as u32).to_le_bytes();
        // kernel bits, 0, 64-bit ones, 0, inverse 32-bit ones, 0, 32-bit ones (read backwards).
        let mut image = vec![0x7f, b'E', b'L', b'F'];
        for w in [0, 0x8100_0020, 0, 0x8100_0010, 0, 0x8100_0000] {
            image.extend_from_slice(&word(w));
        }
        let r = KaslrRelocs::from_image(&image, lo, hi);
        assert_eq!(r.len(), 3);
        let slide = 0x0f00_0000u64;
        // A 32-bit field at lo: file 0x81000040 → guest 0x90000040.
        let file = 0x8100_0040u32.to_le_bytes();
        let guest = 0x9000_0040u32.to_le_bytes();
        assert!(
            r.explain(lo, &file, &guest, 3, slide)
                .is_some_and(|n| n.contains("32-bit"))
        );
        // The same change at an inverse relocation is not what it would do.
        assert_eq!(r.explain(lo + 0x10, &file, &guest, 3, slide), None);
        let guest_inv = 0x8100_0040u32.wrapping_sub(0x0f00_0000).to_le_bytes();
        assert!(
            r.explain(lo + 0x10, &file, &guest_inv, 3, slide)
                .is_some_and(|n| n.contains("inverse"))
        );
        // Nowhere near a relocation: nothing explains it.
        assert_eq!(r.explain(lo + 0x100, &file, &guest, 3, slide), None);
        // A tail that is no such table (an address outside the kernel) gives none.
        let mut bad = image.clone();
        bad.extend_from_slice(&word(0x1234));
        assert!(KaslrRelocs::from_image(&bad, lo, hi).is_empty());
    }

    #[test]
    fn the_displaced_range_starts_after_the_fentry_call() {
        let start = 0xffff_ffff_8100_0000u64;
        let fentry = 0xffff_ffff_8100_1000u64;
        let rel = (fentry as i64 - (start as i64 + 5)) as i32;
        let mut f = vec![0xe8];
        f.extend_from_slice(&rel.to_le_bytes());
        // push rbp; mov rbp, rsp; mov eax, 1; pop rbp; ret
        f.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0xb8, 1, 0, 0, 0, 0x5d, 0xc3]);
        let (at, insns) = displaced(start, &f, Some(fentry), JMP_REL32_LEN).unwrap();
        assert_eq!(at, start + 5);
        // push (1) + mov rbp,rsp (3) + mov eax,1 (5) cover 5 bytes.
        assert_eq!(insns.len(), 3);
        // Without knowing __fentry__ the call itself is displaced.
        let (at, _) = displaced(start, &f, None, JMP_REL32_LEN).unwrap();
        assert_eq!(at, start);
        assert!(displaced(start, &[0x55, 0xc3], None, JMP_REL32_LEN).is_err());
    }

    #[test]
    fn the_audit_flags_a_branch_from_elsewhere_into_the_jump() {
        let start = 0x1000u64;
        // push rbp; mov rbp, rsp; mov eax, 1; pop rbp; ret
        let bytes = [0x55, 0x48, 0x89, 0xe5, 0xb8, 1, 0, 0, 0, 0x5d, 0xc3];
        let f = Function {
            name: "f".into(),
            addr: start,
            size: bytes.len() as u64,
            cut: bytes.len() as u64,
            unique: true,
            sympos: None,
            excluded: None,
        };
        let sites = KernelTextSites::default();
        let mut entries = EntryPoints {
            branches: vec![(start, 0x5000)],
            faulting: Vec::new(),
            fixups: Vec::new(),
            symbols: vec![start],
        };
        let cx = |e: &EntryPoints| -> Option<String> {
            let cx = AuditContext {
                entries: e,
                sites: &sites,
                smp_locks_live: false,
                fentry: None,
                static_calls: (0, 0),
            };
            audit(&f, &bytes, JMP_REL32_LEN, &cx).map(|h| format!("{}: {}", h.kind, h.detail))
        };
        // A call to the start is fine.
        assert_eq!(cx(&entries), None);
        // A jump from a .cold part to +4 lands inside the jump (0x1000..0x1009).
        entries.branches.push((start + 4, 0x6000));
        entries.branches.sort_unstable();
        assert!(cx(&entries).is_some_and(|h| h.contains("0x6000")));
        entries.branches.pop();
        entries.faulting.push(start + 1);
        assert!(cx(&entries).is_some_and(|h| h.contains("exception fixup")));
    }
}
