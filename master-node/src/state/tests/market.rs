//! The market's rules: offers, conditions, the cheapest allocation, agreed
//! prices and billing; and a property test of random offers, withdrawals,
//! price changes and conditioned requests against a reference model.

use super::*;
use crate::state::ledger::{Period, Price, ReportFor};
use crate::state::market::{Agreement, Offer, Specs, OPERATOR};

const HOUR: u64 = 3_600_000_000;

/// Market conditions read from SLA pairs.
pub(super) fn conditions(pairs: &[(&str, &str)]) -> crate::state::market::Conditions {
    let mut c = crate::state::market::Conditions::default();
    for (k, v) in pairs {
        c.read(k, v).unwrap();
    }
    c
}

fn offer(computer: &str, micros: i64, currency: &str, region: &str, cpus: u32, partitions: u32) -> Offer {
    Offer {
        computer: computer.into(),
        hosting: Price {
            unit_price: micros,
            currency: currency.into(),
        },
        resources: BTreeMap::new(),
        specs: Specs {
            cpu_count: cpus,
            region: region.into(),
            ..Specs::default()
        },
        partitions,
    }
}

/// A world whose cluster speaks the market's commands.
fn market_world() -> World {
    let mut w = World::new();
    assert_eq!(w.run(Command::SetClusterVersion { version: VERSION }), Reply::Done);
    w
}

fn placed_on(i: &Instance) -> &str {
    &i.partition.as_ref().expect("placed").0
}

#[test]
fn the_cheapest_offer_that_meets_every_condition_wins() {
    let mut w = market_world();
    for c in ["COMP-A", "COMP-B", "COMP-C", "COMP-D"] {
        w.computer(c, 2, &[]);
    }
    assert_eq!(
        w.run(Command::SetOffer(Box::new(offer("COMP-A", 30_000, "EUR", "eu", 8, 2)))),
        Reply::Done
    );
    assert_eq!(
        w.run(Command::SetOffer(Box::new(offer("COMP-B", 20_000, "EUR", "us", 8, 2)))),
        Reply::Done
    );
    assert_eq!(
        w.run(Command::SetOffer(Box::new(offer("COMP-C", 50_000, "EUR", "eu", 2, 2)))),
        Reply::Done
    );
    assert_eq!(
        w.run(Command::SetOffer(Box::new(offer("COMP-D", 10_000, "USD", "eu", 8, 2)))),
        Reply::Done
    );
    // The cheapest in euros, in the region, with 4 CPUs: A (B is in the US,
    // C has 2 CPUs, D sells in dollars).
    let i = instance(w.request(
        "alice",
        "a",
        &[],
        &[("max_price", "0.05EUR"), ("region", "eu"), ("min_cpu", "4")],
    ));
    assert_eq!(placed_on(&i), "COMP-A");
    let agreed = &w.m.ledger.agreements[&i.id];
    assert_eq!(
        (agreed.hosting.unit_price, agreed.hosting.currency.as_str()),
        (30_000, "EUR")
    );
    // Without a region, B is cheaper.
    let i = instance(w.request("alice", "b", &[], &[("max_price", "0.05 EUR")]));
    assert_eq!(placed_on(&i), "COMP-B");
    // In dollars, D.
    let i = instance(w.request("alice", "d", &[], &[("max_price", "USD 1")]));
    assert_eq!(placed_on(&i), "COMP-D");
}

#[test]
fn an_unsatisfiable_request_waits_with_a_reason_and_takes_the_first_offer_that_suits() {
    let mut w = market_world();
    w.computer("COMP-A", 2, &[]);
    w.run(Command::SetOffer(Box::new(offer("COMP-A", 90_000, "EUR", "eu", 8, 2))));
    let i = instance(w.request("alice", "a", &[], &[("max_price", "0.05EUR")]));
    assert!(i.partition.is_none());
    let why = i.pending_reason.clone().unwrap();
    assert!(why.contains("max_price 0.050000 EUR"), "{why}");
    assert!(why.contains("as soon as"), "{why}");
    // The provider lowers its price: the request is allocated at once, at
    // the new price.
    w.run(Command::SetOffer(Box::new(offer("COMP-A", 40_000, "EUR", "eu", 8, 2))));
    let i = w.m.instance(&i.id).unwrap().clone();
    assert_eq!(placed_on(&i), "COMP-A");
    assert_eq!(w.m.ledger.agreements[&i.id].hosting.unit_price, 40_000);
}

