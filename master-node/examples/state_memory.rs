//! What the Master's state costs in memory, entity by entity: it restores a
//! stopped replica's state (as a restart does) under a counting allocator,
//! then drops the state's parts one at a time and prints what each freed,
//! in all and per entity. The fleet simulator leaves data dirs to point it
//! at (`chaos fleet --out DIR` keeps `DIR/replica-N`).
//!
//! ```text
//! cargo run -p master-node --example state_memory -- DATA_DIR
//! ```
//!
//! Bytes are what the state asked the allocator for (the allocator's own
//! rounding and RocksDB's C++ memory are not counted): the part of a
//! replica's RSS that grows with the fleet.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicI64, Ordering};

/// The system allocator, counting the bytes live.
struct Counting;

static LIVE: AtomicI64 = AtomicI64::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> i64 {
    LIVE.load(Ordering::Relaxed)
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: state_memory DATA_DIR (of a stopped replica)");
        std::process::exit(2);
    };
    let before = live();
    let started = std::time::Instant::now();
    let (log, sm) = match master_node::raft::open_store(std::path::Path::new(&dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("state_memory: {e}");
            std::process::exit(1);
        }
    };
    drop(log);
    let app = sm.app();
    let mut state = app.write().unwrap_or_else(|e| e.into_inner());
    let whole = live() - before;
    println!(
        "{dir}: state restored in {:.1} s, {:.1} MiB (applied {}, last index {})",
        started.elapsed().as_secs_f64(),
        mib(whole),
        state.applied,
        state.last_index
    );
    println!("{:<36} {:>10} {:>10} {:>12}", "part", "count", "MiB", "bytes each");
    let mut freed_total = 0;
    let mut part = |name: &str, count: usize, drop_it: &mut dyn FnMut()| {
        let at = live();
        drop_it();
        let freed = at - live();
        freed_total += freed;
        let each = if count > 0 { freed / count as i64 } else { 0 };
        println!("{name:<36} {count:>10} {:>10.1} {each:>12}", mib(freed));
    };
    // Replies kept for retries may hold instances: dropped first, so the
    // instances' own figure is theirs.
    let n = state.sessions.len();
    part("sessions (replies kept for retries)", n, &mut || {
        drop(std::mem::take(&mut state.sessions))
    });
    let n = state.ledger.movements.len();
    part("ledger movements", n, &mut || {
        drop(std::mem::take(&mut state.ledger.movements))
    });
    let n = state.ledger.spans.len();
    part("ledger hosting spans", n, &mut || {
        drop(std::mem::take(&mut state.ledger.spans))
    });
    let n = state.ledger.journals.len();
    part("ledger journals booked", n, &mut || {
        drop(std::mem::take(&mut state.ledger.journals))
    });
    let n = state.certificates.len();
    part("certificates", n, &mut || drop(std::mem::take(&mut state.certificates)));
    let n = state.instances.len();
    part("instances", n, &mut || drop(std::mem::take(&mut state.instances)));
    let n = state.partitions.len();
    part("partitions", n, &mut || drop(std::mem::take(&mut state.partitions)));
    let n = state.computers.len();
    part("computers", n, &mut || drop(std::mem::take(&mut state.computers)));
    let n = state.installations.len();
    part("software installations", n, &mut || {
        drop(std::mem::take(&mut state.installations))
    });
    let n = state.registrations.len();
    part("registrations", n, &mut || {
        drop(std::mem::take(&mut state.registrations))
    });
    part("indexes derived at restore, the rest", 0, &mut || {
        *state = master_node::state::Master::default();
    });
    println!("{:<36} {:>10} {:>10.1}", "total", "", mib(freed_total));
    println!(
        "(still live with the state dropped: {:.1} MiB, the stores' handles and buffers)",
        mib(live() - before)
    );
}
