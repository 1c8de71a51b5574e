//! The webtask issue call (contract §4): one HTTP client, typed outcomes, and retries with
//! exponential backoff and jitter inside a per-message budget.
//!
//! Only transient failures are retried here. A 401/403 is an [`IssuerError::Unauthorized`]
//! that the caller turns into a paused consumer; another 4xx is [`IssuerError::Rejected`].

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::Semaphore;

use backon::{ExponentialBuilder, Retryable as _};
use reqwest::StatusCode;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Map, Value};

use crate::domain::{ContainerName, TenantId, TenantToken};
use crate::telemetry::metric;

/// The longest issuer body kept in errors and dead letters; no more of an error is read.
const MAX_BODY_SNIPPET: usize = 1024;
/// The most of a 200 body that is read: a token is at most 16 KiB (see
/// [`TenantToken::parse`]), with room for a JSON wrapper. A longer body is no token.
const MAX_TOKEN_BODY: usize = 20 * 1024;

/// How the issue call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IssuerError {
    /// Connection error, timeout, 408, 429, 5xx, or a 200 without a token: try again later.
    #[error("issuer unavailable: {message}")]
    Transient {
        /// What happened, without secrets.
        message: String,
        /// The HTTP status, when there was an answer.
        status: Option<u16>,
        /// The issuer's `Retry-After`, if any.
        retry_after: Option<Duration>,
    },
    /// 401 or 403: the master token is wrong or revoked. Nothing is wrong with the message.
    #[error("issuer refused the master token (HTTP {status})")]
    Unauthorized {
        /// 401 or 403.
        status: u16,
    },
    /// Any other 4xx: the request itself is refused and retrying will not help.
    #[error("issuer rejected the request with HTTP {status}: {body}")]
    Rejected {
        /// The HTTP status.
        status: u16,
        /// The start of the body (at most 1 KiB).
        body: String,
    },
}

impl IssuerError {
    /// Whether another try may succeed.
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Self::Transient { .. })
    }
}

/// Extra restrictions sent with every issue call, validated at start-up.
#[derive(Debug, Clone, Default)]
pub struct Restrictions {
    fixed: Map<String, Value>,
    /// `exp` as seconds from the moment of the call.
    exp_in: Option<u64>,
}

impl Restrictions {
    /// Parses `ISSUER_RESTRICTIONS`: a JSON object of webtask restrictions, e.g.
    /// `{"dd":0,"exp":86400}` (`exp` and `nbf` in seconds from now). `ten` is the worker's.
    pub(crate) fn parse(json: &str) -> Result<Self, String> {
        if json.trim().is_empty() {
            return Ok(Self::default());
        }
        let v: Value = serde_json::from_str(json)
            .map_err(|e| format!("ISSUER_RESTRICTIONS is not JSON: {e}"))?;
        let Value::Object(obj) = v else {
            return Err("ISSUER_RESTRICTIONS must be a JSON object".into());
        };
        let mut r = Self::default();
        for (k, v) in obj {
            let positive = v.as_u64().filter(|n| *n > 0);
            match k.as_str() {
                "ten" => {
                    return Err(
                        "ISSUER_RESTRICTIONS must not set `ten`: the worker sets it per tenant"
                            .into(),
                    );
                }
                "exp" => {
                    r.exp_in = Some(
                        positive.ok_or("`exp` must be a positive number of seconds from now")?,
                    )
                }
                "dd" => {
                    v.as_u64().ok_or("`dd` must be a non-negative integer")?;
                    r.fixed.insert(k, v);
                }
                "pb" | "mb" => {
                    if !matches!(v.as_u64(), Some(0 | 1)) {
                        return Err(format!("`{k}` must be 0 or 1"));
                    }
                    r.fixed.insert(k, v);
                }
                "host" | "url" | "jtn" => {
                    v.as_str().ok_or(format!("`{k}` must be a string"))?;
                    r.fixed.insert(k, v);
                }
                "pctx" | "ectx" | "meta" => {
                    if !v.is_object() {
                        return Err(format!("`{k}` must be a JSON object"));
                    }
                    r.fixed.insert(k, v);
                }
                other => {
                    return Err(format!(
                        "unknown restriction `{other}` in ISSUER_RESTRICTIONS (known: dd, exp, pb, mb, host, url, jtn, pctx, ectx, meta)"
                    ));
                }
            }
        }
        Ok(r)
    }

