//! The nested test tier's runner: a job (a shell script plus files) run where there is a KVM
//! with real SVM/VMX semantics (docs/nested-tier.md).
//!
//! On the project's machines `/dev/kvm` is the PVM backend, where guest ring 0 is emulated and a
//! stock kernel cannot boot. There the job runs inside **L1**: the stock Debian kernel under
//! QEMU TCG with `-cpu max` (an emulated AMD CPU with SVM and nested paging) loads kvm-amd, and
//! our `vmm` runs its guests on that `/dev/kvm`. On a host whose own KVM is kvm-intel or kvm-amd
//! the same job runs directly on the host. [`run_where_real_kvm`] picks; [`run_in_l1`] and
//! [`run_on_host`] force one.
//!
//! How results cross: everything goes over one text stream (L1's serial console, or the host
//! job's stdout and stderr). The job prints what it likes; the runner and the job's helper
//! functions add marker lines, parsed here:
//!
//! - `NESTED-L1 <fact>`: L1's /init (module loads, nested paging, `/dev/kvm`);
//! - `NESTED-FAIL <why>`: L1 could not give the job a KVM (it powers off right after);
//! - `NESTED-JOB-START <name>`: the job starts (boot time ends here);
//! - `NESTED-RESULT <name> <status> [detail]`: a named check (`nested_result`, `nested_check`;
//!   name and status are single words);
//! - `NESTED-EXIT <code>`: the job script's exit status (job time ends here).
//!
//! The job sees `$VMM` (the `vmm` binary), `$JOB_DIR` (its working directory, holding its
//! files at their relative paths) and `$NESTED_WHERE` (`host` or `l1`), and has the helper
//! functions `nested_result NAME STATUS [DETAIL]` and `nested_check NAME CMD...` (runs CMD,
//! reports `pass`, or `fail exit=N`, returns CMD's status).

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_tools::initramfs::{Archive, read_static_busybox};
use thiserror::Error;

/// The KVM modules L1 loads, in load order (each needs the ones before it).
pub const L1_MODULES: [&str; 4] = ["irqbypass", "ccp", "kvm", "kvm-amd"];

/// Where L1's /init finds the modules, and the job its files.
const L1_MODULE_DIR: &str = "lib/nested-modules";
const L1_JOB_DIR: &str = "job";
const L1_VMM: &str = "bin/vmm";

/// What L1 boots: the stock kernel and its KVM modules (`scripts/linux-kit` prints them as
/// `vmlinuz=` and `modules=`), a static busybox and QEMU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L1Kit {
    pub qemu: PathBuf,
    /// The L1 kernel, a bzImage.
    pub vmlinuz: PathBuf,
    /// A directory with `irqbypass.ko`, `ccp.ko`, `kvm.ko` and `kvm-amd.ko` of that kernel.
    pub modules: PathBuf,
    /// A static busybox (busybox-static's `/bin/busybox`).
    pub busybox: PathBuf,
}

/// Where a job file's bytes come from.
#[derive(Debug, Clone)]
pub enum FileSource {
    Bytes(Vec<u8>),
    /// Read when the job starts (into L1's initramfs, or copied into the host job's directory).
    Path(PathBuf),
}

/// A file the job finds in `$JOB_DIR` (an L2 kernel, an L2 initramfs, a patch, a key…).
#[derive(Debug, Clone)]
pub struct JobFile {
    /// Relative to `$JOB_DIR`, `/`-separated (`l2/bzImage`).
    pub path: String,
    pub source: FileSource,
    pub executable: bool,
}

/// What to run where there is a real KVM.
#[derive(Debug, Clone)]
pub struct NestedJob {
    /// Names the job in markers and messages.
    pub name: String,
    /// A POSIX shell script (busybox `sh` in L1), run in `$JOB_DIR` after the helper functions
    /// are defined. Its exit status is the job's.
    pub script: String,
    pub files: Vec<JobFile>,
    /// The `vmm` binary (on this host): run in place on a real host, copied into L1 (debug
    /// info stripped, with the shared libraries `ldd` names) otherwise.
    pub vmm: PathBuf,
    /// How long the job may run once it started (L1's boot has its own limit,
    /// [`L1Options::boot_timeout`]).
    pub timeout: Duration,
}

impl NestedJob {
    pub fn new(name: &str, script: &str, vmm: &Path) -> Self {
        NestedJob {
            name: name.to_string(),
            script: script.to_string(),
            files: Vec::new(),
            vmm: vmm.to_path_buf(),
            timeout: Duration::from_secs(120),
        }
    }

    /// Adds a file read from `host` to `$JOB_DIR/path`.
    pub fn file(mut self, path: &str, host: &Path) -> Self {
        self.files.push(JobFile {
            path: path.to_string(),
            source: FileSource::Path(host.to_path_buf()),
            executable: false,
        });
        self
    }

