//! Conformance with the unmodified SlapOS client (PyPI slapos.core 1.26.1):
//! `slapos node format`, `slapos supply` and `slapos request` (a root with
//! parameters that need escaping, a shared instance, a destruction) against
//! three `master-node` replicas behind `slap-gateway`, with the leader
//! SIGKILLed in the middle. `scripts/setup.sh` installs the client and
//! exports `SLAPOS_BIN`.
//!
//! Not covered yet: `slapos node software|instance|report` (they need a
//! buildout software release and partitions the node agent prepares).

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

#[test]
fn real_slapos_client_formats_supplies_and_requests() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let mut cluster = SlapCluster::start(&root.join("cluster"));
    let slap = cluster.gateway_port;

    // A node described by a definition file: no users, taps or addresses touched.
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
    std::fs::write(
        root.join("client.cfg"),
        format!("[slapos]\nmaster_url = http://127.0.0.1:{slap}/\nmaster_rest_url = http://127.0.0.1:{slap}/hateoas\n[slapconsole]\n"),
    )
    .unwrap();
    let sr = root.join("software.cfg");
    std::fs::write(&sr, "[buildout]\n").unwrap();
    let sr = sr.display().to_string();

    slapos(root, &["node", "format", "--cfg", &format!("{n}/slapos.cfg"), "--now"]);
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
