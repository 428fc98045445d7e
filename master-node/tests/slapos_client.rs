//! Conformance with the unmodified SlapOS client (PyPI slapos.core 1.26.1):
//! `slapos node format`, `slapos supply` and `slapos request` (a root with
//! parameters that need escaping, a shared instance, a destruction) against
//! three `master-node` replicas behind `slap-gateway`, with the leader
//! SIGKILLed in the middle. `scripts/setup.sh` installs the client and
//! exports `SLAPOS_BIN`.
//!
//! `slapos node software|instance|report` with a buildout release are in
//! `slapgrid.rs` (they run as root and make Unix users).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{attrs, get, http, SlapCluster};
use slap_proto::marshal::{loads, Value};

fn slapos_bin() -> PathBuf {
    let path = std::env::var_os("SLAPOS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/slapos-venv/bin/slapos"));
    assert!(
        path.exists(),
        "the slapos client is not installed at {}: run scripts/setup.sh (it installs slapos.core 1.26.1) or set SLAPOS_BIN",
        path.display()
    );
    path
}

fn slapos(dir: &Path, args: &[&str]) -> String {
    let out = Command::new(slapos_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run slapos");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "slapos {args:?} failed:\n{text}");
    text
}

/// Formats computer COMP-1 of three partitions with `slapos node format`,
/// from a definition file (no users, taps or addresses touched on this
/// machine), against the Master at `slap`.
fn format_node(root: &Path, slap: u16) {
    let node = root.join("node");
    for p in 0..3 {
        std::fs::create_dir_all(node.join(format!("srv/slapgrid/slappart{p}"))).unwrap();
    }
    std::fs::create_dir_all(node.join("opt/slapgrid")).unwrap();
    let n = node.display();
    std::fs::write(
        node.join("slapos.cfg"),
        format!(
            "[slapos]\ncomputer_id = COMP-1\nmaster_url = http://127.0.0.1:{slap}/\nsoftware_root = {n}/opt/slapgrid\n\
             instance_root = {n}/srv/slapgrid\n\n[slapformat]\nalter_user = False\nalter_network = False\n\
             create_tap = False\npartition_has_ipv6_range = False\npartition_amount = 3\ncomputer_xml = {n}/slapos.xml\n\
             computer_json = {n}/slapos.json\ninput_definition_file = {n}/definition.cfg\npartition_base_name = slappart\n\
             user_base_name = slapuser\ntap_base_name = slaptap\nipv4_local_network = 10.0.0.0/16\ninterface_name = lo\n"
        ),
    )
    .unwrap();
    let mut definition = String::from("[computer]\naddress = fd00::2/ffff:ffff:ffff:ffff::\nsoftware_user = root\n");
    for p in 0..3 {
        definition.push_str(&format!(
            "\n[partition_{p}]\npathname = slappart{p}\nuser = root\nnetwork_interface = lo\n\
             address = 10.0.0.1{p}/255.255.255.255 fd00::2:1{p}/ffff:ffff:ffff:ffff::\n"
        ));
    }
    std::fs::write(node.join("definition.cfg"), definition).unwrap();
    slapos(root, &["node", "format", "--cfg", &format!("{n}/slapos.cfg"), "--now"]);
}

#[test]
fn real_slapos_client_formats_supplies_and_requests() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut cluster = SlapCluster::start(&root.join("cluster"));
    let slap = cluster.gateway_port;

    format_node(root, slap);
    std::fs::write(
        root.join("client.cfg"),
        format!("[slapos]\nmaster_url = http://127.0.0.1:{slap}/\nmaster_rest_url = http://127.0.0.1:{slap}/hateoas\n[slapconsole]\n"),
    )
    .unwrap();
    let sr = root.join("software.cfg");
    std::fs::write(&sr, "[buildout]\n").unwrap();
    let sr = sr.display().to_string();

    slapos(root, &["supply", &sr, "COMP-1", "--cfg", "client.cfg"]);
    // The leader dies in the middle; every later command must still succeed.
    cluster.kill_leader();
    let out = slapos(
        root,
        &[
            "request",
            "myinst",
            &sr,
            "--cfg",
            "client.cfg",
            "--parameters",
            "foo=bar",
            "baz=a<b&c \"q\" été",
        ],
    );
    assert!(out.contains("State is : started."), "{out}");
    let out = slapos(
        root,
        &[
            "request",
            "web-shared",
            &sr,
            "--slave",
            "--cfg",
            "client.cfg",
            "--parameters",
            "domain=a.example",
        ],
    );
    assert!(out.contains("Instance requested"), "{out}");

    // The HATEOAS subset: service list / info, computer list / info.
    let out = slapos(root, &["service", "list", "--cfg", "client.cfg"]);
    assert!(out.contains("\"myinst\"") && out.contains("\"web-shared\""), "{out}");
    let out = slapos(root, &["service", "info", "myinst", "--cfg", "client.cfg"]);
    assert!(out.contains("\"requested-state\": \"started\""), "{out}");
    // The client prints JSON with non-ASCII escaped.
    assert!(out.contains(r#""baz": "a<b&c \"q\" \u00e9t\u00e9""#), "{out}");
    let out = slapos(root, &["computer", "info", "COMP-1", "--cfg", "client.cfg"]);
    assert!(out.contains("Computer Reference: COMP-1"), "{out}");

    // What a node polling the Master now sees.
    let (status, body) = http(slap, "GET", "/getFullComputerInformation", "computer_id=COMP-1").unwrap();
    assert_eq!(status, 200, "{body}");
    let doc = loads(&body).unwrap();
    let Value::List(parts) = get(attrs(&doc), "_computer_partition_list") else {
        panic!("no partition list")
    };
    assert_eq!(parts.len(), 3, "node format posted three partitions");
    let busy: Vec<&Value> = parts
        .iter()
        .filter(|p| get(attrs(p), "_requested_state") == &Value::str("started"))
        .collect();
    assert_eq!(
        busy.len(),
        1,
        "one instance placed; the shared one is hosted, not placed"
    );
    let Value::Dict(params) = get(attrs(busy[0]), "_parameter_dict") else {
        panic!("no parameters")
    };
    assert_eq!(
        get(params, "baz"),
        &Value::str("a<b&c \"q\" été"),
        "parameters survive the client's double escaping"
    );
    let Value::List(slaves) = get(params, "slave_instance_list") else {
        panic!("no slave list")
    };
    assert_eq!(slaves.len(), 1, "the shared instance is listed on its host");

    let out = slapos(
        root,
        &["request", "myinst", &sr, "--cfg", "client.cfg", "--state", "destroyed"],
    );
    assert!(out.contains("State is : destroyed"), "{out}");
}

/// A tree changed through its states with the client library itself
/// (`OpenOrder.request`, `ComputerPartition.request`): a root, a child the
/// root requests, a shared instance, stop, start, stop, the child destroyed
/// alone, the tree destroyed with no parameters, and destroyed twice. Each
/// call must answer the instance in its new state, never an error the
/// client raises (a 404 becomes `NotFoundError` for the user).
#[test]
fn real_client_library_takes_a_tree_through_its_states() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cluster = SlapCluster::start(&root.join("cluster"));
    let slap = cluster.gateway_port;
    format_node(root, slap);
    let sr = "https://lab.example.org/blog/software.cfg";
    let (status, body) = http(
        slap,
        "POST",
        "/supplySupply",
        &common::form(&[("url", sr), ("computer_id", "COMP-1"), ("state", "available")]),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let python = slapos_bin().with_file_name("python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/tree_states.py");
    let out = Command::new(&python)
        .arg(&script)
        .args([&format!("http://127.0.0.1:{slap}/"), sr, "COMP-1"])
        .output()
        .expect("run the client library");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("all steps passed"), "{text}");
}

/// Like [`slapos`], but returns whether it succeeded and what it printed.
fn slapos_try(dir: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(slapos_bin())
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run slapos");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn master_node(args: &[&str]) -> String {
    let out = Command::new(common::BIN).args(args).output().expect("run master-node");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "master-node {args:?} failed:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn real_slapos_client_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let raft = format!("127.0.0.1:{}", common::free_port());
    let slap = common::free_port();
    let data = root.join("replica");
    let _replica = common::Proc::spawn(
        Path::new(common::BIN),
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
    common::wait_for("the replica", || token_file.exists());
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    let ids = root.join("ids");
    // The CA appears a moment after the cluster: retry the first issue.
    let start = std::time::Instant::now();
    loop {
        let out = Command::new(common::BIN)
            .args(["user", "add", "ops", "--admin-role", "--peer", &raft, "--token", &token])
            .arg("--out")
            .arg(&ids)
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(20),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    master_node(&[
        "user",
        "add",
        "alice",
        "--peer",
        &raft,
        "--token",
        &token,
        "--out",
        &ids.display().to_string(),
    ]);
    master_node(&[
        "user",
        "add",
        "bob",
        "--peer",
        &raft,
        "--token",
        &token,
        "--out",
        &ids.display().to_string(),
    ]);
    let key = |f: &str| std::fs::metadata(ids.join(f)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key("alice.key").permissions().mode() & 0o777, 0o600, "keys are private");

    let cfg = |name: &str| {
        let path = root.join(format!("{name}.cfg"));
        let i = ids.display();
        std::fs::write(
            &path,
            format!(
                "[slapos]\nmaster_url = https://127.0.0.1:{slap}/\nmaster_rest_url = https://127.0.0.1:{slap}/hateoas\n\
                 [slapconsole]\nkey_file = {i}/{name}.key\ncert_file = {i}/{name}.crt\n"
            ),
        )
        .unwrap();
        path.display().to_string()
    };
    let (ops, alice, bob) = (cfg("ops"), cfg("alice"), cfg("bob"));
    let sr = "https://lab.example.org/sr/software.cfg";
    // Nothing to place it on yet: accepted and pending, over HTTPS (the
    // client exits non-zero while an instance is being provisioned).
    let (_, out) = slapos_try(
        root,
        &["request", "alice-inst", sr, "--cfg", &alice, "--parameters", "a=<&\"é"],
    );
    assert!(out.contains("Instance requested. Master is provisioning it."), "{out}");
    let (_, out) = slapos_try(root, &["request", "bob-inst", sr, "--cfg", &bob]);
    assert!(out.contains("Instance requested. Master is provisioning it."), "{out}");
    // Each user lists only their own services.
    let out = slapos(root, &["service", "list", "--cfg", &alice]);
    assert!(out.contains("alice-inst") && !out.contains("bob-inst"), "{out}");
    // Supplying is for administrators.
    let (ok, out) = slapos_try(root, &["supply", sr, "COMP-1", "--cfg", &alice]);
    assert!(!ok, "a user supplied: {out}");
    // A node registered with a one-time token formats itself over HTTPS
    // with its computer certificate (definition file: nothing on this
    // machine changes), then the administrator supplies it.
    let registration = master_node(&["computer", "add", "COMP-T", "--peer", &raft, "--token", &token]);
    let node = root.join("node");
    std::fs::create_dir_all(node.join("opt")).unwrap();
    std::fs::create_dir_all(node.join("srv/slappart0")).unwrap();
    let agent = Path::new(common::BIN).with_file_name("nodeagent");
    let out = Command::new(&agent)
        .args([
            "register",
            "--master",
            &raft,
            "--token",
            registration.trim(),
            "--computer-id",
            "COMP-T",
            "--out",
        ])
        .arg(&node)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let n = node.display();
    std::fs::write(
        node.join("slapos.cfg"),
        format!(
            "[slapos]\ncomputer_id = COMP-T\nmaster_url = https://127.0.0.1:{slap}/\nkey_file = {n}/computer.key\n\
             cert_file = {n}/computer.crt\nsoftware_root = {n}/opt\ninstance_root = {n}/srv\n\n[slapformat]\n\
             alter_user = False\nalter_network = False\ncreate_tap = False\npartition_has_ipv6_range = False\n\
             partition_amount = 1\ncomputer_xml = {n}/slapos.xml\ncomputer_json = {n}/slapos.json\n\
             input_definition_file = {n}/definition.cfg\npartition_base_name = slappart\nuser_base_name = slapuser\n\
             tap_base_name = slaptap\nipv4_local_network = 10.0.0.0/16\ninterface_name = lo\n"
        ),
    )
    .unwrap();
    std::fs::write(
        node.join("definition.cfg"),
        "[computer]\naddress = fd00::2/ffff:ffff:ffff:ffff::\nsoftware_user = root\n\n[partition_0]\n\
         pathname = slappart0\nuser = root\nnetwork_interface = lo\naddress = 10.0.0.10/255.255.255.255 fd00::2:10/ffff:ffff:ffff:ffff::\n",
    )
    .unwrap();
    slapos(root, &["node", "format", "--cfg", &format!("{n}/slapos.cfg"), "--now"]);
    let (ok, out) = slapos_try(root, &["supply", sr, "COMP-T", "--cfg", &ops]);
    assert!(ok, "{out}");
    // Now alice's instance can be placed on it.
    let out = slapos(
        root,
        &["request", "alice-inst", sr, "--cfg", &alice, "--parameters", "a=<&\"é"],
    );
    assert!(out.contains("State is : started."), "{out}");

    // Revoking bob's certificate shuts him out at the next handshake.
    let list = master_node(&["cert", "list", "--peer", &raft, "--token", &token]);
    let serial = list
        .lines()
        .find(|l| l.ends_with("user bob"))
        .and_then(|l| l.split_whitespace().next())
        .expect("bob's certificate is listed")
        .to_string();
    master_node(&["cert", "revoke", &serial, "--peer", &raft, "--token", &token]);
    let (ok, out) = slapos_try(root, &["service", "list", "--cfg", &bob]);
    assert!(!ok, "a revoked certificate still works: {out}");
    let (ok, out) = slapos_try(root, &["service", "list", "--cfg", &alice]);
    assert!(ok, "{out}");
}

/// The market through the unmodified client: `slapos request --node
/// max_price=... region=...` (the client's name for the SLA) through the
/// gateway lands on the cheapest computer in that region; a request no
/// offer satisfies is reported as provisioning (SLAP 408, with the reason
/// the native API shows), never failed, and is allocated as soon as an
/// offer suits it.
#[test]
fn real_slapos_request_with_market_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let cluster = SlapCluster::start(&root.join("cluster"));
    let slap = cluster.gateway_port;
    format_node(root, slap);
    std::fs::write(
        root.join("client.cfg"),
        format!("[slapos]\nmaster_url = http://127.0.0.1:{slap}/\nmaster_rest_url = http://127.0.0.1:{slap}/hateoas\n[slapconsole]\n"),
    )
    .unwrap();
    let sr = root.join("software.cfg");
    std::fs::write(&sr, "[buildout]\n").unwrap();
    let sr = sr.display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut native = rt.block_on(async { cluster.native() });
    rt.block_on(
        native.load_computer(slap_proto::master::LoadComputerRequest {
            computer_id: "COMP-2".into(),
            partitions: (0..3)
                .map(|i| slap_proto::master::PartitionSpec {
                    id: format!("slappart{i}"),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }),
    )
    .unwrap();
    for computer in ["COMP-1", "COMP-2"] {
        slapos(root, &["supply", &sr, computer, "--cfg", "client.cfg"]);
    }
    let offer = |native: &mut slap_proto::master::master_client::MasterClient<tonic::transport::Channel>,
                 computer: &str,
                 price: &str,
                 region: &str| {
        let req = slap_proto::master::SetOfferRequest {
            offer: Some(slap_proto::master::Offer {
                computer_id: computer.into(),
                price_per_hour: price.into(),
                currency: "EUR".into(),
                region: region.into(),
                partitions: 3,
                ..Default::default()
            }),
            ..Default::default()
        };
        // The cluster takes market commands once every replica has said
        // it speaks their version, a moment after it forms.
        common::wait_for("the cluster to take offers", || {
            match rt.block_on(native.set_offer(req.clone())) {
                Ok(_) => true,
                Err(s) if s.code() == tonic::Code::FailedPrecondition => false,
                Err(s) => panic!("offer refused: {s:?}"),
            }
        });
    };
    // COMP-1 is cheaper but in the US.
    offer(&mut native, "COMP-1", "0.02", "us");
    offer(&mut native, "COMP-2", "0.04", "eu");
    let out = slapos(
        root,
        &[
            "request",
            "eu-app",
            &sr,
            "--cfg",
            "client.cfg",
            "--node",
            "max_price=0.05EUR",
            "region=eu",
        ],
    );
    assert!(out.contains("State is : started."), "{out}");
    let placed = |native: &mut slap_proto::master::master_client::MasterClient<tonic::transport::Channel>,
                  title: &str| {
        rt.block_on(native.get_instance(slap_proto::master::GetInstanceRequest {
            title: title.into(),
            ..Default::default()
        }))
        .unwrap()
        .into_inner()
    };
    let eu = placed(&mut native, "eu-app");
    assert_eq!(eu.computer_id, "COMP-2", "the only offer in eu within the price");
    let terms = eu.agreement.expect("allocated through an offer");
    assert_eq!((terms.price_per_hour_micros, terms.currency.as_str()), (40_000, "EUR"));

    // Nothing at 0.01 EUR: reported as provisioning, not as an error.
    let (ok, out) = slapos_try(
        root,
        &[
            "request",
            "cheap",
            &sr,
            "--cfg",
            "client.cfg",
            "--node",
            "max_price=0.01EUR",
        ],
    );
    assert!(!ok && out.contains("Master is provisioning it"), "{out}");
    let cheap = placed(&mut native, "cheap");
    assert!(!cheap.placed);
    assert!(
        cheap.pending_reason.contains("max_price 0.010000 EUR"),
        "{}",
        cheap.pending_reason
    );
    let (status, body) = http(
        slap,
        "POST",
        "/requestComputerPartition",
        &common::form(&[
            ("software_release", &sr),
            ("partition_reference", "cheap"),
            ("software_type", "default"),
            ("shared_xml", "<marshal><bool>0</bool></marshal>"),
            ("partition_parameter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
            (
                "filter_xml",
                &slap_proto::marshal::dumps(&Value::str_dict(vec![("max_price", Value::str("0.01EUR"))])).unwrap(),
            ),
            ("state", "<marshal><none/></marshal>"),
        ]),
    )
    .unwrap();
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("max_price"), "SLAP's status says why: {body}");

    // A provider lowers its price: the waiting request takes it.
    offer(&mut native, "COMP-1", "0.01", "us");
    let out = slapos(
        root,
        &[
            "request",
            "cheap",
            &sr,
            "--cfg",
            "client.cfg",
            "--node",
            "max_price=0.01EUR",
        ],
    );
    assert!(out.contains("State is : started."), "{out}");
    assert_eq!(placed(&mut native, "cheap").computer_id, "COMP-1");
}
