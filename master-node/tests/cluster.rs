//! Multi-process tests with the real `master-node` binary: formation,
//! writes through followers, leader failover, catch-up, membership changes,
//! a full restart, and refused joins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use master_node::api::{Answer, Query};
use master_node::client::{Client, Credentials};
use master_node::state::{self, Params, Reply, RequestOrigin, RequestSpec, Scope};

const BIN: &str = env!("CARGO_BIN_EXE_master-node");

/// A directory for one test's replicas and their logs; kept after the test
/// when CLUSTER_TEST_KEEP is set, for reading the logs.
fn test_dir() -> tempfile::TempDir {
    let mut dir = tempfile::tempdir().unwrap();
    if std::env::var_os("CLUSTER_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!("replica data and logs in {}", dir.path().display());
    }
    dir
}

mod common;

fn free_port() -> String {
    format!("127.0.0.1:{}", common::free_port())
}

/// One replica process.
struct Replica {
    dir: PathBuf,
    addr: String,
    child: Option<Child>,
}

impl Replica {
    fn log(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap()
    }

    fn spawn(&mut self, args: &[&str]) {
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(self.log())
            .spawn()
            .expect("spawn master-node");
        self.child = Some(child);
    }

    fn init(base: &Path, name: &str) -> (Replica, String) {
        let mut r = Replica {
            dir: base.join(name),
            addr: free_port(),
            child: None,
        };
        let child = Command::new(BIN)
            .args(["init", "--data-dir", r.dir.to_str().unwrap(), "--listen", &r.addr])
            .stdout(Stdio::piped())
            .stderr(r.log())
            .spawn()
            .unwrap();
        r.child = Some(child);
        let stdout = r.child.as_mut().unwrap().stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).unwrap();
        assert!(line.starts_with("SLAPJOIN2."), "init printed {line:?}");
        (r, line.trim().to_string())
    }

    /// Founds a one-replica cluster `r1` with extra `init` flags, in the
    /// background, and returns once it leads, with its admin credentials.
    async fn init_leading(base: &Path, flags: &[&str]) -> (Replica, Credentials) {
        let mut r1 = Replica {
            dir: base.join("r1"),
            addr: free_port(),
            child: None,
        };
        let (dir, addr) = (r1.dir.to_str().unwrap().to_string(), r1.addr.clone());
        let mut args = vec!["init", "--data-dir", &dir, "--listen", &addr];
        args.extend_from_slice(flags);
        r1.spawn(&args);
        wait_until("r1 to be created", Duration::from_secs(20), || {
            let f = r1.dir.join("join-token");
            async move { f.exists() }
        })
        .await;
        let admin = Credentials::admin_of(&r1.dir).unwrap();
        wait_until("r1 to lead", Duration::from_secs(20), || async {
            leader_id(&admin, &[&r1.addr]).await == Some(1)
        })
        .await;
        (r1, admin)
    }

    fn join(base: &Path, name: &str, peer: &str, token: &str) -> Replica {
        let mut r = Replica {
            dir: base.join(name),
            addr: free_port(),
            child: None,
        };
        let (dir, addr) = (r.dir.to_str().unwrap().to_string(), r.addr.clone());
        r.spawn(&[
            "join",
            "--peer",
            peer,
            "--token",
            token,
            "--data-dir",
            &dir,
            "--listen",
            &addr,
        ]);
        r
    }

    fn restart(&mut self) {
        let dir = self.dir.to_str().unwrap().to_string();
        self.spawn(&["run", "--data-dir", &dir]);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap(); // SIGKILL
            c.wait().unwrap();
        }
    }

    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut()?.try_wait().unwrap() {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs a master-node command to completion.
fn cli(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().expect("run master-node")
}

async fn wait_until<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn status(c: &Credentials, addr: &str) -> Option<slap_proto::cluster::StatusReply> {
    Client::status_of(addr, c).await.ok()
}

async fn voters(c: &Credentials, addr: &str) -> Vec<u64> {
    status(c, addr)
        .await
        .map(|s| s.members.iter().filter(|m| m.role == "voter").map(|m| m.id).collect())
        .unwrap_or_default()
}

async fn leader_id(c: &Credentials, addrs: &[&str]) -> Option<u64> {
    for a in addrs {
        if let Some(s) = status(c, a).await {
            if s.state == "Leader" {
                return Some(s.node_id);
            }
        }
    }
    None
}

fn request(title: &str, value: &str) -> state::Command {
    state::Command::Request(RequestSpec {
        requester: RequestOrigin::User("alice".into()),
        title: title.into(),
        software_release: "https://example.org/http.cfg".into(),
        software_type: "default".into(),
        parameters: [("value".to_string(), value.to_string())].into_iter().collect(),
        sla: Params::new(),
        shared: false,
        state: None,
    })
}

async fn read_value(client: &Client, title: &str) -> Option<String> {
    match client
        .read(&Query::Instance {
            scope: Scope::User("alice".into()),
            title: title.into(),
        })
        .await
        .unwrap()
    {
        Answer::Instance(Some(i)) => i.parameters.get("value").cloned(),
        _ => None,
    }
}

async fn local_digest(c: &Credentials, addr: &str) -> Option<(u64, String)> {
    match Client::read_local(addr, &Query::StateDigest, c).await.ok()? {
        Answer::StateDigest { last_index, sha256, .. } => Some((last_index, sha256)),
        _ => None,
    }
}

/// Waits until every replica holds the same state as the others.
async fn converged(c: &Credentials, addrs: &[&str]) {
    wait_until("replicas to converge", Duration::from_secs(30), || async {
        let mut seen = BTreeMap::new();
        for a in addrs {
            match local_digest(c, a).await {
                Some((_, d)) => *seen.entry(d).or_insert(0) += 1,
                None => return false,
            }
        }
        seen.len() == 1
    })
    .await;
}

async fn supply_computer(client: &Client) {
    let (r, _) = client
        .write(state::Command::SetComputer {
            id: "COMP-1".into(),
            address: "10.0.0.1".into(),
            netmask: "255.255.255.0".into(),
            capacity: Params::new(),
            categories: Params::new(),
            partitions: (0..20)
                .map(|i| state::PartitionSpec {
                    id: format!("slappart{i}"),
                    addresses: vec![],
                    tap: None,
                    user: None,
                    capabilities: vec![],
                })
                .collect(),
        })
        .await
        .unwrap();
    assert_eq!(r, Reply::Done);
    let (r, _) = client
        .write(state::Command::Supply {
            computer: "COMP-1".into(),
            url: "https://example.org/http.cfg".into(),
            state: state::SupplyState::Available,
        })
        .await
        .unwrap();
    assert_eq!(r, Reply::Done);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_lifecycle_with_failover_membership_and_full_restart() {
    let base = test_dir();
    let (mut r1, token) = Replica::init(base.path(), "r1");
    let admin = Credentials::admin_of(&r1.dir).unwrap();
    let a1 = r1.addr.clone();
    wait_until("r1 to lead", Duration::from_secs(20), || async {
        leader_id(&admin, &[&a1]).await == Some(1)
    })
    .await;

    // Join two more through different peers (the leader, then a follower).
    let mut r2 = Replica::join(base.path(), "r2", &r1.addr, &token);
    let a2 = r2.addr.clone();
    wait_until("r2 to be a voter", Duration::from_secs(30), || async {
        voters(&admin, &a1).await == vec![1, 2]
    })
    .await;
    let mut r3 = Replica::join(base.path(), "r3", &r2.addr, &token);
    let a3 = r3.addr.clone();
    wait_until("r3 to be a voter", Duration::from_secs(30), || async {
        voters(&admin, &a1).await == vec![1, 2, 3]
    })
    .await;

    // Write through a follower.
    let follower = Client::new(std::slice::from_ref(&a2), &admin).unwrap();
    supply_computer(&follower).await;
    let (reply, _) = follower.write(request("before-failover", "v1")).await.unwrap();
    assert!(
        matches!(reply, Reply::Instance(ref i) if i.partition.is_some()),
        "{reply:?}"
    );
    // A follower passes writes to the leader undecoded: an undecodable one is
    // its sender's error (a 4xx-like code), not the error of the writes
    // forwarded beside it.
    let mut raw = slap_proto::cluster::cluster_client::ClusterClient::new(admin.channel(&a2).unwrap());
    let bad = raw.write(slap_proto::cluster::WriteRequest {
        proposal: vec![0xff; 16],
        token: String::new(),
    });
    let (bad, good) = tokio::join!(bad, follower.write(request("beside-a-bad-write", "v0")));
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert!(matches!(good.unwrap().0, Reply::Instance(_)));

    // SIGKILL the leader: another is elected and the write is still there.
    let old_leader = leader_id(&admin, &[&a1, &a2, &a3]).await.expect("a leader");
    let (killed, survivors): (&mut Replica, Vec<String>) = match old_leader {
        1 => (&mut r1, vec![a2.clone(), a3.clone()]),
        2 => (&mut r2, vec![a1.clone(), a3.clone()]),
        _ => (&mut r3, vec![a1.clone(), a2.clone()]),
    };
    killed.kill();
    let s: Vec<&str> = survivors.iter().map(String::as_str).collect();
    wait_until("a new leader", Duration::from_secs(20), || async {
        leader_id(&admin, &s).await.is_some_and(|l| l != old_leader)
    })
    .await;
    let client = Client::new(&survivors, &admin).unwrap();
    assert_eq!(read_value(&client, "before-failover").await.as_deref(), Some("v1"));
    let (reply, _) = client.write(request("after-failover", "v2")).await.unwrap();
    assert!(matches!(reply, Reply::Instance(_)));

    // The old leader restarts and catches up.
    killed.restart();
    converged(&admin, &[&a1, &a2, &a3]).await;

    // Grow to five, then remove two; the removed ones stop by themselves.
    let mut r4 = Replica::join(base.path(), "r4", &a3, &token);
    let mut r5 = Replica::join(base.path(), "r5", &a1, &token);
    let a4 = r4.addr.clone();
    let a5 = r5.addr.clone();
    wait_until("five voters", Duration::from_secs(60), || async {
        voters(&admin, &a1).await.len() == 5
    })
    .await;
    // The joiner itself sees the same five voters (it may answer a moment
    // after the leader: its own configuration lags its promotion).
    wait_until("the joiner's view of five voters", Duration::from_secs(20), || async {
        voters(&admin, &a4).await == vec![1, 2, 3, 4, 5]
    })
    .await;
    // r4 and r5 joined concurrently: which got id 4 or 5 is up to the race.
    let id_of = |r: &Replica| master_node::identity::Identity::load(&r.dir).unwrap().unwrap().node_id;
    let (id4, id5) = (id_of(&r4), id_of(&r5));
    let out = cli(&["leave", "--id", &id4.to_string(), "--peer", &a5, "--token", &token]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&["leave", "--data-dir", r2.dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until("three voters", Duration::from_secs(30), || async {
        voters(&admin, &a1).await == vec![1, 3, id5]
    })
    .await;
    for removed in [&mut r4, &mut r2] {
        let exit = removed
            .wait_exit(Duration::from_secs(20))
            .expect("a removed replica stops by itself");
        assert!(exit.success(), "a removed replica exits cleanly: {exit:?}");
        let again = cli(&["run", "--data-dir", removed.dir.to_str().unwrap()]);
        assert!(!again.status.success(), "a removed replica cannot run again");
        assert!(String::from_utf8_lossy(&again.stderr).contains("left cluster"));
    }
    // A removed replica's certificate is revoked on every remaining replica:
    // it is refused at the handshake, so it can neither vote nor append.
    for removed in [&r4, &r2] {
        let tls = master_node::cluster_tls::ReplicaTls::load(&removed.dir).unwrap();
        let with_cert = Credentials::from_config(tls.client_config(slap_proto::tls::Expect::AnyReplica).unwrap());
        let anonymous = Credentials::from_config(tls.anonymous_client_config().unwrap());
        for a in [&a1, &a3, &a5] {
            wait_until("the revocation to apply", Duration::from_secs(10), || async {
                Client::status_of(a, &with_cert).await.is_err()
            })
            .await;
            assert!(Client::status_of(a, &anonymous).await.is_ok());
        }
    }
    // The remaining three still commit writes; removed replicas take no part.
    let client = Client::new(&[a1.clone(), a3.clone(), a5.clone()], &admin).unwrap();
    client.write(request("after-shrink", "v3")).await.unwrap();

    // Restart every replica at once: all state is kept.
    let before = local_digest(&admin, &a1).await.unwrap();
    for r in [&mut r1, &mut r3, &mut r5] {
        r.kill();
    }
    for r in [&mut r1, &mut r3, &mut r5] {
        r.restart();
    }
    wait_until("a leader after full restart", Duration::from_secs(30), || async {
        leader_id(&admin, &[&a1, &a3, &a5]).await.is_some()
    })
    .await;
    let client = Client::new(&[a1.clone(), a3.clone(), a5.clone()], &admin).unwrap();
    for (title, value) in [
        ("before-failover", "v1"),
        ("after-failover", "v2"),
        ("after-shrink", "v3"),
    ] {
        assert_eq!(read_value(&client, title).await.as_deref(), Some(value), "{title} lost");
    }
    converged(&admin, &[&a1, &a3, &a5]).await;
    let after = local_digest(&admin, &a1).await.unwrap();
    assert!(after.0 >= before.0);
    drop(r2);
    drop(r4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_joins_are_refused_and_change_nothing() {
    let base = test_dir();
    let (r1, token) = Replica::init(base.path(), "r1");
    let admin = Credentials::admin_of(&r1.dir).unwrap();
    let a1 = r1.addr.clone();
    wait_until("r1 to lead", Duration::from_secs(20), || async {
        leader_id(&admin, &[&a1]).await == Some(1)
    })
    .await;
    let d = |name: &str| base.path().join(name).to_str().unwrap().to_string();

    // A wrong secret for the right cluster.
    let cluster = token.split('.').nth(1).unwrap();
    let ca_pin = token.split('.').nth(3).unwrap();
    let forged = format!("SLAPJOIN2.{cluster}.{}.{ca_pin}", "0".repeat(48));
    let out = cli(&[
        "join",
        "--peer",
        &a1,
        "--token",
        &forged,
        "--data-dir",
        &d("x1"),
        "--listen",
        &free_port(),
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not valid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An address already used by a member.
    let out = cli(&[
        "join",
        "--peer",
        &a1,
        "--token",
        &token,
        "--data-dir",
        &d("x2"),
        "--listen",
        &a1,
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already used by replica 1"));

    // A data dir of another cluster.
    let other = Command::new(BIN)
        .args(["init", "--data-dir", &d("other"), "--listen", &free_port()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let other_dir = base.path().join("other");
    wait_until("the other cluster's identity", Duration::from_secs(20), || {
        let p = other_dir.join("replica.json");
        async move { p.exists() }
    })
    .await;
    let mut other = Replica {
        dir: other_dir,
        addr: String::new(),
        child: Some(other),
    };
    other.kill();
    let out = cli(&[
        "join",
        "--peer",
        &a1,
        "--token",
        &token,
        "--data-dir",
        &d("other"),
        "--listen",
        &free_port(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("belongs to cluster"));

    // A malformed token.
    let out = cli(&[
        "join",
        "--peer",
        &a1,
        "--token",
        "hello",
        "--data-dir",
        &d("x3"),
        "--listen",
        &free_port(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("malformed"));

    // Nothing changed: still one voter, and no replica id was reserved by
    // the refused joins (the next one handed out is 2).
    assert_eq!(voters(&admin, &a1).await, vec![1]);
    let mut r2 = Replica::join(base.path(), "r2", &a1, &token);
    wait_until("r2 to join", Duration::from_secs(30), || async {
        voters(&admin, &a1).await == vec![1, 2]
    })
    .await;
    r2.kill();
    drop(r1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_with_wiped_log_is_refused() {
    let base = test_dir();
    let (mut r1, _token) = Replica::init(base.path(), "r1");
    let admin = Credentials::admin_of(&r1.dir).unwrap();
    let a1 = r1.addr.clone();
    wait_until("r1 to lead", Duration::from_secs(20), || async {
        leader_id(&admin, &[&a1]).await == Some(1)
    })
    .await;
    r1.kill();
    for sub in ["log", "state", "snapshots"] {
        std::fs::remove_dir_all(r1.dir.join(sub)).unwrap();
    }
    let out = cli(&["run", "--data-dir", r1.dir.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no Raft log") && err.contains("leave"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_log_entry_stops_the_replica_and_names_it() {
    let base = test_dir();
    let (mut r1, _token) = Replica::init(base.path(), "r1");
    let admin = Credentials::admin_of(&r1.dir).unwrap();
    let a1 = r1.addr.clone();
    wait_until("r1 to lead", Duration::from_secs(20), || async {
        leader_id(&admin, &[&a1]).await == Some(1)
    })
    .await;
    let client = Client::new(std::slice::from_ref(&a1), &admin).unwrap();
    supply_computer(&client).await;
    r1.kill();

    // Overwrite the last log entry with bytes of the right format version
    // that decode to nothing (as a bit flip or a newer binary would leave).
    let log = r1.dir.join("log");
    let last = {
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &log, ["log", "meta"]).unwrap();
        let cf = db.cf_handle("log").unwrap();
        let (key, _) = db.iterator_cf(cf, rocksdb::IteratorMode::End).next().unwrap().unwrap();
        db.put_cf(cf, &key, [1u8, 0xff, 0xff, 0xff, 0x07]).unwrap();
        u64::from_be_bytes(key.as_ref().try_into().unwrap())
    };
    let out = cli(&["run", "--data-dir", r1.dir.to_str().unwrap()]);
    assert!(!out.status.success(), "a replica must not run on an undecodable entry");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("index {last}")) && err.contains("corrupt"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_catches_up_from_a_streamed_snapshot() {
    let base = test_dir();
    // Snapshot every 50 entries, so the log the joiner needs is long purged.
    let (r1, admin) = Replica::init_leading(
        base.path(),
        &["--snapshot-every", "50", "--keep-log-after-snapshot", "0"],
    )
    .await;
    let a1 = r1.addr.clone();
    let token = std::fs::read_to_string(r1.dir.join("join-token"))
        .unwrap()
        .trim()
        .to_string();
    let client = Client::new(std::slice::from_ref(&a1), &admin).unwrap();
    supply_computer(&client).await;
    // One write per log entry (sequential), well past two snapshots.
    for i in 0..400 {
        client
            .write(request(&format!("t{}", i % 30), &format!("v{i}")))
            .await
            .unwrap();
    }
    // A snapshot may be under construction (`building-N.tmp`) right now;
    // what must hold is that only the newest finished one is kept.
    let snapshots: Vec<_> = std::fs::read_dir(r1.dir.join("snapshots"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".snap"))
        .collect();
    assert_eq!(snapshots.len(), 1, "one snapshot kept: {snapshots:?}");

    let r2 = Replica::join(base.path(), "r2", &a1, &token);
    let a2 = r2.addr.clone();
    wait_until("r2 to be a voter", Duration::from_secs(60), || async {
        voters(&admin, &a1).await == vec![1, 2]
    })
    .await;
    converged(&admin, &[&a1, &a2]).await;
    // The joiner holds the snapshot it was sent, not the purged entries.
    assert_eq!(std::fs::read_dir(r2.dir.join("snapshots")).unwrap().count(), 1);
    match Client::read_local(
        &a2,
        &Query::Instance {
            scope: Scope::User("alice".into()),
            title: "t9".into(),
        },
        &admin,
    )
    .await
    .unwrap()
    {
        Answer::Instance(Some(i)) => assert_eq!(i.parameters.get("value").map(String::as_str), Some("v399")),
        other => panic!("t9 missing on the joiner: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_grown_past_its_size_bound_is_snapshotted_whatever_its_entry_count() {
    let base = test_dir();
    // Entries never reach the count bound here; only the size bound acts.
    let (r1, admin) = Replica::init_leading(
        base.path(),
        &["--snapshot-every", "1000000", "--snapshot-every-mib", "2"],
    )
    .await;
    let a1 = r1.addr.clone();
    let client = Client::new(std::slice::from_ref(&a1), &admin).unwrap();
    supply_computer(&client).await;
    let snapshots = || {
        std::fs::read_dir(r1.dir.join("snapshots"))
            .map(|d| {
                d.filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".snap"))
                    .count()
            })
            .unwrap_or(0)
    };
    // 200 KB per entry: 1.2 MB is under the bound...
    let big = "x".repeat(200_000);
    for i in 0..6 {
        client.write(request(&format!("t{i}"), &big)).await.unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(snapshots(), 0, "no snapshot under 2 MiB of log");
    // ...2.4 MB is past it.
    for i in 6..12 {
        client.write(request(&format!("t{i}"), &big)).await.unwrap();
    }
    wait_until("a snapshot past 2 MiB of log", Duration::from_secs(20), || async {
        snapshots() == 1
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prices_and_usage_reports_through_the_command_line() {
    let base = test_dir();
    let (r1, token) = Replica::init(base.path(), "r1");
    let admin = Credentials::admin_of(&r1.dir).unwrap();
    let a1 = r1.addr.clone();
    wait_until("r1 to lead", Duration::from_secs(20), || async {
        leader_id(&admin, &[&a1]).await == Some(1)
    })
    .await;
    let client = Client::new(std::slice::from_ref(&a1), &admin).unwrap();
    supply_computer(&client).await;
    let (reply, _) = client.write(request("billed", "v1")).await.unwrap();
    let Reply::Instance(inst) = reply else {
        panic!("{reply:?}")
    };
    let (computer, partition) = inst.partition.clone().unwrap();
    let nov_25 = 1_795_618_923 * 1_000_000;
    let (r, _) = client
        .write(state::Command::BookUsage {
            computer: computer.clone(),
            journal_sha256: "journal-1".into(),
            lines: vec![state::ledger::UsageLine {
                partition,
                resource: "CPU Consumption".into(),
                category: Some("cpu".into()),
                quantity: master_node::state::ledger::Quantity::units(1500),
                stop_us: Some(nov_25),
            }],
        })
        .await
        .unwrap();
    assert_eq!(r, Reply::Done);
    let out = cli(&[
        "price",
        "set",
        "cpu",
        "0.0002",
        "--currency",
        "EUR",
        "--peer",
        &a1,
        "--token",
        &token,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bad = cli(&[
        "price",
        "set",
        "cpu",
        "-1",
        "--currency",
        "EUR",
        "--peer",
        &a1,
        "--token",
        &token,
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not an amount"));
    let out = cli(&[
        "usage",
        "--subscriber",
        "alice",
        "--period",
        "2026-11",
        "--json",
        "--peer",
        &a1,
        "--token",
        &token,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["totals"]["EUR"], 300_000, "1500 s at 0.0002 EUR: {report}");
    assert_eq!(report["lines"][0]["subscription"], inst.root.as_str());
    let table = cli(&[
        "usage",
        "--computer",
        &computer,
        "--period",
        "2026-11",
        "--peer",
        &a1,
        "--token",
        &token,
    ]);
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(
        text.contains("for alice") && text.contains("total: 0.300000 EUR"),
        "{text}"
    );
    let wrong = cli(&[
        "usage",
        "--subscriber",
        "alice",
        "--period",
        "November",
        "--peer",
        &a1,
        "--token",
        &token,
    ]);
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("YYYY-MM"));
    drop(r1);
}

/// Heartbeats and elections do not depend on what the log carries: three
/// replicas under a steady write load, then a burst of the largest writes
/// the limits allow (each its own log entry), keep their leader and term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_maximum_size_writes_changes_no_leader() {
    let base = test_dir();
    let (r1, token) = Replica::init(base.path(), "r1");
    let admin = Credentials::admin_of(&r1.dir).unwrap();
    let a1 = r1.addr.clone();
    wait_until("r1 to lead", Duration::from_secs(20), || async {
        leader_id(&admin, &[&a1]).await == Some(1)
    })
    .await;
    let r2 = Replica::join(base.path(), "r2", &a1, &token);
    let r3 = Replica::join(base.path(), "r3", &a1, &token);
    let (a2, a3) = (r2.addr.clone(), r3.addr.clone());
    wait_until("three voters", Duration::from_secs(60), || async {
        voters(&admin, &a1).await == vec![1, 2, 3]
    })
    .await;
    let addrs = [a1.clone(), a2.clone(), a3.clone()];
    // A client numbers its writes as one session: one client per task.
    let new_client = || Client::new(&addrs, &admin).unwrap();
    let client = new_client();
    supply_computer(&client).await;
    let term = status(&admin, &a1).await.unwrap().term;

    // Steady small writes from four clients for the whole test.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let steady: Vec<_> = (0..4)
        .map(|c| {
            let (client, stop) = (new_client(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += 1;
                    client
                        .write(request(&format!("steady-{c}"), &format!("v{n}")))
                        .await
                        .unwrap();
                }
                n
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The burst: 40 writes at once, each with parameters just under the
    // cluster's parameters_bytes (256 KiB), so each is a log entry of its own
    // near entry_bytes: 10 MB through Raft in a second or two.
    let value = "x".repeat((256 << 10) - 64);
    let burst: Vec<_> = (0..40)
        .map(|i| {
            let (client, value) = (new_client(), value.clone());
            tokio::spawn(async move { client.write(request(&format!("big-{i}"), &value)).await })
        })
        .collect();
    for b in burst {
        let (reply, _) = b.await.unwrap().unwrap();
        assert!(
            matches!(reply, Reply::Instance(_)),
            "a maximum-size write is accepted: {reply:?}"
        );
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut steady_writes = 0;
    for s in steady {
        steady_writes += s.await.unwrap();
    }
    assert!(steady_writes > 40, "the steady load ran ({steady_writes} writes)");
    for a in &addrs {
        let st = status(&admin, a).await.unwrap();
        assert_eq!(
            (st.term, st.leader_id),
            (term, Some(1)),
            "replica at {a}: no election during the burst"
        );
    }
    // One write over the limit is refused, and it is the last word: nothing moved.
    let over = "x".repeat(300 << 10);
    let (reply, index) = client.write(request("too-big", &over)).await.unwrap();
    assert!(
        matches!(&reply, Reply::Refused(state::Refusal::TooLarge(m)) if m.contains("parameters_bytes")),
        "{reply:?}"
    );
    assert_eq!(index, 0, "refused before the log");
    converged(&admin, &[&a1, &a2, &a3]).await;
}
