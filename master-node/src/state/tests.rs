//! Tests of the SlapOS rules, and a property test of random command
//! sequences against a simple model, with invariants after every step.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::allocation::Filter;
use super::*;

struct World {
    m: Master,
    index: u64,
    time: u64,
}

fn params(pairs: &[(&str, &str)]) -> Params {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

const SR: &str = "https://example.org/software/http.cfg";

impl World {
    fn new() -> Self {
        Self {
            m: Master::new(),
            index: 0,
            time: 1_000_000,
        }
    }

    fn run(&mut self, command: Command) -> Reply {
        self.index += 1;
        self.time += 10;
        let reply = self.m.apply(
            self.index,
            Proposal {
                request_id: None,
                time_us: self.time,
                command,
            },
        );
        check_invariants(&self.m);
        reply
    }

    fn computer(&mut self, id: &str, partitions: usize, categories: &[(&str, &str)]) {
        let specs = (0..partitions)
            .map(|i| PartitionSpec {
                id: format!("slappart{i}"),
                addresses: vec![Address {
                    interface: format!("slaptap{i}"),
                    addr: format!("10.0.0.{i}"),
                    netmask: "255.255.255.255".into(),
                }],
                tap: Some(format!("slaptap{i}")),
                user: Some(format!("slapuser{i}")),
                capabilities: vec![],
            })
            .collect();
        let r = self.run(Command::SetComputer {
            id: id.into(),
            address: "10.0.0.1".into(),
            netmask: "255.255.255.0".into(),
            capacity: Params::new(),
            categories: params(categories),
            partitions: specs,
        });
        assert_eq!(r, Reply::Done);
        let r = self.run(Command::Supply {
            computer: id.into(),
            url: SR.into(),
            state: SupplyState::Available,
        });
        assert_eq!(r, Reply::Done);
    }

    fn request(&mut self, user: &str, title: &str, p: &[(&str, &str)], sla: &[(&str, &str)]) -> Reply {
        self.run(Command::Request(RequestSpec {
            requester: RequestOrigin::User(user.into()),
            title: title.into(),
            software_release: SR.into(),
            software_type: "default".into(),
            parameters: params(p),
            sla: params(sla),
            shared: false,
            state: None,
        }))
    }

    fn child(&mut self, parent: &Instance, title: &str, shared: bool) -> Reply {
        self.run(Command::Request(child_spec(parent, title, shared)))
    }

    fn destroy(&mut self, user: &str, title: &str) -> Reply {
        self.run(Command::Request(RequestSpec {
            requester: RequestOrigin::User(user.into()),
            title: title.into(),
            software_release: SR.into(),
            software_type: "default".into(),
            parameters: Params::new(),
            sla: Params::new(),
            shared: false,
            state: Some(RequestedState::Destroyed),
        }))
    }
}

/// A request from `parent`'s partition for a child instance.
fn child_spec(parent: &Instance, title: &str, shared: bool) -> RequestSpec {
    let (computer, partition) = parent.partition.clone().unwrap();
    RequestSpec {
        requester: RequestOrigin::Partition { computer, partition },
        title: title.into(),
        software_release: SR.into(),
        software_type: "default".into(),
        parameters: Params::new(),
        sla: Params::new(),
        shared,
        state: None,
    }
}

fn instance(r: Reply) -> Instance {
    match r {
        Reply::Instance(i) => Arc::unwrap_or_clone(i),
        other => panic!("expected an instance, got {other:?}"),
    }
}

/// What must hold after every command.
fn check_invariants(m: &Master) {
    let by_revision: BTreeSet<(u64, ComputerId)> = m.computers.values().map(|c| (c.revision, c.id.clone())).collect();
    assert_eq!(m.revised, by_revision, "the index by revision follows every computer");
    let uncertified: BTreeSet<(ComputerId, PartitionId)> = m
        .partitions
        .iter()
        .filter(|(key, p)| p.state == SlapState::Busy && !m.partition_certs.contains_key(*key))
        .map(|(key, _)| key.clone())
        .collect();
    assert_eq!(
        m.uncertified, uncertified,
        "the busy partitions waiting for a certificate are indexed"
    );
    for ((c, p), part) in &m.partitions {
        match (part.state, &part.instance) {
            (SlapState::Busy, Some(id)) => {
                let inst = m
                    .instances
                    .get(id)
                    .unwrap_or_else(|| panic!("{c}/{p} holds missing instance {id}"));
                assert_eq!(
                    inst.partition.as_ref(),
                    Some(&(c.clone(), p.clone())),
                    "{id} disagrees with {c}/{p}"
                );
            }
            (SlapState::Free, None) => {}
            other => panic!("partition {c}/{p} is inconsistent: {other:?}"),
        }
    }
    let mut placed = BTreeMap::new();
    for inst in m.instances.values() {
        if let Some(place) = &inst.partition {
            assert!(!inst.shared, "shared instance {} holds a partition", inst.id);
            let part = &m.partitions[place];
            assert_eq!(part.instance.as_deref(), Some(inst.id.as_str()));
            assert!(
                placed.insert(place.clone(), inst.id.clone()).is_none(),
                "two instances on {place:?}"
            );
        }
        if let Some(host) = &inst.host {
            assert!(m.instances.contains_key(host), "{} hosted by missing {host}", inst.id);
        }
        assert!(inst.timestamp <= m.clock);
    }
    check_placement_index(m);
}

/// The placement index kept up command by command is the one a restart
/// would build, and it chooses what the rule, spelled out over every
/// computer, chooses.
fn check_placement_index(m: &Master) {
    let (terms, catalog) = m.placement_terms();
    let rebuilt = allocation::PlacementIndex::build(&m.computers, &m.partitions, &m.installations, terms, catalog);
    assert_eq!(m.placement, rebuilt, "the placement index drifted from the state");
    let roots: BTreeSet<&str> = m.instances.values().map(|i| i.root.as_str()).collect();
    let filters = [
        Filter::default(),
        Filter {
            capability: Some("gpu".into()),
            ..Filter::default()
        },
        Filter {
            categories: vec![("region".into(), "eu".into())],
            ..Filter::default()
        },
        Filter {
            computer_guid: Some("COMP-1".into()),
            ..Filter::default()
        },
        Filter {
            unique_by_network: true,
            ..Filter::default()
        },
        Filter {
            conditions: market::conditions(&[("max_price", "0.03EUR"), ("min_cpu", "4")]),
            ..Filter::default()
        },
        Filter {
            capability: Some("gpu".into()),
            conditions: market::conditions(&[("not_provider", "p0")]),
            ..Filter::default()
        },
    ];
    for filter in &filters {
        for root in roots.iter().copied().chain(["SOFTINST-none"]) {
            for seq in [0, 1, 7, m.applied] {
                assert_eq!(
                    m.choose_partition(filter, SR, root, seq).ok(),
                    reference_choice(m, filter, SR, root, seq),
                    "placement differs from the rule for {filter:?} in tree {root} at {seq}"
                );
            }
        }
    }
}

/// The placement rule over every computer: among the computers that have
/// `release` supplied, sell a partition (an offer's count not reached; an
/// owner's computer only through an offer), pass the filter and its market
/// conditions, are on a network the tree does not use yet
/// (`unique_by_network`) and have a free partition the filter takes, the
/// cheapest (offer, else catalog, else free); among those the least loaded;
/// among those, the first at or after the sequence number's point on the
/// computers' spread, wrapping around; its first such partition.
fn reference_choice(
    m: &Master,
    filter: &Filter,
    release: &str,
    root: &str,
    seq: u64,
) -> Option<(ComputerId, PartitionId)> {
    let used: BTreeSet<String> = if filter.unique_by_network {
        m.instances
            .values()
            .filter(|i| i.root == root)
            .filter_map(|i| i.partition.as_ref())
            .filter_map(|(c, _)| m.computers.get(c))
            .map(allocation::network_of)
            .collect()
    } else {
        BTreeSet::new()
    };
    let catalog = |key: &str| m.ledger.prices.get(&(ledger::HOSTING.to_string(), key.to_string()));
    let mut eligible = Vec::new();
    for c in m.computers.values() {
        let supplied = m
            .installations
            .get(&(c.id.clone(), release.to_string()))
            .is_some_and(|s| s.requested == SupplyState::Available);
        let terms = m.terms_of(c);
        if !supplied || !filter.accepts_terms(c, &terms) || used.contains(&allocation::network_of(c)) {
            continue;
        }
        // Catalog prices place from the market's version on.
        let on_market = m.effective_version() >= crate::state::market::MARKET_VERSION;
        let (price, sells) = match m.market.offers.get(&c.id) {
            Some(o) => (Some(o.hosting.clone()), o.partitions as usize),
            None if m.ledger.owners.contains_key(&c.id) => continue,
            None if on_market => (catalog(release).or_else(|| catalog("")).cloned(), usize::MAX),
            None => (None, usize::MAX),
        };
        let rank = price.map_or((0, String::new()), |p| (p.unit_price, p.currency));
        let within = match &filter.conditions.max_price {
            None => true,
            Some(max) => rank.1.is_empty() || (rank.1 == max.currency && rank.0 <= max.unit_price),
        };
        let parts: Vec<&Partition> = c
            .partitions
            .iter()
            .map(|p| &m.partitions[&(c.id.clone(), p.clone())])
            .collect();
        let busy = parts.iter().filter(|p| p.state == SlapState::Busy).count();
        if !within || busy >= sells {
            continue;
        }
        let free = parts.iter().find(|p| {
            p.state == SlapState::Free && filter.accepts_offered_capabilities(&p.capabilities, terms.capabilities)
        });
        if let Some(free) = free {
            eligible.push((rank, busy, allocation::spread_of(&c.id), c.id.clone(), free.id.clone()));
        }
    }
    let best = eligible.iter().map(|e| (e.0.clone(), e.1)).min()?;
    let mut tied: Vec<_> = eligible.into_iter().filter(|e| (e.0.clone(), e.1) == best).collect();
    tied.sort();
    let point = allocation::spread_point(seq);
    let chosen = tied.iter().find(|e| e.2 >= point).or(tied.first())?;
    Some((chosen.3.clone(), chosen.4.clone()))
}

#[test]
fn request_places_and_rerequest_is_idempotent() {
    let mut w = World::new();
    w.computer("COMP-1", 3, &[]);
    let a = instance(w.request("alice", "blog", &[("x", "1")], &[]));
    assert!(a.partition.is_some());
    let again = instance(w.request("alice", "blog", &[("x", "1")], &[]));
    assert_eq!(again.timestamp, a.timestamp, "identical re-request bumps nothing");
    assert_eq!(again.partition, a.partition);
    let changed = instance(w.request("alice", "blog", &[("y", "2")], &[]));
    assert!(changed.timestamp > a.timestamp);
    assert_eq!(
        changed.parameters,
        params(&[("y", "2")]),
        "a re-request replaces the parameters"
    );
    // Another user's "blog" is another instance.
    let b = instance(w.request("bob", "blog", &[], &[]));
    assert_ne!(b.id, a.id);
    assert_ne!(b.partition, a.partition);
}

#[test]
fn only_a_request_that_changes_nothing_is_answerable_by_a_read() {
    let mut w = World::new();
    w.computer("COMP-1", 1, &[]);
    let a = instance(w.request("alice", "blog", &[("x", "1")], &[]));
    let spec = |p: &[(&str, &str)], sla: &[(&str, &str)], state: Option<RequestedState>, shared: bool| RequestSpec {
        requester: RequestOrigin::User("alice".into()),
        title: "blog".into(),
        software_release: SR.into(),
        software_type: "default".into(),
        parameters: params(p),
        sla: params(sla),
        shared,
        state,
    };
    let same = spec(&[("x", "1")], &[], None, false);
    assert_eq!(w.m.unchanged_by(&same), Some(&a));
    let started = spec(&[("x", "1")], &[], Some(RequestedState::Started), false);
    assert_eq!(
        w.m.unchanged_by(&started),
        Some(&a),
        "asking the state it has changes nothing"
    );
    for (what, changing) in [
        ("parameters", spec(&[("x", "2")], &[], None, false)),
        ("SLA", spec(&[("x", "1")], &[("computer_guid", "COMP-1")], None, false)),
        ("state", spec(&[("x", "1")], &[], Some(RequestedState::Stopped), false)),
        ("shared flag (refused)", spec(&[("x", "1")], &[], None, true)),
    ] {
        assert_eq!(w.m.unchanged_by(&changing), None, "a change of {what} must be applied");
    }
    let mut other_type = same.clone();
    other_type.software_type = "frontend".into();
    assert_eq!(
        w.m.unchanged_by(&other_type),
        None,
        "a change of software type must be applied"
    );
    let mut new_title = same.clone();
    new_title.title = "shop".into();
    assert_eq!(w.m.unchanged_by(&new_title), None, "a new instance must be applied");
    let mut empty = same.clone();
    empty.title = " ".into();
    assert_eq!(w.m.unchanged_by(&empty), None, "a refusal comes from applying");
    // A pending instance re-requested identically: no placement is retried
    // (capacity events do that), so it too is answered as it stands.
    let pending = instance(w.request("alice", "wiki", &[], &[]));
    assert!(!pending.is_placed());
    let mut again = same.clone();
    again.title = "wiki".into();
    again.parameters = Params::new();
    assert_eq!(w.m.unchanged_by(&again), Some(&pending));
    // A child re-requested from its parent's partition.
    let child = instance(w.child(&a, "db", false));
    assert_eq!(w.m.unchanged_by(&child_spec(&a, "db", false)), Some(&child));

    // Publishing what was published already changes nothing.
    let (c, p) = a.partition.clone().unwrap();
    let url = params(&[("url", "http://[::1]:8080")]);
    let publish = |partition: &str, shared: Option<&str>, connection: &Params| Command::SetConnection {
        computer: c.clone(),
        partition: partition.into(),
        shared_reference: shared.map(String::from),
        connection: connection.clone(),
    };
    assert!(!w.m.changes_nothing(&publish(&p, None, &url)));
    w.run(publish(&p, None, &url));
    assert!(w.m.changes_nothing(&publish(&p, None, &url)));
    let other = params(&[("url", "http://[::1]:8081")]);
    assert!(!w.m.changes_nothing(&publish(&p, None, &other)));
    assert!(
        !w.m.changes_nothing(&publish("slappart9", None, &url)),
        "a refusal comes from applying"
    );
    assert!(!w.m.changes_nothing(&publish(&p, Some("SLAVEINST-404"), &url)));

    // A node reporting what it reported: nothing, once hosting is as reported.
    let report = |report: InstanceReport| Command::ReportInstance {
        computer: c.clone(),
        partition: p.clone(),
        shared_reference: None,
        report,
    };
    assert!(!w.m.changes_nothing(&report(InstanceReport::Started)));
    w.run(report(InstanceReport::Started));
    assert!(w.m.changes_nothing(&report(InstanceReport::Started)));
    assert!(!w.m.changes_nothing(&report(InstanceReport::Stopped)));
    assert!(!w.m.changes_nothing(&report(InstanceReport::Error("disk full".into()))));
    // Reported started but no hosting open (a state written before accounting
    // existed): the report must be applied, to open it.
    let span = w.m.ledger.spans.remove(&a.id).expect("started opens hosting");
    assert!(!w.m.changes_nothing(&report(InstanceReport::Started)));
    w.m.ledger.spans.insert(a.id.clone(), span);
    let software = |report: SoftwareReport| Command::ReportSoftware {
        computer: c.clone(),
        url: SR.into(),
        report,
    };
    assert!(!w.m.changes_nothing(&software(SoftwareReport::Available)));
    w.run(software(SoftwareReport::Available));
    assert!(w.m.changes_nothing(&software(SoftwareReport::Available)));
    assert!(!w.m.changes_nothing(&software(SoftwareReport::Building)));
    let supply = |state: SupplyState| Command::Supply {
        computer: c.clone(),
        url: SR.into(),
        state,
    };
    assert!(w.m.changes_nothing(&supply(SupplyState::Available)));
    assert!(!w.m.changes_nothing(&supply(SupplyState::Destroyed)));
    let bang = Command::Bang {
        computer: c.clone(),
        partition: p.clone(),
        message: String::new(),
    };
    assert!(!w.m.changes_nothing(&bang), "a bang always bumps");
}

#[test]
fn allocation_spreads_across_computers() {
    let mut w = World::new();
    for c in ["COMP-1", "COMP-2", "COMP-3"] {
        w.computer(c, 4, &[]);
    }
    let mut per_computer = BTreeMap::new();
    for i in 0..6 {
        let inst = instance(w.request("alice", &format!("i{i}"), &[], &[]));
        *per_computer.entry(inst.partition.unwrap().0).or_insert(0) += 1;
    }
    assert_eq!(
        per_computer.values().copied().collect::<Vec<_>>(),
        vec![2, 2, 2],
        "{per_computer:?}"
    );
}

#[test]
fn equally_loaded_computers_take_turns_by_sequence_number() {
    let mut w = World::new();
    for c in 0..5 {
        w.computer(&format!("COMP-{c}"), 2, &[]);
    }
    let mut chosen = BTreeSet::new();
    for seq in 0..64 {
        let place = w.m.choose_partition(&Filter::default(), SR, "SOFTINST-none", seq);
        assert_eq!(
            place.clone().ok(),
            reference_choice(&w.m, &Filter::default(), SR, "SOFTINST-none", seq)
        );
        chosen.insert(place.unwrap().0);
    }
    assert_eq!(
        chosen.len(),
        5,
        "every idle computer is first for some sequence number: {chosen:?}"
    );
}

#[test]
fn sla_keys_are_honoured() {
    let mut w = World::new();
    w.computer("COMP-EU", 2, &[("region", "eu")]);
    w.computer("COMP-US", 2, &[("region", "us")]);
    let eu = instance(w.request("alice", "a", &[], &[("region", "eu")]));
    assert_eq!(eu.partition.unwrap().0, "COMP-EU");
    let pinned = instance(w.request("alice", "b", &[], &[("computer_guid", "COMP-US")]));
    assert_eq!(pinned.partition.unwrap().0, "COMP-US");
    let nowhere = instance(w.request("alice", "c", &[], &[("region", "mars")]));
    assert!(nowhere.partition.is_none() && nowhere.pending_reason.is_some());
    let unknown = instance(w.request("alice", "d", &[], &[("colour", "blue")]));
    assert!(unknown.pending_reason.unwrap().contains("colour"));
}

#[test]
fn unique_by_network_puts_tree_members_on_different_networks() {
    let mut w = World::new();
    w.computer("COMP-A", 3, &[("network_guid", "NET-A")]);
    w.computer("COMP-B", 3, &[("network_guid", "NET-B")]);
    let root = instance(w.request("alice", "root", &[], &[("mode", "unique_by_network")]));
    let (c, p) = root.partition.clone().unwrap();
    let child = instance(w.run(Command::Request(RequestSpec {
        requester: RequestOrigin::Partition {
            computer: c.clone(),
            partition: p,
        },
        title: "replica".into(),
        software_release: SR.into(),
        software_type: "default".into(),
        parameters: Params::new(),
        sla: params(&[("mode", "unique_by_network")]),
        shared: false,
        state: None,
    })));
    assert_ne!(child.partition.unwrap().0, c);
}

#[test]
fn pending_instance_is_placed_when_capacity_appears() {
    let mut w = World::new();
    w.computer("COMP-1", 1, &[]);
    instance(w.request("alice", "a", &[], &[]));
    let waiting = instance(w.request("alice", "b", &[], &[]));
    assert!(waiting.partition.is_none());
    w.computer("COMP-2", 1, &[]);
    let placed = w.m.instance_by_title(&Scope::User("alice".into()), "b").unwrap();
    assert_eq!(placed.partition.as_ref().unwrap().0, "COMP-2");
}

#[test]
fn shared_instance_waits_for_its_host_and_attaches_when_it_appears() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let site = instance(w.request("bob", "site", &[], &[]));
    // A release no instance runs yet: the shared request waits.
    let (c, p) = site.partition.clone().unwrap();
    let waiting = instance(w.run(Command::Request(RequestSpec {
        requester: RequestOrigin::Partition {
            computer: c,
            partition: p,
        },
        title: "cdn-route".into(),
        software_release: "https://example.org/cdn.cfg".into(),
        software_type: "default".into(),
        parameters: Params::new(),
        sla: Params::new(),
        shared: true,
        state: None,
    })));
    assert!(waiting.host.is_none() && waiting.pending_reason.is_some());
    w.run(Command::Supply {
        computer: "COMP-1".into(),
        url: "https://example.org/cdn.cfg".into(),
        state: SupplyState::Available,
    });
    assert!(
        w.m.instances[&waiting.id].host.is_none(),
        "no host yet: supply alone is not enough"
    );
    let cdn = instance(w.run(Command::Request(RequestSpec {
        requester: RequestOrigin::User("alice".into()),
        title: "cdn".into(),
        software_release: "https://example.org/cdn.cfg".into(),
        software_type: "default".into(),
        parameters: Params::new(),
        sla: Params::new(),
        shared: false,
        state: None,
    })));
    assert_eq!(
        w.m.instances[&waiting.id].host.as_deref(),
        Some(cdn.id.as_str()),
        "attached once its host exists"
    );
}

