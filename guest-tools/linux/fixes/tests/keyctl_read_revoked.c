/* keys-read-method-check: KEYCTL_READ on a (revoked) "logon" key, a type without a ->read method. */
#include <errno.h>
#include <linux/keyctl.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
static long kc(long op, long a, long b, long c) { return syscall(__NR_keyctl, op, a, b, c, 0); }
static void rd(const char *what, long k)
{
	char buf[64];
	long r = kc(KEYCTL_READ, k, 0, 0);
	printf("keyread: %s read(NULL,0)=%ld errno=%d (%s)\n", what, r, r < 0 ? errno : 0, r < 0 ? strerror(errno) : "-");
	r = kc(KEYCTL_READ, k, (long)buf, sizeof(buf));
	printf("keyread: %s read(buf,64)=%ld errno=%d (%s)\n", what, r, r < 0 ? errno : 0, r < 0 ? strerror(errno) : "-");
}
int main(void)
{
	long k = syscall(__NR_add_key, "logon", "livepatch:test", "secret", 6, KEY_SPEC_PROCESS_KEYRING);
	if (k < 0) { printf("keyread: add_key errno=%d\n", errno); return 2; }
	if (kc(KEYCTL_SETPERM, k, 0x3f3f0000, 0)) printf("keyread: setperm errno=%d\n", errno);
	rd("live", k);
	if (kc(KEYCTL_REVOKE, k, 0, 0)) printf("keyread: revoke errno=%d\n", errno);
	rd("revoked", k);
	return 0;
}
