//! Encryption keys (`docs/keys.md`): `tenant-tokens rekey` moves every stored ciphertext (the
//! tenants' tokens, superseded tokens, the journal's) to the current key without changing a
//! token, beside a working worker, and resumes after a kill; a row whose key is missing is a
//! clear error naming the key id, for `token show`, for `rekey` and for the worker, which
//! keeps the message (retried, then dead-lettered for replay) and keeps serving others.
//!
//! Tokens are compared through the worker itself: with `EVENT_INCLUDE_TOKEN` its ready events
//! carry the token it decrypted.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use serde_json::{Value, json};
use support::{
    Collector, CommandOutput, Producer, TestEnv, eventually, run_cli, stub_issuer, tenant,
    worker_binary,
};
use tenant_tokens::broker::topology;
use tenant_tokens::crypto::EncryptionKey;

const WAIT: Duration = Duration::from_secs(60);

/// A fresh key.
fn key() -> String {
    EncryptionKey::generate_base64()
}

/// Worker flags: `current` encrypts, `retired` (comma separated, may be empty) also decrypts,
/// and ready events carry the token.
fn key_flags<'a>(current: &'a str, retired: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--token-encryption-key",
        current,
        "--event-include-token",
        "true",
    ];
    if !retired.is_empty() {
        flags.extend(["--token-decryption-keys", retired]);
    }
    flags.extend(extra);
    flags
}

/// Stored ciphertexts: (table, key id) → rows.
async fn key_census(env: &TestEnv) -> BTreeMap<(String, String), i64> {
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT 'tenants', key_id, count(*) FROM tenants
          WHERE token_ciphertext IS NOT NULL GROUP BY key_id
         UNION ALL
         SELECT 'revocations', key_id, count(*) FROM revocations
          WHERE token_ciphertext IS NOT NULL GROUP BY key_id
         UNION ALL
         SELECT 'issued_tokens', key_id, count(*) FROM issued_tokens
          WHERE token_ciphertext IS NOT NULL GROUP BY key_id",
    )
    .fetch_all(&mut env.db().await)
    .await
    .expect("key census");
    rows.into_iter().map(|(t, k, n)| ((t, k), n)).collect()
}

/// The one key id of a census; panics if there are several.
fn only_key(census: &BTreeMap<(String, String), i64>) -> String {
    let keys: std::collections::BTreeSet<&String> = census.keys().map(|(_, k)| k).collect();
    assert_eq!(keys.len(), 1, "one key id in {census:?}");
    keys.into_iter().next().cloned().expect("a key id")
}

/// Rows by table, whatever the key.
fn by_table(census: &BTreeMap<(String, String), i64>) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    for ((table, _), n) in census {
        *out.entry(table.clone()).or_default() += n;
    }
    out
}

/// Every stored ciphertext with its fingerprint: (table, fingerprint) → ciphertext.
async fn ciphertexts(env: &TestEnv) -> BTreeMap<(String, String), Vec<u8>> {
    let rows: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT 'tenants', token_fingerprint, token_ciphertext FROM tenants
          WHERE token_ciphertext IS NOT NULL
         UNION ALL
         SELECT 'revocations', token_fingerprint, token_ciphertext FROM revocations
          WHERE token_ciphertext IS NOT NULL
         UNION ALL
         SELECT 'issued_tokens', token_fingerprint, token_ciphertext FROM issued_tokens
          WHERE token_ciphertext IS NOT NULL",
    )
    .fetch_all(&mut env.db().await)
    .await
    .expect("ciphertexts");
    rows.into_iter().map(|(t, f, c)| ((t, f), c)).collect()
}

