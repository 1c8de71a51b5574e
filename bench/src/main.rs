//! `tenant-tokens-bench`: the measuring instrument for issue 4 (performance). It is a
//! workspace member of its own because it measures the worker from outside: the worker is
//! the `tenant-tokens` binary, started as a child process (or `--workers N` of them).
//!
//! Against the RabbitMQ and Postgres it is pointed at — by default a dedicated vhost `bench`
//! (created through the management API when missing) and the database `tenant_tokens_bench`,
//! so it never disturbs the `/` vhost — one run:
//!
//! 1. prepares: vhost, topology and migrations (so the worker starts "with migrations applied");
//! 2. starts the stub issuer in this process (`--issuer-latency-ms`);
//! 3. starts the worker as a child process (`tenant-tokens run`, the binary next to this one
//!    or `--worker-bin`), so its peak RSS (`VmHWM`) and CPU time (`utime + stime`) can be read
//!    from `/proc` — with `--workers N`, N of them at once, sharing the queue, the database
//!    and one encryption key — or, with `--worker-pid`, measures a worker that is already
//!    running (start it with `ISSUER_URL` pointing at a fixed `--stub-addr` and the same
//!    `--issuer-master-token`);
//! 4. binds a collector queue for `tenant.token.ready` before anything is published;
//! 5. with `--existing M`, provisions M tenants first (not measured);
//! 6. publishes N `tenant.created` (`-n`), K duplicates (`--duplicates`, same message id) and
//!    M `extension.requested` for the tenants of step 5, shuffled: as fast as the broker takes
//!    them, paced at `--rate R` msgs/s, or (`--backlog`) all of them before the workers start;
//! 7. waits for one ready event per published request (with a deadline, and a clear error when
//!    events stop coming), then measures the workers' idle CPU for `--idle`.
//!
//! It reports throughput (first publish → last ready event; in backlog mode workers ready →
//! last ready event), publish→ready latency percentiles (an event is matched to its request by
//! its `correlation_id`, the request's `message_id`), issue calls (stub counters), missing and
//! extra events, the worker's peak RSS (with several, the largest), CPU seconds and idle CPU
//! (with several, all together) and start-up time (the slowest), plus what the broker,
//! Postgres and everything else on the machine used meanwhile (the noise). `--runs` repeats
//! the whole thing and reports medians. The exit status is 1 when a correctness check
//! failed (a missing event, a wrong number of issue calls or of `newly_issued` events) or the
//! bench failed, 2 for a usage error.
//!
//! Layout: [`args`] (flags), [`run`] (one run, step by step), [`worker`] (the worker processes),
//! [`collector`] (ready events), [`publish`] (requests), [`metrics`] (the worker's
//! `/metrics`), [`procfs`] (CPU and memory from `/proc`), [`vhost`] (management API),
//! [`report`] (figures, medians, table).

mod args;
mod collector;
mod metrics;
mod procfs;
mod publish;
mod report;
mod run;
mod vhost;
mod worker;

use std::io::Write as _;
use std::process::ExitCode;

use anyhow::Context as _;

use crate::args::BenchArgs;
use crate::report::{Report, print_table, progress_line};
use crate::run::{Env, one_run};

fn main() -> ExitCode {
    tenant_tokens::cli::main_with(|args: BenchArgs| async move {
        tenant_tokens::telemetry::init_tracing(args.log_format, "warn");
        match bench(args).await {
            Ok(all_checks_held) => Ok(if all_checks_held { 0 } else { 1 }),
            Err(e) => Err(tenant_tokens::cli::Failure::new(1, e)),
        }
    })
}

/// Runs the bench; `Ok(true)` when every correctness check held.
async fn bench(args: BenchArgs) -> anyhow::Result<bool> {
    args.validate()?;
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
        progress_line(&mut err, &report)?;
        runs.push(report);
    }
    let _ = env.conn.close(200, "bench done".into()).await;
    let report = Report::new(&args, runs);
    let ok = report.median.ok;
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
