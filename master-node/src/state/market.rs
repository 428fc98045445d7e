//! The marketplace: what each computer offers and at what price, the
//! conditions a request sets, and the terms an instance was allocated at.
//!
//! Whoever contributes a computer (its *provider*: the user an
//! administrator named as its owner, or the cluster's operator) publishes an
//! [`Offer`] for it: a price per partition-hour, optional prices per
//! CPU-second and per GiB of memory, disk and network, what the machine is
//! (CPU, memory, disk, region, network, capabilities) and how many of its
//! partitions it sells.
//!
//! A request names its [`Conditions`] as SLA keys the unmodified `slapos
//! request --sla` client can send (`max_price=0.05EUR`, `region=eu`,
//! `min_cpu=4`, `min_memory=8GiB`, `capability=gpu`, `provider=alice`,
//! `not_provider=bob`). Allocation (see [`super::allocation`]) takes the
//! cheapest offer that meets every condition, spreading load among equal
//! ones, and records the offer's prices on the instance as its
//! [`Agreement`]: a later change of the offer applies to new allocations
//! only, and accounting bills the instance at the agreed price for as long
//! as it runs.
//!
//! A computer without an offer is sold at the administrators' catalog
//! (`master-node price set`), as before the market existed, unless it has
//! an owner: an owner's computer sells only what its owner offers, so
//! withdrawing an offer takes the computer off the market.
//!
//! Part of the state machine: imports only the state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::ledger::{format_money, Micros, Price};
use super::model::{Computer, ComputerId, SlapState};

/// The command set version that brought the market: its commands, its SLA
/// keys and catalog prices in placement. A cluster still below it (a
/// replica of an older release among its voters) places as before, so
/// every replica makes the same choice.
pub const MARKET_VERSION: u32 = 5;

/// The provider of a computer that has no owner: the cluster's operator.
pub const OPERATOR: &str = "operator";

/// Resources an offer may price beside hosting, with the unit of the price.
pub const OFFER_RESOURCES: &[(&str, &str)] = &[
    ("cpu", "CPU-second"),
    ("memory", "GiB"),
    ("disk", "GiB"),
    ("network", "GiB"),
];

/// What a machine is, as its offer describes it. Zero or empty: not
/// stated (the node's own report is used where it has one).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Specs {
    pub cpu_model: String,
    pub cpu_count: u32,
    pub memory_bytes: u64,
    pub disk_bytes: u64,
    pub region: String,
    pub network: String,
    /// Capabilities the computer has for every partition it sells
    /// (`ipv4-public`, `gpu`, ...): see the `capability` SLA key.
    pub capabilities: Vec<String>,
}

/// A computer's offer on the market.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub computer: ComputerId,
    /// Per partition-hour, in the offer's currency.
    pub hosting: Price,
    /// Prices of other resources (keys of [`OFFER_RESOURCES`]), in the
    /// hosting price's currency, per the unit that table names.
    pub resources: BTreeMap<String, Micros>,
    pub specs: Specs,
    /// How many of its partitions it sells at most.
    pub partitions: u32,
}

/// The terms an instance was allocated at: the offer as it stood then.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    pub computer: ComputerId,
    /// Who is credited for the instance's use.
    pub provider: String,
    pub hosting: Price,
    pub resources: BTreeMap<String, Micros>,
    /// Leader time of the allocation, in microseconds.
    pub at_us: u64,
}

impl Agreement {
    /// The agreed price of `resource`, per billing unit ([`billing_scale`]);
    /// a resource the offer did not price costs nothing.
    pub fn price_of(&self, resource: &str) -> Option<Price> {
        if resource == super::ledger::HOSTING {
            return Some(self.hosting.clone());
        }
        self.resources.get(resource).map(|p| Price {
            unit_price: *p,
            currency: self.hosting.currency.clone(),
        })
    }
}

/// How many of a resource's counted units (bytes) make the unit an offer
/// prices it in (GiB); 1 for hours and seconds.
pub fn billing_scale(resource: &str) -> i128 {
    match resource {
        "memory" | "disk" | "network" => 1 << 30,
        _ => 1,
    }
}

/// Active ISO 4217 currency codes.
const CURRENCIES: &str = "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN \
    BWP BYN BZD CAD CDF CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD \
    GNF GTQ GYD HKD HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR \
    LRD LSL LYD MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP \
    PKR PLN PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP \
    TRY TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL";

