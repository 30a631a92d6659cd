//! One vCPU: its KVM set-up and the thread that runs it.
//!
//! The run loop enters the guest, handles each exit, and after every exit asks the shared
//! [`VcpuControl`] whether a pause or stop is pending. It parks only after `KVM_RUN` returned
//! `EINTR` (from a kick or `immediate_exit`): KVM completes any pending port or MMIO access before
//! returning `EINTR`, so the registers snapshotted while parked are architecturally consistent —
//! the precondition for rewriting guest code underneath a parked vCPU.

pub mod control;
pub mod kick;

use std::sync::Arc;

use kvm_bindings::{CpuId, KVM_MP_STATE_RUNNABLE, kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use serde::Serialize;
use thiserror::Error;
use vm_memory::Bytes;

use crate::boot::{self, BootSpec};
use crate::devices::virtio::MmioBus;
use crate::devices::{PioOutcome, PortBus, StopReason};
use crate::integrity::{self, Integrity, WriteContext};
use crate::memory::GuestMemory;
pub use control::{Checkpoint, ControlError, VcpuControl, VcpuPhase};
use guest_control::paging;

/// Registers of a parked vCPU.
#[derive(Debug, Clone, Copy)]
pub struct VcpuSnapshot {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The errno of a failed register read: the registers above are then zeros, not the
    /// vCPU's, and nothing may be decided on them (the engine's pause refuses).
    pub read_error: Option<i32>,
}

/// The subset of a snapshot operators see in the API.
#[derive(Debug, Clone, Serialize)]
pub struct RegsSummary {
    pub rip: String,
    pub rsp: String,
    pub rflags: String,
    pub cr3: String,
    pub cpl: u8,
}

impl From<&VcpuSnapshot> for RegsSummary {
    fn from(s: &VcpuSnapshot) -> Self {
        RegsSummary {
            rip: format!("{:#x}", s.regs.rip),
            rsp: format!("{:#x}", s.regs.rsp),
            rflags: format!("{:#x}", s.regs.rflags),
            cr3: format!("{:#x}", s.sregs.cr3),
            cpl: s.sregs.cs.dpl,
        }
    }
}

/// The control block type shared by the VM's controller and vCPU threads. Updates are new
/// general-purpose registers to load before re-entering the guest.
pub type Control = VcpuControl<VcpuSnapshot, kvm_regs>;

#[derive(Debug, Error)]
pub enum VcpuError {
    #[error("could not create vCPU {id}")]
    Create {
        id: usize,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("could not set up vCPU {id} ({what})")]
    Setup {
        id: usize,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Creates vCPU `id` and loads the entry state of `spec` into it.
pub fn create(
    vm: &VmFd,
    id: usize,
    vcpus: usize,
    spec: &BootSpec,
    base_cpuid: &CpuId,
) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .create_vcpu(id as u64)
        .map_err(|source| VcpuError::Create { id, source })?;
    let setup = |what, source| VcpuError::Setup { id, what, source };
    let cpuid = crate::cpuid::for_vcpu(base_cpuid, id, vcpus);
    fd.set_cpuid2(&cpuid).map_err(|e| setup("CPUID", e))?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    fd.set_fpu(&fpu).map_err(|e| setup("FPU", e))?;
    set_lint(&fd).map_err(|e| setup("local APIC", e))?;
    if !spec.starts_at_entry(id) {
        // A Linux application processor: KVM's in-kernel irqchip leaves it waiting for the
        // INIT/SIPI its kernel sends once the boot CPU is up, as firmware leaves it on a PC.
        return Ok(fd);
    }
    let mut sregs = fd
        .get_sregs()
        .map_err(|e| setup("reading special registers", e))?;
    let regs = boot::entry_state(spec, &mut sregs);
    fd.set_sregs(&sregs)
        .map_err(|e| setup("special registers", e))?;
    fd.set_regs(&regs).map_err(|e| setup("registers", e))?;
    // Our own guests start every vCPU at the entry point directly (the PVH convention the test
    // guest follows), so the application processors are made runnable here.
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(|e| setup("MP state", e))?;
    Ok(fd)
}

/// Routes LINT0 as ExtINT and LINT1 as NMI, as PC firmware leaves them, so guests that use the
/// legacy PIC or NMIs behave as on hardware.
fn set_lint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const MODE_EXTINT: u32 = 0x7;
    const MODE_NMI: u32 = 0x4;
    let mut lapic = fd.get_lapic()?;
    for (offset, mode) in [(LVT_LINT0, MODE_EXTINT), (LVT_LINT1, MODE_NMI)] {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as _;
        }
    }
    fd.set_lapic(&lapic)
}

