//! A local stand-in for the webtask token issuer (`tenant-tokens stub-issuer`).
//!
//! The real issuer is a remote service we cannot run on a laptop, in CI or in a
//! benchmark, and it cannot be told to fail on purpose. This stub speaks the same
//! protocol over real HTTP, so the worker is exercised exactly as in production, and
//! adds what tests need on top:
//!
//! * `POST /api/tokens/issue` (CONTRACT §4): mints a JWT-shaped token for `ten`;
//! * `POST /api/tokens/revoke?token=…` (CONTRACT §10): `200` when it revokes a token
//!   it issued, `404` `token unknown` for a token it never issued, `400`
//!   `token already revoked` for a repeated revoke, `400` `missing token` without a
//!   `token` parameter;
//! * `GET /api/tokens/inspect?token=…`: `200` with `{"ten","jti","issued_at"}` for a
//!   live token, `410 Gone` for a revoked one, `404` for an unknown one;
//! * https instead of http with `--tls-cert`/`--tls-key` ([`StubIssuer::start_tls`]),
//!   so the worker's TLS client (`ISSUER_CA_FILE`) meets a real handshake;
//! * latency and failure injection (per process: `--latency-ms`, `--fail-rate`, ...;
//!   at run time: [`StubIssuer::set_mode`] or `POST /stub/mode` for issue, and
//!   separately [`StubIssuer::set_revoke_mode`] or `POST /stub/revoke-mode` for
//!   revoke, so one can fail while the other works);
//! * counters (`GET /stub/stats`, [`StubIssuer::stats`]) that let a test check the
//!   contract's central promise: one newly minted token per container, ever;
//! * the list of revoked tokens (`GET /stub/revoked`, [`StubIssuer::revoked`]), so a
//!   test can check that exactly the right tokens were revoked, once each.
//!
//! Order of checks for an issue request, so a test knows what it will get:
//! latency, then the run-time mode (`unauthorized` → 401, `fail_*` → the status),
//! then `--fail-rate`, then the bearer token (403), then the body (400), then the
//! `Idempotency-Key` (422 on reuse for another container), then minting.
//! Injected failures come before authentication because they stand for an
//! overloaded proxy in front of the issuer.
//!
//! A revoke request is checked in the same style: latency, then the run-time revoke
//! mode (`--fail-rate` applies to issue only), then the bearer token (403), then the
//! `token` parameter (400 `missing token`), then the lookup (404 / 400 / 200).
//! Only calls that get as far as the lookup count in a token's `revoke_calls`.
//! Inspect checks only the bearer token: it has no latency and no injected
//! failures, because tests use it to observe, not to exercise the worker.
//!
//! The stub remembers every token it mints (by SHA-256 of the token) so it can answer
//! revoke and inspect; at most [`MAX_TRACKED_TOKENS`] of them. Past that the issue
//! endpoint answers `503` (ledger full) rather than forget tokens and answer a later
//! revoke wrongly; restart the stub to start over. A replay by `Idempotency-Key`
//! answers the same token even after it was revoked, as a response cache would;
//! rotation uses a new key per generation (CONTRACT §10), so it never meets this.
//!
//! Neither the master token nor any token is ever logged or listed: revoked tokens
//! are shown by fingerprint (the first 16 hex chars of SHA-256 of the token).

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
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
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
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::domain::ContainerName;
pub use crate::tools::stub_tls::StubTls;
use crate::tools::stub_tls::TlsListener;

/// How long [`StubIssuer::shutdown`] waits for in-flight requests before it aborts
/// the server task, so a client holding a connection cannot hang a test forever.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Fixed JWT header; the stub only pretends to sign with HS256.
const JWT_HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

/// How many minted tokens the stub remembers for revoke and inspect. A test tool
/// need not scale further, and a bound keeps a runaway soak from eating the
/// machine (each entry is a few hundred bytes with the idempotency map). Past it,
/// issue answers 503 instead of minting tokens it could not revoke later.
pub const MAX_TRACKED_TOKENS: usize = 1_000_000;

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

    /// Latency added to every issue and revoke request, in milliseconds.
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

    /// Serve https with this PEM certificate chain (with --tls-key), to test a worker's
    /// ISSUER_CA_FILE against a private CA.
    #[arg(long, env = "STUB_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert.
    #[arg(long, env = "STUB_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
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
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
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
    /// The certificate and key of `--tls-cert`/`--tls-key`, if given: https instead of http.
    fn tls(&self) -> anyhow::Result<Option<StubTls>> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => StubTls::from_pem_files(cert, key).map(Some),
            (None, None) => Ok(None),
            _ => bail!("--tls-cert and --tls-key go together"),
        }
    }

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
    /// Added before answering each issue and revoke request, to model a slow issuer.
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

