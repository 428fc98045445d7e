//! `slapctl`, the user's command line, against a real replica serving SLAP
//! with mutual TLS: certificates from `master-node user add`, supply as an
//! administrator, request with parameters from flags and a YAML file,
//! idempotent re-requests, per-user visibility, refusals with a sentence and
//! a non-zero exit code that change nothing, destruction.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{free_port, wait_for, Proc, BIN};
use slap_proto::master as pb;

const SR: &str = "https://lab.example.org/sr/blog/software.cfg";

fn slapctl_bin() -> PathBuf {
    let path = PathBuf::from(BIN).with_file_name("slapctl");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p slapctl` (scripts/run-tests does)",
        path.display()
    );
    path
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs slapctl as the user whose NAME.crt / NAME.key are in `certs`.
fn slapctl(slap: u16, certs: &Path, user: &str, args: &[&str]) -> Run {
    let out = Command::new(slapctl_bin())
        .args(args)
        .env("SLAP_MASTER", format!("127.0.0.1:{slap}"))
        .env("SLAP_CERT", certs.join(format!("{user}.crt")))
        .env("SLAP_KEY", certs.join(format!("{user}.key")))
        .env("SLAP_CA", certs.join("ca.crt"))
        .output()
        .expect("run slapctl");
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn json(run: &Run) -> serde_json::Value {
    assert!(run.ok, "slapctl failed: {}", run.stderr);
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", run.stdout))
}

fn master_node(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "master-node {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Registers COMP-1 with two partitions, as the administrator `init` made.
fn load_computer(slap: u16, admin_dir: &Path) {
    let read = |f: &str| std::fs::read_to_string(admin_dir.join(f)).unwrap();
    let identity = slap_proto::tls::ClientIdentity::from_pem(&read("admin.crt"), &read("admin.key")).unwrap();
    let trust = slap_proto::tls::Trust::ca_pem(&read("ca.crt")).unwrap();
    let config =
        slap_proto::tls::client_config(&trust, Some(&identity), slap_proto::tls::Expect::ReplicaOrGateway).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let channel = slap_proto::tls::channel(&format!("127.0.0.1:{slap}"), config).unwrap();
        let mut client = pb::master_client::MasterClient::new(channel);
        client
            .load_computer(pb::LoadComputerRequest {
                computer_id: "COMP-1".into(),
                partitions: (0..2)
                    .map(|i| pb::PartitionSpec {
                        id: format!("slappart{i}"),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap();
    });
}

#[test]
fn a_user_requests_lists_shows_and_destroys_with_slapctl() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("r1");
    let raft = format!("127.0.0.1:{}", free_port());
    let slap = free_port();
    let _replica = Proc::spawn(
        Path::new(BIN),
        &[
            "init".into(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen".into(),
            raft.clone(),
            "--slap-listen".into(),
            format!("127.0.0.1:{slap}"),
        ],
    );
    let token_file = data.join("join-token");
    wait_for("the replica", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let certs = dir.path().join("certs");
    let certs_arg = certs.display().to_string();
    for (name, extra) in [("alice", None), ("bob", None), ("ops", Some("--admin-role"))] {
        let mut args = vec![
            "user", "add", name, "--peer", &raft, "--token", &token, "--out", &certs_arg,
        ];
        args.extend(extra);
        master_node(&args);
    }
    wait_for("the SLAP port", || {
        std::net::TcpStream::connect(("127.0.0.1", slap)).is_ok()
    });
    load_computer(slap, &data.join("admin"));

    // A user may not supply; the refusal says why and exits non-zero.
    let denied = slapctl(slap, &certs, "alice", &["supply", SR, "COMP-1"]);
    assert!(!denied.ok);
    assert!(denied.stderr.contains("certificate may not"), "{}", denied.stderr);
    let supplied = slapctl(slap, &certs, "ops", &["supply", SR, "COMP-1"]);
    assert!(supplied.ok, "{}", supplied.stderr);
    assert!(supplied.stdout.contains("supplied on COMP-1"), "{}", supplied.stdout);

    // Parameters from a YAML file and from flags (flags win).
    let params = dir.path().join("blog.yaml");
    std::fs::write(&params, "title: \"My <blog> & été\"\nport: 8080\ntheme: dark\n").unwrap();
    let params_arg = params.display().to_string();
    let request = [
        "--json",
        "request",
        "blog",
        SR,
        "--params-file",
        &params_arg,
        "--param",
        "theme=light",
        "--sla",
        "computer_guid=COMP-1",
    ];
    let blog = json(&slapctl(slap, &certs, "alice", &request));
    assert_eq!(blog["title"], "blog");
    assert_eq!(blog["computer"], "COMP-1");
    assert_eq!(blog["requested_state"], "started");
    assert_eq!(blog["parameters"]["title"], "My <blog> & été");
    assert_eq!(blog["parameters"]["port"], "8080");
    assert_eq!(blog["parameters"]["theme"], "light");
    // The same request again is the same instance on the same partition.
    let again = json(&slapctl(slap, &certs, "alice", &request));
    assert_eq!((&again["id"], &again["partition"]), (&blog["id"], &blog["partition"]));

    // Bad input: a sentence, a non-zero exit, nothing stored.
    let bad = slapctl(slap, &certs, "alice", &["request", "other", SR, "--param", "novalue"]);
    assert!(!bad.ok);
    assert!(bad.stderr.contains("\"novalue\" is not key=value"), "{}", bad.stderr);
    let missing = dir.path().join("missing.yaml").display().to_string();
    let bad = slapctl(
        slap,
        &certs,
        "alice",
        &["request", "other", SR, "--params-file", &missing],
    );
    assert!(!bad.ok && bad.stderr.contains("missing.yaml"), "{}", bad.stderr);
    let list = json(&slapctl(slap, &certs, "alice", &["--json", "list"]));
    let titles: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["blog"]);

    // Bob sees none of it.
    assert_eq!(
        json(&slapctl(slap, &certs, "bob", &["--json", "list"])),
        serde_json::json!([])
    );
    let hidden = slapctl(slap, &certs, "bob", &["show", "blog"]);
    assert!(!hidden.ok && !hidden.stderr.is_empty(), "{}", hidden.stdout);
    let text = slapctl(slap, &certs, "alice", &["show", "blog"]);
    assert!(
        text.ok && text.stdout.contains("where: COMP-1 / slappart"),
        "{}",
        text.stdout
    );

    // The market: an administrator names COMP-1's owner; only bob may
    // offer it; bad offers are refused with a sentence.
    let owned = slapctl(slap, &certs, "ops", &["owner", "COMP-1", "bob"]);
    assert!(
        owned.ok && owned.stdout.contains("COMP-1 is bob's"),
        "{}{}",
        owned.stdout,
        owned.stderr
    );
    let offer = |user: &str, extra: &[&str]| {
        let mut args = vec!["offer", "set", "COMP-1", "--partitions", "2"];
        args.extend(extra);
        slapctl(slap, &certs, user, &args)
    };
    let theirs = offer("alice", &["--price", "0.04", "--currency", "EUR"]);
    assert!(!theirs.ok && theirs.stderr.contains("not yours"), "{}", theirs.stderr);
    for (extra, says) in [
        (&["--price", "-0.04", "--currency", "EUR"][..], "not negative"),
        (&["--price", "four", "--currency", "EUR"][..], "not an amount"),
        (&["--price", "0.04", "--currency", "XYZ"][..], "ISO 4217"),
        (
            &["--price", "0.04", "--currency", "EUR", "--memory", "lots"][..],
            "--memory",
        ),
    ] {
        let bad = offer("bob", extra);
        assert!(!bad.ok && bad.stderr.contains(says), "{extra:?}: {}", bad.stderr);
    }
    let empty = json(&slapctl(slap, &certs, "alice", &["--json", "offer", "show"]));
    assert_eq!(empty, serde_json::json!([]), "refused offers store nothing");
    wait_for("the cluster to take offers (version 5)", || {
        offer(
            "bob",
            &[
                "--price",
                "0.04",
                "--currency",
                "EUR",
                "--region",
                "eu",
                "--cpus",
                "4",
                "--memory",
                "8GiB",
            ],
        )
        .ok
    });
    let offers = json(&slapctl(slap, &certs, "alice", &["--json", "offer", "show"]));
    assert_eq!(offers[0]["provider"], "bob");
    assert_eq!(offers[0]["price_per_hour"], "0.040000");
    assert_eq!(offers[0]["partitions_busy"], 1, "alice's blog");
    let bought = json(&slapctl(
        slap,
        &certs,
        "alice",
        &[
            "--json",
            "request",
            "market-app",
            SR,
            "--sla",
            "max_price=0.05EUR",
            "--sla",
            "region=eu",
            "--sla",
            "min_memory=4GiB",
        ],
    ));
    assert_eq!(bought["computer"], "COMP-1");
    assert_eq!(bought["agreement"]["price_per_hour_micros"], 40_000);
    assert_eq!(bought["agreement"]["provider"], "bob");
    let shown = slapctl(slap, &certs, "alice", &["show", "market-app"]);
    assert!(
        shown.stdout.contains("price: 0.040000 EUR per partition-hour from bob"),
        "{}",
        shown.stdout
    );
    let waiting = slapctl(
        slap,
        &certs,
        "alice",
        &["request", "too-cheap", SR, "--sla", "max_price=0.01EUR"],
    );
    assert!(
        waiting.ok && waiting.stdout.contains("not placed yet") && waiting.stdout.contains("max_price 0.010000 EUR"),
        "{}{}",
        waiting.stdout,
        waiting.stderr
    );
    let statement = slapctl(
        slap,
        &certs,
        "bob",
        &["usage", "--period", "2026-12", "--provider", "bob"],
    );
    assert!(
        statement.ok && statement.stdout.contains("statement of provider bob"),
        "{}",
        statement.stderr
    );
    let not_hers = slapctl(
        slap,
        &certs,
        "alice",
        &["usage", "--period", "2026-12", "--provider", "bob"],
    );
    assert!(!not_hers.ok, "{}", not_hers.stdout);
    let withdrawn = slapctl(slap, &certs, "bob", &["offer", "withdraw", "COMP-1"]);
    assert!(
        withdrawn.ok && withdrawn.stdout.contains("withdrawn"),
        "{}",
        withdrawn.stderr
    );
    let kept = json(&slapctl(slap, &certs, "alice", &["--json", "show", "market-app"]));
    assert_eq!(
        kept["agreement"]["price_per_hour_micros"], 40_000,
        "running instances keep their price"
    );
    assert!(slapctl(slap, &certs, "alice", &["destroy", "too-cheap"]).ok);

    // Without a Master or a certificate: what to give.
    let out = Command::new(slapctl_bin()).args(["list"]).env_clear().output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--master"));

    // Destroying what was never placed: forgotten at once.
    let parked = slapctl(
        slap,
        &certs,
        "alice",
        &["request", "parked", SR, "--sla", "computer_guid=NOWHERE"],
    );
    assert!(
        parked.ok && parked.stdout.contains("not placed yet"),
        "{}",
        parked.stdout
    );
    let forgotten = slapctl(slap, &certs, "alice", &["destroy", "parked"]);
    assert!(
        forgotten.ok && forgotten.stdout.contains("never placed"),
        "{}{}",
        forgotten.stdout,
        forgotten.stderr
    );
    assert!(!slapctl(slap, &certs, "alice", &["show", "parked"]).ok);

    let gone = slapctl(slap, &certs, "alice", &["destroy", "blog"]);
    assert!(gone.ok, "{}", gone.stderr);
    let after = json(&slapctl(slap, &certs, "alice", &["--json", "show", "blog"]));
    assert_eq!(after["requested_state"], "destroyed");

    let completions = slapctl(slap, &certs, "alice", &["completions", "bash"]);
    assert!(completions.ok && completions.stdout.contains("slapctl"));
}
