//! Builds the freestanding test guest twice (v1, and v2 with `--cfg guest_v2`) by invoking the
//! host's rustc directly: no extra target can be downloaded here, so the guest is a `no_std`
//! x86_64-unknown-linux-gnu binary linked statically at 1 MiB with our own linker script.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let guest = manifest.join("guest");
    for f in [
        "main.rs",
        "boot.rs",
        "cmdline.rs",
        "console.rs",
        "mem.rs",
        "workload.rs",
        "link.ld",
    ] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    for f in ["protocol.rs", "reference.rs"] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest.join("src").join(f).display()
        );
    }
    build(&guest, &out, "v1", &[]);
    build(&guest, &out, "v2", &["--cfg", "guest_v2"]);
}

fn build(guest: &Path, out: &Path, name: &str, extra: &[&str]) {
    let manifest = guest.parent().expect("guest/ has a parent");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let elf = out.join(format!("test-guest-{name}.elf"));
    let link_ld = guest.join("link.ld");
    let status = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "test_guest",
            // The host target (the only one installed), named so that a non-x86-64 host gets a
            // clear "target not installed" error instead of assembler errors.
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
        ])
        .args([
            "-C",
            "force-frame-pointers=yes",
            "-C",
            "debuginfo=0",
            "-C",
            "codegen-units=1",
        ])
        .args([
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-static",
        ])
        .args([
            "-C",
            "link-arg=-no-pie",
            "-C",
            "link-arg=-Wl,--build-id=sha1",
        ])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", link_ld.display()))
        // DWARF comes only from the precompiled `core` (the guest itself has debuginfo=0): drop
        // it, keep the symbol table (patches are built from these symbols).
        .args(["-C", "link-arg=-Wl,--strip-debug"])
        // Paths in the image (panic locations) must not depend on where the checkout is, so the
        // same sources give the same bytes everywhere.
        .arg(format!(
            "--remap-path-prefix={}=guest-tools",
            manifest.display()
        ))
        .args([
            "--cfg",
            "guest_build",
            "--check-cfg",
            "cfg(guest_v2,guest_build)",
        ])
        .args(extra)
        .arg(guest.join("main.rs"))
        .arg("-o")
        .arg(&elf)
        // The workspace's own RUSTFLAGS (e.g. coverage) must not leak into the guest.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!(
            "building the {name} test guest with {rustc} failed ({s}); see the rustc/linker \
             output above (the guest needs the x86_64-unknown-linux-gnu target and `cc`)"
        ),
        Err(e) => panic!("could not run {rustc} to build the {name} test guest: {e}"),
    }
}
