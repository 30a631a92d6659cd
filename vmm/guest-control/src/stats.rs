//! Latency samples and their percentiles, for the API metrics and the benchmarks.

use serde::{Deserialize, Serialize};

/// Percentiles of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: usize,
    pub p50: u64,
    pub p99: u64,
    pub max: u64,
    pub mean: f64,
}

/// Nearest-rank percentiles (p in 0..=100) of `samples`.
pub fn summarize(samples: &[u64]) -> Summary {
    if samples.is_empty() {
        return Summary::default();
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = |p: f64| {
        let r = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[r.clamp(1, sorted.len()) - 1]
    };
    Summary {
        count: sorted.len(),
        p50: rank(50.0),
        p99: rank(99.0),
        max: sorted[sorted.len() - 1],
        mean: sorted.iter().sum::<u64>() as f64 / sorted.len() as f64,
    }
}

/// A bounded history of samples: the newest `capacity` are kept.
#[derive(Debug, Clone)]
pub struct History {
    samples: Vec<u64>,
    next: usize,
    capacity: usize,
    total: u64,
}

impl History {
    pub fn new(capacity: usize) -> Self {
        History {
            samples: Vec::new(),
            next: 0,
            capacity: capacity.max(1),
            total: 0,
        }
    }

    pub fn push(&mut self, v: u64) {
        if self.samples.len() < self.capacity {
            self.samples.push(v);
        } else {
            self.samples[self.next] = v;
        }
        self.next = (self.next + 1) % self.capacity;
        self.total += 1;
    }

    /// Samples ever pushed, including those no longer kept.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn summary(&self) -> Summary {
        summarize(&self.samples)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        let s = summarize(&v);
        assert_eq!((s.p50, s.p99, s.max, s.count), (50, 99, 100, 100));
        assert_eq!(summarize(&[7]).p99, 7);
        assert_eq!(summarize(&[]).count, 0);
    }

    #[test]
    fn history_keeps_the_newest() {
        let mut h = History::new(3);
        for v in 1..=5 {
            h.push(v);
        }
        assert_eq!(h.total(), 5);
        let s = h.summary();
        assert_eq!((s.count, s.max, s.p50), (3, 5, 4));
    }
}
