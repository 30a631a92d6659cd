//! The nested tier, parts (b)–(e): a stock Debian kernel (the older 6.1.0-54, the one the
//! source-diff fixes are built for) booted by this VMM from its bzImage (KASLR on, 2 vCPUs, an
//! initramfs workload, a read-only virtio disk), its C fix applied and reverted through
//! `vmm patch apply --api-sock` while the workload runs, a refused patch leaving the kernel as it
//! was, two real upstream fixes built from their source diffs applied and reverted the same way,
//! and code integrity `enforce` letting the kernel's own static-key rewrite through while
//! dropping a write its tables do not vouch for. Runs where KVM has real SVM/VMX: here, inside L1
//! (the default kit kernel) under QEMU TCG (docs/nested-tier.md); on a VMX/SVM host, directly.
//! Run alone: `cargo test -p integration-tests --test nested_linux -- --nocapture`.

use std::time::{Duration, Instant};

use guest_tools::initramfs::Archive;
use guest_tools::kernel_patch;
use integration_tests::linux::{Kit, compile_fix_program, fixes_dir, source_cache};
use integration_tests::nested::{
    NestedJob, expect_passed, l1_options, nested_vmm_bin, run_with_real_kvm,
};
use integration_tests::{TempDir, cli};

/// L2, the kernel this VMM boots inside L1: the build before the one that has the source-diff
/// fixes (`tests/tests/source_patch.rs`), so they change what it does. L1 stays the default kit's.
const L2_KERNEL: &str = "6.1.0-54-amd64";

/// The source-diff fixes part (e) applies: (name, `guest-tools/linux/fixes/<name>.patch`), the
/// program showing it (`fixes/tests/<program>.c`), and what that prints before and after.
struct SourceFix {
    name: &'static str,
    program: &'static str,
    before: &'static str,
    after: &'static str,
}

const SOURCE_FIXES: &[SourceFix] = &[
    SourceFix {
        name: "timens-nsec",
        program: "timens_nsec",
        before: "timens: write=33",
        after: "timens: write=-1 errno=22",
    },
    SourceFix {
        name: "keys-read-method-check",
        program: "keyctl_read_revoked",
        before: "revoked read(NULL,0)=-1 errno=95",
        after: "revoked read(NULL,0)=-1 errno=128",
    },
];

/// The L2 workload, its /init: loads the virtio disk modules, reads the disk, then prints one
/// `SEQ n uptime state` line a second (state: `patched` when `/proc/version` carries the fix's
/// tag), then one `SRC n <timens_nsec's output> | <keyctl_read_revoked's output>` line (each
/// program's lines joined), and obeys commands typed on its console (this VMM's stdin): `toggle` flips the
/// `sched_schedstats` static key on and off, `kprobe` arms a kprobe inside `version_proc_show`
/// (a text write no table of the kernel vouches for).
const L2_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_mmio virtio_blk; do $B insmod /modules/$m.ko || echo "L2-INSMOD-FAIL $m"; done
n=0
while [ ! -b /dev/vda ] && [ $n -lt 20 ]; do $B sleep 1; n=$((n+1)); done
echo "L2-DISK $($B dd if=/dev/vda bs=512 count=1 2>/dev/null | $B head -c 16)"
echo "L2-UP cpus=$($B grep -c ^processor /proc/cpuinfo) $($B uname -r)"
( while read -r cmd; do
    case "$cmd" in
    toggle)
      echo 1 > /proc/sys/kernel/sched_schedstats; a=$($B cat /proc/sys/kernel/sched_schedstats)
      echo 0 > /proc/sys/kernel/sched_schedstats; b=$($B cat /proc/sys/kernel/sched_schedstats)
      echo "L2-TOGGLE $a $b";;
    kprobe)
      $B mount -t tracefs nodev /sys/kernel/tracing
      for o in 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
        echo "p:hp version_proc_show+$o" > /sys/kernel/tracing/kprobe_events 2>/dev/null && break
      done
      echo "L2-KPROBE-ARMING +$o"
      echo 1 > /sys/kernel/tracing/events/kprobes/hp/enable
      echo "L2-KPROBE-DONE $?";;
    esac
  done ) < /dev/console &