/// Run-time behaviour of the issue endpoint, or (set separately) of the revoke
/// endpoint, switched by tests to inject faults into one while the other works.
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
    /// Revoke requests received (any outcome); kept apart from `requests` so
    /// issue-side arithmetic (e.g. requests in flight) is unaffected by revocations.
    pub revoke_requests: u64,
    /// Distinct tokens revoked (200 answers); a repeated revoke does not count.
    pub revoked: u64,
    /// Revoke requests answered with an injected failure (revoke mode `fail_*`).
    pub revoke_failed: u64,
    /// Revoke requests answered 401 (revoke mode `unauthorized`) or 403 (bearer).
    pub revoke_unauthorized: u64,
    /// Revoke requests answered 400 or 404: missing token, unknown token, already
    /// revoked. With the others this accounts for every answered revoke request.
    pub revoke_rejected: u64,
}

/// A token the stub revoked, as listed by [`StubIssuer::revoked`] and
/// `GET /stub/revoked`, so tests can check which tokens were revoked and how often
/// the worker asked. Carries the fingerprint, never the token itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RevokedToken {
    /// The token's `jti` claim, as the worker stores it for revocation.
    pub jti: String,
    /// The container the token was scoped to.
    pub ten: String,
    /// The first 16 hex characters of SHA-256 of the token (as in CONTRACT §7).
    pub fingerprint: String,
    /// When the stub minted the token (RFC 3339 over HTTP).
    #[serde(with = "rfc3339")]
    pub issued_at: OffsetDateTime,
    /// When the first successful revoke call arrived (RFC 3339 over HTTP).
    #[serde(with = "rfc3339")]
    pub revoked_at: OffsetDateTime,
    /// Revoke calls that named this token and reached the lookup: the one answered
    /// 200 plus the repeats answered 400; 1 when the worker revoked exactly once.
    pub revoke_calls: u64,
}

/// RFC 3339 text for timestamps in the stub's JSON, matching the contract's events.
mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;

    pub(super) fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        let text = t.format(&Rfc3339).map_err(serde::ser::Error::custom)?;
        s.serialize_str(&text)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let text = String::deserialize(d)?;
        OffsetDateTime::parse(&text, &Rfc3339).map_err(serde::de::Error::custom)
    }
}

/// A running stub. Dropping it does not stop it (the server task keeps serving on
/// the runtime); call [`StubIssuer::shutdown`].
pub struct StubIssuer {
    addr: SocketAddr,
    /// `http`, or `https` when started with [`StubIssuer::start_tls`].
    scheme: &'static str,
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
    /// Binds `listen` (port 0 picks a free port, see [`StubIssuer::url`]) and
    /// spawns the server on the current tokio runtime, so a test can start a stub
    /// in one line and point the worker at [`StubIssuer::url`].
    pub async fn start(listen: SocketAddr, config: StubConfig) -> std::io::Result<StubIssuer> {
        Self::serve(listen, config, None).await
    }

    /// Like [`StubIssuer::start`], serving https with `tls` ([`StubIssuer::url`] says
    /// `https://`), for tests of the worker's TLS client.
    pub async fn start_tls(
        listen: SocketAddr,
        config: StubConfig,
        tls: &StubTls,
    ) -> std::io::Result<StubIssuer> {
        Self::serve(listen, config, Some(tls)).await
    }