#[test]
fn an_offer_change_never_reprices_a_running_instance() {
    let mut w = market_world();
    w.computer("COMP-A", 3, &[]);
    w.run(Command::SetOffer(Box::new(offer("COMP-A", 40_000, "EUR", "", 0, 3))));
    let first = instance(w.request("alice", "a", &[], &[]));
    w.run(Command::SetOffer(Box::new(offer("COMP-A", 70_000, "EUR", "", 0, 3))));
    let second = instance(w.request("alice", "b", &[], &[]));
    assert_eq!(w.m.ledger.agreements[&first.id].hosting.unit_price, 40_000);
    assert_eq!(w.m.ledger.agreements[&second.id].hosting.unit_price, 70_000);
    // Withdrawn, the terms stay too.
    w.run(Command::WithdrawOffer {
        computer: "COMP-A".into(),
    });
    assert_eq!(w.m.ledger.agreements[&first.id].hosting.unit_price, 40_000);
}

#[test]
fn an_offer_sells_only_its_partitions_and_an_owner_withdraws_the_computer() {
    let mut w = market_world();
    w.computer("COMP-A", 3, &[]);
    w.run(Command::SetComputerOwner {
        computer: "COMP-A".into(),
        owner: Some("carol".into()),
    });
    // An owner's computer without an offer sells nothing.
    let i = instance(w.request("alice", "a", &[], &[]));
    assert!(i.partition.is_none(), "{i:?}");
    w.run(Command::SetOffer(Box::new(offer("COMP-A", 10_000, "EUR", "", 0, 1))));
    assert!(w.m.instance(&i.id).unwrap().partition.is_some());
    assert_eq!(w.m.ledger.agreements[&i.id].provider, "carol");
    // One partition offered, one sold: the next waits.
    let j = instance(w.request("alice", "b", &[], &[]));
    assert!(j.partition.is_none());
    w.run(Command::WithdrawOffer {
        computer: "COMP-A".into(),
    });
    assert!(
        w.m.instance(&j.id).unwrap().partition.is_none(),
        "withdrawn: nothing sold"
    );
    // Providers are chosen by name, or left out.
    w.computer("COMP-B", 2, &[]);
    w.run(Command::SetOffer(Box::new(offer("COMP-B", 10_000, "EUR", "", 0, 2))));
    assert_eq!(w.m.instance(&j.id).unwrap().partition.as_ref().unwrap().0, "COMP-B");
    let k = instance(w.request("alice", "c", &[], &[("not_provider", OPERATOR)]));
    assert!(k.partition.is_none(), "COMP-B is the operator's");
    let k = instance(w.request("alice", "d", &[], &[("provider", OPERATOR)]));
    assert_eq!(placed_on(&k), "COMP-B");
}

#[test]
fn bad_offers_are_refused_and_nothing_is_stored() {
    let mut w = market_world();
    w.computer("COMP-A", 2, &[]);
    let before = w.m.clone();
    let refused = |w: &mut World, o: Offer, says: &str| {
        match w.run(Command::SetOffer(Box::new(o))) {
            Reply::Refused(r) => assert!(r.to_string().contains(says), "{r} should say {says:?}"),
            other => panic!("accepted: {other:?}"),
        }
        assert!(w.m.market.offers.is_empty());
    };
    refused(&mut w, offer("COMP-A", -1, "EUR", "", 0, 1), "negative");
    refused(&mut w, offer("COMP-A", 1, "XYZ", "", 0, 1), "ISO 4217");
    refused(&mut w, offer("COMP-A", 1, "EUR", "", 0, 0), "at least one");
    refused(&mut w, offer("COMP-A", 1, "EUR", "", 0, 3), "has 2 partitions");
    refused(&mut w, offer("COMP-Z", 1, "EUR", "", 0, 1), "does not exist");
    let mut o = offer("COMP-A", 1, "EUR", "", 0, 1);
    o.resources.insert("gold".into(), 1);
    refused(&mut w, o, "not \"gold\"");
    assert_eq!(w.m.computers, before.computers);
    // A malformed condition refuses the request; nothing is stored.
    for (k, v, says) in [
        ("max_price", "0.05", "needs a currency"),
        ("max_price", "cheap EUR", "not an amount"),
        ("max_price", "0.05 ECU", "ISO 4217"),
        ("min_cpu", "many", "min_cpu"),
        ("min_memory", "lots", "min_memory"),
    ] {
        match w.request("alice", "x", &[], &[(k, v)]) {
            Reply::Refused(Refusal::Invalid(m)) => assert!(m.contains(says), "{m}"),
            other => panic!("{k}={v} accepted: {other:?}"),
        }
        assert!(w.m.instances.is_empty());
    }
}

