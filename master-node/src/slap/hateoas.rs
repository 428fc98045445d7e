//! The HATEOAS subset the `slapos` client uses for `service list`, `service
//! info`, `computer list` and `computer info` (reference section 2.7), in
//! the JSON shapes SlapOS' own proxy serves.
//!
//! - `GET /hateoas/`: links to `raw_search` and `traverse` (RFC 6570 templates);
//! - `?mode=search&query=...`: the four jIO queries the client sends;
//! - `?mode=traverse&relative_url=...`: a redirect to the document;
//! - `/hateoas/partitions/<title>`, `/hateoas/shared/<title>`,
//!   `/hateoas/computers/<reference>`: ERP5 form renderings.
//!
//! Part of the SLAP handlers: must not import the server.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use serde_json::{json, Value as Json};
use slap_proto::instance_xml;

use axum::Extension;

use super::SlapError;
use crate::authz::{Caller, DEFAULT_USER};
use crate::replica::Replica;
use crate::state::Role;
use crate::state::{Instance, Master, RequestedState, Scope};

const SERVICE_LIST: &str = "portal_type:\"Instance Tree\" AND validation_state:validated";
const COMPUTER_LIST: &str = "portal_type:\"Compute Node\" AND validation_state:validated";

/// The URL clients reached us at: https when the call came over TLS (it
/// then carries a verified caller), or when a proxy says so.
fn base_url(headers: &HeaderMap, tls: bool) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let forwarded_https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let scheme = if tls || forwarded_https { "https" } else { "http" };
    format!("{scheme}://{host}")
}

fn json_response(v: Json) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response()
}

/// A `"quoted"` value at the end of a query, unquoted.
fn quoted(rest: &str) -> Option<&str> {
    let inner = rest.strip_prefix('"')?.strip_suffix('"')?;
    (!inner.contains('"')).then_some(inner)
}

/// The user's instance trees (their roots), by title.
fn roots<'a>(m: &'a Master, user: &'a str, title: Option<&'a str>) -> impl Iterator<Item = &'a Instance> + 'a {
    m.instances.values().map(|i| &**i).filter(move |i| {
        matches!(&i.scope, Scope::User(u) if u == user)
            && i.requested_state != RequestedState::Destroyed
            && title.is_none_or(|t| i.title == t)
    })
}

fn service_row(i: &Instance) -> Json {
    let kind = if i.shared { "shared" } else { "partitions" };
    json!({
        "title": i.title,
        "url_string": i.software_release,
        "relative_url": format!("/hateoas/{kind}/{}", i.title),
    })
}

fn computer_row(reference: &str) -> Json {
    json!({
        "title": reference,
        "reference": reference,
        "relative_url": format!("/hateoas/computers/{reference}"),
    })
}

/// Answers the client's jIO search queries.
fn search(m: &Master, user: &str, query: &str) -> Option<Vec<Json>> {
    if query == SERVICE_LIST {
        return Some(roots(m, user, None).map(service_row).collect());
    }
    if let Some(rest) = query.strip_prefix(&format!("{SERVICE_LIST} AND title:=")) {
        return Some(roots(m, user, Some(quoted(rest)?)).map(service_row).collect());
    }
    if query == COMPUTER_LIST {
        return Some(m.computers.keys().map(|c| computer_row(c)).collect());
    }
    if let Some(rest) = query.strip_prefix(&format!("{COMPUTER_LIST} AND reference:=")) {
        let reference = quoted(rest)?;
        return Some(
            m.computers
                .keys()
                .filter(|c| *c == reference)
                .map(|c| computer_row(c))
                .collect(),
        );
    }
    None
}

fn field(kind: &str, key: &str, default: Json) -> Json {
    json!({"type": kind, "key": key, "default": default})
}

