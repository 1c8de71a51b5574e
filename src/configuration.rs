//! Configuration (contract §8): environment variables, each also a flag of `run`, parsed and
//! checked once at start-up into [`Settings`]. A bad value stops `run` with exit code 2 and
//! a message that says what to fix, never with a secret in it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use secrecy::SecretString;

use crate::crypto::{EncryptionKey, TokenCipher};
use crate::domain::NamingStrategy;
use crate::issuer::{IssuerSettings, Restrictions, RetryPolicy};

/// The broker default of the contract: RabbitMQ on localhost, vhost `/`.
pub(crate) const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// The database default of the contract.
pub(crate) const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/tenant_tokens";

/// A configuration error: exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// A secret given on the command line or in the environment: `Debug` never shows it.
#[derive(Clone)]
pub struct SecretArg(String);

impl SecretArg {
    /// The secret, for the one place that must parse it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[REDACTED]")
    }
}

impl std::str::FromStr for SecretArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// Where the broker is.
#[derive(clap::Args, Debug, Clone)]
pub struct BrokerArgs {
    /// RabbitMQ URL, vhost included.
    #[arg(long, env = "AMQP_URL", default_value = DEFAULT_AMQP_URL, hide_env_values = true)]
    pub amqp_url: String,
}

/// Where the database is.
#[derive(clap::Args, Debug, Clone)]
pub struct DatabaseArgs {
    /// Postgres URL; the database is created if it does not exist.
    #[arg(long, env = "DATABASE_URL", default_value = DEFAULT_DATABASE_URL, hide_env_values = true)]
    pub database_url: String,
}

impl DatabaseArgs {
    /// A one-connection store for a command; the error names the database without its password.
    pub async fn connect(&self) -> anyhow::Result<crate::store::Store> {
        connect_store(&self.database_url).await
    }
}

/// A one-connection store at `url`; the error names the database without its password.
pub async fn connect_store(url: &str) -> anyhow::Result<crate::store::Store> {
    crate::store::Store::connect(url, 1)
        .await
        .map_err(|e| anyhow::anyhow!("{e} ({})", crate::telemetry::redact_url(url)))
}

/// The encryption key, inline or from a file.
#[derive(clap::Args, Debug, Clone)]
pub struct KeyArgs {
    /// Base64 of 32 bytes (`tenant-tokens keygen`).
    #[arg(long, env = "TOKEN_ENCRYPTION_KEY", hide_env_values = true)]
    pub token_encryption_key: Option<SecretArg>,
    /// A file holding the key.
    #[arg(long, env = "TOKEN_ENCRYPTION_KEY_FILE")]
    pub token_encryption_key_file: Option<PathBuf>,
    /// Retired keys (comma separated, base64) that still decrypt old rows after a rotation.
    #[arg(long, env = "TOKEN_DECRYPTION_KEYS", hide_env_values = true)]
    pub token_decryption_keys: Option<SecretArg>,
}

impl KeyArgs {
    /// The cipher, or the error that tells how to make a key.
    pub(crate) fn cipher(&self) -> Result<TokenCipher, ConfigError> {
        let text = secret_value(
            self.token_encryption_key.as_ref().map(SecretArg::expose),
            self.token_encryption_key_file.as_ref(),
            "TOKEN_ENCRYPTION_KEY",
        )?
        .ok_or_else(|| {
            ConfigError(
                "TOKEN_ENCRYPTION_KEY (or TOKEN_ENCRYPTION_KEY_FILE) is required: make one with \
                 `tenant-tokens keygen` and keep it in your secret store"
                    .into(),
            )
        })?;
        let current = EncryptionKey::from_base64(&text)
            .map_err(|e| ConfigError(format!("TOKEN_ENCRYPTION_KEY: {e}")))?;
        let retired = self
            .token_decryption_keys
            .as_ref()
            .map_or("", SecretArg::expose)
            .split(',')
            .filter(|k| !k.trim().is_empty())
            .map(EncryptionKey::from_base64)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConfigError(format!("TOKEN_DECRYPTION_KEYS: {e}")))?;
        TokenCipher::new(&current, &retired).map_err(|e| ConfigError(e.to_string()))
    }
}

