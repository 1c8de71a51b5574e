//! The worker: connects, declares the topology, consumes in batches, and reconnects with
//! backoff when the broker goes away — without a process restart.
//!
//! Shutdown (SIGTERM/SIGINT → the [`CancellationToken`]): cancel the consumer so no new
//! deliveries arrive, let in-flight batches finish within `SHUTDOWN_GRACE`, then close the
//! channel, which hands every unacked delivery back to the queue, and return.

use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt as _, StreamExt as _};
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::breaker::Admission;
use super::disposition::Policy;
use super::handle::{self, Context};
use super::provision::Provisioner;
use super::revoker::Revoker;
use crate::broker::acks::Acks;
use crate::broker::inbound::Inbound;
use crate::broker::publisher::Publisher;
use crate::broker::{self, topology};
use crate::configuration::Settings;
use crate::issuer::IssuerClient;
use crate::ops::health::Health;
use crate::store::{self, Store};
use crate::telemetry::redact_url;

/// A configured worker, ready to run.
pub struct Worker {
    ctx: Arc<Context>,
    /// The `AMQP_URL` node to try first: the one after the node a failed session was on.
    next_node: std::sync::atomic::AtomicUsize,
    revoker: Revoker,
    amqp_url: String,
    prefetch: u16,
    batch_size: usize,
    batch_slots: usize,
    grace: Duration,
    consumer_tag: String,
}

/// The channels of one broker session.
struct Session {
    conn: Connection,
    consume: Channel,
    consumer: Consumer,
    /// Settles the consumer's deliveries (multiple-acks where tags run on).
    acks: Arc<Acks>,
    publisher: Publisher,
}

