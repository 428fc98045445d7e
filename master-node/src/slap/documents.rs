//! The objects SLAP clients read (reference section 1.4), built from the
//! Master's state as xml_marshaller values.

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

/// The entry of a shared instance in its host's `slave_instance_list`:
/// its parameters and connection parameters merged, plus its identity.
fn slave_entry(shared: &Instance) -> Value {
    let mut entries: Vec<(Value, Value)> = Vec::new();
    for (k, v) in shared.parameters.iter().chain(shared.connection.iter()) {
        entries.push((Value::str(k.clone()), Value::str(v.clone())));
    }
    entries.push((Value::str("slave_title"), Value::str(shared.title.clone())));
    entries.push((Value::str("slave_reference"), Value::str(shared.id.clone())));
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