#[test]
fn publication_bumps_requester_not_self() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let root = instance(w.request("alice", "root", &[], &[]));
    let child = instance(w.child(&root, "db", false));
    let root_ts = w.m.instances[&root.id].timestamp;
    let (c, p) = child.partition.clone().unwrap();
    w.run(Command::SetConnection {
        computer: c.clone(),
        partition: p.clone(),
        shared_reference: None,
        connection: params(&[("url", "http://db")]),
    });
    assert_eq!(
        w.m.instances[&child.id].timestamp, child.timestamp,
        "own publication does not bump"
    );
    assert!(w.m.instances[&root.id].timestamp > root_ts, "the requester is bumped");
    // Publishing the same thing again changes nothing.
    let root_ts = w.m.instances[&root.id].timestamp;
    w.run(Command::SetConnection {
        computer: c,
        partition: p,
        shared_reference: None,
        connection: params(&[("url", "http://db")]),
    });
    assert_eq!(w.m.instances[&root.id].timestamp, root_ts);
}

#[test]
fn shared_instance_attaches_to_host_and_bumps_it() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let host = instance(w.request("alice", "frontend", &[], &[]));
    let user = instance(w.request("bob", "site", &[], &[]));
    let shared = instance(w.child(&user, "route", true));
    assert_eq!(shared.host.as_deref(), Some(host.id.as_str()));
    assert!(
        w.m.instances[&host.id].timestamp > host.timestamp,
        "host's list changed"
    );
    assert_eq!(w.m.hosted_by(&host.id).count(), 1);
    // The host publishes for the shared instance: its requester is bumped.
    let user_ts = w.m.instances[&user.id].timestamp;
    let (c, p) = host.partition.clone().unwrap();
    w.run(Command::SetConnection {
        computer: c,
        partition: p,
        shared_reference: Some(shared.id.clone()),
        connection: params(&[("url", "https://route")]),
    });
    assert!(w.m.instances[&user.id].timestamp > user_ts);
    assert_eq!(
        w.m.instances[&shared.id].connection,
        params(&[("url", "https://route")])
    );
}

