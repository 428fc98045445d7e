//! Talking to the Master over SLAP, with failover.
//!
//! The agent speaks the same HTTP protocol slapgrid speaks, so it works
//! against any replica (a follower forwards), a gateway, or several of them:
//! a connection failure or a 5xx moves on to the next URL, and the one that
//! answered is tried first next time. A 4xx is the Master's answer and is
//! returned as is.
//!
//! [`ComputerPlan`] is the typed reading of `getFullComputerInformation`:
//! which releases to install and what each partition should be.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use slap_proto::form;
use slap_proto::live::{LiveIdentity, LiveServerVerifier, LiveTrust};
use slap_proto::marshal::{self, Value};

/// Why a call to the Master failed.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// No URL answered (connection refused, timeout, or only 5xx).
    #[error("no master reachable ({0})")]
    Unreachable(String),
    /// The Master refused the call.
    #[error("master answered {status}: {message}")]
    Rejected { status: u16, message: String },
    /// The answer could not be read.
    #[error("unreadable answer from the master: {0}")]
    Invalid(String),
}

/// A SLAP client over a list of replica or gateway URLs.
pub struct MasterClient {
    urls: Vec<String>,
    preferred: AtomicUsize,
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
    live: Option<LiveTls>,
}

/// The computer's certificate, key and the cluster's CA (PEM), as
/// `nodeagent register` writes them: used for `https://` Master URLs.
#[derive(Clone)]
pub struct TlsIdentity {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsIdentity {
    /// Reads `computer.crt`, `computer.key` and `ca.crt` from `dir`.
    pub fn load(dir: &std::path::Path) -> Result<TlsIdentity, MasterError> {
        let read = |f: &str| {
            std::fs::read_to_string(dir.join(f)).map_err(|e| {
                MasterError::Invalid(format!(
                    "{}/{f}: {e} (an https master needs this computer's certificate: run `nodeagent register`)",
                    dir.display()
                ))
            })
        };
        Ok(TlsIdentity {
            ca_pem: read("ca.crt")?,
            cert_pem: read("computer.crt")?,
            key_pem: read("computer.key")?,
        })
    }

