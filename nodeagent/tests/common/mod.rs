//! Shared by the node tests: a real master-node process, a real nodeagent
//! process, and SLAP calls through the agent's own client.

#![allow(dead_code)] // each test file uses its own subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use nodeagent::master::{MasterClient, MasterError};
use slap_proto::marshal::{self, Value};

/// A binary of the workspace, next to the test executable's `deps/`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        bin.display()
    );
    bin
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `nodeagent --port-base` under which the ports of `partitions`
/// partitions (the base, then every 10th port) are free.
///
/// Taken below Linux's ephemeral range (32768 and up): a port there can be
/// handed out as the source port of any outgoing connection of a test
/// running beside this one, and the instance that should listen on it then
/// fails to start (seen in CI). A counter spread by pid keeps parallel
/// tests apart.
pub fn free_port_base(partitions: u16) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    assert!(partitions <= 10, "a base is 100 ports wide");
    const LOW: u32 = 20_000;
    const SLOTS: u32 = 120;
    let start = std::process::id().wrapping_mul(31) % SLOTS;
    loop {
        let slot = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SLOTS;
        let base = (LOW + slot * 100) as u16;
        if (0..partitions).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + 10 * i)).is_ok()) {
            return base;
        }
    }
}

/// A child process, SIGKILLed when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn spawn(bin: &Path, args: &[&str], log: &Path) -> Proc {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
        Proc(Some(
            Command::new(bin)
                .args(args)
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap(),
        ))
    }

    pub fn pid(&self) -> i32 {
        self.0.as_ref().unwrap().id() as i32
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), nix::sys::signal::SIGTERM);
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A one-replica Master serving SLAP on a free port.
pub struct Master {
    pub proc: Proc,
    pub data_dir: PathBuf,
    pub listen: String,
    pub slap_port: u16,
    pub log: PathBuf,
}

impl Master {
    pub fn init(dir: &Path) -> Master {
        Self::start(dir, true)
    }

    /// A Master serving SLAP over HTTPS with client certificates.
    pub fn init_secure(dir: &Path) -> Master {
        Self::start(dir, false)
    }

    fn start(dir: &Path, insecure: bool) -> Master {
        let data_dir = dir.join("master");
        let listen = format!("127.0.0.1:{}", free_port());
        let slap_port = free_port();
        let log = dir.join("master.log");
        let slap = format!("127.0.0.1:{slap_port}");
        let mut args = vec![
            "init",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            &listen,
            "--slap-listen",
            &slap,
        ];
        if insecure {
            args.push("--insecure-http");
        }
        let proc = Proc::spawn(&workspace_bin("master-node"), &args, &log);
        let m = Master {
            proc,
            data_dir,
            listen,
            slap_port,
            log,
        };
        m.wait_ready();
        m
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.slap_port)
    }

    pub fn https_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.slap_port)
    }

    /// `master-node ARGS --peer <this replica> --token <its join token>`; stdout.
    pub fn admin(&self, args: &[&str]) -> Result<String, String> {
        let token = std::fs::read_to_string(self.data_dir.join("join-token")).map_err(|e| e.to_string())?;
        let out = Command::new(workspace_bin("master-node"))
            .args(args)
            .args(["--peer", &self.listen, "--token", token.trim()])
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn wait_ready(&self) {
        wait_for("the master's SLAP port", Duration::from_secs(30), || {
            std::net::TcpStream::connect(("127.0.0.1", self.slap_port)).is_ok()
        });
    }

    /// Restarts the replica from its data dir.
    pub fn restart(&mut self) {
        self.proc.kill();
        self.proc = Proc::spawn(
            &workspace_bin("master-node"),
            &[
                "run",
                "--data-dir",
                self.data_dir.to_str().unwrap(),
                "--slap-listen",
                &format!("127.0.0.1:{}", self.slap_port),
                "--insecure-http",
            ],
            &self.log,
        );
        self.wait_ready();
    }
}

pub fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The example release `name` of the repository, as a file URL.
pub fn example_release(name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    format!("file://{}/software/{name}/software.toml", root.display())
}

