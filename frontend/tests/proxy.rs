//! The real `slapos-frontend` binary between `curl` (or raw sockets) and a
//! backend on IPv6 loopback: routes appear and go as the route files do,
//! HTTPS picks the certificate by SNI, headers are forwarded as a proxy
//! must, WebSockets and large bodies pass, and a reload under load fails
//! no request.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A backend on `[::1]`: `/headers` echoes the request's headers, `/big`
/// answers 1 MiB, a POST answers the length of its body, an upgrade
/// request is accepted and echoes bytes, anything else names the backend.
async fn backend(name: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("[::1]:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, std::convert::Infallible>(answer(name, req).await)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

async fn answer(name: &str, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.headers().contains_key(hyper::header::UPGRADE) {
        let upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let mut io = TokioIo::new(upgrade.await.unwrap());
            let mut buf = [0u8; 1024];
            while let Ok(n) = io.read(&mut buf).await {
                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "echo")
            .body(Full::new(Bytes::new()))
            .unwrap();
    }
    let path = req.uri().path().to_string();
    if req.method() == hyper::Method::POST {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        return Response::new(Full::new(Bytes::from(format!("{name} got {} bytes", body.len()))));
    }
    let body = match path.as_str() {
        "/headers" | "/app/headers" => {
            let mut lines: Vec<String> = req
                .headers()
                .iter()
                .map(|(k, v)| format!("{k}: {}", v.to_str().unwrap_or("?")))
                .collect();
            lines.sort();
            lines.join("\n")
        }
        p if p.ends_with("/big") => "x".repeat(1 << 20),
        _ => format!("{name} {path}"),
    };
    Response::builder()
        .header("keep-alive", "timeout=5")
        .header("x-backend", name)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

struct Frontend {
    child: Child,
    dir: PathBuf,
    http: u16,
    https: u16,
    admin: u16,
}

impl Drop for Frontend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Frontend {
    fn start(dir: &Path) -> Frontend {
        let (http, https, admin) = (free_port(), free_port(), free_port());
        let log = std::fs::File::create(dir.join("frontend.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_slapos-frontend"))
            .args(["serve", "--host", "127.0.0.1", "--host", ""])
            .args(["--http-port", &http.to_string(), "--https-port", &https.to_string()])
            .args(["--admin", &format!("127.0.0.1:{admin}")])
            .arg("--routes")
            .arg(dir.join("routes"))
            .arg("--published")
            .arg(dir.join("published"))
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--access-log")
            .arg(dir.join("access.log"))
            .args(["--scan-interval-ms", "100"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let f = Frontend {
            child,
            dir: dir.to_path_buf(),
            http,
            https,
            admin,
        };
        wait("the frontend's admin port", || {
            std::net::TcpStream::connect(("127.0.0.1", admin)).is_ok()
        });
        f
    }

    /// Writes a route file as the node agent does.
    fn route(&self, reference: &str, owner: &str, params: &[(&str, &str)]) {
        let params: BTreeMap<&str, &str> = params.iter().cloned().collect();
        let serial = {
            use sha2::Digest;
            hex::encode(&sha2::Sha256::digest(serde_json::to_string(&params).unwrap())[..8])
        };
        let spec = serde_json::json!({
            "reference": reference, "title": reference, "owner": owner, "serial": serial, "parameters": params,
        });
        let routes = self.dir.join("routes");
        std::fs::create_dir_all(&routes).unwrap();
        let tmp = routes.join(format!("{reference}.tmp"));
        std::fs::write(&tmp, spec.to_string()).unwrap();
        std::fs::rename(tmp, routes.join(format!("{reference}.json"))).unwrap();
    }

    fn remove(&self, reference: &str) {
        std::fs::remove_file(self.dir.join("routes").join(format!("{reference}.json"))).unwrap();
    }

    /// The result published for a shared instance, once written for its
    /// current route file.
    fn result(&self, reference: &str) -> serde_json::Value {
        let route: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.join("routes").join(format!("{reference}.json"))).unwrap(),
        )
        .unwrap();
        let path = self.dir.join("published").join(format!("{reference}.json"));
        let mut found = serde_json::Value::Null;
        wait(&format!("the result of {reference}"), || {
            found = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .unwrap_or_default();
            found["serial"] == route["serial"]
        });
        found
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("frontend.log")).unwrap_or_default()
    }
}

fn wait(what: &str, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `curl` with `args`: the exit status, then stdout.
fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_reach_ipv6_backends_over_http_and_https_with_the_headers_a_proxy_sets() {
    let tmp = tempfile::tempdir().unwrap();
    let one = backend("one").await;
    let two = backend("two").await;
    let f = Frontend::start(tmp.path());
    f.route("plain", "alice", &[("backend-url", &format!("http://{one}/app/"))]);
    f.route(
        "site",
        "alice",
        &[("backend-url", &format!("http://{two}")), ("domain", "shop.example")],
    );
    f.route(
        "secure",
        "alice",
        &[
            ("backend-url", &format!("http://{two}")),
            ("domain", "secure.example"),
            ("https-only", "true"),
        ],
    );
    f.route(
        "ws",
        "bob",
        &[
            ("backend-url", &format!("http://{one}")),
            ("path-prefix", "/live"),
            ("websocket", "true"),
        ],
    );

    // The published site-url works, and the path goes under the backend's.
    let plain = f.result("plain");
    let site_url = plain["connection"]["site-url"].as_str().unwrap().to_string();
    assert_eq!(site_url, format!("http://127.0.0.1:{}/plain/", f.http));
    let (ok, body) = curl(&[&format!("{site_url}page")]);
    assert!(ok && body == "one /app/page", "{body}");

    // Forwarding headers set, hop-by-hop ones dropped both ways.
    let (ok, headers) = curl(&[
        "-H",
        "Connection: keep-alive, x-secret",
        "-H",
        "x-secret: 1",
        "-H",
        "X-Forwarded-For: 203.0.113.9",
        &format!("{site_url}headers"),
    ]);
    assert!(ok, "{headers}");
    assert!(headers.contains("x-forwarded-for: 203.0.113.9, 127.0.0.1"), "{headers}");
    assert!(headers.contains("x-forwarded-proto: http"), "{headers}");
    assert!(
        headers.contains(&format!("x-forwarded-host: 127.0.0.1:{}", f.http)),
        "{headers}"
    );
    assert!(
        !headers.contains("x-secret"),
        "a header Connection names was forwarded: {headers}"
    );
    let (_, response_headers) = curl(&["-D", "-", "-o", "/dev/null", &format!("{site_url}x")]);
    assert!(response_headers.contains("x-backend: one"), "{response_headers}");
    assert!(
        !response_headers.to_ascii_lowercase().contains("keep-alive: timeout"),
        "{response_headers}"
    );

    // HTTPS: the domain's certificate by SNI, from the frontend's CA, over
    // HTTP/2; the certificate is checked by curl against that CA.
    let site = f.result("site");
    assert_eq!(site["connection"]["domain"], "shop.example");
    assert_eq!(site["connection"]["domain-verification"].as_str().unwrap().len(), 32);
    let ca = tmp.path().join("state/ca.crt");
    let resolve = format!("shop.example:{}:127.0.0.1", f.https);
    let (ok, out) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        "-w",
        " http/%{http_version}",
        &format!("https://shop.example:{}/x", f.https),
    ]);
    assert!(ok && out == "two /x http/2", "{out}");
    let (_, headers) = curl(&[
        "--cacert",
        ca.to_str().unwrap(),
        "--resolve",
        &resolve,
        &format!("https://shop.example:{}/headers", f.https),
    ]);
    assert!(headers.contains("x-forwarded-proto: https"), "{headers}");
    // Plain HTTP to the domain by its Host header.
    let (ok, out) = curl(&["-H", "Host: shop.example", &format!("http://127.0.0.1:{}/y", f.http)]);
    assert!(ok && out == "two /y", "{out}");

    // https-only: plain HTTP is redirected to the HTTPS port.
    f.result("secure");
    let (_, out) = curl(&[
        "-D",
        "-",
        "-H",
        "Host: secure.example",
        &format!("http://127.0.0.1:{}/a?b=1", f.http),
    ]);
    assert!(out.starts_with("HTTP/1.1 301"), "{out}");
    assert!(
        out.contains(&format!("location: https://secure.example:{}/a?b=1", f.https)),
        "{out}"
    );

    // 1 MiB both ways, streamed.
    let big = tmp.path().join("big.bin");
    std::fs::write(&big, vec![7u8; 1 << 20]).unwrap();
    let (ok, out) = curl(&[
        "--data-binary",
        &format!("@{}", big.display()),
        &format!("{site_url}upload"),
    ]);
    assert!(ok && out == "one got 1048576 bytes", "{out}");
    let (ok, out) = curl(&["-o", "/dev/null", "-w", "%{size_download}", &format!("{site_url}big")]);
    assert!(ok && out == "1048576", "{out}");

    // WebSocket-style upgrade: 101, then bytes both ways.
    f.result("ws");
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", f.http)).await.unwrap();
    s.write_all(b"GET /live/socket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let mut head = vec![0u8; 4096];
    let n = s.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s.write_all(b"ping through the frontend").await.unwrap();
    let mut echo = vec![0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut echo))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echo, b"ping through the frontend");
    // A route without websocket refuses an upgrade with a reason.
    let (_, out) = curl(&[
        "-H",
        "Connection: Upgrade",
        "-H",
        "Upgrade: echo",
        &format!("{site_url}socket"),
    ]);
    assert!(out.contains("does not pass upgrades"), "{out}");

    // No route: a 404 that says so. A backend down: 502 naming the route.
    let (_, out) = curl(&["-w", " %{http_code}", &format!("http://127.0.0.1:{}/nothing", f.http)]);
    assert!(out.ends_with(" 404") && out.contains("no route"), "{out}");
    f.route("down", "alice", &[("backend-url", "http://[::1]:9/"), ("timeout", "2")]);
    f.result("down");
    let (_, out) = curl(&["-w", " %{http_code}", &format!("http://127.0.0.1:{}/down/", f.http)]);
    assert!(out.ends_with(" 502") && out.contains("down"), "{out}");

    // The access log (flushed every second) and the metrics.
    wait("access log lines", || {
        std::fs::read_to_string(tmp.path().join("access.log"))
            .is_ok_and(|l| l.contains("\"GET /plain/page HTTP/1.1\" 200 13"))
    });
    let (_, metrics) = curl(&[&format!("http://127.0.0.1:{}/metrics", f.admin)]);
    assert!(metrics.contains("frontend_routes 5"), "{metrics}");
    assert!(metrics.contains("frontend_upgrades_total 1"), "{metrics}");
    assert!(
        metrics.contains("frontend_route_requests_total{route=\"plain\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("frontend_responses_total{class=\"5xx\"} 1"),
        "{metrics}"
    );

    // Removing a route file removes the route and its result.
    f.remove("plain");
    wait("the route to go", || {
        curl(&["-o", "/dev/null", "-w", "%{http_code}", &site_url]).1 == "404"
    });
    assert!(!tmp.path().join("published/plain.json").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_shared_instance_or_another_users_domain_fails_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let one = backend("one").await;
    let f = Frontend::start(tmp.path());
    f.route(
        "alice-shop",
        "alice",
        &[("backend-url", &format!("http://{one}")), ("domain", "shop.example")],
    );
    assert!(f.result("alice-shop")["connection"]["site-url"].is_string());

    // Another user's shared instance cannot take the domain, even one whose
    // reference sorts first; the owner's route keeps the traffic.
    let evil = backend("evil").await;
    f.route(
        "0-mallory",
        "mallory",
        &[("backend-url", &format!("http://{evil}")), ("domain", "SHOP.example")],
    );
    let refused = f.result("0-mallory");
    assert!(
        refused["error"].as_str().unwrap().contains("belongs to another user"),
        "{refused}"
    );
    let (_, out) = curl(&["-H", "Host: shop.example", &format!("http://127.0.0.1:{}/", f.http)]);
    assert_eq!(out, "one /");

    // A restart keeps the claim.
    drop(f);
    let f = Frontend::start(tmp.path());
    let refused = f.result("0-mallory");
    assert!(refused["error"].is_string(), "{refused}");

    // A user certificate whose key is not its own: an error for that
    // shared instance; the others keep being served.
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::default();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "a user's own CA");
    let user_ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let user_ca = rcgen::Issuer::new(ca_params, ca_key);
    let site_key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["own.example".to_string()])
        .unwrap()
        .signed_by(&site_key, &user_ca)
        .unwrap();
    let other_key = rcgen::KeyPair::generate().unwrap();
    f.route(
        "mismatch",
        "alice",
        &[
            ("backend-url", &format!("http://{one}")),
            ("domain", "own.example"),
            ("ssl-crt", &cert.pem()),
            ("ssl-key", &other_key.serialize_pem()),
        ],
    );
    let r = f.result("mismatch");
    assert!(r["error"].as_str().unwrap().contains("does not match"), "{r}");
    f.route("broken", "alice", &[("backend-url", "::")]);
    assert!(f.result("broken")["error"].as_str().unwrap().contains("not a URL"));
    let (_, out) = curl(&["-H", "Host: shop.example", &format!("http://127.0.0.1:{}/", f.http)]);
    assert_eq!(out, "one /");

    // With its own key, the user's certificate is the one served.
    f.route(
        "mismatch",
        "alice",
        &[
            ("backend-url", &format!("http://{one}")),
            ("domain", "own.example"),
            ("ssl-crt", &cert.pem()),
            ("ssl-key", &site_key.serialize_pem()),
        ],
    );
    let r = f.result("mismatch");
    assert!(r["connection"].is_object(), "{r}");
    let user_ca_file = tmp.path().join("user-ca.crt");
    std::fs::write(&user_ca_file, user_ca_cert.pem()).unwrap();
    let (ok, out) = curl(&[
        "--cacert",
        user_ca_file.to_str().unwrap(),
        "--resolve",
        &format!("own.example:{}:127.0.0.1", f.https),
        &format!("https://own.example:{}/mine", f.https),
    ]);
    assert!(ok && out == "one /mine", "{out}\n{}", f.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_twenty_routes_and_removing_ten_under_load_fails_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let one = backend("one").await;
    let f = Frontend::start(tmp.path());
    // Ten routes that will go, eight the load uses, and one more.
    for i in 0..10 {
        f.route(
            &format!("old{i}"),
            "alice",
            &[("backend-url", &format!("http://{one}"))],
        );
    }
    for w in 0..8 {
        f.route(
            &format!("keep{w}"),
            "alice",
            &[("backend-url", &format!("http://{one}"))],
        );
    }
    f.route("steady", "alice", &[("backend-url", &format!("http://{one}"))]);
    f.result("steady");

    // Load: 8 clients with keep-alive connections (hyper's pool), each
    // request checked, for as long as the changes take.
    let client: hyper_util::client::legacy::Client<_, Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for w in 0..8 {
        let (client, stop, done, failed) = (client.clone(), stop.clone(), done.clone(), failed.clone());
        let port = f.http;
        workers.push(tokio::spawn(async move {
            let mut first_error = None;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let path = if n.is_multiple_of(2) {
                    "steady/x".to_string()
                } else {
                    format!("keep{w}/x")
                };
                let uri: hyper::Uri = format!("http://127.0.0.1:{port}/{path}").parse().unwrap();
                let outcome = match client.get(uri).await {
                    Ok(r) if r.status() == 200 => r.into_body().collect().await.map(|_| ()).map_err(|e| e.to_string()),
                    Ok(r) => Err(format!("status {}", r.status())),
                    Err(e) => Err(e.to_string()),
                };
                match outcome {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        first_error.get_or_insert(format!("{path}: {e}"));
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            first_error
        }));
    }
    let started = Instant::now();
    // 20 routes added (each checked reachable at once) and the 10 old ones
    // removed, one change every 100 ms or so.
    for i in 0..20 {
        let name = format!("new{i}");
        f.route(&name, "alice", &[("backend-url", &format!("http://{one}"))]);
        f.result(&name);
        let (ok, body) = curl(&[&format!("http://127.0.0.1:{}/{name}/hi", f.http)]);
        assert!(ok && body == "one /hi", "{name}: {body}");
        if i % 2 == 1 {
            f.remove(&format!("old{}", i / 2));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for w in workers {
        if let Some(e) = w.await.unwrap() {
            errors.push(e);
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let rate = done as f64 / elapsed;
    eprintln!("{done} requests in {elapsed:.1} s ({rate:.0}/s), {failed} failed");
    assert_eq!(failed, 0, "requests failed during the reloads: {errors:?}");
    assert!(
        rate >= 200.0,
        "the load was {rate:.0} req/s, under the 200 req/s the check needs"
    );
    for i in 0..10 {
        let (_, code) = curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{}/old{i}/", f.http),
        ]);
        assert_eq!(code, "404", "old{i} is still served");
    }
    let (_, m) = curl(&[&format!("http://127.0.0.1:{}/metrics", f.admin)]);
    assert!(m.contains("frontend_routes 29"), "{m}");
}
