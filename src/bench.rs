//! `tenant-tokens bench`: the measuring instrument for issue 4 (performance).
//!
//! Against the RabbitMQ and Postgres it is pointed at — by default a dedicated vhost `bench`
//! (created through the management API when missing) and the database `tenant_tokens_bench`,
//! so it never disturbs the `/` vhost — one run:
//!
//! 1. prepares: vhost, topology and migrations (so the worker starts "with migrations applied");
//! 2. starts the stub issuer in this process (`--issuer-latency-ms`);
//! 3. starts the worker as a child process (this executable, `run`), so its peak RSS
//!    (`VmHWM`) and CPU time (`utime + stime`) can be read from `/proc` — or, with
//!    `--worker-pid`, measures a worker that is already running (start it with
//!    `ISSUER_URL` pointing at a fixed `--stub-addr` and the same `--issuer-master-token`);
//! 4. binds a collector queue for `tenant.token.ready` before anything is published;
//! 5. with `--existing M`, provisions M tenants first (not measured);
//! 6. publishes N `tenant.created` (`-n`), K duplicates (`--duplicates`, same message id) and
//!    M `extension.requested` for the tenants of step 5, shuffled: as fast as the broker takes
//!    them, paced at `--rate R` msgs/s, or (`--backlog`) all of them before the worker starts;
//! 7. waits for one ready event per published request (with a deadline, and a clear error when
//!    events stop coming), then measures the worker's idle CPU for `--idle`.
//!
//! It reports throughput (first publish → last ready event; in backlog mode worker ready →
//! last ready event), publish→ready latency percentiles (an event is matched to its request by
//! its `correlation_id`, the request's `message_id`), issue calls (stub counters), missing and
//! extra events, the worker's peak RSS, CPU seconds, idle CPU and start-up time, plus what the
//! broker, Postgres and everything else on the machine used meanwhile (the noise). `--runs`
//! repeats the whole thing and reports medians. The exit status is 1 when a correctness check
//! failed (a missing event, a wrong number of issue calls or of `newly_issued` events).

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use rand::seq::SliceRandom as _;
use secrecy::SecretString;
use serde::Serialize;
use tokio::io::AsyncBufReadExt as _;

use crate::broker::{self, topology};
use crate::crypto::EncryptionKey;
use crate::tools::stub_issuer::{StubConfig, StubIssuer};

/// The bench's default broker: the local RabbitMQ, vhost `bench`.
pub const DEFAULT_BENCH_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/bench";
/// The bench's default database.
pub const DEFAULT_BENCH_DATABASE_URL: &str =
    "postgres://postgres@127.0.0.1:5432/tenant_tokens_bench";

/// `bench` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// RabbitMQ URL, vhost included; a missing vhost is created through the management API.
    #[arg(long, env = "BENCH_AMQP_URL", default_value = DEFAULT_BENCH_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
    /// Postgres URL; the database is created and migrated when missing.
    #[arg(long, env = "BENCH_DATABASE_URL", default_value = DEFAULT_BENCH_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
    /// RabbitMQ management API, for creating the vhost [default: the broker's host, port 15672].
    #[arg(long)]
    pub management_url: Option<String>,
    /// New tenants: one `tenant.created` each.
    #[arg(short = 'n', long = "tenants", default_value_t = 10_000)]
    pub tenants: usize,
    /// Extra copies of that many `tenant.created` messages (same message id, as redeliveries).
    #[arg(long, default_value_t = 0)]
    pub duplicates: usize,
    /// `extension.requested` for M tenants provisioned in an earlier (unmeasured) phase.
    #[arg(long, default_value_t = 0)]
    pub existing: usize,
    /// Latency of the stub issuer during the measured phase.
    #[arg(long, default_value_t = 0)]
    pub issuer_latency_ms: u64,
    /// Publish at this many messages per second (paced) instead of as fast as possible.
    #[arg(long, conflicts_with = "backlog")]
    pub rate: Option<f64>,
    /// Publish everything before the worker starts (or while `--worker-pid` is stopped with
    /// SIGSTOP), then measure the drain.
    #[arg(long)]
    pub backlog: bool,
    /// `CONCURRENCY` of the worker [default: the worker's].
    #[arg(long)]
    pub concurrency: Option<u16>,
    /// `BATCH_SIZE` of the worker [default: the worker's].
    #[arg(long)]
    pub batch_size: Option<u16>,
    /// `DB_POOL_SIZE` of the worker [default: the worker's].
    #[arg(long)]
    pub db_pool_size: Option<u32>,
    /// Another flag for the worker's `run`, e.g. `--worker-arg=--issuer-timeout=2s` (repeatable).
    #[arg(long = "worker-arg", allow_hyphen_values = true)]
    pub worker_args: Vec<String>,
    /// An environment variable for the worker, `NAME=VALUE` (repeatable), e.g.
    /// `TOKIO_WORKER_THREADS=1`.
    #[arg(long = "worker-env", value_parser = parse_env_pair)]
    pub worker_env: Vec<(String, String)>,
    /// `RUST_LOG` of the worker (it logs one line per request at `info`); the start-up line
    /// with the ops address is kept at `info` whatever this says.
    #[arg(long, default_value = "info")]
    pub worker_log: String,
    /// Append the worker's log (stderr) to this file; by default it is read and dropped.
    #[arg(long)]
    pub worker_log_file: Option<PathBuf>,
    /// Measure this already running worker instead of starting one.
    #[arg(long)]
    pub worker_pid: Option<u32>,
    /// Ops address of the `--worker-pid` worker, to wait until it is ready.
    #[arg(long, requires = "worker_pid")]
    pub worker_ops_addr: Option<SocketAddr>,
    /// Where the stub issuer listens (port 0 picks one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub stub_addr: SocketAddr,
    /// The master token the stub issuer accepts (and the started worker uses).
    #[arg(long, default_value = "bench-master-token")]
    pub issuer_master_token: String,
    /// How long to watch the idle worker after the run, for its idle CPU.
    #[arg(long, default_value = "3s", value_parser = crate::configuration::parse_duration)]
    pub idle: Duration,
    /// Give up a run after this long.
    #[arg(long, default_value = "600s", value_parser = crate::configuration::parse_duration)]
    pub timeout: Duration,
    /// Give up when no ready event came for this long.
    #[arg(long, default_value = "30s", value_parser = crate::configuration::parse_duration)]
    pub stall_timeout: Duration,
    /// Runs; figures are reported per run and as medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub runs: u32,
    /// Purge `tenant-tokens.requests` first if it holds messages (otherwise that is an error).
    #[arg(long)]
    pub purge: bool,
    /// One JSON document instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON document to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Maximum.
    pub max_ms: f64,
}

