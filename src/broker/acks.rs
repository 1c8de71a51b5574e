//! Settling the deliveries of one consuming channel, with acks coalesced into multiple-acks.
//!
//! Each `basic.ack` costs the broker a command in the quorum queue's log. A batch settles tens
//! of deliveries at once and batches end in about the order they began, so the acks of a
//! channel mostly form runs of consecutive delivery tags, and one `basic.ack` with `multiple`
//! settles a whole run. [`AckWindow`] decides which frames to send (pure, unit-tested);
//! [`Acks`] keeps the window of one channel and queues the frames on it in the order decided.
//!
//! A multiple-ack settles every unsettled tag up to its own, so it may only cover a run that
//! starts at the oldest unsettled delivery. An ack above a delivery still being worked on
//! waits for it, but at most [`MAX_HOLD`]: then it goes alone, so a delivery held for long (a
//! breaker probe, a batch waiting on a slow issuer) never holds the acks of the others.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::FutureExt as _;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::sync::Notify;

use crate::telemetry::metric;

/// How long a decided ack may wait for an older delivery to settle before it goes alone.
pub(crate) const MAX_HOLD: Duration = Duration::from_millis(20);

/// A frame that settles deliveries.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `basic.ack`; with `multiple`, of every unsettled tag up to `tag`.
    Ack {
        /// The (highest) delivery tag.
        tag: u64,
        /// Whether it settles the run up to `tag`.
        multiple: bool,
    },
    /// `basic.nack` with requeue, of `tag` alone.
    Requeue(u64),
}

/// The deliveries of a channel not yet settled on the wire, and which of them are decided acks
/// (since when). Decides the frames; sends nothing.
#[derive(Debug, Default)]
pub(crate) struct AckWindow {
    /// Tag → `None` while the delivery is being worked on, `Some(when)` once its ack is decided.
    open: BTreeMap<u64, Option<Instant>>,
}

impl AckWindow {
    /// A delivery arrived; deliveries arrive in tag order.
    pub(crate) fn delivered(&mut self, tag: u64) {
        self.open.insert(tag, None);
    }

    /// `tags` are to be acked; [`AckWindow::flush`] says when.
    pub(crate) fn decide(&mut self, tags: &[u64], now: Instant) {
        for t in tags {
            if let Some(state) = self.open.get_mut(t) {
                *state = Some(now);
            }
        }
    }

    /// `tag` goes back to the queue: its nack first, then the acks it no longer holds back.
    pub(crate) fn requeue(&mut self, tag: u64, now: Instant) -> Vec<Frame> {
        let mut frames = Vec::new();
        if self.open.remove(&tag).is_some() {
            frames.push(Frame::Requeue(tag));
        }
        frames.extend(self.flush(now));
        frames
    }

    /// The decided run at the low end as one frame, and each ack held for `MAX_HOLD` or longer
    /// alone.
    pub(crate) fn flush(&mut self, now: Instant) -> Vec<Frame> {
        self.flush_held(now, MAX_HOLD)
    }

    /// Every decided ack, now (the channel is about to close): the deliveries still being
    /// worked on go back to the queue when it does.
    fn drain(&mut self, now: Instant) -> Vec<Frame> {
        self.flush_held(now, Duration::ZERO)
    }

    /// The decided run at the low end as one frame, then each ack held for `hold` or longer
    /// alone (a multiple-ack past an undecided delivery would settle it too).
    fn flush_held(&mut self, now: Instant, hold: Duration) -> Vec<Frame> {
        let mut frames = Vec::new();
        let run: Vec<u64> = self
            .open
            .iter()
            .take_while(|(_, s)| s.is_some())
            .map(|(t, _)| *t)
            .collect();
        if let Some(&last) = run.last() {
            for t in &run {
                self.open.remove(t);
            }
            frames.push(Frame::Ack {
                tag: last,
                multiple: run.len() > 1,
            });
        }
        let held: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, s)| s.is_some_and(|at| now.saturating_duration_since(at) >= hold))
            .map(|(t, _)| *t)
            .collect();
        for t in held {
            self.open.remove(&t);
            frames.push(Frame::Ack {
                tag: t,
                multiple: false,
            });
        }
        frames
    }

    /// Whether a decided ack waits for an older delivery.
    fn holds(&self) -> bool {
        self.open.values().any(Option::is_some)
    }
}

