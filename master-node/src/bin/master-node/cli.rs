//! The command line of `master-node`: every command, its flags and their
//! help. `init`, `join` and `run` share one set of serving flags
//! ([`Serving`]); administrative commands reach the cluster through
//! [`Admin`] (a replica and the join token) or recognize it through
//! [`TrustArgs`].

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use master_node::client::{Client, Credentials};
use master_node::identity::JoinToken;
use master_node::raft::Timing;

use crate::fail::Fail;

#[derive(Parser)]
#[command(
    name = "master-node",
    version,
    about = "A replica of the replicated SlapOS Master",
    long_about = "A replica of the replicated SlapOS Master. Replicas keep one state through Raft \
                  (openraft) over RocksDB. One replica alone is a complete Master; more replicas \
                  (3 or 5, in different regions) keep it available when some fail."
)]
pub struct Cli {
    /// Log as JSON lines instead of readable text.
    #[arg(long, global = true)]
    pub log_json: bool,
    /// Act as an older release that speaks command versions up to N only
    /// (upgrade tests): advertise N, and stop on a newer command.
    #[arg(long, global = true, hide = true)]
    pub act_as_version: Option<u32>,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Create a new cluster with this replica as its first member, print the
    /// join token, and serve.
    Init(InitArgs),
    /// Join an existing cluster through any of its replicas, and serve.
    Join(JoinArgs),
    /// Restart an existing replica from its data dir.
    Run(RunArgs),
    /// Remove a replica from its cluster.
    Leave(LeaveArgs),
    /// Show members, roles, leader, term, commit and applied indexes and lag.
    Status(StatusArgs),
    /// Users: `user add NAME` issues a user certificate (or an administrator's with --admin).
    #[command(subcommand)]
    User(UserCmd),
    /// Computers: `computer add ID` creates a one-time registration token for `nodeagent register`.
    #[command(subcommand)]
    Computer(ComputerCmd),
    /// Certificates: list, revoke and renew.
    #[command(subcommand)]
    Cert(CertCmd),
    /// The cluster's certificate authority: rotate it, then finish the rotation.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Gateways: `gateway add NAME --host H` issues a slap-gateway's certificate.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Usage and invoices: what a subscriber used in a month, or what a computer provided.
    Usage(UsageArgs),
    /// Prices: `price set RESOURCE AMOUNT --currency C [--release URL]`, `price remove`.
    #[command(subcommand)]
    Price(PriceCmd),
    /// Limits: what one call may carry (`limits show`, `limits set --field-bytes N ...`).
    #[command(subcommand)]
    Limits(LimitsCmd),
    /// Backups: `backup --peer ADDR --token T --out FILE` saves the whole
    /// state online, at a log index that holds every write acknowledged
    /// before; `backup verify FILE` checks a backup file.
    Backup(BackupArgs),
    /// Create a new one-replica cluster from a backup file (new cluster id
    /// and join token, the backup's CA unless --new-ca), print its join
    /// token, and serve. Join more replicas to it as after `init`.
    Restore(RestoreArgs),
    /// Disaster recovery, when the majority of the voters is lost for good:
    /// make this stopped replica the only voter of its cluster, with the
    /// state it holds, and serve. Writes only the lost replicas had are
    /// gone. Needs --confirm-majority-lost; without it, says what it would do.
    Recover(RecoverArgs),
}

/// `restore --from FILE --data-dir D --listen ADDR`.
#[derive(Args)]
pub struct RestoreArgs {
    /// The backup file (`master-node backup --out`). It is checked whole
    /// (checksum, every record) before anything is written; a damaged file
    /// is refused and the data dir left as it was.
    #[arg(long)]
    pub from: PathBuf,
    /// Give the new cluster a new certificate authority instead of the
    /// backup's. Every certificate the backup recorded (nodes, users,
    /// gateways) then stops working and must be issued again: for a CA
    /// whose key may have leaked.
    #[arg(long)]
    pub new_ca: bool,
    #[command(flatten)]
    pub replica: NewReplica,
}