impl Worker {
    /// Connects to Postgres (creating the database if missing and applying pending migrations:
    /// none on an up-to-date database, so a runtime role without DDL rights works; waiting
    /// with backoff while it is unreachable, rather than crash-looping) and builds the
    /// pipeline. `None` when shutdown came first. The broker is connected by [`Worker::run`].
    pub async fn build(
        settings: Settings,
        health: Arc<Health>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Option<Self>> {
        let pool_size = store::pool_size_for(settings.db_pool_size);
        let Some(store) = connect_store(&settings.database_url, pool_size, &shutdown).await else {
            return Ok(None);
        };
        health.set_database(true);
        let issuer = IssuerClient::new(settings.issuer).map_err(anyhow::Error::msg)?;
        let cipher = Arc::new(settings.cipher);
        let revoker = Revoker {
            store: store.clone(),
            issuer: issuer.clone(),
            cipher: cipher.clone(),
            health: health.clone(),
            orphan_grace: settings.orphan_grace,
        };
        let provisioner = Provisioner::new(
            store,
            issuer,
            cipher,
            settings.naming,
            settings.include_token,
            settings.rotation_grace,
        );
        let policy = Policy {
            max_attempts: settings.max_attempts,
            retry_delays: settings.retry_delays,
        };
        let ctx = Context {
            provisioner,
            health,
            policy,
            shutdown,
        };
        Ok(Some(Self {
            ctx: Arc::new(ctx),
            next_node: std::sync::atomic::AtomicUsize::new(0),
            revoker,
            amqp_url: settings.amqp_url,
            prefetch: settings.concurrency,
            batch_size: usize::from(settings.batch_size),
            batch_slots: settings.db_pool_size as usize,
            grace: settings.shutdown_grace,
            consumer_tag: format!("tenant-tokens-{}", uuid::Uuid::new_v4().simple()),
        }))
    }

    /// Consumes until shutdown, reconnecting with backoff after broker failures.
    pub async fn run(self) -> anyhow::Result<()> {
        let shutdown = self.ctx.shutdown.clone();
        const FIRST_DELAY: Duration = Duration::from_millis(200);
        let mut delay = FIRST_DELAY;
        loop {
            let ended = match self.open_session().await {
                // Connected and consuming: the next loss starts the back-off afresh, so a
                // long-lived process does not wait the longest delay at every failover.
                Ok(s) => {
                    delay = FIRST_DELAY;
                    self.session(s).await
                }
                Err(e) => Err(e),
            };
            match ended {
                Ok(()) => return Ok(()),
                Err(e) => {
                    self.ctx.health.set_broker(false);
                    self.ctx.health.dead_letters.attach(None);
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

    /// One connection's life once consuming: `Ok` after a clean shutdown, `Err` when the
    /// broker failed.
    async fn session(&self, mut s: Session) -> anyhow::Result<()> {
        let revoker_stop = self.ctx.shutdown.child_token();
        tokio::spawn(
            self.revoker
                .clone()
                .run(s.publisher.clone(), revoker_stop.clone()),
        );
        let mut tasks = JoinSet::new();
        let ended = self.consume(&mut s, &mut tasks).await;
        revoker_stop.cancel();
        self.drain(&s, tasks).await;
        ended
    }

    /// Connects, declares the topology and starts consuming with the configured prefetch.
    async fn open_session(&self) -> anyhow::Result<Session> {
        use std::sync::atomic::Ordering::Relaxed;
        let start = self.next_node.load(Relaxed);
        let (conn, node) = broker::connect_from(&self.amqp_url, start, "tenant-tokens worker")
            .await
            .map_err(|e| anyhow::anyhow!("connect to {}: {e}", redact_url(&self.amqp_url)))?;
        // Should this session fail, the next one starts with the next node (failover).
        self.next_node.store(node + 1, Relaxed);
        let setup = conn.create_channel().await?;
        topology::declare(&setup, &self.ctx.policy.retry_delays).await?;
        let publisher = Publisher::new(conn.create_channel().await?).await?;
        let consume = conn.create_channel().await?;
        consume
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let consumer = consume
            .basic_consume(
                topology::REQUESTS_QUEUE.into(),
                self.consumer_tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.ctx.health.dead_letters.attach(Some(setup));
        self.ctx.health.set_broker(true);
        tracing::info!(
            prefetch = self.prefetch,
            batch_size = self.batch_size,
            "consuming {}",
            topology::REQUESTS_QUEUE
        );
        Ok(Session {
            acks: Acks::start(consume.clone()),
            conn,
            consume,
            consumer,
            publisher,
        })
    }

    /// Takes deliveries in batches and hands each batch to a task, at most `DB_POOL_SIZE` at
    /// once, until shutdown (`Ok`) or a broker failure (`Err`).
    async fn consume(&self, s: &mut Session, tasks: &mut JoinSet<()>) -> anyhow::Result<()> {
        let shutdown = &self.ctx.shutdown;
        let breaker = &self.ctx.health.breaker;
        let slots = Arc::new(Semaphore::new(self.batch_slots.max(1)));
        let mut liveness = tokio::time::interval(Duration::from_secs(5));
        loop {
            let limit = match breaker.admission(self.batch_size, shutdown).await {
                Admission::Stop => return Ok(()),
                Admission::Wait => continue,
                Admission::Take(n) => n,
            };
            let first = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                _ = liveness.tick() => None,
                next = s.consumer.next() => Some(next),
            };
            if !s.publisher.is_open() {
                anyhow::bail!("the publishing channel closed");
            }
            let first = match first {
                None => continue,
                Some(Some(Ok(d))) => Inbound::from_delivery(d, &s.acks),
                Some(Some(Err(e))) => return Err(e.into()),
                Some(None) => anyhow::bail!("the broker cancelled the consumer"),
            };
            let mut batch = vec![first];
            take_ready(s, &mut batch, limit);
            if !fill(s, tasks, &mut batch, limit, shutdown).await? {
                return Ok(());
            }
            if limit > 1 && !breaker.hold_while_open(&mut batch, shutdown).await {
                return Ok(());
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return Ok(());
            };
            // Deliveries that arrived while every slot was busy join this batch rather than
            // wait for the next free slot (not a probe's: that one goes alone).
            if !breaker.is_open() {
                take_ready(s, &mut batch, self.batch_size);
            }
            let ctx = self.ctx.clone();
            let publisher = s.publisher.clone();
            tasks.spawn(async move {
                handle::handle_batch(&ctx, &publisher, batch).await;
                drop(permit);
            });
        }
    }

    /// Stops deliveries, lets in-flight batches finish within the grace period, and closes
    /// the session, which hands every unsettled delivery back to the queue.
    async fn drain(&self, s: &Session, mut tasks: JoinSet<()>) {
        self.ctx.health.set_broker(false);
        self.ctx.health.dead_letters.attach(None);
        let _ = s
            .consume
            .basic_cancel(
                self.consumer_tag.as_str().into(),
                BasicCancelOptions::default(),
            )
            .await;
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.grace, drain).await.is_err() {
            tracing::warn!(grace = ?self.grace, "in-flight work did not finish within the grace period; returning it to the queue");
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
        }
        // Decided acks still waiting for an older delivery go now; what is unsettled then goes
        // back to the queue with the channel.
        s.acks.drain();
        let _ = s.consume.close(200, "shutdown".into()).await;
        let _ = s.conn.close(200, "shutdown".into()).await;
    }
}

/// Batches running at once below which a batch goes without waiting to fill: enough to
/// keep one batch in Postgres while another waits for its confirms, so a lone message is
/// never held, while under load the deliveries that arrive meanwhile make the batches big
/// (one transaction and one commit serve more messages).
const EAGER_BATCHES: usize = 2;

/// Whether a batch of `len` (at most `limit`) goes now, with `running` batches in flight:
/// when it is full, or when so few run that waiting would only add latency.
fn batch_goes(len: usize, limit: usize, running: usize) -> bool {
    len >= limit || running < EAGER_BATCHES
}

/// Lets `batch` fill under load (see [`batch_goes`]): takes more deliveries as they come and
/// reaps finished batches until it may go. `false` on shutdown.
async fn fill(
    s: &mut Session,
    tasks: &mut JoinSet<()>,
    batch: &mut Vec<Inbound>,
    limit: usize,
    shutdown: &CancellationToken,
) -> anyhow::Result<bool> {
    while !batch_goes(batch.len(), limit, tasks.len()) {
        tokio::select! {
            () = shutdown.cancelled() => return Ok(false),
            Some(_) = tasks.join_next() => {}
            next = s.consumer.next() => match next {
                Some(Ok(d)) => {
                    batch.push(Inbound::from_delivery(d, &s.acks));
                    take_ready(s, batch, limit);
                }
                Some(Err(e)) => return Err(e.into()),
                None => anyhow::bail!("the broker cancelled the consumer"),
            },
        }
    }
    Ok(true)
}

/// Adds the deliveries that are already waiting to `batch`, up to `limit`, without waiting
/// for more.
fn take_ready(s: &mut Session, batch: &mut Vec<Inbound>, limit: usize) {
    while batch.len() < limit {
        match s.consumer.next().now_or_never() {
            Some(Some(Ok(d))) => batch.push(Inbound::from_delivery(d, &s.acks)),
            _ => break,
        }
    }
}

/// Connects to Postgres and applies pending migrations, retrying with backoff while it is
/// unreachable (or while migrations are pending that this role may not apply); `None`
/// when shutdown came first.
async fn connect_store(url: &str, pool_size: u32, shutdown: &CancellationToken) -> Option<Store> {
    let mut delay = Duration::from_millis(200);
    loop {
        let attempt = async {
            let store = Store::connect(url, pool_size).await?;
            store.migrate_if_pending().await?;
            Ok::<_, store::StoreError>(store)
        };
        match attempt.await {
            Ok(store) => return Some(store),
            Err(e) => tracing::warn!(
                error = %e,
                database = %redact_url(url),
                retry_in = ?delay,
                "database unavailable at start-up"
            ),
        }
        tokio::select! {
            () = shutdown.cancelled() => return None,
            () = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lone_batch_goes_at_once_and_under_load_it_waits_until_full() {
        assert!(batch_goes(1, 64, 0), "nothing running: go");
        assert!(batch_goes(1, 64, EAGER_BATCHES - 1), "fewer than eager: go");
        assert!(!batch_goes(1, 64, EAGER_BATCHES), "enough running: fill");
        assert!(batch_goes(64, 64, 8), "full: go whatever runs");
        assert!(
            batch_goes(1, 1, 8),
            "a probe's batch of one is full at once"
        );
    }
}
