//! The deployment artefacts against the real worker: the image's `healthcheck` command, and
//! the Grafana dashboard and the alert rules reading only metrics a running worker exports
//! (`deploy/check` validates the same files' syntax; this checks their meaning).

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use support::TestEnv;

/// The dashboard, relative to the repository root.
const DASHBOARD: &str = "deploy/grafana/tenant-tokens.json";
/// The alert rules' one source (a PrometheusRule).
const RULES: &str = "deploy/kubernetes/base/prometheusrule.yaml";
/// Metrics the alert rules may read that come from elsewhere than the worker.
const EXTERNAL: &[(&str, &str)] = &[
    ("up", "Prometheus, one per scrape target"),
    ("kube_pod_container_status_ready", "kube-state-metrics"),
];
/// The alerts issue 12 asks for.
const ALERTS: &[&str] = &[
    "TenantTokensDeadLetters",
    "TenantTokensDeadLettersGrowing",
    "TenantTokensWorkerNotReady",
    "TenantTokensIssuerErrors",
    "TenantTokensBreakerOpen",
    "TenantTokensRevocationsPending",
];
/// The metrics of contract §8: the dashboard shows every one.
const CONTRACT_METRICS: &[&str] = &[
    "tenant_tokens_deliveries_total",
    "tenant_tokens_outcomes_total",
    "tenant_tokens_issuer_requests_total",
    "tenant_tokens_issuer_request_duration_seconds",
    "tenant_tokens_handle_duration_seconds",
    "tenant_tokens_in_flight",
    "tenant_tokens_breaker_open",
    "tenant_tokens_dead_letters",
    "tenant_tokens_revocations_total",
    "tenant_tokens_revocations_pending",
    "tenant_tokens_tokens_issued_total",
];

// ---- healthcheck -----------------------------------------------------------------------

