//! Test harness: every test gets its own RabbitMQ vhost and its own Postgres database on the
//! real services (`AMQP_URL` / `DATABASE_URL`, else the local defaults, else testcontainers
//! where a Docker engine exists), and spawns the real worker with one helper.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use sqlx::{Connection as _, PgConnection};
use tenant_tokens::broker::topology;
use tenant_tokens::configuration::RunArgs;
use tenant_tokens::ops::health::Health;
use tenant_tokens::pipeline::worker::Worker;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// Base URLs of the services (no vhost / database chosen yet).
struct Services {
    amqp_base: String,
    management: String,
    pg_base: String,
    _containers: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();

async fn services() -> &'static Services {
    SERVICES.get_or_init(discover).await
}

fn strip_path(url: &str) -> String {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => url[..after + i].to_owned(),
        None => url.to_owned(),
    }
}

async fn reachable(host_port: &str) -> bool {
    tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(host_port),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

fn host_port(url: &str, default_port: u16) -> String {
    let base = strip_path(url);
    let hp = base.rsplit('@').next().unwrap_or(&base);
    let hp = hp.rsplit("://").next().unwrap_or(hp);
    if hp.contains(':') {
        hp.to_owned()
    } else {
        format!("{hp}:{default_port}")
    }
}

async fn discover() -> Services {
    let amqp = std::env::var("AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let pg = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let amqp_up = reachable(&host_port(&amqp, 5672)).await;
    let pg_up = reachable(&host_port(&pg, 5432)).await;
    if amqp_up && pg_up {
        let host = host_port(&amqp, 5672);
        let host = host.split(':').next().unwrap_or("127.0.0.1").to_owned();
        return Services {
            amqp_base: strip_path(&amqp),
            management: std::env::var("RABBITMQ_MANAGEMENT_URL")
                .unwrap_or_else(|_| format!("http://{host}:15672")),
            pg_base: strip_path(&pg),
            _containers: Vec::new(),
        };
    }
    containers().await.unwrap_or_else(|e| {
        panic!(
            "tests need RabbitMQ and PostgreSQL: none reachable at AMQP_URL/DATABASE_URL \
             ({amqp_up}/{pg_up} for {} and {}) and no Docker engine for testcontainers ({e}). \
             Start them (see README) or set AMQP_URL and DATABASE_URL.",
            tenant_tokens::telemetry::redact_url(&amqp),
            tenant_tokens::telemetry::redact_url(&pg)
        )
    })
}

async fn containers() -> anyhow::Result<Services> {
    use testcontainers::runners::AsyncRunner as _;
    let rabbit = testcontainers_modules::rabbitmq::RabbitMq::default()
        .start()
        .await?;
    let postgres = testcontainers_modules::postgres::Postgres::default()
        .start()
        .await?;
    let rh = rabbit.get_host().await?;
    let amqp_port = rabbit.get_host_port_ipv4(5672).await?;
    let mgmt_port = rabbit.get_host_port_ipv4(15672).await?;
    let pg_port = postgres.get_host_port_ipv4(5432).await?;
    let ph = postgres.get_host().await?;
    Ok(Services {
        amqp_base: format!("amqp://guest:guest@{rh}:{amqp_port}"),
        management: format!("http://{rh}:{mgmt_port}"),
        pg_base: format!("postgres://postgres:postgres@{ph}:{pg_port}"),
        _containers: vec![Box::new(rabbit), Box::new(postgres)],
    })
}

/// One test's isolated vhost and database.
pub struct TestEnv {
    pub name: String,
    pub amqp_url: String,
    pub database_url: String,
    admin_url: String,
    management: String,
}

impl TestEnv {
    /// Creates a fresh vhost and database.
    pub async fn new() -> Self {
        let s = services().await;
        let name = format!(
            "tt_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        create_vhost(&s.management, &name).await;
        let admin_url = format!("{}/postgres", s.pg_base);
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("postgres admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        Self {
            amqp_url: format!("{}/{name}", s.amqp_base),
            database_url: format!("{}/{name}", s.pg_base),
            admin_url,
            management: s.management.clone(),
            name,
        }
    }

    /// Drops the vhost and the database (call at the end of a passing test).
    pub async fn cleanup(self) {
        delete_vhost(&self.management, &self.name).await;
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }

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

    /// A broker connection in this vhost.
    pub async fn connect(&self) -> Connection {
        tenant_tokens::broker::connect(&self.amqp_url, "test")
            .await
            .expect("broker connection")
    }

    /// A database connection.
    pub async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database_url)
            .await
            .expect("db connection")
    }
}

static TEST_KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The encryption key of this test process (the same for in-process and child workers).
pub fn test_key() -> String {
    TEST_KEY
        .get_or_init(tenant_tokens::crypto::EncryptionKey::generate_base64)
        .clone()
}

/// The master token every test issuer expects.
pub const MASTER_TOKEN: &str = "test-master-token-0123456789";

async fn create_vhost(management: &str, name: &str) {
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{management}/api/vhosts/{name}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    if put.is_ok_and(|r| r.status().is_success()) {
        let perm = http
            .put(format!("{management}/api/permissions/{name}/guest"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await
            .expect("set vhost permissions");
        assert!(
            perm.status().is_success(),
            "set permissions: {}",
            perm.status()
        );
        return;
    }
    // No management API: the local CLI.
    let ok = std::process::Command::new("rabbitmqctl")
        .args(["add_vhost", name])
        .output()
        .is_ok_and(|o| o.status.success())
        && std::process::Command::new("rabbitmqctl")
            .args(["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "cannot create vhost {name}: enable rabbitmq_management or install rabbitmqctl"
    );
}

async fn delete_vhost(management: &str, name: &str) {
    let deleted = reqwest::Client::new()
        .delete(format!("{management}/api/vhosts/{name}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    if !deleted {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", name])
            .output();
    }
}

/// A worker running in this process.
pub struct WorkerHandle {
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
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

/// A confirm-mode publisher for test messages.
pub struct Producer {
    _conn: Connection,
    ch: Channel,
}

impl Producer {
    pub async fn new(env: &TestEnv) -> Self {
        let conn = env.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        topology::declare(&ch, &[]).await.expect("topology");
        Self { _conn: conn, ch }
    }

    /// Publishes to `tenant.events` and waits for the confirm.
    pub async fn publish(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        let props = props.with_delivery_mode(2);
        let confirm = self
            .ch
            .basic_publish(
                topology::EVENTS_EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "publish confirmed");
    }

    /// Publishes a JSON body with a message id.
    pub async fn request(
        &self,
        routing_key: &str,
        body: serde_json::Value,
        message_id: Option<&str>,
    ) {
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publish(routing_key, body.to_string().as_bytes(), props)
            .await;
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    pub fn header(&self, name: &str) -> Option<String> {
        tenant_tokens::broker::message::header_str(&self.properties, name).map(str::to_owned)
    }

    pub fn header_u32(&self, name: &str) -> Option<u32> {
        tenant_tokens::broker::message::header_u32(&self.properties, name)
    }
}

/// Collects messages from a queue (a fresh exclusive one bound to `tenant.token.ready`, or
/// the dead-letter queue) in the background.
pub struct Collector {
    _conn: Connection,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    /// Ready events, bound before anything is published.
    pub async fn ready_events(env: &TestEnv) -> Self {
        let conn = env.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        topology::declare(&ch, &[]).await.expect("topology");
        let queue = topology::declare_ready_listener(&ch)
            .await
            .expect("collector queue");
        Self::consume(conn, ch, queue.as_str()).await
    }

    /// Dead letters (consumed and acked: the test owns its vhost).
    pub async fn dead_letters(env: &TestEnv) -> Self {
        let conn = env.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        topology::declare(&ch, &[]).await.expect("topology");
        Self::consume(conn, ch, topology::DEAD_LETTER_QUEUE).await
    }

    async fn consume(conn: Connection, ch: Channel, queue: &str) -> Self {
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let r = Received {
                    routing_key: d.routing_key.to_string(),
                    properties: d.properties.clone(),
                    body: d.data.clone(),
                };
                sink.lock().expect("lock").push(r);
            }
        });
        Self { _conn: conn, seen }
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Received> {
        self.seen.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds for what was received, or panics at the deadline.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.all();
            if pred(&all) {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; have {} messages",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for at least `n` messages.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(&format!("{n} messages"), timeout, |all| all.len() >= n)
            .await
    }

    /// Ready events by tenant id.
    pub fn by_tenant(&self) -> HashMap<String, Vec<serde_json::Value>> {
        let mut m: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        for r in self.all() {
            let v = r.json();
            let t = v["tenant_id"].as_str().unwrap_or_default().to_owned();
            m.entry(t).or_default().push(v);
        }
        m
    }
}

/// Polls `check` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A unique tenant id for this test run.
pub fn tenant(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A JWT-shaped token like the issuer's, with a `jti`.
pub fn fake_jwt(ten: &str, jti: &str) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        e.encode(serde_json::json!({"ten": ten, "jti": jti}).to_string()),
        e.encode(b"signature")
    )
}

// ---------------------------------------------------------------------------
// Fault injection: broker connections, queues, child processes, a severable TCP
// proxy, and the invariants every recovery test checks.

impl TestEnv {
    /// Connections of this test's vhost, as the management API lists them:
    /// `(connection name, client-given connection_name)`.
    pub async fn connections(&self) -> Vec<(String, String)> {
        let resp = reqwest::Client::new()
            .get(format!(
                "{}/api/vhosts/{}/connections",
                self.management, self.name
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API: list connections");
        assert!(
            resp.status().is_success(),
            "list connections: {}",
            resp.status()
        );
        let list: Vec<serde_json::Value> = resp.json().await.expect("connections JSON");
        list.iter()
            .filter_map(|c| {
                let name = c["name"].as_str()?.to_owned();
                let client = c["client_properties"]["connection_name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                Some((name, client))
            })
            .collect()
    }

    /// Force-closes, through the management API, every connection of this test's vhost
    /// whose client-given name is `client_name` (e.g. `tenant-tokens worker`); returns how
    /// many were closed. Never touches another vhost. (The API lists a connection only
    /// after its first statistics, up to 5 s after it opened.)
    pub async fn close_connections(&self, client_name: &str) -> usize {
        let mut closed = 0;
        for (name, client) in self.connections().await {
            if client == client_name && self.close_connection(&name).await {
                closed += 1;
            }
        }
        closed
    }

    /// Force-closes one connection by its management API name; whether it was closed.
    pub async fn close_connection(&self, name: &str) -> bool {
        let mut url = reqwest::Url::parse(&self.management).expect("management URL");
        url.path_segments_mut()
            .expect("management base URL")
            .pop_if_empty()
            .extend(["api", "connections", name]);
        let resp = reqwest::Client::new()
            .delete(url)
            .basic_auth("guest", Some("guest"))
            .header("X-Reason", "fault injection by a test")
            .send()
            .await
            .expect("management API: close connection");
        resp.status().is_success()
    }

    /// Messages ready (not counting unacked ones) in a queue of this vhost.
    pub async fn queue_ready(&self, queue: &str) -> u32 {
        let conn = self.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
        let _ = conn.close(200, "done".into()).await;
        q.message_count()
    }

    /// Stored tokens: tenant id → token fingerprint (tenants that have one).
    pub async fn stored_tokens(&self) -> HashMap<String, String> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT tenant_id, token_fingerprint FROM tenants WHERE issued_at IS NOT NULL",
        )
        .fetch_all(&mut self.db().await)
        .await
        .expect("stored tokens");
        rows.into_iter().collect()
    }

    /// `host:port` of the Postgres server.
    pub fn database_host_port(&self) -> String {
        host_port(&self.database_url, 5432)
    }

    /// This test's database URL with the server replaced by `addr` (e.g. a [`TcpProxy`]).
    pub fn database_url_via(&self, addr: std::net::SocketAddr) -> String {
        let url = &self.database_url;
        let after = url.find("://").map_or(0, |i| i + 3);
        let path = url[after..].find('/').map_or(url.len(), |i| after + i);
        let host_start = url[after..path].rfind('@').map_or(after, |i| after + i + 1);
        format!("{}{addr}{}", &url[..host_start], &url[path..])
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

/// A local address nobody listens on right now (for a child's `OPS_ADDR`).
pub fn free_local_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
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

/// A TCP proxy on 127.0.0.1 that a test can sever (drop every live connection and refuse
/// new ones) and restore, to cut a process off from a server without touching the server.
pub struct TcpProxy {
    /// Where to connect instead of the server.
    pub addr: std::net::SocketAddr,
    inner: Arc<ProxyInner>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyInner {
    /// Guarded together with the live connections, so that no connection slips past a cut.
    state: Mutex<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    severed: bool,
    live: Vec<tokio::task::AbortHandle>,
    accepted: u64,
}

impl TcpProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let inner = Arc::new(ProxyInner::default());
        let shared = inner.clone();
        let upstream = upstream.to_owned();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut state = shared.state.lock().expect("proxy state");
                if state.severed {
                    drop(client);
                    continue;
                }
                state.accepted += 1;
                state.live.retain(|h| !h.is_finished());
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                state.live.push(task.abort_handle());
            }
        });
        Self {
            addr,
            inner,
            accept,
        }
    }

    /// Drops every live connection and refuses new ones (accepted, then closed at once).
    pub fn sever(&self) {
        let mut state = self.inner.state.lock().expect("proxy state");
        state.severed = true;
        for h in state.live.drain(..) {
            h.abort();
        }
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.inner.state.lock().expect("proxy state").severed = false;
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.inner.state.lock().expect("proxy state").accepted
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}

impl Producer {
    /// Publishes many `(routing key, JSON body, message id)` requests, confirms awaited
    /// together per chunk (much faster than one round trip each).
    pub async fn requests(&self, items: Vec<(String, serde_json::Value, String)>) {
        for chunk in items.chunks(256) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (key, body, id) in chunk {
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(id.as_str().into());
                let confirm = self
                    .ch
                    .basic_publish(
                        topology::EVENTS_EXCHANGE.into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        props,
                    )
                    .await
                    .expect("publish");
                confirms.push(confirm);
            }
            for c in confirms {
                assert!(c.await.expect("confirm").is_ack(), "publish confirmed");
            }
        }
    }
}

/// A stub issuer on a free local port that accepts [`MASTER_TOKEN`].
pub async fn stub_issuer(latency: Duration) -> tenant_tokens::tools::stub_issuer::StubIssuer {
    let mut cfg = tenant_tokens::tools::stub_issuer::StubConfig::new(secrecy::SecretString::from(
        MASTER_TOKEN.to_owned(),
    ));
    cfg.latency = latency;
    tenant_tokens::tools::stub_issuer::StubIssuer::start(
        "127.0.0.1:0".parse().expect("address"),
        cfg,
    )
    .await
    .expect("stub issuer")
}

/// Issue requests the stub has received but not answered yet (it counts a request on
/// arrival and its outcome after the latency).
pub fn stub_in_flight(s: &tenant_tokens::tools::stub_issuer::StubStats) -> u64 {
    s.requests
        .saturating_sub(s.issued + s.replayed + s.failed + s.unauthorized)
}

/// Tenant ids that have at least one ready event among `events`.
pub fn tenants_with_events(events: &[Received]) -> std::collections::HashSet<String> {
    events
        .iter()
        .filter_map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()?
                .get("tenant_id")?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Waits until every tenant in `tenants` has a ready event.
pub async fn wait_for_tenants(events: &Collector, tenants: &[String], timeout: Duration) {
    let want: std::collections::HashSet<&str> = tenants.iter().map(String::as_str).collect();
    events
        .wait_until(
            &format!("a ready event for each of {} tenants", tenants.len()),
            timeout,
            |all| {
                let have = tenants_with_events(all);
                want.iter().all(|t| have.contains(*t))
            },
        )
        .await;
}

/// What [`audit`] found.
#[derive(Debug)]
pub struct Audit {
    /// Ready events received.
    pub events: usize,
    /// Distinct event ids among them.
    pub distinct_events: usize,
}

/// Checks the recoverability promises for `tenants` against the ready events received and
/// the database, and panics with the evidence when one is broken:
/// every tenant has exactly one stored token; at least one ready event, each carrying that
/// token's fingerprint; exactly one distinct event id with `newly_issued: true`; and every
/// copy of an event (same event id) is identical, `newly_issued` included.
pub async fn audit(env: &TestEnv, events: &[Received], tenants: &[String]) -> Audit {
    let stored = env.stored_tokens().await;
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    let mut by_tenant: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for r in events {
        let v = r.json();
        let id = v["event_id"].as_str().expect("event_id").to_owned();
        if let Some(prev) = by_id.get(&id) {
            assert_eq!(prev, &v, "every copy of event {id} is the same event");
        } else {
            by_id.insert(id, v.clone());
        }
        let t = v["tenant_id"].as_str().unwrap_or_default().to_owned();
        by_tenant.entry(t).or_default().push(v);
    }
    for t in tenants {
        let fp = stored
            .get(t)
            .unwrap_or_else(|| panic!("tenant {t} has no stored token"));
        let evs = by_tenant
            .get(t)
            .unwrap_or_else(|| panic!("tenant {t} has no ready event"));
        for e in evs {
            assert_eq!(
                e["token_fingerprint"].as_str(),
                Some(fp.as_str()),
                "tenant {t}: event {e} carries the stored token's fingerprint"
            );
        }
        let newly: std::collections::HashSet<&str> = evs
            .iter()
            .filter(|e| e["newly_issued"] == true)
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        assert_eq!(
            newly.len(),
            1,
            "tenant {t}: exactly one request reports newly_issued, got {newly:?}"
        );
    }
    Audit {
        events: events.len(),
        distinct_events: by_id.len(),
    }
}