#[test]
fn destruction_frees_children_before_root() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let root = instance(w.request("alice", "root", &[], &[]));
    let child = instance(w.child(&root, "db", false));
    w.destroy("alice", "root");
    assert_eq!(
        w.m.instances[&child.id].requested_state,
        RequestedState::Destroyed,
        "descendants follow"
    );
    let (rc, rp) = root.partition.clone().unwrap();
    let r = w.run(Command::DestroyedPartition {
        computer: rc.clone(),
        partition: rp.clone(),
    });
    assert!(matches!(r, Reply::Note(ref n) if n.contains("child")), "{r:?}");
    assert!(w.m.instances.contains_key(&root.id), "root kept while a child remains");
    let (cc, cp) = child.partition.clone().unwrap();
    assert_eq!(
        w.run(Command::DestroyedPartition {
            computer: cc,
            partition: cp
        }),
        Reply::Done
    );
    assert_eq!(
        w.run(Command::DestroyedPartition {
            computer: rc,
            partition: rp
        }),
        Reply::Done
    );
    assert!(w.m.instances.is_empty());
    assert!(w.m.partitions.values().all(|p| p.state == SlapState::Free));
}

#[test]
fn bang_bumps_the_whole_tree() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let root = instance(w.request("alice", "root", &[], &[]));
    let child = instance(w.child(&root, "db", false));
    let before: Vec<u64> = [&root.id, &child.id]
        .iter()
        .map(|i| w.m.instances[*i].timestamp)
        .collect();
    let (c, p) = child.partition.clone().unwrap();
    w.run(Command::Bang {
        computer: c,
        partition: p,
        message: "restart".into(),
    });
    let after: Vec<u64> = [&root.id, &child.id]
        .iter()
        .map(|i| w.m.instances[*i].timestamp)
        .collect();
    assert!(after[0] > before[0] && after[1] > before[1]);
}

