//! SLAP over HTTP: the endpoints the unmodified `slapos` client and slapgrid
//! call (reference section 2), on every replica.
//!
//! Writes become commands through [`Replica::write`] (forwarded to the
//! leader); the answer to a write is built once this replica has applied it,
//! so it never shows older state than the write it answers. Reads (a node's
//! poll) come from the local state.
//!
//! Status codes follow the client's expectations: 404 for what does not
//! exist, 408 while a requested instance is not placed yet, 400 with a
//! message for malformed input, and never a 5xx for a client's mistake
//! (slapgrid treats 5xx as "go offline").
//!
//! A node's poll is answered from [`DocumentCache`], keyed by the computer's
//! revision, which every change visible in the document moves (a property
//! test in `documents.rs` holds the state machine to it).
//!
//! Served so far: getFullComputerInformation (and getComputerInformation),
//! registerComputerPartition, loadComputerConfigurationFromXML, supplySupply,
//! getComputerPartitionCertificate, requestSharedInstanceCertificate (ours:
//! a frontend's site certificate, see `sites`),
//! requestComputerPartition, setComputerPartitionConnectionXml, the instance
//! and software state reports, softwareInstanceBang,
//! updateComputerPartitionRelatedInstanceList, useComputer (validated, not
//! yet booked), and getHateoasUrl (404). Polls honour `If-None-Match` (304)
//! and `X-Slap-Wait` (held until the document changes: a node's watch).
//!
//! Handlers only: must not import `native`, `dashboard`, `metrics` or the
//! server that mounts them.

mod computer;
pub mod documents;
pub mod hateoas;
mod sites;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use slap_proto::marshal::{self, Value};
use slap_proto::{form, limits};

use crate::api::ClientWrite;
use crate::authz;
use crate::replica::Replica;
use crate::state::{
    Command, Instance, InstanceReport, Master, Params, Refusal, Reply, RequestOrigin, RequestSpec, RequestedState,
    SoftwareReport, SupplyState,
};

/// An HTTP answer with a status and a plain-text message.
#[derive(Debug)]
pub struct SlapError(pub StatusCode, pub String);

impl IntoResponse for SlapError {
    fn into_response(self) -> Response {
        (self.0, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], self.1).into_response()
    }
}

fn bad(msg: impl Into<String>) -> SlapError {
    SlapError(StatusCode::BAD_REQUEST, msg.into())
}

type SlapResult = Result<Response, SlapError>;

/// Computer documents as last served, by computer: the revision they show
/// and the marshalled body. A poll of an unchanged computer (the usual case:
/// every node polls every few minutes) costs a lookup, not a rebuild.
#[derive(Default)]
pub struct DocumentCache {
    documents: std::sync::Mutex<std::collections::HashMap<String, (u64, Bytes)>>,
}

impl DocumentCache {
    /// The document of `computer` at `revision`, built by `build` if the
    /// cached one is older.
    fn get_or_build(
        &self,
        computer: &str,
        revision: u64,
        build: impl FnOnce() -> Result<String, SlapError>,
    ) -> Result<Bytes, SlapError> {
        if let Some((r, body)) = self.documents.lock().unwrap_or_else(|e| e.into_inner()).get(computer) {
            if *r == revision {
                return Ok(body.clone());
            }
        }
        let body = Bytes::from(build()?);
        self.documents
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(computer.to_string(), (revision, body.clone()));
        Ok(body)
    }
}

/// What the SLAP handlers share.
#[derive(Clone)]
struct SlapState {
    replica: Arc<Replica>,
    documents: Arc<DocumentCache>,
}

impl axum::extract::FromRef<SlapState> for Arc<Replica> {
    fn from_ref(s: &SlapState) -> Arc<Replica> {
        s.replica.clone()
    }
}

impl axum::extract::FromRef<SlapState> for Arc<DocumentCache> {
    fn from_ref(s: &SlapState) -> Arc<DocumentCache> {
        s.documents.clone()
    }
}

