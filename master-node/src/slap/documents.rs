//! The objects SLAP clients read (reference section 1.4), built from the
//! Master's state as xml_marshaller values.
//!
//! Part of the SLAP handlers: must not import the server.

use slap_proto::marshal::{Object, Value, SLAP_MODULE};

use crate::state::{Instance, InstanceReport, Master, Params, Partition, SoftwareInstallation, SupplyState};

fn object(class: &str, args: Vec<Value>, attrs: Vec<(&str, Value)>) -> Value {
    Value::Object(Box::new(Object {
        module: SLAP_MODULE.into(),
        class: class.into(),
        args,
        attrs: attrs.into_iter().map(|(k, v)| (Value::str(k), v)).collect(),
    }))
}

fn params_value(p: &Params) -> Value {
    Value::Dict(
        p.iter()
            .map(|(k, v)| (Value::str(k.clone()), Value::str(v.clone())))
            .collect(),
    )
}

/// A `SoftwareRelease` of `url` on `computer`.
pub fn software_release(url: &str, computer: &str, requested: SupplyState) -> Value {
    let state = match requested {
        SupplyState::Available => "available",
        SupplyState::Destroyed => "destroyed",
    };
    object(
        "SoftwareRelease",
        vec![Value::str(url), Value::str(computer)],
        vec![
            ("_computer_guid", Value::str(computer)),
            ("_requested_state", Value::str(state)),
            ("_software_instance_list", Value::List(vec![])),
            ("_software_release", Value::str(url)),
        ],
    )
}

