//! The checkers: what must hold of a run, whatever the faults.
//!
//! - [`linear`]: each instance's history is linearizable;
//! - [`lost_writes`]: every acknowledged write is in the final state unless
//!   a later operation on the same instance replaced it;
//! - [`allocation`]: no instance on two partitions, no partition holding
//!   two instances at once (from the answers seen and the final documents);
//! - [`convergence`]: after healing, every replica applied the same log to
//!   the same state (same applied index, same state digest);
//! - [`recovery`]: after each fault heals, a write succeeds within a bound.
//!
//! Each is a pure function of the recorded history and final observations,
//! tested on synthetic histories holding the anomaly it must catch.

pub mod linear;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::history::{Call, FaultEvent, Key, Op, Outcome};

/// One checker's result.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    pub checker: &'static str,
    pub ok: bool,
    /// What was checked, or what went wrong (first problems first).
    pub details: Vec<String>,
}

impl Finding {
    fn new(checker: &'static str, problems: Vec<String>, summary: String) -> Finding {
        Finding {
            checker,
            ok: problems.is_empty(),
            details: if problems.is_empty() { vec![summary] } else { problems },
        }
    }
}

fn by_key(history: &[Op]) -> BTreeMap<&Key, Vec<Op>> {
    let mut keys: BTreeMap<&Key, Vec<Op>> = BTreeMap::new();
    for op in history {
        if let Some(k) = &op.key {
            keys.entry(k).or_default().push(op.clone());
        }
    }
    keys
}

/// Every key's history is linearizable.
pub fn linearizability(history: &[Op], max_configurations: usize) -> Finding {
    let mut problems = Vec::new();
    let keys = by_key(history);
    for (key, ops) in &keys {
        match linear::check(ops, max_configurations) {
            linear::Verdict::Linearizable => {}
            linear::Verdict::Violation { longest_prefix } => problems.push(format!(
                "{key}: not linearizable ({} operations; the longest valid order covers {})",
                ops.len(),
                longest_prefix.len()
            )),
            linear::Verdict::Inconclusive { explored } => problems.push(format!(
                "{key}: search gave up after {explored} configurations (treated as a failure)"
            )),
        }
    }
    let total: usize = keys.values().map(Vec::len).sum();
    Finding::new(
        "linearizable",
        problems,
        format!("{} keys, {total} operations: every history linearizable", keys.len()),
    )
}

/// What the final read of a key showed: the instance's id, `v`, `c` and
/// whether it is requested destroyed; `None` if absent.
pub type FinalState = Option<(String, Option<u64>, Option<String>, bool)>;

/// Acknowledged writes are present at the end, unless replaced by an
/// operation invoked after they were acknowledged.
pub fn lost_writes(history: &[Op], finals: &BTreeMap<Key, FinalState>) -> Finding {
    let mut problems = Vec::new();
    let mut checked = 0;
    for (key, ops) in by_key(history) {
        let Some(fin) = finals.get(key) else {
            problems.push(format!("{key}: no final read"));
            continue;
        };
        // Operations that change the key, by invocation time.
        let writes: Vec<&Op> = ops
            .iter()
            .filter(|o| !matches!(o.call, Call::Read | Call::Other { .. }))
            .filter(|o| !matches!(o.outcome, Outcome::Fail { .. }))
            .collect();
        for w in writes.iter().filter(|w| w.is_ok()) {
            let acked = w.completed.unwrap_or(u64::MAX);
            // Replaced by something invoked after this was acknowledged?
            let replaced = writes.iter().any(|o| o.invoked > acked && replaces(&o.call, &w.call));
            if replaced {
                continue;
            }
            checked += 1;
            let lost = match (&w.call, fin) {
                (Call::Request { v }, Some((_, fv, _, _))) => *fv != Some(*v),
                (Call::Request { .. }, None) => true,
                (Call::Destroy, Some((_, _, _, destroyed))) => !destroyed,
                (Call::Destroy, None) => false,
                (Call::Publish { id, c }, Some((fid, _, fc, _))) => fid == id && fc.as_ref() != Some(c),
                (Call::Publish { .. }, None) => false,
                (Call::Freed { id }, Some((fid, ..))) => {
                    fid == id && !matches!(w.outcome, Outcome::Ok { no_effect: true, .. })
                }
                (Call::Freed { .. }, None) => false,
                _ => false,
            };
            if lost {
                problems.push(format!(
                    "{key}: acknowledged {:?} (by {} at {} us) is not in the final state {fin:?}",
                    w.call, w.process, acked
                ));
            }
        }
    }
    Finding::new(
        "acknowledged writes present",
        problems,
        format!("{checked} last acknowledged writes found in the final state"),
    )
}

