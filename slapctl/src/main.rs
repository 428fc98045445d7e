//! `slapctl`: the user's command line for the Master's native API.
//!
//! ```text
//! slapctl request blog https://…/software.cfg --param title="My blog" --wait
//! slapctl list
//! slapctl show blog
//! slapctl destroy blog
//! slapctl usage --period 2026-11
//! slapctl request gpu-job https://…/software.cfg --sla max_price=0.05EUR --sla min_cpu=8
//! slapctl offer set COMP-1 --price 0.05 --currency EUR --partitions 8 --region eu
//! slapctl offer show
//! slapctl usage --period 2026-11 --provider alice     (what alice's computers earned)
//! slapctl supply https://…/software.cfg COMP-1        (administrators)
//! slapctl owner COMP-1 alice                           (administrators)
//! slapctl completions bash > /etc/bash_completion.d/slapctl
//! ```
//!
//! It talks to a replica's or a gateway's SLAP port (HTTP/2, mutual TLS)
//! with the user's certificate from `master-node user add`. Every write
//! carries a request id and is retried with it for up to `--patience`
//! seconds when the Master cannot answer (an election), so a retry never
//! applies twice. Output is for people; `--json` is for scripts.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

mod market;

use anyhow::{bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use slap_proto::master as pb;
use slap_proto::master::master_client::MasterClient;
use tonic::transport::Channel;
use tonic::Code;

#[derive(Parser)]
#[command(
    name = "slapctl",
    version,
    about = "Request, list, show and destroy your instances on a SlapOS Master",
    long_about = "Request, list, show and destroy your instances on a SlapOS Master, through a replica or a \
                  slap-gateway. Identify with your certificate from `master-node user add NAME` \
                  (--cert, --key, --ca, or SLAP_CERT, SLAP_KEY, SLAP_CA)."
)]
struct Cli {
    #[command(flatten)]
    conn: Conn,
    /// Print JSON (for scripts) instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args)]
struct Conn {
    /// The Master: a gateway's or a replica's SLAP address (https://host:port or host:port).
    #[arg(long, env = "SLAP_MASTER", global = true)]
    master: Option<String>,
    /// Your certificate (NAME.crt from `master-node user add NAME`).
    #[arg(long, env = "SLAP_CERT", global = true)]
    cert: Option<PathBuf>,
    /// Your key (NAME.key).
    #[arg(long, env = "SLAP_KEY", global = true)]
    key: Option<PathBuf>,
    /// The cluster's CA certificate (ca.crt).
    #[arg(long, env = "SLAP_CA", global = true)]
    ca: Option<PathBuf>,
    /// Talk plain HTTP/2 to a Master run with --insecure-http (development only).
    #[arg(long, global = true)]
    insecure_http: bool,
    /// Seconds to keep retrying while the Master cannot answer.
    #[arg(long, default_value_t = 30, global = true)]
    patience: u64,
}

#[derive(Subcommand)]
enum Cmd {
    /// Request an instance (or change the one of that title): parameters
    /// from --param and/or a JSON or YAML file.
    Request {
        title: String,
        software_release: String,
        /// The software type.
        #[arg(long = "type", default_value = "default")]
        software_type: String,
        /// A parameter, key=value (repeatable).
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Parameters from a file: a JSON or YAML mapping of strings.
        #[arg(long)]
        params_file: Option<PathBuf>,
        /// Where it may run, key=value (region=eu, computer_guid=COMP-1,
        /// max_price=0.05EUR, min_cpu=4, min_memory=8GiB, capability=gpu,
        /// provider=alice, not_provider=bob; repeatable).
        #[arg(long = "sla", value_name = "KEY=VALUE")]
        sla: Vec<String>,
        /// started or stopped (default: keep the current state; new: started).
        #[arg(long, value_parser = ["started", "stopped"])]
        state: Option<String>,
        /// A shared instance (a slave) on a matching host.
        #[arg(long)]
        shared: bool,
        /// Wait until it is placed and reported started (up to --patience).
        #[arg(long)]
        wait: bool,
    },
    /// Your instances.
    List,
    /// One instance, with its connection parameters.
    Show { title: String },
    /// Destroy an instance and what it requested.
    Destroy { title: String },
    /// What you used in a month, with prices (your invoice), or with
    /// --provider what a provider's computers earned (their statement).
    Usage {
        /// YYYY-MM.
        #[arg(long)]
        period: String,
        /// A provider's statement: yours, or anyone's for an administrator.
        #[arg(long)]
        provider: Option<String>,
    },
    /// A computer's offer on the market: set, show, withdraw.
    Offer {
        #[command(subcommand)]
        command: market::OfferCmd,
    },
    /// Name the user who owns COMPUTER: who sets its offer and is credited
    /// for its work (administrators). Without USER, forget the owner.
    Owner { computer: String, user: Option<String> },
    /// Install a software release on a computer (administrators).
    Supply {
        software_release: String,
        computer: String,
        /// Remove it instead.
        #[arg(long)]
        destroy: bool,
    },
    /// Shell completions: bash, zsh, fish, elvish or powershell.
    Completions { shell: clap_complete::Shell },
}

fn key_value(items: &[String], what: &str) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.to_string()))
                .with_context(|| format!("{what} {s:?} is not key=value"))
        })
        .collect()
}

