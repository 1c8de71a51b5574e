//! The command line as an operator uses it: exit codes, messages, `migrate`, `keygen`, and the
//! ops endpoints of a running worker.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use sqlx::Connection as _;
use support::TestEnv;

fn tenant_tokens(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tenant-tokens"));
    cmd.args(args);
    for var in [
        "ISSUER_URL",
        "ISSUER_MASTER_TOKEN",
        "ISSUER_MASTER_TOKEN_FILE",
        "TOKEN_ENCRYPTION_KEY",
        "TOKEN_ENCRYPTION_KEY_FILE",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tenant-tokens")
}

#[test]
fn run_refuses_a_plain_http_issuer_off_loopback() {
    let key = support::test_key();
    let env = [
        ("ISSUER_URL", "http://issuer.internal:9401"),
        ("ISSUER_MASTER_TOKEN", "super-secret-master"),
        ("TOKEN_ENCRYPTION_KEY", key.as_str()),
    ];
    let out = tenant_tokens(&["run"], &env);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("plain http") && err.contains("ISSUER_ALLOW_INSECURE"),
        "{err}"
    );
    assert!(!err.contains("super-secret-master"));
}

#[test]
fn keygen_prints_a_fresh_32_byte_key() {
    let a = tenant_tokens(&["keygen"], &[]);
    let b = tenant_tokens(&["keygen"], &[]);
    assert!(a.status.success());
    let key = String::from_utf8_lossy(&a.stdout).trim().to_owned();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&key)
        .expect("base64");
    assert_eq!(bytes.len(), 32);
    assert_ne!(a.stdout, b.stdout);
}

