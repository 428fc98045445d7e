//! Accounting: what was used, by whom, from whom, and what it costs.
//!
//! In the shape of ERP5's Universal Business Model, kept small:
//!
//! - **nodes** are the parties: the *provider* (the computer that did the
//!   work) and the *subscriber* (the user owning the instance tree);
//! - **items** are what a movement is about: the computer, the software
//!   release and the *subscription* (the instance tree, by its root);
//! - **movements** are quantities moving from a source to a destination
//!   over a time: *hosting* (the hours an instance was reported started on
//!   a partition) and *resources* (CPU seconds, memory, disk and network
//!   bytes, or any resource a release reports, from the node's TioXML).
//!
//! Everything here is replicated state, changed only in `apply`:
//! a hosting span opens when a node reports an instance started and closes
//! (becoming a movement) when it reports it stopped or the partition is
//! freed; a usage journal becomes movements once, whatever the number of
//! times a node sends it (journals are known by their sha256). Prices are
//! set by an administrator per resource, optionally per release, with a
//! currency. Money is counted in millionths of the currency unit and
//! quantities in millionths of their unit ([`Quantity`]): nothing
//! replicated is floating point, totals are sums of integers, and a report
//! is the same on every replica and every machine.
//!
//! Part of the state machine: imports only the state.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::market::{billing_scale, Agreement, OPERATOR};
use super::model::{ComputerId, InstanceId, PartitionId, SoftwareUrl};

/// Money, in millionths of the currency unit.
pub type Micros = i64;

/// A quantity of a resource in millionths of its unit (an hour, a second,
/// a byte): fixed point, so every replica adds, splits and prices it the
/// same way. Wide, so a month of bytes summed over a fleet does not wrap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Quantity(pub i128);

impl Quantity {
    /// Millionths in one unit.
    const ONE: i128 = 1_000_000;

    /// `units` whole units.
    pub fn units(units: i64) -> Quantity {
        Quantity(i128::from(units) * Self::ONE)
    }

    /// A decimal read off the wire (TioXML), rounded to the millionth;
    /// `None` unless it is a finite, non-negative number that fits.
    pub fn from_decimal(value: f64) -> Option<Quantity> {
        let scaled = (value * Self::ONE as f64).round();
        (value.is_finite() && value >= 0.0 && scaled < 1e36).then_some(Quantity(scaled as i128))
    }

    /// The hours from `start_us` to `stop_us` (microseconds).
    pub fn hours_between(start_us: u64, stop_us: u64) -> Quantity {
        // Millionths of an hour are 3,600 microseconds each.
        Quantity(i128::from(stop_us.saturating_sub(start_us)) / 3_600)
    }

    /// As a number, for display and the wire (never for the state).
    pub fn as_f64(self) -> f64 {
        self.0 as f64 / Self::ONE as f64
    }
}

/// The resource key of hosting movements (priced per hour).
pub const HOSTING: &str = "hosting";

/// What moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum MovementKind {
    Hosting,
    Resource,
}

/// A quantity of a resource, from a provider to a subscriber.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Movement {
    /// The proposal that made it (unique, in log order).
    pub id: u64,
    pub kind: MovementKind,
    /// The price key: `hosting`, the movement's category (`cpu`, `memory`,
    /// `disk`, `network`, ...) or, without one, the resource's name.
    pub resource: String,
    /// What the node called it (e.g. `CPU Consumption`).
    pub title: String,
    /// The provider: the computer.
    pub source: ComputerId,
    /// The subscriber: the user owning the tree ("" for a free partition's
    /// usage, the provider's own).
    pub destination: String,
    /// The subscription: the instance tree's root ("" when none).
    pub subscription: InstanceId,
    pub instance: InstanceId,
    pub release: SoftwareUrl,
    pub partition: PartitionId,
    /// Microseconds since 1970: the span of a hosting movement; a resource
    /// movement is booked at the journal's stop date.
    pub start_us: u64,
    pub stop_us: u64,
    pub quantity: Quantity,
    pub unit: String,
}

/// An instance reported started and not stopped since.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostingSpan {
    pub instance: InstanceId,
    pub subscription: InstanceId,
    pub subscriber: String,
    pub computer: ComputerId,
    pub partition: PartitionId,
    pub release: SoftwareUrl,
    pub started_us: u64,
}

/// A unit price.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Price {
    pub unit_price: Micros,
    pub currency: String,
}

