//! Rate limits for log lines a guest can cause: whatever the guest does, the VMM's log grows by
//! at most a burst and then a trickle per second, and says how many lines it held back.

use std::time::Instant;

pub use crate::integrity::{LOG_BURST, LOG_PER_SECOND};

/// A token bucket: a burst of [`LOG_BURST`] lines, then [`LOG_PER_SECOND`] per second.
#[derive(Debug)]
pub struct Limiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
    /// Lines held back since the VMM started.
    pub suppressed_total: u64,
}

impl Limiter {
    pub fn new() -> Self {
        Limiter {
            tokens: LOG_BURST,
            last: Instant::now(),
            suppressed: 0,
            suppressed_total: 0,
        }
    }

    /// Whether to log now; when yes, also how many lines were held back since the last one.
    pub fn admit(&mut self, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * LOG_PER_SECOND).min(LOG_BURST);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            self.suppressed_total += 1;
            None
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::new()
    }
}
