//! Loading a guest image and the register state each vCPU starts with.
//!
//! Three ways in, chosen by the image: an ELF with a PVH note (`XEN_ELFNOTE_PHYS32_ENTRY`)
//! starts in 32-bit protected mode with paging off at the note's address and `ebx` pointing at
//! `hvm_start_info` (what QEMU and cloud-hypervisor do); any other x86-64 ELF starts in long mode
//! at `e_entry`, on the VMM's identity map, with `rsi` pointing at a Linux zero page; a Linux
//! bzImage whose decompressed kernel the caller supplies is placed and relocated by
//! [`crate::kaslr`] and entered at the kernel proper's `startup_64`; without it the bzImage is
//! loaded by the x86 boot protocol and entered at its 64-bit entry (`startup_64`, 0x200 past
//! the protected-mode kernel), so its decompressor runs and randomises where the kernel lands
//! as on any PC. Both get the zero page built from the bzImage's own setup header.
//!
//! Linux guests (a bzImage, or an ELF carrying a Linux banner) also get ACPI tables
//! ([`crate::acpi`]), an initrd when one is given (zero page `ramdisk_*`, or a PVH module), and
//! their application processors wait for the INIT/SIPI the kernel sends, where our own test
//! guest starts every vCPU at its entry.

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    XEN_HVM_MEMMAP_TYPE_RAM, XEN_HVM_MEMMAP_TYPE_RESERVED, hvm_memmap_table_entry,
    hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{Cmdline, KernelLoader, load_cmdline};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::{self, BOOT_GDT, BOOT_INFO, CMDLINE, CMDLINE_MAX, HIMEM_START, PVH_MEMMAP};
use crate::memory::GuestMemory;
use crate::pagetables;

/// Images larger than this are refused before reading them whole.
pub const MAX_IMAGE_SIZE: u64 = 512 << 20;

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot read the guest image {path}")]
    ReadImage {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest image {path} is {size} bytes, more than the {} MiB this VMM loads", MAX_IMAGE_SIZE >> 20)]
    ImageTooLarge { path: String, size: u64 },
    #[error("{path} is not a bootable image: {why}")]
    NotBootable { path: String, why: String },
    #[error("{path} could not be loaded into guest memory (is --memory large enough for it?)")]
    Load {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error(
        "{path} cannot be loaded: its segment at {start:#x}..{end:#x} overlaps the patch arena at {arena_start:#x}..{arena_end:#x}, which the VMM reserves"
    )]
    OverlapsArena {
        path: String,
        start: u64,
        end: u64,
        arena_start: u64,
        arena_end: u64,
    },
    #[error(
        "{path} needs {needed_mib} MiB of RAM to decompress and run ({what}), but the VM has {have_mib} MiB; raise --memory"
    )]
    TooLarge {
        path: String,
        what: &'static str,
        needed_mib: u64,
        have_mib: u64,
    },
    #[error(
        "the initrd {path} ({size} bytes) does not fit in guest memory: it must lie below {limit:#x}, above the kernel's {kernel_end:#x}, in RAM; raise --memory (at least {needed_mib} MiB)"
    )]
    InitrdTooLarge {
        path: String,
        size: u64,
        limit: u64,
        kernel_end: u64,
        needed_mib: u64,
    },
    #[error(
        "an initrd was given, but {path} is not a Linux kernel; only Linux guests take an initrd"
    )]
    InitrdNotLinux { path: String },
    #[error(transparent)]
    Acpi(#[from] crate::acpi::AcpiError),
    #[error("the kernel command line is invalid: {0}")]
    Cmdline(String),
    #[error("could not write the boot structures into guest memory: {0}")]
    BootParams(String),
    #[error(
        "the decompressed kernel given for {path} cannot be loaded ({source}); boot the bzImage with its own decompressor (vmm run without --vmm-decompress)"
    )]
    Decompressed {
        path: String,
        #[source]
        source: crate::kaslr::KaslrError,
    },
    #[error("cannot draw KASLR's random numbers from /dev/urandom")]
    Random(#[source] std::io::Error),
}

/// How the vCPUs enter the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, `ebx` = `hvm_start_info`.
    Pvh32,
    /// Linux 64-bit boot protocol: long mode, identity-mapped, `rsi` = zero page.
    Long64,
}

/// What was loaded and how to start it.
#[derive(Debug, Clone, Copy)]
pub struct BootSpec {
    pub mode: EntryMode,
    pub entry: u64,
    pub kernel_end: u64,
    /// A Linux kernel: only vCPU 0 starts at the entry; the others wait for INIT/SIPI.
    pub linux: bool,
}

impl BootSpec {
    /// Whether vCPU `id` starts at the entry point (else it waits for the guest's INIT/SIPI).
    pub fn starts_at_entry(&self, id: usize) -> bool {
        !self.linux || id == 0
    }
}

/// What to boot besides the image: the command line, an initrd, and what the ACPI tables of a
/// Linux guest describe.
pub struct BootRequest<'a> {
    pub image: &'a Image<'a>,
    pub cmdline: &'a str,
    pub initrd: Option<&'a Image<'a>>,
    pub acpi: crate::acpi::AcpiConfig,
    /// A bzImage's decompressed kernel (its ELF and relocation table), when the VMM holds it:
    /// the VMM then places and relocates it as the decompressor would ([`crate::kaslr`]) and the
    /// guest never runs its decompressor. `None`: the decompressor runs in the guest.
    pub decompressed: Option<&'a [u8]>,
    /// The two random numbers KASLR draws (`None`: from `/dev/urandom`); fixed by tests and by
    /// `vmm run --kaslr-seed`.
    pub kaslr_random: Option<[u64; 2]>,
}

/// Offset of the 64-bit entry (`startup_64`) in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY: u64 = 0x200;
/// Setup header `xloadflags` bit: the kernel has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
/// Setup header `loadflags` bit the decompressor sets when it randomised the kernel's place:
/// the kernel then also randomises its memory regions (`kaslr_enabled()`).
const KASLR_FLAG: u8 = 1 << 1;
/// Boot protocol version that added `init_size`/`pref_address` (2.10).
const BOOT_PROTOCOL_2_10: u16 = 0x20a;
/// Setup header offset in a bzImage, and its magic.
const SETUP_HEADER_OFFSET: usize = 0x1f1;

