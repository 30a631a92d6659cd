//! Hypervisor-enforced code integrity: the guest's code is mapped to it through read-only KVM
//! memory slots, so only the VMM — and its patch engine, which writes through the VMM's own
//! mapping of guest memory — can change it (the rule VBS/HVCI gives Windows).
//!
//! A guest write into a protected page does not reach memory: KVM exits to the VMM with
//! `KVM_EXIT_MMIO`. In [`Mode::Enforce`] the VMM drops the write; in [`Mode::Audit`] it performs
//! it for the guest; in both it records who wrote what where ([`Violation`]) and logs it, at
//! most a burst of [`LOG_BURST`] lines and then [`LOG_PER_SECOND`] per second, so a guest that
//! hammers its code cannot flood the log. Reads and instruction fetches never exit: protection
//! costs nothing until a write happens. [`Mode::Off`] leaves the memory map exactly as without
//! this module (one writable slot per memory region).

pub mod ranges;
pub mod slots;
pub mod writer;

use std::collections::VecDeque;
use std::sync::{Mutex, RwLock};
use std::time::Instant;

use crate::log_limit::Limiter;

use kvm_ioctls::VmFd;
use serde::{Serialize, Serializer};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;
use guest_control::stats::{History, Summary};
pub use ranges::{CodeRange, RangeError, RangeSource};
pub use slots::{Backing, Slot, SlotError, SlotTable};
pub use writer::Writer;

/// Violations kept for the API (older ones are only counted).
pub const RECENT: usize = 256;
/// Log lines allowed at once before rate limiting starts.
pub const LOG_BURST: f64 = 10.0;
/// Log lines per second once the burst is used up.
pub const LOG_PER_SECOND: f64 = 1.0;

/// What the VMM does about guest writes to its own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Code is ordinary writable memory (the memory map has no read-only slots).
    #[default]
    Off,
    /// Guest writes to code are performed for the guest, and recorded.
    Audit,
    /// Guest writes to code are dropped (the guest's code never changes), and recorded.
    Enforce,
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Off => "off",
            Mode::Audit => "audit",
            Mode::Enforce => "enforce",
        })
    }
}

/// What happened to a trapped write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Dropped,
    Written,
    /// A legitimate rewrite by the guest's own mechanism (see [`RewritePolicy`]), performed
    /// for it by the VMM in every mode.
    Allowed,
}

/// The guest's own legitimate rewrites of its protected code, which the VMM performs for it.
///
/// Why: a stock kernel rewrites its text while it runs (static keys, static calls, ftrace,
/// through `text_poke_bp`'s int3 protocol). With its text read-only those writes trap here;
/// dropping them would make the kernel BUG (it reads every poke back). A policy built from the
/// kernel image's own tables of rewritable sites vouches for the writes that change such a
/// site from one of its known forms to another; every other write is handled by the mode.
pub trait RewritePolicy: Send + Sync + std::fmt::Debug {
    /// The mechanism (for the report), when writing `data` at `gpa` is such a rewrite. `mem`
    /// holds the bytes as they are before the write.
    fn allows(&self, mem: &GuestMemory, gpa: u64, data: &[u8]) -> Option<&'static str>;
}

/// One guest write into protected code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Violation {
    /// 1 for the first violation of this VM.
    pub seq: u64,
    pub vcpu: usize,
    /// The writing instruction (see [`writer`]); `None` when its bytes could not be found.
    #[serde(serialize_with = "hex_opt")]
    pub rip: Option<u64>,
    pub instruction: Option<String>,
    /// Where the vCPU resumes: KVM reports the write after the instruction completed.
    #[serde(serialize_with = "hex")]
    pub next_rip: u64,
    /// Privilege level of the writer (0 = kernel, 3 = user).
    pub cpl: u8,
    #[serde(serialize_with = "hex")]
    pub gpa: u64,
    pub size: usize,
    /// The bytes the guest tried to write, in hex.
    pub bytes: String,
    pub action: Action,
    /// For an allowed rewrite, the mechanism that vouched for it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mechanism: Option<String>,
    pub uptime_ms: u64,
}

