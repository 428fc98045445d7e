//! The native software-release format (documented in docs/software-release.md).
//!
//! A release is a TOML manifest at a URL (`file://`, `http://`, `https://`,
//! or a plain absolute path). It says what to fetch (each file checked against its
//! SHA-256), how to build, and for each software type an instance profile:
//! files rendered from the parameters and the partition's facts, processes,
//! promises, connection parameters to publish, children to request, and what
//! to do for each shared instance the partition hosts.
//!
//! Templates are plain text with `{{name}}` placeholders (see [`Facts`]); an
//! unknown name is an error that names it, never an empty string.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The manifest's file name inside an installed release.
pub const MANIFEST: &str = "software.toml";

/// A software release manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Release {
    pub name: String,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub fetch: Vec<Fetch>,
    #[serde(default)]
    pub build: Option<Build>,
    /// Profiles by software type; `default` when a request names none.
    #[serde(default)]
    pub instance: BTreeMap<String, Profile>,
}

/// A file to download into the release, checked against its digest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fetch {
    /// Absolute URL, or a path relative to the manifest's URL.
    pub url: String,
    pub sha256: String,
    /// Where it goes, relative to the release directory.
    pub to: String,
    #[serde(default)]
    pub executable: bool,
}

/// How to build, run in the release directory as the software user.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub command: Vec<String>,
    /// Seconds before the build is killed.
    #[serde(default = "default_build_timeout")]
    pub timeout: u64,
}

fn default_build_timeout() -> u64 {
    3600
}

/// What an instance of one software type is.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Parameter defaults; requested parameters override them.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub file: Vec<FileTemplate>,
    #[serde(default)]
    pub process: Vec<ProcessTemplate>,
    #[serde(default)]
    pub promise: Vec<PromiseTemplate>,
    /// Connection parameters to publish: name -> template.
    #[serde(default)]
    pub connection: BTreeMap<String, String>,
    #[serde(default)]
    pub child: Vec<ChildTemplate>,
    /// Per hosted shared instance.
    #[serde(default)]
    pub shared: Option<SharedTemplate>,
    /// Tunnels to or from other partitions, over mutual TLS.
    #[serde(default)]
    pub tunnel: Vec<TunnelTemplate>,
    /// Run before a partition is wiped.
    #[serde(default)]
    pub destroy: Option<Vec<String>>,
}

/// One end of a tunnel between partitions (see [`crate::tunnel`]): a server
/// end has `forward` and `allow`, a client end `connect` and `peer`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TunnelTemplate {
    /// Names the supervised process (`tunnel-NAME`).
    pub name: String,
    /// Where this end listens, host:port.
    pub listen: String,
    /// Server end: the partition's service, host:port.
    #[serde(default)]
    pub forward: Option<String>,
    /// Server end: the partitions let in, COMPUTER/PARTITION (empty
    /// entries are skipped, so an optional parameter may fill one).
    #[serde(default)]
    pub allow: Vec<String>,
    /// Client end: the server end, host:port.
    #[serde(default)]
    pub connect: Option<String>,
    /// Client end: the partition the server end must be.
    #[serde(default)]
    pub peer: Option<String>,
}

/// A file rendered into the partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTemplate {
    /// Relative to the partition directory.
    pub path: String,
    pub content: String,
    /// Octal, such as "0640".
    #[serde(default)]
    pub mode: Option<String>,
}

/// A supervised process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessTemplate {
    pub name: String,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds between SIGTERM and SIGKILL.
    #[serde(default = "default_stop_timeout")]
    pub stop_timeout: u64,
}

fn default_stop_timeout() -> u64 {
    10
}

/// A promise: exactly one of `command`, `tcp`, `http`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromiseTemplate {
    pub name: String,
    #[serde(default)]
    pub command: Option<Vec<String>>,
    #[serde(default)]
    pub tcp: Option<String>,
    #[serde(default)]
    pub http: Option<String>,
    /// Seconds one check may take.
    #[serde(default = "default_promise_timeout")]
    pub timeout: u64,
}

fn default_promise_timeout() -> u64 {
    10
}

