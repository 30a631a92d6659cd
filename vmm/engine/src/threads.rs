//! The guest's threads that no vCPU is running, and where they may resume.
//!
//! The engine sees only parked vCPUs: their RIPs and the top of their stacks. A guest without
//! a scheduler (the test guest) has nothing else, so a vCPU at an instruction inside the bytes
//! a jump displaces is moved to the copy, and the patch is safe. An OS with a scheduler
//! (Linux) keeps threads in kernel code that no vCPU runs: a task asleep in a function the
//! displaced bytes call returns to the instruction after the call; in a kernel that preempts
//! kernel code, a preempted task resumes at any instruction. Neither can be moved, so the
//! engine must not let a jump cover such a resume point: rule 7 keeps calls last, and
//! [`crate::plan::check_hidden_threads`] keeps a preemptible kernel's jumps to one
//! instruction. Where the OS layer can list the threads ([`ThreadStack`]), a blackout that
//! needs them ([`ThreadListing`]: every one a thread could be in the way of where the backend
//! reads guest memory directly, as this VMM does; fewer through QEMU's slow gdbstub) scans
//! their stacks as it scans a vCPU's: then they are seen, a multi-function patch waits for a
//! task asleep in its old code, and a preempted task's RIP holds a jump back rather than every
//! jump over several instructions being refused (`docs/patch-engine.md`, "Threads the
//! hypervisor cannot see").

use guest_control::GuestControl;
use guest_control::paging::PagingRegs;

use crate::Engine;

/// What the guest's scheduler keeps out of the hypervisor's sight.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum HiddenThreads {
    /// Every thread of the guest is on a vCPU: parked RIPs and stacks are the whole truth.
    #[default]
    None,
    /// Threads sleep inside kernel code where no vCPU runs them: a reverted patch's arena
    /// code is never reused (one of them may return into it), and while the kernel preempts
    /// kernel code at any instruction a jump never displaces more than one. (A call before
    /// the last displaced instruction, whose return address a sleeper would hold, is refused
    /// for every guest: rule 7.)
    Scheduled(Preemption),
}

/// Where the guest's kernel may stop a thread running kernel code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Preemption {
    /// Only where it calls (into the scheduler, or a fault handler at an instruction with an
    /// exception fixup, which the OS layer keeps out of displaced bytes anyway).
    Voluntary,
    /// At any instruction (a kernel built with full preemption).
    Full,
    /// Chosen at boot or at run time (Linux's `PREEMPT_DYNAMIC`): the 32-bit word at run-time
    /// address `mode_at` names the mode, and it stops threads only where they call while the
    /// word holds one of `voluntary`. Any other value, or a word that cannot be read, counts
    /// as full preemption.
    Dynamic { mode_at: u64, voluntary: Vec<u32> },
}

impl<G: GuestControl> Engine<G> {
    /// Why a thread of this guest may be stopped at any instruction right now (for the
    /// refusal), or `None` when it may not. Read through `paging`, the address space sites
    /// are translated in; called when planning and again with the guest parked, since the
    /// mode can be switched in between.
    pub(crate) fn preempts_anywhere(&self, paging: &PagingRegs) -> Option<String> {
        let HiddenThreads::Scheduled(preemption) = &self.config.hidden_threads else {
            return None;
        };
        match preemption {
            Preemption::Voluntary => None,
            Preemption::Full => {
                Some("this kernel preempts kernel code at any instruction (it is built with full preemption)".into())
            }
            Preemption::Dynamic { mode_at, voluntary } => {
                let word = self
                    .gpa_of(paging, "the kernel's preemption mode", *mode_at, 4)
                    .ok()
                    .and_then(|gpa| {
                        let mut b = [0u8; 4];
                        self.guest.read_phys(gpa, &mut b).ok()?;
                        Some(u32::from_le_bytes(b))
                    });
                match word {
                    None => Some(format!(
                        "the kernel's preemption mode (the word at {mode_at:#x}) could not be read, so it may preempt kernel code at any instruction"
                    )),
                    Some(w) if voluntary.contains(&w) => None,
                    Some(w) => Some(format!(
                        "this kernel preempts kernel code at any instruction (its preemption mode word holds {w}, not a mode that stops tasks only where they call)"
                    )),
                }
            }
        }
    }
}

/// When the blackout lists the OS's threads (`EngineConfig::list_threads`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ThreadListing {
    /// Never: the vCPUs and the rules are all there is.
    #[default]
    Off,
    /// Where the engine could not otherwise promise the change: a patch replacing several
    /// functions (a task asleep in one of them), or a jump over several instructions while
    /// the kernel preempts anywhere (instead of refusing it). For a backend whose reads are
    /// slow (QEMU's gdbstub: tens of milliseconds for a small guest's walk).
    Essential,
    /// Also for every jump over several instructions, whatever the preemption mode says now:
    /// a task preempted before the mode was switched back is seen too. For a backend that
    /// reads guest memory directly (this VMM).
    Thorough,
}

