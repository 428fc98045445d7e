//! The node agent as root, on this machine, for real: Unix users, taps,
//! addresses, a real master-node process and real services.
//!
//! Each test uses its own user and tap prefixes and address ranges, and
//! removes what it made (even when it fails), so tests can run side by side.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use common::*;
use nodeagent::config::{NodeConfig, PartitionResource};
use nodeagent::format;
use nodeagent::master::MasterClient;
use nodeagent::supervisor::pids_of_uid;

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    node: NodeConfig,
}

fn config(root: &Path, tag: &str, partitions: u32, v4: &str, v6: &str) -> NodeConfig {
    Wrapper::parse_from([
        "test",
        "--instance-root",
        root.join("srv").to_str().unwrap(),
        "--software-root",
        root.join("opt").to_str().unwrap(),
        "--partitions",
        &partitions.to_string(),
        "--user-prefix",
        &format!("{tag}u"),
        "--tap-prefix",
        &format!("{tag}t"),
        "--software-user",
        &format!("{tag}soft"),
        "--ipv4-range",
        v4,
        "--ipv6-range",
        v6,
        "--mode",
        "privileged",
        "--computer-id",
        &format!("COMP-{tag}"),
    ])
    .node
}

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the node tests make Unix users and tap devices: run them as root (CI does)"
    );
}

/// Removes the users, taps, addresses and directories of `cfg` on drop.
struct Cleanup(NodeConfig);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for r in format::load_resources(&self.0).unwrap_or_default() {
            for pid in pids_of_uid(r.uid) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
        let cgroups = nodeagent::agent::cgroups_for(&self.0);
        cgroups.remove_all((0..self.0.partitions).map(nodeagent::config::partition_id));
        if let Err(e) = format::unformat(&self.0) {
            eprintln!("cleanup: {e}");
        }
        // Two guards may share the software user: remove it once.
        if nix::unistd::User::from_name(&self.0.software_user)
            .ok()
            .flatten()
            .is_some()
        {
            let _ = std::process::Command::new("userdel")
                .arg(&self.0.software_user)
                .status();
        }
    }
}