/// Every flag of `run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub broker: BrokerArgs,
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Base URL of the webtask issuer (the call goes to `{url}/api/tokens/issue`).
    #[arg(long, env = "ISSUER_URL")]
    pub issuer_url: Option<String>,
    /// The platform's master token. Prefer the _FILE form: environments leak.
    #[arg(long, env = "ISSUER_MASTER_TOKEN", hide_env_values = true)]
    pub issuer_master_token: Option<SecretArg>,
    /// Accept a plain-http ISSUER_URL that is not on loopback (the master token then crosses
    /// the network in clear text: for a local stub behind a private network only).
    #[arg(long, env = "ISSUER_ALLOW_INSECURE", default_value_t = false, action = clap::ArgAction::Set)]
    pub issuer_allow_insecure: bool,
    /// A file holding the master token.
    #[arg(long, env = "ISSUER_MASTER_TOKEN_FILE")]
    pub issuer_master_token_file: Option<PathBuf>,
    /// PEM certificate authorities trusted for an https ISSUER_URL on top of the system's (an
    /// issuer behind a private CA).
    #[arg(long, env = "ISSUER_CA_FILE")]
    pub issuer_ca_file: Option<PathBuf>,
    /// Extra restrictions of every token, a JSON object, e.g. `{"dd":0,"exp":86400}` (seconds from now).
    #[arg(long, env = "ISSUER_RESTRICTIONS", default_value = "")]
    pub issuer_restrictions: String,
    /// Timeout of one issue request.
    #[arg(long, env = "ISSUER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub issuer_timeout: Duration,
    /// Time one message may spend retrying the issue call before delayed redelivery.
    #[arg(long, env = "ISSUE_RETRY_BUDGET", default_value = "10s", value_parser = parse_duration)]
    pub issue_retry_budget: Duration,
    /// Issuer calls (issue and revoke) in flight at once per process, whatever CONCURRENCY is.
    #[arg(long, env = "ISSUER_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub issuer_concurrency: u32,
    /// How long a superseded token stays valid after its replacement is stored.
    #[arg(long, env = "ROTATION_GRACE", default_value = "5m", value_parser = parse_duration)]
    pub rotation_grace: Duration,
    /// How old an issued-but-never-stored token must be before it is revoked.
    #[arg(long, env = "ORPHAN_GRACE", default_value = "10m", value_parser = parse_duration)]
    pub orphan_grace: Duration,
    /// Messages handled at once per process (the consumer prefetch).
    #[arg(long, env = "CONCURRENCY", default_value_t = 128, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Most deliveries that share one database transaction and one confirm wait.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub batch_size: u16,
    /// Database connections (batches in flight at once).
    #[arg(long, env = "DB_POOL_SIZE", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub db_pool_size: u32,
    /// Deliveries that may fail with a retryable error before the message is dead-lettered.
    #[arg(long, env = "MAX_ATTEMPTS", default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_attempts: u32,
    /// Delays of the retry queues, growing (the last one repeats).
    #[arg(long, env = "RETRY_DELAYS", default_value = "1s,5s,30s,2m,10m", value_parser = parse_delays)]
    pub retry_delays: Delays,
    /// How long in-flight work may take to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    #[arg(long, env = "OPS_ADDR", default_value = "127.0.0.1:9400")]
    pub ops_addr: SocketAddr,
    /// Bearer secret that allows the dead-letter console's actions (replay, purge); without
    /// it the console is read-only. Prefer the _FILE form.
    #[arg(long, env = "OPS_TOKEN", hide_env_values = true)]
    pub ops_token: Option<SecretArg>,
    /// A file holding OPS_TOKEN.
    #[arg(long, env = "OPS_TOKEN_FILE")]
    pub ops_token_file: Option<PathBuf>,
    /// How new containers are named.
    #[arg(long, env = "CONTAINER_NAMING", value_enum, default_value_t = NamingStrategy::Derived)]
    pub container_naming: NamingStrategy,
    /// Put the token itself into `tenant.token.ready`.
    #[arg(long, env = "EVENT_INCLUDE_TOKEN", default_value_t = false, action = clap::ArgAction::Set)]
    pub event_include_token: bool,
}

/// Retry-queue delays (a newtype so clap can parse the list as one value).
#[derive(Debug, Clone, PartialEq)]
pub struct Delays(pub Vec<Duration>);

/// Validated settings of the worker.
#[derive(Debug)]
pub struct Settings {
    /// RabbitMQ URL.
    pub amqp_url: String,
    /// Postgres URL.
    pub database_url: String,
    /// Pool size.
    pub db_pool_size: u32,
    /// Issuer client settings.
    pub issuer: IssuerSettings,
    /// Token encryption.
    pub cipher: TokenCipher,
    /// Prefetch.
    pub concurrency: u16,
    /// Batch limit.
    pub batch_size: u16,
    /// Attempt limit.
    pub max_attempts: u32,
    /// Retry delays.
    pub retry_delays: Vec<Duration>,
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// Ops endpoint address.
    pub ops_addr: SocketAddr,
    /// `OPS_TOKEN`: what the console's actions need; none means a read-only console.
    pub ops_token: Option<SecretString>,
    /// Container naming.
    pub naming: NamingStrategy,
    /// `EVENT_INCLUDE_TOKEN`.
    pub include_token: bool,
    /// `ROTATION_GRACE`.
    pub rotation_grace: Duration,
    /// `ORPHAN_GRACE`.
    pub orphan_grace: Duration,
}