/// CPU seconds used on the machine during the measured phase, by whom.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MachineCpu {
    /// Wall-clock seconds of the measured phase.
    pub wall_secs: f64,
    /// All CPUs' busy seconds (from `/proc/stat`).
    pub busy_secs: f64,
    /// CPUs of the machine.
    pub cpus: usize,
    /// The worker.
    pub worker_secs: f64,
    /// RabbitMQ (`beam.smp`).
    pub broker_secs: f64,
    /// Postgres (every `postgres` process).
    pub postgres_secs: f64,
    /// This process: publisher, collector and stub issuer.
    pub bench_secs: f64,
    /// Everything else (other users of the machine: noise).
    pub other_secs: f64,
    /// 1-minute load average when the run started.
    pub load_before: f64,
}

/// The figures of one run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunReport {
    /// `live`, `rate` or `backlog`.
    pub mode: String,
    /// Requests published in the measured phase.
    pub published: usize,
    /// Ready events received for them.
    pub events: usize,
    /// Requests without their ready event.
    pub missing: usize,
    /// Ready events beyond one per published request (redeliveries).
    pub extra_events: usize,
    /// Distinct new tenants reported `newly_issued: true` (expected: `-n`).
    pub newly_issued_tenants: usize,
    /// Events for already provisioned tenants that said `newly_issued: true` (expected: 0).
    pub wrongly_new: usize,
    /// Issue requests the stub received in the measured phase (expected: `-n`).
    pub issue_calls: u64,
    /// Seconds of the measured phase.
    pub secs: f64,
    /// Ready events per second.
    pub throughput: f64,
    /// Publish → ready event.
    pub latency: Latency,
    /// Peak resident set of the worker (`VmHWM`), MiB.
    pub worker_peak_rss_mib: f64,
    /// Worker CPU seconds (user + system) over the measured phase.
    pub worker_cpu_secs: f64,
    /// Worker CPU per request, microseconds.
    pub worker_cpu_us_per_msg: f64,
    /// Mean deliveries per batch in the measured phase (from the worker's `/metrics`).
    pub mean_batch: Option<f64>,
    /// Worker CPU while idle after the run, percent of one core.
    pub idle_cpu_percent: f64,
    /// Worker process start → `/readyz` 200, milliseconds (a started worker only).
    pub startup_ms: Option<f64>,
    /// Who used the machine meanwhile.
    pub machine: MachineCpu,
    /// Whether every correctness check held.
    pub ok: bool,
}

/// Medians over the runs.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    /// Median throughput, events per second.
    pub throughput: f64,
    /// Median p50 latency, ms.
    pub p50_ms: f64,
    /// Median p95 latency, ms.
    pub p95_ms: f64,
    /// Median p99 latency, ms.
    pub p99_ms: f64,
    /// Median max latency, ms.
    pub max_ms: f64,
    /// Median peak RSS, MiB.
    pub worker_peak_rss_mib: f64,
    /// Median worker CPU per request, µs.
    pub worker_cpu_us_per_msg: f64,
    /// Median idle CPU, percent of a core.
    pub idle_cpu_percent: f64,
    /// Median start-up, ms.
    pub startup_ms: Option<f64>,
    /// Every run passed its checks.
    pub ok: bool,
}

/// The whole report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The settings of the runs.
    pub settings: serde_json::Value,
    /// Each run.
    pub runs: Vec<RunReport>,
    /// Medians.
    pub median: Summary,
}

/// Runs the bench; `Ok(true)` when every correctness check held.
pub async fn run(args: BenchArgs) -> anyhow::Result<bool> {
    if args.tenants + args.existing == 0 {
        bail!("nothing to measure: give -n and/or --existing");
    }
    if let Some(r) = args.rate
        && !(r.is_finite() && r > 0.0)
    {
        bail!("--rate must be a positive number of messages per second");
    }
    let mut err = std::io::stderr();
    let env = Env::prepare(&args).await?;
    let mut runs = Vec::new();
    for i in 0..args.runs {
        if args.runs > 1 {
            writeln!(err, "run {}/{}", i + 1, args.runs)?;
        }
        let report = one_run(&args, &env)
            .await
            .with_context(|| format!("run {}", i + 1))?;
        writeln!(
            err,
            "  {:.0} msgs/s, p99 {:.1} ms, RSS {:.1} MiB, CPU {:.2} s, {}",
            report.throughput,
            report.latency.p99_ms,
            report.worker_peak_rss_mib,
            report.worker_cpu_secs,
            if report.ok {
                "checks ok"
            } else {
                "CHECKS FAILED"
            }
        )?;
        runs.push(report);
    }
    let _ = env.conn.close(200, "bench done".into()).await;
    let median = summarize(&runs);
    let ok = median.ok;
    let report = Report {
        settings: settings_json(&args),
        runs,
        median,
    };
    if let Some(path) = &args.json_out {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut out = std::io::stdout();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        print_table(&mut out, &args, &report)?;
    }
    Ok(ok)
}