/// One line of a usage journal, as the Master books it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageLine {
    pub partition: PartitionId,
    pub resource: String,
    pub category: Option<String>,
    pub quantity: Quantity,
    /// Its transaction's stop date (the leader's time when it has none).
    pub stop_us: Option<u64>,
}

/// The unit a resource key is counted in.
pub fn unit_of(resource: &str) -> &'static str {
    match resource {
        HOSTING => "hour",
        "cpu" => "second",
        "memory" | "disk" | "network" => "byte",
        _ => "unit",
    }
}

/// The replicated accounting state.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Ledger {
    pub movements: BTreeMap<u64, Movement>,
    /// Open hosting spans, by instance.
    pub spans: BTreeMap<InstanceId, HostingSpan>,
    /// Booked journals: sha256 -> the proposal that booked it.
    pub journals: BTreeMap<String, u64>,
    /// Prices by (resource key, release or "" for every release).
    pub prices: BTreeMap<(String, String), Price>,
    /// The terms each instance allocated through an offer agreed to (kept
    /// after the instance is gone: its movements are still billed).
    pub agreements: BTreeMap<InstanceId, Agreement>,
    /// Who owns each computer that has an owner: its provider.
    pub owners: BTreeMap<ComputerId, String>,
}

impl Ledger {
    /// The price of `resource` for `release`: the release's own, else the
    /// general one.
    pub fn price(&self, resource: &str, release: &str) -> Option<&Price> {
        self.prices
            .get(&(resource.to_string(), release.to_string()))
            .or_else(|| self.prices.get(&(resource.to_string(), String::new())))
    }

    /// What `m` is billed at, per how many of its counted units: the
    /// instance's agreed price if it was allocated through an offer, else
    /// the catalog.
    pub fn billing_price(&self, m: &Movement) -> Option<(Price, i128)> {
        match self.agreements.get(&m.instance) {
            Some(a) => a.price_of(&m.resource).map(|p| (p, billing_scale(&m.resource))),
            None => self.price(&m.resource, &m.release).map(|p| (p.clone(), 1)),
        }
    }

    /// Who is credited for `m`: the provider its instance's terms name,
    /// else the computer's owner, else the operator.
    pub fn provider_of<'a>(&'a self, m: &'a Movement) -> &'a str {
        match self.agreements.get(&m.instance) {
            Some(a) => &a.provider,
            None => self.owners.get(&m.source).map_or(OPERATOR, String::as_str),
        }
    }
}

/// A calendar month, `[start, end)` in microseconds since 1970 (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start_us: u64,
    pub end_us: u64,
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let (y, m) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

impl Period {
    /// `YYYY-MM`.
    pub fn parse(text: &str) -> Result<Period, String> {
        let bad = || format!("{text:?} is not a month: write YYYY-MM, e.g. 2026-11");
        let (y, m) = text.trim().split_once('-').ok_or_else(bad)?;
        let (y, m): (i64, i64) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
            return Err(bad());
        }
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let us = |y, m| (days_from_civil(y, m, 1) * 86_400 * 1_000_000) as u64;
        Ok(Period {
            start_us: us(y, m),
            end_us: us(ny, nm),
        })
    }

    /// How much of `[start, stop)` falls in this period, in microseconds.
    fn overlap(&self, start: u64, stop: u64) -> u64 {
        stop.min(self.end_us).saturating_sub(start.max(self.start_us))
    }
}

/// The part of a movement that falls in a period (a hosting movement pro
/// rata of its time in the period, rounded down to the millionth).
fn portion(m: &Movement, p: &Period) -> Quantity {
    match m.kind {
        MovementKind::Hosting => {
            let span = m.stop_us.saturating_sub(m.start_us);
            if span == 0 {
                return Quantity::default();
            }
            let inside = p.overlap(m.start_us, m.stop_us);
            Quantity(m.quantity.0 * i128::from(inside) / i128::from(span))
        }
        MovementKind::Resource => {
            if (p.start_us..p.end_us).contains(&m.stop_us) {
                m.quantity
            } else {
                Quantity::default()
            }
        }
    }
}

/// Money for `quantity` at `price`, rounded half up to the micro unit.
#[cfg(test)]
fn amount(quantity: Quantity, price: Option<&Price>) -> Micros {
    scaled_amount(quantity, price, 1)
}

