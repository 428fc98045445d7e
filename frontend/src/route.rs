//! Routes: what a shared instance asks of the frontend, checked, and the
//! table requests are matched against.
//!
//! The node agent writes one file per hosted shared instance (the
//! release's `{{shared.json}}`): its reference, title, owner key, serial and
//! parameters. [`RouteSpec::from_json`] reads it; [`RouteTable::build`] checks
//! every spec on its own (a bad URL fails that shared instance alone) and
//! then against the others: a domain belongs to the owner who claimed it
//! first, and stays theirs while one of their shared instances uses it, so
//! another user's shared instance naming it gets an error instead of the
//! traffic. Building is pure: the same specs and claims give the same table,
//! which is what lets the reloader swap tables under live traffic.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use hyper::Uri;
use serde::{Deserialize, Serialize};

/// The longest a route may wait for its backend's answer.
pub const MAX_TIMEOUT_SECS: u64 = 3600;
/// Without a `timeout` parameter.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;

/// One hosted shared instance, as the node agent wrote it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSpec {
    /// `slave_reference`: names the route in logs, metrics and results.
    pub reference: String,
    #[serde(default)]
    pub title: String,
    /// A key of the requesting user (a digest, not the name): who owns the
    /// domains this shared instance claims.
    #[serde(default)]
    pub owner: String,
    /// Changes whenever the shared instance's parameters change; the result
    /// names it so the agent publishes the result of this version.
    #[serde(default)]
    pub serial: String,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

impl RouteSpec {
    /// Reads a route file.
    pub fn from_json(text: &str) -> Result<RouteSpec, String> {
        let spec: RouteSpec = serde_json::from_str(text).map_err(|e| format!("unreadable route file: {e}"))?;
        if spec.reference.is_empty() {
            return Err("the route file has no reference".into());
        }
        Ok(spec)
    }
}

/// Where a route sends requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backend {
    /// `http` or `https`.
    pub scheme: String,
    /// `host:port` (an IPv6 literal in brackets).
    pub authority: String,
    /// The backend URL's path without its trailing `/` (`""` for the root).
    pub base_path: String,
}