impl RunArgs {
    /// Parses `run`'s flags from a list (the demo and tests start workers in-process this way;
    /// the first item is the program name). Unset flags still fall back to the environment.
    pub fn try_from_flags<I, T>(flags: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            run: RunArgs,
        }
        <Flags as clap::Parser>::try_parse_from(flags).map(|f| f.run)
    }

    /// Checks everything `run` needs.
    pub fn into_settings(self) -> Result<Settings, ConfigError> {
        let issuer_url = self
            .issuer_url
            .filter(|u| !u.trim().is_empty())
            .ok_or_else(|| {
                ConfigError("ISSUER_URL is required (e.g. https://webtask.example.com)".into())
            })?;
        check_transport(&issuer_url, self.issuer_allow_insecure)?;
        let master = secret_value(
            self.issuer_master_token.as_ref().map(SecretArg::expose),
            self.issuer_master_token_file.as_ref(),
            "ISSUER_MASTER_TOKEN",
        )?
        .ok_or_else(|| {
            ConfigError("ISSUER_MASTER_TOKEN or ISSUER_MASTER_TOKEN_FILE is required".into())
        })?;
        let restrictions = Restrictions::parse(&self.issuer_restrictions).map_err(ConfigError)?;
        let extra_roots = match &self.issuer_ca_file {
            Some(path) => crate::issuer::read_ca_file(path).map_err(ConfigError)?,
            None => Vec::new(),
        };
        let cipher = self.key.cipher()?;
        if crate::broker::nodes(&self.broker.amqp_url).is_empty() {
            return Err(ConfigError("AMQP_URL names no broker".into()));
        }
        crate::broker::tls::check(&self.broker.amqp_url).map_err(|e| ConfigError(e.to_string()))?;
        if self.retry_delays.0.is_empty() {
            return Err(ConfigError("RETRY_DELAYS needs at least one delay".into()));
        }
        Ok(Settings {
            amqp_url: self.broker.amqp_url,
            database_url: self.database.database_url,
            db_pool_size: self.db_pool_size,
            issuer: IssuerSettings {
                url: issuer_url,
                master_token: SecretString::from(master),
                restrictions,
                timeout: self.issuer_timeout,
                retry: RetryPolicy {
                    budget: self.issue_retry_budget,
                    ..RetryPolicy::default()
                },
                concurrency: self.issuer_concurrency as usize,
                extra_roots,
            },
            cipher,
            concurrency: self.concurrency,
            batch_size: self.batch_size,
            max_attempts: self.max_attempts,
            retry_delays: self.retry_delays.0,
            shutdown_grace: self.shutdown_grace,
            ops_addr: self.ops_addr,
            ops_token: secret_value(
                self.ops_token.as_ref().map(SecretArg::expose),
                self.ops_token_file.as_ref(),
                "OPS_TOKEN",
            )?
            .map(SecretString::from),
            naming: self.container_naming,
            include_token: self.event_include_token,
            rotation_grace: self.rotation_grace,
            orphan_grace: self.orphan_grace,
        })
    }
}

/// The master token travels with every issuer call: plain `http` only to loopback, unless
/// explicitly allowed (`ISSUER_ALLOW_INSECURE=true`).
fn check_transport(issuer_url: &str, allow_insecure: bool) -> Result<(), ConfigError> {
    let url = reqwest::Url::parse(issuer_url.trim())
        .map_err(|e| ConfigError(format!("ISSUER_URL is not a URL: {e}")))?;
    let loopback = url.host_str().is_some_and(|h| {
        h.eq_ignore_ascii_case("localhost")
            || h.trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback || allow_insecure => Ok(()),
        "http" => Err(ConfigError(format!(
            "ISSUER_URL {} is plain http to a host that is not loopback: the master token would \
             cross the network in clear text; use https, or set ISSUER_ALLOW_INSECURE=true for a \
             local stub",
            crate::telemetry::redact_url(issuer_url)
        ))),
        other => Err(ConfigError(format!(
            "ISSUER_URL must be https (or http on loopback), not {other}"
        ))),
    }
}

/// A secret given inline or in a file (trimmed); both at once is an error.
fn secret_value(
    inline: Option<&str>,
    file: Option<&PathBuf>,
    name: &str,
) -> Result<Option<String>, ConfigError> {
    match (inline.filter(|s| !s.is_empty()), file) {
        (Some(_), Some(_)) => Err(ConfigError(format!("set {name} or {name}_FILE, not both"))),
        (Some(v), None) => Ok(Some(v.trim().to_owned())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError(format!("{name}_FILE {}: {e}", path.display())))?;
            let text = text.trim().to_owned();
            if text.is_empty() {
                return Err(ConfigError(format!(
                    "{name}_FILE {} is empty",
                    path.display()
                )));
            }
            Ok(Some(text))
        }
        (None, None) => Ok(None),
    }
}

