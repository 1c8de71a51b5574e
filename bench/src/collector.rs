//! The collector of `tenant.token.ready` events: bound before anything is published, so no
//! event is lost, and timestamping each event as it arrives for the latency figures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use futures::StreamExt as _;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, Consumer};
use tenant_tokens::broker::topology;
use tokio::sync::Notify;

use crate::publish::earlier_prefix;
use crate::worker::Worker;

/// How often [`Collector::wait`] looks at the worker and the clocks when no event comes.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// How long [`Collector::wait`] keeps collecting after the last wanted event, for
/// redeliveries that would show up right behind it (there is no event that says "no more").
const REDELIVERY_GRACE: Duration = Duration::from_millis(200);

/// A ready event as the collector saw it.
pub struct Seen {
    /// When it arrived.
    pub at: Instant,
    /// The request's message id.
    pub correlation_id: String,
    /// `tenant_id` of the event.
    pub tenant: String,
    /// `newly_issued` of the event.
    pub newly_issued: bool,
}

/// The events collected so far and their counts per phase, shared with the consuming task.
#[derive(Default)]
struct Shared {
    seen: Mutex<Vec<Seen>>,
    /// Events of the earlier phase (`--existing`) and of the measured phase.
    counts: [AtomicUsize; 2],
    /// Woken on every event.
    progress: Notify,
}

/// The collector of ready events: a durable queue (so the broker does the same disk work as
/// for the ceiling's sink), expiring a minute after the bench is gone.
pub struct Collector {
    channel: Channel,
    queue: String,
    tag: String,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    /// Declares and binds the run's queue and starts consuming the events whose correlation id
    /// starts with `prefix` (this run's requests).
    pub async fn start(conn: &Connection, run_id: &str, prefix: &str) -> anyhow::Result<Self> {
        let channel = conn.create_channel().await?;
        let queue = format!("bench.collector.{run_id}");
        declare_queue(&channel, &queue).await?;
        let tag = format!("bench-collector-{run_id}");
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await?;
        let shared: Arc<Shared> = Arc::default();
        let task = tokio::spawn(collect(consumer, shared.clone(), prefix.to_owned()));
        Ok(Self {
            channel,
            queue,
            tag,
            shared,
            task,
        })
    }

    /// Waits until `wanted` events of the earlier (`--existing`) or the measured phase arrived;
    /// returns (and forgets) every event seen so far, with the extra ones that come within a
    /// short grace. Fails early when the worker exits or events stop coming.
    pub async fn wait(
        &self,
        wanted: usize,
        earlier: bool,
        timeout: Duration,
        stall: Duration,
        worker: &mut Worker,
    ) -> anyhow::Result<Vec<Seen>> {
        let started = Instant::now();
        let mut last_progress = Instant::now();
        let mut last_n = 0;
        loop {
            let n = self.shared.counts[usize::from(!earlier)].load(Ordering::Acquire);
            if n >= wanted {
                break;
            }
            if n != last_n {
                last_n = n;
                last_progress = Instant::now();
            }
            check_still_coming(n, wanted, last_progress, stall, worker)?;
            if started.elapsed() > timeout {
                bail!("deadline of {timeout:?} passed with {n} of {wanted} ready events");
            }
            // `notify_one` leaves a permit when nobody waits, so an event that came since the
            // count was read wakes this at once.
            let _ = tokio::time::timeout(CHECK_EVERY, self.shared.progress.notified()).await;
        }
        tokio::time::sleep(REDELIVERY_GRACE).await;
        let mut seen = self
            .shared
            .seen
            .lock()
            .map_err(|_| anyhow!("collector poisoned"))?;
        Ok(std::mem::take(&mut *seen))
    }

    /// Cancels the consumer and deletes the queue.
    pub async fn stop(self) {
        let _ = self
            .channel
            .basic_cancel(self.tag.as_str().into(), BasicCancelOptions::default())
            .await;
        let _ = self
            .channel
            .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
            .await;
        let _ = self.channel.close(200, "done".into()).await;
        self.task.abort();
    }
}

/// A durable queue bound to the ready events, expiring a minute after its last consumer.
async fn declare_queue(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    let mut qargs = FieldTable::default();
    qargs.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
    channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            qargs,
        )
        .await?;
    channel
        .queue_bind(
            queue.into(),
            topology::EVENTS_EXCHANGE.into(),
            topology::TOKEN_READY.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// The consuming task: records this run's events (correlation id starting with `prefix`).
async fn collect(mut consumer: Consumer, shared: Arc<Shared>, prefix: String) {
    let earlier = earlier_prefix(&prefix);
    while let Some(Ok(d)) = consumer.next().await {
        let at = Instant::now();
        let Some(corr) = d.properties.correlation_id().as_ref() else {
            continue;
        };
        if !corr.as_str().starts_with(&prefix) {
            continue;
        }
        let body: serde_json::Value =
            serde_json::from_slice(&d.data).unwrap_or(serde_json::Value::Null);
        let seen = Seen {
            at,
            correlation_id: corr.as_str().to_owned(),
            tenant: body["tenant_id"].as_str().unwrap_or_default().to_owned(),
            newly_issued: body["newly_issued"] == true,
        };
        let phase = usize::from(!seen.correlation_id.starts_with(&earlier));
        if let Ok(mut v) = shared.seen.lock() {
            v.push(seen);
        }
        shared.counts[phase].fetch_add(1, Ordering::Release);
        shared.progress.notify_one();
    }
}

/// Fails when the worker is gone or no event came for `stall`, with its last log lines.
fn check_still_coming(
    n: usize,
    wanted: usize,
    last_progress: Instant,
    stall: Duration,
    worker: &mut Worker,
) -> anyhow::Result<()> {
    if let Some(status) = worker.exited() {
        bail!(
            "the worker exited ({status}) with {n} of {wanted} ready events received; \
             its last log lines:\n{}",
            worker.log_tail()
        );
    }
    if last_progress.elapsed() > stall {
        bail!(
            "no ready event for {stall:?}: {n} of {wanted} received{}. Is the worker \
             consuming from this vhost, with the stub issuer's URL and master token? \
             Last worker log lines:\n{}",
            if n == 0 { " (none at all)" } else { "" },
            worker.log_tail()
        );
    }
    Ok(())
}
