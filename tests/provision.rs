//! The unit of work, called directly: `Provisioner::provision` on a database of its own with a
//! wiremock issuer — no broker, no worker. What it promises for a batch of requests.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::{TestEnv, tenant};
use tenant_tokens::domain::ProvisionRequest;
use tenant_tokens::issuer::{IssuerClient, IssuerError};
use tenant_tokens::pipeline::decode::{Envelope, decode};
use tenant_tokens::pipeline::provision::{Outcome, Provisioner};
use tenant_tokens::store::Store;
use wiremock::MockServer;

async fn issuer(delay: Duration) -> MockServer {
    support::wiremock_issuer(delay).await
}

async fn issue_calls(server: &MockServer) -> usize {
    server.received_requests().await.unwrap_or_default().len()
}

/// A provisioner configured as `run` would be with `extra` flags, on the test's database.
async fn provisioner(env: &TestEnv, issuer: &MockServer, extra: &[&str]) -> Provisioner {
    let settings = env
        .run_args(&issuer.uri(), extra)
        .into_settings()
        .expect("settings");
    let store = Store::connect(&settings.database_url, 4)
        .await
        .expect("database");
    store.migrate().await.expect("migrations");
    let issuer = IssuerClient::new(settings.issuer).expect("issuer client");
    Provisioner::new(
        store,
        issuer,
        Arc::new(settings.cipher),
        settings.naming,
        settings.include_token,
        settings.rotation_grace,
    )
}

/// A request as the decoder makes it from a `tenant.created` message.
fn request(message_id: &str, body: serde_json::Value) -> ProvisionRequest {
    let env = Envelope {
        routing_key: "tenant.created",
        message_id: Some(message_id),
        ..Default::default()
    };
    decode(&env, body.to_string().as_bytes()).expect("valid request")
}

