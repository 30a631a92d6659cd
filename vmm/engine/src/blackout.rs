//! The blackout: with every vCPU parked, check that the guest still holds what was planned and
//! that no vCPU is in the way, write every site or none, move vCPUs out of displaced bytes,
//! resume. Retries with backoff while a vCPU is in the way, then reports "busy".
//!
//! All or nothing (docs/patch-engine.md): if a write or a vCPU move fails part-way, every byte
//! already written in this blackout is put back before the guest resumes. Only if that undo
//! fails too does the engine report [`EngineError::Stranded`], and the caller then keeps the
//! arena code the guest may still reach.

use std::fmt;
use std::time::{Duration, Instant};

use guest_control::{GuestControl, Paused, VcpuState};
use tracing::{error, info};

use crate::apply::Prepared;
use crate::journal::PatchRecord;
use crate::{Engine, EngineError, overlay_originals, site_range};

/// Hard cap on the stack bytes scanned per vCPU, whatever the configuration says: the scan runs
/// inside the blackout, on guest-controlled addresses.
pub const MAX_STACK_SCAN: usize = 64 << 10;

/// The default cap on the time the checks of one attempt may keep the guest parked; past it
/// the attempt writes nothing, resumes and counts as busy.
pub const MAX_CHECK_TIME: Duration = Duration::from_millis(50);

/// A change to make in one blackout: new sites to write, applied patches to take out.
pub(crate) struct Change<'a> {
    pub(crate) write: &'a [Prepared],
    pub(crate) restore: &'a [&'a PatchRecord],
    /// Code no vCPU may be running or returning into (consistency of multi-function patches),
    /// as `[start, end)` with a name for messages.
    pub(crate) quiesce: Vec<(u64, u64, String)>,
    /// Function entries inside `quiesce` where a vCPU may sit: it has not started the call.
    pub(crate) entries: Vec<u64>,
}

impl Change<'_> {
    fn quiesce_hit(&self, addr: u64) -> Option<&str> {
        if self.entries.contains(&addr) {
            return None;
        }
        self.quiesce
            .iter()
            .find(|(a, b, _)| addr >= *a && addr < *b)
            .map(|(_, _, n)| n.as_str())
    }
}

/// What a committed blackout did.
pub(crate) struct Committed {
    pub(crate) blackout: Duration,
    /// Of the blackout, the engine's own work: from the pause returning (every vCPU parked,
    /// registers in hand) to asking for the resume.
    pub(crate) engine: Duration,
    pub(crate) phases: BlackoutPhases,
    pub(crate) attempts: u32,
    pub(crate) moved: u32,
    /// The OS's threads scanned, when the change needed them listed.
    pub(crate) threads: Option<u32>,
}

/// Where the engine's own blackout work goes (ns), for the benchmark: the re-check of the
/// guest (page tables, every site's current bytes), the scan of the parked vCPUs (RIPs and
/// stack words against the ranges that change), and the writes with the vCPU moves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BlackoutPhases {
    pub recheck_ns: u64,
    pub scan_ns: u64,
    pub write_ns: u64,
    /// Threads of the OS off the vCPUs whose stacks the scan covered (0 when they were not
    /// listed: the backend does not, or the change could not be in a thread's way).
    #[serde(default)]
    pub threads: u32,
}

/// Why a vCPU is in the way of a change: the blackout backs off and tries again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Busy {
    /// A return address on the vCPU's stack points inside a range about to change.
    ReturnsInside {
        vcpu: usize,
        word: u64,
        site: String,
    },
    /// The vCPU is running code that must be quiescent.
    Running { vcpu: usize, rip: u64, code: String },
    /// The vCPU will return into code that must be quiescent.
    WillReturnInto {
        vcpu: usize,
        word: u64,
        code: String,
    },
    /// The vCPU sits inside displaced bytes, not on an instruction boundary of them.
    MidInstruction { vcpu: usize, rip: u64, site: String },
    /// The vCPU sits inside a patched site about to be restored.
    InsideSite { vcpu: usize, rip: u64, site: String },
    /// A thread the OS keeps off the vCPUs would return, or resume, inside a range about to
    /// change.
    ThreadResumesInside {
        thread: String,
        word: u64,
        site: String,
    },
    /// A thread the OS keeps off the vCPUs is asleep (or preempted) in code that must be
    /// quiescent.
    ThreadInside {
        thread: String,
        word: u64,
        code: String,
    },
    /// The OS's threads could not be listed, and the change needs them.
    Unlisted { why: String, needs: String },
    /// The checks alone took longer than the configured cap with the guest parked.
    Slow { elapsed_us: u64, limit_us: u64 },
}

