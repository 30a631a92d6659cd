/* fcntl-rw-hint-immutable: F_SET_RW_HINT on an immutable (chattr +i) tmpfs file. Arg: path on tmpfs. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#ifndef F_SET_RW_HINT
#define F_GET_RW_HINT 1035
#define F_SET_RW_HINT 1036
#endif
int main(int argc, char **argv)
{
	const char *p = argc > 1 ? argv[1] : "/tmp/rwhint-test";
	uint64_t h = 2 /* RWH_WRITE_LIFE_SHORT */, g = 99;
	int fd, fl, r;

	fd = open(p, O_CREAT | O_RDWR | O_TRUNC, 0644);
	if (fd < 0) { printf("rwhint: open errno=%d\n", errno); return 2; }
	fl = FS_IMMUTABLE_FL;
	if (ioctl(fd, FS_IOC_SETFLAGS, &fl)) { printf("rwhint: SETFLAGS errno=%d (need tmpfs)\n", errno); return 2; }
	r = fcntl(fd, F_SET_RW_HINT, &h);
	if (r < 0) printf("rwhint: F_SET_RW_HINT=-1 errno=%d (%s)\n", errno, strerror(errno));
	else printf("rwhint: F_SET_RW_HINT=%d\n", r);
	r = fcntl(fd, F_GET_RW_HINT, &g);
	printf("rwhint: F_GET_RW_HINT=%d hint=%llu\n", r, (unsigned long long)g);
	fl = 0;
	ioctl(fd, FS_IOC_SETFLAGS, &fl);
	close(fd);
	unlink(p);
	return 0;
}
