//! The patch engine: verifies a signed patch, plans every site, and applies, reverts or
//! replaces patches on a running guest in one blackout each.
//!
//! Written only against [`GuestControl`], so any hypervisor backend can drive it. The path of
//! a patch (ARCHITECTURE §1): parse + signature → target identity → resolve sites → plan (pure,
//! [`plan`]) → arena code written while the guest runs → pause → check every vCPU → write the
//! jumps → resume → journal.

pub mod arena;
pub mod journal;
pub mod kernel_text;
pub mod keys;
pub mod plan;
pub mod target;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use patch_format::{ParsedPatch, PublicKey, SignatureBlock, SiteKind};
use serde::Serialize;
use thiserror::Error;
use tracing::{info, warn};

use arena::{Arena, ArenaWindow, Chunk};
use guest_control::paging::PagingRegs;
use guest_control::stats::{History, Summary};
use guest_control::{GuestControl, GuestError, VcpuState};
use journal::{ArenaRecord, Journal, JournalError, PatchRecord, PatchState, SiteRecord};
use plan::{FunctionCode, PlanError, SiteInput, SitePlan};
use target::{Target, TargetError};

/// Why a patch was not applied or reverted. The guest is unchanged whenever one is returned.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("malformed patch: {0}")]
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
    #[error("relocation in site {site}: {source}")]
    Reloc {
        site: String,
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
        "the patch arena is full ({needed} bytes needed, {free} free, {quarantined} waiting until no vCPU can be using them); revert patches you no longer need"
    )]
    ArenaFull {
        needed: u64,
        free: u64,
        quarantined: u64,
    },
    #[error(
        "busy: after {attempts} attempts a vCPU was still where the patch cannot be written safely ({why}); the guest is unchanged, try again"
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
    #[error("the guest has no running vCPU")]
    NoVcpu,
    #[error("the VM is paused by the operator; resume it first (`vmm resume`)")]
    OperatorPaused,
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl EngineError {
    /// A short machine-readable class, also used to choose the HTTP status.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineError::Malformed(_) => "malformed",
            EngineError::Unsigned | EngineError::Signature(_) => "signature",
            EngineError::Target(_) | EngineError::Image(_) => "wrong_target",
            EngineError::Plan(_)
            | EngineError::Reloc { .. }
            | EngineError::Unmapped { .. }
            | EngineError::Discontiguous { .. }
            | EngineError::SelfOverlap { .. } => "refused",
            EngineError::Overlap { .. } => "conflict",
            EngineError::ArenaFull { .. } => "arena_full",
            EngineError::Busy { .. } | EngineError::Raced { .. } | EngineError::OperatorPaused => {
                "busy"
            }
            EngineError::NoSuchPatch(_) | EngineError::AmbiguousId(_) => "not_found",
            EngineError::NotApplied { .. } => "conflict",
            EngineError::Tampered { .. } => "tampered",
            EngineError::NoVcpu | EngineError::Guest(_) | EngineError::Journal(_) => "internal",
        }
    }
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
        Ok(CheckedPatch { parsed, started })
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
    /// Bytes above each vCPU's RSP scanned for return addresses into ranges being changed.
    pub stack_scan: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            trusted_keys: Vec::new(),
            allow_unsigned: false,
            max_attempts: 50,
            stack_scan: 1024,
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
    pub apply_total_us: Summary,
    pub arena_free_bytes: u64,
    pub arena_quarantined_bytes: u64,
}

/// One site made ready to write.
struct Prepared {
    plan: SitePlan,
    /// For function sites, the old function `[start, end)`.
    function: Option<(u64, u64)>,
    /// Guest-physical address of the jump.
    gpa: u64,
    location: String,
}