/// A child instance the instance requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildTemplate {
    pub title: String,
    /// Default: this release.
    #[serde(default)]
    pub software_release: Option<String>,
    #[serde(default = "default_type")]
    pub software_type: String,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub sla: BTreeMap<String, String>,
}

fn default_type() -> String {
    "default".into()
}

/// What the host does for each shared instance it serves: files rendered with
/// `shared.*` facts, and connection parameters published for it.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedTemplate {
    #[serde(default)]
    pub file: Vec<FileTemplate>,
    #[serde(default)]
    pub connection: BTreeMap<String, String>,
    /// A file the instance writes for each shared instance once it has
    /// taken it into account (a JSON object naming `serial`, with
    /// `connection` or `error`): its connection parameters are published
    /// with those of `connection`, its error reported for that shared
    /// instance alone.
    #[serde(default)]
    pub result: Option<String>,
}

/// Why a release could not be read or used.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error("cannot read the release manifest {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("release manifest {url} is invalid: {reason}")]
    Parse { url: String, reason: String },
    #[error("release has no profile for software type {0:?}")]
    NoProfile(String),
    #[error("{0}")]
    Template(String),
    /// A `{{file:…}}` the instance has not written yet: try again later.
    #[error("{0}")]
    NotYet(String),
}

impl Release {
    /// Parses a manifest; `url` only names it in errors.
    pub fn parse(url: &str, text: &str) -> Result<Release, ReleaseError> {
        let release: Release = toml::from_str(text).map_err(|e| ReleaseError::Parse {
            url: url.into(),
            reason: e.to_string(),
        })?;
        for f in &release.fetch {
            if f.sha256.len() != 64 || !f.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(ReleaseError::Parse {
                    url: url.into(),
                    reason: format!("fetch {}: sha256 must be 64 hex digits", f.url),
                });
            }
            if f.to.starts_with('/') || f.to.split('/').any(|c| c == "..") {
                return Err(ReleaseError::Parse {
                    url: url.into(),
                    reason: format!("fetch {}: `to` must stay inside the release directory", f.url),
                });
            }
        }
        for (ty, p) in &release.instance {
            for pr in &p.promise {
                let kinds = [pr.command.is_some(), pr.tcp.is_some(), pr.http.is_some()];
                if kinds.iter().filter(|k| **k).count() != 1 {
                    return Err(ReleaseError::Parse {
                        url: url.into(),
                        reason: format!(
                            "instance.{ty} promise {}: give exactly one of command, tcp, http",
                            pr.name
                        ),
                    });
                }
            }
            for t in &p.tunnel {
                let server = t.forward.is_some();
                let client = t.connect.is_some() && t.peer.is_some();
                if server == client
                    || (server && (t.connect.is_some() || t.peer.is_some()))
                    || (!server && !t.allow.is_empty())
                {
                    return Err(ReleaseError::Parse {
                        url: url.into(),
                        reason: format!(
                            "instance.{ty} tunnel {}: a server end has forward (and allow), a client end connect and peer",
                            t.name
                        ),
                    });
                }
            }
            let files = p.file.iter().chain(p.shared.iter().flat_map(|s| s.file.iter()));
            for f in files {
                if f.path.starts_with('/') || f.path.split('/').any(|c| c == "..") {
                    return Err(ReleaseError::Parse {
                        url: url.into(),
                        reason: format!("instance.{ty} file {}: path must stay inside the partition", f.path),
                    });
                }
            }
        }
        Ok(release)
    }

    /// The profile of `software_type` (`default` when empty; RootSoftwareInstance
    /// is SlapOS's name for it).
    pub fn profile(&self, software_type: &str) -> Result<&Profile, ReleaseError> {
        let ty = match software_type {
            "" | "RootSoftwareInstance" => "default",
            t => t,
        };
        self.instance
            .get(ty)
            .ok_or_else(|| ReleaseError::NoProfile(ty.to_string()))
    }
}

/// Resolves `relative` against the manifest's URL.
pub fn resolve(base_url: &str, relative: &str) -> String {
    if relative.contains("://") || relative.starts_with('/') {
        return relative.to_string();
    }
    match base_url.rfind('/') {
        Some(i) => format!("{}/{}", &base_url[..i], relative),
        None => relative.to_string(),
    }
}

