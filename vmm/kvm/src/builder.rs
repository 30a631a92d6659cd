//! Building a VM as named steps, in the order KVM needs them: open KVM and check the request,
//! create the VM with its in-kernel irqchip and PIT, the devices, the vCPUs, and their threads.
//! [`crate::vm::Vm::start`] composes them with memory, code integrity and boot.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::BootSpec;
use crate::devices::serial::{COM1_GSI, ConsoleOut, IrqTrigger};
use crate::devices::virtio::{self, Block, DiskImage, MmioBus, MmioTransport};
use crate::devices::{PortBus, ReportBook, SerialConsole};
use crate::layout;
use crate::memory::GuestMemory;
use crate::vcpu::{self, VcpuThread, kick};
use crate::vm::{ConsoleSink, MAX_VCPUS, VmConfig, VmError};

/// Opens the KVM device and checks the vCPU count against what it allows.
pub fn open(config: &VmConfig) -> Result<Kvm, VmError> {
    if config.vcpus == 0 {
        return Err(VmError::NoVcpus);
    }
    let kvm = open_kvm(&config.kvm_device)?;
    let max = kvm.get_max_vcpus().min(MAX_VCPUS);
    if config.vcpus > max {
        return Err(VmError::TooManyVcpus {
            requested: config.vcpus,
            max,
        });
    }
    Ok(kvm)
}

fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let shown = path.display().to_string();
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| {
        VmError::NoKvm {
            path: shown.clone(),
        }
    })?;
    let kvm = Kvm::new_with_path(&cpath).map_err(|source| match source.errno() {
        libc::ENOENT | libc::ENXIO | libc::ENODEV => VmError::NoKvm {
            path: shown.clone(),
        },
        libc::EACCES | libc::EPERM => VmError::KvmPermission {
            path: shown.clone(),
        },
        _ => VmError::KvmOpen {
            path: shown.clone(),
            source,
        },
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(VmError::KvmVersion {
            path: shown,
            version,
        });
    }
    Ok(kvm)
}

/// The VM with its TSS, in-kernel irqchip and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let kvm_err = |what| move |source| VmError::Kvm { what, source };
    let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
    vm_fd
        .set_tss_address(layout::KVM_TSS_ADDR as usize)
        .map_err(kvm_err("TSS address"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_err("in-kernel irqchip"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_err("in-kernel PIT"))?;
    Ok(vm_fd)
}

/// The port-I/O devices: the serial console (its interrupt through an irqfd) and the test
/// guest's report book.
pub fn devices(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    vcpus: usize,
    console: ConsoleSink,
    console_lines: &Option<Arc<Mutex<Vec<String>>>>,
) -> Result<Arc<PortBus>, VmError> {
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Host {
        what: "the console IRQ",
        source,
    })?;
    vm_fd
        .register_irqfd(&irq, COM1_GSI)
        .map_err(|source| VmError::Kvm {
            what: "console irqfd",
            source,
        })?;
    let sink: Box<dyn Write + Send> = match console {
        ConsoleSink::Stdout => Box::new(std::io::stdout()),
        ConsoleSink::Discard => Box::new(std::io::sink()),
        ConsoleSink::Writer(w) => w,
    };
    Ok(Arc::new(PortBus::new(
        SerialConsole::new(
            IrqTrigger(irq),
            ConsoleOut::new(sink, console_lines.clone()),
        ),
        ReportBook::new(mem.clone(), vcpus),
    )))
}

/// The MMIO devices: one virtio-blk device per opened disk, each in its own window of
/// [`layout`] with its interrupt through an irqfd. `dma` says which guest memory the devices
/// may write.
pub fn mmio_devices(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    disks: Vec<DiskImage>,
    dma: virtio::block::DmaFilter,
) -> Result<Arc<MmioBus>, VmError> {
    let mut bus = MmioBus::new();
    for (index, image) in disks.into_iter().enumerate() {
        let (base, gsi) =
            virtio::device_window(index).ok_or(VmError::Disk(virtio::DiskError::TooMany {
                count: index + 1,
                max: layout::VIRTIO_MMIO_MAX_DEVICES,
            }))?;
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::Host {
            what: "a disk's IRQ",
            source,
        })?;
        vm_fd
            .register_irqfd(&irq, gsi)
            .map_err(|source| VmError::Kvm {
                what: "disk irqfd",
                source,
            })?;
        tracing::info!(
            disk = %image.path.display(),
            index,
            base = format_args!("{base:#x}"),
            gsi,
            read_only = image.read_only,
            sectors = image.sectors,
            "virtio-blk device"
        );
        let device = Block::new(image, index, dma.clone());
        bus.add(
            base,
            layout::VIRTIO_MMIO_SIZE,
            Box::new(MmioTransport::new(device, mem.clone(), irq)),
        );
    }
    Ok(Arc::new(bus))
}

/// Every vCPU, set up for the boot `spec` with its own CPUID.
pub fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    vcpus: usize,
    spec: &BootSpec,
) -> Result<Vec<VcpuFd>, VmError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|source| VmError::Kvm {
            what: "supported CPUID",
            source,
        })?;
    let fds = (0..vcpus)
        .map(|id| vcpu::create(vm_fd, id, vcpus, spec, &cpuid))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(fds)
}

/// Starts one thread per vCPU. Each waits until every kicker is registered, so a pause can
/// reach a vCPU from its first entry into the guest.
pub fn run_vcpus(
    vcpus: Vec<VcpuThread>,
    kickers: &OnceLock<Vec<kick::Kicker>>,
) -> Result<Vec<JoinHandle<()>>, VmError> {
    kick::install_handler().map_err(|e| VmError::Host {
        what: "the vCPU kick signal",
        source: std::io::Error::from_raw_os_error(e.errno()),
    })?;
    let barrier = Arc::new(std::sync::Barrier::new(vcpus.len() + 1));
    let mut threads = Vec::with_capacity(vcpus.len());
    for t in vcpus {
        let b = barrier.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", t.id))
            .spawn(move || {
                // Kicks must find the thread registered before it can enter the guest.
                b.wait();
                t.run()
            })
            .map_err(|source| VmError::Host {
                what: "a vCPU thread",
                source,
            })?;
        threads.push(handle);
    }
    let _ = kickers.set(threads.iter().map(kick::Kicker::for_thread).collect());
    barrier.wait();
    Ok(threads)
}
