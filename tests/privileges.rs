//! Least privilege (`docs/privileges.md`): the worker, `migrate` and the `dlq` commands run with
//! exactly the documented Postgres grants (`deploy/sql/*.sql`) and RabbitMQ permissions (the
//! `set_permissions` lines of the page), and those identities cannot do more: the runtime role
//! cannot change the schema, the broker users cannot touch what is not theirs.
//!
//! Postgres roles and RabbitMQ users are cluster-wide: each test names its own uniquely and
//! drops them at the end.

mod support;

use std::time::Duration;

use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::json;
use sqlx::{Connection as _, PgConnection};
use support::{Collector, Producer, TestEnv, eventually, run_cli, stub_issuer, tenant};
use tenant_tokens::broker::topology;
use tenant_tokens::tools::stub_issuer::StubMode;

const WAIT: Duration = Duration::from_secs(30);
const DOC: &str = include_str!("../docs/privileges.md");
const ROLES_SQL: &str = include_str!("../deploy/sql/roles.sql");
const DATABASE_SQL: &str = include_str!("../deploy/sql/database.sql");
const GRANTS_SQL: &str = include_str!("../deploy/sql/grants.sql");

/// The (configure, write, read) permissions that the page gives `user` in its
/// `rabbitmqctl set_permissions` line.
fn documented_permissions(user: &str) -> [String; 3] {
    let line = DOC
        .lines()
        .find(|l| l.contains("set_permissions") && l.contains(&format!(" {user} ")))
        .unwrap_or_else(|| panic!("docs/privileges.md has no set_permissions line for {user}"));
    let quoted: Vec<String> = line
        .split('\'')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    quoted
        .try_into()
        .unwrap_or_else(|q| panic!("expected three quoted regexes in {line:?}, got {q:?}"))
}

/// The Postgres roles of `deploy/sql/roles.sql` under unique names, with passwords, and this
/// test's database set up as `database.sql` says.
struct Roles {
    migrator: String,
    runtime: String,
    password: String,
}

impl Roles {
    async fn create(env: &TestEnv) -> Self {
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
        let roles = Self {
            migrator: format!("tt_mig_{suffix}"),
            runtime: format!("tt_run_{suffix}"),
            password: uuid::Uuid::new_v4().simple().to_string(),
        };
        env.cluster_sql(&roles.named(ROLES_SQL)).await;
        for role in [&roles.migrator, &roles.runtime] {
            env.cluster_sql(&format!("ALTER ROLE {role} PASSWORD '{}'", roles.password))
                .await;
        }
        // The harness created the database; `createdb --owner` would have made it the
        // migrating role's.
        env.cluster_sql(&format!(
            "ALTER DATABASE {} OWNER TO {}",
            env.name, roles.migrator
        ))
        .await;
        env.admin_sql(&roles.named(DATABASE_SQL)).await;
        roles
    }

    /// `sql` with the documented role names replaced by this test's.
    fn named(&self, sql: &str) -> String {
        sql.replace("tenant_tokens_migrator", &self.migrator)
            .replace("tenant_tokens_runtime", &self.runtime)
    }

    fn url(&self, env: &TestEnv, role: &str) -> String {
        env.database_url_as(role, &self.password)
    }

    /// Drops the database, then the roles (the migrating role owns the database).
    async fn remove(self, env: TestEnv) {
        env.cleanup_dropping_roles(&[&self.runtime, &self.migrator])
            .await;
    }
}

