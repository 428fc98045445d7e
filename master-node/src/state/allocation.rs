//! Where an instance goes: the SLA filter (reference §3.4) and the choice of
//! a partition among those that match.
//!
//! The choice is deterministic, because every replica makes it inside
//! `apply`: it depends only on the state and the log index. To spread load it
//! prefers the matching computer with the fewest busy partitions, and breaks
//! ties by rotating through the tied computers with the log index, so equal
//! computers fill evenly instead of the first one filling up.

use std::collections::BTreeSet;

use super::model::*;
use super::Master;

/// SLA keys that restrict the computer through its categories.
pub const CATEGORY_KEYS: &[&str] = &[
    "group",
    "cpu_core",
    "cpu_frequency",
    "cpu_type",
    "local_area_network_type",
    "region",
    "memory_size",
    "memory_type",
    "storage_capacity",
    "storage_interface",
    "storage_redundancy",
];

/// SLA keys passed through to the node, with no effect on placement.
pub const PASSTHROUGH_KEYS: &[&str] = &[
    "retention_delay",
    "fw_restricted_access",
    "fw_authorized_sources",
    "fw_rejected_sources",
];

/// An SLA read and checked.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Filter {
    pub computer_guid: Option<String>,
    pub instance_guid: Option<String>,
    pub network_guid: Option<String>,
    pub project_guid: Option<String>,
    pub unique_by_network: bool,
    pub capability: Option<String>,
    pub categories: Vec<(String, String)>,
}

impl Filter {
    /// Reads an SLA. An unknown key (or a key that does not apply to this
    /// kind of instance) makes placement impossible, as in SlapOS; the error
    /// says which key.
    pub fn parse(sla: &Params, shared: bool) -> Result<Filter, String> {
        let mut f = Filter::default();
        for (key, value) in sla {
            match key.as_str() {
                "computer_guid" => f.computer_guid = Some(value.clone()),
                "instance_guid" if shared => f.instance_guid = Some(value.clone()),
                "instance_guid" => {
                    return Err(
                        "SLA key instance_guid only applies to shared instances; placement is impossible".into(),
                    )
                }
                "network_guid" => f.network_guid = Some(value.clone()),
                "project_guid" => f.project_guid = Some(value.clone()),
                "mode" if value == "unique_by_network" => f.unique_by_network = true,
                "mode" => {
                    return Err(format!(
                        "SLA mode {value:?} is unknown (only unique_by_network is); placement is impossible"
                    ))
                }
                "capability" => f.capability = Some(value.clone()),
                k if CATEGORY_KEYS.contains(&k) => f.categories.push((key.clone(), value.clone())),
                k if PASSTHROUGH_KEYS.contains(&k) => {}
                _ => return Err(format!("SLA key {key:?} is unknown; placement is impossible")),
            }
        }
        Ok(f)
    }

    /// Whether `computer` satisfies the computer-level keys.
    pub fn accepts_computer(&self, computer: &Computer) -> bool {
        let cat = |k: &str| computer.categories.get(k);
        self.computer_guid.as_ref().is_none_or(|g| *g == computer.id)
            && self
                .network_guid
                .as_ref()
                .is_none_or(|g| cat("network_guid") == Some(g))
            && self
                .project_guid
                .as_ref()
                .is_none_or(|g| cat("project_guid") == Some(g))
            && self.categories.iter().all(|(k, v)| cat(k) == Some(v))
    }

    /// Whether `partition` satisfies the capability rule: a requested
    /// capability must be declared; partitions declaring capabilities take
    /// only instances that ask for one of them.
    pub fn accepts_partition(&self, partition: &Partition) -> bool {
        match &self.capability {
            Some(c) => partition.capabilities.contains(c),
            None => partition.capabilities.is_empty(),
        }
    }
}

/// The network a computer belongs to, for `mode=unique_by_network`; a
/// computer without one is a network of its own.
pub fn network_of(computer: &Computer) -> String {
    computer
        .categories
        .get("network_guid")
        .cloned()
        .unwrap_or_else(|| format!("computer:{}", computer.id))
}

