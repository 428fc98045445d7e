//! Keeps the served routes equal to the route files the node agent writes,
//! without a restart: the directory is scanned every `interval` (and on
//! SIGHUP); when a file appeared, changed or went away, every file is read
//! again, the table rebuilt and swapped in whole. A request in flight keeps
//! the route it matched; the next one sees the new table.
//!
//! After each reload the result of every shared instance is written to
//! `published/REFERENCE.json`, naming the serial of the route file it
//! judged: `{"serial": …, "connection": {"site-url": …}}` or
//! `{"serial": …, "error": …}`. The node agent waits for the result of the
//! version it wrote and publishes it for that shared instance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use rustls::sign::CertifiedKey;
use serde_json::json;

use crate::certs::{SigningAuthority, SiteCertificates};
use crate::cluster_ca::{now_secs, AskError, ClusterCa, SiteCertificate};
use crate::proxy::Frontend;
use crate::route::{domain_verification, Claims, Route, RouteSpec, RouteTable, Verdict};

/// Where clients reach the frontend, for the URLs it publishes.
#[derive(Debug, Clone)]
pub struct PublicAddress {
    /// A host name or address (an IPv6 one without brackets).
    pub host: String,
    pub http_port: Option<u16>,
    pub https_port: Option<u16>,
}

impl PublicAddress {
    fn url(&self, host: &str, tls: bool, path: &str) -> Option<String> {
        let (scheme, port, default) = if tls {
            ("https", self.https_port?, 443)
        } else {
            ("http", self.http_port?, 80)
        };
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let port = if port == default {
            String::new()
        } else {
            format!(":{port}")
        };
        Some(format!("{scheme}://{host}{port}{path}/"))
    }
}

/// The directories the reloader works with.
#[derive(Debug, Clone)]
pub struct Directories {
    /// Route files, `*.json`, written by the node agent.
    pub routes: PathBuf,
    /// Results, one per shared instance.
    pub published: PathBuf,
    /// The domain claims and the signing CA.
    pub state: PathBuf,
}

type Seen = Vec<(String, SystemTime, u64)>;

pub struct Reloader {
    dirs: Directories,
    frontend: Arc<Frontend>,
    certificates: Arc<SiteCertificates>,
    authority: SigningAuthority,
    /// Certificates from the frontend's own CA, by domain.
    issued: BTreeMap<String, Arc<CertifiedKey>>,
    /// Where site certificates come from by default, when the frontend
    /// knows its Master.
    cluster: Option<ClusterCa>,
    /// Site certificates from the cluster's CA in use, by domain.
    sites: BTreeMap<String, SiteCertificate>,
    /// Domains served with a stand-in certificate while the Master could
    /// not be asked: the next reload asks again.
    waiting: bool,
    /// The CAs to trust for each domain's certificate, as published.
    trusted: BTreeMap<String, String>,
    public: PublicAddress,
    seen: Option<Seen>,
}

/// How one domain is certified in a reload.
enum Certified {
    Served(Arc<CertifiedKey>, String),
    Refused(String),
}

/// What one reload found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub served: usize,
    pub refused: usize,
}

impl Reloader {
    pub fn new(
        dirs: Directories,
        frontend: Arc<Frontend>,
        certificates: Arc<SiteCertificates>,
        authority: SigningAuthority,
        cluster: Option<ClusterCa>,
        public: PublicAddress,
    ) -> Reloader {
        Reloader {
            dirs,
            frontend,
            certificates,
            authority,
            issued: BTreeMap::new(),
            cluster,
            sites: BTreeMap::new(),
            waiting: false,
            trusted: BTreeMap::new(),
            public,
            seen: None,
        }
    }

    /// Whether a reload would change a certificate: one from the cluster's
    /// CA is due for renewal, or a domain waits for the Master.
    pub fn certificates_due(&self) -> bool {
        let now = now_secs();
        self.waiting || self.sites.values().any(|s| s.due(now))
    }

