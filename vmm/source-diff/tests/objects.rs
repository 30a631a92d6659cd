//! The object differ and the linker on small kernel-style units, compiled at test time as the
//! kernel compiles its own (`-mcmodel=kernel`, `-pg -mfentry -mrecord-mcount`, one section per
//! function and variable), with hand-written inline asm emitting the kernel's tables exactly
//! as Linux 6.1 x86 does (`__jump_table`, `__ex_table`, `__bug_table`).
//!
//! What gcc 12 emits, checked with objdump (and asserted below where a test depends on it):
//! - with `-fdata-sections` string literals go to one mergeable section per function,
//!   `.rodata.<function>.str1.1`; a literal used by several functions lives in the first
//!   one's section, so a change of that function's literals moves the others';
//! - static locals are `name.N`, numbered across the whole unit (the last defined gets 0), so
//!   adding one anywhere renumbers others;
//! - clone suffixes are counted per function (`scale.constprop.0`,
//!   `pick.constprop.0.isra.0`): a clone keeps its name when its body changes.

use std::collections::BTreeMap;
use std::process::Command;

use iced_x86::{Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};
use linux_guest::{Kallsyms, KernelSymbol};
use patch_format::{RelocKind, RelocTarget, Relocation};
use source_diff::build::{SourceBuildError, SourceReport, TargetKernel, analyze_unit};
use source_diff::compile::UnitObjects;
use source_diff::elf::{SymKind, Unit};
use source_diff::link::{DataSet, Kernel, LinkError, LinkedFunction, Linker, Resolved};
use source_diff::objdiff::{UnitDiff, diff};

/// The kernel's code generation flags that matter for the objects' shape.
const CFLAGS: &[&str] = &[
    "-c",
    "-O2",
    "-ffunction-sections",
    "-fdata-sections",
    "-fno-pic",
    "-mcmodel=kernel",
    "-fno-asynchronous-unwind-tables",
    "-mno-red-zone",
    "-fno-stack-protector",
    "-fcf-protection=none",
    "-pg",
    "-mfentry",
    "-mrecord-mcount",
];

const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Compiles `src` as a kernel unit and parses the object.
fn compile(src: &str) -> Unit {
    Unit::parse(&compile_object(src, CFLAGS, &[])).expect("parse object")
}

/// The object of `src` compiled with `flags` and then `extra`.
fn compile_object(src: &str, flags: &[&str], extra: &[&str]) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = dir.path().join("unit.c");
    let o = dir.path().join("unit.o");
    std::fs::write(&c, src).expect("write source");
    let out = Command::new("gcc")
        .args(flags)
        .args(extra)
        .arg(&c)
        .arg("-o")
        .arg(&o)
        .output()
        .expect("run gcc");
    assert!(
        out.status.success(),
        "gcc failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(&o).expect("read object")
}

/// [`CFLAGS`] without ftrace's profiling (`-pg`): a `notrace` file, where GCC's IPA-RA is on.
fn cflags_notrace() -> Vec<&'static str> {
    CFLAGS
        .iter()
        .copied()
        .filter(|f| !matches!(*f, "-pg" | "-mfentry" | "-mrecord-mcount"))
        .collect()
}

fn names(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect()
}

/// The named symbols a function's relocations land on (section symbols resolved through the
/// symbol at the field's target), in order, and the raw addends.
fn referenced(u: &Unit, f: &str) -> Vec<(String, i64)> {
    let sym = u.defined(f).expect("function defined");
    u.relocs_of(sym)
        .iter()
        .map(|r| {
            let s = &u.symbols[r.symbol];
            let name = if s.kind == SymKind::Section {
                s.section
                    .and_then(|sec| u.symbol_at(sec, r.pointed(u)))
                    .map_or_else(
                        || u.sections[s.section.unwrap_or(0)].name.clone(),
                        |t| u.symbols[t].name.clone(),
                    )
            } else {
                s.name.clone()
            };
            (name, r.addend)
        })
        .collect()
}

/// A minimal vmlinux: one PT_LOAD of `text` at `vaddr` (as the test helper of
/// `linux_guest::patch` makes it).
fn vmlinux(vaddr: u64, text: &[u8]) -> Vec<u8> {
    let mut e = vec![0u8; 0x1000];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little endian
    e[6] = 1; // EV_CURRENT
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
    e[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    e[58..60].copy_from_slice(&64u16.to_le_bytes()); // e_shentsize
    let ph = &mut e[64..120];
    ph[0..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R X
    ph[8..16].copy_from_slice(&0x1000u64.to_le_bytes()); // p_offset
    ph[16..24].copy_from_slice(&vaddr.to_le_bytes()); // p_vaddr
    ph[24..32].copy_from_slice(&vaddr.to_le_bytes()); // p_paddr
    ph[32..40].copy_from_slice(&(text.len() as u64).to_le_bytes()); // p_filesz
    ph[40..48].copy_from_slice(&(text.len() as u64).to_le_bytes()); // p_memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
    e.extend_from_slice(text);
    e
}

const TEXT: u64 = 0xffff_ffff_8100_0000;
const DATA: u64 = 0xffff_ffff_8200_0000;
const EXTERN: u64 = 0xffff_ffff_8300_0000;

/// A running kernel built from the pre-fix unit: its functions' bytes at made-up addresses in
/// the vmlinux file, its functions and variables in kallsyms, and every symbol either build
/// leaves undefined (`printk`, `__fentry__`, …) as a kernel global.
struct FakeKernel {
    vmlinux: Vec<u8>,
    kallsyms: Kallsyms,
    /// Function name → address.
    text: BTreeMap<String, u64>,
}

fn fake_kernel(pre: &Unit, post: &Unit) -> FakeKernel {
    let mut syms = Vec::new();
    let mut text_bytes = Vec::new();
    let mut text = BTreeMap::new();
    for (i, s) in pre.functions() {
        while text_bytes.len() % 16 != 0 {
            text_bytes.push(0xcc);
        }
        let addr = TEXT + text_bytes.len() as u64;
        text_bytes.extend_from_slice(pre.bytes_of(i).expect("function bytes"));
        text.insert(s.name.clone(), addr);
        syms.push(KernelSymbol {
            address: addr,
            kind: if s.local { 't' } else { 'T' },
            name: s.name.clone(),
        });
    }
    for (n, (_, s)) in pre.objects().enumerate() {
        syms.push(KernelSymbol {
            address: DATA + 64 * n as u64,
            kind: if s.local { 'd' } else { 'D' },
            name: s.name.clone(),
        });
    }
    let mut undefined: Vec<&str> = pre
        .symbols
        .iter()
        .chain(&post.symbols)
        .filter(|s| s.is_undefined() && !s.name.is_empty())
        .map(|s| s.name.as_str())
        .collect();
    undefined.sort_unstable();
    undefined.dedup();
    for (n, name) in undefined.into_iter().enumerate() {
        syms.push(KernelSymbol {
            address: EXTERN + 64 * n as u64,
            kind: 'T',
            name: name.to_string(),
        });
    }
    FakeKernel {
        vmlinux: vmlinux(TEXT, &text_bytes),
        kallsyms: Kallsyms::from_symbols(syms),
        text,
    }
}

fn linker<'a>(k: &'a FakeKernel, pre: &'a Unit, post: &'a Unit, d: &'a UnitDiff) -> Linker<'a> {
    Linker {
        kernel: Kernel {
            vmlinux: &k.vmlinux,
            kallsyms: &k.kallsyms,
        },
        pre,
        post,
        kernel_pre: pre,
        diff: d,
        unit_tag: 0,
    }
}

/// Run-pre check, then link of `post_name`, as the builder does.
fn check_and_link(
    l: &Linker<'_>,
    pre_name: &str,
    post_name: &str,
    data: &mut DataSet,
) -> Result<LinkedFunction, LinkError> {
    let kernel_name = l.check_pre(pre_name)?;
    let mut resolved: Vec<Resolved> = Vec::new();
    l.link(post_name, &kernel_name, data, &mut resolved)
}

fn symbol_relocs<'r>(f: &'r LinkedFunction, name: &str) -> Vec<&'r Relocation> {
    f.relocations
        .iter()
        .filter(|r| r.target == RelocTarget::Symbol(name.to_string()))
        .collect()
}