/// The local path of a `file://` URL or an absolute path, if it is one.
pub fn local_path(url: &str) -> Option<PathBuf> {
    if let Some(p) = url.strip_prefix("file://") {
        return Some(PathBuf::from(p));
    }
    if url.starts_with('/') {
        return Some(PathBuf::from(url));
    }
    None
}

/// Where the CA certificates for `https://` releases are read from:
/// `NODEAGENT_CA_BUNDLE`, else Debian's bundle.
pub fn ca_bundle_path() -> PathBuf {
    std::env::var_os("NODEAGENT_CA_BUNDLE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"))
}

/// Reads the bytes at `url`: a local file, or an `http://` or `https://` GET
/// (the server checked against the system's CA bundle).
pub async fn fetch(url: &str) -> Result<Vec<u8>, ReleaseError> {
    let fail = |reason: String| ReleaseError::Fetch {
        url: url.into(),
        reason,
    };
    if let Some(path) = local_path(url) {
        return tokio::fs::read(&path).await.map_err(|e| fail(e.to_string()));
    }
    if url.starts_with("https://") {
        let bundle = ca_bundle_path();
        let pem = std::fs::read_to_string(&bundle)
            .map_err(|e| fail(format!("cannot read the CA bundle {}: {e}", bundle.display())))?;
        return fetch_http(url, Some(&pem)).await;
    }
    if url.starts_with("http://") {
        return fetch_http(url, None).await;
    }
    Err(fail(
        "only file://, absolute paths, http:// and https:// are supported".into(),
    ))
}

/// GETs `url`; for https, trusting the CA certificates in `roots_pem`.
pub async fn fetch_http(url: &str, roots_pem: Option<&str>) -> Result<Vec<u8>, ReleaseError> {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::client::legacy::Client;
    let fail = |reason: String| ReleaseError::Fetch {
        url: url.into(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = roots_pem {
        use rustls::pki_types::pem::PemObject;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
            // A bundle may hold certificates webpki cannot use; skip those.
            let _ = roots.add(cert);
        }
    }
    let tls =
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| fail(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Empty<bytes::Bytes>> = Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector);
    let uri = url
        .parse()
        .map_err(|e: hyper::http::uri::InvalidUri| fail(e.to_string()))?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(300), client.get(uri))
        .await
        .map_err(|_| fail("no answer within 300 s".into()))?
        .map_err(|e| fail(format!("{e:?}")))?;
    if !resp.status().is_success() {
        return Err(fail(format!("HTTP {}", resp.status())));
    }
    let body = resp.into_body().collect().await.map_err(|e| fail(e.to_string()))?;
    Ok(body.to_bytes().to_vec())
}

/// The names a template may use, flat: `partition.ipv4`, `param.port`, ...
///
/// Where the instance's processes already run (connection parameters,
/// children, shared connection parameters), `{{file:PATH}}` also names the
/// content of a file the instance wrote in its partition: a join token, a
/// generated password, an address learned at start.
#[derive(Debug, Clone, Default)]
pub struct Facts {
    names: BTreeMap<String, String>,
    /// The partition directory `{{file:…}}` reads from, once allowed.
    files: Option<PathBuf>,
}

/// The most a `{{file:…}}` placeholder reads: a value, not a data file.
const FILE_PLACEHOLDER_LIMIT: u64 = 64 * 1024;

