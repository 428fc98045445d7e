//! What nodes report and publish: connection parameters, instance states
//! (started, stopped, error), bangs, and which writes of theirs would change
//! nothing (answered by a read instead of a log entry).
//!
//! Part of the state machine: no I/O, no clock; imports only the state.

use super::*;

impl Master {
    pub(super) fn set_connection(
        &mut self,
        seq: u64,
        now: u64,
        computer: &str,
        partition: &str,
        shared_reference: Option<&str>,
        connection: &Params,
    ) -> Reply {
        let target = match self.instance_for(computer, partition, shared_reference) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        if self.instances[&target].connection == *connection {
            return Reply::Done;
        }
        self.instance_mut(&target).connection = connection.clone();
        // The publisher's own document shows it (a shared instance's, in its
        // host's list): its computer's document changed, without a redeploy.
        self.touch_computer(seq, computer);
        // The requester reads these: make it redeploy. The publisher itself is
        // not bumped, or it would redeploy forever.
        if let Requester::Instance(parent) = self.instances[&target].requester.clone() {
            self.bump(seq, now, &parent);
        }
        Reply::Done
    }

    /// Whether applying `command` would change nothing and answer
    /// `Reply::Done`: a node repeating at every run what it already
    /// published or reported, an operator re-supplying what is supplied.
    /// Such a write can be answered by a linearizable read instead of a log
    /// entry. `false` when in doubt: the command is then applied.
    pub fn changes_nothing(&self, command: &Command) -> bool {
        match command {
            Command::SetConnection {
                computer,
                partition,
                shared_reference,
                connection,
            } => self
                .instance_for(computer, partition, shared_reference.as_deref())
                .is_ok_and(|target| self.instances[&target].connection == *connection),
            Command::ReportInstance {
                computer,
                partition,
                shared_reference,
                report,
            } => self
                .instance_for(computer, partition, shared_reference.as_deref())
                .is_ok_and(|target| {
                    let hosting_as_reported = shared_reference.is_some()
                        || match report {
                            InstanceReport::Started => self.ledger.spans.contains_key(&target),
                            InstanceReport::Stopped => !self.ledger.spans.contains_key(&target),
                            InstanceReport::Error(_) => true,
                        };
                    self.instances[&target].reported.as_ref() == Some(report) && hosting_as_reported
                }),
            Command::ReportSoftware { computer, url, report } => {
                *report != SoftwareReport::Destroyed
                    && self
                        .installations
                        .get(&(computer.clone(), url.clone()))
                        .is_some_and(|i| i.reported.as_ref() == Some(report))
            }
            Command::Supply { computer, url, state } => self
                .installations
                .get(&(computer.clone(), url.clone()))
                .is_some_and(|i| i.requested == *state && self.computers.contains_key(computer)),
            _ => false,
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn report_instance(
        &mut self,
        seq: u64,
        now: u64,
        computer: &str,
        partition: &str,
        shared_reference: Option<&str>,
        report: &InstanceReport,
    ) -> Reply {
        let target = match self.instance_for(computer, partition, shared_reference) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        if self.instances[&target].reported.as_ref() != Some(report) {
            self.instance_mut(&target).reported = Some(report.clone());
            self.touch_computer(seq, computer);
        }
        // Hosting is what nodes report: started opens it, stopped closes it.
        if shared_reference.is_none() {
            match report {
                InstanceReport::Started => self.open_hosting(&target, now),
                InstanceReport::Stopped => self.close_hosting(seq, &target, now),
                InstanceReport::Error(_) => {}
            }
        }
        Reply::Done
    }

    pub(super) fn bang(&mut self, seq: u64, now: u64, computer: &str, partition: &str) -> Reply {
        let id = match self.partition_instance(computer, partition) {
            Ok(id) => id,
            Err(reply) => return reply,
        };
        let root = self.instances[&id].root.clone();
        let tree: Vec<InstanceId> = self
            .instances
            .values()
            .filter(|i| i.root == root)
            .map(|i| i.id.clone())
            .collect();
        for member in tree {
            self.bump(seq, now, &member);
        }
        Reply::Done
    }
}