i=0
while [ $i -lt 100000 ]; do
  if $B grep -q 'hotpatched by hvpatch' /proc/version; then s=patched; else s=stock; fi
  echo "SEQ $i $($B cut -d' ' -f1 /proc/uptime) $s"
  echo "SRC $i $(/bin/timens_nsec 2>&1 | $B tr '\n' ' ')| $(/bin/keyctl_read_revoked 2>&1 | $B tr '\n' ' ')"
  i=$((i+1)); $B sleep 1
done
"#;

/// The L1 side. Every step reports a `nested_result`; the host checks the lines as well.
const JOB: &str = r#"
set -u
mkdir -p -m 700 /tmp/vmm-cache && cp -a cache/. /tmp/vmm-cache/ && chmod -R go-rwx /tmp/vmm-cache
export VMM_CACHE_DIR=/tmp/vmm-cache
dd if=/dev/zero of=disk.img bs=1024 count=1024 2>/dev/null
printf 'HOTPATCH-DISK-OK' | dd of=disk.img conv=notrunc 2>/dev/null
mkfifo console.in
( sleep 100000 > console.in ) &
HOLD=$!
started=$(cut -d' ' -f1 /proc/uptime)
"$VMM" run --kernel l2/bzImage --initrd l2/initrd.cpio --memory 512 --vcpus 2 \
  --cmdline "console=ttyS0 quiet" --api-sock api.sock --trusted-key ops.pub \
  --code-integrity enforce --disk disk.img,ro --log vmm=info < console.in > vm.log 2>&1 &
VPID=$!
exec 3> console.in

# wait_for SECONDS PATTERN: until vm.log has a line matching PATTERN.
wait_for() {
  _n=0
  while ! grep -q "$2" vm.log; do
    _n=$((_n+1)); [ $_n -gt $(($1 * 2)) ] && return 1
    kill -0 $VPID 2>/dev/null || return 1
    sleep 0.5
  done
}
last_seq() { grep '^SEQ ' vm.log | tail -n 1 | cut -d' ' -f2; }

if wait_for 240 '^L2-UP cpus=2'; then
  nested_result boot pass "booted in $(awk "BEGIN{print $(cut -d' ' -f1 /proc/uptime) - $started}") s of L1 time: $(grep -m 1 '^L2-UP' vm.log)"
else
  nested_result boot fail "no L2-UP cpus=2 line"; tail -n 80 vm.log; exit 1
fi
grep -q '^L2-DISK HOTPATCH-DISK-OK' vm.log && nested_result disk pass || nested_result disk fail "$(grep L2-DISK vm.log)"

# Patching attaches once the kernel runs user space.
n=0
until "$VMM" patch list --api-sock api.sock > list.out 2>&1; do
  n=$((n+1)); [ $n -gt 120 ] && break; sleep 1
done
cat list.out
grep -q "attached to the Linux kernel" vm.log && nested_result attach pass || nested_result attach fail "$(tail -n 5 vm.log)"
grep "attached to the Linux kernel" vm.log | head -n 1

# (c) A refused patch (its expected bytes are not the running kernel's) changes nothing.
if "$VMM" patch apply --api-sock api.sock wrong-bytes.hpatch > refused.out 2>&1; then
  nested_result refusal fail "the wrong-bytes patch applied"
else
  cat refused.out; nested_result refusal pass
fi

# A patch of two functions, one of them kthreadd, which its task is always asleep in: the
# blackout sees the task on the kernel's task list, waits, and gives up with nothing written.
if "$VMM" patch apply --api-sock api.sock sleeper.hpatch > sleeper.out 2>&1; then
  nested_result sleeper-refused fail "applied: $(cat sleeper.out)"
elif grep -q 'task 2 (kthreadd)' sleeper.out; then
  nested_result sleeper-refused pass "$(grep -o 'task 2 (kthreadd)[^;]*' sleeper.out | head -n 1)"
else
  nested_result sleeper-refused fail "$(cat sleeper.out)"
