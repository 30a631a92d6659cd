//! Apply and revert as named steps: admit (parse, signature, identity) → plan every site
//! against a scratch copy of the arena → journal the intent → stage the arena code while the
//! guest runs → commit in one blackout ([`crate::blackout`]) → journal the outcome.
//!
//! Planning allocates from a *copy* of the arena, adopted only once every site is planned, so a
//! refusal at any step (any `?`) leaves the arena exactly as it was: nothing to release.

use std::collections::HashSet;
use std::time::Instant;

use patch_format::{Patch, Site, SiteKind};
use tracing::{info, warn};

use crate::arena::{Arena, Chunk};
use crate::blackout::{Change, Committed};
use crate::journal::{ArenaRecord, PatchRecord, PatchState, SiteRecord};
use crate::plan::{self, FunctionCode, PlanError, SiteInput, SitePlan};
use crate::{
    ApplyOutcome, CheckedPatch, Engine, EngineError, GuestControl, PagingRegs, now_secs,
    quiesce_arena, ranges_overlap, site_range,
};

/// One site made ready to write.
/// What an apply's staging overwrote in the arena ([`Engine::arena_before`]).
struct ArenaBefore {
    saved: Vec<(u64, Vec<u8>)>,
    ledger_seq: u64,
}

pub(crate) struct Prepared {
    pub(crate) plan: SitePlan,
    /// For function sites, the old function `[start, end)`.
    pub(crate) function: Option<(u64, u64)>,
    /// Guest-physical address of the jump.
    pub(crate) gpa: u64,
    pub(crate) location: String,
}

/// Every site of a patch planned, with the arena that holds their code.
struct Planned {
    sites: Vec<Prepared>,
    /// The arena with this patch's chunks taken: becomes the engine's arena on adoption.
    arena: Arena,
    chunks: Vec<Chunk>,
    /// The patch's read-only data: the whole chunk holding it (blocks at their offsets, zeroes
    /// between them), staged with the code.
    data: Option<(u64, Vec<u8>)>,
    /// Where each data block was placed (guest-virtual): `S` of data relocations.
    data_at: Vec<u64>,
}

/// An apply planned by [`Engine::plan_apply`], for [`Engine::commit_planned`].
pub(crate) struct PlannedApply {
    /// The engine's [`Engine::generation`] the plan was made at.
    generation: u64,
    work: PlanOutcome,
}

enum PlanOutcome {
    /// Sites planned: commit them.
    Apply(Box<Work>),
    /// The patch is already applied, and this engine can take it out again.
    Done(Box<ApplyOutcome>),
    /// The patch is in the guest, but this engine cannot vouch for its record (known only from
    /// the arena ledger, or its kept file is lost): the signed file given now can.
    Adopt {
        parsed: Box<patch_format::ParsedPatch>,
        file: Vec<u8>,
        t0: Instant,
    },
}

struct Work {
    record: PatchRecord,
    planned: Planned,
    lifting: Lifting,
    file: Vec<u8>,
    t0: Instant,
}

/// Applied patches a new patch replaces: they come out in the same blackout.
struct Lifting {
    records: Vec<PatchRecord>,
    ids: HashSet<String>,
}

impl<G: GuestControl> Engine<G> {
    /// Applies a patch file. The same patch applied twice is a no-op the second time.
    pub fn apply(&mut self, file: &[u8]) -> Result<ApplyOutcome, EngineError> {
        let r = match self.verifier().check(file) {
            Ok(c) => self.apply_steps(c),
            Err(e) => Err(e),
        };
        self.counted(r)
    }

    /// Applies a patch that [`crate::Verifier::check`] accepted (the rest of [`Engine::apply`]).
    pub fn apply_checked(&mut self, checked: CheckedPatch) -> Result<ApplyOutcome, EngineError> {
        let r = self.apply_steps(checked);
        self.counted(r)
    }

