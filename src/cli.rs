//! The command line (contract §9). Exit status: 0 done, 1 failure, 2 usage or configuration
//! error (including `run` refusing to start), 3 not found.

use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, topology};
use crate::configuration::{BrokerArgs, ConfigError, DatabaseArgs, Delays, KeyArgs, RunArgs};
use crate::crypto::EncryptionKey;
use crate::domain::TenantId;
use crate::event::rfc3339;
use crate::health::Health;
use crate::telemetry::{self, LogFormat};
use crate::worker::Worker;

/// `tenant-tokens`: provisions one webtask tenant token per tenant from RabbitMQ events.
#[derive(Parser, Debug)]
#[command(name = "tenant-tokens", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format (level by RUST_LOG).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Json, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// The worker: consume requests until SIGTERM/SIGINT, then drain and exit 0.
    Run(Box<RunArgs>),
    /// Apply database migrations and declare the broker topology, then exit.
    Migrate(MigrateArgs),
    /// Print a fresh base64 encryption key for TOKEN_ENCRYPTION_KEY.
    Keygen,
    /// Stored tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Inspect, replay and purge dead letters in tenant-tokens.dead.
    Dlq {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(subcommand)]
        command: crate::dlq::DlqCommand,
    },
    /// A local stand-in for the webtask issuer, with latency and failure injection.
    StubIssuer(crate::stub_issuer::StubArgs),
    /// The whole flow on this machine with the stub issuer, with progress and a summary.
    Demo(crate::demo::DemoArgs),
    /// Measure the worker (a child process, or --worker-pid) against the stub issuer:
    /// throughput, latency, RSS, CPU, start-up; vhost `bench` and database
    /// `tenant_tokens_bench` by default.
    Bench(Box<crate::bench::BenchArgs>),
}

/// `migrate`.
#[derive(clap::Args, Debug)]
pub struct MigrateArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// Delays of the retry queues to declare (as for `run`).
    #[arg(long, env = "RETRY_DELAYS", default_value = "1s,5s,30s,2m,10m", value_parser = crate::configuration::parse_delays_arg)]
    retry_delays: Delays,
}

/// `token ...`.
#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// A tenant's stored token: metadata, and the token itself only with --reveal.
    Show {
        /// The tenant id.
        tenant: String,
        /// Print the token itself (needs TOKEN_ENCRYPTION_KEY).
        #[arg(long)]
        reveal: bool,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Tokens the issuer handed out that never became a tenant's stored token (to revoke by jti).
    Orphans {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        database: DatabaseArgs,
    },
}

/// A command's failure with its exit status.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    fn new(code: u8, error: impl Into<anyhow::Error>) -> Self {
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
    let cli = match Cli::try_parse() {
        Ok(c) => c,
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
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            eprintln!("error: {:#}", f.error);
            ExitCode::from(f.code)
        }
    }
}

/// Runs one command; `Ok` carries the exit status of a command that finished its job.
pub async fn dispatch(cli: Cli) -> Result<u8, Failure> {
    match cli.command {
        Command::Run(args) => {
            telemetry::init_tracing(cli.log_format, "info");
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
        Command::Token(TokenCommand::Show {
            tenant,
            reveal,
            json,
            database,
            key,
        }) => {
            telemetry::init_tracing(cli.log_format, "warn");
            token_show(&tenant, reveal, json, &database, &key).await
        }
        Command::Token(TokenCommand::Orphans { json, database }) => {
            telemetry::init_tracing(cli.log_format, "warn");
            token_orphans(json, &database).await
        }
        Command::Dlq { broker, command } => {
            telemetry::init_tracing(cli.log_format, "warn");
            let mut out = std::io::stdout();
            let code = crate::dlq::run(command, &broker.amqp_url, &mut out).await?;
            Ok(u8::try_from(code).unwrap_or(1))
        }
        Command::StubIssuer(args) => {
            telemetry::init_tracing(cli.log_format, "info");
            crate::stub_issuer::run(args).await?;
            Ok(0)
        }
        Command::Demo(args) => {
            telemetry::init_tracing(cli.log_format, "warn");
            Ok(if crate::demo::run(args).await? { 0 } else { 1 })
        }
        Command::Bench(args) => {
            telemetry::init_tracing(cli.log_format, "warn");
            Ok(if crate::bench::run(*args).await? {
                0
            } else {
                1
            })
        }
    }
}

/// Cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested: draining");
        t.cancel();
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn run(args: RunArgs) -> Result<u8, Failure> {
    let settings = args.into_settings()?;
    telemetry::describe_metrics();
    let shutdown = shutdown_on_signals();
    let health = Arc::new(Health::default());
    let ops = crate::ops::serve(settings.ops_addr, health.clone(), shutdown.clone())
        .await
        .map_err(|e| Failure::new(2, anyhow::anyhow!("OPS_ADDR {}: {e}", settings.ops_addr)))?;
    tracing::info!(ops = %ops, "ops endpoints listening");
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
            anyhow::anyhow!("connect to {}: {e}", broker::redact(&args.broker.amqp_url))
        })?;
    let ch = conn.create_channel().await.map_err(anyhow::Error::from)?;
    topology::declare(&ch, &args.retry_delays.0)
        .await
        .map_err(|e| anyhow::anyhow!("declaring the topology: {e}"))?;
    let _ = conn.close(200, "done".into()).await;
    tracing::info!("broker topology declared");
    Ok(0)
}

