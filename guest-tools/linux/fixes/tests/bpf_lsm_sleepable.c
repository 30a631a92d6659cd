/* bpf-lsm-cgroup-sleepable: BPF_PROG_LOAD of a sleepable BPF_LSM_CGROUP program; prints errno and verifier log. */
#include <errno.h>
#include <linux/bpf.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void)
{
	struct bpf_insn insns[2] = {
		{ .code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = 0, .imm = 0 },
		{ .code = BPF_JMP | BPF_EXIT },
	};
	static char log[65536];
	union bpf_attr a;
	long fd;

	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_LSM;
	a.expected_attach_type = BPF_LSM_CGROUP;
	a.prog_flags = BPF_F_SLEEPABLE;
	a.insns = (unsigned long)insns;
	a.insn_cnt = 2;
	a.license = (unsigned long)"GPL";
	a.log_buf = (unsigned long)log;
	a.log_size = sizeof(log);
	a.log_level = 1;
	fd = syscall(__NR_bpf, BPF_PROG_LOAD, &a, sizeof(a));
	if (fd < 0) printf("bpflsm: load=-1 errno=%d (%s)\n", errno, strerror(errno));
	else printf("bpflsm: load=fd %ld\n", fd);
	for (char *l = strtok(log, "\n"); l; l = strtok(NULL, "\n"))
		printf("bpflsm: log: %s\n", l);
	return 0;
}