fn decode_at(code: &[u8], at: usize) -> Instruction {
    let mut d = Decoder::with_ip(64, &code[at..], at as u64, DecoderOptions::NONE);
    let ins = d.decode();
    assert!(!ins.is_invalid(), "invalid instruction at {at:#x}");
    ins
}

// ---------------------------------------------------------------------------------------

const BASIC_PRE: &str = r#"
extern int printk(const char *fmt, ...);
static int state;
void set_state(int v)
{
	state = v;
}
int changed_fn(int x)
{
	printk("abc\n");
	printk("value %d\n", x);
	return x + state;
}
int unchanged_fn(int x)
{
	printk("value %d\n", x);
	return x - state;
}
"#;

const BASIC_POST: &str = r#"
extern int printk(const char *fmt, ...);
static int state;
void set_state(int v)
{
	state = v;
}
int changed_fn(int x)
{
	printk("abcdef\n");
	printk("value %d\n", x);
	return x + state;
}
int unchanged_fn(int x)
{
	printk("value %d\n", x);
	return x - state;
}
int new_fn(int x)
{
	return x * state;
}
"#;

#[test]
fn unchanged_changed_and_new_functions() {
    let (pre, post) = (compile(BASIC_PRE), compile(BASIC_POST));
    // The premise: the shared literal moved inside its section between the builds.
    let lit = |u: &Unit| -> i64 {
        let sym = u.defined("unchanged_fn").expect("unchanged_fn");
        u.relocs_of(sym)
            .iter()
            .find(|r| {
                let s = &u.symbols[r.symbol];
                s.section
                    .is_some_and(|i| u.sections[i].name.starts_with(".rodata.changed_fn.str"))
            })
            .expect("unchanged_fn uses the literal in changed_fn's string section")
            .addend
    };
    assert_ne!(lit(&pre), lit(&post), "the literal did not move");
    let d = diff(&pre, &post);
    assert_eq!(names(&d.changed), [("changed_fn", "changed_fn")]);
    assert_eq!(d.added, ["new_fn"]);
    assert!(d.removed.is_empty(), "{:?}", d.removed);
    assert!(d.data_changed.is_empty(), "{:?}", d.data_changed);
    assert!(d.data_added.is_empty(), "{:?}", d.data_added);
    assert_eq!(
        d.correlated.get("unchanged_fn").map(String::as_str),
        Some("unchanged_fn")
    );
}

#[test]
fn inline_helper_change_changes_its_callers() {
    let unit = |factor: u32| {
        format!(
            "static inline int helper(int x) {{ return x * {factor}; }}\n\
             int caller_a(int x) {{ return helper(x) + 1; }}\n\
             int caller_b(int x) {{ return helper(x) - 1; }}\n\
             int bystander(int x) {{ return x ^ 0x55; }}\n"
        )
    };
    let (pre, post) = (compile(&unit(3)), compile(&unit(5)));
    assert!(pre.defined("helper").is_none(), "helper was not inlined");
    let d = diff(&pre, &post);
    assert_eq!(
        names(&d.changed),
        [("caller_a", "caller_a"), ("caller_b", "caller_b")]
    );
    assert!(d.added.is_empty() && d.removed.is_empty(), "{d:?}");
}

#[test]
fn clones_are_correlated() {
    let unit = |op: char| {
        format!(
            "static int state;\n\
             void set_state(int v) {{ state = v; }}\n\
             static __attribute__((noinline)) int scale(int x, int factor) \
             {{ return x * factor {op} state; }}\n\
             static __attribute__((noinline)) int pick(int *p, int unused) {{ return *p + 1; }}\n\
             int use_scale(int x) {{ return scale(x, 7) + 1; }}\n\
             int use_scale2(int x) {{ return scale(x + 1, 7); }}\n\
             int use_pick(int v) {{ int a = v; return pick(&a, 3) + pick(&a, 3); }}\n"
        )
    };
    let (pre, post) = (compile(&unit('+')), compile(&unit('-')));
    for u in [&pre, &post] {
        assert!(u.defined("scale.constprop.0").is_some());
        assert!(u.defined("pick.constprop.0.isra.0").is_some());
    }
    let d = diff(&pre, &post);
    assert_eq!(
        d.correlated.get("scale.constprop.0").map(String::as_str),
        Some("scale.constprop.0")
    );
    assert_eq!(
        d.correlated
            .get("pick.constprop.0.isra.0")
            .map(String::as_str),
        Some("pick.constprop.0.isra.0")
    );
    // The callers reach the clone through the section symbol: still the same.
    assert_eq!(
        names(&d.changed),
        [("scale.constprop.0", "scale.constprop.0")]
    );
    assert!(d.added.is_empty() && d.removed.is_empty(), "{d:?}");
}

// ---------------------------------------------------------------------------------------

const LOCALS_PRE: &str = r#"
extern int printk(const char *fmt, ...);
int count_calls(int x)
{
	static int counter;
	counter++;
	return counter + x;
}
int other_counter(int x)
{
	static int counter;
	counter += x;
	return counter;
}
int noted(int x)
{
	return x * 2;
}
"#;

const LOCALS_POST: &str = r#"
extern int printk(const char *fmt, ...);
int count_calls(int x)
{
	static int counter;
	counter += 2;
	return counter + x;
}
int other_counter(int x)
{
	static int counter;
	counter += x;
	return counter;
}
int noted(int x)
{
	static int seen;
	if (!seen) {
		seen = 1;
		printk("noted once\n");
	}
	return x * 2;
}
"#;

/// The numbered static local function `f` of `u` uses.
fn local_of(u: &Unit, f: &str, base: &str) -> String {
    let found: Vec<String> = referenced(u, f)
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.starts_with(&format!("{base}.")))
        .collect();
    assert!(!found.is_empty(), "{f} uses no {base}.N");
    assert!(found.iter().all(|n| *n == found[0]), "{found:?}");
    found[0].clone()
}

