//! Installing and removing software releases.
//!
//! A release is installed once per node into `<software_root>/<key>` (key: a
//! hash of its URL). It is built in `<software_root>/.build-<key>` and renamed
//! into place only when every file checked out and the build succeeded, so a
//! crash mid-build leaves nothing that looks installed; `.completed` marks a
//! finished one. Releases no longer listed and used by no partition are
//! removed.

use std::collections::HashSet;
use std::io::IsTerminal;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::config::{software_key, Mode, NodeConfig};
use crate::master::{ComputerPlan, MasterClient};
use crate::release::{self, Release, MANIFEST};

/// Why a release could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Release(#[from] release::ReleaseError),
    #[error("{url}: sha256 is {actual}, the manifest says {expected}")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error("build failed ({status}); last lines of the log:\n{tail}")]
    Build { status: String, tail: String },
}

/// What a software run did.
#[derive(Debug, Default)]
pub struct SoftwareRun {
    pub installed: Vec<String>,
    pub failed: Vec<(String, String)>,
    pub removed: Vec<String>,
}

/// The installed release at `url`, if it is complete.
pub fn installed(cfg: &NodeConfig, url: &str) -> Option<(PathBuf, Release)> {
    let dir = cfg.software_dir(url);
    if !dir.join(".completed").exists() {
        return None;
    }
    let text = std::fs::read_to_string(dir.join(MANIFEST)).ok()?;
    Release::parse(url, &text).ok().map(|r| (dir, r))
}

/// Installs what the plan lists, removes what it destroys or no longer lists
/// (unless a partition still uses it), and reports each outcome to the Master.
pub async fn process(cfg: &NodeConfig, master: &MasterClient, plan: &ComputerPlan) -> SoftwareRun {
    let mut run = SoftwareRun::default();
    let computer = cfg.computer_id.as_str();
    let in_use: HashSet<String> = plan
        .partitions
        .iter()
        .filter_map(|p| p.instance.as_ref())
        .map(|i| software_key(&i.software_release))
        .collect();
    for (url, state) in &plan.software {
        let fields = [("url", url.as_str()), ("computer_id", computer)];
        if state == "destroyed" {
            let dir = cfg.software_dir(url);
            if in_use.contains(&software_key(url)) {
                info!(%url, "release to destroy is still used by a partition; keeping it for now");
                continue;
            }
            if dir.exists() {
                if let Err(e) = std::fs::remove_dir_all(&dir) {
                    warn!(%url, error = %e, "cannot remove the release");
                    continue;
                }
                run.removed.push(url.clone());
            }
            report(master, "destroyedSoftwareRelease", &fields).await;
            continue;
        }
        if installed(cfg, url).is_some() {
            continue;
        }
        report(master, "buildingSoftwareRelease", &fields).await;
        info!(%url, "installing software release");
        match install(cfg, url).await {
            Ok(dir) => {
                info!(%url, dir = %dir.display(), "software release installed");
                report(master, "availableSoftwareRelease", &fields).await;
                run.installed.push(url.clone());
            }
            Err(e) => {
                warn!(%url, error = %e, "software release failed");
                let log = e.to_string();
                let mut with_log = fields.to_vec();
                with_log.push(("error_log", &log));
                report(master, "softwareReleaseError", &with_log).await;
                run.failed.push((url.clone(), log));
            }
        }
    }
    // Garbage: installed releases that are neither listed nor used.
    let listed: HashSet<String> = plan.software.iter().map(|(u, _)| software_key(u)).collect();
    if let Ok(entries) = std::fs::read_dir(&cfg.software_root) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_release = name.len() == 32 && name.chars().all(|c| c.is_ascii_hexdigit());
            if is_release && !listed.contains(&name) && !in_use.contains(&name) {
                info!(release = %name, "removing a release no longer listed nor used");
                if std::fs::remove_dir_all(entry.path()).is_ok() {
                    run.removed.push(name);
                }
            }
        }
    }
    run
}

async fn report(master: &MasterClient, path: &str, fields: &[(&str, &str)]) {
    if let Err(e) = master.post(path, fields).await {
        warn!(call = path, error = %e, "could not report to the master");
    }
}

fn progress(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("  {msg}");
    }
}