    /// The certificate, key and CAs as live ones: what the client presents
    /// and trusts can be replaced while it runs.
    fn live(&self) -> Result<LiveTls, MasterError> {
        let bad = |e: slap_proto::tls::TlsError| MasterError::Invalid(format!("TLS identity: {e}"));
        Ok(LiveTls {
            identity: LiveIdentity::from_pem(&self.cert_pem, &self.key_pem, vec![]).map_err(bad)?,
            trust: LiveTrust::from_pem(&self.ca_pem).map_err(bad)?,
        })
    }
}

/// The computer's certificate and the CAs it trusts, both replaceable
/// while the agent runs.
#[derive(Clone)]
pub struct LiveTls {
    pub identity: Arc<LiveIdentity>,
    pub trust: Arc<LiveTrust>,
}

impl LiveTls {
    fn client_config(&self) -> Result<rustls::ClientConfig, MasterError> {
        Ok(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(|e| MasterError::Invalid(format!("TLS identity: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(LiveServerVerifier::new(self.trust.clone()))
                .with_client_cert_resolver(self.identity.clone()),
        )
    }
}

/// Takes a renewed `computer.crt` and `computer.key`, and a new `ca.crt`
/// (two CAs during a CA rotation), from `dir` without a restart, as
/// `master-node cert renew SERIAL --out DIR` writes them: read every
/// second, taken once the pair matches; the next connections present and
/// trust them, those open keep the old ones (still valid until they expire).
pub async fn follow_identity_files(tls: LiveTls, dir: std::path::PathBuf) {
    let mut last_error = String::new();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        take_identity_files(&tls, &dir, &mut last_error);
    }
}

/// As [`follow_identity_files`], and renews the computer's certificate
/// itself at two thirds of its lifetime, through `master_url`'s native API
/// (`RenewCertificate`, which answers a computer for its own certificate
/// only): the new pair and the CAs are written into `dir` and taken. A
/// failed renewal is tried again every 10 seconds.
///
/// Every `ca_check` it also asks the cluster's CAs (the native `Cluster`
/// call). When they changed (a CA rotation began or ended) it writes them
/// to `ca.crt` and trusts them, and renews its certificate at once if the
/// CA that signs now did not issue it: nodes move to a new CA by
/// themselves, as replicas and gateways do.
pub async fn keep_identity_current(tls: LiveTls, dir: std::path::PathBuf, master_url: String, ca_check: Duration) {
    let mut last_error = String::new();
    let mut last_ca_error = String::new();
    let (mut next_try, mut next_ca_check) = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        take_identity_files(&tls, &dir, &mut last_error);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        if now >= next_ca_check {
            next_ca_check = now + ca_check.as_secs().max(1);
            match follow_cluster_cas(&tls, &dir, &master_url).await {
                Ok(()) => last_ca_error.clear(),
                Err(e) if e != last_ca_error => {
                    tracing::warn!(error = %e, "cannot learn the cluster's CAs; keeping the ones in use");
                    last_ca_error = e;
                }
                Err(_) => {}
            }
        }
        let Some(held) = tls.identity.validity() else { continue };
        // After a CA rotation, a certificate the signing CA did not issue is renewed at once.
        let from_old_ca = slap_proto::live::from_another_ca(&tls.identity, &tls.trust);
        if !(slap_proto::live::renewal_due(&held, now) || from_old_ca) || now < next_try {
            continue;
        }
        match renew_own(&tls, &dir, &master_url, &held.serial).await {
            Ok(serial) if from_old_ca => tracing::info!(old = %held.serial, new = %serial,
                "computer certificate renewed under the cluster's new CA"),
            Ok(serial) => tracing::info!(old = %held.serial, new = %serial,
                "computer certificate renewed at two thirds of its lifetime"),
            Err(e) => {
                tracing::warn!(serial = %held.serial, not_after = held.not_after, error = %e,
                    "computer certificate due for renewal, not renewed; trying again");
                next_try = now + 10;
            }
        }
    }
}

fn take_identity_files(tls: &LiveTls, dir: &std::path::Path, last_error: &mut String) {
    let (crt, key, ca) = (dir.join("computer.crt"), dir.join("computer.key"), dir.join("ca.crt"));
    let taken = tls.trust.reload(&ca).and_then(|cas_changed| {
        if cas_changed {
            tracing::info!(
                cas = tls.trust.certificates().len(),
                "trusting the CAs of {} from now on",
                ca.display()
            );
        }
        tls.identity.reload(&crt, &key)
    });
    match taken {
        Ok(Some(v)) => {
            tracing::info!(serial = %v.serial, not_after = v.not_after, "computer certificate taken from {}", crt.display());
            last_error.clear();
        }
        Ok(None) => {}
        Err(e) if e.to_string() != *last_error => {
            tracing::warn!(error = %e, "computer certificate or CAs on disk not taken; keeping the ones in use");
            *last_error = e.to_string();
        }
        Err(_) => {}
    }
}

/// The native API of `master_url` (a gateway or a replica, https), as this
/// computer; the address, for errors.
fn native_api(
    tls: &LiveTls,
    master_url: &str,
) -> Result<
    (
        slap_proto::master::master_client::MasterClient<tonic::transport::Channel>,
        String,
    ),
    String,
> {
    let addr = master_url
        .strip_prefix("https://")
        .ok_or_else(|| format!("{master_url} is not an https URL"))?
        .trim_end_matches('/');
    let config = slap_proto::tls::client_config_live(
        &slap_proto::tls::Trust::Live(tls.trust.clone()),
        tls.identity.clone(),
        slap_proto::tls::Expect::ReplicaOrGateway,
    )
    .map_err(|e| e.to_string())?;
    let channel = slap_proto::tls::channel(addr, config).map_err(|e| e.to_string())?;
    Ok((
        slap_proto::master::master_client::MasterClient::new(channel),
        addr.to_string(),
    ))
}

/// Asks `master_url` which CAs the cluster trusts and, when they differ
/// from those in use, writes them to `dir/ca.crt` and trusts them.
async fn follow_cluster_cas(tls: &LiveTls, dir: &std::path::Path, master_url: &str) -> Result<(), String> {
    let (mut native, addr) = native_api(tls, master_url)?;
    let call = native.cluster(slap_proto::master::ClusterRequest::default());
    let view = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| format!("{addr}: no answer within 10 s"))?
        .map_err(|s| format!("{addr}: {}", s.message()))?
        .into_inner();
    if view.ca_pem.is_empty() || view.ca_pem == tls.trust.pem() {
        return Ok(());
    }
    slap_proto::live::write_then_rename(&dir.join("ca.crt"), &view.ca_pem, 0o644)
        .map_err(|e| format!("writing {}/ca.crt: {e}", dir.display()))?;
    tls.trust.replace(&view.ca_pem).map_err(|e| e.to_string())?;
    tracing::info!(
        cas = tls.trust.certificates().len(),
        "trusting the cluster's CAs from now on (a CA rotation began or ended)"
    );
    Ok(())
}

/// Asks `master_url` (a gateway or a replica, https) to renew `serial`,
/// writes the answer into `dir` and takes it; the new serial.
async fn renew_own(tls: &LiveTls, dir: &std::path::Path, master_url: &str, serial: &str) -> Result<String, String> {
    let (mut native, addr) = native_api(tls, master_url)?;
    let call = native.renew_certificate(slap_proto::master::RenewCertificateRequest {
        serial: serial.to_string(),
        seconds: 0,
    });
    let renewed = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .map_err(|_| format!("{addr}: no answer within 10 s"))?
        .map_err(|s| format!("{addr}: {}", s.message()))?
        .into_inner();
    let (crt, key) = (dir.join("computer.crt"), dir.join("computer.key"));
    if !renewed.ca_pem.is_empty() {
        slap_proto::live::write_then_rename(&dir.join("ca.crt"), &renewed.ca_pem, 0o644)
            .map_err(|e| format!("writing {}/ca.crt: {e}", dir.display()))?;
        tls.trust.replace(&renewed.ca_pem).map_err(|e| e.to_string())?;
    }
    // On disk first: a restart takes the new pair too.
    slap_proto::live::install(&crt, &renewed.certificate_pem, &key, &renewed.key_pem)
        .map_err(|e| format!("writing {}: {e}", crt.display()))?;
    tls.identity
        .replace(&renewed.certificate_pem, &renewed.key_pem)
        .map_err(|e| e.to_string())?;
    Ok(slap_proto::live::Validity::of_pem(&renewed.certificate_pem)
        .map(|v| v.serial)
        .unwrap_or_default())
}

/// What a GET returned.
pub enum Fetched {
    /// The document, with its ETag.
    Body(Bytes, Option<String>),
    /// 304: what the caller already has is current.
    NotModified,
}

impl MasterClient {
    /// A client over plain `http://` URLs (with or without a trailing slash).
    pub fn new(urls: &[String]) -> MasterClient {
        Self::with_identity(urls, None).expect("a client without TLS identity always builds")
    }