/// What every run shares: the broker connection and where things are.
struct Env {
    conn: Connection,
    amqp_url: String,
    database_url: String,
}

impl Env {
    async fn prepare(args: &BenchArgs) -> anyhow::Result<Self> {
        ensure_vhost(&args.amqp_url, args.management_url.as_deref()).await?;
        let conn = broker::connect(&args.amqp_url, "tenant-tokens bench")
            .await
            .map_err(|e| {
                anyhow!(
                    "connect to {}: {e}",
                    crate::telemetry::redact_url(&args.amqp_url)
                )
            })?;
        let ch = conn.create_channel().await?;
        topology::declare(&ch, &default_retry_delays())
            .await
            .context("declaring the topology")?;
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
        if depth > 0 {
            if !args.purge {
                bail!(
                    "{} in {} already holds {depth} messages (an interrupted run?); \
                     pass --purge to drop them first",
                    topology::REQUESTS_QUEUE,
                    crate::telemetry::redact_url(&args.amqp_url)
                );
            }
            ch.queue_purge(
                topology::REQUESTS_QUEUE.into(),
                QueuePurgeOptions::default(),
            )
            .await?;
        }
        let _ = ch.close(200, "prepared".into()).await;
        let store = crate::configuration::connect_store(&args.database_url).await?;
        store.migrate().await?;
        store.pool().close().await;
        Ok(Self {
            conn,
            amqp_url: args.amqp_url.clone(),
            database_url: args.database_url.clone(),
        })
    }
}

