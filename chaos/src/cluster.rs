//! A real cluster built from our binaries: master-node replicas, each in
//! its own network namespace behind its proxy, slap-gateways, and the
//! identities the workload and the simulated nodes use.
//!
//! Replica *slots* are fixed places (a namespace, an address, a proxy); the
//! replica in a slot may be replaced (a new node id) by the nemesis.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use slap_proto::cluster::cluster_client::ClusterClient;
use slap_proto::cluster::{CertificatesRequest, StatusReply, StatusRequest};
use slap_proto::master::master_client::MasterClient;
use slap_proto::tls::{ClientIdentity, Expect, Trust};
use tonic::transport::Channel;

use crate::net::Net;
use crate::proxy::Switchboard;

const CLUSTER_PORT: u16 = 7000;
const SLAP_PORT: u16 = 8000;
const PROXY_BASE: u16 = 17100;

/// Where the binaries are.
#[derive(Clone, Debug)]
pub struct Bins {
    pub master_node: PathBuf,
    pub gateway: PathBuf,
    /// This program (its `sim-node` subcommand).
    pub chaos: PathBuf,
}

impl Bins {
    /// Next to this program (cargo puts every binary of the workspace there).
    pub fn beside_me() -> anyhow::Result<Bins> {
        let me = std::env::current_exe()?;
        let dir = me.parent().context("no directory")?;
        let bins = Bins {
            master_node: dir.join("master-node"),
            gateway: dir.join("slap-gateway"),
            chaos: me.clone(),
        };
        for b in [&bins.master_node, &bins.gateway] {
            if !b.exists() {
                bail!("{} is missing: cargo build --workspace first", b.display());
            }
        }
        Ok(bins)
    }
}

/// Makes `cmd`'s process die with the suite: should the suite itself be
/// killed (SIGKILL, a crash), the kernel sends the child SIGKILL, so no
/// replica, gateway or node outlives the run that started it. (The signal
/// survives the `exec` of `ip netns exec`.)
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe { cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)) }
}

/// A process we started, killed when dropped.
pub struct Proc {
    pub child: Option<Child>,
    pub paused: bool,
    /// Docker mode: the container the process is PID 1 of. `child` is then
    /// the attached `docker start` client, which cannot pass SIGKILL or
    /// SIGSTOP on, so signals go through `docker kill`.
    pub container: Option<String>,
}

impl Proc {
    /// A process not started yet.
    pub fn none() -> Proc {
        Proc {
            child: None,
            paused: false,
            container: None,
        }
    }

    /// A process of ours, started.
    pub fn running(child: Child) -> Proc {
        Proc {
            child: Some(child),
            paused: false,
            container: None,
        }
    }

    fn pid(&self) -> Option<Pid> {
        self.child.as_ref().map(|c| Pid::from_raw(c.id() as i32))
    }

    pub fn signal(&mut self, s: Signal) {
        if self.child.is_none() {
            return;
        }
        match &self.container {
            Some(name) => {
                let _ = Command::new("docker")
                    .args(["kill", "--signal", s.as_str(), name])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status();
            }
            None => {
                if let Some(p) = self.pid() {
                    let _ = kill(p, s);
                }
            }
        }
    }