#[test]
fn related_instance_list_destroys_unlinked_children() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let root = instance(w.request("alice", "root", &[], &[]));
    let keep = instance(w.child(&root, "keep", false));
    let drop_ = instance(w.child(&root, "drop", false));
    let (c, p) = root.partition.clone().unwrap();
    w.run(Command::SetRelatedInstances {
        computer: c,
        partition: p,
        titles: vec!["keep".into()],
    });
    assert_eq!(w.m.instances[&keep.id].requested_state, RequestedState::Started);
    assert_eq!(w.m.instances[&drop_.id].requested_state, RequestedState::Destroyed);
}

#[test]
fn retried_write_returns_the_recorded_answer_and_allocates_once() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let proposal = Proposal {
        request_id: Some(RequestId {
            client: "gw-1".into(),
            seq: 7,
        }),
        time_us: 5_000_000,
        command: Command::Request(RequestSpec {
            requester: RequestOrigin::User("alice".into()),
            title: "once".into(),
            software_release: SR.into(),
            software_type: "default".into(),
            parameters: Params::new(),
            sla: Params::new(),
            shared: false,
            state: None,
        }),
    };
    let first = w.m.apply(100, proposal.clone());
    let busy = w.m.partitions.values().filter(|p| p.state == SlapState::Busy).count();
    let retry = w.m.apply(101, proposal.clone());
    assert_eq!(first, retry);
    assert_eq!(
        w.m.partitions.values().filter(|p| p.state == SlapState::Busy).count(),
        busy
    );
    let older = Proposal {
        request_id: Some(RequestId {
            client: "gw-1".into(),
            seq: 6,
        }),
        ..proposal
    };
    assert!(matches!(
        w.m.apply(102, older),
        Reply::Refused(Refusal::StaleRequest { .. })
    ));
}

#[test]
fn refusals_change_nothing() {
    let mut w = World::new();
    w.computer("COMP-1", 2, &[]);
    let before = w.m.clone();
    for cmd in [
        Command::Supply {
            computer: "NOPE".into(),
            url: SR.into(),
            state: SupplyState::Available,
        },
        Command::Bang {
            computer: "COMP-1".into(),
            partition: "slappart0".into(),
            message: String::new(),
        },
        Command::SetComputer {
            id: String::new(),
            address: String::new(),
            netmask: String::new(),
            capacity: Params::new(),
            categories: Params::new(),
            partitions: vec![],
        },
    ] {
        let r = w.run(cmd);
        assert!(matches!(r, Reply::Refused(_)), "{r:?}");
        // The log position and the count of applied proposals move on any
        // write, refused or not; everything else must stay as it was.
        let mut after = w.m.clone();
        after.last_index = before.last_index;
        after.applied = before.applied;
        after.dirty.clear();
        let mut b = before.clone();
        b.dirty.clear();
        assert_eq!(after, b);
    }
}

#[test]
fn records_round_trip() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[("region", "eu")]);
    let root = instance(w.request("alice", "root", &[("k", "<&\"é>")], &[]));
    w.child(&root, "db", false);
    w.child(&root, "route", true);
    let records = persist::all_records(&w.m);
    let back = persist::restore(&mut records.into_iter()).unwrap();
    let mut expected = w.m.clone();
    expected.dirty.clear();
    assert_eq!(back, expected);
}

/// A fingerprint named for a test: the name's bytes, zero-padded (so
/// fingerprints sort as their names do).
fn fp(name: &str) -> Fingerprint {
    let mut bytes = [0u8; 32];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    Fingerprint(bytes)
}

fn partition_cert(fingerprint: &str, partition: &str) -> Certificate {
    Certificate {
        serial: format!("s-{fingerprint}"),
        fingerprint: fp(fingerprint),
        role: Role::Partition("COMP-1".into(), partition.into()),
        cert_pem: Pem::from_text(""),
        key_pem: None,
        not_after: 0,
        revoked: false,
    }
}

#[test]
fn a_partition_has_one_live_certificate_and_restore_agrees() {
    let mut w = World::new();
    w.computer("COMP-1", 2, &[]);
    let inst = instance(w.request("alice", "a", &[], &[]));
    let (c, p) = inst.partition.clone().unwrap();
    // Recorded in the opposite order of their fingerprints, as a retried
    // and a first issuance may land: the second is refused.
    let record = |fp: &str| Command::RecordCertificate {
        certificate: partition_cert(fp, &p),
        registration: None,
    };
    assert_eq!(w.run(record("bb")), Reply::Done);
    assert!(matches!(w.run(record("aa")), Reply::Refused(Refusal::Invalid(_))));
    assert_eq!(w.m.partition_certificate(&c, &p).map(|c| c.fingerprint), Some(fp("bb")));
    assert_restore_agrees(&w.m, "the index rebuilt at restore is the live one");
    // Freeing the partition revokes its certificate on every replica alike.
    w.request("alice", "a", &[], &[]);
    destroy_and_free(&mut w, "a", &(c.clone(), p.clone()));
    assert!(w.m.partition_certificate(&c, &p).is_none());
    assert!(w.m.certificates.values().all(|c| c.revoked));
}

#[test]
fn a_guarded_command_applies_only_while_the_partition_holds_the_instance() {
    let mut w = World::new();
    w.computer("COMP-1", 1, &[]);
    let inst = instance(w.request("alice", "a", &[], &[]));
    let (c, p) = inst.partition.clone().unwrap();
    let publish = |instance: &str, value: &str| Command::IfPartitionHolds {
        computer: c.clone(),
        partition: p.clone(),
        instance: instance.into(),
        then: Box::new(Command::SetConnection {
            computer: c.clone(),
            partition: p.clone(),
            shared_reference: None,
            connection: params(&[("url", value)]),
        }),
    };
    assert_eq!(w.run(publish(&inst.id, "one")), Reply::Done);
    assert!(matches!(
        w.run(publish("SOFTINST-999", "two")),
        Reply::Refused(Refusal::NotFound(_))
    ));
    assert_eq!(w.m.instances[&inst.id].connection, params(&[("url", "one")]));
}

fn usage(computer: &str, sha: &str, partition: &str, quantity: f64) -> Command {
    let quantity = ledger::Quantity::from_decimal(quantity).unwrap();
    Command::BookUsage {
        computer: computer.into(),
        journal_sha256: sha.into(),
        lines: vec![ledger::UsageLine {
            partition: partition.into(),
            resource: "CPU Consumption".into(),
            category: Some("cpu".into()),
            quantity,
            stop_us: None,
        }],
    }
}

