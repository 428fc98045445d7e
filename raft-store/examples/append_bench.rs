//! Append throughput of raft-store next to plain RocksDB synced writes.
//!
//! For 1, 16 and 256 concurrent writers, each appending one 256-byte entry at
//! a time and waiting until it is durable:
//! - raft-store: `LogStore::append_with` (group commit: one WAL sync covers
//!   every append waiting at that moment);
//! - raw: `DB::write_opt(WriteBatch, sync = true)` from as many threads
//!   (RocksDB's own write grouping shares one sync between them).
//!
//! Both write to directories under `--dir` (default: the system temp dir), on
//! the same disk, in the same run.
//!
//! ```text
//! cargo run -p raft-store --example append_bench -- --seconds 5 [--dir /var/tmp]
//! ```

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use raft_store::kv::{set_entry, KvEntry, KvTypes};
use raft_store::LogStore;
use rocksdb::{statistics::Ticker, Options, WriteBatch, WriteOptions, DB};

#[derive(Parser)]
struct Args {
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Where the databases are created (the disk being measured).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Writer counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    writers: Vec<usize>,
}

const ENTRY_BYTES: usize = 256;

struct Figures {
    writes_per_s: f64,
    syncs_per_s: f64,
}

fn entry(index: u64) -> KvEntry {
    // 256 bytes of value; the encoded entry adds a few bytes of framing.
    set_entry(1, index, String::new(), vec![0xab; ENTRY_BYTES])
}

fn bench_store(dir: &std::path::Path, writers: usize, secs: u64) -> Figures {
    let store = LogStore::<KvTypes>::open(dir).expect("open raft-store");
    let next = Arc::new(Mutex::new(1u64));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let stats = store.stats();
    let syncs_before = stats.syncs.load(Ordering::Relaxed);
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (store, next, stop, done) = (store.clone(), next.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let (tx, rx) = std::sync::mpsc::channel();
                while !stop.load(Ordering::Relaxed) {
                    {
                        // The index is taken and the entry written in log order.
                        let mut n = next.lock().unwrap();
                        let tx = tx.clone();
                        store
                            .append_with([entry(*n)], move |r| tx.send(r).unwrap())
                            .expect("append");
                        *n += 1;
                    }
                    rx.recv().unwrap().expect("sync");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    Figures {
        writes_per_s: done.load(Ordering::Relaxed) as f64 / elapsed,
        syncs_per_s: (stats.syncs.load(Ordering::Relaxed) - syncs_before) as f64 / elapsed,
    }
}

fn bench_raw(dir: &std::path::Path, writers: usize, secs: u64) -> Figures {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.enable_statistics();
    let db = Arc::new(DB::open(&opts, dir).expect("open raw RocksDB"));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let key = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|_| {
            let (db, stop, done, key) = (db.clone(), stop.clone(), done.clone(), key.clone());
            std::thread::spawn(move || {
                let mut sync = WriteOptions::default();
                sync.set_sync(true);
                let value = vec![0xab; ENTRY_BYTES];
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = WriteBatch::default();
                    batch.put(key.fetch_add(1, Ordering::Relaxed).to_be_bytes(), &value);
                    db.write_opt(batch, &sync).expect("write");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    Figures {
        writes_per_s: done.load(Ordering::Relaxed) as f64 / elapsed,
        syncs_per_s: opts.get_ticker_count(Ticker::WalFileSynced) as f64 / elapsed,
    }
}

fn main() {
    let args = Args::parse();
    let base = args.dir.clone().unwrap_or_else(std::env::temp_dir);
    println!(
        "append benchmark: {ENTRY_BYTES}-byte entries, {} s per point, databases under {}",
        args.seconds,
        base.display()
    );
    println!("| writers | raft-store appends/s | raft-store syncs/s | raw RocksDB writes/s | raw syncs/s | ratio |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &writers in &args.writers {
        let store_dir = tempfile::tempdir_in(&base).unwrap();
        let ours = bench_store(store_dir.path(), writers, args.seconds);
        let raw_dir = tempfile::tempdir_in(&base).unwrap();
        let raw = bench_raw(raw_dir.path(), writers, args.seconds);
        println!(
            "| {writers} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2}x |",
            ours.writes_per_s,
            ours.syncs_per_s,
            raw.writes_per_s,
            raw.syncs_per_s,
            ours.writes_per_s / raw.writes_per_s
        );
    }
}
