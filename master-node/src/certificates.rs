//! Issuing certificates from a running replica.
//!
//! Any replica can sign: the CA is in the replicated state. It signs
//! locally, then records the certificate through the log (forwarded to the
//! leader like any write), so the record, and its revocation later, reach
//! every replica.
//!
//! The CA itself is made by `master-node init` (see [`crate::founding`]).
//! The leader runs [`run_issuer`], which gives every allocated partition a
//! certificate, so a node can fetch it with
//! `getComputerPartitionCertificate` before it deploys the instance. A freed
//! partition's certificates are revoked inside `apply`. During a CA
//! rotation it also gives every partition whose certificate is from the
//! previous CA one from the new CA; the node sees the new serial in its
//! document and fetches it.
//!
//! Built on the replica handle; must not import the handlers and the server
//! that call it (`cluster_service`, `server`).

use openraft::rt::WatchReceiver;
use std::sync::Arc;
use std::time::Duration;

use openraft::ServerState;
use tracing::{info, warn};

use crate::api::ClientWrite;
use crate::pki::{self, Issued};
use crate::replica::Replica;
use crate::state::{Command, Reply, Role};

/// Why a certificate was not issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("the cluster has no certificate authority yet; try again in a moment")]
    NoAuthority,
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("the Master could not record it: {0}")]
    Write(String),
    #[error("refused: {0}")]
    Refused(String),
}

/// A certificate as it is handed to its holder.
pub struct Handover {
    pub issued: Issued,
    /// The certificate, then (during a CA rotation) the new CA
    /// cross-signed by the old one, so a verifier that trusts only the old
    /// CA accepts it.
    pub cert_pem: String,
    /// Every CA trusted (the signing one first): the holder's `ca.crt`.
    pub ca_pem: String,
}

/// The cluster's signing CA, the CAs it trusts and the chain to send.
fn signing(replica: &Replica) -> Option<(crate::state::Authority, String, String)> {
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let ca = state.authority.clone()?;
    Some((ca, state.trust_pem(), state.chain_pem().to_string()))
}

fn handover(issued: Issued, trust_pem: String, chain_pem: &str) -> Handover {
    Handover {
        cert_pem: format!("{}{chain_pem}", issued.certificate.cert_pem.to_text()),
        ca_pem: trust_pem,
        issued,
    }
}

/// Signs a certificate for `role` and records it. With `registration`, the
/// record consumes that computer registration token.
pub async fn issue(
    replica: &Replica,
    role: Role,
    days: u64,
    registration: Option<String>,
) -> Result<Handover, IssueError> {
    issue_for_hosts(replica, role, days, registration, &[]).await
}

/// As [`issue`], for a server too (`hosts` become subject alternative names).
pub async fn issue_for_hosts(
    replica: &Replica,
    role: Role,
    days: u64,
    registration: Option<String>,
    hosts: &[String],
) -> Result<Handover, IssueError> {
    let (ca, trust_pem, chain_pem) = signing(replica).ok_or(IssueError::NoAuthority)?;
    let issued = pki::issue(&ca, &role, pki::now_secs(), days, hosts)?;
    record(replica, &issued, registration).await?;
    info!(role = %role, serial = %issued.certificate.serial, "certificate issued");
    Ok(handover(issued, trust_pem, &chain_pem))
}

