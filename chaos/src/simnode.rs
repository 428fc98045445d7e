//! A simulated node (`chaos sim-node`), a process of its own: it formats
//! its computer, polls its computer document, reports instances started,
//! publishes connection parameters for them, and reports destroyed ones
//! wiped so the Master frees their partitions. Like a real node it reads
//! the document from whichever replica answers (possibly behind); its
//! reports and publications name the instance they are for, so a late one
//! never lands on the partition's next tenant.
//!
//! Every call is recorded in its history file, one JSON line when it is
//! invoked (as unknown) and one when it ends: if the node is killed in the
//! middle, the call is still in the history, as unknown. The suite merges
//! the file with its own history at the end ([`load_history`]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use slap_proto::master as pb;
use slap_proto::master::master_client::MasterClient;
use slap_proto::tls::{ClientIdentity, Expect, Trust};
use tokio::time::Instant;

use crate::history::{now_us, Call, Key, Op, Outcome};
use crate::workload::{Called, Doors, Writer};

/// `chaos sim-node` arguments.
#[derive(clap::Args, Debug)]
pub struct SimNodeArgs {
    /// The computer's reference.
    #[arg(long)]
    pub computer: String,
    /// computer.crt, computer.key and ca.crt.
    #[arg(long)]
    pub identity: PathBuf,
    /// Gateways and replicas' public addresses, comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub doors: Vec<String>,
    #[arg(long, default_value_t = 8)]
    pub partitions: usize,
    /// Where to append the history (JSON lines).
    #[arg(long)]
    pub history: PathBuf,
    /// Distinguishes this run's request ids.
    #[arg(long, default_value_t = 0)]
    pub run: u64,
}

struct Log {
    file: std::fs::File,
}

impl Log {
    fn push(&mut self, op: &Op) {
        if let Ok(line) = serde_json::to_string(op) {
            let _ = writeln!(self.file, "{line}");
            let _ = self.file.flush();
        }
    }

    /// Records the call as invoked (unknown) before it is made.
    fn invoked(&mut self, process: &str, key: &Option<Key>, call: &Call, invoked: u64) {
        self.push(&Op {
            process: process.to_string(),
            key: key.clone(),
            call: call.clone(),
            invoked,
            completed: None,
            outcome: Outcome::Unknown {
                error: "the node stopped before the answer".into(),
            },
            via: String::new(),
        });
    }
}

/// A node's history file: the last line of each call wins.
pub fn load_history(path: &std::path::Path) -> anyhow::Result<Vec<Op>> {
    let text = std::fs::read_to_string(path)?;
    let mut ops: BTreeMap<(String, u64, String), Op> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let op: Op = serde_json::from_str(line)?;
        let id = (op.process.clone(), op.invoked, format!("{:?}", op.call));
        ops.insert(id, op);
    }
    Ok(ops.into_values().collect())
}

fn outcome<T>(called: &Called<T>, note: impl Fn(&T) -> bool) -> (Outcome, Option<u64>) {
    match called {
        Called::Answer(v) => (
            Outcome::Ok {
                seen: None,
                no_effect: note(v),
            },
            Some(now_us()),
        ),
        Called::Refused(s) => (
            Outcome::Fail {
                error: format!("{:?}: {}", s.code(), s.message()),
            },
            Some(now_us()),
        ),
        Called::NoAnswer(e) => (Outcome::Unknown { error: e.clone() }, None),
    }
}