    async fn serve(
        listen: SocketAddr,
        config: StubConfig,
        tls: Option<&StubTls>,
    ) -> std::io::Result<StubIssuer> {
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(config));
        let cancel = CancellationToken::new();
        let app = router(shared.clone());
        let signal = cancel.clone().cancelled_owned();
        let task = match tls {
            None => tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(signal)
                    .await
            }),
            Some(tls) => {
                let listener = TlsListener::new(listener, tls)?;
                tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(signal)
                        .await
                })
            }
        };
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, scheme, "stub issuer started");
        Ok(StubIssuer {
            addr,
            scheme,
            shared,
            cancel,
            task,
        })
    }

    /// Base URL for `ISSUER_URL`, e.g. `http://127.0.0.1:9401` (`https://` when serving
    /// TLS). A wildcard listen address is replaced by loopback, because clients cannot
    /// connect to 0.0.0.0.
    pub fn url(&self) -> String {
        let ip = match self.addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        let addr = SocketAddr::new(ip, self.addr.port());
        format!("{}://{addr}", self.scheme)
    }

    /// A snapshot of the counters, for assertions after a run.
    pub fn stats(&self) -> StubStats {
        self.shared.stats()
    }

    /// Changes the issue endpoint's behaviour at run time (fault tests).
    pub fn set_mode(&self, mode: StubMode) {
        self.shared.set_mode(mode);
    }

    /// Changes the revoke endpoint's behaviour at run time, independently of the
    /// issue endpoint, so a test can fail revocations while issuing keeps working.
    pub fn set_revoke_mode(&self, mode: StubMode) {
        self.shared.set_revoke_mode(mode);
    }

    /// The tokens revoked so far, in the order they were revoked, so a test can
    /// check that exactly the right tokens were revoked, once each.
    pub fn revoked(&self) -> Vec<RevokedToken> {
        lock(&self.shared.ledger).revoked_list()
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
    let tls = args.tls()?;
    let (listen, config) = args.into_config()?;
    let stub = StubIssuer::serve(listen, config, tls.as_ref())
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
    revoke_requests: AtomicU64,
    revoked: AtomicU64,
    revoke_failed: AtomicU64,
    revoke_unauthorized: AtomicU64,
    revoke_rejected: AtomicU64,
}

/// A token minted for an idempotency key, with the container it was minted for.
struct Minted {
    ten: String,
    token: String,
}

/// What the stub remembers of a token it minted, for revoke, inspect and the
/// revoked list; keyed by SHA-256 of the token, so the token text is not kept twice.
struct TokenRecord {
    ten: String,
    jti: String,
    issued_at: OffsetDateTime,
    revoked_at: Option<OffsetDateTime>,
    revoke_calls: u64,
}

/// State that must change together; behind a mutex held only for a few map
/// operations and one hash, never across an await.
#[derive(Default)]
struct Ledger {
    by_key: HashMap<String, Minted>,
    per_container: HashMap<String, u64>,
    tokens: HashMap<[u8; 32], TokenRecord>,
    /// Digests of revoked tokens in revocation order, for a stable list.
    revoked_order: Vec<[u8; 32]>,
}

impl Ledger {
    /// Records a revoke call for the token with this digest and says what to answer.
    fn revoke(&mut self, digest: &[u8; 32], now: OffsetDateTime) -> RevokeAnswer {
        let Some(record) = self.tokens.get_mut(digest) else {
            return RevokeAnswer::Unknown;
        };
        record.revoke_calls += 1;
        let fingerprint = fingerprint(digest);
        if record.revoked_at.is_some() {
            return RevokeAnswer::AlreadyRevoked { fingerprint };
        }
        record.revoked_at = Some(now);
        let answer = RevokeAnswer::Revoked {
            fingerprint,
            ten: record.ten.clone(),
            jti: record.jti.clone(),
            revoked_at: now,
        };
        self.revoked_order.push(*digest);
        answer
    }

    /// The revoked tokens in revocation order (fingerprints only, never the token).
    fn revoked_list(&self) -> Vec<RevokedToken> {
        self.revoked_order
            .iter()
            .filter_map(|digest| {
                let record = self.tokens.get(digest)?;
                Some(RevokedToken {
                    jti: record.jti.clone(),
                    ten: record.ten.clone(),
                    fingerprint: fingerprint(digest),
                    issued_at: record.issued_at,
                    revoked_at: record.revoked_at?,
                    revoke_calls: record.revoke_calls,
                })
            })
            .collect()
    }
}