impl fmt::Display for Busy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Busy::ReturnsInside { vcpu, word, site } => {
                write!(f, "vCPU {vcpu} has {word:#x}, inside {site}, on its stack")
            }
            Busy::Running { vcpu, rip, code } => {
                write!(f, "vCPU {vcpu} is running {code} at {rip:#x}")
            }
            Busy::WillReturnInto { vcpu, word, code } => {
                write!(
                    f,
                    "vCPU {vcpu} will return into {code} ({word:#x} on its stack)"
                )
            }
            Busy::MidInstruction { vcpu, rip, site } => write!(
                f,
                "vCPU {vcpu} at {rip:#x} is not on an instruction boundary of {site}"
            ),
            Busy::InsideSite { vcpu, rip, site } => {
                write!(f, "vCPU {vcpu} at {rip:#x} is inside patched site {site}")
            }
            Busy::ThreadResumesInside { thread, word, site } => write!(
                f,
                "{thread}, which no vCPU is running, has {word:#x}, inside {site}, on its stack: it would resume in the middle of the new bytes"
            ),
            Busy::ThreadInside { thread, word, code } => write!(
                f,
                "{thread}, which no vCPU is running, is inside {code} ({word:#x} on its stack)"
            ),
            Busy::Unlisted { why, needs } => write!(
                f,
                "the guest's threads could not be listed ({why}), and {needs}; if this persists, the kernel's task list is not where its type information says"
            ),
            Busy::Slow {
                elapsed_us,
                limit_us,
            } => write!(
                f,
                "checking the parked vCPUs took {elapsed_us} µs, over the {limit_us} µs limit"
            ),
        }
    }
}

/// The outcome of one attempt with the guest parked.
enum Attempt {
    Written {
        moved: u32,
        parked: ParkedView,
        phases: BlackoutPhases,
        /// Threads of the OS listed and scanned, when the change needed them.
        threads: Option<u32>,
    },
    Busy(Busy),
}

/// Where the parked vCPUs were and what their stacks held: enough to decide, after the resume,
/// which quarantined arena code no vCPU can be running (nothing leads into quarantined code any
/// more, so a chunk idle at the blackout stays idle).
struct ParkedView {
    rips: Vec<u64>,
    stacks: Vec<Vec<u64>>,
    moved_to: Vec<u64>,
}

/// A vCPU to move when it resumes: (vCPU, from, to).
type Move = (usize, u64, u64);

/// One write made inside the blackout, with what was there before it.
struct Done<'a> {
    gpa: u64,
    before: &'a [u8],
}

