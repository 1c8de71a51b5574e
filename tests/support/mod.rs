//! Test harness: every test gets its own RabbitMQ vhost and its own Postgres database on the
//! real services (`AMQP_URL` / `DATABASE_URL`, else the local defaults, else testcontainers
//! where a Docker engine exists), and spawns the real worker with one helper.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use sqlx::{Connection as _, PgConnection};
use tenant_tokens::broker::topology;
use tenant_tokens::configuration::RunArgs;
use tenant_tokens::health::Health;
use tenant_tokens::worker::Worker;
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
            tenant_tokens::broker::redact(&amqp),
            tenant_tokens::broker::redact(&pg)
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
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            run: RunArgs,
        }
        let key = tenant_tokens::crypto::EncryptionKey::generate_base64();
        let key = TEST_KEY.get_or_init(|| key).clone();
        let mut args: Vec<String> = vec![
            "test".into(),
            "--amqp-url".into(),
            self.amqp_url.clone(),
            "--database-url".into(),
            self.database_url.clone(),
            "--issuer-url".into(),
            issuer_url.into(),
            "--issuer-master-token".into(),
            MASTER_TOKEN.into(),
            "--token-encryption-key".into(),
            key,
            "--ops-addr".into(),
            "127.0.0.1:0".into(),
            "--retry-delays".into(),
            "200ms,400ms".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        W::try_parse_from(args).expect("valid test flags").run
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