fn params_file(path: &PathBuf) -> anyhow::Result<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    // JSON is YAML; a value that is not a string (a number, a boolean) is
    // passed as its text, as instance parameters are strings.
    let value: serde_yaml::Value =
        serde_yaml::from_str(&text).with_context(|| format!("{} is neither JSON nor YAML", path.display()))?;
    let serde_yaml::Value::Mapping(map) = value else {
        bail!("{} must hold a mapping of parameter names to values", path.display());
    };
    map.into_iter()
        .map(|(k, v)| {
            let key = match k {
                serde_yaml::Value::String(s) => s,
                other => bail!("parameter name {other:?} in {} is not a string", path.display()),
            };
            let value = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(b) => b.to_string(),
                serde_yaml::Value::Null => String::new(),
                other => serde_json::to_string(&other)?,
            };
            Ok((key, value))
        })
        .collect()
}

async fn connect(c: &Conn) -> anyhow::Result<MasterClient<Channel>> {
    let master = c
        .master
        .as_deref()
        .context("say which Master: --master host:port (or SLAP_MASTER), a gateway's or a replica's SLAP address")?;
    let addr = master
        .split_once("://")
        .map(|(_, a)| a)
        .unwrap_or(master)
        .trim_end_matches('/')
        .to_string();
    if c.insecure_http {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        return Ok(MasterClient::new(channel).max_decoding_message_size(64 << 20));
    }
    let need = |p: &Option<PathBuf>, flag: &str, env: &str| -> anyhow::Result<String> {
        let p = p.as_ref().with_context(|| {
            format!("give {flag} (or {env}): your certificate files from `master-node user add NAME`")
        })?;
        std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
    };
    let identity = slap_proto::tls::ClientIdentity::from_pem(
        &need(&c.cert, "--cert", "SLAP_CERT")?,
        &need(&c.key, "--key", "SLAP_KEY")?,
    )?;
    let trust = slap_proto::tls::Trust::ca_pem(&need(&c.ca, "--ca", "SLAP_CA")?)?;
    let config = slap_proto::tls::client_config(&trust, Some(&identity), slap_proto::tls::Expect::ReplicaOrGateway)?;
    Ok(MasterClient::new(slap_proto::tls::channel(&addr, config)?).max_decoding_message_size(64 << 20))
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    )
}

/// A call the Master refused or could not answer, with what to do about it.
#[derive(Debug)]
struct Failure {
    code: Code,
    message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hint = match self.code {
            Code::PermissionDenied => " (your certificate may not do this)",
            Code::Unavailable => " (is the Master up and reachable, and does a majority of its replicas run?)",
            _ => "",
        };
        write!(f, "{}{hint}", self.message)
    }
}