/// `recover --data-dir D --confirm-majority-lost`.
#[derive(Args)]
pub struct RecoverArgs {
    /// Confirms that the other voters are lost for good and must not come
    /// back: if they do, two clusters would each take writes. Writes that
    /// only they had are lost; writes this replica held but the cluster
    /// never acknowledged are kept.
    #[arg(long)]
    pub confirm_majority_lost: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// `backup`: save the state (the flags), or `verify` a file.
#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: Option<BackupCmd>,
    /// Any replica of the cluster, host:port (its cluster API); followers
    /// relay the leader's backup.
    #[arg(long, required = true)]
    pub peer: Option<String>,
    /// The cluster's join token (it also pins the cluster's CA).
    #[arg(long, env = "MASTER_JOIN_TOKEN", required = true)]
    pub token: Option<String>,
    /// The backup file to write: written beside it first, checked, synced,
    /// then renamed into place, so a failed backup never leaves half a file.
    /// With --every, the directory the backups go to.
    #[arg(long, required = true)]
    pub out: Option<PathBuf>,
    /// Keep taking backups, one every this long (`90s`, `15m`, `1h`), into
    /// the --out directory as `master-CLUSTER-TIME-INDEX.backup`, until
    /// stopped; a failed one is logged and tried again at the next turn.
    #[arg(long, value_parser = parse_every)]
    pub every: Option<std::time::Duration>,
    /// With --every: how many backups to keep (the oldest go first).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..))]
    pub keep: u32,
}

