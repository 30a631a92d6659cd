//! A stock Linux kernel run by this VMM, patched through its API like the test guest.
//!
//! The engine cannot exist before the kernel has booted: the KASLR slide is found from the
//! kernel's own IDT, the arena is mapped into its page tables, and boot-time text rewriting
//! must be over. So the API starts with the engine "attaching", and a thread polls the guest
//! (one short pause each time, reading the IDT base straight from KVM's vCPU state) until
//! the kernel reports `SYSTEM_RUNNING`, then attaches with every rule of the kernel-safety
//! work (docs/linux-guests.md): the same `linux_guest::engine::engine_for_kernel` the QEMU
//! backend uses. No `memmap=` is needed: this VMM's e820 map reserves the arena.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_api::server::EngineSlot;
use kvm_vmm::vm::Vm;
use linux_guest::attach::KernelImage;
use patch_engine::EngineConfig;
use patch_engine::shared::SharedEngine;

/// How often the booting kernel is looked at.
const POLL: Duration = Duration::from_millis(500);

/// The IDT base of the first vCPU that has one, read in one short pause.
fn idt_base(vm: &Vm) -> Option<u64> {
    let (_, snapshots) = vm.pause().ok()?;
    let idt = snapshots
        .iter()
        .flatten()
        .find(|s| s.read_error.is_none() && s.sregs.idt.limit > 0)
        .map(|s| s.sregs.idt.base);
    if let Err(e) = vm.resume() {
        tracing::error!(error = %e, "could not resume the guest after reading its IDT base");
    }
    idt
}

/// Starts the thread that attaches the engine to the kernel in `vm` once it has booted, and
/// fills `slot` with the engine or with the reason there is none. Gives up after `deadline`.
pub fn attach_when_booted(
    vm: Arc<Vm>,
    image: KernelImage,
    config: EngineConfig,
    state_dir: Option<PathBuf>,
    slot: EngineSlot,
    deadline: Duration,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("linux-attach".into())
        .spawn(move || {
            let started = Instant::now();
            loop {
                if vm.stop_reason().is_some() {
                    return;
                }
                if started.elapsed() > deadline {
                    let why = format!(
                        "the kernel did not finish booting within {} s (it never reached SYSTEM_RUNNING); check its console",
                        deadline.as_secs()
                    );
                    tracing::error!(%why, "patching is unavailable");
                    slot.set_failed(why);
                    return;
                }
                let running = idt_base(&vm)
                    .map(|idt| (idt, linux_guest::attach::kernel_running(vm.as_ref(), idt, &image)));
                match running {
                    Some((idt, Ok(true))) => {
                        attach(&vm, idt, &image, config, state_dir.as_deref(), &slot, started);
                        return;
                    }
                    Some((_, Err(e))) => {
                        let why = error_chain(&e);
                        tracing::error!(%why, "patching is unavailable");
                        slot.set_failed(why);
                        return;
                    }
                    _ => std::thread::sleep(POLL),
                }
            }
        })
}

fn attach(
    vm: &Arc<Vm>,
    idt: u64,
    image: &KernelImage,
    config: EngineConfig,
    state_dir: Option<&std::path::Path>,
    slot: &EngineSlot,
    started: Instant,
) {
    let arena = vm.arena_window();
    match linux_guest::engine::engine_for_kernel(
        vm.clone(),
        idt,
        image,
        arena.gpa,
        config,
        state_dir,
    ) {
        Ok(engine) => {
            tracing::info!(
                kernel = %image.banner.trim_end(),
                waited_ms = started.elapsed().as_millis() as u64,
                "patching is ready: attached to the Linux kernel"
            );
            slot.set_ready(Arc::new(SharedEngine::new(engine)));
        }
        Err(e) => {
            let why = error_chain(&e);
            tracing::error!(%why, "patching is unavailable: could not attach to the kernel");
            slot.set_failed(why);
        }
    }
}

/// An error and its sources, one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