#[test]
fn usage_is_booked_once_and_attributed_to_the_subscriber() {
    let mut w = World::new();
    w.computer("COMP-1", 2, &[]);
    w.computer("COMP-2", 1, &[]);
    let inst = instance(w.request("alice", "a", &[], &[("computer_guid", "COMP-1")]));
    let (c, p) = inst.partition.clone().unwrap();
    assert_eq!(w.run(usage(&c, "j1", &p, 42.5)), Reply::Done);
    let once = w.m.ledger.clone();
    // A node resending the same journal (after a lost answer) adds nothing.
    assert!(matches!(w.run(usage(&c, "j1", &p, 42.5)), Reply::Note(_)));
    assert_eq!(w.m.ledger, once);
    let m = once.movements.values().next().unwrap();
    assert_eq!(
        (m.destination.as_str(), m.subscription.as_str()),
        ("alice", inst.root.as_str())
    );
    assert_eq!(
        (m.resource.as_str(), m.quantity, m.source.as_str()),
        ("cpu", ledger::Quantity(42_500_000), c.as_str())
    );
    // Refused whole, nothing stored: an unknown computer, a partition of another.
    assert!(matches!(
        w.run(usage("COMP-9", "j2", &p, 1.0)),
        Reply::Refused(Refusal::NotFound(_))
    ));
    // COMP-2 has one partition: slappart1 is one of COMP-1's only.
    assert!(matches!(
        w.run(usage("COMP-2", "j3", "slappart1", 1.0)),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert!(matches!(
        w.run(usage(&c, "j4", "slappart9", 1.0)),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert_eq!(w.m.ledger, once);
}

#[test]
fn hosting_runs_from_started_to_stopped_or_freed() {
    let mut w = World::new();
    w.computer("COMP-1", 2, &[]);
    let inst = instance(w.request("alice", "a", &[], &[]));
    let (c, p) = inst.partition.clone().unwrap();
    let report = |report| Command::ReportInstance {
        computer: c.clone(),
        partition: p.clone(),
        shared_reference: None,
        report,
    };
    w.run(report(InstanceReport::Started));
    assert_eq!(w.m.ledger.spans.len(), 1);
    w.run(report(InstanceReport::Started));
    assert_eq!(w.m.ledger.spans.len(), 1, "started twice is one span");
    w.run(report(InstanceReport::Stopped));
    assert!(w.m.ledger.spans.is_empty());
    assert_eq!(w.m.ledger.movements.len(), 1);
    w.run(report(InstanceReport::Started));
    w.run(Command::Request(RequestSpec {
        requester: RequestOrigin::User("alice".into()),
        title: "a".into(),
        software_release: SR.into(),
        software_type: "default".into(),
        parameters: Params::new(),
        sla: Params::new(),
        shared: false,
        state: Some(RequestedState::Destroyed),
    }));
    w.run(Command::DestroyedPartition {
        computer: c.clone(),
        partition: p.clone(),
    });
    assert!(w.m.ledger.spans.is_empty(), "freeing the partition closes hosting");
    assert_eq!(w.m.ledger.movements.len(), 2);
    assert!(w
        .m
        .ledger
        .movements
        .values()
        .all(|m| m.kind == ledger::MovementKind::Hosting && m.destination == "alice" && m.stop_us > m.start_us));
    let back = persist::restore(&mut persist::all_records(&w.m).into_iter()).unwrap();
    assert_eq!(back.ledger, w.m.ledger, "the ledger round-trips through its records");
}

// ----- property test ------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Request {
        user: u8,
        title: u8,
        param: u8,
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
    },
    NodeDestroyed {
        instance: u8,
    },
    Format {
        computer: u8,
        partitions: u8,
    },
    Bang {
        instance: u8,
    },
    Report {
        instance: u8,
        kind: u8,
    },
    SoftwareReport {
        computer: u8,
        kind: u8,
    },
    Supply {
        computer: u8,
        available: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2u8, 0..4u8, 0..3u8, proptest::option::of(0..3u8))
            .prop_map(|(user, title, param, state)| Op::Request { user, title, param, state }),
        2 => (any::<u8>(), 0..3u8, any::<bool>()).prop_map(|(parent, title, shared)| Op::Child { parent, title, shared }),
        1 => (any::<u8>(), 0..3u8).prop_map(|(instance, value)| Op::Publish { instance, value }),
        2 => any::<u8>().prop_map(|instance| Op::NodeDestroyed { instance }),
        1 => (0..3u8, 0..5u8).prop_map(|(computer, partitions)| Op::Format { computer, partitions }),
        1 => any::<u8>().prop_map(|instance| Op::Bang { instance }),
        2 => (any::<u8>(), 0..3u8).prop_map(|(instance, kind)| Op::Report { instance, kind }),
        1 => (0..3u8, 0..4u8).prop_map(|(computer, kind)| Op::SoftwareReport { computer, kind }),
        1 => (0..3u8, any::<bool>()).prop_map(|(computer, available)| Op::Supply { computer, available }),
    ]
}

fn nth_placed(m: &Master, n: u8) -> Option<Instance> {
    let placed: Vec<&Instance> = m
        .instances
        .values()
        .map(|i| &**i)
        .filter(|i| i.partition.is_some())
        .collect();
    if placed.is_empty() {
        None
    } else {
        Some(placed[n as usize % placed.len()].clone())
    }
}

/// Applies a request; when `unchanged_by` said beforehand that it changes
/// nothing (so a replica may answer it with a read), checks that applying it
/// indeed answers that instance and leaves every record as it was.
fn request_checking_read_answer(w: &mut World, spec: RequestSpec) -> Result<Reply, TestCaseError> {
    let read_answer = w.m.unchanged_by(&spec).cloned();
    let before = records_but_meta(&w.m);
    let reply = w.run(Command::Request(spec));
    if let Some(inst) = read_answer {
        prop_assert_eq!(
            &reply,
            &Reply::Instance(Arc::new(inst)),
            "a read answer differs from applying"
        );
        prop_assert!(
            before == records_but_meta(&w.m),
            "a request said unchanged changed the state"
        );
    }
    Ok(reply)
}

/// Applies `command`; when `changes_nothing` said beforehand that it would
/// change nothing, checks that it answered done and left every record as it was.
fn apply_checking_changes_nothing(w: &mut World, command: Command) -> Result<Reply, TestCaseError> {
    let nothing = w.m.changes_nothing(&command);
    let before = records_but_meta(&w.m);
    let reply = w.run(command);
    if nothing {
        prop_assert_eq!(&reply, &Reply::Done);
        prop_assert!(
            before == records_but_meta(&w.m),
            "a command said to change nothing changed the state"
        );
    }
    Ok(reply)
}

/// Every record but the applied counter, which moves with every entry.
fn records_but_meta(m: &Master) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut r = persist::all_records(m);
    r.retain(|(k, _)| k.as_slice() != b"m");
    r.sort();
    r
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_keep_invariants(ops in prop::collection::vec(op(), 1..60)) {
        let mut w = World::new();
        w.computer("COMP-0", 3, &[]);
        // The model: what each root request last asked for.
        let mut model: BTreeMap<(u8, u8), (String, RequestedState)> = BTreeMap::new();
        let mut last_ts: BTreeMap<InstanceId, u64> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Request { user, title, param, state } => {
                    let state = state.map(|s| [RequestedState::Started, RequestedState::Stopped, RequestedState::Destroyed][s as usize]);
                    let p = param.to_string();
                    let before = w.m.instance_by_title(&Scope::User(format!("u{user}")), &format!("t{title}")).cloned();
                    let reply = request_checking_read_answer(&mut w, RequestSpec {
                        requester: RequestOrigin::User(format!("u{user}")),
                        title: format!("t{title}"),
                        software_release: SR.into(),
                        software_type: "default".into(),
                        parameters: params(&[("p", &p)]),
                        sla: Params::new(),
                        shared: false,
                        state,
                    })?;
                    match (&before, state) {
                        (None, Some(RequestedState::Destroyed)) => prop_assert!(matches!(reply, Reply::Refused(Refusal::NotFound(_)))),
                        _ => {
                            let expected_state = state.or(before.as_ref().map(|b| b.requested_state)).unwrap_or(RequestedState::Started);
                            if let Reply::Instance(i) = &reply {
                                prop_assert_eq!(&i.parameters, &params(&[("p", &p)]));
                                prop_assert_eq!(i.requested_state, expected_state);
                                // Identical re-request: no bump.
                                if let Some(b) = &before {
                                    if b.parameters == i.parameters && b.requested_state == i.requested_state && b.is_placed() == i.is_placed() {
                                        prop_assert_eq!(b.timestamp, i.timestamp);
                                    }
                                }
                            }
                            model.insert((user, title), (p, expected_state));
                        }
                    }
                }
                Op::Child { parent, title, shared } => {
                    if let Some(parent) = nth_placed(&w.m, parent) {
                        request_checking_read_answer(&mut w, child_spec(&parent, &format!("c{title}"), shared))?;
                    }
                }
                Op::Publish { instance, value } => {
                    if let Some(i) = nth_placed(&w.m, instance) {
                        let (c, p) = i.partition.clone().unwrap();
                        let ts = i.timestamp;
                        let connection = params(&[("v", &value.to_string())]);
                        apply_checking_changes_nothing(&mut w, Command::SetConnection { computer: c, partition: p, shared_reference: None, connection })?;
                        prop_assert_eq!(w.m.instances[&i.id].timestamp, ts, "own publication never bumps");
                    }
                }
                Op::NodeDestroyed { instance } => {
                    if let Some(i) = nth_placed(&w.m, instance) {
                        let (c, p) = i.partition.clone().unwrap();
                        let had_children = w.m.children_of(&i.id).count() > 0;
                        w.run(Command::DestroyedPartition { computer: c, partition: p });
                        if i.requested_state == RequestedState::Destroyed && !had_children {
                            prop_assert!(!w.m.instances.contains_key(&i.id));
                        } else {
                            prop_assert!(w.m.instances.contains_key(&i.id));
                        }
                    }
                }
                Op::Format { computer, partitions } => {
                    w.computer(&format!("COMP-{computer}"), partitions as usize, &[]);
                }
                Op::Bang { instance } => {
                    if let Some(i) = nth_placed(&w.m, instance) {
                        let (c, p) = i.partition.clone().unwrap();
                        w.run(Command::Bang { computer: c, partition: p, message: String::new() });
                    }
                }
                Op::Report { instance, kind } => {
                    if let Some(i) = nth_placed(&w.m, instance) {
                        let (c, p) = i.partition.clone().unwrap();
                        let report = [InstanceReport::Started, InstanceReport::Stopped, InstanceReport::Error("e".into())][kind as usize].clone();
                        apply_checking_changes_nothing(&mut w, Command::ReportInstance { computer: c, partition: p, shared_reference: None, report })?;
                    }
                }
                Op::SoftwareReport { computer, kind } => {
                    let report = [SoftwareReport::Building, SoftwareReport::Available, SoftwareReport::Error("e".into()), SoftwareReport::Destroyed][kind as usize].clone();
                    apply_checking_changes_nothing(&mut w, Command::ReportSoftware { computer: format!("COMP-{computer}"), url: SR.into(), report })?;
                }
                Op::Supply { computer, available } => {
                    let state = if available { SupplyState::Available } else { SupplyState::Destroyed };
                    apply_checking_changes_nothing(&mut w, Command::Supply { computer: format!("COMP-{computer}"), url: SR.into(), state })?;
                }
            }
            // Timestamps never go back.
            for inst in w.m.instances.values() {
                if let Some(old) = last_ts.insert(inst.id.clone(), inst.timestamp) {
                    prop_assert!(inst.timestamp >= old, "timestamp of {} went back", inst.id);
                }
            }
            // Every root the model still knows (not destroyed) exists with its last parameters.
            for ((user, title), (p, state)) in &model {
                if *state != RequestedState::Destroyed {
                    let inst = w.m.instance_by_title(&Scope::User(format!("u{user}")), &format!("t{title}"));
                    prop_assert!(inst.is_some(), "u{user}/t{title} lost");
                    prop_assert_eq!(inst.unwrap().parameters.get("p"), Some(p));
                }
            }
            // Persisted records restore to the same state.
            let records = persist::all_records(&w.m);
            let mut back = persist::restore(&mut records.into_iter()).unwrap();
            back.dirty = w.m.dirty.clone();
            prop_assert_eq!(&back, &w.m);
        }
    }
}

