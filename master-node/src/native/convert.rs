//! Between the native API's messages and the Master's domain types. The
//! domain knows nothing of protobuf; this is the only place that knows both.
//!
//! Part of the native API's handlers: must not import the server.

use openraft::rt::WatchReceiver;
use openraft::ServerState;
use slap_proto::master as pb;
use tonic::Status;

use crate::replica::Replica;
use crate::state::{
    Address, Command, Instance, InstanceReport, Master, PartitionSpec, RequestId, RequestOrigin, RequestSpec,
    RequestedState, Requester, SlapState, SoftwareReport, SupplyState,
};

/// A request id as the state machine keys it (`None`: the write is not
/// deduplicated, as SLAP's are not).
pub fn request_id(id: Option<pb::RequestId>) -> Result<Option<RequestId>, Status> {
    match id {
        None => Ok(None),
        Some(id) if id.client.is_empty() || id.seq == 0 => Err(Status::invalid_argument(
            "a request id needs a client id and a sequence number from 1",
        )),
        Some(id) if id.client.len() > 128 => Err(Status::invalid_argument("a client id is at most 128 bytes")),
        Some(id) => Ok(Some(RequestId {
            client: id.client,
            seq: id.seq,
        })),
    }
}

fn address(a: &pb::Address) -> Address {
    Address {
        interface: a.interface.clone(),
        addr: a.addr.clone(),
        netmask: a.netmask.clone(),
    }
}

fn address_message(a: &Address) -> pb::Address {
    pb::Address {
        interface: a.interface.clone(),
        addr: a.addr.clone(),
        netmask: a.netmask.clone(),
    }
}

/// `LoadComputer` as the command `loadComputerConfigurationFromXML` makes.
pub fn set_computer(r: &pb::LoadComputerRequest) -> Result<Command, Status> {
    let mut seen = std::collections::BTreeSet::new();
    let mut partitions = Vec::with_capacity(r.partitions.len());
    for p in &r.partitions {
        if p.id.is_empty() {
            return Err(Status::invalid_argument("a partition has no id"));
        }
        if !seen.insert(p.id.as_str()) {
            return Err(Status::invalid_argument(format!("partition {} is listed twice", p.id)));
        }
        partitions.push(PartitionSpec {
            id: p.id.clone(),
            addresses: p.addresses.iter().map(address).collect(),
            tap: (!p.tap.is_empty()).then(|| p.tap.clone()),
            user: (!p.user.is_empty()).then(|| p.user.clone()),
            capabilities: p.capabilities.clone(),
        });
    }
    Ok(Command::SetComputer {
        id: r.computer_id.clone(),
        address: r.address.clone(),
        netmask: r.netmask.clone(),
        capacity: r.capacity.clone().into_iter().collect(),
        categories: r.categories.clone().into_iter().collect(),
        partitions,
    })
}

/// `Request` as the domain's request.
pub fn request_spec(r: &pb::RequestInstanceRequest, requester: RequestOrigin) -> Result<RequestSpec, Status> {
    let state = match r.state.as_str() {
        "" => None,
        s => Some(RequestedState::parse(s).ok_or_else(|| {
            Status::invalid_argument(format!("state must be started, stopped or destroyed, not {s:?}"))
        })?),
    };
    Ok(RequestSpec {
        requester,
        title: r.title.clone(),
        software_release: r.software_release.clone(),
        software_type: if r.software_type.is_empty() {
            "default".into()
        } else {
            r.software_type.clone()
        },
        parameters: r.parameters.clone().into_iter().collect(),
        sla: r.sla.clone().into_iter().collect(),
        shared: r.shared,
        state,
    })
}