/// The SLAP routes of one replica (classic calls and the HATEOAS subset),
/// without the authorization, the limits and the counters the server puts
/// around them (`server::http`).
pub fn router(replica: Arc<Replica>) -> Router {
    let state = SlapState {
        replica,
        documents: Arc::new(DocumentCache::default()),
    };
    Router::new()
        .route("/getHateoasUrl", get(|| async { StatusCode::NOT_FOUND }))
        .route("/getFullComputerInformation", get(full_computer))
        .route("/getComputerInformation", get(full_computer))
        .route("/registerComputerPartition", get(register_partition))
        .route("/loadComputerConfigurationFromXML", post(load_computer))
        .route("/supplySupply", post(supply))
        .route("/requestComputerPartition", post(request))
        .route("/setComputerPartitionConnectionXml", post(set_connection))
        .route("/startedComputerPartition", post(started))
        .route("/stoppedComputerPartition", post(stopped))
        .route("/softwareInstanceError", post(instance_error))
        .route("/destroyedComputerPartition", post(destroyed))
        .route("/buildingSoftwareRelease", post(building))
        .route("/availableSoftwareRelease", post(available))
        .route("/softwareReleaseError", post(software_error))
        .route("/destroyedSoftwareRelease", post(software_destroyed))
        .route("/softwareInstanceBang", post(bang))
        .route("/updateComputerPartitionRelatedInstanceList", post(related_instances))
        .route("/getHostingSubscriptionIpList", get(tree_ips))
        .route("/computerBang", post(computer_bang))
        .route("/useComputer", post(use_computer))
        .route("/getComputerPartitionCertificate", get(partition_certificate))
        .route("/requestSharedInstanceCertificate", post(sites::site_certificate))
        .route("/hateoas", get(hateoas::root))
        .route("/hateoas/", get(hateoas::root))
        .route("/hateoas/partitions/{title}", get(hateoas::partition))
        .route("/hateoas/shared/{title}", get(hateoas::shared))
        .route("/hateoas/computers/{reference}", get(hateoas::computer))
        .with_state(state)
}

// ----- helpers ---------------------------------------------------------------

/// Form fields of a body or query string.
struct Fields(Vec<(String, String)>);

impl Fields {
    fn parse(text: &str) -> Result<Fields, SlapError> {
        form::parse(text).map(Fields).map_err(|e| bad(e.to_string()))
    }

    fn body(body: &Bytes) -> Result<Fields, SlapError> {
        let text = std::str::from_utf8(body).map_err(|_| bad("the request body is not UTF-8"))?;
        Fields::parse(text)
    }

    fn opt(&self, name: &str) -> Option<&str> {
        form::get(&self.0, name)
    }

    fn need(&self, name: &str) -> Result<&str, SlapError> {
        self.opt(name).ok_or_else(|| bad(format!("missing field {name}")))
    }

    /// A field holding an xml_marshaller document.
    fn marshalled(&self, name: &str) -> Result<Option<Value>, SlapError> {
        self.opt(name)
            .filter(|s| !s.is_empty())
            .map(|s| marshal::loads(s).map_err(|e| bad(format!("field {name}: {e}"))))
            .transpose()
    }
}

fn marshal_response(v: &Value) -> SlapResult {
    let body = marshal::dumps(v).map_err(|e| SlapError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response())
}

fn text(msg: &str) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], msg.to_string()).into_response()
}