/// Everything a vCPU thread needs.
pub struct VcpuThread {
    pub id: usize,
    pub fd: VcpuFd,
    pub bus: Arc<PortBus>,
    /// The MMIO devices (virtio-blk disks).
    pub mmio: Arc<MmioBus>,
    pub control: Arc<Control>,
    /// Called with the reason when this vCPU decides the VM must stop.
    pub on_stop: Arc<dyn Fn(StopReason) + Send + Sync>,
    /// Code integrity: guest writes to protected code arrive here as MMIO writes.
    pub integrity: Arc<Integrity>,
    pub mem: GuestMemory,
}

impl VcpuThread {
    fn snapshot(&self) -> VcpuSnapshot {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(regs), Ok(sregs)) => VcpuSnapshot {
                regs,
                sregs,
                read_error: None,
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(vcpu = self.id, error = %e, "could not read a parked vCPU's registers");
                VcpuSnapshot {
                    regs: kvm_regs::default(),
                    sregs: kvm_sregs::default(),
                    read_error: Some(e.errno()),
                }
            }
        }
    }

    /// Where a trapped write came from: KVM has already completed the instruction, so RIP is
    /// past it; the bytes before RIP (read through the vCPU's own page tables, bounded by guest
    /// memory) let [`integrity::writer`] find the instruction itself.
    fn write_context(&self, write_len: usize, trapped_at: std::time::Instant) -> WriteContext {
        let regs = self.fd.get_regs().unwrap_or_default();
        let sregs = self.fd.get_sregs().unwrap_or_default();
        let next_rip = regs.rip;
        let paging = crate::guest::paging_regs(&sregs);
        let bitness = if sregs.cs.l != 0 {
            64
        } else if sregs.cs.db != 0 {
            32
        } else {
            16
        };
        // The longest run of readable bytes that ends at RIP (the page before may be unmapped).
        let mut code = Vec::new();
        for k in (1..=integrity::writer::MAX_INSN as u64).rev() {
            let Some(start) = next_rip.checked_sub(k) else {
                continue;
            };
            let Ok(pieces) =
                paging::translate_range(&crate::guest::RamReader(&self.mem), &paging, start, k)
            else {
                continue;
            };
            let mut buf = Vec::with_capacity(k as usize);
            let complete = pieces.iter().all(|&(gpa, len)| {
                let mut piece = vec![0u8; len as usize];
                let ok = self
                    .mem
                    .read_slice(&mut piece, vm_memory::GuestAddress(gpa))
                    .is_ok();
                buf.extend_from_slice(&piece);
                ok
            });
            if complete {
                code = buf;
                break;
            }
        }
        WriteContext {
            trapped_at,
            next_rip,
            cpl: sregs.cs.dpl,
            writer: integrity::writer::locate(&code, next_rip, bitness, write_len),
        }
    }

    /// The RIP of a triple fault, unless the vCPU is in its reset state (CS `0xf000` at base
    /// `0xffff0000`, RIP `0xfff0`): AMD's KVM INITs the vCPU before it reports the shutdown,
    /// and a reset vector reported as where the guest failed would send a reader astray.
    fn shutdown_rip(&self) -> Option<u64> {
        let rip = self.fd.get_regs().ok()?.rip;
        let cs = self.fd.get_sregs().ok()?.cs;
        let reset = rip == 0xfff0 && cs.selector == 0xf000 && cs.base == 0xffff_0000;
        (!reset).then_some(rip)
    }

    /// The fault the test guest reported through its fault port (vector, RIP, error code and
    /// CR2 in rdi, rsi, r9, rcx).
    fn guest_fault(&self) -> StopReason {
        match self.fd.get_regs() {
            Ok(r) => StopReason::GuestFault {
                vcpu: self.id,
                vector: r.rdi,
                rip: r.rsi,
                error_code: r.r9,
                cr2: r.rcx,
            },
            Err(e) => StopReason::VcpuError {
                vcpu: self.id,
                message: format!(
                    "the guest reported a fault, but its registers could not be read: {e}"
                ),
            },
        }
    }

    /// Runs until the VM stops. Never panics on guest behaviour: every exit is handled or turned
    /// into a stop reason.
    pub fn run(mut self) {
        let id = self.id;
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: `flag` points into this vCPU's kvm_run mapping, owned by `self.fd`, which lives
        // until the end of this function; we unbind before returning.
        unsafe { kick::bind_immediate_exit(flag) };
        let clear_immediate_exit = || {
            // SAFETY: same pointer as above, still valid; accessed atomically because the kick
            // handler may store to it at any time on this thread.
            unsafe {
                std::sync::atomic::AtomicU8::from_ptr(flag)
                    .store(0, std::sync::atomic::Ordering::SeqCst)
            };
        };

        // Register the thread as running (or park at once if a pause came first).
        let mut consistent = true;
        if let Checkpoint::Stop = self.control.checkpoint(id, || self.snapshot()) {
            kick::unbind_immediate_exit();
            self.control.exited(id);
            return;
        }
        loop {
            if consistent && self.control.wants_attention() {
                match self.control.checkpoint(id, || self.snapshot()) {
                    Checkpoint::Stop => break,
                    Checkpoint::Continue(Some(regs)) => {
                        if let Err(e) = self.fd.set_regs(&regs) {
                            (self.on_stop)(StopReason::VcpuError {
                                vcpu: id,
                                message: format!("could not load updated registers: {e}"),
                            });
                            break;
                        }
                    }
                    Checkpoint::Continue(None) => {}
                }
            }
            let action = classify(self.fd.run(), id, &self.bus, &self.mmio, &self.integrity);
            // Any non-EINTR exit may leave an access half-done until the next KVM_RUN.
            consistent = false;
            let stop = match action {
                ExitAction::Continue => None,
                ExitAction::Interrupted => {
                    clear_immediate_exit();
                    consistent = true;
                    None
                }
                ExitAction::Stop(reason) => Some(reason),
                ExitAction::ProtectedWrite { addr, bytes, len } => {
                    let ctx = self.write_context(len, std::time::Instant::now());
                    self.integrity
                        .guest_write(&self.mem, id, addr, &bytes[..len], ctx);
                    None
                }
                ExitAction::GuestFault => Some(self.guest_fault()),
                ExitAction::TripleFault => Some(StopReason::TripleFault {
                    vcpu: id,
                    rip: self.shutdown_rip(),
                }),
                ExitAction::InternalError => Some(StopReason::VcpuError {
                    vcpu: id,
                    message: format!(
                        "KVM internal error (instruction emulation failed?) at rip {:#x}",
                        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
                    ),
                }),
            };
            if let Some(reason) = stop {
                (self.on_stop)(reason);
                // Let the stop request (already flagged) end the loop at the next checkpoint.
                consistent = true;
                if self.control.is_stopping() {
                    break;
                }
            }
        }
        kick::unbind_immediate_exit();
        self.control.exited(id);
    }
}