/// A Linux bzImage: the boot protocol's `HdrS` magic at 0x202.
pub fn is_bzimage(b: &[u8]) -> bool {
    b.len() >= 0x206 && &b[0x202..0x206] == b"HdrS"
}

/// A Linux kernel: a bzImage, or an ELF vmlinux.
pub fn is_linux_image(b: &[u8]) -> bool {
    is_bzimage(b) || is_linux_elf(b)
}

/// An ELF that is a Linux kernel (a vmlinux): it carries `Linux version ` (its banner).
fn is_linux_elf(b: &[u8]) -> bool {
    // memmem, not a windowed compare: a vmlinux is ~60 MB, and where the VMM's user space is
    // emulated (the nested tier) a byte-wise scan of it took 10 s.
    memchr::memmem::find(b, b"Linux version ").is_some()
}

/// The image to boot: a path for messages and its bytes.
pub struct Image<'a> {
    pub name: String,
    pub bytes: std::borrow::Cow<'a, [u8]>,
}

impl Image<'static> {
    /// Reads a guest image from disk, bounded by `MAX_IMAGE_SIZE`.
    pub fn from_file(path: &std::path::Path) -> Result<Self, BootError> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|source| BootError::ReadImage {
            path: name.clone(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BootError::NotBootable {
                path: name,
                why: "it is not a regular file".into(),
            });
        }
        if meta.len() > MAX_IMAGE_SIZE {
            return Err(BootError::ImageTooLarge {
                path: name,
                size: meta.len(),
            });
        }
        let bytes = std::fs::read(path).map_err(|source| BootError::ReadImage {
            path: name.clone(),
            source,
        })?;
        Ok(Image {
            name,
            bytes: bytes.into(),
        })
    }
}

/// Rejects anything but a little-endian x86-64 ELF with a clear reason, before the loader
/// gives a terser one.
fn check_image(image: &Image<'_>) -> Result<(), BootError> {
    let b = &image.bytes;
    let not = |why: &str| BootError::NotBootable {
        path: image.name.clone(),
        why: why.to_string(),
    };
    if b.len() < 64 || &b[0..4] != b"\x7fELF" {
        return Err(not(
            "it is not an ELF file or a Linux bzImage (expected a bzImage, a vmlinux, or an x86-64 ELF executable)",
        ));
    }
    if b[4] != 2 || b[5] != 1 {
        return Err(not("it is not a 64-bit little-endian ELF"));
    }
    let machine = u16::from_le_bytes([b[18], b[19]]);
    if machine != 62 {
        return Err(not(&format!(
            "its ELF machine is {machine}, not x86-64 (62)"
        )));
    }
    let kind = u16::from_le_bytes([b[16], b[17]]);
    if kind != 2 {
        return Err(not(&format!(
            "its ELF type is {kind}, not an executable (2)"
        )));
    }
    check_segments_avoid_arena(image)
}

const PT_LOAD: u32 = 1;
/// Size of an ELF64 program header.
const PHDR_SIZE: usize = 56;

/// Refuses an image with a loadable segment (file bytes or bss) in the patch arena.
///
/// Why: the loader writes segments wherever their physical address says, and a guest whose
/// image lived in the arena would treat patch code as its own data (and the VMM would write
/// patches over the guest's image).
fn check_segments_avoid_arena(image: &Image<'_>) -> Result<(), BootError> {
    match segment_in_arena(&image.bytes) {
        Some((start, end)) => Err(BootError::OverlapsArena {
            path: image.name.clone(),
            start,
            end,
            arena_start: layout::PATCH_ARENA_START,
            arena_end: layout::PATCH_ARENA_END,
        }),
        None => Ok(()),
    }
}

/// The first loadable segment of the ELF `b` that overlaps the patch arena, as (start, end).
/// `None` also when the program headers do not parse: the loader refuses those with its own
/// reason.
fn segment_in_arena(b: &[u8]) -> Option<(u64, u64)> {
    let phoff = usize::try_from(u64::from_le_bytes(bytes_at(b, 32)?)).ok()?;
    let entsize = usize::from(u16::from_le_bytes(bytes_at(b, 54)?));
    let phnum = usize::from(u16::from_le_bytes(bytes_at(b, 56)?));
    if entsize < PHDR_SIZE {
        return None;
    }
    (0..phnum).find_map(|i| {
        let at = phoff.checked_add(i.checked_mul(entsize)?)?;
        let kind = u32::from_le_bytes(bytes_at(b, at)?);
        let paddr = u64::from_le_bytes(bytes_at(b, at.checked_add(24)?)?);
        let memsz = u64::from_le_bytes(bytes_at(b, at.checked_add(40)?)?);
        let end = paddr.saturating_add(memsz);
        (kind == PT_LOAD && layout::PATCH_ARENA.overlaps(paddr, end)).then_some((paddr, end))
    })
}

/// `N` bytes of `b` at `offset`, if all are there.
fn bytes_at<const N: usize>(b: &[u8], offset: usize) -> Option<[u8; N]> {
    b.get(offset..offset.checked_add(N)?)?.try_into().ok()
}

/// Loads the image of `req` into `mem`, writes the command line and the boot structures.
pub fn load(
    mem: &GuestMemory,
    mem_size: u64,
    req: &BootRequest<'_>,
) -> Result<BootSpec, BootError> {
    let image = req.image;
    if is_bzimage(&image.bytes) {
        return load_bzimage(mem, mem_size, req);
    }
    check_image(image)?;
    let linux = is_linux_elf(&image.bytes);
    if req.initrd.is_some() && !linux {
        return Err(BootError::InitrdNotLinux {
            path: image.name.clone(),
        });
    }
    let mut cursor = Cursor::new(image.bytes.as_ref());
    let result =
        Elf::load(mem, None, &mut cursor, Some(GuestAddress(HIMEM_START))).map_err(|source| {
            BootError::Load {
                path: image.name.clone(),
                source,
            }
        })?;
    let cmdline = if linux {
        linux_cmdline(req.cmdline)
    } else {
        req.cmdline.to_string()
    };
    write_cmdline(mem, &cmdline)?;
    let rsdp = if linux {
        Some(crate::acpi::write(mem, &req.acpi)?)
    } else {
        None
    };
    let initrd = match req.initrd {
        Some(initrd) => Some(place_initrd(
            mem,
            mem_size,
            initrd,
            result.kernel_end,
            u64::from(u32::MAX),
        )?),
        None => None,
    };

    let spec = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => {
            write_pvh_start_info(mem, mem_size, rsdp, initrd)?;
            BootSpec {
                mode: EntryMode::Pvh32,
                entry: addr.0,
                kernel_end: result.kernel_end,
                linux,
            }
        }
        _ => {
            let entry = elf_entry(&image.bytes).ok_or_else(|| BootError::NotBootable {
                path: image.name.clone(),
                why: "its ELF header is truncated".into(),
            })?;
            let mut params = boot_params::default();
            params.hdr.type_of_loader = 0xff;
            params.hdr.boot_flag = 0xaa55;
            params.hdr.header = 0x5372_6448; // "HdrS"
            params.hdr.kernel_alignment = 0x0100_0000;
            write_zero_page(mem, mem_size, params, cmdline.len(), rsdp, initrd)?;
            write_page_tables(mem)?;
            BootSpec {
                mode: EntryMode::Long64,
                entry,
                kernel_end: result.kernel_end,
                linux,
            }
        }
    };
    write_gdt(mem, spec.mode)?;
    tracing::debug!(mode = ?spec.mode, entry = format_args!("{:#x}", spec.entry), kernel_end = spec.kernel_end, linux, "image loaded");
    Ok(spec)
}

