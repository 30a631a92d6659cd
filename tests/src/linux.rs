//! The Linux guest kit for tests: the stock Debian kernel booted under QEMU with the busybox
//! initramfs of [`guest_tools::initramfs`].
//!
//! QEMU runs it with **TCG**: on the dev/CI machines `/dev/kvm` is a software nested backend that
//! emulates every guest ring-0 instruction (~3000x slower than TCG for a kernel, and it gives up
//! on some; `/work/shared/design/qemu-linux-notes.md` section 0). `HOTPATCH_QEMU_ACCEL=kvm`
//! overrides this on a machine with real VT-x/AMD-V.
//!
//! - [`Kit::ensure`] runs `scripts/linux-kit` once per process: QEMU, busybox-static and the
//!   kernel's `boot/` files, fetched only when missing.
//! - [`LinuxGuest::boot`] starts QEMU with a gdbstub on a free local port (unless
//!   [`BootOptions::gdb`] is off, as on an operator's VM) and a QMP socket, and collects the
//!   serial console line by line while it runs.
//! - [`proc_kallsyms`] is the guest's own `/proc/kallsyms` of a `nokaslr` boot (the package's
//!   System.map is a stub), cached next to the kernel.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use guest_tools::initramfs::{self, InitMode};

use crate::TempDir;

/// Where the kit is on this machine, as `scripts/linux-kit` reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    /// The stock kernel, a bzImage (`<kit dir>/<version>/vmlinuz-<version>`).
    pub vmlinuz: PathBuf,
    /// The host's static busybox (`/bin/busybox` from busybox-static).
    pub busybox: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The kernel release, e.g. `6.1.0-56-amd64`: what `/proc/version` and `uname -r` show.
    pub version: String,
    /// The kernel's build configuration (`config-<version>`).
    pub config: PathBuf,
    /// The KVM modules of that kernel the nested tier's L1 loads (`irqbypass.ko`, `ccp.ko`,
    /// `kvm.ko`, `kvm-amd.ko`).
    pub modules: PathBuf,
}

impl Kit {
    /// Makes sure the kit is there (installing or fetching what is missing) and says where it
    /// is. The script runs once per test process; later calls return the same answer.
    ///
    /// Panics with the script's output if it fails: the Linux tests cannot run without the kit,
    /// and they must say so rather than pass.
    pub fn ensure() -> Kit {
        static KIT: OnceLock<Kit> = OnceLock::new();
        KIT.get_or_init(|| run_kit_script(None)).clone()
    }

    /// [`Kit::ensure`] for one pinned kernel package, e.g. `6.1.0-54-amd64` (an older build,
    /// for fixes taken from a later one: `HOTPATCH_LINUX_VERSION`).
    pub fn ensure_version(version: &str) -> Kit {
        static KITS: Mutex<BTreeMap<String, Kit>> = Mutex::new(BTreeMap::new());
        let mut kits = lock(&KITS);
        kits.entry(version.to_string())
            .or_insert_with(|| run_kit_script(Some(version)))
            .clone()
    }
}

fn run_kit_script(version: Option<&str>) -> Kit {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/linux-kit");
    let started = Instant::now();
    let mut cmd = Command::new(&script);
    if let Some(v) = version {
        cmd.env("HOTPATCH_LINUX_VERSION", v);
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} failed ({}): the Linux guest tests need QEMU, busybox-static and the Debian kernel\n\
         stdout:\n{stdout}\nstderr:\n{stderr}",
        script.display(),
        out.status
    );
    if !stderr.trim().is_empty() {
        eprint!("{stderr}");
    }
    let kv: HashMap<&str, &str> = stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let get = |key: &str| -> String {
        match kv.get(key) {
            Some(v) if !v.is_empty() => v.to_string(),
            _ => panic!(
                "{} printed no `{key}=` line\nstdout:\n{stdout}\nstderr:\n{stderr}",
                script.display()
            ),
        }
    };
    let kit = Kit {
        vmlinuz: PathBuf::from(get("vmlinuz")),
        busybox: PathBuf::from(get("busybox")),
        qemu: PathBuf::from(get("qemu")),
        version: get("version"),
        config: PathBuf::from(get("config")),
        modules: PathBuf::from(get("modules")),
    };
    for p in [
        &kit.vmlinuz,
        &kit.busybox,
        &kit.qemu,
        &kit.config,
        &kit.modules,
    ] {
        assert!(
            p.exists(),
            "{} reported {}, which does not exist",
            script.display(),
            p.display()
        );
    }
    eprintln!(
        "linux kit: kernel {} ({}), ready in {:.1?}",
        kit.version,
        kit.vmlinuz.display(),
        started.elapsed()
    );
    kit
}

