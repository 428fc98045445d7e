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
            self.stale_partition_certs.clear();
            self.superseded_certs.clear();
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

    pub(super) fn set_cluster_version(&mut self, seq: u64, now: u64, version: u32) -> Reply {
        let current = self.cluster_version.max(1);
        if version < current {
            return invalid(format!(
                "the cluster's version is {current}; it is never lowered (asked for {version})"
            ));
        }
        if version > current {
            self.cluster_version = version;
            self.dirty.insert(Dirty::Version);
            // From version 4 documents show their partitions' certificate
            // serials: the documents of computers with one change now.
            if current < 4 && version >= 4 {
                let certified: BTreeSet<ComputerId> = self.partition_certs.keys().map(|(c, _)| c.clone()).collect();
                self.certs_moved.extend(certified);
            }
            if current < super::market::MARKET_VERSION && version >= super::market::MARKET_VERSION {
                self.open_market(seq, now);
            }
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
        // Every partition's certificate is from an earlier CA now.
        self.stale_partition_certs = self.partition_certs.keys().cloned().collect();
        self.authority = Some(authority);
        self.dirty.insert(Dirty::Authority);
        self.dirty.insert(Dirty::Rotation);
        Reply::Done
    }

    /// Ends a rotation: the previous CA is trusted no more. Since version 4
    /// the partitions' certificates from it are revoked too: the superseded
    /// ones, and those of partitions not yet given a new one (`--force`),
    /// which the issuer then gives a certificate from the new CA.
    pub(super) fn finish_rotation(&mut self) -> Reply {
        if self.rotation.is_none() {
            return invalid("no CA rotation is under way (`master-node ca rotate` starts one)");
        }
        if self.effective_version() >= 4 {
            let stale: Vec<Fingerprint> = std::mem::take(&mut self.stale_partition_certs)
                .iter()
                .filter_map(|key| self.partition_certs.get(key).copied())
                .collect();
            let superseded: Vec<Fingerprint> = self.superseded_certs.values().copied().collect();
            for fingerprint in stale.into_iter().chain(superseded) {
                self.revoke_fingerprint(fingerprint);
            }
        }
        self.rotation = None;
        self.stale_partition_certs.clear();
        self.superseded_certs.clear();
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
            // Signed by a replica that had not yet seen the rotation: the
            // partition would keep a certificate `ca finish` cuts.
            if self.rotation.is_some() && !self.signed_by_authority(cert) {
                return invalid(format!(
                    "the certificate for partition {p} of {c} is not from the CA that signs now; sign it again"
                ));
            }
            self.certs_moved.insert(c.clone());
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
    ///
    /// Outside a rotation a partition has at most one live certificate.
    /// During one it may have two: the one from the CA that signs now is
    /// its certificate, the other is superseded; one from an older CA alone
    /// is stale. Telling them apart reads each partition certificate's
    /// issuer, which only a restore during a rotation pays.
    pub(super) fn reindex_certificates(&mut self) {
        let signing = self
            .rotation
            .as_ref()
            .and(self.authority.as_ref())
            .and_then(|a| Pem::from_text(&a.cert_pem).der().map(<[u8]>::to_vec));
        let Master {
            certificates,
            partition_certs,
            stale_partition_certs,
            superseded_certs,
            poller_revocations,
            ..
        } = self;
        partition_certs.clear();
        stale_partition_certs.clear();
        superseded_certs.clear();
        *poller_revocations = 0;
        let mut old_ca: BTreeMap<(ComputerId, PartitionId), Fingerprint> = BTreeMap::new();
        for cert in certificates.values() {
            let (revocation, live_for) = indexed(cert);
            *poller_revocations += u64::from(revocation);
            let Some(key) = live_for else { continue };
            match &signing {
                Some(ca) if !signed_by(cert, ca) => {
                    old_ca.insert(key, cert.fingerprint);
                }
                _ => {
                    partition_certs.insert(key, cert.fingerprint);
                }
            }
        }
        for (key, fingerprint) in old_ca {
            if partition_certs.contains_key(&key) {
                superseded_certs.insert(key, fingerprint);
            } else {
                partition_certs.insert(key.clone(), fingerprint);
                stale_partition_certs.insert(key);
            }
        }
    }

    /// Whether `cert` was signed by the CA that signs now (its issuer is
    /// that CA's subject).
    fn signed_by_authority(&self, cert: &Certificate) -> bool {
        self.authority
            .as_ref()
            .and_then(|a| Pem::from_text(&a.cert_pem).der().map(|ca| signed_by(cert, ca)))
            .unwrap_or(false)
    }

    /// During a rotation: partitions whose certificate is still from the
    /// previous CA, up to `n`, in key order (the issuer's work).
    pub fn stale_partitions(&self, n: usize) -> impl Iterator<Item = &(ComputerId, PartitionId)> {
        self.stale_partition_certs.iter().take(n)
    }

    /// Gives a partition whose certificate is from the previous CA one from
    /// the new CA; the old one is superseded, still valid until `ca finish`
    /// (see [`Command::ReplacePartitionCertificate`]).
    pub(super) fn replace_partition_certificate(&mut self, cert: &Certificate) -> Reply {
        let Role::Partition(c, p) = &cert.role else {
            return invalid("only a partition's certificate is replaced this way; others are renewed");
        };
        if self.rotation.is_none() {
            return invalid("no CA rotation is under way: a partition's certificate is replaced only during one");
        }
        let key = (c.clone(), p.clone());
        if !self.stale_partition_certs.contains(&key) {
            return invalid(format!(
                "partition {p} of {c} has no certificate from the previous CA to replace"
            ));
        }
        if cert.revoked || !self.signed_by_authority(cert) {
            return invalid(format!(
                "the replacement for partition {p} of {c} must be a live certificate from the CA that signs now"
            ));
        }
        if self.certificates.contains_key(&cert.fingerprint) {
            return invalid("this certificate is already recorded");
        }
        // A stale partition has no superseded certificate: only a
        // replacement makes one, and it leaves the partition current.
        if let Some(old) = self.partition_certs.remove(&key) {
            self.superseded_certs.insert(key.clone(), old);
        }
        self.stale_partition_certs.remove(&key);
        self.certificates.insert(cert.fingerprint, cert.clone());
        self.dirty.insert(Dirty::Certificate(cert.fingerprint));
        self.partition_certs.insert(key, cert.fingerprint);
        self.certs_moved.insert(c.clone());
        Reply::Done
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
        let Some(fingerprint) = self
            .certificates
            .values()
            .find(|c| c.serial == serial)
            .map(|c| c.fingerprint)
        else {
            return refused_not_found(format!("no certificate has serial {serial}"));
        };
        self.revoke_fingerprint(fingerprint);
        Reply::Done
    }

    fn revoke_fingerprint(&mut self, fingerprint: Fingerprint) {
        let Some(cert) = self.certificates.get_mut(&fingerprint) else {
            return;
        };
        if !cert.revoked {
            cert.revoked = true;
            self.dirty.insert(Dirty::Certificate(cert.fingerprint));
            if reads_computers(&cert.role) {
                self.poller_revocations += 1;
            }
            if let Role::Partition(c, p) = &cert.role {
                let (fingerprint, key) = (cert.fingerprint, (c.clone(), p.clone()));
                self.unindex_partition_certificate(key, fingerprint);
            }
        }
    }

    pub(super) fn revoke_role(&mut self, role: &Role) -> Reply {
        let live: Vec<Fingerprint> = self
            .certificates
            .values()
            .filter(|c| &c.role == role && !c.revoked)
            .map(|c| c.fingerprint)
            .collect();
        for fingerprint in live {
            self.revoke_fingerprint(fingerprint);
        }
        Reply::Done
    }

    /// Takes a partition's certificate, just revoked, out of the indexes.
    /// Its superseded one, if it was the current one, becomes current again
    /// (stale: the issuer replaces it), as a restore would find it.
    fn unindex_partition_certificate(&mut self, key: (ComputerId, PartitionId), fingerprint: Fingerprint) {
        if self.superseded_certs.get(&key) == Some(&fingerprint) {
            self.superseded_certs.remove(&key);
        } else if self.partition_certs.get(&key) == Some(&fingerprint) {
            self.partition_certs.remove(&key);
            self.stale_partition_certs.remove(&key);
            if let Some(previous) = self.superseded_certs.remove(&key) {
                self.partition_certs.insert(key.clone(), previous);
                self.stale_partition_certs.insert(key.clone());
            }
            self.certs_moved.insert(key.0.clone());
            let (c, p) = key;
            self.recheck_certified(&c, &p);
        }
    }

    /// Revokes the live certificates of a partition whose instance is gone
    /// (its current one and, during a rotation, the one it superseded), so
    /// the old instance can no longer act for it.
    pub(super) fn revoke_partition_certificates(&mut self, computer: &str, partition: &str) {
        let key = (computer.to_string(), partition.to_string());
        self.stale_partition_certs.remove(&key);
        for fp in [self.partition_certs.remove(&key), self.superseded_certs.remove(&key)]
            .into_iter()
            .flatten()
        {
            if let Some(cert) = self.certificates.get_mut(&fp) {
                cert.revoked = true;
                self.dirty.insert(Dirty::Certificate(fp));
            }
            self.certs_moved.insert(computer.to_string());
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

/// Whether `cert` names `ca_der`'s subject as its issuer.
fn signed_by(cert: &Certificate, ca_der: &[u8]) -> bool {
    cert.cert_pem
        .der()
        .is_some_and(|der| slap_proto::live::Validity::issued_by(der, ca_der))
}

fn reads_computers(role: &Role) -> bool {
    matches!(role, Role::Computer(_) | Role::Admin)
}
