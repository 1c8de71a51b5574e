//! Writes the committed seed corpora, `fuzz/seeds/<target>/`: the contract's examples
//! (`tests/fixtures/contract/`) and the awkward cases issue 9 names — deeply nested JSON, huge
//! numbers, invalid UTF-8, duplicate keys, odd content types, and AMQP field tables with every
//! value type. Run from `fuzz/`: `cargo run --example seeds` (plain cargo, no sanitizer).

use std::fs;
use std::path::{Path, PathBuf};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};
use tenant_tokens_fuzz::{DecodeInput, delivery_bytes};

const CE: &str = "application/cloudevents+json";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn main() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR"));
    let contract = fuzz.join("../tests/fixtures/contract");
    let seeds = fuzz.join("seeds");
    write_all(&seeds.join("decode"), decode_seeds(&contract));
    write_all(&seeds.join("issuer_response"), issuer_seeds());
    write_all(&seeds.join("dead_letter_headers"), header_seeds(&contract));
}

fn write_all(dir: &PathBuf, seeds: Vec<(String, Vec<u8>)>) {
    fs::create_dir_all(dir).expect("seed directory");
    for (name, bytes) in &seeds {
        fs::write(dir.join(name), bytes).expect("seed file");
    }
    println!("{}: {} seeds", dir.display(), seeds.len());
}

