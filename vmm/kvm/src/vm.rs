//! A running VM: KVM objects, guest memory, devices, vCPU threads, and the controller that
//! pauses and resumes them.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use serde::Serialize;
use thiserror::Error;

use crate::boot::{self, BootError, BootSpec, Image};
use crate::builder;
use crate::devices::virtio::{self, DiskConfig, DiskError};
use crate::devices::{PortBus, StopReason};
use crate::integrity::{self, CodeRange, Integrity, IntegrityError, IntegrityStatus, RangeSource};
use crate::layout;
use crate::memory::{self, GuestMemory, MemoryError};
use crate::vcpu::{
    Control, ControlError, RegsSummary, VcpuError, VcpuPhase, VcpuSnapshot, VcpuThread, kick,
};
use guest_control::stats::{History, Summary};

/// The most vCPUs this VMM starts (xAPIC IDs are 8 bits; the test guest supports 32).
pub const MAX_VCPUS: usize = 254;
/// How long a pause waits for every vCPU to park before giving up.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Error)]
pub enum VmError {
    #[error(
        "KVM is not available: {path} does not exist. Run on a Linux host with KVM (load kvm_intel or kvm_amd, or enable nested virtualization for this VM)"
    )]
    NoKvm { path: String },
    #[error(
        "permission denied opening {path}: run as root or add your user to the group that owns it (usually 'kvm'), then log in again"
    )]
    KvmPermission { path: String },
    #[error("cannot use {path} as the KVM device")]
    KvmOpen {
        path: String,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{path} is not a usable KVM device (API version {version}, expected 12)")]
    KvmVersion { path: String, version: i32 },
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {requested} is more than this host's KVM allows ({max})")]
    TooManyVcpus { requested: usize, max: usize },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("could not create the VM ({what})")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("could not set up {what}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Where the guest console goes.
pub enum ConsoleSink {
    Stdout,
    Discard,
    Writer(Box<dyn Write + Send>),
}

pub struct VmConfig {
    pub vcpus: usize,
    pub memory_mib: u64,
    pub image: Image<'static>,
    /// An initrd for a Linux image (`vmm run --initrd`).
    pub initrd: Option<Image<'static>>,
    pub cmdline: String,
    pub kvm_device: PathBuf,
    pub console: ConsoleSink,
    /// Keep every console line in memory as well (the demo, tests and benches read them).
    pub keep_console: bool,
    /// Code integrity: whether the guest may write its own code (`vmm run --code-integrity`).
    pub code_integrity: integrity::Mode,
    /// Guest-physical `[start, end)` ranges to protect besides the image's executable segments
    /// and the patch arena (`vmm run --code-range`).
    pub code_ranges: Vec<(u64, u64)>,
    /// Disk images served to the guest as virtio-blk devices (`vmm run --disk`).
    pub disks: Vec<DiskConfig>,
    /// The bzImage's decompressed kernel, when the VMM holds it: loaded directly, with KASLR
    /// done by the VMM, so the guest skips its decompressor ([`crate::kaslr`]).
    pub decompressed: Option<Vec<u8>>,
    /// A fixed seed for KASLR's placement (`vmm run --kaslr-seed`); `None`: `/dev/urandom`.
    pub kaslr_seed: Option<u64>,
}

impl VmConfig {
    /// The built-in test guest (v1) with defaults.
    pub fn builtin(vcpus: usize, memory_mib: u64, cmdline: &str) -> Self {
        VmConfig {
            vcpus,
            memory_mib,
            image: Image {
                name: "built-in test guest".into(),
                bytes: guest_tools::test_guest(guest_tools::GuestBuild::V1).into(),
            },
            initrd: None,
            cmdline: cmdline.to_string(),
            kvm_device: PathBuf::from("/dev/kvm"),
            console: ConsoleSink::Stdout,
            keep_console: false,
            code_integrity: integrity::Mode::Off,
            code_ranges: Vec::new(),
            disks: Vec::new(),
            decompressed: None,
            kaslr_seed: None,
        }
    }
}

/// Pause/resume timings kept for the API and benchmarks.
struct PauseStats {
    park_us: History,
    blackout_us: History,
    last_park_us: Option<u64>,
    last_blackout_us: Option<u64>,
    last_snapshots: Vec<Option<VcpuSnapshot>>,
}

/// What a completed pause reports.
#[derive(Debug, Clone, Serialize)]
pub struct PauseInfo {
    pub park_us: u64,
    pub vcpus: Vec<Option<RegsSummary>>,
}

/// What a completed resume reports.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResumeInfo {
    pub blackout_us: u64,
}

/// The VM as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub state: &'static str,
    pub vcpus: usize,
    pub memory_mib: u64,
    pub image: String,
    pub entry: String,
    pub uptime_ms: u64,
    pub pauses: u64,
    pub last_park_us: Option<u64>,
    pub last_blackout_us: Option<u64>,
    pub code_integrity: integrity::IntegrityMetrics,
    pub vcpu: Vec<VcpuStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VcpuStatus {
    pub id: usize,
    pub phase: VcpuPhase,
    /// Registers when parked.
    pub regs: Option<RegsSummary>,
    pub reports: crate::devices::reports::VcpuReports,
}

#[derive(Debug, Clone, Serialize)]
pub struct PauseMetrics {
    pub pauses: u64,
    pub park_us: Summary,
    pub blackout_us: Summary,
}

pub struct Vm {
    // Held so the VM lives as long as this object. Field order is drop order: the vCPU threads
    // (which own the vCPU fds) are joined in `join`, also called on drop, before the VM fd closes
    // and before guest memory is unmapped.
    vm_fd: VmFd,
    _kvm: Kvm,
    mem: GuestMemory,
    integrity: Arc<Integrity>,
    /// KVM's limit on memory slots (code integrity cuts memory into more of them).
    max_slots: usize,
    bus: Arc<PortBus>,
    control: Arc<Control>,
    kickers: Arc<OnceLock<Vec<kick::Kicker>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop: Arc<(Mutex<Option<StopReason>>, Condvar)>,
    stats: Mutex<PauseStats>,
    console_lines: Option<Arc<Mutex<Vec<String>>>>,
    boot: BootSpec,
    image_name: String,
    memory_mib: u64,
    /// RAM in bytes, as laid out by `layout::ram_regions`.
    mem_size: u64,
    started: Instant,
}

impl Vm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(config: VmConfig) -> Result<Arc<Vm>, VmError> {
        // Disk errors (missing file, read-only file for a read-write disk, ...) come first:
        // they are the operator's to fix and need no KVM to find.
        let disks = virtio::block::open_all(&config.disks)?;
        let kvm = builder::open(&config)?;
        let mem_size = config.memory_mib.saturating_mul(1 << 20);
        let mem = memory::allocate(mem_size)?;
        let vm_fd = builder::create_vm(&kvm)?;
        let max_slots = kvm.get_nr_memslots();
        let integrity = Arc::new(code_integrity(&kvm, &config, mem_size)?);
        integrity.install(&vm_fd, &memory::backing(&mem)?, max_slots)?;
        // Linux learns of the virtio-MMIO windows from the DSDT (`LNRO0005` devices): the
        // stock kernel has no `virtio_mmio.device=` command-line option.
        let virtio_mmio = (0..disks.len())
            .filter_map(virtio::device_window)
            .map(|(base, gsi)| crate::acpi::MmioDevice {
                base,
                len: layout::VIRTIO_MMIO_SIZE,
                gsi,
            })
            .collect();
        let spec = boot::load(
            &mem,
            mem_size,
            &boot::BootRequest {
                image: &config.image,
                cmdline: &config.cmdline,
                initrd: config.initrd.as_ref(),
                acpi: crate::acpi::AcpiConfig {
                    vcpus: config.vcpus,
                    virtio_mmio,
                },
                decompressed: config.decompressed.as_deref(),
                kaslr_random: config.kaslr_seed.map(crate::kaslr::from_seed),
            },
        )?;
        let console_lines = config
            .keep_console
            .then(|| Arc::new(Mutex::new(Vec::new())));
        let bus = builder::devices(&vm_fd, &mem, config.vcpus, config.console, &console_lines)?;
        let mmio = builder::mmio_devices(&vm_fd, &mem, disks, dma_filter(&integrity))?;
        let fds = builder::create_vcpus(&kvm, &vm_fd, config.vcpus, &spec)?;

        let control = Arc::new(Control::new(config.vcpus));
        let kickers: Arc<OnceLock<Vec<kick::Kicker>>> = Arc::new(OnceLock::new());
        let stop: Arc<(Mutex<Option<StopReason>>, Condvar)> =
            Arc::new((Mutex::new(None), Condvar::new()));
        let on_stop = {
            let stop = stop.clone();
            let control = control.clone();
            let kickers = kickers.clone();
            Arc::new(move |reason: StopReason| request_stop(&stop, &control, &kickers, reason))
        };
        let vcpus = fds
            .into_iter()
            .enumerate()
            .map(|(id, fd)| VcpuThread {
                id,
                fd,
                bus: bus.clone(),
                mmio: mmio.clone(),
                control: control.clone(),
                on_stop: on_stop.clone(),
                integrity: integrity.clone(),
                mem: mem.clone(),
            })
            .collect();
        let threads = builder::run_vcpus(vcpus, &kickers)?;
        tracing::info!(vcpus = config.vcpus, memory_mib = config.memory_mib, image = %config.image.name, mode = ?spec.mode, entry = format_args!("{:#x}", spec.entry), "VM started");

        Ok(Arc::new(Vm {
            vm_fd,
            _kvm: kvm,
            mem,
            integrity,
            max_slots,
            bus,
            control,
            kickers,
            threads: Mutex::new(threads),
            stop,
            stats: Mutex::new(PauseStats {
                park_us: History::new(100_000),
                blackout_us: History::new(100_000),
                last_park_us: None,
                last_blackout_us: None,
                last_snapshots: Vec::new(),
            }),
            console_lines,
            boot: spec,
            image_name: config.image.name,
            memory_mib: config.memory_mib,
            mem_size,
            started: Instant::now(),
        }))
    }

    /// All guest memory: RAM and the patch arena (see [`Vm::ram_regions`] and [`Vm::arena`]).
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// Code integrity: mode, protected ranges, KVM slots, violations.
    pub fn integrity(&self) -> IntegrityStatus {
        self.integrity.status()
    }

    pub fn integrity_metrics(&self) -> integrity::IntegrityMetrics {
        self.integrity.metrics()
    }

    /// Protects one more guest-physical range (page-aligned outwards) while the guest runs:
    /// its memory slots are re-cut with every vCPU parked, unless the operator already paused
    /// the VM. Refused when code integrity is off.
    /// Installs what vouches for the guest's own rewrites of its protected code
    /// ([`integrity::RewritePolicy`]); install it before protecting code the guest rewrites.
    pub fn set_rewrite_policy(&self, policy: Arc<dyn integrity::RewritePolicy>) {
        self.integrity.set_policy(policy);
    }

    pub fn protect_code(&self, start: u64, end: u64) -> Result<CodeRange, VmControlError> {
        self.protect(start, end, RangeSource::Api)
    }

    /// Protects a Linux guest's kernel text, once it has booted.
    pub fn protect_kernel_text(&self, start: u64, end: u64) -> Result<CodeRange, VmControlError> {
        self.protect(start, end, RangeSource::KernelText)
    }

    fn protect(
        &self,
        start: u64,
        end: u64,
        source: RangeSource,
    ) -> Result<CodeRange, VmControlError> {
        if self.integrity.mode() == integrity::Mode::Off {
            return Err(IntegrityError::Off.into());
        }
        let range = CodeRange::covering(start, end, source);
        let backing = memory::backing(&self.mem).map_err(VmError::from)?;
        let operator_paused = self.is_paused();
        if !operator_paused {
            self.pause()?;
        }
        let result =
            self.integrity
                .protect(&self.vm_fd, &backing, self.max_slots, range, self.mem_size);
        if !operator_paused {
            self.resume()?;
        }
        result?;
        Ok(range)
    }

    /// The guest's RAM, in address order: what the guest's memory map calls RAM (plus the
    /// legacy area below 1 MiB), never the arena. Lets tests hash RAM and arena separately.
    pub fn ram_regions(&self) -> Vec<layout::RamRegion> {
        layout::ram_regions(self.mem_size)
    }

    /// The patch arena: guest-physical memory for hot-patch code, mapped by KVM as its own slot,
    /// reserved in the guest's memory map, within rel32 reach of text at 1 MiB. Read and
    /// written through [`Vm::memory`] like RAM.
    pub fn arena(&self) -> layout::ArenaRegion {
        layout::PATCH_ARENA
    }

    pub fn vcpu_count(&self) -> usize {
        self.control.vcpu_count()
    }

    fn kick(&self, ids: &[usize]) {
        kick_ids(&self.kickers, ids);
    }

    /// Parks every vCPU and snapshots its registers; the guest stays paused until `resume`.
    pub fn pause(&self) -> Result<(PauseInfo, Vec<Option<VcpuSnapshot>>), ControlError> {
        let paused = self.control.pause(&|ids| self.kick(ids), PAUSE_TIMEOUT)?;
        let park_us = paused.park.as_micros() as u64;
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.park_us.push(park_us);
        stats.last_park_us = Some(park_us);
        stats.last_snapshots = paused.snapshots.clone();
        tracing::debug!(park_us, vcpus = paused.snapshots.len(), "vCPUs paused");
        let info = PauseInfo {
            park_us,
            vcpus: paused
                .snapshots
                .iter()
                .map(|s| s.as_ref().map(RegsSummary::from))
                .collect(),
        };
        Ok((info, paused.snapshots))
    }

    /// The registers of parked vCPU `id`, as snapshotted by the current pause.
    pub fn parked_regs(&self, id: usize) -> Option<kvm_bindings::kvm_regs> {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats
            .last_snapshots
            .get(id)
            .and_then(|s| s.as_ref())
            .map(|s| s.regs)
    }

    /// Queues new registers for a parked vCPU (loaded before it re-enters the guest).
    pub fn set_regs_on_resume(
        &self,
        id: usize,
        regs: kvm_bindings::kvm_regs,
    ) -> Result<(), ControlError> {
        self.control.set_update(id, regs)
    }

    /// Releases the vCPUs and reports the blackout (all parked → all running).
    pub fn resume(&self) -> Result<ResumeInfo, ControlError> {
        let resumed = self.control.resume()?;
        let blackout_us = resumed.blackout.as_micros() as u64;
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        stats.blackout_us.push(blackout_us);
        stats.last_blackout_us = Some(blackout_us);
        stats.last_snapshots.clear();
        tracing::debug!(blackout_us, "vCPUs resumed");
        Ok(ResumeInfo { blackout_us })
    }

    pub fn is_paused(&self) -> bool {
        self.control.is_paused()
    }

    pub fn status(&self) -> VmStatus {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let phases = self.control.phases();
        let reports = self.bus.reports.snapshot();
        let state = if self.control.is_stopping() {
            "stopping"
        } else if self.control.is_paused() {
            "paused"
        } else {
            "running"
        };
        VmStatus {
            state,
            vcpus: phases.len(),
            memory_mib: self.memory_mib,
            image: self.image_name.clone(),
            entry: format!("{:?} at {:#x}", self.boot.mode, self.boot.entry),
            uptime_ms: self.started.elapsed().as_millis() as u64,
            pauses: stats.park_us.total(),
            last_park_us: stats.last_park_us,
            last_blackout_us: stats.last_blackout_us,
            code_integrity: self.integrity.metrics(),
            vcpu: phases
                .iter()
                .enumerate()
                .map(|(id, phase)| VcpuStatus {
                    id,
                    phase: *phase,
                    regs: stats
                        .last_snapshots
                        .get(id)
                        .and_then(|s| s.as_ref())
                        .map(RegsSummary::from),
                    reports: reports.get(id).cloned().unwrap_or_default(),
                })
                .collect(),
        }
    }

    pub fn pause_metrics(&self) -> PauseMetrics {
        let stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        PauseMetrics {
            pauses: stats.park_us.total(),
            park_us: stats.park_us.summary(),
            blackout_us: stats.blackout_us.summary(),
        }
    }

    pub fn reports(&self) -> Vec<crate::devices::reports::VcpuReports> {
        self.bus.reports.snapshot()
    }

    /// Warnings about bad guest reports the rate limit held back.
    pub fn report_log_suppressed(&self) -> u64 {
        self.bus.reports.log_suppressed()
    }

    /// Console lines kept so far (only with `keep_console`).
    /// Feeds console input to the guest's COM1; returns how many bytes it took (0: its FIFO is
    /// full, retry after the guest has read).
    pub fn console_input(&self, bytes: &[u8]) -> usize {
        self.bus.serial.input(bytes)
    }

    pub fn console_lines(&self) -> Vec<String> {
        self.console_lines
            .as_ref()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .unwrap_or_default()
    }

    /// Stops the VM (from the API, a signal, or a test).
    pub fn request_stop(&self, reason: StopReason) {
        request_stop(&self.stop, &self.control, &self.kickers, reason);
    }

    /// The stop reason, if the VM is stopping.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.stop
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits until the VM stops (or `timeout` passes; then `None`).
    pub fn wait_timeout(&self, timeout: Duration) -> Option<StopReason> {
        let (lock, cv) = &*self.stop;
        let guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = cv
            .wait_timeout_while(guard, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }

    /// Joins the vCPU threads once a stop was requested; flushes the console.
    pub fn join(&self) {
        let threads: Vec<_> =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        self.bus.serial.finish();
    }
}

/// Errors of run-time VM changes that pause the guest.
#[derive(Debug, Error)]
pub enum VmControlError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Integrity(#[from] IntegrityError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The code-integrity state for `config`: which ranges to protect (the image's executable
/// segments, the patch arena, `--code-range`), checked against guest memory and the host.
fn code_integrity(kvm: &Kvm, config: &VmConfig, mem_size: u64) -> Result<Integrity, VmError> {
    let mode = config.code_integrity;
    if mode == integrity::Mode::Off {
        return Ok(Integrity::new(mode, config.vcpus, Vec::new()));
    }
    if !kvm.check_extension(kvm_ioctls::Cap::ReadonlyMem) {
        return Err(IntegrityError::Unsupported(mode).into());
    }
    // A Linux kernel rewrites its own text while it boots (alternatives, paravirt, the lock
    // prefixes as CPUs come up) and frees its init text: its text is protected only once it
    // runs (`linux_vm` in the binary, with a policy for its run-time rewrites). A bzImage
    // has no ELF segments to protect anyway.
    let image = if boot::is_linux_image(&config.image.bytes) {
        integrity::ranges::ImageCode::default()
    } else {
        integrity::ranges::image_code(&config.image.bytes).map_err(IntegrityError::from)?
    };
    for page in &image.shared_pages {
        tracing::warn!(
            page = format_args!("{page:#x}"),
            image = %config.image.name,
            "a page of the image holds both code and writable data: the guest's writes to that data will be reported as violations{}",
            if mode == integrity::Mode::Enforce { " and dropped" } else { "" }
        );
    }
    if image.ranges.is_empty()
        && config.code_ranges.is_empty()
        && !boot::is_linux_image(&config.image.bytes)
    {
        tracing::warn!(
            image = %config.image.name,
            "the image names no executable segment and no --code-range was given: only the patch arena is protected"
        );
    }
    let mut ranges = image.ranges;
    ranges.push(CodeRange::covering(
        layout::PATCH_ARENA_START,
        layout::PATCH_ARENA_END,
        RangeSource::Arena,
    ));
    for &(start, end) in &config.code_ranges {
        integrity::ranges::check_in_memory(start, end, mem_size).map_err(IntegrityError::from)?;
        ranges.push(CodeRange::covering(start, end, RangeSource::CommandLine));
    }
    tracing::info!(%mode, ranges = ranges.len(), "code integrity");
    Ok(Integrity::new(mode, config.vcpus, ranges))
}

/// Which guest memory devices may write: never the patch arena (hot-patch code), and not
/// protected code under `--code-integrity enforce` (under `audit` such writes are logged and
/// let through, like the guest's own).
fn dma_filter(integrity: &Arc<Integrity>) -> virtio::block::DmaFilter {
    let integrity = integrity.clone();
    Arc::new(move |start, end| {
        if layout::PATCH_ARENA.overlaps(start, end) {
            tracing::warn!(
                start = format_args!("{start:#x}"),
                end = format_args!("{end:#x}"),
                "device write into the patch arena refused"
            );
            return false;
        }
        if integrity.protects_any(start, end) {
            let enforce = integrity.mode() == integrity::Mode::Enforce;
            tracing::warn!(
                start = format_args!("{start:#x}"),
                end = format_args!("{end:#x}"),
                refused = enforce,
                "device write into protected code"
            );
            return !enforce;
        }
        true
    })
}

fn kick_ids(kickers: &OnceLock<Vec<kick::Kicker>>, ids: &[usize]) {
    if let Some(k) = kickers.get() {
        for &id in ids {
            if let Some(k) = k.get(id) {
                k.kick();
            }
        }
    }
}

fn request_stop(
    stop: &(Mutex<Option<StopReason>>, Condvar),
    control: &Control,
    kickers: &OnceLock<Vec<kick::Kicker>>,
    reason: StopReason,
) {
    {
        let mut slot = stop.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            tracing::info!(%reason, "VM stopping");
            *slot = Some(reason);
        }
        stop.1.notify_all();
    }
    control.stop(&|ids| kick_ids(kickers, ids));
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.request_stop(StopReason::Requested("the VM was dropped".into()));
        self.join();
    }
}
