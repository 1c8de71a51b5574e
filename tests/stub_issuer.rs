//! The stub issuer over real HTTP on loopback: what the worker and other tools rely on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use secrecy::SecretString;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tenant_tokens::tools::stub_issuer::{
    RevokedToken, StubConfig, StubIssuer, StubMode, StubStats,
};

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

/// Issues a token for `ten` with the master token and returns it.
async fn mint(client: &reqwest::Client, stub: &StubIssuer, ten: &str) -> String {
    let (status, token) = issue(client, stub, Some(MASTER), None, json!({ "ten": ten })).await;
    assert_eq!(status, 200, "issue for {ten}: {token}");
    token
}

/// `{stub}/{path}` with `token` as a properly encoded query parameter, if given.
fn token_url(stub: &StubIssuer, path: &str, token: Option<&str>) -> reqwest::Url {
    let mut url = reqwest::Url::parse(&format!("{}{path}", stub.url())).expect("stub URL");
    if let Some(token) = token {
        url.query_pairs_mut().append_pair("token", token);
    }
    url
}

/// Sends a revoke request; returns status and body text.
async fn revoke(
    client: &reqwest::Client,
    stub: &StubIssuer,
    bearer: Option<&str>,
    token: Option<&str>,
) -> (u16, String) {
    let mut req = client.post(token_url(stub, "/api/tokens/revoke", token));
    if let Some(bearer) = bearer {
        req = req.bearer_auth(bearer);
    }
    let resp = req.send().await.expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body read"))
}

/// Sends an inspect request with the master token; returns status and body text.
async fn inspect(client: &reqwest::Client, stub: &StubIssuer, token: &str) -> (u16, String) {
    let resp = client
        .get(token_url(stub, "/api/tokens/inspect", Some(token)))
        .bearer_auth(MASTER)
        .send()
        .await
        .expect("request sent");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body read"))
}

/// The contract's fingerprint: first 16 hex chars of SHA-256 of the token.
fn fingerprint(token: &str) -> String {
    hex::encode(&Sha256::digest(token.as_bytes())[..8])
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

#[tokio::test]
async fn revoking_an_issued_token_is_200_and_inspect_then_says_gone() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let token = mint(&client, &stub, "acme-corp").await;
    let (status, body) = inspect(&client, &stub, &token).await;
    assert_eq!(status, 200, "{body}");
    let live: Value = serde_json::from_str(&body).expect("inspect JSON");
    assert_eq!(live["ten"], "acme-corp");
    assert_eq!(live["jti"], payload(&token)["jti"]);

    let (status, body) = revoke(&client, &stub, Some(MASTER), Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = inspect(&client, &stub, &token).await;
    assert_eq!(status, 410);
    let stats = stub.stats();
    assert_eq!((stats.revoke_requests, stats.revoked), (1, 1));
    // Revocations do not disturb the issue-side counters.
    assert_eq!((stats.requests, stats.issued, stats.failed), (1, 1, 0));
    stub.shutdown().await;
}

#[tokio::test]
async fn second_revoke_is_400_already_revoked_and_counts_in_revoke_calls() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let token = mint(&client, &stub, "acme-corp").await;
    let (first, _) = revoke(&client, &stub, Some(MASTER), Some(&token)).await;
    let (second, body) = revoke(&client, &stub, Some(MASTER), Some(&token)).await;
    assert_eq!((first, second), (200, 400));
    assert!(body.contains("token already revoked"), "{body}");
    let revoked = stub.revoked();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0].revoke_calls, 2);
    let stats = stub.stats();
    assert_eq!((stats.revoked, stats.revoke_rejected), (1, 1));
    stub.shutdown().await;
}

#[tokio::test]
async fn concurrent_revokes_of_one_token_revoke_it_exactly_once() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let token = mint(&client, &stub, "acme-corp").await;
    let calls = (0..20).map(|_| revoke(&client, &stub, Some(MASTER), Some(&token)));
    let mut statuses: Vec<u16> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|(status, _)| status)
        .collect();
    statuses.sort_unstable();
    assert_eq!(statuses[0], 200);
    assert!(statuses[1..].iter().all(|s| *s == 400), "{statuses:?}");
    assert_eq!(stub.revoked()[0].revoke_calls, 20);
    assert_eq!(stub.stats().revoked, 1);
    stub.shutdown().await;
}

#[tokio::test]
async fn unknown_token_is_404_token_unknown() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let stranger = "eyJhbGciOiJIUzI1NiJ9.eyJ0ZW4iOiJ4In0.c2ln";
    let (status, body) = revoke(&client, &stub, Some(MASTER), Some(stranger)).await;
    assert_eq!(status, 404);
    assert!(body.contains("token unknown"), "{body}");
    let (status, _) = inspect(&client, &stub, stranger).await;
    assert_eq!(status, 404);
    assert!(stub.revoked().is_empty());
    assert_eq!(stub.stats().revoke_rejected, 1);
    stub.shutdown().await;
}

