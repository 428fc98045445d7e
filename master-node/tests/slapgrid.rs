//! The unmodified `slapos node` (slapgrid, PyPI slapos.core 1.26.1) as a
//! node of this Master, with a buildout software release, as root:
//!
//! - `slapos node format` makes real Unix users and partition directories
//!   (from a definition file: no network changes);
//! - `slapos node software` builds `software/buildout-hello` as the
//!   software user;
//! - `slapos node instance` runs the instance profiles as the partition
//!   users: the root requests a child, the child's service runs under the
//!   partition's supervisord and publishes its URL, the root publishes the
//!   child's URL and one for a shared instance it hosts;
//! - `slapos request` reads the connection parameters back, and
//!   `slapos node report` destroys the tree until every partition is free.
//!
//! Three replicas behind slap-gateway; the leader is SIGKILLed in the middle
//! and every command must still succeed. The recipes the release uses
//! (slapos.cookbook's `slapconfiguration` and `publish`, unmodified, and the
//! repository's own) are installed beside slapgrid by `scripts/setup.sh`.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{attrs, get, http, SlapCluster};
use slap_proto::marshal::{loads, Value};

fn venv() -> PathBuf {
    std::env::var_os("SLAPOS_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/slapos-venv"))
}

fn require_slapgrid() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "slapgrid makes Unix users and runs buildout as them: run this test as root (CI does)"
    );
    let ok = Command::new(venv().join("bin/python"))
        .args(["-c", "import slapos_rs_recipe, slapos.grid"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "slapos.core and the release's recipes are not installed in {}: run scripts/setup.sh",
        venv().display()
    );
}