impl<G: GuestControl> Engine<G> {
    /// Pauses, checks, writes, resumes; retries while a vCPU is in the way.
    pub(crate) fn blackout(&mut self, change: &Change<'_>) -> Result<Committed, EngineError> {
        let mut why = None;
        let guest = self.guest.clone();
        for attempt in 1..=self.config.max_attempts.max(1) {
            let paused = Paused::pause(&*guest)?;
            let parked_at = Instant::now();
            // An early return (`?`) below resumes the guest as `paused` drops.
            match self.check_and_write(change, paused.vcpus())? {
                Attempt::Written {
                    moved,
                    parked,
                    phases,
                    threads,
                } => {
                    let engine = parked_at.elapsed();
                    // Everything is written: a resume failure now must not make the caller
                    // free arena code the new jumps point into.
                    let blackout = paused.resume().map_err(|e| EngineError::Stranded {
                        failed_at: "resuming the guest after the writes".into(),
                        detail: format!("every site was written; {e}"),
                    })?;
                    // Quarantined arena code no vCPU was running or returning into becomes
                    // free: decided on the parked state, done with the guest running. Unless
                    // the OS may have threads asleep in it (`hidden_threads`).
                    let keep = self.config.hidden_threads != crate::threads::HiddenThreads::None;
                    self.arena.sweep(|a, b| {
                        if keep {
                            return true;
                        }
                        let inside = |w: &u64| *w >= a && *w < b;
                        parked.rips.iter().any(inside)
                            || parked.stacks.iter().flatten().any(inside)
                            || parked.moved_to.iter().any(inside)
                    });
                    return Ok(Committed {
                        blackout,
                        engine,
                        phases,
                        attempts: attempt,
                        moved,
                        threads,
                    });
                }
                Attempt::Busy(b) => why = Some(b),
            }
            paused.resume()?;
            self.busy_retries += 1;
            // Back off a little more each time, with jitter, so the next pause does not catch
            // a looping vCPU at the same point of its loop.
            let jitter = u64::from(
                Instant::now().elapsed().subsec_nanos() ^ attempt.wrapping_mul(2_654_435_761),
            ) % 200;
            std::thread::sleep(Duration::from_micros(100 * u64::from(attempt) + jitter));
        }
        Err(EngineError::Busy {
            attempts: self.config.max_attempts,
            why: why.map(|b| b.to_string()).unwrap_or_default(),
        })
    }

    /// With every vCPU parked: checks the guest, finds whether a vCPU is in the way, and if
    /// none is, writes everything.
    fn check_and_write(
        &mut self,
        change: &Change<'_>,
        states: &[Option<VcpuState>],
    ) -> Result<Attempt, EngineError> {
        let started = Instant::now();
        let vcpus: Vec<&VcpuState> = states.iter().flatten().collect();
        let first = self
            .rewrites
            .code_view(vcpus.first().ok_or(EngineError::NoVcpu)?);
        self.recheck_guest(change, &first)?;
        let rechecked = started.elapsed();
        let mut moves: Vec<Move> = Vec::new();
        let mut stacks: Vec<Vec<u64>> = Vec::with_capacity(vcpus.len());
        // Every stack pointer a parked vCPU runs on or will go back to: the listed threads'
        // stacks are scanned from the lowest of them that is on each.
        let mut live_sps: Vec<u64> = Vec::new();
        // The arena sweep after the writes reads the parked stacks unless the OS keeps
        // reverted code anyway.
        let sweeps = self.config.hidden_threads == crate::threads::HiddenThreads::None;
        for v in &vcpus {
            if self.out_of_user_reach(change, v) {
                stacks.push(if sweeps {
                    self.stack_words(v).0
                } else {
                    Vec::new()
                });
                continue;
            }
            let (words, sps) = self.stack_words(v);
            match in_the_way(change, v, &words) {
                Ok(Some(to)) => moves.push((v.id, v.rip, to)),
                Ok(None) => {}
                Err(busy) => return Ok(Attempt::Busy(busy)),
            }
            stacks.push(words);
            live_sps.extend(sps);
        }
        let threads = match self.check_threads(change, &first, &live_sps, started)? {
            Threads::NotNeeded => None,
            Threads::Clear(n) => Some(n),
            Threads::Busy(busy) => return Ok(Attempt::Busy(busy)),
        };
        let elapsed = started.elapsed();
        // An attempt that walked the threads has their extra time.
        let cap = match threads {
            Some(_) => self.config.max_check + self.config.max_walk,
            None => self.config.max_check,
        };
        if elapsed > cap {
            return Ok(Attempt::Busy(Busy::Slow {
                elapsed_us: elapsed.as_micros() as u64,
                limit_us: cap.as_micros() as u64,
            }));
        }
        self.write_all(change, &moves)?;
        let written = started.elapsed();
        let ns = |d: Duration| d.as_nanos() as u64;
        Ok(Attempt::Written {
            phases: BlackoutPhases {
                recheck_ns: ns(rechecked),
                scan_ns: ns(elapsed.saturating_sub(rechecked)),
                write_ns: ns(written.saturating_sub(elapsed)),
                threads: threads.unwrap_or(0),
            },
            threads,
            moved: moves.len() as u32,
            parked: ParkedView {
                rips: vcpus.iter().map(|v| v.rip).collect(),
                stacks,
                moved_to: moves.iter().map(|&(_, _, to)| to).collect(),
            },
        })
    }