#[test]
fn invoices_and_statements_bill_the_agreed_price_with_equal_totals() {
    let mut w = market_world();
    let period = Period::parse("2026-11").unwrap();
    w.time = period.start_us;
    w.computer("COMP-A", 2, &[]);
    w.computer("COMP-B", 2, &[]);
    w.run(Command::SetComputerOwner {
        computer: "COMP-A".into(),
        owner: Some("carol".into()),
    });
    let mut o = offer("COMP-A", 20_000, "EUR", "", 0, 2);
    o.resources.insert("memory".into(), 1_000_000);
    w.run(Command::SetOffer(Box::new(o)));
    // B sells at the catalog, dearer.
    w.run(Command::SetPrice {
        resource: ledger::HOSTING.into(),
        release: None,
        price: Some(Price {
            unit_price: 50_000,
            currency: "EUR".into(),
        }),
    });
    let a = instance(w.request("alice", "a", &[], &[]));
    assert_eq!(placed_on(&a), "COMP-A");
    let b = instance(w.request("bob", "b", &[], &[]));
    assert_eq!(placed_on(&b), "COMP-A");
    let c = instance(w.request("bob", "c", &[], &[]));
    assert_eq!(placed_on(&c), "COMP-B", "A sells two partitions");
    let report = |w: &mut World, i: &Instance, r: InstanceReport| {
        let (computer, partition) = i.partition.clone().unwrap();
        w.run(Command::ReportInstance {
            computer,
            partition,
            shared_reference: None,
            report: r,
        })
    };
    for i in [&a, &b, &c] {
        report(&mut w, i, InstanceReport::Started);
    }
    // Ten hours later the price goes up: nothing running is repriced.
    w.time += 10 * HOUR;
    w.run(Command::SetOffer(Box::new(offer("COMP-A", 90_000, "EUR", "", 0, 2))));
    w.run(Command::BookUsage {
        computer: "COMP-A".into(),
        journal_sha256: "j1".into(),
        lines: vec![ledger::UsageLine {
            partition: a.partition.clone().unwrap().1,
            resource: "Memory".into(),
            category: Some("memory".into()),
            quantity: ledger::Quantity::units(3 << 30),
            stop_us: Some(w.time),
        }],
    });
    for i in [&a, &b, &c] {
        report(&mut w, i, InstanceReport::Stopped);
    }
    let alice = ledger::report(&w.m.ledger, &ReportFor::Subscriber("alice".into()), &period, w.m.clock);
    // 10 h at 0.02 plus 3 GiB at 1.00 per GiB.
    assert_eq!(alice.totals["EUR"], 200_000 + 3_000_000, "{alice:?}");
    assert!(alice.lines.iter().all(|l| l.agreed));
    assert!(alice.lines.iter().any(|l| l.price_unit == "GiB"));
    let bob = ledger::report(&w.m.ledger, &ReportFor::Subscriber("bob".into()), &period, w.m.clock);
    // 10 h at 0.02 on A, 10 h at 0.05 on B: two lines, never one mixed price.
    assert_eq!(bob.totals["EUR"], 200_000 + 500_000);
    assert_eq!(bob.lines.len(), 2);
    let carol = ledger::report(&w.m.ledger, &ReportFor::Provider("carol".into()), &period, w.m.clock);
    let operator = ledger::report(&w.m.ledger, &ReportFor::Provider(OPERATOR.into()), &period, w.m.clock);
    assert_eq!(carol.totals["EUR"], 200_000 + 3_000_000 + 200_000);
    assert_eq!(operator.totals["EUR"], 500_000);
    assert_eq!(
        alice.totals["EUR"] + bob.totals["EUR"],
        carol.totals["EUR"] + operator.totals["EUR"]
    );
}

