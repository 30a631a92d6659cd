//! `vmm demo-linux`: the Linux flow in one command. Boots the stock Debian kernel under QEMU
//! (TCG unless told otherwise: this machine's KVM emulates guest ring-0 code) with a busybox
//! init printing `/proc/version` every 100 ms, builds a fix for `version_proc_show` from C,
//! signs it, applies it through the QEMU backend (KASLR slide from the IDT, arena mapped into
//! the kernel), shows the guest's output change, reverts, shows it return. No agent in the
//! guest, no reboot.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use patch_format::{Metadata, SecretKey};
use serde::Serialize;

use crate::qemu_launch::{LaunchOptions, QemuProcess};
use linux_guest::attach::KernelImage;
use linux_guest::patch::{KernelFix, build_kernel_patch};
use patch_engine::EngineConfig;
use qemu_backend::QemuGuest;

/// Guest-physical memory the kernel is told not to use (`memmap=2M$…`): the patch arena.
pub const ARENA_GPA: u64 = 0x1000_0000;

/// One line of the guest's workload: `hpl: seq=N uptime=SECS version=…`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadLine {
    /// 1, 2, 3, ... one per line: a gap means lost console output, a restart means a reboot.
    pub seq: u64,
    /// The guest's `/proc/uptime` (seconds since its boot).
    pub uptime: f64,
    /// What `/proc/version` (the kernel's `version_proc_show`) printed.
    pub version: String,
}

