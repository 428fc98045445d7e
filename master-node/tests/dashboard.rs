//! The web dashboard: what each role sees, the request form, and every page
//! loaded and the form submitted in a real headless Chromium (through
//! chromedriver's WebDriver protocol), with screenshots kept in
//! `test-artifacts/dashboard/`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use master_node::api::ClientWrite;
use master_node::authz::Caller;
use master_node::raft::Timing;
use master_node::replica::Replica;
use master_node::server::Running;
use master_node::state::{
    Command as MasterCommand, Params, PartitionSpec, RequestOrigin, RequestSpec, Role, SupplyState,
};
use tower::ServiceExt;

const SR: &str = "https://lab.example.org/sr/software.cfg";

async fn master() -> (tempfile::TempDir, Running, String) {
    let dir = tempfile::tempdir().unwrap();
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    };
    let (running, _) = Running::single_replica_cluster(dir.path(), &free(), &Timing::default())
        .await
        .unwrap();
    let slap = free();
    running.serve_slap(&slap, true).await.unwrap();
    (dir, running, slap)
}

async fn write(r: &Replica, command: MasterCommand) {
    r.write(ClientWrite {
        request_id: None,
        command,
    })
    .await
    .unwrap();
}

/// Two computers (X is carol's, on the market), Alice's and Bob's trees,
/// one published connection.
async fn populate(r: &Replica) {
    for c in ["X", "Y"] {
        write(
            r,
            MasterCommand::SetComputer {
                id: c.into(),
                address: String::new(),
                netmask: String::new(),
                capacity: Params::new(),
                categories: [("region".to_string(), format!("eu-{c}"))].into_iter().collect(),
                partitions: (0..2)
                    .map(|i| PartitionSpec {
                        id: format!("slappart{i}"),
                        addresses: vec![],
                        tap: None,
                        user: None,
                        capabilities: vec![],
                    })
                    .collect(),
            },
        )
        .await;
        write(
            r,
            MasterCommand::Supply {
                computer: c.into(),
                url: SR.into(),
                state: SupplyState::Available,
            },
        )
        .await;
    }
    write(
        r,
        MasterCommand::SetComputerOwner {
            computer: "X".into(),
            owner: Some("carol".into()),
        },
    )
    .await;
    write(
        r,
        MasterCommand::SetOffer(Box::new(master_node::state::market::Offer {
            computer: "X".into(),
            hosting: master_node::state::ledger::Price {
                unit_price: 45_000,
                currency: "EUR".into(),
            },
            resources: [("cpu".to_string(), 10)].into_iter().collect(),
            specs: master_node::state::market::Specs {
                cpu_count: 8,
                memory_bytes: 32 << 30,
                region: "eu-west".into(),
                capabilities: vec!["gpu".into()],
                ..Default::default()
            },
            partitions: 2,
        })),
    )
    .await;
    for (user, title, c) in [("alice", "alice-blog <b>", "X"), ("bob", "bob-db", "Y")] {
        write(
            r,
            MasterCommand::Request(RequestSpec {
                requester: RequestOrigin::User(user.into()),
                title: title.into(),
                software_release: SR.into(),
                software_type: "default".into(),
                parameters: Params::new(),
                sla: [("computer_guid".to_string(), c.to_string())].into_iter().collect(),
                shared: false,
                state: None,
            }),
        )
        .await;
    }
    let (c, p) = {
        let s = r.state.read().unwrap();
        s.instances
            .values()
            .find(|i| i.owner == "alice")
            .unwrap()
            .partition
            .clone()
            .unwrap()
    };
    write(
        r,
        MasterCommand::SetConnection {
            computer: c,
            partition: p,
            shared_reference: None,
            connection: [("url".to_string(), "https://alice.example/".to_string())]
                .into_iter()
                .collect(),
        },
    )
    .await;
}