#[test]
fn below_the_market_version_placement_is_as_it_was() {
    // A cluster with a replica of an older release among its voters.
    let mut w = World::new();
    w.computer("COMP-A", 2, &[]);
    w.computer("COMP-B", 2, &[]);
    let hosting = |micros| Command::SetPrice {
        resource: ledger::HOSTING.into(),
        release: None,
        price: Some(Price {
            unit_price: micros,
            currency: "EUR".into(),
        }),
    };
    w.run(hosting(50_000));
    // Market keys are unknown keys, as they were: nothing refused, the
    // request waits; the catalog does not rank computers.
    let i = instance(w.request("alice", "a", &[], &[("max_price", "0.01")]));
    let why = i.pending_reason.clone().unwrap();
    assert!(why.contains("\"max_price\" is unknown"), "{why}");
    let plain = instance(w.request("alice", "b", &[], &[]));
    assert!(plain.partition.is_some());
    // The cluster reaches the market's version: the waiting request is
    // read again, as a market condition (its malformed ceiling now says
    // why); the placement index, checked after every command, takes the
    // catalog in.
    w.run(Command::SetClusterVersion { version: VERSION });
    let i = w.m.instance(&i.id).unwrap().clone();
    assert!(i.pending_reason.unwrap().contains("needs a currency"));
}

#[test]
fn offers_owners_and_agreements_survive_a_restart() {
    let mut w = market_world();
    w.computer("COMP-A", 2, &[]);
    w.run(Command::SetComputerOwner {
        computer: "COMP-A".into(),
        owner: Some("carol".into()),
    });
    w.run(Command::SetOffer(Box::new(offer("COMP-A", 20_000, "EUR", "eu", 4, 1))));
    instance(w.request("alice", "a", &[], &[("region", "eu")]));
    let records = persist::all_records(&w.m);
    let restored = persist::restore(&mut records.into_iter()).unwrap();
    assert_eq!(restored.market, w.m.market);
    assert_eq!(restored.ledger, w.m.ledger);
    assert_eq!(
        restored.placement, w.m.placement,
        "the index is rebuilt with the market"
    );
}

// ----- the property test ---------------------------------------------------

const COMPUTERS: usize = 6;
const PARTITIONS: usize = 3;
const CURRENCIES: [&str; 2] = ["EUR", "USD"];
const REGIONS: [&str; 3] = ["", "eu", "us"];
const PROVIDERS: [&str; 3] = ["p0", "p1", OPERATOR];

#[derive(Debug, Clone)]
enum MarketOp {
    Offer {
        computer: usize,
        micros: i64,
        currency: usize,
        region: usize,
        cpus: u32,
        gpu: bool,
        partitions: u32,
    },
    Withdraw(usize),
    Catalog(Option<i64>),
    Request {
        title: u8,
        max_price: Option<(i64, usize)>,
        region: usize,
        min_cpu: Option<u32>,
        gpu: bool,
        provider: Option<usize>,
        not_provider: Option<usize>,
    },
    Destroy(u8),
    Hours(u8),
}

