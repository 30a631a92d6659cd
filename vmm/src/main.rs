//! The `vmm` command: run a guest, control it through its API socket, build hot patches.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use control_api::client::ApiClient;
use control_api::server::{ApiContext, ApiServer, EngineSlot};
use kvm_vmm::boot::Image;
use kvm_vmm::devices::StopReason;
use kvm_vmm::vm::{ConsoleSink, Vm, VmConfig};
use vmm_tools::bench;

/// How long a Linux guest may take to boot before the VMM gives up attaching patching to it
/// (generous: under nested emulation a boot takes a minute or more).
const LINUX_ATTACH_DEADLINE: Duration = Duration::from_secs(900);

mod console;
mod exit;
mod integrity_cli;
mod linux_vm;
mod patch_cli;

#[derive(Parser, Debug)]
#[command(
    name = "vmm",
    version,
    about = "A KVM VMM that hot-patches the code of running guests from outside",
    after_help = exit::HELP
)]
struct Cli {
    /// Log filter (tracing env-filter syntax), e.g. `info`, `vmm=debug`. Without it, RUST_LOG
    /// is used, else `warn`; an explicit --log wins over RUST_LOG.
    #[arg(long, global = true, value_name = "FILTER")]
    log: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest and run it until it powers off (exit status = the guest's).
    Run(RunArgs),
    /// Pause every vCPU of a running VM (through its API socket).
    Pause(PauseArgs),
    /// Resume a paused VM.
    Resume(StatusArgs),
    /// Show a VM's state, vCPUs and guest reports.
    Status(StatusArgs),
    /// Print a VM's metrics as JSON (GET /v1/metrics): pause/resume latency, the patch engine's
    /// counters and blackout summaries (with `apply_engine_us`, its own in-blackout work),
    /// code integrity counters.
    Metrics(SockArgs),
    /// Show a VM's code integrity (mode, protected ranges, slots, violations); protect more code.
    Integrity(integrity_cli::IntegrityArgs),
    /// Build, sign, verify and inspect hot-patch files.
    #[command(subcommand)]
    Patch(patch_cli::PatchCommand),
    /// Boot the built-in guest, hot-patch it with the embedded signed sample, revert, show it all.
    Demo(DemoArgs),
    /// The Linux flow: boot the stock kernel under QEMU, patch a kernel function from C while
    /// it runs, show its output change, revert (scripts/linux-demo fetches what it needs).
    DemoLinux(DemoLinuxArgs),
    /// Benchmarks (used by scripts/bench).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// vCPUs of the demo guest.
    #[arg(long, default_value_t = 2)]
    vcpus: usize,
    /// Print one JSON object at the end instead of the narration.
    #[arg(long)]
    json: bool,
    /// Write the sample patch (sample.hpatch) and the demo public key (demo.pub) to this
    /// directory and exit, to try the flow by hand with `vmm run` + `vmm patch apply` or curl.
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DemoLinuxArgs {
    /// The kernel bzImage (scripts/linux-kit prints its path).
    #[arg(long)]
    kernel: PathBuf,
    /// A static busybox for the initramfs.
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// QEMU accelerator: tcg (here: this machine's KVM emulates guest ring-0 code) or kvm.
    #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
    accel: String,
    /// Print one JSON object at the end instead of the narration.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest image: a Linux bzImage (x86 boot protocol, 64-bit entry, KASLR by its own
    /// decompressor; see --vmm-decompress) or an x86-64 ELF (PVH note → 32-bit PVH entry,
    /// otherwise 64-bit entry). Without it, the built-in test guest runs.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// An initrd (initramfs) for a Linux kernel: placed at the top of RAM below 4 GiB and
    /// handed over in the zero page (bzImage) or as a PVH module (vmlinux).
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: usize,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Kernel command line (for Linux e.g. "console=ttyS0"; a Linux kernel also gets
    /// "pci=off" unless this has a pci= option: there is no PCI bus; the test guest understands
    /// reports=N, batch=N, cpus=N, mode=normal|probe|spin|tamper, spin=N, writes=N; see
    /// docs/guest-protocol.md).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Serve the control API on this Unix socket (created mode 0600).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Accept patches signed by this public key (from `vmm patch keygen`). Repeatable.
    #[arg(long = "trusted-key", value_name = "PUB")]
    trusted_keys: Vec<PathBuf>,
    /// Accept unsigned patches too. Development only: anyone who can reach the socket could
    /// then change the guest's code.
    #[arg(long)]
    allow_unsigned: bool,
    /// Keep the patch journal here, so `vmm patch list` survives a restart and an interrupted
    /// apply is repaired or reported.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Code integrity: `off` maps guest memory as it is; `enforce` maps the guest's code
    /// (the image's executable segments, the patch arena, --code-range) read-only to the
    /// guest, so its writes there are dropped and reported; `audit` reports them and lets them
    /// land. The patch engine writes code in every mode.
    #[arg(long, value_enum, default_value_t = kvm_vmm::integrity::Mode::Off)]
    code_integrity: kvm_vmm::integrity::Mode,
    /// One more guest-physical range to protect, START-END or START+LENGTH (hex with 0x, or
    /// decimal), rounded out to pages. Repeatable. For images whose code the VMM cannot see.
    #[arg(long = "code-range", value_name = "RANGE", value_parser = parse_code_range)]
    code_ranges: Vec<(u64, u64)>,
    /// A raw disk image the guest sees as a virtio-blk device (virtio-MMIO): FILE for a
    /// read-write disk (opened O_RDWR), FILE,ro for a read-only one. Repeatable, up to 8
    /// (/dev/vda, /dev/vdb, ... in order). FILE must be a regular file whose size is a non-zero
    /// multiple of 512 bytes. A Linux guest finds them in the ACPI DSDT (LNRO0005 devices);
    /// see docs/devices.md.
    #[arg(long = "disk", value_name = "FILE[,ro]", value_parser = parse_disk)]
    disks: Vec<kvm_vmm::devices::virtio::DiskConfig>,
    /// Experimental: the VMM decompresses the bzImage (from its image cache) and places and
    /// relocates the kernel at random itself, KASLR as the decompressor does, so the guest
    /// skips its decompressor (several seconds of a nested boot). Not the default yet: in the
    /// nested tier 8 of ~60 such boots triple-faulted, unexplained; 66 later boots did not
    /// (docs/linux-guests.md).
    #[arg(long, requires = "kernel")]
    vmm_decompress: bool,
    /// With --vmm-decompress: draw KASLR's placement from this seed instead of /dev/urandom
    /// (reproducing a boot).
    #[arg(long, value_name = "N", hide = true, requires = "vmm_decompress")]
    kaslr_seed: Option<u64>,
    /// KVM device to use.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    kvm_device: PathBuf,
}

#[derive(Args, Debug)]
struct SockArgs {
    /// The VM's API socket (`vmm run --api-sock PATH`).
    #[arg(long)]
    api_sock: PathBuf,
}

#[derive(Args, Debug)]
struct StatusArgs {
    #[command(flatten)]
    sock: SockArgs,
    /// Print the VMM's JSON answer instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct PauseArgs {
    #[command(flatten)]
    status: StatusArgs,
    /// Release the vCPUs at once (one request): prints the blackout, the patching floor.
    #[arg(long)]
    and_resume: bool,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Pause/resume cycles on the built-in guest: park latency and blackout (the patching floor).
    Pause {
        /// vCPU counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        vcpus: Vec<usize>,
        /// Pause/resume cycles per vCPU count.
        #[arg(long, default_value_t = 1000)]
        cycles: usize,
        /// Microseconds the guest runs between cycles.
        #[arg(long, default_value_t = 500)]
        gap_us: u64,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Hot-patch blackout against the pause/resume floor (measured in the same run), API
    /// end-to-end latency, and a patch storm the guest checks result by result.
    Patch(BenchPatchArgs),
    /// `vmm bench patch` where KVM has real SVM/VMX semantics: inside the nested tier's L1
    /// (QEMU TCG -cpu max with kvm-amd) here, directly on a host whose KVM is kvm-intel/amd.
    PatchL1 {
        #[command(flatten)]
        l1: L1KitArgs,
        /// vCPU counts to measure, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        vcpus: Vec<usize>,
        /// Cycles per vCPU count (see `vmm bench patch --help`).
        #[arg(long, default_value_t = 300)]
        cycles: usize,
        /// Apply/revert cycles of the guest-checked storm (0: none).
        #[arg(long, default_value_t = 2000)]
        storm: usize,
        #[arg(long, default_value_t = 2)]
        storm_vcpus: usize,
        /// L1's vCPUs (at least the largest guest's, so each has a CPU of its own).
        #[arg(long, default_value_t = 2)]
        l1_vcpus: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The same patch on the same test guest through this VMM and through the QEMU backend
    /// (QEMU -enable-kvm), with QMP stop→cont and gdbstub halt→continue as the peer floors.
    Qemu {
        /// Apply/revert cycles per path (and floor samples).
        #[arg(long, default_value_t = 200)]
        cycles: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The C fix of `version_proc_show` applied to and reverted from the stock kernel under
    /// QEMU (TCG by default), against the QEMU backend's pause → resume floor.
    Linux {
        /// The kernel bzImage (scripts/linux-kit prints its path).
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
        accel: String,
        #[arg(long, default_value_t = 100)]
        cycles: usize,
        /// A signed fix of version_proc_show built beforehand (with --trusted-key), instead of
        /// building it here from C (which needs gcc).
        #[arg(long, requires = "trusted_key")]
        patch: Option<PathBuf>,
        /// The public key that verifies --patch.
        #[arg(long = "trusted-key", value_name = "PUB", requires = "patch")]
        trusted_key: Option<PathBuf>,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The stock kernel in this VMM vs QEMU -enable-kvm on the same real SVM/VMX KVM (inside
    /// the nested tier's L1 here): boot to the init workload, the kernel fix's apply/revert
    /// blackout against each floor, the workload with code integrity enforce vs off.
    LinuxVmm {
        #[command(flatten)]
        l1: L1KitArgs,
        /// Boots of each VMM to time.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Apply/revert cycles (and floor samples) on each side.
        #[arg(long, default_value_t = 20)]
        cycles: usize,
        /// Run only these parts (repeatable; default all). The first boot's kernel log on each
        /// side is in the JSON.
        #[arg(long = "only", value_enum, value_name = "PART")]
        only: Vec<bench::linux_vmm::Part>,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Source-diff coverage of a real update: every .c file that differs between the running
    /// Debian kernel's source and a later version's, built as one fix on the prepared tree;
    /// each changed built-in function patchable or why not (target >= 85%); build times,
    /// and with --cold the first build with an empty cache (docs/source-patches.md).
    SourceDiff {
        /// The running (older) kernel's bzImage.
        #[arg(long)]
        kernel: PathBuf,
        /// The later Debian version of linux-source to compare with (e.g. 6.1.192-1).
        #[arg(long)]
        new_version: String,
        /// Where sources are fetched and prepared (default: as `vmm patch build`).
        #[arg(long)]
        source_cache: Option<PathBuf>,
        /// Compile at most this many units (for a quick look).
        #[arg(long)]
        max_units: Option<usize>,
        /// Build only the changed files listed in FILE (one path per line, as in the JSON's
        /// `units`), e.g. to measure again the units of one refusal class.
        #[arg(long, value_name = "FILE")]
        only_units: Option<PathBuf>,
        /// A file that compiles only with the update's changes to the headers it includes is
        /// tried again with them: first only the header lines bringing names its change uses,
        /// then the headers whose diff changes no type definition, then all. A header change
        /// that does more than declare new names must reach at most this many built-in units
        /// (each is compiled too).
        #[arg(long, default_value_t = 8)]
        header_units: usize,
        /// Also time the first build of this fix with an empty cache (fetch, unpack, prepare).
        #[arg(long, value_name = "FIX.patch")]
        cold: Option<PathBuf>,
        /// Units built at once, each on its own copy of the prepared tree (~1.5 GB each).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Function-replacement coverage of the stock kernel under QEMU: for every named text
    /// function, whether the engine would accept replacing it (a dry run: every check of an
    /// apply, nothing written), per boot (vCPUs × CPU model), every refusal classed by the
    /// mechanism behind it, accepted ones audited; target ≥ 95% accepted, 0 unsafe, 0 unnamed.
    Coverage {
        /// The kernel bzImage (scripts/linux-kit prints its path).
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long, default_value = "/bin/busybox")]
        busybox: PathBuf,
        #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
        accel: String,
        /// vCPU counts to boot with, comma-separated (one boot per count and CPU model).
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        vcpus: Vec<usize>,
        /// QEMU CPU models, comma-separated: `default` (qemu64) or `max` (LA57 under TCG).
        #[arg(long, value_delimiter = ',', default_value = "default", value_parser = ["default", "max"])]
        cpu: Vec<String>,
        /// Seconds one boot's sweep may take: past it, every k-th function is swept (the
        /// report says which k). 0: sweep everything however long it takes.
        #[arg(long, default_value_t = 600)]
        max_sweep_s: u64,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Code integrity: the workload's call rate with `--code-integrity enforce` and `off`, and
    /// the cost of one trapped guest write (off, audit, enforce).
    Integrity {
        /// Rounds of (off, enforce) call-rate runs, alternating the order.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Seconds measured per run.
        #[arg(long, default_value_t = 3.0)]
        window_s: f64,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The cost of a patched call: the workload's call rate with `mix` unpatched, replaced by
    /// a byte-identical copy through a near `jmp rel32`, and through a far `jmp [rip]`
    /// (target: near ≤ 1% slower).
    Call {
        /// Rounds of (unpatched, near, far) runs on one guest, the order reversed every other
        /// round.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Seconds measured per run.
        #[arg(long, default_value_t = 2.0)]
        window_s: f64,
        /// Write the results as JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// What the nested tier's L1 boots (the benchmarks that run there).
#[derive(Args, Debug)]
struct L1KitArgs {
    /// The kernel bzImage, which L1 and its guests boot (scripts/linux-kit prints its path as
    /// vmlinuz=).
    #[arg(long)]
    kernel: PathBuf,
    /// The KVM modules of that kernel for L1 (scripts/linux-kit's modules=).
    #[arg(long)]
    modules: PathBuf,
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    #[arg(long, default_value = "/usr/bin/qemu-system-x86_64")]
    qemu: PathBuf,
}

impl From<L1KitArgs> for vmm_tools::nested::L1Kit {
    fn from(a: L1KitArgs) -> Self {
        vmm_tools::nested::L1Kit {
            qemu: a.qemu,
            vmlinuz: a.kernel,
            modules: a.modules,
            busybox: a.busybox,
        }
    }
}

#[derive(Args, Debug)]
struct BenchPatchArgs {
    /// vCPU counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    vcpus: Vec<usize>,
    /// Cycles per vCPU count; each cycle = pause/resume, apply+revert of the 1-site and of
    /// the 16-site patch, and apply+revert of the 1-site patch through the API.
    #[arg(long, default_value_t = 1000)]
    cycles: usize,
    /// Microseconds the guest runs after each operation of a cycle.
    #[arg(long, default_value_t = 500)]
    gap_us: u64,
    /// Apply/revert cycles of the v1 → v2 sample in the patch storm (0: no storm).
    #[arg(long, default_value_t = 100_000)]
    storm: usize,
    /// vCPUs of the storm's guest.
    #[arg(long, default_value_t = 2)]
    storm_vcpus: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_disk(text: &str) -> Result<kvm_vmm::devices::virtio::DiskConfig, String> {
    kvm_vmm::devices::virtio::DiskConfig::parse(text).map_err(|e| e.to_string())
}

fn parse_code_range(text: &str) -> Result<(u64, u64), String> {
    kvm_vmm::integrity::ranges::parse(text).map_err(|e| e.to_string())
}

static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_terminate(signum: libc::c_int, _info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    SIGNALLED.store(signum, Ordering::SeqCst);
}

/// Makes SIGINT and SIGTERM request a clean stop (the main loop polls [`SIGNALLED`]).
fn install_terminate_handlers() -> Result<()> {
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        // The handler only stores to an atomic, which is async-signal-safe.
        vmm_sys_util::signal::register_signal_handler(sig, on_terminate)
            .with_context(|| format!("installing the {name} handler"))?;
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let image = match &args.kernel {
        Some(path) => Image::from_file(path)?,
        None => Image {
            name: "built-in test guest (v1)".into(),
            bytes: guest_tools::test_guest(guest_tools::GuestBuild::V1).into(),
        },
    };
    let initrd = match &args.initrd {
        Some(path) => Some(Image::from_file(path)?),
        None => None,
    };
    let trusted = patch_engine::keys::read_keys(&args.trusted_keys)?;
    let image_name = image.name.clone();
    let image_bytes = image.bytes.clone();
    // With --vmm-decompress, a bzImage's decompressed kernel, from the image cache (decompressed
    // and stored there the first time): the VMM loads it and the guest skips its decompressor
    // (docs/linux-guests.md).
    let started = std::time::Instant::now();
    let decompressed = if kvm_vmm::boot::is_bzimage(&image_bytes) && args.vmm_decompress {
        match linux_guest::image_cache::vmlinux(
            &image_bytes,
            linux_guest::image_cache::default_dir().as_deref(),
        ) {
            Ok((vmlinux, source)) => {
                tracing::debug!(
                    ?source,
                    bytes = vmlinux.len(),
                    us = started.elapsed().as_micros() as u64,
                    "decompressed kernel"
                );
                Some((vmlinux, source == linux_guest::image_cache::Source::Cache))
            }
            Err(e) => {
                tracing::info!(
                    error = %e,
                    "the VMM cannot decompress this bzImage; its own decompressor runs in the guest"
                );
                None
            }
        }
    } else {
        None
    };
    let patching_requested =
        args.state_dir.is_some() || !args.trusted_keys.is_empty() || args.allow_unsigned;
    // The boot takes the decompressed kernel; patching keeps its own copy only when it is on.
    let (boot_vmlinux, patch_vmlinux) = match decompressed {
        Some((v, from_cache)) if patching_requested => (Some(v.clone()), Some((v, from_cache))),
        Some((v, _)) => (Some(v), None),
        None => (None, None),
    };
    let config = VmConfig {
        vcpus: args.vcpus,
        memory_mib: args.memory,
        image,
        initrd,
        cmdline: args.cmdline,
        kvm_device: args.kvm_device,
        console: ConsoleSink::Stdout,
        keep_console: false,
        code_integrity: args.code_integrity,
        code_ranges: args.code_ranges,
        disks: args.disks,
        decompressed: boot_vmlinux,
        kaslr_seed: args.kaslr_seed,
    };
    install_terminate_handlers()?;
    let engine_config = patch_engine::EngineConfig {
        trusted_keys: trusted,
        allow_unsigned: args.allow_unsigned,
        ..Default::default()
    };
    let linux = kvm_vmm::boot::is_linux_image(&image_bytes);
    // A Linux kernel's symbols, tables and banner, read before the VM starts so a bad image
    // fails here and not after boot (from the image cache when it holds them).
    let kernel_image = match (&args.kernel, linux && patching_requested, patch_vmlinux) {
        (Some(path), true, Some((vmlinux, from_cache))) => Some(
            linux_guest::attach::KernelImage::from_vmlinux(path, vmlinux, from_cache)?,
        ),
        (Some(path), true, None) => Some(linux_guest::attach::KernelImage::from_file(path)?),
        _ => None,
    };
    let vm = Vm::start(config)?;
    // The terminal goes raw only once the VM runs; the guard restores it on every way out.
    let _console = console::forward_stdin(vm.clone());
    let engine = if let Some(image) = kernel_image {
        let slot = EngineSlot::attaching("the Linux kernel to finish booting");
        linux_vm::attach_when_booted(
            vm.clone(),
            image,
            engine_config,
            args.state_dir.clone(),
            slot.clone(),
            LINUX_ATTACH_DEADLINE,
        )
        .context("starting the thread that attaches patching to the kernel")?;
        slot
    } else if linux {
        EngineSlot::disabled()
    } else {
        match vmm_tools::sample::engine_for(
            vm.clone(),
            &image_name,
            &image_bytes,
            engine_config,
            args.state_dir.as_deref(),
        ) {
            Ok(e) => EngineSlot::ready(std::sync::Arc::new(
                patch_engine::shared::SharedEngine::new(e),
            )),
            Err(e) => {
                if patching_requested {
                    vm.request_stop(StopReason::Requested("patching could not start".into()));
                    vm.join();
                    return Err(e.into());
                }
                let e = anyhow::Error::new(e);
                tracing::warn!(
                    error = exit::render(&e),
                    "hot patching is unavailable for this image"
                );
                EngineSlot::disabled()
            }
        }
    };
    let _api = match &args.api_sock {
        Some(path) => Some(ApiServer::start(
            path,
            ApiContext {
                vm: vm.clone(),
                engine,
            },
        )?),
        None => None,
    };
    let reason = loop {
        if let Some(reason) = vm.wait_timeout(Duration::from_millis(100)) {
            break reason;
        }
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            vm.request_stop(StopReason::Requested(format!("received signal {sig}")));
        }
    };
    vm.join();
    match reason {
        StopReason::PoweredOff(status) => {
            tracing::info!(status, "guest powered off");
            Ok(ExitCode::from(status.min(255) as u8))
        }
        StopReason::Rebooted => {
            eprintln!("vmm: {}", StopReason::Rebooted);
            Ok(ExitCode::SUCCESS)
        }
        StopReason::Requested(why) => {
            eprintln!("vmm: stopped: {why}");
            let sig = SIGNALLED.load(Ordering::SeqCst);
            Ok(ExitCode::from(if sig != 0 {
                (128 + sig).min(255) as u8
            } else {
                0
            }))
        }
        other => {
            eprintln!("vmm: {other}");
            Ok(ExitCode::from(1))
        }
    }
}

fn print_json(v: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `vmm pause` / `vmm resume`.
fn pause_resume(args: StatusArgs, pause: bool) -> Result<()> {
    let client = ApiClient::new(&args.sock.api_sock);
    let v = if pause {
        client.pause()?
    } else {
        client.resume()?
    };
    if args.json {
        return print_json(&v);
    }
    let field = |k: &str| match v.get(k) {
        None | Some(serde_json::Value::Null) => "-".to_string(),
        Some(x) => x.to_string().trim_matches('"').to_string(),
    };
    if pause {
        let vcpus = v
            .get("vcpus")
            .and_then(serde_json::Value::as_array)
            .map_or(0, Vec::len);
        println!("paused {vcpus} vCPU(s) in {} µs", field("park_us"));
    } else {
        println!("resumed after a blackout of {} µs", field("blackout_us"));
    }
    Ok(())
}

/// `vmm pause --and-resume`.
fn pause_and_resume(args: StatusArgs) -> Result<()> {
    let v = ApiClient::new(&args.sock.api_sock).pause_resume()?;
    if args.json {
        return print_json(&v);
    }
    let field = |k: &str| v.get(k).map_or("-".to_string(), |x| x.to_string());
    println!(
        "paused in {} µs and resumed: blackout {} µs",
        field("park_us"),
        field("blackout_us")
    );
    Ok(())
}

fn status(args: StatusArgs) -> Result<()> {
    let v = ApiClient::new(&args.sock.api_sock).status()?;
    if args.json {
        return print_json(&v);
    }
    let s = |k: &str| match v.get(k) {
        None | Some(serde_json::Value::Null) => "-".to_string(),
        Some(x) => x.to_string().trim_matches('"').to_string(),
    };
    println!(
        "state {}  vcpus {}  memory {} MiB  uptime {} ms  pauses {}  last park {} µs  last blackout {} µs",
        s("state"),
        s("vcpus"),
        s("memory_mib"),
        s("uptime_ms"),
        s("pauses"),
        s("last_park_us"),
        s("last_blackout_us")
    );
    for cpu in v
        .get("vcpu")
        .and_then(|x| x.as_array())
        .into_iter()
        .flatten()
    {
        let r = cpu.pointer("/reports/last");
        let g = |p: &str| {
            r.and_then(|r| r.pointer(p))
                .map(|x| x.to_string())
                .unwrap_or_else(|| "-".into())
        };
        let rip = cpu
            .pointer("/regs/rip")
            .and_then(|x| x.as_str())
            .unwrap_or("-");
        println!(
            "  vcpu {} {:<8} rip {:<18} seq {} calls {} v1 {} v2 {} bad {}",
            cpu.get("id").map(|x| x.to_string()).unwrap_or_default(),
            cpu.get("phase").and_then(|x| x.as_str()).unwrap_or("?"),
            rip,
            g("/seq"),
            g("/calls"),
            g("/v1"),
            g("/v2"),
            g("/bad")
        );
    }
    Ok(())
}

fn demo(args: DemoArgs) -> Result<ExitCode> {
    if let Some(dir) = args.export {
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, bytes) in [
            ("sample.hpatch", vmm_tools::sample::SAMPLE_PATCH),
            ("demo.pub", vmm_tools::sample::DEMO_PUBLIC_KEY.as_bytes()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    install_terminate_handlers()?;
    let report = vmm_tools::demo::run(args.vcpus, args.json)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_pause(vcpus: Vec<usize>, cycles: usize, gap_us: u64, out: Option<PathBuf>) -> Result<()> {
    let mut runs = Vec::new();
    for n in vcpus {
        eprintln!("bench: {n} vCPU(s), {cycles} pause/resume cycles…");
        runs.push(bench::pause_resume(
            n,
            cycles,
            Duration::from_micros(gap_us),
        )?);
    }
    print!("{}", bench::pause_table(&runs));
    if let Some(path) = out {
        write_json(
            &path,
            &serde_json::json!({ "benchmark": "pause", "runs": runs }),
        )?;
    }
    Ok(())
}

fn bench_integrity(rounds: usize, window_s: f64, out: Option<PathBuf>) -> Result<ExitCode> {
    let host = bench::host_info();
    eprintln!(
        "bench: code integrity, {rounds} rounds of off/enforce call rate, then trapped-write cost…"
    );
    let window = Duration::try_from_secs_f64(window_s)
        .context("--window-s must be a positive number of seconds")?;
    let mut report = bench::integrity::run(rounds.max(1), window, host)?;
    report.host.loadavg_after = bench::loadavg();
    print!("{}", bench::integrity::table(&report));
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn bench_call(rounds: usize, window_s: f64, out: Option<PathBuf>) -> Result<()> {
    let host = bench::host_info();
    eprintln!(
        "bench: patched call cost, {rounds} rounds of unpatched / near jmp rel32 / far jmp [rip] call rate…"
    );
    let window = Duration::try_from_secs_f64(window_s)
        .context("--window-s must be a positive number of seconds")?;
    let mut report = bench::call_cost::run(rounds.max(1), window, host)?;
    report.host.loadavg_after = bench::loadavg();
    print!("{}", bench::call_cost::table(&report));
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    // The target is reported, not asserted: a wrong result or a wrong jump is an error above.
    Ok(())
}

fn bench_qemu(cycles: usize, out: Option<PathBuf>) -> Result<ExitCode> {
    let host = bench::host_info();
    eprintln!("bench: {cycles} apply/revert cycles through this VMM and through QEMU…");
    let mut report = bench::qemu::run(cycles.max(1), host)?;
    report.host.loadavg_after = bench::loadavg();
    print!("{}", bench::qemu::table(&report));
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn demo_linux(args: DemoLinuxArgs) -> Result<ExitCode> {
    let accel: &'static str = if args.accel == "kvm" { "kvm" } else { "tcg" };
    let json = args.json;
    let say = move |line: String| {
        if !json {
            println!("{line}");
        }
    };
    let report = vmm_tools::demo_linux::run(&args.kernel, &args.busybox, accel, &say)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_linux(
    kernel: &std::path::Path,
    busybox: &std::path::Path,
    accel: &str,
    cycles: usize,
    prebuilt: Option<(PathBuf, PathBuf)>,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    let accel: &'static str = if accel == "kvm" { "kvm" } else { "tcg" };
    eprintln!("bench: {cycles} apply/revert cycles of a kernel fix on the stock kernel ({accel})…");
    let prebuilt = match prebuilt {
        Some((patch, key)) => Some(bench::linux::Prebuilt {
            file: std::fs::read(&patch).with_context(|| format!("reading {}", patch.display()))?,
            key: patch_format::PublicKey::from_file_text(
                &std::fs::read_to_string(&key)
                    .with_context(|| format!("reading {}", key.display()))?,
            )
            .with_context(|| format!("{} is not a public key file", key.display()))?,
        }),
        None => None,
    };
    let mut report = bench::linux::run(
        kernel,
        busybox,
        accel,
        cycles.max(1),
        prebuilt,
        bench::host_info(),
    )?;
    report.host.loadavg_after = bench::loadavg();
    print!("{}", bench::linux::table(&report));
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_linux_vmm(
    kit: vmm_tools::nested::L1Kit,
    rounds: usize,
    cycles: usize,
    only: Vec<bench::linux_vmm::Part>,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    eprintln!(
        "bench: the stock kernel in this VMM vs QEMU -enable-kvm on the same KVM (nested: minutes)…"
    );
    let vmm = std::env::current_exe().context("finding this vmm binary")?;
    let mut report = bench::linux_vmm::run(
        &kit,
        &vmm,
        rounds.max(1),
        cycles.max(1),
        if only.is_empty() {
            &bench::linux_vmm::Part::ALL
        } else {
            &only
        },
        bench::host_info(),
    )?;
    report.host.loadavg_after = bench::loadavg();
    print!("{}", bench::linux_vmm::table(&report));
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn bench_patch_l1(
    kit: vmm_tools::nested::L1Kit,
    args: bench::patch_l1::PatchL1Args,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    eprintln!(
        "bench: vmm bench patch on a real SVM/VMX KVM ({} cycles per vCPU count, storm {}; nested: tens of minutes)…",
        args.cycles, args.storm
    );
    let vmm = std::env::current_exe().context("finding this vmm binary")?;
    let mut report = bench::patch_l1::run(&kit, &vmm, &args, bench::host_info())?;
    report.host.loadavg_after = bench::loadavg();
    println!("{}", report.nested);
    print!("{}", report.table);
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn bench_source_diff(
    kernel: &std::path::Path,
    new_version: &str,
    source_cache: Option<PathBuf>,
    max_units: Option<usize>,
    only_units: Option<PathBuf>,
    header_units: usize,
    cold: Option<&std::path::Path>,
    jobs: usize,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    let cache = source_cache
        .or_else(source_diff::tree::default_cache_dir)
        .context("no cache directory: give --source-cache DIR")?;
    let only = match only_units {
        Some(f) => Some(
            std::fs::read_to_string(&f)
                .with_context(|| format!("reading --only-units {}", f.display()))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>(),
        ),
        None => None,
    };
    let mut report = bench::source_diff::run(
        kernel,
        new_version,
        &cache,
        max_units,
        only.as_deref(),
        header_units,
        cold,
        jobs,
        bench::host_info(),
    )?;
    report.host.loadavg_after = bench::loadavg();
    print!("{}", bench::source_diff::table(&report));
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
fn bench_coverage(
    kernel: &std::path::Path,
    busybox: &std::path::Path,
    accel: &str,
    vcpus: &[usize],
    cpus: &[String],
    max_sweep_s: u64,
    out: Option<PathBuf>,
) -> Result<ExitCode> {
    use bench::coverage::{BootShape, CpuModel};
    let accel: &'static str = if accel == "kvm" { "kvm" } else { "tcg" };
    let mut shapes = Vec::new();
    for c in cpus {
        let cpu = CpuModel::parse(c).with_context(|| format!("unknown CPU model {c}"))?;
        for &n in vcpus {
            anyhow::ensure!(n >= 1, "a boot needs at least one vCPU");
            shapes.push(BootShape { vcpus: n, cpu });
        }
    }
    let budget = (max_sweep_s > 0).then(|| Duration::from_secs(max_sweep_s));
    eprintln!(
        "bench: function-replacement coverage of the stock kernel ({accel}), {} boot(s)…",
        shapes.len()
    );
    let mut report =
        bench::coverage::run(kernel, busybox, accel, &shapes, budget, bench::host_info())?;
    report.host.loadavg_after = bench::loadavg();
    print!("{}", bench::coverage::table(&report));
    if let Some(path) = out {
        write_json(&path, &serde_json::to_value(&report)?)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn write_json(path: &std::path::Path, json: &serde_json::Value) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(json)?)
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn bench_patch(args: BenchPatchArgs) -> Result<()> {
    let host = bench::host_info();
    let patches = bench::bench_patches()?;
    let gap = Duration::from_micros(args.gap_us);
    let mut runs = Vec::new();
    for &n in &args.vcpus {
        eprintln!(
            "bench: {n} vCPU(s), {} cycles of pause/resume + apply/revert (1 site, 16 sites, 1 site through the API)…",
            args.cycles
        );
        runs.push(bench::patch_cycles(n, args.cycles, gap, &patches)?);
    }
    let storm = if args.storm > 0 {
        eprintln!(
            "bench: patch storm, {} apply/revert cycles of the v1 → v2 sample on {} vCPUs…",
            args.storm, args.storm_vcpus
        );
        Some(bench::patch_storm(args.storm_vcpus, args.storm, &patches)?)
    } else {
        None
    };
    let targets = bench::targets(&runs, storm.as_ref());
    let report = bench::PatchReport {
        benchmark: "patch",
        host: bench::HostInfo {
            loadavg_after: bench::loadavg(),
            ..host
        },
        one_site: patches.one_site_sites.clone(),
        many_sites: patches.many_sites_sites.clone(),
        runs,
        storm,
        targets,
    };
    print!("{}", bench::patch_table(&report));
    if let Some(path) = &args.out {
        write_json(path, &serde_json::to_value(&report)?)?;
    }
    // Timings are reported, not asserted; a wrong result (or a lost report) is a failure.
    if let Some(s) = &report.storm
        && (s.bad > 0 || s.report_seq_errors > 0 || s.invalid_reports > 0)
    {
        anyhow::bail!(
            "the guest saw {} wrong results during the patch storm ({} report sequence errors, {} invalid reports)",
            s.bad,
            s.report_seq_errors,
            s.invalid_reports
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "warn".into());
    // Colours only for a terminal: a log written to a file or a pipe stays plain text that
    // grep and the tests can match.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Pause(args) if args.and_resume => {
            pause_and_resume(args.status).map(|_| ExitCode::SUCCESS)
        }
        Command::Pause(args) => pause_resume(args.status, true).map(|_| ExitCode::SUCCESS),
        Command::Resume(args) => pause_resume(args, false).map(|_| ExitCode::SUCCESS),
        Command::Status(args) => status(args).map(|_| ExitCode::SUCCESS),
        Command::Metrics(args) => ApiClient::new(&args.api_sock)
            .metrics()
            .map_err(anyhow::Error::from)
            .and_then(|v| print_json(&v))
            .map(|_| ExitCode::SUCCESS),
        Command::DemoLinux(args) => demo_linux(args),
        Command::Integrity(args) => integrity_cli::run(args).map(|_| ExitCode::SUCCESS),
        Command::Patch(cmd) => patch_cli::run(cmd).map(|_| ExitCode::SUCCESS),
        Command::Demo(args) => demo(args),
        Command::Bench(BenchCommand::Pause {
            vcpus,
            cycles,
            gap_us,
            out,
        }) => bench_pause(vcpus, cycles, gap_us, out).map(|_| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Patch(args)) => bench_patch(args).map(|_| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Integrity {
            rounds,
            window_s,
            out,
        }) => bench_integrity(rounds, window_s, out),
        Command::Bench(BenchCommand::Call {
            rounds,
            window_s,
            out,
        }) => bench_call(rounds, window_s, out).map(|_| ExitCode::SUCCESS),
        Command::Bench(BenchCommand::Qemu { cycles, out }) => bench_qemu(cycles, out),
        Command::Bench(BenchCommand::Linux {
            kernel,
            busybox,
            accel,
            cycles,
            patch,
            trusted_key,
            out,
        }) => bench_linux(
            &kernel,
            &busybox,
            &accel,
            cycles,
            patch.zip(trusted_key),
            out,
        ),
        Command::Bench(BenchCommand::LinuxVmm {
            l1,
            rounds,
            cycles,
            only,
            out,
        }) => bench_linux_vmm(l1.into(), rounds, cycles, only, out),
        Command::Bench(BenchCommand::PatchL1 {
            l1,
            vcpus,
            cycles,
            storm,
            storm_vcpus,
            l1_vcpus,
            out,
        }) => bench_patch_l1(
            l1.into(),
            bench::patch_l1::PatchL1Args {
                vcpus,
                cycles,
                storm,
                storm_vcpus,
                l1_vcpus,
            },
            out,
        ),
        Command::Bench(BenchCommand::Coverage {
            kernel,
            busybox,
            accel,
            vcpus,
            cpu,
            max_sweep_s,
            out,
        }) => bench_coverage(&kernel, &busybox, &accel, &vcpus, &cpu, max_sweep_s, out),
        Command::Bench(BenchCommand::SourceDiff {
            kernel,
            new_version,
            source_cache,
            max_units,
            only_units,
            header_units,
            cold,
            jobs,
            out,
        }) => bench_source_diff(
            &kernel,
            &new_version,
            source_cache,
            max_units,
            only_units,
            header_units,
            cold.as_deref(),
            jobs,
            out,
        ),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmm: error: {}", exit::render(&e));
            ExitCode::from(exit::code(&e))
        }
    }
}
