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
        let Some(held) = replica.tls.identity.validity() else {
            continue;
        };
        let now = pki::now_secs();
        if !slap_proto::live::renewal_due(&held, now) || now < next_try {
            continue;
        }
        match renew(&replica, &held.serial).await {
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

/// Renews `serial` (the certificate held), writes the files and takes
/// them; the new serial.
async fn renew(replica: &Replica, serial: &str) -> Result<String, String> {
    let (issued, _ca) = crate::certificates::renew(replica, serial, 0)
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
