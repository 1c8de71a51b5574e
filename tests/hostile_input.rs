//! Hostile input, property-tested: whatever a producer, an issuer or a broker hands the worker,
//! it neither panics nor lets through a value that Postgres or the event encoder would refuse.
//!
//! | property | cases (default) | what it hits |
//! |---|---|---|
//! | [`decoding_never_panics_never_echoes_the_body_and_refuses_oversized_bodies`] | 1024 | decoder only |
//! | [`oversized_bodies_are_refused_before_parsing`] | 64 | decoder only |
//! | [`whatever_decoding_accepts_is_storable_and_publishable`] | 64 batches of 1..=4 | Postgres + wiremock |
//! | [`token_parsing_never_panics_and_a_jti_is_always_storable`] | 1024 | token only |
//! | [`header_readers_never_panic_and_numbers_fit_u32`] | 1024 | AMQP headers only |
//! | [`hostile_issuer_bodies_are_refused_or_stored_safely`] | (fixed cases) | Postgres + wiremock |
//!
//! `PROPTEST_CASES` overrides every count. Failures are not persisted to files (the minimal
//! failing input is printed instead), so a run leaves the tree untouched.

mod support;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, ShortString};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;
use support::TestEnv;
use tenant_tokens::broker::message::{header_str, header_u32};
use tenant_tokens::domain::{
    ContainerName, ProvisionRequest, ReadyEvent, TenantId, TenantToken, Trigger,
};
use tenant_tokens::issuer::{IssuerClient, IssuerError, RetryPolicy};
use tenant_tokens::pipeline::decode::{DecodeError, Envelope, decode};
use tenant_tokens::pipeline::provision::{Outcome, Provisioner};
use tenant_tokens::store::Store;
use wiremock::MockServer;

/// 64 KiB, the contract's body limit (§3).
const MAX_BODY: usize = 64 * 1024;

/// A proptest configuration with `cases` unless `PROPTEST_CASES` says otherwise, and no
/// regression files written next to the tests.
fn config(cases: u32) -> Config {
    let mut c = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

/// Any char, with the awkward ones (NUL, controls, separators, BOM, bidi overrides, the last
/// code point) much more likely than chance would make them.
fn hostile_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => any::<char>(),
        2 => proptest::char::range(' ', '~'),
        2 => prop::sample::select(vec![
            '\0', '\u{1}', '\t', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{a0}', '\u{2028}',
            '\u{2029}', '\u{200b}', '\u{202e}', '\u{feff}', '\u{fffd}', '\u{ffff}', '\u{10ffff}',
            ' ', '"', '\\', '\'', 'é', '日', '😀', '-', '.', ':', '@', '_', '%', ';',
        ]),
    ]
}

/// Text of `0..=max` hostile chars.
fn hostile_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(hostile_char(), 0..=max).prop_map(String::from_iter)
}

/// A tenant id as the contract allows it (§3).
fn valid_tenant_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}"
}

/// A marker that, put into a body, must never show up in a decode error.
const CANARY: &str = "SECRET-BODY-CANARY";

/// One piece of a JSON string literal's content: mostly well-formed escapes of any char, and
/// the hostile ones (NUL escape, lone surrogates, raw controls, bad escapes, the canary).
fn json_string_piece() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => hostile_char().prop_map(|c| {
            let quoted = serde_json::to_string(&c.to_string()).expect("a string serialises");
            quoted[1..quoted.len() - 1].to_owned()
        }),
        1 => prop::sample::select(vec![
            "\\u0000", "\\ud800", "\\udc00", "\\udbff\\udfff", "\\ud83d\\ude00", "\\uD800x",
            "\\x", "\\u12", "\\", "\u{0}", "\u{1f}", "\n", "\\/", CANARY,
        ])
        .prop_map(str::to_owned),
    ]
}

/// A JSON string literal, quotes included; possibly malformed.
fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => hostile_text(32).prop_map(|s| serde_json::to_string(&s).expect("string")),
        1 => prop::collection::vec(json_string_piece(), 0..24)
            .prop_map(|p| format!("\"{}\"", p.concat())),
    ]
}

/// A JSON number literal, huge, tiny and malformed ones included.
fn json_number() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        prop::sample::select(vec![
            "1e400",
            "-1e400",
            "1E+400",
            "1e-400",
            "18446744073709551616",
            "-9223372036854775809",
            "340282366920938463463374607431768211456",
            "0.1e99999999999999999999",
            "-0",
            "01",
            "1.",
            ".5",
            "+1",
            "-",
            "1e",
            "NaN",
            "Infinity",
            "0x10",
        ])
        .prop_map(str::to_owned),
        (300usize..1200).prop_map(|n| "9".repeat(n)),
    ]
}

/// Keys the decoder looks at, and others.
fn json_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "tenant_id", "tenant_name", "extension_id", "reason", "now", "specversion", "type",
            "id", "data", "",
        ])
        .prop_map(|k| format!("\"{k}\"")),
        1 => json_string(),
    ]
}

/// Arrays and objects of `leaf`s and `key`s, nested up to 8 deep (the key set is small, so
/// objects often repeat a key: a raw duplicate key).
fn json_tree(leaf: BoxedStrategy<String>, key: BoxedStrategy<String>) -> BoxedStrategy<String> {
    leaf.prop_recursive(8, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
            prop::collection::vec((key.clone(), inner), 0..6).prop_map(|kv| {
                let fields: Vec<String> = kv.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                format!("{{{}}}", fields.join(","))
            }),
        ]
    })
    .boxed()
}

