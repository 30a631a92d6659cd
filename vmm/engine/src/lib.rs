//! The patch engine: verifies a signed patch, plans every site, and applies, reverts or
//! replaces patches on a running guest in one blackout each.
//!
//! Written only against [`GuestControl`], so any hypervisor backend can drive it. The path of
//! a patch (ARCHITECTURE §1): parse + signature → target identity → resolve sites → plan (pure,
//! [`plan`]) → arena code written while the guest runs → pause → check every vCPU → write the
//! jumps → resume → journal.

mod apply;
pub mod arena;
mod blackout;
pub mod journal;
pub mod keys;
pub mod ledger;
pub mod plan;
pub mod rewrites;
pub mod shared;
pub mod target;
pub mod threads;
mod vouch;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use patch_format::{ParsedPatch, PublicKey, SignatureBlock};
use serde::Serialize;
use sha2::Digest;
use thiserror::Error;
use tracing::{debug, warn};

use arena::{Arena, ArenaWindow, Chunk};
use guest_control::paging::PagingRegs;
use guest_control::stats::{History, Summary};
use guest_control::{GuestControl, GuestError, VcpuState};
use journal::{Journal, JournalError, PatchRecord, PatchState, SiteRecord};
use plan::PlanError;
use target::{Target, TargetError};

pub use blackout::{BlackoutPhases, Busy, MAX_CHECK_TIME, MAX_STACK_SCAN};

/// Why a patch was not applied or reverted. The guest is unchanged whenever one is returned.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("malformed patch; check it with `vmm patch verify`")]
    Malformed(#[from] patch_format::ParseError),
    #[error(
        "the patch is unsigned; this VMM accepts only patches signed by a trusted key (start it with --trusted-key, or --allow-unsigned for development)"
    )]
    Unsigned,
    #[error("signature refused: {0}")]
    Signature(patch_format::VerifyError),
    #[error("cannot read the guest image's symbols for patching")]
    Image(#[from] patch_format::ElfError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(
        "site {site}: overlaps {other} (applied patch {patch}); stack patches by replacing the older one (list it in `replaces`)"
    )]
    Overlap {
        site: String,
        other: String,
        patch: String,
    },
    #[error("site {site} overlaps site {other} of the same patch")]
    SelfOverlap { site: String, other: String },
    #[error("site {site}: a relocation of its code cannot be resolved in this guest")]
    Reloc {
        site: String,
        #[source]
        source: patch_format::RelocError,
    },
    #[error(
        "site {site}: guest-virtual {gva:#x} is not mapped in the guest ({reason}); is the guest running the image the patch targets?"
    )]
    Unmapped {
        site: String,
        gva: u64,
        reason: String,
    },
    #[error(
        "site {site}: {len} bytes at {gva:#x} cross onto a physically discontiguous page; choose another site"
    )]
    Discontiguous { site: String, gva: u64, len: usize },
    #[error(
        "the patch arena is full ({needed} bytes needed, {free} free, {quarantined} held by reverted or replaced patches until no vCPU can be using them, or until the guest restarts where its OS may sleep in them); revert patches you no longer need"
    )]
    ArenaFull {
        needed: u64,
        free: u64,
        quarantined: u64,
    },
    #[error(
        "busy: after {attempts} attempts a vCPU or a guest thread was still where the patch cannot be written safely ({why}); the guest is unchanged, try again"
    )]
    Busy { attempts: u32, why: String },
    #[error(
        "the guest changed the patched code while the patch was being prepared ({site}); nothing was written, try again"
    )]
    Raced { site: String },
    #[error("no patch {0} (see `vmm patch list`)")]
    NoSuchPatch(String),
    #[error("patch id prefix {0} matches several patches; give more digits")]
    AmbiguousId(String),
    #[error("patch {id} is {state}, not applied")]
    NotApplied { id: String, state: String },
    #[error(
        "patch {id}: site {site} no longer holds the patch's bytes (the guest rewrote it); refusing to revert over unknown code"
    )]
    Tampered { id: String, site: String },
    #[error(
        "site {site}: {gva:#x} is not inside a function of the target's code (only sized function symbols of the image are patchable, never data, page tables or free memory); the patch was built for other code"
    )]
    NotInCode { site: String, gva: u64 },
    #[error(
        "site {site}: {gva:#x}..{end:#x} lies in the patch arena, which only the engine writes; patch the guest's own code"
    )]
    InArena { site: String, gva: u64, end: u64 },
    #[error(
        "patch {id} cannot be reverted or replaced by this VMM: {why}. Nothing was written; its sites still hold the patch. Apply its signed file again (the VMM then adopts it and can revert it), or restart the guest to remove the patch"
    )]
    Unvouched { id: String, why: String },
    #[error(
        "another apply or revert finished while this patch was being planned; nothing was written, try again"
    )]
    Stale,
    #[error(transparent)]
    LedgerFull(ledger::LedgerFull),
    #[error(
        "the patch's read-only data cannot be placed in the arena: {reason} (this is a bug; please report it)"
    )]
    DataPlacement { reason: String },
    #[error("the guest has no running vCPU")]
    NoVcpu,
    #[error(
        "a write inside the blackout failed at {failed_at} and undoing it failed too ({detail}); the guest may hold part of the change: its arena code is kept, check `vmm patch list` and the VMM log before patching again"
    )]
    Stranded { failed_at: String, detail: String },
    #[error("the VM is paused by the operator; resume it first (`vmm resume`)")]
    OperatorPaused,
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

