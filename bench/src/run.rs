//! One run of the bench, step by step: prepare the broker and database once ([`Env`]), then
//! per run start the stub issuer, the collector and the worker (`--workers` processes),
//! provision the `--existing` tenants, publish the measured requests, wait for their ready
//! events, measure the idle workers, tear down, and match events to requests into a
//! [`RunReport`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use lapin::options::{ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use secrecy::SecretString;
use tenant_tokens::broker::{self, topology};
use tenant_tokens::configuration::connect_store;
use tenant_tokens::telemetry::redact_url;
use tenant_tokens::tools::stub_issuer::{StubConfig, StubIssuer};

use crate::args::BenchArgs;
use crate::collector::{Collector, Seen};
use crate::metrics::mean_batch;
use crate::procfs::{
    CpuSample, largest_peak_rss_kib, load_average, reset_peak_rss, ticks_to_secs, total_ticks,
};
use crate::publish::{
    Msg, Sent, earlier_prefix, existing_tenants, measured_messages, provisioning_messages,
    publish_all,
};
use crate::report::{Latency, RunReport};
use crate::vhost::ensure_vhost;
use crate::worker::{Launch, Worker, signal, wait_ready};

/// What every run shares: the broker connection and where things are.
pub struct Env {
    /// The bench's own connection (publisher and collector channels).
    pub conn: Connection,
    /// Passed on to the started workers.
    pub amqp_url: String,
    /// Passed on to the started workers.
    pub database_url: String,
    /// The `tenant-tokens` binary to start; `None` with `--worker-pid`.
    pub worker_bin: Option<PathBuf>,
}

impl Env {
    /// Checks the worker binary, makes sure the vhost, the topology and the migrations are
    /// there (so the worker starts "with migrations applied") and the requests queue is empty.
    pub async fn prepare(args: &BenchArgs) -> anyhow::Result<Self> {
        let worker_bin = match args.worker_pid {
            Some(_) => None,
            None => Some(args.resolve_worker_bin()?),
        };
        ensure_vhost(&args.amqp_url, args.management_url.as_deref()).await?;
        let conn = broker::connect(&args.amqp_url, "tenant-tokens bench")
            .await
            .map_err(|e| anyhow!("connect to {}: {e}", redact_url(&args.amqp_url)))?;
        let ch = conn.create_channel().await?;
        topology::declare(&ch, &default_retry_delays())
            .await
            .context("declaring the topology")?;
        empty_requests_queue(&ch, args).await?;
        let _ = ch.close(200, "prepared".into()).await;
        let store = connect_store(&args.database_url).await?;
        store.migrate().await?;
        store.pool().close().await;
        Ok(Self {
            conn,
            amqp_url: args.amqp_url.clone(),
            database_url: args.database_url.clone(),
            worker_bin,
        })
    }
}

