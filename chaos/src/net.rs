//! One network namespace per replica, joined by veth pairs to a bridge in
//! the root namespace, where the suite, its proxies and the gateways run.
//!
//! ```text
//!   root namespace: bridge <prefix>br  10.77.N.1/24   (suite, proxies, gateways)
//!        |-- veth <prefix>r1 ==== eth0 in netns <prefix>-r1   10.77.N.11
//!        |-- veth <prefix>r2 ==== eth0 in netns <prefix>-r2   10.77.N.12
//!        ...
//! ```
//!
//! Isolating a replica takes its veth down: everything it sends or should
//! receive is dropped by the kernel, as when a machine's cable is pulled.
//! Finer faults (one link, one direction, delay, loss) go through the
//! proxies of [`crate::proxy`].
//!
//! Everything created is recorded in `/run/slapos-chaos/<pid>.json` before it
//! is created; [`Net`]'s drop removes it, and a later run removes what a
//! run killed before it could clean up left behind.
//!
//! The second mode ([`Net::create_docker`]) puts each replica in a Docker
//! container instead, on a Docker bridge network of its own (10.78.N.0/24,
//! the host at .1 where the suite and its proxies listen), from an image
//! built from our binaries (`deploy/build-images`). Isolating a replica
//! disconnects its container from that network.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

const STATE_DIR: &str = "/run/slapos-chaos";

/// A replica's host: its namespace, its veth's root end, its address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub netns: String,
    pub veth: String,
    pub ip: Ipv4Addr,
}

/// What a run created, as recorded for cleanup.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Created {
    pid: u32,
    bridge: Option<String>,
    netns: Vec<String>,
    veths: Vec<String>,
    #[serde(default)]
    docker_network: Option<String>,
    #[serde(default)]
    containers: Vec<String>,
}

/// Docker mode: the network and the image the replicas' containers use.
#[derive(Debug, Clone)]
pub struct Docker {
    pub network: String,
    pub image: String,
}