    /// Adds `bytes` as `$JOB_DIR/path`.
    pub fn bytes(mut self, path: &str, bytes: Vec<u8>, executable: bool) -> Self {
        self.files.push(JobFile {
            path: path.to_string(),
            source: FileSource::Bytes(bytes),
            executable,
        });
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// How L1 runs.
#[derive(Debug, Clone)]
pub struct L1Options {
    /// QEMU's `-cpu`: `max` (SVM, NPT, and LA57: L1 and its guests may use 5-level paging) or
    /// `max,la57=off` ([`L1Options::la57`]).
    pub cpu: String,
    pub vcpus: usize,
    pub memory_mib: u64,
    /// Gzip the initramfs (host `gzip -1`). Off by default: under TCG the two boot equally fast
    /// (docs/nested-tier.md has the measurements) and uncompressed needs no tool.
    pub gzip: bool,
    /// Strip the `vmm` binary's debug info (`objcopy --strip-debug`) before it goes in: a debug
    /// build shrinks ~4x, which L1's unpacking pays for under TCG.
    pub strip_vmm: bool,
    /// Boot L1 from the vmlinux ELF inside the bzImage, through its PVH entry (QEMU's
    /// `-kernel` of an ELF with a PVH note), instead of the bzImage: it skips the decompressor
    /// (XZ of ~66 MB at TCG speed), ~4 s of every L1 boot. The ELF comes from the checked
    /// kernel image cache ([`linux_guest::image_cache`]). No KASLR then (nothing randomises).
    pub pvh: bool,
    /// From QEMU's start to the job's start.
    pub boot_timeout: Duration,
    /// Appended to `console=ttyS0 panic=-1 quiet`.
    pub extra_cmdline: String,
}

impl Default for L1Options {
    fn default() -> Self {
        L1Options {
            cpu: "max".to_string(),
            vcpus: 1,
            memory_mib: 3072,
            gzip: false,
            strip_vmm: true,
            pvh: true,
            boot_timeout: Duration::from_secs(180),
            extra_cmdline: String::new(),
        }
    }
}

impl L1Options {
    /// With (`max`) or without (`max,la57=off`) 5-level paging offered to L1.
    pub fn la57(mut self, on: bool) -> Self {
        self.cpu = if on { "max" } else { "max,la57=off" }.to_string();
        self
    }
}

/// What this host's `/dev/kvm` is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKvm {
    /// No `/dev/kvm`.
    Missing,
    /// KVM with the PVM backend (`/sys/module/kvm_pvm`): guest ring 0 is emulated.
    Pvm,
    /// kvm-intel or kvm-amd is loaded: real VMX/SVM.
    Real { module: &'static str },
    /// `/dev/kvm` exists but no known backend module is loaded.
    Unknown,
}

/// Tells which KVM this host has, from `/dev/kvm`, the loaded modules in `/sys/module` and
/// the CPU flags in `/proc/cpuinfo`. PVM wins when both it and a hardware module are loaded;
/// a hardware module counts only with the `vmx`/`svm` flag (a PVM guest has neither). Inside L1
/// this says `Real { module: "kvm_amd" }`.
pub fn host_kvm() -> HostKvm {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    host_kvm_in(Path::new("/dev/kvm"), Path::new("/sys/module"), &cpuinfo)
}

fn host_kvm_in(dev: &Path, sys_module: &Path, cpuinfo: &str) -> HostKvm {
    if !dev.exists() {
        return HostKvm::Missing;
    }
    if sys_module.join("kvm_pvm").exists() {
        return HostKvm::Pvm;
    }
    let has_flag = |flag: &str| {
        cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == flag))
    };
    for (module, flag) in [("kvm_intel", "vmx"), ("kvm_amd", "svm")] {
        if sys_module.join(module).exists() && has_flag(flag) {
            return HostKvm::Real { module };
        }
    }
    HostKvm::Unknown
}

/// Where a job runs: [`Placement::Auto`] asks [`host_kvm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Auto,
    Host,
    L1,
}

impl Placement {
    /// From `$HOTPATCH_NESTED` (`auto`, `host`, `l1`; unset or empty is `auto`).
    pub fn from_env() -> Result<Placement, NestedError> {
        match std::env::var("HOTPATCH_NESTED").unwrap_or_default().trim() {
            "" | "auto" => Ok(Placement::Auto),
            "host" => Ok(Placement::Host),
            "l1" => Ok(Placement::L1),
            other => Err(NestedError::Setup(format!(
                "HOTPATCH_NESTED={other:?}: expected auto, host or l1"
            ))),
        }
    }
}

/// Where a job ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ran {
    Host,
    L1,
}

/// One console line, stamped with when the host read it (since the runner started QEMU or
/// the host job).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub at: Duration,
    pub text: String,
}

/// `NESTED-RESULT <name> <status> [detail]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    pub name: String,
    pub status: String,
    pub detail: String,
}

impl JobResult {
    /// `pass` or `ok`.
    pub fn passed(&self) -> bool {
        self.status == "pass" || self.status == "ok"
    }
}

/// Where the time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Building L1's initramfs (reading, stripping, archiving; nothing on a host run).
    pub build: Duration,
    /// From QEMU's start to L1's `/init` (firmware, kernel decompression and boot, initramfs
    /// unpacking; `None` on a host run).
    pub init: Option<Duration>,
    /// From QEMU's start to `NESTED-JOB-START` (`init` plus loading the KVM modules; zero on a
    /// host run).
    pub boot: Duration,
    /// From `NESTED-JOB-START` to `NESTED-EXIT` (`None`: the job never finished).
    pub job: Option<Duration>,
    /// Everything, build included, until QEMU or the host job exited.
    pub total: Duration,
}

/// What L1 said about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct L1Facts {
    /// dmesg had `Nested Paging enabled` (SVM with NPT).
    pub nested_paging: bool,
    /// `/dev/kvm` was there after the modules loaded.
    pub kvm: bool,
    /// The initramfs as QEMU got it.
    pub initramfs_bytes: u64,
    /// Whether `vmm` went in without its debug info.
    pub vmm_stripped: bool,
    /// Booted through the vmlinux's PVH entry ([`L1Options::pvh`]).
    pub pvh: bool,
    pub cpu: String,
    pub vcpus: usize,
}

