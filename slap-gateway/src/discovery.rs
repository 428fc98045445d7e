//! Which replicas exist and which one leads, learned from any replica.
//!
//! Every replica announces its public address (SLAP and the native API)
//! through the log, and answers the native API's `Cluster` call with the
//! members, their addresses and the leader. The gateway asks the replicas
//! it knows (the `--replicas` seeds, then everything it learned) about once
//! a second, and at once after a call failed, and keeps the list in the
//! order calls should try it: the leader first (a write it answers itself
//! saves the hop a follower's forwarding costs), then the others.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use slap_proto::master::master_client::MasterClient;
use slap_proto::master::ClusterRequest;
use tokio::sync::Notify;
use tonic::transport::Channel;

/// Makes a native-API channel to a replica's public address.
pub type Connect = Box<dyn Fn(&str) -> Option<Channel> + Send + Sync>;

/// The replicas to try, in order, and how to ask them.
pub struct Discovery {
    seeds: Vec<String>,
    order: RwLock<Vec<String>>,
    leader: RwLock<Option<String>>,
    /// The CAs the cluster trusts, as a replica last said (PEM).
    cas: RwLock<String>,
    /// Rings when a call failed: look again now.
    pub stale: Notify,
    connect: Connect,
}

impl Discovery {
    /// Starts with the seeds; `connect` makes a native-API channel to one.
    pub fn new(seeds: Vec<String>, connect: Connect) -> Arc<Discovery> {
        Arc::new(Discovery {
            order: RwLock::new(seeds.clone()),
            seeds,
            leader: RwLock::new(None),
            cas: RwLock::new(String::new()),
            stale: Notify::new(),
            connect,
        })
    }

    /// The replicas to try, leader first.
    pub fn order(&self) -> Vec<String> {
        self.order.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The leader's public address, when known.
    pub fn leader(&self) -> Option<String> {
        self.leader.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The CAs the cluster trusts (PEM, the signing one first), once a
    /// replica said.
    pub fn cas(&self) -> String {
        self.cas.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// A native-API channel to a replica.
    pub fn channel(&self, addr: &str) -> Option<Channel> {
        (self.connect)(addr)
    }

    /// Asks one replica; the new order if it answered.
    async fn ask(&self, addr: &str) -> Option<(Vec<String>, Option<String>, String)> {
        let channel = self.channel(addr)?;
        let mut client = MasterClient::new(channel);
        let call = client.cluster(ClusterRequest { state_digest: false });
        let view = tokio::time::timeout(Duration::from_secs(2), call)
            .await
            .ok()?
            .ok()?
            .into_inner();
        let addr_of = |id: u64| {
            view.replicas
                .iter()
                .find(|r| r.id == id && !r.public_addr.is_empty())
                .map(|r| r.public_addr.clone())
        };
        let leader = addr_of(view.leader_id);
        let mut order: Vec<String> = leader.iter().cloned().collect();
        for r in &view.replicas {
            if !r.public_addr.is_empty() && !order.contains(&r.public_addr) {
                order.push(r.public_addr.clone());
            }
        }
        // Seeds the cluster does not list (not announced yet) stay last.
        for s in &self.seeds {
            if !order.contains(s) {
                order.push(s.clone());
            }
        }
        Some((order, leader, view.ca_pem))
    }

    /// Keeps the order fresh until the process ends.
    pub async fn run(self: Arc<Self>) {
        loop {
            let candidates = {
                let mut c = self.leader().into_iter().collect::<Vec<_>>();
                for a in self.order() {
                    if !c.contains(&a) {
                        c.push(a);
                    }
                }
                c
            };
            for addr in candidates {
                if let Some((order, leader, cas)) = self.ask(&addr).await {
                    if !cas.is_empty() {
                        *self.cas.write().unwrap_or_else(|e| e.into_inner()) = cas;
                    }
                    let changed = *self.leader.read().unwrap_or_else(|e| e.into_inner()) != leader;
                    if changed {
                        tracing::info!(leader = ?leader, replicas = ?order, "leader learned");
                    }
                    *self.order.write().unwrap_or_else(|e| e.into_inner()) = order;
                    *self.leader.write().unwrap_or_else(|e| e.into_inner()) = leader;
                    break;
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.stale.notified() => {
                    // An election takes a few hundred milliseconds.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}