/// The namespaces and links of one run.
pub struct Net {
    pub bridge: String,
    /// The bridge's address: where the suite and its proxies listen.
    pub gateway_ip: Ipv4Addr,
    pub hosts: Vec<Host>,
    /// Set in Docker mode; `Host::netns` is then the container's name.
    pub docker: Option<Docker>,
    prefix: String,
    subnet: u8,
    created: Created,
    state_file: PathBuf,
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .context("running docker (Debian package docker.io; deploy/build-images starts the engine)")?;
    if !out.status.success() {
        bail!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn docker_quiet(args: &[&str]) {
    let _ = Command::new("docker").args(args).output();
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (package iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Removes what earlier runs, killed before they could clean up, left.
pub fn clean_stale() {
    let Ok(dir) = std::fs::read_dir(STATE_DIR) else { return };
    for entry in dir.flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        let Ok(c) = serde_json::from_str::<Created>(&text) else {
            continue;
        };
        if pid_alive(c.pid) && c.pid != std::process::id() {
            continue;
        }
        tracing::info!(pid = c.pid, "removing namespaces left by an earlier run");
        remove(&c);
        let _ = std::fs::remove_file(entry.path());
    }
}

fn remove(c: &Created) {
    for name in &c.containers {
        docker_quiet(&["rm", "-f", name]);
    }
    if let Some(n) = &c.docker_network {
        docker_quiet(&["network", "rm", n]);
    }
    for v in &c.veths {
        ip_quiet(&["link", "del", v]);
    }
    for ns in &c.netns {
        // Processes still in it keep it alive until they exit; the suite
        // kills its processes before this.
        ip_quiet(&["netns", "del", ns]);
    }
    if let Some(b) = &c.bridge {
        ip_quiet(&["link", "del", b]);
    }
}

impl Net {
    /// Docker mode: a network of our own for `n` containers of `image`.
    pub fn create_docker(n: usize, image: &str) -> anyhow::Result<Net> {
        clean_stale();
        docker(&["image", "inspect", "--format", "{{.Id}}", image])
            .with_context(|| format!("no image {image}: build it from these binaries with deploy/build-images TAG"))?;
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let pid = std::process::id();
        let subnet = (pid % 200) as u8 + 20;
        let prefix = format!("chd{:x}", pid % 0xfff);
        let mut net = Net {
            bridge: format!("{prefix}br"),
            gateway_ip: Ipv4Addr::new(10, 78, subnet, 1),
            hosts: Vec::new(),
            docker: Some(Docker {
                network: prefix.clone(),
                image: image.to_string(),
            }),
            prefix: prefix.clone(),
            subnet,
            created: Created {
                pid,
                docker_network: Some(prefix.clone()),
                ..Default::default()
            },
            state_file: PathBuf::from(STATE_DIR).join(format!("{pid}.json")),
        };
        net.record()?;
        docker(&[
            "network",
            "create",
            "--driver",
            "bridge",
            "--subnet",
            &format!("10.78.{subnet}.0/24"),
            "--gateway",
            &net.gateway_ip.to_string(),
            "-o",
            &format!("com.docker.network.bridge.name={}", net.bridge),
            &prefix,
        ])?;
        for i in 1..=n {
            net.add_host(i)?;
        }
        Ok(net)
    }

    /// Creates `n` hosts. Needs root (CAP_NET_ADMIN).
    pub fn create(n: usize) -> anyhow::Result<Net> {
        if !nix::unistd::Uid::effective().is_root() {
            bail!("the chaos suite makes network namespaces: run it as root");
        }
        clean_stale();
        std::fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
        let pid = std::process::id();
        // A subnet and names of our own: several runs may share a machine.
        let subnet = (pid % 200) as u8 + 20;
        let prefix = format!("chz{:x}", pid % 0xfff);
        let mut net = Net {
            bridge: format!("{prefix}br"),
            gateway_ip: Ipv4Addr::new(10, 77, subnet, 1),
            hosts: Vec::new(),
            docker: None,
            prefix,
            subnet,
            created: Created {
                pid,
                ..Default::default()
            },
            state_file: PathBuf::from(STATE_DIR).join(format!("{pid}.json")),
        };
        net.created.bridge = Some(net.bridge.clone());
        net.record()?;
        let bridge = net.bridge.clone();
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}/24", net.gateway_ip), "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 1..=n {
            net.add_host(i)?;
        }
        Ok(net)
    }

    fn record(&self) -> anyhow::Result<()> {
        std::fs::write(&self.state_file, serde_json::to_vec(&self.created)?)
            .with_context(|| format!("writing {}", self.state_file.display()))
    }

    /// Adds host `i` (addresses 10.77.N.(10+i), or 10.78.N.(10+i) for a container).
    pub fn add_host(&mut self, i: usize) -> anyhow::Result<Host> {
        if self.docker.is_some() {
            // The container itself is made when its replica starts.
            let host = Host {
                netns: format!("{}-r{i}", self.prefix),
                veth: String::new(),
                ip: Ipv4Addr::new(10, 78, self.subnet, 10 + i as u8),
            };
            self.created.containers.push(host.netns.clone());
            self.record()?;
            self.hosts.push(host.clone());
            return Ok(host);
        }
        let host = Host {
            netns: format!("{}-r{i}", self.prefix),
            veth: format!("{}r{i}", self.prefix),
            ip: Ipv4Addr::new(10, 77, self.subnet, 10 + i as u8),
        };
        self.created.netns.push(host.netns.clone());
        self.created.veths.push(host.veth.clone());
        self.record()?;
        let peer = format!("{}p{i}", self.prefix);
        ip(&["netns", "add", &host.netns])?;
        ip(&["link", "add", &host.veth, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &host.netns])?;
        ip(&["link", "set", &host.veth, "master", &self.bridge])?;
        ip(&["link", "set", &host.veth, "up"])?;
        let ns = |args: &[&str]| {
            let mut full = vec!["-n", host.netns.as_str()];
            full.extend_from_slice(args);
            ip(&full)
        };
        ns(&["link", "set", "lo", "up"])?;
        ns(&["link", "set", &peer, "name", "eth0"])?;
        ns(&["addr", "add", &format!("{}/24", host.ip), "dev", "eth0"])?;
        ns(&["link", "set", "eth0", "up"])?;
        ns(&["route", "add", "default", "via", &self.gateway_ip.to_string()])?;
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// The host of replica slot `i` (1-based).
    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i - 1]
    }

    /// Cuts host `i` off the network (its veth down, or its container
    /// disconnected).
    pub fn isolate(&self, i: usize) -> anyhow::Result<()> {
        match &self.docker {
            Some(d) => docker(&["network", "disconnect", "--force", &d.network, &self.host(i).netns]).map(drop),
            None => ip(&["link", "set", &self.host(i).veth, "down"]),
        }
    }

    /// Puts host `i` back on the network.
    pub fn reconnect(&self, i: usize) -> anyhow::Result<()> {
        match &self.docker {
            Some(d) => {
                let host = self.host(i);
                let connected = docker(&["inspect", "--format", "{{json .NetworkSettings.Networks}}", &host.netns])
                    .is_ok_and(|n| n.contains(&format!("\"{}\"", d.network)));
                if connected {
                    return Ok(());
                }
                docker(&[
                    "network",
                    "connect",
                    "--ip",
                    &host.ip.to_string(),
                    &d.network,
                    &host.netns,
                ])
                .map(drop)
            }
            None => ip(&["link", "set", &self.host(i).veth, "up"]),
        }
    }

    /// Removes everything this run created.
    pub fn teardown(&mut self) {
        remove(&self.created);
        self.created = Created::default();
        let _ = std::fs::remove_file(&self.state_file);
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.teardown();
    }
}
