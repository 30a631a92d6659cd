//! ACPI tables for Linux guests: how a stock kernel learns its CPUs, interrupt controllers,
//! virtio-MMIO devices and how to power off and reboot.
//!
//! Why ACPI and not an MP table: Debian's kernel discovers virtio-MMIO devices only through
//! ACPI (`LNRO0005` devices in the DSDT; its `virtio_mmio.device=` command-line option is
//! compiled out), and ACPI also gives it the MADT for SMP. The tables describe a
//! hardware-reduced ACPI platform, as Firecracker and cloud-hypervisor do: no PM timer, SCI or
//! GPE blocks to emulate; power-off goes through the FADT's sleep control register
//! ([`layout::ACPI_SLEEP_CONTROL_PORT`]) with the DSDT's `_S5_` type, reboot through its reset
//! register (the i8042 reset command at [`layout::I8042_COMMAND_PORT`]).
//!
//! Layout: the RSDP at [`layout::ACPI_START`], then XSDT, FADT, MADT and DSDT, each 16-byte
//! aligned, all below [`layout::ACPI_END`].

use acpi_tables::Aml;
use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemory;

const OEM_ID: [u8; 6] = *b"HOTPCH";
const OEM_TABLE_ID: [u8; 8] = *b"HOTPVMM ";
const OEM_REVISION: u32 = 1;

/// The S5 (soft-off) sleep type the DSDT's `_S5_` announces; the guest writes it back to the
/// sleep control register as `SLP_TYP`.
pub const S5_SLEEP_TYPE: u8 = 5;
/// `SLP_EN` in the hardware-reduced sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;

/// A virtio-MMIO device window the DSDT announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, Default)]
pub struct AcpiConfig {
    pub vcpus: usize,
    pub virtio_mmio: Vec<MmioDevice>,
}

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error(
        "the ACPI tables for {vcpus} vCPUs and {devices} devices need {size} bytes, more than the {} the VMM reserves for them; use fewer vCPUs or devices",
        layout::ACPI_END - layout::ACPI_START
    )]
    TooLarge {
        vcpus: usize,
        devices: usize,
        size: u64,
    },
    #[error("{0} vCPUs cannot be described: APIC ids and ACPI processor ids are 8-bit here")]
    TooManyVcpus(usize),
    #[error(
        "the virtio-MMIO window at {0:#x} is above 4 GiB, which the DSDT's Memory32Fixed cannot name"
    )]
    MmioAbove4G(u64),
    #[error("could not write the ACPI tables into guest memory: {0}")]
    Write(String),
}

/// The bytes of every table, and where each goes.
struct Tables {
    blobs: Vec<(u64, Vec<u8>)>,
}

fn align16(v: u64) -> u64 {
    (v + 15) & !15
}