/// The SQLSTATE of `sql` run on `conn`, `None` when it succeeds.
async fn sqlstate(conn: &mut PgConnection, sql: &str) -> Option<String> {
    match sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
        .execute(conn)
        .await
    {
        Ok(_) => None,
        Err(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
        Err(e) => panic!("{sql}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_role_cannot_change_the_schema_and_the_migrating_role_can() {
    let env = TestEnv::new().await;
    let roles = Roles::create(&env).await;
    let migrator_url = roles.url(&env, &roles.migrator);
    let out = run_cli(
        &["migrate"],
        &[("DATABASE_URL", &migrator_url), ("AMQP_URL", &env.amqp_url)],
    )
    .await;
    assert_eq!(out.code, Some(0), "migrate as the migrating role: {out:?}");
    let mut migrator = PgConnection::connect(&migrator_url)
        .await
        .expect("connect as the migrating role");
    sqlx::raw_sql(sqlx::AssertSqlSafe(roles.named(GRANTS_SQL)))
        .execute(&mut migrator)
        .await
        .expect("grants.sql as the migrating role");

    let mut runtime = PgConnection::connect(&roles.url(&env, &roles.runtime))
        .await
        .expect("connect as the runtime role");
    for ddl in [
        "CREATE TABLE probe (i int)",
        "CREATE TEMPORARY TABLE probe (i int)",
        "ALTER TABLE tenants ADD COLUMN probe int",
        "DROP TABLE issued_tokens",
        "TRUNCATE revocations",
        "CREATE INDEX probe ON tenants (tenant_name)",
        "DELETE FROM _sqlx_migrations",
        "DELETE FROM tenants",
        "CREATE DATABASE probe",
        "CREATE ROLE probe",
    ] {
        let state = sqlstate(&mut runtime, ddl).await;
        assert!(
            matches!(state.as_deref(), Some("42501")),
            "the runtime role must be refused {ddl:?} (insufficient_privilege), got {state:?}"
        );
    }
    // What it may do, it can.
    assert_eq!(
        sqlstate(&mut runtime, "SELECT count(*) FROM tenants").await,
        None
    );
    // The migrating role may change the schema.
    assert_eq!(
        sqlstate(
            &mut migrator,
            "CREATE TABLE probe (i int); DROP TABLE probe"
        )
        .await,
        None
    );
    drop((runtime, migrator));
    roles.remove(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_and_dlq_run_with_exactly_the_documented_grants_and_permissions() {
    let env = TestEnv::new().await;
    let roles = Roles::create(&env).await;
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..10];
    let (worker_user, ops_user) = (format!("tt-worker-{suffix}"), format!("tt-ops-{suffix}"));
    let password = uuid::Uuid::new_v4().simple().to_string();
    let worker_perms = documented_permissions("tenant-tokens-worker");
    let ops_perms = documented_permissions("tenant-tokens-ops");
    let worker_amqp = env
        .add_user(
            &worker_user,
            &password,
            worker_perms.each_ref().map(String::as_str),
        )
        .await;
    let ops_amqp = env
        .add_user(
            &ops_user,
            &password,
            ops_perms.each_ref().map(String::as_str),
        )
        .await;

    // migrate as the migrating role and the worker's broker user; then the grants.
    let migrator_url = roles.url(&env, &roles.migrator);
    let out = run_cli(
        &["migrate"],
        &[("DATABASE_URL", &migrator_url), ("AMQP_URL", &worker_amqp)],
    )
    .await;
    assert_eq!(out.code, Some(0), "migrate: {out:?}");
    let mut migrator = PgConnection::connect(&migrator_url)
        .await
        .expect("migrator");
    sqlx::raw_sql(sqlx::AssertSqlSafe(roles.named(GRANTS_SQL)))
        .execute(&mut migrator)
        .await
        .expect("grants.sql");
    drop(migrator);

    let stub = stub_issuer(Duration::ZERO).await;
    let ready = Collector::ready_events(&env).await;
    let revoked = Collector::revoked_events(&env).await;
    let producer = Producer::new(&env).await;
    let runtime_url = roles.url(&env, &roles.runtime);
    let mut worker = env.spawn_worker(
        &stub.url(),
        &[
            ("DATABASE_URL", &runtime_url),
            ("AMQP_URL", &worker_amqp),
            ("ISSUE_RETRY_BUDGET", "0s"),
            ("ORPHAN_GRACE", "1s"),
        ],
    );
    worker.wait_ready(WAIT).await;

    // Provisioning; a transient failure through a retry queue; a refusal into the DLQ.
    let (ok, flaky, refused) = (
        tenant("priv-ok"),
        tenant("priv-flaky"),
        tenant("priv-refused"),
    );
    let event_of = |t: String| {
        let ready = &ready;
        async move {
            ready
                .wait_until(&format!("the ready event of {t}"), WAIT, |all| {
                    all.iter().any(|r| r.json()["tenant_id"] == t.as_str())
                })
                .await;
        }
    };
    producer
        .request(
            "tenant.created",
            json!({"tenant_id": ok}),
            Some(&format!("{ok}-c")),
        )
        .await;
    event_of(ok.clone()).await;
    stub.set_mode(StubMode::FailNext { n: 1, status: 503 });
    producer
        .request(
            "tenant.created",
            json!({"tenant_id": flaky}),
            Some(&format!("{flaky}-c")),
        )
        .await;
    event_of(flaky.clone()).await;
    stub.set_mode(StubMode::FailNext { n: 1, status: 422 });
    producer
        .request(
            "tenant.created",
            json!({"tenant_id": refused}),
            Some(&format!("{refused}-c")),
        )
        .await;
    eventually("the refused request in the DLQ", WAIT, || async {
        env.queue_ready(topology::DEAD_LETTER_QUEUE).await == 1
    })
    .await;

    // Rotation with revocation at once, then deletion: the revoker and its events. The
    // deletion waits for the rotation's revocation: batches in flight at once are competing
    // consumers, and a deletion handled first would leave the rotation `gone`.
    let wait_revoked = |n: usize, what: &'static str| {
        let (revoked, ok) = (&revoked, &ok);
        async move {
            revoked
                .wait_until(&format!("the revoked event of the {what}"), WAIT, |all| {
                    all.iter()
                        .filter(|r| r.json()["tenant_id"] == ok.as_str())
                        .count()
                        >= n
                })
                .await;
        }
    };
    producer
        .request(
            "tenant.token.rotate",
            json!({"tenant_id": ok, "now": true}),
            Some(&format!("{ok}-r")),
        )
        .await;
    wait_revoked(1, "rotation").await;
    producer
        .request(
            "tenant.deleted",
            json!({"tenant_id": ok}),
            Some(&format!("{ok}-d")),
        )
        .await;
    wait_revoked(2, "deletion").await;

    // The operators' commands with their user: list, then replay into the worker.
    let list = run_cli(&["dlq", "list", "--json"], &[("AMQP_URL", &ops_amqp)]).await;
    assert_eq!(
        list.code,
        Some(0),
        "dlq list as the operators' user: {list:?}"
    );
    assert!(
        list.stdout.contains(&refused),
        "dlq list shows the refused request: {list:?}"
    );
    let replay = run_cli(&["dlq", "replay", "--all"], &[("AMQP_URL", &ops_amqp)]).await;
    assert_eq!(
        replay.code,
        Some(0),
        "dlq replay as the operators' user: {replay:?}"
    );
    event_of(refused.clone()).await;

    worker.terminate();
    let status = worker.wait_exit(WAIT).await;
    let log = worker.log();
    assert_eq!(
        status.code(),
        Some(0),
        "graceful stop:\n{}",
        worker.log_tail()
    );
    for refusal in ["ACCESS_REFUSED", "access_refused", "permission denied"] {
        assert!(
            !log.contains(refusal),
            "the worker was refused something ({refusal}):\n{}",
            worker.log_tail()
        );
    }

    assert_broker_users_are_confined(&worker_amqp, &ops_amqp).await;
    stub.shutdown().await;
    drop((ready, revoked, producer));
    env.delete_user(&worker_user).await;
    env.delete_user(&ops_user).await;
    roles.remove(env).await;
}

/// The broker users cannot do what their permissions leave out: the worker declares no other
/// queue and reads no dead letter; the operators' user declares nothing and reads no request.
async fn assert_broker_users_are_confined(worker_amqp: &str, ops_amqp: &str) {
    let refused = |url: &str, op: &'static str| {
        let url = url.to_owned();
        async move {
            let conn = tenant_tokens::broker::connect(&url, "privileges test")
                .await
                .expect("broker connection");
            let ch = conn.create_channel().await.expect("channel");
            let result = match op {
                "declare" => ch
                    .queue_declare(
                        "another-app.queue".into(),
                        QueueDeclareOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map(|_| ()),
                queue => ch
                    .basic_consume(
                        queue.into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map(|_| ()),
            };
            let _ = conn.close(200, "done".into()).await;
            match result {
                Ok(()) => panic!("{op} should be refused"),
                Err(e) => assert!(
                    format!("{e:?}").to_uppercase().contains("ACCESS_REFUSED"),
                    "{op} refused for lack of permission, got {e:?}"
                ),
            }
        }
    };
    refused(worker_amqp, "declare").await;
    refused(worker_amqp, topology::DEAD_LETTER_QUEUE).await;
    refused(ops_amqp, "declare").await;
    refused(ops_amqp, topology::REQUESTS_QUEUE).await;
}