/// What one `KVM_RUN` exit asks of the vCPU loop. Exits needing the vCPU's registers are
/// resolved by the loop once the exit (which borrows the vCPU's run area) is gone.
enum ExitAction {
    Continue,
    /// A kick or signal: the loop may check for a pause.
    Interrupted,
    Stop(StopReason),
    /// A guest write into protected code, copied out of the run area.
    ProtectedWrite {
        addr: u64,
        bytes: [u8; 8],
        len: usize,
    },
    GuestFault,
    TripleFault,
    InternalError,
}

fn classify(
    exit: Result<VcpuExit<'_>, kvm_ioctls::Error>,
    id: usize,
    bus: &PortBus,
    mmio: &MmioBus,
    integrity: &Integrity,
) -> ExitAction {
    let stop = |message: String| ExitAction::Stop(StopReason::VcpuError { vcpu: id, message });
    match exit {
        Ok(VcpuExit::IoOut(port, data)) => match bus.pio_out(id, port, data) {
            PioOutcome::Handled => ExitAction::Continue,
            PioOutcome::Stop(reason) => ExitAction::Stop(reason),
            PioOutcome::GuestFault => ExitAction::GuestFault,
        },
        Ok(VcpuExit::IoIn(port, data)) => {
            bus.pio_in(port, data);
            ExitAction::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            if !mmio.read(addr, data) {
                tracing::trace!(
                    vcpu = id,
                    addr = format_args!("{addr:#x}"),
                    "read of unbacked MMIO"
                );
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) if integrity.protects(addr) => {
            let mut bytes = [0u8; 8];
            let len = data.len().min(bytes.len());
            bytes[..len].copy_from_slice(&data[..len]);
            ExitAction::ProtectedWrite { addr, bytes, len }
        }
        Ok(VcpuExit::MmioWrite(addr, data)) if mmio.write(addr, data) => ExitAction::Continue,
        Ok(VcpuExit::MmioWrite(addr, _)) => {
            tracing::trace!(
                vcpu = id,
                addr = format_args!("{addr:#x}"),
                "write to unbacked MMIO"
            );
            ExitAction::Continue
        }
        Ok(VcpuExit::Hlt) => ExitAction::Continue,
        Ok(VcpuExit::Intr) => ExitAction::Interrupted,
        Ok(VcpuExit::Shutdown) => ExitAction::TripleFault,
        Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(StopReason::PoweredOff(0)),
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(StopReason::Rebooted),
            other => stop(format!("system event {other}")),
        },
        Ok(VcpuExit::InternalError) => ExitAction::InternalError,
        Ok(VcpuExit::FailEntry(reason, cpu)) => stop(format!(
            "KVM could not enter the guest: hardware reason {reason:#x} on host CPU {cpu}"
        )),
        Ok(other) => stop(format!("unhandled exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitAction::Interrupted,
        Err(e) => stop(format!("KVM_RUN failed: {e}")),
    }
}
