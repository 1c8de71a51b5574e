//! Secrets stay secret: the master token, every tenant token and the encryption key never reach
//! a log line (trace level included), an error, a header, an event, a dead letter, a command's
//! output or a database column other than the ciphertexts, whatever the issuer echoes back.
//!
//! The issuer here is hostile on purpose: its error bodies (400, 401, 500, and a 200 that is no
//! token) quote the master token, and its failed revoke answers quote the token being revoked.
//! Every finding is collected with its sink and an excerpt (the secret replaced by `***`), and
//! the tests fail with the whole list, so one run says everything that leaks.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::{Collector, Producer, Received, TestEnv, eventually, fake_jwt, tenant};
use tenant_tokens::broker::topology;
use tenant_tokens::crypto::EncryptionKey;
use tenant_tokens::domain::{TenantToken, Trigger};
use tenant_tokens::issuer::{IssuerClient, RetryPolicy};
use tenant_tokens::pipeline::decode::{Envelope, decode};
use tenant_tokens::pipeline::provision::{Outcome, Provisioner};
use tenant_tokens::store::Store;

const WAIT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// The hostile issuer
// ---------------------------------------------------------------------------------------------

/// What the issuer handed out and was asked.
#[derive(Default)]
struct IssuerState {
    /// Every token issued, with its container.
    issued: Vec<(String, String)>,
    /// Issue calls per container.
    issue_calls: HashMap<String, u32>,
    /// Revoke calls per token.
    revoke_calls: HashMap<String, u32>,
}

/// Answers by the container's prefix (derived containers start with the tenant id):
///
/// | prefix | issue answer |
/// |---|---|
/// | `ok`, `rot`, `del` | 200 with a token |
/// | `rej` | 400 `{"error":"bad token <master>"}` |
/// | `flaky` | 500 quoting the master token twice, then a token |
/// | `unauth` | 401 quoting the master token once, then a token |
/// | `down` | 500 quoting the master token, always |
/// | `weird` | 200 whose JSON body is no token but quotes the master token, always |
///
/// Revoke calls: a token of a `del` container always gets a 500 quoting the token (and the
/// master token); any other token a 500 quoting it the first time, then 200.
#[derive(Clone)]
struct LeakyIssuer {
    master: String,
    state: Arc<Mutex<IssuerState>>,
}

