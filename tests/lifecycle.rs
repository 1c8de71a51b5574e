//! The token lifecycle (contract §10) on the real RabbitMQ and Postgres with the stub issuer:
//! rotation with and without grace, redelivered and concurrent rotations, deletion and its
//! tombstone, and revocations that fail for a while (5xx) or open the breaker (401).
//!
//! Every test owns its vhost and database and waits on conditions with deadlines (never on a
//! sleep); the stub's list of revoked tokens says what was revoked, and how often.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde_json::{Value, json};
use support::{
    Collector, Producer, Received, TestEnv, WorkerHandle, eventually, stub_issuer, tenant,
};
use tenant_tokens::domain::RevokedEvent;
use tenant_tokens::tools::stub_issuer::{StubIssuer, StubMode};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const WAIT: Duration = Duration::from_secs(30);

/// An environment, the stub issuer, collectors of ready events, revoked events and dead
/// letters (bound before anything is published), one worker and a producer.
struct Setup {
    env: TestEnv,
    stub: StubIssuer,
    ready: Collector,
    revoked: Collector,
    dead: Collector,
    worker: WorkerHandle,
    producer: Producer,
}

impl Setup {
    async fn new(flags: &[&str]) -> Self {
        let env = TestEnv::new().await;
        let stub = stub_issuer(Duration::ZERO).await;
        let ready = Collector::ready_events(&env).await;
        let revoked = Collector::revoked_events(&env).await;
        let dead = Collector::dead_letters(&env).await;
        let worker = env.start_worker(&stub.url(), flags).await;
        let producer = Producer::new(&env).await;
        Self {
            env,
            stub,
            ready,
            revoked,
            dead,
            worker,
            producer,
        }
    }

    async fn finish(self) {
        self.worker.stop().await;
        self.stub.shutdown().await;
        self.env.cleanup().await;
    }

    /// Publishes `tenant.created` for `t` and returns its ready event.
    async fn create(&self, t: &str) -> Value {
        let id = format!("{t}-created");
        self.producer
            .request("tenant.created", json!({"tenant_id": t}), Some(&id))
            .await;
        self.ready_for(&id).await
    }

    /// Publishes a rotation of `t` with message id `id` and returns its ready event.
    async fn rotate(&self, t: &str, id: &str, body: Value) -> Value {
        let mut body = body;
        body["tenant_id"] = json!(t);
        self.producer
            .request("tenant.token.rotate", body, Some(id))
            .await;
        self.ready_for(id).await
    }

    /// The (first) ready event whose `correlation_id` is `id`.
    async fn ready_for(&self, id: &str) -> Value {
        let got = self
            .ready
            .wait_until(&format!("the ready event of {id}"), WAIT, |all| {
                all.iter().any(|r| r.json()["correlation_id"] == id)
            })
            .await;
        got.iter()
            .map(Received::json)
            .find(|e| e["correlation_id"] == id)
            .expect("ready event")
    }

    /// Waits for `n` revoked events of tenant `t` and returns them by generation.
    async fn revoked_events(&self, t: &str, n: usize) -> Vec<(Received, Value)> {
        let got = self
            .revoked
            .wait_until(&format!("{n} revoked events of {t}"), WAIT, |all| {
                of_tenant(all, t).len() >= n
            })
            .await;
        let mut v = of_tenant(&got, t);
        v.sort_by_key(|(_, e)| e["generation"].as_u64());
        v
    }

    /// Waits for a dead letter with message id `id`.
    async fn dead_letter(&self, id: &str) -> Received {
        let got = self
            .dead
            .wait_until(&format!("the dead letter of {id}"), WAIT, |all| {
                all.iter().any(|r| message_id(r).as_deref() == Some(id))
            })
            .await;
        got.into_iter()
            .find(|r| message_id(r).as_deref() == Some(id))
            .expect("dead letter")
    }
}

/// The messages of `all` whose body names tenant `t`, with their JSON.
fn of_tenant(all: &[Received], t: &str) -> Vec<(Received, Value)> {
    all.iter()
        .map(|r| (r.clone(), r.json()))
        .filter(|(_, e)| e["tenant_id"] == t)
        .collect()
}

fn message_id(r: &Received) -> Option<String> {
    r.properties.message_id().as_ref().map(|m| m.to_string())
}

