//! `nodeagent`: turns a machine into a node the SlapOS Master drives.
//!
//! ```text
//! nodeagent format   [node options]                      make the partitions (idempotent)
//! nodeagent run      --master URL[,URL...] [node options] the daemon: every loop
//! nodeagent software --master URL ...                    one software run
//! nodeagent instance --master URL ...                    one instance run
//! nodeagent report   --master URL ...                    post usage once
//! nodeagent unformat [node options]                      remove free partitions
//! ```

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use nodeagent::agent::{self, Intervals};
use nodeagent::config::{Mode, NodeConfig};
use nodeagent::format;
use nodeagent::instance::{Instances, Outcome};
use nodeagent::master::MasterClient;
use nodeagent::software;
use nodeagent::supervisor::Supervisor;

/// mimalloc returns freed memory to the system promptly: the agent parses a
/// large document per change and should not keep its peak resident.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "nodeagent",
    version,
    about = "Turns a machine into a node the SlapOS Master drives",
    long_about = "Turns a machine into a node the SlapOS Master drives: computer partitions \
                  (a Unix user, a directory, a tap device and addresses each), software releases \
                  installed once per node, instances configured, supervised and checked by \
                  promises, usage reported. Runs as root (privileged mode) or, for development, \
                  as anyone (unprivileged mode: directories only)."
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
    /// Create the partitions (users, directories, taps, addresses); a second
    /// run changes nothing. With --master, also report the capacity.
    Format {
        #[command(flatten)]
        node: NodeConfig,
        /// Master URLs (replicas or gateways) to report the capacity to.
        #[arg(long, env = "NODEAGENT_MASTER", value_delimiter = ',')]
        master: Vec<String>,
        /// Where `nodeagent register` wrote the computer's certificate (https masters).
        #[arg(long, env = "NODEAGENT_IDENTITY_DIR", default_value = "/etc/nodeagent")]
        identity_dir: std::path::PathBuf,
    },
    /// Run the daemon: capacity, watch, software, instance, promise, usage
    /// loops and the process supervisor.
    Run(RunArgs),
    /// One software run: install what the Master lists, remove the rest.
    Software(OneShot),
    /// One instance run: reconfigure partitions whose timestamp changed.
    Instance {
        #[command(flatten)]
        one: OneShot,
        /// Reconfigure every partition, changed or not.
        #[arg(long)]
        force: bool,
    },
    /// Post the usage of every busy partition once.
    Report(OneShot),
    /// Obtain this computer's certificate from the Master with the one-time
    /// token of `master-node computer add ID`.
    Register {
        /// A replica's cluster API, host:port.
        #[arg(long)]
        master: String,
        /// The registration token.
        #[arg(long, env = "NODEAGENT_REGISTRATION_TOKEN")]
        token: String,
        /// This computer's id (the one the token was made for).
        #[arg(long, env = "NODEAGENT_COMPUTER_ID")]
        computer_id: String,
        /// Where to write computer.crt, computer.key (mode 0600) and ca.crt.
        #[arg(long, default_value = "/etc/nodeagent")]
        out: std::path::PathBuf,
    },
    /// Remove the partitions format made (users, taps, addresses,
    /// directories). Stop the agent and free the partitions first.
    Unformat {
        #[command(flatten)]
        node: NodeConfig,
    },
    /// One end of a tunnel between partitions, as the agent runs it for a
    /// release's `[[instance.TYPE.tunnel]]` (docs/software-release.md).
    #[command(hide = true)]
    Tunnel(nodeagent::tunnel::TunnelArgs),
}

#[derive(Args)]
struct OneShot {
    #[command(flatten)]
    node: NodeConfig,
    /// Master URLs (replicas or gateways), tried in order. https:// URLs use
    /// the computer's certificate from --identity-dir.
    #[arg(long, env = "NODEAGENT_MASTER", value_delimiter = ',', required = true)]
    master: Vec<String>,
    /// Where `nodeagent register` wrote computer.crt, computer.key and ca.crt.
    /// `nodeagent run` reads the certificate again every second: a renewal
    /// written here (`master-node cert renew SERIAL --out DIR`) is taken
    /// without a restart. It also renews the certificate itself at two
    /// thirds of its lifetime, through the first https master URL.
    #[arg(long, env = "NODEAGENT_IDENTITY_DIR", default_value = "/etc/nodeagent")]
    identity_dir: std::path::PathBuf,
}

impl OneShot {
    /// The plan and the instance side, for one run of a loop: processes
    /// the daemon started are re-adopted, not restarted.
    async fn instances(&self) -> anyhow::Result<(nodeagent::master::ComputerPlan, Instances)> {
        let master = Arc::new(self.client()?);
        let Some((plan, _)) = master.computer_plan(&self.node.computer_id, None, None).await? else {
            anyhow::bail!("the master answered 304 to an unconditional request");
        };
        let resources = format::load_resources(&self.node)?;
        let supervisor =
            Arc::new(Supervisor::new(self.node.agent_dir().join("run")).with_cgroups(agent::cgroups_for(&self.node)));
        supervisor.adopt(&resources).await;
        Ok((plan, Instances::new(self.node.clone(), master, supervisor, resources)))
    }

