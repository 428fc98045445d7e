//! The cluster's own facts and its identities: the cluster's creation, its
//! limits,
//! the certificate authority, issued and revoked certificates (and the one
//! live certificate of each partition), replica ids.
//!
//! Part of the state machine: no I/O, no clock; imports only the state.

use super::*;

impl Master {
    pub(super) fn init_cluster(&mut self, id: &str, token_sha256: &str) -> Reply {
        if let Some(c) = &self.cluster {
            return invalid(format!("this state already belongs to cluster {}", c.id));
        }
        self.cluster = Some(ClusterMeta {
            id: id.to_string(),
            token_sha256: token_sha256.to_string(),
            // The founding replica is 1.
            next_replica_id: 2,
        });
        self.dirty.insert(Dirty::Cluster);
        Reply::Done
    }

    /// Makes this state, read from a backup, the start of a new cluster
    /// (`master-node restore`; never applied from the log, so it may differ
    /// from one restore to the next). The cluster gets its new id, token and
    /// `authority` (the backup's own, or a new one). The old replicas'
    /// certificates are revoked and their addresses forgotten: they belong
    /// to the old cluster, whose replicas may still run. Replica ids go on
    /// from where the old cluster stopped. `founding` is what the new
    /// cluster starts with: its first replica's certificate and an
    /// administrator's.
    pub fn rebase(
        &mut self,
        id: &str,
        token_sha256: &str,
        authority: Authority,
        founding: &[Certificate],
    ) -> Result<(), String> {
        let next_replica_id = self.cluster.as_ref().map_or(2, |c| c.next_replica_id.max(2));
        self.cluster = Some(ClusterMeta {
            id: id.to_string(),
            token_sha256: token_sha256.to_string(),
            next_replica_id,
        });
        self.dirty.insert(Dirty::Cluster);
        // A new CA ends any rotation the backup was in: neither of its CAs signs.
        if self
            .authority
            .as_ref()
            .is_some_and(|a| a.cert_pem != authority.cert_pem)
            && self.rotation.take().is_some()
        {
            self.dirty.insert(Dirty::Rotation);
        }
        self.authority = Some(authority);
        self.dirty.insert(Dirty::Authority);
        let replicas: BTreeSet<Role> = self
            .certificates
            .values()
            .filter(|c| matches!(c.role, Role::Replica(_)) && !c.revoked)
            .map(|c| c.role.clone())
            .collect();
        for role in &replicas {
            self.revoke_role(role);
        }
        for n in std::mem::take(&mut self.replica_addrs).into_keys() {
            self.dirty.insert(Dirty::ReplicaAddr(n));
        }
        for cert in founding {
            if let Reply::Refused(why) = self.record_certificate(cert, None) {
                return Err(format!("the new cluster's {:?} certificate: {why}", cert.role));
            }
        }
        Ok(())
    }

    pub(super) fn set_cluster_version(&mut self, version: u32) -> Reply {
        let current = self.cluster_version.max(1);
        if version < current {
            return invalid(format!(
                "the cluster's version is {current}; it is never lowered (asked for {version})"
            ));
        }
        if version > current {
            self.cluster_version = version;
            self.dirty.insert(Dirty::Version);
        }
        Reply::Done
    }

    /// The version of the command set the cluster's writes may use.
    pub fn effective_version(&self) -> u32 {
        self.cluster_version.max(1)
    }

    pub(super) fn renew_certificate(&mut self, serial: &str, new: &Certificate) -> Reply {
        let serial = serial.to_ascii_lowercase();
        let Some(old) = self.certificates.values().find(|c| c.serial == serial) else {
            return refused_not_found(format!("no certificate has serial {serial}"));
        };
        if old.revoked {
            return invalid(format!("certificate {serial} is revoked; issue a new one instead"));
        }
        if old.role != new.role {
            return invalid(format!(
                "certificate {serial} is {:?}'s; its renewal must be for the same holder, not {:?}",
                old.role, new.role
            ));
        }
        if self.certificates.contains_key(&new.fingerprint) {
            return invalid("this certificate is already recorded");
        }
        // The old one is not revoked: its holder may not have taken the new
        // one yet (a renewal is not a compromise; `cert revoke` is for that).
        self.record_certificate(new, None)
    }

