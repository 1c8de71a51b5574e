//! The recoverability promises checked against what a test received and what the database
//! holds: which tenants got a ready event, waiting for all of them, and the [`audit`].

use std::collections::HashMap;
use std::time::Duration;

use super::broker::{Collector, Received};
use super::env::TestEnv;

/// Tenant ids that have at least one ready event among `events`.
pub fn tenants_with_events(events: &[Received]) -> std::collections::HashSet<String> {
    events
        .iter()
        .filter_map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body)
                .ok()?
                .get("tenant_id")?
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

/// Waits until every tenant in `tenants` has a ready event.
pub async fn wait_for_tenants(events: &Collector, tenants: &[String], timeout: Duration) {
    let want: std::collections::HashSet<&str> = tenants.iter().map(String::as_str).collect();
    events
        .wait_until(
            &format!("a ready event for each of {} tenants", tenants.len()),
            timeout,
            |all| {
                let have = tenants_with_events(all);
                want.iter().all(|t| have.contains(*t))
            },
        )
        .await;
}

/// What [`audit`] found.
#[derive(Debug)]
pub struct Audit {
    /// Ready events received.
    pub events: usize,
    /// Distinct event ids among them.
    pub distinct_events: usize,
}

/// Checks the recoverability promises for `tenants` against the ready events received and
/// the database, and panics with the evidence when one is broken:
/// every tenant has exactly one stored token; at least one ready event, each carrying that
/// token's fingerprint; exactly one distinct event id with `newly_issued: true`; and every
/// copy of an event (same event id) is identical, `newly_issued` included.
pub async fn audit(env: &TestEnv, events: &[Received], tenants: &[String]) -> Audit {
    let stored = env.stored_tokens().await;
    let mut by_id: HashMap<String, serde_json::Value> = HashMap::new();
    let mut by_tenant: HashMap<String, Vec<serde_json::Value>> = HashMap::new();
    for r in events {
        let v = r.json();
        let id = v["event_id"].as_str().expect("event_id").to_owned();
        if let Some(prev) = by_id.get(&id) {
            assert_eq!(prev, &v, "every copy of event {id} is the same event");
        } else {
            by_id.insert(id, v.clone());
        }
        let t = v["tenant_id"].as_str().unwrap_or_default().to_owned();
        by_tenant.entry(t).or_default().push(v);
    }
    for t in tenants {
        let fp = stored
            .get(t)
            .unwrap_or_else(|| panic!("tenant {t} has no stored token"));
        let evs = by_tenant
            .get(t)
            .unwrap_or_else(|| panic!("tenant {t} has no ready event"));
        for e in evs {
            assert_eq!(
                e["token_fingerprint"].as_str(),
                Some(fp.as_str()),
                "tenant {t}: event {e} carries the stored token's fingerprint"
            );
        }
        let newly: std::collections::HashSet<&str> = evs
            .iter()
            .filter(|e| e["newly_issued"] == true)
            .filter_map(|e| e["event_id"].as_str())
            .collect();
        assert_eq!(
            newly.len(),
            1,
            "tenant {t}: exactly one request reports newly_issued, got {newly:?}"
        );
    }
    Audit {
        events: events.len(),
        distinct_events: by_id.len(),
    }
}
