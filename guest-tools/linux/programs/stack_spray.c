/*
 * A local user trying to hold every hot patch back: fills its own (user) stack with a kernel
 * address, then spins in user mode on top of it.
 *
 *   stack_spray FUNCTION OFFSET
 *
 * The address is FUNCTION's, from /proc/kallsyms, plus OFFSET (decimal or 0x-hex): an address
 * inside the bytes a patch's jump displaces, or inside a function a multi-function patch
 * replaces. A hypervisor that scanned a user-mode vCPU's stack for return addresses into
 * kernel code would see it every time it paused the guest while this runs, and wait forever.
 *
 * It runs at the lowest priority (nice 19), so the guest's own work goes on, and spins whenever
 * nothing else runs. Prints "stack_spray: FUNCTION+OFFSET = ADDR" once the stack is filled, then
 * never returns.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define WORDS 2048

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: stack_spray FUNCTION OFFSET\n");
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
	volatile unsigned long stack[WORDS];
	for (int i = 0; i < WORDS; i++)
		stack[i] = word;
	printf("stack_spray: %s+%s = %lx\n", argv[1], argv[2], word);
	fflush(stdout);
	/* Spin without a call, so the stack pointer stays just below the words. */
	for (;;)
		__asm__ volatile("" : : "r"(stack) : "memory");
}