    /// Everything an apply checks before it writes (parse, signature, identity, every rule on
    /// every site, arena space), and nothing written: whether the patch would be accepted now.
    /// For coverage measurements; not counted in the metrics.
    pub fn dry_run(&mut self, file: &[u8]) -> Result<(), EngineError> {
        let checked = self.verifier().check(file)?;
        let paging = self.paging()?;
        self.plan_apply(checked, paging).map(|_| ())
    }

    /// Counts a patch refused by [`crate::Verifier::check`] outside the engine (in the metrics'
    /// `refused`, as [`Engine::apply`] counts its own).
    pub fn note_refused(&mut self) {
        self.refused += 1;
    }

    pub(crate) fn counted(
        &mut self,
        r: Result<ApplyOutcome, EngineError>,
    ) -> Result<ApplyOutcome, EngineError> {
        if r.is_err() {
            self.refused += 1;
        }
        r
    }

    /// admit (parse + signature, done by [`crate::Verifier::check`]) → plan → intent → stage → commit.
    fn apply_steps(&mut self, checked: CheckedPatch) -> Result<ApplyOutcome, EngineError> {
        let paging = self.paging()?;
        let planned = self.plan_apply(checked, paging)?;
        self.commit_planned(planned)
    }

    /// Everything of an apply that only reads the engine: identity, the sites planned against
    /// a scratch copy of the arena. Long for a large patch, so [`crate::shared::SharedEngine`]
    /// runs it while others read the engine; [`Engine::commit_planned`] then refuses a plan
    /// made before another change.
    pub(crate) fn plan_apply(
        &self,
        checked: CheckedPatch,
        paging: PagingRegs,
    ) -> Result<PlannedApply, EngineError> {
        let CheckedPatch {
            parsed,
            file,
            started: t0,
        } = checked;
        let id = parsed.id.to_string();
        if let Some(done) = self.already_applied(&id, t0) {
            let work = if self.unvouched.contains_key(&id) {
                self.target.check_identity(&parsed.patch.target)?;
                PlanOutcome::Adopt {
                    parsed: Box::new(parsed),
                    file,
                    t0,
                }
            } else {
                PlanOutcome::Done(Box::new(done))
            };
            return Ok(PlannedApply {
                generation: self.generation,
                work,
            });
        }
        let patch = &parsed.patch;
        self.target.check_identity(&patch.target)?;
        let lifting = self.lifted_by(patch);
        if let Some((old, why)) = lifting
            .records
            .iter()
            .find_map(|r| self.unvouched.get(&r.id).map(|why| (r, why)))
        {
            return Err(EngineError::Unvouched {
                id: old.id.clone(),
                why: why.clone(),
            });
        }
        let planned = self.plan_sites(patch, &lifting, &paging)?;
        let record = self.intent(&id, patch, &planned, &lifting);
        Ok(PlannedApply {
            generation: self.generation,
            work: PlanOutcome::Apply(Box::new(Work {
                record,
                planned,
                lifting,
                file,
                t0,
            })),
        })
    }

    /// The writing half of an apply: intent → stage → commit → outcome.
    pub(crate) fn commit_planned(
        &mut self,
        planned: PlannedApply,
    ) -> Result<ApplyOutcome, EngineError> {
        if planned.generation != self.generation {
            return Err(EngineError::Stale);
        }
        let Work {
            mut record,
            planned,
            lifting,
            file,
            t0,
        } = match planned.work {
            PlanOutcome::Apply(w) => *w,
            PlanOutcome::Done(done) => return Ok(*done),
            PlanOutcome::Adopt { parsed, file, t0 } => return self.adopt(&parsed, &file, t0),
        };
        // The signed file, then the intent: a crash from here on is found and repaired by
        // `recover`, which writes only what this file vouches for. Until the planned arena is
        // adopted below, a failure leaves the engine's arena untouched.
        if let Some(j) = &mut self.journal {
            j.keep_patch(&record.id, &file)?;
        }
        self.put(record.clone())?;
        self.arena = planned.arena;
        let chunks = planned.chunks;
        let prepared = planned.sites;
        let data = planned.data;
        // What staging overwrites, put back if the apply is refused: a refusal leaves the
        // guest as it was, the arena included.
        let before = match self.arena_before(&chunks) {
            Ok(b) => b,
            Err(e) => {
                self.abandon(&mut record, &chunks, &e, None)?;
                return Err(e);
            }
        };
        // The ledger claims the new chunks and sites before any jump can lead there.
        let outcome = self
            .stage(&prepared, data.as_ref())
            .and_then(|()| self.write_ledger())
            .and_then(|()| self.commit_apply(&record, &prepared, &lifting));
        let committed = match outcome {
            Ok(c) => c,
            Err(e) => {
                self.abandon(&mut record, &chunks, &e, Some(&before))?;
                return Err(e);
            }
        };
        let out = self.record_applied(record, lifting, committed, t0);
        self.update_ledger();
        out
    }