fi

s0=$(last_seq)
if "$VMM" patch apply --api-sock api.sock fix.hpatch > apply.out 2>&1; then
  cat apply.out; nested_result apply pass
else
  cat apply.out; nested_result apply fail
fi
wait_for 60 'SEQ .* patched' && nested_result patched-output pass "first patched line after SEQ $s0" || nested_result patched-output fail
s1=$(last_seq)
# The fix's own id (the list also holds the refused patches' records).
id=$(awk '/^applied /{print $2; exit}' apply.out)
"$VMM" patch revert --api-sock api.sock "$id" && nested_result revert pass || nested_result revert fail
n=0
while ! grep '^SEQ ' vm.log | awk -v s="$s1" '$2 > s+1 && $4 == "stock"' | grep -q .; do
  n=$((n+1)); [ $n -gt 120 ] && break; sleep 0.5
done
[ $n -le 120 ] && nested_result reverted-output pass || nested_result reverted-output fail

# (e) Two upstream fixes built on the host from their source diffs against this kernel: applied
# together, the workload's programs show the fixed kernel's answers; reverted, the stock ones.
TIMENS_STOCK='timens: write=33'; TIMENS_FIXED='timens: write=-1 errno=22'
KEYS_STOCK='revoked read(NULL,0)=-1 errno=95'; KEYS_FIXED='revoked read(NULL,0)=-1 errno=128'
last_src() { grep '^SRC ' vm.log | tail -n 1 | cut -d' ' -f2; }
# src_line SEQ TIMENS KEYS: an SRC line after SEQ showing both outputs.
src_line() { grep '^SRC ' vm.log | awk -v s="$1" '$2 > s' | grep -F "$2" | grep -F "$3" | head -n 1; }
# wait_src SEQ TIMENS KEYS: until there is one (60 s).
wait_src() {
  _n=0
  while [ -z "$(src_line "$1" "$2" "$3")" ]; do
    _n=$((_n+1)); [ $_n -gt 120 ] && return 1
    kill -0 $VPID 2>/dev/null || return 1
    sleep 0.5
  done
}
if wait_src -1 "$TIMENS_STOCK" "$KEYS_STOCK"; then
  nested_result source-stock-output pass "$(src_line -1 "$TIMENS_STOCK" "$KEYS_STOCK")"
else
  nested_result source-stock-output fail "$(grep '^SRC ' vm.log | tail -n 1)"
fi
s2=$(last_src)
ids=""; st=pass
for p in timens-nsec keys-read-method-check; do
  if "$VMM" patch apply --api-sock api.sock $p.hpatch > apply-$p.out 2>&1; then
    ids="$(awk '/^applied /{print $2; exit}' apply-$p.out) $ids"
  else
    st=fail
  fi
  cat apply-$p.out
done
nested_result source-apply $st "after SRC $s2"
# This VMM lists the kernel's tasks and scans their stacks in a blackout whose jumps displace
# several instructions (or that replaces several functions); the version fix's jump covers one.
tasks=$(sed -n 's/.*the stacks of \([0-9]*\) guest tasks.*/\1/p' apply-*.out | sort -n | tail -n 1)
[ "${tasks:-0}" -ge 10 ] && nested_result tasks pass "$tasks tasks checked in a source fix's blackout" || nested_result tasks fail "$(cat apply.out apply-*.out)"
if wait_src "$s2" "$TIMENS_FIXED" "$KEYS_FIXED"; then
  nested_result source-fixed-output pass "$(src_line "$s2" "$TIMENS_FIXED" "$KEYS_FIXED")"
else
  nested_result source-fixed-output fail "$(grep '^SRC ' vm.log | tail -n 1)"
fi
s3=$(last_src)
st=pass
for id in $ids; do
  "$VMM" patch revert --api-sock api.sock "$id" || st=fail
done
[ -n "$ids" ] || st=fail
nested_result source-revert $st
if wait_src $((s3 + 1)) "$TIMENS_STOCK" "$KEYS_STOCK"; then
  nested_result source-reverted-output pass "$(src_line $((s3 + 1)) "$TIMENS_STOCK" "$KEYS_STOCK")"
