/*
 * A second replacement for the stock Debian 6.1 kernel's version_proc_show(), built as a hot
 * patch like version_proc_show.c: it prints the same banner fields, then the name of the task
 * reading /proc/version, " [read by COMM]". It exists to prove per-CPU access from a C fix:
 * `current` is the per-CPU variable current_task, read %gs-relative with an absolute
 * displacement exactly as the kernel's this_cpu_read() does, so the assembler emits an
 * R_X86_64_32S relocation against current_task, an absolute kallsyms symbol (its per-CPU
 * offset), which the engine resolves without the KASLR slide.
 *
 * The task's name comes through the kernel's exported __get_task_comm(), so no struct
 * task_struct offset of this build is needed.
 */

struct seq_file;
struct task_struct;

struct new_utsname {
	char sysname[65];
	char nodename[65];
	char release[65];
	char version[65];
	char machine[65];
	char domainname[65];
};

struct uts_namespace {
	struct new_utsname name;
};

extern struct uts_namespace init_uts_ns;
extern void seq_printf(struct seq_file *m, const char *fmt, ...);
extern char *__get_task_comm(char *buf, unsigned long buf_size, struct task_struct *tsk);

int hp_version_proc_show_comm(struct seq_file *m, void *v)
{
	/* Stack strings: immediate stores, no .rodata (the patch stays format version 1). */
	char format[] = "%s version %s %s [read by %s]\n";
	char comm[16];
	struct task_struct *task;
	const struct new_utsname *uts = &init_uts_ns.name;

	(void)v;
	asm("movq %%gs:current_task, %0" : "=r"(task));
	__get_task_comm(comm, sizeof(comm), task);
	seq_printf(m, format, uts->sysname, uts->release, uts->version, comm);
	return 0;
}
