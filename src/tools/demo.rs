//! `tenant-tokens demo`: the whole flow on this machine — migrations and topology, the stub
//! issuer in-process, the worker in-process, a few hundred requests (some for the same
//! tenants, some duplicated), progress while they are handled, and a summary.
//!
//! Every run uses fresh tenant ids, so runs never disturb each other or earlier state.

use std::collections::{HashMap, HashSet};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt as _, TryStreamExt as _};
use lapin::BasicProperties;
use rand::Rng as _;
use rand::seq::SliceRandom as _;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

use crate::broker::publisher::Publisher;
use crate::broker::{self, topology};
use crate::configuration::{BrokerArgs, DatabaseArgs, RunArgs};
use crate::crypto::EncryptionKey;
use crate::ops::health::Health;
use crate::pipeline::worker::Worker;
use crate::tools::stub_issuer::{StubConfig, StubIssuer, StubStats};

/// Publishes awaiting their confirms at once.
const PUBLISH_WINDOW: usize = 256;

/// `demo` flags.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    database: DatabaseArgs,
    /// New tenants (one `tenant.created` each).
    #[arg(long, default_value_t = 300)]
    tenants: usize,
    /// Extra copies of some `tenant.created` messages (same message id: redeliveries).
    #[arg(long, default_value_t = 40)]
    duplicates: usize,
    /// `extension.requested` for tenants of this run (some before their `tenant.created`).
    #[arg(long, default_value_t = 150)]
    extension_requests: usize,
    /// Tenants of this run whose token is rotated (with `now`) after they are provisioned.
    #[arg(long, default_value_t = 5)]
    rotations: usize,
    /// Tenants of this run deleted after they are provisioned.
    #[arg(long, default_value_t = 5)]
    deletions: usize,
    /// Latency of the stub issuer.
    #[arg(long, default_value_t = 5)]
    issuer_latency_ms: u64,
    /// Messages handled at once.
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    /// Give up waiting after this long.
    #[arg(long, default_value = "120s", value_parser = crate::configuration::parse_duration)]
    timeout: Duration,
}

struct Request {
    key: &'static str,
    tenant: String,
    message_id: String,
    body: String,
}

/// Runs the demo; `Ok(true)` when every check of the summary held.
pub async fn run(args: DemoArgs) -> anyhow::Result<bool> {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
    let mut out = std::io::stdout();
    let redact = crate::telemetry::redact_url;
    writeln!(out, "tenant-tokens demo, run {run_id}")?;
    writeln!(out, "  broker   {}", redact(&args.broker.amqp_url))?;
    writeln!(out, "  database {}", redact(&args.database.database_url))?;

    // 1. The stub issuer, in this process.
    let (stub, master) = start_stub(&args, &mut out).await?;

    // 2. The worker, in this process (it migrates and declares the topology).
    let worker = start_worker(&args, &stub, &master).await?;
    writeln!(out, "  worker   consuming {}\n", topology::REQUESTS_QUEUE)?;

    // 3. Collectors for ready and revoked events, bound before anything is published.
    let conn = broker::connect(&args.broker.amqp_url, "tenant-tokens demo").await?;
    let prefix = format!("demo-{run_id}-");
    let events = collect_events(&conn, topology::TOKEN_READY, prefix.clone()).await?;
    let revoked = collect_events(&conn, topology::TOKEN_REVOKED, prefix).await?;

    // 4. and 5. The requests, and progress until each has its ready event.
    let first = first_act(&args, &run_id, &conn, &events, &mut out).await?;
    let (total, tenants, elapsed) = (first.total, first.tenants, first.elapsed);
    let provisioned = events.lock().map(|e| e.clone()).unwrap_or_default();
    let stats = stub.stats();

    // 6. The lifecycle: rotate some tenants, delete others, wait for the revocations.
    let lifecycle = Lifecycle::plan(&provisioned, args.rotations, args.deletions);
    lifecycle.publish(&conn, &run_id).await?;
    writeln!(
        out,
        "rotating {} tenants (now) and deleting {}",
        lifecycle.rotated.len(),
        lifecycle.deleted.len()
    )?;
    lifecycle.wait(&events, &revoked, total, args.timeout).await;
    let revoked_by_stub = stub.revoked();

    worker.shutdown.cancel();
    let _ = worker.task.await;
    stub.shutdown().await;
    let _ = conn.close(200, "demo done".into()).await;

    // 7. Summary and checks.
    let ok = summarize(&provisioned, total, tenants, &stats, elapsed, &mut out)?;
    let revoked = revoked.lock().map(|e| e.clone()).unwrap_or_default();
    let lifecycle_ok = lifecycle.summarize(&events, &revoked, &revoked_by_stub, &mut out)?;
    let verdict = if ok && lifecycle_ok {
        "demo OK"
    } else {
        "demo FAILED: see the marks above"
    };
    writeln!(out, "\n{verdict}")?;
    Ok(ok && lifecycle_ok)
}