/// How to boot the guest.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// Leave the bzImage's KASLR on (the stock default). Off adds `nokaslr`, so the kernel lands
    /// at its link addresses (`_text` = 0xffffffff81000000).
    pub kaslr: bool,
    /// What `/init` does.
    pub mode: InitMode,
    pub vcpus: usize,
    pub memory_mib: u64,
    /// Appended to the kernel command line.
    pub extra_cmdline: String,
    /// QEMU's `-cpu` model (`max` offers LA57, so the kernel runs on 5-level paging); QEMU's
    /// default when `None`.
    pub cpu: Option<&'static str>,
    /// Start QEMU with a gdbstub (`-gdb tcp:127.0.0.1:PORT`). Off, only QMP is offered, as by
    /// a VM an operator started: the backend then starts a gdbstub through QMP.
    pub gdb: bool,
    /// With [`InitMode::Probe`]: the probe script and the files (static programs) added to the
    /// initramfs ([`initramfs::build_probe`]).
    pub probe: Option<Probe>,
}

/// [`BootOptions::probe`]: the probe script, and the files (path in the initramfs, bytes).
pub type Probe = (String, Vec<(String, Vec<u8>)>);

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            kaslr: true,
            mode: InitMode::Workload,
            vcpus: 1,
            memory_mib: 512,
            extra_cmdline: String::new(),
            cpu: None,
            gdb: true,
            probe: None,
        }
    }
}

/// One line of the workload (`hpl: seq=<n> uptime=<s> version=<the /proc/version line>`), as
/// the demo parses it.
pub use vmm_tools::demo_linux::{WorkloadLine, parse_workload_line};

/// A running QEMU with the stock kernel. Dropping it kills QEMU and removes its files.
pub struct LinuxGuest {
    child: Mutex<Child>,
    /// Holds the initramfs and the QMP socket; removed on drop.
    _dir: TempDir,
    /// `None`: started without a gdbstub.
    gdb_port: Option<u16>,
    qmp: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
    /// Set by the console reader when QEMU's stdout closed: QEMU has exited.
    console_closed: Arc<AtomicBool>,
    stderr: Arc<Mutex<String>>,
    started: Instant,
}

/// The accelerator QEMU runs the guest with: TCG unless `HOTPATCH_QEMU_ACCEL` says otherwise.
fn accelerator() -> String {
    std::env::var("HOTPATCH_QEMU_ACCEL")
        .ok()
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "tcg".to_string())
}