#[test]
fn static_locals_bind_to_the_kernels_copy() {
    let (pre, post) = (compile(LOCALS_PRE), compile(LOCALS_POST));
    let (pre_counter, post_counter) = (
        local_of(&pre, "count_calls", "counter"),
        local_of(&post, "count_calls", "counter"),
    );
    let (pre_other, post_other) = (
        local_of(&pre, "other_counter", "counter"),
        local_of(&post, "other_counter", "counter"),
    );
    let seen = local_of(&post, "noted", "seen");
    // gcc 12 numbers the locals across the unit, last first: the new `seen` renumbers both.
    assert_eq!(
        (pre_counter.as_str(), pre_other.as_str()),
        ("counter.1", "counter.0")
    );
    assert_eq!(
        (post_counter.as_str(), post_other.as_str(), seen.as_str()),
        ("counter.2", "counter.1", "seen.0")
    );

    let d = diff(&pre, &post);
    assert_eq!(
        names(&d.changed),
        [("count_calls", "count_calls"), ("noted", "noted")]
    );
    assert_eq!(d.locals.get(&post_counter), Some(&pre_counter));
    assert_eq!(d.locals.get(&post_other), Some(&pre_other));
    assert_eq!(d.locals.get(&seen), None);
    assert!(d.data_changed.is_empty(), "{:?}", d.data_changed);
    assert_eq!(d.data_added.len(), 1, "{:?}", d.data_added);
    assert_eq!(d.data_added[0].0, seen);

    let k = fake_kernel(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    let mut data = DataSet::default();
    let f = check_and_link(&l, "count_calls", "count_calls", &mut data).expect("link");
    // Both accesses (load and store) reach the running kernel's counter of count_calls,
    // whatever its number in the post build.
    let to_counter = symbol_relocs(&f, &pre_counter);
    assert_eq!(to_counter.len(), 2, "{:?}", f.relocations);
    for r in &to_counter {
        assert_eq!(r.kind, RelocKind::Rel32);
        assert_eq!(r.addend, -4);
        assert_eq!(&f.code[r.offset as usize..r.offset as usize + 4], [0; 4]);
    }
    for r in &f.relocations {
        let RelocTarget::Symbol(s) = &r.target else {
            panic!("count_calls uses patch data: {r:?}");
        };
        assert!(
            k.kallsyms.named(s).next().is_some(),
            "relocation against {s}, not a kernel symbol"
        );
    }
    assert!(data.blocks.is_empty());

    // A static local the fix adds would be a fresh variable: refused, naming it.
    let e = check_and_link(&l, "noted", "noted", &mut data).expect_err("new static local");
    match &e {
        LinkError::Unsupported { function, what, .. } => {
            assert_eq!(function, "noted");
            assert!(what.contains(&seen), "{what}");
        }
        other => panic!("not Unsupported: {other:?}"),
    }
}

#[test]
fn run_pre_mismatch_is_found() {
    let (pre, post) = (compile(LOCALS_PRE), compile(LOCALS_POST));
    let d = diff(&pre, &post);
    let mut k = fake_kernel(&pre, &post);
    assert_eq!(
        linker(&k, &pre, &post, &d).check_pre("count_calls"),
        Ok("count_calls".to_string())
    );
    // Flip a byte of count_calls outside every relocated field (those are masked).
    let sym = pre.defined("count_calls").expect("count_calls");
    let relocs = pre.relocs_of(sym);
    let size = pre.symbols[sym].size;
    let at = (0..size)
        .rev()
        .find(|&o| {
            !relocs
                .iter()
                .any(|r| o >= r.offset && o < r.offset + r.width().unwrap_or(4))
        })
        .expect("an unrelocated byte");
    let file_at = 0x1000 + (k.text["count_calls"] - TEXT + at) as usize;
    k.vmlinux[file_at] ^= 0x40;
    match linker(&k, &pre, &post, &d).check_pre("count_calls") {
        Err(LinkError::PreMismatch {
            function,
            kernel_name,
            why,
        }) => {
            assert_eq!(
                (function.as_str(), kernel_name.as_str()),
                ("count_calls", "count_calls")
            );
            assert!(why.contains(&format!("+{at:#x}")), "{why}");
        }
        other => panic!("not PreMismatch: {other:?}"),
    }
    // The other functions still match.
    assert!(linker(&k, &pre, &post, &d).check_pre("noted").is_ok());
}

#[test]
fn string_literal_becomes_patch_data() {
    let (pre, post) = (compile(BASIC_PRE), compile(BASIC_POST));
    let d = diff(&pre, &post);
    let k = fake_kernel(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    let mut data = DataSet::default();
    let f = check_and_link(&l, "changed_fn", "changed_fn", &mut data).expect("link");
    let data_relocs: Vec<&Relocation> = f
        .relocations
        .iter()
        .filter(|r| matches!(r.target, RelocTarget::Data(_)))
        .collect();
    // `movq $.LC, %rdi` for each printk: absolute, sign-extended (the kernel code model).
    assert_eq!(data_relocs.len(), 2, "{:?}", f.relocations);
    let mut strings = Vec::new();
    for r in data_relocs {
        assert_eq!(r.kind, RelocKind::Abs32S);
        let RelocTarget::Data(b) = r.target else {
            unreachable!()
        };
        let block = &data.blocks[b as usize];
        let at = usize::try_from(r.addend).expect("addend into the block");
        let s = &block.bytes[at..];
        let end = s.iter().position(|&c| c == 0).expect("NUL-terminated");
        strings.push(String::from_utf8_lossy(&s[..end]).into_owned());
        assert_eq!(&f.code[r.offset as usize..r.offset as usize + 4], [0; 4]);
    }
    assert_eq!(strings, ["abcdef\n", "value %d\n"]);
    // The variable is the kernel's (`state`), the call printk's.
    assert_eq!(symbol_relocs(&f, "state").len(), 1, "{:?}", f.relocations);
    assert_eq!(symbol_relocs(&f, "printk").len(), 2, "{:?}", f.relocations);
}

#[test]
fn fentry_call_becomes_a_nop() {
    let (pre, post) = (compile(BASIC_PRE), compile(BASIC_POST));
    // The premise: the object's function starts with `call __fentry__`.
    let sym = post.defined("changed_fn").expect("changed_fn");
    assert_eq!(post.bytes_of(sym).expect("bytes")[0], 0xe8);
    assert_eq!(referenced(&post, "changed_fn")[0].0, "__fentry__");
    assert!(post.sections.iter().any(|s| s.name == "__mcount_loc"));

    let d = diff(&pre, &post);
    let k = fake_kernel(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    let mut data = DataSet::default();
    let f = check_and_link(&l, "changed_fn", "changed_fn", &mut data).expect("link");
    assert_eq!(f.code[..5], NOP5);
    assert!(
        symbol_relocs(&f, "__fentry__").is_empty(),
        "{:?}",
        f.relocations
    );
    assert!(f.relocations.iter().all(|r| r.offset >= 5));
}

// ---------------------------------------------------------------------------------------

/// `arch_static_branch()` of Linux 6.1 x86 (arch/x86/include/asm/jump_label.h, without the
/// objtool `jmp` hack): a 5-byte NOP and a `__jump_table` entry of code, target and key with
/// the branch bit.
const JUMP_LABEL: &str = r#"
#define bool _Bool
struct static_key { int enabled; void *entries; };
struct tracepoint { const char *name; struct static_key key; };
extern struct tracepoint __tracepoint_demo;
static struct static_key local_key;
extern int slow_path(int);

static __attribute__((always_inline)) inline bool arch_static_branch(struct static_key * const key, const bool branch)
{
	asm goto("1:"
		".byte 0x0f,0x1f,0x44,0x00,0x00\n\t"
		".pushsection __jump_table,  \"aw\" \n\t"
		".balign 8\n\t"
		".long 1b - . \n\t"
		".long %l[l_yes] - . \n\t"
		".quad %c0 + %c1 - .\n\t"
		".popsection \n\t"
		: :  "i" (key), "i" (branch) : : l_yes);
	return 0;
l_yes:
	return 1;
}

int jl_fn(int x)
{
	if (arch_static_branch(&__tracepoint_demo.key, 0))
		x = slow_path(x);
	if (!arch_static_branch(&local_key, 1))
		x += ADD;
	return x + 1;
}
"#;

/// One `__jump_table` entry of `u` as offsets in function `f`: (site, target, key symbol
/// name, key addend with the flag bits).
fn jump_entries(u: &Unit, f: &str) -> Vec<(u64, u64, String, i64)> {
    let sec = u
        .sections
        .iter()
        .find(|s| s.name == "__jump_table")
        .expect("__jump_table");
    let fs = &u.symbols[u.defined(f).expect("function")];
    let at = |off: u64| -> &source_diff::elf::Reloc {
        sec.relocs
            .iter()
            .find(|r| r.offset == off)
            .expect("jump table field")
    };
    (0..sec.data.len() as u64 / 16)
        .map(|e| {
            let (c, t, k) = (at(e * 16), at(e * 16 + 4), at(e * 16 + 8));
            let rel = |r: &source_diff::elf::Reloc| {
                let s = &u.symbols[r.symbol];
                assert_eq!(s.section, fs.section);
                (i128::from(s.value) + i128::from(r.addend) - i128::from(fs.value)) as u64
            };
            let ks = &u.symbols[k.symbol];
            let kname = if ks.kind == SymKind::Section {
                u.sections[ks.section.expect("key section")].name.clone()
            } else {
                ks.name.clone()
            };
            (rel(c), rel(t), kname, k.addend)
        })
        .collect()
}

#[test]
fn jump_labels_become_stubs() {
    let pre = compile(&JUMP_LABEL.replace("ADD", "3"));
    let post = compile(&JUMP_LABEL.replace("ADD", "4"));
    let entries = jump_entries(&post, "jl_fn");
    assert_eq!(entries.len(), 2, "{entries:?}");
    // The key operands as the kernel's: a tracepoint's key (8 bytes in), branch 0; a file-local
    // key reached through its section symbol, branch 1.
    assert_eq!(
        (entries[0].2.as_str(), entries[0].3),
        ("__tracepoint_demo", 8)
    );
    assert_eq!((entries[1].2.as_str(), entries[1].3), (".bss.local_key", 1));

    let d = diff(&pre, &post);
    assert_eq!(names(&d.changed), [("jl_fn", "jl_fn")]);
    let k = fake_kernel(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    let mut data = DataSet::default();
    let f = check_and_link(&l, "jl_fn", "jl_fn", &mut data).expect("link");
    let post_sym = post.defined("jl_fn").expect("jl_fn");
    let size = post.symbols[post_sym].size as usize;
    let expect = [
        ("__tracepoint_demo", 8 - 5, Mnemonic::Jg),
        ("local_key", -5, Mnemonic::Jle),
    ];
    let mut stubs = Vec::new();
    for ((site, target, _, _), (key, addend, jcc)) in entries.iter().zip(expect) {
        let site = *site as usize;
        assert_eq!(
            post.bytes_of(post_sym).expect("bytes")[site..site + 5],
            NOP5
        );
        // The site: jmp rel32 to a stub after the function.
        assert_eq!(f.code[site], 0xe9);
        let jmp = decode_at(&f.code, site);
        assert_eq!((jmp.mnemonic(), jmp.len()), (Mnemonic::Jmp, 5));
        let stub = jmp.near_branch_target() as usize;
        assert!(stub >= size && stub < f.code.len(), "stub at {stub:#x}");
        stubs.push(stub);
        // cmpl $0, key(%rip)
        assert_eq!(f.code[stub..stub + 2], [0x83, 0x3d]);
        assert_eq!(f.code[stub + 6], 0);
        let cmp = decode_at(&f.code, stub);
        assert_eq!(cmp.mnemonic(), Mnemonic::Cmp);
        assert_eq!(cmp.op0_kind(), OpKind::Memory);
        assert_eq!(cmp.memory_base(), Register::RIP);
        assert_eq!(cmp.immediate(1), 0);
        assert_eq!(cmp.len(), 7);
        let rels: Vec<&Relocation> = f
            .relocations
            .iter()
            .filter(|r| r.offset as usize == stub + 2)
            .collect();
        assert_eq!(
            rels,
            [&Relocation::symbol(
                (stub + 2) as u32,
                RelocKind::Rel32,
                key,
                addend
            )]
        );
        // jg (branch 0: jump when enabled) / jle (branch 1: when disabled) to the label.
        let j = decode_at(&f.code, stub + 7);
        assert_eq!(f.code[stub + 7], 0x0f);
        assert_eq!(
            f.code[stub + 8],
            if jcc == Mnemonic::Jg { 0x8f } else { 0x8e }
        );
        assert_eq!(j.mnemonic(), jcc);
        assert_eq!(j.near_branch_target(), *target);
        // Back to the instruction after the site.
        let back = decode_at(&f.code, stub + 13);
        assert_eq!(f.code[stub + 13], 0xe9);
        assert_eq!(back.mnemonic(), Mnemonic::Jmp);
        assert_eq!(back.near_branch_target() as usize, site + 5);
    }
    assert_ne!(stubs[0], stubs[1]);
    // Nothing else refers to the keys (the table is gone with the NOPs).
    assert_eq!(symbol_relocs(&f, "__tracepoint_demo").len(), 1);
    assert_eq!(symbol_relocs(&f, "local_key").len(), 1);
    assert_eq!(symbol_relocs(&f, "slow_path").len(), 1);
}

// ---------------------------------------------------------------------------------------

/// `_ASM_EXTABLE` around a load, and `__WARN_FLAGS` / `BUG()` (`ud2` with a `__bug_table`
/// entry, relative pointers, 12-byte entries, objtool's reachability note) as 6.1 x86 emits
/// them; `*_tail` put the described instruction in the function's last bytes.
const TABLES: &str = r#"
#define EXTABLE(from, to) \
	".pushsection __ex_table, \"a\"\n" \
	".balign 4\n" \
	".long " from " - .\n" \
	".long " to " - .\n" \
	".long 0\n" \
	".popsection\n"
#define BUG_ENTRY(flags, extra) \
	asm volatile("1:\t.byte 0x0f, 0x0b\n" \
		".pushsection __bug_table,\"aw\"\n" \
		"2:\t.long 1b - .\t# bug_entry::bug_addr\n" \
		"\t.long %c0 - .\t# bug_entry::file\n" \
		"\t.word %c1\t# bug_entry::line\n" \
		"\t.word %c2\t# bug_entry::flags\n" \
		"\t.org 2b+%c3\n" \
		".popsection\n" \
		extra \
		: : "i" (__FILE__), "i" (__LINE__), "i" (flags), "i" (12))
#define ASM_REACHABLE \
	"998:\n\t.pushsection .discard.reachable\n\t.long 998b - .\n\t.popsection\n\t"

int load_safe(const int *p)
{
	int v = -14;
	asm volatile("1: movl (%1), %0\n" EXTABLE("1b", "2f") "2:\n" : "+r" (v) : "r" (p));
	return v + ADD;
}

int load_tail(const int *p)
{
	int v;
	asm volatile("1: movl (%1), %0\n" EXTABLE("1b", "2f") "2:\n" : "=r" (v) : "r" (p));
	return v ADD2;
}

int warn_fn(int x)
{
	if (x > 100)
		BUG_ENTRY(1 << 1, ASM_REACHABLE);
	return x * ADD;
}

int bug_tail(int x)
{
	if (x > 100) {
		BUG_ENTRY(0, "");
		__builtin_unreachable();
	}
	return x * ADD;
}
"#;

fn tables_unit(post: bool) -> Unit {
    compile(
        &TABLES
            .replace("ADD2", if post { "+ 0" } else { "" })
            .replace("ADD", if post { "3" } else { "2" }),
    )
}

#[test]
fn exception_and_bug_tables_are_refused() {
    let (pre, post) = (tables_unit(false), tables_unit(true));
    // The premise for the `_tail` functions: the described instruction ends within 4 bytes of
    // the function's end (a PC-relative table field is not an instruction's).
    for (f, insn_len) in [("load_tail", 2), ("bug_tail", 2)] {
        let s = &post.symbols[post.defined(f).expect("function")];
        let table = if f == "load_tail" {
            "__ex_table"
        } else {
            "__bug_table"
        };
        let sec = post
            .sections
            .iter()
            .find(|x| x.name == table)
            .expect("table");
        let at = sec
            .relocs
            .iter()
            .filter(|r| post.symbols[r.symbol].section == s.section)
            .map(|r| post.symbols[r.symbol].value as i64 + r.addend - s.value as i64)
            .min()
            .expect("an entry for the function");
        assert!(
            at as u64 + insn_len + 4 > s.size,
            "{f}: entry at {at:#x} of {:#x}",
            s.size
        );
    }
    let d = diff(&pre, &post);
    assert_eq!(
        names(&d.changed),
        [
            ("bug_tail", "bug_tail"),
            ("load_safe", "load_safe"),
            ("warn_fn", "warn_fn")
        ]
    );
    let k = fake_kernel(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    for (f, table) in [
        ("load_safe", "__ex_table"),
        ("load_tail", "__ex_table"),
        ("warn_fn", "__bug_table"),
        ("bug_tail", "__bug_table"),
    ] {
        let mut data = DataSet::default();
        // load_tail did not change: linked here all the same, to see its table.
        match check_and_link(&l, f, f, &mut data) {
            Err(e @ LinkError::Unsupported { .. }) => {
                let LinkError::Unsupported { function, what, .. } = &e else {
                    unreachable!()
                };
                assert_eq!(function, f);
                assert!(what.contains(table), "{f}: {what}");
                let msg = e.to_string();
                assert!(msg.contains(f) && msg.contains(table), "{msg}");
            }
            other => panic!("{f}: not refused: {other:?}"),
        }
    }
}

/// A WARN's `__bug_table` entry refers to `__FILE__` PC-relatively, so the assembler keeps the
/// literal's `.LCn` label as a symbol (a mergeable section); a function passing `__FILE__`
/// reaches the same literal through the section symbol, where the label is the symbol found.
const FILE_USER: &str = r#"
extern int printk(const char *fmt, ...);
int warn_fn(int x)
{
	printk("first string\n");
	if (x > 100)
		asm volatile("1:\t.byte 0x0f, 0x0b\n"
			".pushsection __bug_table,\"aw\"\n"
			"2:\t.long 1b - .\n\t.long %c0 - .\n\t.word %c1\n\t.word %c2\n"
			"\t.org 2b+%c3\n.popsection\n"
			: : "i" (__FILE__), "i" (__LINE__), "i" (1 << 1), "i" (12));
	return x;
}
int file_user(int x)
{
	printk("%s: VERB\n", __FILE__);
	return x;
}
"#;

#[test]
fn string_reached_through_a_kept_label() {
    let pre = compile(&FILE_USER.replace("VERB", "old"));
    let post = compile(&FILE_USER.replace("VERB", "new"));
    // The premise: file_user's reference to `__FILE__` is section + offset, and a `.LCn`
    // label sits at that offset (not 0).
    let sym = post.defined("file_user").expect("file_user");
    let r = post
        .relocs_of(sym)
        .into_iter()
        .find(|r| {
            let s = &post.symbols[r.symbol];
            s.kind == SymKind::Section && r.addend != 0
        })
        .expect("a reference to a literal at an offset");
    let sec = post.symbols[r.symbol].section.expect("section");
    let at = r.pointed(&post);
    assert!(
        post.symbols.iter().any(|s| s.section == Some(sec)
            && s.name.starts_with(".LC")
            && i128::from(s.value) == at),
        "no kept .LCn label at the literal"
    );
    // Such a label names nothing stable: it is never the symbol a reference lands on.
    assert_eq!(post.symbol_at(sec, at), None);

    let d = diff(&pre, &post);
    assert_eq!(names(&d.changed), [("file_user", "file_user")]);
    let k = fake_kernel(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    let mut data = DataSet::default();
    let f = check_and_link(&l, "file_user", "file_user", &mut data).expect("link");
    let mut strings = Vec::new();
    for r in &f.relocations {
        let RelocTarget::Data(b) = r.target else {
            continue;
        };
        let bytes = &data.blocks[b as usize].bytes;
        let at = usize::try_from(r.addend).expect("addend into the block");
        let s = bytes.get(at..).expect("addend inside the block");
        let end = s.iter().position(|&c| c == 0).expect("NUL-terminated");
        strings.push(String::from_utf8_lossy(&s[..end]).into_owned());
    }
    strings.sort();
    // The file name, whole, as the object has it at the referenced offset.
    let text = &post.sections[sec].data[r.pointed(&post) as usize..];
    let file = String::from_utf8_lossy(&text[..text.iter().position(|&c| c == 0).expect("NUL")])
        .into_owned();
    assert!(file.starts_with('/') && file.ends_with("/unit.c"), "{file}");
    assert_eq!(strings, ["%s: new\n".to_string(), file]);
}

/// The kernel's build inlined `helper` (so it has no `helper` of this unit), another unit of
/// the kernel has a function called `helper`, and the fix's build keeps it out of line.
const INLINED: &str = r#"
extern int printk(const char *fmt, ...);
static ATTR int helper(int x)
{
	printk("helper %d\n", x);
	return x * 3;
}
int user(int x)
{
	return helper(x) + BODY;
}
"#;

#[test]
fn a_function_the_kernel_inlined_is_carried_never_called_by_its_name() {
    let kernel_build = compile(
        &INLINED
            .replace("ATTR", "inline __attribute__((always_inline))")
            .replace("BODY", "1"),
    );
    let base = compile(
        &INLINED
            .replace("ATTR", "__attribute__((noinline))")
            .replace("BODY", "1"),
    );
    let post = compile(
        &INLINED
            .replace("ATTR", "__attribute__((noinline))")
            .replace("BODY", "2"),
    );
    // The premises: the kernel's build has no `helper`; the others do.
    assert!(kernel_build.defined("helper").is_none());
    assert!(base.defined("helper").is_some() && post.defined("helper").is_some());
    let k = fake_kernel(&kernel_build, &post);
    // Another unit's `helper`, unique in kallsyms.
    let mut syms = k.kallsyms.symbols().to_vec();
    syms.push(KernelSymbol {
        address: EXTERN + 0x10_0000,
        kind: 't',
        name: "helper".into(),
    });
    let k = FakeKernel {
        kallsyms: Kallsyms::from_symbols(syms),
        ..k
    };
    let d = diff(&base, &post);
    let l = Linker {
        kernel: Kernel {
            vmlinux: &k.vmlinux,
            kallsyms: &k.kallsyms,
        },
        pre: &base,
        post: &post,
        kernel_pre: &kernel_build,
        diff: &d,
        unit_tag: 0,
    };
    let mut data = DataSet::default();
    let linked = check_and_link(&l, "user", "user", &mut data).expect("link user");
    assert_eq!(linked.carried, vec!["helper".to_string()]);
    assert!(
        symbol_relocs(&linked, "helper").is_empty(),
        "the new code calls another unit's helper: {:?}",
        linked.relocations
    );
    // And a unit's own function is never named by a unique name alone: the kernel's `helper`
    // here is not this unit's code.
    assert!(matches!(
        l.kernel_name("helper", "user", 0, false),
        Err(LinkError::Ambiguous { .. })
    ));
}

/// Out-of-line copies of one function in several units, as the kernel has for a header's
/// `static inline` helper (`_compound_head`: six): `helper` reaches only globals, `helper2` a
/// variable each unit has its own of in the kernel built below.
const COPIES: &str = r#"
extern int ext_fn(int);
extern int ext_var;
int (*fnptr)(int);
static __attribute__((noinline)) int helper(int x)
{
	return ext_fn(x) * 7 + 3;
}
static __attribute__((noinline)) int helper2(int x)
{
	return x + ext_var;
}
int user1(int a)
{
	return helper(a) + BODY;
}
int user2(int a)
{
	return helper2(a) + BODY;
}
int taker(int a)
{
	fnptr = helper;
	return a + BODY;
}
"#;

#[test]
fn a_call_may_go_to_any_copy_that_is_the_same_code_on_the_same_data() {
    let pre = compile(&COPIES.replace("BODY", "1"));
    let post = compile(&COPIES.replace("BODY", "2"));
    let k = fake_kernel(&pre, &post);
    let mut text = k.vmlinux[0x1000..].to_vec();
    let mut syms = k.kallsyms.symbols().to_vec();
    // Every relocated field of a copy at `at`: field i reaches `targets[i]` from its place.
    let fill = |text: &mut Vec<u8>, name: &str, at: u64, targets: &[u64]| {
        let sym = pre.defined(name).expect("defined");
        for (r, t) in pre.relocs_of(sym).iter().zip(targets) {
            let field = at + r.offset;
            let o = (field - TEXT) as usize;
            let v = if r.is_pc_relative() {
                (*t as i64 - field as i64) as i32
            } else {
                *t as i32
            };
            text[o..o + 4].copy_from_slice(&v.to_le_bytes());
        }
    };
    for (name, other) in [("helper", EXTERN + 0x200), ("helper2", DATA + 0x900)] {
        let sym = pre.defined(name).expect("defined");
        let n = pre.relocs_of(sym).len();
        let first = k.text[name];
        // A second copy in another unit, after everything else.
        while !text.len().is_multiple_of(16) {
            text.push(0xcc);
        }
        let second = TEXT + text.len() as u64;
        text.extend_from_slice(pre.bytes_of(sym).expect("bytes"));
        syms.push(KernelSymbol {
            address: second,
            kind: 't',
            name: name.into(),
        });
        let same: Vec<u64> = (0..n as u64).map(|i| EXTERN + 0x100 + i).collect();
        fill(&mut text, name, first, &same);
        // helper's second copy reaches what the first does; helper2's, its own variable.
        let mut theirs = same.clone();
        if name == "helper2" {
            *theirs.last_mut().expect("a field for ext_var") = other;
        }
        fill(&mut text, name, second, &theirs);
    }
    let k = FakeKernel {
        vmlinux: vmlinux(TEXT, &text),
        kallsyms: Kallsyms::from_symbols(syms),
        ..k
    };
    let d = diff(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    let mut data = DataSet::default();
    // The call to helper goes to one of its two copies, by the name the patch format takes.
    let linked = check_and_link(&l, "user1", "user1", &mut data).expect("link user1");
    assert!(
        linked
            .relocations
            .iter()
            .any(|r| r.target == RelocTarget::Symbol("helper,1".into())),
        "{:?}",
        linked.relocations
    );
    // helper2's copies use different variables: which one is this unit's is not known.
    assert!(matches!(
        check_and_link(&l, "user2", "user2", &mut data),
        Err(LinkError::Ambiguous { symbol, .. }) if symbol == "helper2"
    ));
    // An address taken is compared, not only called: it must be this unit's own copy.
    assert!(matches!(
        check_and_link(&l, "taker", "taker", &mut data),
        Err(LinkError::Ambiguous { symbol, .. }) if symbol == "helper"
    ));
}

// ---------------------------------------------------------------------------------------

/// A callee GCC compiled before its callers in the same unit: with IPA-RA `caller` keeps `b`
/// and `c` in caller-saved registers across the calls, because `helper` never writes them;
/// `plain_caller` keeps nothing across its call.
const IPA_RA: &str = r#"
static __attribute__((noinline)) int helper(int x)
{
	CLOBBER;
	return x * 3 + BODY;
}
int caller(int a, int b, int c)
{
	int r = helper(a);
	r += helper(r);
	return r * b + c;
}
int plain_caller(int a)
{
	return helper(a) + 1;
}
"#;

/// A real write of both registers: GCC's own view of an `asm`'s clobbers is not in the code,
/// and the check reads the code.
const CLOBBER_RSI_RDX: &str =
    r#"asm volatile("xor %%esi, %%esi\n\txor %%edx, %%edx" ::: "rsi", "rdx")"#;

fn ipa_ra_unit(flags: &[&str], body: &str, clobber: &str) -> Vec<u8> {
    compile_object(
        &IPA_RA.replace("BODY", body).replace("CLOBBER", clobber),
        flags,
        &[],
    )
}

/// The analysis of a fix whose objects are `pre` (also the kernel's) and `post`.
fn analyze(pre: &[u8], post: &[u8], ipa_ra: bool) -> source_diff::build::UnitAnalysis {
    analyze_reporting(pre, post, ipa_ra).0
}

fn analyze_reporting(
    pre: &[u8],
    post: &[u8],
    ipa_ra: bool,
) -> (source_diff::build::UnitAnalysis, SourceReport) {
    let (p, q) = (
        Unit::parse(pre).expect("parse"),
        Unit::parse(post).expect("parse"),
    );
    let k = fake_kernel(&p, &q);
    let target = TargetKernel {
        vmlinux: &k.vmlinux,
        kallsyms: &k.kallsyms,
        banner: "",
    };
    let objects = UnitObjects {
        unit: "unit.c".into(),
        pre: pre.to_vec(),
        base: pre.to_vec(),
        post: post.to_vec(),
        warn_rewritten: false,
        plain: None,
        ipa_ra,
    };
    let mut report = SourceReport::default();
    let a =
        analyze_unit(&target, &objects, 0, &mut DataSet::default(), &mut report).expect("analyze");
    (a, report)
}

fn result_of<'a>(
    a: &'a source_diff::build::UnitAnalysis,
    name: &str,
) -> &'a source_diff::build::FunctionResult {
    &a.functions
        .iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("{name} not among the sites: {:?}", a.changed))
        .1
}

fn assert_ipa_ra_refusal(r: &source_diff::build::FunctionResult, unchanged_callers: &[&str]) {
    match r {
        Err(SourceBuildError::IpaRa {
            function,
            registers,
            callers,
        }) => {
            assert_eq!(function, "helper");
            assert!(
                registers.contains(&"%rsi".to_string()) && registers.contains(&"%rdx".to_string()),
                "{registers:?}"
            );
            assert_eq!(callers, unchanged_callers);
        }
        other => panic!("not refused for IPA-RA: {other:?}"),
    }
}

#[test]
fn a_callee_that_clobbers_more_is_refused_while_unchanged_callers_remain() {
    let notrace = cflags_notrace();
    let pre = ipa_ra_unit(&notrace, "1", "");
    let post = ipa_ra_unit(&notrace, "2", CLOBBER_RSI_RDX);
    // The premise: with IPA-RA `caller` reads %esi after a call to helper.
    let u = Unit::parse(&pre).expect("parse");
    let code = u
        .bytes_of(u.defined("caller").expect("caller"))
        .expect("bytes");
    let mut d = Decoder::with_ip(64, code, 0, DecoderOptions::NONE);
    let mut after_call = false;
    let mut reads_rsi = false;
    for ins in d.iter() {
        if ins.mnemonic() == Mnemonic::Call {
            after_call = true;
        } else if after_call && (0..ins.op_count()).any(|i| ins.op_register(i) == Register::ESI) {
            reads_rsi = true;
        }
    }
    assert!(
        reads_rsi,
        "caller keeps nothing in %esi across the call: {code:02x?}"
    );

    let a = analyze(&pre, &post, true);
    assert!(a.refusal.is_none());
    // The comparison sees what GCC did: `caller` was compiled again against the new helper
    // (it now saves b and c), so it is replaced in the same blackout and fine.
    assert!(
        result_of(&a, "caller").is_ok(),
        "{:?}",
        result_of(&a, "caller")
    );
    // `plain_caller` compiled to the same bytes: the check cannot tell from its code whether
    // it relies on %rsi or %rdx, so the build is refused, naming it (conservative).
    assert!(
        !a.changed.contains(&"plain_caller".to_string()),
        "{:?}",
        a.changed
    );
    assert_ipa_ra_refusal(result_of(&a, "helper"), &["plain_caller"]);
}

#[test]
fn a_unit_built_for_ftrace_has_no_ipa_ra_to_protect() {
    // With -pg GCC allocates as the ABI says: the callers save what they keep in callee-saved
    // registers, so the new callee may write any caller-saved one.
    let pre = ipa_ra_unit(CFLAGS, "1", "");
    let post = ipa_ra_unit(CFLAGS, "2", CLOBBER_RSI_RDX);
    let a = analyze(&pre, &post, false);
    assert_eq!(a.changed, ["helper"]);
    assert!(
        result_of(&a, "helper").is_ok(),
        "{:?}",
        result_of(&a, "helper")
    );
    // The check itself does not know the flags: told IPA-RA was on, it refuses.
    let a = analyze(&pre, &post, true);
    assert_ipa_ra_refusal(result_of(&a, "helper"), &["caller", "plain_caller"]);
}

/// Two functions with a static local each, and a third whose macro has one only without the
/// `REWRITE` (as the WARN rewrite drops `WARN_ONCE`'s `__already_done`). GCC numbers static
/// locals across the unit, the last defined 0: without the rewrite `first`'s is `n.2` and
/// `second`'s `n.1`; with it `first`'s is `n.1`, the name of `second`'s in the kernel.
const RENUMBERED: &str = r#"
extern int printk(const char *fmt, ...);
int first(int x)
{
	static int n;
	n += x;
	return n + CHANGE;
}
int second(int x)
{
	static int n;
	n -= x;
	return n;
}
#ifdef REWRITE
#define ONCE() printk("once\n")
#else
#define ONCE() do { static int done; if (!done) { done = 1; printk("once\n"); } } while (0)
#endif
int once(int x)
{
	ONCE();
	return x;
}
"#;

#[test]
fn a_rewrite_that_renumbers_static_locals_falls_back_to_the_kernels_numbering() {
    let build = |change: &str, rewrite: bool| {
        let extra: &[&str] = if rewrite { &["-DREWRITE"] } else { &[] };
        compile_object(&RENUMBERED.replace("CHANGE", change), CFLAGS, extra)
    };
    let (pre, base_w, post_w) = (build("1", false), build("1", true), build("2", true));
    let (plain_base, plain_post) = (build("1", false), build("2", false));
    // The premises: the rewrite renumbers, onto the kernel's name of another variable.
    let parsed = |b: &[u8]| Unit::parse(b).expect("parse");
    assert_eq!(local_of(&parsed(&pre), "first", "n"), "n.2");
    assert_eq!(local_of(&parsed(&pre), "second", "n"), "n.1");
    assert_eq!(local_of(&parsed(&post_w), "first", "n"), "n.1");

    let (p, q) = (parsed(&pre), parsed(&post_w));
    let k = fake_kernel(&p, &q);
    let target = TargetKernel {
        vmlinux: &k.vmlinux,
        kallsyms: &k.kallsyms,
        banner: "",
    };
    let mut objects = UnitObjects {
        unit: "unit.c".into(),
        pre: pre.clone(),
        base: base_w,
        post: post_w,
        warn_rewritten: true,
        plain: Some((plain_base, plain_post)),
        ipa_ra: false,
    };
    let mut report = SourceReport::default();
    let a =
        analyze_unit(&target, &objects, 0, &mut DataSet::default(), &mut report).expect("analyze");
    assert!(a.refusal.is_none(), "{:?}", a.refusal);
    assert!(!report.warn_rewritten, "compared with the rewrite");
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("(its static variables)")),
        "{:?}",
        report.notes
    );
    let (_, first) = a
        .functions
        .iter()
        .find(|(n, _)| n == "first")
        .expect("first changed");
    let (_, linked) = first.as_ref().expect("first links");
    assert!(
        !symbol_relocs(linked, "n.2").is_empty(),
        "{:?}",
        linked.relocations
    );
    assert!(
        symbol_relocs(linked, "n.1").is_empty(),
        "first's new code uses second's counter: {:?}",
        linked.relocations
    );

    // Without a build to fall back on, the unit is refused rather than bound by the
    // rewritten numbering.
    objects.plain = None;
    let mut report = SourceReport::default();
    let a =
        analyze_unit(&target, &objects, 0, &mut DataSet::default(), &mut report).expect("analyze");
    assert!(
        matches!(a.refusal, Some(SourceBuildError::Inlining { .. })),
        "{:?}",
        a.refusal
    );
    assert!(a.functions.is_empty());
}

/// `f` says it is 4 bytes long, but the call in it has its 32-bit field at +3.
const OVERRUN_PRE: &str = r#"
asm(".pushsection .text.f,\"ax\",@progbits\n"
    ".globl f\n.type f,@function\n"
    "f:\n\tnop\n\tret\n"
    ".size f, .-f\n.popsection\n");
"#;
const OVERRUN_POST: &str = r#"
extern void ext_fn(void);
asm(".pushsection .text.f,\"ax\",@progbits\n"
    ".globl f\n.type f,@function\n"
    "f:\n\tnop\n\tnop\n\tcall ext_fn\n\tret\n"
    ".size f, 4\n.popsection\n");
"#;

#[test]
fn a_relocation_past_the_end_of_its_function_is_refused() {
    let (pre, post) = (compile(OVERRUN_PRE), compile(OVERRUN_POST));
    let f = post.defined("f").expect("f");
    assert_eq!(post.symbols[f].size, 4);
    let d = diff(&pre, &post);
    assert_eq!(names(&d.changed), [("f", "f")]);
    let k = fake_kernel(&pre, &post);
    let l = linker(&k, &pre, &post, &d);
    match check_and_link(&l, "f", "f", &mut DataSet::default()) {
        Err(LinkError::Unsupported { function, what, .. }) => {
            assert_eq!(function, "f");
            assert!(what.contains("past the end"), "{what}");
        }
        other => panic!("not refused: {other:?}"),
    }
}

/// `EXPORT_SYMBOL(f)` as 6.1 emits it: an entry in a section of its own.
const EXPORTED: &str = r#"
int f(int x)
{
	return x + BODY;
}
EXPORT
"#;

#[test]
fn an_export_the_fix_adds_is_said_not_dropped() {
    let build = |body: &str, export: &str| {
        compile_object(
            &EXPORTED.replace("BODY", body).replace("EXPORT", export),
            CFLAGS,
            &[],
        )
    };
    let export =
        r#"asm(".section \"___ksymtab+f\", \"a\"\n__ksymtab_f:\n.long f - .\n.previous");"#;
    let (a, report) = analyze_reporting(&build("1", ""), &build("2", export), false);
    assert!(a.refusal.is_none());
    assert!(result_of(&a, "f").is_ok());
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("exports f") && n.contains("reboot")),
        "{:?}",
        report.notes
    );
    // No note where the export was there before.
    let (_, report) = analyze_reporting(&build("1", export), &build("2", export), false);
    assert!(
        !report.notes.iter().any(|n| n.contains("exports")),
        "{:?}",
        report.notes
    );
}

