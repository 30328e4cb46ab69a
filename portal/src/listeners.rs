//! The listeners the server wants this portal to hold, reconciled on every push.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use netport_proto::control::{ListenerSpec, Transport};
use tokio::net::TcpListener;
use tokio::task::AbortHandle;

use crate::{Portal, lock};

struct Held {
    spec: ListenerSpec,
    task: AbortHandle,
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
            let task = match spec.transport {
                Transport::Tcp => tokio::spawn(async move { listen(portal, s).await }),
                Transport::Udp => tokio::spawn(async move { crate::udp::listen(portal, s).await }),
            };
            held.insert(
                access,
                Held {
                    spec,
                    task: task.abort_handle(),
                },
            );
        }
        tracing::info!(policy = %&policy[..policy.len().min(12)], listeners = held.len(), "desired state applied");
    }

    /// Closes every listener.
    pub fn clear(&self) {
        for (_, h) in lock(&self.held).drain() {
            h.task.abort();
        }
    }
}

async fn listen(portal: Arc<Portal>, spec: ListenerSpec) {
    let listener = match TcpListener::bind(&spec.listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(access = %spec.access, listen = %spec.listen, "cannot listen: {e}");
            return;
        }
    };
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
                        if let Err(e) = crate::link::carry(portal, &spec, tcp).await {
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
        }
    }
}