/// Python's `str()` of a parameter value: every parameter a node sees is a string.
fn python_str(v: &Value) -> String {
    match v {
        Value::Str(s) => s.clone(),
        Value::None => "None".into(),
        Value::Bool(b) => if *b { "True" } else { "False" }.into(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => marshal::python_float_repr(*f),
        other => format!("{other:?}"),
    }
}

/// A marshalled dict of parameters as a string map.
fn string_dict(v: Option<Value>, field: &str) -> Result<Params, SlapError> {
    match v {
        None | Some(Value::None) => Ok(Params::new()),
        Some(Value::Dict(entries)) => Ok(entries.iter().map(|(k, v)| (python_str(k), python_str(v))).collect()),
        Some(_) => Err(bad(format!("field {field} must hold a dictionary"))),
    }
}

/// The partition a POST comes from: the `X-SlapPartition` header, else the form.
fn calling_partition(headers: &HeaderMap, f: &Fields) -> Option<(String, String)> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("X-SlapPartition "))
        .map(|rest| {
            let mut c = None;
            let mut p = None;
            for part in rest.split(',') {
                match part.trim().split_once('=') {
                    Some(("computer_id", v)) => c = Some(v.trim().to_string()),
                    Some(("computer_partition_id", v)) => p = Some(v.trim().to_string()),
                    _ => {}
                }
            }
            (c, p)
        });
    match from_header {
        Some((Some(c), Some(p))) => Some((c, p)),
        _ => match (f.opt("computer_id"), f.opt("computer_partition_id")) {
            (Some(c), Some(p)) if !c.is_empty() && !p.is_empty() && p != "None" => Some((c.into(), p.into())),
            _ => None,
        },
    }
}

/// Runs a command; maps refusals to SLAP status codes.
async fn run(replica: &Replica, command: Command) -> Result<(Reply, u64), SlapError> {
    let (reply, index) = replica
        .write(ClientWrite {
            request_id: None,
            command,
        })
        .await
        .map_err(|s| SlapError(StatusCode::SERVICE_UNAVAILABLE, s.message().to_string()))?;
    match reply {
        Reply::Refused(Refusal::NotFound(m)) => Err(SlapError(StatusCode::NOT_FOUND, m)),
        Reply::Refused(Refusal::Invalid(m)) => Err(bad(m)),
        Reply::Refused(Refusal::TooLarge(m)) => Err(SlapError(StatusCode::PAYLOAD_TOO_LARGE, m)),
        Reply::Refused(Refusal::NotYet(m)) => Err(SlapError(StatusCode::CONFLICT, m)),
        Reply::Refused(Refusal::Forbidden(m)) => Err(SlapError(StatusCode::FORBIDDEN, m)),
        Reply::Refused(r @ Refusal::StaleRequest { .. }) => Err(SlapError(StatusCode::CONFLICT, r.to_string())),
        other => Ok((other, index)),
    }
}

/// Runs a command answered "done". What a node repeats at every run (the
/// same publication, the same report) changes nothing: a read answers it.
async fn done(replica: &Replica, command: Command) -> SlapResult {
    if replica
        .read_if_unchanged(|state| state.changes_nothing(&command), |_| ())
        .await
        .is_some()
    {
        return Ok(text("done"));
    }
    Ok(match run(replica, command).await?.0 {
        Reply::Note(n) => text(&n),
        _ => text("done"),
    })
}

// ----- reads -----------------------------------------------------------------

