//! `tenant-tokens dlq` against a real RabbitMQ (contract §9).
//!
//! Each test gets its own fresh vhost (created through the management API, or `rabbitmqctl`
//! when the API is not reachable, and deleted at the end even when the test fails), so the
//! tests run in parallel without seeing each other's dead letters.
//!
//! Broker location: `TT_TEST_AMQP_BASE` (default `amqp://guest:guest@127.0.0.1:5672`) and
//! `TT_TEST_RABBITMQ_API` (default `http://127.0.0.1:15672`, user guest/guest).

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use lapin::{
    BasicProperties, Channel, Connection, ConnectionProperties,
    options::{
        BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicQosOptions, QueueBindOptions,
        QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
};
use serde_json::Value;
use tenant_tokens::broker::publisher::Publisher;
use tenant_tokens::broker::topology::{
    self, DEAD_LETTER_EXCHANGE, DEAD_LETTER_QUEUE, EVENTS_EXCHANGE, REQUESTS_QUEUE, headers,
};
use tenant_tokens::tools::dlq::{self, DlqCommand};

/// How long any eventually-true broker state may take before a test fails.
const DEADLINE: Duration = Duration::from_secs(15);

fn amqp_base() -> String {
    std::env::var("TT_TEST_AMQP_BASE")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

fn api_base() -> String {
    std::env::var("TT_TEST_RABBITMQ_API").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

/// A throw-away vhost with the contract's topology declared in it.
struct Vhost {
    name: String,
    url: String,
    conn: Connection,
    channel: Channel,
    publisher: Publisher,
}

impl Vhost {
    async fn new(test: &str) -> Vhost {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let name = format!("tt-dlq-{test}-{}-{nanos}", std::process::id());
        create_vhost(&name).await;
        let url = format!("{}/{name}", amqp_base());
        let conn = Connection::connect(&url, ConnectionProperties::default())
            .await
            .expect("connect to the test vhost");
        let channel = conn.create_channel().await.expect("channel");
        let publisher = Publisher::new(channel.clone()).await.expect("confirm mode");
        topology::declare(&channel, &[])
            .await
            .expect("declare topology");
        Vhost {
            name,
            url,
            conn,
            channel,
            publisher,
        }
    }

    /// Runs `tenant-tokens dlq ARGS...` and returns its exit status and output.
    async fn dlq(&self, args: &[&str]) -> (i32, String) {
        #[derive(Parser)]
        struct Cli {
            #[command(subcommand)]
            cmd: DlqCommand,
        }
        let cli = Cli::try_parse_from(std::iter::once("dlq").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("bad test arguments {args:?}: {e}"));
        let mut out = Vec::new();
        let code = dlq::run(cli.cmd, &self.url, &mut out)
            .await
            .unwrap_or_else(|e| panic!("dlq {args:?} failed: {e:#}"));
        (code, String::from_utf8(out).expect("UTF-8 output"))
    }

    /// `dlq list --json`, parsed.
    async fn list(&self, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["list", "--json"];
        args.extend_from_slice(extra);
        let (code, out) = self.dlq(&args).await;
        assert_eq!(code, 0, "list {extra:?}: {out}");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    }

    async fn ids(&self, extra: &[&str]) -> Vec<String> {
        self.list(extra)
            .await
            .iter()
            .map(|v| v["id"].as_str().expect("id").to_owned())
            .collect()
    }

    async fn ready(&self, queue: &str) -> u32 {
        let passive = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue.into(), passive, FieldTable::default())
            .await
            .expect("passive declare")
            .message_count()
    }

    /// Waits until `queue` holds exactly `n` ready messages.
    async fn wait_ready(&self, queue: &str, n: u32) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let count = self.ready(queue).await;
            if count == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{queue} still has {count} messages, want {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Publishes a dead letter as the worker would, straight into the dead-letter exchange.
    async fn dead_letter(&self, letter: &Letter<'_>) -> BasicProperties {
        let props = dead_letter_props(letter);
        self.publish(
            DEAD_LETTER_EXCHANGE,
            letter.routing_key,
            letter.body.as_bytes(),
            props.clone(),
        )
        .await;
        props
    }

    async fn publish(&self, exchange: &str, key: &str, body: &[u8], props: BasicProperties) {
        self.publisher
            .publish(exchange, key, body, props, false)
            .await
            .unwrap_or_else(|e| panic!("publish to {exchange} {key} not confirmed: {e}"));
    }

    /// A queue bound to `tenant.events` for `key`, to catch replayed copies.
    async fn capture(&self, name: &str, key: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("declare capture queue");
        self.channel
            .queue_bind(
                name.into(),
                EVENTS_EXCHANGE.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("bind capture queue");
    }

    /// The next message of `queue`, waiting for it up to the deadline.
    async fn get(&self, queue: &str) -> lapin::message::BasicGetMessage {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(m) = self
                .channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: true })
                .await
                .expect("basic.get")
            {
                return m;
            }
            assert!(Instant::now() < deadline, "nothing arrived in {queue}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot be async; delete from a helper thread with its own small runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(delete_vhost(&name));
            }
        })
        .join();
    }
}