fn correlation_id(r: &Received) -> Option<String> {
    r.properties
        .correlation_id()
        .as_ref()
        .map(|m| m.to_string())
}

fn instant(v: &Value) -> OffsetDateTime {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("an RFC 3339 string, got {v}"));
    OffsetDateTime::parse(s, &Rfc3339).unwrap_or_else(|e| panic!("RFC 3339 {s:?}: {e}"))
}

fn fingerprint(e: &Value) -> String {
    e["token_fingerprint"]
        .as_str()
        .expect("token_fingerprint")
        .to_owned()
}

/// Checks the promises every revoked event keeps, whatever its reason: a deterministic
/// UUID v5 id (also the AMQP `message_id`), the tenant, container, fingerprint, generation
/// and reason of the token, and the message that made it due as `correlation_id`.
fn assert_revoked_event(
    r: &Received,
    ev: &Value,
    expect: (&Value, &str, &str), // (the token's ready event, reason, correlation id)
) {
    let (ready, reason, correlation) = expect;
    let fp = fingerprint(ready);
    assert_eq!(ev["token_fingerprint"], fp.as_str(), "{ev}");
    assert_eq!(ev["tenant_id"], ready["tenant_id"], "{ev}");
    assert_eq!(ev["container"], ready["container"], "{ev}");
    assert_eq!(ev["generation"], ready["generation"], "{ev}");
    assert_eq!(ev["reason"], reason, "{ev}");
    assert_eq!(ev["correlation_id"], correlation, "{ev}");
    let id = ev["event_id"].as_str().expect("event_id");
    let uuid = uuid::Uuid::parse_str(id).expect("event_id is a UUID");
    assert_eq!(uuid.get_version_num(), 5, "event_id is a UUID v5");
    assert_eq!(
        uuid,
        RevokedEvent::event_id_for(&fp),
        "event_id derives from the fingerprint"
    );
    assert_eq!(
        message_id(r).as_deref(),
        Some(id),
        "AMQP message_id = event_id"
    );
    assert_eq!(correlation_id(r).as_deref(), Some(correlation));
    assert_eq!(r.properties.delivery_mode(), &Some(2), "persistent");
    instant(&ev["revoked_at"]);
}

/// Whether tenant `t` is a tombstone.
async fn deleted_at(env: &TestEnv, t: &str) -> bool {
    sqlx::query_scalar::<_, Option<OffsetDateTime>>(
        "SELECT deleted_at FROM tenants WHERE tenant_id = $1",
    )
    .bind(t)
    .fetch_optional(&mut env.db().await)
    .await
    .expect("query")
    .flatten()
    .is_some()
}

