//! The arena's ledger: the arena describes itself, in guest memory (docs/patch-engine.md,
//! "The arena ledger").
//!
//! The journal lives in a state dir, which can be lost, or be another one (a second operator, a
//! fresh `--state-dir`). The guest's arena outlives both. So the engine keeps, at the end of the
//! arena, a ledger of every chunk that is not free (whose patch, live or waiting in quarantine)
//! and of every site it placed a jump at. Any engine that attaches reads it: it never allocates
//! over a chunk the ledger claims, and it lists the patches the ledger names that its journal
//! does not know, after checking each claimed site really holds one of its jumps into that
//! patch's code.
//!
//! The guest can write there, so the ledger is only ever a claim to verify: a checksum, then
//! the jumps at the sites; it is never a source of bytes to write (taking such a patch out needs
//! its signed file again, which then vouches for the bytes, see `crate::vouch`).
//!
//! Two slots, written alternately with a sequence number, so a crash while writing one leaves
//! the other: `[magic 8][version u16][_ u16][seq u64][owner 16][np u16][nc u16][ns u16][_ u16]`,
//! then `np` patch ids (32 bytes), `nc` chunks `{patch u16, quarantined u8, _ u8, offset u32,
//! len u32}`, `ns` sites `{patch u16, len u16, _ u32, gva u64}`, then SHA-256 of all that.

use std::collections::BTreeMap;
use std::time::Instant;

use sha2::{Digest, Sha256};
use tracing::warn;

use crate::arena::Chunk;
use crate::journal::{ArenaRecord, PatchRecord, PatchState, SiteRecord};
use crate::{ApplyOutcome, Engine, EngineError, GuestControl, plan};

const MAGIC: &[u8; 8] = b"HPLEDGER";
const VERSION: u16 = 1;
const HEAD: usize = 8 + 2 + 2 + 8 + 16 + 8;
const ID: usize = 32;
const CHUNK: usize = 12;
const SITE: usize = 16;
const SUM: usize = 32;
/// One slot's size in a 2 MiB arena (the two take 3% of it).
const MAX_SLOT: u64 = 32 << 10;

/// Where the ledger's two slots are: the end of the arena window, `slot` bytes each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of the first slot in the arena.
    pub offset: u64,
    pub slot: u64,
}

impl Layout {
    /// The ledger for an arena of `size` bytes: two slots of an eighth of it each, at most
    /// 32 KiB, at its end (chunk offsets start at 0 as without it).
    pub fn for_arena(size: u64) -> Layout {
        let slot = (size / 8).min(MAX_SLOT) & !15;
        Layout {
            offset: size - 2 * slot,
            slot,
        }
    }
    /// The whole ledger, as arena offsets.
    pub fn chunk(&self) -> Chunk {
        Chunk {
            offset: self.offset,
            len: 2 * self.slot,
        }
    }
}

/// A chunk the ledger claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub patch: [u8; 32],
    pub chunk: Chunk,
    pub quarantined: bool,
}

/// A site the ledger says holds a jump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SiteClaim {
    pub patch: [u8; 32],
    pub gva: u64,
    pub len: u16,
}

/// What a ledger says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    pub seq: u64,
    /// Who wrote it: a hash of the writer's state dir (zero without one).
    pub owner: [u8; 16],
    pub chunks: Vec<Claim>,
    pub sites: Vec<SiteClaim>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the arena ledger has no room for this patch ({needed} bytes needed, {room} per slot); revert patches you no longer need"
)]
pub struct LedgerFull {
    pub needed: usize,
    pub room: usize,
}

