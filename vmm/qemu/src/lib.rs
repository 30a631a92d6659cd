//! The QEMU backend: the patch engine's [`GuestControl`] over a running, stock
//! `qemu-system-x86_64`, through its gdbstub (all-stop: halt every vCPU, per-vCPU registers,
//! guest-physical memory) and QMP (run state, vCPU list).
//!
//! QEMU keeps no patch state, so every `vmm patch … --qemu-gdb` command builds an engine over a
//! state directory (the journal) and attaches for the length of one command. QEMU halts the
//! guest when a debugger attaches; [`QemuGuest::attach`] lets it run again at once, so the guest
//! is only stopped inside the engine's blackouts and for the short halts below.
//!
//! The gdbstub serves memory only while the guest is halted, so a read or write the engine makes
//! while the guest runs (checking sites, writing arena code nobody executes yet) is done in a
//! short halt of its own (a few hundred µs, like a `stop`/`cont`).

pub mod qmp;
pub mod rsp;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use thiserror::Error;

use guest_control::paging::PagingRegs;
use guest_control::{GuestControl, GuestError, VcpuState};
pub use qmp::{Qmp, QmpError};
pub use rsp::{Rsp, RspError};

/// How long one gdbstub or QMP exchange may take before the backend gives up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Error)]
pub enum QemuError {
    #[error(transparent)]
    Gdb(#[from] RspError),
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error(
        "the VM is {0} (QMP query-status), not running: patching would resume it; resume it first (QMP cont) or stop patching"
    )]
    NotRunning(String),
    #[error("QMP lists {qmp} vCPUs but the gdbstub {gdb}: is the gdbstub of another VM?")]
    VcpuMismatch { qmp: usize, gdb: usize },
}

struct Link {
    rsp: Rsp,
    /// When the current halt began (`None`: running).
    halted_since: Option<Instant>,
}

/// A running QEMU VM the engine can patch.
pub struct QemuGuest {
    link: Mutex<Link>,
    vcpus: usize,
    /// QMP serves one client at a time: connect per use, never hold it.
    qmp: std::path::PathBuf,
}

impl QemuGuest {
    /// Attaches to QEMU's gdbstub at `gdb` (`HOST:PORT`) after checking with QMP at `qmp` that the
    /// VM is running and how many vCPUs it has. Leaves the guest running.
    pub fn attach(gdb: &str, qmp: &Path) -> Result<QemuGuest, QemuError> {
        let mut q = Qmp::connect(qmp, IO_TIMEOUT)?;
        let status = q.status()?;
        if status != "running" {
            return Err(QemuError::NotRunning(status));
        }
        let cpus = q.cpus()?.len();
        let mut rsp = Rsp::connect(gdb, IO_TIMEOUT)?;
        if rsp.threads.len() != cpus {
            let gdb = rsp.threads.len();
            let _ = rsp.cont();
            return Err(QemuError::VcpuMismatch { qmp: cpus, gdb });
        }
        rsp.cont()?;
        tracing::info!(gdb, vcpus = cpus, "attached to QEMU");
        Ok(QemuGuest {
            link: Mutex::new(Link {
                rsp,
                halted_since: None,
            }),
            vcpus: cpus,
            qmp: qmp.to_path_buf(),
        })
    }

    /// The IDT base of vCPU 0, from QMP's `info registers` (the gdbstub does not expose IDTR).
    pub fn idt_base(&self) -> Result<u64, QemuError> {
        let mut q = Qmp::connect(&self.qmp, IO_TIMEOUT)?;
        let text = q.execute(
            "human-monitor-command",
            serde_json::json!({"command-line": "info registers"}),
        )?;
        let text = text.as_str().unwrap_or_default();
        parse_idt_base(text).ok_or_else(|| {
            QemuError::Qmp(QmpError::Malformed(format!(
                "no IDT= line in `info registers`: {}",
                text.lines().take(3).collect::<Vec<_>>().join(" | ")
            )))
        })
    }