    pub fn kill(&mut self) {
        if self.child.is_some() && self.container.is_some() {
            self.signal(Signal::SIGKILL);
        }
        if let Some(mut c) = self.child.take() {
            if self.paused {
                let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.paused = false;
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        self.signal(Signal::SIGCONT);
        self.signal(Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while let Some(c) = self.child.as_mut() {
            if c.try_wait().ok().flatten().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One replica slot.
pub struct Replica {
    pub slot: usize,
    pub dir: PathBuf,
    /// Where it listens, in its namespace.
    pub listen: String,
    /// Its proxy: the address the others (and the suite) use for Raft and the cluster API.
    pub advertise: String,
    /// Its SLAP port and native API.
    pub public: String,
    pub proc: Proc,
    log: PathBuf,
}

impl Replica {
    /// The replica id held in its data dir.
    pub fn node_id(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.dir.join("replica.json")).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()?["node_id"].as_u64()
    }
}

/// The user who only misbehaves (the `abuse` fault), issued with the others.
pub const ABUSER: &str = "mallory";

/// The cluster and its doors.
pub struct Cluster {
    pub net: Net,
    pub board: Switchboard,
    pub bins: Bins,
    pub dir: PathBuf,
    pub replicas: Vec<Replica>,
    /// How many replica slots take part now (the rest are spares).
    pub token: String,
    pub ca_pem: String,
    pub ids: PathBuf,
    pub gateways: Vec<(String, Proc)>,
    pub timing: Vec<String>,
    /// The older release the replicas act as (`--act-as-version`), until
    /// the `rolling-upgrade` fault upgrades them; `None`: this build.
    pub acting: Option<u32>,
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    Ok(std::fs::OpenOptions::new().create(true).append(true).open(path)?)
}

/// Polls `check` every 100 ms until it holds or `within` passes.
pub async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        if Instant::now() > deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

impl Cluster {
    /// Makes the namespaces and proxies for `slots` replicas, founds the
    /// cluster with `members` of them, issues identities, starts `gateways`.
    #[allow(clippy::too_many_arguments)] // each is one knob of the run, named at the two call sites
    pub async fn start(
        bins: Bins,
        dir: &Path,
        slots: usize,
        members: usize,
        gateways: usize,
        seed: u64,
        docker_image: Option<&str>,
        acting: Option<u32>,
    ) -> anyhow::Result<Cluster> {
        let net = match docker_image {
            Some(image) => Net::create_docker(slots, image)?,
            None => Net::create(slots)?,
        };
        // Containers see the run's directory at the same (absolute) path.
        let dir = &std::fs::canonicalize(dir).with_context(|| format!("{}", dir.display()))?;
        let board = Switchboard::new(seed);
        let mut replicas = Vec::new();
        for slot in 1..=slots {
            let host = net.host(slot).clone();
            board.register(host.ip.into(), slot);
            let proxy_port = PROXY_BASE + slot as u16;
            let listener = tokio::net::TcpListener::bind((net.gateway_ip, proxy_port))
                .await
                .with_context(|| format!("proxy of slot {slot}"))?;
            let target = SocketAddr::new(host.ip.into(), CLUSTER_PORT);
            let b = board.clone();
            tokio::spawn(async move { b.serve(listener, target, slot).await });
            replicas.push(Replica {
                slot,
                dir: dir.join(format!("replica-{slot}")),
                listen: format!("{}:{CLUSTER_PORT}", host.ip),
                advertise: format!("{}:{proxy_port}", net.gateway_ip),
                public: format!("{}:{SLAP_PORT}", host.ip),
                proc: Proc::none(),
                log: dir.join(format!("replica-{slot}.log")),
            });
        }
        let mut c = Cluster {
            net,
            board,
            bins,
            dir: dir.to_path_buf(),
            replicas,
            token: String::new(),
            ca_pem: String::new(),
            ids: dir.join("identities"),
            gateways: Vec::new(),
            // A loaded 2-core machine running five replicas, gateways and
            // the suite: the defaults.
            timing: vec![],
            acting,
        };
        c.init_first().await?;
        for slot in 2..=members {
            c.join(slot, 1).await?;
        }
        c.issue_identities(gateways).await?;
        for g in 0..gateways {
            c.start_gateway(g)?;
        }
        Ok(c)
    }

    /// Starts `master-node ARGS` on slot's host; in Docker mode also names
    /// the container it runs in.
    fn spawn_in(&self, slot: usize, args: &[String]) -> anyhow::Result<(Child, Option<String>)> {
        let r = &self.replicas[slot - 1];
        let mut args = args.to_vec();
        if let Some(v) = self.acting {
            args.extend(["--act-as-version".to_string(), v.to_string()]);
        }
        if let Some(d) = &self.net.docker {
            let host = self.net.host(slot);
            let name = host.netns.clone();
            let _ = Command::new("docker").args(["rm", "-f", &name]).output();
            let dir = self.dir.display().to_string();
            let log = std::env::var("CHAOS_REPLICA_LOG").unwrap_or_else(|_| "info,openraft=warn".into());
            let mut create = Command::new("docker");
            create
                .args(["create", "--name", &name, "--network", &d.network, "--ip"])
                .arg(host.ip.to_string())
                .args(["--volume", &format!("{dir}:{dir}"), "--env", &format!("RUST_LOG={log}")])
                .args([
                    "--stop-timeout",
                    "5",
                    "--entrypoint",
                    "/usr/local/bin/master-node",
                    &d.image,
                ])
                .args(&args)
                .args(&self.timing);
            let out = create.output().context("docker create")?;
            if !out.status.success() {
                bail!("docker create {name}: {}", String::from_utf8_lossy(&out.stderr).trim());
            }
            let mut cmd = Command::new("docker");
            cmd.args(["start", "--attach", &name])
                .stdin(Stdio::null())
                .stdout(log_file(&r.log)?)
                .stderr(log_file(&r.log)?);
            let child = die_with_parent(&mut cmd).spawn().context("docker start")?;
            return Ok((child, Some(name)));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.net.host(slot).netns])
            .arg(&self.bins.master_node)
            .args(&args)
            .args(&self.timing)
            .env(
                "RUST_LOG",
                std::env::var("CHAOS_REPLICA_LOG").unwrap_or_else(|_| "info,openraft=warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&r.log)?);
        Ok((die_with_parent(&mut cmd).spawn().context("starting master-node")?, None))
    }

    async fn init_first(&mut self) -> anyhow::Result<()> {
        let r = &self.replicas[0];
        let args: Vec<String> = [
            "init",
            "--data-dir",
            &r.dir.display().to_string(),
            "--listen",
            &r.listen,
            "--advertise",
            &r.advertise,
            "--slap-listen",
            &r.public,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, container) = self.spawn_in(1, &args)?;
        self.replicas[0].proc.child = Some(child);
        self.replicas[0].proc.container = container;
        let token_file = self.replicas[0].dir.join("join-token");
        wait_until("the first replica", Duration::from_secs(30), || {
            let f = token_file.clone();
            async move { f.exists() }
        })
        .await?;
        self.token = std::fs::read_to_string(&token_file)?.trim().to_string();
        self.ca_pem = std::fs::read_to_string(self.replicas[0].dir.join("tls/ca.crt"))?;
        Ok(())
    }

    /// Starts a new replica in `slot` joining through the replica of slot `peer`.
    pub async fn join(&mut self, slot: usize, peer: usize) -> anyhow::Result<()> {
        self.join_within(slot, peer, Duration::from_secs(60)).await
    }

    /// [`Cluster::join`], waiting up to `within` for the new replica to be
    /// a voter (a join into a large state transfers a snapshot first).
    pub async fn join_within(&mut self, slot: usize, peer: usize, within: Duration) -> anyhow::Result<()> {
        let r = &self.replicas[slot - 1];
        let args: Vec<String> = [
            "join",
            "--peer",
            &self.replicas[peer - 1].advertise,
            "--token",
            &self.token,
            "--data-dir",
            &r.dir.display().to_string(),
            "--listen",
            &r.listen,
            "--advertise",
            &r.advertise,
            "--slap-listen",
            &r.public,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, container) = self.spawn_in(slot, &args)?;
        self.replicas[slot - 1].proc.child = Some(child);
        self.replicas[slot - 1].proc.container = container;
        let dir = self.replicas[slot - 1].dir.clone();
        wait_until(&format!("slot {slot} to join"), within, || {
            let dir = dir.clone();
            let me = &*self;
            async move {
                let Some(id) = std::fs::read_to_string(dir.join("replica.json"))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["node_id"].as_u64())
                else {
                    return false;
                };
                me.any_status()
                    .await
                    .is_some_and(|s| s.members.iter().any(|m| m.id == id && m.role == "voter"))
            }
        })
        .await
    }

    /// Restarts the replica of `slot` from its data dir.
    pub fn restart(&mut self, slot: usize) -> anyhow::Result<()> {
        let r = &self.replicas[slot - 1];
        let args: Vec<String> = [
            "run",
            "--data-dir",
            &r.dir.display().to_string(),
            "--slap-listen",
            &r.public,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (child, container) = self.spawn_in(slot, &args)?;
        self.replicas[slot - 1].proc.child = Some(child);
        self.replicas[slot - 1].proc.container = container;
        self.replicas[slot - 1].proc.paused = false;
        Ok(())
    }

    /// Runs `master-node ARGS` to the end (in slot's namespace when given).
    pub fn master_cli(&self, slot: Option<usize>, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let mut cmd = match slot {
            // Containers are reachable from the host: no namespace to enter.
            Some(_) if self.net.docker.is_some() => Command::new(&self.bins.master_node),
            Some(s) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &self.net.host(s).netns])
                    .arg(&self.bins.master_node);
                c
            }
            None => Command::new(&self.bins.master_node),
        };
        cmd.args(args).output().context("running master-node")
    }

    /// An admin command through the first live slot's proxy, with the join token.
    fn admin(&self, args: &[&str]) -> anyhow::Result<String> {
        let peer = &self.replicas[0].advertise;
        let mut full: Vec<&str> = args.to_vec();
        full.extend(["--peer", peer, "--token", &self.token]);
        let out = self.master_cli(None, &full)?;
        if !out.status.success() {
            bail!(
                "master-node {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    async fn issue_identities(&mut self, gateways: usize) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.ids)?;
        let ids = self.ids.display().to_string();
        for user in ["alice", "bob", ABUSER] {
            self.admin(&["user", "add", user, "--out", &ids])?;
        }
        // The administrator init wrote (supply, final reads of every replica).
        for f in ["admin.crt", "admin.key"] {
            std::fs::copy(self.replicas[0].dir.join("admin").join(f), self.ids.join(f))?;
        }
        for g in 0..gateways {
            let out = self.ids.join(format!("gateway-{g}"));
            self.admin(&[
                "gateway",
                "add",
                &format!("gw{g}"),
                "--host",
                "127.0.0.1",
                "--out",
                &out.display().to_string(),
            ])?;
        }
        Ok(())
    }

    /// Registers computer `id` (its certificate in `identities/<id>/`).
    pub async fn register_computer(&self, id: &str) -> anyhow::Result<PathBuf> {
        let token = self.admin(&["computer", "add", id])?;
        let pin = token.rsplit('.').next().unwrap_or_default();
        let config = slap_proto::tls::client_config(&Trust::pinned_hex(pin)?, None, Expect::AnyReplica)?;
        let channel = slap_proto::tls::channel(&self.replicas[0].advertise, config)?;
        let reply = ClusterClient::new(channel)
            .certificates(CertificatesRequest {
                action: "register".into(),
                name: id.into(),
                registration: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        let out = self.ids.join(id);
        std::fs::create_dir_all(&out)?;
        std::fs::write(out.join("computer.crt"), reply.certificate_pem)?;
        std::fs::write(out.join("computer.key"), reply.key_pem)?;
        std::fs::write(out.join("ca.crt"), reply.ca_pem)?;
        Ok(out)
    }

    fn start_gateway(&mut self, g: usize) -> anyhow::Result<()> {
        let port = free_port()?;
        let seeds = self
            .replicas
            .iter()
            .filter(|r| r.proc.child.is_some())
            .map(|r| r.public.clone())
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new(&self.bins.gateway);
        let child = die_with_parent(&mut cmd)
            .args([
                "--replicas",
                &seeds,
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--tls-dir",
                &self.ids.join(format!("gateway-{g}")).display().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join(format!("gateway-{g}.log")))?)
            .spawn()
            .context("starting slap-gateway")?;
        self.gateways.push((format!("127.0.0.1:{port}"), Proc::running(child)));
        Ok(())
    }

    /// Credentials of `name` in the identities dir (`alice`, `admin`, ...).
    pub fn identity(&self, name: &str) -> anyhow::Result<ClientIdentity> {
        let read = |f: String| std::fs::read_to_string(self.ids.join(f));
        Ok(ClientIdentity::from_pem(
            &read(format!("{name}.crt"))?,
            &read(format!("{name}.key"))?,
        )?)
    }

    pub fn trust(&self) -> anyhow::Result<Trust> {
        Ok(Trust::ca_pem(&self.ca_pem)?)
    }

    /// A native-API channel to `addr` (a gateway or a replica's public port) as `name`.
    pub fn native(&self, addr: &str, name: &str) -> anyhow::Result<MasterClient<Channel>> {
        let config =
            slap_proto::tls::client_config(&self.trust()?, Some(&self.identity(name)?), Expect::ReplicaOrGateway)?;
        Ok(MasterClient::new(slap_proto::tls::channel(addr, config)?))
    }

    /// The status as the replica of `slot` sees it.
    pub async fn status(&self, slot: usize) -> Option<StatusReply> {
        let config = slap_proto::tls::client_config(&self.trust().ok()?, None, Expect::AnyReplica).ok()?;
        let channel = slap_proto::tls::channel(&self.replicas[slot - 1].advertise, config).ok()?;
        tokio::time::timeout(
            Duration::from_millis(800),
            ClusterClient::new(channel).status(StatusRequest {}),
        )
        .await
        .ok()?
        .ok()
        .map(|r| r.into_inner())
    }

    /// The applied index and state digest of slot's replica (asked as the
    /// administrator on its public port), or `None` when it does not answer
    /// within `within`.
    pub async fn state_digest(&self, slot: usize, within: Duration) -> anyhow::Result<Option<(u64, String)>> {
        let mut client = self.native(&self.replicas[slot - 1].public, "admin")?;
        let call = client.cluster(slap_proto::master::ClusterRequest { state_digest: true });
        Ok(tokio::time::timeout(within, call)
            .await
            .ok()
            .and_then(|r| r.ok())
            .map(|v| {
                let v = v.into_inner();
                (v.applied_index, v.state_sha256)
            }))
    }

    /// The status from any running slot that answers.
    pub async fn any_status(&self) -> Option<StatusReply> {
        for r in &self.replicas {
            if r.proc.child.is_some() && !r.proc.paused {
                if let Some(s) = self.status(r.slot).await {
                    return Some(s);
                }
            }
        }
        None
    }

    /// The slot whose replica leads now, if one is known and answers.
    pub async fn leader_slot(&self) -> Option<usize> {
        for r in &self.replicas {
            if r.proc.child.is_none() || r.proc.paused {
                continue;
            }
            if let Some(s) = self.status(r.slot).await {
                if s.state == "Leader" {
                    return Some(r.slot);
                }
            }
        }
        None
    }

    /// Slots whose replica process runs (paused ones included).
    pub fn running_slots(&mut self) -> Vec<usize> {
        self.replicas
            .iter_mut()
            .filter_map(|r| r.proc.alive().then_some(r.slot))
            .collect()
    }

    /// The public addresses of the running replicas (direct doors).
    pub fn public_addrs(&mut self) -> Vec<String> {
        self.replicas
            .iter_mut()
            .filter_map(|r| r.proc.alive().then(|| r.public.clone()))
            .collect()
    }

    /// Writes the threads' stacks of slot's replica (with gdb, when there is
    /// one) into the results: what a replica that does not do what it should
    /// is doing.
    pub fn dump_stacks(&self, slot: usize, why: &str) {
        let Some(pid) = self.replicas[slot - 1].proc.child.as_ref().map(|c| c.id()) else {
            return;
        };
        // In Docker mode the child is the `docker start` client: find the replica.
        let pid = match &self.replicas[slot - 1].proc.container {
            Some(name) => match Command::new("docker")
                .args(["inspect", "--format", "{{.State.Pid}}", name])
                .output()
            {
                Ok(o) => String::from_utf8_lossy(&o.stdout).trim().parse().unwrap_or(pid),
                Err(_) => pid,
            },
            None => pid,
        };
        let out = Command::new("gdb")
            .args(["-p", &pid.to_string(), "-batch", "-ex", "thread apply all bt"])
            .output();
        let path = self.dir.join(format!("stacks-slot-{slot}.txt"));
        let text = match out {
            Ok(o) => format!("{why}\n\n{}", String::from_utf8_lossy(&o.stdout)),
            Err(e) => format!("{why}\n\n(no stacks: gdb: {e})"),
        };
        let _ = std::fs::write(&path, text);
        tracing::warn!(slot, path = %path.display(), "{why}; stacks written");
    }

    /// Stops everything, gateways first.
    pub fn shutdown(&mut self) {
        for (_, g) in &mut self.gateways {
            g.stop(Duration::from_secs(2));
        }
        for r in &mut self.replicas {
            r.proc.stop(Duration::from_secs(5));
        }
        self.net.teardown();
    }
}

/// A free TCP port on loopback.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A shared handle for the workload's doors: the gateways and the replicas.
#[derive(Clone)]
pub struct Doors {
    pub gateways: Vec<String>,
    pub replicas: Vec<String>,
    pub trust: Trust,
    pub ids: Arc<PathBuf>,
}
