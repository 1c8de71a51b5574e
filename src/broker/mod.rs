//! Everything that talks AMQP: the topology of the contract, message properties, the
//! confirmed publisher and connection set-up.

pub(crate) mod acks;
pub(crate) mod inbound;
pub mod message;
pub mod publisher;
pub mod tls;
pub mod topology;

use std::time::Duration;

use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};

use crate::telemetry::redact_url;

/// The longest a node may take to accept a connection before the next one is tried.
const NODE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why no node could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// `AMQP_URL` is empty.
    #[error("AMQP_URL names no broker")]
    NoNodes,
    /// The last node tried refused or failed.
    #[error(transparent)]
    Broker(#[from] lapin::Error),
    /// The last node tried did not answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A node's TLS settings (its URL's `cacertfile`, `certfile`, `keyfile`) cannot be used:
    /// no other node is tried, since this is a configuration mistake, not an outage.
    #[error(transparent)]
    Tls(#[from] tls::TlsSettingsError),
}

/// The nodes of `AMQP_URL`: one URL, or several separated by commas, the nodes of one cluster
/// (contract §8).
pub fn nodes(urls: &str) -> Vec<&str> {
    urls.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Connects to the first node of `urls` that answers, with a connection name that shows up
/// in the management UI.
pub async fn connect(urls: &str, name: &str) -> Result<Connection, ConnectError> {
    connect_from(urls, 0, name).await.map(|(c, _)| c)
}

/// Connects to the first node of `urls` that answers, trying them in order from the
/// `start`-th (wrapping around), each for at most 10 s; returns the connection and the index
/// of its node. A worker that lost a node starts from the next one: that is failover. An
/// `amqps://` node uses the TLS settings of its URL's query ([`tls`]).
pub async fn connect_from(
    urls: &str,
    start: usize,
    name: &str,
) -> Result<(Connection, usize), ConnectError> {
    let nodes = nodes(urls);
    let mut last = ConnectError::NoNodes;
    for k in 0..nodes.len() {
        let i = (start + k) % nodes.len();
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let builder = DefaultConnectionBuilder::new()?
            .with_uri_str(nodes[i].to_owned())
            .with_properties(props)
            .with_tls_config(tls::tls_config(nodes[i])?);
        match tokio::time::timeout(NODE_TIMEOUT, builder.connect()).await {
            Ok(Ok(conn)) => return Ok((conn, i)),
            Ok(Err(e)) => last = ConnectError::Broker(e),
            Err(_) => last = ConnectError::Timeout(NODE_TIMEOUT),
        }
        if nodes.len() > 1 {
            tracing::warn!(node = %redact_url(nodes[i]), error = %last, "broker node unavailable; trying the next");
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    #[test]
    fn amqp_url_lists_the_nodes_of_a_cluster() {
        assert_eq!(super::nodes("amqp://a/%2f"), vec!["amqp://a/%2f"]);
        assert_eq!(
            super::nodes(" amqp://a/v , amqps://b/v,,"),
            vec!["amqp://a/v", "amqps://b/v"]
        );
        assert!(super::nodes(" , ").is_empty());
    }
}