impl LinuxGuest {
    /// Builds the initramfs, starts QEMU and returns once QEMU is listening on its gdbstub port
    /// and QMP socket (the kernel is then still booting: wait for console lines).
    ///
    /// The serial console is QEMU's stdout, read by a thread, so lines are visible as soon as the
    /// guest prints them. Panics, with QEMU's stderr, if QEMU does not start.
    pub fn boot(kit: &Kit, opts: &BootOptions) -> LinuxGuest {
        let archive = match (&opts.probe, opts.mode) {
            (Some((script, files)), InitMode::Probe) => {
                initramfs::build_probe(&kit.busybox, script, files)
            }
            (None, InitMode::Probe) => panic!("InitMode::Probe needs BootOptions::probe"),
            _ => initramfs::build(&kit.busybox, opts.mode),
        }
        .unwrap_or_else(|e| panic!("building the initramfs: {e}"));
        let mut cmdline = vec!["console=ttyS0", "panic=-1"];
        if !opts.kaslr {
            cmdline.push("nokaslr");
        }
        let mode_arg = format!("hpl.mode={}", opts.mode.name());
        if opts.mode != InitMode::Workload {
            cmdline.push(&mode_arg);
        }
        if !opts.extra_cmdline.trim().is_empty() {
            cmdline.push(opts.extra_cmdline.trim());
        }
        let cmdline = cmdline.join(" ");
        let accel = accelerator();

        // The gdb port is picked by binding port 0 and releasing it, so another process can take
        // it before QEMU binds: then QEMU exits at once and we retry with a new port.
        let mut failures = Vec::new();
        for _attempt in 0..5 {
            let dir = TempDir::new("linux");
            let initrd = dir.path().join("initramfs.cpio");
            std::fs::write(&initrd, &archive)
                .unwrap_or_else(|e| panic!("writing {}: {e}", initrd.display()));
            let qmp = dir.path().join("qmp.sock");
            let gdb_port = opts.gdb.then(free_port);
            let mut cmd = Command::new(&kit.qemu);
            cmd.args(["-M", "pc", "-accel", &accel]);
            if let Some(cpu) = opts.cpu {
                cmd.args(["-cpu", cpu]);
            }
            cmd.args(["-m", &opts.memory_mib.to_string()])
                .args(["-smp", &opts.vcpus.to_string()])
                .args(["-nodefaults", "-display", "none", "-serial", "stdio"])
                .arg("-kernel")
                .arg(&kit.vmlinuz)
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", &cmdline])
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", qmp.display()))
                .arg("-no-reboot")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            if let Some(port) = gdb_port {
                cmd.args(["-gdb", &format!("tcp:127.0.0.1:{port}")]);
            }
            let started = Instant::now();
            let mut child = cmd
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", kit.qemu.display()));
            let lines = Arc::new(Mutex::new(Vec::new()));
            let console_closed = Arc::new(AtomicBool::new(false));
            let stderr = Arc::new(Mutex::new(String::new()));
            if let Some(out) = child.stdout.take() {
                let (lines, closed) = (lines.clone(), console_closed.clone());
                std::thread::spawn(move || read_console(out, &lines, &closed));
            }
            if let Some(mut err) = child.stderr.take() {
                let stderr = stderr.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = err.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        lock(&stderr).push_str(&String::from_utf8_lossy(&buf[..n]));
                    }
                });
            }
            let guest = LinuxGuest {
                child: Mutex::new(child),
                _dir: dir,
                gdb_port,
                qmp,
                lines,
                console_closed,
                stderr,
                started,
            };
            match guest.wait_listening(Duration::from_secs(20)) {
                Ok(()) => {
                    eprintln!(
                        "linux guest: qemu -accel {accel}, {} vCPU, {} MiB, gdb {}, append \"{cmdline}\"",
                        opts.vcpus,
                        opts.memory_mib,
                        gdb_port.map_or("none".to_string(), |p| format!("127.0.0.1:{p}"))
                    );
                    return guest;
                }
                Err(why) => {
                    // QEMU 7.2: "-gdb tcp:…: Failed to find an available port: Address already in use".
                    let port_taken = why.contains("QEMU exited") && why.contains("already in use");
                    failures.push(why);
                    if !port_taken {
                        break;
                    }
                }
            }
        }
        panic!("QEMU did not start:\n{}", failures.join("\n---\n"));
    }

    /// Waits until QEMU listens on the gdb port (if any) and the QMP socket, or fails with why
    /// not.
    fn wait_listening(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.qmp.exists() && self.gdb_port.is_none_or(tcp_listening) {
                return Ok(());
            }
            if let Some(status) = self.try_wait() {
                // Give the stderr reader a moment to collect QEMU's last words.
                std::thread::sleep(Duration::from_millis(100));
                return Err(format!(
                    "QEMU exited ({status}) at start:\n{}",
                    lock(&self.stderr)
                ));
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "QEMU was not listening on gdb port {:?} and {} after {timeout:?}:\n{}",
                    self.gdb_port,
                    self.qmp.display(),
                    lock(&self.stderr)
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The gdbstub address, `127.0.0.1:PORT`. QEMU 7.2 stops the VM when a client connects.
    /// Panics on a guest booted without a gdbstub ([`BootOptions::gdb`] off).
    pub fn gdb_addr(&self) -> String {
        let port = self
            .gdb_port
            .expect("this guest was booted without a gdbstub (BootOptions::gdb off)");
        format!("127.0.0.1:{port}")
    }

    /// The QMP Unix socket (the greeting and `qmp_capabilities` come first, as always).
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    /// The console lines so far, without their `\r\n`.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.lines).clone()
    }

    /// The workload lines so far, in console order.
    pub fn workload_lines(&self) -> Vec<WorkloadLine> {
        lock(&self.lines)
            .iter()
            .filter_map(|l| parse_workload_line(l))
            .collect()
    }

    /// The first console line (since boot, not only new ones) for which `pred` holds, waiting
    /// for it up to `timeout`. Panics with the console tail on timeout or if QEMU exits first.
    pub fn wait_for_line(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        let mut checked = 0;
        loop {
            // Read the flag before the lines: once it is set the reader has pushed everything.
            let closed = self.console_closed.load(Ordering::SeqCst);
            {
                let lines = lock(&self.lines);
                if let Some(l) = lines[checked..].iter().find(|l| pred(l)) {
                    return l.clone();
                }
                checked = lines.len();
            }
            if closed {
                let status = self
                    .try_wait()
                    .map_or_else(|| "console closed".to_string(), |s| s.to_string());
                panic!(
                    "QEMU exited ({status}) before the awaited console line, {:.1?} after start\n{}",
                    self.started.elapsed(),
                    self.tail()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "no awaited console line within {timeout:?} ({:.1?} after start)\n{}",
                    self.started.elapsed(),
                    self.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for QEMU to exit (the guest powered off, or panicked: `-no-reboot`), killing it
    /// and panicking with the console tail after `timeout`. Returns once the console is drained.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                let drain = Instant::now() + Duration::from_secs(5);
                while !self.console_closed.load(Ordering::SeqCst) && Instant::now() < drain {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return status;
            }
            if Instant::now() >= deadline {
                let _ = lock(&self.child).kill();
                panic!("QEMU did not exit within {timeout:?}\n{}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_wait(&self) -> Option<ExitStatus> {
        lock(&self.child).try_wait().ok().flatten()
    }

    /// The last console lines and QEMU's stderr, for panic messages.
    fn tail(&self) -> String {
        let lines = lock(&self.lines);
        let from = lines.len().saturating_sub(40);
        format!(
            "--- console (last {} of {} lines) ---\n{}\n--- qemu stderr ---\n{}",
            lines.len() - from,
            lines.len(),
            lines[from..].join("\n"),
            lock(&self.stderr)
        )
    }
}

impl Drop for LinuxGuest {
    fn drop(&mut self) {
        let mut child = lock(&self.child);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

/// Locks, ignoring poisoning: a panicking test thread must not hide the console from the next
/// panic message.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Collects console lines (`\r\n`-terminated by the guest's tty) until QEMU closes stdout.
fn read_console(out: impl Read, lines: &Mutex<Vec<String>>, closed: &AtomicBool) {
    let mut r = BufReader::new(out);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match r.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                let line = text.trim_end_matches(['\n', '\r']);
                lock(lines).push(line.to_string());
            }
        }
    }
    closed.store(true, Ordering::SeqCst);
}

/// A local TCP port nobody listened on a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to pick a port");
    l.local_addr().expect("local_addr").port()
}

/// Whether some socket listens on 127.0.0.1:`port` or *:`port` (from /proc/net/tcp, so without
/// connecting: a connection to QEMU's gdbstub would stop the VM).
fn tcp_listening(port: u16) -> bool {
    const TCP_LISTEN: &str = "0A";
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let wanted = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let (Some(_sl), Some(local), Some(_remote), Some(state)) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return false;
        };
        local.ends_with(&wanted) && state == TCP_LISTEN
    })
}

