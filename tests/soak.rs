//! The recoverability soak (issue 3): three worker processes and a slowish stub issuer,
//! a steady stream of new tenants with duplicates and extension requests, and random faults
//! for `SOAK_MINUTES` minutes (default 5), while tenants already provisioned are rotated
//! (`tenant.token.rotate`) and deleted (`tenant.deleted`) and revocations fail now and then;
//! then everything is healed, the queues drain, the due revocations are made, and the
//! promises are checked: tokens, generations, tombstones, and exactly the right tokens
//! revoked, once each.
//!
//! ```sh
//! SOAK_MINUTES=5 cargo test --release --test soak -- --ignored --nocapture
//! ```

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng as _;
use rand::seq::IndexedRandom as _;
use serde_json::json;
use support::{ChildWorker, Collector, Producer, Received, TestEnv, audit, stub_in_flight};
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
    // Superseded tokens are revoked soon after a rotation, within the run.
    ("ROTATION_GRACE", "1s"),
    ("RUST_LOG", "warn"),
];

/// What the publisher sent.
#[derive(Default)]
struct Sent {
    tenants: Vec<String>,
    /// Message ids of valid requests that must yield a ready event → their tenant (for a
    /// tenant deleted later, a `gone` dead letter instead when it was handled after the
    /// deletion). Rotate requests included.
    valid: HashMap<String, String>,
    /// Message ids of invalid requests: each must be dead-lettered as `invalid`.
    invalid: HashSet<String>,
    /// Rotated tenants → the distinct message ids of their rotate requests.
    rotations: HashMap<String, Vec<String>>,
    /// Rotate requests with `now: true`.
    rotations_now: usize,
    /// Rotate requests published twice with the same message id (a producer retry).
    rotations_republished: usize,
    /// Deleted tenants → the message id of their (first) `tenant.deleted`.
    deleted: HashMap<String, String>,
    /// Second `tenant.deleted` requests (own message id) for a deleted tenant.
    deletions_repeated: usize,
    messages: usize,
}

