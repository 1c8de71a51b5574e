//! Cluster failover (issue 12, contract §8) on a real RabbitMQ cluster of the test's own:
//! three private nodes on loopback ports ([`support::RabbitCluster`]), two worker processes
//! whose `AMQP_URL` lists all three, the stub issuer, Postgres. The node that holds both the
//! workers' connections and the requests queue's leader is killed mid-load; every request
//! must still be answered, once per tenant, with nothing dead-lettered.
//!
//! Slow (a cluster boots in about 20 s on two cores), hence `#[ignore]`; `.ci/run` runs it:
//!
//! ```sh
//! cargo test --locked --test cluster -- --ignored --nocapture
//! ```

mod support;

use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    ChildWorker, Producer, RabbitCluster, RabbitNode, TestEnv, audit, eventually, stub_issuer,
    tenant, tenants_with_events, wait_for_tenants,
};
use tenant_tokens::broker::topology;

/// Tenants published: enough that the workers are busy when the node dies.
const TENANTS: usize = 3000;
/// Deadline of every wait of these tests.
const WAIT: Duration = Duration::from_secs(90);
/// The client-given name of the worker's broker connection.
const WORKER_CONNECTION: &str = "tenant-tokens worker";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a private RabbitMQ node (seconds); `.ci/run` runs it with --ignored"]
async fn a_private_node_serves_amqp_on_its_own_port_and_leaves_nothing_behind() {
    let mut node = RabbitNode::start().await;
    assert_ne!(node.port(), 5672, "never the machine's default node");
    let conn = tenant_tokens::broker::connect(&node.amqp_url(), "probe")
        .await
        .expect("connect to the private node");
    let ch = conn.create_channel().await.expect("channel");
    topology::declare(&ch, &[])
        .await
        .expect("declare the topology");
    let listed = node.connections().await;
    assert!(
        listed.contains(&("probe".to_owned(), node.port())),
        "the node lists our connection: {listed:?}"
    );
    let dir = node.dir().to_owned();
    let pid = node.os_pid().expect("the node wrote its pid file");
    assert!(alive(pid), "the node's VM runs as process {pid}");
    node.kill();
    eventually("the client sees the node gone", WAIT, || async {
        !conn.status().connected()
    })
    .await;
    drop(node);
    assert!(!dir.exists(), "the node's files are removed with it");
    assert!(!alive(pid), "the node's VM (process {pid}) is gone");
}