    fn body(&self, container: &ContainerName) -> Value {
        let mut m = self.fixed.clone();
        m.insert("ten".into(), Value::String(container.as_str().to_owned()));
        if let Some(secs) = self.exp_in {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            m.insert("exp".into(), Value::from(now + secs));
        }
        Value::Object(m)
    }
}

/// Retry settings for one message's issue call.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// First backoff delay.
    pub min_delay: Duration,
    /// Largest backoff delay.
    pub max_delay: Duration,
    /// Time one message may spend retrying before it is handed to delayed redelivery.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            budget: Duration::from_secs(10),
        }
    }
}

/// Settings of the issuer client.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    /// Base URL; the call goes to `{url}/api/tokens/issue`.
    pub url: String,
    /// The platform's master token.
    pub master_token: SecretString,
    /// Extra restrictions.
    pub restrictions: Restrictions,
    /// Timeout of one HTTP request.
    pub timeout: Duration,
    /// Retries within one message.
    pub retry: RetryPolicy,
    /// Issuer calls (issue and revoke) in flight at once per process (`ISSUER_CONCURRENCY`).
    pub concurrency: usize,
    /// Certificate authorities trusted for the issuer on top of the system's
    /// (`ISSUER_CA_FILE`): an issuer behind a private CA.
    pub extra_roots: Vec<reqwest::Certificate>,
}

