//! Node agent benchmark (as root): format 300 partitions, one instance loop
//! over 300 unchanged partitions, deploying and reconfiguring 300 partitions
//! of the hello-http example, and the agent's resident memory with 300
//! partitions, against a real master-node. When the `slapos` client is
//! installed (SLAPOS_BIN, or /var/tmp/slapos-venv/bin/slapos), `slapos node
//! format` of 300 partitions (definition file, no users or network changes)
//! runs beside our unprivileged format, both posting to the same Master.
//!
//! ```text
//! cargo build --workspace --all-targets
//! cargo run -p nodeagent --example agent_bench [-- PARTITIONS]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nodeagent::agent::report_capacity;
use nodeagent::config::NodeConfig;
use nodeagent::format;
use nodeagent::instance::{Instances, Outcome};
use nodeagent::master::{MasterClient, MasterError};
use nodeagent::supervisor::{pids_of_uid, Supervisor};
use slap_proto::marshal::{self, Value};

#[derive(Parser)]
struct Wrapper {
    #[command(flatten)]
    node: NodeConfig,
}

fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join(name)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

async fn request(slap: &MasterClient, sr: &str, title: &str, greeting: &str) {
    let params = marshal::dumps(&Value::Dict(vec![(Value::str("greeting"), Value::str(greeting))])).unwrap();
    let fields = [
        ("software_release", sr),
        ("software_type", "default"),
        ("partition_reference", title),
        ("partition_parameter_xml", params.as_str()),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("state", "<marshal><string>started</string></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ];
    match slap.post("requestComputerPartition", &fields).await {
        Ok(_) | Err(MasterError::Rejected { status: 408, .. }) => {}
        Err(e) => panic!("request {title}: {e}"),
    }
}

fn rss_kb(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// `slapos node format` of `n` partitions through a definition file (no
/// users, taps or addresses), posting to `master`; returns its wall time.
fn slapos_format(slapos: &Path, dir: &Path, n: u32, master: &str) -> Option<Duration> {
    let node = dir.join("slapos-node");
    std::fs::create_dir_all(node.join("srv")).ok()?;
    std::fs::create_dir_all(node.join("opt")).ok()?;
    let mut definition = String::from("[computer]\naddress = fd00::2/ffff:ffff:ffff:ffff::\nsoftware_user = root\n\n");
    for i in 0..n {
        definition.push_str(&format!(
            "[partition_{i}]\npathname = slappart{i}\nuser = root\nnetwork_interface = lo\naddress = 10.0.{}.{}/255.255.255.255 fd00::2:{:x}/ffff:ffff:ffff:ffff::\n\n",
            i / 250,
            i % 250 + 1,
            i + 1
        ));
    }
    std::fs::write(node.join("computer_definition.cfg"), definition).ok()?;
    let cfg = format!(
        "[slapos]\ncomputer_id = COMP-SLAPOS-FORMAT\nmaster_url = {master}/\nsoftware_root = {d}/opt\ninstance_root = {d}/srv\n\
         pidfile_software = {d}/sr.pid\npidfile_instance = {d}/cp.pid\npidfile_report = {d}/ur.pid\n\n\
         [slapformat]\nalter_user = False\nalter_network = False\ncreate_tap = False\npartition_has_ipv6_range = False\n\
         partition_amount = {n}\ncomputer_xml = {d}/slapos.xml\ncomputer_json = {d}/slapos.json\n\
         input_definition_file = {d}/computer_definition.cfg\npartition_base_name = slappart\nuser_base_name = slapuser\n\
         tap_base_name = slaptap\nipv4_local_network = 10.0.0.0/16\ninterface_name = lo\n",
        d = node.display()
    );
    std::fs::write(node.join("slapos.cfg"), cfg).ok()?;
    let start = Instant::now();
    let out = Command::new(slapos)
        .args(["node", "format", "--cfg", node.join("slapos.cfg").to_str()?, "--now"])
        .output()
        .ok()?;
    let took = start.elapsed();
    if !out.status.success() {
        eprintln!("slapos node format failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    Some(took)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    assert!(nix::unistd::geteuid().is_root(), "run the agent benchmark as root");
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(300);
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let cfg = Wrapper::parse_from([
        "bench",
        "--instance-root",
        root.join("srv").to_str().unwrap(),
        "--software-root",
        root.join("opt").to_str().unwrap(),
        "--partitions",
        &n.to_string(),
        "--user-prefix",
        "nbu",
        "--tap-prefix",
        "nbt",
        "--software-user",
        "nbsoft",
        "--ipv4-range",
        "10.215.0.0/20",
        "--ipv6-range",
        "fd5a:9215::/64",
        "--mode",
        "privileged",
        "--computer-id",
        "COMP-BENCH",
        "--port-base",
        "30000",
    ])
    .node;
    let mut report = Vec::<(String, String)>::new();

    // Format.
    let start = Instant::now();
    let (first, resources) = format::format(&cfg).expect("format");
    let cold = start.elapsed();
    let start = Instant::now();
    let (second, _) = format::format(&cfg).expect("format");
    let warm = start.elapsed();
    assert!(!second.changed());
    println!(
        "format {n} partitions (users, dirs, taps, 2 addresses each): {} ({first:?})",
        ms(cold)
    );
    println!("format again, nothing to change: {}", ms(warm));
    report.push((format!("format {n} partitions, privileged (first run)"), ms(cold)));
    report.push((format!("format {n} partitions, nothing to change"), ms(warm)));

    // A real Master.
    let data = root.join("master");
    let slap_port = free_port();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut master = Command::new(bin("master-node"))
        .args(["init", "--data-dir", data.to_str().unwrap(), "--listen", &listen])
        .args(["--slap-listen", &format!("127.0.0.1:{slap_port}"), "--insecure-http"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("master-node (build the workspace first)");
    let url = format!("http://127.0.0.1:{slap_port}");
    while std::net::TcpStream::connect(("127.0.0.1", slap_port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    let slap = Arc::new(MasterClient::new(std::slice::from_ref(&url)));

    // Our unprivileged format beside slapos node format, same partition count.
    let slapos = std::env::var("SLAPOS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/var/tmp/slapos-venv/bin/slapos"));
    if slapos.exists() {
        let mut unpriv = cfg.clone();
        unpriv.mode = Some(nodeagent::config::Mode::Unprivileged);
        unpriv.instance_root = root.join("unpriv-srv");
        unpriv.computer_id = "COMP-UNPRIV-FORMAT".into();
        let start = Instant::now();
        let (_, res) = format::format(&unpriv).unwrap();
        report_capacity(&unpriv, &slap, &res).await.unwrap();
        let ours = start.elapsed();
        if let Some(theirs) = slapos_format(&slapos, root, n, &url) {
            println!(
                "format {n} partitions, directories only, posted to the Master: nodeagent {} / slapos node format {} ({:.0}x)",
                ms(ours),
                ms(theirs),
                theirs.as_secs_f64() / ours.as_secs_f64()
            );
            report.push((
                format!("format {n} partitions, directories only + post: nodeagent"),
                ms(ours),
            ));
            report.push((
                format!("format {n} partitions, directories only + post: slapos node format"),
                ms(theirs),
            ));
        }
    }

    report_capacity(&cfg, &slap, &resources).await.unwrap();
    let sr = format!(
        "file://{}/software/hello-http/software.toml",
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().display()
    );
    slap.post(
        "supplySupply",
        &[
            ("url", sr.as_str()),
            ("computer_id", "COMP-BENCH"),
            ("state", "available"),
        ],
    )
    .await
    .unwrap();
    let start = Instant::now();
    for i in 0..n {
        request(&slap, &sr, &format!("bench-{i}"), "first").await;
    }
    println!("{n} requests: {}", ms(start.elapsed()));
    let (plan, _) = slap.computer_plan("COMP-BENCH", None, None).await.unwrap().unwrap();
    let run = nodeagent::software::process(&cfg, &slap, &plan).await;
    assert!(run.failed.is_empty(), "{:?}", run.failed);

    let supervisor = Arc::new(Supervisor::new(cfg.agent_dir().join("run")));
    let mut instances = Instances::new(cfg.clone(), slap.clone(), supervisor.clone(), resources.clone());
    instances.promise_wait = Duration::from_secs(120);

    // First deployment: 300 services started, promised, reported.
    let start = Instant::now();
    let outcomes = instances.process(&plan.partitions, false).await;
    let deploy = start.elapsed();
    let started = outcomes.iter().filter(|(_, o)| *o == Outcome::Started).count();
    assert_eq!(
        started,
        n as usize,
        "{:?}",
        outcomes.iter().find(|(_, o)| matches!(o, Outcome::Failed(_)))
    );
    println!(
        "deploy {n} partitions (start {n} services, promises, reports): {}",
        ms(deploy)
    );
    report.push((format!("deploy {n} new partitions of hello-http"), ms(deploy)));

    // Unchanged loop: fetch + parse the plan, then the pass over partitions.
    let (plan, _) = slap.computer_plan("COMP-BENCH", None, None).await.unwrap().unwrap();
    let mut fetches = Vec::new();
    let mut passes = Vec::new();
    for _ in 0..20 {
        let start = Instant::now();
        let (plan, _) = slap.computer_plan("COMP-BENCH", None, None).await.unwrap().unwrap();
        fetches.push(start.elapsed());
        let start = Instant::now();
        let outcomes = instances.process(&plan.partitions, false).await;
        passes.push(start.elapsed());
        assert!(outcomes.iter().all(|(_, o)| *o == Outcome::Unchanged));
    }
    fetches.sort();
    passes.sort();
    println!(
        "instance loop over {n} unchanged partitions: fetch+parse plan {} + pass {} (medians of 20)",
        ms(fetches[10]),
        ms(passes[10])
    );
    report.push((
        format!("instance loop, {n} unchanged: fetch + parse the plan"),
        ms(fetches[10]),
    ));
    report.push((
        format!("instance loop, {n} unchanged: pass over partitions"),
        ms(passes[10]),
    ));
    drop(plan);

    // Reconfigure: a parameter changed on every instance.
    for i in 0..n {
        request(&slap, &sr, &format!("bench-{i}"), "second").await;
    }
    let (plan, _) = slap.computer_plan("COMP-BENCH", None, None).await.unwrap().unwrap();
    let start = Instant::now();
    let outcomes = instances.process(&plan.partitions, false).await;
    let reconf = start.elapsed();
    assert_eq!(
        outcomes.iter().filter(|(_, o)| *o == Outcome::Started).count(),
        n as usize
    );
    println!("reconfigure {n} changed partitions: {}", ms(reconf));
    report.push((format!("reconfigure {n} changed partitions"), ms(reconf)));

    // The daemon's memory with 300 partitions (it re-adopts our processes).
    let agent_log = root.join("agent.log");
    let log = std::fs::File::create(&agent_log).unwrap();
    let mut agent = Command::new(bin("nodeagent"))
        .args(["run", "--master", &url, "--computer-id", "COMP-BENCH"])
        .args(["--instance-root", cfg.instance_root.to_str().unwrap()])
        .args(["--software-root", cfg.software_root.to_str().unwrap()])
        .args([
            "--partitions",
            &n.to_string(),
            "--user-prefix",
            "nbu",
            "--tap-prefix",
            "nbt",
        ])
        .args([
            "--software-user",
            "nbsoft",
            "--ipv4-range",
            "10.215.0.0/20",
            "--ipv6-range",
            "fd5a:9215::/64",
        ])
        .args(["--port-base", "30000", "--promise-interval", "5s"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let pid = agent.id() as i32;
    let (rss, hwm) = (rss_kb(pid, "VmRSS:"), rss_kb(pid, "VmHWM:"));
    println!(
        "agent resident memory with {n} partitions: {rss} KiB now ({} KiB anonymous, {} KiB file), {hwm} KiB peak",
        rss_kb(pid, "RssAnon:"),
        rss_kb(pid, "RssFile:")
    );
    report.push((
        format!("agent resident memory, {n} partitions (now / peak)"),
        format!("{:.1} / {:.1} MiB", rss as f64 / 1024.0, hwm as f64 / 1024.0),
    ));
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM);
    let _ = agent.wait();

    // Clean up: every service, the partitions, the Master.
    supervisor.stop_all().await;
    for r in &resources {
        for pid in pids_of_uid(r.uid) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    format::unformat(&cfg).unwrap();
    let _ = Command::new("userdel").arg("nbsoft").status();
    let _ = master.kill();
    let _ = master.wait();

    println!("\n| measure | value |\n|---|---|");
    for (k, v) in report {
        println!("| {k} | {v} |");
    }
}
