//! Self-hosting: the Master deployed by the system itself.
//!
//! A single replica plays SlapProxy's part, the mini-master, for three nodes
//! (real `nodeagent` processes, one region each). A request for a master tree
//! of the master release (`software/master`) places one replica on each node
//! and region; they join the mini-master's cluster, the nodes are re-pointed
//! to them, and the mini-master leaves and stops. Then one replica is
//! replaced through the tree (its instance destroyed, a new one requested):
//! membership follows, leave then join. Every write acknowledged on the way
//! is still there at the end. Everything speaks mutual TLS: the nodes
//! register with the mini-master and keep their certificates after the
//! hand-over, as the cluster and its CA stay the same.
//!
//! Each node is its own network namespace, joined to a bridge by a veth
//! pair, with its own address: its agent runs unprivileged there with
//! `--unprivileged-address`, so the replicas in its partitions serve on that
//! address and reach each other across the bridge, as on three machines.
//! The mini-master and the test sit on the bridge, in the root namespace.
//! Needs root (namespaces), as CI runs it.

mod common;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge in the root namespace and one namespace per node, removed on drop.
struct Machines {
    bridge: String,
    host_ip: Ipv4Addr,
    netns: Vec<(String, String, Ipv4Addr)>,
}

impl Machines {
    fn create(n: usize) -> Machines {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the self-hosting test puts each node in a network namespace: run it as root (CI does)"
        );
        let tag = format!("{:x}", std::process::id() % 0xfffff);
        let subnet = (std::process::id() % 200) as u8 + 20;
        let m = Machines {
            bridge: format!("shs{tag}b"),
            host_ip: Ipv4Addr::new(10, 79, subnet, 1),
            netns: (1..=n)
                .map(|i| {
                    (
                        format!("shself{tag}-n{i}"),
                        format!("shs{tag}v{i}"),
                        Ipv4Addr::new(10, 79, subnet, 10 + i as u8),
                    )
                })
                .collect(),
        };
        ip(&["link", "add", &m.bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", m.host_ip), "dev", &m.bridge]);
        ip(&["link", "set", &m.bridge, "up"]);
        for (i, (ns, veth, addr)) in m.netns.iter().enumerate() {
            let peer = format!("shs{tag}p{}", i + 1);
            ip(&["netns", "add", ns]);
            ip(&["link", "add", veth, "type", "veth", "peer", "name", &peer]);
            ip(&["link", "set", &peer, "netns", ns]);
            ip(&["link", "set", veth, "master", &m.bridge]);
            ip(&["link", "set", veth, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", &peer, "name", "eth0"]);
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", "eth0"]);
            ip(&["-n", ns, "link", "set", "eth0", "up"]);
            ip(&["-n", ns, "route", "add", "default", "via", &m.host_ip.to_string()]);
        }
        // A Docker engine on this machine sets the FORWARD policy to DROP,
        // which also drops bridged traffic between the nodes: let ours pass.
        let _ = m.iptables("-I");
        m
    }

    /// Inserts (`-I`) or deletes (`-D`) the rule that forwards traffic
    /// between the nodes' veths, where iptables exists.
    fn iptables(&self, op: &str) -> std::io::Result<std::process::Output> {
        Command::new("iptables")
            .args([op, "FORWARD", "-i", &self.bridge, "-o", &self.bridge, "-j", "ACCEPT"])
            .output()
    }
}

impl Drop for Machines {
    fn drop(&mut self) {
        for (ns, veth, _) in &self.netns {
            let _ = Command::new("ip").args(["link", "del", veth]).output();
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        let _ = self.iptables("-D");
    }
}

/// The mini-master: one replica on the bridge, serving SLAP over mutual TLS.
struct MiniMaster {
    proc: Proc,
    data_dir: PathBuf,
    listen: String,
    slap: String,
    token: String,
}

impl MiniMaster {
    fn init(dir: &Path, host: Ipv4Addr) -> MiniMaster {
        let data_dir = dir.join("mini-master");
        let listen = format!("{host}:{}", free_port());
        let slap = format!("{host}:{}", free_port());
        let proc = Proc::spawn(
            &workspace_bin("master-node"),
            &[
                "init",
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--listen",
                &listen,
                "--slap-listen",
                &slap,
            ],
            &dir.join("mini-master.log"),
        );
        let token_file = data_dir.join("join-token");
        wait("the mini-master", Duration::from_secs(30), || token_file.exists());
        let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
        MiniMaster {
            proc,
            data_dir,
            listen,
            slap,
            token,
        }
    }

    /// `master-node ARGS --peer <it> --token <its token>`; stdout.
    fn admin(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(workspace_bin("master-node"))
            .args(args)
            .args(["--peer", &self.listen, "--token", &self.token])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

const PARKED: &str = "https://lab.example.invalid/parked/software.cfg";

struct Node {
    id: &'static str,
    region: &'static str,
    /// Its namespace and address.
    netns: String,
    addr: Ipv4Addr,
    dir: PathBuf,
    agent: Proc,
}

/// The certificates the test acts with: an administrator's.
struct Creds {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Node {
    fn start(&mut self, masters: &[String]) {
        let log = self.dir.join("agent.log");
        let args = [
            "netns".to_string(),
            "exec".into(),
            self.netns.clone(),
            workspace_bin("nodeagent").display().to_string(),
            "run".into(),
            "--master".into(),
            masters.join(","),
            "--identity-dir".into(),
            self.dir.join("identity").display().to_string(),
            "--computer-id".into(),
            self.id.into(),
            "--mode".into(),
            "unprivileged".into(),
            "--instance-root".into(),
            self.dir.join("srv").display().to_string(),
            "--software-root".into(),
            self.dir.join("opt").display().to_string(),
            "--partitions".into(),
            "3".into(),
            "--unprivileged-address".into(),
            self.addr.to_string(),
            "--category".into(),
            format!("region={}", self.region),
            "--instance-interval".into(),
            "5s".into(),
            "--software-interval".into(),
            "5s".into(),
        ];
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.agent = Proc::spawn(Path::new("ip"), &refs, &log);
    }
}

/// Kills whatever still runs from the test's directory (the replicas the
/// agents supervise outlive the agents on purpose).
struct Sweep(PathBuf);

impl Drop for Sweep {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(&self.0);
        }
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.0.display().to_string()])
            .status();
    }
}

/// On failure: the end of every log under `dir` (agents, replicas, the mini-master).
fn print_logs(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        if path.is_dir() {
            print_logs(&path);
        } else if path.extension().is_some_and(|x| x == "log")
            // RocksDB's write-ahead logs are 000004.log and the like.
            && !path.file_stem().is_some_and(|n| n.to_string_lossy().bytes().all(|b| b.is_ascii_digit()))
        {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            eprintln!("==== {} (last 25 lines)", path.display());
            for l in &lines[lines.len().saturating_sub(25)..] {
                eprintln!("{l}");
            }
        }
    }
}

/// `slapctl --master URL --json ARGS` as the administrator, over mutual TLS.
fn slapctl(creds: &Creds, master: &str, args: &[&str]) -> Result<serde_json::Value, String> {
    let out = Command::new(workspace_bin("slapctl"))
        .args(["--master", master, "--json", "--patience", "20"])
        .arg("--cert")
        .arg(&creds.cert)
        .arg("--key")
        .arg(&creds.key)
        .arg("--ca")
        .arg(&creds.ca)
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(&text).unwrap_or(serde_json::Value::Null))
}

/// `master-node status --json` through `peer`.
fn status(peer: &str, token: &str) -> Option<serde_json::Value> {
    let out = Command::new(workspace_bin("master-node"))
        .args(["status", "--json", "--peer", peer, "--token", token])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

fn voters(st: &serde_json::Value) -> Vec<String> {
    let mut v: Vec<String> = st["members"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter(|m| m["role"] == "voter")
                .map(|m| m["addr"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn wait(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An instance of the tree by title: `show` finds the user's own requests
/// only, the replicas the root requested are found in the list.
fn instance(creds: &Creds, master: &str, title: &str) -> Option<serde_json::Value> {
    let list = slapctl(creds, master, &["list"]).ok()?;
    list.as_array()?.iter().find(|i| i["title"] == title).cloned()
}

/// An instance's connection parameter, once published.
fn published(creds: &Creds, master: &str, title: &str, key: &str) -> Option<String> {
    instance(creds, master, title)?["connection"][key]
        .as_str()
        .map(String::from)
}

/// An acknowledged write: a request parked on a computer that does not exist.
fn write(creds: &Creds, master: &str, n: usize, acknowledged: &mut Vec<String>) {
    let title = format!("order-{n}");
    let param = format!("n={n}");
    slapctl(
        creds,
        master,
        &[
            "request",
            &title,
            PARKED,
            "--param",
            &param,
            "--sla",
            "computer_guid=ARCHIVE",
        ],
    )
    .unwrap_or_else(|e| panic!("write {title}: {e}"));
    acknowledged.push(title);
}

fn assert_all_there(creds: &Creds, master: &str, acknowledged: &[String]) {
    let list = slapctl(creds, master, &["list"]).unwrap();
    for title in acknowledged {
        let found = list
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["title"] == title.as_str())
            .unwrap_or_else(|| panic!("{title} was acknowledged and is lost"));
        assert_eq!(found["parameters"]["n"], title.trim_start_matches("order-"));
    }
}

fn make_release(dir: &Path) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../software/master/make-release");
    let out = Command::new("bash")
        .arg(&script)
        .arg(dir)
        .arg(workspace_bin("master-node"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "make-release: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_master_deploys_itself_then_replaces_a_replica() {
    let tmp = tempfile::tempdir().unwrap();
    // Dropped in reverse: the processes are killed before the namespaces go.
    let machines = Machines::create(3);
    let _sweep = Sweep(tmp.path().to_path_buf());
    let mut mini = MiniMaster::init(tmp.path(), machines.host_ip);
    let mini_url = format!("https://{}", mini.slap);
    let token = mini.token.clone();
    let admin_dir = mini.data_dir.join("admin");
    let creds = Creds {
        cert: admin_dir.join("admin.crt"),
        key: admin_dir.join("admin.key"),
        ca: admin_dir.join("ca.crt"),
    };
    let release = make_release(&tmp.path().join("release"));

    let mut nodes: Vec<Node> = [("NODE-EU", "eu"), ("NODE-US", "us"), ("NODE-ASIA", "asia")]
        .into_iter()
        .zip(&machines.netns)
        .map(|((id, region), (netns, _, addr))| {
            let dir = tmp.path().join(id);
            std::fs::create_dir_all(&dir).unwrap();
            Node {
                id,
                region,
                netns: netns.clone(),
                addr: *addr,
                dir,
                agent: Proc(None),
            }
        })
        .collect();
    for n in &mut nodes {
        // Each node registers with the mini-master: its certificate stays
        // valid in the cluster the mini-master hands over to.
        let mut registration = None;
        wait("the cluster's CA", Duration::from_secs(30), || {
            registration = mini.admin(&["computer", "add", n.id]).ok();
            registration.is_some()
        });
        let out = Command::new(workspace_bin("nodeagent"))
            .args(["register", "--master", &mini.listen, "--computer-id", n.id])
            .args(["--token", registration.unwrap().trim()])
            .arg("--out")
            .arg(n.dir.join("identity"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "register: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        n.start(std::slice::from_ref(&mini_url));
    }
    for n in &nodes {
        // Supplying succeeds once the node has registered its partitions.
        wait(&format!("{} to register", n.id), Duration::from_secs(60), || {
            slapctl(&creds, &mini_url, &["supply", &release, n.id]).is_ok()
        });
    }

    let mut acknowledged = Vec::new();
    write(&creds, &mini_url, 0, &mut acknowledged);

    // The master tree: its root joins the mini-master's cluster, in eu; the
    // root requests the two other replicas, in us and asia.
    let peer = format!("peer={}", mini.listen);
    let tok = format!("token={token}");
    let tree = [
        "request",
        "master",
        &release,
        "--param",
        "mode=join",
        "--param",
        &peer,
        "--param",
        &tok,
        "--param",
        "region-2=us",
        "--param",
        "region-3=asia",
        "--sla",
        "region=eu",
    ];
    slapctl(&creds, &mini_url, &tree).unwrap();
    wait("three replicas in partitions to join", Duration::from_secs(240), || {
        status(&mini.listen, &token).is_some_and(|s| voters(&s).len() == 4)
    });
    let mut slap_urls = Vec::new();
    for (title, node) in [
        ("master", "NODE-EU"),
        ("master-2", "NODE-US"),
        ("master-3", "NODE-ASIA"),
    ] {
        let inst = instance(&creds, &mini_url, title).unwrap_or_else(|| panic!("no instance {title}"));
        assert_eq!(inst["computer"], node, "{title} is not where its region says");
        let mut url = None;
        wait(
            &format!("{title} to publish its SLAP URL"),
            Duration::from_secs(60),
            || {
                url = published(&creds, &mini_url, title, "slap-url");
                url.is_some()
            },
        );
        // It serves on its node's own address, across the bridge.
        let url = url.unwrap();
        let addr = nodes.iter().find(|n| n.id == node).unwrap().addr;
        assert!(url.starts_with(&format!("https://{addr}:")), "{title} serves at {url}");
        slap_urls.push(url);
    }
    assert!(published(&creds, &mini_url, "master", "join-token").is_some_and(|t| t == token));
    write(&creds, &mini_url, 1, &mut acknowledged);

    // The nodes are re-pointed to the new replicas, one at a time; the
    // replicas they supervise keep running across the agent's restart.
    for n in &mut nodes {
        n.agent.terminate();
        n.start(&slap_urls);
        write(&creds, &slap_urls[0], acknowledged.len(), &mut acknowledged);
    }

    // The mini-master is retired.
    let out = Command::new(workspace_bin("master-node"))
        .args(["leave", "--data-dir", mini.data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "leave: {}", String::from_utf8_lossy(&out.stderr));
    mini.proc.terminate();
    let root_cluster = published(&creds, &slap_urls[0], "master", "cluster").unwrap();
    wait("a leader among the three replicas", Duration::from_secs(60), || {
        status(&root_cluster, &token).is_some_and(|s| {
            voters(&s).len() == 3 && !voters(&s).contains(&mini.listen) && s["leader_id"].as_u64().is_some()
        })
    });
    write(&creds, &slap_urls[1], acknowledged.len(), &mut acknowledged);
    assert_all_there(&creds, &slap_urls[2], &acknowledged);

    // A replica replaced through the tree: the root now wants master-3b
    // instead of master-3; master-3 is destroyed (its replica leaves) and
    // master-3b joins, in asia again.
    let old = published(&creds, &slap_urls[0], "master-3", "cluster").unwrap();
    let mut replaced = tree.to_vec();
    replaced.extend(["--param", "replica-3=3b"]);
    slapctl(&creds, &slap_urls[0], &replaced).unwrap();
    let mut fresh = None;
    wait("master-3b to publish its address", Duration::from_secs(120), || {
        fresh = published(&creds, &slap_urls[0], "master-3b", "cluster");
        fresh.is_some()
    });
    let fresh = fresh.unwrap();
    assert_ne!(fresh, old);
    wait("membership to follow the tree", Duration::from_secs(120), || {
        status(&root_cluster, &token).is_some_and(|s| {
            let v = voters(&s);
            v.len() == 3 && v.contains(&fresh) && !v.contains(&old)
        })
    });
    assert_eq!(
        instance(&creds, &slap_urls[0], "master-3b").unwrap()["computer"],
        "NODE-ASIA"
    );
    write(&creds, &slap_urls[0], acknowledged.len(), &mut acknowledged);
    assert_all_there(&creds, &slap_urls[1], &acknowledged);
    for n in &mut nodes {
        n.agent.terminate();
    }
}
