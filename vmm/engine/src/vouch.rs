//! Who vouches for the bytes a later run writes back (docs/patch-engine.md, "Who vouches for
//! every byte").
//!
//! A patch applied in this run is vouched for by construction: its original bytes were read
//! from the guest and matched against the signed patch's expected bytes before anything was
//! written. A record read back from the journal is only a claim: the state dir is this user's,
//! but a file is not a signature. So before recovery restores a half-written patch, and before a
//! revert or replacement of a patch applied by an earlier run, the record is checked against
//! the signed file kept beside the journal: it must still pass the signature check with today's
//! trusted keys, be the same patch for this build, and for every recorded site
//!
//! - name a site of that patch, inside the bytes the patch expects there;
//! - be where the guest's page tables put that site now (the recorded guest-physical address
//!   is never trusted on its own);
//! - hold as original bytes exactly the patch's expected bytes (with the OS's known rewrites of
//!   its own text, as rule 1 accepts them);
//! - hold as patched bytes a jump this engine writes, into one of the record's arena chunks.
//!
//! Only then may its original bytes be written, and only where the guest holds that jump.

use std::collections::HashSet;

use patch_format::Patch;

use crate::journal::{PatchRecord, SiteRecord};
use crate::{Engine, GuestControl, PagingRegs, overlay_originals, plan};

impl<G: GuestControl> Engine<G> {
    /// `Ok` when the signed patch kept beside the journal vouches for every byte recovery or a
    /// revert would write from `r`; otherwise why not, in words for the operator.
    pub(crate) fn vouch(&mut self, r: &PatchRecord) -> Result<(), String> {
        let Some(journal) = &self.journal else {
            return Err("there is no state dir to keep its signed patch file in".into());
        };
        let path = journal.kept_patch_path(&r.id);
        let file = journal
            .kept_patch(&r.id)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "its signed patch file, kept at {}, is missing",
                    path.display()
                )
            })?;
        self.vouch_with(r, &file)
            .map_err(|why| why.replace("PATCH_FILE", &path.display().to_string()))
    }

    /// [`Engine::vouch`] with the signed file in hand (`PATCH_FILE` in the reason names it).
    pub(crate) fn vouch_with(&mut self, r: &PatchRecord, file: &[u8]) -> Result<(), String> {
        let path = "PATCH_FILE";
        let checked = self
            .verifier()
            .check(file)
            .map_err(|e| format!("its signed patch file, kept at {path}, is refused now ({e})"))?;
        let parsed = checked.parsed;
        if parsed.id.to_string() != r.id {
            return Err(format!(
                "the file kept at {path} is patch {}, not this one",
                parsed.id
            ));
        }
        self.target
            .check_identity(&parsed.patch.target)
            .map_err(|e| format!("its signed patch file does not fit this guest ({e})"))?;
        if r.sites.is_empty() {
            return Err("the record names no site".into());
        }
        let paging = self
            .paging()
            .map_err(|e| format!("the guest's page tables cannot be read ({e})"))?;
        for s in &r.sites {
            self.vouch_site(r, s, &parsed.patch, &paging)
                .map_err(|why| format!("recorded site {}: {why}", s.location))?;
        }
        Ok(())
    }

    fn vouch_site(
        &self,
        r: &PatchRecord,
        s: &SiteRecord,
        patch: &Patch,
        paging: &PagingRegs,
    ) -> Result<(), String> {
        let site = patch
            .sites
            .iter()
            .find(|p| p.target.to_string() == s.location)
            .ok_or("it is not a site of the signed patch")?;
        let loc = self
            .target
            .resolve(&s.location, &site.target)
            .map_err(|e| e.to_string())?;
        let len = s.original.len();
        if len == 0 || len != s.patched.len() {
            return Err("its original and patched bytes are not a replacement of one range".into());
        }
        let off = s
            .gva
            .checked_sub(loc.gva)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|o| o.checked_add(len).is_some_and(|e| e <= site.expected.len()))
            .ok_or("it lies outside the bytes the signed patch expects there")?;
        // The guest as it is, with only this record's own bytes taken out: what a restore
        // would leave there.
        let (gpa, mut current) = self
            .read_virtual(
                paging,
                &s.location,
                loc.gva,
                site.expected.len(),
                &HashSet::new(),
                false,
            )
            .map_err(|e| e.to_string())?;
        if gpa.checked_add(off as u64) != Some(s.gpa) {
            return Err(format!(
                "it names guest-physical {:#x}, but the guest's page tables put it at {:#x}",
                s.gpa,
                gpa.wrapping_add(off as u64)
            ));
        }
        overlay_originals(&mut current, loc.gva, r.sites.iter());
        let expected = self
            .reconciled(paging, &s.location, site, loc.gva, &current)
            .map_err(|e| {
                format!("its original bytes are not what the signed patch expects ({e})")
            })?;
        if expected[off..off + len] != s.original[..] {
            return Err(
                "its original bytes are not the ones the signed patch expects there".into(),
            );
        }
        let to = plan::jump_target(s.gva, &s.patched)
            .ok_or("its patched bytes are not a jump this engine writes")?;
        let window = self.arena.window;
        let in_chunk = r.arena.iter().any(|a| {
            let Some(off) = a.gpa.checked_sub(window.gpa) else {
                return false;
            };
            let fits = off.checked_add(a.len).is_some_and(|e| e <= window.size);
            let start = window.gva.wrapping_add(off);
            fits && to >= start && to - start < a.len
        });
        if !in_chunk {
            return Err(format!(
                "its jump goes to {to:#x}, which is not in the patch's recorded arena code"
            ));
        }
        Ok(())
    }
}