/// Reads `ISSUER_CA_FILE`: every certificate of a PEM bundle. A file without one is an error,
/// so a wrong path or a key file given by mistake stops start-up instead of every call.
pub fn read_ca_file(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let what = || format!("ISSUER_CA_FILE {}", path.display());
    let pem = std::fs::read(path).map_err(|e| format!("{}: {e}", what()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{}: not PEM certificates: {e}", what()))?;
    if certs.is_empty() {
        return Err(format!("{}: holds no PEM certificate", what()));
    }
    Ok(certs)
}

/// The issuer client. Cheap to clone; one connection pool per process.
#[derive(Clone)]
pub struct IssuerClient {
    http: reqwest::Client,
    endpoint: String,
    revoke_endpoint: String,
    master: SecretString,
    restrictions: Restrictions,
    retry: RetryPolicy,
    /// Shared by issue and revoke calls, so the issuer is protected whatever the throughput.
    calls: Arc<Semaphore>,
}

impl IssuerClient {
    /// Builds the client; fails only on an unusable URL or TLS setup.
    pub fn new(settings: IssuerSettings) -> Result<Self, String> {
        let base = settings.url.trim_end_matches('/');
        let endpoint = format!("{base}/api/tokens/issue");
        let revoke_endpoint = format!("{base}/api/tokens/revoke");
        reqwest::Url::parse(&endpoint).map_err(|e| format!("ISSUER_URL is not a URL: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .pool_max_idle_per_host(256)
            .user_agent(concat!("tenant-tokens/", env!("CARGO_PKG_VERSION")))
            .tls_certs_merge(settings.extra_roots)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Self {
            http,
            endpoint,
            revoke_endpoint,
            master: settings.master_token,
            restrictions: settings.restrictions,
            retry: settings.retry,
            calls: Arc::new(Semaphore::new(settings.concurrency.max(1))),
        })
    }

    /// The `Idempotency-Key` of a tenant's token of `generation`: derived from tenant,
    /// container and generation, so a retry after a crash (also mid-rotation) asks for exactly
    /// the same thing. Generation 1 keeps the key of the tenant and container alone, as before
    /// generations existed.
    pub(crate) fn idempotency_key(
        tenant: &TenantId,
        container: &ContainerName,
        generation: u32,
    ) -> String {
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, tenant.as_str().as_bytes());
        sha2::Digest::update(&mut h, [0]);
        sha2::Digest::update(&mut h, container.as_str().as_bytes());
        if generation > 1 {
            sha2::Digest::update(&mut h, [0]);
            sha2::Digest::update(&mut h, generation.to_be_bytes());
        }
        format!("tt-{}", hex::encode(&sha2::Digest::finalize(h)[..16]))
    }

    /// Issues generation `generation` of a token for `container`, retrying transient failures
    /// within the budget.
    pub(crate) async fn issue(
        &self,
        tenant: &TenantId,
        container: &ContainerName,
        generation: u32,
    ) -> Result<TenantToken, IssuerError> {
        let key = Self::idempotency_key(tenant, container, generation);
        let deadline = Instant::now() + self.retry.budget;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_jitter()
            .without_max_times();
        (|| self.issue_once(container, &key))
            .retry(backoff)
            .sleep(tokio::time::sleep)
            .when(IssuerError::is_transient)
            .adjust(|e, next| {
                let wait = match (e, next) {
                    (
                        IssuerError::Transient {
                            retry_after: Some(ra),
                            ..
                        },
                        Some(d),
                    ) => (*ra).max(d),
                    (_, d) => d?,
                };
                (Instant::now() + wait <= deadline).then_some(wait)
            })
            .notify(|e, wait| {
                tracing::debug!(tenant = %tenant, error = %e, ?wait, "issue call failed, retrying");
            })
            .await
    }

    /// One HTTP request, classified.
    pub(crate) async fn issue_once(
        &self,
        container: &ContainerName,
        idempotency_key: &str,
    ) -> Result<TenantToken, IssuerError> {
        let _slot = self.calls.acquire().await;
        let started = Instant::now();
        let result = self
            .http
            .post(&self.endpoint)
            .bearer_auth(self.master.expose_secret())
            .header("Idempotency-Key", idempotency_key)
            .json(&self.restrictions.body(container))
            .send()
            .await;
        let outcome = match result {
            Err(e) => Err(IssuerError::Transient {
                message: describe_transport(&e),
                status: None,
                retry_after: None,
            }),
            Ok(resp) => classify(resp, self.master.expose_secret()).await,
        };
        metrics::histogram!(metric::ISSUER_DURATION).record(started.elapsed().as_secs_f64());
        count_status(&outcome);
        outcome
    }
}

/// Counts an issuer call in `tenant_tokens_issuer_requests_total` by its status class.
fn count_status<T>(outcome: &Result<T, IssuerError>) {
    let status = match outcome {
        Ok(_) => "2xx",
        Err(IssuerError::Unauthorized { .. } | IssuerError::Rejected { .. }) => "4xx",
        Err(IssuerError::Transient {
            status: Some(s), ..
        }) => match s / 100 {
            2 => "2xx",
            4 => "4xx",
            5 => "5xx",
            _ => "error",
        },
        Err(IssuerError::Transient { status: None, .. }) => "error",
    };
    metrics::counter!(metric::ISSUER_REQUESTS, "status" => status).increment(1);
}

impl IssuerClient {
    /// Revokes `token` (contract §10): one HTTP request, no retries here (the revoker retries
    /// across passes and restarts). `2xx` is revoked; a `400`/`404` whose body says the token
    /// is unknown or already revoked counts as revoked too (revocation is idempotent); `401`
    /// and `403` are [`IssuerError::Unauthorized`]; anything else is transient.
    pub(crate) async fn revoke(&self, token: &TenantToken) -> Result<(), IssuerError> {
        let url =
            reqwest::Url::parse_with_params(&self.revoke_endpoint, [("token", token.expose())])
                .map_err(|e| IssuerError::Transient {
                    message: format!("cannot build the revoke URL: {e}"),
                    status: None,
                    retry_after: None,
                })?;
        let _slot = self.calls.acquire().await;
        let started = Instant::now();
        let result = self
            .http
            .post(url)
            .bearer_auth(self.master.expose_secret())
            .send()
            .await;
        metrics::histogram!(metric::ISSUER_DURATION).record(started.elapsed().as_secs_f64());
        let outcome = match result {
            // The URL carries the token: keep it out of the error.
            Err(e) => Err(IssuerError::Transient {
                message: describe_transport(&e.without_url()),
                status: None,
                retry_after: None,
            }),
            Ok(resp) => classify_revoke(resp).await,
        };
        count_status(&outcome);
        outcome
    }
}

async fn classify_revoke(resp: reqwest::Response) -> Result<(), IssuerError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body = read_at_most(resp, MAX_BODY_SNIPPET)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&body).to_ascii_lowercase();
    let gone_already =
        text.contains("unknown") || text.contains("already revoked") || text.contains("not found");
    match status {
        StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND if gone_already => Ok(()),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(IssuerError::Unauthorized {
            status: status.as_u16(),
        }),
        // No body in the message: an issuer could echo the token it was asked to revoke.
        s => Err(IssuerError::Transient {
            message: format!("revoke answered HTTP {}", s.as_u16()),
            status: Some(s.as_u16()),
            retry_after: None,
        }),
    }
}

