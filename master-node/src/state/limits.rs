//! What one call may carry: the size of a text field, of a set of
//! parameters, of a request body and of a document, the number of
//! partitions a computer may declare, and the bytes of one log entry.
//!
//! The limits are replicated (an administrator sets them for the cluster,
//! `master-node limits set`), so the same [`Limits::check`] gives the same
//! answer wherever it runs: at the replica a call arrives on (an over-limit
//! call is answered 413 and never proposed), on the leader before it
//! proposes (forwarded writes), and in `apply`, where it can only refuse
//! what an older replica let through. Every refusal names the limit.
//!
//! Part of the state machine: imports only the state.

use serde::{Deserialize, Serialize};

use super::command::{Command, PartitionSpec, RequestSpec};
use super::model::Params;

/// The cluster's limits. The defaults are generous for real use (a node of
/// a few thousand partitions, an instance with large certificates in its
/// parameters) and far below what would disturb the cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Bytes of one text field: a software release URL, a title, a
    /// reference, a software type, a parameter's name.
    pub field_bytes: u32,
    /// Bytes of one set of parameters, names and values together: an
    /// instance's parameters, its SLA, its connection parameters, a
    /// computer's capacity or categories.
    pub parameters_bytes: u32,
    /// Partitions one computer may declare.
    pub partitions_per_computer: u32,
    /// Bytes of one call's body (SLAP, the native API), documents aside.
    pub body_bytes: u32,
    /// Bytes of a computer's document (`loadComputerConfigurationFromXML`,
    /// the native format call) or of a usage journal (`useComputer`).
    pub document_bytes: u32,
    /// Bytes of one log entry: the leader closes a batch of writes before it
    /// grows past this (a single write larger than it goes alone).
    pub entry_bytes: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            field_bytes: 4 << 10,
            parameters_bytes: 256 << 10,
            partitions_per_computer: 2_000,
            body_bytes: slap_proto::limits::BODY_BYTES,
            document_bytes: slap_proto::limits::DOCUMENT_BYTES,
            entry_bytes: 512 << 10,
        }
    }
}

/// The smallest value each limit may be set to: below it, ordinary calls
/// (a node's format, an instance's certificates) would be refused.
pub const FLOOR: Limits = Limits {
    field_bytes: 256,
    parameters_bytes: 4 << 10,
    partitions_per_computer: 1,
    body_bytes: 64 << 10,
    document_bytes: 256 << 10,
    entry_bytes: 64 << 10,
};

/// Addresses one partition may list.
const ADDRESSES_PER_PARTITION: usize = 64;
/// Capabilities one partition may declare.
const CAPABILITIES_PER_PARTITION: usize = 64;