    /// Starts a rotation: `authority` signs from now on, the current one
    /// stays trusted (see [`Command::RotateAuthority`]).
    pub(super) fn rotate_authority(&mut self, authority: Authority, cross_pem: String) -> Reply {
        let Some(current) = &self.authority else {
            return invalid("the cluster has no certificate authority to rotate yet");
        };
        if self.rotation.is_some() {
            return invalid("a CA rotation is already under way: finish it first (`master-node ca finish`)");
        }
        if authority.cert_pem == current.cert_pem {
            return invalid("the new CA is the current one");
        }
        self.rotation = Some(Rotation {
            previous_pem: current.cert_pem.clone(),
            cross_pem,
        });
        self.authority = Some(authority);
        self.dirty.insert(Dirty::Authority);
        self.dirty.insert(Dirty::Rotation);
        Reply::Done
    }

    /// Ends a rotation: the previous CA is trusted no more.
    pub(super) fn finish_rotation(&mut self) -> Reply {
        if self.rotation.take().is_none() {
            return invalid("no CA rotation is under way (`master-node ca rotate` starts one)");
        }
        self.dirty.insert(Dirty::Rotation);
        Reply::Done
    }

    /// Every CA a certificate may chain to (PEM, the signing one first):
    /// the current one and, during a rotation, the previous one.
    pub fn trust_pem(&self) -> String {
        let mut pem = self.authority.as_ref().map(|a| a.cert_pem.clone()).unwrap_or_default();
        if let Some(r) = &self.rotation {
            pem.push_str(&r.previous_pem);
        }
        pem
    }

    /// What goes after a certificate issued now: the cross-signed CA
    /// during a rotation, nothing otherwise.
    pub fn chain_pem(&self) -> &str {
        self.rotation.as_ref().map_or("", |r| r.cross_pem.as_str())
    }

    pub(super) fn set_authority(&mut self, a: &Authority) -> Reply {
        if self.authority.is_some() {
            return invalid("the cluster already has a certificate authority");
        }
        self.authority = Some(a.clone());
        self.dirty.insert(Dirty::Authority);
        Reply::Done
    }

    pub(super) fn record_certificate(&mut self, cert: &Certificate, registration: Option<&str>) -> Reply {
        if let Some(token) = registration {
            match (self.registrations.get(token), &cert.role) {
                (Some(c), Role::Computer(want)) if c == want => {
                    self.registrations.remove(token);
                    self.dirty.insert(Dirty::Registration(token.to_string()));
                }
                _ => return Reply::Refused(Refusal::Forbidden("unknown or already used registration token".into())),
            }
        }
        if self.certificates.contains_key(&cert.fingerprint) {
            return invalid("this certificate is already recorded");
        }
        // One live certificate per partition: a second one (a retried or
        // a former leader's issuance) is refused, so the partition's index
        // rebuilt at restore is the one kept while running, on every
        // replica, and freeing the partition revokes all it had.
        if let (Role::Partition(c, p), false) = (&cert.role, cert.revoked) {
            if self.partition_certs.contains_key(&(c.clone(), p.clone())) {
                return invalid(format!("partition {p} of {c} already has a live certificate"));
            }
        }
        self.index_certificate(cert);
        self.certificates.insert(cert.fingerprint, cert.clone());
        self.dirty.insert(Dirty::Certificate(cert.fingerprint));
        Reply::Done
    }

    pub(super) fn index_certificate(&mut self, cert: &Certificate) {
        let (revocation, live_for) = indexed(cert);
        self.poller_revocations += u64::from(revocation);
        if let Some(key) = live_for {
            self.uncertified.remove(&key);
            self.partition_certs.insert(key, cert.fingerprint);
        }
    }

    /// Rebuilds the certificates' indexes from the records (after restore;
    /// [`Master::uncertified`] is rebuilt from them afterwards).
    pub(super) fn reindex_certificates(&mut self) {
        let Master {
            certificates,
            partition_certs,
            poller_revocations,
            ..
        } = self;
        partition_certs.clear();
        *poller_revocations = 0;
        for cert in certificates.values() {
            let (revocation, live_for) = indexed(cert);
            *poller_revocations += u64::from(revocation);
            if let Some(key) = live_for {
                partition_certs.insert(key, cert.fingerprint);
            }
        }
    }

    /// Keeps [`Master::uncertified`] true of one partition after its state
    /// or its live certificate changed.
    pub(super) fn recheck_certified(&mut self, computer: &str, partition: &str) {
        let key = (computer.to_string(), partition.to_string());
        let busy = self.partitions.get(&key).is_some_and(|p| p.state == SlapState::Busy);
        if busy && !self.partition_certs.contains_key(&key) {
            self.uncertified.insert(key);
        } else {
            self.uncertified.remove(&key);
        }
    }

