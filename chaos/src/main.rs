//! `chaos`: kill replicas, cut networks, and prove from what clients saw
//! that nothing acknowledged was lost.
//!
//! ```text
//! chaos run --short                      CI: at most 5 minutes, at least 30 faults
//! chaos run --duration 2h                a long run
//! chaos run --seed 42 --replicas 5       replay a run, or use five replicas
//! ```
//!
//! Needs root (network namespaces) and the workspace's binaries built.
//! Writes its results (report.json, summary.txt, timeline.svg,
//! history.jsonl, every process's log) into `--out` and exits non-zero
//! when any checker fails.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chaos",
    version,
    about = "The chaos suite: real clusters, real faults, checked histories"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run: a cluster in network namespaces, a workload, faults, checks.
    Run(RunArgs),
    /// The fleet simulator: N nodes of P partitions and M users against a
    /// real cluster behind a gateway, measured (latency, allocations/s,
    /// RSS, CPU). `--smoke` is the CI size.
    Fleet(chaos::fleet::FleetArgs),
    /// A simulated node (started by `run`; not for direct use).
    #[command(hide = true)]
    SimNode(chaos::simnode::SimNodeArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// The CI mode: 30 faults or more, within about four minutes.
    #[arg(long)]
    short: bool,
    /// How long to keep injecting faults (e.g. 90s, 10m, 2h).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Inject at least this many faults.
    #[arg(long)]
    min_events: Option<usize>,
    /// 3 or 5 replicas.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(3..=5))]
    replicas: u8,
    /// The seed of the fault schedule and the workload (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Where results go (default: chaos-results/<seed> under the current directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Simulated nodes (computers of 8 partitions each).
    #[arg(long, default_value_t = 3)]
    computers: usize,
    /// Only these fault kinds, comma-separated (default: all of them; see
    /// the nemesis table in docs/chaos.md).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// A write must succeed within this many seconds after a fault heals.
    #[arg(long, default_value_t = 10)]
    recovery_bound: u64,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
    /// Run the replicas in Docker containers of this image (built from
    /// these binaries with `deploy/build-images TAG`) instead of network
    /// namespaces.
    #[arg(long, value_name = "IMAGE")]
    docker: Option<String>,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and s, m or h (e.g. 2h)"))?;
    Ok(Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit is s, m or h")),
    }))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = matches!(&cli.command, Cmd::Run(a) if a.log_json);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("chaos: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Cmd::Fleet(a) => match runtime.block_on(chaos::fleet::run(a)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chaos fleet: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::SimNode(a) => match runtime.block_on(chaos::simnode::run(a)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chaos sim-node: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Run(a) => {
            let seed = a.seed.unwrap_or_else(|| chaos::history::now_us() % 1_000_000);
            let (duration, min_events) = match (a.short, a.duration) {
                (_, Some(d)) => (d, a.min_events.unwrap_or(0)),
                (true, None) => (Duration::ZERO, a.min_events.unwrap_or(30)),
                (false, None) => (Duration::from_secs(600), a.min_events.unwrap_or(0)),
            };
            let out = a
                .out
                .unwrap_or_else(|| PathBuf::from("chaos-results").join(format!("seed-{seed}")));
            let cfg = chaos::run::RunConfig {
                replicas: a.replicas as usize,
                duration,
                min_events,
                seed,
                out: out.clone(),
                computers: a.computers,
                recovery_bound: Duration::from_secs(a.recovery_bound),
                faults: a.faults.clone(),
                docker_image: a.docker.clone(),
            };
            if let Some(bad) = a.faults.iter().find(|f| !chaos::nemesis::KINDS.contains(&f.as_str())) {
                eprintln!(
                    "chaos: unknown fault kind {bad:?}; the kinds are: {}",
                    chaos::nemesis::KINDS.join(", ")
                );
                return ExitCode::from(2);
            }
            let outcome = runtime.block_on(async {
                let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) else {
                    return Some(Err(anyhow::anyhow!("cannot watch for SIGTERM")));
                };
                tokio::select! {
                    r = chaos::run::run(cfg) => Some(r),
                    _ = tokio::signal::ctrl_c() => None,
                    _ = term.recv() => None,
                }
            });
            // Whatever happened, nothing of ours stays behind.
            chaos::net::clean_stale();
            match outcome {
                None => {
                    eprintln!("chaos: interrupted; everything the run started was stopped and removed");
                    ExitCode::from(130)
                }
                Some(Err(e)) => {
                    eprintln!("chaos: the run could not complete: {e:#} (logs in {})", out.display());
                    ExitCode::from(2)
                }
                Some(Ok(report)) => {
                    print!("{}", chaos::report::summary(&report));
                    println!("results in {}", out.display());
                    if report.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
    }
}