impl wiremock::Respond for LeakyIssuer {
    fn respond(&self, req: &wiremock::Request) -> wiremock::ResponseTemplate {
        use wiremock::ResponseTemplate as R;
        let master = &self.master;
        let authorized = req
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            == Some(format!("Bearer {master}").as_str());
        if !authorized {
            return R::new(401).set_body_string("who are you");
        }
        let mut st = self.state.lock().expect("lock");
        if req.url.path() == "/api/tokens/revoke" {
            let token = req
                .url
                .query_pairs()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let container = st
                .issued
                .iter()
                .find(|(t, _)| *t == token)
                .map(|(_, c)| c.clone())
                .unwrap_or_default();
            let calls = st.revoke_calls.entry(token.clone()).or_default();
            *calls += 1;
            return if container.starts_with("del") || *calls == 1 {
                R::new(500).set_body_string(format!(
                    r#"{{"error":"cannot revoke {token}: storage down (auth {master})"}}"#
                ))
            } else {
                R::new(200).set_body_string("{}")
            };
        }
        let body: Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let ten = body["ten"].as_str().unwrap_or("missing").to_owned();
        let calls = {
            let c = st.issue_calls.entry(ten.clone()).or_default();
            *c += 1;
            *c
        };
        let echo = |status: u16, what: &str| {
            R::new(status).set_body_string(format!(r#"{{"error":"{what} {master}"}}"#))
        };
        if ten.starts_with("rej") {
            return echo(400, "bad token");
        }
        if ten.starts_with("down") || (ten.starts_with("flaky") && calls <= 2) {
            return echo(500, "internal error while checking");
        }
        if ten.starts_with("unauth") && calls == 1 {
            return echo(401, "revoked token");
        }
        if ten.starts_with("weird") {
            return R::new(200).set_body_string(format!(
                r#"{{"message":"welcome back, {master}","token":null}}"#
            ));
        }
        let token = fake_jwt(&ten, &uuid::Uuid::new_v4().simple().to_string());
        st.issued.push((token.clone(), ten));
        R::new(200).set_body_string(format!("{token}\n"))
    }
}

async fn leaky_issuer(master: &str) -> (wiremock::MockServer, LeakyIssuer) {
    let server = wiremock::MockServer::start().await;
    let issuer = LeakyIssuer {
        master: master.to_owned(),
        state: Arc::default(),
    };
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(issuer.clone())
        .mount(&server)
        .await;
    (server, issuer)
}

// ---------------------------------------------------------------------------------------------
// Looking for secrets
// ---------------------------------------------------------------------------------------------

/// The secrets to look for, by name, and what was found where.
struct Search {
    secrets: Vec<(String, String)>,
    findings: Vec<String>,
    /// How many sinks were searched (so a vacuous pass shows).
    sinks: usize,
}

impl Search {
    fn new(master: &str, key: &str) -> Self {
        Self {
            secrets: vec![
                ("master token".into(), master.to_owned()),
                ("encryption key".into(), key.to_owned()),
            ],
            findings: Vec::new(),
            sinks: 0,
        }
    }

    fn add_tokens(&mut self, tokens: impl IntoIterator<Item = String>) {
        for (i, t) in tokens.into_iter().enumerate() {
            self.secrets.push((format!("tenant token #{i}"), t));
        }
    }

    /// Records every secret found in `text`, with a short excerpt of each (first) occurrence
    /// and the secrets replaced by `***`.
    fn check(&mut self, sink: &str, text: &str) {
        self.sinks += 1;
        for (name, secret) in &self.secrets {
            let Some(at) = text.find(secret.as_str()) else {
                continue;
            };
            let count = text.matches(secret.as_str()).count();
            let start = floor_char(text, at.saturating_sub(160));
            let end = floor_char(text, (at + secret.len() + 100).min(text.len()));
            let mut excerpt = text[start..end].to_owned();
            for (_, s) in &self.secrets {
                excerpt = excerpt.replace(s.as_str(), "***");
            }
            self.findings.push(format!(
                "{name} in {sink} ({count}x), e.g.: …{}…",
                excerpt.replace('\n', "⏎")
            ));
        }
    }

    /// Records every secret whose bytes occur in `bytes` (a ciphertext).
    fn check_bytes(&mut self, sink: &str, bytes: &[u8]) {
        self.sinks += 1;
        for (name, secret) in &self.secrets {
            if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                self.findings
                    .push(format!("{name} in plain text inside {sink}"));
            }
        }
    }

    fn assert_clean(&self) {
        assert!(
            self.findings.is_empty(),
            "{} secret leak(s) found in {} sinks searched:\n  - {}",
            self.findings.len(),
            self.sinks,
            self.findings.join("\n  - ")
        );
    }
}

fn floor_char(s: &str, mut i: usize) -> usize {
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A received message as text: routing key, properties, every header with its string values
/// as text (`Debug` of a long string shows bytes), and body.
fn message_text(r: &Received) -> String {
    let headers = r
        .properties
        .headers()
        .as_ref()
        .map(|h| amqp_text(&lapin::types::AMQPValue::FieldTable(h.clone())))
        .unwrap_or_default();
    format!(
        "routing key {}\nproperties {:?}\nheaders {headers}\nbody {}",
        r.routing_key,
        r.properties,
        String::from_utf8_lossy(&r.body)
    )
}

/// An AMQP value as text, strings and byte arrays decoded, tables and arrays recursively.
fn amqp_text(v: &lapin::types::AMQPValue) -> String {
    use lapin::types::AMQPValue as V;
    match v {
        V::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        V::ShortString(s) => s.as_str().to_owned(),
        V::ByteArray(b) => String::from_utf8_lossy(b.as_slice()).into_owned(),
        V::FieldArray(a) => a
            .as_slice()
            .iter()
            .map(amqp_text)
            .collect::<Vec<_>>()
            .join(", "),
        V::FieldTable(t) => t
            .inner()
            .iter()
            .map(|(k, v)| format!("{}: {}", k.as_str(), amqp_text(v)))
            .collect::<Vec<_>>()
            .join("\n"),
        other => format!("{other:?}"),
    }
}

/// Every row of the three tables as JSON, ciphertext columns left out.
async fn database_text(env: &TestEnv) -> Vec<(String, String)> {
    let mut db = env.db().await;
    let mut out = Vec::new();
    for table in ["tenants", "issued_tokens", "revocations"] {
        let rows: Vec<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT (to_jsonb(x) - 'token_ciphertext')::text FROM {table} x"
        )))
        .fetch_all(&mut db)
        .await
        .unwrap_or_else(|e| panic!("dump {table}: {e}"));
        out.push((table.to_owned(), rows.join("\n")));
    }
    out
}

