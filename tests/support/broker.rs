//! The broker from a test's side: publishing requests ([`Producer`]), collecting ready
//! events and dead letters ([`Collector`], [`Received`]), and inspecting or force-closing
//! what lives in the test's vhost (queues, connections).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use tenant_tokens::broker::topology;

use super::env::TestEnv;

/// A confirm-mode publisher for test messages.
pub struct Producer {
    _conn: Connection,
    ch: Channel,
}

impl Producer {
    /// A connection and confirm-mode channel in the test's vhost, topology declared.
    pub async fn new(env: &TestEnv) -> Self {
        let conn = env.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        topology::declare(&ch, &[]).await.expect("topology");
        Self { _conn: conn, ch }
    }

    /// Publishes to `tenant.events` and waits for the confirm.
    pub async fn publish(&self, routing_key: &str, body: &[u8], props: BasicProperties) {
        let props = props.with_delivery_mode(2);
        let confirm = self
            .ch
            .basic_publish(
                topology::EVENTS_EXCHANGE.into(),
                routing_key.into(),
                BasicPublishOptions::default(),
                body,
                props,
            )
            .await
            .expect("publish")
            .await
            .expect("confirm");
        assert!(confirm.is_ack(), "publish confirmed");
    }

    /// Publishes a JSON body with a message id.
    pub async fn request(
        &self,
        routing_key: &str,
        body: serde_json::Value,
        message_id: Option<&str>,
    ) {
        let mut props = BasicProperties::default().with_content_type("application/json".into());
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publish(routing_key, body.to_string().as_bytes(), props)
            .await;
    }

    /// Publishes many `(routing key, JSON body, message id)` requests, confirms awaited
    /// together per chunk (much faster than one round trip each).
    pub async fn requests(&self, items: Vec<(String, serde_json::Value, String)>) {
        for chunk in items.chunks(256) {
            let mut confirms = Vec::with_capacity(chunk.len());
            for (key, body, id) in chunk {
                let props = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_message_id(id.as_str().into());
                let confirm = self
                    .ch
                    .basic_publish(
                        topology::EVENTS_EXCHANGE.into(),
                        key.as_str().into(),
                        BasicPublishOptions::default(),
                        body.to_string().as_bytes(),
                        props,
                    )
                    .await
                    .expect("publish");
                confirms.push(confirm);
            }
            for c in confirms {
                assert!(c.await.expect("confirm").is_ack(), "publish confirmed");
            }
        }
    }
}

/// A received message.
#[derive(Debug, Clone)]
pub struct Received {
    /// The routing key it was published with.
    pub routing_key: String,
    /// Its properties, headers included.
    pub properties: BasicProperties,
    /// The raw body.
    pub body: Vec<u8>,
}

impl Received {
    /// The body as JSON; panics when it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    /// A string header, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        tenant_tokens::broker::message::header_str(&self.properties, name).map(str::to_owned)
    }

    /// An integer header, if present and a `u32`.
    pub fn header_u32(&self, name: &str) -> Option<u32> {
        tenant_tokens::broker::message::header_u32(&self.properties, name)
    }
}

/// Collects messages from a queue (a fresh exclusive one bound to `tenant.token.ready`, or
/// the dead-letter queue) in the background.
pub struct Collector {
    _conn: Connection,
    seen: Arc<Mutex<Vec<Received>>>,
}

impl Collector {
    /// Ready events, bound before anything is published.
    pub async fn ready_events(env: &TestEnv) -> Self {
        let conn = env.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        topology::declare(&ch, &[]).await.expect("topology");
        let queue = topology::declare_ready_listener(&ch)
            .await
            .expect("collector queue");
        Self::consume(conn, ch, queue.as_str()).await
    }

    /// Dead letters (consumed and acked: the test owns its vhost).
    pub async fn dead_letters(env: &TestEnv) -> Self {
        let conn = env.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        topology::declare(&ch, &[]).await.expect("topology");
        Self::consume(conn, ch, topology::DEAD_LETTER_QUEUE).await
    }