    fn already_applied(&self, id: &str, t0: Instant) -> Option<ApplyOutcome> {
        let r = self
            .records
            .iter()
            .find(|r| r.id == id && r.state == PatchState::Applied)?;
        Some(ApplyOutcome {
            patch: r.clone(),
            already_applied: true,
            replaced: Vec::new(),
            attempts: 0,
            total_us: t0.elapsed().as_micros() as u64,
        })
    }

    fn lifted_by(&self, patch: &Patch) -> Lifting {
        let replaces: HashSet<String> = patch.meta.replaces.iter().map(|r| r.to_string()).collect();
        let records: Vec<PatchRecord> = self
            .records
            .iter()
            .filter(|r| r.state == PatchState::Applied && replaces.contains(&r.id))
            .cloned()
            .collect();
        let ids = records.iter().map(|r| r.id.clone()).collect();
        Lifting { records, ids }
    }

    /// Plans every site against a scratch copy of the arena.
    fn plan_sites(
        &self,
        patch: &Patch,
        lifting: &Lifting,
        paging: &PagingRegs,
    ) -> Result<Planned, EngineError> {
        let mut planned = Planned {
            sites: Vec::with_capacity(patch.sites.len()),
            arena: self.arena.clone(),
            chunks: Vec::new(),
            data: None,
            data_at: Vec::new(),
        };
        plan_data(patch, &mut planned)?;
        for site in &patch.sites {
            let p = self.plan_site(site, paging, lifting, &mut planned)?;
            planned.sites.push(p);
        }
        Ok(planned)
    }