fn ready(outcome: &Outcome) -> &tenant_tokens::domain::ReadyEvent {
    match outcome {
        Outcome::Ready(e) => e,
        Outcome::Failed(e) => panic!("expected a ready event, got {e}"),
        Outcome::Undecryptable(e) => panic!("expected a ready event, got {e}"),
        Outcome::Gone { .. } | Outcome::Deleted => panic!("expected a ready event"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_inside_one_batch_make_one_issue_call_and_one_newly_issued() {
    let env = TestEnv::new().await;
    let issuer = issuer(Duration::ZERO).await;
    let p = provisioner(&env, &issuer, &[]).await;
    let t = tenant("dup");
    let batch = [
        request("m-1", json!({"tenant_id": t})),
        request("m-2", json!({"tenant_id": t})),
        request("m-1", json!({"tenant_id": t})),
    ];

    let outcomes = p.provision(&batch).await.expect("provisioned");

    let events: Vec<_> = outcomes.iter().map(ready).collect();
    assert_eq!(issue_calls(&issuer).await, 1);
    assert!(events[0].newly_issued);
    assert!(!events[1].newly_issued);
    assert_eq!(
        events[0], events[2],
        "the same message yields the same event"
    );
    assert_eq!(events[0].token_fingerprint, events[1].token_fingerprint);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_race_with_another_worker_waits_for_its_token_and_calls_no_issuer() {
    let env = TestEnv::new().await;
    let issuer = issuer(Duration::from_millis(300)).await;
    let (a, b) = (
        provisioner(&env, &issuer, &[]).await,
        provisioner(&env, &issuer, &[]).await,
    );
    let t = tenant("race");
    let (ra, rb) = (
        [request("race-a", json!({"tenant_id": t}))],
        [request("race-b", json!({"tenant_id": t}))],
    );

    let (oa, ob) = tokio::join!(a.provision(&ra), b.provision(&rb));

    let (oa, ob) = (oa.expect("a"), ob.expect("b"));
    let (ea, eb) = (ready(&oa[0]), ready(&ob[0]));
    assert_eq!(
        issue_calls(&issuer).await,
        1,
        "the loser made no issue call"
    );
    assert_eq!(ea.token_fingerprint, eb.token_fingerprint);
    assert!(
        ea.newly_issued ^ eb.newly_issued,
        "exactly one says newly_issued"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_include_token_puts_the_stored_token_into_new_and_existing_events() {
    let env = TestEnv::new().await;
    let issuer = issuer(Duration::ZERO).await;
    let p = provisioner(&env, &issuer, &["--event-include-token", "true"]).await;
    let t = tenant("incl");

    let first = p
        .provision(&[request("incl-1", json!({"tenant_id": t}))])
        .await
        .expect("first");
    let later = p
        .provision(&[request("incl-2", json!({"tenant_id": t}))])
        .await
        .expect("later");

    let token = ready(&first[0]).token.clone().expect("token in the event");
    assert!(token.starts_with("eyJ"), "a JWT");
    assert_eq!(ready(&later[0]).token.as_deref(), Some(token.as_str()));
    assert!(!ready(&later[0]).newly_issued);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_in_the_middle_of_a_batch_fails_only_its_own_request() {
    let env = TestEnv::new().await;
    let issuer = issuer(Duration::ZERO).await;
    let p = provisioner(&env, &issuer, &[]).await;
    let batch = [
        request("ok-1", json!({"tenant_id": tenant("ok")})),
        request(
            "bad",
            json!({"tenant_id": tenant("bad"), "tenant_name": "Reject me"}),
        ),
        request("ok-2", json!({"tenant_id": tenant("ok")})),
    ];

    let outcomes = p.provision(&batch).await.expect("provisioned");

    assert!(ready(&outcomes[0]).newly_issued);
    assert!(ready(&outcomes[2]).newly_issued);
    match &outcomes[1] {
        Outcome::Failed(IssuerError::Rejected { status, body }) => {
            assert_eq!(*status, 400);
            assert!(body.contains("not allowed"), "{body}");
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(
        env.stored_tokens().await.len(),
        2,
        "the rejected tenant has no token"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_fails_its_batch_with_an_error_that_retrying_cannot_fix() {
    let env = TestEnv::new().await;
    let issuer = issuer(Duration::ZERO).await;
    let p = provisioner(&env, &issuer, &[]).await;
    support::install_poison_trigger(&env).await;
    let (good, poison) = (tenant("good"), tenant("poison"));
    let good_req = request("good", json!({"tenant_id": good}));
    let poison_req = request("poison", json!({"tenant_id": poison}));

    let batch_error = p
        .provision(&[good_req.clone(), poison_req.clone()])
        .await
        .expect_err("the poison fails the batch");
    let alone_error = p
        .provision(std::slice::from_ref(&poison_req))
        .await
        .expect_err("and fails alone");
    let good_alone = p
        .provision(std::slice::from_ref(&good_req))
        .await
        .expect("the good one alone is provisioned");

    assert!(!batch_error.is_retryable(), "{batch_error}");
    assert!(!alone_error.is_retryable(), "{alone_error}");
    assert!(
        alone_error.to_string().contains("poisoned"),
        "{alone_error}"
    );
    assert!(ready(&good_alone[0]).newly_issued);
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_name_with_nul_characters_is_stored_without_them() {
    let env = TestEnv::new().await;
    let issuer = issuer(Duration::ZERO).await;
    let p = provisioner(&env, &issuer, &[]).await;
    let t = tenant("nul");

    let outcomes = p
        .provision(&[request(
            "nul",
            json!({"tenant_id": t, "tenant_name": "Ac\u{0}me"}),
        )])
        .await
        .expect("provisioned");

    assert!(ready(&outcomes[0]).container.starts_with("acme-"));
    let name: (Option<String>,) =
        sqlx::query_as("SELECT tenant_name FROM tenants WHERE tenant_id = $1")
            .bind(&t)
            .fetch_one(&mut env.db().await)
            .await
            .expect("stored tenant");
    assert_eq!(name.0.as_deref(), Some("Acme"));
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_from_recorded_requests_keeps_which_request_issued_each_token() {
    let env = TestEnv::new().await;
    // The schema before issue 11: handled requests recorded with their events.
    let mut db = env.db().await;
    sqlx::migrate!("./migrations")
        .run_to(20261130000003, &mut db)
        .await
        .expect("the migrations before the upgrade");
    let t = tenant("upgrade");
    let event = |fp: &str, newly: bool| {
        json!({"token_fingerprint": fp, "newly_issued": newly, "generation": 1}).to_string()
    };
    for statement in [
        "INSERT INTO tenants (tenant_id, container, token_ciphertext, key_id, token_fingerprint,
                              issued_at, generation)
         VALUES ($1, $1, '\\x00', 'k', 'fp-2', now(), 2)",
        "INSERT INTO revocations (token_fingerprint, tenant_id, container, generation,
                                  token_ciphertext, key_id, reason, due_at, next_attempt_at)
         VALUES ('fp-1', $1, $1, 1, '\\x00', 'k', 'rotated', now() + interval '1 day',
                 now() + interval '1 day')",
    ] {
        sqlx::query(statement)
            .bind(&t)
            .execute(&mut db)
            .await
            .expect("a row of the old schema");
    }
    for (id, fp, newly) in [
        ("up-c1", "fp-1", true),
        ("up-c2", "fp-1", false),
        ("up-r1", "fp-2", true),
    ] {
        sqlx::query(
            "INSERT INTO requests (request_id, tenant_id, event_id, event)
             VALUES ($1, $2, gen_random_uuid(), $3)",
        )
        .bind(id)
        .bind(&t)
        .bind(event(fp, newly))
        .execute(&mut db)
        .await
        .expect("a recorded request");
    }

    let issuer = issuer(Duration::ZERO).await;
    let p = provisioner(&env, &issuer, &[]).await;
    let batch = [
        request("up-c1", json!({"tenant_id": t})),
        request("up-c2", json!({"tenant_id": t})),
        request("up-r1", json!({"tenant_id": t})),
    ];
    let outcomes = p.provision(&batch).await.expect("provisioned");

    let newly: Vec<bool> = outcomes.iter().map(|o| ready(o).newly_issued).collect();
    assert_eq!(newly, [true, false, true], "as recorded before the upgrade");
    assert!(ready(&outcomes[2]).rotated, "up-r1 issued generation 2");
    assert_eq!(issue_calls(&issuer).await, 0);
    let tables = support::public_tables(&mut db).await;
    assert!(
        !tables.iter().any(|t| t == "requests"),
        "the requests table is gone: {tables:?}"
    );
    env.cleanup().await;
}