impl Master {
    /// Picks a free partition for a new (non-shared) instance of `release`
    /// in tree `root`, or says why there is none.
    pub(crate) fn choose_partition(
        &self,
        filter: &Filter,
        release: &str,
        root: &str,
        seq: u64,
    ) -> Result<(ComputerId, PartitionId), String> {
        let used_networks: BTreeSet<String> = if filter.unique_by_network {
            self.instances
                .values()
                .filter(|i| i.root == root)
                .filter_map(|i| i.partition.as_ref())
                .filter_map(|(c, _)| self.computers.get(c))
                .map(network_of)
                .collect()
        } else {
            BTreeSet::new()
        };
        let mut best: Vec<(usize, &Computer, &Partition)> = Vec::new();
        let mut best_busy = usize::MAX;
        let mut supplied_anywhere = false;
        for computer in self.computers.values() {
            let supplied = self
                .installations
                .get(&(computer.id.clone(), release.to_string()))
                .is_some_and(|s| s.requested == SupplyState::Available);
            supplied_anywhere |= supplied;
            if !supplied || !filter.accepts_computer(computer) || used_networks.contains(&network_of(computer)) {
                continue;
            }
            let mut busy = 0;
            let mut first_free = None;
            for pid in &computer.partitions {
                let Some(p) = self.partitions.get(&(computer.id.clone(), pid.clone())) else {
                    continue;
                };
                match p.state {
                    SlapState::Busy => busy += 1,
                    SlapState::Free if first_free.is_none() && filter.accepts_partition(p) => first_free = Some(p),
                    SlapState::Free => {}
                }
            }
            let Some(free) = first_free else { continue };
            if busy < best_busy {
                best_busy = busy;
                best.clear();
            }
            if busy == best_busy {
                best.push((busy, computer, free));
            }
        }
        if best.is_empty() {
            return Err(if supplied_anywhere {
                format!("no free partition matches the SLA on the computers that have {release} supplied")
            } else {
                format!("no computer has {release} supplied")
            });
        }
        let (_, computer, partition) = best[(seq % best.len() as u64) as usize];
        Ok((computer.id.clone(), partition.id.clone()))
    }

    /// Finds the host of a new shared instance: the instance named by
    /// `instance_guid`, or else the first placed, live instance of the same
    /// release and software type on an accepted computer.
    pub(crate) fn choose_host(
        &self,
        filter: &Filter,
        release: &str,
        software_type: &str,
    ) -> Result<InstanceId, String> {
        let usable = |i: &Instance| {
            !i.shared
                && i.requested_state != RequestedState::Destroyed
                && i.partition
                    .as_ref()
                    .and_then(|(c, _)| self.computers.get(c))
                    .is_some_and(|c| filter.accepts_computer(c))
        };
        if let Some(guid) = &filter.instance_guid {
            return match self.instances.get(guid) {
                Some(host) if usable(host) => Ok(host.id.clone()),
                Some(_) => Err(format!(
                    "instance {guid} named by instance_guid cannot host shared instances now"
                )),
                None => Err(format!("instance {guid} named by instance_guid does not exist")),
            };
        }
        let mut hosts: Vec<&Instance> = self
            .instances
            .values()
            .map(|i| &**i)
            .filter(|i| usable(i) && i.software_release == release && i.software_type == software_type)
            .collect();
        hosts.sort_by(|a, b| a.partition.cmp(&b.partition));
        hosts.first().map(|h| h.id.clone()).ok_or_else(|| {
            format!("no started instance of {release} (type {software_type:?}) can host this shared instance")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sla(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn unknown_key_makes_placement_impossible() {
        let err = Filter::parse(&sla(&[("colour", "blue")]), false).unwrap_err();
        assert!(err.contains("colour"), "{err}");
        assert!(Filter::parse(&sla(&[("mode", "anywhere")]), false).is_err());
        assert!(Filter::parse(&sla(&[("instance_guid", "SOFTINST-1")]), false).is_err());
        assert!(Filter::parse(&sla(&[("instance_guid", "SOFTINST-1")]), true).is_ok());
    }

    #[test]
    fn categories_and_passthrough() {
        let f = Filter::parse(&sla(&[("region", "eu"), ("retention_delay", "3")]), false).unwrap();
        assert_eq!(f.categories, vec![("region".into(), "eu".into())]);
        let mut c = Computer {
            id: "COMP-1".into(),
            address: String::new(),
            netmask: String::new(),
            capacity: Params::new(),
            categories: sla(&[("region", "eu")]),
            partitions: vec![],
            revision: 0,
        };
        assert!(f.accepts_computer(&c));
        c.categories = sla(&[("region", "us")]);
        assert!(!f.accepts_computer(&c));
    }
}