/// Checks patch files (parse, then signature) with the engine's trusted keys; needs no access to
/// the engine, so it can run outside the engine's lock. See [`Engine::verifier`].
#[derive(Debug, Clone)]
pub struct Verifier {
    trusted_keys: Vec<PublicKey>,
    allow_unsigned: bool,
}

/// A patch file that parsed and whose signature [`Verifier::check`] accepted.
pub struct CheckedPatch {
    parsed: ParsedPatch,
    /// The signed file as it came: kept beside the journal, it is what vouches for the bytes a
    /// later run may write back (docs/patch-engine.md, "Who vouches for every byte").
    file: Vec<u8>,
    /// When checking began: the apply's `total_us` counts from here.
    started: Instant,
}

impl Verifier {
    /// Parses `file` and checks its signature: `Malformed`, `Unsigned` or `Signature` if not.
    pub fn check(&self, file: &[u8]) -> Result<CheckedPatch, EngineError> {
        let started = Instant::now();
        let parsed = patch_format::parse(file)?;
        match (&parsed.signature, self.allow_unsigned) {
            (SignatureBlock::Unsigned, true) => {
                warn!(patch = %parsed.id, "accepting an unsigned patch (--allow-unsigned)");
            }
            (SignatureBlock::Unsigned, false) => return Err(EngineError::Unsigned),
            _ => {
                parsed
                    .verify(&self.trusted_keys)
                    .map_err(EngineError::Signature)?;
            }
        }
        Ok(CheckedPatch {
            parsed,
            file: file.to_vec(),
            started,
        })
    }
}