    fn plan_site(
        &self,
        site: &Site,
        paging: &PagingRegs,
        lifting: &Lifting,
        planned: &mut Planned,
    ) -> Result<Prepared, EngineError> {
        let name = site.target.to_string();
        let loc = self.target.resolve(&name, &site.target)?;
        // Rule 5 first: an applied patch in the way is the clearest reason why the bytes
        // differ. The whole expected range counts (a function site replaces the whole function).
        let span = (loc.gva, loc.gva.saturating_add(site.expected.len() as u64));
        for r in self
            .records
            .iter()
            .filter(|r| r.state == PatchState::Applied && !lifting.ids.contains(&r.id))
        {
            if let Some(s) = r.sites.iter().find(|s| ranges_overlap(span, site_range(s))) {
                return Err(EngineError::Overlap {
                    site: name,
                    other: s.location.clone(),
                    patch: r.id.clone(),
                });
            }
        }
        // Sites only in the target's code: inside a sized function symbol of the image, never
        // in the arena (whatever the symbols say about it).
        let Some((fstart, fsize)) = loc.function else {
            return Err(EngineError::NotInCode {
                site: name,
                gva: loc.gva,
            });
        };
        // A compiler-split cold part (`f.cold`, `f.cold.3`) is entered by jumps from its parent
        // at offsets no check of the part alone can see.
        if let Some(f) = self.target.function_name_at(loc.gva)
            && (f.ends_with(".cold") || f.contains(".cold."))
        {
            return Err(PlanError::ColdPart {
                site: name,
                function: f.to_string(),
            }
            .into());
        }
        let window = planned.arena.window;
        let arena = (window.gva, window.gva.saturating_add(window.size));
        if ranges_overlap(span, arena)
            || ranges_overlap((fstart, fstart.saturating_add(fsize)), arena)
        {
            return Err(EngineError::InArena {
                site: name,
                gva: span.0,
                end: span.1,
            });
        }
        let (gpa, current) = self.read_virtual(
            paging,
            &name,
            loc.gva,
            site.expected.len(),
            &lifting.ids,
            false,
        )?;
        // The whole function, as the image built it (applied patches taken out): rules 2 and
        // 3 are checked against it for both kinds of site.
        let function_bytes = Some((
            fstart,
            self.read_virtual(paging, &name, fstart, fsize as usize, &lifting.ids, true)?
                .1,
        ));
        // The OS may have rewritten some instructions since loading (crate::rewrites).
        let expected = self.reconciled(paging, &name, site, loc.gva, &current)?;
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
        let near = !self.config.far_jumps
            && plan::rel32_reaches(loc.gva, window.gva)
            && plan::rel32_reaches(loc.gva, window.gva.saturating_add(window.size));
        let jump_len = if near {
            plan::JMP_REL32_LEN
        } else {
            plan::JMP_ABS_LEN
        };
        let analysis = plan::analyze(&input, jump_len).map_err(|e| match e {
            PlanError::ExpectedMismatch {
                site,
                offset,
                expected,
                found,
            } => {
                let at = loc.gva.wrapping_add(offset as u64);
                match self.rewrites.explain(at, &self.target) {
                    Some(what) => PlanError::RewrittenByOs {
                        site,
                        at,
                        expected,
                        found,
                        what,
                    },
                    None => PlanError::ExpectedMismatch {
                        site,
                        offset,
                        expected,
                        found,
                    },
                }
            }
            e => e,
        })?;
        plan::check_extent(&input, &analysis)?;
        // Nothing to check without hidden threads: `preempts_anywhere` is then `None`. With the
        // threads listed, the blackout's scan of their stacks finds a preempted one instead.
        if !self.threads_listed() {
            plan::check_hidden_threads(&analysis, self.preempts_anywhere(paging).as_deref())?;
        }
        let (start, end) = analysis.range();
        if let Some(live) = self.rewrites.live_rewrite(start, end, &self.target) {
            return Err(PlanError::LiveRewrite {
                site: name,
                at: live.at,
                what: live.what,
                start,
                end,
            }
            .into());
        }
        // Rule 5: no overlap with this patch's other sites.
        if let Some(p) = planned
            .sites
            .iter()
            .find(|p| ranges_overlap(analysis.range(), p.plan.analysis.range()))
        {
            return Err(EngineError::SelfOverlap {
                site: name,
                other: p.location.clone(),
            });
        }
        // Arena space: the code (+ the relocated copy for a micropatch), and for a function
        // its escape copy.
        let copy = plan::copy_len(&analysis, window.gva)? as u64;
        let (code_len, escape_len) = match site.kind {
            SiteKind::Function => (site.code.len() as u64, copy),
            SiteKind::Micropatch => (site.code.len() as u64 + copy + 16, 0),
        };
        let code_chunk = reserve(planned, code_len)?;
        let escape_chunk = match escape_len {
            0 => None,
            len => Some(reserve(planned, len)?),
        };
        let code_at = planned.arena.gva(code_chunk);
        let mut code = site.code.clone();
        patch_format::apply_relocations(
            &mut code,
            code_at,
            &site.relocations,
            &planned.data_at,
            |s| self.target.symbol(s),
        )
        .map_err(|source| EngineError::Reloc {
            site: name.clone(),
            source,
        })?;
        let escape_at = escape_chunk.map_or(0, |c| planned.arena.gva(c));
        let plan = plan::build(&analysis, &code, code_at, escape_at)?;
        let arena = &planned.arena;
        for (at, bytes) in &plan.arena {
            let fits = planned.chunks.iter().any(|c| {
                *at >= arena.gva(*c)
                    && at.saturating_add(bytes.len() as u64) <= arena.gva(*c).saturating_add(c.len)
            });
            if !fits {
                return Err(PlanError::Verify {
                    site: name,
                    reason: format!("arena code at {at:#x} overflows its allocation"),
                }
                .into());
            }
        }
        Ok(Prepared {
            function: (site.kind == SiteKind::Function)
                .then(|| (loc.gva, loc.gva.saturating_add(site.expected.len() as u64))),
            gpa: gpa + (analysis.jump_at - loc.gva),
            location: name,
            plan,
        })
    }

