//! The recoverability soak (issue 3): three worker processes and a slowish stub issuer,
//! a steady stream of new tenants with duplicates and extension requests, and random faults
//! for `SOAK_MINUTES` minutes (default 5); then everything is healed, the queues drain, and
//! the promises are checked.
//!
//! ```sh
//! SOAK_MINUTES=5 cargo test --release --test soak -- --ignored --nocapture
//! ```

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng as _;
use rand::seq::IndexedRandom as _;
use serde_json::json;
use support::{ChildWorker, Collector, Producer, TestEnv, audit, stub_in_flight};
use tenant_tokens::tools::stub_issuer::{StubConfig, StubIssuer, StubMode};

/// Retry queues of the soak's workers (declared by them; drained at the end).
const RETRY_DELAYS: &str = "200ms,1s,2s";

/// Settings of every soak worker: short retry delays, and enough attempts that no fault of
/// the soak exhausts a message (so every dead letter other than the invalid ones is a bug).
const WORKER_ENV: &[(&str, &str)] = &[
    ("RETRY_DELAYS", RETRY_DELAYS),
    ("MAX_ATTEMPTS", "30"),
    ("ISSUE_RETRY_BUDGET", "1s"),
    ("SHUTDOWN_GRACE", "10s"),
    ("RUST_LOG", "warn"),
];

/// What the publisher sent.
#[derive(Default)]
struct Sent {
    tenants: Vec<String>,
    /// Message ids of valid requests: each must yield a ready event.
    valid: HashSet<String>,
    /// Message ids of invalid requests: each must be dead-lettered as `invalid`.
    invalid: HashSet<String>,
    messages: usize,
}

