//! `master-node`: one replica of the replicated SlapOS Master.
//!
//! ```text
//! master-node init   --data-dir D --listen ADDR [--advertise ADDR]     create a cluster
//! master-node join   --peer ADDR --token T --data-dir D --listen ADDR   join one
//! master-node run    --data-dir D                                       restart a replica
//! master-node leave  --data-dir D | --id N --peer ADDR --token T        remove a replica
//! master-node status --peer ADDR [--json]                               members, leader, lag
//! ```
//!
//! The cluster port (Raft and the cluster API) is always mutual TLS; the
//! CA is made by `init`, and a join token carries the CA's hash so that the
//! joiner and every token-authenticated command recognize the cluster.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use master_node::client::{Client, Credentials};
use master_node::identity::{Identity, JoinToken};
use master_node::raft::Timing;
use master_node::replica::{Running, Stopped};
use slap_proto::cluster::{JoinRequest, LeaveRequest, PromoteRequest};

#[derive(Parser)]
#[command(
    name = "master-node",
    version,
    about = "A replica of the replicated SlapOS Master",
    long_about = "A replica of the replicated SlapOS Master. Replicas keep one state through Raft \
                  (openraft) over RocksDB. One replica alone is a complete Master; more replicas \
                  (3 or 5, in different regions) keep it available when some fail."
)]
struct Cli {
    /// Log as JSON lines instead of readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
    /// Certificates: list and revoke.
    #[command(subcommand)]
    Cert(CertCmd),
    /// Gateways: `gateway add NAME --host H` issues a slap-gateway's certificate.
    #[command(subcommand)]
    Gateway(GatewayCmd),
    /// Usage and invoices: what a subscriber used in a month, or what a computer provided.
    Usage(UsageArgs),
    /// Prices: `price set RESOURCE AMOUNT --currency C [--release URL]`, `price remove`.
    #[command(subcommand)]
    Price(PriceCmd),
}

#[derive(Args)]
struct UsageArgs {
    /// The subscriber (a user name)...
    #[arg(long, required_unless_present = "computer", conflicts_with = "computer")]
    subscriber: Option<String>,
    /// ...or the providing computer.
    #[arg(long)]
    computer: Option<String>,
    /// The month, YYYY-MM.
    #[arg(long)]
    period: String,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    admin: Admin,
}

