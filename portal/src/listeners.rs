//! The listeners the server wants this portal to hold, reconciled on every push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use netport_proto::control::{ListenerSpec, Transport};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{Portal, lock};

struct Held {
    spec: ListenerSpec,
    /// Aborting it closes the listener and every connection that came through it.
    task: JoinHandle<()>,
    /// Cancelling it stops accepting but lets open connections finish (graceful shutdown).
    stop: CancellationToken,
}

/// Listeners by access rule.
#[derive(Default)]
pub struct Listeners {
    held: Mutex<HashMap<String, Held>>,
}

impl Listeners {
    /// Makes the held listeners exactly `desired`: unchanged ones keep running.
    pub fn reconcile(&self, portal: &Arc<Portal>, desired: Vec<ListenerSpec>, policy: &str) {
        let mut held = lock(&self.held);
        let wanted: HashMap<String, ListenerSpec> =
            desired.into_iter().map(|s| (s.access.clone(), s)).collect();
        held.retain(|access, h| {
            let keep = wanted.get(access) == Some(&h.spec);
            if !keep {
                h.task.abort();
                tracing::info!(access = %access, listen = %h.spec.listen, "listener closed");
            }
            keep
        });
        for (access, spec) in wanted {
            if held.contains_key(&access) {
                continue;
            }
            let portal = portal.clone();
            let s = spec.clone();
            let stop = CancellationToken::new();
            let st = stop.clone();
            let task = match spec.transport {
                Transport::Tcp => tokio::spawn(async move { listen(portal, s, st).await }),
                // UDP has no connection to wait for: a drain just closes the socket.
                Transport::Udp => tokio::spawn(async move {
                    tokio::select! {
                        () = crate::udp::listen(portal, s) => {}
                        () = st.cancelled() => {}
                    }
                }),
            };
            held.insert(access, Held { spec, task, stop });
        }
        tracing::info!(policy = %&policy[..policy.len().min(12)], listeners = held.len(), "desired state applied");
    }

    /// Closes every listener.
    pub fn clear(&self) {
        for (_, h) in lock(&self.held).drain() {
            h.task.abort();
        }
    }

    /// Graceful shutdown: stops accepting at once, waits up to `grace` for the open
    /// connections to end, then closes what is left.
    pub async fn drain(&self, grace: std::time::Duration) {
        let held: Vec<Held> = lock(&self.held).drain().map(|(_, h)| h).collect();
        for h in &held {
            h.stop.cancel();
        }
        let aborts: Vec<_> = held.iter().map(|h| h.task.abort_handle()).collect();
        let all = join_all(held.into_iter().map(|h| h.task));
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(
                "grace period of {} s over: closing the remaining connections",
                grace.as_secs()
            );
            for a in aborts {
                a.abort();
            }
        }
    }

    /// How many listeners are held.
    pub fn count(&self) -> usize {
        lock(&self.held).len()
    }

    /// The held listeners, for `/status`.
    pub fn describe(&self) -> Vec<serde_json::Value> {
        let mut out: Vec<serde_json::Value> = lock(&self.held)
            .values()
            .map(|h| {
                serde_json::json!({
                    "access": h.spec.access,
                    "listen": h.spec.listen,
                    "service": h.spec.service,
                    "serving_portal": h.spec.serving_portal,
                })
            })
            .collect();
        out.sort_by(|a, b| a["access"].as_str().cmp(&b["access"].as_str()));
        out
    }
}

/// Waits for every task.
async fn join_all(tasks: impl Iterator<Item = JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

async fn listen(portal: Arc<Portal>, spec: ListenerSpec, stop: CancellationToken) {
    let listener = match TcpListener::bind(&spec.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(access = %spec.access, listen = %spec.listen, "cannot listen: {e}");
            return;
        }
    };
    // Connections accepted from it inherit TCP_NODELAY (Linux copies it to each accepted
    // socket): no system call per connection for it.
    if let Err(e) = socket2::SockRef::from(&listener).set_tcp_nodelay(true) {
        tracing::warn!(listen = %spec.listen, "cannot set TCP_NODELAY on the listening socket (small writes may wait for Nagle's algorithm): {e}");
    }
    tracing::info!(access = %spec.access, listen = %spec.listen, service = %spec.service, "listening");
    // Connections live in this task's set: closing the listener (aborting this task) closes
    // every connection that came through it.
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, from)) => {
                    let portal = portal.clone();
                    let spec = spec.clone();
                    conns.spawn(async move {
                        if let Err(e) = crate::link::carry(portal, &spec, tcp, from).await {
                            tracing::warn!(access = %spec.access, %from, service = %spec.service, "connection refused: {e:#}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(listen = %spec.listen, "accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = stop.cancelled() => break,
        }
    }
    // Draining: the listening socket is closed; open connections finish.
    drop(listener);
    if !conns.is_empty() {
        tracing::info!(access = %spec.access, open = conns.len(), "listener closed; draining its connections");
    }
    while conns.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    /// `carry` relies on it: on Linux an accepted socket has its listener's TCP_NODELAY.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn accepted_sockets_inherit_the_listeners_nodelay() -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        socket2::SockRef::from(&listener).set_tcp_nodelay(true)?;
        let _client = tokio::net::TcpStream::connect(listener.local_addr()?).await?;
        let (accepted, _) = listener.accept().await?;
        assert!(accepted.nodelay()?);
        Ok(())
    }
}