/// Whether `later` may undo what `earlier` wrote (so `earlier` need not be
/// in the final state).
fn replaces(later: &Call, earlier: &Call) -> bool {
    matches!(
        (earlier, later),
        (Call::Request { .. }, Call::Request { .. } | Call::Freed { .. })
            | (Call::Destroy, Call::Request { .. } | Call::Freed { .. })
            | (Call::Publish { .. }, Call::Publish { .. } | Call::Freed { .. })
            | (Call::Freed { .. }, Call::Request { .. })
    )
}

/// Where the final state places instances: (computer, partition) -> instance
/// ids, as each replica's documents show them.
pub type Placements = BTreeMap<(String, String), Vec<String>>;

/// No instance on two partitions; no partition holding two instances, in
/// the final documents of any replica or at any time in the answers seen.
pub fn allocation(history: &[Op], finals: &[(String, Placements)]) -> Finding {
    let mut problems = Vec::new();
    // From the answers: an instance id is always seen on the same partition.
    let mut partition_of: BTreeMap<&str, &(String, String)> = BTreeMap::new();
    // And a partition's tenants: when each was first seen placed there, and
    // when its freeing was first attempted.
    let mut first_seen: BTreeMap<(&(String, String), &str), u64> = BTreeMap::new();
    let mut freed_from: BTreeMap<&str, u64> = BTreeMap::new();
    for op in history {
        if let (Call::Freed { id }, false) = (&op.call, matches!(op.outcome, Outcome::Fail { .. })) {
            let t = freed_from.entry(id.as_str()).or_insert(op.invoked);
            *t = (*t).min(op.invoked);
        }
        let Outcome::Ok { seen: Some(s), .. } = &op.outcome else {
            continue;
        };
        let Some(p) = &s.partition else { continue };
        match partition_of.get(s.id.as_str()) {
            Some(q) if *q != p => problems.push(format!(
                "instance {} seen on {}/{} and on {}/{}",
                s.id, q.0, q.1, p.0, p.1
            )),
            _ => {
                partition_of.insert(&s.id, p);
            }
        }
        let t = first_seen.entry((p, s.id.as_str())).or_insert(u64::MAX);
        *t = (*t).min(op.completed.unwrap_or(u64::MAX));
    }
    let mut tenants: BTreeMap<&(String, String), Vec<(&str, u64)>> = BTreeMap::new();
    for ((p, id), t) in &first_seen {
        tenants.entry(p).or_default().push((id, *t));
    }
    for (p, list) in &tenants {
        for (a, _) in list {
            for (b, b_seen) in list {
                // b was seen placed on p before anyone even tried to free a.
                if a != b && *b_seen < freed_from.get(a).copied().unwrap_or(u64::MAX) && {
                    let a_seen = first_seen[&(*p, *a)];
                    a_seen < *b_seen
                } {
                    problems.push(format!(
                        "partition {}/{} held {a} and {b} at once ({b} seen there before {a} was freed)",
                        p.0, p.1
                    ));
                }
            }
        }
    }
    for (replica, placements) in finals {
        let mut seen_on: BTreeMap<&str, &(String, String)> = BTreeMap::new();
        for (p, ids) in placements {
            if ids.len() > 1 {
                problems.push(format!("replica {replica}: partition {}/{} holds {ids:?}", p.0, p.1));
            }
            for id in ids {
                if let Some(q) = seen_on.insert(id, p) {
                    problems.push(format!(
                        "replica {replica}: instance {id} on {}/{} and {}/{}",
                        q.0, q.1, p.0, p.1
                    ));
                }
            }
        }
    }
    Finding::new(
        "allocation",
        problems,
        format!(
            "{} instances seen placed, {} final documents: no double allocation",
            partition_of.len(),
            finals.len()
        ),
    )
}

