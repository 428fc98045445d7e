//! The cost of mutual TLS on SLAP: full handshakes per second, and a node's
//! poll (getFullComputerInformation, 100 partitions, 50 busy) over plain HTTP
//! and over HTTPS with a client certificate, side by side on one replica,
//! each with a new connection per poll (as slapgrid does) and on a kept-alive
//! connection (as nodeagent does).
//!
//! ```text
//! cargo run -p master-node --example tls_bench -- [SECONDS]
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use master_node::raft::Timing;
use master_node::server::Running;
use master_node::state::Role;
use slap_proto::form::encode;
use slap_proto::marshal::{dumps, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes one request and reads one response (Content-Length framed); the status.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, req: &[u8]) -> Option<u16> {
    s.write_all(req).await.ok()?;
    let mut buf = Vec::with_capacity(64 * 1024);
    let mut chunk = [0u8; 16384];
    let head_end = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(status)
}

fn get(path: &str, query: &str, close: bool) -> Vec<u8> {
    let conn = if close { "close" } else { "keep-alive" };
    format!("GET {path}?{query} HTTP/1.1\r\nHost: localhost\r\nConnection: {conn}\r\n\r\n").into_bytes()
}

fn post(path: &str, fields: &[(&str, &str)]) -> Vec<u8> {
    let body = fields
        .iter()
        .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
        .collect::<Vec<_>>()
        .join("&");
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[derive(Clone)]
enum Target {
    Plain(u16),
    Tls(u16, Arc<rustls::ClientConfig>),
}

enum Conn {
    Plain(tokio::net::TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>),
}

impl Target {
    async fn connect(&self) -> Option<Conn> {
        match self {
            Target::Plain(p) => {
                let s = tokio::net::TcpStream::connect(("127.0.0.1", *p)).await.ok()?;
                s.set_nodelay(true).ok()?;
                Some(Conn::Plain(s))
            }
            Target::Tls(p, cfg) => {
                let s = tokio::net::TcpStream::connect(("127.0.0.1", *p)).await.ok()?;
                s.set_nodelay(true).ok()?;
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, s)
                    .await
                    .ok()?;
                Some(Conn::Tls(Box::new(tls)))
            }
        }
    }
}

impl Conn {
    async fn call(&mut self, req: &[u8]) -> Option<u16> {
        match self {
            Conn::Plain(s) => exchange(s, req).await,
            Conn::Tls(s) => exchange(s.as_mut(), req).await,
        }
    }
}

