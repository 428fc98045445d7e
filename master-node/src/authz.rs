//! Who may call what, over SLAP and the native API.
//!
//! With TLS, every connection carries the [`Caller`] its client certificate
//! names (the record found by the certificate's fingerprint). One
//! middleware checks each call against the table below before any handler
//! runs, so a denial is a 403 with the reason and changes nothing:
//!
//! | calls | allowed |
//! |---|---|
//! | a node's own calls (poll, format, software reports, usage, bang) | that computer |
//! | a partition's calls (register, publish, state reports, children, IPs, its shared instances' site certificates) | that partition, its computer |
//! | `getComputerPartitionCertificate`, `destroyedComputerPartition` | the partition's computer |
//! | `requestComputerPartition` from a partition (with `computer_id`) | that partition, its computer |
//! | `requestComputerPartition` as a user, HATEOAS reads | users (their own trees) |
//! | `supplySupply` | administrators |
//!
//! Administrators may do everything. A slap-gateway's connection acts as
//! the caller the gateway verified and names in `X-Slap-Caller` (resolved
//! here, so revocation holds through gateways); by itself a gateway may only
//! ask `getHateoasUrl` (its health check). Without TLS (`--insecure-http`) there is
//! no caller and nothing is checked: a development mode, logged at start.
//!
//! Shared by the SLAP handlers, the native API and the dashboard, so it
//! sits below all three and imports none of them (nor the servers).
//!
//! Must not import `slap`, `native`, `dashboard` or `server`.

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use slap_proto::form;
use slap_proto::marshal::{self, Value};

use std::sync::Arc;

use axum::extract::State;

use crate::replica::Replica;
use crate::state::{Fingerprint, Role};

/// The user SLAP requests act for when no certificate says who calls (plain
/// HTTP, or an administrator acting for nobody in particular).
pub const DEFAULT_USER: &str = "user";

/// A refusal as SLAP clients read it: a status and a plain-text reason.
fn refuse(status: StatusCode, reason: String) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        reason,
    )
        .into_response()
}

/// The identity a verified client certificate names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller(pub Role);

/// What a call needs.
#[derive(Debug, PartialEq, Eq)]
pub enum Need {
    /// Nothing beyond a valid certificate.
    Anyone,
    Computer(String),
    /// The partition itself, or its computer.
    Partition(String, String),
    User,
    /// A gateway (or an administrator).
    Gateway,
    Admin,
}

/// Whether `role` satisfies `need`; Err holds the reason.
pub fn allows(role: &Role, need: &Need) -> Result<(), String> {
    let ok = match (role, need) {
        (Role::Admin, _) | (_, Need::Anyone) => true,
        (Role::Computer(c), Need::Computer(want)) => c == want,
        (Role::Computer(c), Need::Partition(want, _)) => c == want,
        (Role::Partition(c, p), Need::Partition(wc, wp)) => c == wc && p == wp,
        (Role::User(_), Need::User) => true,
        (Role::Gateway(_), Need::Gateway) => true,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(match need {
        Need::Computer(c) => format!("{role} may not act for computer {c}"),
        Need::Partition(c, p) => format!("{role} may not act for partition {p} of {c}"),
        Need::User => format!("{role} may not make user calls (request, list instances)"),
        Need::Gateway => format!("{role} may not do this: gateways and administrators only"),
        Need::Admin => format!("{role} may not do this: administrators only"),
        Need::Anyone => unreachable!(),
    })
}

fn field(fields: &[(String, String)], name: &str) -> Option<String> {
    form::get(fields, name).map(String::from)
}

/// What the call at `path` with these form fields needs.
pub fn need_of(path: &str, fields: &[(String, String)]) -> Result<Need, String> {
    let computer = || field(fields, "computer_id").ok_or("missing field computer_id".to_string());
    let partition = || -> Result<Need, String> {
        Ok(Need::Partition(
            computer()?,
            field(fields, "computer_partition_id").ok_or("missing field computer_partition_id")?,
        ))
    };
    let name = path.trim_start_matches('/');
    if name == "hateoas" || name.starts_with("hateoas/") {
        return Ok(Need::User);
    }
    // Every page filters by the caller itself (see `dashboard`).
    if name == "dashboard" || name.starts_with("dashboard/") {
        return Ok(Need::Anyone);
    }
    Ok(match name {
        "getHateoasUrl" => Need::Anyone,
        "getFullComputerInformation"
        | "getComputerInformation"
        | "computerBang"
        | "useComputer"
        | "buildingSoftwareRelease"
        | "availableSoftwareRelease"
        | "destroyedSoftwareRelease"
        | "softwareReleaseError" => Need::Computer(computer()?),
        "loadComputerConfigurationFromXML" => {
            let xml = field(fields, "xml").ok_or("missing field xml")?;
            let reference = match marshal::loads(&xml) {
                Ok(Value::Dict(d)) => d
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("reference"))
                    .and_then(|(_, v)| v.as_str().map(String::from)),
                _ => None,
            };
            Need::Computer(reference.ok_or("the computer dictionary has no reference")?)
        }
        "registerComputerPartition" => Need::Partition(
            field(fields, "computer_reference").ok_or("missing field computer_reference")?,
            field(fields, "computer_partition_reference").ok_or("missing field computer_partition_reference")?,
        ),
        "getComputerPartitionCertificate" | "destroyedComputerPartition" => Need::Computer(computer()?),
        "startedComputerPartition"
        | "stoppedComputerPartition"
        | "softwareInstanceError"
        | "softwareInstanceBang"
        | "softwareInstanceRename"
        | "setComputerPartitionConnectionXml"
        | "updateComputerPartitionRelatedInstanceList"
        | "getHostingSubscriptionIpList"
        | "requestSharedInstanceCertificate" => partition()?,
        "requestComputerPartition" => {
            if form::get(fields, "computer_partition_id").is_some() {
                partition()?
            } else {
                Need::User
            }
        }
        "supplySupply" => Need::Admin,
        // Unknown paths: the router answers 404; only administrators get that far.
        _ => Need::Admin,
    })
}