/// The guest's `/proc/kallsyms` (`addr type name [module]` per line) from a `nokaslr` boot of
/// the kit's kernel: addresses are the link-time ones, valid for any `nokaslr` boot (and for a
/// direct vmlinux/PVH boot) of this exact kernel. The package's System.map is only a stub.
///
/// Boots once (~15 s under TCG) and caches the text in the kernel's kit directory (keyed by
/// the kernel version), so later calls, in this process or another, are instant.
/// The arguments of `vmm patch build --linux-kernel` for a compiled C fix, as an operator types
/// them: `fix` is the (replacement code symbol, kernel function) pair, `key` the signing key,
/// `out` the patch file. Callers append `--name`, `--replaces` and the like.
pub fn kernel_fix_build_args(
    kit: &Kit,
    object: &Path,
    fix: (&str, &str),
    key: &str,
    out: &str,
) -> Vec<String> {
    let (code, function) = fix;
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    [
        "patch",
        "build",
        "--linux-kernel",
        &path(&kit.vmlinuz),
        "--object",
        &path(object),
        "--replace",
        &format!("{function}={code}"),
        "--key",
        key,
        "-o",
        out,
    ]
    .iter()
    .map(|a| a.to_string())
    .collect()
}

pub fn proc_kallsyms(kit: &Kit) -> String {
    // One boot even when several tests of a process ask at once.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _guard = lock(&ONE_AT_A_TIME);
    let cache_dir = kit.vmlinuz.parent().unwrap_or(Path::new("."));
    let cache = cache_dir.join(format!("kallsyms-{}-nokaslr.txt", kit.version));
    if let Ok(text) = std::fs::read_to_string(&cache)
        && !text.is_empty()
    {
        return text;
    }
    let started = Instant::now();
    let opts = BootOptions {
        kaslr: false,
        mode: InitMode::Kallsyms,
        ..BootOptions::default()
    };
    let mut guest = LinuxGuest::boot(kit, &opts);
    let status = guest.wait_exit(Duration::from_secs(180));
    let lines = guest.lines();
    let begin = lines
        .iter()
        .position(|l| l.ends_with("hpl: kallsyms-begin"));
    let end = lines.iter().position(|l| l.ends_with("hpl: kallsyms-end"));
    let (Some(begin), Some(end)) = (begin, end) else {
        panic!(
            "the kallsyms boot ({status}) printed no complete kallsyms-begin/end block\n{}",
            guest.tail()
        );
    };
    let mut text = String::new();
    let mut skipped = Vec::new();
    for l in &lines[begin + 1..end] {
        if is_kallsyms_line(l) {
            text.push_str(l);
            text.push('\n');
        } else {
            skipped.push(l.as_str());
        }
    }
    if !skipped.is_empty() {
        // Kernel messages (errors only, at the init's console level) can land in the dump.
        eprintln!(
            "proc_kallsyms: skipped {} non-symbol console lines, first: {:?}",
            skipped.len(),
            skipped[0]
        );
    }
    assert!(
        !text.is_empty(),
        "the guest printed an empty /proc/kallsyms"
    );
    let tmp = cache.with_extension(format!("tmp{}", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, &text).and_then(|()| std::fs::rename(&tmp, &cache)) {
        eprintln!("proc_kallsyms: cannot cache in {}: {e}", cache.display());
        let _ = std::fs::remove_file(&tmp);
    }
    eprintln!(
        "proc_kallsyms: {} symbols from a {:.1?} boot, cached in {}",
        text.lines().count(),
        started.elapsed(),
        cache.display()
    );
    text
}

/// `ffffffff81000000 T _text` or `ffffffffc0123456 t foo\t[module]`.
fn is_kallsyms_line(l: &str) -> bool {
    let mut f = l.split_whitespace();
    let (Some(addr), Some(kind), Some(name)) = (f.next(), f.next(), f.next()) else {
        return false;
    };
    addr.len() == 16
        && addr.bytes().all(|b| b.is_ascii_hexdigit())
        && kind.len() == 1
        && !name.is_empty()
        && f.next()
            .is_none_or(|m| m.starts_with('[') && m.ends_with(']'))
}

/// The kernel tests read without booting: `$HOTPATCH_VMLINUZ` if set, else the kit's (fetched by
/// `scripts/linux-kit` when missing, so these tests never pass without a kernel).
pub fn vmlinuz_path() -> PathBuf {
    if let Some(p) = std::env::var_os("HOTPATCH_VMLINUZ") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "HOTPATCH_VMLINUZ={} does not exist",
            p.display()
        );
        return p;
    }
    Kit::ensure().vmlinuz
}