/// Checks a currency code: an active ISO 4217 code, in capitals.
pub fn check_currency(code: &str) -> Result<(), String> {
    if code.len() == 3 && CURRENCIES.split_ascii_whitespace().any(|c| c == code) {
        Ok(())
    } else {
        Err(format!(
            "currency {code:?} is not an ISO 4217 code (write it in capitals, e.g. EUR, USD, CHF)"
        ))
    }
}

pub use slap_proto::size::{format_size, parse_size};

/// A price ceiling: `0.05EUR`, `0.05 EUR` or `EUR 0.05`.
pub fn parse_max_price(text: &str) -> Result<Price, String> {
    let t = text.trim();
    // The currency is the run of letters at the end (0.05 EUR), else at
    // the start (EUR 0.05).
    let (amount, currency) = if t.ends_with(|c: char| c.is_ascii_alphabetic()) {
        let split = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).len();
        (t[..split].trim(), &t[split..])
    } else {
        let split = t.len() - t.trim_start_matches(|c: char| c.is_ascii_alphabetic()).len();
        (t[split..].trim(), &t[..split])
    };
    if currency.is_empty() {
        return Err(format!(
            "SLA max_price {text:?} needs a currency: write max_price=0.05EUR (per partition-hour)"
        ));
    }
    check_currency(currency).map_err(|e| format!("SLA max_price: {e}"))?;
    let unit_price = super::ledger::parse_money(amount).map_err(|e| format!("SLA max_price: {e}"))?;
    Ok(Price {
        unit_price,
        currency: currency.to_string(),
    })
}

/// What a request asks of the market (SLA keys); empty: anything.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Conditions {
    /// At most this per partition-hour, in this currency.
    pub max_price: Option<Price>,
    pub min_cpu: Option<u32>,
    pub min_memory: Option<u64>,
    /// Only these providers (empty: any).
    pub providers: Vec<String>,
    pub not_providers: Vec<String>,
}

/// SLA keys read as market conditions.
pub const CONDITION_KEYS: &[&str] = &["max_price", "min_cpu", "min_memory", "provider", "not_provider"];

fn names(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

impl Conditions {
    /// Reads one market SLA key into the conditions.
    pub fn read(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "max_price" => self.max_price = Some(parse_max_price(value)?),
            "min_cpu" => {
                let n = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("SLA min_cpu {value:?} is not a number of CPUs (e.g. min_cpu=4)"))?;
                self.min_cpu = Some(n);
            }
            "min_memory" => self.min_memory = Some(parse_size(value).map_err(|e| format!("SLA min_memory: {e}"))?),
            "provider" => self.providers = names(value),
            "not_provider" => self.not_providers = names(value),
            _ => return Err(format!("SLA key {key:?} is not a market condition")),
        }
        Ok(())
    }

    /// Whether any condition is set.
    pub fn any(&self) -> bool {
        *self != Conditions::default()
    }

    /// Whether a computer on `terms` meets the conditions, its price aside
    /// (see [`Conditions::accepts_price`]).
    pub fn accepts(&self, terms: &Terms) -> bool {
        self.min_cpu
            .is_none_or(|n| terms.cpu_count.is_some_and(|c| c >= u64::from(n)))
            && self
                .min_memory
                .is_none_or(|n| terms.memory_bytes.is_some_and(|m| m >= n))
            && (self.providers.is_empty() || self.providers.iter().any(|p| p == terms.provider))
            && !self.not_providers.iter().any(|p| p == terms.provider)
    }

    /// Whether an hourly price (`None`: free) is within `max_price`.
    pub fn accepts_price(&self, price: Option<(&Micros, &str)>) -> bool {
        match (&self.max_price, price) {
            (None, _) | (Some(_), None) => true,
            (Some(max), Some((amount, currency))) => currency == max.currency && *amount <= max.unit_price,
        }
    }

    /// The conditions, as a reason names them.
    pub fn describe(&self) -> String {
        let mut parts = vec![];
        if let Some(p) = &self.max_price {
            parts.push(format!("max_price {} {}", format_money(p.unit_price), p.currency));
        }
        if let Some(n) = self.min_cpu {
            parts.push(format!("min_cpu {n}"));
        }
        if let Some(n) = self.min_memory {
            parts.push(format!("min_memory {}", format_size(n)));
        }
        if !self.providers.is_empty() {
            parts.push(format!("provider {}", self.providers.join(",")));
        }
        if !self.not_providers.is_empty() {
            parts.push(format!("not_provider {}", self.not_providers.join(",")));
        }
        parts.join(", ")
    }
}

