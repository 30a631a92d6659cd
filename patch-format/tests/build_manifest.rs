//! Building patches from a manifest and a gcc-compiled object.

mod common;

use common::{EXE_FLAGS, V1, gcc, path_of};
use patch_format::*;

const OBJ_FLAGS: &[&str] = &[
    "-c",
    "-O2",
    "-ffreestanding",
    "-fno-pic",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-ffunction-sections",
];

const FIX: &str = r#"
extern int counter;
extern int mix(int, int);
extern int helper(int);
int compute_fixed(int x) {
    if (x < 0) x = 0;
    counter++;
    return mix(x, 3) + helper(x);
}
__asm__(
    ".section .text.triangle_check,\"ax\",@progbits\n"
    ".globl triangle_check\n"
    ".type triangle_check,@function\n"
    "triangle_check:\n"
    "  test %edi, %edi\n"
    "  jns 1f\n"
    "  xor %edi, %edi\n"
    "1:\n"
    ".size triangle_check, .-triangle_check\n"
    ".text\n");
"#;

fn manifest(sites: &str) -> String {
    format!(
        r#"
name = "fix-compute"
description = "Clamp negative inputs.\nSecond line."
author = "tests"
advisories = ["CVE-2026-0001"]
object = "fix.o"
[target]
elf = "v1-manifest"
name = "gcc-guest v1"
{sites}
"#
    )
}

fn setup() {
    gcc("v1-manifest", V1, EXE_FLAGS);
    gcc("fix.o", FIX, OBJ_FLAGS);
}

#[test]
fn function_and_micropatch_sites() {
    setup();
    let text = manifest(
        r#"
[[site]]
kind = "function"
target = "compute"
code = "compute_fixed"

[[site]]
kind = "micropatch"
at = "triangle"
code = "triangle_check"
"#,
    );
    let path = path_of("fix-ok.toml");
    std::fs::write(&path, text).unwrap();
    let out = build_from_manifest_file(&path, 42).unwrap();
    let p = &out.patch;
    assert_eq!(p.meta.created, 42);
    assert_eq!(p.meta.description, "Clamp negative inputs.\nSecond line.");
    assert_eq!(p.sites.len(), 2);
    let f = &p.sites[0];
    assert_eq!(f.target.to_string(), "compute");
    assert_eq!(f.kind, SiteKind::Function);
    let mut syms: Vec<&str> = f
        .relocations
        .iter()
        .filter_map(|r| r.symbol_name())
        .collect();
    syms.sort();
    assert_eq!(syms, ["counter", "helper", "mix"]);
    assert!(f.relocations.iter().all(|r| r.kind == RelocKind::Rel32));
    let m = &p.sites[1];
    assert_eq!(m.kind, SiteKind::Micropatch);
    assert!(
        m.expected.len() >= 5,
        "whole instructions covering >= 5 bytes"
    );
    assert_eq!(m.code.len(), 6, "test + jns + xor");
    assert!(m.relocations.is_empty());
    // Round trip.
    let bytes = p.to_file_unsigned().unwrap();
    assert_eq!(parse(&bytes).unwrap().patch, *p);
}

#[test]
fn manifest_errors_are_clear() {
    setup();
    let cases = [
        (
            "[[site]]\nkind = \"micropatch\"\nat = \"triangle+1\"\ncode = \"triangle_check\"\n",
            "not an instruction boundary",
        ),
        (
            "[[site]]\nkind = \"function\"\ntarget = \"nope\"\ncode = \"compute_fixed\"\n",
            "no symbol \"nope\"",
        ),
        (
            "[[site]]\nkind = \"function\"\ntarget = \"compute\"\ncode = \"missing\"\n",
            "defines no symbol \"missing\"",
        ),
        (
            "[[site]]\nkind = \"function\"\nat = \"compute\"\ncode = \"compute_fixed\"\n",
            "needs `target",
        ),
        (
            "[[site]]\nkind = \"other\"\ntarget = \"x\"\ncode = \"y\"\n",
            "is not \"function\"",
        ),
        ("bogus = 1\n", "unknown field"),
    ];
    for (i, (sites, want)) in cases.iter().enumerate() {
        let path = path_of(&format!("fix-bad{i}.toml"));
        std::fs::write(&path, manifest(sites)).unwrap();
        let e = build_from_manifest_file(&path, 0).unwrap_err().to_string();
        assert!(e.contains(want), "case {i}: {e:?} should mention {want:?}");
    }
}

#[test]
fn pic_objects_are_refused() {
    gcc("v1-manifest", V1, EXE_FLAGS);
    let mut flags: Vec<&str> = OBJ_FLAGS
        .iter()
        .copied()
        .filter(|f| *f != "-fno-pic")
        .collect();
    flags.push("-fpic");
    gcc("fix-pic.o", FIX, &flags);
    let text =
        manifest("[[site]]\nkind = \"function\"\ntarget = \"compute\"\ncode = \"compute_fixed\"\n")
            .replace("fix.o", "fix-pic.o");
    let path = path_of("fix-pic.toml");
    std::fs::write(&path, text).unwrap();
    let e = build_from_manifest_file(&path, 0).unwrap_err().to_string();
    assert!(e.contains("-fno-pic"), "{e}");
}

#[test]
fn locations() {
    assert_eq!(
        parse_location("f+0x12"),
        Ok(Location::Symbol {
            name: "f".into(),
            offset: 0x12
        })
    );
    assert_eq!(
        parse_location("f+18"),
        Ok(Location::Symbol {
            name: "f".into(),
            offset: 18
        })
    );
    assert_eq!(
        parse_location("f"),
        Ok(Location::Symbol {
            name: "f".into(),
            offset: 0
        })
    );
    assert_eq!(parse_location("0x1000"), Ok(Location::Address(0x1000)));
    assert!(parse_location("+3").is_err());
    assert!(parse_location("f+zz").is_err());
    assert!(parse_location("").is_err());
}
