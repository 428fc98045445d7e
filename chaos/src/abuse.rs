//! The `abuse` fault: a client, not a machine, misbehaves.
//!
//! `mallory`, a user with a valid certificate, sends oversized and malformed
//! calls to every door (each gateway and each replica's public port), over
//! SLAP (HTTPS, HTTP/1.1) and the native API (gRPC). Each must be refused
//! with its own 4xx or gRPC code before anything reaches the Raft log, and
//! the burst must not cost the cluster its leader: a term that moves during
//! the burst is a problem, as is a call that is accepted, answered with a
//! 5xx, or not answered at all. The workload and its checkers run on
//! unchanged beside it, so a refusal that took effect anyway would show as
//! a lost or phantom write there.
//!
//! Must not import: `run` (the nemesis calls this, not the other way).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use slap_proto::master as pb;
use slap_proto::tls::Expect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::cluster::{Cluster, ABUSER as USER};

const RELEASE: &str = "https://chaos.invalid/abuse.cfg";

/// What one burst did: how many calls, and what went wrong.
pub struct Burst {
    pub calls: usize,
    pub problems: Vec<String>,
}

/// One SLAP call and the answer it must get.
struct SlapCase {
    what: &'static str,
    path: &'static str,
    /// The body sent, and the Content-Length declared (larger than the
    /// body for a call refused by its declared length alone).
    body: Vec<u8>,
    declared: usize,
    status: u16,
    /// A word the refusal must contain (the limit it names).
    names: &'static str,
}

fn form(fields: &[(&str, &str)]) -> Vec<u8> {
    slap_proto::form::encode_fields(fields).into_bytes()
}

fn parameters_xml(bytes: usize) -> String {
    format!(
        "<marshal><dictionary id=\"i2\"><string>p</string><string>{}</string></dictionary></marshal>",
        "v".repeat(bytes)
    )
}

fn request_form(title: &str, params: &str) -> Vec<u8> {
    form(&[
        ("software_release", RELEASE),
        ("partition_reference", title),
        ("partition_parameter_xml", params),
        ("filter_xml", "<marshal><dictionary id=\"i2\"/></marshal>"),
        ("software_type", "default"),
        ("state", "<marshal><none/></marshal>"),
        ("shared_xml", "<marshal><bool>0</bool></marshal>"),
    ])
}

fn slap_cases() -> Vec<SlapCase> {
    let nested = format!(
        "<marshal>{}<none/>{}</marshal>",
        "<list id=\"i1\">".repeat(5_000),
        "</list>".repeat(5_000)
    );
    let big = request_form("abuse-big", &parameters_xml(300 << 10));
    let nested = request_form("abuse-nested", &nested);
    vec![
        SlapCase {
            what: "a 3 MiB body (declared)",
            path: "/supplySupply",
            body: b"url=x".to_vec(),
            declared: 3 << 20,
            status: 413,
            names: "body_bytes",
        },
        SlapCase {
            what: "300 KiB of instance parameters",
            path: "/requestComputerPartition",
            declared: big.len(),
            body: big,
            status: 413,
            names: "parameters_bytes",
        },
        SlapCase {
            what: "parameters nested 5,000 deep",
            path: "/requestComputerPartition",
            declared: nested.len(),
            body: nested,
            status: 400,
            names: "",
        },
        SlapCase {
            what: "a form that is not UTF-8",
            path: "/requestComputerPartition",
            body: vec![b'u', b'r', b'l', b'=', 0xff, 0xfe],
            declared: 6,
            status: 400,
            names: "",
        },
    ]
}