/// A validated issue request: the container, the extra restrictions and the
/// idempotency key (None when absent or when idempotency is switched off).
struct IssueRequest {
    ten: String,
    extra: Map<String, Value>,
    key: Option<String>,
}

struct Shared {
    master_token: SecretString,
    master_digest: [u8; 32],
    latency_nanos: AtomicU64,
    latency_jitter: Duration,
    fail_rate: f64,
    fail_status: u16,
    honour_idempotency: bool,
    /// [`MAX_TRACKED_TOKENS`], a field so unit tests can reach the bound cheaply.
    token_cap: usize,
    mode: Mutex<StubMode>,
    revoke_mode: Mutex<StubMode>,
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

/// The injected failure a mode calls for, if any; counts down `FailNext`.
fn mode_fault(mode: &Mutex<StubMode>) -> Option<Fault> {
    let mut mode = lock(mode);
    match *mode {
        StubMode::Normal => None,
        StubMode::Unauthorized => Some(Fault::MasterRevoked),
        StubMode::FailAll(status) => Some(Fault::Injected(status)),
        StubMode::FailNext { n, status } => {
            *mode = if n <= 1 {
                StubMode::Normal
            } else {
                StubMode::FailNext { n: n - 1, status }
            };
            (n >= 1).then_some(Fault::Injected(status))
        }
    }
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
            token_cap: MAX_TRACKED_TOKENS,
            mode: Mutex::new(StubMode::Normal),
            revoke_mode: Mutex::new(StubMode::Normal),
            ledger: Mutex::new(Ledger::default()),
            counters: Counters::default(),
        }
    }

    fn stats(&self) -> StubStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        StubStats {
            requests: get(&c.requests),
            issued: get(&c.issued),
            replayed: get(&c.replayed),
            failed: get(&c.failed),
            unauthorized: get(&c.unauthorized),
            distinct_containers: get(&c.distinct_containers),
            issued_per_container_max: get(&c.issued_per_container_max),
            revoke_requests: get(&c.revoke_requests),
            revoked: get(&c.revoked),
            revoke_failed: get(&c.revoke_failed),
            revoke_unauthorized: get(&c.revoke_unauthorized),
            revoke_rejected: get(&c.revoke_rejected),
        }
    }

    fn set_mode(&self, mode: StubMode) {
        *lock(&self.mode) = mode;
        tracing::info!(?mode, "stub issuer mode changed");
    }

    fn set_revoke_mode(&self, mode: StubMode) {
        *lock(&self.revoke_mode) = mode;
        tracing::info!(?mode, "stub issuer revoke mode changed");
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

    /// Waits this request's delay (the modelled slowness of the issuer).
    async fn wait_latency(&self) {
        let delay = self.delay();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
    }

    /// Injected failures and authentication for issue, in the documented order:
    /// run-time mode, then `--fail-rate`, then the bearer token.
    fn issue_fault(&self, headers: &HeaderMap) -> Option<Fault> {
        if let Some(fault) = mode_fault(&self.mode) {
            return Some(fault);
        }
        if self.fail_rate > 0.0 && rand::rng().random_bool(self.fail_rate) {
            return Some(Fault::Injected(self.fail_status));
        }
        (!self.authorized(headers)).then_some(Fault::Forbidden)
    }

    /// Injected failures and authentication for revoke: the revoke mode, then the
    /// bearer token (`--fail-rate` is for issue only).
    fn revoke_fault(&self, headers: &HeaderMap) -> Option<Fault> {
        if let Some(fault) = mode_fault(&self.revoke_mode) {
            return Some(fault);
        }
        (!self.authorized(headers)).then_some(Fault::Forbidden)
    }

    /// Everything after the latency; synchronous, so no lock can be held across
    /// an await.
    fn handle_issue(&self, headers: &HeaderMap, body: &[u8]) -> Answer {
        if let Some(fault) = self.issue_fault(headers) {
            return Answer::Fault(fault);
        }
        match self.parse_issue_request(headers, body) {
            Ok(request) => self.mint_or_replay(request),
            Err(why) => Answer::BadRequest(why),
        }
    }

    /// The body and the `Idempotency-Key` (ignored when idempotency is off).
    fn parse_issue_request(
        &self,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<IssueRequest, String> {
        let (ten, extra) = parse_issue_body(body)?;
        let key = if self.honour_idempotency {
            idempotency_key(headers)?
        } else {
            None
        };
        Ok(IssueRequest { ten, extra, key })
    }

    /// Replays the token of a known idempotency key, or mints and records a new one.
    fn mint_or_replay(&self, request: IssueRequest) -> Answer {
        let IssueRequest { ten, extra, key } = request;
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
        if ledger.tokens.len() >= self.token_cap {
            return Answer::LedgerFull;
        }
        let (token, jti) = self.mint(&ten, extra);
        self.record_minted(&mut ledger, &ten, &token, jti);
        if let Some(key) = key {
            let minted = Minted {
                ten: ten.clone(),
                token: token.clone(),
            };
            ledger.by_key.insert(key, minted);
        }
        Answer::Issued {
            token,
            ten,
            replayed: false,
        }
    }

    /// Remembers a new token for revoke/inspect and updates the per-container counts.
    fn record_minted(&self, ledger: &mut Ledger, ten: &str, token: &str, jti: String) {
        let record = TokenRecord {
            ten: ten.to_owned(),
            jti,
            issued_at: OffsetDateTime::now_utc(),
            revoked_at: None,
            revoke_calls: 0,
        };
        ledger.tokens.insert(sha256(token.as_bytes()), record);
        let count = ledger.per_container.entry(ten.to_owned()).or_insert(0);
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
    }

    /// Everything of a revoke after the latency, in the documented order.
    fn handle_revoke(
        &self,
        headers: &HeaderMap,
        token: Result<String, &'static str>,
    ) -> RevokeAnswer {
        if let Some(fault) = self.revoke_fault(headers) {
            return RevokeAnswer::Fault(fault);
        }
        let token = match token {
            Ok(token) => token,
            Err(why) => return RevokeAnswer::BadQuery(why),
        };
        let digest = sha256(token.as_bytes());
        lock(&self.ledger).revoke(&digest, OffsetDateTime::now_utc())
    }

    /// What inspect answers for a token: unknown, revoked, or live with its claims.
    fn inspect(&self, token: &str) -> InspectAnswer {
        let digest = sha256(token.as_bytes());
        let ledger = lock(&self.ledger);
        match ledger.tokens.get(&digest) {
            None => InspectAnswer::Unknown,
            Some(record) => match record.revoked_at {
                Some(revoked_at) => InspectAnswer::Revoked { revoked_at },
                None => InspectAnswer::Live {
                    ten: record.ten.clone(),
                    jti: record.jti.clone(),
                    issued_at: record.issued_at,
                },
            },
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

    /// A JWT-shaped token and its `jti`: `ten`, a fresh `jti` and `iat`, plus the
    /// extra restrictions; "signed" with SHA-256 over the signing input and the
    /// master token, which is enough for a stub and needs no extra dependency.
    fn mint(&self, ten: &str, extra: Map<String, Value>) -> (String, String) {
        let jti = uuid::Uuid::new_v4().simple().to_string();
        let mut payload = extra;
        payload.insert("ten".into(), Value::String(ten.to_owned()));
        payload.insert("jti".into(), Value::String(jti.clone()));
        payload.insert(
            "iat".into(),
            Value::from(OffsetDateTime::now_utc().unix_timestamp()),
        );
        let header = URL_SAFE_NO_PAD.encode(JWT_HEADER);
        let payload = URL_SAFE_NO_PAD.encode(Value::Object(payload).to_string());
        let signing_input = format!("{header}.{payload}");
        let mut hasher = Sha256::new();
        hasher.update(signing_input.as_bytes());
        hasher.update(self.master_token.expose_secret().as_bytes());
        let signature = URL_SAFE_NO_PAD.encode(hasher.finalize());
        (format!("{signing_input}.{signature}"), jti)
    }
}

/// The public fingerprint of a token from its SHA-256: the first 16 hex chars.
fn fingerprint(digest: &[u8; 32]) -> String {
    hex::encode(&digest[..8])
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

/// A request refused before its content is looked at: an injected failure or a
/// failed authentication. Shared by issue and revoke so both answer alike.
enum Fault {
    /// An injected failure with this status (run-time mode or `--fail-rate`).
    Injected(u16),
    /// Mode `Unauthorized`: 401 as if the master token had been revoked.
    MasterRevoked,
    /// Missing or wrong bearer token: 403.
    Forbidden,
}

/// What the issue endpoint answers; computed synchronously, rendered afterwards.
enum Answer {
    Fault(Fault),
    BadRequest(String),
    KeyReused {
        first_ten: String,
        ten: String,
    },
    LedgerFull,
    Issued {
        token: String,
        ten: String,
        replayed: bool,
    },
}

/// What the revoke endpoint answers; computed synchronously, rendered afterwards.
enum RevokeAnswer {
    Fault(Fault),
    BadQuery(&'static str),
    Unknown,
    AlreadyRevoked {
        fingerprint: String,
    },
    Revoked {
        fingerprint: String,
        ten: String,
        jti: String,
        revoked_at: OffsetDateTime,
    },
}

/// What the inspect endpoint answers for an authenticated request with a token.
enum InspectAnswer {
    Unknown,
    Revoked {
        revoked_at: OffsetDateTime,
    },
    Live {
        ten: String,
        jti: String,
        issued_at: OffsetDateTime,
    },
}

/// The query of revoke and inspect; other parameters are ignored.
#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/api/tokens/issue", post(issue))
        .route("/api/tokens/revoke", post(revoke))
        .route("/api/tokens/inspect", get(inspect))
        .route("/stub/stats", get(stats))
        .route("/stub/revoked", get(revoked_list))
        .route("/stub/mode", post(set_mode))
        .route("/stub/revoke-mode", post(set_revoke_mode))
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

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

/// The `token` parameter, or why there is none usable (answered 400). Taken as a
/// `Result` so a malformed query is answered after latency and faults, in order.
fn query_token(query: Result<Query<TokenQuery>, QueryRejection>) -> Result<String, &'static str> {
    let Ok(Query(query)) = query else {
        return Err("invalid query string");
    };
    match query.token {
        Some(token) if !token.trim().is_empty() => Ok(token),
        _ => Err("missing token"),
    }
}

/// Renders a fault; `what` ("issue", "revoke") only labels the log line.
fn fault_response(fault: &Fault, what: &str) -> Response {
    match *fault {
        Fault::Injected(code) => {
            let status = StatusCode::from_u16(code)
                .ok()
                .filter(|s| (200..=599).contains(&s.as_u16()))
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            tracing::debug!(status = status.as_u16(), "{what}: injected failure");
            let body = format!("stub issuer: injected failure {}\n", status.as_u16());
            (status, body).into_response()
        }
        Fault::MasterRevoked => {
            tracing::debug!(status = 401, "{what}: unauthorized (mode)");
            json_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                Some("the master token has been revoked (stub mode)"),
            )
        }
        Fault::Forbidden => {
            tracing::debug!(status = 403, "{what}: missing or wrong bearer token");
            json_error(StatusCode::FORBIDDEN, "forbidden", None)
        }
    }
}

async fn issue(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    shared.counters.requests.fetch_add(1, Ordering::Relaxed);
    shared.wait_latency().await;
    let answer = shared.handle_issue(&headers, &body);
    count_issue(&shared.counters, &answer);
    render_issue(answer)
}

/// Counts an issue outcome in exactly one of the outcome counters.
fn count_issue(counters: &Counters, answer: &Answer) {
    let counter = match answer {
        Answer::Fault(Fault::MasterRevoked | Fault::Forbidden) => &counters.unauthorized,
        Answer::Fault(Fault::Injected(_))
        | Answer::BadRequest(_)
        | Answer::KeyReused { .. }
        | Answer::LedgerFull => &counters.failed,
        Answer::Issued { replayed: true, .. } => &counters.replayed,
        Answer::Issued {
            replayed: false, ..
        } => &counters.issued,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn render_issue(answer: Answer) -> Response {
    match answer {
        Answer::Fault(fault) => fault_response(&fault, "issue"),
        Answer::BadRequest(why) => {
            tracing::debug!(status = 400, reason = %why, "issue: bad request");
            json_error(StatusCode::BAD_REQUEST, "bad_request", Some(&why))
        }
        Answer::KeyReused { first_ten, ten } => {
            tracing::debug!(status = 422, %ten, %first_ten, "issue: idempotency key reused");
            let why =
                format!("Idempotency-Key was first used for container {first_ten:?}, not {ten:?}");
            let status = StatusCode::UNPROCESSABLE_ENTITY;
            json_error(status, "idempotency_key_reused", Some(&why))
        }
        Answer::LedgerFull => {
            tracing::warn!(cap = MAX_TRACKED_TOKENS, "issue: token ledger full");
            let why =
                format!("stub issuer remembers at most {MAX_TRACKED_TOKENS} tokens; restart it");
            json_error(StatusCode::SERVICE_UNAVAILABLE, "ledger_full", Some(&why))
        }
        Answer::Issued {
            token,
            ten,
            replayed,
        } => {
            tracing::debug!(status = 200, %ten, replayed, "issue: token answered");
            let content_type = HeaderValue::from_static("text/plain; charset=utf-8");
            ([(header::CONTENT_TYPE, content_type)], token).into_response()
        }
    }
}

async fn revoke(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Response {
    shared
        .counters
        .revoke_requests
        .fetch_add(1, Ordering::Relaxed);
    shared.wait_latency().await;
    let answer = shared.handle_revoke(&headers, query_token(query));
    count_revoke(&shared.counters, &answer);
    render_revoke(answer)
}

/// Counts a revoke outcome in exactly one of the revoke outcome counters.
fn count_revoke(counters: &Counters, answer: &RevokeAnswer) {
    let counter = match answer {
        RevokeAnswer::Fault(Fault::MasterRevoked | Fault::Forbidden) => {
            &counters.revoke_unauthorized
        }
        RevokeAnswer::Fault(Fault::Injected(_)) => &counters.revoke_failed,
        RevokeAnswer::BadQuery(_) | RevokeAnswer::Unknown | RevokeAnswer::AlreadyRevoked { .. } => {
            &counters.revoke_rejected
        }
        RevokeAnswer::Revoked { .. } => &counters.revoked,
    };
    counter.fetch_add(1, Ordering::Relaxed);
}

fn render_revoke(answer: RevokeAnswer) -> Response {
    match answer {
        RevokeAnswer::Fault(fault) => fault_response(&fault, "revoke"),
        RevokeAnswer::BadQuery(why) => {
            tracing::debug!(status = 400, reason = why, "revoke: bad request");
            json_error(StatusCode::BAD_REQUEST, "bad_request", Some(why))
        }
        RevokeAnswer::Unknown => {
            tracing::debug!(status = 404, "revoke: token unknown");
            json_error(StatusCode::NOT_FOUND, "not_found", Some("token unknown"))
        }
        RevokeAnswer::AlreadyRevoked { fingerprint } => {
            tracing::debug!(status = 400, %fingerprint, "revoke: token already revoked");
            let message = Some("token already revoked");
            json_error(StatusCode::BAD_REQUEST, "bad_request", message)
        }
        RevokeAnswer::Revoked {
            fingerprint,
            ten,
            jti,
            revoked_at,
        } => {
            tracing::debug!(status = 200, %fingerprint, %ten, %jti, "revoke: token revoked");
            let body = json!({ "revoked": true, "jti": jti, "revoked_at": rfc3339(revoked_at) });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
    }
}

/// `GET /api/tokens/inspect`: bearer check only (no latency, no injection), since
/// tests use it to observe whether a token still works.
async fn inspect(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    query: Result<Query<TokenQuery>, QueryRejection>,
) -> Response {
    if !shared.authorized(&headers) {
        return fault_response(&Fault::Forbidden, "inspect");
    }
    let token = match query_token(query) {
        Ok(token) => token,
        Err(why) => return json_error(StatusCode::BAD_REQUEST, "bad_request", Some(why)),
    };
    match shared.inspect(&token) {
        InspectAnswer::Unknown => {
            json_error(StatusCode::NOT_FOUND, "not_found", Some("token unknown"))
        }
        InspectAnswer::Revoked { revoked_at } => {
            let body = json!({
                "error": "revoked",
                "message": "token revoked",
                "revoked_at": rfc3339(revoked_at),
            });
            (StatusCode::GONE, axum::Json(body)).into_response()
        }
        InspectAnswer::Live {
            ten,
            jti,
            issued_at,
        } => {
            let body = json!({ "ten": ten, "jti": jti, "issued_at": rfc3339(issued_at) });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
    }
}

async fn stats(State(shared): State<Arc<Shared>>) -> axum::Json<StubStats> {
    axum::Json(shared.stats())
}

async fn revoked_list(State(shared): State<Arc<Shared>>) -> axum::Json<Vec<RevokedToken>> {
    axum::Json(lock(&shared.ledger).revoked_list())
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

/// `POST /stub/revoke-mode`: the body of `/stub/mode` without `latency_ms`
/// (latency is shared by issue and revoke; set it on `/stub/mode`).
async fn set_revoke_mode(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    match parse_revoke_mode(&body) {
        Ok(mode) => {
            shared.set_revoke_mode(mode);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(why) => json_error(StatusCode::BAD_REQUEST, "bad_request", Some(&why)),
    }
}

/// Parses a `/stub/revoke-mode` body: a mode as for `/stub/mode`, no latency.
fn parse_revoke_mode(body: &[u8]) -> Result<StubMode, String> {
    match parse_mode_update(body)? {
        ModeUpdate {
            mode: Some(mode),
            latency: None,
        } => Ok(mode),
        _ => Err(r#"give "mode" only; "latency_ms" is set on /stub/mode"#.into()),
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
    fn revoke_mode_json_takes_a_mode_but_no_latency() {
        let p = |s: &str| parse_revoke_mode(s.as_bytes());
        assert_eq!(
            p(r#"{"mode":"fail_all","status":503}"#),
            Ok(StubMode::FailAll(503))
        );
        assert_eq!(p(r#"{"mode":"unauthorized"}"#), Ok(StubMode::Unauthorized));
        assert!(p(r#"{"latency_ms":5}"#).is_err());
        assert!(p(r#"{"mode":"normal","latency_ms":5}"#).is_err());
        assert!(p("{}").is_err());
    }

    #[test]
    fn full_ledger_refuses_to_mint_instead_of_forgetting() {
        let mut shared = Shared::new(StubConfig::new(SecretString::from("m")));
        shared.token_cap = 2;
        let request = |key: &str| IssueRequest {
            ten: "t".into(),
            extra: Map::new(),
            key: Some(key.into()),
        };
        assert!(matches!(
            shared.mint_or_replay(request("a")),
            Answer::Issued { .. }
        ));
        assert!(matches!(
            shared.mint_or_replay(request("b")),
            Answer::Issued { .. }
        ));
        assert!(matches!(
            shared.mint_or_replay(request("c")),
            Answer::LedgerFull
        ));
        // Replays need no new entry, so they still work.
        assert!(matches!(
            shared.mint_or_replay(request("a")),
            Answer::Issued { replayed: true, .. }
        ));
    }

    #[test]
    fn ledger_counts_every_revoke_call_and_lists_in_order() {
        let shared = Shared::new(StubConfig::new(SecretString::from("m")));
        let mut ledger = Ledger::default();
        let (first, jti) = shared.mint("one", Map::new());
        shared.record_minted(&mut ledger, "one", &first, jti.clone());
        let (second, _) = shared.mint("two", Map::new());
        shared.record_minted(&mut ledger, "two", &second, "j2".into());
        let now = OffsetDateTime::now_utc();
        let (d1, d2) = (sha256(first.as_bytes()), sha256(second.as_bytes()));
        assert!(matches!(
            ledger.revoke(&d2, now),
            RevokeAnswer::Revoked { .. }
        ));
        assert!(matches!(
            ledger.revoke(&d1, now),
            RevokeAnswer::Revoked { .. }
        ));
        assert!(matches!(
            ledger.revoke(&d1, now),
            RevokeAnswer::AlreadyRevoked { .. }
        ));
        assert!(matches!(
            ledger.revoke(&[0; 32], now),
            RevokeAnswer::Unknown
        ));
        let list = ledger.revoked_list();
        let summary: Vec<_> = list
            .iter()
            .map(|r| (r.ten.as_str(), r.revoke_calls))
            .collect();
        assert_eq!(summary, [("two", 1), ("one", 2)]);
        assert_eq!(list[1].jti, jti);
        assert_eq!(list[1].fingerprint, hex::encode(&d1[..8]));
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
