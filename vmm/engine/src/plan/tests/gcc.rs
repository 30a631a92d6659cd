//! Where the embedded images come from: compiles and links `fixtures.c` with the gcc found on
//! `PATH`, and checks the images in `fixtures.rs` against what it emits.
//!
//! Regenerate `fixtures.rs` (after editing `fixtures.c`, or to move to another toolchain):
//! `PLAN_FIXTURES_REGEN=1 cargo test -p vmm --lib engine::plan::tests::gcc`, then `cargo fmt`.

use super::{Image, check_image, fixtures};
use object::{Object, ObjectSection, ObjectSymbol, SymbolKind};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags every image is built with: a fixed layout (`.text` at 0x401000, no PIE, no start
/// files), and every distribution default that changes code generation spelled out
/// (Ubuntu's gcc enables CET, PIE and the stack protector by default).
pub const COMMON: &str = "-O2 -fno-pie -no-pie -fno-stack-protector -fno-asynchronous-unwind-tables \
     -nostdlib -static -Wl,-Ttext=0x401000 -Wl,--build-id=none -Wl,-e,0";

/// (const name in `fixtures.rs`, image name, the variant's own flags).
pub const VARIANTS: [(&str, &str, &str); 8] = [
    ("PLAIN", "plain", "-fcf-protection=none"),
    ("IBT", "ibt", "-fcf-protection=full"),
    (
        "PATCHABLE",
        "patchable",
        "-fcf-protection=none -fpatchable-function-entry=5",
    ),
    (
        "IBT_PATCHABLE",
        "ibt-patchable",
        "-fcf-protection=full -fpatchable-function-entry=5",
    ),
    (
        "FENTRY",
        "fentry",
        "-fcf-protection=none -pg -mfentry -Wl,--defsym=__fentry__=0x400000",
    ),
    (
        "IBT_FENTRY",
        "ibt-fentry",
        "-fcf-protection=full -pg -mfentry -Wl,--defsym=__fentry__=0x400000",
    ),
    (
        "NOP_MCOUNT",
        "nop-mcount",
        "-fcf-protection=none -pg -mfentry -mnop-mcount",
    ),
    (
        "IBT_NOP_MCOUNT",
        "ibt-nop-mcount",
        "-fcf-protection=full -pg -mfentry -mnop-mcount",
    ),
];

const SOURCE: &str = include_str!("fixtures.c");

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/plan/tests")
}

/// An image freshly built here.
struct Fresh {
    name: String,
    flags: String,
    text_at: u64,
    text: Vec<u8>,
    symbols: Vec<(String, u64, u64)>,
}

impl Fresh {
    fn with_image<R>(&self, f: impl FnOnce(&Image<'_>) -> R) -> R {
        let symbols: Vec<(&str, u64, u64)> = self
            .symbols
            .iter()
            .map(|(n, a, s)| (n.as_str(), *a, *s))
            .collect();
        f(&Image {
            name: &self.name,
            flags: &self.flags,
            text_at: self.text_at,
            text: &self.text,
            symbols: &symbols,
        })
    }
}

/// Runs a command, its stdout on success.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The toolchain's identity (gcc's and ld's first `--version` lines), `None` if there is no
/// gcc at all.
fn toolchain() -> Option<String> {
    let gcc = match Command::new("gcc").arg("--version").output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("gcc --version: {e}"),
        Ok(o) => String::from_utf8_lossy(&o.stdout)
            .lines()
            .next()?
            .to_string(),
    };
    let ld = run(Command::new("ld").arg("--version")).expect("gcc needs ld (binutils)");
    Some(format!("{gcc}; {}", ld.lines().next().unwrap_or("?")))
}

fn build(dir: &Path, name: &str, flags: &str) -> Fresh {
    let src = dir.join("fixtures.c");
    let out = dir.join(name);
    run(Command::new("gcc")
        .args(COMMON.split_whitespace())
        .args(flags.split_whitespace())
        .arg(&src)
        .arg("-o")
        .arg(&out))
    .unwrap_or_else(|e| panic!("building fixture image {name}: {e}"));
    let elf = std::fs::read(&out).unwrap();
    let file = object::File::parse(&*elf).unwrap();
    let text = file.section_by_name(".text").expect("a .text section");
    let text_at = text.address();
    let text_bytes = text.data().unwrap().to_vec();
    let mut symbols: Vec<(String, u64, u64)> = file
        .symbols()
        .filter(|s| {
            matches!(
                s.kind(),
                SymbolKind::Text | SymbolKind::Data | SymbolKind::Unknown
            )
        })
        .filter_map(|s| {
            let n = s.name().ok()?;
            (!n.is_empty() && s.address() != 0).then(|| (n.to_string(), s.address(), s.size()))
        })
        .collect();
    symbols.sort();
    Fresh {
        name: name.into(),
        flags: flags.into(),
        text_at,
        text: text_bytes,
        symbols,
    }
}

