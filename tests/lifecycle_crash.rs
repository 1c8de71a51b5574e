//! The token lifecycle under SIGKILL (contract §10): a worker killed between the issue of a
//! new generation and its commit, between a revoke call and its record, and between the issue
//! of a first token and its store against an issuer that ignores the `Idempotency-Key`.
//!
//! Each test holds a child worker at a precise statement with a trigger that sleeps in the
//! test's own database, waits until the worker is there (the stub saw the call, a backend is
//! in `pg_sleep`), kills it with SIGKILL, ends its Postgres sessions and drops the trigger,
//! then starts a new worker and checks what the promises say the end state is. Conditions
//! are waited on with deadlines; no sleep is used to synchronise.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use serde_json::json;
use support::{
    ChildWorker, Collector, MASTER_TOKEN, Producer, TestEnv, eventually, stub_issuer, tenant,
};
use tenant_tokens::tools::stub_issuer::{StubConfig, StubIssuer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

const WAIT: Duration = Duration::from_secs(30);

/// Makes every `UPDATE OF column` on `table` sleep for two minutes, so the worker that runs
/// it stays there (its transaction open, its row locks held) until it is killed.
async fn hold_updates(env: &TestEnv, table: &str, column: &str) {
    let mut db = env.db().await;
    sqlx::query(
        "CREATE FUNCTION hold_here() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN PERFORM pg_sleep(120); RETURN NEW; END $$",
    )
    .execute(&mut db)
    .await
    .expect("hold function");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TRIGGER hold_here BEFORE UPDATE OF {column} ON {table}
         FOR EACH ROW EXECUTE FUNCTION hold_here()"
    )))
    .execute(&mut db)
    .await
    .expect("hold trigger");
}

/// Whether a session of the test's database sleeps in the trigger.
async fn held(env: &TestEnv) -> bool {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND wait_event = 'PgSleep'",
    )
    .fetch_one(&mut env.db().await)
    .await
    .expect("pg_stat_activity");
    n > 0
}

/// SIGKILLs the worker, ends its Postgres sessions (a dead client's backend would sleep on in
/// the trigger, holding its locks), then drops the trigger on `table`.
async fn kill_and_release(env: &TestEnv, worker: &mut ChildWorker, table: &str) {
    worker.kill();
    let mut db = env.db().await;
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .execute(&mut db)
    .await
    .expect("end the dead worker's sessions");
    // Waits for the lock the terminated backends held until they are gone.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP TRIGGER hold_here ON {table}"
    )))
    .execute(&mut db)
    .await
    .expect("drop the hold trigger");
    sqlx::query("DROP FUNCTION hold_here()")
        .execute(&mut db)
        .await
        .expect("drop the hold function");
}

/// The tenant's row: (current fingerprint, generation, issued_at).
async fn tenant_row(
    env: &TestEnv,
    t: &str,
) -> Option<(Option<String>, i32, Option<OffsetDateTime>)> {
    sqlx::query_as(
        "SELECT token_fingerprint, generation, issued_at FROM tenants WHERE tenant_id = $1",
    )
    .bind(t)
    .fetch_optional(&mut env.db().await)
    .await
    .expect("tenant row")
}

/// One row of `revocations`.
#[derive(Debug, sqlx::FromRow)]
struct Revocation {
    token_fingerprint: String,
    generation: i32,
    reason: String,
    due_at: OffsetDateTime,
    revoked_at: Option<OffsetDateTime>,
    event_published_at: Option<OffsetDateTime>,
    sealed: bool,
    correlation_id: Option<String>,
}

/// The tenant's revocations, oldest generation first.
async fn revocations(env: &TestEnv, t: &str) -> Vec<Revocation> {
    sqlx::query_as(
        "SELECT token_fingerprint, generation, reason, due_at, revoked_at, event_published_at,
                token_ciphertext IS NOT NULL AS sealed, correlation_id
           FROM revocations WHERE tenant_id = $1 ORDER BY generation, created_at",
    )
    .bind(t)
    .fetch_all(&mut env.db().await)
    .await
    .expect("revocations")
}