/// A finished job. The job's own failure (`exit_code != Some(0)`, a failed result) is here, not
/// an error: [`NestedOutcome::check`] says whether it passed.
#[derive(Debug, Clone)]
pub struct NestedOutcome {
    pub name: String,
    pub ran: Ran,
    /// The whole log: L1's serial console, or the host job's stdout and stderr.
    pub lines: Vec<Line>,
    pub results: Vec<JobResult>,
    /// `NESTED-EXIT`'s code.
    pub exit_code: Option<i32>,
    pub timings: Timings,
    /// `None` on a host run.
    pub l1: Option<L1Facts>,
}

impl NestedOutcome {
    /// The log as text, one line per console line, with the host's read time.
    pub fn log(&self) -> String {
        render_log(&self.lines)
    }

    /// The lines the job printed (between `NESTED-JOB-START` and `NESTED-EXIT`), markers and
    /// any interleaved kernel messages included.
    pub fn job_lines(&self) -> Vec<&str> {
        let start = self
            .lines
            .iter()
            .position(|l| marker(&l.text, "NESTED-JOB-START").is_some())
            .map_or(0, |i| i + 1);
        self.lines[start.min(self.lines.len())..]
            .iter()
            .take_while(|l| marker(&l.text, "NESTED-EXIT").is_none())
            .map(|l| l.text.as_str())
            .collect()
    }

    pub fn result(&self, name: &str) -> Option<&JobResult> {
        self.results.iter().find(|r| r.name == name)
    }

    /// `Ok` when the job exited 0, every result passed, and each of `expected` was reported
    /// (and passed); otherwise why not.
    pub fn check(&self, expected: &[&str]) -> Result<(), String> {
        let mut why = Vec::new();
        match self.exit_code {
            Some(0) => {}
            Some(code) => why.push(format!("the job exited {code}")),
            None => why.push("the job printed no NESTED-EXIT".to_string()),
        }
        for r in self.results.iter().filter(|r| !r.passed()) {
            why.push(format!("result {} is {} {}", r.name, r.status, r.detail));
        }
        for name in expected {
            if self.result(name).is_none() {
                why.push(format!("no result {name}"));
            }
        }
        if why.is_empty() {
            Ok(())
        } else {
            Err(why.join("; "))
        }
    }

    /// One line: where it ran and the timings.
    pub fn summary(&self) -> String {
        let t = &self.timings;
        let job = t
            .job
            .map_or_else(|| "unfinished".to_string(), |d| format!("{d:.1?}"));
        let where_ = match (&self.ran, &self.l1) {
            (Ran::L1, Some(f)) => format!(
                "in L1 ({}, -cpu {}, {} vCPU, initramfs {:.1} MB{})",
                if f.pvh { "PVH vmlinux" } else { "bzImage" },
                f.cpu,
                f.vcpus,
                f.initramfs_bytes as f64 / 1e6,
                if f.vmm_stripped { ", vmm stripped" } else { "" }
            ),
            _ => "on the host".to_string(),
        };
        let init = t
            .init
            .map_or_else(String::new, |d| format!(" (/init at {d:.1?})"));
        format!(
            "nested job {} {where_}: initramfs build {:.1?}, boot to job start {:.1?}{init}, job {job}, total {:.1?}",
            self.name, t.build, t.boot, t.total
        )
    }
}

#[derive(Debug, Error)]
pub enum NestedError {
    #[error("nested tier setup: {0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("L1 did not start the job: {why}\n{log}")]
    L1Boot { why: String, log: String },
    #[error("L1 has no usable KVM: {why}\n{log}")]
    L1Kvm { why: String, log: String },
    #[error("job {job} did not finish within {timeout:?} of its start\n{log}")]
    Timeout {
        job: String,
        timeout: Duration,
        log: String,
    },
    #[error("job {job} ended without a NESTED-EXIT line ({status})\n{log}")]
    NoExit {
        job: String,
        status: String,
        log: String,
    },
    #[error("asked to run on the host, but this host's KVM is {0:?}, not kvm-intel/kvm-amd")]
    NoRealKvm(HostKvm),
}

impl NestedError {
    /// The console log the error carries, if any.
    pub fn log(&self) -> Option<&str> {
        match self {
            NestedError::L1Boot { log, .. }
            | NestedError::L1Kvm { log, .. }
            | NestedError::Timeout { log, .. }
            | NestedError::NoExit { log, .. } => Some(log),
            _ => None,
        }
    }
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NestedError {
    let what = what.into();
    move |source| NestedError::Io { what, source }
}

/// Runs `job` where there is a real SVM/VMX KVM: on this host if its KVM is kvm-intel/kvm-amd,
/// else in L1 (`kit` is only used then). `placement` overrides ([`Placement::from_env`]).
pub fn run_where_real_kvm(
    job: &NestedJob,
    placement: Placement,
    kit: impl FnOnce() -> Result<L1Kit, NestedError>,
    opts: &L1Options,
) -> Result<NestedOutcome, NestedError> {
    let on_host = match placement {
        Placement::Host => true,
        Placement::L1 => false,
        Placement::Auto => matches!(host_kvm(), HostKvm::Real { .. }),
    };
    if on_host {
        run_on_host(job)
    } else {
        run_in_l1(job, &kit()?, opts)
    }
}

/// The helper functions every job script gets (`nested_result`, `nested_check`).
fn job_prelude() -> &'static str {
    r#"nested_result() {
  echo "NESTED-RESULT $1 $2${3:+ $3}"
}
nested_check() {
  _nested_name=$1
  shift
  "$@"
  _nested_rc=$?
  if [ "$_nested_rc" = 0 ]; then
    nested_result "$_nested_name" pass
  else
    nested_result "$_nested_name" fail "exit=$_nested_rc"
  fi
  return "$_nested_rc"
}
"#
}

