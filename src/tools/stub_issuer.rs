//! A local stand-in for the webtask token issuer (`tenant-tokens stub-issuer`).
//!
//! The real issuer is a remote service we cannot run on a laptop, in CI or in a
//! benchmark, and it cannot be told to fail on purpose. This stub speaks the same
//! `POST /api/tokens/issue` protocol (CONTRACT §4) over real HTTP, so the worker is
//! exercised exactly as in production, and adds what tests need on top:
//!
//! * latency and failure injection (per process: `--latency-ms`, `--fail-rate`, ...;
//!   at run time: [`StubIssuer::set_mode`] or `POST /stub/mode` from another process);
//! * counters (`GET /stub/stats`, [`StubIssuer::stats`]) that let a test check the
//!   contract's central promise: one newly minted token per container, ever.
//!
//! Order of checks for an issue request, so a test knows what it will get:
//! latency, then the run-time mode (`unauthorized` → 401, `fail_*` → the status),
//! then `--fail-rate`, then the bearer token (403), then the body (400), then the
//! `Idempotency-Key` (422 on reuse for another container), then minting.
//! Injected failures come before authentication because they stand for an
//! overloaded proxy in front of the issuer.
//!
//! Neither the master token nor any token is ever logged.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::ContainerName;

/// How long [`StubIssuer::shutdown`] waits for in-flight requests before it aborts
/// the server task, so a client holding a connection cannot hang a test forever.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Fixed JWT header; the stub only pretends to sign with HS256.
const JWT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// Restrictions the real issuer expects as numbers; rejecting other types here
/// catches configuration mistakes in the worker before they reach production.
const NUMERIC_RESTRICTIONS: [&str; 3] = ["exp", "nbf", "dd"];

/// Run a local stand-in for the webtask token issuer, so the demo, compose and
/// tests need no real issuer.
// (Doc above doubles as `--help` text.) Kept apart from `StubConfig` so the CLI
// reads the master token file and validates numbers once (`into_config`), while
// tests build a config directly.
#[derive(clap::Args, Clone)]
pub struct StubArgs {
    /// Address to listen on (port 0 picks a free port; the URL is printed on stdout).
    #[arg(long, env = "STUB_LISTEN", default_value = "127.0.0.1:9401")]
    pub listen: SocketAddr,

    /// The master token clients must present as `Authorization: Bearer ...`.
    #[arg(
        long,
        env = "ISSUER_MASTER_TOKEN",
        hide_env_values = true,
        required_unless_present = "master_token_file",
        conflicts_with = "master_token_file"
    )]
    pub master_token: Option<String>,

    /// File holding the master token (surrounding white space is trimmed).
    #[arg(long, env = "ISSUER_MASTER_TOKEN_FILE")]
    pub master_token_file: Option<PathBuf>,

    /// Latency added to every issue request, in milliseconds.
    #[arg(long, env = "STUB_LATENCY_MS", default_value_t = 0)]
    pub latency_ms: u64,

    /// Extra latency drawn uniformly from 0..=JITTER milliseconds per request.
    #[arg(long, env = "STUB_LATENCY_JITTER_MS", default_value_t = 0)]
    pub latency_jitter_ms: u64,

    /// Probability (0..=1) of answering an issue request with --fail-status.
    #[arg(long, env = "STUB_FAIL_RATE", default_value_t = 0.0, value_parser = parse_probability)]
    pub fail_rate: f64,

    /// Status of injected failures (200..=599; 200 gives a non-token body).
    #[arg(
        long,
        env = "STUB_FAIL_STATUS",
        default_value_t = 503,
        value_parser = clap::value_parser!(u16).range(200..=599)
    )]
    pub fail_status: u16,

    /// Ignore Idempotency-Key and mint a new token every time (tests that path).
    #[arg(long)]
    pub no_idempotency: bool,
}

// Written by hand so the master token never reaches a log.
impl fmt::Debug for StubArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StubArgs")
            .field("listen", &self.listen)
            .field(
                "master_token",
                &self.master_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("master_token_file", &self.master_token_file)
            .field("latency_ms", &self.latency_ms)
            .field("latency_jitter_ms", &self.latency_jitter_ms)
            .field("fail_rate", &self.fail_rate)
            .field("fail_status", &self.fail_status)
            .field("no_idempotency", &self.no_idempotency)
            .finish()
    }
}