impl Ledger {
    /// The slot's bytes (at most `slot` of them; what follows in the slot is not read).
    pub fn encode(&self, slot: u64) -> Result<Vec<u8>, LedgerFull> {
        let mut ids: Vec<[u8; 32]> = Vec::new();
        let mut index = |id: &[u8; 32]| -> u16 {
            match ids.iter().position(|i| i == id) {
                Some(p) => p as u16,
                None => {
                    ids.push(*id);
                    (ids.len() - 1) as u16
                }
            }
        };
        let chunks: Vec<(u16, &Claim)> = self.chunks.iter().map(|c| (index(&c.patch), c)).collect();
        let sites: Vec<(u16, &SiteClaim)> =
            self.sites.iter().map(|s| (index(&s.patch), s)).collect();
        let needed = HEAD + ids.len() * ID + chunks.len() * CHUNK + sites.len() * SITE + SUM;
        let room = slot as usize;
        if needed > room
            || ids.len() > usize::from(u16::MAX)
            || chunks.len() > usize::from(u16::MAX)
            || sites.len() > usize::from(u16::MAX)
        {
            return Err(LedgerFull { needed, room });
        }
        let mut b = Vec::with_capacity(room);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&VERSION.to_le_bytes());
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&self.seq.to_le_bytes());
        b.extend_from_slice(&self.owner);
        for n in [ids.len(), chunks.len(), sites.len(), 0] {
            b.extend_from_slice(&(n as u16).to_le_bytes());
        }
        for id in &ids {
            b.extend_from_slice(id);
        }
        for (p, c) in chunks {
            b.extend_from_slice(&p.to_le_bytes());
            b.push(u8::from(c.quarantined));
            b.push(0);
            b.extend_from_slice(&(c.chunk.offset as u32).to_le_bytes());
            b.extend_from_slice(&(c.chunk.len as u32).to_le_bytes());
        }
        for (p, s) in sites {
            b.extend_from_slice(&p.to_le_bytes());
            b.extend_from_slice(&s.len.to_le_bytes());
            b.extend_from_slice(&[0; 4]);
            b.extend_from_slice(&s.gva.to_le_bytes());
        }
        let sum = Sha256::digest(&b);
        b.extend_from_slice(&sum);
        Ok(b)
    }

    /// A slot's ledger, or `None` when it holds none (never written, torn, or scribbled on).
    /// Chunks must lie inside `[0, limit)`.
    pub fn decode(bytes: &[u8], limit: u64) -> Option<Ledger> {
        let u16_at = |o: usize| -> Option<u16> {
            Some(u16::from_le_bytes(bytes.get(o..o + 2)?.try_into().ok()?))
        };
        let u32_at = |o: usize| -> Option<u32> {
            Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?))
        };
        let u64_at = |o: usize| -> Option<u64> {
            Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?))
        };
        if bytes.get(..8)? != MAGIC || u16_at(8)? != VERSION {
            return None;
        }
        let seq = u64_at(12)?;
        let owner: [u8; 16] = bytes.get(20..36)?.try_into().ok()?;
        let (np, nc, ns) = (
            usize::from(u16_at(36)?),
            usize::from(u16_at(38)?),
            usize::from(u16_at(40)?),
        );
        let body = HEAD + np * ID + nc * CHUNK + ns * SITE;
        let sum = bytes.get(body..body + SUM)?;
        if Sha256::digest(bytes.get(..body)?).as_slice() != sum {
            return None;
        }
        let ids: Vec<[u8; 32]> = (0..np)
            .map(|i| {
                bytes
                    .get(HEAD + i * ID..HEAD + (i + 1) * ID)
                    .and_then(|b| b.try_into().ok())
            })
            .collect::<Option<_>>()?;
        let id = |i: u16| ids.get(usize::from(i)).copied();
        let mut at = HEAD + np * ID;
        let mut chunks = Vec::with_capacity(nc);
        for _ in 0..nc {
            let chunk = Chunk {
                offset: u64::from(u32_at(at + 4)?),
                len: u64::from(u32_at(at + 8)?),
            };
            if chunk.len == 0 || chunk.end() > limit {
                return None;
            }
            chunks.push(Claim {
                patch: id(u16_at(at)?)?,
                quarantined: *bytes.get(at + 2)? != 0,
                chunk,
            });
            at += CHUNK;
        }
        let mut sites = Vec::with_capacity(ns);
        for _ in 0..ns {
            sites.push(SiteClaim {
                patch: id(u16_at(at)?)?,
                len: u16_at(at + 2)?,
                gva: u64_at(at + 8)?,
            });
            at += SITE;
        }
        Some(Ledger {
            seq,
            owner,
            chunks,
            sites,
        })
    }

    /// How many bytes the ledger starting with `head` (its first [`HEAD`] bytes) takes, so a
    /// reader fetches only those; `None` when `head` is not a ledger's.
    pub fn len_from_head(head: &[u8]) -> Option<usize> {
        if head.get(..8)? != MAGIC {
            return None;
        }
        let n = |o: usize| -> Option<usize> {
            Some(usize::from(u16::from_le_bytes(
                head.get(o..o + 2)?.try_into().ok()?,
            )))
        };
        Some(HEAD + n(36)? * ID + n(38)? * CHUNK + n(40)? * SITE + SUM)
    }

    /// The newer of two slots' ledgers.
    pub fn newest(a: Option<Ledger>, b: Option<Ledger>) -> Option<Ledger> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The ledger in the guest's arena at guest-physical `gpa` (`size` bytes), read without an