/// Money for `quantity` at `price` per `scale` units (a price per GiB
/// of a quantity counted in bytes), rounded half up to the micro unit.
fn scaled_amount(quantity: Quantity, price: Option<&Price>, scale: i128) -> Micros {
    price
        .map(|p| {
            let exact = quantity.0 * i128::from(p.unit_price);
            let divisor = Quantity::ONE * scale;
            let rounded = (exact + divisor / 2).div_euclid(divisor);
            Micros::try_from(rounded).unwrap_or(if rounded < 0 { Micros::MIN } else { Micros::MAX })
        })
        .unwrap_or(0)
}

/// One invoice line: a resource of one release within one subscription.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Line {
    pub subscription: InstanceId,
    pub resource: String,
    pub release: SoftwareUrl,
    /// The provider (computer) for a provider's report; "" in a subscriber's.
    pub computer: ComputerId,
    /// The subscriber, in a provider's report; "" in a subscriber's.
    pub subscriber: String,
    /// The sum of the movements' quantities, as a number (the sum itself is
    /// made in fixed point).
    pub quantity: f64,
    pub unit: String,
    pub unit_price: Option<Micros>,
    pub currency: Option<String>,
    /// What `unit_price` is per: the line's unit, or `GiB` for a byte
    /// resource priced by an offer.
    pub price_unit: String,
    /// Priced at the terms the instance was allocated at (an offer), not
    /// at the catalog.
    pub agreed: bool,
    /// The sum of each movement's amount.
    pub amount: Micros,
    pub movements: usize,
}

/// A usage report: lines and totals per currency.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub period_start_us: u64,
    pub period_end_us: u64,
    pub lines: Vec<Line>,
    /// Total per currency (lines without a price count nothing).
    pub totals: BTreeMap<String, Micros>,
}

/// Who a report is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportFor {
    /// What a user's subscriptions used, line by line: their invoice.
    Subscriber(String),
    /// What a computer provided, per subscriber.
    Computer(ComputerId),
    /// What a provider's computers earned, per computer and subscriber:
    /// their statement. Every movement is on exactly one subscriber's
    /// invoice and one provider's statement, at the same amount.
    Provider(String),
}

/// What a report line gathers: subscription, resource, release, provider,
/// subscriber, and the price (movements at different prices, such as two
/// instances agreed at different offers, are different lines).
type LineKey = (
    InstanceId,
    String,
    SoftwareUrl,
    ComputerId,
    String,
    Option<(Micros, String, i128)>,
);

/// The report of `who` for `period`. Open hosting spans count up to `now_us`
/// (the Master's own clock, the same on every replica at one log position).
pub fn report(ledger: &Ledger, who: &ReportFor, period: &Period, now_us: u64) -> Report {
    let open: Vec<Movement> = ledger
        .spans
        .values()
        .map(|s| hosting_movement(0, s, now_us.max(s.started_us)))
        .collect();
    let mut lines: BTreeMap<LineKey, (Line, Quantity)> = BTreeMap::new();
    for m in ledger.movements.values().chain(open.iter()) {
        let mine = match who {
            ReportFor::Subscriber(u) => &m.destination == u,
            ReportFor::Computer(c) => &m.source == c,
            ReportFor::Provider(p) => ledger.provider_of(m) == p,
        };
        if !mine {
            continue;
        }
        let q = portion(m, period);
        if q == Quantity::default() && m.kind == MovementKind::Hosting {
            continue;
        }
        if m.kind == MovementKind::Resource && !(period.start_us..period.end_us).contains(&m.stop_us) {
            continue;
        }
        let (computer, subscriber) = match who {
            ReportFor::Subscriber(_) => (String::new(), String::new()),
            ReportFor::Computer(_) | ReportFor::Provider(_) => (m.source.clone(), m.destination.clone()),
        };
        let price = ledger.billing_price(m);
        let key = (
            m.subscription.clone(),
            m.resource.clone(),
            m.release.clone(),
            computer.clone(),
            subscriber.clone(),
            price
                .as_ref()
                .map(|(p, scale)| (p.unit_price, p.currency.clone(), *scale)),
        );
        let (line, sum) = lines.entry(key).or_insert_with(|| {
            let line = Line {
                subscription: m.subscription.clone(),
                resource: m.resource.clone(),
                release: m.release.clone(),
                computer,
                subscriber,
                quantity: 0.0,
                unit: m.unit.clone(),
                unit_price: price.as_ref().map(|(p, _)| p.unit_price),
                currency: price.as_ref().map(|(p, _)| p.currency.clone()),
                price_unit: match &price {
                    Some((_, scale)) if *scale > 1 => "GiB".into(),
                    _ => m.unit.clone(),
                },
                agreed: ledger.agreements.contains_key(&m.instance),
                amount: 0,
                movements: 0,
            };
            (line, Quantity::default())
        });
        sum.0 += q.0;
        line.amount += price.as_ref().map_or(0, |(p, scale)| scaled_amount(q, Some(p), *scale));
        line.movements += 1;
    }
    let lines: Vec<Line> = lines
        .into_values()
        .map(|(mut line, sum)| {
            line.quantity = sum.as_f64();
            line
        })
        .collect();
    let mut totals = BTreeMap::new();
    for l in &lines {
        if let Some(c) = &l.currency {
            *totals.entry(c.clone()).or_insert(0) += l.amount;
        }
    }
    Report {
        period_start_us: period.start_us,
        period_end_us: period.end_us,
        lines,
        totals,
    }
}

