//! Call counters of a replica's APIs: per operation, latency histograms
//! and outcomes; node polls by how they were answered. The SLAP and native
//! layers record into them as calls complete; `metrics` renders them.
//!
//! Kept apart from the renderer so the replica handle can hold them without
//! importing what serves `/metrics`. Must not import anything of this crate.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of the latency histogram's buckets.
pub(crate) const BUCKETS: [f64; 12] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

/// A latency histogram.
#[derive(Default)]
pub(crate) struct Histogram {
    pub(crate) counts: [u64; 12],
    pub(crate) over: u64,
    pub(crate) sum_us: u64,
}

impl Histogram {
    fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        match BUCKETS.iter().position(|b| s <= *b) {
            Some(i) => self.counts[i] += 1,
            None => self.over += 1,
        }
        self.sum_us += d.as_micros() as u64;
    }
}

/// Calls by API and operation, with their outcomes and latencies.
#[derive(Default)]
pub struct Counters {
    /// (api, operation) -> latency histogram.
    pub(crate) calls: Mutex<BTreeMap<(&'static str, String), Histogram>>,
    /// (api, status class) -> count.
    pub(crate) outcomes: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Calls refused before reaching a handler, by reason (`too_large`,
    /// `rate_limited`).
    pub(crate) rejected: Mutex<BTreeMap<&'static str, u64>>,
    /// Node polls answered 304 (unchanged), held, and with a document.
    pub polls_unchanged: AtomicU64,
    pub polls_held: AtomicU64,
    pub polls_document: AtomicU64,
}

impl Counters {
    /// Counts a call refused before any handler (over a limit, too many).
    pub fn rejected(&self, reason: &'static str) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(reason)
            .or_insert(0) += 1;
    }

    /// Records one call of `api` (`slap`, `native`): its operation, its
    /// outcome (an HTTP status, a gRPC code name) and how long it took.
    pub fn call(&self, api: &'static str, operation: &str, outcome: &str, took: Duration) {
        self.calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((api, operation.to_string()))
            .or_default()
            .observe(took);
        *self
            .outcomes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((api, outcome.to_string()))
            .or_insert(0) += 1;
    }
}