/// Every ciphertext in the database: (where, bytes).
async fn ciphertexts(env: &TestEnv) -> Vec<(String, Vec<u8>)> {
    let mut db = env.db().await;
    let mut out = Vec::new();
    for (table, key) in [
        ("tenants", "tenant_id"),
        ("issued_tokens", "id::text"),
        ("revocations", "token_fingerprint"),
    ] {
        let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {key}, token_ciphertext FROM {table} WHERE token_ciphertext IS NOT NULL"
        )))
        .fetch_all(&mut db)
        .await
        .unwrap_or_else(|e| panic!("ciphertexts of {table}: {e}"));
        out.extend(
            rows.into_iter()
                .map(|(k, b)| (format!("{table}.token_ciphertext ({k})"), b)),
        );
    }
    out
}

/// Runs `tenant-tokens <args>` with the worker's environment (secrets included, as an
/// operator's shell would have them) at trace level; returns what was run, whether it
/// succeeded, its stdout and stderr together, and its stdout alone.
async fn cli(
    env: &TestEnv,
    master: &str,
    key: &str,
    args: &[&str],
) -> (String, bool, String, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(env!("CARGO_BIN_EXE_tenant-tokens"))
            .args(args)
            .env_clear()
            .env("AMQP_URL", &env.amqp_url)
            .env("DATABASE_URL", &env.database_url)
            .env("ISSUER_MASTER_TOKEN", master)
            .env("TOKEN_ENCRYPTION_KEY", key)
            .env("RUST_LOG", "trace")
            .env("LOG_FORMAT", "json")
            .stdin(std::process::Stdio::null())
            .output(),
    )
    .await
    .unwrap_or_else(|_| panic!("tenant-tokens {args:?} did not finish"))
    .expect("run tenant-tokens");
    let text = format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        format!("`tenant-tokens {}`", args.join(" ")),
        out.status.success(),
        text,
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------------------

