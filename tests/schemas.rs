//! The message schemas of `docs/asyncapi.yaml` against the contract and the code: the
//! document is valid AsyncAPI 3.0, the contract's examples (`tests/fixtures/contract/`)
//! validate, the events and dead letters a real worker publishes validate, and the schemas
//! refuse what is wrong — so the document and the code cannot drift apart unnoticed.
//!
//! Messages are looked up by their name in `components.messages`, and validated against that
//! message's `payload` or `headers` (JSON Schema draft 7, the base of AsyncAPI's schema
//! format). AMQP headers are compared as JSON: strings as strings, integers as integers.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use support::{Collector, Producer, Received, TestEnv, stub_issuer, tenant};
use tenant_tokens::pipeline::decode::{Envelope, decode};

/// A named way to break a valid message.
type Breakage = fn(&mut Value);

const WAIT: Duration = Duration::from_secs(30);

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `docs/asyncapi.yaml` as JSON.
fn asyncapi() -> Value {
    let path = repo_path("docs/asyncapi.yaml");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("docs/asyncapi.yaml: {e}"))
}

/// A contract example from `tests/fixtures/contract/`.
fn fixture(name: &str) -> Value {
    let path = repo_path("tests/fixtures/contract").join(name);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

/// Validators for the messages of the AsyncAPI document.
struct Schemas {
    doc: Value,
}

/// Which part of a message a validator checks.
#[derive(Clone, Copy, Debug)]
enum Part {
    Payload,
    Headers,
}

impl Schemas {
    fn load() -> Self {
        Self { doc: asyncapi() }
    }

    /// A validator for `part` of message `message` (a key of `components.messages`): the
    /// document's components with a root `$ref` to that part, so its `#/components/...`
    /// references resolve as in the document.
    fn validator(&self, message: &str, part: Part) -> jsonschema::Validator {
        let part = match part {
            Part::Payload => "payload",
            Part::Headers => "headers",
        };
        assert!(
            self.doc["components"]["messages"][message][part].is_object(),
            "docs/asyncapi.yaml has no {part} for message {message}"
        );
        let root = json!({
            "$ref": format!("#/components/messages/{message}/{part}"),
            "components": self.doc["components"],
        });
        jsonschema::draft7::new(&root)
            .unwrap_or_else(|e| panic!("the {part} schema of {message} does not compile: {e}"))
    }

    /// Panics, naming every violation, unless `instance` is valid.
    fn assert_valid(&self, message: &str, part: Part, instance: &Value, what: &str) {
        let v = self.validator(message, part);
        let errors: Vec<String> = v
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{what} does not match the {part:?} schema of {message}:\n{}\n{instance:#}",
            errors.join("\n")
        );
    }

    /// Whether `instance` is valid.
    fn accepts(&self, message: &str, part: Part, instance: &Value) -> bool {
        self.validator(message, part).is_valid(instance)
    }
}

/// An AMQP header table as JSON, the way the schemas describe headers.
fn headers_json(props: &BasicProperties) -> Value {
    props
        .headers()
        .as_ref()
        .map_or_else(|| json!({}), table_json)
}

fn table_json(t: &FieldTable) -> Value {
    Value::Object(
        t.inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), amqp_json(v)))
            .collect(),
    )
}

fn amqp_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::Boolean(b) => json!(b),
        AMQPValue::ShortShortInt(n) => json!(n),
        AMQPValue::ShortShortUInt(n) => json!(n),
        AMQPValue::ShortInt(n) => json!(n),
        AMQPValue::ShortUInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::Timestamp(n) => json!(n),
        AMQPValue::Float(f) => json!(f),
        AMQPValue::Double(f) => json!(f),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::FieldArray(a) => Value::Array(a.as_slice().iter().map(amqp_json).collect()),
        AMQPValue::FieldTable(t) => table_json(t),
        AMQPValue::ByteArray(b) => json!(b.as_slice()),
        AMQPValue::DecimalValue(d) => json!({"scale": d.scale, "value": d.value}),
        AMQPValue::Void => Value::Null,
    }
}

