//! Crash tests: a child process writes to the store and reports what the store
//! acknowledged; the parent SIGKILLs it at random moments and, after every
//! kill, reopens the store and checks it.
//!
//! - The log: every acknowledged entry is there, the log has no holes, and it
//!   ends where one of the child's append batches ended (a batch is written
//!   whole or not at all, wherever the kill lands inside it). Votes are
//!   checked the same way.
//! - The state machine: applied in batches, written every 100 ms without a
//!   write-ahead log, with snapshots built as it goes; after a kill the
//!   records are exactly those of the applied id stored with them (never part
//!   of a batch), and at least what the last finished snapshot covered.
//!
//! The child is this same test binary, run with `crash_child` or
//! `state_crash_child` selected and `RAFT_STORE_CRASH_DIR` set.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::storage::RaftStateMachine;
use openraft::RaftSnapshotBuilder;
use raft_store::kv::{set_entry, KvApp, KvEntry, KvTypes, KvVote};
use raft_store::LogStore;
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 25;

fn value_of(index: u64) -> Vec<u8> {
    format!("value-{index}-{}", index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).into_bytes()
}

fn entry(index: u64) -> KvEntry {
    set_entry(1, index, format!("k{index}"), value_of(index))
}

/// Every entry is checkable from its index; one in 32 is large (16 KiB), so
/// some append batches take long enough for a kill to land inside them.
fn sized_entry(index: u64) -> KvEntry {
    let mut value = value_of(index);
    if index.is_multiple_of(32) {
        value.resize(16 << 10, (index % 251) as u8);
    }
    set_entry(1, index, format!("k{index}"), value)
}

/// Runs `child` (a test of this binary) in `dir` `rounds` times, SIGKILLs it
/// after a random delay in `alive_ms`, and hands what it printed to `check`
/// after each kill. Returns the seed (`CRASH_SEED` replays a run).
fn kill_rounds(
    child: &str,
    dir: &Path,
    rounds: usize,
    alive_ms: std::ops::Range<u64>,
    mut check: impl FnMut(usize, &[String]),
) -> u64 {
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{child}: seed {seed} (CRASH_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe().unwrap();
    for round in 0..rounds {
        let mut process = Command::new(&exe)
            .args([child, "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("RAFT_STORE_CRASH_DIR", dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = process.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(alive_ms.clone())));
        process.kill().expect("SIGKILL the child"); // Child::kill sends SIGKILL on Unix
        process.wait().unwrap();
        let lines = reader.join().unwrap();
        check(round, &lines);
    }
    seed
}

/// The numbers after `prefix` in the lines that hold it. Not only at the
/// start: libtest prints `test crash_child ... ` without a newline, so the
/// child's first line ends up after it (a round killed right after its
/// first batch then lost that batch's announcement, and the check saw a
/// complete batch as a partial one).
fn numbers<'a>(lines: &'a [String], prefix: &'a str) -> impl Iterator<Item = Vec<u64>> + 'a {
    lines.iter().filter_map(move |l| {
        let rest = &l[l.find(prefix)? + prefix.len()..];
        rest.split_whitespace().map(|n| n.parse().ok()).collect()
    })
}

/// The appender. Runs only inside the child process.
#[test]
#[ignore = "run by crash_test_sigkill as a child process"]
fn crash_child() {
    let Ok(dir) = std::env::var("RAFT_STORE_CRASH_DIR") else {
        return;
    };
    let store = LogStore::<KvTypes>::open(Path::new(&dir)).expect("child opens the store");
    let next = store
        .log_state()
        .expect("log state")
        .last_log_id
        .map(|l| l.index + 1)
        .unwrap_or(1);
    let next = Arc::new(Mutex::new(next));
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let store = store.clone();
        let next = next.clone();
        threads.push(std::thread::spawn(move || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(t);
            loop {
                let mut guard = next.lock().unwrap();
                let first = *guard;
                let n = rng.random_range(1..=48u64);
                *guard += n;
                {
                    // Announced before the append: the log may end there.
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "BATCH {first} {}", first + n - 1).unwrap();
                    out.flush().unwrap();
                }
                store
                    .append_with((first..first + n).map(sized_entry), move |result| {
                        result.expect("sync");
                        let mut out = std::io::stdout().lock();
                        for i in first..first + n {
                            writeln!(out, "ACK {i}").unwrap();
                        }
                        out.flush().unwrap();
                    })
                    .expect("append");
                drop(guard);
                std::thread::sleep(Duration::from_micros(rng.random_range(0..500)));
            }
        }));
    }
    // Votes, on this thread: each printed one has returned from a synced write.
    let mut term = store.vote().map(|v| v.leader_id.term).unwrap_or(0);
    loop {
        term += 1;
        store.write_vote(&KvVote::new(term, 1)).expect("save vote");
        let mut out = std::io::stdout().lock();
        writeln!(out, "VOTE {term}").unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
}

#[test]
fn crash_test_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut rounds_with_acks = 0;
    let mut total_acks = 0;
    let mut max_acked: Option<u64> = None;
    // Every batch ever announced: the log must end at one of their ends.
    let mut batch_ends = std::collections::BTreeSet::from([0u64]);
    let mut inside_a_batch = 0;
    kill_rounds("crash_child", dir.path(), ROUNDS, 40..400, |round, lines| {
        let acked: Vec<u64> = numbers(lines, "ACK ").map(|n| n[0]).collect();
        let voted: Option<u64> = numbers(lines, "VOTE ").map(|n| n[0]).max();
        let announced: Vec<(u64, u64)> = numbers(lines, "BATCH ").map(|n| (n[0], n[1])).collect();
        batch_ends.extend(announced.iter().map(|(_, last)| *last));
        if !acked.is_empty() {
            rounds_with_acks += 1;
        }
        total_acks += acked.len();
        max_acked = max_acked.max(acked.iter().copied().max());

        // Reopening checks every record and that there are no holes.
        let store = LogStore::<KvTypes>::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: store does not reopen after SIGKILL: {e}"));
        let entries = store.read_entries(..).unwrap();
        let last = entries.last().map(|e| e.log_id.index).unwrap_or(0);
        if let Some(max) = max_acked {
            assert!(
                last >= max,
                "round {round}: acknowledged entry {max} lost, log ends at {last}"
            );
        }
        assert!(
            batch_ends.contains(&last),
            "round {round}: the log ends at {last}, inside an append batch: a batch was written in part"
        );
        // The kill came after an announced batch that never reached the log
        // (or only reached it unacknowledged): it landed inside a batch.
        if announced
            .last()
            .is_some_and(|(_, end)| *end > acked.iter().copied().max().unwrap_or(0))
        {
            inside_a_batch += 1;
        }
        for (pos, e) in entries.iter().enumerate() {
            assert_eq!(e.log_id.index, pos as u64 + 1, "round {round}: log has a hole");
            assert_eq!(
                e,
                &sized_entry(e.log_id.index),
                "round {round}: entry {} altered",
                e.log_id.index
            );
        }
        for i in &acked {
            assert!(
                (*i as usize) <= entries.len(),
                "round {round}: acknowledged entry {i} missing"
            );
        }
        if let Some(v) = voted {
            let stored = store.vote().map(|v| v.leader_id.term).unwrap_or(0);
            assert!(
                stored >= v,
                "round {round}: acknowledged vote of term {v} lost (stored {stored})"
            );
        }
    });
    eprintln!(
        "crash test: {ROUNDS} SIGKILLs ({inside_a_batch} with a batch in flight), {total_acks} acknowledged entries checked, log ends at {:?}",
        max_acked
    );
    assert!(
        rounds_with_acks >= ROUNDS / 2,
        "the child acknowledged appends in only {rounds_with_acks} of {ROUNDS} rounds: the test did not exercise the store"
    );
    assert!(
        inside_a_batch >= ROUNDS / 2,
        "only {inside_a_batch} of {ROUNDS} kills landed with a batch in flight: the test did not exercise partial batches"
    );
}

