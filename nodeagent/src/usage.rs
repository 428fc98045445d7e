//! Resource usage per partition, and the machine's capacity.
//!
//! CPU seconds and peak memory come from the partition's cgroups (v1 or v2,
//! see [`crate::cgroups`]) where the agent could make them; otherwise from
//! /proc, which every Linux has:
//! - CPU seconds: user + system time of the partition's processes and of the
//!   children they reaped (so short-lived helpers count once they exit);
//! - memory: resident bytes now, and the peak (the cgroup's, or the sum of
//!   each live process's VmHWM);
//! - disk: bytes under the partition directory (links not followed);
//! - network: bytes through the partition's tap.
//!
//! Posted to the Master as a TioXML journal (reference section 7), the
//! document `slapos node report` sends through `useComputer`.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::{Mode, NodeConfig, PartitionResource};
use crate::supervisor::pids_of_uid;

/// One partition's usage.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionUsage {
    pub partition: String,
    pub cpu_seconds: f64,
    pub memory_bytes: u64,
    pub peak_memory_bytes: u64,
    pub disk_bytes: u64,
    pub network_bytes: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn proc_cpu_seconds(pid: i32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(i) = stat.rfind(')') else { return 0.0 };
    let f: Vec<&str> = stat[i + 2..].split_whitespace().collect();
    // After the name: state(0) ... utime(11) stime(12) cutime(13) cstime(14).
    let ticks: u64 = (11..=14).filter_map(|k| f.get(k)?.parse::<u64>().ok()).sum();
    ticks as f64 / clock_ticks()
}

fn proc_status_kb(pid: i32, key: &str) -> u64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return 0;
    };
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Bytes of regular files under `dir`, without following links.
pub fn disk_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => disk_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map(|m| m.len()).unwrap_or(0),
            _ => 0,
        })
        .sum()
}

fn tap_bytes(tap: &str) -> u64 {
    ["rx_bytes", "tx_bytes"]
        .iter()
        .filter_map(|f| {
            std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/{f}"))
                .ok()?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Usage of one partition; `supervised` are its supervised pids (the only
/// ones attributable in unprivileged mode, where partitions share a user).
/// CPU time and peak memory come from the partition's cgroups when it has
/// them (every process it ever ran), else from /proc (the live ones).
pub fn measure(r: &PartitionResource, supervised: &[i32], cgroups: &crate::cgroups::Cgroups) -> PartitionUsage {
    let pids = match r.mode {
        Mode::Privileged => pids_of_uid(r.uid),
        Mode::Unprivileged => supervised.to_vec(),
    };
    let from_proc = || {
        (
            pids.iter().map(|p| proc_cpu_seconds(*p)).sum(),
            pids.iter().map(|p| proc_status_kb(*p, "VmHWM:") * 1024).sum(),
        )
    };
    // Resident now before the peak: a peak read later is never below it.
    let memory_bytes = pids.iter().map(|p| proc_status_kb(*p, "VmRSS:") * 1024).sum();
    let (cpu_seconds, peak_memory_bytes) = cgroups.read(&r.id).unwrap_or_else(from_proc);
    PartitionUsage {
        partition: r.id.clone(),
        cpu_seconds,
        memory_bytes,
        peak_memory_bytes,
        disk_bytes: disk_bytes(&r.dir),
        network_bytes: r.tap.as_deref().map(tap_bytes).unwrap_or(0),
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The TioXML journal of a computer's usage (`computer_consumption.xsd`).
pub fn journal(computer_id: &str, stop_date: &str, usages: &[PartitionUsage]) -> String {
    let mut movements = String::new();
    for u in usages {
        for (resource, title, quantity, category) in [
            (
                "CPU Consumption",
                "CPU seconds used by the partition",
                u.cpu_seconds,
                "cpu",
            ),
            (
                "Memory Usage",
                "Peak resident memory in bytes",
                u.peak_memory_bytes as f64,
                "memory",
            ),
            (
                "Disk Usage",
                "Bytes stored in the partition",
                u.disk_bytes as f64,
                "disk",
            ),
            (
                "Network Usage",
                "Bytes through the partition's tap",
                u.network_bytes as f64,
                "network",
            ),
        ] {
            movements.push_str(&format!(
                "<movement><resource>{resource}</resource><title>{title}</title><reference>{}</reference>\
                 <quantity>{quantity}</quantity><price>0.0</price><VAT>None</VAT><category>{category}</category></movement>",
                escape(&u.partition)
            ));
        }
    }
    format!(
        "<?xml version=\"1.0\"?><journal><transaction type=\"Sale Packing List\"><title>Resource consumptions</title>\
         <start_date></start_date><stop_date>{}</stop_date><reference>{}</reference><currency></currency>\
         <payment_mode></payment_mode><category></category><arrow type=\"Administration\"><source></source>\
         <destination></destination></arrow>{movements}</transaction></journal>",
        escape(stop_date),
        escape(computer_id)
    )
}

/// The machine's capacity facts reported with the computer.
pub fn machine_facts(cfg: &NodeConfig) -> BTreeMap<String, String> {
    let mut facts = BTreeMap::new();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    facts.insert("cpu_count".into(), cpus.to_string());
    if let Ok(meminfo) = std::fs::read_to_string("/proc/meminfo") {
        if let Some(kb) = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        {
            facts.insert("memory_bytes".into(), (kb * 1024).to_string());
        }
    }
    if let Ok(st) = nix::sys::statvfs::statvfs(&cfg.instance_root) {
        let total = st.blocks() * st.fragment_size();
        let free = st.blocks_available() * st.fragment_size();
        facts.insert("disk_bytes".into(), total.to_string());
        facts.insert("disk_free_bytes".into(), free.to_string());
    }
    facts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_has_the_reference_shape() {
        let u = PartitionUsage {
            partition: "slappart0".into(),
            cpu_seconds: 42.5,
            ..Default::default()
        };
        let xml = journal("COMP-1", "2026-11-25 at 15:02:03", &[u]);
        assert!(xml.starts_with("<?xml version=\"1.0\"?><journal><transaction type=\"Sale Packing List\">"));
        assert!(xml.contains("<reference>COMP-1</reference>"));
        assert!(xml.contains("<resource>CPU Consumption</resource>"));
        assert!(xml.contains("<reference>slappart0</reference><quantity>42.5</quantity>"));
        assert_eq!(xml.matches("<movement>").count(), 4);
    }

    #[test]
    fn measures_this_process() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a"), vec![0u8; 1000]).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/b"), vec![0u8; 24]).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let r = PartitionResource {
            id: "slappart0".into(),
            index: 0,
            dir: dir.path().into(),
            user: None,
            uid: 0,
            gid: 0,
            tap: None,
            ipv4: "127.0.0.1".into(),
            ipv6: None,
            port: 0,
            mode: Mode::Unprivileged,
        };
        let me = std::process::id() as i32;
        let u = measure(&r, &[me], &crate::cgroups::Cgroups::None);
        assert_eq!(u.disk_bytes, 1024);
        assert!(u.memory_bytes > 0 && u.peak_memory_bytes >= u.memory_bytes);
    }
}
