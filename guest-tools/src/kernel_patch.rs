//! Hot-patch code for the stock Linux guest kernel, written in C and compiled like the kernel's
//! own code, so that `vmm::linux::patch::build_kernel_patch` can turn a function of the object
//! into a function site.
//!
//! The C sources live in `guest-tools/linux/patches/`. Patch code references kernel symbols
//! (calls, `init_uts_ns`, `linux_proc_banner`, ...), which become relocations resolved against the
//! running kernel when the patch is applied, and may carry read-only data of its own: string
//! literals and `const` data land in the object's `.rodata*` sections, which the builder makes
//! the patch's data blocks (format version 2; [`VERSION_PROC_SHOW_DATA_C`]). Writable data
//! (`.data`, `.bss`) is refused: a patch has no per-patch writable state. The older fixes build
//! their strings on the stack (`char s[] = "..."` compiles to immediate stores at `-O2`), which
//! keeps them version-1 patches.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// gcc flags that make code fit to run inside the x86-64 kernel (as the kernel's own Makefiles
/// build it), after `-c`:
/// - `-mcmodel=kernel -fno-pic -fno-pie`: absolute references are sign-extended 32-bit
///   (`R_X86_64_32S`, the kernel lives in the top 2 GiB) and calls are `call rel32`
///   (`R_X86_64_PLT32`), no GOT;
/// - `-mno-red-zone`: interrupts run on the same stack; `-mno-sse -mno-mmx -mno-sse2 -mno-avx
///   -mno-80387`: no FPU/vector registers in the kernel;
/// - `-mfunction-return=thunk-extern -mindirect-branch=thunk-extern`: returns become
///   `jmp __x86_return_thunk` and indirect branches go through `__x86_indirect_thunk_*`, as in the
///   kernel (RETHUNK/RETPOLINE), so the kernel's mitigation choice covers the patch too;
/// - `-fcf-protection=none`: no `endbr64` (Debian 6.1 has no IBT);
/// - `-fno-stack-protector`, `-fno-jump-tables` (a jump table is data in `.rodata`),
///   `-fno-tree-loop-distribute-patterns` (no surprise `memcpy`/`memset` calls),
///   `-fno-asynchronous-unwind-tables`, `-ffreestanding -nostdinc`, `-fno-common`,
///   `-fno-strict-aliasing`, `-mpreferred-stack-boundary=3` (the kernel keeps 8-byte stack
///   alignment).
pub const KERNEL_CFLAGS: &[&str] = &[
    "-O2",
    "-mcmodel=kernel",
    "-mno-red-zone",
    "-fno-pic",
    "-fno-pie",
    "-ffreestanding",
    "-nostdinc",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-fno-jump-tables",
    "-fno-tree-loop-distribute-patterns",
    "-fno-common",
    "-fno-strict-aliasing",
    "-mno-sse",
    "-mno-mmx",
    "-mno-sse2",
    "-mno-avx",
    "-mno-80387",
    "-mpreferred-stack-boundary=3",
    "-mfunction-return=thunk-extern",
    "-mindirect-branch=thunk-extern",
    "-fcf-protection=none",
    "-Wall",
    "-Wextra",
];

/// `hp_version_proc_show`, the replacement of the kernel's `version_proc_show` (which prints
/// `/proc/version`): the same line with ` [hotpatched by hvpatch]` before its newline.
pub const VERSION_PROC_SHOW_C: &str = include_str!("../linux/patches/version_proc_show.c");

/// The function [`VERSION_PROC_SHOW_C`] defines, and the kernel function it replaces.
pub const VERSION_PROC_SHOW_FIX: (&str, &str) = ("hp_version_proc_show", "version_proc_show");

/// The tag [`VERSION_PROC_SHOW_C`] puts before the newline of `/proc/version`.
pub const VERSION_PROC_SHOW_TAG: &str = " [hotpatched by hvpatch]";

/// A fix reading the per-CPU `current` (`%gs:current_task`): `/proc/version` then ends with
/// " [read by COMM]", COMM the reading task's name.
pub const VERSION_PROC_SHOW_COMM_C: &str =
    include_str!("../linux/patches/version_proc_show_comm.c");
/// Its (code symbol, kernel function).
pub const VERSION_PROC_SHOW_COMM_FIX: (&str, &str) =
    ("hp_version_proc_show_comm", "version_proc_show");
/// What the patched line contains.
pub const VERSION_PROC_SHOW_COMM_TAG: &str = " [read by ";

