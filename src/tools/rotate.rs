//! `token rotate TENANT`: asks the workers for a new generation of a tenant's token by
//! publishing `tenant.token.rotate` (contract §9, §10), confirmed and mandatory; with `--wait`,
//! waits for the matching `tenant.token.ready` and prints it.

use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use lapin::BasicProperties;

use crate::broker::publisher::{PublishError, Publisher};
use crate::broker::{self, topology};
use crate::cli::Failure;
use crate::configuration::BrokerArgs;
use crate::domain::TenantId;
use crate::telemetry::redact_url;

/// The flags of `token rotate`.
#[derive(clap::Args, Debug)]
pub(crate) struct RotateArgs {
    /// The tenant id.
    tenant: String,
    /// Why (logged by the worker; at most 256 characters).
    #[arg(long)]
    reason: Option<String>,
    /// Revoke the current token at once instead of after ROTATION_GRACE.
    #[arg(long)]
    now: bool,
    /// Wait for the new token's tenant.token.ready and print it.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s", value_parser = crate::configuration::parse_duration)]
    timeout: Duration,
    #[command(flatten)]
    broker: BrokerArgs,
}

/// Publishes the rotate request; with `--wait`, prints the ready event it yields.
pub(crate) async fn run(args: RotateArgs) -> Result<u8, Failure> {
    let tenant = TenantId::parse(&args.tenant).map_err(|e| Failure::new(2, anyhow::anyhow!(e)))?;
    if args
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > 256)
    {
        return Err(Failure::new(
            2,
            anyhow::anyhow!("--reason is longer than 256 characters"),
        ));
    }
    let url = &args.broker.amqp_url;
    let conn = broker::connect(url, "tenant-tokens token rotate")
        .await
        .with_context(|| format!("connect to {}", redact_url(url)))?;
    let listen = conn.create_channel().await.context("opening a channel")?;
    // Bound before publishing, so the event cannot slip past.
    let ready = if args.wait {
        let consumer = topology::listen(&listen, topology::TOKEN_READY)
            .await
            .context("listening for the ready event")?;
        Some(consumer)
    } else {
        None
    };
    let message_id = uuid::Uuid::new_v4().to_string();
    publish(&conn, &tenant, &args, &message_id).await?;
    eprintln!("rotation of {tenant} requested (message id {message_id})");
    let code = match ready {
        Some(consumer) => wait_for_event(consumer, &message_id, args.timeout).await?,
        None => 0,
    };
    let _ = conn.close(200, "done".into()).await;
    Ok(code)
}

async fn publish(
    conn: &lapin::Connection,
    tenant: &TenantId,
    args: &RotateArgs,
    message_id: &str,
) -> Result<(), Failure> {
    let publisher = Publisher::new(conn.create_channel().await.context("opening a channel")?)
        .await
        .context("enabling publisher confirms")?;
    let body = serde_json::json!({
        "tenant_id": tenant.as_str(),
        "reason": args.reason,
        "now": args.now,
    });
    let props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_message_id(message_id.into())
        .with_app_id("tenant-tokens token rotate".into());
    let published = publisher
        .publish(
            topology::EVENTS_EXCHANGE,
            topology::TOKEN_ROTATE,
            body.to_string().as_bytes(),
            props,
            true,
        )
        .await;
    match published {
        Ok(()) => Ok(()),
        Err(PublishError::Unroutable(_)) => Err(Failure::new(
            1,
            anyhow::anyhow!(
                "no queue is bound to {} for {}: declare the topology first (`tenant-tokens migrate`)",
                topology::EVENTS_EXCHANGE,
                topology::TOKEN_ROTATE
            ),
        )),
        Err(e) => Err(Failure::new(
            1,
            anyhow::anyhow!("publishing the rotate request: {e}"),
        )),
    }
}

/// Prints the ready event whose `correlation_id` is the request's message id; exit 1 when
/// none came within `timeout`.
async fn wait_for_event(
    mut consumer: lapin::Consumer,
    message_id: &str,
    timeout: Duration,
) -> Result<u8, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let delivery = match next {
            Err(_) => {
                return Err(Failure::new(
                    1,
                    anyhow::anyhow!(
                        "no tenant.token.ready for this request within {timeout:?}: is a worker running?"
                    ),
                ));
            }
            Ok(None) => {
                return Err(Failure::new(
                    1,
                    anyhow::anyhow!("the broker closed the consumer"),
                ));
            }
            Ok(Some(Err(e))) => return Err(Failure::new(1, anyhow::anyhow!("consuming: {e}"))),
            Ok(Some(Ok(d))) => d,
        };
        let event: serde_json::Value = serde_json::from_slice(&delivery.data).unwrap_or_default();
        if event["correlation_id"].as_str() == Some(message_id) {
            println!("{event}");
            return Ok(0);
        }
    }
}