/// `tenant-tokens healthcheck ARGS` with only the given environment for OPS_ADDR.
async fn healthcheck(args: &[&str], ops_addr: Option<&str>) -> Output {
    let mut cmd = tokio::process::Command::new(support::worker_binary());
    cmd.arg("healthcheck").args(args).env_remove("OPS_ADDR");
    if let Some(addr) = ops_addr {
        cmd.env("OPS_ADDR", addr);
    }
    cmd.output().await.expect("run tenant-tokens healthcheck")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_0_against_a_ready_worker_also_through_a_wildcard_ops_addr() {
    let env = TestEnv::new().await;
    let stub = support::stub_issuer(Duration::ZERO).await;
    let mut worker = env.spawn_worker(&stub.url(), &[]);
    worker.wait_ready(Duration::from_secs(30)).await;
    let addr = worker.ops.to_string();

    let ready = healthcheck(&["--addr", &addr], None).await;
    assert_eq!(ready.status.code(), Some(0), "{}", text(&ready.stderr));
    assert!(
        text(&ready.stdout).contains(r#""ready":true"#),
        "{}",
        text(&ready.stdout)
    );
    // In the image OPS_ADDR is 0.0.0.0:9400: the check reaches it on loopback.
    let wildcard = format!("0.0.0.0:{}", worker.ops.port());
    let from_env = healthcheck(&[], Some(&wildcard)).await;
    assert_eq!(
        from_env.status.code(),
        Some(0),
        "{}",
        text(&from_env.stderr)
    );
    let live = healthcheck(&["--live", "--addr", &addr], None).await;
    assert_eq!(live.status.code(), Some(0), "{}", text(&live.stderr));
    assert_eq!(text(&live.stdout).trim(), "ok");

    worker.stop().await;
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_exits_1_for_a_worker_that_is_alive_but_not_ready() {
    use wiremock::matchers::{method, path};
    let env = TestEnv::new().await;
    // An issuer that refuses the master token: the breaker opens and /readyz fails.
    let issuer = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("POST"))
        .and(path("/api/tokens/issue"))
        .respond_with(wiremock::ResponseTemplate::new(401))
        .mount(&issuer)
        .await;
    let mut worker = env.spawn_worker(&issuer.uri(), &[]);
    worker.wait_ready(Duration::from_secs(30)).await;
    let producer = support::Producer::new(&env).await;
    let tenant = support::tenant("deploy-hc");
    producer
        .request(
            "tenant.created",
            serde_json::json!({ "tenant_id": tenant }),
            None,
        )
        .await;
    support::eventually(
        "the breaker to make the worker not ready",
        Duration::from_secs(30),
        || {
            let ready = worker.ready();
            async move { !ready.await }
        },
    )
    .await;
    let addr = worker.ops.to_string();

    let not_ready = healthcheck(&["--addr", &addr], None).await;
    assert_eq!(not_ready.status.code(), Some(1), "{not_ready:?}");
    let err = text(&not_ready.stderr);
    assert!(err.contains("503") && err.contains("breaker"), "{err}");
    let live = healthcheck(&["--live", "--addr", &addr], None).await;
    assert_eq!(live.status.code(), Some(0), "{}", text(&live.stderr));

    drop(worker);
    env.cleanup().await;
}

#[tokio::test]
async fn healthcheck_exits_1_when_nothing_listens() {
    let addr = support::free_local_addr().to_string();
    let started = Instant::now();
    let out = healthcheck(&["--addr", &addr], None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("http://{addr}/readyz")) && err.contains("no answer"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn healthcheck_gives_up_after_its_timeout_on_a_listener_that_never_answers() {
    // Bound and listening, never accepting: the connection opens, no answer ever comes.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = silent.local_addr().expect("address").to_string();
    let started = Instant::now();
    let out = healthcheck(&["--addr", &addr, "--timeout", "300ms"], None).await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stderr).contains("no answer"), "{out:?}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?} with a 300 ms timeout",
        started.elapsed()
    );
    drop(silent);
}

// ---- the dashboard and the alert rules ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alert_rules_read_only_metrics_the_worker_exports() {
    let dashboard = dashboard_metrics();
    let rules = alert_rule_metrics();
    let exported = exported_metrics_of_a_busy_worker().await;

    let missing: Vec<_> = dashboard.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "{DASHBOARD} reads metrics the worker does not export: {missing:?}\nexported: {exported:?}"
    );
    let external: BTreeSet<String> = EXTERNAL.iter().map(|(m, _)| (*m).to_owned()).collect();
    let missing: Vec<_> = rules
        .iter()
        .filter(|m| !exported.contains(*m) && !external.contains(*m))
        .collect();
    assert!(
        missing.is_empty(),
        "{RULES} reads metrics the worker does not export: {missing:?}\nexported: {exported:?}"
    );
    for metric in CONTRACT_METRICS {
        assert!(
            dashboard.iter().any(|m| family(m) == *metric),
            "the dashboard shows nothing of {metric}"
        );
    }
}

/// Starts a worker, has it provision a few tenants and dead-letter one message, and returns
/// the names of the samples its `/metrics` then shows (histograms with `_bucket`, `_sum`,
/// `_count`, as a query must name them).
async fn exported_metrics_of_a_busy_worker() -> BTreeSet<String> {
    let env = TestEnv::new().await;
    let stub = support::stub_issuer(Duration::ZERO).await;
    let events = support::Collector::ready_events(&env).await;
    let mut worker = env.spawn_worker(&stub.url(), &[]);
    worker.wait_ready(Duration::from_secs(30)).await;
    let producer = support::Producer::new(&env).await;
    let tenants: Vec<String> = (0..3).map(|_| support::tenant("deploy")).collect();
    for t in &tenants {
        let body = serde_json::json!({ "tenant_id": t });
        producer.request("tenant.created", body, None).await;
    }
    producer
        .publish("tenant.created", b"not json", BasicProperties::default())
        .await;
    events
        .wait_for(tenants.len(), Duration::from_secs(30))
        .await;

    let url = format!("http://{}/metrics", worker.ops);
    let last = Arc::new(Mutex::new(String::new()));
    let what = "/metrics to count the handled requests, the issue calls and the dead letter";
    support::eventually(what, Duration::from_secs(30), || {
        let (url, last) = (url.clone(), last.clone());
        async move {
            let text = scrape(&url).await;
            let done = sample(&text, "tenant_tokens_handle_duration_seconds_count") >= 3.0
                && sample(&text, "tenant_tokens_issuer_request_duration_seconds_count") >= 3.0
                && sample(&text, "tenant_tokens_batch_size_count") >= 1.0
                && sample(&text, "tenant_tokens_dead_letters") >= 1.0;
            *last.lock().expect("lock") = text;
            done
        }
    })
    .await;
    let text = last.lock().expect("lock").clone();
    worker.stop().await;
    env.cleanup().await;
    sample_names(&text)
}

