//! The stock Debian kernel's own symbols, read agentless from its bzImage
//! (`linux_guest`): no `-dbg` package, no guest cooperation.
//!
//! These tests need the real kernel. They never pass silently without it: they fail, saying
//! to run `scripts/linux-kit` (or to set `HOTPATCH_VMLINUZ`).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use integration_tests::linux::{Kit, proc_kallsyms};
use linux_guest::{Kallsyms, build_id, linux_banner, vmlinux_from_bzimage};

/// Link-time addresses measured in 6.1.0-56-amd64 (Debian 6.1.192-2, build ID eb4fbcd0…),
/// from its `-dbg` System.map and a `nokaslr` boot's /proc/kallsyms.
const KNOWN_RELEASE: &str = "6.1.0-56-amd64";
const KNOWN_DEBIAN_VERSION: &str = "Debian 6.1.192-2";
const TEXT: u64 = 0xffff_ffff_8100_0000;
const KNOWN: &[(&str, u64)] = &[
    ("version_proc_show", 0xffff_ffff_8141_1e30),
    ("__x64_sys_getpid", 0xffff_ffff_810b_e350),
];

/// The vmlinux and its symbols, timing both steps.
fn load(path: &Path) -> (Vec<u8>, Kallsyms) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let started = Instant::now();
    let vmlinux =
        vmlinux_from_bzimage(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let extracted = started.elapsed();
    let started = Instant::now();
    let kallsyms =
        Kallsyms::from_vmlinux(&vmlinux).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let parsed = started.elapsed();
    eprintln!(
        "{}: {} -> {} bytes of vmlinux in {extracted:.2?}, {} symbols parsed in {parsed:.2?}",
        path.display(),
        bytes.len(),
        vmlinux.len(),
        kallsyms.len()
    );
    eprintln!("layout: {:#x?}", kallsyms.layout());
    (vmlinux, kallsyms)
}

#[test]
fn debian_kernel_symbols() {
    let path = integration_tests::linux::vmlinuz_path();
    let (vmlinux, ks) = load(&path);

    assert!(ks.len() >= 90_000, "only {} symbols", ks.len());
    assert_eq!(
        ks.layout().unsorted_pairs,
        0,
        "the kernel's table is sorted"
    );
    let text = ks.lookup("_text").expect("_text");
    let etext = ks.lookup("_etext").expect("_etext");
    assert_eq!(text, TEXT, "_text at {text:#x}");
    assert!(etext > text, "_etext {etext:#x} <= _text {text:#x}");

    let banner = linux_banner(&vmlinux, &ks).expect("linux_banner");
    eprintln!("banner: {banner:?}");
    assert!(banner.starts_with("Linux version "), "{banner:?}");
    let id = build_id(&vmlinux).expect("GNU build ID note");
    eprintln!("build id: {}", hex::encode(&id));
    assert_eq!(id.len(), 20, "build ID {}", hex::encode(&id));

    let known = banner.contains(&format!("Linux version {KNOWN_RELEASE} "))
        && banner.contains(KNOWN_DEBIAN_VERSION);
    if !known {
        eprintln!(
            "not {KNOWN_RELEASE} ({KNOWN_DEBIAN_VERSION}): checking only that the functions \
             exist in [_text, _etext)"
        );
    }
    for &(name, want) in KNOWN {
        let sym = ks
            .lookup_symbol(name)
            .unwrap_or_else(|| panic!("no {name}"));
        assert!(sym.is_text(), "{name} is {:?}", sym.kind);
        if known {
            assert_eq!(sym.address, want, "{name} at {:#x}", sym.address);
        } else {
            assert!(
                (text..etext).contains(&sym.address),
                "{name} at {:#x}, outside [{text:#x}, {etext:#x})",
                sym.address
            );
        }
        // An address inside the function maps back to it (or to an alias at its address).
        let inside = ks.containing(sym.address + 7).expect("containing");
        assert_eq!(inside.address, sym.address, "{name}+7 -> {inside:?}");
    }
    // Debian builds its kernels with PREEMPT_DYNAMIC: the engine reads the preemption mode
    // word itself each time it patches (linux_guest::preemption), a data symbol after the text.
    let mode = ks
        .lookup_symbol("preempt_dynamic_mode")
        .expect("preempt_dynamic_mode, the mode word of a PREEMPT_DYNAMIC kernel");
    assert!(!mode.is_text() && mode.address >= etext, "{mode:?}");
    assert_eq!(
        linux_guest::preemption::of_kernel(&ks, 0x2a0_0000),
        patch_engine::threads::Preemption::Dynamic {
            mode_at: mode.address + 0x2a0_0000,
            voluntary: vec![0, 1],
        }
    );
    // The banner symbol is data, in .rodata after the text.
    let banner_sym = ks.lookup_symbol("linux_banner").expect("linux_banner");
    assert!(
        !banner_sym.is_text() && banner_sym.address >= etext,
        "{banner_sym:?}"
    );
}