/// The command line a Linux kernel gets: the user's, plus `pci=off` unless it says something
/// about `pci=` itself. This VMM has no PCI bus (its disks are virtio-MMIO), and without
/// being told so the kernel probes for one through port I/O: on an AMD family 0xf/0x10 CPU its
/// GART aperture checks alone read the configuration space of every bus and slot, one exit per
/// port access, about 4 s of a nested boot (docs/linux-guests.md, "Boot"). Firecracker tells
/// its guests the same.
pub fn linux_cmdline(user: &str) -> String {
    let says_pci = user.split_ascii_whitespace().any(|w| w.starts_with("pci="));
    match (says_pci, user.trim().is_empty()) {
        (true, _) => user.to_string(),
        (false, true) => "pci=off".to_string(),
        (false, false) => format!("{} pci=off", user.trim_end()),
    }
}

fn write_cmdline(mem: &GuestMemory, cmdline: &str) -> Result<(), BootError> {
    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    if !cmdline.is_empty() {
        cl.insert_str(cmdline)
            .map_err(|e| BootError::Cmdline(e.to_string()))?;
    }
    load_cmdline(mem, GuestAddress(CMDLINE), &cl).map_err(|e| BootError::Cmdline(e.to_string()))
}

fn mib_up(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

/// The first RAM region at or above 1 MiB: where kernels and initrds go.
fn high_ram(mem_size: u64) -> Option<layout::RamRegion> {
    layout::ram_regions(mem_size)
        .into_iter()
        .find(|r| r.end() > HIMEM_START)
}

/// The setup header of a bzImage, read without trusting any of its fields.
fn bzimage_header(
    image: &Image<'_>,
) -> Result<linux_loader::loader::bootparam::setup_header, BootError> {
    use linux_loader::loader::bootparam::setup_header;
    let size = std::mem::size_of::<setup_header>();
    let raw = image
        .bytes
        .get(SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + size)
        .ok_or_else(|| BootError::NotBootable {
            path: image.name.clone(),
            why: "it is a bzImage truncated inside its setup header".into(),
        })?;
    // SAFETY: `setup_header` is a plain-old-data `repr(C, packed)` struct of integers (every bit
    // pattern is valid), and `raw` holds exactly `size_of::<setup_header>()` bytes; the read is
    // unaligned-safe.
    Ok(unsafe { std::ptr::read_unaligned(raw.as_ptr().cast::<setup_header>()) })
}

/// Loads a bzImage by the x86 boot protocol and prepares its 64-bit entry.
fn load_bzimage(
    mem: &GuestMemory,
    mem_size: u64,
    req: &BootRequest<'_>,
) -> Result<BootSpec, BootError> {
    use linux_loader::loader::bzimage::BzImage;
    let image = req.image;
    let name = image.name.clone();
    let not = |why: &str| BootError::NotBootable {
        path: name.clone(),
        why: why.to_string(),
    };
    let hdr = bzimage_header(image)?;
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < BOOT_PROTOCOL_2_10 {
        return Err(not(&format!(
            "its boot protocol is {}.{:02}; this VMM needs 2.10 or later (kernels since 2.6.31)",
            version >> 8,
            version & 0xff
        )));
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(not(
            "it has no 64-bit entry point (XLF_KERNEL_64): not an x86-64 kernel",
        ));
    }
    let setup_sects = if hdr.setup_sects == 0 {
        4
    } else {
        u64::from(hdr.setup_sects)
    };
    let payload = (image.bytes.len() as u64).saturating_sub((setup_sects + 1) * 512);
    if payload == 0 {
        return Err(not(
            "it is a bzImage with no protected-mode kernel after its setup code",
        ));
    }
    // The decompressor runs in place at the load address and writes the kernel at
    // `pref_address` (or wherever KASLR picks), needing `init_size` bytes there.
    let init_size = u64::from(hdr.init_size);
    let pref = hdr.pref_address.max(HIMEM_START);
    let needed = pref
        .saturating_add(init_size)
        .max(HIMEM_START.saturating_add(payload));
    let ram = high_ram(mem_size);
    let have_end = ram.map(|r| r.end()).unwrap_or(0);
    if needed > have_end {
        return Err(BootError::TooLarge {
            path: name,
            what: "its decompressed size",
            needed_mib: mib_up(needed),
            have_mib: mem_size >> 20,
        });
    }
    if let Some(blob) = req.decompressed {
        return load_decompressed(mem, mem_size, req, hdr, blob);
    }
    let mut cursor = Cursor::new(image.bytes.as_ref());
    let result = BzImage::load(mem, Some(GuestAddress(HIMEM_START)), &mut cursor, None).map_err(
        |source| BootError::Load {
            path: name.clone(),
            source,
        },
    )?;
    let Some(mut setup) = result.setup_header else {
        return Err(not("the loader returned no setup header"));
    };
    let inputs = write_linux_inputs(mem, mem_size, req, needed, hdr.initrd_addr_max)?;
    setup.code32_start = HIMEM_START as u32;
    let spec = enter_linux_64(
        mem,
        mem_size,
        setup,
        &inputs,
        HIMEM_START + BZIMAGE_64BIT_ENTRY,
        needed,
    )?;
    tracing::debug!(entry = format_args!("{:#x}", spec.entry), init_size, protocol = format_args!("{version:#x}"), initrd = ?inputs.initrd, "bzImage loaded");
    Ok(spec)
}

/// What a bzImage boot writes besides the kernel: the command line ([`linux_cmdline`]), the
/// ACPI tables and the initrd, above `kernel_end` and below the kernel's `initrd_addr_max`.
fn write_linux_inputs(
    mem: &GuestMemory,
    mem_size: u64,
    req: &BootRequest<'_>,
    kernel_end: u64,
    initrd_max: u32,
) -> Result<LinuxInputs, BootError> {
    let cmdline = linux_cmdline(req.cmdline);
    write_cmdline(mem, &cmdline)?;
    tracing::debug!(%cmdline, "Linux command line");
    let rsdp = crate::acpi::write(mem, &req.acpi)?;
    let initrd = match req.initrd {
        Some(initrd) => Some(place_initrd(
            mem,
            mem_size,
            initrd,
            kernel_end,
            u64::from(initrd_max),
        )?),
        None => None,
    };
    Ok(LinuxInputs {
        rsdp,
        initrd,
        cmdline_len: cmdline.len(),
    })
}

/// The end of both bzImage boots: the zero page from `hdr` (this VMM as its loader) and what
/// [`write_linux_inputs`] placed, the identity map and the GDT for a 64-bit entry at `entry`.
fn enter_linux_64(
    mem: &GuestMemory,
    mem_size: u64,
    mut hdr: linux_loader::loader::bootparam::setup_header,
    inputs: &LinuxInputs,
    entry: u64,
    kernel_end: u64,
) -> Result<BootSpec, BootError> {
    hdr.type_of_loader = 0xff;
    let params = boot_params {
        hdr,
        ..Default::default()
    };
    write_zero_page(
        mem,
        mem_size,
        params,
        inputs.cmdline_len,
        Some(inputs.rsdp),
        inputs.initrd,
    )?;
    write_page_tables(mem)?;
    let spec = BootSpec {
        mode: EntryMode::Long64,
        entry,
        kernel_end,
        linux: true,
    };
    write_gdt(mem, spec.mode)?;
    Ok(spec)
}

/// Where [`write_linux_inputs`] put things, for the zero page.
struct LinuxInputs {
    rsdp: u64,
    initrd: Option<InitrdPlace>,
    cmdline_len: usize,
}

/// Loads a bzImage's decompressed kernel where KASLR puts it, relocated, and prepares its
/// 64-bit entry (`startup_64` of the kernel proper) with the zero page built from the bzImage's
/// setup header: what the decompressor would have left.
fn load_decompressed(
    mem: &GuestMemory,
    mem_size: u64,
    req: &BootRequest<'_>,
    mut hdr: linux_loader::loader::bootparam::setup_header,
    blob: &[u8],
) -> Result<BootSpec, BootError> {
    use crate::kaslr;
    let name = req.image.name.clone();
    let bad = |source| BootError::Decompressed {
        path: name.clone(),
        source,
    };
    let kernel = kaslr::Kernel::parse(blob).map_err(bad)?;
    let pref = hdr.pref_address;
    if kernel.link_phys != pref {
        return Err(bad(kaslr::KaslrError::NotElf(
            "it is linked for another load address than the bzImage's setup header says",
        )));
    }
    let align = u64::from(hdr.kernel_alignment);
    let needed = kernel.needed(align.max(1));
    let have_end = high_ram(mem_size).map(|r| r.end()).unwrap_or(0);
    if pref.saturating_add(needed) > have_end {
        return Err(BootError::TooLarge {
            path: name,
            what: "the decompressed kernel",
            needed_mib: mib_up(pref.saturating_add(needed)),
            have_mib: mem_size >> 20,
        });
    }
    // The initrd goes where it would with the kernel at its link address; the kernel's random
    // place is then chosen around it.
    let inputs = write_linux_inputs(mem, mem_size, req, pref + needed, hdr.initrd_addr_max)?;
    let initrd = inputs.initrd;
    let mapped = pagetables::MAPPED_GIB << 30;
    let mut ram: Vec<std::ops::Range<u64>> = layout::e820_map(mem_size)
        .iter()
        .filter(|e| e.kind == layout::E820_RAM)
        .map(|e| e.addr..(e.addr + e.size).min(mapped))
        .filter(|r| r.start < r.end)
        .collect();
    if let Some(i) = initrd {
        ram = ram
            .into_iter()
            .flat_map(|r| {
                let end = i.addr + i.size;
                [r.start..r.end.min(i.addr), r.start.max(end)..r.end]
            })
            .filter(|r| r.start < r.end)
            .collect();
    }
    let randomize = hdr.relocatable_kernel != 0 && !kaslr::cmdline_says_nokaslr(req.cmdline);
    let random = match req.kaslr_random {
        Some(r) => r,
        None if randomize => kaslr::random_pair().map_err(BootError::Random)?,
        None => [0, 0],
    };
    let place = kaslr::choose(
        random,
        &ram,
        needed,
        align,
        pref,
        randomize,
        kernel.relocatable(),
    )
    .map_err(bad)?;
    // Straight into guest memory (fresh, so zero where the bss lies): no 60 MB staging copy.
    let slice = mem
        .get_slice(GuestAddress(place.phys), kernel.span as usize)
        .map_err(|e| BootError::BootParams(format!("kernel at {:#x}: {e}", place.phys)))?;
    // As a plain byte slice: the ~450,000 relocated fields and the 60 MB of segments were
    // copied through vm-memory's volatile accessors one by one, 2.4 s in the nested tier's L1
    // (TCG), where a plain copy and plain loads and stores are what the CPU does best.
    let guard = slice.ptr_guard_mut();
    // SAFETY: `guard` points at `slice.len()` bytes of one mapped RAM region (`get_slice`
    // checked the range lies in it), which stays mapped while `mem` lives, longer than
    // `image`. No vCPU has run yet and nothing else reads or writes guest memory while the
    // kernel is written, so this is the only reference to those bytes; the region keeps no
    // dirty bitmap that plain stores would bypass (`memory::OwnedMapping`).
    let image = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), slice.len()) };
    kernel.load_into(image, place.virt).map_err(bad)?;
    if place.randomized {
        hdr.loadflags |= KASLR_FLAG;
    }
    let spec = enter_linux_64(
        mem,
        mem_size,
        hdr,
        &inputs,
        place.phys + kernel.entry_offset,
        place.phys + needed,
    )?;
    tracing::debug!(
        phys = format_args!("{:#x}", place.phys),
        virt = format_args!("{:#x}", place.virt),
        randomized = place.randomized,
        initrd = ?initrd,
        "decompressed kernel loaded"
    );
    Ok(spec)
}