async fn scrape(url: &str) -> String {
    let response = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    match response {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// The names of the samples of a Prometheus text exposition.
fn sample_names(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

/// The sum of the samples named `name` (any labels); 0 when there is none.
fn sample(exposition: &str, name: &str) -> f64 {
    exposition
        .lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A histogram's or summary's family name for one of its series' names.
fn family(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

fn read_repo_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|e| panic!("cannot read {}: {e}", full.display()))
}

/// Every metric the dashboard's panels and template variables query.
fn dashboard_metrics() -> BTreeSet<String> {
    let json: serde_json::Value =
        serde_json::from_str(&read_repo_file(DASHBOARD)).expect("the dashboard is JSON");
    let mut exprs = Vec::new();
    collect_panel_exprs(&json["panels"], &mut exprs);
    assert!(
        exprs.len() >= 10,
        "too few queries found in {DASHBOARD}: {exprs:?}"
    );
    let mut metrics: BTreeSet<String> = exprs.iter().flat_map(|e| promql_metrics(e)).collect();
    for var in json["templating"]["list"].as_array().into_iter().flatten() {
        let query = var["query"]["query"].as_str().or(var["query"].as_str());
        if let Some(metric) = query.and_then(|q| q.strip_prefix("label_values(")) {
            let selector = metric.split(',').next().unwrap_or_default();
            metrics.extend(promql_metrics(selector));
        }
    }
    metrics
}

/// The queries of `panels`, rows' nested panels included; every panel that shows data has
/// a datasource, and panel ids are unique.
fn collect_panel_exprs(panels: &serde_json::Value, exprs: &mut Vec<String>) {
    let mut ids = BTreeSet::new();
    for panel in panels.as_array().expect("panels is a list") {
        let title = panel["title"].as_str().unwrap_or("?");
        let id = panel["id"].as_u64().expect("every panel has an id");
        assert!(ids.insert(id), "panel id {id} is used twice");
        if panel["type"] == "row" {
            collect_panel_exprs(&panel["panels"], exprs);
            continue;
        }
        assert!(
            panel["datasource"].is_object(),
            "panel {title} has no datasource"
        );
        let targets = panel["targets"].as_array().expect("a panel has targets");
        assert!(!targets.is_empty(), "panel {title} queries nothing");
        for t in targets {
            let expr = t["expr"].as_str().expect("every target has an expr");
            exprs.push(expr.to_owned());
        }
    }
}

/// Every metric the alert rules read; also checks that the issue's alerts are all there.
fn alert_rule_metrics() -> BTreeSet<String> {
    let yaml = read_repo_file(RULES);
    let exprs = rule_exprs(&yaml);
    let rules = yaml
        .lines()
        .filter(|l| {
            let l = l.trim_start().trim_start_matches("- ");
            l.starts_with("alert:") || l.starts_with("record:")
        })
        .count();
    assert_eq!(
        exprs.len(),
        rules,
        "one expr per rule in {RULES}: {exprs:?}"
    );
    for alert in ALERTS {
        assert!(
            yaml.contains(&format!("alert: {alert}\n")),
            "{RULES} has no alert {alert}"
        );
    }
    exprs.iter().flat_map(|e| promql_metrics(e)).collect()
}

/// The `expr` values of a rule file: plain, quoted or block scalars (`|`, `>`, `>-`...).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start().trim_start_matches("- ");
        let Some(value) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let indent = line.len() - line.trim_start().len();
        let value = value.trim();
        if value.starts_with(['|', '>']) {
            let block: Vec<&str> = lines[i + 1..]
                .iter()
                .take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() > indent)
                .copied()
                .collect();
            exprs.push(block.join("\n"));
        } else {
            exprs.push(value.trim_matches(['"', '\'']).to_owned());
        }
    }
    exprs
}

