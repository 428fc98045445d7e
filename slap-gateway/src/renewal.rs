//! The gateway keeps its certificate current without a restart.
//!
//! Its certificate is what it serves nodes and users with, and what it
//! presents to replicas. Every second the gateway reads `gateway.crt` and
//! `gateway.key` again (an operator's `master-node cert renew SERIAL --out
//! TLS_DIR` lands there) and takes a new matching pair. Once two thirds of
//! the certificate's lifetime have passed, it asks a replica for a renewal
//! of its own certificate (the native API's `RenewCertificate`, answered
//! only for the caller's own certificates), writes the new pair over the
//! files and takes it. Connections already open keep the old certificate,
//! which stays valid until it expires; new handshakes use the new one. A
//! failed renewal is tried again every [`RETRY`].
//!
//! The CAs it trusts follow the cluster's: every replica's `Cluster` answer
//! carries them, and when they change (a CA rotation begins or ends) the
//! gateway writes them to `ca.crt`, trusts them from the next handshake on,
//! and renews its certificate at once if the signing CA did not issue it.

use std::sync::Arc;
use std::time::Duration;

use slap_proto::master::master_client::MasterClient;
use slap_proto::master::RenewCertificateRequest;

use crate::discovery::Discovery;
use crate::tls::TlsFiles;

/// How often the certificate files are read again.
const CHECK: Duration = Duration::from_secs(1);
/// How long after a failed renewal the next try comes.
const RETRY: Duration = Duration::from_secs(10);

/// Runs for as long as the gateway.
pub async fn keep_current(files: Arc<TlsFiles>, discovery: Arc<Discovery>) {
    let mut last_error = String::new();
    let mut next_try = 0;
    loop {
        tokio::time::sleep(CHECK).await;
        match files.identity.reload(&files.cert_file, &files.key_file) {
            Ok(Some(v)) => {
                tracing::info!(serial = %v.serial, not_after = v.not_after, "gateway certificate taken from {}", files.cert_file.display());
                last_error.clear();
            }
            Ok(None) => {}
            Err(e) if e.to_string() != last_error => {
                tracing::warn!(error = %e, "gateway certificate on disk not taken; keeping the one in use");
                last_error = e.to_string();
            }
            Err(_) => {}
        }
        if let Err(e) = follow_the_cas(&files, &discovery) {
            tracing::warn!(error = %e, "cannot take the cluster's CAs; keeping the ones in use");
        }
        let Some(held) = files.identity.validity() else {
            continue;
        };
        let now = now_secs();
        // After a CA rotation, a certificate the signing CA did not issue is renewed at once.
        let from_old_ca =
            !discovery.cas().is_empty() && slap_proto::live::from_another_ca(&files.identity, &files.trust);
        if !(slap_proto::live::renewal_due(&held, now) || from_old_ca) || now < next_try {
            continue;
        }
        match renew(&files, &discovery, &held.serial).await {
            Ok(serial) if from_old_ca => tracing::info!(old = %held.serial, new = %serial,
                "gateway certificate renewed under the cluster's new CA"),
            Ok(serial) => tracing::info!(old = %held.serial, new = %serial,
                "gateway certificate renewed at two thirds of its lifetime"),
            Err(e) => {
                tracing::warn!(serial = %held.serial, not_after = held.not_after, error = %e,
                    "gateway certificate due for renewal, not renewed; trying again");
                next_try = now + RETRY.as_secs();
            }
        }
    }
}

/// Keeps ca.crt and the CAs trusted in step with the cluster's (a CA
/// rotation adds one, its end removes the old one), and takes a ca.crt an
/// operator wrote.
fn follow_the_cas(files: &TlsFiles, discovery: &Discovery) -> Result<(), String> {
    let cas = discovery.cas();
    if !cas.is_empty() && cas != files.trust.pem() {
        slap_proto::live::write_then_rename(&files.ca_file, &cas, 0o644)
            .map_err(|e| format!("writing {}: {e}", files.ca_file.display()))?;
    }
    if files.trust.reload(&files.ca_file).map_err(|e| e.to_string())? {
        tracing::info!(
            cas = files.trust.certificates().len(),
            "trusting the CAs of {} from now on",
            files.ca_file.display()
        );
    }
    Ok(())
}

/// Asks the replicas in turn (leader first) for a renewal of `serial`,
/// writes it and takes it; the new serial.
async fn renew(files: &TlsFiles, discovery: &Discovery, serial: &str) -> Result<String, String> {
    let mut why = "no replica known".to_string();
    for addr in discovery.order() {
        let Some(channel) = discovery.channel(&addr) else {
            continue;
        };
        let mut client = MasterClient::new(channel);
        let call = client.renew_certificate(RenewCertificateRequest {
            serial: serial.to_string(),
            seconds: 0,
        });
        let renewed = match tokio::time::timeout(Duration::from_secs(10), call).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                why = format!("{addr}: {}", status.message());
                continue;
            }
            Err(_) => {
                why = format!("{addr}: no answer within 10 s");
                continue;
            }
        };
        // On disk first: a restart takes the new pair too.
        slap_proto::live::install(
            &files.cert_file,
            &renewed.certificate_pem,
            &files.key_file,
            &renewed.key_pem,
        )
        .map_err(|e| format!("writing {}: {e}", files.cert_file.display()))?;
        files
            .identity
            .replace(&renewed.certificate_pem, &renewed.key_pem)
            .map_err(|e| e.to_string())?;
        if !renewed.ca_pem.is_empty() {
            slap_proto::live::write_then_rename(&files.ca_file, &renewed.ca_pem, 0o644)
                .map_err(|e| format!("writing {}: {e}", files.ca_file.display()))?;
        }
        return Ok(slap_proto::live::Validity::of_pem(&renewed.certificate_pem)
            .map(|v| v.serial)
            .unwrap_or_default());
    }
    Err(why)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
