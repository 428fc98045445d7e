//! `nodeagent register`: the computer's identity, obtained once from the
//! Master's cluster API with a one-time registration token
//! (`master-node computer add ID`), and written to disk with the private key
//! readable only by root.
//!
//! The token (`SLAPREG2.<secret>.<CA sha256>`) pins the cluster's CA: the
//! node talks only to a replica whose certificate chains to that CA, so a
//! node is never registered with, and never trusts, a foreign Master.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use slap_proto::cluster::cluster_client::ClusterClient;
use slap_proto::cluster::CertificatesRequest;

/// Why registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("cannot reach the master at {0}: {1}")]
    Unreachable(String, String),
    #[error("the master refused: {0}")]
    Refused(String),
    #[error("writing {0}: {1}")]
    Write(String, std::io::Error),
    #[error("the registration token is malformed: expected SLAPREG2.<secret>.<CA sha256>, as `master-node computer add` prints it")]
    BadToken,
}

/// The CA pin of a registration token.
fn ca_pin(token: &str) -> Result<slap_proto::tls::Trust, RegisterError> {
    let mut parts = token.trim().split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("SLAPREG2"), Some(secret), Some(pin), None) if !secret.is_empty() => {
            slap_proto::tls::Trust::pinned_hex(pin).map_err(|_| RegisterError::BadToken)
        }
        _ => Err(RegisterError::BadToken),
    }
}

fn write(path: &Path, content: &str, mode: u32) -> Result<(), RegisterError> {
    let fail = |e| RegisterError::Write(path.display().to_string(), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    f.write_all(content.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)
}

/// Registers `computer_id` at `master` (a replica's host:port) with `token`.
pub async fn register(master: &str, token: &str, computer_id: &str, out: &Path) -> Result<(), RegisterError> {
    let trust = ca_pin(token)?;
    let addr = master
        .split_once("://")
        .map(|(_, rest)| rest)
        .unwrap_or(master)
        .trim_end_matches('/');
    let unreachable = |e: String| RegisterError::Unreachable(master.to_string(), e);
    let config = slap_proto::tls::client_config(&trust, None, slap_proto::tls::Expect::AnyReplica)
        .map_err(|e| unreachable(e.to_string()))?;
    let channel = slap_proto::tls::channel(addr, config).map_err(|e| unreachable(e.to_string()))?;
    let mut client = ClusterClient::new(channel);
    let call = client.certificates(CertificatesRequest {
        action: "register".into(),
        name: computer_id.into(),
        registration: token.trim().into(),
        ..Default::default()
    });
    let reply = match tokio::time::timeout(Duration::from_secs(30), call).await {
        Err(_) => return Err(unreachable("no answer within 30 s".into())),
        Ok(Err(s)) if s.code() == tonic::Code::Unavailable => return Err(unreachable(s.message().to_string())),
        Ok(Err(s)) => return Err(RegisterError::Refused(s.message().to_string())),
        Ok(Ok(r)) => r.into_inner(),
    };
    std::fs::create_dir_all(out).map_err(|e| RegisterError::Write(out.display().to_string(), e))?;
    write(&out.join("computer.key"), &reply.key_pem, 0o600)?;
    write(&out.join("computer.crt"), &reply.certificate_pem, 0o644)?;
    write(&out.join("ca.crt"), &reply.ca_pem, 0o644)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_must_pin_the_ca() {
        assert!(ca_pin(&format!("SLAPREG2.abcdef.{}", "ab".repeat(32))).is_ok());
        for bad in [
            "",
            "SLAPREG1.abcdef",
            "SLAPREG2.abcdef",
            "SLAPREG2..00",
            "SLAPREG2.abc.xyz",
        ] {
            assert!(ca_pin(bad).is_err(), "{bad}");
        }
    }
}