fn default_retry_delays() -> Vec<Duration> {
    [1, 5, 30, 120, 600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

/// One request to publish.
struct Msg {
    key: &'static str,
    id: String,
    body: Vec<u8>,
}

/// A ready event as the collector saw it.
struct Seen {
    at: Instant,
    correlation_id: String,
    tenant: String,
    newly_issued: bool,
}

async fn one_run(args: &BenchArgs, env: &Env) -> anyhow::Result<RunReport> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let prefix = format!("bench-{run_id}-");
    let load_before = load_average();

    // The issuer, fast while preparing.
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

    // The collector, bound before anything is published.
    let collector = Collector::start(&env.conn, &run_id, &prefix).await?;

    // The worker.
    let mut worker = match args.worker_pid {
        Some(pid) => {
            if let Some(addr) = args.worker_ops_addr {
                wait_ready(addr, None, Duration::from_secs(30)).await?;
            }
            Worker::External(pid)
        }
        None if args.backlog && args.existing == 0 => Worker::NotStarted,
        None => Worker::Child(Box::new(ChildWorker::spawn(args, env, &stub.url()).await?)),
    };
    let publisher = env.conn.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;

    // Earlier phase: tenants that are provisioned before the measured requests.
    let existing: Vec<String> = (0..args.existing)
        .map(|i| format!("{prefix}e{i:06}"))
        .collect();
    if !existing.is_empty() {
        let msgs: Vec<Msg> = existing
            .iter()
            .enumerate()
            .map(|(i, t)| created(&format!("{prefix}pre-{i:06}"), t, i))
            .collect();
        let mut sent = Sent::default();
        publish_all(&publisher, &msgs, None, &mut sent).await?;
        collector
            .wait(
                sent.count,
                true,
                args.timeout,
                args.stall_timeout,
                &mut worker,
            )
            .await
            .context("provisioning the --existing tenants")?;
        if args.backlog && args.worker_pid.is_none() {
            worker.stop().await;
            worker = Worker::NotStarted;
        }
    }
    stub.set_latency(Duration::from_millis(args.issuer_latency_ms));
    let stub_before = stub.stats();

    // The measured requests, shuffled.
    let mut msgs: Vec<Msg> = (0..args.tenants)
        .map(|i| {
            created(
                &format!("{prefix}new-{i:06}"),
                &format!("{prefix}t{i:06}"),
                i,
            )
        })
        .collect();
    let mut rng = rand::rng();
    let mut dups: Vec<usize> = (0..args.tenants).collect();
    dups.shuffle(&mut rng);
    for &i in dups.iter().take(args.duplicates) {
        msgs.push(created(
            &format!("{prefix}new-{i:06}"),
            &format!("{prefix}t{i:06}"),
            i,
        ));
    }
    for (i, t) in existing.iter().enumerate() {
        msgs.push(Msg {
            key: topology::EXTENSION_REQUESTED,
            id: format!("{prefix}ext-{i:06}"),
            body: serde_json::json!({"tenant_id": t, "extension_id": format!("ext-{i}")})
                .to_string()
                .into_bytes(),
        });
    }
    msgs.shuffle(&mut rng);

    let mode = if args.backlog {
        "backlog"
    } else if args.rate.is_some() {
        "rate"
    } else {
        "live"
    };
    let mut sent = Sent::default();
    let batches_before;
    let (start, cpu_before, startup) = if args.backlog {
        // Read the counters first: a stopped worker answers no HTTP request.
        batches_before = worker.batch_counters(args.worker_ops_addr).await;
        if let Worker::External(pid) = worker {
            signal(pid, libc::SIGSTOP)?;
        }
        let published = publish_all(&publisher, &msgs, None, &mut sent).await;
        if let (Err(_), Worker::External(pid)) = (&published, &worker) {
            // Never leave someone else's worker stopped.
            let _ = signal(*pid, libc::SIGCONT);
        }
        published?;
        let _ = reset_peak_rss(worker.pid());
        let cpu_before = CpuSample::take(worker.pid());
        let (start, startup) = match &worker {
            Worker::External(pid) => {
                signal(*pid, libc::SIGCONT)?;
                (Instant::now(), None)
            }
            _ => {
                let child = ChildWorker::spawn(args, env, &stub.url()).await?;
                let start = Instant::now();
                let startup = child.startup;
                worker = Worker::Child(Box::new(child));
                (start, Some(startup))
            }
        };
        (
            start,
            CpuSample::take_for(worker.pid(), cpu_before),
            startup,
        )
    } else {
        batches_before = worker.batch_counters(args.worker_ops_addr).await;
        let _ = reset_peak_rss(worker.pid());
        let cpu_before = CpuSample::take(worker.pid());
        let startup = match &worker {
            Worker::Child(c) => Some(c.startup),
            _ => None,
        };
        let start = Instant::now();
        publish_all(&publisher, &msgs, args.rate, &mut sent).await?;
        (start, cpu_before, startup)
    };

    let wanted = sent.count;
    let seen = collector
        .wait(wanted, false, args.timeout, args.stall_timeout, &mut worker)
        .await?;
    let cpu_after = CpuSample::take(worker.pid());
    let rss = worker
        .pid()
        .and_then(|p| peak_rss_kib(p).ok())
        .map_or(0.0, |k| k as f64 / 1024.0);
    let stub_after = stub.stats();
    let batches_after = worker.batch_counters(args.worker_ops_addr).await;
    let mean_batch = match (batches_before, batches_after) {
        (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => Some((s1 - s0) / (c1 - c0)),
        _ => None,
    };

    // Idle.
    let idle_before = worker.pid().and_then(|p| process_ticks(p).ok());
    let idle_t0 = Instant::now();
    tokio::time::sleep(args.idle).await;
    let idle_after = worker.pid().and_then(|p| process_ticks(p).ok());
    let idle_cpu_percent = match (idle_before, idle_after) {
        (Some(a), Some(b)) => {
            ticks_to_secs(b.saturating_sub(a)) / idle_t0.elapsed().as_secs_f64() * 100.0
        }
        _ => 0.0,
    };

    worker.stop().await;
    collector.stop().await;
    let _ = publisher.close(200, "done".into()).await;
    stub.shutdown().await;

    // Match events to requests.
    let ours: Vec<&Seen> = seen
        .iter()
        .filter(|s| !s.correlation_id.starts_with(&format!("{prefix}pre-")))
        .collect();
    let mut pending = sent.at;
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3)
        .map_err(|e| anyhow!("histogram: {e}"))?;
    let mut extra = 0;
    // A backlog drain starts when the worker does, which may be just before `/readyz` said so.
    let start = if args.backlog {
        ours.iter()
            .map(|s| s.at)
            .min()
            .map_or(start, |first| first.min(start))
    } else {
        start
    };
    let mut last = start;
    let existing_set: HashSet<&str> = existing.iter().map(String::as_str).collect();
    let mut newly: HashSet<&str> = HashSet::new();
    let mut wrongly_new = 0;
    for s in &ours {
        last = last.max(s.at);
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
        if s.newly_issued {
            if existing_set.contains(s.tenant.as_str()) {
                wrongly_new += 1;
            } else {
                newly.insert(s.tenant.as_str());
            }
        }
    }
    let missing: usize = pending.values().map(VecDeque::len).sum();
    let secs = last.saturating_duration_since(start).as_secs_f64();
    let events = ours.len();
    let issue_calls = stub_after.requests.saturating_sub(stub_before.requests);
    let counts_issuer = args.worker_pid.is_none() || issue_calls > 0;
    let machine = cpu_before.delta(&cpu_after, load_before);
    let ok = missing == 0
        && wrongly_new == 0
        && newly.len() == args.tenants
        && (!counts_issuer || issue_calls == args.tenants as u64);
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(RunReport {
        mode: mode.to_owned(),
        published: wanted,
        events,
        missing,
        extra_events: extra,
        newly_issued_tenants: newly.len(),
        wrongly_new,
        issue_calls,
        secs,
        throughput: if secs > 0.0 {
            (events - extra) as f64 / secs
        } else {
            0.0
        },
        latency: Latency {
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: hist.max() as f64 / 1000.0,
        },
        worker_peak_rss_mib: rss,
        worker_cpu_secs: machine.worker_secs,
        worker_cpu_us_per_msg: if wanted > 0 {
            machine.worker_secs * 1e6 / wanted as f64
        } else {
            0.0
        },
        mean_batch,
        idle_cpu_percent,
        startup_ms: startup.map(|d| d.as_secs_f64() * 1000.0),
        machine,
        ok,
    })
}

fn created(id: &str, tenant: &str, i: usize) -> Msg {
    Msg {
        key: topology::TENANT_CREATED,
        id: id.to_owned(),
        body: serde_json::json!({
            "tenant_id": tenant,
            "tenant_name": format!("Bench Customer {i}"),
            "source": "tenant-tokens-bench",
        })
        .to_string()
        .into_bytes(),
    }
}

/// When each request was published, by message id (a duplicate has several).
#[derive(Default)]
struct Sent {
    at: HashMap<String, VecDeque<Instant>>,
    count: usize,
}

/// Publishes every message persistent and confirmed (confirms pipelined), paced at `rate`.
async fn publish_all(
    ch: &Channel,
    msgs: &[Msg],
    rate: Option<f64>,
    sent: &mut Sent,
) -> anyhow::Result<()> {
    const WINDOW: usize = 2048;
    let mut confirms = FuturesUnordered::new();
    let t0 = tokio::time::Instant::now();
    for (i, m) in msgs.iter().enumerate() {
        if let Some(r) = rate {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / r)).await;
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(m.id.as_str().into());
        sent.at
            .entry(m.id.clone())
            .or_default()
            .push_back(Instant::now());
        sent.count += 1;
        let confirm = ch
            .basic_publish(
                topology::EVENTS_EXCHANGE.into(),
                m.key.into(),
                BasicPublishOptions::default(),
                &m.body,
                props,
            )
            .await
            .context("publishing a request")?;
        confirms.push(confirm);
        while confirms.len() >= WINDOW {
            check_confirm(confirms.next().await)?;
        }
        while let Some(Some(c)) = futures::FutureExt::now_or_never(confirms.next()) {
            check_confirm(Some(c))?;
        }
    }
    while !confirms.is_empty() {
        check_confirm(confirms.next().await)?;
    }
    Ok(())
}