// ---------------------------------------------------------------------------------------

/// A struct whose layout a macro decides, an enumerator's value, a variable of another unit
/// whose size one does, and an external function whose parameters one does: a diff would
/// touch only the `#define` lines (or a header's `#ifdef`).
const LAYOUT: &str = r#"
#define EXTRA_FIELD FIELD
#define TABLE_SIZE SIZE
#define MORE_PARAMS PARAMS
enum mode { MODE_A, EXTRA_MODE MODE_B };
struct s {
	int a;
	EXTRA_FIELD
	union {
		int b;
		long c;
	};
	unsigned int flag : 3;
};
extern int table[TABLE_SIZE];
int get_b(struct s *p, enum mode m)
{
	return p->b + p->flag + table[1] + (m == MODE_B) + (int)sizeof(table) + BODY;
}
int takes(int x MORE_PARAMS)
{
	return x + BODY;
}
"#;

fn layout_unit(field: &str, size: &str, params: &str, mode: &str, body: &str) -> Vec<u8> {
    let src = LAYOUT
        .replace("EXTRA_FIELD FIELD", &format!("EXTRA_FIELD {field}"))
        .replace("TABLE_SIZE SIZE", &format!("TABLE_SIZE {size}"))
        .replace("MORE_PARAMS PARAMS", &format!("MORE_PARAMS {params}"))
        .replace("EXTRA_MODE", mode)
        .replace("BODY", body);
    compile_object(&src, CFLAGS, &["-g"])
}

