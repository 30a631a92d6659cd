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
                        let why = crate::exit::render_error(&e);
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
    // This VMM reads guest memory directly: listing the kernel's tasks in a blackout is cheap
    // here, so it is done for every change a task could be in the way of (docs/patch-engine.md,
    // "Threads the hypervisor cannot see").
    let config = EngineConfig {
        list_threads: patch_engine::threads::ThreadListing::Thorough,
        ..config
    };
    match linux_guest::engine::engine_and_attachment(
        vm.clone(),
        idt,
        image,
        arena.gpa,
        config,
        state_dir,
    ) {
        Ok((engine, attached)) => {
            tracing::info!(
                kernel = %image.banner.trim_end(),
                slide = format_args!("{:#x}", attached.slide.slide),
                waited_ms = started.elapsed().as_millis() as u64,
                "patching is ready: attached to the Linux kernel"
            );
            slot.set_ready(Arc::new(SharedEngine::new(engine)));
            if vm.integrity_metrics().mode != kvm_vmm::integrity::Mode::Off {
                let arena = attached.arena.gva..attached.arena.gva + attached.arena.size;
                protect_text(vm, image, attached.slide.slide, arena);
            }
        }
        Err(e) => {
            let why = crate::exit::render_error(&e);
            tracing::error!(%why, "patching is unavailable: could not attach to the kernel");
            slot.set_failed(why);
        }
    }
}

/// Protects the kernel's text now that it has booted, with the policy that lets its own
/// run-time rewrites through (docs/code-integrity.md, "Linux guests").
fn protect_text(vm: &Arc<Vm>, image: &KernelImage, slide: u64, arena: std::ops::Range<u64>) {
    let text = match linux_guest::attach::kernel_text(vm.as_ref(), image, slide) {
        Ok(Some(text)) => text,
        Ok(None) => {
            tracing::error!(
                "code integrity: the kernel's text is not one contiguous range here; it stays unprotected"
            );
            return;
        }
        Err(e) => {
            tracing::error!(error = %crate::exit::render_error(&e), "code integrity: could not locate the kernel's text; it stays unprotected");
            return;
        }
    };
    vm.set_rewrite_policy(Arc::new(KernelTextPolicy {
        sites: image.text_sites.clone(),
        text,
        slide,
        arena,
    }));
    match vm.protect_kernel_text(text.gpa, text.gpa + text.len) {
        Ok(range) => tracing::info!(
            start = format_args!("{:#x}", range.start),
            end = format_args!("{:#x}", range.end),
            "code integrity: the kernel's text is protected; its own rewrites are checked against its tables"
        ),
        Err(e) => {
            tracing::error!(error = %crate::exit::render_error(&e), "code integrity: could not protect the kernel's text")
        }
    }
}

/// Module space (`MODULES_VADDR`..`MODULES_END` on x86-64): where ftrace trampolines and
/// module code live, which static calls and ftrace sites may call.
const MODULES: std::ops::Range<u64> = 0xffff_ffff_c000_0000..0xffff_ffff_ff00_0000;

/// Vouches for the kernel's own rewrites of its text: the write must change a site listed in
/// the image's tables from one of its forms to another (linux_guest::text_sites).
#[derive(Debug)]
struct KernelTextPolicy {
    sites: Arc<linux_guest::text_sites::KernelTextSites>,
    text: linux_guest::attach::KernelText,
    slide: u64,
    /// The arena's guest-virtual range: hot-patch code. No form of a site jumps there, so a
    /// patched site is never rewritten for the guest.
    arena: std::ops::Range<u64>,
}

impl kvm_vmm::integrity::RewritePolicy for KernelTextPolicy {
    fn allows(
        &self,
        mem: &kvm_vmm::memory::GuestMemory,
        gpa: u64,
        data: &[u8],
    ) -> Option<&'static str> {
        use vm_memory::{Bytes, GuestAddress};
        let t = self.text;
        let off = gpa.checked_sub(t.gpa)?;
        if off.checked_add(data.len() as u64)? > t.len {
            return None;
        }
        let current = |link: u64, len: usize| {
            let at = link.checked_sub(t.link)?;
            if at.checked_add(len as u64)? > t.len {
                return None;
            }
            let mut buf = vec![0u8; len];
            mem.read_slice(&mut buf, GuestAddress(t.gpa + at)).ok()?;
            Some(buf)
        };
        let target_ok = |link: u64| {
            let runtime = link.wrapping_add(self.slide);
            !self.arena.contains(&runtime)
                && ((t.link..t.link + t.len).contains(&link) || MODULES.contains(&runtime))
        };
        self.sites
            .judge_rewrite(t.link + off, data, current, target_ok)
            .map(|m| m.name())
    }
}
