//! The seam the patch engine is written against: what it needs from *any* hypervisor.
//!
//! Pause every vCPU and see its registers, resume, read and write guest-physical memory,
//! translate guest-virtual addresses through a vCPU's own page tables, and move a parked vCPU's
//! instruction pointer. This VMM is the first backend ([`Vm`]); a QEMU backend (gdbstub + QMP)
//! implements the same trait, so nothing KVM-specific may appear here.

use std::time::Duration;

use thiserror::Error;

use crate::paging::{self, PagingRegs, PhysRead, Translation, WalkError};
use crate::vm::Vm;

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

#[derive(Debug, Error)]
pub enum GuestError {
    #[error("could not pause the guest: {0}")]
    Pause(String),
    #[error("could not resume the guest: {0}")]
    Resume(String),
    #[error("guest-physical range {gpa:#x}+{len} is not guest memory")]
    OutsideMemory { gpa: u64, len: usize },
    #[error("the guest must be paused for this")]
    NotPaused,
    #[error("vCPU {0} does not exist or has stopped")]
    NoSuchVcpu(usize),
    #[error(transparent)]
    Walk(#[from] WalkError),
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
            at += buf.len() as u64;
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

impl GuestControl for Vm {
    fn vcpu_count(&self) -> usize {
        Vm::vcpu_count(self)
    }

    fn pause_all(&self) -> Result<Vec<Option<VcpuState>>, GuestError> {
        let (_, snapshots) = self.pause().map_err(|e| GuestError::Pause(e.to_string()))?;
        Ok(snapshots
            .iter()
            .enumerate()
            .map(|(id, s)| {
                s.as_ref().map(|s| VcpuState {
                    id,
                    rip: s.regs.rip,
                    rsp: s.regs.rsp,
                    cpl: s.sregs.cs.dpl,
                    paging: PagingRegs::from(&s.sregs),
                })
            })
            .collect())
    }

    fn resume_all(&self) -> Result<Duration, GuestError> {
        let r = self
            .resume()
            .map_err(|e| GuestError::Resume(e.to_string()))?;
        Ok(Duration::from_micros(r.blackout_us))
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        use vm_memory::Bytes;
        self.memory()
            .read_slice(buf, vm_memory::GuestAddress(gpa))
            .map_err(|_| GuestError::OutsideMemory {
                gpa,
                len: buf.len(),
            })
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        use vm_memory::Bytes;
        self.memory()
            .write_slice(data, vm_memory::GuestAddress(gpa))
            .map_err(|_| GuestError::OutsideMemory {
                gpa,
                len: data.len(),
            })
    }

    fn set_rip(&self, vcpu: usize, rip: u64) -> Result<(), GuestError> {
        let mut regs = self.parked_regs(vcpu).ok_or(if self.is_paused() {
            GuestError::NoSuchVcpu(vcpu)
        } else {
            GuestError::NotPaused
        })?;
        regs.rip = rip;
        self.set_regs_on_resume(vcpu, regs).map_err(|e| match e {
            crate::vcpu::ControlError::NotPaused => GuestError::NotPaused,
            _ => GuestError::NoSuchVcpu(vcpu),
        })
    }
}