/// A transport error in words, without the URL's credentials (reqwest strips none by itself).
fn describe_transport(e: &reqwest::Error) -> String {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        detail = s.to_string();
        source = s.source();
    }
    if detail.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {detail}")
    }
}

/// `master` is the master token: an issuer that echoes it in an error body must not carry it
/// into errors, logs and dead letters.
async fn classify(resp: reqwest::Response, master: &str) -> Result<TenantToken, IssuerError> {
    let status = resp.status();
    let retry_after = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(3600)));
    // Read no more than what is used: a token (or its JSON wrapper), or the start of an error.
    let limit = if status == StatusCode::OK {
        // One byte more than a token body may have, so that a longer one is seen as such.
        MAX_TOKEN_BODY + 1
    } else {
        MAX_BODY_SNIPPET
    };
    let body = match read_at_most(resp, limit).await {
        Ok(b) => b,
        Err(e) => {
            return Err(IssuerError::Transient {
                message: format!(
                    "HTTP {} body unreadable: {}",
                    status.as_u16(),
                    describe_transport(&e)
                ),
                status: Some(status.as_u16()),
                retry_after,
            });
        }
    };
    match status {
        StatusCode::OK => token_from_body(&body).ok_or_else(|| IssuerError::Transient {
            message: "HTTP 200 without a token in the body".into(),
            status: Some(200),
            retry_after: None,
        }),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Err(IssuerError::Unauthorized {
            status: status.as_u16(),
        }),
        StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => {
            Err(IssuerError::Transient {
                message: format!("HTTP {}", status.as_u16()),
                status: Some(status.as_u16()),
                retry_after,
            })
        }
        s if s.is_client_error() => Err(IssuerError::Rejected {
            status: s.as_u16(),
            body: without_secret(snippet(&body), master),
        }),
        s => Err(IssuerError::Transient {
            message: format!("HTTP {}", s.as_u16()),
            status: Some(s.as_u16()),
            retry_after,
        }),
    }
}

/// The first `limit` bytes of a response body (one chunk more at most is buffered); the rest
/// is never read, so an issuer cannot make the worker allocate without bound.
async fn read_at_most(
    mut resp: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while body.len() < limit {
        match resp.chunk().await? {
            Some(chunk) => body.extend_from_slice(&chunk[..chunk.len().min(limit - body.len())]),
            None => break,
        }
    }
    Ok(body)
}

/// The token of a 200 body: raw text, or a JSON object with a `token` string.
fn token_from_body(body: &[u8]) -> Option<TenantToken> {
    // Only a prefix of a longer body was read, and a prefix can look like a token (a token,
    // white space, then an error page): a longer body is no token.
    if body.len() > MAX_TOKEN_BODY {
        return None;
    }
    let text = std::str::from_utf8(body).ok()?.trim();
    if text.starts_with('{') {
        let v: Value = serde_json::from_str(text).ok()?;
        return TenantToken::parse(v.get("token")?.as_str()?);
    }
    TenantToken::parse(text)
}

/// `text` with every occurrence of `secret` replaced by `***`.
fn without_secret(text: String, secret: &str) -> String {
    if secret.is_empty() || !text.contains(secret) {
        return text;
    }
    text.replace(secret, "***")
}

/// The start of a body as text, at most 1 KiB, on a character boundary.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(MAX_BODY_SNIPPET)]);
    let mut s = text.into_owned();
    while s.len() > MAX_BODY_SNIPPET {
        s.pop();
    }
    s
}

