//! A replica keeps its own cluster certificate current, without a restart.
//!
//! Two things change the certificate a replica presents on its cluster port
//! (to its peers, and to clients of the cluster API):
//!
//! - an operator's `master-node cert renew SERIAL --out <data dir>/tls`,
//!   which writes `replica.crt` and `replica.key`: read again every second
//!   and taken once the pair matches;
//! - two thirds of the certificate's lifetime passing: the replica renews
//!   it itself through the log ([`crate::certificates::renew`], forwarded
//!   to the leader like any write), writes the files, and takes them.
//!
//! Either way the next handshakes present the new certificate and the
//! connections already open keep the old one, which a renewal leaves valid
//! until it expires. A renewal that fails (no leader, a cluster still at
//! version 1) is tried again every [`RETRY`], well within the third of the
//! lifetime left.
//!
//! A CA rotation reaches the replica through the state: every second the
//! CAs the state trusts are compared with `tls/ca.crt`; when they differ
//! the replica writes them there, trusts them from the next handshake on,
//! sends them (and the cross-signed CA) after its certificates, points its
//! `join-token` at the signing CA, and renews its certificate at once if
//! the signing CA did not issue it. (The SLAP port's certificate, which the
//! replica issues itself, is kept current by `server::https`.)
//!
//! Built on the replica handle; must not import the server.

use std::sync::Weak;
use std::time::Duration;

use tracing::{info, warn};

use crate::cluster_tls::ReplicaTls;
use crate::pki;
use crate::replica::Replica;

/// How often the certificate files are read again.
const CHECK: Duration = Duration::from_secs(1);
/// How long after a failed renewal the next try comes.
const RETRY: Duration = Duration::from_secs(10);

/// Runs until the replica is dropped.
pub async fn keep_current(replica: Weak<Replica>) {
    let mut last_error = String::new();
    let mut next_try = 0;
    loop {
        tokio::time::sleep(CHECK).await;
        let Some(replica) = replica.upgrade() else { return };
        let (crt, key) = ReplicaTls::files(&replica.data_dir);
        match replica.tls.identity.reload(&crt, &key) {
            Ok(Some(v)) => {
                info!(serial = %v.serial, not_after = v.not_after, "replica certificate taken from {}", crt.display());
                last_error.clear();
            }
            Ok(None) => {}
            // Said once per distinct problem: an operator mid-copy is not news every second.
            Err(e) if e.to_string() != last_error => {
                warn!(error = %e, "replica certificate on disk not taken; keeping the one in use");
                last_error = e.to_string();
            }
            Err(_) => {}
        }
        let signer = match follow_the_cas(&replica) {
            Ok(signer) => signer,
            Err(e) => {
                warn!(error = %e, "cannot take the CAs of the state; keeping the ones in use");
                None
            }
        };
        let Some(held) = replica.tls.identity.validity() else {
            continue;
        };
        let now = pki::now_secs();
        let from_old_ca = match (&signer, replica.tls.identity.end_entity()) {
            (Some(ca), Some(leaf)) => !slap_proto::live::Validity::issued_by(&leaf, ca),
            _ => false,
        };
        if !(slap_proto::live::renewal_due(&held, now) || from_old_ca) || now < next_try {
            continue;
        }
        match renew(&replica, &held.serial).await {
            Ok(serial) if from_old_ca => {
                info!(old = %held.serial, new = %serial, "replica certificate renewed under the cluster's new CA")
            }
            Ok(serial) => {
                info!(old = %held.serial, new = %serial, "replica certificate renewed at two thirds of its lifetime")
            }
            Err(e) => {
                warn!(serial = %held.serial, not_after = held.not_after, error = %e,
                    "replica certificate due for renewal, not renewed; trying again");
                next_try = now + RETRY.as_secs();
            }
        }
    }
}

/// Takes the CAs the state trusts if they changed (see the module doc);
/// the signing CA's certificate (DER), when the state has one.
fn follow_the_cas(replica: &Replica) -> Result<Option<rustls::pki_types::CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    let (trust_pem, chain_pem) = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        if state.authority.is_none() {
            return Ok(None);
        }
        (state.trust_pem(), state.chain_pem().to_string())
    };
    let signer = rustls::pki_types::CertificateDer::pem_slice_iter(trust_pem.as_bytes())
        .next()
        .and_then(Result::ok);
    if trust_pem == replica.tls.trust.pem() {
        return Ok(signer);
    }
    let ca_file = replica.data_dir.join("tls").join("ca.crt");
    pki::write_public(&ca_file, &trust_pem).map_err(|e| format!("writing {}: {e}", ca_file.display()))?;
    replica.tls.trust.replace(&trust_pem).map_err(|e| e.to_string())?;
    replica
        .tls
        .identity
        .set_chain_tail(crate::cluster_tls::chain_tail(&replica.tls.trust, &chain_pem))
        .map_err(|e| e.to_string())?;
    // The token pins the signing CA from now on (a joiner checks it).
    if let Ok(mut token) = crate::identity::JoinToken::load(&replica.data_dir) {
        if let Ok(pin) = slap_proto::tls::pem_sha256(&trust_pem) {
            token.ca_sha256 = pin;
            if let Err(e) = token.save(&replica.data_dir) {
                warn!(error = %e, "the join token could not be written with the new CA's pin");
            }
        }
    }
    info!(
        cas = slap_proto::tls::ca_certificates(&trust_pem).map_or(0, |c| c.len()),
        "trusting the CAs of the state from now on (a CA rotation began or ended)"
    );
    Ok(signer)
}

/// Renews `serial` (the certificate held), writes the files and takes
/// them; the new serial.
async fn renew(replica: &Replica, serial: &str) -> Result<String, String> {
    let crate::certificates::Handover { issued, .. } = crate::certificates::renew(replica, serial, 0)
        .await
        .map_err(|s| s.message().to_string())?;
    let (crt, key) = ReplicaTls::files(&replica.data_dir);
    let cert_pem = issued.certificate.cert_pem.to_text();
    // On disk first: a crash between the two restarts with the new pair.
    slap_proto::live::install(&crt, &cert_pem, &key, &issued.key_pem)
        .map_err(|e| format!("writing {}: {e}", crt.display()))?;
    replica
        .tls
        .identity
        .replace(&cert_pem, &issued.key_pem)
        .map_err(|e| e.to_string())?;
    Ok(issued.certificate.serial)
}