/// engine: for a read-only `list`. Its claims are not verified here.
pub fn read_from<G: GuestControl + ?Sized>(guest: &G, gpa: u64, size: u64) -> Option<Ledger> {
    let layout = Layout::for_arena(size);
    let slot = |i: u64| {
        let at = gpa + layout.offset + i * layout.slot;
        let mut head = [0u8; HEAD];
        guest.read_phys(at, &mut head).ok()?;
        let len = Ledger::len_from_head(&head)?;
        if len > layout.slot as usize {
            return None;
        }
        let mut b = vec![0u8; len];
        guest.read_phys(at, &mut b).ok()?;
        Ledger::decode(&b, layout.offset)
    };
    Ledger::newest(slot(0), slot(1))
}

/// The patches `l` names that `records` does not hold as applied, as records for a listing
/// (sites by address, bytes unknown), marked as the ledger's unverified claims.
pub fn unjournaled(l: &Ledger, records: &[PatchRecord], gpa: u64) -> Vec<PatchRecord> {
    let mut ids: Vec<[u8; 32]> = l
        .chunks
        .iter()
        .map(|c| c.patch)
        .filter(|p| *p != [0; 32])
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids.into_iter()
        .map(hex::encode)
        .filter(|id| !records.iter().any(|r| &r.id == id && r.state == PatchState::Applied))
        .map(|id| {
            let pid = id_bytes(&id);
            let sites = l
                .sites
                .iter()
                .filter(|s| s.patch == pid)
                .map(|s| SiteRecord {
                    location: format!("{:#x}", s.gva),
                    gva: s.gva,
                    gpa: 0,
                    original: Vec::new(),
                    patched: Vec::new(),
                })
                .collect();
            let arena = l
                .chunks
                .iter()
                .filter(|c| c.patch == pid)
                .map(|c| ArenaRecord {
                    gpa: gpa + c.chunk.offset,
                    len: c.chunk.len,
                })
                .collect();
            ledger_record(
                id,
                sites,
                arena,
                None,
                format!(
                    "claimed by the guest's arena ledger, not by this journal (not verified by list; apply or revert checks the jumps): {GUEST_ONLY}"
                ),
            )
        })
        .collect()
}

/// The record of a patch known only from the guest's ledger: applied there, nothing else known.
fn ledger_record(
    id: String,
    sites: Vec<SiteRecord>,
    arena: Vec<ArenaRecord>,
    target: Option<String>,
    note: String,
) -> PatchRecord {
    PatchRecord {
        id,
        name: "(named only by the guest's arena ledger)".into(),
        state: PatchState::Applied,
        sites,
        arena,
        replaces: Vec::new(),
        applied_at: None,
        reverted_at: None,
        apply_blackout_us: None,
        revert_blackout_us: None,
        moved_vcpus: 0,
        function_sites: 0,
        target,
        threads_checked: None,
        note: Some(note),
    }
}

/// Why a patch the ledger names cannot be taken out by this engine until its file is given.
const GUEST_ONLY: &str = "it is known only from the guest's arena ledger (applied through another state dir, or this one's journal was lost), so nothing vouches for its original bytes; apply its signed file again to adopt it";

fn id_bytes(id: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    if let Ok(b) = hex::decode(id)
        && b.len() == 32
    {
        out.copy_from_slice(&b);
    }
    out
}

