//! The figures of a run, their medians over the runs, and how they are printed (a Markdown
//! table, as pasted into BENCHMARKS.md, or one JSON document).

use std::io::Write;

use serde::Serialize;
use tenant_tokens::telemetry::redact_url;

use crate::args::BenchArgs;

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
    /// The workers, all together.
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
    /// Peak resident set of the worker (`VmHWM`), MiB: per worker, the largest.
    pub worker_peak_rss_mib: f64,
    /// Worker CPU seconds (user + system) over the measured phase, all workers together.
    pub worker_cpu_secs: f64,
    /// Worker CPU per request (all workers together), microseconds.
    pub worker_cpu_us_per_msg: f64,
    /// Mean deliveries per batch in the measured phase (from the workers' `/metrics`, over
    /// all of them).
    pub mean_batch: Option<f64>,
    /// Worker CPU while idle after the run (all workers together), percent of one core.
    pub idle_cpu_percent: f64,
    /// Worker process start → `/readyz` 200, milliseconds: the slowest of the started
    /// workers (started ones only).
    pub startup_ms: Option<f64>,
    /// The database's size after the measured phase, MiB.
    pub database_mib: f64,
    /// How much the database grew during the measured phase, MiB.
    pub database_growth_mib: f64,
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
    /// Median peak RSS (per worker, the largest), MiB.
    pub worker_peak_rss_mib: f64,
    /// Median worker CPU per request (all workers together), µs.
    pub worker_cpu_us_per_msg: f64,
    /// Median idle CPU (all workers together), percent of a core.
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

impl Report {
    /// The report of `runs` made with `args`, with their medians.
    pub fn new(args: &BenchArgs, runs: Vec<RunReport>) -> Self {
        let median = summarize(&runs);
        Self {
            settings: settings_json(args),
            runs,
            median,
        }
    }
}

/// The one-line progress note printed to stderr after each run.
pub fn progress_line(out: &mut impl Write, report: &RunReport) -> std::io::Result<()> {
    writeln!(
        out,
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
    )
}

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
        "amqp_url": redact_url(&a.amqp_url),
        "database_url": redact_url(&a.database_url),
        "tenants": a.tenants,
        "duplicates": a.duplicates,
        "existing": a.existing,
        "requests_per_existing": a.requests_per_existing,
        "issuer_latency_ms": a.issuer_latency_ms,
        "rate": a.rate,
        "backlog": a.backlog,
        "concurrency": a.concurrency,
        "batch_size": a.batch_size,
        "db_pool_size": a.db_pool_size,
        "worker_args": a.worker_args,
        "worker_env": a.worker_env.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
        "worker_log": a.worker_log,
        "workers": a.workers,
        "worker_pid": a.worker_pid,
        "runs": a.runs,
    })
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "default".to_owned(), |v| v.to_string())
}

/// The settings line and a Markdown table: one row per run, then the medians.
pub fn print_table(out: &mut impl Write, a: &BenchArgs, r: &Report) -> std::io::Result<()> {
    print_settings(out, a)?;
    writeln!(
        out,
        "| run | msgs/s | p50 ms | p95 ms | p99 ms | max ms | issue calls | missing | extra | \
         RSS MiB | CPU s | CPU µs/msg | batch | idle CPU % | start-up ms | DB MiB (+growth) | broker/pg/bench/other CPU s | load | ok |"
    )?;
    writeln!(
        out,
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"
    )?;
    for (i, x) in r.runs.iter().enumerate() {
        print_run_row(out, i + 1, x)?;
    }
    print_median_row(out, &r.median)
}

fn print_settings(out: &mut impl Write, a: &BenchArgs) -> std::io::Result<()> {
    writeln!(
        out,
        "tenant-tokens bench: {} new tenants, {} duplicates, {} existing × {} requests; issuer {} ms; {}; \
         CONCURRENCY {} BATCH_SIZE {} DB_POOL_SIZE {}, {}",
        a.tenants,
        a.duplicates,
        a.existing,
        a.requests_per_existing,
        a.issuer_latency_ms,
        match (a.backlog, a.rate) {
            (true, _) => "backlog".to_owned(),
            (false, Some(rate)) => format!("paced at {rate} msgs/s"),
            (false, None) => "as fast as possible".to_owned(),
        },
        opt(a.concurrency),
        opt(a.batch_size),
        opt(a.db_pool_size),
        workers(a),
    )
}

/// Which workers were measured: how many the bench started, or the external one.
fn workers(a: &BenchArgs) -> String {
    match (a.worker_pid, a.workers) {
        (Some(pid), _) => format!("worker pid {pid}"),
        (None, 1) => "1 worker".to_owned(),
        (None, n) => format!("{n} workers"),
    }
}

fn print_run_row(out: &mut impl Write, n: usize, x: &RunReport) -> std::io::Result<()> {
    writeln!(
        out,
        "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {:.1} | {:.2} | {:.0} | {} | {:.2} | {} | {:.1} (+{:.1}) | {:.1}/{:.1}/{:.1}/{:.1} | {:.2} | {} |",
        n,
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
        x.database_mib,
        x.database_growth_mib,
        x.machine.broker_secs,
        x.machine.postgres_secs,
        x.machine.bench_secs,
        x.machine.other_secs,
        x.machine.load_before,
        if x.ok { "✓" } else { "✗" },
    )
}

fn print_median_row(out: &mut impl Write, m: &Summary) -> std::io::Result<()> {
    writeln!(
        out,
        "| median | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | | | | {:.1} | | {:.0} | | {:.2} | {} | | | | {} |",
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
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        assert_eq!(median(vec![]), 0.0);
    }
}
