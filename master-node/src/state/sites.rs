//! Who a site's domain belongs to, before the cluster's CA certifies it.
//!
//! A frontend asks the Master for a certificate for the domain of a shared
//! instance it hosts. The CA signs only what the state shows: the shared
//! instance is hosted by the asking partition and names that domain, and
//! its user owns the domain across the whole cluster, not only on that
//! frontend. The owner is the user of the earliest shared instance, still
//! wanted, that names the domain (as on one frontend, the first claim
//! holds); a later user naming it on another frontend is refused, so no
//! user can obtain a trusted certificate for another user's site.

use super::model::RequestedState;
use super::{creation_index, Master};

/// Why a site certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SiteRefusal {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
}

/// A shared instance's domain, in its one spelling, if it names one.
fn domain_of(params: &super::Params) -> Option<String> {
    params
        .get("domain")
        .and_then(|d| slap_proto::domain::check_domain(d).ok())
}

impl Master {
    /// Checks that shared instance `reference`, hosted on `partition` of
    /// `computer`, may have a certificate for `domain` from the cluster's
    /// CA; gives the domain in its one spelling.
    pub fn check_site(
        &self,
        computer: &str,
        partition: &str,
        reference: &str,
        domain: &str,
    ) -> Result<String, SiteRefusal> {
        let domain = slap_proto::domain::check_domain(domain).map_err(SiteRefusal::Invalid)?;
        if !domain.contains('.') {
            return Err(SiteRefusal::Invalid(format!(
                "domain {domain:?} has a single label: a site's domain is a name with a dot (shop.example.com)"
            )));
        }
        let host = self
            .instance_on(computer, partition)
            .ok_or_else(|| SiteRefusal::NotFound(format!("partition {partition} of {computer} runs no instance")))?;
        let shared = self
            .instance(reference)
            .filter(|s| s.shared && s.host.as_deref() == Some(host.id.as_str()))
            .filter(|s| s.requested_state != RequestedState::Destroyed)
            .ok_or_else(|| {
                SiteRefusal::NotFound(format!(
                    "partition {partition} of {computer} hosts no shared instance {reference}"
                ))
            })?;
        if domain_of(&shared.parameters).as_deref() != Some(domain.as_str()) {
            return Err(SiteRefusal::Forbidden(format!(
                "shared instance {reference} does not ask for domain {domain}"
            )));
        }
        let first = self
            .hosted
            .values()
            .flatten()
            .filter_map(|id| self.instance(id))
            .filter(|s| s.requested_state != RequestedState::Destroyed)
            .filter(|s| domain_of(&s.parameters).as_deref() == Some(domain.as_str()))
            .min_by_key(|s| (creation_index(&s.id), s.id.clone()));
        match first {
            Some(f) if f.owner != shared.owner => Err(SiteRefusal::Forbidden(format!(
                "domain {domain} belongs to another user, whose shared instance asked for it first"
            ))),
            _ => Ok(domain),
        }
    }
}