/// `ranges` minus `minus` (both in arena offsets).
fn subtract(ranges: &[Chunk], minus: &[Chunk]) -> Vec<Chunk> {
    let mut cut: Vec<Chunk> = minus.to_vec();
    cut.sort_by_key(|c| c.offset);
    let mut out = Vec::new();
    for r in ranges {
        let mut at = r.offset;
        for c in cut
            .iter()
            .filter(|c| c.offset < r.end() && c.end() > r.offset)
        {
            if c.offset > at {
                out.push(Chunk {
                    offset: at,
                    len: c.offset - at,
                });
            }
            at = at.max(c.end());
        }
        if at < r.end() {
            out.push(Chunk {
                offset: at,
                len: r.end() - at,
            });
        }
    }
    out
}

impl<G: GuestControl> Engine<G> {
    /// The ledger this engine's state says: every chunk not free (whose, where known) and every
    /// site of the applied (or being applied) patches.
    pub(crate) fn current_ledger(&self) -> Ledger {
        let window = self.arena.window;
        let live = |r: &&PatchRecord| matches!(r.state, PatchState::Applied | PatchState::Applying);
        let mut chunks = Vec::new();
        let mut known = vec![self.ledger.chunk()];
        for r in self.records.iter().filter(live) {
            for a in &r.arena {
                let chunk = Chunk {
                    offset: a.gpa.wrapping_sub(window.gpa),
                    len: a.len,
                };
                known.push(chunk);
                chunks.push(Claim {
                    patch: id_bytes(&r.id),
                    chunk,
                    quarantined: false,
                });
            }
        }
        for q in self.arena.quarantine() {
            known.push(*q);
            chunks.push(Claim {
                patch: [0; 32],
                chunk: *q,
                quarantined: true,
            });
        }
        // Whatever else is in use (code a failed undo left reachable): claimed, owner unknown.
        for c in subtract(&self.arena.in_use(), &known) {
            chunks.push(Claim {
                patch: [0; 32],
                chunk: c,
                quarantined: false,
            });
        }
        let sites = self
            .records
            .iter()
            .filter(live)
            .flat_map(|r| {
                r.sites.iter().map(|s| SiteClaim {
                    patch: id_bytes(&r.id),
                    gva: s.gva,
                    len: s.patched.len().min(usize::from(u16::MAX)) as u16,
                })
            })
            .collect();
        Ledger {
            seq: self.ledger_seq.wrapping_add(1),
            owner: self.owner,
            chunks,
            sites,
        }
    }

    /// Writes the ledger into the slot after the last one written.
    pub(crate) fn write_ledger(&mut self) -> Result<(), EngineError> {
        let l = self.current_ledger();
        let bytes = l
            .encode(self.ledger.slot)
            .map_err(EngineError::LedgerFull)?;
        let slot = l.seq % 2;
        let gpa = self.arena.window.gpa + self.ledger.offset + slot * self.ledger.slot;
        self.guest.write_phys(gpa, &bytes)?;
        self.ledger_seq = l.seq;
        Ok(())
    }

    /// [`Engine::write_ledger`] after a change that already happened: a failure only costs
    /// the next attach the claims (the journal still has them), so it is logged.
    pub(crate) fn update_ledger(&mut self) {
        if let Err(e) = self.write_ledger() {
            warn!(error = %e, "could not update the arena ledger in guest memory");
        }
    }

    /// The ledger the guest holds, if either slot holds a valid one.
    fn read_ledger(&self) -> Option<Ledger> {
        let window = self.arena.window;
        read_from(&*self.guest, window.gpa, window.size)
    }