/// What a computer sells on, as allocation reads it: its offer where it
/// has one, else what its node reported and its categories.
#[derive(Debug, Clone)]
pub struct Terms<'a> {
    pub offer: Option<&'a Offer>,
    pub provider: &'a str,
    pub region: Option<&'a str>,
    pub cpu_count: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub capabilities: &'a [String],
}

impl<'a> Terms<'a> {
    /// The terms of `computer`, with its offer and its owner if any.
    pub fn of(computer: &'a Computer, offer: Option<&'a Offer>, owner: Option<&'a String>) -> Self {
        let reported = |key: &str| computer.capacity.get(key).and_then(|v| v.parse::<u64>().ok());
        let stated = |n: u64| (n > 0).then_some(n);
        let specs = offer.map(|o| &o.specs);
        Terms {
            offer,
            provider: owner.map_or(OPERATOR, String::as_str),
            region: specs
                .map(|s| s.region.as_str())
                .filter(|r| !r.is_empty())
                .or_else(|| computer.categories.get("region").map(String::as_str)),
            cpu_count: specs
                .and_then(|s| stated(u64::from(s.cpu_count)))
                .or_else(|| reported("cpu_count")),
            memory_bytes: specs
                .and_then(|s| stated(s.memory_bytes))
                .or_else(|| reported("memory_bytes")),
            capabilities: specs.map_or(&[], |s| s.capabilities.as_slice()),
        }
    }
}

/// Checks an offer before it is stored: nothing is stored unless all is well.
pub fn check_offer(offer: &Offer, computer: &Computer) -> Result<(), String> {
    check_currency(&offer.hosting.currency)?;
    if offer.hosting.unit_price < 0 {
        return Err("an offer's price cannot be negative".into());
    }
    for (resource, price) in &offer.resources {
        if !OFFER_RESOURCES.iter().any(|(r, _)| r == resource) {
            return Err(format!(
                "an offer prices hosting, cpu, memory, disk and network; not {resource:?}"
            ));
        }
        if *price < 0 {
            return Err(format!("the {resource} price cannot be negative"));
        }
    }
    if offer.partitions == 0 {
        return Err("an offer sells at least one partition (to sell none, withdraw the offer)".into());
    }
    if offer.partitions as usize > computer.partitions.len() {
        return Err(format!(
            "computer {} has {} partitions; its offer cannot sell {}",
            computer.id,
            computer.partitions.len(),
            offer.partitions
        ));
    }
    let s = &offer.specs;
    for (what, text) in [
        ("CPU model", &s.cpu_model),
        ("region", &s.region),
        ("network", &s.network),
    ] {
        if text.len() > 256 {
            return Err(format!("an offer's {what} is at most 256 bytes"));
        }
    }
    if s.capabilities.len() > 64 || s.capabilities.iter().any(|c| c.trim().is_empty() || c.len() > 256) {
        return Err("an offer lists at most 64 capabilities, each a non-empty word".into());
    }
    Ok(())
}

/// An offer as the market shows it: with its provider and how full it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferView {
    pub offer: Offer,
    pub provider: String,
    /// Partitions busy, and in all, on the computer.
    pub busy: usize,
    pub total: usize,
}

impl OfferView {
    /// How much of what the offer sells is sold, from 0 to 1.
    pub fn fill_rate(&self) -> f64 {
        (self.busy.min(self.offer.partitions as usize)) as f64 / f64::from(self.offer.partitions.max(1))
    }
}

/// The replicated market: offers by computer.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Market {
    pub offers: BTreeMap<ComputerId, Offer>,
}

// ----- in apply ----------------------------------------------------------

use super::allocation::{Rank, Sale};
use super::ledger::HOSTING;
use super::{invalid, refused_not_found, Dirty, Master, Reply};

