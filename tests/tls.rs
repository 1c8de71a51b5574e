//! Transport security (issue 9): the worker's three connections over TLS with certificate
//! authorities made in the test (`support::TestCa`), each against a real TLS server of its
//! own — the stub issuer over https, a private Postgres with `ssl = on`, a private RabbitMQ
//! node with a TLS listener — and each refused when the certificate does not check out.

mod support;

use std::time::Duration;

use serde_json::json;
use sqlx::Connection as _;
use support::{
    Collector, MASTER_TOKEN, PrivatePg, Producer, RabbitNode, TestCa, TestEnv, stub_issuer, tenant,
    worker_binary,
};
use tenant_tokens::tools::stub_issuer::{StubConfig, StubIssuer, StubTls};

const WAIT: Duration = Duration::from_secs(30);

/// The stub issuer over https with a certificate for `localhost` and 127.0.0.1 from `ca`.
async fn https_stub(ca: &TestCa) -> StubIssuer {
    let files = ca.server("issuer", &["localhost", "127.0.0.1"]);
    let tls = StubTls::from_pem_files(&files.cert, &files.key).expect("stub TLS");
    let config = StubConfig::new(secrecy::SecretString::from(MASTER_TOKEN.to_owned()));
    let stub = StubIssuer::start_tls("127.0.0.1:0".parse().expect("address"), config, &tls)
        .await
        .expect("https stub issuer");
    assert!(stub.url().starts_with("https://"), "{}", stub.url());
    stub
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_issuer_behind_a_private_ca_is_trusted_with_issuer_ca_file() {
    let ca = TestCa::new("issuer");
    let stub = https_stub(&ca).await;
    let env = TestEnv::new().await;
    let events = Collector::ready_events(&env).await;
    let ca_file = ca.ca_file().to_string_lossy().into_owned();
    let worker = env
        .start_worker(&stub.url(), &["--issuer-ca-file", &ca_file])
        .await;
    let t = tenant("https");
    Producer::new(&env)
        .await
        .request("tenant.created", json!({"tenant_id": t}), Some("https-1"))
        .await;

    let event = events.wait_for(1, WAIT).await[0].json();
    assert_eq!(event["tenant_id"], t.as_str());
    assert_eq!(event["newly_issued"], true);
    assert_eq!(stub.stats().issued, 1, "the token came over https");
    assert!(env.stored_tokens().await.contains_key(&t));

    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_certificate_from_an_unknown_ca_is_refused_with_a_tls_error() {
    let ca = TestCa::new("unknown");
    let stub = https_stub(&ca).await;
    let env = TestEnv::new().await;
    let dead = Collector::dead_letters(&env).await;
    // No ISSUER_CA_FILE: the system's roots do not know the test's CA.
    let worker = env
        .start_worker(
            &stub.url(),
            &["--max-attempts", "1", "--issue-retry-budget", "100ms"],
        )
        .await;
    let t = tenant("untrusted");
    Producer::new(&env)
        .await
        .request(
            "tenant.created",
            json!({"tenant_id": t}),
            Some("untrusted-1"),
        )
        .await;

    let letter = dead.wait_for(1, WAIT).await.remove(0);
    let error = letter.header("x-tt-error").unwrap_or_default();
    assert!(
        error.contains("certificate") && error.contains("UnknownIssuer"),
        "the dead letter says why: {error}"
    );
    assert_eq!(
        stub.stats().requests,
        0,
        "no request crossed an unverified connection"
    );
    assert!(!env.stored_tokens().await.contains_key(&t));

    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_stub_issuer_command_serves_https_with_tls_cert_and_tls_key() {
    use std::io::BufRead as _;
    let ca = TestCa::new("stub-cli");
    let files = ca.server("stub", &["localhost", "127.0.0.1"]);
    let mut child = std::process::Command::new(worker_binary())
        .args([
            "stub-issuer",
            "--listen",
            "127.0.0.1:0",
            "--master-token",
            "m",
        ])
        .arg("--tls-cert")
        .arg(&files.cert)
        .arg("--tls-key")
        .arg(&files.key)
        .env_clear()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start stub-issuer");
    let mut url = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut url)
        .expect("the stub prints its URL");
    let url = url.trim().to_owned();
    let ca_pem = std::fs::read(ca.ca_file()).expect("CA file");
    let trusting = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&ca_pem).expect("CA"))
        .build()
        .expect("client");
    let stats = trusting.get(format!("{url}/stub/stats")).send().await;
    let plain = reqwest::get(format!("{url}/stub/stats")).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    assert!(
        stats.is_ok_and(|r| r.status().is_success()),
        "https with our CA"
    );
    assert!(plain.is_err(), "a client without our CA is refused");
}

