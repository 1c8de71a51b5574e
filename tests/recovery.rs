//! Recoverability (issue 3): nothing lost, nothing issued twice, under every fault — on the
//! real RabbitMQ and Postgres, with the stub issuer (or wiremock) injecting issuer faults,
//! the management API closing broker connections, a TCP proxy cutting Postgres, and child
//! processes killed with SIGKILL and SIGTERM.
//!
//! Every test owns its vhost and database, waits on conditions (never on a sleep; a sleep
//! only holds a fault open), and checks the promises with [`support::audit`].

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use serde_json::json;
use support::{
    Collector, Producer, TcpProxy, TestEnv, audit, eventually, stub_in_flight, stub_issuer, tenant,
    tenants_with_events, wait_for_tenants,
};
use tenant_tokens::tools::stub_issuer::StubMode;
use wiremock::matchers::{method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

const WAIT: Duration = Duration::from_secs(30);

/// `n` fresh tenants.
fn tenants(prefix: &str, n: usize) -> Vec<String> {
    let base = tenant(prefix);
    (0..n).map(|i| format!("{base}-{i}")).collect()
}

/// One `tenant.created` request per tenant, message id `<tenant>-m`.
fn created(tenants: &[String]) -> Vec<(String, serde_json::Value, String)> {
    tenants
        .iter()
        .map(|t| {
            (
                "tenant.created".to_owned(),
                json!({"tenant_id": t, "tenant_name": format!("Org {t}")}),
                format!("{t}-m"),
            )
        })
        .collect()
}

fn message_id(r: &support::Received) -> Option<String> {
    r.properties.message_id().as_ref().map(|m| m.to_string())
}

/// The queues RabbitMQ's `x-death` header says the message was dead-lettered from.
fn death_queues(r: &support::Received) -> Vec<String> {
    let Some(AMQPValue::FieldArray(deaths)) = r
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(&ShortString::from("x-death")))
    else {
        return Vec::new();
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => match t.inner().get(&ShortString::from("queue")) {
                Some(AMQPValue::LongString(q)) => {
                    Some(String::from_utf8_lossy(q.as_bytes()).into_owned())
                }
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_issuer_failures_are_ridden_out() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    stub.set_mode(StubMode::FailNext { n: 3, status: 503 });
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let worker = env.start_worker(&stub.url(), &[]).await;
    let producer = Producer::new(&env).await;
    let t = tenant("flaky");

    producer
        .request("tenant.created", json!({"tenant_id": t}), Some("flaky-1"))
        .await;
    let ev = events.wait_for(1, WAIT).await[0].json();
    assert_eq!(ev["tenant_id"], t.as_str());
    assert_eq!(ev["newly_issued"], true);

    let s = stub.stats();
    assert_eq!(s.failed, 3, "the three 503s were seen: {s:?}");
    assert_eq!(s.requests, 4, "three retries, then success: {s:?}");
    assert_eq!(s.issued, 1, "{s:?}");
    let stored = env.stored_tokens().await;
    assert_eq!(
        stored.get(&t).map(String::as_str),
        ev["token_fingerprint"].as_str()
    );
    worker.stop().await;
    assert!(dead.all().is_empty(), "no dead letters: {:?}", dead.all());
    assert_eq!(env.queue_ready("tenant-tokens.dead").await, 0);
    assert_eq!(events.all().len(), 1, "one event");

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_exhausted_dead_letters_the_original_message() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    stub.set_mode(StubMode::FailAll(503));
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let worker = env
        .start_worker(
            &stub.url(),
            &[
                "--max-attempts",
                "3",
                "--issue-retry-budget",
                "200ms",
                "--retry-delays",
                "100ms,200ms",
            ],
        )
        .await;
    let producer = Producer::new(&env).await;
    let t = tenant("down");

    let mut h = FieldTable::default();
    h.insert("x-custom".into(), AMQPValue::LongString("kept".into()));
    let body = json!({"tenant_id": t, "tenant_name": "Down Inc"}).to_string();
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("exhaust-1".into())
        .with_correlation_id("corr-exhaust".into())
        .with_headers(h);
    producer
        .publish("extension.requested", body.as_bytes(), props)
        .await;

    let dl = dead.wait_for(1, WAIT).await.remove(0);
    assert_eq!(dl.header("x-tt-error-kind").as_deref(), Some("exhausted"));
    assert_eq!(dl.header_u32("x-tt-attempts"), Some(3));
    assert_eq!(
        dl.header("x-tt-original-routing-key").as_deref(),
        Some("extension.requested")
    );
    assert_eq!(dl.routing_key, "extension.requested");
    assert_eq!(message_id(&dl).as_deref(), Some("exhaust-1"));
    assert_eq!(
        dl.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .as_deref(),
        Some("corr-exhaust")
    );
    assert_eq!(dl.header("x-custom").as_deref(), Some("kept"));
    assert_eq!(dl.body, body.as_bytes(), "original body kept");
    let err = dl.header("x-tt-error").unwrap_or_default();
    assert!(err.contains("503"), "{err}");
    assert!(
        time::OffsetDateTime::parse(
            &dl.header("x-tt-failed-at").unwrap_or_default(),
            &time::format_description::well_known::Rfc3339
        )
        .is_ok()
    );
    // It went through the retry queues: RabbitMQ's x-death names them.
    let mut deaths = death_queues(&dl);
    deaths.sort();
    assert_eq!(
        deaths,
        ["tenant-tokens.retry.100ms", "tenant-tokens.retry.200ms"],
        "went through both retry queues"
    );
    let s = stub.stats();
    assert!(
        s.requests >= 3,
        "each of the three deliveries called the issuer: {s:?}"
    );
    assert_eq!(s.issued, 0);

    worker.stop().await;
    assert!(events.all().is_empty(), "no ready event");
    assert!(env.stored_tokens().await.is_empty(), "no token stored");
    assert_eq!(dead.all().len(), 1, "dead-lettered once");
    assert_eq!(env.queue_ready("tenant-tokens.requests").await, 0);

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_is_dead_lettered_as_rejected_without_retry() {
    let env = TestEnv::new().await;
    let issuer = MockServer::start().await;
    let answer = format!(
        "{{\"error\":\"bad_request\",\"message\":\"restriction dd must be 0\"}}{}",
        "x".repeat(3000)
    );
    Mock::given(method("POST"))
        .and(path("/api/tokens/issue"))
        .respond_with(ResponseTemplate::new(400).set_body_string(answer))
        .mount(&issuer)
        .await;
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let worker = env.start_worker(&issuer.uri(), &[]).await;
    let producer = Producer::new(&env).await;
    let t = tenant("refused");

    producer
        .request("tenant.created", json!({"tenant_id": t}), Some("rej-1"))
        .await;
    let dl = dead.wait_for(1, WAIT).await.remove(0);
    assert_eq!(dl.header("x-tt-error-kind").as_deref(), Some("rejected"));
    assert_eq!(dl.header_u32("x-tt-issuer-status"), Some(400));
    assert_eq!(dl.header_u32("x-tt-attempts"), Some(0));
    assert_eq!(
        dl.header("x-tt-original-routing-key").as_deref(),
        Some("tenant.created")
    );
    assert_eq!(message_id(&dl).as_deref(), Some("rej-1"));
    let err = dl.header("x-tt-error").unwrap_or_default();
    assert!(
        err.contains("400") && err.contains("restriction dd must be 0"),
        "{err}"
    );
    assert!(err.len() <= 1024, "x-tt-error cut to 1 KiB: {}", err.len());

    worker.stop().await;
    let calls = issuer.received_requests().await.unwrap_or_default();
    assert_eq!(calls.len(), 1, "exactly one issuer request, no retry");
    assert!(events.all().is_empty());
    assert_eq!(dead.all().len(), 1);

    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_master_token_pauses_then_resumes_without_losing_anything() {
    let env = TestEnv::new().await;
    // Latency makes requests in flight visible in the stub's counters.
    let stub = stub_issuer(Duration::from_millis(100)).await;
    stub.set_mode(StubMode::Unauthorized);
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let worker = env.start_worker(&stub.url(), &[]).await;
    let producer = Producer::new(&env).await;
    let ts = tenants("revoked", 8);
    // One request opens the breaker; the others arrive while it is open.
    producer.requests(created(&ts[..1])).await;
    let health = worker.health.clone();
    eventually("the breaker to open (readiness false)", WAIT, || {
        let h = health.clone();
        async move {
            h.not_ready_reasons()
                .iter()
                .any(|r| r.contains("breaker open"))
        }
    })
    .await;
    producer.requests(created(&ts[1..])).await;

    // While open: consumption paused, one probe at a time.
    let before = stub.stats();
    let until = Instant::now() + Duration::from_millis(1200);
    let mut most = 0;
    while Instant::now() < until {
        most = most.max(stub_in_flight(&stub.stats()));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let after = stub.stats();
    assert!(
        most <= 1,
        "at most one issuer request in flight while open, saw {most}: {before:?} → {after:?}"
    );
    assert!(
        after.requests > before.requests,
        "the breaker probes while open: {before:?} → {after:?}"
    );
    assert!(
        after.requests - before.requests <= 3,
        "only probes reach the issuer while open: {before:?} → {after:?}"
    );
    assert!(
        !worker.health.not_ready_reasons().is_empty(),
        "still not ready"
    );
    assert!(events.all().is_empty(), "no event while refused");
    assert!(dead.all().is_empty(), "nothing dead-lettered while refused");
    assert_eq!(after.issued, 0);

    stub.set_mode(StubMode::Normal);
    wait_for_tenants(&events, &ts, WAIT).await;
    eventually("readiness to come back", WAIT, || {
        let h = health.clone();
        async move { h.not_ready_reasons().is_empty() }
    })
    .await;
    worker.stop().await;
    let got = events.all();
    let a = audit(&env, &got, &ts).await;
    assert_eq!(a.distinct_events, ts.len());
    let s = stub.stats();
    assert_eq!(s.issued, ts.len() as u64, "one token per tenant: {s:?}");
    assert_eq!(s.issued_per_container_max, 1);
    assert!(dead.all().is_empty(), "zero dead letters");
    assert_eq!(env.stored_tokens().await.len(), ts.len());

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_broker_connections_are_reopened_without_a_restart() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::from_millis(50)).await;
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    // A small prefetch keeps the load in flight for a while.
    let worker = env.start_worker(&stub.url(), &["--concurrency", "8"]).await;
    // The management API lists a connection only after its first statistics (up to 5 s),
    // so learn the worker's connection name before the load starts.
    let deadline = Instant::now() + WAIT;
    let name = loop {
        let listed = env.connections().await;
        if let Some((name, _)) = listed
            .into_iter()
            .find(|(_, client)| client == "tenant-tokens worker")
        {
            break name;
        }
        assert!(
            Instant::now() < deadline,
            "the worker's connection is never listed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let producer = Producer::new(&env).await;
    let ts = tenants("conn", 200);
    producer.requests(created(&ts)).await;

    events.wait_for(20, WAIT).await;
    assert!(env.close_connection(&name).await, "closed {name}");
    let at_cut = tenants_with_events(&events.all()).len();
    assert!(
        at_cut < ts.len(),
        "closed mid-load: {at_cut} of {}",
        ts.len()
    );

    wait_for_tenants(&events, &ts, WAIT).await;
    let health = worker.health.clone();
    eventually("the worker to be ready again", WAIT, || {
        let h = health.clone();
        async move { h.not_ready_reasons().is_empty() }
    })
    .await;
    worker.stop().await;
    let a = audit(&env, &events.all(), &ts).await;
    assert_eq!(a.distinct_events, ts.len());
    let s = stub.stats();
    assert_eq!(
        s.requests,
        ts.len() as u64,
        "one issue call per tenant: {s:?}"
    );
    assert_eq!(s.issued_per_container_max, 1);
    assert!(dead.all().is_empty());
    assert_eq!(env.queue_ready("tenant-tokens.requests").await, 0);

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_outage_is_waited_out() {
    let env = TestEnv::new().await;
    let proxy = TcpProxy::start(&env.database_host_port()).await;
    let db_url = env.database_url_via(proxy.addr);
    let stub = stub_issuer(Duration::from_millis(100)).await;
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let worker = env
        .start_worker(
            &stub.url(),
            &["--database-url", &db_url, "--concurrency", "16"],
        )
        .await;
    let producer = Producer::new(&env).await;
    let ts = tenants("pgcut", 200);
    producer.requests(created(&ts)).await;

    events.wait_for(10, WAIT).await;
    proxy.sever();
    let health = worker.health.clone();
    eventually("readiness to report the database", WAIT, || {
        let h = health.clone();
        async move {
            h.not_ready_reasons()
                .iter()
                .any(|r| r.starts_with("database"))
        }
    })
    .await;
    // Hold the outage open for a moment while the worker retries.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let during = tenants_with_events(&events.all()).len();
    assert!(during < ts.len(), "cut mid-load: {during} of {}", ts.len());
    proxy.restore();

    wait_for_tenants(&events, &ts, WAIT).await;
    eventually("readiness to come back", WAIT, || {
        let h = health.clone();
        async move { h.not_ready_reasons().is_empty() }
    })
    .await;
    worker.stop().await;
    let a = audit(&env, &events.all(), &ts).await;
    assert_eq!(a.distinct_events, ts.len());
    let s = stub.stats();
    assert_eq!(
        s.issued,
        ts.len() as u64,
        "one token minted per tenant: {s:?}"
    );
    assert_eq!(s.issued_per_container_max, 1);
    assert_eq!(env.stored_tokens().await.len(), ts.len());
    assert!(dead.all().is_empty());
    assert_eq!(env.queue_ready("tenant-tokens.requests").await, 0);

    drop(proxy);
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_nothing_and_issues_nothing_twice() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::from_millis(50)).await;
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let producer = Producer::new(&env).await;
    let conf = [("CONCURRENCY", "16")];
    let mut first = env.spawn_worker(&stub.url(), &conf);
    first.wait_ready(WAIT).await;
    let ts = tenants("kill", 500);
    producer.requests(created(&ts)).await;

    // Kill while issue calls are in flight, i.e. between claim and commit for some tenants.
    eventually("some events and issue calls in flight", WAIT, || {
        let enough = events.all().len() >= 40 && stub_in_flight(&stub.stats()) > 0;
        async move { enough }
    })
    .await;
    first.kill();
    let at_kill = tenants_with_events(&events.all()).len();
    assert!(at_kill < ts.len(), "killed mid-load: {at_kill}");

    let mut second = env.spawn_worker(&stub.url(), &conf);
    second.wait_ready(WAIT).await;
    wait_for_tenants(&events, &ts, WAIT).await;
    second.stop().await;

    let a = audit(&env, &events.all(), &ts).await;
    assert!(a.distinct_events >= ts.len());
    let s = stub.stats();
    assert_eq!(
        s.issued,
        ts.len() as u64,
        "one token minted per tenant: {s:?}"
    );
    assert_eq!(s.issued_per_container_max, 1);
    assert_eq!(env.stored_tokens().await.len(), ts.len());
    assert!(dead.all().is_empty());
    assert_eq!(env.queue_ready("tenant-tokens.requests").await, 0);

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_load_drains_exits_zero_and_loses_nothing() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::from_millis(50)).await;
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let producer = Producer::new(&env).await;
    let conf = [("CONCURRENCY", "16")];
    let mut first = env.spawn_worker(&stub.url(), &conf);
    first.wait_ready(WAIT).await;
    let ts = tenants("term", 400);
    producer.requests(created(&ts)).await;

    eventually("some events and issue calls in flight", WAIT, || {
        let enough = events.all().len() >= 40 && stub_in_flight(&stub.stats()) > 0;
        async move { enough }
    })
    .await;
    first.terminate();
    let status = first.wait_exit(WAIT).await;
    assert_eq!(
        status.code(),
        Some(0),
        "SIGTERM exits 0:\n{}",
        first.log_tail()
    );
    let at_exit = tenants_with_events(&events.all()).len();
    assert!(at_exit < ts.len(), "stopped mid-load: {at_exit}");
    // Drained: everything it took was either finished or handed back.
    assert!(
        first.log().contains("\"stopped\""),
        "logged its stop:\n{}",
        first.log_tail()
    );

    let mut second = env.spawn_worker(&stub.url(), &conf);
    second.wait_ready(WAIT).await;
    wait_for_tenants(&events, &ts, WAIT).await;
    second.stop().await;

    let a = audit(&env, &events.all(), &ts).await;
    assert!(a.distinct_events >= ts.len());
    let s = stub.stats();
    assert_eq!(s.issued, ts.len() as u64, "{s:?}");
    assert_eq!(s.issued_per_container_max, 1);
    assert!(dead.all().is_empty());
    assert_eq!(env.queue_ready("tenant-tokens.requests").await, 0);

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_and_triplicates_mint_one_token_per_tenant() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::from_millis(10)).await;
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let producer = Producer::new(&env).await;
    let mut workers: Vec<_> = (0..3).map(|_| env.spawn_worker(&stub.url(), &[])).collect();
    for w in &mut workers {
        w.wait_ready(WAIT).await;
    }
    let ts = tenants("tri", 1000);
    // The three copies of a request are published back to back, so they race.
    let mut msgs = Vec::with_capacity(3 * ts.len());
    for t in &ts {
        for copy in 0..3 {
            let key = if copy == 0 {
                "tenant.created"
            } else {
                "extension.requested"
            };
            msgs.push((
                key.to_owned(),
                json!({"tenant_id": t, "tenant_name": format!("Org {t}")}),
                format!("{t}-c{copy}"),
            ));
        }
    }
    producer.requests(msgs).await;

    let want = 3 * ts.len();
    events
        .wait_until(
            &format!("{want} distinct events"),
            Duration::from_secs(90),
            |all| {
                all.iter()
                    .filter_map(message_id)
                    .collect::<HashSet<_>>()
                    .len()
                    >= want
            },
        )
        .await;
    for w in workers {
        w.stop().await;
    }
    let got = events.all();
    assert_eq!(got.len(), want, "one event per request in a fault-free run");
    let a = audit(&env, &got, &ts).await;
    assert_eq!(a.distinct_events, want);
    let s = stub.stats();
    assert_eq!(s.issued, ts.len() as u64, "{s:?}");
    assert_eq!(
        s.requests,
        ts.len() as u64,
        "one issue call per tenant: {s:?}"
    );
    assert_eq!(s.issued_per_container_max, 1);
    assert_eq!(env.stored_tokens().await.len(), ts.len());
    assert!(dead.all().is_empty());

    stub.shutdown().await;
    env.cleanup().await;
}

/// The value of an unlabelled gauge in Prometheus text.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dead_letter_gauge_is_read_when_scraped() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let producer = Producer::new(&env).await;
    let mut worker = env.spawn_worker(&stub.url(), &[]);
    worker.wait_ready(WAIT).await;
    let scrape = || async {
        let body = reqwest::get(format!("http://{}/metrics", worker.ops))
            .await
            .expect("scrape")
            .text()
            .await
            .expect("metrics text");
        gauge(&body, "tenant_tokens_dead_letters")
    };

    for body in [&b"not json"[..], b"[]"] {
        producer
            .publish("tenant.created", body, BasicProperties::default())
            .await;
    }

    // The contract allows the value to be 5 s old; it used to be polled every 15 s.
    eventually(
        "the gauge shows both waiting dead letters",
        Duration::from_secs(5),
        || async { scrape().await == Some(2.0) },
    )
    .await;
    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_broker_node_fails_over_to_the_next_url_of_amqp_url() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let events = Collector::ready_events(&env).await;
    let producer = Producer::new(&env).await;
    // Two "nodes" of one cluster: the first reached through a proxy that the test cuts.
    let proxy = TcpProxy::start(&env.amqp_host_port()).await;
    let nodes = format!("{},{}", env.amqp_url_via(proxy.addr), env.amqp_url);
    let worker = env
        .start_worker(&stub.url(), &["--amqp-url", nodes.as_str()])
        .await;
    assert!(
        proxy.accepted() >= 1,
        "the worker connected to the first node"
    );
    let (before, after) = (tenant("node-a"), tenant("node-b"));
    producer
        .request("tenant.created", json!({"tenant_id": before}), None)
        .await;
    wait_for_tenants(&events, std::slice::from_ref(&before), WAIT).await;

    proxy.sever();
    producer
        .request("tenant.created", json!({"tenant_id": after}), None)
        .await;

    wait_for_tenants(&events, std::slice::from_ref(&after), WAIT).await;
    eventually("the worker is ready on the second node", WAIT, || async {
        worker.health.not_ready_reasons().is_empty()
    })
    .await;
    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}
