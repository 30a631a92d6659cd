//! The test guest's progress reports (port 0x600), kept per vCPU with host timestamps.
//!
//! The guest writes the guest-physical address of its per-vCPU report record; the VMM reads the
//! record from guest memory. Everything in it is guest-controlled: the address is bounds-checked
//! by the memory accessors, the magic and version are checked, and a bad record is counted, not
//! trusted.

use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;
use vm_memory::{Bytes, GuestAddress};

use crate::log_limit::Limiter;
use crate::memory::GuestMemory;

/// One report as the guest wrote it; the wire layout and its decoding are
/// `guest_tools::protocol::Report`'s (one definition, compiled into the guest too).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct GuestReport {
    pub vcpu: u16,
    pub build: u32,
    pub flags: u32,
    pub seq: u64,
    pub calls: u64,
    pub v1: u64,
    pub v2: u64,
    pub bad: u64,
    pub last_input: u64,
    pub last_output: u64,
}

pub use guest_tools::protocol::REPORT_SIZE;

impl GuestReport {
    /// Decodes a record; `None` unless it is a valid report of this protocol (magic, version,
    /// build, vCPU range, and counters that add up).
    pub fn parse(b: &[u8]) -> Option<Self> {
        let r = guest_tools::protocol::Report::from_bytes(b).filter(|r| r.is_valid())?;
        Some(GuestReport {
            vcpu: r.vcpu,
            build: r.build,
            flags: r.flags,
            seq: r.seq,
            calls: r.calls,
            v1: r.v1,
            v2: r.v2,
            bad: r.bad,
            last_input: r.last_input,
            last_output: r.last_output,
        })
    }
}

/// What the VMM knows about one vCPU's reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VcpuReports {
    /// Reports received.
    pub count: u64,
    /// The newest report.
    pub last: Option<GuestReport>,
    /// Reports whose `seq` was not the previous one plus one (lost or duplicated reports).
    pub seq_errors: u64,
    /// Records that could not be read or had a bad magic, or named another vCPU.
    pub invalid: u64,
    /// Calls per second between the first and the newest report, measured on the host clock.
    pub calls_per_sec: Option<f64>,
    #[serde(skip)]
    first: Option<(Instant, u64)>,
    #[serde(skip)]
    last_at: Option<Instant>,
}

impl VcpuReports {
    fn update_rate(&mut self) {
        if let (Some((t0, c0)), Some(t1), Some(last)) = (self.first, self.last_at, self.last) {
            let dt = t1.saturating_duration_since(t0).as_secs_f64();
            if dt > 0.0 && last.calls > c0 {
                self.calls_per_sec = Some((last.calls - c0) as f64 / dt);
            }
        }
    }
}

/// Reports of every vCPU of a VM.
pub struct ReportBook {
    mem: GuestMemory,
    vcpus: Mutex<Vec<VcpuReports>>,
    /// The guest decides how many bad reports it sends: their warnings are rate-limited.
    log: Mutex<Limiter>,
}

impl ReportBook {
    pub fn new(mem: GuestMemory, vcpus: usize) -> Self {
        ReportBook {
            mem,
            vcpus: Mutex::new(vec![VcpuReports::default(); vcpus]),
            log: Mutex::new(Limiter::new()),
        }
    }