fn check_confirm(c: Option<lapin::Result<lapin::Confirmation>>) -> anyhow::Result<()> {
    match c {
        Some(Ok(c)) if c.is_ack() => Ok(()),
        Some(Ok(_)) => bail!("the broker refused (nacked) a request"),
        Some(Err(e)) => Err(anyhow!("publish confirm: {e}")),
        None => Ok(()),
    }
}

/// The collector of ready events: a durable queue (so the broker does the same disk work as
/// for the ceiling's sink), expiring a minute after the bench is gone.
struct Collector {
    channel: Channel,
    queue: String,
    tag: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Events of the earlier phase (`--existing`) and of the measured phase.
    counts: Arc<[AtomicUsize; 2]>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start(conn: &Connection, run_id: &str, prefix: &str) -> anyhow::Result<Self> {
        let channel = conn.create_channel().await?;
        let queue = format!("bench.collector.{run_id}");
        let mut qargs = FieldTable::default();
        qargs.insert("x-expires".into(), AMQPValue::LongLongInt(60_000));
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                qargs,
            )
            .await?;
        channel
            .queue_bind(
                queue.as_str().into(),
                topology::EVENTS_EXCHANGE.into(),
                topology::TOKEN_READY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let tag = format!("bench-collector-{run_id}");
        let mut consumer = channel
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
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let counts: Arc<[AtomicUsize; 2]> = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
        let (sink, counter, prefix) = (seen.clone(), counts.clone(), prefix.to_owned());
        let earlier = format!("{prefix}pre-");
        let task = tokio::spawn(async move {
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
                if let Ok(mut v) = sink.lock() {
                    v.push(seen);
                }
                counter[phase].fetch_add(1, Ordering::Release);
            }
        });
        Ok(Self {
            channel,
            queue,
            tag,
            seen,
            counts,
            task,
        })
    }

    /// Waits until `wanted` events of the earlier (`--existing`) or the measured phase arrived;
    /// returns (and forgets) every event seen so far, with the extra ones that come within a
    /// short grace.
    async fn wait(
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
            let n = self.counts[usize::from(!earlier)].load(Ordering::Acquire);
            if n >= wanted {
                break;
            }
            if n != last_n {
                last_n = n;
                last_progress = Instant::now();
            }
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
            if started.elapsed() > timeout {
                bail!("deadline of {timeout:?} passed with {n} of {wanted} ready events");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Redeliveries would show up right behind; give them a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| anyhow!("collector poisoned"))?;
        Ok(std::mem::take(&mut *seen))
    }

    async fn stop(self) {
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

/// The worker under test.
enum Worker {
    /// Not running yet (backlog mode).
    NotStarted,
    /// Started by the bench.
    Child(Box<ChildWorker>),
    /// Running already (`--worker-pid`).
    External(u32),
}

impl Worker {
    fn pid(&self) -> Option<u32> {
        match self {
            Self::NotStarted => None,
            Self::Child(c) => Some(c.pid),
            Self::External(p) => Some(*p),
        }
    }

    /// `(sum, count)` of the worker's batch-size histogram, when its `/metrics` can be read.
    async fn batch_counters(&self, external_ops: Option<SocketAddr>) -> Option<(f64, f64)> {
        let ops = match self {
            Self::Child(c) => c.ops,
            Self::External(_) => external_ops?,
            Self::NotStarted => return Some((0.0, 0.0)),
        };
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()
            .ok()?;
        let text = http
            .get(format!("http://{ops}/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
        };
        // The histogram appears with the first batch.
        Some((
            value("tenant_tokens_batch_size_sum").unwrap_or(0.0),
            value("tenant_tokens_batch_size_count").unwrap_or(0.0),
        ))
    }

    fn exited(&mut self) -> Option<String> {
        match self {
            Self::Child(c) => match c.child.try_wait() {
                Ok(Some(s)) => Some(s.to_string()),
                _ => None,
            },
            Self::External(p) => {
                (!Path::new(&format!("/proc/{p}")).exists()).then(|| "process gone".to_owned())
            }
            Self::NotStarted => None,
        }
    }

    fn log_tail(&self) -> String {
        match self {
            Self::Child(c) => c
                .tail
                .lock()
                .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
                .unwrap_or_default(),
            _ => "(not started by the bench)".to_owned(),
        }
    }

    async fn stop(&mut self) {
        if let Self::Child(c) = self {
            c.stop().await;
        }
    }
}

/// A worker process started by the bench.
struct ChildWorker {
    child: tokio::process::Child,
    pid: u32,
    ops: SocketAddr,
    startup: Duration,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ChildWorker {
    /// Starts `tenant-tokens run` and waits until `/readyz` answers 200.
    async fn spawn(args: &BenchArgs, env: &Env, issuer_url: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("run")
            .arg(format!("--amqp-url={}", env.amqp_url))
            .arg(format!("--database-url={}", env.database_url))
            .arg(format!("--issuer-url={issuer_url}"))
            .arg("--ops-addr=127.0.0.1:0");
        if let Some(c) = args.concurrency {
            cmd.arg(format!("--concurrency={c}"));
        }
        if let Some(b) = args.batch_size {
            cmd.arg(format!("--batch-size={b}"));
        }
        if let Some(p) = args.db_pool_size {
            cmd.arg(format!("--db-pool-size={p}"));
        }
        cmd.args(&args.worker_args);
        for var in [
            "ISSUER_MASTER_TOKEN_FILE",
            "TOKEN_ENCRYPTION_KEY_FILE",
            "TOKEN_DECRYPTION_KEYS",
        ] {
            cmd.env_remove(var);
        }
        cmd.envs(args.worker_env.iter().map(|(k, v)| (k, v)));
        cmd.env("ISSUER_MASTER_TOKEN", &args.issuer_master_token)
            .env("TOKEN_ENCRYPTION_KEY", EncryptionKey::generate_base64())
            .env("LOG_FORMAT", "json")
            // The ops address is logged by `cli` at info; the bench needs that line.
            .env(
                "RUST_LOG",
                format!("{},tenant_tokens::cli=info", args.worker_log),
            )
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        let t0 = Instant::now();
        let mut child = cmd.spawn().context("starting the worker")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("the worker exited at once"))?;
        let stderr = child
            .stderr
            .take()
            .ok_or_else(|| anyhow!("no stderr of the worker"))?;
        let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
        let (ops_tx, ops_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let mut log_file = match &args.worker_log_file {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            ),
            None => None,
        };
        let sink = tail.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            let mut ops_tx = Some(ops_tx);
            while let Ok(Some(line)) = lines.next_line().await {
                if ops_tx.is_some()
                    && let Some(addr) = ops_address(&line)
                    && let Some(tx) = ops_tx.take()
                {
                    let _ = tx.send(addr);
                }
                if let Some(f) = log_file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if let Ok(mut t) = sink.lock() {
                    if t.len() >= 20 {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            }
        });
        let mut me = Self {
            child,
            pid,
            ops: SocketAddr::from(([127, 0, 0, 1], 0)),
            startup: Duration::ZERO,
            tail,
        };
        let ops = match tokio::time::timeout(Duration::from_secs(30), ops_rx).await {
            Ok(Ok(addr)) => addr,
            _ => {
                let tail = Worker::Child(Box::new(me)).log_tail();
                bail!("the worker did not log its ops address; its last log lines:\n{tail}");
            }
        };
        me.ops = ops;
        if let Err(e) = wait_ready(ops, Some(&mut me.child), Duration::from_secs(60)).await {
            let tail = Worker::Child(Box::new(me)).log_tail();
            bail!("{e:#}; the worker's last log lines:\n{tail}");
        }
        me.startup = t0.elapsed();
        Ok(me)
    }

    /// SIGTERM, then wait (SIGKILL after 30 s).
    async fn stop(&mut self) {
        if signal(self.pid, libc::SIGTERM).is_ok()
            && tokio::time::timeout(Duration::from_secs(30), self.child.wait())
                .await
                .is_ok()
        {
            return;
        }
        let _ = self.child.kill().await;
    }
}

fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

/// The `"ops":"127.0.0.1:PORT"` field of the worker's JSON start-up log line.
fn ops_address(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("\"ops\":\"")? + 7..];
    rest[..rest.find('"')?].parse().ok()
}

/// Polls `/readyz` until it answers 200.
async fn wait_ready(
    addr: SocketAddr,
    mut child: Option<&mut tokio::process::Child>,
    limit: Duration,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("http://{addr}/readyz");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = http.get(&url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Some(c) = child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            bail!("the worker exited ({status}) before it was ready");
        }
        if t0.elapsed() > limit {
            bail!("the worker at {addr} was not ready within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn signal(pid: u32, sig: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| anyhow!("bad pid {pid}"))?;
    // SAFETY: kill(2) with a plain pid and signal number has no memory-safety concerns.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(anyhow!(
            "signal {sig} to {pid}: {}",
            std::io::Error::last_os_error()
        ))
    }
}