/// The worker's default `RETRY_DELAYS`, for declaring the same topology it would.
fn default_retry_delays() -> Vec<Duration> {
    [1, 5, 30, 120, 600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

/// Leftover requests would be counted as this run's work: refuse them, or purge with `--purge`.
async fn empty_requests_queue(ch: &Channel, args: &BenchArgs) -> anyhow::Result<()> {
    let depth = ch
        .queue_declare(
            topology::REQUESTS_QUEUE.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    if depth == 0 {
        return Ok(());
    }
    if !args.purge {
        bail!(
            "{} in {} already holds {depth} messages (an interrupted run?); \
             pass --purge to drop them first",
            topology::REQUESTS_QUEUE,
            redact_url(&args.amqp_url)
        );
    }
    ch.queue_purge(
        topology::REQUESTS_QUEUE.into(),
        QueuePurgeOptions::default(),
    )
    .await?;
    Ok(())
}

/// The state of the measured phase once everything is published.
struct Measured {
    mode: &'static str,
    sent: Sent,
    /// Start of the throughput clock (first publish, or the worker ready in backlog mode).
    start: Instant,
    startup: Option<Duration>,
    cpu_before: CpuSample,
    batches_before: Option<(f64, f64)>,
}

/// What was read of the workers and the stub once the last event came, and the idle CPU.
struct After {
    cpu: CpuSample,
    /// The largest worker's peak RSS.
    rss_mib: f64,
    issue_calls: u64,
    mean_batch: Option<f64>,
    idle_cpu_percent: f64,
    /// The database's size (bytes) before and after the measured phase.
    database: (i64, i64),
}

/// One run, from starting the stub issuer to the report.
pub async fn one_run(args: &BenchArgs, env: &Env) -> anyhow::Result<RunReport> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let prefix = format!("bench-{run_id}-");
    let load_before = load_average();

    let stub = start_stub(args).await?;
    // The collector, bound before anything is published.
    let collector = Collector::start(&env.conn, &run_id, &prefix).await?;
    let launch = Launch::new(args, env, stub.url());
    let mut worker = start_worker(args, &launch).await?;
    let publisher = env.conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    let existing = existing_tenants(&prefix, args.existing);
    provision_existing(
        args,
        &publisher,
        &collector,
        &mut worker,
        &prefix,
        &existing,
    )
    .await?;
    stub.set_latency(Duration::from_millis(args.issuer_latency_ms));
    let stub_before = stub.stats();

    let msgs = measured_messages(
        &prefix,
        args.tenants,
        args.duplicates,
        &existing,
        args.requests_per_existing,
    );
    let db_before = database_bytes(&args.database_url).await?;
    let mut measured = if args.backlog {
        publish_backlog(args, &launch, &mut worker, &publisher, &msgs).await?
    } else {
        publish_live(args, &worker, &publisher, &msgs).await?
    };
    let seen = collector
        .wait(
            measured.sent.count,
            false,
            args.timeout,
            args.stall_timeout,
            &mut worker,
        )
        .await?;
    let after = measure_after(
        args,
        &worker,
        &stub,
        stub_before.requests,
        &measured,
        db_before,
    )
    .await?;

    worker.stop().await;
    collector.stop().await;
    let _ = publisher.close(200, "done".into()).await;
    stub.shutdown().await;

    let pending = std::mem::take(&mut measured.sent.at);
    let matched = match_events(
        &seen,
        &prefix,
        pending,
        &existing,
        args.backlog,
        measured.start,
    )?;
    Ok(build_report(args, &measured, after, matched, load_before))
}

/// The stub issuer, in this process, fast while preparing.
async fn start_stub(args: &BenchArgs) -> anyhow::Result<StubIssuer> {
    let stub = StubIssuer::start(
        args.stub_addr,
        StubConfig::new(SecretString::from(args.issuer_master_token.clone())),
    )
    .await
    .with_context(|| format!("starting the stub issuer on {}", args.stub_addr))?;
    if args.worker_pid.is_some() {
        eprintln!(
            "stub issuer at {} (master token {:?}): the worker under test must use it",
            stub.url(),
            args.issuer_master_token
        );
    }
    Ok(stub)
}

/// The worker for the run: the external one (once ready), none yet (backlog without an
/// earlier phase), or `--workers` fresh children.
async fn start_worker(args: &BenchArgs, launch: &Launch<'_>) -> anyhow::Result<Worker> {
    Ok(match args.worker_pid {
        Some(pid) => {
            if let Some(addr) = args.worker_ops_addr {
                wait_ready(addr, None, Duration::from_secs(30)).await?;
            }
            Worker::External(pid)
        }
        None if args.backlog && args.existing == 0 => Worker::NotStarted,
        None => launch.start().await?,
    })
}

/// The earlier, unmeasured phase: provisions the `--existing` tenants. In backlog mode the
/// started workers are stopped again, so the measured backlog builds up while none runs.
async fn provision_existing(
    args: &BenchArgs,
    publisher: &Channel,
    collector: &Collector,
    worker: &mut Worker,
    prefix: &str,
    existing: &[String],
) -> anyhow::Result<()> {
    if existing.is_empty() {
        return Ok(());
    }
    let msgs = provisioning_messages(prefix, existing);
    let mut sent = Sent::default();
    publish_all(publisher, &msgs, None, &mut sent).await?;
    collector
        .wait(sent.count, true, args.timeout, args.stall_timeout, worker)
        .await
        .context("provisioning the --existing tenants")?;
    if args.backlog && args.worker_pid.is_none() {
        worker.stop().await;
        *worker = Worker::NotStarted;
    }
    Ok(())
}

/// `--backlog`: publishes everything while no worker consumes (an external one is stopped
/// with SIGSTOP, and resumed even when publishing fails), then starts the `--workers`
/// children or resumes the external one.
async fn publish_backlog(
    args: &BenchArgs,
    launch: &Launch<'_>,
    worker: &mut Worker,
    publisher: &Channel,
    msgs: &[Msg],
) -> anyhow::Result<Measured> {
    // Read the counters first: a stopped worker answers no HTTP request.
    let batches_before = worker.batch_counters(args.worker_ops_addr).await;
    if let Worker::External(pid) = worker {
        signal(*pid, libc::SIGSTOP)?;
    }
    let mut sent = Sent::default();
    let published = publish_all(publisher, msgs, None, &mut sent).await;
    if let (Err(_), Worker::External(pid)) = (&published, &*worker) {
        // Never leave someone else's worker stopped.
        let _ = signal(*pid, libc::SIGCONT);
    }
    published?;
    let _ = reset_peak_rss(&worker.pids());
    let cpu_before = CpuSample::take(&worker.pids());
    if let Worker::External(pid) = worker {
        signal(*pid, libc::SIGCONT)?;
    } else {
        *worker = launch.start().await?;
    }
    Ok(Measured {
        mode: "backlog",
        sent,
        start: Instant::now(),
        startup: worker.startup(),
        cpu_before: CpuSample::take_for(&worker.pids(), cpu_before),
        batches_before,
    })
}

/// Live or `--rate`: publishes to the running worker; the clock starts at the first publish.
async fn publish_live(
    args: &BenchArgs,
    worker: &Worker,
    publisher: &Channel,
    msgs: &[Msg],
) -> anyhow::Result<Measured> {
    let batches_before = worker.batch_counters(args.worker_ops_addr).await;
    let _ = reset_peak_rss(&worker.pids());
    let cpu_before = CpuSample::take(&worker.pids());
    let startup = worker.startup();
    let start = Instant::now();
    let mut sent = Sent::default();
    publish_all(publisher, msgs, args.rate, &mut sent).await?;
    Ok(Measured {
        mode: if args.rate.is_some() { "rate" } else { "live" },
        sent,
        start,
        startup,
        cpu_before,
        batches_before,
    })
}

/// CPU (summed), peak RSS (the largest) and batch counters (summed) of the workers, the
/// stub's issue calls and the database's size (against `db_before`) right after the last
/// event, then the workers' idle CPU.
async fn measure_after(
    args: &BenchArgs,
    worker: &Worker,
    stub: &StubIssuer,
    stub_requests_before: u64,
    measured: &Measured,
    db_before: i64,
) -> anyhow::Result<After> {
    let cpu = CpuSample::take(&worker.pids());
    let rss_mib = largest_peak_rss_kib(&worker.pids()).map_or(0.0, |k| k as f64 / 1024.0);
    let issue_calls = stub.stats().requests.saturating_sub(stub_requests_before);
    let batches_after = worker.batch_counters(args.worker_ops_addr).await;
    let database = (db_before, database_bytes(&args.database_url).await?);
    Ok(After {
        cpu,
        rss_mib,
        issue_calls,
        mean_batch: mean_batch(measured.batches_before, batches_after),
        idle_cpu_percent: idle_cpu_percent(worker, args.idle).await,
        database,
    })
}

/// The workers' CPU over `idle` with nothing to do, all together, percent of one core.
/// Waiting out the window is the measurement itself.
async fn idle_cpu_percent(worker: &Worker, idle: Duration) -> f64 {
    let pids = worker.pids();
    let before = total_ticks(&pids);
    let t0 = Instant::now();
    tokio::time::sleep(idle).await;
    let after = total_ticks(&pids);
    match (before, after) {
        (Some(a), Some(b)) => {
            ticks_to_secs(b.saturating_sub(a)) / t0.elapsed().as_secs_f64() * 100.0
        }
        _ => 0.0,
    }
}

/// `pg_database_size` of the bench's database: what the measured phase stored.
async fn database_bytes(url: &str) -> anyhow::Result<i64> {
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .with_context(|| format!("connect to {}", redact_url(url)))?;
    let bytes = sqlx::query_scalar("SELECT pg_database_size(current_database())")
        .fetch_one(&mut conn)
        .await?;
    let _ = conn.close().await;
    Ok(bytes)
}

/// The measured phase's events matched to its requests.
struct Matched {
    events: usize,
    extra: usize,
    missing: usize,
    newly_issued_tenants: usize,
    wrongly_new: usize,
    secs: f64,
    latency: Latency,
}

/// Matches each event of the measured phase to its request by `correlation_id` (a duplicate
/// request to its copies in publish order), for latencies, missing and extra events, and
/// checks `newly_issued`: once per new tenant, never for an existing one.
fn match_events(
    seen: &[Seen],
    prefix: &str,
    mut pending: HashMap<String, VecDeque<Instant>>,
    existing: &[String],
    backlog: bool,
    start: Instant,
) -> anyhow::Result<Matched> {
    let earlier = earlier_prefix(prefix);
    let ours: Vec<&Seen> = seen
        .iter()
        .filter(|s| !s.correlation_id.starts_with(&earlier))
        .collect();
    // A backlog drain starts when the worker does, which may be just before `/readyz` said so.
    let start = if backlog {
        ours.iter()
            .map(|s| s.at)
            .min()
            .map_or(start, |first| first.min(start))
    } else {
        start
    };
    let last = ours.iter().map(|s| s.at).fold(start, Instant::max);
    let (hist, extra) = latencies(&ours, &mut pending)?;
    let (newly_issued_tenants, wrongly_new) = newly_issued(&ours, existing);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(Matched {
        events: ours.len(),
        extra,
        missing: pending.values().map(VecDeque::len).sum(),
        newly_issued_tenants,
        wrongly_new,
        secs: last.saturating_duration_since(start).as_secs_f64(),
        latency: Latency {
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: hist.max() as f64 / 1000.0,
        },
    })
}

/// Publish → ready latencies (µs) of the events that match a pending request, which they
/// take out of `pending`; the others are extra events (redeliveries).
fn latencies(
    ours: &[&Seen],
    pending: &mut HashMap<String, VecDeque<Instant>>,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, usize)> {
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let mut extra = 0;
    for s in ours {
        match pending
            .get_mut(s.correlation_id.as_str())
            .and_then(VecDeque::pop_front)
        {
            Some(t) => {
                let us = s.at.saturating_duration_since(t).as_micros();
                let _ = hist.record(u64::try_from(us).unwrap_or(u64::MAX).max(1));
            }
            None => extra += 1,
        }
    }
    Ok((hist, extra))
}

/// Distinct tenants reported `newly_issued`, and such events for already provisioned
/// (`existing`) tenants, which would be wrong.
fn newly_issued(ours: &[&Seen], existing: &[String]) -> (usize, usize) {
    let existing: HashSet<&str> = existing.iter().map(String::as_str).collect();
    let mut newly: HashSet<&str> = HashSet::new();
    let mut wrongly_new = 0;
    for s in ours.iter().filter(|s| s.newly_issued) {
        if existing.contains(s.tenant.as_str()) {
            wrongly_new += 1;
        } else {
            newly.insert(s.tenant.as_str());
        }
    }
    (newly.len(), wrongly_new)
}

const MIB: f64 = 1024.0 * 1024.0;

/// The run's figures and whether its checks held. The issue calls are only checked when the
/// stub saw any or the bench started the worker (an external one may use another issuer).
fn build_report(
    args: &BenchArgs,
    measured: &Measured,
    after: After,
    m: Matched,
    load_before: f64,
) -> RunReport {
    let wanted = measured.sent.count;
    let counts_issuer = args.worker_pid.is_none() || after.issue_calls > 0;
    let machine = measured.cpu_before.delta(&after.cpu, load_before);
    let ok = m.missing == 0
        && m.wrongly_new == 0
        && m.newly_issued_tenants == args.tenants
        && (!counts_issuer || after.issue_calls == args.tenants as u64);
    RunReport {
        mode: measured.mode.to_owned(),
        published: wanted,
        events: m.events,
        missing: m.missing,
        extra_events: m.extra,
        newly_issued_tenants: m.newly_issued_tenants,
        wrongly_new: m.wrongly_new,
        issue_calls: after.issue_calls,
        secs: m.secs,
        throughput: if m.secs > 0.0 {
            (m.events - m.extra) as f64 / m.secs
        } else {
            0.0
        },
        latency: m.latency,
        worker_peak_rss_mib: after.rss_mib,
        worker_cpu_secs: machine.worker_secs,
        worker_cpu_us_per_msg: if wanted > 0 {
            machine.worker_secs * 1e6 / wanted as f64
        } else {
            0.0
        },
        mean_batch: after.mean_batch,
        idle_cpu_percent: after.idle_cpu_percent,
        startup_ms: measured.startup.map(|d| d.as_secs_f64() * 1000.0),
        database_mib: after.database.1 as f64 / MIB,
        database_growth_mib: (after.database.1 - after.database.0) as f64 / MIB,
        machine,
        ok,
    }
}
