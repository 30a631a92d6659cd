/* timens-nsec: write a negative tv_nsec (ULONG_MAX parsed by %lu) to /proc/self/timens_offsets. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif
int main(void)
{
	const char *s = "monotonic 0 18446744073709551615\n";
	char buf[256];
	ssize_t r;
	int fd;

	if (unshare(CLONE_NEWTIME)) { printf("timens: unshare errno=%d\n", errno); return 2; }
	fd = open("/proc/self/timens_offsets", O_WRONLY);
	if (fd < 0) { printf("timens: open errno=%d\n", errno); return 2; }
	r = write(fd, s, strlen(s));
	if (r < 0) printf("timens: write=-1 errno=%d (%s)\n", errno, strerror(errno));
	else printf("timens: write=%zd\n", r);
	close(fd);
	fd = open("/proc/self/timens_offsets", O_RDONLY);
	r = read(fd, buf, sizeof(buf) - 1);
	buf[r > 0 ? r : 0] = 0;
	for (char *l = strtok(buf, "\n"); l; l = strtok(NULL, "\n"))
		printf("timens: [%s]\n", l);
	return 0;
}
