//! `healthcheck`: asks a worker's ops endpoint whether it is ready (or, with `--live`, alive)
//! and exits 0 or 1. The runtime image carries no curl or shell, so its `HEALTHCHECK` (and
//! compose's `depends_on: service_healthy`) runs this instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::cli::Failure;

/// The most of an answer's body that is printed: `/readyz` says why in a few dozen bytes.
const BODY_LIMIT: usize = 1024;

/// The flags of `healthcheck`.
#[derive(clap::Args, Debug)]
pub(crate) struct HealthcheckArgs {
    /// The worker's ops address, as its OPS_ADDR (an unspecified address such as 0.0.0.0
    /// means this host, so the container's own OPS_ADDR works unchanged).
    #[arg(long, env = "OPS_ADDR", default_value = "127.0.0.1:9400")]
    addr: SocketAddr,
    /// Ask /healthz (the process answers) instead of /readyz (it is consuming and can work).
    #[arg(long)]
    live: bool,
    /// How long to wait for the whole answer.
    #[arg(long, default_value = "2s", value_parser = crate::configuration::parse_duration)]
    timeout: Duration,
}

/// Why the check failed: nothing answered in time, or the answer was not a 2xx.
#[derive(Debug, thiserror::Error)]
enum Unhealthy {
    #[error("{url}: no answer: {source}")]
    NoAnswer {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
}

/// Runs the check: exit 0 with the endpoint's answer on stdout, or a failure with exit 1
/// (never 2, which Docker reserves in a `HEALTHCHECK`).
pub(crate) async fn run(args: HealthcheckArgs) -> Result<u8, Failure> {
    let path = if args.live { "/healthz" } else { "/readyz" };
    let url = format!("http://{}{path}", reachable(args.addr));
    let body = check(&url, args.timeout)
        .await
        .map_err(|e| Failure::new(1, e))?;
    println!("{body}");
    Ok(0)
}

/// GETs `url` within `timeout`; the trimmed, shortened body when the status is a 2xx.
async fn check(url: &str, timeout: Duration) -> Result<String, Unhealthy> {
    let no_answer = |source| Unhealthy::NoAnswer {
        url: url.to_owned(),
        source,
    };
    // No proxy: a proxy from the environment must not answer for the local worker.
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(no_answer)?;
    let response = client.get(url).send().await.map_err(no_answer)?;
    let status = response.status();
    let body = response.text().await.map_err(no_answer)?;
    let body = shorten(body.trim());
    if status.is_success() {
        Ok(body)
    } else {
        Err(Unhealthy::Status {
            url: url.to_owned(),
            status,
            body,
        })
    }
}

/// The address to connect to for a listening address: a wildcard listener is reached on
/// loopback of the same family.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

/// At most [`BODY_LIMIT`] bytes of `text`, cut at a character boundary.
fn shorten(text: &str) -> String {
    let mut end = text.len().min(BODY_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wildcard_listener_is_reached_on_loopback() {
        let v4: SocketAddr = "0.0.0.0:9400".parse().expect("address");
        let v6: SocketAddr = "[::]:9400".parse().expect("address");
        let other: SocketAddr = "10.1.2.3:9400".parse().expect("address");
        assert_eq!(reachable(v4).to_string(), "127.0.0.1:9400");
        assert_eq!(reachable(v6).to_string(), "[::1]:9400");
        assert_eq!(reachable(other), other);
    }

    #[test]
    fn long_bodies_are_cut_at_a_character_boundary() {
        let text = "é".repeat(BODY_LIMIT);
        let cut = shorten(&text);
        assert!(cut.len() <= BODY_LIMIT && cut.chars().all(|c| c == 'é'));
    }
}
