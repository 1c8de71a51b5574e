//! Postgres failover (issue 12), the part a test can reproduce: the database goes away
//! mid-load and a different server answers at the same address, holding every committed
//! transaction (as a promoted synchronous replica does). What a managed or Patroni failover
//! looks like to the worker is described in `docs/failover-postgres.md`.
//!
//! Two private Postgres servers (`support::PrivatePg`) stand for the primary and the standby;
//! the worker's `DATABASE_URL` names a TCP proxy (`support::TcpProxy`), the stable address a
//! managed service's DNS name or Patroni's HAProxy gives.

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use sqlx::Connection as _;
use support::{
    Collector, PrivatePg, Producer, TcpProxy, TestEnv, audit, eventually, stub_issuer, tenant,
    tenants_with_events, wait_for_tenants,
};

const WAIT: Duration = Duration::from_secs(60);

/// Sessions the worker holds on `pg` (connected directly, not through the proxy).
async fn worker_sessions(pg: &PrivatePg) -> i64 {
    let mut db = sqlx::PgConnection::connect(&pg.url("127.0.0.1", "postgres"))
        .await
        .expect("direct connection");
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'tenant-tokens'",
    )
    .fetch_one(&mut db)
    .await
    .expect("pg_stat_activity")
}

/// Tenants with a stored token in database `db` of `pg`.
async fn stored_on(pg: &PrivatePg, db: &str) -> i64 {
    let mut conn = sqlx::PgConnection::connect(&pg.url("127.0.0.1", db))
        .await
        .expect("direct connection");
    sqlx::query_scalar("SELECT count(*) FROM tenants WHERE issued_at IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .expect("count stored tokens")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_failover_to_a_new_server_at_the_same_address_is_ridden_out_without_a_restart() {
    let primary = PrivatePg::start("primary", None).await;
    let standby = PrivatePg::start("standby", None).await;
    let proxy = TcpProxy::start(&primary.host_port()).await;
    let mut env = TestEnv::new().await;
    // The worker and the audit go through the stable address, to whichever server is behind it.
    env.database_url = format!("postgres://postgres@{}/{}", proxy.addr, env.name);
    let stub = stub_issuer(Duration::from_millis(50)).await;
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let worker = env
        .start_worker(&stub.url(), &["--concurrency", "16"])
        .await;
    let producer = Producer::new(&env).await;
    let base = tenant("failover");
    let tenants: Vec<String> = (0..600).map(|i| format!("{base}-{i}")).collect();
    let requests = tenants
        .iter()
        .map(|t| {
            let body = json!({"tenant_id": t, "tenant_name": format!("Org {t}")});
            ("tenant.created".to_owned(), body, format!("{t}-m"))
        })
        .collect();
    producer.requests(requests).await;
    events.wait_for(20, WAIT).await;

    // The primary goes away mid-load: every connection is cut, new ones are refused.
    proxy.sever();
    let cut = Instant::now();
    eventually(
        "the primary to hold no session of the worker",
        WAIT,
        || async { worker_sessions(&primary).await == 0 },
    )
    .await;
    // The standby is promoted with every committed transaction, and the address leads to it.
    primary.copy_database_to(&standby, &env.name);
    let on_primary = stored_on(&primary, &env.name).await;
    drop(primary);
    proxy.set_upstream(&standby.host_port());
    proxy.restore();
    let failed_over = cut.elapsed();
    let before = tenants_with_events(&events.all()).len();
    assert!(
        before < tenants.len(),
        "cut mid-load: {before} of {}",
        tenants.len()
    );

    wait_for_tenants(&events, &tenants, WAIT).await;
    let recovered = cut.elapsed();
    let health = worker.health.clone();
    eventually("readiness to come back", WAIT, || {
        let h = health.clone();
        async move { h.not_ready_reasons().is_empty() }
    })
    .await;
    worker.stop().await;

    let a = audit(&env, &events.all(), &tenants).await;
    assert_eq!(
        a.distinct_events,
        tenants.len(),
        "one ready event per tenant"
    );
    let s = stub.stats();
    assert_eq!(
        s.issued,
        tenants.len() as u64,
        "one token minted per tenant: {s:?}"
    );
    assert_eq!(s.issued_per_container_max, 1, "{s:?}");
    assert!(
        dead.all().is_empty(),
        "nothing dead-lettered: {:?}",
        dead.all()
    );
    assert_eq!(env.queue_ready("tenant-tokens.requests").await, 0);
    let on_standby = stored_on(&standby, &env.name).await;
    assert_eq!(
        on_standby,
        tenants.len() as i64,
        "every token is on the new server"
    );
    assert!(
        on_primary < on_standby,
        "the worker went on writing to the new server ({on_primary} were on the old one)"
    );
    eprintln!(
        "failover: {on_primary} tenants stored before the cut, database back after \
         {failed_over:?}, all {} provisioned {recovered:?} after the cut",
        tenants.len()
    );

    drop(proxy);
    stub.shutdown().await;
    env.cleanup().await;
}
