//! Everything that talks AMQP: the topology of the contract, message properties, the
//! confirmed publisher and connection set-up.

pub mod message;
pub mod publisher;
pub mod topology;

use lapin::{Connection, ConnectionProperties};

/// Connects with a connection name that shows up in the management UI.
pub async fn connect(url: &str, name: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(url, props).await
}

/// The URL with its password replaced by `***`, for logs and errors.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let cred = &url[s + 3..at];
            match cred.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &cred[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(super::redact("amqp://u:p@h:1/v"), "amqp://u:***@h:1/v");
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
    }
}
