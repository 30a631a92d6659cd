// The hot-patch test guest: a freestanding PVH kernel built twice (v1, and v2 with
// `--cfg guest_v2`) by `guest-tools/build.rs` with the host's rustc.
//
// Ring 0 is only the hand-written assembly in `boot.rs` (this machine's KVM emulates CPL0 code
// slowly and incompletely): it brings each vCPU to long mode, installs its GDT/TSS/IDT and drops
// to ring 3 at `guest_main`. Everything compiled from Rust runs in ring 3 (IOPL=3, so port I/O
// works there). See docs/guest-protocol.md.

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn)]
#![deny(clippy::undocumented_unsafe_blocks)]

// The host crate's protocol and reference formulas, the very same files.
#[allow(dead_code)]
mod protocol {
    include!("../src/protocol.rs");
}
#[allow(dead_code)]
mod reference {
    include!("../src/reference.rs");
}

mod boot;
mod cmdline;
mod console;
mod mem;
mod workload;

use core::sync::atomic::{AtomicU32, Ordering};

use console::Line;
use protocol::{EXIT_BAD_CMDLINE, EXIT_BAD_START_INFO, EXIT_OK, EXIT_PANIC};

/// Which image this is (`Report::build`). A named static read at run time, not a constant: code
/// that uses it is then byte-identical in v1 and v2 (it refers to the same symbol), so the
/// v1 → v2 difference is exactly the functions that were fixed.
#[cfg(not(guest_v2))]
#[unsafe(no_mangle)]
pub static GUEST_BUILD: u32 = protocol::BUILD_V1;
#[cfg(guest_v2)]
#[unsafe(no_mangle)]
pub static GUEST_BUILD: u32 = protocol::BUILD_V2;

/// The build's number as the console shows it (`build=v<n>`).
pub fn build() -> u32 {
    // SAFETY: reading a plain static; volatile so the value is not folded into the code.
    unsafe { core::ptr::read_volatile(&raw const GUEST_BUILD) }
}

/// vCPUs that reached ring 3.
static ONLINE: AtomicU32 = AtomicU32::new(0);
/// vCPUs that finished their `reports=N`.
static DONE: AtomicU32 = AtomicU32::new(0);

/// Ring-3 entry of every vCPU (the `iretq` in `boot.rs` lands here with `rdi` = vCPU index,
/// `rsi` = guest-physical address of the PVH `hvm_start_info`).
#[unsafe(no_mangle)]
pub extern "C" fn guest_main(cpu: u64, start_info: u64) -> ! {
    ONLINE.fetch_add(1, Ordering::SeqCst);

    let mut line = Line::new();
    line.str("hp: vcpu=")
        .u64(cpu)
        .str(" online build=v")
        .u64(u64::from(build()));
    line.emit();

    let raw = match cmdline::from_start_info(start_info) {
        Ok(raw) => raw,
        Err(msg) => {
            let mut line = Line::new();
            line.str("hp: vcpu=").u64(cpu).str(" error: ").str(msg);
            line.emit();
            power_off(EXIT_BAD_START_INFO);
        }
    };
    let opts = match cmdline::parse(raw) {
        Ok(opts) => opts,
        Err(err) => {
            let mut line = Line::new();
            line.str("hp: vcpu=").u64(cpu).str(" error: ").str(err.what);
            if !err.token.is_empty() {
                line.str(" in \"").bytes_sanitized(err.token).str("\"");
            }
            line.emit();
            power_off(EXIT_BAD_CMDLINE);
        }
    };
    if cpu == 0 {
        let mut line = Line::new();
        line.str("hp: vcpu=0 cmdline=\"")
            .bytes_sanitized(raw)
            .str("\" reports=")
            .u64(opts.reports)
            .str(" batch=")
            .u64(opts.batch)
            .str(" mode=")
            .str(opts.mode.name())
            .str(" cpus=")
            .u64(opts.cpus);
        if opts.mode == cmdline::Mode::Spin {
            line.str(" spin=").u64(opts.spin);
        }
        line.emit();
    }

    workload::run(cpu, &opts);

    // This vCPU made its `reports=N` reports.
    let done = DONE.fetch_add(1, Ordering::SeqCst) + 1;
    let mut line = Line::new();
    line.str("hp: vcpu=")
        .u64(cpu)
        .str(" done reports=")
        .u64(opts.reports);
    line.emit();
    // The last vCPU to finish powers off. With `cpus=N` it waits until N vCPUs came online and
    // finished; without, it waits a grace period for vCPUs still in their (slow, emulated)
    // ring-0 boot, so that a VMM starting all vCPUs at once does not lose the late ones.
    let mut all_done_since: Option<u64> = None;
    loop {
        let online = ONLINE.load(Ordering::SeqCst);
        let done_now = DONE.load(Ordering::SeqCst);
        if done != done_now {
            // Someone finished after this vCPU: that one powers off.
            spin_forever();
        }
        if done_now == online && u64::from(online) >= opts.cpus {
            let now = rdtsc();
            let since = *all_done_since.get_or_insert(now);
            if opts.cpus != 0 || now.wrapping_sub(since) >= LATE_VCPU_GRACE_TSC {
                let mut line = Line::new();
                line.str("hp: all ")
                    .u64(u64::from(online))
                    .str(" vcpus done, power off status 0");
                line.emit();
                power_off(EXIT_OK);
            }
        } else {
            all_done_since = None;
        }
        core::hint::spin_loop();
    }
}

/// How long the last vCPU to finish waits for late vCPUs without `cpus=N`: 2^27 TSC ticks,
/// some 30 to 130 ms at 1 to 4 GHz.
const LATE_VCPU_GRACE_TSC: u64 = 1 << 27;

/// The time-stamp counter (unprivileged: the boot code leaves CR4.TSD clear).
fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: `rdtsc` only reads the TSC into edx:eax.
    unsafe {
        core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Powers the VM off with `status` (32-bit `out` to the exit port), or spins if no device is
/// there.
pub fn power_off(status: u32) -> ! {
    console::outl(protocol::EXIT_PORT, status);
    let mut line = Line::new();
    line.str("hp: power off failed (no exit device at port 0xf4), spinning");
    line.emit();
    spin_forever()
}

/// `hlt` is privileged in ring 3: spin.
pub fn spin_forever() -> ! {
    loop {
        core::hint::spin_loop();
    }
}

/// The vCPU index, for messages from code that does not have it at hand (the panic handler):
/// initial APIC ID from CPUID leaf 1 (unprivileged).
fn current_cpu() -> u64 {
    // CPUID leaf 1 exists on every x86-64 CPU and has no side effects.
    let leaf = core::arch::x86_64::__cpuid(1);
    u64::from(leaf.ebx >> 24)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let mut line = Line::new();
    line.str("hp: vcpu=").u64(current_cpu()).str(" panic");
    if let Some(loc) = info.location() {
        line.str(" at ")
            .str(loc.file())
            .str(":")
            .u64(u64::from(loc.line()));
    }
    line.emit();
    power_off(EXIT_PANIC)
}