/// MADT entry types (ACPI 6.5, 5.2.12).
const MADT_LOCAL_APIC: u8 = 0;
const MADT_IO_APIC: u8 = 1;
const MADT_INTERRUPT_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IA-PC boot architecture flag: no VGA to probe.
const IAPC_NO_VGA: u16 = 1 << 2;
/// FADT IA-PC boot architecture flag (ACPI 5.0+): no CMOS RTC at ports 0x70/0x71. There is
/// none here, and saying so keeps Linux from registering `rtc_cmos`, whose probe of the unbacked
/// ports took 14 s of a 28 s boot in the nested tier. The guest's wall-clock time comes from
/// kvm-clock (KVM's `MSR_KVM_WALL_CLOCK_NEW`), not from a CMOS clock.
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// The MADT: one enabled local APIC per vCPU (APIC id = vCPU index, as the CPUID leaves say),
/// the IOAPIC at GSI 0, the PIT's IRQ 0 on GSI 2 (where KVM wires it), NMI on every LINT1.
fn madt(vcpus: usize) -> Result<Vec<u8>, AcpiError> {
    if vcpus > 255 {
        return Err(AcpiError::TooManyVcpus(vcpus));
    }
    let mut body: Vec<u8> = Vec::new();
    body.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus as u8 {
        body.extend_from_slice(&[MADT_LOCAL_APIC, 8, id, id]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // The IOAPIC's id follows the local APICs' so none collide.
    body.extend_from_slice(&[MADT_IO_APIC, 12, vcpus as u8, 0]);
    body.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    body.extend_from_slice(&[MADT_INTERRUPT_OVERRIDE, 10, 0, 0]);
    body.extend_from_slice(&2u32.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    body.extend_from_slice(&[MADT_LOCAL_APIC_NMI, 6, 0xff]);
    body.extend_from_slice(&0u16.to_le_bytes());
    body.push(1);
    let mut sdt = Sdt::new(
        *b"APIC",
        36 + body.len() as u32,
        5,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    sdt.write_bytes(36, &body);
    sdt.update_checksum();
    Ok(sdt.as_slice().to_vec())
}

/// The DSDT: `_S5_` for power-off, COM1, and one `LNRO0005` (virtio-MMIO) device per window.
///
/// Why COM1 is listed: on a hardware-reduced platform Linux sets up no legacy ISA interrupt
/// mappings, so the console's IRQ 4 only reaches the IOAPIC once a device claims it through
/// ACPI (`PNP0501`); without it, output written by user space never leaves the UART.
fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut body: Vec<u8> = Vec::new();
    aml::Name::new(
        "_S5_".into(),
        &aml::Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut body);
    let com1_io = aml::IO::new(
        crate::devices::serial::COM1_BASE,
        crate::devices::serial::COM1_BASE,
        1,
        crate::devices::serial::COM1_LEN as u8,
    );
    let com1_irq = aml::Interrupt::new(true, true, false, false, crate::devices::serial::COM1_GSI);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    aml::Device::new(
        "_SB_.COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &aml::ZERO),
            &aml::Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    for (i, d) in devices.iter().enumerate() {
        let base = u32::try_from(d.base).map_err(|_| AcpiError::MmioAbove4G(d.base))?;
        let len = u32::try_from(d.len).map_err(|_| AcpiError::MmioAbove4G(d.base))?;
        let name = format!("_SB_.V{i:03X}");
        let uid = i as u32;
        let mem = aml::Memory32Fixed::new(true, base, len);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::ResourceTemplate::new(vec![&mem, &irq]);
        aml::Device::new(
            name.as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &uid),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    let mut sdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&body);
    Ok(sdt.as_slice().to_vec())
}

/// The FADT of a hardware-reduced platform with the sleep and reset registers above.
fn fadt(dsdt_at: u64) -> Vec<u8> {
    let io = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_at)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = (IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    b.reset_reg = io(layout::I8042_COMMAND_PORT);
    b.reset_value = layout::I8042_RESET;
    b.sleep_control_reg = io(layout::ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io(layout::ACPI_SLEEP_STATUS_PORT);
    let mut out = Vec::new();
    b.finalize().to_aml_bytes(&mut out);
    out
}

fn build(config: &AcpiConfig) -> Result<Tables, AcpiError> {
    let xsdt_at = align16(layout::ACPI_START + Rsdp::len() as u64);
    // The XSDT lists three tables: header plus three 8-byte pointers.
    let fadt_at = align16(xsdt_at + 36 + 3 * 8);
    let fadt = {
        // The FADT's size does not depend on its contents; build it once the DSDT is placed.
        let len = acpi_tables::fadt::FADT::len() as u64;
        let madt_at = align16(fadt_at + len);
        let madt = madt(config.vcpus)?;
        let dsdt_at = align16(madt_at + madt.len() as u64);
        let dsdt = dsdt(&config.virtio_mmio)?;
        let end = dsdt_at + dsdt.len() as u64;
        if end > layout::ACPI_END {
            return Err(AcpiError::TooLarge {
                vcpus: config.vcpus,
                devices: config.virtio_mmio.len(),
                size: end - layout::ACPI_START,
            });
        }
        let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
        xsdt.add_entry(fadt_at);
        xsdt.add_entry(madt_at);
        let mut xsdt_bytes = Vec::new();
        xsdt.to_aml_bytes(&mut xsdt_bytes);
        let mut rsdp_bytes = Vec::new();
        Rsdp::new(OEM_ID, xsdt_at).to_aml_bytes(&mut rsdp_bytes);
        vec![
            (layout::ACPI_START, rsdp_bytes),
            (xsdt_at, xsdt_bytes),
            (fadt_at, fadt(dsdt_at)),
            (madt_at, madt),
            (dsdt_at, dsdt),
        ]
    };
    Ok(Tables { blobs: fadt })
}

/// Writes the tables; returns the RSDP's guest-physical address (for the zero page's
/// `acpi_rsdp_addr` or PVH's `rsdp_paddr`).
pub fn write(mem: &GuestMemory, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let tables = build(config)?;
    for (at, bytes) in &tables.blobs {
        mem.write_slice(bytes, GuestAddress(*at))
            .map_err(|e| AcpiError::Write(format!("at {at:#x}: {e}")))?;
    }
    tracing::debug!(
        vcpus = config.vcpus,
        devices = config.virtio_mmio.len(),
        rsdp = format_args!("{:#x}", layout::ACPI_START),
        "ACPI tables written"
    );
    Ok(layout::ACPI_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checksum_ok(b: &[u8]) -> bool {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
    }

    fn tables(vcpus: usize, devices: Vec<MmioDevice>) -> Vec<(u64, Vec<u8>)> {
        match build(&AcpiConfig {
            vcpus,
            virtio_mmio: devices,
        }) {
            Ok(t) => t.blobs,
            Err(e) => panic!("tables: {e}"),
        }
    }

    #[test]
    fn every_table_is_checksummed_and_chained_from_the_rsdp() {
        let blobs = tables(
            2,
            vec![MmioDevice {
                base: 0xd000_0000,
                len: 0x1000,
                gsi: 5,
            }],
        );
        let find = |at: u64| blobs.iter().find(|(a, _)| *a == at).map(|(_, b)| b.clone());
        let rsdp = find(layout::ACPI_START).unwrap_or_default();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert!(checksum_ok(&rsdp[..20]), "RSDP v1 checksum");
        assert!(checksum_ok(&rsdp), "RSDP extended checksum");
        let xsdt = find(u64_at(&rsdp, 24)).unwrap_or_default();
        assert_eq!(&xsdt[..4], b"XSDT");
        assert!(checksum_ok(&xsdt));
        let pointed: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let sigs: Vec<[u8; 4]> = pointed
            .iter()
            .filter_map(|&a| find(a))
            .map(|t| [t[0], t[1], t[2], t[3]])
            .collect();
        assert_eq!(sigs, vec![*b"FACP", *b"APIC"]);
        for (at, t) in &blobs[1..] {
            assert!(checksum_ok(t), "table at {at:#x}");
            assert_eq!(u32_at(t, 4) as usize, t.len(), "length field at {at:#x}");
            assert!(*at + t.len() as u64 <= layout::ACPI_END);
        }
        let fadt = find(pointed[0]).unwrap_or_default();
        // X_DSDT (offset 140) names the DSDT; the hardware-reduced flag (bit 20 of offset 112).
        let dsdt = find(u64_at(&fadt, 140)).unwrap_or_default();
        assert_eq!(&dsdt[..4], b"DSDT");
        assert_ne!(u32_at(&fadt, 112) & (1 << 20), 0);
        // IA-PC boot flags (offset 109): no VGA, no CMOS RTC (bits 2 and 5), and no 8042 or
        // legacy devices claimed (bits 1 and 0 clear).
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0b10_0100);
        // Reset register: system I/O, port 0x64, value 0xfe.
        assert_eq!(fadt[116], 1);
        assert_eq!(u64_at(&fadt, 120), 0x64);
        assert_eq!(fadt[128], 0xfe);
        // Sleep control register: system I/O at ACPI_SLEEP_CONTROL_PORT (offset 244).
        assert_eq!(fadt[244], 1);
        assert_eq!(
            u64_at(&fadt, 248),
            u64::from(layout::ACPI_SLEEP_CONTROL_PORT)
        );
        // The DSDT names the virtio-MMIO device and _S5_.
        let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"LNRO0005"));
        assert!(has(b"COM1"));
        assert!(has(b"_S5_"));
        assert!(has(&0xd000_0000u32.to_le_bytes()));
    }

    #[test]
    fn the_madt_lists_one_local_apic_per_vcpu_and_the_ioapic() {
        let madt = madt(3).unwrap_or_default();
        assert_eq!(&madt[..4], b"APIC");
        assert!(checksum_ok(&madt));
        assert_eq!(u32_at(&madt, 36), layout::LAPIC_ADDR as u32);
        let mut at = 44;
        let mut lapics = Vec::new();
        let mut ioapic = None;
        let mut overrides = Vec::new();
        while at + 2 <= madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            assert!(len >= 2, "entry length at {at}");
            match kind {
                MADT_LOCAL_APIC => lapics.push((madt[at + 2], madt[at + 3], u32_at(&madt, at + 4))),
                MADT_IO_APIC => ioapic = Some((madt[at + 2], u32_at(&madt, at + 4))),
                MADT_INTERRUPT_OVERRIDE => overrides.push((madt[at + 3], u32_at(&madt, at + 4))),
                _ => {}
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(ioapic, Some((3, layout::IOAPIC_ADDR as u32)));
        assert_eq!(overrides, vec![(0, 2)]);
        assert!(matches!(madt_err(256), Some(AcpiError::TooManyVcpus(256))));
    }

    fn madt_err(vcpus: usize) -> Option<AcpiError> {
        madt(vcpus).err()
    }

    #[test]
    fn windows_above_4g_and_oversized_tables_are_refused() {
        let above = build(&AcpiConfig {
            vcpus: 1,
            virtio_mmio: vec![MmioDevice {
                base: 1 << 32,
                len: 0x1000,
                gsi: 5,
            }],
        });
        assert!(matches!(above.err(), Some(AcpiError::MmioAbove4G(_))));
        let many = build(&AcpiConfig {
            vcpus: 1,
            virtio_mmio: (0..4000)
                .map(|i| MmioDevice {
                    base: 0xd000_0000 + i * 0x1000,
                    len: 0x1000,
                    gsi: 5,
                })
                .collect(),
        });
        let err = many.err();
        assert!(matches!(err, Some(AcpiError::TooLarge { .. })), "{err:?}");
    }
}