/// Runs until SIGTERM.
pub async fn run(a: SimNodeArgs) -> anyhow::Result<()> {
    let read = |f: &str| std::fs::read_to_string(a.identity.join(f));
    let identity = ClientIdentity::from_pem(&read("computer.crt")?, &read("computer.key")?)?;
    let config = slap_proto::tls::client_config(
        &Trust::ca_pem(&read("ca.crt")?)?,
        Some(&identity),
        Expect::ReplicaOrGateway,
    )?;
    let doors = Doors {
        doors: a
            .doors
            .iter()
            .map(|d| {
                Ok((
                    d.clone(),
                    MasterClient::new(slap_proto::tls::channel(d, config.clone())?),
                ))
            })
            .collect::<anyhow::Result<_>>()?,
    };
    let mut log = Log {
        file: std::fs::OpenOptions::new().create(true).append(true).open(&a.history)?,
    };
    let name = format!("node-{}", a.computer);
    let mut w = Writer::new(&name, a.run);
    let patience = Duration::from_secs(20);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stopping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let stopping = stopping.clone();
        let mut again = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            again.recv().await;
            stopping.store(true, std::sync::atomic::Ordering::SeqCst);
        });
    }
    let stop_now = || stopping.load(std::sync::atomic::Ordering::SeqCst);

    // Format.
    let partitions = (0..a.partitions)
        .map(|i| pb::PartitionSpec {
            id: format!("slappart{i}"),
            ..Default::default()
        })
        .collect::<Vec<_>>();
    loop {
        let req = pb::LoadComputerRequest {
            request_id: Some(w.next_id()),
            computer_id: a.computer.clone(),
            partitions: partitions.clone(),
            categories: [("region".to_string(), format!("r{}", a.run % 3))]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let (called, _) = doors
            .call(0, patience, |mut c| {
                let req = req.clone();
                async move { c.load_computer(req).await }
            })
            .await;
        if matches!(called, Called::Answer(_)) {
            break;
        }
    }

    let mut published: BTreeMap<String, (u64, Instant)> = BTreeMap::new();
    let mut turn = 0usize;
    loop {
        turn += 1;
        let req = pb::GetComputerRequest {
            computer_id: a.computer.clone(),
        };
        let (doc, _) = doors
            .call(turn, Duration::from_secs(3), |mut c| {
                let req = req.clone();
                async move { c.get_computer(req).await }
            })
            .await;
        if let Called::Answer(doc) = doc {
            for p in &doc.partitions {
                let Some(inst) = &p.instance else { continue };
                if stop_now() {
                    return Ok(());
                }
                let key = Key {
                    user: inst.owner.clone(),
                    title: inst.title.clone(),
                };
                let part = Some(pb::PartitionRef {
                    computer_id: a.computer.clone(),
                    partition_id: p.id.clone(),
                });
                if inst.requested_state == "destroyed" {
                    let invoked = now_us();
                    let call = Call::Freed { id: inst.id.clone() };
                    log.invoked(&name, &Some(key.clone()), &call, invoked);
                    let req = pb::ReportInstanceRequest {
                        request_id: Some(w.next_id()),
                        partition: part,
                        state: "destroyed".into(),
                        instance_id: inst.id.clone(),
                        ..Default::default()
                    };
                    let (called, via) = doors
                        .call(turn, patience, |mut c| {
                            let req = req.clone();
                            async move { c.report_instance(req).await }
                        })
                        .await;
                    let (outcome, completed) = outcome(&called, |d: &pb::Done| !d.note.is_empty());
                    log.push(&Op {
                        process: name.clone(),
                        key: Some(key),
                        call,
                        invoked,
                        completed,
                        outcome,
                        via,
                    });
                    published.remove(&inst.id);
                    continue;
                }
                if inst.reported_state != "started" {
                    let req = pb::ReportInstanceRequest {
                        request_id: Some(w.next_id()),
                        partition: part.clone(),
                        state: "started".into(),
                        instance_id: inst.id.clone(),
                        ..Default::default()
                    };
                    let invoked = now_us();
                    let call = Call::Other {
                        what: format!("started {}", inst.id),
                    };
                    log.invoked(&name, &None, &call, invoked);
                    let (called, via) = doors
                        .call(turn, patience, |mut c| {
                            let req = req.clone();
                            async move { c.report_instance(req).await }
                        })
                        .await;
                    let (outcome, completed) = outcome(&called, |_| false);
                    log.push(&Op {
                        process: name.clone(),
                        key: None,
                        call,
                        invoked,
                        completed,
                        outcome,
                        via,
                    });
                }
                // A new connection parameter every couple of seconds per instance.
                let due = published
                    .get(&inst.id)
                    .is_none_or(|(_, at)| at.elapsed() > Duration::from_secs(2));
                if due {
                    let n = published.get(&inst.id).map(|(n, _)| n + 1).unwrap_or(1);
                    let c = format!("{}-{n}", a.computer);
                    let req = pb::PublishConnectionRequest {
                        request_id: Some(w.next_id()),
                        partition: part,
                        connection: [("c".to_string(), c.clone())].into_iter().collect(),
                        instance_id: inst.id.clone(),
                        ..Default::default()
                    };
                    let invoked = now_us();
                    let call = Call::Publish {
                        id: inst.id.clone(),
                        c: c.clone(),
                    };
                    log.invoked(&name, &Some(key.clone()), &call, invoked);
                    let (called, via) = doors
                        .call(turn, patience, |mut cl| {
                            let req = req.clone();
                            async move { cl.publish_connection(req).await }
                        })
                        .await;
                    let (outcome, completed) = outcome(&called, |_| false);
                    log.push(&Op {
                        process: name.clone(),
                        key: Some(key),
                        call,
                        invoked,
                        completed,
                        outcome,
                        via,
                    });
                    published.insert(inst.id.clone(), (n, Instant::now()));
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = term.recv() => return Ok(()),
        }
    }
}