/// What the vCPU saw when the write trapped.
#[derive(Debug, Clone)]
pub struct WriteContext {
    /// When the vCPU thread got the exit (for the VMM's handling time).
    pub trapped_at: Instant,
    pub next_rip: u64,
    pub cpl: u8,
    pub writer: Option<Writer>,
}

/// Counters for `/v1/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct IntegrityMetrics {
    pub mode: Mode,
    pub violations: u64,
    pub dropped: u64,
    pub written: u64,
    /// Legitimate rewrites the VMM performed for the guest ([`RewritePolicy`]).
    pub allowed: u64,
    pub log_suppressed: u64,
    /// Nanoseconds the VMM spent per trapped write, from the exit reaching the vCPU thread to
    /// the record (finding the writer included); KVM's exit and re-entry come on top.
    pub handle_ns: Summary,
}

/// Everything operators see (`GET /v1/integrity`, `vmm integrity`).
#[derive(Debug, Clone, Serialize)]
pub struct IntegrityStatus {
    #[serde(flatten)]
    pub metrics: IntegrityMetrics,
    pub ranges: Vec<CodeRange>,
    pub slots: Vec<Slot>,
    pub by_vcpu: Vec<u64>,
    /// The latest violations, oldest first (at most [`RECENT`]).
    pub recent: Vec<Violation>,
}