impl Backend {
    /// Checks a `backend-url` parameter.
    pub fn parse(url: &str) -> Result<Backend, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("backend-url {url:?} is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => "http",
            Some("https") => "https",
            Some(other) => {
                return Err(format!(
                    "backend-url {url:?}: scheme {other:?}, only http and https are proxied"
                ))
            }
            None => return Err(format!("backend-url {url:?} has no scheme (http:// or https://)")),
        };
        let authority = uri
            .authority()
            .filter(|a| !a.host().is_empty())
            .ok_or_else(|| format!("backend-url {url:?} has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!("backend-url {url:?}: credentials in the URL are not accepted"));
        }
        if uri.query().is_some() {
            return Err(format!("backend-url {url:?}: a query string cannot be a backend"));
        }
        let port = authority.port_u16().unwrap_or(if scheme == "https" { 443 } else { 80 });
        Ok(Backend {
            scheme: scheme.into(),
            authority: format!("{}:{port}", authority.host()),
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// The host part of the authority, brackets removed (what TLS names).
    pub fn host(&self) -> &str {
        let host = self
            .authority
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.authority);
        host.trim_start_matches('[').trim_end_matches(']')
    }
}

/// A checked route.
#[derive(Debug, Clone)]
pub struct Route {
    pub reference: String,
    pub owner: String,
    pub serial: String,
    pub backend: Backend,
    /// Lowercase, without a trailing dot.
    pub domain: Option<String>,
    /// Starts with `/`, no trailing `/` (`""`: the whole domain).
    pub path_prefix: String,
    pub https_only: bool,
    pub websocket: bool,
    pub timeout: Duration,
    /// The user's own certificate for the domain, checked.
    pub certificate: Option<Arc<rustls::sign::CertifiedKey>>,
    /// Requests matched to this route, kept across reloads (see
    /// [`RouteTable::build`]); one atomic per route, so counting costs no
    /// lock on the request path.
    pub requests: Arc<AtomicU64>,
}

fn flag(params: &BTreeMap<String, String>, name: &str, default: bool) -> Result<bool, String> {
    match params.get(name).map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(default),
        Some(v) if v.is_empty() => Ok(default),
        Some(v) => match v.as_str() {
            "true" | "yes" | "on" | "1" => Ok(true),
            "false" | "no" | "off" | "0" => Ok(false),
            _ => Err(format!("{name} = {v:?}: expected true or false")),
        },
    }
}

pub use slap_proto::domain::check_domain;

impl Route {
    /// Checks one spec on its own.
    pub fn from_spec(spec: &RouteSpec) -> Result<Route, String> {
        let p = &spec.parameters;
        let url = p
            .get("backend-url")
            .or_else(|| p.get("url"))
            .filter(|u| !u.trim().is_empty())
            .ok_or("no backend-url parameter: the URL of the service to expose")?;
        let backend = Backend::parse(url.trim())?;
        let domain = match p.get("domain").map(|d| d.trim()).filter(|d| !d.is_empty()) {
            Some(d) => Some(check_domain(d)?),
            None => None,
        };
        let path_prefix = match p.get("path-prefix").map(|s| s.trim()).filter(|s| !s.is_empty()) {
            Some(prefix) => {
                if !prefix.starts_with('/') || prefix.contains("..") || prefix.contains(['?', '#', ' ']) {
                    return Err(format!(
                        "path-prefix {prefix:?}: must start with / and hold a plain path"
                    ));
                }
                prefix.trim_end_matches('/').to_string()
            }
            // A route without a domain needs a place of its own.
            None if domain.is_none() => format!("/{}", spec.reference),
            None => String::new(),
        };
        let timeout = match p.get("timeout").map(|t| t.trim()).filter(|t| !t.is_empty()) {
            None => DEFAULT_TIMEOUT_SECS,
            Some(t) => match t.parse::<u64>() {
                Ok(s) if (1..=MAX_TIMEOUT_SECS).contains(&s) => s,
                _ => return Err(format!("timeout = {t:?}: seconds, from 1 to {MAX_TIMEOUT_SECS}")),
            },
        };
        let cert = p.get("ssl-crt").filter(|c| !c.trim().is_empty());
        let key = p.get("ssl-key").filter(|k| !k.trim().is_empty());
        let certificate = match (cert, key) {
            (None, None) => None,
            (Some(_), None) | (None, Some(_)) => {
                return Err("ssl-crt and ssl-key go together: give both or neither".into())
            }
            (Some(c), Some(k)) => {
                if domain.is_none() {
                    return Err(
                        "ssl-crt needs a domain: a certificate is chosen by the name the client asks for".into(),
                    );
                }
                Some(crate::certs::user_certificate(c, k)?)
            }
        };
        Ok(Route {
            reference: spec.reference.clone(),
            owner: spec.owner.clone(),
            serial: spec.serial.clone(),
            backend,
            domain,
            path_prefix,
            https_only: flag(p, "https-only", false)?,
            websocket: flag(p, "websocket", false)?,
            timeout: Duration::from_secs(timeout),
            certificate,
            requests: Arc::default(),
        })
    }

    /// Whether `path` is under this route's prefix.
    pub fn matches_path(&self, path: &str) -> bool {
        self.path_prefix.is_empty()
            || path == self.path_prefix
            || (path.starts_with(&self.path_prefix) && path.as_bytes().get(self.path_prefix.len()) == Some(&b'/'))
    }

