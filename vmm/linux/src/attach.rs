//! Attaching the patch engine to a running stock Linux kernel: its image (vmlinux + kallsyms
//! from the bzImage the guest booted), its KASLR slide (from the IDT), a check that the running
//! kernel really is that image (its `linux_banner` in memory), and the arena mapped into its
//! address space — all in one short pause.

use std::path::Path;

use thiserror::Error;

use super::arena::{self, KernelArena, KernelArenaError};
use super::kaslr::{self, KaslrError, Slide};
use super::{Kallsyms, KallsymsError, LinuxImageError};
use guest_control::{GuestControl, GuestError};

use crate::address_space::kernel_view;

#[derive(Debug, Error)]
pub enum LinuxAttachError {
    #[error("cannot read {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Image(#[from] LinuxImageError),
    #[error(transparent)]
    Kallsyms(#[from] KallsymsError),
    #[error("{0} has no linux_banner: not a Linux kernel image")]
    NoBanner(String),
    #[error(transparent)]
    Kaslr(#[from] KaslrError),
    #[error(transparent)]
    TextSites(#[from] crate::text_sites::TextSitesError),
    #[error(transparent)]
    Arena(#[from] KernelArenaError),
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error("every vCPU of the guest has stopped")]
    NoVcpu,
    #[error(
        "the running kernel is not the image given: its banner is {running:?}, the image's {image:?}; give the bzImage the guest booted"
    )]
    WrongKernel { running: String, image: String },
}

/// A kernel image, read once.
pub struct KernelImage {
    pub name: String,
    pub vmlinux: Vec<u8>,
    pub kallsyms: Kallsyms,
    /// `linux_banner`, trailing newline included.
    pub banner: String,
    /// Where the kernel rewrites its own text, from its tables.
    pub text_sites: std::sync::Arc<crate::text_sites::KernelTextSites>,
    /// The vmlinux came from the image cache (not decompressed again).
    pub from_cache: bool,
}

impl KernelImage {
    /// From a bzImage (or an ELF vmlinux), its vmlinux from the user's image cache when it
    /// holds a valid entry ([`crate::image_cache`]).
    pub fn from_file(path: &Path) -> Result<KernelImage, LinuxAttachError> {
        Self::from_file_cached(path, crate::image_cache::default_dir().as_deref())
    }