    /// The guest still holds what was planned: same page tables, the applied patches' bytes
    /// where they will be restored, the original bytes where jumps will go.
    fn recheck_guest(&mut self, change: &Change<'_>, first: &VcpuState) -> Result<(), EngineError> {
        // The translations were made with cached paging registers: re-check them, every page
        // of every site, if the guest switched page tables since. A site crossing a page is
        // re-checked whatever the registers: a guest that remapped one of its pages since
        // would otherwise get half a jump in a frame it no longer runs.
        let switched = self.paging != Some(first.paging);
        let crosses = |gva: u64, len: usize| (gva & 0xfff) + len as u64 > 0x1000;
        let sites = change
            .write
            .iter()
            .map(|p| {
                (
                    p.plan.analysis.jump_at,
                    p.plan.original.len(),
                    p.gpa,
                    &p.location,
                )
            })
            .chain(
                change
                    .restore
                    .iter()
                    .flat_map(|r| &r.sites)
                    .map(|s| (s.gva, s.patched.len(), s.gpa, &s.location)),
            );
        for (gva, len, gpa, site) in sites {
            if (switched || crosses(gva, len))
                && self.gpa_of(&first.paging, site, gva, len).ok() != Some(gpa)
            {
                self.paging = Some(first.paging);
                return Err(EngineError::Raced { site: site.clone() });
            }
        }
        self.paging = Some(first.paging);
        // The kernel's preemption mode may have been switched since planning (`threads`).
        let covers_boundaries = change
            .write
            .iter()
            .any(|p| p.plan.analysis.displaced.len() > 1);
        // With the threads listed, their scan sees a preempted task's RIP instead
        // (`check_threads`).
        if let Some(why) = (covers_boundaries && !self.threads_listed())
            .then(|| self.preempts_anywhere(&first.paging))
            .flatten()
        {
            for p in change.write {
                crate::plan::check_hidden_threads(&p.plan.analysis, Some(&why))?;
            }
        }
        // One scratch buffer for every compare: this runs with the guest parked.
        let mut cur = Vec::with_capacity(64);
        for r in change.restore {
            for s in &r.sites {
                cur.resize(s.patched.len(), 0);
                self.guest.read_phys(s.gpa, &mut cur)?;
                if cur != s.patched {
                    return Err(EngineError::Tampered {
                        id: r.id.clone(),
                        site: s.location.clone(),
                    });
                }
            }
        }
        for p in change.write {
            cur.resize(p.plan.original.len(), 0);
            self.guest.read_phys(p.gpa, &mut cur)?;
            if !change.restore.is_empty() {
                overlay_originals(
                    &mut cur,
                    p.plan.analysis.jump_at,
                    change.restore.iter().flat_map(|r| &r.sites),
                );
            }
            if cur != p.plan.original {
                return Err(EngineError::Raced {
                    site: p.location.clone(),
                });
            }
        }
        Ok(())
    }

    /// Writes every site (restores first, then jumps) and moves vCPUs; on any failure puts back
    /// everything already done before returning.
    fn write_all(&self, change: &Change<'_>, moves: &[Move]) -> Result<(), EngineError> {
        let writes = change
            .restore
            .iter()
            .flat_map(|r| &r.sites)
            .map(|s| (s.gpa, &s.original[..], &s.patched[..], s.location.as_str()))
            .chain(change.write.iter().map(|p| {
                (
                    p.gpa,
                    &p.plan.jump[..],
                    &p.plan.original[..],
                    p.location.as_str(),
                )
            }));
        let mut done: Vec<Done<'_>> = Vec::new();
        for (gpa, bytes, before, site) in writes {
            if let Err(e) = self.guest.write_phys(gpa, bytes) {
                self.undo(&done, &[], site)?;
                return Err(e.into());
            }
            done.push(Done { gpa, before });
        }
        for (i, &(id, from, to)) in moves.iter().enumerate() {
            if let Err(e) = self.guest.set_rip(id, to) {
                self.undo(&done, &moves[..i], &format!("moving vCPU {id}"))?;
                return Err(e.into());
            }
            info!(
                vcpu = id,
                from = format_args!("{from:#x}"),
                to = format_args!("{to:#x}"),
                "moved a parked vCPU out of displaced bytes"
            );
        }
        Ok(())
    }