/// An instance as the native API shows it.
pub fn instance_message(i: &Instance) -> pb::Instance {
    let (reported_state, error_log) = match &i.reported {
        None => ("", String::new()),
        Some(InstanceReport::Started) => ("started", String::new()),
        Some(InstanceReport::Stopped) => ("stopped", String::new()),
        Some(InstanceReport::Error(log)) => ("error", log.clone()),
    };
    let (computer_id, partition_id) = i.partition.clone().unwrap_or_default();
    pb::Instance {
        id: i.id.clone(),
        title: i.title.clone(),
        owner: i.owner.clone(),
        root: i.root.clone(),
        requested_by: match &i.requester {
            Requester::Instance(id) => id.clone(),
            Requester::User(_) => String::new(),
        },
        software_release: i.software_release.clone(),
        software_type: i.software_type.clone(),
        parameters: i.parameters.clone().into_iter().collect(),
        sla: i.sla.clone().into_iter().collect(),
        shared: i.shared,
        requested_state: i.requested_state.as_str().into(),
        connection: i.connection.clone().into_iter().collect(),
        reported_state: reported_state.into(),
        error_log,
        placed: i.is_placed(),
        computer_id,
        partition_id,
        host: i.host.clone().unwrap_or_default(),
        pending_reason: i.pending_reason.clone().unwrap_or_default(),
        timestamp: i.timestamp,
        created_at: i.created_at,
        // See `instance_with_terms`: the terms are the state's, not the instance's.
        agreement: None,
    }
}

/// The typed computer document, or `None` if the computer does not exist.
pub fn computer_document(state: &Master, computer: &str) -> Option<pb::ComputerDocument> {
    let c = state.computers.get(computer)?;
    let partitions = state
        .partitions_of(computer)
        .into_iter()
        .map(|p| {
            let instance = p.instance.as_ref().and_then(|id| state.instance(id));
            pb::PartitionDocument {
                id: p.id.clone(),
                slap_state: match p.state {
                    SlapState::Free => "free",
                    SlapState::Busy => "busy",
                }
                .into(),
                addresses: p.addresses.iter().map(address_message).collect(),
                shared: instance
                    .map(|i| state.hosted_by(&i.id).map(instance_message).collect())
                    .unwrap_or_default(),
                instance: instance.map(instance_message),
            }
        })
        .collect();
    let software = state
        .installations_of(computer)
        .map(|s| {
            let (reported_state, error_log) = match &s.reported {
                None => ("", String::new()),
                Some(SoftwareReport::Building) => ("building", String::new()),
                Some(SoftwareReport::Available) => ("available", String::new()),
                Some(SoftwareReport::Destroyed) => ("destroyed", String::new()),
                Some(SoftwareReport::Error(log)) => ("error", log.clone()),
            };
            pb::SoftwareInstallation {
                url: s.url.clone(),
                requested_state: match s.requested {
                    SupplyState::Available => "available",
                    SupplyState::Destroyed => "destroyed",
                }
                .into(),
                reported_state: reported_state.into(),
                error_log,
            }
        })
        .collect();
    Some(pb::ComputerDocument {
        computer_id: computer.to_string(),
        revision: c.revision,
        partitions,
        software,
    })
}

/// A usage report as the native API shows it.
pub fn usage_report(r: &crate::state::ledger::Report) -> pb::UsageReport {
    pb::UsageReport {
        period_start_us: r.period_start_us,
        period_end_us: r.period_end_us,
        lines: r
            .lines
            .iter()
            .map(|l| pb::UsageLine {
                subscription: l.subscription.clone(),
                resource: l.resource.clone(),
                software_release: l.release.clone(),
                subscriber: l.subscriber.clone(),
                quantity: l.quantity,
                unit: l.unit.clone(),
                priced: l.unit_price.is_some(),
                unit_price_micros: l.unit_price.unwrap_or(0),
                currency: l.currency.clone().unwrap_or_default(),
                amount_micros: l.amount,
                movements: l.movements as u32,
                computer_id: l.computer.clone(),
                price_unit: l.price_unit.clone(),
                agreed: l.agreed,
            })
            .collect(),
        totals_micros: r.totals.clone().into_iter().collect(),
    }
}