// ---------------------------------------------------------------- /proc

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no memory-safety concerns.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

fn ticks_to_secs(t: u64) -> f64 {
    t as f64 / clock_ticks_per_sec()
}

/// utime + stime of a process (all its threads), in clock ticks.
fn process_ticks(pid: u32) -> std::io::Result<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat"))?)
        .ok_or_else(|| std::io::Error::other("unexpected /proc/PID/stat"))
}

fn stat_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of proc(5); `after` starts at field 3.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `VmHWM` (peak resident set) of a process, KiB.
fn peak_rss_kib(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| std::io::Error::other("no VmHWM"))
}

/// Resets `VmHWM` to the current RSS (`clear_refs` 5), so an already running worker's peak is
/// the measured phase's. A fresh child needs none.
fn reset_peak_rss(pid: Option<u32>) -> std::io::Result<()> {
    match pid {
        Some(p) => std::fs::write(format!("/proc/{p}/clear_refs"), "5"),
        None => Ok(()),
    }
}

fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// CPU counters of the machine and its main actors at one moment.
struct CpuSample {
    at: Instant,
    busy: u64,
    cpus: usize,
    worker: Option<u64>,
    /// pid → ticks of RabbitMQ and Postgres processes.
    broker: HashMap<u32, u64>,
    postgres: HashMap<u32, u64>,
    me: u64,
}