/// Drives every path a secret could take through a child worker at trace level, with an issuer
/// that echoes secrets in its errors, and the operator commands after it; then searches every
/// sink for every secret.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_errors_events_dead_letters_commands_or_the_database() {
    let env = TestEnv::new().await;
    let master = format!("MASTER-{}", uuid::Uuid::new_v4().simple());
    let key = EncryptionKey::generate_base64();
    let (server, issuer) = leaky_issuer(&master).await;
    let ready = Collector::ready_events(&env).await;
    let revoked = Collector::revoked_events(&env).await;

    let mut worker = env.spawn_worker(
        &server.uri(),
        &[
            ("RUST_LOG", "trace"),
            ("LOG_FORMAT", "json"),
            ("ISSUER_MASTER_TOKEN", master.as_str()),
            ("TOKEN_ENCRYPTION_KEY", key.as_str()),
            ("ISSUE_RETRY_BUDGET", "1500ms"),
            ("MAX_ATTEMPTS", "2"),
            ("RETRY_DELAYS", "200ms"),
            ("ROTATION_GRACE", "1h"),
        ],
    );
    worker.wait_ready(WAIT).await;
    let producer = Producer::new(&env).await;

    let ok = tenant("ok");
    let rot = tenant("rot");
    let del = tenant("del");
    let flaky = tenant("flaky");
    let unauth = tenant("unauth");
    let rej = tenant("rej");
    let down = tenant("down");
    let weird = tenant("weird");

    // Requests that succeed (some after errors quoting the master token), get rejected, keep
    // failing, or are invalid. No body carries a secret.
    for t in [&ok, &rot, &del, &flaky, &rej, &down, &weird] {
        producer
            .request(
                "tenant.created",
                json!({"tenant_id": t}),
                Some(&format!("{t}-created")),
            )
            .await;
    }
    producer
        .request(
            "extension.requested",
            json!({"tenant_id": unauth, "extension_id": "ext-1"}),
            Some(&format!("{unauth}-ext")),
        )
        .await;
    let invalid: [(&str, &[u8]); 3] = [
        ("tenant.created", b"this is not json"),
        ("tenant.created", br#"{"tenant_name":"no id"}"#),
        ("extension.requested", br#"{"tenant_id":""}"#),
    ];
    for (i, (key, body)) in invalid.iter().enumerate() {
        let props = lapin::BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id(format!("invalid-{i}-{}", env.name).into());
        producer.publish(key, body, props).await;
    }

    let provisioned = [&ok, &rot, &del, &flaky, &unauth].map(|t| t.to_string());
    support::wait_for_tenants(&ready, &provisioned, WAIT).await;

    // A rotation revoking the old token at once (its first revoke answer, a 500, quotes it),
    // and a deletion whose revocations always fail with the token quoted.
    let rotate_id = format!("{rot}-rotate");
    producer
        .request(
            "tenant.token.rotate",
            json!({"tenant_id": rot, "now": true, "reason": "leak test"}),
            Some(&rotate_id),
        )
        .await;
    ready
        .wait_until("the rotation's ready event", WAIT, |all| {
            all.iter()
                .any(|r| r.json()["tenant_id"] == rot.as_str() && r.json()["generation"] == 2)
        })
        .await;
    producer
        .request(
            "tenant.deleted",
            json!({"tenant_id": del}),
            Some(&format!("{del}-deleted")),
        )
        .await;
    revoked
        .wait_until("the rotated token's revoked event", WAIT, |all| {
            all.iter().any(|r| r.json()["tenant_id"] == rot.as_str())
        })
        .await;
    eventually(
        "a failed revocation of the deleted tenant on record",
        WAIT,
        || {
            let env = &env;
            let del = &del;
            async move {
                let n: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM revocations
                  WHERE tenant_id = $1 AND last_error IS NOT NULL AND attempts >= 1",
                )
                .bind(del)
                .fetch_one(&mut env.db().await)
                .await
                .expect("revocations");
                n >= 1
            }
        },
    )
    .await;
    // The rejected, the always-failing, the non-token 200 and the three invalid requests.
    let dead_letters = 6;
    eventually("every dead letter", WAIT, || {
        let env = &env;
        async move { env.queue_ready(topology::DEAD_LETTER_QUEUE).await >= dead_letters }
    })
    .await;

    // The operator's commands, on what is there now.
    let mut outputs = Vec::new();
    let listed = cli(&env, &master, &key, &["dlq", "list", "--json"]).await;
    let ids: Vec<String> = listed
        .3
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["id"].as_str().map(str::to_owned))
        .collect();
    assert!(listed.1, "{} succeeds:\n{}", listed.0, listed.2);
    assert_eq!(
        ids.len(),
        dead_letters as usize,
        "dlq list --json lists every dead letter:\n{}",
        listed.2
    );
    outputs.push(listed);
    outputs.push(cli(&env, &master, &key, &["dlq", "list"]).await);
    for id in &ids {
        outputs.push(cli(&env, &master, &key, &["dlq", "show", id]).await);
    }
    for t in [&ok, &rot, &del, &rej] {
        outputs.push(cli(&env, &master, &key, &["token", "show", t, "--json"]).await);
        outputs.push(cli(&env, &master, &key, &["token", "show", t]).await);
    }
    outputs.push(cli(&env, &master, &key, &["token", "orphans", "--json"]).await);
    outputs.push(cli(&env, &master, &key, &["token", "orphans"]).await);

    // The dead letters themselves (consumed only now: the commands above read the queue).
    let dead = Collector::dead_letters(&env).await;
    let dead = dead.wait_for(dead_letters as usize, WAIT).await;
    let kinds: Vec<Option<String>> = dead.iter().map(|r| r.header("x-tt-error-kind")).collect();
    let rejected = dead
        .iter()
        .find(|r| r.header("x-tt-error-kind").as_deref() == Some("rejected"))
        .expect("the rejected request is dead-lettered as rejected");
    let error = rejected.header("x-tt-error").unwrap_or_default();
    assert!(
        error.contains("400") && error.contains("bad token"),
        "x-tt-error keeps the status and the start of the issuer's body: {}",
        error.replace(&master, "***")
    );

    // The ops endpoints, as a scraper or a probe sees them.
    let mut ops = Vec::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        let text = reqwest::get(format!("http://{}{path}", worker.ops))
            .await
            .expect("ops endpoint")
            .text()
            .await
            .expect("ops body");
        ops.push((path, text));
    }
    worker.stop_keeping_log().await;
    let log = worker.log();

    // What was issued: every tenant token the worker could know.
    let tokens: Vec<String> = {
        let st = issuer.state.lock().expect("lock");
        st.issued.iter().map(|(t, _)| t.clone()).collect()
    };
    assert!(
        tokens.len() >= 6,
        "tokens issued for ok, rot (x2), del, flaky, unauth: {}",
        tokens.len()
    );
    let mut search = Search::new(&master, &key);
    search.add_tokens(tokens.clone());

    // Sanity: the issuer did echo the secrets, so a clean result means something.
    {
        let st = issuer.state.lock().expect("lock");
        assert!(st.issue_calls.keys().any(|c| c.starts_with("rej")));
        assert!(st.issue_calls.keys().any(|c| c.starts_with("down")));
        assert!(st.issue_calls.keys().any(|c| c.starts_with("weird")));
        assert!(
            st.revoke_calls.len() >= 2,
            "revoke calls: {:?}",
            st.revoke_calls.values()
        );
    }
    assert!(!log.is_empty(), "the worker logged");
    assert!(
        log.contains("TRACE") || log.contains("\"level\":\"trace\""),
        "the worker logged at trace level"
    );

    search.check("the worker's log (RUST_LOG=trace, LOG_FORMAT=json)", &log);
    for (what, success, text, _) in &outputs {
        // `token show` of a tenant that never got a token says so and fails; the rest succeed.
        let refused = what.contains(&format!("token show {rej}"));
        assert!(*success != refused, "{what} exits as expected:\n{text}");
        search.check(&format!("the output of {what}"), text);
    }
    for (path, text) in &ops {
        search.check(&format!("the worker's {path}"), text);
    }
    for (i, r) in dead.iter().enumerate() {
        search.check(
            &format!("dead letter #{i} (kind {:?})", kinds[i]),
            &message_text(r),
        );
    }
    for (i, r) in ready.all().iter().enumerate() {
        search.check(&format!("ready event #{i}"), &message_text(r));
    }
    for (i, r) in revoked.all().iter().enumerate() {
        search.check(&format!("revoked event #{i}"), &message_text(r));
    }
    for (table, text) in database_text(&env).await {
        search.check(
            &format!("table {table} (ciphertext columns left out)"),
            &text,
        );
    }
    let sealed = ciphertexts(&env).await;
    assert!(!sealed.is_empty(), "some ciphertexts are stored");
    for (what, bytes) in &sealed {
        search.check_bytes(what, bytes);
    }
    search.assert_clean();
    server.reset().await;
    env.cleanup().await;
}

