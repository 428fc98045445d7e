//! Crash test: a child process appends entries and reports each one the store
//! acknowledged as durable; the parent SIGKILLs it at random moments and, after
//! every kill, checks that every acknowledged entry is there and that the log
//! has no holes. Votes are checked the same way.
//!
//! The child is this same test binary, run with `crash_child` selected and
//! `RAFT_STORE_CRASH_DIR` set.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};
use raft_store::kv::{KvCommand, KvTypes};
use raft_store::LogStore;
use rand::{Rng, SeedableRng};

const ROUNDS: usize = 25;

fn value_of(index: u64) -> Vec<u8> {
    format!("value-{index}-{}", index.wrapping_mul(0x9E37_79B9_7F4A_7C15)).into_bytes()
}

fn entry(index: u64) -> Entry<KvTypes> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
        payload: EntryPayload::Normal(KvCommand::Set {
            key: format!("k{index}"),
            value: value_of(index),
        }),
    }
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
                let n = rng.random_range(1..=8u64);
                *guard += n;
                store
                    .append_with((first..first + n).map(entry), move |result| {
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
    let mut term = store.vote().expect("vote").map(|v| v.leader_id.term).unwrap_or(0);
    loop {
        term += 1;
        store.write_vote(&Vote::new(term, 1)).expect("save vote");
        let mut out = std::io::stdout().lock();
        writeln!(out, "VOTE {term}").unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
}

#[test]
fn crash_test_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let seed: u64 = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash test seed {seed} (CRASH_SEED={seed} replays it)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let exe = std::env::current_exe().unwrap();
    let mut rounds_with_acks = 0;
    let mut total_acks = 0;
    let mut max_acked: Option<u64> = None;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["crash_child", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
            .env("RAFT_STORE_CRASH_DIR", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .collect::<Vec<String>>()
        });
        std::thread::sleep(Duration::from_millis(rng.random_range(40..400)));
        child.kill().expect("SIGKILL the child"); // Child::kill sends SIGKILL on Unix
        child.wait().unwrap();
        let lines = reader.join().unwrap();

        let acked: Vec<u64> = lines
            .iter()
            .filter_map(|l| l.strip_prefix("ACK ")?.parse().ok())
            .collect();
        let voted: Option<u64> = lines.iter().filter_map(|l| l.strip_prefix("VOTE ")?.parse().ok()).max();
        if !acked.is_empty() {
            rounds_with_acks += 1;
        }
        total_acks += acked.len();
        max_acked = max_acked.max(acked.iter().copied().max());

        // Reopening checks every record and that there are no holes.
        let store = LogStore::<KvTypes>::open(dir.path())
            .unwrap_or_else(|e| panic!("round {round}: store does not reopen after SIGKILL: {e}"));
        let entries = store.read_entries(..).unwrap();
        if let Some(max) = max_acked {
            let last = entries.last().map(|e| e.log_id.index).unwrap_or(0);
            assert!(
                last >= max,
                "round {round}: acknowledged entry {max} lost, log ends at {last}"
            );
        }
        for (pos, e) in entries.iter().enumerate() {
            assert_eq!(e.log_id.index, pos as u64 + 1, "round {round}: log has a hole");
            assert_eq!(
                e,
                &entry(e.log_id.index),
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
            let stored = store.vote().unwrap().map(|v| v.leader_id.term).unwrap_or(0);
            assert!(
                stored >= v,
                "round {round}: acknowledged vote of term {v} lost (stored {stored})"
            );
        }
    }
    eprintln!(
        "crash test: {ROUNDS} SIGKILLs, {total_acks} acknowledged entries checked, log ends at {:?}",
        max_acked
    );
    assert!(
        rounds_with_acks >= ROUNDS / 2,
        "the child acknowledged appends in only {rounds_with_acks} of {ROUNDS} rounds: the test did not exercise the store"
    );
}
