//! `nodeagent format`: computer partitions, as slapformat makes them.
//!
//! For partition N (privileged mode): user and group `slapuserN`, directory
//! `<instance_root>/slappartN` owned by it with mode 0750, a tap device
//! `slaptapN` owned by it, the (N+1)th address of the IPv4 and IPv6 ranges on
//! the configured interface, and `.slapos-resource` recording all of it.
//!
//! Every step first looks at what exists and only changes what differs, so a
//! second run changes nothing (the report counts changes; tests check it is
//! zero) and N can grow. Unprivileged mode makes the directories only, owned
//! by the agent's user, with every partition on one address (127.0.0.1 by
//! default, `--unprivileged-address`) and its own ports.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{nth_v4, nth_v6, partition_id, Mode, NodeConfig, PartitionResource};

/// What a format run changed; all zero when the machine already matched.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FormatReport {
    pub users_created: u32,
    pub dirs_changed: u32,
    pub taps_created: u32,
    pub addresses_added: u32,
    pub resources_written: u32,
}

impl FormatReport {
    /// Whether anything changed.
    pub fn changed(&self) -> bool {
        *self != FormatReport::default()
    }
}

/// Why a partition could not be formatted.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("privileged mode needs root (run as root, or pass --mode unprivileged)")]
    NotRoot,
    #[error("{0}")]
    Invalid(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FormatError {
    let what = what.into();
    move |source| FormatError::Io { what, source }
}

/// Runs `program args`, failing with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String, FormatError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(io(format!("running {program}")))?;
    if !out.status.success() {
        return Err(FormatError::Command {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes every partition the configuration asks for; returns what changed.
pub fn format(cfg: &NodeConfig) -> Result<(FormatReport, Vec<PartitionResource>), FormatError> {
    cfg.validate().map_err(FormatError::Invalid)?;
    let mode = cfg.mode();
    if mode == Mode::Privileged && !nix::unistd::geteuid().is_root() {
        return Err(FormatError::NotRoot);
    }
    let mut report = FormatReport::default();
    fs::create_dir_all(&cfg.instance_root).map_err(io(format!("creating {}", cfg.instance_root.display())))?;
    fs::create_dir_all(&cfg.software_root).map_err(io(format!("creating {}", cfg.software_root.display())))?;
    fs::create_dir_all(cfg.agent_dir()).map_err(io("creating the agent directory"))?;
    let present = if mode == Mode::Privileged {
        ensure_user(&cfg.software_user, &cfg.software_root, &mut report)?;
        // Releases are built by the software user and read by everyone.
        let (uid, gid) = ids_of(&cfg.software_user)?;
        ensure_dir(&cfg.software_root, uid, gid, 0o755, &mut report)?;
        run("ip", &["-o", "addr", "show", "dev", &cfg.interface])?
    } else {
        String::new()
    };
    let mut resources = Vec::new();
    for index in 0..cfg.partitions {
        let dir = cfg.partition_dir(index);
        let resource = match mode {
            Mode::Privileged => {
                let user = format!("{}{index}", cfg.user_prefix);
                ensure_user(&user, &dir, &mut report)?;
                let (uid, gid) = ids_of(&user)?;
                ensure_dir(&dir, uid, gid, 0o750, &mut report)?;
                let tap = format!("{}{index}", cfg.tap_prefix);
                ensure_tap(&tap, uid, &mut report)?;
                let ipv4 = nth_v4(cfg.ipv4_range, index).to_string();
                let ipv6 = nth_v6(cfg.ipv6_range, index).to_string();
                ensure_address(&cfg.interface, &present, &format!("{ipv4}/32"), &mut report)?;
                ensure_address(&cfg.interface, &present, &format!("{ipv6}/128"), &mut report)?;
                PartitionResource {
                    id: partition_id(index),
                    index,
                    dir: dir.clone(),
                    user: Some(user),
                    uid,
                    gid,
                    tap: Some(tap),
                    ipv4,
                    ipv6: Some(ipv6),
                    port: cfg.port_base + 10 * index as u16,
                    mode,
                }
            }
            Mode::Unprivileged => {
                let (uid, gid) = (nix::unistd::getuid().as_raw(), nix::unistd::getgid().as_raw());
                ensure_dir(&dir, uid, gid, 0o750, &mut report)?;
                PartitionResource {
                    id: partition_id(index),
                    index,
                    dir: dir.clone(),
                    user: None,
                    uid,
                    gid,
                    tap: None,
                    ipv4: cfg.unprivileged_address.to_string(),
                    ipv6: None,
                    port: cfg.port_base + 10 * index as u16,
                    mode,
                }
            }
        };
        write_resource(&resource, &mut report)?;
        resources.push(resource);
    }
    Ok((report, resources))
}

/// Reads the resources of every formatted partition, in index order.
pub fn load_resources(cfg: &NodeConfig) -> Result<Vec<PartitionResource>, FormatError> {
    (0..cfg.partitions)
        .map(|i| {
            let dir = cfg.partition_dir(i);
            PartitionResource::load(&dir).map_err(io(format!(
                "reading {}/.slapos-resource (run `nodeagent format` first)",
                dir.display()
            )))
        })
        .collect()
}

fn ids_of(user: &str) -> Result<(u32, u32), FormatError> {
    let u = User::from_name(user)
        .map_err(|e| FormatError::Invalid(format!("looking up user {user}: {e}")))?
        .ok_or_else(|| FormatError::Invalid(format!("user {user} does not exist")))?;
    Ok((u.uid.as_raw(), u.gid.as_raw()))
}

fn ensure_user(name: &str, home: &Path, report: &mut FormatReport) -> Result<(), FormatError> {
    let exists = User::from_name(name).ok().flatten().is_some();
    if exists {
        return Ok(());
    }
    let group_exists = Group::from_name(name).ok().flatten().is_some();
    let home = home.to_string_lossy();
    let mut args = vec![
        "--system",
        "--home-dir",
        &home,
        "--no-create-home",
        "--shell",
        "/usr/sbin/nologin",
    ];
    if group_exists {
        args.extend(["--gid", name]);
    } else {
        args.push("--user-group");
    }
    args.push(name);
    run("useradd", &args)?;
    report.users_created += 1;
    Ok(())
}

fn ensure_dir(dir: &Path, uid: u32, gid: u32, mode: u32, report: &mut FormatReport) -> Result<(), FormatError> {
    let what = || format!("preparing {}", dir.display());
    let mut changed = false;
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(io(what()))?;
        changed = true;
    }
    let meta = fs::metadata(dir).map_err(io(what()))?;
    if meta.uid() != uid || meta.gid() != gid {
        nix::unistd::chown(dir, Some(Uid::from_raw(uid)), Some(Gid::from_raw(gid)))
            .map_err(|e| io(what())(e.into()))?;
        changed = true;
    }
    if meta.mode() & 0o7777 != mode {
        fs::set_permissions(dir, fs::Permissions::from_mode(mode)).map_err(io(what()))?;
        changed = true;
    }
    if changed {
        report.dirs_changed += 1;
    }
    Ok(())
}

fn ensure_tap(name: &str, uid: u32, report: &mut FormatReport) -> Result<(), FormatError> {
    let owner_file = format!("/sys/class/net/{name}/owner");
    if let Ok(owner) = fs::read_to_string(&owner_file) {
        if owner.trim() == uid.to_string() {
            return Ok(());
        }
        // A tap of someone else: recreate it for this partition's user.
        run("ip", &["tuntap", "del", "dev", name, "mode", "tap"])?;
    }
    run(
        "ip",
        &["tuntap", "add", "dev", name, "mode", "tap", "user", &uid.to_string()],
    )?;
    report.taps_created += 1;
    Ok(())
}

fn ensure_address(interface: &str, present: &str, cidr: &str, report: &mut FormatReport) -> Result<(), FormatError> {
    // `ip -o addr` lines read "... inet 10.0.0.1/32 scope ..."; compare whole words.
    if present.split_whitespace().any(|w| w == cidr) {
        return Ok(());
    }
    let mut args = vec!["addr", "add", cidr, "dev", interface];
    if cidr.contains(':') {
        args.push("nodad");
    }
    match run("ip", &args) {
        Ok(_) => {}
        // Added since we listed (another format run): fine.
        Err(FormatError::Command { stderr, .. }) if stderr.contains("File exists") => return Ok(()),
        Err(e) => return Err(e),
    }
    report.addresses_added += 1;
    Ok(())
}

fn write_resource(resource: &PartitionResource, report: &mut FormatReport) -> Result<(), FormatError> {
    let path = resource.dir.join(".slapos-resource");
    let text = serde_json::to_string_pretty(resource).expect("a resource always serializes");
    if fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    let tmp = resource.dir.join(".slapos-resource.tmp");
    fs::write(&tmp, &text).map_err(io(format!("writing {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(io(format!("writing {}", path.display())))?;
    report.resources_written += 1;
    Ok(())
}

/// Removes what format created for `cfg` (users, taps, addresses and the
/// directories). Used by tests and `nodeagent unformat`; partitions must
/// be free, as this kills nothing.
pub fn unformat(cfg: &NodeConfig) -> Result<(), FormatError> {
    for index in 0..cfg.partitions {
        if cfg.mode() == Mode::Privileged {
            let tap = format!("{}{index}", cfg.tap_prefix);
            if Path::new(&format!("/sys/class/net/{tap}")).exists() {
                run("ip", &["tuntap", "del", "dev", &tap, "mode", "tap"])?;
            }
            for cidr in [
                format!("{}/32", nth_v4(cfg.ipv4_range, index)),
                format!("{}/128", nth_v6(cfg.ipv6_range, index)),
            ] {
                let _ = run("ip", &["addr", "del", &cidr, "dev", &cfg.interface]);
            }
            let user = format!("{}{index}", cfg.user_prefix);
            if User::from_name(&user).ok().flatten().is_some() {
                run("userdel", &[&user])?;
            }
        }
        let dir = cfg.partition_dir(index);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io(format!("removing {}", dir.display())))?;
        }
    }
    Ok(())
}

/// The computer's capacity as `loadComputerConfigurationFromXML` carries it
/// (reference section 4.3), plus `capacity` and `categories` dictionaries
/// this Master reads (the real client never sends them).
pub fn computer_dict(cfg: &NodeConfig, resources: &[PartitionResource]) -> slap_proto::marshal::Value {
    use slap_proto::marshal::Value;
    fn s(x: impl Into<String>) -> Value {
        Value::str(x)
    }
    let partitions = resources
        .iter()
        .map(|r| {
            let mut addresses = vec![Value::str_dict([
                ("addr", s(r.ipv4.clone())),
                ("netmask", s("255.255.255.255")),
            ])];
            if let Some(v6) = &r.ipv6 {
                addresses.push(Value::str_dict([
                    ("addr", s(v6.clone())),
                    ("netmask", s("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")),
                ]));
            }
            let mut entries = vec![
                ("reference", s(r.id.clone())),
                ("path", s(r.dir.to_string_lossy())),
                ("address_list", Value::List(addresses)),
                (
                    "user",
                    Value::str_dict([
                        ("name", s(r.user.clone().unwrap_or_default())),
                        ("path", s(r.dir.to_string_lossy())),
                    ]),
                ),
            ];
            if let Some(tap) = &r.tap {
                entries.push(("tap", Value::str_dict([("name", s(tap.clone()))])));
            }
            Value::str_dict(entries)
        })
        .collect();
    let facts = crate::usage::machine_facts(cfg);
    let mode = match cfg.mode() {
        Mode::Privileged => "privileged",
        Mode::Unprivileged => "unprivileged",
    };
    let mut capacity: Vec<(&str, Value)> = vec![
        ("partitions", s(resources.len().to_string())),
        ("addresses", s(resources.len().to_string())),
        ("mode", s(mode)),
    ];
    for (k, v) in &facts {
        capacity.push((k.as_str(), s(v.clone())));
    }
    let categories = cfg.category_map();
    Value::str_dict([
        ("reference", s(cfg.computer_id.clone())),
        (
            "address",
            s(resources.first().map(|r| r.ipv4.clone()).unwrap_or_default()),
        ),
        ("netmask", s("255.255.255.255")),
        ("instance_root", s(cfg.instance_root.to_string_lossy())),
        ("software_root", s(cfg.software_root.to_string_lossy())),
        ("interface", Value::str_dict([("name", s(cfg.interface.clone()))])),
        ("partition_list", Value::List(partitions)),
        ("capacity", Value::str_dict(capacity)),
        (
            "categories",
            Value::Dict(categories.into_iter().map(|(k, v)| (s(k), s(v))).collect()),
        ),
    ])
}
