//! `frontend-bench`: the frontend against the backend directly and against
//! HAProxy configured for the same route, in one run, with `wrk`; then a
//! tunnel (`nodeagent tunnel`, both ends) against a direct TLS connection.
//! Prints a Markdown table for docs/benchmarks.md.
//!
//! Needs `wrk` and `haproxy` (Debian packages; `scripts/bench-frontend`
//! installs them) and the workspace's `slapos-frontend` and `nodeagent`
//! next to this binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use clap::Parser;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "Requests/s and p99 through slapos-frontend, the backend directly and HAProxy; tunnel throughput")]
struct Args {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Connections wrk keeps open for the small body.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// Connections for the 1 MiB body.
    #[arg(long, default_value_t = 16)]
    big_connections: u32,
    /// Bytes pushed through the tunnel and the direct TLS connection.
    #[arg(long, default_value_t = 1 << 30)]
    tunnel_bytes: u64,
}

struct Guard(Child);
impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let p = std::env::current_exe()?.with_file_name(name);
    if !p.exists() {
        bail!("{} is missing: cargo build --workspace", p.display());
    }
    Ok(p)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_port(addr: &str) -> anyhow::Result<()> {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nothing listens on {addr}")
}

/// The backend: `/small` (16 bytes) and `/big` (1 MiB), keep-alive.
async fn backend() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("[::1]:0").await?;
    let addr = listener.local_addr()?;
    let big = Bytes::from(vec![b'x'; 1 << 20]);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let big = big.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let body = if req.uri().path().ends_with("/big") {
                        big.clone()
                    } else {
                        Bytes::from_static(b"hello, frontend\n")
                    };
                    async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body))) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One wrk run: requests/s and the 99th percentile latency in ms.
fn wrk(url: &str, connections: u32, secs: u64) -> anyhow::Result<(f64, f64)> {
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            url,
        ])
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?;
    let p99 = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| v.trim().to_string())
        .with_context(|| format!("no 99% line in wrk's output:\n{text}"))?;
    let errors = text
        .lines()
        .find(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
    if let Some(e) = errors {
        eprintln!("wrk {url}: {e}");
    }
    Ok((rate, millis(&p99)?))
}

fn millis(v: &str) -> anyhow::Result<f64> {
    let (num, factor) = if let Some(n) = v.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1000.0)
    } else {
        bail!("latency {v:?}")
    };
    Ok(num.parse::<f64>()? * factor)
}

fn haproxy(dir: &Path, port: u16, backend: std::net::SocketAddr) -> anyhow::Result<Guard> {
    let cfg = format!(
        "global\n  nbthread 2\n  maxconn 4000\n\
         defaults\n  mode http\n  timeout connect 10s\n  timeout client 60s\n  timeout server 60s\n  option http-keep-alive\n  http-reuse always\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  option forwardfor\n  http-request set-header X-Forwarded-Proto http\n  \
         http-request replace-path /bench(/.*) \\1\n  default_backend be\n\
         backend be\n  server s1 {backend}\n"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let child = Command::new("haproxy")
        .arg("-f")
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("haproxy.log"))?)
        .spawn()
        .context("starting haproxy (apt-get install haproxy)")?;
    Ok(Guard(child))
}

fn frontend(dir: &Path, port: u16, backend: std::net::SocketAddr) -> anyhow::Result<Guard> {
    let routes = dir.join("routes");
    std::fs::create_dir_all(&routes)?;
    let spec = serde_json::json!({
        "reference": "bench", "owner": "bench", "serial": "1",
        "parameters": { "backend-url": format!("http://{backend}/") },
    });
    std::fs::write(routes.join("bench.json"), spec.to_string())?;
    let child = Command::new(sibling("slapos-frontend")?)
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--http-port",
            &port.to_string(),
            "--access-log",
            "off",
        ])
        .arg("--routes")
        .arg(&routes)
        .arg("--published")
        .arg(dir.join("published"))
        .arg("--state")
        .arg(dir.join("state"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("frontend.log"))?)
        .spawn()?;
    Ok(Guard(child))
}

/// A CA and two partition certificates, as the Master issues them
/// (client authentication, `partition:COMPUTER/PARTITION`).
fn partition_certs(dir: &Path) -> anyhow::Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, "bench CA");
    std::fs::write(dir.join("ca.crt"), ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::new(ca, ca_key);
    for p in ["slappart0", "slappart1"] {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("partition:BENCH/{p}"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        std::fs::write(dir.join(format!("{p}.crt")), params.signed_by(&key, &issuer)?.pem())?;
        std::fs::write(dir.join(format!("{p}.key")), key.serialize_pem())?;
    }
    Ok(())
}

/// A sink that counts what it receives.
async fn sink(received: Arc<AtomicU64>) -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            let received = received.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    received.fetch_add(n as u64, Ordering::Relaxed);
                }
                let _ = s.write_all(b"done").await;
            });
        }
    });
    Ok(addr)
}

