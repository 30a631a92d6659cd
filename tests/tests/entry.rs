//! Both entry protocols of `vmm run`, with the smallest images that can tell them apart:
//! a PVH image (32-bit protected mode, paging off, `ebx` = `hvm_start_info`) and a plain
//! x86-64 ELF (long mode on the VMM's identity map, `rsi` = zero page). Each checks the state
//! it was started in, prints on the debugcon port and powers off with a status we check.

use std::process::Command;
use std::time::Duration;

use integration_tests::*;

/// Assembles and links `source` (GNU as) at 1 MiB into an x86-64 ELF.
fn build(dir: &TempDir, name: &str, source: &str) -> String {
    let s = dir.path().join(format!("{name}.S"));
    let o = dir.path().join(format!("{name}.o"));
    let elf = dir.path().join(format!("{name}.elf"));
    let ld = dir.path().join(format!("{name}.ld"));
    std::fs::write(&s, source).expect("write source");
    std::fs::write(
        &ld,
        "ENTRY(start)\nSECTIONS { . = 0x100000; .text : { *(.text) } .note : { *(.note.Xen) } }\n",
    )
    .expect("write linker script");
    let ok = Command::new("cc")
        .arg("-c")
        .arg(&s)
        .arg("-o")
        .arg(&o)
        .status()
        .expect("cc (gcc) is needed");
    assert!(ok.success(), "assembling {name}");
    let ok = Command::new("ld")
        .arg("-T")
        .arg(&ld)
        .arg("-o")
        .arg(&elf)
        .arg(&o)
        .status()
        .expect("ld");
    assert!(ok.success(), "linking {name}");
    elf.to_str().expect("utf8").to_string()
}

/// PVH: check paging is off and ebx points at a start_info with the PVH magic, then print
/// "PVH-OK" and power off with status 7 (33 if a check fails).
const PVH: &str = r#"
    .section .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18
    .asciz "Xen"
    .long start
    .text
    .code32
    .globl start
start:
    mov %cr0, %eax
    test $0x80000000, %eax
    jnz fail
    cmpl $0x336ec578, (%ebx)
    jne fail
    mov $msg, %esi
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, $0xe9
    jmp 1b
2:  mov $7, %eax
    outl %eax, $0xf4
3:  hlt
    jmp 3b
fail:
    mov $33, %eax
    outl %eax, $0xf4
    jmp 3b
msg: .asciz "PVH-OK\n"
"#;

/// Long mode: check EFER.LMA and that rsi points at a zero page with the "HdrS" magic, then
/// print "LM-OK" and power off with status 9 (44 if a check fails).
const LONG: &str = r#"
    .text
    .code64
    .globl start
start:
    mov $0xc0000080, %ecx
    rdmsr
    test $0x400, %eax
    jz fail
    cmpl $0x53726448, 0x202(%rsi)
    jne fail
    lea msg(%rip), %rsi
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, $0xe9
    jmp 1b
2:  mov $9, %eax
    outl %eax, $0xf4
3:  hlt
    jmp 3b
fail:
    mov $44, %eax
    outl %eax, $0xf4
    jmp 3b
msg: .asciz "LM-OK\n"
"#;

fn run(elf: &str, vcpus: &str) -> (Option<i32>, Vec<String>) {
    let mut vmm = VmmProcess::spawn(&["run", "--kernel", elf, "--vcpus", vcpus, "--memory", "16"]);
    let status = vmm.wait(Duration::from_secs(60));
    (status.code(), vmm.lines())
}

#[test]
fn pvh_entry() {
    require_kvm();
    let dir = TempDir::new("pvh");
    let elf = build(&dir, "pvh", PVH);
    let (code, lines) = run(&elf, "1");
    assert_eq!(code, Some(7), "{lines:?}");
    assert!(lines.iter().any(|l| l == "PVH-OK"), "{lines:?}");
}

#[test]
fn long_mode_entry() {
    require_kvm();
    let dir = TempDir::new("long");
    let elf = build(&dir, "long", LONG);
    let (code, lines) = run(&elf, "1");
    assert_eq!(code, Some(9), "{lines:?}");
    assert!(lines.iter().any(|l| l == "LM-OK"), "{lines:?}");
}
