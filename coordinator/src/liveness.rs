//! Noticing a worker whose process died without waiting for its lease: its connection closes
//! (the kernel closes a dead process's sockets), while a silent network leaves it open.
//!
//! Every worker call records the connection it came on. When a gRPC connection closes, the
//! workers whose latest call came on it get a grace period to call again on another one (a
//! channel that reconnects after a blip does so at once); a worker that does not is declared
//! lost and its attempts end at once, their tests going back as after a lease expiry. A
//! partitioned worker's connection stays open, so it still waits for its lease; a worker that
//! comes back finds its attempts gone, as after a lease expiry.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shardgate_common::WorkerId;
use tokio::sync::mpsc;

use crate::actor::Handle;

/// Which workers called on which connection (by the peer's address).
#[derive(Debug, Default)]
pub struct Peers {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    by_addr: HashMap<SocketAddr, HashSet<WorkerId>>,
    by_worker: HashMap<WorkerId, SocketAddr>,
}

impl Peers {
    /// `worker` called on the connection from `addr`.
    pub fn seen(&self, addr: Option<SocketAddr>, worker: WorkerId) {
        let Some(addr) = addr else { return };
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.by_worker.get(&worker) == Some(&addr) {
            return;
        }
        if let Some(old) = g.by_worker.insert(worker, addr)
            && let Some(set) = g.by_addr.get_mut(&old)
        {
            set.remove(&worker);
        }
        g.by_addr.entry(addr).or_default().insert(worker);
    }

    /// The connection from `addr` closed: the workers whose latest call came on it.
    fn closed(&self, addr: SocketAddr) -> Vec<WorkerId> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let workers = g.by_addr.remove(&addr).unwrap_or_default();
        workers
            .into_iter()
            .filter(|w| {
                let on_it = g.by_worker.get(w) == Some(&addr);
                if on_it {
                    g.by_worker.remove(w);
                }
                on_it
            })
            .collect()
    }

    /// Whether `worker` has called on any connection since its last one closed.
    fn called_again(&self, worker: WorkerId) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .by_worker
            .contains_key(&worker)
    }
}

/// Follows closed connections until the channel ends: each worker whose connection closed and
/// who has not called again within `grace` is declared lost.
pub fn spawn(handle: Handle, peers: Arc<Peers>, grace: Duration) -> mpsc::UnboundedSender<SocketAddr> {
    let (tx, mut rx) = mpsc::unbounded_channel::<SocketAddr>();
    tokio::spawn(async move {
        while let Some(addr) = rx.recv().await {
            for worker in peers.closed(addr) {
                let (handle, peers) = (handle.clone(), peers.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    if peers.called_again(worker) {
                        return;
                    }
                    if let Err(e) = handle
                        .call(move |core, now| core.connection_closed(worker, now))
                        .await
                    {
                        tracing::warn!(worker = %worker, error = %e, "failed to end a disconnected worker's attempts");
                    }
                });
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_connection_names_the_workers_whose_latest_call_came_on_it() {
        let p = Peers::default();
        let (a, b): (SocketAddr, SocketAddr) =
            ("127.0.0.1:1".parse().unwrap(), "127.0.0.1:2".parse().unwrap());
        let (w1, w2, w3) = (WorkerId::new(), WorkerId::new(), WorkerId::new());
        p.seen(Some(a), w1);
        p.seen(Some(a), w2);
        p.seen(Some(a), w3);
        // w3 moved to another connection: the old one closing says nothing about it.
        p.seen(Some(b), w3);
        let mut gone = p.closed(a);
        gone.sort();
        let mut want = vec![w1, w2];
        want.sort();
        assert_eq!(gone, want);
        assert!(!p.called_again(w1));
        assert!(p.called_again(w3));
        p.seen(Some(b), w1);
        assert!(p.called_again(w1), "it came back on another connection");
        assert!(p.closed(a).is_empty());
    }
}
