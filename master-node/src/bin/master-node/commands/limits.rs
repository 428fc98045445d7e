//! `master-node limits show|set`: what one call may carry, for the whole
//! cluster (replicated, so every replica checks the same limits).

use master_node::api::{Answer, Query};
use master_node::state::limits::Limits;
use master_node::state::{Command, Reply};

use crate::cli::{Admin, LimitArgs};
use crate::commands::Fail;

async fn current(admin: &Admin) -> Result<Limits, Fail> {
    let mut client = admin.client()?;
    client.token = admin.token.clone();
    match client.read(&Query::Limits).await? {
        Answer::Limits(limits) => Ok(limits),
        _ => Err(Fail("the Master answered something else than its limits".into())),
    }
}

fn print(limits: &Limits) {
    let rows = [
        (
            "field_bytes",
            limits.field_bytes,
            "one text field (URL, title, reference, name)",
        ),
        (
            "parameters_bytes",
            limits.parameters_bytes,
            "one set of parameters, names and values",
        ),
        (
            "partitions_per_computer",
            limits.partitions_per_computer,
            "partitions of one computer",
        ),
        ("body_bytes", limits.body_bytes, "one call's body on the SLAP port"),
        (
            "document_bytes",
            limits.document_bytes,
            "a computer's document or usage journal",
        ),
        ("entry_bytes", limits.entry_bytes, "one log entry (a batch of writes)"),
    ];
    for (name, value, what) in rows {
        println!("{name:<24} {value:>12}  {what}");
    }
}

/// `limits show`.
pub async fn show(admin: &Admin) -> Result<(), Fail> {
    print(&current(admin).await?);
    Ok(())
}

/// `limits set`: the values given replace the current ones.
pub async fn set(admin: &Admin, args: &LimitArgs) -> Result<(), Fail> {
    let mut limits = current(admin).await?;
    let changes = [
        (&mut limits.field_bytes, args.field_bytes),
        (&mut limits.parameters_bytes, args.parameters_bytes),
        (&mut limits.partitions_per_computer, args.partitions_per_computer),
        (&mut limits.body_bytes, args.body_bytes),
        (&mut limits.document_bytes, args.document_bytes),
        (&mut limits.entry_bytes, args.entry_bytes),
    ];
    let mut changed = false;
    for (field, new) in changes {
        if let Some(v) = new {
            *field = v;
            changed = true;
        }
    }
    if !changed {
        return Err(Fail(
            "say which limit to set, e.g. --field-bytes 8192 (see --help)".into(),
        ));
    }
    limits.sane().map_err(Fail)?;
    let mut client = admin.client()?;
    client.token = admin.token.clone();
    let (reply, _) = client.write(Command::SetLimits(limits.clone())).await?;
    if let Reply::Refused(r) = reply {
        return Err(Fail(r.to_string()));
    }
    print(&limits);
    Ok(())
}