impl CpuSample {
    fn take(worker: Option<u32>) -> Self {
        let (busy, cpus) = machine_busy();
        let mut broker = HashMap::new();
        let mut postgres = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for e in dir.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
                    continue;
                };
                let map = match comm.trim() {
                    "beam.smp" => &mut broker,
                    "postgres" => &mut postgres,
                    _ => continue,
                };
                if let Ok(t) = process_ticks(pid) {
                    map.insert(pid, t);
                }
            }
        }
        Self {
            at: Instant::now(),
            busy,
            cpus,
            worker: worker.and_then(|p| process_ticks(p).ok()),
            broker,
            postgres,
            me: process_ticks(std::process::id()).unwrap_or(0),
        }
    }

    /// A sample for a worker that starts after `before` was taken: its own counter starts at 0.
    fn take_for(worker: Option<u32>, mut before: Self) -> Self {
        if before.worker.is_none() && worker.is_some() {
            before.worker = Some(0);
        }
        before
    }

    fn delta(&self, after: &Self, load_before: f64) -> MachineCpu {
        let group = |a: &HashMap<u32, u64>, b: &HashMap<u32, u64>| {
            ticks_to_secs(
                b.iter()
                    .map(|(pid, t)| t.saturating_sub(a.get(pid).copied().unwrap_or(0)))
                    .sum(),
            )
        };
        let worker_secs = match (self.worker, after.worker) {
            (Some(a), Some(b)) => ticks_to_secs(b.saturating_sub(a)),
            _ => 0.0,
        };
        let busy_secs = ticks_to_secs(after.busy.saturating_sub(self.busy));
        let broker_secs = group(&self.broker, &after.broker);
        let postgres_secs = group(&self.postgres, &after.postgres);
        let bench_secs = ticks_to_secs(after.me.saturating_sub(self.me));
        MachineCpu {
            wall_secs: after.at.saturating_duration_since(self.at).as_secs_f64(),
            busy_secs,
            cpus: after.cpus,
            worker_secs,
            broker_secs,
            postgres_secs,
            bench_secs,
            other_secs: (busy_secs - worker_secs - broker_secs - postgres_secs - bench_secs)
                .max(0.0),
            load_before,
        }
    }
}

/// Busy ticks of all CPUs (everything but idle and iowait) and the number of CPUs.
fn machine_busy() -> (u64, usize) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count();
    let busy = stat
        .lines()
        .next()
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse::<u64>().ok())
                .enumerate()
                .filter(|(i, _)| *i != 3 && *i != 4 && *i < 8)
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0);
    (busy, cpus)
}

// ---------------------------------------------------------------- vhost

/// Makes sure the URL's vhost exists, creating it (and guest-like permissions for the URL's
/// user) through the management API when it does not.
async fn ensure_vhost(amqp_url: &str, management: Option<&str>) -> anyhow::Result<()> {
    let parts = AmqpUrlParts::parse(amqp_url)?;
    let base = management
        .map(|m| m.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| format!("http://{}:15672", parts.host));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let vhost = encode_path_segment(&parts.vhost);
    let url = format!("{base}/api/vhosts/{vhost}");
    let auth = |r: reqwest::RequestBuilder| r.basic_auth(&parts.user, Some(&parts.password));
    let exists = match auth(http.get(&url)).send().await {
        Ok(r) if r.status().is_success() => true,
        Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => false,
        // No management API: try the broker as it is; connecting says what is wrong.
        _ => return Ok(()),
    };
    if exists {
        return Ok(());
    }
    let put = auth(http.put(&url)).send().await?;
    if !put.status().is_success() {
        bail!(
            "creating vhost {:?} through {base}: HTTP {}",
            parts.vhost,
            put.status()
        );
    }
    let perm = auth(http.put(format!(
        "{base}/api/permissions/{vhost}/{}",
        encode_path_segment(&parts.user)
    )))
    .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
    .send()
    .await?;
    if !perm.status().is_success() {
        bail!(
            "setting permissions on vhost {:?}: HTTP {}",
            parts.vhost,
            perm.status()
        );
    }
    eprintln!("created vhost {:?}", parts.vhost);
    Ok(())
}

/// What the management API needs of an AMQP URL.
#[derive(Debug, PartialEq)]
struct AmqpUrlParts {
    user: String,
    password: String,
    host: String,
    vhost: String,
}

