// The test guest's host protocol: I/O ports, exit statuses, the report record.
//
// This file is shared, byte for byte, between the host crate (`guest_tools::protocol`) and the
// freestanding guest (`include!`d by `guest/main.rs`). It must stay plain `core`-only Rust with
// no inner attributes or inner doc comments. `docs/guest-protocol.md` describes the same protocol
// in prose; keep the two in step.

/// COM1 base port: the guest's console (polled output only).
pub const COM1_PORT: u16 = 0x3f8;
/// COM1 line status register (bit 5: transmit holding register empty).
pub const COM1_LSR_PORT: u16 = COM1_PORT + 5;

/// A vCPU writes the guest-physical address of its [`Report`] here (32-bit `out`).
pub const REPORT_PORT: u16 = 0x600;
/// The ring-0 exception handler writes the vector here (32-bit `out`); the registers at that
/// I/O exit carry the details (see [`FaultRegisters`]).
pub const FAULT_PORT: u16 = 0x604;
/// Power off: a 32-bit `out` of the exit status (QEMU `isa-debug-exit` turns status `v` into the
/// process exit code `(v << 1) | 1`; the project's VMM uses `v` as it is).
pub const EXIT_PORT: u16 = 0xf4;

/// Exit status: every vCPU that came online finished its reports.
pub const EXIT_OK: u32 = 0;
/// Exit status: the kernel command line could not be parsed.
pub const EXIT_BAD_CMDLINE: u32 = 2;
/// Exit status: a CPU exception (vector 0..=31) was taken.
pub const EXIT_FAULT: u32 = 3;
/// Exit status: a vCPU's APIC ID is `>= MAX_CPUS`.
pub const EXIT_BAD_APIC_ID: u32 = 4;
/// Exit status: the ring-3 Rust code panicked.
pub const EXIT_PANIC: u32 = 5;
/// Exit status: the PVH `hvm_start_info` is missing or has a bad magic.
pub const EXIT_BAD_START_INFO: u32 = 6;

/// Largest number of vCPUs the guest supports; vCPU index = initial APIC ID (`< MAX_CPUS`).
pub const MAX_CPUS: usize = 32;

/// Guest-physical (= virtual: identity-mapped) address the guest image is linked at.
pub const LINK_ADDRESS: u64 = 0x10_0000;
/// Smallest guest RAM the image runs in (image, stacks and the PVH boot structures fit easily).
pub const MIN_GUEST_RAM: u64 = 4 << 20;

/// The PVH `hvm_start_info` magic (`XEN_HVM_START_MAGIC_VALUE`).
pub const PVH_START_MAGIC: u32 = 0x336e_c578;

/// `Report::magic`: "HPRP" in little-endian byte order.
pub const REPORT_MAGIC: u32 = 0x5052_5048;
/// `Report::version` of this layout.
pub const PROTOCOL_VERSION: u16 = 1;

/// `Report::build` of the v1 guest.
pub const BUILD_V1: u32 = 1;
/// `Report::build` of the v2 guest.
pub const BUILD_V2: u32 = 2;

/// `Report::flags` bit: this is the vCPU's last report (`reports=N` reached).
pub const REPORT_FLAG_FINAL: u32 = 1 << 0;

/// Default `batch=`: `compute` calls between two reports.
pub const DEFAULT_BATCH: u64 = 1 << 22;

/// Default `spin=` (`mode=spin`): `spin_wait` iterations. About 5 s on the development machine
/// (AMD EPYC under PVM: 35-46 M `pause` iterations per second per vCPU, see
/// docs/guest-protocol.md); the rate depends on the CPU's `pause` latency.
pub const DEFAULT_SPIN: u64 = 200_000_000;

/// One vCPU's progress report. The guest fills it, then writes its guest-physical address
/// (identity-mapped, below 4 GiB) to [`REPORT_PORT`]. Little-endian, no padding, 72 bytes.
///
/// | offset | field         | type |
/// |--------|---------------|------|
/// | 0      | `magic`       | u32  |
/// | 4      | `version`     | u16  |
/// | 6      | `vcpu`        | u16  |
/// | 8      | `build`       | u32  |
/// | 12     | `flags`       | u32  |
/// | 16     | `seq`         | u64  |
/// | 24     | `calls`       | u64  |
/// | 32     | `v1`          | u64  |
/// | 40     | `v2`          | u64  |
/// | 48     | `bad`         | u64  |
/// | 56     | `last_input`  | u64  |
/// | 64     | `last_output` | u64  |
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Report {
    /// [`REPORT_MAGIC`].
    pub magic: u32,
    /// [`PROTOCOL_VERSION`].
    pub version: u16,
    /// vCPU index (= initial APIC ID).
    pub vcpu: u16,
    /// [`BUILD_V1`] or [`BUILD_V2`]: which image booted (not what is running after a patch).
    pub build: u32,
    /// `REPORT_FLAG_*` bits.
    pub flags: u32,
    /// 1 for the first report of this vCPU, then +1 per report.
    pub seq: u64,
    /// Total `compute` calls of this vCPU so far.
    pub calls: u64,
    /// Calls whose result equalled the v1 oracle.
    pub v1: u64,
    /// Calls whose result equalled the v2 oracle.
    pub v2: u64,
    /// Calls whose result equalled neither oracle.
    pub bad: u64,
    /// Input of the last call.
    pub last_input: u64,
    /// Result of the last call.
    pub last_output: u64,
}

