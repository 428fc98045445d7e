//! `slapos-frontend`: the reverse proxy the frontend release runs in its
//! partition. See the crate docs and docs/frontend.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use frontend::access_log::AccessLog;
use frontend::certs::{SigningAuthority, SiteCertificates};
use frontend::cluster_ca::{ClusterCa, MasterAccess};
use frontend::metrics::Metrics;
use frontend::proxy::{upstream, Frontend};
use frontend::reload::{Directories, PublicAddress, Reloader};
use frontend::server;
use tokio::net::TcpListener;

/// Every request allocates its headers and buffers; mimalloc's thread-local
/// free lists cost a tenth of glibc's malloc here (profiled under wrk).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "slapos-frontend",
    version,
    about = "Serves shared instances of the frontend release: one route each, over HTTP and HTTPS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the routes found in --routes until SIGTERM or SIGINT.
    Serve(Serve),
}

#[derive(Parser)]
struct Serve {
    /// An address to listen on (IPv4 or IPv6, without port); repeat for
    /// several. An empty value is skipped, as a partition without IPv6
    /// gives one.
    #[arg(long = "host", required = true)]
    hosts: Vec<String>,
    /// The plain HTTP port.
    #[arg(long)]
    http_port: Option<u16>,
    /// The HTTPS port.
    #[arg(long)]
    https_port: Option<u16>,
    /// Where /metrics and /healthz are served (host:port).
    #[arg(long)]
    admin: Option<String>,
    /// The route files, one per shared instance (`*.json`), as the node
    /// agent writes them.
    #[arg(long)]
    routes: PathBuf,
    /// Where the result of each shared instance is written.
    #[arg(long)]
    published: PathBuf,
    /// The frontend's own state: domain claims and its signing CA.
    #[arg(long)]
    state: PathBuf,
    /// The host name or address published URLs use for routes without a
    /// domain (default: the first --host).
    #[arg(long)]
    public_host: Option<String>,
    /// CA certificates (PEM) https backends are checked against; repeat
    /// for several. Default: the system bundle.
    #[arg(long)]
    backend_ca: Vec<PathBuf>,
    /// The access log: a file, `-` for standard output, `off` for none.
    #[arg(long, default_value = "-")]
    access_log: String,
    /// How often the route files are looked at, in milliseconds.
    #[arg(long, default_value_t = 200)]
    scan_interval_ms: u64,
    /// The Master's SLAP URL: domains without the user's own certificate
    /// get one from the cluster's CA, asked for as this partition (with
    /// --computer-id, --partition-id, --partition-cert, --partition-key and
    /// --master-ca). Without it (or empty), the frontend's own CA signs them.
    #[arg(long)]
    master_url: Option<String>,
    /// This partition's computer, for --master-url.
    #[arg(long)]
    computer_id: Option<String>,
    /// This partition's id, for --master-url.
    #[arg(long)]
    partition_id: Option<String>,
    /// This partition's certificate (PEM), for --master-url.
    #[arg(long)]
    partition_cert: Option<PathBuf>,
    /// This partition's key (PEM), for --master-url.
    #[arg(long)]
    partition_key: Option<PathBuf>,
    /// The CAs the Master's certificate is checked against, for --master-url.
    #[arg(long)]
    master_ca: Option<PathBuf>,
    /// How long open connections may finish their requests at shutdown.
    #[arg(long, default_value_t = 10)]
    drain_secs: u64,
}

fn roots(files: &[PathBuf]) -> anyhow::Result<rustls::RootCertStore> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut store = rustls::RootCertStore::empty();
    let system = PathBuf::from("/etc/ssl/certs/ca-certificates.crt");
    let files: Vec<PathBuf> = if files.is_empty() && system.exists() {
        vec![system]
    } else {
        files.to_vec()
    };
    for f in &files {
        let pem = std::fs::read(f).with_context(|| format!("reading --backend-ca {}", f.display()))?;
        for der in CertificateDer::pem_slice_iter(&pem) {
            let der = der.with_context(|| format!("{} is not PEM certificates", f.display()))?;
            // A bundle may hold certificates rustls cannot use as roots.
            let _ = store.add(der);
        }
    }
    Ok(store)
}

