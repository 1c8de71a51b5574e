//! The issuer breaker (contract §4): pauses consumption for the whole process while the
//! issuer refuses the master token, or is down for everyone, and lets one real request at a
//! time probe it (half-open).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::disposition::{BreakerState, Happened};
use crate::broker::inbound::Inbound;
use crate::telemetry::metric;

/// Messages in a row whose issue calls failed transiently (budget spent) before the breaker
/// opens: the issuer is down for everyone, not for one message.
const TRANSIENT_THRESHOLD: u32 = 10;

/// Pauses consumption for the whole process while the issuer refuses the master token (or is
/// down for everyone), and lets one real request at a time probe it (half-open).
#[derive(Debug)]
pub struct Breaker {
    open: AtomicBool,
    probing: AtomicBool,
    consecutive_transient: AtomicU32,
    closed: Notify,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            consecutive_transient: AtomicU32::new(0),
            closed: Notify::new(),
        }
    }
}

/// Held by the one task that probes the issuer; dropping it lets another probe.
pub(crate) struct ProbeGuard<'a>(&'a Breaker);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.probing.store(false, Ordering::Release);
    }
}

impl Breaker {
    /// Records what happened to one message and returns the state the disposition table
    /// needs: a refused master token opens the breaker, a transient failure counts toward
    /// opening it, an answer from the issuer closes it.
    pub(crate) fn record(&self, happened: Happened, issuer_answered: bool) -> BreakerState {
        match happened {
            Happened::Unauthorized => self.trip("the issuer refuses the master token"),
            Happened::Transient if !self.is_open() => {
                self.record_transient();
            }
            _ if issuer_answered => self.record_success(),
            _ => {}
        }
        self.state()
    }

    /// The state as the disposition table sees it.
    pub(crate) fn state(&self) -> BreakerState {
        if !self.is_open() {
            BreakerState::Closed
        } else if self.is_probing() {
            BreakerState::OpenProbing
        } else {
            BreakerState::OpenIdle
        }
    }

    /// Whether consumption is paused.
    pub(crate) fn is_open(&self) -> bool {
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
    pub(crate) fn record_transient(&self) -> bool {
        let n = self.consecutive_transient.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= TRANSIENT_THRESHOLD {
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
    pub(crate) fn is_probing(&self) -> bool {
        self.probing.load(Ordering::Acquire)
    }

    /// Becomes the one prober, unless another task already is.
    pub(crate) fn try_probe(&self) -> Option<ProbeGuard<'_>> {
        // Not `then_some(ProbeGuard(self))`: that builds the guard eagerly, and dropping
        // the unused guard of a refused caller would end the current probe's turn.
        if self.probing.swap(true, Ordering::AcqRel) {
            None
        } else {
            Some(ProbeGuard(self))
        }
    }

    /// Waits until the breaker is closed.
    pub(crate) async fn wait_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if !self.is_open() {
                return;
            }
            notified.await;
        }
    }
}

/// What the consumer may take next (see [`Breaker::admission`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Take up to this many deliveries.
    Take(usize),
    /// Take nothing now; ask again.
    Wait,
    /// Shutdown: stop consuming.
    Stop,
}

impl Breaker {
    /// How many deliveries the consumer may take: a whole batch while the breaker is closed;
    /// while it is open, nothing while a probe runs, and one (to become the probe) when none
    /// does (the last one gave up). Waits up to 2 s for the breaker to close first.
    pub(crate) async fn admission(
        &self,
        batch_size: usize,
        shutdown: &CancellationToken,
    ) -> Admission {
        if !self.is_open() {
            return Admission::Take(batch_size);
        }
        tokio::select! {
            () = shutdown.cancelled() => return Admission::Stop,
            () = self.wait_closed() => {}
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
        match self.state() {
            BreakerState::Closed => Admission::Take(batch_size),
            BreakerState::OpenProbing => Admission::Wait,
            BreakerState::OpenIdle => Admission::Take(1),
        }
    }

    /// The breaker may have opened while the consumer waited for `batch`: send no batch to
    /// an issuer that refuses us. Holds it until the breaker closes or, when no probe is
    /// running, keeps its first delivery (to become the probe) and hands the rest back.
    /// `false` on shutdown (the held deliveries go back when the channel closes).
    pub(crate) async fn hold_while_open(
        &self,
        batch: &mut Vec<Inbound>,
        shutdown: &CancellationToken,
    ) -> bool {
        while self.is_open() {
            tokio::select! {
                () = shutdown.cancelled() => return false,
                () = self.wait_closed() => break,
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            if self.state() == BreakerState::OpenIdle {
                for m in batch.drain(1..) {
                    m.requeue();
                }
                break;
            }
        }
        !shutdown.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_and_closes_on_success() {
        let b = Breaker::default();
        for _ in 1..TRANSIENT_THRESHOLD {
            assert!(!b.record_transient());
        }
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