    /// The journal record of an apply about to start.
    fn intent(&self, id: &str, patch: &Patch, planned: &Planned, lifting: &Lifting) -> PatchRecord {
        PatchRecord {
            id: id.to_string(),
            name: patch.meta.name.clone(),
            state: PatchState::Applying,
            sites: planned
                .sites
                .iter()
                .map(|p| SiteRecord {
                    location: p.location.clone(),
                    gva: p.plan.analysis.jump_at,
                    gpa: p.gpa,
                    original: p.plan.original.clone(),
                    patched: p.plan.jump.clone(),
                })
                .collect(),
            arena: planned
                .chunks
                .iter()
                .map(|c| ArenaRecord {
                    gpa: planned.arena.gpa(*c),
                    len: c.len,
                })
                .collect(),
            replaces: lifting.records.iter().map(|r| r.id.clone()).collect(),
            applied_at: None,
            reverted_at: None,
            apply_blackout_us: None,
            revert_blackout_us: None,
            moved_vcpus: 0,
            target: Some(self.target.identity_tag()),
            function_sites: planned
                .sites
                .iter()
                .filter(|p| p.function.is_some())
                .count() as u32,
            threads_checked: None,
            note: None,
        }
    }

    /// Writes the new code and the patch's read-only data into the arena. No vCPU can be
    /// running or reading them yet (nothing jumps there until the commit), so this happens
    /// while the guest runs.
    fn stage(
        &self,
        prepared: &[Prepared],
        data: Option<&(u64, Vec<u8>)>,
    ) -> Result<(), EngineError> {
        let window = self.arena.window;
        if let Some((at, bytes)) = data {
            self.guest
                .write_phys(window.gpa + (at - window.gva), bytes)?;
        }
        for p in prepared {
            for (at, bytes) in &p.plan.arena {
                let gpa = window.gpa + (at - window.gva);
                self.guest.write_phys(gpa, bytes)?;
            }
        }
        Ok(())
    }

    /// The blackout of an apply: the jumps go in, replaced patches come out.
    fn commit_apply(
        &mut self,
        record: &PatchRecord,
        prepared: &[Prepared],
        lifting: &Lifting,
    ) -> Result<Committed, EngineError> {
        let window = self.arena.window;
        // A patch replacing several functions switches a vCPU to all of them at once: none of
        // the old ones may be running (past its entry) or on a stack.
        let mut quiesce: Vec<(u64, u64, String)> = Vec::new();
        let mut entries = Vec::new();
        if record.function_sites > 1 {
            for p in prepared {
                if let Some((a, b)) = p.function {
                    quiesce.push((a, b, format!("old {}", p.location)));
                    entries.push(a);
                    entries.push(p.plan.analysis.jump_at);
                }
            }
        }
        for r in &lifting.records {
            quiesce.extend(quiesce_arena(r, &window));
        }
        let restore: Vec<&PatchRecord> = lifting.records.iter().collect();
        self.blackout(&Change {
            write: prepared,
            restore: &restore,
            quiesce,
            entries,
        })
    }