/// The movement a hosting span becomes when it closes at `stop_us`.
pub fn hosting_movement(id: u64, s: &HostingSpan, stop_us: u64) -> Movement {
    Movement {
        id,
        kind: MovementKind::Hosting,
        resource: HOSTING.into(),
        title: "Hosting".into(),
        source: s.computer.clone(),
        destination: s.subscriber.clone(),
        subscription: s.subscription.clone(),
        instance: s.instance.clone(),
        release: s.release.clone(),
        partition: s.partition.clone(),
        start_us: s.started_us,
        stop_us,
        quantity: Quantity::hours_between(s.started_us, stop_us),
        unit: "hour".into(),
    }
}

/// Money as text: `12.345600`.
pub fn format_money(m: Micros) -> String {
    let sign = if m < 0 { "-" } else { "" };
    let m = m.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// Parses `12.3456` into micros.
pub fn parse_money(text: &str) -> Result<Micros, String> {
    let bad = || format!("{text:?} is not an amount (e.g. 0.02)");
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    if whole.is_empty() && frac.is_empty() || frac.len() > 6 || t.starts_with('-') {
        return Err(bad());
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| bad())?
    };
    let frac_digits: i64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<6}").parse().map_err(|_| bad())?
    };
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac_digits))
        .ok_or_else(bad)
}

// ----- in apply ----------------------------------------------------------

use super::{invalid, refused_not_found, Dirty, Master, Reply};

/// Most lines one journal may carry (movement ids leave room for this many).
pub const MAX_LINES: usize = 1 << 16;

impl Master {
    /// Books a usage journal once; refused whole, with nothing stored, if
    /// the computer is unknown or a line names a partition of another.
    pub(super) fn book_usage(
        &mut self,
        seq: u64,
        now: u64,
        computer: &str,
        sha256: &str,
        lines: &[UsageLine],
    ) -> Reply {
        if self.ledger.journals.contains_key(sha256) {
            return Reply::Note("this journal was booked already; nothing added".into());
        }
        if !self.computers.contains_key(computer) {
            return refused_not_found(format!("computer {computer} does not exist"));
        }
        if lines.len() > MAX_LINES {
            return invalid(format!("a journal holds at most {MAX_LINES} movements"));
        }
        if let Some(bad) = lines.iter().find(|l| {
            !self
                .partitions
                .contains_key(&(computer.to_string(), l.partition.clone()))
        }) {
            return invalid(format!(
                "movement for partition {:?}, which is not a partition of computer {computer}",
                bad.partition
            ));
        }
        for (i, l) in lines.iter().enumerate() {
            let at = l.stop_us.unwrap_or(now);
            let instance = self.instance_on(computer, &l.partition);
            let resource = l.category.clone().unwrap_or_else(|| l.resource.clone());
            let id = (seq << 16) | i as u64;
            let m = Movement {
                id,
                kind: MovementKind::Resource,
                unit: unit_of(&resource).into(),
                resource,
                title: l.resource.clone(),
                source: computer.to_string(),
                destination: instance.map(|i| i.owner.clone()).unwrap_or_default(),
                subscription: instance.map(|i| i.root.clone()).unwrap_or_default(),
                instance: instance.map(|i| i.id.clone()).unwrap_or_default(),
                release: instance.map(|i| i.software_release.clone()).unwrap_or_default(),
                partition: l.partition.clone(),
                start_us: at,
                stop_us: at,
                quantity: l.quantity,
            };
            self.ledger.movements.insert(id, m);
            self.dirty.insert(Dirty::Movement(id));
        }
        self.ledger.journals.insert(sha256.to_string(), seq);
        self.dirty.insert(Dirty::Journal(sha256.to_string()));
        Reply::Done
    }

