//! Shutdown plumbing: one signal handler, one broadcast ([`CancellationToken`]) that every
//! part of a long-running command watches; each part then drains its own work and returns.

use tokio_util::sync::CancellationToken;

/// A token cancelled on the first SIGTERM or SIGINT: the broadcast every long-running command
/// (`run`, `stub-issuer`) listens to, to stop taking work, drain and exit 0.
pub(crate) fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        signalled().await;
        tracing::info!("shutdown requested: draining");
        t.cancel();
    });
    token
}

/// Resolves on the first SIGTERM or SIGINT (SIGINT only where there is no SIGTERM).
pub(crate) async fn signalled() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
