//! The stub issuer over real HTTP on loopback: what the worker and other tools rely on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::SecretString;
use serde_json::{Value, json};
use tenant_tokens::tools::stub_issuer::{StubConfig, StubIssuer, StubMode, StubStats};

const MASTER: &str = "test-master-token";

fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

async fn start() -> StubIssuer {
    StubIssuer::start(any_port(), StubConfig::new(SecretString::from(MASTER)))
        .await
        .expect("stub starts")
}

/// Sends an issue request; returns status and body text.
async fn issue(
    client: &reqwest::Client,
    stub: &StubIssuer,
    bearer: Option<&str>,
    key: Option<&str>,
    body: Value,
) -> (u16, String) {
    let mut req = client
        .post(format!("{}/api/tokens/issue", stub.url()))
        .json(&body);
    if let Some(bearer) = bearer {
        req = req.bearer_auth(bearer);
    }
    if let Some(key) = key {
        req = req.header("Idempotency-Key", key);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body read"))
}

fn payload(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "a JWT has three parts: {token}");
    for part in &parts {
        URL_SAFE_NO_PAD.decode(part).expect("base64url part");
    }
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).expect("header b64"))
            .expect("header JSON");
    assert_eq!(header, json!({"alg": "HS256", "typ": "JWT"}));
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("payload b64"))
        .expect("payload JSON")
}

#[tokio::test]
async fn wrong_or_missing_bearer_is_403() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let (status, body) = issue(&client, &stub, Some("nope"), None, json!({"ten": "a"})).await;
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        json!({"error": "forbidden"})
    );
    let (status, _) = issue(&client, &stub, None, None, json!({"ten": "a"})).await;
    assert_eq!(status, 403);
    assert_eq!(stub.stats().unauthorized, 2);
    assert_eq!(stub.stats().issued, 0);
    stub.shutdown().await;
}

#[tokio::test]
async fn bad_bodies_are_400_with_a_reason() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let (status, body) = issue(&client, &stub, Some(MASTER), None, json!({"exp": 1})).await;
    assert_eq!(status, 400);
    let body: Value = serde_json::from_str(&body).expect("JSON error body");
    assert!(
        body["message"].as_str().unwrap_or("").contains("ten"),
        "{body}"
    );
    let (status, _) = issue(
        &client,
        &stub,
        Some(MASTER),
        None,
        json!({"ten": "Bad_Name"}),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = issue(&client, &stub, Some(MASTER), None, json!(["ten"])).await;
    assert_eq!(status, 400);
    stub.shutdown().await;
}

#[tokio::test]
async fn token_is_a_jwt_with_ten_jti_iat_and_extras() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/api/tokens/issue", stub.url()))
        .bearer_auth(MASTER)
        .json(&json!({"ten": "acme-corp-3f9a12c0", "exp": 1_900_000_000, "dd": 1}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let token = resp.text().await.expect("body");
    let claims = payload(&token);
    assert_eq!(claims["ten"], "acme-corp-3f9a12c0");
    assert_eq!(claims["exp"], 1_900_000_000);
    assert_eq!(claims["dd"], 1);
    let jti = claims["jti"].as_str().expect("jti string");
    assert_eq!(jti.len(), 32);
    assert!(jti.bytes().all(|b| b.is_ascii_hexdigit()));
    assert!(claims["iat"].as_i64().expect("iat number") > 1_600_000_000);
    stub.shutdown().await;
}

#[tokio::test]
async fn same_idempotency_key_replays_the_same_token() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let body = json!({"ten": "tenant-one"});
    let (s1, t1) = issue(&client, &stub, Some(MASTER), Some("k-1"), body.clone()).await;
    let (s2, t2) = issue(&client, &stub, Some(MASTER), Some("k-1"), body).await;
    assert_eq!((s1, s2), (200, 200));
    assert_eq!(t1, t2);
    let stats = stub.stats();
    assert_eq!(stats.issued, 1);
    assert_eq!(stats.replayed, 1);
    assert_eq!(stats.distinct_containers, 1);
    assert_eq!(stats.issued_per_container_max, 1);

    // The same key for another container is a client bug.
    let (s3, _) = issue(
        &client,
        &stub,
        Some(MASTER),
        Some("k-1"),
        json!({"ten": "tenant-two"}),
    )
    .await;
    assert_eq!(s3, 422);

    // Stats are served over HTTP too, for other processes.
    let over_http: StubStats = client
        .get(format!("{}/stub/stats", stub.url()))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("stats JSON");
    assert_eq!(over_http, stub.stats());
    stub.shutdown().await;
}

