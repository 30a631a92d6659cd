// Ring 0 of the test guest: hand-written assembly only (this machine's KVM emulates CPL0 code
// slowly and incompletely, so no compiler-generated code ever runs there).
//
// Every vCPU enters at `pvh_start32` (the VMM starts all of them there; under QEMU only the BSP
// runs). Each finds its index from its initial APIC ID, and everything per-CPU (kernel stack,
// user stack, TSS and its GDT descriptor, IDT) is indexed by it, so vCPUs never write shared
// state. The page tables are static data built by the assembler: an identity map of the first
// 4 GiB with 2 MiB pages, user-accessible and executable (ring 3 runs everything; a patch arena
// anywhere below 4 GiB is reachable). Then `iretq` to ring 3 at `guest_main` with IOPL=3 and
// interrupts off.
//
// Exceptions go to a tiny handler that reports through the fault port (0x604): rdi = vector,
// rsi = faulting RIP, r9 = error code (0 if none), rcx = CR2, r8 = vCPU index, r10 = CS,
// r11 = RSP, r12 = RFLAGS (`protocol::FaultInfo`); then it powers off with EXIT_FAULT (3).

core::arch::global_asm!(
    r#"
    .set MAX_CPUS, 32
    .set KSTACK_SHIFT, 13          /* 8 KiB kernel stack per vCPU */
    .set USTACK_SHIFT, 15          /* 32 KiB user stack per vCPU */
    .set TSS_SHIFT, 14             /* 16 KiB slot per vCPU: TSS + 8 KiB I/O bitmap */
    .set IOMAP_END, 104 + 8192     /* offset of the bitmap's terminating 0xff byte */
    .set IDT_SHIFT, 9              /* 32 gates x 16 bytes per vCPU */
    .set GDT_TSS_BASE, 40          /* first TSS descriptor: index 5 */

    .section .note.Xen, "a", @note
    .align 4
    .long 4
    .long 4
    .long 18                       /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

    .section .text.boot, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    cli
    cld                            /* the SysV ABI state ring 3 starts in; lodsb below */
    mov %ebx, %edi                 /* hvm_start_info */
    lgdt gdt_ptr
    mov %cr4, %eax
    or $0x620, %eax                /* PAE | OSFXSR | OSXMMEXCPT */
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx          /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $0xfffffff3, %eax          /* clear EM, TS */
    or $0x80000023, %eax           /* PG | NE | MP | PE */
    mov %eax, %cr0
    ljmp $0x08, $start64

    .code64
start64:
    mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov %edi, %r13d                /* start_info, zero-extended */
    mov $1, %eax
    cpuid
    shr $24, %ebx
    cmp $MAX_CPUS, %ebx
    jae bad_apic
    mov %ebx, %r12d                /* vCPU index */

    /* kernel stack */
    lea kstacks(%rip), %rsp
    lea 1(%r12), %rax
    shl $KSTACK_SHIFT, %rax
    add %rax, %rsp

    /* TSS: RSP0 = kernel stack, and an all-zero I/O permission bitmap so ring 3 may use every
       port even where the hypervisor does not honour IOPL=3 (this machine's PVM backend: with
       IOPL=3 alone a ring-3 `out` raises #GP). Zeroed here rather than trusted to the loader:
       the TSS lives in .bss. */
    lea tss_area(%rip), %rdx
    mov %r12, %rax
    shl $TSS_SHIFT, %rax
    add %rax, %rdx
    mov %rdx, %rdi
    xor %eax, %eax
    mov $IOMAP_END / 8, %ecx
    rep stosq
    mov %rsp, 4(%rdx)
    movw $104, 102(%rdx)
    movb $0xff, IOMAP_END(%rdx)

    /* 16-byte TSS descriptor at GDT index 5 + 2*cpu */
    lea gdt(%rip), %rsi
    mov %r12, %rax
    shl $4, %rax
    lea GDT_TSS_BASE(%rsi,%rax), %rsi
    mov %rdx, %rax
    and $0xffff, %rax
    shl $16, %rax
    or $IOMAP_END, %rax            /* limit: TSS + bitmap + terminator */
    mov %rdx, %rbx
    shr $16, %rbx
    and $0xff, %rbx
    shl $32, %rbx
    or %rbx, %rax
    movabs $0x0000890000000000, %rbx   /* present, 64-bit available TSS */
    or %rbx, %rax
    mov %rdx, %rbx
    shr $24, %rbx
    and $0xff, %rbx
    shl $56, %rbx
    or %rbx, %rax
    mov %rax, (%rsi)
    mov %rdx, %rax
    shr $32, %rax
    mov %rax, 8(%rsi)
    mov %r12, %rax
    shl $4, %rax
    add $GDT_TSS_BASE, %rax
    ltr %ax

    /* per-vCPU IDT: 32 interrupt gates to the stubs */
    lea idt_area(%rip), %rdi
    mov %r12, %rax
    shl $IDT_SHIFT, %rax
    add %rax, %rdi
    lea isr_stubs(%rip), %rsi
    xor %ecx, %ecx
1:
    mov %rcx, %rdx
    shl $4, %rdx
    add %rsi, %rdx                 /* handler address */
    mov %rdx, %rax
    and $0xffff, %rax
    movabs $0x00008e0000080000, %rbx   /* present, DPL0 interrupt gate, selector 0x08 */
    or %rbx, %rax
    mov %rdx, %rbx
    shr $16, %rbx
    and $0xffff, %rbx
    shl $48, %rbx
    or %rbx, %rax
    mov %rcx, %rbx
    shl $4, %rbx
    mov %rax, (%rdi,%rbx)
    mov %rdx, %rax
    shr $32, %rax
    mov %rax, 8(%rdi,%rbx)
    inc %ecx
    cmp $32, %ecx
    jb 1b
    sub $16, %rsp
    movw $511, (%rsp)
    mov %rdi, 2(%rsp)
    lidt (%rsp)
    add $16, %rsp

    /* to ring 3: SS, RSP, RFLAGS (IOPL=3, IF=0), CS, RIP */
    lea ustacks(%rip), %rax
    lea 1(%r12), %rbx
    shl $USTACK_SHIFT, %rbx
    add %rbx, %rax
    sub $8, %rax                   /* as if called: rsp % 16 == 8 at entry */
    pushq $0x1b
    push %rax
    pushq $0x3002
    pushq $0x23
    lea guest_main(%rip), %rax
    push %rax
    mov %r12, %rdi
    mov %r13, %rsi
    iretq

bad_apic:
    /* no stack here (the stacks are per vCPU): print with a plain loop, then power off */
    lea bad_apic_msg(%rip), %rsi
    mov $0x3f8, %dx
4:  lodsb
    test %al, %al
    jz 5f
    out %al, (%dx)
    jmp 4b
5:  mov $4, %eax                   /* EXIT_BAD_APIC_ID */
    mov $0xf4, %dx
    out %eax, (%dx)
2:  cli
    hlt
    jmp 2b

    .macro isr vec, has_error
    .align 16
    .if \has_error == 0
    pushq $0
    .endif
    pushq $\vec
    jmp isr_common
    .endm

    .align 16
isr_stubs:
    isr 0, 0
    isr 1, 0
    isr 2, 0
    isr 3, 0
    isr 4, 0
    isr 5, 0
    isr 6, 0
    isr 7, 0
    isr 8, 1
    isr 9, 0
    isr 10, 1
    isr 11, 1
    isr 12, 1
    isr 13, 1
    isr 14, 1
    isr 15, 0
    isr 16, 0
    isr 17, 1
    isr 18, 0
    isr 19, 0
    isr 20, 0
    isr 21, 1
    isr 22, 0
    isr 23, 0
    isr 24, 0
    isr 25, 0
    isr 26, 0
    isr 27, 0
    isr 28, 0
    isr 29, 1
    isr 30, 1
    isr 31, 0

isr_common:
    mov $1, %eax
    cpuid
    shr $24, %ebx
    mov %rbx, %r8                  /* vCPU index */
    mov (%rsp), %rdi               /* vector */
    mov 8(%rsp), %r9               /* error code */
    mov 16(%rsp), %rsi             /* faulting RIP */
    mov 24(%rsp), %r10             /* CS */
    mov 32(%rsp), %r12             /* RFLAGS */
    mov 40(%rsp), %r11             /* RSP */
    mov %cr2, %rcx
    mov %edi, %eax
    mov $0x604, %dx                /* FAULT_PORT */
    out %eax, (%dx)
    mov $3, %eax                   /* EXIT_FAULT */
    mov $0xf4, %dx
    out %eax, (%dx)
3:  cli
    hlt
    jmp 3b

bad_apic_msg:
    .asciz "hp: error: APIC ID >= 32 (MAX_CPUS), power off status 4\n"

    .section .data.boot, "aw"
    .align 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff       /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff       /* 0x10 kernel data */
    .quad 0x00cff2000000ffff       /* 0x18 user data (0x1b) */
    .quad 0x00affa000000ffff       /* 0x20 user code, 64-bit (0x23) */
    .fill MAX_CPUS * 2, 8, 0       /* per-vCPU TSS descriptors */
gdt_end:
    .align 8
    .word 0
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt

    .align 4096
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
    .quad pd + 0x7
    .quad pd + 0x1000 + 0x7
    .quad pd + 0x2000 + 0x7
    .quad pd + 0x3000 + 0x7
    .fill 508, 8, 0
pd:
    .set addr, 0
    .rept 2048
    .quad addr + 0x87              /* present, writable, user, 2 MiB */
    .set addr, addr + 0x200000
    .endr

    .section .hp_nobits, "aw", @nobits   /* not .bss.*: see link.ld */
    .align 4096
kstacks:
    .skip MAX_CPUS << KSTACK_SHIFT
ustacks:
    .skip MAX_CPUS << USTACK_SHIFT
tss_area:
    .skip MAX_CPUS << TSS_SHIFT
idt_area:
    .skip MAX_CPUS << IDT_SHIFT
"#,
    options(att_syntax)
);