#[tokio::test]
async fn missing_token_parameter_is_400_that_does_not_read_as_revoked() {
    let stub = start().await;
    let client = reqwest::Client::new();
    for token in [None, Some("")] {
        let (status, body) = revoke(&client, &stub, Some(MASTER), token).await;
        assert_eq!(status, 400);
        assert!(body.contains("missing token"), "{body}");
        assert!(!body.contains("unknown") && !body.contains("already revoked"));
    }
    stub.shutdown().await;
}

#[tokio::test]
async fn revoke_and_inspect_with_wrong_bearer_are_403_and_revoke_nothing() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let token = mint(&client, &stub, "acme-corp").await;
    let (status, body) = revoke(&client, &stub, Some("nope"), Some(&token)).await;
    assert_eq!(status, 403);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON"),
        json!({"error": "forbidden"})
    );
    let (status, _) = revoke(&client, &stub, None, Some(&token)).await;
    assert_eq!(status, 403);
    let resp = client
        .get(token_url(&stub, "/api/tokens/inspect", Some(&token)))
        .bearer_auth("nope")
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 403);

    assert_eq!(inspect(&client, &stub, &token).await.0, 200);
    assert!(stub.revoked().is_empty());
    let stats = stub.stats();
    assert_eq!((stats.revoke_unauthorized, stats.revoked), (2, 0));
    assert_eq!(stats.unauthorized, 0, "issue counters untouched");
    stub.shutdown().await;
}

#[tokio::test]
async fn revoke_mode_fails_revocations_while_issue_works_and_vice_versa() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let token = mint(&client, &stub, "acme-corp").await;

    stub.set_revoke_mode(StubMode::FailAll(503));
    let (status, _) = revoke(&client, &stub, Some(MASTER), Some(&token)).await;
    assert_eq!(status, 503);
    let other = mint(&client, &stub, "other-corp").await;
    assert_eq!(inspect(&client, &stub, &token).await.0, 200, "not revoked");

    stub.set_revoke_mode(StubMode::Unauthorized);
    let (status, _) = revoke(&client, &stub, Some(MASTER), Some(&token)).await;
    assert_eq!(status, 401);

    // Over HTTP too, for other processes; latency belongs to /stub/mode.
    let set = |body: Value| {
        client
            .post(format!("{}/stub/revoke-mode", stub.url()))
            .json(&body)
            .send()
    };
    let resp = set(json!({"mode": "fail_next", "n": 1}))
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 204);
    let resp = set(json!({"latency_ms": 5})).await.expect("sent");
    assert_eq!(resp.status().as_u16(), 400);
    let (first, _) = revoke(&client, &stub, Some(MASTER), Some(&token)).await;
    let (second, _) = revoke(&client, &stub, Some(MASTER), Some(&token)).await;
    assert_eq!((first, second), (503, 200));

    stub.set_mode(StubMode::FailAll(503));
    let (status, _) = issue(&client, &stub, Some(MASTER), None, json!({"ten": "t"})).await;
    assert_eq!(status, 503);
    let (status, _) = revoke(&client, &stub, Some(MASTER), Some(&other)).await;
    assert_eq!(status, 200, "revoke works while issue fails");

    let stats = stub.stats();
    assert_eq!(stats.revoke_failed, 2);
    assert_eq!(stats.revoke_unauthorized, 1);
    assert_eq!(stats.revoked, 2);
    // Calls refused before the lookup do not count as calls naming the token.
    assert_eq!(stub.revoked()[0].revoke_calls, 1);
    stub.shutdown().await;
}

#[tokio::test]
async fn revoked_list_names_tokens_by_fingerprint_never_by_text() {
    let stub = start().await;
    let client = reqwest::Client::new();
    let kept = mint(&client, &stub, "kept-corp").await;
    let gone = mint(&client, &stub, "gone-corp").await;
    let before = time::OffsetDateTime::now_utc();
    assert_eq!(
        revoke(&client, &stub, Some(MASTER), Some(&gone)).await.0,
        200
    );

    let resp = client
        .get(format!("{}/stub/revoked", stub.url()))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 200);
    let text = resp.text().await.expect("body");
    for token in [&kept, &gone] {
        let signature = token.rsplit('.').next().expect("JWT signature");
        assert!(!text.contains(signature), "token text listed: {text}");
    }
    let raw: Value = serde_json::from_str(&text).expect("JSON");
    let entry = &raw.as_array().expect("array")[0];
    assert_eq!(entry["fingerprint"], fingerprint(&gone));
    assert_eq!(entry["jti"], payload(&gone)["jti"]);
    assert_eq!(entry["ten"], "gone-corp");
    assert_eq!(entry["revoke_calls"], 1);
    let revoked_at = entry["revoked_at"].as_str().expect("revoked_at text");
    let revoked_at =
        time::OffsetDateTime::parse(revoked_at, &time::format_description::well_known::Rfc3339)
            .expect("RFC 3339");
    assert!(revoked_at >= before);

    let listed: Vec<RevokedToken> = serde_json::from_str(&text).expect("typed list");
    assert_eq!(listed, stub.revoked());
    assert_eq!(listed.len(), 1, "only the revoked token is listed");
    stub.shutdown().await;
}