/// Valid JSON: any string (escaped by serde_json), integers of every size, finite floats.
fn json_value() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        2 => prop::sample::select(vec!["null", "true", "false"]).prop_map(str::to_owned),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => any::<u64>().prop_map(|n| n.to_string()),
        1 => any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| f.to_string()),
        3 => hostile_text(32).prop_map(|s| serde_json::to_string(&s).expect("string")),
        1 => valid_tenant_id().prop_map(|s| format!("\"{s}\"")),
    ];
    let key = prop_oneof![
        3 => prop::sample::select(vec![
            "tenant_id", "tenant_name", "extension_id", "reason", "now", "specversion", "type",
            "id", "data", "",
        ])
        .prop_map(|k| format!("\"{k}\"")),
        1 => hostile_text(16).prop_map(|s| serde_json::to_string(&s).expect("string")),
    ];
    json_tree(leaf.boxed(), key.boxed())
}

/// JSON-ish text: valid JSON, or a tree with hostile leaves (huge and malformed numbers, lone
/// surrogates, raw controls, bad escapes, bare words) and hostile keys.
fn json_text() -> BoxedStrategy<String> {
    let leaf = prop_oneof![
        4 => prop::sample::select(vec!["null", "true", "false"]).prop_map(str::to_owned),
        4 => json_number(),
        4 => json_string(),
        2 => valid_tenant_id().prop_map(|s| format!("\"{s}\"")),
        // Not JSON at all: a bare word, a raw control character, a stray comma.
        1 => prop::sample::select(vec!["nul", "True", "undefined", "'x'", "\u{0}", ",", "}"])
            .prop_map(str::to_owned),
    ];
    prop_oneof![
        1 => json_value(),
        1 => json_tree(leaf.boxed(), json_key().boxed()),
    ]
    .boxed()
}

/// A JSON object close to a request for `key`: `tenant_id` mostly valid, the other fields
/// valid or hostile, among noise fields whose keys may repeat the real ones (a raw duplicate
/// key: the last one counts); as a structured CloudEvent when `ce`.
fn request_like(key: String, ce: bool) -> impl Strategy<Value = String> {
    let text = |max| hostile_text(max).prop_map(|s| serde_json::to_string(&s).expect("string"));
    let tenant = prop_oneof![
        6 => valid_tenant_id().prop_map(|s| Some(format!("\"{s}\""))),
        1 => Just(None),
        1 => Just(Some(format!("\"{CANARY}\""))),
        1 => json_string().prop_map(Some),
        1 => json_value().prop_map(Some),
        1 => json_text().prop_map(Some),
    ];
    let string_field = move |max| {
        prop_oneof![
            2 => Just(None),
            4 => text(max).prop_map(Some),
            1 => json_value().prop_map(Some),
            1 => json_text().prop_map(Some),
        ]
    };
    let now = prop_oneof![
        2 => Just(None),
        3 => any::<bool>().prop_map(|b| Some(b.to_string())),
        1 => json_text().prop_map(Some),
    ];
    let noise = prop::collection::vec(
        (json_key(), prop_oneof![4 => json_value(), 1 => json_text()]),
        0..3,
    );
    let envelope = (
        prop_oneof![9 => Just("\"1.0\"".to_owned()), 1 => json_text()],
        prop_oneof![
            9 => Just(serde_json::to_string(&key).expect("string")),
            1 => json_string(),
        ],
        prop_oneof![
            4 => text(300),
            // Around 255 bytes, the most an AMQP short string (the events' correlation_id) holds.
            2 => "[!-~]{250,260}".prop_map(|s| serde_json::to_string(&s).expect("string")),
            1 => json_string(),
            1 => json_text(),
        ],
    );
    (
        noise,
        tenant,
        string_field(260),
        string_field(300),
        string_field(260),
        now,
        any::<bool>(),
        envelope,
    )
        .prop_map(
            move |(noise, tenant, name, extension, reason, now, noise_last, (spec, ty, id))| {
                let mut fields: Vec<String> =
                    noise.into_iter().map(|(k, v)| format!("{k}:{v}")).collect();
                let known = [
                    ("tenant_id", tenant),
                    ("tenant_name", name),
                    ("extension_id", extension),
                    ("reason", reason),
                    ("now", now),
                ];
                let known = known
                    .into_iter()
                    .filter_map(|(k, v)| Some(format!("\"{k}\":{}", v?)));
                if noise_last {
                    fields.splice(0..0, known);
                } else {
                    fields.extend(known);
                }
                let obj = format!("{{{}}}", fields.join(","));
                if ce {
                    format!(r#"{{"specversion":{spec},"type":{ty},"id":{id},"data":{obj}}}"#)
                } else {
                    obj
                }
            },
        )
}

/// Nesting far past serde_json's recursion limit, closed or not.
fn deep_nesting() -> impl Strategy<Value = Vec<u8>> {
    (1usize..20_000, any::<bool>(), any::<bool>()).prop_map(|(depth, arrays, close)| {
        let (open, end) = if arrays {
            ("[", "]")
        } else {
            (r#"{"tenant_id":"#, "}")
        };
        let mut s = open.repeat(depth);
        if close {
            s.push('1');
            s.push_str(&end.repeat(depth));
        }
        s.into_bytes()
    })
}

/// `bytes` with arbitrary bytes (invalid UTF-8, NUL) spliced in at arbitrary places.
fn mutated(bytes: impl Strategy<Value = String>) -> impl Strategy<Value = Vec<u8>> {
    let insert = prop_oneof![
        any::<u8>(),
        prop::sample::select(vec![0x00u8, 0x80, 0xc0, 0xc3, 0xed, 0xf4, 0xf8, 0xff]),
    ];
    (
        bytes,
        prop::collection::vec((any::<prop::sample::Index>(), insert), 1..4),
    )
        .prop_map(|(s, edits)| {
            let mut b = s.into_bytes();
            for (at, byte) in edits {
                let i = at.index(b.len() + 1);
                b.insert(i, byte);
            }
            b
        })
}

/// Any body the broker could deliver for `key`, up to the limit (and past it).
fn body(key: String, ce: bool) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        2 => prop::collection::vec(any::<u8>(), 0..512),
        2 => json_text().prop_map(String::into_bytes),
        8 => request_like(key.clone(), ce).prop_map(String::into_bytes),
        2 => mutated(request_like(key, ce)),
        1 => mutated(json_text()),
        1 => deep_nesting(),
    ]
}

