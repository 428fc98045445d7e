//! The agent's own process supervisor (the seed's supervisord).
//!
//! Each process runs as its partition's user, in its own session, with its
//! working directory in the partition and stdout and stderr appended to
//! `<partition>/var/log/<name>.log` (opened by the child after it dropped
//! privileges, so a partition cannot point the agent at someone else's file).
//! A process that exits is restarted with exponential backoff (1 s doubling to
//! 60 s, reset once it stayed up 30 s). Stopping sends SIGTERM to its process
//! group, then SIGKILL after the process's stop timeout.
//!
//! **Agent restarts.** Processes are not children the agent takes down with
//! it: each start is recorded in `<instance_root>/.nodeagent/run/<partition>/
//! <name>.json` (pid, kernel start time, the spec), out of the partitions'
//! reach. A new agent re-adopts every recorded process that is still the
//! same process (same pid and start time, same user), so services stay up
//! across an agent restart or upgrade; a process that died meanwhile is
//! started again at once.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::config::{Mode, PartitionResource};

/// Logs are rotated past this size (one previous file kept as `.log.1`).
pub const LOG_ROTATE_BYTES: u64 = 10 * 1024 * 1024;
const BACKOFF_FIRST: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub name: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub stop_timeout_secs: u64,
}

/// A recorded start (the pid file).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PidRecord {
    pid: i32,
    start_time: u64,
    spec: ProcessSpec,
}

struct Proc {
    spec: ProcessSpec,
    /// Set when this agent started it (so it reaps it).
    child: Option<std::process::Child>,
    pid: Option<i32>,
    start_time: u64,
    started_at: Instant,
    backoff: Duration,
    next_start: Option<Instant>,
    restarts: u32,
}

struct PartitionProcs {
    resource: PartitionResource,
    procs: BTreeMap<String, Proc>,
}

/// Supervises the processes of every partition.
pub struct Supervisor {
    run_dir: PathBuf,
    partitions: Mutex<BTreeMap<String, PartitionProcs>>,
    cgroups: crate::cgroups::Cgroups,
}

/// A process's state, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    pub partition: String,
    pub name: String,
    pub pid: Option<i32>,
    pub restarts: u32,
}

impl Supervisor {
    /// A supervisor keeping its records under `run_dir`.
    pub fn new(run_dir: PathBuf) -> Supervisor {
        Supervisor {
            run_dir,
            partitions: Mutex::new(BTreeMap::new()),
            cgroups: crate::cgroups::Cgroups::None,
        }
    }

    /// Puts every process a partition starts into its accounting cgroups.
    pub fn with_cgroups(mut self, cgroups: crate::cgroups::Cgroups) -> Supervisor {
        self.cgroups = cgroups;
        self
    }

    /// The accounting cgroups in use.
    pub fn cgroups(&self) -> &crate::cgroups::Cgroups {
        &self.cgroups
    }

    fn record_path(&self, partition: &str, name: &str) -> PathBuf {
        self.run_dir.join(partition).join(format!("{name}.json"))
    }