fn fixture(contract: &Path, name: &str) -> Vec<u8> {
    fs::read(contract.join(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn decode_seeds(contract: &Path) -> Vec<(String, Vec<u8>)> {
    let seed = |key: &str, ct: Option<&str>, body: &[u8]| {
        DecodeInput::join([Some(key), ct, None, None, None], body)
    };
    let mut out = Vec::new();
    for key in [
        "tenant.created",
        "extension.requested",
        "tenant.token.rotate",
        "tenant.deleted",
    ] {
        let body = fixture(contract, &format!("{key}.json"));
        out.push((format!("contract-{key}"), seed(key, None, &body)));
        let ce = contract.join(format!("{key}.cloudevents.json"));
        if ce.exists() {
            let body = fixture(contract, &format!("{key}.cloudevents.json"));
            out.push((
                format!("contract-{key}-cloudevents"),
                seed(key, Some(CE), &body),
            ));
        }
    }
    let full = DecodeInput::join(
        [
            Some("tenant.created"),
            Some("application/json; charset=utf-8"),
            Some("msg-1"),
            Some("corr-1"),
            Some(TRACEPARENT),
        ],
        br#"{"tenant_id":"acme-42","tenant_name":"Acme Corp","extra":{"a":[1,2,3]}}"#,
    );
    out.push(("all-properties".into(), full));
    let created = |name: &str, body: &[u8]| (name.to_owned(), seed("tenant.created", None, body));
    out.push(created("nested-arrays", &nested("[", "]", 200)));
    out.push(created(
        "nested-objects",
        &nested(r#"{"tenant_id":"#, "}", 200),
    ));
    out.push(created("unclosed-nesting", "[".repeat(600).as_bytes()));
    out.push(created(
        "huge-number",
        br#"{"tenant_id":1e400,"tenant_name":18446744073709551616}"#,
    ));
    out.push(created(
        "long-number",
        format!(r#"{{"tenant_id":"a","n":{}}}"#, "9".repeat(1200)).as_bytes(),
    ));
    out.push(created(
        "invalid-utf8",
        b"{\"tenant_id\":\"acme\xff\xfe\",\"tenant_name\":\"\xc3\x28\"}",
    ));
    out.push(created(
        "lone-surrogate",
        br#"{"tenant_id":"a","tenant_name":"\ud800"}"#,
    ));
    out.push(created(
        "duplicate-keys",
        br#"{"tenant_id":"first","tenant_id":"second","tenant_name":"x","tenant_name":null}"#,
    ));
    out.push(created(
        "nul-in-name",
        br#"{"tenant_id":"a","tenant_name":"x\u0000y"}"#,
    ));
    out.push(created("not-an-object", b"[\"tenant_id\",\"acme-42\"]"));
    out.push(created("empty", b""));
    for (i, ct) in [
        "Application/JSON; charset=utf-8",
        "text/plain",
        "application/cloudevents-batch+json",
        ";",
        " application/cloudevents+json ; charset=utf-8",
        "application/json\u{0}",
    ]
    .iter()
    .enumerate()
    {
        let body = fixture(contract, "tenant.created.cloudevents.json");
        out.push((
            format!("content-type-{i}"),
            seed("tenant.created", Some(ct), &body),
        ));
    }
    out.push((
        "cloudevent-wrong-type".into(),
        seed(
            "tenant.deleted",
            Some(CE),
            br#"{"specversion":"1.0","type":"tenant.created","id":"1","data":{"tenant_id":"a"}}"#,
        ),
    ));
    out.push((
        "rotate-bad-fields".into(),
        seed(
            "tenant.token.rotate",
            None,
            format!(
                r#"{{"tenant_id":"a","now":"yes","reason":"{}"}}"#,
                "r".repeat(300)
            )
            .as_bytes(),
        ),
    ));
    out.push((
        "unknown-key".into(),
        seed("tenant.renamed", None, b"{\"tenant_id\":\"a\"}"),
    ));
    out
}

fn nested(open: &str, close: &str, depth: usize) -> Vec<u8> {
    format!("{}\"a\"{}", open.repeat(depth), close.repeat(depth)).into_bytes()
}

fn jwt(payload: &[u8]) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        e.encode(payload),
        e.encode(b"signature")
    )
}

fn issuer_seeds() -> Vec<(String, Vec<u8>)> {
    let plain = jwt(br#"{"ten":"acme-corp-3f9a12c0","jti":"4f1c2e8a9b7d4c3e"}"#);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("contract-raw-jwt", format!("{plain}\n").into_bytes()),
        (
            "contract-json",
            format!(r#"{{"token": "{plain}"}}"#).into_bytes(),
        ),
        ("white-space", format!("\r\n  {plain} \t\n").into_bytes()),
        ("jti-nul", jwt(br#"{"jti":"a\u0000b"}"#).into_bytes()),
        (
            "jti-long",
            jwt(format!(r#"{{"jti":"{}"}}"#, "j".repeat(300)).as_bytes()).into_bytes(),
        ),
        (
            "jti-huge-number",
            jwt(br#"{"jti":1e400,"exp":18446744073709551616}"#).into_bytes(),
        ),
        (
            "jti-duplicate",
            jwt(br#"{"jti":"first","jti":"last"}"#).into_bytes(),
        ),
        (
            "jti-nested",
            jwt(&nested(r#"{"jti":"#, "}", 200)).into_bytes(),
        ),
        (
            "payload-invalid-utf8",
            jwt(b"{\"jti\":\"\xff\xfe\"}").into_bytes(),
        ),
        ("payload-padded", format!("{plain}==").into_bytes()),
        ("payload-not-base64", b"aaa.%%%%.ccc".to_vec()),
        (
            "json-duplicate-token",
            br#"{"token":"x","token":"last.one"}"#.to_vec(),
        ),
        ("json-token-number", br#"{"token":12}"#.to_vec()),
        ("json-nested", nested(r#"{"token":"#, "}", 200)),
        ("json-unclosed", b"{\"token\":\"a.b.c\"".to_vec()),
        ("invalid-utf8", vec![0xff, 0xfe, b'a']),
        (
            "html-error",
            b"<html>502 Bad Gateway: fuzz-master-token</html>".to_vec(),
        ),
        ("empty", Vec::new()),
        ("spaces", b"   \n".to_vec()),
    ];
    cases.into_iter().map(|(n, b)| (n.to_owned(), b)).collect()
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

fn table(entries: Vec<(&str, AMQPValue)>) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in entries {
        t.insert(k.into(), v);
    }
    t
}

/// One header of every AMQP value type, nested ones included. (Not `ShortString`: it has no
/// wire tag in a field table, so no delivery carries one.)
fn every_type() -> FieldTable {
    let nested = table(vec![
        ("count", AMQPValue::LongLongInt(3)),
        ("reason", s("expired")),
    ]);
    table(vec![
        ("bool", AMQPValue::Boolean(true)),
        ("i8", AMQPValue::ShortShortInt(-8)),
        ("u8", AMQPValue::ShortShortUInt(8)),
        ("i16", AMQPValue::ShortInt(-16)),
        ("u16", AMQPValue::ShortUInt(16)),
        ("i32", AMQPValue::LongInt(-32)),
        ("u32", AMQPValue::LongUInt(u32::MAX)),
        ("i64", AMQPValue::LongLongInt(i64::MIN)),
        ("f32", AMQPValue::Float(f32::NAN)),
        ("f64", AMQPValue::Double(-0.0)),
        (
            "decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12345,
            }),
        ),
        ("long", s("long")),
        (
            "array",
            AMQPValue::FieldArray(FieldArray::from(vec![s("a"), AMQPValue::Void])),
        ),
        ("time", AMQPValue::Timestamp(u64::MAX)),
        ("table", AMQPValue::FieldTable(nested)),
        (
            "bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 0xff])),
        ),
        ("void", AMQPValue::Void),
    ])
}

fn header_seeds(contract: &Path) -> Vec<(String, Vec<u8>)> {
    let body = fixture(contract, "tenant.created.json");
    let props = |h: FieldTable| {
        BasicProperties::default()
            .with_content_type("application/json".into())
            .with_message_id("msg-1".into())
            .with_correlation_id("corr-1".into())
            .with_headers(h)
    };
    let worker_dead_letter = table(vec![
        (
            "x-tt-error",
            s("issuer rejected the request with HTTP 400: container name not allowed"),
        ),
        ("x-tt-error-kind", s("rejected")),
        ("x-tt-attempts", AMQPValue::LongLongInt(0)),
        ("x-tt-original-routing-key", s("tenant.created")),
        ("x-tt-failed-at", s("2026-11-30T12:00:01.000000Z")),
        ("x-tt-issuer-status", AMQPValue::LongLongInt(400)),
        ("traceparent", s(TRACEPARENT)),
    ]);
    let death = table(vec![
        ("count", AMQPValue::LongLongInt(8)),
        ("reason", s("delivery_limit")),
        ("queue", s("tenant-tokens.requests")),
        ("time", AMQPValue::Timestamp(1_796_000_000)),
        ("exchange", s("tenant.events")),
        (
            "routing-keys",
            AMQPValue::FieldArray(FieldArray::from(vec![s("tenant.created")])),
        ),
    ]);
    let broker_dead_letter = table(vec![
        (
            "x-death",
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        ),
        ("x-first-death-reason", s("delivery_limit")),
        ("x-first-death-queue", s("tenant-tokens.requests")),
        ("x-delivery-count", AMQPValue::LongInt(8)),
    ]);
    let odd_numbers = table(vec![
        ("x-tt-attempts", s(" 42 ")),
        ("x-tt-issuer-status", AMQPValue::ShortShortUInt(200)),
        (
            "x-tt-original-routing-key",
            AMQPValue::LongString(LongString::from("k".repeat(300))),
        ),
        (
            "x-tt-error",
            AMQPValue::LongString(LongString::from(vec![0xffu8, 0xfe, 0x1b])),
        ),
        (
            "traceparent",
            AMQPValue::ByteArray(ByteArray::from(TRACEPARENT.as_bytes().to_vec())),
        ),
    ]);
    let everything = BasicProperties::default()
        .with_content_type(
            super_long("application/cloudevents+json; x=")
                .as_str()
                .into(),
        )
        .with_content_encoding("gzip".into())
        .with_headers(every_type())
        .with_delivery_mode(2)
        .with_priority(9)
        .with_correlation_id("c".into())
        .with_reply_to("r".into())
        .with_expiration("60000".into())
        .with_message_id("m".into())
        .with_timestamp(u64::MAX)
        .with_type("tenant.created".into())
        .with_user_id("guest".into())
        .with_app_id("a".into())
        .with_cluster_id("x".into());
    let ce = fixture(contract, "tenant.created.cloudevents.json");
    vec![
        (
            "no-properties",
            delivery_bytes("tenant.created", &BasicProperties::default(), &body),
        ),
        (
            "contract-worker-dead-letter",
            delivery_bytes("tenant.created", &props(worker_dead_letter), &body),
        ),
        (
            "broker-dead-letter",
            delivery_bytes("tenant-tokens.requests", &props(broker_dead_letter), &body),
        ),
        (
            "odd-header-types",
            delivery_bytes("tenant.created", &props(odd_numbers), &body),
        ),
        (
            "every-amqp-type",
            delivery_bytes("tenant.created", &props(every_type()), &body),
        ),
        (
            "every-property",
            delivery_bytes("tenant.created", &everything, &ce),
        ),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_owned(), b))
    .collect()
}

/// `prefix` padded to the 255 bytes an AMQP short string holds.
fn super_long(prefix: &str) -> String {
    let mut s = prefix.to_owned();
    while s.len() < 255 {
        s.push('y');
    }
    s
}
