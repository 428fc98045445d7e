//! `requestSharedInstanceCertificate`: a frontend asks the cluster's CA for
//! the certificate of a domain one of its shared instances names.
//!
//! Not a call of SlapOS's Master (SlapOS frontends get certificates from
//! outside, by ACME or from the user). Here a frontend's partition asks
//! with its own certificate; the state must show that the shared instance
//! is hosted there, names that domain and that its user owns the domain in
//! the whole cluster ([`crate::state::Master::check_site`]). The answer is
//! marshalled as `getComputerPartitionCertificate`'s:
//! `{'certificate', 'key', 'ca_certificate'}`.
//!
//! Part of the SLAP handlers: must not import the server.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use slap_proto::marshal::Value;

use super::{marshal_response, Fields, SlapError, SlapResult};
use crate::certificates::{self, IssueError};
use crate::replica::Replica;
use crate::state::SiteRefusal;

pub(super) async fn site_certificate(State(replica): State<Arc<Replica>>, body: Bytes) -> SlapResult {
    let f = Fields::body(&body)?;
    let (computer, partition) = (f.need("computer_id")?, f.need("computer_partition_id")?);
    let (reference, domain) = (f.need("slave_reference")?, f.need("domain")?);
    let domain = {
        let state = replica.state.read().unwrap_or_else(|e| e.into_inner());
        state.check_site(computer, partition, reference, domain)
    }
    .map_err(|refusal| {
        let status = match refusal {
            SiteRefusal::Invalid(_) => StatusCode::BAD_REQUEST,
            SiteRefusal::NotFound(_) => StatusCode::NOT_FOUND,
            SiteRefusal::Forbidden(_) => StatusCode::FORBIDDEN,
        };
        tracing::info!(%computer, %partition, shared = %reference, reason = %refusal, "site certificate refused");
        SlapError(status, refusal.to_string())
    })?;
    let handover = certificates::issue_site(&replica, &domain).map_err(|e| match e {
        IssueError::Refused(m) => SlapError(StatusCode::FORBIDDEN, m),
        IssueError::NoAuthority => SlapError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        other => SlapError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
    })?;
    marshal_response(&Value::str_dict([
        ("certificate", Value::str(handover.cert_pem)),
        ("key", Value::str(handover.site.key_pem)),
        ("ca_certificate", Value::str(handover.ca_pem)),
    ]))
}