fn layout_refusal(post: &[u8]) -> Vec<String> {
    let pre = layout_unit("", "4", "", "", "0");
    let a = analyze(&pre, post, false);
    match a.refusal {
        Some(SourceBuildError::LayoutChange { changes, .. }) => changes,
        other => panic!(
            "not refused for a layout change: {other:?}; changed {:?}",
            a.changed
        ),
    }
}

#[test]
fn the_compilers_layouts_are_read_from_dwarf() {
    let u = Unit::parse(&layout_unit("", "4", "", "", "0")).expect("parse");
    let l = source_diff::layout::Layouts::of(&u).expect("dwarf");
    assert!(l.has_debug_info);
    // Names come through .debug_str relocations, offsets from the members, the anonymous
    // union flattened in, the bit-field with its bit offset.
    let s = &l.aggregates["struct s"][0];
    assert!(s.starts_with("size 24: a@0/4 b@8/4 c@8/8 flag@"), "{s}");
    assert_eq!(l.variables.get("table"), Some(&16));
    assert_eq!(l.enumerators.get("MODE_B"), Some(&1));
    assert_eq!(
        l.functions.get("takes").map(String::as_str),
        Some("ret 4 (4)")
    );
    // Without -g there is nothing to compare, and the object says so.
    let plain = Unit::parse(&compile_object(
        &LAYOUT
            .replace("FIELD", "")
            .replace("SIZE", "4")
            .replace("PARAMS", "")
            .replace("EXTRA_MODE", "")
            .replace("BODY", "0"),
        CFLAGS,
        &[],
    ))
    .expect("parse");
    assert!(
        !source_diff::layout::Layouts::of(&plain)
            .expect("no dwarf")
            .has_debug_info
    );
}

