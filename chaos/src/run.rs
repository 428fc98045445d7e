//! One chaos run: build the cluster, start the workload and the nodes,
//! inject faults until the run is over, heal, read everything back, check.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use slap_proto::master as pb;
use tokio::time::Instant;

use crate::checker::{self, FinalState, Placements};
use crate::cluster::{Bins, Cluster, Proc};
use crate::history::{now_us, FaultEvent, Key};
use crate::nemesis;
use crate::report::{self, Report};
use crate::workload::{self, Doors, Recorder, Writer, RELEASE};

/// How a run goes.
#[derive(Debug, Clone)]
pub struct RunConfig {
    pub replicas: usize,
    /// Keep injecting faults this long...
    pub duration: Duration,
    /// ...and at least this many.
    pub min_events: usize,
    pub seed: u64,
    pub out: PathBuf,
    pub computers: usize,
    /// A write must succeed within this after a fault heals.
    pub recovery_bound: Duration,
    /// Only these kinds (empty: all).
    pub faults: Vec<String>,
    /// Docker mode: replicas in containers of this image (None: namespaces).
    pub docker_image: Option<String>,
}

const USERS: &[&str] = &["alice", "bob"];
const KEYS_PER_USER: usize = 8;
const WRITERS_PER_USER: usize = 2;
const READERS: usize = 3;
const PATIENCE: Duration = Duration::from_secs(30);

fn doors_for(c: &Cluster, name: &str, gateways_first: bool) -> anyhow::Result<Doors> {
    let mut addrs: Vec<(String, String)> = c
        .gateways
        .iter()
        .enumerate()
        .map(|(i, (a, _))| (format!("gateway-{i}"), a.clone()))
        .collect();
    let direct: Vec<(String, String)> = c
        .replicas
        .iter()
        .filter(|r| r.proc.child.is_some())
        .map(|r| (format!("slot-{}", r.slot), r.public.clone()))
        .collect();
    if gateways_first {
        addrs.extend(direct);
    } else {
        addrs = direct.into_iter().chain(addrs).collect();
    }
    Ok(Doors {
        doors: addrs
            .into_iter()
            .map(|(n, a)| Ok((n, c.native(&a, name)?)))
            .collect::<anyhow::Result<_>>()?,
    })
}