#[test]
fn watches_learn_which_documents_changed_after_a_revision() {
    let mut w = World::new();
    w.computer("COMP-1", 2, &[]);
    w.computer("COMP-2", 2, &[]);
    let rev = |w: &World, c: &str| w.m.computers[c].revision;
    let before = rev(&w, "COMP-2");
    assert_eq!(
        w.m.computers_revised_after(before).count(),
        0,
        "nothing changed after the last revision"
    );
    let Reply::Instance(_) = w.request("alice", "blog", &[], &[("computer_guid", "COMP-1")]) else {
        panic!("not placed")
    };
    let changed: Vec<&str> = w.m.computers_revised_after(before).map(|(_, c)| c.as_str()).collect();
    assert_eq!(changed, vec!["COMP-1"], "only the computer the instance landed on");
    assert!(rev(&w, "COMP-1") > before);
}

#[test]
fn revoking_a_certificate_that_reads_documents_moves_the_poller_revocations() {
    let mut w = World::new();
    w.computer("COMP-1", 2, &[]);
    let inst = instance(w.request("alice", "a", &[], &[]));
    let (_, p) = inst.partition.clone().unwrap();
    let cert = |fp: &str, role: Role| Certificate {
        role,
        ..partition_cert(fp, &p)
    };
    for c in [
        cert("node", Role::Computer("COMP-1".into())),
        cert("ops", Role::Admin),
        cert("alice", Role::User("alice".into())),
        cert("part", Role::Partition("COMP-1".into(), p.clone())),
    ] {
        assert_eq!(
            w.run(Command::RecordCertificate {
                certificate: c,
                registration: None
            }),
            Reply::Done
        );
    }
    let revoke = |w: &mut World, fp: &str| {
        w.run(Command::RevokeCertificate {
            serial: format!("s-{fp}"),
        })
    };
    assert_eq!(w.m.poller_revocations(), 0);
    // A user or a partition cannot read a computer's document: no move.
    revoke(&mut w, "alice");
    revoke(&mut w, "part");
    assert_eq!(w.m.poller_revocations(), 0);
    revoke(&mut w, "node");
    assert_eq!(w.m.poller_revocations(), 1);
    revoke(&mut w, "node");
    assert_eq!(w.m.poller_revocations(), 1, "revoked once");
    revoke(&mut w, "ops");
    assert_eq!(w.m.poller_revocations(), 2);
    let back = persist::restore(&mut persist::all_records(&w.m).into_iter()).unwrap();
    assert_eq!(
        back.poller_revocations(),
        2,
        "rebuilt at restore, as every replica counts it"
    );
}

#[test]
fn certificates_expiring_are_counted_by_kind_with_the_earliest_end() {
    let mut w = World::new();
    let cert = |name: &str, role: Role, not_after: u64| Certificate {
        serial: format!("s-{name}"),
        fingerprint: fp(name),
        role,
        cert_pem: Pem::from_text(""),
        key_pem: None,
        not_after,
        revoked: false,
    };
    for c in [
        cert("a", Role::User("alice".into()), 1_000),
        cert("b", Role::User("bob".into()), 500),
        cert("c", Role::Gateway("gw1".into()), 900),
        cert("d", Role::User("carol".into()), 5_000),
        cert("e", Role::Admin, 700),
    ] {
        assert_eq!(
            w.run(Command::RecordCertificate {
                certificate: c,
                registration: None
            }),
            Reply::Done
        );
    }
    w.run(Command::RevokeCertificate { serial: "s-e".into() });
    let expiring = w.m.certificates_expiring(2_000);
    assert_eq!(expiring.get("user"), Some(&(2, 500)), "carol's ends later; bob's first");
    assert_eq!(expiring.get("gateway"), Some(&(1, 900)));
    assert_eq!(expiring.get("administrator"), None, "revoked");
}