/// Publishes a batch every ~300 ms until `stop`: new tenants (`tenant.created`, or a lazy
/// `extension.requested` first), duplicates with their own message ids, republished copies
/// of the same message, extension requests for earlier tenants, and a few invalid messages.
async fn publish(producer: Producer, run: String, stop: Arc<AtomicBool>) -> Sent {
    let mut sent = Sent::default();
    let mut batch_no = 0;
    while !stop.load(Ordering::Relaxed) {
        let mut msgs = Vec::new();
        {
            let mut rng = rand::rng();
            for i in 0..40 {
                let t = format!("{run}-{batch_no}-{i}");
                let name = format!("Soak Org {batch_no} {i}");
                let lazy = rng.random_bool(0.2);
                let key = if lazy {
                    "extension.requested"
                } else {
                    "tenant.created"
                };
                let first = format!("{t}-a");
                msgs.push((
                    key.to_owned(),
                    json!({"tenant_id": t, "tenant_name": name, "extension_id": "e1"}),
                    first.clone(),
                ));
                for d in 0..rng.random_range(0..3) {
                    msgs.push((
                        "tenant.created".to_owned(),
                        json!({"tenant_id": t, "tenant_name": name}),
                        format!("{t}-dup{d}"),
                    ));
                }
                if rng.random_bool(0.1) {
                    // The same message again (a producer retry).
                    msgs.push((
                        key.to_owned(),
                        json!({"tenant_id": t, "tenant_name": name, "extension_id": "e1"}),
                        first,
                    ));
                }
                sent.tenants.push(t);
            }
            for j in 0..15 {
                if let Some(t) = sent.tenants.choose(&mut rng) {
                    msgs.push((
                        "extension.requested".to_owned(),
                        json!({"tenant_id": t, "extension_id": format!("ext-{j}")}),
                        format!("{t}-ext-{batch_no}-{j}"),
                    ));
                }
            }
            if batch_no % 10 == 0 {
                let id = format!("{run}-invalid-{batch_no}");
                msgs.push((
                    "tenant.created".to_owned(),
                    json!({"tenant_name": "no tenant id"}),
                    id.clone(),
                ));
                sent.invalid.insert(id);
            }
        }
        for (_, body, id) in &msgs {
            if body.get("tenant_id").is_some() {
                sent.valid.insert(id.clone());
            }
        }
        sent.messages += msgs.len();
        producer.requests(msgs).await;
        batch_no += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak: SOAK_MINUTES=5 cargo test --release --test soak -- --ignored --nocapture"]
async fn soak() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(5.0);
    let started = Instant::now();
    let env = TestEnv::new().await;
    let mut cfg = StubConfig::new(secrecy::SecretString::from(
        support::MASTER_TOKEN.to_owned(),
    ));
    cfg.latency = Duration::from_millis(5);
    cfg.latency_jitter = Duration::from_millis(20);
    let stub = StubIssuer::start("127.0.0.1:0".parse().expect("address"), cfg)
        .await
        .expect("stub issuer");
    let events = Collector::ready_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let producer = Producer::new(&env).await;

    let mut workers: Vec<ChildWorker> = (0..3)
        .map(|_| env.spawn_worker(&stub.url(), WORKER_ENV))
        .collect();
    for w in &mut workers {
        w.wait_ready(Duration::from_secs(60)).await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let run = support::tenant("soak");
    let publisher = tokio::spawn(publish(producer, run, stop.clone()));

    // Faults, one after another, while the publisher keeps going.
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let until = started + Duration::from_secs_f64(minutes * 60.0);
    while Instant::now() < until {
        let pause = rand::rng().random_range(1500..4000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (fault, which, hold) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..6),
                rng.random_range(0..workers.len()),
                Duration::from_millis(rng.random_range(1000..4000)),
            )
        };
        match fault {
            0 => {
                let n = rand::rng().random_range(20..120);
                stub.set_mode(StubMode::FailNext { n, status: 503 });
                *faults.entry("issuer 503 burst").or_default() += 1;
            }
            1 => {
                stub.set_mode(StubMode::Unauthorized);
                // Hold the refusal open for a few seconds.
                tokio::time::sleep(hold).await;
                stub.set_mode(StubMode::Normal);
                *faults.entry("issuer 401 for a few seconds").or_default() += 1;
            }
            2 => {
                workers[which].kill();
                workers[which] = env.spawn_worker(&stub.url(), WORKER_ENV);
                workers[which].wait_ready(Duration::from_secs(60)).await;
                *faults.entry("worker SIGKILL + restart").or_default() += 1;
            }
            3 => {
                workers[which].terminate();
                let status = workers[which].wait_exit(Duration::from_secs(30)).await;
                assert_eq!(
                    status.code(),
                    Some(0),
                    "SIGTERM exits 0:\n{}",
                    workers[which].log_tail()
                );
                workers[which] = env.spawn_worker(&stub.url(), WORKER_ENV);
                workers[which].wait_ready(Duration::from_secs(60)).await;
                *faults.entry("worker SIGTERM + restart").or_default() += 1;
            }
            4 => {
                // Only connections the management API already lists (it lags up to 5 s).
                let closed = env.close_connections("tenant-tokens worker").await;
                *faults.entry("broker connections closed").or_default() += closed;
            }
            _ => {
                let status = *[500u16, 502, 503, 504]
                    .choose(&mut rand::rng())
                    .expect("status");
                stub.set_mode(StubMode::FailAll(status));
                tokio::time::sleep(hold.min(Duration::from_millis(2500))).await;
                stub.set_mode(StubMode::Normal);
                *faults.entry("issuer 5xx storm").or_default() += 1;
            }
        }
    }

    // Heal everything, stop publishing, and wait for the queues to drain.
    stub.set_mode(StubMode::Normal);
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.await.expect("publisher");
    let publishing = started.elapsed();
    for w in &mut workers {
        if !w.ready().await {
            w.wait_ready(Duration::from_secs(120)).await;
        }
    }
    let want: HashSet<String> = sent.valid.clone();
    events
        .wait_until(
            &format!("a ready event for each of {} requests", want.len()),
            Duration::from_secs(600),
            |all| {
                let have: HashSet<String> = all
                    .iter()
                    .filter_map(|r| {
                        r.properties
                            .correlation_id()
                            .as_ref()
                            .map(|c| c.to_string())
                    })
                    .collect();
                want.iter().all(|id| have.contains(id))
            },
        )
        .await;
    let invalid = sent.invalid.clone();
    dead.wait_until(
        &format!("{} invalid dead letters", invalid.len()),
        Duration::from_secs(120),
        |all| {
            let have: HashSet<String> = all
                .iter()
                .filter_map(|r| r.properties.message_id().as_ref().map(|m| m.to_string()))
                .collect();
            invalid.iter().all(|id| have.contains(id))
        },
    )
    .await;
    for w in workers {
        w.stop().await;
    }
    let mut queues = vec!["tenant-tokens.requests".to_owned()];
    queues.extend(
        tenant_tokens::configuration::parse_delays_arg(RETRY_DELAYS)
            .expect("delays")
            .0
            .into_iter()
            .map(tenant_tokens::broker::topology::retry_queue_name),
    );
    for q in &queues {
        assert_eq!(env.queue_ready(q).await, 0, "{q} drained");
    }

    // The promises.
    let got = events.all();
    let a = audit(&env, &got, &sent.tenants).await;
    let dls = dead.all();
    let unexpected: Vec<String> = dls
        .iter()
        .filter(|d| {
            let id = d.properties.message_id().as_ref().map(|m| m.to_string());
            !id.is_some_and(|id| sent.invalid.contains(&id))
                || d.header("x-tt-error-kind").as_deref() != Some("invalid")
        })
        .map(|d| {
            format!(
                "{:?} kind={:?} error={:?} attempts={:?} x-delivery-count={:?}",
                d.properties.message_id(),
                d.header("x-tt-error-kind"),
                d.header("x-tt-error"),
                d.header_u32("x-tt-attempts"),
                d.header_u32("x-delivery-count"),
            )
        })
        .collect();
    let s = stub.stats();
    let stored = env.stored_tokens().await.len();

    println!();
    println!("soak report");
    println!(
        "  elapsed             {:.0?} ({:.0?} publishing and faults)",
        started.elapsed(),
        publishing
    );
    println!("  tenants             {}", sent.tenants.len());
    println!(
        "  messages            {} ({} valid ids, {} invalid)",
        sent.messages,
        sent.valid.len(),
        sent.invalid.len()
    );
    println!(
        "  ready events        {} ({} distinct)",
        a.events, a.distinct_events
    );
    println!("  stored tokens       {stored}");
    println!(
        "  dead letters        {} ({} unexpected)",
        dls.len(),
        unexpected.len()
    );
    println!(
        "  issuer              {} requests, {} minted, {} replayed, {} failed, {} unauthorized, max per container {}, in flight {}",
        s.requests,
        s.issued,
        s.replayed,
        s.failed,
        s.unauthorized,
        s.issued_per_container_max,
        stub_in_flight(&s)
    );
    println!("  faults injected     {}", faults.values().sum::<usize>());
    for (kind, n) in &faults {
        println!("    {n:>4}  {kind}");
    }

    assert!(
        unexpected.is_empty(),
        "unexpected dead letters:\n{}",
        unexpected.join("\n")
    );
    assert_eq!(stored, sent.tenants.len(), "one stored token per tenant");
    assert_eq!(
        s.issued_per_container_max, 1,
        "never two tokens for a container"
    );
    assert_eq!(
        s.distinct_containers,
        sent.tenants.len() as u64,
        "one container per tenant"
    );

    stub.shutdown().await;
    env.cleanup().await;
}