/// Pushes `bytes` into `w`, then waits until the sink counted them all: MB/s.
async fn push<W: tokio::io::AsyncWrite + Unpin>(mut w: W, bytes: u64, received: &AtomicU64) -> anyhow::Result<f64> {
    let before = received.load(Ordering::Relaxed);
    let chunk = vec![7u8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        w.write_all(&chunk).await?;
        sent += chunk.len() as u64;
    }
    w.flush().await?;
    while received.load(Ordering::Relaxed) - before < sent {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(sent as f64 / 1e6 / start.elapsed().as_secs_f64())
}

async fn tunnel_figures(dir: &Path, bytes: u64) -> anyhow::Result<(f64, f64)> {
    partition_certs(dir)?;
    let read = |n: &str| std::fs::read_to_string(dir.join(n));
    let identity = |p: &str| {
        slap_proto::tls::ClientIdentity::from_pem(&read(&format!("{p}.crt"))?, &read(&format!("{p}.key"))?)
            .map_err(anyhow::Error::from)
    };
    let roots = || -> anyhow::Result<rustls::RootCertStore> {
        let mut r = rustls::RootCertStore::empty();
        for c in slap_proto::pem::ca_certificates(&read("ca.crt")?)? {
            r.add(c)?;
        }
        Ok(r)
    };
    let received = Arc::new(AtomicU64::new(0));
    let sink_addr = sink(received.clone()).await?;

    // Direct: this process's TLS client to a TLS server in front of the sink.
    let (server, _) =
        slap_proto::peers::server_config(identity("slappart1")?, roots()?, vec!["BENCH/slappart0".into()])?;
    let tls_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let tls_addr = tls_listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = tls_listener.accept().await else {
                continue;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(server.clone());
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(s).await {
                    if let Ok(mut plain) = tokio::net::TcpStream::connect(sink_addr).await {
                        let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                    }
                }
            });
        }
    });
    let client = slap_proto::peers::client_config(identity("slappart0")?, roots()?, "BENCH/slappart1".into())?;
    let tcp = tokio::net::TcpStream::connect(tls_addr).await?;
    let name = rustls::pki_types::ServerName::try_from("partition")?;
    let tls = tokio_rustls::TlsConnector::from(client).connect(name, tcp).await?;
    let direct = push(tls, bytes, &received).await?;

    // Through the tunnel: both ends are `nodeagent tunnel` processes.
    let nodeagent = sibling("nodeagent")?;
    let (server_port, client_port) = (free_port(), free_port());
    let end = |args: Vec<String>| -> anyhow::Result<Guard> {
        Ok(Guard(
            Command::new(&nodeagent)
                .arg("tunnel")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        ))
    };
    let file = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let _server_end = end(vec![
        "--name".into(),
        "bench".into(),
        "--listen".into(),
        format!("127.0.0.1:{server_port}"),
        "--forward".into(),
        sink_addr.to_string(),
        "--allow".into(),
        "BENCH/slappart0".into(),
        "--cert".into(),
        file("slappart1.crt"),
        "--key".into(),
        file("slappart1.key"),
        "--ca".into(),
        file("ca.crt"),
    ])?;
    let _client_end = end(vec![
        "--name".into(),
        "bench".into(),
        "--listen".into(),
        format!("127.0.0.1:{client_port}"),
        "--connect".into(),
        format!("127.0.0.1:{server_port}"),
        "--peer".into(),
        "BENCH/slappart1".into(),
        "--cert".into(),
        file("slappart0.crt"),
        "--key".into(),
        file("slappart0.key"),
        "--ca".into(),
        file("ca.crt"),
    ])?;
    wait_port(&format!("127.0.0.1:{server_port}")).await?;
    wait_port(&format!("127.0.0.1:{client_port}")).await?;
    let plain = tokio::net::TcpStream::connect(("127.0.0.1", client_port)).await?;
    let tunnel = push(plain, bytes, &received).await?;
    Ok((direct, tunnel))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tmp = std::env::temp_dir().join(format!("frontend-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let backend = backend().await?;
    let (fe_port, ha_port) = (free_port(), free_port());
    let _fe = frontend(&tmp, fe_port, backend)?;
    let _ha = haproxy(&tmp, ha_port, backend)?;
    wait_port(&format!("127.0.0.1:{fe_port}")).await?;
    wait_port(&format!("127.0.0.1:{ha_port}")).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;

    println!("| body | target | requests/s | p99 (ms) | vs HAProxy (req/s, p99) |");
    println!("|---|---|---:|---:|---|");
    for (body, conns) in [("small", args.connections), ("big", args.big_connections)] {
        let targets = [
            ("backend directly", format!("http://[::1]:{}/{body}", backend.port())),
            ("HAProxy", format!("http://127.0.0.1:{ha_port}/bench/{body}")),
            ("slapos-frontend", format!("http://127.0.0.1:{fe_port}/bench/{body}")),
        ];
        let mut figures = Vec::new();
        for (name, url) in &targets {
            let secs = args.duration;
            let url = url.clone();
            let (rate, p99) = tokio::task::spawn_blocking(move || wrk(&url, conns, secs)).await??;
            figures.push((name.to_string(), rate, p99));
        }
        let (ha_rate, ha_p99) = (figures[1].1, figures[1].2);
        let label = if body == "small" { "16 B" } else { "1 MiB" };
        for (name, rate, p99) in figures {
            let versus = if name == "slapos-frontend" {
                format!("{:.2}x, {:.2}x", rate / ha_rate, p99 / ha_p99)
            } else {
                String::new()
            };
            println!("| {label} ({conns} conn.) | {name} | {rate:.0} | {p99:.2} | {versus} |");
        }
    }
    let (direct, tunnel) = tunnel_figures(&tmp, args.tunnel_bytes).await?;
    println!();
    println!("| {} MiB pushed | MB/s |", args.tunnel_bytes >> 20);
    println!("|---|---:|");
    println!("| direct mutual TLS | {direct:.0} |");
    println!(
        "| through the tunnel (both ends `nodeagent tunnel`) | {tunnel:.0} ({:.2}x) |",
        tunnel / direct
    );
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}