/// Publishes a batch every ~300 ms until `stop`: new tenants (`tenant.created`, or a lazy
/// `extension.requested` first), duplicates with their own message ids, republished copies
/// of the same message, extension requests for earlier tenants, and a few invalid messages.
/// Every third batch it also rotates some tenants whose ready event `events` already holds
/// (a tenant may be rotated many times) and deletes others (never a rotated one); nothing
/// more is published for a tenant once its deletion is.
async fn publish(
    producer: Producer,
    run: String,
    stop: Arc<AtomicBool>,
    events: Arc<Collector>,
) -> Sent {
    let mut sent = Sent::default();
    let mut batch_no = 0;
    // Tenants not deleted (extension requests go to these only).
    let mut live: Vec<String> = Vec::new();
    // Tenants with a ready event seen and not deleted: candidates to rotate or delete.
    let mut provisioned: Vec<String> = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    let mut cursor = 0;
    while !stop.load(Ordering::Relaxed) {
        for r in events.since(cursor) {
            cursor += 1;
            if let Some(t) = r.json()["tenant_id"].as_str()
                && seen.insert(t.to_owned())
                && !sent.deleted.contains_key(t)
            {
                provisioned.push(t.to_owned());
            }
        }
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
                sent.tenants.push(t.clone());
                live.push(t);
            }
            if batch_no % 3 == 1 {
                // Deletions first, so nothing below is published for a deleted tenant.
                for _ in 0..rng.random_range(1..=3) {
                    let Some(t) = provisioned
                        .choose(&mut rng)
                        .filter(|t| !sent.rotations.contains_key(*t))
                        .cloned()
                    else {
                        continue;
                    };
                    provisioned.retain(|x| *x != t);
                    live.retain(|x| *x != t);
                    let id = format!("{t}-del");
                    msgs.push((
                        "tenant.deleted".to_owned(),
                        json!({"tenant_id": t}),
                        id.clone(),
                    ));
                    if rng.random_bool(0.1) {
                        // A repeated deletion: changes nothing, publishes nothing.
                        msgs.push((
                            "tenant.deleted".to_owned(),
                            json!({"tenant_id": t}),
                            format!("{t}-del2"),
                        ));
                        sent.deletions_repeated += 1;
                    }
                    sent.deleted.insert(t, id);
                }
                for k in 0..rng.random_range(2..=5) {
                    // Now and then a tenant rotated before, so some see many generations.
                    let again: Vec<&String> = sent.rotations.keys().collect();
                    let t = if rng.random_bool(0.3) && !again.is_empty() {
                        again.choose(&mut rng).map(|t| (*t).clone())
                    } else {
                        provisioned.choose(&mut rng).cloned()
                    };
                    let Some(t) = t else { continue };
                    let id = format!("{t}-rot-{batch_no}-{k}");
                    let mut body = json!({"tenant_id": t});
                    if rng.random_bool(0.5) {
                        body["reason"] = json!(format!("soak rotation {batch_no}-{k}"));
                    }
                    if rng.random_bool(0.3) {
                        body["now"] = json!(true);
                        sent.rotations_now += 1;
                    }
                    msgs.push(("tenant.token.rotate".to_owned(), body.clone(), id.clone()));
                    if rng.random_bool(0.15) {
                        // The same rotate request again: the same event, no more rotation.
                        msgs.push(("tenant.token.rotate".to_owned(), body, id.clone()));
                        sent.rotations_republished += 1;
                    }
                    sent.rotations.entry(t).or_default().push(id);
                }
            }
            for j in 0..15 {
                if let Some(t) = live.choose(&mut rng) {
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
        for (key, body, id) in &msgs {
            if key != "tenant.deleted"
                && let Some(t) = body.get("tenant_id").and_then(|t| t.as_str())
            {
                sent.valid.insert(id.clone(), t.to_owned());
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
    let events = Arc::new(Collector::ready_events(&env).await);
    let revoked_events = Collector::revoked_events(&env).await;
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
    let publisher = tokio::spawn(publish(producer, run, stop.clone(), events.clone()));

    // Faults, one after another, while the publisher keeps going.
    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let until = started + Duration::from_secs_f64(minutes * 60.0);
    while Instant::now() < until {
        let pause = rand::rng().random_range(1500..4000);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let (fault, which, hold) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..8),
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
            5 => {
                let status = *[500u16, 502, 503, 504]
                    .choose(&mut rand::rng())
                    .expect("status");
                stub.set_mode(StubMode::FailAll(status));
                tokio::time::sleep(hold.min(Duration::from_millis(2500))).await;
                stub.set_mode(StubMode::Normal);
                *faults.entry("issuer 5xx storm").or_default() += 1;
            }
            6 => {
                let (status, burst) = {
                    let mut rng = rand::rng();
                    let status = *[500u16, 502, 503, 504].choose(&mut rng).expect("status");
                    (
                        status,
                        rng.random_bool(0.5).then(|| rng.random_range(5..40)),
                    )
                };
                if let Some(n) = burst {
                    // Left to the worker's revocations, however long they take to come.
                    stub.set_revoke_mode(StubMode::FailNext { n, status });
                    *faults.entry("revoke 5xx burst").or_default() += 1;
                } else {
                    stub.set_revoke_mode(StubMode::FailAll(status));
                    tokio::time::sleep(hold).await;
                    stub.set_revoke_mode(StubMode::Normal);
                    *faults.entry("revoke 5xx storm").or_default() += 1;
                }
            }
            _ => {
                stub.set_revoke_mode(StubMode::Unauthorized);
                tokio::time::sleep(hold).await;
                stub.set_revoke_mode(StubMode::Normal);
                *faults.entry("revoke 401 for a few seconds").or_default() += 1;
            }
        }
    }

    // Heal everything, stop publishing, and wait for the queues to drain.
    stub.set_mode(StubMode::Normal);
    stub.set_revoke_mode(StubMode::Normal);
    stop.store(true, Ordering::Relaxed);
    let sent = publisher.await.expect("publisher");
    let publishing = started.elapsed();
    for w in &mut workers {
        if !w.ready().await {
            w.wait_ready(Duration::from_secs(120)).await;
        }
    }

    // Every valid request gets its ready event, except that one for a tenant deleted
    // meanwhile may be dead-lettered (as `gone`) instead; every invalid one a dead letter.
    // (Followed incrementally: the streams are long.)
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut answered: HashSet<String> = HashSet::new();
    let (mut ready_seen, mut dead_seen) = (0, 0);
    loop {
        for r in events.since(ready_seen) {
            ready_seen += 1;
            answered.extend(correlation_id(&r));
        }
        for d in dead.since(dead_seen) {
            dead_seen += 1;
            // Any dead letter answers its request; the audit says whether it should have.
            answered.extend(message_id(&d));
        }
        let missing = sent
            .valid
            .keys()
            .chain(&sent.invalid)
            .filter(|id| !answered.contains(*id))
            .count();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {missing} of {} requests to get a ready event or a dead letter",
            sent.valid.len() + sent.invalid.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = events.all();

    // The tokens each tenant's ready events name, by generation; from these, the revocations
    // due: every generation a rotation superseded, and every token of a deleted tenant.
    let mut tokens: HashMap<String, BTreeMap<u64, BTreeSet<String>>> = HashMap::new();
    let mut containers: HashMap<String, String> = HashMap::new();
    for r in &got {
        let v = r.json();
        let t = v["tenant_id"].as_str().expect("tenant_id").to_owned();
        let g = v["generation"].as_u64().expect("generation");
        let fp = v["token_fingerprint"].as_str().expect("fingerprint");
        containers.insert(
            t.clone(),
            v["container"].as_str().expect("container").into(),
        );
        tokens
            .entry(t)
            .or_default()
            .entry(g)
            .or_default()
            .insert(fp.to_owned());
    }
    let mut due: HashMap<String, Due> = HashMap::new();
    for (t, ids) in &sent.rotations {
        let superseded = ids.len() as u64;
        for (g, fps) in tokens[t].range(..=superseded) {
            for fp in fps {
                due.insert(fp.clone(), (t.clone(), *g, "rotated"));
            }
        }
    }
    for t in sent.deleted.keys() {
        for (g, fps) in &tokens[t] {
            for fp in fps {
                due.insert(fp.clone(), (t.clone(), *g, "deleted"));
            }
        }
    }
    revoked_events
        .wait_until(
            &format!("a revoked event for each of {} due revocations", due.len()),
            Duration::from_secs(300),
            |all| {
                let have: HashSet<String> = all
                    .iter()
                    .filter_map(|r| r.json()["token_fingerprint"].as_str().map(str::to_owned))
                    .collect();
                due.keys().all(|fp| have.contains(fp))
            },
        )
        .await;

    let mut queues = vec!["tenant-tokens.requests".to_owned()];
    queues.extend(
        tenant_tokens::configuration::parse_delays_arg(RETRY_DELAYS)
            .expect("delays")
            .0
            .into_iter()
            .map(tenant_tokens::broker::topology::retry_queue_name),
    );
    // Requests that answer nothing (a repeated deletion) may still wait in a queue.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut waiting = 0;
        for q in &queues {
            waiting += env.queue_ready(q).await;
        }
        if waiting == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {waiting} queued requests to drain"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for w in workers {
        w.stop().await;
    }
    for q in &queues {
        assert_eq!(env.queue_ready(q).await, 0, "{q} drained");
    }

    // The promises. Tenants neither rotated nor deleted: the audit of every soak so far.
    let plain: Vec<String> = sent
        .tenants
        .iter()
        .filter(|t| !sent.rotations.contains_key(*t) && !sent.deleted.contains_key(*t))
        .cloned()
        .collect();
    let a = audit(&env, &got, &plain).await;
    let rows = tenant_rows(&env).await;
    let stored_tokens = env.stored_tokens().await;
    let mut by_tenant: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for r in &got {
        let v = r.json();
        by_tenant
            .entry(v["tenant_id"].as_str().unwrap_or_default().to_owned())
            .or_default()
            .push(v);
    }

    // Rotated tenants: generation n+1 after n rotate requests, one token per generation,
    // one rotated event per rotate request, the newest token stored.
    let mut rotated_events = 0;
    for (t, ids) in &sent.rotations {
        let n = ids.len() as u64;
        let row = &rows[t];
        assert_eq!(
            row.generation,
            n + 1,
            "tenant {t}: generation 1 + {n} rotations"
        );
        assert!(
            !row.deleted && row.sealed,
            "tenant {t}: rotated, not deleted, token stored: {row:?}"
        );
        let gens = &tokens[t];
        assert_eq!(
            gens.keys().copied().collect::<Vec<_>>(),
            (1..=n + 1).collect::<Vec<_>>(),
            "tenant {t}: ready events for generations 1..={}",
            n + 1
        );
        let fps: HashSet<&String> = gens.values().flatten().collect();
        assert!(
            gens.values().all(|f| f.len() == 1) && fps.len() == gens.len(),
            "tenant {t}: one token per generation, a new one each time: {gens:?}"
        );
        assert_eq!(
            row.fingerprint.as_ref(),
            gens[&(n + 1)].first(),
            "tenant {t}: the newest generation is stored"
        );
        let evs = &by_tenant[t];
        let mut by_request: HashMap<&str, BTreeSet<(&str, u64)>> = HashMap::new();
        for e in evs.iter().filter(|e| e["rotated"] == true) {
            assert_eq!(e["newly_issued"], true, "tenant {t}: {e}");
            by_request
                .entry(e["correlation_id"].as_str().expect("correlation_id"))
                .or_default()
                .insert((
                    e["event_id"].as_str().expect("event_id"),
                    e["generation"].as_u64().expect("generation"),
                ));
        }
        let requested: BTreeSet<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(
            by_request.keys().copied().collect::<BTreeSet<_>>(),
            requested,
            "tenant {t}: rotated events answer exactly its rotate requests"
        );
        let mut generations: Vec<u64> = Vec::new();
        for (id, evs) in &by_request {
            assert_eq!(
                evs.len(),
                1,
                "tenant {t}: one rotated event for request {id}, got {evs:?}"
            );
            generations.extend(evs.iter().map(|(_, g)| *g));
        }
        generations.sort_unstable();
        assert_eq!(
            generations,
            (2..=n + 1).collect::<Vec<_>>(),
            "tenant {t}: each rotation made a generation of its own"
        );
        rotated_events += by_request.len();
        let first: BTreeSet<(&str, u64)> = evs
            .iter()
            .filter(|e| e["newly_issued"] == true && e["rotated"] != true)
            .map(|e| {
                (
                    e["event_id"].as_str().expect("event_id"),
                    e["generation"].as_u64().expect("generation"),
                )
            })
            .collect();
        assert_eq!(
            first.iter().map(|(_, g)| *g).collect::<Vec<_>>(),
            vec![1],
            "tenant {t}: exactly one request reports its first token newly issued: {first:?}"
        );
    }

    // Deleted tenants: a tombstone without a token; their tokens are among those due.
    for t in sent.deleted.keys() {
        let row = &rows[t];
        assert!(
            row.deleted && !row.sealed && row.fingerprint.is_none(),
            "tenant {t}: a tombstone without a token: {row:?}"
        );
        assert!(
            !stored_tokens.contains_key(t),
            "tenant {t}: no stored token"
        );
        assert_eq!(
            tokens[t].keys().copied().collect::<Vec<_>>(),
            vec![1],
            "tenant {t}: never rotated, one generation"
        );
    }

    // Exactly the due tokens revoked, each once, by the issuer, in the revoked events and in
    // Postgres.
    let revoked = stub.revoked();
    let mut calls_repeated = 0;
    let mut revoked_fps: HashMap<&str, usize> = HashMap::new();
    for r in &revoked {
        *revoked_fps.entry(r.fingerprint.as_str()).or_default() += 1;
        if r.revoke_calls > 1 {
            calls_repeated += 1;
        }
        if let Some((t, _, _)) = due.get(&r.fingerprint) {
            assert_eq!(
                Some(&r.ten),
                containers.get(t),
                "token {} of tenant {t} scoped to its container",
                r.fingerprint
            );
        }
    }
    let twice: Vec<&&str> = revoked_fps
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(fp, _)| fp)
        .collect();
    assert!(
        twice.is_empty(),
        "the issuer lists these revoked more than once: {twice:?}"
    );
    let missing: Vec<&Due> = due
        .iter()
        .filter(|(fp, _)| !revoked_fps.contains_key(fp.as_str()))
        .map(|(_, d)| d)
        .collect();
    let extra: Vec<&&str> = revoked_fps
        .keys()
        .filter(|fp| !due.contains_key(**fp))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the issuer revoked exactly the due tokens: not revoked {missing:?}; revoked but not due {extra:?}"
    );

    let rev = revoked_events.all();
    let mut rev_by_id: HashMap<String, serde_json::Value> = HashMap::new();
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rev {
        let v = r.json();
        let id = v["event_id"].as_str().expect("event_id").to_owned();
        if let Some(prev) = rev_by_id.get(&id) {
            assert_eq!(
                prev, &v,
                "every copy of revoked event {id} is the same event"
            );
            continue;
        }
        let fp = v["token_fingerprint"].as_str().expect("fingerprint");
        let (t, g, reason) = due
            .get(fp)
            .unwrap_or_else(|| panic!("a revoked event for a token not due: {v}"));
        assert_eq!(
            (
                v["tenant_id"].as_str(),
                v["generation"].as_u64(),
                v["reason"].as_str()
            ),
            (Some(t.as_str()), Some(*g), Some(*reason)),
            "revoked event {v}"
        );
        *by_reason.entry((*reason).to_owned()).or_default() += 1;
        rev_by_id.insert(id, v);
    }
    assert_eq!(
        rev_by_id.len(),
        due.len(),
        "one revoked event per due token"
    );

    let revocations = revocation_rows(&env).await;
    let open: Vec<&RevocationRow> = revocations
        .iter()
        .filter(|r| !r.revoked || !r.erased)
        .collect();
    assert!(
        open.is_empty(),
        "every revocation made and its ciphertext erased: {open:?}"
    );
    let db_fps: HashSet<&str> = revocations.iter().map(|r| r.fingerprint.as_str()).collect();
    assert!(
        db_fps.len() == due.len() && due.keys().all(|fp| db_fps.contains(fp.as_str())),
        "the revocations table holds exactly the due tokens ({} rows, {} due)",
        db_fps.len(),
        due.len()
    );
    for r in &revocations {
        let (t, g, reason) = &due[&r.fingerprint];
        assert_eq!(
            (&r.tenant_id, r.generation, r.reason.as_str()),
            (t, *g, *reason),
            "revocation of {}",
            r.fingerprint
        );
    }

    // Dead letters: the invalid requests, and `gone` only for requests of deleted tenants.
    let dls = dead.all();
    let mut gone = 0;
    let unexpected: Vec<String> = dls
        .iter()
        .filter(|d| {
            let id = message_id(d).unwrap_or_default();
            let kind = d.header("x-tt-error-kind");
            let expected = match kind.as_deref() {
                Some("invalid") => sent.invalid.contains(&id),
                Some("gone") => sent
                    .valid
                    .get(&id)
                    .is_some_and(|t| sent.deleted.contains_key(t)),
                _ => false,
            };
            if expected && kind.as_deref() == Some("gone") {
                gone += 1;
            }
            !expected
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
    let stored = stored_tokens.len();
    let rotations: usize = sent.rotations.values().map(Vec::len).sum();
    let most_rotations = sent.rotations.values().map(Vec::len).max().unwrap_or(0);

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
        "  ready events        {} ({} distinct, {} rotated)",
        a.events, a.distinct_events, rotated_events
    );
    println!(
        "  rotations           {rotations} requests for {} tenants (at most {most_rotations} for one), {} now, {} republished",
        sent.rotations.len(),
        sent.rotations_now,
        sent.rotations_republished
    );
    println!(
        "  deletions           {} tenants ({} deleted twice), {gone} requests gone",
        sent.deleted.len(),
        sent.deletions_repeated
    );
    println!(
        "  revocations         {} ({}), {} revoked events received",
        rev_by_id.len(),
        by_reason
            .iter()
            .map(|(r, n)| format!("{n} {r}"))
            .collect::<Vec<_>>()
            .join(", "),
        rev.len()
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
    println!(
        "  issuer revoke       {} requests, {} revoked, {} failed, {} unauthorized, {} rejected, {calls_repeated} tokens asked more than once",
        s.revoke_requests, s.revoked, s.revoke_failed, s.revoke_unauthorized, s.revoke_rejected
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
    assert_eq!(
        stored,
        sent.tenants.len() - sent.deleted.len(),
        "one stored token per tenant not deleted"
    );
    assert_eq!(
        s.issued,
        (sent.tenants.len() + rotations) as u64,
        "one new token per tenant and one per rotation, never more"
    );
    assert!(
        s.issued_per_container_max <= 1 + most_rotations as u64,
        "never more tokens for a container than 1 + its rotations (max {})",
        s.issued_per_container_max
    );
    assert_eq!(
        s.distinct_containers,
        sent.tenants.len() as u64,
        "one container per tenant"
    );
    assert_eq!(
        s.revoked,
        due.len() as u64,
        "the issuer revoked the due tokens"
    );

    stub.shutdown().await;
    env.cleanup().await;
}

/// A due revocation: tenant, generation, reason.
type Due = (String, u64, &'static str);

/// The correlation id of a ready event (the request's message id).
fn correlation_id(r: &Received) -> Option<String> {
    r.properties
        .correlation_id()
        .as_ref()
        .map(|c| c.to_string())
}

/// The message id of a dead letter (the request's).
fn message_id(r: &Received) -> Option<String> {
    r.properties.message_id().as_ref().map(|m| m.to_string())
}

/// A tenant's row, as far as the soak checks it.
#[derive(Debug)]
struct TenantRow {
    generation: u64,
    deleted: bool,
    /// A ciphertext is stored.
    sealed: bool,
    fingerprint: Option<String>,
}

/// Every tenant's row, by tenant id.
async fn tenant_rows(env: &TestEnv) -> HashMap<String, TenantRow> {
    let rows: Vec<(String, i32, bool, bool, Option<String>)> = sqlx::query_as(
        "SELECT tenant_id, generation, deleted_at IS NOT NULL, token_ciphertext IS NOT NULL,
                token_fingerprint
           FROM tenants",
    )
    .fetch_all(&mut env.db().await)
    .await
    .expect("tenant rows");
    rows.into_iter()
        .map(|(t, generation, deleted, sealed, fingerprint)| {
            (
                t,
                TenantRow {
                    generation: u64::try_from(generation).expect("generation"),
                    deleted,
                    sealed,
                    fingerprint,
                },
            )
        })
        .collect()
}

/// A row of the revocations table, as far as the soak checks it.
#[derive(Debug)]
struct RevocationRow {
    fingerprint: String,
    tenant_id: String,
    generation: u64,
    reason: String,
    revoked: bool,
    /// The ciphertext is gone.
    erased: bool,
}

/// Every row of the revocations table.
async fn revocation_rows(env: &TestEnv) -> Vec<RevocationRow> {
    let rows: Vec<(String, String, i32, String, bool, bool)> = sqlx::query_as(
        "SELECT token_fingerprint, tenant_id, generation, reason, revoked_at IS NOT NULL,
                token_ciphertext IS NULL
           FROM revocations",
    )
    .fetch_all(&mut env.db().await)
    .await
    .expect("revocation rows");
    rows.into_iter()
        .map(
            |(fingerprint, tenant_id, generation, reason, revoked, erased)| RevocationRow {
                fingerprint,
                tenant_id,
                generation: u64::try_from(generation).expect("generation"),
                reason,
                revoked,
                erased,
            },
        )
        .collect()
}