/// A change to make in one blackout: new sites to write, applied patches to take out.
struct Change<'a> {
    write: &'a [Prepared],
    restore: &'a [&'a PatchRecord],
    /// Code no vCPU may be running or returning into (consistency of multi-function patches),
    /// as `[start, end)` with a name for messages.
    quiesce: Vec<(u64, u64, String)>,
    /// Function entries inside `quiesce` where a vCPU may sit: it has not started the call.
    entries: Vec<u64>,
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
    apply_blackouts: History,
    revert_blackouts: History,
    apply_totals: History,
    applies: u64,
    reverts: u64,
    refused: u64,
    busy_retries: u64,
    moved: u64,
    /// Why the last blackout attempt backed off.
    last_busy: Option<String>,
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
        Engine::new(guest, Target::new(info, 0), window, config, state_dir)
    }

    pub fn new(
        guest: Arc<G>,
        target: Target,
        window: ArenaWindow,
        config: EngineConfig,
        state_dir: Option<&Path>,
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
        let mut engine = Engine {
            guest,
            target,
            config,
            arena: Arena::new(window),
            journal,
            records,
            paging: None,
            apply_blackouts: History::new(4096),
            revert_blackouts: History::new(4096),
            apply_totals: History::new(4096),
            applies: 0,
            reverts: 0,
            refused: 0,
            busy_retries: 0,
            moved: 0,
            last_busy: None,
        };
        engine.recover()?;
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
            apply_total_us: self.apply_totals.summary(),
            arena_free_bytes: self.arena.free_bytes(),
            arena_quarantined_bytes: self.arena.quarantined_bytes(),
        }
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
        if let Some(j) = &mut self.journal {
            j.put(rec.clone())?;
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
    /// crash is finished or undone so no site is left half-written.
    pub fn recover(&mut self) -> Result<(), EngineError> {
        let mut restore: Vec<PatchRecord> = Vec::new();
        let mut updates: Vec<PatchRecord> = Vec::new();
        for r in &self.records {
            if !matches!(
                r.state,
                PatchState::Applied | PatchState::Applying | PatchState::Reverting
            ) {
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
                        "recovered: the {} was interrupted after every site was written; the patch is applied",
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
            } else if orig == n {
                u.state = PatchState::Reverted;
                u.note = Some(match r.state {
                    PatchState::Applied => "not in the running guest (the guest was restarted); marked reverted".into(),
                    PatchState::Applying => "recovered: the apply was interrupted before any site was written; nothing applied".into(),
                    _ => "recovered: the revert had completed when it was interrupted".into(),
                });
                u.reverted_at = Some(now_secs());
            } else {
                restore.push(r.clone());
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
        let gpa0 = self.arena.window.gpa;
        let old: Vec<Chunk> = self
            .records
            .iter()
            .filter(|r| !matches!(r.state, PatchState::Applied))
            .flat_map(|r| r.arena.iter())
            .map(|a| Chunk {
                offset: a.gpa.wrapping_sub(gpa0),
                len: a.len,
            })
            .collect();
        for c in old {
            if self.arena.reserve(c) {
                self.arena.retire(c);
            }
        }
        if restore.is_empty() {
            return Ok(());
        }
        // Half-written patches: put every original byte back in one blackout.
        self.guest.pause_all()?;
        let mut result: Result<(), EngineError> = Ok(());
        for r in &restore {
            for s in &r.sites {
                let cur = self.read(s.gpa, s.original.len())?;
                if cur == s.patched || cur == s.original {
                    if let Err(e) = self.guest.write_phys(s.gpa, &s.original) {
                        result = Err(e.into());
                    }
                } else {
                    warn!(patch = %r.id, site = %s.location, "site holds neither original nor patched bytes; left alone");
                }
            }
        }
        self.guest.resume_all()?;
        result?;
        for mut r in restore {
            warn!(patch = %r.id, "a crash left this patch half-written; original bytes restored");
            r.state = PatchState::Failed;
            r.note = Some(
                "recovered: a crash interrupted writing the sites; every site was restored to its original bytes".into(),
            );
            self.put(r)?;
        }
        Ok(())
    }

    /// Paging registers to translate with: learned from the last blackout, or from a short
    /// one now (the first patch only).
    fn paging(&mut self) -> Result<PagingRegs, EngineError> {
        if let Some(p) = self.paging {
            return Ok(p);
        }
        let states = self.guest.pause_all()?;
        let p = states.iter().flatten().next().map(|s| s.paging);
        self.guest.resume_all()?;
        let p = p.ok_or(EngineError::NoVcpu)?;
        self.paging = Some(p);
        Ok(p)
    }

    /// Translates `[gva, gva+len)` to one contiguous guest-physical range.
    fn gpa_of(
        &self,
        paging: &PagingRegs,
        site: &str,
        gva: u64,
        len: usize,
    ) -> Result<u64, EngineError> {
        let vs = VcpuState {
            id: 0,
            rip: 0,
            rsp: 0,
            cpl: 0,
            paging: *paging,
        };
        let first = self
            .guest
            .translate(&vs, gva)
            .map_err(|e| EngineError::Unmapped {
                site: site.into(),
                gva,
                reason: e.to_string(),
            })?;
        let mut page = gva & !0xfff;
        let end = gva + len.max(1) as u64;
        while page + 0x1000 < end {
            page += 0x1000;
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

    /// Applies a patch file. The same patch applied twice is a no-op the second time.
    pub fn apply(&mut self, file: &[u8]) -> Result<ApplyOutcome, EngineError> {
        let r = self
            .verifier()
            .check(file)
            .and_then(|checked| self.apply_inner(checked));
        if r.is_err() {
            self.refused += 1;
        }
        r
    }

    /// Applies a patch that [`Verifier::check`] accepted (the rest of [`Engine::apply`]).
    pub fn apply_checked(&mut self, checked: CheckedPatch) -> Result<ApplyOutcome, EngineError> {
        let r = self.apply_inner(checked);
        if r.is_err() {
            self.refused += 1;
        }
        r
    }

    /// Counts a patch refused by [`Verifier::check`] outside the engine (in the metrics'
    /// `refused`, as [`Engine::apply`] counts its own).
    pub fn note_refused(&mut self) {
        self.refused += 1;
    }

    fn apply_inner(&mut self, checked: CheckedPatch) -> Result<ApplyOutcome, EngineError> {
        let CheckedPatch {
            parsed,
            started: t0,
        } = checked;
        let id = parsed.id.to_string();
        if let Some(r) = self
            .records
            .iter()
            .find(|r| r.id == id && r.state == PatchState::Applied)
        {
            return Ok(ApplyOutcome {
                patch: r.clone(),
                already_applied: true,
                replaced: Vec::new(),
                attempts: 0,
                total_us: t0.elapsed().as_micros() as u64,
            });
        }
        let patch = &parsed.patch;
        self.target.check_identity(&patch.target)?;

        // Applied patches this one replaces come out in the same blackout.
        let replaces: HashSet<String> = patch.meta.replaces.iter().map(|r| r.to_string()).collect();
        let lifting: Vec<PatchRecord> = self
            .records
            .iter()
            .filter(|r| r.state == PatchState::Applied && replaces.contains(&r.id))
            .cloned()
            .collect();
        let lifting_ids: HashSet<String> = lifting.iter().map(|r| r.id.clone()).collect();

        let paging = self.paging()?;
        let window = self.arena.window;
        let mut prepared: Vec<Prepared> = Vec::new();
        let mut chunks: Vec<Chunk> = Vec::new();
        let result = (|| -> Result<(), EngineError> {
            for site in &patch.sites {
                let name = site.target.to_string();
                let loc = self.target.resolve(&name, &site.target)?;
                // Rule 5 first: an applied patch in the way is the clearest reason why the
                // bytes differ. The whole expected range counts (a function site replaces
                // the whole function).
                let span = (loc.gva, loc.gva + site.expected.len() as u64);
                for r in self
                    .records
                    .iter()
                    .filter(|r| r.state == PatchState::Applied && !lifting_ids.contains(&r.id))
                {
                    if let Some(s) = r.sites.iter().find(|s| ranges_overlap(span, site_range(s))) {
                        return Err(EngineError::Overlap {
                            site: name.clone(),
                            other: s.location.clone(),
                            patch: r.id.clone(),
                        });
                    }
                }
                let (gpa, current) = self.read_virtual(
                    &paging,
                    &name,
                    loc.gva,
                    site.expected.len(),
                    &lifting_ids,
                    false,
                )?;
                let function_bytes = match (site.kind, loc.function) {
                    (SiteKind::Micropatch, Some((start, size))) => Some((
                        start,
                        self.read_virtual(
                            &paging,
                            &name,
                            start,
                            size as usize,
                            &lifting_ids,
                            true,
                        )?
                        .1,
                    )),
                    _ => None,
                };
                // A stock kernel rewrote some instructions while booting (kernel_text).
                let expected = kernel_text::reconcile(
                    &name,
                    &site.expected,
                    &current,
                    loc.gva,
                    site.kind == SiteKind::Function,
                    kernel_text::KernelRewrites {
                        fentry: self.target.symbol("__fentry__"),
                        return_thunk: self.target.symbol("__x86_return_thunk"),
                        slide: self.target.slide,
                    },
                )?;
                let input = SiteInput {
                    name: name.clone(),
                    kind: site.kind,
                    at: loc.gva,
                    expected: &expected,
                    current: &current,
                    function: function_bytes.as_ref().map(|(start, b)| FunctionCode {
                        start: *start,
                        bytes: b,
                    }),
                };
                let near = plan::rel32_reaches(loc.gva, window.gva)
                    && plan::rel32_reaches(loc.gva, window.gva + window.size);
                let jump_len = if near {
                    plan::JMP_REL32_LEN
                } else {
                    plan::JMP_ABS_LEN
                };
                let analysis = plan::analyze(&input, jump_len)?;
                let range = analysis.range();
                // Rule 5: no overlap with this patch's other sites or with applied patches.
                for p in &prepared {
                    if ranges_overlap(range, p.plan.analysis.range()) {
                        return Err(EngineError::SelfOverlap {
                            site: name.clone(),
                            other: p.location.clone(),
                        });
                    }
                }
                // Arena space: the code (+ the relocated copy for a micropatch), and for a
                // function its escape copy.
                let copy = plan::copy_len(&analysis, window.gva)? as u64;
                let (code_len, escape_len) = match site.kind {
                    SiteKind::Function => (site.code.len() as u64, copy),
                    SiteKind::Micropatch => (site.code.len() as u64 + copy + 16, 0),
                };
                let mut alloc = |len: u64, chunks: &mut Vec<Chunk>| -> Result<Chunk, EngineError> {
                    let c = self.arena.alloc(len).ok_or(EngineError::ArenaFull {
                        needed: len,
                        free: self.arena.free_bytes(),
                        quarantined: self.arena.quarantined_bytes(),
                    })?;
                    chunks.push(c);
                    Ok(c)
                };
                let code_chunk = alloc(code_len, &mut chunks)?;
                let escape_chunk = if escape_len > 0 {
                    Some(alloc(escape_len, &mut chunks)?)
                } else {
                    None
                };
                let code_at = self.arena.gva(code_chunk);
                let mut code = site.code.clone();
                patch_format::apply_relocations(&mut code, code_at, &site.relocations, |s| {
                    self.target.symbol(s)
                })
                .map_err(|source| EngineError::Reloc {
                    site: name.clone(),
                    source,
                })?;
                let escape_at = escape_chunk.map_or(0, |c| self.arena.gva(c));
                let plan = plan::build(&analysis, &code, code_at, escape_at)?;
                for (at, bytes) in &plan.arena {
                    let fits = chunks.iter().any(|c| {
                        *at >= self.arena.gva(*c)
                            && *at + bytes.len() as u64 <= self.arena.gva(*c) + c.len
                    });
                    if !fits {
                        return Err(PlanError::Verify {
                            site: name.clone(),
                            reason: format!("arena code at {at:#x} overflows its allocation"),
                        }
                        .into());
                    }
                }
                let jump_gpa = gpa + (analysis.jump_at - loc.gva);
                prepared.push(Prepared {
                    plan,
                    function: (site.kind == SiteKind::Function)
                        .then(|| (loc.gva, loc.gva + site.expected.len() as u64)),
                    gpa: jump_gpa,
                    location: name,
                });
            }
            Ok(())
        })();
        if let Err(e) = result {
            for c in chunks {
                self.arena.release(c);
            }
            return Err(e);
        }

        let mut record = PatchRecord {
            id: id.clone(),
            name: patch.meta.name.clone(),
            state: PatchState::Applying,
            sites: prepared
                .iter()
                .map(|p| SiteRecord {
                    location: p.location.clone(),
                    gva: p.plan.analysis.jump_at,
                    gpa: p.gpa,
                    original: p.plan.original.clone(),
                    patched: p.plan.jump.clone(),
                })
                .collect(),
            arena: chunks
                .iter()
                .map(|c| ArenaRecord {
                    gpa: self.arena.gpa(*c),
                    len: c.len,
                })
                .collect(),
            replaces: lifting.iter().map(|r| r.id.clone()).collect(),
            applied_at: None,
            reverted_at: None,
            apply_blackout_us: None,
            revert_blackout_us: None,
            moved_vcpus: 0,
            function_sites: prepared.iter().filter(|p| p.function.is_some()).count() as u32,
            note: None,
        };
        // Intent first: a crash from here on is found and repaired by `recover`.
        if let Err(e) = self.put(record.clone()) {
            for c in chunks {
                self.arena.release(c);
            }
            return Err(e);
        }
        // The arena chunks are unused by any vCPU, so they are written while the guest runs.
        let mut arena_result = Ok(());
        for p in &prepared {
            for (at, bytes) in &p.plan.arena {
                let gpa = window.gpa + (at - window.gva);
                if let Err(e) = self.guest.write_phys(gpa, bytes) {
                    arena_result = Err(EngineError::from(e));
                }
            }
        }
        let lifting_refs: Vec<&PatchRecord> = lifting.iter().collect();
        // A patch replacing several functions switches a vCPU to all of them at once: none of
        // the old ones may be running (past its entry) or on a stack.
        let mut quiesce: Vec<(u64, u64, String)> = Vec::new();
        let mut entries = Vec::new();
        if record.function_sites > 1 {
            for p in &prepared {
                if let Some((a, b)) = p.function {
                    quiesce.push((a, b, format!("old {}", p.location)));
                    entries.push(a);
                    entries.push(p.plan.analysis.jump_at);
                }
            }
        }
        for r in &lifting {
            quiesce.extend(quiesce_arena(r, &window));
        }
        let outcome = arena_result.and_then(|()| {
            self.blackout(&Change {
                write: &prepared,
                restore: &lifting_refs,
                quiesce,
                entries,
            })
        });
        let (blackout, attempts, moved) = match outcome {
            Ok(v) => v,
            Err(e) => {
                for c in &chunks {
                    let _ = self
                        .guest
                        .write_phys(self.arena.gpa(*c), &vec![0u8; c.len as usize]);
                    self.arena.release(*c);
                }
                record.state = PatchState::Failed;
                record.note = Some(e.to_string());
                self.put(record)?;
                return Err(e);
            }
        };
        record.state = PatchState::Applied;
        record.applied_at = Some(now_secs());
        record.apply_blackout_us = Some(blackout.as_micros() as u64);
        record.moved_vcpus = moved;
        self.put(record.clone())?;
        for mut old in lifting {
            old.state = PatchState::Reverted;
            old.reverted_at = Some(now_secs());
            old.revert_blackout_us = Some(blackout.as_micros() as u64);
            old.note = Some(format!("replaced by {id}"));
            for a in &old.arena {
                self.arena.retire(Chunk {
                    offset: a.gpa.wrapping_sub(window.gpa),
                    len: a.len,
                });
            }
            self.put(old)?;
        }
        self.applies += 1;
        self.moved += u64::from(moved);
        self.apply_blackouts.push(blackout.as_micros() as u64);
        let total_us = t0.elapsed().as_micros() as u64;
        self.apply_totals.push(total_us);
        info!(patch = %id, name = %record.name, sites = record.sites.len(), blackout_us = blackout.as_micros() as u64, attempts, moved_vcpus = moved, total_us, "patch applied");
        Ok(ApplyOutcome {
            patch: record,
            already_applied: false,
            replaced: replaces
                .into_iter()
                .filter(|r| lifting_ids.contains(r))
                .collect(),
            attempts,
            total_us,
        })
    }

    /// Reverts an applied patch: every byte it changed is put back in one blackout.
    pub fn revert(&mut self, id: &str) -> Result<PatchRecord, EngineError> {
        let rec = self.find(id)?.clone();
        if rec.state != PatchState::Applied {
            return Err(EngineError::NotApplied {
                id: rec.id,
                state: format!("{:?}", rec.state).to_lowercase(),
            });
        }
        for s in &rec.sites {
            if self.read(s.gpa, s.patched.len())? != s.patched {
                return Err(EngineError::Tampered {
                    id: rec.id.clone(),
                    site: s.location.clone(),
                });
            }
        }
        let mut r = rec.clone();
        r.state = PatchState::Reverting;
        self.put(r.clone())?;
        let window = self.arena.window;
        let out = self.blackout(&Change {
            write: &[],
            restore: &[&rec],
            quiesce: quiesce_arena(&rec, &window),
            entries: Vec::new(),
        });
        let (blackout, _, _) = match out {
            Ok(v) => v,
            Err(e) => {
                r.state = PatchState::Applied;
                self.put(r)?;
                return Err(e);
            }
        };
        r.state = PatchState::Reverted;
        r.reverted_at = Some(now_secs());
        r.revert_blackout_us = Some(blackout.as_micros() as u64);
        self.put(r.clone())?;
        let gpa0 = self.arena.window.gpa;
        for a in &rec.arena {
            self.arena.retire(Chunk {
                offset: a.gpa.wrapping_sub(gpa0),
                len: a.len,
            });
        }
        self.reverts += 1;
        self.revert_blackouts.push(blackout.as_micros() as u64);
        info!(patch = %r.id, blackout_us = blackout.as_micros() as u64, "patch reverted");
        Ok(r)
    }

    /// Pauses, checks, writes, resumes; retries while a vCPU is in the way. Returns the
    /// blackout, the attempts and the vCPUs moved.
    fn blackout(&mut self, change: &Change<'_>) -> Result<(Duration, u32, u32), EngineError> {
        let mut why = String::new();
        for attempt in 1..=self.config.max_attempts.max(1) {
            let states = self.guest.pause_all()?;
            match self.check_and_write(change, &states) {
                Ok(Some(moved)) => {
                    let blackout = self.guest.resume_all()?;
                    return Ok((blackout, attempt, moved));
                }
                Ok(None) => {}
                Err(e) => {
                    self.guest.resume_all()?;
                    return Err(e);
                }
            }
            self.guest.resume_all()?;
            self.busy_retries += 1;
            why = self.last_busy.take().unwrap_or_default();
            // Back off a little more each time, with jitter, so the next pause does not catch
            // a looping vCPU at the same point of its loop.
            let jitter = u64::from(
                Instant::now().elapsed().subsec_nanos() ^ attempt.wrapping_mul(2_654_435_761),
            ) % 200;
            std::thread::sleep(Duration::from_micros(100 * u64::from(attempt) + jitter));
        }
        Err(EngineError::Busy {
            attempts: self.config.max_attempts,
            why,
        })
    }

    /// Up to `config.stack_scan` bytes from the top of a parked vCPU's stack, as words: the
    /// return addresses (and interrupted contexts) it may come back to.
    fn stack_words(&self, v: &VcpuState) -> Vec<u64> {
        let mut words = Vec::new();
        let mut at = v.rsp & !7;
        let end = at.saturating_add(self.config.stack_scan as u64);
        while at < end {
            let page_end = ((at & !0xfff) + 0x1000).min(end);
            let Ok(t) = self.guest.translate(v, at) else {
                break;
            };
            let mut buf = vec![0u8; (page_end - at) as usize];
            if self.guest.read_phys(t.gpa, &mut buf).is_err() {
                break;
            }
            words.extend(
                buf.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))),
            );
            at = page_end;
        }
        words
    }

    /// With every vCPU parked: checks nothing is in the way, then writes. `Some(moved)` when
    /// written, `None` when a vCPU is in the way (the reason is left in `last_busy`).
    fn check_and_write(
        &mut self,
        change: &Change<'_>,
        states: &[Option<VcpuState>],
    ) -> Result<Option<u32>, EngineError> {
        let vcpus: Vec<&VcpuState> = states.iter().flatten().collect();
        let first = vcpus.first().ok_or(EngineError::NoVcpu)?;
        // The translations were made with cached paging registers: re-check them if the
        // guest switched page tables since.
        if self.paging != Some(first.paging) {
            for p in change.write {
                let t = self.guest.translate(first, p.plan.analysis.jump_at);
                if t.map(|t| t.gpa).ok() != Some(p.gpa) {
                    self.paging = Some(first.paging);
                    return Err(EngineError::Raced {
                        site: p.location.clone(),
                    });
                }
            }
            self.paging = Some(first.paging);
        }
        // The guest may have rewritten a site since it was planned.
        for r in change.restore {
            for s in &r.sites {
                if self.read(s.gpa, s.patched.len())? != s.patched {
                    return Err(EngineError::Tampered {
                        id: r.id.clone(),
                        site: s.location.clone(),
                    });
                }
            }
        }
        for p in change.write {
            let mut cur = self.read(p.gpa, p.plan.original.len())?;
            overlay_originals(
                &mut cur,
                p.plan.analysis.jump_at,
                change.restore.iter().flat_map(|r| &r.sites),
            );
            if cur != p.plan.original {
                return Err(EngineError::Raced {
                    site: p.location.clone(),
                });
            }
        }

        // Interiors of every range about to change: a vCPU there, or a return address there,
        // would resume in the middle of new bytes.
        let interiors: Vec<(u64, u64, &str)> = change
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
            .collect();
        let mut moves: Vec<(usize, u64, u64)> = Vec::new();
        let mut stacks: Vec<Vec<u64>> = Vec::with_capacity(vcpus.len());
        for v in &vcpus {
            let words = self.stack_words(v);
            for &(a, b, loc) in &interiors {
                if let Some(w) = words.iter().find(|&&w| w > a && w < b) {
                    self.last_busy = Some(format!(
                        "vCPU {} has {w:#x}, inside {loc}, on its stack",
                        v.id
                    ));
                    return Ok(None);
                }
            }
            if let Some(name) = change.quiesce_hit(v.rip) {
                self.last_busy = Some(format!("vCPU {} is running {name} at {:#x}", v.id, v.rip));
                return Ok(None);
            }
            if let Some((w, name)) = words
                .iter()
                .find_map(|&w| change.quiesce_hit(w).map(|n| (w, n)))
            {
                self.last_busy = Some(format!(
                    "vCPU {} will return into {name} ({w:#x} on its stack)",
                    v.id
                ));
                return Ok(None);
            }
            let mut rip = v.rip;
            for p in change.write {
                match p.plan.relocate_rip(rip) {
                    Some(r) => rip = r,
                    None => {
                        self.last_busy = Some(format!(
                            "vCPU {} at {:#x} is not on an instruction boundary of {}",
                            v.id, v.rip, p.location
                        ));
                        return Ok(None);
                    }
                }
            }
            for r in change.restore {
                for s in &r.sites {
                    let (a, b) = site_range(s);
                    if rip > a && rip < b {
                        self.last_busy = Some(format!(
                            "vCPU {} at {rip:#x} is inside patched site {}",
                            v.id, s.location
                        ));
                        return Ok(None);
                    }
                }
            }
            if rip != v.rip {
                moves.push((v.id, v.rip, rip));
            }
            stacks.push(words);
        }

        for r in change.restore {
            for s in &r.sites {
                self.guest.write_phys(s.gpa, &s.original)?;
            }
        }
        for p in change.write {
            self.guest.write_phys(p.gpa, &p.plan.jump)?;
        }
        for &(id, from, to) in &moves {
            self.guest.set_rip(id, to)?;
            info!(
                vcpu = id,
                from = format_args!("{from:#x}"),
                to = format_args!("{to:#x}"),
                "moved a parked vCPU out of displaced bytes"
            );
        }
        // Quarantined arena code nobody can be running any more becomes free.
        let rips: Vec<u64> = vcpus.iter().map(|v| v.rip).collect();
        self.arena.sweep(|a, b| {
            rips.iter().any(|&r| r >= a && r < b)
                || stacks.iter().flatten().any(|&w| w >= a && w < b)
                || moves.iter().any(|&(_, _, to)| to >= a && to < b)
        });
        Ok(Some(moves.len() as u32))
    }
}

#[cfg(test)]
mod tests;
