//! The dashboard's market: every offer with its price, specs and how full
//! it is, a summary per currency, the price each instance was allocated
//! at, and providers' statements on the usage page.
//!
//! Offers are public to whoever may open the dashboard: a market shows its
//! prices. Statements are their provider's and administrators'.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use axum::Extension;

use super::{esc, line_amount, line_price, page, viewer};
use crate::authz::Caller;
use crate::replica::Replica;
use crate::state::ledger::{format_money, Period, ReportFor};
use crate::state::market::{format_size, OfferView, OPERATOR};
use crate::state::{Master, Role};

/// The market page.
pub async fn market(State(replica): State<Arc<Replica>>, caller: Option<Extension<Caller>>) -> Response {
    let role = viewer(&caller);
    let offers = replica
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .offer_views(None);
    let mut b = String::new();
    if offers.is_empty() {
        b.push_str(
            "<p id=\"no-offers\">No offers yet. A computer's owner publishes one with \
             <code>slapctl offer set COMPUTER --price 0.05 --currency EUR --partitions N</code>; \
             computers without an offer sell at the administrators' catalog.</p>",
        );
        return page("Market", &role, &b);
    }
    summary(&mut b, &offers);
    b.push_str(
        "<table id=\"offers\"><tr><th>computer</th><th>provider</th><th>price/hour</th><th>other prices</th>\
         <th>region</th><th>CPU</th><th>memory</th><th>disk</th><th>capabilities</th><th>sold</th><th>fill rate</th></tr>",
    );
    for v in &offers {
        let o = &v.offer;
        let others = o
            .resources
            .iter()
            .map(|(r, p)| format!("{} {} {}", esc(r), format_money(*p), esc(&o.hosting.currency)))
            .collect::<Vec<_>>()
            .join("<br>");
        let cpu = match (o.specs.cpu_count, o.specs.cpu_model.as_str()) {
            (0, "") => "-".to_string(),
            (n, "") => n.to_string(),
            (n, model) => format!("{n} × {}", esc(model)),
        };
        let size = |bytes: u64| {
            if bytes == 0 {
                "-".to_string()
            } else {
                format_size(bytes)
            }
        };
        let _ = write!(
            b,
            "<tr class=\"offer\"><td>{}</td><td>{}</td><td>{} {}</td><td>{others}</td><td>{}</td><td>{cpu}</td>\
             <td>{}</td><td>{}</td><td>{}</td><td>{}/{}</td><td>{:.0} %</td></tr>",
            esc(&o.computer),
            esc(&v.provider),
            format_money(o.hosting.unit_price),
            esc(&o.hosting.currency),
            esc(if o.specs.region.is_empty() {
                "-"
            } else {
                &o.specs.region
            }),
            size(o.specs.memory_bytes),
            size(o.specs.disk_bytes),
            esc(&o.specs.capabilities.join(", ")),
            v.busy.min(o.partitions as usize),
            o.partitions,
            v.fill_rate() * 100.0
        );
    }
    b.push_str("</table>");
    page("Market", &role, &b)
}

/// Per currency: how many offers, the price range, partitions sold of offered.
fn summary(b: &mut String, offers: &[OfferView]) {
    let mut per: BTreeMap<&str, (usize, i64, i64, usize, usize)> = BTreeMap::new();
    for v in offers {
        let o = &v.offer;
        let e = per
            .entry(o.hosting.currency.as_str())
            .or_insert((0, i64::MAX, i64::MIN, 0, 0));
        e.0 += 1;
        e.1 = e.1.min(o.hosting.unit_price);
        e.2 = e.2.max(o.hosting.unit_price);
        e.3 += v.busy.min(o.partitions as usize);
        e.4 += o.partitions as usize;
    }
    b.push_str(
        "<table id=\"market-summary\"><tr><th>currency</th><th>offers</th><th>cheapest/hour</th>\
         <th>dearest/hour</th><th>partitions sold</th><th>fill rate</th></tr>",
    );
    for (currency, (n, low, high, sold, offered)) in per {
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{n}</td><td>{}</td><td>{}</td><td>{sold} of {offered}</td><td>{:.0} %</td></tr>",
            esc(currency),
            format_money(low),
            format_money(high),
            sold as f64 * 100.0 / offered.max(1) as f64
        );
    }
    b.push_str("</table>");
}

/// The price an instance was allocated at, for the instances page.
pub fn agreed_price(state: &Master, instance: &str) -> String {
    match state.ledger.agreements.get(instance) {
        Some(a) => format!(
            "{} {} <span class=\"muted\">from {}</span>",
            format_money(a.hosting.unit_price),
            esc(&a.hosting.currency),
            esc(&a.provider)
        ),
        None => "<span class=\"muted\">catalog</span>".into(),
    }
}

/// Providers' statements for `period`: every provider's for an
/// administrator, the caller's own for a user who provides.
pub fn statements(state: &Master, role: &Option<Role>, period: &Period) -> String {
    let providers: Vec<String> = match role {
        None | Some(Role::Admin) => {
            let mut all: Vec<String> = state.ledger.owners.values().cloned().collect();
            all.push(OPERATOR.into());
            all.sort();
            all.dedup();
            all
        }
        Some(Role::User(u)) if state.ledger.owners.values().any(|o| o == u) => vec![u.clone()],
        _ => vec![],
    };
    let mut b = String::new();
    for provider in providers {
        let report = crate::state::ledger::report(
            &state.ledger,
            &ReportFor::Provider(provider.clone()),
            period,
            state.clock,
        );
        if report.lines.is_empty() {
            continue;
        }
        let _ = write!(
            b,
            "<h2>Statement of {}</h2><table class=\"statement\"><tr><th>computer</th><th>subscriber</th><th>resource</th>\
             <th>quantity</th><th>unit price</th><th>amount</th></tr>",
            esc(&provider)
        );
        for l in &report.lines {
            let (price, amount) = (line_price(l), line_amount(l));
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.3} {}</td><td>{price}</td><td>{amount}</td></tr>",
                esc(&l.computer),
                esc(&l.subscriber),
                esc(&l.resource),
                l.quantity,
                esc(&l.unit)
            );
        }
        b.push_str("</table>");
        for (c, t) in &report.totals {
            let _ = write!(b, "<p><b>Earned: {} {}</b></p>", format_money(*t), esc(c));
        }
    }
    b
}