/// The demo's second act: which tenants are rotated and deleted, with the fingerprints the
/// stub must then have revoked (each exactly once).
struct Lifecycle {
    /// Tenant → fingerprint of its first token, to be superseded.
    rotated: HashMap<String, String>,
    /// Tenant → fingerprint of its token, to be revoked with it.
    deleted: HashMap<String, String>,
}

impl Lifecycle {
    /// Picks distinct provisioned tenants for rotation and for deletion.
    fn plan(provisioned: &[serde_json::Value], rotations: usize, deletions: usize) -> Self {
        let mut tokens: Vec<(String, String)> = provisioned
            .iter()
            .filter(|e| e["newly_issued"] == true)
            .filter_map(|e| {
                Some((
                    e["tenant_id"].as_str()?.to_owned(),
                    e["token_fingerprint"].as_str()?.to_owned(),
                ))
            })
            .collect();
        tokens.sort();
        tokens.dedup_by(|a, b| a.0 == b.0);
        let deleted = tokens.split_off(rotations.min(tokens.len()));
        Self {
            rotated: tokens.into_iter().collect(),
            deleted: deleted.into_iter().take(deletions).collect(),
        }
    }

    /// Publishes one `tenant.token.rotate` (with `now`) or `tenant.deleted` per chosen tenant.
    async fn publish(&self, conn: &lapin::Connection, run_id: &str) -> anyhow::Result<()> {
        let rotate = self.rotated.keys().map(|t| Request {
            key: topology::TOKEN_ROTATE,
            tenant: t.clone(),
            message_id: format!("{t}-rotate-{run_id}"),
            body: serde_json::json!({"tenant_id": t, "reason": "demo", "now": true}).to_string(),
        });
        let delete = self.deleted.keys().map(|t| Request {
            key: topology::TENANT_DELETED,
            tenant: t.clone(),
            message_id: format!("{t}-deleted-{run_id}"),
            body: serde_json::json!({"tenant_id": t}).to_string(),
        });
        publish(conn, &rotate.chain(delete).collect::<Vec<_>>()).await
    }

