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