/// clap value parser for `--fail-rate`, so a typo fails at start-up, not per request.
fn parse_probability(s: &str) -> Result<f64, String> {
    let p: f64 = s.trim().parse().map_err(|e| format!("not a number: {e}"))?;
    if (0.0..=1.0).contains(&p) {
        Ok(p)
    } else {
        Err(format!("{p} is not a probability in 0..=1"))
    }
}

impl StubArgs {
    /// Validates the arguments and resolves the master token (reading and trimming
    /// `--master-token-file` if given), so [`run`] and embedders share one path.
    pub(crate) fn into_config(self) -> anyhow::Result<(SocketAddr, StubConfig)> {
        let token = match (&self.master_token, &self.master_token_file) {
            (_, Some(path)) => std::fs::read_to_string(path)
                .with_context(|| format!("cannot read master token file {}", path.display()))?,
            (Some(token), None) => token.clone(),
            (None, None) => {
                bail!("a master token is required: --master-token or --master-token-file")
            }
        };
        let token = token.trim();
        if token.is_empty() {
            bail!("the master token is empty");
        }
        if !(0.0..=1.0).contains(&self.fail_rate) {
            bail!(
                "--fail-rate {} is not a probability in 0..=1",
                self.fail_rate
            );
        }
        if !(200..=599).contains(&self.fail_status) {
            bail!("--fail-status {} is not in 200..=599", self.fail_status);
        }
        let config = StubConfig {
            master_token: SecretString::from(token.to_owned()),
            latency: Duration::from_millis(self.latency_ms),
            latency_jitter: Duration::from_millis(self.latency_jitter_ms),
            fail_rate: self.fail_rate,
            fail_status: self.fail_status,
            honour_idempotency: !self.no_idempotency,
        };
        Ok((self.listen, config))
    }
}

/// Behaviour of a stub, fixed at start except what [`StubIssuer::set_mode`] and
/// [`StubIssuer::set_latency`] change later. Built directly by tests and the demo.
#[derive(Clone)]
pub struct StubConfig {
    /// The only bearer token the stub accepts; kept secret so it is never printed.
    pub master_token: SecretString,
    /// Added before answering each issue request, to model a slow issuer.
    pub latency: Duration,
    /// Uniform extra 0..=jitter on top of `latency`, to spread concurrent calls.
    pub latency_jitter: Duration,
    /// Probability (0..=1) of answering `fail_status` instead of doing the work.
    pub fail_rate: f64,
    /// Status used for `fail_rate` failures (200 gives a 200 with a non-token body).
    pub fail_status: u16,
    /// When false, `Idempotency-Key` is ignored and every call mints a new token,
    /// which lets tests prove the worker does not depend on the issuer for this.
    pub honour_idempotency: bool,
}

impl fmt::Debug for StubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StubConfig")
            .field("master_token", &"[REDACTED]")
            .field("latency", &self.latency)
            .field("latency_jitter", &self.latency_jitter)
            .field("fail_rate", &self.fail_rate)
            .field("fail_status", &self.fail_status)
            .field("honour_idempotency", &self.honour_idempotency)
            .finish()
    }
}

impl StubConfig {
    /// A well-behaved issuer (no latency, no failures, idempotency honoured), the
    /// usual starting point for tests which then turn on the faults they need.
    pub fn new(master_token: SecretString) -> Self {
        StubConfig {
            master_token,
            latency: Duration::ZERO,
            latency_jitter: Duration::ZERO,
            fail_rate: 0.0,
            fail_status: 503,
            honour_idempotency: true,
        }
    }
}

/// Run-time behaviour of the issue endpoint, switched by tests to inject faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StubMode {
    /// Answer normally (subject to the configured latency and `fail_rate`).
    Normal,
    /// Every request answered with this status and a short text body; models an
    /// issuer outage. A status outside 200..=599 is answered as 500.
    FailAll(u16),
    /// The next `n` requests answered with `status`, then `Normal` again; models a
    /// transient fault that retries should ride out.
    FailNext {
        /// How many requests still fail.
        n: u32,
        /// Their status (outside 200..=599 is answered as 500).
        status: u16,
    },
    /// Every request answered 401 as if the master token were revoked; drives the
    /// worker's circuit breaker.
    Unauthorized,
}