/// A thread the OS keeps off the vCPUs (asleep, preempted, or about to run), listed by the OS
/// layer in a blackout that needs it ([`crate::rewrites::TextRewrites::threads`],
/// [`ThreadListing`]). Everything it will return through, or resume at, is on its stack
/// between `sp` and `top`: saved registers, return addresses, and for a preempted thread the
/// interrupted RIP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadStack {
    /// For messages, e.g. "task 412 (sleep)".
    pub name: String,
    /// Its saved stack pointer (run-time virtual address).
    pub sp: u64,
    /// The lowest address of its stack.
    pub base: u64,
    /// One past the highest.
    pub top: u64,
    /// Bytes at its top holding the registers user mode had when the thread entered the
    /// kernel (Linux's `pt_regs` of a task from user space), 0 if none: what the user put
    /// there, never a kernel resume point, so not scanned. A user blocking in a system call
    /// with kernel addresses in its registers would otherwise hold a patch back for as long
    /// as it sleeps.
    pub user_frame: u64,
}

/// The most bytes of one listed thread's stack scanned, whatever the OS layer says its size
/// is (a Linux kernel stack is 16 KiB, 32 KiB with KASAN).
pub const MAX_THREAD_STACK: u64 = 64 << 10;

impl ThreadStack {
    /// The range to scan: from the lowest of its saved `sp` and the stack pointers in
    /// `live` (parked vCPUs running it, contexts they interrupted) that lie on it, up to its
    /// top less its [`user_frame`](Self::user_frame), at most [`MAX_THREAD_STACK`]. A saved
    /// `sp` off the stack (never switched out, or stale) makes the scan start at the base:
    /// more words, never fewer.
    pub fn scan_range(&self, live: &[u64]) -> Option<(u64, u64)> {
        if self.top <= self.base {
            return None;
        }
        let end = self.top.saturating_sub(self.user_frame).max(self.base);
        let on = |sp: u64| sp >= self.base && sp < self.top;
        let saved = if on(self.sp) { self.sp } else { self.base };
        let start = live
            .iter()
            .copied()
            .filter(|&sp| on(sp))
            .fold(saved, u64::min)
            .max(self.top.saturating_sub(MAX_THREAD_STACK));
        Some(((start & !7).min(end), end))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack(sp: u64) -> ThreadStack {
        ThreadStack {
            name: "t".into(),
            sp,
            base: 0x1_0000,
            top: 0x1_4000,
            user_frame: 0,
        }
    }

    #[test]
    fn the_scan_starts_at_the_lowest_stack_pointer_on_the_stack() {
        // Its saved sp.
        assert_eq!(stack(0x1_3e08).scan_range(&[]), Some((0x1_3e08, 0x1_4000)));
        // A vCPU running it deeper than its saved (stale) sp; pointers elsewhere ignored.
        assert_eq!(
            stack(0x1_3e08).scan_range(&[0x1_2003, 0x9_0000, 0x1_4000]),
            Some((0x1_2000, 0x1_4000))
        );
        // A saved sp off the stack: the whole stack.
        assert_eq!(stack(0x5).scan_range(&[]), Some((0x1_0000, 0x1_4000)));
        // An empty or inverted stack: nothing.
        let mut s = stack(0x1_3000);
        s.top = s.base;
        assert_eq!(s.scan_range(&[]), None);
        // A huge one: at most MAX_THREAD_STACK below its top.
        let huge = ThreadStack {
            name: "t".into(),
            sp: 0x10,
            base: 0,
            top: 1 << 30,
            user_frame: 0,
        };
        assert_eq!(
            huge.scan_range(&[]),
            Some(((1 << 30) - MAX_THREAD_STACK, 1 << 30))
        );
    }

    #[test]
    fn the_registers_user_mode_left_at_the_top_are_not_scanned() {
        let mut s = stack(0x1_3e08);
        s.user_frame = 168;
        assert_eq!(s.scan_range(&[]), Some((0x1_3e08, 0x1_4000 - 168)));
        // A stack pointer inside that frame (the entry code saving it) scans nothing above.
        assert_eq!(
            stack(0x1_3ff0).with_user_frame(168).scan_range(&[]),
            Some((0x1_4000 - 168, 0x1_4000 - 168))
        );
        // A frame claimed larger than the stack leaves nothing to scan, never a wrap.
        assert_eq!(
            stack(0x1_3e08).with_user_frame(u64::MAX).scan_range(&[]),
            Some((0x1_0000, 0x1_0000))
        );
    }

    impl ThreadStack {
        fn with_user_frame(mut self, bytes: u64) -> Self {
            self.user_frame = bytes;
            self
        }
    }
}