pub fn parse_workload_line(line: &str) -> Option<WorkloadLine> {
    let rest = &line[line.find("hpl: seq=")? + "hpl: seq=".len()..];
    let (seq, rest) = rest.split_once(" uptime=")?;
    let (uptime, version) = rest.split_once(" version=")?;
    Some(WorkloadLine {
        seq: seq.parse().ok()?,
        uptime: uptime.parse().ok()?,
        version: version.trim_end().to_string(),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct LinuxDemoReport {
    pub accel: &'static str,
    pub kernel: String,
    pub kaslr_slide: String,
    pub patch_id: String,
    pub before: WorkloadLine,
    pub after: WorkloadLine,
    pub after_revert: WorkloadLine,
    pub apply_blackout_us: u64,
    pub revert_blackout_us: u64,
    /// From the apply command to the first patched line the guest printed.
    pub visible_after_ms: u64,
}

fn lines(q: &QemuProcess) -> Vec<WorkloadLine> {
    q.console_lines()
        .iter()
        .filter_map(|l| parse_workload_line(l))
        .collect()
}

fn wait(
    q: &mut QemuProcess,
    after_seq: u64,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&WorkloadLine) -> bool,
) -> anyhow::Result<WorkloadLine> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = lines(q).into_iter().find(|l| l.seq > after_seq && pred(l)) {
            return Ok(l);
        }
        if !q.running() {
            anyhow::bail!("QEMU exited while waiting for {what}");
        }
        if Instant::now() > deadline {
            let tail: Vec<String> = q.console_lines().into_iter().rev().take(5).collect();
            anyhow::bail!("no {what} within {timeout:?}; console ends with: {tail:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Boots `kernel` under QEMU with the workload initramfs and the arena reserved, on one vCPU
/// of QEMU's default CPU model.
pub fn boot(
    dir: &Path,
    kernel: &Path,
    busybox: &Path,
    accel: &'static str,
) -> anyhow::Result<QemuProcess> {
    boot_on(dir, kernel, busybox, accel, 1, None)
}

/// [`boot`] on `vcpus` vCPUs of CPU model `cpu` (`None`: QEMU's default): what a measurement
/// per machine shape needs (`vmm bench coverage`).
pub fn boot_on(
    dir: &Path,
    kernel: &Path,
    busybox: &Path,
    accel: &'static str,
    vcpus: usize,
    cpu: Option<&str>,
) -> anyhow::Result<QemuProcess> {
    let initrd = dir.join("initramfs.cpio");
    std::fs::write(
        &initrd,
        guest_tools::initramfs::build(busybox, guest_tools::initramfs::InitMode::Workload)?,
    )?;
    Ok(QemuProcess::spawn(&LaunchOptions {
        kernel: kernel.to_path_buf(),
        initrd: Some(initrd),
        append: format!("console=ttyS0 panic=-1 memmap=2M${ARENA_GPA:#x}"),
        memory_mib: 512,
        vcpus,
        cpu: cpu.map(str::to_string),
        accel,
        gdb: true,
        dir: dir.join("qemu"),
    })?)
}

/// One signed patch replacing each of `functions` of `image` with a bare `ret`: what the
/// benchmarks and tests use for a patch of several functions whose effect the guest does not
/// need (`/proc/cmdline`'s and `/proc/meminfo`'s show functions print nothing then).
pub fn ret_replacements(
    image: &KernelImage,
    key: &SecretKey,
    functions: &[&str],
) -> anyhow::Result<Vec<u8>> {
    let info = linux_guest::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    let mut sites = Vec::new();
    for function in functions {
        let sym = info
            .symbols
            .iter()
            .find(|s| s.name == *function)
            .ok_or_else(|| anyhow::anyhow!("the kernel has no function {function}"))?;
        let expected = linux_guest::patch::file_bytes(&image.vmlinux, sym.addr, sym.size as usize)
            .ok_or_else(|| anyhow::anyhow!("{function}'s bytes are not in the vmlinux"))?;
        sites.push(patch_format::Site {
            kind: patch_format::SiteKind::Function,
            target: patch_format::Location::Symbol {
                name: (*function).into(),
                offset: 0,
            },
            expected: expected.to_vec(),
            code: vec![0xc3],
            relocations: Vec::new(),
        });
    }
    let mut p = patch_format::Patch {
        meta: Metadata {
            name: format!("{}-ret", functions.join("+")),
            created: 1,
            ..Default::default()
        },
        target: info.identity,
        sites,
        data: Vec::new(),
    };
    p.normalize();
    Ok(p.to_file_signed(key)?)
}

/// The `version_proc_show` fix, compiled from C in `dir`, built against `image`, signed.
pub fn version_fix(
    dir: &Path,
    image: &KernelImage,
    key: &SecretKey,
) -> anyhow::Result<(patch_format::Patch, Vec<u8>)> {
    let object =
        guest_tools::kernel_patch::compile(guest_tools::kernel_patch::VERSION_PROC_SHOW_C, dir)?;
    let (code, function) = guest_tools::kernel_patch::VERSION_PROC_SHOW_FIX;
    let patch = build_kernel_patch(
        &image.vmlinux,
        &image.kallsyms,
        &std::fs::read(&object)?,
        &[KernelFix::new(function, code)],
        Metadata {
            name: "demo-version-tag".into(),
            description: "Tags /proc/version (version_proc_show replaced by C code)".into(),
            author: "vmm demo-linux".into(),
            created: 1_767_225_600,
            advisories: Vec::new(),
            replaces: Vec::new(),
        },
    )?;
    let file = patch.to_file_signed(key)?;
    Ok((patch, file))
}

/// An engine over the kernel `image` running under QEMU (`guest`), its arena at [`ARENA_GPA`]:
/// the caller composes "Linux under QEMU" from the backend (IDT base) and the Linux layer.
pub fn engine(
    guest: Arc<QemuGuest>,
    image: &KernelImage,
    config: EngineConfig,
    state_dir: &Path,
) -> anyhow::Result<patch_engine::Engine<QemuGuest>> {
    let idt = guest.idt_base()?;
    Ok(linux_guest::engine::engine_for_kernel(
        guest,
        idt,
        image,
        ARENA_GPA,
        linux_guest::engine::over_gdbstub(config),
        Some(state_dir),
    )?)
}

/// Waits for the guest's first workload line (the kernel booted to its init).
pub fn wait_booted(q: &mut QemuProcess) -> anyhow::Result<WorkloadLine> {
    wait(q, 0, "the workload", Duration::from_secs(120), |_| true)
}

/// Runs the demo; `say` narrates (the CLI prints it, `--json` silences it).
pub fn run(
    kernel: &Path,
    busybox: &Path,
    accel: &'static str,
    say: &dyn Fn(String),
) -> anyhow::Result<LinuxDemoReport> {
    let dir = tempfile::Builder::new()
        .prefix("vmm-demo-linux-")
        .tempdir()?;
    let result = run_in(dir.path(), kernel, busybox, accel, say);
    drop(dir);
    result
}

fn run_in(
    dir: &Path,
    kernel: &Path,
    busybox: &Path,
    accel: &'static str,
    say: &dyn Fn(String),
) -> anyhow::Result<LinuxDemoReport> {
    let image = KernelImage::from_file(kernel)?;
    say(format!("kernel: {}", image.banner.trim_end()));
    let mut q = boot(dir, kernel, busybox, accel)?;
    say(format!(
        "booted it under QEMU ({accel}, KASLR on); the guest prints /proc/version every 100 ms:"
    ));
    let before = wait_booted(&mut q)?;
    say(format!(
        "  seq {} uptime {:.2}s: {}",
        before.seq, before.uptime, before.version
    ));

    // The operator's side: the fix, from C, signed.
    let key = SecretKey::generate()?;
    let (patch, file) = version_fix(dir, &image, &key)?;
    let function = guest_tools::kernel_patch::VERSION_PROC_SHOW_FIX.1;
    say(format!(
        "built a fix for {function} from C ({} bytes of code, {} relocations resolved at apply time), signed it",
        patch.sites[0].code.len(),
        patch.sites[0].relocations.len()
    ));

    let guest = Arc::new(q.attach()?);
    let config = EngineConfig {
        trusted_keys: vec![key.public()],
        ..Default::default()
    };
    let mut engine = engine(guest, &image, config, &dir.join("state"))?;
    let slide = engine.target().slide;
    let seq = lines(&q).last().map_or(0, |l| l.seq);
    let t = Instant::now();
    let applied = engine.apply(&file)?;
    let apply_blackout_us = applied.patch.apply_blackout_us.unwrap_or(0);
    say(format!(
        "applied {} through QEMU's gdbstub (KASLR slide {slide:#x}; blackout {apply_blackout_us} µs)",
        &applied.patch.id[..16]
    ));
    let tag = guest_tools::kernel_patch::VERSION_PROC_SHOW_TAG;
    let after = wait(
        &mut q,
        seq,
        "the patched output",
        Duration::from_secs(60),
        |l| l.version.contains(tag),
    )?;
    let visible_after_ms = t.elapsed().as_millis() as u64;
    say(format!(
        "  seq {} uptime {:.2}s: {}",
        after.seq, after.uptime, after.version
    ));

    let seq = lines(&q).last().map_or(0, |l| l.seq);
    let reverted = engine.revert(&applied.patch.id)?;
    let revert_blackout_us = reverted.revert_blackout_us.unwrap_or(0);
    say(format!("reverted it (blackout {revert_blackout_us} µs)"));
    let after_revert = wait(
        &mut q,
        seq,
        "the original output",
        Duration::from_secs(60),
        |l| l.version == before.version,
    )?;
    say(format!(
        "  seq {} uptime {:.2}s: {}",
        after_revert.seq, after_revert.uptime, after_revert.version
    ));
    let all = lines(&q);
    let continuous = all
        .windows(2)
        .all(|w| w[1].seq == w[0].seq + 1 && w[1].uptime >= w[0].uptime);
    if !continuous {
        anyhow::bail!(
            "the workload's sequence numbers or uptime did not continue: the guest restarted?"
        );
    }
    say(format!(
        "no reboot: {} consecutive workload lines, uptime {:.2}s → {:.2}s",
        all.len(),
        before.uptime,
        after_revert.uptime
    ));
    drop(engine);
    Ok(LinuxDemoReport {
        accel,
        kernel: image.banner.trim_end().to_string(),
        kaslr_slide: format!("{slide:#x}"),
        patch_id: applied.patch.id,
        before,
        after,
        after_revert,
        apply_blackout_us,
        revert_blackout_us,
        visible_after_ms,
    })
}