    fn link(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` with the guest halted: inside a blackout as it is, otherwise in a short halt.
    /// The outer error is the halt or the resume failing; the inner one is `f`'s own.
    fn halted<T>(
        &self,
        f: impl FnOnce(&mut Rsp) -> Result<T, RspError>,
    ) -> Result<Result<T, RspError>, GuestError> {
        let mut link = self.link();
        if link.halted_since.is_some() {
            return Ok(f(&mut link.rsp));
        }
        link.rsp
            .interrupt()
            .map_err(|e| GuestError::Pause(Box::new(e)))?;
        let out = f(&mut link.rsp);
        link.rsp
            .cont()
            .map_err(|e| GuestError::Resume(Box::new(e)))?;
        Ok(out)
    }

    /// Lets the guest run and closes the gdbstub connection.
    pub fn detach(&self) -> Result<(), QemuError> {
        let mut link = self.link();
        if link.halted_since.take().is_some() {
            link.rsp.cont()?;
        }
        Ok(())
    }
}

impl Drop for QemuGuest {
    fn drop(&mut self) {
        // Never leave the guest halted behind us.
        let _ = self.detach();
    }
}

impl GuestControl for QemuGuest {
    fn vcpu_count(&self) -> usize {
        self.vcpus
    }

    fn pause_all(&self) -> Result<Vec<Option<VcpuState>>, GuestError> {
        let mut link = self.link();
        if link.halted_since.is_some() {
            return Err(GuestError::AlreadyPaused);
        }
        link.rsp
            .interrupt()
            .map_err(|e| GuestError::Pause(Box::new(e)))?;
        match snapshot(&mut link.rsp) {
            Ok(out) => {
                link.halted_since = Some(Instant::now());
                Ok(out)
            }
            Err(e) => {
                // A pause that cannot see every vCPU is no pause: let the guest run again
                // rather than leave it halted behind an error.
                if let Err(resume) = link.rsp.cont() {
                    tracing::error!(error = %resume, "could not resume the guest after a failed pause");
                }
                Err(e)
            }
        }
    }

    fn resume_all(&self) -> Result<Duration, GuestError> {
        let mut link = self.link();
        let since = link.halted_since.take().ok_or(GuestError::NotPaused)?;
        link.rsp
            .cont()
            .map_err(|e| GuestError::Resume(Box::new(e)))?;
        Ok(since.elapsed())
    }

    fn read_phys(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        let len = buf.len();
        self.halted(|rsp| rsp.read_phys(gpa, buf))?
            .map_err(|_| GuestError::OutsideMemory { gpa, len })
    }

    fn write_phys(&self, gpa: u64, data: &[u8]) -> Result<(), GuestError> {
        self.halted(|rsp| rsp.write_phys(gpa, data))?
            .map_err(|_| GuestError::OutsideMemory {
                gpa,
                len: data.len(),
            })
    }

    fn set_rip(&self, vcpu: usize, rip: u64) -> Result<(), GuestError> {
        let mut link = self.link();
        if link.halted_since.is_none() {
            return Err(GuestError::NotPaused);
        }
        let thread = link
            .rsp
            .threads
            .get(vcpu)
            .cloned()
            .ok_or(GuestError::NoSuchVcpu(vcpu))?;
        link.rsp
            .set_reg(&thread, "rip", rip)
            .map_err(|e| GuestError::SetRip {
                vcpu,
                source: Box::new(e),
            })
    }
}

/// Every vCPU's registers, read while halted; refuses rather than invent a missing register.
fn snapshot(rsp: &mut Rsp) -> Result<Vec<Option<VcpuState>>, GuestError> {
    let threads = rsp.threads.clone();
    let mut out = Vec::with_capacity(threads.len());
    for (id, t) in threads.iter().enumerate() {
        let g = rsp.registers(t).map_err(|e| GuestError::Registers {
            vcpu: id,
            source: Box::new(e),
        })?;
        let r = |name: &'static str| {
            rsp.reg(&g, name).ok_or(GuestError::Registers {
                vcpu: id,
                source: format!("the gdbstub did not report register {name}").into(),
            })
        };
        out.push(Some(VcpuState {
            id,
            rip: r("rip")?,
            rsp: r("rsp")?,
            cpl: (r("cs")? & 3) as u8,
            paging: PagingRegs {
                cr0: r("cr0")?,
                cr3: r("cr3")?,
                cr4: r("cr4")?,
                efer: r("efer")?,
            },
        }));
    }
    Ok(out)
}

/// The base from an `IDT=     fffffe0000000000 00000fff` line of HMP `info registers`.
pub fn parse_idt_base(text: &str) -> Option<u64> {
    let rest = text
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("IDT="))?;
    u64::from_str_radix(rest.split_whitespace().next()?, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idt_base_comes_from_info_registers() {
        let text = "RAX=0000000000000000 RBX=0000000000000000\nGDT=     fffffe0000001000 0000007f\nIDT=     fffffe0000000000 00000fff\nCR0=80050033";
        assert_eq!(parse_idt_base(text), Some(0xfffffe0000000000));
        assert_eq!(parse_idt_base("nothing"), None);
    }
}