    /// A client over `urls`; `https://` ones authenticate with `identity`
    /// (mutual TLS, the server checked against the cluster's CA).
    pub fn with_identity(urls: &[String], identity: Option<&TlsIdentity>) -> Result<MasterClient, MasterError> {
        if identity.is_none() && urls.iter().any(|u| u.starts_with("https://")) {
            return Err(MasterError::Invalid(
                "an https:// master needs this computer's certificate (--identity-dir, written by `nodeagent register`)"
                    .into(),
            ));
        }
        let live = identity.map(TlsIdentity::live).transpose()?;
        let tls = match &live {
            Some(live) => live.client_config()?,
            _ => rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| MasterError::Invalid(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(Duration::from_secs(3)));
        http.set_nodelay(true);
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        Ok(MasterClient {
            urls: urls.iter().map(|u| u.trim_end_matches('/').to_string()).collect(),
            preferred: AtomicUsize::new(0),
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout: Duration::from_secs(60),
            live,
        })
    }

    /// The certificate this client presents and the CAs it trusts, when
    /// it has them: replace them (or [`follow_identity_files`]) and the
    /// next connections use the new ones.
    pub fn tls(&self) -> Option<&LiveTls> {
        self.live.as_ref()
    }

    /// The URL partitions' own tools should use (the first configured).
    pub fn primary_url(&self) -> &str {
        self.urls.first().map(String::as_str).unwrap_or("")
    }

    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<String>,
        headers: &[(&str, String)],
        timeout: Duration,
    ) -> Result<(StatusCode, Option<String>, Bytes), MasterError> {
        if self.urls.is_empty() {
            return Err(MasterError::Unreachable("no master URL configured".into()));
        }
        let start = self.preferred.load(Ordering::Relaxed);
        let mut failures = Vec::new();
        for k in 0..self.urls.len() {
            let i = (start + k) % self.urls.len();
            let url = format!("{}/{}", self.urls[i], path_and_query);
            let mut req = Request::builder().method(method.clone()).uri(&url);
            for (name, value) in headers {
                req = req.header(*name, value);
            }
            if body.is_some() {
                req = req.header("content-type", "application/x-www-form-urlencoded");
            }
            let req = req
                .body(Full::new(Bytes::from(body.clone().unwrap_or_default())))
                .map_err(|e| MasterError::Invalid(format!("bad URL {url}: {e}")))?;
            let result = tokio::time::timeout(timeout, async {
                let resp = self.client.request(req).await?;
                let status = resp.status();
                let etag = resp
                    .headers()
                    .get("etag")
                    .and_then(|v| v.to_str().ok())
                    .map(String::from);
                let bytes = resp.into_body().collect().await?.to_bytes();
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, etag, bytes))
            })
            .await;
            match result {
                Ok(Ok((status, _, bytes))) if status.is_server_error() => {
                    failures.push(format!(
                        "{}: {status} {}",
                        self.urls[i],
                        String::from_utf8_lossy(&bytes)
                    ));
                }
                Ok(Ok(answer)) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(answer);
                }
                Ok(Err(e)) => failures.push(format!("{}: {e}", self.urls[i])),
                Err(_) => failures.push(format!("{}: no answer within {timeout:?}", self.urls[i])),
            }
        }
        Err(MasterError::Unreachable(failures.join("; ")))
    }

    /// GET `path?query`, with `If-None-Match` when `etag` is given.
    pub async fn get(&self, path: &str, query: &[(&str, &str)], etag: Option<&str>) -> Result<Fetched, MasterError> {
        self.get_waiting(path, query, etag, None).await
    }

    /// As [`get`](Self::get), asking the Master to hold the answer up to `wait`
    /// until the document changes (a long poll: the node's watch).
    pub async fn get_waiting(
        &self,
        path: &str,
        query: &[(&str, &str)],
        etag: Option<&str>,
        wait: Option<Duration>,
    ) -> Result<Fetched, MasterError> {
        let mut headers = Vec::new();
        if let Some(tag) = etag {
            headers.push(("if-none-match", tag.to_string()));
        }
        let mut timeout = self.timeout;
        if let Some(wait) = wait {
            headers.push(("x-slap-wait", wait.as_secs().to_string()));
            timeout += wait;
        }
        let (status, etag, body) = self
            .call(
                Method::GET,
                &format!("{path}?{}", encode(query)),
                None,
                &headers,
                timeout,
            )
            .await?;
        match status {
            StatusCode::NOT_MODIFIED => Ok(Fetched::NotModified),
            s if s.is_success() => Ok(Fetched::Body(body, etag)),
            s => Err(rejected(s, &body)),
        }
    }

    /// POST a form; returns the body of a 2xx answer.
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> Result<Bytes, MasterError> {
        // The header slapos.slap sends for a partition's own calls.
        let mut headers = Vec::new();
        let get = |k: &str| fields.iter().find(|(n, _)| *n == k).map(|(_, v)| *v);
        if let (Some(c), Some(p)) = (get("computer_id"), get("computer_partition_id")) {
            headers.push((
                "authorization",
                format!("X-SlapPartition computer_id={c}, computer_partition_id={p}"),
            ));
        }
        let (status, _, body) = self
            .call(Method::POST, path, Some(encode(fields)), &headers, self.timeout)
            .await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(rejected(status, &body))
        }
    }

    /// The computer's plan; `None` when `etag` is still current.
    pub async fn computer_plan(
        &self,
        computer_id: &str,
        etag: Option<&str>,
        wait: Option<Duration>,
    ) -> Result<Option<(ComputerPlan, Option<String>)>, MasterError> {
        match self
            .get_waiting(
                "getFullComputerInformation",
                &[("computer_id", computer_id)],
                etag,
                wait,
            )
            .await?
        {
            Fetched::NotModified => Ok(None),
            Fetched::Body(body, tag) => {
                let text = std::str::from_utf8(&body).map_err(|e| MasterError::Invalid(e.to_string()))?;
                let value = marshal::loads(text).map_err(|e| MasterError::Invalid(e.to_string()))?;
                Ok(Some((ComputerPlan::from_value(&value)?, tag)))
            }
        }
    }
}

