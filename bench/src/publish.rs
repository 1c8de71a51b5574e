//! The requests a run publishes, and publishing them the way a real producer would:
//! persistent, with publisher confirms (pipelined), optionally paced.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel};
use rand::seq::SliceRandom as _;
use tenant_tokens::broker::topology;

/// One request to publish.
pub struct Msg {
    key: &'static str,
    id: String,
    body: Vec<u8>,
}

/// A `tenant.created` for `tenant` with message id `id`.
fn created(id: &str, tenant: &str, i: usize) -> Msg {
    Msg {
        key: topology::TENANT_CREATED,
        id: id.to_owned(),
        body: serde_json::json!({
            "tenant_id": tenant,
            "tenant_name": format!("Bench Customer {i}"),
            "source": "tenant-tokens-bench",
        })
        .to_string()
        .into_bytes(),
    }
}

/// The message-id prefix of the unmeasured phase that provisions the `--existing` tenants; the
/// collector counts their events apart and the analysis leaves them out.
pub fn earlier_prefix(prefix: &str) -> String {
    format!("{prefix}pre-")
}

/// The tenant ids of the `--existing` tenants of a run.
pub fn existing_tenants(prefix: &str, existing: usize) -> Vec<String> {
    (0..existing).map(|i| format!("{prefix}e{i:06}")).collect()
}

/// One `tenant.created` per existing tenant, for the unmeasured phase.
pub fn provisioning_messages(prefix: &str, existing: &[String]) -> Vec<Msg> {
    let earlier = earlier_prefix(prefix);
    existing
        .iter()
        .enumerate()
        .map(|(i, t)| created(&format!("{earlier}{i:06}"), t, i))
        .collect()
}

/// The measured requests, shuffled: `tenants` new tenants, `duplicates` of them again (same
/// message id, as redeliveries would be), and `per_existing` `extension.requested` per
/// existing tenant.
pub fn measured_messages(
    prefix: &str,
    tenants: usize,
    duplicates: usize,
    existing: &[String],
    per_existing: u32,
) -> Vec<Msg> {
    let new = |i: usize| {
        created(
            &format!("{prefix}new-{i:06}"),
            &format!("{prefix}t{i:06}"),
            i,
        )
    };
    let mut msgs: Vec<Msg> = (0..tenants).map(new).collect();
    let mut rng = rand::rng();
    let mut dups: Vec<usize> = (0..tenants).collect();
    dups.shuffle(&mut rng);
    msgs.extend(dups.iter().take(duplicates).map(|&i| new(i)));
    for (i, t) in existing.iter().enumerate() {
        for k in 0..per_existing {
            msgs.push(Msg {
                key: topology::EXTENSION_REQUESTED,
                id: format!("{prefix}ext-{i:06}-{k}"),
                body: serde_json::json!({"tenant_id": t, "extension_id": format!("ext-{i}-{k}")})
                    .to_string()
                    .into_bytes(),
            });
        }
    }
    msgs.shuffle(&mut rng);
    msgs
}

/// When each request was published, by message id (a duplicate has several).
#[derive(Default)]
pub struct Sent {
    /// Publish instants per message id, oldest first.
    pub at: HashMap<String, VecDeque<Instant>>,
    /// Messages published.
    pub count: usize,
}

/// Publishes every message persistent and confirmed (confirms pipelined, at most a window
/// outstanding), paced at `rate` messages per second when given.
pub async fn publish_all(
    ch: &Channel,
    msgs: &[Msg],
    rate: Option<f64>,
    sent: &mut Sent,
) -> anyhow::Result<()> {
    const WINDOW: usize = 2048;
    let mut confirms = FuturesUnordered::new();
    let t0 = tokio::time::Instant::now();
    for (i, m) in msgs.iter().enumerate() {
        if let Some(r) = rate {
            tokio::time::sleep_until(t0 + Duration::from_secs_f64(i as f64 / r)).await;
        }
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(m.id.as_str().into());
        sent.at
            .entry(m.id.clone())
            .or_default()
            .push_back(Instant::now());
        sent.count += 1;
        let confirm = ch
            .basic_publish(
                topology::EVENTS_EXCHANGE.into(),
                m.key.into(),
                BasicPublishOptions::default(),
                &m.body,
                props,
            )
            .await
            .context("publishing a request")?;
        confirms.push(confirm);
        while confirms.len() >= WINDOW {
            check_confirm(confirms.next().await)?;
        }
        while let Some(Some(c)) = futures::FutureExt::now_or_never(confirms.next()) {
            check_confirm(Some(c))?;
        }
    }
    while !confirms.is_empty() {
        check_confirm(confirms.next().await)?;
    }
    Ok(())
}

fn check_confirm(c: Option<lapin::Result<lapin::Confirmation>>) -> anyhow::Result<()> {
    match c {
        Some(Ok(c)) if c.is_ack() => Ok(()),
        Some(Ok(_)) => bail!("the broker refused (nacked) a request"),
        Some(Err(e)) => Err(anyhow!("publish confirm: {e}")),
        None => Ok(()),
    }
}
