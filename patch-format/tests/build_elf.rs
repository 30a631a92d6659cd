//! Building patches from two gcc-built executables.

mod common;

use common::{EXE_FLAGS, V1, V2, gcc};
use iced_x86::{Decoder, DecoderOptions, FlowControl};
use object::{Object, ObjectSymbol};
use patch_format::*;

fn info() -> PatchInfo {
    PatchInfo {
        meta: Metadata {
            name: "fix-compute".into(),
            description: "test".into(),
            author: "tests".into(),
            created: 1_700_000_000,
            advisories: vec!["CVE-2026-0002".into(), "CVE-2026-0001".into()],
            replaces: vec![],
        },
        target_name: Some("gcc-guest v1".into()),
    }
}

fn symbols(elf: &[u8]) -> std::collections::HashMap<String, u64> {
    let f = object::File::parse(elf).unwrap();
    f.symbols()
        .filter(|s| {
            matches!(
                s.kind(),
                object::SymbolKind::Text | object::SymbolKind::Data
            )
        })
        .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
        .collect()
}

fn func_bytes(elf: &[u8], name: &str) -> Vec<u8> {
    let f = object::File::parse(elf).unwrap();
    let s = f.symbols().find(|s| s.name() == Ok(name)).unwrap();
    use object::ObjectSection;
    let sec = f.section_by_index(s.section_index().unwrap()).unwrap();
    let off = (s.address() - sec.address()) as usize;
    sec.data().unwrap()[off..off + s.size() as usize].to_vec()
}

#[test]
fn finds_exactly_the_changed_functions() {
    let old = gcc("v1", V1, EXE_FLAGS);
    let new = gcc("v2", V2, EXE_FLAGS);
    // The unchanged functions really moved (otherwise the test proves little).
    let (so, sn) = (symbols(&old), symbols(&new));
    assert_ne!(so["mix"], sn["mix"], "mix should move between builds");
    assert_ne!(so["helper"], sn["helper"]);

    let out = build_from_elfs(&old, &new, &[], &info()).unwrap();
    assert_eq!(out.report.changed, vec!["compute", "triangle"]);
    assert_eq!(out.report.added, vec!["added_padding"]);
    assert!(out.report.removed.is_empty());
    // mix, helper and _start are the same modulo moved addresses.
    assert_eq!(out.report.unchanged, 3);
    let p = &out.patch;
    assert_eq!(p.sites.len(), 2);
    assert_eq!(p.meta.advisories, vec!["CVE-2026-0001", "CVE-2026-0002"]);
    assert_eq!(p.target.name, "gcc-guest v1");
    assert_eq!(p.target.build_id.as_ref().map(Vec::len), Some(20));
    for s in &p.sites {
        let Location::Symbol { name, offset: 0 } = &s.target else {
            panic!("bad target {:?}", s.target)
        };
        assert_eq!(s.kind, SiteKind::Function);
        assert_eq!(
            s.expected,
            func_bytes(&old, name),
            "expected bytes = whole old function"
        );
    }
    let compute = p
        .sites
        .iter()
        .find(|s| s.target.to_string() == "compute")
        .unwrap();
    let syms: Vec<(&str, RelocKind)> = compute
        .relocations
        .iter()
        .map(|r| (r.symbol_name().unwrap_or(""), r.kind))
        .collect();
    assert!(syms.contains(&("mix", RelocKind::Rel32)), "{syms:?}");
    assert!(syms.contains(&("helper", RelocKind::Rel32)), "{syms:?}");
    assert!(syms.contains(&("counter", RelocKind::Rel32)), "{syms:?}");
}