/// The incoming contract examples: (fixture, routing key, AsyncAPI message, content type).
const INCOMING: [(&str, &str, &str, Option<&str>); 6] = [
    (
        "tenant.created.json",
        "tenant.created",
        "TenantCreated",
        None,
    ),
    (
        "tenant.created.cloudevents.json",
        "tenant.created",
        "TenantCreatedCloudEvent",
        Some("application/cloudevents+json"),
    ),
    (
        "extension.requested.json",
        "extension.requested",
        "ExtensionRequested",
        None,
    ),
    (
        "extension.requested.cloudevents.json",
        "extension.requested",
        "ExtensionRequestedCloudEvent",
        Some("application/cloudevents+json"),
    ),
    (
        "tenant.token.rotate.json",
        "tenant.token.rotate",
        "TokenRotate",
        None,
    ),
    (
        "tenant.deleted.json",
        "tenant.deleted",
        "TenantDeleted",
        None,
    ),
];

fn decodes(routing_key: &str, content_type: Option<&str>, body: &Value) -> bool {
    let env = Envelope {
        routing_key,
        content_type,
        ..Default::default()
    };
    decode(&env, body.to_string().as_bytes()).is_ok()
}

#[test]
fn the_document_is_valid_asyncapi_3() {
    let path = repo_path("tests/fixtures/asyncapi-3.0.0.schema.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let meta: Value = serde_json::from_str(&text).expect("the AsyncAPI 3.0.0 JSON Schema");
    let validator = jsonschema::draft7::new(&meta).expect("the AsyncAPI schema compiles");
    let doc = asyncapi();
    let errors: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "docs/asyncapi.yaml is not AsyncAPI 3.0.0:\n{}",
        errors.join("\n")
    );
    // Every message of the contract is there.
    for channel in [
        "tenant.created",
        "extension.requested",
        "tenant.token.rotate",
        "tenant.deleted",
        "tenant.token.ready",
        "tenant.token.revoked",
        "tenant-tokens.dead",
    ] {
        let found = doc["channels"]
            .as_object()
            .expect("channels")
            .values()
            .any(|c| c["address"] == channel);
        assert!(found, "no channel with address {channel}");
    }
}

#[test]
fn the_contracts_examples_match_the_schemas_and_the_decoder() {
    let s = Schemas::load();
    for (file, key, message, content_type) in INCOMING {
        let body = fixture(file);
        s.assert_valid(message, Part::Payload, &body, file);
        assert!(
            decodes(key, content_type, &body),
            "the decoder refuses the contract's example {file}"
        );
    }
    for (file, message) in [
        ("tenant.token.ready.json", "TokenReady"),
        ("tenant.token.ready.rotated.json", "TokenReady"),
        ("tenant.token.revoked.json", "TokenRevoked"),
        ("tenant.token.revoked.orphan.json", "TokenRevoked"),
    ] {
        s.assert_valid(message, Part::Payload, &fixture(file), file);
    }
    for file in [
        "dead-letter.headers.json",
        "dead-letter.invalid.headers.json",
    ] {
        s.assert_valid("DeadLetter", Part::Headers, &fixture(file), file);
    }
    let broker = json!({"x-death": [{"count": 8, "reason": "delivery_limit",
        "queue": "tenant-tokens.requests", "time": 1_796_000_000_u64,
        "exchange": "tenant.events", "routing-keys": ["tenant.created"]}]});
    s.assert_valid(
        "BrokerDeadLetter",
        Part::Headers,
        &broker,
        "an x-death header",
    );
}