    /// Up to `n` busy partitions still waiting for a certificate, in key order.
    pub fn uncertified_partitions(&self, n: usize) -> impl Iterator<Item = &(ComputerId, PartitionId)> {
        self.uncertified.iter().take(n)
    }

    pub(super) fn revoke_certificate(&mut self, serial: &str) -> Reply {
        let serial = serial.to_ascii_lowercase();
        let Some(cert) = self.certificates.values_mut().find(|c| c.serial == serial) else {
            return refused_not_found(format!("no certificate has serial {serial}"));
        };
        if !cert.revoked {
            cert.revoked = true;
            self.dirty.insert(Dirty::Certificate(cert.fingerprint));
            if reads_computers(&cert.role) {
                self.poller_revocations += 1;
            }
            if let Role::Partition(c, p) = &cert.role {
                let key = (c.clone(), p.clone());
                if self.partition_certs.get(&key) == Some(&cert.fingerprint) {
                    self.partition_certs.remove(&key);
                    let (c, p) = key;
                    self.recheck_certified(&c, &p);
                }
            }
        }
        Reply::Done
    }

    pub(super) fn revoke_role(&mut self, role: &Role) -> Reply {
        let serials: Vec<String> = self
            .certificates
            .values()
            .filter(|c| &c.role == role && !c.revoked)
            .map(|c| c.serial.clone())
            .collect();
        for serial in serials {
            self.revoke_certificate(&serial);
        }
        Reply::Done
    }

    /// Revokes the live certificate of a partition whose instance is gone,
    /// so the old instance can no longer act for it.
    pub(super) fn revoke_partition_certificates(&mut self, computer: &str, partition: &str) {
        let key = (computer.to_string(), partition.to_string());
        if let Some(fp) = self.partition_certs.remove(&key) {
            if let Some(cert) = self.certificates.get_mut(&fp) {
                cert.revoked = true;
                self.dirty.insert(Dirty::Certificate(fp));
            }
        }
        self.recheck_certified(computer, partition);
    }

    /// Live certificates whose validity ends before `before` (seconds since
    /// the Unix epoch), by kind of holder: how many, and the earliest end.
    pub fn certificates_expiring(&self, before: u64) -> std::collections::BTreeMap<&'static str, (u64, u64)> {
        let mut expiring = std::collections::BTreeMap::new();
        for c in self.certificates.values() {
            if c.revoked || c.not_after == 0 || c.not_after >= before {
                continue;
            }
            let kind = c.role.kind();
            let (count, earliest) = expiring.entry(kind).or_insert((0, u64::MAX));
            *count += 1;
            *earliest = (*earliest).min(c.not_after);
        }
        expiring
    }

    /// The live certificate of a partition, if one was issued.
    pub fn partition_certificate(&self, computer: &str, partition: &str) -> Option<&Certificate> {
        let fp = self
            .partition_certs
            .get(&(computer.to_string(), partition.to_string()))?;
        self.certificates.get(fp)
    }

    pub(super) fn reserve_replica_id(&mut self) -> Reply {
        let Some(c) = self.cluster.as_mut() else {
            return invalid("the cluster is not initialized");
        };
        let id = c.next_replica_id;
        c.next_replica_id += 1;
        self.dirty.insert(Dirty::Cluster);
        Reply::ReplicaId(id)
    }

    pub(super) fn set_limits(&mut self, limits: limits::Limits) -> Reply {
        // `check` has refused limits below their floors already.
        self.limits = limits;
        self.dirty.insert(Dirty::Limits);
        Reply::Done
    }
}

/// Whether a certificate of this role may read some computer's document.
/// What a certificate adds to the indexes: whether it is a revocation of
/// one that could read computers' documents, and the partition it is the
/// live certificate of.
fn indexed(cert: &Certificate) -> (bool, Option<(ComputerId, PartitionId)>) {
    let revocation = cert.revoked && reads_computers(&cert.role);
    let live_for = match (&cert.role, cert.revoked) {
        (Role::Partition(c, p), false) => Some((c.clone(), p.clone())),
        _ => None,
    };
    (revocation, live_for)
}

fn reads_computers(role: &Role) -> bool {
    matches!(role, Role::Computer(_) | Role::Admin)
}
