//! Computers and software: a node's format (its partitions), supplies of
//! software releases and what nodes report of them. Each change here is
//! read back into the placement index.
//!
//! Part of the state machine: no I/O, no clock; imports only the state.

use std::collections::BTreeSet;

use super::*;

impl Master {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn set_computer(
        &mut self,
        seq: u64,
        now: u64,
        id: &str,
        address: &str,
        netmask: &str,
        capacity: &Params,
        categories: &Params,
        specs: &[PartitionSpec],
    ) -> Reply {
        if id.trim().is_empty() {
            return invalid("a computer needs a non-empty reference");
        }
        let mut seen = BTreeSet::new();
        for spec in specs {
            if spec.id.trim().is_empty() {
                return invalid(format!("computer {id}: a partition has an empty reference"));
            }
            if !seen.insert(spec.id.as_str()) {
                return invalid(format!("computer {id}: partition {} is listed twice", spec.id));
            }
        }
        let old_list = self.computers.get(id).map(|c| c.partitions.clone()).unwrap_or_default();
        let mut list: Vec<PartitionId> = specs.iter().map(|s| s.id.clone()).collect();
        for old in old_list {
            if seen.contains(old.as_str()) {
                continue;
            }
            let key = (id.to_string(), old.clone());
            match self.partitions.get(&key).map(|p| p.state) {
                // A busy partition is never dropped by a format: its instance
                // must be destroyed through the Master first.
                Some(SlapState::Busy) => list.push(old),
                _ => {
                    self.partitions.remove(&key);
                    self.dirty.insert(Dirty::Partition(key.0, key.1));
                }
            }
        }
        for spec in specs {
            let key = (id.to_string(), spec.id.clone());
            let entry = self.partitions.entry(key.clone()).or_insert_with(|| Partition {
                computer: id.to_string(),
                id: spec.id.clone(),
                state: SlapState::Free,
                addresses: vec![],
                tap: None,
                user: None,
                capabilities: vec![],
                instance: None,
            });
            entry.addresses = spec.addresses.clone();
            entry.tap = spec.tap.clone();
            entry.user = spec.user.clone();
            entry.capabilities = spec.capabilities.clone();
            self.dirty.insert(Dirty::Partition(key.0, key.1));
        }
        let old_revision = self.computers.get(id).map(|c| c.revision);
        self.index_revision(id, old_revision, seq);
        self.computers.insert(
            id.to_string(),
            Computer {
                id: id.to_string(),
                address: address.to_string(),
                netmask: netmask.to_string(),
                capacity: capacity.clone(),
                categories: categories.clone(),
                partitions: list,
                revision: seq,
            },
        );
        self.dirty.insert(Dirty::Computer(id.to_string()));
        self.refresh_placement(id);
        self.place_pending(seq, now);
        Reply::Done
    }

    pub(super) fn supply(&mut self, seq: u64, now: u64, computer: &str, url: &str, state: SupplyState) -> Reply {
        if url.trim().is_empty() {
            return invalid("a software release URL must not be empty");
        }
        if !self.computers.contains_key(computer) {
            return refused_not_found(format!("computer {computer} does not exist"));
        }
        let key = (computer.to_string(), url.to_string());
        let changed = self.installations.get(&key).is_none_or(|s| s.requested != state);
        if changed {
            let entry = self
                .installations
                .entry(key.clone())
                .or_insert_with(|| SoftwareInstallation {
                    computer: computer.to_string(),
                    url: url.to_string(),
                    requested: state,
                    reported: None,
                });
            entry.requested = state;
            self.dirty.insert(Dirty::Installation(key.0, key.1));
            self.refresh_placement(computer);
            self.touch_computer(seq, computer);
            if state == SupplyState::Available {
                self.place_pending(seq, now);
            }
        }
        Reply::Done
    }

    pub(super) fn report_software(&mut self, seq: u64, computer: &str, url: &str, report: &SoftwareReport) -> Reply {
        let key = (computer.to_string(), url.to_string());
        let Some(inst) = self.installations.get_mut(&key) else {
            return refused_not_found(format!("{url} is not supplied to computer {computer}"));
        };
        if *report == SoftwareReport::Destroyed {
            if inst.requested != SupplyState::Destroyed {
                return invalid(format!("{url} on {computer} is not requested destroyed"));
            }
            self.installations.remove(&key);
            self.refresh_placement(computer);
        } else if inst.reported.as_ref() != Some(report) {
            inst.reported = Some(report.clone());
        } else {
            return Reply::Done;
        }
        self.dirty.insert(Dirty::Installation(key.0, key.1));
        self.touch_computer(seq, computer);
        Reply::Done
    }
}