/// Reads `relative` inside `dir` for a `{{file:…}}` placeholder: a regular
/// file that really lies inside the partition (the path is checked on the
/// opened descriptor, so a symlink planted by the partition's user cannot
/// make the agent publish a file of someone else), at most 64 KiB, trailing
/// whitespace removed.
pub fn read_partition_file(dir: &Path, relative: &str) -> Result<String, ReleaseError> {
    use std::io::Read;
    let bad = |reason: String| ReleaseError::Template(format!("{{{{file:{relative}}}}}: {reason}"));
    if relative.is_empty() || relative.starts_with('/') || relative.split('/').any(|c| c == "..") {
        return Err(bad("the path must be relative and stay inside the partition".into()));
    }
    let file = match std::fs::File::open(dir.join(relative)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(ReleaseError::NotYet(format!(
                "{{{{file:{relative}}}}}: the instance has not written {relative} yet"
            )))
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    let meta = file.metadata().map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if meta.len() > FILE_PLACEHOLDER_LIMIT {
        return Err(bad(format!(
            "{} bytes, more than the {FILE_PLACEHOLDER_LIMIT} a placeholder reads",
            meta.len()
        )));
    }
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&file)))
        .map_err(|e| bad(format!("cannot tell where it lies: {e}")))?;
    let root = dir.canonicalize().map_err(|e| bad(e.to_string()))?;
    if !opened.starts_with(&root) {
        return Err(bad(format!("it leads to {}, outside the partition", opened.display())));
    }
    let mut text = String::new();
    file.take(FILE_PLACEHOLDER_LIMIT)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("not UTF-8 text ({e})")))?;
    Ok(text.trim_end().to_string())
}

impl Facts {
    /// Allows `{{file:PATH}}`, read inside `partition_dir`.
    pub fn with_files(mut self, partition_dir: &Path) -> Facts {
        self.files = Some(partition_dir.to_path_buf());
        self
    }