/// `90s`, `15m`, `1h` (a number alone is minutes).
fn parse_every(v: &str) -> Result<std::time::Duration, String> {
    let (number, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, "m"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{v:?} is not a period like 90s, 15m or 1h"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{v:?}: the unit must be s, m or h")),
    };
    if secs == 0 {
        return Err("the period must be longer than zero".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

#[derive(Subcommand)]
pub enum BackupCmd {
    /// Checks a backup file: its header, length and checksum, every record,
    /// and that they rebuild a state; prints what it holds. Exits non-zero
    /// with the reason when anything is wrong.
    Verify {
        /// The backup file.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
pub enum LimitsCmd {
    /// The cluster's limits, with their names.
    Show {
        #[command(flatten)]
        admin: Admin,
    },
    /// Changes some of the cluster's limits (the others stay); every replica
    /// applies them from the next call on.
    Set {
        #[command(flatten)]
        admin: Admin,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

/// New values for some limits (bytes unless said otherwise).
#[derive(Args)]
pub struct LimitArgs {
    /// One text field: a URL, a title, a reference, a parameter's name.
    #[arg(long)]
    pub field_bytes: Option<u32>,
    /// One set of parameters (instance, SLA, connection, capacity), names and values.
    #[arg(long)]
    pub parameters_bytes: Option<u32>,
    /// Partitions one computer may declare (a count).
    #[arg(long)]
    pub partitions_per_computer: Option<u32>,
    /// One call's body on the SLAP port, documents aside.
    #[arg(long)]
    pub body_bytes: Option<u32>,
    /// A computer's document or a usage journal.
    #[arg(long)]
    pub document_bytes: Option<u32>,
    /// One log entry (a batch of writes).
    #[arg(long)]
    pub entry_bytes: Option<u32>,
}

#[derive(Args)]
pub struct UsageArgs {
    /// The subscriber (a user name): their invoice...
    #[arg(long, required_unless_present_any = ["computer", "provider"], conflicts_with_all = ["computer", "provider"])]
    pub subscriber: Option<String>,
    /// ...or the providing computer...
    #[arg(long, conflicts_with = "provider")]
    pub computer: Option<String>,
    /// ...or a provider (a computer's owner, or `operator`): their
    /// statement, what their computers earned.
    #[arg(long)]
    pub provider: Option<String>,
    /// The month, YYYY-MM.
    #[arg(long)]
    pub period: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub admin: Admin,
}

#[derive(Subcommand)]
pub enum PriceCmd {
    /// Set the unit price of RESOURCE (hosting per hour; cpu per second;
    /// memory, disk, network per byte; or a release's own resource per unit).
    Set {
        resource: String,
        /// Per unit, e.g. 0.02 (up to six decimals).
        #[arg(allow_negative_numbers = true)]
        amount: String,
        /// Currency code, e.g. EUR.
        #[arg(long)]
        currency: String,
        /// Only for this software release (default: every release).
        #[arg(long)]
        release: Option<String>,
        #[command(flatten)]
        admin: Admin,
    },
    /// Remove a price.
    Remove {
        resource: String,
        #[arg(long)]
        release: Option<String>,
        #[command(flatten)]
        admin: Admin,
    },
}

#[derive(Subcommand)]
pub enum GatewayCmd {
    /// Issue slap-gateway NAME's certificate; writes gateway.crt, gateway.key (0600) and ca.crt into --out.
    Add {
        name: String,
        #[command(flatten)]
        admin: Admin,
        /// Host names or addresses the gateway serves on (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

/// How an administrative command reaches the cluster.
#[derive(Args, Clone)]
pub struct Admin {
    /// Any replica of the cluster, host:port (its cluster API).
    #[arg(long)]
    pub peer: String,
    /// The cluster's join token (it also pins the cluster's CA).
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    pub token: String,
}

impl Admin {
    pub fn client(&self) -> Result<Client, Fail> {
        let credentials = Credentials::token(&JoinToken::parse(&self.token)?)?;
        Ok(Client::new(std::slice::from_ref(&self.peer), &credentials)?)
    }
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Issue a certificate for user NAME; writes NAME.crt, NAME.key (mode 0600) and ca.crt into --out.
    Add {
        name: String,
        #[command(flatten)]
        admin: Admin,
        /// Where to write the files.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// An administrator's certificate (everything is allowed) instead of a user's.
        #[arg(long)]
        admin_role: bool,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

#[derive(Subcommand)]
pub enum ComputerCmd {
    /// Create a one-time token with which `nodeagent register` obtains computer ID's certificate.
    Add {
        id: String,
        #[command(flatten)]
        admin: Admin,
    },
}

#[derive(Subcommand)]
pub enum CaCmd {
    /// Start a CA rotation: a new CA signs every certificate from now on,
    /// and the current one stays trusted until `ca finish`. Certificates
    /// issued meanwhile carry the new CA cross-signed by the old one, so
    /// holders that trust only the old CA accept them. Replicas and
    /// gateways move to the new CA by themselves within seconds; renew
    /// nodes' and users' certificates (`cert renew SERIAL --out DIR`, into
    /// the holder's directory: it writes the two CAs to ca.crt too). Prints
    /// the join token for the new CA. Needs cluster version 3.
    Rotate {
        #[command(flatten)]
        admin: Admin,
    },
    /// Finish a CA rotation: the old CA is trusted no more. Refused while
    /// live certificates from the old CA remain (listed), unless --force.
    Finish {
        /// Finish even though certificates from the old CA remain: their
        /// holders are refused from then on.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        admin: Admin,
    },
}

#[derive(Subcommand)]
pub enum CertCmd {
    /// Every certificate the cluster issued: serial, role, expiry, revoked.
    List {
        #[command(flatten)]
        admin: Admin,
    },
    /// Revoke a certificate; every replica refuses it from the next handshake on.
    Revoke {
        serial: String,
        #[command(flatten)]
        admin: Admin,
    },
    /// Renew a certificate before it ends: a new key and certificate for the
    /// same holder (and hosts), written into --out under the holder's own
    /// file names (computer.crt and computer.key for a node, gateway.* for
    /// a gateway, replica.* for a replica, NAME.* for a user), with ca.crt.
    /// Point --out at the holder's directory and it takes them without a
    /// restart. The old certificate stays valid until it expires (`cert
    /// revoke` it if its key leaked). Replicas and gateways also renew their
    /// own at two thirds of their lifetime. Needs cluster version 2.
    Renew {
        serial: String,
        /// Where to write the new certificate and key.
        #[arg(long)]
        out: PathBuf,
        /// Validity in days (default: as long as the certificate renewed).
        #[arg(long, default_value_t = 0)]
        days: u64,
        /// Validity in seconds (short-lived certificates in tests).
        #[arg(long, default_value_t = 0, hide = true)]
        seconds: u64,
        #[command(flatten)]
        admin: Admin,
    },
}

/// How a replica serves clients, the same for `init`, `join` and `run`.
#[derive(Args)]
pub struct Serving {
    /// host:port to serve SLAP on (the `slapos` client, slapgrid, nodeagent):
    /// HTTPS with client certificates, unless --insecure-http.
    #[arg(long)]
    pub slap_listen: Option<String>,
    /// host:port clients and gateways use to reach --slap-listen (default:
    /// --slap-listen); every replica learns it through the log.
    #[arg(long)]
    pub slap_advertise: Option<String>,
    /// Serve SLAP over plain HTTP, where no caller is authenticated and every
    /// call is allowed. For local development only; logged at every start.
    #[arg(long)]
    pub insecure_http: bool,
    /// host:port to serve /metrics (Prometheus), /healthz and /readyz on,
    /// over plain HTTP (read-only; for monitoring).
    #[arg(long)]
    pub http_listen: Option<String>,
    /// Calls per second one caller (a certificate; without TLS, an address)
    /// may make on the SLAP port; more are answered 429 with Retry-After.
    /// 0: no limit.
    #[arg(long, default_value_t = master_node::server::DEFAULT_RATE)]
    pub rate_limit: u32,
    /// Calls one caller may make at once before --rate-limit holds it.
    #[arg(long, default_value_t = master_node::server::DEFAULT_BURST)]
    pub rate_burst: u32,
    #[command(flatten)]
    pub timing: Timing,
}

/// Where a new replica keeps its data and serves.
#[derive(Args)]
pub struct NewReplica {
    /// Where this replica keeps its data (created; must be empty).
    #[arg(long)]
    pub data_dir: PathBuf,
    /// host:port to serve Raft and the cluster API on.
    #[arg(long)]
    pub listen: String,
    /// host:port the other replicas use to reach this one (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
    #[command(flatten)]
    pub serving: Serving,
}

impl NewReplica {
    pub fn advertise(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.clone())
    }
}

#[derive(Args)]
pub struct InitArgs {
    #[command(flatten)]
    pub replica: NewReplica,
}

#[derive(Args)]
pub struct JoinArgs {
    /// Any replica of the cluster (leader or follower), host:port.
    #[arg(long)]
    pub peer: String,
    /// The join token printed by `master-node init`.
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    pub token: String,
    #[command(flatten)]
    pub replica: NewReplica,
}

#[derive(Args)]
pub struct RunArgs {
    /// The replica's data dir, as created by init or join.
    #[arg(long)]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub serving: Serving,
}

#[derive(Args)]
pub struct LeaveArgs {
    /// Remove the replica of this data dir (asks it through its own address).
    #[arg(long, conflicts_with = "id")]
    pub data_dir: Option<PathBuf>,
    /// Remove replica N (with --peer and --token).
    #[arg(long, requires_all = ["peer", "token"])]
    pub id: Option<u64>,
    /// Any replica of the cluster, host:port.
    #[arg(long)]
    pub peer: Option<String>,
    /// The cluster's join token.
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    pub token: Option<String>,
}

#[derive(Args)]
pub struct StatusArgs {
    /// Any replica of the cluster, host:port.
    #[arg(long)]
    pub peer: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub trust: TrustArgs,
}

/// How a command recognizes the cluster's replicas (their certificates
/// chain to the cluster's CA): give one of these.
#[derive(Args, Clone)]
pub struct TrustArgs {
    /// The join token (it carries the CA's hash).
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    pub token: Option<String>,
    /// The cluster's CA certificate (ca.crt, as `user add` writes it).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// A replica's data dir on this machine (its tls/ca.crt).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl TrustArgs {
    pub fn credentials(&self) -> Result<Credentials, Fail> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| Fail(format!("{}: {e}", p.display())));
        if let Some(t) = &self.token {
            return Ok(Credentials::token(&JoinToken::parse(t)?)?);
        }
        if let Some(ca) = &self.ca {
            return Ok(Credentials::ca(&read(ca)?)?);
        }
        if let Some(dir) = &self.data_dir {
            return Ok(Credentials::ca(&read(&dir.join("tls/ca.crt"))?)?);
        }
        Err(Fail(
            "say how to recognize the cluster: --token T (or MASTER_JOIN_TOKEN), --ca ca.crt, or --data-dir of a replica".into(),
        ))
    }
}