/// How the engine is allowed to behave.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub trusted_keys: Vec<PublicKey>,
    /// Development only: accept unsigned patches.
    pub allow_unsigned: bool,
    /// Blackouts tried before "busy".
    pub max_attempts: u32,
    /// Bytes above each vCPU's RSP scanned for return addresses into ranges being changed
    /// (never more than [`MAX_STACK_SCAN`]).
    pub stack_scan: usize,
    /// Longest the checks of one blackout attempt may keep the guest parked before the attempt
    /// gives up, writes nothing and counts as busy (default [`MAX_CHECK_TIME`]).
    pub max_check: std::time::Duration,
    /// Always the 14-byte absolute jump (`jmp [rip]`), even where `jmp rel32` reaches the arena:
    /// what a far arena costs, measured on a near one (`vmm bench call`). Off by default.
    pub far_jumps: bool,
    /// The threads the guest's scheduler keeps where no vCPU runs them ([`threads`]). With
    /// any, the arena code and data of reverted or replaced patches are never reused in this
    /// run: the engine frees them once no parked vCPU runs or returns into them, which is all
    /// it can see, but a Linux task blocked on a mutex inside a replaced function would wake
    /// into other code. The Linux layer sets it; the arena (2 MiB there) then holds them until
    /// the guest restarts. None by default.
    pub hidden_threads: threads::HiddenThreads,
    /// When to ask the OS layer for its threads in a blackout and scan their stacks
    /// ([`threads::ThreadListing`]): what makes a multi-function patch wait for a task asleep
    /// in one of its old functions, and lets a jump displace several instructions in a kernel
    /// that preempts anywhere (a preempted task's RIP is on its stack). Off by default.
    pub list_threads: threads::ThreadListing,
    /// How much longer than `max_check` an attempt that lists the threads may keep the guest
    /// parked (default [`MAX_CHECK_TIME`]): a backend whose memory reads are slow (QEMU's
    /// gdbstub) sets more.
    pub max_walk: std::time::Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            trusted_keys: Vec::new(),
            allow_unsigned: false,
            max_attempts: 50,
            stack_scan: 1024,
            max_check: MAX_CHECK_TIME,
            far_jumps: false,
            hidden_threads: threads::HiddenThreads::None,
            list_threads: threads::ThreadListing::Off,
            max_walk: MAX_CHECK_TIME,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Serialize)]
pub struct ApplyOutcome {
    pub patch: PatchRecord,
    /// The same patch was already applied: nothing was done.
    pub already_applied: bool,
    /// Patches this one replaced in the same blackout.
    pub replaced: Vec<String>,
    /// Blackouts tried (1 unless vCPUs were in the way).
    pub attempts: u32,
    /// Time from request to resume, microseconds (parse, plan, write, blackout).
    pub total_us: u64,
}

/// Counters and latency summaries for the metrics endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct EngineMetrics {
    pub applied: usize,
    pub applies: u64,
    pub reverts: u64,
    pub refused: u64,
    pub busy_retries: u64,
    pub moved_vcpus: u64,
    pub apply_blackout_us: Summary,
    pub revert_blackout_us: Summary,
    /// Of those blackouts, the engine's own work with every vCPU parked (checks, writes,
    /// vCPU moves): what is left once the hypervisor's pause/resume floor is taken away.
    pub apply_engine_us: Summary,
    pub revert_engine_us: Summary,
    /// The applies' engine work by phase (ns): where the in-blackout time goes on this host.
    pub apply_phases_ns: PhaseSummaries,
    pub apply_total_us: Summary,
    pub arena_free_bytes: u64,
    pub arena_quarantined_bytes: u64,
}

/// Summaries of [`BlackoutPhases`] over the applies kept.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseSummaries {
    pub recheck_ns: Summary,
    pub scan_ns: Summary,
    pub write_ns: Summary,
}

/// Histories of the three phases, pushed together.
struct PhaseHistory([History; 3]);

impl PhaseHistory {
    fn new(capacity: usize) -> Self {
        PhaseHistory(std::array::from_fn(|_| History::new(capacity)))
    }
    fn push(&mut self, p: BlackoutPhases) {
        self.0[0].push(p.recheck_ns);
        self.0[1].push(p.scan_ns);
        self.0[2].push(p.write_ns);
    }
    fn summaries(&self) -> PhaseSummaries {
        PhaseSummaries {
            recheck_ns: self.0[0].summary(),
            scan_ns: self.0[1].summary(),
            write_ns: self.0[2].summary(),
        }
    }
}