    /// The backend's path and query for a request's path and query.
    pub fn upstream_path(&self, path: &str, query: Option<&str>) -> String {
        let rest = &path[self.path_prefix.len().min(path.len())..];
        let rest = if rest.is_empty() { "/" } else { rest };
        let mut out = format!("{}{rest}", self.backend.base_path);
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

/// Who owns which domain: claimed by the first owner to use it, released
/// when none of their shared instances names it any more. Kept on disk by
/// the reloader so a restart does not hand a domain to someone else.
pub type Claims = BTreeMap<String, String>;

/// What the reloader publishes for one shared instance.
#[derive(Debug, Clone)]
pub enum Verdict {
    Served(Arc<Route>),
    Refused(String),
}

/// Every route, indexed for lookups.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// Per domain, its routes, longest prefix first.
    by_domain: BTreeMap<String, Vec<Arc<Route>>>,
    /// Routes without a domain (any Host), longest prefix first.
    anywhere: Vec<Arc<Route>>,
    /// The outcome of every spec, by reference.
    pub verdicts: BTreeMap<String, Verdict>,
    /// The claims after this build.
    pub claims: Claims,
}

impl RouteTable {
    /// Checks `specs` (any order) against each other and against `claims`;
    /// a route already served keeps its request counter from `counters`
    /// (the previous table's, [`RouteTable::counters`]).
    pub fn build(specs: &[RouteSpec], claims: &Claims, counters: &BTreeMap<String, Arc<AtomicU64>>) -> RouteTable {
        let mut specs: Vec<&RouteSpec> = specs.iter().collect();
        specs.sort_by(|a, b| a.reference.cmp(&b.reference));
        let mut verdicts = BTreeMap::new();
        let mut routes = Vec::new();
        for spec in specs {
            match Route::from_spec(spec) {
                Ok(mut r) => {
                    if let Some(c) = counters.get(&r.reference) {
                        r.requests = c.clone();
                    }
                    routes.push(r)
                }
                Err(e) => {
                    verdicts.insert(spec.reference.clone(), Verdict::Refused(e));
                }
            }
        }
        // Claims: kept ones whose owner still uses the domain, then new ones
        // in reference order.
        let used: BTreeSet<(String, String)> = routes
            .iter()
            .filter_map(|r| Some((r.domain.clone()?, r.owner.clone())))
            .collect();
        let mut new_claims: Claims = claims
            .iter()
            .filter(|(d, o)| used.contains(&((*d).clone(), (*o).clone())))
            .map(|(d, o)| (d.clone(), o.clone()))
            .collect();
        for r in &routes {
            if let Some(d) = &r.domain {
                new_claims.entry(d.clone()).or_insert_with(|| r.owner.clone());
            }
        }
        let mut table = RouteTable::default();
        let mut taken: BTreeMap<(Option<String>, String), String> = BTreeMap::new();
        for r in routes {
            if let Some(d) = &r.domain {
                if new_claims.get(d) != Some(&r.owner) {
                    verdicts.insert(
                        r.reference.clone(),
                        Verdict::Refused(format!("domain {d} belongs to another user's shared instance")),
                    );
                    continue;
                }
            }
            let place = (r.domain.clone(), r.path_prefix.clone());
            if let Some(first) = taken.get(&place) {
                verdicts.insert(
                    r.reference.clone(),
                    Verdict::Refused(format!(
                        "{}{} is already served by shared instance {first}",
                        r.domain.as_deref().unwrap_or("any host"),
                        if r.path_prefix.is_empty() { "/" } else { &r.path_prefix }
                    )),
                );
                continue;
            }
            taken.insert(place, r.reference.clone());
            let r = Arc::new(r);
            verdicts.insert(r.reference.clone(), Verdict::Served(r.clone()));
            match &r.domain {
                Some(d) => table.by_domain.entry(d.clone()).or_default().push(r),
                None => table.anywhere.push(r),
            }
        }
        let longest_first = |v: &mut Vec<Arc<Route>>| v.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        table.by_domain.values_mut().for_each(longest_first);
        longest_first(&mut table.anywhere);
        table.verdicts = verdicts;
        table.claims = new_claims;
        table
    }

    /// The route for a request to `host` (no port) and `path`: the domain's
    /// routes first, then the routes without a domain.
    pub fn lookup(&self, host: &str, path: &str) -> Option<&Arc<Route>> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.by_domain
            .get(&host)
            .and_then(|routes| routes.iter().find(|r| r.matches_path(path)))
            .or_else(|| self.anywhere.iter().find(|r| r.matches_path(path)))
    }