/// A fix with data of its own: its `seq_printf` format is a string literal and its tag a `const`
/// array, carried in the patch as read-only data blocks (format version 2). `/proc/version` then
/// ends with [`VERSION_PROC_SHOW_DATA_TAG`].
pub const VERSION_PROC_SHOW_DATA_C: &str =
    include_str!("../linux/patches/version_proc_show_data.c");
/// Its (code symbol, kernel function).
pub const VERSION_PROC_SHOW_DATA_FIX: (&str, &str) =
    ("hp_version_proc_show_data", "version_proc_show");
/// What the patched line ends with.
pub const VERSION_PROC_SHOW_DATA_TAG: &str = " [data from the patch]";

/// The C compiler: `$HOTPATCH_KERNEL_CC`, else `gcc`.
fn compiler() -> String {
    std::env::var("HOTPATCH_KERNEL_CC")
        .ok()
        .filter(|cc| !cc.trim().is_empty())
        .unwrap_or_else(|| "gcc".to_string())
}

/// Compiles C `source` with [`KERNEL_CFLAGS`] into a relocatable object in `out_dir` (created if
/// missing) and returns its path. The files are named after a hash of the source
/// (`kpatch-<hash>.c`/`.o`), so several sources can share a directory.
///
/// Errors: the compiler cannot be started (`NotFound` when it is not installed: install gcc or
/// set `HOTPATCH_KERNEL_CC`), or it fails (`InvalidInput` carrying its stderr).
pub fn compile(source: &str, out_dir: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(out_dir)?;
    let stem = format!("kpatch-{:016x}", fnv1a(source.as_bytes()));
    let src = out_dir.join(format!("{stem}.c"));
    let obj = out_dir.join(format!("{stem}.o"));
    std::fs::write(&src, source)?;
    let cc = compiler();
    let out = Command::new(&cc)
        .arg("-c")
        .args(KERNEL_CFLAGS)
        .arg("-o")
        .arg(&obj)
        .arg(&src)
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot run the C compiler {cc:?} to build kernel patch code: {e} (install \
                     gcc, or set HOTPATCH_KERNEL_CC)"
                ),
            )
        })?;
    if !out.status.success() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{cc} -c {} -o {} {} failed ({}):\n{}",
                KERNEL_CFLAGS.join(" "),
                obj.display(),
                src.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim_end()
            ),
        ));
    }
    Ok(obj)
}

/// 64-bit FNV-1a: a stable file name for a source (not a security measure).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix(&format!("guest-tools-kpatch-{tag}-"))
            .tempdir()
            .expect("temp dir")
    }

    #[test]
    fn version_proc_show_compiles_to_kernel_style_code_without_data() {
        use object::{Object, ObjectSection, ObjectSymbol};
        let tmp = temp_dir("ok");
        let dir = tmp.path();
        let path = compile(VERSION_PROC_SHOW_C, dir).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let obj = object::File::parse(&*bytes).unwrap();
        assert!(
            obj.symbols()
                .any(|s| s.name() == Ok(VERSION_PROC_SHOW_FIX.0) && s.is_definition()),
            "the object defines {}",
            VERSION_PROC_SHOW_FIX.0
        );
        // Every relocation of the code is against an undefined (kernel) symbol: no .rodata.
        let text = obj.section_by_name(".text").unwrap();
        let mut targets = Vec::new();
        for (_, r) in text.relocations() {
            let object::RelocationTarget::Symbol(i) = r.target() else {
                panic!("relocation without a symbol: {r:?}");
            };
            let s = obj.symbol_by_index(i).unwrap();
            assert!(s.is_undefined(), "relocation against {:?}", s.name());
            targets.push(s.name().unwrap().to_string());
        }
        for want in ["seq_printf", "__x86_return_thunk", "init_uts_ns"] {
            assert!(targets.iter().any(|t| t == want), "{want} in {targets:?}");
        }
        assert!(
            VERSION_PROC_SHOW_C.contains(VERSION_PROC_SHOW_TAG),
            "the tag constant matches the source"
        );
        tmp.close().unwrap();
    }

    #[test]
    fn compile_errors_carry_the_compiler_output() {
        let tmp = temp_dir("bad");
        let dir = tmp.path();
        let err = compile("int broken(void) { return undeclared_thing; }\n", dir).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        let msg = err.to_string();
        assert!(msg.contains("undeclared_thing"), "{msg}");
        assert!(msg.contains("-mcmodel=kernel"), "{msg}");
        tmp.close().unwrap();
    }
}