/// Publishes `routing_key` for every tenant (message id `{tenant}-{tag}`) and returns each
/// tenant's token as its ready event carries it.
async fn tokens_of(
    producer: &Producer,
    ready: &Collector,
    tenants: &[String],
    routing_key: &str,
    tag: &str,
) -> HashMap<String, String> {
    let ids: HashMap<String, &String> = tenants.iter().map(|t| (format!("{t}-{tag}"), t)).collect();
    producer
        .requests(
            ids.iter()
                .map(|(id, t)| (routing_key.to_owned(), json!({"tenant_id": t}), id.clone()))
                .collect(),
        )
        .await;
    let events = ready
        .wait_until(
            &format!("{} ready events tagged {tag}", ids.len()),
            WAIT,
            |all| {
                let seen: std::collections::HashSet<String> = all
                    .iter()
                    .filter_map(|r| r.json()["correlation_id"].as_str().map(str::to_owned))
                    .collect();
                ids.keys().all(|id| seen.contains(id))
            },
        )
        .await;
    let mut tokens = HashMap::new();
    for e in events.iter().map(support::Received::json) {
        if let Some(t) = e["correlation_id"].as_str().and_then(|id| ids.get(id)) {
            let token = e["token"]
                .as_str()
                .unwrap_or_else(|| panic!("the ready event carries the token: {e}"));
            tokens.insert((*t).clone(), token.to_owned());
        }
    }
    tokens
}

/// `tenant-tokens rekey ARGS` on the test's database with these keys.
async fn rekey(env: &TestEnv, current: &str, retired: &str, args: &[&str]) -> CommandOutput {
    let mut all = vec!["rekey"];
    all.extend(args);
    run_cli(
        &all,
        &[
            ("DATABASE_URL", &env.database_url),
            ("TOKEN_ENCRYPTION_KEY", current),
            ("TOKEN_DECRYPTION_KEYS", retired),
        ],
    )
    .await
}

/// `tenant-tokens token show TENANT ARGS` with only `key` configured.
async fn token_show(env: &TestEnv, tenant: &str, key: &str, args: &[&str]) -> CommandOutput {
    let mut all = vec!["token", "show", tenant];
    all.extend(args);
    run_cli(
        &all,
        &[
            ("DATABASE_URL", &env.database_url),
            ("TOKEN_ENCRYPTION_KEY", key),
        ],
    )
    .await
}

/// A journal entry still holding its ciphertext (as between issuing and storing): a copy of
/// the tenant's stored token.
async fn journal_copy(env: &TestEnv, tenant: &str) {
    sqlx::query(
        "INSERT INTO issued_tokens (tenant_id, container, token_fingerprint, jti, generation,
                                    token_ciphertext, key_id)
         SELECT tenant_id, container, token_fingerprint, jti, generation, token_ciphertext, key_id
           FROM tenants WHERE tenant_id = $1",
    )
    .bind(tenant)
    .execute(&mut env.db().await)
    .await
    .expect("journal entry");
}