    /// Puts back `done` writes (newest first) and `moved` vCPUs. Failing that, the guest holds
    /// part of a change: [`EngineError::Stranded`].
    fn undo(&self, done: &[Done<'_>], moved: &[Move], failed_at: &str) -> Result<(), EngineError> {
        let mut stranded = Vec::new();
        for &(id, from, _) in moved.iter().rev() {
            if let Err(e) = self.guest.set_rip(id, from) {
                stranded.push(format!(
                    "vCPU {id} could not be moved back to {from:#x}: {e}"
                ));
            }
        }
        for d in done.iter().rev() {
            if let Err(e) = self.guest.write_phys(d.gpa, d.before) {
                stranded.push(format!("{:#x}: {e}", d.gpa));
            }
        }
        if stranded.is_empty() {
            return Ok(());
        }
        error!(failed_at, detail = %stranded.join("; "), "a blackout write failed and could not be undone");
        Err(EngineError::Stranded {
            failed_at: failed_at.to_string(),
            detail: stranded.join("; "),
        })
    }

    /// Whether `v` runs in user mode (CPL 3) in an address space where every range `change`
    /// touches is supervisor-only or not mapped. Such a vCPU is not running those bytes, and
    /// comes back into them only through the kernel's entry points, which switch to a kernel
    /// stack: nothing on the stack it has now is a return into them. That stack is the user
    /// process's to write, so it is not read: a local user filling it with kernel addresses
    /// would otherwise hold every hot patch back. Decided by walking the vCPU's own page
    /// tables, not by what the OS is: code a guest runs in user mode (the test guest's
    /// workload, a kernel running in ring 3) is on user pages and keeps the checks. A walk
    /// that fails for another reason than a missing entry keeps them too.
    fn out_of_user_reach(&self, change: &Change<'_>, v: &VcpuState) -> bool {
        if v.cpl != 3 {
            return false;
        }
        let supervisor_only = |(start, end): (u64, u64)| {
            let mut page = start & !0xfff;
            while page < end {
                let step = match self.guest.translate(v, page) {
                    Ok(t) if !t.user && t.page_size.is_power_of_two() => t.page_size.max(0x1000),
                    Err(guest_control::GuestError::Walk(
                        guest_control::paging::WalkError::NotPresent { .. },
                    )) => 0x1000,
                    _ => return false,
                };
                match (page & !(step - 1)).checked_add(step) {
                    Some(next) => page = next,
                    None => return true,
                }
            }
            true
        };
        interiors(change)
            .map(|(a, b, _)| (a, b))
            .chain(change.quiesce.iter().map(|(a, b, _)| (*a, *b)))
            .all(supervisor_only)
    }

    /// Up to `config.stack_scan` bytes (never more than [`MAX_STACK_SCAN`]) from the top of a
    /// parked vCPU's stack, as words: the return addresses (and interrupted contexts) it may
    /// come back to; with the stack pointers they were read from (its RSP first). RSP is
    /// guest-controlled: all arithmetic is checked, and the scan ends at the top of the
    /// address space or the first unmapped page.
    pub(crate) fn stack_words(&self, v: &VcpuState) -> (Vec<u64>, Vec<u64>) {
        let mut words = Vec::with_capacity(self.config.stack_scan.min(MAX_STACK_SCAN) / 8);
        let mut sps = vec![v.rsp];
        self.scan_stack(v, v.rsp, &mut words);
        // The stacks of the contexts the vCPU interrupted, if the OS layer knows they are others.
        let read = |gva: u64, len: usize| self.guest.read_virtual(v, gva, len).ok();
        let others = self
            .rewrites
            .interrupted_stacks(v, crate::rewrites::GuestMemory(&read));
        for rsp in others
            .into_iter()
            .take(crate::rewrites::MAX_INTERRUPTED_STACKS)
        {
            self.scan_stack(v, rsp, &mut words);
            sps.push(rsp);
        }
        (words, sps)
    }

    /// Appends the `stack_scan` bytes above `rsp` to `words`, as far as they are mapped and
    /// below the registers user mode left there, if the OS layer finds them.
    fn scan_stack(&self, v: &VcpuState, rsp: u64, words: &mut Vec<u64>) {
        let scan = self.config.stack_scan.min(MAX_STACK_SCAN);
        let from = rsp & !7;
        // One set of translations for the frame's read and the scan: the frame is at the top
        // of the stack the scan reads.
        let pages = Pages::new(&*self.guest, v);
        let read = |gva: u64, len: usize| pages.read(gva, len);
        let mut end = u128::from(from) + scan as u128;
        if let Some(frame) = self
            .rewrites
            .user_frame_at(v, rsp, crate::rewrites::GuestMemory(&read))
            .filter(|&f| f >= from)
        {
            end = end.min(u128::from(frame));
        }
        pages.words(from, end, words);
    }

    /// Whether the OS's threads can be listed in a blackout that needs them.
    pub(crate) fn threads_listed(&self) -> bool {
        self.config.list_threads != crate::threads::ThreadListing::Off
            && self.rewrites.lists_threads()
    }

    /// The OS's threads off the vCPUs, when they are listed: each one's stack is scanned
    /// against the ranges about to change, as a vCPU's is. When the list cannot be read, a
    /// change that relies on it (a multi-function patch, or jumps over several instructions
    /// in a kernel that preempts anywhere) waits like one a vCPU is in the way of; any other
    /// goes ahead on the vCPUs' checks, which are all it ever needed.
    fn check_threads(
        &self,
        change: &Change<'_>,
        first: &VcpuState,
        live_sps: &[u64],
        started: Instant,
    ) -> Result<Threads, EngineError> {
        // A thread resumes at an instruction boundary: after a call (which rule 7 keeps last
        // in the displaced bytes) or, preempted, anywhere. Inside a single displaced
        // instruction there is no boundary but its start, so only a change with a jump over
        // several, or code that must be quiescent, needs the list.
        if !self.threads_listed() {
            return Ok(Threads::NotNeeded);
        }
        let several = change
            .write
            .iter()
            .any(|p| p.plan.analysis.displaced.len() > 1);
        // Read from the guest at most once, and only if asked.
        let preempts = std::cell::OnceCell::new();
        let preempting = || {
            preempts
                .get_or_init(|| {
                    several
                        .then(|| self.preempts_anywhere(&first.paging))
                        .flatten()
                })
                .clone()
        };
        let needed = !change.quiesce.is_empty()
            || (several
                && (self.config.list_threads == crate::threads::ThreadListing::Thorough
                    || preempting().is_some()));
        if !needed {
            return Ok(Threads::NotNeeded);
        }
        let cap = self.config.max_check + self.config.max_walk;
        let pages = Pages::new(&*self.guest, first);
        // The list is the guest's and may be long or forged: past the time cap every read
        // fails, which ends the walk, and the attempt counts as slow.
        let reads = std::cell::Cell::new(0u32);
        let late = std::cell::Cell::new(false);
        let read = |gva: u64, len: usize| {
            reads.set(reads.get().wrapping_add(1));
            if late.get() || (reads.get().is_multiple_of(256) && started.elapsed() > cap) {
                late.set(true);
                return None;
            }
            pages.read(gva, len)
        };
        let slow = || {
            Threads::Busy(Busy::Slow {
                elapsed_us: started.elapsed().as_micros() as u64,
                limit_us: cap.as_micros() as u64,
            })
        };
        let listed = match self.rewrites.threads(crate::rewrites::GuestMemory(&read)) {
            Ok(_) | Err(_) if late.get() => return Ok(slow()),
            Ok(listed) => listed,
            Err(why) => {
                let needs = if !change.quiesce.is_empty() {
                    Some("the change switches several functions at once, which must wait for every task asleep in one of them".to_string())
                } else {
                    preempting().map(|p| format!("{p}, so a jump over several instructions must know where every preempted task resumes"))
                };
                // A list caught mid-change (an exiting task's freed memory) may read on the
                // next attempt: retried like a vCPU in the way.
                return match needs {
                    Some(needs) => Ok(Threads::Busy(Busy::Unlisted { why, needs })),
                    None => {
                        tracing::warn!(%why, "the guest's threads could not be listed; this change does not need them");
                        Ok(Threads::NotNeeded)
                    }
                };
            }
        };
        // Most of a stack is data: one compare against the span of every range that matters
        // keeps the full check for the few words inside it.
        let span = change_span(change);
        let mut words = Vec::new();
        for (n, t) in listed.iter().enumerate() {
            // Guest-given lists can be long: the same time cap as the rest of the checks.
            if n % 64 == 63 && started.elapsed() > cap {
                return Ok(slow());
            }
            let Some((from, to)) = t.scan_range(live_sps) else {
                continue;
            };
            words.clear();
            pages.words(from, u128::from(to), &mut words);
            if !words.iter().any(|&w| w > span.0 && w < span.1) {
                continue;
            }
            match word_in_the_way(change, &words) {
                Some(Hit::Interior { word, site }) => {
                    return Ok(Threads::Busy(Busy::ThreadResumesInside {
                        thread: t.name.clone(),
                        word,
                        site: site.to_string(),
                    }));
                }
                Some(Hit::Quiescent { word, code }) => {
                    return Ok(Threads::Busy(Busy::ThreadInside {
                        thread: t.name.clone(),
                        word,
                        code: code.to_string(),
                    }));
                }
                None => {}
            }
        }
        Ok(Threads::Clear(listed.len() as u32))
    }
}

/// Guest memory read through one vCPU's page tables with each page's translation kept: the
/// guest is parked, so its tables cannot change before it resumes, and the thread walk reads
/// many words from few pages (task structures in the kernel's direct map, 16 KiB stacks).
/// The vCPU stack scans read through it too, one stack at a time.
struct Pages<'a, G: GuestControl + ?Sized> {
    guest: &'a G,
    vcpu: &'a VcpuState,
    /// (first guest-virtual address, log2 of the size, guest-physical address) of each page
    /// translated, searched newest first: the walk reads mostly where it read last, and a
    /// hash of every lookup costs more than the search.
    known: std::cell::RefCell<Vec<(u64, u32, u64)>>,
}