    /// An apply that did not commit. The blackout either wrote nothing or undid what it wrote,
    /// unless it reports [`EngineError::Stranded`]: then the guest may still jump into this
    /// patch's arena code, which therefore stays allocated and intact.
    /// The bytes an apply's staging will overwrite: its chunks, and the part of the ledger
    /// slot the next ledger goes into (with the sequence number it follows).
    fn arena_before(&self, chunks: &[Chunk]) -> Result<ArenaBefore, EngineError> {
        let mut saved = Vec::with_capacity(chunks.len() + 1);
        for c in chunks {
            let gpa = self.arena.gpa(*c);
            let mut b = vec![0u8; c.len as usize];
            self.guest.read_phys(gpa, &mut b)?;
            saved.push((gpa, b));
        }
        let next = self.current_ledger();
        if let Ok(bytes) = next.encode(self.ledger.slot) {
            let gpa =
                self.arena.window.gpa + self.ledger.offset + (next.seq % 2) * self.ledger.slot;
            let mut b = vec![0u8; bytes.len()];
            self.guest.read_phys(gpa, &mut b)?;
            saved.push((gpa, b));
        }
        Ok(ArenaBefore {
            saved,
            ledger_seq: self.ledger_seq,
        })
    }

    /// A refused apply: its chunks are given back, and the arena gets back what staging
    /// overwrote (`before`). When that cannot be done the chunks are zeroed and the ledger
    /// rewritten for the state now, as a crash would leave them to recovery. A patch the guest
    /// may still reach (`Stranded`) keeps its code.
    fn abandon(
        &mut self,
        record: &mut PatchRecord,
        chunks: &[Chunk],
        e: &EngineError,
        before: Option<&ArenaBefore>,
    ) -> Result<(), EngineError> {
        if matches!(e, EngineError::Stranded { .. }) {
            warn!(patch = %record.id, "keeping the arena code of a patch the guest may still reach");
            self.update_ledger();
        } else {
            let put_back = before.is_some_and(|b| {
                b.saved
                    .iter()
                    .all(|(gpa, bytes)| self.guest.write_phys(*gpa, bytes).is_ok())
            });
            for c in chunks {
                // Nothing was staged without `before`: nothing to take back.
                if before.is_some() && !put_back {
                    let _ = self
                        .guest
                        .write_phys(self.arena.gpa(*c), &vec![0u8; c.len as usize]);
                }
                self.arena.release(*c);
            }
            match before {
                Some(b) if put_back => self.ledger_seq = b.ledger_seq,
                Some(_) => self.update_ledger(),
                None => {}
            }
        }
        record.state = PatchState::Failed;
        record.note = Some(e.to_string());
        self.put(record.clone())
    }

    fn record_applied(
        &mut self,
        mut record: PatchRecord,
        lifting: Lifting,
        committed: Committed,
        t0: Instant,
    ) -> Result<ApplyOutcome, EngineError> {
        let blackout_us = committed.blackout.as_micros() as u64;
        record.state = PatchState::Applied;
        record.applied_at = Some(now_secs());
        record.apply_blackout_us = Some(blackout_us);
        record.moved_vcpus = committed.moved;
        record.threads_checked = committed.threads;
        self.put(record.clone())?;
        let replaced: Vec<String> = lifting.records.iter().map(|r| r.id.clone()).collect();
        for mut old in lifting.records {
            old.state = PatchState::Reverted;
            old.reverted_at = Some(now_secs());
            old.revert_blackout_us = Some(blackout_us);
            old.note = Some(format!("replaced by {}", record.id));
            self.retire_arena(&old);
            self.put(old)?;
        }
        self.applies += 1;
        self.moved += u64::from(committed.moved);
        self.apply_blackouts.push(blackout_us);
        let engine_us = committed.engine.as_micros() as u64;
        self.apply_engine.push(engine_us);
        self.last_engine_us = Some(engine_us);
        self.last_phases = Some(committed.phases);
        self.apply_phases.push(committed.phases);
        let total_us = t0.elapsed().as_micros() as u64;
        self.apply_totals.push(total_us);
        info!(patch = %record.id, name = %record.name, sites = record.sites.len(), blackout_us, attempts = committed.attempts, moved_vcpus = committed.moved, total_us, "patch applied");
        Ok(ApplyOutcome {
            patch: record,
            already_applied: false,
            replaced,
            attempts: committed.attempts,
            total_us,
        })
    }