    /// Takes in what the guest's ledger claims: its chunks are never allocated over, and the
    /// patches it names that the journal does not hold as applied are listed when every one of
    /// their sites holds a jump of this engine's form into their code (else their chunks wait
    /// in quarantine). Called once, after recovery.
    pub(crate) fn attach_ledger(&mut self) -> Result<(), EngineError> {
        let Some(l) = self.read_ledger() else {
            return Ok(());
        };
        self.ledger_seq = l.seq;
        let window = self.arena.window;
        let mut named: BTreeMap<[u8; 32], (Vec<Chunk>, Vec<SiteClaim>)> = BTreeMap::new();
        // The ledger does not say which quarantined chunks belonged together (a patch's code
        // and data): they wait as one group, freed only when none of them is busy.
        let mut quarantined = Vec::new();
        for c in &l.chunks {
            if c.patch == [0; 32] || c.quarantined {
                if self.arena.reserve(c.chunk) && c.quarantined {
                    quarantined.push(c.chunk);
                }
                continue;
            }
            named.entry(c.patch).or_default().0.push(c.chunk);
        }
        self.arena.retire_group(quarantined);
        for s in &l.sites {
            named.entry(s.patch).or_default().1.push(*s);
        }
        let mut changed = false;
        for (pid, (chunks, sites)) in named {
            let id = hex::encode(pid);
            if self
                .records
                .iter()
                .any(|r| r.id == id && r.state == PatchState::Applied)
            {
                continue;
            }
            changed = true;
            let mut found = Vec::with_capacity(sites.len());
            for s in &sites {
                match self.claimed_jump(s, &chunks) {
                    Some(site) => found.push(site),
                    None => break,
                }
            }
            if sites.is_empty() || found.len() != sites.len() {
                // Not (or no longer) patched in: its code and data wait until no vCPU can
                // use them.
                let free: Vec<Chunk> = chunks
                    .iter()
                    .copied()
                    .filter(|c| self.arena.reserve(*c))
                    .collect();
                self.arena.retire_group(free);
                continue;
            }
            for c in &chunks {
                self.arena.pin(*c);
            }
            if self.records.iter().any(|r| r.id == id) {
                // The journal holds it in another state (failed, for another build...): its
                // word stands; the chunks the guest still jumps into stay reserved.
                warn!(patch = %id, "the arena ledger says a patch is live that the journal does not hold as applied; its arena code is kept");
                continue;
            }
            warn!(patch = %id, sites = found.len(), "the arena ledger names a patch this journal does not hold as applied; listing it from the guest");
            let rec = ledger_record(
                id.clone(),
                found,
                chunks
                    .iter()
                    .map(|c| ArenaRecord {
                        gpa: window.gpa + c.offset,
                        len: c.len,
                    })
                    .collect(),
                Some(self.target.identity_tag()),
                format!("in the guest; this VMM will not revert it: {GUEST_ONLY}"),
            );
            self.unvouched.insert(id.clone(), GUEST_ONLY.into());
            // Known to the guest only: listed, not journaled (the journal holds what this VMM
            // did or can vouch for).
            self.records.push(rec);
        }
        // Nothing is written here: what was read is kept in this engine's state (reserved and
        // quarantined chunks, listed patches), so its next ledger carries the claims on.
        let _ = changed;
        Ok(())
    }

    /// The site a ledger claims, when the guest holds there a jump of this engine's form into
    /// one of the claiming patch's chunks.
    fn claimed_jump(&mut self, s: &SiteClaim, chunks: &[Chunk]) -> Option<SiteRecord> {
        let window = self.arena.window;
        let len = usize::from(s.len);
        if len < plan::JMP_REL32_LEN {
            return None;
        }
        let paging = self.paging().ok()?;
        let name = format!("{:#x}", s.gva);
        let gpa = self.gpa_of(&paging, &name, s.gva, len).ok()?;
        let bytes = self.read(gpa, len).ok()?;
        let to = plan::jump_target(s.gva, &bytes)?;
        chunks
            .iter()
            .any(|c| {
                let start = window.gva.wrapping_add(c.offset);
                to >= start && to - start < c.len
            })
            .then(|| SiteRecord {
                location: name,
                gva: s.gva,
                gpa,
                original: Vec::new(),
                patched: bytes,
            })
    }