/// Whether process `pid` runs (exists and is not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the command name, which is in parentheses.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "starts a private three-node RabbitMQ cluster and two workers (about a minute); `.ci/run` runs it with --ignored"]
async fn workers_fail_over_when_the_node_with_their_connections_and_the_queue_leader_dies() {
    let mut cluster = RabbitCluster::start(3).await;
    let (a, b, c) = (0, 1, 2);
    let name = |i: usize, cl: &RabbitCluster| cl.nodes[i].name().to_owned();
    // Declared through node a, the quorum queues start with their leader there.
    declare_topology(&cluster.nodes[a]).await;
    let leader = cluster.nodes[c]
        .quorum_leader("/", topology::REQUESTS_QUEUE)
        .await;
    assert_eq!(
        leader,
        Some(name(a, &cluster)),
        "the requests queue is led by a"
    );

    // The test's own connections (publisher, collector) use node c, which stays up.
    let mut env = TestEnv::new().await;
    env.amqp_url = cluster.nodes[c].amqp_url();
    let events = support::Collector::ready_events(&env).await;
    let producer = Producer::new(&env).await;
    let stub = stub_issuer(Duration::from_millis(2)).await;
    let urls = cluster.amqp_urls();
    let settings = [("AMQP_URL", urls.as_str()), ("RUST_LOG", "info")];
    let mut workers = [
        env.spawn_worker(&stub.url(), &settings),
        env.spawn_worker(&stub.url(), &settings),
    ];
    for w in &mut workers {
        w.wait_ready(WAIT).await;
    }
    let ports = worker_ports(&cluster.nodes[c], 2).await;
    assert!(
        ports.iter().all(|p| *p == cluster.nodes[a].port()),
        "both workers start on a, the first node of AMQP_URL: {ports:?}"
    );

    let tenants: Vec<String> = {
        let base = tenant("cluster");
        (0..TENANTS).map(|i| format!("{base}-{i}")).collect()
    };
    let publishing = tokio::spawn({
        let requests = created(&tenants);
        async move { producer.requests(requests).await }
    });
    // Mid-load: a third of the tenants answered, the rest queued or in flight.
    events
        .wait_until("a third of the tenants answered", WAIT, |all| {
            tenants_with_events(all).len() >= TENANTS / 3
        })
        .await;
    let answered_at_kill = tenants_with_events(&events.all()).len();
    let killed = Instant::now();
    cluster.nodes[a].kill();

    let back = wait_failover(&workers, killed).await;
    let ports = worker_ports(&cluster.nodes[c], 2).await;
    // To b, the next node of AMQP_URL, unless a session on b failed while the queue had no
    // leader yet (then on to c): never back to a.
    assert!(
        ports
            .iter()
            .all(|p| [b, c].iter().any(|&i| cluster.nodes[i].port() == *p)),
        "both workers failed over to a surviving node: {ports:?}"
    );
    let on_b = ports
        .iter()
        .filter(|p| **p == cluster.nodes[b].port())
        .count();
    wait_for_tenants(&events, &tenants, WAIT).await;
    let drained = killed.elapsed();
    publishing
        .await
        .expect("every request published and confirmed");
    let leader = cluster.nodes[c]
        .quorum_leader("/", topology::REQUESTS_QUEUE)
        .await;
    assert!(
        leader.as_ref().is_some_and(|l| *l != name(a, &cluster)),
        "a new leader took over the requests queue: {leader:?}"
    );

    let cost = replica_cost(&env, &cluster.nodes[c]).await;
    let received = events.all();
    let found = audit(&env, &received, &tenants).await;
    let stats = stub.stats();
    assert_eq!(
        (stats.issued, stats.issued_per_container_max),
        (TENANTS as u64, 1),
        "the issuer minted exactly one token per tenant"
    );
    assert_eq!(
        env.queue_ready(topology::DEAD_LETTER_QUEUE).await,
        0,
        "nothing was dead-lettered"
    );
    let deliveries = deliveries(&workers).await;
    eprintln!("{cost}");
    eprintln!(
        "cluster failover: {TENANTS} tenants, {answered_at_kill} answered when node a died; \
         workers ready again {back:?} after the kill ({on_b} of 2 on b, the next node); all answered {drained:?} after it; \
         {deliveries} deliveries ({} redeliveries); {} ready events ({} distinct)",
        deliveries.saturating_sub(TENANTS as u64),
        found.events,
        found.distinct_events
    );
    for w in workers {
        w.stop().await;
    }
    stub.shutdown().await;
    env.cleanup().await;
}

/// Declares the contract's topology through `node` (so its quorum queues are led there).
async fn declare_topology(node: &RabbitNode) {
    let conn = tenant_tokens::broker::connect(&node.amqp_url(), "test setup")
        .await
        .expect("connect to the first node");
    let ch = conn.create_channel().await.expect("channel");
    topology::declare(&ch, &[])
        .await
        .expect("declare the topology");
    let _ = conn.close(200, "declared".into()).await;
}

/// One `tenant.created` request per tenant, message id `<tenant>-m`.
fn created(tenants: &[String]) -> Vec<(String, serde_json::Value, String)> {
    tenants
        .iter()
        .map(|t| {
            (
                topology::TENANT_CREATED.to_owned(),
                json!({"tenant_id": t, "tenant_name": format!("Org {t}")}),
                format!("{t}-m"),
            )
        })
        .collect()
}