    pub(super) fn set_price(
        &mut self,
        seq: u64,
        now: u64,
        resource: &str,
        release: Option<&str>,
        price: Option<&Price>,
    ) -> Reply {
        if resource.trim().is_empty() {
            return invalid("a price needs a resource (hosting, cpu, memory, disk, network, or a release's own)");
        }
        let key = (resource.to_string(), release.unwrap_or_default().to_string());
        match price {
            Some(p) if p.unit_price < 0 => return invalid("a unit price cannot be negative"),
            Some(p) if p.currency.trim().is_empty() || p.currency.len() > 16 => {
                return invalid("a price needs a currency code (e.g. EUR)")
            }
            Some(p) => {
                self.ledger.prices.insert(key.clone(), p.clone());
            }
            None => {
                self.ledger.prices.remove(&key);
            }
        }
        if key.0 == HOSTING {
            // Computers without an offer sell at the catalog's hosting
            // price: a request waiting for a cheaper one may fit now.
            self.reprice_catalog(&key.1);
            if self.effective_version() >= super::market::MARKET_VERSION {
                self.place_pending(seq, now);
            }
        }
        self.dirty.insert(Dirty::Price(key.0, key.1));
        Reply::Done
    }

    /// Opens the hosting span of a placed, non-shared instance.
    pub(super) fn open_hosting(&mut self, id: &str, now: u64) {
        if self.ledger.spans.contains_key(id) {
            return;
        }
        let Some(inst) = self.instances.get(id) else { return };
        let Some((computer, partition)) = inst.partition.clone() else {
            return;
        };
        self.ledger.spans.insert(
            id.to_string(),
            HostingSpan {
                instance: id.to_string(),
                subscription: inst.root.clone(),
                subscriber: inst.owner.clone(),
                computer,
                partition,
                release: inst.software_release.clone(),
                started_us: now,
            },
        );
        self.dirty.insert(Dirty::Span(id.to_string()));
    }

