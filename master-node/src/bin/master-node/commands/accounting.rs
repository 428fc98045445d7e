//! `master-node usage|price`: what a subscriber used (or a computer
//! provided) in a month, and the prices usage is billed at.

use crate::cli::{Admin, UsageArgs};
use crate::commands::Fail;

/// `price set`: the unit price of a resource (for one release, or all).
pub async fn set_price(
    admin: &Admin,
    resource: &str,
    amount: &str,
    currency: &str,
    release: Option<String>,
) -> Result<(), Fail> {
    let unit_price = master_node::state::ledger::parse_money(amount).map_err(Fail)?;
    let price = master_node::state::ledger::Price {
        unit_price,
        currency: currency.trim().to_string(),
    };
    write_price(admin, resource, release.clone(), Some(price)).await?;
    println!(
        "price of {resource}{}: {amount} {currency} per {}",
        release.map(|r| format!(" for {r}")).unwrap_or_default(),
        master_node::state::ledger::unit_of(resource)
    );
    Ok(())
}

/// `price remove`.
pub async fn remove_price(admin: &Admin, resource: &str, release: Option<String>) -> Result<(), Fail> {
    write_price(admin, resource, release, None).await?;
    println!("price of {resource} removed");
    Ok(())
}

async fn write_price(
    admin: &Admin,
    resource: &str,
    release: Option<String>,
    price: Option<master_node::state::ledger::Price>,
) -> Result<(), Fail> {
    let mut client = admin.client()?;
    client.token = admin.token.clone();
    let (reply, _) = client
        .write(master_node::state::Command::SetPrice {
            resource: resource.to_string(),
            release,
            price,
        })
        .await?;
    match reply {
        master_node::state::Reply::Refused(r) => Err(Fail(r.to_string())),
        _ => Ok(()),
    }
}

pub async fn usage(a: UsageArgs) -> Result<(), Fail> {
    use master_node::state::ledger::{format_money, Period, ReportFor};
    let period = Period::parse(&a.period).map_err(Fail)?;
    let who = match (&a.subscriber, &a.computer, &a.provider) {
        (Some(s), _, _) => ReportFor::Subscriber(s.clone()),
        (None, Some(c), _) => ReportFor::Computer(c.clone()),
        (None, None, Some(p)) => ReportFor::Provider(p.clone()),
        (None, None, None) => return Err(Fail("give --subscriber NAME, --computer ID or --provider NAME".into())),
    };
    let mut client = a.admin.client()?;
    client.token = a.admin.token.clone();
    let answer = client
        .read(&master_node::api::Query::Usage {
            who: who.clone(),
            period_start_us: period.start_us,
            period_end_us: period.end_us,
        })
        .await?;
    let master_node::api::Answer::Usage(report) = answer else {
        return Err(Fail("the Master answered something else than a usage report".into()));
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    match &who {
        ReportFor::Subscriber(s) => println!("usage of {s} in {}", a.period),
        ReportFor::Computer(c) => println!("provided by {c} in {}", a.period),
        ReportFor::Provider(p) => println!("statement of provider {p} in {}", a.period),
    }
    if report.lines.is_empty() {
        println!("(nothing)");
    }
    let mut current = None;
    for l in &report.lines {
        let group = match &who {
            ReportFor::Subscriber(_) => l.subscription.clone(),
            ReportFor::Computer(_) => l.subscriber.clone(),
            ReportFor::Provider(_) => format!("{} for {}", l.computer, l.subscriber),
        };
        if current.as_ref() != Some(&group) {
            match &who {
                ReportFor::Subscriber(_) => println!("\nsubscription {}", if group.is_empty() { "-" } else { &group }),
                ReportFor::Computer(_) => {
                    println!("\nfor {}", if group.is_empty() { "(no subscriber)" } else { &group })
                }
                ReportFor::Provider(_) => println!("\ncomputer {group}"),
            }
            println!(
                "  {:<10} {:>16} {:<7} {:>14} {:>16}  release",
                "resource", "quantity", "unit", "unit price", "amount"
            );
            current = Some(group);
        }
        let price = match (&l.unit_price, &l.currency) {
            (Some(p), Some(c)) if l.price_unit != l.unit => format!("{} {c}/{}", format_money(*p), l.price_unit),
            (Some(p), Some(c)) => format!("{} {c}", format_money(*p)),
            _ => "unpriced".into(),
        };
        let amount = match &l.currency {
            Some(c) => format!("{} {c}", format_money(l.amount)),
            None => "-".into(),
        };
        println!(
            "  {:<10} {:>16.3} {:<7} {:>14} {:>16}  {}",
            l.resource, l.quantity, l.unit, price, amount, l.release
        );
    }
    println!();
    for (currency, total) in &report.totals {
        println!("total: {} {currency}", format_money(*total));
    }
    Ok(())
}
