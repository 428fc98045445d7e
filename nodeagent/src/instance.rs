//! Deploying, stopping and destroying partitions (the seed's
//! `slapos node instance`, with supervision built in).
//!
//! A partition is reconfigured only when what the Master says about it (its
//! timestamp and requested state) differs from what was last deployed, which
//! the agent records under `<instance_root>/.nodeagent/deployed/`, out of the
//! partitions' reach. Partitions are processed one at a time, in the order the
//! Master lists them, so the node's cores stay with the services.
//!
//! A started partition: render its files, (re)start exactly the processes its
//! profile lists, publish its connection parameters, request its children
//! (and tell the Master which ones it still wants), serve its hosted shared
//! instances; once every changed partition is configured, run their promises
//! and report each one started. Any failure is reported with its message and
//! the deployment is retried on the next run.
//!
//! A destroyed partition: stop its processes, run the destroy hook, kill
//! every process of its user, empty its directory, then report it destroyed
//! so the Master frees it.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slap_proto::marshal::{self, Value};
use tracing::{info, warn};

use crate::config::{NodeConfig, PartitionResource};
use crate::master::{InstancePlan, MasterClient, PartitionPlan};
use crate::promise::{Check, Promise};
use crate::release::{write_if_changed, Facts, Profile, Release};
use crate::software;
use crate::supervisor::{pids_of_uid, ProcessSpec, Supervisor};

/// What happened to one partition in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Free,
    Unchanged,
    Started,
    Stopped,
    Destroyed,
    Failed(String),
}

/// What processing one partition left to do.
enum Step {
    Done(Outcome),
    /// Configured; promises and the started report remain.
    Confirm(Box<Confirm>),
}

struct Confirm {
    resource: PartitionResource,
    title: String,
    fingerprint: String,
    promises: Vec<Promise>,
    started: Instant,
}

/// The instance side of the agent.
pub struct Instances {
    pub cfg: NodeConfig,
    pub master: Arc<MasterClient>,
    pub supervisor: Arc<Supervisor>,
    resources: BTreeMap<String, PartitionResource>,
    deployed: HashMap<String, String>,
    /// The serial of the certificate kept for each partition, once read.
    certificate_serials: HashMap<String, String>,
    /// How long promises may take to pass after a run's configurations.
    pub promise_wait: Duration,
}

impl Instances {
    /// The instance side over formatted `resources`.
    pub fn new(
        cfg: NodeConfig,
        master: Arc<MasterClient>,
        supervisor: Arc<Supervisor>,
        resources: Vec<PartitionResource>,
    ) -> Instances {
        let deployed_dir = cfg.agent_dir().join("deployed");
        let _ = std::fs::create_dir_all(&deployed_dir);
        let deployed = resources
            .iter()
            .filter_map(|r| {
                let text = std::fs::read_to_string(deployed_dir.join(&r.id)).ok()?;
                // A started partition whose processes left no record (stopped
                // by a previous agent, or never recorded) is deployed again.
                let has_processes = cfg.agent_dir().join("run").join(&r.id).exists();
                (has_processes || text.ends_with("\nstopped")).then(|| (r.id.clone(), text))
            })
            .collect();
        Instances {
            cfg,
            master,
            supervisor,
            resources: resources.into_iter().map(|r| (r.id.clone(), r)).collect(),
            deployed,
            certificate_serials: HashMap::new(),
            promise_wait: Duration::from_secs(30),
        }
    }

    fn deployed_path(&self, partition: &str) -> PathBuf {
        self.cfg.agent_dir().join("deployed").join(partition)
    }

    fn record(&mut self, partition: &str, fingerprint: Option<String>) {
        let path = self.deployed_path(partition);
        match &fingerprint {
            Some(f) => {
                if let Err(e) = std::fs::write(&path, f) {
                    warn!(partition, error = %e, "cannot record the deployment");
                }
                self.deployed.insert(partition.to_string(), f.clone());
            }
            None => {
                let _ = std::fs::remove_file(&path);
                self.deployed.remove(partition);
            }
        }
    }

