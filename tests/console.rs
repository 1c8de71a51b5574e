//! The dead-letter console (`/dlq` on the ops server) in a real browser: headless Chromium
//! driven over WebDriver against `tenant-tokens run` in a child process, on the real
//! RabbitMQ and Postgres of the test harness.
//!
//! Needs the Debian packages `chromium` and `chromium-driver`; without them the test fails
//! and says so. `UPDATE_SCREENSHOT=1` saves the overview to `docs/dlq-console.png`.

#[path = "console/browser.rs"]
mod browser;
mod support;

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use tenant_tokens::broker::publisher::Publisher;
use tenant_tokens::broker::topology::{self, DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, headers};
use time::format_description::well_known::Rfc3339;

use browser::Browser;
use support::{Collector, TestEnv, eventually, stub_issuer, tenant, tenants_with_events};

const WAIT: Duration = Duration::from_secs(60);
/// The worker's `OPS_TOKEN` in these tests.
const OPS_TOKEN: &str = "console-test-ops-token-5f1c";

/// One dead letter as the worker would have written it.
struct Letter {
    tenant: String,
    kind: &'static str,
    error: &'static str,
    /// How long before now it failed.
    ago: time::Duration,
}

impl Letter {
    fn body(&self) -> Vec<u8> {
        if self.kind == "invalid" {
            return b"not json at all".to_vec();
        }
        serde_json::json!({ "tenant_id": self.tenant, "tenant_name": "Console Test" })
            .to_string()
            .into_bytes()
    }

    fn properties(&self) -> BasicProperties {
        let text = |v: &str| AMQPValue::LongString(v.into());
        let failed_at = (time::OffsetDateTime::now_utc() - self.ago)
            .format(&Rfc3339)
            .expect("format time");
        let mut h = FieldTable::default();
        h.insert(headers::ERROR.into(), text(self.error));
        h.insert(headers::ERROR_KIND.into(), text(self.kind));
        h.insert(headers::ATTEMPTS.into(), AMQPValue::LongInt(1));
        h.insert(
            headers::ORIGINAL_ROUTING_KEY.into(),
            text(topology::TENANT_CREATED),
        );
        h.insert(headers::FAILED_AT.into(), text(&failed_at));
        h.insert(
            "authorization".into(),
            text("Bearer never-shown-on-the-page"),
        );
        BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(h)
    }
}

/// Three kinds of failure: three exhausted (the issuer was down; replaying them now works),
/// two rejected, one invalid.
fn letters() -> Vec<Letter> {
    let l = |prefix: &str, kind, error, minutes| Letter {
        tenant: tenant(prefix),
        kind,
        error,
        ago: time::Duration::minutes(minutes),
    };
    vec![
        l("exhausted", "exhausted", "issuer unavailable: 503", 5),
        l(
            "rejected",
            "rejected",
            "issuer answered 400: name not allowed",
            300,
        ),
        l("exhausted", "exhausted", "issuer unavailable: 503", 4),
        l("invalid", "invalid", "body is not JSON", 3),
        l(
            "rejected",
            "rejected",
            "issuer answered 400: name not allowed",
            200,
        ),
        l("exhausted", "exhausted", "issuer unavailable: 503", 2),
    ]
}

async fn dead_letter_all(env: &TestEnv, letters: &[Letter]) {
    let conn = env.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    topology::declare(&ch, &[]).await.expect("topology");
    let publisher = Publisher::new(ch).await.expect("confirms");
    for l in letters {
        publisher
            .publish(
                DEAD_LETTER_EXCHANGE,
                topology::TENANT_CREATED,
                &l.body(),
                l.properties(),
                true,
            )
            .await
            .expect("dead letter published");
    }
    let _ = conn.close(200, "done".into()).await;
}