fn dict(m: &BTreeMap<&str, &str>) -> String {
    marshal::dumps(&Value::Dict(
        m.iter().map(|(k, v)| (Value::str(*k), Value::str(*v))).collect(),
    ))
    .unwrap()
}

pub async fn supply(master: &MasterClient, computer: &str, url: &str) {
    master
        .post(
            "supplySupply",
            &[("url", url), ("computer_id", computer), ("state", "available")],
        )
        .await
        .unwrap();
}

/// A user's request; Ok even while the instance is not placed (408).
pub async fn request(
    master: &MasterClient,
    url: &str,
    title: &str,
    software_type: &str,
    params: &[(&str, &str)],
    state: &str,
    shared: bool,
) {
    let params: BTreeMap<&str, &str> = params.iter().cloned().collect();
    let state = marshal::dumps(&Value::str(state)).unwrap();
    let shared = marshal::dumps(&Value::Bool(shared)).unwrap();
    let fields = [
        ("software_release", url),
        ("software_type", software_type),
        ("partition_reference", title),
        ("partition_parameter_xml", &dict(&params)),
        ("filter_xml", &dict(&BTreeMap::new())),
        ("state", &state),
        ("shared_xml", &shared),
    ];
    match master.post("requestComputerPartition", &fields).await {
        Ok(_) | Err(MasterError::Rejected { status: 408, .. }) => {}
        Err(e) => panic!("request {title}: {e}"),
    }
}

/// The connection parameters of a user's instance (a re-request with the
/// same arguments changes nothing and answers the instance).
pub async fn connection(
    master: &MasterClient,
    url: &str,
    title: &str,
    software_type: &str,
    params: &[(&str, &str)],
    shared: bool,
) -> BTreeMap<String, String> {
    let p: BTreeMap<&str, &str> = params.iter().cloned().collect();
    let state = marshal::dumps(&Value::None).unwrap();
    let shared_xml = marshal::dumps(&Value::Bool(shared)).unwrap();
    let fields = [
        ("software_release", url),
        ("software_type", software_type),
        ("partition_reference", title),
        ("partition_parameter_xml", &dict(&p)),
        ("filter_xml", &dict(&BTreeMap::new())),
        ("state", &state),
        ("shared_xml", &shared_xml),
    ];
    let Ok(body) = master.post("requestComputerPartition", &fields).await else {
        return BTreeMap::new();
    };
    let v = marshal::loads(std::str::from_utf8(&body).unwrap()).unwrap();
    let Value::Object(o) = v else { panic!("not an object") };
    let conn = o
        .attrs
        .iter()
        .find(|(k, _)| k.as_str() == Some("_connection_dict"))
        .map(|(_, v)| v);
    match conn {
        Some(Value::Dict(d)) => d
            .iter()
            .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Polls until the instance publishes `key`; returns its value.
pub async fn wait_connection(
    master: &MasterClient,
    url: &str,
    title: &str,
    software_type: &str,
    params: &[(&str, &str)],
    shared: bool,
    key: &str,
) -> String {
    let start = Instant::now();
    loop {
        if let Some(v) = connection(master, url, title, software_type, params, shared)
            .await
            .get(key)
        {
            return v.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "{title} never published {key}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// GET http://host:port/path: status and body.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let path = if path.is_empty() { "/" } else { path };
    let mut s = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(authority))
        .await
        .ok()?
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Whether partition `id` of `computer` is free at the Master.
pub async fn partition_free(master: &MasterClient, computer: &str, id: &str) -> bool {
    let Ok(Some((plan, _))) = master.computer_plan(computer, None, None).await else {
        return false;
    };
    plan.partitions.iter().any(|p| p.id == id && p.instance.is_none())
}

/// GETs `url` until it answers (a URL is published before its promises
/// passed, as in SlapOS, so it may not answer at once).
pub async fn wait_http(url: &str) -> (u16, String) {
    let start = Instant::now();
    loop {
        if let Some(answer) = http_get(url).await {
            return answer;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{url} never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