fn market_op() -> impl Strategy<Value = MarketOp> {
    prop_oneof![
        3 => (0..COMPUTERS, 0i64..6, 0..2usize, 0..3usize, 1u32..9, any::<bool>(), 1u32..=PARTITIONS as u32)
            .prop_map(|(computer, m, currency, region, cpus, gpu, partitions)| MarketOp::Offer {
                computer, micros: m * 10_000, currency, region, cpus, gpu: gpu && cpus > 6, partitions
            }),
        1 => (0..COMPUTERS).prop_map(MarketOp::Withdraw),
        1 => proptest::option::of(0i64..6).prop_map(|p| MarketOp::Catalog(p.map(|p| p * 10_000))),
        5 => (0u8..12, proptest::option::of((0i64..6, 0..2usize)), 0..3usize, proptest::option::of(1u32..9),
              any::<bool>(), proptest::option::of(0..3usize), proptest::option::of(0..3usize))
            .prop_map(|(title, max_price, region, min_cpu, gpu, provider, not_provider)| MarketOp::Request {
                title, max_price: max_price.map(|(m, c)| (m * 10_000, c)), region, min_cpu,
                gpu: gpu && title % 4 == 0, provider, not_provider,
            }),
        2 => (0u8..12).prop_map(MarketOp::Destroy),
        1 => (1u8..30).prop_map(MarketOp::Hours),
    ]
}

/// The reference model: what the market holds, by the test's own account.
#[derive(Default)]
struct Model {
    offers: BTreeMap<String, Offer>,
    catalog: Option<i64>,
    /// The conditions each title asked with.
    conditions: BTreeMap<String, Params>,
    /// The agreement each instance got when it was placed.
    agreed: BTreeMap<InstanceId, Option<Agreement>>,
}

fn computer_id(i: usize) -> String {
    format!("COMP-{i}")
}

/// Computers 0 and 1 are p0's, 2 is p1's, the rest the operator's; odd
/// ones report 4 CPUs, even ones nothing; 3 is in region eu by category.
fn owner(i: usize) -> Option<&'static str> {
    match i {
        0 | 1 => Some("p0"),
        2 => Some("p1"),
        _ => None,
    }
}

impl Model {
    /// The hourly price `computer` sells at and how many partitions it
    /// sells, or `None` if it sells nothing.
    fn sale(&self, i: usize) -> Option<((i64, String), usize)> {
        match self.offers.get(&computer_id(i)) {
            Some(o) => Some((
                (o.hosting.unit_price, o.hosting.currency.clone()),
                o.partitions as usize,
            )),
            None if owner(i).is_some() => None,
            None => Some((
                self.catalog.map_or((0, String::new()), |p| (p, "EUR".into())),
                PARTITIONS,
            )),
        }
    }

    /// Whether computer `i`, with `busy` partitions busy, may take a
    /// request with `sla`; at what price.
    fn eligible(&self, i: usize, busy: usize, sla: &Params) -> Option<(i64, String)> {
        let (price, sells) = self.sale(i)?;
        if busy >= sells.min(PARTITIONS) {
            return None;
        }
        let offer = self.offers.get(&computer_id(i));
        let region = offer
            .map(|o| o.specs.region.clone())
            .filter(|r| !r.is_empty())
            .or((i == 3).then(|| "eu".to_string()));
        let cpus = offer
            .map(|o| o.specs.cpu_count)
            .filter(|n| *n > 0)
            .or((i % 2 == 1).then_some(4));
        let provider = owner(i).unwrap_or(OPERATOR);
        if let Some(max) = sla.get("max_price") {
            let max = crate::state::market::parse_max_price(max).unwrap();
            if !price.1.is_empty() && (price.1 != max.currency || price.0 > max.unit_price) {
                return None;
            }
        }
        let ok = sla.get("region").is_none_or(|r| region.as_ref() == Some(r))
            && sla
                .get("min_cpu")
                .is_none_or(|n| cpus.is_some_and(|c| c >= n.parse::<u32>().unwrap()))
            && sla
                .get("capability")
                .is_none_or(|c| offer.is_some_and(|o| o.specs.capabilities.contains(c)))
            && sla.get("provider").is_none_or(|p| p == provider)
            && sla.get("not_provider").is_none_or(|p| p != provider);
        ok.then_some(price)
    }

    /// The cheapest price a request with `sla` can get now, if any.
    fn cheapest(&self, m: &Master, sla: &Params) -> Option<(i64, String)> {
        (0..COMPUTERS)
            .filter_map(|i| {
                let busy = m
                    .partitions_of(&computer_id(i))
                    .iter()
                    .filter(|p| p.state == SlapState::Busy)
                    .count();
                self.eligible(i, busy, sla)
            })
            .min()
    }
}