/// `getFullComputerInformation`. Answers 304 when `If-None-Match` names the
/// current revision; with `X-Slap-Wait: N` as well, holds the answer up to N
/// seconds until the document changes: a node's watch, as a long poll that
/// works through any gateway or proxy.
async fn full_computer(
    State(replica): State<Arc<Replica>>,
    State(cache): State<Arc<DocumentCache>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> SlapResult {
    let f = Fields::parse(q.as_deref().unwrap_or(""))?;
    let id = f.need("computer_id")?;
    if let Some(min) = headers
        .get(limits::MIN_REVISION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    {
        caught_up(&replica, id, min).await?;
    }
    let known = headers.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok());
    // At most slap_proto::limits::POLL_HOLD_SECS; gateways allow for it.
    let hold = limits::poll_hold(headers.get(limits::POLL_HOLD_HEADER).map(|v| v.as_bytes()));
    let deadline = tokio::time::Instant::now() + hold;
    let mut held = false;
    // Woken when this computer's document changes (for a held poll).
    let notify = (!hold.is_zero()).then(|| replica.revisions.subscribe(id));
    loop {
        let changed = notify.as_ref().map(|n| n.notified());
        tokio::pin!(changed);
        if let Some(c) = changed.as_mut().as_pin_mut() {
            c.enable();
        }
        let (etag, body) = {
            let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
            let revision = state
                .computers
                .get(id)
                .map(|c| c.revision)
                .ok_or_else(|| SlapError(StatusCode::NOT_FOUND, format!("computer {id} does not exist")))?;
            let etag = limits::document_etag(id, revision);
            if known == Some(etag.as_str()) {
                (etag, None)
            } else {
                // Built under the same read lock as the revision, so the two match.
                let body = cache.get_or_build(id, revision, || {
                    let doc = documents::computer(&state, id).expect("the computer exists: its revision was just read");
                    marshal::dumps(&doc).map_err(|e| SlapError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
                })?;
                (etag, Some(body))
            }
        };
        match body {
            // Bytes clones share the cached buffer: no copy per poll.
            Some(body) => {
                let mut resp = ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], body).into_response();
                if let Ok(tag) = etag.parse() {
                    resp.headers_mut().insert(header::ETAG, tag);
                }
                return Ok(resp);
            }
            None if tokio::time::Instant::now() >= deadline => {
                let mut resp = StatusCode::NOT_MODIFIED.into_response();
                if let Ok(tag) = etag.parse() {
                    resp.headers_mut().insert(header::ETAG, tag);
                }
                return Ok(resp);
            }
            // Unchanged and held: until the document changes or the hold ends.
            None => {
                if !held {
                    held = true;
                    replica
                        .metrics
                        .polls_held
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if let Some(changed) = changed.as_mut().as_pin_mut() {
                    let _ = tokio::time::timeout_at(deadline, changed).await;
                }
            }
        }
    }
}

/// Waits until this replica applied revision `min` of `computer`'s
/// document (a gateway spreading polls over followers knows it from the
/// leader's feed); 503 after `MIN_REVISION_WAIT_MS`, so the gateway asks
/// another replica.
async fn caught_up(replica: &Replica, computer: &str, min: u64) -> Result<(), SlapError> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(limits::MIN_REVISION_WAIT_MS);
    let moved = replica.revisions.subscribe(computer);
    loop {
        let changed = moved.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let revision = {
            let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
            state.computers.get(computer).map(|c| c.revision)
        };
        if revision.is_some_and(|r| r >= min) {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Err(SlapError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "this replica has not applied revision {min} of computer {computer} yet (it has {}); ask another",
                    revision.map_or("none".to_string(), |r| r.to_string())
                ),
            ));
        }
    }
}

async fn register_partition(State(replica): State<Arc<Replica>>, RawQuery(q): RawQuery) -> SlapResult {
    let f = Fields::parse(q.as_deref().unwrap_or(""))?;
    let (c, p) = (f.need("computer_reference")?, f.need("computer_partition_reference")?);
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let part = state
        .partitions
        .get(&(c.to_string(), p.to_string()))
        .ok_or_else(|| SlapError(StatusCode::NOT_FOUND, format!("computer {c} has no partition {p}")))?;
    let doc = documents::computer_partition(&state, part);
    drop(state);
    marshal_response(&doc)
}

async fn tree_ips(State(replica): State<Arc<Replica>>, RawQuery(q): RawQuery) -> SlapResult {
    let f = Fields::parse(q.as_deref().unwrap_or(""))?;
    let (c, p) = (f.need("computer_id")?, f.need("computer_partition_id")?);
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let inst = state
        .instance_on(c, p)
        .ok_or_else(|| SlapError(StatusCode::NOT_FOUND, format!("partition {p} of {c} holds no instance")))?;
    let doc = documents::tree_ip_list(&state, inst);
    drop(state);
    marshal_response(&doc)
}

