//! Per-partition cgroups, for accounting: each partition's processes are put
//! in `nodeagent-<id>/<partition>` (the id: a hash of the instance root) under the CPU-accounting and memory
//! controllers, so CPU time and peak memory count every process the
//! partition ever ran, including short-lived ones /proc no longer shows.
//!
//! cgroup v2 (a unified hierarchy with the cpu and memory controllers) and
//! v1 (`cpuacct` and `memory` hierarchies, as on hybrid hosts) are both
//! read; without either, [`Cgroups::None`] and usage falls back to /proc.

use std::path::{Path, PathBuf};

/// The accounting cgroups available on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cgroups {
    /// `root` is the agent's group in the unified hierarchy.
    V2 {
        root: PathBuf,
    },
    /// The agent's group in each v1 hierarchy.
    V1 {
        cpuacct: PathBuf,
        memory: PathBuf,
    },
    None,
}

impl Cgroups {
    /// What this machine offers, for an agent whose group is `group` (one
    /// per agent, so agents with different instance roots never share a
    /// partition's counters). Needs root to be of use.
    pub fn detect(group: &str) -> Cgroups {
        let base = Path::new("/sys/fs/cgroup");
        if let Ok(c) = std::fs::read_to_string(base.join("cgroup.controllers")) {
            let has = |k: &str| c.split_whitespace().any(|w| w == k);
            if has("cpu") && has("memory") {
                return Cgroups::V2 { root: base.join(group) };
            }
        }
        let (cpuacct, memory) = (base.join("cpuacct"), base.join("memory"));
        if cpuacct.join("cpuacct.usage").exists() && memory.join("memory.max_usage_in_bytes").exists() {
            return Cgroups::V1 {
                cpuacct: cpuacct.join(group),
                memory: memory.join(group),
            };
        }
        Cgroups::None
    }

    fn dirs(&self, partition: &str) -> Vec<PathBuf> {
        match self {
            Cgroups::V2 { root } => vec![root.join(partition)],
            Cgroups::V1 { cpuacct, memory } => vec![cpuacct.join(partition), memory.join(partition)],
            Cgroups::None => vec![],
        }
    }

    /// Creates the partition's cgroups; returns the `cgroup.procs` files a
    /// new process of the partition joins. In v1 they are given to the
    /// partition's user, so a process can move itself before it runs its
    /// program (v2 forbids that without delegation: the agent moves it).
    pub fn prepare(&self, partition: &str, uid: u32) -> Vec<PathBuf> {
        if let Cgroups::V2 { root } = self {
            // Let the group's children use the controllers.
            let _ = std::fs::create_dir_all(root);
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory");
        }
        let procs: Vec<PathBuf> = self
            .dirs(partition)
            .into_iter()
            .filter(|d| std::fs::create_dir_all(d).is_ok())
            .map(|d| d.join("cgroup.procs"))
            .collect();
        if matches!(self, Cgroups::V1 { .. }) {
            for p in &procs {
                let _ = std::os::unix::fs::chown(p, Some(uid), None);
            }
        }
        procs
    }

    /// Moves `pid` into the partition's cgroups (as root; best effort).
    pub fn join(&self, procs: &[PathBuf], pid: i32) {
        for p in procs {
            let _ = std::fs::write(p, pid.to_string());
        }
    }

    /// (CPU seconds, peak memory bytes) of the partition, when accounted.
    pub fn read(&self, partition: &str) -> Option<(f64, u64)> {
        let read = |p: PathBuf| std::fs::read_to_string(p).ok();
        match self {
            Cgroups::V2 { root } => {
                let dir = root.join(partition);
                let stat = read(dir.join("cpu.stat"))?;
                let usec: u64 = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("usage_usec "))
                    .and_then(|v| v.trim().parse().ok())?;
                let peak = read(dir.join("memory.peak"))
                    .or_else(|| read(dir.join("memory.current")))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                Some((usec as f64 / 1e6, peak))
            }
            Cgroups::V1 { cpuacct, memory } => {
                let ns: u64 = read(cpuacct.join(partition).join("cpuacct.usage"))?
                    .trim()
                    .parse()
                    .ok()?;
                let peak = read(memory.join(partition).join("memory.max_usage_in_bytes"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                Some((ns as f64 / 1e9, peak))
            }
            Cgroups::None => None,
        }
    }

    /// Removes the partition's cgroups (they must be empty: after a destroy).
    pub fn remove(&self, partition: &str) {
        for d in self.dirs(partition) {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// Removes the agent's groups once every partition's is gone.
    pub fn remove_all(&self, partitions: impl IntoIterator<Item = String>) {
        for p in partitions {
            self.remove(&p);
        }
        match self {
            Cgroups::V2 { root } => {
                let _ = std::fs::remove_dir(root);
            }
            Cgroups::V1 { cpuacct, memory } => {
                let _ = std::fs::remove_dir(cpuacct);
                let _ = std::fs::remove_dir(memory);
            }
            Cgroups::None => {}
        }
    }
}
