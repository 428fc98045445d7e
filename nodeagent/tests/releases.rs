//! The example releases, end to end through a real master-node, with the
//! agent in unprivileged mode: a key-value service whose instance requests a
//! client child, and the frontend (the real `slapos-frontend`) serving it
//! through a shared instance.

mod common;

use std::time::Duration;

use common::*;
use nodeagent::master::MasterClient;
use sha2::Digest;

#[test]
fn example_manifests_match_their_files() {
    // A stale digest would make every install fail: catch it here.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("software");
    // (The frontend's manifest is made with its binary's digest by
    // software/frontend/make-release.)
    for name in ["hello-http", "kvstore"] {
        let url = format!("file://{}/{name}/software.toml", root.display());
        let text = std::fs::read_to_string(root.join(name).join("software.toml")).unwrap();
        let release = nodeagent::release::Release::parse(&url, &text).unwrap();
        for f in &release.fetch {
            let path = nodeagent::release::local_path(&nodeagent::release::resolve(&url, &f.url)).unwrap();
            let digest = hex::encode(sha2::Sha256::digest(std::fs::read(&path).unwrap()));
            assert_eq!(digest, f.sha256, "{name}: {} changed; update its sha256", f.url);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstore_child_and_frontend_shared_instances() {
    let tmp = tempfile::tempdir().unwrap();
    let master = Master::init(tmp.path());
    let slap = MasterClient::new(&[master.url()]);
    let computer = "COMP-UNPRIV";
    let port_base = common::free_port_base(4);
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let args = [
        "run",
        "--master",
        &master.url(),
        "--computer-id",
        computer,
        "--mode",
        "unprivileged",
        "--instance-root",
        tmp.path().join("srv").to_str().unwrap(),
        "--software-root",
        tmp.path().join("opt").to_str().unwrap(),
        "--partitions",
        "4",
        "--port-base",
        &port_base.to_string(),
        "--stop-on-exit",
        "--metrics-listen",
        &format!("127.0.0.1:{metrics_port}"),
    ]
    .map(String::from);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = tmp.path().join("agent.log");
    let mut agent = Proc::spawn(&workspace_bin("nodeagent"), &refs, &log);

    let start = std::time::Instant::now();
    while slap.computer_plan(computer, None, None).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent never reported capacity"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kv = example_release("kvstore");
    let fe = make_frontend_release(&tmp.path().join("frontend-release"));
    supply(&slap, computer, &kv).await;
    supply(&slap, computer, &fe).await;

    // The kv server requests its client; the client writes and reads back.
    request(&slap, &kv, "store", "default", &[], "started", false).await;
    let url = wait_connection(&slap, &kv, "store", "default", &[], false, "url").await;
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");
    let start = std::time::Instant::now();
    loop {
        if let Some((200, body)) = http_get(&format!("{url}kv/store")).await {
            assert!(
                body.trim().parse::<u64>().is_ok(),
                "the client writes counters: {body:?}"
            );
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the child client never wrote to the server; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The frontend serves the store through a shared instance: the route
    // file appears, the frontend judges it, the agent publishes its result.
    request(&slap, &fe, "front", "default", &[], "started", false).await;
    let front = wait_connection(&slap, &fe, "front", "default", &[], false, "url").await;
    let params = [("backend-url", url.as_str())];
    request(&slap, &fe, "site", "default", &params, "started", true).await;
    let site = wait_connection(&slap, &fe, "site", "default", &params, true, "site-url").await;
    assert!(site.starts_with(&front), "{site} is not under the frontend's {front}");
    let (status, body) = wait_http(&format!("{site}kv/store")).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.trim().parse::<u64>().is_ok(),
        "the store's value through the frontend: {body:?}"
    );
    let ca = wait_connection(&slap, &fe, "site", "default", &params, true, "ca-certificate").await;
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");

    // A domain without the user's own certificate is served over HTTPS
    // with a certificate from the cluster's CA, which the frontend asks the
    // Master for as its partition: a client that trusts only the cluster's
    // CA reaches the store by the domain's name (SNI).
    let named = [("backend-url", url.as_str()), ("domain", "kv.example.test")];
    request(&slap, &fe, "named", "default", &named, "started", true).await;
    let secure = wait_connection(&slap, &fe, "named", "default", &named, true, "secure-access").await;
    assert!(secure.starts_with("https://kv.example.test:"), "{secure}");
    let published_ca = wait_connection(&slap, &fe, "named", "default", &named, true, "ca-certificate").await;
    let cluster_ca = std::fs::read_to_string(master.data_dir.join("admin/ca.crt")).unwrap();
    assert_eq!(
        published_ca.trim(),
        cluster_ca.trim(),
        "the published CA is the cluster's"
    );
    let ca_file = tmp.path().join("cluster-ca.crt");
    std::fs::write(&ca_file, &published_ca).unwrap();
    let https_port = secure.trim_end_matches('/').rsplit(':').next().unwrap().to_string();
    let curl = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(&ca_file)
        .arg("--resolve")
        .arg(format!("kv.example.test:{https_port}:127.0.0.1"))
        .arg(format!("{secure}kv/store"))
        .output()
        .unwrap();
    assert!(
        curl.status.success() && String::from_utf8_lossy(&curl.stdout).trim().parse::<u64>().is_ok(),
        "HTTPS through the cluster's CA: {}{}",
        String::from_utf8_lossy(&curl.stdout),
        String::from_utf8_lossy(&curl.stderr)
    );
    assert!(
        std::fs::read_to_string(&master.log)
            .unwrap_or_default()
            .contains("site certificate issued"),
        "the Master logs what its CA signed"
    );

    // A shared instance the frontend refuses fails alone: the agent
    // reports its error, the other route keeps working.
    let bad = [("backend-url", "ftp://files.example/")];
    request(&slap, &fe, "broken", "default", &bad, "started", true).await;
    wait_for(
        "the refusal of the broken shared instance",
        Duration::from_secs(60),
        || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("only http and https are proxied")
        },
    );
    assert_eq!(http_get(&format!("{site}kv/store")).await.map(|r| r.0), Some(200));

    // Destroying the shared instance removes its route.
    request(&slap, &fe, "site", "default", &params, "destroyed", true).await;
    let start = std::time::Instant::now();
    while http_get(&format!("{site}kv/store")).await.map(|r| r.0) != Some(404) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the destroyed shared instance's route stayed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The agent's own metrics: three started instances (store, its client,
    // the frontend), their processes running, the Master reachable.
    let (status, metrics) = http_get(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.contains("nodeagent_partitions{requested=\"started\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("nodeagent_master_reachable 1"), "{metrics}");
    let ready = http_get(&format!("http://127.0.0.1:{metrics_port}/readyz")).await;
    assert_eq!(ready.map(|r| r.0), Some(200), "reachable Master, not ready");
    assert!(
        metrics.contains("nodeagent_processes{state=\"running\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE nodeagent_instance_runs_total counter"),
        "{metrics}"
    );

    agent.terminate();
    // --stop-on-exit: nothing of the partitions is left listening.
    assert!(http_get(&url).await.is_none(), "the kv server outlived --stop-on-exit");
}

/// The frontend release, made from the workspace's slapos-frontend.
fn make_frontend_release(dir: &std::path::Path) -> String {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../software/frontend/make-release");
    let out = std::process::Command::new("bash")
        .arg(&script)
        .arg(dir)
        .arg(workspace_bin("slapos-frontend"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-release: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A release with a service behind a tunnel's server end, and a client
/// type whose tunnel client end reaches it.
fn tunnel_release(dir: &std::path::Path) -> String {
    let server_py = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../software/common/server.py");
    let manifest = format!(
        r#"
name = "tunnel-test"

[instance.default]
parameters = {{ allow = "" }}

[[instance.default.file]]
path = "www/index.html"
content = "served through the tunnel by {{{{partition.id}}}}"

[[instance.default.process]]
name = "web"
command = ["/usr/bin/python3", "{server}", "--bind", "{{{{partition.ipv4}}}}", "--port", "{{{{partition.port}}}}", "--root", "{{{{partition.dir}}}}/www"]

[[instance.default.tunnel]]
name = "web"
listen = "{{{{partition.ipv4}}}}:{{{{partition.port.1}}}}"
forward = "{{{{partition.ipv4}}}}:{{{{partition.port}}}}"
allow = ["{{{{param.allow}}}}"]

[instance.default.connection]
tunnel = "{{{{partition.ipv4}}}}:{{{{partition.port.1}}}}"
partition = "{{{{computer.id}}}}/{{{{partition.id}}}}"

[instance.client]

[[instance.client.tunnel]]
name = "web"
listen = "{{{{partition.ipv4}}}}:{{{{partition.port.1}}}}"
connect = "{{{{param.server}}}}"
peer = "{{{{param.server-partition}}}}"

[instance.client.connection]
local = "http://{{{{partition.ipv4}}}}:{{{{partition.port.1}}}}/"
partition = "{{{{computer.id}}}}/{{{{partition.id}}}}"
"#,
        server = server_py.display()
    );
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("software.toml"), manifest).unwrap();
    format!("file://{}/software.toml", dir.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_lets_in_only_the_partitions_it_allows_and_outlives_a_server_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let master = Master::init(tmp.path());
    let slap = MasterClient::new(&[master.url()]);
    let computer = "COMP-TUNNEL";
    let port_base = common::free_port_base(4);
    let args = [
        "run",
        "--master",
        &master.url(),
        "--computer-id",
        computer,
        "--mode",
        "unprivileged",
        "--instance-root",
        tmp.path().join("srv").to_str().unwrap(),
        "--software-root",
        tmp.path().join("opt").to_str().unwrap(),
        "--partitions",
        "4",
        "--port-base",
        &port_base.to_string(),
        "--stop-on-exit",
    ]
    .map(String::from);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = tmp.path().join("agent.log");
    let _agent = Proc::spawn(&workspace_bin("nodeagent"), &refs, &log);
    let start = std::time::Instant::now();
    while slap.computer_plan(computer, None, None).await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent never reported capacity"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sr = tunnel_release(&tmp.path().join("release"));
    supply(&slap, computer, &sr).await;

    request(&slap, &sr, "server", "default", &[], "started", false).await;
    let tunnel = wait_connection(&slap, &sr, "server", "default", &[], false, "tunnel").await;
    let server_partition = wait_connection(&slap, &sr, "server", "default", &[], false, "partition").await;
    let client_params = [
        ("server", tunnel.as_str()),
        ("server-partition", server_partition.as_str()),
    ];
    request(&slap, &sr, "allowed", "client", &client_params, "started", false).await;
    request(&slap, &sr, "stranger", "client", &client_params, "started", false).await;
    let allowed_url = wait_connection(&slap, &sr, "allowed", "client", &client_params, false, "local").await;
    let allowed = wait_connection(&slap, &sr, "allowed", "client", &client_params, false, "partition").await;
    let stranger_url = wait_connection(&slap, &sr, "stranger", "client", &client_params, false, "local").await;

    // The server end lets in the partition it is told to.
    let allow = [("allow", allowed.as_str())];
    request(&slap, &sr, "server", "default", &allow, "started", false).await;
    let served = format!(
        "served through the tunnel by {}",
        server_partition.split('/').nth(1).unwrap()
    );
    let start = std::time::Instant::now();
    loop {
        if let Some((200, body)) = http_get(&format!("{allowed_url}index.html")).await {
            assert_eq!(body, served);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the allowed partition never got through; agent log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // Another partition of the cluster is refused at the handshake: no
    // answer, and the server end logs and counts the refusal.
    assert_eq!(http_get(&format!("{stranger_url}index.html")).await, None);
    let stranger = wait_connection(&slap, &sr, "stranger", "client", &client_params, false, "partition").await;
    let server_log = tmp
        .path()
        .join("srv")
        .join(server_partition.split('/').nth(1).unwrap())
        .join("var/log/tunnel-web.log");
    wait_for("the refusal in the server end's log", Duration::from_secs(10), || {
        std::fs::read_to_string(&server_log)
            .unwrap_or_default()
            .contains(&format!("partition {stranger} is not allowed through this tunnel"))
    });
    let logged = std::fs::read_to_string(&server_log).unwrap_or_default();
    assert!(logged.contains("refused=1"), "{logged}");

    // The server end restarts (killed; the supervisor starts it again):
    // the client end carries on with the next connection.
    let srv = tmp.path().join("srv/.nodeagent/run");
    let record = std::fs::read_dir(&srv)
        .unwrap()
        .flatten()
        .map(|d| d.path().join("tunnel-web.json"))
        .find(|p| std::fs::read_to_string(p).is_ok_and(|t| t.contains("--forward")))
        .expect("the server end's process record");
    let pid = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&record).unwrap()).unwrap()["pid"]
        .as_i64()
        .unwrap() as i32;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL).unwrap();
    let start = std::time::Instant::now();
    loop {
        if let Some((200, body)) = http_get(&format!("{allowed_url}index.html")).await {
            assert_eq!(body, served);
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the tunnel did not come back after its server end restarted"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