    /// Sets `name`.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) {
        self.names.insert(name.into(), value.into());
    }

    /// Sets `prefix.k` for every entry.
    pub fn set_all<'a>(&mut self, prefix: &str, entries: impl IntoIterator<Item = (&'a String, &'a String)>) {
        for (k, v) in entries {
            self.set(format!("{prefix}.{k}"), v.clone());
        }
    }

    /// Renders `template`; `what` names it in errors.
    pub fn render(&self, what: &str, template: &str) -> Result<String, ReleaseError> {
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find("}}")
                .ok_or_else(|| ReleaseError::Template(format!("{what}: `{{{{` without `}}}}`")))?;
            let name = after[..end].trim();
            if let Some(relative) = name.strip_prefix("file:") {
                let Some(dir) = &self.files else {
                    return Err(ReleaseError::Template(format!(
                        "{what}: {{{{{name}}}}} may only be used in connection parameters and children, \
                         which are rendered once the instance's processes run"
                    )));
                };
                let value = read_partition_file(dir, relative.trim()).map_err(|e| match e {
                    ReleaseError::NotYet(m) => ReleaseError::NotYet(format!("{what}: {m}")),
                    other => ReleaseError::Template(format!("{what}: {other}")),
                })?;
                out.push_str(&value);
                rest = &after[end + 2..];
                continue;
            }
            let value = self.names.get(name).ok_or_else(|| {
                ReleaseError::Template(format!(
                    "{what}: unknown placeholder {{{{{name}}}}} (known: {}, file:PATH)",
                    self.names.keys().cloned().collect::<Vec<_>>().join(", ")
                ))
            })?;
            out.push_str(value);
            rest = &after[end + 2..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// Renders every element.
    pub fn render_all(&self, what: &str, items: &[String]) -> Result<Vec<String>, ReleaseError> {
        items.iter().map(|t| self.render(what, t)).collect()
    }
}

/// Writes `content` at `dir/relative` if it differs; returns whether it did.
pub fn write_if_changed(dir: &Path, relative: &str, content: &str, mode: Option<u32>) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(relative);
    if std::fs::read(&path).ok().as_deref() == Some(content.as_bytes()) {
        return Ok(false);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = path.with_extension("nodeagent-tmp");
    std::fs::write(&tmp, content)?;
    if let Some(mode) = mode {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST_TEXT: &str = r#"
name = "demo"
[[fetch]]
url = "server.py"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
to = "bin/server.py"
[instance.default]
parameters = { greeting = "hi" }
[[instance.default.process]]
name = "web"
command = ["python3", "{{software.dir}}/bin/server.py", "{{partition.port}}"]
[[instance.default.promise]]
name = "listens"
tcp = "{{partition.ipv4}}:{{partition.port}}"
[instance.default.connection]
url = "http://{{partition.ipv4}}:{{partition.port}}/"
"#;

    #[test]
    fn parses_and_renders() {
        let r = Release::parse("file:///x/software.toml", MANIFEST_TEXT).unwrap();
        let p = r.profile("").unwrap();
        assert_eq!(p.process[0].name, "web");
        let mut f = Facts::default();
        f.set("partition.ipv4", "10.0.0.1");
        f.set("partition.port", "20000");
        assert_eq!(f.render("t", &p.connection["url"]).unwrap(), "http://10.0.0.1:20000/");
        let err = f
            .render("process web", &p.process[0].command[1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown placeholder {{software.dir}}"), "{err}");
        assert!(f.render("t", "{{ oops").is_err());
        assert!(matches!(r.profile("nope"), Err(ReleaseError::NoProfile(_))));
        assert_eq!(resolve("file:///x/software.toml", "server.py"), "file:///x/server.py");
        assert_eq!(resolve("http://h/a/b.toml", "http://o/c"), "http://o/c");
    }

    #[tokio::test]
    async fn fetches_over_https_checking_the_server() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![cert.der().clone()],
                    rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
                )
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    continue;
                };
                let mut buf = [0u8; 1024];
                let _ = tls.read(&mut buf).await;
                let body = "name = \"remote\"\n";
                let _ = tls
                    .write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
                let _ = tls.shutdown().await;
            }
        });
        let url = format!("https://localhost:{port}/software.toml");
        let bytes = fetch_http(&url, Some(&ca.pem())).await.unwrap();
        assert!(Release::parse(&url, std::str::from_utf8(&bytes).unwrap()).is_ok());
        // A server the bundle does not vouch for is refused.
        let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        assert!(fetch_http(&url, Some(&other.cert.pem())).await.is_err());
    }

    #[test]
    fn rejects_bad_manifests() {
        let bad_digest =
            MANIFEST_TEXT.replace("0000000000000000000000000000000000000000000000000000000000000000", "12");
        assert!(Release::parse("u", &bad_digest).is_err());
        let escape = MANIFEST_TEXT.replace("bin/server.py\"", "../../etc/passwd\"");
        assert!(Release::parse("u", &escape).is_err());
        let two_kinds = MANIFEST_TEXT.replace("tcp = ", "http = \"x\"\ntcp = ");
        assert!(Release::parse("u", &two_kinds).is_err());
        assert!(Release::parse("u", "name = \"x\"\nunknown = 1").is_err());
    }

    #[test]
    fn file_placeholders_read_inside_the_partition_only() {
        let tmp = tempfile::tempdir().unwrap();
        let part = tmp.path().join("slappart0");
        std::fs::create_dir_all(part.join("srv")).unwrap();
        std::fs::write(part.join("srv/token"), "SLAPJOIN2.abc\n").unwrap();
        std::fs::write(tmp.path().join("secret"), "not yours").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret"), part.join("srv/escape")).unwrap();
        std::os::unix::fs::symlink("token", part.join("srv/alias")).unwrap();
        std::fs::write(part.join("big"), vec![b'x'; 70 * 1024]).unwrap();

        let mut f = Facts::default();
        f.set("partition.port", "20000");
        // Not where processes may not have run yet.
        let err = f.render("process web", "{{file:srv/token}}").unwrap_err().to_string();
        assert!(err.contains("only be used in connection parameters"), "{err}");

        let f = f.with_files(&part);
        assert_eq!(
            f.render("connection t", "t={{file:srv/token}}:{{partition.port}}")
                .unwrap(),
            "t=SLAPJOIN2.abc:20000"
        );
        assert_eq!(
            f.render("connection t", "{{ file:srv/alias }}").unwrap(),
            "SLAPJOIN2.abc"
        );
        assert!(matches!(
            f.render("connection t", "{{file:srv/none}}"),
            Err(ReleaseError::NotYet(_))
        ));
        for (template, expected) in [
            ("{{file:srv/escape}}", "outside the partition"),
            ("{{file:../secret}}", "stay inside"),
            ("{{file:/etc/passwd}}", "stay inside"),
            ("{{file:srv}}", "not a regular file"),
            ("{{file:big}}", "more than"),
        ] {
            let err = f.render("connection t", template).unwrap_err();
            assert!(matches!(err, ReleaseError::Template(_)), "{template}: {err:?}");
            assert!(err.to_string().contains(expected), "{template}: {err}");
        }
    }
}
