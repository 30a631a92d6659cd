//! The patch arena's allocator: where new functions and stubs go.
//!
//! Rule (ARCHITECTURE §4): memory of a reverted patch is reused only once no vCPU can still be
//! executing it. A retired chunk waits in quarantine; during a later blackout, with every vCPU
//! parked, the engine checks that no vCPU's RIP and no return address near the top of its stack
//! points into it, and only then frees it.
//!
//! A patch's chunks retire as one group ([`Arena::retire_group`]) and are freed together, when
//! none of them is busy: its read-only data then lives as long as any of its code can run
//! (code still on a stack may hand the kernel a pointer to a string of the patch, held in a
//! register no scan can see).

/// Chunks are aligned like functions, so a fetch never straddles two patches' code needlessly.
pub const ALIGN: u64 = 16;

/// A range of arena memory, as offsets from the arena's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub len: u64,
}

impl Chunk {
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

pub use guest_control::ArenaWindow;

#[derive(Debug, Clone)]
pub struct Arena {
    pub window: ArenaWindow,
    /// Free ranges, sorted by offset, coalesced.
    free: Vec<Chunk>,
    quarantine: Vec<Chunk>,
    /// The group of each quarantined chunk (same index): chunks of one group are freed
    /// together.
    groups: Vec<u64>,
    next_group: u64,
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(ALIGN) * ALIGN
}

impl Arena {
    pub fn new(window: ArenaWindow) -> Arena {
        Arena {
            window,
            free: vec![Chunk {
                offset: 0,
                len: window.size,
            }],
            quarantine: Vec::new(),
            groups: Vec::new(),
            next_group: 0,
        }
    }

    /// First fit. `None` when no free range is large enough.
    pub fn alloc(&mut self, len: u64) -> Option<Chunk> {
        let len = align_up(len.max(1));
        let i = self.free.iter().position(|c| c.len >= len)?;
        let c = self.free[i];
        let out = Chunk {
            offset: c.offset,
            len,
        };
        if c.len == len {
            self.free.remove(i);
        } else {
            self.free[i] = Chunk {
                offset: c.offset + len,
                len: c.len - len,
            };
        }
        Some(out)
    }

    /// Marks a chunk as in use (restoring the state of applied patches from the journal).
    /// `false` when any of it is not free.
    pub fn reserve(&mut self, chunk: Chunk) -> bool {
        let Some(i) = self
            .free
            .iter()
            .position(|c| c.offset <= chunk.offset && chunk.end() <= c.end())
        else {
            return false;
        };
        let c = self.free.remove(i);
        if chunk.end() < c.end() {
            self.free.insert(
                i,
                Chunk {
                    offset: chunk.end(),
                    len: c.end() - chunk.end(),
                },
            );
        }
        if c.offset < chunk.offset {
            self.free.insert(
                i,
                Chunk {
                    offset: c.offset,
                    len: chunk.offset - c.offset,
                },
            );
        }
        true
    }

    /// Keeps a chunk out of use for good (code the guest still jumps into): taken from the
    /// free list, or out of quarantine so no sweep frees it. `false` when neither holds it
    /// whole (it is allocated already).
    pub fn pin(&mut self, chunk: Chunk) -> bool {
        if let Some(i) = self.quarantine.iter().position(|q| *q == chunk) {
            self.quarantine.remove(i);
            self.groups.remove(i);
            return true;
        }
        self.reserve(chunk)
    }

    /// Returns a chunk no vCPU ever saw (an apply that failed before its blackout's writes).
    pub fn release(&mut self, chunk: Chunk) {
        let i = self.free.partition_point(|c| c.offset < chunk.offset);
        self.free.insert(i, chunk);
        // Coalesce neighbours.
        let mut merged: Vec<Chunk> = Vec::with_capacity(self.free.len());
        for c in self.free.drain(..) {
            match merged.last_mut() {
                Some(last) if last.end() == c.offset => last.len += c.len,
                _ => merged.push(c),
            }
        }
        self.free = merged;
    }

    /// A chunk vCPUs may have executed: freed only after a later quiescence check. A chunk
    /// that is not inside the arena (a damaged journal) is ignored, never handed out later.
    pub fn retire(&mut self, chunk: Chunk) {
        self.retire_group([chunk]);
    }

    /// Chunks of one patch (its code and its data) vCPUs may have used: quarantined as one
    /// group, freed only when a quiescence check finds none of them busy. Chunks outside the
    /// arena are ignored, as by [`Arena::retire`].
    pub fn retire_group(&mut self, chunks: impl IntoIterator<Item = Chunk>) {
        let group = self.next_group;
        self.next_group += 1;
        for chunk in chunks {
            if chunk
                .offset
                .checked_add(chunk.len)
                .is_some_and(|end| end <= self.window.size)
            {
                self.quarantine.push(chunk);
                self.groups.push(group);
            }
        }
    }

    /// Guest-virtual ranges `[start, end)` still in quarantine.
    pub fn quarantined(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.quarantine
            .iter()
            .map(|c| (self.window.gva + c.offset, self.window.gva + c.end()))
    }