    /// [`KernelImage::from_file`] with the cache in `cache` (none: always decompress).
    pub fn from_file_cached(
        path: &Path,
        cache: Option<&Path>,
    ) -> Result<KernelImage, LinuxAttachError> {
        let bytes = std::fs::read(path).map_err(|source| LinuxAttachError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let (vmlinux, source) = crate::image_cache::vmlinux(&bytes, cache)?;
        Self::from_vmlinux(path, vmlinux, source == crate::image_cache::Source::Cache)
    }

    /// From the vmlinux of the image at `path`, already read (the VMM decompressed it to boot
    /// the kernel, so it is not read and checked twice).
    pub fn from_vmlinux(
        path: &Path,
        vmlinux: Vec<u8>,
        from_cache: bool,
    ) -> Result<KernelImage, LinuxAttachError> {
        let kallsyms = Kallsyms::from_vmlinux(&vmlinux)?;
        let banner = super::linux_banner(&vmlinux, &kallsyms)
            .ok_or_else(|| LinuxAttachError::NoBanner(path.display().to_string()))?;
        let text_sites = std::sync::Arc::new(crate::text_sites::KernelTextSites::from_vmlinux(
            &vmlinux, &kallsyms,
        )?);
        Ok(KernelImage {
            name: path.display().to_string(),
            vmlinux,
            kallsyms,
            banner,
            text_sites,
            from_cache,
        })
    }
}

/// What attaching found.
#[derive(Debug, Clone)]
pub struct Attached {
    pub slide: Slide,
    pub arena: KernelArena,
    /// The kernel booted on one CPU (`uniproc_patched`): it rewrites its lock prefixes back
    /// when it gains a CPU, so they count as run-time rewrites. True when it cannot be told.
    pub smp_locks_live: bool,
    /// Each online CPU's interrupt and exception stacks, for the engine to find the context a
    /// handler interrupted. Empty when the kernel's layout is another.
    pub interrupt_stacks: crate::interrupt_stacks::InterruptStacks,
    /// Where the kernel's task list starts and how its tasks are laid out, for the engine to
    /// scan the stacks of tasks no vCPU runs (`crate::tasks`). `None` when the vmlinux has no
    /// type information or the kernel no `init_task`.
    pub tasks: Option<crate::tasks::KernelTasks>,
}

/// Runs `f` with the guest paused, on the kernel's view of its first live vCPU (`None` when
/// every vCPU has stopped), and resumes it whatever `f` returned.
fn paused_kernel_view<G: GuestControl + ?Sized, T>(
    guest: &G,
    image: &KernelImage,
    f: impl FnOnce(Option<guest_control::VcpuState>) -> Result<T, LinuxAttachError>,
) -> Result<T, LinuxAttachError> {
    let states = guest.pause_all()?;
    let pti = crate::address_space::has_pti(&image.kallsyms);
    let result = f(states.iter().flatten().next().map(|v| kernel_view(v, pti)));
    guest.resume_all()?;
    result
}

/// `system_state` once the kernel has freed its init memory and runs user space
/// (`SYSTEM_RUNNING` of 6.1's `enum system_states`).
const SYSTEM_RUNNING: u32 = 3;

/// Whether the kernel `image` in `guest` has finished booting: its `system_state` is
/// `SYSTEM_RUNNING`. From then on boot-time text rewriting (alternatives, the UP lock rewrite
/// at CPU bring-up, init text) is over, so attaching sees the text it will patch. While the
/// kernel is still booting (its IDT not yet the final one, the slide not yet findable) this
/// answers `Ok(false)`; a running kernel that is not `image` is an error. Pauses the guest once.
pub fn kernel_running<G: GuestControl + ?Sized>(
    guest: &G,
    idt_base: u64,
    image: &KernelImage,
) -> Result<bool, LinuxAttachError> {
    let Some(state_at) = image.kallsyms.lookup("system_state") else {
        // An image without it cannot be told apart mid-boot: treat it as booted.
        return Ok(true);
    };
    paused_kernel_view(guest, image, |vcpu| {
        let Some(vcpu) = vcpu else {
            return Ok(false);
        };
        let Ok(idt) = guest.read_virtual(&vcpu, idt_base, kaslr::IDT_BYTES) else {
            return Ok(false);
        };
        let Ok(slide) = kaslr::slide_from_idt(&idt, &image.kallsyms) else {
            return Ok(false);
        };
        let Ok(raw) = guest.read_virtual(&vcpu, state_at.wrapping_add(slide.slide), 4) else {
            return Ok(false);
        };
        let state = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        Ok(state == SYSTEM_RUNNING)
    })
}

/// Where the running kernel's text (`_stext`..`_etext`) is in guest-physical memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelText {
    pub gpa: u64,
    pub len: u64,
    /// `_stext` at its link-time address.
    pub link: u64,
}

/// Finds the kernel's text in guest-physical memory through its page tables (it is one
/// physically contiguous range, wherever KASLR put it). Pauses the guest once.
pub fn kernel_text<G: GuestControl + ?Sized>(
    guest: &G,
    image: &KernelImage,
    slide: u64,
) -> Result<Option<KernelText>, LinuxAttachError> {
    let (Some(start), Some(end)) = (
        image.kallsyms.lookup("_stext"),
        image.kallsyms.lookup("_etext"),
    ) else {
        return Ok(None);
    };
    if end <= start {
        return Ok(None);
    }
    paused_kernel_view(guest, image, |vcpu| {
        let vcpu = vcpu.ok_or(LinuxAttachError::NoVcpu)?;
        let first = guest.translate(&vcpu, start.wrapping_add(slide))?;
        let last = guest.translate(&vcpu, (end - 1).wrapping_add(slide))?;
        let len = end - start;
        // One contiguous physical range, as the kernel maps its image.
        Ok(
            (last.gpa.wrapping_sub(first.gpa) == len - 1).then_some(KernelText {
                gpa: first.gpa,
                len,
                link: start,
            }),
        )
    })
}

/// Finds the slide, checks the running kernel is `image`, maps the arena at guest-physical
/// `arena_gpa`. Pauses the guest once; leaves it running.
pub fn attach<G: GuestControl + ?Sized>(
    guest: &G,
    idt_base: u64,
    image: &KernelImage,
    arena_gpa: u64,
) -> Result<Attached, LinuxAttachError> {
    paused_kernel_view(guest, image, |vcpu| {
        let vcpu = vcpu.ok_or(LinuxAttachError::NoVcpu)?;
        let idt = guest.read_virtual(&vcpu, idt_base, kaslr::IDT_BYTES)?;
        let slide = kaslr::slide_from_idt(&idt, &image.kallsyms)?;
        let banner_at = image
            .kallsyms
            .lookup("linux_banner")
            .ok_or_else(|| LinuxAttachError::NoBanner(image.name.clone()))?
            .wrapping_add(slide.slide);
        let running = guest.read_virtual(&vcpu, banner_at, image.banner.len())?;
        if running != image.banner.as_bytes() {
            return Err(LinuxAttachError::WrongKernel {
                running: String::from_utf8_lossy(&running).trim_end().to_string(),
                image: image.banner.trim_end().to_string(),
            });
        }
        let smp_locks_live = match image.kallsyms.lookup("uniproc_patched") {
            Some(at) => guest.read_virtual(&vcpu, at.wrapping_add(slide.slide), 1)?[0] != 0,
            None => true,
        };
        let arena = arena::install(guest, &vcpu, &image.kallsyms, slide.slide, arena_gpa)?;
        let interrupt_stacks = crate::interrupt_stacks::InterruptStacks::read(
            guest,
            &vcpu,
            &image.kallsyms,
            slide.slide,
        );
        let tasks = match crate::tasks::TaskLayout::from_vmlinux(&image.vmlinux) {
            Ok(layout) => {
                crate::tasks::KernelTasks::read(guest, &vcpu, &image.kallsyms, slide.slide, layout)
            }
            Err(e) => {
                tracing::info!(why = %e, "the kernel's tasks will not be listed");
                None
            }
        };
        tracing::info!(
            slide = format_args!("{:#x}", slide.slide),
            arena = format_args!("{:#x}", arena.gva),
            irq_stacks = interrupt_stacks.irq_tops.len(),
            exception_stacks = interrupt_stacks.ist_tops.len(),
            idle_tasks = tasks.as_ref().map(|t| t.idle.len()),
            "attached to the Linux kernel"
        );
        Ok(Attached {
            slide,
            arena,
            smp_locks_live,
            interrupt_stacks,
            tasks,
        })
    })
}