#[test]
fn parser_matches_proc_kallsyms() {
    let kit = Kit::ensure();
    let proc = proc_kallsyms(&kit);
    let (_vmlinux, ks) = load(&kit.vmlinuz);

    // /proc/kallsyms lines: `addr type name` for the kernel, `addr type name\t[module]` for
    // modules (and BPF/ftrace/kprobe trampolines), which are not in the vmlinux.
    let mut core = Vec::new();
    let mut modules = 0usize;
    for line in proc.lines() {
        let mut f = line.split_whitespace();
        let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
            panic!("bad /proc/kallsyms line {line:?}");
        };
        if f.next().is_some() {
            modules += 1;
            continue;
        }
        let addr = u64::from_str_radix(addr, 16).unwrap_or_else(|e| panic!("{line:?}: {e}"));
        let kind = kind.chars().next().expect("type");
        core.push((addr, kind, name));
    }
    assert!(
        core.iter().any(|&(a, _, _)| a != 0),
        "/proc/kallsyms shows only zero addresses: it was read without the right to see them"
    );

    let ours: HashMap<(u64, &str), char> = ks
        .symbols()
        .iter()
        .map(|s| ((s.address, s.name.as_str()), s.kind))
        .collect();
    let missing: Vec<_> = core
        .iter()
        .filter(|&&(a, _, n)| !ours.contains_key(&(a, n)))
        .collect();
    let wrong_type: Vec<_> = core
        .iter()
        .filter(|&&(a, k, n)| ours.get(&(a, n)).is_some_and(|&ours| ours != k))
        .collect();
    eprintln!(
        "/proc/kallsyms: {} kernel symbols (+{modules} of modules), ours: {}; missing: {}, \
         other type: {}",
        core.len(),
        ks.len(),
        missing.len(),
        wrong_type.len()
    );
    assert!(
        missing.is_empty(),
        "{} /proc/kallsyms symbols are not in the parsed table, e.g. {:x?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert!(
        wrong_type.is_empty(),
        "{} symbols have another type, e.g. {:x?}",
        wrong_type.len(),
        &wrong_type[..wrong_type.len().min(10)]
    );
    // The kernel prints its whole table in table order. The dump travels over the serial
    // console, where a kernel message could garble a line (proc_kallsyms drops those), so
    // allow a few lines fewer; measured on 6.1.0-56: 94,266 = 94,266, identical sequence.
    assert!(
        core.len() <= ks.len() && ks.len() - core.len() <= 3,
        "symbol counts differ: /proc/kallsyms {}, parsed {}",
        core.len(),
        ks.len()
    );
    let mut ours = ks.symbols().iter();
    for (i, &(a, k, n)) in core.iter().enumerate() {
        assert!(
            ours.any(|s| (s.address, s.kind, s.name.as_str()) == (a, k, n)),
            "/proc/kallsyms line {i} ({a:x} {k} {n}) is out of the parsed table's order"
        );
    }
}
