//! The crates' module layers, checked from the sources.
//!
//! master-node's modules are ordered from the core to the process
//! assembly ([`MASTER_NODE_LAYERS`]); a module may use only modules listed
//! before it. Every other crate's modules must not import each other in a
//! circle. An import is any `crate::m` path outside a comment (and
//! `super::m` in a file at the crate's root, which means the same). A new
//! module fails this test until it is given its place in the order.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// master-node's modules, lowest first: what each may import is above it
/// in this list.
const MASTER_NODE_LAYERS: &[&str] = &[
    // The SlapOS state machine: pure, no I/O.
    "state",
    // Core pieces on the state: identities, certificates, API types, usage.
    "identity",
    "pki",
    "api",
    "accounting",
    "counters",
    // A backup file of the state.
    "backup",
    // The cluster port's TLS and its client.
    "client_certs",
    "cluster_tls",
    "client",
    "founding",
    // Raft: types, storage glue, transport.
    "raft",
    // Restoring a backup into a new cluster, forcing a survivor alone.
    "recovery",
    // Who waits for which computer's document (owned by the replica).
    "revisions",
    // The replica handle: write, read, forward, batching.
    "replica",
    // Built on the handle: membership, authorization, certificates.
    "membership",
    "authz",
    "certificates",
    "renewal",
    "versions",
    // Handlers, each knowing nothing of how it is mounted.
    "slap",
    "native",
    "dashboard",
    "metrics",
    "cluster_service",
    // The process assembly.
    "server",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The Rust files of the crate root `src`, leaving out `src/bin/` (each
/// binary there is a crate of its own).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "bin") && path.parent().is_some_and(|p| p.ends_with("src")) {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a source file belongs to (`None` for the crate roots).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_string_lossy().into_owned();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(m) => Some(m.to_string()),
        None => Some(first),
    }
}

/// The crate's modules each file's code names (`crate::m`, and `super::m`
/// at the crate's root), comments left out.
fn imports(src: &Path, file: &Path) -> BTreeSet<String> {
    let at_root = file.parent() == Some(src);
    let text = std::fs::read_to_string(file).unwrap();
    let mut found = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut prefixes = vec!["crate::"];
        if at_root {
            prefixes.push("super::");
        }
        for prefix in prefixes {
            let mut rest = code;
            while let Some(at) = rest.find(prefix) {
                let after = &rest[at + prefix.len()..];
                let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                if !name.is_empty() {
                    found.insert(name);
                }
                rest = after;
            }
        }
    }
    found
}

/// Module -> modules it imports, for the crate rooted in `src`.
fn graph(src: &Path) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let dir = src.parent().unwrap();
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(src, f)).collect();
    let mut edges: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    for file in &files {
        let Some(from) = module_of(src, file) else { continue };
        for to in imports(src, file) {
            if to != from && modules.contains(&to) {
                let shown = file.strip_prefix(dir).unwrap().display().to_string();
                edges
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .push(shown);
            }
        }
    }
    edges
}

/// A circle among the modules, if any: the modules on it, in order.
fn circle(edges: &BTreeMap<String, BTreeMap<String, Vec<String>>>) -> Option<Vec<String>> {
    fn visit(
        m: &str,
        edges: &BTreeMap<String, BTreeMap<String, Vec<String>>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|p| p == m) {
            let mut found = path[at..].to_vec();
            found.push(m.to_string());
            return Some(found);
        }
        if done.contains(m) {
            return None;
        }
        path.push(m.to_string());
        for next in edges.get(m).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    edges.keys().find_map(|m| visit(m, edges, &mut Vec::new(), &mut done))
}

#[test]
fn master_node_modules_import_only_lower_layers() {
    let src = workspace().join("master-node/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let unplaced: Vec<&String> = modules
        .iter()
        .filter(|m| !MASTER_NODE_LAYERS.contains(&m.as_str()))
        .collect();
    assert!(
        unplaced.is_empty(),
        "modules without a place in MASTER_NODE_LAYERS: {unplaced:?}"
    );
    let rank = |m: &str| MASTER_NODE_LAYERS.iter().position(|l| *l == m).unwrap();
    let mut wrong = Vec::new();
    for (from, tos) in graph(&src) {
        for (to, files) in tos {
            if rank(&to) > rank(&from) {
                wrong.push(format!("{from} imports {to}, a higher layer ({})", files.join(", ")));
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layers:\n{}", wrong.join("\n"));
}

#[test]
fn no_crate_has_an_import_circle() {
    let crates = [
        "raft-store",
        "master-node",
        "slap-proto",
        "slap-gateway",
        "nodeagent",
        "slapctl",
        "chaos",
    ];
    for name in crates {
        let src = workspace().join(name).join("src");
        // The library (or the binary at src/main.rs), then each binary of src/bin/.
        let mut roots = vec![src.clone()];
        if let Ok(bins) = std::fs::read_dir(src.join("bin")) {
            roots.extend(bins.map(|b| b.unwrap().path()).filter(|p| p.is_dir()));
        }
        for root in roots {
            if let Some(c) = circle(&graph(&root)) {
                panic!(
                    "{}: modules import each other in a circle: {}",
                    root.display(),
                    c.join(" -> ")
                );
            }
        }
    }
}

#[test]
fn the_check_sees_a_circle_and_a_layer_breach() {
    let mut edges: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    edges.entry("a".into()).or_default().insert("b".into(), vec![]);
    assert_eq!(circle(&edges), None);
    edges.entry("b".into()).or_default().insert("a".into(), vec![]);
    assert_eq!(circle(&edges), Some(vec!["a".to_string(), "b".into(), "a".into()]));
    let src = workspace().join("master-node/src");
    let found = imports(&src, &src.join("replica.rs"));
    assert!(found.contains("raft") && found.contains("state"), "{found:?}");
}