/// `count` tenants provisioned under `key`; returns them with their tokens.
async fn provisioned_under(
    env: &TestEnv,
    issuer: &str,
    key: &str,
    count: usize,
    prefix: &str,
) -> (Vec<String>, HashMap<String, String>) {
    let ready = Collector::ready_events(env).await;
    let producer = Producer::new(env).await;
    let worker = env
        .start_worker(issuer, &key_flags(key, "", &["--rotation-grace", "1h"]))
        .await;
    let tenants: Vec<String> = (0..count).map(|_| tenant(prefix)).collect();
    let tokens = tokens_of(&producer, &ready, &tenants, "tenant.created", "created").await;
    worker.stop().await;
    (tenants, tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_moves_every_stored_token_to_the_current_key_and_changes_none() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let (a, b) = (key(), key());
    let (tenants, mut tokens) = provisioned_under(&env, &stub.url(), &a, 20, "rekey").await;

    // A superseded token waiting out its grace, and a journal entry, both under key A.
    let ready = Collector::ready_events(&env).await;
    let producer = Producer::new(&env).await;
    let worker = env
        .start_worker(&stub.url(), &key_flags(&a, "", &["--rotation-grace", "1h"]))
        .await;
    let rotated = &tenants[0];
    let rotation = std::slice::from_ref(rotated);
    tokens.extend(tokens_of(&producer, &ready, rotation, "tenant.token.rotate", "rot").await);
    worker.stop().await;
    journal_copy(&env, &tenants[1]).await;
    let before = key_census(&env).await;
    let key_a = only_key(&before);
    let tables = BTreeMap::from([
        ("issued_tokens".to_owned(), 1),
        ("revocations".to_owned(), 1),
        ("tenants".to_owned(), 20),
    ]);
    assert_eq!(by_table(&before), tables);
    let sealed_before = ciphertexts(&env).await;

    // B current, A retired: every row moves to B, and only its ciphertext changes.
    let out = rekey(&env, &b, &a, &["--batch-size", "7"]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(out.stdout.contains("rekeyed 22 token(s)"), "{out:?}");
    let after = key_census(&env).await;
    let key_b = only_key(&after);
    assert_ne!(key_a, key_b, "the rows are on another key");
    assert_eq!(by_table(&after), tables);
    let sealed_after = ciphertexts(&env).await;
    assert_eq!(
        sealed_after.keys().collect::<Vec<_>>(),
        sealed_before.keys().collect::<Vec<_>>(),
        "the same tokens (fingerprints) in the same tables"
    );
    for (row, blob) in &sealed_after {
        assert_ne!(
            Some(blob),
            sealed_before.get(row),
            "{row:?} was re-encrypted"
        );
    }
    let again = rekey(&env, &b, &a, &[]).await;
    assert_eq!(again.code, Some(0), "{again:?}");
    assert!(again.stdout.contains("0 token(s) to rekey"), "{again:?}");

    // Key A is no longer needed: with B alone the worker hands out the very same tokens...
    let worker = env.start_worker(&stub.url(), &key_flags(&b, "", &[])).await;
    let answered = tokens_of(&producer, &ready, &tenants, "extension.requested", "b").await;
    assert_eq!(
        answered, tokens,
        "every token is unchanged and decrypts with B"
    );
    // ... `token show --reveal` reveals them ...
    let shown = token_show(&env, &tenants[2], &b, &["--reveal", "--json"]).await;
    assert_eq!(shown.code, Some(0), "{shown:?}");
    let shown: Value = serde_json::from_str(&shown.stdout).expect("token show --json");
    assert_eq!(
        shown["token"].as_str(),
        tokens.get(&tenants[2]).map(String::as_str)
    );
    // ... and the revoker opens the superseded token: deleting the rotated tenant revokes
    // both of its tokens.
    producer
        .request(
            "tenant.deleted",
            json!({"tenant_id": rotated}),
            Some("rekey-deleted"),
        )
        .await;
    eventually(
        "both tokens of the deleted tenant revoked",
        WAIT,
        || async { stub.revoked().len() == 2 },
    )
    .await;
    assert_eq!(stub.stats().revoke_failed, 0);
    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rekey_beside_a_provisioning_worker_changes_and_loses_nothing() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let (a, b) = (key(), key());
    let (old, tokens) = provisioned_under(&env, &stub.url(), &a, 150, "busy-old").await;
    let key_a = only_key(&key_census(&env).await);

    // The workers have moved to B with A retired; rekey runs while they provision new
    // tenants and answer the old ones (reading the rows it rewrites).
    let ready = Collector::ready_events(&env).await;
    let producer = Producer::new(&env).await;
    let worker = env.start_worker(&stub.url(), &key_flags(&b, &a, &[])).await;
    let new: Vec<String> = (0..150).map(|_| tenant("busy-new")).collect();
    let traffic = async {
        let created = tokens_of(&producer, &ready, &new, "tenant.created", "created").await;
        let answered = tokens_of(&producer, &ready, &old, "extension.requested", "during").await;
        (created, answered)
    };
    let rekeying = rekey(&env, &b, &a, &["--batch-size", "5", "--pause", "20ms"]);
    let (out, (created, answered)) = tokio::join!(rekeying, traffic);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(answered, tokens, "the old tenants' tokens are unchanged");
    assert_eq!(created.len(), new.len());

    let census = key_census(&env).await;
    let key_b = only_key(&census);
    assert_ne!(key_a, key_b);
    assert_eq!(by_table(&census).get("tenants"), Some(&300));
    let mut all = old.clone();
    all.extend(new.iter().cloned());
    support::audit(&env, &ready.all(), &new).await;
    worker.stop().await;

    // And B alone answers everyone with the same tokens.
    let worker = env.start_worker(&stub.url(), &key_flags(&b, "", &[])).await;
    let mut expected = tokens.clone();
    expected.extend(created);
    let later = tokens_of(&producer, &ready, &all, "extension.requested", "later").await;
    assert_eq!(later, expected);
    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rekey_loses_nothing_and_a_rerun_finishes_the_job() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let (a, b) = (key(), key());
    let (tenants, tokens) = provisioned_under(&env, &stub.url(), &a, 200, "killed").await;
    let key_a = only_key(&key_census(&env).await);
    let on_a = |census: &BTreeMap<(String, String), i64>| {
        census
            .get(&("tenants".to_owned(), key_a.clone()))
            .copied()
            .unwrap_or(0)
    };

    // Two rows a batch, 50 ms apart: about five seconds of work, killed after a few batches.
    let mut child = std::process::Command::new(worker_binary())
        .args(["rekey", "--batch-size", "2", "--pause", "50ms"])
        .env_clear()
        .env("DATABASE_URL", &env.database_url)
        .env("TOKEN_ENCRYPTION_KEY", &b)
        .env("TOKEN_DECRYPTION_KEYS", &a)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn rekey");
    eventually("a few batches committed", WAIT, || async {
        on_a(&key_census(&env).await) <= 194
    })
    .await;
    child.kill().expect("SIGKILL rekey");
    let status = child.wait().expect("reap rekey");
    assert!(!status.success(), "rekey was killed mid-run, not finished");

    let census = key_census(&env).await;
    let left = on_a(&census);
    assert!(left > 0 && left < 200, "killed mid-way: {census:?}");
    assert_eq!(by_table(&census).get("tenants"), Some(&200), "no row lost");

    let out = rekey(&env, &b, &a, &[]).await;
    assert_eq!(out.code, Some(0), "{out:?}");
    assert!(
        out.stdout.contains(&format!("rekeyed {left} token(s)")),
        "the rerun does what was left: {out:?}"
    );
    let census = key_census(&env).await;
    assert_ne!(only_key(&census), key_a);
    assert_eq!(by_table(&census).get("tenants"), Some(&200));

    let ready = Collector::ready_events(&env).await;
    let producer = Producer::new(&env).await;
    let worker = env.start_worker(&stub.url(), &key_flags(&b, "", &[])).await;
    let answered = tokens_of(&producer, &ready, &tenants, "extension.requested", "b").await;
    assert_eq!(
        answered, tokens,
        "every token is unchanged and decrypts with B"
    );
    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_whose_key_is_missing_is_an_error_naming_the_key_and_no_message_is_lost() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let (a, b) = (key(), key());
    let (tenants, tokens) = provisioned_under(&env, &stub.url(), &a, 2, "nokey").await;
    let (x, w) = (&tenants[0], &tenants[1]);
    let key_a = only_key(&key_census(&env).await);

    // token show: the metadata without the key; --reveal fails naming the key.
    let shown = token_show(&env, x, &b, &[]).await;
    assert_eq!(shown.code, Some(0), "{shown:?}");
    assert!(shown.stdout.contains(&key_a), "{shown:?}");
    let revealed = token_show(&env, x, &b, &["--reveal"]).await;
    assert_eq!(revealed.code, Some(1), "{revealed:?}");
    assert!(
        revealed.stderr.contains(&key_a),
        "names the key id: {revealed:?}"
    );
    assert!(
        revealed.stderr.contains("TOKEN_DECRYPTION_KEYS"),
        "{revealed:?}"
    );
    assert!(!revealed.stdout.contains(&tokens[x]) && !revealed.stderr.contains(&tokens[x]));

    // rekey: exit 1 listing the key id and its rows; nothing changes.
    for args in [&[][..], &["--dry-run"][..]] {
        let out = rekey(&env, &b, "", args).await;
        assert_eq!(out.code, Some(1), "{args:?}: {out:?}");
        assert!(
            out.stderr
                .contains(&format!("2 stored token(s) are sealed with key {key_a}")),
            "{args:?}: {out:?}"
        );
    }
    assert_eq!(only_key(&key_census(&env).await), key_a);

    // The worker without key A: a request that needs x's token is retried, then
    // dead-lettered naming the key; the worker keeps serving other tenants.
    let ready = Collector::ready_events(&env).await;
    let producer = Producer::new(&env).await;
    let flags = ["--max-attempts", "3", "--retry-delays", "200ms"];
    let worker = env
        .start_worker(&stub.url(), &key_flags(&b, "", &flags))
        .await;
    let missing = format!("{x}-missing");
    producer
        .request(
            "extension.requested",
            json!({"tenant_id": x}),
            Some(&missing),
        )
        .await;
    eventually("the request in the DLQ", WAIT, || async {
        env.queue_ready(topology::DEAD_LETTER_QUEUE).await == 1
    })
    .await;
    assert!(
        !ready
            .all()
            .iter()
            .any(|r| r.json()["correlation_id"] == missing.as_str()),
        "no event went out without its token"
    );
    let y = tenant("nokey-other");
    let served = tokens_of(
        &producer,
        &ready,
        std::slice::from_ref(&y),
        "tenant.created",
        "c",
    )
    .await;
    assert_eq!(served.len(), 1, "the worker still serves other tenants");
    let list = run_cli(&["dlq", "list", "--json"], &[("AMQP_URL", &env.amqp_url)]).await;
    assert_eq!(list.code, Some(0), "{list:?}");
    let letter: Value = serde_json::from_str(list.stdout.trim()).expect("one dead letter");
    assert_eq!(letter["kind"], "exhausted", "{letter}");
    assert_eq!(letter["attempts"], 3, "{letter}");
    assert!(
        letter["error"].as_str().is_some_and(|e| e.contains(&key_a)),
        "the dead letter names the key id: {letter}"
    );

    // The revoker: rotating w now makes its old token (key A) due; the revocation fails naming
    // the key, is kept, and is retried.
    let rotate = format!("{w}-rotate");
    producer
        .request(
            "tenant.token.rotate",
            json!({"tenant_id": w, "now": true}),
            Some(&rotate),
        )
        .await;
    ready
        .wait_until("the rotation's event", WAIT, |all| {
            all.iter()
                .any(|r| r.json()["correlation_id"] == rotate.as_str())
        })
        .await;
    eventually(
        "the revocation failing on the missing key",
        WAIT,
        || async {
            let row: Option<(i32, Option<String>)> = sqlx::query_as(
                "SELECT attempts, last_error FROM revocations
              WHERE tenant_id = $1 AND revoked_at IS NULL",
            )
            .bind(w)
            .fetch_optional(&mut env.db().await)
            .await
            .expect("revocation");
            row.is_some_and(|(n, e)| n >= 1 && e.is_some_and(|e| e.contains(&key_a)))
        },
    )
    .await;
    assert!(worker.health.not_ready_reasons().is_empty(), "still ready");
    worker.stop().await;

    // The fix: configure key A again; replay the dead letter; the revocation goes through.
    let worker = env.start_worker(&stub.url(), &key_flags(&b, &a, &[])).await;
    let replay = run_cli(&["dlq", "replay", "--all"], &[("AMQP_URL", &env.amqp_url)]).await;
    assert_eq!(replay.code, Some(0), "{replay:?}");
    let got = ready
        .wait_until("the replayed request's event", WAIT, |all| {
            all.iter()
                .any(|r| r.json()["correlation_id"] == missing.as_str())
        })
        .await;
    let event = got
        .iter()
        .map(support::Received::json)
        .find(|e| e["correlation_id"] == missing.as_str())
        .expect("event");
    assert_eq!(event["token"].as_str(), Some(tokens[x].as_str()), "{event}");
    eventually("the old token of w revoked", WAIT, || async {
        stub.revoked().len() == 1
    })
    .await;
    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}