/// Where an initrd was put: guest-physical start and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitrdPlace {
    pub addr: u64,
    pub size: u64,
}

/// Puts `initrd` at the top of the RAM below `limit` (the kernel's `initrd_addr_max`, and 4 GiB
/// for the 32-bit fields that carry it), page-aligned, above `kernel_end`.
///
/// Why the top: the kernel's decompressor and early allocator work upwards from the kernel;
/// what QEMU and the reference VMMs do too.
fn place_initrd(
    mem: &GuestMemory,
    mem_size: u64,
    initrd: &Image<'_>,
    kernel_end: u64,
    limit: u64,
) -> Result<InitrdPlace, BootError> {
    let size = initrd.bytes.len() as u64;
    let limit = limit.saturating_add(1).min(1 << 32);
    let top = layout::ram_regions(mem_size)
        .into_iter()
        .filter(|r| r.end() > HIMEM_START && r.start < limit)
        .map(|r| r.end().min(limit))
        .next()
        .unwrap_or(0);
    let addr = top.saturating_sub(size) & !0xfff;
    if size == 0 || addr < kernel_end || top == 0 {
        let needed = kernel_end.saturating_add(size).saturating_add(0xfff);
        return Err(BootError::InitrdTooLarge {
            path: initrd.name.clone(),
            size,
            limit,
            kernel_end,
            needed_mib: mib_up(needed),
        });
    }
    mem.write_slice(&initrd.bytes, GuestAddress(addr))
        .map_err(|e| BootError::BootParams(format!("initrd at {addr:#x}: {e}")))?;
    Ok(InitrdPlace { addr, size })
}