/// Everything the worker reads of an issuer's answer body, without HTTP: the token of a `200`
/// body and the error text a `4xx` body becomes (cut, `master` masked). Public only for the
/// fuzz target `fuzz/fuzz_targets/issuer_response.rs`, which must reach these private
/// parsers; not an API.
#[doc(hidden)]
pub fn read_answer_body(body: &[u8], master: &str) -> (Option<TenantToken>, String) {
    (token_from_body(body), without_secret(snippet(body), master))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restrictions_are_validated() {
        assert!(Restrictions::parse("").is_ok());
        assert!(Restrictions::parse(r#"{"dd":0,"exp":3600,"pb":1}"#).is_ok());
        for bad in [
            r#"{"ten":"x"}"#,
            r#"{"exp":-1}"#,
            r#"{"zzz":1}"#,
            "[1]",
            "{",
            r#"{"pb":2}"#,
        ] {
            assert!(Restrictions::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exp_is_seconds_from_now() {
        let r = Restrictions::parse(r#"{"exp":100,"dd":1}"#).expect("valid");
        let body = r.body(&ContainerName::parse("c-1").expect("name"));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        let exp = body["exp"].as_u64().expect("exp");
        assert!((now + 99..=now + 101).contains(&exp));
        assert_eq!(body["ten"], "c-1");
        assert_eq!(body["dd"], 1);
    }

    #[test]
    fn bodies_yield_tokens() {
        assert_eq!(
            token_from_body(b" a.b.c \n")
                .map(|t| t.expose().to_owned())
                .as_deref(),
            Some("a.b.c")
        );
        assert_eq!(
            token_from_body(br#"{"token":"x.y.z"}"#)
                .map(|t| t.expose().to_owned())
                .as_deref(),
            Some("x.y.z")
        );
        assert!(token_from_body(b"").is_none());
        assert!(token_from_body(br#"{"nope":1}"#).is_none());
    }

    #[test]
    fn an_echoed_master_token_is_masked() {
        let masked = without_secret("bad token M-123 (M-123)".to_owned(), "M-123");
        assert_eq!(masked, "bad token *** (***)");
        assert_eq!(without_secret("fine".to_owned(), ""), "fine");
    }

    #[test]
    fn snippets_are_cut_to_a_kib() {
        assert_eq!(snippet(&[b'a'; 5000]).len(), 1024);
        assert_eq!(snippet("é".repeat(600).as_bytes()).len(), 1024);
    }

    #[test]
    fn idempotency_keys_are_stable_per_tenant_and_container() {
        let t = TenantId::parse("t").expect("id");
        let c = ContainerName::parse("c").expect("name");
        let d = ContainerName::parse("d").expect("name");
        let key = IssuerClient::idempotency_key;
        assert_eq!(key(&t, &c, 1), key(&t, &c, 1));
        assert_ne!(key(&t, &c, 1), key(&t, &d, 1));
        assert_ne!(key(&t, &c, 1), key(&t, &c, 2), "each generation asks anew");
        assert_eq!(
            key(&t, &c, 2),
            key(&t, &c, 2),
            "a crash mid-rotation asks again"
        );
    }

    async fn client_for(server: &wiremock::MockServer) -> IssuerClient {
        IssuerClient::new(IssuerSettings {
            url: server.uri(),
            master_token: SecretString::from("master".to_owned()),
            restrictions: Restrictions::default(),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            concurrency: 4,
            extra_roots: Vec::new(),
        })
        .expect("client")
    }

    async fn answering(status: u16, body: Vec<u8>) -> wiremock::MockServer {
        let server = wiremock::MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(wiremock::ResponseTemplate::new(status).set_body_bytes(body))
            .mount(&server)
            .await;
        server
    }

    /// An HTTP server whose answer has the given status and a body that never ends.
    async fn endless(status: u16) -> String {
        use tokio::io::AsyncWriteExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            // Take the whole request (its JSON body ends with `}`) before answering.
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.ends_with(b"}") {
                match tokio::io::AsyncReadExt::read(&mut sock, &mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = format!("HTTP/1.1 {status} X\r\ncontent-length: 1000000000000\r\n\r\n");
            if sock.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 * 1024];
            while sock.write_all(&chunk).await.is_ok() {}
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_endless_error_body_is_read_only_as_far_as_the_snippet() {
        let url = endless(400).await;
        let client = IssuerClient::new(IssuerSettings {
            url,
            master_token: SecretString::from("master".to_owned()),
            restrictions: Restrictions::default(),
            timeout: Duration::from_secs(5),
            retry: RetryPolicy::default(),
            concurrency: 4,
            extra_roots: Vec::new(),
        })
        .expect("client");
        let container = ContainerName::parse("c-1").expect("name");
        match client.issue_once(&container, "k").await {
            Err(IssuerError::Rejected { status, body }) => {
                assert_eq!(status, 400);
                assert_eq!(body.len(), MAX_BODY_SNIPPET);
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_200_body_too_long_for_a_token_is_an_issuer_fault() {
        let server = answering(200, vec![b'a'; 1024 * 1024]).await;
        let container = ContainerName::parse("c-1").expect("name");
        let outcome = client_for(&server).await.issue_once(&container, "k").await;
        assert!(
            matches!(
                outcome,
                Err(IssuerError::Transient {
                    status: Some(200),
                    ..
                })
            ),
            "{outcome:?}"
        );
    }
}