/// The acks of one consuming channel: shared by its deliveries, which settle through it.
pub(crate) struct Acks {
    window: Mutex<AckWindow>,
    /// `None` for deliveries taken apart without a broker.
    channel: Option<Channel>,
    /// Wakes the flushing task: an ack was decided (or the `Acks` is gone).
    decided: Arc<Notify>,
}

impl Acks {
    /// The acks of `channel`, with the task that flushes decided acks (see [`flush_decided`]).
    pub(crate) fn start(channel: Channel) -> Arc<Self> {
        let acks = Self::new(Some(channel));
        tokio::spawn(flush_decided(Arc::downgrade(&acks), acks.decided.clone()));
        acks
    }

    /// Acks that settle nothing: for a delivery taken apart without a channel (the fuzz
    /// target of `decode_delivery`).
    pub(crate) fn detached() -> Arc<Self> {
        Self::new(None)
    }

    fn new(channel: Option<Channel>) -> Arc<Self> {
        Arc::new(Self {
            window: Mutex::new(AckWindow::default()),
            channel,
            decided: Arc::new(Notify::new()),
        })
    }

    /// Registers a delivery, before any of its settling.
    pub(crate) fn delivered(&self, tag: u64) {
        self.with_window(|w| {
            w.delivered(tag);
            Vec::new()
        });
    }

    /// Acks `tag`. The flushing task sends it when it next runs, so the acks of a batch, which
    /// are decided one after the other as their confirms arrive, mostly go as one frame.
    pub(crate) fn ack(&self, tag: u64) {
        self.with_window(|w| {
            w.decide(&[tag], Instant::now());
            Vec::new()
        });
        self.decided.notify_one();
    }

    /// Hands `tag` back to the queue, now.
    pub(crate) fn requeue(&self, tag: u64) {
        self.with_window(|w| w.requeue(tag, Instant::now()));
    }

    /// Sends every decided ack: before the channel closes (which then hands back the rest).
    pub(crate) fn drain(&self) {
        self.with_window(|w| w.drain(Instant::now()));
    }

    /// Runs `decide` on the window and sends its frames, under the lock: frames are queued on
    /// the channel in the order they were decided, so a nack never follows a multiple-ack
    /// that assumed it (the broker closes a channel that settles a tag twice). Sending only
    /// queues the frame; lapin's I/O loop writes it.
    fn with_window(&self, decide: impl FnOnce(&mut AckWindow) -> Vec<Frame>) {
        let Ok(mut w) = self.window.lock() else {
            return;
        };
        let frames = decide(&mut w);
        if let Some(channel) = &self.channel {
            for f in frames {
                send(channel, f);
            }
        }
    }

    fn holds(&self) -> bool {
        self.window.lock().is_ok_and(|w| w.holds())
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        // Lets the flushing task see that it is done.
        self.decided.notify_one();
    }
}

/// Flushes decided acks whenever one is decided; while an ack is held, also every
/// `MAX_HOLD` (and wakes for nothing otherwise: an idle worker stays idle). Ends with the
/// `Acks`.
async fn flush_decided(acks: Weak<Acks>, decided: Arc<Notify>) {
    loop {
        let Some(holding) = acks.upgrade().map(|a| a.holds()) else {
            return;
        };
        if holding {
            tokio::select! {
                () = decided.notified() => {}
                () = tokio::time::sleep(MAX_HOLD) => {}
            }
        } else {
            decided.notified().await;
        }
        match acks.upgrade() {
            Some(a) => a.with_window(|w| w.flush(Instant::now())),
            None => return,
        }
    }
}