    /// Processes every partition of the plan; `force` redeploys unchanged ones.
    ///
    /// Two passes: every changed partition is configured first, one at a
    /// time (files, processes, publication, children); then their promises
    /// are checked, sharing one deadline, and each passing partition is
    /// reported started. Services start in parallel while the agent moves
    /// on, instead of the agent waiting for each one in turn.
    pub async fn process(&mut self, partitions: &[PartitionPlan], force: bool) -> Vec<(String, Outcome)> {
        let mut outcomes = Vec::new();
        let mut pending = Vec::new();
        for p in partitions {
            let Some(resource) = self.resources.get(&p.id).cloned() else {
                continue;
            };
            let outcome = match &p.instance {
                None => {
                    if self.deployed.contains_key(&p.id) {
                        self.record(&p.id, None);
                    }
                    Outcome::Free
                }
                Some(inst) => match self.process_one(&resource, inst, force).await {
                    Step::Done(outcome) => outcome,
                    Step::Confirm(confirm) => {
                        pending.push((outcomes.len(), confirm));
                        Outcome::Started
                    }
                },
            };
            outcomes.push((p.id.clone(), outcome));
        }
        let deadline = Instant::now() + self.promise_wait;
        for (slot, confirm) in pending {
            outcomes[slot].1 = self.confirm(confirm, deadline).await;
        }
        for (id, outcome) in &outcomes {
            if let Outcome::Failed(msg) = outcome {
                warn!(partition = %id, error = %msg, "partition failed");
            }
        }
        outcomes
    }

    async fn process_one(&mut self, r: &PartitionResource, inst: &InstancePlan, force: bool) -> Step {
        let fingerprint = format!("{}\n{}", inst.timestamp, inst.requested_state);
        if inst.requested_state == "destroyed" {
            return Step::Done(match self.destroy(r, inst).await {
                Ok(()) => {
                    self.record(&r.id, None);
                    Outcome::Destroyed
                }
                Err(e) => Outcome::Failed(e),
            });
        }
        if !force && self.deployed.get(&r.id) == Some(&fingerprint) {
            self.keep_certificate_current(r, inst).await;
            return Step::Done(Outcome::Unchanged);
        }
        let started = Instant::now();
        if inst.requested_state == "stopped" {
            return Step::Done(match self.stop(r).await {
                Ok(()) => {
                    info!(partition = %r.id, instance = %inst.title, "partition stopped");
                    self.record(&r.id, Some(fingerprint));
                    Outcome::Stopped
                }
                Err(msg) => self.fail(r, msg).await,
            });
        }
        match self.deploy(r, inst).await {
            Ok(promises) => Step::Confirm(Box::new(Confirm {
                resource: r.clone(),
                title: inst.title.clone(),
                fingerprint,
                promises,
                started,
            })),
            Err(msg) => Step::Done(self.fail(r, msg).await),
        }
    }