    /// Frees every quarantined chunk for which `busy(gva_start, gva_end)` is false. Called with
    /// every vCPU parked. Returns how many were freed.
    pub fn sweep(&mut self, busy: impl Fn(u64, u64) -> bool) -> usize {
        let gva = self.window.gva;
        let busy_groups: std::collections::HashSet<u64> = self
            .quarantine
            .iter()
            .zip(&self.groups)
            .filter(|(c, _)| busy(gva + c.offset, gva + c.end()))
            .map(|(_, g)| *g)
            .collect();
        let mut keep = Vec::new();
        let mut keep_groups = Vec::new();
        let mut free = Vec::new();
        for (c, g) in self.quarantine.drain(..).zip(self.groups.drain(..)) {
            if busy_groups.contains(&g) {
                keep.push(c);
                keep_groups.push(g);
            } else {
                free.push(c);
            }
        }
        self.quarantine = keep;
        self.groups = keep_groups;
        let n = free.len();
        for c in free {
            self.release(c);
        }
        n
    }

    /// Every range that is not free (allocated or quarantined), in order.
    pub fn in_use(&self) -> Vec<Chunk> {
        let mut out = Vec::new();
        let mut at = 0;
        for c in &self.free {
            if c.offset > at {
                out.push(Chunk {
                    offset: at,
                    len: c.offset - at,
                });
            }
            at = c.end();
        }
        if at < self.window.size {
            out.push(Chunk {
                offset: at,
                len: self.window.size - at,
            });
        }
        out
    }

    /// The quarantined chunks.
    pub fn quarantine(&self) -> &[Chunk] {
        &self.quarantine
    }

    pub fn gva(&self, c: Chunk) -> u64 {
        self.window.gva + c.offset
    }
    pub fn gpa(&self, c: Chunk) -> u64 {
        self.window.gpa + c.offset
    }
    /// Bytes free now (not counting quarantine).
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|c| c.len).sum()
    }
    pub fn quarantined_bytes(&self) -> u64 {
        self.quarantine.iter().map(|c| c.len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> Arena {
        Arena::new(ArenaWindow {
            gpa: 0x7fe0_0000,
            gva: 0x7fe0_0000,
            size: 4096,
        })
    }

    #[test]
    fn allocates_aligned_until_full() {
        let mut a = arena();
        let c1 = a.alloc(5).unwrap();
        let c2 = a.alloc(17).unwrap();
        assert_eq!((c1.offset, c1.len), (0, 16));
        assert_eq!((c2.offset, c2.len), (16, 32));
        assert!(a.alloc(4096).is_none());
        assert_eq!(a.free_bytes(), 4096 - 48);
    }

    #[test]
    fn quarantine_frees_only_when_not_busy() {
        let mut a = arena();
        let c = a.alloc(4096).unwrap();
        a.retire(c);
        assert!(a.alloc(16).is_none());
        assert_eq!(a.sweep(|s, e| (s..e).contains(&0x7fe0_0100)), 0);
        assert!(a.alloc(16).is_none());
        assert_eq!(a.sweep(|_, _| false), 1);
        assert_eq!(a.alloc(4096), Some(c));
        // A chunk outside the arena (a damaged journal) never enters the free list.
        a.retire(Chunk {
            offset: 8192,
            len: 16,
        });
        a.retire(Chunk {
            offset: u64::MAX - 4,
            len: 16,
        });
        assert_eq!(a.quarantined_bytes(), 0);
    }

    #[test]
    fn a_group_is_freed_only_when_none_of_its_chunks_is_busy() {
        let mut a = arena();
        let code = a.alloc(64).unwrap();
        let data = a.alloc(32).unwrap();
        let other = a.alloc(16).unwrap();
        a.retire_group([code, data]);
        a.retire(other);
        // A return address into the code keeps the data too; the other patch's chunk goes.
        let in_code = a.gva(code) + 8;
        assert_eq!(a.sweep(|s, e| (s..e).contains(&in_code)), 1);
        assert_eq!(a.quarantined_bytes(), 96);
        assert_eq!(a.sweep(|_, _| false), 2);
        assert_eq!(a.quarantined_bytes(), 0);
        assert_eq!(a.free_bytes(), 4096);
        // Pinning one chunk of a group keeps it for good; the rest still sweeps.
        let c1 = a.alloc(16).unwrap();
        let c2 = a.alloc(16).unwrap();
        a.retire_group([c1, c2]);
        assert!(a.pin(c1));
        assert_eq!(a.sweep(|_, _| false), 1);
        assert_eq!(a.free_bytes(), 4096 - 16);
    }

    #[test]
    fn release_coalesces_and_reserve_splits() {
        let mut a = arena();
        let c1 = a.alloc(64).unwrap();
        let c2 = a.alloc(64).unwrap();
        a.release(c1);
        a.release(c2);
        assert_eq!(a.free_bytes(), 4096);
        assert_eq!(a.alloc(4096).map(|c| c.len), Some(4096));
        let mut b = arena();
        assert!(b.reserve(Chunk {
            offset: 128,
            len: 64
        }));
        assert!(!b.reserve(Chunk {
            offset: 160,
            len: 64
        }));
        assert_eq!(b.free_bytes(), 4096 - 64);
        assert_eq!(b.alloc(128).map(|c| c.offset), Some(0));
        assert_eq!(b.alloc(16).map(|c| c.offset), Some(192));
    }
}
