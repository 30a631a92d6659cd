/*
 * A third replacement for the stock Debian 6.1 kernel's version_proc_show(), built as a hot
 * patch like version_proc_show.c, that carries data of its own (hot-patch format version 2):
 * its format is a string literal (in the object's .rodata.str1.1) and its tag a const array
 * (in .rodata). The builder turns both into read-only data blocks of the patch, which the engine
 * places in the patch arena next to the code, and the references to them (R_X86_64_32S under
 * -mcmodel=kernel) into relocations against those blocks.
 *
 * /proc/version then reads "Linux version <release> <version> [data from the patch]".
 *
 * Writable data (a `static int`, anything in .data or .bss) would still be refused: a patch has
 * no per-patch writable state.
 */

struct seq_file;

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

static const char tag[] = " [data from the patch]";

int hp_version_proc_show_data(struct seq_file *m, void *v)
{
	const struct new_utsname *uts = &init_uts_ns.name;

	(void)v;
	seq_printf(m, "%s version %s %s%s\n", uts->sysname, uts->release, uts->version, tag);
	return 0;
}