#[test]
fn the_cluster_version_only_rises_and_survives_a_restore() {
    let mut w = World::new();
    assert_eq!(w.m.effective_version(), 1);
    assert_eq!(w.run(Command::SetClusterVersion { version: 2 }), Reply::Done);
    assert_eq!(w.m.effective_version(), 2);
    assert!(matches!(
        w.run(Command::SetClusterVersion { version: 1 }),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert_eq!(w.m.effective_version(), 2);
    let back = persist::restore(&mut persist::all_records(&w.m).into_iter()).unwrap();
    assert_eq!(back.effective_version(), 2);
}

#[test]
fn a_renewal_records_the_new_certificate_for_the_same_holder_and_keeps_the_old_valid() {
    let mut w = World::new();
    let cert = |name: &str, role: Role| Certificate {
        serial: format!("s-{name}"),
        fingerprint: fp(name),
        role,
        cert_pem: Pem::from_text(""),
        key_pem: None,
        not_after: 0,
        revoked: false,
    };
    let gw = Role::Gateway("gw1".into());
    w.run(Command::RecordCertificate {
        certificate: cert("old", gw.clone()),
        registration: None,
    });
    let renew = |serial: &str, c: Certificate| Command::RenewCertificate {
        serial: serial.into(),
        certificate: Box::new(c),
    };
    // Another holder, an unknown serial: refused, nothing changed.
    let before = w.m.certificates.clone();
    assert!(matches!(
        w.run(renew("s-old", cert("new", Role::Admin))),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert!(matches!(
        w.run(renew("s-nope", cert("new", gw.clone()))),
        Reply::Refused(Refusal::NotFound(_))
    ));
    assert_eq!(w.m.certificates, before);
    assert_eq!(w.run(renew("S-OLD", cert("new", gw.clone()))), Reply::Done);
    assert!(
        !w.m.certificates[&fp("old")].revoked,
        "the old one stays valid until it expires: its holder may not have the new one yet"
    );
    assert_eq!(w.m.certificates[&fp("new")].role, gw);
    // The same renewal recorded twice is refused.
    assert!(matches!(
        w.run(renew("s-old", cert("new", gw.clone()))),
        Reply::Refused(Refusal::Invalid(_))
    ));
    // A revoked certificate is not renewed again.
    w.run(Command::RevokeCertificate { serial: "s-old".into() });
    let before = w.m.certificates.clone();
    assert!(matches!(
        w.run(renew("s-old", cert("newer", gw))),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert_eq!(w.m.certificates, before);
    // A renewal is of version 2, even inside a guard.
    assert_eq!(renew("s", cert("x", Role::Admin)).since(), 2);
    let guarded = Command::IfPartitionHolds {
        computer: "C".into(),
        partition: "p".into(),
        instance: "i".into(),
        then: Box::new(renew("s", cert("x", Role::Admin))),
    };
    assert_eq!(guarded.since(), 2);
    assert_eq!(Command::SetClusterVersion { version: 2 }.since(), 1);
    // Applying a move to version 2 needs a replica that speaks it.
    assert_eq!(Command::SetClusterVersion { version: 2 }.needs(), 2);
    assert_eq!(renew("s", cert("x", Role::Admin)).needs(), 2);
}

#[test]
fn a_ca_rotation_trusts_both_cas_until_it_is_finished_and_survives_a_restore() {
    let mut w = World::new();
    let ca = |name: &str| Authority {
        cert_pem: format!("-----{name} cert-----\n"),
        key_pem: format!("-----{name} key-----\n"),
    };
    let rotate = |a: Authority| Command::RotateAuthority {
        authority: a,
        cross_pem: "-----cross-----\n".into(),
    };
    // Nothing to rotate yet, nothing to finish: refused, nothing changed.
    assert!(matches!(w.run(rotate(ca("new"))), Reply::Refused(Refusal::Invalid(_))));
    assert!(matches!(
        w.run(Command::FinishRotation),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert_eq!((w.m.authority.as_ref(), w.m.rotation.as_ref()), (None, None));
    w.run(Command::SetAuthority(ca("old")));
    assert_eq!(w.m.trust_pem(), "-----old cert-----\n");
    assert_eq!(w.m.chain_pem(), "");
    assert!(
        matches!(w.run(rotate(ca("old"))), Reply::Refused(Refusal::Invalid(_))),
        "the same CA"
    );

    assert_eq!(w.run(rotate(ca("new"))), Reply::Done);
    assert_eq!(w.m.authority, Some(ca("new")), "the new CA signs");
    assert_eq!(
        w.m.trust_pem(),
        "-----new cert-----\n-----old cert-----\n",
        "both trusted, the signing one first"
    );
    assert_eq!(w.m.chain_pem(), "-----cross-----\n");
    // One rotation at a time.
    let before = w.m.clone();
    assert!(matches!(
        w.run(rotate(ca("newer"))),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert_eq!(w.m.authority, before.authority);
    assert_eq!(w.m.rotation, before.rotation);
    // A restore (a restart, a snapshot) keeps the rotation under way.
    let back = persist::restore(&mut persist::all_records(&w.m).into_iter()).unwrap();
    assert_eq!(
        (back.authority.as_ref(), back.rotation.as_ref()),
        (w.m.authority.as_ref(), w.m.rotation.as_ref())
    );

    assert_eq!(w.run(Command::FinishRotation), Reply::Done);
    assert_eq!(w.m.trust_pem(), "-----new cert-----\n", "the old CA is trusted no more");
    assert_eq!(w.m.chain_pem(), "");
    let back = persist::restore(&mut persist::all_records(&w.m).into_iter()).unwrap();
    assert_eq!(back.rotation, None, "the finished rotation's record is gone");
    // Both are of version 3.
    assert_eq!(rotate(ca("x")).since(), 3);
    assert_eq!(Command::FinishRotation.needs(), 3);
}

#[test]
fn a_rotation_replaces_partition_certificates_and_keeps_the_old_ones_until_it_ends() {
    let mut w = World::new();
    w.run(Command::SetClusterVersion { version: 4 });
    w.computer("COMP-1", 3, &[]);
    let (old_ca, new_ca) = (signing::ca("old CA"), signing::ca("new CA"));
    let cross_pem = "-----cross-----\n".to_string();
    w.run(Command::SetAuthority(old_ca.clone()));
    let mut partitions = Vec::new();
    for title in ["a", "b", "c"] {
        let (c, p) = instance(w.request("alice", title, &[], &[])).partition.unwrap();
        partitions.push((c, p));
    }
    let issue = |ca: &Authority, (c, p): &(String, String)| signing::partition(ca, c, p);
    for key in &partitions {
        let record = Command::RecordCertificate {
            certificate: issue(&old_ca, key),
            registration: None,
        };
        assert_eq!(w.run(record), Reply::Done);
    }
    let old_of = |m: &Master, (c, p): &(String, String)| m.partition_certificate(c, p).unwrap().clone();
    let old: Vec<Certificate> = partitions.iter().map(|k| old_of(&w.m, k)).collect();
    let replace = |cert: Certificate| Command::ReplacePartitionCertificate {
        certificate: Box::new(cert),
    };
    // Outside a rotation nothing is replaced.
    assert!(matches!(
        w.run(replace(issue(&old_ca, &partitions[0]))),
        Reply::Refused(Refusal::Invalid(_))
    ));
    assert_eq!(w.m.stale_partitions(10).count(), 0);

    w.run(Command::RotateAuthority {
        authority: new_ca.clone(),
        cross_pem,
    });
    let stale: Vec<_> = w.m.stale_partitions(10).cloned().collect();
    assert_eq!(
        stale, partitions,
        "every partition's certificate is from the old CA now"
    );
    // A certificate from the old CA signed late is refused, for a
    // replacement as for a partition without one.
    let refused = w.run(replace(issue(&old_ca, &partitions[0])));
    assert!(
        matches!(refused, Reply::Refused(Refusal::Invalid(ref m)) if m.contains("CA that signs now")),
        "{refused:?}"
    );

    let revision = w.m.computers["COMP-1"].revision;
    let new0 = issue(&new_ca, &partitions[0]);
    assert_eq!(w.run(replace(new0.clone())), Reply::Done);
    assert!(
        w.m.computers["COMP-1"].revision > revision,
        "the document shows the new serial"
    );
    assert_eq!(
        w.m.partition_certificate(&partitions[0].0, &partitions[0].1),
        Some(&new0)
    );
    assert!(
        !w.m.certificates[&old[0].fingerprint].revoked,
        "the old one stays valid"
    );
    assert!(
        matches!(
            w.run(replace(issue(&new_ca, &partitions[0]))),
            Reply::Refused(Refusal::Invalid(_))
        ),
        "replaced once"
    );
    assert_eq!(w.m.stale_partitions(10).count(), 2);
    // Replaced, then its new certificate revoked (`cert revoke`): the old
    // one is its certificate again, and stale.
    let new1 = issue(&new_ca, &partitions[1]);
    w.run(replace(new1.clone()));
    w.run(Command::RevokeCertificate {
        serial: new1.serial.clone(),
    });
    assert_eq!(
        w.m.partition_certificate(&partitions[1].0, &partitions[1].1),
        Some(&old[1])
    );
    assert!(w.m.stale_partitions(10).any(|k| *k == partitions[1]));

    // A restore (a restart, a snapshot) during the rotation rebuilds the
    // same indexes from the records and the CAs.
    assert_restore_agrees(&w.m, "restored during the rotation");

    // Freeing a replaced partition revokes both of its certificates.
    destroy_and_free(&mut w, "a", &partitions[0]);
    assert!(w.m.certificates[&old[0].fingerprint].revoked);
    assert!(w.m.certificates[&new0.fingerprint].revoked);

    // Finishing revokes what is left of the old CA: partition c's
    // superseded certificate, and b's (never replaced), which the issuer
    // then gives one from the new CA.
    let new2 = issue(&new_ca, &partitions[2]);
    w.run(replace(new2.clone()));
    assert_eq!(w.run(Command::FinishRotation), Reply::Done);
    assert!(w.m.certificates[&old[2].fingerprint].revoked);
    assert!(!w.m.certificates[&new2.fingerprint].revoked);
    assert!(w.m.certificates[&old[1].fingerprint].revoked);
    assert!(w.m.partition_certificate(&partitions[1].0, &partitions[1].1).is_none());
    assert!(w.m.uncertified_partitions(10).any(|k| *k == partitions[1]));
    assert_eq!(w.m.stale_partitions(10).count(), 0);
    assert_restore_agrees(&w.m, "restored after the rotation");
    assert_eq!(replace(new2).since(), 4);
}

/// A restore of `m`'s records gives `m` back, indexes included.
fn assert_restore_agrees(m: &Master, why: &str) {
    let back = persist::restore(&mut persist::all_records(m).into_iter()).unwrap();
    let mut expected = m.clone();
    expected.dirty.clear();
    assert_eq!(back, expected, "{why}");
}

/// Alice destroys her instance `title`, and the node frees its partition.
fn destroy_and_free(w: &mut World, title: &str, (c, p): &(String, String)) {
    w.run(Command::Request(RequestSpec {
        requester: RequestOrigin::User("alice".into()),
        title: title.into(),
        software_release: SR.into(),
        software_type: "default".into(),
        parameters: Params::new(),
        sla: Params::new(),
        shared: false,
        state: Some(RequestedState::Destroyed),
    }));
    w.run(Command::DestroyedPartition {
        computer: c.clone(),
        partition: p.clone(),
    });
}

mod market;

/// Certificates signed for real (the state reads their issuer during a CA
/// rotation), made here because the pki module is a layer above the state.
mod signing {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair};
    use sha2::{Digest, Sha256};

    pub fn ca(name: &str) -> Authority {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        Authority {
            cert_pem: params.self_signed(&key).unwrap().pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A certificate for partition `p` of `c` signed by `ca`.
    pub fn partition(ca: &Authority, c: &str, p: &str) -> Certificate {
        let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem).unwrap()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::default().signed_by(&key, &issuer).unwrap();
        let digest: [u8; 32] = Sha256::digest(cert.der()).into();
        Certificate {
            serial: digest[..8].iter().map(|b| format!("{b:02x}")).collect(),
            fingerprint: Fingerprint(digest),
            role: Role::Partition(c.into(), p.into()),
            cert_pem: Pem::from_text(&cert.pem()),
            key_pem: Some(Pem::from_text(&key.serialize_pem())),
            not_after: 0,
            revoked: false,
        }
    }
}

#[test]
fn a_site_certificate_goes_to_the_first_user_naming_the_domain_across_the_cluster() {
    let mut w = World::new();
    w.computer("COMP-1", 4, &[]);
    let host = instance(w.request("alice", "frontend", &[], &[]));
    let (c, p) = host.partition.clone().unwrap();
    let shared = |w: &mut World, user: &str, title: &str, domain: &str| {
        instance(w.run(Command::Request(RequestSpec {
            requester: RequestOrigin::User(user.into()),
            title: title.into(),
            software_release: SR.into(),
            software_type: "default".into(),
            parameters: params(&[("domain", domain), ("backend-url", "http://[::1]:8080")]),
            sla: Params::new(),
            shared: true,
            state: None,
        })))
    };
    let bob = shared(&mut w, "bob", "shop", "shop.example.com");
    let carol = shared(&mut w, "carol", "mine", "Shop.Example.COM.");
    assert_eq!(bob.host.as_deref(), Some(host.id.as_str()));

    assert_eq!(
        w.m.check_site(&c, &p, &bob.id, "SHOP.example.com"),
        Ok("shop.example.com".into())
    );
    let taken = w.m.check_site(&c, &p, &carol.id, "shop.example.com");
    assert!(
        matches!(&taken, Err(SiteRefusal::Forbidden(m)) if m.contains("another user")),
        "{taken:?}"
    );
    let other = w.m.check_site(&c, &p, &bob.id, "other.example.com");
    assert!(
        matches!(&other, Err(SiteRefusal::Forbidden(m)) if m.contains("does not ask")),
        "{other:?}"
    );
    let free =
        w.m.partitions_of(&c)
            .into_iter()
            .find(|q| q.instance.is_none())
            .unwrap()
            .id
            .clone();
    assert!(matches!(
        w.m.check_site(&c, &free, &bob.id, "shop.example.com"),
        Err(SiteRefusal::NotFound(_))
    ));
    assert!(matches!(
        w.m.check_site(&c, &p, "SOFTINST-999", "shop.example.com"),
        Err(SiteRefusal::NotFound(_))
    ));
    assert!(matches!(
        w.m.check_site(&c, &p, &bob.id, "localhost"),
        Err(SiteRefusal::Invalid(_))
    ));
    assert!(matches!(
        w.m.check_site(&c, &p, &bob.id, "*.example.com"),
        Err(SiteRefusal::Invalid(_))
    ));

    // Once bob no longer wants it, the domain passes to the next user.
    w.run(Command::Request(RequestSpec {
        requester: RequestOrigin::User("bob".into()),
        title: "shop".into(),
        software_release: SR.into(),
        software_type: "default".into(),
        parameters: Params::new(),
        sla: Params::new(),
        shared: true,
        state: Some(RequestedState::Destroyed),
    }));
    assert_eq!(
        w.m.check_site(&c, &p, &carol.id, "shop.example.com"),
        Ok("shop.example.com".into())
    );
    assert!(w.m.check_site(&c, &p, &bob.id, "shop.example.com").is_err());
}