/// The metric names a PromQL expression reads: identifiers that are not functions or
/// aggregations, keywords, label names (in `{...}` or in `by`/`on`/`without`/`ignoring`
/// lists), strings, ranges (`[5m]`), durations or numbers.
fn promql_metrics(expr: &str) -> BTreeSet<String> {
    // Binary operators and modifiers, and the aggregations, which may come before their
    // parenthesis (`sum by (le) (...)`).
    const KEYWORDS: &[&str] = &[
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "atan2",
        "inf",
        "nan",
        "group_left",
        "group_right",
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    ];
    const LABEL_LISTS: &[&str] = &[
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let tokens = promql_tokens(&without_selectors(expr));
    let mut metrics = BTreeSet::new();
    let mut i = 0;
    while i < tokens.len() {
        let token = tokens[i].as_str();
        let next = tokens.get(i + 1).map(String::as_str);
        if LABEL_LISTS.contains(&token) && next == Some("(") {
            // Skip the label list up to its closing parenthesis.
            i += tokens[i..]
                .iter()
                .position(|t| *t == ")")
                .unwrap_or(tokens.len() - i);
        } else if token == "offset" {
            i += 1; // and its duration
        } else if token.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && next != Some("(")
            && !KEYWORDS.contains(&token)
        {
            metrics.insert(token.to_owned());
        }
        i += 1;
    }
    metrics
}

/// `expr` with strings, label matchers `{...}` and ranges `[...]` blanked out.
fn without_selectors(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut quote = None;
    let mut depth = 0usize;
    let mut escaped = false;
    for c in expr.chars() {
        match (quote, c) {
            (Some(_), _) if escaped => escaped = false,
            (Some(_), '\\') => escaped = true,
            (Some(q), c) if c == q => quote = None,
            (Some(_), _) => {}
            (None, '"' | '\'' | '`') => quote = Some(c),
            (None, '{' | '[') => depth += 1,
            (None, '}' | ']') => depth = depth.saturating_sub(1),
            (None, c) if depth == 0 => {
                out.push(c);
                continue;
            }
            (None, _) => {}
        }
        out.push(' ');
    }
    out
}

/// Identifiers, numbers (with what follows a leading digit: `5m`, `1e3`) and single
/// punctuation characters.
fn promql_tokens(expr: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_whitespace() {
            continue;
        }
        let mut token = c.to_string();
        let word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
        if word(c) || c.is_ascii_digit() {
            while let Some(&n) = chars.peek() {
                if word(n) || (n == '.' && c.is_ascii_digit()) {
                    token.push(n);
                    chars.next();
                } else {
                    break;
                }
            }
        }
        tokens.push(token);
    }
    tokens
}

#[test]
fn the_promql_reader_finds_metric_names_and_nothing_else() {
    let names = |e: &str| promql_metrics(e).into_iter().collect::<Vec<_>>();
    assert_eq!(
        names(
            r#"sum by (outcome, le) (rate(a_total{job=~"$job", x="sum(b)"}[$__rate_interval]))
               / on (pod) group_left (node) max without (z) (c_bucket offset 5m) > bool 0.05"#
        ),
        ["a_total", "c_bucket"]
    );
    assert_eq!(
        names("(up{job=\"tt\"} == 0) or (kube_ready == 0) and 1e3 < d"),
        ["d", "kube_ready", "up"]
    );
    assert_eq!(
        names("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m])))"),
        ["h_bucket"]
    );
}

#[test]
fn rule_exprs_are_read_from_plain_quoted_and_block_scalars() {
    let yaml = "groups:\n  - rules:\n      - alert: A\n        expr: a > 0\n      - alert: B\n        expr: \"b > 0\"\n      - alert: C\n        expr: >-\n          c\n          / d\n        for: 5m\n";
    assert_eq!(
        rule_exprs(yaml),
        ["a > 0", "b > 0", "          c\n          / d"]
    );
}