#[tokio::test]
async fn an_issuer_ca_file_without_a_certificate_stops_start_up() {
    let ca = TestCa::new("bad-file");
    let env_args = |file: &str| {
        tenant_tokens::configuration::RunArgs::try_from_flags([
            "test",
            "--issuer-url",
            "https://issuer.example",
            "--issuer-master-token",
            MASTER_TOKEN,
            "--token-encryption-key",
            &support::test_key(),
            "--issuer-ca-file",
            file,
        ])
        .expect("flags parse")
    };
    // A key is PEM, but not a certificate.
    let key = ca.server("not-a-ca", &["localhost"]).key;
    for file in [key, ca.dir().join("missing.pem")] {
        let err = env_args(&file.to_string_lossy())
            .into_settings()
            .expect_err("refused at start-up");
        assert!(
            err.to_string().contains("ISSUER_CA_FILE"),
            "the error names the setting: {err}"
        );
    }
    assert!(
        env_args(&ca.ca_file().to_string_lossy())
            .into_settings()
            .is_ok()
    );
}

/// A private Postgres that accepts TCP connections only over TLS, with a certificate for
/// `localhost` (and no other name) from `ca`.
async fn tls_postgres(ca: &TestCa) -> PrivatePg {
    let files = ca.server("postgres", &["localhost"]);
    PrivatePg::start("tls", Some(&files)).await
}