/// `job.sh` as written into the job directory: the helpers, then the caller's script.
fn job_script(job: &NestedJob) -> String {
    format!(
        "{}\n# --- job {} ---\n{}\n",
        job_prelude(),
        job.name,
        job.script
    )
}

/// Runs the job script in `$JOB_DIR` with markers around it (shared by host and L1).
const JOB_RUNNER: &str = r#"cd "$JOB_DIR" || exit 125
echo "NESTED-JOB-START $NESTED_JOB_NAME"
sh ./job.sh </dev/null 2>&1
echo "NESTED-EXIT $?"
"#;

/// L1's `/init`: mounts, loads the KVM modules, checks `/dev/kvm` and nested paging, runs the
/// job, powers off. Any failure before the job prints `NESTED-FAIL` and powers off at once.
fn l1_init(job: &NestedJob) -> String {
    let modules = L1_MODULES.join(" ");
    let name = shell_word(&job.name);
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "NESTED-L1 init uptime=$(cut -d' ' -f1 /proc/uptime)"
fail() {{
  echo "NESTED-FAIL $*"
  dmesg | tail -n 60
  poweroff -f
  exit 1
}}
for m in {modules}; do
  insmod /{L1_MODULE_DIR}/$m.ko || fail "insmod $m.ko failed"
done
dmesg | grep -E 'kvm|SVM' | sed 's/^/NESTED-L1 dmesg: /'
if dmesg | grep -q 'Nested Paging enabled'; then
  echo "NESTED-L1 nested-paging=yes"
else
  fail "dmesg has no 'Nested Paging enabled' (no SVM with NPT in L1: is the CPU -cpu max under TCG?)"
fi
[ -c /dev/kvm ] || fail "no /dev/kvm after loading {modules}"
echo "NESTED-L1 kvm=/dev/kvm"
export VMM=/{L1_VMM} JOB_DIR=/{L1_JOB_DIR} NESTED_WHERE=l1 NESTED_JOB_NAME={name}
export HOME=/tmp TMPDIR=/tmp
sh -c '{runner}'
poweroff -f
"#,
        runner = JOB_RUNNER.replace('\'', r"'\''"),
    )
}

/// `s` quoted for the shell.
fn shell_word(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The shared libraries `ldd` names for `binary` (the loader included), as absolute paths.
/// Empty for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, NestedError> {
    let out = Command::new("ldd")
        .arg(binary)
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running ldd (from libc-bin)"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(NestedError::Setup(format!(
            "ldd {} failed ({}): {stdout}{stderr}",
            binary.display(),
            out.status
        )));
    }
    parse_ldd(&stdout)
        .map_err(|why| NestedError::Setup(format!("ldd {}: {why}\n{stdout}", binary.display())))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)`, `/lib64/ld-linux-x86-64.so.2
        // (0x…)`, `linux-vdso.so.1 (0x…)` (in the kernel, not a file).
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(format!("{} is not found", name.trim()));
                }
                rest.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// `vmm` without its debug info, in `dir`, or `None` when objcopy is missing or fails (then
/// the binary goes in as it is).
fn stripped_copy(vmm: &Path, dir: &Path) -> Option<PathBuf> {
    let out = dir.join("vmm.stripped");
    let ok = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(vmm)
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then_some(out)
}

fn read(path: &Path) -> Result<Vec<u8>, NestedError> {
    std::fs::read(path).map_err(io_err(format!("reading {}", path.display())))
}

fn archive_err(e: std::io::Error) -> NestedError {
    NestedError::Io {
        what: "building L1's initramfs".into(),
        source: e,
    }
}