/// How the frontend asks the Master for site certificates, if it was told.
fn master_access(args: &Serve) -> anyhow::Result<Option<MasterAccess>> {
    let Some(url) = args.master_url.clone().filter(|u| !u.trim().is_empty()) else {
        return Ok(None);
    };
    let text = |v: &Option<String>, flag: &str| {
        v.clone()
            .filter(|v| !v.trim().is_empty())
            .with_context(|| format!("--master-url needs {flag}"))
    };
    let file = |v: &Option<PathBuf>, flag: &str| {
        v.clone()
            .filter(|p| !p.as_os_str().is_empty())
            .with_context(|| format!("--master-url needs {flag}"))
    };
    let access = MasterAccess {
        url,
        computer: text(&args.computer_id, "--computer-id")?,
        partition: text(&args.partition_id, "--partition-id")?,
        cert_file: file(&args.partition_cert, "--partition-cert")?,
        key_file: file(&args.partition_key, "--partition-key")?,
        ca_file: file(&args.master_ca, "--master-ca")?,
    };
    // A node that talks to its Master without certificates gives its
    // partitions none: nothing to ask with.
    if let Some(missing) = [&access.cert_file, &access.key_file, &access.ca_file]
        .into_iter()
        .find(|f| !f.exists())
    {
        tracing::warn!(
            file = %missing.display(),
            "the partition has no certificate to ask the Master with: domains get certificates from the frontend's own CA"
        );
        return Ok(None);
    }
    Ok(Some(access))
}

async fn serve(args: Serve) -> anyhow::Result<()> {
    let hosts: Vec<String> = args.hosts.iter().filter(|h| !h.trim().is_empty()).cloned().collect();
    if hosts.is_empty() {
        bail!("no address to listen on: every --host was empty");
    }
    if args.http_port.is_none() && args.https_port.is_none() {
        bail!("give --http-port, --https-port or both");
    }
    for d in [&args.routes, &args.published, &args.state] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let authority = SigningAuthority::load_or_create(&args.state).map_err(anyhow::Error::msg)?;
    let cluster = master_access(&args)?.map(|access| {
        tracing::info!(master = %access.url, "domains get their certificates from the cluster's CA");
        ClusterCa::new(access, &args.state)
    });
    let public_host = args
        .public_host
        .clone()
        .filter(|h| !h.trim().is_empty())
        .unwrap_or_else(|| hosts[0].clone());
    let mut fallback_names = vec![public_host.clone()];
    fallback_names.extend(hosts.iter().filter(|h| **h != public_host).cloned());
    let fallback = authority.issue(&fallback_names).map_err(anyhow::Error::msg)?;
    let certificates = Arc::new(SiteCertificates::new(fallback));

    let sink: Option<Box<dyn std::io::Write + Send>> = match args.access_log.as_str() {
        "off" => None,
        "-" => Some(Box::new(std::io::stdout())),
        path => Some(Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the access log {path}"))?,
        )),
    };
    let frontend = Arc::new(Frontend {
        table: Default::default(),
        upstream: upstream(roots(&args.backend_ca)?),
        metrics: Metrics::default(),
        access_log: AccessLog::new(sink),
        https_port: args.https_port,
    });
    let mut reloader = Reloader::new(
        Directories {
            routes: args.routes.clone(),
            published: args.published.clone(),
            state: args.state.clone(),
        },
        frontend.clone(),
        certificates.clone(),
        authority,
        cluster,
        PublicAddress {
            host: public_host,
            http_port: args.http_port,
            https_port: args.https_port,
        },
    );
    reloader.reload_if_changed().await;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let tls = server::tls_acceptor(certificates);
    for host in &hosts {
        for (port, tls) in [(args.http_port, None), (args.https_port, Some(tls.clone()))] {
            let Some(port) = port else { continue };
            let addr = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            let listener = TcpListener::bind(&addr)
                .await
                .with_context(|| format!("listening on {addr}"))?;
            tracing::info!(%addr, https = tls.is_some(), "listening");
            tasks.push(tokio::spawn(server::serve(
                listener,
                tls,
                frontend.clone(),
                stop_rx.clone(),
            )));
        }
    }
    if let Some(addr) = &args.admin {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on --admin {addr}"))?;
        tasks.push(tokio::spawn(server::serve_admin(
            listener,
            frontend.clone(),
            stop_rx.clone(),
        )));
    }

    let log = frontend.access_log.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            log.flush();
        }
    });
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.scan_interval_ms.max(10)));
    // Site certificates due for renewal, or waiting for the Master.
    let mut renew = tokio::time::interval(Duration::from_secs(30));
    loop {
        tokio::select! {
            _ = tick.tick() => { reloader.reload_if_changed().await; }
            _ = renew.tick() => {
                if reloader.certificates_due() {
                    reloader.reload().await;
                }
            }
            _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); reloader.reload().await; }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!(drain_secs = args.drain_secs, "stopping: finishing open requests");
    let _ = stop_tx.send(true);
    let open = frontend.clone();
    let drained = async move {
        while open.metrics.connections_open.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(args.drain_secs), drained).await;
    frontend.access_log.flush();
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let result = match cli.command {
        Command::Serve(args) => runtime.block_on(serve(args)),
    };
    if let Err(e) = result {
        eprintln!("slapos-frontend: {e:#}");
        std::process::exit(1);
    }
}