#[test]
fn relocated_code_calls_the_old_builds_functions() {
    let old = gcc("v1", V1, EXE_FLAGS);
    let new = gcc("v2", V2, EXE_FLAGS);
    let out = build_from_elfs(&old, &new, &["compute".into()], &info()).unwrap();
    assert_eq!(out.report.changed, vec!["compute"]);
    let site = &out.patch.sites[0];
    let so = symbols(&old);
    let load = 0x4000_0000u64;
    let mut code = site.code.clone();
    apply_relocations(&mut code, load, &site.relocations, &[], |n| {
        so.get(n).copied()
    })
    .unwrap();
    // Every call in the relocated code lands on OLD's function of the same name
    // as in NEW.
    let sn = symbols(&new);
    let by_addr_old: std::collections::HashMap<u64, &String> =
        so.iter().map(|(k, v)| (*v, k)).collect();
    let by_addr_new: std::collections::HashMap<u64, &String> =
        sn.iter().map(|(k, v)| (*v, k)).collect();
    let new_code = func_bytes(&new, "compute");
    let mut d_old = Decoder::with_ip(64, &code, load, DecoderOptions::NONE);
    let mut d_new = Decoder::with_ip(64, &new_code, sn["compute"], DecoderOptions::NONE);
    let mut calls = 0;
    while d_new.can_decode() {
        let (a, b) = (d_old.decode(), d_new.decode());
        assert_eq!(a.code(), b.code());
        if b.flow_control() == FlowControl::Call {
            calls += 1;
            let tn = by_addr_new[&b.near_branch_target()];
            let to = by_addr_old[&a.near_branch_target()];
            assert_eq!(tn, to);
        }
        if b.is_ip_rel_memory_operand() {
            let tn = by_addr_new[&b.ip_rel_memory_address()];
            let to = by_addr_old[&a.ip_rel_memory_address()];
            assert_eq!(tn, to);
        }
    }
    assert_eq!(calls, 2);
}

#[test]
fn function_filter_errors() {
    let old = gcc("v1", V1, EXE_FLAGS);
    let new = gcc("v2", V2, EXE_FLAGS);
    let e = build_from_elfs(&old, &new, &["mix".into()], &info()).unwrap_err();
    assert_eq!(e, BuildError::Unchanged("mix".into()));
    let e = build_from_elfs(&old, &new, &["nope".into()], &info()).unwrap_err();
    assert_eq!(e, BuildError::UnknownFunction("nope".into()));
    let e = build_from_elfs(&old, &old, &[], &info()).unwrap_err();
    assert_eq!(e, BuildError::NoChanges);
}

#[test]
fn build_is_deterministic_and_round_trips() {
    let old = gcc("v1", V1, EXE_FLAGS);
    let new = gcc("v2", V2, EXE_FLAGS);
    let a = build_from_elfs(&old, &new, &["compute".into(), "triangle".into()], &info()).unwrap();
    let b = build_from_elfs(&old, &new, &["triangle".into(), "compute".into()], &info()).unwrap();
    assert_eq!(a.patch, b.patch);
    let bytes = a.patch.to_file_unsigned().unwrap();
    let parsed = parse(&bytes).unwrap();
    assert_eq!(parsed.patch, a.patch);
    assert_eq!(parsed.id, a.patch.id().unwrap());
    assert_eq!(parsed.patch.to_file_unsigned().unwrap(), bytes);
}

#[test]
fn absolute_addresses_become_absolute_relocations() {
    // Non-PIE code takes addresses with `mov $sym, reg` (a 32-bit absolute immediate).
    let v1 = V1.to_string();
    let v2 = V1.replace(
        "int compute(int x) { counter++;",
        "int compute(int x) { int (*volatile fp)(int) = helper; counter++; x += fp(x);",
    );
    let old = gcc("abs-v1", &v1, EXE_FLAGS);
    let new = gcc("abs-v2", &v2, EXE_FLAGS);
    // (gcc also changes _start's stack frame here, so select compute.)
    let out = build_from_elfs(&old, &new, &["compute".into()], &info()).unwrap();
    assert_eq!(out.report.changed, vec!["compute"]);
    let site = &out.patch.sites[0];
    let abs: Vec<_> = site
        .relocations
        .iter()
        .filter(|r| r.kind != RelocKind::Rel32)
        .collect();
    assert_eq!(abs.len(), 1, "{:?}", site.relocations);
    assert_eq!(abs[0].symbol_name(), Some("helper"));
    assert_eq!(abs[0].addend, 0);
    assert!(
        out.report
            .warnings
            .iter()
            .any(|w| w.contains("absolute address"))
    );
    // Resolved against OLD, the immediate is OLD's helper.
    let so = symbols(&old);
    let mut code = site.code.clone();
    apply_relocations(&mut code, 0x20_0000, &site.relocations, &[], |n| {
        so.get(n).copied()
    })
    .unwrap();
    let off = abs[0].offset as usize;
    let v = u32::from_le_bytes(code[off..off + 4].try_into().unwrap());
    assert_eq!(u64::from(v), so["helper"]);
}