    /// Reads the record the guest points at and files it under `vcpu`.
    pub fn record(&self, vcpu: usize, gpa: u64) {
        let now = Instant::now();
        let mut raw = [0u8; REPORT_SIZE];
        let parsed = self
            .mem
            .read_slice(&mut raw, GuestAddress(gpa))
            .ok()
            .and_then(|_| GuestReport::parse(&raw))
            .filter(|r| usize::from(r.vcpu) == vcpu);
        let mut all = self.vcpus.lock().unwrap_or_else(|e| e.into_inner());
        let Some(entry) = all.get_mut(vcpu) else {
            return;
        };
        let Some(report) = parsed else {
            entry.invalid = entry.invalid.saturating_add(1);
            if let Some(held_back) = self.admit(now) {
                tracing::warn!(
                    vcpu,
                    gpa = format_args!("{gpa:#x}"),
                    held_back,
                    "invalid guest report"
                );
            }
            return;
        };
        // The guest chooses `seq`: wrap rather than overflow on u64::MAX.
        let expected = entry.last.map_or(1, |l| l.seq.wrapping_add(1));
        if report.seq != expected {
            entry.seq_errors = entry.seq_errors.saturating_add(1);
            if let Some(held_back) = self.admit(now) {
                tracing::warn!(
                    vcpu,
                    seq = report.seq,
                    expected,
                    held_back,
                    "guest report out of sequence"
                );
            }
        }
        if entry.first.is_none() {
            entry.first = Some((now, report.calls));
        }
        entry.count = entry.count.saturating_add(1);
        entry.last = Some(report);
        entry.last_at = Some(now);
        entry.update_rate();
    }

    fn admit(&self, now: Instant) -> Option<u64> {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(now)
    }

    /// Warnings about bad reports held back by the rate limit since the VM started.
    pub fn log_suppressed(&self) -> u64 {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .suppressed_total
    }

    pub fn snapshot(&self) -> Vec<VcpuReports> {
        self.vcpus.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_bytes(vcpu: u16, seq: u64, calls: u64) -> [u8; REPORT_SIZE] {
        guest_tools::protocol::Report {
            magic: guest_tools::protocol::REPORT_MAGIC,
            version: guest_tools::protocol::PROTOCOL_VERSION,
            vcpu,
            build: guest_tools::protocol::BUILD_V1,
            calls,
            v1: calls,
            seq,
            ..Default::default()
        }
        .to_bytes()
    }

    #[test]
    fn a_hostile_sequence_number_and_a_report_flood_cannot_hurt_the_vmm() {
        let mem = crate::memory::allocate(4 << 20).expect("memory");
        let book = ReportBook::new(mem.clone(), 1);
        // seq = u64::MAX then another report: the next expected number wraps, no overflow.
        for seq in [u64::MAX, 7] {
            mem.write_slice(&record_bytes(0, seq, 1), GuestAddress(0x1000))
                .expect("write");
            book.record(0, 0x1000);
        }
        assert_eq!(book.snapshot()[0].seq_errors, 2);
        // 10,000 invalid reports: every one counted, only a burst of them logged.
        for _ in 0..10_000 {
            book.record(0, 1 << 40);
        }
        assert_eq!(book.snapshot()[0].invalid, 10_000);
        assert!(
            book.log_suppressed() >= 10_000 - crate::log_limit::LOG_BURST as u64 - 2,
            "only {} warnings held back",
            book.log_suppressed()
        );
    }

    #[test]
    fn sequence_gaps_and_garbage_are_counted() {
        let mem = crate::memory::allocate(4 << 20).expect("memory");
        let book = ReportBook::new(mem.clone(), 2);
        for (seq, gpa) in [(1u64, 0x1000u64), (2, 0x1000), (4, 0x1000)] {
            mem.write_slice(&record_bytes(1, seq, seq * 100), GuestAddress(gpa))
                .expect("write");
            book.record(1, gpa);
        }
        // Wrong vCPU in the record, an address outside RAM, and garbage.
        mem.write_slice(&record_bytes(0, 5, 0), GuestAddress(0x2000))
            .expect("write");
        book.record(1, 0x2000);
        book.record(1, 1 << 40);
        book.record(0, 0x3000);
        book.record(7, 0x1000); // no such vCPU: ignored
        let snap = book.snapshot();
        assert_eq!(snap[1].count, 3);
        assert_eq!(snap[1].seq_errors, 1);
        assert_eq!(snap[1].invalid, 2);
        assert_eq!(snap[1].last.map(|r| r.calls), Some(400));
        assert_eq!(snap[0].invalid, 1);
    }
}