impl<'a, G: GuestControl + ?Sized> Pages<'a, G> {
    fn new(guest: &'a G, vcpu: &'a VcpuState) -> Self {
        Pages {
            guest,
            vcpu,
            known: Default::default(),
        }
    }

    fn gpa(&self, gva: u64) -> Option<u64> {
        if let Some(gpa) = self
            .known
            .borrow()
            .iter()
            .rev()
            .find(|&&(start, shift, _)| gva >> shift == start >> shift)
            .map(|&(start, _, gpa)| gpa.wrapping_add(gva - start))
        {
            return Some(gpa);
        }
        let t = self.guest.translate(self.vcpu, gva).ok()?;
        if let Some(shift) = [12u32, 21, 30]
            .into_iter()
            .find(|&sh| t.page_size == 1u64 << sh)
        {
            let offset = gva & ((1u64 << shift) - 1);
            self.known
                .borrow_mut()
                .push((gva - offset, shift, t.gpa.wrapping_sub(offset)));
        }
        Some(t.gpa)
    }

    /// `len` bytes at `gva`, or `None` if any of them is unmapped or unreadable.
    fn read(&self, gva: u64, len: usize) -> Option<Vec<u8>> {
        let mut out = vec![0u8; len];
        let mut done = 0usize;
        while done < len {
            let at = gva.checked_add(done as u64)?;
            let n = (0x1000 - (at & 0xfff) as usize).min(len - done);
            self.guest
                .read_phys(self.gpa(at)?, &mut out[done..done + n])
                .ok()?;
            done += n;
        }
        Some(out)
    }

