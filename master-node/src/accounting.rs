//! Usage in, reports out: between the wire (a node's TioXML journal, the
//! APIs' report requests) and the ledger (`state::ledger`), which knows
//! neither.
//!
//! Below the replica handle: imports only the state.

use sha2::{Digest, Sha256};

use crate::state::ledger::{Quantity, UsageLine};
use crate::state::Command;

/// The command that books `journal` (TioXML, reference section 7) for
/// `computer`; `Err` says why the journal is refused (nothing is booked).
pub fn book_command(computer: &str, journal: &str) -> Result<Command, String> {
    let transactions =
        slap_proto::tioxml::parse_journal(journal).map_err(|e| format!("not a valid TioXML journal: {e}"))?;
    let mut lines = Vec::new();
    for t in &transactions {
        if !t.reference.is_empty() && t.reference != computer {
            return Err(format!("the journal is for computer {}, not {computer}", t.reference));
        }
        let stop_us = slap_proto::tioxml::parse_stop_date(&t.stop_date);
        for m in &t.movements {
            let partition = m
                .reference
                .clone()
                .ok_or_else(|| format!("movement {:?} names no partition (<reference>)", m.resource))?;
            let quantity = Quantity::from_decimal(m.quantity).ok_or_else(|| {
                format!(
                    "movement {:?} has a quantity that is negative, not a number or too large ({})",
                    m.resource, m.quantity
                )
            })?;
            lines.push(UsageLine {
                partition,
                resource: m.resource.clone(),
                category: m.categories.first().cloned(),
                quantity,
                stop_us,
            });
        }
    }
    Ok(Command::BookUsage {
        computer: computer.to_string(),
        journal_sha256: hex::encode(Sha256::digest(journal.as_bytes())),
        lines,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOURNAL: &str = r#"<?xml version="1.0"?><journal><transaction type="Sale Packing List"><title>Resource consumptions</title><start_date></start_date><stop_date>2026-11-25 at 15:02:03</stop_date><reference>COMP-1</reference><currency></currency><payment_mode></payment_mode><category></category><arrow type="Administration"><source></source><destination></destination></arrow><movement><resource>CPU Consumption</resource><title>CPU</title><reference>slappart0</reference><quantity>42.5</quantity><price>0.0</price><VAT>None</VAT><category>cpu</category></movement></transaction></journal>"#;

    #[test]
    fn a_journal_becomes_one_line_per_movement() {
        let Command::BookUsage { computer, lines, .. } = book_command("COMP-1", JOURNAL).unwrap() else {
            panic!("not a booking")
        };
        assert_eq!(computer, "COMP-1");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].partition, "slappart0");
        assert_eq!(lines[0].category.as_deref(), Some("cpu"));
        assert_eq!(lines[0].stop_us, Some(1_795_618_923 * 1_000_000));
    }

    #[test]
    fn journals_that_cannot_be_booked_are_refused_with_the_reason() {
        for (journal, computer, why) in [
            ("<journal", "COMP-1", "valid TioXML"),
            (
                &JOURNAL.replace("<quantity>42.5</quantity>", "<quantity>much</quantity>"),
                "COMP-1",
                "number",
            ),
            (JOURNAL, "COMP-2", "is for computer COMP-1"),
            (
                &JOURNAL.replace("<reference>slappart0</reference>", ""),
                "COMP-1",
                "names no partition",
            ),
            (
                &JOURNAL.replace("<quantity>42.5</quantity>", "<quantity>-1</quantity>"),
                "COMP-1",
                "negative",
            ),
        ] {
            let err = book_command(computer, journal).unwrap_err();
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}