/// `slapos node bang`: noted, nothing to change (as in SlapOS' proxy); the
/// computer must exist.
async fn computer_bang(State(replica): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let id = f.need("computer_id")?;
    if !replica
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .computers
        .contains_key(id)
    {
        return Err(SlapError(
            StatusCode::NOT_FOUND,
            format!("computer {id} does not exist"),
        ));
    }
    tracing::info!(computer = %id, message = f.opt("message").unwrap_or_default(), "computer bang");
    marshal_response(&Value::str(""))
}

// ----- computers and software ---------------------------------------------------

async fn load_computer(State(replica): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let v = f.marshalled("xml")?.ok_or_else(|| bad("missing field xml"))?;
    done(&replica, computer::command(v)?).await
}

async fn supply(State(replica): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let state = match f.opt("state").unwrap_or("available") {
        "available" => SupplyState::Available,
        "destroyed" => SupplyState::Destroyed,
        other => return Err(bad(format!("state must be available or destroyed, not {other:?}"))),
    };
    done(
        &replica,
        Command::Supply {
            computer: f.need("computer_id")?.into(),
            url: f.need("url")?.into(),
            state,
        },
    )
    .await
}

async fn software_report(replica: &Replica, body: &Bytes, report: SoftwareReport) -> SlapResult {
    let f = Fields::body(body)?;
    done(
        replica,
        Command::ReportSoftware {
            computer: f.need("computer_id")?.into(),
            url: f.need("url")?.into(),
            report,
        },
    )
    .await
}

async fn building(State(r): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    software_report(&r, &body, SoftwareReport::Building).await
}

async fn available(State(r): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    software_report(&r, &body, SoftwareReport::Available).await
}

async fn software_destroyed(State(r): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    software_report(&r, &body, SoftwareReport::Destroyed).await
}

async fn software_error(State(r): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    let log = Fields::body(&body)?.opt("error_log").unwrap_or_default().to_string();
    software_report(&r, &body, SoftwareReport::Error(log)).await
}

// ----- instances -------------------------------------------------------------

async fn request(
    State(replica): State<Arc<Replica>>,
    caller: Option<axum::Extension<authz::Caller>>,
    headers: HeaderMap,
    body: Bytes,
) -> SlapResult {
    let f = Fields::body(&body)?;
    // With a certificate, the requester is who it names: a partition
    // certificate requests for itself, and only the form's fields (which the
    // authorization checked) make a request a partition's.
    let from_form = || match (f.opt("computer_id"), f.opt("computer_partition_id")) {
        (Some(c), Some(p)) => Some((c.to_string(), p.to_string())),
        _ => None,
    };
    let partition = match caller.as_ref().map(|e| &e.0 .0) {
        Some(crate::state::Role::Partition(c, p)) => Some((c.clone(), p.clone())),
        Some(_) => from_form(),
        None => calling_partition(&headers, &f),
    };
    let requester = match partition {
        Some((computer, partition)) => RequestOrigin::Partition { computer, partition },
        None => RequestOrigin::User(hateoas::user_of(&caller)),
    };
    let state = match f.marshalled("state")? {
        None | Some(Value::None) => None,
        Some(Value::Str(s)) => Some(RequestedState::parse(&s).ok_or_else(|| bad(format!("unknown state {s:?}")))?),
        Some(_) => return Err(bad("state must be a string or None")),
    };
    let shared = matches!(f.marshalled("shared_xml")?, Some(Value::Bool(true)));
    let spec = RequestSpec {
        requester,
        title: f.need("partition_reference")?.into(),
        software_release: f.need("software_release")?.into(),
        software_type: f
            .opt("software_type")
            .filter(|t| !t.is_empty())
            .unwrap_or("default")
            .into(),
        parameters: string_dict(f.marshalled("partition_parameter_xml")?, "partition_parameter_xml")?,
        sla: string_dict(f.marshalled("filter_xml")?, "filter_xml")?,
        shared,
        state,
    };
    // An identical re-request changes nothing: answered without a log entry.
    let unchanged = |state: &Master| state.unchanged_by(&spec).is_some();
    let answer = |state: &Master| state.unchanged_by(&spec).map(|inst| requested_instance(state, inst));
    if let Some(Some(answer)) = replica.read_if_unchanged(unchanged, answer).await {
        return answer;
    }
    // A destroy answers with the instance even when the write leaves none
    // (removed at once, or already gone): the client raises on a 404.
    let destroyed_view = (spec.state == Some(RequestedState::Destroyed))
        .then(|| {
            replica
                .state
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .destroyed_view(&spec)
        })
        .flatten();
    let gone = |view: Option<Instance>, why: String| match view {
        Some(view) => {
            let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
            marshal_response(&documents::software_instance(&state, &view))
        }
        None => Err(SlapError(StatusCode::NOT_FOUND, why)),
    };
    let (reply, index) = match run(&replica, Command::Request(spec)).await {
        Err(SlapError(StatusCode::NOT_FOUND, why)) => return gone(destroyed_view, why),
        result => result?,
    };
    let inst = match reply {
        Reply::Instance(inst) => inst,
        // Destroyed before it was ever placed: removed at once.
        _ => return gone(destroyed_view, "the instance is gone".into()),
    };
    if !inst.is_placed() && inst.requested_state != RequestedState::Destroyed {
        return requested_instance(&replica.state.read().unwrap_or_else(|e| e.into_inner()), &inst);
    }
    // Answer from a state that includes this write.
    let _ = replica
        .raft
        .wait(Some(Duration::from_secs(5)))
        .applied_index_at_least(Some(index), "SLAP request answer")
        .await;
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    requested_instance(&state, state.instances.get(&inst.id).unwrap_or(&inst))
}