impl std::error::Error for Failure {}

/// Calls until an answer or a definite refusal; the request (and so its
/// request id) is the same on every attempt.
pub(crate) async fn call<T, F, Fut>(patience: u64, mut f: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let deadline = Instant::now() + Duration::from_secs(patience);
    let mut pause = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(s) if retryable(&s) && Instant::now() + pause < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(s) => {
                return Err(Failure {
                    code: s.code(),
                    message: s.message().to_string(),
                })
            }
        }
    }
}

pub(crate) fn request_id() -> Option<pb::RequestId> {
    let mut id = [0u8; 8];
    rand::Rng::fill(&mut rand::rng(), &mut id[..]);
    Some(pb::RequestId {
        client: format!("slapctl-{}", hex::encode(id)),
        seq: 1,
    })
}

fn instance_json(i: &pb::Instance) -> serde_json::Value {
    serde_json::json!({
        "title": i.title, "id": i.id, "owner": i.owner, "root": i.root,
        "software_release": i.software_release, "software_type": i.software_type,
        "parameters": i.parameters, "sla": i.sla, "shared": i.shared,
        "requested_state": i.requested_state, "reported_state": i.reported_state,
        "error_log": i.error_log, "placed": i.placed, "computer": i.computer_id,
        "partition": i.partition_id, "host": i.host, "pending_reason": i.pending_reason,
        "connection": i.connection,
        "agreement": i.agreement.as_ref().map(|a| serde_json::json!({
            "computer": a.computer_id, "provider": a.provider,
            "price_per_hour_micros": a.price_per_hour_micros, "currency": a.currency,
            "resource_price_micros": a.resource_price_micros, "agreed_at": a.agreed_at,
        })),
    })
}

fn show(i: &pb::Instance) {
    println!("{} ({})", i.title, i.id);
    println!("  software release: {} (type {})", i.software_release, i.software_type);
    let place = if !i.computer_id.is_empty() {
        format!("{} / {}", i.computer_id, i.partition_id)
    } else if !i.host.is_empty() {
        format!("shared on {}", i.host)
    } else {
        format!("not placed yet: {}", i.pending_reason)
    };
    println!("  where: {place}");
    if let Some(a) = &i.agreement {
        println!("  price: {}", market::agreement_line(a));
    }
    let reported = if i.reported_state.is_empty() {
        "nothing yet"
    } else {
        &i.reported_state
    };
    println!("  state: requested {}, reported {reported}", i.requested_state);
    if !i.error_log.is_empty() {
        println!("  error: {}", i.error_log.lines().last().unwrap_or(""));
    }
    for (title, map) in [("parameters", &i.parameters), ("connection", &i.connection)] {
        if map.is_empty() {
            continue;
        }
        println!("  {title}:");
        let mut entries: Vec<_> = map.iter().collect();
        entries.sort();
        for (k, v) in entries {
            println!("    {k} = {v}");
        }
    }
}