/// Counters of a stub, so tests and soak runs can check what the worker really did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StubStats {
    /// Issue requests received (any outcome).
    pub requests: u64,
    /// 200 answers that minted a new token.
    pub issued: u64,
    /// 200 answers served from the idempotency map (same key as an earlier call).
    pub replayed: u64,
    /// Other answers except 401/403: injected failures, 400 and 422.
    pub failed: u64,
    /// 401 (mode `Unauthorized`) and 403 (missing or wrong bearer) answers.
    pub unauthorized: u64,
    /// Containers (`ten`) that got at least one new token.
    pub distinct_containers: u64,
    /// The most new tokens minted for one container; 1 in a fault-free run.
    pub issued_per_container_max: u64,
}

/// A running stub. Dropping it does not stop it (the server task keeps serving on
/// the runtime); call [`StubIssuer::shutdown`].
pub struct StubIssuer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    task: JoinHandle<std::io::Result<()>>,
}

impl fmt::Debug for StubIssuer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StubIssuer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl StubIssuer {
    /// Binds `listen` (port 0 picks a free port, see [`StubIssuer::addr`]) and
    /// spawns the server on the current tokio runtime, so a test can start a stub
    /// in one line and point the worker at [`StubIssuer::url`].
    pub async fn start(listen: SocketAddr, config: StubConfig) -> std::io::Result<StubIssuer> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let cancel = CancellationToken::new();
        let app = router(shared.clone());
        let signal = cancel.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
        });
        tracing::info!(%addr, "stub issuer started");
        Ok(StubIssuer {
            addr,
            shared,
            cancel,
            task,
        })
    }

    /// Base URL for `ISSUER_URL`, e.g. `http://127.0.0.1:9401`. A wildcard listen
    /// address is replaced by loopback, because clients cannot connect to 0.0.0.0.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        format!("http://{}", SocketAddr::new(ip, self.addr.port()))
    }

    /// A snapshot of the counters, for assertions after a run.
    pub fn stats(&self) -> StubStats {
        self.shared.stats()
    }

    /// Changes the issue endpoint's behaviour at run time (fault tests).
    pub fn set_mode(&self, mode: StubMode) {
        self.shared.set_mode(mode);
    }

    /// Changes the fixed part of the per-request latency at run time (timeout tests).
    pub fn set_latency(&self, latency: Duration) {
        self.shared.set_latency(latency);
    }

    /// Stops accepting, lets in-flight requests finish (at most 10 s, then aborts)
    /// and awaits the server task, so a test ends with the port released.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        let mut task = self.task;
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "stub issuer server failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "stub issuer task failed"),
            Err(_) => {
                tracing::warn!("stub issuer did not stop in time; aborting");
                task.abort();
                let _ = task.await;
            }
        }
        tracing::info!(addr = %self.addr, "stub issuer stopped");
    }
}

/// Runs the stub until SIGINT/SIGTERM (the `stub-issuer` command): prints the base
/// URL on stdout so scripts can capture it, and logs requests with `tracing`
/// (routine issue requests at debug level; never the master token or tokens).
pub async fn run(args: StubArgs) -> anyhow::Result<()> {
    let (listen, config) = args.into_config()?;
    let stub = StubIssuer::start(listen, config)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    println!("{}", stub.url());
    tracing::info!(url = %stub.url(), "stub issuer listening");
    crate::shutdown::signalled().await;
    tracing::info!("signal received, stopping stub issuer");
    stub.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// State

/// Counters updated without locks, so concurrent requests do not contend.
#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    issued: AtomicU64,
    replayed: AtomicU64,
    failed: AtomicU64,
    unauthorized: AtomicU64,
    distinct_containers: AtomicU64,
    issued_per_container_max: AtomicU64,
}

/// A token minted for an idempotency key, with the container it was minted for.
struct Minted {
    ten: String,
    token: String,
}

/// State that must change together; behind a mutex held only for a few map
/// operations and one hash, never across an await.
#[derive(Default)]
struct Ledger {
    by_key: HashMap<String, Minted>,
    per_container: HashMap<String, u64>,
}

