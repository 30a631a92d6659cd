//! `vmm bench linux-vmm`: the stock kernel in this VMM against QEMU `-enable-kvm`, on the same
//! real SVM/VMX KVM (L1 of the nested tier here, the host where it has VMX/SVM), in one run:
//!
//! - boot to the init workload: this VMM's `vmm run --kernel` (and with `--vmm-decompress`) vs
//!   QEMU `-enable-kvm` (SeaBIOS, QEMU's default machine), same bzImage, initramfs, memory and
//!   vCPUs; target ≤ 0.5×;
//! - the kernel fix's apply/revert blackout through this VMM's API vs the QEMU backend on
//!   QEMU `-enable-kvm` (`vmm bench linux --accel kvm`), each with its own pause → resume
//!   floor; targets: this VMM ≥ 10× lower p50, and ≤ 1.2× its own floor;
//! - a syscall-heavy workload's rate with `--code-integrity enforce` vs `off`; target: equal
//!   within noise.
//!
//! Everything runs in one job of [`crate::nested`], so the ratios compare like with like;
//! absolute numbers under QEMU TCG mean nothing against a host.

use std::path::Path;
use std::time::Duration;

use guest_control::stats::{Summary, summarize};
use serde::Serialize;
use serde_json::Value;

use super::HostInfo;
use crate::nested::{L1Kit, L1Options, NestedJob, Placement};

