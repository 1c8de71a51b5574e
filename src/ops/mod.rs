//! The ops endpoints: `/healthz` (the process is alive), `/readyz` (it is consuming and can
//! do its job), `/metrics` (Prometheus text) and the dead-letter console at `/dlq`
//! ([`console`]).

pub mod console;
pub(crate) mod dead_letters;
pub mod health;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use self::health::Health;
use crate::telemetry;

/// The router, separate from the listener so tests can serve it anywhere.
pub(crate) fn router(health: Arc<Health>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

async fn readyz(State(health): State<Arc<Health>>) -> impl IntoResponse {
    let reasons = health.not_ready_reasons();
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": reasons.is_empty(), "reasons": reasons })),
    )
}

async fn metrics(State(health): State<Arc<Health>>) -> impl IntoResponse {
    health.dead_letters.refresh().await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        telemetry::metrics_handle().render(),
    )
}

/// Binds `addr` (port 0 picks one) and serves until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    serve_with_console(addr, health, None, shutdown).await
}

/// [`serve`], with the dead-letter console at `/dlq` when one is given.
pub async fn serve_with_console(
    addr: SocketAddr,
    health: Arc<Health>,
    console: Option<console::Console>,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = match console {
        Some(c) => router(health).merge(c.router()),
        None => router(health),
    };
    tokio::spawn(async move {
        let server = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(e) = server.await {
            tracing::error!(error = %e, "ops server failed");
        }
    });
    Ok(bound)
}
