//! What a node is: its computer id, where partitions and software live, the
//! address ranges partitions draw from, and whether the agent may create
//! users, taps and addresses (privileged) or only directories.
//!
//! Every option has a flag and a `NODEAGENT_*` environment variable, so a
//! systemd unit can carry the configuration in an `EnvironmentFile`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};

/// Whether the agent may change the machine beyond its own directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// As root: users, groups, taps and addresses per partition.
    Privileged,
    /// As anyone: directories only; every partition runs as the agent's user on
    /// one address (127.0.0.1, or --unprivileged-address) with its own ports.
    /// For development, demos and tests.
    Unprivileged,
}

/// The node's configuration.
#[derive(Debug, Clone, Args)]
pub struct NodeConfig {
    /// This computer's id at the Master (COMP-...).
    #[arg(long, env = "NODEAGENT_COMPUTER_ID", default_value = "local-node")]
    pub computer_id: String,
    /// Where partitions live (one directory per partition).
    #[arg(long, env = "NODEAGENT_INSTANCE_ROOT", default_value = "/srv/slapgrid")]
    pub instance_root: PathBuf,
    /// Where software releases are installed (one directory per release).
    #[arg(long, env = "NODEAGENT_SOFTWARE_ROOT", default_value = "/opt/slapgrid")]
    pub software_root: PathBuf,
    /// How many partitions this node offers.
    #[arg(long, env = "NODEAGENT_PARTITIONS", default_value_t = 10)]
    pub partitions: u32,
    /// privileged (root: users, taps, addresses) or unprivileged (directories
    /// only). Default: privileged when run as root.
    #[arg(long, env = "NODEAGENT_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// Partition users are PREFIX0, PREFIX1, ...
    #[arg(long, env = "NODEAGENT_USER_PREFIX", default_value = "slapuser")]
    pub user_prefix: String,
    /// Tap devices are PREFIX0, PREFIX1, ... (at most 15 characters in all).
    #[arg(long, env = "NODEAGENT_TAP_PREFIX", default_value = "slaptap")]
    pub tap_prefix: String,
    /// The user software releases are built as.
    #[arg(long, env = "NODEAGENT_SOFTWARE_USER", default_value = "slapsoft")]
    pub software_user: String,
    /// Interface partition addresses are added to.
    #[arg(long, env = "NODEAGENT_INTERFACE", default_value = "lo")]
    pub interface: String,
    /// Private IPv4 range: partition N gets its (N+1)th address.
    #[arg(long, env = "NODEAGENT_IPV4_RANGE", default_value = "10.0.0.0/16", value_parser = parse_v4_range)]
    pub ipv4_range: (Ipv4Addr, u8),
    /// IPv6 range: partition N gets its (N+1)th address.
    #[arg(long, env = "NODEAGENT_IPV6_RANGE", default_value = "fd5a:9000::/64", value_parser = parse_v6_range)]
    pub ipv6_range: (Ipv6Addr, u8),
    /// Partition N owns the ten ports from BASE + 10 N.
    #[arg(long, env = "NODEAGENT_PORT_BASE", default_value_t = 20000)]
    pub port_base: u16,
    /// Unprivileged mode: the address every partition serves on (this
    /// machine's own, so other machines reach its instances; default
    /// loopback, reachable from this machine only).
    #[arg(long, env = "NODEAGENT_UNPRIVILEGED_ADDRESS", default_value = "127.0.0.1")]
    pub unprivileged_address: Ipv4Addr,
    /// Allocation categories reported to the Master, as key=value
    /// (region=eu-west, cpu_type=x86_64, network_guid=...). Repeatable.
    #[arg(long = "category", env = "NODEAGENT_CATEGORIES", value_delimiter = ',', value_parser = parse_pair)]
    pub categories: Vec<(String, String)>,
}

impl NodeConfig {
    /// The mode in effect: the configured one, or privileged as root.
    pub fn mode(&self) -> Mode {
        self.mode.unwrap_or(if nix::unistd::geteuid().is_root() {
            Mode::Privileged
        } else {
            Mode::Unprivileged
        })
    }

    /// Categories as a map.
    pub fn category_map(&self) -> BTreeMap<String, String> {
        self.categories.iter().cloned().collect()
    }

    /// The directory of partition `index`.
    pub fn partition_dir(&self, index: u32) -> PathBuf {
        self.instance_root.join(partition_id(index))
    }

    /// The agent's own bookkeeping under the instance root.
    pub fn agent_dir(&self) -> PathBuf {
        self.instance_root.join(".nodeagent")
    }

    /// Where the release at `url` is installed.
    pub fn software_dir(&self, url: &str) -> PathBuf {
        self.software_root.join(software_key(url))
    }

