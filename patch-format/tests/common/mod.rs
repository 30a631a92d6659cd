//! Small ELF executables and objects compiled with gcc for the builder tests.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Flags for a static, non-PIE, freestanding x86-64 executable linked at
/// 0x100000 with a sha1 build id, like the test guest.
pub const EXE_FLAGS: &[&str] = &[
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-static",
    "-fno-pie",
    "-no-pie",
    "-fno-asynchronous-unwind-tables",
    "-fcf-protection=none",
    "-fno-ipa-icf",
    "-fno-reorder-blocks-and-partition",
    "-Wl,--build-id=sha1",
    "-Wl,-Ttext-segment=0x100000",
];

/// Compiles C source into a file in the test's scratch directory.
pub fn gcc(name: &str, source: &str, flags: &[&str]) -> Vec<u8> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("patch-format-gcc");
    std::fs::create_dir_all(&dir).expect("scratch dir");
    // Tests run in parallel: compile under a unique name, then rename into place.
    let uniq = format!(
        "{name}.{}.{:?}",
        std::process::id(),
        std::thread::current().id()
    )
    .replace(['(', ')'], "");
    let src = dir.join(format!("{uniq}.c"));
    let tmp = dir.join(format!("{uniq}.out"));
    let out = dir.join(name);
    std::fs::write(&src, source).expect("write source");
    let res = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&tmp)
        .arg(&src)
        .output()
        .expect("run gcc (the builder tests need gcc installed)");
    assert!(
        res.status.success(),
        "gcc failed for {name}: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let bytes = std::fs::read(&tmp).expect("read gcc output");
    std::fs::rename(&tmp, &out).expect("rename gcc output");
    let _ = std::fs::remove_file(&src);
    bytes
}

pub fn path_of(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("patch-format-gcc")
        .join(name)
}

/// v1 of a tiny "guest".
pub const V1: &str = r#"
int counter;
const int table[4] = {1, 2, 3, 4};
__attribute__((noinline, noclone)) int mix(int a, int b) { return a * 31 + b; }
__attribute__((noinline, noclone)) int helper(int x) { return (x ^ 0x55) + table[x & 3]; }
__attribute__((noinline, noclone)) int compute(int x) { counter++; return mix(x, 3) + helper(x); }
__attribute__((noinline, noclone)) int triangle(int n) {
    int s = 0;
    for (volatile int i = 0; i <= n; i++) s += i;
    return s;
}
__attribute__((noreturn)) void _start(void) {
    volatile int sink;
    for (;;) { sink = compute(sink) + triangle(sink & 15) + helper(sink); }
}
"#;

/// v2: `compute` and `triangle` change, a new function makes `mix` and
/// `helper` move without changing.
pub const V2: &str = r#"
int counter;
const int table[4] = {1, 2, 3, 4};
__attribute__((noinline, noclone)) int added_padding(int a) { return a * a * a - 7 * a + 1000; }
__attribute__((noinline, noclone)) int mix(int a, int b) { return a * 31 + b; }
__attribute__((noinline, noclone)) int helper(int x) { return (x ^ 0x55) + table[x & 3]; }
__attribute__((noinline, noclone)) int compute(int x) { counter += 2; return mix(x, 5) + helper(x) + 1; }
__attribute__((noinline, noclone)) int triangle(int n) {
    int s = 0;
    if (n < 0) return 0;
    for (volatile int i = 0; i <= n; i++) s += i;
    return s;
}
__attribute__((noreturn)) void _start(void) {
    volatile int sink;
    for (;;) { sink = compute(sink) + triangle(sink & 15) + helper(sink); }
}
"#;