/// Runs the whole thing; the report says whether every checker passed.
pub async fn run(cfg: RunConfig) -> anyhow::Result<Report> {
    let bins = Bins::beside_me()?;
    let dir = cfg.out.clone();
    std::fs::create_dir_all(&dir)?;
    let origin = now_us();
    let run_id = cfg.seed ^ origin;
    let mut rng = cfg.seed.max(1);
    tracing::info!(seed = cfg.seed, replicas = cfg.replicas, dir = %dir.display(), "starting the cluster");
    let mut c = Cluster::start(
        bins.clone(),
        &dir,
        cfg.replicas + 1,
        cfg.replicas,
        2,
        cfg.seed,
        cfg.docker_image.as_deref(),
        // An older release until the rolling upgrade, when there is one.
        (cfg.faults.is_empty() || cfg.faults.iter().any(|f| f == "rolling-upgrade")).then_some(1),
    )
    .await?;

    // Computers, their software, their nodes.
    let admin = doors_for(&c, "admin", true)?;
    let mut nodes: Vec<Proc> = Vec::new();
    let mut node_histories = Vec::new();
    let mut door_list: Vec<String> = c.gateways.iter().map(|(a, _)| a.clone()).collect();
    door_list.extend(c.public_addrs());
    for k in 1..=cfg.computers {
        let id = format!("COMP-{k}");
        let identity = c.register_computer(&id).await?;
        let history = dir.join(format!("node-{k}.jsonl"));
        let mut cmd = Command::new(&bins.chaos);
        let child = crate::cluster::die_with_parent(&mut cmd)
            .args(["sim-node", "--computer", &id, "--identity"])
            .arg(&identity)
            .args(["--doors", &door_list.join(","), "--partitions", "8", "--history"])
            .arg(&history)
            .args(["--run", &run_id.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("node-{k}.log")))?)
            .spawn()
            .context("starting a simulated node")?;
        nodes.push(Proc::running(child));
        node_histories.push(history);
    }
    // Once each node has formatted its computer, supply the release to it.
    for k in 1..=cfg.computers {
        let id = format!("COMP-{k}");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let supply = pb::SupplyRequest {
                request_id: None,
                computer_id: id.clone(),
                url: RELEASE.into(),
                state: "available".into(),
            };
            let (r, _) = admin
                .call(0, PATIENCE, |mut cl| {
                    let s = supply.clone();
                    async move { cl.supply(s).await }
                })
                .await;
            match r {
                workload::Called::Answer(_) => break,
                workload::Called::Refused(s) if s.code() == tonic::Code::NotFound && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                workload::Called::Refused(s) => anyhow::bail!("supplying {RELEASE} to {id}: refused: {}", s.message()),
                workload::Called::NoAnswer(e) => anyhow::bail!("supplying {RELEASE} to {id}: no answer: {e}"),
            }
        }
    }

    // The workload.
    let rec = Recorder::default();
    let mut keys: Vec<Key> = Vec::new();
    for u in USERS {
        for i in 0..KEYS_PER_USER {
            keys.push(Key {
                user: u.to_string(),
                title: format!("k{i}"),
            });
        }
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for (ui, u) in USERS.iter().enumerate() {
        let mine: Vec<Key> = keys.iter().filter(|k| k.user == *u).cloned().collect();
        for wi in 0..WRITERS_PER_USER {
            let share: Vec<Key> = mine.iter().skip(wi).step_by(WRITERS_PER_USER).cloned().collect();
            let doors = doors_for(&c, u, (ui + wi) % 2 == 0)?;
            let name = format!("{u}-writer-{wi}");
            let w = Writer::new(&name, run_id);
            let (rec, rx) = (rec.clone(), stop_rx.clone());
            let seed = workload::next(&mut rng);
            tasks.push(tokio::spawn(workload::writer_loop(
                doors, rec, w, share, rx, PATIENCE, seed, wi,
            )));
        }
        for ri in 0..READERS {
            if ri % USERS.len() != ui {
                continue;
            }
            let doors = doors_for(&c, u, ri % 2 == 1)?;
            let (rec, rx) = (rec.clone(), stop_rx.clone());
            let seed = workload::next(&mut rng);
            let share = mine.clone();
            tasks.push(tokio::spawn(workload::reader_loop(
                doors,
                rec,
                format!("reader-{ri}"),
                share,
                rx,
                PATIENCE,
                seed,
            )));
        }
    }
    {
        let doors = doors_for(&c, "alice", true)?;
        let (rec, rx) = (rec.clone(), stop_rx.clone());
        let w = Writer::new("prober", run_id);
        tasks.push(tokio::spawn(workload::prober(doors, rec, w, "probe".into(), rx)));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Faults.
    let started = Instant::now();
    let mut faults: Vec<FaultEvent> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut order: Vec<&str> = nemesis::KINDS
        .iter()
        .copied()
        .filter(|k| cfg.faults.is_empty() || cfg.faults.iter().any(|f| f == k))
        .collect();
    let mut i = 0usize;
    let mut skipped_in_a_row = 0usize;
    while faults.len() < cfg.min_events || started.elapsed() < cfg.duration {
        if i.is_multiple_of(order.len()) {
            // Each round in a seeded order.
            for j in (1..order.len()).rev() {
                order.swap(j, (workload::next(&mut rng) as usize) % (j + 1));
            }
        }
        let kind = order[i % order.len()];
        i += 1;
        if skipped_in_a_row > 2 * order.len() {
            anyhow::bail!("no fault could be applied {skipped_in_a_row} times in a row: {skipped:?}");
        }
        let start = now_us();
        let (detail, applied) = match nemesis::apply(&mut c, kind, cfg.replicas, &mut rng).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(kind, "fault not applied: {e:#}");
                skipped.push(format!("{kind}: {e:#}"));
                skipped_in_a_row += 1;
                // The cluster must still be whole for the next one.
                nemesis::heal_all(&mut c).await?;
                continue;
            }
        };
        skipped_in_a_row = 0;
        tracing::info!(kind, %detail, "fault");
        let hold = Duration::from_millis(1500 + workload::next(&mut rng) % 1500);
        let problems = match &applied {
            nemesis::Applied::Checked(p) => p.clone(),
            _ => Vec::new(),
        };
        if !matches!(applied, nemesis::Applied::Nothing | nemesis::Applied::Checked(_)) {
            tokio::time::sleep(hold).await;
        }
        nemesis::heal(&mut c, applied).await?;
        let healed = now_us();
        // Recovered once a probe write invoked after healing succeeds.
        let deadline = Instant::now() + cfg.recovery_bound * 2;
        let mut recovered = None;
        while Instant::now() < deadline {
            recovered = rec
                .snapshot()
                .iter()
                .filter(|o| o.process == "prober" && o.invoked >= healed && o.is_ok())
                .filter_map(|o| o.completed)
                .min()
                .map(|t| t - healed);
            if recovered.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        faults.push(FaultEvent {
            kind: kind.to_string(),
            detail,
            start,
            healed: Some(healed),
            recovered_after_us: recovered,
            problems,
        });
        tokio::time::sleep(Duration::from_millis(300 + workload::next(&mut rng) % 700)).await;
    }

    // Stop the workload, heal, stop the nodes.
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    nemesis::heal_all(&mut c).await?;
    for n in &mut nodes {
        n.stop(Duration::from_secs(30));
    }
    let mut history = rec.take();
    for h in &node_histories {
        if h.exists() {
            history.extend(crate::simnode::load_history(h)?);
        }
    }

    // Read everything back.
    let mut finals: BTreeMap<Key, FinalState> = BTreeMap::new();
    let final_rec = Recorder::default();
    for k in &keys {
        let doors = doors_for(&c, &k.user, true)?;
        let r = workload::read(&doors, &final_rec, "final", k, 0, PATIENCE).await;
        let state = match r {
            Some(Some(s)) => Some((s.id, s.v, s.c, s.destroyed)),
            Some(None) => None,
            None => anyhow::bail!("the final read of {k} got no answer"),
        };
        finals.insert(k.clone(), state);
    }
    history.extend(final_rec.take());
    history.sort_by_key(|o| o.invoked);

    // Every replica's documents and digest, once they applied the same log.
    let mut placements: Vec<(String, Placements)> = Vec::new();
    let mut digests: Vec<(String, Option<(u64, String)>)> = Vec::new();
    let slots = c.running_slots();
    let converge_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        digests.clear();
        for s in &slots {
            let d = c.state_digest(*s, Duration::from_secs(5)).await?;
            digests.push((format!("slot-{s}"), d));
        }
        let indexes: std::collections::BTreeSet<Option<u64>> =
            digests.iter().map(|(_, d)| d.as_ref().map(|d| d.0)).collect();
        if indexes.len() == 1 || Instant::now() > converge_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    for s in &slots {
        let mut client = c.native(&c.replicas[s - 1].public, "admin")?;
        let mut p = Placements::new();
        for k in 1..=cfg.computers {
            let call = client.get_computer(pb::GetComputerRequest {
                computer_id: format!("COMP-{k}"),
            });
            // A replica that does not answer shows in the convergence check.
            let Ok(Ok(doc)) = tokio::time::timeout(Duration::from_secs(5), call).await else {
                tracing::warn!(slot = s, computer = k, "no computer document from this replica");
                continue;
            };
            let doc = doc.into_inner();
            for part in doc.partitions {
                let ids: Vec<String> = part.instance.iter().map(|i| i.id.clone()).collect();
                p.insert((doc.computer_id.clone(), part.id), ids);
            }
        }
        placements.push((format!("slot-{s}"), p));
    }

    let findings = vec![
        checker::coverage(&faults, cfg.min_events, !cfg.faults.is_empty()),
        checker::linearizability(&history, 2_000_000),
        checker::lost_writes(&history, &finals),
        checker::allocation(&history, &placements),
        checker::convergence(&digests),
        checker::recovery(&faults, cfg.recovery_bound.as_micros() as u64),
        checker::refusals(&faults),
        checker::drills(&faults),
    ];
    let ok = findings.iter().all(|f| f.ok);
    let end = now_us();
    let report = Report {
        seed: cfg.seed,
        replicas: cfg.replicas,
        mode: if cfg.docker_image.is_some() { "docker" } else { "netns" }.into(),
        duration_s: (end - origin) as f64 / 1e6,
        origin_us: origin,
        faults,
        skipped_faults: skipped,
        operations: report::count(&history),
        findings,
        ok,
        replay: format!(
            "chaos run --seed {} --replicas {} --duration {}s --min-events {}{}{}",
            cfg.seed,
            cfg.replicas,
            cfg.duration.as_secs(),
            cfg.min_events,
            if cfg.faults.is_empty() {
                String::new()
            } else {
                format!(" --faults {}", cfg.faults.join(","))
            },
            cfg.docker_image
                .as_deref()
                .map(|i| format!(" --docker {i}"))
                .unwrap_or_default()
        ),
    };
    report::write(&dir, &report, &history, end)?;
    c.shutdown();
    Ok(report)
}