/// Queues `frame` on `channel` without waiting for it to be written (its first poll queues
/// it; a failure to write shows as a closed channel, and the broker redelivers what it did not
/// settle, which is answered idempotently).
fn send(channel: &Channel, frame: Frame) {
    let queued = match frame {
        Frame::Ack { tag, multiple } => {
            let label = if multiple { "true" } else { "false" };
            metrics::counter!(metric::ACK_FRAMES, "multiple" => label).increment(1);
            channel
                .basic_ack(tag, BasicAckOptions { multiple })
                .now_or_never()
        }
        Frame::Requeue(tag) => {
            let opts = BasicNackOptions {
                requeue: true,
                multiple: false,
            };
            channel.basic_nack(tag, opts).now_or_never()
        }
    };
    if let Some(Err(e)) = queued {
        tracing::warn!(error = %e, "settling failed; the broker redelivers what it did not settle, and a redelivery is answered idempotently");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(tags: std::ops::RangeInclusive<u64>) -> AckWindow {
        let mut w = AckWindow::default();
        for t in tags {
            w.delivered(t);
        }
        w
    }

    fn ack(tag: u64, multiple: bool) -> Frame {
        Frame::Ack { tag, multiple }
    }

    impl AckWindow {
        /// Decides and flushes at once.
        fn ack(&mut self, tags: &[u64], now: Instant) -> Vec<Frame> {
            self.decide(tags, now);
            self.flush(now)
        }
    }

    #[test]
    fn a_batch_at_the_low_end_is_one_multiple_ack() {
        let mut w = window(1..=10);
        let now = Instant::now();
        assert_eq!(w.ack(&[1, 2, 3, 4, 5], now), vec![ack(5, true)]);
        assert_eq!(w.ack(&[6], now), vec![ack(6, false)]);
    }

    #[test]
    fn a_later_batch_waits_for_the_older_one_then_both_go_as_one() {
        let mut w = window(1..=10);
        let now = Instant::now();
        assert_eq!(w.ack(&[6, 7, 8, 9, 10], now), vec![]);
        assert_eq!(w.ack(&[1, 2, 3, 4, 5], now), vec![ack(10, true)]);
    }

    #[test]
    fn a_held_delivery_holds_later_acks_no_longer_than_max_hold() {
        let mut w = window(1..=4);
        let t0 = Instant::now();
        assert_eq!(w.ack(&[2, 3], t0), vec![]);
        assert_eq!(w.flush(t0 + MAX_HOLD / 2), vec![]);
        assert_eq!(
            w.flush(t0 + MAX_HOLD),
            vec![ack(2, false), ack(3, false)],
            "tag 1 (a probe) is still held: each goes alone, no multiple-ack covers it"
        );
        assert_eq!(w.ack(&[4], t0 + MAX_HOLD), vec![]);
        assert_eq!(
            w.ack(&[1], t0 + MAX_HOLD),
            vec![ack(4, true)],
            "2 and 3 are settled already: one multiple-ack settles 1 and 4"
        );
    }

    #[test]
    fn a_requeue_goes_first_and_releases_the_acks_above_it() {
        let mut w = window(1..=3);
        let now = Instant::now();
        assert_eq!(w.ack(&[2, 3], now), vec![]);
        assert_eq!(w.requeue(1, now), vec![Frame::Requeue(1), ack(3, true)]);
        assert_eq!(w.requeue(1, now), vec![], "settled once only");
    }

    #[test]
    fn draining_sends_every_decided_ack_and_leaves_the_rest_to_the_channel_close() {
        let mut w = window(1..=5);
        let now = Instant::now();
        assert_eq!(w.ack(&[1, 3, 5], now), vec![ack(1, false)]);
        assert_eq!(w.drain(now), vec![ack(3, false), ack(5, false)]);
        assert_eq!(w.ack(&[2], now), vec![ack(2, false)]);
    }

    #[test]
    fn an_unknown_tag_is_never_acked() {
        let mut w = window(1..=2);
        assert_eq!(w.ack(&[7], Instant::now()), vec![]);
    }
}