/// Renews the live certificate `serial`: a new key and certificate for the
/// same holder and hosts, valid `lifetime_secs` (0: as long as the old one
/// was), recorded in one write. The old certificate stays valid until it
/// expires, so a holder that has not yet taken the new one loses nothing;
/// `cert revoke` ends it sooner. Returns the new certificate and key, and
/// the CAs.
pub async fn renew(replica: &Replica, serial: &str, lifetime_secs: u64) -> Result<Handover, tonic::Status> {
    use tonic::Status;
    let serial = serial.to_ascii_lowercase();
    let old = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        state.certificates.values().find(|c| c.serial == serial).cloned()
    };
    let old = old.ok_or_else(|| Status::not_found(format!("no certificate has serial {serial}")))?;
    let (ca, trust_pem, chain_pem) =
        signing(replica).ok_or_else(|| Status::unavailable(IssueError::NoAuthority.to_string()))?;
    if old.revoked {
        return Err(Status::failed_precondition(format!(
            "certificate {serial} is revoked; issue a new one instead"
        )));
    }
    if matches!(old.role, Role::Partition(..)) {
        return Err(Status::invalid_argument(
            "a partition's certificate is the Master's to issue: it gives the partition a new one when its instance changes",
        ));
    }
    let old_pem = old.cert_pem.to_text();
    let lifetime_secs = match lifetime_secs {
        0 => slap_proto::live::Validity::of_pem(&old_pem)
            .map(|v| pki::lifetime_of(v.not_before, v.not_after))
            .filter(|l| *l > 0)
            .unwrap_or(pki::DEFAULT_DAYS * 86400),
        l => l,
    };
    let hosts = pki::server_names_of(&old_pem);
    let issued = pki::issue_for(&ca, &old.role, pki::now_secs(), lifetime_secs, &hosts)
        .map_err(|e| Status::internal(e.to_string()))?;
    let (reply, _) = replica
        .write(ClientWrite {
            request_id: None,
            command: Command::RenewCertificate {
                serial: serial.clone(),
                certificate: Box::new(issued.certificate.clone()),
            },
        })
        .await?;
    match reply {
        Reply::Refused(crate::state::Refusal::NotYet(m)) => Err(Status::failed_precondition(m)),
        Reply::Refused(crate::state::Refusal::NotFound(m)) => Err(Status::not_found(m)),
        Reply::Refused(r) => Err(Status::invalid_argument(r.to_string())),
        _ => {
            info!(role = %old.role, old = %serial, new = %issued.certificate.serial, lifetime_secs, "certificate renewed");
            Ok(handover(issued, trust_pem, &chain_pem))
        }
    }
}

/// Records a signed certificate through the log.
async fn record(replica: &Replica, issued: &Issued, registration: Option<String>) -> Result<(), IssueError> {
    let command = Command::RecordCertificate {
        certificate: issued.certificate.clone(),
        registration,
    };
    write(replica, command).await
}

/// Writes a certificate's record through the log.
async fn write(replica: &Replica, command: Command) -> Result<(), IssueError> {
    let (reply, _) = replica
        .write(ClientWrite {
            request_id: None,
            command,
        })
        .await
        .map_err(|s| IssueError::Write(s.message().to_string()))?;
    match reply {
        Reply::Refused(r) => Err(IssueError::Refused(r.to_string())),
        _ => Ok(()),
    }
}

fn is_leader(replica: &Replica) -> bool {
    let m = replica.raft.metrics().borrow_watched().clone();
    m.state == ServerState::Leader && m.current_leader == Some(replica.id)
}

