//! Wire types shared by the Master, the gateway, the node agent and the
//! chaos suite, so that none of them needs another's internals (and the agent
//! and gateway never compile RocksDB).
//!
//! - [`cluster`]: the gRPC services between replicas (Raft) and of the
//!   cluster (membership, status, forwarded writes and reads); [`tls`]: the
//!   cluster port's mutual TLS, client side.
//! - [`master`]: the Master's native API (typed SLAP, a computer watch).
//! - [`marshal`]: SLAP's xml_marshaller codec; [`form`]: its form bodies;
//!   [`instance_xml`]: the instance XML masters store parameters in;
//!   [`tioxml`]: the usage journals nodes report.

pub mod domain;
pub mod form;
pub mod instance_xml;
pub mod limits;
pub mod marshal;
pub mod rate;
pub mod size;
pub mod tioxml;
mod xml_text;

/// Certificates from PEM text, and TLS errors.
#[cfg(feature = "grpc")]
pub mod pem;

/// The handshake signature checks the verifiers share.
#[cfg(feature = "grpc")]
mod signatures;

/// Mutual TLS towards a replica's cluster port (client side).
#[cfg(feature = "grpc")]
pub mod tls;

/// Mutual TLS between partitions (tunnels).
#[cfg(feature = "grpc")]
pub mod peers;

/// Certificates replaced while serving, and when to renew them.
#[cfg(feature = "grpc")]
pub mod live;

/// gRPC: Raft transport and cluster operations (`proto/cluster.proto`).
#[cfg(feature = "grpc")]
pub mod cluster {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("slapos.cluster.v1");
}

/// gRPC: the Master's native API (`proto/master.proto`), SLAP's operations typed.
#[cfg(feature = "grpc")]
pub mod master {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("slapos.master.v1");
}