/// `(interface, address)` pairs of a partition.
fn ip_list(partition: Option<&Partition>) -> Value {
    Value::List(
        partition
            .map(|p| {
                p.addresses
                    .iter()
                    .map(|a| Value::Tuple(vec![Value::str(a.interface.clone()), Value::str(a.addr.clone())]))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// `_access_status` as the real master renders it.
fn access_status(report: &Option<InstanceReport>) -> Option<String> {
    match report {
        Some(InstanceReport::Started) => Some("#access Instance correctly started".into()),
        Some(InstanceReport::Stopped) => Some("#access Instance correctly stopped".into()),
        Some(InstanceReport::Error(msg)) => Some(format!("#error {msg}")),
        None => None,
    }
}

/// A stable key for a user that does not name them.
pub fn owner_key(owner: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(format!("slapos shared instance owner\0{owner}").as_bytes())[..12])
}

/// The entry of a shared instance in its host's `slave_instance_list`:
/// its parameters and connection parameters merged, plus its identity.
fn slave_entry(shared: &Instance) -> Value {
    let mut entries: Vec<(Value, Value)> = Vec::new();
    for (k, v) in shared.parameters.iter().chain(shared.connection.iter()) {
        entries.push((Value::str(k.clone()), Value::str(v.clone())));
    }
    entries.push((Value::str("slave_title"), Value::str(shared.title.clone())));
    entries.push((Value::str("slave_reference"), Value::str(shared.id.clone())));
    // Not in SlapOS's documents: lets a host tell whether two shared
    // instances belong to the same user (a frontend keeps a domain with its
    // owner) without learning who the user is.
    entries.push((Value::str("slave_owner"), Value::str(owner_key(&shared.owner))));
    entries.push((
        Value::str("slap_software_type"),
        Value::str(shared.software_type.clone()),
    ));
    entries.push((Value::str("timestamp"), Value::str(shared.timestamp.to_string())));
    // A later key wins, as a Python dict built in this order would.
    let mut dedup: Vec<(Value, Value)> = Vec::new();
    for (k, v) in entries {
        match dedup.iter_mut().find(|(dk, _)| *dk == k) {
            Some(slot) => slot.1 = v,
            None => dedup.push((k, v)),
        }
    }
    Value::Dict(dedup)
}

/// `_parameter_dict` of a busy partition: the requested parameters and the
/// keys slapgrid and buildout recipes expect.
fn parameter_dict(m: &Master, inst: &Instance, partition: Option<&Partition>) -> Value {
    let (computer, partition_id) = partition
        .map(|p| (p.computer.clone(), p.id.clone()))
        .unwrap_or_default();
    let root_title = m.instances.get(&inst.root).map(|r| r.title.clone()).unwrap_or_default();
    let mut d: Vec<(Value, Value)> = inst
        .parameters
        .iter()
        .map(|(k, v)| (Value::str(k.clone()), Value::str(v.clone())))
        .collect();
    let mut set = |k: &str, v: Value| match d.iter_mut().find(|(dk, _)| dk.as_str() == Some(k)) {
        Some(slot) => slot.1 = v,
        None => d.push((Value::str(k), v)),
    };
    set("timestamp", Value::str(inst.timestamp.to_string()));
    set("ip_list", ip_list(partition));
    set("full_ip_list", Value::List(vec![]));
    set("slap_software_type", Value::str(inst.software_type.clone()));
    set("slap_software_release_url", Value::str(inst.software_release.clone()));
    set("slap_computer_id", Value::str(computer));
    set("slap_computer_partition_id", Value::str(partition_id));
    set("instance_title", Value::str(inst.title.clone()));
    set("root_instance_title", Value::str(root_title.clone()));
    set("root_instance_short_title", Value::str(root_title));
    set(
        "slave_instance_list",
        Value::List(
            m.hosted_by(&inst.id)
                .filter(|s| s.requested_state != crate::state::RequestedState::Destroyed)
                .map(slave_entry)
                .collect(),
        ),
    );
    Value::Dict(d)
}

/// `getHostingSubscriptionIpList`: every `(interface, address)` of the
/// partitions of the instance tree the given instance belongs to.
pub fn tree_ip_list(m: &Master, inst: &Instance) -> Value {
    let mut pairs = Vec::new();
    for member in m.instances.values().filter(|i| i.root == inst.root) {
        if let Some(p) = member.partition.as_ref().and_then(|k| m.partitions.get(k)) {
            for a in &p.addresses {
                pairs.push(Value::Tuple(vec![
                    Value::str(a.interface.clone()),
                    Value::str(a.addr.clone()),
                ]));
            }
        }
    }
    Value::List(pairs)
}

/// A `ComputerPartition` as `getFullComputerInformation` and
/// `registerComputerPartition` send it.
pub fn computer_partition(m: &Master, p: &Partition) -> Value {
    let args = vec![Value::str(p.computer.clone()), Value::str(p.id.clone()), Value::None];
    let inst = p.instance.as_ref().and_then(|id| m.instances.get(id));
    let Some(inst) = inst else {
        return object(
            "ComputerPartition",
            args,
            vec![
                ("_computer_id", Value::str(p.computer.clone())),
                ("_instance_guid", Value::str(format!("{}-{}", p.computer, p.id))),
                ("_need_modification", Value::Int(0)),
                ("_partition_id", Value::str(p.id.clone())),
                ("_request_dict", Value::None),
                ("_requested_state", Value::str("destroyed")),
                ("_software_release_document", Value::None),
            ],
        );
    };
    let mut attrs = vec![
        ("_computer_id", Value::str(p.computer.clone())),
        ("_connection_dict", params_value(&inst.connection)),
        ("_filter_dict", params_value(&inst.sla)),
        ("_instance_guid", Value::str(inst.id.clone())),
        ("_need_modification", Value::Int(1)),
        ("_parameter_dict", parameter_dict(m, inst, Some(p))),
        ("_partition_id", Value::str(p.id.clone())),
        ("_request_dict", Value::None),
        ("_requested_state", Value::str(inst.requested_state.as_str())),
        (
            "_software_release_document",
            software_release(&inst.software_release, &p.computer, SupplyState::Available),
        ),
    ];
    if let Some(status) = access_status(&inst.reported) {
        attrs.push(("_access_status", Value::str(status)));
    }
    // Not in SlapOS's documents (its clients ignore attributes they do not
    // know): tells the node which certificate to hold for the partition, so
    // it fetches a new one (a CA rotation) without redeploying. Since
    // version 4, whose writes move the revision when it changes.
    if m.effective_version() >= 4 {
        if let Some(cert) = m.partition_certificate(&p.computer, &p.id) {
            attrs.push(("_certificate_serial", Value::str(cert.serial.clone())));
        }
    }
    object("ComputerPartition", args, attrs)
}

/// The `Computer` document a node polls.
pub fn computer(m: &Master, computer_id: &str) -> Option<Value> {
    m.computers.get(computer_id)?;
    let partitions = m
        .partitions_of(computer_id)
        .into_iter()
        .map(|p| computer_partition(m, p))
        .collect();
    let releases = m
        .installations_of(computer_id)
        .map(|s: &SoftwareInstallation| software_release(&s.url, computer_id, s.requested))
        .collect();
    Some(object(
        "Computer",
        vec![Value::str(computer_id)],
        vec![
            ("_computer_id", Value::str(computer_id)),
            ("_computer_partition_list", Value::List(partitions)),
            ("_software_release_list", Value::List(releases)),
        ],
    ))
}

/// The `SoftwareInstance` answering `requestComputerPartition`. For a shared
/// instance the partition is its host's.
pub fn software_instance(m: &Master, inst: &Instance) -> Value {
    let place = match (&inst.partition, &inst.host) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(host)) => m.instances.get(host).and_then(|h| h.partition.clone()),
        _ => None,
    };
    let partition = place.as_ref().and_then(|k| m.partitions.get(k));
    let (computer, partition_id) = place.unwrap_or_default();
    let parameters = if inst.shared {
        params_value(&inst.parameters)
    } else {
        parameter_dict(m, inst, partition)
    };
    object(
        "SoftwareInstance",
        vec![],
        vec![
            ("_connection_dict", params_value(&inst.connection)),
            ("_filter_dict", params_value(&inst.sla)),
            ("_instance_guid", Value::str(inst.id.clone())),
            ("_parameter_dict", parameters),
            ("_requested_state", Value::str(inst.requested_state.as_str())),
            ("instance_title", Value::str(inst.title.clone())),
            ("ip_list", ip_list(partition)),
            ("slap_computer_id", Value::str(computer)),
            ("slap_computer_partition_id", Value::str(partition_id)),
            ("slap_software_release_url", Value::str(inst.software_release.clone())),
            ("slap_software_type", Value::str(inst.software_type.clone())),
            ("timestamp", Value::str(inst.timestamp.to_string())),
        ],
    )
}

#[cfg(test)]
mod tests {
    //! The poll cache keys a computer's document by its revision. That is
    //! only correct if every change that shows in the document moves the
    //! revision: checked here after every command of random sequences.

    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use slap_proto::marshal::dumps;

    use super::computer;
    use crate::state::*;

    const SR: &str = "https://example.org/sr.cfg";

    fn params(pairs: &[(&str, &str)]) -> Params {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[derive(Debug, Clone)]
    enum Op {
        Request {
            title: u8,
            param: u8,
            sla: bool,
            state: Option<u8>,
        },
        Child {
            parent: u8,
            title: u8,
            shared: bool,
        },
        Publish {
            instance: u8,
            value: u8,
            for_shared: bool,
        },
        Report {
            instance: u8,
            error: bool,
        },
        NodeDestroyed {
            instance: u8,
        },
        Bang {
            instance: u8,
        },
        Format {
            partitions: u8,
        },
        /// A certificate for a placed instance's partition (the issuer's).
        Certify {
            instance: u8,
        },
        /// The partition's certificate revoked (`cert revoke`).
        Revoke {
            instance: u8,
        },
        /// A CA rotation started (the next of [`Cas`]).
        Rotate,
        /// A partition's certificate replaced from the new CA.
        Replace {
            instance: u8,
        },
        FinishRotation,
    }

    /// The CAs a case rotates through, made once (key generation is slow).
    struct Cas(Vec<(Authority, String)>);

    fn cas() -> &'static Cas {
        static CAS: std::sync::OnceLock<Cas> = std::sync::OnceLock::new();
        CAS.get_or_init(|| {
            let first = crate::pki::new_authority("docs", 1).unwrap();
            let mut all = vec![(first, String::new())];
            for _ in 0..2 {
                let next = crate::pki::successor(&all.last().unwrap().0, "docs", 1).unwrap();
                all.push(next);
            }
            Cas(all)
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..4u8, 0..3u8, any::<bool>(), proptest::option::of(0..3u8))
                .prop_map(|(title, param, sla, state)| Op::Request { title, param, sla, state }),
            2 => (any::<u8>(), 0..3u8, any::<bool>()).prop_map(|(parent, title, shared)| Op::Child { parent, title, shared }),
            2 => (any::<u8>(), 0..3u8, any::<bool>()).prop_map(|(instance, value, for_shared)| Op::Publish { instance, value, for_shared }),
            1 => (any::<u8>(), any::<bool>()).prop_map(|(instance, error)| Op::Report { instance, error }),
            1 => any::<u8>().prop_map(|instance| Op::NodeDestroyed { instance }),
            1 => any::<u8>().prop_map(|instance| Op::Bang { instance }),
            1 => (2..5u8).prop_map(|partitions| Op::Format { partitions }),
            2 => any::<u8>().prop_map(|instance| Op::Certify { instance }),
            1 => any::<u8>().prop_map(|instance| Op::Revoke { instance }),
            1 => Just(Op::Rotate),
            2 => any::<u8>().prop_map(|instance| Op::Replace { instance }),
            1 => Just(Op::FinishRotation),
        ]
    }

    fn placed(m: &Master, n: u8) -> Option<Instance> {
        let v: Vec<&Instance> = m
            .instances
            .values()
            .map(|i| &**i)
            .filter(|i| i.partition.is_some())
            .collect();
        (!v.is_empty()).then(|| v[n as usize % v.len()].clone())
    }

    fn format(partitions: u8) -> Command {
        Command::SetComputer {
            id: "COMP-1".into(),
            address: "10.0.0.1".into(),
            netmask: "255.255.255.0".into(),
            capacity: Params::new(),
            categories: Params::new(),
            partitions: (0..partitions)
                .map(|i| PartitionSpec {
                    id: format!("slappart{i}"),
                    addresses: vec![Address {
                        interface: format!("slaptap{i}"),
                        addr: format!("10.0.0.{i}"),
                        netmask: "255.255.255.255".into(),
                    }],
                    tap: Some(format!("slaptap{i}")),
                    user: None,
                    capabilities: vec![],
                })
                .collect(),
        }
    }

    fn command(m: &Master, op: &Op) -> Option<Command> {
        let partition_of = |i: &Instance| i.partition.clone().unwrap();
        Some(match op.clone() {
            Op::Request {
                title,
                param,
                sla,
                state,
            } => Command::Request(RequestSpec {
                requester: RequestOrigin::User("u".into()),
                title: format!("t{title}"),
                software_release: SR.into(),
                software_type: "default".into(),
                parameters: params(&[("p", &param.to_string())]),
                sla: if sla {
                    params(&[("retention_delay", "1")])
                } else {
                    Params::new()
                },
                shared: false,
                state: state.map(|s| {
                    [
                        RequestedState::Started,
                        RequestedState::Stopped,
                        RequestedState::Destroyed,
                    ][s as usize]
                }),
            }),
            Op::Child { parent, title, shared } => {
                let (computer, partition) = partition_of(&placed(m, parent)?);
                Command::Request(RequestSpec {
                    requester: RequestOrigin::Partition { computer, partition },
                    title: format!("c{title}"),
                    software_release: SR.into(),
                    software_type: "default".into(),
                    parameters: Params::new(),
                    sla: Params::new(),
                    shared,
                    state: None,
                })
            }
            Op::Publish {
                instance,
                value,
                for_shared,
            } => {
                let host = placed(m, instance)?;
                let (computer, partition) = partition_of(&host);
                let shared_reference = if for_shared {
                    Some(m.hosted_by(&host.id).next()?.id.clone())
                } else {
                    None
                };
                Command::SetConnection {
                    computer,
                    partition,
                    shared_reference,
                    connection: params(&[("url", &value.to_string())]),
                }
            }
            Op::Report { instance, error } => {
                let (computer, partition) = partition_of(&placed(m, instance)?);
                let report = if error {
                    InstanceReport::Error("boom".into())
                } else {
                    InstanceReport::Started
                };
                Command::ReportInstance {
                    computer,
                    partition,
                    shared_reference: None,
                    report,
                }
            }
            Op::NodeDestroyed { instance } => {
                let (computer, partition) = partition_of(&placed(m, instance)?);
                Command::DestroyedPartition { computer, partition }
            }
            Op::Bang { instance } => {
                let (computer, partition) = partition_of(&placed(m, instance)?);
                Command::Bang {
                    computer,
                    partition,
                    message: String::new(),
                }
            }
            Op::Format { partitions } => format(partitions),
            Op::Certify { instance } | Op::Replace { instance } => {
                let (computer, partition) = partition_of(&placed(m, instance)?);
                let role = Role::Partition(computer, partition);
                let ca = m.authority.as_ref()?;
                let certificate = crate::pki::issue(ca, &role, 10, 1, &[]).unwrap().certificate;
                if matches!(op, Op::Certify { .. }) {
                    Command::RecordCertificate {
                        certificate,
                        registration: None,
                    }
                } else {
                    Command::ReplacePartitionCertificate {
                        certificate: Box::new(certificate),
                    }
                }
            }
            Op::Revoke { instance } => {
                let (computer, partition) = partition_of(&placed(m, instance)?);
                Command::RevokeCertificate {
                    serial: m.partition_certificate(&computer, &partition)?.serial.clone(),
                }
            }
            Op::Rotate => {
                let current = m.authority.as_ref()?;
                let at = cas().0.iter().position(|(a, _)| a.cert_pem == current.cert_pem)?;
                let (authority, cross_pem) = cas().0.get(at + 1)?.clone();
                Command::RotateAuthority { authority, cross_pem }
            }
            Op::FinishRotation => Command::FinishRotation,
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        #[test]
        fn unchanged_revision_means_unchanged_document(ops in prop::collection::vec(op(), 1..50)) {
            let mut m = Master::new();
            let mut index = 0;
            let mut run = |m: &mut Master, command: Command| {
                index += 1;
                m.apply(index, Proposal { request_id: None, time_us: 1_000_000 + index, command });
            };
            run(&mut m, format(3));
            run(&mut m, Command::Supply { computer: "COMP-1".into(), url: SR.into(), state: SupplyState::Available });
            run(&mut m, Command::SetAuthority(cas().0[0].0.clone()));
            let mut seen: BTreeMap<u64, String> = BTreeMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                // Version 4, whose documents show certificates, from a few
                // commands in: the switch moves the revision too.
                if i == 5 {
                    run(&mut m, Command::SetClusterVersion { version: 4 });
                }
                if let Some(c) = command(&m, &op) {
                    run(&mut m, c);
                }
                let revision = m.computers["COMP-1"].revision;
                let doc = dumps(&computer(&m, "COMP-1").unwrap()).unwrap();
                if let Some(before) = seen.get(&revision) {
                    prop_assert_eq!(before, &doc, "the document changed but revision {} did not (after {:?})", revision, op);
                }
                seen.insert(revision, doc);
            }
        }
    }
}
