//! Least-privilege identities for one test: RabbitMQ users with permissions on the test's
//! vhost only, and Postgres login roles. Both are cluster-wide, so each gets a unique name and
//! the test drops it at the end.

use sqlx::{Connection as _, PgConnection};

use super::env::TestEnv;

impl TestEnv {
    /// Creates RabbitMQ user `user` with `permissions` (configure, write, read regexes) on
    /// this test's vhost only, and returns the broker URL that logs in as it. Users are
    /// cluster-wide: give it a unique name and [`TestEnv::delete_user`] it at the end.
    pub async fn add_user(&self, user: &str, password: &str, permissions: [&str; 3]) -> String {
        let http = reqwest::Client::new();
        let created = http
            .put(format!("{}/api/users/{user}", self.management))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"password": password, "tags": ""}))
            .send()
            .await
            .expect("management API: create user");
        assert!(
            created.status().is_success(),
            "create user {user}: {} (these tests need the management API)",
            created.status()
        );
        let [configure, write, read] = permissions;
        let granted = http
            .put(format!(
                "{}/api/permissions/{}/{user}",
                self.management, self.name
            ))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"configure": configure, "write": write, "read": read}))
            .send()
            .await
            .expect("management API: set permissions");
        assert!(
            granted.status().is_success(),
            "set permissions of {user}: {}",
            granted.status()
        );
        with_credentials(&self.amqp_url, user, password)
    }

    /// Deletes RabbitMQ user `user` (best effort).
    pub async fn delete_user(&self, user: &str) {
        let _ = reqwest::Client::new()
            .delete(format!("{}/api/users/{user}", self.management))
            .basic_auth("guest", Some("guest"))
            .send()
            .await;
    }

    /// [`TestEnv::cleanup`], then drops the Postgres `roles` (after the database, which one
    /// of them may own).
    pub async fn cleanup_dropping_roles(self, roles: &[&str]) {
        let admin_url = self.admin_url.clone();
        self.cleanup().await;
        let mut admin = PgConnection::connect(&admin_url)
            .await
            .expect("postgres admin connection");
        for role in roles {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP ROLE IF EXISTS {role}")))
                .execute(&mut admin)
                .await
                .unwrap_or_else(|e| panic!("drop role {role}: {e}"));
        }
    }

    /// This test's database URL, logging in as `role` with `password`.
    pub fn database_url_as(&self, role: &str, password: &str) -> String {
        with_credentials(&self.database_url, role, password)
    }

    /// Runs `sql` (several statements, no `CREATE DATABASE`) on this test's database as the
    /// harness's administrator.
    pub async fn admin_sql(&self, sql: &str) {
        let mut db = self.db().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut db)
            .await
            .unwrap_or_else(|e| panic!("{e} in:\n{sql}"));
    }

    /// Runs `sql` on the server's maintenance database as the harness's administrator (for
    /// cluster-wide statements such as `CREATE ROLE`).
    pub async fn cluster_sql(&self, sql: &str) {
        let mut admin = PgConnection::connect(&self.admin_url)
            .await
            .expect("postgres admin connection");
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut admin)
            .await
            .unwrap_or_else(|e| panic!("{e} in:\n{sql}"));
    }
}

/// `url` with its credentials replaced by `user:password`.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    let after = url.find("://").map_or(0, |i| i + 3);
    let path = url[after..].find('/').map_or(url.len(), |i| after + i);
    let host = url[after..path].rfind('@').map_or(after, |i| after + i + 1);
    format!("{}{user}:{password}@{}", &url[..after], &url[host..])
}
