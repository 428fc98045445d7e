//! The computer document `slapos node format` posts with
//! `loadComputerConfigurationFromXML` (reference section 4.3), read into
//! the command that records the computer and its partitions.
//!
//! Part of the SLAP handlers: must not import the server.

use slap_proto::marshal::Value;

use super::{bad, SlapError};
use crate::state::{Address, Command, Params, PartitionSpec};

/// The computer dict `slapos node format` posts (reference section 4.3).
pub(super) fn command(v: Value) -> Result<Command, SlapError> {
    let Value::Dict(d) = v else {
        return Err(bad("xml must hold the computer's dictionary"));
    };
    let id = str_attr(&d, "reference").ok_or_else(|| bad("the computer dictionary has no reference"))?;
    let interface = dict_attr(&d, "interface")
        .and_then(|i| str_attr(i, "name"))
        .unwrap_or_default();
    let mut partitions = Vec::new();
    for p in list_attr(&d, "partition_list") {
        let Value::Dict(p) = p else {
            return Err(bad("partition_list holds a non-dictionary"));
        };
        let pid = str_attr(p, "reference").ok_or_else(|| bad("a partition has no reference"))?;
        let tap = dict_attr(p, "tap").and_then(|t| str_attr(t, "name"));
        let iface = tap.clone().unwrap_or_else(|| interface.clone());
        let addresses = list_attr(p, "address_list")
            .iter()
            .filter_map(|a| match a {
                Value::Dict(a) => Some(Address {
                    interface: iface.clone(),
                    addr: str_attr(a, "addr")?,
                    netmask: str_attr(a, "netmask").unwrap_or_default(),
                }),
                _ => None,
            })
            .collect();
        partitions.push(PartitionSpec {
            id: pid,
            addresses,
            tap,
            user: dict_attr(p, "user").and_then(|u| str_attr(u, "name")),
            capabilities: list_attr(p, "capability_list")
                .iter()
                .filter_map(|c| c.as_str().map(String::from))
                .collect(),
        });
    }
    let mut capacity = Params::new();
    // This Master's extensions (nodeagent sends them; the slapos client does not).
    if let Some(c) = dict_attr(&d, "capacity") {
        for (k, v) in c {
            if let (Some(k), Some(v)) = (k.as_str(), v.as_str()) {
                capacity.insert(k.into(), v.into());
            }
        }
    }
    let categories: Params = dict_attr(&d, "categories")
        .map(|c| {
            c.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    for key in [
        "os_type",
        "public_ipv4_address",
        "slapos_version",
        "python_version",
        "software_root",
        "instance_root",
    ] {
        if let Some(v) = str_attr(&d, key) {
            capacity.insert(key.into(), v);
        }
    }
    Ok(Command::SetComputer {
        id,
        address: str_attr(&d, "address").unwrap_or_default(),
        netmask: str_attr(&d, "netmask").unwrap_or_default(),
        capacity,
        categories,
        partitions,
    })
}

fn str_attr(d: &[(Value, Value)], key: &str) -> Option<String> {
    d.iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .and_then(|(_, v)| v.as_str().map(String::from))
}

fn dict_attr<'a>(d: &'a [(Value, Value)], key: &str) -> Option<&'a [(Value, Value)]> {
    match d.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v) {
        Some(Value::Dict(e)) => Some(e),
        _ => None,
    }
}

fn list_attr<'a>(d: &'a [(Value, Value)], key: &str) -> &'a [Value] {
    match d.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v) {
        Some(Value::List(items)) | Some(Value::Tuple(items)) => items,
        _ => &[],
    }
}
