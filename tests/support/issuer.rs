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
