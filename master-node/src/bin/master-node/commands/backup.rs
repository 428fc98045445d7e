//! `backup`: save the whole state of a running cluster to a file, and
//! check such a file (`master_node::backup` has the format).

use std::io::Write;
use std::path::Path;

use master_node::backup::{self, Header};
use slap_proto::cluster::BackupRequest;

use crate::cli::{Admin, BackupArgs};
use crate::fail::Fail;

/// `backup --peer --token --out [--every P --keep K]`.
pub async fn save(a: BackupArgs) -> Result<(), Fail> {
    let (Some(peer), Some(token), Some(out)) = (a.peer, a.token, a.out) else {
        return Err(Fail(
            "backup needs --peer, --token and --out (or `backup verify FILE`)".into(),
        ));
    };
    let admin = Admin { peer, token };
    let Some(every) = a.every else {
        let header = save_once(&admin, &out).await?;
        println!("{} written: {}", out.display(), describe(&header));
        return Ok(());
    };
    std::fs::create_dir_all(&out).map_err(|e| Fail(format!("cannot create {}: {e}", out.display())))?;
    tracing::info!(dir = %out.display(), ?every, keep = a.keep, "taking backups");
    let mut turn = tokio::time::interval(every);
    turn.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = turn.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let partial = out.join("next.backup");
        match save_once(&admin, &partial).await {
            Ok(header) => {
                let name = format!(
                    "master-{}-{}-{}.backup",
                    header.cluster_id,
                    utc_stamp(header.created),
                    header.log_index
                );
                let path = out.join(&name);
                if let Err(e) = std::fs::rename(&partial, &path) {
                    tracing::warn!(error = %e, "cannot name the backup {name}");
                    continue;
                }
                tracing::info!(file = %path.display(), "{}", describe(&header));
                prune(&out, a.keep as usize);
            }
            Err(Fail(e)) => tracing::warn!("backup failed, trying again in {every:?}: {e}"),
        }
    }
}

/// Takes one backup into `out`: asks the cluster, checks what came,
/// writes it beside `out`, synced, then renames it into place.
async fn save_once(admin: &Admin, out: &Path) -> Result<Header, Fail> {
    let client = admin.client()?;
    let token = admin.token.clone();
    let file = client
        .call(|mut c| {
            let token = token.clone();
            async move {
                let mut chunks = c.backup(BackupRequest { token }).await?.into_inner();
                let mut file = Vec::new();
                while let Some(chunk) = chunks.message().await? {
                    file.extend_from_slice(&chunk.data);
                }
                Ok(file)
            }
        })
        .await
        .map_err(|e| Fail(format!("no backup taken: {e}")))?;
    let (header, _) = backup::verify(&file).map_err(|e| Fail(format!("the backup received is not usable: {e}")))?;
    write_whole(out, &file).map_err(|e| Fail(format!("cannot write {}: {e}", out.display())))?;
    Ok(header)
}

/// Removes the oldest `master-*.backup` files of `dir` beyond `keep` (the
/// names sort by time).
fn prune(dir: &Path, keep: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut backups: Vec<std::path::PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("master-") && n.ends_with(".backup"))
        })
        .collect();
    backups.sort();
    let excess = backups.len().saturating_sub(keep);
    for old in &backups[..excess] {
        match std::fs::remove_file(old) {
            Ok(()) => tracing::info!(file = %old.display(), "old backup removed"),
            Err(e) => tracing::warn!(file = %old.display(), error = %e, "cannot remove an old backup"),
        }
    }
}

/// `20261205T031500Z` for a Unix time.
fn utc_stamp(secs: u64) -> String {
    let Ok(t) = time::OffsetDateTime::from_unix_timestamp(secs as i64) else {
        return secs.to_string();
    };
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `backup verify FILE`.
pub fn verify(file: &Path) -> Result<(), Fail> {
    let bytes = std::fs::read(file).map_err(|e| Fail(format!("cannot read {}: {e}", file.display())))?;
    let (header, state) =
        backup::verify(&bytes).map_err(|e| Fail(format!("{} is not a usable backup: {e}", file.display())))?;
    println!("{} is a usable backup: {}", file.display(), describe(&header));
    println!(
        "it holds {} computers, {} partitions, {} instances, {} certificates",
        state.computers.len(),
        state.partitions.len(),
        state.instances.len(),
        state.certificates.len()
    );
    Ok(())
}

fn describe(h: &Header) -> String {
    format!(
        "cluster {}, log index {}, {} records, {} bytes, sha256 {}, taken at {} (Unix time)",
        h.cluster_id, h.log_index, h.records, h.body_bytes, h.body_sha256, h.created
    )
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, renames it
/// over `path` and syncs the directory: `path` is the whole file or what
/// it was before, never half of it.
fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    #[test]
    fn backup_names_carry_the_utc_time() {
        assert_eq!(super::utc_stamp(0), "19700101T000000Z");
        assert_eq!(super::utc_stamp(1_796_444_100), "20261205T041500Z");
        assert_eq!(super::utc_stamp(951_782_400), "20000229T000000Z");
    }
}