pub(crate) fn money(m: i64) -> String {
    format!(
        "{}{}.{:06}",
        if m < 0 { "-" } else { "" },
        m.unsigned_abs() / 1_000_000,
        m.unsigned_abs() % 1_000_000
    )
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let p = cli.conn.patience;
    if let Cmd::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "slapctl", &mut std::io::stdout());
        return Ok(());
    }
    let client = connect(&cli.conn).await?;
    match cli.command {
        Cmd::Completions { .. } => unreachable!("handled above"),
        Cmd::Request {
            title,
            software_release,
            software_type,
            params,
            params_file: file,
            sla,
            state,
            shared,
            wait,
        } => {
            let mut parameters = match &file {
                Some(f) => params_file(f)?,
                None => BTreeMap::new(),
            };
            parameters.extend(key_value(&params, "parameter")?);
            let req = pb::RequestInstanceRequest {
                request_id: request_id(),
                title: title.clone(),
                software_release,
                software_type,
                parameters: parameters.into_iter().collect(),
                sla: key_value(&sla, "SLA")?.into_iter().collect(),
                shared,
                state: state.unwrap_or_default(),
                ..Default::default()
            };
            let mut inst = call(p, || {
                let (mut c, req) = (client.clone(), req.clone());
                async move { c.request(req).await }
            })
            .await?;
            if wait {
                let deadline = Instant::now() + Duration::from_secs(p);
                while !(inst.placed && (inst.shared || inst.reported_state == "started")) {
                    if Instant::now() > deadline {
                        bail!(
                            "{title} is not up after {p} s: {}",
                            if inst.placed {
                                format!("reported {:?}", inst.reported_state)
                            } else {
                                inst.pending_reason.clone()
                            }
                        );
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    inst = get(&client, p, &title).await?;
                }
            }
            if cli.json {
                println!("{}", instance_json(&inst));
            } else {
                show(&inst);
            }
        }
        Cmd::Show { title } => {
            let inst = get(&client, p, &title).await?;
            if cli.json {
                println!("{}", instance_json(&inst));
            } else {
                show(&inst);
            }
        }
        Cmd::List => {
            let list = call(p, || {
                let mut c = client.clone();
                async move { c.list_instances(pb::ListInstancesRequest::default()).await }
            })
            .await?;
            if cli.json {
                let all: Vec<_> = list.instances.iter().map(instance_json).collect();
                println!("{}", serde_json::Value::Array(all));
                return Ok(());
            }
            if list.instances.is_empty() {
                println!("no instances; request one with `slapctl request TITLE SOFTWARE_RELEASE`");
            }
            println!(
                "{:<24} {:<14} {:<10} {:<10} {:<20} {:<16} release",
                "title", "id", "requested", "reported", "where", "price/hour"
            );
            for i in &list.instances {
                let place = if i.computer_id.is_empty() {
                    if i.host.is_empty() {
                        "pending".to_string()
                    } else {
                        format!("on {}", i.host)
                    }
                } else {
                    format!("{}/{}", i.computer_id, i.partition_id)
                };
                let price = i.agreement.as_ref().map_or("-".to_string(), |a| {
                    format!("{} {}", money(a.price_per_hour_micros), a.currency)
                });
                println!(
                    "{:<24} {:<14} {:<10} {:<10} {:<20} {:<16} {}",
                    i.title,
                    i.id,
                    i.requested_state,
                    if i.reported_state.is_empty() {
                        "-"
                    } else {
                        &i.reported_state
                    },
                    place,
                    price,
                    i.software_release
                );
            }
        }
        Cmd::Destroy { title } => {
            let current = get(&client, p, &title).await?;
            let req = pb::RequestInstanceRequest {
                request_id: request_id(),
                title: title.clone(),
                software_release: current.software_release,
                software_type: current.software_type,
                parameters: current.parameters,
                sla: current.sla,
                shared: current.shared,
                state: "destroyed".into(),
                ..Default::default()
            };
            let result = call(p, || {
                let (mut c, req) = (client.clone(), req.clone());
                async move { c.request(req).await }
            })
            .await;
            match result {
                Ok(_) => println!("{title}: destroyed (its node frees the partition)"),
                // Never placed: the Master forgets it at once.
                Err(e) if e.code == Code::NotFound => println!("{title}: destroyed (it was never placed)"),
                Err(e) => return Err(e.into()),
            }
        }
        Cmd::Offer { command } => market::offer(&client, p, cli.json, command).await?,
        Cmd::Owner { computer, user } => market::owner(&client, p, computer, user).await?,
        Cmd::Usage { period, provider } => {
            let report = call(p, || {
                let (mut c, period, provider) = (client.clone(), period.clone(), provider.clone());
                async move {
                    c.get_usage(pb::UsageReportRequest {
                        period,
                        provider: provider.unwrap_or_default(),
                        ..Default::default()
                    })
                    .await
                }
            })
            .await?;
            if cli.json {
                let lines: Vec<_> = report
                    .lines
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "subscription": l.subscription, "resource": l.resource, "release": l.software_release,
                            "quantity": l.quantity, "unit": l.unit, "priced": l.priced,
                            "unit_price_micros": l.unit_price_micros, "currency": l.currency,
                            "amount_micros": l.amount_micros, "price_unit": l.price_unit, "agreed": l.agreed,
                            "computer": l.computer_id, "subscriber": l.subscriber,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"period": period, "lines": lines, "totals_micros": report.totals_micros})
                );
                return Ok(());
            }
            match &provider {
                Some(name) => println!("statement of provider {name} in {period}"),
                None => println!("usage in {period}"),
            }
            if report.lines.is_empty() {
                println!("(nothing)");
            }
            for l in &report.lines {
                let amount = if l.priced {
                    format!("{} {}", money(l.amount_micros), l.currency)
                } else {
                    "unpriced".into()
                };
                let at = if !l.priced {
                    String::new()
                } else {
                    format!(
                        " at {} {}/{}{}",
                        money(l.unit_price_micros),
                        l.currency,
                        l.price_unit,
                        if l.agreed { " (agreed)" } else { "" }
                    )
                };
                let whom = if provider.is_some() {
                    format!("{} for {} ", l.computer_id, l.subscriber)
                } else {
                    String::new()
                };
                println!(
                    "  {whom}{:<14} {:<10} {:>16.3} {:<7} {:>20}{at}  {}",
                    l.subscription, l.resource, l.quantity, l.unit, amount, l.software_release
                );
            }
            let mut totals: Vec<_> = report.totals_micros.iter().collect();
            totals.sort();
            for (currency, total) in totals {
                println!("total: {} {currency}", money(*total));
            }
        }
        Cmd::Supply {
            software_release,
            computer,
            destroy,
        } => {
            let req = pb::SupplyRequest {
                request_id: request_id(),
                computer_id: computer.clone(),
                url: software_release.clone(),
                state: if destroy { "destroyed" } else { "available" }.into(),
            };
            call(p, || {
                let (mut c, req) = (client.clone(), req.clone());
                async move { c.supply(req).await }
            })
            .await?;
            println!(
                "{software_release} {} on {computer}",
                if destroy { "to be removed" } else { "supplied" }
            );
        }
    }
    Ok(())
}

