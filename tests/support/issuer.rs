//! The issuer side of a test: the master token every test issuer expects, and the stub
//! issuer started on a free local port.

use std::time::Duration;

/// The master token every test issuer expects.
pub const MASTER_TOKEN: &str = "test-master-token-0123456789";

/// A stub issuer on a free local port that accepts [`MASTER_TOKEN`].
pub async fn stub_issuer(latency: Duration) -> tenant_tokens::tools::stub_issuer::StubIssuer {
    let mut cfg = tenant_tokens::tools::stub_issuer::StubConfig::new(secrecy::SecretString::from(
        MASTER_TOKEN.to_owned(),
    ));
    cfg.latency = latency;
    tenant_tokens::tools::stub_issuer::StubIssuer::start(
        "127.0.0.1:0".parse().expect("address"),
        cfg,
    )
    .await
    .expect("stub issuer")
}

/// Issue requests the stub has received but not answered yet (it counts a request on
/// arrival and its outcome after the latency).
pub fn stub_in_flight(s: &tenant_tokens::tools::stub_issuer::StubStats) -> u64 {
    s.requests
        .saturating_sub(s.issued + s.replayed + s.failed + s.unauthorized)
}

/// Answers like the issuer: a JWT for the requested container with a new `jti` each call,
/// after `delay`; refuses (400) containers whose name starts with `reject`.
pub struct Issue {
    /// How long each answer takes.
    pub delay: Duration,
}

impl wiremock::Respond for Issue {
    fn respond(&self, req: &wiremock::Request) -> wiremock::ResponseTemplate {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap_or_default();
        let ten = body["ten"].as_str().unwrap_or("missing");
        if ten.starts_with("reject") {
            return wiremock::ResponseTemplate::new(400)
                .set_body_string("container name not allowed");
        }
        let jti = uuid::Uuid::new_v4().simple().to_string();
        wiremock::ResponseTemplate::new(200)
            .set_body_string(format!("{}\n", super::fake_jwt(ten, &jti)))
            .set_delay(self.delay)
    }
}

/// A wiremock issuer answering [`Issue`] to calls with [`MASTER_TOKEN`].
pub async fn wiremock_issuer(delay: Duration) -> wiremock::MockServer {
    use wiremock::matchers::{header, method, path};
    let server = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("POST"))
        .and(path("/api/tokens/issue"))
        .and(header(
            "authorization",
            format!("Bearer {MASTER_TOKEN}").as_str(),
        ))
        .respond_with(Issue { delay })
        .mount(&server)
        .await;
    server
}