/// requestComputerPartition's answer about `inst`: its document, or 408
/// while it waits for a partition (or a host).
fn requested_instance(state: &Master, inst: &Instance) -> SlapResult {
    if !inst.is_placed() && inst.requested_state != RequestedState::Destroyed {
        let why = inst.pending_reason.clone().unwrap_or_else(|| "not placed yet".into());
        return Err(SlapError(StatusCode::REQUEST_TIMEOUT, why));
    }
    marshal_response(&documents::software_instance(state, inst))
}

fn partition_of(headers: &HeaderMap, f: &Fields) -> Result<(String, String), SlapError> {
    match (f.opt("computer_id"), f.opt("computer_partition_id")) {
        (Some(c), Some(p)) => Ok((c.into(), p.into())),
        _ => calling_partition(headers, f).ok_or_else(|| bad("missing computer_id or computer_partition_id")),
    }
}

fn shared_reference(f: &Fields) -> Option<String> {
    f.opt("slave_reference")
        .filter(|r| !r.is_empty() && *r != "None")
        .map(String::from)
}

async fn set_connection(State(replica): State<Arc<Replica>>, headers: HeaderMap, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let (computer, partition) = partition_of(&headers, &f)?;
    let connection = string_dict(f.marshalled("connection_xml")?, "connection_xml")?;
    done(
        &replica,
        Command::SetConnection {
            computer,
            partition,
            shared_reference: shared_reference(&f),
            connection,
        },
    )
    .await
}

async fn report(replica: &Replica, headers: &HeaderMap, body: &Bytes, report: InstanceReport) -> SlapResult {
    let f = Fields::body(body)?;
    let (computer, partition) = partition_of(headers, &f)?;
    done(
        replica,
        Command::ReportInstance {
            computer,
            partition,
            shared_reference: shared_reference(&f),
            report,
        },
    )
    .await
}

async fn started(State(r): State<Arc<Replica>>, h: HeaderMap, body: Bytes) -> SlapResult {
    report(&r, &h, &body, InstanceReport::Started).await
}

async fn stopped(State(r): State<Arc<Replica>>, h: HeaderMap, body: Bytes) -> SlapResult {
    report(&r, &h, &body, InstanceReport::Stopped).await
}

