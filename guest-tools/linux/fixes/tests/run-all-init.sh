#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc; $bb mount -t sysfs sysfs /sys; $bb mount -t tmpfs tmpfs /tmp
echo "T: kernel $($bb uname -r)"
/bin/timens_nsec; /bin/fcntl_rw_hint /tmp/rwhint-test; /bin/bpf_lsm_sleepable; /bin/keyctl_read_revoked; /bin/tmpfile_unmapped /tmp/tmpfile-test
echo "T: done"
$bb poweroff -f