/// Calls per second over `secs` with `clients` concurrent loops.
async fn rate(target: &Target, clients: usize, secs: f64, req: Vec<u8>, keep_alive: bool) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (target, req, count) = (target.clone(), req.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = None;
            while Instant::now() < deadline {
                if conn.is_none() || !keep_alive {
                    conn = target.connect().await;
                }
                let Some(c) = conn.as_mut() else { continue };
                match c.call(&req).await {
                    Some(200) => {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                    other => panic!("unexpected answer {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / secs
}

/// Full TLS handshakes per second (connect, handshake, close).
async fn handshakes(port: u16, cfg: Arc<rustls::ClientConfig>, clients: usize, secs: f64) -> f64 {
    let count = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (cfg, count) = (cfg.clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
                // As every client of ours: without it, the request after the
                // handshake waits for a delayed ACK (40 ms).
                s.set_nodelay(true).unwrap();
                let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
                let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, s)
                    .await
                    .unwrap();
                // TLS 1.3: the server checks the client certificate after the
                // client's Finished; one exchange makes sure it was accepted.
                let status = exchange(&mut tls, &get("/getHateoasUrl", "", true)).await;
                assert_eq!(status, Some(404), "getHateoasUrl answers 404 by design");
                count.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    count.load(Ordering::Relaxed) as f64 / secs
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: f64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(5.0);
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let (mut running, _token) = Running::single_replica_cluster(dir.path(), &addr, &Timing::default())
        .await
        .unwrap();
    // One client identity makes every call here: the per-caller rate limit
    // would measure itself, not TLS.
    running.limit_rate(0, 0);
    assert!(
        running.replica.wait_for_authority(Duration::from_secs(30)).await,
        "no CA was created"
    );
    let (plain, tls) = (free_port(), free_port());
    running.serve_slap(&format!("127.0.0.1:{plain}"), true).await.unwrap();
    running.serve_slap(&format!("127.0.0.1:{tls}"), false).await.unwrap();

    // 100 partitions, 50 busy, set up over plain HTTP.
    let partitions = (0..100)
        .map(|i| {
            Value::str_dict([
                ("reference", Value::str(format!("slappart{i}"))),
                (
                    "address_list",
                    Value::List(vec![Value::str_dict([(
                        "addr",
                        Value::str(format!("10.0.{}.{}", i / 200, i % 200 + 1)),
                    )])]),
                ),
            ])
        })
        .collect();
    let xml = dumps(&Value::str_dict([
        ("reference", Value::str("COMP-1")),
        ("partition_list", Value::List(partitions)),
    ]))
    .unwrap();
    let target = Target::Plain(plain);
    let sr = "https://lab.example.org/sr/software.cfg";
    let mut c = target.connect().await.unwrap();
    assert_eq!(
        c.call(&post("/loadComputerConfigurationFromXML", &[("xml", &xml)]))
            .await,
        Some(200)
    );
    let mut c = target.connect().await.unwrap();
    assert_eq!(
        c.call(&post("/supplySupply", &[("url", sr), ("computer_id", "COMP-1")]))
            .await,
        Some(200)
    );
    for i in 0..50 {
        let title = format!("inst-{i}");
        let mut c = target.connect().await.unwrap();
        let req = post(
            "/requestComputerPartition",
            &[
                ("software_release", sr),
                ("partition_reference", &title),
                ("software_type", "default"),
                (
                    "partition_parameter_xml",
                    "<marshal><dictionary id=\"i2\"><string>k</string><string>v</string></dictionary></marshal>",
                ),
                ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
                ("state", "<marshal><none/></marshal>"),
                ("shared_xml", "<marshal><bool>0</bool></marshal>"),
            ],
        );
        assert_eq!(c.call(&req).await, Some(200));
    }

    // The node's certificate.
    let master_node::certificates::Handover { issued, ca_pem: ca, .. } =
        master_node::certificates::issue(&running.replica, Role::Computer("COMP-1".into()), 30, None)
            .await
            .unwrap();
    let cfg = {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let chain = CertificateDer::pem_slice_iter(issued.certificate.cert_pem.to_text().as_bytes())
            .map(|c| c.unwrap())
            .collect();
        let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(chain, key)
                .unwrap(),
        )
    };
    let secure = Target::Tls(tls, cfg.clone());
    // Warm up (the TLS listener waits for the CA and its server certificate).
    while secure.connect().await.is_none() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    println!("| measure | clients | plain HTTP | HTTPS + client certificate | HTTPS / plain |");
    println!("|---|---:|---:|---:|---:|");
    for clients in [1, 8] {
        let h = handshakes(tls, cfg.clone(), clients, secs).await;
        println!("| full mTLS handshakes (+ one small call) /s | {clients} | | {h:.0} | |");
    }
    for (keep_alive, what) in [(false, "new connection per poll"), (true, "kept-alive connection")] {
        for clients in [1, 8] {
            let req = get("/getFullComputerInformation", "computer_id=COMP-1", !keep_alive);
            let p = rate(&target, clients, secs, req.clone(), keep_alive).await;
            let t = rate(&secure, clients, secs, req, keep_alive).await;
            println!(
                "| poll, 100 partitions / 50 busy, {what} /s | {clients} | {p:.0} | {t:.0} | {:.2}x |",
                t / p
            );
        }
    }
    running.shutdown().await;
}