/// The values a program holds: `RunArgs` and `Settings` built with the secrets, tokens, and the
/// issuer errors the client makes of answers that quote the master token, in `Debug` and
/// `Display`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_debug_or_display_of_settings_tokens_or_issuer_errors() {
    let env = TestEnv::new().await;
    let master = format!("MASTER-{}", uuid::Uuid::new_v4().simple());
    let key = EncryptionKey::generate_base64();
    let retired = EncryptionKey::generate_base64();
    let (server, issuer) = leaky_issuer(&master).await;
    let mut search = Search::new(&master, &key);
    search
        .secrets
        .push(("retired decryption key".into(), retired.clone()));

    let args = env.run_args(
        &server.uri(),
        &[
            "--issuer-master-token",
            &master,
            "--token-encryption-key",
            &key,
            "--token-decryption-keys",
            &retired,
        ],
    );
    search.check("format!(\"{:?}\", RunArgs)", &format!("{args:?}"));
    search.check("format!(\"{:#?}\", RunArgs)", &format!("{args:#?}"));
    let mut settings = args.into_settings().expect("settings");
    search.check("format!(\"{:?}\", Settings)", &format!("{settings:?}"));
    search.check("format!(\"{:#?}\", Settings)", &format!("{settings:#?}"));

    let token = fake_jwt("c-1", "jti-1");
    let parsed = TenantToken::parse(&token).expect("token");
    search.add_tokens([token]);
    search.check("format!(\"{:?}\", TenantToken)", &format!("{parsed:?}"));
    search.check(
        "format!(\"{:?}\", TenantToken::fingerprint)",
        &format!("{:?} {}", parsed.fingerprint(), parsed.fingerprint()),
    );
    // `EncryptionKey` has no `Debug` (nor a public constructor from text): nothing to print.

    // Issuer errors as the client makes them of hostile answers, one try each.
    settings.issuer.retry = RetryPolicy {
        min_delay: Duration::from_millis(1),
        max_delay: Duration::from_millis(1),
        budget: Duration::ZERO,
    };
    let store = Store::connect(&settings.database_url, 2)
        .await
        .expect("database");
    store.migrate().await.expect("migrations");
    let p = Provisioner::new(
        store.clone(),
        IssuerClient::new(settings.issuer).expect("issuer client"),
        Arc::new(settings.cipher),
        settings.naming,
        settings.include_token,
        settings.rotation_grace,
    );
    let mut failures = 0;
    for prefix in ["rej", "down", "unauth", "weird"] {
        let envelope = Envelope {
            routing_key: Trigger::TenantCreated.as_str(),
            ..Default::default()
        };
        let body = json!({"tenant_id": tenant(prefix)}).to_string();
        let req = decode(&envelope, body.as_bytes()).expect("valid request");
        let outcomes = p.provision(&[req]).await.expect("provisioned");
        for o in &outcomes {
            if let Outcome::Failed(e) = o {
                failures += 1;
                search.check(
                    &format!("format!(\"{{:?}}\", IssuerError) of the {prefix} answer"),
                    &format!("{e:?}"),
                );
                search.check(
                    &format!("format!(\"{{}}\", IssuerError) of the {prefix} answer"),
                    &e.to_string(),
                );
            }
            search.check(
                &format!("format!(\"{{:?}}\", Outcome) of the {prefix} answer"),
                &format!("{o:?}"),
            );
        }
    }
    assert_eq!(failures, 4, "each hostile answer is a failure");
    assert!(!issuer.state.lock().expect("lock").issue_calls.is_empty());
    search.assert_clean();
    store.pool().close().await;
    env.cleanup().await;
}

// A worker stopped gracefully, its log still readable.
trait StopKeepingLog {
    async fn stop_keeping_log(&mut self);
}

impl StopKeepingLog for support::ChildWorker {
    async fn stop_keeping_log(&mut self) {
        self.terminate();
        let status = self.wait_exit(WAIT).await;
        assert_eq!(
            status.code(),
            Some(0),
            "graceful stop:\n{}",
            self.log_tail()
        );
    }
}
