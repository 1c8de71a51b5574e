//! A severable TCP proxy, to cut a process off from a server (Postgres, say) and let it back
//! without touching the server.

use std::sync::{Arc, Mutex};

/// A TCP proxy on 127.0.0.1 that a test can sever (drop every live connection and refuse
/// new ones) and restore, to cut a process off from a server without touching the server.
pub struct TcpProxy {
    /// Where to connect instead of the server.
    pub addr: std::net::SocketAddr,
    inner: Arc<ProxyInner>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct ProxyInner {
    /// Guarded together with the live connections, so that no connection slips past a cut.
    state: Mutex<ProxyState>,
}

#[derive(Default)]
struct ProxyState {
    severed: bool,
    live: Vec<tokio::task::AbortHandle>,
    accepted: u64,
    /// Where new connections go (`host:port`).
    upstream: String,
}

impl TcpProxy {
    /// Listens on 127.0.0.1:0 and forwards to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("proxy listener");
        let addr = listener.local_addr().expect("proxy address");
        let inner = Arc::new(ProxyInner::default());
        inner.state.lock().expect("proxy state").upstream = upstream.to_owned();
        let shared = inner.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    continue;
                };
                let mut state = shared.state.lock().expect("proxy state");
                if state.severed {
                    drop(client);
                    continue;
                }
                state.accepted += 1;
                state.live.retain(|h| !h.is_finished());
                let upstream = state.upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                state.live.push(task.abort_handle());
            }
        });
        Self {
            addr,
            inner,
            accept,
        }
    }

    /// Drops every live connection and refuses new ones (accepted, then closed at once).
    pub fn sever(&self) {
        let mut state = self.inner.state.lock().expect("proxy state");
        state.severed = true;
        for h in state.live.drain(..) {
            h.abort();
        }
    }

    /// Forwards new connections to `upstream` from now on: the same address, another server
    /// (a failover as the client sees it).
    pub fn set_upstream(&self, upstream: &str) {
        self.inner.state.lock().expect("proxy state").upstream = upstream.to_owned();
    }

    /// Forwards new connections again.
    pub fn restore(&self) {
        self.inner.state.lock().expect("proxy state").severed = false;
    }

    /// Connections forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.inner.state.lock().expect("proxy state").accepted
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sever();
    }
}
