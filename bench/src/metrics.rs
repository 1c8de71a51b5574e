//! Scraping the worker's Prometheus `/metrics`, for the mean batch size of the measured phase
//! (the worker is the only one who knows how it batched).

use std::net::SocketAddr;
use std::time::Duration;

/// `(sum, count)` of the worker's batch-size histogram at `ops`, or `None` when `/metrics`
/// cannot be read. Before the first batch the histogram is absent, which reads as `(0, 0)`.
pub async fn batch_counters(ops: SocketAddr) -> Option<(f64, f64)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let text = http
        .get(format!("http://{ops}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    Some(batch_counters_in(&text))
}

fn batch_counters_in(text: &str) -> (f64, f64) {
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<f64>().ok())
    };
    (
        value("tenant_tokens_batch_size_sum").unwrap_or(0.0),
        value("tenant_tokens_batch_size_count").unwrap_or(0.0),
    )
}

/// Mean deliveries per batch between two readings of [`batch_counters`].
pub fn mean_batch(before: Option<(f64, f64)>, after: Option<(f64, f64)>) -> Option<f64> {
    match (before, after) {
        (Some((s0, c0)), Some((s1, c1))) if c1 > c0 => Some((s1 - s0) / (c1 - c0)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_batch_histogram() {
        let text = "# TYPE tenant_tokens_batch_size summary\n\
                    tenant_tokens_batch_size_sum 640\n\
                    tenant_tokens_batch_size_count 10\n";
        assert_eq!(batch_counters_in(text), (640.0, 10.0));
        assert_eq!(batch_counters_in(""), (0.0, 0.0));
        assert_eq!(
            mean_batch(Some((64.0, 2.0)), Some((640.0, 10.0))),
            Some(72.0)
        );
        assert_eq!(mean_batch(Some((1.0, 1.0)), Some((1.0, 1.0))), None);
    }
}