#[test]
fn run_refuses_to_start_without_a_key_and_says_how_to_make_one() {
    let out = tenant_tokens(
        &["run"],
        &[
            ("ISSUER_URL", "http://127.0.0.1:1"),
            ("ISSUER_MASTER_TOKEN", "super-secret-master"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("TOKEN_ENCRYPTION_KEY") && err.contains("tenant-tokens keygen"),
        "{err}"
    );
    assert!(!err.contains("super-secret-master"));
}

#[test]
fn run_refuses_bad_configuration_with_exit_2() {
    let key = String::from_utf8_lossy(&tenant_tokens(&["keygen"], &[]).stdout)
        .trim()
        .to_owned();
    let base = [
        ("ISSUER_URL", "http://127.0.0.1:1"),
        ("ISSUER_MASTER_TOKEN", "super-secret-master"),
        ("TOKEN_ENCRYPTION_KEY", key.as_str()),
    ];
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![base[1], base[2]], "ISSUER_URL"),
        (vec![base[0], base[2]], "ISSUER_MASTER_TOKEN"),
        (
            vec![base[0], base[1], ("TOKEN_ENCRYPTION_KEY", "not-a-key")],
            "32 bytes",
        ),
        (
            vec![
                base[0],
                base[1],
                base[2],
                ("ISSUER_RESTRICTIONS", r#"{"ten":"x"}"#),
            ],
            "ten",
        ),
        (
            vec![base[0], base[1], base[2], ("CONCURRENCY", "0")],
            "CONCURRENCY",
        ),
        (
            vec![base[0], base[1], base[2], ("RETRY_DELAYS", "soon")],
            "duration",
        ),
    ];
    for (env, want) in cases {
        let out = tenant_tokens(&["run"], &env);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(!err.contains("super-secret-master"), "{err}");
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(
        tenant_tokens(&["no-such-command"], &[]).status.code(),
        Some(2)
    );
    assert_eq!(
        tenant_tokens(&["token", "show", "bad id!"], &[])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(tenant_tokens(&["--help"], &[]).status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_database_and_declares_the_topology_twice_over() {
    let env = TestEnv::new().await;
    // A database that does not exist yet: migrate creates it.
    let fresh_db = format!("{}_fresh", env.name);
    let db_url = env.database_url.replace(&env.name, &fresh_db);
    let vars = [
        ("AMQP_URL", env.amqp_url.as_str()),
        ("DATABASE_URL", db_url.as_str()),
    ];
    for _ in 0..2 {
        let out = tenant_tokens(&["migrate", "--log-format", "pretty"], &vars);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let conn = env.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let passive = lapin::options::QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for q in [
        "tenant-tokens.requests",
        "tenant-tokens.dead",
        "tenant-tokens.retry.1s",
        "tenant-tokens.retry.10m",
    ] {
        ch.queue_declare(q.into(), passive, Default::default())
            .await
            .unwrap_or_else(|e| panic!("{q} declared: {e}"));
    }
    let mut db = sqlx::PgConnection::connect(&db_url)
        .await
        .expect("db connection");
    let tables = support::public_tables(&mut db).await;
    for t in ["issued_tokens", "revocations", "tenants"] {
        assert!(tables.iter().any(|x| x == t), "{t} in {tables:?}");
    }
    drop(db);
    let mut admin = env.db().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {fresh_db} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await;
    drop(admin);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_report_health_readiness_and_the_contract_metrics() {
    let env = TestEnv::new().await;
    let worker = env.start_worker("http://127.0.0.1:9", &[]).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let addr = tenant_tokens::ops::serve(
        "127.0.0.1:0".parse().expect("addr"),
        worker.health.clone(),
        shutdown.clone(),
    )
    .await
    .expect("ops server");
    tenant_tokens::telemetry::describe_metrics();
    let http = reqwest::Client::new();
    let get = |path: &str| {
        http.get(format!("http://{addr}{path}"))
            .timeout(Duration::from_secs(5))
            .send()
    };

    assert_eq!(get("/healthz").await.expect("healthz").status(), 200);
    let ready = get("/readyz").await.expect("readyz");
    assert_eq!(ready.status(), 200);

    let metrics = get("/metrics")
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for (name, kind) in [
        ("tenant_tokens_deliveries_total", "counter"),
        ("tenant_tokens_outcomes_total", "counter"),
        ("tenant_tokens_issuer_requests_total", "counter"),
        ("tenant_tokens_in_flight", "gauge"),
        ("tenant_tokens_breaker_open", "gauge"),
        ("tenant_tokens_tokens_issued_total", "counter"),
        ("tenant_tokens_issuer_request_duration_seconds", "histogram"),
        ("tenant_tokens_handle_duration_seconds", "histogram"),
        ("tenant_tokens_dead_letters", "gauge"),
        ("tenant_tokens_revocations_total", "counter"),
        ("tenant_tokens_revocations_pending", "gauge"),
    ] {
        assert!(
            metrics.contains(&format!("# TYPE {name} {kind}")),
            "{name} {kind} in\n{metrics}"
        );
    }
    assert!(metrics.contains("outcome=\"provisioned\""));
    for reason in ["rotated", "deleted", "orphan"] {
        assert!(
            metrics.contains(&format!("reason=\"{reason}\"")),
            "{reason}"
        );
    }

    worker.health.breaker.trip("test");
    let not_ready = get("/readyz").await.expect("readyz");
    assert_eq!(not_ready.status(), 503);
    let body: serde_json::Value = not_ready.json().await.expect("json");
    assert!(body["reasons"].to_string().contains("breaker"));
    worker.health.breaker.record_success();

    shutdown.cancel();
    worker.stop().await;
    env.cleanup().await;
}

/// `tenant-tokens` run to completion off the test's threads (it may wait for the worker).
async fn tenant_tokens_async(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        tenant_tokens(&args, &env)
    })
    .await
    .expect("tenant-tokens finished")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rotate_waits_for_the_new_generation_and_token_show_lists_the_old_one() {
    let env = TestEnv::new().await;
    let stub = support::stub_issuer(Duration::ZERO).await;
    let events = support::Collector::ready_events(&env).await;
    let worker = env
        .start_worker(&stub.url(), &["--rotation-grace", "1h"])
        .await;
    let producer = support::Producer::new(&env).await;
    let t = support::tenant("cli-rot");
    producer
        .request("tenant.created", serde_json::json!({"tenant_id": t}), None)
        .await;
    let first = events.wait_for(1, Duration::from_secs(30)).await[0].json();
    let db = [("DATABASE_URL", env.database_url.as_str())];
    let amqp = [("AMQP_URL", env.amqp_url.as_str())];

    let rotated = tenant_tokens_async(
        &["token", "rotate", &t, "--reason", "leak", "--wait"],
        &amqp,
    )
    .await;
    let shown = tenant_tokens_async(&["token", "show", &t, "--json"], &db).await;
    let unknown = tenant_tokens_async(&["token", "rotate", "-bad-"], &amqp).await;

    assert!(
        rotated.status.success(),
        "{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let event: serde_json::Value =
        serde_json::from_slice(&rotated.stdout).expect("the ready event as JSON");
    assert_eq!(event["tenant_id"], t.as_str());
    assert_eq!(event["rotated"], true);
    assert_eq!(event["newly_issued"], true);
    assert_eq!(event["generation"], 2);
    assert_ne!(event["token_fingerprint"], first["token_fingerprint"]);
    assert!(
        shown.status.success(),
        "{}",
        String::from_utf8_lossy(&shown.stderr)
    );
    let show: serde_json::Value = serde_json::from_slice(&shown.stdout).expect("JSON");
    assert_eq!(show["generation"], 2);
    assert_eq!(show["token_fingerprint"], event["token_fingerprint"]);
    let past = &show["past_tokens"][0];
    assert_eq!(past["generation"], 1);
    assert_eq!(past["token_fingerprint"], first["token_fingerprint"]);
    assert_eq!(past["reason"], "rotated");
    assert!(past["revoked_at"].is_null(), "within the grace: {past}");
    assert_eq!(
        unknown.status.code(),
        Some(2),
        "an invalid tenant id is a usage error"
    );

    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}