/// `DATABASE_URL` of database `db` on `pg` through `host`, verify-full against `ca_file`.
fn verify_full(pg: &PrivatePg, host: &str, db: &str, ca_file: &std::path::Path) -> String {
    format!(
        "{}?sslmode=verify-full&sslrootcert={}",
        pg.url(host, db),
        ca_file.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_stores_tokens_over_verify_full_tls_to_postgres() {
    let ca = TestCa::new("pg");
    let pg = tls_postgres(&ca).await;
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let events = Collector::ready_events(&env).await;
    // The database does not exist yet: the worker creates it, over TLS too.
    let db_url = verify_full(&pg, "localhost", &env.name, ca.ca_file());
    let worker = env
        .start_worker(&stub.url(), &["--database-url", &db_url])
        .await;
    let t = tenant("pgtls");
    Producer::new(&env)
        .await
        .request("tenant.created", json!({"tenant_id": t}), Some("pgtls-1"))
        .await;
    events.wait_for(1, WAIT).await;

    let mut db = sqlx::PgConnection::connect(&db_url)
        .await
        .expect("verify-full connection");
    let (stored,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM tenants WHERE tenant_id = $1 AND issued_at IS NOT NULL",
    )
    .bind(&t)
    .fetch_one(&mut db)
    .await
    .expect("stored token");
    assert_eq!(stored, 1, "the token is stored on the TLS server");
    let (worker_tls, worker_plain): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
           FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
          WHERE a.application_name = 'tenant-tokens'",
    )
    .fetch_one(&mut db)
    .await
    .expect("pg_stat_ssl");
    assert!(worker_tls >= 1, "the worker's sessions are encrypted");
    assert_eq!(worker_plain, 0, "and none is in clear text");
    let plain = format!("{}?sslmode=disable", pg.url("127.0.0.1", &env.name));
    assert!(
        sqlx::PgConnection::connect(&plain).await.is_err(),
        "this server refuses clear text, so TLS is what carried the worker"
    );

    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test]
async fn verify_full_refuses_a_postgres_certificate_from_another_ca_or_for_another_name() {
    let ca = TestCa::new("pg-right");
    let other = TestCa::new("pg-other");
    let pg = tls_postgres(&ca).await;
    let connect = |url: String| async move {
        tenant_tokens::configuration::connect_store(&url)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };

    let wrong_ca = connect(verify_full(&pg, "localhost", "postgres", other.ca_file()))
        .await
        .expect_err("a certificate from another CA is refused");
    assert!(wrong_ca.contains("UnknownIssuer"), "{wrong_ca}");
    // 127.0.0.1 reaches the same server, but the certificate names only localhost.
    let wrong_name = connect(verify_full(&pg, "127.0.0.1", "postgres", ca.ca_file()))
        .await
        .expect_err("a certificate for another name is refused");
    assert!(wrong_name.contains("not valid for name"), "{wrong_name}");
    assert!(
        wrong_name.contains("sslmode=verify-full"),
        "the error names the database URL (without a password): {wrong_name}"
    );
    connect(verify_full(&pg, "localhost", "postgres", ca.ca_file()))
        .await
        .expect("the right CA and name are accepted");
}

/// A private RabbitMQ node with a TLS listener on a port of its own that wants a client
/// certificate from `ca` (`verify_peer`, `fail_if_no_peer_cert`); the node and that port.
async fn tls_rabbit(ca: &TestCa) -> (RabbitNode, u16) {
    let server = ca.server("rabbit", &["localhost", "127.0.0.1"]);
    let port = support::free_local_addr().port();
    let node = RabbitNode::builder()
        .conf(format!("listeners.ssl.default = 127.0.0.1:{port}"))
        .conf(format!(
            "ssl_options.cacertfile = {}",
            ca.ca_file().display()
        ))
        .conf(format!("ssl_options.certfile = {}", server.cert.display()))
        .conf(format!("ssl_options.keyfile = {}", server.key.display()))
        .conf("ssl_options.verify = verify_peer")
        .conf("ssl_options.fail_if_no_peer_cert = true")
        .start()
        .await;
    (node, port)
}

/// An `amqps://` URL of the node's TLS listener with `query` (the TLS parameters).
fn amqps(port: u16, query: &str) -> String {
    format!("amqps://guest:guest@localhost:{port}/%2f?{query}")
}

/// `cacertfile`, `certfile` and `keyfile` of `ca` and its client certificate `client`.
fn full_query(ca: &TestCa, client: &support::CertFiles) -> String {
    format!(
        "cacertfile={}&certfile={}&keyfile={}",
        ca.ca_file().display(),
        client.cert.display(),
        client.key.display()
    )
}

/// Runs the `tenant-tokens` binary with `args` and `env`; its exit code and output.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(worker_binary())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tenant-tokens");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_the_commands_speak_amqps_with_a_private_ca_and_a_client_certificate() {
    let ca = TestCa::new("rabbit");
    let client = ca.client("tenant-tokens-worker");
    let (node, port) = tls_rabbit(&ca).await;
    let mut env = TestEnv::new().await;
    // Everything of this test — producer, collector, worker, commands — goes to the node's
    // TLS listener.
    env.amqp_url = amqps(port, &full_query(&ca, &client));
    let db = env.database_url.clone();
    let (code, out) = run_binary(
        &["migrate"],
        &[("AMQP_URL", &env.amqp_url), ("DATABASE_URL", &db)],
    );
    assert_eq!(code, Some(0), "migrate over amqps: {out}");

    let stub = stub_issuer(Duration::ZERO).await;
    let events = Collector::ready_events(&env).await;
    let worker = env.start_worker(&stub.url(), &[]).await;
    let t = tenant("amqps");
    Producer::new(&env)
        .await
        .request("tenant.created", json!({"tenant_id": t}), Some("amqps-1"))
        .await;
    assert_eq!(
        events.wait_for(1, WAIT).await[0].json()["tenant_id"],
        t.as_str()
    );

    // The broker's side: every connection is TLS and presented the client certificate.
    let connections = node
        .ctl_json(&["list_connections", "ssl", "peer_cert_subject"])
        .await;
    let connections = connections.as_array().expect("a list of connections");
    // The worker's and the test's own (producer and collector).
    assert!(connections.len() >= 2, "{connections:?}");
    for c in connections {
        assert_eq!(c["ssl"], true, "{c}");
        let subject = c["peer_cert_subject"].as_str().unwrap_or_default();
        assert!(subject.contains("CN=tenant-tokens-worker"), "{c}");
    }
    let (code, out) = run_binary(&["dlq", "list"], &[("AMQP_URL", &env.amqp_url)]);
    assert_eq!(code, Some(0), "dlq over amqps: {out}");

    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_refuses_an_unknown_server_ca_and_the_broker_refuses_a_missing_client_certificate() {
    let ca = TestCa::new("rabbit-refusals");
    let client = ca.client("tenant-tokens-worker");
    let (_node, port) = tls_rabbit(&ca).await;
    let connect = |url: String| async move {
        tenant_tokens::broker::connect(&url, "test")
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    };

    let other = TestCa::new("rabbit-other");
    // Our client certificate, but another CA's idea of who the server is.
    let unknown = connect(amqps(port, &full_query(&other, &client)))
        .await
        .expect_err("a server certificate from a CA we do not trust is refused");
    assert!(unknown.contains("UnknownIssuer"), "{unknown}");
    let anonymous = format!("cacertfile={}", ca.ca_file().display());
    connect(amqps(port, &anonymous))
        .await
        .expect_err("a broker that wants a client certificate refuses a client without one");
    connect(amqps(port, &full_query(&ca, &client)))
        .await
        .expect("the right CA and a client certificate are accepted");
}

#[tokio::test]
async fn unusable_amqp_tls_settings_stop_run_with_exit_code_2() {
    let ca = TestCa::new("rabbit-config");
    let base = [
        ("ISSUER_URL", "http://127.0.0.1:1"),
        ("ISSUER_MASTER_TOKEN", MASTER_TOKEN),
    ];
    let key = support::test_key();
    let missing = ca.dir().join("missing.pem");
    for (url, why) in [
        (
            amqps(1, &format!("cacertfile={}", missing.display())),
            "missing.pem",
        ),
        (
            format!(
                "amqp://guest:guest@127.0.0.1:1/%2f?cacertfile={}",
                ca.ca_file().display()
            ),
            "amqps://",
        ),
        (
            amqps(1, &format!("keyfile={}", ca.ca_file().display())),
            "go together",
        ),
    ] {
        let mut env = base.to_vec();
        env.push(("TOKEN_ENCRYPTION_KEY", key.as_str()));
        env.push(("AMQP_URL", url.as_str()));
        let (code, out) = run_binary(&["run"], &env);
        assert_eq!(code, Some(2), "{url}: {out}");
        assert!(out.contains(why), "{url}: says {why}: {out}");
        assert!(!out.contains("guest:guest"), "no password in: {out}");
    }
}
