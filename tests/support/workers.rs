//! The worker under test, in this process ([`WorkerHandle`]) or as a child process
//! ([`ChildWorker`]) that a test can kill, terminate and restart, both configured for one
//! [`TestEnv`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use tenant_tokens::configuration::RunArgs;
use tenant_tokens::ops::health::Health;
use tenant_tokens::pipeline::worker::Worker;
use tokio_util::sync::CancellationToken;

use super::env::TestEnv;
use super::issuer::MASTER_TOKEN;
use super::util::free_local_addr;

impl TestEnv {
    /// Flags for `run` pointing at this environment and at `issuer_url`.
    pub fn run_args(&self, issuer_url: &str, extra: &[&str]) -> RunArgs {
        let defaults = [
            ("--amqp-url", self.amqp_url.clone()),
            ("--database-url", self.database_url.clone()),
            ("--issuer-url", issuer_url.to_owned()),
            ("--issuer-master-token", MASTER_TOKEN.to_owned()),
            ("--token-encryption-key", test_key()),
            ("--ops-addr", "127.0.0.1:0".to_owned()),
            ("--retry-delays", "200ms,400ms".to_owned()),
        ];
        let mut args: Vec<String> = vec!["test".into()];
        // A flag given in `extra` replaces the default (clap refuses a flag given twice).
        for (flag, value) in defaults {
            if !extra.contains(&flag) {
                args.push(flag.to_owned());
                args.push(value);
            }
        }
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        RunArgs::try_from_flags(args).expect("valid test flags")
    }

    /// Starts a worker in this process.
    pub async fn start_worker(&self, issuer_url: &str, extra: &[&str]) -> WorkerHandle {
        let settings = self
            .run_args(issuer_url, extra)
            .into_settings()
            .expect("settings");
        let health = Arc::new(Health::default());
        let shutdown = CancellationToken::new();
        let worker = Worker::build(settings, health.clone(), shutdown.clone())
            .await
            .expect("worker builds")
            .expect("not shut down");
        let task = tokio::spawn(worker.run());
        let handle = WorkerHandle {
            shutdown,
            task,
            health,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !handle.health.not_ready_reasons().is_empty() {
            assert!(Instant::now() < deadline, "worker never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        handle
    }

    /// Environment of `tenant-tokens run` for this test (the same settings as
    /// [`TestEnv::run_args`]); `extra` entries replace the defaults.
    pub fn run_env(&self, issuer_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = [
            ("AMQP_URL", self.amqp_url.as_str()),
            ("DATABASE_URL", self.database_url.as_str()),
            ("ISSUER_URL", issuer_url),
            ("ISSUER_MASTER_TOKEN", MASTER_TOKEN),
            ("RETRY_DELAYS", "200ms,400ms"),
            ("LOG_FORMAT", "json"),
            ("RUST_LOG", "info"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        env.push(("TOKEN_ENCRYPTION_KEY".into(), test_key()));
        for (k, v) in extra {
            env.retain(|(name, _)| name != k);
            env.push(((*k).to_owned(), (*v).to_owned()));
        }
        env
    }

    /// Starts `tenant-tokens run` as a child process (its own ops port; log in the target
    /// directory, kept only when the test fails). Does not wait for readiness.
    pub fn spawn_worker(&self, issuer_url: &str, extra: &[(&str, &str)]) -> ChildWorker {
        let ops = free_local_addr();
        let seq = CHILD_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("{}-worker-{seq}.log", self.name));
        let out = std::fs::File::create(&log).expect("child log file");
        let err = out.try_clone().expect("child log file");
        let mut cmd = std::process::Command::new(worker_binary());
        cmd.arg("run")
            .env_clear()
            .envs(self.run_env(issuer_url, extra))
            .env("OPS_ADDR", ops.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().expect("spawn tenant-tokens run");
        ChildWorker {
            child,
            ops,
            log,
            http: reqwest::Client::new(),
        }
    }
}

static TEST_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The encryption key of this test process (the same for in-process and child workers).
pub fn test_key() -> String {
    TEST_KEY
        .get_or_init(tenant_tokens::crypto::EncryptionKey::generate_base64)
        .clone()
}

/// A worker running in this process.
pub struct WorkerHandle {
    /// Cancel it to ask the worker to stop.
    pub shutdown: CancellationToken,
    /// The worker's `run`, for its result.
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// What the worker reports to `/readyz`.
    pub health: Arc<Health>,
}

impl WorkerHandle {
    /// Graceful stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let r = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("worker stops within 30 s");
        r.expect("worker task").expect("worker result");
    }
}

static CHILD_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A private hard link (or copy) of the `tenant-tokens` binary this test was built with,
/// made at first use. Worktrees may share a target directory, and a build there replaces
/// the binary: a worker restarted by a long test would otherwise run other code.
pub fn worker_binary() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let src = std::path::Path::new(env!("CARGO_BIN_EXE_tenant-tokens"));
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
        const PREFIX: &str = "tenant-tokens-bin-";
        // Links left by test processes that are gone (where /proc tells which are alive).
        if std::path::Path::new("/proc/self").exists()
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix(PREFIX)
                    && !std::path::Path::new("/proc").join(pid).exists()
                {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let dst = dir.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_file(&dst);
        if std::fs::hard_link(src, &dst).is_err() {
            std::fs::copy(src, &dst).expect("copy the tenant-tokens binary");
        }
        dst
    })
}

/// `tenant-tokens run` in a child process. Killed (SIGKILL) when dropped while running.
pub struct ChildWorker {
    child: std::process::Child,
    /// Its ops address (`/readyz`, `/metrics`).
    pub ops: std::net::SocketAddr,
    log: std::path::PathBuf,
    http: reqwest::Client,
}

impl ChildWorker {
    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        self.http
            .get(format!("http://{}/readyz", self.ops))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// Waits until `/readyz` answers 200; panics (with the log) at the deadline or if the
    /// process exits.
    pub async fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.ready().await {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "worker exited with {status} before ready:\n{}",
                    self.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "worker not ready within {timeout:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -TERM {}", self.pid());
    }

    /// Waits for the process to exit; panics (with the log) at the deadline.
    pub async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {timeout:?}:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGTERM and wait; asserts exit code 0.
    pub async fn stop(mut self) {
        self.terminate();
        let status = self.wait_exit(Duration::from_secs(30)).await;
        assert_eq!(
            status.code(),
            Some(0),
            "graceful stop exits 0:\n{}",
            self.log_tail()
        );
    }

    /// The sum of the samples of metric `name` on its `/metrics` (every label set; `_sum` and
    /// `_count` of a histogram are metrics of their own).
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .http
            .get(format!("http://{}/metrics", self.ops))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with([' ', '{']))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Its whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.kill();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("worker log kept: {}", self.log.display());
        }
    }
}