    /// Takes over a patch that is in the guest but whose record nothing vouches for (named
    /// only by the ledger, or its kept file lost), from its signed file given again: the record
    /// is completed from the file (site names, original bytes as the patch expects them),
    /// checked against it like any record read back (`crate::vouch`), journaled with the file
    /// kept beside it, and from then on it can be reverted or replaced.
    pub(crate) fn adopt(
        &mut self,
        parsed: &patch_format::ParsedPatch,
        file: &[u8],
        t0: Instant,
    ) -> Result<ApplyOutcome, EngineError> {
        let id = parsed.id.to_string();
        let rec = self.find(&id)?.clone();
        let unvouched = |why: String| EngineError::Unvouched {
            id: id.clone(),
            why,
        };
        let mut full = rec.clone();
        let paging = self.paging()?;
        for s in full
            .sites
            .iter_mut()
            .filter(|s| s.original.len() != s.patched.len())
        {
            let len = s.patched.len();
            let found = parsed.patch.sites.iter().find_map(|site| {
                let name = site.target.to_string();
                let loc = self.target.resolve(&name, &site.target).ok()?;
                let off = usize::try_from(s.gva.checked_sub(loc.gva)?).ok()?;
                (off.checked_add(len)? <= site.expected.len()).then_some((site, name, loc.gva, off))
            });
            let Some((site, name, at, off)) = found else {
                return Err(unvouched(format!(
                    "the guest's jump at {:#x} is not at a site of this patch",
                    s.gva
                )));
            };
            let (_, mut current) = self.read_virtual(
                &paging,
                &name,
                at,
                site.expected.len(),
                &std::collections::HashSet::new(),
                false,
            )?;
            current[off..off + len].copy_from_slice(&site.expected[off..off + len]);
            let expected = self.reconciled(&paging, &name, site, at, &current)?;
            s.original = expected[off..off + len].to_vec();
            s.location = name;
        }
        full.name = parsed.patch.meta.name.clone();
        full.target = Some(self.target.identity_tag());
        full.function_sites = parsed
            .patch
            .sites
            .iter()
            .filter(|s| s.kind == patch_format::SiteKind::Function)
            .count() as u32;
        full.note = Some("adopted: its signed file, given again, vouches for the record".into());
        self.vouch_with(&full, file).map_err(unvouched)?;
        if let Some(j) = &mut self.journal {
            j.keep_patch(&id, file)?;
        }
        self.put(full.clone())?;
        self.unvouched.remove(&id);
        self.update_ledger();
        tracing::info!(patch = %id, "a patch in the guest was adopted from its signed file");
        Ok(ApplyOutcome {
            patch: full,
            already_applied: true,
            replaced: Vec::new(),
            attempts: 0,
            total_us: t0.elapsed().as_micros() as u64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ledger {
        Ledger {
            seq: 7,
            owner: [3; 16],
            chunks: vec![
                Claim {
                    patch: [1; 32],
                    chunk: Chunk { offset: 0, len: 48 },
                    quarantined: false,
                },
                Claim {
                    patch: [2; 32],
                    chunk: Chunk {
                        offset: 64,
                        len: 16,
                    },
                    quarantined: true,
                },
            ],
            sites: vec![SiteClaim {
                patch: [1; 32],
                gva: 0xffff_ffff_8141_1e35,
                len: 7,
            }],
        }
    }

    #[test]
    fn a_ledger_reads_back_and_damage_is_not_believed() {
        let l = sample();
        let mut b = l.encode(4096).unwrap();
        b.resize(4096, 0xaa);
        assert_eq!(Ledger::decode(&b, 0x1000), Some(l.clone()));
        // Any flipped byte of the body or the sum: no ledger.
        for i in [
            0,
            9,
            14,
            30,
            37,
            50,
            HEAD + 2 * ID + 5,
            HEAD + 2 * ID + 2 * CHUNK + SITE + 3,
        ] {
            let mut d = b.clone();
            d[i] ^= 1;
            assert_eq!(Ledger::decode(&d, 0x1000), None, "byte {i}");
        }
        // Chunks outside the arena are not believed either.
        assert_eq!(Ledger::decode(&b, 64), None);
        assert_eq!(Ledger::decode(&[0u8; 4096], 0x1000), None);
        assert_eq!(Ledger::decode(&b[..20], 0x1000), None);
        // Too much for the slot: refused, not truncated.
        assert!(l.encode(64).is_err());
    }

    #[test]
    fn the_newer_slot_wins() {
        let mut old = sample();
        old.seq = 3;
        let new = sample();
        assert_eq!(
            Ledger::newest(Some(old.clone()), Some(new.clone())),
            Some(new.clone())
        );
        assert_eq!(
            Ledger::newest(Some(new.clone()), Some(old.clone())),
            Some(new.clone())
        );
        assert_eq!(Ledger::newest(None, Some(old.clone())), Some(old));
        assert_eq!(Ledger::newest(None, None), None);
    }

    #[test]
    fn the_ledger_sits_at_the_end_of_the_arena() {
        let l = Layout::for_arena(2 << 20);
        assert_eq!((l.offset, l.slot), ((2 << 20) - (64 << 10), 32 << 10));
        let small = Layout::for_arena(0x10000);
        assert_eq!(small.chunk().end(), 0x10000);
    }
}