/// Arena code of an applied patch that replaces several functions: after a revert its new
/// functions would call the old ones, so no vCPU may be inside them.
fn quiesce_arena(r: &PatchRecord, window: &ArenaWindow) -> Vec<(u64, u64, String)> {
    if r.function_sites < 2 {
        return Vec::new();
    }
    r.arena
        .iter()
        .map(|a| {
            let gva = window.gva.wrapping_add(a.gpa.wrapping_sub(window.gpa));
            (
                gva,
                gva.saturating_add(a.len),
                format!("new code of patch {}", &r.id[..16.min(r.id.len())]),
            )
        })
        .collect()
}

/// The engine. One per guest; callers serialise access (the API holds it in a mutex).
pub struct Engine<G: GuestControl> {
    guest: Arc<G>,
    target: Target,
    config: EngineConfig,
    arena: Arena,
    journal: Option<Journal>,
    /// Every patch seen, in order (mirrors the journal when there is one).
    records: Vec<PatchRecord>,
    paging: Option<PagingRegs>,
    /// The OS's own rewrites of its text that rule 1 accepts (none by default).
    rewrites: Box<dyn rewrites::TextRewrites>,
    /// Applied patches recorded by an earlier run whose bytes no signed patch vouches for
    /// (`crate::vouch`), with why: never reverted or replaced by writing the record's bytes.
    unvouched: std::collections::HashMap<String, String>,
    /// Counts changes of the engine's state (every record put): a plan made at another
    /// generation is stale.
    generation: u64,
    /// Where the arena's ledger is, the sequence number of the last one written or read, and
    /// who this engine is in it (a hash of its state dir).
    ledger: ledger::Layout,
    ledger_seq: u64,
    owner: [u8; 16],
    apply_blackouts: History,
    revert_blackouts: History,
    apply_engine: History,
    revert_engine: History,
    /// The engine's share of the last committed blackout (µs).
    last_engine_us: Option<u64>,
    last_phases: Option<BlackoutPhases>,
    apply_phases: PhaseHistory,
    apply_totals: History,
    applies: u64,
    reverts: u64,
    refused: u64,
    busy_retries: u64,
    moved: u64,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn ranges_overlap(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn site_range(s: &SiteRecord) -> (u64, u64) {
    (s.gva, s.gva + s.original.len() as u64)
}

/// Puts the original bytes of `sites` back into `bytes`, the guest's bytes at `gva`: what the
/// guest holds there once those patches are taken out.
fn overlay_originals<'a>(bytes: &mut [u8], gva: u64, sites: impl Iterator<Item = &'a SiteRecord>) {
    let end = gva + bytes.len() as u64;
    for s in sites {
        for (i, byte) in s.original.iter().enumerate() {
            let at = s.gva + i as u64;
            if at >= gva && at < end {
                bytes[(at - gva) as usize] = *byte;
            }
        }
    }
}

/// A vCPU state that only carries `paging`: what a translation through it needs.
fn through(paging: &PagingRegs) -> VcpuState {
    VcpuState {
        id: 0,
        rip: 0,
        rsp: 0,
        cpl: 0,
        paging: *paging,
    }
}

impl<G: GuestControl> Engine<G> {
    /// An engine for `guest`, with the patch arena at `window`. With `state_dir`, patch states
    /// are journaled there and the journal left by an earlier run is reconciled with what the
    /// guest actually holds (see [`Engine::recover`]).
    /// An engine for a guest booted from the ELF `image` (symbols and identity from it, no
    /// slide), with the arena at `window`: how every backend patches the built-in test guest.
    pub fn for_elf_image(
        guest: Arc<G>,
        image_name: &str,
        image: &[u8],
        window: ArenaWindow,
        config: EngineConfig,
        state_dir: Option<&Path>,
    ) -> Result<Engine<G>, EngineError> {
        let info = patch_format::read_image(image_name, image)?;
        Engine::new(
            guest,
            Target::new(info, 0),
            window,
            config,
            state_dir,
            Box::new(rewrites::NoRewrites),
        )
    }

