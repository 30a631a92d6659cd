//! The VM's port-I/O devices: the COM1 console and the test-guest ports (report, fault, exit);
//! and its MMIO devices: virtio-blk disks over virtio-MMIO ([`virtio`]).
//!
//! The test-guest protocol is documented in `docs/guest-protocol.md`; its constants and the
//! report layout come from `guest_tools::protocol`, the same file the guest compiles.

use crate::{acpi, layout};

pub mod reports;
pub mod serial;
pub mod virtio;

pub use reports::{GuestReport, ReportBook};
pub use serial::SerialConsole;

/// Why a VM stops, as decided by a device or a vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// The guest asked to power off with this exit status.
    PoweredOff(u32),
    /// The guest reported a CPU exception it could not handle (through the fault port).
    GuestFault {
        vcpu: usize,
        vector: u64,
        rip: u64,
        error_code: u64,
        cr2: u64,
    },
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN). `rip` is `None` when KVM had already
    /// reset the vCPU: AMD's KVM INITs it on a shutdown (its VMCB is undefined after one), so
    /// its registers then hold the reset state, not the faulting context.
    TripleFault { vcpu: usize, rip: Option<u64> },
    /// KVM could not run the vCPU.
    VcpuError { vcpu: usize, message: String },
    /// The guest asked to reboot (the i8042 reset command, which the ACPI reset register also
    /// names). The VMM does not restart it: it stops, and whoever runs it decides.
    Rebooted,
    /// The VMM was asked to stop (signal or API).
    Requested(String),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::PoweredOff(s) => write!(f, "the guest powered off with status {s}"),
            StopReason::GuestFault {
                vcpu,
                vector,
                rip,
                error_code,
                cr2,
            } => write!(
                f,
                "the guest crashed: CPU exception {vector} ({}) on vCPU {vcpu} at rip {rip:#x}, error code {error_code:#x}, cr2 {cr2:#x}",
                exception_name(*vector)
            ),
            StopReason::TripleFault {
                vcpu,
                rip: Some(rip),
            } => write!(f, "the guest triple-faulted on vCPU {vcpu} at rip {rip:#x}"),
            StopReason::TripleFault { vcpu, rip: None } => write!(
                f,
                "the guest triple-faulted on vCPU {vcpu}; where is unknown: KVM reset the vCPU \
                 (AMD SVM does on a shutdown). On the host, the kvm:kvm_exit trace event of the \
                 SHUTDOWN exit records the guest rip"
            ),
            StopReason::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            StopReason::Rebooted => write!(
                f,
                "the guest rebooted (the VMM stops instead of restarting it)"
            ),
            StopReason::Requested(why) => write!(f, "stopped: {why}"),
        }
    }
}

fn exception_name(vector: u64) -> &'static str {
    match vector {
        0 => "#DE divide error",
        1 => "#DB debug",
        2 => "NMI",
        3 => "#BP breakpoint",
        4 => "#OF overflow",
        5 => "#BR bound range",
        6 => "#UD invalid opcode",
        7 => "#NM device not available",
        8 => "#DF double fault",
        10 => "#TS invalid TSS",
        11 => "#NP segment not present",
        12 => "#SS stack fault",
        13 => "#GP general protection",
        14 => "#PF page fault",
        16 => "#MF x87 error",
        17 => "#AC alignment check",
        18 => "#MC machine check",
        19 => "#XM SIMD error",
        _ => "exception",
    }
}

/// QEMU's `-debugcon` port, forwarded to the console like COM1.
pub const DEBUGCON_PORT: u16 = 0xe9;

/// What the vCPU loop must do after a port access.
#[derive(Debug, PartialEq, Eq)]
pub enum PioOutcome {
    Handled,
    /// Handled, and the VM must stop for this reason.
    Stop(StopReason),
    /// The fault port was written: the vCPU must read its registers to describe the fault.
    GuestFault,
}

/// All port-I/O devices of one VM.
pub struct PortBus {
    pub serial: SerialConsole,
    pub reports: ReportBook,
}

impl PortBus {
    pub fn new(serial: SerialConsole, reports: ReportBook) -> Self {
        PortBus { serial, reports }
    }

    pub fn pio_out(&self, vcpu: usize, port: u16, data: &[u8]) -> PioOutcome {
        use guest_tools::protocol as p;
        match port {
            _ if (serial::COM1_BASE..serial::COM1_BASE + serial::COM1_LEN).contains(&port) => {
                if let Some(&b) = data.first() {
                    self.serial.write((port - serial::COM1_BASE) as u8, b);
                }
                PioOutcome::Handled
            }
            // QEMU's debugcon port: early boot code often prints here before a UART is set up.
            DEBUGCON_PORT => {
                for &b in data {
                    self.serial.debugcon(b);
                }
                PioOutcome::Handled
            }
            p::EXIT_PORT => PioOutcome::Stop(StopReason::PoweredOff(le_value(data) as u32)),
            layout::ACPI_SLEEP_CONTROL_PORT => {
                let v = data.first().copied().unwrap_or(0);
                let sleep_type = (v >> 2) & 0x7;
                if v & acpi::SLEEP_ENABLE != 0 && sleep_type == acpi::S5_SLEEP_TYPE {
                    PioOutcome::Stop(StopReason::PoweredOff(0))
                } else {
                    tracing::debug!(vcpu, value = v, "ACPI sleep request other than S5 ignored");
                    PioOutcome::Handled
                }
            }
            layout::I8042_COMMAND_PORT if data.first() == Some(&layout::I8042_RESET) => {
                PioOutcome::Stop(StopReason::Rebooted)
            }
            p::REPORT_PORT => {
                self.reports.record(vcpu, le_value(data));
                PioOutcome::Handled
            }
            p::FAULT_PORT => PioOutcome::GuestFault,
            _ => {
                tracing::trace!(
                    vcpu,
                    port = format_args!("{port:#x}"),
                    ?data,
                    "write to an unclaimed port"
                );
                PioOutcome::Handled
            }
        }
    }

    pub fn pio_in(&self, port: u16, data: &mut [u8]) {
        if (serial::COM1_BASE..serial::COM1_BASE + serial::COM1_LEN).contains(&port) {
            if let Some(b) = data.first_mut() {
                *b = self.serial.read((port - serial::COM1_BASE) as u8);
            }
        } else if matches!(
            port,
            layout::I8042_COMMAND_PORT
                | layout::I8042_DATA_PORT
                | layout::ACPI_SLEEP_STATUS_PORT
                | layout::ACPI_SLEEP_CONTROL_PORT
        ) {
            // i8042: both buffers empty (a kernel resetting through it polls the input-buffer
            // bit first); ACPI sleep status: not woken.
            data.fill(0);
        } else {
            // Nothing there: an ISA bus floats high.
            data.fill(0xff);
        }
    }
}

fn le_value(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::StopReason;

    #[test]
    fn a_triple_fault_names_its_rip_only_when_kvm_kept_it() {
        let kept = StopReason::TripleFault {
            vcpu: 1,
            rip: Some(0xffff_ffff_8100_0000),
        };
        assert_eq!(
            kept.to_string(),
            "the guest triple-faulted on vCPU 1 at rip 0xffffffff81000000"
        );
        let reset = StopReason::TripleFault { vcpu: 0, rip: None }.to_string();
        assert!(
            reset.contains("vCPU 0") && !reset.contains("0xfff0"),
            "{reset}"
        );
        assert!(reset.contains("kvm:kvm_exit"), "{reset}");
    }
}