/// The server ports of the workers' connections once there are `n` of them (the port tells
/// the node), as `node` lists the cluster's connections.
async fn worker_ports(node: &RabbitNode, n: usize) -> Vec<u16> {
    let deadline = Instant::now() + WAIT;
    loop {
        let ports: Vec<u16> = node
            .connections()
            .await
            .into_iter()
            .filter(|(name, _)| name == WORKER_CONNECTION)
            .map(|(_, port)| port)
            .collect();
        if ports.len() == n {
            return ports;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {n} worker connections; have {ports:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until every worker has been seen not ready (it noticed the lost node) and ready
/// again; returns, per worker, how long after `since` it was ready again.
async fn wait_failover(workers: &[ChildWorker], since: Instant) -> Vec<Duration> {
    let mut down = vec![false; workers.len()];
    let mut back = vec![None; workers.len()];
    while back.iter().any(Option::is_none) {
        for (i, w) in workers.iter().enumerate() {
            let ready = w.ready().await;
            if !ready {
                down[i] = true;
            } else if down[i] && back[i].is_none() {
                back[i] = Some(since.elapsed());
            }
        }
        assert!(
            since.elapsed() < WAIT,
            "workers did not fail over within {WAIT:?} (seen down: {down:?}):\n{}",
            workers
                .iter()
                .map(ChildWorker::log_tail)
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    back.into_iter().flatten().collect()
}

/// Deliveries the workers took, from their `/metrics` (`tenant_tokens_deliveries_total`).
async fn deliveries(workers: &[ChildWorker]) -> u64 {
    let mut total = 0.0;
    for w in workers {
        total += w.metric("tenant_tokens_deliveries_total").await;
    }
    total as u64
}

/// What the two workers cost the broker and Postgres once they have drained the load
/// (docs/deploy.md, "Scaling"): per worker one connection and its channels, the prefetch
/// of its consumer (the requests it may hold unacknowledged), and the Postgres connections its
/// pool kept open (idle ones stay for minutes, so this is the peak of the run). Checked
/// against the documented bounds (`CONCURRENCY` 128 and `DB_POOL_SIZE + 1` = 9 at the
/// defaults) and returned as a line to print.
async fn replica_cost(env: &TestEnv, node: &RabbitNode) -> String {
    let workers: Vec<serde_json::Value> = node
        .connection_rows(&["pid", "channels"])
        .await
        .into_iter()
        .filter(|(name, _)| name == WORKER_CONNECTION)
        .map(|(_, row)| row)
        .collect();
    let channels: Vec<u64> = workers
        .iter()
        .filter_map(|r| r["channels"].as_u64())
        .collect();
    // Channels rather than `list_consumers`: the queue keeps the consumers of the dead node's
    // connections (suspected down) until that node returns.
    let listed = node
        .ctl_json(&[
            "list_channels",
            "connection",
            "consumer_count",
            "prefetch_count",
        ])
        .await;
    let prefetch: Vec<u64> = listed
        .as_array()
        .into_iter()
        .flatten()
        .filter(|ch| workers.iter().any(|w| w["pid"] == ch["connection"]))
        .filter(|ch| ch["consumer_count"].as_u64() > Some(0))
        .filter_map(|ch| ch["prefetch_count"].as_u64())
        .collect();
    let mut db = env.db().await;
    let pg: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = current_database() AND application_name = 'tenant-tokens'",
    )
    .fetch_one(&mut db)
    .await
    .expect("pg_stat_activity");
    assert_eq!(
        channels.len(),
        2,
        "one broker connection per worker: {channels:?}"
    );
    assert_eq!(
        prefetch,
        [128, 128],
        "one consumer per worker, prefetch CONCURRENCY"
    );
    assert!(
        (1..=2 * 9).contains(&pg),
        "at most DB_POOL_SIZE + 1 Postgres connections per worker: {pg}"
    );
    format!(
        "replica cost (2 workers, defaults, after {TENANTS} tenants): 1 broker connection each \
         with {channels:?} channels; consumer prefetch {prefetch:?}; {pg} Postgres connections in all"
    )
}
