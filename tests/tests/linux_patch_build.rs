//! Building a hot patch for the stock Debian kernel (`linux_guest::patch`): its
//! `version_proc_show` (which prints `/proc/version`) replaced by the C function
//! `hp_version_proc_show` of `guest-tools/linux/patches/version_proc_show.c`, compiled like kernel
//! code, against the symbols the kernel carries itself (kallsyms) and the bytes of its vmlinux.
//! No guest runs here: this is the build side.
//!
//! These tests need the real kernel. They never pass silently without it: they fail, saying
//! to run `scripts/linux-kit` (or to set `HOTPATCH_VMLINUZ`).

use std::sync::OnceLock;

use guest_tools::kernel_patch::{self, VERSION_PROC_SHOW_C, VERSION_PROC_SHOW_FIX};
use iced_x86::{Decoder, DecoderOptions, FlowControl};
use integration_tests::TempDir;
use linux_guest::patch::{
    KernelFix, KernelPatchError, build_kernel_patch, file_bytes, kernel_image_info,
};
use linux_guest::{Kallsyms, build_id, linux_banner, vmlinux_from_bzimage};
use patch_format::{Location, Metadata, Patch, RelocKind, SecretKey, SiteKind};

/// Where the kit's kernel has `version_proc_show` (6.1.0-56-amd64, `nokaslr` link address).
const KNOWN_RELEASE: &str = "6.1.0-56-amd64";
const KNOWN_VERSION_PROC_SHOW: u64 = 0xffff_ffff_8141_1e30;

/// The vmlinux and its symbols, read once for all tests of this file.
fn kernel() -> &'static (Vec<u8>, Kallsyms) {
    static KERNEL: OnceLock<(Vec<u8>, Kallsyms)> = OnceLock::new();
    KERNEL.get_or_init(|| {
        let path = integration_tests::linux::vmlinuz_path();
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let vmlinux =
            vmlinux_from_bzimage(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let kallsyms =
            Kallsyms::from_vmlinux(&vmlinux).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        (vmlinux, kallsyms)
    })
}

/// Compiles C patch code with the kernel flags; the object's bytes.
fn compile(source: &str) -> Vec<u8> {
    let dir = TempDir::new("kpatch");
    let obj = kernel_patch::compile(source, dir.path()).unwrap_or_else(|e| panic!("{e}"));
    std::fs::read(obj).unwrap()
}

fn meta() -> Metadata {
    Metadata {
        name: "linux-version-proc-show".into(),
        description: "Tag /proc/version as hot-patched".into(),
        author: "tests".into(),
        created: 1_700_000_000,
        ..Metadata::default()
    }
}

fn build(object: &[u8], fixes: &[(&str, &str)]) -> Result<Patch, KernelPatchError> {
    let (vmlinux, kallsyms) = kernel();
    let fixes: Vec<KernelFix> = fixes.iter().map(|(f, c)| KernelFix::new(*f, *c)).collect();
    build_kernel_patch(vmlinux, kallsyms, object, &fixes, meta())
}

/// The one located (not absolute) kallsyms symbol of that name, or `None`.
fn unique_address(kallsyms: &Kallsyms, name: &str) -> Option<u64> {
    let located: Vec<u64> = kallsyms
        .named(name)
        .filter(|s| !s.is_absolute())
        .map(|s| s.address)
        .collect();
    match located.as_slice() {
        [a] => Some(*a),
        _ => None,
    }
}