    async fn consume(conn: Connection, ch: Channel, queue: &str) -> Self {
        let mut consumer = ch
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                let r = Received {
                    routing_key: d.routing_key.to_string(),
                    properties: d.properties.clone(),
                    body: d.data.clone(),
                };
                sink.lock().expect("lock").push(r);
            }
        });
        Self { _conn: conn, seen }
    }

    /// Everything received so far.
    pub fn all(&self) -> Vec<Received> {
        self.seen.lock().expect("lock").clone()
    }

    /// Waits until `pred` holds for what was received, or panics at the deadline.
    pub async fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Received]) -> bool,
    ) -> Vec<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            let all = self.all();
            if pred(&all) {
                return all;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; have {} messages",
                all.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for at least `n` messages.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Received> {
        self.wait_until(&format!("{n} messages"), timeout, |all| all.len() >= n)
            .await
    }

    /// Ready events by tenant id.
    pub fn by_tenant(&self) -> HashMap<String, Vec<serde_json::Value>> {
        let mut m: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
        for r in self.all() {
            let v = r.json();
            let t = v["tenant_id"].as_str().unwrap_or_default().to_owned();
            m.entry(t).or_default().push(v);
        }
        m
    }
}

// Inspecting and force-closing what lives in the test's vhost.
impl TestEnv {
    /// Connections of this test's vhost, as the management API lists them:
    /// `(connection name, client-given connection_name)`.
    pub async fn connections(&self) -> Vec<(String, String)> {
        let resp = reqwest::Client::new()
            .get(format!(
                "{}/api/vhosts/{}/connections",
                self.management, self.name
            ))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API: list connections");
        assert!(
            resp.status().is_success(),
            "list connections: {}",
            resp.status()
        );
        let list: Vec<serde_json::Value> = resp.json().await.expect("connections JSON");
        list.iter()
            .filter_map(|c| {
                let name = c["name"].as_str()?.to_owned();
                let client = c["client_properties"]["connection_name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                Some((name, client))
            })
            .collect()
    }

    /// Force-closes, through the management API, every connection of this test's vhost
    /// whose client-given name is `client_name` (e.g. `tenant-tokens worker`); returns how
    /// many were closed. Never touches another vhost. (The API lists a connection only
    /// after its first statistics, up to 5 s after it opened.)
    pub async fn close_connections(&self, client_name: &str) -> usize {
        let mut closed = 0;
        for (name, client) in self.connections().await {
            if client == client_name && self.close_connection(&name).await {
                closed += 1;
            }
        }
        closed
    }

    /// Force-closes one connection by its management API name; whether it was closed.
    pub async fn close_connection(&self, name: &str) -> bool {
        let mut url = reqwest::Url::parse(&self.management).expect("management URL");
        url.path_segments_mut()
            .expect("management base URL")
            .pop_if_empty()
            .extend(["api", "connections", name]);
        let resp = reqwest::Client::new()
            .delete(url)
            .basic_auth("guest", Some("guest"))
            .header("X-Reason", "fault injection by a test")
            .send()
            .await
            .expect("management API: close connection");
        resp.status().is_success()
    }

    /// Messages ready (not counting unacked ones) in a queue of this vhost.
    pub async fn queue_ready(&self, queue: &str) -> u32 {
        let conn = self.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        let q = topology::inspect(&ch, queue)
            .await
            .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
        let _ = conn.close(200, "done".into()).await;
        q.message_count()
    }
}

impl Collector {
    /// `tenant.token.revoked` events, bound before anything is published (like
    /// [`Collector::ready_events`]).
    pub async fn revoked_events(env: &TestEnv) -> Self {
        let conn = env.connect().await;
        let ch = conn.create_channel().await.expect("channel");
        topology::declare(&ch, &[]).await.expect("topology");
        let queue = topology::declare_listener(&ch, topology::TOKEN_REVOKED)
            .await
            .expect("revoked collector queue");
        Self::consume(conn, ch, queue.as_str()).await
    }
}

impl Collector {
    /// What was received from the `from`-th message on (everything received so far past the
    /// first `from`), so a long test can follow a stream without copying all of it each time.
    pub fn since(&self, from: usize) -> Vec<Received> {
        let seen = self.seen.lock().expect("lock");
        seen.get(from..)
            .map(<[Received]>::to_vec)
            .unwrap_or_default()
    }
}
