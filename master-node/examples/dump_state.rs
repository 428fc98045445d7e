//! Prints every record of a stopped replica's stored state with a short
//! hash, in key order: diff two replicas' output to see which entities
//! differ when their state digests do (the chaos suite's convergence check).
//!
//! ```text
//! cargo run -p master-node --example dump_state -- DATA_DIR > a.txt
//! ```

use sha2::Digest;

fn main() {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: dump_state DATA_DIR (of a stopped replica)");
        std::process::exit(2);
    };
    let (_log, sm) = match master_node::raft::open_store(std::path::Path::new(&dir)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dump_state: {e}");
            std::process::exit(1);
        }
    };
    let app = sm.app();
    let state = app.read().unwrap_or_else(|e| e.into_inner());
    println!(
        "last_index {} applied {} clock {}",
        state.last_index, state.applied, state.clock
    );
    let mut records = master_node::state::persist::all_records(&state);
    records.sort();
    for (k, v) in records {
        let key = String::from_utf8_lossy(&k).replace('\0', "|");
        println!("{key} {}", hex::encode(&sha2::Sha256::digest(&v)[..6]));
    }
}
