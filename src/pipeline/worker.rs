//! The worker: connects, declares the topology, consumes in batches, and reconnects with
//! backoff when the broker goes away — without a process restart.
//!
//! Shutdown (SIGTERM/SIGINT → the [`CancellationToken`]): cancel the consumer so no new
//! deliveries arrive, let in-flight batches finish within `SHUTDOWN_GRACE`, then close the
//! channel, which hands every unacked delivery back to the queue, and return.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::broker::publisher::Publisher;
use crate::broker::{self, topology};
use crate::configuration::Settings;
use crate::issuer::IssuerClient;
use crate::ops::health::Health;
use crate::pipeline::handle::{self, Context};
use crate::pipeline::provision::Provisioner;
use crate::store::Store;
use crate::telemetry::metric;

/// A configured worker, ready to run.
pub struct Worker {
    ctx: Arc<Context>,
    amqp_url: String,
    prefetch: u16,
    batch_size: usize,
    batch_slots: usize,
    grace: Duration,
    retry_delays: Vec<Duration>,
    consumer_tag: String,
}

impl Worker {
    /// Connects to Postgres (creating and migrating the database; waiting with backoff while
    /// it is unreachable, rather than crash-looping) and builds the pipeline. `None` when
    /// shutdown came first. The broker is connected by [`Worker::run`].
    pub async fn build(
        settings: Settings,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let mut delay = Duration::from_millis(200);
        let store = loop {
            let attempt = async {
                let store =
                    Store::connect(&settings.database_url, settings.db_pool_size + 1).await?;
                store.migrate().await?;
                Ok::<_, crate::store::StoreError>(store)
            };
            match attempt.await {
                Ok(store) => break store,
                Err(e) => tracing::warn!(
                    error = %e,
                    database = %crate::telemetry::redact_url(&settings.database_url),
                    retry_in = ?delay,
                    "database unavailable at start-up"
                ),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        };
        health.set_database(true);
        tokio::spawn(prune_requests(
            store.clone(),
            settings.request_retention,
            shutdown.clone(),
        ));
        let issuer = IssuerClient::new(settings.issuer).map_err(anyhow::Error::msg)?;
        let provisioner = Provisioner::new(
            store,
            issuer,
            Arc::new(settings.cipher),
            settings.naming,
            settings.include_token,
        );
        let ctx = Context {
            provisioner,
            health,
            max_attempts: settings.max_attempts,
            retry_delays: settings.retry_delays.clone(),
            shutdown,
        };
        Ok(Some(Self {
            ctx: Arc::new(ctx),
            amqp_url: settings.amqp_url,
            prefetch: settings.concurrency,
            batch_size: usize::from(settings.batch_size),
            batch_slots: settings.db_pool_size as usize,
            grace: settings.shutdown_grace,
            retry_delays: settings.retry_delays,
            consumer_tag: format!("tenant-tokens-{}", uuid::Uuid::new_v4().simple()),
        }))
    }

    /// Consumes until shutdown, reconnecting with backoff after broker failures.
    pub async fn run(self) -> anyhow::Result<()> {
        let shutdown = self.ctx.shutdown.clone();
        let mut delay = Duration::from_millis(200);
        loop {
            match self.session().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.ctx.health.set_broker(false);
                    if shutdown.is_cancelled() {
                        return Ok(());
                    }
                    tracing::warn!(error = %e, reconnect_in = ?delay, "broker session ended; reconnecting");
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// One connection's life: `Ok` after a clean shutdown, `Err` when the broker failed.
    async fn session(&self) -> anyhow::Result<()> {
        let shutdown = self.ctx.shutdown.clone();
        let conn = broker::connect(&self.amqp_url, "tenant-tokens worker")
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "connect to {}: {e}",
                    crate::telemetry::redact_url(&self.amqp_url)
                )
            })?;
        let setup = conn.create_channel().await?;
        topology::declare(&setup, &self.retry_delays).await?;
        let publisher = Publisher::new(conn.create_channel().await?).await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = consume
            .basic_consume(
                topology::REQUESTS_QUEUE.into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.ctx.health.set_broker(true);
        tracing::info!(
            prefetch = self.prefetch,
            batch_size = self.batch_size,
            "consuming {}",
            topology::REQUESTS_QUEUE
        );

        let slots = Arc::new(Semaphore::new(self.batch_slots.max(1)));
        let mut tasks = JoinSet::new();
        let mut dead_letter_poll = tokio::time::interval(Duration::from_secs(15));
        let ended: anyhow::Result<()> = loop {
            // Breaker open: take no deliveries while a probe runs; with no probe running
            // (the last one gave up), let one delivery through to become the probe.
            let mut limit = self.batch_size;
            if self.ctx.health.breaker.is_open() {
                tokio::select! {
                    () = shutdown.cancelled() => break Ok(()),
                    () = self.ctx.health.breaker.wait_closed() => {}
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
                if self.ctx.health.breaker.is_open() {
                    if self.ctx.health.breaker.is_probing() {
                        continue;
                    }
                    limit = 1;
                }
            }
            let first = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                _ = dead_letter_poll.tick() => {
                    if !publisher.is_open() {
                        break Err(anyhow::anyhow!("the publishing channel closed"));
                    }
                    if let Ok(q) = setup.queue_declare(topology::DEAD_LETTER_QUEUE.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await {
                        metrics::gauge!(metric::DEAD_LETTERS).set(f64::from(q.message_count()));
                    }
                    continue;
                }
                next = consumer.next() => next,
            };
            let first = match first {
                Some(Ok(d)) => d,
                Some(Err(e)) => break Err(e.into()),
                None => break Err(anyhow::anyhow!("the broker cancelled the consumer")),
            };
            if !publisher.is_open() {
                break Err(anyhow::anyhow!("the publishing channel closed"));
            }
            let mut batch = vec![first];
            Self::take_ready(&mut consumer, &mut batch, limit);
            // The breaker may have opened while this loop waited for the delivery (the check
            // above ran before). Send no batch to an issuer that refuses us: hold it until
            // the breaker closes, or, when no probe is running, let its first delivery
            // through as the probe and hand the rest back to the queue. On shutdown the held
            // deliveries go back when the channel closes.
            if limit > 1 && self.ctx.health.breaker.is_open() {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = self.ctx.health.breaker.wait_closed() => break,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    if !self.ctx.health.breaker.is_open() {
                        break;
                    }
                    if !self.ctx.health.breaker.is_probing() {
                        for d in batch.drain(1..) {
                            let requeue = BasicNackOptions {
                                requeue: true,
                                multiple: false,
                            };
                            if let Err(e) = d.acker.nack(requeue).await {
                                tracing::warn!(error = %e, "nack failed; the broker will redeliver when the channel closes");
                            }
                        }
                        break;
                    }
                }
                if shutdown.is_cancelled() {
                    break Ok(());
                }
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break Ok(());
            };
            // Deliveries that arrived while every slot was busy join this batch rather than
            // wait for the next free slot (not a probe's: that one goes alone).
            if !self.ctx.health.breaker.is_open() {
                Self::take_ready(&mut consumer, &mut batch, self.batch_size);
            }
            let ctx = self.ctx.clone();
            let publisher = publisher.clone();
            tasks.spawn(async move {
                handle::handle_batch(&ctx, &publisher, batch).await;
                drop(permit);
            });
        };

        // Stop deliveries, drain in-flight work, hand back the rest.
        self.ctx.health.set_broker(false);
        let _ = consume
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            )
            .await;
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "in-flight work did not finish within the grace period; returning it to the queue");
            tasks.abort_all();
        }
        let _ = consume.close(200, "shutdown".into()).await;
        let _ = conn.close(200, "shutdown".into()).await;
        ended
    }

    /// Adds the deliveries that are already waiting to `batch`, up to `BATCH_SIZE`, without
    /// waiting for more.
    fn take_ready(
        consumer: &mut lapin::Consumer,
        batch: &mut Vec<lapin::message::Delivery>,
        limit: usize,
    ) {
        while batch.len() < limit {
            match consumer.next().now_or_never() {
                Some(Some(Ok(d))) => batch.push(d),
                _ => break,
            }
        }
    }
}

/// Forgets handled requests past their retention, once at start-up and then hourly.
async fn prune_requests(store: Store, retention: Duration, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        match crate::store::prune_requests(store.pool(), retention).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, ?retention, "forgot old handled requests"),
            Err(e) => tracing::warn!(error = %e, "pruning old handled requests failed"),
        }
    }
}
