//! TLS towards RabbitMQ (`amqps://`), configured per node in the query of its URL with
//! RabbitMQ's own URI query parameters, so every command that takes `AMQP_URL` (run, migrate,
//! dlq, demo, token rotate) honours it and each node of a cluster may have its own:
//!
//! - `cacertfile`: PEM certificate authorities trusted on top of the system's (a broker
//!   behind a private CA);
//! - `certfile` and `keyfile`: a PEM client certificate and its PEM private key (PKCS#8,
//!   PKCS#1 or SEC1), for a broker that verifies its peers (`ssl_options.verify =
//!   verify_peer`).
//!
//! The files are read at every connection, so certificates renewed on disk are used from the
//! next reconnection on. The server's name is checked against the host of the URL.

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};

/// Why a node's TLS settings cannot be used. Says which file and why, never what is in it.
#[derive(Debug, thiserror::Error)]
#[error("AMQP_URL {node}: {problem}")]
pub struct TlsSettingsError {
    /// The node, without its password.
    node: String,
    problem: String,
}

/// The TLS settings of `node` (an AMQP URL): the defaults (the system's certificate
/// authorities, no client certificate) unless its query says otherwise.
pub(crate) fn tls_config(node: &str) -> Result<OwnedTLSConfig, TlsSettingsError> {
    let fail = |problem: String| TlsSettingsError {
        node: crate::telemetry::redact_url(node),
        problem,
    };
    let url = reqwest::Url::parse(node).map_err(|e| fail(format!("not a URL: {e}")))?;
    let param = |name: &str| {
        url.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let (ca, cert, key) = (param("cacertfile"), param("certfile"), param("keyfile"));
    if url.scheme() != "amqps" && (ca.is_some() || cert.is_some() || key.is_some()) {
        return Err(fail(
            "cacertfile, certfile and keyfile need an amqps:// URL: this one would not encrypt"
                .into(),
        ));
    }
    let read = |name: &str, path: &str| {
        std::fs::read(path).map_err(|e| fail(format!("{name} {path}: {e}")))
    };
    let cert_chain = match &ca {
        Some(path) => {
            let pem = String::from_utf8(read("cacertfile", path)?)
                .map_err(|_| fail(format!("cacertfile {path} is not PEM text")))?;
            if !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(fail(format!("cacertfile {path} holds no PEM certificate")));
            }
            Some(pem)
        }
        None => None,
    };
    let identity = match (&cert, &key) {
        (Some(cert), Some(key)) => Some(OwnedIdentity::PKCS8 {
            pem: read("certfile", cert)?,
            key: read("keyfile", key)?,
        }),
        (None, None) => None,
        _ => return Err(fail("certfile and keyfile go together".into())),
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// Checks the TLS settings of every node of `urls` (start-up of `run`: a missing file is a
/// configuration error, exit 2, rather than a broker that never answers).
pub fn check(urls: &str) -> Result<(), TlsSettingsError> {
    super::nodes(urls)
        .into_iter()
        .try_for_each(|node| tls_config(node).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!(
            "tt-amqp-tls-{}-{name}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::write(&path, text).expect("temp file");
        path
    }

    #[test]
    fn a_node_without_tls_parameters_uses_the_defaults() {
        let config = tls_config("amqps://u:p@h:5671/%2f").expect("defaults");
        assert_eq!(config, OwnedTLSConfig::default());
        assert!(tls_config("amqp://u:p@h/v?heartbeat=10").is_ok());
    }

    #[test]
    fn tls_parameters_are_read_from_the_query() {
        let ca = temp_file(
            "ca",
            "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n",
        );
        let cert = temp_file("cert", "cert");
        let key = temp_file("key", "key");
        let url = format!(
            "amqps://u:p@h:5671/v?cacertfile={}&certfile={}&keyfile={}&heartbeat=5",
            ca.display(),
            cert.display(),
            key.display()
        );
        let config = tls_config(&url).expect("settings");
        assert!(config.cert_chain.is_some_and(|c| c.contains("BEGIN")));
        assert_eq!(
            config.identity,
            Some(OwnedIdentity::PKCS8 {
                pem: b"cert".to_vec(),
                key: b"key".to_vec()
            })
        );
        for f in [ca, cert, key] {
            let _ = std::fs::remove_file(f);
        }
    }

    #[test]
    fn unusable_tls_parameters_are_refused_with_the_reason_and_no_password() {
        let refused = |url: &str| tls_config(url).expect_err("refused").to_string();
        let plain = refused("amqp://u:secret@h/v?cacertfile=/x");
        assert!(plain.contains("amqps://"), "{plain}");
        assert!(!plain.contains("secret"), "{plain}");
        let missing = refused("amqps://u:secret@h/v?cacertfile=/nonexistent/ca.pem");
        assert!(missing.contains("/nonexistent/ca.pem"), "{missing}");
        let key_only = refused("amqps://h/v?keyfile=/k");
        assert!(key_only.contains("go together"), "{key_only}");
        let not_pem = temp_file("junk", "not a certificate");
        let junk = refused(&format!("amqps://h/v?cacertfile={}", not_pem.display()));
        assert!(junk.contains("no PEM certificate"), "{junk}");
        let _ = std::fs::remove_file(not_pem);
        assert!(check("amqp://a/v,amqps://b/v?certfile=/c").is_err());
    }
}