    /// An engine over `target` running in `guest`. `rewrites` is the OS's policy for its own
    /// text rewrites (rule 1); it is needed from the start, because recovery checks a journal
    /// record against the signed patch with it.
    pub fn new(
        guest: Arc<G>,
        target: Target,
        window: ArenaWindow,
        config: EngineConfig,
        state_dir: Option<&Path>,
        rewrites: Box<dyn rewrites::TextRewrites>,
    ) -> Result<Engine<G>, EngineError> {
        let (journal, records) = match state_dir {
            Some(dir) => {
                let (j, recovery) = Journal::open(dir)?;
                if recovery.torn_tail {
                    warn!(journal = %j.path().display(), "dropped a torn last journal record (a crash while writing it)");
                }
                let records = j.records().to_vec();
                (Some(j), records)
            }
            None => (None, Vec::new()),
        };
        let ledger = ledger::Layout::for_arena(window.size);
        let mut arena = Arena::new(window);
        arena.reserve(ledger.chunk());
        let mut owner = [0u8; 16];
        if let Some(dir) = state_dir {
            let abs = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
            let h = sha2::Sha256::digest(abs.as_os_str().as_encoded_bytes());
            owner.copy_from_slice(&h[..16]);
        }
        let mut engine = Engine {
            guest,
            target,
            config,
            arena,
            journal,
            records,
            paging: None,
            rewrites,
            unvouched: Default::default(),
            generation: 0,
            ledger,
            ledger_seq: 0,
            owner,
            apply_blackouts: History::new(4096),
            revert_blackouts: History::new(4096),
            apply_engine: History::new(4096),
            revert_engine: History::new(4096),
            last_engine_us: None,
            last_phases: None,
            apply_phases: PhaseHistory::new(4096),
            apply_totals: History::new(4096),
            applies: 0,
            reverts: 0,
            refused: 0,
            busy_retries: 0,
            moved: 0,
        };
        engine.recover()?;
        engine.attach_ledger()?;
        Ok(engine)
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn records(&self) -> &[PatchRecord] {
        &self.records
    }

    pub fn arena(&self) -> &Arena {
        &self.arena
    }

    pub fn metrics(&self) -> EngineMetrics {
        EngineMetrics {
            applied: self
                .records
                .iter()
                .filter(|r| r.state == PatchState::Applied)
                .count(),
            applies: self.applies,
            reverts: self.reverts,
            refused: self.refused,
            busy_retries: self.busy_retries,
            moved_vcpus: self.moved,
            apply_blackout_us: self.apply_blackouts.summary(),
            revert_blackout_us: self.revert_blackouts.summary(),
            apply_engine_us: self.apply_engine.summary(),
            revert_engine_us: self.revert_engine.summary(),
            apply_phases_ns: self.apply_phases.summaries(),
            apply_total_us: self.apply_totals.summary(),
            arena_free_bytes: self.arena.free_bytes(),
            arena_quarantined_bytes: self.arena.quarantined_bytes(),
        }
    }

    /// Of the last apply's or revert's blackout, the engine's own work with every vCPU parked
    /// (µs): the benchmark's `engine_us`.
    pub fn last_engine_us(&self) -> Option<u64> {
        self.last_engine_us
    }

    /// The same work by phase, in nanoseconds.
    pub fn last_phases(&self) -> Option<BlackoutPhases> {
        self.last_phases
    }

    /// Finds a patch by id or unique id prefix (at least 4 hex digits).
    pub fn find(&self, id: &str) -> Result<&PatchRecord, EngineError> {
        let id = id.trim().to_ascii_lowercase();
        if id.len() < 4 {
            return Err(EngineError::NoSuchPatch(id));
        }
        let mut m = self.records.iter().filter(|r| r.id.starts_with(&id));
        match (m.next(), m.next()) {
            (Some(r), None) => Ok(r),
            (Some(_), Some(_)) => Err(EngineError::AmbiguousId(id)),
            (None, _) => Err(EngineError::NoSuchPatch(id)),
        }
    }

    fn put(&mut self, rec: PatchRecord) -> Result<(), EngineError> {
        self.generation += 1;
        if let Some(j) = &mut self.journal {
            j.put(rec.clone())?;
            // Out of the guest for good: nothing of it will be written back, so its signed
            // file need not be kept.
            if matches!(rec.state, PatchState::Reverted | PatchState::Failed) {
                j.drop_patch(&rec.id);
            }
        }
        if rec.state != PatchState::Applied {
            self.unvouched.remove(&rec.id);
        }
        match self.records.iter_mut().find(|r| r.id == rec.id) {
            Some(r) => *r = rec,
            None => self.records.push(rec),
        }
        Ok(())
    }

    fn read(&self, gpa: u64, len: usize) -> Result<Vec<u8>, EngineError> {
        let mut b = vec![0u8; len];
        self.guest.read_phys(gpa, &mut b)?;
        Ok(b)
    }

    /// Reconciles the journal with the guest: a patch recorded as applied whose bytes are not
    /// in the guest (a restarted guest) is marked reverted; an apply or revert cut short by a
    /// crash is undone so no site is left half-written. Nothing is written unless the signed
    /// patch kept beside the journal vouches for the record (`crate::vouch`), and then only
    /// where the guest holds exactly the jump this VMM wrote.
    pub fn recover(&mut self) -> Result<(), EngineError> {
        let mut restore: Vec<PatchRecord> = Vec::new();
        let mut updates: Vec<PatchRecord> = Vec::new();
        let ours = self.target.identity_tag();
        let records = self.records.clone();
        for r in &records {
            if !matches!(
                r.state,
                PatchState::Applied | PatchState::Applying | PatchState::Reverting
            ) {
                continue;
            }
            // Never act on a record made for another build: its addresses mean other code.
            if let Some(theirs) = r.target.as_deref()
                && theirs != ours
            {
                warn!(patch = %r.id, record_target = theirs, guest_target = %ours, "journal record is for another image build; the guest is not touched");
                let mut u = r.clone();
                u.state = PatchState::Failed;
                u.note = Some(format!(
                    "not recovered: recorded for build {theirs}, but the guest runs {ours}; the guest was not touched"
                ));
                updates.push(u);
                continue;
            }
            let (mut orig, mut patched) = (0usize, 0usize);
            for s in &r.sites {
                let cur = self.read(s.gpa, s.original.len())?;
                if cur == s.original {
                    orig += 1;
                } else if cur == s.patched {
                    patched += 1;
                }
            }
            let n = r.sites.len();
            let mut u = r.clone();
            if patched == n && n > 0 {
                u.state = PatchState::Applied;
                if r.state != PatchState::Applied {
                    u.note = Some(format!(
                        "recovered: a {} was interrupted; the guest holds the patched bytes at every site, so the patch is applied",
                        if r.state == PatchState::Applying {
                            "apply"
                        } else {
                            "revert"
                        }
                    ));
                }
                let mut ok = true;
                for a in &r.arena {
                    ok &= self.arena.reserve(Chunk {
                        offset: a.gpa.wrapping_sub(self.arena.window.gpa),
                        len: a.len,
                    });
                }
                if !ok {
                    warn!(patch = %r.id, "journal arena chunks overlap; arena accounting may be conservative");
                }
                // It stays applied either way; whether this VMM may take it out again depends
                // on whether anything trusted vouches for the bytes it would write back.
                if let Err(why) = self.vouch(r) {
                    warn!(patch = %r.id, why = %why, "an applied patch's record is not vouched for; it cannot be reverted by this VMM");
                    u.note = Some(format!("applied; this VMM will not revert it: {why}"));
                    self.unvouched.insert(r.id.clone(), why);
                }
            } else if orig == n {
                // Say what the guest's memory shows; why (an interrupted apply, a completed
                // revert, or a restarted guest) cannot be told from it.
                u.state = PatchState::Reverted;
                u.note = Some(match r.state {
                    PatchState::Applied => "the guest holds the original bytes at every site (the guest was restarted or the code reloaded); marked reverted".into(),
                    PatchState::Applying => "recovered: an apply was interrupted; the guest holds the original bytes at every site, so nothing is applied".into(),
                    _ => "recovered: a revert was interrupted; the guest holds the original bytes at every site, so the patch is reverted".into(),
                });
                u.reverted_at = Some(now_secs());
            } else {
                match self.vouch(r) {
                    Ok(()) => restore.push(r.clone()),
                    Err(why) => {
                        warn!(patch = %r.id, why = %why, "a half-written patch's record is not vouched for; the guest is not touched");
                        u.state = PatchState::Failed;
                        u.note = Some(format!(
                            "not recovered: a crash interrupted writing this patch's sites, and {why}; the guest was not touched ({patched} of {n} sites hold the recorded jump, {orig} the recorded original bytes): inspect them before patching this code, or restart the guest"
                        ));
                        updates.push(u);
                    }
                }
                continue;
            }
            if u != *r {
                updates.push(u);
            }
        }
        for u in updates {
            warn!(patch = %u.id, state = ?u.state, note = ?u.note, "journal reconciled with the guest");
            self.put(u)?;
        }
        // Code of patches reverted by an earlier run may still be executing in a guest that
        // kept running: it goes to quarantine, not straight back to the free list.
        // Each patch's chunks (code and data) as one group.
        let gpa0 = self.arena.window.gpa;
        let old: Vec<Vec<Chunk>> = self
            .records
            .iter()
            .filter(|r| !matches!(r.state, PatchState::Applied))
            .map(|r| {
                r.arena
                    .iter()
                    .map(|a| Chunk {
                        offset: a.gpa.wrapping_sub(gpa0),
                        len: a.len,
                    })
                    .collect()
            })
            .collect();
        for group in old {
            let free: Vec<Chunk> = group
                .into_iter()
                .filter(|c| self.arena.reserve(*c))
                .collect();
            self.arena.retire_group(free);
        }
        if restore.is_empty() {
            return Ok(());
        }
        // Half-written patches: put every original byte back in one blackout, only where the
        // guest holds exactly the bytes this VMM wrote (the vouched record says which).
        let guest = self.guest.clone();
        let paused = guest_control::Paused::pause(&*guest)?;
        let mut outcome = Vec::with_capacity(restore.len());
        for r in &restore {
            let (mut restored, mut left) = (0usize, Vec::new());
            for s in &r.sites {
                let cur = self.read(s.gpa, s.original.len())?;
                if cur == s.original {
                    continue;
                }
                if cur == s.patched {
                    self.guest.write_phys(s.gpa, &s.original)?;
                    restored += 1;
                } else {
                    warn!(patch = %r.id, site = %s.location, "site holds neither original nor patched bytes; left alone");
                    left.push(s.location.clone());
                }
            }
            outcome.push((restored, left));
        }
        paused.resume()?;
        for (mut r, (restored, left)) in restore.into_iter().zip(outcome) {
            let n = r.sites.len();
            r.state = PatchState::Failed;
            r.note = Some(if left.is_empty() {
                format!(
                    "recovered: a crash interrupted writing this patch's sites; {restored} of {n} held the patched bytes and were restored to their original bytes (checked against the signed patch), the rest already held them"
                )
            } else {
                format!(
                    "recovered in part: a crash interrupted writing this patch's sites; {restored} of {n} sites restored to their original bytes (checked against the signed patch), {} left alone because they hold neither the original nor the patched bytes ({}); inspect them before patching this code",
                    left.len(),
                    left.join(", ")
                )
            });
            warn!(patch = %r.id, note = ?r.note, "a half-written patch was reconciled");
            self.put(r)?;
        }
        Ok(())
    }

    /// Paging registers to translate with: learned from the last blackout, or from a short
    /// one now (the first patch, or when the guest freed the tables learned).
    ///
    /// The registers learned are those of whatever a vCPU ran then, often a process: once it
    /// exits, its top-level table is freed and reused, and a walk through it finds nothing
    /// (every site "not mapped") or garbage. So a cached root is kept only while it still
    /// maps the arena's first page where the backend reserved it. The blackout then
    /// translates every site again through the parked vCPU's root when that differs, and
    /// every site crossing a page whatever the root (`Engine::recheck_guest`).
    pub(crate) fn paging(&mut self) -> Result<PagingRegs, EngineError> {
        if let Some(p) = self.paging {
            if self.maps_arena(&p) {
                return Ok(p);
            }
            debug!(
                cr3 = p.cr3,
                "the cached page tables no longer map the arena: re-learning them"
            );
            self.paging = None;
        }
        let paused = guest_control::Paused::pause(&*self.guest)?;
        let p = paused
            .vcpus()
            .iter()
            .flatten()
            .next()
            .map(|s| self.rewrites.code_view(s).paging);
        paused.resume()?;
        let p = p.ok_or(EngineError::NoVcpu)?;
        self.paging = Some(p);
        Ok(p)
    }

    /// Whether `paging` still maps the arena's first page where the backend reserved it: a
    /// root that does is a live address space of the OS (the arena is mapped in every one).
    fn maps_arena(&self, paging: &PagingRegs) -> bool {
        let window = self.arena.window;
        let vs = through(paging);
        self.guest
            .translate(&vs, window.gva)
            .is_ok_and(|t| t.gpa == window.gpa)
    }

    /// Translates `[gva, gva+len)` to one contiguous guest-physical range.
    fn gpa_of(
        &self,
        paging: &PagingRegs,
        site: &str,
        gva: u64,
        len: usize,
    ) -> Result<u64, EngineError> {
        let vs = through(paging);
        let first = self
            .guest
            .translate(&vs, gva)
            .map_err(|e| EngineError::Unmapped {
                site: site.into(),
                gva,
                reason: e.to_string(),
            })?;
        // `gva` may come from a guest-writable ledger: a range past the top of the address
        // space is not one the guest maps.
        let end = gva
            .checked_add(len.max(1) as u64)
            .ok_or_else(|| EngineError::Unmapped {
                site: site.into(),
                gva,
                reason: format!("{len} bytes there run past the top of the address space"),
            })?;
        let mut page = gva & !0xfff;
        while let Some(next) = page.checked_add(0x1000).filter(|&n| n < end) {
            page = next;
            let t = self
                .guest
                .translate(&vs, page)
                .map_err(|e| EngineError::Unmapped {
                    site: site.into(),
                    gva: page,
                    reason: e.to_string(),
                })?;
            if t.gpa != first.gpa + (page - gva) {
                return Err(EngineError::Discontiguous {
                    site: site.into(),
                    gva,
                    len,
                });
            }
        }
        Ok(first.gpa)
    }

    /// Guest bytes at `[gva, gva+len)` as they are without the patches in `lifting` and, for
    /// code analysis, without any applied patch when `all_originals` is set.
    fn read_virtual(
        &self,
        paging: &PagingRegs,
        site: &str,
        gva: u64,
        len: usize,
        lifting: &HashSet<String>,
        all_originals: bool,
    ) -> Result<(u64, Vec<u8>), EngineError> {
        let gpa = self.gpa_of(paging, site, gva, len)?;
        let mut bytes = self.read(gpa, len)?;
        let lifted = self
            .records
            .iter()
            .filter(|r| r.state == PatchState::Applied)
            .filter(|r| all_originals || lifting.contains(&r.id))
            .flat_map(|r| &r.sites);
        overlay_originals(&mut bytes, gva, lifted);
        Ok((gpa, bytes))
    }

    /// What checking a patch file needs, detached from the engine: a server parses and
    /// verifies a (large) file with it without holding the engine's lock, then calls
    /// [`Engine::apply_checked`].
    pub fn verifier(&self) -> Verifier {
        Verifier {
            trusted_keys: self.config.trusted_keys.clone(),
            allow_unsigned: self.config.allow_unsigned,
        }
    }
}

#[cfg(test)]
mod tests;