/// The stub's revoked tokens: fingerprint → revoke calls.
fn stub_revoked(stub: &StubIssuer) -> HashMap<String, u64> {
    stub.revoked()
        .into_iter()
        .map(|r| (r.fingerprint, r.revoke_calls))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_issues_the_next_generation_and_revokes_the_old_token_only_after_the_grace() {
    let s = Setup::new(&["--rotation-grace", "2s"]).await;
    let t = tenant("rot");

    let first = s.create(&t).await;
    assert_eq!(first["generation"], 1, "{first}");
    assert_eq!(first["rotated"], false, "{first}");
    assert_eq!(first["newly_issued"], true, "{first}");

    let rotate_id = format!("{t}-rotate");
    let second = s
        .rotate(&t, &rotate_id, json!({"reason": "leaked in a log"}))
        .await;
    assert_eq!(second["newly_issued"], true, "{second}");
    assert_eq!(second["rotated"], true, "{second}");
    assert_eq!(second["generation"], 2, "{second}");
    assert_eq!(second["trigger"], "tenant.token.rotate", "{second}");
    assert_eq!(second["container"], first["container"], "same container");
    assert_ne!(fingerprint(&second), fingerprint(&first), "a new token");
    // Within the grace the old token still works.
    assert!(
        s.stub.revoked().is_empty(),
        "nothing revoked within the grace: {:?}",
        s.stub.revoked()
    );
    assert!(
        s.revoked.all().is_empty(),
        "no revoked event within the grace"
    );

    let got = s.revoked_events(&t, 1).await;
    let (r, ev) = &got[0];
    assert_revoked_event(r, ev, (&first, "rotated", &rotate_id));
    let waited = instant(&ev["revoked_at"]) - instant(&second["issued_at"]);
    assert!(
        waited >= time::Duration::milliseconds(1500),
        "revoked {waited} after the new token was stored; the grace is 2 s"
    );

    let revoked = s.stub.revoked();
    assert_eq!(revoked.len(), 1, "exactly the old token: {revoked:?}");
    assert_eq!(revoked[0].fingerprint, fingerprint(&first));
    assert_eq!(revoked[0].revoke_calls, 1, "revoked once");
    assert_eq!(
        ev["jti"],
        revoked[0].jti.as_str(),
        "the event names the jti"
    );
    assert_eq!(s.stub.stats().issued, 2);
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_with_now_revokes_the_old_token_at_once() {
    let s = Setup::new(&["--rotation-grace", "1h"]).await;
    let t = tenant("rotnow");

    let first = s.create(&t).await;
    let rotate_id = format!("{t}-rotate-now");
    let second = s
        .rotate(
            &t,
            &rotate_id,
            json!({"reason": "compromised", "now": true}),
        )
        .await;
    assert_eq!(second["generation"], 2, "{second}");
    assert_eq!(second["rotated"], true, "{second}");

    // Within the usual wait, far inside the hour of grace.
    let got = s.revoked_events(&t, 1).await;
    let (r, ev) = &got[0];
    assert_revoked_event(r, ev, (&first, "rotated", &rotate_id));

    let revoked = stub_revoked(&s.stub);
    assert_eq!(
        revoked,
        HashMap::from([(fingerprint(&first), 1)]),
        "only the old token, once"
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivered_rotate_request_yields_the_same_event_and_rotates_nothing_more() {
    let s = Setup::new(&["--rotation-grace", "1h"]).await;
    let t = tenant("rotdup");

    s.create(&t).await;
    let rotate_id = format!("{t}-rotate");
    for _ in 0..2 {
        s.producer
            .request(
                "tenant.token.rotate",
                json!({"tenant_id": t}),
                Some(&rotate_id),
            )
            .await;
    }
    let got = s
        .ready
        .wait_until("two events of the rotate request", WAIT, |all| {
            all.iter()
                .filter(|r| r.json()["correlation_id"] == rotate_id.as_str())
                .count()
                >= 2
        })
        .await;
    let events: Vec<(Received, Value)> = got
        .into_iter()
        .map(|r| {
            let v = r.json();
            (r, v)
        })
        .filter(|(_, e)| e["correlation_id"] == rotate_id.as_str())
        .collect();
    assert_eq!(events.len(), 2, "one event per delivery");
    let (a, b) = (&events[0].1, &events[1].1);
    assert_eq!(a, b, "the same event both times");
    assert_eq!(a["generation"], 2, "{a}");
    assert_eq!(a["newly_issued"], true, "{a}");
    assert_eq!(a["rotated"], true, "{a}");
    assert_eq!(message_id(&events[0].0), message_id(&events[1].0));

    let mut db = s.env.db().await;
    let generation: i32 = sqlx::query_scalar("SELECT generation FROM tenants WHERE tenant_id = $1")
        .bind(&t)
        .fetch_one(&mut db)
        .await
        .expect("tenant row");
    assert_eq!(generation, 2, "rotated once");
    let stats = s.stub.stats();
    assert_eq!(stats.issued, 2, "two tokens minted, ever: {stats:?}");
    let superseded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM revocations WHERE tenant_id = $1")
            .bind(&t)
            .fetch_one(&mut db)
            .await
            .expect("revocations");
    assert_eq!(superseded, 1, "one superseded token");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_rotations_on_two_workers_yield_consecutive_generations_and_one_current_token() {
    let s = Setup::new(&["--rotation-grace", "1h"]).await;
    let other = s
        .env
        .start_worker(&s.stub.url(), &["--rotation-grace", "1h"])
        .await;
    let t = tenant("rotpar");
    // Slow issue calls hold a rotation's row lock long enough for the other worker to queue
    // behind it.
    s.stub.set_latency(Duration::from_millis(100));

    let first = s.create(&t).await;
    let ids: Vec<String> = (0..5).map(|i| format!("{t}-rotate-{i}")).collect();
    s.producer
        .requests(
            ids.iter()
                .map(|id| {
                    (
                        "tenant.token.rotate".to_owned(),
                        json!({"tenant_id": t, "reason": "drill"}),
                        id.clone(),
                    )
                })
                .collect(),
        )
        .await;
    let got = s
        .ready
        .wait_until("ready events of the 5 rotations", WAIT, |all| {
            let seen: BTreeSet<String> = all
                .iter()
                .filter_map(|r| r.json()["correlation_id"].as_str().map(str::to_owned))
                .collect();
            ids.iter().all(|id| seen.contains(id))
        })
        .await;
    let rotations: Vec<Value> = got
        .iter()
        .map(Received::json)
        .filter(|e| e["trigger"] == "tenant.token.rotate")
        .collect();
    assert_eq!(rotations.len(), 5, "one event per rotation: {rotations:?}");
    let mut generations: Vec<u64> = rotations
        .iter()
        .map(|e| e["generation"].as_u64().expect("generation"))
        .collect();
    generations.sort_unstable();
    assert_eq!(generations, vec![2, 3, 4, 5, 6], "each generation once");
    assert!(
        rotations
            .iter()
            .all(|e| e["newly_issued"] == true && e["rotated"] == true),
        "{rotations:?}"
    );
    let mut by_generation: HashMap<u64, String> = rotations
        .iter()
        .map(|e| (e["generation"].as_u64().unwrap_or(0), fingerprint(e)))
        .collect();
    by_generation.insert(1, fingerprint(&first));
    let distinct: BTreeSet<&String> = by_generation.values().collect();
    assert_eq!(distinct.len(), 6, "six different tokens");

    let mut db = s.env.db().await;
    let rows: Vec<(i32, Option<String>)> =
        sqlx::query_as("SELECT generation, token_fingerprint FROM tenants WHERE tenant_id = $1")
            .bind(&t)
            .fetch_all(&mut db)
            .await
            .expect("tenant rows");
    assert_eq!(rows.len(), 1, "one row, one current token");
    assert_eq!(rows[0].0, 6, "generation 6 is current");
    assert_eq!(rows[0].1.as_deref(), Some(by_generation[&6].as_str()));
    let superseded: Vec<(i32, String, String)> = sqlx::query_as(
        "SELECT generation, token_fingerprint, reason FROM revocations
          WHERE tenant_id = $1 ORDER BY generation",
    )
    .bind(&t)
    .fetch_all(&mut db)
    .await
    .expect("revocations");
    assert_eq!(
        superseded.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5],
        "every superseded generation queued once"
    );
    for (generation, fp, reason) in &superseded {
        assert_eq!(reason, "rotated");
        assert_eq!(
            Some(fp),
            by_generation.get(&u64::try_from(*generation).unwrap_or(0)),
            "generation {generation}'s token"
        );
    }
    assert_eq!(s.stub.stats().issued, 6, "six tokens minted, no more");
    other.stop().await;
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_revokes_the_current_and_superseded_tokens_and_keeps_a_tombstone() {
    let s = Setup::new(&["--rotation-grace", "1h"]).await;
    let t = tenant("del");

    let first = s.create(&t).await;
    let second = s.rotate(&t, &format!("{t}-rotate"), json!({})).await;
    assert_eq!(second["generation"], 2);
    let delete_id = format!("{t}-deleted");
    s.producer
        .request("tenant.deleted", json!({"tenant_id": t}), Some(&delete_id))
        .await;

    let got = s.revoked_events(&t, 2).await;
    assert_eq!(got.len(), 2, "one event per token");
    assert_revoked_event(&got[0].0, &got[0].1, (&first, "deleted", &delete_id));
    assert_revoked_event(&got[1].0, &got[1].1, (&second, "deleted", &delete_id));
    let expected = HashMap::from([(fingerprint(&first), 1), (fingerprint(&second), 1)]);
    assert_eq!(stub_revoked(&s.stub), expected, "both tokens, once each");

    // The tombstone: no token left, ciphertexts erased everywhere.
    let mut db = s.env.db().await;
    let (deleted_at, ciphertext, fp): (Option<OffsetDateTime>, Option<Vec<u8>>, Option<String>) =
        sqlx::query_as(
            "SELECT deleted_at, token_ciphertext, token_fingerprint FROM tenants
              WHERE tenant_id = $1",
        )
        .bind(&t)
        .fetch_one(&mut db)
        .await
        .expect("tombstone");
    assert!(deleted_at.is_some(), "deleted_at set");
    assert!(ciphertext.is_none(), "no ciphertext in the tombstone");
    assert!(fp.is_none(), "no current token in the tombstone");
    let (rows, sealed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(token_ciphertext) FROM revocations WHERE tenant_id = $1",
    )
    .bind(&t)
    .fetch_one(&mut db)
    .await
    .expect("revocations");
    assert_eq!(
        (rows, sealed),
        (2, 0),
        "two revocations, no ciphertext kept"
    );

    // Later requests for the tenant are gone.
    for key in [
        "tenant.created",
        "extension.requested",
        "tenant.token.rotate",
    ] {
        let id = format!("{t}-late-{key}");
        s.producer
            .request(key, json!({"tenant_id": t}), Some(&id))
            .await;
        let d = s.dead_letter(&id).await;
        assert_eq!(
            d.header("x-tt-error-kind").as_deref(),
            Some("gone"),
            "{key}"
        );
        let error = d.header("x-tt-error").unwrap_or_default();
        assert!(error.contains("deleted"), "{key}: {error}");
        assert_eq!(d.header("x-tt-original-routing-key").as_deref(), Some(key));
    }

    // A repeated deletion changes nothing and publishes nothing new; a request for another
    // tenant published after it, once answered, shows it was handled.
    s.producer
        .request(
            "tenant.deleted",
            json!({"tenant_id": t}),
            Some(&format!("{t}-deleted-again")),
        )
        .await;
    s.create(&tenant("after")).await;
    assert_eq!(s.revoked.all().len(), 2, "no new revoked event");
    assert_eq!(stub_revoked(&s.stub), expected, "nothing revoked again");
    assert_eq!(
        s.dead.all().len(),
        3,
        "the repeated deletion is not dead-lettered"
    );
    let again: Option<OffsetDateTime> =
        sqlx::query_scalar("SELECT deleted_at FROM tenants WHERE tenant_id = $1")
            .bind(&t)
            .fetch_one(&mut db)
            .await
            .expect("tombstone");
    assert_eq!(again, deleted_at, "the tombstone is unchanged");
    assert_eq!(
        s.stub.stats().issued,
        3,
        "no token for the deleted tenant since"
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_that_arrives_before_the_tenant_was_seen_still_tombstones_it() {
    let s = Setup::new(&[]).await;
    let t = tenant("early");

    s.producer
        .request(
            "tenant.deleted",
            json!({"tenant_id": t}),
            Some(&format!("{t}-deleted")),
        )
        .await;
    eventually("the tombstone", WAIT, || deleted_at(&s.env, &t)).await;

    let created_id = format!("{t}-created");
    s.producer
        .request("tenant.created", json!({"tenant_id": t}), Some(&created_id))
        .await;
    let d = s.dead_letter(&created_id).await;
    assert_eq!(d.header("x-tt-error-kind").as_deref(), Some("gone"));
    assert!(
        d.header("x-tt-error")
            .unwrap_or_default()
            .contains("deleted")
    );

    let stats = s.stub.stats();
    assert_eq!(
        stats.requests, 0,
        "no issue call for a deleted tenant: {stats:?}"
    );
    assert!(s.ready.all().is_empty(), "no ready event");
    assert!(s.revoked.all().is_empty(), "nothing to revoke");
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_failing_with_5xx_is_retried_until_it_heals_and_revoked_once() {
    let s = Setup::new(&[]).await;
    s.stub.set_revoke_mode(StubMode::FailAll(503));
    let t = tenant("revfail");

    let first = s.create(&t).await;
    let delete_id = format!("{t}-deleted");
    s.producer
        .request("tenant.deleted", json!({"tenant_id": t}), Some(&delete_id))
        .await;

    eventually("two failed revoke attempts on record", WAIT, || async {
        let row: Option<(i32, Option<String>)> =
            sqlx::query_as("SELECT attempts, last_error FROM revocations WHERE tenant_id = $1")
                .bind(&t)
                .fetch_optional(&mut s.env.db().await)
                .await
                .expect("query");
        row.is_some_and(|(attempts, error)| attempts >= 2 && error.is_some())
    })
    .await;
    assert!(s.stub.revoked().is_empty(), "not revoked while failing");
    assert!(s.revoked.all().is_empty(), "no revoked event while failing");
    assert!(s.stub.stats().revoke_failed >= 2);

    s.stub.set_revoke_mode(StubMode::Normal);
    let got = s.revoked_events(&t, 1).await;
    assert_revoked_event(&got[0].0, &got[0].1, (&first, "deleted", &delete_id));
    assert_eq!(
        stub_revoked(&s.stub),
        HashMap::from([(fingerprint(&first), 1)]),
        "revoked once"
    );
    let mut db = s.env.db().await;
    let (revoked_at, error): (Option<OffsetDateTime>, Option<String>) =
        sqlx::query_as("SELECT revoked_at, last_error FROM revocations WHERE tenant_id = $1")
            .bind(&t)
            .fetch_one(&mut db)
            .await
            .expect("revocation");
    assert!(revoked_at.is_some());
    assert!(error.is_none(), "the error is cleared once revoked");
    assert!(
        s.dead.all().is_empty(),
        "a revocation is never dead-lettered"
    );
    s.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_401_on_a_revoke_call_opens_the_breaker_until_the_issuer_accepts_again() {
    let s = Setup::new(&[]).await;
    s.stub.set_revoke_mode(StubMode::Unauthorized);
    let t = tenant("rev401");

    let first = s.create(&t).await;
    let delete_id = format!("{t}-deleted");
    s.producer
        .request("tenant.deleted", json!({"tenant_id": t}), Some(&delete_id))
        .await;

    let health = s.worker.health.clone();
    eventually("the worker not ready for the breaker", WAIT, || {
        let reasons = health.not_ready_reasons();
        async move { reasons.iter().any(|r| r.contains("breaker")) }
    })
    .await;
    assert!(s.stub.revoked().is_empty());
    assert!(s.stub.stats().revoke_unauthorized >= 1);

    s.stub.set_revoke_mode(StubMode::Normal);
    let got = s.revoked_events(&t, 1).await;
    assert_revoked_event(&got[0].0, &got[0].1, (&first, "deleted", &delete_id));
    assert_eq!(
        stub_revoked(&s.stub),
        HashMap::from([(fingerprint(&first), 1)]),
        "revoked once"
    );
    eventually("the worker ready again", WAIT, || {
        let ready = health.not_ready_reasons().is_empty();
        async move { ready }
    })
    .await;
    // And consuming again.
    s.create(&tenant("resumed")).await;
    assert!(
        s.dead.all().is_empty(),
        "nothing dead-lettered for a refused master token"
    );
    s.finish().await;
}

/// A `tenant.created` queued right behind the `tenant.deleted` of a tenant never seen before
/// must not resurrect it: a batch is handled in queue order, and with one batch slot so are
/// consecutive batches. (With several slots, batches run concurrently like competing
/// consumers, and the one that locks the tenant's row first wins; a token issued that way is
/// revoked by the deletion.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_creation_queued_right_behind_a_deletion_cannot_resurrect_the_tenant() {
    let s = Setup::new(&["--db-pool-size", "1"]).await;
    let ts: Vec<String> = (0..5).map(|i| tenant(&format!("behind{i}"))).collect();
    let mut items = Vec::new();
    for t in &ts {
        items.push((
            "tenant.deleted".to_owned(),
            json!({"tenant_id": t}),
            format!("{t}-d"),
        ));
        items.push((
            "tenant.created".to_owned(),
            json!({"tenant_id": t}),
            format!("{t}-c"),
        ));
    }
    s.producer.requests(items).await;
    s.dead
        .wait_until("an answer to every creation", WAIT, |all| {
            all.len() + s.ready.all().len() >= ts.len()
        })
        .await;
    let resurrected: Vec<Value> = s.ready.all().iter().map(Received::json).collect();
    assert!(
        resurrected.is_empty(),
        "tokens issued for deleted tenants: {resurrected:?}"
    );
    for t in &ts {
        let d = s.dead_letter(&format!("{t}-c")).await;
        assert_eq!(d.header("x-tt-error-kind").as_deref(), Some("gone"));
    }
    assert_eq!(
        s.stub.stats().requests,
        0,
        "no issue call for a deleted tenant"
    );
    s.finish().await;
}