impl Limits {
    /// Whether `command` stays within the limits; else which limit it
    /// passes, in a sentence for the caller.
    pub fn check(&self, command: &Command) -> Result<(), String> {
        match command {
            Command::SetComputer {
                id,
                address,
                netmask,
                capacity,
                categories,
                partitions,
            } => {
                self.field("the computer's reference", id)?;
                self.field("the computer's address", address)?;
                self.field("the computer's netmask", netmask)?;
                self.parameters("the computer's capacity", capacity)?;
                self.parameters("the computer's categories", categories)?;
                if partitions.len() > self.partitions_per_computer as usize {
                    return Err(format!(
                        "computer {id} declares {} partitions; the cluster's limit is {} \
                         (partitions_per_computer; see `master-node limits`)",
                        partitions.len(),
                        self.partitions_per_computer
                    ));
                }
                partitions.iter().try_for_each(|p| self.partition(p))
            }
            Command::Supply { computer, url, .. } => {
                self.field("the computer's reference", computer)?;
                self.field("the software release URL", url)
            }
            Command::Request(spec) => self.request(spec),
            Command::SetConnection {
                computer,
                partition,
                shared_reference,
                connection,
            } => {
                self.place(computer, partition, shared_reference.as_deref())?;
                self.parameters("the connection parameters", connection)
            }
            Command::ReportInstance {
                computer,
                partition,
                shared_reference,
                report,
            } => {
                self.place(computer, partition, shared_reference.as_deref())?;
                match report {
                    super::model::InstanceReport::Error(message) => self.text("the error message", message),
                    _ => Ok(()),
                }
            }
            Command::ReportSoftware { computer, url, report } => {
                self.field("the computer's reference", computer)?;
                self.field("the software release URL", url)?;
                match report {
                    super::model::SoftwareReport::Error(message) => self.text("the error message", message),
                    _ => Ok(()),
                }
            }
            Command::Bang {
                computer,
                partition,
                message,
            } => {
                self.place(computer, partition, None)?;
                self.text("the bang's message", message)
            }
            Command::DestroyedPartition { computer, partition } => self.place(computer, partition, None),
            Command::SetRelatedInstances {
                computer,
                partition,
                titles,
            } => {
                self.place(computer, partition, None)?;
                titles
                    .iter()
                    .try_for_each(|t| self.field("a related instance's title", t))?;
                self.total("the related instances' titles", titles.iter().map(String::len))
            }
            Command::BookUsage { computer, lines, .. } => {
                self.field("the computer's reference", computer)?;
                for l in lines {
                    self.field("a movement's partition", &l.partition)?;
                    self.field("a movement's resource", &l.resource)?;
                    if let Some(c) = &l.category {
                        self.field("a movement's category", c)?;
                    }
                }
                Ok(())
            }
            Command::SetPrice { resource, release, .. } => {
                self.field("the price's resource", resource)?;
                release
                    .as_deref()
                    .map_or(Ok(()), |r| self.field("the software release URL", r))
            }
            Command::IfPartitionHolds {
                computer,
                partition,
                instance,
                then,
            } => {
                self.place(computer, partition, Some(instance))?;
                self.check(then)
            }
            Command::SetLimits(limits) => limits.sane(),
            Command::SetOffer(offer) => {
                self.field("the computer's reference", &offer.computer)?;
                self.field("the offer's CPU model", &offer.specs.cpu_model)?;
                self.field("the offer's region", &offer.specs.region)?;
                self.field("the offer's network", &offer.specs.network)?;
                offer
                    .specs
                    .capabilities
                    .iter()
                    .try_for_each(|c| self.field("a capability", c))
            }
            Command::WithdrawOffer { computer } => self.field("the computer's reference", computer),
            Command::SetComputerOwner { computer, owner } => {
                self.field("the computer's reference", computer)?;
                owner.as_deref().map_or(Ok(()), |o| self.field("the owner's name", o))
            }
            // Written by the cluster itself (its creation, certificates it
            // signed, replica ids and addresses), never by a client.
            Command::InitCluster { .. }
            | Command::SetAuthority(_)
            | Command::AddRegistration { .. }
            | Command::RecordCertificate { .. }
            | Command::RevokeCertificate { .. }
            | Command::RevokeRole { .. }
            | Command::ReserveReplicaId { .. }
            | Command::AnnounceReplica { .. }
            | Command::SetClusterVersion { .. }
            | Command::RenewCertificate { .. }
            | Command::RotateAuthority { .. }
            | Command::FinishRotation
            | Command::ReplacePartitionCertificate { .. } => Ok(()),
        }
    }

    /// Whether these limits may be set: each at least its [`FLOOR`].
    pub fn sane(&self) -> Result<(), String> {
        let pairs = [
            ("field_bytes", self.field_bytes, FLOOR.field_bytes),
            ("parameters_bytes", self.parameters_bytes, FLOOR.parameters_bytes),
            (
                "partitions_per_computer",
                self.partitions_per_computer,
                FLOOR.partitions_per_computer,
            ),
            ("body_bytes", self.body_bytes, FLOOR.body_bytes),
            ("document_bytes", self.document_bytes, FLOOR.document_bytes),
            ("entry_bytes", self.entry_bytes, FLOOR.entry_bytes),
        ];
        for (name, value, floor) in pairs {
            if value < floor {
                return Err(format!("{name} cannot be set below {floor} (asked: {value})"));
            }
        }
        if self.document_bytes < self.body_bytes {
            return Err("document_bytes cannot be smaller than body_bytes".into());
        }
        Ok(())
    }