/// The real upstream fixes the source-diff tests build (`guest-tools/linux/fixes/`).
pub fn fixes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-tools/linux/fixes")
}

/// Where `vmm patch build --source-diff` fetches and prepares the kernel's source for the
/// tests: the workspace's target directory, so a second run reuses it and a fresh clone
/// starts clean.
pub fn source_cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/linux-source")
}

/// The arguments of `vmm patch build --source-diff` for `diff` against the kit's kernel,
/// signed with `key`, into `out`.
pub fn source_fix_build_args(kit: &Kit, diff: &Path, key: &str, out: &str) -> Vec<String> {
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_string();
    vec![
        "patch".into(),
        "build".into(),
        "--linux-kernel".into(),
        path(&kit.vmlinuz),
        "--source-diff".into(),
        path(diff),
        "--source-cache".into(),
        path(&source_cache()),
        "--key".into(),
        key.into(),
        "-o".into(),
        out.into(),
    ]
}

/// `gcc -static -O2` of a fix's guest test program (`guest-tools/linux/fixes/tests/NAME.c`)
/// into `dir`; its bytes.
pub fn compile_fix_program(name: &str, dir: &Path) -> Vec<u8> {
    compile_guest_program(&fixes_dir().join("tests").join(format!("{name}.c")), dir)
}

