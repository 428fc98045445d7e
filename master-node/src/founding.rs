//! What a new cluster starts with (`master-node init`): its id and join
//! token, its certificate authority, the first replica's certificate and an
//! administrator's.
//!
//! All of it is made before the first replica serves, because the cluster
//! port speaks mutual TLS from its first connection: the replica needs its
//! certificate to serve, and the join token carries the CA's hash. The CA
//! and both certificates are then recorded through the log, so every replica
//! that joins later knows them.
//!
//! Must not import the replica handle or anything above it.

use std::path::Path;

use crate::cluster_tls::ReplicaTls;
use crate::identity::JoinToken;
use crate::pki::{self, PkiError};
use crate::state::{Authority, Certificate, Role};

/// Days a replica's certificate is valid.
pub const REPLICA_DAYS: u64 = 3650;

/// A new cluster's secrets and certificates.
pub struct Founding {
    pub token: JoinToken,
    pub authority: Authority,
    /// The first replica's certificate, key and the CA.
    pub replica_tls: ReplicaTls,
    /// Recorded with the cluster: the first replica's and the administrator's.
    pub records: Vec<Certificate>,
    /// The administrator's certificate and key (PEM).
    pub admin_cert_pem: String,
    pub admin_key_pem: String,
}

/// The host part of `host:port` (without IPv6 brackets).
pub fn host_of(addr: &str) -> &str {
    addr.rsplit_once(':')
        .map(|(h, _)| h.trim_matches(['[', ']']))
        .unwrap_or(addr)
}

/// Subject alternative names for a replica serving on these addresses.
pub fn server_names(addrs: &[&str]) -> Vec<String> {
    let mut names = vec!["localhost".to_string()];
    for a in addrs {
        let h = host_of(a);
        if !h.is_empty() && !names.iter().any(|n| n == h) {
            names.push(h.to_string());
        }
    }
    names
}

impl Founding {
    /// A new cluster whose first replica serves on `addrs` (listen, advertise).
    pub fn new(addrs: &[&str]) -> Result<Founding, PkiError> {
        // The token names the cluster; its CA pin is set once the CA exists.
        let token = JoinToken::generate("");
        let authority = pki::new_authority(&token.cluster_id, pki::now_secs())?;
        Founding::with_authority(token, authority, addrs)
    }

    /// A new cluster named by `token` whose CA is `authority` (a new one,
    /// or the one of a backup being restored): the token is made to pin
    /// the CA, and the first replica's and an administrator's certificates
    /// are issued by it.
    pub fn with_authority(mut token: JoinToken, authority: Authority, addrs: &[&str]) -> Result<Founding, PkiError> {
        let now = pki::now_secs();
        token.ca_sha256 = slap_proto::tls::pem_sha256(&authority.cert_pem).map_err(|e| PkiError::new(e.to_string()))?;
        let replica = pki::issue(&authority, &Role::Replica(1), now, REPLICA_DAYS, &server_names(addrs))?;
        let admin = pki::issue(&authority, &Role::Admin, now, pki::DEFAULT_DAYS, &[])?;
        Ok(Founding {
            replica_tls: ReplicaTls::new(
                authority.cert_pem.clone(),
                &replica.certificate.cert_pem.to_text(),
                &replica.key_pem,
            )
            .map_err(|e| PkiError::new(e.to_string()))?,
            admin_cert_pem: admin.certificate.cert_pem.to_text(),
            admin_key_pem: admin.key_pem,
            records: vec![replica.certificate, admin.certificate],
            authority,
            token,
        })
    }

    /// Writes the administrator's certificate, key (0600) and the CA into
    /// `dir` (`<data dir>/admin/` after init).
    pub fn save_admin(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        pki::write_private(&dir.join("admin.key"), &self.admin_key_pem)?;
        pki::write_public(&dir.join("admin.crt"), &self.admin_cert_pem)?;
        pki::write_public(&dir.join("ca.crt"), &self.authority.cert_pem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_pins_the_ca_and_the_replica_is_replica_1() {
        let f = Founding::new(&["127.0.0.1:7001", "10.0.0.1:7001"]).unwrap();
        assert_eq!(
            f.token.ca_sha256,
            slap_proto::tls::pem_sha256(&f.authority.cert_pem).unwrap()
        );
        assert_eq!(f.records[0].role, Role::Replica(1));
        assert_eq!(f.records[1].role, Role::Admin);
        assert_eq!(
            server_names(&["127.0.0.1:1", "[::1]:2", "127.0.0.1:3"]),
            ["localhost", "127.0.0.1", "::1"]
        );
    }
}
