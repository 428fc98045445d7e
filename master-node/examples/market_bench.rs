//! What the market costs allocation: the same fleet allocated twice in one
//! run, once with no offers and requests without conditions, once with an
//! offer on every computer and market conditions on every request.
//!
//! ```text
//! cargo run -p master-node --example market_bench -- [--computers 10000] [--partitions 10] [--requests 50000]
//! ```
//!
//! It applies `Request` commands to the state machine in this process, as
//! every replica does for each committed request: the figure is the cost
//! of allocation itself (the SLA read, the walk of the placement index, the
//! instance stored, the agreed terms recorded), without the network, Raft
//! or the disk, which are the same with or without a market (see
//! `alloc_bench` for allocations through the whole cluster).
//!
//! Offers are random but seeded: prices from 0.01 to 0.10 EUR per
//! partition-hour, one of five regions, 2 to 32 CPUs, 4 to 128 GiB. Each
//! conditioned request asks `max_price=0.08EUR`, one region, `min_cpu=8`
//! and `min_memory=16GiB`, which about one offer in six meets. A third
//! case allocates on the same offers without conditions (cheapest first).

use std::time::Instant;

use master_node::state::ledger::Price;
use master_node::state::market::{Offer, Specs};
use master_node::state::{
    Command, Master, Params, PartitionSpec, Proposal, Reply, RequestOrigin, RequestSpec, SupplyState,
};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const SR: &str = "https://lab.example.org/sr/software.cfg";
const REGIONS: [&str; 5] = ["eu-west", "eu-east", "us-east", "us-west", "ap-south"];

/// A small deterministic generator (xorshift64*), so every run offers the same.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Applier {
    m: Master,
    index: u64,
}

impl Applier {
    fn apply(&mut self, command: Command) -> Reply {
        self.index += 1;
        let reply = self.m.apply(
            self.index,
            Proposal {
                request_id: None,
                time_us: 1_800_000_000_000_000 + self.index,
                command,
            },
        );
        // What the storage layer takes after each entry.
        self.m.take_dirty();
        reply
    }
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| v.parse().unwrap_or_else(|_| panic!("{name} takes a number")))
        .unwrap_or(default)
}

fn fleet(computers: usize, partitions: usize) -> Applier {
    let mut a = Applier {
        m: Master::new(),
        index: 0,
    };
    // The cluster speaks the market's commands.
    a.apply(Command::SetClusterVersion {
        version: master_node::state::VERSION,
    });
    for c in 0..computers {
        let id = format!("COMP-{c}");
        a.apply(Command::SetComputer {
            id: id.clone(),
            address: String::new(),
            netmask: String::new(),
            capacity: Params::new(),
            categories: Params::new(),
            partitions: (0..partitions)
                .map(|p| PartitionSpec {
                    id: format!("slappart{p}"),
                    addresses: vec![],
                    tap: None,
                    user: None,
                    capabilities: vec![],
                })
                .collect(),
        });
        a.apply(Command::Supply {
            computer: id,
            url: SR.into(),
            state: SupplyState::Available,
        });
    }
    a
}

fn offer_everything(a: &mut Applier, computers: usize, partitions: usize, rng: &mut Seeded) {
    for c in 0..computers {
        let offer = Offer {
            computer: format!("COMP-{c}"),
            hosting: Price {
                unit_price: 10_000 + rng.below(90_001) as i64,
                currency: "EUR".into(),
            },
            resources: Default::default(),
            specs: Specs {
                cpu_count: 2 + rng.below(31) as u32,
                memory_bytes: (4 + rng.below(125)) << 30,
                region: REGIONS[rng.below(5) as usize].into(),
                ..Specs::default()
            },
            partitions: partitions as u32,
        };
        assert_eq!(a.apply(Command::SetOffer(Box::new(offer))), Reply::Done);
    }
}

/// Applies `requests` requests; returns the seconds they took and how many were placed.
fn allocate(a: &mut Applier, requests: usize, conditioned: bool, rng: &mut Seeded) -> (f64, usize) {
    let specs: Vec<RequestSpec> = (0..requests)
        .map(|i| {
            let sla: Params = if conditioned {
                [
                    ("max_price", "0.08EUR".to_string()),
                    ("region", REGIONS[rng.below(5) as usize].to_string()),
                    ("min_cpu", "8".to_string()),
                    ("min_memory", "16GiB".to_string()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
            } else {
                Params::new()
            };
            RequestSpec {
                requester: RequestOrigin::User(format!("user-{}", i % 100)),
                title: format!("instance-{i}"),
                software_release: SR.into(),
                software_type: "default".into(),
                parameters: Params::new(),
                sla,
                shared: false,
                state: None,
            }
        })
        .collect();
    let started = Instant::now();
    let mut placed = 0;
    for spec in specs {
        if let Reply::Instance(i) = a.apply(Command::Request(spec)) {
            placed += usize::from(i.partition.is_some());
        }
    }
    (started.elapsed().as_secs_f64(), placed)
}

fn main() {
    let computers = arg("--computers", 10_000);
    let partitions = arg("--partitions", 10);
    let requests = arg("--requests", 50_000);
    println!("{computers} computers x {partitions} partitions, {requests} requests per case");

    let mut rng = Seeded(0x5eed_1234_abcd_0001);
    let mut plain = fleet(computers, partitions);
    let (plain_s, plain_placed) = allocate(&mut plain, requests, false, &mut rng);
    drop(plain);

    let mut market = fleet(computers, partitions);
    let started = Instant::now();
    offer_everything(&mut market, computers, partitions, &mut rng);
    let offers_s = started.elapsed().as_secs_f64();
    let mut priced = market.m.clone();
    let (market_s, market_placed) = allocate(&mut market, requests, true, &mut rng);
    drop(market);
    let mut priced = Applier {
        m: std::mem::take(&mut priced),
        index: 1 << 40,
    };
    let (priced_s, priced_placed) = allocate(&mut priced, requests, false, &mut rng);

    let per = |s: f64, n: usize| s * 1e6 / n as f64;
    println!("| case | requests | placed | requests/s | µs per request |");
    println!("|---|---|---|---|---|");
    println!(
        "| no offers, no conditions | {requests} | {plain_placed} | {:.0} | {:.2} |",
        requests as f64 / plain_s,
        per(plain_s, requests)
    );
    println!(
        "| {computers} offers, 4 conditions each | {requests} | {market_placed} | {:.0} | {:.2} |",
        requests as f64 / market_s,
        per(market_s, requests)
    );
    println!(
        "| {computers} offers, no conditions | {requests} | {priced_placed} | {:.0} | {:.2} |",
        requests as f64 / priced_s,
        per(priced_s, requests)
    );
    println!(
        "conditioned / unconditioned cost: {:.2}x (goal: under 1.5x); {computers} offers published in {:.2} s",
        market_s / plain_s,
        offers_s
    );
}