    /// Promises of a configured partition, then the started report.
    async fn confirm(&mut self, c: Box<Confirm>, deadline: Instant) -> Outcome {
        for p in &c.promises {
            loop {
                match p.run(&c.resource).await {
                    Ok(()) => break,
                    Err(e) if Instant::now() >= deadline => return self.fail(&c.resource, e).await,
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        if !self.post(&c.resource, "startedComputerPartition", &[]).await {
            return Outcome::Failed("could not report the partition started".into());
        }
        info!(partition = %c.resource.id, instance = %c.title, took = ?c.started.elapsed(), "partition started");
        self.record(&c.resource.id, Some(c.fingerprint));
        Outcome::Started
    }

    /// Records and reports a failure; the partition is retried next run.
    async fn fail(&self, r: &PartitionResource, msg: String) -> Outcome {
        let _ = std::fs::write(self.cfg.agent_dir().join(format!("{}.error.log", r.id)), &msg);
        self.post(r, "softwareInstanceError", &[("error_log", &msg)]).await;
        Outcome::Failed(msg)
    }

    async fn post(&self, r: &PartitionResource, path: &str, extra: &[(&str, &str)]) -> bool {
        let mut fields = vec![
            ("computer_id", self.cfg.computer_id.as_str()),
            ("computer_partition_id", r.id.as_str()),
        ];
        fields.extend_from_slice(extra);
        match self.master.post(path, &fields).await {
            Ok(_) => true,
            Err(e) => {
                warn!(partition = %r.id, call = path, error = %e, "could not report to the master");
                false
            }
        }
    }

    /// The installed release and profile of an instance.
    fn profile_of(&self, inst: &InstancePlan) -> Result<(PathBuf, Release), String> {
        software::installed(&self.cfg, &inst.software_release).ok_or_else(|| {
            format!(
                "software release {} is not installed on this node yet",
                inst.software_release
            )
        })
    }

    /// Everything a template may name, for this partition and instance.
    pub fn facts(
        &self,
        r: &PartitionResource,
        inst: &InstancePlan,
        sw_dir: &std::path::Path,
        profile: &Profile,
    ) -> Facts {
        let mut f = Facts::default();
        f.set("partition.id", r.id.clone());
        f.set("partition.dir", r.dir.to_string_lossy());
        f.set("partition.user", r.user.clone().unwrap_or_else(current_user));
        f.set("partition.ipv4", r.ipv4.clone());
        f.set("partition.ipv6", r.ipv6.clone().unwrap_or_default());
        f.set("partition.tap", r.tap.clone().unwrap_or_default());
        f.set("partition.port", r.port.to_string());
        for k in 0..10u16 {
            f.set(format!("partition.port.{k}"), (r.port + k).to_string());
        }
        let certs = self.certificate_dir(&r.id);
        f.set("partition.cert_file", certs.join("partition.crt").to_string_lossy());
        f.set("partition.key_file", certs.join("partition.key").to_string_lossy());
        f.set("partition.ca_file", certs.join("ca.crt").to_string_lossy());
        f.set("computer.id", self.cfg.computer_id.clone());
        f.set("master.url", self.master.primary_url());
        f.set("software.dir", sw_dir.to_string_lossy());
        f.set("software.url", inst.software_release.clone());
        f.set("instance.title", inst.title.clone());
        f.set("instance.root_title", inst.root_title.clone());
        f.set("instance.guid", inst.guid.clone());
        f.set("instance.type", inst.software_type.clone());
        f.set("instance.state", inst.requested_state.clone());
        f.set_all("param", &profile.parameters);
        f.set_all("param", &inst.parameters);
        f
    }

    async fn deploy(&mut self, r: &PartitionResource, inst: &InstancePlan) -> Result<Vec<Promise>, String> {
        let (sw_dir, release) = self.profile_of(inst)?;
        let profile = release.profile(&inst.software_type).map_err(|e| e.to_string())?;
        self.place_certificate(r).await;
        let facts = self.facts(r, inst, &sw_dir, profile);
        for file in &profile.file {
            self.render_file(r, &facts, file)?;
        }
        let mut specs = Vec::new();
        for p in &profile.process {
            specs.push(ProcessSpec {
                name: p.name.clone(),
                argv: facts
                    .render_all(&format!("process {}", p.name), &p.command)
                    .map_err(|e| e.to_string())?,
                env: p
                    .env
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), facts.render(&format!("process {} env {k}", p.name), v)?)))
                    .collect::<Result<_, crate::release::ReleaseError>>()
                    .map_err(|e| e.to_string())?,
                stop_timeout_secs: p.stop_timeout,
            });
        }
        for t in &profile.tunnel {
            specs.push(self.tunnel_process(r, &facts, t)?);
        }
        self.supervisor.apply(r, specs).await.map_err(|e| e.to_string())?;

        // Connection parameters and children, which may name what the
        // processes just started write (`{{file:…}}`): given a moment.
        let live = facts.clone().with_files(&r.dir);
        let (connection, children) = render_published(&live, inst, profile).await?;
        if !connection.is_empty() {
            self.publish(r, &connection, None).await?;
        }

        // Children, then the list of those still wanted (the Master unlinks the rest).
        let mut titles = Vec::new();
        for c in children {
            self.request_child(r, &c.title, &c.url, &c.software_type, &c.parameters, &c.sla, c.shared)
                .await?;
            titles.push(c.title);
        }
        let list =
            marshal::dumps(&Value::List(titles.into_iter().map(Value::Str).collect())).map_err(|e| e.to_string())?;
        self.post(
            r,
            "updateComputerPartitionRelatedInstanceList",
            &[("instance_reference_xml", &list)],
        )
        .await;

        // Hosted shared instances: one failing does not fail the host or the others.
        if let Some(shared) = &profile.shared {
            let mut files = BTreeMap::new();
            for s in &inst.shared {
                let rendered = files.entry(s.reference.clone()).or_insert_with(Vec::new);
                if let Err(e) = self.serve_shared(r, &live, shared, s, rendered).await {
                    warn!(partition = %r.id, shared = %s.reference, error = %e, "shared instance failed");
                    self.post(
                        r,
                        "softwareInstanceError",
                        &[("error_log", &e), ("slave_reference", &s.reference)],
                    )
                    .await;
                }
            }
            self.forget_gone_shared(r, files);
        }