fn elf_entry(b: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(24..32)?.try_into().ok()?))
}

/// The PVH memmap type for an E820 type. The values coincide (Xen defines them after E820), but
/// the conversion is spelled out so a new E820 kind cannot slip into the PVH map unnoticed.
fn pvh_memmap_type(e820_kind: u32) -> u32 {
    match e820_kind {
        layout::E820_RAM => XEN_HVM_MEMMAP_TYPE_RAM,
        layout::E820_RESERVED => XEN_HVM_MEMMAP_TYPE_RESERVED,
        // Anything else is not RAM; reserved is the safe reading.
        _ => XEN_HVM_MEMMAP_TYPE_RESERVED,
    }
}

fn write_pvh_start_info(
    mem: &GuestMemory,
    mem_size: u64,
    rsdp: Option<u64>,
    initrd: Option<InitrdPlace>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout::e820_map(mem_size)
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: pvh_memmap_type(e.kind),
            reserved: 0,
        })
        .collect();
    let start_info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: memmap.len() as u32,
        rsdp_paddr: rsdp.unwrap_or(0),
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            layout::PVH_MODLIST
        } else {
            0
        },
        ..Default::default()
    };
    let mut params = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(BOOT_INFO));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP));
    if let Some(initrd) = initrd {
        params.set_modules::<hvm_modlist_entry>(
            &[hvm_modlist_entry {
                paddr: initrd.addr,
                size: initrd.size,
                cmdline_paddr: 0,
                reserved: 0,
            }],
            GuestAddress(layout::PVH_MODLIST),
        );
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))
}

/// Writes the zero page: `params` (its setup header from the image, or a minimal one) with the
/// command line, memory map, RSDP and initrd filled in.
fn write_zero_page(
    mem: &GuestMemory,
    mem_size: u64,
    mut params: boot_params,
    cmdline_len: usize,
    rsdp: Option<u64>,
    initrd: Option<InitrdPlace>,
) -> Result<(), BootError> {
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some(initrd) = initrd {
        // Both below 4 GiB by construction (`place_initrd`).
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    params.acpi_rsdp_addr = rsdp.unwrap_or(0);
    let e820 = layout::e820_map(mem_size);
    for (slot, e) in params.e820_table.iter_mut().zip(e820.iter()) {
        slot.addr = e.addr;
        slot.size = e.size;
        slot.r#type = e.kind;
    }
    params.e820_entries = e820.len().min(params.e820_table.len()) as u8;
    let bp = BootParams::new::<boot_params>(&params, GuestAddress(BOOT_INFO));
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(&bp, mem)
        .map_err(|e| BootError::BootParams(e.to_string()))
}

fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    for (addr, page) in pagetables::identity_map() {
        for (i, entry) in page.iter().enumerate() {
            mem.write_obj(*entry, GuestAddress(addr + i as u64 * 8))
                .map_err(|e| BootError::BootParams(format!("page table at {addr:#x}: {e}")))?;
        }
    }
    Ok(())
}

/// GDT selectors of the boot GDT.
pub const SEL_CODE: u16 = 0x08;
pub const SEL_DATA: u16 = 0x10;
pub const SEL_TSS: u16 = 0x18;

/// Encodes a GDT descriptor from its access/flags word, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
}

/// The boot GDT: null, code (32-bit for PVH, 64-bit for long mode: both at 0x08 so the
/// protocol decides only the L/D bits), data, TSS.
fn boot_gdt(mode: EntryMode) -> [u64; layout::BOOT_GDT_ENTRIES] {
    let code = match mode {
        EntryMode::Pvh32 => gdt_entry(0xc09b, 0, 0xfffff),
        EntryMode::Long64 => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes the boot GDT so the in-memory table matches the hidden segment state loaded into the
/// vCPUs (a guest that reloads a selector before installing its own GDT gets the same segment).
fn write_gdt(mem: &GuestMemory, mode: EntryMode) -> Result<(), BootError> {
    for (i, entry) in boot_gdt(mode).iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT + i as u64 * 8))
            .map_err(|e| BootError::BootParams(format!("GDT: {e}")))?;
    }
    Ok(())
}

/// The hidden segment state KVM needs for a descriptor, as the CPU would load it.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let limit_raw = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if present == 1 { 0 } else { 1 },
        padding: 0,
    }
}