/// The applier. Runs only inside the child process: applies entries in
/// batches of up to 500 and builds a snapshot every few batches, printing
/// `SNAP i` once a snapshot covering entry `i` is built.
#[test]
#[ignore = "run by state_crash_test_sigkill as a child process"]
fn state_crash_child() {
    let Ok(dir) = std::env::var("RAFT_STORE_CRASH_DIR") else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let (_, mut sm) = raft_store::open::<KvTypes, KvApp>(Path::new(&dir)).expect("child opens the store");
        let mut next = sm.applied_state().await.unwrap().0.map(|l| l.index + 1).unwrap_or(1);
        let mut rng = rand::rngs::StdRng::seed_from_u64(next);
        for batch in 0u64.. {
            let n = rng.random_range(1..=500u64);
            sm.apply_entries((next..next + n).map(entry)).expect("apply");
            next += n;
            if batch % 8 == 7 {
                let snap = sm
                    .get_snapshot_builder()
                    .await
                    .build_snapshot()
                    .await
                    .expect("snapshot");
                let covered = snap.meta.last_log_id.map(|l| l.index).unwrap_or(0);
                let mut out = std::io::stdout().lock();
                writeln!(out, "SNAP {covered}").unwrap();
                out.flush().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
        }
    });
}

#[test]
fn state_crash_test_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let mut snapshotted = 0u64;
    let mut applied_seen = Vec::new();
    kill_rounds("state_crash_child", dir.path(), 12, 100..1500, |round, lines| {
        snapshotted = snapshotted.max(numbers(lines, "SNAP ").map(|n| n[0]).max().unwrap_or(0));
        let (_, mut sm) = raft_store::open::<KvTypes, KvApp>(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: state does not reopen after SIGKILL: {e}"));
        let applied = runtime
            .block_on(sm.applied_state())
            .unwrap()
            .0
            .map(|l| l.index)
            .unwrap_or(0);
        assert!(
            applied >= snapshotted,
            "round {round}: the state is back at {applied}, before the snapshot of {snapshotted} it had built"
        );
        let app = sm.app();
        let app = app.read().unwrap();
        assert_eq!(
            app.data.len() as u64,
            applied,
            "round {round}: records do not match the applied id {applied}: part of a batch was kept or lost"
        );
        for i in 1..=applied {
            assert_eq!(
                app.data.get(&format!("k{i}")),
                Some(&value_of(i)),
                "round {round}: record k{i} wrong at applied id {applied}"
            );
        }
        applied_seen.push(applied);
    });
    eprintln!("state crash test: applied ids after each kill {applied_seen:?}, last snapshot {snapshotted}");
    assert!(
        snapshotted > 0 && applied_seen.iter().filter(|a| **a > 0).count() >= 6,
        "the child kept too little for the test to mean anything: {applied_seen:?}"
    );
}