        // Checked by `confirm`: the deployment counts only once the instance works.
        render_promises(&facts, profile)
    }

    /// Where a partition's certificate and key are kept: under the agent's
    /// own directory (root's), so a partition cannot redirect the writes, and
    /// readable by the partition's user only.
    fn certificate_dir(&self, partition: &str) -> PathBuf {
        self.cfg.agent_dir().join("certs").join(partition)
    }

    /// The serial of the certificate kept for a partition, if any.
    fn kept_certificate_serial(&mut self, partition: &str) -> Option<String> {
        if let Some(serial) = self.certificate_serials.get(partition) {
            return Some(serial.clone());
        }
        let pem = std::fs::read_to_string(self.certificate_dir(partition).join("partition.crt")).ok()?;
        let serial = slap_proto::live::Validity::of_pem(&pem)?.serial;
        self.certificate_serials.insert(partition.to_string(), serial.clone());
        Some(serial)
    }

    /// Fetches the partition's certificate again when the document names
    /// another one than the one kept (the Master gave it a new one during a
    /// CA rotation, or issued it after the deployment): the files change,
    /// the instance is not redeployed.
    async fn keep_certificate_current(&mut self, r: &PartitionResource, inst: &InstancePlan) {
        let Some(wanted) = &inst.certificate_serial else { return };
        let kept = self.kept_certificate_serial(&r.id);
        if kept.as_ref() == Some(wanted) {
            return;
        }
        self.place_certificate(r).await;
        let now = self.kept_certificate_serial(&r.id);
        if now.as_ref() == Some(wanted) {
            info!(partition = %r.id, old = ?kept, new = %wanted, "partition certificate replaced without a redeployment");
        }
    }

    /// Fetches the partition's certificate from the Master
    /// (`getComputerPartitionCertificate`) and keeps it for the instance.
    /// The Master issues it right after allocation; a certificate not issued
    /// yet is waited for briefly, then left for the next run (the document
    /// names it once issued, see [`Self::keep_certificate_current`]).
    async fn place_certificate(&mut self, r: &PartitionResource) {
        self.certificate_serials.remove(&r.id);
        use std::os::unix::fs::PermissionsExt;
        let query = [
            ("computer_id", self.cfg.computer_id.as_str()),
            ("computer_partition_id", r.id.as_str()),
        ];
        let mut body = None;
        for _ in 0..10 {
            match self.master.get("getComputerPartitionCertificate", &query, None).await {
                Ok(crate::master::Fetched::Body(b, _)) => {
                    body = Some(b);
                    break;
                }
                Ok(_) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        let Some(body) = body else {
            warn!(partition = %r.id, "no certificate for the partition yet; it will be fetched at the next deployment");
            return;
        };
        let value = std::str::from_utf8(&body).ok().and_then(|t| marshal::loads(t).ok());
        let Some(Value::Dict(d)) = value else {
            warn!(partition = %r.id, "unreadable partition certificate answer");
            return;
        };
        let get = |k: &str| {
            d.iter()
                .find(|(key, _)| key.as_str() == Some(k))
                .and_then(|(_, v)| v.as_str())
        };
        let (Some(cert), Some(key)) = (get("certificate"), get("key")) else {
            return;
        };
        // The CAs the cluster trusts, which the Master sends with it: what a
        // tunnel checks its peer against.
        let ca = get("ca_certificate").unwrap_or_default();
        let dir = self.certificate_dir(&r.id);
        let written = std::fs::create_dir_all(&dir).and_then(|_| {
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))?;
            for (name, content) in [("partition.crt", cert), ("partition.key", key)] {
                write_if_changed(&dir, name, content, Some(0o400))?;
                std::os::unix::fs::chown(dir.join(name), Some(r.uid), Some(r.gid))?;
            }
            if !ca.is_empty() {
                write_if_changed(&dir, "ca.crt", ca, Some(0o444))?;
            }
            Ok(())
        });
        if let Err(e) = written {
            warn!(partition = %r.id, error = %e, "cannot keep the partition certificate");
        }
    }

    async fn serve_shared(
        &self,
        r: &PartitionResource,
        facts: &Facts,
        template: &crate::release::SharedTemplate,
        s: &crate::master::SharedPlan,
        rendered: &mut Vec<String>,
    ) -> Result<(), String> {
        let mut f = facts.clone();
        let about = SharedFacts::of(s);
        f.set("shared.reference", s.reference.clone());
        f.set("shared.title", s.title.clone());
        f.set("shared.owner", about.owner.clone());
        f.set("shared.serial", about.serial.clone());
        f.set("shared.json", about.json.clone());
        f.set_all("shared.param", &s.parameters);
        for file in &template.file {
            let rendered_file = crate::release::FileTemplate {
                path: f.render("shared file path", &file.path).map_err(|e| e.to_string())?,
                content: file.content.clone(),
                mode: file.mode.clone(),
            };
            rendered.push(rendered_file.path.clone());
            self.render_file(r, &f, &rendered_file)?;
        }
        let mut conn = BTreeMap::new();
        if let Some(result) = &template.result {
            let path = f.render("shared result", result).map_err(|e| e.to_string())?;
            conn = shared_result(&r.dir, &path, &about.serial).await?;
        }
        for (k, t) in &template.connection {
            conn.insert(
                k.clone(),
                f.render(&format!("shared connection {k}"), t)
                    .map_err(|e| e.to_string())?,
            );
        }
        if !conn.is_empty() {
            self.publish(r, &conn, Some(&s.reference)).await?;
        }
        Ok(())
    }

    /// The process that runs one end of a tunnel: this binary's `tunnel`
    /// command, as the partition's user, with the partition's certificate.
    fn tunnel_process(
        &self,
        r: &PartitionResource,
        facts: &Facts,
        t: &crate::release::TunnelTemplate,
    ) -> Result<ProcessSpec, String> {
        let what = format!("tunnel {}", t.name);
        let render = |v: &str| facts.render(&what, v).map_err(|e| e.to_string());
        let exe = std::env::current_exe().map_err(|e| format!("{what}: cannot tell where nodeagent is: {e}"))?;
        let certs = self.certificate_dir(&r.id);
        let mut argv = vec![
            exe.to_string_lossy().into_owned(),
            "tunnel".into(),
            "--name".into(),
            t.name.clone(),
            "--listen".into(),
            render(&t.listen)?,
        ];
        if let Some(forward) = &t.forward {
            argv.extend(["--forward".into(), render(forward)?]);
            for a in &t.allow {
                let a = render(a)?;
                if !a.trim().is_empty() {
                    argv.extend(["--allow".into(), a]);
                }
            }
        }
        if let (Some(connect), Some(peer)) = (&t.connect, &t.peer) {
            argv.extend(["--connect".into(), render(connect)?, "--peer".into(), render(peer)?]);
        }
        for (flag, file) in [
            ("--cert", "partition.crt"),
            ("--key", "partition.key"),
            ("--ca", "ca.crt"),
        ] {
            argv.extend([flag.into(), certs.join(file).to_string_lossy().into_owned()]);
        }
        Ok(ProcessSpec {
            name: format!("tunnel-{}", t.name),
            argv,
            env: BTreeMap::from([("RUST_LOG".to_string(), "info".to_string())]),
            stop_timeout_secs: 5,
        })
    }

    /// Removes the files rendered for shared instances the partition no
    /// longer hosts, so what the instance reads from them (a route, a
    /// virtual host) goes away with the shared instance.
    fn forget_gone_shared(&self, r: &PartitionResource, now: BTreeMap<String, Vec<String>>) {
        let record = self.cfg.agent_dir().join("shared").join(format!("{}.json", r.id));
        let before: BTreeMap<String, Vec<String>> = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let kept: std::collections::BTreeSet<&String> = now.values().flatten().collect();
        let root = r.dir.canonicalize().unwrap_or_else(|_| r.dir.clone());
        for (reference, paths) in &before {
            if now.contains_key(reference) {
                continue;
            }
            for p in paths.iter().filter(|p| !kept.contains(p)) {
                if p.starts_with('/') || p.split('/').any(|c| c == "..") {
                    continue;
                }
                let path = r.dir.join(p);
                // The partition's user owns the directories: only remove
                // what really lies inside the partition.
                let inside = path
                    .parent()
                    .and_then(|d| d.canonicalize().ok())
                    .is_some_and(|d| d.starts_with(&root));
                if inside && std::fs::remove_file(&path).is_ok() {
                    info!(partition = %r.id, shared = %reference, file = %p, "removed the file of a shared instance no longer hosted");
                }
            }
        }
        let written = std::fs::create_dir_all(record.parent().unwrap_or(&record))
            .and_then(|_| std::fs::write(&record, serde_json::to_string(&now).unwrap_or_default()));
        if let Err(e) = written {
            warn!(partition = %r.id, error = %e, "cannot record the files of shared instances");
        }
    }

    fn render_file(
        &self,
        r: &PartitionResource,
        facts: &Facts,
        file: &crate::release::FileTemplate,
    ) -> Result<(), String> {
        let content = facts
            .render(&format!("file {}", file.path), &file.content)
            .map_err(|e| e.to_string())?;
        if file.path.starts_with('/') || file.path.split('/').any(|c| c == "..") {
            return Err(format!("file {}: path must stay inside the partition", file.path));
        }
        let mode = match &file.mode {
            Some(m) => {
                Some(u32::from_str_radix(m, 8).map_err(|_| format!("file {}: mode {m:?} is not octal", file.path))?)
            }
            None => None,
        };
        write_if_changed(&r.dir, &file.path, &content, mode).map_err(|e| format!("writing {}: {e}", file.path))?;
        // Owned by the partition: its processes read (and may rewrite) it.
        let mut path = r.dir.join(&file.path);
        while path != r.dir {
            let _ = std::os::unix::fs::lchown(&path, Some(r.uid), Some(r.gid));
            if !path.pop() {
                break;
            }
        }
        Ok(())
    }

    async fn publish(
        &self,
        r: &PartitionResource,
        conn: &BTreeMap<String, String>,
        shared: Option<&str>,
    ) -> Result<(), String> {
        let xml = marshal::dumps(&Value::Dict(
            conn.iter()
                .map(|(k, v)| (Value::str(k.clone()), Value::str(v.clone())))
                .collect(),
        ))
        .map_err(|e| e.to_string())?;
        let reference = shared.unwrap_or("None");
        let fields = [
            ("computer_id", self.cfg.computer_id.as_str()),
            ("computer_partition_id", r.id.as_str()),
            ("connection_xml", xml.as_str()),
            ("slave_reference", reference),
        ];
        self.master
            .post("setComputerPartitionConnectionXml", &fields)
            .await
            .map(drop)
            .map_err(|e| format!("publishing connection parameters: {e}"))
    }

    #[allow(clippy::too_many_arguments)]
    async fn request_child(
        &self,
        r: &PartitionResource,
        title: &str,
        url: &str,
        software_type: &str,
        params: &BTreeMap<String, String>,
        sla: &BTreeMap<String, String>,
        shared: bool,
    ) -> Result<(), String> {
        let dict = |m: &BTreeMap<String, String>| {
            marshal::dumps(&Value::Dict(
                m.iter()
                    .map(|(k, v)| (Value::str(k.clone()), Value::str(v.clone())))
                    .collect(),
            ))
            .map_err(|e| e.to_string())
        };
        let (params, sla) = (dict(params)?, dict(sla)?);
        let state = marshal::dumps(&Value::str("started")).map_err(|e| e.to_string())?;
        let shared = marshal::dumps(&Value::Bool(shared)).map_err(|e| e.to_string())?;
        let fields = [
            ("computer_id", self.cfg.computer_id.as_str()),
            ("computer_partition_id", r.id.as_str()),
            ("software_release", url),
            ("software_type", software_type),
            ("partition_reference", title),
            ("partition_parameter_xml", params.as_str()),
            ("filter_xml", sla.as_str()),
            ("state", state.as_str()),
            ("shared_xml", shared.as_str()),
        ];
        match self.master.post("requestComputerPartition", &fields).await {
            Ok(_) => Ok(()),
            // Accepted, not placed yet: the Master places it when it can.
            Err(crate::master::MasterError::Rejected { status: 408, .. }) => Ok(()),
            Err(e) => Err(format!("requesting child {title}: {e}")),
        }
    }

    async fn stop(&mut self, r: &PartitionResource) -> Result<(), String> {
        // Children and published parameters stay; only the processes go.
        self.supervisor.stop_partition(&r.id).await;
        if !self.post(r, "stoppedComputerPartition", &[]).await {
            return Err("could not report the partition stopped".into());
        }
        Ok(())
    }

    async fn destroy(&mut self, r: &PartitionResource, inst: &InstancePlan) -> Result<(), String> {
        info!(partition = %r.id, instance = %inst.title, "destroying");
        self.supervisor.stop_partition(&r.id).await;
        if let Ok((sw_dir, release)) = self.profile_of(inst) {
            if let Ok(profile) = release.profile(&inst.software_type) {
                if let Some(hook) = &profile.destroy {
                    let facts = self.facts(r, inst, &sw_dir, profile);
                    match facts.render_all("destroy hook", hook) {
                        Ok(argv) => {
                            let p = Promise {
                                name: "destroy hook".into(),
                                check: Check::Command(argv),
                                timeout: Duration::from_secs(60),
                            };
                            if let Err(e) = p.run(r).await {
                                warn!(partition = %r.id, error = %e, "destroy hook failed; destroying anyway");
                            }
                        }
                        Err(e) => warn!(partition = %r.id, error = %e, "destroy hook not run"),
                    }
                }
            }
        }
        if r.mode == crate::config::Mode::Privileged && r.uid != 0 {
            kill_user(r.uid).await?;
        }
        wipe(&r.dir).map_err(|e| format!("emptying {}: {e}", r.dir.display()))?;
        // The next instance here starts its accounting from zero.
        self.supervisor.cgroups().remove(&r.id);
        // The freed partition's certificate is revoked by the Master; drop our copy.
        let _ = std::fs::remove_dir_all(self.certificate_dir(&r.id));
        if !self.post(r, "destroyedComputerPartition", &[]).await {
            return Err("could not report the partition destroyed".into());
        }
        Ok(())
    }

    /// Runs the promises of every started, deployed partition once; reports
    /// a change of health (error, or recovered) to the Master.
    pub async fn check_promises(&self, partitions: &[PartitionPlan]) -> Vec<(String, Result<(), String>)> {
        let mut results = Vec::new();
        for p in partitions {
            let (Some(inst), Some(r)) = (&p.instance, self.resources.get(&p.id)) else {
                continue;
            };
            if inst.requested_state != "started" || !self.deployed.contains_key(&p.id) {
                continue;
            }
            let Ok((sw_dir, release)) = self.profile_of(inst) else {
                continue;
            };
            let Ok(profile) = release.profile(&inst.software_type) else {
                continue;
            };
            let facts = self.facts(r, inst, &sw_dir, profile);
            let mut outcome = Ok(());
            for promise in render_promises(&facts, profile).unwrap_or_default() {
                if let Err(e) = promise.run(r).await {
                    outcome = Err(e);
                    break;
                }
            }
            let was_error = inst.access_status.as_deref().is_some_and(|s| s.starts_with("#error"));
            match &outcome {
                Err(e) if !was_error => {
                    self.post(r, "softwareInstanceError", &[("error_log", e)]).await;
                }
                Ok(()) if was_error || inst.access_status.is_none() => {
                    self.post(r, "startedComputerPartition", &[]).await;
                }
                _ => {}
            }
            results.push((p.id.clone(), outcome));
        }
        results
    }

    /// Forgets every deployment, so the next run deploys every partition
    /// again (after the agent stopped all processes).
    pub fn forget_all(&mut self) {
        let ids: Vec<String> = self.deployed.keys().cloned().collect();
        for id in ids {
            self.record(&id, None);
        }
    }

    /// The formatted partitions.
    pub fn resources(&self) -> impl Iterator<Item = &PartitionResource> {
        self.resources.values()
    }
}