/// A delivery and its body: a third of them structured CloudEvents (by content type).
fn delivery_and_body() -> impl Strategy<Value = (Delivery, Vec<u8>)> {
    (delivery(), prop::bool::weighted(0.3)).prop_flat_map(|(mut d, ce)| {
        if ce {
            d.content_type = Some("application/cloudevents+json; charset=utf-8".to_owned());
        }
        let body = body(d.routing_key.clone(), ce);
        (Just(d), body)
    })
}

/// The four routing keys the worker handles, and others.
fn routing_key() -> impl Strategy<Value = String> {
    prop_oneof![
        16 => prop::sample::select(vec![
            "tenant.created",
            "extension.requested",
            "tenant.token.rotate",
            "tenant.deleted",
        ])
        .prop_map(str::to_owned),
        1 => prop::sample::select(vec!["", "tenant.created ", "TENANT.CREATED", "tenant.*", "#"])
            .prop_map(str::to_owned),
        1 => hostile_text(200),
    ]
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop::option::weighted(
        0.5,
        prop_oneof![
            6 => prop::sample::select(vec![
                "application/json",
                "Application/JSON; charset=utf-8",
                "application/cloudevents+json",
                " application/cloudevents+json ; charset=utf-8",
                "",
                ";",
                "text/plain",
                "application/cloudevents-batch+json",
            ])
            .prop_map(str::to_owned),
            1 => hostile_text(200),
        ],
    )
}

fn traceparent() -> impl Strategy<Value = Option<String>> {
    prop::option::of(prop_oneof![
        "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
        "[0-9a-fé-]{50,60}",
        hostile_text(80),
    ])
}

/// The envelope's owned parts.
#[derive(Debug, Clone)]
struct Delivery {
    routing_key: String,
    message_id: Option<String>,
    correlation_id: Option<String>,
    content_type: Option<String>,
    traceparent: Option<String>,
}

impl Delivery {
    fn envelope(&self) -> Envelope<'_> {
        Envelope {
            routing_key: &self.routing_key,
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            content_type: self.content_type.as_deref(),
            traceparent: self.traceparent.as_deref(),
        }
    }
}

fn delivery() -> impl Strategy<Value = Delivery> {
    (
        routing_key(),
        prop::option::of(hostile_text(300)),
        prop::option::of(hostile_text(300)),
        content_type(),
        traceparent(),
    )
        .prop_map(
            |(routing_key, message_id, correlation_id, content_type, traceparent)| Delivery {
                routing_key,
                message_id,
                correlation_id,
                content_type,
                traceparent,
            },
        )
}

// ---------------------------------------------------------------------------------------------
// 1. The decoder
// ---------------------------------------------------------------------------------------------

/// What every accepted request must hold so that Postgres stores it and the event encoder
/// publishes it: ids and names without NUL, identities without control characters, everything
/// bounded.
fn check_accepted(d: &Delivery, r: &ProvisionRequest) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        TenantId::parse(r.tenant_id.as_str()),
        Ok(r.tenant_id.clone())
    );
    prop_assert_eq!(r.trigger.as_str(), d.routing_key.as_str());
    if let Some(name) = &r.tenant_name {
        prop_assert!(name.as_str().chars().count() <= 256);
        prop_assert!(!name.as_str().contains('\0'), "NUL in the tenant name");
    }
    // The identity is published as the events' AMQP `correlation_id`, a short string.
    let id = r.identity.as_str();
    prop_assert!(!id.is_empty(), "empty identity");
    prop_assert!(
        ShortString::try_new(id).is_ok(),
        "identity of {} bytes",
        id.len()
    );
    prop_assert!(!id.chars().any(char::is_control), "identity {:?}", id);
    prop_assert_eq!(id.trim(), id);
    for (what, v) in [
        ("extension_id", &r.extension_id),
        ("correlation_id", &r.correlation_id),
        ("reason", &r.reason),
    ] {
        if let Some(v) = v {
            prop_assert!(v.chars().count() <= 256, "{} too long", what);
        }
    }
    if r.trigger != Trigger::TokenRotate {
        prop_assert!(r.reason.is_none() && !r.rotate_now);
    }
    if let Some(t) = &r.traceparent {
        prop_assert_eq!(t.len(), 55);
        prop_assert!(t.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
    }
    Ok(())
}

