//! One test's isolated environment: a fresh RabbitMQ vhost and Postgres database on the
//! shared services, connections to both, what the database holds, and the clean-up.

use std::collections::HashMap;

use lapin::Connection;
use sqlx::{Connection as _, PgConnection};

use super::services::{host_port, services};

/// One test's isolated vhost and database.
pub struct TestEnv {
    /// The vhost's and the database's name (`tt_test_…`), unique per test.
    pub name: String,
    /// The broker URL with this test's vhost.
    pub amqp_url: String,
    /// The URL of this test's database.
    pub database_url: String,
    /// The server's maintenance database, for cluster-wide statements.
    pub(super) admin_url: String,
    /// The RabbitMQ management API, for the vhost and for fault injection.
    pub(super) management: String,
}

impl TestEnv {
    /// Creates a fresh vhost and database.
    pub async fn new() -> Self {
        let s = services().await;
        let name = format!(
            "tt_test_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        create_vhost(&s.management, &name).await;
        let admin_url = format!("{}/postgres", s.pg_base);
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("postgres admin connection");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("create test database");
        Self {
            amqp_url: format!("{}/{name}", s.amqp_base),
            database_url: format!("{}/{name}", s.pg_base),
            admin_url,
            management: s.management.clone(),
            name,
        }
    }

    /// Drops the vhost and the database (call at the end of a passing test).
    pub async fn cleanup(self) {
        delete_vhost(&self.management, &self.name).await;
        if let Ok(mut admin) = PgConnection::connect(&self.admin_url).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&mut admin)
            .await;
        }
    }

    /// A broker connection in this vhost.
    pub async fn connect(&self) -> Connection {
        tenant_tokens::broker::connect(&self.amqp_url, "test")
            .await
            .expect("broker connection")
    }

    /// A database connection.
    pub async fn db(&self) -> PgConnection {
        PgConnection::connect(&self.database_url)
            .await
            .expect("db connection")
    }

    /// Stored tokens: tenant id → token fingerprint (tenants that have one).
    pub async fn stored_tokens(&self) -> HashMap<String, String> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT tenant_id, token_fingerprint FROM tenants WHERE issued_at IS NOT NULL",
        )
        .fetch_all(&mut self.db().await)
        .await
        .expect("stored tokens");
        rows.into_iter().collect()
    }

    /// `host:port` of the Postgres server.
    pub fn database_host_port(&self) -> String {
        host_port(&self.database_url, 5432)
    }

    /// This test's database URL with the server replaced by `addr` (e.g. a [`super::TcpProxy`]).
    pub fn database_url_via(&self, addr: std::net::SocketAddr) -> String {
        url_via(&self.database_url, addr)
    }

    /// `host:port` of the RabbitMQ node.
    pub fn amqp_host_port(&self) -> String {
        host_port(&self.amqp_url, 5672)
    }

    /// This test's broker URL with the node replaced by `addr` (e.g. a [`super::TcpProxy`]).
    pub fn amqp_url_via(&self, addr: std::net::SocketAddr) -> String {
        url_via(&self.amqp_url, addr)
    }
}

/// Creates vhost `name` with full rights for `guest`: the management API, else `rabbitmqctl`.
async fn create_vhost(management: &str, name: &str) {
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{management}/api/vhosts/{name}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await;
    if put.is_ok_and(|r| r.status().is_success()) {
        let perm = http
            .put(format!("{management}/api/permissions/{name}/guest"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await
            .expect("set vhost permissions");
        assert!(
            perm.status().is_success(),
            "set permissions: {}",
            perm.status()
        );
        return;
    }
    // No management API: the local CLI.
    let ok = std::process::Command::new("rabbitmqctl")
        .args(["add_vhost", name])
        .output()
        .is_ok_and(|o| o.status.success())
        && std::process::Command::new("rabbitmqctl")
            .args(["set_permissions", "-p", name, "guest", ".*", ".*", ".*"])
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "cannot create vhost {name}: enable rabbitmq_management or install rabbitmqctl"
    );
}

/// Deletes vhost `name`, best effort: the management API, else `rabbitmqctl`.
async fn delete_vhost(management: &str, name: &str) {
    let deleted = reqwest::Client::new()
        .delete(format!("{management}/api/vhosts/{name}"))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success());
    if !deleted {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", name])
            .output();
    }
}

/// The tables of schema `public` of the database `db` is connected to, sorted.
pub async fn public_tables(db: &mut PgConnection) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
    )
    .fetch_all(db)
    .await
    .expect("tables")
}

/// Makes every tenant whose id starts with `poison` unstorable: inserting its row fails with a
/// check violation (SQLSTATE 23514), as a value Postgres refuses would. The schema must exist.
pub async fn install_poison_trigger(env: &TestEnv) {
    let mut db = env.db().await;
    for statement in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.tenant_id LIKE 'poison%' THEN
             RAISE EXCEPTION 'poisoned tenant %', NEW.tenant_id USING ERRCODE = 'check_violation';
           END IF;
           RETURN NEW;
         END $$",
        "CREATE TRIGGER refuse_poison BEFORE INSERT ON tenants
         FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(statement)
            .execute(&mut db)
            .await
            .expect("poison trigger");
    }
}

/// `url` with its `host:port` replaced by `addr`, credentials and path kept.
fn url_via(url: &str, addr: std::net::SocketAddr) -> String {
    let after = url.find("://").map_or(0, |i| i + 3);
    let path = url[after..].find('/').map_or(url.len(), |i| after + i);
    let host_start = url[after..path].rfind('@').map_or(after, |i| after + i + 1);
    format!("{}{addr}{}", &url[..host_start], &url[path..])
}