async fn token_show(
    tenant: &str,
    reveal: bool,
    json: bool,
    database: &DatabaseArgs,
    key: &KeyArgs,
) -> Result<u8, Failure> {
    let id = TenantId::parse(tenant).map_err(|e| Failure::new(2, anyhow::anyhow!(e)))?;
    let cipher = if reveal { Some(key.cipher()?) } else { None };
    let store = database.connect().await?;
    let row = store
        .tenant(id.as_str())
        .await
        .map_err(anyhow::Error::from)?;
    let Some((row, token)) = row.and_then(|r| r.token.clone().map(|t| (r, t))) else {
        return Err(Failure::new(
            3,
            anyhow::anyhow!("tenant {id} has no stored token"),
        ));
    };
    let revealed = match (&cipher, &token.sealed) {
        (Some(c), Some(sealed)) => Some(
            c.open(&id, sealed)
                .map_err(|e| anyhow::anyhow!("tenant {id}: {e}"))?,
        ),
        _ => None,
    };
    let mut out = std::io::stdout().lock();
    let issued_at = rfc3339(token.issued_at);
    let written = if json {
        let mut obj = serde_json::json!({
            "tenant_id": row.tenant_id,
            "container": row.container,
            "token_fingerprint": token.fingerprint,
            "issued_at": issued_at,
        });
        if let Some(t) = &revealed {
            obj["token"] = serde_json::Value::String(t.expose().to_owned());
        }
        writeln!(out, "{obj}")
    } else {
        let mut text = format!(
            "tenant:      {}\ncontainer:   {}\nfingerprint: {}\nissued_at:   {}\njti:         {}\nkey_id:      {}\n",
            row.tenant_id,
            row.container,
            token.fingerprint,
            issued_at,
            token.jti.as_deref().unwrap_or("-"),
            token.sealed.as_ref().map_or("-", |s| s.key_id.as_str()),
        );
        match &revealed {
            Some(t) => text.push_str(&format!("token:       {}\n", t.expose())),
            None => text.push_str("token:       (hidden; --reveal prints it)\n"),
        }
        out.write_all(text.as_bytes())
    };
    written.map_err(|e| anyhow::anyhow!("writing output: {e}"))?;
    Ok(0)
}

async fn token_orphans(json: bool, database: &DatabaseArgs) -> Result<u8, Failure> {
    let store = database.connect().await?;
    let orphans = crate::store::orphaned_tokens(store.pool())
        .await
        .map_err(anyhow::Error::from)?;
    let mut out = std::io::stdout().lock();
    let mut text = String::new();
    if !json {
        text.push_str(&format!("{} orphaned token(s)\n", orphans.len()));
    }
    for (t, at) in &orphans {
        if json {
            let line = serde_json::json!({
                "tenant_id": t.tenant_id,
                "container": t.container,
                "token_fingerprint": t.fingerprint,
                "jti": t.jti,
                "issued_at": rfc3339(*at),
            });
            text.push_str(&format!("{line}\n"));
        } else {
            text.push_str(&format!(
                "{}  {}  {}  jti={}  {}\n",
                rfc3339(*at),
                t.tenant_id,
                t.container,
                t.jti.as_deref().unwrap_or("-"),
                t.fingerprint
            ));
        }
    }
    out.write_all(text.as_bytes())
        .map_err(|e| anyhow::anyhow!("writing output: {e}"))?;
    Ok(0)
}
