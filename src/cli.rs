//! The command line (contract §9). Exit status: 0 done, 1 failure, 2 usage or configuration
//! error (including `run` refusing to start), 3 not found.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use crate::broker::{self, topology};
use crate::configuration::{BrokerArgs, ConfigError, DatabaseArgs, Delays, RunArgs};
use crate::crypto::EncryptionKey;
use crate::ops::health::Health;
use crate::pipeline::worker::Worker;
use crate::telemetry::{self, LogFormat};

/// `tenant-tokens`: provisions one webtask tenant token per tenant from RabbitMQ events.
#[derive(Parser, Debug)]
#[command(name = "tenant-tokens", version, about, propagate_version = true)]
pub(crate) struct Cli {
    /// Log format (level by RUST_LOG).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json, global = true)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// The worker: consume requests until SIGTERM/SIGINT, then drain and exit 0.
    Run(Box<RunArgs>),
    /// Apply database migrations and declare the broker topology, then exit.
    Migrate(MigrateArgs),
    /// Print a fresh base64 encryption key for TOKEN_ENCRYPTION_KEY.
    Keygen,
    /// Re-encrypt every stored token with TOKEN_ENCRYPTION_KEY (online, in batches, resumable),
    /// so retired keys can be dropped.
    Rekey(crate::tools::rekey::RekeyArgs),
    /// Stored tokens.
    #[command(subcommand)]
    Token(crate::tools::token::TokenCommand),
    /// Inspect, replay and purge dead letters in tenant-tokens.dead.
    Dlq {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(subcommand)]
        command: crate::tools::dlq::DlqCommand,
    },
    /// A local stand-in for the webtask issuer, with latency and failure injection.
    StubIssuer(crate::tools::stub_issuer::StubArgs),
    /// The whole flow on this machine with the stub issuer, with progress and a summary.
    Demo(crate::tools::demo::DemoArgs),
    /// Exit 0 if the worker at OPS_ADDR is ready (alive with --live), else 1: the image's
    /// HEALTHCHECK, which has no curl to call /readyz with.
    Healthcheck(crate::tools::healthcheck::HealthcheckArgs),
}

/// `migrate`.
#[derive(clap::Args, Debug)]
pub(crate) struct MigrateArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Delays of the retry queues to declare (as for `run`).
    #[arg(long, env = "RETRY_DELAYS", default_value = "1s,5s,30s,2m,10m", value_parser = crate::configuration::parse_delays_arg)]
    retry_delays: Delays,
}

/// A command's failure with its exit status.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// A failure that exits with `code`.
    pub fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
        Self {
            code,
            error: error.into(),
        }
    }
}

impl From<ConfigError> for Failure {
    fn from(e: ConfigError) -> Self {
        Self::new(2, e)
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Self::new(1, e)
    }
}

/// Parses the command line and runs it.
pub fn main() -> ExitCode {
    main_with(dispatch)
}

/// The `main` of every binary of the workspace: parses the command line as `P` (usage errors
/// exit 2, `--help` 0), runs `command` on a multi-threaded runtime, and turns its result into
/// the exit status, printing a failure on stderr.
pub fn main_with<P, F, Fut>(command: F) -> ExitCode
where
    P: Parser,
    F: FnOnce(P) -> Fut,
    Fut: std::future::Future<Output = Result<u8, Failure>>,
{
    let args = match P::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(command(args)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

/// Runs one command; `Ok` carries the exit status of a command that finished its job.
pub(crate) async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Run(args) => {
            let _traces = telemetry::init_tracing_with_traces(cli.log_format, "info");
            run(*args).await
        }
        Command::Migrate(args) => {
            telemetry::init_tracing(cli.log_format, "info");
            migrate(args).await
        }
        Command::Keygen => {
            println!("{}", EncryptionKey::generate_base64());
            Ok(0)
        }
        Command::Token(command) => {
            telemetry::init_tracing(cli.log_format, "warn");
            crate::tools::token::run(command).await
        }
        Command::Rekey(args) => {
            telemetry::init_tracing(cli.log_format, "warn");
            crate::tools::rekey::run(args).await
        }
        Command::Dlq { broker, command } => {
            telemetry::init_tracing(cli.log_format, "warn");
            let mut out = std::io::stdout();
            let code = crate::tools::dlq::run(command, &broker.amqp_url, &mut out).await?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::StubIssuer(args) => {
            telemetry::init_tracing(cli.log_format, "info");
            crate::tools::stub_issuer::run(args).await?;
            Ok(0)
        }
        Command::Demo(args) => {
            telemetry::init_tracing(cli.log_format, "warn");
            Ok(if crate::tools::demo::run(args).await? {
                0
            } else {
                1
            })
        }
        Command::Healthcheck(args) => crate::tools::healthcheck::run(args).await,
    }
}

async fn run(args: RunArgs) -> Result<u8, Failure> {
    let settings = args.into_settings()?;
    telemetry::describe_metrics();
    let shutdown = crate::shutdown::on_signals();
    let health = Arc::new(Health::default());
    let console =
        crate::ops::console::Console::new(settings.amqp_url.clone(), settings.ops_token.clone());
    let actions = if settings.ops_token.is_some() {
        "enabled (OPS_TOKEN)"
    } else {
        "disabled (no OPS_TOKEN)"
    };
    let ops = crate::ops::serve_with_console(
        settings.ops_addr,
        health.clone(),
        Some(console),
        shutdown.clone(),
    )
    .await
    .map_err(|e| Failure::new(2, anyhow::anyhow!("OPS_ADDR {}: {e}", settings.ops_addr)))?;
    tracing::info!(ops = %ops, console = %format!("http://{ops}/dlq"), console_actions = actions, "ops endpoints listening");
    let Some(worker) = Worker::build(settings, health.clone(), shutdown.clone()).await? else {
        return Ok(0);
    };
    worker.run().await?;
    health.set_draining();
    tracing::info!("stopped");
    Ok(0)
}

async fn migrate(args: MigrateArgs) -> Result<u8, Failure> {
    let store = args.database.connect().await?;
    store.migrate().await.map_err(anyhow::Error::from)?;
    tracing::info!("database migrated");
    let conn = broker::connect(&args.broker.amqp_url, "tenant-tokens migrate")
        .await
        .map_err(|e| {
            anyhow::anyhow!(
                "connect to {}: {e}",
                crate::telemetry::redact_url(&args.broker.amqp_url)
            )
        })?;
    let ch = conn.create_channel().await.map_err(anyhow::Error::from)?;
    topology::declare(&ch, &args.retry_delays.0)
        .await
        .map_err(|e| anyhow::anyhow!("declaring the topology: {e}"))?;
    let _ = conn.close(200, "done".into()).await;
    tracing::info!("broker topology declared");
    Ok(0)
}