struct Shared {
    master_token: SecretString,
    master_digest: [u8; 32],
    latency_nanos: AtomicU64,
    latency_jitter: Duration,
    fail_rate: f64,
    fail_status: u16,
    honour_idempotency: bool,
    mode: Mutex<StubMode>,
    ledger: Mutex<Ledger>,
    counters: Counters,
}

/// Locks a mutex even if another request panicked while holding it: the data
/// (counters and maps) stays usable, and a stub should keep answering.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl Shared {
    fn new(config: StubConfig) -> Self {
        let master_digest = sha256(config.master_token.expose_secret().as_bytes());
        Shared {
            master_token: config.master_token,
            master_digest,
            latency_nanos: AtomicU64::new(duration_nanos(config.latency)),
            latency_jitter: config.latency_jitter,
            fail_rate: if config.fail_rate.is_finite() {
                config.fail_rate.clamp(0.0, 1.0)
            } else {
                0.0
            },
            fail_status: config.fail_status,
            honour_idempotency: config.honour_idempotency,
            mode: Mutex::new(StubMode::Normal),
            ledger: Mutex::new(Ledger::default()),
            counters: Counters::default(),
        }
    }

    fn stats(&self) -> StubStats {
        let c = &self.counters;
        StubStats {
            requests: c.requests.load(Ordering::Relaxed),
            issued: c.issued.load(Ordering::Relaxed),
            replayed: c.replayed.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            unauthorized: c.unauthorized.load(Ordering::Relaxed),
            distinct_containers: c.distinct_containers.load(Ordering::Relaxed),
            issued_per_container_max: c.issued_per_container_max.load(Ordering::Relaxed),
        }
    }

    fn set_mode(&self, mode: StubMode) {
        *lock(&self.mode) = mode;
        tracing::info!(?mode, "stub issuer mode changed");
    }

    fn set_latency(&self, latency: Duration) {
        self.latency_nanos
            .store(duration_nanos(latency), Ordering::Relaxed);
        tracing::info!(?latency, "stub issuer latency changed");
    }

    /// This request's delay: the current latency plus uniform jitter.
    fn delay(&self) -> Duration {
        let base = Duration::from_nanos(self.latency_nanos.load(Ordering::Relaxed));
        let jitter = duration_nanos(self.latency_jitter);
        if jitter == 0 {
            base
        } else {
            base.saturating_add(Duration::from_nanos(rand::rng().random_range(0..=jitter)))
        }
    }

    /// The injected failure for this request, if any (mode first, then fail rate).
    fn injected_failure(&self) -> Option<Answer> {
        {
            let mut mode = lock(&self.mode);
            match *mode {
                StubMode::Normal => {}
                StubMode::Unauthorized => return Some(Answer::Revoked),
                StubMode::FailAll(status) => return Some(Answer::Injected(status)),
                StubMode::FailNext { n, status } => {
                    if n <= 1 {
                        *mode = StubMode::Normal;
                    } else {
                        *mode = StubMode::FailNext { n: n - 1, status };
                    }
                    if n >= 1 {
                        return Some(Answer::Injected(status));
                    }
                }
            }
        }
        if self.fail_rate > 0.0 && rand::rng().random_bool(self.fail_rate) {
            return Some(Answer::Injected(self.fail_status));
        }
        None
    }

    /// Everything after the latency; synchronous, so no lock can be held across
    /// an await.
    fn handle_issue(&self, headers: &HeaderMap, body: &[u8]) -> Answer {
        if let Some(answer) = self.injected_failure() {
            return answer;
        }
        if !self.authorized(headers) {
            return Answer::Forbidden;
        }
        let (ten, extra) = match parse_issue_body(body) {
            Ok(parsed) => parsed,
            Err(why) => return Answer::BadRequest(why),
        };
        let key = if self.honour_idempotency {
            match idempotency_key(headers) {
                Ok(key) => key,
                Err(why) => return Answer::BadRequest(why),
            }
        } else {
            None
        };

        let mut ledger = lock(&self.ledger);
        if let Some(key) = &key
            && let Some(minted) = ledger.by_key.get(key)
        {
            if minted.ten == ten {
                return Answer::Issued {
                    token: minted.token.clone(),
                    ten,
                    replayed: true,
                };
            }
            return Answer::KeyReused {
                first_ten: minted.ten.clone(),
                ten,
            };
        }
        let token = self.mint(&ten, extra);
        let count = ledger.per_container.entry(ten.clone()).or_insert(0);
        *count += 1;
        let count = *count;
        if count == 1 {
            self.counters
                .distinct_containers
                .fetch_add(1, Ordering::Relaxed);
        }
        self.counters
            .issued_per_container_max
            .fetch_max(count, Ordering::Relaxed);
        if let Some(key) = key {
            ledger.by_key.insert(
                key,
                Minted {
                    ten: ten.clone(),
                    token: token.clone(),
                },
            );
        }
        Answer::Issued {
            token,
            ten,
            replayed: false,
        }
    }

    /// Constant-time check of `Authorization: Bearer <master token>` (digests of
    /// equal length are compared, so neither length nor prefix leaks by timing).
    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(value) = headers.get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let Some(scheme) = value.get(..7) else {
            return false;
        };
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return false;
        }
        let presented = value[7..].trim_ascii();
        ct_eq(&sha256(presented), &self.master_digest)
    }

    /// A JWT-shaped token: `ten`, a fresh `jti` and `iat`, plus the extra
    /// restrictions; "signed" with SHA-256 over the signing input and the master
    /// token, which is enough for a stub and needs no extra dependency.
    fn mint(&self, ten: &str, extra: Map<String, Value>) -> String {
        let mut payload = extra;
        payload.insert("ten".into(), Value::String(ten.to_owned()));
        payload.insert(
            "jti".into(),
            Value::String(uuid::Uuid::new_v4().simple().to_string()),
        );
        payload.insert(
            "iat".into(),
            Value::from(time::OffsetDateTime::now_utc().unix_timestamp()),
        );
        let header = URL_SAFE_NO_PAD.encode(JWT_HEADER);
        let payload = URL_SAFE_NO_PAD.encode(Value::Object(payload).to_string());
        let signing_input = format!("{header}.{payload}");
        let mut hasher = Sha256::new();
        hasher.update(signing_input.as_bytes());
        hasher.update(self.master_token.expose_secret().as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(hasher.finalize());
        format!("{signing_input}.{signature}")
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn ct_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// Validates the issue body: a JSON object with a valid `ten`; numeric
/// restrictions must be numbers. Returns `ten` and the other keys (minus `ten`,
/// `jti`, `iat`, which the issuer sets itself).
fn parse_issue_body(body: &[u8]) -> Result<(String, Map<String, Value>), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not valid JSON: {e}"))?;
    let Value::Object(mut object) = value else {
        return Err("body must be a JSON object".into());
    };
    let ten = match object.remove("ten") {
        None => return Err(r#"missing "ten" (the container name)"#.into()),
        Some(Value::String(ten)) => ten,
        Some(_) => return Err(r#""ten" must be a string"#.into()),
    };
    if ContainerName::parse(&ten).is_err() {
        return Err(r#""ten" must match ^[a-z0-9][a-z0-9-]{0,62}$"#.into());
    }
    for key in NUMERIC_RESTRICTIONS {
        if let Some(v) = object.get(key)
            && !v.is_number()
        {
            return Err(format!(r#""{key}" must be a number"#));
        }
    }
    object.remove("jti");
    object.remove("iat");
    Ok((ten, object))
}

/// The `Idempotency-Key`, if sent; an empty or non-text key is a client bug (400).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| "Idempotency-Key must be visible ASCII".to_string())?
        .trim();
    if key.is_empty() {
        return Err("Idempotency-Key must not be empty".into());
    }
    Ok(Some(key.to_owned()))
}

// ---------------------------------------------------------------------------
// HTTP

/// What the issue endpoint answers; computed synchronously, rendered afterwards.
enum Answer {
    Injected(u16),
    Revoked,
    Forbidden,
    BadRequest(String),
    KeyReused {
        first_ten: String,
        ten: String,
    },
    Issued {
        token: String,
        ten: String,
        replayed: bool,
    },
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/tokens/issue", post(issue))
        .route("/stub/stats", get(stats))
        .route("/stub/mode", post(set_mode))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared)
}

fn json_error(status: StatusCode, error: &str, message: Option<&str>) -> Response {
    let body = match message {
        Some(message) => json!({ "error": error, "message": message }),
        None => json!({ "error": error }),
    };
    (status, axum::Json(body)).into_response()
}

async fn issue(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let counters = &shared.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let delay = shared.delay();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    match shared.handle_issue(&headers, &body) {
        Answer::Injected(code) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            let status = StatusCode::from_u16(code)
                .ok()
                .filter(|s| (200..=599).contains(&s.as_u16()))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            tracing::debug!(status = status.as_u16(), "issue: injected failure");
            (
                status,
                format!("stub issuer: injected failure {}\n", status.as_u16()),
            )
                .into_response()
        }
        Answer::Revoked => {
            counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(status = 401, "issue: unauthorized (mode)");
            json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                Some("the master token has been revoked (stub mode)"),
            )
        }
        Answer::Forbidden => {
            counters.unauthorized.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(status = 403, "issue: missing or wrong bearer token");
            json_error(StatusCode::FORBIDDEN, "forbidden", None)
        }
        Answer::BadRequest(why) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(status = 400, reason = %why, "issue: bad request");
            json_error(StatusCode::BAD_REQUEST, "bad_request", Some(&why))
        }
        Answer::KeyReused { first_ten, ten } => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(status = 422, %ten, %first_ten, "issue: idempotency key reused");
            let why =
                format!("Idempotency-Key was first used for container {first_ten:?}, not {ten:?}");
            json_error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                Some(&why),
            )
        }
        Answer::Issued {
            token,
            ten,
            replayed,
        } => {
            let counter = if replayed {
                &counters.replayed
            } else {
                &counters.issued
            };
            counter.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(status = 200, %ten, replayed, "issue: token answered");
            (
                [(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                )],
                token,
            )
                .into_response()
        }
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> axum::Json<StubStats> {
    axum::Json(shared.stats())
}

async fn set_mode(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_mode_update(&body) {
        Ok(update) => {
            if let Some(mode) = update.mode {
                shared.set_mode(mode);
            }
            if let Some(latency) = update.latency {
                shared.set_latency(latency);
            }
            StatusCode::NO_CONTENT.into_response()
        }
        Err(why) => json_error(StatusCode::BAD_REQUEST, "bad_request", Some(&why)),
    }
}

/// Body of `POST /stub/mode`, as sent by other processes (e.g. a soak test).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModeRequest {
    mode: Option<String>,
    status: Option<u16>,
    n: Option<u32>,
    latency_ms: Option<u64>,
}