/// The tenant's journal of issued tokens: (fingerprint, generation, still sealed).
async fn journal(env: &TestEnv, t: &str) -> Vec<(String, i32, bool)> {
    sqlx::query_as(
        "SELECT token_fingerprint, generation, token_ciphertext IS NOT NULL
           FROM issued_tokens WHERE tenant_id = $1 ORDER BY id",
    )
    .bind(t)
    .fetch_all(&mut env.db().await)
    .await
    .expect("journal")
}

/// Whether the token's revocation is recorded and its event confirmed.
async fn revoked_and_published(env: &TestEnv, t: &str, fingerprint: &str) -> bool {
    revocations(env, t).await.iter().any(|r| {
        r.token_fingerprint == fingerprint
            && r.revoked_at.is_some()
            && r.event_published_at.is_some()
    })
}

/// The ready events received for tenant `t`.
fn ready_for(events: &Collector, t: &str) -> Vec<serde_json::Value> {
    events.by_tenant().remove(t).unwrap_or_default()
}

/// The revoked events received for the token with this fingerprint.
fn revoked_for(revoked: &Collector, fingerprint: &str) -> Vec<serde_json::Value> {
    revoked
        .all()
        .iter()
        .map(support::Received::json)
        .filter(|v| v["token_fingerprint"] == fingerprint)
        .collect()
}

fn parse_time(v: &serde_json::Value) -> OffsetDateTime {
    OffsetDateTime::parse(v.as_str().expect("a timestamp"), &Rfc3339).expect("RFC 3339")
}

