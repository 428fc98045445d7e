//! How the Master's state is stored: one record per entity, so a command
//! writes only what it changed.
//!
//! Keys are a one-letter kind, `/`, then the entity's identity with NUL
//! between parts: `c/COMP-1` (and `r/COMP-1`, its revision), `p/COMP-1\0slappart0`, `s/COMP-1\0URL`,
//! `i/SOFTINST-7`, `x/<client>`, `m` for the counters, `k` for the
//! cluster's facts, `a` for the certificate authority, `l` for the limits (once set), `v` for the cluster's version (once raised), `t/<fingerprint>` for
//! certificates, `g/<token sha256>` for computer registrations, `n/<id>`
//! for replicas' public addresses, and for accounting `u/<id>` (movements),
//! `h/<instance>` (open hosting spans), `j/<sha256>` (booked journals) and
//! `$/<resource>\0<release>` (prices), and for the market `f/<computer>`
//! (offers), `w/<computer>` (owners) and `e/<instance>` (the terms an
//! instance was allocated at). Values are postcard.
//!
//! Part of the state machine: imports only the state (the store's format is
//! raft-store's business).

use serde::{Deserialize, Serialize};

use super::model::*;
use super::{Dirty, Master};

#[derive(Serialize, Deserialize)]
struct MetaRecord {
    clock: u64,
    last_index: u64,
    applied: u64,
}

fn join(kind: &str, parts: &[&str]) -> Vec<u8> {
    let mut key = kind.as_bytes().to_vec();
    key.push(b'/');
    for (i, p) in parts.iter().enumerate() {
        if i > 0 {
            key.push(0);
        }
        key.extend_from_slice(p.as_bytes());
    }
    key
}

/// The record key of an entity.
pub fn key(d: &Dirty) -> Vec<u8> {
    match d {
        Dirty::Computer(c) => join("c", &[c]),
        Dirty::Revision(c) => join("r", &[c]),
        Dirty::Partition(c, p) => join("p", &[c, p]),
        Dirty::Installation(c, u) => join("s", &[c, u]),
        Dirty::Instance(i) => join("i", &[i]),
        Dirty::Session(s) => join("x", &[s]),
        Dirty::Meta => b"m".to_vec(),
        Dirty::Cluster => b"k".to_vec(),
        Dirty::Authority => b"a".to_vec(),
        Dirty::Certificate(f) => join("t", &[&f.to_string()]),
        Dirty::Registration(t) => join("g", &[t]),
        Dirty::ReplicaAddr(n) => join("n", &[&format!("{n:020}")]),
        Dirty::Movement(id) => join("u", &[&format!("{id:020}")]),
        Dirty::Span(i) => join("h", &[i]),
        Dirty::Journal(j) => join("j", &[j]),
        Dirty::Price(r, release) => join("$", &[r, release]),
        Dirty::Limits => b"l".to_vec(),
        Dirty::Version => b"v".to_vec(),
        Dirty::Rotation => b"o".to_vec(),
        Dirty::Offer(c) => join("f", &[c]),
        Dirty::Owner(c) => join("w", &[c]),
        Dirty::Agreement(i) => join("e", &[i]),
    }
}

fn enc<T: Serialize, W: Extend<u8>>(v: &T, out: W) -> W {
    postcard::to_extend(v, out).expect("postcard encodes the Master's entities")
}

/// The record of an entity as it stands now, or `None` if it is gone.
pub fn value(m: &Master, d: &Dirty) -> Option<Vec<u8>> {
    value_into(m, d, Vec::new())
}