/// L1's initramfs: busybox with its applets, the KVM modules, `vmm` and its libraries, the
/// job and its files, `/init`. Returns the archive and whether `vmm` went in stripped.
pub fn build_l1_initramfs(
    job: &NestedJob,
    kit: &L1Kit,
    opts: &L1Options,
    scratch: &Path,
) -> Result<(Vec<u8>, bool), NestedError> {
    let mut a = Archive::new();
    let bb = read_static_busybox(&kit.busybox).map_err(io_err("L1's busybox"))?;
    let applets = Command::new(&kit.busybox)
        .arg("--list")
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {} --list", kit.busybox.display())))?;
    a.file("bin/busybox", 0o755, bb).map_err(archive_err)?;
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let applet = applet.trim();
        if applet.is_empty() || applet.contains('/') || applet == "busybox" {
            continue;
        }
        a.symlink(&format!("bin/{applet}"), "busybox")
            .map_err(archive_err)?;
    }
    if !a.contains("bin/sh") {
        return Err(NestedError::Setup(format!(
            "{} --list names no sh applet",
            kit.busybox.display()
        )));
    }
    a.symlink("sbin", "bin").map_err(archive_err)?;
    a.char_dev("dev/console", 0o600, 5, 1)
        .map_err(archive_err)?;
    for d in ["proc", "sys", "run"] {
        a.dir(d, 0o755).map_err(archive_err)?;
    }
    a.dir("tmp", 0o1777).map_err(archive_err)?;
    for m in L1_MODULES {
        let ko = kit.modules.join(format!("{m}.ko"));
        a.file(&format!("{L1_MODULE_DIR}/{m}.ko"), 0o644, read(&ko)?)
            .map_err(archive_err)?;
    }
    // The binary and its libraries at the paths the loader expects.
    let libs = shared_libraries(&job.vmm)?;
    let stripped = if opts.strip_vmm {
        stripped_copy(&job.vmm, scratch)
    } else {
        None
    };
    let vmm_bytes = read(stripped.as_deref().unwrap_or(&job.vmm))?;
    a.file(L1_VMM, 0o755, vmm_bytes).map_err(archive_err)?;
    for lib in libs {
        let guest = lib.to_string_lossy().into_owned();
        if !a.contains(&guest) {
            a.file(&guest, 0o755, read(&lib)?).map_err(archive_err)?;
        }
    }
    a.dir(L1_JOB_DIR, 0o755).map_err(archive_err)?;
    a.file(
        &format!("{L1_JOB_DIR}/job.sh"),
        0o755,
        job_script(job).into_bytes(),
    )
    .map_err(archive_err)?;
    for f in &job.files {
        let bytes = match &f.source {
            FileSource::Bytes(b) => b.clone(),
            FileSource::Path(p) => read(p)?,
        };
        let perm = if f.executable { 0o755 } else { 0o644 };
        a.file(&format!("{L1_JOB_DIR}/{}", f.path), perm, bytes)
            .map_err(archive_err)?;
    }
    a.file("init", 0o755, l1_init(job).into_bytes())
        .map_err(archive_err)?;
    Ok((a.finish().map_err(archive_err)?, stripped.is_some()))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>, NestedError> {
    let mut child = Command::new("gzip")
        .args(["-1", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io_err("running gzip"))?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| NestedError::Setup("gzip has no stdin".into()))?;
    let input = data.to_vec();
    let feeder = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().map_err(io_err("running gzip"))?;
    let fed = feeder
        .join()
        .map_err(|_| NestedError::Setup("the gzip feeder thread panicked".into()))?;
    fed.map_err(io_err("feeding gzip"))?;
    if !out.status.success() {
        return Err(NestedError::Setup(format!("gzip failed ({})", out.status)));
    }
    Ok(out.stdout)
}

/// The collected output of a child, with read times.
#[derive(Clone)]
struct Console {
    lines: Arc<Mutex<Vec<Line>>>,
    /// Readers still running.
    open: Arc<AtomicUsize>,
    started: Instant,
    /// Also copy each line to stderr as it arrives (`HOTPATCH_NESTED_ECHO=1`): a long job (the
    /// nested benchmarks take tens of minutes) is otherwise silent until it ends.
    echo: bool,
}

/// The environment variable that makes [`Console`] echo lines live.
pub const ECHO_ENV: &str = "HOTPATCH_NESTED_ECHO";

impl Console {
    fn new(started: Instant) -> Self {
        Console {
            lines: Arc::new(Mutex::new(Vec::new())),
            open: Arc::new(AtomicUsize::new(0)),
            started,
            echo: std::env::var_os(ECHO_ENV).is_some_and(|v| !v.is_empty() && v != "0"),
        }
    }

    fn attach(&self, stream: impl Read + Send + 'static) {
        self.open.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stream);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&buf);
                        let text = text.trim_end_matches(['\n', '\r']).to_string();
                        let at = me.started.elapsed();
                        if me.echo {
                            eprintln!("[nested {:7.2}] {text}", at.as_secs_f64());
                        }
                        lock(&me.lines).push(Line { at, text });
                    }
                }
            }
            me.open.fetch_sub(1, Ordering::SeqCst);
        });
    }

    fn snapshot(&self) -> Vec<Line> {
        lock(&self.lines).clone()
    }

    /// Waits (a little) for the readers to see end of file after the child exited.
    fn drain(&self) {
        let until = Instant::now() + Duration::from_secs(5);
        while self.open.load(Ordering::SeqCst) > 0 && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn render_log(lines: &[Line]) -> String {
    let mut s = String::new();
    for l in lines {
        let _ = writeln!(s, "[{:7.2}] {}", l.at.as_secs_f64(), l.text);
    }
    s
}

/// The text after `tag` and a space, where `tag` starts a word somewhere in `line` (a kernel
/// message can land in front of a marker on the serial console).
fn marker<'a>(line: &'a str, tag: &str) -> Option<&'a str> {
    let i = line.find(tag)?;
    let before_ok = i == 0 || line[..i].ends_with([' ', ']', '\t']);
    let rest = &line[i + tag.len()..];
    (before_ok && (rest.is_empty() || rest.starts_with(' '))).then(|| rest.trim())
}

/// What the markers in `lines` say.
#[derive(Debug, Default, PartialEq)]
struct Parsed {
    init: Option<Duration>,
    job_start: Option<Duration>,
    exit: Option<(Duration, i32)>,
    results: Vec<JobResult>,
    fail: Option<String>,
    nested_paging: bool,
    kvm: bool,
}

fn parse_markers(lines: &[Line]) -> Parsed {
    let mut p = Parsed::default();
    for l in lines {
        if let Some(rest) = marker(&l.text, "NESTED-RESULT") {
            let mut f = rest.splitn(3, ' ');
            if let (Some(name), Some(status)) = (f.next(), f.next()) {
                p.results.push(JobResult {
                    name: name.to_string(),
                    status: status.to_string(),
                    detail: f.next().unwrap_or("").trim().to_string(),
                });
            }
        } else if let Some(rest) = marker(&l.text, "NESTED-EXIT") {
            if let Ok(code) = rest.parse::<i32>()
                && p.exit.is_none()
            {
                p.exit = Some((l.at, code));
            }
        } else if marker(&l.text, "NESTED-JOB-START").is_some() {
            p.job_start.get_or_insert(l.at);
        } else if let Some(rest) = marker(&l.text, "NESTED-FAIL") {
            p.fail.get_or_insert_with(|| rest.to_string());
        } else if let Some(rest) = marker(&l.text, "NESTED-L1") {
            match rest {
                "nested-paging=yes" => p.nested_paging = true,
                "kvm=/dev/kvm" => p.kvm = true,
                r if r.starts_with("init ") => {
                    p.init.get_or_insert(l.at);
                }
                _ => {}
            }
        }
    }
    p
}