impl Master {
    /// What `computer` sells on (see [`Terms`]).
    pub fn terms_of<'a>(&'a self, computer: &'a Computer) -> Terms<'a> {
        Terms::of(
            computer,
            self.market.offers.get(&computer.id),
            self.ledger.owners.get(&computer.id),
        )
    }

    /// Publishes (or replaces) a computer's offer; new allocations only.
    pub(super) fn set_offer(&mut self, seq: u64, now: u64, offer: super::market::Offer) -> Reply {
        let Some(computer) = self.computers.get(&offer.computer) else {
            return refused_not_found(format!("computer {} does not exist", offer.computer));
        };
        if let Err(e) = check_offer(&offer, computer) {
            return invalid(e);
        }
        let id = offer.computer.clone();
        self.market.offers.insert(id.clone(), offer);
        self.dirty.insert(Dirty::Offer(id.clone()));
        self.reprice_placement(&id);
        // A request waiting for such an offer takes it now.
        self.place_pending(seq, now);
        Reply::Done
    }

    /// Takes a computer's offer down: it sells at the catalog again, or
    /// nothing if it has an owner. Running instances keep their terms.
    pub(super) fn withdraw_offer(&mut self, seq: u64, now: u64, computer: &str) -> Reply {
        if self.market.offers.remove(computer).is_none() {
            return refused_not_found(format!("computer {computer} has no offer"));
        }
        self.dirty.insert(Dirty::Offer(computer.to_string()));
        self.reprice_placement(computer);
        // Without an owner it sells at the catalog, which may suit a request.
        self.place_pending(seq, now);
        Reply::Done
    }

    /// Names (or, with `None`, forgets) who owns a computer: who may set
    /// its offer and who is credited for its work.
    pub(super) fn set_owner(&mut self, seq: u64, now: u64, computer: &str, owner: Option<&str>) -> Reply {
        if !self.computers.contains_key(computer) && owner.is_some() {
            return refused_not_found(format!("computer {computer} does not exist"));
        }
        match owner {
            Some(o) if o.trim().is_empty() || o.len() > 128 => {
                return invalid("an owner is a user's name (1 to 128 bytes)");
            }
            Some(o) => {
                self.ledger.owners.insert(computer.to_string(), o.to_string());
            }
            None => {
                self.ledger.owners.remove(computer);
            }
        }
        self.dirty.insert(Dirty::Owner(computer.to_string()));
        self.reprice_placement(computer);
        self.place_pending(seq, now);
        Reply::Done
    }

    /// The offers (of `computer`, or all), as the market shows them.
    pub fn offer_views(&self, computer: Option<&str>) -> Vec<OfferView> {
        self.market
            .offers
            .values()
            .filter(|o| computer.is_none_or(|c| c == o.computer))
            .map(|o| {
                let partitions = self.partitions_of(&o.computer);
                OfferView {
                    offer: o.clone(),
                    provider: self.provider_of_computer(&o.computer).to_string(),
                    busy: partitions.iter().filter(|p| p.state == SlapState::Busy).count(),
                    total: partitions.len(),
                }
            })
            .collect()
    }

    /// Who is credited for `computer`'s work: its owner, else the operator.
    pub fn provider_of_computer(&self, computer: &str) -> &str {
        self.ledger.owners.get(computer).map_or(OPERATOR, String::as_str)
    }

    /// How `computer` sells, for placement (`None`: at the catalog).
    fn sale_of(&self, computer: &str) -> Option<Sale> {
        match self.market.offers.get(computer) {
            Some(o) => Some(Sale::Offer {
                rank: Rank::of(&o.hosting),
                partitions: o.partitions as usize,
            }),
            None if self.ledger.owners.contains_key(computer) => Some(Sale::Withheld),
            None => None,
        }
    }

    /// Moves `computer` in the placement index after its offer or owner changed.
    pub(super) fn reprice_placement(&mut self, computer: &str) {
        let sale = self.sale_of(computer);
        self.placement.set_terms(computer, sale);
    }

    /// Moves the computers on the catalog after its hosting price for
    /// `release` ("" for every release) changed (from the market's
    /// version on; before, the catalog played no part in placement).
    pub(super) fn reprice_catalog(&mut self, release: &str) {
        if self.effective_version() < MARKET_VERSION {
            return;
        }
        let rank = self
            .ledger
            .prices
            .get(&(HOSTING.to_string(), release.to_string()))
            .map(Rank::of);
        self.placement.set_catalog(release, rank);
    }