impl AmqpUrlParts {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .split_once("://")
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("not an AMQP URL: {}", crate::telemetry::redact_url(url)))?;
        let rest = rest.split(['?', '#']).next().unwrap_or(rest);
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (cred, hostport) = authority
            .rsplit_once('@')
            .unwrap_or(("guest:guest", authority));
        let (user, password) = cred.split_once(':').unwrap_or((cred, ""));
        let host = if let Some(v6) = hostport.strip_prefix('[') {
            format!("[{}]", v6.split(']').next().unwrap_or(""))
        } else {
            hostport.split(':').next().unwrap_or("").to_owned()
        };
        Ok(Self {
            user: percent_decode(user),
            password: percent_decode(password),
            host: if host.is_empty() {
                "127.0.0.1".into()
            } else {
                host
            },
            vhost: if path.is_empty() {
                "/".into()
            } else {
                percent_decode(path)
            },
        })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode_path_segment(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

// ---------------------------------------------------------------- report

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

fn summarize(runs: &[RunReport]) -> Summary {
    let m = |f: fn(&RunReport) -> f64| median(runs.iter().map(f).collect());
    let startups: Vec<f64> = runs.iter().filter_map(|r| r.startup_ms).collect();
    Summary {
        throughput: m(|r| r.throughput),
        p50_ms: m(|r| r.latency.p50_ms),
        p95_ms: m(|r| r.latency.p95_ms),
        p99_ms: m(|r| r.latency.p99_ms),
        max_ms: m(|r| r.latency.max_ms),
        worker_peak_rss_mib: m(|r| r.worker_peak_rss_mib),
        worker_cpu_us_per_msg: m(|r| r.worker_cpu_us_per_msg),
        idle_cpu_percent: m(|r| r.idle_cpu_percent),
        startup_ms: (!startups.is_empty()).then(|| median(startups)),
        ok: runs.iter().all(|r| r.ok),
    }
}

fn settings_json(a: &BenchArgs) -> serde_json::Value {
    serde_json::json!({
        "amqp_url": crate::telemetry::redact_url(&a.amqp_url),
        "database_url": crate::telemetry::redact_url(&a.database_url),
        "tenants": a.tenants,
        "duplicates": a.duplicates,
        "existing": a.existing,
        "issuer_latency_ms": a.issuer_latency_ms,
        "rate": a.rate,
        "backlog": a.backlog,
        "concurrency": a.concurrency,
        "batch_size": a.batch_size,
        "db_pool_size": a.db_pool_size,
        "worker_args": a.worker_args,
        "worker_env": a.worker_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "worker_log": a.worker_log,
        "worker_pid": a.worker_pid,
        "runs": a.runs,
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "default".to_owned(), |v| v.to_string())
}

fn print_table(out: &mut impl std::io::Write, a: &BenchArgs, r: &Report) -> std::io::Result<()> {
    writeln!(
        out,
        "tenant-tokens bench: {} new tenants, {} duplicates, {} existing; issuer {} ms; {}; \
         CONCURRENCY {} BATCH_SIZE {} DB_POOL_SIZE {}",
        a.tenants,
        a.duplicates,
        a.existing,
        a.issuer_latency_ms,
        match (a.backlog, a.rate) {
            (true, _) => "backlog".to_owned(),
            (false, Some(rate)) => format!("paced at {rate} msgs/s"),
            (false, None) => "as fast as possible".to_owned(),
        },
        opt(a.concurrency),
        opt(a.batch_size),
        opt(a.db_pool_size),
    )?;
    writeln!(
        out,
        "| run | msgs/s | p50 ms | p95 ms | p99 ms | max ms | issue calls | missing | extra | \
         RSS MiB | CPU s | CPU µs/msg | batch | idle CPU % | start-up ms | broker/pg/bench/other CPU s | load | ok |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"
    )?;
    for (i, x) in r.runs.iter().enumerate() {
        writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.1} | {:.2} | {:.0} | {} | {:.2} | {} | {:.1}/{:.1}/{:.1}/{:.1} | {:.2} | {} |",
            i + 1,
            x.throughput,
            x.latency.p50_ms,
            x.latency.p95_ms,
            x.latency.p99_ms,
            x.latency.max_ms,
            x.issue_calls,
            x.missing,
            x.extra_events,
            x.worker_peak_rss_mib,
            x.worker_cpu_secs,
            x.worker_cpu_us_per_msg,
            x.mean_batch.map_or("-".to_owned(), |b| format!("{b:.1}")),
            x.idle_cpu_percent,
            x.startup_ms.map_or("-".to_owned(), |s| format!("{s:.0}")),
            x.machine.broker_secs,
            x.machine.postgres_secs,
            x.machine.bench_secs,
            x.machine.other_secs,
            x.machine.load_before,
            if x.ok { "✓" } else { "✗" },
        )?;
    }
    let m = &r.median;
    writeln!(
        out,
        "| median | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | | | | {:.1} | | {:.0} | | {:.2} | {} | | | {} |",
        m.throughput,
        m.p50_ms,
        m.p95_ms,
        m.p99_ms,
        m.max_ms,
        m.worker_peak_rss_mib,
        m.worker_cpu_us_per_msg,
        m.idle_cpu_percent,
        m.startup_ms.map_or("-".to_owned(), |s| format!("{s:.0}")),
        if m.ok { "✓" } else { "✗" },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_stat_ticks() {
        let stat = "1234 (tenant tokens) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 40 0 0 20 0 9 0";
        assert_eq!(stat_ticks(stat), Some(290));
        assert_eq!(stat_ticks("garbage"), None);
    }

    #[test]
    fn finds_the_ops_address_in_the_log() {
        let line = r#"{"timestamp":"x","level":"INFO","fields":{"message":"ops endpoints listening","ops":"127.0.0.1:40123"}}"#;
        assert_eq!(
            ops_address(line),
            Some(SocketAddr::from(([127, 0, 0, 1], 40123)))
        );
        assert_eq!(ops_address(r#"{"ops":"nonsense"}"#), None);
        assert_eq!(ops_address("no ops here"), None);
    }

    #[test]
    fn parses_amqp_urls_for_the_management_api() {
        let p = AmqpUrlParts::parse("amqp://guest:g%40st@rabbit:5672/bench").ok();
        assert_eq!(
            p,
            Some(AmqpUrlParts {
                user: "guest".into(),
                password: "g@st".into(),
                host: "rabbit".into(),
                vhost: "bench".into(),
            })
        );
        let root = AmqpUrlParts::parse("amqp://u:p@h/%2f")
            .ok()
            .map(|p| p.vhost);
        assert_eq!(root.as_deref(), Some("/"));
        assert_eq!(encode_path_segment("/"), "%2F");
        assert!(AmqpUrlParts::parse("nonsense").is_err());
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
