//! The worker under test: started by the bench as one or more child processes of the
//! `tenant-tokens` binary (`--workers`; so their peak RSS and CPU time can be read from
//! `/proc`), or one that runs already (`--worker-pid`).

use std::collections::VecDeque;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::future::{join_all, try_join_all};
use secrecy::{ExposeSecret as _, SecretString};
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
    /// Started by the bench: `--workers` processes (at least one) on the same queue.
    Children(Vec<ChildWorker>),
    /// Running already (`--worker-pid`).
    External(u32),
}

impl Worker {
    /// The process ids of the running workers (none before they start).
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Self::NotStarted => Vec::new(),
            Self::Children(cs) => cs.iter().map(|c| c.pid).collect(),
            Self::External(p) => vec![*p],
        }
    }

    /// Start-up of the started workers: the slowest one's, since the run waits for all.
    pub fn startup(&self) -> Option<Duration> {
        match self {
            Self::Children(cs) => cs.iter().map(|c| c.startup).max(),
            _ => None,
        }
    }

    /// `(sum, count)` of the workers' batch-size histograms, summed over the started workers,
    /// when every `/metrics` can be read (for an external worker only with
    /// `--worker-ops-addr`).
    pub async fn batch_counters(&self, external_ops: Option<SocketAddr>) -> Option<(f64, f64)> {
        let ops: Vec<SocketAddr> = match self {
            Self::Children(cs) => cs.iter().map(|c| c.ops).collect(),
            Self::External(_) => vec![external_ops?],
            Self::NotStarted => return Some((0.0, 0.0)),
        };
        join_all(ops.into_iter().map(crate::metrics::batch_counters))
            .await
            .into_iter()
            .try_fold((0.0, 0.0), |(s, c), x| x.map(|(s1, c1)| (s + s1, c + c1)))
    }

    /// How the first worker that ended ended, if one did (naming it when there are several).
    pub fn exited(&mut self) -> Option<String> {
        match self {
            Self::Children(cs) => {
                let n = cs.len();
                cs.iter_mut().enumerate().find_map(|(i, c)| {
                    let status = c.exited()?;
                    Some(if n > 1 {
                        format!("worker {} of {n}, pid {}: {status}", i + 1, c.pid)
                    } else {
                        status
                    })
                })
            }
            Self::External(p) => {
                (!Path::new(&format!("/proc/{p}")).exists()).then(|| "process gone".to_owned())
            }
            Self::NotStarted => None,
        }
    }

    /// The last log lines of the first worker that ended, or else of the first one, for error
    /// messages.
    pub fn log_tail(&mut self) -> String {
        match self {
            Self::Children(cs) => {
                let i = cs.iter_mut().position(|c| c.exited().is_some());
                cs.get(i.unwrap_or(0))
                    .map_or_else(String::new, ChildWorker::log_tail)
            }
            _ => "(not started by the bench)".to_owned(),
        }
    }

    /// Stops the workers the bench started, all at once; leaves an external one alone.
    pub async fn stop(&mut self) {
        if let Self::Children(cs) = self {
            join_all(cs.iter_mut().map(ChildWorker::stop)).await;
        }
    }
}

/// How the run's workers are started: the same command line for each, with one encryption
/// key for all of them, since they share the database and each must open what another sealed.
pub struct Launch<'a> {
    args: &'a BenchArgs,
    env: &'a Env,
    issuer_url: String,
    key: SecretString,
}

impl<'a> Launch<'a> {
    /// The run's launcher for workers using the stub issuer at `issuer_url`, with a fresh key.
    pub fn new(args: &'a BenchArgs, env: &'a Env, issuer_url: String) -> Self {
        Self {
            args,
            env,
            issuer_url,
            key: SecretString::from(EncryptionKey::generate_base64()),
        }
    }

    /// Starts `--workers` children concurrently, so none gets a head start on a backlog, and
    /// waits until each is ready; each one's start-up therefore includes the others competing
    /// for the CPUs. When one fails, the others are killed (dropped).
    pub async fn start(&self) -> anyhow::Result<Worker> {
        let children =
            try_join_all((0..self.args.workers).map(|_| ChildWorker::spawn(self))).await?;
        Ok(Worker::Children(children))
    }
}

/// A worker process started by the bench.
pub struct ChildWorker {
    child: tokio::process::Child,
    pid: u32,
    ops: SocketAddr,
    /// Process start → `/readyz` 200.
    startup: Duration,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl ChildWorker {
    /// Starts `tenant-tokens run` and waits until `/readyz` answers 200.
    async fn spawn(launch: &Launch<'_>) -> anyhow::Result<Self> {
        let args = launch.args;
        let mut cmd = worker_command(launch)?;
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

    /// How it ended, if it did.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(s)) => Some(s.to_string()),
            _ => None,
        }
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

/// `tenant-tokens run` against the bench's broker, database and stub issuer, with the run's
/// encryption key, JSON logs on a pipe and the ops endpoints on a free port.
fn worker_command(launch: &Launch<'_>) -> anyhow::Result<tokio::process::Command> {
    let (args, env) = (launch.args, launch.env);
    let bin = env
        .worker_bin
        .as_deref()
        .ok_or_else(|| anyhow!("no worker binary to start"))?;
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("run")
        .arg(format!("--amqp-url={}", env.amqp_url))
        .arg(format!("--database-url={}", env.database_url))
        .arg(format!("--issuer-url={}", launch.issuer_url))
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
        .env("TOKEN_ENCRYPTION_KEY", launch.key.expose_secret())
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
                // One write per line: several workers may append to the same file.
                let _ = f.write_all(format!("{line}\n").as_bytes());
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