/// Each schema refuses a wrong message, so the tests above would notice a drift; for the
/// incoming messages, the decoder refuses the same ones.
#[test]
fn the_schemas_refuse_what_the_contract_forbids() {
    let s = Schemas::load();
    let created = fixture("tenant.created.json");
    let wrong_requests = [
        json!({"tenant_name": "no id"}),
        json!({"tenant_id": "-starts-with-punctuation"}),
        json!({"tenant_id": "x".repeat(129)}),
        json!({"tenant_id": 42}),
        json!({"tenant_id": "a", "tenant_name": "n".repeat(257)}),
    ];
    for body in &wrong_requests {
        assert!(!s.accepts("TenantCreated", Part::Payload, body), "{body}");
        assert!(!decodes("tenant.created", None, body), "{body}");
    }
    for body in [
        json!({"tenant_id": "a", "reason": "r".repeat(257)}),
        json!({"tenant_id": "a", "now": "yes"}),
    ] {
        assert!(!s.accepts("TokenRotate", Part::Payload, &body), "{body}");
        assert!(!decodes("tenant.token.rotate", None, &body), "{body}");
    }
    let mut ce = fixture("tenant.created.cloudevents.json");
    ce["type"] = json!("tenant.deleted");
    assert!(!s.accepts("TenantCreatedCloudEvent", Part::Payload, &ce));
    let ct = Some("application/cloudevents+json");
    assert!(!decodes("tenant.created", ct, &ce));
    assert!(s.accepts("TenantCreated", Part::Payload, &created));

    let ready = fixture("tenant.token.ready.json");
    let broken_ready: [(&str, Breakage); 6] = [
        ("no event_id", |e| {
            if let Some(o) = e.as_object_mut() {
                o.remove("event_id");
            }
        }),
        ("an unknown field", |e| e["extra"] = json!(1)),
        ("a short fingerprint", |e| {
            e["token_fingerprint"] = json!("abc")
        }),
        ("generation 0", |e| e["generation"] = json!(0)),
        ("an upper-case container", |e| {
            e["container"] = json!("Acme")
        }),
        ("rotated on tenant.created", |e| e["rotated"] = json!(true)),
    ];
    for (what, breaks) in broken_ready {
        let mut e = ready.clone();
        breaks(&mut e);
        assert!(
            !s.accepts("TokenReady", Part::Payload, &e),
            "a ready event with {what}"
        );
    }
    let mut revoked = fixture("tenant.token.revoked.json");
    revoked["reason"] = json!("expired");
    assert!(!s.accepts("TokenRevoked", Part::Payload, &revoked));
    let dead = fixture("dead-letter.headers.json");
    let mut no_status = dead.clone();
    if let Some(o) = no_status.as_object_mut() {
        o.remove("x-tt-issuer-status");
    }
    assert!(
        !s.accepts("DeadLetter", Part::Headers, &no_status),
        "rejected without a status"
    );
    let mut odd_kind = dead;
    odd_kind["x-tt-error-kind"] = json!("weird");
    assert!(!s.accepts("DeadLetter", Part::Headers, &odd_kind));
}

/// Publishes a request with a message id; returns its body.
async fn request(
    producer: &Producer,
    key: &str,
    body: Value,
    id: &str,
    headers: FieldTable,
) -> Value {
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id(id.into())
        .with_correlation_id(format!("corr-{id}").as_str().into())
        .with_headers(headers);
    producer
        .publish(key, body.to_string().as_bytes(), props)
        .await;
    body
}

/// The messages of `c` whose `correlation_id` property is `id`, once there are `n`.
async fn correlated(c: &Collector, id: &str, n: usize) -> Vec<Received> {
    let of = |all: &[Received]| -> Vec<Received> {
        all.iter()
            .filter(|r| r.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id))
            .cloned()
            .collect()
    };
    of(&c
        .wait_until(&format!("{n} messages for {id}"), WAIT, |all| {
            of(all).len() >= n
        })
        .await)
}

/// The dead letter whose `message_id` is `id`.
async fn dead_letter(c: &Collector, id: &str) -> Received {
    let is = |r: &Received| r.properties.message_id().as_ref().map(|m| m.as_str()) == Some(id);
    let all = c
        .wait_until(&format!("the dead letter of {id}"), WAIT, |all| {
            all.iter().any(is)
        })
        .await;
    all.into_iter().find(is).expect("dead letter")
}

