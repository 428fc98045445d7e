//! `nodeagent register`: the computer's identity, obtained once from the
//! Master's cluster API with a one-time registration token
//! (`master-node computer add ID`), and written to disk with the private key
//! readable only by root.

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
    let url = if master.contains("://") {
        master.to_string()
    } else {
        format!("http://{master}")
    };
    let unreachable = |e: String| RegisterError::Unreachable(master.to_string(), e);
    let endpoint = tonic::transport::Endpoint::from_shared(url)
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    let channel = endpoint.connect().await.map_err(|e| unreachable(e.to_string()))?;
    let reply = ClusterClient::new(channel)
        .certificates(CertificatesRequest {
            action: "register".into(),
            name: computer_id.into(),
            registration: token.into(),
            ..Default::default()
        })
        .await
        .map_err(|s| RegisterError::Refused(s.message().to_string()))?
        .into_inner();
    std::fs::create_dir_all(out).map_err(|e| RegisterError::Write(out.display().to_string(), e))?;
    write(&out.join("computer.key"), &reply.key_pem, 0o600)?;
    write(&out.join("computer.crt"), &reply.certificate_pem, 0o644)?;
    write(&out.join("ca.crt"), &reply.ca_pem, 0o644)?;
    Ok(())
}
