/* ipc-maxidx-header: the highest index msgctl(MSG_INFO), semctl(SEM_INFO) and shmctl(SHM_INFO)
 * report for a namespace with no message queues, semaphore sets or shared memory segments. */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <sys/ipc.h>
#include <sys/msg.h>
#include <sys/sem.h>
#include <sys/shm.h>

union semun {
	int val;
	struct semid_ds *buf;
	unsigned short *array;
	struct seminfo *__buf;
};

int main(void)
{
	struct msginfo mi;
	struct seminfo si;
	struct shm_info hi;
	union semun arg = { .__buf = &si };
	int m, s, h;

	/* A fresh IPC namespace: nothing in use, whatever else the guest runs. */
	if (unshare(CLONE_NEWIPC)) { printf("ipcinfo: unshare errno=%d\n", errno); return 2; }
	m = msgctl(0, MSG_INFO, (struct msqid_ds *)&mi);
	s = semctl(0, 0, SEM_INFO, arg);
	h = shmctl(0, SHM_INFO, (struct shmid_ds *)&hi);
	printf("ipcinfo: msg=%d sem=%d shm=%d\n", m, s, h);
	return 0;
}
