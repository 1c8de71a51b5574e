//! Creating the bench's vhost through the RabbitMQ management API, so that by default the
//! bench runs in a vhost of its own and never disturbs `/`.

use std::time::Duration;

use anyhow::{anyhow, bail};
use tenant_tokens::telemetry::redact_url;

/// Makes sure the URL's vhost exists, creating it (and guest-like permissions for the URL's
/// user) through the management API when it does not. Without a management API it does
/// nothing: connecting to the broker then says what is wrong.
pub async fn ensure_vhost(amqp_url: &str, management: Option<&str>) -> anyhow::Result<()> {
    let parts = AmqpUrlParts::parse(amqp_url)?;
    let base = management
        .map(|m| m.trim_end_matches('/').to_owned())
        .unwrap_or_else(|| format!("http://{}:15672", parts.host));
    let api = ManagementApi {
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?,
        base,
        parts,
    };
    match api.vhost_exists().await {
        Some(true) | None => Ok(()),
        Some(false) => api.create_vhost().await,
    }
}

/// The management API of one broker, as the URL's user.
struct ManagementApi {
    http: reqwest::Client,
    base: String,
    parts: AmqpUrlParts,
}

impl ManagementApi {
    fn vhost_url(&self) -> String {
        format!(
            "{}/api/vhosts/{}",
            self.base,
            encode_path_segment(&self.parts.vhost)
        )
    }

    fn auth(&self, r: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        r.basic_auth(&self.parts.user, Some(&self.parts.password))
    }

    /// `None` when the API does not answer sensibly (no management plugin, say).
    async fn vhost_exists(&self) -> Option<bool> {
        match self.auth(self.http.get(self.vhost_url())).send().await {
            Ok(r) if r.status().is_success() => Some(true),
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => Some(false),
            _ => None,
        }
    }

    /// Creates the vhost and gives the URL's user every permission on it.
    async fn create_vhost(&self) -> anyhow::Result<()> {
        let put = self.auth(self.http.put(self.vhost_url())).send().await?;
        if !put.status().is_success() {
            bail!(
                "creating vhost {:?} through {}: HTTP {}",
                self.parts.vhost,
                self.base,
                put.status()
            );
        }
        let perm = self
            .auth(self.http.put(format!(
                "{}/api/permissions/{}/{}",
                self.base,
                encode_path_segment(&self.parts.vhost),
                encode_path_segment(&self.parts.user)
            )))
            .json(&serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"}))
            .send()
            .await?;
        if !perm.status().is_success() {
            bail!(
                "setting permissions on vhost {:?}: HTTP {}",
                self.parts.vhost,
                perm.status()
            );
        }
        eprintln!("created vhost {:?}", self.parts.vhost);
        Ok(())
    }
}

/// What the management API needs of an AMQP URL.
#[derive(Debug, PartialEq)]
struct AmqpUrlParts {
    user: String,
    password: String,
    host: String,
    vhost: String,
}

impl AmqpUrlParts {
    fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .split_once("://")
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow!("not an AMQP URL: {}", redact_url(url)))?;
        let rest = rest.split(['?', '#']).next().unwrap_or(rest);
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (cred, hostport) = authority
            .rsplit_once('@')
            .unwrap_or(("guest:guest", authority));
        let (user, password) = cred.split_once(':').unwrap_or((cred, ""));
        let host = if let Some(v6) = hostport.strip_prefix('[') {
            format!("[{}]", v6.split(']').next().unwrap_or(""))
        } else {
            hostport.split(':').next().unwrap_or("").to_owned()
        };
        Ok(Self {
            user: percent_decode(user),
            password: percent_decode(password),
            host: if host.is_empty() {
                "127.0.0.1".into()
            } else {
                host
            },
            vhost: if path.is_empty() {
                "/".into()
            } else {
                percent_decode(path)
            },
        })
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn encode_path_segment(s: &str) -> String {
    s.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || b"-_.~".contains(&c) {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_amqp_urls_for_the_management_api() {
        let p = AmqpUrlParts::parse("amqp://guest:g%40st@rabbit:5672/bench").ok();
        assert_eq!(
            p,
            Some(AmqpUrlParts {
                user: "guest".into(),
                password: "g@st".into(),
                host: "rabbit".into(),
                vhost: "bench".into(),
            })
        );
        let root = AmqpUrlParts::parse("amqp://u:p@h/%2f")
            .ok()
            .map(|p| p.vhost);
        assert_eq!(root.as_deref(), Some("/"));
        assert_eq!(encode_path_segment("/"), "%2F");
        assert!(AmqpUrlParts::parse("nonsense").is_err());
    }
}