fn rejected(status: StatusCode, body: &[u8]) -> MasterError {
    MasterError::Rejected {
        status: status.as_u16(),
        message: String::from_utf8_lossy(body).trim().chars().take(500).collect(),
    }
}

fn encode(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| format!("{}={}", form::encode(k), form::encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

// ----- the plan ---------------------------------------------------------------

/// What the Master wants of this computer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ComputerPlan {
    /// (url, requested state "available" or "destroyed").
    pub software: Vec<(String, String)>,
    pub partitions: Vec<PartitionPlan>,
}

/// What the Master wants of one partition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionPlan {
    pub id: String,
    /// None when the partition is free.
    pub instance: Option<InstancePlan>,
}

/// The instance a partition holds.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InstancePlan {
    pub guid: String,
    pub title: String,
    pub root_title: String,
    /// started, stopped or destroyed.
    pub requested_state: String,
    pub software_release: String,
    pub software_type: String,
    /// The Master's timestamp: the instance changed when it changed.
    pub timestamp: String,
    /// String parameters as requested.
    pub parameters: BTreeMap<String, String>,
    /// Shared instances this instance hosts.
    pub shared: Vec<SharedPlan>,
    /// `_access_status` as last reported, if any.
    pub access_status: Option<String>,
    /// The serial of the certificate the partition should hold, when the
    /// Master says (`_certificate_serial`, our Master's own attribute).
    pub certificate_serial: Option<String>,
}