    /// Checks what clap cannot: name lengths and range sizes.
    pub fn validate(&self) -> Result<(), String> {
        let last = self.partitions.saturating_sub(1);
        if format!("{}{last}", self.tap_prefix).len() > 15 {
            return Err(format!(
                "tap prefix {:?} is too long: Linux device names hold at most 15 characters",
                self.tap_prefix
            ));
        }
        if u32::from(self.port_base) + 10 * self.partitions > 65535 {
            return Err(format!(
                "--port-base {} leaves no room for {} partitions of ten ports each",
                self.port_base, self.partitions
            ));
        }
        let v4_hosts = 1u64 << (32 - self.ipv4_range.1 as u64).min(63);
        if v4_hosts < u64::from(self.partitions) + 2 {
            return Err(format!(
                "--ipv4-range /{} is too small for {} partitions",
                self.ipv4_range.1, self.partitions
            ));
        }
        if self.instance_root.as_os_str().is_empty() || self.software_root.as_os_str().is_empty() {
            return Err("--instance-root and --software-root must not be empty".into());
        }
        Ok(())
    }
}

/// `slappartN`.
pub fn partition_id(index: u32) -> String {
    format!("slappart{index}")
}

/// The index N of `slappartN`.
pub fn partition_index(id: &str) -> Option<u32> {
    id.strip_prefix("slappart")?.parse().ok()
}

/// The directory name of a release: the first 32 hex digits of the SHA-256 of
/// its URL (stable, filesystem-safe, no collisions in practice).
pub fn software_key(url: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(url.as_bytes())[..16])
}

/// What format decided for one partition; written to its `.slapos-resource`
/// and read back by every later run, so the agent never recomputes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionResource {
    pub id: String,
    pub index: u32,
    pub dir: PathBuf,
    /// The Unix user processes run as (None in unprivileged mode: the agent's).
    pub user: Option<String>,
    pub uid: u32,
    pub gid: u32,
    pub tap: Option<String>,
    pub ipv4: String,
    pub ipv6: Option<String>,
    /// First of the partition's ten ports.
    pub port: u16,
    pub mode: Mode,
}

impl PartitionResource {
    /// Reads `.slapos-resource` of the partition at `dir`.
    pub fn load(dir: &Path) -> std::io::Result<PartitionResource> {
        let text = std::fs::read_to_string(dir.join(".slapos-resource"))?;
        serde_json::from_str(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("{s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.trim().to_string(), v.trim().to_string()))
}

fn parse_v4_range(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or("expected ADDRESS/PREFIX, such as 10.0.0.0/16")?;
    let addr: Ipv4Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let prefix: u8 = p.parse().map_err(|_| format!("{p} is not a prefix length"))?;
    if prefix > 30 {
        return Err("the IPv4 prefix must be at most /30".into());
    }
    Ok((addr, prefix))
}

fn parse_v6_range(s: &str) -> Result<(Ipv6Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or("expected ADDRESS/PREFIX, such as fd5a:9000::/64")?;
    let addr: Ipv6Addr = a.parse().map_err(|e| format!("{a}: {e}"))?;
    let prefix: u8 = p.parse().map_err(|_| format!("{p} is not a prefix length"))?;
    if prefix > 120 {
        return Err("the IPv6 prefix must be at most /120".into());
    }
    Ok((addr, prefix))
}

/// The (index+1)th address of an IPv4 range.
pub fn nth_v4((base, _): (Ipv4Addr, u8), index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(base).wrapping_add(index + 1))
}

/// The (index+1)th address of an IPv6 range.
pub fn nth_v6((base, _): (Ipv6Addr, u8), index: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(base).wrapping_add(u128::from(index) + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_keys() {
        let v4 = parse_v4_range("10.1.0.0/16").unwrap();
        assert_eq!(nth_v4(v4, 0).to_string(), "10.1.0.1");
        assert_eq!(nth_v4(v4, 299).to_string(), "10.1.1.44");
        let v6 = parse_v6_range("fd5a:9000::/64").unwrap();
        assert_eq!(nth_v6(v6, 9).to_string(), "fd5a:9000::a");
        assert!(parse_v4_range("10.0.0.0").is_err());
        assert!(parse_v4_range("10.0.0.0/31").is_err());
        assert_eq!(software_key("http://a/b").len(), 32);
        assert_ne!(software_key("http://a/b"), software_key("http://a/c"));
        assert_eq!(partition_index("slappart12"), Some(12));
        assert_eq!(partition_index("other"), None);
        assert!(parse_pair("region").is_err());
        assert_eq!(parse_pair("region=eu").unwrap(), ("region".into(), "eu".into()));
    }
}
