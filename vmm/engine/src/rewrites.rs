//! How an operating system legitimately rewrites its own code after loading it, which the
//! expected-bytes check (rule 1) must accept. The engine knows no OS: the OS layer passes its
//! policy in when it builds the engine ([`Engine::new`]); without one, guest code must match the patch's
//! expected bytes exactly.

use crate::Engine;
use crate::plan::PlanError;
use crate::target::Target;
use crate::threads::ThreadStack;
use guest_control::VcpuState;
use guest_control::paging::PagingRegs;

/// One site's code as the patch expects it and as the guest holds it.
#[derive(Debug, Clone, Copy)]
pub struct SiteText<'a> {
    pub site: &'a str,
    pub expected: &'a [u8],
    pub current: &'a [u8],
    /// The run-time address of both.
    pub at: u64,
    /// The bytes start at a function's entry.
    pub function_entry: bool,
    /// The guest's memory as it is now, for the OS layer to read the state a rewrite was
    /// made from (e.g. where a static call's trampoline jumps): what the rewritten form must
    /// agree with. What it reads is the guest's word, to check a form against, never a source
    /// of accepted bytes.
    pub memory: GuestMemory<'a>,
}

/// Reads `len` bytes of guest memory at a run-time virtual address (through the same page
/// tables as the site), `None` when it cannot.
#[derive(Clone, Copy)]
pub struct GuestMemory<'a>(pub &'a (dyn Fn(u64, usize) -> Option<Vec<u8>> + 'a));

impl GuestMemory<'_> {
    /// No guest to read: every read fails (and whatever needs one is not accepted).
    pub const NONE: GuestMemory<'static> = GuestMemory(&|_, _| None);

    pub fn read(&self, gva: u64, len: usize) -> Option<Vec<u8>> {
        (self.0)(gva, len).filter(|b| b.len() == len)
    }
}

impl std::fmt::Debug for GuestMemory<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GuestMemory")
    }
}

/// A place where the OS rewrites its code while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveRewrite {
    /// Run-time address of the first byte the OS may rewrite.
    pub at: u64,
    /// What rewrites it, in words for the operator (e.g. "a jump label (…)").
    pub what: String,
}

/// The most stacks of interrupted contexts scanned per vCPU
/// ([`TextRewrites::interrupted_stacks`]).
pub const MAX_INTERRUPTED_STACKS: usize = 4;

/// An OS's known rewrites of its own text.
pub trait TextRewrites: Send + Sync {
    /// `text.expected` with the OS's rewrites taken from `text.current` where (and only where)
    /// they are the known ones; an error when the guest's code is in a form the patcher must
    /// not touch.
    fn reconcile(&self, text: &SiteText<'_>, target: &Target) -> Result<Vec<u8>, PlanError>;

    /// The first place in `[start, end)` (run-time addresses) that the OS may rewrite while it
    /// runs (a jump label, a static call...): the engine never displaces one, since the OS's
    /// next rewrite there would land in the middle of the jump. None by default.
    fn live_rewrite(&self, _start: u64, _end: u64, _target: &Target) -> Option<LiveRewrite> {
        None
    }

    /// What, if anything, the OS rewrites at `at` (run-time address) by itself: named in the
    /// refusal when the guest's bytes there differ from the patch's in a way [`reconcile`]
    /// does not accept, so the operator reads "the kernel rewrote it (an alternative)" rather
    /// than "the patch was built for other code". None by default.
    ///
    /// [`reconcile`]: TextRewrites::reconcile
    fn explain(&self, _at: u64, _target: &Target) -> Option<String> {
        None
    }

    /// The address space the OS's code is mapped in, as seen from a parked vCPU: what the
    /// engine translates sites and the arena through. A kernel with page-table isolation runs
    /// a vCPU halted in user mode on a copy that does not map its text; the OS layer knows how
    /// to get from one to the other. The vCPU's own by default.
    fn code_view(&self, vcpu: &VcpuState) -> VcpuState {
        *vcpu
    }

    /// Where the contexts a parked vCPU interrupted keep their stacks, when those are not the
    /// stack the vCPU runs on: the engine scans each as it scans the vCPU's own (a return
    /// address or an interrupted RIP inside a range being changed holds the write back; at most
    /// [`MAX_INTERRUPTED_STACKS`] are scanned). A Linux vCPU in an interrupt handler runs on its
    /// CPU's IRQ stack, and the RIP it will return to is on the task stack it left. `memory`
    /// reads through the vCPU's own page tables. None by default.
    fn interrupted_stacks(&self, _vcpu: &VcpuState, _memory: GuestMemory<'_>) -> Vec<u64> {
        Vec::new()
    }

    /// Where, above `rsp`, the stack it is on holds the registers user mode saved when it
    /// entered the kernel (Linux's `pt_regs` at the top of a task stack): the scan of a
    /// parked vCPU's stack, or of one a context it interrupted left, ends there. Those words
    /// are the user's (a system call's arguments), never a kernel resume point, and a user
    /// making system calls with kernel addresses in its registers would otherwise hold a patch
    /// back. `memory` reads through the vCPU's own page tables. None (scan on) by default.
    fn user_frame_at(&self, _vcpu: &VcpuState, _rsp: u64, _memory: GuestMemory<'_>) -> Option<u64> {
        None
    }

    /// Whether [`TextRewrites::threads`] can list the OS's threads (the OS layer knows where
    /// its scheduler keeps them). False by default.
    fn lists_threads(&self) -> bool {
        false
    }

    /// Every thread the OS keeps off the vCPUs, each with its stack, read with the guest
    /// parked through `memory` (the kernel's address space): the engine scans each stack as
    /// it scans a vCPU's, so a task asleep or preempted inside a range being changed holds the
    /// write back. An error says why the list could not be read; the engine then holds back
    /// what needed it (retried, then busy). Called only when [`TextRewrites::lists_threads`]
    /// is true, `EngineConfig::list_threads` is not `Off`, and the change needs the list.
    fn threads(&self, _memory: GuestMemory<'_>) -> Result<Vec<ThreadStack>, String> {
        Ok(Vec::new())
    }
}

impl<G: crate::GuestControl> Engine<G> {
    /// `site`'s expected bytes (resolved at run-time address `at`) with the OS's known rewrites
    /// taken from `current`: what rule 1 compares against, and what recovery and adoption
    /// derive original bytes from. One place, so all three read the policy the same way.
    ///
    /// `paging` is what the site was translated through: the OS layer's reads of guest memory
    /// (the state a rewrite was made from) go through the same page tables.
    pub(crate) fn reconciled(
        &self,
        paging: &PagingRegs,
        name: &str,
        site: &patch_format::Site,
        at: u64,
        current: &[u8],
    ) -> Result<Vec<u8>, PlanError> {
        let read = |gva: u64, len: usize| {
            let gpa = self.gpa_of(paging, name, gva, len).ok()?;
            let mut b = vec![0u8; len];
            self.guest.read_phys(gpa, &mut b).ok()?;
            Some(b)
        };
        self.rewrites.reconcile(
            &SiteText {
                site: name,
                expected: &site.expected,
                current,
                at,
                function_entry: site.kind == patch_format::SiteKind::Function,
                memory: GuestMemory(&read),
            },
            &self.target,
        )
    }
}

/// Images loaded as they are: the expected bytes must match exactly.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRewrites;

impl TextRewrites for NoRewrites {
    fn reconcile(&self, text: &SiteText<'_>, _target: &Target) -> Result<Vec<u8>, PlanError> {
        Ok(text.expected.to_vec())
    }
}