/// The L2 /init: `bench=boot` prints `L2-UP` and idles; `bench=tput` waits for the VMM to have
/// attached (and protected the text), then counts `/proc/version` reads per second for a few
/// windows; `bench=patch` prints a line a second for the apply/revert cycles.
const L2_INIT: &str = r#"#!/bin/busybox sh
B=/bin/busybox
$B mount -t proc proc /proc
# The kernel's own clock at init: the job's wall time minus this is what came before the kernel
# (the VMM or firmware, the decompressor).
read -r up _ < /proc/uptime
echo "L2-UP $up"
mode=boot
dmesg=0
for a in $($B cat /proc/cmdline); do case "$a" in bench=*) mode=${a#bench=};; dmesg=1) dmesg=1;; esac; done
# One boot per VMM also shows its kernel log (after the timed line), to see where the time went.
if [ "$dmesg" = 1 ]; then $B dmesg | while read -r l; do echo "L2-DMESG $l"; done; echo "L2-DMESG-END"; fi
case "$mode" in
tput)
  $B sleep 20
  # Shell builtins only (read, test, arithmetic): no fork per iteration, so the rate is the
  # kernel's open/read/close of /proc/version, not process creation under TCG.
  for w in 1 2 3 4 5; do
    n=0; read -r t0 _ < /proc/uptime; t0=${t0%.*}${t0#*.}; end=$((t0 + 400))
    while :; do
      read -r _l < /proc/version; read -r _l < /proc/version; read -r _l < /proc/version; read -r _l < /proc/version
      n=$((n+4))
      read -r now _ < /proc/uptime; now=${now%.*}${now#*.}
      [ "$now" -ge "$end" ] && break
    done
    echo "L2-TPUT $((n * 100 / (now - t0)))"
  done
  $B poweroff -f;;
*)
  while :; do echo "L2-ALIVE $($B cut -d' ' -f1 /proc/uptime)"; $B sleep 1; done;;
esac
"#;

const JOB: &str = r#"
set -u
mkdir -p -m 700 /tmp/vmm-cache && cp -a cache/. /tmp/vmm-cache/ && chmod -R go-rwx /tmp/vmm-cache
export VMM_CACHE_DIR=/tmp/vmm-cache
chmod +x qemu/bin/qemu-system-x86_64
export PATH="$JOB_DIR/qemu/bin:$PATH" LD_LIBRARY_PATH="$JOB_DIR/qemu/lib"
now() { cut -d' ' -f1 /proc/uptime; }
# until LOG has PATTERN, at most SECONDS of uptime (not of loop turns: under TCG each turn's
# fork of grep costs more than its sleep).
wait_line() {
  read -r _t0 _ < /proc/uptime; _t0=${_t0%.*}
  while ! grep -q "$2" "$1" 2>/dev/null; do
    read -r _now _ < /proc/uptime; [ $((${_now%.*} - _t0)) -gt "$3" ] && return 1; sleep 0.1
  done
}
K="--kernel l2/bzImage --initrd l2/initrd.cpio --memory 512 --vcpus 2"
A="console=ttyS0 quiet"
# BENCH boot-X: wall seconds to L2-UP; BENCH kernel-X: the kernel's uptime then.
booted() {
  if wait_line "$2" L2-UP 150; then
    echo "BENCH boot-$1 $(awk "BEGIN{print $(now) - $t0}")"
    echo "BENCH kernel-$1 $(grep -o 'L2-UP [0-9.]*' "$2" | head -n 1 | cut -d' ' -f2)"
    if [ "$3" = dmesg=1 ]; then
      wait_line "$2" L2-DMESG-END 120 || true
      grep -a 'L2-DMESG ' "$2" | sed "s/^.*L2-DMESG /DMESG-$1 /"
    fi
  else
    echo "BENCH-FAIL boot-$1: no L2-UP within 150 s; its console:"; tail -n 30 "$2"
  fi
}
# The parts asked for (PARTS, from --only).
want() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
want boot && for i in $(seq 1 $ROUNDS); do
  d=dmesg=0; [ "$i" = 1 ] && d=dmesg=1
  t0=$(now)
  "$VMM" run $K --cmdline "$A bench=boot $d" > boot-vmm.log 2>&1 < /dev/null &
  p=$!
  booted vmm boot-vmm.log $d
  kill $p; wait $p
  t0=$(now)
  "$VMM" run $K --vmm-decompress --cmdline "$A bench=boot dmesg=0" > boot-vmmd.log 2>&1 < /dev/null &
  p=$!
  booted vmmd boot-vmmd.log dmesg=0
  kill $p; wait $p
  t0=$(now)
  qemu-system-x86_64 -enable-kvm -cpu host -M pc -m 512 -smp 2 -nodefaults -display none \
    -serial file:boot-qemu.log -kernel l2/bzImage -initrd l2/initrd.cpio -append "$A bench=boot $d" &
  p=$!
  booted qemu boot-qemu.log $d
  kill $p; wait $p
  rm -f boot-qemu.log
done

# Blackouts through this VMM's API, interleaved with its pause -> resume floor.
if want patch; then
"$VMM" run $K --cmdline "$A bench=patch" --api-sock api.sock --trusted-key ops.pub > patch.log 2>&1 < /dev/null &
p=$!
n=0
until "$VMM" patch list --api-sock api.sock > /dev/null 2>&1; do n=$((n+1)); [ $n -gt 300 ] && break; sleep 1; done
for i in $(seq 1 $CYCLES); do
  echo "BENCH floor-vmm $("$VMM" pause --and-resume --api-sock api.sock --json | grep -o '"blackout_us": *[0-9]*' | grep -o '[0-9]*$')"
  out=$("$VMM" patch apply --api-sock api.sock fix.hpatch --json)
  echo "BENCH apply-vmm $(echo "$out" | grep -o '"apply_blackout_us": *[0-9]*' | head -n 1 | grep -o '[0-9]*$')"
  id=$(echo "$out" | grep -o '"id": *"[0-9a-f]*"' | head -n 1 | grep -o '[0-9a-f]\{64\}')
  out=$("$VMM" patch revert --api-sock api.sock "$id" --json)
  echo "BENCH revert-vmm $(echo "$out" | grep -o '"revert_blackout_us": *[0-9]*' | head -n 1 | grep -o '[0-9]*$')"
done
echo "BENCH-JSON vmm-metrics $("$VMM" metrics --api-sock api.sock | tr -d '\n')"
# Two functions at once: the blackout also lists the kernel's tasks and scans their stacks
# (after the metrics above, which are the version fix's alone).
for i in $(seq 1 $CYCLES); do
  out=$("$VMM" patch apply --api-sock api.sock two.hpatch --json)
  echo "BENCH apply2-vmm $(echo "$out" | grep -o '"apply_blackout_us": *[0-9]*' | head -n 1 | grep -o '[0-9]*$')"
  echo "BENCH tasks-vmm $(echo "$out" | grep -o '"threads_checked": *[0-9]*' | head -n 1 | grep -o '[0-9]*$')"
  id=$(echo "$out" | grep -o '"id": *"[0-9a-f]*"' | head -n 1 | grep -o '[0-9a-f]\{64\}')
  "$VMM" patch revert --api-sock api.sock "$id" > /dev/null
done
kill $p; wait $p
fi

# Workload rate with code integrity off and enforce (patching on in both, so only that differs).
want tput && for mode in off enforce off enforce; do
  "$VMM" run $K --cmdline "$A bench=tput" --trusted-key ops.pub --code-integrity $mode > tput.log 2>&1 < /dev/null
  grep L2-TPUT tput.log | sed "s/^.*L2-TPUT/BENCH tput-$mode/"
done
want qemu || exit 0
# The QEMU backend talks to QEMU's gdbstub over TCP on 127.0.0.1: L1 brings up no network.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
# The QEMU backend on QEMU -enable-kvm, same kernel and fix (its own run, its own floor), last
# and bounded: in L1 it has been seen to stall with L1 idle after the L2 boot; its output is
# shown as it comes.
timeout 900 "$VMM" --log info bench linux --kernel l2/bzImage --busybox /bin/busybox --accel kvm --cycles $CYCLES \
  --patch fix.hpatch --trusted-key ops.pub --out qemu-linux.json 2>&1 | sed 's/^/QEMU-BACKEND /'
[ -f qemu-linux.json ] || echo "BENCH-FAIL qemu-backend: vmm bench linux --accel kvm wrote no report (exit or 900 s timeout; its lines are above, prefixed QEMU-BACKEND)"
[ -f qemu-linux.json ] && echo "BENCH-JSON qemu $(tr -d '\n' < qemu-linux.json)"
"#;

/// The parts of the comparison (`vmm bench linux-vmm --only`), in the order they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Boots of both VMMs to the init workload.
    Boot,
    /// Apply/revert blackouts through this VMM's API, with its floor.
    Patch,
    /// The workload's rate with code integrity off and enforce.
    Tput,
    /// The QEMU backend's blackouts on QEMU -enable-kvm.
    Qemu,
}