/// An error names what is wrong, briefly, and never repeats the body.
fn check_refused(body: &[u8], e: &DecodeError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        text.chars().count() <= 1024,
        "an unbounded error: {} chars",
        text.len()
    );
    prop_assert!(!text.contains(CANARY), "the body leaked into {:?}", text);
    let body_text = String::from_utf8_lossy(body);
    if body_text.trim().chars().count() >= 12 {
        prop_assert!(
            !text.contains(body_text.trim()),
            "the body leaked into {:?}",
            text
        );
    }
    Ok(())
}

fn error_kind(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::UnknownRoutingKey(_) => "unknown routing key",
        DecodeError::TooLarge(_) => "too large",
        DecodeError::ContentType(_) => "content type",
        DecodeError::NotJson(_) => "not JSON",
        DecodeError::NotObject => "not an object",
        DecodeError::CloudEvent(_) => "CloudEvent",
        DecodeError::MissingTenant => "missing tenant",
        DecodeError::Field(_) => "field",
    }
}

#[test]
fn decoding_never_panics_never_echoes_the_body_and_refuses_oversized_bodies() {
    let mut runner = TestRunner::new(config(1024));
    // How the cases ended, to show the generators reach past the first checks.
    let outcomes: RefCell<HashMap<&'static str, u32>> = RefCell::new(HashMap::new());
    let result = runner.run(&delivery_and_body(), |(d, body)| {
        let kind = match decode(&d.envelope(), &body) {
            Ok(r) => {
                check_accepted(&d, &r)?;
                "accepted"
            }
            Err(e) => {
                check_refused(&body, &e)?;
                error_kind(&e)
            }
        };
        *outcomes.borrow_mut().entry(kind).or_default() += 1;
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let outcomes = outcomes.into_inner();
    eprintln!("decode outcomes: {outcomes:?}");
    if runner.config().cases >= 256 {
        for kind in ["accepted", "not JSON", "field", "CloudEvent"] {
            assert!(
                outcomes.get(kind).is_some_and(|n| *n > 0),
                "no case ended {kind}: {outcomes:?}"
            );
        }
    }
}

/// A body over 64 KiB is refused as `TooLarge` whatever it is — a valid request padded with
/// white space, invalid UTF-8, a content type that would be refused — so it was not parsed
/// (parsing comes after the size check and would have said something else). Exactly 64 KiB
/// of a valid request is still accepted.
#[test]
fn oversized_bodies_are_refused_before_parsing() {
    let strategy = (
        1usize..4096,
        prop_oneof![Just(b' '), Just(b'\n'), Just(0xffu8), Just(b'[')],
        valid_tenant_id(),
        content_type(),
        prop::sample::select(vec!["tenant.created", "extension.requested"]),
    );
    let mut runner = TestRunner::new(config(64));
    let result = runner.run(&strategy, |(over, pad, tenant, ct, key)| {
        let request = json!({ "tenant_id": tenant }).to_string();
        let mut body = request.clone().into_bytes();
        body.resize(MAX_BODY + over, pad);
        let d = Delivery {
            routing_key: key.to_owned(),
            message_id: None,
            correlation_id: None,
            content_type: ct,
            traceparent: None,
        };
        match decode(&d.envelope(), &body) {
            Err(DecodeError::TooLarge(n)) => prop_assert_eq!(n, body.len()),
            other => prop_assert!(false, "{} bytes: {:?}", body.len(), other.map(|_| ())),
        }
        // The boundary: a valid request of exactly 64 KiB (white space counts) is read.
        let mut exact = request.into_bytes();
        exact.resize(MAX_BODY, b' ');
        let plain = Delivery {
            content_type: None,
            ..d
        };
        prop_assert!(decode(&plain.envelope(), &exact).is_ok());
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Accepted requests are storable and publishable
// ---------------------------------------------------------------------------------------------

/// One request of a batch, as a producer could send it.
#[derive(Debug, Clone)]
struct Wanted {
    tenant_id: String,
    tenant_name: Option<String>,
    message_id: Option<String>,
    correlation_id: Option<String>,
    extension_id: String,
    reason: String,
    now: bool,
    key: &'static str,
    cloud_event_id: Option<String>,
}

fn wanted() -> impl Strategy<Value = Wanted> {
    (
        valid_tenant_id(),
        prop::option::of(hostile_text(256)),
        prop::option::of(hostile_text(300)),
        prop::option::of(hostile_text(300)),
        hostile_text(300),
        hostile_text(256),
        any::<bool>(),
        prop::sample::select(vec![
            "tenant.created",
            "extension.requested",
            "tenant.token.rotate",
        ]),
        // A CloudEvent id is a non-empty string (§3); white space only is allowed.
        prop::option::of(prop_oneof![
            hostile_text(300).prop_filter("non-empty", |s| !s.is_empty()),
            // Around 255 bytes, the most an AMQP short string (the events' correlation_id) holds.
            "[!-~]{250,260}",
        ]),
    )
        .prop_map(
            |(
                tenant_id,
                tenant_name,
                message_id,
                correlation_id,
                extension_id,
                reason,
                now,
                key,
                cloud_event_id,
            )| {
                Wanted {
                    tenant_id,
                    tenant_name,
                    message_id,
                    correlation_id,
                    extension_id,
                    reason,
                    now,
                    key,
                    cloud_event_id,
                }
            },
        )
}

impl Wanted {
    /// The request as the decoder makes it from the message.
    fn decode(&self) -> Result<ProvisionRequest, TestCaseError> {
        let mut data = json!({
            "tenant_id": self.tenant_id,
            "extension_id": self.extension_id,
            "reason": self.reason,
            "now": self.now,
        });
        if let Some(name) = &self.tenant_name {
            data["tenant_name"] = json!(name);
        }
        let (body, content_type) = match &self.cloud_event_id {
            Some(id) => (
                json!({"specversion": "1.0", "type": self.key, "id": id, "source": "hostile", "data": data}),
                Some("application/cloudevents+json"),
            ),
            None => (data, None),
        };
        let env = Envelope {
            routing_key: self.key,
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            content_type,
            traceparent: None,
        };
        let body = serde_json::to_vec(&body).expect("json");
        decode(&env, &body).map_err(|e| TestCaseError::fail(format!("refused: {e}")))
    }
}

/// A provisioner as `run` would build it, on the test's database; `issuer` overrides the
/// issuer settings (e.g. to make a failure final at once).
async fn provisioner(
    env: &TestEnv,
    issuer: &MockServer,
    edit: impl FnOnce(&mut tenant_tokens::issuer::IssuerSettings),
) -> (Provisioner, Store) {
    let mut settings = env
        .run_args(&issuer.uri(), &[])
        .into_settings()
        .expect("settings");
    edit(&mut settings.issuer);
    let store = Store::connect(&settings.database_url, 4)
        .await
        .expect("database");
    store.migrate().await.expect("migrations");
    let client = IssuerClient::new(settings.issuer).expect("issuer client");
    let p = Provisioner::new(
        store.clone(),
        client,
        Arc::new(settings.cipher),
        settings.naming,
        settings.include_token,
        settings.rotation_grace,
    );
    (p, store)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every request decoding accepts — any tenant name (NUL included), any message id (control
/// characters included), any correlation id, extension id and rotation reason — is provisioned
/// through the real store, ends `Ready`, and its event serialises (and reads back equal).
#[test]
fn whatever_decoding_accepts_is_storable_and_publishable() {
    let rt = runtime();
    let (env, _issuer, p, store) = rt.block_on(async {
        let env = TestEnv::new().await;
        let issuer = support::wiremock_issuer(Duration::ZERO).await;
        let (p, store) = provisioner(&env, &issuer, |_| {}).await;
        (env, issuer, p, store)
    });
    // The first tenant each identity was seen with: a redelivered identity gets its first event.
    let owners: RefCell<HashMap<String, String>> = RefCell::new(HashMap::new());
    // Tenants provisioned so far.
    let seen: RefCell<HashSet<String>> = RefCell::new(HashSet::new());
    let mut runner = TestRunner::new(config(64));
    let result = runner.run(&prop::collection::vec(wanted(), 1..=4), |batch| {
        let reqs = batch
            .iter()
            .map(Wanted::decode)
            .collect::<Result<Vec<_>, _>>()?;
        // Tenants new to the database, with the name their first request gives, and whether
        // each of their requests is new too (a recorded identity is answered with its stored
        // event and claims nothing, so only then must the tenant have a row).
        let mut first_names: Vec<(String, Option<String>, bool)> = Vec::new();
        for r in &reqs {
            let tenant = r.tenant_id.as_str();
            let new_request = !owners.borrow().contains_key(r.identity.as_str());
            match first_names.iter_mut().find(|(t, ..)| t == tenant) {
                Some((.., all_new)) => *all_new &= new_request,
                None if !seen.borrow().contains(tenant) => {
                    let name = r.tenant_name.as_ref().map(|n| n.as_str().to_owned());
                    first_names.push((tenant.to_owned(), name, new_request));
                }
                None => {}
            }
        }
        let outcomes = rt
            .block_on(p.provision(&reqs))
            .map_err(|e| TestCaseError::fail(format!("provision failed: {e}")))?;
        prop_assert_eq!(outcomes.len(), reqs.len());
        for (r, outcome) in reqs.iter().zip(&outcomes) {
            let event = match outcome {
                Outcome::Ready(e) => e,
                other => return Err(TestCaseError::fail(format!("not ready: {other:?}"))),
            };
            let bytes = serde_json::to_vec(event)
                .map_err(|e| TestCaseError::fail(format!("unpublishable: {e}")))?;
            let back: ReadyEvent = serde_json::from_slice(&bytes).expect("reads back");
            prop_assert_eq!(&back, &**event);
            prop_assert!(ContainerName::parse(&event.container).is_ok());
            prop_assert_eq!(event.event_id, r.identity.event_id());
            let owner = owners
                .borrow_mut()
                .entry(r.identity.as_str().to_owned())
                .or_insert_with(|| r.tenant_id.as_str().to_owned())
                .clone();
            prop_assert_eq!(&event.tenant_id, &owner);
            prop_assert_eq!(event.correlation_id.as_str(), r.identity.as_str());
            // The AMQP properties of the ready (and revoked) event carry the identity as
            // `correlation_id`, a short string: building them must not panic.
            prop_assert!(
                ShortString::try_new(event.correlation_id.as_str()).is_ok(),
                "a correlation_id of {} bytes is no AMQP short string",
                event.correlation_id.len()
            );
        }
        // A new tenant's name went into Postgres as decided at the edge (NUL dropped), byte
        // for byte; the first request of a tenant names it.
        for (tenant, name, all_new) in &first_names {
            let stored: Option<Option<String>> = rt
                .block_on(
                    sqlx::query_scalar("SELECT tenant_name FROM tenants WHERE tenant_id = $1")
                        .bind(tenant)
                        .fetch_optional(store.pool()),
                )
                .map_err(|e| TestCaseError::fail(format!("tenant row: {e}")))?;
            if *all_new {
                prop_assert_eq!(stored.as_ref(), Some(name), "stored name of {}", tenant);
            }
            if stored.is_some() {
                seen.borrow_mut().insert(tenant.clone());
            }
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    rt.block_on(env.cleanup());
}

// ---------------------------------------------------------------------------------------------
// 3. Tokens and their jti
// ---------------------------------------------------------------------------------------------

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// What a jti claim may be: a JSON string literal (hostile escapes included), a Rust string
/// written as JSON (so the decoded value is known), or any JSON value.
#[derive(Debug, Clone)]
enum Jti {
    Known(String),
    Raw(String),
}

fn jti() -> impl Strategy<Value = Jti> {
    prop_oneof![
        3 => hostile_text(64).prop_map(Jti::Known),
        1 => (250usize..262, prop::sample::select(vec!["j", "é", "\u{10ffff}"]))
            .prop_map(|(n, c)| Jti::Known(c.repeat(n))),
        1 => prop::sample::select(vec!["a\0b", "\0", "", " ", "x\u{85}", "\u{202e}evil"])
            .prop_map(|s| Jti::Known(s.to_owned())),
        2 => json_string().prop_map(Jti::Raw),
        1 => json_text().prop_map(Jti::Raw),
    ]
}

/// A token candidate: any text, a JWT with a known jti, a JWT with arbitrary payload bytes or
/// JSON, all possibly padded with white space; and the 16 KiB boundary.
fn token_text() -> impl Strategy<Value = (String, Option<Jti>)> {
    let header = b64(br#"{"alg":"HS256","typ":"JWT"}"#);
    let ws = prop::sample::select(vec!["", " ", "\n", "\t\r\n ", "\u{a0}", "\u{3000}"]);
    let jwt_known = (
        jti(),
        prop::collection::vec((json_key(), json_text()), 0..3),
    )
        .prop_map(move |(j, extra)| {
            let value = match &j {
                Jti::Known(s) => serde_json::to_string(s).expect("string"),
                Jti::Raw(v) => v.clone(),
            };
            let mut fields: Vec<String> = extra
                .into_iter()
                .filter(|(k, _)| k != "\"jti\"")
                .map(|(k, v)| format!("{k}:{v}"))
                .collect();
            fields.push(format!("\"jti\":{value}"));
            (fields.join(","), j)
        });
    let header2 = header.clone();
    let header3 = header.clone();
    prop_oneof![
        2 => hostile_text(100).prop_map(|s| (s, None)),
        4 => (jwt_known, ws.clone(), ws.clone()).prop_map(move |((fields, j), a, z)| {
            let json = format!("{{{fields}}}");
            // The jti is known only when the whole payload is JSON (a sibling may not be).
            let valid = serde_json::from_str::<serde_json::Value>(&json).is_ok();
            let payload = b64(json.as_bytes());
            (format!("{a}{header}.{payload}.sig{z}"), valid.then_some(j))
        }),
        2 => json_text().prop_map(move |p| (format!("{header2}.{}.sig", b64(p.as_bytes())), None)),
        1 => (prop::collection::vec(any::<u8>(), 0..200), "[A-Za-z0-9_=.-]{0,40}").prop_map(
            move |(p, tail)| (format!("{header3}.{}{tail}", b64(&p)), None)
        ),
        1 => "[A-Za-z0-9_=-]{0,40}\\.[A-Za-z0-9_=-]{0,80}(\\.[A-Za-z0-9_=-]{0,20}){0,3}"
            .prop_map(|s| (s, None)),
        1 => (16 * 1024 - 2..=16 * 1024 + 2usize, ws)
            .prop_map(|(n, w)| (format!("{w}{}{w}", "t".repeat(n)), None)),
        1 => deep_nesting().prop_map(|p| (format!("h.{}.s", b64(&p)), None)),
    ]
}

#[test]
fn token_parsing_never_panics_and_a_jti_is_always_storable() {
    let mut runner = TestRunner::new(config(1024));
    let result = runner.run(&token_text(), |(raw, known)| {
        let token = TenantToken::parse(&raw);
        let trimmed = raw.trim();
        let should = !trimmed.is_empty()
            && trimmed.len() <= 16 * 1024
            && trimmed.bytes().all(|b| b.is_ascii_graphic());
        prop_assert_eq!(token.is_some(), should, "parse of {:?}", raw);
        let Some(token) = token else { return Ok(()) };
        prop_assert_eq!(token.expose(), trimmed);
        prop_assert_eq!(token.fingerprint().as_str().len(), 16);
        let jti = token.jti();
        if let Some(j) = &jti {
            prop_assert!(!j.is_empty() && j.chars().count() <= 256, "jti {:?}", j);
            prop_assert!(!j.chars().any(char::is_control), "jti {:?}", j);
        }
        if let Some(Jti::Known(s)) = known {
            let keep = !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control);
            prop_assert_eq!(jti, keep.then_some(s));
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. AMQP headers
// ---------------------------------------------------------------------------------------------

fn short_string() -> impl Strategy<Value = ShortString> {
    prop_oneof![
        hostile_text(80),
        prop::sample::select(vec![
            " 42 ",
            "4294967295",
            "4294967296",
            "-1",
            "+7",
            "٣",
            "0x1"
        ])
        .prop_map(str::to_owned),
    ]
    .prop_map(|s| {
        let mut s = s;
        while s.len() > 255 {
            s.pop();
        }
        ShortString::from(s)
    })
}

fn edge_i64() -> impl Strategy<Value = i64> {
    prop_oneof![
        any::<i64>(),
        prop::sample::select(vec![
            0,
            1,
            -1,
            i64::from(u32::MAX),
            i64::from(u32::MAX) + 1,
            i64::from(i32::MIN),
            i64::MIN,
            i64::MAX,
        ]),
    ]
}

fn edge_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        prop::sample::select(vec![
            0,
            u64::from(u32::MAX),
            u64::from(u32::MAX) + 1,
            i64::MAX as u64,
            i64::MAX as u64 + 1,
            u64::MAX,
        ]),
    ]
}

/// Text that is, or is nearly, a number.
fn numeric_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        edge_i64().prop_map(|n| n.to_string()),
        edge_u64().prop_map(|n| format!(" {n}\n")),
        prop::sample::select(vec![
            "18446744073709551616",
            "+4294967295",
            "-0",
            "1e3",
            "4_2",
            "\u{a0}7\u{3000}",
            "",
        ])
        .prop_map(str::to_owned),
    ]
    .prop_map(String::into_bytes)
}

fn amqp_value() -> impl Strategy<Value = AMQPValue> {
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..64),
        hostile_text(64).prop_map(String::into_bytes),
        numeric_text(),
    ];
    let leaf = prop_oneof![
        any::<bool>().prop_map(AMQPValue::Boolean),
        any::<i8>().prop_map(AMQPValue::ShortShortInt),
        any::<u8>().prop_map(AMQPValue::ShortShortUInt),
        any::<i16>().prop_map(AMQPValue::ShortInt),
        any::<u16>().prop_map(AMQPValue::ShortUInt),
        any::<i32>().prop_map(AMQPValue::LongInt),
        any::<u32>().prop_map(AMQPValue::LongUInt),
        edge_i64().prop_map(AMQPValue::LongLongInt),
        any::<f32>().prop_map(AMQPValue::Float),
        any::<f64>().prop_map(AMQPValue::Double),
        (any::<u8>(), any::<u32>())
            .prop_map(|(scale, value)| AMQPValue::DecimalValue(DecimalValue { scale, value })),
        short_string().prop_map(AMQPValue::ShortString),
        bytes.clone().prop_map(|b| AMQPValue::LongString(b.into())),
        edge_u64().prop_map(AMQPValue::Timestamp),
        bytes.prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
        Just(AMQPValue::Void),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
            prop::collection::vec((short_string(), inner), 0..4).prop_map(|kv| {
                let mut t = FieldTable::default();
                for (k, v) in kv {
                    t.insert(k, v);
                }
                AMQPValue::FieldTable(t)
            }),
        ]
    })
}

/// What `header_str` must answer: the text of a (UTF-8) string header, nothing else.
fn expected_str(v: &AMQPValue) -> Option<&str> {
    match v {
        AMQPValue::ShortString(s) => Some(s.as_str()),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

/// What `header_u32` must answer: the header's integer (of any width, a timestamp, or a
/// decimal string), when it fits in u32; computed in i128, so nothing wraps.
fn expected_u32(v: &AMQPValue) -> Option<u32> {
    let n: i128 = match v {
        AMQPValue::ShortShortInt(n) => (*n).into(),
        AMQPValue::ShortShortUInt(n) => (*n).into(),
        AMQPValue::ShortInt(n) => (*n).into(),
        AMQPValue::ShortUInt(n) => (*n).into(),
        AMQPValue::LongInt(n) => (*n).into(),
        AMQPValue::LongUInt(n) => (*n).into(),
        AMQPValue::LongLongInt(n) => (*n).into(),
        AMQPValue::Timestamp(n) => (*n).into(),
        other => expected_str(other)?.trim().parse().ok()?,
    };
    u32::try_from(n).ok()
}

#[test]
fn header_readers_never_panic_and_numbers_fit_u32() {
    let names = prop_oneof![
        prop::sample::select(vec!["x-attempts", "traceparent", "", "x"]).prop_map(str::to_owned),
        hostile_text(16),
        // Longer than an AMQP short string can be: no header has such a name.
        (256usize..400).prop_map(|n| "n".repeat(n)),
    ];
    let headers = prop::collection::vec((short_string(), amqp_value()), 0..6);
    let strategy = (headers, names, any::<bool>(), amqp_value());
    let mut runner = TestRunner::new(config(1024));
    let result = runner.run(&strategy, |(headers, name, present, value)| {
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert(k, v);
        }
        if present && name.len() <= 255 {
            table.insert(ShortString::from(name.as_str()), value);
        }
        let expected = table.inner().get(name.as_str()).cloned();
        let props = BasicProperties::default().with_headers(table);
        let s = header_str(&props, &name);
        let n = header_u32(&props, &name);
        prop_assert_eq!(s, expected.as_ref().and_then(expected_str));
        prop_assert_eq!(n, expected.as_ref().and_then(expected_u32));
        let none = BasicProperties::default();
        prop_assert_eq!(header_str(&none, &name), None);
        prop_assert_eq!(header_u32(&none, &name), None);
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Issuer bodies, end to end
// ---------------------------------------------------------------------------------------------

/// What a hostile issuer answers, by case: the container asked for starts with `case-N`.
struct HostileIssuer(Vec<Vec<u8>>);

impl wiremock::Respond for HostileIssuer {
    fn respond(&self, req: &wiremock::Request) -> wiremock::ResponseTemplate {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let case = body["ten"]
            .as_str()
            .and_then(|t| t.split('-').nth(1))
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|i| self.0.get(i));
        match case {
            Some(b) => wiremock::ResponseTemplate::new(200).set_body_bytes(b.clone()),
            None => wiremock::ResponseTemplate::new(500),
        }
    }
}

fn jwt_with(payload: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(payload),
        b64(b"sig")
    )
}

/// The issuer's 200 body is read as raw text or `{"token": ...}`; a body that is no token is
/// an issuer fault (transient), never a stored token; a token whose jti Postgres could not
/// hold is stored without its jti.
#[test]
fn hostile_issuer_bodies_are_refused_or_stored_safely() {
    /// `Some(jti)` when the body must yield a stored token with that jti (or none).
    type Expect = Option<Option<&'static str>>;
    let plain = jwt_with(br#"{"ten":"c","jti":"plain-jti"}"#);
    let cases: Vec<(Vec<u8>, Expect)> = vec![
        (
            format!("\n  {plain}\r\n").into_bytes(),
            Some(Some("plain-jti")),
        ),
        (
            json!({ "token": jwt_with(br#"{"jti":"wrapped"}"#) })
                .to_string()
                .into_bytes(),
            Some(Some("wrapped")),
        ),
        (jwt_with(br#"{"jti":"a\u0000b"}"#).into_bytes(), Some(None)),
        (
            jwt_with(format!(r#"{{"jti":"{}"}}"#, "j".repeat(300)).as_bytes()).into_bytes(),
            Some(None),
        ),
        (jwt_with(br#"{"jti":1e400}"#).into_bytes(), Some(None)),
        (
            jwt_with(br#"{"jti":"dup","jti":"last"}"#).into_bytes(),
            Some(Some("last")),
        ),
        (
            jwt_with(&"[".repeat(5000).into_bytes()).into_bytes(),
            Some(None),
        ),
        (br#"{"token":"x","token":"last.one"}"#.to_vec(), Some(None)),
        (br#"{"token":"a\u0000b"}"#.to_vec(), None),
        (br#"{"token":12}"#.to_vec(), None),
        (br#"{"token":null}"#.to_vec(), None),
        (
            format!(r#"{{"token":{}1{}}}"#, "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            None,
        ),
        (vec![0xff, 0xfe, b'a'], None),
        (b"   \n".to_vec(), None),
        (Vec::new(), None),
        (b"<html>502 Bad Gateway</html>".to_vec(), None),
        (vec![b'a'; 1024 * 1024], None),
        // A token, then white space past the 20 KiB the client reads, then no token: the body
        // as a whole is not a token.
        (
            format!("{plain}{}<html>oops</html>", " ".repeat(21 * 1024)).into_bytes(),
            None,
        ),
    ];
    let rt = runtime();
    rt.block_on(async {
        let env = TestEnv::new().await;
        let server = MockServer::start().await;
        wiremock::Mock::given(wiremock::matchers::method("POST"))
            .respond_with(HostileIssuer(cases.iter().map(|(b, _)| b.clone()).collect()))
            .mount(&server)
            .await;
        // No retries: one answer decides.
        let (p, store) = provisioner(&env, &server, |s| {
            s.retry = RetryPolicy {
                min_delay: Duration::from_millis(1),
                max_delay: Duration::from_millis(1),
                budget: Duration::ZERO,
            };
        })
        .await;
        let reqs: Vec<ProvisionRequest> = (0..cases.len())
            .map(|i| {
                let env = Envelope {
                    routing_key: "tenant.created",
                    ..Default::default()
                };
                let body = json!({"tenant_id": support::tenant("hostile"), "tenant_name": format!("case {i}")});
                decode(&env, body.to_string().as_bytes()).expect("valid request")
            })
            .collect();
        let outcomes = p.provision(&reqs).await.expect("provisioned");
        let mut wrong = Vec::new();
        for (i, ((_, expect), (r, outcome))) in cases.iter().zip(reqs.iter().zip(&outcomes)).enumerate() {
            let stored_jti: Option<Option<String>> =
                sqlx::query_scalar("SELECT jti FROM tenants WHERE tenant_id = $1 AND issued_at IS NOT NULL")
                    .bind(r.tenant_id.as_str())
                    .fetch_optional(store.pool())
                    .await
                    .expect("tenant row");
            let ok = match (expect, outcome) {
                (Some(jti), Outcome::Ready(_)) => {
                    stored_jti.as_ref().map(Option::as_deref) == Some(*jti)
                }
                (None, Outcome::Failed(IssuerError::Transient { status: Some(200), .. })) => {
                    stored_jti.is_none()
                }
                _ => false,
            };
            if !ok {
                wrong.push(format!("case {i}: expected {expect:?}, got {outcome:?}, stored jti {stored_jti:?}"));
            }
        }
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
        env.cleanup().await;
    });
}
