//! `backup`: save the whole state of a running cluster to a file, and
//! check such a file (`master_node::backup` has the format).

use std::io::Write;
use std::path::Path;

use master_node::backup::{self, Header};
use slap_proto::cluster::BackupRequest;

use crate::cli::{Admin, BackupArgs};
use crate::fail::Fail;

/// `backup --peer --token --out`: asks the cluster for its state, checks
/// what came, and writes it beside `--out`, synced, then renamed into place.
pub async fn save(a: BackupArgs) -> Result<(), Fail> {
    let (Some(peer), Some(token), Some(out)) = (a.peer, a.token, a.out) else {
        return Err(Fail(
            "backup needs --peer, --token and --out (or `backup verify FILE`)".into(),
        ));
    };
    let client = Admin {
        peer,
        token: token.clone(),
    }
    .client()?;
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
    write_whole(&out, &file).map_err(|e| Fail(format!("cannot write {}: {e}", out.display())))?;
    println!("{} written: {}", out.display(), describe(&header));
    Ok(())
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