pub const CR0_PE: u64 = 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;

/// Fills `sregs` (as read from a fresh vCPU) and returns `regs` for the entry of `spec`.
pub fn entry_state(spec: &BootSpec, sregs: &mut kvm_sregs) -> kvm_regs {
    let gdt = boot_gdt(spec.mode);
    let code = segment_from_gdt(gdt[1], SEL_CODE);
    let data = segment_from_gdt(gdt[2], SEL_DATA);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], SEL_TSS);
    sregs.gdt.base = BOOT_GDT;
    sregs.gdt.limit = (layout::BOOT_GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    let mut regs = kvm_regs {
        rip: spec.entry,
        rflags: 0x2,
        ..Default::default()
    };
    match spec.mode {
        EntryMode::Pvh32 => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = BOOT_INFO;
        }
        EntryMode::Long64 => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = layout::PAGE_TABLES;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rsi = BOOT_INFO;
            regs.rsp = BOOT_INFO; // a stack below the zero page until the kernel sets its own
        }
    }
    regs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), SEL_CODE);
        assert_eq!(
            (code64.base, code64.limit, code64.l, code64.db, code64.type_),
            (0, 0xffff_ffff, 1, 0, 0xb)
        );
        assert_eq!(
            (code64.present, code64.s, code64.dpl, code64.g),
            (1, 1, 0, 1)
        );
        let code32 = segment_from_gdt(gdt_entry(0xc09b, 0, 0xfffff), SEL_CODE);
        assert_eq!((code32.l, code32.db), (0, 1));
        let tss = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), SEL_TSS);
        assert_eq!((tss.type_, tss.s, tss.present), (0xb, 0, 1));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn gdt_entry_splits_base_and_limit() {
        let e = gdt_entry(0x0089, 0x1234_5678, 0x6_7890);
        let s = segment_from_gdt(e, 0x28);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0x6_7890);
    }

    fn image(bytes: Vec<u8>) -> Image<'static> {
        Image {
            name: "x".into(),
            bytes: bytes.into(),
        }
    }

    #[test]
    fn non_elf_and_bzimage_are_refused_with_reasons() {
        let err = check_image(&image(vec![0u8; 4096]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("not an ELF"), "{err}");
        let mut elf32 = vec![0u8; 64];
        elf32[..4].copy_from_slice(b"\x7fELF");
        elf32[4] = 1;
        let err = check_image(&image(elf32))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("64-bit"), "{err}");
    }

    /// A minimal x86-64 ET_EXEC header with one PT_LOAD at `paddr` of `memsz` bytes.
    fn elf_with_segment(paddr: u64, memsz: u64) -> Vec<u8> {
        let mut b = vec![0u8; 64 + PHDR_SIZE];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[16..18].copy_from_slice(&2u16.to_le_bytes());
        b[18..20].copy_from_slice(&62u16.to_le_bytes());
        b[32..40].copy_from_slice(&64u64.to_le_bytes());
        b[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        b[56..58].copy_from_slice(&1u16.to_le_bytes());
        b[64..68].copy_from_slice(&PT_LOAD.to_le_bytes());
        b[64 + 24..64 + 32].copy_from_slice(&paddr.to_le_bytes());
        b[64 + 40..64 + 48].copy_from_slice(&memsz.to_le_bytes());
        b
    }

    #[test]
    fn images_loading_into_the_arena_are_refused() {
        assert!(check_image(&image(elf_with_segment(HIMEM_START, 0x1000))).is_ok());
        // File bytes in the arena, and bss running into it from below.
        for (paddr, memsz) in [
            (layout::PATCH_ARENA_START + 0x1000, 0x10),
            (layout::PATCH_ARENA_START - 0x1000, 0x2000),
            (layout::PATCH_ARENA_END - 1, u64::MAX),
        ] {
            let err = check_image(&image(elf_with_segment(paddr, memsz))).err();
            assert!(
                matches!(err, Some(BootError::OverlapsArena { .. })),
                "{paddr:#x}+{memsz:#x}: {err:?}"
            );
            let msg = err.map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("patch arena"), "{msg}");
        }
        // Right after the arena is fine.
        assert!(check_image(&image(elf_with_segment(layout::PATCH_ARENA_END, 0x1000))).is_ok());
        // Truncated program headers are left to the loader.
        let mut truncated = elf_with_segment(layout::PATCH_ARENA_START, 0x1000);
        truncated.truncate(80);
        assert!(check_image(&image(truncated)).is_ok());
    }

    #[test]
    fn the_pvh_memmap_reserves_the_arena() {
        let Ok(mem) = crate::memory::allocate(16 << 20) else {
            panic!("16 MiB must be allocatable")
        };
        let guest = image(guest_tools::test_guest(guest_tools::GuestBuild::V1).to_vec());
        let req = BootRequest {
            image: &guest,
            cmdline: "",
            initrd: None,
            acpi: Default::default(),
            decompressed: None,
            kaslr_random: None,
        };
        let spec = load(&mem, 16 << 20, &req).map_err(|e| e.to_string());
        assert_eq!(spec.map(|s| s.mode), Ok(EntryMode::Pvh32));
        let info: Option<hvm_start_info> = mem.read_obj(GuestAddress(BOOT_INFO)).ok();
        let Some(info) = info else {
            panic!("hvm_start_info must be readable")
        };
        assert_eq!(info.memmap_paddr, PVH_MEMMAP);
        let entries: Vec<(u64, u64, u32)> = (0..u64::from(info.memmap_entries))
            .filter_map(|i| {
                mem.read_obj::<hvm_memmap_table_entry>(GuestAddress(
                    PVH_MEMMAP + i * std::mem::size_of::<hvm_memmap_table_entry>() as u64,
                ))
                .ok()
            })
            .map(|e| (e.addr, e.size, e.type_))
            .collect();
        assert_eq!(
            entries,
            vec![
                (0, layout::LOW_RAM_END, XEN_HVM_MEMMAP_TYPE_RAM),
                (
                    HIMEM_START,
                    (16 << 20) - HIMEM_START,
                    XEN_HVM_MEMMAP_TYPE_RAM
                ),
                (
                    layout::PATCH_ARENA_START,
                    layout::PATCH_ARENA_SIZE,
                    XEN_HVM_MEMMAP_TYPE_RESERVED
                ),
            ]
        );
    }

    /// A synthetic bzImage: setup header fields a loader reads, `payload` bytes of "kernel".
    fn bzimage(version: u16, xloadflags: u16, init_size: u32, payload: usize) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut b = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
        b[0x1f1] = setup_sects;
        b[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x211] = 1; // LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        b[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        b[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        b[0x234] = 1;
        b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        b[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        b[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        b
    }

    fn boot(
        mem_mib: u64,
        kernel: &Image<'_>,
        initrd: Option<&Image<'_>>,
    ) -> Result<(BootSpec, GuestMemory), BootError> {
        let Ok(mem) = crate::memory::allocate(mem_mib << 20) else {
            panic!("{mem_mib} MiB must be allocatable")
        };
        let req = BootRequest {
            image: kernel,
            cmdline: "console=ttyS0",
            initrd,
            acpi: crate::acpi::AcpiConfig {
                vcpus: 2,
                virtio_mmio: Vec::new(),
            },
            decompressed: None,
            kaslr_random: None,
        };
        load(&mem, mem_mib << 20, &req).map(|spec| (spec, mem))
    }

    fn boot_decompressed(
        kernel: &Image<'_>,
        initrd: Option<&Image<'_>>,
        blob: &[u8],
        cmdline: &str,
        random: [u64; 2],
    ) -> Result<(BootSpec, GuestMemory), BootError> {
        let Ok(mem) = crate::memory::allocate(64 << 20) else {
            panic!("64 MiB must be allocatable")
        };
        let req = BootRequest {
            image: kernel,
            cmdline,
            initrd,
            acpi: crate::acpi::AcpiConfig {
                vcpus: 1,
                virtio_mmio: Vec::new(),
            },
            decompressed: Some(blob),
            kaslr_random: Some(random),
        };
        load(&mem, 64 << 20, &req).map(|spec| (spec, mem))
    }

    #[test]
    fn a_decompressed_kernel_is_placed_at_random_relocated_and_entered_directly() {
        use crate::kaslr::fixture::{LINK, VBASE, kernel, va};
        let bz = image(bzimage(0x20f, XLF_KERNEL_64, 4 << 20, 64 << 10));
        let blob = kernel(Some((&[va(0x10)], &[], &[])));
        let initrd = image(vec![0x5a; 3 << 20]);
        let read_u64 = |mem: &GuestMemory, at: u64| mem.read_obj::<u64>(GuestAddress(at)).ok();
        let mut places = std::collections::BTreeSet::new();
        for r in 0..8u64 {
            let (spec, mem) = match boot_decompressed(
                &bz,
                Some(&initrd),
                &blob,
                "console=ttyS0",
                [r * 7 + 1, r * 13 + 2],
            ) {
                Ok(v) => v,
                Err(e) => panic!("boot: {e}"),
            };
            let phys = spec.entry - 0x40;
            assert_eq!(spec.mode, EntryMode::Long64);
            assert_eq!(phys % (2 << 20), 0);
            assert!(phys >= LINK && spec.kernel_end <= 64 << 20, "{spec:x?}");
            let mut text = [0u8; 4];
            let _ = mem.read_slice(&mut text, GuestAddress(phys));
            assert_eq!(&text, b"TEXT");
            // The pointer moved with the virtual offset (a multiple of 2 MiB), never the
            // physical one.
            let ptr = read_u64(&mem, phys + 0x10).unwrap_or(0);
            assert_eq!((ptr - (VBASE + 0x100)) % (2 << 20), 0);
            let zp: boot_params = mem.read_obj(GuestAddress(BOOT_INFO)).unwrap_or_default();
            assert_eq!(zp.hdr.loadflags & KASLR_FLAG, KASLR_FLAG);
            let (initrd_at, initrd_size) = (
                u64::from(zp.hdr.ramdisk_image),
                u64::from(zp.hdr.ramdisk_size),
            );
            assert!(
                initrd_at >= spec.kernel_end || initrd_at + initrd_size <= phys,
                "the kernel at {phys:#x}..{:#x} overlaps the initrd at {initrd_at:#x}",
                spec.kernel_end
            );
            let mut first = [0u8; 4];
            let _ = mem.read_slice(&mut first, GuestAddress(initrd_at));
            assert_eq!(first, [0x5a; 4]);
            // The bzImage itself is not in memory: nothing was loaded at 1 MiB.
            assert_eq!(read_u64(&mem, HIMEM_START), Some(0));
            places.insert((phys, ptr));
        }
        assert!(places.len() > 1, "KASLR chose one place for eight draws");
        // nokaslr: at the link address, unrelocated, no KASLR flag.
        let (spec, mem) = match boot_decompressed(&bz, None, &blob, "nokaslr", [5, 9]) {
            Ok(v) => v,
            Err(e) => panic!("boot: {e}"),
        };
        assert_eq!(spec.entry, LINK + 0x40);
        assert_eq!(read_u64(&mem, LINK + 0x10), Some(VBASE + 0x100));
        let zp: boot_params = mem.read_obj(GuestAddress(BOOT_INFO)).unwrap_or_default();
        assert_eq!(zp.hdr.loadflags & KASLR_FLAG, 0);
        // A decompressed kernel linked elsewhere than the bzImage says is not this bzImage's.
        let mut other = bzimage(0x20f, XLF_KERNEL_64, 4 << 20, 64 << 10);
        other[0x258..0x260].copy_from_slice(&0x200_0000u64.to_le_bytes());
        let e = match boot_decompressed(&image(other), None, &blob, "", [1, 1]) {
            Ok(_) => panic!("must be refused"),
            Err(e) => e,
        };
        assert!(matches!(e, BootError::Decompressed { .. }), "{e}");
        assert!(e.to_string().contains("--vmm-decompress"), "{e}");
        // A truncated one.
        let e = match boot_decompressed(&bz, None, &blob[..100], "", [1, 1]) {
            Ok(_) => panic!("must be refused"),
            Err(e) => e,
        };
        assert!(matches!(e, BootError::Decompressed { .. }), "{e}");
    }

    #[test]
    fn a_bzimage_boots_at_its_64_bit_entry_with_initrd_and_acpi() {
        let kernel = image(bzimage(0x20f, XLF_KERNEL_64, 4 << 20, 64 << 10));
        let initrd = image(vec![0x5a; 3 << 20]);
        let (spec, mem) = match boot(64, &kernel, Some(&initrd)) {
            Ok(v) => v,
            Err(e) => panic!("boot: {e}"),
        };
        assert_eq!(spec.mode, EntryMode::Long64);
        assert_eq!(spec.entry, HIMEM_START + BZIMAGE_64BIT_ENTRY);
        assert!(spec.linux);
        assert!(spec.starts_at_entry(0) && !spec.starts_at_entry(1));
        let zp: boot_params = mem.read_obj(GuestAddress(BOOT_INFO)).unwrap_or_default();
        let (image_at, size) = (zp.hdr.ramdisk_image, zp.hdr.ramdisk_size);
        assert_eq!(size, 3 << 20);
        assert_eq!(u64::from(image_at) % 0x1000, 0);
        assert!(u64::from(image_at) + u64::from(size) <= 64 << 20);
        assert!(
            u64::from(image_at) >= 0x100_0000 + (4 << 20),
            "above the decompressed kernel"
        );
        let mut first = [0u8; 4];
        let _ = mem.read_slice(&mut first, GuestAddress(u64::from(image_at)));
        assert_eq!(first, [0x5a; 4]);
        let rsdp = zp.acpi_rsdp_addr;
        assert_eq!(rsdp, layout::ACPI_START);
        let (cmd, loader, code32) = (
            zp.hdr.cmd_line_ptr,
            zp.hdr.type_of_loader,
            zp.hdr.code32_start,
        );
        assert_eq!(
            (u64::from(cmd), loader, u64::from(code32)),
            (CMDLINE, 0xff, HIMEM_START)
        );
        // The kernel is told there is no PCI bus; the size covers what was written.
        let want = b"console=ttyS0 pci=off\0";
        let mut line = [0u8; 22];
        let _ = mem.read_slice(&mut line, GuestAddress(CMDLINE));
        assert_eq!(&line, want);
        assert_eq!(zp.hdr.cmdline_size as usize, want.len());
        let mut sig = [0u8; 8];
        let _ = mem.read_slice(&mut sig, GuestAddress(layout::ACPI_START));
        assert_eq!(&sig, b"RSD PTR ");
    }

    #[test]
    fn linux_is_told_there_is_no_pci_unless_the_user_says_otherwise() {
        assert_eq!(linux_cmdline(""), "pci=off");
        assert_eq!(linux_cmdline("console=ttyS0 "), "console=ttyS0 pci=off");
        assert_eq!(linux_cmdline("pci=nocrs quiet"), "pci=nocrs quiet");
        // Only a whole `pci=` word counts.
        assert_eq!(linux_cmdline("nopci=1"), "nopci=1 pci=off");
    }

    #[test]
    fn bad_kernels_and_initrds_are_refused_with_reasons() {
        let msg = |r: Result<(BootSpec, GuestMemory), BootError>| match r {
            Ok(_) => panic!("must be refused"),
            Err(e) => e,
        };
        // Truncated inside the setup header.
        let mut cut = bzimage(0x20f, XLF_KERNEL_64, 1 << 20, 0);
        cut.truncate(0x210);
        let e = msg(boot(32, &image(cut), None));
        assert!(matches!(e, BootError::NotBootable { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        // Too old a protocol, a 32-bit-only kernel, no kernel after the setup code.
        let e = msg(boot(
            32,
            &image(bzimage(0x209, XLF_KERNEL_64, 1 << 20, 4096)),
            None,
        ));
        assert!(e.to_string().contains("2.10"), "{e}");
        let e = msg(boot(32, &image(bzimage(0x20f, 0, 1 << 20, 4096)), None));
        assert!(e.to_string().contains("64-bit"), "{e}");
        let e = msg(boot(
            32,
            &image(bzimage(0x20f, XLF_KERNEL_64, 1 << 20, 0)),
            None,
        ));
        assert!(e.to_string().contains("no protected-mode kernel"), "{e}");
        // A kernel that needs more than --memory.
        let e = msg(boot(
            32,
            &image(bzimage(0x20f, XLF_KERNEL_64, 64 << 20, 4096)),
            None,
        ));
        assert!(
            matches!(
                e,
                BootError::TooLarge {
                    needed_mib: 80,
                    have_mib: 32,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--memory"), "{e}");
        // An initrd that does not fit above the kernel.
        let big = image(vec![1; 20 << 20]);
        let e = msg(boot(
            32,
            &image(bzimage(0x20f, XLF_KERNEL_64, 4 << 20, 4096)),
            Some(&big),
        ));
        assert!(matches!(e, BootError::InitrdTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("--memory"), "{e}");
        // An initrd for a guest that is not Linux.
        let guest = image(guest_tools::test_guest(guest_tools::GuestBuild::V1).to_vec());
        let e = msg(boot(32, &guest, Some(&image(vec![1; 4096]))));
        assert!(matches!(e, BootError::InitrdNotLinux { .. }), "{e}");
        // Not a kernel at all.
        let e = msg(boot(32, &image(b"#!/bin/sh\necho hi\n".to_vec()), None));
        assert!(e.to_string().contains("not an ELF"), "{e}");
    }

    #[test]
    fn pvh_entry_is_protected_mode_without_paging() {
        let spec = BootSpec {
            mode: EntryMode::Pvh32,
            entry: 0x10_0000,
            kernel_end: 0,
            linux: false,
        };
        let mut sregs = kvm_sregs::default();
        let regs = entry_state(&spec, &mut sregs);
        assert_eq!(regs.rip, 0x10_0000);
        assert_eq!(regs.rbx, BOOT_INFO);
        assert_eq!(sregs.cr0 & CR0_PG, 0);
        assert_eq!(sregs.cr0 & CR0_PE, CR0_PE);
        assert_eq!(sregs.efer, 0);
        assert_eq!((sregs.cs.db, sregs.cs.l), (1, 0));
    }

    #[test]
    fn long_mode_entry_uses_the_vmm_page_tables() {
        let spec = BootSpec {
            mode: EntryMode::Long64,
            entry: 0x20_0000,
            kernel_end: 0,
            linux: false,
        };
        let mut sregs = kvm_sregs::default();
        let regs = entry_state(&spec, &mut sregs);
        assert_eq!(regs.rsi, BOOT_INFO);
        assert_eq!(sregs.cr3, layout::PAGE_TABLES);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!((sregs.cs.db, sregs.cs.l), (0, 1));
    }
}