async fn get_as(r: &Arc<Replica>, role: Option<&Role>, path: &str, form: Option<&str>) -> (StatusCode, String) {
    let mut router = master_node::server::http::app(r.clone(), None);
    if let Some(role) = role {
        router = router.layer(axum::Extension(Caller(role.clone())));
    }
    let req = match form {
        None => Request::builder().uri(path).body(Body::empty()).unwrap(),
        Some(f) => Request::builder()
            .method("POST")
            .uri(path)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Body::from(f.to_string()))
            .unwrap(),
    };
    let resp = router.oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_sees_its_own_and_the_form_requests_as_the_caller() {
    let (_dir, running, _) = master().await;
    let r = running.replica.clone();
    populate(&r).await;
    let alice = Role::User("alice".into());
    let x = Role::Computer("X".into());
    let (st, page) = get_as(&r, Some(&alice), "/dashboard/instances", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(page.contains("alice-blog &lt;b&gt;"), "titles are escaped: {page}");
    assert!(!page.contains("alice-blog <b>"));
    assert!(page.contains("https://alice.example/"), "connection parameters shown");
    assert!(!page.contains("bob-db"), "alice sees only her trees");
    let (_, admin_page) = get_as(&r, Some(&Role::Admin), "/dashboard/instances", None).await;
    assert!(admin_page.contains("bob-db") && admin_page.contains("alice-blog"));
    let (_, computers) = get_as(&r, Some(&x), "/dashboard/computers", None).await;
    assert!(
        computers.contains("computer-X") && !computers.contains("computer-Y"),
        "{computers}"
    );
    let (_, none) = get_as(&r, Some(&alice), "/dashboard/computers", None).await;
    assert!(none.contains("No computer to show"));
    // The market: every offer with its provider, price and fill; an
    // instance shows the price it was allocated at.
    let (st, market) = get_as(&r, Some(&alice), "/dashboard/market", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(market.contains("<td>carol</td>"), "{market}");
    assert!(market.contains("0.045000 EUR") && market.contains("eu-west") && market.contains("gpu"));
    assert!(
        market.contains("<td>1/2</td><td>50 %</td>"),
        "alice's blog fills one of two: {market}"
    );
    assert!(
        page.contains("0.045000 EUR"),
        "alice's blog shows its agreed price: {page}"
    );
    let (_, bob_page) = get_as(&r, Some(&Role::User("bob".into())), "/dashboard/instances", None).await;
    assert!(
        bob_page.contains("catalog"),
        "bob's db on Y is at the catalog: {bob_page}"
    );
    let (_, carol_usage) = get_as(
        &r,
        Some(&Role::User("carol".into())),
        "/dashboard/usage?period=2026-11",
        None,
    )
    .await;
    assert!(
        !carol_usage.contains("Statement of operator"),
        "carol sees only her statement"
    );
    let (_, alice_usage) = get_as(&r, Some(&alice), "/dashboard/usage?period=2026-11", None).await;
    assert!(!alice_usage.contains("Statement of"), "alice provides nothing");
    let (st, cluster) = get_as(&r, Some(&alice), "/dashboard", None).await;
    assert_eq!(st, StatusCode::OK);
    assert!(cluster.contains("(leader)"), "{cluster}");

    // The form requests as the caller; bad input is refused and stores nothing.
    let form = format!(
        "title=from-form&software_release={}&software_type=default&parameters=greeting%3Dhi&sla=",
        slap_proto::form::encode(SR)
    );
    let (st, _) = get_as(&r, Some(&alice), "/dashboard/request", Some(&form)).await;
    assert_eq!(st, StatusCode::SEE_OTHER);
    {
        let s = r.state.read().unwrap();
        let i = s.instances.values().find(|i| i.title == "from-form").unwrap();
        assert_eq!(i.owner, "alice");
        assert_eq!(i.parameters["greeting"], "hi");
    }
    let before = r.state.read().unwrap().instances.len();
    let (st, page) = get_as(
        &r,
        Some(&alice),
        "/dashboard/request",
        Some("title=x&software_release=y&parameters=novalue"),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST);
    assert!(page.contains("not key=value"), "{page}");
    let (st, page) = get_as(
        &r,
        Some(&alice),
        "/dashboard/request",
        Some("title=&software_release=y"),
    )
    .await;
    assert_eq!(st, StatusCode::BAD_REQUEST, "{page}");
    let (st, page) = get_as(&r, Some(&x), "/dashboard/request", Some(&form)).await;
    assert!(page.contains("Only users"), "{st} {page}");
    assert_eq!(r.state.read().unwrap().instances.len(), before);
    running.shutdown().await;
}

// ----- a real browser ---------------------------------------------------------

/// One WebDriver call: method, path, JSON body; the JSON answer's `value`.
fn webdriver(port: u16, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
    let text = body.to_string();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )
    .unwrap();
    // chromedriver keeps the connection open: read the head, then exactly
    // Content-Length bytes.
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "chromedriver closed the connection");
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"));
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    let body = String::from_utf8_lossy(&body);
    let raw = head;
    let json: serde_json::Value =
        serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("chromedriver answered {raw:?}: {e}"));
    if let Some(err) = json["value"].get("error") {
        panic!("WebDriver {method} {path}: {err} {}", json["value"]["message"]);
    }
    json["value"].clone()
}