/// A validated `POST /stub/mode` request: what to change.
#[derive(Debug, PartialEq)]
struct ModeUpdate {
    mode: Option<StubMode>,
    latency: Option<Duration>,
}

/// Parses `{"mode":"normal"}`, `{"mode":"fail_all","status":503}`,
/// `{"mode":"fail_next","n":3,"status":500}`, `{"mode":"unauthorized"}` and/or
/// `{"latency_ms":50}`; `status` defaults to 503. Strict, so a typo in a soak
/// script fails loudly instead of silently doing nothing.
fn parse_mode_update(body: &[u8]) -> Result<ModeUpdate, String> {
    let req: ModeRequest =
        serde_json::from_slice(body).map_err(|e| format!("invalid mode request: {e}"))?;
    let status = match req.status {
        Some(s) if !(200..=599).contains(&s) => {
            return Err(format!("status {s} is not in 200..=599"));
        }
        s => s,
    };
    let mode = match req.mode.as_deref() {
        None => None,
        Some("normal") => Some(StubMode::Normal),
        Some("unauthorized") => Some(StubMode::Unauthorized),
        Some("fail_all") => Some(StubMode::FailAll(status.unwrap_or(503))),
        Some("fail_next") => {
            let n = req
                .n
                .ok_or_else(|| r#""fail_next" needs "n""#.to_string())?;
            Some(StubMode::FailNext {
                n,
                status: status.unwrap_or(503),
            })
        }
        Some(other) => {
            return Err(format!(
                "unknown mode {other:?} (normal, fail_all, fail_next, unauthorized)"
            ));
        }
    };
    let uses_status = matches!(mode, Some(StubMode::FailAll(_) | StubMode::FailNext { .. }));
    if status.is_some() && !uses_status {
        return Err(r#""status" only applies to fail_all and fail_next"#.into());
    }
    if req.n.is_some() && !matches!(mode, Some(StubMode::FailNext { .. })) {
        return Err(r#""n" only applies to fail_next"#.into());
    }
    let latency = req.latency_ms.map(Duration::from_millis);
    if mode.is_none() && latency.is_none() {
        return Err(r#"nothing to change: give "mode" and/or "latency_ms""#.into());
    }
    Ok(ModeUpdate { mode, latency })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_json_parses() {
        let p = |s: &str| parse_mode_update(s.as_bytes());
        assert_eq!(
            p(r#"{"mode":"normal"}"#),
            Ok(ModeUpdate {
                mode: Some(StubMode::Normal),
                latency: None
            })
        );
        assert_eq!(
            p(r#"{"mode":"fail_all","status":500}"#).map(|u| u.mode),
            Ok(Some(StubMode::FailAll(500)))
        );
        assert_eq!(
            p(r#"{"mode":"fail_all"}"#).map(|u| u.mode),
            Ok(Some(StubMode::FailAll(503)))
        );
        assert_eq!(
            p(r#"{"mode":"fail_next","n":3,"status":500}"#).map(|u| u.mode),
            Ok(Some(StubMode::FailNext { n: 3, status: 500 }))
        );
        assert_eq!(
            p(r#"{"mode":"unauthorized"}"#).map(|u| u.mode),
            Ok(Some(StubMode::Unauthorized))
        );
        assert_eq!(
            p(r#"{"latency_ms":50}"#),
            Ok(ModeUpdate {
                mode: None,
                latency: Some(Duration::from_millis(50))
            })
        );
        for bad in [
            "",
            "[]",
            "{}",
            r#"{"mode":"sometimes"}"#,
            r#"{"mode":"fail_next"}"#,
            r#"{"mode":"fail_all","status":42}"#,
            r#"{"mode":"normal","status":503}"#,
            r#"{"mode":"fail_all","n":2}"#,
            r#"{"mode":"normal","latency":5}"#,
        ] {
            assert!(p(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn container_names() {
        let ten = |t: &str| parse_issue_body(json!({ "ten": t }).to_string().as_bytes());
        assert!(ten("a").is_ok());
        assert!(ten("acme-corp-3f9a12c0").is_ok());
        assert!(ten(&"a".repeat(63)).is_ok());
        for bad in [&"a".repeat(64), "", "-a", "Acme", "a_b"] {
            assert!(ten(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn issue_body_rules() {
        assert!(parse_issue_body(br#"{"ten":"ok","exp":1,"dd":1}"#).is_ok());
        assert!(parse_issue_body(br#"{"ten":"ok","exp":"soon"}"#).is_err());
        assert!(parse_issue_body(br#"{"ten":5}"#).is_err());
        assert!(parse_issue_body(br#"{}"#).is_err());
        assert!(parse_issue_body(b"not json").is_err());
    }

    #[test]
    fn args_read_and_trim_token_file() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            stub: StubArgs,
        }
        let path = std::env::temp_dir().join(format!(
            "stub-issuer-token-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, "  s3cret\n").expect("write temp token file");
        let cli = Cli::try_parse_from([
            "x".as_ref(),
            "--master-token-file".as_ref(),
            path.as_os_str(),
            "--listen".as_ref(),
            "127.0.0.1:0".as_ref(),
            "--fail-rate".as_ref(),
            "0.25".as_ref(),
        ])
        .expect("arguments parse");
        assert!(!format!("{:?}", cli.stub).contains("s3cret"));
        let (addr, config) = cli.stub.into_config().expect("config");
        let _ = std::fs::remove_file(&path);
        assert_eq!(addr.port(), 0);
        assert_eq!(config.master_token.expose_secret(), "s3cret");
        assert_eq!(config.fail_rate, 0.25);
        assert!(config.honour_idempotency);

        assert!(Cli::try_parse_from(["x", "--master-token", "t", "--fail-rate", "2"]).is_err());
        assert!(Cli::try_parse_from(["x", "--master-token", "t", "--fail-status", "42"]).is_err());
    }
}
