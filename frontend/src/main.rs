//! `slapos-frontend`: the reverse proxy the frontend release runs in its
//! partition. See the crate docs and docs/frontend.md.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use frontend::access_log::AccessLog;
use frontend::certs::{SigningAuthority, SiteCertificates};
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
        PublicAddress {
            host: public_host,
            http_port: args.http_port,
            https_port: args.https_port,
        },
    );
    reloader.reload_if_changed();

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
    loop {
        tokio::select! {
            _ = tick.tick() => { reloader.reload_if_changed(); }
            _ = hup.recv() => { tracing::info!("SIGHUP: reloading"); reloader.reload(); }
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