/// The form rendering of one instance tree.
fn service_document(i: &Instance) -> Json {
    json!({
        "_embedded": {"_view": {
            "form_id": field("StringField", "form_id", json!("InstanceTree_viewAsHateoas")),
            "my_reference": field("StringField", "field_my_reference", json!(i.title)),
            "my_slap_state": field("StringField", "field_my_slap_state", json!(i.requested_state.as_str())),
            "my_text_content": field("StringField", "field_my_text_content", json!(instance_xml::to_xml(&i.parameters))),
            "my_connection_parameter_list": field(
                "StringField",
                "field_my_connection_parameter_list",
                json!(instance_xml::to_xml(&i.connection))
            ),
            "my_url_string": field("StringField", "field_my_url_string", json!(i.software_release)),
            "my_source_reference": field("StringField", "field_my_source_reference", json!(i.software_type)),
            "my_root_slave": field("IntegerField", "field_my_root_slave", json!(i.shared as u8)),
        }},
        "_links": {"type": {"name": "Instance Tree"}},
    })
}

/// `GET /hateoas/`: the root links, a search, or a traverse.
pub async fn root(
    State(replica): State<Arc<Replica>>,
    caller: Option<Extension<Caller>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, SlapError> {
    match q.get("mode").map(String::as_str) {
        None => {
            let base = base_url(&headers, caller.is_some());
            Ok(json_response(json!({"_links": {
                "raw_search": {"href": format!("{base}/hateoas/?mode=search&query={{query}}&select_list={{select_list}}")},
                "traverse": {"href": format!("{base}/hateoas/?mode=traverse&relative_url={{relative_url}}&view={{view}}")},
            }})))
        }
        Some("search") => {
            let query = q
                .get("query")
                .ok_or_else(|| SlapError(StatusCode::BAD_REQUEST, "missing query".into()))?;
            let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
            let contents = search(&state, &user_of(&caller), query)
                .ok_or_else(|| SlapError(StatusCode::BAD_REQUEST, format!("Unhandled query: {query}")))?;
            Ok(json_response(json!({"_embedded": {"contents": contents}})))
        }
        Some("traverse") => {
            let to = q
                .get("relative_url")
                .filter(|u| u.starts_with("/hateoas/"))
                .ok_or_else(|| SlapError(StatusCode::BAD_REQUEST, "relative_url must be a /hateoas/ path".into()))?;
            Ok(Redirect::to(to).into_response())
        }
        Some(other) => Err(SlapError(StatusCode::BAD_REQUEST, format!("Unhandled mode: {other}"))),
    }
}

/// Whose trees a caller sees: a user's own; without TLS or as an
/// administrator, those requested without a certificate.
pub fn user_of(caller: &Option<Extension<Caller>>) -> String {
    match caller {
        Some(Extension(Caller(Role::User(u)))) => u.clone(),
        _ => DEFAULT_USER.into(),
    }
}

fn tree(replica: &Replica, user: &str, title: &str, shared: bool) -> Result<Response, SlapError> {
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    let inst = roots(&state, user, Some(title))
        .find(|i| i.shared == shared)
        .ok_or_else(|| SlapError(StatusCode::NOT_FOUND, format!("no service titled {title:?}")))?;
    Ok(json_response(service_document(inst)))
}

/// `GET /hateoas/partitions/<title>`.
pub async fn partition(
    State(replica): State<Arc<Replica>>,
    caller: Option<Extension<Caller>>,
    Path(title): Path<String>,
) -> Result<Response, SlapError> {
    tree(&replica, &user_of(&caller), &title, false)
}

/// `GET /hateoas/shared/<title>`.
pub async fn shared(
    State(replica): State<Arc<Replica>>,
    caller: Option<Extension<Caller>>,
    Path(title): Path<String>,
) -> Result<Response, SlapError> {
    tree(&replica, &user_of(&caller), &title, true)
}

/// `GET /hateoas/computers/<reference>`.
pub async fn computer(
    State(replica): State<Arc<Replica>>,
    Path(reference): Path<String>,
) -> Result<Response, SlapError> {
    let known = replica
        .state
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .computers
        .contains_key(&reference);
    if !known {
        return Err(SlapError(
            StatusCode::NOT_FOUND,
            format!("computer {reference} does not exist"),
        ));
    }
    Ok(json_response(json!({
        "_embedded": {"_view": {
            "form_id": field("StringField", "computer", json!(reference)),
            "my_reference": field("StringField", "reference", json!(reference)),
            "my_title": field("StringField", "reference", json!(reference)),
        }},
        "_links": {"type": {"name": "Computer"}},
    })))
}
