//! The replicated SlapOS Master.
//!
//! A replica is a deterministic SlapOS state machine ([`state`]) replicated
//! with openraft ([`raft`]) over RocksDB (the `raft-store` crate). Replicas
//! form a cluster with `master-node init` and `join` ([`identity`] keeps a
//! data dir's membership), serve each other and operators over gRPC
//! ([`replica`], [`cluster_service`]), and forward to the leader whatever
//! needs it. [`client`] is the client side used by the CLI and tests.

pub mod accounting;
pub mod api;
pub mod authz;
pub mod backup;
pub mod certificates;
pub mod client;
pub mod client_certs;
pub mod cluster_service;
pub mod cluster_tls;
pub mod counters;
pub mod dashboard;
pub mod founding;
pub mod identity;
pub mod membership;
pub mod metrics;
pub mod native;
pub mod pki;
pub mod raft;
pub mod recovery;
pub mod renewal;
pub mod replica;
pub mod revisions;
pub mod server;
pub mod slap;
pub mod state;
pub mod versions;
