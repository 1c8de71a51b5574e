//! Where the services live: `AMQP_URL` / `DATABASE_URL` (else the local defaults) when both
//! answer, else a RabbitMQ and a Postgres started with testcontainers where a Docker engine
//! exists. Found once per test process and shared by every [`super::TestEnv`].

use std::time::Duration;

use tokio::sync::OnceCell;

/// Base URLs of the services (no vhost / database chosen yet).
pub(super) struct Services {
    /// `amqp://user:pass@host:port`.
    pub(super) amqp_base: String,
    /// The RabbitMQ management API, `http://host:port`.
    pub(super) management: String,
    /// `postgres://user@host:port`.
    pub(super) pg_base: String,
    _containers: Vec<Box<dyn std::any::Any + Send + Sync>>,
}

static SERVICES: OnceCell<Services> = OnceCell::const_new();

/// The services of this test process, found at first use.
pub(super) async fn services() -> &'static Services {
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

/// `host:port` of a service URL, with `default_port` when the URL names none.
pub(super) fn host_port(url: &str, default_port: u16) -> String {
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