/// [`value`], encoded into `out` (the store's own buffer, so the record is
/// not copied again on its way to the disk).
pub fn value_into<W: Extend<u8>>(m: &Master, d: &Dirty, out: W) -> Option<W> {
    match d {
        // A computer's revision changes on most writes; it is stored apart so
        // those writes do not rewrite the computer with its partition list.
        Dirty::Computer(c) => m.computers.get(c).map(|c| {
            enc(
                &Computer {
                    revision: 0,
                    ..c.clone()
                },
                out,
            )
        }),
        Dirty::Revision(c) => m.computers.get(c).map(|c| enc(&c.revision, out)),
        Dirty::Partition(c, p) => m.partitions.get(&(c.clone(), p.clone())).map(|v| enc(v, out)),
        Dirty::Installation(c, u) => m.installations.get(&(c.clone(), u.clone())).map(|v| enc(v, out)),
        Dirty::Instance(i) => m.instances.get(i).map(|v| enc(v, out)),
        Dirty::Session(s) => m.sessions.get(s).map(|v| enc(v, out)),
        Dirty::Meta => Some(enc(
            &MetaRecord {
                clock: m.clock,
                last_index: m.last_index,
                applied: m.applied,
            },
            out,
        )),
        Dirty::Cluster => m.cluster.as_ref().map(|v| enc(v, out)),
        // Not stored while they are the defaults (the record exists once set).
        Dirty::Limits => (m.limits != super::limits::Limits::default()).then(|| enc(&m.limits, out)),
        // Not stored until raised (the record exists once set).
        Dirty::Version => (m.cluster_version > 0).then(|| enc(&m.cluster_version, out)),
        Dirty::Authority => m.authority.as_ref().map(|v| enc(v, out)),
        Dirty::Rotation => m.rotation.as_ref().map(|v| enc(v, out)),
        Dirty::Certificate(f) => m.certificates.get(f).map(|v| enc(v, out)),
        Dirty::Registration(t) => m.registrations.get(t).map(|v| enc(v, out)),
        Dirty::ReplicaAddr(n) => m.replica_addrs.get(n).map(|a| enc(&(*n, a), out)),
        Dirty::Movement(id) => m.ledger.movements.get(id).map(|v| enc(v, out)),
        Dirty::Span(i) => m.ledger.spans.get(i).map(|v| enc(v, out)),
        Dirty::Journal(j) => m.ledger.journals.get(j).map(|seq| enc(&(j, seq), out)),
        Dirty::Price(r, release) => m
            .ledger
            .prices
            .get(&(r.clone(), release.clone()))
            .map(|p| enc(&(r, release, p), out)),
        Dirty::Offer(c) => m.market.offers.get(c).map(|v| enc(v, out)),
        Dirty::Owner(c) => m.ledger.owners.get(c).map(|o| enc(&(c, o), out)),
        Dirty::Agreement(i) => m.ledger.agreements.get(i).map(|a| enc(&(i, a), out)),
    }
}

/// Every record of the state, in no particular order (tests and hashing).
pub fn all_records(m: &Master) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut keys: Vec<Dirty> = vec![
        Dirty::Meta,
        Dirty::Cluster,
        Dirty::Authority,
        Dirty::Limits,
        Dirty::Version,
        Dirty::Rotation,
    ];
    keys.extend(m.certificates.keys().copied().map(Dirty::Certificate));
    keys.extend(m.registrations.keys().cloned().map(Dirty::Registration));
    keys.extend(m.replica_addrs.keys().copied().map(Dirty::ReplicaAddr));
    keys.extend(m.ledger.movements.keys().copied().map(Dirty::Movement));
    keys.extend(m.ledger.spans.keys().cloned().map(Dirty::Span));
    keys.extend(m.ledger.journals.keys().cloned().map(Dirty::Journal));
    keys.extend(
        m.ledger
            .prices
            .keys()
            .map(|(r, release)| Dirty::Price(r.clone(), release.clone())),
    );
    keys.extend(m.market.offers.keys().cloned().map(Dirty::Offer));
    keys.extend(m.ledger.owners.keys().cloned().map(Dirty::Owner));
    keys.extend(m.ledger.agreements.keys().cloned().map(Dirty::Agreement));
    keys.extend(m.computers.keys().cloned().map(Dirty::Computer));
    keys.extend(m.computers.keys().cloned().map(Dirty::Revision));
    keys.extend(m.partitions.keys().map(|(c, p)| Dirty::Partition(c.clone(), p.clone())));
    keys.extend(
        m.installations
            .keys()
            .map(|(c, u)| Dirty::Installation(c.clone(), u.clone())),
    );
    keys.extend(m.instances.keys().cloned().map(Dirty::Instance));
    keys.extend(m.sessions.keys().cloned().map(Dirty::Session));
    keys.iter().filter_map(|d| Some((key(d), value(m, d)?))).collect()
}

fn dec<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, (Vec<u8>, String)> {
    postcard::from_bytes(value).map_err(|e| (key.to_vec(), format!("cannot decode: {e}")))
}

