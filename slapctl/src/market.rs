//! `slapctl offer set|show|withdraw` and `slapctl owner`: a computer's
//! offer on the Master's market, and who owns a computer.

use clap::Subcommand;
use slap_proto::master as pb;
use slap_proto::master::master_client::MasterClient;
use slap_proto::size::{format_size, parse_size};
use tonic::transport::Channel;

use crate::{call, money, request_id};

// Parsed once per run: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
pub enum OfferCmd {
    /// Publish or replace COMPUTER's offer: its owner, the computer or an
    /// administrator. New allocations only; running instances keep the
    /// price they were allocated at.
    Set {
        computer: String,
        /// Price per partition-hour, a decimal (e.g. 0.05).
        #[arg(long, allow_negative_numbers = true)]
        price: String,
        /// ISO 4217 currency code, e.g. EUR.
        #[arg(long)]
        currency: String,
        /// How many of its partitions it sells.
        #[arg(long)]
        partitions: u32,
        /// Price per CPU-second.
        #[arg(long, allow_negative_numbers = true)]
        cpu_price: Option<String>,
        /// Price per GiB of memory.
        #[arg(long, allow_negative_numbers = true)]
        memory_price: Option<String>,
        /// Price per GiB of disk.
        #[arg(long, allow_negative_numbers = true)]
        disk_price: Option<String>,
        /// Price per GiB of network.
        #[arg(long, allow_negative_numbers = true)]
        network_price: Option<String>,
        #[arg(long, default_value = "")]
        cpu_model: String,
        /// How many CPUs (the `min_cpu` SLA key reads it).
        #[arg(long, default_value_t = 0)]
        cpus: u32,
        /// Memory, e.g. 16GiB (the `min_memory` SLA key reads it).
        #[arg(long)]
        memory: Option<String>,
        /// Disk, e.g. 500GiB.
        #[arg(long)]
        disk: Option<String>,
        /// Region (the `region` SLA key reads it), e.g. eu-west.
        #[arg(long, default_value = "")]
        region: String,
        /// Network id.
        #[arg(long, default_value = "")]
        network: String,
        /// A capability every partition sold has (gpu, ipv4-public; repeatable).
        #[arg(long = "capability")]
        capabilities: Vec<String>,
    },
    /// The offers on the market (or COMPUTER's), with how full they are.
    Show { computer: Option<String> },
    /// Take COMPUTER's offer down: an owner's computer sells nothing more.
    Withdraw { computer: String },
}

fn size(text: &Option<String>, what: &str) -> anyhow::Result<u64> {
    match text {
        None => Ok(0),
        Some(t) => parse_size(t).map_err(|e| anyhow::anyhow!("--{what}: {e}")),
    }
}

