//! `master-node`: one replica of the replicated SlapOS Master.
//!
//! ```text
//! master-node init   --data-dir D --listen ADDR [--advertise ADDR]     create a cluster
//! master-node join   --peer ADDR --token T --data-dir D --listen ADDR   join one
//! master-node run    --data-dir D                                       restart a replica
//! master-node leave  --data-dir D | --id N --peer ADDR --token T        remove a replica
//! master-node status --peer ADDR [--json]                               members, leader, lag
//! master-node backup --peer ADDR --token T --out FILE                   save the state online
//! master-node backup verify FILE                                        check a backup
//! master-node restore --from FILE --data-dir D --listen ADDR           a new cluster from a backup
//! master-node recover --data-dir D --confirm-majority-lost             a survivor alone, after majority loss
//! ```
//!
//! The cluster port (Raft and the cluster API) is always mutual TLS; the
//! CA is made by `init`, and a join token carries the CA's hash so that the
//! joiner and every token-authenticated command recognize the cluster.

//! The command line is in [`cli`], each command group in [`commands`].

mod cli;
mod commands;
mod fail;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::fail::Fail;

// glibc's malloc spent a quarter of a busy replica's CPU in contention and
// consolidation (measured with perf under the write benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_json);
    if let Some(v) = cli.act_as_version {
        master_node::raft::speak_at_most(v);
        tracing::warn!(
            version = master_node::raft::spoken_version(),
            "acting as an older release (--act-as-version)"
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("master-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
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