    fn scan(&self) -> std::io::Result<Seen> {
        let mut seen = Vec::new();
        for entry in std::fs::read_dir(&self.dirs.routes)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.ends_with(".json") {
                continue;
            }
            let meta = entry.metadata()?;
            seen.push((name, meta.modified()?, meta.len()));
        }
        seen.sort();
        Ok(seen)
    }

    /// Reloads when the route files changed since the last look.
    pub async fn reload_if_changed(&mut self) -> Option<Summary> {
        let now = match self.scan() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(dir = %self.dirs.routes.display(), error = %e, "cannot read the route files");
                return None;
            }
        };
        if self.seen.as_ref() == Some(&now) {
            return None;
        }
        self.seen = Some(now);
        Some(self.reload().await)
    }

    /// Reads every route file and serves what they say.
    pub async fn reload(&mut self) -> Summary {
        let mut specs = Vec::new();
        let mut unreadable = BTreeMap::new();
        if let Ok(entries) = std::fs::read_dir(&self.dirs.routes) {
            for entry in entries.flatten() {
                let path = entry.path();
                if path.extension().and_then(|e| e.to_str()) != Some("json") {
                    continue;
                }
                let stem = path.file_stem().unwrap_or_default().to_string_lossy().to_string();
                match std::fs::read_to_string(&path)
                    .map_err(|e| e.to_string())
                    .and_then(|t| RouteSpec::from_json(&t))
                {
                    Ok(spec) => specs.push(spec),
                    Err(e) => {
                        unreadable.insert(stem, e);
                    }
                }
            }
        }
        let claims_file = self.dirs.state.join("domains.json");
        let claims: Claims = std::fs::read_to_string(&claims_file)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let mut table = RouteTable::build(&specs, &claims, &self.frontend.routes().counters());

        // Certificates first, so a new domain's handshake finds one as soon
        // as its route is served.
        let mut by_domain = BTreeMap::new();
        let mut cas = BTreeMap::new();
        for route in table.user_certificates() {
            if let (Some(d), Some(c)) = (&route.domain, &route.certificate) {
                by_domain.entry(d.clone()).or_insert_with(|| c.clone());
            }
        }
        let domains: Vec<(String, String)> = table
            .domains()
            .filter(|d| !by_domain.contains_key(*d))
            .filter_map(|d| Some((d.clone(), table.first_reference(d)?)))
            .collect();
        self.waiting = false;
        for (d, reference) in &domains {
            // One unanswered ask is enough for this reload: the others
            // would wait as long, and the routes must not.
            match self.certify(d, reference).await {
                Some(Certified::Served(key, ca)) => {
                    by_domain.insert(d.clone(), key);
                    cas.insert(d.clone(), ca);
                }
                Some(Certified::Refused(e)) => table.refuse_domain(d, &e),
                None => {}
            }
        }
        let served: std::collections::BTreeSet<String> = table.domains().cloned().collect();
        self.issued.retain(|d, _| served.contains(d));
        self.sites.retain(|d, _| served.contains(d));
        if let Some(cluster) = &self.cluster {
            cluster.forget_others(&served);
        }
        self.certificates.replace(by_domain);
        self.trusted = cas;

        if let Err(e) = write_atomically(
            &claims_file,
            &serde_json::to_string_pretty(&table.claims).unwrap_or_default(),
        ) {
            tracing::warn!(error = %e, "cannot keep the domain claims");
        }
        // Served before published: a site-url is never handed out before
        // its route answers.
        let table = Arc::new(table);
        *self.frontend.table.write().unwrap_or_else(|p| p.into_inner()) = table.clone();
        let summary = self.publish(&specs, &table, &unreadable);
        self.frontend.metrics.reloads.fetch_add(1, Ordering::Relaxed);
        self.frontend
            .metrics
            .routes_served
            .store(summary.served as u64, Ordering::Relaxed);
        self.frontend
            .metrics
            .routes_refused
            .store(summary.refused as u64, Ordering::Relaxed);
        tracing::info!(served = summary.served, refused = summary.refused, "routes reloaded");
        summary
    }

    /// The certificate for `domain` (named by shared instance `reference`)
    /// when the user brought none; `None` if none could be made.
    async fn certify(&mut self, domain: &str, reference: &str) -> Option<Certified> {
        let now = now_secs();
        if let Some(cluster) = &self.cluster {
            let current = self.sites.get(domain).cloned().or_else(|| cluster.kept(domain));
            if let Some(site) = current.as_ref().filter(|s| !s.due(now)) {
                self.sites.insert(domain.to_string(), site.clone());
                return Some(Certified::Served(site.key.clone(), site.ca_pem.clone()));
            }
            let asked = if self.waiting {
                Err(AskError::Unavailable(
                    "the Master did not answer an earlier ask of this reload".into(),
                ))
            } else {
                cluster.ask(domain, reference).await
            };
            match asked {
                Ok(site) => {
                    let served = Certified::Served(site.key.clone(), site.ca_pem.clone());
                    self.sites.insert(domain.to_string(), site);
                    return Some(served);
                }
                Err(AskError::Refused(e)) => {
                    self.sites.remove(domain);
                    return Some(Certified::Refused(e));
                }
                Err(AskError::Unavailable(e)) => {
                    self.waiting = true;
                    if let Some(site) = current.filter(|s| s.valid(now)) {
                        tracing::warn!(%domain, error = %e, "cannot renew the site certificate yet; serving the current one");
                        let served = Certified::Served(site.key.clone(), site.ca_pem.clone());
                        self.sites.insert(domain.to_string(), site);
                        return Some(served);
                    }
                    tracing::warn!(%domain, error = %e, "no certificate from the cluster's CA yet; serving one from the frontend's CA meanwhile");
                }
            }
        }
        let key = match self.issued.get(domain) {
            Some(c) => c.clone(),
            None => match self.authority.issue(&[domain.to_string()]) {
                Ok(c) => {
                    self.issued.insert(domain.to_string(), c.clone());
                    c
                }
                Err(e) => {
                    tracing::warn!(%domain, error = %e, "cannot issue a certificate");
                    return None;
                }
            },
        };
        Some(Certified::Served(key, self.authority.cert_pem.clone()))
    }

    fn connection(&self, route: &Route) -> serde_json::Value {
        let host = route.domain.clone().unwrap_or_else(|| self.public.host.clone());
        let plain = self.public.url(&host, false, &route.path_prefix);
        let secure = self.public.url(&host, true, &route.path_prefix);
        let site = if route.https_only {
            secure.clone()
        } else {
            plain.or(secure.clone())
        };
        let mut c = json!({ "site-url": site, "secure-access": secure });
        if let Some(d) = &route.domain {
            c["domain"] = json!(d);
            c["domain-verification"] = json!(domain_verification(&route.owner, d));
        }
        // The CAs a client checks the HTTPS site against: none for the
        // user's own certificate (theirs to know).
        let ca = match &route.domain {
            Some(d) => self.trusted.get(d).cloned(),
            None => Some(self.authority.cert_pem.clone()),
        };
        if let Some(ca) = ca {
            c["ca-certificate"] = json!(ca);
        }
        c
    }

    fn publish(&self, specs: &[RouteSpec], table: &RouteTable, unreadable: &BTreeMap<String, String>) -> Summary {
        let _ = std::fs::create_dir_all(&self.dirs.published);
        let mut summary = Summary::default();
        let mut written = Vec::new();
        for spec in specs {
            let result = match table.verdicts.get(&spec.reference) {
                Some(Verdict::Served(route)) => {
                    summary.served += 1;
                    json!({ "serial": spec.serial, "connection": self.connection(route) })
                }
                Some(Verdict::Refused(e)) => {
                    summary.refused += 1;
                    tracing::warn!(shared = %spec.reference, error = %e, "shared instance refused");
                    json!({ "serial": spec.serial, "error": e })
                }
                None => continue,
            };
            written.push(format!("{}.json", spec.reference));
            let path = self.dirs.published.join(format!("{}.json", spec.reference));
            if let Err(e) = write_atomically(&path, &result.to_string()) {
                tracing::warn!(path = %path.display(), error = %e, "cannot write a result");
            }
        }
        for (stem, e) in unreadable {
            summary.refused += 1;
            tracing::warn!(file = %stem, error = %e, "route file refused");
        }
        // Results of shared instances gone.
        if let Ok(entries) = std::fs::read_dir(&self.dirs.published) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().to_string();
                if name.ends_with(".json") && !written.contains(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        summary
    }
}

/// Writes `text` at `path` through a temporary file and a rename, so a
/// reader sees the old content or the new, never half.
pub fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}