impl Part {
    pub const ALL: [Part; 4] = [Part::Boot, Part::Patch, Part::Tput, Part::Qemu];
    fn name(self) -> &'static str {
        match self {
            Part::Boot => "boot",
            Part::Patch => "patch",
            Part::Tput => "tput",
            Part::Qemu => "qemu",
        }
    }
}

/// One side of a comparison, µs or s.
#[derive(Debug, Clone, Serialize)]
pub struct LinuxVmmReport {
    pub benchmark: &'static str,
    pub host: HostInfo,
    /// Where the job ran: `l1` (QEMU TCG with emulated SVM) or `host`.
    pub ran: String,
    pub kernel: String,
    pub cycles: usize,
    /// Seconds from starting the process to the init workload's first line.
    pub boot_vmm_s: Vec<f64>,
    pub boot_qemu_s: Vec<f64>,
    /// The kernel's uptime at the same line: the rest of the boot time came before the kernel's
    /// clock started (VMM or firmware set-up, the decompressor).
    pub kernel_vmm_s: Vec<f64>,
    pub kernel_qemu_s: Vec<f64>,
    /// The same for this VMM with `--vmm-decompress` (the guest skips its decompressor).
    pub boot_vmmd_s: Vec<f64>,
    pub kernel_vmmd_s: Vec<f64>,
    /// The first boot's kernel log on each side (`dmesg`, printed after the timed line).
    pub dmesg_vmm: Vec<String>,
    pub dmesg_qemu: Vec<String>,
    pub vmm_floor_us: Summary,
    pub vmm_apply_us: Summary,
    pub vmm_revert_us: Summary,
    /// Applies of a two-function patch, whose blackout also lists the kernel's tasks and
    /// scans their stacks, and how many tasks each checked.
    pub vmm_apply_listed_us: Summary,
    pub vmm_tasks_listed: Vec<f64>,
    /// The engine's own work inside this VMM's blackouts (the API's metrics).
    pub vmm_apply_engine_us: Option<Summary>,
    pub vmm_revert_engine_us: Option<Summary>,
    /// The applies' engine work by phase (ns): recheck, scan, write.
    pub vmm_apply_phases_ns: Option<[Summary; 3]>,
    /// `BENCH-FAIL` lines: what the job could not measure, and why.
    pub failures: Vec<String>,
    pub qemu_floor_us: Option<Summary>,
    pub qemu_apply_us: Option<Summary>,
    pub qemu_revert_us: Option<Summary>,
    /// `/proc/version` reads per second, per 4 s window.
    pub tput_off: Vec<f64>,
    pub tput_enforce: Vec<f64>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    s.get(s.len() / 2).copied().unwrap_or(f64::NAN)
}