/// The header in which a gateway names the caller it verified (the
/// fingerprint of the caller's certificate).
pub const CALLER_HEADER: &str = "x-slap-caller";

/// The role a call acts as: the connection's, or, on a gateway's connection,
/// that of the certificate the gateway names (which must be recorded and not
/// revoked). Anyone else's header is ignored.
pub fn effective_role(replica: &Replica, role: Role, headers: &axum::http::HeaderMap) -> Result<Role, String> {
    let Role::Gateway(gateway) = &role else { return Ok(role) };
    let Some(fp) = headers.get(CALLER_HEADER).and_then(|v| v.to_str().ok()) else {
        return Ok(role);
    };
    let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
    match Fingerprint::parse(fp).and_then(|fp| state.certificates.get(&fp)) {
        Some(c) if c.revoked => Err(format!("the caller's certificate {} is revoked", c.serial)),
        Some(c) if matches!(c.role, Role::Gateway(_)) => Err("a gateway cannot pass on another gateway".into()),
        Some(c) => Ok(c.role.clone()),
        None => Err(format!(
            "gateway {gateway} names a certificate this Master did not issue"
        )),
    }
}

/// The middleware: checks the call against the caller, if there is one.
pub async fn authorize(State(replica): State<Arc<Replica>>, mut req: Request, next: Next) -> Response {
    let Some(Caller(role)) = req.extensions().get::<Caller>().cloned() else {
        return next.run(req).await;
    };
    let role = match effective_role(&replica, role, req.headers()) {
        Ok(r) => r,
        Err(reason) => return refuse(StatusCode::FORBIDDEN, format!("forbidden: {reason}")),
    };
    req.extensions_mut().insert(Caller(role.clone()));
    let (parts, body) = req.into_parts();
    // Bounded by the body limits already (`server::http`).
    let bytes = match to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, format!("unreadable body: {e}")),
    };
    let text = if parts.method == Method::GET {
        parts.uri.query().unwrap_or("").to_string()
    } else {
        String::from_utf8_lossy(&bytes).into_owned()
    };
    let fields = match form::parse(&text) {
        Ok(f) => f,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let decision = need_of(parts.uri.path(), &fields).and_then(|need| {
        allows(&role, &need).map_err(|reason| {
            tracing::info!(caller = %role, path = parts.uri.path(), %reason, "SLAP call denied");
            format!("forbidden: {reason}")
        })
    });
    match decision {
        Ok(()) => next.run(Request::from_parts(parts, Body::from(bytes))).await,
        Err(reason) if reason.starts_with("forbidden: ") => refuse(StatusCode::FORBIDDEN, reason),
        Err(reason) => refuse(StatusCode::BAD_REQUEST, reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn table() {
        let x = Role::Computer("X".into());
        let px = Role::Partition("X".into(), "p0".into());
        let py = Role::Partition("Y".into(), "p0".into());
        let alice = Role::User("alice".into());
        let node_poll = need_of("/getFullComputerInformation", &f(&[("computer_id", "X")])).unwrap();
        assert!(allows(&x, &node_poll).is_ok());
        assert!(allows(&Role::Computer("Y".into()), &node_poll).is_err());
        assert!(allows(&px, &node_poll).is_err());
        assert!(allows(&alice, &node_poll).is_err());
        assert!(allows(&Role::Admin, &node_poll).is_ok());
        let publish = need_of(
            "/setComputerPartitionConnectionXml",
            &f(&[("computer_id", "X"), ("computer_partition_id", "p0")]),
        )
        .unwrap();
        assert!(allows(&px, &publish).is_ok());
        assert!(allows(&x, &publish).is_ok());
        assert!(allows(&py, &publish).is_err());
        assert!(allows(&alice, &publish).is_err());
        let user_request = need_of("/requestComputerPartition", &f(&[("partition_reference", "t")])).unwrap();
        assert_eq!(user_request, Need::User);
        assert!(allows(&px, &user_request).is_err());
        assert!(allows(&alice, &need_of("/supplySupply", &f(&[])).unwrap()).is_err());
        assert!(need_of("/getFullComputerInformation", &f(&[])).is_err());
    }
}