    /// The cluster reached the market's version: catalog prices take
    /// their part in placement now.
    pub(super) fn open_market(&mut self, seq: u64, now: u64) {
        let releases: Vec<String> = self
            .ledger
            .prices
            .keys()
            .filter(|(resource, _)| resource == HOSTING)
            .map(|(_, release)| release.clone())
            .collect();
        for release in releases {
            self.reprice_catalog(&release);
        }
        self.place_pending(seq, now);
    }

    /// What placement needs of the market, for a rebuild of its index.
    pub(super) fn placement_terms(&self) -> (BTreeMap<ComputerId, Sale>, BTreeMap<String, Rank>) {
        let computers = self.market.offers.keys().chain(self.ledger.owners.keys());
        let terms = computers.filter_map(|c| Some((c.clone(), self.sale_of(c)?))).collect();
        let catalog = self
            .ledger
            .prices
            .iter()
            .filter(|_| self.effective_version() >= MARKET_VERSION)
            .filter(|((resource, _), _)| resource == HOSTING)
            .map(|((_, release), p)| (release.clone(), Rank::of(p)))
            .collect();
        (terms, catalog)
    }

    /// Records the terms of `instance`, placed on `computer`, if the
    /// computer sells through an offer.
    pub(super) fn agree(&mut self, now: u64, instance: &str, computer: &str) {
        let Some(offer) = self.market.offers.get(computer) else {
            return;
        };
        let agreement = Agreement {
            computer: computer.to_string(),
            provider: self.provider_of_computer(computer).to_string(),
            hosting: offer.hosting.clone(),
            resources: offer.resources.clone(),
            at_us: now,
        };
        self.ledger.agreements.insert(instance.to_string(), agreement);
        self.dirty.insert(Dirty::Agreement(instance.to_string()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_and_currencies() {
        let p = parse_max_price("0.05EUR").unwrap();
        assert_eq!((p.unit_price, p.currency.as_str()), (50_000, "EUR"));
        assert_eq!(parse_max_price("EUR 0.05"), Ok(p.clone()));
        assert_eq!(parse_max_price(" 0.05 EUR "), Ok(p));
        assert!(parse_max_price("0.05").unwrap_err().contains("needs a currency"));
        assert!(parse_max_price("0.05 XYZ").unwrap_err().contains("ISO 4217"));
        assert!(parse_max_price("0.05 eur").is_err(), "codes are capitals");
        assert!(parse_max_price("-1 EUR").is_err());
        assert!(parse_max_price("lots EUR").is_err());
        assert!(check_currency("CHF").is_ok());
        assert!(check_currency("EURO").is_err());
    }

    #[test]
    fn conditions_read_and_accept() {
        let mut c = Conditions::default();
        assert!(!c.any());
        c.read("min_cpu", "4").unwrap();
        c.read("min_memory", "8GiB").unwrap();
        c.read("not_provider", "bob, carol").unwrap();
        c.read("max_price", "0.10 EUR").unwrap();
        assert!(c.read("min_cpu", "four").unwrap_err().contains("min_cpu"));
        let caps = vec![];
        let mut t = Terms {
            offer: None,
            provider: "alice",
            region: None,
            cpu_count: Some(8),
            memory_bytes: Some(16 << 30),
            capabilities: &caps,
        };
        assert!(c.accepts(&t));
        t.provider = "carol";
        assert!(!c.accepts(&t), "not_provider");
        t.provider = "alice";
        t.cpu_count = Some(2);
        assert!(!c.accepts(&t), "min_cpu");
        t.cpu_count = None;
        assert!(!c.accepts(&t), "a computer that says nothing of its CPUs has not 4");
        assert!(c.accepts_price(Some((&100_000, "EUR"))));
        assert!(!c.accepts_price(Some((&100_001, "EUR"))));
        assert!(!c.accepts_price(Some((&1, "USD"))), "currencies are never mixed");
        assert!(c.accepts_price(None), "a free computer is within any ceiling");
        assert_eq!(
            c.describe(),
            "max_price 0.100000 EUR, min_cpu 4, min_memory 8 GiB, not_provider bob,carol"
        );
    }
}