/// `gcc -static -O2` of a guest program (`guest-tools/linux/programs/NAME.c`) into `dir`;
/// its bytes.
pub fn compile_program(name: &str, dir: &Path) -> Vec<u8> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../guest-tools/linux/programs")
        .join(format!("{name}.c"));
    compile_guest_program(&src, dir)
}

/// `gcc -static -O2` of the C file `src` into `dir`; the program's bytes.
fn compile_guest_program(src: &Path, dir: &Path) -> Vec<u8> {
    let name = src.file_stem().expect("a file name");
    let out = dir.join(name);
    let r = Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(&out)
        .arg(src)
        .output()
        .expect("run gcc");
    assert!(
        r.status.success(),
        "gcc -static {}: {}",
        src.display(),
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::read(&out).expect("read program")
}

impl LinuxGuest {
    /// `vmm patch VERB…` for this guest through the QEMU backend, as an operator types it:
    /// its gdbstub and QMP socket, the kernel it booted, the arena reserved at `arena`, the
    /// journal in `state_dir`, patches signed by the public key `trusted_key`.
    pub fn patch_args(
        &self,
        verb: &[&str],
        vmlinuz: &Path,
        arena: u64,
        state_dir: &str,
        trusted_key: &str,
    ) -> Vec<String> {
        let mut v: Vec<String> = ["patch"]
            .iter()
            .chain(verb)
            .map(|s| s.to_string())
            .collect();
        v.extend(
            [
                "--qemu-gdb",
                &self.gdb_addr(),
                "--qmp",
                self.qmp_path().to_str().expect("utf-8 path"),
                "--linux-kernel",
                vmlinuz.to_str().expect("utf-8 path"),
                "--arena",
                &format!("{arena:#x}"),
                "--state-dir",
                state_dir,
                "--trusted-key",
                trusted_key,
            ]
            .map(str::to_string),
        );
        v
    }

    /// The first workload line after `after_seq` that satisfies `pred`, waiting up to
    /// `within`; panics with the last console lines if none comes.
    pub fn wait_workload(
        &self,
        after_seq: u64,
        what: &str,
        within: Duration,
        pred: impl Fn(&WorkloadLine) -> bool,
    ) -> WorkloadLine {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self
                .workload_lines()
                .into_iter()
                .find(|l| l.seq > after_seq && pred(l))
            {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within {within:?}; last lines:\n{}",
                self.lines()
                    .iter()
                    .rev()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_lines_parse() {
        let w = parse_workload_line(
            "hpl: seq=12 uptime=3.45 version=Linux version 6.1.0-56-amd64 (x@y) #1 SMP",
        )
        .expect("parses");
        assert_eq!(w.seq, 12);
        assert_eq!(w.uptime, 3.45);
        assert_eq!(w.version, "Linux version 6.1.0-56-amd64 (x@y) #1 SMP");
        assert_eq!(parse_workload_line("hpl: init uptime=1.0"), None);
        assert_eq!(parse_workload_line("hpl: seq=x uptime=1 version=v"), None);
        assert_eq!(parse_workload_line("[    1.0] random noise"), None);
    }

    #[test]
    fn kallsyms_lines_are_recognised() {
        assert!(is_kallsyms_line("ffffffff81000000 T _text"));
        assert!(is_kallsyms_line("ffffffffc0a01000 t foo\t[ext4]"));
        assert!(!is_kallsyms_line("hpl: kallsyms-end"));
        assert!(!is_kallsyms_line("[    5.1] EXT4-fs error"));
        assert!(!is_kallsyms_line("ffffffff81000000 T"));
    }

    #[test]
    fn listening_ports_are_seen_without_connecting() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(tcp_listening(port));
        drop(l);
        assert!(!tcp_listening(port));
    }
}