    /// Closes an open hosting span into a movement.
    pub(super) fn close_hosting(&mut self, seq: u64, id: &str, now: u64) {
        let Some(span) = self.ledger.spans.remove(id) else {
            return;
        };
        self.dirty.insert(Dirty::Span(id.to_string()));
        let mid = seq << 16;
        let m = hosting_movement(mid, &span, now.max(span.started_us));
        self.ledger.movements.insert(mid, m);
        self.dirty.insert(Dirty::Movement(mid));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn months_and_money() {
        let nov = Period::parse("2026-11").unwrap();
        assert_eq!(nov.start_us, 1_793_491_200 * 1_000_000, "2026-11-01 UTC");
        assert_eq!(nov.end_us, 1_796_083_200 * 1_000_000, "2026-12-01 UTC");
        let dec = Period::parse("2026-12").unwrap();
        assert_eq!(dec.end_us, Period::parse("2027-01").unwrap().start_us);
        for bad in ["2026", "2026-13", "26-11", "2026-1x", ""] {
            assert!(Period::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_money("0.02"), Ok(20_000));
        assert_eq!(parse_money("12"), Ok(12_000_000));
        assert_eq!(parse_money(".5"), Ok(500_000));
        assert_eq!(format_money(12_345_600), "12.345600");
        for bad in ["-1", "1.2345678", "x", ""] {
            assert!(parse_money(bad).is_err(), "{bad}");
        }
    }

    fn movement(id: u64, kind: MovementKind, sub: &str, res: &str, start: u64, stop: u64, q: Quantity) -> Movement {
        Movement {
            id,
            kind,
            resource: res.into(),
            title: res.into(),
            source: format!("COMP-{}", id % 3),
            destination: if id.is_multiple_of(2) {
                "alice".into()
            } else {
                "bob".into()
            },
            subscription: sub.into(),
            instance: sub.into(),
            release: if id.is_multiple_of(4) {
                "sr-a".into()
            } else {
                "sr-b".into()
            },
            partition: "p".into(),
            start_us: start,
            stop_us: stop,
            quantity: q,
            unit: unit_of(res).into(),
        }
    }

    #[test]
    fn hosting_is_split_across_months() {
        let nov = Period::parse("2026-11").unwrap();
        let dec = Period::parse("2026-12").unwrap();
        let mut l = Ledger::default();
        // 48 hours straddling midnight of the 1st of December.
        let start = dec.start_us - 24 * 3_600_000_000;
        let stop = dec.start_us + 24 * 3_600_000_000;
        let mut m = movement(
            2,
            MovementKind::Hosting,
            "T1",
            HOSTING,
            start,
            stop,
            Quantity::units(48),
        );
        m.destination = "alice".into();
        l.movements.insert(2, m);
        l.prices.insert(
            (HOSTING.into(), String::new()),
            Price {
                unit_price: 10_000,
                currency: "EUR".into(),
            },
        );
        let alice = ReportFor::Subscriber("alice".into());
        let r = report(&l, &alice, &nov, 0);
        assert_eq!(r.lines.len(), 1);
        assert_eq!(r.lines[0].quantity, 24.0);
        assert_eq!(r.totals["EUR"], 240_000);
        assert_eq!(report(&l, &alice, &dec, 0).totals["EUR"], 240_000);
        assert!(report(&l, &ReportFor::Subscriber("bob".into()), &nov, 0)
            .lines
            .is_empty());
    }

    #[test]
    fn quantities_are_fixed_point() {
        assert_eq!(Quantity::from_decimal(42.5), Some(Quantity(42_500_000)));
        assert_eq!(
            Quantity::from_decimal(0.1 + 0.2),
            Some(Quantity(300_000)),
            "rounded to the millionth"
        );
        for bad in [-1.0, f64::NAN, f64::INFINITY, 1e40] {
            assert_eq!(Quantity::from_decimal(bad), None, "{bad}");
        }
        // 90 minutes, and one hour split by a month boundary: no drift.
        assert_eq!(Quantity::hours_between(0, 5_400_000_000), Quantity(1_500_000));
        let q = Quantity::units(1);
        assert_eq!(
            amount(
                q,
                Some(&Price {
                    unit_price: 333_333,
                    currency: "EUR".into()
                })
            ),
            333_333
        );
        // A third of a unit at 1.000001: 0.333333667 rounds to 0.333334.
        assert_eq!(
            amount(
                Quantity(333_333),
                Some(&Price {
                    unit_price: 1_000_001,
                    currency: "EUR".into()
                })
            ),
            333_333
        );
    }

    proptest! {
        /// Every report's totals are the sum of its lines, and a line's
        /// amount the sum of its movements' amounts.
        #[test]
        fn totals_are_the_sum_of_the_movements(
            moves in proptest::collection::vec((0u8..2, 0u8..4, 0u8..3, 0u64..2_000, 1u64..2_000, 0u32..1_000_000), 0..60),
            prices in proptest::collection::vec((0u8..3, 0i64..5_000_000, any::<bool>()), 0..6),
        ) {
            let nov = Period::parse("2026-11").unwrap();
            let hour = 3_600_000_000u64;
            let mut l = Ledger::default();
            let res = ["cpu", "disk", HOSTING];
            for (i, (kind, sub, r, start_h, len_h, q)) in moves.iter().enumerate() {
                let start = nov.start_us - 500 * hour + start_h * hour;
                let stop = start + len_h * hour;
                let kind = if *kind == 0 { MovementKind::Hosting } else { MovementKind::Resource };
                let q = if kind == MovementKind::Hosting { Quantity::units(*len_h as i64) } else { Quantity(i128::from(*q) * 1_000) };
                l.movements.insert(i as u64, movement(i as u64, kind, &format!("T{sub}"), res[*r as usize], start, stop, q));
            }
            for (r, p, per_release) in prices {
                let release = if per_release { "sr-a".to_string() } else { String::new() };
                l.prices.insert((res[r as usize].into(), release), Price { unit_price: p, currency: "EUR".into() });
            }
            for who in [ReportFor::Subscriber("alice".into()), ReportFor::Subscriber("bob".into()), ReportFor::Computer("COMP-1".into())] {
                let r = report(&l, &who, &nov, 0);
                let from_lines: i64 = r.lines.iter().filter(|x| x.currency.is_some()).map(|x| x.amount).sum();
                prop_assert_eq!(r.totals.get("EUR").copied().unwrap_or(0), from_lines);
                // Recomputed from the movements alone.
                let mut expected = 0i64;
                for m in l.movements.values() {
                    let mine = match &who { ReportFor::Subscriber(u) => &m.destination == u, ReportFor::Computer(c) => &m.source == c, ReportFor::Provider(p) => l.provider_of(m) == p };
                    if mine {
                        expected += amount(portion(m, &nov), l.price(&m.resource, &m.release));
                    }
                }
                prop_assert_eq!(from_lines, expected);
                // Asked twice, the same report.
                prop_assert_eq!(&report(&l, &who, &nov, 0), &r);
            }
        }
    }
}