    fn request(&self, spec: &RequestSpec) -> Result<(), String> {
        if let super::command::RequestOrigin::Partition { computer, partition } = &spec.requester {
            self.place(computer, partition, None)?;
        }
        if let super::command::RequestOrigin::User(user) = &spec.requester {
            self.field("the user's name", user)?;
        }
        self.field("the title (partition_reference)", &spec.title)?;
        self.field("the software release URL", &spec.software_release)?;
        self.field("the software type", &spec.software_type)?;
        self.parameters("the instance parameters", &spec.parameters)?;
        self.parameters("the SLA", &spec.sla)
    }

    fn partition(&self, p: &PartitionSpec) -> Result<(), String> {
        self.field("a partition's reference", &p.id)?;
        if let Some(tap) = &p.tap {
            self.field("a partition's tap", tap)?;
        }
        if let Some(user) = &p.user {
            self.field("a partition's user", user)?;
        }
        if p.addresses.len() > ADDRESSES_PER_PARTITION {
            return Err(format!(
                "partition {} lists {} addresses; at most {ADDRESSES_PER_PARTITION} are taken",
                p.id,
                p.addresses.len()
            ));
        }
        for a in &p.addresses {
            self.field("an address", &a.addr)?;
            self.field("a netmask", &a.netmask)?;
            self.field("an interface", &a.interface)?;
        }
        if p.capabilities.len() > CAPABILITIES_PER_PARTITION {
            return Err(format!(
                "partition {} declares {} capabilities; at most {CAPABILITIES_PER_PARTITION} are taken",
                p.id,
                p.capabilities.len()
            ));
        }
        p.capabilities.iter().try_for_each(|c| self.field("a capability", c))
    }

    /// A partition (and the shared instance it speaks for) named by a call.
    fn place(&self, computer: &str, partition: &str, instance: Option<&str>) -> Result<(), String> {
        self.field("the computer's reference", computer)?;
        self.field("the partition's reference", partition)?;
        instance.map_or(Ok(()), |i| self.field("the instance's reference", i))
    }

    fn field(&self, what: &str, value: &str) -> Result<(), String> {
        if value.len() > self.field_bytes as usize {
            return Err(format!(
                "{what} is {} bytes; the cluster's limit for a field is {} bytes (field_bytes; see `master-node limits`)",
                value.len(),
                self.field_bytes
            ));
        }
        Ok(())
    }

    /// A free text (a message): bounded like a set of parameters.
    fn text(&self, what: &str, value: &str) -> Result<(), String> {
        self.total(what, [value.len()])
    }

    fn parameters(&self, what: &str, params: &Params) -> Result<(), String> {
        for key in params.keys() {
            self.field("a parameter's name", key)?;
        }
        self.total(what, params.iter().map(|(k, v)| k.len() + v.len()))
    }

    fn total(&self, what: &str, sizes: impl IntoIterator<Item = usize>) -> Result<(), String> {
        let bytes: usize = sizes.into_iter().sum();
        if bytes > self.parameters_bytes as usize {
            return Err(format!(
                "{what} take {bytes} bytes; the cluster's limit is {} bytes (parameters_bytes; see `master-node limits`)",
                self.parameters_bytes
            ));
        }
        Ok(())
    }
}