/// Runs `slapos ARGS`: whether it succeeded, and what it printed.
fn slapos_try(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(venv().join("bin/slapos"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run slapos");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn slapos(dir: &Path, args: &[&str]) -> String {
    let (ok, text) = slapos_try(dir, args);
    assert!(ok, "slapos {args:?} failed:\n{text}");
    text
}

/// Runs `slapos ARGS` until `done` holds after a run (slapgrid deploys a
/// tree over several runs: a requester waits for what it requested).
fn slapos_until(dir: &Path, args: &[&str], what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut last = String::new();
    for run in 1.. {
        let (_, text) = slapos_try(dir, args);
        if done() {
            return;
        }
        last = text;
        assert!(
            Instant::now() < deadline,
            "{what}: not reached after {run} runs of slapos {args:?}; the last printed:\n{last}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    unreachable!("{last}");
}

/// The Unix users, groups and processes the test makes, removed on drop.
struct Machine {
    users: Vec<String>,
    instance_root: PathBuf,
}

impl Drop for Machine {
    fn drop(&mut self) {
        // supervisord (started by slapgrid, as root) and its services.
        let pidfile = self.instance_root.join("var/run/supervisord.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM);
            std::thread::sleep(Duration::from_secs(1));
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        for user in &self.users {
            let _ = Command::new("pkill").args(["-KILL", "-u", user]).status();
        }
        std::thread::sleep(Duration::from_millis(200));
        for user in &self.users {
            // userdel takes the user's own group with it.
            let _ = Command::new("userdel").arg(user).status();
        }
    }
}

/// The partitions of `COMP-1` as a polling node sees them.
fn partitions(port: u16) -> Vec<Value> {
    let (status, body) = http(port, "GET", "/getFullComputerInformation", "computer_id=COMP-1").unwrap();
    assert_eq!(status, 200, "{body}");
    let doc = loads(&body).unwrap();
    match get(attrs(&doc), "_computer_partition_list") {
        Value::List(parts) => parts.clone(),
        other => panic!("no partition list: {other:?}"),
    }
}

/// The connection parameters of the instance titled `title`, if placed.
fn connection(port: u16, title: &str) -> Vec<(String, String)> {
    for p in partitions(port) {
        let a = attrs(&p);
        let Value::Dict(params) = get(a, "_parameter_dict") else {
            continue;
        };
        if get(params, "instance_title") != &Value::str(title) {
            continue;
        }
        let Value::Dict(conn) = get(a, "_connection_dict") else {
            return vec![];
        };
        return conn
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect();
    }
    vec![]
}

fn lookup<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// GET `url` (http://host:port/path) and return the body.
fn fetch(url: &str) -> Option<Vec<u8>> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://")?;
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(hostport).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let at = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    raw.starts_with(b"HTTP/1.0 200").then(|| raw[at + 4..].to_vec())
}

#[test]
fn slapgrid_deploys_a_buildout_release_and_destroys_it() {
    require_slapgrid();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // Partition users must reach their directories and the release.
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cluster = SlapCluster::start(&root.join("cluster"));
    let slap = cluster.gateway_port;

    // Names of this run's users (a user name is at most 32 characters).
    let tag = format!("sg{}", std::process::id() % 100_000);
    let software_user = format!("{tag}soft");
    let partition_users: Vec<String> = (0..3).map(|p| format!("{tag}u{p}")).collect();
    let node = root.join("node");
    let _machine = Machine {
        users: partition_users.iter().chain([&software_user]).cloned().collect(),
        instance_root: node.join("srv"),
    };
    std::fs::create_dir_all(node.join("etc/pki")).unwrap();
    let n = node.display();
    std::fs::write(
        node.join("slapos.cfg"),
        format!(
            "[slapos]\ncomputer_id = COMP-1\nmaster_url = http://127.0.0.1:{slap}/\nsoftware_root = {n}/opt\n\
             instance_root = {n}/srv\ncertificate_repository_path = {n}/etc/pki\n\
             pidfile_software = {n}/software.pid\npidfile_instance = {n}/instance.pid\npidfile_report = {n}/report.pid\n\n\
             [slapformat]\nalter_user = True\nalter_network = False\ncreate_tap = False\n\
             partition_has_ipv6_range = False\npartition_amount = 3\ncomputer_xml = {n}/slapos.xml\n\
             computer_json = {n}/slapos.json\ninput_definition_file = {n}/definition.cfg\n\
             partition_base_name = slappart\nuser_base_name = {tag}u\ntap_base_name = {tag}t\n\
             ipv4_local_network = 127.0.0.0/8\ninterface_name = lo\n"
        ),
    )
    .unwrap();
    // Each partition gets an address of its own on loopback.
    let mut definition =
        format!("[computer]\naddress = fd00::2/ffff:ffff:ffff:ffff::\nsoftware_user = {software_user}\n");
    for (p, user) in partition_users.iter().enumerate() {
        definition.push_str(&format!(
            "\n[partition_{p}]\npathname = slappart{p}\nuser = {user}\nnetwork_interface = lo\n\
             address = 127.0.10.{}/255.255.255.255 fd00::2:1{p}/ffff:ffff:ffff:ffff::\n",
            p + 1
        ));
    }
    std::fs::write(node.join("definition.cfg"), definition).unwrap();
    std::fs::write(
        root.join("client.cfg"),
        format!("[slapos]\nmaster_url = http://127.0.0.1:{slap}/\nmaster_rest_url = http://127.0.0.1:{slap}/hateoas\n[slapconsole]\n"),
    )
    .unwrap();
    let release = Path::new(env!("CARGO_MANIFEST_DIR")).join("../software/buildout-hello/software.cfg");
    let sr = std::fs::canonicalize(release).unwrap().display().to_string();
    let cfg = format!("{n}/slapos.cfg");

    // Format: real users, partition directories 0750 owned by them.
    slapos(root, &["node", "format", "--cfg", &cfg, "--now"]);
    for (p, user) in partition_users.iter().enumerate() {
        let meta = std::fs::metadata(node.join(format!("srv/slappart{p}"))).unwrap();
        let uid = nix::unistd::User::from_name(user)
            .unwrap()
            .expect("format made the user")
            .uid;
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), uid.as_raw());
        assert_eq!(meta.permissions().mode() & 0o777, 0o750);
    }

    // Software: built by buildout as the software user.
    slapos(root, &["supply", &sr, "COMP-1", "--cfg", "client.cfg"]);
    slapos(root, &["node", "software", "--cfg", &cfg, "--now"]);
    let built = std::fs::read_dir(node.join("opt"))
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| e.path().join("instance.cfg").exists())
        .expect("the software run wrote instance.cfg");
    let soft_uid = nix::unistd::User::from_name(&software_user).unwrap().unwrap().uid;
    assert_eq!(
        std::os::unix::fs::MetadataExt::uid(&built.metadata().unwrap()),
        soft_uid.as_raw(),
        "the release is built as the software user"
    );

    // The leader dies here; every later command must still succeed.
    cluster.kill_leader();

    // A tree: the root requests a child, which serves the greeting.
    let greeting = "a<b&c \"q\" été";
    let port = common::free_port().to_string();
    let (_, out) = slapos_try(
        root,
        &[
            "request",
            "myinst",
            &sr,
            "--cfg",
            "client.cfg",
            "--parameters",
            &format!("greeting={greeting}"),
            &format!("port={port}"),
        ],
    );
    assert!(out.contains("State is : started."), "{out}");
    slapos_until(
        root,
        &["node", "instance", "--cfg", &cfg, "--now"],
        "the root publishing its child's URL",
        || lookup(&connection(slap, "myinst"), "child-url").is_some_and(|u| !u.is_empty()),
    );
    let root_conn = connection(slap, "myinst");
    assert_eq!(lookup(&root_conn, "greeting"), Some(greeting), "{root_conn:?}");
    // SlapOS's own recipes did it: the cookbook's publish part is what the
    // typed profiles installed (its values come from the cookbook's
    // slapconfiguration).
    let cookbook_parts = (0..3)
        .filter(|p| {
            std::fs::read_to_string(node.join(format!("srv/slappart{p}/.installed-switch-softwaretype.cfg")))
                .is_ok_and(|t| t.contains("recipe = slapos.cookbook:publish"))
        })
        .count();
    assert_eq!(cookbook_parts, 2, "the root and its child ran slapos.cookbook:publish");
    let child_url = lookup(&root_conn, "child-url").unwrap().to_string();
    assert_eq!(child_url, format!("http://{}:{port}/", child_address(slap)));
    // The child's service runs as its partition's user under supervisord.
    let page = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(body) = fetch(&child_url) {
                break body;
            }
            assert!(Instant::now() < deadline, "nothing answers at {child_url}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(String::from_utf8_lossy(&page).trim_end(), greeting);

    // The requester reads the connection parameters with the real client.
    let out = slapos(
        root,
        &[
            "request",
            "myinst",
            &sr,
            "--cfg",
            "client.cfg",
            "--parameters",
            &format!("greeting={greeting}"),
            &format!("port={port}"),
        ],
    );
    assert!(out.contains(&child_url), "{out}");

    // A shared instance attaches to the root, which publishes a URL for it.
    let (_, out) = slapos_try(
        root,
        &[
            "request",
            "web-shared",
            &sr,
            "--slave",
            "--cfg",
            "client.cfg",
            "--parameters",
            "domain=a.example",
        ],
    );
    assert!(out.contains("Instance requested"), "{out}");
    // The host publishes <child URL><shared instance's reference>.
    let shared_published = || {
        let (_, out) = slapos_try(
            root,
            &[
                "request",
                "web-shared",
                &sr,
                "--slave",
                "--cfg",
                "client.cfg",
                "--parameters",
                "domain=a.example",
            ],
        );
        out.contains(&format!("{child_url}SLAVEINST-"))
    };
    slapos_until(
        root,
        &["node", "instance", "--cfg", &cfg, "--now"],
        "the host publishing the shared instance's URL",
        shared_published,
    );

    // Every partition reported itself started.
    let busy: Vec<Value> = partitions(slap)
        .into_iter()
        .filter(|p| get(attrs(p), "_software_release_document") != &Value::None)
        .collect();
    assert_eq!(busy.len(), 2, "the root and its child hold a partition each");
    for p in &busy {
        assert!(
            attrs(p).iter().any(|(k, _)| k.as_str() == Some("_access_status")),
            "slapgrid reported each partition: {p:?}"
        );
    }

    // Usage and destruction: the whole tree goes, children first.
    slapos(root, &["node", "report", "--cfg", &cfg, "--now"]);
    let out = slapos(
        root,
        &["request", "myinst", &sr, "--cfg", "client.cfg", "--state", "destroyed"],
    );
    assert!(out.contains("State is : destroyed"), "{out}");
    slapos_until(
        root,
        &["node", "report", "--cfg", &cfg, "--now"],
        "every partition free",
        || {
            partitions(slap)
                .iter()
                .all(|p| get(attrs(p), "_software_release_document") == &Value::None)
        },
    );
    // Wiped, and the service is gone with its partition.
    assert!(fetch(&child_url).is_none(), "the child's service still answers");
    for p in 0..3 {
        let left: Vec<_> = std::fs::read_dir(node.join(format!("srv/slappart{p}")))
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            // Written by `node format` (the partition's resources), kept.
            .filter(|name| name != ".slapos-resource")
            .collect();
        assert!(left.is_empty(), "slappart{p} was not wiped: {left:?}");
    }
}

/// The IPv4 address of the partition holding the child.
fn child_address(port: u16) -> String {
    for p in partitions(port) {
        let a = attrs(&p);
        let Value::Dict(params) = get(a, "_parameter_dict") else {
            continue;
        };
        if get(params, "slap_software_type") != &Value::str("child") {
            continue;
        }
        let Value::List(ips) = get(params, "ip_list") else {
            continue;
        };
        for ip in ips {
            if let Value::List(pair) | Value::Tuple(pair) = ip {
                if let Some(addr) = pair.get(1).and_then(|v| v.as_str()) {
                    if !addr.contains(':') {
                        return addr.to_string();
                    }
                }
            }
        }
    }
    panic!("no placed child with an IPv4 address")
}
