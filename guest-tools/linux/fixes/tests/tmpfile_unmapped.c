/* tmpfile-unmapped-fsuid: O_TMPFILE by init-ns root (fsuid 0) in a tmpfs owned by a user namespace
 * that has no uid/gid mappings. Arg: directory to mount on (created if missing). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
int main(int argc, char **argv)
{
	const char *dir = argc > 1 ? argv[1] : "/tmp/tmpfile-test";
	int up[2], down[2], fd;
	char path[128], c;
	pid_t pid;

	mkdir(dir, 0755);
	if (pipe(up) || pipe(down)) return 2;
	pid = fork();
	if (pid == 0) {
		close(up[0]); close(down[1]);
		c = 'E';
		if (unshare(CLONE_NEWUSER | CLONE_NEWNS)) printf("tmpfile: child unshare errno=%d\n", errno);
		else if (mount("none", dir, "tmpfs", 0, NULL)) printf("tmpfile: child mount errno=%d\n", errno);
		else if (chdir(dir)) printf("tmpfile: child chdir errno=%d\n", errno);
		else c = 'R';
		write(up[1], &c, 1);
		read(down[0], &c, 1);   /* wait until the parent is done */
		_exit(0);
	}
	close(up[1]); close(down[0]);
	if (read(up[0], &c, 1) != 1 || c != 'R') { printf("tmpfile: setup failed\n"); return 2; }
	snprintf(path, sizeof(path), "/proc/%d/cwd/regular", (int)pid);
	fd = open(path, O_CREAT | O_EXCL | O_RDWR, 0600);
	printf("tmpfile: O_CREAT=%d errno=%d (%s)\n", fd < 0 ? -1 : 0, fd < 0 ? errno : 0, fd < 0 ? strerror(errno) : "-");
	if (fd >= 0) close(fd);
	snprintf(path, sizeof(path), "/proc/%d/cwd", (int)pid);
	fd = open(path, O_TMPFILE | O_RDWR, 0600);
	printf("tmpfile: O_TMPFILE=%d errno=%d (%s)\n", fd < 0 ? -1 : 0, fd < 0 ? errno : 0, fd < 0 ? strerror(errno) : "-");
	if (fd >= 0) close(fd);
	close(down[1]);
	waitpid(pid, NULL, 0);
	return 0;
}