async fn get(client: &MasterClient<Channel>, patience: u64, title: &str) -> Result<pb::Instance, Failure> {
    call(patience, || {
        let mut c = client.clone();
        let title = title.to_string();
        async move {
            c.get_instance(pb::GetInstanceRequest {
                title,
                ..Default::default()
            })
            .await
        }
    })
    .await
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("slapctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("slapctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_from_flags_and_files() {
        let kv = key_value(&["a=1".into(), "b=x=y".into()], "parameter").unwrap();
        assert_eq!(kv["b"], "x=y");
        assert!(key_value(&["nope".into()], "parameter").is_err());
        let dir = std::env::temp_dir().join(format!("slapctl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = dir.join("p.json");
        std::fs::write(&json, r#"{"title": "My <blog>", "port": 8080, "tls": true}"#).unwrap();
        let p = params_file(&json).unwrap();
        assert_eq!(
            (p["title"].as_str(), p["port"].as_str(), p["tls"].as_str()),
            ("My <blog>", "8080", "true")
        );
        let yaml = dir.join("p.yaml");
        std::fs::write(&yaml, "title: été\nlist: [1, 2]\n").unwrap();
        let p = params_file(&yaml).unwrap();
        assert_eq!(p["title"], "été");
        assert_eq!(p["list"], "[1,2]");
        std::fs::write(&yaml, "- not\n- a mapping\n").unwrap();
        assert!(params_file(&yaml).unwrap_err().to_string().contains("mapping"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