/// Size of [`Report`] in bytes.
pub const REPORT_SIZE: usize = 72;

const _: () = assert!(core::mem::size_of::<Report>() == REPORT_SIZE);
const _: () = assert!(core::mem::align_of::<Report>() == 8);

impl Report {
    /// Byte offsets of the fields (the table above).
    pub const OFFSET_MAGIC: usize = 0;
    pub const OFFSET_VERSION: usize = 4;
    pub const OFFSET_VCPU: usize = 6;
    pub const OFFSET_BUILD: usize = 8;
    pub const OFFSET_FLAGS: usize = 12;
    pub const OFFSET_SEQ: usize = 16;
    pub const OFFSET_CALLS: usize = 24;
    pub const OFFSET_V1: usize = 32;
    pub const OFFSET_V2: usize = 40;
    pub const OFFSET_BAD: usize = 48;
    pub const OFFSET_LAST_INPUT: usize = 56;
    pub const OFFSET_LAST_OUTPUT: usize = 64;

    /// Encodes the report in its wire layout (little-endian).
    pub fn to_bytes(self) -> [u8; REPORT_SIZE] {
        let mut b = [0u8; REPORT_SIZE];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.vcpu.to_le_bytes());
        b[8..12].copy_from_slice(&self.build.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        let words = [
            self.seq,
            self.calls,
            self.v1,
            self.v2,
            self.bad,
            self.last_input,
            self.last_output,
        ];
        let mut off = Self::OFFSET_SEQ;
        for w in words {
            b[off..off + 8].copy_from_slice(&w.to_le_bytes());
            off += 8;
        }
        b
    }

    /// Decodes a report from its wire layout. Returns `None` if `bytes` is shorter than
    /// [`REPORT_SIZE`]. The magic and version are not checked: see [`Report::is_valid`].
    pub fn from_bytes(bytes: &[u8]) -> Option<Report> {
        if bytes.len() < REPORT_SIZE {
            return None;
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let u64_at = |o: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[o..o + 8]);
            u64::from_le_bytes(w)
        };
        Some(Report {
            magic: u32_at(Self::OFFSET_MAGIC),
            version: u16_at(Self::OFFSET_VERSION),
            vcpu: u16_at(Self::OFFSET_VCPU),
            build: u32_at(Self::OFFSET_BUILD),
            flags: u32_at(Self::OFFSET_FLAGS),
            seq: u64_at(Self::OFFSET_SEQ),
            calls: u64_at(Self::OFFSET_CALLS),
            v1: u64_at(Self::OFFSET_V1),
            v2: u64_at(Self::OFFSET_V2),
            bad: u64_at(Self::OFFSET_BAD),
            last_input: u64_at(Self::OFFSET_LAST_INPUT),
            last_output: u64_at(Self::OFFSET_LAST_OUTPUT),
        })
    }

    /// Magic and version match this protocol, and the counts add up.
    pub fn is_valid(&self) -> bool {
        self.magic == REPORT_MAGIC
            && self.version == PROTOCOL_VERSION
            && (self.build == BUILD_V1 || self.build == BUILD_V2)
            && (self.vcpu as usize) < MAX_CPUS
            && self
                .v1
                .checked_add(self.v2)
                .and_then(|s| s.checked_add(self.bad))
                == Some(self.calls)
    }
}

/// A CPU exception as the VMM sees it at the 32-bit `out` to [`FAULT_PORT`]. The ring-0
/// handler loads these registers just before the `out` (the value written, `eax`, is the vector
/// again), then writes [`EXIT_FAULT`] to [`EXIT_PORT`] and halts. `rdx` carries no data: it
/// holds the port number of the `out`.
///
/// | register | field        |
/// |----------|--------------|
/// | `rdi`    | `vector`     |
/// | `rsi`    | `rip`        |
/// | `rcx`    | `cr2`        |
/// | `r8`     | `cpu`        |
/// | `r9`     | `error_code` |
/// | `r10`    | `cs`         |
/// | `r11`    | `rsp`        |
/// | `r12`    | `rflags`     |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultInfo {
    /// Exception vector (0..=31).
    pub vector: u64,
    /// RIP saved in the exception frame.
    pub rip: u64,
    /// CR2 (the faulting linear address of a #PF).
    pub cr2: u64,
    /// vCPU index (initial APIC ID).
    pub cpu: u64,
    /// Error code pushed by the CPU, or 0 for vectors without one.
    pub error_code: u64,
    /// CS saved in the exception frame (`cs & 3` is the CPL of the faulting code).
    pub cs: u64,
    /// RSP saved in the exception frame.
    pub rsp: u64,
    /// RFLAGS saved in the exception frame.
    pub rflags: u64,
}

impl FaultInfo {
    /// The mnemonic of an exception vector (`"#PF"`), or `"#??"` for reserved ones.
    pub fn vector_name(vector: u64) -> &'static str {
        match vector {
            0 => "#DE",
            1 => "#DB",
            2 => "NMI",
            3 => "#BP",
            4 => "#OF",
            5 => "#BR",
            6 => "#UD",
            7 => "#NM",
            8 => "#DF",
            10 => "#TS",
            11 => "#NP",
            12 => "#SS",
            13 => "#GP",
            14 => "#PF",
            16 => "#MF",
            17 => "#AC",
            18 => "#MC",
            19 => "#XM",
            20 => "#VE",
            21 => "#CP",
            _ => "#??",
        }
    }
}
