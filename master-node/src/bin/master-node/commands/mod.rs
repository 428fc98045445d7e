//! What each command does, one file per group: the replica's life
//! ([`cluster`]: init, join, run, leave, status), identities
//! ([`identities`]: users, gateways, computers, certificates), accounting
//! ([`accounting`]: usage, prices), the cluster's [`limits`],
//! [`backup`]s, and starting again from a backup or a survivor
//! ([`recovery`]: restore, recover).

mod accounting;
mod backup;
mod cluster;
mod identities;
mod limits;
mod recovery;

use crate::cli::{BackupCmd, CaCmd, CertCmd, Cmd, ComputerCmd, GatewayCmd, LimitsCmd, PriceCmd, UserCmd};
pub use crate::fail::Fail;

/// Runs one command.
pub async fn run(cmd: Cmd) -> Result<(), Fail> {
    match cmd {
        Cmd::Init(a) => cluster::init(a).await,
        Cmd::Join(a) => cluster::join(a).await,
        Cmd::Run(a) => cluster::restart(a).await,
        Cmd::Leave(a) => cluster::leave(a).await,
        Cmd::Status(a) => cluster::status(a).await,
        Cmd::User(UserCmd::Add {
            name,
            admin,
            out,
            admin_role,
            days,
        }) => identities::add_user(&admin, &name, &out, admin_role, days).await,
        Cmd::Gateway(GatewayCmd::Add {
            name,
            admin,
            hosts,
            out,
        }) => identities::add_gateway(&admin, &name, hosts, &out).await,
        Cmd::Computer(ComputerCmd::Add { id, admin }) => identities::add_computer(&admin, &id).await,
        Cmd::Cert(CertCmd::List { admin }) => identities::list_certificates(&admin).await,
        Cmd::Ca(CaCmd::Rotate { admin }) => identities::rotate_ca(&admin).await,
        Cmd::Ca(CaCmd::Finish { force, admin }) => identities::finish_ca_rotation(&admin, force).await,
        Cmd::Cert(CertCmd::Revoke { serial, admin }) => identities::revoke(&admin, &serial).await,
        Cmd::Cert(CertCmd::Renew {
            serial,
            out,
            days,
            seconds,
            admin,
        }) => identities::renew(&admin, &serial, &out, days, seconds).await,
        Cmd::Usage(a) => accounting::usage(a).await,
        Cmd::Price(PriceCmd::Set {
            resource,
            amount,
            currency,
            release,
            admin,
        }) => accounting::set_price(&admin, &resource, &amount, &currency, release).await,
        Cmd::Price(PriceCmd::Remove {
            resource,
            release,
            admin,
        }) => accounting::remove_price(&admin, &resource, release).await,
        Cmd::Limits(LimitsCmd::Show { admin }) => limits::show(&admin).await,
        Cmd::Limits(LimitsCmd::Set { admin, limits }) => limits::set(&admin, &limits).await,
        Cmd::Backup(a) => match a.command {
            Some(BackupCmd::Verify { file }) => backup::verify(&file),
            None => backup::save(a).await,
        },
        Cmd::Restore(a) => recovery::restore(a).await,
        Cmd::Recover(a) => recovery::recover(a).await,
    }
}