/// Rebuilds the Master from its records. An unreadable record is returned
/// with its key and the reason.
pub fn restore(records: &mut dyn Iterator<Item = (Vec<u8>, Vec<u8>)>) -> Result<Master, (Vec<u8>, String)> {
    let mut m = Master::new();
    // Revisions met before their computer (records are not always in key order).
    let mut revisions = std::collections::BTreeMap::new();
    for (k, v) in records {
        match k.first().copied() {
            Some(b'm') if k.len() == 1 => {
                let meta: MetaRecord = dec(&k, &v)?;
                m.clock = meta.clock;
                m.last_index = meta.last_index;
                m.applied = meta.applied;
            }
            Some(b'k') if k.len() == 1 => m.cluster = Some(dec(&k, &v)?),
            Some(b'a') if k.len() == 1 => m.authority = Some(dec(&k, &v)?),
            Some(b'o') if k.len() == 1 => m.rotation = Some(dec(&k, &v)?),
            Some(b'l') if k.len() == 1 => m.limits = dec(&k, &v)?,
            Some(b'v') if k.len() == 1 => m.cluster_version = dec(&k, &v)?,
            Some(b't') => {
                let c: Certificate = dec(&k, &v)?;
                m.certificates.insert(c.fingerprint, c);
            }
            Some(b'g') => {
                let computer: ComputerId = dec(&k, &v)?;
                let token = String::from_utf8_lossy(&k[2..]).into_owned();
                m.registrations.insert(token, computer);
            }
            Some(b'c') => {
                let mut c: Computer = dec(&k, &v)?;
                c.revision = revisions.remove(&c.id).unwrap_or(0);
                m.computers.insert(c.id.clone(), c);
            }
            Some(b'r') => {
                // Keys sort `c/...` before `r/...`: the computer is already there.
                let revision: u64 = dec(&k, &v)?;
                let id = String::from_utf8_lossy(&k[2..]).into_owned();
                match m.computers.get_mut(&id) {
                    Some(c) => c.revision = revision,
                    None => {
                        revisions.insert(id, revision);
                    }
                }
            }
            Some(b'p') => {
                let p: Partition = dec(&k, &v)?;
                m.partitions.insert((p.computer.clone(), p.id.clone()), p);
            }
            Some(b's') => {
                let s: SoftwareInstallation = dec(&k, &v)?;
                m.installations.insert((s.computer.clone(), s.url.clone()), s);
            }
            Some(b'i') => {
                let i: Instance = dec(&k, &v)?;
                m.instances.insert(i.id.clone(), std::sync::Arc::new(i));
            }
            Some(b'u') => {
                let mv: super::ledger::Movement = dec(&k, &v)?;
                m.ledger.movements.insert(mv.id, mv);
            }
            Some(b'h') => {
                let span: super::ledger::HostingSpan = dec(&k, &v)?;
                m.ledger.spans.insert(span.instance.clone(), span);
            }
            Some(b'j') => {
                let (j, seq): (String, u64) = dec(&k, &v)?;
                m.ledger.journals.insert(j, seq);
            }
            Some(b'$') => {
                let (r, release, p): (String, String, super::ledger::Price) = dec(&k, &v)?;
                m.ledger.prices.insert((r, release), p);
            }
            Some(b'f') => {
                let offer: super::market::Offer = dec(&k, &v)?;
                m.market.offers.insert(offer.computer.clone(), offer);
            }
            Some(b'w') => {
                let (computer, owner): (ComputerId, String) = dec(&k, &v)?;
                m.ledger.owners.insert(computer, owner);
            }
            Some(b'e') => {
                let (instance, agreement): (InstanceId, super::market::Agreement) = dec(&k, &v)?;
                m.ledger.agreements.insert(instance, agreement);
            }
            Some(b'n') => {
                let (id, addr): (u64, String) = dec(&k, &v)?;
                m.replica_addrs.insert(id, addr);
            }
            Some(b'x') => {
                let s: Session = dec(&k, &v)?;
                let client = String::from_utf8_lossy(&k[2..]).into_owned();
                m.sessions.insert(client, s);
            }
            _ => return Err((k, "unknown record kind".into())),
        }
    }
    m.reindex();
    Ok(m)
}