#[derive(Subcommand)]
enum PriceCmd {
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
enum GatewayCmd {
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
struct Admin {
    /// Any replica of the cluster, host:port (its cluster API).
    #[arg(long)]
    peer: String,
    /// The cluster's join token (it also pins the cluster's CA).
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    token: String,
}

impl Admin {
    fn client(&self) -> Result<Client, Fail> {
        let credentials = Credentials::token(&JoinToken::parse(&self.token)?)?;
        Ok(Client::new(std::slice::from_ref(&self.peer), &credentials)?)
    }
}

#[derive(Subcommand)]
enum UserCmd {
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
enum ComputerCmd {
    /// Create a one-time token with which `nodeagent register` obtains computer ID's certificate.
    Add {
        id: String,
        #[command(flatten)]
        admin: Admin,
    },
}

#[derive(Subcommand)]
enum CertCmd {
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
}

/// Where a new replica keeps its data and serves.
#[derive(Args)]
struct NewReplica {
    /// Where this replica keeps its data (created; must be empty).
    #[arg(long)]
    data_dir: PathBuf,
    /// host:port to serve Raft and the cluster API on.
    #[arg(long)]
    listen: String,
    /// host:port the other replicas use to reach this one (default: --listen).
    #[arg(long)]
    advertise: Option<String>,
    /// host:port to serve SLAP on (the `slapos` client, slapgrid, nodeagent):
    /// HTTPS with client certificates, unless --insecure-http.
    #[arg(long)]
    slap_listen: Option<String>,
    /// host:port clients and gateways use to reach --slap-listen (default:
    /// --slap-listen); every replica learns it through the log.
    #[arg(long)]
    slap_advertise: Option<String>,
    /// Serve SLAP over plain HTTP, where no caller is authenticated and every
    /// call is allowed. For local development only; logged at every start.
    #[arg(long)]
    insecure_http: bool,
    /// host:port to serve /metrics (Prometheus), /healthz and /readyz on,
    /// over plain HTTP (read-only; for monitoring).
    #[arg(long)]
    http_listen: Option<String>,
    #[command(flatten)]
    timing: Timing,
}

impl NewReplica {
    fn advertise(&self) -> String {
        self.advertise.clone().unwrap_or_else(|| self.listen.clone())
    }
}

#[derive(Args)]
struct InitArgs {
    #[command(flatten)]
    replica: NewReplica,
}

#[derive(Args)]
struct JoinArgs {
    /// Any replica of the cluster (leader or follower), host:port.
    #[arg(long)]
    peer: String,
    /// The join token printed by `master-node init`.
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    token: String,
    #[command(flatten)]
    replica: NewReplica,
}

#[derive(Args)]
struct RunArgs {
    /// The replica's data dir, as created by init or join.
    #[arg(long)]
    data_dir: PathBuf,
    /// host:port to serve SLAP on: HTTPS with client certificates, unless --insecure-http.
    #[arg(long)]
    slap_listen: Option<String>,
    /// host:port clients and gateways use to reach --slap-listen (default: --slap-listen).
    #[arg(long)]
    slap_advertise: Option<String>,
    /// Serve SLAP over plain HTTP with no authentication (development only).
    #[arg(long)]
    insecure_http: bool,
    /// host:port to serve /metrics, /healthz and /readyz on (plain HTTP).
    #[arg(long)]
    http_listen: Option<String>,
    #[command(flatten)]
    timing: Timing,
}

#[derive(Args)]
struct LeaveArgs {
    /// Remove the replica of this data dir (asks it through its own address).
    #[arg(long, conflicts_with = "id")]
    data_dir: Option<PathBuf>,
    /// Remove replica N (with --peer and --token).
    #[arg(long, requires_all = ["peer", "token"])]
    id: Option<u64>,
    /// Any replica of the cluster, host:port.
    #[arg(long)]
    peer: Option<String>,
    /// The cluster's join token.
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    token: Option<String>,
}

#[derive(Args)]
struct StatusArgs {
    /// Any replica of the cluster, host:port.
    #[arg(long)]
    peer: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    trust: TrustArgs,
}

/// How a command recognizes the cluster's replicas (their certificates
/// chain to the cluster's CA): give one of these.
#[derive(Args, Clone)]
struct TrustArgs {
    /// The join token (it carries the CA's hash).
    #[arg(long, env = "MASTER_JOIN_TOKEN")]
    token: Option<String>,
    /// The cluster's CA certificate (ca.crt, as `user add` writes it).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// A replica's data dir on this machine (its tls/ca.crt).
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

impl TrustArgs {
    fn credentials(&self) -> Result<Credentials, Fail> {
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

// glibc's malloc spent a quarter of a busy replica's CPU in contention and
// consolidation (measured with perf under the write benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A failure with the sentence to print.
struct Fail(String);

impl<E: std::fmt::Display> From<E> for Fail {
    fn from(e: E) -> Self {
        Fail(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("master-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Fail(msg)) => {
            eprintln!("master-node: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cmd: Cmd) -> Result<(), Fail> {
    match cmd {
        Cmd::Init(a) => init(a).await,
        Cmd::Join(a) => join(a).await,
        Cmd::Run(a) => restart(a).await,
        Cmd::Leave(a) => leave(a).await,
        Cmd::Status(a) => status(a).await,
        Cmd::User(UserCmd::Add {
            name,
            admin,
            out,
            admin_role,
            days,
        }) => {
            let action = if admin_role { "admin" } else { "user" };
            let reply = certificates(&admin, action, &name, "", days, vec![]).await?;
            std::fs::create_dir_all(&out).map_err(|e| Fail(format!("{}: {e}", out.display())))?;
            let write = |file: String, content: &str, private: bool| -> Result<(), Fail> {
                let path = out.join(&file);
                let res = if private {
                    master_node::pki::write_private(&path, content)
                } else {
                    std::fs::write(&path, content)
                };
                res.map_err(|e| Fail(format!("writing {}: {e}", path.display())))
            };
            write(format!("{name}.crt"), &reply.certificate_pem, false)?;
            write(format!("{name}.key"), &reply.key_pem, true)?;
            write("ca.crt".into(), &reply.ca_pem, false)?;
            println!(
                "{} certificate for {name} written to {}/{name}.crt and {name}.key (mode 0600); the CA is in ca.crt",
                if admin_role { "administrator" } else { "user" },
                out.display()
            );
            Ok(())
        }
        Cmd::Gateway(GatewayCmd::Add {
            name,
            admin,
            hosts,
            out,
        }) => {
            let reply = certificates(&admin, "gateway", &name, "", 0, hosts).await?;
            std::fs::create_dir_all(&out).map_err(|e| Fail(format!("{}: {e}", out.display())))?;
            let fail = |e: std::io::Error| Fail(format!("writing into {}: {e}", out.display()));
            master_node::pki::write_private(&out.join("gateway.key"), &reply.key_pem).map_err(fail)?;
            std::fs::write(out.join("gateway.crt"), &reply.certificate_pem).map_err(fail)?;
            std::fs::write(out.join("ca.crt"), &reply.ca_pem).map_err(fail)?;
            println!(
                "gateway {name}: {}/gateway.crt, gateway.key (mode 0600), ca.crt; run slap-gateway --tls-dir {}",
                out.display(),
                out.display()
            );
            Ok(())
        }
        Cmd::Computer(ComputerCmd::Add { id, admin }) => {
            let reply = certificates(&admin, "computer-token", &id, "", 0, vec![]).await?;
            println!("{}", reply.registration);
            eprintln!(
                "on the node: nodeagent register --master {} --computer-id {id} --token {}",
                admin.peer, reply.registration
            );
            Ok(())
        }
        Cmd::Cert(CertCmd::List { admin }) => {
            let reply = certificates(&admin, "list", "", "", 0, vec![]).await?;
            println!("{:<34} {:<12} {:<8} role", "serial", "expires", "state");
            for c in reply.certificates {
                let days = (c.not_after as i64 - master_node::pki::now_secs() as i64) / 86400;
                let state = if c.revoked {
                    "revoked"
                } else if days < 0 {
                    "expired"
                } else {
                    "valid"
                };
                println!(
                    "{:<34} {:<12} {:<8} {}",
                    c.serial,
                    format!("in {days} d"),
                    state,
                    c.role
                );
            }
            Ok(())
        }
        Cmd::Usage(a) => usage(a).await,
        Cmd::Price(PriceCmd::Set {
            resource,
            amount,
            currency,
            release,
            admin,
        }) => {
            let unit_price = master_node::state::ledger::parse_money(&amount).map_err(Fail)?;
            let price = master_node::state::ledger::Price {
                unit_price,
                currency: currency.trim().to_string(),
            };
            set_price(&admin, &resource, release.clone(), Some(price)).await?;
            println!(
                "price of {resource}{}: {amount} {currency} per {}",
                release.map(|r| format!(" for {r}")).unwrap_or_default(),
                master_node::state::ledger::unit_of(&resource)
            );
            Ok(())
        }
        Cmd::Price(PriceCmd::Remove {
            resource,
            release,
            admin,
        }) => {
            set_price(&admin, &resource, release, None).await?;
            println!("price of {resource} removed");
            Ok(())
        }
        Cmd::Cert(CertCmd::Revoke { serial, admin }) => {
            certificates(&admin, "revoke", "", &serial, 0, vec![]).await?;
            println!("certificate {serial} revoked");
            Ok(())
        }
    }
}

async fn certificates(
    admin: &Admin,
    action: &str,
    name: &str,
    serial: &str,
    days: u64,
    hosts: Vec<String>,
) -> Result<slap_proto::cluster::CertificatesReply, Fail> {
    let client = admin.client()?;
    let req = slap_proto::cluster::CertificatesRequest {
        token: admin.token.clone(),
        action: action.into(),
        name: name.into(),
        serial: serial.into(),
        registration: String::new(),
        days,
        hosts,
    };
    Ok(client
        .call(|mut c| {
            let req = req.clone();
            async move { c.certificates(req).await }
        })
        .await?
        .into_inner())
}

async fn set_price(
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

async fn usage(a: UsageArgs) -> Result<(), Fail> {
    use master_node::state::ledger::{format_money, Period, ReportFor};
    let period = Period::parse(&a.period).map_err(Fail)?;
    let who = match (&a.subscriber, &a.computer) {
        (Some(s), _) => ReportFor::Subscriber(s.clone()),
        (None, Some(c)) => ReportFor::Computer(c.clone()),
        (None, None) => return Err(Fail("give --subscriber NAME or --computer ID".into())),
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
    }
    if report.lines.is_empty() {
        println!("(nothing)");
    }
    let mut current = None;
    for l in &report.lines {
        let group = match &who {
            ReportFor::Subscriber(_) => l.subscription.clone(),
            ReportFor::Computer(_) => l.subscriber.clone(),
        };
        if current.as_ref() != Some(&group) {
            match &who {
                ReportFor::Subscriber(_) => println!("\nsubscription {}", if group.is_empty() { "-" } else { &group }),
                ReportFor::Computer(_) => {
                    println!("\nfor {}", if group.is_empty() { "(no subscriber)" } else { &group })
                }
            }
            println!(
                "  {:<10} {:>16} {:<7} {:>14} {:>16}  release",
                "resource", "quantity", "unit", "unit price", "amount"
            );
            current = Some(group);
        }
        let price = match (&l.unit_price, &l.currency) {
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

/// Refuses a data dir that already holds something.
fn check_empty(data_dir: &Path) -> Result<(), Fail> {
    if let Some(id) = Identity::load(data_dir)? {
        return Err(Fail(format!(
            "{} already holds replica {} of cluster {}; restart it with `master-node run --data-dir {}`",
            data_dir.display(),
            id.node_id,
            id.cluster_id,
            data_dir.display()
        )));
    }
    if data_dir.read_dir().is_ok_and(|mut d| d.next().is_some()) {
        return Err(Fail(format!(
            "{} is not empty; give an empty or new directory",
            data_dir.display()
        )));
    }
    Ok(())
}

async fn init(InitArgs { replica: a }: InitArgs) -> Result<(), Fail> {
    check_empty(&a.data_dir)?;
    let advertise = a.advertise();
    let founding = master_node::founding::Founding::new(&[&a.listen, &advertise])?;
    let token = founding.token.clone();
    let identity = Identity {
        format: 1,
        cluster_id: token.cluster_id.clone(),
        node_id: 1,
        listen: a.listen.clone(),
        advertise: advertise.clone(),
        left: false,
    };
    std::fs::create_dir_all(&a.data_dir).map_err(|e| Fail(format!("{}: {e}", a.data_dir.display())))?;
    founding.replica_tls.save(&a.data_dir)?;
    let running = Running::start(&a.data_dir, &identity, &a.timing, true).await?;
    if let Some(addr) = &a.slap_listen {
        running
            .serve_slap_advertised(addr, a.slap_advertise.as_deref(), a.insecure_http)
            .await?;
        running.announce(a.slap_advertise.as_deref().unwrap_or(addr));
    }
    if let Some(addr) = &a.http_listen {
        running.serve_monitoring(addr).await?;
    }
    running.found_cluster(&advertise, &founding).await.map_err(Fail)?;
    let admin_dir = a.data_dir.join("admin");
    founding
        .save_admin(&admin_dir)
        .map_err(|e| Fail(format!("writing {}: {e}", admin_dir.display())))?;
    identity.save(&a.data_dir)?;
    token.save(&a.data_dir)?;
    tracing::info!(cluster = %token.cluster_id, listen = %a.listen, "cluster created; replica 1 is its first member");
    println!("{token}");
    eprintln!(
        "master-node: cluster {} created. Join more replicas with:\n  master-node join --peer {advertise} --token {token} --data-dir DIR --listen ADDR\n(the token is also in {}; an administrator's certificate is in {})",
        token.cluster_id,
        a.data_dir.join("join-token").display(),
        admin_dir.display()
    );
    serve(running).await
}

async fn join(
    JoinArgs {
        peer,
        token: token_text,
        replica: a,
    }: JoinArgs,
) -> Result<(), Fail> {
    let token = JoinToken::parse(&token_text)?;
    if let Some(id) = Identity::load(&a.data_dir)? {
        return Err(Fail(if id.cluster_id == token.cluster_id {
            format!(
                "{} already holds replica {} of this cluster; restart it with `master-node run`",
                a.data_dir.display(),
                id.node_id
            )
        } else {
            format!(
                "{} belongs to cluster {}, not {}; give an empty data dir",
                a.data_dir.display(),
                id.cluster_id,
                token.cluster_id
            )
        }));
    }
    check_empty(&a.data_dir)?;
    let advertise = a.advertise();
    // The peer must show the CA the token pins; the joiner's key stays here.
    let client = Client::new(std::slice::from_ref(&peer), &Credentials::token(&token)?)?;
    let (csr_pem, key_pem) = master_node::pki::signing_request()?;
    let hosts = master_node::founding::server_names(&[&a.listen, &advertise]);
    let reply = client
        .call(|mut c| {
            let req = JoinRequest {
                token: token_text.clone(),
                addr: advertise.clone(),
                csr_pem: csr_pem.clone(),
                hosts: hosts.clone(),
            };
            async move { c.join(req).await }
        })
        .await?
        .into_inner();
    if reply.cluster_id != token.cluster_id {
        return Err(Fail(format!(
            "{} answered for cluster {}, but the token is for cluster {}",
            peer, reply.cluster_id, token.cluster_id
        )));
    }
    if slap_proto::tls::pem_sha256(&reply.ca_pem)? != token.ca_sha256 {
        return Err(Fail(format!(
            "{peer} sent a CA that is not the one the token pins; not joining"
        )));
    }
    std::fs::create_dir_all(&a.data_dir).map_err(|e| Fail(format!("{}: {e}", a.data_dir.display())))?;
    master_node::cluster_tls::ReplicaTls {
        ca_pem: reply.ca_pem.clone(),
        cert_pem: reply.certificate_pem.clone(),
        key_pem,
    }
    .save(&a.data_dir)?;
    let identity = Identity {
        format: 1,
        cluster_id: reply.cluster_id.clone(),
        node_id: reply.node_id,
        listen: a.listen.clone(),
        advertise: advertise.clone(),
        left: false,
    };
    let running = Running::start(&a.data_dir, &identity, &a.timing, true).await?;
    if let Some(addr) = &a.slap_listen {
        running
            .serve_slap_advertised(addr, a.slap_advertise.as_deref(), a.insecure_http)
            .await?;
        running.announce(a.slap_advertise.as_deref().unwrap_or(addr));
    }
    if let Some(addr) = &a.http_listen {
        running.serve_monitoring(addr).await?;
    }
    identity.save(&a.data_dir)?;
    token.save(&a.data_dir)?;
    tracing::info!(replica = reply.node_id, "reserved replica id; catching up as a learner");
    let members = client
        .call(|mut c| {
            let req = PromoteRequest {
                token: token_text.clone(),
                node_id: reply.node_id,
                addr: advertise.clone(),
            };
            async move { c.promote(req).await }
        })
        .await;
    match members {
        Ok(m) => {
            running.mark_joined();
            let ids: Vec<u64> = m.into_inner().members.iter().map(|m| m.id).collect();
            tracing::info!(replica = reply.node_id, members = ?ids, "joined as a voter");
            println!("joined cluster {} as replica {}", reply.cluster_id, reply.node_id);
        }
        Err(e) => {
            running.shutdown().await;
            return Err(Fail(format!(
                "replica {} could not be promoted: {e}. Remove the reserved id with `master-node leave --id {} ...` if it was added, then join again with an empty data dir",
                reply.node_id, reply.node_id
            )));
        }
    }
    serve(running).await
}

async fn restart(a: RunArgs) -> Result<(), Fail> {
    let identity = Identity::load(&a.data_dir)?.ok_or_else(|| {
        Fail(format!(
            "{} holds no replica; create one with `master-node init` or `master-node join`",
            a.data_dir.display()
        ))
    })?;
    if identity.left {
        return Err(Fail(format!(
            "replica {} left cluster {}; it cannot run again. Join with an empty data dir to add a new replica",
            identity.node_id, identity.cluster_id
        )));
    }
    let running = Running::start(&a.data_dir, &identity, &a.timing, false).await?;
    if let Some(addr) = &a.slap_listen {
        running
            .serve_slap_advertised(addr, a.slap_advertise.as_deref(), a.insecure_http)
            .await?;
        running.announce(a.slap_advertise.as_deref().unwrap_or(addr));
    }
    if let Some(addr) = &a.http_listen {
        running.serve_monitoring(addr).await?;
    }
    serve(running).await
}

/// Serves until SIGINT/SIGTERM or until the replica stops by itself.
async fn serve(running: Running) -> Result<(), Fail> {
    let mut stopped = running.stopped.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = term.recv() => Ok(()),
        r = stopped.wait_for(|s| s.is_some()) => match r.ok().and_then(|s| s.clone()) {
            Some(Stopped::Failed(reason)) => Err(Fail(reason)),
            // Removed from the cluster: a normal end.
            _ => Ok(()),
        }
    };
    tracing::info!("stopping");
    running.shutdown().await;
    outcome
}

async fn leave(a: LeaveArgs) -> Result<(), Fail> {
    let (id, peer, token) = match (&a.data_dir, a.id) {
        (Some(dir), _) => {
            let identity = Identity::load(dir)?.ok_or_else(|| Fail(format!("{} holds no replica", dir.display())))?;
            let token = match &a.token {
                Some(t) => t.clone(),
                None => JoinToken::load(dir)?.to_string(),
            };
            (identity.node_id, a.peer.clone().unwrap_or(identity.advertise), token)
        }
        (None, Some(id)) => (
            id,
            a.peer.clone().unwrap_or_default(),
            a.token.clone().unwrap_or_default(),
        ),
        (None, None) => {
            return Err(Fail(
                "say which replica leaves: --data-dir D, or --id N --peer ADDR --token T".into(),
            ))
        }
    };
    let credentials = Credentials::token(&JoinToken::parse(&token)?)?;
    let client = Client::new(&[peer], &credentials)?;
    let reply = client
        .call(|mut c| {
            let req = LeaveRequest {
                token: token.clone(),
                node_id: id,
            };
            async move { c.leave(req).await }
        })
        .await?
        .into_inner();
    let rest: Vec<String> = reply.members.iter().map(|m| format!("{} ({})", m.id, m.role)).collect();
    println!("replica {id} removed; members now: {}", rest.join(", "));
    Ok(())
}

async fn status(a: StatusArgs) -> Result<(), Fail> {
    let credentials = a.trust.credentials()?;
    let mut st = Client::status_of(&a.peer, &credentials).await?;
    // Lag is only known to the leader: ask it when the peer is not the leader.
    if !st.leader_view && !st.leader_addr.is_empty() && st.leader_addr != a.peer {
        if let Ok(leader) = Client::status_of(&st.leader_addr, &credentials).await {
            st.members = leader.members;
            st.leader_view = leader.leader_view;
        }
    }
    if a.json {
        let members: Vec<serde_json::Value> = st
            .members
            .iter()
            .map(
                |m| serde_json::json!({"id": m.id, "addr": m.addr, "role": m.role, "matched": m.matched, "lag": m.lag}),
            )
            .collect();
        let doc = serde_json::json!({
            "cluster_id": st.cluster_id, "replica": st.node_id, "state": st.state, "term": st.term,
            "leader_id": st.leader_id, "leader_addr": st.leader_addr, "last_log_index": st.last_log_index,
            "committed": st.committed, "applied": st.applied, "members": members,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "cluster {}  (asked replica {} at {})",
        st.cluster_id, st.node_id, a.peer
    );
    println!(
        "replica {}: {}, term {}, last log {}, committed {}, applied {}",
        st.node_id, st.state, st.term, st.last_log_index, st.committed, st.applied
    );
    match st.leader_id {
        Some(l) => println!("leader: replica {l} at {}", st.leader_addr),
        None => println!("leader: none known (election in progress, or no quorum)"),
    }
    println!(
        "{:>4}  {:<24} {:<8} {:>10} {:>8}",
        "id", "address", "role", "matched", "lag"
    );
    for m in &st.members {
        let fmt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:>4}  {:<24} {:<8} {:>10} {:>8}",
            m.id,
            m.addr,
            m.role,
            fmt(m.matched),
            fmt(m.lag)
        );
    }
    Ok(())
}
