//! The clients: users requesting, re-requesting and destroying instances,
//! readers reading them back, and a prober measuring when writes succeed
//! again after a fault. Every call is recorded as an [`Op`].
//!
//! Calls go through the gateways and directly to the replicas' native API,
//! alternately. A write carries a request id, and every retry of it (after
//! a timeout, a refused connection, UNAVAILABLE) reuses that id, so the
//! Master applies it at most once; the client keeps retrying until it gets
//! an answer or its patience runs out (then the outcome is unknown).
//!
//! Each key (a user's instance title) has one writer, which takes it
//! through generations: requested with a growing parameter `v`, destroyed,
//! freed by its node, then requested again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slap_proto::master as pb;
use slap_proto::master::master_client::MasterClient;
use tokio::time::Instant;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::history::{now_us, Call, Key, Op, Outcome, Seen};

/// The software release every instance uses (supplied to every computer).
pub const RELEASE: &str = "https://chaos.invalid/software.cfg";

/// Turns true when the workload should stop. Loops look at it between
/// calls: a call in flight is never abandoned (it could have taken effect
/// with no record of it in the history).
pub type Stop = tokio::sync::watch::Receiver<bool>;

fn stopped(stop: &Stop) -> bool {
    *stop.borrow()
}

/// Sleeps `d`, or less if the workload stops meanwhile.
async fn pause(stop: &mut Stop, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// Where recorded operations go.
#[derive(Clone, Default)]
pub struct Recorder {
    ops: Arc<Mutex<Vec<Op>>>,
}

impl Recorder {
    pub fn push(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    pub fn take(&self) -> Vec<Op> {
        std::mem::take(&mut self.ops.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn snapshot(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// A caller's ways in: native-API channels to gateways and replicas.
#[derive(Clone)]
pub struct Doors {
    /// (name, channel), tried in turn.
    pub doors: Vec<(String, MasterClient<Channel>)>,
}

/// Whether an error means "try again" (maybe elsewhere) rather than "no".
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled | Code::Internal | Code::Aborted
    )
}

/// An instance message as the history records it.
pub fn seen(i: &pb::Instance) -> Seen {
    Seen {
        id: i.id.clone(),
        v: i.parameters.get("v").and_then(|v| v.parse().ok()),
        c: i.connection.get("c").cloned(),
        destroyed: i.requested_state == "destroyed",
        partition: (!i.computer_id.is_empty()).then(|| (i.computer_id.clone(), i.partition_id.clone())),
    }
}

/// The result of calling with retries: the answer, or how it ended.
pub enum Called<T> {
    Answer(T),
    Refused(Status),
    NoAnswer(String),
}

impl Doors {
    /// Calls `f` through one door after another (starting at `start`) until
    /// an answer or a definite refusal, or until `patience` runs out.
    pub async fn call<T, F, Fut>(&self, start: usize, patience: Duration, f: F) -> (Called<T>, String)
    where
        F: Fn(MasterClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + patience;
        let mut i = start;
        let mut last;
        let mut pause = Duration::from_millis(50);
        loop {
            let (name, client) = &self.doors[i % self.doors.len()];
            match tokio::time::timeout(Duration::from_secs(5), f(client.clone())).await {
                Ok(Ok(r)) => return (Called::Answer(r.into_inner()), name.clone()),
                Ok(Err(s)) if !retryable(&s) => return (Called::Refused(s), name.clone()),
                Ok(Err(s)) => last = format!("{name}: {}", s.message()),
                Err(_) => last = format!("{name}: no answer in 5 s"),
            }
            if Instant::now() + pause > deadline {
                return (Called::NoAnswer(last), name.clone());
            }
            i += 1;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(400));
        }
    }
}

/// A client that numbers its writes.
pub struct Writer {
    pub name: String,
    client_id: String,
    seq: u64,
}

impl Writer {
    pub fn new(name: &str, run: u64) -> Writer {
        Writer {
            name: name.to_string(),
            client_id: format!("chaos-{run:x}-{name}"),
            seq: 0,
        }
    }

    pub fn next_id(&mut self) -> pb::RequestId {
        self.seq += 1;
        pb::RequestId {
            client: self.client_id.clone(),
            seq: self.seq,
        }
    }
}

/// Records one call of the history: its outcome, when it completed, through
/// which door; returns the answer, if any.
fn record_call<T>(
    rec: &Recorder,
    process: &str,
    key: &Key,
    call: Call,
    invoked: u64,
    result: (Called<T>, String),
    seen_of: impl Fn(&T) -> Option<Seen>,
) -> Option<T> {
    let (called, via) = result;
    let (outcome, completed, value) = match called {
        Called::Answer(v) => (
            Outcome::Ok {
                seen: seen_of(&v),
                no_effect: false,
            },
            Some(now_us()),
            Some(v),
        ),
        Called::Refused(s) => (
            Outcome::Fail {
                error: format!("{:?}: {}", s.code(), s.message()),
            },
            Some(now_us()),
            None,
        ),
        Called::NoAnswer(e) => (Outcome::Unknown { error: e }, None, None),
    };
    rec.push(Op {
        process: process.to_string(),
        key: Some(key.clone()),
        call,
        invoked,
        completed,
        outcome,
        via,
    });
    value
}

/// What a writer knows of a key it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Absent,
    Present,
    Destroyed,
}

/// Requests `key` with parameter `v`.
pub async fn request(
    doors: &Doors,
    rec: &Recorder,
    w: &mut Writer,
    key: &Key,
    v: u64,
    start: usize,
    patience: Duration,
) -> Option<pb::Instance> {
    let rid = w.next_id();
    let invoked = now_us();
    let req = pb::RequestInstanceRequest {
        request_id: Some(rid),
        title: key.title.clone(),
        software_release: RELEASE.into(),
        software_type: "default".into(),
        parameters: [("v".to_string(), v.to_string())].into_iter().collect(),
        ..Default::default()
    };
    let result = doors
        .call(start, patience, |mut c| {
            let req = req.clone();
            async move { c.request(req).await }
        })
        .await;
    record_call(rec, &w.name, key, Call::Request { v }, invoked, result, |i| {
        Some(seen(i))
    })
}

/// Requests `key` destroyed.
pub async fn destroy(
    doors: &Doors,
    rec: &Recorder,
    w: &mut Writer,
    key: &Key,
    v: u64,
    start: usize,
    patience: Duration,
) -> bool {
    let rid = w.next_id();
    let invoked = now_us();
    let req = pb::RequestInstanceRequest {
        request_id: Some(rid),
        title: key.title.clone(),
        software_release: RELEASE.into(),
        software_type: "default".into(),
        parameters: [("v".to_string(), v.to_string())].into_iter().collect(),
        state: "destroyed".into(),
        ..Default::default()
    };
    let result = doors
        .call(start, patience, |mut c| {
            let req = req.clone();
            async move { c.request(req).await }
        })
        .await;
    record_call(rec, &w.name, key, Call::Destroy, invoked, result, |_| None).is_some()
}

/// A linearizable read of `key`; `None` if the call got no answer.
pub async fn read(
    doors: &Doors,
    rec: &Recorder,
    process: &str,
    key: &Key,
    start: usize,
    patience: Duration,
) -> Option<Option<Seen>> {
    let invoked = now_us();
    let req = pb::GetInstanceRequest {
        title: key.title.clone(),
        ..Default::default()
    };
    let (called, via) = doors
        .call(start, patience, |mut c| {
            let req = req.clone();
            async move { c.get_instance(req).await }
        })
        .await;
    // Not found is an answer: the key is absent.
    let called = match called {
        Called::Answer(i) => Called::Answer(Some(seen(&i))),
        Called::Refused(s) if s.code() == Code::NotFound => Called::Answer(None),
        Called::Refused(s) => Called::Refused(s),
        Called::NoAnswer(e) => Called::NoAnswer(e),
    };
    record_call(
        rec,
        process,
        key,
        Call::Read,
        invoked,
        (called, via),
        |s: &Option<Seen>| s.clone(),
    )
}

/// Takes each of `keys` through its generations until `stop`, then
/// leaves them as they are.
#[allow(clippy::too_many_arguments)]
pub async fn writer_loop(
    doors: Doors,
    rec: Recorder,
    mut w: Writer,
    keys: Vec<Key>,
    mut stop: Stop,
    patience: Duration,
    mut rng: u64,
    door_offset: usize,
) {
    let mut life: BTreeMap<Key, (Life, u64)> = keys.iter().map(|k| (k.clone(), (Life::Absent, 0))).collect();
    let mut turn = door_offset;
    while !stopped(&stop) {
        for key in &keys {
            if stopped(&stop) {
                break;
            }
            turn += 1;
            let (state, v) = life[key];
            let roll = next(&mut rng) % 100;
            let new = match state {
                Life::Present if roll >= 85 => {
                    if destroy(&doors, &rec, &mut w, key, v, turn, patience).await {
                        (Life::Destroyed, v)
                    } else {
                        (Life::Present, v)
                    }
                }
                Life::Absent | Life::Present => {
                    let v = v + 1;
                    match request(&doors, &rec, &mut w, key, v, turn, patience).await {
                        Some(i) if i.requested_state == "destroyed" => (Life::Destroyed, v),
                        Some(_) => (Life::Present, v),
                        // Unknown: it may exist; requesting again is safe.
                        None => (Life::Present, v),
                    }
                }
                Life::Destroyed => {
                    // Wait for its node to free it; a new generation then starts.
                    match read(&doors, &rec, &w.name, key, turn, patience).await {
                        Some(None) => (Life::Absent, v),
                        _ => (Life::Destroyed, v),
                    }
                }
            };
            life.insert(key.clone(), new);
            pause(&mut stop, Duration::from_millis(40 + next(&mut rng) % 120)).await;
        }
    }
}

/// Reads random keys until `stop`.
pub async fn reader_loop(
    doors: Doors,
    rec: Recorder,
    name: String,
    keys: Vec<Key>,
    mut stop: Stop,
    patience: Duration,
    mut rng: u64,
) {
    let mut turn = next(&mut rng) as usize;
    while !stopped(&stop) {
        let key = &keys[(next(&mut rng) as usize) % keys.len()];
        turn += 1;
        read(&doors, &rec, &name, key, turn, patience).await;
        pause(&mut stop, Duration::from_millis(30 + next(&mut rng) % 100)).await;
    }
}

/// Writes the probe instance every 200 ms until `stop`: the times at which
/// writes succeed tell how long each fault kept the Master from committing.
/// Probe writes are recorded as `Other` (their many unanswered attempts
/// during faults would only slow the linearizability search); the probe's
/// SLA names no computer, so it stays pending and no node ever sees it.
pub async fn prober(doors: Doors, rec: Recorder, mut w: Writer, title: String, mut stop: Stop) {
    let mut v = 0;
    let mut turn = 0;
    while !stopped(&stop) {
        v += 1;
        turn += 1;
        let invoked = now_us();
        let req = pb::RequestInstanceRequest {
            request_id: Some(w.next_id()),
            title: title.clone(),
            software_release: RELEASE.into(),
            software_type: "default".into(),
            parameters: [("v".to_string(), v.to_string())].into_iter().collect(),
            sla: [("computer_guid".to_string(), "chaos-probe-nowhere".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        let (called, via) = doors
            .call(turn, Duration::from_secs(2), |mut c| {
                let req = req.clone();
                async move { c.request(req).await }
            })
            .await;
        let (outcome, completed) = match called {
            Called::Answer(_) => (
                Outcome::Ok {
                    seen: None,
                    no_effect: false,
                },
                Some(now_us()),
            ),
            Called::Refused(s) => (
                Outcome::Fail {
                    error: s.message().to_string(),
                },
                Some(now_us()),
            ),
            Called::NoAnswer(e) => (Outcome::Unknown { error: e }, None),
        };
        rec.push(Op {
            process: w.name.clone(),
            key: None,
            call: Call::Other { what: "probe".into() },
            invoked,
            completed,
            outcome,
            via,
        });
        pause(&mut stop, Duration::from_millis(200)).await;
    }
}

/// A small deterministic generator (xorshift).
pub fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