/// Parses `250ms`, `10s`, `5m`, `2h`, `1d`, `1w` (or plain seconds), and sums of them such as
/// `1h30m` (every part of a sum needs a unit).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let unlike = || format!("{s:?} is not a duration like 500ms, 10s, 5m, 2h, 1d or 1h30m");
    let is_number = |c: char| c.is_ascii_digit() || c == '.';
    let mut secs = 0.0;
    let mut rest = s;
    let mut parts = 0;
    while parts == 0 || !rest.is_empty() {
        let (num, tail) = rest.split_at(rest.find(|c| !is_number(c)).unwrap_or(rest.len()));
        let (unit, tail) = tail.split_at(tail.find(is_number).unwrap_or(tail.len()));
        let n: f64 = num.parse().map_err(|_| unlike())?;
        let factor = match unit.trim() {
            "ms" => 0.001,
            "" if parts == 0 && tail.is_empty() => 1.0,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "w" => 7.0 * 86400.0,
            _ => return Err(unlike()),
        };
        secs += n * factor;
        rest = tail;
        parts += 1;
    }
    if !secs.is_finite() || !(0.0..=365.0 * 86400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `RETRY_DELAYS` (for `migrate`, which declares the same retry queues as `run`).
pub fn parse_delays_arg(s: &str) -> Result<Delays, String> {
    parse_delays(s)
}

fn parse_delays(s: &str) -> Result<Delays, String> {
    let delays = s
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .map(parse_duration)
        .collect::<Result<Vec<_>, _>>()?;
    if delays.iter().any(|d| d.is_zero()) {
        return Err("retry delays must be positive".into());
    }
    Ok(Delays(delays))
}

#[cfg(test)]
mod tests {
    use super::check_transport;

    #[test]
    fn plain_http_is_refused_unless_loopback_or_allowed() {
        for ok in [
            "https://webtask.example.com",
            "http://127.0.0.1:9401",
            "http://127.8.0.2",
            "http://localhost:1",
            "http://[::1]:80",
        ] {
            assert!(check_transport(ok, false).is_ok(), "{ok}");
        }
        let refused = check_transport("http://stub-issuer:9401", false).expect_err("refused");
        assert!(refused.0.contains("ISSUER_ALLOW_INSECURE"), "{}", refused.0);
        assert!(check_transport("http://stub-issuer:9401", true).is_ok());
        assert!(check_transport("ftp://127.0.0.1", true).is_err());
    }

    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("400d").is_err());
        assert_eq!(parse_duration("10 s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_delays("1s, 5s").map(|d| d.0.len()), Ok(2));
        assert!(parse_delays("0s").is_err());
    }

    #[test]
    fn durations_may_be_sums() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1d 2h"), Ok(Duration::from_secs(93_600)));
        assert_eq!(parse_duration("1m500ms"), Ok(Duration::from_millis(60_500)));
        // A bare number is seconds only on its own: `1h30` is ambiguous.
        assert!(parse_duration("1h30").is_err());
        assert!(parse_duration("30 1h").is_err());
        assert!(parse_duration("1h-30m").is_err());
    }

    #[test]
    fn debug_output_hides_secrets() {
        let run = RunArgs::try_from_flags([
            "x",
            "--issuer-master-token=master-secret-1",
            "--token-encryption-key=key-secret-2",
            "--token-decryption-keys=key-secret-3",
        ])
        .expect("parses");
        let d = format!("{run:?}");
        for secret in ["master-secret-1", "key-secret-2", "key-secret-3"] {
            assert!(!d.contains(secret), "{secret} leaked into {d}");
        }
    }

    #[test]
    fn secrets_come_from_one_place() {
        assert!(secret_value(Some("a"), Some(&PathBuf::from("/x")), "K").is_err());
        assert_eq!(
            secret_value(Some(" a "), None, "K")
                .ok()
                .flatten()
                .as_deref(),
            Some("a")
        );
        let err = secret_value(None, Some(&PathBuf::from("/nonexistent/k")), "K").err();
        assert!(err.is_some_and(|e| e.to_string().contains("K_FILE")));
    }
}