#[test]
fn version_proc_show_patch_builds_against_the_stock_kernel() {
    let (vmlinux, kallsyms) = kernel();
    let (code_symbol, function) = VERSION_PROC_SHOW_FIX;
    let object = compile(VERSION_PROC_SHOW_C);
    let patch = build(&object, &[(function, code_symbol)]).unwrap_or_else(|e| panic!("{e}"));

    // The target: this kernel by build id, no text hash (its running text differs from the file).
    let info = kernel_image_info(vmlinux, kallsyms);
    let banner = linux_banner(vmlinux, kallsyms).expect("linux_banner");
    let release = banner["Linux version ".len()..]
        .split_whitespace()
        .next()
        .unwrap();
    assert_eq!(info.identity.name, format!("Linux {release}"));
    assert_eq!(info.identity.build_id, build_id(vmlinux));
    assert!(info.identity.build_id.is_some());
    assert_eq!(info.identity.text_sha256, None);
    assert_eq!(patch.target, info.identity);
    assert!(
        info.symbols
            .windows(2)
            .all(|w| (w[0].addr, &w[0].name) <= (w[1].addr, &w[1].name)),
        "ImageInfo symbols sorted by (address, name)"
    );
    let absolute = kallsyms
        .symbols()
        .iter()
        .filter(|s| s.is_absolute())
        .count();
    assert!(absolute > 0, "x86-64 SMP has per-CPU (A) symbols");
    assert_eq!(info.symbols.len(), kallsyms.len() - absolute);

    // One function site at version_proc_show, expecting the whole old function from the file.
    let [site] = patch.sites.as_slice() else {
        panic!("one site, got {}", patch.sites.len());
    };
    assert_eq!(site.kind, SiteKind::Function);
    assert_eq!(
        site.target,
        Location::Symbol {
            name: function.into(),
            offset: 0
        }
    );
    let address = unique_address(kallsyms, function).expect("version_proc_show is unique");
    if release == KNOWN_RELEASE {
        assert_eq!(address, KNOWN_VERSION_PROC_SHOW);
    }
    let next = kallsyms
        .symbols()
        .iter()
        .filter(|s| !s.is_absolute() && s.address > address)
        .map(|s| s.address)
        .min()
        .unwrap();
    let extent = (next - address) as usize;
    assert_eq!(site.expected.len(), extent, "up to the next symbol");
    assert_eq!(
        Some(site.expected.as_slice()),
        file_bytes(vmlinux, address, extent)
    );
    assert_eq!(site.expected[0], 0xe8, "call __fentry__ as in the file");
    let fentry = kallsyms.lookup("__fentry__").expect("__fentry__");
    let rel = i32::from_le_bytes(site.expected[1..5].try_into().unwrap());
    assert_eq!(
        (address + 5).wrapping_add(rel as i64 as u64),
        fentry,
        "the first instruction calls __fentry__"
    );
    // mov rax, gs:[current] (qemu-linux-notes §4).
    assert_eq!(&site.expected[5..10], &[0x65, 0x48, 0x8b, 0x04, 0x25]);
    let sym = info.symbols.iter().find(|s| s.name == function).unwrap();
    assert!(sym.function);
    assert_eq!((sym.addr, sym.size), (address, extent as u64));

    // The new code calls into the kernel through relocations, all of them resolvable.
    let (code, relocations, data) =
        patch_format::code_from_object(&object, code_symbol).expect("code from the object");
    assert_eq!((&site.code, &site.relocations), (&code, &relocations));
    assert!(
        data.is_empty() && patch.data.is_empty(),
        "stack strings only"
    );
    let names: Vec<&str> = site
        .relocations
        .iter()
        .filter_map(|r| r.symbol_name())
        .collect();
    assert!(
        names.contains(&"seq_printf") || names.contains(&"seq_puts"),
        "{names:?}"
    );
    assert!(names.contains(&"__x86_return_thunk"), "{names:?}");
    for name in &names {
        assert!(
            unique_address(kallsyms, name).is_some(),
            "relocation symbol {name} resolves uniquely in kallsyms"
        );
    }
    // Linked where a module would be (within ±2 GiB of the kernel), the code calls the
    // kernel's seq_printf and returns through its return thunk.
    let load = 0xffff_ffff_c000_0000;
    let mut linked = site.code.clone();
    patch_format::apply_relocations(&mut linked, load, &site.relocations, &[], |s| {
        unique_address(kallsyms, s)
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let seq_printf = kallsyms.lookup("seq_printf").unwrap();
    let thunk = kallsyms.lookup("__x86_return_thunk").unwrap();
    let mut calls = Vec::new();
    let mut jumps = Vec::new();
    for insn in Decoder::with_ip(64, &linked, load, DecoderOptions::NONE).iter() {
        assert!(
            !insn.is_invalid(),
            "code decodes: {insn:?} at {:#x}",
            insn.ip()
        );
        match insn.flow_control() {
            FlowControl::Call => calls.push(insn.near_branch_target()),
            FlowControl::UnconditionalBranch => jumps.push(insn.near_branch_target()),
            FlowControl::Return => panic!("plain ret at {:#x}: no return thunk", insn.ip()),
            _ => {}
        }
    }
    assert!(calls.contains(&seq_printf), "{calls:x?}");
    assert!(jumps.contains(&thunk), "{jumps:x?}");
    let kinds: Vec<RelocKind> = site.relocations.iter().map(|r| r.kind).collect();
    assert!(
        kinds
            .iter()
            .all(|k| matches!(k, RelocKind::Rel32 | RelocKind::Abs32S)),
        "kernel code model: rel32 and sign-extended 32-bit absolutes only, got {kinds:?}"
    );

    // The file: signed, parsed back identical.
    let file = patch
        .to_file_signed(&SecretKey::from_seed(&[7; 32]))
        .unwrap_or_else(|e| panic!("{e}"));
    let parsed = patch_format::parse(&file).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.patch, patch);
    assert_eq!(parsed.id, patch.id().unwrap());
    eprintln!(
        "{}: {} ({} bytes expected, {} bytes of code, relocations {names:?}), {} bytes signed",
        info.identity.name,
        site.target,
        site.expected.len(),
        site.code.len(),
        file.len()
    );
    eprintln!("expected: {}", hex::encode(&site.expected));
}

#[test]
fn kernel_patches_that_cannot_apply_are_refused_with_the_reason() {
    let (_, kallsyms) = kernel();
    let (code_symbol, _) = VERSION_PROC_SHOW_FIX;
    let object = compile(VERSION_PROC_SHOW_C);

    let err = build(&object, &[("hvpatch_no_such_function", code_symbol)]).unwrap_err();
    assert!(
        matches!(err, KernelPatchError::UnknownFunction { .. }),
        "{err}"
    );
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(
        msg.contains("hvpatch_no_such_function") && msg.contains("/proc/kallsyms"),
        "{msg}"
    );

    // A static function name several files use: refused, listing where each one is.
    let mut names: Vec<&str> = kallsyms
        .symbols()
        .iter()
        .filter(|s| s.is_text())
        .map(|s| s.name.as_str())
        .collect();
    names.sort_unstable();
    let dup = names
        .windows(2)
        .find(|w| w[0] == w[1])
        .map(|w| w[0])
        .expect("a kernel has duplicate static function names");
    let err = build(&object, &[(dup, code_symbol)]).unwrap_err();
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(
        matches!(err, KernelPatchError::AmbiguousFunction { .. }),
        "{msg}"
    );
    for s in kallsyms.named(dup).filter(|s| !s.is_absolute()) {
        assert!(msg.contains(&format!("{:#x}", s.address)), "{msg}");
    }

    // Code calling a function the kernel does not have.
    let missing = compile(
        "extern void hvpatch_not_in_the_kernel(void *);\n\
         int hp_calls_missing(void *m, void *v) { (void)v; hvpatch_not_in_the_kernel(m); return 0; }\n",
    );
    let err = build(&missing, &[("version_proc_show", "hp_calls_missing")]).unwrap_err();
    let msg = err.to_string();
    eprintln!("refused: {msg}");
    assert!(
        matches!(&err, KernelPatchError::UnknownSymbol { symbol, .. } if symbol == "hvpatch_not_in_the_kernel"),
        "{msg}"
    );
    assert!(
        msg.contains("hvpatch_not_in_the_kernel") && msg.contains("version_proc_show"),
        "{msg}"
    );

    // Code with writable data of its own (a variable in .bss): refused, saying why.
    let variable = compile(
        "struct seq_file;\n\
         extern void seq_puts(struct seq_file *, const char *);\n\
         static int calls;\n\
         int hp_counts(struct seq_file *m, void *v) { (void)m; (void)v; return ++calls; }\n",
    );
    let err = build(&variable, &[("version_proc_show", "hp_counts")]).unwrap_err();
    // The cause is the source, printed once: render the chain as the CLI does.
    let mut msg = err.to_string();
    let mut cause = std::error::Error::source(&err);
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    eprintln!("refused: {msg}");
    assert!(matches!(err, KernelPatchError::Code { .. }), "{msg}");
    assert!(
        msg.contains("writable") && msg.contains("no per-patch writable state"),
        "{msg}"
    );

    // A string literal (in .rodata.str1.1) is carried as a data block (format version 2).
    let literal = compile(
        "struct seq_file;\n\
         extern void seq_puts(struct seq_file *, const char *);\n\
         int hp_literal(struct seq_file *m, void *v) { (void)v; seq_puts(m, \"hello\\n\"); return 0; }\n",
    );
    let patch = build(&literal, &[("version_proc_show", "hp_literal")]).expect("literal");
    assert_eq!(patch.format_version(), 2);
    let [block] = patch.data.as_slice() else {
        panic!("one data block: {:?}", patch.data);
    };
    assert!(
        block.bytes.windows(7).any(|w| w == b"hello\n\0"),
        "{block:?}"
    );
    assert!(
        patch.sites[0]
            .relocations
            .iter()
            .any(|r| r.target == patch_format::RelocTarget::Data(0)),
        "{:?}",
        patch.sites[0].relocations
    );
}