    /// How many routes are served.
    pub fn len(&self) -> usize {
        self.anywhere.len() + self.by_domain.values().map(Vec::len).sum::<usize>()
    }

    /// Whether no route is served.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every served route's request counter, by reference.
    pub fn counters(&self) -> BTreeMap<String, Arc<AtomicU64>> {
        self.verdicts
            .iter()
            .filter_map(|(k, v)| match v {
                Verdict::Served(r) => Some((k.clone(), r.requests.clone())),
                Verdict::Refused(_) => None,
            })
            .collect()
    }

    /// The first route (by reference) served on `domain`.
    pub fn first_reference(&self, domain: &str) -> Option<String> {
        self.by_domain.get(domain)?.iter().map(|r| r.reference.clone()).min()
    }

    /// Stops serving `domain`: each of its routes is refused with `reason`
    /// and its claim is dropped (it was never this frontend's to give).
    pub fn refuse_domain(&mut self, domain: &str, reason: &str) {
        for r in self.by_domain.remove(domain).unwrap_or_default() {
            self.verdicts
                .insert(r.reference.clone(), Verdict::Refused(reason.to_string()));
        }
        self.claims.remove(domain);
    }

    /// The served routes that bring their own certificate.
    pub fn user_certificates(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.by_domain.values().flatten().filter(|r| r.certificate.is_some())
    }