/// The leader's background duty: a certificate for every allocated
/// partition. Ends when the replica is dropped.
pub async fn run_issuer(replica: std::sync::Weak<Replica>) {
    // The log position of the last complete round: nothing to do until the
    // state moves.
    let mut done_at = None;
    let mut more_waiting = false;
    loop {
        if !std::mem::take(&mut more_waiting) {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let Some(replica) = replica.upgrade() else { return };
        if !is_leader(&replica) {
            done_at = None;
            continue;
        }
        let applied = replica.state.read().unwrap_or_else(|e| e.into_inner()).applied;
        if done_at == Some(applied) {
            continue;
        }
        match issue_round(&replica).await {
            // More are waiting: the next round at once.
            Ok(ROUND) => more_waiting = true,
            Ok(_) => done_at = Some(applied),
            Err(e) => warn!(error = %e, "certificate issuer"),
        }
    }
}

/// Certificates one round issues at most. They are signed and recorded
/// concurrently, so the leader's batching puts them in a few log entries
/// (a fleet's worth of new instances is thousands of partitions).
const ROUND: usize = 256;

/// Issues certificates for up to [`ROUND`] waiting partitions; how many
/// were recorded. Partitions without a certificate come first; then,
/// during a CA rotation (version 4), those whose certificate is from the
/// previous CA get one from the new CA beside it.
async fn issue_round(replica: &Arc<Replica>) -> Result<usize, IssueError> {
    let (ca, missing, replace) = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        let mut missing: Vec<Role> = state
            .uncertified_partitions(ROUND)
            .map(|(c, p)| Role::Partition(c.clone(), p.clone()))
            .collect();
        let replace = missing.is_empty() && state.effective_version() >= 4;
        if replace {
            missing = state
                .stale_partitions(ROUND)
                .map(|(c, p)| Role::Partition(c.clone(), p.clone()))
                .collect();
        }
        (state.authority.clone(), missing, replace)
    };
    let Some(ca) = ca else { return Ok(0) };
    if missing.is_empty() {
        return Ok(0);
    }
    // Key generation and signing are CPU work: off the async threads.
    let signed = tokio::task::spawn_blocking(move || {
        let now = pki::now_secs();
        missing
            .iter()
            .map(|role| pki::issue(&ca, role, now, pki::DEFAULT_DAYS, &[]))
            .collect::<Result<Vec<Issued>, _>>()
    })
    .await
    .map_err(|e| IssueError::Write(format!("the signing task failed: {e}")))??;
    let results = futures::future::join_all(signed.iter().map(|issued| async move {
        if replace {
            write(
                replica,
                Command::ReplacePartitionCertificate {
                    certificate: Box::new(issued.certificate.clone()),
                },
            )
            .await
        } else {
            record(replica, issued, None).await
        }
    }))
    .await;
    let mut recorded = 0;
    for r in results {
        match r {
            Ok(()) => recorded += 1,
            // The partition was freed, or another issuance won: nothing lost.
            Err(IssueError::Refused(why)) => tracing::debug!(%why, "partition certificate not recorded"),
            Err(e) => return Err(e),
        }
    }
    tracing::debug!(recorded, "partition certificates issued");
    // Only a full round of records says more may be waiting: refusals
    // (a partition freed meanwhile) must not spin the issuer.
    Ok(recorded)
}

/// How long a site certificate lasts; the frontend asks again after two
/// thirds of it.
pub const SITE_DAYS: u64 = 30;

/// A site certificate as its frontend gets it.
pub struct SiteHandover {
    pub site: pki::SiteCertificate,
    /// The certificate, then the chain a client that trusts only the
    /// previous CA needs during a rotation.
    pub cert_pem: String,
    /// Every CA clients may trust it through.
    pub ca_pem: String,
}

/// Signs a certificate for `domain`, which the caller has checked belongs
/// to the shared instance asking ([`crate::state::Master::check_site`]).
/// A name of the Master's own servers (a replica's or a gateway's) is
/// refused: a certificate for it would let a frontend pass for the Master.
///
/// Not recorded in the log: it names no holder and opens nothing on the
/// cluster's ports, it lasts [`SITE_DAYS`], and the log line is its trace.
pub fn issue_site(replica: &Replica, domain: &str) -> Result<SiteHandover, IssueError> {
    let (ca, trust_pem, chain_pem) = signing(replica).ok_or(IssueError::NoAuthority)?;
    let reserved = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .certificates
            .values()
            .filter(|c| !c.revoked && matches!(c.role, Role::Replica(_) | Role::Gateway(_)))
            .any(|c| {
                pki::server_names_of(&c.cert_pem.to_text())
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(domain))
            })
    };
    if reserved {
        return Err(IssueError::Refused(format!(
            "{domain} is the name of one of the Master's own servers"
        )));
    }
    let site = pki::issue_site(&ca, domain, pki::now_secs(), SITE_DAYS * 86400)?;
    info!(%domain, serial = %site.serial, "site certificate issued");
    Ok(SiteHandover {
        cert_pem: format!("{}{chain_pem}", site.cert_pem),
        ca_pem: trust_pem,
        site,
    })
}