    fn client(&self) -> anyhow::Result<MasterClient> {
        let identity = if self.master.iter().any(|u| u.starts_with("https://")) {
            Some(nodeagent::master::TlsIdentity::load(&self.identity_dir)?)
        } else {
            None
        };
        Ok(MasterClient::with_identity(&self.master, identity.as_ref())?)
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    one: OneShot,
    /// Software loop period (also runs at once when the plan changes).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    software_interval: Duration,
    /// Instance loop period (also runs at once when the plan changes).
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    instance_interval: Duration,
    /// How often started partitions' promises are checked.
    #[arg(long, default_value = "1m", value_parser = parse_duration)]
    promise_interval: Duration,
    /// How often usage is posted.
    #[arg(long, default_value = "1d", value_parser = parse_duration)]
    usage_interval: Duration,
    /// With an https master: how often to ask it which CAs the cluster
    /// trusts. When a CA rotation begins the node trusts both CAs and
    /// renews its certificate under the new one; when it ends, the new
    /// one alone.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    ca_check_interval: Duration,
    /// Stop every partition's processes when the agent exits (default: they
    /// keep running and the next agent re-adopts them).
    #[arg(long)]
    stop_on_exit: bool,
    /// host:port to serve /metrics (Prometheus text format) and /healthz on.
    #[arg(long, env = "NODEAGENT_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration such as 30s, 5m, 1h, 1d"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => return Ok(Duration::from_millis(n)),
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86400,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m, h or d)")),
    };
    Ok(Duration::from_secs(secs))
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colours only for a terminal, not in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    // One thread: the agent works one partition at a time and waits on I/O;
    // more threads would only add per-thread allocator heaps.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("nodeagent: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nodeagent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn announce_mode(node: &NodeConfig) {
    if node.mode() == Mode::Unprivileged {
        eprintln!(
            "nodeagent: unprivileged mode: partitions are directories only (no users, taps or \
             addresses); every instance runs as this user on {}",
            node.unprivileged_address
        );
    }
}

async fn run(cmd: Cmd) -> anyhow::Result<ExitCode> {
    match cmd {
        Cmd::Format {
            node,
            master,
            identity_dir,
        } => {
            announce_mode(&node);
            let (report, resources) = format::format(&node)?;
            println!(
                "{} partitions in {} ({:?} mode): {} users created, {} directories changed, {} taps created, \
                 {} addresses added, {} resource files written",
                resources.len(),
                node.instance_root.display(),
                node.mode(),
                report.users_created,
                report.dirs_changed,
                report.taps_created,
                report.addresses_added,
                report.resources_written
            );
            if !master.is_empty() {
                let one = OneShot {
                    node: node.clone(),
                    master,
                    identity_dir,
                };
                agent::report_capacity(&node, &one.client()?, &resources).await?;
                println!("capacity of {} reported to the master", node.computer_id);
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Unformat { node } => {
            format::unformat(&node)?;
            println!(
                "removed {} partitions from {}",
                node.partitions,
                node.instance_root.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Register {
            master,
            token,
            computer_id,
            out,
        } => {
            nodeagent::register::register(&master, &token, &computer_id, &out).await?;
            println!(
                "computer {computer_id} registered: {}/computer.crt, computer.key (mode 0600) and ca.crt",
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(args) => {
            announce_mode(&args.one.node);
            let master = Arc::new(args.one.client()?);
            if let (Some(tls), Some(url)) = (master.tls(), args.one.master.iter().find(|u| u.starts_with("https://"))) {
                tokio::spawn(nodeagent::master::keep_identity_current(
                    tls.clone(),
                    args.one.identity_dir.clone(),
                    url.clone(),
                    args.ca_check_interval,
                ));
            }
            let intervals = Intervals {
                software: args.software_interval,
                instance: args.instance_interval,
                promise: args.promise_interval,
                usage: args.usage_interval,
                ..Intervals::default()
            };
            let shutdown = async {
                let mut term =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            };
            agent::run(
                args.one.node,
                master,
                intervals,
                args.stop_on_exit,
                args.metrics_listen,
                shutdown,
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Software(one) => {
            let master = one.client()?;
            let Some((plan, _)) = master.computer_plan(&one.node.computer_id, None, None).await? else {
                anyhow::bail!("the master answered 304 to an unconditional request");
            };
            let run = software::process(&one.node, &master, &plan).await;
            for url in &run.installed {
                println!("installed {url}");
            }
            for url in &run.removed {
                println!("removed {url}");
            }
            for (url, err) in &run.failed {
                println!("FAILED {url}: {err}");
            }
            Ok(if run.failed.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Cmd::Instance { one, force } => {
            let (plan, mut instances) = one.instances().await?;
            let outcomes = instances.process(&plan.partitions, force).await;
            let mut failed = false;
            for (partition, outcome) in outcomes {
                match outcome {
                    Outcome::Free | Outcome::Unchanged => {}
                    Outcome::Failed(e) => {
                        failed = true;
                        println!("{partition}: FAILED: {e}");
                    }
                    other => println!("{partition}: {other:?}"),
                }
            }
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Cmd::Tunnel(args) => {
            nodeagent::tunnel::run(args).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Report(one) => {
            let (plan, instances) = one.instances().await?;
            let n = agent::report_usage(&instances, &plan).await?;
            println!("usage of {n} partitions reported");
            Ok(ExitCode::SUCCESS)
        }
    }
}