#[test]
fn a_layout_changed_through_a_macro_is_refused() {
    let pre = layout_unit("", "4", "", "", "0");
    // The same layouts with a changed body: patchable.
    let a = analyze(&pre, &layout_unit("", "4", "", "", "1"), false);
    assert!(a.refusal.is_none(), "{:?}", a.refusal);
    assert!(
        result_of(&a, "get_b").is_ok(),
        "{:?}",
        result_of(&a, "get_b")
    );

    let c = layout_refusal(&layout_unit("long x;", "4", "", "", "0"));
    assert!(c.iter().any(|c| c.contains("layout of struct s")), "{c:?}");
    let c = layout_refusal(&layout_unit("", "8", "", "", "0"));
    assert!(
        c.iter()
            .any(|c| c.contains("variable table") && c.contains("16 → 32")),
        "{c:?}"
    );
    let c = layout_refusal(&layout_unit("", "4", ", long y", "", "1"));
    assert!(
        c.iter()
            .any(|c| c.contains("signature of external function takes")),
        "{c:?}"
    );
    let c = layout_refusal(&layout_unit("", "4", "", "MODE_NEW,", "0"));
    assert!(
        c.iter()
            .any(|c| c.contains("enumerator MODE_B") && c.contains("1 → 2")),
        "{c:?}"
    );
}