    /// Waits until every rotation has its ready event and every expected token its revoked
    /// event, or `timeout`.
    async fn wait(
        &self,
        ready: &Mutex<Vec<serde_json::Value>>,
        revoked: &Mutex<Vec<serde_json::Value>>,
        before: usize,
        timeout: Duration,
    ) {
        let deadline = Instant::now() + timeout;
        let expected_revoked = self.rotated.len() + self.deleted.len();
        while Instant::now() < deadline {
            let ready_now = ready.lock().map(|e| e.len()).unwrap_or(0);
            let revoked_now = revoked.lock().map(|e| e.len()).unwrap_or(0);
            if ready_now >= before + self.rotated.len() && revoked_now >= expected_revoked {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Prints the lifecycle's checks; `Ok(true)` when each rotation made generation 2 and
    /// exactly the expected tokens were revoked, once each, with their events.
    fn summarize(
        &self,
        ready: &Mutex<Vec<serde_json::Value>>,
        revoked: &[serde_json::Value],
        by_stub: &[crate::tools::stub_issuer::RevokedToken],
        out: &mut std::io::Stdout,
    ) -> anyhow::Result<bool> {
        let ready = ready.lock().map(|e| e.clone()).unwrap_or_default();
        let rotations = ready
            .iter()
            .filter(|e| e["rotated"] == true && e["generation"] == 2)
            .filter_map(|e| e["tenant_id"].as_str())
            .collect::<HashSet<_>>();
        let rotated_ok = self.rotated.keys().all(|t| rotations.contains(t.as_str()));
        let expected: HashSet<&str> = self
            .rotated
            .values()
            .chain(self.deleted.values())
            .map(String::as_str)
            .collect();
        let stub_set: HashSet<&str> = by_stub.iter().map(|r| r.fingerprint.as_str()).collect();
        let once_each = by_stub.len() == stub_set.len() && stub_set == expected;
        let events: HashSet<&str> = revoked
            .iter()
            .filter_map(|e| e["token_fingerprint"].as_str())
            .collect();
        let events_ok = events == expected;
        writeln!(
            out,
            "  tokens rotated         {} of {} {}",
            rotations.len(),
            self.rotated.len(),
            mark(rotated_ok)
        )?;
        writeln!(
            out,
            "  tokens revoked         {} (expected {}, once each) {}",
            by_stub.len(),
            expected.len(),
            mark(once_each)
        )?;
        writeln!(
            out,
            "  revoked events         {} {}",
            events.len(),
            mark(events_ok)
        )?;
        Ok(rotated_ok && once_each && events_ok)
    }
}

/// What the first act did.
struct FirstAct {
    total: usize,
    tenants: usize,
    elapsed: Duration,
}

/// The first act: publishes the provisioning requests and shows progress until each has its
/// ready event (or the timeout).
async fn first_act(
    args: &DemoArgs,
    run_id: &str,
    conn: &lapin::Connection,
    events: &Mutex<Vec<serde_json::Value>>,
    out: &mut std::io::Stdout,
) -> anyhow::Result<FirstAct> {
    let reqs = requests(args, run_id);
    let total = reqs.len();
    let tenant_set: HashSet<&str> = reqs.iter().map(|r| r.tenant.as_str()).collect();
    writeln!(
        out,
        "publishing {total} requests for {} tenants ({} tenant.created, {} duplicates, {} extension.requested)",
        tenant_set.len(),
        args.tenants,
        args.duplicates.min(args.tenants),
        args.extension_requests
    )?;
    let started = Instant::now();
    publish(conn, &reqs).await?;

    let seen = show_progress(events, total, started, args.timeout).await;
    let elapsed = started.elapsed();
    writeln!(
        out,
        "  ready events {seen}/{total} in {:.1} s",
        elapsed.as_secs_f64()
    )?;
    Ok(FirstAct {
        total,
        tenants: tenant_set.len(),
        elapsed,
    })
}

/// Starts the stub issuer with a fresh master token; returns it and the token.
async fn start_stub(
    args: &DemoArgs,
    out: &mut std::io::Stdout,
) -> anyhow::Result<(StubIssuer, String)> {
    let master = format!("demo-master-{}", uuid::Uuid::new_v4().simple());
    let mut stub_cfg = StubConfig::new(SecretString::from(master.clone()));
    stub_cfg.latency = Duration::from_millis(args.issuer_latency_ms);
    let stub = StubIssuer::start(SocketAddr::from(([127, 0, 0, 1], 0)), stub_cfg).await?;
    writeln!(
        out,
        "  issuer   {} (stub, {} ms latency)",
        stub.url(),
        args.issuer_latency_ms
    )?;

    Ok((stub, master))
}

/// The worker running inside the demo, and how to stop it.
struct DemoWorker {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Builds the worker from the demo's flags, pointed at the stub, and waits until it is ready.
async fn start_worker(
    args: &DemoArgs,
    stub: &StubIssuer,
    master: &str,
) -> anyhow::Result<DemoWorker> {
    let key =
        std::env::var("TOKEN_ENCRYPTION_KEY").unwrap_or_else(|_| EncryptionKey::generate_base64());
    let run_args = RunArgs::try_from_flags([
        "demo".to_owned(),
        format!("--amqp-url={}", args.broker.amqp_url),
        format!("--database-url={}", args.database.database_url),
        format!("--issuer-url={}", stub.url()),
        format!("--issuer-master-token={master}"),
        format!("--token-encryption-key={key}"),
        format!("--concurrency={}", args.concurrency),
        "--ops-addr=127.0.0.1:0".to_owned(),
    ])?;
    let settings = run_args.into_settings()?;
    let shutdown = CancellationToken::new();
    let health = Arc::new(Health::default());
    let worker = Worker::build(settings, health.clone(), shutdown.clone())
        .await?
        .ok_or_else(|| anyhow::anyhow!("stopped before start"))?;
    let task = tokio::spawn(worker.run());
    let ready_by = Instant::now() + Duration::from_secs(20);
    while !health.not_ready_reasons().is_empty() {
        if Instant::now() > ready_by {
            anyhow::bail!("worker not ready: {:?}", health.not_ready_reasons());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(DemoWorker { shutdown, task })
}

/// Events with `routing_key` about this run's tenants (those whose id starts with `prefix`),
/// gathered by a background task from a listener queue bound before anything is published.
async fn collect_events(
    conn: &lapin::Connection,
    routing_key: &str,
    prefix: String,
) -> anyhow::Result<Arc<Mutex<Vec<serde_json::Value>>>> {
    let ch = conn.create_channel().await?;
    let mut consumer = topology::listen(&ch, routing_key).await?;
    let events: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let sink = events.clone();
    tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            let ours = serde_json::from_slice::<serde_json::Value>(&d.data)
                .ok()
                .filter(|v| {
                    v["tenant_id"]
                        .as_str()
                        .is_some_and(|t| t.starts_with(&prefix))
                });
            if let (Some(v), Ok(mut e)) = (ours, sink.lock()) {
                e.push(v);
            }
        }
    });
    Ok(events)
}

/// The demo's requests, shuffled: one `tenant.created` per tenant, redelivered copies of some
/// (same message id), and `extension.requested` for random tenants of this run.
fn requests(args: &DemoArgs, run_id: &str) -> Vec<Request> {
    let mut rng = rand::rng();
    let tenants: Vec<String> = (0..args.tenants)
        .map(|i| format!("demo-{run_id}-{i:05}"))
        .collect();
    let mut reqs: Vec<Request> = tenants
        .iter()
        .enumerate()
        .map(|(i, t)| Request {
            key: topology::TENANT_CREATED,
            tenant: t.clone(),
            message_id: format!("{t}-created"),
            body: serde_json::json!({"tenant_id": t, "tenant_name": format!("Demo Customer {i} of {run_id}")}).to_string(),
        })
        .collect();
    for _ in 0..args.duplicates.min(args.tenants) {
        let i = rng.random_range(0..reqs.len().max(1));
        if let Some(r) = reqs.get(i) {
            let dup = Request {
                key: r.key,
                tenant: r.tenant.clone(),
                message_id: r.message_id.clone(),
                body: r.body.clone(),
            };
            reqs.push(dup);
        }
    }
    for n in 0..args.extension_requests {
        if tenants.is_empty() {
            break;
        }
        let t = &tenants[rng.random_range(0..tenants.len())];
        reqs.push(Request {
            key: topology::EXTENSION_REQUESTED,
            tenant: t.clone(),
            message_id: format!("{t}-ext-{n}"),
            body: serde_json::json!({"tenant_id": t, "extension_id": format!("ext-{n}")})
                .to_string(),
        });
    }
    reqs.shuffle(&mut rng);
    reqs
}

/// Publishes every request through the confirmed [`Publisher`], many confirms outstanding at
/// once; fails if the broker refuses any.
async fn publish(conn: &lapin::Connection, reqs: &[Request]) -> anyhow::Result<()> {
    let publisher = Publisher::new(conn.create_channel().await?).await?;
    futures::stream::iter(reqs)
        .map(|r| {
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_message_id(r.message_id.as_str().into());
            let publisher = publisher.clone();
            async move {
                publisher
                    .publish(
                        topology::EVENTS_EXCHANGE,
                        r.key,
                        r.body.as_bytes(),
                        props,
                        false,
                    )
                    .await
            }
        })
        .buffer_unordered(PUBLISH_WINDOW)
        .try_for_each(|()| async { Ok(()) })
        .await
        .map_err(|e| anyhow::anyhow!("the broker refused a demo request: {e}"))
}

/// Shows a progress bar (on a terminal) until `total` ready events arrived or `timeout`
/// passed; returns how many arrived.
async fn show_progress(
    events: &Mutex<Vec<serde_json::Value>>,
    total: usize,
    started: Instant,
    timeout: Duration,
) -> usize {
    let deadline = started + timeout;
    let bar = crate::tools::progress::bar(total as u64, "  ready events");
    loop {
        let seen = events.lock().map(|e| e.len()).unwrap_or(0);
        bar.set_position(seen.min(total) as u64);
        if seen >= total || Instant::now() > deadline {
            bar.finish_and_clear();
            return seen;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Checks the run against the contract's promises and prints the summary; `Ok(true)` when
/// every check held.
fn summarize(
    events: &[serde_json::Value],
    total: usize,
    tenants: usize,
    stats: &StubStats,
    elapsed: Duration,
    out: &mut std::io::Stdout,
) -> anyhow::Result<bool> {
    // Redeliveries repeat their event (same event_id), so count distinct requests.
    let mut newly: HashMap<&str, HashSet<&str>> = HashMap::new();
    let mut fingerprints: HashMap<&str, HashSet<&str>> = HashMap::new();
    for e in events {
        let t = e["tenant_id"].as_str().unwrap_or_default();
        if e["newly_issued"] == true {
            newly
                .entry(t)
                .or_default()
                .insert(e["event_id"].as_str().unwrap_or_default());
        }
        fingerprints
            .entry(t)
            .or_default()
            .insert(e["token_fingerprint"].as_str().unwrap_or_default());
    }
    let provisioned = newly.len();
    let one_token_each = fingerprints.values().all(|f| f.len() == 1);
    let one_newly_each = newly.values().all(|ids| ids.len() == 1) && provisioned == tenants;
    let all_events = events.len() >= total;
    let calls_match = stats.issued as usize == tenants;
    let rate = events.len() as f64 / elapsed.as_secs_f64().max(1e-9);
    writeln!(out, "\nsummary")?;
    writeln!(out, "  requests published     {total}")?;
    writeln!(
        out,
        "  ready events seen      {} {}",
        events.len(),
        mark(all_events)
    )?;
    writeln!(
        out,
        "  tenants provisioned    {provisioned} of {tenants} {}",
        mark(one_newly_each)
    )?;
    writeln!(
        out,
        "  issue calls made       {} (tokens minted {}) {}",
        stats.requests,
        stats.issued,
        mark(calls_match)
    )?;
    writeln!(out, "  one token per tenant   {}", mark(one_token_each))?;
    writeln!(
        out,
        "  elapsed                {:.2} s ({rate:.0} events/s)",
        elapsed.as_secs_f64()
    )?;
    Ok(all_events && one_newly_each && one_token_each && calls_match)
}

fn mark(ok: bool) -> &'static str {
    if ok { "✓" } else { "✗" }
}