    /// Every domain served.
    pub fn domains(&self) -> impl Iterator<Item = &String> {
        self.by_domain.keys()
    }
}

/// The value a domain's owner can publish (for example as a DNS TXT record)
/// to show they hold it: the same for the same owner and domain on every
/// frontend, different for anyone else.
pub fn domain_verification(owner: &str, domain: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("slapos-frontend-domain\0{owner}\0{domain}"));
    hex::encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(reference: &str, owner: &str, params: &[(&str, &str)]) -> RouteSpec {
        RouteSpec {
            reference: reference.into(),
            title: reference.into(),
            owner: owner.into(),
            serial: "1".into(),
            parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn refused(t: &RouteTable, reference: &str) -> String {
        match &t.verdicts[reference] {
            Verdict::Refused(e) => e.clone(),
            Verdict::Served(_) => panic!("{reference} was served"),
        }
    }

    #[test]
    fn backends_accept_ipv6_literals_and_refuse_what_cannot_be_proxied() {
        let b = Backend::parse("http://[2001:db8::1]:8080/app/").unwrap();
        assert_eq!(b.authority, "[2001:db8::1]:8080");
        assert_eq!(b.host(), "2001:db8::1");
        assert_eq!(b.base_path, "/app");
        assert_eq!(
            Backend::parse("https://example.org").unwrap().authority,
            "example.org:443"
        );
        for bad in ["ftp://x/", "not a url", "/relative", "http://u:p@h/", "http://h/?q=1"] {
            assert!(Backend::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn a_bad_shared_instance_fails_alone() {
        let specs = vec![
            spec("a", "u1", &[("backend-url", "http://[::1]:1/")]),
            spec("b", "u1", &[("backend-url", "::not a url")]),
            spec("c", "u1", &[("backend-url", "http://[::1]:2/"), ("timeout", "0")]),
            spec(
                "d",
                "u1",
                &[("backend-url", "http://[::1]:3/"), ("https-only", "maybe")],
            ),
            spec("e", "u1", &[("backend-url", "http://[::1]:4/"), ("ssl-crt", "x")]),
        ];
        let t = RouteTable::build(&specs, &Claims::new(), &BTreeMap::new());
        assert!(matches!(t.verdicts["a"], Verdict::Served(_)));
        assert!(refused(&t, "b").contains("not a URL"));
        assert!(refused(&t, "c").contains("timeout"));
        assert!(refused(&t, "d").contains("https-only"));
        assert!(refused(&t, "e").contains("together"));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn a_domain_stays_with_its_first_owner_until_they_let_it_go() {
        let mine = spec(
            "a",
            "alice",
            &[("backend-url", "http://[::1]:1/"), ("domain", "Shop.Example.")],
        );
        let theirs = spec(
            "0-first-by-name",
            "mallory",
            &[("backend-url", "http://[::1]:2/"), ("domain", "shop.example")],
        );
        // Alice claimed it before Mallory's shared instance appeared: kept,
        // although Mallory's reference sorts first.
        let t1 = RouteTable::build(std::slice::from_ref(&mine), &Claims::new(), &BTreeMap::new());
        assert_eq!(t1.claims["shop.example"], "alice");
        let t2 = RouteTable::build(&[mine.clone(), theirs.clone()], &t1.claims, &BTreeMap::new());
        assert!(refused(&t2, "0-first-by-name").contains("another user"));
        assert_eq!(t2.lookup("shop.example", "/").unwrap().reference, "a");
        // Alice may add a second route on her domain.
        let more = spec(
            "b",
            "alice",
            &[
                ("backend-url", "http://[::1]:3/"),
                ("domain", "shop.example"),
                ("path-prefix", "/api/"),
            ],
        );
        let t3 = RouteTable::build(&[mine.clone(), theirs.clone(), more], &t2.claims, &BTreeMap::new());
        assert_eq!(t3.lookup("shop.example", "/api/x").unwrap().reference, "b");
        assert_eq!(t3.lookup("shop.example", "/apix").unwrap().reference, "a");
        // Once Alice's instances are gone, the domain is free for Mallory.
        let t4 = RouteTable::build(std::slice::from_ref(&theirs), &t3.claims, &BTreeMap::new());
        assert!(matches!(t4.verdicts["0-first-by-name"], Verdict::Served(_)));
        assert_eq!(t4.claims["shop.example"], "mallory");
    }

    #[test]
    fn a_domain_the_cluster_refuses_is_refused_with_every_route_on_it() {
        let specs = vec![
            spec(
                "a",
                "u",
                &[("backend-url", "http://[::1]:1/"), ("domain", "shop.example")],
            ),
            spec(
                "b",
                "u",
                &[
                    ("backend-url", "http://[::1]:2/"),
                    ("domain", "shop.example"),
                    ("path-prefix", "/api"),
                ],
            ),
            spec(
                "c",
                "u",
                &[("backend-url", "http://[::1]:3/"), ("domain", "blog.example")],
            ),
        ];
        let mut t = RouteTable::build(&specs, &Claims::new(), &BTreeMap::new());
        assert_eq!(t.first_reference("shop.example").as_deref(), Some("a"));
        t.refuse_domain("shop.example", "not yours");
        assert_eq!(refused(&t, "a"), "not yours");
        assert_eq!(refused(&t, "b"), "not yours");
        assert!(t.lookup("shop.example", "/api").is_none());
        assert!(!t.claims.contains_key("shop.example"));
        assert_eq!(t.lookup("blog.example", "/").unwrap().reference, "c");
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn one_place_one_route() {
        let specs = vec![
            spec("a", "u", &[("backend-url", "http://[::1]:1/"), ("path-prefix", "/x")]),
            spec("b", "u", &[("backend-url", "http://[::1]:2/"), ("path-prefix", "/x/")]),
        ];
        let t = RouteTable::build(&specs, &Claims::new(), &BTreeMap::new());
        assert!(refused(&t, "b").contains("already served by shared instance a"));
    }

    #[test]
    fn paths_are_matched_on_segments_and_rewritten_under_the_backend_path() {
        let s = spec("r1", "u", &[("backend-url", "http://[::1]:1/base/")]);
        let t = RouteTable::build(&[s], &Claims::new(), &BTreeMap::new());
        let r = t.lookup("any.host", "/r1/page").unwrap();
        assert_eq!(r.upstream_path("/r1/page", Some("a=1")), "/base/page?a=1");
        assert_eq!(r.upstream_path("/r1", None), "/base/");
        assert!(t.lookup("any.host", "/r10/page").is_none());
    }

    #[test]
    fn verification_values_differ_per_owner() {
        assert_ne!(
            domain_verification("a", "d.example"),
            domain_verification("b", "d.example")
        );
        assert_eq!(domain_verification("a", "d.example").len(), 32);
    }
}
