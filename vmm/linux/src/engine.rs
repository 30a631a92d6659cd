//! The patch engine over a running stock Linux kernel, on any backend: slide and arena from
//! [`crate::attach`], symbols from the kernel's kallsyms, identity from its build id. The
//! caller brings the backend (QEMU today, this VMM next) and the IDT base it read there.

use std::path::Path;
use std::sync::Arc;

use guest_control::{ArenaWindow, GuestControl};
use patch_engine::target::Target;
use patch_engine::threads::HiddenThreads;
use patch_engine::{Engine, EngineConfig, EngineError};
use thiserror::Error;

use crate::attach::{KernelImage, LinuxAttachError};
use crate::boot_rewrites::LinuxBootRewrites;

/// Why the engine could not attach to a Linux guest.
#[derive(Debug, Error)]
pub enum LinuxEngineError {
    #[error(transparent)]
    Attach(#[from] LinuxAttachError),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// The extra time a blackout that lists the kernel's tasks may take through QEMU's gdbstub:
/// measured 59 ms for 55 tasks under TCG (`tests/linux_tasks.rs`), so about a thousand tasks.
pub const GDBSTUB_WALK: std::time::Duration = std::time::Duration::from_secs(1);

/// `config` for a backend that reads guest memory through QEMU's gdbstub: the tasks are
/// listed only where a change needs them (a patch of several functions, or a jump over
/// several instructions while the kernel preempts anywhere), with [`GDBSTUB_WALK`] for it.
pub fn over_gdbstub(config: EngineConfig) -> EngineConfig {
    EngineConfig {
        list_threads: patch_engine::threads::ThreadListing::Essential,
        max_walk: GDBSTUB_WALK,
        ..config
    }
}

/// An engine over the kernel `image` running in `guest`, whose IDT is at `idt` (guest-virtual),
/// with the kernel arena at guest-physical `arena_gpa`.
pub fn engine_for_kernel<G: GuestControl>(
    guest: Arc<G>,
    idt: u64,
    image: &KernelImage,
    arena_gpa: u64,
    config: EngineConfig,
    state_dir: Option<&Path>,
) -> Result<Engine<G>, LinuxEngineError> {
    engine_and_attachment(guest, idt, image, arena_gpa, config, state_dir).map(|(e, _)| e)
}

/// [`engine_for_kernel`], with what attaching found (the slide, the arena), for a backend
/// that does more with the kernel (this VMM protects its text).
pub fn engine_and_attachment<G: GuestControl>(
    guest: Arc<G>,
    idt: u64,
    image: &KernelImage,
    arena_gpa: u64,
    config: EngineConfig,
    state_dir: Option<&Path>,
) -> Result<(Engine<G>, crate::attach::Attached), LinuxEngineError> {
    let attached = crate::attach::attach(guest.as_ref(), idt, image, arena_gpa)?;
    let mut info = crate::patch::kernel_image_info(&image.vmlinux, &image.kallsyms);
    image.text_sites.cut_at_function_entries(&mut info.symbols);
    let engine = Engine::new(
        guest,
        Target::new(info, attached.slide.slide).with_absolute(
            image
                .kallsyms
                .symbols()
                .iter()
                .filter(|s| s.is_absolute())
                .map(|s| (s.name.clone(), s.address)),
        ),
        ArenaWindow {
            gpa: attached.arena.gpa,
            gva: attached.arena.gva,
            size: attached.arena.size,
        },
        // Tasks asleep or preempted in kernel code are out of the hypervisor's sight.
        EngineConfig {
            hidden_threads: HiddenThreads::Scheduled(crate::preemption::of_kernel(
                &image.kallsyms,
                attached.slide.slide,
            )),
            ..config
        },
        state_dir,
        Box::new(
            LinuxBootRewrites::new(image.text_sites.clone(), attached.smp_locks_live)
                .with_pti(crate::address_space::has_pti(&image.kallsyms))
                .with_interrupt_stacks(attached.interrupt_stacks.clone())
                .with_tasks(attached.tasks.clone()),
        ),
    )?;
    Ok((engine, attached))
}