/// A shared instance hosted by a partition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SharedPlan {
    pub reference: String,
    pub title: String,
    pub parameters: BTreeMap<String, String>,
}

fn attrs(v: &Value) -> Option<&[(Value, Value)]> {
    match v {
        Value::Object(o) => Some(&o.attrs),
        Value::Dict(d) => Some(d),
        _ => None,
    }
}

fn attr<'a>(entries: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    entries.iter().find(|(k, _)| k.as_str() == Some(key)).map(|(_, v)| v)
}

fn str_attr(entries: &[(Value, Value)], key: &str) -> String {
    attr(entries, key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn list(v: Option<&Value>) -> &[Value] {
    match v {
        Some(Value::List(l)) | Some(Value::Tuple(l)) => l,
        _ => &[],
    }
}

fn string_params(entries: &[(Value, Value)]) -> BTreeMap<String, String> {
    entries
        .iter()
        .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
        .collect()
}

impl ComputerPlan {
    /// Reads a marshalled `Computer`.
    pub fn from_value(v: &Value) -> Result<ComputerPlan, MasterError> {
        let bad = |m: &str| MasterError::Invalid(format!("computer document: {m}"));
        let computer = attrs(v).ok_or_else(|| bad("not an object"))?;
        let mut plan = ComputerPlan::default();
        for sr in list(attr(computer, "_software_release_list")) {
            let a = attrs(sr).ok_or_else(|| bad("a software release is not an object"))?;
            plan.software
                .push((str_attr(a, "_software_release"), str_attr(a, "_requested_state")));
        }
        for p in list(attr(computer, "_computer_partition_list")) {
            let a = attrs(p).ok_or_else(|| bad("a partition is not an object"))?;
            let id = str_attr(a, "_partition_id");
            let release = attr(a, "_software_release_document").and_then(attrs);
            let instance = match release {
                None => None,
                Some(sr) => {
                    let params = attr(a, "_parameter_dict").and_then(attrs).unwrap_or(&[]);
                    let shared = list(attr(params, "slave_instance_list"))
                        .iter()
                        .filter_map(|s| {
                            let d = attrs(s)?;
                            Some(SharedPlan {
                                reference: str_attr(d, "slave_reference"),
                                title: str_attr(d, "slave_title"),
                                parameters: string_params(d),
                            })
                        })
                        .collect();
                    let access = attr(a, "_access_status").and_then(Value::as_str).map(String::from);
                    Some(InstancePlan {
                        guid: str_attr(a, "_instance_guid"),
                        title: str_attr(params, "instance_title"),
                        root_title: str_attr(params, "root_instance_title"),
                        requested_state: str_attr(a, "_requested_state"),
                        software_release: str_attr(sr, "_software_release"),
                        software_type: str_attr(params, "slap_software_type"),
                        timestamp: str_attr(params, "timestamp"),
                        parameters: string_params(params),
                        shared,
                        access_status: access,
                        certificate_serial: attr(a, "_certificate_serial").and_then(Value::as_str).map(String::from),
                    })
                }
            };
            plan.partitions.push(PartitionPlan { id, instance });
        }
        Ok(plan)
    }
}