    /// A reverted patch's arena code and data wait in quarantine, as one group, until no vCPU
    /// can be running or returning into any of them.
    fn retire_arena(&mut self, r: &PatchRecord) {
        let gpa0 = self.arena.window.gpa;
        self.arena.retire_group(r.arena.iter().map(|a| Chunk {
            offset: a.gpa.wrapping_sub(gpa0),
            len: a.len,
        }));
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
        if let Some(why) = self.unvouched.get(&rec.id) {
            return Err(EngineError::Unvouched {
                id: rec.id,
                why: why.clone(),
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
        let committed = match out {
            Ok(c) => c,
            Err(e) => {
                // Not written, or written and undone: the patch is still in. A stranded revert
                // (undo failed too) leaves a site of unknown state: say so rather than claim
                // either.
                r.state = PatchState::Applied;
                if matches!(e, EngineError::Stranded { .. }) {
                    r.note = Some(e.to_string());
                }
                self.put(r)?;
                return Err(e);
            }
        };
        let blackout_us = committed.blackout.as_micros() as u64;
        r.state = PatchState::Reverted;
        r.reverted_at = Some(now_secs());
        r.revert_blackout_us = Some(blackout_us);
        self.put(r.clone())?;
        self.retire_arena(&rec);
        self.update_ledger();
        self.reverts += 1;
        self.revert_blackouts.push(blackout_us);
        let engine_us = committed.engine.as_micros() as u64;
        self.revert_engine.push(engine_us);
        self.last_engine_us = Some(engine_us);
        self.last_phases = Some(committed.phases);
        info!(patch = %r.id, blackout_us, "patch reverted");
        Ok(r)
    }
}

/// Takes `len` bytes from the scratch arena for the patch being planned.
fn reserve(planned: &mut Planned, len: u64) -> Result<Chunk, EngineError> {
    let c = planned.arena.alloc(len).ok_or(EngineError::ArenaFull {
        needed: len,
        free: planned.arena.free_bytes(),
        quarantined: planned.arena.quarantined_bytes(),
    })?;
    planned.chunks.push(c);
    Ok(c)
}

/// Places the patch's read-only data blocks in one chunk of the scratch arena, each at a
/// guest-virtual address aligned as it asks, and fills in [`Planned::data`] and
/// [`Planned::data_at`]. The chunk is written whole (the blocks, zeroes between them), so every
/// byte of it is the signed patch's or the engine's own. Nothing for a patch without data.
fn plan_data(patch: &Patch, planned: &mut Planned) -> Result<(), EngineError> {
    if patch.data.is_empty() {
        return Ok(());
    }
    // Offsets from a base aligned to the largest alignment asked for; the chunk gets the slack
    // to reach such a base wherever it starts.
    let max_align = patch
        .data
        .iter()
        .map(|d| u64::from(d.align))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut offsets = Vec::with_capacity(patch.data.len());
    let mut len: u64 = 0;
    for d in &patch.data {
        let at = len.next_multiple_of(u64::from(d.align).max(1));
        offsets.push(at);
        len = at + d.bytes.len() as u64;
    }
    let slack = max_align - 1;
    let chunk = reserve(planned, len + slack)?;
    let chunk_at = planned.arena.gva(chunk);
    let overflow = || EngineError::DataPlacement {
        reason: format!("the data chunk at {chunk_at:#x} cannot be aligned to {max_align}"),
    };
    let base = chunk_at
        .checked_next_multiple_of(max_align)
        .ok_or_else(overflow)?;
    let mut bytes = vec![0u8; chunk.len as usize];
    for (d, off) in patch.data.iter().zip(&offsets) {
        let start = (base - chunk_at + off) as usize;
        let Some(dst) = bytes.get_mut(start..start + d.bytes.len()) else {
            return Err(EngineError::DataPlacement {
                reason: format!("data block at {:#x} overflows its allocation", base + off),
            });
        };
        dst.copy_from_slice(&d.bytes);
        planned.data_at.push(base + off);
    }
    tracing::debug!(
        blocks = patch.data.len(),
        bytes = len,
        gva = chunk_at,
        chunk_len = chunk.len,
        "placed the patch's read-only data in the arena"
    );
    planned.data = Some((chunk_at, bytes));
    Ok(())
}