/// A worker provisions a tenant, rotates its token, deletes it, and dead-letters a request
/// for the deleted tenant and an invalid one: every event and dead letter it publishes
/// matches the document, headers included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_worker_publishes_matches_the_schemas() {
    let s = Schemas::load();
    let env = TestEnv::new().await;
    let stub = stub_issuer(Duration::ZERO).await;
    let ready = Collector::ready_events(&env).await;
    let revoked = Collector::revoked_events(&env).await;
    let dead = Collector::dead_letters(&env).await;
    let worker = env.start_worker(&stub.url(), &[]).await;
    let producer = Producer::new(&env).await;
    let t = tenant("schema");
    let id = |what: &str| format!("{t}-{what}");
    let mut trace = FieldTable::default();
    trace.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
    );

    let mut sent = Vec::new();
    let body = json!({"tenant_id": t, "tenant_name": "Schema Corp"});
    sent.push((
        "TenantCreated",
        request(&producer, "tenant.created", body, &id("created"), trace).await,
    ));
    let first = correlated(&ready, &id("created"), 1).await;
    let body = json!({"tenant_id": t, "reason": "schema test", "now": true});
    sent.push((
        "TokenRotate",
        request(
            &producer,
            "tenant.token.rotate",
            body,
            &id("rotate"),
            FieldTable::default(),
        )
        .await,
    ));
    let rotated = correlated(&ready, &id("rotate"), 1).await;
    let first_revoked = correlated(&revoked, &id("rotate"), 1).await;
    let body = json!({"tenant_id": t});
    sent.push((
        "TenantDeleted",
        request(
            &producer,
            "tenant.deleted",
            body,
            &id("deleted"),
            FieldTable::default(),
        )
        .await,
    ));
    let deleted_revoked = correlated(&revoked, &id("deleted"), 1).await;
    let body = json!({"tenant_id": t});
    request(
        &producer,
        "tenant.created",
        body,
        &id("again"),
        FieldTable::default(),
    )
    .await;
    let gone = dead_letter(&dead, &id("again")).await;
    let props = BasicProperties::default().with_message_id(id("invalid").as_str().into());
    producer
        .publish("tenant.created", b"{\"tenant_name\": \"no id\"}", props)
        .await;
    let invalid = dead_letter(&dead, &id("invalid")).await;

    for (message, body) in &sent {
        s.assert_valid(message, Part::Payload, body, "a request the test sent");
    }
    let events = [&first[0], &rotated[0]];
    for r in events {
        s.assert_valid(
            "TokenReady",
            Part::Payload,
            &r.json(),
            "a published ready event",
        );
        s.assert_valid(
            "TokenReady",
            Part::Headers,
            &headers_json(&r.properties),
            "a ready event's headers",
        );
    }
    assert_eq!(first[0].json()["generation"], 1);
    assert_eq!(
        rotated[0].json()["rotated"],
        true,
        "the rotation's event says so"
    );
    assert!(
        headers_json(&first[0].properties)["traceparent"].is_string(),
        "the trace goes on"
    );
    for r in [&first_revoked[0], &deleted_revoked[0]] {
        s.assert_valid(
            "TokenRevoked",
            Part::Payload,
            &r.json(),
            "a published revoked event",
        );
    }
    assert_eq!(first_revoked[0].json()["reason"], "rotated");
    assert_eq!(deleted_revoked[0].json()["reason"], "deleted");
    for (r, kind) in [(&gone, "gone"), (&invalid, "invalid")] {
        let h = headers_json(&r.properties);
        assert_eq!(h["x-tt-error-kind"], kind, "{h:#}");
        s.assert_valid(
            "DeadLetter",
            Part::Headers,
            &h,
            &format!("the {kind} dead letter's headers"),
        );
    }

    worker.stop().await;
    stub.shutdown().await;
    env.cleanup().await;
}
