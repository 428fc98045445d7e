//! Tunnels between partitions (the role stunnel plays in SlapOS): a
//! service in one partition reached from another partition, on this node
//! or another, over mutual TLS with both partitions' own certificates.
//!
//! A release asks for one with `[[instance.TYPE.tunnel]]` (see
//! docs/software-release.md); the agent runs each as a supervised process
//! of the partition, `nodeagent tunnel`, as the partition's user:
//!
//! - the **server end** listens for TLS (typically on the partition's
//!   IPv6), lets in only the partitions named by `allow`, refusing any
//!   other at the handshake, and forwards to the local service;
//! - the **client end** listens in plain TCP on a local address of the
//!   client partition and, for each connection, dials the server end and
//!   checks that it is the partition it expects.
//!
//! Each connection dials anew, so a tunnel carries on by itself once a
//! restarted server end listens again. The certificate files are read again
//! for every connection, so a certificate the agent replaced (a CA
//! rotation) is used from the next one.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tokio::net::{TcpListener, TcpStream};
use tracing::{info, warn};

/// Bytes copied per read: four TLS records, fewer system calls than
/// tokio's 8 KiB default for bulk transfers.
const COPY_BUFFER: usize = 64 * 1024;

/// `nodeagent tunnel`: one end of a tunnel.
#[derive(Args, Debug, Clone)]
pub struct TunnelArgs {
    /// The tunnel's name, for logs.
    #[arg(long)]
    pub name: String,
    /// Where this end listens (host:port; an IPv6 host in brackets).
    #[arg(long)]
    pub listen: String,
    /// Server end: the local service connections go to (host:port).
    #[arg(long, conflicts_with = "connect", required_unless_present = "connect")]
    pub forward: Option<String>,
    /// Server end: a partition let in, as COMPUTER/PARTITION; repeat.
    #[arg(long, requires = "forward")]
    pub allow: Vec<String>,
    /// Client end: the server end to dial (host:port).
    #[arg(long, requires = "peer")]
    pub connect: Option<String>,
    /// Client end: the partition the server end must be, COMPUTER/PARTITION.
    #[arg(long)]
    pub peer: Option<String>,
    /// This partition's certificate, key and the cluster's CAs (PEM).
    #[arg(long)]
    pub cert: PathBuf,
    #[arg(long)]
    pub key: PathBuf,
    #[arg(long)]
    pub ca: PathBuf,
}

struct Files {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Files {
    fn read(&self) -> anyhow::Result<(slap_proto::tls::ClientIdentity, rustls::RootCertStore)> {
        let read = |p: &PathBuf| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
        let identity = slap_proto::tls::ClientIdentity::from_pem(&read(&self.cert)?, &read(&self.key)?)?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in slap_proto::pem::ca_certificates(&read(&self.ca)?)? {
            roots.add(ca).context("the cluster CA")?;
        }
        Ok((identity, roots))
    }
}

/// Runs one end until the process is stopped.
pub async fn run(args: TunnelArgs) -> anyhow::Result<()> {
    let files = Arc::new(Files {
        cert: args.cert.clone(),
        key: args.key.clone(),
        ca: args.ca.clone(),
    });
    // Fail at start on unusable files, not at the first connection.
    files.read()?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("tunnel {}: listening on {}", args.name, args.listen))?;
    let refused = Arc::new(AtomicU64::new(0));
    match (&args.forward, &args.connect) {
        (Some(forward), _) => {
            info!(tunnel = %args.name, listen = %args.listen, %forward, allow = ?args.allow, "tunnel server end ready");
            loop {
                let (stream, peer) = listener.accept().await?;
                let (files, args, refused) = (files.clone(), args.clone(), refused.clone());
                let forward = forward.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve_one(stream, &files, &args.allow, &forward).await {
                        let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                        warn!(tunnel = %args.name, %peer, refused = n, "tunnel refused a connection: {e:#}");
                    }
                });
            }
        }
        (None, Some(connect)) => {
            let expect = args.peer.clone().unwrap_or_default();
            info!(tunnel = %args.name, listen = %args.listen, %connect, peer = %expect, "tunnel client end ready");
            loop {
                let (stream, _) = listener.accept().await?;
                let (files, name, connect, expect) =
                    (files.clone(), args.name.clone(), connect.clone(), expect.clone());
                tokio::spawn(async move {
                    if let Err(e) = dial_one(stream, &files, &connect, &expect).await {
                        warn!(tunnel = %name, %connect, "tunnel connection failed: {e:#}");
                    }
                });
            }
        }
        (None, None) => anyhow::bail!("a tunnel needs --forward (server end) or --connect (client end)"),
    }
}

async fn serve_one(stream: TcpStream, files: &Files, allow: &[String], forward: &str) -> anyhow::Result<()> {
    let (identity, roots) = files.read()?;
    let (config, _) = slap_proto::peers::server_config(identity, roots, allow.to_vec())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let mut tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream))
        .await
        .context("no TLS handshake within 10 s")?
        .context("TLS handshake")?;
    let mut service = TcpStream::connect(forward)
        .await
        .with_context(|| format!("the service at {forward}"))?;
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut service, COPY_BUFFER, COPY_BUFFER).await;
    Ok(())
}

async fn dial_one(mut local: TcpStream, files: &Files, connect: &str, expect: &str) -> anyhow::Result<()> {
    let (identity, roots) = files.read()?;
    let config = slap_proto::peers::client_config(identity, roots, expect.to_string())?;
    let remote = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(connect))
        .await
        .context("no connection within 10 s")?
        .context("connecting")?;
    let name = rustls::pki_types::ServerName::try_from("partition").expect("a valid name");
    let mut tls = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(config).connect(name, remote),
    )
    .await
    .context("no TLS handshake within 10 s")?
    .context("TLS handshake")?;
    let _ = tokio::io::copy_bidirectional_with_sizes(&mut local, &mut tls, COPY_BUFFER, COPY_BUFFER).await;
    Ok(())
}
