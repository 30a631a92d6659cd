//! This VMM as a [`GuestControl`] backend: the engine's seam over KVM.

use std::time::Duration;

use guest_control::paging::{PagingRegs, PhysRead};
use guest_control::{ArenaWindow, GuestControl, GuestError, VcpuState};

use crate::memory::GuestMemory;
use crate::vcpu::{ControlError, VcpuSnapshot};
use crate::vm::Vm;

/// The control registers that decide translation, from KVM's special registers.
pub fn paging_regs(s: &kvm_bindings::kvm_sregs) -> PagingRegs {
    PagingRegs {
        cr0: s.cr0,
        cr3: s.cr3,
        cr4: s.cr4,
        efer: s.efer,
    }
}

/// Guest RAM as the page-table walker reads it.
pub struct RamReader<'a>(pub &'a GuestMemory);

impl PhysRead for RamReader<'_> {
    fn read_u64(&self, gpa: u64) -> Option<u64> {
        use vm_memory::Bytes;
        self.0.read_obj::<u64>(vm_memory::GuestAddress(gpa)).ok()
    }
}

impl Vm {
    /// The patch arena as the engine sees it: the test guest and the VMM's own map for 64-bit
    /// entry images map the low 4 GiB 1:1, so guest-virtual equals guest-physical there.
    pub fn arena_window(&self) -> ArenaWindow {
        let region = self.arena();
        ArenaWindow {
            gpa: region.start,
            gva: region.start,
            size: region.size,
        }
    }
}

/// What the engine may decide on about a parked vCPU: its registers, or the failed read that
/// left none (the snapshot's zeros are not the vCPU's).
fn vcpu_state(id: usize, s: &VcpuSnapshot) -> Result<VcpuState, GuestError> {
    if let Some(errno) = s.read_error {
        return Err(GuestError::Registers {
            vcpu: id,
            source: Box::new(std::io::Error::from_raw_os_error(errno)),
        });
    }
    Ok(VcpuState {
        id,
        rip: s.regs.rip,
        rsp: s.regs.rsp,
        cpl: s.sregs.cs.dpl,
        paging: paging_regs(&s.sregs),
    })
}

impl GuestControl for Vm {
    fn vcpu_count(&self) -> usize {
        Vm::vcpu_count(self)
    }

    fn pause_all(&self) -> Result<Vec<Option<VcpuState>>, GuestError> {
        let (_, snapshots) = self.pause().map_err(|e| GuestError::Pause(Box::new(e)))?;
        let mut out = Vec::with_capacity(snapshots.len());
        for (id, s) in snapshots.iter().enumerate() {
            let Some(s) = s else {
                out.push(None);
                continue;
            };
            match vcpu_state(id, s) {
                Ok(v) => out.push(Some(v)),
                Err(e) => {
                    // Never hand the engine invented registers: refuse, and let the guest run.
                    if let Err(e) = self.resume() {
                        tracing::error!(error = %e, "could not resume the guest after a failed register read");
                    }
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn resume_all(&self) -> Result<Duration, GuestError> {
        let r = self.resume().map_err(|e| GuestError::Resume(Box::new(e)))?;
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
            ControlError::NotPaused => GuestError::NotPaused,
            _ => GuestError::NoSuchVcpu(vcpu),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_regs, kvm_sregs};

    #[test]
    fn a_failed_register_read_is_refused_not_reported_as_zeros() {
        let regs = kvm_regs {
            rip: 0x10_1000,
            rsp: 0x8000,
            ..Default::default()
        };
        let ok = VcpuSnapshot {
            regs,
            sregs: kvm_sregs::default(),
            read_error: None,
        };
        let v = vcpu_state(0, &ok).unwrap();
        assert_eq!((v.rip, v.rsp), (0x10_1000, 0x8000));

        let failed = VcpuSnapshot {
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            read_error: Some(libc::EIO),
        };
        match vcpu_state(1, &failed) {
            Err(GuestError::Registers { vcpu: 1, .. }) => {}
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
