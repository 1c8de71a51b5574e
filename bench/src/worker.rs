//! The worker under test: started by the bench as a child process of the `tenant-tokens`
//! binary (so its peak RSS and CPU time can be read from `/proc`), or one that runs already
//! (`--worker-pid`).

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use tenant_tokens::crypto::EncryptionKey;
use tokio::io::AsyncBufReadExt as _;
use tokio::process::ChildStderr;

use crate::args::BenchArgs;
use crate::run::Env;

/// How many of the worker's last log lines are kept for error messages.
const LOG_TAIL_LINES: usize = 20;

/// The worker under test.
pub enum Worker {
    /// Not running yet (backlog mode).
    NotStarted,
    /// Started by the bench.
    Child(Box<ChildWorker>),
    /// Running already (`--worker-pid`).
    External(u32),
}

impl Worker {
    /// Its process id, when it runs.
    pub fn pid(&self) -> Option<u32> {
        match self {
            Self::NotStarted => None,
            Self::Child(c) => Some(c.pid),
            Self::External(p) => Some(*p),
        }
    }

    /// `(sum, count)` of the worker's batch-size histogram, when its `/metrics` can be read
    /// (for an external worker only with `--worker-ops-addr`).
    pub async fn batch_counters(&self, external_ops: Option<SocketAddr>) -> Option<(f64, f64)> {
        let ops = match self {
            Self::Child(c) => c.ops,
            Self::External(_) => external_ops?,
            Self::NotStarted => return Some((0.0, 0.0)),
        };
        crate::metrics::batch_counters(ops).await
    }

    /// How it ended, if it did.
    pub fn exited(&mut self) -> Option<String> {
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

    /// Its last log lines, for error messages.
    pub fn log_tail(&self) -> String {
        match self {
            Self::Child(c) => c.log_tail(),
            _ => "(not started by the bench)".to_owned(),
        }
    }

    /// Stops a worker the bench started; leaves an external one alone.
    pub async fn stop(&mut self) {
        if let Self::Child(c) = self {
            c.stop().await;
        }
    }
}

/// A worker process started by the bench.
pub struct ChildWorker {
    child: tokio::process::Child,
    pid: u32,
    ops: SocketAddr,
    /// Process start → `/readyz` 200.
    pub startup: Duration,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ChildWorker {
    /// Starts `tenant-tokens run` and waits until `/readyz` answers 200.
    pub async fn spawn(args: &BenchArgs, env: &Env, issuer_url: &str) -> anyhow::Result<Self> {
        let mut cmd = worker_command(args, env, issuer_url)?;
        let log_file = match &args.worker_log_file {
            Some(p) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("opening {}", p.display()))?,
            ),
            None => None,
        };
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
        let ops_rx = read_log(stderr, log_file, tail.clone());
        let mut me = Self {
            child,
            pid,
            ops: SocketAddr::from(([127, 0, 0, 1], 0)),
            startup: Duration::ZERO,
            tail,
        };
        me.ops = match tokio::time::timeout(Duration::from_secs(30), ops_rx).await {
            Ok(Ok(addr)) => addr,
            _ => bail!(
                "the worker did not log its ops address; its last log lines:\n{}",
                me.log_tail()
            ),
        };
        if let Err(e) = wait_ready(me.ops, Some(&mut me.child), Duration::from_secs(60)).await {
            bail!("{e:#}; the worker's last log lines:\n{}", me.log_tail());
        }
        me.startup = t0.elapsed();
        Ok(me)
    }

    fn log_tail(&self) -> String {
        self.tail
            .lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
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

/// `tenant-tokens run` against the bench's broker, database and stub issuer, with a fresh
/// encryption key, JSON logs on a pipe and the ops endpoints on a free port.
fn worker_command(
    args: &BenchArgs,
    env: &Env,
    issuer_url: &str,
) -> anyhow::Result<tokio::process::Command> {
    let bin = env
        .worker_bin
        .as_deref()
        .ok_or_else(|| anyhow!("no worker binary to start"))?;
    let mut cmd = tokio::process::Command::new(bin);
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
    Ok(cmd)
}

/// Reads the worker's log until it closes: keeps the last lines in `tail`, appends them to
/// `log_file`, and sends the ops address of the start-up line on the returned channel.
fn read_log(
    stderr: ChildStderr,
    mut log_file: Option<std::fs::File>,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> tokio::sync::oneshot::Receiver<SocketAddr> {
    let (ops_tx, ops_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
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
            if let Ok(mut t) = tail.lock() {
                if t.len() >= LOG_TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(line);
            }
        }
    });
    ops_rx
}

/// The `"ops":"127.0.0.1:PORT"` field of the worker's JSON start-up log line.
fn ops_address(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("\"ops\":\"")? + 7..];
    rest[..rest.find('"')?].parse().ok()
}

/// Polls `/readyz` until it answers 200 (the worker offers no other way to learn it is
/// ready); fails when `child` exits first or after `limit`.
pub async fn wait_ready(
    addr: SocketAddr,
    mut child: Option<&mut tokio::process::Child>,
    limit: Duration,
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let url = format!("http://{addr}/readyz");
    let t0 = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(2));
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        poll.tick().await;
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
    }
}

/// Sends `sig` to `pid` (SIGSTOP/SIGCONT for `--backlog` with `--worker-pid`, SIGTERM to stop).
pub fn signal(pid: u32, sig: libc::c_int) -> anyhow::Result<()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