async fn create_vhost(name: &str) {
    let client = reqwest::Client::new();
    let api = api_base();
    let created = async {
        let r = client
            .put(format!("{api}/api/vhosts/{name}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await?
            .error_for_status()?;
        drop(r);
        client
            .put(format!("{api}/api/permissions/{name}/guest"))
            .basic_auth("guest", Some("guest"))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await?
            .error_for_status()?;
        Ok::<_, reqwest::Error>(())
    }
    .await;
    if let Err(e) = created {
        eprintln!("management API unusable ({e}); falling back to rabbitmqctl");
        let ok = |args: &[&str]| {
            std::process::Command::new("rabbitmqctl")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        assert!(ok(&["add_vhost", name]), "rabbitmqctl add_vhost {name}");
        assert!(
            ok(&["set_permissions", "-p", name, "guest", ".*", ".*", ".*"]),
            "rabbitmqctl set_permissions"
        );
    }
}

async fn delete_vhost(name: &str) {
    let deleted = reqwest::Client::new()
        .delete(format!("{}/api/vhosts/{name}", api_base()))
        .basic_auth("guest", Some("guest"))
        .send()
        .await
        .and_then(|r| r.error_for_status());
    if deleted.is_err() {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_vhost", name])
            .status();
    }
}

/// The properties the worker gives a dead letter (plus a secret-looking header `show` must hide).
fn dead_letter_props(letter: &Letter<'_>) -> BasicProperties {
    let mut h = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(v.into());
    h.insert(headers::ERROR.into(), s(letter.error));
    h.insert(headers::ERROR_KIND.into(), s(letter.kind));
    h.insert(
        headers::ATTEMPTS.into(),
        AMQPValue::LongInt(letter.attempts),
    );
    h.insert(headers::ORIGINAL_ROUTING_KEY.into(), s(letter.routing_key));
    h.insert(headers::FAILED_AT.into(), s(letter.failed_at));
    if letter.kind == "rejected" {
        h.insert(headers::ISSUER_STATUS.into(), AMQPValue::LongInt(400));
    }
    h.insert(
        "traceparent".into(),
        s("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    );
    h.insert("authorization".into(), s("Bearer do-not-print-me"));
    BasicProperties::default()
        .with_message_id(letter.message_id.into())
        .with_correlation_id(format!("corr-{}", letter.message_id).into())
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(h)
}

struct Letter<'a> {
    message_id: &'a str,
    kind: &'a str,
    error: &'a str,
    attempts: i32,
    routing_key: &'a str,
    failed_at: &'a str,
    body: &'a str,
}

/// Five dead letters of every kind, in this order.
const LETTERS: [Letter<'static>; 5] = [
    Letter {
        message_id: "m-1",
        kind: "invalid",
        error: "tenant_id: must match ^[A-Za-z0-9][A-Za-z0-9._:@-]*$",
        attempts: 0,
        routing_key: "tenant.created",
        failed_at: "2024-05-01T10:00:00Z",
        body: r#"{"tenant_id":"acme","tenant_name":"Acme"}"#,
    },
    Letter {
        message_id: "m-2",
        kind: "rejected",
        error: "issuer answered 400: {\"error\":\"bad ten\"}",
        attempts: 0,
        routing_key: "extension.requested",
        failed_at: "2024-05-01T11:00:00Z",
        body: r#"{"specversion":"1.0","type":"extension.requested","id":"ce-2","data":{"tenant_id":"globex"}}"#,
    },
    Letter {
        message_id: "m-3",
        kind: "exhausted",
        error: "issuer unavailable: 503",
        attempts: 8,
        routing_key: "tenant.created",
        failed_at: "2024-05-01T12:00:00Z",
        body: r#"{"tenant_id":"acme"}"#,
    },
    Letter {
        message_id: "m-4",
        kind: "invalid",
        error: "body is not JSON",
        attempts: 0,
        routing_key: "tenant.created",
        failed_at: "2024-05-01T13:00:00Z",
        body: "not json at all",
    },
    Letter {
        message_id: "m-5",
        kind: "exhausted",
        error: "issuer unavailable: 503",
        attempts: 8,
        routing_key: "extension.requested",
        failed_at: "2024-05-01T14:00:00Z",
        body: r#"{"tenant_id":"initech"}"#,
    },
];

/// The ids at `which`, in that order.
fn pick(ids: &[String], which: &[usize]) -> Vec<String> {
    which.iter().map(|&i| ids[i].clone()).collect()
}

async fn vhost_with_letters(test: &str) -> (Vhost, Vec<String>) {
    let v = Vhost::new(test).await;
    let mut ids = Vec::new();
    for l in &LETTERS {
        let props = v.dead_letter(l).await;
        ids.push(dlq::dead_letter_id(&props, l.body.as_bytes()));
    }
    v.wait_ready(DEAD_LETTER_QUEUE, 5).await;
    (v, ids)
}

#[tokio::test]
async fn list_shows_queue_order_stable_ids_and_filters() {
    let (v, ids) = vhost_with_letters("list").await;

    let all = v.list(&[]).await;
    assert_eq!(all.len(), 5);
    let listed: Vec<&str> = all.iter().map(|x| x["id"].as_str().expect("id")).collect();
    assert_eq!(
        listed, ids,
        "queue order, and the id the publisher can compute"
    );
    let first = &all[0];
    assert_eq!(first["routing_key"], "tenant.created");
    assert_eq!(first["tenant_id"], "acme");
    assert_eq!(first["kind"], "invalid");
    assert_eq!(first["error"], LETTERS[0].error);
    assert_eq!(first["attempts"], 0);
    assert_eq!(first["message_id"], "m-1");
    assert_eq!(first["failed_at"], "2024-05-01T10:00:00Z");
    assert_eq!(all[1]["tenant_id"], "globex", "CloudEvents data.tenant_id");
    assert_eq!(all[1]["routing_key"], "extension.requested");
    assert_eq!(all[2]["attempts"], 8);
    assert_eq!(all[3]["tenant_id"], Value::Null, "unknown tenant");

    // Listing neither removes nor reorders anything, and ids are stable.
    v.wait_ready(DEAD_LETTER_QUEUE, 5).await;
    assert_eq!(v.list(&[]).await, all);

    assert_eq!(v.ids(&["--kind", "invalid"]).await, pick(&ids, &[0, 3]));
    assert_eq!(v.ids(&["--tenant", "acme"]).await, pick(&ids, &[0, 2]));
    assert_eq!(v.ids(&["--limit", "2"]).await, pick(&ids, &[0, 1]));
    assert_eq!(
        v.ids(&["--kind", "exhausted", "--limit", "1"]).await,
        pick(&ids, &[2])
    );
    assert_eq!(
        v.ids(&["--error-contains", "NOT json"]).await,
        pick(&ids, &[3])
    );
    assert_eq!(
        v.ids(&[
            "--since",
            "2024-05-01T12:00:00Z",
            "--before",
            "2024-05-01T14:00:00Z"
        ])
        .await,
        pick(&ids, &[2, 3])
    );
    assert_eq!(v.ids(&["--since", "1h"]).await, Vec::<String>::new());
    assert_eq!(v.ids(&["--id", &ids[4]]).await, pick(&ids, &[4]));
    assert_eq!(v.ids(&["--tenant", "nobody"]).await, Vec::<String>::new());

    let summary = v.list(&["--summary"]).await;
    assert_eq!(summary.len(), 4, "{summary:?}");
    let busy = &summary[0];
    assert_eq!(busy["kind"], "exhausted");
    assert_eq!(busy["error"], "issuer unavailable: 503");
    assert_eq!(busy["count"], 2);
    assert_eq!(busy["oldest"], "2024-05-01T12:00:00Z");
    assert_eq!(busy["newest"], "2024-05-01T14:00:00Z");

    let (code, table) = v.dlq(&["list"]).await;
    assert_eq!(code, 0);
    for id in &ids {
        assert!(table.contains(id.as_str()), "{table}");
    }

    v.wait_ready(DEAD_LETTER_QUEUE, 5).await;
    assert_eq!(v.list(&[]).await, all, "still all there, same order");
}

#[tokio::test]
async fn show_prints_detail_without_secrets_and_unknown_ids_are_not_found() {
    let (v, ids) = vhost_with_letters("show").await;

    let (code, out) = v.dlq(&["show", &ids[1]]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(LETTERS[1].body), "{out}");
    assert!(out.contains("x-tt-error"), "{out}");
    assert!(out.contains("corr-m-2"), "{out}");
    assert!(out.contains("issuer status:  400"), "{out}");
    assert!(!out.contains("do-not-print-me"), "secret printed: {out}");

    let (code, _) = v.dlq(&["show", "0123456789abcdef"]).await;
    assert_eq!(code, 3);
    let (code, _) = v.dlq(&["list", "--id", "0123456789abcdef"]).await;
    assert_eq!(code, 3);
    let (code, _) = v.dlq(&["purge", "--id", "0123456789abcdef", "--yes"]).await;
    assert_eq!(code, 3);
    let (code, _) = v
        .dlq(&["list", "--kind", "rejected", "--tenant", "acme"])
        .await;
    assert_eq!(code, 0, "matching nothing without --id is fine");

    v.wait_ready(DEAD_LETTER_QUEUE, 5).await;
    assert_eq!(v.ids(&[]).await, ids);
}

#[tokio::test]
async fn replay_moves_exactly_the_matching_dead_letter() {
    let (v, ids) = vhost_with_letters("replay").await;
    v.capture("capture.extension", "extension.requested").await;

    let (code, out) = v.dlq(&["replay", "--tenant", "globex", "--dry-run"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&ids[1]), "{out}");
    v.wait_ready(DEAD_LETTER_QUEUE, 5).await;
    assert_eq!(
        v.ready("capture.extension").await,
        0,
        "dry run publishes nothing"
    );

    let (code, out) = v.dlq(&["replay", "--tenant", "globex"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("replayed 1, failed 0"), "{out}");

    let copy = v.get("capture.extension").await.delivery;
    assert_eq!(copy.routing_key.as_str(), "extension.requested");
    assert_eq!(copy.data, LETTERS[1].body.as_bytes());
    let p = &copy.properties;
    assert_eq!(p.message_id().as_ref().map(|m| m.as_str()), Some("m-2"));
    assert_eq!(
        p.correlation_id().as_ref().map(|m| m.as_str()),
        Some("corr-m-2")
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    let h = p.headers().clone().expect("headers");
    let replayed_at = match h.inner().get(headers::REPLAYED_AT) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("x-tt-replayed-at missing: {other:?}"),
    };
    assert!(
        time::OffsetDateTime::parse(&replayed_at, &time::format_description::well_known::Rfc3339)
            .is_ok(),
        "{replayed_at}"
    );
    for gone in [
        headers::ERROR,
        headers::ERROR_KIND,
        headers::ATTEMPTS,
        headers::FAILED_AT,
        headers::ORIGINAL_ROUTING_KEY,
        headers::ISSUER_STATUS,
        "x-delivery-count",
    ] {
        assert!(!h.contains_key(gone), "{gone} still on the copy: {h:?}");
    }
    assert!(h.contains_key("traceparent"));
    // The requests queue is bound to extension.requested too: the worker gets it.
    v.wait_ready(REQUESTS_QUEUE, 1).await;

    v.wait_ready(DEAD_LETTER_QUEUE, 4).await;
    assert_eq!(v.ids(&[]).await, pick(&ids, &[0, 2, 3, 4]));
}

#[tokio::test]
async fn unroutable_replay_fails_and_keeps_the_dead_letter() {
    let v = Vhost::new("unroutable").await;
    v.capture("capture.created", "tenant.created").await;
    let lost = Letter {
        message_id: "m-lost",
        kind: "rejected",
        error: "issuer answered 422",
        attempts: 0,
        routing_key: "nobody.listens",
        failed_at: "2024-05-01T10:00:00Z",
        body: r#"{"tenant_id":"lost"}"#,
    };
    let fine = Letter {
        message_id: "m-fine",
        routing_key: "tenant.created",
        body: r#"{"tenant_id":"fine"}"#,
        ..lost
    };
    let lost_props = v.dead_letter(&lost).await;
    v.dead_letter(&fine).await;
    v.wait_ready(DEAD_LETTER_QUEUE, 2).await;
    let lost_id = dlq::dead_letter_id(&lost_props, lost.body.as_bytes());

    let (code, out) = v.dlq(&["replay", "--tenant", "lost"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("unroutable"), "{out}");
    v.wait_ready(DEAD_LETTER_QUEUE, 2).await;

    // With --all, the routable one goes through, the other stays, and the exit is still 1.
    let (code, out) = v.dlq(&["replay", "--all"]).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("replayed 1, failed 1"), "{out}");
    let copy = v.get("capture.created").await.delivery;
    assert_eq!(copy.data, fine.body.as_bytes());
    v.wait_ready(DEAD_LETTER_QUEUE, 1).await;
    assert_eq!(v.ids(&[]).await, [lost_id]);
}

#[tokio::test]
async fn purge_and_replay_need_a_filter_and_purge_needs_yes() {
    let (v, ids) = vhost_with_letters("purge").await;

    assert_eq!(v.dlq(&["replay"]).await.0, 2);
    assert_eq!(v.dlq(&["replay", "--dry-run"]).await.0, 2);
    assert_eq!(v.dlq(&["purge", "--kind", "invalid"]).await.0, 2);
    assert_eq!(v.dlq(&["purge", "--yes"]).await.0, 2);
    assert_eq!(v.dlq(&["purge", "--all"]).await.0, 2);
    v.wait_ready(DEAD_LETTER_QUEUE, 5).await;

    let (code, out) = v.dlq(&["purge", "--kind", "invalid", "--yes"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("purged 2, failed 0"), "{out}");
    v.wait_ready(DEAD_LETTER_QUEUE, 3).await;
    assert_eq!(v.ids(&[]).await, pick(&ids, &[1, 2, 4]));

    let (code, out) = v.dlq(&["purge", "--kind", "invalid", "--yes"]).await;
    assert_eq!(code, 0, "nothing matched is not an error: {out}");
    let (code, _) = v.dlq(&["purge", "--all", "--yes"]).await;
    assert_eq!(code, 0);
    v.wait_ready(DEAD_LETTER_QUEUE, 0).await;
    assert_eq!(v.ids(&[]).await, Vec::<String>::new());
}

#[tokio::test]
async fn dead_letters_made_by_rabbitmq_are_listed_and_replayable() {
    let v = Vhost::new("native").await;
    let body = br#"{"tenant_id":"crashy"}"#;
    v.publish(
        EVENTS_EXCHANGE,
        "tenant.created",
        body,
        BasicProperties::default()
            .with_message_id("m-crash".into())
            .with_delivery_mode(2),
    )
    .await;

    // Play a worker that crashes on this message every time, until the requests queue's
    // delivery limit makes RabbitMQ dead-letter it.
    let ch = v.conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            REQUESTS_QUEUE.into(),
            "crashy".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume requests");
    let deadline = Instant::now() + DEADLINE;
    while v.ready(DEAD_LETTER_QUEUE).await == 0 {
        assert!(Instant::now() < deadline, "never dead-lettered by RabbitMQ");
        if let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        {
            d.nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .expect("nack");
        }
    }
    ch.close(200, "OK".into()).await.expect("close");

    let all = v.list(&[]).await;
    assert_eq!(all.len(), 1, "{all:?}");
    let x = &all[0];
    assert_eq!(x["kind"], "exhausted");
    assert_eq!(
        x["error"],
        "delivery limit reached (dead-lettered by RabbitMQ: delivery_limit)"
    );
    assert_eq!(x["attempts"], 0);
    assert_eq!(x["routing_key"], "tenant.created");
    assert_eq!(x["tenant_id"], "crashy");
    assert!(x["failed_at"].is_string(), "{x}");
    v.wait_ready(DEAD_LETTER_QUEUE, 1).await;
    assert_eq!(v.list(&[]).await, all, "stable id");

    v.capture("capture.created", "tenant.created").await;
    let (code, out) = v.dlq(&["replay", "--kind", "exhausted"]).await;
    assert_eq!(code, 0, "{out}");
    let copy = v.get("capture.created").await.delivery;
    assert_eq!(copy.data, body);
    let h = copy.properties.headers().clone().expect("headers");
    assert!(!h.contains_key("x-death"), "{h:?}");
    assert!(h.contains_key(headers::REPLAYED_AT));
    v.wait_ready(DEAD_LETTER_QUEUE, 0).await;
}

#[tokio::test]
async fn a_command_refuses_to_read_a_queue_someone_else_is_reading() {
    let (v, ids) = vhost_with_letters("busy").await;
    let ch = v.conn.create_channel().await.expect("channel");
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let _other = ch
        .basic_consume(
            DEAD_LETTER_QUEUE.into(),
            "someone-else".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let cmd = DlqCommand::List(dlq::ListArgs::default());
    let mut out = Vec::new();
    let result = dlq::run(cmd, &v.url, &mut out).await;
    let err = result.expect_err("a partial view must not pass for the whole queue");
    assert!(format!("{err:#}").contains("another"), "{err:#}");
    ch.close(200, "OK".into()).await.expect("close");
    v.wait_ready(DEAD_LETTER_QUEUE, 5).await;
    assert_eq!(v.ids(&[]).await, ids);
}

/// Runs the `tenant-tokens` binary with `args` against `amqp_url` and returns its exit status,
/// its standard output and its peak resident memory in KiB (from `wait4`, so only this child
/// counts, not the other processes the tests start).
// The child is reaped by `wait4`, which also reports its memory, not by `Child::wait`.
#[allow(clippy::zombie_processes)]
fn run_binary_measured(amqp_url: &str, args: &[&str]) -> (i32, String, u64) {
    use std::io::Read as _;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tenant-tokens"))
        .args(args)
        .env("AMQP_URL", amqp_url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start tenant-tokens");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("piped stdout")
        .read_to_string(&mut out)
        .expect("read the output");
    let pid = libc::pid_t::try_from(child.id()).expect("pid");
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is plain old data, for which all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for (`child` is never waited on, so it
    // is reaped exactly once, here); both pointers point to live, writable locals.
    let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(reaped, pid, "wait4: {}", std::io::Error::last_os_error());
    assert!(
        libc::WIFEXITED(status),
        "tenant-tokens did not exit normally"
    );
    let peak_kib = u64::try_from(usage.ru_maxrss).unwrap_or(0);
    (libc::WEXITSTATUS(status), out, peak_kib)
}

/// Dead letter number `i` of the large-queue test, with a body of `size` bytes.
fn big_letter(i: usize, size: usize) -> (BasicProperties, Vec<u8>) {
    let message_id = format!("big-{i:05}");
    let failed_at = format!("2024-05-01T10:{:02}:{:02}Z", i / 60, i % 60);
    let (kind, error) = if i.is_multiple_of(4) {
        ("rejected", "issuer answered 400")
    } else {
        ("exhausted", "issuer unavailable: 503")
    };
    let letter = Letter {
        message_id: &message_id,
        kind,
        error,
        attempts: 1,
        routing_key: "tenant.created",
        failed_at: &failed_at,
        body: "",
    };
    let mut body = format!(r#"{{"tenant_id":"big-{i}","padding":""#).into_bytes();
    body.resize(size - 2, b'x');
    body.extend_from_slice(br#""}"#);
    (dead_letter_props(&letter), body)
}

#[tokio::test]
async fn browsing_a_large_queue_keeps_memory_bounded_and_order() {
    const LETTERS: usize = 2_000;
    const BODY_BYTES: usize = 64 * 1024;
    let v = Vhost::new("large").await;

    // 2,000 dead letters of 64 KiB (125 MiB in all): one in four `rejected`, the rest
    // `exhausted`, one second apart. Each is made just before it is published, with up to 64
    // confirms outstanding: this process stays small, which matters because the child's peak
    // below also counts the memory of this process when it forks.
    futures::stream::iter(0..LETTERS)
        .map(|i| {
            let (props, body) = big_letter(i, BODY_BYTES);
            let publisher = v.publisher.clone();
            async move {
                publisher
                    .publish(DEAD_LETTER_EXCHANGE, "tenant.created", &body, props, false)
                    .await
            }
        })
        .buffered(64)
        .for_each(|published| async move {
            published.unwrap_or_else(|e| panic!("publish not confirmed: {e}"));
        })
        .await;
    v.wait_ready(DEAD_LETTER_QUEUE, LETTERS as u32).await;

    // The summary, in a process of its own so that its memory can be measured: it holds the
    // group counters and a page of deliveries, never the whole queue.
    let (code, out, peak_kib) = tokio::task::spawn_blocking({
        let url = v.url.clone();
        move || run_binary_measured(&url, &["dlq", "list", "--summary", "--json"])
    })
    .await
    .expect("the measuring thread");
    assert_eq!(code, 0, "{out}");
    let groups: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(groups.len(), 2, "{out}");
    assert_eq!(groups[0]["kind"], "exhausted");
    assert_eq!(groups[0]["count"], 1_500);
    assert_eq!(groups[0]["oldest"], "2024-05-01T10:00:01Z");
    assert_eq!(groups[0]["newest"], "2024-05-01T10:33:19Z");
    assert_eq!(groups[1]["kind"], "rejected");
    assert_eq!(groups[1]["count"], 500);
    assert_eq!(groups[1]["oldest"], "2024-05-01T10:00:00Z");
    assert_eq!(groups[1]["newest"], "2024-05-01T10:33:16Z");
    let queue_kib = (LETTERS * BODY_BYTES / 1024) as u64;
    eprintln!("peak resident memory of `dlq list --summary`: {peak_kib} KiB");
    assert!(
        peak_kib < queue_kib / 2,
        "peak resident memory {peak_kib} KiB while browsing a queue of {queue_kib} KiB"
    );

    // Every page comes in queue order, and browsing hands the queue back unchanged.
    v.wait_ready(DEAD_LETTER_QUEUE, LETTERS as u32).await;
    let listed = v.list(&[]).await;
    let message_ids: Vec<&str> = listed
        .iter()
        .map(|l| l["message_id"].as_str().expect("message_id"))
        .collect();
    let published: Vec<String> = (0..LETTERS).map(|i| format!("big-{i:05}")).collect();
    assert_eq!(message_ids, published, "queue order across pages");
    v.wait_ready(DEAD_LETTER_QUEUE, LETTERS as u32).await;
    assert_eq!(
        v.ids(&["--kind", "rejected", "--limit", "300"]).await.len(),
        300
    );

    // Acting as it goes frees prefetch places mid-page; nothing is skipped or read twice.
    v.wait_ready(DEAD_LETTER_QUEUE, LETTERS as u32).await;
    let (code, out) = v.dlq(&["purge", "--kind", "exhausted", "--yes"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("purged 1500, failed 0"), "{out}");
    v.wait_ready(DEAD_LETTER_QUEUE, 500).await;
    let (code, out) = v.dlq(&["purge", "--all", "--yes"]).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("purged 500, failed 0"), "{out}");
    v.wait_ready(DEAD_LETTER_QUEUE, 0).await;
}
