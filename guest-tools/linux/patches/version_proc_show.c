/*
 * Replacement for the stock Debian 6.1 kernel's version_proc_show() (fs/proc/version.c), built
 * as a hot patch by guest-tools/src/kernel_patch.rs and vmm::linux::patch::build_kernel_patch.
 *
 * The original prints /proc/version as
 *     seq_printf(m, linux_proc_banner, utsname()->sysname, utsname()->release,
 *                utsname()->version);
 * This one prints the same line with " [hotpatched by hvpatch]" before its newline, so the
 * change is obvious while the line still starts with "Linux version " for the workload's parser.
 *
 * Rules for patch code (written for hot-patch format 1; format 2 can carry read-only data, see
 * version_proc_show_data.c):
 * - no data of its own: no string literals or constants in .rodata, so the patch stays a
 *   version-1 file. Strings are built on the stack (gcc -O2 stores them as immediates);
 *   everything else comes from the kernel through relocations resolved at apply time
 *   (seq_printf, init_uts_ns, linux_proc_banner, __x86_return_thunk);
 * - no kernel headers (-nostdinc): the few declarations needed are below, with the 6.1 layouts.
 *
 * Difference from the original: it reads init_uts_ns (the initial UTS namespace) instead of the
 * calling task's namespace (current->nsproxy->uts_ns), which would need the per-CPU `current`
 * and struct task_struct/nsproxy offsets of this exact build. Inside a container with its own
 * UTS namespace /proc/version would show the host's names; for this demo there is only one.
 */

struct seq_file;

/* include/uapi/linux/utsname.h: __NEW_UTS_LEN = 64. */
struct new_utsname {
	char sysname[65];
	char nodename[65];
	char release[65];
	char version[65];
	char machine[65];
	char domainname[65];
};

/* include/linux/utsname.h: `name` is the first member (Debian builds without randstruct). */
struct uts_namespace {
	struct new_utsname name;
};

extern struct uts_namespace init_uts_ns;
/* init/version.c: "%s version %s (debian-kernel@lists.debian.org) (gcc-12 ...) %s\n". */
extern const char linux_proc_banner[];
extern void seq_printf(struct seq_file *m, const char *fmt, ...);

/* Room for the banner format (about 140 bytes in Debian 6.1) plus the tag. */
#define FORMAT_MAX 256

int hp_version_proc_show(struct seq_file *m, void *v)
{
	/* Stack strings: immediate stores, no .rodata (see above). */
	char tag[] = " [hotpatched by hvpatch]\n";
	char fallback[] = "%s version %s %s";
	char format[FORMAT_MAX];
	const char *banner = linux_proc_banner;
	const struct new_utsname *uts = &init_uts_ns.name;
	unsigned int n = 0, i;

	(void)v;
	/* The banner's format without its newline, then the tag. */
	while (banner[n] != '\0' && banner[n] != '\n' && n < FORMAT_MAX - sizeof(tag))
		n++;
	if (banner[n] != '\0' && banner[n] != '\n') {
		/* Unexpectedly long: never cut a conversion in half, use the short form. */
		banner = fallback;
		n = sizeof(fallback) - 1;
	}
	for (i = 0; i < n; i++)
		format[i] = banner[i];
	for (i = 0; i < sizeof(tag); i++)
		format[n + i] = tag[i];

	seq_printf(m, format, uts->sysname, uts->release, uts->version);
	return 0;
}