    /// Appends the words of `[from, end)` to `words`, up to the first unmapped page. In 128
    /// bits the top of the address space is an ordinary bound: nothing can wrap.
    fn words(&self, from: u64, end: u128, words: &mut Vec<u64>) {
        const TOP: u128 = 1 << 64;
        let mut at = u128::from(from);
        let end = end.min(TOP);
        let mut page = [0u8; 4096];
        while at < end {
            let page_end = ((at | 0xfff) + 1).min(end);
            // `at` < 2^64 inside the loop, so these conversions are exact.
            let Some(gpa) = self.gpa(at as u64) else {
                break;
            };
            let buf = &mut page[..(page_end - at) as usize];
            if self.guest.read_phys(gpa, buf).is_err() {
                break;
            }
            words.extend(buf.chunks_exact(8).map(|c| {
                let mut w = [0u8; 8];
                w.copy_from_slice(c);
                u64::from_le_bytes(w)
            }));
            at = page_end;
        }
    }
}

/// What the scan of the OS's listed threads found.
enum Threads {
    /// Not listed: the backend does not, or the change cannot be in a thread's way.
    NotNeeded,
    /// None in the way; this many scanned.
    Clear(u32),
    Busy(Busy),
}

/// A stack word in the way of a change.
enum Hit<'c> {
    /// Inside the interior of a range about to change: a return or resume would land in the
    /// middle of new bytes.
    Interior { word: u64, site: &'c str },
    /// Inside code that must be quiescent.
    Quiescent { word: u64, code: &'c str },
}

/// `(lo, hi)` such that every word [`word_in_the_way`] can object to lies strictly between
/// them: the span of the interiors and of the code that must be quiescent.
fn change_span(change: &Change<'_>) -> (u64, u64) {
    interiors(change)
        .map(|(a, b, _)| (a, b))
        .chain(change.quiesce.iter().map(|(a, b, _)| (*a, *b)))
        .fold((u64::MAX, 0), |(lo, hi), (a, b)| {
            (lo.min(a.saturating_sub(1)), hi.max(b))
        })
}

/// Every range about to change, `[start, end)` with its site's name: the jumps' displaced
/// bytes and the patched sites being restored. A word strictly inside one would resume in the
/// middle of new bytes.
fn interiors<'c>(change: &'c Change<'_>) -> impl Iterator<Item = (u64, u64, &'c str)> {
    change
        .write
        .iter()
        .map(|p| {
            let (a, b) = p.plan.analysis.range();
            (a, b, p.location.as_str())
        })
        .chain(change.restore.iter().flat_map(|r| {
            r.sites.iter().map(|s| {
                let (a, b) = site_range(s);
                (a, b, s.location.as_str())
            })
        }))
}