/// Each replica's (applied index, state digest) after healing.
pub fn convergence(digests: &[(String, Option<(u64, String)>)]) -> Finding {
    let mut problems = Vec::new();
    let distinct: BTreeSet<&(u64, String)> = digests.iter().filter_map(|(_, d)| d.as_ref()).collect();
    for (replica, d) in digests {
        if d.is_none() {
            problems.push(format!("replica {replica} did not answer with its state digest"));
        }
    }
    if distinct.len() > 1 {
        problems.push(format!(
            "replicas diverge: {}",
            digests
                .iter()
                .map(|(r, d)| match d {
                    Some((i, h)) => format!("{r} at {i}: {}", &h[..h.len().min(12)]),
                    None => format!("{r}: none"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let summary = match distinct.iter().next() {
        Some((i, h)) => format!(
            "{} replicas at applied index {i}, state {}",
            digests.len(),
            &h[..h.len().min(16)]
        ),
        None => "no replica answered".into(),
    };
    Finding::new("converged", problems, summary)
}

/// The run injected what it promised: at least `min_events` faults, among
/// them kills, pauses and partitions (unless `kinds` restricted them).
pub fn coverage(faults: &[FaultEvent], min_events: usize, restricted: bool) -> Finding {
    let mut problems = Vec::new();
    if faults.len() < min_events {
        problems.push(format!("only {} faults injected, {min_events} required", faults.len()));
    }
    let classes: BTreeSet<&str> = faults.iter().map(|f| crate::nemesis::class(&f.kind)).collect();
    if !restricted {
        for needed in ["kill", "pause", "partition"] {
            if !classes.contains(needed) {
                problems.push(format!("no {needed} fault was injected"));
            }
        }
    }
    Finding::new(
        "faults injected",
        problems,
        format!(
            "{} faults of {} classes: {}",
            faults.len(),
            classes.len(),
            classes.into_iter().collect::<Vec<_>>().join(", ")
        ),
    )
}

/// Every operator's drill held: each backup restored into a new cluster
/// holding what it held, each rolling upgrade ended with every replica on
/// this build and the cluster's version raised.
pub fn drills(faults: &[FaultEvent]) -> Finding {
    let drills: Vec<&FaultEvent> = faults
        .iter()
        .filter(|f| f.kind == "backup-restore" || f.kind == "rolling-upgrade")
        .collect();
    let problems: Vec<String> = drills
        .iter()
        .flat_map(|f| f.problems.iter().map(move |p| format!("{}: {p}", f.kind)))
        .collect();
    let count = |kind: &str| drills.iter().filter(|f| f.kind == kind).count();
    Finding::new(
        "operator drills",
        problems,
        format!(
            "{} backups taken under load, each restored into a new cluster holding the same state; \
             {} rolling upgrades or restarts, each ending with every replica on this build",
            count("backup-restore"),
            count("rolling-upgrade")
        ),
    )
}

/// Every bad call of an abuse burst got its refusal, and no burst moved
/// the term.
pub fn refusals(faults: &[FaultEvent]) -> Finding {
    let bursts: Vec<&FaultEvent> = faults.iter().filter(|f| f.kind == "abuse").collect();
    let problems: Vec<String> = bursts.iter().flat_map(|f| f.problems.iter().cloned()).collect();
    Finding::new(
        "bad calls refused",
        problems,
        format!(
            "{} abuse bursts, every call refused with its status, no term change",
            bursts.len()
        ),
    )
}

/// After each healed fault, a write succeeded within `bound_us`.
pub fn recovery(faults: &[FaultEvent], bound_us: u64) -> Finding {
    let mut problems = Vec::new();
    let mut times: Vec<u64> = Vec::new();
    for f in faults.iter().filter(|f| f.healed.is_some()) {
        match f.recovered_after_us {
            Some(t) if t <= bound_us => times.push(t),
            Some(t) => {
                times.push(t);
                problems.push(format!(
                    "after {} ({}) healed, the first write took {:.2} s (bound {:.1} s)",
                    f.kind,
                    f.detail,
                    t as f64 / 1e6,
                    bound_us as f64 / 1e6
                ));
            }
            None => problems.push(format!("after {} ({}) healed, no write succeeded", f.kind, f.detail)),
        }
    }
    times.sort_unstable();
    let q = |p: f64| {
        times
            .get(((times.len() as f64 - 1.0) * p).round() as usize)
            .map(|t| *t as f64 / 1e6)
            .unwrap_or(0.0)
    };
    Finding::new(
        "recovers",
        problems,
        format!(
            "{} healed faults: first write after healing p50 {:.2} s, p90 {:.2} s, max {:.2} s",
            times.len(),
            q(0.5),
            q(0.9),
            q(1.0)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::Seen;

    fn key() -> Key {
        Key {
            user: "u".into(),
            title: "k".into(),
        }
    }

    fn op(call: Call, invoked: u64, completed: u64, seen: Option<Seen>) -> Op {
        Op {
            process: "t".into(),
            key: Some(key()),
            call,
            invoked,
            completed: Some(completed),
            outcome: Outcome::Ok { seen, no_effect: false },
            via: String::new(),
        }
    }

    fn placed(id: &str, v: u64, p: &str) -> Option<Seen> {
        Some(Seen {
            id: id.into(),
            v: Some(v),
            c: None,
            destroyed: false,
            partition: Some(("COMP-1".into(), p.into())),
        })
    }

    #[test]
    fn a_lost_write_is_caught() {
        let h = vec![
            op(Call::Request { v: 1 }, 0, 10, placed("I1", 1, "p0")),
            op(Call::Request { v: 2 }, 20, 30, placed("I1", 2, "p0")),
        ];
        let mut finals = BTreeMap::new();
        finals.insert(key(), Some(("I1".to_string(), Some(1), None, false)));
        assert!(!lost_writes(&h, &finals).ok, "v=2 was acknowledged, the end shows v=1");
        finals.insert(key(), Some(("I1".to_string(), Some(2), None, false)));
        assert!(lost_writes(&h, &finals).ok);
    }

    #[test]
    fn a_double_allocation_is_caught() {
        // Two instances seen on the same partition, neither freed.
        let mut h = vec![
            op(Call::Request { v: 1 }, 0, 10, placed("I1", 1, "p0")),
            op(Call::Request { v: 1 }, 20, 30, placed("I2", 1, "p0")),
        ];
        h[1].key = Some(Key {
            user: "u".into(),
            title: "other".into(),
        });
        assert!(!allocation(&h, &[]).ok);
        // The same after the first was freed: fine.
        let mut freed = op(Call::Freed { id: "I1".into() }, 12, 15, None);
        freed.key = Some(key());
        let ok_history = vec![h[0].clone(), freed, h[1].clone()];
        assert!(allocation(&ok_history, &[]).ok);
        // One instance on two partitions.
        let moved = vec![
            op(Call::Request { v: 1 }, 0, 10, placed("I1", 1, "p0")),
            op(Call::Read, 20, 30, placed("I1", 1, "p1")),
        ];
        assert!(!allocation(&moved, &[]).ok);
        // A final document with two instances on one partition.
        let mut bad = Placements::new();
        bad.insert(("COMP-1".into(), "p0".into()), vec!["I1".into(), "I2".into()]);
        assert!(!allocation(&[], &[("r1".into(), bad)]).ok);
    }

    #[test]
    fn divergence_is_caught() {
        let same = vec![
            ("r1".to_string(), Some((10, "aa".to_string()))),
            ("r2".to_string(), Some((10, "aa".to_string()))),
        ];
        assert!(convergence(&same).ok);
        let diverged = vec![
            ("r1".to_string(), Some((10, "aa".to_string()))),
            ("r2".to_string(), Some((10, "bb".to_string()))),
        ];
        assert!(!convergence(&diverged).ok);
        let silent = vec![
            ("r1".to_string(), Some((10, "aa".to_string()))),
            ("r2".to_string(), None),
        ];
        assert!(!convergence(&silent).ok);
    }

    #[test]
    fn slow_recovery_is_caught() {
        let f = |t: Option<u64>| FaultEvent {
            kind: "kill".into(),
            detail: "leader".into(),
            start: 0,
            healed: Some(1),
            recovered_after_us: t,
            problems: Vec::new(),
        };
        assert!(recovery(&[f(Some(500_000))], 5_000_000).ok);
        assert!(!recovery(&[f(Some(9_000_000))], 5_000_000).ok);
        assert!(!recovery(&[f(None)], 5_000_000).ok);
    }

    #[test]
    fn too_few_or_too_narrow_faults_are_caught() {
        let f = |kind: &str| FaultEvent {
            kind: kind.into(),
            detail: String::new(),
            start: 0,
            healed: Some(1),
            recovered_after_us: Some(1),
            problems: Vec::new(),
        };
        let all = [f("kill-leader"), f("pause-follower"), f("isolate")];
        assert!(coverage(&all, 3, false).ok);
        assert!(!coverage(&all, 4, false).ok, "fewer than asked");
        assert!(!coverage(&[f("kill-leader"), f("isolate")], 2, false).ok, "no pause");
        assert!(
            coverage(&[f("delay")], 1, true).ok,
            "a restricted run checks only the count"
        );
    }

    #[test]
    fn a_bad_call_answered_wrongly_fails_the_refusal_checker() {
        let burst = |problems: Vec<String>| FaultEvent {
            kind: "abuse".into(),
            detail: String::new(),
            start: 0,
            healed: Some(1),
            recovered_after_us: Some(1),
            problems,
        };
        assert!(refusals(&[burst(vec![])]).ok);
        let wrong = refusals(&[burst(vec![]), burst(vec!["gw: a 3 MiB body: 200".into()])]);
        assert!(!wrong.ok);
        assert_eq!(wrong.details, vec!["gw: a 3 MiB body: 200".to_string()]);
    }

    #[test]
    fn a_restore_that_differs_fails_the_drill_checker() {
        let drill = |problems: Vec<String>| FaultEvent {
            kind: "backup-restore".into(),
            detail: String::new(),
            start: 0,
            healed: Some(1),
            recovered_after_us: Some(1),
            problems,
        };
        assert!(drills(&[drill(vec![])]).ok);
        let differs = drills(&[drill(vec!["instances differ".into()]), drill(vec![])]);
        assert!(!differs.ok);
        assert_eq!(differs.details, vec!["backup-restore: instances differ".to_string()]);
    }

    #[test]
    fn a_stale_read_fails_the_linearizability_checker() {
        let h = vec![
            op(Call::Request { v: 1 }, 0, 10, placed("I1", 1, "p0")),
            op(Call::Request { v: 2 }, 20, 30, placed("I1", 2, "p0")),
            op(Call::Read, 40, 50, placed("I1", 1, "p0")),
        ];
        assert!(!linearizability(&h, 100_000).ok);
        assert!(linearizability(&h[..2], 100_000).ok);
    }
}
