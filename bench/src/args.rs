//! The bench's flags, and the checks on them that clap cannot express.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tenant_tokens::configuration::parse_duration;
use tenant_tokens::telemetry::LogFormat;

/// The bench's default broker: the local RabbitMQ, vhost `bench`, so a run never disturbs `/`.
pub const DEFAULT_BENCH_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/bench";
/// The bench's default database, apart from the worker's own `tenant_tokens`.
pub const DEFAULT_BENCH_DATABASE_URL: &str =
    "postgres://postgres@127.0.0.1:5432/tenant_tokens_bench";

/// `tenant-tokens-bench`: measures the `tenant-tokens` worker (`--workers` child processes,
/// or `--worker-pid`) against the stub issuer: throughput, latency, RSS, CPU, start-up; vhost
/// `bench` and database `tenant_tokens_bench` by default.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "tenant-tokens-bench", version, about)]
pub struct BenchArgs {
    /// Log format of the bench itself (level by RUST_LOG); the worker always logs JSON.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
    /// The `tenant-tokens` binary to start as the worker [default: `tenant-tokens` next to
    /// this executable, i.e. what `cargo build --release --workspace` builds].
    #[arg(long, env = "BENCH_WORKER_BIN")]
    pub worker_bin: Option<PathBuf>,
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
    /// `extension.requested` messages per `--existing` tenant in the measured phase, each with
    /// its own message id (e.g. `--existing 10000 --requests-per-existing 100` for a million).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub requests_per_existing: u32,
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
    /// Append the workers' logs (stderr) to this file; by default they are read and dropped.
    #[arg(long)]
    pub worker_log_file: Option<PathBuf>,
    /// Worker processes to start, all with the same settings and encryption key, consuming the
    /// same queue; their CPU is summed, their peak RSS is the largest one's.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), conflicts_with = "worker_pid")]
    pub workers: u32,
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
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub idle: Duration,
    /// Give up a run after this long.
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Give up when no ready event came for this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
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

impl BenchArgs {
    /// Rejects combinations that would measure nothing, before anything is touched.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.tenants + self.existing == 0 {
            bail!("nothing to measure: give -n and/or --existing");
        }
        if let Some(r) = self.rate
            && !(r.is_finite() && r > 0.0)
        {
            bail!("--rate must be a positive number of messages per second");
        }
        Ok(())
    }

    /// The worker binary to start: `--worker-bin`, or `tenant-tokens` next to this executable
    /// (the bench is a separate package, so it can no longer start itself as the worker).
    /// Checked up front, so a missing build fails before any broker or database work.
    pub fn resolve_worker_bin(&self) -> anyhow::Result<PathBuf> {
        let path = match &self.worker_bin {
            Some(p) => p.clone(),
            None => {
                let me = std::env::current_exe().context("finding this executable")?;
                let dir = me
                    .parent()
                    .with_context(|| format!("{} has no parent directory", me.display()))?;
                dir.join(format!("tenant-tokens{}", std::env::consts::EXE_SUFFIX))
            }
        };
        if !path.is_file() {
            bail!(
                "the worker binary {} does not exist: run `cargo build --release --workspace` \
                 first (or pass --worker-bin PATH)",
                path.display()
            );
        }
        Ok(path)
    }
}

/// `NAME=VALUE` of `--worker-env`.
fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not NAME=VALUE")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_worker_env_pairs() {
        assert_eq!(
            parse_env_pair("A=b=c"),
            Ok(("A".to_owned(), "b=c".to_owned()))
        );
        assert!(parse_env_pair("=x").is_err());
        assert!(parse_env_pair("nothing").is_err());
    }

    #[test]
    fn workers_default_to_one_and_exclude_an_external_worker() {
        use clap::Parser as _;
        let parse = |a: &[&str]| BenchArgs::try_parse_from([&["tenant-tokens-bench"], a].concat());
        assert_eq!(parse(&[]).map(|a| a.workers).ok(), Some(1));
        assert_eq!(parse(&["--workers", "2"]).map(|a| a.workers).ok(), Some(2));
        assert!(parse(&["--workers", "0"]).is_err());
        assert!(parse(&["--workers", "2", "--worker-pid", "1"]).is_err());
        assert!(parse(&["--worker-pid", "1"]).is_ok());
    }
}
