#!/bin/busybox sh
# /init of the Linux guest kit's initramfs (guest-tools/src/initramfs.rs). Runs as PID 1 under
# the stock Debian kernel; every line meant for the host starts with "hpl: ".
#
# hpl.mode= on the kernel command line picks what it does (module-style "a.b=" parameters are not
# passed to init as arguments or environment, so it reads /proc/cmdline); without it, the mode the
# initramfs was built for (/etc/hpl.mode):
#   workload (default)  every ~100 ms prints
#                         hpl: seq=<n> uptime=<first field of /proc/uptime> version=<the /proc/version line>
#                       forever. Reading /proc/version runs the kernel's version_proc_show, so a hot
#                       patch of that function shows up in the next line; seq goes up by 1 per line and
#                       uptime keeps growing unless the guest rebooted.
#   kallsyms            prints /proc/kallsyms between "hpl: kallsyms-begin" and "hpl: kallsyms-end",
#                       then powers off: the host's symbol table for this exact kernel and boot.
#   probe               as workload, but version= is what the script /etc/hpl.probe prints (its
#                       lines joined by " | "): a test's own observation of the kernel (a /proc
#                       file, a syscall's result printed by a static program under /bin).
# hpl.loglevel=<n> (default 4: errors and worse) is the console log level once /init runs, so that
# routine kernel messages do not land in the middle of a workload line; oopses and panics still
# show (the kernel raises the level itself for them).
#
# Applets are called through $bb explicitly: the initramfs holds only /bin/busybox and /bin/sh.
bb=/bin/busybox

$bb mount -t proc proc /proc
$bb mount -t sysfs sysfs /sys
$bb mount -t devtmpfs devtmpfs /dev 2>/dev/null || true

read -r up _ </proc/uptime
echo "hpl: init uptime=$up"
read -r banner </proc/version
echo "hpl: banner=$banner"

mode=workload
[ -r /etc/hpl.mode ] && read -r mode </etc/hpl.mode
loglevel=4
read -r cmdline </proc/cmdline
for arg in $cmdline; do
  case "$arg" in
    hpl.mode=*) mode="${arg#hpl.mode=}" ;;
    hpl.loglevel=*) loglevel="${arg#hpl.loglevel=}" ;;
  esac
done
echo "hpl: mode=$mode"
echo "$loglevel" >/proc/sys/kernel/printk

case "$mode" in
  kallsyms)
    # Root sees real addresses only if kptr_restrict allows it; 0 is the most permissive.
    echo 0 >/proc/sys/kernel/kptr_restrict
    echo "hpl: kallsyms-begin"
    $bb cat /proc/kallsyms
    echo "hpl: kallsyms-end"
    $bb poweroff -f
    ;;
  workload)
    n=0
    while :; do
      n=$((n + 1))
      read -r up _ </proc/uptime
      read -r version </proc/version
      echo "hpl: seq=$n uptime=$up version=$version"
      $bb usleep 100000
    done
    ;;
  probe)
    n=0
    while :; do
      n=$((n + 1))
      read -r up _ </proc/uptime
      out=""
      while IFS= read -r l; do
        out="${out:+$out | }$l"
      done <<EOF_PROBE
$($bb sh /etc/hpl.probe 2>&1)
EOF_PROBE
      echo "hpl: seq=$n uptime=$up version=$out"
      $bb usleep 100000
    done
    ;;
  *)
    echo "hpl: unknown hpl.mode=$mode"
    $bb poweroff -f
    ;;
esac
# Only reached if poweroff failed: PID 1 exiting panics the kernel, and panic=-1 with QEMU's
# -no-reboot ends the VM.