    /// Re-adopts the processes recorded for `resources` that are still
    /// running; returns how many. Recorded processes that died are started
    /// by the next [`tick`](Self::tick).
    pub async fn adopt(&self, resources: &[PartitionResource]) -> usize {
        let mut adopted = 0;
        let mut parts = self.partitions.lock().await;
        for r in resources {
            let dir = self.run_dir.join(&r.id);
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let Ok(text) = std::fs::read_to_string(entry.path()) else {
                    continue;
                };
                let Ok(rec) = serde_json::from_str::<PidRecord>(&text) else {
                    continue;
                };
                let alive = proc_start_time(rec.pid) == Some(rec.start_time) && proc_uid(rec.pid) == Some(r.uid);
                let p = parts.entry(r.id.clone()).or_insert_with(|| PartitionProcs {
                    resource: r.clone(),
                    procs: BTreeMap::new(),
                });
                let now = Instant::now();
                p.procs.insert(
                    rec.spec.name.clone(),
                    Proc {
                        spec: rec.spec.clone(),
                        child: None,
                        pid: alive.then_some(rec.pid),
                        start_time: rec.start_time,
                        started_at: now,
                        backoff: BACKOFF_FIRST,
                        next_start: (!alive).then_some(now),
                        restarts: 0,
                    },
                );
                if alive {
                    adopted += 1;
                    info!(partition = %r.id, process = %rec.spec.name, pid = rec.pid, "re-adopted a running process");
                }
            }
        }
        adopted
    }

    /// Makes the partition run exactly `specs`: new ones start, changed ones
    /// restart, missing ones stop. Returns how many processes it (re)started.
    pub async fn apply(&self, resource: &PartitionResource, specs: Vec<ProcessSpec>) -> std::io::Result<usize> {
        let mut parts = self.partitions.lock().await;
        let p = parts.entry(resource.id.clone()).or_insert_with(|| PartitionProcs {
            resource: resource.clone(),
            procs: BTreeMap::new(),
        });
        p.resource = resource.clone();
        let wanted: BTreeMap<String, ProcessSpec> = specs.into_iter().map(|s| (s.name.clone(), s)).collect();
        let stale: Vec<String> = p
            .procs
            .iter()
            .filter(|(name, proc)| wanted.get(*name) != Some(&proc.spec))
            .map(|(name, _)| name.clone())
            .collect();
        for name in stale {
            if let Some(mut proc) = p.procs.remove(&name) {
                stop_proc(&mut proc).await;
                let _ = std::fs::remove_file(self.record_path(&resource.id, &name));
            }
        }
        let mut started = 0;
        for (name, spec) in wanted {
            let running = p.procs.get(&name).is_some_and(|proc| proc.pid.is_some());
            if running {
                continue;
            }
            let proc = spawn(&self.run_dir, resource, spec, &self.cgroups)?;
            p.procs.insert(name, proc);
            started += 1;
        }
        Ok(started)
    }

    /// Stops every process of a partition.
    pub async fn stop_partition(&self, partition: &str) {
        let mut parts = self.partitions.lock().await;
        if let Some(mut p) = parts.remove(partition) {
            for (name, proc) in p.procs.iter_mut() {
                stop_proc(proc).await;
                let _ = std::fs::remove_file(self.record_path(partition, name));
            }
        }
        let _ = std::fs::remove_dir_all(self.run_dir.join(partition));
    }

    /// Stops everything (agent shutdown with --stop-on-exit).
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.partitions.lock().await.keys().cloned().collect();
        for id in ids {
            self.stop_partition(&id).await;
        }
    }

    /// Reaps exits, restarts with backoff, rotates logs.
    pub async fn tick(&self) {
        let mut parts = self.partitions.lock().await;
        let now = Instant::now();
        for p in parts.values_mut() {
            for proc in p.procs.values_mut() {
                if let Some(pid) = proc.pid {
                    let exited = match proc.child.as_mut() {
                        Some(child) => !matches!(child.try_wait(), Ok(None)),
                        None => proc_start_time(pid) != Some(proc.start_time),
                    };
                    if exited {
                        let up = now.duration_since(proc.started_at);
                        if up >= STABLE_AFTER {
                            proc.backoff = BACKOFF_FIRST;
                        }
                        warn!(partition = %p.resource.id, process = %proc.spec.name, pid,
                              restart_in = ?proc.backoff, "process exited; restarting");
                        proc.pid = None;
                        proc.child = None;
                        proc.next_start = Some(now + proc.backoff);
                        proc.backoff = (proc.backoff * 2).min(BACKOFF_MAX);
                    } else {
                        rotate_log(&p.resource, &proc.spec.name);
                    }
                }
                if proc.pid.is_none() && proc.next_start.is_some_and(|t| t <= now) {
                    match spawn(&self.run_dir, &p.resource, proc.spec.clone(), &self.cgroups) {
                        Ok(fresh) => {
                            let (backoff, restarts) = (proc.backoff, proc.restarts + 1);
                            *proc = fresh;
                            proc.backoff = backoff;
                            proc.restarts = restarts;
                        }
                        Err(e) => {
                            warn!(partition = %p.resource.id, process = %proc.spec.name, error = %e, "cannot start");
                            proc.next_start = Some(now + proc.backoff);
                            proc.backoff = (proc.backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
            }
        }
    }

    /// Every supervised process.
    pub async fn status(&self) -> Vec<ProcessStatus> {
        let parts = self.partitions.lock().await;
        parts
            .iter()
            .flat_map(|(id, p)| {
                p.procs.values().map(move |proc| ProcessStatus {
                    partition: id.clone(),
                    name: proc.spec.name.clone(),
                    pid: proc.pid,
                    restarts: proc.restarts,
                })
            })
            .collect()
    }

    /// Pids of a partition's supervised processes.
    pub async fn pids(&self, partition: &str) -> Vec<i32> {
        let parts = self.partitions.lock().await;
        parts
            .get(partition)
            .map(|p| p.procs.values().filter_map(|proc| proc.pid).collect())
            .unwrap_or_default()
    }
}

fn spawn(
    run_dir: &std::path::Path,
    r: &PartitionResource,
    spec: ProcessSpec,
    cgroups: &crate::cgroups::Cgroups,
) -> std::io::Result<Proc> {
    let procs_files = cgroups.prepare(&r.id, r.uid);
    let (program, args) = spec
        .argv
        .split_first()
        .ok_or_else(|| std::io::Error::other(format!("process {} has an empty command", spec.name)))?;
    // Prepared before fork: the child only makes system calls.
    let var = CString::new("var").expect("no NUL");
    let var_log = CString::new("var/log").expect("no NUL");
    let log = CString::new(format!("var/log/{}.log", spec.name))
        .map_err(|_| std::io::Error::other("process name holds a NUL byte"))?;
    let cgroup_procs: Vec<CString> = procs_files
        .iter()
        .filter_map(|p| CString::new(p.as_os_str().as_encoded_bytes()).ok())
        .collect();
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .current_dir(&r.dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &r.dir)
        .env("PARTITION_ID", &r.id)
        .envs(&spec.env)
        .stdin(std::process::Stdio::null());
    if let Some(user) = &r.user {
        cmd.env("USER", user).env("LOGNAME", user);
    }
    if r.mode == Mode::Privileged {
        cmd.uid(r.uid).gid(r.gid);
    }
    // SAFETY: the closure runs in the child between fork and exec, after the
    // uid and gid changed, and calls only async-signal-safe functions.
    unsafe {
        cmd.pre_exec(move || {
            // Join the accounting cgroups before running the program ("0"
            // is the writing process itself); best effort.
            for procs in &cgroup_procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::mkdir(var.as_ptr(), 0o750);
            libc::mkdir(var_log.as_ptr(), 0o750);
            let fd = libc::open(
                log.as_ptr(),
                libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o640,
            );
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::dup2(fd, 1) < 0 || libc::dup2(fd, 2) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("starting {} ({program}) in {}: {e}", spec.name, r.id)))?;
    let pid = child.id() as i32;
    // Where the child could not move itself (cgroup v2), move it now.
    cgroups.join(&procs_files, pid);
    let start_time = proc_start_time(pid).unwrap_or(0);
    let record = PidRecord {
        pid,
        start_time,
        spec: spec.clone(),
    };
    let dir = run_dir.join(&r.id);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{}.json", spec.name));
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(&record).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, &path)?;
    info!(partition = %r.id, process = %spec.name, pid, "started");
    Ok(Proc {
        spec,
        child: Some(child),
        pid: Some(pid),
        start_time,
        started_at: Instant::now(),
        backoff: BACKOFF_FIRST,
        next_start: None,
        restarts: 0,
    })
}

/// SIGTERM to the process group, SIGKILL after the stop timeout.
async fn stop_proc(proc: &mut Proc) {
    use nix::sys::signal::{killpg, Signal};
    use nix::unistd::Pid;
    let Some(pid) = proc.pid.take() else { return };
    let alive = |proc: &mut Proc| match proc.child.as_mut() {
        Some(c) => matches!(c.try_wait(), Ok(None)),
        None => proc_start_time(pid) == Some(proc.start_time),
    };
    let _ = killpg(Pid::from_raw(pid), Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(proc.spec.stop_timeout_secs);
    while alive(proc) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if alive(proc) {
        warn!(process = %proc.spec.name, pid, "did not stop after SIGTERM; sending SIGKILL");
    }
    // The group may hold children that outlived the leader: kill them all.
    let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    if let Some(mut c) = proc.child.take() {
        let _ = c.wait();
    }
    info!(process = %proc.spec.name, pid, "stopped");
}

/// The kernel start time of `pid` (field 22 of /proc/pid/stat), None when it
/// does not exist or is a zombie.
pub fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// The real uid of `pid`.
pub fn proc_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Every pid whose real uid is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| proc_uid(*pid) == Some(uid))
        .collect()
}

/// Copy-and-truncate rotation: the process keeps its descriptor (opened with
/// O_APPEND) and writes on from offset 0. Opened without following links and
/// checked to be the partition user's regular file.
fn rotate_log(r: &PartitionResource, name: &str) {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let path = r.dir.join("var/log").join(format!("{name}.log"));
    let Ok(meta) = std::fs::symlink_metadata(&path) else {
        return;
    };
    if !meta.file_type().is_file() || meta.len() < LOG_ROTATE_BYTES || meta.uid() != r.uid {
        return;
    }
    let open = |p: &std::path::Path, write: bool| {
        std::fs::OpenOptions::new()
            .read(!write)
            .write(write)
            .create(write)
            .truncate(write)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
    };
    let (Ok(mut src), Ok(mut dst)) = (open(&path, false), open(&path.with_extension("log.1"), true)) else {
        return;
    };
    if std::io::copy(&mut src, &mut dst).is_ok() {
        if let Ok(f) = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            let _ = f.set_len(0);
        }
    }
}
