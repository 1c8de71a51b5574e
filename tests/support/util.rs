//! Small helpers with no service behind them: polling a condition, unique tenant ids,
//! JWT-shaped tokens, free local addresses.

use std::time::{Duration, Instant};

/// Polls `check` until it returns true or the deadline passes.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A unique tenant id for this test run.
pub fn tenant(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// A JWT-shaped token like the issuer's, with a `jti`.
pub fn fake_jwt(ten: &str, jti: &str) -> String {
    use base64::Engine as _;
    let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    format!(
        "{}.{}.{}",
        e.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
        e.encode(serde_json::json!({"ten": ten, "jti": jti}).to_string()),
        e.encode(b"signature")
    )
}

/// A local address nobody listens on right now (for a child's `OPS_ADDR`).
pub fn free_local_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}