/// About how many bytes a command takes in a log entry: the sum of what it
/// carries, counted without encoding it (the proposer sizes its batches by
/// it).
pub fn approximate_size(command: &Command) -> usize {
    fn params(p: &Params) -> usize {
        p.iter().map(|(k, v)| k.len() + v.len() + 2).sum()
    }
    const FRAME: usize = 16;
    FRAME
        + match command {
            Command::SetComputer {
                id,
                capacity,
                categories,
                partitions,
                ..
            } => {
                id.len()
                    + params(capacity)
                    + params(categories)
                    + partitions
                        .iter()
                        .map(|p| {
                            p.id.len()
                                + p.addresses
                                    .iter()
                                    .map(|a| a.addr.len() + a.netmask.len() + a.interface.len() + 3)
                                    .sum::<usize>()
                                + p.tap.as_ref().map_or(0, String::len)
                                + p.user.as_ref().map_or(0, String::len)
                                + p.capabilities.iter().map(String::len).sum::<usize>()
                                + FRAME
                        })
                        .sum::<usize>()
            }
            Command::Request(spec) => {
                spec.title.len()
                    + spec.software_release.len()
                    + spec.software_type.len()
                    + params(&spec.parameters)
                    + params(&spec.sla)
                    + FRAME
            }
            Command::SetConnection { connection, .. } => params(connection) + FRAME,
            Command::BookUsage { lines, .. } => lines
                .iter()
                .map(|l| l.partition.len() + l.resource.len() + l.category.as_ref().map_or(0, String::len) + 32)
                .sum(),
            Command::SetRelatedInstances { titles, .. } => titles.iter().map(|t| t.len() + 1).sum(),
            Command::IfPartitionHolds { then, .. } => approximate_size(then),
            // The fingerprint travels as 64 hex digits.
            Command::RecordCertificate { certificate, .. } => certificate.cert_pem.text_len() + 64 + FRAME,
            Command::RenewCertificate { serial, certificate } => {
                serial.len() + certificate.cert_pem.text_len() + 64 + FRAME
            }
            Command::ReplacePartitionCertificate { certificate } => {
                certificate.cert_pem.text_len() + certificate.key_pem.as_ref().map_or(0, |k| k.text_len()) + 64 + FRAME
            }
            Command::SetAuthority(a) => a.cert_pem.len() + a.key_pem.len(),
            Command::RotateAuthority { authority, cross_pem } => {
                authority.cert_pem.len() + authority.key_pem.len() + cross_pem.len()
            }
            _ => 4 * FRAME,
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(title: &str, params: Params) -> Command {
        Command::Request(RequestSpec {
            requester: super::super::command::RequestOrigin::User("alice".into()),
            title: title.into(),
            software_release: "https://example.org/sr.cfg".into(),
            software_type: "default".into(),
            parameters: params,
            sla: Params::new(),
            shared: false,
            state: None,
        })
    }

    #[test]
    fn refusals_name_the_limit() {
        let l = Limits::default();
        assert_eq!(l.check(&request("ok", Params::new())), Ok(()));
        let long = "x".repeat(5000);
        let e = l.check(&request(&long, Params::new())).unwrap_err();
        assert!(
            e.contains("title") && e.contains("field_bytes") && e.contains("4096"),
            "{e}"
        );
        let big: Params = (0..300).map(|i| (format!("k{i}"), "v".repeat(1000))).collect();
        let e = l.check(&request("ok", big)).unwrap_err();
        assert!(
            e.contains("instance parameters") && e.contains("parameters_bytes"),
            "{e}"
        );
        let partitions = (0..2001)
            .map(|i| PartitionSpec {
                id: format!("slappart{i}"),
                addresses: vec![],
                tap: None,
                user: None,
                capabilities: vec![],
            })
            .collect();
        let e = l
            .check(&Command::SetComputer {
                id: "COMP-1".into(),
                address: String::new(),
                netmask: String::new(),
                capacity: Params::new(),
                categories: Params::new(),
                partitions,
            })
            .unwrap_err();
        assert!(
            e.contains("2001 partitions") && e.contains("partitions_per_computer"),
            "{e}"
        );
        let nested = Command::IfPartitionHolds {
            computer: "C".into(),
            partition: "p".into(),
            instance: "I".into(),
            then: Box::new(request(&long, Params::new())),
        };
        assert!(l.check(&nested).is_err(), "a guarded command is checked too");
    }

    #[test]
    fn limits_have_floors() {
        assert_eq!(Limits::default().sane(), Ok(()));
        assert_eq!(FLOOR.sane(), Ok(()));
        let too_small = Limits {
            field_bytes: 10,
            ..Limits::default()
        };
        assert!(too_small.sane().unwrap_err().contains("field_bytes"));
        assert!(Limits::default().check(&Command::SetLimits(too_small)).is_err());
    }

    #[test]
    fn sizes_follow_what_a_command_carries() {
        let small = approximate_size(&request("a", Params::new()));
        let big: Params = (0..100).map(|i| (format!("k{i}"), "v".repeat(1000))).collect();
        let large = approximate_size(&request("a", big.clone()));
        let encoded = postcard::to_allocvec(&request("a", big)).unwrap().len();
        assert!(small < 200 && large > 100_000, "{small} {large}");
        assert!(
            large >= encoded * 9 / 10 && large <= encoded * 2,
            "close to the encoding: {large} vs {encoded}"
        );
    }
}
