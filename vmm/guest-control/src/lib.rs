//! The seam the patch engine is written against: what it needs from *any* hypervisor.
//!
//! Pause every vCPU and see its registers, resume, read and write guest-physical memory,
//! translate guest-virtual addresses through a vCPU's own page tables, and move a parked vCPU's
//! instruction pointer. The KVM VMM (`kvm-vmm`) and the QEMU backend (`qemu-backend`, gdbstub +
//! QMP) implement [`GuestControl`]; this crate depends on no hypervisor, and the workspace's
//! seam check (`scripts/check-seam`) keeps it, and the engine above it, that way.
//!
//! Beside the trait lives the x86-64 guest model every layer shares: page-table entry bits
//! ([`pte`]), the hostile-table-safe walker ([`paging`]), and latency summaries ([`stats`]).

pub mod paging;
pub mod pte;
pub mod stats;

use std::time::Duration;

use thiserror::Error;

use crate::paging::{PagingRegs, PhysRead, Translation, WalkError};

/// A parked vCPU as the engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuState {
    pub id: usize,
    pub rip: u64,
    pub rsp: u64,
    /// Current privilege level (from CS).
    pub cpl: u8,
    pub paging: PagingRegs,
}

/// A backend's own error, kept as the cause of a [`GuestError`] (printed once, by whoever
/// renders the chain).
pub type BackendError = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, Error)]
pub enum GuestError {
    #[error("the guest is already paused (another pause holds it)")]
    AlreadyPaused,
    #[error("could not pause the guest")]
    Pause(#[source] BackendError),
    #[error("could not resume the guest")]
    Resume(#[source] BackendError),
    #[error("could not read the registers of vCPU {vcpu}")]
    Registers {
        vcpu: usize,
        #[source]
        source: BackendError,
    },
    #[error("could not move vCPU {vcpu}")]
    SetRip {
        vcpu: usize,
        #[source]
        source: BackendError,
    },
    #[error("guest-physical range {gpa:#x}+{len} is not guest memory")]
    OutsideMemory { gpa: u64, len: usize },
    #[error("the guest must be paused for this")]
    NotPaused,
    #[error("vCPU {0} does not exist or has stopped")]
    NoSuchVcpu(usize),
    #[error(
        "{len} bytes at guest-virtual {gva:#x} run past the top of the address space: not a \
         range the guest can map"
    )]
    WrapsAround { gva: u64, len: usize },
    #[error(transparent)]
    Walk(#[from] WalkError),
}

/// Where a backend reserved the patch arena: guest-physical for writes, guest-virtual for code
/// addresses. The backend knows it (it reserved the memory); an OS layer may map it elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaWindow {
    pub gpa: u64,
    pub gva: u64,
    pub size: u64,
}

/// What the engine needs from a hypervisor backend.
pub trait GuestControl {
    fn vcpu_count(&self) -> usize;
    /// Parks every vCPU; `None` for vCPUs that have stopped.
    fn pause_all(&self) -> Result<Vec<Option<VcpuState>>, GuestError>;
    /// Releases the vCPUs; returns the blackout (all parked → all running).
    fn resume_all(&self) -> Result<Duration, GuestError>;
    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError>;
    /// Writes guest memory. The engine only writes while paused (see ARCHITECTURE §4).
    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError>;
    /// Moves a parked vCPU to `rip` when it resumes (used when it sits inside displaced bytes).
    fn set_rip(&self, vcpu: usize, rip: u64) -> Result<(), GuestError>;

    /// One little-endian u64 of guest-physical memory.
    fn read_u64(&self, gpa: u64) -> Result<u64, GuestError> {
        let mut b = [0u8; 8];
        self.read_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Reads `len` bytes at guest-virtual `gva` through the page tables of `vcpu`, page by page.
    fn read_virtual(&self, vcpu: &VcpuState, gva: u64, len: usize) -> Result<Vec<u8>, GuestError> {
        let mut out = Vec::with_capacity(len);
        let mut at = gva;
        while out.len() < len {
            let t = self.translate(vcpu, at)?;
            let in_page = (t.page_size - (t.gpa & (t.page_size - 1))) as usize;
            let mut buf = vec![0u8; in_page.min(len - out.len())];
            self.read_phys(t.gpa, &mut buf)?;
            out.extend_from_slice(&buf);
            // A guest-given address (an IDT base, a table pointer) may sit at the very top.
            at = match at.checked_add(buf.len() as u64) {
                Some(next) => next,
                None if out.len() == len => break,
                None => return Err(GuestError::WrapsAround { gva, len }),
            };
        }
        Ok(out)
    }

    /// Translates `gva` through the page tables of `vcpu`, reading them with `read_phys`.
    fn translate(&self, vcpu: &VcpuState, gva: u64) -> Result<Translation, GuestError> {
        struct Reader<'a, G: GuestControl + ?Sized>(&'a G);
        impl<G: GuestControl + ?Sized> PhysRead for Reader<'_, G> {
            fn read_u64(&self, gpa: u64) -> Option<u64> {
                let mut b = [0u8; 8];
                self.0
                    .read_phys(gpa, &mut b)
                    .ok()
                    .map(|_| u64::from_le_bytes(b))
            }
        }
        Ok(paging::translate(&Reader(self), &vcpu.paging, gva)?)
    }
}

/// The guest held paused; resumes it when dropped, so no early return (`?`) can leave a guest
/// parked. [`Paused::resume`] resumes explicitly and reports the blackout.
pub struct Paused<'g, G: GuestControl + ?Sized> {
    guest: &'g G,
    vcpus: Vec<Option<VcpuState>>,
    resumed: bool,
}

impl<'g, G: GuestControl + ?Sized> Paused<'g, G> {
    /// Parks every vCPU of `guest`.
    pub fn pause(guest: &'g G) -> Result<Self, GuestError> {
        let vcpus = guest.pause_all()?;
        Ok(Paused {
            guest,
            vcpus,
            resumed: false,
        })
    }

    /// The parked vCPUs (`None` for vCPUs that have stopped).
    pub fn vcpus(&self) -> &[Option<VcpuState>] {
        &self.vcpus
    }

    pub fn guest(&self) -> &'g G {
        self.guest
    }

    /// Resumes the guest; returns the blackout as the backend measured it.
    pub fn resume(mut self) -> Result<Duration, GuestError> {
        self.resumed = true;
        self.guest.resume_all()
    }
}

impl<G: GuestControl + ?Sized> Drop for Paused<'_, G> {
    fn drop(&mut self) {
        if !self.resumed
            && let Err(e) = self.guest.resume_all()
        {
            tracing::error!(error = %e, "could not resume the guest after an early return");
        }
    }
}