struct Driver {
    child: Child,
    port: u16,
    session: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = std::panic::catch_unwind(|| ());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    fn start(profile: &std::path::Path) -> Driver {
        let chromedriver = std::path::Path::new("/usr/bin/chromedriver");
        assert!(
            chromedriver.exists(),
            "chromedriver is missing: install Debian's chromium and chromium-driver (scripts/setup.sh does)"
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        // The flags that keep Chromium off this machine's closed network.
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-quic", "--no-first-run", "--disable-background-networking",
                         "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                         format!("--user-data-dir={}", profile.display())]
            }
        }}});
        let session = webdriver(port, "POST", "/session", &caps)["sessionId"]
            .as_str()
            .unwrap()
            .to_string();
        Driver { child, port, session }
    }

    fn call(&self, method: &str, path: &str, body: serde_json::Value) -> serde_json::Value {
        webdriver(self.port, method, &format!("/session/{}{path}", self.session), &body)
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", serde_json::json!({ "url": url }));
    }

    fn source(&self) -> String {
        self.call("GET", "/source", serde_json::json!({}))
            .as_str()
            .unwrap()
            .to_string()
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            serde_json::json!({"using": "css selector", "value": css}),
        );
        v.as_object()
            .unwrap()
            .values()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string()
    }

    fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine;
        let png = self.call("GET", "/screenshot", serde_json::json!({}));
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::write(path, bytes).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_every_page_and_submits_the_form() {
    let (dir, running, slap) = master().await;
    populate(&running.replica).await;
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../test-artifacts/dashboard");
    std::fs::create_dir_all(&shots).unwrap();
    let profile = dir.path().join("chromium-profile");
    let base = format!("http://{slap}");
    let state = running.replica.state.clone();
    tokio::task::spawn_blocking(move || {
        let d = Driver::start(&profile);
        for (name, path, expect) in [
            ("cluster", "/dashboard", "(leader)"),
            ("computers", "/dashboard/computers", "slappart1"),
            ("instances", "/dashboard/instances", "https://alice.example/"),
            ("usage", "/dashboard/usage?period=2026-11", "Usage"),
            ("market", "/dashboard/market", "carol"),
            ("request", "/dashboard/request", "Request an instance"),
        ] {
            d.open(&format!("{base}{path}"));
            let html = d.source();
            assert!(html.contains(expect), "{name}: {expect:?} not in {html}");
            d.screenshot(&shots.join(format!("{name}.png")));
        }
        // Fill the form in and submit it, as a person would.
        d.open(&format!("{base}/dashboard/request"));
        for (css, text) in [
            ("input[name=title]", "from-chromium"),
            ("input[name=software_release]", SR),
            ("textarea[name=parameters]", "greeting=hello from a browser"),
        ] {
            let e = d.element(css);
            d.call(
                "POST",
                &format!("/element/{e}/value"),
                serde_json::json!({ "text": text }),
            );
        }
        let button = d.element("button[type=submit]");
        d.call("POST", &format!("/element/{button}/click"), serde_json::json!({}));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let html = d.source();
            if html.contains("from-chromium") {
                break;
            }
            assert!(Instant::now() < deadline, "the submitted instance never showed: {html}");
            std::thread::sleep(Duration::from_millis(200));
        }
        d.screenshot(&shots.join("after-request.png"));
        d.call("DELETE", "", serde_json::json!({}));
    })
    .await
    .unwrap();
    let greeting = {
        let s = state.read().unwrap();
        s.instances
            .values()
            .find(|i| i.title == "from-chromium")
            .expect("the form's request")
            .parameters["greeting"]
            .clone()
    };
    assert_eq!(greeting, "hello from a browser");
    running.shutdown().await;
}