fn addresses_on_lo() -> String {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "dev", "lo"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn format_twenty_partitions_then_nothing_changes() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "nfa", 20, "10.213.0.0/24", "fd5a:9213::/64");
    let _cleanup = Cleanup(cfg.clone());

    let (first, resources) = format::format(&cfg).unwrap();
    assert_eq!(first.users_created, 21, "twenty partition users and the software user");
    assert_eq!(first.taps_created, 20);
    assert_eq!(first.addresses_added, 40);
    assert_eq!(resources.len(), 20);

    let lo = addresses_on_lo();
    for r in &resources {
        let user = nix::unistd::User::from_name(r.user.as_deref().unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(user.uid.as_raw(), r.uid);
        let meta = std::fs::metadata(&r.dir).unwrap();
        assert_eq!(meta.uid(), r.uid, "{} owner", r.id);
        assert_eq!(meta.gid(), r.gid, "{} group", r.id);
        assert_eq!(meta.permissions().mode() & 0o7777, 0o750, "{} mode", r.id);
        let tap = r.tap.as_deref().unwrap();
        let owner = std::fs::read_to_string(format!("/sys/class/net/{tap}/owner")).unwrap();
        assert_eq!(owner.trim(), r.uid.to_string(), "{tap} owner");
        assert!(lo.contains(&format!("{}/32", r.ipv4)), "{} missing on lo", r.ipv4);
        assert!(lo.contains(&format!("{}/128", r.ipv6.as_deref().unwrap())));
        assert_eq!(PartitionResource::load(&r.dir).unwrap(), *r);
    }
    // Distinct addresses and ports.
    let mut v4: Vec<_> = resources.iter().map(|r| r.ipv4.clone()).collect();
    v4.dedup();
    assert_eq!(v4.len(), 20);

    let mtimes: Vec<_> = resources
        .iter()
        .map(|r| {
            std::fs::metadata(r.dir.join(".slapos-resource"))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    let (second, again) = format::format(&cfg).unwrap();
    assert!(!second.changed(), "a second format changed {second:?}");
    assert_eq!(again, resources);
    for (r, before) in resources.iter().zip(mtimes) {
        let after = std::fs::metadata(r.dir.join(".slapos-resource"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(before, after, "{} resource file rewritten", r.id);
    }

    // Partitions are private to their users.
    let (a, b) = (&resources[0], &resources[1]);
    let out = std::process::Command::new("ls")
        .arg(&b.dir)
        .uid(a.uid)
        .gid(a.gid)
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{} could list {}",
        a.user.as_deref().unwrap(),
        b.dir.display()
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let own = std::process::Command::new("ls")
        .arg(&a.dir)
        .uid(a.uid)
        .gid(a.gid)
        .output()
        .unwrap();
    assert!(own.status.success(), "a partition user can list its own directory");

    // Growing adds only the new partitions.
    let mut bigger = cfg.clone();
    bigger.partitions = 22;
    let _cleanup_bigger = Cleanup(bigger.clone());
    let (grown, _) = format::format(&bigger).unwrap();
    assert_eq!(grown.users_created, 2);
    assert_eq!(grown.taps_created, 2);
}

use std::os::unix::process::CommandExt;

fn agent_args<'a>(cfg: &'a NodeConfig, master: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "run".into(),
        "--master".into(),
        master.into(),
        "--computer-id".into(),
        cfg.computer_id.clone(),
        "--instance-root".into(),
        cfg.instance_root.to_string_lossy().into(),
        "--software-root".into(),
        cfg.software_root.to_string_lossy().into(),
        "--partitions".into(),
        cfg.partitions.to_string(),
        "--user-prefix".into(),
        cfg.user_prefix.clone(),
        "--tap-prefix".into(),
        cfg.tap_prefix.clone(),
        "--software-user".into(),
        cfg.software_user.clone(),
        "--ipv4-range".into(),
        format!("{}/{}", cfg.ipv4_range.0, cfg.ipv4_range.1),
        "--ipv6-range".into(),
        format!("{}/{}", cfg.ipv6_range.0, cfg.ipv6_range.1),
        "--mode".into(),
        format!("{:?}", cfg.mode()).to_lowercase(),
        "--port-base".into(),
        cfg.port_base.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn spawn_agent(cfg: &NodeConfig, master: &str, log: &Path) -> Proc {
    let args = agent_args(cfg, master, &["--promise-interval", "2s"]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(&workspace_bin("nodeagent"), &refs, log)
}

/// The pid of a partition's supervised process, from the agent's record.
fn recorded_pid(cfg: &NodeConfig, partition: &str, process: &str) -> Option<i32> {
    let path = cfg
        .agent_dir()
        .join("run")
        .join(partition)
        .join(format!("{process}.json"));
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["pid"].as_i64().map(|p| p as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_reconfigures_survives_and_destroys_an_instance() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let cfg = config(tmp.path(), "nsv", 3, "10.214.0.0/24", "fd5a:9214::/64");
    let _cleanup = Cleanup(cfg.clone());
    let mut master = Master::init(tmp.path());
    let slap = MasterClient::new(&[master.url()]);
    let agent_log = tmp.path().join("agent.log");
    let mut agent = spawn_agent(&cfg, &master.url(), &agent_log);

    let sr = example_release("hello-http");
    let computer = cfg.computer_id.clone();
    wait_for("the computer's capacity", Duration::from_secs(30), || {
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current()
                .block_on(async { slap.computer_plan(&computer, None, None).await.is_ok() })
        })
    });
    supply(&slap, &computer, &sr).await;
    request(
        &slap,
        &sr,
        "hello",
        "default",
        &[("greeting", "Bonjour <&> \"été\"")],
        "started",
        false,
    )
    .await;
    request(
        &slap,
        &sr,
        "other",
        "default",
        &[("greeting", "unchanged")],
        "started",
        false,
    )
    .await;
    let params = [("greeting", "Bonjour <&> \"été\"")];
    let url = wait_connection(&slap, &sr, "hello", "default", &params, false, "url").await;
    let other_url = wait_connection(
        &slap,
        &sr,
        "other",
        "default",
        &[("greeting", "unchanged")],
        false,
        "url",
    )
    .await;
    let (status, body) = wait_http(&url).await;
    assert_eq!(status, 200);
    assert!(body.contains("<h1>Bonjour <&> \"été\"</h1>"), "{body}");
    assert!(
        url.starts_with("http://10.214.0."),
        "served on the partition's own address: {url}"
    );

    // Which partitions hold which instance, from the agent's records.
    let hello_part = (0..3)
        .map(nodeagent::config::partition_id)
        .find(|p| {
            std::fs::read_to_string(
                cfg.partition_dir(nodeagent::config::partition_index(p).unwrap())
                    .join("www/index.html"),
            )
            .is_ok_and(|t| t.contains("Bonjour"))
        })
        .expect("a partition serves hello");
    let other_part = (0..3)
        .map(nodeagent::config::partition_id)
        .find(|p| {
            std::fs::read_to_string(
                cfg.partition_dir(nodeagent::config::partition_index(p).unwrap())
                    .join("www/index.html"),
            )
            .is_ok_and(|t| t.contains("unchanged"))
        })
        .expect("a partition serves other");
    let hello_res = PartitionResource::load(&cfg.instance_root.join(&hello_part)).unwrap();
    let web_pid = recorded_pid(&cfg, &hello_part, "web").unwrap();
    assert_eq!(
        nodeagent::supervisor::proc_uid(web_pid),
        Some(hello_res.uid),
        "runs as the partition user"
    );

    // Accounting: the service runs in its partition's cgroup, which counts it.
    let cgroups = nodeagent::agent::cgroups_for(&cfg);
    if cgroups != nodeagent::cgroups::Cgroups::None {
        let groups = std::fs::read_to_string(format!("/proc/{web_pid}/cgroup")).unwrap();
        assert!(
            groups.contains(&format!("/{hello_part}\n")) && groups.contains("nodeagent-"),
            "{groups}"
        );
        let usage = nodeagent::usage::measure(&hello_res, &[], &cgroups);
        assert!(usage.peak_memory_bytes > 1 << 20, "{usage:?}");
        assert!(usage.cpu_seconds > 0.0, "{usage:?}");
    }

    // The partition's certificate, from the Master, readable by its user only.
    let certs = cfg.agent_dir().join("certs").join(&hello_part);
    let key_meta = std::fs::metadata(certs.join("partition.key")).expect("the partition key is kept");
    assert_eq!(key_meta.uid(), hello_res.uid);
    assert_eq!(key_meta.permissions().mode() & 0o777, 0o400);
    assert!(std::fs::read_to_string(certs.join("partition.crt"))
        .unwrap()
        .contains("BEGIN CERTIFICATE"));

    // Change a parameter: only that partition is reconfigured.
    let other_pid = recorded_pid(&cfg, &other_part, "web").unwrap();
    let other_record = cfg.agent_dir().join("deployed").join(&other_part);
    // Recorded once its promises passed and it was reported started.
    wait_for("other's deployment record", Duration::from_secs(30), || {
        other_record.exists()
    });
    let other_stamp = std::fs::metadata(&other_record).unwrap().modified().unwrap();
    request(
        &slap,
        &sr,
        "hello",
        "default",
        &[("greeting", "Hola")],
        "started",
        false,
    )
    .await;
    let start = std::time::Instant::now();
    loop {
        if http_get(&url).await.is_some_and(|(_, b)| b.contains("<h1>Hola</h1>")) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the new greeting never showed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        recorded_pid(&cfg, &other_part, "web"),
        Some(other_pid),
        "other was restarted"
    );
    assert_eq!(
        std::fs::metadata(&other_record).unwrap().modified().unwrap(),
        other_stamp,
        "other was redeployed"
    );

    // Agent restart (SIGKILL): the service stays up and is re-adopted.
    agent.kill();
    assert_eq!(
        http_get(&url).await.map(|(s, _)| s),
        Some(200),
        "service down after the agent died"
    );
    let web_pid = recorded_pid(&cfg, &hello_part, "web").unwrap();
    agent = spawn_agent(&cfg, &master.url(), &agent_log);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        recorded_pid(&cfg, &hello_part, "web"),
        Some(web_pid),
        "the process was replaced, not adopted"
    );
    assert_eq!(http_get(&url).await.map(|(s, _)| s), Some(200));
    assert!(std::fs::read_to_string(&agent_log).unwrap().contains("re-adopted"));

    // The supervisor restarts a process that dies.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(web_pid), nix::sys::signal::SIGKILL).unwrap();
    let start = std::time::Instant::now();
    loop {
        if recorded_pid(&cfg, &hello_part, "web").is_some_and(|p| p != web_pid) && http_get(&url).await.is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the killed process was not restarted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Master down: every instance keeps running, the agent keeps going.
    master.proc.kill();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(http_get(&url).await.map(|(s, _)| s), Some(200));
    assert_eq!(http_get(&other_url).await.map(|(s, _)| s), Some(200));
    assert!(
        agent.0.as_mut().unwrap().try_wait().unwrap().is_none(),
        "the agent exited without a master"
    );
    master.restart();
    let slap = MasterClient::new(&[master.url()]);

    // Destroy: the partition is freed, its user has no process left and its
    // directory is empty.
    request(
        &slap,
        &sr,
        "hello",
        "default",
        &[("greeting", "Hola")],
        "destroyed",
        false,
    )
    .await;
    let start = std::time::Instant::now();
    while !partition_free(&slap, &computer, &hello_part).await {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the partition was never freed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        pids_of_uid(hello_res.uid).is_empty(),
        "processes left for the partition user"
    );
    let left: Vec<_> = std::fs::read_dir(&hello_res.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec![".slapos-resource".to_string()], "directory not emptied");
    assert!(http_get(&url).await.is_none(), "the destroyed service still answers");
    assert!(!certs.exists(), "the destroyed partition's certificate was kept");
    assert_eq!(
        http_get(&other_url).await.map(|(s, _)| s),
        Some(200),
        "other was disturbed"
    );
    agent.terminate();
}