/// `(kind, count)` of the groups on the page, in the page's order.
async fn groups(b: &Browser) -> Vec<(String, String)> {
    let kinds = b.texts("#groups tr.group td.kind").await;
    let counts = b.texts("#groups tr.group td.count").await;
    kinds.into_iter().zip(counts).collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_groups_filters_and_replays_a_group_in_a_browser() {
    let b = Browser::start().await;
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let letters = letters();
    dead_letter_all(&env, &letters).await;
    let ready = Collector::ready_events(&env).await;
    let mut worker = env.spawn_worker(&stub.url(), &[("OPS_TOKEN", OPS_TOKEN)]);
    worker.wait_ready(WAIT).await;
    let base = format!("http://{}", worker.ops);

    // Grouped by kind and error, biggest first, with the right counts.
    b.open(&format!("{base}/dlq"), "#groups").await;
    let want = [("exhausted", "3"), ("rejected", "2"), ("invalid", "1")];
    assert_eq!(groups(&b).await, pairs(&want));
    assert_eq!(b.texts("#letters tr.letter").await.len(), 6);
    let page = b.client.source().await.expect("page source");
    assert!(
        !page.contains("never-shown-on-the-page"),
        "a secret header on the page"
    );
    save_screenshot(&b).await;

    // Filtering narrows the list: by kind, then by tenant too.
    b.wait_for("#filter select[name=kind]")
        .await
        .select_by_value("rejected")
        .await
        .expect("choose a kind");
    b.click("#filter button[type=submit]").await;
    let br = &b;
    eventually(
        "the list narrowed to the rejected ones",
        WAIT,
        || async move { br.texts("#letters tr.letter td.kind").await == ["rejected", "rejected"] },
    )
    .await;
    assert_eq!(groups(&b).await, pairs(&[("rejected", "2")]));
    b.type_into("#filter input[name=tenant]", &letters[4].tenant)
        .await;
    b.click("#filter button[type=submit]").await;
    let one = &letters[4].tenant;
    eventually("the list narrowed to one tenant", WAIT, || async move {
        br.texts("#letters tr.letter td.tenant").await == [one.clone()]
    })
    .await;

    // One dead letter in full, without its secret header.
    b.open(&format!("{base}/dlq"), "#letters").await;
    b.click("#letters tr.letter a").await;
    let body = b.wait_for("#body").await.text().await.expect("body");
    assert!(body.contains(&letters[0].tenant), "{body}");
    let headers = b.wait_for("#headers").await.text().await.expect("headers");
    assert!(headers.contains("x-tt-error-kind"), "{headers}");
    assert!(!headers.contains("never-shown-on-the-page"), "{headers}");

    // The exhausted group: confirmation, a wrong token refused, then the right one.
    b.open(&format!("{base}/dlq"), "#groups").await;
    b.click("#groups tr.group[data-kind=exhausted] a.replay")
        .await;
    let question = b.wait_for("h1").await.text().await.expect("h1");
    assert_eq!(question, "Replay 3 dead letters?");
    b.type_into("#act input[name=token]", "not-the-token").await;
    b.click("#act button[type=submit]").await;
    let refused = b.wait_for("#problem").await.text().await.expect("refusal");
    assert!(refused.contains("token is missing or wrong"), "{refused}");
    assert_eq!(env.queue_ready(DEAD_LETTER_QUEUE).await, 6, "nothing moved");

    b.client.back().await.expect("back to the confirmation");
    b.type_into("#act input[name=token]", OPS_TOKEN).await;
    b.click("#act button[type=submit]").await;
    let outcome = b.wait_for("#outcome").await.text().await.expect("outcome");
    assert_eq!(outcome, "Replayed 3, failed 0");

    // Exactly those three come back to the worker, which completes them.
    let replayed: Vec<String> = [0, 2, 5]
        .iter()
        .map(|&i| letters[i].tenant.clone())
        .collect();
    support::wait_for_tenants(&ready, &replayed, WAIT).await;
    let stored: HashSet<String> = env.stored_tokens().await.into_keys().collect();
    assert_eq!(stored, replayed.iter().cloned().collect::<HashSet<_>>());
    assert_eq!(
        tenants_with_events(&ready.all()),
        stored,
        "ready events for exactly the replayed tenants"
    );
    b.open(&format!("{base}/dlq"), "#groups").await;
    assert_eq!(
        groups(&b).await,
        pairs(&[("rejected", "2"), ("invalid", "1")])
    );

    b.close().await;
    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_actions_need_the_token_and_the_consoles_own_origin() {
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let letters = letters();
    dead_letter_all(&env, &letters[..2]).await;
    let mut read_only = env.spawn_worker(&stub.url(), &[]);
    let mut guarded = env.spawn_worker(&stub.url(), &[("OPS_TOKEN", OPS_TOKEN)]);
    read_only.wait_ready(WAIT).await;
    guarded.wait_ready(WAIT).await;
    let http = reqwest::Client::new();
    let form = [
        ("action", "purge"),
        ("confirm", "yes"),
        ("kind", "rejected"),
        ("token", OPS_TOKEN),
    ];
    let post = |ops: std::net::SocketAddr, origin: &str, token: &'static str| {
        let mut form = form.to_vec();
        form[3].1 = token;
        let body = serde_urlencoded::to_string(&form).expect("form body");
        http.post(format!("http://{ops}/dlq/act"))
            .header("origin", origin)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .timeout(Duration::from_secs(30))
            .send()
    };
    let status = |r: reqwest::Result<reqwest::Response>| r.expect("POST /dlq/act").status();

    let own = format!("http://{}", read_only.ops);
    assert_eq!(
        status(post(read_only.ops, &own, OPS_TOKEN).await),
        403,
        "no OPS_TOKEN: read-only"
    );
    let own = format!("http://{}", guarded.ops);
    assert_eq!(status(post(guarded.ops, &own, "").await), 401, "no token");
    assert_eq!(
        status(post(guarded.ops, &own, "wrong").await),
        401,
        "wrong token"
    );
    let evil = "https://evil.example";
    assert_eq!(
        status(post(guarded.ops, evil, OPS_TOKEN).await),
        403,
        "cross-site"
    );
    assert_eq!(
        env.queue_ready(DEAD_LETTER_QUEUE).await,
        2,
        "nothing was purged"
    );

    // The page itself reads without any token.
    let page = http
        .get(format!("http://{}/dlq", read_only.ops))
        .send()
        .await
        .expect("GET /dlq");
    assert_eq!(page.status(), 200);
    let html = page.text().await.expect("page");
    assert!(
        html.contains(&letters[1].tenant) && !html.contains("/dlq/confirm"),
        "read-only page offers no actions"
    );

    // With the token, from its own origin, the purge goes through.
    assert_eq!(status(post(guarded.ops, &own, OPS_TOKEN).await), 200);
    assert_eq!(
        env.queue_ready(DEAD_LETTER_QUEUE).await,
        1,
        "the rejected one is gone"
    );

    read_only.stop().await;
    guarded.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}

/// Saves the overview as `docs/dlq-console.png` when `UPDATE_SCREENSHOT=1`; always checks
/// that the browser renders a picture of it.
async fn save_screenshot(b: &Browser) {
    let png = b.client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    if std::env::var("UPDATE_SCREENSHOT").is_ok_and(|v| v == "1") {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/dlq-console.png");
        std::fs::create_dir_all(path.parent().expect("docs dir")).expect("docs dir");
        std::fs::write(&path, png).expect("write the screenshot");
    }
}