#[tokio::test]
async fn different_keys_mint_different_tokens() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let body = json!({"ten": "tenant-one"});
    let (_, t1) = issue(&client, &stub, Some(MASTER), Some("a"), body.clone()).await;
    let (_, t2) = issue(&client, &stub, Some(MASTER), Some("b"), body).await;
    assert_ne!(payload(&t1)["jti"], payload(&t2)["jti"]);
    let stats = stub.stats();
    assert_eq!(stats.issued, 2);
    assert_eq!(stats.distinct_containers, 1);
    assert_eq!(stats.issued_per_container_max, 2);
    stub.shutdown().await;
}

#[tokio::test]
async fn no_idempotency_mints_every_time() {
    let mut config = StubConfig::new(SecretString::from(MASTER));
    config.honour_idempotency = false;
    let stub = StubIssuer::start(any_port(), config).await.expect("start");
    let client = reqwest::Client::new();
    let body = json!({"ten": "tenant-one"});
    let (_, t1) = issue(&client, &stub, Some(MASTER), Some("k"), body.clone()).await;
    let (_, t2) = issue(&client, &stub, Some(MASTER), Some("k"), body).await;
    assert_ne!(t1, t2);
    assert_eq!(stub.stats().issued, 2);
    assert_eq!(stub.stats().replayed, 0);
    stub.shutdown().await;
}

#[tokio::test]
async fn fail_next_then_normal() {
    let stub = start().await;
    let client = reqwest::Client::new();
    stub.set_mode(StubMode::FailNext { n: 2, status: 503 });
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let (s, _) = issue(&client, &stub, Some(MASTER), None, json!({"ten": "t"})).await;
        statuses.push(s);
    }
    assert_eq!(statuses, [503, 503, 200]);
    assert_eq!(stub.stats().failed, 2);
    stub.shutdown().await;
}

#[tokio::test]
async fn unauthorized_mode_is_401_and_mode_is_settable_over_http() {
    let stub = start().await;
    let client = reqwest::Client::new();
    stub.set_mode(StubMode::Unauthorized);
    let (s, _) = issue(&client, &stub, Some(MASTER), None, json!({"ten": "t"})).await;
    assert_eq!(s, 401);
    assert_eq!(stub.stats().unauthorized, 1);

    let resp = client
        .post(format!("{}/stub/mode", stub.url()))
        .json(&json!({"mode": "normal"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 204);
    let (s, _) = issue(&client, &stub, Some(MASTER), None, json!({"ten": "t"})).await;
    assert_eq!(s, 200);

    let resp = client
        .post(format!("{}/stub/mode", stub.url()))
        .json(&json!({"mode": "fail_all", "status": 500}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 204);
    let (s, _) = issue(&client, &stub, Some(MASTER), None, json!({"ten": "t"})).await;
    assert_eq!(s, 500);

    let resp = client
        .post(format!("{}/stub/mode", stub.url()))
        .json(&json!({"mode": "bogus"}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 400);
    stub.shutdown().await;
}

#[tokio::test]
async fn latency_is_applied() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let latency = Duration::from_millis(200);
    stub.set_latency(latency);
    let started = Instant::now();
    let (s, _) = issue(&client, &stub, Some(MASTER), None, json!({"ten": "t"})).await;
    assert_eq!(s, 200);
    assert!(started.elapsed() >= latency, "{:?}", started.elapsed());
    stub.shutdown().await;
}

#[tokio::test]
async fn healthz_and_many_concurrent_requests() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let resp = client
        .get(format!("{}/healthz", stub.url()))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 200);

    stub.set_latency(Duration::from_millis(20));
    let calls = (0..300).map(|i| {
        let client = client.clone();
        let url = format!("{}/api/tokens/issue", stub.url());
        async move {
            client
                .post(url)
                .bearer_auth(MASTER)
                .header("Idempotency-Key", format!("k-{}", i % 100))
                .json(&json!({"ten": format!("t-{}", i % 100)}))
                .send()
                .await
                .expect("sent")
                .status()
                .as_u16()
        }
    });
    let statuses = futures::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| *s == 200));
    let stats = stub.stats();
    assert_eq!(stats.requests, 300);
    assert_eq!(stats.issued, 100);
    assert_eq!(stats.replayed, 200);
    assert_eq!(stats.distinct_containers, 100);
    assert_eq!(stats.issued_per_container_max, 1);
    stub.shutdown().await;
}