fn summary_of(v: &Value) -> Option<Summary> {
    serde_json::from_value(v.clone()).ok()
}

/// QEMU's firmware a `-M pc -kernel` boot loads, looked for where Debian installs it.
const QEMU_FIRMWARE: [&str; 4] = [
    "/usr/share/seabios/bios-256k.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
    "/usr/share/qemu/linuxboot.bin",
    "/usr/share/qemu/kvmvapic.bin",
];

/// Runs the whole comparison as one nested job: builds the fix (signed with a fresh key), the
/// L2 initramfs and the image cache on this host, packs QEMU with its libraries and firmware,
/// and parses the job's `BENCH` lines.
pub fn run(
    kit: &L1Kit,
    vmm: &Path,
    rounds: usize,
    cycles: usize,
    parts: &[Part],
    host: HostInfo,
) -> anyhow::Result<LinuxVmmReport> {
    let tmp = tempfile::Builder::new()
        .prefix("vmm-bench-linux-vmm-")
        .tempdir()?;
    let dir = tmp.path();
    let cache = dir.join("cache");
    std::fs::create_dir(&cache)?;
    std::fs::set_permissions(&cache, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
    // Laid out as `VMM_CACHE_DIR` is (its `linux/` subdirectory), for the job to copy.
    let image = linux_guest::attach::KernelImage::from_file_cached(
        &kit.vmlinuz,
        Some(&cache.join("linux")),
    )?;
    let key = patch_format::SecretKey::generate()?;
    let (_, fix_bytes) = crate::demo_linux::version_fix(dir, &image, &key)?;
    let fix = dir.join("fix.hpatch");
    std::fs::write(&fix, fix_bytes)?;
    let two = dir.join("two.hpatch");
    std::fs::write(
        &two,
        crate::demo_linux::ret_replacements(
            &image,
            &key,
            &["cmdline_proc_show", "meminfo_proc_show"],
        )?,
    )?;
    let public_key = dir.join("ops.pub");
    std::fs::write(&public_key, key.public().to_file_text())?;
    let mut qemu_files = vec![("qemu/bin/qemu-system-x86_64".to_string(), kit.qemu.clone())];
    for lib in crate::nested::shared_libraries(&kit.qemu)? {
        if let Some(name) = lib.file_name() {
            qemu_files.push((format!("qemu/lib/{}", name.to_string_lossy()), lib.clone()));
        }
    }
    for fw in QEMU_FIRMWARE {
        let fw = Path::new(fw);
        if fw.is_file()
            && let Some(name) = fw.file_name()
        {
            qemu_files.push((
                // QEMU looks for its firmware in <its bin>/../share/qemu (then its build's
                // data dir, which L1 does not have).
                format!("qemu/share/qemu/{}", name.to_string_lossy()),
                fw.to_path_buf(),
            ));
        }
    }
    let mut a = guest_tools::initramfs::Archive::new();
    for d in ["bin", "dev", "proc"] {
        a.dir(d, 0o755)?;
    }
    a.file("bin/busybox", 0o755, std::fs::read(&kit.busybox)?)?;
    a.file("init", 0o755, L2_INIT.as_bytes().to_vec())?;
    let script = format!(
        "ROUNDS={rounds}\nCYCLES={cycles}\nPARTS=\"{}\"\n{JOB}",
        parts.iter().map(|p| p.name()).collect::<Vec<_>>().join(" ")
    );
    let mut job = NestedJob::new("bench-linux-vmm", &script, vmm)
        .file("l2/bzImage", &kit.vmlinuz)
        .bytes("l2/initrd.cpio", a.finish()?, false)
        .file("fix.hpatch", &fix)
        .file("two.hpatch", &two)
        .file("ops.pub", &public_key)
        .timeout(Duration::from_secs(3600));
    for entry in std::fs::read_dir(cache.join("linux"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        job = job.file(&format!("cache/linux/{name}"), &entry.path());
    }
    for (path, host_path) in &qemu_files {
        job = job.file(path, host_path);
    }
    // L1 gets as many CPUs as L2 has vCPUs: with one, an L2 vCPU spinning on its sibling
    // (which only the same L1 CPU could run) was seen to starve L1 for minutes under TCG.
    let opts = L1Options {
        vcpus: 2,
        ..L1Options::default()
    };
    let outcome =
        crate::nested::run_where_real_kvm(&job, Placement::from_env()?, || Ok(kit.clone()), &opts)?;
    let mut nums: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
    let mut qemu = Value::Null;
    let mut metrics = Value::Null;
    let mut failures = Vec::new();
    let (mut dmesg_vmm, mut dmesg_qemu) = (Vec::new(), Vec::new());
    for line in outcome.job_lines() {
        if let Some(l) = line.strip_prefix("DMESG-vmm ") {
            dmesg_vmm.push(l.to_string());
            continue;
        }
        if let Some(l) = line.strip_prefix("DMESG-qemu ") {
            dmesg_qemu.push(l.to_string());
            continue;
        }
        let mut f = line.split_whitespace();
        match f.next() {
            Some("BENCH") => {
                if let (Some(k), Some(v)) = (f.next(), f.next().and_then(|v| v.parse().ok())) {
                    nums.entry(k.to_string()).or_default().push(v);
                }
            }
            Some("BENCH-JSON") => {
                let which = f.next();
                let rest: Vec<&str> = f.collect();
                let v = serde_json::from_str(&rest.join(" ")).unwrap_or(Value::Null);
                match which {
                    Some("qemu") => qemu = v,
                    Some("vmm-metrics") => metrics = v,
                    _ => {}
                }
            }
            Some("BENCH-FAIL") => failures.push(line.to_string()),
            _ => {}
        }
    }
    let get = |k: &str| nums.get(k).cloned().unwrap_or_default();
    let us = |k: &str| summarize(&get(k).iter().map(|v| *v as u64).collect::<Vec<_>>());
    let wants = |p: Part| parts.contains(&p);
    if (wants(Part::Patch) && get("apply-vmm").is_empty())
        || (wants(Part::Boot) && get("boot-vmm").is_empty())
    {
        anyhow::bail!(
            "the nested job produced no measurements of this VMM:\n{}",
            outcome.log()
        );
    }
    if !failures.is_empty() || (wants(Part::Qemu) && qemu.is_null()) {
        // The numbers that are there are still reported; the log says why the rest is not.
        eprintln!(
            "bench linux-vmm: some measurements are missing ({}); the job's output:\n{}",
            if failures.is_empty() {
                "no QEMU backend report".to_string()
            } else {
                failures.join("; ")
            },
            outcome.job_lines().join("\n")
        );
    }
    Ok(LinuxVmmReport {
        benchmark: "linux-vmm",
        host,
        ran: format!("{:?}", outcome.ran).to_lowercase(),
        kernel: image.banner.trim_end().to_string(),
        cycles,
        boot_vmm_s: get("boot-vmm"),
        boot_qemu_s: get("boot-qemu"),
        kernel_vmm_s: get("kernel-vmm"),
        kernel_qemu_s: get("kernel-qemu"),
        boot_vmmd_s: get("boot-vmmd"),
        kernel_vmmd_s: get("kernel-vmmd"),
        dmesg_vmm,
        dmesg_qemu,
        vmm_floor_us: us("floor-vmm"),
        vmm_apply_us: us("apply-vmm"),
        vmm_revert_us: us("revert-vmm"),
        vmm_apply_listed_us: us("apply2-vmm"),
        vmm_tasks_listed: get("tasks-vmm"),
        qemu_floor_us: summary_of(&qemu["floor_us"]),
        qemu_apply_us: summary_of(&qemu["apply_us"]),
        qemu_revert_us: summary_of(&qemu["revert_us"]),
        vmm_apply_engine_us: summary_of(&metrics["patches"]["apply_engine_us"]),
        vmm_revert_engine_us: summary_of(&metrics["patches"]["revert_engine_us"]),
        vmm_apply_phases_ns: (|| {
            let p = &metrics["patches"]["apply_phases_ns"];
            Some([
                summary_of(&p["recheck_ns"])?,
                summary_of(&p["scan_ns"])?,
                summary_of(&p["write_ns"])?,
            ])
        })(),
        failures,
        tput_off: get("tput-off"),
        tput_enforce: get("tput-enforce"),
    })
}

/// The table `scripts/bench` prints; a measurement the run lacks shows as `-`.
pub fn table(r: &LinuxVmmReport) -> String {
    let num = |v: Option<f64>, prec: usize| {
        v.filter(|v| v.is_finite())
            .map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let med = |v: &[f64]| (!v.is_empty()).then(|| median(v));
    let p50 = |s: &Summary| (s.count > 0).then_some(s.p50 as f64);
    let q50 = |s: &Option<Summary>| s.as_ref().and_then(p50);
    let (bv, bq) = (med(&r.boot_vmm_s), med(&r.boot_qemu_s));
    let mut t = format!(
        "Stock kernel in this VMM vs QEMU -enable-kvm, same KVM ({}), {} patch cycles:\n",
        r.ran, r.cycles
    );
    t.push_str("| measure                                   | this VMM   | QEMU       | ratio   | target        |\n");
    t.push_str("|-------------------------------------------|------------|------------|---------|---------------|\n");
    t.push_str(&format!(
        "| boot to init workload, median (s)         | {:>10} | {:>10} | {:>7} | ≤ 0.5         |\n",
        num(bv, 2),
        num(bq, 2),
        num(ratio(bv, bq), 2)
    ));
    let bd = med(&r.boot_vmmd_s);
    t.push_str(&format!(
        "|   this VMM with --vmm-decompress (s)      | {:>10} | {:>10} | {:>7} | ≤ 0.5         |\n",
        num(bd, 2),
        num(bq, 2),
        num(ratio(bd, bq), 2)
    ));
    let (kv, kq) = (med(&r.kernel_vmm_s), med(&r.kernel_qemu_s));
    t.push_str(&format!(
        "|   of which the kernel's own (uptime, s)   | {:>10} | {:>10} | {:>7} |               |\n",
        num(kv, 2),
        num(kq, 2),
        num(ratio(kv, kq), 2)
    ));
    for (name, v, q) in [
        (
            "apply blackout p50 (µs)",
            p50(&r.vmm_apply_us),
            q50(&r.qemu_apply_us),
        ),
        (
            "revert blackout p50 (µs)",
            p50(&r.vmm_revert_us),
            q50(&r.qemu_revert_us),
        ),
        (
            "pause → resume floor p50 (µs)",
            p50(&r.vmm_floor_us),
            q50(&r.qemu_floor_us),
        ),
    ] {
        t.push_str(&format!(
            "| {name:<41} | {:>10} | {:>10} | {:>7} | QEMU/VMM ≥ 10 |\n",
            num(v, 0),
            num(q, 0),
            num(ratio(q, v), 1)
        ));
    }
    t.push_str(&format!(
        "| this VMM: 2 functions, {:>4} tasks scanned | {:>10} |            |         | the walk's cost |\n",
        num(med(&r.vmm_tasks_listed), 0),
        num(p50(&r.vmm_apply_listed_us), 0),
    ));
    t.push_str(&format!(
        "| this VMM: apply p50 / its floor p50       | {:>10} |            |         | ≤ 1.2         |\n",
        num(ratio(p50(&r.vmm_apply_us), p50(&r.vmm_floor_us)), 2)
    ));
    t.push_str(&format!(
        "| this VMM: engine's own work p50 (µs)      | {:>10} |            |         | apply/revert  |\n",
        format!(
            "{}/{}",
            num(q50(&r.vmm_apply_engine_us), 0),
            num(q50(&r.vmm_revert_engine_us), 0)
        )
    ));
    let phase = |i: usize| {
        r.vmm_apply_phases_ns
            .as_ref()
            .and_then(|p| p50(&p[i]))
            .map(|ns| ns / 1000.0)
    };
    t.push_str(&format!(
        "| this VMM: apply phases p50 (µs)           | {:>10} |            |         | recheck/scan/write |\n",
        format!("{}/{}/{}", num(phase(0), 1), num(phase(1), 1), num(phase(2), 1))
    ));
    let (off, on) = (med(&r.tput_off), med(&r.tput_enforce));
    t.push_str(&format!(
        "| workload reads/s, integrity off / enforce | {:>10} | {:>10} | {:>7} | ≈ 1 (noise)   |\n",
        num(off, 0),
        num(on, 0),
        num(ratio(on, off), 3)
    ));
    for f in &r.failures {
        t.push_str(&format!("missing: {f}\n"));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(p50: u64) -> Summary {
        summarize(&[p50])
    }

    #[test]
    fn a_missing_side_shows_as_a_dash_not_a_zero_ratio() {
        let r = LinuxVmmReport {
            benchmark: "linux-vmm",
            host: crate::bench::host_info(),
            ran: "l1".into(),
            kernel: "Linux version 6.1".into(),
            cycles: 20,
            boot_vmm_s: vec![24.0, 25.0, 26.0],
            boot_qemu_s: vec![],
            kernel_vmm_s: vec![20.0],
            kernel_qemu_s: vec![],
            boot_vmmd_s: vec![12.0],
            kernel_vmmd_s: vec![],
            dmesg_vmm: vec![],
            dmesg_qemu: vec![],
            vmm_floor_us: s(450),
            vmm_apply_us: s(540),
            vmm_revert_us: s(500),
            vmm_apply_listed_us: s(700),
            vmm_tasks_listed: vec![55.0],
            vmm_apply_engine_us: Some(s(40)),
            vmm_revert_engine_us: None,
            vmm_apply_phases_ns: Some([s(30_000), s(2_000), s(8_500)]),
            failures: vec!["BENCH-FAIL boot-qemu: no L2-UP".into()],
            qemu_floor_us: None,
            qemu_apply_us: Some(s(9000)),
            qemu_revert_us: None,
            tput_off: vec![30.0],
            tput_enforce: vec![30.0],
        };
        let t = table(&r);
        let row = |name: &str| {
            t.lines()
                .find(|l| l.contains(name))
                .unwrap_or_else(|| panic!("no row {name} in\n{t}"))
                .split('|')
                .map(str::trim)
                .collect::<Vec<_>>()
        };
        assert_eq!(row("boot to init")[2..5], ["25.00", "-", "-"]);
        assert_eq!(row("kernel's own")[2..5], ["20.00", "-", "-"]);
        assert_eq!(row("--vmm-decompress")[2..5], ["12.00", "-", "-"]);
        assert_eq!(row("apply blackout")[2..5], ["540", "9000", "16.7"]);
        assert_eq!(row("revert blackout")[2..5], ["500", "-", "-"]);
        assert_eq!(row("its floor")[2], "1.20");
        assert_eq!(row("engine's own")[2], "40/-");
        assert_eq!(row("apply phases")[2], "30.0/2.0/8.5");
        assert!(t.contains("missing: BENCH-FAIL boot-qemu"), "{t}");
        assert!(!t.contains("NaN"), "{t}");
    }
}