/// `WARN_ONCE`'s pattern: a static local alone in `.data.once`, whose name every unit's
/// copy shares, so no named neighbour says which kernel copy is the unit's.
const ONCE: &str = r#"
extern int printk(const char *fmt, ...);
int noisy(int x)
{
	static int done __attribute__((section(".data.once")));
	if (!done) {
		done = 1;
		printk("once\n");
	}
	return x + CHANGE;
}
"#;

#[test]
fn a_static_local_no_neighbour_places_is_found_through_the_kernels_own_code() {
    let (pre, post) = (
        compile(&ONCE.replace("CHANGE", "1")),
        compile(&ONCE.replace("CHANGE", "2")),
    );
    let local = local_of(&pre, "noisy", "done");
    let k = fake_kernel(&pre, &post);
    let real = k
        .kallsyms
        .named(&local)
        .next()
        .expect("the unit's variable")
        .address;
    // Two other units' copies of the same name, at higher addresses.
    let mut syms = k.kallsyms.symbols().to_vec();
    for n in 1..=2u64 {
        syms.push(KernelSymbol {
            address: EXTERN + 0x1000 * n,
            kind: 'd',
            name: local.clone(),
        });
    }
    let mut k = FakeKernel {
        kallsyms: Kallsyms::from_symbols(syms),
        ..k
    };
    let d = diff(&pre, &post);
    {
        // The fake kernel's text has the fields unlinked: nothing says which copy.
        let l = linker(&k, &pre, &post, &d);
        let e = check_and_link(&l, "noisy", "noisy", &mut DataSet::default());
        assert!(matches!(e, Err(LinkError::Ambiguous { .. })), "{e:?}");
    }
    // Link noisy's references to the variable as the kernel's build did.
    let f = pre.defined("noisy").expect("noisy");
    let var = pre.defined(&local).expect("done");
    let at = k.text["noisy"];
    for r in pre.relocs_of(f) {
        let t = &pre.symbols[r.symbol];
        let s_addr = if t.kind == SymKind::Section {
            if t.section != pre.symbols[var].section {
                continue;
            }
            real - pre.symbols[var].value + t.value
        } else if r.symbol == var {
            real
        } else {
            continue;
        };
        let p = at + r.offset;
        let v = (s_addr as i64)
            .wrapping_add(r.addend)
            .wrapping_sub(p as i64) as i32;
        let file = 0x1000 + (p - TEXT) as usize;
        k.vmlinux[file..file + 4].copy_from_slice(&v.to_le_bytes());
    }
    let l = linker(&k, &pre, &post, &d);
    let linked = check_and_link(&l, "noisy", "noisy", &mut DataSet::default()).expect("link");
    // The first of the three by address: the one the kernel's noisy uses.
    let to_var = symbol_relocs(&linked, &format!("{local},1"));
    assert!(!to_var.is_empty(), "{:?}", linked.relocations);
}