/// The first word of `words` in the way of `change`, interiors first.
fn word_in_the_way<'c>(change: &'c Change<'_>, words: &[u64]) -> Option<Hit<'c>> {
    for (a, b, site) in interiors(change) {
        if let Some(&word) = words.iter().find(|&&w| w > a && w < b) {
            return Some(Hit::Interior { word, site });
        }
    }
    words.iter().find_map(|&w| {
        change
            .quiesce_hit(w)
            .map(|code| Hit::Quiescent { word: w, code })
    })
}

/// Whether `v` is in the way of `change`: `Ok(Some(rip))` when it must be moved to `rip`,
/// `Ok(None)` when it may stay, `Err` when it blocks this attempt.
fn in_the_way(change: &Change<'_>, v: &VcpuState, words: &[u64]) -> Result<Option<u64>, Busy> {
    let hit = word_in_the_way(change, words);
    if let Some(Hit::Interior { word, site }) = hit {
        return Err(Busy::ReturnsInside {
            vcpu: v.id,
            word,
            site: site.to_string(),
        });
    }
    if let Some(name) = change.quiesce_hit(v.rip) {
        return Err(Busy::Running {
            vcpu: v.id,
            rip: v.rip,
            code: name.to_string(),
        });
    }
    if let Some(Hit::Quiescent { word, code }) = hit {
        return Err(Busy::WillReturnInto {
            vcpu: v.id,
            word,
            code: code.to_string(),
        });
    }
    let mut rip = v.rip;
    for p in change.write {
        rip = p
            .plan
            .relocate_rip(rip)
            .ok_or_else(|| Busy::MidInstruction {
                vcpu: v.id,
                rip: v.rip,
                site: p.location.clone(),
            })?;
    }
    for s in change.restore.iter().flat_map(|r| &r.sites) {
        let (a, b) = site_range(s);
        if rip > a && rip < b {
            return Err(Busy::InsideSite {
                vcpu: v.id,
                rip,
                site: s.location.clone(),
            });
        }
    }
    Ok((rip != v.rip).then_some(rip))
}