/// One HTTP/1.1 call over mutual TLS: the status and the start of the body.
async fn slap_call(config: Arc<rustls::ClientConfig>, addr: &str, case: &SlapCase) -> anyhow::Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from("replica")?;
    let mut tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
    let head = format!(
        "POST {} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n",
        case.path, case.declared
    );
    tls.write_all(head.as_bytes()).await?;
    // A server may answer (and close) before it has read the whole body.
    let _ = tls.write_all(&case.body).await;
    let _ = tls.flush().await;
    let mut raw = Vec::new();
    let _ = tls.take(256 << 10).read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no HTTP answer ({} bytes read)", raw.len()))?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    Ok((status, body.chars().take(300).collect()))
}

/// Native-API requests refused for their size, and the codes accepted for
/// each (a message over the transport's limit is refused by the transport).
fn native_cases() -> Vec<(&'static str, pb::RequestInstanceRequest, &'static [Code], &'static str)> {
    let request = |title: &str, value: String| pb::RequestInstanceRequest {
        title: title.into(),
        software_release: RELEASE.into(),
        software_type: "default".into(),
        parameters: [("p".to_string(), value)].into_iter().collect(),
        ..Default::default()
    };
    vec![
        (
            "300 KiB of parameters (native)",
            request("abuse-native", "v".repeat(300 << 10)),
            &[Code::InvalidArgument],
            "parameters_bytes",
        ),
        (
            "a 20 MiB message (native)",
            request("abuse-native-huge", "v".repeat(20 << 20)),
            &[Code::ResourceExhausted, Code::InvalidArgument],
            "bytes",
        ),
        (
            "an empty software release (native)",
            pb::RequestInstanceRequest {
                title: "abuse-empty".into(),
                ..Default::default()
            },
            &[Code::InvalidArgument],
            "",
        ),
    ]
}

/// The highest term any running replica reports.
async fn term(c: &Cluster, slots: &[usize]) -> u64 {
    let mut best = 0;
    for &slot in slots {
        if let Some(s) = c.status(slot).await {
            best = best.max(s.term);
        }
    }
    best
}

/// Sends every bad call to every door and checks each answer.
pub async fn burst(c: &mut Cluster) -> anyhow::Result<Burst> {
    let slots = c.running_slots();
    let mut doors: Vec<String> = c.gateways.iter().map(|(a, _)| a.clone()).collect();
    doors.extend(c.public_addrs());
    let identity = c.identity(USER)?;
    let mut http1 = (*slap_proto::tls::client_config(&c.trust()?, Some(&identity), Expect::ReplicaOrGateway)?).clone();
    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let http1 = Arc::new(http1);

    let before = term(c, &slots).await;
    let mut calls = 0;
    let mut problems = Vec::new();
    for door in &doors {
        for case in slap_cases() {
            calls += 1;
            let call = slap_call(http1.clone(), door, &case);
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(Ok((status, body))) => {
                    if status != case.status || !body.contains(case.names) {
                        problems.push(format!(
                            "{door}: {}: {status} {body:?}, expected {} naming {:?}",
                            case.what, case.status, case.names
                        ));
                    }
                }
                Ok(Err(e)) => problems.push(format!("{door}: {}: {e:#}", case.what)),
                Err(_) => problems.push(format!("{door}: {}: no answer within 10 s", case.what)),
            }
        }
        let mut native = c.native(door, USER)?;
        for (what, request, codes, names) in native_cases() {
            calls += 1;
            let call = native.request(request);
            match tokio::time::timeout(Duration::from_secs(10), call).await {
                Ok(Ok(_)) => problems.push(format!("{door}: {what}: accepted")),
                Ok(Err(s)) if codes.contains(&s.code()) && s.message().contains(names) => {}
                Ok(Err(s)) => problems.push(format!(
                    "{door}: {what}: {:?} {:?}, expected one of {codes:?} naming {names:?}",
                    s.code(),
                    s.message()
                )),
                Err(_) => problems.push(format!("{door}: {what}: no answer within 10 s")),
            }
        }
    }
    let after = term(c, &slots).await;
    if after != before {
        problems.push(format!("the term moved from {before} to {after} during the burst"));
    }
    Ok(Burst { calls, problems })
}