/// Runs an `offer` subcommand.
pub async fn offer(client: &MasterClient<Channel>, patience: u64, json: bool, cmd: OfferCmd) -> anyhow::Result<()> {
    match cmd {
        OfferCmd::Set {
            computer,
            price,
            currency,
            partitions,
            cpu_price,
            memory_price,
            disk_price,
            network_price,
            cpu_model,
            cpus,
            memory,
            disk,
            region,
            network,
            capabilities,
        } => {
            let resource_prices = [
                ("cpu", cpu_price),
                ("memory", memory_price),
                ("disk", disk_price),
                ("network", network_price),
            ]
            .into_iter()
            .filter_map(|(r, p)| Some((r.to_string(), p?)))
            .collect();
            let req = pb::SetOfferRequest {
                request_id: request_id(),
                offer: Some(pb::Offer {
                    computer_id: computer.clone(),
                    price_per_hour: price.clone(),
                    currency: currency.clone(),
                    resource_prices,
                    cpu_model,
                    cpu_count: cpus,
                    memory_bytes: size(&memory, "memory")?,
                    disk_bytes: size(&disk, "disk")?,
                    region,
                    network,
                    capabilities,
                    partitions,
                    ..Default::default()
                }),
            };
            call(patience, || {
                let (mut c, req) = (client.clone(), req.clone());
                async move { c.set_offer(req).await }
            })
            .await?;
            println!("{computer} offers {partitions} partitions at {price} {currency} per partition-hour");
        }
        OfferCmd::Show { computer } => {
            let list = call(patience, || {
                let mut c = client.clone();
                let computer_id = computer.clone().unwrap_or_default();
                async move { c.list_offers(pb::ListOffersRequest { computer_id }).await }
            })
            .await?;
            if json {
                let all: Vec<_> = list.offers.iter().map(offer_json).collect();
                println!("{}", serde_json::Value::Array(all));
                return Ok(());
            }
            if list.offers.is_empty() {
                println!("no offers; publish one with `slapctl offer set COMPUTER --price 0.05 --currency EUR --partitions N`");
                return Ok(());
            }
            println!(
                "{:<16} {:<12} {:>16} {:<10} {:>4} {:>9} {:>11}  capabilities",
                "computer", "provider", "per hour", "region", "cpus", "memory", "sold"
            );
            for o in &list.offers {
                println!(
                    "{:<16} {:<12} {:>16} {:<10} {:>4} {:>9} {:>11}  {}",
                    o.computer_id,
                    o.provider,
                    format!("{} {}", o.price_per_hour, o.currency),
                    if o.region.is_empty() { "-" } else { &o.region },
                    o.cpu_count,
                    if o.memory_bytes > 0 {
                        format_size(o.memory_bytes)
                    } else {
                        "-".into()
                    },
                    format!("{}/{}", o.partitions_busy.min(o.partitions), o.partitions),
                    o.capabilities.join(",")
                );
            }
        }
        OfferCmd::Withdraw { computer } => {
            let req = pb::WithdrawOfferRequest {
                request_id: request_id(),
                computer_id: computer.clone(),
            };
            call(patience, || {
                let (mut c, req) = (client.clone(), req.clone());
                async move { c.withdraw_offer(req).await }
            })
            .await?;
            println!("{computer}'s offer withdrawn; its running instances keep their price");
        }
    }
    Ok(())
}

fn offer_json(o: &pb::Offer) -> serde_json::Value {
    serde_json::json!({
        "computer": o.computer_id, "provider": o.provider, "price_per_hour": o.price_per_hour,
        "currency": o.currency, "resource_prices": o.resource_prices, "cpu_model": o.cpu_model,
        "cpu_count": o.cpu_count, "memory_bytes": o.memory_bytes, "disk_bytes": o.disk_bytes,
        "region": o.region, "network": o.network, "capabilities": o.capabilities,
        "partitions": o.partitions, "partitions_busy": o.partitions_busy, "partitions_total": o.partitions_total,
    })
}

/// `slapctl owner`: names (or forgets) who owns a computer.
pub async fn owner(
    client: &MasterClient<Channel>,
    patience: u64,
    computer: String,
    user: Option<String>,
) -> anyhow::Result<()> {
    let req = pb::SetComputerOwnerRequest {
        request_id: request_id(),
        computer_id: computer.clone(),
        owner: user.clone().unwrap_or_default(),
    };
    call(patience, || {
        let (mut c, req) = (client.clone(), req.clone());
        async move { c.set_computer_owner(req).await }
    })
    .await?;
    match user {
        Some(u) => println!("{computer} is {u}'s: {u} sets its offer and is credited for its work"),
        None => println!("{computer} has no owner: it sells at the catalog, credited to the operator"),
    }
    Ok(())
}

/// The terms an instance was allocated at, for `slapctl show`.
pub fn agreement_line(a: &pb::Agreement) -> String {
    format!(
        "{} {} per partition-hour from {} (agreed at allocation)",
        money(a.price_per_hour_micros),
        a.currency,
        a.provider
    )
}