/// An ops structure the kernel keeps in a section of its own, as `DEFINE_SCHED_CLASS` puts
/// `rt_sched_class` in `__rt_sched_class`: the kernel's copy points at the kernel's function.
const CLASS: &str = r#"
struct ops {
	int (*pick)(int);
	int flags;
};
int pick_rt(int x)
{
	return x + BODY;
}
const struct ops rt_class __attribute__((section("__rt_class"), used)) = {
	.pick = pick_rt,
	.flags = FLAGS,
};
"#;

#[test]
fn a_pointer_from_a_kernel_objects_own_section_to_a_replaced_function_is_kept() {
    let build = |body: &str, flags: &str| {
        compile_object(
            &CLASS.replace("BODY", body).replace("FLAGS", flags),
            CFLAGS,
            &[],
        )
    };
    // The function changes, the structure does not: the kernel's structure reaches the new
    // code through the replaced function's site.
    let a = analyze(&build("1", "1"), &build("2", "1"), false);
    assert!(a.refusal.is_none(), "{:?}", a.refusal);
    assert!(
        result_of(&a, "pick_rt").is_ok(),
        "{:?}",
        result_of(&a, "pick_rt")
    );
    // The structure changes too: the running kernel's copy would not, so the fix is refused.
    let a = analyze(&build("1", "1"), &build("2", "3"), false);
    match &a.refusal {
        Some(SourceBuildError::DataChanged { name, section, .. }) => {
            assert_eq!(
                (name.as_str(), section.as_str()),
                ("rt_class", "__rt_class")
            );
        }
        other => panic!("a changed rt_class not refused: {other:?}"),
    }
}
