//! Everything that talks AMQP: the topology of the contract, message properties, the
//! confirmed publisher and connection set-up.

pub(crate) mod inbound;
pub mod message;
pub mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

/// Connects with a connection name that shows up in the management UI.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}
