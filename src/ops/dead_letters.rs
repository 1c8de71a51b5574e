//! `tenant_tokens_dead_letters`: the depth of `tenant-tokens.dead`, read from the broker when
//! `/metrics` is scraped, so the value an alert sees is at most a few seconds old (contract §8
//! says 5 s). A short cache keeps a scrape storm from becoming a storm of broker calls.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lapin::Channel;

use crate::broker::topology;
use crate::telemetry::metric;

/// A scrape within this long of the last broker read reuses it.
const CACHE: Duration = Duration::from_secs(1);
/// The longest a scrape waits for the broker; past it the last value stays.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Where the gauge is read from: a channel of the worker's live broker session, if any.
#[derive(Debug, Default)]
pub(crate) struct DeadLetterDepth {
    channel: Mutex<Option<Channel>>,
    last_read: Mutex<Option<Instant>>,
}

impl DeadLetterDepth {
    /// Attaches the channel of a new broker session (or detaches with `None`).
    pub(crate) fn attach(&self, channel: Option<Channel>) {
        if let Ok(mut c) = self.channel.lock() {
            *c = channel;
        }
    }

    /// Reads the depth from the broker into the gauge, unless it was read within [`CACHE`].
    pub(crate) async fn refresh(&self) {
        let now = Instant::now();
        {
            let Ok(mut last) = self.last_read.lock() else {
                return;
            };
            if last.is_some_and(|t| now.duration_since(t) < CACHE) {
                return;
            }
            *last = Some(now);
        }
        let channel = self.channel.lock().ok().and_then(|c| c.clone());
        let Some(channel) = channel else { return };
        match tokio::time::timeout(TIMEOUT, topology::dead_letter_count(&channel)).await {
            Ok(Ok(n)) => metrics::gauge!(metric::DEAD_LETTERS).set(f64::from(n)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "reading the dead-letter queue's depth failed")
            }
            Err(_) => tracing::debug!("reading the dead-letter queue's depth timed out"),
        }
    }
}