/// How long a deployment waits for a file a `{{file:…}}` placeholder names
/// (a service writes it once started); past that the deployment fails with
/// the reason and is retried on the next run.
const FILE_WAIT: Duration = Duration::from_secs(30);

/// A child instance as a profile asks for it, rendered.
struct ChildRequest {
    title: String,
    url: String,
    software_type: String,
    parameters: BTreeMap<String, String>,
    sla: BTreeMap<String, String>,
    shared: bool,
}

/// Renders the connection parameters and children of `profile`, waiting up
/// to [`FILE_WAIT`] for files named by `{{file:…}}` to appear.
async fn render_published(
    facts: &Facts,
    inst: &InstancePlan,
    profile: &Profile,
) -> Result<(BTreeMap<String, String>, Vec<ChildRequest>), String> {
    let deadline = tokio::time::Instant::now() + FILE_WAIT;
    loop {
        match render_published_once(facts, inst, profile) {
            Err(crate::release::ReleaseError::NotYet(_)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other.map_err(|e| e.to_string()),
        }
    }
}

/// The keys of a shared instance's entry that say who it is rather than
/// what it asks.
const SHARED_IDENTITY_KEYS: [&str; 5] = [
    "slave_reference",
    "slave_title",
    "slave_owner",
    "slap_software_type",
    "timestamp",
];

/// What the agent tells a release about a hosted shared instance, beside
/// its parameters.
struct SharedFacts {
    /// The requesting user's key, as the Master gives it (`slave_owner`).
    owner: String,
    /// Changes whenever what the shared instance asks changes.
    serial: String,
    /// Everything as one JSON object (`reference`, `title`, `owner`,
    /// `serial`, `parameters`), escaped, for a service to read.
    json: String,
}

impl SharedFacts {
    fn of(s: &crate::master::SharedPlan) -> SharedFacts {
        use sha2::Digest;
        let owner = s.parameters.get("slave_owner").cloned().unwrap_or_default();
        let parameters: BTreeMap<&String, &String> = s
            .parameters
            .iter()
            .filter(|(k, _)| !SHARED_IDENTITY_KEYS.contains(&k.as_str()))
            .collect();
        let asked = serde_json::json!({
            "reference": s.reference, "title": s.title, "owner": owner, "parameters": parameters,
        });
        let serial = hex::encode(&sha2::Sha256::digest(asked.to_string().as_bytes())[..8]);
        let mut whole = asked;
        whole["serial"] = serde_json::Value::String(serial.clone());
        SharedFacts {
            owner,
            serial,
            json: whole.to_string(),
        }
    }
}

/// Waits for the instance's result for one shared instance (see
/// [`crate::release::SharedTemplate::result`]) at the version `serial`.
async fn shared_result(dir: &std::path::Path, path: &str, serial: &str) -> Result<BTreeMap<String, String>, String> {
    let deadline = tokio::time::Instant::now() + FILE_WAIT;
    let mut last = String::from("not written yet");
    while tokio::time::Instant::now() < deadline {
        match crate::release::read_partition_file(dir, path) {
            Err(crate::release::ReleaseError::NotYet(_)) => {}
            Err(e) => return Err(e.to_string()),
            Ok(text) => match serde_json::from_str::<serde_json::Value>(&text) {
                Err(e) => last = format!("not JSON ({e})"),
                Ok(v) if v["serial"].as_str() != Some(serial) => {
                    last = format!("for version {} (waiting for {serial})", v["serial"]);
                }
                Ok(v) => {
                    if let Some(e) = v["error"].as_str() {
                        return Err(e.to_string());
                    }
                    let mut conn = BTreeMap::new();
                    if let Some(map) = v["connection"].as_object() {
                        for (k, v) in map {
                            match v {
                                serde_json::Value::Null => {}
                                serde_json::Value::String(s) => {
                                    conn.insert(k.clone(), s.clone());
                                }
                                other => {
                                    conn.insert(k.clone(), other.to_string());
                                }
                            }
                        }
                    }
                    return Ok(conn);
                }
            },
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!(
        "the instance gave no result for this shared instance within {} s in {path}: {last}",
        FILE_WAIT.as_secs()
    ))
}

fn render_published_once(
    facts: &Facts,
    inst: &InstancePlan,
    profile: &Profile,
) -> Result<(BTreeMap<String, String>, Vec<ChildRequest>), crate::release::ReleaseError> {
    let mut connection = BTreeMap::new();
    for (k, t) in &profile.connection {
        connection.insert(k.clone(), facts.render(&format!("connection {k}"), t)?);
    }
    let mut children = Vec::new();
    for child in &profile.child {
        let title = facts.render("child title", &child.title)?;
        let render_map =
            |m: &BTreeMap<String, String>| -> Result<BTreeMap<String, String>, crate::release::ReleaseError> {
                m.iter()
                    .map(|(k, v)| Ok((k.clone(), facts.render(&format!("child {title} {k}"), v)?)))
                    .collect()
            };
        children.push(ChildRequest {
            parameters: render_map(&child.parameters)?,
            sla: render_map(&child.sla)?,
            url: match &child.software_release {
                Some(u) => facts.render("child software_release", u)?,
                None => inst.software_release.clone(),
            },
            software_type: child.software_type.clone(),
            shared: child.shared,
            title,
        });
    }
    Ok((connection, children))
}

fn render_promises(facts: &Facts, profile: &Profile) -> Result<Vec<Promise>, String> {
    profile
        .promise
        .iter()
        .map(|p| {
            let what = format!("promise {}", p.name);
            let check = if let Some(c) = &p.command {
                Check::Command(facts.render_all(&what, c).map_err(|e| e.to_string())?)
            } else if let Some(t) = &p.tcp {
                Check::Tcp(facts.render(&what, t).map_err(|e| e.to_string())?)
            } else {
                let url = p.http.as_deref().unwrap_or_default();
                Check::Http(facts.render(&what, url).map_err(|e| e.to_string())?)
            };
            Ok(Promise {
                name: p.name.clone(),
                check,
                timeout: Duration::from_secs(p.timeout),
            })
        })
        .collect()
}

/// SIGKILLs every process of `uid` until none is left (processes may fork
/// while we kill).
async fn kill_user(uid: u32) -> Result<(), String> {
    for _ in 0..50 {
        let pids = pids_of_uid(uid);
        if pids.is_empty() {
            return Ok(());
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("processes of uid {uid} are still alive after repeated SIGKILL"))
}

/// Empties a partition directory, keeping it (its owner and mode are
/// format's) and its `.slapos-resource`. Links are removed, not followed.
fn wipe(dir: &std::path::Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() == ".slapos-resource" {
            continue;
        }
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    Ok(())
}

fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_default()
}