else
  nested_result source-reverted-output fail "$(grep '^SRC ' vm.log | tail -n 1)"
fi

# (d) Integrity: the kernel's own static-key rewrite goes through, a stray text write does not.
echo toggle >&3
wait_for 60 '^L2-TOGGLE 1 0' && nested_result static-key pass || nested_result static-key fail "$(grep L2-TOGGLE vm.log)"
"$VMM" integrity --api-sock api.sock --json > integrity1.json
# The workload's lines so far, for the host to check: the kprobe's BUG report, next, may run
# into the console lines that follow it.
grep 'SEQ [0-9]' vm.log > workload.txt
grep 'SRC [0-9]' vm.log > src.txt
echo kprobe >&3
wait_for 60 'L2-KPROBE-ARMING' || true
sleep 10
"$VMM" integrity --api-sock api.sock --json > integrity2.json
"$VMM" integrity --api-sock api.sock
grep -q '"allowed": [1-9]' integrity1.json && nested_result rewrite-allowed pass || nested_result rewrite-allowed fail "$(cat integrity1.json)"
grep -q '"dropped": [1-9]' integrity2.json && nested_result stray-write-dropped pass || nested_result stray-write-dropped fail
"$VMM" status --api-sock api.sock > /dev/null && nested_result vmm-alive pass || nested_result vmm-alive fail

kill $VPID; wait $VPID
kill $HOLD 2>/dev/null
echo "--- vm.log (L2 console and the VMM) ---"
grep -v 'SEQ [0-9]\|SRC [0-9]' vm.log | tail -n 60
sed 's/^/WORKLOAD /' workload.txt
sed 's/^/SOURCE-WORKLOAD /' src.txt
exit 0
"#;

