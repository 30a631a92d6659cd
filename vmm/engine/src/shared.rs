//! One engine serving many requests: the patch list, metrics and lookups answer while a
//! (large) patch is being planned; only the writing of an apply or revert excludes them.
//!
//! Changes (apply, revert) are serialised by their own lock, held from planning to commit, so
//! a plan can never go stale between the two; planning itself holds only a read lock. The
//! engine still refuses a stale plan ([`EngineError::Stale`]) should that ever break.

use std::sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use tracing::warn;

use crate::journal::PatchRecord;
use crate::{ApplyOutcome, CheckedPatch, Engine, EngineError, GuestControl};

pub struct SharedEngine<G: GuestControl> {
    engine: RwLock<Engine<G>>,
    changes: Mutex<()>,
}

impl<G: GuestControl> SharedEngine<G> {
    pub fn new(engine: Engine<G>) -> SharedEngine<G> {
        SharedEngine {
            engine: RwLock::new(engine),
            changes: Mutex::new(()),
        }
    }

    /// The engine for reading (records, metrics, find): never waits for a patch's planning.
    pub fn read(&self) -> RwLockReadGuard<'_, Engine<G>> {
        self.engine.read().unwrap_or_else(|poisoned| {
            recovering();
            self.engine.clear_poison();
            poisoned.into_inner()
        })
    }

    /// The engine for a change outside apply and revert (counting a refusal, a benchmark's
    /// setup); waits for any change in progress.
    pub fn write(&self) -> RwLockWriteGuard<'_, Engine<G>> {
        self.engine.write().unwrap_or_else(|poisoned| {
            recovering();
            self.engine.clear_poison();
            poisoned.into_inner()
        })
    }

    fn change(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|poisoned| {
            self.changes.clear_poison();
            poisoned.into_inner()
        })
    }

    /// Parses and verifies `file` with no lock held, then applies it as
    /// [`SharedEngine::apply_checked`] does.
    pub fn apply(&self, file: &[u8]) -> Result<ApplyOutcome, EngineError> {
        let verifier = self.read().verifier();
        match verifier.check(file) {
            Ok(checked) => self.apply_checked(checked),
            Err(e) => {
                self.write().note_refused();
                Err(e)
            }
        }
    }

    /// Applies a verified patch: planned under the read lock, written under the write lock.
    pub fn apply_checked(&self, checked: CheckedPatch) -> Result<ApplyOutcome, EngineError> {
        let _change = self.change();
        let paging = self.write().paging();
        let planned = paging.and_then(|p| self.read().plan_apply(checked, p));
        let mut engine = self.write();
        let r = planned.and_then(|p| engine.commit_planned(p));
        engine.counted(r)
    }

    pub fn revert(&self, id: &str) -> Result<PatchRecord, EngineError> {
        let _change = self.change();
        self.write().revert(id)
    }
}

fn recovering() {
    // A request panicked while holding the engine: its state is what the panic left, which the
    // journal and the engine's checks keep consistent enough to report and revert.
    warn!("patch engine lock was poisoned by a panicked request; continuing");
}
