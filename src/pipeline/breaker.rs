//! The issuer breaker (contract §4): pauses consumption for the whole process while the
//! issuer refuses the master token, or is down for everyone, and lets one real request at a
//! time probe it (half-open).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use tokio::sync::Notify;

use crate::telemetry::metric;

/// Pauses consumption for the whole process while the issuer refuses the master token (or is
/// down for everyone), and lets one real request at a time probe it (half-open).
#[derive(Debug)]
pub struct Breaker {
    open: AtomicBool,
    probing: AtomicBool,
    consecutive_transient: AtomicU32,
    threshold: AtomicU32,
    closed: Notify,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            consecutive_transient: AtomicU32::new(0),
            threshold: AtomicU32::new(10),
            closed: Notify::new(),
        }
    }
}

/// Held by the one task that probes the issuer; dropping it lets another probe.
pub struct ProbeGuard<'a>(&'a Breaker);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

impl Breaker {
    /// Messages in a row whose issue calls failed transiently (budget spent) before the breaker opens.
    pub fn set_threshold(&self, n: u32) {
        self.threshold.store(n.max(1), Ordering::Relaxed);
    }

    /// Whether consumption is paused.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Opens the breaker.
    pub fn trip(&self, why: &str) {
        if !self.open.swap(true, Ordering::AcqRel) {
            metrics::gauge!(metric::BREAKER_OPEN).set(1.0);
            tracing::warn!(reason = why, "issuer breaker open: consumption paused");
        }
    }

    /// A message whose issue calls failed transiently; returns whether the breaker is open now.
    pub fn record_transient(&self) -> bool {
        let n = self.consecutive_transient.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold.load(Ordering::Relaxed) {
            self.trip("issuer unavailable for many messages in a row");
        }
        self.is_open()
    }

    /// The issuer answered: close the breaker and resume consumption.
    pub fn record_success(&self) {
        self.consecutive_transient.store(0, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            metrics::gauge!(metric::BREAKER_OPEN).set(0.0);
            tracing::info!("issuer breaker closed: consumption resumed");
        }
        self.closed.notify_waiters();
    }

    /// Whether some task is probing the issuer right now.
    pub fn is_probing(&self) -> bool {
        self.probing.load(Ordering::Acquire)
    }

    /// Becomes the one prober, unless another task already is.
    pub fn try_probe(&self) -> Option<ProbeGuard<'_>> {
        // Not `then_some(ProbeGuard(self))`: that builds the guard eagerly, and dropping
        // the unused guard of a refused caller would end the current probe's turn.
        if self.probing.swap(true, Ordering::AcqRel) {
            None
        } else {
            Some(ProbeGuard(self))
        }
    }

    /// Waits until the breaker is closed.
    pub async fn wait_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if !self.is_open() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_closes_on_success() {
        let b = Breaker::default();
        b.set_threshold(3);
        assert!(!b.record_transient());
        assert!(!b.record_transient());
        assert!(b.record_transient());
        b.record_success();
        assert!(!b.is_open());
        assert!(!b.record_transient());
    }

    #[test]
    fn one_prober_at_a_time() {
        let b = Breaker::default();
        let g = b.try_probe();
        assert!(g.is_some());
        assert!(b.try_probe().is_none());
        assert!(
            b.try_probe().is_none(),
            "a refused try leaves the probe to its holder"
        );
        drop(g);
        assert!(b.try_probe().is_some());
    }
}