fn sla_of(op: &MarketOp) -> Params {
    let MarketOp::Request {
        max_price,
        region,
        min_cpu,
        gpu,
        provider,
        not_provider,
        ..
    } = op
    else {
        return Params::new();
    };
    let mut sla = Params::new();
    if let Some((m, c)) = max_price {
        sla.insert(
            "max_price".into(),
            format!("{} {}", ledger::format_money(*m), CURRENCIES[*c]),
        );
    }
    if *region > 0 {
        sla.insert("region".into(), REGIONS[*region].into());
    }
    if let Some(n) = min_cpu {
        sla.insert("min_cpu".into(), n.to_string());
    }
    if *gpu {
        sla.insert("capability".into(), "gpu".into());
    }
    if let Some(p) = provider {
        sla.insert("provider".into(), PROVIDERS[*p].into());
    }
    if let Some(p) = not_provider {
        sla.insert("not_provider".into(), PROVIDERS[*p].into());
    }
    sla
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 150, ..ProptestConfig::default() })]

    #[test]
    fn the_market_against_a_reference_model(ops in prop::collection::vec(market_op(), 1..50)) {
        let mut w = market_world();
        let period = Period::parse("2026-11").unwrap();
        w.time = period.start_us;
        for i in 0..COMPUTERS {
            let region: &[(&str, &str)] = if i == 3 { &[("region", "eu")] } else { &[] };
            w.computer(&computer_id(i), PARTITIONS, region);
            if i % 2 == 1 {
                // The node reports 4 CPUs: used where no offer says.
                let c = w.m.computers[&computer_id(i)].clone();
                let specs = w.m.partitions_of(&c.id).iter().map(|p| PartitionSpec {
                    id: p.id.clone(), addresses: p.addresses.clone(), tap: p.tap.clone(), user: p.user.clone(), capabilities: vec![],
                }).collect();
                w.run(Command::SetComputer {
                    id: c.id.clone(), address: c.address.clone(), netmask: c.netmask.clone(),
                    capacity: params(&[("cpu_count", "4")]), categories: c.categories.clone(), partitions: specs,
                });
            }
            if let Some(o) = owner(i) {
                w.run(Command::SetComputerOwner { computer: computer_id(i), owner: Some(o.into()) });
            }
        }
        let mut model = Model::default();
        for op in ops {
            let placed_before: BTreeSet<InstanceId> = w.m.instances.values().filter(|i| i.partition.is_some()).map(|i| i.id.clone()).collect();
            let mut direct = None;
            match &op {
                MarketOp::Offer { computer, micros, currency, region, cpus, gpu, partitions } => {
                    let mut o = offer(&computer_id(*computer), *micros, CURRENCIES[*currency], REGIONS[*region], *cpus, *partitions);
                    if *gpu {
                        o.specs.capabilities.push("gpu".into());
                    }
                    prop_assert_eq!(w.run(Command::SetOffer(Box::new(o.clone()))), Reply::Done);
                    model.offers.insert(o.computer.clone(), o);
                }
                MarketOp::Withdraw(c) => {
                    let r = w.run(Command::WithdrawOffer { computer: computer_id(*c) });
                    prop_assert_eq!(r == Reply::Done, model.offers.remove(&computer_id(*c)).is_some());
                }
                MarketOp::Catalog(p) => {
                    w.run(Command::SetPrice {
                        resource: ledger::HOSTING.into(),
                        release: None,
                        price: p.map(|p| Price { unit_price: p, currency: "EUR".into() }),
                    });
                    model.catalog = *p;
                }
                MarketOp::Request { title, .. } => {
                    let sla = sla_of(&op);
                    let title = format!("t{title}");
                    let exists = w.m.instance_by_title(&Scope::User("alice".into()), &title).is_some();
                    let expected = (!exists).then(|| model.cheapest(&w.m, &sla));
                    let reply = w.request("alice", &title, &[], &sla.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect::<Vec<_>>());
                    let Reply::Instance(i) = reply else { return Err(TestCaseError::fail(format!("{reply:?}"))) };
                    // The conditions that hold from now on are the state's.
                    model.conditions.insert(i.id.clone(), w.m.instances[&i.id].sla.clone());
                    if !exists {
                        direct = Some((i.id.clone(), expected.flatten()));
                    }
                }
                MarketOp::Destroy(title) => {
                    let title = format!("t{title}");
                    if let Some(i) = w.m.instance_by_title(&Scope::User("alice".into()), &title).cloned() {
                        w.destroy("alice", &title);
                        if let Some((computer, partition)) = i.partition {
                            w.run(Command::DestroyedPartition { computer, partition });
                        }
                    }
                }
                MarketOp::Hours(h) => {
                    w.time += u64::from(*h) * HOUR;
                    // The nodes report what runs.
                    let running: Vec<Instance> = w.m.instances.values().filter(|i| i.partition.is_some() && i.requested_state == RequestedState::Started).map(|i| (**i).clone()).collect();
                    for i in running {
                        let (computer, partition) = i.partition.clone().unwrap();
                        w.run(Command::ReportInstance { computer, partition, shared_reference: None, report: InstanceReport::Started });
                    }
                }
            }
            // Every instance placed by this step: within its conditions,
            // at its computer's price then; placed by its own request: at
            // the cheapest price the model knows.
            for i in w.m.instances.values().filter(|i| i.partition.is_some() && !placed_before.contains(&i.id)) {
                let computer = placed_on(i);
                let index: usize = computer[5..].parse().unwrap();
                let sla = &model.conditions[&i.id];
                // The computer as it was before this placement: one partition less busy.
                let busy = w.m.partitions_of(computer).iter().filter(|p| p.state == SlapState::Busy).count() - 1;
                let price = model.eligible(index, busy, sla);
                prop_assert!(price.is_some(), "{} placed on {} outside {:?}", i.id, computer, sla);
                let agreement = w.m.ledger.agreements.get(&i.id).cloned();
                match model.offers.get(computer) {
                    Some(o) => {
                        let a = agreement.clone().expect("an offer's sale has terms");
                        prop_assert_eq!(&a.hosting, &o.hosting);
                        prop_assert_eq!(&a.provider, owner(index).unwrap_or(OPERATOR));
                    }
                    None => prop_assert!(agreement.is_none(), "a catalog sale has no terms"),
                }
                if let Some((id, cheapest)) = &direct {
                    if id == &i.id {
                        prop_assert_eq!(&price, cheapest, "{} not at the cheapest price for {:?}", id, sla);
                    }
                }
                model.agreed.insert(i.id.clone(), agreement);
            }
            if let Some((id, cheapest)) = &direct {
                if w.m.instances[id].partition.is_none() {
                    prop_assert!(cheapest.is_none(), "{} pending though {:?} suits it", id, cheapest);
                }
            }
            // Nothing waits that an offer could take now.
            for i in w.m.pending() {
                if let Some(sla) = model.conditions.get(&i.id) {
                    prop_assert!(model.cheapest(&w.m, sla).is_none(), "{} pending though something suits {:?}", i.id, sla);
                    prop_assert!(i.pending_reason.is_some());
                }
            }
            // No agreement ever changes.
            for (id, a) in &model.agreed {
                prop_assert_eq!(w.m.ledger.agreements.get(id), a.as_ref(), "the terms of {} changed", id);
            }
        }
        // Invoices and statements: the same totals per currency.
        w.time += HOUR;
        let subscribers = ["alice"];
        let providers = ["p0", "p1", OPERATOR];
        let mut invoiced: BTreeMap<String, i64> = BTreeMap::new();
        let mut stated: BTreeMap<String, i64> = BTreeMap::new();
        for s in subscribers {
            for (c, t) in ledger::report(&w.m.ledger, &ReportFor::Subscriber(s.into()), &period, w.time).totals {
                *invoiced.entry(c).or_default() += t;
            }
        }
        for p in providers {
            let r = ledger::report(&w.m.ledger, &ReportFor::Provider(p.into()), &period, w.time);
            for l in &r.lines {
                // An agreed line is billed at its instance's terms.
                if l.agreed {
                    prop_assert!(l.unit_price.is_some());
                }
            }
            for (c, t) in r.totals {
                *stated.entry(c).or_default() += t;
            }
        }
        prop_assert_eq!(invoiced, stated);
    }
}