/// The replicas with their public addresses and roles, and the leader, as
/// this replica sees them.
pub fn cluster_view(replica: &Replica, with_digest: bool) -> pb::ClusterView {
    let m = replica.raft.metrics().borrow_watched().clone();
    let membership = m.membership_config.membership();
    let voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let replicas = membership
        .nodes()
        .map(|(id, _)| pb::Replica {
            id: *id,
            public_addr: state.replica_addrs.get(id).cloned().unwrap_or_default(),
            role: if voters.contains(id) { "voter" } else { "learner" }.into(),
        })
        .collect();
    let leader_id = match (m.current_leader, m.state) {
        // A replica that thinks it leads but has lost its lease still says so:
        // a gateway checks by calling it.
        (Some(l), ServerState::Leader | ServerState::Follower | ServerState::Learner) => l,
        _ => 0,
    };
    let (applied_index, state_sha256) = if with_digest {
        (state.last_index, crate::api::digest(&state))
    } else {
        (0, String::new())
    };
    pb::ClusterView {
        cluster_id: replica.cluster_id.clone(),
        replicas,
        leader_id,
        replica_id: replica.id,
        applied_index,
        state_sha256,
        ca_pem: state.trust_pem(),
    }
}

/// The terms an instance was allocated at, as the API shows them.
pub fn agreement_message(a: &crate::state::market::Agreement) -> pb::Agreement {
    pb::Agreement {
        computer_id: a.computer.clone(),
        provider: a.provider.clone(),
        price_per_hour_micros: a.hosting.unit_price,
        currency: a.hosting.currency.clone(),
        resource_price_micros: a.resources.clone().into_iter().collect(),
        agreed_at: a.at_us,
    }
}

/// [`instance_message`] with the terms the instance was allocated at.
pub fn instance_with_terms(state: &Master, i: &Instance) -> pb::Instance {
    let mut message = instance_message(i);
    message.agreement = state.ledger.agreements.get(&i.id).map(agreement_message);
    message
}

/// An offer as the API shows it.
pub fn offer_message(v: &crate::state::market::OfferView) -> pb::Offer {
    use crate::state::ledger::format_money;
    let o = &v.offer;
    pb::Offer {
        computer_id: o.computer.clone(),
        provider: v.provider.clone(),
        price_per_hour: format_money(o.hosting.unit_price),
        currency: o.hosting.currency.clone(),
        resource_prices: o.resources.iter().map(|(r, p)| (r.clone(), format_money(*p))).collect(),
        cpu_model: o.specs.cpu_model.clone(),
        cpu_count: o.specs.cpu_count,
        memory_bytes: o.specs.memory_bytes,
        disk_bytes: o.specs.disk_bytes,
        region: o.specs.region.clone(),
        network: o.specs.network.clone(),
        capabilities: o.specs.capabilities.clone(),
        partitions: o.partitions,
        partitions_busy: v.busy as u32,
        partitions_total: v.total as u32,
    }
}

/// An offer from the API, checked for what can be told without the state:
/// amounts, the currency.
pub fn offer(o: &pb::Offer) -> Result<crate::state::market::Offer, Status> {
    use crate::state::ledger::{parse_money, Price};
    use crate::state::market::{check_currency, Offer, Specs, OFFER_RESOURCES};
    let computer = o.computer_id.trim();
    if computer.is_empty() {
        return Err(Status::invalid_argument("an offer names its computer (computer_id)"));
    }
    let currency = o.currency.trim();
    check_currency(currency).map_err(Status::invalid_argument)?;
    let money = |what: &str, text: &str| {
        parse_money(text).map_err(|e| Status::invalid_argument(format!("{what}: {e}; prices are not negative")))
    };
    let mut resources = std::collections::BTreeMap::new();
    for (resource, price) in &o.resource_prices {
        if !OFFER_RESOURCES.iter().any(|(r, _)| r == resource) {
            return Err(Status::invalid_argument(format!(
                "an offer prices cpu, memory, disk and network beside hosting; not {resource:?}"
            )));
        }
        resources.insert(resource.clone(), money(&format!("the {resource} price"), price)?);
    }
    Ok(Offer {
        computer: computer.to_string(),
        hosting: Price {
            unit_price: money("the price per partition-hour", &o.price_per_hour)?,
            currency: currency.to_string(),
        },
        resources,
        specs: Specs {
            cpu_model: o.cpu_model.trim().to_string(),
            cpu_count: o.cpu_count,
            memory_bytes: o.memory_bytes,
            disk_bytes: o.disk_bytes,
            region: o.region.trim().to_string(),
            network: o.network.trim().to_string(),
            capabilities: o.capabilities.iter().map(|c| c.trim().to_string()).collect(),
        },
        partitions: o.partitions,
    })
}