#[derive(Debug, Error)]
pub enum IntegrityError {
    #[error(
        "this host's KVM has no read-only memory slots (KVM_CAP_READONLY_MEM), which --code-integrity {0} needs; run with --code-integrity off"
    )]
    Unsupported(Mode),
    #[error(
        "code integrity is off on this VM, so there is nothing to protect ranges with; start it with --code-integrity enforce (or audit)"
    )]
    Off,
    #[error(transparent)]
    Range(#[from] RangeError),
    #[error(transparent)]
    Slots(#[from] SlotError),
}

/// A write of a wide instruction still arriving in 8-byte fragments.
#[derive(Debug, Clone, Copy)]
struct Fragments {
    seq: u64,
    next_gpa: u64,
    next_rip: u64,
    remaining: usize,
}

#[derive(Debug)]
struct Book {
    total: u64,
    dropped: u64,
    written: u64,
    allowed: u64,
    by_vcpu: Vec<u64>,
    recent: VecDeque<Violation>,
    fragments: Vec<Option<Fragments>>,
    limiter: Limiter,
    handle_ns: History,
}

#[derive(Debug, Default)]
struct Protected {
    ranges: Vec<CodeRange>,
    merged: Vec<(u64, u64)>,
}

/// The code-integrity state of one VM: mode, protected ranges, KVM slots, violations.
#[derive(Debug)]
pub struct Integrity {
    mode: Mode,
    protected: RwLock<Protected>,
    slots: Mutex<SlotTable>,
    book: Mutex<Book>,
    policy: RwLock<Option<std::sync::Arc<dyn RewritePolicy>>>,
    started: Instant,
}

impl Integrity {
    /// `ranges` are what to protect (ignored when `mode` is off).
    pub fn new(mode: Mode, vcpus: usize, ranges: Vec<CodeRange>) -> Integrity {
        let ranges = if mode == Mode::Off {
            Vec::new()
        } else {
            ranges
        };
        let merged = ranges::merged(&ranges);
        Integrity {
            mode,
            protected: RwLock::new(Protected { ranges, merged }),
            slots: Mutex::new(SlotTable::default()),
            book: Mutex::new(Book {
                total: 0,
                dropped: 0,
                written: 0,
                allowed: 0,
                by_vcpu: vec![0; vcpus],
                recent: VecDeque::new(),
                fragments: vec![None; vcpus],
                limiter: Limiter::new(),
                handle_ns: History::new(10_000),
            }),
            policy: RwLock::new(None),
            started: Instant::now(),
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Installs the policy that vouches for the guest's own rewrites of its code.
    pub fn set_policy(&self, policy: std::sync::Arc<dyn RewritePolicy>) {
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Some(policy);
    }

    fn protected(&self) -> std::sync::RwLockReadGuard<'_, Protected> {
        self.protected.read().unwrap_or_else(|e| e.into_inner())
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the guest-physical byte `gpa` is protected code.
    pub fn protects(&self, gpa: u64) -> bool {
        if self.mode == Mode::Off {
            return false;
        }
        self.protected()
            .merged
            .iter()
            .any(|&(s, e)| s <= gpa && gpa < e)
    }

    /// Whether any byte of guest-physical `[start, end)` is protected code (device DMA checks
    /// its buffers with this: a device writes guest memory behind KVM's read-only slots).
    pub fn protects_any(&self, start: u64, end: u64) -> bool {
        if self.mode == Mode::Off {
            return false;
        }
        self.protected()
            .merged
            .iter()
            .any(|&(s, e)| start < e && s < end)
    }

    /// Registers guest memory with KVM as slots: before the vCPUs are created, or (from
    /// [`Integrity::protect`]) while they are all parked.
    pub fn install(
        &self,
        vm: &VmFd,
        backing: &[Backing],
        max_slots: usize,
    ) -> Result<(), IntegrityError> {
        let wanted = slots::plan(backing, &self.protected().merged);
        let mut table = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        table.change(vm, &wanted, max_slots)?;
        Ok(())
    }

    /// Adds a protected range and re-plans the slots. The caller must have every vCPU parked
    /// (see [`slots::SlotTable::change`]); `mem_size` bounds the range to guest memory.
    pub fn protect(
        &self,
        vm: &VmFd,
        backing: &[Backing],
        max_slots: usize,
        range: CodeRange,
        mem_size: u64,
    ) -> Result<(), IntegrityError> {
        if self.mode == Mode::Off {
            return Err(IntegrityError::Off);
        }
        ranges::check_in_memory(range.start, range.end, mem_size)?;
        let before = {
            let mut p = self.protected.write().unwrap_or_else(|e| e.into_inner());
            let before = std::mem::take(&mut *p);
            let mut ranges = before.ranges.clone();
            ranges.push(range);
            p.merged = ranges::merged(&ranges);
            p.ranges = ranges;
            before
        };
        if let Err(e) = self.install(vm, backing, max_slots) {
            // Leave the protection as it was: KVM still has the old slots where change failed
            // early (too many slots), and the old plan is what we report.
            *self.protected.write().unwrap_or_else(|e| e.into_inner()) = before;
            return Err(e);
        }
        tracing::info!(
            start = format_args!("{:#x}", range.start),
            end = format_args!("{:#x}", range.end),
            source = ?range.source,
            "code range protected"
        );
        Ok(())
    }

    /// Handles a guest write that trapped on protected memory: performs it in audit mode,
    /// records it, logs it (rate-limited). Returns what was done.
    pub fn guest_write(
        &self,
        mem: &GuestMemory,
        vcpu: usize,
        gpa: u64,
        data: &[u8],
        ctx: WriteContext,
    ) -> Action {
        let mechanism = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(|p| p.allows(mem, gpa, data));
        let action = match (mechanism, self.mode) {
            (Some(_), _) => {
                if let Err(e) = mem.write_slice(data, GuestAddress(gpa)) {
                    tracing::warn!(vcpu, gpa = format_args!("{gpa:#x}"), error = %e, "an allowed rewrite could not be performed");
                }
                Action::Allowed
            }
            (None, Mode::Audit) => {
                if let Err(e) = mem.write_slice(data, GuestAddress(gpa)) {
                    tracing::warn!(vcpu, gpa = format_args!("{gpa:#x}"), error = %e, "audited guest write could not be performed");
                }
                Action::Written
            }
            _ => Action::Dropped,
        };
        let now = Instant::now();
        let mut book = self.book();
        if book.fragments.len() <= vcpu {
            book.fragments.resize(vcpu + 1, None);
            book.by_vcpu.resize(vcpu + 1, 0);
        }
        // The rest of a wide write: extend its record instead of counting a second violation.
        if let Some(f) = book.fragments[vcpu]
            && f.next_gpa == gpa
            && f.next_rip == ctx.next_rip
        {
            let remaining = f.remaining.saturating_sub(data.len());
            book.fragments[vcpu] = (remaining > 0).then_some(Fragments {
                next_gpa: gpa + data.len() as u64,
                remaining,
                ..f
            });
            if let Some(v) = book.recent.iter_mut().rev().find(|v| v.seq == f.seq) {
                v.size += data.len();
                v.bytes.push_str(&hex::encode(data));
            }
            book.handle_ns
                .push(ctx.trapped_at.elapsed().as_nanos() as u64);
            return action;
        }
        book.total += 1;
        match action {
            Action::Dropped => book.dropped += 1,
            Action::Written => book.written += 1,
            Action::Allowed => book.allowed += 1,
        }
        book.by_vcpu[vcpu] += 1;
        let seq = book.total;
        let write_size = ctx.writer.as_ref().map_or(data.len(), |w| w.write_size);
        book.fragments[vcpu] = (write_size > data.len()).then_some(Fragments {
            seq,
            next_gpa: gpa + data.len() as u64,
            next_rip: ctx.next_rip,
            remaining: write_size - data.len(),
        });
        let v = Violation {
            seq,
            vcpu,
            rip: ctx.writer.as_ref().map(|w| w.rip),
            instruction: ctx.writer.map(|w| w.text),
            next_rip: ctx.next_rip,
            cpl: ctx.cpl,
            gpa,
            size: data.len(),
            bytes: hex::encode(data),
            action,
            mechanism: mechanism.map(str::to_string),
            uptime_ms: now.saturating_duration_since(self.started).as_millis() as u64,
        };
        if let Some(mechanism) = mechanism {
            tracing::debug!(
                vcpu,
                gpa = format_args!("{gpa:#x}"),
                bytes = %v.bytes,
                mechanism,
                "the guest's own code rewrite was vouched for and performed"
            );
        } else if let Some(suppressed) = book.limiter.admit(now) {
            tracing::warn!(
                vcpu,
                rip = %v.rip.map_or("unknown".to_string(), |r| format!("{r:#x}")),
                instruction = v.instruction.as_deref().unwrap_or("unknown"),
                cpl = v.cpl,
                gpa = format_args!("{gpa:#x}"),
                size = v.size,
                bytes = %v.bytes,
                action = ?action,
                violations = seq,
                suppressed,
                "guest wrote to protected code"
            );
        }
        if book.recent.len() == RECENT {
            book.recent.pop_front();
        }
        book.recent.push_back(v);
        book.handle_ns
            .push(ctx.trapped_at.elapsed().as_nanos() as u64);
        action
    }

    pub fn metrics(&self) -> IntegrityMetrics {
        let book = self.book();
        IntegrityMetrics {
            mode: self.mode,
            violations: book.total,
            dropped: book.dropped,
            written: book.written,
            allowed: book.allowed,
            log_suppressed: book.limiter.suppressed_total,
            handle_ns: book.handle_ns.summary(),
        }
    }

    pub fn status(&self) -> IntegrityStatus {
        let metrics = self.metrics();
        let book = self.book();
        IntegrityStatus {
            metrics,
            ranges: self.protected().ranges.clone(),
            slots: self
                .slots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .slots()
                .to_vec(),
            by_vcpu: book.by_vcpu.clone(),
            recent: book.recent.iter().cloned().collect(),
        }
    }
}

/// Serializes an address as `"0x…"`, as the rest of the API does.
pub fn hex<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:#x}"))
}

fn hex_opt<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => hex(v, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(next_rip: u64, size: usize) -> WriteContext {
        WriteContext {
            trapped_at: Instant::now(),
            next_rip,
            cpl: 3,
            writer: Some(Writer {
                rip: next_rip - 3,
                len: 3,
                write_size: size,
                text: "mov [rdi],rsi".into(),
            }),
        }
    }

    fn mem() -> GuestMemory {
        match crate::memory::allocate(16 << 20) {
            Ok(m) => m,
            Err(e) => panic!("16 MiB must be allocatable: {e}"),
        }
    }

    fn code() -> Vec<CodeRange> {
        vec![CodeRange::covering(
            0x10_0000,
            0x10_2000,
            RangeSource::Image,
        )]
    }

    #[test]
    fn off_protects_nothing_whatever_it_is_given() {
        let i = Integrity::new(Mode::Off, 1, code());
        assert!(!i.protects(0x10_0000));
        assert!(i.status().ranges.is_empty());
    }

    #[test]
    fn enforce_drops_audit_writes_and_both_record() {
        let m = mem();
        let word = 0x1122_3344_5566_7788u64.to_le_bytes();
        let e = Integrity::new(Mode::Enforce, 1, code());
        assert!(e.protects(0x10_1fff) && !e.protects(0x10_2000) && !e.protects(0xf_ffff));
        assert_eq!(
            e.guest_write(&m, 0, 0x10_0010, &word, ctx(0x10_0200, 8)),
            Action::Dropped
        );
        assert_eq!(m.read_obj::<u64>(GuestAddress(0x10_0010)).ok(), Some(0));
        let a = Integrity::new(Mode::Audit, 1, code());
        assert_eq!(
            a.guest_write(&m, 0, 0x10_0010, &word, ctx(0x10_0200, 8)),
            Action::Written
        );
        assert_eq!(
            m.read_obj::<u64>(GuestAddress(0x10_0010)).ok(),
            Some(0x1122_3344_5566_7788)
        );
        for (i, action) in [(&e, Action::Dropped), (&a, Action::Written)] {
            let s = i.status();
            assert_eq!(s.metrics.violations, 1);
            assert_eq!(s.recent.len(), 1);
            let v = &s.recent[0];
            assert_eq!(
                (v.vcpu, v.rip, v.gpa, v.size),
                (0, Some(0x10_01fd), 0x10_0010, 8)
            );
            assert_eq!(v.bytes, "8877665544332211");
            assert_eq!(v.action, action);
        }
    }

    #[test]
    fn a_wide_write_is_one_violation_and_a_loop_is_many() {
        let m = mem();
        let i = Integrity::new(Mode::Enforce, 2, code());
        // movups: 16 bytes in two fragments, same next RIP.
        i.guest_write(&m, 1, 0x10_0000, &[1; 8], ctx(0x10_0300, 16));
        i.guest_write(&m, 1, 0x10_0008, &[2; 8], ctx(0x10_0300, 16));
        let s = i.status();
        assert_eq!(s.metrics.violations, 1);
        assert_eq!(s.recent[0].size, 16);
        assert_eq!(
            s.recent[0].bytes,
            format!("{}{}", "01".repeat(8), "02".repeat(8))
        );
        // A loop of 8-byte stores to consecutive addresses: each is its own violation.
        for k in 0..5u64 {
            i.guest_write(&m, 0, 0x10_0100 + 8 * k, &[3; 8], ctx(0x10_0400, 8));
        }
        let s = i.status();
        assert_eq!(s.metrics.violations, 6);
        assert_eq!(s.by_vcpu, vec![5, 1]);
    }

    #[test]
    fn the_log_is_rate_limited_but_every_violation_counts() {
        let mut l = Limiter::new();
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| l.admit(t0).is_some()).count();
        assert_eq!(admitted, LOG_BURST as usize);
        assert_eq!(l.suppressed_total, 1000 - LOG_BURST as u64);
        // One second later one more line, carrying the count held back.
        assert_eq!(
            l.admit(t0 + std::time::Duration::from_millis(1001)),
            Some(1000 - LOG_BURST as u64)
        );
        let m = mem();
        let i = Integrity::new(Mode::Enforce, 1, code());
        for _ in 0..300 {
            i.guest_write(&m, 0, 0x10_0000, &[0; 8], ctx(0x10_0200, 8));
        }
        let met = i.metrics();
        assert_eq!(met.violations, 300);
        assert!(met.log_suppressed >= 300 - LOG_BURST as u64 - 1, "{met:?}");
        assert_eq!(i.status().recent.len(), RECENT);
    }
}