#[test]
fn the_stock_kernel_boots_in_this_vmm_and_is_patched_through_its_api() {
    let started = Instant::now();
    // L1 runs the default kit's kernel (`l1_kit()`); L2, the kernel this VMM boots, the older one.
    let l1 = Kit::ensure();
    let kit = Kit::ensure_version(L2_KERNEL);
    eprintln!(
        "nested-linux: L1 kernel {}, L2 kernel {}",
        l1.version, kit.version
    );
    let dir = TempDir::new("nested-linux");
    let d = |name: &str| dir.path().join(name).to_str().expect("utf-8").to_string();

    // The operator's side, on the host: a key, the fix from C, and a patch whose expected
    // bytes are not the running kernel's (it must be refused, changing nothing).
    cli(&["patch", "keygen", "-o", &d("ops")]);
    let object = kernel_patch::compile(kernel_patch::VERSION_PROC_SHOW_C, dir.path())
        .expect("compile the C fix");
    let cache = dir.path().join("cache");
    std::fs::create_dir(&cache).expect("cache dir");
    let build = std::process::Command::new(integration_tests::vmm_bin())
        .env("VMM_CACHE_DIR", &cache)
        .args(integration_tests::linux::kernel_fix_build_args(
            &kit,
            &object,
            kernel_patch::VERSION_PROC_SHOW_FIX,
            &d("ops.key"),
            &d("fix.hpatch"),
        ))
        .output()
        .expect("run vmm patch build");
    assert!(
        build.status.success(),
        "{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let fix = patch_format::parse(&std::fs::read(d("fix.hpatch")).expect("read")).expect("parse");
    let key = patch_format::SecretKey::from_file_text(
        &std::fs::read_to_string(d("ops.key")).expect("key"),
    )
    .expect("key");
    let mut wrong = fix.patch.clone();
    wrong.meta.name = "wrong-bytes".into();
    wrong.sites[0].expected[12] ^= 0xff;
    std::fs::write(
        d("wrong-bytes.hpatch"),
        wrong.to_file_signed(&key).expect("sign"),
    )
    .expect("write");
    // Two functions, one of which a task never leaves (kthreadd's loop): held back.
    let image = linux_guest::attach::KernelImage::from_file(&kit.vmlinuz).expect("L2's image");
    std::fs::write(
        d("sleeper.hpatch"),
        vmm_tools::demo_linux::ret_replacements(&image, &key, &["cmdline_proc_show", "kthreadd"])
            .expect("build the two-function patch"),
    )
    .expect("write");

    // Part (e): the real upstream fixes, built from their diffs against L2's kernel (the builder
    // fetches and prepares its source into target/linux-source once), signed with the same key.
    let mut programs = Vec::new();
    for f in SOURCE_FIXES {
        let t = Instant::now();
        let out = d(&format!("{}.hpatch", f.name));
        let build = std::process::Command::new(integration_tests::vmm_bin())
            .env("VMM_CACHE_DIR", &cache)
            .args(["patch", "build", "--linux-kernel"])
            .arg(&kit.vmlinuz)
            .arg("--source-diff")
            .arg(fixes_dir().join(format!("{}.patch", f.name)))
            .arg("--source-cache")
            .arg(source_cache())
            .args(["--key", &d("ops.key"), "-o", &out])
            .output()
            .expect("run vmm patch build --source-diff");
        assert!(
            build.status.success(),
            "{}: {}",
            f.name,
            String::from_utf8_lossy(&build.stderr)
        );
        eprintln!("{}: built from its diff in {:.1?}", f.name, t.elapsed());
        programs.push((f.program, compile_fix_program(f.program, dir.path())));
    }

    // L2's initramfs: busybox, the workload, the fixes' programs, the virtio modules.
    let mut a = Archive::new();
    for dir in ["bin", "dev", "proc", "sys", "modules"] {
        a.dir(dir, 0o755).expect("dir");
    }
    a.file(
        "bin/busybox",
        0o755,
        std::fs::read(&kit.busybox).expect("busybox"),
    )
    .expect("busybox");
    a.file("init", 0o755, L2_INIT.as_bytes().to_vec())
        .expect("init");
    for (name, bytes) in programs {
        a.file(&format!("bin/{name}"), 0o755, bytes)
            .expect("program");
    }
    for m in ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"] {
        let ko = kit.modules.join(format!("{m}.ko"));
        a.file(
            &format!("modules/{m}.ko"),
            0o644,
            std::fs::read(&ko).unwrap_or_else(|e| panic!("{}: {e}", ko.display())),
        )
        .expect("module");
    }
    let initrd = a.finish().expect("initramfs");

    let mut job = NestedJob::new("linux-guest", JOB, &nested_vmm_bin())
        .file("l2/bzImage", &kit.vmlinuz)
        .bytes("l2/initrd.cpio", initrd, false)
        .file("ops.pub", &dir.path().join("ops.pub"))
        .file("fix.hpatch", &dir.path().join("fix.hpatch"))
        .file("wrong-bytes.hpatch", &dir.path().join("wrong-bytes.hpatch"))
        .file("sleeper.hpatch", &dir.path().join("sleeper.hpatch"))
        .timeout(Duration::from_secs(540));
    for f in SOURCE_FIXES {
        let name = format!("{}.hpatch", f.name);
        job = job.file(&name, &dir.path().join(&name));
    }
    // The decompressed kernel and its tables, so L1 (at TCG speed) need not rebuild them.
    for entry in std::fs::read_dir(cache.join("linux")).expect("the image cache was filled") {
        let entry = entry.expect("cache entry");
        let name = entry.file_name().to_string_lossy().to_string();
        job = job.file(&format!("cache/linux/{name}"), &entry.path());
    }
    let outcome = run_with_real_kvm(&job, &l1_options());
    expect_passed(
        &outcome,
        &[
            "boot",
            "disk",
            "attach",
            "refusal",
            "sleeper-refused",
            "apply",
            "patched-output",
            "revert",
            "reverted-output",
            "source-stock-output",
            "source-apply",
            "tasks",
            "source-fixed-output",
            "source-revert",
            "source-reverted-output",
            "static-key",
            "rewrite-allowed",
            "stray-write-dropped",
            "vmm-alive",
        ],
    );

    // The host reads the workload itself (up to the kprobe step, whose BUG report may run into
    // console lines): sequence numbers without a gap, uptime rising,
    // stock → patched → stock, so the guest never rebooted and the fix really changed and
    // then restored what it computes.
    let lines = outcome.job_lines();
    let seq: Vec<(u64, f64, String)> = lines
        .iter()
        .filter_map(|l| {
            // The workload's lines up to the kprobe step (`workload.txt`).
            let at = l.strip_prefix("WORKLOAD ")?.find("SEQ ")? + "WORKLOAD ".len();
            let mut f = l[at..].split_whitespace().skip(1);
            let (n, up, state) = (f.next()?.parse().ok()?, f.next()?.parse().ok()?, f.next()?);
            let state = if state.starts_with("patched") {
                "patched"
            } else {
                "stock"
            };
            Some((n, up, state.to_string()))
        })
        .collect();
    assert!(seq.len() > 5, "too few workload lines\n{}", outcome.log());
    for w in seq.windows(2) {
        assert_eq!(
            w[1].0,
            w[0].0 + 1,
            "a gap in the workload's sequence\n{}",
            outcome.log()
        );
        assert!(
            w[1].1 > w[0].1,
            "uptime went back: the guest rebooted\n{}",
            outcome.log()
        );
    }
    let states: Vec<&str> = seq.iter().map(|s| s.2.as_str()).collect();
    let first_patched = states.iter().position(|s| *s == "patched");
    let back = first_patched.and_then(|p| states[p..].iter().position(|s| *s == "stock"));
    assert!(
        states.first() == Some(&"stock") && first_patched.is_some() && back.is_some(),
        "expected stock → patched → stock, got {states:?}\n{}",
        outcome.log()
    );
    // L2 ran the older kernel, and the source fixes' programs went stock → fixed → stock, again
    // without a gap in the sequence.
    assert!(
        lines
            .iter()
            .any(|l| l.contains("NESTED-RESULT boot pass") && l.contains(L2_KERNEL)),
        "L2 is not {L2_KERNEL}\n{}",
        outcome.log()
    );
    let src: Vec<(u64, &str)> = lines
        .iter()
        .filter_map(|l| {
            let rest = l.strip_prefix("SOURCE-WORKLOAD ")?;
            let at = rest.find("SRC ")?;
            let rest = &rest[at + "SRC ".len()..];
            let (n, outputs) = rest.split_once(' ')?;
            Some((n.parse().ok()?, outputs))
        })
        .collect();
    for w in src.windows(2) {
        assert_eq!(
            w[1].0,
            w[0].0 + 1,
            "a gap in the source workload's sequence\n{}",
            outcome.log()
        );
    }
    let src_states: Vec<&str> = src
        .iter()
        .filter_map(|(_, out)| {
            if SOURCE_FIXES.iter().all(|f| out.contains(f.after)) {
                Some("fixed")
            } else if SOURCE_FIXES.iter().all(|f| out.contains(f.before)) {
                Some("stock")
            } else {
                None // a line written while only one of the two was applied
            }
        })
        .collect();
    let first_fixed = src_states.iter().position(|s| *s == "fixed");
    let back = first_fixed.and_then(|p| src_states[p..].iter().position(|s| *s == "stock"));
    assert!(
        src_states.first() == Some(&"stock") && first_fixed.is_some() && back.is_some(),
        "expected the source fixes' outputs stock → fixed → stock, got {src_states:?}\n{}",
        outcome.log()
    );
    let slide = lines
        .iter()
        .find(|l| l.contains("attached to the Linux kernel"))
        .map(|l| l.to_string())
        .unwrap_or_default();
    assert!(
        slide.contains("slide=0x") && !slide.contains("slide=0x0 "),
        "KASLR must be on (a non-zero slide): {slide}\n{}",
        outcome.log()
    );
    let t = &outcome.timings;
    eprintln!(
        "nested tier (b-e) wall time: initramfs build {:.1?}, L1 boot to job start {:.1?}, job {:.1?}, test total {:.1?}",
        t.build,
        t.boot,
        t.job.unwrap_or_default(),
        started.elapsed()
    );
}
