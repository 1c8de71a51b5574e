//! Publishing with publisher confirms. Every publish awaits its own confirm: a message counts
//! as sent only when the broker has taken responsibility for it.

use lapin::Confirmation;
use lapin::options::BasicPublishOptions;
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel};

/// Why a publish did not take.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The channel or connection failed.
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    /// The broker refused the message.
    #[error("broker nacked the publish")]
    Nacked,
    /// The body could not be encoded; nothing was published.
    #[error("cannot encode the message: {0}")]
    Encode(String),
    /// An exchange or routing key longer than AMQP's 255 bytes; nothing was published.
    #[error("the {what} is not usable: {detail}")]
    Name {
        /// `exchange` or `routing key`.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// A `mandatory` message matched no queue.
    #[error("message was unroutable (no queue bound for routing key {0:?})")]
    Unroutable(String),
}

/// A channel in confirm mode. Cheap to clone; many tasks may publish at once, each awaiting
/// its own confirm, so confirms of a batch are waited for together.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
}

impl Publisher {
    /// Puts `channel` into confirm mode.
    pub async fn new(channel: Channel) -> Result<Self, lapin::Error> {
        channel
            .confirm_select(lapin::options::ConfirmSelectOptions::default())
            .await?;
        Ok(Self { channel })
    }

    /// Whether the channel can still publish; a closed one ends the broker session.
    pub(crate) fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes and waits for the confirm. With `mandatory`, an unroutable message is an error.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Result<(), PublishError> {
        // Names are AMQP short strings: a longer one is an error here, not a panic below.
        let name = |what: &'static str, s: &str| {
            ShortString::try_new(s).map_err(|e| PublishError::Name {
                what,
                detail: e.to_string(),
            })
        };
        let (exchange, key) = (
            name("exchange", exchange)?,
            name("routing key", routing_key)?,
        );
        let confirm = self
            .channel
            .basic_publish(
                exchange,
                key,
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable(routing_key.to_owned())),
            Confirmation::Nack(_) => Err(PublishError::Nacked),
        }
    }
}