/// Provisions `t` (generation 1) and returns its fingerprint.
async fn create(producer: &Producer, events: &Collector, t: &str) -> String {
    producer
        .request(
            "tenant.created",
            json!({"tenant_id": t}),
            Some(&format!("{t}-created")),
        )
        .await;
    let all = events
        .wait_until("the first token's ready event", WAIT, |all| {
            all.iter().any(|r| r.json()["tenant_id"] == t)
        })
        .await;
    let ev = all
        .iter()
        .map(support::Received::json)
        .find(|v| v["tenant_id"] == t)
        .expect("ready event");
    assert_eq!(ev["generation"], 1, "{ev}");
    assert_eq!(ev["rotated"], false, "{ev}");
    ev["token_fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_killed_before_its_commit_reissues_the_same_generation_once() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let events = Collector::ready_events(&env).await;
    let revoked = Collector::revoked_events(&env).await;
    let producer = Producer::new(&env).await;
    let conf = [("ROTATION_GRACE", "1s")];
    let mut first = env.spawn_worker(&stub.url(), &conf);
    first.wait_ready(WAIT).await;
    let t = tenant("rotkill");
    let gen1 = create(&producer, &events, &t).await;

    // Hold the rotation at its storing statement: generation 2 issued and journaled, not
    // committed.
    hold_updates(&env, "tenants", "generation").await;
    producer
        .request(
            "tenant.token.rotate",
            json!({"tenant_id": t}),
            Some(&format!("{t}-rotate")),
        )
        .await;
    eventually(
        "generation 2 issued and the rotation held before its commit",
        WAIT,
        || async { stub.stats().issued >= 2 && held(&env).await },
    )
    .await;
    let journaled: Vec<String> = journal(&env, &t)
        .await
        .into_iter()
        .filter(|(_, g, _)| *g == 2)
        .map(|(fp, _, _)| fp)
        .collect();
    assert_eq!(
        journaled.len(),
        1,
        "generation 2 journaled once: {journaled:?}"
    );
    let gen2 = journaled[0].clone();
    assert_ne!(gen2, gen1);
    kill_and_release(&env, &mut first, "tenants").await;

    let row = tenant_row(&env, &t).await.expect("tenant row");
    assert_eq!(
        (row.0.as_deref(), row.1),
        (Some(gen1.as_str()), 1),
        "the killed rotation committed nothing"
    );
    assert!(
        ready_for(&events, &t).iter().all(|e| e["generation"] == 1),
        "no generation 2 event before the restart"
    );
    assert_eq!(stub.stats().replayed, 0);

    let mut second = env.spawn_worker(&stub.url(), &conf);
    second.wait_ready(WAIT).await;
    let rotated_event = events
        .wait_until("the rotation's ready event", WAIT, |all| {
            all.iter()
                .any(|r| r.json()["tenant_id"] == t.as_str() && r.json()["generation"] == 2)
        })
        .await
        .iter()
        .map(support::Received::json)
        .find(|v| v["tenant_id"] == t.as_str() && v["generation"] == 2)
        .expect("generation 2 event");
    let s = stub.stats();
    assert!(
        s.replayed >= 1,
        "the redelivered rotation asked with the same Idempotency-Key: {s:?}"
    );
    assert_eq!(s.issued, 2, "no third token minted: {s:?}");
    assert_eq!(
        rotated_event["token_fingerprint"], gen2,
        "the replayed token is the one issued before the kill: {rotated_event}"
    );

    // Generation 1 is revoked once, after the grace.
    eventually("generation 1 revoked and its event out", WAIT, || async {
        stub.revoked().iter().any(|r| r.fingerprint == gen1)
            && revoked_and_published(&env, &t, &gen1).await
            && !revoked_for(&revoked, &gen1).is_empty()
    })
    .await;
    second.stop().await;

    // Exactly one current token, generation 2.
    let (fp, generation, issued_at) = tenant_row(&env, &t).await.expect("tenant row");
    assert_eq!(fp.as_deref(), Some(gen2.as_str()));
    assert_eq!(generation, 2);
    let issued_at = issued_at.expect("stored");
    let stored = env.stored_tokens().await;
    assert_eq!(stored.get(&t), Some(&gen2));

    // Exactly one newly issued rotation event for generation 2; every copy the same token.
    let evs = ready_for(&events, &t);
    let rotations: HashSet<&str> = evs
        .iter()
        .filter(|e| e["newly_issued"] == true && e["rotated"] == true && e["generation"] == 2)
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(rotations.len(), 1, "one rotation event: {evs:?}");
    for e in evs.iter().filter(|e| e["generation"] == 2) {
        assert_eq!(e["token_fingerprint"], gen2, "{e}");
        assert_eq!(e["rotated"], true, "{e}");
    }
    let gen2_ids: HashSet<&str> = evs
        .iter()
        .filter(|e| e["generation"] != 1)
        .filter_map(|e| e["event_id"].as_str())
        .collect();
    assert_eq!(
        gen2_ids, rotations,
        "no other event beyond generation 1: {evs:?}"
    );

    // Generation 1 revoked once, after the grace; nothing else revoked.
    let list = stub.revoked();
    assert_eq!(list.len(), 1, "only generation 1 was revoked: {list:?}");
    assert_eq!(list[0].fingerprint, gen1);
    assert_eq!(list[0].revoke_calls, 1, "{list:?}");
    assert!(
        list[0].revoked_at - issued_at >= time::Duration::seconds(1),
        "revoked after the grace: stored {issued_at}, revoked {}",
        list[0].revoked_at
    );
    let revs = revocations(&env, &t).await;
    assert_eq!(revs.len(), 1, "{revs:?}");
    let r = &revs[0];
    assert_eq!(
        (
            r.token_fingerprint.as_str(),
            r.generation,
            r.reason.as_str()
        ),
        (gen1.as_str(), 1, "rotated")
    );
    assert_eq!(
        r.due_at - issued_at,
        time::Duration::seconds(1),
        "due one grace after the rotation"
    );
    assert!(r.revoked_at.is_some_and(|at| at >= r.due_at), "{r:?}");
    assert!(!r.sealed, "ciphertext erased once revoked");
    let rev_events = revoked.all();
    assert_eq!(rev_events.len(), 1, "one revoked event");
    let rev = rev_events[0].json();
    assert_eq!(rev["token_fingerprint"], gen1);
    assert_eq!(rev["reason"], "rotated");
    assert_eq!(rev["generation"], 1);

    // The journal: two tokens (generation 2 journaled twice, the same token), none sealed.
    let j = journal(&env, &t).await;
    let distinct: HashSet<&str> = j.iter().map(|(fp, _, _)| fp.as_str()).collect();
    assert_eq!(
        distinct,
        HashSet::from([gen1.as_str(), gen2.as_str()]),
        "{j:?}"
    );
    assert!(
        j.iter().all(|(_, _, sealed)| !sealed),
        "no journal copy left: {j:?}"
    );

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_killed_before_its_record_is_retried_and_counted_once() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let events = Collector::ready_events(&env).await;
    let revoked = Collector::revoked_events(&env).await;
    let producer = Producer::new(&env).await;
    let mut first = env.spawn_worker(&stub.url(), &[]);
    first.wait_ready(WAIT).await;
    let t = tenant("revkill");
    let fp = create(&producer, &events, &t).await;

    // Hold the revoker at its record: the issuer has revoked the token, Postgres does not
    // know yet.
    hold_updates(&env, "revocations", "revoked_at").await;
    let deletion = format!("{t}-deleted");
    producer
        .request("tenant.deleted", json!({"tenant_id": t}), Some(&deletion))
        .await;
    eventually("the revoke call made and its record held", WAIT, || async {
        stub.revoked().iter().any(|r| r.fingerprint == fp) && held(&env).await
    })
    .await;
    kill_and_release(&env, &mut first, "revocations").await;

    let revs = revocations(&env, &t).await;
    assert_eq!(revs.len(), 1, "{revs:?}");
    assert!(
        revs[0].revoked_at.is_none() && revs[0].sealed,
        "the killed record committed nothing: {revs:?}"
    );
    assert!(
        revoked.all().is_empty(),
        "no revoked event before the record"
    );

    let mut second = env.spawn_worker(&stub.url(), &[]);
    second.wait_ready(WAIT).await;
    eventually(
        "the revocation retried, recorded and published",
        WAIT,
        || async {
            revoked_and_published(&env, &t, &fp).await && !revoked_for(&revoked, &fp).is_empty()
        },
    )
    .await;
    second.stop().await;

    let list = stub.revoked();
    assert_eq!(list.len(), 1, "the stub lists the token once: {list:?}");
    assert_eq!(list[0].fingerprint, fp);
    assert_eq!(
        list[0].revoke_calls, 2,
        "the call before the kill and its retry: {list:?}"
    );
    let s = stub.stats();
    assert_eq!(s.revoked, 1, "{s:?}");
    assert!(
        s.revoke_rejected >= 1,
        "the retry was answered `already revoked`: {s:?}"
    );

    let revs = revocations(&env, &t).await;
    assert_eq!(revs.len(), 1, "{revs:?}");
    let r = &revs[0];
    assert_eq!(r.reason, "deleted");
    assert!(r.revoked_at.is_some() && !r.sealed, "{r:?}");
    assert_eq!(r.correlation_id.as_deref(), Some(deletion.as_str()));

    let evs = revoked_for(&revoked, &fp);
    assert_eq!(evs.len(), 1, "one revoked event for the token: {evs:?}");
    assert_eq!(revoked.all().len(), 1, "and none for anything else");
    let ev = &evs[0];
    assert_eq!(ev["tenant_id"], t.as_str());
    assert_eq!(ev["reason"], "deleted");
    assert_eq!(ev["generation"], 1);
    assert_eq!(ev["correlation_id"], deletion.as_str());
    let db_at = r.revoked_at.expect("revoked");
    assert!(
        (parse_time(&ev["revoked_at"]) - db_at).abs() < time::Duration::seconds(1),
        "the event's revoked_at is the recorded one: {ev} vs {db_at}"
    );

    // The tenant is a tombstone.
    let (fp_now, _, issued_at) = tenant_row(&env, &t).await.expect("tombstone row");
    assert!(fp_now.is_none() && issued_at.is_none(), "no token left");

    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphan_of_a_killed_worker_is_revoked_after_the_orphan_grace() {
    let env = TestEnv::new().await;
    let mut cfg = StubConfig::new(secrecy::SecretString::from(MASTER_TOKEN.to_owned()));
    cfg.honour_idempotency = false;
    let stub = StubIssuer::start("127.0.0.1:0".parse().expect("address"), cfg)
        .await
        .expect("stub issuer");
    let events = Collector::ready_events(&env).await;
    let revoked = Collector::revoked_events(&env).await;
    let producer = Producer::new(&env).await;
    let conf = [("ORPHAN_GRACE", "2s")];
    let mut first = env.spawn_worker(&stub.url(), &conf);
    first.wait_ready(WAIT).await;
    let t = tenant("orphan");

    // Hold the first store: the token issued and journaled, never stored.
    hold_updates(&env, "tenants", "token_ciphertext").await;
    producer
        .request(
            "tenant.created",
            json!({"tenant_id": t}),
            Some(&format!("{t}-created")),
        )
        .await;
    eventually(
        "the first token issued and its store held",
        WAIT,
        || async {
            stub.stats().issued >= 1 && held(&env).await && !journal(&env, &t).await.is_empty()
        },
    )
    .await;
    let j = journal(&env, &t).await;
    assert_eq!(j.len(), 1, "{j:?}");
    let orphan = j[0].0.clone();
    kill_and_release(&env, &mut first, "tenants").await;
    assert!(
        !env.stored_tokens().await.contains_key(&t),
        "the killed store committed nothing"
    );

    let mut second = env.spawn_worker(&stub.url(), &conf);
    second.wait_ready(WAIT).await;
    let ev = events
        .wait_until("the tenant's ready event", WAIT, |all| {
            all.iter().any(|r| r.json()["tenant_id"] == t.as_str())
        })
        .await
        .iter()
        .map(support::Received::json)
        .find(|v| v["tenant_id"] == t.as_str())
        .expect("ready event");
    let stored = ev["token_fingerprint"]
        .as_str()
        .expect("fingerprint")
        .to_owned();
    assert_ne!(stored, orphan, "the issuer ignored the key: a second token");
    let s = stub.stats();
    assert_eq!((s.issued, s.replayed), (2, 0), "{s:?}");
    assert_eq!(env.stored_tokens().await.get(&t), Some(&stored));

    eventually("the orphan revoked and its event out", WAIT, || async {
        stub.revoked().iter().any(|r| r.fingerprint == orphan)
            && revoked_and_published(&env, &t, &orphan).await
            && !revoked_for(&revoked, &orphan).is_empty()
    })
    .await;

    // `token orphans --json` shows it revoked.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tenant-tokens"))
        .args(["token", "orphans", "--json"])
        .env("DATABASE_URL", &env.database_url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .expect("run token orphans");
    assert!(
        out.status.success(),
        "token orphans: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    let mine: Vec<&serde_json::Value> = listed
        .iter()
        .filter(|o| o["tenant_id"] == t.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "the orphan, and only it: {listed:?}");
    assert_eq!(mine[0]["token_fingerprint"], orphan.as_str());
    assert!(
        mine[0]["revoked_at"].is_string(),
        "listed as revoked: {}",
        mine[0]
    );
    second.stop().await;

    // The orphan revoked once, reason orphan; the stored token not at all.
    let list = stub.revoked();
    assert_eq!(list.len(), 1, "only the orphan was revoked: {list:?}");
    assert_eq!(list[0].fingerprint, orphan);
    assert_eq!(list[0].revoke_calls, 1, "{list:?}");
    let revs = revocations(&env, &t).await;
    assert_eq!(revs.len(), 1, "{revs:?}");
    assert_eq!(revs[0].reason, "orphan");
    assert_eq!(revs[0].token_fingerprint, orphan);
    let evs = revoked.all();
    assert_eq!(evs.len(), 1, "one revoked event");
    let rev = evs[0].json();
    assert_eq!(rev["token_fingerprint"], orphan.as_str());
    assert_eq!(rev["reason"], "orphan");
    assert_eq!(rev["tenant_id"], t.as_str());
    assert_eq!(
        env.stored_tokens().await.get(&t),
        Some(&stored),
        "still the current token"
    );
    let j = journal(&env, &t).await;
    assert!(
        j.iter().all(|(_, _, sealed)| !sealed),
        "no journal copy left: {j:?}"
    );

    stub.shutdown().await;
    env.cleanup().await;
}