/// Installs the release at `url`; returns its directory.
pub async fn install(cfg: &NodeConfig, url: &str) -> Result<PathBuf, InstallError> {
    let key = software_key(url);
    let final_dir = cfg.software_root.join(&key);
    let build_dir = cfg.software_root.join(format!(".build-{key}"));
    let io = |what: &str, p: &Path| {
        let what = format!("{what} {}", p.display());
        move |e| InstallError::Io(what, e)
    };
    if build_dir.exists() {
        std::fs::remove_dir_all(&build_dir).map_err(io("clearing", &build_dir))?;
    }
    std::fs::create_dir_all(&build_dir).map_err(io("creating", &build_dir))?;
    progress(&format!("fetching {url}"));
    let manifest = release::fetch(url).await?;
    let text = String::from_utf8_lossy(&manifest).into_owned();
    let rel = Release::parse(url, &text)?;
    std::fs::write(build_dir.join(MANIFEST), &text).map_err(io("writing", &build_dir))?;
    std::fs::write(build_dir.join(".url"), url).map_err(io("writing", &build_dir))?;
    for (n, f) in rel.fetch.iter().enumerate() {
        let source = release::resolve(url, &f.url);
        progress(&format!("fetching {source} ({}/{})", n + 1, rel.fetch.len()));
        let bytes = release::fetch(&source).await?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(&f.sha256) {
            return Err(InstallError::Digest {
                url: source,
                expected: f.sha256.clone(),
                actual,
            });
        }
        let dest = build_dir.join(&f.to);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(io("creating", parent))?;
        }
        std::fs::write(&dest, &bytes).map_err(io("writing", &dest))?;
        let mode = if f.executable { 0o755 } else { 0o644 };
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(io("chmod", &dest))?;
    }
    let software_ids = if cfg.mode() == Mode::Privileged {
        let u = nix::unistd::User::from_name(&cfg.software_user)
            .ok()
            .flatten()
            .ok_or_else(|| {
                InstallError::Io(
                    format!("user {}", cfg.software_user),
                    std::io::Error::other("does not exist; run `nodeagent format`"),
                )
            })?;
        chown_tree(&build_dir, u.uid.as_raw(), u.gid.as_raw()).map_err(io("chown", &build_dir))?;
        Some((u.uid.as_raw(), u.gid.as_raw(), u.dir))
    } else {
        None
    };
    if let Some(build) = &rel.build {
        progress(&format!("building {} ({})", rel.name, build.command.join(" ")));
        run_build(build, &build_dir, &final_dir, software_ids).await?;
    }
    std::fs::set_permissions(&build_dir, std::fs::Permissions::from_mode(0o755)).map_err(io("chmod", &build_dir))?;
    std::fs::write(
        build_dir.join(".completed"),
        format!("{:?}", std::time::SystemTime::now()),
    )
    .map_err(io("writing", &build_dir))?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(io("replacing", &final_dir))?;
    }
    std::fs::rename(&build_dir, &final_dir).map_err(io("renaming into", &final_dir))?;
    Ok(final_dir)
}

async fn run_build(
    build: &release::Build,
    build_dir: &Path,
    final_dir: &Path,
    ids: Option<(u32, u32, PathBuf)>,
) -> Result<(), InstallError> {
    let log_path = build_dir.join(".build.log");
    let log = std::fs::File::create(&log_path).map_err(|e| InstallError::Io("creating the build log".into(), e))?;
    let log2 = log
        .try_clone()
        .map_err(|e| InstallError::Io("creating the build log".into(), e))?;
    let Some((program, args)) = build.command.split_first() else {
        return Err(InstallError::Build {
            status: "empty build command".into(),
            tail: String::new(),
        });
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(build_dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("BUILD_DIR", build_dir)
        .env("SOFTWARE_DIR", final_dir)
        .stdin(std::process::Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0)
        .kill_on_drop(true);
    if let Some((uid, gid, home)) = ids {
        cmd.uid(uid).gid(gid).env("HOME", home);
    }
    let mut child = cmd.spawn().map_err(|e| InstallError::Build {
        status: format!("cannot start {program}: {e}"),
        tail: String::new(),
    })?;
    let status = match tokio::time::timeout(Duration::from_secs(build.timeout), child.wait()).await {
        Ok(Ok(s)) if s.success() => return Ok(()),
        Ok(Ok(s)) => s.to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::SIGKILL);
            }
            format!("timed out after {} s", build.timeout)
        }
    };
    Err(InstallError::Build {
        status,
        tail: tail(&log_path, 20),
    })
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    if dir.is_dir() && !dir.is_symlink() {
        for entry in std::fs::read_dir(dir)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}