async fn instance_error(State(r): State<Arc<Replica>>, h: HeaderMap, body: Bytes) -> SlapResult {
    let log = Fields::body(&body)?.opt("error_log").unwrap_or_default().to_string();
    report(&r, &h, &body, InstanceReport::Error(log)).await
}

async fn destroyed(State(r): State<Arc<Replica>>, h: HeaderMap, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let (computer, partition) = partition_of(&h, &f)?;
    done(&r, Command::DestroyedPartition { computer, partition }).await
}

/// `getComputerPartitionCertificate`: the certificate and key the Master
/// issued to the partition's current instance (marshalled
/// `{'certificate': PEM, 'key': PEM}`), and, beyond SlapOS's answer, the
/// CAs a partition's peer may chain to (`ca_certificate`), which the node
/// agent's tunnels check peers against.
async fn partition_certificate(State(replica): State<Arc<Replica>>, RawQuery(q): RawQuery) -> SlapResult {
    let f = Fields::parse(q.as_deref().unwrap_or(""))?;
    let (c, p) = (f.need("computer_id")?, f.need("computer_partition_id")?);
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let part = state
        .partitions
        .get(&(c.to_string(), p.to_string()))
        .ok_or_else(|| SlapError(StatusCode::NOT_FOUND, format!("computer {c} has no partition {p}")))?;
    if part.instance.is_none() {
        return Err(SlapError(
            StatusCode::NOT_FOUND,
            format!("partition {p} of {c} is free"),
        ));
    }
    let cert = state.partition_certificate(c, p).ok_or_else(|| {
        SlapError(
            StatusCode::NOT_FOUND,
            format!("the certificate of partition {p} of {c} is not issued yet; try again"),
        )
    })?;
    let doc = Value::str_dict([
        ("certificate", Value::str(cert.cert_pem.to_text())),
        (
            "key",
            Value::str(
                cert.key_pem
                    .as_ref()
                    .map(crate::state::Pem::to_text)
                    .unwrap_or_default(),
            ),
        ),
        ("ca_certificate", Value::str(state.trust_pem())),
    ]);
    drop(state);
    marshal_response(&doc)
}

/// `useComputer`: a node's usage as a TioXML journal, booked into the
/// ledger once (resent, it changes nothing). Refused with the reason, and
/// nothing booked, when invalid (400) or for an unknown computer (404).
async fn use_computer(State(replica): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let computer = f.need("computer_id")?;
    let journal = f.need("use_string")?;
    let command = crate::accounting::book_command(computer, journal).map_err(|e| bad(format!("use_string: {e}")))?;
    run(&replica, command).await?;
    Ok(text("OK"))
}

async fn bang(State(r): State<Arc<Replica>>, h: HeaderMap, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let (computer, partition) = partition_of(&h, &f)?;
    let message = f.opt("message").unwrap_or_default().to_string();
    done(
        &r,
        Command::Bang {
            computer,
            partition,
            message,
        },
    )
    .await?;
    Ok(text("OK"))
}

async fn related_instances(State(r): State<Arc<Replica>>, h: HeaderMap, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let (computer, partition) = partition_of(&h, &f)?;
    let titles = match f.marshalled("instance_reference_xml")? {
        Some(Value::List(items)) | Some(Value::Tuple(items)) => items.iter().map(python_str).collect(),
        None => Vec::new(),
        Some(_) => return Err(bad("instance_reference_xml must hold a list")),
    };
    done(
        &r,
        Command::SetRelatedInstances {
            computer,
            partition,
            titles,
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_cache_builds_once_per_revision() {
        let cache = DocumentCache::default();
        let builds = std::cell::Cell::new(0);
        let poll = |revision: u64| {
            cache
                .get_or_build("COMP-1", revision, || {
                    builds.set(builds.get() + 1);
                    Ok(format!("document at {revision}"))
                })
                .unwrap()
        };
        let first = poll(7);
        let again = poll(7);
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "an unchanged poll returns the kept document"
        );
        assert_eq!(&poll(8)[..], b"document at 8");
        assert_eq!(builds.get(), 2, "built once per revision");
    }
}