/// The text of `fixtures.rs` for these images (unformatted: run `cargo fmt` after).
fn render(toolchain: &str, images: &[(&str, Fresh)]) -> String {
    let mut s = String::new();
    s += "//! GENERATED from `fixtures.c` by `PLAN_FIXTURES_REGEN=1 cargo test -p vmm --lib \
          engine::plan::tests::gcc` (then `cargo fmt`): do not edit by hand.\n//!\n";
    s += &format!("//! Toolchain: {toolchain}\n//!\n");
    s += "//! Each image: `gcc $COMMON $FLAGS fixtures.c -o IMAGE`, with\n";
    s += &format!(
        "//! `COMMON = {COMMON}`\n//! and the image's `flags` below. Its `.text` and symbols are taken from the linked ELF.\n"
    );
    s += "//!\n//! The source, `fixtures.c`:\n//!\n//! ```c\n";
    for l in SOURCE.lines() {
        s += &format!("//! {l}\n").replace("//! \n", "//!\n");
    }
    s += "//! ```\n\nuse super::Image;\n\n";
    s += &format!("pub const TOOLCHAIN: &str = {toolchain:?};\n\n");
    for (konst, img) in images {
        s += &format!(
            "/// `gcc $COMMON {}`\npub const {konst}: Image<'static> = Image {{\n    name: {:?},\n    flags: {:?},\n    text_at: {:#x},\n    text: &[\n",
            img.flags, img.name, img.flags, img.text_at
        );
        for chunk in img.text.chunks(16) {
            let line: Vec<String> = chunk.iter().map(|b| format!("{b:#04x}")).collect();
            s += &format!("        {},\n", line.join(", "));
        }
        s += "    ],\n    symbols: &[\n";
        for (n, a, z) in &img.symbols {
            s += &format!("        ({n:?}, {a:#x}, {z}),\n");
        }
        s += "    ],\n};\n\n";
    }
    let names: Vec<&str> = images.iter().map(|(k, _)| *k).collect();
    s += &format!(
        "pub const ALL: [Image<'static>; {}] = [{}];\n",
        names.len(),
        names.join(", ")
    );
    s
}

/// The C source recorded in `fixtures.rs`'s comment is `fixtures.c` (no gcc needed).
#[test]
fn recorded_source_is_fixtures_c() {
    let rs = include_str!("fixtures.rs");
    let recorded: Vec<&str> = rs
        .lines()
        .skip_while(|l| *l != "//! ```c")
        .skip(1)
        .take_while(|l| *l != "//! ```")
        .map(|l| {
            l.strip_prefix("//! ")
                .unwrap_or(l.strip_prefix("//!").unwrap_or(l))
        })
        .collect();
    let source: Vec<&str> = SOURCE.lines().collect();
    assert_eq!(
        recorded, source,
        "fixtures.c changed since fixtures.rs was generated: regenerate it (see gcc.rs)"
    );
}

/// Builds every image with the gcc here. Same toolchain as recorded: the embedded bytes and
/// symbols must be exactly what it emits. Another toolchain (its code may differ): the
/// planner must give the same answers on its output, by the same rules ([`check_image`]).
/// No gcc at all: skipped, with a note.
#[test]
fn fixtures_match_gcc() {
    let Some(tc) = toolchain() else {
        eprintln!("note: gcc not found; not recompiling the planner's fixtures");
        return;
    };
    let tmp = tempfile::Builder::new()
        .prefix("vmm-plan-fixtures-")
        .tempdir()
        .unwrap();
    let dir = tmp.path().to_path_buf();
    std::fs::write(dir.join("fixtures.c"), SOURCE).unwrap();
    let fresh: Vec<(&str, Fresh)> = VARIANTS
        .iter()
        .map(|(konst, name, flags)| (*konst, build(&dir, name, flags)))
        .collect();
    tmp.close().unwrap();

    if std::env::var_os("PLAN_FIXTURES_REGEN").is_some() {
        let path = fixtures_dir().join("fixtures.rs");
        std::fs::write(&path, render(&tc, &fresh)).unwrap();
        eprintln!("wrote {}; run cargo fmt", path.display());
        return;
    }

    assert_eq!(fixtures::ALL.len(), fresh.len());
    for ((_, f), e) in fresh.iter().zip(fixtures::ALL) {
        assert_eq!((f.name.as_str(), f.flags.as_str()), (e.name, e.flags));
        f.with_image(check_image);
    }
    if tc == fixtures::TOOLCHAIN {
        for ((_, f), e) in fresh.iter().zip(fixtures::ALL) {
            assert_eq!(f.text_at, e.text_at, "{}: .text moved", e.name);
            assert!(
                f.text == e.text,
                "{}: gcc now emits other bytes; regenerate fixtures.rs (see gcc.rs)",
                e.name
            );
            let syms: Vec<(&str, u64, u64)> = f
                .symbols
                .iter()
                .map(|(n, a, s)| (n.as_str(), *a, *s))
                .collect();
            assert_eq!(syms, e.symbols, "{}: symbols differ", e.name);
        }
    } else {
        eprintln!(
            "note: toolchain {tc:?} is not the recorded {:?}: checked the planner's answers on its output, not the bytes",
            fixtures::TOOLCHAIN
        );
    }
}