/// Kills the child's whole process group (it was started as a group leader).
fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) on the process group our own child leads; no memory is involved.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits for `child` to exit, watching the console for the job's start and end: the boot must
/// reach `NESTED-JOB-START` within `boot_timeout` (L1 only), the job `NESTED-EXIT` within its
/// own timeout. Kills the child's process group on a timeout.
fn supervise(
    child: &mut Child,
    console: &Console,
    job: &NestedJob,
    boot_timeout: Option<Duration>,
) -> Result<(ExitStatus, Vec<Line>), NestedError> {
    loop {
        let status = child
            .try_wait()
            .map_err(io_err("waiting for the nested job"))?;
        if let Some(status) = status {
            console.drain();
            return Ok((status, console.snapshot()));
        }
        let lines = console.snapshot();
        let p = parse_markers(&lines);
        let now = console.started.elapsed();
        match (p.job_start, boot_timeout) {
            (None, Some(limit)) if now > limit => {
                kill_group(child);
                console.drain();
                return Err(NestedError::L1Boot {
                    why: format!("no NESTED-JOB-START within {limit:?} of QEMU's start"),
                    log: render_log(&console.snapshot()),
                });
            }
            (Some(start), _) if p.exit.is_none() && now > start + job.timeout => {
                kill_group(child);
                console.drain();
                return Err(NestedError::Timeout {
                    job: job.name.clone(),
                    timeout: job.timeout,
                    log: render_log(&console.snapshot()),
                });
            }
            (None, None) if now > job.timeout + Duration::from_secs(10) => {
                kill_group(child);
                console.drain();
                return Err(NestedError::Timeout {
                    job: job.name.clone(),
                    timeout: job.timeout,
                    log: render_log(&console.snapshot()),
                });
            }
            _ => {}
        }
        // After NESTED-EXIT the host job ends at once and L1 powers off in a second; one that
        // hangs in poweroff is killed, and the job's result stands (the status is then moot).
        if let Some((at, _)) = p.exit
            && now > at + Duration::from_secs(30)
        {
            kill_group(child);
            console.drain();
            return Ok((ExitStatus::default(), console.snapshot()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots L1 with `job` in its initramfs and runs it there.
pub fn run_in_l1(
    job: &NestedJob,
    kit: &L1Kit,
    opts: &L1Options,
) -> Result<NestedOutcome, NestedError> {
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("vmm-nested-l1-")
        .tempdir()
        .map_err(io_err("creating a temporary directory for L1"))?;
    let (mut archive, stripped) = build_l1_initramfs(job, kit, opts, dir.path())?;
    let initrd = if opts.gzip {
        archive = gzip(&archive)?;
        dir.path().join("l1.cpio.gz")
    } else {
        dir.path().join("l1.cpio")
    };
    std::fs::write(&initrd, &archive).map_err(io_err(format!("writing {}", initrd.display())))?;
    let kernel = if opts.pvh {
        let bz = read(&kit.vmlinuz)?;
        let cache = linux_guest::image_cache::default_dir();
        let (elf, _) = linux_guest::image_cache::vmlinux(&bz, cache.as_deref()).map_err(|e| {
            NestedError::Setup(format!("the vmlinux inside {}: {e}", kit.vmlinuz.display()))
        })?;
        let path = dir.path().join("vmlinux");
        std::fs::write(&path, &elf).map_err(io_err(format!("writing {}", path.display())))?;
        path
    } else {
        kit.vmlinuz.clone()
    };
    let build = t0.elapsed();

    let mut cmdline = "console=ttyS0 panic=-1 quiet".to_string();
    if !opts.extra_cmdline.trim().is_empty() {
        cmdline.push(' ');
        cmdline.push_str(opts.extra_cmdline.trim());
    }
    let mut cmd = Command::new(&kit.qemu);
    cmd.args(["-accel", "tcg", "-cpu", &opts.cpu, "-M", "pc"])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-smp", &opts.vcpus.to_string()])
        .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(io_err(format!("starting {}", kit.qemu.display())))?;
    let console = Console::new(started);
    if let Some(out) = child.stdout.take() {
        console.attach(out);
    }
    if let Some(err) = child.stderr.take() {
        console.attach(err);
    }
    let (status, lines) = supervise(&mut child, &console, job, Some(opts.boot_timeout))?;
    let total = t0.elapsed();
    let p = parse_markers(&lines);
    let log = || render_log(&lines);
    if let Some(why) = p.fail {
        return Err(NestedError::L1Kvm { why, log: log() });
    }
    let Some(job_start) = p.job_start else {
        return Err(NestedError::L1Boot {
            why: format!("QEMU exited ({status}) before the job started"),
            log: log(),
        });
    };
    if !(p.nested_paging && p.kvm) {
        return Err(NestedError::L1Kvm {
            why: "the job started without L1 reporting nested paging and /dev/kvm".into(),
            log: log(),
        });
    }
    let Some((exit_at, code)) = p.exit else {
        return Err(NestedError::NoExit {
            job: job.name.clone(),
            status: format!("QEMU exited: {status}"),
            log: log(),
        });
    };
    Ok(NestedOutcome {
        name: job.name.clone(),
        ran: Ran::L1,
        results: p.results,
        exit_code: Some(code),
        timings: Timings {
            build,
            init: p.init,
            boot: job_start,
            job: Some(exit_at.saturating_sub(job_start)),
            total,
        },
        l1: Some(L1Facts {
            nested_paging: p.nested_paging,
            kvm: p.kvm,
            initramfs_bytes: archive.len() as u64,
            vmm_stripped: stripped,
            pvh: opts.pvh,
            cpu: opts.cpu.clone(),
            vcpus: opts.vcpus,
        }),
        lines,
    })
}

/// Runs `job` on this host (whose KVM should be real: checked unless it is unknown).
pub fn run_on_host(job: &NestedJob) -> Result<NestedOutcome, NestedError> {
    match host_kvm() {
        HostKvm::Real { .. } | HostKvm::Unknown => {}
        other => return Err(NestedError::NoRealKvm(other)),
    }
    let t0 = Instant::now();
    let dir = tempfile::Builder::new()
        .prefix("vmm-nested-host-")
        .tempdir()
        .map_err(io_err("creating the host job's directory"))?;
    let write = |rel: &str, bytes: &[u8], exec: bool| -> Result<(), NestedError> {
        let path = dir.path().join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(io_err(format!("creating {}", parent.display())))?;
        }
        std::fs::write(&path, bytes).map_err(io_err(format!("writing {}", path.display())))?;
        if exec {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(io_err(format!("chmod {}", path.display())))?;
        }
        Ok(())
    };
    write("job.sh", job_script(job).as_bytes(), true)?;
    for f in &job.files {
        if f.path.split('/').any(|c| c == ".." || c.is_empty()) || f.path.starts_with('/') {
            return Err(NestedError::Setup(format!(
                "job file path {:?} must be relative, without . or ..",
                f.path
            )));
        }
        match &f.source {
            FileSource::Bytes(b) => write(&f.path, b, f.executable)?,
            FileSource::Path(p) => write(&f.path, &read(p)?, f.executable)?,
        }
    }
    let vmm = std::fs::canonicalize(&job.vmm)
        .map_err(io_err(format!("finding {}", job.vmm.display())))?;
    let build = t0.elapsed();
    let started = Instant::now();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(JOB_RUNNER)
        .env("VMM", &vmm)
        .env("JOB_DIR", dir.path())
        .env("NESTED_WHERE", "host")
        .env("NESTED_JOB_NAME", &job.name)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(io_err("starting sh for the host job"))?;
    let console = Console::new(started);
    if let Some(out) = child.stdout.take() {
        console.attach(out);
    }
    if let Some(err) = child.stderr.take() {
        console.attach(err);
    }
    let (status, lines) = supervise(&mut child, &console, job, None)?;
    let p = parse_markers(&lines);
    let Some((exit_at, code)) = p.exit else {
        return Err(NestedError::NoExit {
            job: job.name.clone(),
            status: status.to_string(),
            log: render_log(&lines),
        });
    };
    let job_start = p.job_start.unwrap_or_default();
    Ok(NestedOutcome {
        name: job.name.clone(),
        ran: Ran::Host,
        results: p.results,
        exit_code: Some(code),
        timings: Timings {
            build,
            init: None,
            boot: Duration::ZERO,
            job: Some(exit_at.saturating_sub(job_start)),
            total: t0.elapsed(),
        },
        l1: None,
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(texts: &[&str]) -> Vec<Line> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Line {
                at: Duration::from_secs(i as u64),
                text: t.to_string(),
            })
            .collect()
    }

    #[test]
    fn markers_parse_even_behind_kernel_messages() {
        let l = lines(&[
            "NESTED-L1 init uptime=2.5",
            "NESTED-L1 nested-paging=yes",
            "NESTED-L1 kvm=/dev/kvm",
            "NESTED-JOB-START builtin",
            "hp: vcpu=0 seq=1",
            "[    9.1] kvm: Unhandled WRMSR(0xc0010007) NESTED-RESULT run pass",
            "NESTED-RESULT demo fail exit=3 and more",
            "NOT-NESTED-EXIT 4",
            "NESTED-EXIT 3",
            "NESTED-EXIT 0",
        ]);
        let p = parse_markers(&l);
        assert_eq!(p.init, Some(Duration::ZERO));
        assert_eq!(p.job_start, Some(Duration::from_secs(3)));
        assert_eq!(p.exit, Some((Duration::from_secs(8), 3)));
        assert!(p.nested_paging && p.kvm);
        assert_eq!(p.fail, None);
        assert_eq!(
            p.results,
            [
                JobResult {
                    name: "run".into(),
                    status: "pass".into(),
                    detail: String::new()
                },
                JobResult {
                    name: "demo".into(),
                    status: "fail".into(),
                    detail: "exit=3 and more".into()
                }
            ]
        );
        assert_eq!(marker("NESTED-EXITS 1", "NESTED-EXIT"), None);
        assert_eq!(marker("xNESTED-EXIT 1", "NESTED-EXIT"), None);
        let f = parse_markers(&lines(&["NESTED-FAIL insmod kvm.ko failed"]));
        assert_eq!(f.fail.as_deref(), Some("insmod kvm.ko failed"));
    }

    #[test]
    fn outcome_check_needs_exit_zero_and_every_result_passed() {
        let mut o = NestedOutcome {
            name: "j".into(),
            ran: Ran::Host,
            lines: lines(&["NESTED-JOB-START j", "hello", "NESTED-EXIT 0", "after"]),
            results: vec![JobResult {
                name: "a".into(),
                status: "pass".into(),
                detail: String::new(),
            }],
            exit_code: Some(0),
            timings: Timings::default(),
            l1: None,
        };
        assert_eq!(o.check(&["a"]), Ok(()));
        assert_eq!(o.job_lines(), ["hello"]);
        assert!(o.check(&["b"]).is_err_and(|e| e.contains("no result b")));
        o.exit_code = Some(2);
        assert!(o.check(&[]).is_err_and(|e| e.contains("exited 2")));
        o.exit_code = Some(0);
        o.results[0].status = "fail".into();
        assert!(o.check(&[]).is_err_and(|e| e.contains("result a is fail")));
        assert!(o.log().contains("[   1.00] hello"));
    }

    #[test]
    fn ldd_output_names_the_libraries_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007fff)\n\
            \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f1)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let libs = parse_ldd(text).expect("parses");
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libgcc_s.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        let missing = parse_ldd("\tlibfoo.so.1 => not found\n").expect_err("missing lib");
        assert!(missing.contains("libfoo.so.1"));
    }

    #[test]
    fn host_kvm_tells_pvm_from_hardware_kvm() {
        let t = tempfile::tempdir().expect("tempdir");
        let dev = t.path().join("kvm");
        let sys = t.path().join("module");
        std::fs::create_dir_all(&sys).expect("mkdir");
        let svm = "processor\t: 0\nflags\t\t: fpu sse2 svm npt\n";
        let plain = "processor\t: 0\nflags\t\t: fpu sse2 svm_lock\n";
        assert_eq!(host_kvm_in(&dev, &sys, svm), HostKvm::Missing);
        std::fs::write(&dev, b"").expect("fake /dev/kvm");
        assert_eq!(host_kvm_in(&dev, &sys, svm), HostKvm::Unknown);
        std::fs::create_dir(sys.join("kvm_amd")).expect("mkdir");
        assert_eq!(
            host_kvm_in(&dev, &sys, svm),
            HostKvm::Real { module: "kvm_amd" }
        );
        assert_eq!(host_kvm_in(&dev, &sys, plain), HostKvm::Unknown);
        std::fs::create_dir(sys.join("kvm_pvm")).expect("mkdir");
        assert_eq!(host_kvm_in(&dev, &sys, svm), HostKvm::Pvm);
    }

    #[test]
    fn init_loads_modules_in_order_and_quotes_the_job_name() {
        let job = NestedJob::new("it's", "true", Path::new("/bin/true"));
        let init = l1_init(&job);
        assert!(init.starts_with("#!/bin/busybox sh\n"));
        assert!(init.contains("for m in irqbypass ccp kvm kvm-amd; do"));
        assert!(init.contains(r"NESTED_JOB_NAME='it'\''s'"));
        assert!(init.contains("Nested Paging enabled"));
        assert!(init.trim_end().ends_with("poweroff -f"));
    }

    /// The host runner end to end with a job that needs no KVM: markers, results, files, the
    /// exit code and a timeout (the script runs under this host's `sh`).
    #[test]
    fn host_runner_runs_the_script_with_its_files() {
        let script = r#"
nested_check has-file test -s data/hello.txt
nested_check reads-it grep -q world data/hello.txt
nested_result where "$NESTED_WHERE"
./tool.sh
exit 7
"#;
        let job = NestedJob::new("local", script, Path::new("/bin/true"))
            .bytes("data/hello.txt", b"hello world\n".to_vec(), false)
            .bytes("tool.sh", b"#!/bin/sh\necho tool ran\n".to_vec(), true);
        let (lines, child) = run_host_script(&job);
        let p = parse_markers(&lines);
        assert!(child.is_ok(), "{}", render_log(&lines));
        assert_eq!(p.exit.map(|e| e.1), Some(7), "{}", render_log(&lines));
        let names: Vec<(&str, &str)> = p
            .results
            .iter()
            .map(|r| (r.name.as_str(), r.status.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("has-file", "pass"),
                ("reads-it", "pass"),
                ("where", "host")
            ]
        );
        assert!(lines.iter().any(|l| l.text == "tool ran"));

        let slow = NestedJob::new("slow", "sleep 30", Path::new("/bin/true"))
            .timeout(Duration::from_millis(300));
        let (_, r) = run_host_script(&slow);
        assert!(matches!(r, Err(NestedError::Timeout { .. })), "{r:?}");
    }

    /// The body of [`run_on_host`] without its KVM check, for the unit tests.
    fn run_host_script(job: &NestedJob) -> (Vec<Line>, Result<(), NestedError>) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("job.sh"), job_script(job)).expect("job.sh");
        for f in &job.files {
            let FileSource::Bytes(b) = &f.source else {
                panic!("bytes only here")
            };
            let p = dir.path().join(&f.path);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            std::fs::write(&p, b).expect("write");
            if f.executable {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod");
            }
        }
        let started = Instant::now();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(JOB_RUNNER)
            .env("VMM", "/bin/true")
            .env("JOB_DIR", dir.path())
            .env("NESTED_WHERE", "host")
            .env("NESTED_JOB_NAME", &job.name)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("sh");
        let console = Console::new(started);
        console.attach(child.stdout.take().expect("stdout"));
        console.attach(child.stderr.take().expect("stderr"));
        match supervise(&mut child, &console, job, None) {
            Ok((_, lines)) => (lines, Ok(())),
            Err(e) => (console.snapshot(), Err(e)),
        }
    }
}
