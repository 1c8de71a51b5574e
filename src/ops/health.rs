//! Readiness: what `/readyz` reports, set by the parts of the pipeline that know.

use std::sync::atomic::{AtomicBool, Ordering};

use super::dead_letters::DeadLetterDepth;
use crate::pipeline::breaker::Breaker;

/// What `/readyz` reports: ready while consuming from a live broker, with a reachable
/// database and a closed breaker.
#[derive(Debug, Default)]
pub struct Health {
    broker: AtomicBool,
    database: AtomicBool,
    draining: AtomicBool,
    /// The issuer breaker.
    pub breaker: Breaker,
    /// The dead-letter queue's depth, read on scrape.
    pub(crate) dead_letters: DeadLetterDepth,
}

impl Health {
    /// Records whether the consumer is attached to a live connection.
    pub(crate) fn set_broker(&self, up: bool) {
        self.broker.store(up, Ordering::Relaxed);
    }

    /// Records whether the last database use worked.
    pub(crate) fn set_database(&self, up: bool) {
        self.database.store(up, Ordering::Relaxed);
    }

    /// Marks the process as shutting down (no longer ready).
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// The reasons the worker is not ready; empty when ready.
    pub fn not_ready_reasons(&self) -> Vec<&'static str> {
        let mut r = Vec::new();
        if !self.broker.load(Ordering::Relaxed) {
            r.push("broker: not consuming");
        }
        if !self.database.load(Ordering::Relaxed) {
            r.push("database: unavailable");
        }
        if self.breaker.is_open() {
            r.push("issuer: breaker open, consumption paused");
        }
        if self.draining.load(Ordering::Relaxed) {
            r.push("shutting down");
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_lists_reasons() {
        let h = Health::default();
        assert_eq!(h.not_ready_reasons().len(), 2);
        h.set_broker(true);
        h.set_database(true);
        assert!(h.not_ready_reasons().is_empty());
        h.breaker.trip("test");
        assert_eq!(h.not_ready_reasons().len(), 1);
    }
}
